"""Kubernetes: istiod replicas from pods, callers from TokenReview, and upstream trust from a ConfigMap.

Everything here talks to a real API server through lightkube's asyncio client (see docs/kubernetes.md for
why lightkube). The three pieces share one list + watch engine (`_Reflector`) that behaves like client-go's
reflector: list once, watch from the list's resourceVersion, re-watch from the last seen version when a
watch ends, relist when the server says that version is gone (410), back off with jitter on errors, and
never forget the last known state because the API server is unreachable.

The API calls made here are exactly the RBAC the deployment grants (deploy/manifests, tests check it):
pods get/list/watch in the istio namespace; configmaps get/list/watch when `--istiod-ca-configmap` is
used; and, on the *token-issuing* cluster, create tokenreviews (granted there by system:auth-delegator).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar

import httpx2
from lightkube import ApiError, AsyncClient, operators
from lightkube.config.kubeconfig import SERVICE_ACCOUNT, KubeConfig, SingleConfig
from lightkube.core.exceptions import ConfigError
from lightkube.models.authentication_v1 import TokenReviewSpec
from lightkube.resources.authentication_v1 import TokenReview
from lightkube.resources.core_v1 import ConfigMap, Pod

from . import errors
from .discovery import OnChange, Replica, join_host_port

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_ISTIOD_PORT",
    "DEFAULT_SELECTOR",
    "DEFAULT_TOKEN_AUDIENCES",
    "ROOT_CERT_CONFIGMAP",
    "ROOT_CERT_KEY",
    "SERVICE_ACCOUNT_DIR",
    "Backoff",
    "KubeTarget",
    "KubernetesPodSource",
    "ReflectorStats",
    "RootCertWatcher",
    "TokenIdentity",
    "TokenReviewAuthenticator",
    "TokenReviewUnavailable",
    "istiod_san",
    "load_kube_target",
    "own_namespace",
    "parse_label_selector",
    "pod_replica_ip",
    "pod_source_from_config",
    "revision_selector",
    "root_cert_watcher_from_config",
    "token_reviewer_from_config",
]

DEFAULT_SELECTOR = "app=istiod"
DEFAULT_ISTIOD_PORT = 15012
DEFAULT_TOKEN_AUDIENCES: tuple[str, ...] = ("istio-ca",)
ROOT_CERT_CONFIGMAP = "istio-ca-root-cert"
ROOT_CERT_KEY = "root-cert.pem"
SERVICE_ACCOUNT_DIR = SERVICE_ACCOUNT  # /var/run/secrets/kubernetes.io/serviceaccount
REVISION_LABEL = "istio.io/rev"
IN_CLUSTER = "in-cluster"


# ---------------------------------------------------------------------------------------------------------
# Configuration: which API server, as whom.


@dataclass(frozen=True)
class KubeTarget:
    """A resolved client configuration plus a short name for labels ("in-cluster" or the context name)."""

    config: SingleConfig
    label: str

    def client(self, *, timeout: float = 10.0) -> AsyncClient:
        # trust_env=False: HTTP(S)_PROXY variables meant for other traffic must not divert API calls, and
        # lightkube must not silently fall back to ~/.kube/config (the config is already resolved here).
        return AsyncClient(self.config, timeout=httpx2.Timeout(timeout), trust_env=False)


def _in_cluster_available(service_account_dir: str | os.PathLike[str]) -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and Path(service_account_dir, "token").is_file()


def load_kube_target(
    kubeconfig: str | os.PathLike[str] | None = None,
    context: str | None = None,
    *,
    service_account_dir: str | os.PathLike[str] = SERVICE_ACCOUNT_DIR,
) -> KubeTarget:
    """Resolve `--kubeconfig`/`--context`, else in-cluster config, else $KUBECONFIG or ~/.kube/config.

    An explicit kubeconfig or context always wins over in-cluster config, so a proxy running in one
    cluster can discover istiod in another (the external control plane's own cluster is the usual case,
    where in-cluster config applies). Raises lightkube's ConfigError with a readable message.

    Token rotation: in-cluster config (and kubeconfig users with `tokenFile:`) authenticate with
    lightkube's BearerTokenFileAuth, which re-reads the token file whenever the API server answers 401.
    The kubelet rewrites the projected token well before it expires, so an expired or revoked token is
    replaced by the current file content on the next request instead of failing until a restart.
    """
    if kubeconfig is None and context is None and _in_cluster_available(service_account_dir):
        config = KubeConfig.from_service_account(service_account=service_account_dir).get()
        assert config is not None  # from_one always sets the current context
        return KubeTarget(config, IN_CLUSTER)
    path = kubeconfig if kubeconfig is not None else os.environ.get("KUBECONFIG", "~/.kube/config")
    # $KUBECONFIG may list several files; like kubectl we take the first one that exists.
    candidates = [p for p in str(path).split(os.pathsep) if p] or ["~/.kube/config"]
    existing = [p for p in candidates if Path(p).expanduser().is_file()]
    if not existing:
        raise ConfigError(f"kubeconfig {path} not found and not running in a cluster")
    config = KubeConfig.from_file(existing[0]).get(context)
    assert config is not None  # get() raises for an unknown or missing context
    return KubeTarget(config, config.context_name)


def own_namespace(
    default: str = "istio-system", *, service_account_dir: str | os.PathLike[str] = SERVICE_ACCOUNT_DIR
) -> str:
    """The namespace this process runs in: $POD_NAMESPACE, else the service account's, else `default`.

    `--istio-namespace` defaults to this, because the proxy is deployed beside istiod (for the seed that
    is `external-istiod`, not `istio-system`).
    """
    env = os.environ.get("POD_NAMESPACE", "").strip()
    if env:
        return env
    with contextlib.suppress(OSError):
        ns = Path(service_account_dir, "namespace").read_text().strip()
        if ns:
            return ns
    return default


def istiod_san(namespace: str, revision: str | None = None) -> str:
    """The DNS SAN istiod's serving certificate carries, as istioctl expects it for a revision."""
    if revision and revision != "default":
        return f"istiod-{revision}.{namespace}.svc"
    return f"istiod.{namespace}.svc"


