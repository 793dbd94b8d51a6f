"""Lightweight xDS peers written with grpc.aio: data-plane ADS clients whose sync state per type is chosen
by the test, and a one-shot debug caller that asks istiod (or anything speaking ADS) for istio.io/debug/*.

istiod decides a connection's per-type state purely from what the client sends (pkg/xds/server.go
ShouldRespond + pilot/pkg/xds/statusgen.go debugSyncStatus): ACK of the last nonce -> SYNCED, no ACK ->
STALE, a request with error_detail -> ERROR, never requested -> absent. So these clients need no Envoy.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from envoy.service.status.v3 import csds_pb2
from google.protobuf import json_format, struct_pb2
from google.rpc import status_pb2

from istioctl_proxy.sim.pki import Leaf

from ..ads_client import request

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
SYNCZ = "istio.io/debug/syncz"
CONFIG_DUMP = "istio.io/debug/config_dump"
DEBUG = "istio.io/debug"
SHORT_TYPES = {CDS: "CDS", LDS: "LDS", RDS: "RDS", EDS: "EDS"}

ISTIOD_AUTHORITY = "istiod.istio-system.svc"
DEFAULT_CLUSTER_ID = "Kubernetes"
# What istioctl's own adsc claims to be; any parseable version works for a data-plane client.
DEFAULT_PROXY_VERSION = "1.30.3"


class XdsState(enum.Enum):
    """The state a client puts itself in for one type, as istiod's syncz will report it."""

    SYNCED = "SYNCED"  # ACK every response
    STALE = "STALE"  # never answer a response
    ERROR = "ERROR"  # NACK every response with error_detail


def node_id(pod: str, namespace: str, *, node_type: str = "sidecar", ip: str = "127.0.0.1") -> str:
    """Istio's 4-part node id; istiod's proxy id (syncz NAME) is the 3rd part, `<pod>.<ns>`."""
    return f"{node_type}~{ip}~{pod}.{namespace}~{namespace}.svc.cluster.local"


def make_node(
    pod: str,
    namespace: str,
    *,
    node_type: str = "sidecar",
    ip: str = "127.0.0.1",
    cluster_id: str = DEFAULT_CLUSTER_ID,
    istio_version: str = DEFAULT_PROXY_VERSION,
    service_account: str | None = None,
    proxy_config: bool = True,
    extra_metadata: Mapping[str, Any] | None = None,
) -> base_pb2.Node:
    """A Node istiod accepts. PROXY_CONFIG is what makes istiod count the connection as a proxy in syncz;
    debug callers leave it out so they do not show up themselves (like istioctl's adsc)."""
    meta: dict[str, Any] = {"ISTIO_VERSION": istio_version, "NAMESPACE": namespace, "CLUSTER_ID": cluster_id}
    if proxy_config:
        meta["PROXY_CONFIG"] = {}
    if service_account:
        meta["SERVICE_ACCOUNT"] = service_account
    meta.update(extra_metadata or {})
    md = struct_pb2.Struct()
    md.update(meta)
    return base_pb2.Node(id=node_id(pod, namespace, node_type=node_type, ip=ip), metadata=md)


# -- channels ------------------------------------------------------------------------------------------


def insecure_channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target)


