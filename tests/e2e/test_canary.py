"""Canary upgrades: real pilot-discovery replicas of two revisions behind one proxy.

Replica 0 is the default revision (serving certificate with `istiod.istio-system.svc`), replica 1 runs with
REVISION=1-31 (its certificate adds `istiod-1-31.istio-system.svc`). Real istioctl asks the proxy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from lightkube import AsyncClient

from istioctl_proxy.app import Proxy
from istioctl_proxy.config import Config, validate
from istioctl_proxy.kubernetes import load_kube_target
from istioctl_proxy.sim.pki import TestCA
from istioctl_proxy.tls import diagnose_upstream

from ..k8s.objects import create_istiod_pod, ensure_namespace, force_delete_pod
from ..waits import until
from .ads import CDS, LDS, AdsClient, XdsState, close_clients, start_clients
from .jwt_issuer import JwtIssuer
from .mesh import ISTIO_NAMESPACE, IstiodReplica, Mesh, Peers, http_get, parse_table

pytestmark = pytest.mark.e2e

REV = "1-31"
SYNCED = {CDS: XdsState.SYNCED, LDS: XdsState.SYNCED}


@pytest.fixture(scope="module")
def canary_mesh(
    peers: Peers, test_ca: TestCA, jwt_issuer: JwtIssuer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mesh]:
    # Own loopback addresses (127.0.0.40-41): the session mesh keeps 127.0.0.2-4 with the same ports.
    m = Mesh(tmp_path_factory.mktemp("canary-mesh"), peers, replicas=2, first_host=40, ca=test_ca,
             jwt_issuer=jwt_issuer, revisions=("", REV))  # fmt: skip
    with m:
        yield m


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def identity_config(mesh: Mesh, d: Path, **kw: Any) -> Config:
    """Identity mode with the status page: the proxy's own view is what the assertions read."""
    d.mkdir(parents=True, exist_ok=True)
    serving = mesh.ca.issue_serving()
    upstream = mesh.ca.issue_spiffe(ISTIO_NAMESPACE, "istioctl-proxy")
    root = _write(d / "root.pem", mesh.root_cert_pem)
    cfg = Config(
        listen="127.0.0.1:0", tls_cert=_write(d / "tls.crt", serving.cert_pem),
        tls_key=_write(d / "tls.key", serving.key_pem), client_ca=root, istiod_ca=root,
        upstream_identity=True, upstream_cert=_write(d / "up.crt", upstream.cert_pem),
        upstream_key=_write(d / "up.key", upstream.key_pem), upstream_timeout=5.0,
        admin_listen="127.0.0.1:0", admin_status_page=True, drain_seconds=1.0, **kw,
    )  # fmt: skip
    validate(cfg)  # what `serve` checks before it starts
    return cfg


@pytest.fixture
async def proxies() -> AsyncIterator[list[Proxy]]:
    started: list[Proxy] = []
    yield started
    for proxy in started:
        await proxy.stop(0)


async def start(proxies: list[Proxy], cfg: Config) -> Proxy:
    proxy = Proxy(cfg)
    await proxy.start()
    proxies.append(proxy)
    return proxy


async def start_two_revisions(proxies: list[Proxy], mesh: Mesh, d: Path, default: IstiodReplica,
                              canary: IstiodReplica) -> Proxy:
    """A ready proxy listing `default` as the default revision and `canary` as REV, with the revision column."""
    proxy = await start(proxies, identity_config(
        mesh, d, revision=f"default,{REV}", istiod_column="revision",
        istiod=(f"{default.secure_address}@default", f"{canary.secure_address}@{REV}"),
    ))  # fmt: skip
    await ready(proxy)
    return proxy


async def admin(proxy: Proxy, path: str) -> tuple[int, str]:
    # In a thread: the proxy's admin server runs on this very event loop.
    status, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{proxy.admin_port}{path}")
    return status, body.decode()


async def status_page(proxy: Proxy) -> dict[str, Any]:
    status, body = await admin(proxy, "/api/status")
    assert status == 200, body
    data: dict[str, Any] = json.loads(body)
    return data


async def metric(proxy: Proxy, name: str, **labels: str) -> float | None:
    _, text = await admin(proxy, "/metrics")
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if m and m[1] == name and ",".join(sorted((m[2] or "").split(","))) == want:
            return float(m[3])
    return None


async def ps(mesh: Mesh, proxy: Proxy, *args: str, cert_dir: Path | None = None) -> list[dict[str, str]]:
    rc, out, err = await mesh.istioctl.arun("x", "ps", "--xds-address", f"127.0.0.1:{proxy.port}", "--cert-dir",
                                            str(cert_dir or mesh.admin_cert_dir), "-r", "default", *args,
                                            timeout_s=60)
    assert rc == 0, f"istioctl x ps failed ({rc}):\n{err}\n{out}"
    return parse_table(out)


