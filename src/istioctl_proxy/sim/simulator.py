"""Simulated istiod replicas: the embedded default and the benchmarks' load source.

Each replica answers the three debug type URLs with the shapes istiod 1.30 uses (pilot/pkg/xds/
statusgen.go, debuggen.go, debug.go), applies istiod's authentication and namespace rules, and can be
told to be slow, to fail or to hang. `SimReplica.version` also selects the behaviour of older releases
(`Behaviour.of`): 1.24's ControlPlane on every response, and 1.26/1.27's unauthenticated, unscoped debug
types. tests/e2e/test_simulator_fidelity.py compares it field by field with a real istiod of each release.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
from envoy.admin.v3 import config_dump_pb2, config_dump_shared_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.status.v3 import csds_pb2
from google.protobuf import any_pb2, timestamp_pb2

from .. import gourl
from ..auth import bearer_token, parse_spiffe, spiffe_ids_of_pem
from ..policy import CONFIG_DUMP, DEBUG, NAMESPACE_DEBUG_PATHS, SYNCZ

log = logging.getLogger(__name__)

__all__ = [
    "DEBUG_LIST",
    "NOT_CONNECTED",
    "NO_PROXY_ID",
    "TYPES",
    "Behaviour",
    "Faults",
    "SimProxy",
    "SimReplica",
    "SimulatorService",
    "build_simulator_server",
    "make_mesh",
]

TYPES = {
    "CDS": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
    "LDS": "type.googleapis.com/envoy.config.listener.v3.Listener",
    "EDS": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
    "RDS": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
}
_STATUS = {
    "SYNCED": csds_pb2.ConfigStatus.SYNCED,
    "STALE": csds_pb2.ConfigStatus.STALE,
    "NOT_SENT": csds_pb2.ConfigStatus.NOT_SENT,
    "ERROR": csds_pb2.ConfigStatus.ERROR,
}
NOT_CONNECTED = "Proxy not connected to this Pilot instance. It may be connected to another instance.\n"
NO_PROXY_ID = "You must provide a proxyID in the query string\n"
# What istiod's `list` answers (verified against pilot-discovery in tests/e2e/test_simulator_fidelity.py).
DEBUG_LIST = [
    "adsz", "adsz?push=true", "ambientz", "authorizationz", "cachez", "cachez?clear=true", "cachez?sizes=true",
    "clusterz", "config_dump", "configz", "connections", "ecdsz", "edsz", "endpointShardz", "endpointz", "inject",
    "instancesz", "krtz", "mcsz", "mesh", "ndsz", "networkz", "push_status", "pushcontext", "registryz",
    "resourcesz", "sidecarz", "syncz", "telemetryz",
]  # fmt: skip


def _release(version: str) -> tuple[int, int]:
    """(minor, patch) of "1.26.0", "1.30.0-alpha.1-48-g…" or "1.31-dev" (a dev build: newer than any patch)."""
    core = version.split("-", 1)[0].split(".")
    try:
        minor = int(core[1])
        patch = int(core[2]) if len(core) > 2 else 1_000
    except (IndexError, ValueError):
        raise ValueError(f"not an Istio version: {version!r} (want e.g. 1.26.0 or 1.31-dev)") from None
    return minor, patch


def _since(minor: int, patch: int, firsts: Mapping[int, int], from_minor: int) -> bool:
    """A fix that landed in patch firsts[m] of minor m, and in every release from from_minor on."""
    return minor >= from_minor or (minor in firsts and patch >= firsts[minor])


@dataclass(frozen=True)
class Behaviour:
    """What differs between the istiod releases users run (verified against the binaries where one builds
    here: tests/e2e/test_simulator_fidelity.py and test_version_skew.py)."""

    control_plane_on_every_response: bool  # ≤ 1.24; from 1.25 only syncz carries ControlPlane
    debug_types_need_identity: bool  # syncz/config_dump: ≥ 1.27.8, 1.28.5, 1.29.1
    scopes_debug_types: bool  # non-root callers see their namespace only: ≥ 1.28.7, 1.29.3, 1.30

    @classmethod
    def of(cls, version: str) -> Behaviour:
        minor, patch = _release(version)
        return cls(
            control_plane_on_every_response=minor <= 24,
            debug_types_need_identity=_since(minor, patch, {27: 8, 28: 5, 29: 1}, 30),
            scopes_debug_types=_since(minor, patch, {28: 7, 29: 3}, 30),
        )


@dataclass
class SimProxy:
    """A data-plane proxy as istiod sees it."""

    pod: str
    namespace: str
    cluster_id: str = "Kubernetes"
    istio_version: str = "1.30.3"
    proxy_type: str = "sidecar"
    states: dict[str, str] = field(default_factory=dict)  # short type → SYNCED/STALE/NOT_SENT/ERROR
    updated: float = field(default_factory=time.time)
    error: str = "simulated NACK"

    @property
    def id(self) -> str:
        return f"{self.pod}.{self.namespace}"

    def client_config(self) -> csds_pb2.ClientConfig:
        cfg = csds_pb2.ClientConfig()
        cfg.node.id = self.id
        meta = {"CLUSTER_ID": self.cluster_id, "NAMESPACE": self.namespace, "ISTIO_VERSION": self.istio_version}
        cfg.node.metadata.update({k: v for k, v in meta.items() if v})
        stamp = timestamp_pb2.Timestamp()
        stamp.FromNanoseconds(int(self.updated * 1e9))
        for short, type_url in sorted(((s, TYPES[s]) for s in self.states), key=lambda x: x[1]):
            x = cfg.generic_xds_configs.add(type_url=type_url, config_status=_STATUS[self.states[short]])
            x.last_updated.CopyFrom(stamp)
            if self.states[short] == "ERROR":
                x.error_state.last_update_attempt.CopyFrom(stamp)
                x.error_state.details = self.error
        return cfg

    def syncz_json(self) -> dict[str, object]:
        out: dict[str, object] = {"cluster_id": self.cluster_id, "proxy": self.id, "proxy_type": self.proxy_type,
                                  "istio_version": self.istio_version}
        names = {"CDS": "cluster", "LDS": "listener", "RDS": "route", "EDS": "endpoint"}
        sent_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.updated))
        resources: dict[str, dict[str, str]] = {}
        for short, state in self.states.items():
            status: dict[str, str] = {"sentTime": sent_at}  # a Go time.Time: never omitted
            if state != "NOT_SENT":
                out[f"{names[short]}_sent"] = status["sent"] = "v1"
                if state == "SYNCED":
                    out[f"{names[short]}_acked"] = status["acked"] = "v1"
            if state == "ERROR":
                status["lastError"] = self.error
            resources[TYPES[short]] = status
        # debug.go Syncz: per watched type, {sent, acked, sentTime, lastError} (omitempty strings).
        out["resources"] = resources
        return out


@dataclass
class Faults:
    latency: float = 0.0  # seconds before each answer
    fail_code: grpc.StatusCode | None = None
    hang: bool = False
    gate: asyncio.Event | None = None  # answers wait until it is set (tests: hold requests in flight)
    # Malformed answers: given (type_url, the correct answer bytes), return what to send instead.
    garbage: Callable[[str, bytes], bytes] | None = None


@dataclass
class SimReplica:
    """One simulated istiod: its proxies, its identity rules and its faults."""

    pod_name: str
    proxies: list[SimProxy] = field(default_factory=list)
    version: str = "1.30.3"
    tokens: Mapping[str, tuple[str, str]] = field(default_factory=dict)  # bearer token → (namespace, sa)
    root_namespace: str = "istio-system"
    allowed_namespaces: frozenset[str] = frozenset()
    faults: Faults = field(default_factory=Faults)
    requests: int = 0
    # istiod panics (and its process exits) on a debug name Go's url.Parse rejects; so does this replica:
    # `crashed` is set and `on_crash` (SimulatedMesh: stop this replica's server) is called.
    crashed: bool = False
    on_crash: Callable[[], None] | None = None
    _push: int = 0
    _syncz_cache: dict[str, bytes] = field(default_factory=dict)

    @property
    def behaviour(self) -> Behaviour:
        return Behaviour.of(self.version)

    def identifier(self) -> str:
        info = {"version": self.version, "revision": "56df41f63e513f834c9a3af33d8aed82d1d961f2",
                "golang_version": "go1.25.9", "status": "Clean", "tag": self.version}
        return json.dumps({"Component": "istiod", "ID": self.pod_name, "Info": info}, separators=(",", ":"))

    def invalidate(self) -> None:
        self._syncz_cache.clear()

    # -- identity, as pilot/pkg/xds/auth.go and pkg/security do it -------------------------------------
    def identify(self, context: grpc.aio.ServicerContext[object, object], node: object) -> tuple[str, str] | None:
        pems = context.auth_context().get("x509_pem_cert") or []
        ids: list[tuple[str, str]] = []
        if pems:
            ids = [(ns, sa) for _, ns, sa in filter(None, map(parse_spiffe, spiffe_ids_of_pem(pems[0])))]
        else:
            token = bearer_token(context.invocation_metadata())
            if token:
                if token not in self.tokens:
                    raise _Abort(grpc.StatusCode.UNAUTHENTICATED, "authentication failure: invalid token")
                ids = [self.tokens[token]]
        if not ids:
            return None
        meta = getattr(node, "metadata", None)
        fields = meta.fields if meta is not None else {}
        ns = fields["NAMESPACE"].string_value if "NAMESPACE" in fields else ""
        sa = fields["SERVICE_ACCOUNT"].string_value if "SERVICE_ACCOUNT" in fields else ""
        for id_ns, id_sa in ids:
            if id_ns == ns and (not sa or sa == id_sa):
                return id_ns, id_sa
        raise _Abort(grpc.StatusCode.PERMISSION_DENIED,
                     f"authorization failed: no identities ({ids}) matched {ns}/{sa}")

    def caller_scope(self, identity: tuple[str, str] | None) -> str:
        if identity is None or not self.behaviour.scopes_debug_types:
            return ""  # before 1.28.7/1.29.3/1.30 istiod showed every caller every proxy
        ns = identity[0]
        return "" if ns == self.root_namespace or ns in self.allowed_namespaces else ns

    # -- answers -----------------------------------------------------------------------------------------
    def _envelope(self, type_url: str) -> discovery_pb2.DiscoveryResponse:
        self._push += 1
        version = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) + f"/{self._push}"
        resp = discovery_pb2.DiscoveryResponse(type_url=type_url, version_info=version,
                                               nonce=version + str(uuid.uuid4()))
        if self.behaviour.control_plane_on_every_response and type_url != SYNCZ:
            resp.control_plane.identifier = self.identifier()  # istiod ≤ 1.24: on every response
        return resp

    def syncz(self, scope: str) -> bytes:
        resp = self._envelope(SYNCZ)
        resp.control_plane.identifier = self.identifier()
        body = self._syncz_cache.get(scope)
        if body is None:
            # Serialized once per scope: the simulator must not be the bottleneck of a benchmark.
            parts = []
            for p in self.proxies:
                if not scope or p.namespace == scope:
                    any_msg = any_pb2.Any()
                    any_msg.Pack(p.client_config())
                    parts.append(discovery_pb2.DiscoveryResponse(resources=[any_msg]).SerializeToString())
            body = self._syncz_cache[scope] = b"".join(parts)
        return body + bytes(resp.SerializeToString())

    def find(self, proxy_id: str) -> SimProxy | None:
        # istiod matches by substring against "<proxy.ID>-<n>" (getProxyConnection).
        for n, p in enumerate(self.proxies):
            if proxy_id in f"{p.id}-{n + 1}":
                return p
        return None

    def config_dump(self, names: Sequence[str], scope: str) -> bytes:
        resp = self._envelope(CONFIG_DUMP)
        names = list(dict.fromkeys(names))  # istiod: sets.New(ResourceNames...); one name "" matches any proxy
        if len(names) == 1:
            p = self.find(names[0])
            if p is not None and (not scope or p.namespace == scope):
                for msg in _config_dump_messages(p):
                    resp.resources.add().Pack(msg)
        return bytes(resp.SerializeToString())

    def debug(self, names: Sequence[str], identity: tuple[str, str]) -> bytes:
        names = list(dict.fromkeys(names))  # a set, as istiod keeps WatchedResource.ResourceNames
        if len(names) != 1:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "exactly one debug request is required")
        raw = names[0].encode("utf-8", "surrogatepass")
        try:
            # debuggen.go: `u, _ := url.Parse(resourceName); debugType := u.Path`: a parse error is a nil
            # dereference, and the panic ends the process.
            debug_type = gourl.parse(raw).path.decode("utf-8", "replace")
            request_url = gourl.parse(b"/debug/" + raw)  # http.NewRequest; its error is a nil request
        except gourl.GoURLError as err:
            raise _Crash(f"panic: runtime error: invalid memory address or nil pointer dereference ({err})") from None
        if identity[0] != self.root_namespace and debug_type not in NAMESPACE_DEBUG_PATHS:
            raise _Abort(grpc.StatusCode.PERMISSION_DENIED,
                         f"the debug info is not available for current identity: \"spiffe://cluster.local/ns/{identity[0]}/sa/{identity[1]}\"")
        # getDebugConnection checks only the root namespace, not the allowed-namespaces list; before the
        # scoping fix, the handlers did not know the caller at all.
        scope = "" if identity[0] == self.root_namespace or not self.behaviour.scopes_debug_types else identity[0]
        path = request_url.path.decode("utf-8", "replace")
        handler = path.removeprefix("/debug/") if path.startswith("/debug/") else ""
        body = self._debug_body(handler, gourl.parse_query(request_url.raw_query), scope)
        resp = self._envelope(DEBUG)
        resp.resources.add(type_url=DEBUG, value=body.encode())
        return bytes(resp.SerializeToString())

    def _debug_body(self, path: str, query: gourl.Query, scope: str) -> str:
        # Handlers read URL.Query().Get: the first value of the pairs Go could decode.
        proxy_id = query.get(b"proxyID").decode("utf-8", "replace")
        visible = [p for p in self.proxies if not scope or p.namespace == scope]
        if path == "syncz":
            ns = query.get(b"namespace").decode("utf-8", "replace")
            return json.dumps([p.syncz_json() for p in visible if not ns or p.namespace == ns], indent=2)
        if path in ("adsz", "connections") and not proxy_id:
            clients = [{"connectionId": f"{p.id}-{i + 1}", "connectedAt": "2026-01-01T00:00:00Z",
                        "address": "127.0.0.1", "metadata": {"NAMESPACE": p.namespace, "CLUSTER_ID": p.cluster_id}}
                       for i, p in enumerate(visible)]
            return json.dumps({"totalClients": len(clients), "clients": clients}, indent=2)
        if path == "list":
            return json.dumps(DEBUG_LIST, indent=2)
        if path in ("configz", "registryz", "resourcesz"):
            return "[]"
        if path == "mesh":
            return json.dumps({"rootNamespace": self.root_namespace, "trustDomain": "cluster.local"}, indent=2)
        if path in ("config_dump", "edsz", "ndsz", "ecdsz", "sidecarz", "adsz"):
            if not proxy_id:
                return NO_PROXY_ID
            p = self.find(proxy_id)
            if p is None or (scope and p.namespace != scope):
                return NOT_CONNECTED
            return json.dumps({"proxy": p.id, "path": path}, indent=2)
        if path in DEBUG_LIST:
            return "{}"
        return "404 page not found\n"


class _Crash(Exception):
    """istiod would panic here: the replica's process ends."""


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _config_dump_messages(p: SimProxy) -> list[object]:
    clusters = config_dump_shared_pb2.ClustersConfigDump(version_info="v1")
    static = clusters.static_clusters.add()
    static.cluster.Pack(cluster_pb2.Cluster(name="BlackHoleCluster"))
    dyn = clusters.dynamic_active_clusters.add(version_info="v1")
    dyn.cluster.Pack(cluster_pb2.Cluster(name=f"outbound|80||{p.pod}.{p.namespace}.svc.cluster.local"))
    return [
        config_dump_pb2.BootstrapConfigDump(),
        clusters,
        config_dump_shared_pb2.ListenersConfigDump(version_info="v1"),
        config_dump_shared_pb2.ScopedRoutesConfigDump(),
        config_dump_shared_pb2.RoutesConfigDump(),
        config_dump_pb2.SecretsConfigDump(),
        config_dump_shared_pb2.EcdsConfigDump(),
    ]


