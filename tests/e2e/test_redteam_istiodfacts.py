"""Red team stop 22 end to end: the cold memo's byte reading of istiod-shaped nodes, through the proxy.

Real pilot-discovery replicas (with real proxies in the caller's namespace and a victim's) beside a hostile replica
(a TLS ADS server on loopback whose certificate the proxy verifies) that sends istiod-shaped nodes with hostile
tails: metadata twice (the second map's NAMESPACE wins), nesting at and past upb's depth limit, a Node field that is
not UTF-8. A scoped caller runs real istioctl through the proxy: every row it is shown, istioctl itself files under
the caller's namespace (`-n`), and no proxy of the victim's namespace is among them.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2

from istioctl_proxy import wire
from istioctl_proxy.policy import SYNCZ

from ..test_redteam_istiodfacts import _deep_struct, _limit, _meta
from ..test_redteam_parse import ld
from ..waits import until
from .ads import CDS, LDS, AdsClient, XdsState, close_clients, start_clients
from .mesh import Istioctl, Mesh
from .proxy_process import ProxyProcess

pytestmark = pytest.mark.e2e

SCOPE, VICTIM = "redfacts-a", "redfacts-v"


def _hostile_nodes() -> dict[str, bytes]:
    """Istiod-shaped nodes (the id first, one-byte length) whose tails the split path lets through to the cold memo
    (well-formed fields), each with the namespace istioctl decodes for it (None: istioctl cannot decode it)."""
    limit = _limit(_deep_struct)
    return {
        "h-plain.x": ld(1, b"h-plain.x") + _meta(SCOPE),
        "h-plain2.x": ld(1, b"h-plain2.x") + _meta(SCOPE),  # the same tail: read once, shared
        "h-victim.x": ld(1, b"h-victim.x") + _meta(VICTIM),
        "h-merge.x": ld(1, b"h-merge.x") + _meta(VICTIM) + _meta(SCOPE),  # merged: SCOPE
        "h-merge-rev.x": ld(1, b"h-merge-rev.x") + _meta(SCOPE) + _meta(VICTIM),  # merged: VICTIM
        # The deepest nesting upb decodes: one level too deep in the bulk parse, read alone (SCOPE).
        "h-deep.x": ld(1, b"h-deep.x") + ld(3, _deep_struct(limit, SCOPE)),
        # One level deeper: upb (the proxy's reader) refuses the node, Go (istioctl) decodes it as SCOPE.
        "h-toodeep.x": ld(1, b"h-toodeep.x") + ld(3, _deep_struct(limit + 1, SCOPE)),
        # Node.cluster not UTF-8: no decoder reads this node (istioctl fails on the whole answer).
        "h-cluster.x": ld(1, b"h-cluster.x") + ld(2, b"\xff") + _meta(SCOPE),
        "h-nsbad.x": ld(1, b"h-nsbad.x") + ld(3, ld(1, ld(1, b"NAMESPACE") + ld(2, ld(3, b"\xed\xa0\x80")))),
    }


def _resource(node: bytes) -> bytes:
    return ld(2, ld(1, wire.CLIENT_CONFIG_URL) + ld(2, ld(1, node)))


def _hostile_body() -> bytes:
    envelope = discovery_pb2.DiscoveryResponse(type_url=SYNCZ, version_info="v1").SerializeToString()
    return b"".join(map(_resource, _hostile_nodes().values())) + envelope


@contextlib.asynccontextmanager
async def _ads_server(body: bytes, creds: grpc.ServerCredentials | None) -> AsyncIterator[str]:
    """An ADS server on a free loopback port answering every request with `body` (plaintext without creds)."""

    async def stream(
        requests: AsyncIterator[bytes], _ctx: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        async for _ in requests:
            yield body

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "envoy.service.discovery.v3.AggregatedDiscoveryService",
                {
                    "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                        stream, request_deserializer=bytes, response_serializer=bytes
                    )
                },
            ),
        )
    )
    address = "127.0.0.1:0"
    port = server.add_insecure_port(address) if creds is None else server.add_secure_port(address, creds)
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@pytest.fixture
async def hostile_replica(mesh: Mesh) -> AsyncIterator[str]:
    """A TLS ADS server (istiod's SAN, from the mesh's root) answering every request with the hostile syncz."""
    leaf = mesh.ca.issue_serving(dns=("istiod.istio-system.svc",), ips=("127.0.0.1",))
    async with _ads_server(_hostile_body(), grpc.ssl_server_credentials([(leaf.key_pem, leaf.cert_pem)])) as address:
        yield address


@pytest.fixture
def proxy(mesh: Mesh, hostile_replica: str, tmp_path: Path) -> Iterator[ProxyProcess]:
    def write(name: str, data: bytes) -> str:
        (tmp_path / name).write_bytes(data)
        return str(tmp_path / name)

    serving, upstream = mesh.ca.issue_serving(), mesh.ca.issue_spiffe("istio-system", "istioctl-proxy")
    root = write("root.pem", mesh.root_cert_pem)
    running = ProxyProcess(tmp_path / "proxy", [
        "--tls-cert", write("tls.crt", serving.cert_pem), "--tls-key", write("tls.key", serving.key_pem),
        "--istiod", ",".join([*(r.secure_address for r in mesh.replicas), hostile_replica]), "--istiod-ca", root,
        "--upstream-timeout", "5", "--client-ca", root, "--upstream-identity",
        "--upstream-cert", write("up.crt", upstream.cert_pem), "--upstream-key", write("up.key", upstream.key_pem),
    ]).start()  # fmt: skip
    yield running
    running.stop()


@pytest.fixture
async def real_proxies(mesh: Mesh) -> AsyncIterator[list[AdsClient]]:
    subs = {CDS: XdsState.SYNCED, LDS: XdsState.SYNCED}
    clients = [
        mesh.ads_client(mesh.replicas[0], "mine", SCOPE, subs),
        mesh.ads_client(mesh.replicas[-1], "secret", VICTIM, subs),
    ]
    await start_clients(clients)

    await until(lambda: {c.proxy_id for c in clients} <= mesh.listed(), "the real proxies in syncz")
    yield clients
    await close_clients(clients)


async def _rows(istioctl: Istioctl, proxy: ProxyProcess, cert_dir: Path, *args: str) -> list[str]:
    got = await istioctl.arun(
        "x", "ps", "-r", "default", "--xds-address", proxy.address, "--cert-dir", str(cert_dir), *args
    )
    assert got.rc == 0, got.stderr
    return sorted(line.split()[0] for line in got.stdout.splitlines()[1:] if line.strip())


async def test_a_scoped_caller_through_the_proxy_sees_what_istioctl_files_under_its_namespace(
    mesh: Mesh,
    istioctl: Istioctl,
    proxy: ProxyProcess,
    real_proxies: list[AdsClient],
) -> None:
    nodes = list(_hostile_nodes().values())
    assert wire._istiod_facts(nodes) is not None  # the cold memo's byte path reads these nodes
    cert_dir = mesh.cert_dir(SCOPE)
    shown = await _rows(istioctl, proxy, cert_dir)
    assert shown == await _rows(istioctl, proxy, cert_dir, "-n", SCOPE)
    assert shown == sorted(["mine." + SCOPE, "h-plain.x", "h-plain2.x", "h-merge.x", "h-deep.x"])
    # The victim's namespace sees its own, and the hostile nodes istioctl files there, none of the caller's.
    victim = await _rows(istioctl, proxy, mesh.cert_dir(VICTIM))
    assert victim == await _rows(istioctl, proxy, mesh.cert_dir(VICTIM), "-n", VICTIM)
    assert victim == sorted(["secret." + VICTIM, "h-victim.x", "h-merge-rev.x"])


async def test_a_node_nested_past_upbs_limit_is_in_scope_for_istioctl_but_in_no_namespace_for_the_proxy(
    istioctl: Istioctl,
) -> None:
    """Fail-closed, by design: istioctl (Go, recursion limit 10000) files h-toodeep.x under SCOPE; the proxy's reader
    (upb, 100 levels: 33 nested Structs) does not decode it, so no scoped caller is shown it (the test above)."""
    node = _hostile_nodes()["h-toodeep.x"]
    assert wire.node_namespace(node) == "" and wire._nodes_facts([node]) == [("h-toodeep.x", "")]
    envelope = discovery_pb2.DiscoveryResponse(type_url=SYNCZ, version_info="v1").SerializeToString()
    async with _ads_server(_resource(node) + envelope, None) as address:
        got = await istioctl.arun("x", "ps", "-r", "default", "--xds-address", address, "--plaintext", "-n", SCOPE)
    assert got.rc == 0, got.stderr
    assert [line.split()[0] for line in got.stdout.splitlines()[1:] if line.strip()] == ["h-toodeep.x"]