def tls_channel(
    target: str,
    root_pem: bytes,
    *,
    authority: str = ISTIOD_AUTHORITY,
    client: Leaf | None = None,
) -> grpc.aio.Channel:
    """TLS to istiod's 15012: verify its cert (signed by our plugged CA, SAN istiod.istio-system.svc) and
    optionally present a client cert (mTLS identity = its SPIFFE URI)."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=root_pem,
        private_key=client.key_pem if client else None,
        certificate_chain=client.cert_pem if client else None,
    )
    # ssl_target_name_override sets both the SNI/verification name and the :authority header.
    return grpc.aio.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", authority)])


# -- data-plane ADS client -----------------------------------------------------------------------------


@dataclass
class _TypeTrack:
    state: XdsState
    resource_names: list[str]
    responses: int = 0
    last: discovery_pb2.DiscoveryResponse | None = None
    first_response: asyncio.Event = field(default_factory=asyncio.Event)


class AdsClient:
    """One ADS stream that subscribes to `subscriptions` (type_url -> desired state) and then answers
    every response according to that state. Use `async with` or start()/close()."""

    def __init__(
        self,
        target: str,
        pod: str,
        namespace: str,
        subscriptions: Mapping[str, XdsState],
        *,
        resource_names: Mapping[str, Sequence[str]] | None = None,
        channel: grpc.aio.Channel | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        **node_kwargs: Any,
    ) -> None:
        self.target = target
        self.pod, self.namespace = pod, namespace
        self.node = make_node(pod, namespace, **node_kwargs)
        names = resource_names or {}
        self.types = {t: _TypeTrack(s, list(names.get(t, ()))) for t, s in subscriptions.items()}
        self._own_channel = channel is None
        self._channel = channel or insecure_channel(target)
        self._metadata = tuple(metadata)
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self.error: BaseException | None = None

    @property
    def proxy_id(self) -> str:
        """The id istiod reports in syncz / takes in config_dump: `<pod>.<ns>`."""
        return f"{self.pod}.{self.namespace}"

    async def start(self, timeout_s: float = 20.0) -> AdsClient:
        """Open the stream, subscribe, and return once every type got (and was answered for) a response."""
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self._channel)
        self._call = stub.StreamAggregatedResources(metadata=self._metadata or None)
        for i, (type_url, track) in enumerate(self.types.items()):
            req = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=track.resource_names)
            if i == 0:
                req.node.CopyFrom(self.node)  # istiod reads the node only from the first request
            await self._call.write(req)
        self._reader = asyncio.create_task(self._read_loop(), name=f"ads-{self.proxy_id}")
        await self._wait_first_responses(timeout_s)
        return self

    async def _wait_first_responses(self, timeout_s: float) -> None:
        # The reader sets every event when the stream ends, so this also returns early on failure.
        firsts = asyncio.gather(*(t.first_response.wait() for t in self.types.values()))
        try:
            await asyncio.wait_for(firsts, timeout_s)
        except TimeoutError:
            pass
        if self.error is not None:
            raise RuntimeError(f"ADS client {self.proxy_id} -> {self.target} failed: {self.error}") from self.error
        missing = [SHORT_TYPES.get(u, u) for u, t in self.types.items() if t.responses == 0]
        if missing:
            raise TimeoutError(f"ADS client {self.proxy_id} -> {self.target}: no response for {missing}")

    async def _read_loop(self) -> None:
        try:
            async for resp in self._call:
                await self._on_response(resp)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:  # CANCELLED is our own close()
                self.error = e
        except Exception as e:  # e.g. a write after istiod closed the stream: report, never lose it
            self.error = e
        finally:
            for t in self.types.values():
                t.first_response.set()  # unblock waiters; they check self.error

    async def _on_response(self, resp: discovery_pb2.DiscoveryResponse) -> None:
        track = self.types.get(resp.type_url)
        if track is None:
            return  # not a type we subscribed to: nothing to answer
        track.responses += 1
        track.last = resp
        reply = self._reply_for(resp, track)
        if reply is not None:
            await self._call.write(reply)
        track.first_response.set()

    @staticmethod
    def _reply_for(resp: discovery_pb2.DiscoveryResponse, track: _TypeTrack) -> discovery_pb2.DiscoveryRequest | None:
        base = {
            "type_url": resp.type_url,
            "response_nonce": resp.nonce,
            "resource_names": track.resource_names,
        }
        if track.state is XdsState.SYNCED:
            return discovery_pb2.DiscoveryRequest(version_info=resp.version_info, **base)
        if track.state is XdsState.ERROR:
            detail = status_pb2.Status(
                code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                message=f"e2e NACK of {SHORT_TYPES.get(resp.type_url, resp.type_url)}",
            )
            # A NACK carries the last *accepted* version, which is none here.
            return discovery_pb2.DiscoveryRequest(version_info="", error_detail=detail, **base)
        return None  # STALE: leave istiod's nonce un-acked

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._own_channel:
            await self._channel.close(None)

    async def __aenter__(self) -> AdsClient:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def start_clients(clients: Iterable[AdsClient], timeout_s: float = 30.0) -> list[AdsClient]:
    """Start many clients concurrently; if any fails, close them all and re-raise."""
    clients = list(clients)
    results = await asyncio.gather(*(c.start(timeout_s) for c in clients), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        await close_clients(clients)
        raise errors[0]
    return clients


async def close_clients(clients: Iterable[AdsClient]) -> None:
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


# -- debug caller (what istioctl does, in Python) ------------------------------------------------------


async def debug_request(
    channel: grpc.aio.Channel,
    type_url: str,
    resource_names: Sequence[str] = (),
    *,
    namespace: str = "istio-system",
    service_account: str | None = "default",
    token: str | None = None,
    timeout_s: float = 20.0,
    pod: str = "e2e-debug",
) -> discovery_pb2.DiscoveryResponse:
    """`ads_client.request` with an e2e node, answered by istiod: the first response (istiod keeps the
    stream open, so it is then cancelled); gRPC errors propagate as grpc.aio.AioRpcError. The node's
    NAMESPACE / SERVICE_ACCOUNT must match the caller identity, or istiod refuses the stream with
    PermissionDenied (pilot/pkg/xds/auth.go)."""
    node = make_node(
        pod,
        namespace,
        service_account=service_account,
        proxy_config=False,
        extra_metadata={"GENERATOR": "event"},
    )
    resp, _ = await request(channel, type_url, resource_names, node=node, token=token or "", timeout=timeout_s,
                            first_only=True)
    return resp


# -- reading responses ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProxySync:
    """One syncz row: proxy id, metadata, and per-type (short name) status/error."""

    proxy_id: str
    namespace: str
    cluster_id: str
    istio_version: str
    status: dict[str, str]
    errors: dict[str, str]


def parse_syncz(resp: discovery_pb2.DiscoveryResponse) -> list[ProxySync]:
    rows = []
    for res in resp.resources:
        cc = csds_pb2.ClientConfig()
        if not res.Unpack(cc):
            raise ValueError(f"syncz resource is {res.type_url}, not a ClientConfig")
        md = json_format.MessageToDict(cc.node.metadata)
        status, errors = {}, {}
        for g in cc.generic_xds_configs:
            short = SHORT_TYPES.get(g.type_url, g.type_url)
            status[short] = csds_pb2.ConfigStatus.Name(g.config_status)
            if g.HasField("error_state"):
                errors[short] = g.error_state.details
        rows.append(
            ProxySync(
                cc.node.id,
                md.get("NAMESPACE", ""),
                md.get("CLUSTER_ID", ""),
                md.get("ISTIO_VERSION", ""),
                status,
                errors,
            )
        )
    return rows


def control_plane(resp: discovery_pb2.DiscoveryResponse) -> dict[str, Any]:
    """The ControlPlane identifier JSON ({"Component","ID","Info":{version,...}}), {} if absent."""
    if not resp.HasField("control_plane") or not resp.control_plane.identifier:
        return {}
    parsed: dict[str, Any] = json.loads(resp.control_plane.identifier)
    return parsed
