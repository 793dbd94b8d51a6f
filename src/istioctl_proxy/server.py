"""The gRPC front: ADS (SotW and Delta), health and reflection, TLS serving (certificate reload: tls.py).

The servicer is thin: it authenticates the stream from its metadata, holds each stream to its limits
(`StreamLimits`: stream caps, first-message, idle and age timeouts, the send budget), hands each request
to the Aggregator, and ends each stream with the status errors.py's `status_of` gives (`_serve`). Anything
unexpected becomes INTERNAL there, logged with its traceback and counted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeAlias

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2, discovery_pb2
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .aggregator import Aggregator
from .auth import Authenticator, Caller
from .config import Config
from .errors import (
    InvalidRequest,
    ProxyError,
    ResourceExhausted,
    StreamTimeout,
    StreamTooOld,
    status_of,
)
from .fanout import upstream_timeout
from .metrics import Metrics
from .model import Merge, Result
from .tls import CertificateReloader
from .upstream import LARGE_MESSAGE_OPTIONS
from .wire import syncz_node_id

log = logging.getLogger(__name__)

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
FAILED_REPLICAS_KEY = "x-istioctl-proxy-failed-replicas"
MiB = 1024 * 1024

Context: TypeAlias = "grpc.aio.ServicerContext[object, object]"


def _remaining(context: Context) -> float | None:
    left = context.time_remaining()
    return None if left is None or left > 1e8 else float(left)


@dataclass(frozen=True)
class StreamLimits:
    """What one stream, and all of them together, may hold (flags in config.py, whose defaults these are)."""

    first_message_timeout: float = Config.first_message_timeout
    idle_timeout: float = Config.stream_idle_timeout
    max_age: float = Config.max_stream_age
    max_streams: int = Config.max_streams
    max_streams_per_connection: int = Config.max_streams_per_connection
    send_budget_bytes: int = Config.send_budget_mib * MiB  # gRPC copies each answer it sends: this bounds those copies
    send_timeout: float = Config.send_timeout
    slow_reader_seconds: float = Config.slow_reader_seconds


class _Protocol(Protocol):
    """SotW or Delta: how a stream's raw requests become (type, names, node) and answers become bytes."""

    def decode(self, raw: bytes) -> tuple[str, list[str], base_pb2.Node | None]: ...

    def encode(self, result: Result) -> bytes: ...


class _Sotw:
    def decode(self, raw: bytes) -> tuple[str, list[str], base_pb2.Node | None]:
        req = discovery_pb2.DiscoveryRequest.FromString(raw)
        return req.type_url, list(req.resource_names), req.node if req.HasField("node") else None

    def encode(self, result: Result) -> bytes:
        return result.body  # the merged bytes are already a serialized DiscoveryResponse


class _Delta:
    def __init__(self) -> None:
        self.subscribed: dict[str, dict[str, None]] = {}  # per type: an ordered set of names

    def decode(self, raw: bytes) -> tuple[str, list[str], base_pb2.Node | None]:
        req = discovery_pb2.DeltaDiscoveryRequest.FromString(raw)
        names = self.subscribed.setdefault(req.type_url, {})
        names.update(dict.fromkeys(req.resource_names_subscribe))
        for n in req.resource_names_unsubscribe:
            names.pop(n, None)
        return req.type_url, list(names), req.node if req.HasField("node") else None

    def encode(self, result: Result) -> bytes:
        return bytes(to_delta(result).SerializeToString())


@dataclass
class _Hold:
    caller: str
    size: int
    since: float
    evicted: asyncio.Future[str]  # set to the cut's reason
    evictable: bool = True  # an answer handed to gRPC; a fan-out's reservation is never cut


@dataclass
class _Waiter:
    caller: str
    size: int
    seq: int  # arrival order: FIFO within a caller
    granted: asyncio.Future[_Hold]
    fan_out: bool = False


# Cut reasons (istioctl_proxy_streams_cut_total{reason}) of the budget's refusals and evictions.
SLOW_READER, SEND_BUDGET, CALLER_SHARE, FANOUT_BUDGET = (
    "slow_reader", "send_budget", "send_budget_caller_share", "send_budget_fanout")


