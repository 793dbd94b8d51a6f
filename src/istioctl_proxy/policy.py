"""Request → plan: which replicas to ask and how to merge, decided per type URL and debug path.

One table per kind of request, so the rules can be read (and documented in docs/merge-rules.md) in one
place. Unknown debug paths fall back to asking one healthy replica.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from .errors import InvalidRequest, UnsupportedType

SYNCZ = "istio.io/debug/syncz"
CONFIG_DUMP = "istio.io/debug/config_dump"
DEBUG = "istio.io/debug"
SUPPORTED_TYPES = (SYNCZ, CONFIG_DUMP, DEBUG)


class Merge(enum.Enum):
    """How the answers of several replicas become one."""

    SYNCZ = "syncz"  # concatenate ClientConfigs, dedup by node id, control plane `<external>`
    PROXY_HOLDER = "proxy-holder"  # config_dump: the one replica that holds the proxy
    JSON_ARRAY = "json-array"  # debug body: concatenate per-replica JSON arrays
    JSON_CLIENTS = "json-clients"  # debug body: {"totalClients": N, "clients": [...]}: sum and concatenate
    JSON_OBJECT = "json-object"  # debug body: merge per-replica objects by key
    DEBUG_PROXY = "debug-proxy"  # debug body: the replica that holds ?proxyID= (others: "not connected")
    ANY_ONE = "any-one"  # debug body: the same cluster-wide data everywhere: one healthy replica's


@dataclass(frozen=True)
class Plan:
    type_url: str
    merge: Merge
    resource_names: tuple[str, ...]
    debug_path: str = ""  # for istio.io/debug: the path without query
    proxy_id: str = ""  # the proxy a request is about, if any

    @property
    def fan_out(self) -> bool:
        return self.merge is not Merge.ANY_ONE


# istio.io/debug paths (pilot/pkg/xds/debug.go AddDebugHandlers). Per-replica data is merged; data that is
# the same on every replica with the same config is taken once.
DEBUG_PATHS: dict[str, Merge] = {
    "syncz": Merge.JSON_ARRAY,
    "adsz": Merge.JSON_CLIENTS,
    "connections": Merge.JSON_CLIENTS,
    "instancesz": Merge.JSON_OBJECT,
    "endpointShardz": Merge.JSON_OBJECT,
    "endpointz": Merge.JSON_OBJECT,
    "config_dump": Merge.DEBUG_PROXY,
    "edsz": Merge.DEBUG_PROXY,
    "ndsz": Merge.DEBUG_PROXY,
    "ecdsz": Merge.DEBUG_PROXY,
    "sidecarz": Merge.DEBUG_PROXY,
    "configz": Merge.ANY_ONE,
    "registryz": Merge.ANY_ONE,
    "resourcesz": Merge.ANY_ONE,
    "list": Merge.ANY_ONE,
    "mesh": Merge.ANY_ONE,
    "push_status": Merge.ANY_ONE,
    "pushcontext": Merge.ANY_ONE,
    "authorizationz": Merge.ANY_ONE,
    "telemetryz": Merge.ANY_ONE,
    "networkz": Merge.ANY_ONE,
    "mcsz": Merge.ANY_ONE,
    "inject": Merge.ANY_ONE,
    "clusterz": Merge.ANY_ONE,
    "krtz": Merge.ANY_ONE,
    "ambientz": Merge.ANY_ONE,
}

# Paths a namespace-scoped caller may use (istiod's activeNamespaceDebuggers in debuggen.go).
NAMESPACE_DEBUG_PATHS = frozenset({"config_dump", "ndsz", "edsz"})

MAX_RESOURCE_NAME = 4096


def plan_request(type_url: str, resource_names: list[str] | tuple[str, ...]) -> Plan:
    """Decide how to serve one DiscoveryRequest; raises a ProxyError for requests we cannot serve."""
    names = tuple(resource_names)
    for name in names:
        if len(name) > MAX_RESOURCE_NAME:
            raise InvalidRequest(f"resource name longer than {MAX_RESOURCE_NAME} bytes")
    if type_url == SYNCZ:
        return Plan(type_url, Merge.SYNCZ, names)
    if type_url == CONFIG_DUMP:
        # istiod answers anything but exactly one name with an empty response; so do we (in merge).
        return Plan(type_url, Merge.PROXY_HOLDER, names, proxy_id=names[0] if len(names) == 1 else "")
    if type_url == DEBUG:
        if len(names) != 1:
            raise InvalidRequest(f"{DEBUG} needs exactly one resource name (a debug path), got {len(names)}")
        try:
            parts = urlsplit(names[0])
        except ValueError as err:  # e.g. "//[x": an unbalanced IPv6 bracket
            raise InvalidRequest(f"debug path {names[0][:100]!r} is not a valid path: {err}") from None
        path = parts.path.strip("/")
        query = parse_qs(parts.query)
        proxy_id = query.get("proxyID", [""])[0]
        merge = DEBUG_PATHS.get(path, Merge.ANY_ONE)
        if path == "adsz" and proxy_id:
            merge = Merge.DEBUG_PROXY
        return Plan(type_url, merge, names, debug_path=path, proxy_id=proxy_id)
    if not type_url:
        raise InvalidRequest(f"request has no type_url; supported: {', '.join(SUPPORTED_TYPES)}")
    raise UnsupportedType(
        f"type {type_url[:200]!r} is not served by istioctl-proxy (it aggregates istiod debug types, it is not "
        f"a control plane); supported: {', '.join(SUPPORTED_TYPES)}"
    )
