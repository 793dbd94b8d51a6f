"""Red team (stop 21): the send budget's pinned cut answers, the fan-out half, the slow-link floor rate, and the
forward-mode budget key (h-budget df24087, h-callerkey 82186e2).

Simulated replicas behind the real server (the budget is the proxy's own; istiod is only the source of answers);
SendBudget alone where the race is the budget's.
"""

from __future__ import annotations

import asyncio
import base64
import random
import sys
from pathlib import Path

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2

from istioctl_proxy import client
from istioctl_proxy.auth import Caller, canonical_jwt
from istioctl_proxy.budget import SendBudget
from istioctl_proxy.policy import DEBUG, SYNCZ
from istioctl_proxy.sim.simulator import SimProxy, SimReplica, make_mesh

from .ads_client import SOTW, ads_call, bearer
from .helpers import TOKENS, rss_bytes, stack, unused_kubeconfig
from .waits import until

# A client that does not read: its answer stays queued in the proxy (HTTP/2 window of 64 KiB, no BDP growth).
NOT_READING = [("grpc.max_receive_message_length", 64 << 20), ("grpc.http2.bdp_probe", 0)]
# Tokens of one service account, as istioctl mints one per run; to the send budget each is its own caller.
RUNS = tuple(f"admin-token-run-{i}" for i in range(40))
ADMIN_TOKENS = {**TOKENS, **dict.fromkeys(RUNS, ("istio-system", "default"))}


def _syncz(ns: str = "istio-system") -> discovery_pb2.DiscoveryRequest:
    return discovery_pb2.DiscoveryRequest(type_url=SYNCZ, node=client.istioctl_node(ns))


def _unknown_path(ns: str = "ns-1") -> discovery_pb2.DiscoveryRequest:
    # Answered by the proxy itself (istiod's "404 page not found"): a few bytes, no fan-out.
    return discovery_pb2.DiscoveryRequest(type_url=DEBUG, resource_names=["no-such-path"],
                                          node=client.istioctl_node(ns))


def _big_mesh(error_bytes: int) -> list[SimReplica]:
    mesh = make_mesh(1, 4, tokens=ADMIN_TOKENS)
    mesh[0].proxies.append(SimProxy("big", "ns-9", states={"LDS": "ERROR"}, error="e" * error_bytes))
    return mesh


def _key(token: str) -> str:
    return Caller("x", token=token).budget_key


# -- 1. Pinned answers -------------------------------------------------------------------------------------------


async def test_never_reading_tokens_do_not_freeze_every_other_callers_answers() -> None:
    """Caller A (one token) asks for a whole-budget answer and never reads: --send-timeout cuts it and pins it.
    When the pinned pool was as large as the budget that filled it, and caller B (a second token: in forward mode
    a second istioctl run) doing the same kept its answer's room in the live budget for the pin's life
    (--max-stream-age x 1.1 + --send-timeout: 390 s with the defaults): every other caller, even one whose answer
    is a few bytes made by the proxy itself, was refused "send budget stayed full" all that time. Now (F1) an
    answer is granted only while it could be pinned, and the pool is twice the budget (one token leaves room for
    a whole answer): A2, a second never-reading token, fills the pool; then B's whole-budget answer is refused,
    saying why, and small answers still go out."""
    # Answers just within the budget (one larger than it is granted only while nothing is pinned: stop 22, C).
    async with stack(mesh=_big_mesh((6 << 20) - (64 << 10)), send_budget_mib=6, slow_reader_seconds=0.2,
                     send_timeout=2.0) as s:
        budget = s.proxy.service.budget
        async with grpc.aio.insecure_channel(s.address, options=NOT_READING) as ch:
            calls = []
            for token in (RUNS[0], RUNS[2]):
                call = ch.stream_stream(SOTW)(metadata=bearer(token), timeout=600)
                await call.write(_syncz().SerializeToString())
                # Cut by --send-timeout (nobody waits, so not as a slow reader) and pinned.
                key = _key(token)
                await until(lambda: budget.pinned_by(key) > 5 << 20, "the answer pinned")  # noqa: B023 (awaited here)
                calls.append(call)
            # The pool nearly full: less room left than a whole answer's share.
            assert budget.pool - budget.pinned < 1 << 20 and budget.overflow == 0 and budget.used == 0
            async with grpc.aio.insecure_channel(s.address, options=NOT_READING) as ch_b:
                b = await ads_call(ch_b, [_syncz()], metadata=bearer(RUNS[1]), timeout=5)
            # Observed before F1: B granted, cut, pinned past the pool with its room kept: budget.used == 6 MiB.
            assert b.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "left unread" in (b.details or ""), b
            assert budget.pinned_by(_key(RUNS[1])) == 0 and budget.used == 0
            async with grpc.aio.insecure_channel(s.address) as ch_c:
                out = await ads_call(ch_c, [_unknown_path()], metadata=bearer("ns-1-token"), timeout=5)
            assert out.code == grpc.StatusCode.OK and out.responses, out
            for call in calls:
                call.cancel()


