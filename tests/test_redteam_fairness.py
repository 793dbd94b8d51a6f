"""Red team (stop 20): the send budget's per-caller share and the fan-out reservation (issue 14 item 2).

Simulated replicas behind the real server (the budget and the reservation are the proxy's own; istiod is only
the source of answers here). The real-istiod half (re-encoded tokens) is tests/e2e/test_redteam_fairness.py.
"""

from __future__ import annotations

import asyncio
import random
import socket

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2

from istioctl_proxy import client
from istioctl_proxy.auth import Caller
from istioctl_proxy.budget import SendBudget
from istioctl_proxy.errors import ResourceExhausted
from istioctl_proxy.policy import DEBUG, SYNCZ
from istioctl_proxy.sim.simulator import SimProxy, SimReplica, make_mesh
from istioctl_proxy.wire import SynczMemo

from .ads_client import SOTW, ads_call, bearer
from .helpers import ADMIN_TOKEN, TOKENS, in_flight, rss_bytes, stack
from .waits import until

# A client that does not read (see tests/test_server.py): a 6 MiB answer stays in the proxy's send budget.
NOT_READING = [("grpc.max_receive_message_length", 64 << 20), ("grpc.http2.bdp_probe", 0)]
# istioctl mints a new service-account token on every run (CreatePerRPCCredentials → TokenRequest): one
# identity, many tokens. The simulator knows these as istio-system/default, like ADMIN_TOKEN.
FRESH = tuple(f"admin-token-run-{i}" for i in range(6))
ADMIN_TOKENS = {**TOKENS, **dict.fromkeys(FRESH, ("istio-system", "default"))}


def _syncz(ns: str = "istio-system", node_suffix: str = "") -> discovery_pb2.DiscoveryRequest:
    node = client.istioctl_node(ns)
    node.id += node_suffix
    return discovery_pb2.DiscoveryRequest(type_url=SYNCZ, node=node)


def _big_mesh(error_bytes: int) -> list[SimReplica]:
    mesh = make_mesh(1, 4, tokens=ADMIN_TOKENS)
    mesh[0].proxies.append(SimProxy("big", "ns-9", states={"LDS": "ERROR"}, error="e" * error_bytes))
    return mesh


@pytest.mark.parametrize("vary", ["fresh token per call (istioctl)", "node id per call"])
async def test_fan_outs_of_new_tokens_or_nodes_reserve_room_too(vary: str) -> None:
    """The fan-out bound learns its estimate per coalescing key, and in forward mode that key holds the token's
    fingerprint and the caller's node bytes. Real istioctl mints a new token on every run, so every run is a
    first fan-out (estimate 0): N concurrent `istioctl x ps` hold N x (answers + merge) outside the budget, as
    before the bound. Same for one token and a node id varied per call. (Failed on 1a84426: all 6 went upstream
    at once; fixed by h-fair's 7ff67f4, whose estimate falls back to the type URL and replica set.)"""
    async with stack(mesh=_big_mesh(1 << 20), coalesce=False, send_budget_mib=5) as s, \
            grpc.aio.insecure_channel(s.address) as ch:
        budget, replica = s.proxy.service.budget, s.replicas[0]
        first = await ads_call(ch, [_syncz()], metadata=bearer(ADMIN_TOKEN), timeout=30)
        assert first.code == grpc.StatusCode.OK, first
        estimate = max(s.proxy.service.aggregator.fan_out_sizes.values())  # the ~1 MiB answer and its merge
        allowed = (5 << 20) // estimate
        assert allowed == 2
        replica.faults.latency = 60.0  # the fan-outs in flight stay in flight
        base = replica.requests
        if vary.startswith("fresh"):
            asks = [([_syncz()], bearer(token)) for token in FRESH]
        else:
            asks = [([_syncz(node_suffix=f"-{i}")], bearer(ADMIN_TOKEN)) for i in range(6)]
        calls = [asyncio.create_task(ads_call(ch, reqs, metadata=md, timeout=60)) for reqs, md in asks]
        try:
            await until(lambda: replica.requests - base + budget.waiting() == 6, "every call asking or waiting")
            # Observed on 1a84426: all 6 went upstream at once (~12 MiB of answers and merges against 5 MiB).
            assert replica.requests - base <= allowed
        finally:
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)