# ---------------------------------------------------------------------------------------------------------
# Label selectors


_SELECTOR_TERM = re.compile(
    r"""^\s*(?:
        (?P<notexists>!\s*(?P<nk>[^\s!=,()]+))
      | (?P<sk>[^\s!=,()]+)\s+(?P<setop>in|notin)\s*\((?P<values>[^()]*)\)
      | (?P<ek>[^\s!=,()]+)\s*(?P<op>==|=|!=)\s*(?P<value>[^\s!=,()]*)
      | (?P<exists>[^\s!=,()]+)
    )\s*$""",
    re.VERBOSE,
)

LabelSelector = dict[str, "str | operators.Operator[Any] | Iterable[Any] | None"]
FieldSelector = dict[str, "str | operators.BinaryOperator | operators.SequenceOperator"]


def _split_selector(selector: str) -> list[str]:
    """Split on commas that are not inside `in (a,b)` value lists."""
    terms: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    terms.append("".join(cur))
    return [t for t in (t.strip() for t in terms) if t]


def parse_label_selector(selector: str) -> LabelSelector:
    """Parse kubectl's label selector syntax (`a=b,c!=d,e,!f,g in (h,i),j notin (k)`) for lightkube.

    Parsing locally (rather than passing the string through) rejects a typo in `--istiod-selector` at
    start-up with a clear message instead of as a 400 from the API server on every relist.
    """
    out: LabelSelector = {}
    for term in _split_selector(selector):
        m = _SELECTOR_TERM.match(term)
        if m is None:
            raise ValueError(f"invalid label selector term {term!r} in {selector!r}")
        key: str
        value: str | operators.Operator[Any] | None
        if m["notexists"]:
            key, value = m["nk"], operators.not_exists()
        elif m["sk"]:
            values = [v.strip() for v in m["values"].split(",") if v.strip()]
            key, value = m["sk"], operators.in_(values) if m["setop"] == "in" else operators.not_in(values)
        elif m["ek"]:
            key, value = m["ek"], operators.not_equal(m["value"]) if m["op"] == "!=" else m["value"]
        else:
            key, value = m["exists"], None
        if key in out:
            # lightkube takes a mapping; two terms on one key (a!=x,a!=y) would silently lose one.
            raise ValueError(
                f"label selector {selector!r} has two terms for {key!r}; use `{key} notin (...)`"
            )
        out[key] = value
    if not out:
        raise ValueError("empty label selector")
    return out


