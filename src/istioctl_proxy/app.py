"""Assembles a running proxy from a Config: discovery → upstream pool → aggregator → gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from envoy.config.core.v3 import base_pb2

from .admin import build_admin
from .aggregator import Aggregator, Settings
from .auth import Authenticator, AuthMode, TokenReviewer, parse_spiffe, spiffe_ids_of_pem
from .client import istioctl_node
from .config import Config, plaintext_exposed, replicas_all_loopback, tokens_unprotected
from .discovery import DnsSource, ReplicaSet, ReplicaSource, StaticSource
from .errors import CaRejected, ConfigError, TokenReviewUnavailable
from .fanout import FanOut
from .metrics import Metrics
from .model import Answer
from .server import (
    AdsService,
    CallObserver,
    StreamLimits,
    build_server,
    set_serving,
)
from .tls import CertificateReloader, ServingTLS, TokenFile, UpstreamTLS
from .upstream import UpstreamPool

if TYPE_CHECKING:
    from .kubernetes import KubernetesPodSource, RootCertWatcher
    from .tokenreview import TokenReviewAuthenticator

log = logging.getLogger(__name__)


def _read(path: str) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def upstream_identity_node(cfg: Config) -> base_pb2.Node:
    """The node istiod expects with the proxy's own credentials: NAMESPACE/SERVICE_ACCOUNT of that identity."""
    ns, sa = cfg.istio_namespace, "default"
    if cfg.upstream_cert:
        ids = [p for p in map(parse_spiffe, spiffe_ids_of_pem(_read(cfg.upstream_cert) or b"")) if p]
        if len(ids) != 1:
            raise ConfigError("--upstream-cert must carry exactly one SPIFFE id spiffe://<td>/ns/<ns>/sa/<sa>")
        _, ns, sa = ids[0]
    # The metadata istioctl itself sends (pkg/adsc), so istiod treats us like istioctl, not like a proxy.
    return istioctl_node(ns, service_account=sa, pod="istioctl-proxy", istio_version="")


def token_reviewer(reviewer: TokenReviewAuthenticator) -> TokenReviewer:
    """--token-review: Kubernetes TokenReview against the cluster that issued the callers' tokens."""

    async def review(token: str, peer: str) -> tuple[str, str] | None:
        try:
            identity = await reviewer.review(token, peer)
        except TokenReviewUnavailable as err:
            # An outage is not a verdict on the token: UNAVAILABLE, so istioctl users retry. The detail (str)
            # can name the reviewer's own service account and RBAC ("... cannot create resource tokenreviews"):
            # it goes to the log; the caller gets the error's generic `message`.
            log.warning("token of %s not reviewed: %s", peer, err)
            raise
        # TokenReviewLimited goes up as it is: RESOURCE_EXHAUSTED with a generic message.
        return None if identity is None else (identity.namespace, identity.service_account)

    return review


# Kubernetes wiring from the command line (`Config` attributes; "" means "not given"). The kubernetes
# modules (lightkube) are imported only when a flag asks for them.


def pod_sources_from_config(
    cfg: Config, *, on_skip: Callable[[str], None] | None = None
) -> list[KubernetesPodSource]:
    """One source per cluster: `--kubeconfig` and `--context` take comma-separated lists (one kubeconfig
    with several contexts, several kubeconfigs, or pairs of both), so replicas of several clusters merge
    into one set, each labelled k8s:<context>/<namespace>."""
    kubeconfigs = [k for k in cfg.kubeconfig.split(",") if k] or [""]
    contexts = [c for c in cfg.context.split(",") if c] or [""]
    if len(kubeconfigs) > 1 and len(contexts) > 1 and len(kubeconfigs) != len(contexts):
        raise ConfigError(
            "--kubeconfig and --context lists must have the same length (or one of them a single entry)"
        )
    n = max(len(kubeconfigs), len(contexts))
    pairs = zip(kubeconfigs * n if len(kubeconfigs) == 1 else kubeconfigs,
                contexts * n if len(contexts) == 1 else contexts, strict=True)
    # Several --revision values: one source per revision and cluster, each with its own selector.
    revisions = cfg.revisions or ("",)
    return [
        pod_source_from_config(dataclasses.replace(cfg, kubeconfig=kubeconfig, context=context, revision=revision),
                               on_skip=on_skip, per_replica_san=cfg.multi_revision)
        for kubeconfig, context in pairs for revision in revisions
    ]