async def test_a_whole_budget_fan_out_does_not_freeze_every_other_callers_answers() -> None:
    """A replica that answered one caller with more than the budget (a hostile istiod, or just a 30k-proxy mesh
    against the default 48 MiB) makes that caller's next fan-out reserve the whole budget, unevictable, for as
    long as the replicas take (up to --upstream-timeout). Meanwhile another caller's 0-byte-upstream answer
    (an unknown debug path, answered by the proxy itself) cannot get a byte of room. Now fan-outs together
    reserve at most half the budget."""
    async with stack(mesh=_big_mesh(6 << 20), coalesce=False, send_budget_mib=6, slow_reader_seconds=0.5,
                     upstream_timeout=60.0) as s, grpc.aio.insecure_channel(s.address, options=NOT_READING) as ch:
        budget, replica = s.proxy.service.budget, s.replicas[0]
        hog = Caller("a", token=ADMIN_TOKEN).key
        first = await ads_call(ch, [_syncz()], metadata=bearer(ADMIN_TOKEN), timeout=30)
        assert first.code == grpc.StatusCode.OK, first
        replica.faults.latency = 60.0
        base = replica.requests
        slow = asyncio.create_task(ads_call(ch, [_syncz()], metadata=bearer(ADMIN_TOKEN), timeout=90))
        try:
            # Its fan-out in flight, holding its reservation (observed: all 6 MiB of the budget).
            await until(lambda: replica.requests == base + 1 and budget.held(hog) > 0, "the hog's fan-out in flight")
            unknown = discovery_pb2.DiscoveryRequest(type_url=DEBUG, resource_names=["no-such-path"],
                                                     node=client.istioctl_node("ns-1"))
            out = await ads_call(ch, [unknown], metadata=bearer("ns-1-token"), timeout=5)
            # Observed: its whole 5 s deadline waiting for room, then RESOURCE_EXHAUSTED "the proxy's send budget
            # stayed full" (before the deadline fix: a bare DEADLINE_EXCEEDED), although its answer is a few bytes
            # and needs no replica.
            assert out.code == grpc.StatusCode.OK and out.responses, out
        finally:
            slow.cancel()
            await asyncio.gather(slow, return_exceptions=True)


async def test_a_caller_waiting_for_send_room_is_refused_within_its_own_deadline() -> None:
    """The wait for room ignored the caller's deadline (it waited --send-timeout, 60 s by default): a caller
    with a shorter deadline got its own client's bare DEADLINE_EXCEEDED, never the proxy's reason."""
    async with stack(mesh=_big_mesh(6 << 20), send_budget_mib=6, slow_reader_seconds=600.0,
                     send_timeout=60.0) as s:
        budget = s.proxy.service.budget
        hog = Caller("a", token=ADMIN_TOKEN).key
        async with grpc.aio.insecure_channel(s.address, options=NOT_READING) as slow_ch, \
                grpc.aio.insecure_channel(s.address) as ch:
            call = slow_ch.stream_stream(SOTW)(metadata=bearer(ADMIN_TOKEN), timeout=120)
            await call.write(_syncz().SerializeToString())  # 6 MiB, never read: the whole budget
            try:
                await until(lambda: budget.held(hog) == 6 << 20, "the unread answer holding the budget")
                out = await ads_call(ch, [_syncz("ns-1")], metadata=bearer("ns-1-token"), timeout=4)
                assert out.code == grpc.StatusCode.RESOURCE_EXHAUSTED, out
                assert "--send-budget-mib" in out.details, out
            finally:
                call.cancel()
            await until(lambda: budget.used == 0 and budget.waiting() == 0, "the budget to empty")


async def test_holds_and_waiters_cancelled_at_any_point_leave_nothing_behind() -> None:
    """Callers hanging up while waiting, just as room is granted, or while holding: nothing leaks (used bytes,
    waiters, per-caller state)."""
    rng = random.Random(20)
    cuts: list[str] = []
    budget = SendBudget(100, slow_reader_seconds=0.01, on_cut=cuts.append)

    async def one(caller: str, size: int, fan_out: bool) -> None:
        try:
            async with budget.hold(caller, size, 5.0, fan_out=fan_out) as evicted:
                await asyncio.wait({evicted}, timeout=rng.random() / 50)
        except ResourceExhausted:
            pass

    for _ in range(30):
        tasks = [asyncio.create_task(one(rng.choice("abcde"), rng.choice((10, 40, 60, 100, 250)), rng.random() < .3))
                 for _ in range(40)]
        for _ in range(rng.randrange(5)):
            await asyncio.sleep(0)
        for task in rng.sample(tasks, 20):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert budget.used == 0 and budget.waiting() == 0
        assert not budget._holds and not budget._held and not budget._waiting and not budget._served


