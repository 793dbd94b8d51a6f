"""istioctl-proxy: one ADS address for istioctl in front of every istiod replica of an external control plane.

The library surface re-exported here: `Config` → `Proxy` (`start`/`stop`) or `serve`; where replicas come from
(the `ReplicaSource` protocol, `StaticSource`, `DnsSource`, `ReplicaSet`); and the errors a caller of the
proxy sees (errors.py). Every module lists its own public names in `__all__` (modules keep plain names: the
CLI, bench/ and the tests import them directly); sim/ — the simulated istiod, the demo and a throwaway CA —
is outside that surface. README.md's Layout section maps the modules.
"""

from __future__ import annotations

from .app import Proxy, serve
from .config import Config
from .discovery import DnsSource, Replica, ReplicaSet, ReplicaSource, StaticSource
from .errors import (
    ConfigError,
    InvalidRequest,
    NoReplicas,
    PermissionDenied,
    ProxyError,
    Unauthenticated,
    Unavailable,
    UnsupportedType,
    UpstreamFailed,
)

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "DnsSource",
    "InvalidRequest",
    "NoReplicas",
    "PermissionDenied",
    "Proxy",
    "ProxyError",
    "Replica",
    "ReplicaSet",
    "ReplicaSource",
    "StaticSource",
    "Unauthenticated",
    "Unavailable",
    "UnsupportedType",
    "UpstreamFailed",
    "__version__",
    "serve",
]