async def test_pinned_answers_past_the_pool_stay_within_the_overflow_share() -> None:
    """Past the pool, cut answers keep their room in the live budget only up to the share: answers are granted
    only while every answer in flight could still be pinned, so the other half stays free for callers who read."""
    budget = SendBudget(100, slow_reader_seconds=0.0, pin_seconds=60.0)
    for caller in "ab":  # the pool (twice the budget) full
        async with budget.hold(caller, 100, 1.0) as evicted:
            budget.pin(evicted, 100)
    assert budget.pinned == 200 and budget.pin_room == 50
    async with budget.hold("c", 30, 1.0) as evicted:  # fits the overflow's share
        budget.pin(evicted, 30)
    assert budget.overflow == 30 and budget.used == 30 and budget.pin_room == 20
    with pytest.raises(Exception, match="left unread"):
        async with budget.hold("d", 30, 0.05):  # could not be pinned: refused, not granted
            pass
    async with budget.hold("e", 20, 1.0):  # still room for answers that could be
        assert budget.used == 50
    assert budget.used == 30 and not budget._waiting


async def test_pins_that_expire_leave_no_per_caller_state_behind() -> None:
    """A pinned caller's round-robin turn (`_served`) was kept while it had pinned bytes, and nothing forgot it
    when the pin expired: in forward mode every istioctl run is a new key, so the table grew for ever."""
    budget = SendBudget(100, slow_reader_seconds=0.01, pin_seconds=0.05)
    for caller in "abc":
        async with budget.hold(caller, 80, 1.0) as evicted:
            budget.pin(evicted, 80)
    assert budget.pinned == 200 and budget.used == 40  # a, b and half of c in the pool, c's rest keeps its room
    await until(lambda: budget.pinned == 0 and budget.used == 0, "the pins to expire")
    assert not budget._pinned_by and not budget._pins
    # Observed: {'a': 1, 'b': 2, 'c': 3}.
    assert not budget._served, budget._served


# Never-reading callers in another process, so that only the proxy's (and the simulated replicas') memory is ours.
_NEVER_READING = """
import asyncio, sys
import grpc
from envoy.service.discovery.v3 import discovery_pb2
from istioctl_proxy import client

async def main(address: str, tokens: list[str], streams: int) -> None:
    opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.http2.bdp_probe", 0)]
    channels = [grpc.aio.insecure_channel(address, options=opts) for _ in range(streams)]
    req = discovery_pb2.DiscoveryRequest(type_url="istio.io/debug/syncz", node=client.istioctl_node("istio-system"))
    calls = []
    for i, ch in enumerate(channels):
        call = ch.stream_stream("/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources")(
            metadata=(("authorization", "Bearer " + tokens[i % len(tokens)]),), timeout=600)
        await call.write(req.SerializeToString())
        calls.append(call)
    print("written", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the test closes stdin

asyncio.run(main(sys.argv[1], sys.argv[3:], int(sys.argv[2])))
"""