_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _check_namespace(namespace: str) -> None:
    if len(namespace) > 63 or not _DNS_LABEL.match(namespace):
        raise ConfigError(f"--istio-namespace {namespace!r} is not a valid namespace name (RFC 1123 label)")


def pod_source_from_config(cfg: Config, *, on_skip: Callable[[str], None] | None = None,
                           per_replica_san: bool = False) -> KubernetesPodSource:
    """`--istiod-k8s` with `--istio-namespace`, `--istiod-selector`, `--revision` (one), `--istiod-port`,
    `--kubeconfig`, `--context`, `--istiod-allow-loopback`, `--istiod-allow-host-network`."""
    from .kubernetes import (
        DEFAULT_SELECTOR,
        KubernetesPodSource,
        parse_label_selector,
        revision_selector,
        target_from_flags,
    )

    _check_namespace(cfg.istio_namespace)
    selector = cfg.istiod_selector or DEFAULT_SELECTOR
    try:  # checked first: it needs no cluster, and it is the likelier typo
        parse_label_selector(revision_selector(selector, cfg.revision or None))
    except ValueError as err:
        raise ConfigError(f"--istiod-selector/--revision: {err}") from None
    return KubernetesPodSource(
        cfg.istio_namespace,
        port=cfg.istiod_port,
        selector=selector,
        revision=cfg.revision or None,
        target=target_from_flags(cfg.kubeconfig, cfg.context),
        allow_loopback=cfg.istiod_allow_loopback,
        allow_host_network=cfg.istiod_allow_host_network,
        on_skip=on_skip,
        per_replica_san=per_replica_san,
    )


def root_cert_watcher_from_config(cfg: Config) -> RootCertWatcher:
    """`--istiod-ca-configmap`: the istio-ca-root-cert ConfigMap of `--istio-namespace`, same cluster."""
    from .kubernetes import RootCertWatcher, target_from_flags

    _check_namespace(cfg.istio_namespace)
    # With several clusters, the CA ConfigMap is read from the first (the one istiod runs in).
    target = target_from_flags(cfg.kubeconfig.split(",")[0], cfg.context.split(",")[0])
    return RootCertWatcher(cfg.istio_namespace, target=target)


def token_reviewer_from_config(cfg: Config) -> TokenReviewAuthenticator:
    """`--token-review` against `--token-review-kubeconfig` (the cluster that issues the callers' tokens;
    in-cluster config when not given), audiences from `--token-review-audiences`, cache and limits from
    `--token-review-cache-ttl`, `--token-review-rate`, `--token-review-peer-rate`,
    `--token-review-concurrency`."""
    from .kubernetes import target_from_flags
    from .tokenreview import DEFAULT_TOKEN_AUDIENCES, ReviewLimits, TokenReviewAuthenticator

    return TokenReviewAuthenticator(
        target=target_from_flags(cfg.token_review_kubeconfig, "", flag="--token-review-kubeconfig"),
        audiences=cfg.token_review_audiences or DEFAULT_TOKEN_AUDIENCES,
        ttl=cfg.token_review_cache_ttl,
        limits=ReviewLimits.from_rates(
            cfg.token_review_rate, cfg.token_review_peer_rate, cfg.token_review_concurrency
        ),
    )


