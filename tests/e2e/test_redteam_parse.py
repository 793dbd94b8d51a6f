"""Red team stop 21 against real istioctl: hostile node spellings (a map key twice, metadata twice, metadata as a
group, a Value of another kind, two nodes, the id twice, a ten-byte varint) merged for scoped callers, and the
merged answers shown to real istioctl by a tiny ADS server on loopback. What a scoped caller is shown must be
what istioctl itself files under that namespace (`x ps -n`, which filters on the NAMESPACE it decodes).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2

from istioctl_proxy import merge, wire
from istioctl_proxy.discovery import Replica
from istioctl_proxy.model import Answer
from istioctl_proxy.policy import SYNCZ, plan_request

from ..test_redteam_parse import ld, struct_namespace
from .mesh import Istioctl, Peers

pytestmark = pytest.mark.e2e
PLAN = plan_request(SYNCZ, [])


def _resource(node: bytes, after_node: bytes = b"") -> bytes:
    return ld(2, ld(1, wire.CLIENT_CONFIG_URL) + ld(2, ld(1, node) + after_node))


def _ns_value(value: bytes) -> bytes:
    """metadata {NAMESPACE: <Value bytes>}."""
    return ld(3, ld(1, ld(1, b"NAMESPACE") + ld(2, value)))


ENVELOPE = discovery_pb2.DiscoveryResponse(type_url=SYNCZ, version_info="v1").SerializeToString()
# Replica A: one resource per spelling; B: a ClientConfig with two nodes (ns-1 first, ns-2 last), which makes
# its replica malformed for a scoped caller that would be shown it.
REPLICA_A = b"".join([
    _resource(ld(1, b"dupkey.x") + ld(3, struct_namespace("ns-2") + struct_namespace("ns-1"))),
    _resource(ld(1, b"twometa.x") + ld(3, struct_namespace("ns-2")) + ld(3, struct_namespace("ns-1"))),
    _resource(ld(1, b"group.x") + ld(3, struct_namespace("ns-1")) + b"\x1b" + struct_namespace("ns-2") + b"\x1c"),
    _resource(ld(1, b"varint.x") + _ns_value(b"\x18\x05")),  # string_value as a varint: istioctl fails on it
    _resource(ld(1, b"valtwice.x") + _ns_value(ld(3, b"ns-2")) + _ns_value(ld(3, b"ns-1"))),
    _resource(ld(1, b"number.x") + _ns_value(ld(3, b"ns-1") + b"\x11" + b"\0" * 8)),  # the oneof's last: a number
    _resource(ld(1, b"first.x") + ld(1, b"second.x") + ld(3, struct_namespace("ns-1"))),
    _resource(ld(1, b"tenbyte.x") + ld(3, struct_namespace("ns-1")) + b"\xa0\x01" + b"\xff" * 9 + b"\x01"),
    _resource(ld(1, b"other.x") + ld(3, struct_namespace("ns-2"))),
]) + ENVELOPE
REPLICA_B = _resource(ld(1, b"twonodes.x") + ld(3, struct_namespace("ns-1")),
                      after_node=ld(1, ld(3, struct_namespace("ns-2")))) + ENVELOPE


class _Served:
    body = b""


@pytest.fixture
async def hostile_ads() -> AsyncIterator[tuple[str, type[_Served]]]:
    """An ADS server on a free loopback port that answers every request with _Served.body."""
    async def stream(requests: AsyncIterator[bytes], _ctx: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncIterator[
            bytes]:
        async for _ in requests:
            yield _Served.body

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "envoy.service.discovery.v3.AggregatedDiscoveryService",
        {"StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
            stream, request_deserializer=bytes, response_serializer=bytes)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}", _Served
    await server.stop(None)


async def _rows(istioctl: Istioctl, address: str, *args: str) -> list[str]:
    got = await istioctl.arun("x", "ps", "-r", "default", "--xds-address", address, "--plaintext", *args)
    assert got.rc == 0, got.stderr
    return sorted(line.split()[0] for line in got.stdout.splitlines()[1:] if line.strip())


@pytest.mark.parametrize(("scope", "expected"), [
    ("ns-1", ["dupkey.x", "group.x", "second.x", "tenbyte.x", "twometa.x", "valtwice.x"]),
    ("ns-2", ["other.x"]),
])
async def test_a_scoped_caller_is_shown_what_istioctl_files_under_its_namespace(
    scope: str, expected: list[str], hostile_ads: tuple[str, type[_Served]], peers: Peers, tmp_path: Path,
) -> None:
    address, served = hostile_ads
    istioctl = Istioctl(peers.istioctl, tmp_path / "home")
    answers = [Answer(Replica("10.0.0.1:15012"), REPLICA_A), Answer(Replica("10.0.0.2:15012"), REPLICA_B)]
    merged = merge.merge(PLAN, answers, merge.MergeContext(scope=scope, memo=wire.SynczMemo()))
    served.body = merged.body
    shown = await _rows(istioctl, address)
    # Every row istioctl decodes from the scoped answer, it files under the caller's namespace itself; `first.x`
    # is shown by istioctl as `second.x` (protobuf keeps the last id), in ns-1 all the same.
    assert shown == await _rows(istioctl, address, "-n", scope) == expected
    assert [why for _, why in merged.rejected] == (
        ["malformed syncz resource: a repeated Any value or ClientConfig node"] if scope == "ns-1" else [])
    # And on the replicas' own answers istioctl agrees on which are in the namespace (but fails on varint.x and
    # number.x, which the proxy files under no namespace, and reads twonodes.x as ns-2: that replica is rejected).
    served.body = REPLICA_B
    assert await _rows(istioctl, address, "-n", "ns-2") == ["twonodes.x"]
