"""Assembles a running proxy from a Config: discovery → upstream pool → aggregator → gRPC server."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from dataclasses import dataclass, field

from envoy.config.core.v3 import base_pb2

from .aggregator import Aggregator, Settings
from .auth import Authenticator, AuthMode, parse_spiffe, spiffe_ids_of_pem
from .config import Config
from .discovery import DnsSource, ReplicaSet, ReplicaSource, StaticSource
from .errors import ConfigError
from .fanout import FanOut
from .server import AdsService, CertificateReloader, ServingTLS, build_server, set_serving
from .upstream import TokenFile, UpstreamPool, UpstreamTLS

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
    node = base_pb2.Node(id=f"sidecar~127.0.0.1~istioctl-proxy.{ns}~{ns}.svc.cluster.local")
    # The metadata istioctl itself sends (pkg/adsc), so istiod treats us like istioctl, not like a proxy.
    node.metadata.update({"GENERATOR": "event", "NAMESPACE": ns, "SERVICE_ACCOUNT": sa})
    return node


def sources_of(cfg: Config) -> list[ReplicaSource]:
    sources: list[ReplicaSource] = []
    if cfg.istiod:
        sources.append(StaticSource(cfg.istiod))
    for target in cfg.istiod_dns:
        sources.append(DnsSource(target, interval=cfg.istiod_dns_interval))
    if cfg.istiod_k8s:
        from .kubernetes import pod_source_from_config  # optional: only with Kubernetes discovery

        sources.append(pod_source_from_config(cfg))
    return sources


@dataclass
class Proxy:
    """A configured, not yet started proxy. `start()` binds; `stop()` drains."""

    cfg: Config
    replicas: ReplicaSet = field(init=False)
    pool: UpstreamPool = field(init=False)
    service: AdsService = field(init=False)
    port: int = 0

    def __post_init__(self) -> None:
        cfg = self.cfg
        self.replicas = ReplicaSet(sources_of(cfg))
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
            coalesce=cfg.coalesce, cache_ttl=cfg.cache_ttl,
        )
        aggregator = Aggregator(self.replicas, FanOut(self.pool), settings)
        authenticator = Authenticator(
            mode, istio_namespace=cfg.istio_namespace, allowed_namespaces=frozenset(cfg.debug_allowed_namespaces),
            trust_domain=cfg.trust_domain,
        )
        self.service = AdsService(aggregator, authenticator)
        self.replicas.add_listener(self.pool.retain)
        self.reloader = None
        if not cfg.plaintext:
            self.reloader = CertificateReloader(ServingTLS(
                cfg.tls_cert, cfg.tls_key, cfg.client_ca or None, require_client_cert=cfg.upstream_identity,
            ))

    async def start(self) -> None:
        self.server, self.health, self.port = build_server(
            self.service, listen=self.cfg.listen, max_message_bytes=self.cfg.max_message_bytes, tls=self.reloader
        )
        await self.replicas.start()
        await self.server.start()
        await set_serving(self.health, True)
        log.info("serving ADS on %s (%s), %s mode", self.cfg.listen.rpartition(":")[0] + f":{self.port}",
                 "plaintext" if self.cfg.plaintext else "TLS",
                 "identity" if self.cfg.upstream_identity else "forward")

    async def stop(self, grace: float | None = None) -> None:
        await set_serving(self.health, False)
        # In-flight calls get `grace` seconds to finish; new calls are refused meanwhile.
        await self.server.stop(self.cfg.drain_seconds if grace is None else grace)
        await self.replicas.stop()
        await self.pool.close()


async def serve(cfg: Config) -> None:
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
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
