"""The status page: replicas and the merged proxy list with per-type sync state, as the proxy sees them.

The data is one syncz per replica with the proxy's *own* credentials (identity mode), so the page shows the
whole mesh whoever looks at it: that is why it is opt-in (--admin-status-page) and answers only on the
admin port. The browser side is static HTML/JS/CSS (static/) polling `/api/status`; it builds the DOM
with textContent only, because proxy names come from the proxies themselves.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Protocol

from aiohttp import web
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.status.v3 import csds_pb2

from . import wire
from .client import SHORT_TYPES
from .discovery import Replica, ReplicaSet
from .fanout import FanOut
from .metrics import Metrics
from .model import Answer, Probe
from .policy import SYNCZ


class Readiness(Protocol):
    """What the page shows of the proxy's readiness. admin.Readiness provides it; admin.py imports this
    module to build the page, so the page names only this Protocol, never admin.py."""

    @property
    def ready(self) -> bool:
        """Is at least one replica reachable?"""
        ...

    @property
    def reason(self) -> str:
        """Why (not) ready, in one line."""
        ...

    @property
    def probes(self) -> Mapping[str, Probe]:
        """The last probe of each replica, by address."""
        ...

    @property
    def by_revision(self) -> Mapping[str, tuple[int, int]]:
        """Replicas per revision at the last probe: (known, reachable)."""
        ...

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Json = dict[str, Any]

# Worst first: a proxy's overall state is its worst type's.
STATES = ("ERROR", "STALE", "NOT SENT", "SYNCED")
_CORE_TYPES = ("CDS", "LDS", "EDS", "RDS")
_ASSETS = {"/": ("status.html", "text/html"), "/status.js": ("status.js", "text/javascript"),
           "/status.css": ("status.css", "text/css")}


def state_name(status: int) -> str | None:
    """csds ConfigStatus → the page's word; None for UNKNOWN (istioctl shows it as IGNORED, not subscribed)."""
    name = csds_pb2.ConfigStatus.Name(status)
    if name == "UNKNOWN":
        return None
    return "NOT SENT" if name == "NOT_SENT" else name


def worst(states: Iterable[str]) -> str:
    """The worst of some sync states (STATES order), SYNCED when there are none."""
    present = set(states)
    return next((s for s in STATES if s in present), "SYNCED")


def _meta(node: base_pb2.Node, key: str) -> str:
    value = node.metadata.fields.get(key)
    return value.string_value if value is not None else ""


def proxy_row(cfg: csds_pb2.ClientConfig, istiod: str) -> Json:
    """One proxy's row of the page from its syncz ClientConfig (istiod: the replica that holds it)."""
    types: dict[str, str] = {}
    errors: dict[str, str] = {}
    updated = 0.0
    for x in cfg.generic_xds_configs:
        state = state_name(x.config_status)
        if state is None:
            continue
        short = SHORT_TYPES.get(x.type_url, x.type_url.rpartition(".")[2])
        types[short] = state
        if x.error_state.details:
            errors[short] = x.error_state.details
        if x.HasField("last_updated"):
            updated = max(updated, x.last_updated.ToNanoseconds() / 1e9)
    node = cfg.node
    namespace = _meta(node, "NAMESPACE") or node.id.rpartition(".")[2]
    return {"id": node.id, "namespace": namespace, "cluster": _meta(node, "CLUSTER_ID"),
            "version": _meta(node, "ISTIO_VERSION"), "istiod": istiod, "types": types, "errors": errors,
            "state": worst(types.values()), "updated": updated or None}


def identity_of(identifier: str | None) -> tuple[str, str]:
    """(ID, version) from a syncz ControlPlane identifier: {"Component","ID","Info":{"version",...}}."""
    try:
        data = json.loads(identifier or "")
    except ValueError:
        return "", ""
    if not isinstance(data, dict):
        return "", ""
    info = data.get("Info")
    version = info.get("version", "") if isinstance(info, dict) else ""
    return str(data.get("ID", "")), str(version)


@dataclass
class ReplicaView:
    """One replica's syncz, decoded: who it is and which proxies it holds."""

    istiod: str = ""
    version: str = ""
    proxies: list[Json] = field(default_factory=list)
    error: str = ""


def read_syncz(answer: Answer) -> ReplicaView:
    """One replica's syncz answer as the page shows it; a failed or malformed answer becomes `error`."""
    if answer.body is None:
        return ReplicaView(error=f"{answer.code.name}: {answer.error}")
    try:
        view = wire.view_response(answer.body)
        istiod, version = identity_of(view.identifier())
        label = istiod or answer.replica.label
        rows = [proxy_row(wire.client_config(view.resource_any(i)), label) for i in range(len(view.resources))]
    except (wire.WireError, ValueError) as err:  # protobuf DecodeError is a ValueError
        return ReplicaView(error=f"malformed syncz answer: {err}")
    return ReplicaView(istiod, version, rows)


