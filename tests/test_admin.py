"""The admin port: /healthz, /readyz (and gRPC health with it) as replicas go away and come back."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import threading

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from istioctl_proxy import client
from istioctl_proxy.app import free_port
from istioctl_proxy.config import Config, validate
from istioctl_proxy.discovery import Replica
from istioctl_proxy.errors import ConfigError
from istioctl_proxy.server import SERVICE
from istioctl_proxy.sim.simulator import build_simulator_server

from . import ads_client
from .helpers import ADMIN_TOKEN, stack
from .waits import EVENT_TIMEOUT, until

ANY_PORT = "127.0.0.1:0"


async def get(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}{path}") as response:
        return response.status, await response.text()


async def grpc_health(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE),
                                                           timeout=EVENT_TIMEOUT)
        return int(reply.status)


async def wait_for(port: int, path: str, status: int) -> str:
    last: list[tuple[int, str]] = []

    async def reached() -> bool:
        last[:] = [await get(port, path)]
        return last[0][0] == status

    await until(reached, f"{path} to answer {status} (last: {last})")
    return last[0][1]


class Blackhole:
    """A TCP listener that accepts and then never says a word, in its own thread (it must answer nothing
    even while the event loop is blocked). `connected` is set on the first connection, `closed` when the
    dialler gives up on it."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.connected = threading.Event()
        self.closed = threading.Event()
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.listener.accept()
            self.conns.append(conn)
            self.connected.set()
            while conn.recv(4096):  # the ClientHello, then nothing until the dialler hangs up
                pass
            self.closed.set()

    def __enter__(self) -> Blackhole:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        for sock in (*self.conns, self.listener):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.thread.join()


async def test_healthz_is_alive_and_unknown_paths_404() -> None:
    async with stack(1, 1, admin_listen=ANY_PORT) as s:
        assert await get(s.proxy.admin_port, "/healthz") == (200, "ok\n")
        code, body = await get(s.proxy.admin_port, "/")
        assert code == 404 and "--admin-status-page" in body
        assert (await get(s.proxy.admin_port, "/api/status"))[0] == 404


async def test_readyz_and_grpc_health_flip_when_replicas_go_away_and_come_back() -> None:
    async with stack(2, 6, admin_listen=ANY_PORT) as s:
        port = s.proxy.admin_port
        s.proxy.admin.readiness.interval = 0.1
        assert "2 of 2 istiod replicas reachable" in await wait_for(port, "/readyz", 200)
        assert await grpc_health(s.address) == health_pb2.HealthCheckResponse.SERVING

        await s.mesh.stop()
        body = await wait_for(port, "/readyz", 503)
        assert "none of the 2 known istiod replicas is reachable" in body
        assert await grpc_health(s.address) == health_pb2.HealthCheckResponse.NOT_SERVING

        # The same replicas come back on the same ports (a rollout, a network partition healing).
        for replica, address in zip(s.replicas, s.mesh.addresses, strict=True):
            server, _ = build_simulator_server(replica, address)
            await server.start()
            s.mesh.servers.append(server)
        await wait_for(port, "/readyz", 200)
        assert await grpc_health(s.address) == health_pb2.HealthCheckResponse.SERVING
        resp, _ = await ads_client.request(s.target(), client.SYNCZ)
        assert len(resp.resources) == 6


async def test_ready_with_one_replica_of_two_and_reason_names_the_count() -> None:
    async with stack(2, 4, admin_listen=ANY_PORT) as s:
        s.proxy.admin.readiness.interval = 0.1
        await s.mesh.servers[0].stop(0)
        await wait_for(s.proxy.admin_port, "/readyz", 200)

        async def one_of_two() -> bool:
            return "1 of 2 istiod replicas reachable" in (await get(s.proxy.admin_port, "/readyz"))[1]

        await until(one_of_two, "/readyz to name 1 of 2 replicas")


async def test_not_ready_without_any_known_replica() -> None:
    async with stack(mesh=[], admin_listen=ANY_PORT) as s:
        body = await wait_for(s.proxy.admin_port, "/readyz", 503)
        assert "no istiod replica is known" in body
        assert await grpc_health(s.address) == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_status_page_needs_identity_mode_and_an_admin_port() -> None:
    cfg = Config(listen="127.0.0.1:0", plaintext=True, istiod=("127.0.0.1:1",), istiod_plaintext=True)
    with pytest.raises(ConfigError, match="--upstream-identity"):
        validate(dataclasses.replace(cfg, admin_status_page=True))
    with pytest.raises(ConfigError, match="--admin-listen"):
        validate(dataclasses.replace(cfg, admin_status_page=True, admin_listen=""))


