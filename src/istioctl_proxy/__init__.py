"""istioctl-proxy: one ADS address for istioctl in front of every istiod replica of an external control plane."""

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
