"""The gRPC front: ADS (SotW and Delta), health and reflection, TLS serving with certificate reload.

The servicer is thin: it authenticates the stream, hands each request to the Aggregator, and maps
ProxyErrors to gRPC statuses in one place (`_fail`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2, discovery_pb2
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .aggregator import Aggregator, Result
from .auth import Authenticator, Caller
from .errors import InvalidRequest, ProxyError
from .metrics import Metrics
from .policy import Merge
from .upstream import LARGE_MESSAGE_OPTIONS
from .wire import syncz_node_id

log = logging.getLogger(__name__)

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
FAILED_REPLICAS_KEY = "x-istioctl-proxy-failed-replicas"


def _remaining(context: grpc.aio.ServicerContext[object, object]) -> float | None:
    left = context.time_remaining()
    return None if left is None or left > 1e8 else float(left)


class AdsService:
    """StreamAggregatedResources and DeltaAggregatedResources over the Aggregator."""

    def __init__(
        self, aggregator: Aggregator, authenticator: Authenticator, observer: CallObserver | None = None
    ) -> None:
        self.aggregator = aggregator
        self.authenticator = authenticator
        self.observer = observer or CallObserver()

    async def _caller(self, context: grpc.aio.ServicerContext[object, object]) -> Caller:
        try:
            return await self.authenticator.authenticate(context)
        except ProxyError as err:
            self.observer.refused(err.code.name, context.peer())
            await _fail(context, err)
            raise AssertionError("unreachable") from None

    async def _authenticate(self, context: grpc.aio.ServicerContext[object, object], into: list[Caller]) -> None:
        into.append(await self._caller(context))

    async def _answer(
        self, context: grpc.aio.ServicerContext[object, object], caller: Caller, type_url: str, names: list[str],
        node: base_pb2.Node, failures: list[str],
    ) -> Result:
        started = time.monotonic()
        try:
            with self.observer.in_flight(type_url):
                result = await self.aggregator.answer(type_url, names, node, caller, _remaining(context))
        except ProxyError as err:
            self.observer.call(type_url, caller, err.code.name, time.monotonic() - started, None)
            await _fail(context, err)
            raise AssertionError("unreachable") from None
        except asyncio.CancelledError:
            # The caller hung up (or the server is stopping) mid-call: still one log line and one count.
            self.observer.call(type_url, caller, "CANCELLED", time.monotonic() - started, None)
            raise
        self.observer.call(type_url, caller, "OK", time.monotonic() - started, result)
        if result.failures:
            failures.extend(f"{r}: {why}" for r, why in result.failures)
            context.set_trailing_metadata(tuple((FAILED_REPLICAS_KEY, f) for f in failures))
        return result

    async def stream(
        self, requests: AsyncIterator[discovery_pb2.DiscoveryRequest], context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[bytes]:
        callers: list[Caller] = []
        failures: list[str] = []
        # istiod answers each request on the stream afresh (ACK-looking ones too) and never pushes debug
        # types unasked: so one response per request, in order, until the client half-closes.
        async for req, node in _with_node(requests, context, lambda: self._authenticate(context, callers)):
            result = await self._answer(context, callers[0], req.type_url, list(req.resource_names), node, failures)
            yield result.body

    async def delta(
        self,
        requests: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[discovery_pb2.DeltaDiscoveryResponse]:
        callers: list[Caller] = []
        failures: list[str] = []
        subscribed: dict[str, dict[str, None]] = {}  # per type: an ordered set of names
        async for req, node in _with_node(requests, context, lambda: self._authenticate(context, callers)):
            names = subscribed.setdefault(req.type_url, {})
            names.update(dict.fromkeys(req.resource_names_subscribe))
            for n in req.resource_names_unsubscribe:
                names.pop(n, None)
            result = await self._answer(context, callers[0], req.type_url, list(names), node, failures)
            yield to_delta(result)


_Req = TypeVar("_Req", discovery_pb2.DiscoveryRequest, discovery_pb2.DeltaDiscoveryRequest)


async def _with_node(
    requests: AsyncIterator[_Req],
    context: grpc.aio.ServicerContext[object, object],
    authenticate: Callable[[], Awaitable[None]],
) -> AsyncIterator[tuple[_Req, base_pb2.Node]]:
    """Each request with the stream's node: the first request must carry node.id, as istiod requires."""
    node: base_pb2.Node | None = None
    async for req in _decoded(requests, context, authenticate):
        if req.HasField("node") and req.node.id:
            node = req.node
        if node is None:
            await _fail(context, InvalidRequest("missing node information: the first request must carry node.id"))
            return
        yield req, node


