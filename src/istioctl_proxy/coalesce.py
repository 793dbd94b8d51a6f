"""Request coalescing and a short-TTL answer cache in front of the fan-out.

Many operators (or dashboards) asking for the same thing at once must not multiply the load on istiod:
identical concurrent requests share one fan-out ("single flight"), and with `--cache-ttl` an answer is
reused for a few seconds. Both are keyed by `FlightKey`, which always carries the caller's credential key
(auth.Caller.key: a token fingerprint or a SPIFFE principal) next to everything that shapes the upstream
request — so a caller is only ever handed bytes that its own credentials fetched, never another's.

Bounded on purpose: at most `max_entries` answers and `max_bytes` of bodies are kept, expired answers are
dropped as soon as anyone looks, and nothing is cached longer than the TTL measured from the moment the
fan-out *started* (the data cannot be older than that).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
MiB = 1024 * 1024
# How a call was served (the values match metrics.COALESCED / metrics.CACHED).
OWN, COALESCED, CACHED = "", "coalesced", "cached"


@dataclass(frozen=True)
class FlightKey:
    """Everything that decides an answer. `caller` is first so a key can never be shared across credentials."""

    caller: str  # auth.Caller.key
    type_url: str
    resource_names: tuple[str, ...]
    upstream_request: bytes  # the deterministic DiscoveryRequest sent upstream: type URL, names and node
    scope: str = ""  # identity mode: the namespace the merge filters to
    detail: Hashable = ()  # anything else the caller of the coalescer wants to separate on


@dataclass
class CoalesceStats:
    """Counters of what the coalescer saved (for tests and metrics)."""

    flights: int = 0  # fan-outs actually run
    joined: int = 0  # callers that shared a fan-out already in flight
    hits: int = 0  # callers answered from the cache
    evictions: int = 0


@dataclass
class _Entry(Generic[T]):
    value: T
    started: float  # when the fan-out that produced it began
    size: int


class Coalescer(Generic[T]):
    """Single-flight per key, plus an optional TTL cache of successful answers.

    `cacheable(value)` lets the owner refuse to cache some answers (partial ones, for instance);
    `size(value)` is what counts against `max_bytes`. `enabled=False` turns both off (every call runs).
    """

    def __init__(
        self,
        *,
        ttl: float = 0.0,
        enabled: bool = True,
        max_entries: int = 64,
        max_bytes: int = 64 * MiB,
        size: Callable[[T], int] = lambda _v: 0,
        cacheable: Callable[[T], bool] = lambda _v: True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl < 0:
            raise ValueError("ttl must be >= 0")
        self.ttl = ttl
        self.enabled = enabled
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._size = size
        self._cacheable = cacheable
        self._clock = clock
        self._flights: dict[Hashable, asyncio.Task[T]] = {}
        self._deadlines: dict[Hashable, float] = {}  # when each flight's work gives up
        self._cache: OrderedDict[Hashable, _Entry[T]] = OrderedDict()
        self._bytes = 0
        self.stats = CoalesceStats()

    @property
    def cached_bytes(self) -> int:
        """Bytes of the results held in the cache now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._cache)

    async def run(self, key: Hashable, work: Callable[[], Awaitable[T]]) -> T:
        """`serve` without the how-it-was-served tag."""
        return (await self.serve(key, work))[0]

    async def serve(
        self, key: Hashable, work: Callable[[], Awaitable[T]], deadline: float | None = None
    ) -> tuple[T, str]:
        """The answer, and how it was had: OWN (this call's fan-out), COALESCED or CACHED.

        `deadline` (on the coalescer's clock) is when this caller's work would give up. A caller joins a
        flight only if that flight ends no later than its own deadline, so a flight started with a long
        deadline can never make a hurried caller miss its own.
        """
        if not self.enabled:
            self.stats.flights += 1
            return await work(), OWN
        now = self._clock()
        self._expire(now)
        entry = self._cache.get(key)
        if entry is not None:
            self._cache.move_to_end(key)
            self.stats.hits += 1
            return entry.value, CACHED
        task = self._flights.get(key)
        kind = COALESCED
        if task is not None and deadline is not None and self._deadlines.get(key, 0.0) > deadline:
            # The flight in the air may outlast this caller: answer it with its own, unshared fan-out.
            self.stats.flights += 1
            return await work(), OWN
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fly(key, work, now))
            task.add_done_callback(_consume)
            self._flights[key] = task
            self._deadlines[key] = deadline if deadline is not None else float("inf")
            self.stats.flights += 1
            kind = OWN
        else:
            self.stats.joined += 1
        # shield: one caller giving up (deadline, disconnect) must not cancel the answer others wait for.
        return await asyncio.shield(task), kind

    async def _fly(self, key: Hashable, work: Callable[[], Awaitable[T]], started: float) -> T:
        try:
            value = await work()
        finally:
            # Leave the flight table before anyone can see the result: later arrivals go to the cache or
            # start a new flight, never join a finished one.
            self._flights.pop(key, None)
            self._deadlines.pop(key, None)
        if self.ttl > 0 and self._cacheable(value):
            self._store(key, _Entry(value, started, self._size(value)))
        return value

    def _store(self, key: Hashable, entry: _Entry[T]) -> None:
        if entry.size > self.max_bytes or self._clock() - entry.started >= self.ttl:
            return  # too big to keep, or already as old as the TTL allows
        old = self._cache.pop(key, None)
        if old is not None:
            self._bytes -= old.size
        self._cache[key] = entry
        self._bytes += entry.size
        while self._cache and (len(self._cache) > self.max_entries or self._bytes > self.max_bytes):
            _, dropped = self._cache.popitem(last=False)
            self._bytes -= dropped.size
            self.stats.evictions += 1

    def _expire(self, now: float) -> None:
        # Strictly less than the TTL: an entry is never served at or past started + ttl.
        stale = [k for k, e in self._cache.items() if now - e.started >= self.ttl]
        for k in stale:
            self._bytes -= self._cache.pop(k).size

    def clear(self) -> None:
        """Drop every cached result (flights in progress are unaffected)."""
        self._cache.clear()
        self._bytes = 0


def _consume(task: asyncio.Task[T]) -> None:
    # If every waiter gave up, nobody reads the outcome: read it here so asyncio does not log it as lost.
    if not task.cancelled():
        task.exception()


__all__ = ["CACHED", "COALESCED", "OWN", "CoalesceStats", "Coalescer", "FlightKey"]