class SimulatorService:
    """The ADS endpoint of one simulated replica."""

    def __init__(self, replica: SimReplica) -> None:
        self.replica = replica

    async def stream(
        self, requests: AsyncIterator[discovery_pb2.DiscoveryRequest], context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[bytes]:
        r = self.replica
        identity: tuple[str, str] | None = None
        node = None
        try:
            async for req in requests:
                r.requests += 1
                if node is None:
                    if not req.node.id:
                        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "missing node information")
                    node = req.node
                    identity = r.identify(context, node)
                if r.faults.hang:
                    await asyncio.Event().wait()
                if r.faults.latency:
                    await asyncio.sleep(r.faults.latency)
                if r.faults.gate is not None:
                    await r.faults.gate.wait()
                if r.faults.fail_code is not None:
                    raise _Abort(r.faults.fail_code, "simulated failure")
                # istio.io/debug always wanted an identity; syncz/config_dump only from 1.27.8/1.28.5/1.29.1.
                needs_identity = (DEBUG, SYNCZ, CONFIG_DUMP) if r.behaviour.debug_types_need_identity else (DEBUG,)
                if req.type_url in needs_identity and identity is None:
                    raise _Abort(grpc.StatusCode.UNAUTHENTICATED, "authentication required")
                if req.type_url == SYNCZ:
                    answer = r.syncz(r.caller_scope(identity))
                elif req.type_url == CONFIG_DUMP:
                    answer = r.config_dump(list(req.resource_names), r.caller_scope(identity))
                elif req.type_url == DEBUG:
                    assert identity is not None
                    answer = r.debug(list(req.resource_names), identity)
                else:
                    # A real istiod would serve Envoy types; the simulator answers them empty.
                    answer = r._envelope(req.type_url).SerializeToString()
                yield answer if r.faults.garbage is None else r.faults.garbage(req.type_url, answer)
        except _Abort as err:
            await context.abort(err.code, err.message)
        except _Crash as err:
            log.error("%s: %s", r.pod_name, err)
            r.crashed = True
            if r.on_crash is not None:
                r.on_crash()  # the server goes away (later calls: connection refused), as a dead process's would
            # What a gRPC client reports when the peer's process exits under a call (a stopping grpc.aio server
            # would instead say GOAWAY "Cancelling all calls", which a clean shutdown also says).
            await context.abort(grpc.StatusCode.UNAVAILABLE, "Stream removed (Socket closed)")


