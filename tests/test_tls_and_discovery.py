"""Serving TLS with certificate reload; DNS discovery that follows changes."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Awaitable, Callable, Sequence

from istioctl_proxy import client
from istioctl_proxy.app import Proxy, free_port
from istioctl_proxy.config import Config
from istioctl_proxy.discovery import DnsSource, Replica, ReplicaSet, StaticSource
from istioctl_proxy.sim.simulator import SimReplica, build_simulator_server
from istioctl_proxy.tls import UpstreamTLS
from istioctl_proxy.upstream import UpstreamPool

from . import ads_client
from .helpers import ADMIN_TOKEN, TOKENS, stack
from .waits import EVENT_TIMEOUT, until


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
        resp, _ = await ads_client.request(s.target(leaf=s.pki.client("istio-system")), client.SYNCZ)
        assert len(resp.resources) == 4
        before = await asyncio.to_thread(_served_cert, s.proxy.port)
        rotated = s.pki.ca.issue_serving()
        cfg = s.proxy.cfg
        # cert-manager writes new files in place; the next handshake must present them.
        with open(cfg.tls_key, "wb") as f:
            f.write(rotated.key_pem)
        with open(cfg.tls_cert, "wb") as f:
            f.write(rotated.cert_pem)
        os.utime(cfg.tls_cert, None)
        resp, _ = await ads_client.request(s.target(leaf=s.pki.client("istio-system")), client.SYNCZ)
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
        version = rs.version
        resolver.records = ["127.0.0.3", "127.0.0.4"]
        await asyncio.wait_for(rs.wait_changed(version), EVENT_TIMEOUT)
        assert [r.address for r in rs.current()] == ["127.0.0.3:15012", "127.0.0.4:15012"]
        assert [r.address for r in held] == ["127.0.0.2:15012", "127.0.0.3:15012"]
        resolver.records = []  # DNS outage: keep the last known set
        calls = resolver.calls
        await until(lambda: resolver.calls >= calls + 3, "three resolutions during the outage")
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
        resp, _ = await ads_client.request(s.target(), client.SYNCZ)
        assert len(resp.resources) == 3
        rs._update("static", [Replica(f"127.0.0.1:{p}") for p in ports])
        resp, _ = await ads_client.request(s.target(), client.SYNCZ)
        assert len(resp.resources) == 9


async def replicas_become(rs: ReplicaSet, addresses: list[str]) -> None:
    """Wait for discovery to list exactly `addresses`."""
    await until(lambda: [r.address for r in rs.current()] == addresses,
                lambda: f"discovery to list {addresses}, not {[r.address for r in rs.current()]}")


async def test_wait_changed_sees_a_change_made_before_its_waiter_first_runs() -> None:
    """wait_for and create_task run a coroutine a loop turn later: a change in between must still end the
    wait (the default is the version when wait_changed was called, not when its waiter first ran)."""
    rs = ReplicaSet([])
    waiter = asyncio.ensure_future(rs.wait_changed())
    rs._update("static", [Replica("10.0.0.1:15012")])  # lands before the waiter's first step
    assert not waiter.done()
    assert await asyncio.wait_for(waiter, EVENT_TIMEOUT) == 1


async def test_sources_merge_without_duplicates() -> None:
    rs = ReplicaSet([StaticSource(["10.0.0.1:15012", "10.0.0.2:15012"]), StaticSource(["10.0.0.2:15012"], name="b")])
    await rs.start()
    try:
        await until(lambda: len(rs.current()) >= 2, "both sources")
        assert [r.address for r in rs.current()] == ["10.0.0.1:15012", "10.0.0.2:15012"]
    finally:
        await rs.stop()


async def churn_through_proxy(
    proxy: Proxy, rounds: int, change: Callable[[int], Awaitable[set[str]]], target: client.Target
) -> None:
    """`rounds` changes of the replica set (each `change(i)` returns the addresses it leads to), a call after
    each so every replica gets a channel and a last answer; then per-replica state must cover no more than
    the replicas discovery lists, and once the retiring grace (0 here) is over no dropped channel stays open."""
    pool, metrics = proxy.pool, proxy.metrics
    for i in range(rounds):
        version = proxy.replicas.version
        expected = await change(i)
        while {r.address for r in proxy.replicas.current()} != expected:
            version = await asyncio.wait_for(proxy.replicas.wait_changed(version), EVENT_TIMEOUT)
        await ads_client.request(target, client.SYNCZ, timeout=EVENT_TIMEOUT)
        current = {r.address for r in proxy.replicas.current()}
        for name, state in (("last_ok", pool.last_ok), ("last_error", pool.last_error),
                            ("last_answer", metrics.last_answer)):
            assert set(state) <= current, (i, name, set(state) - current)
        assert set(pool.open_addresses) <= current, (i, set(pool.open_addresses) - current)
    await until(lambda: pool.retiring == 0, "retired channels to close")
    assert pool.channels_opened - pool.channels_closed == len(pool.open_addresses)
    assert pool.channels_opened > len(pool.open_addresses)  # the churn really opened and retired channels


async def test_dns_churn_leaves_no_channels_tasks_or_per_replica_state() -> None:
    """Replicas come and go through DNS for a fixed number of rounds; channels, tasks and per-replica state
    (pool last_ok/last_error, metrics) return to their baseline, and stop() closes every channel, the
    retiring ones included."""
    port = free_port()
    ips = [f"127.0.0.{i}" for i in range(2, 8)]
    servers = []
    for ip in ips[:-1]:  # the last IP has no server: its calls fail and leave a last_error
        server, _ = build_simulator_server(SimReplica(f"istiod-{ip}", tokens=dict(TOKENS)), f"{ip}:{port}")
        await server.start()
        servers.append(server)
    resolver = ControlledResolver(ips[:2])
    baseline = asyncio.all_tasks()
    cfg = Config(listen="127.0.0.1:0", plaintext=True, istiod_dns=(f"istiod.test:{port}",), istiod_dns_interval=0.01,
                 istiod_plaintext=True, admin_listen="127.0.0.1:0", drain_seconds=0.1)
    proxy = Proxy(cfg)
    (source,) = proxy.replicas.sources
    assert isinstance(source, DnsSource)
    source.resolver = resolver
    proxy.pool.retire_after = 0.0
    await proxy.start()
    target = client.Target(f"127.0.0.1:{proxy.port}", plaintext=True, token=ADMIN_TOKEN)

    async def change(i: int) -> set[str]:
        resolver.records = [ips[(i + k) % len(ips)] for k in range(1 + i % 3)]
        return {f"{ip}:{port}" for ip in resolver.records}

    try:
        await churn_through_proxy(proxy, 30, change, target)
        assert proxy.pool.last_error, "the IP without a server never failed a call"
    finally:
        await proxy.stop(0)
        for server in servers:
            await server.stop(0)
    assert proxy.pool.channels_opened == proxy.pool.channels_closed
    left = asyncio.all_tasks() - baseline - {asyncio.current_task()}
    assert not left, left


async def test_pool_close_closes_channels_still_in_their_retirement_grace() -> None:
    pool = UpstreamPool(UpstreamTLS(plaintext=True), max_message_bytes=1 << 20)  # default grace: 60 s
    for i in range(3):
        pool.channel(f"127.0.0.1:{1000 + i}")
    pool.retain((Replica("127.0.0.1:1000"),))
    assert pool.retiring == 2 and pool.open_addresses == ("127.0.0.1:1000",)
    await pool.close()
    assert pool.retiring == 0
    assert pool.channels_opened == pool.channels_closed == 3


async def test_a_late_answer_of_a_dropped_replica_brings_no_state_back() -> None:
    """A call still in flight to a replica that discovery drops ends after the drop: its outcome must not
    re-create the replica's last_error or metric series (they would then never be pruned)."""
    import grpc
    import pytest

    port = free_port()
    hung = SimReplica("istiod-hung", tokens=dict(TOKENS))
    hung.faults.hang = True
    servers = {}
    for ip, replica in (("127.0.0.2", hung), ("127.0.0.3", SimReplica("istiod-ok", tokens=dict(TOKENS)))):
        servers[ip], _ = build_simulator_server(replica, f"{ip}:{port}")
        await servers[ip].start()
    resolver = ControlledResolver(["127.0.0.2"])
    cfg = Config(listen="127.0.0.1:0", plaintext=True, istiod_dns=(f"istiod.test:{port}",), istiod_dns_interval=0.01,
                 istiod_plaintext=True, admin_listen="", drain_seconds=0.1, upstream_timeout=600)
    proxy = Proxy(cfg)
    (source,) = proxy.replicas.sources
    assert isinstance(source, DnsSource)
    source.resolver = resolver
    await proxy.start()
    gone = f"127.0.0.2:{port}"
    try:
        await replicas_become(proxy.replicas, [gone])
        target = client.Target(f"127.0.0.1:{proxy.port}", plaintext=True, token=ADMIN_TOKEN)
        call = asyncio.create_task(ads_client.request(target, client.SYNCZ, timeout=600))
        await until(lambda: hung.requests >= 1, "the call to reach the hung replica")
        resolver.records = ["127.0.0.3"]
        await replicas_become(proxy.replicas, [f"127.0.0.3:{port}"])
        await servers.pop("127.0.0.2").stop(0)  # now the call in flight to the dropped replica fails
        with pytest.raises(grpc.aio.AioRpcError):
            await call
        assert gone not in proxy.pool.last_error and gone not in proxy.pool.last_ok
        assert gone not in proxy.metrics.last_answer
        samples = [s for m in proxy.metrics.registry.collect() for s in m.samples if s.labels.get("replica") == gone]
        assert samples == []
    finally:
        await proxy.stop(0)
        for server in servers.values():
            await server.stop(0)
