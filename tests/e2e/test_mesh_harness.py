"""Proves the real-mesh harness against the istiod replicas DIRECTLY (no proxy in between): istioctl sees
each replica's own proxies, Envoys and Python ADS clients land in the states we ask for, and istiod's
authentication / namespace scoping behaves as docs/real-peers.md records."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from ..waits import until
from .ads import (
    CDS,
    DEBUG,
    LDS,
    SYNCZ,
    AdsClient,
    ProxySync,
    XdsState,
    close_clients,
    control_plane,
    debug_request,
    insecure_channel,
    parse_syncz,
    start_clients,
    tls_channel,
)
from .jwt_issuer import JwtIssuer
from .mesh import (
    TIMEOUT_RC,
    EnvoyProxy,
    Istioctl,
    IstiodReplica,
    Mesh,
    Peers,
    PeersMissingError,
    parse_table,
)

pytestmark = pytest.mark.e2e

NAMESPACES = ("team-a", "team-b", "istio-system")


def ps(istioctl: Istioctl, mesh: Mesh, replica: IstiodReplica, *extra: str) -> list[dict[str, str]]:
    rc, out, err = istioctl.run("x", "ps", *mesh.istioctl_xds_args(replica), "-r", "default", *extra, timeout_s=60)
    assert rc == 0, f"istioctl x ps against {replica.pod_name} failed (rc={rc}):\n{err}\n{out}"
    return parse_table(out)


async def admin_syncz(mesh: Mesh, replica: IstiodReplica) -> list[ProxySync]:
    """syncz over 15012 with the istio-system/default mTLS identity: sees every namespace."""
    admin = mesh.ca.issue_spiffe("istio-system", "default")
    async with tls_channel(replica.secure_address, mesh.root_cert_pem, client=admin) as ch:
        return parse_syncz(await debug_request(ch, SYNCZ))


@pytest.fixture
async def fleet(mesh: Mesh) -> AsyncIterator[dict[str, list[AdsClient]]]:
    """4 SYNCED Python proxies per namespace per replica: 12 per replica, 36 with 3 replicas."""
    by_replica: dict[str, list[AdsClient]] = {}
    for r in mesh.replicas:
        by_replica[r.pod_name] = [
            mesh.ads_client(r, f"fleet-{r.index}-{i}", ns, {CDS: XdsState.SYNCED, LDS: XdsState.SYNCED})
            for ns in NAMESPACES
            for i in range(4)
        ]
    everyone = [c for cs in by_replica.values() for c in cs]
    await start_clients(everyone)
    yield by_replica
    await close_clients(everyone)


# -- peers and replicas --------------------------------------------------------------------------------


def test_peers_installed(tmp_path: Path) -> None:
    """Fails (never skips) when scripts/install-peers has not run: CI installs the peers first."""
    missing = ""
    try:
        peers = Peers.find()
    except PeersMissingError as e:
        missing = str(e)
    if missing:  # failed outside the except block, so the report is just the message
        pytest.fail(missing, pytrace=False)
    rc, out, err = Istioctl(peers.istioctl, tmp_path).run("version", "--remote=false")
    assert rc == 0, err
    assert f"client version: {peers.istio_version}" in out, (
        f"istioctl says {out!r}, .peers/ISTIO_VERSION {peers.istio_version}"
    )


def test_replicas_ready_on_own_addresses(mesh: Mesh) -> None:
    hosts = {r.host for r in mesh.replicas}
    assert len(hosts) == len(mesh.replicas)
    for r in mesh.replicas:
        assert r.is_running() and r.ready(), r
        assert r.xds_address == f"{r.host}:{mesh.ports.grpc}"
        assert r.secure_address == f"{r.host}:{mesh.ports.secure_grpc}"


# -- Envoy data plane ----------------------------------------------------------------------------------


def test_envoy_router_is_synced(mesh: Mesh, istioctl: Istioctl, envoy_router: EnvoyProxy) -> None:
    replica, pid = envoy_router.replica, envoy_router.proxy_id
    envoy_router.wait_states({"CDS": "SYNCED", "LDS": "SYNCED"})
    rows = {r["NAME"]: r for r in ps(istioctl, mesh, replica, "-v", "1")}
    row = rows[pid]
    assert row["CDS"].startswith("SYNCED") and row["LDS"].startswith("SYNCED"), row
    assert row["ISTIOD"] == replica.pod_name

    dump = json.loads(envoy_router.write_config_dump().read_text())
    assert any(c["@type"].endswith("ClustersConfigDump") for c in dump["configs"])


def test_istioctl_ps_diff_of_envoy_config_dump(mesh: Mesh, istioctl: Istioctl, envoy_router: EnvoyProxy) -> None:
    """`ps <pod>.<ns> --file dump` fetches istiod's config_dump for the proxy and diffs it with Envoy's."""
    replica, pid = envoy_router.replica, envoy_router.proxy_id
    envoy_router.wait_states({"CDS": "SYNCED", "LDS": "SYNCED"})
    dump = envoy_router.write_config_dump()
    rc, out, err = istioctl.run(
        "x", "ps", pid, "--file", dump, *mesh.istioctl_xds_args(replica), "-r", "default", timeout_s=60
    )  # fmt: skip
    assert rc == 0, err + out
    assert out.split() == ["Clusters", "Match", "Listeners", "Match", "Routes", "Match"], out


def test_envoy_sidecar_nacks(mesh: Mesh, istioctl: Istioctl, envoy_sidecar: EnvoyProxy) -> None:
    replica, pid = envoy_sidecar.replica, envoy_sidecar.proxy_id
    envoy_sidecar.wait_states({"CDS": "ERROR", "LDS": "ERROR"})  # both NACKed
    rows = {r["NAME"]: r for r in ps(istioctl, mesh, replica, "-v", "1")}
    assert rows[pid]["LDS"].startswith("ERROR") and rows[pid]["CDS"].startswith("ERROR"), rows[pid]
    assert rows[pid]["ISTIOD"] == replica.pod_name
    # Envoy's own reason travels back as error_detail: Istio-only filters stock Envoy does not have.
    errors = asyncio.run(_errors_of(mesh, replica, pid))
    assert "istio.metadata_exchange" in errors["LDS"] and "istio.metadata_exchange" in errors["CDS"], errors
    # INTERCEPTION_MODE=NONE: nothing the sidecar accepted may listen off loopback.
    assert [a for a in envoy_sidecar.listening_addresses() if not a.startswith("127.")] == []


async def _errors_of(mesh: Mesh, replica: IstiodReplica, proxy_id: str) -> dict[str, str]:
    return next(p for p in await admin_syncz(mesh, replica) if p.proxy_id == proxy_id).errors


# -- istioctl against each replica ---------------------------------------------------------------------


async def test_istioctl_ps_lists_only_that_replicas_proxies(
    mesh: Mesh, istioctl: Istioctl, fleet: dict[str, list[AdsClient]]
) -> None:
    for replica in mesh.replicas:
        rc, out, err = await istioctl.arun(
            "x", "ps", *mesh.istioctl_xds_args(replica), "-r", "default", timeout_s=60
        )  # fmt: skip
        assert rc == 0, err
        rows = parse_table(out)
        names = {r["NAME"] for r in rows}
        mine = {c.proxy_id for c in fleet[replica.pod_name]}
        others = {c.proxy_id for pod, cs in fleet.items() if pod != replica.pod_name for c in cs}
        assert mine <= names, f"{replica.pod_name} misses {mine - names}"
        assert not (names & others), f"{replica.pod_name} lists other replicas' proxies {names & others}"
        assert {r["ISTIOD"] for r in rows} == {replica.pod_name}
        assert {r["CLUSTER"] for r in rows if r["NAME"] in mine} == {mesh.cluster_id}


async def test_python_client_states(mesh: Mesh, istioctl: Istioctl) -> None:
    replica = mesh.replicas[0]
    states = {"synced": XdsState.SYNCED, "stale": XdsState.STALE, "error": XdsState.ERROR}
    clients = [mesh.ads_client(replica, f"state-{n}", "team-a", {CDS: s, LDS: s}) for n, s in states.items()]
    await start_clients(clients)
    try:
        expected = {f"state-{n}.team-a": s.value for n, s in states.items()}

        async def settled() -> bool:  # ACKs/NACKs are async: poll until istiod has processed them
            rows = {p.proxy_id: p for p in await admin_syncz(mesh, replica)}
            return all(rows.get(pid) and rows[pid].status == {"CDS": v, "LDS": v} for pid, v in expected.items())

        await until(settled, "client states in syncz")
        rows = {p.proxy_id: p for p in await admin_syncz(mesh, replica)}
        assert rows["state-error.team-a"].errors["LDS"].startswith("e2e NACK")

        rc, out, err = await istioctl.arun("x", "ps", *mesh.istioctl_xds_args(replica), "-r", "default", "-v", "1")
        assert rc == 0, err
        table = {r["NAME"]: r for r in parse_table(out)}
        for pid, v in expected.items():
            assert table[pid]["CDS"].split(" ")[0] == v and table[pid]["LDS"].split(" ")[0] == v, table[pid]
    finally:
        await close_clients(clients)


async def test_internal_debug_syncz(mesh: Mesh, istioctl: Istioctl, fleet: dict[str, list[AdsClient]]) -> None:
    replica = mesh.replicas[0]
    rc, out, err = await istioctl.arun(
        "x", "internal-debug", "syncz", *mesh.istioctl_xds_args(replica), "-r", "default", timeout_s=60
    )  # fmt: skip
    assert rc == 0, err
    proxies = {row["proxy"] for row in json.loads(out)}
    assert {c.proxy_id for c in fleet[replica.pod_name]} <= proxies


@pytest.mark.parametrize("how", ["x version", "PREFER_EXPERIMENTAL version"])
async def test_version_shows_control_plane(mesh: Mesh, istioctl: Istioctl, peers: Peers, how: str) -> None:
    replica = mesh.replicas[-1]
    args = ["x", "version"] if how == "x version" else ["version"]
    env = {} if how == "x version" else {"ISTIOCTL_PREFER_EXPERIMENTAL": "true"}
    rc, out, err = await istioctl.arun(*args, *mesh.istioctl_xds_args(replica), env=env, timeout_s=60)
    assert rc == 0, err
    assert f"control plane version: {peers.istio_version}" in out, out


# -- authentication and namespace scoping (what the proxy must preserve) -------------------------------


async def test_jwt_namespace_scoped_syncz(mesh: Mesh, jwt_issuer: JwtIssuer, fleet: dict[str, list[AdsClient]]) -> None:
    replica = mesh.replicas[0]
    mine = fleet[replica.pod_name]
    async with tls_channel(replica.secure_address, mesh.root_cert_pem) as ch:
        team_a = await debug_request(ch, SYNCZ, namespace="team-a", token=jwt_issuer.mint("team-a"))
        admin = await debug_request(ch, SYNCZ, namespace="istio-system", token=jwt_issuer.mint("istio-system"))
    seen_a = {p.proxy_id for p in parse_syncz(team_a)}
    assert seen_a == {c.proxy_id for c in mine if c.namespace == "team-a"} | _others_in(mesh, replica, "team-a")
    assert {c.proxy_id for c in mine} <= {p.proxy_id for p in parse_syncz(admin)}
    assert control_plane(team_a)["ID"] == replica.pod_name
    assert jwt_issuer.jwks_fetches >= 1


def _others_in(mesh: Mesh, replica: IstiodReplica, namespace: str) -> set[str]:
    # Proxies other tests left connected (session Envoys) in that namespace; normally none.
    return {e.proxy_id for e in mesh.envoys if e.replica is replica and e.namespace == namespace}


async def test_cert_identity_scopes_istioctl(mesh: Mesh, istioctl: Istioctl, fleet: dict[str, list[AdsClient]]) -> None:
    """istioctl --cert-dir with a team-b identity sees only team-b (ClientCertAuthenticator path)."""
    replica = mesh.replicas[0]
    rc, out, err = await istioctl.arun(
        "x", "ps", *mesh.istioctl_xds_args(replica, mesh.cert_dir("team-b")), "-i", "team-b", "-r", "default",
    )  # fmt: skip
    assert rc == 0, err
    assert {r["NAME"] for r in parse_table(out)} == {
        c.proxy_id for c in fleet[replica.pod_name] if c.namespace == "team-b"
    }


async def test_auth_failures(mesh: Mesh, jwt_issuer: JwtIssuer) -> None:
    replica = mesh.replicas[0]
    async with insecure_channel(replica.xds_address) as ch:  # 15010: no identity at all
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await debug_request(ch, SYNCZ)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    async with tls_channel(replica.secure_address, mesh.root_cert_pem) as ch:
        cases = {
            "wrong audience": (
                jwt_issuer.mint("team-a", audiences=("other",)),
                "team-a",
                grpc.StatusCode.UNAUTHENTICATED,
            ),
            "expired": (jwt_issuer.mint("team-a", ttl_s=-60), "team-a", grpc.StatusCode.UNAUTHENTICATED),
            # istiod unmarshals aud into []string, so a (standard-conforming) string aud fails.
            "aud string": (
                jwt_issuer.mint("team-a", extra_claims={"aud": "istio-ca"}),
                "team-a",
                grpc.StatusCode.UNAUTHENTICATED,
            ),
            "ns mismatch": (jwt_issuer.mint("team-a"), "team-b", grpc.StatusCode.PERMISSION_DENIED),
        }
        for what, (token, ns, code) in cases.items():
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await debug_request(ch, SYNCZ, namespace=ns, token=token)
            assert e.value.code() == code, f"{what}: {e.value}"
        # istio.io/debug from a non-system namespace: only config_dump/ndsz/edsz are allowed.
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await debug_request(ch, DEBUG, ["syncz"], namespace="team-a", token=jwt_issuer.mint("team-a"))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


# -- lifecycle -----------------------------------------------------------------------------------------


async def test_replica_kill_and_restart(mesh: Mesh) -> None:
    replica = mesh.replicas[-1]
    client = mesh.ads_client(replica, "restart-probe", "team-a", {CDS: XdsState.SYNCED})
    await client.start()
    try:
        replica.kill()
        assert not replica.is_running()
        await until(lambda: client.error is not None, "stream broken by the kill")
        assert client.error.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[union-attr]
    finally:
        await client.close()
    replica.start()
    async with mesh.ads_client(replica, "after-restart", "team-a", {CDS: XdsState.SYNCED}) as again:
        assert again.proxy_id in replica.proxy_states()


def test_istioctl_hangs_without_revision(mesh: Mesh, istioctl: Istioctl) -> None:
    """Without -r, `x ps` starts a kube informer on MutatingWebhookConfigurations and waits for it forever
    (istioctl has no kubeconfig here); the runner's timeout is what ends it. Hence `-r default` everywhere."""
    rc, out, err = istioctl.run("x", "ps", *mesh.istioctl_xds_args(mesh.replicas[0]), timeout_s=5)
    assert rc == TIMEOUT_RC, (rc, out, err)