def revision_selector(selector: str = DEFAULT_SELECTOR, revision: str | None = None) -> str:
    """`--istiod-selector` plus `istio.io/rev=<rev>` when `--revision` is given."""
    if not revision:
        return selector
    return f"{selector},{REVISION_LABEL}={revision}" if selector.strip() else f"{REVISION_LABEL}={revision}"


# ---------------------------------------------------------------------------------------------------------
# Backoff


@dataclass
class Backoff:
    """Exponential backoff with jitter (each delay drawn from [delay/2, delay]).

    Jitter matters: after an API server restart every proxy replica (and every other client) reconnects;
    without it they would all retry in lock-step.
    """

    initial: float = 0.5
    maximum: float = 15.0
    factor: float = 2.0
    _next: float = field(default=0.0, init=False)

    def reset(self) -> None:
        self._next = 0.0

    def next_delay(self) -> float:
        self._next = self.initial if self._next == 0.0 else min(self.maximum, self._next * self.factor)
        return self._next * random.uniform(0.5, 1.0)


# ---------------------------------------------------------------------------------------------------------
# The list + watch engine


@dataclass
class ReflectorStats:
    """Counters for logs, metrics and tests."""

    lists: int = 0  # successful full lists
    relists_gone: int = 0  # relists forced by 410 Gone / Expired
    watches: int = 0  # watch streams started (lightkube itself resumes one that the server ended cleanly)
    errors: int = 0  # failed list or watch attempts
    synced: bool = False  # a list has succeeded at least once
    connected: bool = False  # the last list/watch attempt succeeded (false while the API server is away)
    last_error: str = ""
    last_sync: float = 0.0  # time.time() of the last successful list


def _status_code(err: BaseException) -> int | None:
    if isinstance(err, ApiError) and err.status is not None and err.status.code is not None:
        return int(err.status.code)
    if isinstance(err, httpx2.HTTPStatusError):
        return err.response.status_code
    return None


class _Gone(Exception):
    """The watch's resourceVersion is no longer available: the state must be rebuilt from a list."""


R = TypeVar("R", Pod, ConfigMap)


