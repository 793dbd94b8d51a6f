"""Real istioctl → istioctl-proxy → three real istiod replicas, compared with istioctl asking each replica.

The proxy runs as its own process in both auth modes:
- identity: it holds a client certificate from the mesh CA; istioctl authenticates to it with --cert-dir;
- forward: callers present JWTs (or, as in the seed, Kubernetes tokens minted by istioctl itself) that
  the proxy forwards, and istiod verifies and scopes them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from lightkube import AsyncClient, KubeConfig
from lightkube.core.exceptions import ApiError
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import ServiceAccount

from istioctl_proxy import client

from .. import ads_client
from ..waits import until
from .ads import CDS, LDS, AdsClient, XdsState, close_clients, start_clients
from .jwt_issuer import JwtIssuer
from .mesh import EnvoyProxy, Istioctl, Mesh, Peers, parse_table
from .proxy_process import ProxyProcess

pytestmark = pytest.mark.e2e

STATES = (
    {CDS: XdsState.SYNCED, LDS: XdsState.SYNCED},
    {CDS: XdsState.SYNCED, LDS: XdsState.STALE},
    {CDS: XdsState.ERROR, LDS: XdsState.SYNCED},
)


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.fixture(scope="module")
def identity_proxy(mesh: Mesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    d = tmp_path_factory.mktemp("identity-proxy")
    serving = mesh.ca.issue_serving()
    upstream = mesh.ca.issue_spiffe("istio-system", "istioctl-proxy")
    root = _write(d / "root.pem", mesh.root_cert_pem)
    proxy = ProxyProcess(d, [
        "--tls-cert", _write(d / "tls.crt", serving.cert_pem), "--tls-key", _write(d / "tls.key", serving.key_pem),
        "--client-ca", root, "--istiod", ",".join(r.secure_address for r in mesh.replicas), "--istiod-ca", root,
        "--upstream-identity", "--upstream-cert", _write(d / "up.crt", upstream.cert_pem),
        "--upstream-key", _write(d / "up.key", upstream.key_pem), "--upstream-timeout", "5",
    ]).start()  # fmt: skip
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def forward_proxy(mesh: Mesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    d = tmp_path_factory.mktemp("forward-proxy")
    serving = mesh.ca.issue_serving()
    root = _write(d / "root.pem", mesh.root_cert_pem)
    proxy = ProxyProcess(d, [
        "--tls-cert", _write(d / "tls.crt", serving.cert_pem), "--tls-key", _write(d / "tls.key", serving.key_pem),
        "--istiod", ",".join(r.secure_address for r in mesh.replicas), "--istiod-ca", root,
        "--upstream-timeout", "5",
    ]).start()  # fmt: skip
    yield proxy
    proxy.stop()


@pytest.fixture
async def fleet(mesh: Mesh) -> AsyncIterator[list[AdsClient]]:
    """6 Python proxies per replica in chosen states, in two namespaces: 18 with 3 replicas."""
    clients = [
        mesh.ads_client(r, f"fleet-{r.index}-{i}", ("team-a", "team-b")[i % 2], STATES[i % 3])
        for r in mesh.replicas
        for i in range(6)
    ]
    await start_clients(clients)
    yield clients
    await close_clients(clients)


@pytest.fixture(scope="module")
def envoy_last(mesh: Mesh) -> EnvoyProxy:
    """A router Envoy on the *last* replica, so a proxy-scoped request must really find the right one."""
    return mesh.start_envoy(mesh.replicas[-1], "ingress-last", "istio-ingress", node_type="router")


def _ps_rows(istioctl: Istioctl, *args: str | Path) -> list[dict[str, str]]:
    rc, out, err = istioctl.run("x", "ps", *args, "-r", "default", timeout_s=60)
    assert rc == 0, f"istioctl x ps failed ({rc}):\n{err}\n{out}"
    return parse_table(out)


def _through(proxy: ProxyProcess, mesh: Mesh) -> list[str]:
    return ["--xds-address", proxy.address, "--cert-dir", str(mesh.admin_cert_dir)]


def _record_session(mesh: Mesh, proxy: ProxyProcess, ps_output: str, verbose: str) -> None:
    """docs/real-session.md: what a user sees, copied from this very run."""
    doc = Path(__file__).resolve().parents[2] / "docs" / "real-session.md"
    replicas = "\n".join(f"- `{r.pod_name}` on `{r.secure_address}`" for r in mesh.replicas)
    doc.write_text(
        "# A real session\n\n"
        "Written by `tests/e2e/test_through_proxy.py` on every run: real `istioctl` "
        f"({mesh.peers.istio_version}) asks istioctl-proxy (identity mode, mTLS) at `{proxy.address}`, which "
        f"asks {len(mesh.replicas)} real `pilot-discovery` replicas:\n\n{replicas}\n\n"
        "Connected to them: stock Envoys (a `router` that reaches SYNCED, a `sidecar` that NACKs Istio-only "
        "filters) and Python ADS clients held in SYNCED / STALE / ERROR states.\n\n"
        f"```console\n$ istioctl x ps --xds-address {proxy.address} --cert-dir <istio-system/default certs> "
        f"-r default\n{ps_output.rstrip()}\n```\n\n"
        "With `-v 1`, one column per type shows the sync state each replica reported:\n\n"
        f"```console\n$ istioctl x ps --xds-address {proxy.address} --cert-dir <...> -r default -v 1\n"
        f"{verbose.rstrip()}\n```\n\n"
        "Every row says `<external>` in ISTIOD; the test checks NAME, CLUSTER, VERSION and SUBSCRIBED TYPES "
        "against the union of `istioctl x ps` asked of each replica directly.\n"
    )


async def _settled(mesh: Mesh, fleet: list[AdsClient]) -> None:
    async def ready() -> bool:
        states = {}
        for r in mesh.replicas:
            states.update(r.proxy_states())
        return all(c.proxy_id in states for c in fleet) and all(
            "ERROR" in states[c.proxy_id].values() for c in fleet if XdsState.ERROR in c.types.values()
        )

    await until(ready, "fleet registered on every replica")


async def test_x_ps_lists_every_proxy_once_as_the_replicas_do(
    mesh: Mesh,
    istioctl: Istioctl,
    identity_proxy: ProxyProcess,
    fleet: list[AdsClient],
    envoy_router: EnvoyProxy,
    envoy_sidecar: EnvoyProxy,
    envoy_last: EnvoyProxy,
) -> None:
    await _settled(mesh, fleet)
    direct: dict[str, dict[str, str]] = {}
    for r in mesh.replicas:
        for row in _ps_rows(istioctl, *mesh.istioctl_xds_args(r)):
            assert row["NAME"] not in direct, f"{row['NAME']} listed by two replicas"
            direct[row["NAME"]] = row
    rc, out, err = istioctl.run("x", "ps", *_through(identity_proxy, mesh), "-r", "default", timeout_s=60)
    assert rc == 0, err
    rows = parse_table(out)
    verbose = istioctl.run("x", "ps", *_through(identity_proxy, mesh), "-r", "default", "-v", "1", timeout_s=60)
    assert verbose.rc == 0, verbose.stderr
    assert "STALE" in verbose.stdout and "ERROR" in verbose.stdout and "<external>" in verbose.stdout
    _record_session(mesh, identity_proxy, out, verbose.stdout)
    names = [row["NAME"] for row in rows]
    assert len(names) == len(set(names)), "a proxy was listed twice"
    assert set(names) == set(direct)
    assert {c.proxy_id for c in fleet} | {envoy_router.proxy_id, envoy_last.proxy_id} <= set(names)
    for row in rows:
        assert row["ISTIOD"] == "<external>"
        want = direct[row["NAME"]]
        for col in ("CLUSTER", "VERSION", "SUBSCRIBED TYPES"):
            assert row[col] == want[col], (row, want)


async def test_x_ps_json_matches_the_union(
    mesh: Mesh, istioctl: Istioctl, identity_proxy: ProxyProcess, fleet: list[AdsClient]
) -> None:
    await _settled(mesh, fleet)
    rc, out, err = await istioctl.arun("x", "ps", *_through(identity_proxy, mesh), "-r", "default", "-o", "json")
    assert rc == 0, err
    doc = json.loads(out)
    assert json.loads(doc["controlPlane"]["identifier"])["ID"] == "<external>"
    ids = {res["node"]["id"] for res in doc["resources"]}
    direct: set[str] = set()
    for r in mesh.replicas:
        rc, out, err = await istioctl.arun("x", "ps", *mesh.istioctl_xds_args(r), "-r", "default", "-o", "json")
        assert rc == 0, err
        direct |= {res["node"]["id"] for res in json.loads(out).get("resources", [])}
    assert ids == direct and {c.proxy_id for c in fleet} <= ids


def test_x_ps_of_one_proxy_on_the_last_replica_compares_like_direct(
    mesh: Mesh, istioctl: Istioctl, identity_proxy: ProxyProcess, envoy_last: EnvoyProxy
) -> None:
    replica, pid = envoy_last.replica, envoy_last.proxy_id
    envoy_last.wait_states({"CDS": "SYNCED", "LDS": "SYNCED"})
    dump = envoy_last.write_config_dump()
    direct = istioctl.run("x", "ps", pid, "--file", dump, *mesh.istioctl_xds_args(replica), "-r", "default")
    proxied = istioctl.run("x", "ps", pid, "--file", dump, *_through(identity_proxy, mesh), "-r", "default")
    assert direct.rc == 0 and proxied.rc == 0, proxied.stderr + direct.stderr
    assert proxied.stdout.split() == direct.stdout.split() == ["Clusters", "Match", "Listeners", "Match", "Routes",
                                                                "Match"]  # fmt: skip


async def test_internal_debug_through_the_proxy(
    mesh: Mesh, istioctl: Istioctl, identity_proxy: ProxyProcess, fleet: list[AdsClient], envoy_last: EnvoyProxy
) -> None:
    await _settled(mesh, fleet)
    args = (*_through(identity_proxy, mesh), "-r", "default")
    rc, out, err = await istioctl.arun("x", "internal-debug", "syncz", *args)
    assert rc == 0, err
    assert {c.proxy_id for c in fleet} <= {row["proxy"] for row in json.loads(out)}
    rc, out, err = await istioctl.arun("x", "internal-debug", "--list", *args)
    assert rc == 0, err
    assert "syncz" in out and "config_dump" in out
    rc, out, err = await istioctl.arun("x", "internal-debug", f"config_dump?proxyID={envoy_last.proxy_id}", *args)
    assert rc == 0, err
    assert "Proxy not connected" not in out and "configs" in out


async def test_an_unknown_debug_path_reads_as_asking_istiod_directly(
    mesh: Mesh, istioctl: Istioctl, identity_proxy: ProxyProcess
) -> None:
    """istiod's mux answers "404 page not found" and istioctl then lists the paths; the proxy answers the 404
    itself (no replica sees a path it does not vet), so istioctl behaves the same through it."""
    replica = mesh.replicas[0]
    ask = ("x", "internal-debug", "no-such-path", "-r", "default")
    direct = await istioctl.arun(*ask, *mesh.istioctl_xds_args(replica))
    proxied = await istioctl.arun(*ask, *_through(identity_proxy, mesh))
    # istioctl saw the 404 and fell back to `list`.
    assert "please check all supported internal debug commands" in direct.stdout, direct
    assert (proxied.rc, proxied.stdout, proxied.stderr) == (direct.rc, direct.stdout, direct.stderr)


async def test_version_through_the_proxy(
    mesh: Mesh, istioctl: Istioctl, peers: Peers, identity_proxy: ProxyProcess, fleet: list[AdsClient]
) -> None:
    await _settled(mesh, fleet)
    rc, out, err = await istioctl.arun("x", "version", *_through(identity_proxy, mesh))
    assert rc == 0, err
    assert f"control plane version: {peers.istio_version}" in out, out
    assert "data plane version:" in out and "proxies)" in out, out


async def test_forward_mode_istiod_verifies_and_scopes_the_callers_jwt(
    mesh: Mesh, jwt_issuer: JwtIssuer, forward_proxy: ProxyProcess, fleet: list[AdsClient]
) -> None:
    await _settled(mesh, fleet)
    target = client.Target(forward_proxy.address, ca_pem=mesh.root_cert_pem, authority="localhost")
    admin = dataclasses.replace(target, token=jwt_issuer.mint("istio-system"))
    resp, _ = await ads_client.request(admin, client.SYNCZ)
    assert {c.proxy_id for c in fleet} <= {r.name for r in client.rows(resp)}
    team_a = dataclasses.replace(target, token=jwt_issuer.mint("team-a"), namespace="team-a")
    resp, _ = await ads_client.request(team_a, client.SYNCZ)
    seen = {r.name for r in client.rows(resp)}
    assert {c.proxy_id for c in fleet if c.namespace == "team-a"} <= seen
    assert all(name.endswith(".team-a") for name in seen), seen
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ads_client.request(dataclasses.replace(target, token="not-a-jwt"), client.SYNCZ)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ads_client.request(target, client.SYNCZ)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_seed_scenario_istioctl_token_forwarded_and_reviewed_by_istiod(
    mesh: Mesh, istioctl: Istioctl, forward_proxy: ProxyProcess, fleet: list[AdsClient]
) -> None:
    """istioctl without --cert-dir/--plaintext: TokenRequest from the API server, TLS to the proxy, the
    proxy forwards the token, and istiod checks it with a TokenReview against the same API server."""
    assert mesh.kube is not None
    kubeconfig = mesh.kube.apiserver.admin_kubeconfig()
    api = AsyncClient(config=KubeConfig.from_file(str(kubeconfig)))
    try:
        await api.create(ServiceAccount(metadata=ObjectMeta(name="default")), namespace="istio-system")
    except ApiError as e:
        assert e.status.code == 409, e  # already there
    finally:
        await api.close()
    await _settled(mesh, fleet)
    rc, out, err = await istioctl.arun(
        "x", "ps", "--xds-address", forward_proxy.address, "-r", "default", env={"KUBECONFIG": str(kubeconfig)}
    )
    assert rc == 0, f"{err}\n{out}\n{forward_proxy.log()[-2000:]}"
    names = {row["NAME"] for row in parse_table(out)}
    assert {c.proxy_id for c in fleet} <= names
    assert {row["ISTIOD"] for row in parse_table(out)} == {"<external>"}


async def test_a_killed_replica_leaves_the_others_answering(
    mesh: Mesh, istioctl: Istioctl, identity_proxy: ProxyProcess, fleet: list[AdsClient]
) -> None:
    await _settled(mesh, fleet)
    victim = mesh.replicas[1]
    survivors = {c.proxy_id for c in fleet if not c.proxy_id.startswith(f"fleet-{victim.index}-")}
    victim.kill()
    try:
        rows = _ps_rows(istioctl, *_through(identity_proxy, mesh))
        assert survivors <= {row["NAME"] for row in rows}
        assert not any(row["NAME"].startswith(f"fleet-{victim.index}-") for row in rows)
    finally:
        victim.restart()