async def _decoded(
    requests: AsyncIterator[_Req],
    context: grpc.aio.ServicerContext[object, object],
    authenticate: Callable[[], Awaitable[None]],
) -> AsyncIterator[_Req]:
    """The stream's requests; bytes that are not a request end the call with INVALID_ARGUMENT, not UNKNOWN.

    The caller is authenticated once the first message has arrived (or the stream ended): refusing a
    stream before reading it races the client's first write, and grpc.aio clients then report their own
    "Internal error from Core" instead of our UNAUTHENTICATED.
    """
    it = aiter(requests)
    first = True
    while True:
        try:
            req = await anext(it)
        except StopAsyncIteration:
            if first:
                await authenticate()
            return
        except DecodeError as err:
            if first:
                await authenticate()
            await _fail(context, InvalidRequest(f"malformed request: {err}"))
            return
        if first:
            await authenticate()
            first = False
        yield req


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


async def _fail(context: grpc.aio.ServicerContext[object, object], err: ProxyError) -> None:
    """The one place a ProxyError becomes a gRPC status."""
    await context.abort(err.code, _fit_trailer(err.message))


# grpc-message travels in a trailer, percent-encoded (up to 3x), and clients drop trailers past 8-16 KiB:
# a message echoing a huge caller input would turn a precise status into "Stream removed".
_MAX_MESSAGE_BYTES = 1024


def _fit_trailer(message: str) -> str:
    raw = message.encode()
    if len(raw) <= _MAX_MESSAGE_BYTES:
        return message
    return raw[:_MAX_MESSAGE_BYTES].decode(errors="ignore") + "... (truncated)"


class CallObserver:
    """One log line per call (by principal: never a token) and, given a Metrics, the call metrics."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics

    def in_flight(self, type_url: str) -> contextlib.AbstractContextManager[None]:
        return self.metrics.calling(type_url) if self.metrics is not None else contextlib.nullcontext()

    def refused(self, outcome: str, peer: str) -> None:
        """A stream refused before any request was read (no or bad credentials): no type URL yet."""
        if self.metrics is not None:
            self.metrics.observe_call("", outcome, 0.0, 0, 0)
        log.info("call refused outcome=%s peer=%s", outcome, peer, extra={"fields": {"outcome": outcome, "peer": peer}})

    def call(self, type_url: str, caller: Caller, outcome: str, seconds: float, result: Result | None) -> None:
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


@dataclass(frozen=True)
class ServingTLS:
    cert_file: str
    key_file: str
    client_ca_file: str | None = None
    require_client_cert: bool = False


class CertificateReloader:
    """Serves the current files of a ServingTLS; new handshakes pick up rotated files (cert-manager)."""

    def __init__(self, tls: ServingTLS) -> None:
        self.tls = tls
        self._stamp: tuple[float, ...] = ()
        self._config: grpc.ServerCertificateConfiguration | None = None
        self.reloads = 0

    def _files(self) -> list[str]:
        return [f for f in (self.tls.cert_file, self.tls.key_file, self.tls.client_ca_file) if f]

    def load(self) -> grpc.ServerCertificateConfiguration:
        stamp = tuple(os.stat(f).st_mtime_ns for f in self._files())
        if self._config is None or stamp != self._stamp:
            with open(self.tls.cert_file, "rb") as c, open(self.tls.key_file, "rb") as k:
                pair = (k.read(), c.read())
            ca = None
            if self.tls.client_ca_file:
                with open(self.tls.client_ca_file, "rb") as f:
                    ca = f.read()
            self._config = grpc.ssl_server_certificate_configuration([pair], root_certificates=ca)
            if self._stamp:
                self.reloads += 1
                log.info("serving certificate reloaded from %s", self.tls.cert_file)
            self._stamp = stamp
        return self._config

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC on each new handshake; None keeps the current configuration.
        try:
            before = self._config
            config = self.load()
            return config if config is not before else None
        except (OSError, ValueError) as err:
            log.error("could not reload serving certificate (keeping the old one): %s", err)
            return None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.load(), self.fetch, require_client_authentication=self.tls.require_client_cert
        )


def build_server(
    service: AdsService, *, listen: str, max_message_bytes: int, tls: CertificateReloader | None
) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
            *LARGE_MESSAGE_OPTIONS,
        ]
    )
    handlers = {
        "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
            service.stream,
            request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
            response_serializer=None,  # the merged bytes are already a serialized DiscoveryResponse
        ),
        "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
            service.delta,
            request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
            response_serializer=discovery_pb2.DeltaDiscoveryResponse.SerializeToString,
        ),
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
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE):
        await health_servicer.set(name, status)


__all__ = ["AdsService", "CertificateReloader", "ServingTLS", "build_server", "set_serving"]