class _Reflector(Generic[R]):
    """Keeps `objects` (name → object) equal to the server's view of one namespaced, filtered collection.

    `on_state` is called with the whole map after every list and after every watch event; while the API
    server cannot be reached it is simply not called, so consumers keep their last known state.
    """

    def __init__(
        self,
        target: KubeTarget,
        resource: type[R],
        namespace: str,
        *,
        labels: LabelSelector | None = None,
        fields: FieldSelector | None = None,
        on_state: Callable[[Mapping[str, R]], None],
        what: str,
        watch_timeout: float = 300.0,
        backoff: Backoff | None = None,
        request_timeout: float = 10.0,
    ) -> None:
        self.target = target
        self.resource: type[R] = resource
        self.namespace = namespace
        self.labels = labels
        self.fields = fields
        self.on_state: Callable[[Mapping[str, R]], None] = on_state
        self.what = what
        self.watch_timeout = watch_timeout
        self.backoff = backoff or Backoff()
        self.request_timeout = request_timeout
        self.objects: dict[str, R] = {}
        self.resource_version: str | None = None
        self.stats = ReflectorStats()

    async def run(self) -> None:
        client = self.target.client(timeout=self.request_timeout)
        try:
            await self._loop(client)
        finally:
            # Shielded so that cancellation of run() still closes the connection pool.
            with contextlib.suppress(Exception):
                await asyncio.shield(client.close())

    async def _loop(self, client: AsyncClient) -> None:
        gone_streak = 0
        while True:
            started = time.monotonic()
            try:
                if self.resource_version is None:
                    await self._list(client)
                await self._watch(client)
                gone_streak = 0
            except asyncio.CancelledError:
                raise
            except _Gone:
                # Not an outage: the server compacted past our version (or restarted its watch cache).
                # Relist at once; the state stays in place until the list replaces it. Only a 410 right
                # after a relist again (a server that keeps expiring us) backs off, to avoid a hot loop.
                self.stats.relists_gone += 1
                self.resource_version = None
                gone_streak = gone_streak + 1 if time.monotonic() - started < 30 else 1
                log.info("%s: watch expired (410); relisting", self.what)
                if gone_streak > 1:
                    await asyncio.sleep(self.backoff.next_delay())
            except Exception as err:
                self.stats.errors += 1
                self.stats.connected = False
                self.stats.last_error = f"{type(err).__name__}: {err}"
                if time.monotonic() - started > 30:
                    # A watch that ran for a while was healthy: this is a new outage, start backing off
                    # from the beginning rather than from where the last outage left off.
                    self.backoff.reset()
                delay = self.backoff.next_delay()
                log.warning(
                    "%s: %s; keeping %d known objects, retrying in %.1fs",
                    self.what, self.stats.last_error, len(self.objects), delay,
                )  # fmt: skip
                await asyncio.sleep(delay)

    async def _list(self, client: AsyncClient) -> None:
        listing = client.list(self.resource, namespace=self.namespace, labels=self.labels, fields=self.fields)
        objects: dict[str, R] = {}
        async for obj in listing:
            assert obj.metadata is not None and obj.metadata.name is not None
            objects[obj.metadata.name] = obj
        self.objects = objects
        self.resource_version = listing.resourceVersion
        self.stats.lists += 1
        self.stats.synced = True
        self.stats.connected = True
        self.stats.last_sync = time.time()
        self.backoff.reset()
        self.on_state(self.objects)

    async def _watch(self, client: AsyncClient) -> None:
        """Watch from `resource_version` until the server ends the watch; raises _Gone on 410."""
        # The server closes the watch after timeoutSeconds; the random spread (as client-go does) keeps
        # many watchers from reconnecting together. The client-side deadline a little later catches a
        # half-open connection (API server gone without a FIN/RST), which would otherwise hang forever.
        server_timeout = int(self.watch_timeout * random.uniform(1.0, 1.5)) or 1
        self.stats.watches += 1
        stream = client.watch(
            self.resource,
            namespace=self.namespace,
            labels=self.labels,
            fields=self.fields,
            resource_version=self.resource_version,
            server_timeout=server_timeout,
        )
        try:
            async with asyncio.timeout(server_timeout + 10):
                async for kind, obj in stream:
                    self._apply(kind, obj)
        except TimeoutError:
            log.debug("%s: watch deadline reached; re-watching from %s", self.what, self.resource_version)
        except httpx2.HTTPStatusError as err:
            if _status_code(err) == 410:
                raise _Gone from err
            raise
        finally:
            await _aclose(stream)

    def _apply(self, kind: str, obj: R) -> None:
        if obj.metadata is not None and obj.metadata.resourceVersion:
            self.resource_version = obj.metadata.resourceVersion
        if kind == "BOOKMARK" or obj.metadata is None or obj.metadata.name is None:
            return  # only moves the resourceVersion
        # Any event proves the connection works again.
        self.stats.connected = True
        self.backoff.reset()
        if kind == "DELETED":
            self.objects.pop(obj.metadata.name, None)
        else:  # ADDED, MODIFIED
            self.objects[obj.metadata.name] = obj
        self.on_state(self.objects)


async def _aclose(stream: AsyncIterable[Any]) -> None:
    # lightkube's watch is an async generator: closing it runs its `finally`, which closes the response.
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


# ---------------------------------------------------------------------------------------------------------
# Pods → replicas


