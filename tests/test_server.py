"""The gRPC surface beside ADS, and the less common upstream settings."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import tempfile
import types

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from istioctl_proxy import client
from istioctl_proxy.app import Proxy
from istioctl_proxy.auth import Caller
from istioctl_proxy.budget import SendBudget
from istioctl_proxy.errors import ResourceExhausted
from istioctl_proxy.policy import CONFIG_DUMP, SYNCZ
from istioctl_proxy.sim.pki import TestCA, write_file
from istioctl_proxy.sim.simulate import SimulatedMesh
from istioctl_proxy.sim.simulator import SimProxy, make_mesh

from . import ads_client
from .ads_client import DELTA, SOTW, ads_call, bearer
from .helpers import ADMIN_TOKEN, TOKENS, Stack, make_pki, stack
from .waits import EVENT_TIMEOUT, until


async def test_health_and_reflection_are_served() -> None:
    async with stack(1, 1) as s, grpc.aio.insecure_channel(s.address) as ch:
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = [svc.name async for r in responses for svc in r.list_services_response.service]
        assert "envoy.service.discovery.v3.AggregatedDiscoveryService" in names


async def test_insecure_skip_verify_reaches_an_istiod_with_an_unknown_ca() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        pki = make_pki(tmp)
        stranger = TestCA()
        istiod = stranger.issue(dns=("istiod.istio-system.svc",))
        mesh = SimulatedMesh(make_mesh(2, 4, tokens=TOKENS))
        await mesh.start(tls=(istiod.cert_pem, istiod.key_pem, pki.ca.cert_pem))
        ca = pki.path("ca.pem", pki.ca.cert_pem)
        cfg = pki.identity_config(tuple(mesh.addresses), istiod_ca="", istiod_insecure_skip_verify=True)
        for verify in (False, True):
            proxy = Proxy(
                cfg if not verify else dataclasses.replace(cfg, istiod_insecure_skip_verify=False, istiod_ca=ca)
            )
            await proxy.start()
            try:
                target = pki.admin_target(f"127.0.0.1:{proxy.port}")
                if not verify:
                    resp, _ = await ads_client.request(target, client.SYNCZ)
                    assert len(resp.resources) == 4
                else:
                    # With verification on, an istiod certificate from another CA is refused.
                    try:
                        await ads_client.request(target, client.SYNCZ, timeout=EVENT_TIMEOUT)
                        raise AssertionError("an unverifiable istiod was trusted")
                    except grpc.aio.AioRpcError as err:
                        assert err.code() == grpc.StatusCode.UNAVAILABLE
            finally:
                await proxy.stop(0)
        await mesh.stop()


async def test_identity_mode_upstream_token_file_is_reread_when_rotated() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        pki = make_pki(tmp)
        mesh = SimulatedMesh(make_mesh(2, 4, tokens={"token-1": ("istio-system", "default")}))
        await mesh.start()
        token_file = write_file(os.path.join(tmp, "token"), b"token-1\n")
        cfg = pki.identity_config(tuple(mesh.addresses), istiod_ca="", istiod_plaintext=True,
                                  upstream_cert="", upstream_key="", upstream_token_file=token_file)
        proxy = Proxy(cfg)
        await proxy.start()
        try:
            target = pki.admin_target(f"127.0.0.1:{proxy.port}")
            resp, _ = await ads_client.request(target, client.SYNCZ)
            assert len(resp.resources) == 4
            # Rotation: the old token stops working and the file holds the new one (mtime and size change).
            write_file(token_file, b"token-2-rotated-and-longer\n")
            for r in mesh.replicas:
                r.tokens = {"token-2-rotated-and-longer": ("istio-system", "default")}
            resp, _ = await ads_client.request(target, client.SYNCZ)
            assert len(resp.resources) == 4
        finally:
            await proxy.stop(0)
            await mesh.stop()


# -- Stream limits (issue 10, "Degraded today") ------------------------------------------------------------------


def _metric(s: Stack, name: str, **labels: str) -> float:
    return s.proxy.metrics.registry.get_sample_value(name, labels) or 0.0


def _syncz(ns: str = "istio-system") -> discovery_pb2.DiscoveryRequest:
    return discovery_pb2.DiscoveryRequest(type_url=SYNCZ, node=client.istioctl_node(ns))


async def test_streams_that_send_nothing_or_stop_sending_or_grow_old_are_ended() -> None:
    async with stack(2, 4, first_message_timeout=0.3, stream_idle_timeout=0.6, max_stream_age=60.0) as s:
        async with grpc.aio.insecure_channel(s.address) as ch:
            # Never a request: DEADLINE_EXCEEDED naming the flag, both endpoints.
            for method in (SOTW, DELTA):
                silent = ch.stream_stream(method)(metadata=bearer(ADMIN_TOKEN), timeout=30)
                with contextlib.suppress(grpc.aio.AioRpcError):
                    assert await silent.read() is grpc.aio.EOF
                assert await silent.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert "--first-message-timeout" in (await silent.details() or "")
            # One answer, then silence: answered, then ended by the idle timeout.
            call = ch.stream_stream(SOTW)(metadata=bearer(ADMIN_TOKEN), timeout=30)
            await call.write(_syncz().SerializeToString())
            assert isinstance(await call.read(), bytes)
            with contextlib.suppress(grpc.aio.AioRpcError):
                assert await call.read() is grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "--stream-idle-timeout" in (await call.details() or "")
        assert _metric(s, "istioctl_proxy_streams_cut_total", reason="first_message_timeout") == 2
        assert _metric(s, "istioctl_proxy_streams_cut_total", reason="idle_timeout") == 1
    async with stack(2, 4, stream_idle_timeout=60.0, max_stream_age=0.5) as s:
        async with grpc.aio.insecure_channel(s.address) as ch:
            call = ch.stream_stream(SOTW)(metadata=bearer(ADMIN_TOKEN), timeout=30)
            await call.write(_syncz().SerializeToString())
            assert isinstance(await call.read(), bytes)
            # Waiting for the next request, the stream reaches its age long before the idle timeout. (Writing
            # on would race the end of the stream: grpc.aio then reports its own INTERNAL, not our status.)
            with contextlib.suppress(grpc.aio.AioRpcError):
                assert await call.read() is grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.UNAVAILABLE and "--max-stream-age" in (await call.details())
        assert _metric(s, "istioctl_proxy_streams_cut_total", reason="max_age") == 1
        assert _metric(s, "istioctl_proxy_streams_open") == 0


async def test_streams_are_capped_per_connection_and_in_total() -> None:
    async with stack(2, 4, max_streams_per_connection=3, max_streams=5) as s:
        # One connection per channel (gRPC shares a connection between identical channels by default).
        channels = [grpc.aio.insecure_channel(s.address, options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(3)]
        held = []
        try:
            async def hold(ch: grpc.aio.Channel) -> grpc.aio.StreamStreamCall:  # type: ignore[type-arg]
                call = ch.stream_stream(SOTW)(metadata=bearer(ADMIN_TOKEN), timeout=30)
                await call.write(_syncz().SerializeToString())
                assert isinstance(await call.read(), bytes)  # answered: the stream is open on the proxy
                return call

            held += [await hold(channels[0]) for _ in range(3)]
            # Refused at admission, before the request is read: pipelined (as istioctl sends), so that the
            # refusal cannot race our write and turn into grpc.aio's own INTERNAL (seen under load).
            out = await ads_call(channels[0], [_syncz()], metadata=bearer(ADMIN_TOKEN), pipelined=True)
            assert out.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-streams-per-connection" in out.details
            held += [await hold(channels[1]) for _ in range(2)]
            out = await ads_call(channels[2], [_syncz()], metadata=bearer(ADMIN_TOKEN), pipelined=True)
            assert out.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-streams" in out.details, out
            assert _metric(s, "istioctl_proxy_streams_open") == 5
            assert _metric(s, "istioctl_proxy_streams_cut_total", reason="max_streams_per_connection") == 1
            assert _metric(s, "istioctl_proxy_streams_cut_total", reason="max_streams") == 1
            # Room again once a stream ends.
            await held[0].done_writing()
            assert await held[0].read() is grpc.aio.EOF
            out = await ads_call(channels[2], [_syncz()], metadata=bearer(ADMIN_TOKEN))
            assert out.code == grpc.StatusCode.OK, out
        finally:
            for call in held:
                call.cancel()
            for ch in channels:
                await ch.close()


# A client that does not read: without BDP probing its HTTP/2 window stays at 64 KiB, so a 6 MiB answer cannot
# land in its transport buffers unread (with probing, a quiet machine could grow the window enough to take it).
NOT_READING = [("grpc.max_receive_message_length", 64 << 20), ("grpc.http2.bdp_probe", 0)]


async def test_slow_readers_are_cut_and_others_are_unaffected() -> None:
    """Answers nobody reads hold the send budget; past it, the slow streams are cut (RESOURCE_EXHAUSTED)
    and a caller who reads gets its answer at once."""
    # The readers are another caller (one token is one caller: the slow reader's cut answers stay charged to it).
    mesh = make_mesh(2, 4, tokens={**TOKENS, "admin-token-2": TOKENS[ADMIN_TOKEN]})
    mesh[0].proxies.append(SimProxy("big", "ns-9", states={"LDS": "ERROR"}, error="e" * (6 << 20)))
    async with stack(mesh=mesh, send_budget_mib=6, slow_reader_seconds=0.2, send_timeout=30.0,
                     slow_reader_min_kib_per_second=1 << 20) as s:
        async with grpc.aio.insecure_channel(s.address, options=NOT_READING) as slow_ch, \
                grpc.aio.insecure_channel(s.address) as ch:
            slow = []
            for _ in range(3):
                call = slow_ch.stream_stream(SOTW)(metadata=bearer(ADMIN_TOKEN), timeout=60)
                await call.write(_syncz().SerializeToString())  # a 6 MiB answer, never read
                slow.append(call)
            await until(lambda: _metric(s, "istioctl_proxy_send_queued_bytes") == 6 << 20, "6 MiB queued")
            # One answer fills the 6 MiB budget; the others wait, so the budget is never exceeded. A caller who
            # reads gets its small answer once the stalled stream is cut.
            small = s.replicas[1].proxies[0].id
            for _ in range(3):
                out = await ads_call(ch, [discovery_pb2.DiscoveryRequest(
                    type_url=CONFIG_DUMP, resource_names=[small], node=client.istioctl_node("istio-system"))],
                    metadata=bearer("admin-token-2"), timeout=30)
                assert out.code == grpc.StatusCode.OK and out.responses, out
            # The stalled answer is cut (for the slow caller's next answer, or as a share cut for the reader's); it
            # stays charged to the slow caller (it may sit in gRPC's buffer), whose other answers are refused.
            assert _metric(s, "istioctl_proxy_streams_cut_total", reason="slow_reader") + _metric(
                s, "istioctl_proxy_streams_cut_total", reason="send_budget_caller_share") >= 1
            assert _metric(s, "istioctl_proxy_streams_cut_total", reason="send_budget_unread") == 2
            assert _metric(s, "istioctl_proxy_send_pinned_bytes") == 6 << 20
            assert _metric(s, "istioctl_proxy_send_queued_bytes") <= 6 << 20
            codes = []
            for call in slow:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    while await call.read() is not grpc.aio.EOF:
                        pass
                codes.append(await call.code())
            assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes, codes
            await until(lambda: _metric(s, "istioctl_proxy_send_queued_bytes") == 0, "the send queue to empty")


async def test_a_caller_with_many_unread_streams_does_not_starve_another_caller() -> None:
    """Red team finding 3, through the server: caller A's 30 streams never read their 6 MiB answers (the whole
    budget); caller B (another token) still gets its answer after one of A's is cut, not after A's queue."""
    mesh = make_mesh(2, 8, tokens=TOKENS)
    mesh[0].proxies.append(SimProxy("big", "ns-9", states={"LDS": "ERROR"}, error="e" * (6 << 20)))
    async with stack(mesh=mesh, send_budget_mib=6, slow_reader_seconds=1.0, send_timeout=60.0,
                     slow_reader_min_kib_per_second=1 << 20) as s:
        budget = s.proxy.service.budget
        hog, other = Caller("a", token=ADMIN_TOKEN).key, Caller("b", token="ns-1-token").key
        async with grpc.aio.insecure_channel(s.address, options=NOT_READING) as slow_ch, \
                grpc.aio.insecure_channel(s.address) as ch:
            slow = []
            gate = asyncio.Event()
            for replica in s.replicas:
                replica.faults.gate = gate  # A's 30 requests share one fan-out, answered at once
            for _ in range(30):
                call = slow_ch.stream_stream(SOTW)(metadata=bearer(ADMIN_TOKEN), timeout=120)
                await call.write(_syncz().SerializeToString())
                slow.append(call)
            await until(lambda: sum(r.requests for r in s.replicas) == 2, "A's one fan-out")
            await until(lambda: s.proxy.service.aggregator.coalescer.stats.joined == 29, "A's requests joined it")
            gate.set()
            # A holds the whole budget and has its other 29 answers waiting.
            await until(lambda: budget.held(hog) == 6 << 20 and budget.waiting(hog) == 29, "A's answers queued")
            asking = asyncio.create_task(ads_call(ch, [_syncz("ns-1")], metadata=bearer("ns-1-token"), timeout=60))
            await until(lambda: budget.waiting(other) == 1 or asking.done(), "B's answer waiting for room")
            cuts_before, a_waiting = _cuts(s), budget.waiting(hog)
            out = await asking
            assert out.code == grpc.StatusCode.OK and out.responses, out
            # One of A's answers was cut for B's fan-out (it reserves what A's held) and one for its answer, as
            # share cuts: not A's whole queue.
            assert a_waiting >= 20 and _cuts(s) - cuts_before <= 2
            assert _metric(s, "istioctl_proxy_streams_cut_total", reason="send_budget_caller_share") >= 1
            for call in slow:
                call.cancel()
        await until(lambda: _metric(s, "istioctl_proxy_send_queued_bytes") == 0, "the send queue to empty")


async def test_fan_outs_in_flight_reserve_room_in_the_budget_and_wait_for_it_within_their_deadline() -> None:
    """Issue 14 item 2: with --no-coalesce each caller's fan-out holds the replicas' answers and a merge before
    any send; N callers held N of them. Now a fan-out reserves what the last one of its kind held."""
    mesh = make_mesh(1, 4, tokens=TOKENS)
    mesh[0].proxies.append(SimProxy("big", "ns-9", states={"LDS": "ERROR"}, error="e" * (1 << 20)))
    async with stack(mesh=mesh, coalesce=False, send_budget_mib=5) as s, \
            grpc.aio.insecure_channel(s.address) as ch:
        budget, replica = s.proxy.service.budget, s.replicas[0]
        key = Caller("a", token=ADMIN_TOKEN).key
        first = await ads_call(ch, [_syncz()], metadata=bearer(ADMIN_TOKEN), timeout=30)
        assert first.code == grpc.StatusCode.OK, first
        (estimate,) = set(s.proxy.service.aggregator.fan_out_sizes.values())  # the answer and its merge: ~2 MiB
        assert 2 << 20 <= estimate < 5 << 19
        allowed = (5 << 20) // estimate
        replica.faults.latency = 60.0  # the fan-outs in flight stay in flight
        base = replica.requests
        calls = [asyncio.create_task(ads_call(ch, [_syncz()], metadata=bearer(ADMIN_TOKEN), timeout=60))
                 for _ in range(6)]
        await until(lambda: replica.requests - base + budget.waiting(key) == 6, "every call asking or waiting")
        # Only what the budget holds went upstream; the others wait for room (they used to go all at once).
        # Fan-outs together reserve at most half the budget (red team stop 20, F3): one of ~2 MiB in 5 MiB.
        assert allowed == 2 and replica.requests - base == 1 and budget.used == budget.fan_out_used == estimate
        # A caller whose deadline passes while it waits for room is refused, naming the flag.
        late = await ads_call(ch, [_syncz()], metadata=bearer(ADMIN_TOKEN), timeout=5)
        assert late.code == grpc.StatusCode.RESOURCE_EXHAUSTED, late
        assert "--send-budget-mib" in late.details and "fan-out" in late.details
        assert _metric(s, "istioctl_proxy_streams_cut_total", reason="send_budget_fanout") == 1
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)


def _cuts(s: Stack) -> float:
    return sum(_metric(s, "istioctl_proxy_streams_cut_total", reason=r)
               for r in ("slow_reader", "send_budget_caller_share", "send_budget", "send_timeout"))


async def test_an_answer_not_read_within_the_send_timeout_is_cut() -> None:
    mesh = make_mesh(1, 2, tokens=TOKENS)
    mesh[0].proxies.append(SimProxy("big", "ns-9", states={"LDS": "ERROR"}, error="e" * (6 << 20)))
    async with stack(mesh=mesh, send_timeout=0.5) as s:
        async with grpc.aio.insecure_channel(s.address, options=NOT_READING) as ch:
            call = ch.stream_stream(SOTW)(metadata=bearer(ADMIN_TOKEN), timeout=60)
            await call.write(_syncz().SerializeToString())
            await until(lambda: _metric(s, "istioctl_proxy_streams_cut_total", reason="send_timeout") == 1, "the cut")
            await until(lambda: _metric(s, "istioctl_proxy_streams_open") == 0, "no stream left open")
            with contextlib.suppress(grpc.aio.AioRpcError):
                while await call.read() is not grpc.aio.EOF:
                    pass
            assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--send-timeout" in (await call.details() or "")


async def test_send_budget_waits_cuts_the_oldest_stalled_answer_and_refuses_when_nothing_can_be_cut() -> None:
    cuts: list[str] = []
    budget = SendBudget(10, slow_reader_seconds=0.05, on_cut=cuts.append)
    async with budget.hold("a", 8, 1.0) as evicted:

        async def second() -> int:
            async with budget.hold("a", 8, 30.0):
                return budget.used

        waiting = asyncio.create_task(second())
        assert await evicted == "slow_reader"  # the stalled first answer is cut for the waiting one
        assert cuts == ["slow_reader"] and budget.used == 8
    assert await waiting == 8
    assert budget.used == 0
    # An answer larger than the whole budget takes all of it, alone.
    async with budget.hold("a", 100, 1.0):
        assert budget.used == 10
    # Nothing stalled long enough to cut: the waiter is refused after its wait, and counted.
    patient = SendBudget(10, slow_reader_seconds=600.0, on_cut=cuts.append)
    async with patient.hold("a", 10, 1.0):
        with pytest.raises(ResourceExhausted, match="--send-budget-mib"):
            async with patient.hold("a", 1, 0.1):
                pass
    assert cuts == ["slow_reader", "send_budget"] and patient.used == 0 and patient.waiting() == 0


async def _granted(
    budget: SendBudget, name: str, size: int, order: list[str], release: asyncio.Event,
    cut: dict[str, str] | None = None,
) -> None:
    async with budget.hold(name[0], size, 600.0) as evicted:  # the caller is the name's first letter
        order.append(name)
        await asyncio.wait({evicted, asyncio.ensure_future(release.wait())}, return_when=asyncio.FIRST_COMPLETED)
        if evicted.done() and cut is not None:
            cut[name] = evicted.result()
        await release.wait()


async def test_send_budget_serves_waiting_callers_round_robin_and_each_caller_in_order() -> None:
    # Red team finding 3: room that frees went to whichever waiter woke first, and a caller that woke late was
    # queued again at the back. Now: the least recently served caller first, FIFO within a caller.
    budget = SendBudget(10, slow_reader_seconds=600.0)
    order: list[str] = []
    names = ("a0", "a1", "a2", "a3", "b1", "c1", "b2")
    gates = {name: asyncio.Event() for name in names}
    tasks = []
    for name in names:
        tasks.append(asyncio.create_task(_granted(budget, name, 10, order, gates[name])))
        await until(lambda: budget.grants + budget.waiting() == len(tasks), f"{name} holding or queued")
    for n in range(len(names)):
        await until(lambda n=n: len(order) == n + 1, "the next grant")  # type: ignore[misc]
        gates[order[-1]].set()
    await asyncio.gather(*tasks)
    # a0 was served first: b and c (not served yet) go before a's next answer, then callers alternate.
    assert order == ["a0", "b1", "c1", "a1", "b2", "a2", "a3"]
    assert budget.used == 0 and budget.waiting() == 0


async def test_a_caller_over_its_share_gets_no_more_room_while_another_caller_waits() -> None:
    budget = SendBudget(100, slow_reader_seconds=600.0)
    order: list[str] = []
    gates = {name: asyncio.Event() for name in ("a1", "a2", "a3", "b1", "c1")}
    tasks = {name: asyncio.create_task(_granted(budget, name, 30, order, gates[name])) for name in ("a1", "a2")}
    # Alone, a caller may use more than its share (half the budget): nobody else wants room.
    await until(lambda: budget.held("a") == 60, "a's two answers")
    tasks["c1"] = asyncio.create_task(_granted(budget, "c1", 50, order, gates["c1"]))  # 40 free: c waits
    await until(lambda: budget.waiting("c") == 1, "c queued")
    tasks["a3"] = asyncio.create_task(_granted(budget, "a3", 10, order, gates["a3"]))
    await until(lambda: budget.waiting("a") == 1, "a's third answer queued")
    # 40 bytes are free, but a holds 60 > 50 while c waits: a's answer waits (and nobody overtakes c).
    assert order == ["a1", "a2"] and budget.used == 60
    tasks["b1"] = asyncio.create_task(_granted(budget, "b1", 10, order, gates["b1"]))
    await until(lambda: budget.waiting("b") == 1, "b queued")
    gates["a1"].set()  # 70 free: c (first in line), then b (not served yet), then a (30 held: within its share)
    await until(lambda: len(order) == 5, "every answer granted")
    assert order == ["a1", "a2", "c1", "b1", "a3"] and budget.used == 100
    for gate in gates.values():
        gate.set()
    await asyncio.gather(*tasks.values())
    assert budget.used == 0


async def test_stalled_answers_of_the_biggest_holder_are_cut_first_and_counted_as_share_cuts() -> None:
    cuts: list[str] = []
    budget = SendBudget(100, slow_reader_seconds=0.05, on_cut=cuts.append)
    order: list[str] = []
    cut: dict[str, str] = {}
    gates = {name: asyncio.Event() for name in ("b1", "a1", "a2", "c1")}
    tasks = [asyncio.create_task(_granted(budget, name, 30, order, gates[name], cut)) for name in ("b1", "a1", "a2")]
    await until(lambda: budget.used == 90, "three answers held")
    tasks.append(asyncio.create_task(_granted(budget, "c1", 20, order, gates["c1"], cut)))
    # c needs 10 more bytes: the stalled answer cut is a's oldest (a holds the most, 60 > its share of 50),
    # not b's, although b's is older.
    await until(lambda: "a1" in cut, "a's first answer cut")
    assert cut == {"a1": "send_budget_caller_share"} and cuts == ["send_budget_caller_share"]
    gates["a1"].set()  # the cut stream ends, its hold goes: c gets the room
    await until(lambda: order[-1:] == ["c1"], "c's answer")
    assert cut == {"a1": "send_budget_caller_share"}
    for gate in gates.values():
        gate.set()
    await asyncio.gather(*tasks)
    assert budget.used == 0


async def test_a_callers_answers_waiting_to_be_sent_go_before_its_fan_outs() -> None:
    # An answer waiting for room is memory held already; a fan-out makes more. FIFO put a merged answer behind
    # the fan-outs its caller queued before it, so with --no-coalesce answers piled up (~14 MiB per call).
    budget = SendBudget(10, slow_reader_seconds=600.0)
    order: list[str] = []

    async def take(name: str, size: int, fan_out: bool) -> None:
        async with budget.hold("a", size, 600.0, fan_out=fan_out):
            order.append(name)

    gate = asyncio.Event()
    first = asyncio.create_task(_granted(budget, "a0", 10, order, gate))
    await until(lambda: budget.used == 10, "the budget full")
    tasks = [asyncio.create_task(take("fan-out 1", 6, True)), asyncio.create_task(take("fan-out 2", 6, True))]
    await until(lambda: budget.waiting("a") == 2, "two fan-outs queued")
    tasks.append(asyncio.create_task(take("answer", 4, False)))
    await until(lambda: budget.waiting("a") == 3, "an answer queued after them")
    gate.set()
    await asyncio.gather(first, *tasks)
    assert order == ["a0", "answer", "fan-out 1", "fan-out 2"]


async def test_an_answer_is_encoded_for_its_stream_only_once_the_send_budget_has_room() -> None:
    # Issue 14: Delta encodes a new message per stream (a copy of the merged answer); it used to be built before
    # waiting for room, so 50 waiting streams held 50 copies outside the budget.
    from istioctl_proxy.model import Merge, Plan, Result
    from istioctl_proxy.server import AdsService

    service = AdsService(types.SimpleNamespace(), None)  # type: ignore[arg-type]  # _send needs neither
    service.budget = SendBudget(100, slow_reader_seconds=600.0)
    encoded: list[int] = []
    written: list[bytes] = []

    class Protocol:
        def decode(self, raw: bytes) -> tuple[str, list[str], None]:
            raise AssertionError("not reading")

        def encode(self, result: Result) -> bytes:
            encoded.append(service.budget.used)
            return result.body + b"!"

    class Context:
        async def write(self, body: bytes) -> None:
            written.append(body)

        def time_remaining(self) -> None:  # no deadline
            return None

    result = Result(b"x" * 60, Plan(SYNCZ, Merge.SYNCZ, ()), 1, [])
    async with service.budget.hold("a", 60, 1.0):
        sending = asyncio.create_task(service._send(Context(), Protocol(), result, "a"))  # type: ignore[arg-type]
        for _ in range(5):
            await asyncio.sleep(0)  # let it run as far as it can: to the budget, not past it
        assert encoded == [] and written == []
    await sending
    assert encoded == [60] and written == [b"x" * 60 + b"!"] and service.budget.used == 0


async def test_a_cut_answer_stays_charged_to_its_caller_until_its_connection_can_have_closed() -> None:
    # Red team stop 20, F5: a cut answer may stay in gRPC's buffer (gRPC Python cannot reset one stream), yet the
    # cut freed its room at once: a never-reading caller turned the budget into a conveyor. Now it is pinned.
    cuts: list[str] = []
    pinned: list[int] = []
    budget = SendBudget(10, slow_reader_seconds=0.01, on_cut=cuts.append, pin_seconds=600.0,
                        on_pinned=pinned.append)
    async with budget.hold("a", 8, 1.0) as evicted:
        waiting = asyncio.create_task(budget.hold("a", 8, 30.0).__aenter__())
        assert await evicted == "slow_reader"
        budget.pin(evicted, 8)
    # Its room is free for others, but the caller's pinned bytes reached its share: refused at once, not served.
    with pytest.raises(ResourceExhausted, match="cut unread"):
        await waiting
    with pytest.raises(ResourceExhausted, match="cut unread"):
        async with budget.hold("a", 1, 30.0):
            pass
    assert cuts[:3] == ["slow_reader", "send_budget_unread", "send_budget_unread"]
    assert budget.used == 0 and budget.pinned == budget.pinned_by("a") == 8 and pinned == [8]
    async with budget.hold("b", 10, 1.0):  # another caller's whole answer could still be pinned (stop 21 F1)
        assert budget.used == 10
    # Past its connection's life the pin goes, and the caller is served again.
    budget._pins[0].until = 0.0  # its connection's life is over (its timer is what calls this)
    budget._expire()
    assert budget.pinned == 0 and pinned == [8, 0] and budget.waiting() == 0 and not budget._served
    async with budget.hold("a", 8, 1.0):
        assert budget.used == 8