async def test_many_tokens_of_never_reading_streams_pin_at_most_the_pool() -> None:
    """Stop 20's conveyor with many identities: 8 tokens (in forward mode, 8 istioctl runs) x 6 streams that never
    read a 1 MiB answer, 6 MiB budget, answers cut by --slow-reader-seconds or --send-timeout, the callers in
    another process. Each token pins at most its share plus what it held; the pool takes twice the budget, the
    rest keeps its room in the live budget (F1's freeze), so the cut answers queued in gRPC stay within three times
    the budget."""
    async with stack(mesh=_big_mesh(1 << 20), send_budget_mib=6, slow_reader_seconds=0.2, send_timeout=2.0) as s:
        budget = s.proxy.service.budget
        first = await ads_call(s.address, [_syncz()], metadata=bearer(RUNS[0]), timeout=30)  # the merge's memory
        assert first.code == grpc.StatusCode.OK, first
        base = rss_bytes() >> 20
        callers = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _NEVER_READING, s.address, "48", *RUNS[1:9],
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        try:
            assert callers.stdout is not None and await callers.stdout.readline() == b"written\n"
            # No answer left to cut: the rest wait for room (F1: the budget stays full of out-of-pool pins; fan-outs
            # wait up to their callers' deadline) or for a fan-out they joined.
            await until(lambda: s.proxy.service.streams.total == 48 or budget.pinned, "the streams open")
            await until(lambda: budget.waiting() and budget.pinned and not budget._holds,
                        lambda: f"no answer left to cut ({budget.waiting()} waiting, {budget.used >> 10} KiB used, "
                        f"{budget.pinned >> 10} KiB pinned)", timeout=120)
            assert budget.pinned <= budget.pool == 2 * budget.total and budget.used <= budget.total
            grown = (rss_bytes() >> 20) - base
            # Observed: +33 to +34 MiB, of which 14 MiB are the cut answers the budget counts (12 pinned, 2 keeping
            # their room), the rest the merges' freed memory glibc keeps (with the pool as large as the budget: +24
            # to +27). 48 MiB of answers were asked for: before stop 20 F5's fix each cut freed room for the next.
            assert grown < 3 * 6 + 24, f"+{grown} MiB against a 6 MiB budget"
        finally:
            assert callers.stdin is not None
            callers.stdin.close()
            await callers.wait()


async def test_one_istioctl_user_cut_unread_does_not_lock_out_every_other_istioctl_user(tmp_path: Path) -> None:
    """Identity mode with --token-review keys the send budget by `k8s:<ns>/<sa>`, and istioctl (without
    --cert-dir) mints every user's token for SA `default` of the istio namespace: all istioctl users are one
    caller. Once one user's answers are cut unread (a never-reading client, a suspended istioctl, a slow link)
    and pinned up to half the budget, every other istioctl user is refused "earlier answers were cut unread" for
    the pins' life (--max-stream-age x 1.1 + --send-timeout: 390 s with the defaults). Fixed on main by c85a7d7:
    a TokenReview caller is its token to the send budget."""
    kubeconfig = unused_kubeconfig(str(tmp_path))

    async def reviewer(token: str, peer: str) -> tuple[str, str] | None:
        return ("istio-system", "default") if token in ("run-a", "run-b") else None  # two istioctl runs

    async with stack(mesh=_big_mesh(6 << 20), identity=True, token_review=True, token_review_kubeconfig=kubeconfig,
                     send_budget_mib=12, send_timeout=2.0) as s:  # run-a pins its share: run-b's answer fits the rest
        assert s.pki is not None
        s.proxy.service.authenticator.token_reviewer = reviewer
        budget = s.proxy.service.budget
        creds = grpc.ssl_channel_credentials(root_certificates=s.pki.ca.cert_pem)
        options = [*NOT_READING, ("grpc.ssl_target_name_override", "localhost")]
        async with grpc.aio.secure_channel(s.address, creds, options=options) as ch:
            call = ch.stream_stream(SOTW)(metadata=bearer("run-a"), timeout=600)
            await call.write(_syncz().SerializeToString())
            await until(lambda: budget.pinned >= budget.share, "run-a's answer pinned")
            out = await ads_call(s.target("run-b"), [_syncz("ns-1")], metadata=bearer("run-b"), timeout=10)
        # Observed: RESOURCE_EXHAUSTED "this caller's earlier answers were cut unread ..." for run-b, which never
        # left anything unread.
        assert out.code == grpc.StatusCode.OK, out