def pod_replica_ip(pod: Pod) -> str | None:
    """The IP to dial if the pod should receive traffic, else None.

    Same rule as the EndpointSlice controller's "ready" endpoints: phase Running, condition Ready=True,
    a pod IP, and not terminating (a pod being deleted drains; istiod stops serving soon after).
    """
    meta, status = pod.metadata, pod.status
    if meta is None or status is None or meta.deletionTimestamp is not None:
        return None
    if status.phase != "Running" or not status.podIP:
        return None
    ready = any(c.type == "Ready" and c.status == "True" for c in status.conditions or ())
    return status.podIP if ready else None


class KubernetesPodSource:
    """A `ReplicaSource` that follows the ready istiod pods of one namespace by list + watch.

    `name` is "k8s:<context>/<namespace>" (plus "/<revision>" when one is selected), so replicas found in
    two clusters or two namespaces stay distinguishable in logs and metrics.
    """

    def __init__(
        self,
        namespace: str,
        *,
        port: int = DEFAULT_ISTIOD_PORT,
        selector: str = DEFAULT_SELECTOR,
        revision: str | None = None,
        kubeconfig: str | os.PathLike[str] | None = None,
        context: str | None = None,
        target: KubeTarget | None = None,
        name: str | None = None,
        watch_timeout: float = 300.0,
        backoff: Backoff | None = None,
        request_timeout: float = 10.0,
    ) -> None:
        # Configuration errors (bad selector, missing kubeconfig/context) surface here, at start-up.
        self.target = target or load_kube_target(kubeconfig, context)
        self.namespace = namespace
        self.port = port
        self.revision = revision
        self.selector = revision_selector(selector, revision)
        labels = parse_label_selector(self.selector)
        suffix = f"/{revision}" if revision else ""
        self.name = name or f"k8s:{self.target.label}/{namespace}{suffix}"
        self._on_change: OnChange | None = None
        self._replicas: tuple[Replica, ...] | None = None
        self._reflector: _Reflector[Pod] = _Reflector(
            self.target,
            Pod,
            namespace,
            labels=labels,
            on_state=self._pods_changed,
            what=f"{self.name} pods ({self.selector})",
            watch_timeout=watch_timeout,
            backoff=backoff,
            request_timeout=request_timeout,
        )

    @property
    def stats(self) -> ReflectorStats:
        return self._reflector.stats

    def current(self) -> tuple[Replica, ...]:
        """The last reported replicas (empty before the first successful list)."""
        return self._replicas or ()

    async def run(self, on_change: OnChange) -> None:
        self._on_change = on_change
        await self._reflector.run()

    def _pods_changed(self, pods: Mapping[str, Pod]) -> None:
        replicas: list[Replica] = []
        for pod_name, pod in pods.items():
            ip = pod_replica_ip(pod)
            if ip is not None:
                replicas.append(Replica(join_host_port(ip, self.port), self.name, pod_name))
        new = tuple(sorted(replicas))
        # The first list is always reported, even when empty, so consumers know the source has synced.
        if new == self._replicas:
            return
        if self._replicas is not None or new:
            shown = ", ".join(f"{r.name}={r.address}" for r in new)
            log.info("%s: %s", self.name, shown or "no ready replicas")
        self._replicas = new
        if self._on_change is not None:
            self._on_change(new)


# ---------------------------------------------------------------------------------------------------------
# The CA ConfigMap