def holds(replica: IstiodReplica, proxy_id: str) -> bool:
    return proxy_id in replica.proxy_states()


async def ready(proxy: Proxy) -> None:
    await until(lambda: proxy.admin.readiness.ready, "proxy ready")


# -------------------------------------------------------------------------------------------------------------


def test_each_revisions_certificate_names_its_own_revision(canary_mesh: Mesh) -> None:
    """What pilot-discovery itself does with REVISION (server.go getDNSNames), which the SAN rule rests on."""
    default, canary = canary_mesh.replicas
    root = canary_mesh.root_cert_pem
    # The default revision's certificate does not carry the canary's name: refused as a 1-31 replica.
    refusal = diagnose_upstream(default.secure_address, root, f"istiod-{REV}.{ISTIO_NAMESPACE}.svc")
    assert refusal is not None and refusal.reason == "san", refusal
    assert f"istiod.{ISTIO_NAMESPACE}.svc" in refusal.detail
    assert diagnose_upstream(default.secure_address, root, f"istiod.{ISTIO_NAMESPACE}.svc") is None
    assert diagnose_upstream(canary.secure_address, root, f"istiod-{REV}.{ISTIO_NAMESPACE}.svc") is None
    # istiod keeps istiod.<ns>.svc on a revisioned certificate too: a name check cannot tell a canary from
    # the default revision in that direction (docs/security.md says so).
    assert diagnose_upstream(canary.secure_address, root, f"istiod.{ISTIO_NAMESPACE}.svc") is None


async def test_two_revisions_one_view_and_a_proxy_moving_over(
    canary_mesh: Mesh, proxies: list[Proxy], tmp_path: Path
) -> None:
    default, canary = canary_mesh.replicas
    on_default = [canary_mesh.ads_client(default, f"old-{i}", ("team-a", "team-b")[i], SYNCED) for i in range(2)]
    on_canary = [canary_mesh.ads_client(canary, f"new-{i}", ("team-a", "team-b")[i], SYNCED) for i in range(2)]
    await start_clients(on_default + on_canary)
    moved: AdsClient | None = None
    try:
        proxy = await start_two_revisions(proxies, canary_mesh, tmp_path, default, canary)
        assert {(r.revision, r.san) for r in proxy.replicas.current()} == {
            ("default", f"istiod.{ISTIO_NAMESPACE}.svc"), (REV, f"istiod-{REV}.{ISTIO_NAMESPACE}.svc")}

        rows = await ps(canary_mesh, proxy)
        names = [r["NAME"] for r in rows]
        expected = {c.proxy_id for c in on_default + on_canary}
        assert expected <= set(names) and len(names) == len(set(names)), names
        # One ISTIOD value per response (istioctl's table): the revisions that hold the listed proxies.
        assert {r["ISTIOD"] for r in rows} == {f"<external>/{REV},default"}
        # A caller's rights do not depend on the revision: team-a sees its proxies on both, and only those.
        team_a = await ps(canary_mesh, proxy, "-i", "team-a", cert_dir=canary_mesh.cert_dir("team-a"))
        assert sorted(r["NAME"] for r in team_a) == ["new-0.team-a", "old-0.team-a"], team_a

        # The workload of old-0 restarts onto the canary: same proxy id, now held by 1-31.
        mover = on_default.pop(0)
        await mover.close()
        moved = canary_mesh.ads_client(canary, mover.pod, mover.namespace, SYNCED)
        await moved.start()
        await until(lambda: not holds(default, mover.proxy_id) and holds(canary, mover.proxy_id),
                    "the move in istiod's own syncz")
        names = [r["NAME"] for r in await ps(canary_mesh, proxy)]
        assert names.count(mover.proxy_id) == 1, names
        page = await status_page(proxy)
        row = next(p for p in page["proxies"] if p["id"] == mover.proxy_id)
        assert row["istiod"] == canary.pod_name, row  # on the canary, not on the default revision
        revisions = {r["address"]: r["revision"] for r in page["replicas"]}
        assert revisions == {default.secure_address: "default", canary.secure_address: REV}
        assert {r["revision"]: (r["known"], r["reachable"]) for r in page["revisions"]} == {
            "default": (1, 1), REV: (1, 1)}

        # Readiness, /readyz and metrics per revision.
        status, text = await admin(proxy, "/readyz")
        assert status == 200 and f"revision {REV}: 1 of 1" in text and "revision default: 1 of 1" in text, text
        for rev in ("default", REV):
            assert await metric(proxy, "istioctl_proxy_revision_replicas_healthy", revision=rev) == 1.0

        # x version: the control plane version(s) present (one binary here: one version).
        rc, out, err = await canary_mesh.istioctl.arun(
            "x", "version", "--xds-address", f"127.0.0.1:{proxy.port}", "--cert-dir", str(canary_mesh.admin_cert_dir))
        assert rc == 0, err
        assert f"control plane version: {canary_mesh.peers.istio_version}" in out, out
    finally:
        await close_clients(on_default + on_canary + ([moved] if moved else []))


