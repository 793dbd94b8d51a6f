"""Serving TLS with certificate reload; DNS discovery that follows changes."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Sequence

from istioctl_proxy import client
from istioctl_proxy.discovery import DnsSource, Replica, ReplicaSet, StaticSource

from .helpers import EVENT_TIMEOUT, stack


def _served_cert(port: int) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    import socket

    with socket.create_connection(("127.0.0.1", port)) as sock, ctx.wrap_socket(sock) as tls:
        der = tls.getpeercert(binary_form=True)
    return ssl.DER_cert_to_PEM_cert(der).encode()


async def test_tls_serving_reloads_rotated_certificate() -> None:
    async with stack(2, 4, identity=True) as s:
        assert s.pki is not None and s.proxy.reloader is not None
        resp, _ = await client.request(s.target(leaf=s.pki.client("istio-system")), client.SYNCZ)
        assert len(resp.resources) == 4
        before = await asyncio.to_thread(_served_cert, s.proxy.port)
        rotated = s.pki.ca.issue(dns=("localhost",), ips=("127.0.0.1",))
        cfg = s.proxy.cfg
        # cert-manager writes new files in place; the next handshake must present them.
        with open(cfg.tls_key, "wb") as f:
            f.write(rotated.key_pem)
        with open(cfg.tls_cert, "wb") as f:
            f.write(rotated.cert_pem)
        os.utime(cfg.tls_cert, None)
        resp, _ = await client.request(s.target(leaf=s.pki.client("istio-system")), client.SYNCZ)
        assert len(resp.resources) == 4
        after = await asyncio.to_thread(_served_cert, s.proxy.port)
        assert before != after
        assert s.proxy.reloader.reloads >= 1
        assert ssl.PEM_cert_to_DER_cert(after.decode()) == ssl.PEM_cert_to_DER_cert(rotated.cert_pem.decode())


class ControlledResolver:
    """A resolver the test controls: answers whatever `records` holds right now."""

    def __init__(self, records: Sequence[str]) -> None:
        self.records = list(records)
        self.calls = 0

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.calls += 1
        if not self.records:
            raise OSError("NXDOMAIN")
        return list(self.records)


async def test_dns_discovery_follows_changes_and_survives_outage() -> None:
    resolver = ControlledResolver(["127.0.0.2", "127.0.0.3"])
    rs = ReplicaSet([DnsSource("istiod-headless.istio-system.svc:15012", interval=0.05, resolver=resolver)])
    await rs.start()
    try:
        await asyncio.wait_for(rs.wait_changed(0), EVENT_TIMEOUT)
        assert [r.address for r in rs.current()] == ["127.0.0.2:15012", "127.0.0.3:15012"]
        held = rs.current()  # an in-flight call keeps the tuple it started with
        resolver.records = ["127.0.0.3", "127.0.0.4"]
        await asyncio.wait_for(rs.wait_changed(), EVENT_TIMEOUT)
        assert [r.address for r in rs.current()] == ["127.0.0.3:15012", "127.0.0.4:15012"]
        assert [r.address for r in held] == ["127.0.0.2:15012", "127.0.0.3:15012"]
        resolver.records = []  # DNS outage: keep the last known set
        calls = resolver.calls
        while resolver.calls < calls + 3:
            await asyncio.sleep(0.05)
        assert len(rs.current()) == 2
        assert all(r.source == "dns:istiod-headless.istio-system.svc:15012" for r in rs.current())
    finally:
        await rs.stop()


async def test_dns_discovery_routes_calls_to_new_replicas() -> None:
    async with stack(3, 9) as s:
        ports = [a.rpartition(":")[2] for a in s.mesh.addresses]
        # Each simulated replica listens on 127.0.0.1 with its own port: model DNS per port.
        rs = s.proxy.replicas
        rs._update("static", [Replica(s.mesh.addresses[0])])
        resp, _ = await client.request(s.target(), client.SYNCZ)
        assert len(resp.resources) == 3
        rs._update("static", [Replica(f"127.0.0.1:{p}") for p in ports])
        resp, _ = await client.request(s.target(), client.SYNCZ)
        assert len(resp.resources) == 9


async def test_sources_merge_without_duplicates() -> None:
    rs = ReplicaSet([StaticSource(["10.0.0.1:15012", "10.0.0.2:15012"]), StaticSource(["10.0.0.2:15012"], name="b")])
    await rs.start()
    try:
        while len(rs.current()) < 2:
            await asyncio.sleep(0.01)
        assert [r.address for r in rs.current()] == ["10.0.0.1:15012", "10.0.0.2:15012"]
    finally:
        await rs.stop()
