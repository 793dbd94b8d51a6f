"""Coalescing and the TTL cache: never mix credentials, never serve past the TTL (no timing assertions)."""

from __future__ import annotations

import asyncio
import time

import pytest
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.status.v3 import csds_pb2

from istioctl_proxy import client
from istioctl_proxy.auth import Caller
from istioctl_proxy.coalesce import Coalescer, FlightKey
from istioctl_proxy.sim.simulator import SimProxy, make_mesh

from . import ads_client
from .helpers import TOKENS, stack


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def key(caller: str, names: tuple[str, ...] = ()) -> FlightKey:
    return FlightKey(caller, "istio.io/debug/syncz", names, b"req")


# -- the Coalescer on its own ---------------------------------------------------------------------------


async def test_identical_concurrent_calls_share_one_flight() -> None:
    c: Coalescer[str] = Coalescer()
    gate = asyncio.Event()
    runs = 0

    async def work() -> str:
        nonlocal runs
        runs += 1
        await gate.wait()
        return "answer"

    waiters = [asyncio.create_task(c.run(key("bearer:a"), work)) for _ in range(20)]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*waiters) == ["answer"] * 20
    assert runs == 1 and c.stats.flights == 1 and c.stats.joined == 19


async def test_different_credentials_never_share_a_flight_or_a_cache_entry() -> None:
    clock = Clock()
    c: Coalescer[str] = Coalescer(ttl=60, clock=clock)
    gate = asyncio.Event()

    def work_for(who: str):  # type: ignore[no-untyped-def]
        async def work() -> str:
            await gate.wait()
            return f"data fetched with {who}'s credentials"
        return work

    callers = ["bearer:aaa", "bearer:bbb", "spiffe://cluster.local/ns/ns-1/sa/default"]
    tasks = {who: asyncio.create_task(c.run(key(who), work_for(who))) for who in callers}
    await asyncio.sleep(0)
    gate.set()
    for who, task in tasks.items():
        assert await task == f"data fetched with {who}'s credentials"
    assert c.stats.flights == 3 and c.stats.joined == 0
    # Cached per caller too: each caller gets back its own entry, never another's.
    for who in callers:
        assert await c.run(key(who), work_for("nobody")) == f"data fetched with {who}'s credentials"
    assert c.stats.hits == 3


def test_the_key_always_carries_the_caller_credential_key() -> None:
    a, b = Caller("bearer:x", token="token-a"), Caller("bearer:x", token="token-b")
    assert a.key != b.key  # the key is the token's fingerprint, not the display principal
    assert FlightKey(a.key, "t", (), b"r") != FlightKey(b.key, "t", (), b"r")
    assert "token-a" not in a.key


async def test_cache_serves_before_ttl_and_never_at_or_after_it() -> None:
    clock = Clock()
    c: Coalescer[int] = Coalescer(ttl=2.0, clock=clock)
    runs = 0

    async def work() -> int:
        nonlocal runs
        runs += 1
        return runs

    assert await c.run(key("bearer:a"), work) == 1
    clock.now += 1.999
    assert await c.run(key("bearer:a"), work) == 1  # within the TTL: cached
    clock.now += 0.001  # exactly at the TTL: expired
    assert await c.run(key("bearer:a"), work) == 2
    clock.now += 5
    assert await c.run(key("bearer:a"), work) == 3
    assert len(c) == 1


async def test_ttl_counts_from_when_the_fan_out_started() -> None:
    clock = Clock()
    c: Coalescer[str] = Coalescer(ttl=1.0, clock=clock)

    async def slow() -> str:
        clock.now += 1.5  # the answer took longer than the TTL: it is already too old to keep
        return "old"

    assert await c.run(key("bearer:a"), slow) == "old"
    assert len(c) == 0

    async def half() -> str:
        clock.now += 0.6
        return "fresh"

    assert await c.run(key("bearer:a"), half) == "fresh"
    clock.now += 0.39
    assert await c.run(key("bearer:a"), half) == "fresh"  # 0.99 s after the start: still valid
    clock.now += 0.01
    runs_before = c.stats.flights
    await c.run(key("bearer:a"), half)
    assert c.stats.flights == runs_before + 1