async def test_a_replica_presenting_another_revisions_certificate_is_refused(
    canary_mesh: Mesh, proxies: list[Proxy], tmp_path: Path
) -> None:
    default, canary = canary_mesh.replicas
    # The default istiod listed as a 1-31 replica (a wrong entry, or someone else's pod at that address).
    proxy = await start(proxies, identity_config(
        canary_mesh, tmp_path, revision=f"default,{REV}",
        istiod=(f"{default.secure_address}@{REV}", f"{canary.secure_address}@{REV}"),
    ))  # fmt: skip
    await until(lambda: any("TLS refused" in p.why for p in proxy.admin.readiness.probes.values()),
                "the refusal at a readiness probe")
    probe = proxy.admin.readiness.probes[default.secure_address]
    assert not probe.up and f"not istiod-{REV}.{ISTIO_NAMESPACE}.svc" in probe.why, probe
    assert proxy.admin.readiness.probes[canary.secure_address].up
    # Listed revision "default" has no replica: not ready under the default policy, and /readyz says why.
    status, text = await admin(proxy, "/readyz")
    assert status == 503 and "no reachable replica of revision default" in text, text
    assert (await metric(proxy, "istioctl_proxy_upstream_tls_refused_total", revision=REV, reason="san") or 0) >= 1
    # The status page shows the refusal on that replica's row.
    row = next(r for r in (await status_page(proxy))["replicas"] if r["address"] == default.secure_address)
    assert row["health"] in ("ERROR", "UNREACHABLE") and row["error"], row
    # Calls never reach the impostor: its proxies are not in the answer, the partial answer says why.
    client = canary_mesh.ads_client(default, "only-on-default", "team-a", SYNCED)
    await client.start()
    try:
        rows = await ps(canary_mesh, proxy)
        assert "only-on-default.team-a" not in {r["NAME"] for r in rows}
    finally:
        await client.close()


