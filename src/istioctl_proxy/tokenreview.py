"""Callers from Kubernetes TokenReview (`--token-review`): who a bearer token belongs to, asked of the
cluster that issued it, with a verdict cache and limits on the reviews callers can cause.

The only API call made here is create tokenreviews on the *token-issuing* cluster (a ClusterRole granting
just that; docs/kubernetes.md). `auth.py` decides what a caller may see; this module only says who they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, NoReturn

import httpx2
from lightkube import AsyncClient
from lightkube.models.authentication_v1 import TokenReviewSpec
from lightkube.resources.authentication_v1 import TokenReview

from .auth import jwt_expiry
from .config import Config
from .errors import TokenReviewLimited, TokenReviewUnavailable
from .kubernetes.config import KubeTarget, load_kube_target

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TOKEN_AUDIENCES",
    "ReviewLimits",
    "TokenIdentity",
    "TokenReviewAuthenticator",
    "TokenReviewLimited",
    "TokenReviewUnavailable",
    "peer_host",
]

DEFAULT_TOKEN_AUDIENCES = Config.token_review_audiences


class TokenIdentity(NamedTuple):
    """A caller authenticated as a Kubernetes service account: `(namespace, service_account)`."""

    namespace: str
    service_account: str

    def spiffe_id(self, trust_domain: str = "cluster.local") -> str:
        """The identity as the SPIFFE id a certificate of it would carry."""
        return f"spiffe://{trust_domain}/ns/{self.namespace}/sa/{self.service_account}"


_SA_PREFIX = "system:serviceaccount:"


def _burst(rate: float) -> int:
    """Two seconds' worth of `rate`, at least one."""
    return max(1, math.ceil(2 * rate))