async def test_ttl_zero_coalesces_but_never_caches() -> None:
    c: Coalescer[int] = Coalescer(ttl=0)
    runs = 0

    async def work() -> int:
        nonlocal runs
        runs += 1
        return runs

    assert [await c.run(key("bearer:a"), work) for _ in range(3)] == [1, 2, 3]
    assert len(c) == 0


async def test_errors_reach_every_waiter_and_are_not_cached() -> None:
    c: Coalescer[str] = Coalescer(ttl=60)
    gate = asyncio.Event()
    calls = 0

    async def failing() -> str:
        nonlocal calls
        calls += 1
        await gate.wait()
        raise RuntimeError("istiod said no")

    tasks = [asyncio.create_task(c.run(key("bearer:a"), failing)) for _ in range(3)]
    await asyncio.sleep(0)
    gate.set()
    for task in tasks:
        with pytest.raises(RuntimeError):
            await task
    assert calls == 1 and len(c) == 0

    async def ok() -> str:
        return "ok"

    assert await c.run(key("bearer:a"), ok) == "ok"


async def test_uncacheable_answers_are_shared_but_not_kept() -> None:
    c: Coalescer[str] = Coalescer(ttl=60, cacheable=lambda v: v != "partial")

    async def partial() -> str:
        return "partial"

    await c.run(key("bearer:a"), partial)
    assert len(c) == 0


async def test_a_caller_giving_up_does_not_cancel_the_others() -> None:
    c: Coalescer[str] = Coalescer()
    gate = asyncio.Event()

    async def work() -> str:
        await gate.wait()
        return "done"

    leader = asyncio.create_task(c.run(key("bearer:a"), work))
    follower = asyncio.create_task(c.run(key("bearer:a"), work))
    await asyncio.sleep(0)
    leader.cancel()
    await asyncio.sleep(0)
    gate.set()
    assert await follower == "done"


async def test_cache_is_bounded_in_entries_and_bytes() -> None:
    c: Coalescer[bytes] = Coalescer(ttl=60, max_entries=3, max_bytes=100, size=len)

    def body(n: int):  # type: ignore[no-untyped-def]
        async def work() -> bytes:
            return b"x" * n
        return work

    for i in range(5):
        await c.run(key(f"bearer:{i}"), body(10))
    assert len(c) == 3
    await c.run(key("bearer:big"), body(90))
    assert c.cached_bytes <= 100
    await c.run(key("bearer:huge"), body(1000))  # larger than the whole budget: never kept
    assert c.cached_bytes <= 100 and len(c) <= 3


async def test_disabled_runs_every_call() -> None:
    c: Coalescer[int] = Coalescer(enabled=False, ttl=60)
    runs = 0

    async def work() -> int:
        nonlocal runs
        runs += 1
        mine = runs
        await asyncio.sleep(0)
        return mine

    results = await asyncio.gather(*(c.run(key("bearer:a"), work) for _ in range(4)))
    assert sorted(results) == [1, 2, 3, 4]


# -- through the proxy, over real gRPC ------------------------------------------------------------------


def _ids(resp: discovery_pb2.DiscoveryResponse) -> set[str]:
    out = set()
    for res in resp.resources:
        cfg = csds_pb2.ClientConfig()
        assert res.Unpack(cfg)
        out.add(cfg.node.id)
    return out


async def test_proxy_coalesces_identical_concurrent_syncz() -> None:
    mesh = make_mesh(3, 12, tokens=TOKENS)
    for r in mesh:
        r.faults.latency = 0.3  # long enough that all calls overlap
    async with stack(mesh=mesh) as s:
        before = [r.requests for r in s.replicas]
        results = await asyncio.gather(*(ads_client.request(s.target(), client.SYNCZ) for _ in range(8)))
        everyone = {p.id for r in s.replicas for p in r.proxies}
        assert all(_ids(resp) == everyone for resp, _ in results)
        after = [r.requests for r in s.replicas]
        # Coalesced: far fewer upstream calls than callers (one in the common case).
        assert all(a - b < 8 for a, b in zip(after, before, strict=True))


