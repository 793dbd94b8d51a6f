"""The admin HTTP port: /metrics, /healthz, /readyz and (opt-in) the status page.

It runs in the proxy's own asyncio loop (aiohttp's AppRunner + TCPSite), so it sees the live objects and
needs no locking. Readiness is probed here too, and drives gRPC health as well as /readyz, so Kubernetes
(HTTP probe) and gRPC health checkers always agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Awaitable, Callable

import grpc
from aiohttp import web
from envoy.config.core.v3 import base_pb2

from .config import Config
from .discovery import Replica, ReplicaSet, split_host_port
from .errors import ConfigError
from .fanout import FanOut
from .metrics import Metrics
from .model import Probe
from .statuspage import StatusPage
from .tls import diagnose_upstream
from .upstream import UpstreamPool

log = logging.getLogger(__name__)

OnReadiness = Callable[[bool], Awaitable[None]]


class Readiness:
    """Ready when at least one known replica has a connected channel (TCP + TLS handshake done).

    Shown by the status page through statuspage.Readiness (a Protocol this class satisfies), so that
    statuspage.py need not import this module, which builds the page.

    Channel connectivity needs no credentials, so it works in forward mode too, where the proxy cannot
    make a call of its own. Probes run every `interval` seconds and at once when discovery changes.
    """

    def __init__(self, replicas: ReplicaSet, pool: UpstreamPool, metrics: Metrics, *,
                 interval: float = 2.0, probe_timeout: float = 1.0, revisions: tuple[str, ...] = (),
                 policy: str = "every-revision") -> None:
        self.replicas = replicas
        # Canary upgrades: the revisions that must each have a reachable replica (`policy` every-revision);
        # besides these, every revision discovery finds counts. any-replica: one reachable replica will do.
        self.revisions = revisions
        self.policy = policy
        self.by_revision: dict[str, tuple[int, int]] = {}  # revision → (known, reachable) at the last probe
        # Revisions found (not listed) count for every-revision only once a replica of theirs has been reachable:
        # anyone who may create a pod labelled app=istiod in the namespace could otherwise take every proxy out
        # of its Service with a pod of a made-up revision that no istiod stands behind (red team, finding 5).
        self._served: set[str] = set()
        self.pool = pool
        self.metrics = metrics
        self.interval = interval
        self.probe_timeout = probe_timeout
        self.ready = False
        self.reason = "starting: no readiness probe has run yet"
        self.probes: dict[str, Probe] = {}
        # Lines /readyz adds whatever the readiness (e.g. a refused CA ConfigMap update); "" adds nothing.
        self.details: list[Callable[[], str]] = []
        self._announced: bool | None = None
        self._listeners: list[OnReadiness] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        replicas.add_listener(lambda _: self._wake.set())

    def add_listener(self, listener: OnReadiness) -> None:
        """Called with the new readiness on every change (and once with the first result)."""
        self._listeners.append(listener)

    def start(self) -> None:
        """Start probing in the background (every `interval` s, and at once on discovery changes)."""
        self._task = asyncio.create_task(self._loop(), name="readiness probe")

    async def stop(self) -> None:
        """Stop probing; the last result stays readable."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.probe_once()
            except Exception:  # a probe bug must not stop readiness for good
                log.exception("readiness probe failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)

    async def probe_once(self) -> None:
        """Probe every known replica once, update `ready`, `reason`, `probes` and tell listeners of a change."""
        replicas = self.replicas.current()
        if not replicas:
            self.probes = {}
            self.by_revision = {rev: (0, 0) for rev in self.revisions}
            self.metrics.set_replicas({})
            self.metrics.set_revisions(self.by_revision)
            await self._set(False, "no istiod replica is known: discovery (--istiod, --istiod-dns, --istiod-k8s) "
                                   "has found none yet")
            return
        probes = await asyncio.gather(*(self._probe(r) for r in replicas))
        # Discovery may have dropped some meanwhile: their series must not come back after Metrics.retain.
        current = set(self.replicas.current())
        probes = [p for p in probes if p.replica in current]
        if not probes:
            return  # the set changed under this probe; the change woke the next one
        self.probes = {p.replica.address: p for p in probes}
        self.metrics.set_replicas({p.replica: p.up for p in probes})
        groups: dict[str, list[Probe]] = {rev: [] for rev in self.revisions}
        for p in probes:
            groups.setdefault(p.replica.revision, []).append(p)
        self.by_revision = {rev: (len(ps), sum(p.up for p in ps)) for rev, ps in sorted(groups.items())}
        self.metrics.set_revisions(self.by_revision)
        up = sum(p.up for p in probes)
        per_revision = ""
        if len(groups) > 1 or any(groups):  # only when discovery knows revisions: "revision 1-31: 1 of 2"
            per_revision = "; " + ", ".join(f"revision {rev or '(none)'}: {n_up} of {n}"
                                            for rev, (n, n_up) in self.by_revision.items())
        self._served |= {rev for rev, (_, n_up) in self.by_revision.items() if n_up}
        dark = [rev for rev, (_, n_up) in self.by_revision.items()
                if not n_up and (rev in self.revisions or rev in self._served)]
        if up and (self.policy == "any-replica" or not dark):
            await self._set(True, f"{up} of {len(probes)} istiod replicas reachable{per_revision}")
        elif up:
            whys = "; ".join(f"{p.replica.label}: {p.why}" for p in probes if p.replica.revision in dark)
            await self._set(False, f"no reachable replica of revision {', '.join(r or '(none)' for r in dark)} "
                                   f"(--ready-policy every-revision)" + (f" [{whys}]" if whys else "") + per_revision)
        else:
            whys = "; ".join(f"{p.replica.label}: {p.why}" for p in probes)
            await self._set(False, f"none of the {len(probes)} known istiod replicas is reachable: {whys}")

    async def _probe(self, replica: Replica) -> Probe:
        try:
            channel = await self.pool.open_channel(replica.address, self.probe_timeout, replica.san)
        except (OSError, ValueError) as err:  # --istiod-insecure-skip-verify dials to fetch the root first
            return Probe(replica, False, f"cannot connect: {err}")
        if channel.get_state(try_to_connect=True) is grpc.ChannelConnectivity.READY:
            return Probe(replica, True)
        try:
            await asyncio.wait_for(channel.channel_ready(), self.probe_timeout)
        except TimeoutError:
            state = channel.get_state().name
            last = self.pool.last_error.get(replica.address)
            refusal = await self._tls_refusal(replica)
            if refusal:
                return Probe(replica, False, refusal)
            hint = f"; last call: {last}" if last else "; `istioctl-proxy check` shows which step fails"
            return Probe(replica, False, f"not connected ({state}){hint}")
        return Probe(replica, True)

    async def _tls_refusal(self, replica: Replica) -> str:
        """Why the replica's certificate is refused (wrong revision's name, other CA), "" if it is not."""
        tls = self.pool.tls
        if tls.plaintext or tls.skip_verify or tls.ca_pem is None:
            return ""
        san = self.pool.san_of(replica.san)
        refusal = await asyncio.to_thread(diagnose_upstream, replica.address, tls.ca_pem, san, self.probe_timeout)
        if refusal is None:
            return ""
        self.metrics.upstream_tls_refused.labels(replica.revision, refusal.reason).inc()
        return f"TLS refused: {refusal.detail}"

    async def _set(self, ready: bool, reason: str) -> None:
        self.ready, self.reason = ready, reason
        self.metrics.ready.set(1 if ready else 0)
        if ready == self._announced:
            return
        self._announced = ready
        (log.info if ready else log.warning)("%s: %s", "ready" if ready else "not ready", reason)
        for listener in self._listeners:
            await listener(ready)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped  # a dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d
    return addr


def _loopback_peer(peer: str | None) -> bool:
    """Is the TCP peer on this host's loopback? kubectl port-forward connects from there inside the pod."""
    addr = _ip(peer or "")
    return addr is not None and addr.is_loopback


def _local_host(host_header: str, allowed: frozenset[str], *, any_ip: bool = False) -> bool:
    """Is Host localhost, a loopback IP, the configured admin host or (`any_ip`) any IP literal?

    This stops DNS rebinding (a browser sends the attacker's name as Host); it is not access control, since
    any client can send any Host. Access control is the peer check in AdminServer.
    """
    host = host_header.rsplit(":", 1)[0] if not host_header.endswith("]") else host_header
    host = host.strip("[]").lower()
    if host in allowed or host == "localhost":
        return True
    addr = _ip(host)
    return addr is not None and (any_ip or addr.is_loopback)


_SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # Everything the page needs comes from this port; nothing inline, nothing from elsewhere.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
}


