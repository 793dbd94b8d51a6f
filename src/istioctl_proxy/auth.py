"""Who is calling, and what they may see.

Two modes:
- *forward* (default): the caller's bearer token and node go to every replica unchanged, and istiod
  decides what the caller may see. The proxy only insists that a token is there.
- *identity*: the proxy talks to istiod with its own credentials, so it must enforce istiod's rule
  itself: the istio system namespace (and an allow-list) sees everything; any other namespace sees only
  its own proxies in syncz, can dump only its own proxies, and may use only a few debug paths.
"""

from __future__ import annotations

import base64
import binascii
import enum
import functools
import hashlib
import json
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
from cryptography import x509

from .errors import PermissionDenied, Unauthenticated
from .model import Plan
from .policy import CONFIG_DUMP, DEBUG, NAMESPACE_DEBUG_PATHS, SYNCZ

_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_SPIFFE = re.compile(r"^spiffe://(?P<td>[^/]+)/ns/(?P<ns>[^/]+)/sa/(?P<sa>[^/]+)$")


def jwt_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT, unverified (for cache lifetimes and reports only, never to trust a token):
    None unless `token` is three dot-separated parts whose payload is JSON with a numeric `exp`."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    exp = payload.get("exp") if isinstance(payload, dict) else None
    return float(exp) if isinstance(exp, int | float) else None


class AuthMode(enum.Enum):
    """Whose credentials go to istiod: the caller's (FORWARD) or the proxy's own (IDENTITY)."""

    FORWARD = "forward"
    IDENTITY = "identity"


@dataclass(frozen=True)
class Caller:
    """An authenticated caller. `token` is a secret: never log it (repr hides it)."""

    principal: str  # for logs: a SPIFFE id, or "bearer:<fingerprint of canonical_jwt>" (= budget_key)
    namespace: str = ""  # known in identity mode
    scope: str = ""  # namespace the proxy restricts the caller to; "" = unrestricted or istiod decides
    token: str = ""
    # istio.io/debug only: istiod's DebugGen exempts the system namespace alone (the allowed-namespaces list
    # is not consulted there), so an allowed namespace is scoped for it like any other.
    debug_scope: str = ""
    # The send budget's key once computed ("bearer:<fingerprint of canonical_jwt>"). In identity mode with
    # TokenReview it is the token, not the identity: istioctl mints every user's token for one service account (the
    # istio namespace's default), so the identity would make all users one caller.
    credential: str = ""

    def scope_for(self, type_url: str) -> str:
        """The namespace this caller is restricted to for a request of type_url ("" = none)."""
        return self.scope or (self.debug_scope if type_url == DEBUG else "")

    def __repr__(self) -> str:
        return f"Caller({self.principal!r}, scope={self.scope!r})"

    @property
    def key(self) -> str:
        """What distinguishes this caller's view, for coalescing and caching; contains no secret.

        The exact credential: a cached answer is shared only with the bytes that fetched it."""
        return self.principal if not self.token else "bearer:" + _fingerprint(self.token)

    @functools.cached_property
    def budget_key(self) -> str:
        """Who this caller is to the send budget (share, round-robin turn, queue); contains no secret.

        One credential however it is spelled: in forward mode istiod accepts several spellings of one JWT. A
        TokenReview caller is its token too, not its service account (see `credential`)."""
        if self.credential:
            return self.credential
        return self.principal if not self.token else "bearer:" + _fingerprint(canonical_jwt(self.token))


def _fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:24]


