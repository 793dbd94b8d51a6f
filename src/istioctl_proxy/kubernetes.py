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
import functools
import hashlib
import ipaddress
import json
import logging
import math
import os
import random
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, NoReturn, TypeVar

import httpx2
from cryptography import x509
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
    "CaRejected",
    "KubeTarget",
    "KubernetesPodSource",
    "ReflectorStats",
    "Rejection",
    "ReviewLimits",
    "RootCertWatcher",
    "TokenIdentity",
    "TokenReviewAuthenticator",
    "TokenReviewLimited",
    "TokenReviewUnavailable",
    "address_refusal",
    "istiod_san",
    "load_kube_target",
    "own_namespace",
    "parse_label_selector",
    "parse_root_bundle",
    "peer_host",
    "pod_replica_ip",
    "pod_source_from_config",
    "revision_selector",
    "root_cert_watcher_from_config",
    "target_from_flags",
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


_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _check_label(key: str, values: Iterable[str], selector: str) -> None:
    """The API server's syntax for label keys and values: a typo fails at start-up, not on every relist."""
    prefix, _, name = key.rpartition("/")
    if not _LABEL_NAME.match(name) or (prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix))):
        raise ValueError(f"invalid label key {key!r} in {selector!r}")
    for value in values:
        if value and not _LABEL_NAME.match(value):
            raise ValueError(f"invalid label value {value!r} for {key!r} in {selector!r}")


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
        values: list[str] = []
        if m["notexists"]:
            key, value = m["nk"], operators.not_exists()
        elif m["sk"]:
            values = [v.strip() for v in m["values"].split(",") if v.strip()]
            key, value = m["sk"], operators.in_(values) if m["setop"] == "in" else operators.not_in(values)
        elif m["ek"]:
            values = [m["value"]]
            key, value = m["ek"], operators.not_equal(m["value"]) if m["op"] == "!=" else m["value"]
        else:
            key, value = m["exists"], None
        _check_label(key, values, selector)
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
    Whether the address is one we may dial at all is `address_refusal`'s question.
    """
    meta, status = pod.metadata, pod.status
    if meta is None or status is None or meta.deletionTimestamp is not None:
        return None
    if status.phase != "Running" or not status.podIP:
        return None
    ready = any(c.type == "Ready" and c.status == "True" for c in status.conditions or ())
    return status.podIP if ready else None


def address_refusal(
    pod: Pod, ip: str, *, allow_loopback: bool = False, allow_host_network: bool = False
) -> str | None:
    """Why discovery must not dial `ip` of `pod` ("loopback", "link-local", ...), or None if it may.

    Anyone who can write a pod's status (or run a pod matching the selector) chooses the address: the
    proxy would send istioctl callers' tokens to it. Loopback would reach the proxy's own host, link-local
    the cloud metadata service (169.254.169.254), the unspecified address the local host too; a
    hostNetwork pod's IP is its node's, where anything may listen. istiod never runs like that in a real
    mesh; `allow_loopback` is for single-host setups and tests, `allow_host_network` for a hostNetwork
    istiod.
    """
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return "invalid"
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_unspecified:
        return "unspecified"
    if addr.is_link_local:
        return "link-local"
    if addr.is_multicast:
        return "multicast"
    if addr.is_loopback and not allow_loopback:
        return "loopback"
    if pod.spec is not None and pod.spec.hostNetwork and not allow_host_network:
        return "host-network"
    return None


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
        allow_loopback: bool = False,
        allow_host_network: bool = False,
        on_skip: Callable[[str], None] | None = None,
    ) -> None:
        # Configuration errors (bad selector, missing kubeconfig/context) surface here, at start-up.
        self.target = target or load_kube_target(kubeconfig, context)
        self.namespace = namespace
        self.port = port
        self.revision = revision
        self.allow_loopback = allow_loopback
        self.allow_host_network = allow_host_network
        self.on_skip = on_skip  # called with the reason each time a pod is newly skipped
        self.skipped = 0  # pods (or pod IP changes) skipped because of their address
        self._skipping: dict[str, tuple[str, str]] = {}  # pod name → (ip, reason) currently skipped
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
        skipping: dict[str, tuple[str, str]] = {}
        for pod_name, pod in pods.items():
            ip = pod_replica_ip(pod)
            if ip is None:
                continue
            why = address_refusal(
                pod, ip, allow_loopback=self.allow_loopback, allow_host_network=self.allow_host_network
            )
            if why is not None:
                skipping[pod_name] = (ip, why)
                continue
            replicas.append(Replica(join_host_port(ip, self.port), self.name, pod_name))
        for pod_name, (ip, why) in skipping.items():
            # Once per pod and address: the whole map is re-examined on every watch event.
            if self._skipping.get(pod_name) != (ip, why):
                self.skipped += 1
                log.warning(
                    "%s: not dialling pod %s at %s (%s address); see --istiod-allow-loopback and "
                    "--istiod-allow-host-network in docs/kubernetes.md", self.name, pod_name, ip, why,
                )  # fmt: skip
                if self.on_skip is not None:
                    self.on_skip(why)
        self._skipping = skipping
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


class CaRejected(Exception):
    """The CA ConfigMap holds a value that is not a usable PEM bundle (raised by `first()` only)."""


@dataclass(frozen=True)
class Rejection:
    """The latest CA ConfigMap update that was refused, for logs, /readyz and `check`."""

    reason: str
    resource_version: str
    at: float  # time.time()


def parse_root_bundle(value: str) -> bytes:
    """The PEM bytes of `value` if every certificate in it parses; raises ValueError saying what is wrong.

    gRPC would take any text containing a BEGIN CERTIFICATE line and only fail at the next handshake
    ("Failed to create security handshaker"), taking every upstream call down with it. Parsing every
    block here (with `cryptography`) is what lets a bad update be refused while the last good root stays.
    """
    begins = value.count("-----BEGIN CERTIFICATE-----")
    if not begins:
        raise ValueError("no PEM certificate in it")
    if value.count("-----END CERTIFICATE-----") != begins:
        raise ValueError("a certificate block is not terminated")
    try:
        certs = x509.load_pem_x509_certificates(value.encode())
    except ValueError as err:
        raise ValueError(f"a certificate does not parse: {err}") from None
    if len(certs) != begins:
        raise ValueError(f"only {len(certs)} of {begins} certificate blocks parse")
    return value.encode()


class RootCertWatcher:
    """Watches `istio-ca-root-cert` (key `root-cert.pem`) in one namespace; calls back with new PEM bytes.

    istiod writes this ConfigMap into every namespace and rewrites it when the mesh CA rotates, so
    watching it keeps upstream TLS verification right across a rotation without a restart. The watch is
    narrowed to the one object by a field selector, which is what lets RBAC restrict it by resourceNames.
    A deleted ConfigMap or a missing key keeps the last good PEM: a transient gap must not break TLS. A
    value that does not parse as a PEM bundle is refused (counted in `rejected`, the latest in
    `rejection`, reported to `on_rejected`) and the last good PEM stays.
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
        on_rejected: Callable[[Rejection], None] | None = None,
    ) -> None:
        self.target = target or load_kube_target(kubeconfig, context)
        self.namespace = namespace
        self.configmap = name
        self.key = key
        self.pem: bytes | None = None
        self.rejected = 0  # updates refused because they do not parse
        self.rejection: Rejection | None = None  # the latest refused update, until a good value arrives
        self.on_rejected = on_rejected
        self._on_change: Callable[[bytes], None] | None = None
        self._refused_value: str | None = None  # not counted twice when the watch replays the same object
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

    @property
    def resource_version(self) -> str | None:
        """The resourceVersion of the last list or event seen: lets a caller wait until an update was looked at."""
        return self._reflector.resource_version

    async def run(self, on_change: Callable[[bytes], None]) -> None:
        self._on_change = on_change
        await self._reflector.run()

    async def first(self) -> bytes:
        """Run until the first usable PEM arrives and return it, then stop (for start-up, before serving).

        Raises CaRejected when the ConfigMap holds a value that does not parse and no good root is known:
        waiting would not help, and the reason is what the operator needs. Wrap it in `asyncio.timeout()`:
        while the ConfigMap does not exist this keeps waiting.
        """
        got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        def once(pem: bytes) -> None:
            if not got.done():
                got.set_result(pem)

        def refused(rejection: Rejection) -> None:
            if not got.done():
                got.set_exception(CaRejected(self._describe(rejection)))

        previous, self.on_rejected = self.on_rejected, refused
        task = asyncio.create_task(self.run(once))
        try:
            return await got
        finally:
            self.on_rejected = previous
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _describe(self, rejection: Rejection) -> str:
        return (
            f"{self.namespace}/{self.configmap} key {self.key} (resourceVersion {rejection.resource_version}) "
            f"is not a usable root certificate bundle: {rejection.reason}"
        )

    def describe_rejection(self) -> str:
        """One line about the current refused value, or "" when the ConfigMap's value is in use."""
        return "" if self.rejection is None else self._describe(self.rejection)

    def _configmaps_changed(self, configmaps: Mapping[str, ConfigMap]) -> None:
        cm = configmaps.get(self.configmap)
        value = (cm.data or {}).get(self.key) if cm is not None else None
        if not value or not value.strip():
            if self.pem is not None:
                log.warning(
                    "%s/%s has no %s; keeping the previous root certificate",
                    self.namespace, self.configmap, self.key,
                )  # fmt: skip
            return
        try:
            pem = parse_root_bundle(value)
        except ValueError as err:
            self._refuse(cm, value, str(err))
            return
        self.rejection, self._refused_value = None, None
        if pem == self.pem:
            return
        log.info("root certificate from %s/%s changed (%d bytes)", self.namespace, self.configmap, len(pem))
        self.pem = pem
        if self._on_change is not None:
            self._on_change(pem)

    def _refuse(self, cm: ConfigMap | None, value: str, reason: str) -> None:
        if value == self._refused_value:
            return  # the same refused value seen again (a relist): already counted and logged
        self._refused_value = value
        version = (cm.metadata.resourceVersion if cm is not None and cm.metadata is not None else None) or "?"
        self.rejected += 1
        self.rejection = Rejection(reason, version, time.time())
        log.error(
            "%s; %s", self._describe(self.rejection),
            "keeping the previous root certificate" if self.pem is not None else "no root certificate yet",
        )  # fmt: skip
        if self.on_rejected is not None:
            self.on_rejected(self.rejection)


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
    user as a bad token. The message is for the proxy's log only: it can name the reviewer's own identity.
    """


class TokenReviewLimited(Exception):
    """A new TokenReview would exceed a limit (`limit`: "rate", "peer-rate" or "peer-concurrency")."""

    def __init__(self, limit: str) -> None:
        super().__init__(f"TokenReview limit {limit!r} reached")
        self.limit = limit


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


@dataclass(frozen=True)
class ReviewLimits:
    """How many TokenReviews callers can cause: rates (token buckets) and reviews in flight.

    Only reviews that reach the API server count: cached verdicts and callers joining a review already in
    flight are free. A call over a limit is refused at once (never queued), so a flood of random tokens costs
    the API server at most `burst + rate * seconds` reviews however many calls arrive.
    """

    rate: float = 20.0  # reviews per second, all callers together
    burst: int = 40
    peer_rate: float = 2.0  # reviews per second per peer address
    peer_burst: int = 5
    concurrency: int = 4  # reviews in flight at once, all callers (more wait for a slot)
    peer_concurrency: int = 2  # reviews in flight at once per peer (more are refused)
    max_peers: int = 4096  # peers whose buckets are remembered (LRU); a forgotten peer starts full

    @classmethod
    def from_rates(cls, rate: float, peer_rate: float, concurrency: int) -> ReviewLimits:
        """The flags' form: bursts are two seconds' worth, a peer may use half the concurrency."""
        return cls(rate=rate, burst=max(1, math.ceil(2 * rate)), peer_rate=peer_rate,
                   peer_burst=max(1, math.ceil(2 * peer_rate)), concurrency=concurrency,
                   peer_concurrency=max(1, concurrency // 2))  # fmt: skip


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
        ttl: float = 10.0,
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


def pod_sources_from_config(
    cfg: Config, *, on_skip: Callable[[str], None] | None = None
) -> list[KubernetesPodSource]:
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
        pod_source_from_config(dataclasses.replace(cfg, kubeconfig=kubeconfig, context=context), on_skip=on_skip)
        for kubeconfig, context in pairs
    ]


_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def target_from_flags(kubeconfig: str, context: str, *, flag: str = "--kubeconfig") -> KubeTarget:
    """`load_kube_target` for a flag: every way a kubeconfig can be unusable is one ConfigError line.

    lightkube reports a broken file as KeyError/AttributeError/YAML errors, an unknown context as its own
    ConfigError, and a certificate file that the kubeconfig names but that does not exist only when a client
    is built (which would then fail on every list, forever, in the background). All of them are found here,
    before serving, by building a client once.
    """
    where = f"{flag} {kubeconfig}" if kubeconfig else f"{flag} (default: in-cluster, $KUBECONFIG or ~/.kube/config)"
    if context:
        where += f" --context {context}"
    try:
        target = load_kube_target(kubeconfig or None, context or None)
        _check_files(target.config)
        target.client()  # builds TLS contexts and auth from the config; opens no connection
    except Exception as err:
        detail = str(err) if isinstance(err, ConfigError | OSError | ValueError) else f"{type(err).__name__}: {err}"
        # PyYAML's messages span lines (with a caret under the column): one line, as every config error.
        raise errors.ConfigError(f"{where}: not a usable kubeconfig: {' '.join(detail.split())}") from None
    return target


def _check_files(config: SingleConfig) -> None:
    """Files a kubeconfig names must exist (the ssl module's error would not say which one is missing)."""
    cluster, user = config.cluster, config.user
    named = (
        ("certificate-authority", cluster.certificate_auth if cluster else None),
        ("client-certificate", user.client_cert if user else None),
        ("client-key", user.client_key if user else None),
        ("tokenFile", user.token_file if user else None),
    )
    for key, name in named:
        if name and not Path(config.abs_file(name)).is_file():
            raise ConfigError(f"its {key} {config.abs_file(name)} does not exist")


def _check_namespace(namespace: str) -> None:
    if len(namespace) > 63 or not _DNS_LABEL.match(namespace):
        raise errors.ConfigError(f"--istio-namespace {namespace!r} is not a valid namespace name (RFC 1123 label)")


def pod_source_from_config(cfg: Config, *, on_skip: Callable[[str], None] | None = None) -> KubernetesPodSource:
    """`--istiod-k8s` with `--istio-namespace`, `--istiod-selector`, `--revision`, `--istiod-port`,
    `--kubeconfig`, `--context`, `--istiod-allow-loopback`, `--istiod-allow-host-network`."""
    _check_namespace(cfg.istio_namespace)
    selector = cfg.istiod_selector or DEFAULT_SELECTOR
    try:  # checked first: it needs no cluster, and it is the likelier typo
        parse_label_selector(revision_selector(selector, cfg.revision or None))
    except ValueError as err:
        raise errors.ConfigError(f"--istiod-selector/--revision: {err}") from None
    return KubernetesPodSource(
        cfg.istio_namespace,
        port=cfg.istiod_port,
        selector=selector,
        revision=cfg.revision or None,
        target=target_from_flags(cfg.kubeconfig, cfg.context),
        allow_loopback=cfg.istiod_allow_loopback,
        allow_host_network=cfg.istiod_allow_host_network,
        on_skip=on_skip,
    )


def root_cert_watcher_from_config(cfg: Config) -> RootCertWatcher:
    """`--istiod-ca-configmap`: the istio-ca-root-cert ConfigMap of `--istio-namespace`, same cluster."""
    _check_namespace(cfg.istio_namespace)
    # With several clusters, the CA ConfigMap is read from the first (the one istiod runs in).
    target = target_from_flags(cfg.kubeconfig.split(",")[0], cfg.context.split(",")[0])
    return RootCertWatcher(cfg.istio_namespace, target=target)


def token_reviewer_from_config(cfg: Config) -> TokenReviewAuthenticator:
    """`--token-review` against `--token-review-kubeconfig` (the cluster that issues the callers' tokens;
    in-cluster config when not given), audiences from `--token-review-audiences`, cache and limits from
    `--token-review-cache-ttl`, `--token-review-rate`, `--token-review-peer-rate`,
    `--token-review-concurrency`."""
    return TokenReviewAuthenticator(
        target=target_from_flags(cfg.token_review_kubeconfig, "", flag="--token-review-kubeconfig"),
        audiences=cfg.token_review_audiences or DEFAULT_TOKEN_AUDIENCES,
        ttl=cfg.token_review_cache_ttl,
        limits=ReviewLimits.from_rates(
            cfg.token_review_rate, cfg.token_review_peer_rate, cfg.token_review_concurrency
        ),
    )