class RootCertWatcher:
    """Watches `istio-ca-root-cert` (key `root-cert.pem`) in one namespace; calls back with new PEM bytes.

    istiod writes this ConfigMap into every namespace and rewrites it when the mesh CA rotates, so
    watching it keeps upstream TLS verification right across a rotation without a restart. The watch is
    narrowed to the one object by a field selector, which is what lets RBAC restrict it by resourceNames.
    A deleted ConfigMap or a missing key keeps the last good PEM: a transient gap must not break TLS.
    """

    def __init__(
        self,
        namespace: str,
        *,
        name: str = ROOT_CERT_CONFIGMAP,
        key: str = ROOT_CERT_KEY,
        kubeconfig: str | os.PathLike[str] | None = None,
        context: str | None = None,
        target: KubeTarget | None = None,
        watch_timeout: float = 300.0,
        backoff: Backoff | None = None,
    ) -> None:
        self.target = target or load_kube_target(kubeconfig, context)
        self.namespace = namespace
        self.configmap = name
        self.key = key
        self.pem: bytes | None = None
        self._on_change: Callable[[bytes], None] | None = None
        self._reflector: _Reflector[ConfigMap] = _Reflector(
            self.target,
            ConfigMap,
            namespace,
            fields={"metadata.name": name},
            on_state=self._configmaps_changed,
            what=f"k8s:{self.target.label}/{namespace} configmap {name}",
            watch_timeout=watch_timeout,
            backoff=backoff,
        )

    @property
    def stats(self) -> ReflectorStats:
        return self._reflector.stats

    async def run(self, on_change: Callable[[bytes], None]) -> None:
        self._on_change = on_change
        await self._reflector.run()

    async def first(self) -> bytes:
        """Run until the first PEM arrives and return it, then stop (for start-up, before serving).

        Wrap it in `asyncio.timeout()`: while the ConfigMap does not exist this keeps waiting.
        """
        got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        def once(pem: bytes) -> None:
            if not got.done():
                got.set_result(pem)

        task = asyncio.create_task(self.run(once))
        try:
            return await got
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _configmaps_changed(self, configmaps: Mapping[str, ConfigMap]) -> None:
        cm = configmaps.get(self.configmap)
        value = (cm.data or {}).get(self.key) if cm is not None else None
        if not value or "-----BEGIN CERTIFICATE-----" not in value:
            if self.pem is not None:
                log.warning(
                    "%s/%s has no usable %s; keeping the previous root certificate",
                    self.namespace, self.configmap, self.key,
                )  # fmt: skip
            return
        pem = value.encode()
        if pem == self.pem:
            return
        log.info("root certificate from %s/%s changed (%d bytes)", self.namespace, self.configmap, len(pem))
        self.pem = pem
        if self._on_change is not None:
            self._on_change(pem)


# ---------------------------------------------------------------------------------------------------------
# TokenReview


class TokenIdentity(NamedTuple):
    """A caller authenticated as a Kubernetes service account: `(namespace, service_account)`."""

    namespace: str
    service_account: str

    def spiffe_id(self, trust_domain: str = "cluster.local") -> str:
        return f"spiffe://{trust_domain}/ns/{self.namespace}/sa/{self.service_account}"


class TokenReviewUnavailable(Exception):
    """The TokenReview could not be made (API server unreachable, forbidden, ...): not a verdict on the token.

    Callers should answer UNAVAILABLE rather than UNAUTHENTICATED, so that an outage is not reported to the
    user as a bad token.
    """


_SA_PREFIX = "system:serviceaccount:"


def _jwt_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT, unverified: only used to never cache a verdict past the token's life."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    exp = payload.get("exp") if isinstance(payload, dict) else None
    return float(exp) if isinstance(exp, int | float) else None