# -- Item 3: the split path after h-split (one upb parse for kept nodes, node facts, ids from the fast index) ---


def _field(number: int, payload: bytes) -> bytes:
    from istioctl_proxy import wire

    return bytes([number << 3 | 2]) + wire._varint_bytes(len(payload)) + payload


def _varint_field(number: int, value: int) -> bytes:
    return bytes([number << 3]) + bytes([value])


def _ns_metadata(namespace: str) -> bytes:
    value = _field(3, namespace.encode())  # Value.string_value
    return _field(1, _field(1, b"NAMESPACE") + _field(2, value))  # Struct.fields entry


# Hostile spellings of one resource: (name, bytes of the Any). Every one of them claims ns-1 somewhere.
def _hostile_resources() -> list[tuple[str, bytes]]:
    from istioctl_proxy import wire

    url = _field(1, wire.CLIENT_CONFIG_URL)

    def node(pod: str, *metas: bytes, ids: tuple[str, ...] = ()) -> bytes:
        id_fields = b"".join(_field(1, i.encode()) for i in (ids or (f"{pod}.ns-1",)))
        return id_fields + b"".join(_field(3, m) for m in metas)

    def any_of(*ccs: bytes) -> bytes:
        return url + b"".join(_field(2, cc) for cc in ccs)

    def cc(*nodes: bytes, extra: bytes = b"") -> bytes:
        return b"".join(_field(1, n) for n in nodes) + extra

    ns1, ns2 = _ns_metadata("ns-1"), _ns_metadata("ns-2")
    number = _field(1, _field(1, b"NAMESPACE") + _field(2, b"\x11" + b"\x00" * 8))  # Value.number_value
    both = _field(1, _field(1, b"NAMESPACE") + _field(2, _field(3, b"ns-1"))) + \
        _field(1, _field(1, b"NAMESPACE") + _field(2, _field(3, b"ns-2")))
    return [
        ("honest", any_of(cc(node("h", ns1)))),
        ("metadata twice, ns-2 last", any_of(cc(node("m", ns1, ns2)))),
        ("NAMESPACE entry twice in one Struct, ns-2 last", any_of(cc(node("e", both)))),
        ("NAMESPACE then a number", any_of(cc(node("n", ns1, number)))),
        ("id twice", any_of(cc(node("i", ns1, ids=("i.ns-1", "secret.ns-2"))))),
        ("node twice, second without metadata", any_of(cc(node("t", ns1), _field(1, b"secret.ns-2")))),
        ("node field 1 as a varint first", any_of(_varint_field(1, 7) + cc(node("v", ns1)))),
        ("node as a varint, real node later", any_of(cc(node("w", ns1)) + _varint_field(1, 1))),
        ("Any type URL after the value", _field(2, cc(node("u", ns1))) + url),
        ("Any type URL twice, other type last", any_of(cc(node("x", ns1))) + _field(1, b"type.googleapis.com/x")),
        ("value as a varint then a value", url + _varint_field(2, 1) + _field(2, cc(node("y", ns1)))),
        ("value twice, node only in the first", any_of(cc(node("z", ns1)), cc(extra=_field(2, b"")))),
        ("value twice, ns-2 metadata in the second", any_of(cc(node("q", ns1)), cc(node("q", ns2)))),
    ]


def _shown(body: bytes) -> list[tuple[str, str]]:
    from envoy.service.status.v3 import csds_pb2

    out = []
    for res in discovery_pb2.DiscoveryResponse.FromString(body).resources:
        cc = csds_pb2.ClientConfig()
        if res.type_url != "type.googleapis.com/envoy.service.status.v3.ClientConfig" or not res.Unpack(cc):
            out.append(("<not a ClientConfig>", res.type_url))
            continue
        ns = cc.node.metadata.fields.get("NAMESPACE")
        out.append((cc.node.id, ns.string_value if ns is not None and ns.WhichOneof("kind") == "string_value"
                    else "<none>"))
    return out


