"""Request → plan: which replicas to ask and how to merge, decided per type URL and debug path.

One table per kind of request, so the rules can be read (and documented in docs/merge-rules.md) in one
place. Resource names are normalised the way istiod does (a set), and an istio.io/debug name is checked
with a port of Go's net/url (gourl.py) against a per-path allowlist before any replica sees it: istiod
dereferences the result of a failed url.Parse, so one unparsable name would take every replica down.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import gourl
from .errors import InvalidRequest, UnsupportedType
from .model import Merge, Plan

SYNCZ = "istio.io/debug/syncz"
CONFIG_DUMP = "istio.io/debug/config_dump"
DEBUG = "istio.io/debug"
SUPPORTED_TYPES = (SYNCZ, CONFIG_DUMP, DEBUG)


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
    "cachez": Merge.ANY_ONE,
}

# Debug paths whose handler looks up ?proxyID= (debug.go getDebugConnection).
PROXY_PATHS = frozenset({"config_dump", "edsz", "ndsz", "ecdsz", "sidecarz", "adsz", "telemetryz"})

# The query parameters each path's handler reads (debug.go), and nothing else. Left out on purpose:
# adsz?push=true (pushes to every proxy, on every replica we fan out to) and cachez?clear=true.
_PRETTY = frozenset({"pretty"})
DEBUG_QUERY: dict[str, frozenset[str]] = {
    **{path: _PRETTY for path in DEBUG_PATHS},
    "syncz": frozenset({"namespace", "pretty"}),
    "adsz": frozenset({"proxyID", "pretty"}),
    "config_dump": frozenset({"proxyID", "types", "include_eds", "pretty"}),
    "edsz": frozenset({"proxyID", "include_eds", "pretty"}),
    "ndsz": frozenset({"proxyID", "include_eds", "pretty"}),
    "ecdsz": frozenset({"proxyID", "include_eds", "pretty"}),
    "sidecarz": frozenset({"proxyID", "pretty"}),
    "telemetryz": frozenset({"proxyID", "pretty"}),
    "cachez": frozenset({"sizes", "pretty"}),
}

# Paths a namespace-scoped caller may use (istiod's activeNamespaceDebuggers in debuggen.go).
NAMESPACE_DEBUG_PATHS = frozenset({"config_dump", "ndsz", "edsz"})

MAX_RESOURCE_NAME = 4096
MAX_RESOURCE_NAMES = 64  # distinct names per request: istioctl sends at most one


@dataclass(frozen=True)
class DebugName:
    """An istio.io/debug name as istiod's handlers will read it."""

    path: str
    query: dict[str, str]  # decoded; each parameter at most once
    known: bool = True  # False: a plain path we do not serve (answered like istiod's mux: 404)


_NOT_PRINTABLE_ASCII = re.compile(rb"[^\x21-\x7e]")
# A path istiod's mux would look up as it is: no '/', '.' or '%' (those can redirect, clean or unescape).
_PLAIN_PATH = re.compile(r"[A-Za-z0-9_-]+")


def _shown(name: str) -> str:
    """A caller's string in an error message: bounded, and every non-printable character escaped."""
    return ascii(name[:100]) + ("..." if len(name) > 100 else "")


