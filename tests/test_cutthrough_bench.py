"""The cut-through prototype of bench/cutthrough.py (issue 14, item 4): its answers are the proxy's answers.

The prototype is measured, not shipped; these tests are what make its figures mean something: the streaming
envelope reader agrees with upb at every chunk boundary, the padding is invisible to protobuf parsers (upb
here, Go's in real istioctl), the forwarded answer holds the same resources and control plane as the real
proxy's, and a failing replica gives the caller a precise status, never a wrong answer or a hang.
"""

from __future__ import annotations

import collections
import random
import re
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from bench import cutthrough
from bench.cutthrough import TRAILER, CutThrough, Envelope, Malformed, compare, filler, padded
from envoy.service.discovery.v3 import discovery_pb2

from istioctl_proxy import client, merge, wire
from istioctl_proxy.policy import CONFIG_DUMP, SYNCZ
from istioctl_proxy.sim.simulate import SimulatedMesh
from istioctl_proxy.sim.simulator import make_mesh

from .e2e.mesh import Istioctl, Peers
from .helpers import ADMIN_TOKEN, TOKENS, stack

ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
REQUEST = discovery_pb2.DiscoveryRequest(type_url=SYNCZ, node=client.istioctl_node("istio-system"))


async def ask(address: str, token: str = ADMIN_TOKEN, request: discovery_pb2.DiscoveryRequest = REQUEST) -> bytes:
    """One request on a new stream; the first answer's raw bytes."""
    options = [("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(address, options=options) as ch:
        call = ch.stream_stream(ADS, request_serializer=None, response_deserializer=None)(
            metadata=(("authorization", f"Bearer {token}"),) if token else (), timeout=60)
        try:
            await call.write(request.SerializeToString())
            body = await call.read()
        finally:
            call.cancel()
    assert isinstance(body, bytes), body
    return body


def syncz_body(proxies: int = 40) -> bytes:
    return make_mesh(1, proxies)[0].syncz("")


def fed(chunks: list[bytes]) -> Envelope:
    env = Envelope()
    for chunk in chunks:
        env.feed(memoryview(chunk))
    return env


def assert_reads(env: Envelope, body: bytes) -> None:
    msg = discovery_pb2.DiscoveryResponse.FromString(body)
    assert env.complete()
    assert env.resources == len(msg.resources)
    assert (env.text(1), env.text(4), env.text(5)) == (msg.version_info, msg.type_url, msg.nonce)
    assert env.identifier() == msg.control_plane.identifier


def test_envelope_reads_the_answer_cut_anywhere() -> None:
    body = syncz_body()
    assert_reads(fed([body]), body)
    for cut in range(len(body) + 1):  # every chunk boundary, including inside tags and lengths
        assert_reads(fed([body[:cut], body[cut:]]), body)
    rng = random.Random(14)
    for _ in range(200):
        cuts = sorted(rng.sample(range(len(body)), 6))
        assert_reads(fed([body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]), body)


def test_envelope_reads_large_resources_and_every_field_order() -> None:
    big = discovery_pb2.DiscoveryResponse.FromString(syncz_body(3))
    big.resources[1].value += b"\0" * (3 << 20)  # a 3 MiB resource: a 4-byte length, past the inline reader
    body = big.SerializeToString()
    reordered = b"".join(  # envelope fields after, between and before resources
        [discovery_pb2.DiscoveryResponse(resources=big.resources[:1]).SerializeToString(),
         discovery_pb2.DiscoveryResponse(version_info="v9", control_plane=big.control_plane).SerializeToString(),
         discovery_pb2.DiscoveryResponse(resources=big.resources[1:], type_url=SYNCZ, nonce="n").SerializeToString()])
    for raw in (body, reordered):
        assert_reads(fed([raw[i : i + 65536] for i in range(0, len(raw), 65536)]), raw)


def test_envelope_reads_resources_of_every_length_prefix_width() -> None:
    from google.protobuf import any_pb2

    rng = random.Random(3)
    sizes = [*range(0, 300), *rng.sample(range(300, 20000), 60), 16381, 16382, 16383, 16384]
    rng.shuffle(sizes)  # 1-, 2- and 3-byte length prefixes, and the edges between them
    msg = discovery_pb2.DiscoveryResponse(version_info="v", type_url=SYNCZ, nonce="n", resources=[
        any_pb2.Any(type_url="t", value=b"\x01" * n) for n in sizes])
    msg.control_plane.identifier = "{}"
    body = msg.SerializeToString()
    assert_reads(fed([body]), body)
    for _ in range(50):
        cuts = sorted(rng.sample(range(len(body)), 20))
        assert_reads(fed([body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]), body)


def test_envelope_tells_a_cut_or_broken_answer() -> None:
    body = syncz_body()
    rng = random.Random(7)
    for cut in rng.sample(range(1, len(body)), 100):
        env = fed([body[:cut]])
        # A prefix ends at a field boundary only where a field ends; everywhere else the reader knows it is cut.
        boundary = cut == len(body) or _parses(body[:cut])
        assert env.complete() == boundary, cut
    with pytest.raises(Malformed, match="wire type"):
        fed([b"\x0b" + body])  # a group start at the top level
    with pytest.raises(Malformed, match="not length-delimited"):
        fed([b"\x08\x01" + body])  # version_info as a varint


def _parses(raw: bytes) -> bool:
    try:
        discovery_pb2.DiscoveryResponse.FromString(raw)
    except Exception:
        return False
    return True


def test_padding_is_invisible_to_protobuf() -> None:
    envelope = wire.envelope(type_url=SYNCZ, version_info="v1", nonce="v1x", control_plane_identifier="{}")
    for size in range(6, 3000):
        pad = filler(size)
        assert len(pad) == size
        msg = discovery_pb2.DiscoveryResponse.FromString(envelope + pad)
        assert (msg.version_info, msg.nonce, msg.control_plane.identifier, len(msg.resources)) == ("v1", "v1x", "{}", 0)
    with pytest.raises(ValueError, match="smallest"):
        filler(5)
    trailer = padded(envelope)
    assert len(trailer) == TRAILER and trailer.startswith(envelope)
    with pytest.raises(ValueError, match="does not fit"):
        padded(b"x" * (TRAILER - 5))


async def start(addresses: list[str], **options: object) -> CutThrough:
    ct = CutThrough(addresses, **options)  # type: ignore[arg-type]
    await ct.start()
    return ct


@pytest.mark.parametrize("check", ["stream", "end"])
async def test_answer_is_the_proxys(check: str) -> None:
    async with stack(replicas=3, proxies=90) as s:
        ct = await start(s.mesh.addresses, check=check)
        try:
            proxy_body = await ask(s.address)
            cut_body = await ask(f"127.0.0.1:{ct.port}")
            result = compare(proxy_body, cut_body, 90)
            assert result["equal"], result["problems"]
            msg = discovery_pb2.DiscoveryResponse.FromString(cut_body)
            assert msg.control_plane.identifier == merge.external_identifier(
                [r.identifier() for r in s.replicas], "<external>")
            # istiod's version and nonce forms (the trailer's own, as the proxy writes them).
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ/\d+", msg.version_info), msg.version_info
            assert msg.nonce.startswith(msg.version_info) and len(msg.nonce) == len(msg.version_info) + 36
            # Its length: the replicas' messages and the trailer, nothing else.
            sizes = [len(r.syncz("")) for r in s.replicas]  # the same bytes but for the envelope's counters
            assert abs(len(cut_body) - (sum(sizes) + TRAILER)) <= 3 * 8
        finally:
            await ct.close()


async def test_unsupported_requests_and_replica_errors_reach_the_caller() -> None:
    async with stack(replicas=2, proxies=10) as s:
        ct = await start(s.mesh.addresses)
        address = f"127.0.0.1:{ct.port}"
        try:
            scoped = discovery_pb2.DiscoveryRequest(type_url=CONFIG_DUMP, resource_names=["a.b"], node=REQUEST.node)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ask(address, request=scoped)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "only an unscoped istio.io/debug/syncz" in (err.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ask(address, token="not-a-token")  # forwarded as is: the replicas refuse it
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "replica" in (err.value.details() or "") and "invalid token" in (err.value.details() or "")
        finally:
            await ct.close()


async def test_a_broken_answer_is_never_forwarded_as_whole() -> None:
    async with stack(replicas=2, proxies=10) as s:
        ct = await start(s.mesh.addresses)
        try:
            # The last replica's answer claims one more resource than it holds: the prefix sum is right, the
            # framing is not. By then replica 0's bytes are out, so the stream can only be reset.
            s.replicas[1].faults.garbage = lambda _t, body: body + b"\x12\x7f"
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ask(f"127.0.0.1:{ct.port}")
            assert err.value.code() == grpc.StatusCode.INTERNAL
            s.replicas[1].faults.garbage = None
            assert compare(await ask(s.address), await ask(f"127.0.0.1:{ct.port}"), 10)["equal"]
        finally:
            await ct.close()


async def test_a_hung_replica_ends_in_a_deadline_not_a_hang() -> None:
    async with stack(replicas=2, proxies=10) as s:
        ct = await start(s.mesh.addresses, timeout=1.0)
        try:
            s.replicas[1].faults.hang = True
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ask(f"127.0.0.1:{ct.port}")
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "no complete answer from every replica" in (err.value.details() or "")
        finally:
            s.replicas[1].faults.hang = False
            await ct.close()


# -- real istioctl (Go protobuf) ------------------------------------------------------------------------------


def istioctl() -> Istioctl:
    return Istioctl(Peers.find().istioctl, Path(tempfile.mkdtemp(prefix="cutthrough-home-")))


def rows(stdout: str) -> list[list[str]]:
    return [line.split() for line in stdout.splitlines()[1:] if line.strip()]


@pytest.mark.e2e
async def test_real_istioctl_reads_the_forwarded_answer() -> None:
    mesh = SimulatedMesh(make_mesh(3, 30, tokens=TOKENS))
    await mesh.start()
    # istioctl --plaintext sends no token: the prototype uses its own for the replicas.
    ct = await start(mesh.addresses, upstream_token=ADMIN_TOKEN)
    try:
        out = await istioctl().arun("x", "ps", "--xds-address", f"127.0.0.1:{ct.port}", "--plaintext", "-r", "default")
        assert out.rc == 0, out.stderr
        table = rows(out.stdout)
        assert sorted(r[0] for r in table) == sorted(p.id for r in mesh.replicas for p in r.proxies)
        assert all(r[2] == "<external>" for r in table)  # our control_plane, concatenated last, overrides theirs
    finally:
        await ct.close()
        await mesh.stop()


async def _fixed_answer_server(body: bytes) -> tuple[grpc.aio.Server, int]:
    async def handler(requests: AsyncIterator[bytes], _context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for _ in requests:
            yield body

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "envoy.service.discovery.v3.AggregatedDiscoveryService",
        {"StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(handler)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


@pytest.mark.e2e
async def test_real_istioctl_skips_a_duplicate_padded_out_in_place() -> None:
    """What dedup would need in a cut-through forwarder: a resource already counted in the length is replaced
    by filler of the same length. Go's protobuf keeps it as an unknown field; istioctl lists the proxy once."""
    replicas = make_mesh(2, 6)
    dup = replicas[0].proxies[0]
    replicas[1].proxies.append(dup)
    first, second = (r.syncz("") for r in replicas)
    resource = discovery_pb2.DiscoveryResponse.FromString(second).resources[-1]
    field = discovery_pb2.DiscoveryResponse(resources=[resource]).SerializeToString()
    assert second.count(field) == 1
    blanked = second.replace(field, filler(len(field)))
    trailer = padded(wire.envelope(type_url=SYNCZ, version_info="v", nonce="vn", control_plane_identifier=(
        merge.external_identifier([replicas[0].identifier()], "<external>"))))
    body = first + blanked + trailer
    assert len(body) == len(first) + len(second) + TRAILER  # the length sent before the duplicate was seen
    assert len(discovery_pb2.DiscoveryResponse.FromString(body).resources) == 7 - 1
    server, port = await _fixed_answer_server(body)
    try:
        out = await istioctl().arun("x", "ps", "--xds-address", f"127.0.0.1:{port}", "--plaintext", "-r", "default")
        assert out.rc == 0, out.stderr
        names = collections.Counter(r[0] for r in rows(out.stdout))
        assert names[dup.id] == 1 and sum(names.values()) == 6
    finally:
        await server.stop(0)


def test_module_keeps_h2_logging_cheap() -> None:
    cutthrough.quiet_frame_repr()
    import hyperframe.frame

    frame = hyperframe.frame.DataFrame(1, data=b"\x01" * (1 << 20))
    assert len(repr(frame)) < 200  # not 2 MiB of hex per received frame