def canonical_jwt(token: str) -> str:
    """`token` with each of its three base64url parts decoded and re-encoded canonically (no padding, spare
    bits zero); a token that is not three such parts is returned unchanged. Nothing is verified.

    Go's decoders (go-oidc and go-jose: istiod's JWT_RULE; go-jose in kube-apiserver) ignore the bits of a
    part's last character that no byte uses, and go-jose checks the signature over its re-encoding of the
    decoded header and payload: an RS256 token has 16 spellings from its signature alone, up to 16 times 16
    more from its header and payload, all one credential to istiod 1.30 (verified, tests/e2e). Padding,
    which istiod refuses, is dropped too: only the token's holder can spell it, so merging it is harmless.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return token
    try:
        raw = [base64.urlsafe_b64decode(_b64url_padded(p)) for p in parts]
    except (ValueError, binascii.Error):
        return token
    return ".".join(base64.urlsafe_b64encode(r).rstrip(b"=").decode() for r in raw)


def _b64url_padded(part: str) -> str:
    # Strict alphabet (Python's decoder would otherwise skip foreign bytes, which Go rejects): "-" and "_", no
    # "+" or "/"; trailing "=" dropped, then re-padded for Python.
    part = part.rstrip("=")
    if not _B64URL.fullmatch(part) or len(part) % 4 == 1:
        raise ValueError("not base64url")
    return part + "=" * (-len(part) % 4)


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    """The token of an `authorization: Bearer <token>` entry, "" if there is none."""
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
    return ""


@functools.lru_cache(maxsize=1024)
def spiffe_ids_of_pem(pem: bytes) -> tuple[str, ...]:
    """The SPIFFE URI SANs of a PEM certificate (cached: callers present the same one on every stream)."""
    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("spiffe://"))


def parse_spiffe(uri: str) -> tuple[str, str, str] | None:
    """(trust domain, namespace, service account) of a Kubernetes-style SPIFFE id."""
    m = _SPIFFE.match(uri)
    return (m["td"], m["ns"], m["sa"]) if m else None


# (token, peer address as gRPC reports it) → (namespace, service account), or None if refused.
TokenReviewer = Callable[[str, str], Awaitable["tuple[str, str] | None"]]


@dataclass
class Authenticator:
    """Turns a call's metadata and TLS peer into a Caller, or raises Unauthenticated."""

    mode: AuthMode
    istio_namespace: str = "istio-system"
    allowed_namespaces: frozenset[str] = frozenset()
    trust_domain: str = ""  # "" accepts any trust domain that the client CA vouches for
    token_reviewer: TokenReviewer | None = None  # identity mode: Kubernetes TokenReview callers

    async def authenticate(self, context: grpc.aio.ServicerContext[object, object]) -> Caller:
        """The caller of this stream, from its metadata and TLS peer.

        Raises Unauthenticated; with TokenReview also TokenReviewUnavailable or TokenReviewLimited.
        """
        token = bearer_token(context.invocation_metadata())
        if self.mode is AuthMode.FORWARD:
            if not token:
                raise Unauthenticated(
                    "no bearer token: in forward mode the caller's token is sent to istiod, which decides "
                    "what it may see; call with 'authorization: Bearer <token>' (istioctl does this without "
                    "--plaintext/--cert-dir), or run the proxy with --upstream-identity for certificate callers"
                )
            # Logged as the credential, not its spelling (as the send budget sees it); Caller.key stays exact.
            principal = "bearer:" + _fingerprint(canonical_jwt(token))
            return Caller(principal, token=token, credential=principal)  # canonicalised once per stream
        pems = context.auth_context().get("x509_pem_cert") or []
        if pems:
            return self._from_certificate(pems[0])
        if token and self.token_reviewer is not None:
            reviewed = await self.token_reviewer(token, context.peer())
            if reviewed is None:
                raise Unauthenticated("the bearer token was not accepted by the Kubernetes TokenReview")
            ns, sa = reviewed
            return self._caller(f"k8s:{ns}/{sa}", ns, credential="bearer:" + _fingerprint(canonical_jwt(token)))
        raise Unauthenticated(
            "identity mode needs a TLS client certificate with a SPIFFE id verified against --client-ca"
            + (" or a Kubernetes service-account token" if self.token_reviewer else "")
        )

    def _from_certificate(self, pem: bytes) -> Caller:
        ids = [p for p in map(parse_spiffe, spiffe_ids_of_pem(pem)) if p]
        if self.trust_domain:
            ids = [p for p in ids if p[0] == self.trust_domain]
        if len(ids) != 1:
            raise Unauthenticated(
                "the client certificate must carry exactly one SPIFFE id spiffe://<trust domain>/ns/<ns>/sa/<sa>"
            )
        td, ns, sa = ids[0]
        return self._caller(f"spiffe://{td}/ns/{ns}/sa/{sa}", ns)

    def _caller(self, principal: str, namespace: str, credential: str = "") -> Caller:
        system = namespace == self.istio_namespace
        unrestricted = system or namespace in self.allowed_namespaces
        return Caller(principal, namespace=namespace, scope="" if unrestricted else namespace,
                      debug_scope="" if system else namespace, credential=credential)


def authorize(plan: Plan, caller: Caller) -> None:
    """Refuse, before any upstream call, what istiod would refuse a namespace-scoped identity."""
    scope = caller.scope_for(plan.type_url)
    if not scope:
        return
    if plan.type_url == DEBUG and plan.debug_path not in NAMESPACE_DEBUG_PATHS:
        raise PermissionDenied(
            f"debug path {plan.debug_path!r} is not available to namespace {scope!r}; "
            f"allowed: {', '.join(sorted(NAMESPACE_DEBUG_PATHS))}"
        )
    assert plan.type_url in (SYNCZ, CONFIG_DUMP, DEBUG)


__all__ = [
    "AuthMode",
    "Authenticator",
    "Caller",
    "TokenReviewer",
    "authorize",
    "bearer_token",
    "canonical_jwt",
    "jwt_expiry",
    "parse_spiffe",
    "spiffe_ids_of_pem",
]