def parse_debug_name(name: str) -> DebugName:
    """Check a debug name the way Go's net/url and istiod's handlers will read it; InvalidRequest if not served.

    Only printable ASCII, no '#', no scheme or host, a known path written plainly, each query parameter
    one the path's handler reads, at most once, decoding (as Go decodes it) to printable text.
    """
    raw = name.encode("utf-8", "surrogatepass")
    found = _NOT_PRINTABLE_ASCII.search(raw)
    if found is not None:
        bad = raw[found.start()]
        raise InvalidRequest(
            f"debug name {_shown(name)} contains byte 0x{bad:02x}: only printable ASCII without spaces is "
            "accepted (percent-encode anything else)"
        )
    if b"#" in raw:
        raise InvalidRequest(f"debug name {_shown(name)} has a fragment ('#'): istiod's handlers never see one")
    try:
        url = gourl.parse(raw)
        gourl.parse(b"/debug/" + raw)  # what istiod's http.NewRequest parses
    except gourl.GoURLError as err:
        raise InvalidRequest(f"debug name {_shown(name)} is not a valid path (Go's net/url, as istiod parses it: "
                             f"{err})") from None
    if url.scheme or url.opaque or url.host or url.user is not None:
        raise InvalidRequest(f"debug name {_shown(name)} must be a path such as 'syncz', not a URL")
    raw_path = raw.partition(b"?")[0]
    path = url.path.decode("ascii")
    if path not in DEBUG_PATHS and raw_path == url.path and _PLAIN_PATH.fullmatch(path):
        # istiod's mux answers an unknown path "404 page not found" whatever the query, and istioctl (>= 1.26)
        # then falls back to `list`: we answer the same without asking a replica (pprof, force_disconnect,
        # paths of newer istiods we have not vetted never reach one).
        return DebugName(path, {}, known=False)
    if path not in DEBUG_PATHS or raw_path != url.path:
        raise InvalidRequest(
            f"debug path {_shown(raw_path.decode('ascii'))} is not one istioctl-proxy serves (written plainly, "
            f"without '/' or '%'); served: {', '.join(sorted(DEBUG_PATHS))}"
        )
    parsed = gourl.parse_query(url.raw_query)
    if parsed.error:
        raise InvalidRequest(f"query of debug name {_shown(name)} is not valid for Go's url.ParseQuery: {parsed.error}")
    allowed = DEBUG_QUERY[path]
    query: dict[str, str] = {}
    for key_bytes, values in parsed.values.items():
        key = key_bytes.decode("utf-8", "replace")
        if key not in allowed:
            raise InvalidRequest(
                f"debug path {path!r} takes no parameter {_shown(key)}; it takes: {', '.join(sorted(allowed))}"
            )
        if len(values) > 1:
            raise InvalidRequest(f"parameter {key!r} given {len(values)} times in debug name {_shown(name)}")
        try:
            value = values[0].decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest(f"parameter {key!r} of debug name {_shown(name)} is not UTF-8") from None
        if not value.isprintable():
            raise InvalidRequest(f"parameter {key!r} of debug name {_shown(name)} decodes to a control character")
        query[key] = value
    return DebugName(path, query)


def plan_request(type_url: str, resource_names: list[str] | tuple[str, ...]) -> Plan:
    """Decide how to serve one DiscoveryRequest; raises a ProxyError for requests we cannot serve."""
    # istiod keeps a request's names as a set (sets.New(ResourceNames...)): ["a", "a"] is one name.
    names = tuple(dict.fromkeys(resource_names))
    if len(names) > MAX_RESOURCE_NAMES:
        raise InvalidRequest(f"{len(names)} distinct resource names; at most {MAX_RESOURCE_NAMES} are accepted")
    for name in names:
        if len(name) > MAX_RESOURCE_NAME:
            raise InvalidRequest(f"resource name longer than {MAX_RESOURCE_NAME} bytes")
    if type_url == SYNCZ:
        return Plan(type_url, Merge.SYNCZ, names)
    if type_url == CONFIG_DUMP:
        # istiod answers anything but exactly one name with an empty response; one name is matched as a
        # substring of connection ids, so "" names any proxy (proxy_id "" then means "none or any").
        return Plan(type_url, Merge.PROXY_HOLDER, names, proxy_id=names[0] if len(names) == 1 else "",
                    names_proxy=True)
    if type_url == DEBUG:
        if len(names) != 1:
            raise InvalidRequest(f"{DEBUG} needs exactly one resource name (a debug path), got {len(names)}")
        debug = parse_debug_name(names[0])
        if not debug.known:
            return Plan(type_url, Merge.NOT_FOUND, names, debug_path=debug.path)
        proxy_id = debug.query.get("proxyID", "")
        merge = DEBUG_PATHS[debug.path]
        if debug.path in ("adsz", "telemetryz") and proxy_id:
            merge = Merge.DEBUG_PROXY
        # config_dump, edsz, ... always look a proxy up ("" = none given); adsz and telemetryz only when asked.
        names_proxy = merge is Merge.DEBUG_PROXY or (debug.path in PROXY_PATHS and "proxyID" in debug.query)
        return Plan(type_url, merge, names, debug_path=debug.path, proxy_id=proxy_id, names_proxy=names_proxy)
    if not type_url:
        raise InvalidRequest(f"request has no type_url; supported: {', '.join(SUPPORTED_TYPES)}")
    raise UnsupportedType(
        f"type {type_url[:200]!r} is not served by istioctl-proxy (it aggregates istiod debug types, it is not "
        f"a control plane); supported: {', '.join(SUPPORTED_TYPES)}"
    )


__all__ = [
    "CONFIG_DUMP",
    "DEBUG",
    "DEBUG_PATHS",
    "DEBUG_QUERY",
    "MAX_RESOURCE_NAME",
    "MAX_RESOURCE_NAMES",
    "NAMESPACE_DEBUG_PATHS",
    "PROXY_PATHS",
    "SUPPORTED_TYPES",
    "SYNCZ",
    "DebugName",
    "parse_debug_name",
    "plan_request",
]
