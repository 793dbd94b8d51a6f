"""Red team stop 22 against real pilot-discovery replicas and real istioctl: the syncz merge's memo (SynczMemo:
node facts, copy facts), shared by every caller of one proxy.

Scoped istioctl callers of two namespaces (identity mode, each with its own SPIFFE certificate) alternate through
one proxy while the mesh changes between calls: proxies connect and leave, one proxy is on two replicas at once
(the split path's duplicates), and a proxy reconnects to another replica. Each caller must see exactly its own
namespace's connected proxies, each once. And the fact that removed the memo's remembered runs (finding R1): real
istiod lists syncz in another order, its nodes' metadata in another key order, from call to call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from istioctl_proxy.app import Proxy
from istioctl_proxy.config import Config

from ..waits import until
from .ads import CDS, LDS, AdsClient, XdsState, close_clients, start_clients
from .mesh import Mesh, parse_table

pytestmark = pytest.mark.e2e

NAMESPACES = ("team-a", "team-b")


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.fixture
async def proxy(mesh: Mesh, tmp_path: Path) -> AsyncIterator[Proxy]:
    """The proxy in this process (so the test sees its memo), identity mode, mTLS both ways."""
    serving = mesh.ca.issue_serving()
    upstream = mesh.ca.issue_spiffe("istio-system", "istioctl-proxy")
    root = _write(tmp_path / "root.pem", mesh.root_cert_pem)
    cfg = dataclasses.replace(
        Config(), listen="127.0.0.1:0", admin_listen="", drain_seconds=1.0,
        tls_cert=_write(tmp_path / "tls.crt", serving.cert_pem), tls_key=_write(tmp_path / "tls.key", serving.key_pem),
        client_ca=root, istiod=tuple(r.secure_address for r in mesh.replicas), istiod_ca=root,
        upstream_identity=True, upstream_cert=_write(tmp_path / "up.crt", upstream.cert_pem),
        upstream_key=_write(tmp_path / "up.key", upstream.key_pem), upstream_timeout=5.0,
        coalesce=False,  # every call its own fan-out and merge: each meets the memo
    )  # fmt: skip
    p = Proxy(cfg)
    await p.start()
    try:
        yield p
    finally:
        await p.stop(0)


async def _shown(mesh: Mesh, proxy: Proxy, namespace: str) -> list[str]:
    got = await mesh.istioctl.arun(
        "x",
        "ps",
        "--xds-address",
        f"127.0.0.1:{proxy.port}",
        "--cert-dir",
        str(mesh.cert_dir(namespace, "default")),
        "-r",
        "default",
    )
    assert got.rc == 0, got.stderr
    return sorted(row["NAME"] for row in parse_table(got.stdout))


async def test_scoped_istioctl_callers_of_two_namespaces_alternate_through_one_memo_as_the_mesh_changes(
    mesh: Mesh, proxy: Proxy
) -> None:
    states = {CDS: XdsState.SYNCED, LDS: XdsState.SYNCED}
    replicas = mesh.replicas
    connected: list[AdsClient] = []

    async def connect(replica: int, pod: str, namespace: str) -> AdsClient:
        c = mesh.ads_client(replicas[replica % len(replicas)], pod, namespace, states)
        await start_clients([c])
        connected.append(c)
        return c

    async def leave(c: AdsClient) -> None:
        connected.remove(c)
        await close_clients([c])

    async def settled() -> None:
        want = {c.proxy_id for c in connected}
        await until(
            lambda: want <= mesh.listed() and not ({f"{p}.{ns}" for p, ns in gone} & mesh.listed()),
            lambda: f"the replicas list {sorted(want)} and not {sorted(gone)}",
        )

    gone: set[tuple[str, str]] = set()
    try:
        for i in range(8):
            await connect(i, f"runs-{i}", NAMESPACES[i % 2])
        # One proxy on two replicas at once (a reconnect in flight): listed once, by its newest copy.
        await connect(0, "twice", "team-a")
        await connect(1, "twice", "team-a")
        for step in range(8):
            await settled()
            expected = {ns: sorted({c.proxy_id for c in connected if c.namespace == ns}) for ns in NAMESPACES}
            for ns in (NAMESPACES if step % 2 == 0 else NAMESPACES[::-1]) * 2:  # twice each: the memo is warm
                assert await _shown(mesh, proxy, ns) == expected[ns], (step, ns)
            # Between calls the mesh changes: one leaves, one arrives in the other namespace, one moves replica.
            if step % 3 == 0:
                c = next(c for c in connected if c.pod.startswith("runs-"))
                gone.add((c.pod, c.namespace))
                await leave(c)
            if step % 3 == 1:
                await connect(step + 1, f"new-{step}", NAMESPACES[step % 2])
                gone.discard((f"new-{step}", NAMESPACES[step % 2]))
            if step % 3 == 2:
                c = next(c for c in connected if c.pod.startswith("new-"))
                await leave(c)
                await connect(step + 2, c.pod, c.namespace)
    finally:
        await close_clients(connected)


async def test_real_istiod_lists_syncz_in_another_order_from_call_to_call(mesh: Mesh, proxy: Proxy) -> None:
    """Finding R1, kept as a fact of the real peer: over a mesh where nothing changes, pilot-discovery lists its
    syncz proxies in Go map order (DiscoveryServer.Clients ranges over adsClients) and writes each node's metadata
    Struct in another key order from call to call. So nothing may be keyed by a whole answer's node order (the
    remembered runs were, and never matched a real istiod), and the facts memo meets a few byte forms per node."""
    states = {CDS: XdsState.SYNCED, LDS: XdsState.SYNCED}
    clients = [
        mesh.ads_client(mesh.replicas[i % len(mesh.replicas)], f"still-{i}", NAMESPACES[i % 2], states)
        for i in range(9)
    ]
    await start_clients(clients)
    try:
        want = {c.proxy_id for c in clients}
        await until(
            lambda: want <= mesh.listed(),
            "the replicas list every client",
        )
        memo = proxy.service.aggregator.syncz_memo
        seen: list[tuple[bytes, ...]] = []
        facts = memo.facts

        def recorded(nodes: Sequence[bytes]) -> list[tuple[str, str]] | None:
            seen.append(tuple(nodes))
            return facts(nodes)

        memo.facts = recorded  # type: ignore[method-assign]
        for _ in range(6):  # the same namespace, nothing changes between the calls
            assert await _shown(mesh, proxy, "team-a") == sorted(c.proxy_id for c in clients if c.namespace == "team-a")
        assert len(seen) >= 6  # istioctl may ask more than once per run
        # Six calls, one order and byte form each (3 proxies per replica in Go map order, each node's 3 metadata
        # keys in map order): all equal would be a chance of less than 1e-6.
        assert len(set(seen)) > 1, "six calls over an unchanged mesh listed the same node bytes in the same order"
    finally:
        await close_clients(clients)