class TokenReviewAuthenticator:
    """Authenticates bearer tokens with `authentication.k8s.io/v1` TokenReview against the issuing cluster.

    For the seed's topology that is the *mesh* cluster: istioctl mints a token for SA `default` in the
    istio namespace of the cluster it points at, audience `istio-ca`. Only service-account tokens yield an
    identity (other users have no namespace to scope them to).

    Verdicts are cached, keyed by a hash of the token (the token itself is never kept): positive ones for
    `ttl` seconds but never beyond the token's own `exp`, negative ones for `negative_ttl` (so a flood of
    bad tokens does not become a flood of TokenReviews). The cache holds at most `max_entries` (LRU).
    Concurrent reviews of the same token share one API call.
    """

    def __init__(
        self,
        *,
        kubeconfig: str | os.PathLike[str] | None = None,
        context: str | None = None,
        target: KubeTarget | None = None,
        audiences: Sequence[str] | None = DEFAULT_TOKEN_AUDIENCES,
        ttl: float = 60.0,
        negative_ttl: float = 5.0,
        max_entries: int = 4096,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target = target or load_kube_target(kubeconfig, context)
        self.audiences = list(audiences) if audiences else None
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        self.timeout = timeout
        self._clock = clock
        self._client: AsyncClient | None = None
        self._cache: OrderedDict[bytes, tuple[float, TokenIdentity | None]] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Future[TokenIdentity | None]] = {}
        self.reviews = 0  # TokenReview API calls made (for metrics and tests)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def review(self, token: str) -> TokenIdentity | None:
        """The service account the token belongs to, or None if it is not a valid SA token for us.

        Raises TokenReviewUnavailable when the API server could not give a verdict.
        """
        token = token.strip()
        if not token:
            return None
        key = hashlib.sha256(token.encode()).digest()
        now = self._clock()
        hit = self._cache.get(key)
        if hit is not None:
            if hit[0] > now:
                self._cache.move_to_end(key)
                return hit[1]
            del self._cache[key]
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[TokenIdentity | None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            identity = await self._review(token)
        except BaseException as err:
            fut.set_exception(err)
            fut.exception()  # mark retrieved: no "exception never retrieved" if nobody else waited
            raise
        else:
            fut.set_result(identity)
        finally:
            del self._inflight[key]
        self._store(key, token, identity)
        return identity

    def _store(self, key: bytes, token: str, identity: TokenIdentity | None) -> None:
        now = self._clock()
        expires = now + (self.ttl if identity is not None else self.negative_ttl)
        exp = _jwt_expiry(token)
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


# ---------------------------------------------------------------------------------------------------------
# Wiring from the command line (`Config` attributes; "" means "not given").


def pod_sources_from_config(cfg: Config) -> list[KubernetesPodSource]:
    """One source per cluster: `--kubeconfig` and `--context` take comma-separated lists (one kubeconfig
    with several contexts, several kubeconfigs, or pairs of both), so replicas of several clusters merge
    into one set, each labelled k8s:<context>/<namespace>."""
    kubeconfigs = [k for k in cfg.kubeconfig.split(",") if k] or [""]
    contexts = [c for c in cfg.context.split(",") if c] or [""]
    if len(kubeconfigs) > 1 and len(contexts) > 1 and len(kubeconfigs) != len(contexts):
        raise errors.ConfigError(
            "--kubeconfig and --context lists must have the same length (or one of them a single entry)"
        )
    n = max(len(kubeconfigs), len(contexts))
    pairs = zip(kubeconfigs * n if len(kubeconfigs) == 1 else kubeconfigs,
                contexts * n if len(contexts) == 1 else contexts, strict=True)
    return [
        pod_source_from_config(dataclasses.replace(cfg, kubeconfig=kubeconfig, context=context))
        for kubeconfig, context in pairs
    ]


def pod_source_from_config(cfg: Config) -> KubernetesPodSource:
    """`--istiod-k8s` with `--istio-namespace`, `--istiod-selector`, `--revision`, `--istiod-port`,
    `--kubeconfig`, `--context`."""
    return KubernetesPodSource(
        cfg.istio_namespace,
        port=cfg.istiod_port,
        selector=cfg.istiod_selector or DEFAULT_SELECTOR,
        revision=cfg.revision or None,
        kubeconfig=cfg.kubeconfig or None,
        context=cfg.context or None,
    )


def root_cert_watcher_from_config(cfg: Config) -> RootCertWatcher:
    """`--istiod-ca-configmap`: the istio-ca-root-cert ConfigMap of `--istio-namespace`, same cluster."""
    return RootCertWatcher(
        # With several clusters, the CA ConfigMap is read from the first (the one istiod runs in).
        cfg.istio_namespace, kubeconfig=cfg.kubeconfig.split(",")[0] or None, context=cfg.context.split(",")[0] or None
    )


def token_reviewer_from_config(cfg: Config) -> TokenReviewAuthenticator:
    """`--token-review` against `--token-review-kubeconfig` (the cluster that issues the callers' tokens;
    in-cluster config when not given), audiences from `--token-review-audiences`."""
    return TokenReviewAuthenticator(
        kubeconfig=cfg.token_review_kubeconfig or None,
        audiences=cfg.token_review_audiences or DEFAULT_TOKEN_AUDIENCES,
    )