# -- 4. The forward-mode budget key -----------------------------------------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_claims_never_make_two_tokens_one_caller_and_one_token_is_one_caller_however_spelled() -> None:
    """h-callerkey keys the budget by the token's canonical spelling, not by its claims (stop 20 suggested iss+sub):
    forged or oddly parsed claims (duplicate keys, unicode escapes, a non-string or huge sub) cannot make a token
    another caller's, and the cache key stays the exact bytes. Random tokens and random spellings of them (the
    spare bits of each part's last character, which Go's decoders ignore; padding): one key per decoded token."""
    victim_claims = b'{"iss":"kubernetes/serviceaccount","sub":"system:serviceaccount:istio-system:default"}'
    forged = [victim_claims,  # the same claims, another signature
              b'{"sub":"x","sub":"system:serviceaccount:istio-system:default","iss":"kubernetes/serviceaccount"}',
              b'{"iss":"kubernetes/serviceaccount","sub":"system:serviceaccount:istio\\u002dsystem:default"}',
              b'{"iss":"kubernetes/serviceaccount","sub":["system:serviceaccount:istio-system:default"]}',
              b'{"iss":"kubernetes/serviceaccount","sub":"' + b"s" * 100_000 + b'"}']
    header = _b64(b'{"alg":"RS256","kid":"k"}')
    victim = f"{header}.{_b64(victim_claims)}.{_b64(b'victim-signature')}"
    attackers = [f"{header}.{_b64(c)}.{_b64(b'attacker-signature-%d' % i)}" for i, c in enumerate(forged)]
    keys = {_key(t) for t in attackers}
    assert _key(victim) not in keys and len(keys) == len(attackers)
    assert Caller("x", token=victim).key not in {Caller("x", token=t).key for t in attackers}
    rng = random.Random(21)
    seen: dict[str, bytes] = {}
    for _ in range(300):
        parts = [rng.randbytes(rng.randrange(1, 40)) for _ in range(3)]
        canonical = ".".join(_b64(p) for p in parts)
        spelled = []
        for p in parts:
            text = _b64(p)
            spare = {1: 15, 2: 3}.get(len(p) % 3, 0)  # unused low bits of the last character
            if spare:
                alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
                last = alphabet.index(text[-1]) | rng.randint(0, spare)
                text = text[:-1] + alphabet[last]
            spelled.append(text + "=" * rng.randrange(3))
        respelled = ".".join(spelled)
        assert canonical_jwt(respelled) == canonical == canonical_jwt(canonical)
        assert _key(respelled) == _key(canonical)
        # The cache and coalescing key stays the exact bytes: one spelling never gets another's fetched answer.
        assert (Caller("x", token=respelled).key == Caller("x", token=canonical).key) == (respelled == canonical)
        joined = b"\0".join(parts)
        assert seen.setdefault(_key(canonical), joined) == joined  # no two decoded tokens share a key


# -- 2. Fan-out share ----------------------------------------------------------------------------------------------


async def test_merged_answers_waiting_for_send_room_stay_within_the_budget() -> None:
    """A fan-out's reservation ends when its merge is done; its answer then asks for send room as a new waiter,
    ranked by its caller's last grant (that of its fan-out). Callers never served before (every istioctl run is a
    new token) rank first: while only a fan-out fits, each finished fan-out hands its room to the next newcomer's
    fan-out and its own merged answer waits, held in memory outside the budget. One never-reading caller holding
    all but one fan-out's room, and 20 istioctl runs at once: 20 merged answers of 1 MiB held against a 6 MiB
    budget (scales as callers x answer size)."""
    async with stack(mesh=_big_mesh(1 << 20), send_budget_mib=6, slow_reader_seconds=600.0, send_timeout=120.0) as s:
        budget = s.proxy.service.budget
        first = await ads_call(s.address, [_syncz()], metadata=bearer(RUNS[0]), timeout=30)
        assert first.code == grpc.StatusCode.OK, first
        size = len(first.responses[0])
        estimate = max(s.proxy.service.aggregator.fan_out_sizes.values())
        assert size < estimate < 3 * size and 2 * estimate > budget.share  # one fan-out at a time
        hog = RUNS[1]
        channels = [grpc.aio.insecure_channel(s.address, options=NOT_READING) for _ in range(3)]
        peak = 0
        dispatch = budget._dispatch

        def watched() -> None:
            nonlocal peak
            dispatch()
            waiting = sum(w.size for q in budget._waiting.values() for w in q if not w.fan_out)
            peak = max(peak, waiting)

        budget._dispatch = watched  # type: ignore[method-assign]
        try:
            for ch in channels:  # 3 unread answers: room for one fan-out, not for it and an answer
                call = ch.stream_stream(SOTW)(metadata=bearer(hog), timeout=600)
                await call.write(_syncz().SerializeToString())
            await until(lambda: budget.held(_key(hog)) == 3 * size, "the hog's 3 answers held")
            assert budget.total - budget.used >= estimate > budget.total - budget.used - size
            outs = await asyncio.gather(*(ads_call(s.address, [_syncz()], metadata=bearer(t), timeout=60)
                                          for t in RUNS[2:22]))
            assert all(o.code == grpc.StatusCode.OK for o in outs), [o for o in outs if not o.ok][:1]
            # Observed: 20 MiB (every merged answer waited for room while the next newcomer's fan-out ran).
            assert peak <= budget.total, f"{peak / size:.0f} merged answers of {size >> 10} KiB waited at once"
        finally:
            budget._dispatch = dispatch  # type: ignore[method-assign]
            for ch in channels:
                await ch.close()