def sources_of(cfg: Config, metrics: Metrics | None = None) -> list[ReplicaSource]:
    """The replica sources the flags ask for (static, DNS, Kubernetes), in that order."""
    sources: list[ReplicaSource] = []
    # One listed revision is every entry's; several (or --all-revisions): each entry names its own.
    revision = cfg.revisions[0] if len(cfg.revisions) == 1 else ""
    ns, multi = cfg.istio_namespace, cfg.multi_revision
    if cfg.istiod:
        sources.append(StaticSource(cfg.istiod, namespace=ns, revision=revision, per_replica_san=multi))
    for target in cfg.istiod_dns:
        sources.append(DnsSource(target, interval=cfg.istiod_dns_interval, namespace=ns, revision=revision,
                                 per_replica_san=multi))
    if cfg.istiod_k8s:
        on_skip = None if metrics is None else (lambda reason: metrics.discovery_skipped.labels(reason).inc())
        sources.extend(pod_sources_from_config(cfg, on_skip=on_skip))
    return sources


def stream_limits(cfg: Config) -> StreamLimits:
    """The per-stream and global stream limits of the flags."""
    return StreamLimits(
        first_message_timeout=cfg.first_message_timeout, idle_timeout=cfg.stream_idle_timeout,
        max_age=cfg.max_stream_age, max_streams=cfg.max_streams,
        max_streams_per_connection=cfg.max_streams_per_connection,
        send_budget_bytes=cfg.send_budget_mib * 1024 * 1024, send_timeout=cfg.send_timeout,
        slow_reader_seconds=cfg.slow_reader_seconds,
        slow_reader_min_bytes_per_second=cfg.slow_reader_min_kib_per_second * 1024,
    )


