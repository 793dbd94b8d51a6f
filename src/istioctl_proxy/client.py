"""A small ADS client: asks any ADS address (the proxy, or one istiod) and prints what istioctl prints."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from envoy.service.status.v3 import csds_pb2
from google.protobuf import json_format

from .config import Config
from .policy import SYNCZ

SHORT_TYPES = {
    "type.googleapis.com/envoy.config.cluster.v3.Cluster": "CDS",
    "type.googleapis.com/envoy.config.listener.v3.Listener": "LDS",
    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration": "RDS",
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment": "EDS",
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret": "SDS",
    "type.googleapis.com/istio.networking.nds.v1.NameTable": "NDS",
    "type.googleapis.com/istio.mesh.v1alpha1.ProxyConfig": "PCDS",
    "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig": "ECDS",
    "type.googleapis.com/istio.workload.Address": "WDS",
    "type.googleapis.com/istio.workload.Workload": "WDS",
    "type.googleapis.com/istio.security.Authorization": "WADS",
}
_CORE_ORDER = [
    "type.googleapis.com/envoy.config.cluster.v3.Cluster",
    "type.googleapis.com/envoy.config.listener.v3.Listener",
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
]


@dataclass(frozen=True)
class Target:
    """Where and how `ps` (or a test) asks: address, TLS or plaintext, credentials, node namespace."""

    address: str
    plaintext: bool = False
    token: str = ""
    ca_pem: bytes | None = None
    cert_pem: bytes | None = None
    key_pem: bytes | None = None
    authority: str = ""
    namespace: str = Config.istio_namespace
    max_message_bytes: int = Config.max_message_mib * 1024 * 1024  # what the proxy may send (--max-message-mib)


def istioctl_node(
    namespace: str, *, service_account: str = "default", pod: str = "test-1", istio_version: str = "65536.65536.65536"
) -> base_pb2.Node:
    """The node istioctl sends (pkg/adsc): identity checks compare NAMESPACE/SERVICE_ACCOUNT with the token.

    Args:
        namespace: NAMESPACE, and the namespace part of the node id.
        service_account: SERVICE_ACCOUNT.
        pod: the pod part of the id ("<pod>.<namespace>", which istiod's connection ids are made of).
        istio_version: ISTIO_VERSION (istioctl sends a max version); "" leaves it out.
    """
    node = base_pb2.Node(id=f"sidecar~127.0.0.1~{pod}.{namespace}~{namespace}.svc.cluster.local")
    node.metadata.update({"GENERATOR": "event", "SERVICE_ACCOUNT": service_account, "NAMESPACE": namespace})
    if istio_version:
        node.metadata.update({"ISTIO_VERSION": istio_version})
    return node


def channel(t: Target) -> grpc.aio.Channel:
    """A channel to the target (TLS unless `plaintext`; `authority` overrides the name checked)."""
    opts: list[tuple[str, object]] = [
        ("grpc.max_receive_message_length", t.max_message_bytes),
        ("grpc.max_send_message_length", t.max_message_bytes),
    ]
    if t.plaintext:
        return grpc.aio.insecure_channel(t.address, options=opts)
    if t.authority:
        opts += [("grpc.ssl_target_name_override", t.authority), ("grpc.default_authority", t.authority)]
    creds = grpc.ssl_channel_credentials(t.ca_pem, t.key_pem, t.cert_pem)
    return grpc.aio.secure_channel(t.address, creds, options=opts)


async def request(
    t: Target, type_url: str, names: list[str] | None = None, timeout: float = 30.0
) -> tuple[discovery_pb2.DiscoveryResponse, tuple[tuple[str, str], ...]]:
    """One request on a new stream: the response and the trailing metadata."""
    async with channel(t) as ch:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch)
        md = (("authorization", f"Bearer {t.token}"),) if t.token else ()
        req = discovery_pb2.DiscoveryRequest(
            type_url=type_url, resource_names=names or [], node=istioctl_node(t.namespace)
        )
        # The request goes in as an iterator, not call.write(): when the server ends the stream before
        # reading (UNAUTHENTICATED), a racing write makes grpc.aio report its own "Internal error from Core"
        # instead of the server's status.
        call = stub.StreamAggregatedResources(iter([req]), metadata=md, timeout=timeout)
        responses = [r async for r in call]  # to the end, so the status and trailing metadata are there
        if not responses:
            raise RuntimeError("stream closed without a response")
        resp = responses[0]
        trailers = tuple((k, str(v)) for k, v in (await call.trailing_metadata() or ()))
        return resp, trailers


def _human_age(seconds: float) -> str:
    # k8s.io/apimachinery duration.HumanDuration, the form istioctl prints.
    s = int(seconds)
    if s < 0:
        return "<invalid>"
    if s < 120:
        return f"{s}s"
    m = s // 60
    if m < 10:
        return f"{m}m{s % 60}s" if s % 60 else f"{m}m"
    if m < 180:
        return f"{m}m"
    h = s // 3600
    if h < 8:
        return f"{h}h{m % 60}m" if m % 60 else f"{h}h"
    if h < 48:
        return f"{h}h"
    return f"{h // 24}d"


@dataclass(frozen=True)
class ProxyRow:
    """One proxy as istioctl's XdsStatusWriter computes it (writer/pilot/status.go)."""

    name: str
    cluster: str
    istiod: str
    version: str
    types: dict[str, str]  # type URL → "SYNCED (5s)", "NOT SENT", ...


def control_plane_id(resp: discovery_pb2.DiscoveryResponse) -> str:
    """istioctl's multixds.CpInfo(resp).ID."""
    if not resp.control_plane.identifier:
        return "MISSING"
    try:
        return str(json.loads(resp.control_plane.identifier).get("ID", ""))
    except (ValueError, AttributeError):
        return "INVALID"


def _meta(cfg: csds_pb2.ClientConfig, key: str) -> str:
    fields = cfg.node.metadata.fields
    return str(fields[key].string_value) if key in fields else ""


def _status(x: csds_pb2.ClientConfig.GenericXdsConfig, now: float) -> str:
    status = str(csds_pb2.ConfigStatus.Name(x.config_status))
    if status == "UNKNOWN":
        return "IGNORED"
    if status == "NOT_SENT":
        return "NOT SENT"
    if x.HasField("last_updated"):
        status += f" ({_human_age(now - x.last_updated.ToSeconds())})"
    return status


def rows(resp: discovery_pb2.DiscoveryResponse, namespace: str = "") -> list[ProxyRow]:
    """One row per proxy of a syncz answer, optionally of one namespace only."""
    cp_id = control_plane_id(resp)
    out = []
    now = time.time()
    for res in resp.resources:
        cfg = csds_pb2.ClientConfig()
        if not res.Unpack(cfg):
            raise ValueError(f"resource {res.type_url} is not a ClientConfig")
        if namespace and _meta(cfg, "NAMESPACE") != namespace:
            continue
        types = {str(x.type_url): _status(x, now) for x in cfg.generic_xds_configs}
        out.append(ProxyRow(str(cfg.node.id), _meta(cfg, "CLUSTER_ID"), cp_id, _meta(cfg, "ISTIO_VERSION"), types))
    return sorted(out, key=lambda r: r.name)


def table(resp: discovery_pb2.DiscoveryResponse, namespace: str = "") -> str:
    """The `istioctl x ps` table: NAME CLUSTER ISTIOD VERSION SUBSCRIBED TYPES."""
    data = rows(resp, namespace)
    seen = {t for r in data for t in r.types}
    order = [t for t in _CORE_ORDER if t in seen] + sorted(seen - set(_CORE_ORDER))
    lines = [["NAME", "CLUSTER", "ISTIOD", "VERSION", "SUBSCRIBED TYPES"]]
    for r in data:
        subscribed = [SHORT_TYPES.get(t, t) for t in order if t in r.types and r.types[t] != "IGNORED"]
        col = f"{len(subscribed)} ({','.join(subscribed)})" if subscribed else "0"
        lines.append([r.name, r.cluster, r.istiod, r.version, col])
    # Go's tabwriter (minwidth 0, padding 5): each column padded to its widest cell + 5.
    widths = [max(len(row[i]) for row in lines) + 5 for i in range(4)]
    return "\n".join("".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + row[4] for row in lines) + "\n"


def as_json(resp: discovery_pb2.DiscoveryResponse) -> str:
    """The answer as istioctl's `-o json` prints it."""
    return json_format.MessageToJson(resp, indent=4)


__all__ = ["SHORT_TYPES", "SYNCZ", "ProxyRow", "Target", "as_json", "channel", "control_plane_id", "istioctl_node",
           "request", "rows", "table"]