async def test_a_fan_out_as_large_as_the_fan_out_half_is_not_starved_by_smaller_ones() -> None:
    """Fan-outs together reserve at most half the budget, and a fan-out waiter that would pass it is skipped (not
    head of line) so that answers keep flowing. But smaller fan-outs are not held back for it either: while others'
    small fan-outs (one proxy's config_dump; tokens istiod refuses reserve too) overlap, a fan-out whose estimate
    is the whole half (a big mesh's syncz: min(estimate, share)) never fits and is refused at its deadline."""
    budget = SendBudget(100, slow_reader_seconds=60.0)
    stop = asyncio.Event()
    small_grants = 0

    async def small(caller: str) -> None:
        nonlocal small_grants
        while not stop.is_set():
            async with budget.hold(caller, 10, 30.0, fan_out=True):
                small_grants += 1
                await asyncio.sleep(0.01)  # the replicas' answer time

    async def big() -> int:
        async with budget.hold("big-mesh-syncz", 50, 30.0, fan_out=True):
            return budget.fan_out_used

    async with budget.hold("seed", 10, 1.0, fan_out=True):  # one small fan-out in flight as the big one asks
        attackers = [asyncio.create_task(small(f"random-{i}")) for i in range(3)]
        asking = asyncio.create_task(big())
        await until(lambda: small_grants >= 3, "the small fan-outs under way")
    try:
        # Observed: ResourceExhausted "had no room for this request's fan-out" at its deadline, small ones granted.
        assert await asking == 50
    finally:
        stop.set()
        await asyncio.gather(*attackers, return_exceptions=True)


async def test_a_caller_holding_room_is_not_starved_by_a_stream_of_new_keys() -> None:
    """Turns go to the least recently served caller, and a key with nothing held or waiting is forgotten, so it
    counts as served before everyone. In forward mode a key is a token's fingerprint, which nothing checks before
    the fan-out: a client with no valid credential (random tokens, each refused by istiod after its fan-out) is a
    new caller on every call. A caller that holds room meanwhile (an answer being read on one stream, a fan-out
    waiting on another: a dashboard, an identity-mode SPIFFE id) waited behind every one of them."""
    budget = SendBudget(100, slow_reader_seconds=60.0)
    stop = asyncio.Event()
    grants = 0

    async def attacker(i: int) -> None:
        nonlocal grants
        n = 0
        while not stop.is_set():
            n += 1
            async with budget.hold(f"random-{i}-{n}", 40, 30.0, fan_out=True):  # a new key per call
                grants += 1
                await asyncio.sleep(0.01)  # istiod's answer time (its refusal)

    async def fan_out() -> int:
        async with budget.hold("dashboard", 40, 30.0, fan_out=True):
            return grants

    async with budget.hold("dashboard", 10, 1.0):  # its answer on another stream, being read
        attackers = [asyncio.create_task(attacker(i)) for i in range(3)]
        try:
            await until(lambda: grants >= 3, "the attackers' fan-outs under way")
            asking = asyncio.create_task(fan_out())
            started = grants
            # Observed: ResourceExhausted "had no room for this request's fan-out" at its deadline, every turn taken by
            # a new key.
            assert await asking <= started + 3  # at most one turn of each key already waiting
        finally:
            stop.set()
            await asyncio.gather(*attackers, return_exceptions=True)