@pytest.mark.parametrize("path", ["default", "split", "exact"])
@pytest.mark.parametrize("seed", range(6))
def test_a_scoped_caller_is_shown_only_its_namespace_whatever_the_resources_spell(
    path: str, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random mixes of hostile spellings across 3 replicas (with duplicates across replicas), merged for ns-1
    by each path: what the caller decodes (protobuf, as istioctl) is only ns-1 proxies, and an honest replica's
    ns-1 proxies are all shown."""
    from istioctl_proxy import merge
    from istioctl_proxy.discovery import Replica
    from istioctl_proxy.model import Answer
    from istioctl_proxy.policy import plan_request

    if path == "exact":
        monkeypatch.setattr(merge, "merge_syncz_fast", lambda *_a: None)
        monkeypatch.setattr(merge, "merge_syncz_split", lambda *_a: None)
    rng = random.Random(seed)
    pool = _hostile_resources()
    envelope = discovery_pb2.DiscoveryResponse(type_url=SYNCZ, version_info="v").SerializeToString()
    answers = []
    for r in range(3):
        picked = [pool[0][1]] + [rng.choice(pool)[1] for _ in range(rng.randrange(1, 6))]
        if r == 2:
            picked = [pool[0][1]]  # honest: its proxy must be shown
        body = envelope + b"".join(_field(2, a) for a in picked)
        answers.append(Answer(Replica(f"10.0.0.{r}:15012"), body))
    memo = wire_memo()
    plan = plan_request(SYNCZ, [])
    for _ in range(2):  # cold and warm memo
        ctx = merge.MergeContext(scope="ns-1", memo=memo)
        if path == "split":
            got = merge.merge_syncz_split(plan, answers, ctx)
            if got is None:
                continue  # stepped aside: the exact reader decides (the "exact" case)
        else:
            got = merge.merge(plan, answers, ctx)
        shown = _shown(got.body)
        assert all(ns == "ns-1" for _, ns in shown), shown
        assert ("h.ns-1", "ns-1") in shown, shown


def wire_memo() -> SynczMemo:
    return SynczMemo()


@pytest.mark.parametrize("path", ["default", "exact"])
def test_an_any_whose_last_type_url_is_not_a_client_config_is_not_shown_to_a_scoped_caller(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exact reader took an Any's first type URL; protobuf (istioctl) keeps the last. A replica could show a
    scoped caller an ns-1-scoped value that the caller decodes as another type. Now the replica is rejected."""
    from istioctl_proxy import merge
    from istioctl_proxy.discovery import Replica
    from istioctl_proxy.model import Answer
    from istioctl_proxy.policy import plan_request

    if path == "exact":
        monkeypatch.setattr(merge, "merge_syncz_fast", lambda *_a: None)
        monkeypatch.setattr(merge, "merge_syncz_split", lambda *_a: None)
    resources = dict(_hostile_resources())
    envelope = discovery_pb2.DiscoveryResponse(type_url=SYNCZ, version_info="v").SerializeToString()
    hostile = envelope + _field(2, resources["Any type URL twice, other type last"])
    honest = envelope + _field(2, resources["honest"])
    answers = [Answer(Replica("10.0.0.1:15012"), hostile), Answer(Replica("10.0.0.2:15012"), honest)]
    got = merge.merge(plan_request(SYNCZ, []), answers, merge.MergeContext(scope="ns-1", memo=wire_memo()))
    assert _shown(got.body) == [("h.ns-1", "ns-1")]
    assert [a.replica.address for a, _ in got.rejected] == ["10.0.0.1:15012"]


async def _throttled_relay(target: str, bytes_per_second: int) -> tuple[asyncio.Server, str]:
    """A TCP relay to `target` whose server-to-client direction carries at most `bytes_per_second`: a caller
    that reads as fast as its link allows, on a slow link (a port-forward, a WAN)."""
    host, port = target.rsplit(":", 1)
    chunk = bytes_per_second // 16

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, throttled: bool) -> None:
        try:
            while data := await reader.read(chunk if throttled else 1 << 16):
                writer.write(data)
                await writer.drain()
                if throttled:
                    await asyncio.sleep(1 / 16)  # the link's rate, not a wait for an event
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        # A small fixed receive buffer (no autotuning): the kernel cannot absorb the answer ahead of the link.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        server_r, server_w = await asyncio.open_connection(sock=sock)
        await asyncio.gather(pump(client_r, server_w, False), pump(server_r, client_w, True))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_a_caller_reading_a_big_answer_at_its_links_speed_is_not_cut_when_another_caller_asks() -> None:
    """A hold's age counted from its grant, not from the caller's progress: a big answer read at full speed on a
    slow link was cut as a slow reader as soon as anyone else waited. Now a hold is stalled only after
    --slow-reader-seconds plus its size at --slow-reader-min-kib-per-second (default 1 MiB/s)."""
    # 12 MiB at 2 MiB/s: ~6 s of reading; the proxy's socket buffer (at most 4 MiB here) cannot take it sooner.
    async with stack(mesh=_big_mesh(12 << 20), send_budget_mib=12, slow_reader_seconds=1.0, send_timeout=60.0) as s:
        budget = s.proxy.service.budget
        reader = Caller("a", token=ADMIN_TOKEN).key
        relay, address = await _throttled_relay(s.address, 2 << 20)
        try:
            async with grpc.aio.insecure_channel(address, options=NOT_READING[:1]) as slow_link, \
                    grpc.aio.insecure_channel(s.address) as ch:
                big = asyncio.create_task(ads_call(slow_link, [_syncz()], metadata=bearer(ADMIN_TOKEN), timeout=60))
                await until(lambda: budget.held(reader) > 0, "the big answer being sent")
                other = await ads_call(ch, [_syncz("ns-1")], metadata=bearer("ns-1-token"), timeout=30)
                assert other.code == grpc.StatusCode.OK, other
                out = await big
                # Observed: RESOURCE_EXHAUSTED "the answer was not read for 1s while the proxy's send budget was
                # full (--slow-reader-seconds)", although the caller read every byte its link carried.
                assert out.code == grpc.StatusCode.OK and out.responses, out
        finally:
            relay.close()