async def test_proxy_never_shares_answers_across_tokens_concurrent_or_cached() -> None:
    mesh = make_mesh(3, 12, tokens=TOKENS)
    for r in mesh:
        r.faults.latency = 0.2
    async with stack(mesh=mesh, cache_ttl=60.0) as s:
        admin, ns1, ns2 = s.target(), s.target("ns-1-token", "ns-1"), s.target("ns-2-token", "ns-2")
        everyone = {p.id for r in s.replicas for p in r.proxies}
        only = {ns: {p.id for r in s.replicas for p in r.proxies if p.namespace == ns} for ns in ("ns-1", "ns-2")}
        for _ in range(2):  # first round concurrent (coalescing), second round from the cache
            targets = (admin, ns1, ns2, admin, ns1)
            results = await asyncio.gather(*(ads_client.request(t, client.SYNCZ) for t in targets))
            got = [_ids(resp) for resp, _ in results]
            assert got == [everyone, only["ns-1"], only["ns-2"], everyone, only["ns-1"]]


async def test_proxy_cache_is_per_caller_and_expires() -> None:
    async with stack(3, 12, cache_ttl=60) as s:
        # The cache's clock, moved on by the test: a loaded machine cannot make the TTL pass unseen.
        skipped = [0.0]
        s.proxy.service.aggregator.coalescer._clock = lambda: time.monotonic() + skipped[0]
        first, _ = await ads_client.request(s.target(), client.SYNCZ)
        requests = [r.requests for r in s.replicas]
        again, _ = await ads_client.request(s.target(), client.SYNCZ)
        assert [r.requests for r in s.replicas] == requests  # served from the cache
        assert _ids(again) == _ids(first)
        # A different token is a different cache entry: it goes upstream.
        await ads_client.request(s.target("ns-1-token", "ns-1"), client.SYNCZ)
        assert [r.requests for r in s.replicas] != requests
        # New data upstream; after the TTL the proxy must show it.
        s.replicas[0].proxies.append(SimProxy("newcomer", "ns-1", states={"CDS": "SYNCED"}))
        s.replicas[0].invalidate()
        skipped[0] = 50.0
        stale, _ = await ads_client.request(s.target(), client.SYNCZ)
        assert "newcomer.ns-1" not in _ids(stale)  # not yet 60 s old: still the cached answer
        skipped[0] = 60.0
        fresh, _ = await ads_client.request(s.target(), client.SYNCZ)
        assert "newcomer.ns-1" in _ids(fresh)


async def test_identity_mode_principals_never_share() -> None:
    async with stack(3, 12, identity=True, cache_ttl=60.0) as s:
        assert s.pki is not None
        admin = s.target(leaf=s.pki.client("istio-system"))
        ns1 = s.target(leaf=s.pki.client("ns-1"), namespace="ns-1")
        everyone = {p.id for r in s.replicas for p in r.proxies}
        ns1_only = {p.id for r in s.replicas for p in r.proxies if p.namespace == "ns-1"}
        for _ in range(2):
            a, _ = await ads_client.request(admin, client.SYNCZ)
            b, _ = await ads_client.request(ns1, client.SYNCZ)
            assert _ids(a) == everyone and _ids(b) == ns1_only


async def test_no_coalesce_flag_sends_every_call_upstream() -> None:
    async with stack(2, 4, coalesce=False) as s:
        before = sum(r.requests for r in s.replicas)
        await asyncio.gather(*(ads_client.request(s.target(), client.SYNCZ) for _ in range(3)))
        assert sum(r.requests for r in s.replicas) - before == 6


async def test_a_caller_never_joins_a_flight_that_outlasts_its_deadline() -> None:
    """A flight started with a long deadline must not make a hurried caller wait past its own."""
    from istioctl_proxy.coalesce import COALESCED, OWN, Coalescer

    c: Coalescer[str] = Coalescer()
    release = asyncio.Event()

    async def slow() -> str:
        await release.wait()
        return "slow"

    async def fast() -> str:
        return "fast"

    loop = asyncio.get_running_loop()
    long_flight = asyncio.ensure_future(c.serve("k", slow, deadline=loop.time() + 30))
    await asyncio.sleep(0)
    assert await c.serve("k", fast, deadline=loop.time() + 1) == ("fast", OWN)
    joiner = asyncio.ensure_future(c.serve("k", fast, deadline=loop.time() + 60))
    await asyncio.sleep(0)
    release.set()
    assert await long_flight == ("slow", OWN)
    assert await joiner == ("slow", COALESCED)