@dataclass
class SendBudget:
    """Bytes of answers handed to gRPC and not yet taken by their callers, and of fan-outs in flight.

    Each stream has at most one answer in flight (the next write waits for the previous one). Holds and
    waiters are kept per caller (`auth.Caller.budget_key`): room that frees goes to the callers waiting in
    round-robin order (least recently served first; FIFO within one caller, its answers before its fan-outs'
    reservations), and while other callers wait, a caller holding more than its share (`share`, half the
    budget) gets no more. Answers that sat unread
    for `slow_reader_seconds` while someone waits for room are cut, the biggest holder's first: one caller's
    many unread streams cannot starve another caller.
    """

    total: int
    slow_reader_seconds: float
    on_change: Callable[[int], None] = lambda used: None
    on_cut: Callable[[str], None] = lambda reason: None  # a refusal or an eviction, by reason
    used: int = 0
    grants: int = 0  # holds granted so far (tests wait on it)
    _holds: dict[str, list[_Hold]] = field(default_factory=dict)  # per caller, oldest first
    _held: collections.Counter[str] = field(default_factory=collections.Counter)  # bytes per caller
    _waiting: dict[str, collections.deque[_Waiter]] = field(default_factory=dict)  # per caller, FIFO
    _served: dict[str, int] = field(default_factory=dict)  # caller → `grants` at its last grant
    _seq: int = 0

    @property
    def share(self) -> int:
        """Bytes one caller may hold while others wait for room (it always may hold one answer)."""
        return self.total // 2

    def waiting(self, caller: str | None = None) -> int:
        """Holds waiting for room (of `caller`, or of everyone)."""
        if caller is not None:
            return len(self._waiting.get(caller, ()))
        return sum(len(q) for q in self._waiting.values())

    def held(self, caller: str) -> int:
        """Bytes `caller` holds now."""
        return self._held[caller]

    @contextlib.asynccontextmanager
    async def hold(
        self, caller: str, size: int, wait: float, *, fan_out: bool = False
    ) -> AsyncIterator[asyncio.Future[str]]:
        """Room for `size` bytes of `caller` (waiting up to `wait` s); yields a future set (to the reason) if
        this hold is cut.

        `fan_out`: a reservation for answers still to come (never cut as a slow reader; refused with its
        own reason and message).
        """
        size = min(size, self.total)  # larger than the whole budget: it takes all of it, alone
        loop = asyncio.get_running_loop()
        self._seq += 1
        waiter = _Waiter(caller, size, self._seq, loop.create_future(), fan_out)
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
            if waiter.granted.done():  # granted as we were cancelled: give it back
                self._release(waiter.granted.result())
            else:
                self._forget(waiter)
                self._dispatch()  # it may have blocked the line
            raise
        held = waiter.granted.result()
        try:
            yield held.evicted
        finally:
            self._release(held)

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
                f"this caller's answers waiting to be read hold {self._held[waiter.caller] // MiB} MiB, more than "
                f"its share ({self.share // MiB} MiB, half of --send-budget-mib) while others wait, for {wait:.0f}s: "
                "read answers as they come")
        return ResourceExhausted(
            f"the proxy's send budget ({mib} MiB, --send-budget-mib) stayed full for "
            f"{wait:.0f}s: too many answers are waiting for their callers to read them")

    def _over_share(self, waiter: _Waiter) -> bool:
        held = self._held[waiter.caller]
        others = len(self._waiting) > (waiter.caller in self._waiting)  # only non-empty queues are kept
        return held > 0 and held + waiter.size > self.share and others

    def _dispatch(self) -> None:
        """Grant room to waiters, round-robin by caller, until the next in line does not fit."""
        while True:
            heads = [q[0] for q in self._waiting.values() if q]
            eligible = [w for w in heads if not self._over_share(w)]
            if not eligible:
                return
            nxt = min(eligible, key=lambda w: (self._served.get(w.caller, -1), w.seq))
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
            self.grants += 1
            self._served[nxt.caller] = self.grants
            nxt.granted.set_result(held)
            self.on_change(self.used)

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
        self._tidy(held.caller)
        self.on_change(self.used)
        self._dispatch()

    def _tidy(self, caller: str) -> None:
        # A caller with nothing held or waiting is forgotten: what is kept is bounded by the streams open.
        if caller not in self._holds and caller not in self._waiting:
            self._served.pop(caller, None)

    def _evict_slow(self, needed: int) -> None:
        now = time.monotonic()
        needed -= sum(h.size for hs in self._holds.values() for h in hs if h.evicted.done())  # already cut
        waiting = {c for c, q in self._waiting.items() if q}
        stalled = [h for hs in self._holds.values() for h in hs
                   if h.evictable and not h.evicted.done() and now - h.since >= self.slow_reader_seconds]
        for held in sorted(stalled, key=lambda h: (-self._held[h.caller], h.since)):
            if needed <= 0:
                return
            over = self._held[held.caller] > self.share and bool(waiting - {held.caller})
            reason = CALLER_SHARE if over else SLOW_READER
            held.evicted.set_result(reason)
            self.on_cut(reason)
            needed -= held.size