async def test_kubernetes_follows_every_revision_and_the_old_one_leaves_cleanly(
    canary_mesh: Mesh, proxies: list[Proxy], tmp_path: Path
) -> None:
    """Pods with app=istiod and istio.io/rev in the mesh's own kube-apiserver point at the two replicas;
    the proxy follows every revision. Then the old revision's pod is deleted and its istiod stops."""
    default, canary = canary_mesh.replicas
    assert canary_mesh.kube is not None
    kubeconfig = canary_mesh.kube.apiserver.admin_kubeconfig()
    kube: AsyncClient = load_kube_target(kubeconfig).client()
    await ensure_namespace(kube, ISTIO_NAMESPACE)  # its `default` ServiceAccount: no controller manager here
    await create_istiod_pod(kube, ISTIO_NAMESPACE, "istiod-5c7", default.host, revision="default")
    await create_istiod_pod(kube, ISTIO_NAMESPACE, f"istiod-{REV}-8d2", canary.host, revision=REV)
    on_default = canary_mesh.ads_client(default, "web-0", "team-a", SYNCED)
    on_canary = canary_mesh.ads_client(canary, "web-1", "team-a", SYNCED)
    await start_clients([on_default, on_canary])
    k8s = {"istiod_k8s": True, "kubeconfig": str(kubeconfig), "istio_namespace": ISTIO_NAMESPACE,
           "istiod_port": canary_mesh.ports.secure_grpc, "istiod_allow_loopback": True}
    try:
        follow = await start(proxies, identity_config(canary_mesh, tmp_path / "follow", all_revisions=True,
                                                      istiod_column="revision", **k8s))
        listed = await start(proxies, identity_config(canary_mesh, tmp_path / "listed", revision=f"default,{REV}",
                                                      **k8s))
        anyone = await start(proxies, identity_config(canary_mesh, tmp_path / "any", revision=f"default,{REV}",
                                                      ready_policy="any-replica", **k8s))
        for proxy in (follow, listed, anyone):
            await ready(proxy)
        assert {(r.name, r.revision, r.san) for r in follow.replicas.current()} == {
            ("istiod-5c7", "default", f"istiod.{ISTIO_NAMESPACE}.svc"),
            (f"istiod-{REV}-8d2", REV, f"istiod-{REV}.{ISTIO_NAMESPACE}.svc")}
        assert {r.source for r in listed.replicas.current()} == {
            f"k8s:{canary_mesh.kube.apiserver.tag}-admin/{ISTIO_NAMESPACE}/default",
            f"k8s:{canary_mesh.kube.apiserver.tag}-admin/{ISTIO_NAMESPACE}/{REV}"}
        rows = await ps(canary_mesh, follow)
        assert {"web-0.team-a", "web-1.team-a"} <= {r["NAME"] for r in rows}

        # The upgrade is done: the old revision's Deployment is deleted, its istiod exits.
        await force_delete_pod(kube, ISTIO_NAMESPACE, "istiod-5c7")
        await on_default.close()
        default.stop()
        for proxy in (follow, listed, anyone):
            await until(lambda p=proxy: [r.revision for r in p.replicas.current()] == [REV],
                        "the old revision gone from discovery")
        rows = await ps(canary_mesh, follow)
        assert "web-0.team-a" not in {r["NAME"] for r in rows} and "web-1.team-a" in {r["NAME"] for r in rows}
        assert {r["ISTIOD"] for r in rows} == {f"<external>/{REV}"}
        # Following every revision: ready, and the old revision's series and rows are gone.
        await until(lambda: follow.admin.readiness.by_revision == {REV: (1, 1)}, "a probe after the change")
        assert follow.admin.readiness.ready
        assert await metric(follow, "istioctl_proxy_revision_replicas_known", revision="default") is None
        assert [r["revision"] for r in (await status_page(follow))["replicas"]] == [REV]
        # A listed revision with no replica: not ready (drop it from --revision), unless any-replica.
        await until(lambda: listed.admin.readiness.by_revision.get("default") == (0, 0), "a probe after the change")
        assert not listed.admin.readiness.ready
        assert "no reachable replica of revision default" in listed.admin.readiness.reason
        await until(lambda: anyone.admin.readiness.by_revision.get("default") == (0, 0), "a probe after the change")
        assert anyone.admin.readiness.ready
    finally:
        await close_clients([on_default, on_canary])
        await kube.close()
        if not default.is_running():
            await asyncio.to_thread(default.start)


# -- two Istio versions (the version-skew builds of `scripts/install-peers matrix`) ----------------------------
OLD_VERSION = "1.26.0"


@pytest.fixture(scope="module")
def two_version_mesh(
    peers: Peers, test_ca: TestCA, jwt_issuer: JwtIssuer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mesh]:
    """The old release as the default revision (127.0.0.44), the pinned build as the 1-31 canary (.45)."""
    old = peers.pilot_discovery.parents[1] / "istio" / OLD_VERSION / "bin" / "pilot-discovery"
    if not old.is_file():
        pytest.fail(f"Istio {OLD_VERSION} of the version-skew matrix is missing ({old}): install it with "
                    "`scripts/install-peers matrix`; CI must run it before the e2e tests.", pytrace=False)
    m = Mesh(tmp_path_factory.mktemp("two-version-mesh"), peers, replicas=2, first_host=44, ca=test_ca,
             jwt_issuer=jwt_issuer, revisions=("", REV))  # fmt: skip
    m.replicas[0].peers = dataclasses.replace(peers, pilot_discovery=old)
    with m:
        yield m


async def test_two_versions_x_version_lists_each_and_every_proxy_once(
    two_version_mesh: Mesh, proxies: list[Proxy], tmp_path: Path
) -> None:
    mesh = two_version_mesh
    old, new = mesh.replicas
    clients = [mesh.ads_client(old, "legacy-0", "team-a", SYNCED), mesh.ads_client(new, "fresh-0", "team-a", SYNCED)]
    await start_clients(clients)
    try:
        proxy = await start_two_revisions(proxies, mesh, tmp_path, old, new)
        rows = await ps(mesh, proxy)
        names = [r["NAME"] for r in rows]
        assert {"legacy-0.team-a", "fresh-0.team-a"} <= set(names) and len(names) == len(set(names)), names
        rc, out, err = await mesh.istioctl.arun(
            "x", "version", "--xds-address", f"127.0.0.1:{proxy.port}", "--cert-dir", str(mesh.admin_cert_dir))
        assert rc == 0, err
        assert f"control plane version: {OLD_VERSION}, {mesh.peers.istio_version}" in out, out
    finally:
        await close_clients(clients)
