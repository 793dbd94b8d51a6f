"""The one ADS test client: every test that asks the proxy, a simulated or a real istiod over ADS goes through
`ads_call` (a stream recorded as an `Outcome`, never raising for a status) or `request` (the one debug
request istioctl makes, raising grpc.aio.AioRpcError like a grpc call). Tests that drive a stream step by step
(slow readers, held-open streams, nonces read back) still write their own calls.

The product keeps its own `istioctl_proxy.client.request` for `istioctl-proxy ps` and the demo; its `Target`
(address, TLS, token, namespace) and `istioctl_node` are reused here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from istioctl_proxy import client, wire
from istioctl_proxy.server import FAILED_REPLICAS_KEY

ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
SOTW = ADS + "StreamAggregatedResources"
DELTA = ADS + "DeltaAggregatedResources"

Message = discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest
To = client.Target | grpc.aio.Channel | str


@dataclass
class Outcome:
    """What one client stream saw."""

    code: grpc.StatusCode
    details: str
    responses: list[bytes]
    trailers: tuple[tuple[str, str], ...]
    elapsed: float
    deadline: float

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK

    @property
    def failed_replicas(self) -> list[str]:
        return [v for k, v in self.trailers if k == FAILED_REPLICAS_KEY]

    def sotw(self, i: int = 0) -> discovery_pb2.DiscoveryResponse:
        return discovery_pb2.DiscoveryResponse.FromString(self.responses[i])

    def delta(self, i: int = 0) -> discovery_pb2.DeltaDiscoveryResponse:
        return discovery_pb2.DeltaDiscoveryResponse.FromString(self.responses[i])

    def error(self) -> grpc.aio.AioRpcError:
        """This outcome's status as the error a grpc.aio call raises."""
        return grpc.aio.AioRpcError(self.code, grpc.aio.Metadata(), grpc.aio.Metadata(*self.trailers), self.details)


def istioctl_request(
    type_url: str, names: Sequence[str] = (), namespace: str = "istio-system", nonce: str = ""
) -> discovery_pb2.DiscoveryRequest:
    """A request as istioctl sends it, with its node for `namespace` (istioctl adds a random nonce)."""
    return discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=list(names),
                                          node=client.istioctl_node(namespace), response_nonce=nonce)


def syncz_ids(resp: discovery_pb2.DiscoveryResponse) -> list[str]:
    """The proxy ids of a syncz answer, in its order."""
    return [wire.syncz_node_id(r.SerializeToString()) for r in resp.resources]


def _bytes(m: Message | bytes) -> bytes:
    return m if isinstance(m, bytes) else m.SerializeToString()


def channel_options(max_mib: int = 256) -> list[tuple[str, Any]]:
    return [("grpc.max_receive_message_length", max_mib << 20), ("grpc.max_send_message_length", max_mib << 20)]


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


# grpc.aio reports its own INTERNAL "Internal error from Core" when a write races the server ending the
# call (the server's real status is lost on the client side). ads_call then asks again with the
# synchronous client, which reports the server's status, and counts it here.
CLIENT_ARTIFACT = "Internal error from Core"
ARTIFACTS: dict[str, int] = {"aio-write-race-retried": 0}