@dataclass
class Proxy:
    """A configured, not yet started proxy. `start()` binds; `stop()` drains."""

    cfg: Config
    replicas: ReplicaSet = field(init=False)
    pool: UpstreamPool = field(init=False)
    service: AdsService = field(init=False)
    port: int = 0
    cert_port: int = 0  # --cert-listen: the certificate-callers port beside a --token-review port
    _ca_task: asyncio.Task[None] | None = None
    ca_watcher: RootCertWatcher | None = None  # --istiod-ca-configmap, once started
    reviewer: TokenReviewAuthenticator | None = None  # --token-review

    def __post_init__(self) -> None:
        cfg = self.cfg
        self.metrics = Metrics()  # per Proxy: two proxies in one process never share counters
        self.replicas = ReplicaSet(sources_of(cfg, self.metrics))
        tls = UpstreamTLS(
            plaintext=cfg.istiod_plaintext, ca_pem=_read(cfg.istiod_ca), san=cfg.san,
            cert_pem=_read(cfg.upstream_cert), key_pem=_read(cfg.upstream_key),
            skip_verify=cfg.istiod_insecure_skip_verify,
        )
        token = TokenFile(cfg.upstream_token_file) if cfg.upstream_token_file else None
        self.pool = UpstreamPool(tls, max_message_bytes=cfg.max_message_bytes, token_file=token)
        mode = AuthMode.IDENTITY if cfg.upstream_identity else AuthMode.FORWARD
        settings = Settings(
            mode=mode, require_all=cfg.require_all, upstream_timeout=cfg.upstream_timeout,
            external_id=cfg.external_id,
            upstream_node=upstream_identity_node(cfg) if mode is AuthMode.IDENTITY else None,
            coalesce=cfg.coalesce, cache_ttl=cfg.cache_ttl, istiod_column=cfg.istiod_column,
        )
        fanout = FanOut(self.pool, on_answer=self._observe_upstream)
        aggregator = Aggregator(self.replicas, fanout, settings)
        aggregator.on_shared = self.metrics.shared_answer
        if cfg.token_review:
            self.reviewer = token_reviewer_from_config(cfg)
            self.reviewer.on_review = lambda result: self.metrics.token_reviews.labels(result).inc()
            self.reviewer.on_limited = lambda limit: self.metrics.token_reviews_limited.labels(limit).inc()
        authenticator = Authenticator(
            mode, istio_namespace=cfg.istio_namespace, allowed_namespaces=frozenset(cfg.debug_allowed_namespaces),
            trust_domain=cfg.trust_domain, token_reviewer=token_reviewer(self.reviewer) if self.reviewer else None,
        )
        self.service = AdsService(aggregator, authenticator, CallObserver(self.metrics), stream_limits(cfg))
        self.replicas.add_listener(self.pool.retain)
        self.replicas.add_listener(self.metrics.retain)
        self.admin = build_admin(cfg, self.replicas, self.pool, self.metrics, fanout, settings.upstream_node)
        self.reloader = None
        if not cfg.plaintext:
            self.reloader = CertificateReloader(ServingTLS(
                cfg.tls_cert, cfg.tls_key, cfg.client_ca or None,
                # gRPC Python cannot ask for a client certificate optionally: with --token-review the port
                # takes token callers and does not request certificates.
                require_client_cert=cfg.upstream_identity and not cfg.token_review,
            ))

    def _observe_upstream(self, answer: Answer) -> None:
        # A late answer of a replica discovery has dropped would re-create its series after Metrics.retain.
        if answer.replica in self.replicas.current():
            self.metrics.observe_upstream(answer)

    async def start(self) -> None:
        """Watch the CA ConfigMap (if asked), bind the ADS (and cert and admin) ports, start discovery and serve.

        Raises ConfigError when the CA ConfigMap gives no usable root, OSError when a port cannot be bound.
        """
        # First: without a usable upstream root there is nothing to serve, and nothing is bound yet.
        await self._watch_ca_configmap()
        try:
            self.server, self.health, self.port = build_server(
                self.service, listen=self.cfg.listen, max_message_bytes=self.cfg.max_message_bytes,
                tls=self.reloader, max_request_bytes=self.cfg.max_request_bytes,
            )
        except RuntimeError as err:  # grpcio ≥ 1.50 raises "Failed to bind to address" instead of returning 0
            raise OSError(str(err)) from None
        started = False
        try:
            if self.cfg.cert_listen:
                # gRPC Python cannot ask for a client certificate optionally (the flag maps to "do not request"
                # or "request and require"), so certificate callers get their own port on the same server.
                cert_tls = CertificateReloader(ServingTLS(self.cfg.tls_cert, self.cfg.tls_key, self.cfg.client_ca,
                                                          require_client_cert=True))
                try:
                    self.cert_port = self.server.add_secure_port(self.cfg.cert_listen, cert_tls.credentials())
                except RuntimeError:  # as above: grpcio raises rather than returning 0
                    self.cert_port = 0
                if self.cert_port == 0:
                    raise OSError(f"cannot listen on --cert-listen {self.cfg.cert_listen}")
            await self.replicas.start()
            # gRPC health follows readiness (a replica known and connected), as /readyz does.
            await self.admin.start(lambda ready: set_serving(self.health, ready))
            await self.server.start()
            started = True
        finally:
            if not started:
                await self._abandon_start()
        log.info("serving ADS on %s (%s), %s mode", self.cfg.listen.rpartition(":")[0] + f":{self.port}",
                 "plaintext" if self.cfg.plaintext else "TLS",
                 "identity" if self.cfg.upstream_identity else "forward")
        if self.cert_port:
            log.info("serving ADS to certificate callers on %s (client certificate required)",
                     self.cfg.cert_listen.rpartition(":")[0] + f":{self.cert_port}")
        why = tokens_unprotected(self.cfg)
        if why:
            where = ("loopback replicas only" if replicas_all_loopback(self.cfg)
                     else "allowed by --insecure-forward-tokens")
            log.warning("forward mode with %s: callers' bearer tokens travel to istiod without verified TLS "
                        "(%s); anyone on that path can read or replay them", why, where)
        if plaintext_exposed(self.cfg):
            log.warning("plaintext ADS listener on %s is reachable beyond this host: callers' tokens travel "
                        "unencrypted; use --tls-cert/--tls-key, or listen on 127.0.0.1 behind a port-forward",
                        self.cfg.listen)

    async def _abandon_start(self) -> None:
        """Undo a start that failed after the ADS port was bound (a busy admin or certificate port)."""
        await self.admin.stop()
        await self.replicas.stop()
        if self._ca_task is not None:
            self._ca_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ca_task
            self._ca_task = None
        # gRPC Python frees a bound port only when a started server stops (stop() before start() keeps it
        # bound for the life of the process, and the server object then warns "__dealloc__ called on
        # running server"): start it and stop it at once, refusing whatever connected in between.
        with contextlib.suppress(Exception):
            await self.server.start()
        await self.server.stop(0)
        await self.pool.close()
        if self.reviewer is not None:
            await self.reviewer.close()

    async def _watch_ca_configmap(self) -> None:
        """--istiod-ca-configmap: trust the istio-ca-root-cert ConfigMap, and follow its rotation."""
        if not self.cfg.istiod_ca_configmap:
            return
        watcher = root_cert_watcher_from_config(self.cfg)
        try:
            pem = await asyncio.wait_for(watcher.first(), 30)
        except TimeoutError:
            # The reflector retried quietly meanwhile (RBAC, unreachable API server): its last error is the why.
            why = f"; last error: {watcher.stats.last_error}" if watcher.stats.last_error else ""
            raise ConfigError(f"--istiod-ca-configmap: no istio-ca-root-cert ConfigMap in {self.cfg.istio_namespace} "
                              f"within 30 s{why}") from None
        except CaRejected as err:
            raise ConfigError(f"--istiod-ca-configmap: {err}") from None
        self.pool.refresh_tls(dataclasses.replace(self.pool.tls, ca_pem=pem))
        self.ca_watcher = watcher
        watcher.on_rejected = lambda _: self.metrics.ca_updates_rejected.inc()
        # A refused update leaves the proxy working on the last good root: ready, but /readyz says why.
        self.admin.readiness.details.append(watcher.describe_rejection)

        def changed(new: bytes) -> None:
            if new != self.pool.tls.ca_pem:
                log.info("istio root CA changed in the istio-ca-root-cert ConfigMap; reconnecting upstream")
                self.pool.refresh_tls(dataclasses.replace(self.pool.tls, ca_pem=new))

        self._ca_task = asyncio.create_task(watcher.run(changed), name="istio-ca-root-cert watch")

    @property
    def admin_port(self) -> int:
        """The bound admin HTTP port (0 when --admin-listen is '')."""
        return self.admin.port

    async def stop(self, grace: float | None = None) -> None:
        """Stop serving: new calls are refused, in-flight calls get `grace` s (default --drain-seconds)."""
        if self._ca_task is not None:
            self._ca_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ca_task  # its finally closes the watch's API client
            self._ca_task = None
        await self.admin.stop()
        await set_serving(self.health, False)
        # In-flight calls get `grace` seconds to finish; new calls are refused meanwhile.
        await self.server.stop(self.cfg.drain_seconds if grace is None else grace)
        await self.replicas.stop()
        await self.pool.close()
        if self.reviewer is not None:
            await self.reviewer.close()


async def serve(cfg: Config) -> None:
    """Run a proxy until SIGTERM or SIGINT, then drain. Raises ConfigError when it cannot start."""
    proxy = Proxy(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Installed before serving: a SIGTERM right after start must drain, not kill.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await proxy.start()
    except OSError as err:
        raise ConfigError(f"cannot listen on {cfg.listen}: {err}") from None
    await stop.wait()
    log.info("draining (up to %.0fs) before exit", cfg.drain_seconds)
    await proxy.stop()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (for tests and the demo; it may be taken by the time it is bound)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


__all__ = [
    "Proxy",
    "free_port",
    "pod_source_from_config",
    "pod_sources_from_config",
    "root_cert_watcher_from_config",
    "serve",
    "sources_of",
    "stream_limits",
    "token_reviewer",
    "token_reviewer_from_config",
    "upstream_identity_node",
]
