"""The admin port: /healthz, /readyz (and gRPC health with it) as replicas go away and come back."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import time

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from istioctl_proxy import client
from istioctl_proxy.config import Config, validate
from istioctl_proxy.errors import ConfigError
from istioctl_proxy.server import SERVICE
from istioctl_proxy.simulator import build_simulator_server

from .helpers import ADMIN_TOKEN, stack

ANY_PORT = "127.0.0.1:0"


async def get(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}{path}") as response:
        return response.status, await response.text()


async def grpc_health(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
        return int(reply.status)


async def wait_for(port: int, path: str, status: int, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        code, body = await get(port, path)
        if code == status:
            return body
        assert time.monotonic() < deadline, f"{path} stayed {code}: {body}"
        await asyncio.sleep(0.05)


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
        resp, _ = await client.request(s.target(), client.SYNCZ)
        assert len(resp.resources) == 6


async def test_ready_with_one_replica_of_two_and_reason_names_the_count() -> None:
    async with stack(2, 4, admin_listen=ANY_PORT) as s:
        s.proxy.admin.readiness.interval = 0.1
        await s.mesh.servers[0].stop(0)
        body = await wait_for(s.proxy.admin_port, "/readyz", 200)
        deadline = time.monotonic() + 10
        while "1 of 2" not in body and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            body = (await get(s.proxy.admin_port, "/readyz"))[1]
        assert "1 of 2 istiod replicas reachable" in body


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


async def test_admin_port_in_use_is_a_config_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(ConfigError, match="--admin-listen"):
            async with stack(1, 1, admin_listen=busy):
                pass


async def test_one_log_line_per_call_without_the_token(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="istioctl_proxy.server")
    async with stack(3, 6) as s:
        await client.request(s.target(), client.SYNCZ)
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
        # The loop stayed responsive while the replicas were being dialled.
        started = time.monotonic()
        assert (await get(s.proxy.admin_port, "/healthz"))[0] == 200
        assert time.monotonic() - started < 0.5


# --- Issue 17 item 2: the status page is not reachable from other pods without an operator decision ------


def _own_non_loopback_ipv4() -> str | None:
    """One of this host's own non-loopback addresses (a UDP connect sends nothing), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 9))
        except OSError:
            return None
        ip = str(s.getsockname()[0])
    return None if ip.startswith("127.") or ip == "0.0.0.0" else ip


async def _get_from(local_ip: str, url: str, host: str) -> int:
    """GET `url` from `local_ip` (the TCP peer address the admin port sees) with this Host header."""
    connector = aiohttp.TCPConnector(local_addr=(local_ip, 0))
    async with aiohttp.ClientSession(connector=connector) as http, http.get(url, headers={"Host": host}) as r:
        return r.status


@pytest.mark.parametrize("remote", [False, True])
async def test_status_page_on_all_interfaces_answers_only_loopback_peers(remote: bool) -> None:
    """The chart listens on 0.0.0.0 (probes, metrics). Any pod could read the whole mesh from /api/status
    with `Host: <pod IP>` (or a forged `Host: localhost`); only a port-forward (a loopback peer) may."""
    ip = _own_non_loopback_ipv4()
    if ip is None:
        pytest.skip("this host has no non-loopback address to call from (the mocked-peer test covers the guard)")
    async with stack(2, 4, identity=True, admin_listen="0.0.0.0:0", admin_status_page=True,
                     admin_status_page_remote=remote) as s:
        port = s.proxy.admin_port
        assert await _get_from("127.0.0.1", f"http://127.0.0.1:{port}/api/status", f"localhost:{port}") == 200
        expected = 200 if remote else 403
        for host in (f"{ip}:{port}", f"localhost:{port}", f"127.0.0.1:{port}"):
            assert await _get_from(ip, f"http://{ip}:{port}/api/status", host) == expected, host
            assert await _get_from(ip, f"http://{ip}:{port}/", host) == expected, host
        # Metrics and probes stay reachable from anywhere the network allows (Prometheus, the kubelet).
        assert await _get_from(ip, f"http://{ip}:{port}/metrics", f"{ip}:{port}") == 200
        assert await _get_from(ip, f"http://{ip}:{port}/readyz", f"{ip}:{port}") in (200, 503)


def _guard_status(peer: tuple[str, int] | None, host: str, *, remote: bool = False) -> int:
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

    return asyncio.run(server._local_only(page)(request)).status


def test_status_page_guard_checks_the_peer_then_the_host() -> None:
    # A pod on the pod network, whatever Host it sends (the old check let any IP literal through).
    assert _guard_status(("10.8.1.12", 40000), "10.8.2.7:15090") == 403
    assert _guard_status(("10.8.1.12", 40000), "localhost:15090") == 403
    assert _guard_status(("fd00::5", 40000, 0, 0), "[fd00::9]:15090") == 403  # type: ignore[arg-type]
    # kubectl port-forward arrives on loopback, over IPv4, IPv6 or IPv4-mapped IPv6.
    for peer in (("127.0.0.1", 1), ("::1", 1, 0, 0), ("::ffff:127.0.0.1", 1, 0, 0)):
        assert _guard_status(peer, "localhost:15090") == 200, peer  # type: ignore[arg-type]
    # Loopback peer, but a non-loopback IP or a name in Host: a rebinding browser or a confused proxy.
    assert _guard_status(("127.0.0.1", 1), "10.8.2.7:15090") == 421
    assert _guard_status(("127.0.0.1", 1), "0.0.0.0:15090") == 421  # 0.0.0.0 is where it listens, not a name
    assert _guard_status(("127.0.0.1", 1), "attacker.example") == 421
    # Widened by the operator (behind a NetworkPolicy): other peers and IP-literal hosts, still no names.
    assert _guard_status(("10.8.1.12", 40000), "10.8.2.7:15090", remote=True) == 200
    assert _guard_status(("10.8.1.12", 40000), "attacker.example", remote=True) == 421


def test_status_page_remote_needs_the_status_page() -> None:
    cfg = Config(listen="127.0.0.1:0", plaintext=True, istiod=("127.0.0.1:1",), istiod_plaintext=True)
    with pytest.raises(ConfigError, match="--admin-status-page-remote"):
        validate(dataclasses.replace(cfg, admin_status_page_remote=True))