async def ads_call(
    to: To,
    requests: Sequence[Message | bytes],
    *,
    metadata: Sequence[tuple[str, str | bytes]] = (),
    timeout: float = 10.0,
    delta: bool = False,
    cancel_after: float | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, Any]] = (),
    pipelined: bool = False,
    first_only: bool = False,
) -> Outcome:
    """Write each request and read its answer, half-close, read to the end; never raises for a status.

    `to` may be a channel, an address (a channel is opened for this one call, plaintext unless
    `credentials`; the client-side write race above is then retried synchronously) or a `client.Target`
    (a channel to it is opened for this one call; its token is not sent unless in `metadata`).
    `pipelined`: hand all requests to gRPC at once and half-close, as istioctl does; a server that ends
    the call before reading then cannot turn a write into the client's own INTERNAL.
    `first_only`: cancel the call once every request is answered (istiod keeps a stream open for more
    requests, so reading to its end would wait for the deadline); the outcome is then OK.
    """
    if isinstance(to, client.Target):
        async with client.channel(to) as ch:
            return await ads_call(ch, requests, metadata=metadata, timeout=timeout, delta=delta,
                                  cancel_after=cancel_after, pipelined=pipelined, first_only=first_only)
    if isinstance(to, str):
        address = to
        opts = list(options) or channel_options()
        ch = (grpc.aio.secure_channel(address, credentials, options=opts) if credentials
              else grpc.aio.insecure_channel(address, options=opts))
        async with ch:
            out = await ads_call(ch, requests, metadata=metadata, timeout=timeout, delta=delta,
                                 cancel_after=cancel_after, pipelined=pipelined, first_only=first_only)
        if out.code == grpc.StatusCode.INTERNAL and out.details == CLIENT_ARTIFACT and cancel_after is None:
            ARTIFACTS["aio-write-race-retried"] += 1
            return await asyncio.to_thread(
                sync_call, address, [_bytes(r) for r in requests], metadata, delta, timeout, credentials, opts)
        return out
    started = time.monotonic()
    method = to.stream_stream(DELTA if delta else SOTW)
    raw = [_bytes(r) for r in requests]
    call = method(iter(raw), metadata=tuple(metadata), timeout=timeout) if pipelined else method(
        metadata=tuple(metadata), timeout=timeout)
    responses: list[bytes] = []
    answered = False

    async def read() -> bool:
        resp = await call.read()
        if resp is grpc.aio.EOF:
            return False
        assert isinstance(resp, bytes)
        responses.append(resp)
        return True

    async def run() -> None:
        nonlocal answered
        if pipelined:
            for _ in raw if first_only else ():
                if not await read():
                    return
        else:
            # Lock-step, as istioctl does: a request, then its answer. Writing on after the server has ended
            # the call would make grpc.aio report its own INTERNAL instead of the server's status.
            for req in raw:
                await call.write(req)
                if not await read():
                    return
            if not first_only:
                await call.done_writing()
        if first_only:
            answered = True
            call.cancel()
            return
        while await read():
            pass

    try:
        if cancel_after is None:
            await run()
        else:
            task = asyncio.ensure_future(run())
            done, _ = await asyncio.wait({task}, timeout=cancel_after)
            if not done:
                call.cancel()
                # grpc.aio: a write still waiting to send the call's metadata never wakes up once the call
                # is cancelled, so stop our side of it too.
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await task
    except grpc.aio.AioRpcError:
        pass
    except asyncio.InvalidStateError:
        pass  # write() on a call that already ended: its status says why
    if answered:
        return Outcome(grpc.StatusCode.OK, "", responses, (), time.monotonic() - started, timeout)
    code = await call.code()
    details = await call.details() or ""
    trailers = tuple((k, str(v)) for k, v in (await call.trailing_metadata() or ()))
    return Outcome(code, details, responses, trailers, time.monotonic() - started, timeout)


def sync_call(
    address: str, requests: Sequence[bytes], metadata: Sequence[tuple[str, str | bytes]], delta: bool,
    timeout: float, credentials: grpc.ChannelCredentials | None = None, options: Sequence[tuple[str, Any]] = (),
) -> Outcome:
    """The same call with the synchronous client."""
    ch = grpc.secure_channel(address, credentials, options=options) if credentials else grpc.insecure_channel(
        address, options=options)
    started = time.monotonic()
    responses: list[bytes] = []
    try:
        method = ch.stream_stream(DELTA if delta else SOTW)
        try:
            for resp in method(iter(requests), metadata=tuple(metadata), timeout=timeout):
                responses.append(resp)
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as err:
            code, details = err.code(), err.details() or ""  # type: ignore[attr-defined]
    finally:
        ch.close()
    return Outcome(code, details, responses, (), time.monotonic() - started, timeout)


async def request(
    to: client.Target | grpc.aio.Channel,
    type_url: str,
    names: Sequence[str] | None = None,
    *,
    node: base_pb2.Node | None = None,
    token: str | None = None,
    timeout: float = 30.0,
    first_only: bool = False,
) -> tuple[discovery_pb2.DiscoveryResponse, tuple[tuple[str, str], ...]]:
    """One debug request on a new stream, as istioctl sends it: the first response and the trailing metadata.

    The node defaults to istioctl's for the target's namespace (istio-system on a bare channel); `token`
    defaults to the target's. A status other than OK raises grpc.aio.AioRpcError; a stream that ends
    without an answer raises RuntimeError.
    """
    namespace = to.namespace if isinstance(to, client.Target) else "istio-system"
    token = token if token is not None else to.token if isinstance(to, client.Target) else ""
    req = discovery_pb2.DiscoveryRequest(
        type_url=type_url, resource_names=names or [], node=node or client.istioctl_node(namespace)
    )
    out = await ads_call(to, [req], metadata=bearer(token), timeout=timeout, pipelined=True, first_only=first_only)
    if not out.ok:
        raise out.error()
    if not out.responses:
        raise RuntimeError(f"stream closed without a response to {type_url}")
    return out.sotw(), out.trailers