async def test_cut_answers_of_never_reading_streams_do_not_pile_up_beyond_the_budget() -> None:
    """One caller, 30 streams that never read a 6 MiB answer, against a 6 MiB budget: every stream but one is cut
    (the budget says 6 MiB used), yet each cut answer stays queued in gRPC behind the caller's closed HTTP/2 window.
    Measured with the callers in another process (so only the proxy's memory): +17 MiB for 2 streams, +198 MiB
    for 30. Here the callers share the process; their receive windows are 64 KiB each (no BDP probing).
    Now a cut answer stays charged to its caller (pinned) until its connection's life ends: once the pinned bytes
    reach the caller's share, its next answers are refused at once."""
    async with stack(mesh=_big_mesh(6 << 20), send_budget_mib=6, slow_reader_seconds=0.2, send_timeout=60.0,
                     slow_reader_min_kib_per_second=1 << 20) as s:
        cuts = s.proxy.metrics.registry.get_sample_value
        async with grpc.aio.insecure_channel(s.address, options=NOT_READING) as warm:  # the merge's own memory
            first = await ads_call(warm, [_syncz()], metadata=bearer(ADMIN_TOKEN), timeout=30)
            assert first.code == grpc.StatusCode.OK, first
        base = rss_bytes() >> 20
        channels = [grpc.aio.insecure_channel(s.address, options=NOT_READING) for _ in range(30)]
        calls = []
        try:
            for ch in channels:
                call = ch.stream_stream(SOTW)(metadata=bearer(ADMIN_TOKEN), timeout=300)
                await call.write(_syncz().SerializeToString())
                calls.append(call)

            def ended(reason: str) -> float:
                return cuts("istioctl_proxy_streams_cut_total", {"reason": reason}) or 0.0

            # Before the fix: 29 slow_reader cuts, each freeing room for the next 6 MiB answer. Now the first cut
            # answer stays charged to its caller, who is refused from then on (calls joined to a refused
            # fan-out share its one refusal).
            await until(lambda: sum(c.done() for c in calls) >= 29, lambda: f"every stream but one ended "
                        f"{sum(c.done() for c in calls)} {[ended(r) for r in ('slow_reader', 'send_budget_unread')]}")
            assert ended("slow_reader") <= 2 and ended("send_budget_unread") >= 1
            codes = {await c.code() for c in calls if c.done()}
            assert codes == {grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
            assert s.proxy.service.budget.used <= 6 << 20
            assert cuts("istioctl_proxy_send_pinned_bytes") == s.proxy.service.budget.pinned >= 6 << 20
            # Observed: ~+190 MiB (29 cut answers of 6 MiB still queued in gRPC).
            assert (rss_bytes() >> 20) - base < 64, f"+{(rss_bytes() >> 20) - base} MiB against a 6 MiB budget"
        finally:
            for ch in channels:
                await ch.close()


async def test_callers_waiting_for_a_hung_size_learning_fan_out_get_a_status_before_their_deadline() -> None:
    """While no fan-out size is known for a type URL and replica set (at start, or once 256 other shapes pushed it
    out of the LRU), one fan-out learns it and the others wait. A replica that hangs makes the learner take the
    whole upstream timeout: the others must still end before their own deadline, with the proxy's status."""
    mesh = make_mesh(2, 4, tokens=ADMIN_TOKENS)
    async with stack(mesh=mesh, coalesce=False, upstream_timeout=30.0) as s:
        s.replicas[1].faults.hang = True
        learner = asyncio.create_task(ads_call(s.address, [_syncz()], metadata=bearer(ADMIN_TOKEN), timeout=60))
        try:
            await until(lambda: s.replicas[1].requests == 1, "the learner's fan-out in flight")
            outs = await asyncio.gather(*(ads_call(s.address, [_syncz()], metadata=bearer(token), timeout=3)
                                          for token in FRESH[:3]))
            for out in outs:
                # Observed: the healthy replica's partial answer (the hung one named in the trailer) after ~2.7 s.
                # Under load the wait may leave no time for it: then the proxy's own status, naming the replicas,
                # never the caller's client's bare "Deadline Exceeded".
                if out.code == grpc.StatusCode.OK:
                    assert out.responses and "DEADLINE_EXCEEDED" in str(out.trailers), out
                else:
                    assert "replica" in out.details, out
        finally:
            learner.cancel()
            await asyncio.gather(learner, return_exceptions=True)


async def test_a_size_learning_fan_out_that_ends_without_a_size_hands_learning_on() -> None:
    """While no size is known one fan-out learns it and the others wait (h-fair 7ff67f4). If the learner ends
    without a size (here its caller hangs up; also: all its replicas failed), nothing is learnt, and every caller
    waiting went upstream at once with no reservation: any caller can undo the burst bound by asking and hanging
    up, right after start or once 256 other request shapes pushed the size out of the LRU."""
    async with stack(mesh=_big_mesh(1 << 20), coalesce=False, send_budget_mib=5) as s, \
            grpc.aio.insecure_channel(s.address, options=NOT_READING[:1]) as ch:
        aggregator, replica, gate = s.proxy.service.aggregator, s.replicas[0], asyncio.Event()
        replica.faults.gate = gate
        learner = asyncio.create_task(ads_call(ch, [_syncz()], metadata=bearer(ADMIN_TOKEN), timeout=60))
        await until(lambda: replica.requests == 1 and aggregator._learning, "a fan-out learning the size")
        calls = [asyncio.create_task(ads_call(ch, [_syncz()], metadata=bearer(t), timeout=60)) for t in FRESH]
        try:
            await until(lambda: in_flight(s.proxy, SYNCZ) == 7, "6 callers waiting for the size")
            assert replica.requests == 1
            replica.faults.latency = 60.0  # from now on, fan-outs stay in flight
            learner.cancel()  # the learner's caller hangs up
            await asyncio.gather(learner, return_exceptions=True)
            await until(lambda: replica.requests > 1, "the next fan-out")
            await until(lambda: in_flight(s.proxy, SYNCZ) == 6, "the learner's call gone")
            # Before the fix: 7 (all 6 waiting callers upstream at once, unreserved). Now one learns, 5 wait.
            assert replica.requests == 2, replica.requests
        finally:
            gate.set()
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
