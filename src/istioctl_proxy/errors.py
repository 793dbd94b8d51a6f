"""The proxy's errors, and the one place that turns an exception into what a caller sees (`status_of`).

ProxyError                 `message` is what a caller may be told; str(err) may say more, for the log only
├── InvalidRequest      INVALID_ARGUMENT   the caller's request is malformed
│   └── GoURLError                         a debug name Go's net/url (so istiod) refuses; the text is Go's
├── UnsupportedType     UNIMPLEMENTED      a type URL we do not serve (we are not a control plane)
├── Unauthenticated     UNAUTHENTICATED    no or unusable credentials
├── PermissionDenied    PERMISSION_DENIED  credentials valid, request out of scope
├── Unavailable         UNAVAILABLE        a dependency cannot answer now
│   ├── NoReplicas                         discovery knows no istiod replica
│   ├── StreamTooOld                       the stream reached --max-stream-age: reconnect
│   └── TokenReviewUnavailable             the TokenReview API gave no verdict (the detail is log-only)
├── ResourceExhausted   RESOURCE_EXHAUSTED a stream cap, the send budget, a slow reader's send timeout
│   └── TokenReviewLimited                 a TokenReview limit ("rate", "peer-rate", "peer-concurrency")
├── StreamTimeout       DEADLINE_EXCEEDED  no first request, or no request for the idle timeout
├── Internal            INTERNAL           an unexpected error (a bug): logged with its traceback, counted
├── UpstreamFailed      (the upstream's)   replicas failed; carries the most telling upstream code
└── ReplicaFault        never a status     one replica's failure, in text that replica chose
    ├── UpstreamError                      the replica's status (`code`), or no answer
    └── WireError                          bytes that are not the protobuf they claim to be

ConfigError: bad configuration at start-up; the CLI prints it as one line and exits 2. Not a ProxyError:
no caller is involved.
└── CaRejected                             the istio-ca-root-cert ConfigMap holds no usable root

A ReplicaFault is data, not a caller's answer: the fan-out and the merge turn it into that replica's entry
in the failed-replicas trailer (escaped there). One escaping to `status_of` is a bug, so the caller gets
INTERNAL and a generic message — never the replica's text — as for any exception outside the tree.
Private control-flow signals (kubernetes/reflector.py `_Gone`, the simulator's `_Crash`/`_Abort`) never
leave their module and stay there.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc


class ConfigError(Exception):
    """Invalid flags, environment or files, found before serving."""


class CaRejected(ConfigError):
    """The istio-ca-root-cert ConfigMap holds a value that is not a usable root bundle (and no good one is known)."""


class ProxyError(Exception):
    """An error with a gRPC status code. `message` is what a caller may see; `detail`, when given, is what
    str() and so the log show instead (it may name things a caller must not learn)."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, detail: str = "") -> None:
        super().__init__(detail or message)
        self.message = message


class InvalidRequest(ProxyError):
    """The caller's request is malformed (INVALID_ARGUMENT)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class GoURLError(InvalidRequest):
    """Where Go's url.Parse / url.ParseQuery return an error (the text is Go's)."""


class UnsupportedType(ProxyError):
    """A type URL the proxy does not serve: it is not a control plane (UNIMPLEMENTED)."""

    code = grpc.StatusCode.UNIMPLEMENTED


class Unauthenticated(ProxyError):
    """No or unusable credentials (UNAUTHENTICATED)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ProxyError):
    """Valid credentials, request out of the caller's scope (PERMISSION_DENIED)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(ProxyError):
    """A dependency cannot answer now; retrying later may work (UNAVAILABLE)."""

    code = grpc.StatusCode.UNAVAILABLE


class NoReplicas(Unavailable):
    """Discovery knows no istiod replica."""

    pass


class StreamTooOld(Unavailable):
    """The stream reached --max-stream-age: reconnect."""

    pass


class TokenReviewUnavailable(Unavailable):
    """The TokenReview could not be made (API server unreachable, forbidden, ...): not a verdict on the token.

    UNAVAILABLE rather than UNAUTHENTICATED, so that an outage is not reported to the user as a bad token.
    `detail` (str()) is for the proxy's log only: it can name the reviewer's own identity and RBAC.
    """

    def __init__(self, detail: str) -> None:
        super().__init__("cannot verify the bearer token now (Kubernetes TokenReview is unavailable); retry later",
                         detail=detail)


class ResourceExhausted(ProxyError):
    """A stream cap, the send budget or a slow reader's send timeout (RESOURCE_EXHAUSTED)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class TokenReviewLimited(ResourceExhausted):
    """A new TokenReview would exceed a limit (`limit`: "rate", "peer-rate" or "peer-concurrency")."""

    def __init__(self, limit: str) -> None:
        super().__init__("too many bearer tokens to verify right now; retry in a few seconds",
                         detail=f"TokenReview limit {limit!r} reached")
        self.limit = limit


class StreamTimeout(ProxyError):
    """No first request, or no request for the idle timeout (DEADLINE_EXCEEDED)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(ProxyError):
    """What the caller sees of an unexpected exception: a short generic message, never its text."""

    code = grpc.StatusCode.INTERNAL


class UpstreamFailed(ProxyError):
    """Raised when the failure policy turns replica failures into a failed call."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


class ReplicaFault(ProxyError):
    """One replica's failure, described in text the replica chose: never shown to a caller as a status."""


class UpstreamError(ReplicaFault):
    """A replica answered with a status other than OK, or could not be asked (`code` says which)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message, detail=f"{code.name}: {message}")
        self.code = code


class WireError(ReplicaFault):
    """Bytes that do not parse as the protobuf message (or field) they should be."""


@dataclass(frozen=True)
class Status:
    """What a caller is sent for an error: a code and a message that fits a trailer."""

    code: grpc.StatusCode
    message: str
    unexpected: bool = False  # a bug: whoever sends the status logs the traceback and counts it


INTERNAL_MESSAGE = "internal error in istioctl-proxy (logged there)"


def status_of(err: BaseException) -> Status:
    """The one mapping from an exception to the gRPC status a caller gets.

    A ProxyError gives its code and `message` (cut to fit a trailer). A ReplicaFault or any exception outside
    the tree is a bug: INTERNAL with a generic message, since its text may be a replica's or hold secrets.
    """
    if isinstance(err, ProxyError) and not isinstance(err, ReplicaFault):
        return Status(err.code, _fit_trailer(err.message))
    return Status(Internal.code, INTERNAL_MESSAGE, unexpected=True)


# grpc-message travels in a trailer, percent-encoded (up to 3x), and clients drop trailers past 8-16 KiB:
# a message echoing a huge caller input would turn a precise status into "Stream removed".
_MAX_MESSAGE_BYTES = 1024


def _fit_trailer(message: str) -> str:
    raw = message.encode()
    if len(raw) <= _MAX_MESSAGE_BYTES:
        return message
    return raw[:_MAX_MESSAGE_BYTES].decode(errors="ignore") + "... (truncated)"


__all__ = [
    "INTERNAL_MESSAGE",
    "CaRejected",
    "ConfigError",
    "GoURLError",
    "Internal",
    "InvalidRequest",
    "NoReplicas",
    "PermissionDenied",
    "ProxyError",
    "ReplicaFault",
    "ResourceExhausted",
    "Status",
    "StreamTimeout",
    "StreamTooOld",
    "TokenReviewLimited",
    "TokenReviewUnavailable",
    "Unauthenticated",
    "Unavailable",
    "UnsupportedType",
    "UpstreamError",
    "UpstreamFailed",
    "WireError",
    "status_of",
]