class StatusPage:
    """Builds the snapshot behind /api/status and serves the page's static files."""

    def __init__(self, replicas: ReplicaSet, fanout: FanOut, node: base_pb2.Node, metrics: Metrics,
                 readiness: Readiness, *, timeout: float = 10.0, min_interval: float = 2.0) -> None:
        self.replicas = replicas
        self.fanout = fanout
        self.metrics = metrics
        self.readiness = readiness
        self.timeout = timeout
        # Many open tabs must not multiply the load on istiod: one fan-out per min_interval, shared.
        self.min_interval = min_interval
        self._request = discovery_pb2.DiscoveryRequest(type_url=SYNCZ, node=node).SerializeToString()
        self._cached: tuple[float, Json] | None = None
        # Last identity each address answered with: a replica that fails now still shows its name.
        self._known: dict[str, tuple[str, str]] = {}
        self._lock = asyncio.Lock()
        static = resources.files("istioctl_proxy") / "static"
        self._assets = {path: ((static / name).read_bytes(), kind) for path, (name, kind) in _ASSETS.items()}

    async def snapshot(self) -> Json:
        """The /api/status document; one fan-out per `min_interval`, shared by every viewer."""
        async with self._lock:
            if self._cached is not None and time.monotonic() - self._cached[0] < self.min_interval:
                return self._cached[1]
            snap = await self._build()
            self._cached = (time.monotonic(), snap)
            return snap

    async def _build(self) -> Json:
        replicas = self.replicas.current()
        answers = await self.fanout.all(replicas, self._request, (), self.timeout) if replicas else []
        views = [(a.replica, read_syncz(a)) for a in answers]
        self._known = {a: v for a, v in self._known.items() if a in {r.address for r in replicas}}
        proxies = self._merge_proxies(v for _, v in views)
        types = sorted({t for p in proxies for t in p["types"]},
                       key=lambda t: (_CORE_TYPES.index(t) if t in _CORE_TYPES else len(_CORE_TYPES), t))
        return {
            "generated": time.time(),
            "ready": self.readiness.ready,
            "reason": self.readiness.reason,
            # Canary upgrades: replicas per revision at the last readiness probe.
            "revisions": [{"revision": rev, "known": n, "reachable": up}
                          for rev, (n, up) in self.readiness.by_revision.items()],
            # By istiod name, as operators know them (discovery orders by address).
            "replicas": sorted((self._replica_row(r, v) for r, v in views), key=lambda r: (r["name"], r["address"])),
            "proxies": proxies,
            "namespaces": sorted({p["namespace"] for p in proxies}),
            "types": types,
            "states": list(reversed(STATES)),
        }

    def _replica_row(self, replica: Replica, view: ReplicaView) -> Json:
        if view.istiod:
            self._known[replica.address] = (view.istiod, view.version)
        istiod, version = self._known.get(replica.address, ("", ""))
        last = self.metrics.last_answer.get(replica.address)
        probe = self.readiness.probes.get(replica.address)
        if view.error:
            health = "ERROR"
        elif probe is not None and not probe.up:
            health = "UNREACHABLE"
        else:
            health = "SERVING"
        return {"address": replica.address, "source": replica.source, "name": replica.name or istiod,
                "revision": replica.revision,
                "istiod": istiod, "version": version, "health": health,
                "error": view.error or (probe.why if probe is not None and not probe.up else ""),
                "latency_ms": round(last.seconds * 1e3, 1) if last else None,
                "proxies": None if view.error else len(view.proxies)}

    @staticmethod
    def _merge_proxies(views: Iterable[ReplicaView]) -> list[Json]:
        """Every replica's proxies; one that shows up twice (mid-reconnect) counts where it updated last."""
        by_id: dict[str, Json] = {}
        for view in views:
            for row in view.proxies:
                seen = by_id.get(row["id"])
                if seen is None or (row["updated"] or 0) > (seen["updated"] or 0):
                    by_id[row["id"]] = row
        return sorted(by_id.values(), key=lambda p: (p["namespace"], p["id"]))

    def routes(self) -> dict[str, Handler]:
        """Path → handler for the admin server: /api/status and the static files."""
        routes: dict[str, Handler] = {"/api/status": self.api_status}
        for path in self._assets:
            routes[path] = self._asset(path)
        return routes

    async def api_status(self, _: web.Request) -> web.Response:
        """GET /api/status."""
        return web.json_response(await self.snapshot())

    def _asset(self, path: str) -> Handler:
        body, kind = self._assets[path]

        async def serve(_: web.Request) -> web.Response:
            return web.Response(body=body, content_type=kind, charset="utf-8")
        return serve


__all__ = ["STATES", "Readiness", "ReplicaView", "StatusPage", "identity_of", "proxy_row", "read_syncz", "state_name",
           "worst"]