async def test_admin_port_in_use_is_a_config_error_and_frees_what_the_start_took() -> None:
    ads = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(ConfigError, match="--admin-listen"):
            async with stack(1, 1, admin_listen=busy, listen=f"127.0.0.1:{ads}"):
                pass
    # The ADS port bound before the admin port failed is free again (before: bound for the life of the
    # process, the gRPC server never started nor stopped), so a retry in the same process can serve.
    async with stack(1, 1, admin_listen="", listen=f"127.0.0.1:{ads}") as s:
        assert s.proxy.port == ads
        resp, _ = await ads_client.request(s.target(), client.SYNCZ)
        assert len(resp.resources) == 1


async def test_one_log_line_per_call_without_the_token(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="istioctl_proxy.server")
    async with stack(3, 6) as s:
        await ads_client.request(s.target(), client.SYNCZ)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("call ")]
    assert len(lines) == 1
    line = lines[0]
    for part in ("type=istio.io/debug/syncz", "caller=bearer:", "replicas_asked=3", "answered=3", "failed=0",
                 "resources=6", "bytes=", "latency_ms="):
        assert part in line
    assert ADMIN_TOKEN not in caplog.text


async def test_readiness_with_insecure_skip_verify_never_blocks_on_a_dead_replica() -> None:
    async with stack(2, 4, identity=True, istiod_ca="", istiod_insecure_skip_verify=True, admin_listen=ANY_PORT) as s:
        s.proxy.admin.readiness.interval = 0.1
        await wait_for(s.proxy.admin_port, "/readyz", 200)
        await s.mesh.stop()
        body = await wait_for(s.proxy.admin_port, "/readyz", 503)
        assert "none of the 2 known istiod replicas is reachable" in body
        # A replica that accepts TCP and never answers the TLS handshake, dialled for its certificate with
        # an hour to spare: a dial on the event loop would freeze the admin port until it gave up.
        s.proxy.admin.readiness.probe_timeout = 3600
        with Blackhole() as hole:
            s.proxy.replicas._update("static", [*s.proxy.replicas.current(), Replica(hole.address)])
            assert await asyncio.to_thread(hole.connected.wait, EVENT_TIMEOUT), "the probe never dialled"
            assert (await get(s.proxy.admin_port, "/healthz"))[0] == 200
            assert not hole.closed.is_set(), "/healthz answered only after the dial gave up"


# --- Issue 17 item 2: the status page is not reachable from other pods without an operator decision ------


async def _guard_status(peer: tuple[str, int] | None, host: str, *, remote: bool = False) -> int:
    from unittest import mock

    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from istioctl_proxy.admin import AdminServer
    from istioctl_proxy.metrics import Metrics

    server = AdminServer("0.0.0.0:15090", Metrics(), mock.Mock(), None, status_remote=remote)
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda key, default=None: peer if key == "peername" else default
    request = make_mocked_request("GET", "/api/status", headers={"Host": host}, transport=transport)

    async def page(_: web.Request) -> web.StreamResponse:
        return web.Response(text="mesh")

    return (await server._local_only(page)(request)).status


async def test_status_page_guard_checks_the_peer_then_the_host() -> None:
    # A pod on the pod network, whatever Host it sends (the old check let any IP literal through).
    assert await _guard_status(("10.8.1.12", 40000), "10.8.2.7:15090") == 403
    assert await _guard_status(("10.8.1.12", 40000), "localhost:15090") == 403
    assert await _guard_status(("fd00::5", 40000, 0, 0), "[fd00::9]:15090") == 403  # type: ignore[arg-type]
    # kubectl port-forward arrives on loopback, over IPv4, IPv6 or IPv4-mapped IPv6.
    for peer in (("127.0.0.1", 1), ("::1", 1, 0, 0), ("::ffff:127.0.0.1", 1, 0, 0)):
        assert await _guard_status(peer, "localhost:15090") == 200, peer  # type: ignore[arg-type]
    # Loopback peer, but a non-loopback IP or a name in Host: a rebinding browser or a confused proxy.
    assert await _guard_status(("127.0.0.1", 1), "10.8.2.7:15090") == 421
    assert await _guard_status(("127.0.0.1", 1), "0.0.0.0:15090") == 421  # 0.0.0.0 is where it listens, not a name
    assert await _guard_status(("127.0.0.1", 1), "attacker.example") == 421
    # Widened by the operator (behind a NetworkPolicy): other peers and IP-literal hosts, still no names.
    assert await _guard_status(("10.8.1.12", 40000), "10.8.2.7:15090", remote=True) == 200
    assert await _guard_status(("10.8.1.12", 40000), "attacker.example", remote=True) == 421


def test_status_page_remote_needs_the_status_page() -> None:
    cfg = Config(listen="127.0.0.1:0", plaintext=True, istiod=("127.0.0.1:1",), istiod_plaintext=True)
    with pytest.raises(ConfigError, match="--admin-status-page-remote"):
        validate(dataclasses.replace(cfg, admin_status_page_remote=True))