class AdminServer:
    """The HTTP side: routes over Metrics, Readiness and, when enabled, the StatusPage."""

    def __init__(self, listen: str, metrics: Metrics, readiness: Readiness, status: StatusPage | None,
                 *, status_remote: bool = False) -> None:
        self.listen = listen
        # The status page shows every proxy of the mesh: loopback peers only unless the operator widened it.
        self.status_remote = status_remote
        self.metrics = metrics
        self.readiness = readiness
        self.status = status
        self.port = 0
        self._runner: web.AppRunner | None = None
        host, _ = split_host_port(listen, allow_zero=True)
        unspecified = (addr := _ip(host)) is not None and addr.is_unspecified
        self._allowed_hosts = frozenset() if unspecified else frozenset({host.lower()})

    def app(self) -> web.Application:
        """The aiohttp application: /metrics, /healthz, /readyz and, when enabled, the status page."""
        app = web.Application(middlewares=[self._headers])
        app.router.add_get("/metrics", self.metrics_handler)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        if self.status is not None:
            for path, handler in self.status.routes().items():
                app.router.add_get(path, self._local_only(handler))
        else:
            app.router.add_get("/", self.no_status_page)
        return app

    @web.middleware
    async def _headers(self, request: web.Request,
                       handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        response = await handler(request)
        for key, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response

    def _local_only(self, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def guarded(request: web.Request) -> web.StreamResponse:
            peer = request.transport.get_extra_info("peername") if request.transport else None
            if not self.status_remote and not _loopback_peer(peer[0] if peer else None):
                return web.Response(status=403, text="the status page answers only on loopback (kubectl "
                                    "port-forward); --admin-status-page-remote widens it (see docs/operations.md)\n")
            if not _local_host(request.host, self._allowed_hosts, any_ip=self.status_remote):
                return web.Response(status=421, text="the status page answers only to localhost, a loopback "
                                    "address or the --admin-listen host (see docs/operations.md)\n")
            return await handler(request)
        return guarded

    async def metrics_handler(self, request: web.Request) -> web.Response:
        """Prometheus exposition (OpenMetrics when the scraper asks for it)."""
        body, content_type = self.metrics.exposition(request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def healthz(self, _: web.Request) -> web.Response:
        """Liveness: 200 whenever the event loop answers."""
        return web.Response(text="ok\n")

    async def readyz(self, _: web.Request) -> web.Response:
        """Readiness: 200 or 503 with the reason, plus any warning lines (e.g. a refused CA update)."""
        r = self.readiness
        text = ("ready: " if r.ready else "not ready: ") + r.reason + "\n"
        text += "".join(f"warning: {line}\n" for line in (detail() for detail in r.details) if line)
        return web.Response(status=200 if r.ready else 503, text=text)

    async def no_status_page(self, _: web.Request) -> web.Response:
        """404 that says how to turn the status page on."""
        return web.Response(status=404, text="istioctl-proxy admin port: /metrics /healthz /readyz\n"
                            "The status page is off; start with --admin-status-page (see docs/operations.md).\n")

    async def start(self) -> int:
        """Bind and serve; returns the bound port. Raises OSError when the address cannot be bound."""
        host, port = split_host_port(self.listen, allow_zero=True)
        # No access log: Prometheus and kubelet probes would fill it with nothing worth reading.
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            self._runner = None
            raise
        self.port = int(self._runner.addresses[0][1])
        log.info("admin HTTP on %s:%d (/metrics /healthz /readyz%s)", host, self.port,
                 " and the status page at /" if self.status else "")
        return self.port

    async def stop(self) -> None:
        """Stop serving (idempotent)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class Admin:
    """What Proxy starts and stops: readiness always, the HTTP port unless --admin-listen is ''."""

    def __init__(self, cfg: Config, readiness: Readiness, metrics: Metrics, status: StatusPage | None) -> None:
        self.cfg = cfg
        self.readiness = readiness
        self.server = (AdminServer(cfg.admin_listen, metrics, readiness, status,
                                   status_remote=cfg.admin_status_page_remote) if cfg.admin_listen else None)

    @property
    def port(self) -> int:
        """The bound admin port, 0 when --admin-listen is ''."""
        return self.server.port if self.server else 0

    async def start(self, on_readiness: OnReadiness) -> None:
        """Start readiness probing (telling `on_readiness` of every change) and the HTTP port."""
        self.readiness.add_listener(on_readiness)
        self.readiness.start()
        if self.server is not None:
            try:
                await self.server.start()
            except OSError as err:
                await self.readiness.stop()
                raise ConfigError(f"cannot listen on --admin-listen {self.cfg.admin_listen}: {err}") from None

    async def stop(self) -> None:
        """Stop probing and the HTTP port."""
        await self.readiness.stop()
        if self.server is not None:
            await self.server.stop()


def build_admin(cfg: Config, replicas: ReplicaSet, pool: UpstreamPool, metrics: Metrics, fanout: FanOut,
                upstream_node: base_pb2.Node | None) -> Admin:
    """The admin side of a Proxy; raises ConfigError for admin flags that do not fit the rest."""
    # Listed revisions must each be reachable; following every revision, the ones found are.
    listed = cfg.revisions if len(cfg.revisions) > 1 else ()
    readiness = Readiness(replicas, pool, metrics, revisions=listed, policy=cfg.ready_policy)
    status = None
    if cfg.admin_status_page and upstream_node is not None:
        status = StatusPage(replicas, fanout, upstream_node, metrics, readiness, timeout=cfg.upstream_timeout)
    return Admin(cfg, readiness, metrics, status)


__all__ = ["Admin", "AdminServer", "Readiness", "build_admin"]