def make_mesh(
    replicas: int, proxies: int, *, namespaces: int = 4, seed: int = 7, version: str = "1.30.3",
    tokens: Mapping[str, tuple[str, str]] | None = None,
) -> list[SimReplica]:
    """`proxies` proxies spread round-robin over `replicas` replicas, in a few namespaces and states."""
    rng = random.Random(seed)
    out = [SimReplica(f"istiod-{i}", version=version, tokens=dict(tokens or {})) for i in range(replicas)]
    now = time.time()
    for n in range(proxies):
        ns = f"ns-{n % namespaces}"
        states = {t: "SYNCED" for t in ("CDS", "LDS", "EDS", "RDS")}
        roll = rng.random()
        if roll < 0.05:
            states["LDS"] = "ERROR"
        elif roll < 0.12:
            states["EDS"] = "STALE"
        elif roll < 0.15:
            states["RDS"] = "NOT_SENT"
        proxy = SimProxy(f"app-{n:05d}-{rng.randrange(16**5):05x}", ns, states=states,
                         updated=now - rng.uniform(1, 600))
        out[n % replicas].proxies.append(proxy)
    return out


def build_simulator_server(
    replica: SimReplica, listen: str, *, tls: tuple[bytes, bytes, bytes | None] | None = None,
    max_message_bytes: int = 256 * 1024 * 1024,
) -> tuple[grpc.aio.Server, int]:
    """A gRPC server for one replica. `tls` is (cert, key, client CA or None)."""
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
    ])
    service = SimulatorService(replica)
    handler = grpc.method_handlers_generic_handler(
        "envoy.service.discovery.v3.AggregatedDiscoveryService",
        {"StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
            service.stream, request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
            response_serializer=None)},
    )
    server.add_generic_rpc_handlers((handler,))
    if tls is None:
        port = server.add_insecure_port(listen)
    else:
        cert, key, ca = tls
        # gRPC Python cannot verify a client certificate "if given" (istiod does): with a CA, require one.
        creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)
        port = server.add_secure_port(listen, creds)
    return server, port


