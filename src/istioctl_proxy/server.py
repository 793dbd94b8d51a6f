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
from .budget import CALLER_SHARE, SendBudget
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
    slow_reader_min_bytes_per_second: int = Config.slow_reader_min_kib_per_second * 1024


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
            min_bytes_per_second=self.limits.slow_reader_min_bytes_per_second,
            pin_seconds=connection_life(self.limits), on_pinned=self.observer.pinned,
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
            # Cut: gRPC Python cannot reset this one stream, so the answer may stay in its buffer until the
            # connection goes. It stays charged to this caller until then.
            self.budget.pin(evicted, len(result.body))
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


def connection_life(limits: StreamLimits) -> float:
    """Seconds a caller's connection lives at most (from any moment of its life): gRPC core's max connection
    age, with its up to +10% jitter, then the grace build_server gives (the send timeout)."""
    return limits.max_age * 1.1 + limits.send_timeout


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

    def pinned(self, pinned: int) -> None:
        """Bytes of cut answers that may still be in gRPC's buffers (SendBudget.pin)."""
        if self.metrics is not None:
            self.metrics.send_pinned_bytes.set(pinned)

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


__all__ = ["FAILED_REPLICAS_KEY", "SERVICE", "AdsService", "CallObserver", "StreamLimits", "StreamTable",
           "build_server", "connection_life", "failed_replicas_trailer", "printable", "set_serving", "to_delta"]
