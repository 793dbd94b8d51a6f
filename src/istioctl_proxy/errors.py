"""The proxy's errors, and the one place that maps them to gRPC status codes.

ProxyError
├── InvalidRequest      INVALID_ARGUMENT   the caller's request is malformed
├── UnsupportedType     UNIMPLEMENTED      a type URL we do not serve (we are not a control plane)
├── Unauthenticated     UNAUTHENTICATED    no or unusable credentials
├── PermissionDenied    PERMISSION_DENIED  credentials valid, request out of scope
├── Unavailable         UNAVAILABLE        a dependency (e.g. the TokenReview API) cannot answer now
│   ├── NoReplicas      UNAVAILABLE        discovery knows no istiod replica
│   └── StreamTooOld    UNAVAILABLE        the stream reached --max-stream-age: reconnect
├── ResourceExhausted   RESOURCE_EXHAUSTED a stream cap, the send budget, a slow reader's send timeout, or a
│                                          TokenReview limit
├── StreamTimeout       DEADLINE_EXCEEDED  no first request, or no request for the idle timeout
├── Internal            INTERNAL           an unexpected error (a bug): logged with its traceback, counted
└── UpstreamFailed      (the upstream's)   replicas failed; carries the most telling upstream code

ConfigError: bad configuration at start-up; the CLI prints it as one line and exits 2.
"""

from __future__ import annotations

import grpc


class ConfigError(Exception):
    """Invalid flags, environment or files, found before serving."""


class ProxyError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(ProxyError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class UnsupportedType(ProxyError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Unauthenticated(ProxyError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ProxyError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(ProxyError):
    code = grpc.StatusCode.UNAVAILABLE


class NoReplicas(Unavailable):
    pass


class StreamTooOld(Unavailable):
    pass


class ResourceExhausted(ProxyError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class StreamTimeout(ProxyError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(ProxyError):
    """What the caller sees of an unexpected exception: a short generic message, never its text."""

    code = grpc.StatusCode.INTERNAL


class UpstreamFailed(ProxyError):
    """Raised when the failure policy turns replica failures into a failed call."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code
