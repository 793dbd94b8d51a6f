"""The values the whole data path shares: how answers are merged (`Merge`), what a request asks (`Plan`),
one replica's outcome (`Answer`) and the merged outcome (`Result`); and one replica's readiness (`Probe`).

They live here, not beside the code that makes them, so that merge.py, metrics.py and server.py can use them
without importing the network layer (fanout.py, upstream.py) or the aggregator, and statuspage.py can show
admin.py's probes without importing admin.py (which builds the status page).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import grpc

from .discovery import Replica

__all__ = ["Answer", "Merge", "Plan", "Probe", "Result"]


class Merge(enum.Enum):
    """How the answers of several replicas become one."""

    SYNCZ = "syncz"  # concatenate ClientConfigs, dedup by node id, control plane `<external>`
    PROXY_HOLDER = "proxy-holder"  # config_dump: the one replica that holds the proxy
    JSON_ARRAY = "json-array"  # debug body: concatenate per-replica JSON arrays
    JSON_CLIENTS = "json-clients"  # debug body: {"totalClients": N, "clients": [...]}: sum and concatenate
    JSON_OBJECT = "json-object"  # debug body: merge per-replica objects by key
    DEBUG_PROXY = "debug-proxy"  # debug body: the replica that holds ?proxyID= (others: "not connected")
    ANY_ONE = "any-one"  # debug body: the same cluster-wide data everywhere: one healthy replica's
    NOT_FOUND = "not-found"  # a debug path we do not serve: istiod's "404 page not found", no replica asked


@dataclass(frozen=True)
class Plan:
    """What policy.py decided for one request: which type, which merge, which names."""

    type_url: str
    merge: Merge
    resource_names: tuple[str, ...]
    debug_path: str = ""  # for istio.io/debug: the path without query
    proxy_id: str = ""  # the proxy a request is about, if any
    # istiod will look a proxy up for this request (config_dump, or a proxy path with ?proxyID=): with an
    # empty or ambiguous proxy_id that lookup matches *any* proxy, so a scoped caller must not reach it.
    names_proxy: bool = False

    @property
    def fan_out(self) -> bool:
        """Are all replicas asked (else one healthy replica, or none)?"""
        return self.merge not in (Merge.ANY_ONE, Merge.NOT_FOUND)


@dataclass(frozen=True)
class Answer:
    """One replica's outcome: raw response bytes, or the status it failed with."""

    replica: Replica
    body: bytes | None
    code: grpc.StatusCode = grpc.StatusCode.OK
    error: str = ""
    seconds: float = 0.0
    broken: bool = False  # the connection died under this request (see fanout.connection_broke)

    @property
    def ok(self) -> bool:
        """Did the replica answer (with bytes, not necessarily well-formed ones)?"""
        return self.body is not None


@dataclass
class Result:
    """One request's merged response, with the answers it came from."""

    body: bytes
    plan: Plan
    resources: int
    answers: list[Answer]
    failures: list[tuple[str, str]] = field(default_factory=list)  # (replica label, reason)
    shared: str = ""  # "" (own fan-out), "coalesced" or "cached": see coalesce.py
    held: int = 0  # bytes its own fan-out held at the peak (answers + merge): the next one's reservation


@dataclass(frozen=True)
class Probe:
    """One replica at the last readiness probe (admin.Readiness)."""

    replica: Replica
    up: bool
    why: str = ""  # when not up