def _peer_share(concurrency: int) -> int:
    """Half the reviews in flight, at least one."""
    return max(1, concurrency // 2)


@dataclass(frozen=True)
class ReviewLimits:
    """How many TokenReviews callers can cause: rates (token buckets) and reviews in flight.

    Only reviews that reach the API server count: cached verdicts and callers joining a review already in
    flight are free. A call over a limit is refused at once (never queued), so a flood of random tokens costs
    the API server at most `burst + rate * seconds` reviews however many calls arrive.
    """

    # The defaults are the flags' (Config's), with from_rates' bursts and peer share.
    rate: float = Config.token_review_rate  # reviews per second, all callers together
    burst: int = _burst(Config.token_review_rate)
    peer_rate: float = Config.token_review_peer_rate  # reviews per second per peer address
    peer_burst: int = _burst(Config.token_review_peer_rate)
    concurrency: int = Config.token_review_concurrency  # reviews in flight at once, all callers (more wait)
    peer_concurrency: int = _peer_share(Config.token_review_concurrency)  # per peer (more are refused)
    max_peers: int = 4096  # peers whose buckets are remembered (LRU); a forgotten peer starts full

    @classmethod
    def from_rates(cls, rate: float, peer_rate: float, concurrency: int) -> ReviewLimits:
        """The flags' form: bursts are two seconds' worth, a peer may use half the concurrency."""
        return cls(rate=rate, burst=_burst(rate), peer_rate=peer_rate, peer_burst=_burst(peer_rate),
                   concurrency=concurrency, peer_concurrency=_peer_share(concurrency))  # fmt: skip


@dataclass
class _Bucket:
    tokens: float
    at: float

    def take(self, rate: float, burst: int, now: float) -> bool:
        self.tokens = min(float(burst), self.tokens + (now - self.at) * rate)
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


def peer_host(peer: str) -> str:
    """The address part of a gRPC peer string ("ipv4:10.0.0.1:5000" → "10.0.0.1", "ipv6:[::1]:5" → "::1")."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6") and rest:
        host = rest.rpartition(":")[0] or rest
        return host.strip("[]")
    return peer


class TokenReviewAuthenticator:
    """Authenticates bearer tokens with `authentication.k8s.io/v1` TokenReview against the issuing cluster.

    For the seed's topology that is the *mesh* cluster: istioctl mints a token for SA `default` in the
    istio namespace of the cluster it points at, audience `istio-ca`. Only service-account tokens yield an
    identity (other users have no namespace to scope them to).

    Verdicts are cached, keyed by a hash of the token (the token itself is never kept): positive ones for
    `ttl` seconds but never beyond the token's own `exp`, refusals for `negative_ttl` whatever the token
    claims (an expired-looking token must not skip the cache, or a flood of them is a flood of reviews).
    The cache holds at most `max_entries` (LRU). Concurrent reviews of one token share one API call, run in
    a task of its own so that a caller hanging up does not cancel the others. `limits` bounds the reviews
    callers can cause (see ReviewLimits).
    """

    def __init__(
        self,
        *,
        kubeconfig: str | os.PathLike[str] | None = None,
        context: str | None = None,
        target: KubeTarget | None = None,
        audiences: Sequence[str] | None = DEFAULT_TOKEN_AUDIENCES,
        ttl: float = Config.token_review_cache_ttl,
        negative_ttl: float = 30.0,
        max_entries: int = 4096,
        timeout: float = 5.0,
        limits: ReviewLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_review: Callable[[str], None] | None = None,
        on_limited: Callable[[str], None] | None = None,
    ) -> None:
        self.target = target or load_kube_target(kubeconfig, context)
        self.audiences = list(audiences) if audiences else None
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        self.timeout = timeout
        self.limits = limits or ReviewLimits()
        self._clock = clock
        self._client: AsyncClient | None = None
        self._cache: OrderedDict[bytes, tuple[float, TokenIdentity | None]] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Task[TokenIdentity | None]] = {}
        self._slots = asyncio.Semaphore(self.limits.concurrency)
        self._bucket = _Bucket(float(self.limits.burst), clock())
        self._peer_buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._peer_inflight: dict[str, int] = {}
        self.on_review = on_review  # called with "authenticated", "refused" or "unavailable" per API call
        self.on_limited = on_limited  # called with the limit's name per refused review
        self.reviews = 0  # TokenReview API calls made (for metrics and tests)
        self.limited: dict[str, int] = {}  # reviews refused by a limit, by limit
        self.in_flight = 0  # API calls in progress now
        self.max_in_flight = 0  # the most API calls ever in progress at once

    @property
    def client_open(self) -> bool:
        """Whether an API client (a connection pool) is open; `close()` closes it."""
        return self._client is not None

    async def close(self) -> None:
        """Cancel reviews in flight and close the API client."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def review(self, token: str, peer: str = "") -> TokenIdentity | None:
        """The service account the token belongs to, or None if it is not a valid SA token for us.

        `peer` (the caller's address, as gRPC gives it) is what the per-peer limits count; without one only
        the global limits apply. Raises TokenReviewUnavailable when
        the API server could not give a verdict, TokenReviewLimited when a new review is over a limit.
        """
        token = token.strip()
        if not token:
            return None
        key = hashlib.sha256(token.encode()).digest()
        hit = self._cache.get(key)
        if hit is not None:
            if hit[0] > self._clock():
                self._cache.move_to_end(key)
                return hit[1]
            del self._cache[key]
        task = self._inflight.get(key)
        if task is None:
            host = peer_host(peer)
            self._admit(host)
            task = asyncio.get_running_loop().create_task(self._shared_review(key, token))
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._finished, key, host))
        # Shielded: this caller going away (cancelled) must not cancel the review others wait on.
        return await asyncio.shield(task)

    def _admit(self, host: str) -> None:
        """Take a rate token for a new review, or raise TokenReviewLimited (nothing is taken then)."""
        limits, now = self.limits, self._clock()
        if not host:  # not a network caller (the library used directly): only the global limits apply
            if not self._bucket.take(limits.rate, limits.burst, now):
                self._refuse("rate")
            return
        if self._peer_inflight.get(host, 0) >= limits.peer_concurrency:
            self._refuse("peer-concurrency")
        bucket = self._peer_buckets.get(host)
        if bucket is None:
            bucket = self._peer_buckets[host] = _Bucket(float(limits.peer_burst), now)
            while len(self._peer_buckets) > limits.max_peers:
                self._peer_buckets.popitem(last=False)
        self._peer_buckets.move_to_end(host)
        # The peer's bucket first: one noisy peer must not drain the shared bucket with refused calls.
        if not bucket.take(limits.peer_rate, limits.peer_burst, now):
            self._refuse("peer-rate")
        if not self._bucket.take(limits.rate, limits.burst, now):
            bucket.tokens += 1.0  # not reviewed: give the peer its token back
            self._refuse("rate")
        # Counted now, not when the task starts: calls arriving in the same tick must see each other.
        self._peer_inflight[host] = self._peer_inflight.get(host, 0) + 1

    def _refuse(self, limit: str) -> NoReturn:
        self.limited[limit] = self.limited.get(limit, 0) + 1
        if self.on_limited is not None:
            self.on_limited(limit)
        raise TokenReviewLimited(limit)

    async def _shared_review(self, key: bytes, token: str) -> TokenIdentity | None:
        async with self._slots:
            identity = await self._counted_review(token)
        self._store(key, token, identity)
        return identity

    def _finished(self, key: bytes, host: str, task: asyncio.Task[TokenIdentity | None]) -> None:
        # A done callback, not a `finally`: it also runs for a task cancelled before it ever started.
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not host:
            return
        left = self._peer_inflight.get(host, 1) - 1
        if left > 0:
            self._peer_inflight[host] = left
        else:
            self._peer_inflight.pop(host, None)
        if not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" when every caller left

    async def _counted_review(self, token: str) -> TokenIdentity | None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        outcome = "unavailable"
        try:
            identity = await self._review(token)
            outcome = "refused" if identity is None else "authenticated"
            return identity
        finally:
            self.in_flight -= 1
            if self.on_review is not None:
                self.on_review(outcome)

    def _store(self, key: bytes, token: str, identity: TokenIdentity | None) -> None:
        now = self._clock()
        if identity is None:
            expires = now + self.negative_ttl
        else:
            expires = now + self.ttl
            exp = jwt_expiry(token)
            if exp is not None:
                # `exp` is wall-clock; convert the remaining lifetime onto our (monotonic) clock.
                expires = min(expires, now + (exp - time.time()))
        if expires <= now:
            return
        self._cache[key] = (expires, identity)
        self._cache.move_to_end(key)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)

    async def _review(self, token: str) -> TokenIdentity | None:
        if self._client is None:
            self._client = self.target.client(timeout=self.timeout)
        self.reviews += 1
        request = TokenReview(spec=TokenReviewSpec(token=token, audiences=self.audiences))
        try:
            result = await self._client.create(request)
        except (httpx2.HTTPError, OSError) as err:
            raise TokenReviewUnavailable(f"TokenReview against {self.target.label} failed: {err}") from err
        status = result.status
        if status is None or not status.authenticated or status.user is None:
            if status is not None and status.error:
                log.debug("token rejected by %s: %s", self.target.label, status.error)
            return None
        if self.audiences and not set(status.audiences or ()) & set(self.audiences):
            # The server only authenticates tokens for the requested audiences; this is belt and braces
            # against an API server that ignores spec.audiences.
            return None
        return _identity_from_username(status.user.username or "")


def _identity_from_username(username: str) -> TokenIdentity | None:
    if not username.startswith(_SA_PREFIX):
        return None
    parts = username[len(_SA_PREFIX) :].split(":")
    if len(parts) != 2 or not all(parts):
        return None
    return TokenIdentity(parts[0], parts[1])
