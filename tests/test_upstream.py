"""upstream.py on its own: one request/response per call over reused channels, errors as UpstreamError,
the token file, retiring channels, and fetching an unverified root."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2

from istioctl_proxy import client, upstream
from istioctl_proxy.discovery import Replica
from istioctl_proxy.policy import SYNCZ
from istioctl_proxy.sim.pki import TestCA
from istioctl_proxy.sim.simulator import SimReplica, build_simulator_server, make_mesh
from istioctl_proxy.tls import TokenFile, UpstreamTLS, fetch_unverified_root
from istioctl_proxy.upstream import UpstreamError, UpstreamPool

from .helpers import ADMIN_TOKEN, TOKENS
from .waits import until

PLAIN = UpstreamTLS(plaintext=True)
MiB = 1024 * 1024


def syncz_request() -> bytes:
    req = discovery_pb2.DiscoveryRequest(type_url=SYNCZ, node=client.istioctl_node("istio-system"))
    return bytes(req.SerializeToString())


BEARER = (("authorization", f"Bearer {ADMIN_TOKEN}"),)


@pytest.fixture
async def replica() -> AsyncIterator[tuple[SimReplica, Replica]]:
    sim = make_mesh(1, 5, tokens=TOKENS)[0]
    server, port = build_simulator_server(sim, "127.0.0.1:0")
    await server.start()
    try:
        yield sim, Replica(f"127.0.0.1:{port}")
    finally:
        await server.stop(0)


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    p = UpstreamPool(PLAIN, max_message_bytes=256 * MiB)
    try:
        yield p
    finally:
        await p.close()


async def test_ask_returns_the_first_answer_and_records_success(
    replica: tuple[SimReplica, Replica], pool: UpstreamPool
) -> None:
    sim, r = replica
    pool.last_error[r.address] = "an old failure"
    body = await pool.ask(r, syncz_request(), BEARER, timeout=30)
    assert len(discovery_pb2.DiscoveryResponse.FromString(body).resources) == 5
    assert sim.requests == 1
    assert r.address in pool.last_ok and r.address not in pool.last_error
    # The channel is kept and reused: a second call makes no new one.
    ch = pool.channel(r.address)
    await pool.ask(r, syncz_request(), BEARER, timeout=30)
    assert pool.channel(r.address) is ch and sim.requests == 2


@pytest.mark.parametrize("code", [grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INTERNAL])
async def test_a_failed_call_is_an_upstream_error_with_the_replicas_status(
    replica: tuple[SimReplica, Replica], pool: UpstreamPool, code: grpc.StatusCode
) -> None:
    sim, r = replica
    sim.faults.fail_code = code
    with pytest.raises(UpstreamError) as err:
        await pool.ask(r, syncz_request(), BEARER, timeout=30)
    assert err.value.code == code and err.value.message == "simulated failure"
    assert pool.last_error[r.address] == f"{code.name}: simulated failure"


async def test_a_hung_replica_ends_in_deadline_exceeded(
    replica: tuple[SimReplica, Replica], pool: UpstreamPool
) -> None:
    sim, r = replica
    sim.faults.hang = True
    with pytest.raises(UpstreamError) as err:
        await pool.ask(r, syncz_request(), BEARER, timeout=0.5)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_nobody_listening_is_unavailable(pool: UpstreamPool) -> None:
    with pytest.raises(UpstreamError) as err:
        await pool.ask(Replica("127.0.0.1:1"), syncz_request(), BEARER, timeout=30)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert pool.last_error["127.0.0.1:1"].startswith("UNAVAILABLE")


async def test_a_stream_closed_without_an_answer_is_unavailable(pool: UpstreamPool) -> None:
    async def close_at_once(requests: AsyncIterator[bytes], _: object) -> AsyncIterator[bytes]:
        async for _req in requests:
            return
        yield b""  # never reached: makes this an async generator

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "envoy.service.discovery.v3.AggregatedDiscoveryService",
        {"StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(close_at_once)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        with pytest.raises(UpstreamError) as err:
            await pool.ask(Replica(f"127.0.0.1:{port}"), syncz_request(), (), timeout=30)
    finally:
        await server.stop(0)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert "closed the stream without answering" in err.value.message


async def test_an_answer_over_the_message_limit_is_resource_exhausted(replica: tuple[SimReplica, Replica]) -> None:
    sim, r = replica
    limit = 1024
    assert len(syncz_request()) < limit < len(sim.syncz(""))  # the request fits, the answer does not
    small = UpstreamPool(PLAIN, max_message_bytes=limit)
    try:
        with pytest.raises(UpstreamError) as err:
            await small.ask(r, syncz_request(), BEARER, timeout=30)
    finally:
        await small.close()
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_the_token_file_is_sent_as_a_bearer_token_and_reread(
    replica: tuple[SimReplica, Replica], tmp_path: Path
) -> None:
    _, r = replica
    path = tmp_path / "token"
    path.write_text("not-a-token\n")
    p = UpstreamPool(PLAIN, max_message_bytes=MiB, token_file=TokenFile(str(path)))
    try:
        with pytest.raises(UpstreamError) as err:
            await p.ask(r, syncz_request(), (), timeout=30)
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        path.write_text(f"{ADMIN_TOKEN}\n")  # rotated (another size: a new stamp even on a coarse clock)
        body = await p.ask(r, syncz_request(), (), timeout=30)
        assert len(discovery_pb2.DiscoveryResponse.FromString(body).resources) == 5
    finally:
        await p.close()


def test_token_file_is_read_once_per_change(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("  first \n")
    token = TokenFile(str(path))
    assert token.read() == "first"
    stat = path.stat()
    path.write_text("  other \n")  # same size, and the old time stamp: not a change by its stamp
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert token.read() == "first"
    path.write_text("second-token")
    assert token.read() == "second-token"


@pytest.fixture
def fast_retire(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(upstream, "_RETIRE_AFTER", 0.0)
    yield


async def test_retain_retires_the_channels_of_dropped_replicas(
    replica: tuple[SimReplica, Replica], pool: UpstreamPool, fast_retire: None
) -> None:
    _, r = replica
    await pool.ask(r, syncz_request(), BEARER, timeout=30)
    old = pool.channel(r.address)
    pool.retain(())
    assert r.address not in pool._channels
    await until(lambda: not pool._retiring, "the retired channel to be closed")
    with pytest.raises(grpc.aio.UsageError):
        await old.channel_ready()
    # Rediscovered later: a fresh channel, and it works.
    assert pool.channel(r.address) is not old
    await pool.ask(r, syncz_request(), BEARER, timeout=30)


async def test_retain_keeps_listed_replicas(replica: tuple[SimReplica, Replica], pool: UpstreamPool) -> None:
    _, r = replica
    ch = pool.channel(r.address)
    pool.channel("127.0.0.1:1")
    pool.retain((r,))
    assert pool._channels == {r.address: ch} and len(pool._retiring) == 1


def test_channel_options_pin_the_san_for_tls_only() -> None:
    tls = UpstreamPool(UpstreamTLS(ca_pem=b"x", san="istiod-canary.istio-system.svc"), max_message_bytes=MiB)
    opts = dict(tls._options())
    assert opts["grpc.ssl_target_name_override"] == opts["grpc.default_authority"] == "istiod-canary.istio-system.svc"
    assert opts["grpc.max_receive_message_length"] == opts["grpc.max_send_message_length"] == MiB
    plain = dict(UpstreamPool(PLAIN, max_message_bytes=MiB)._options())
    assert "grpc.ssl_target_name_override" not in plain and "grpc.default_authority" not in plain


async def test_fetch_unverified_root_returns_what_the_server_presents() -> None:
    ca = TestCA()
    leaf = ca.issue(dns=("istiod.istio-system.svc",))
    sim = make_mesh(1, 1)[0]
    server, port = build_simulator_server(sim, "127.0.0.1:0", tls=(leaf.cert_pem, leaf.key_pem, None))
    await server.start()
    try:
        pem = await asyncio.to_thread(fetch_unverified_root, f"127.0.0.1:{port}", 30)
    finally:
        await server.stop(0)
    # The server sends its leaf only: the top of that chain is the leaf itself.
    assert pem.split() == leaf.cert_pem.split()


async def test_skip_verify_pool_reaches_an_unknown_ca_and_forgets_the_root_with_the_replica(
    fast_retire: None,
) -> None:
    ca = TestCA()
    leaf = ca.issue(dns=("istiod.istio-system.svc",))
    sim = make_mesh(1, 3, tokens=TOKENS)[0]
    server, port = build_simulator_server(sim, "127.0.0.1:0", tls=(leaf.cert_pem, leaf.key_pem, None))
    await server.start()
    r = Replica(f"127.0.0.1:{port}")
    p = UpstreamPool(UpstreamTLS(skip_verify=True), max_message_bytes=MiB)
    try:
        body = await p.ask(r, syncz_request(), BEARER, timeout=30)
        assert len(discovery_pb2.DiscoveryResponse.FromString(body).resources) == 3
        assert r.address in p._unverified_roots
        p.retain(())
        assert r.address not in p._unverified_roots
    finally:
        await p.close()
        await server.stop(0)


async def test_skip_verify_to_a_dead_replica_is_unavailable_not_a_crash() -> None:
    p = UpstreamPool(UpstreamTLS(skip_verify=True), max_message_bytes=MiB)
    try:
        with pytest.raises(UpstreamError) as err:
            await p.ask(Replica("127.0.0.1:1"), syncz_request(), BEARER, timeout=30)
    finally:
        await p.close()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert "cannot fetch istiod's certificate" in err.value.message
