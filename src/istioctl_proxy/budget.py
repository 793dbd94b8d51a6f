"""The send budget: bytes of answers handed to gRPC and not yet taken, and of fan-outs in flight, per caller."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from .errors import ResourceExhausted

MiB = 1024 * 1024


@dataclass
class _Hold:
    caller: str
    size: int
    since: float
    evicted: asyncio.Future[str]  # set to the cut's reason
    evictable: bool = True  # an answer handed to gRPC; a fan-out's reservation is never cut
    pinned: bool = False  # its sender pinned it (`SendBudget.pin`) when it was cut


@dataclass
class _Pin:
    caller: str
    size: int
    until: float  # monotonic: no later than its connection's end
    pooled: int  # bytes in the pinned pool; the rest (the pool was full) still counted in `used`, the overflow


@dataclass
class _Waiter:
    caller: str
    size: int
    seq: int  # arrival order: FIFO within a caller
    granted: asyncio.Future[_Hold]
    fan_out: bool = False
    arrived: int = 0  # `SendBudget.grants` when it came: a new caller's turn
    oversized: bool = False  # an answer larger than the budget (held, and pinned, as the whole budget)


# Cut reasons (istioctl_proxy_streams_cut_total{reason}) of the budget's refusals and evictions.
SLOW_READER, SEND_BUDGET, CALLER_SHARE, FANOUT_BUDGET, UNREAD = (
    "slow_reader", "send_budget", "send_budget_caller_share", "send_budget_fanout", "send_budget_unread")


@dataclass
class SendBudget:
    """Bytes of answers handed to gRPC and not yet taken by their callers, and of fan-outs in flight.

    Each stream has at most one answer in flight (the next write waits for the previous one). Holds and
    waiters are kept per caller (`auth.Caller.budget_key`): room that frees goes to the callers waiting in
    round-robin order (least recently served first; FIFO within one caller; answers before fan-outs'
    reservations), and while other callers wait (who could be served), a caller holding more than its share
    (`share`, half the budget; its pins count) gets no more. Answers that sat unread
    for `slow_reader_seconds` while someone waits for room are cut, the biggest holder's first: one caller's
    many unread streams cannot starve another caller. A hold is stalled only once it is older than
    `slow_reader_seconds` plus its size at `min_bytes_per_second` (a big answer on a slow link takes a while).

    Fan-out reservations together hold at most the share: answers always have the other half.

    A cut answer is not freed: gRPC Python cannot reset one stream, so its bytes may stay in gRPC's buffer until
    the connection goes. Its sender `pin`s it: for `pin_seconds` (an upper bound of its connection's life) it is
    charged to its caller, in a pinned pool twice as large as the budget (`pool`; answers' memory: at most three
    times the budget, and what one answer larger than the budget has past it: such an answer is granted only while
    nothing is pinned). A caller whose pinned bytes reach its share is refused at once: one caller pins less than
    its share plus one answer, so the pool keeps room for a whole answer past any one caller's pins. Pins past
    the pool keep their room in `used` (the overflow, taken back by the pool as it frees), and only up to the share
    can be cut there: so an answer is granted only while every answer in flight could still be pinned
    (`pin_room`), and answers that could not wait (a big one while never-reading callers fill the pool) instead of
    freezing every other caller behind a full live budget. With enough identities the room still runs out (two
    refuse answers over the share, three every answer: memory before availability); it comes back as the pins
    expire.
    """

    total: int
    slow_reader_seconds: float
    on_change: Callable[[int], None] = lambda used: None
    on_cut: Callable[[str], None] = lambda reason: None  # a refusal or an eviction, by reason
    min_bytes_per_second: float = 1024 * 1024
    pin_seconds: float = 3600.0
    on_pinned: Callable[[int], None] = lambda pinned: None  # bytes in the pinned pool
    used: int = 0
    pinned: int = 0  # bytes in the pinned pool
    fan_out_used: int = 0  # bytes of fan-out reservations (within `used`)
    overflow: int = 0  # bytes of pins past the pool (within `used`)
    answers_used: int = 0  # bytes of answers in flight, not yet pinned (within `used`)
    grants: int = 0  # holds granted so far (tests wait on it)
    _holds: dict[str, list[_Hold]] = field(default_factory=dict)  # per caller, oldest first
    _held: collections.Counter[str] = field(default_factory=collections.Counter)  # bytes per caller
    _waiting: dict[str, collections.deque[_Waiter]] = field(default_factory=dict)  # per caller, FIFO
    _served: dict[str, int] = field(default_factory=dict)  # caller → `grants` at its last grant
    _seq: int = 0
    _pins: collections.deque[_Pin] = field(default_factory=collections.deque)  # oldest first
    _pinned_by: collections.Counter[str] = field(default_factory=collections.Counter)  # pinned bytes per caller
    _expiry: asyncio.TimerHandle | None = None

    @property
    def share(self) -> int:
        """Bytes one caller may hold while others wait for room (it always may hold one answer)."""
        return self.total // 2

    @property
    def pool(self) -> int:
        """Size of the pinned pool: one caller's pins (less than its share and one answer, so at most 1.5 times
        the budget) and, with the overflow's share, room for a whole answer past them."""
        return 2 * self.total

    def waiting(self, caller: str | None = None) -> int:
        """Holds waiting for room (of `caller`, or of everyone)."""
        if caller is not None:
            return len(self._waiting.get(caller, ()))
        return sum(len(q) for q in self._waiting.values())

    def held(self, caller: str) -> int:
        """Bytes `caller` holds now."""
        return self._held[caller]

    def pinned_by(self, caller: str) -> int:
        """Bytes of `caller`'s cut answers that may still be in gRPC's buffers."""
        return self._pinned_by[caller]

    def pin(self, held: asyncio.Future[str], size: int) -> None:
        """The answer of the hold whose cut future is `held` was cut but may stay in gRPC's buffer: keep it
        charged to its caller for `pin_seconds` (call before the hold ends)."""
        hold = next((h for hs in self._holds.values() for h in hs if h.evicted is held), None)
        if hold is None or hold.pinned or not hold.evictable:  # a fan-out's reservation is no answer in gRPC's buffer
            return
        hold.pinned = True
        self.answers_used -= hold.size
        size = min(size, hold.size)
        # What the pool cannot take keeps its room in the live budget: a pin is split, so that `pin_room`, which
        # counts both, is exactly what can still be pinned.
        pooled = max(0, min(size, self.pool - self.pinned))
        self._pins.append(_Pin(hold.caller, size, time.monotonic() + self.pin_seconds, pooled))
        self._pinned_by[hold.caller] += size
        if pooled:
            self.pinned += pooled
            self.on_pinned(self.pinned)
        if size > pooled:
            self.used += size - pooled
            self.overflow += size - pooled
            self.on_change(self.used)
        if self._expiry is None:
            self._expiry = asyncio.get_running_loop().call_later(self.pin_seconds, self._expire)

    def _expire(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        now = time.monotonic()
        changed = False
        while self._pins and self._pins[0].until <= now:
            pin = self._pins.popleft()
            self._pinned_by[pin.caller] -= pin.size
            if self._pinned_by[pin.caller] <= 0:
                del self._pinned_by[pin.caller]
                self._tidy(pin.caller)
            if pin.pooled:
                self.pinned -= pin.pooled
                self.on_pinned(self.pinned)
            if pin.size > pin.pooled:
                self.used -= pin.size - pin.pooled
                self.overflow -= pin.size - pin.pooled
                changed = True
        # The pool's freed room takes the overflow of the pins still alive: else it kept its room in the live budget
        # (refusing answers over the rest) for its whole life while the pool stood empty.
        room = self.pool - self.pinned
        for pin in self._pins:
            if room <= 0 or not self.overflow:
                break
            move = min(room, pin.size - pin.pooled)
            if move > 0:
                pin.pooled += move
                self.pinned += move
                self.used -= move
                self.overflow -= move
                room -= move
                changed = True
        if changed:
            self.on_pinned(self.pinned)
            self.on_change(self.used)
        if self._pins:
            delay = max(0.0, self._pins[0].until - now)
            self._expiry = asyncio.get_running_loop().call_later(delay, self._expire)
        self._dispatch()

    @property
    def pin_room(self) -> int:
        """Bytes of answers that could still be pinned if cut: the pool's room and the overflow's (the share)."""
        return self.pool - self.pinned + max(0, self.share - self.overflow)

    def _pinnable(self, waiter: _Waiter) -> bool:
        if not (self.pinned or self.overflow):
            return True
        # An answer larger than the budget would be pinned as the budget while more stays in gRPC's buffer: one at a
        # time, while nothing else is pinned, or the pool would admit answers of any size (red team stop 22, C).
        return not waiter.oversized and self.answers_used + waiter.size <= self.pin_room

    def _unread(self, caller: str) -> bool:
        return self._pinned_by[caller] >= max(self.share, 1)

    @contextlib.asynccontextmanager
    async def hold(
        self, caller: str, size: int, wait: float, *, fan_out: bool = False
    ) -> AsyncIterator[asyncio.Future[str]]:
        """Room for `size` bytes of `caller` (waiting up to `wait` s); yields a future set (to the reason) if
        this hold is cut.

        `fan_out`: a reservation for answers still to come (never cut as a slow reader; refused with its
        own reason and message).
        """
        # Larger than the whole budget: it takes all of it, alone (a fan-out: all the fan-outs' half).
        oversized = not fan_out and size > self.total
        size = min(size, self.share if fan_out else self.total)
        loop = asyncio.get_running_loop()
        self._seq += 1
        waiter = _Waiter(caller, size, self._seq, loop.create_future(), fan_out, self.grants, oversized)
        if self._unread(caller):
            raise self._unread_refusal(waiter)
        queue = self._waiting.setdefault(caller, collections.deque())
        # A caller's answers go before its fan-outs: an answer waiting to be sent is memory held already, a
        # fan-out makes more (and its answer would wait behind the fan-outs queued before it).
        first_fan_out = next((i for i, w in enumerate(queue) if w.fan_out), len(queue)) if not fan_out else len(queue)
        queue.insert(first_fan_out, waiter)
        self._dispatch()
        deadline = time.monotonic() + wait
        try:
            while not waiter.granted.done():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._refusal(waiter, wait, fan_out)
                # Wake up at least every slow_reader_seconds: by then a held answer may be old enough to cut.
                await asyncio.wait({waiter.granted}, timeout=min(left, self.slow_reader_seconds))
                if not waiter.granted.done():
                    self._dispatch()
        except BaseException:
            if waiter.granted.done() and waiter.granted.exception() is None:  # granted as we were cancelled
                self._release(waiter.granted.result())
            elif not waiter.granted.done():
                self._forget(waiter)
                self._dispatch()  # it may have blocked the line
            raise
        held = waiter.granted.result()  # raises the refusal of a caller whose pinned bytes reached its share
        try:
            yield held.evicted
        finally:
            self._release(held)

    def _unread_refusal(self, waiter: _Waiter) -> ResourceExhausted:
        self.on_cut(UNREAD)
        return ResourceExhausted(
            f"this caller's earlier answers were cut unread and may still wait in the proxy's buffers "
            f"({self._pinned_by[waiter.caller] / MiB:.1f} MiB, at least its share of {self.share / MiB:.1f} MiB, "
            f"half of --send-budget-mib) until their connections close: read answers as they come, and try "
            f"again later")

    def _refusal(self, waiter: _Waiter, wait: float, fan_out: bool) -> ResourceExhausted:
        over_share = self._over_share(waiter) and not fan_out
        reason = FANOUT_BUDGET if fan_out else CALLER_SHARE if over_share else SEND_BUDGET
        self.on_cut(reason)
        mib = self.total // MiB
        if fan_out:
            return ResourceExhausted(
                f"the proxy's send budget ({mib} MiB, --send-budget-mib) had no room for this request's fan-out "
                f"(about {waiter.size / MiB:.1f} MiB of replica answers) within its deadline: too many answers "
                "are being fetched or sent; try again later")
        if over_share:
            return ResourceExhausted(
                f"this caller's answers waiting to be read (or cut unread) hold "
                f"{(self._held[waiter.caller] + self._pinned_by[waiter.caller]) / MiB:.1f} MiB: with this "
                f"{waiter.size / MiB:.1f} MiB answer, more than its share ({self.share / MiB:.1f} MiB, half of "
                f"--send-budget-mib) while others wait, for {wait:.0f}s: "
                "read answers as they come")
        if not self._pinnable(waiter):
            own = self._pinned_by[waiter.caller]  # under its share (else refused as unread): still say so
            whose = f"answers left unread ({own / MiB:.1f} MiB of them this caller's)" if own else (
                "answers that other callers left unread")
            what = (f"this answer, larger than --send-budget-mib ({mib} MiB), is sent only while none is, and could "
                    f"not be" if waiter.oversized else f"this {waiter.size / MiB:.1f} MiB answer could not be")
            return ResourceExhausted(
                f"{whose} hold {(self.pinned + self.overflow) / MiB:.1f} MiB of the "
                f"proxy's memory until their connections close; {what} sent within {wait:.0f}s "
                f"(--send-budget-mib {mib}): try again later")
        return ResourceExhausted(
            f"the proxy's send budget ({mib} MiB, --send-budget-mib) stayed full for "
            f"{wait:.0f}s: too many answers are waiting for their callers to read them")

    def _over_share(self, waiter: _Waiter) -> bool:
        held = self._held[waiter.caller] + self._pinned_by[waiter.caller]
        others = len(self._waiting) > (waiter.caller in self._waiting)  # only non-empty queues are kept
        return held > 0 and held + waiter.size > self.share and others

    def _dispatch(self) -> None:
        """Grant room to waiters, round-robin by caller, until the next in line does not fit."""
        for caller in [c for c in self._waiting if self._unread(c)]:
            for w in list(self._waiting[caller]):
                self._forget(w)
                w.granted.set_exception(self._unread_refusal(w))
        while True:
            heads = [q[0] for q in self._waiting.values() if q]
            fair = [w for w in heads if not self._over_share(w)]
            nxt, blocked = self._pick(fair)
            if nxt is None and not blocked and len(fair) < len(heads):
                # Nobody under its share can be served now (none waits, or their answers could not be pinned, or the
                # fan-outs' half is full): the callers over it are not held back for nobody. (Pins count in the
                # share and never leave before they expire: two callers with pins were each other's "others", and
                # both waited out their deadlines on an empty budget.)
                nxt, blocked = self._pick(heads)
            if nxt is None:
                return
            if self.used + nxt.size > self.total:
                # The next in line waits (nobody overtakes it, so large answers are not starved either);
                # stalled answers make room, the biggest holder's first.
                self._evict_slow(self.used + nxt.size - self.total)
                return
            self._forget(nxt)
            held = _Hold(nxt.caller, nxt.size, time.monotonic(), asyncio.get_running_loop().create_future(),
                         evictable=not nxt.fan_out)
            self._holds.setdefault(nxt.caller, []).append(held)
            self._held[nxt.caller] += nxt.size
            self.used += nxt.size
            if nxt.fan_out:
                self.fan_out_used += nxt.size
            else:
                self.answers_used += nxt.size
            self.grants += 1
            self._served[nxt.caller] = self.grants
            nxt.granted.set_result(held)
            self.on_change(self.used)

    def _pick(self, heads: list[_Waiter]) -> tuple[_Waiter | None, bool]:
        """The next of `heads` to grant, or None (and whether the line is blocked for the first in turn)."""
        # An answer that could not be pinned if its caller never read it waits (others pass it): else a cut it could
        # not take would keep its room in the live budget until it expires, freezing every caller.
        # (Only pins shrink that room: without them it is the pool and the share, 2.5 times the live budget.)
        answers = [w for w in heads if not w.fan_out]
        first = min(answers, key=self._turn, default=None)
        if first is not None and not self._pinnable(first) and first.size <= self.pin_room and not first.oversized:
            # It will be pinnable once the answers in flight end (they are read or cut within the send timeout):
            # nobody overtakes it, else a stream of small answers would starve it. (An oversized one only once
            # every pin has expired: it does not hold the line that long.)
            return None, True
        eligible = [w for w in answers if self._pinnable(w)]
        # A fan-out that would take the fan-outs past their half is skipped by answers, not waited for: they always
        # have the other half, whose stalled holders can be cut. Fan-outs wait for it in turn (else a stream of
        # small fan-outs would starve one as large as the half).
        fan_out = min((w for w in heads if w.fan_out), key=self._turn, default=None)
        if fan_out is not None and self.fan_out_used + fan_out.size <= self.share:
            eligible.append(fan_out)
        # Answers before fan-outs, whoever's: an answer is memory held already (its fan-out's reservation has ended),
        # a fan-out makes more; ranked by turn, a finished fan-out's answer would wait behind every newer caller's
        # fan-out, all their merged answers held outside the budget meanwhile.
        return min(eligible, key=lambda w: (w.fan_out, *self._turn(w)), default=None), False

    def _turn(self, waiter: _Waiter) -> tuple[int, int]:
        # Least recently served first, then FIFO. A caller with nothing held or waiting is forgotten: it comes
        # in as served just before it arrived, not before everyone (keys are free in forward mode: a new token
        # per call would otherwise go before every caller holding room).
        served = self._served.get(waiter.caller)
        return (2 * served if served is not None else 2 * waiter.arrived - 1), waiter.seq

    def _forget(self, waiter: _Waiter) -> None:
        queue = self._waiting.get(waiter.caller)
        if queue is not None:
            with contextlib.suppress(ValueError):
                queue.remove(waiter)
            if not queue:
                del self._waiting[waiter.caller]
        self._tidy(waiter.caller)

    def _release(self, held: _Hold) -> None:
        holds = self._holds.get(held.caller, [])
        if held not in holds:
            return
        holds.remove(held)
        if not holds:
            del self._holds[held.caller]
        self._held[held.caller] -= held.size
        if self._held[held.caller] <= 0:
            del self._held[held.caller]
        self.used -= held.size
        if not held.evictable:
            self.fan_out_used -= held.size
        elif not held.pinned:
            self.answers_used -= held.size
        self._tidy(held.caller)
        self.on_change(self.used)
        self._dispatch()

    def _tidy(self, caller: str) -> None:
        # A caller with nothing held or waiting is forgotten: what is kept is bounded by the streams open.
        if caller not in self._holds and caller not in self._waiting and caller not in self._pinned_by:
            self._served.pop(caller, None)

    def _evict_slow(self, needed: int) -> None:
        now = time.monotonic()
        cut = [h for hs in self._holds.values() for h in hs if h.evicted.done()]
        needed -= sum(h.size for h in cut)  # already cut
        # A cut answer will be pinned: cut only what the pool and the overflow can take (else its room would stay
        # taken in the live budget for the pin's life).
        pool = self.pin_room - sum(h.size for h in cut if not h.pinned)
        waiting = {c for c, q in self._waiting.items() if q}
        stalled = [h for hs in self._holds.values() for h in hs
                   if h.evictable and not h.evicted.done()
                   and now - h.since >= self.slow_reader_seconds + h.size / self.min_bytes_per_second]
        for held in sorted(stalled, key=lambda h: (-self._held[h.caller], h.since)):
            if needed <= 0:
                return
            if held.size > pool:
                continue
            pool -= held.size
            over = self._held[held.caller] > self.share and bool(waiting - {held.caller})
            reason = CALLER_SHARE if over else SLOW_READER
            held.evicted.set_result(reason)
            self.on_cut(reason)
            needed -= held.size


__all__ = ["CALLER_SHARE", "FANOUT_BUDGET", "SEND_BUDGET", "SLOW_READER", "UNREAD", "SendBudget"]