@dataclass
class StreamTable:
    """Open streams, in total and per client connection (the peer address names the connection)."""

    limits: StreamLimits
    by_peer: collections.Counter[str] = field(default_factory=collections.Counter)
    total: int = 0

    def admit(self, peer: str) -> tuple[str, str]:
        """("", "") when the stream may open (and it is counted), else (reason, message)."""
        if self.total >= self.limits.max_streams:
            return "max_streams", f"the proxy has {self.total} streams open (--max-streams); try again later"
        if self.by_peer[peer] >= self.limits.max_streams_per_connection:
            return "max_streams_per_connection", (
                f"{self.by_peer[peer]} streams are open on this connection (--max-streams-per-connection)")
        self.total += 1
        self.by_peer[peer] += 1
        return "", ""

    def release(self, peer: str) -> None:
        """Forget a stream that `admit` counted."""
        self.total -= 1
        self.by_peer[peer] -= 1
        if not self.by_peer[peer]:
            del self.by_peer[peer]


class AdsService:
    """StreamAggregatedResources and DeltaAggregatedResources over the Aggregator."""

    def __init__(
        self, aggregator: Aggregator, authenticator: Authenticator, observer: CallObserver | None = None,
        limits: StreamLimits | None = None,
    ) -> None:
        self.aggregator = aggregator
        self.authenticator = authenticator
        self.observer = observer or CallObserver()
        self.limits = limits or StreamLimits()
        self.streams = StreamTable(self.limits)
        self.budget = SendBudget(
            self.limits.send_budget_bytes, self.limits.slow_reader_seconds,
            on_change=self.observer.queued, on_cut=self.observer.cut,
        )
        aggregator.budget = self.budget  # fan-outs reserve room for the answers they will hold, in the same budget

    async def stream(self, requests: object, context: Context) -> None:
        """StreamAggregatedResources (SotW)."""
        # istiod answers each request on the stream afresh (ACK-looking ones too) and never pushes debug
        # types unasked: so one response per request, in order, until the client half-closes.
        await self._serve(context, _Sotw())

    async def delta(self, requests: object, context: Context) -> None:
        """DeltaAggregatedResources: the same answers, as Delta responses of the names subscribed so far."""
        await self._serve(context, _Delta())

    async def _serve(self, context: Context, protocol: _Protocol) -> None:
        """One stream, start to end. Errors end it here with a status; nothing is raised to gRPC.

        context.abort() would raise, and gRPC keeps the AbortError (its traceback, and so every frame's
        requests and answers) on the call's state after the call ends: set the status and return instead.
        """
        try:
            await self._run(context, protocol)
        except Exception as err:  # not CancelledError: the caller hung up, or the server is stopping
            status = status_of(err)
            if status.unexpected:
                log.exception("unexpected error serving %s from %s; the caller gets INTERNAL",
                              type(protocol).__name__, context.peer())
                self.observer.internal_error()
            context.set_code(status.code)
            context.set_details(status.message)

    async def _run(self, context: Context, protocol: _Protocol) -> None:
        peer = context.peer()
        reason, message = self.streams.admit(peer)
        if reason:
            self.observer.cut(reason)
            raise ResourceExhausted(message)
        self.observer.stream_opened()
        try:
            # Headers now, not with the first answer: when a write is cut (a slow reader), grpc.aio would
            # otherwise try to send them again with the status, fail the batch, and never send the status.
            await context.send_initial_metadata(())
            await self._requests(context, protocol)
        finally:
            self.streams.release(peer)
            self.observer.stream_closed()

    async def _requests(self, context: Context, protocol: _Protocol) -> None:
        limits = self.limits
        started = time.monotonic()
        # Who is calling is decided from the metadata before any message is read: a refused caller can make
        # us hold at most one request of --max-request-kib, never decoded.
        caller, refusal = await self._authenticate(context)
        raw = await self._read(context, limits.first_message_timeout, None if refusal else "first_message_timeout")
        if refusal is not None:
            # Refused only now: ending the stream before the client's first write lands makes grpc.aio
            # clients report their own "Internal error from Core" instead of UNAUTHENTICATED.
            self.observer.refused(status_of(refusal).code.name, context.peer())
            raise refusal
        assert caller is not None
        node: base_pb2.Node | None = None
        while raw is not None:
            try:
                type_url, names, sent_node = protocol.decode(raw)
            except DecodeError as err:
                raise InvalidRequest(f"malformed request: {err}") from None
            del raw  # a request is small, but nothing of it outlives its answer
            if sent_node is not None and sent_node.id:
                node = sent_node
            if node is None:
                raise InvalidRequest("missing node information: the first request must carry node.id")
            result = await self._answer(context, caller, type_url, names, node)
            # Per request, not cumulative: the trailer describes the latest answer.
            context.set_trailing_metadata(failed_replicas_trailer(result.failures))
            await self._send(context, protocol, result, caller.budget_key)
            del result
            age_left = limits.max_age - (time.monotonic() - started)
            if age_left <= 0:
                self.observer.cut("max_age")
                raise StreamTooOld(f"the stream is older than {limits.max_age:g}s (--max-stream-age): reconnect")
            if age_left < limits.idle_timeout:
                raw = await self._read(context, age_left, "max_age")
            else:
                raw = await self._read(context, limits.idle_timeout, "idle_timeout")

    async def _authenticate(self, context: Context) -> tuple[Caller | None, ProxyError | None]:
        try:
            return await self.authenticator.authenticate(context), None
        except ProxyError as err:
            return None, err

    async def _read(self, context: Context, timeout: float, reason: str | None) -> bytes | None:
        """The next raw request, or None when the client half-closed (or, for reason None, timed out)."""
        try:
            async with asyncio.timeout(timeout):
                msg = await context.read()
        except TimeoutError:
            if reason is None:
                return None
            self.observer.cut(reason)
            if reason == "max_age":
                raise StreamTooOld(
                    f"the stream reached {self.limits.max_age:g}s (--max-stream-age): reconnect") from None
            which = ("no request within {:g}s of opening the stream (--first-message-timeout)"
                     if reason == "first_message_timeout"
                     else "no request for {:g}s (--stream-idle-timeout)")
            raise StreamTimeout(which.format(timeout)) from None
        if msg is grpc.aio.EOF:
            return None
        assert isinstance(msg, bytes)
        return msg

    async def _answer(
        self, context: Context, caller: Caller, type_url: str, names: list[str], node: base_pb2.Node
    ) -> Result:
        started = time.monotonic()
        try:
            with self.observer.in_flight(type_url):
                result = await self.aggregator.answer(type_url, names, node, caller, _remaining(context))
        except asyncio.CancelledError:
            # The caller hung up (or the server is stopping) mid-call: still one log line and one count.
            self.observer.call(type_url, caller, "CANCELLED", time.monotonic() - started, None)
            raise
        except Exception as err:
            self.observer.call(type_url, caller, status_of(err).code.name, time.monotonic() - started, None)
            raise
        self.observer.call(type_url, caller, "OK", time.monotonic() - started, result)
        return result

    async def _send(self, context: Context, protocol: _Protocol, result: Result, caller: str) -> None:
        """Write one answer within the send budget; a caller that does not read it in time is cut.

        Room is reserved before the answer is encoded for this stream (Delta builds a new message) and handed
        to gRPC (which copies it): a shared merged body is held once, its per-stream copies only within budget.
        """
        limits = self.limits
        # Room is waited for within the caller's deadline (less a margin to say why): past it, the caller would
        # only see its own client's bare DEADLINE_EXCEEDED.
        wait = upstream_timeout(_remaining(context), limits.send_timeout)
        async with self.budget.hold(caller, len(result.body), wait) as evicted:
            write = asyncio.ensure_future(context.write(protocol.encode(result)))
            try:
                done, _ = await asyncio.wait({write, evicted}, timeout=limits.send_timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not write.done():
                    write.cancel()
                    write.add_done_callback(_consume)
            if write in done:
                write.result()
                return
        if evicted.done() and evicted.result() == CALLER_SHARE:
            raise ResourceExhausted(
                f"the answer was not read for {limits.slow_reader_seconds:g}s (--slow-reader-seconds) while other "
                "callers waited for the proxy's send budget and this caller's unread answers held more than its "
                "share (half of --send-budget-mib): read answers as they come"
            )
        if evicted.done():
            raise ResourceExhausted(
                f"the answer was not read for {limits.slow_reader_seconds:g}s while the proxy's send budget "
                "was full (--slow-reader-seconds): read answers as they come"
            )
        self.observer.cut("send_timeout")
        raise ResourceExhausted(f"the answer was not read within {limits.send_timeout:g}s (--send-timeout)")


def _consume(task: asyncio.Future[None]) -> None:
    """A cut write's outcome is known (the stream is being ended): retrieve it so it is not reported."""
    if not task.cancelled():
        task.exception()


# One trailer entry per failed replica, each printable ASCII and bounded, and all of them bounded:
# replicas' error texts are not ours to trust, and gRPC ends a call INTERNAL ("Invalid metadata") on a
# newline or non-ASCII byte in a value, and RESOURCE_EXHAUSTED when trailers outgrow the client's limit.
_TRAILER_VALUE_CHARS = 256
_TRAILER_TOTAL_CHARS = 2048


def printable(text: str) -> str:
    """`text` as printable ASCII: anything else backslash-escaped (\\n, \\xe9, \\u2028)."""
    if text.isascii() and text.isprintable():
        return text
    return "".join(c if " " <= c <= "~" else c.encode("unicode_escape").decode("ascii") for c in text)


def failed_replicas_trailer(failures: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """The x-istioctl-proxy-failed-replicas trailer entries: printable ASCII, each and all bounded."""
    out: list[tuple[str, str]] = []
    total = 0
    for i, (replica, why) in enumerate(failures):
        value = printable(f"{replica}: {why}")
        if len(value) > _TRAILER_VALUE_CHARS:
            value = value[: _TRAILER_VALUE_CHARS - 15] + "... (truncated)"
        if total + len(value) > _TRAILER_TOTAL_CHARS:
            out.append((FAILED_REPLICAS_KEY, f"... and {len(failures) - i} more failed replicas"))
            break
        out.append((FAILED_REPLICAS_KEY, value))
        total += len(value)
    return tuple(out)


def to_delta(result: Result) -> discovery_pb2.DeltaDiscoveryResponse:
    """The same merged answer, each resource wrapped as a named Resource (names as istiod's generators give them)."""
    sotw = discovery_pb2.DiscoveryResponse.FromString(result.body)
    out = discovery_pb2.DeltaDiscoveryResponse(
        type_url=sotw.type_url, nonce=sotw.nonce, system_version_info=sotw.version_info
    )
    if sotw.HasField("control_plane"):
        out.control_plane.CopyFrom(sotw.control_plane)
    plan = result.plan
    for i, res in enumerate(sotw.resources):
        if plan.merge is Merge.SYNCZ:
            name = syncz_node_id(res.SerializeToString())
        elif plan.debug_path:
            name = plan.resource_names[0]
        else:  # config_dump: istiod's dump entries are unnamed
            name = f"{res.type_url.rpartition('/')[2]}/{i}"
        out.resources.add(name=name, version=sotw.version_info, resource=res)
    return out


class CallObserver:
    """One log line per call (by principal: never a token) and, given a Metrics, the call metrics."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics

    def in_flight(self, type_url: str) -> contextlib.AbstractContextManager[None]:
        """Counts the call as in flight while the context is open."""
        return self.metrics.calling(type_url) if self.metrics is not None else contextlib.nullcontext()

    def stream_opened(self) -> None:
        """A stream was admitted."""
        if self.metrics is not None:
            self.metrics.streams_open.inc()

    def stream_closed(self) -> None:
        """An admitted stream ended."""
        if self.metrics is not None:
            self.metrics.streams_open.dec()

    def cut(self, reason: str) -> None:
        """A stream ended or refused by a limit (a flag names each)."""
        if self.metrics is not None:
            self.metrics.streams_cut.labels(reason).inc()
        log.info("stream cut reason=%s", reason, extra={"fields": {"outcome": "CUT", "reason": reason}})

    def queued(self, used: int) -> None:
        """Bytes of answers now waiting in the send budget."""
        if self.metrics is not None:
            self.metrics.send_queued_bytes.set(used)

    def internal_error(self) -> None:
        """An unexpected error ended a stream with INTERNAL."""
        if self.metrics is not None:
            self.metrics.internal_errors.inc()

    def refused(self, outcome: str, peer: str) -> None:
        """A stream refused before any request was read (no or bad credentials): no type URL yet."""
        if self.metrics is not None:
            self.metrics.observe_call("", outcome, 0.0, 0, 0)
        log.info("call refused outcome=%s peer=%s", outcome, peer, extra={"fields": {"outcome": outcome, "peer": peer}})

    def call(self, type_url: str, caller: Caller, outcome: str, seconds: float, result: Result | None) -> None:
        """One log line and the call metrics for a finished call (`result` None when it failed)."""
        if self.metrics is not None:
            # PARTIAL: answered, but without some replicas (the trailer names them).
            counted = "PARTIAL" if result is not None and result.failures else outcome
            self.metrics.observe_call(type_url, counted, seconds, result.resources if result else 0,
                                      len(result.body) if result else 0)
        # The caller chose this string: one line, bounded, whatever it holds.
        type_url = type_url[:200].encode("unicode_escape").decode("ascii")
        fields: dict[str, object] = {
            "type": type_url, "caller": caller.principal, "outcome": outcome, "latency_ms": round(seconds * 1e3, 1)
        }
        if result is not None:
            fields.update(
                replicas_asked=len(result.answers), answered=sum(a.ok for a in result.answers),
                failed=len(result.failures), resources=result.resources, bytes=len(result.body),
            )
        # Text logs get key=value pairs; JSON logs (logs.py) get the same fields as JSON members.
        log.info("call " + " ".join(f"{k}=%s" for k in fields), *fields.values(), extra={"fields": fields})


def build_server(
    service: AdsService, *, listen: str, max_message_bytes: int, tls: CertificateReloader | None,
    max_request_bytes: int = MiB,
) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """The gRPC server with ADS, health and reflection, bound but not started.

    Returns (server, health servicer, bound port). Raises OSError when `listen` cannot be bound.
    """
    server = grpc.aio.server(
        options=[
            # Callers' requests are tiny; gRPC refuses larger ones (RESOURCE_EXHAUSTED) from the length
            # prefix, before any of the body is held for us.
            ("grpc.max_receive_message_length", max_request_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
            # gRPC Python cannot reset one stream: an answer a cut slow reader never takes stays in gRPC's
            # buffer until its connection goes. Connections therefore age out too (GOAWAY at the stream
            # age, closed after the send timeout), as istiod's own do.
            ("grpc.max_connection_age_ms", int(service.limits.max_age * 1000)),
            ("grpc.max_connection_age_grace_ms", int(service.limits.send_timeout * 1000)),
            *LARGE_MESSAGE_OPTIONS,
        ]
    )
    # Requests and answers arrive and leave as bytes: requests are decoded only once the caller is
    # authenticated, and the merged answers are already serialized.
    handlers = {
        "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(service.stream),
        "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(service.delta),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (
        ads_pb2.DESCRIPTOR.services_by_name["AggregatedDiscoveryService"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    port = server.add_secure_port(listen, tls.credentials()) if tls else server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    return server, health_servicer, port


async def set_serving(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    """Set gRPC health (overall and for the ADS service) to SERVING or NOT_SERVING."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE):
        await health_servicer.set(name, status)


__all__ = ["FAILED_REPLICAS_KEY", "SERVICE", "AdsService", "CallObserver", "SendBudget", "StreamLimits", "StreamTable",
           "build_server", "failed_replicas_trailer", "printable", "set_serving", "to_delta"]
