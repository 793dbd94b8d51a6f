"""The merge rules, end to end over real gRPC: simulated replicas as separate servers, the proxy between."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import grpc
import pytest
from envoy.admin.v3 import config_dump_shared_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from istioctl_proxy import client
from istioctl_proxy.discovery import Replica
from istioctl_proxy.fanout import FanOut
from istioctl_proxy.metrics import Metrics
from istioctl_proxy.model import Answer
from istioctl_proxy.policy import CONFIG_DUMP, SYNCZ
from istioctl_proxy.sim.pki import Leaf
from istioctl_proxy.sim.simulate import SimulatedMesh
from istioctl_proxy.sim.simulator import SimProxy, SimReplica, make_mesh
from istioctl_proxy.tls import UpstreamTLS
from istioctl_proxy.upstream import UpstreamPool

from . import ads_client
from .helpers import ADMIN_TOKEN, TOKENS, Stack, stack
from .waits import until


async def test_syncz_concatenates_replicas_with_external_id_and_keeps_version_info() -> None:
    async with stack(3, 30) as s:
        resp, trailers = await ads_client.request(s.target(), client.SYNCZ)
        rows = client.rows(resp)
        assert sorted(r.name for r in rows) == sorted(p.id for r in s.replicas for p in r.proxies)
        ident = json.loads(resp.control_plane.identifier)
        assert ident["ID"] == "<external>"
        assert ident["Component"] == "istiod" and ident["Info"]["version"] == "1.30.3"
        assert resp.type_url == client.SYNCZ and resp.nonce
        assert not [t for t in trailers if t[0] == "x-istioctl-proxy-failed-replicas"]


async def test_external_id_is_configurable() -> None:
    async with stack(2, 4, external_id="my-control-plane") as s:
        resp, _ = await ads_client.request(s.target(), client.SYNCZ)
        assert json.loads(resp.control_plane.identifier)["ID"] == "my-control-plane"


async def test_proxy_seen_on_two_replicas_is_kept_once_most_recent_wins() -> None:
    mesh = make_mesh(3, 6, tokens=TOKENS)
    old = SimProxy("moving", "ns-1", states={"CDS": "STALE"}, updated=1_000_000.0)
    new = SimProxy("moving", "ns-1", states={"CDS": "SYNCED"}, updated=2_000_000.0)
    mesh[0].proxies.append(old)
    mesh[2].proxies.append(new)
    async with stack(mesh=mesh) as s:
        resp, _ = await ads_client.request(s.target(), client.SYNCZ)
        rows = [r for r in client.rows(resp) if r.name == "moving.ns-1"]
        assert len(rows) == 1
        assert rows[0].types["type.googleapis.com/envoy.config.cluster.v3.Cluster"].startswith("SYNCED")
        assert len(resp.resources) == 7


async def test_config_dump_routed_to_the_replica_that_holds_the_proxy() -> None:
    async with stack(3, 9) as s:
        target = s.replicas[2].proxies[-1]
        resp, _ = await ads_client.request(s.target(), "istio.io/debug/config_dump", [target.id])
        assert len(resp.resources) == 7
        clusters = config_dump_shared_pb2.ClustersConfigDump()
        assert resp.resources[1].Unpack(clusters)
        assert target.id.split(".")[0] in clusters.dynamic_active_clusters[0].cluster.value.decode(errors="ignore")
        assert not resp.HasField("control_plane")


async def test_config_dump_of_unknown_proxy_is_empty_not_an_error() -> None:
    async with stack(3, 9) as s:
        resp, _ = await ads_client.request(s.target(), "istio.io/debug/config_dump", ["nobody.nowhere"])
        assert len(resp.resources) == 0 and resp.type_url == "istio.io/debug/config_dump"


async def _debug(s: object, name: str, token: str = ADMIN_TOKEN) -> str:
    resp, _ = await ads_client.request(s.target(token), "istio.io/debug", [name])  # type: ignore[attr-defined]
    assert len(resp.resources) == 1
    return resp.resources[0].value.decode()


async def test_internal_debug_merges_per_path() -> None:
    async with stack(3, 12) as s:
        syncz = json.loads(await _debug(s, "syncz"))
        assert sorted(e["proxy"] for e in syncz) == sorted(p.id for r in s.replicas for p in r.proxies)
        adsz = json.loads(await _debug(s, "adsz"))
        assert adsz["totalClients"] == 12 and len(adsz["clients"]) == 12
        listing = json.loads(await _debug(s, "list"))
        assert "syncz" in listing
        assert sum(r.requests for r in s.replicas) == 3 + 3 + 1  # `list` is asked of one replica only
        holder = s.replicas[1].proxies[0]
        dump = json.loads(await _debug(s, f"config_dump?proxyID={holder.id}"))
        assert dump["proxy"] == holder.id
        assert (await _debug(s, "edsz?proxyID=ghost.none")).startswith("Proxy not connected")
        # An unknown path gets istiod's own 404 body (istioctl then lists the paths), and no replica is asked.
        asked = sum(r.requests for r in s.replicas)
        assert await _debug(s, "nonexistent") == "404 page not found\n"
        assert sum(r.requests for r in s.replicas) == asked
        # Not plain (istiod's mux would clean or redirect it): refused before any replica is asked.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _debug(s, "pprof/profile")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "pprof/profile" in (err.value.details() or "")
        assert sum(r.requests for r in s.replicas) == asked


async def test_several_requests_on_one_stream_each_answered_afresh() -> None:
    async with stack(2, 4) as s, grpc.aio.insecure_channel(s.address) as ch:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch).StreamAggregatedResources(
            metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),), timeout=10
        )
        node = client.istioctl_node("istio-system")
        # istioctl puts a random response_nonce even on its first request; istiod ignores it for debug types.
        await call.write(discovery_pb2.DiscoveryRequest(type_url=client.SYNCZ, node=node, response_nonce="2026-01-01"))
        first = await call.read()
        await call.write(discovery_pb2.DiscoveryRequest(type_url=client.SYNCZ, response_nonce=first.nonce))
        second = await call.read()
        await call.write(discovery_pb2.DiscoveryRequest(type_url="istio.io/debug", resource_names=["list"]))
        third = await call.read()
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
        assert len(first.resources) == len(second.resources) == 4
        assert first.nonce != second.nonce
        assert third.type_url == "istio.io/debug"


async def test_delta_serves_the_same_types_as_named_resources() -> None:
    async with stack(3, 6) as s, grpc.aio.insecure_channel(s.address) as ch:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch).DeltaAggregatedResources(
            metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),), timeout=10
        )
        await call.write(
            discovery_pb2.DeltaDiscoveryRequest(type_url=client.SYNCZ, node=client.istioctl_node("istio-system"))
        )
        resp = await call.read()
        assert sorted(r.name for r in resp.resources) == sorted(p.id for r in s.replicas for p in r.proxies)
        assert json.loads(resp.control_plane.identifier)["ID"] == "<external>"
        await call.write(
            discovery_pb2.DeltaDiscoveryRequest(type_url="istio.io/debug", resource_names_subscribe=["list"])
        )
        resp = await call.read()
        assert [r.name for r in resp.resources] == ["list"]
        assert "syncz" in json.loads(resp.resources[0].resource.value)
        await call.done_writing()


@pytest.mark.parametrize("type_url", ["type.googleapis.com/envoy.config.cluster.v3.Cluster", "istio.io/connections"])
async def test_unsupported_types_get_a_clear_error(type_url: str) -> None:
    async with stack(1, 1) as s:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ads_client.request(s.target(), type_url)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "istio.io/debug/syncz" in (err.value.details() or "")


async def test_more_than_16_mib_answer_passes() -> None:
    mesh = make_mesh(2, 2, tokens=TOKENS)
    big = "x" * (64 * 1024)
    for r in mesh:
        for i in range(150):
            r.proxies.append(SimProxy(f"big-{r.pod_name}-{i}", "ns-0", states={"CDS": "ERROR"}, error=big))
    async with stack(mesh=mesh) as s:
        resp, _ = await ads_client.request(s.target(), client.SYNCZ)
        assert resp.ByteSize() > 16 * 1024 * 1024
        assert len(resp.resources) == 302


# -- Names as istiod reads them, scoped callers, the holder rule, one deadline, no failover after a crash -----


def _ns2_mesh() -> list[SimReplica]:
    """ns-1 and ns-2 proxies whose ids contain each other's pieces."""
    mesh = make_mesh(3, 0, tokens=TOKENS)
    mesh[0].proxies += [SimProxy("victim", "ns-2", states={"CDS": "SYNCED"})]
    mesh[1].proxies += [SimProxy("mine", "ns-1", states={"CDS": "SYNCED"})]
    mesh[2].proxies += [SimProxy("third", "ns-2", states={"CDS": "SYNCED"})]
    return mesh


def _dump_text(resp: discovery_pb2.DiscoveryResponse) -> str:
    return " ".join(str(r.value) for r in resp.resources)


@pytest.mark.parametrize(
    ("type_url", "names"),
    [
        (CONFIG_DUMP, [""]),
        (CONFIG_DUMP, ["", ""]),
        (CONFIG_DUMP, ["victim.ns-2", "victim.ns-2"]),
        (CONFIG_DUMP, ["ns-2", "ns-2"]),
        (CONFIG_DUMP, ["ctim.n"]),
        (CONFIG_DUMP, ["victim.ns-2-1"]),
        ("istio.io/debug", ["config_dump?proxyID="]),
        ("istio.io/debug", ["config_dump?proxyID=victim.ns-2"]),
        ("istio.io/debug", ["config_dump?proxyID=ns-2", "config_dump?proxyID=ns-2"]),
        ("istio.io/debug", ["edsz?proxyID=ns-"]),
        ("istio.io/debug", ["ndsz?proxyID=victim"]),
        ("istio.io/debug", ["config_dump?proxyID=%76ictim.ns-2"]),
    ],
)
async def test_scoped_caller_never_gets_another_namespace_however_the_id_is_written(
    type_url: str, names: list[str]
) -> None:
    async with stack(mesh=_ns2_mesh(), identity=True) as s:
        assert s.pki is not None
        target = s.target(leaf=s.pki.client("ns-1"), namespace="ns-1")
        dumps_before = [r.requests for r in s.replicas]
        resp, _ = await ads_client.request(target, type_url, names)
        text = _dump_text(resp)
        assert ".ns-2" not in text and "victim" not in text and "third" not in text
        if type_url == CONFIG_DUMP:
            assert len(resp.resources) == 0
        else:
            assert resp.resources[0].value.startswith((b"Proxy not connected", b"You must provide a proxyID"))
        # At most the scope check's syncz reached the replicas (one request each), never the lookup itself.
        assert all(r.requests - before <= 1 for r, before in zip(s.replicas, dumps_before, strict=True))


async def test_scoped_caller_gets_its_own_proxy() -> None:
    async with stack(mesh=_ns2_mesh(), identity=True) as s:
        assert s.pki is not None
        target = s.target(leaf=s.pki.client("ns-1"), namespace="ns-1")
        resp, _ = await ads_client.request(target, CONFIG_DUMP, ["mine.ns-1", "mine.ns-1"])
        assert len(resp.resources) == 7 and "mine.ns-1.svc" in _dump_text(resp)
        resp, _ = await ads_client.request(target, "istio.io/debug", ["config_dump?proxyID=mine.ns-1"])
        assert json.loads(resp.resources[0].value)["proxy"] == "mine.ns-1"


async def _delta(
    s: Stack, leaf: Leaf | None, namespace: str, type_url: str, names: list[str]
) -> list[tuple[str, bytes]]:
    target = s.target(leaf=leaf, namespace=namespace)
    out = await ads_client.ads_call(target, [discovery_pb2.DeltaDiscoveryRequest(
        type_url=type_url, node=client.istioctl_node(namespace), resource_names_subscribe=names)], delta=True)
    assert out.code == grpc.StatusCode.OK
    return [(r.name, bytes(r.resource.value)) for r in out.delta().resources]


async def test_delta_scoped_caller_and_another_namespaces_proxy_is_answered_not_an_error() -> None:
    # Issue 11 item 2: this ended "UNKNOWN: Unexpected IndexError".
    async with stack(mesh=_ns2_mesh(), identity=True) as s:
        assert s.pki is not None
        leaf = s.pki.client("ns-1")
        name = "config_dump?proxyID=victim.ns-2"
        assert await _delta(s, leaf, "ns-1", "istio.io/debug", [name]) == [
            (name, b"Proxy not connected to this Pilot instance. It may be connected to another instance.\n")]
        assert await _delta(s, leaf, "ns-1", CONFIG_DUMP, [""]) == []
        assert await _delta(s, leaf, "ns-1", CONFIG_DUMP, ["victim.ns-2", "victim.ns-2"]) == []
        own = await _delta(s, leaf, "ns-1", CONFIG_DUMP, ["mine.ns-1"])
        assert len(own) == 7 and b"mine.ns-1.svc" in b"".join(v for _, v in own)


def _place_lookalike_first(s: Stack) -> None:
    """web-1.team2 on the replica the proxy asks first, web-1.team on the one it asks last (istiod finds
    "web-1.team" in the connection id "web-1.team2-1", so both replicas answer for web-1.team)."""
    by_address = dict(zip(s.mesh.addresses, s.replicas, strict=True))
    order = [by_address[r.address] for r in s.proxy.replicas.current()]
    order[0].proxies.append(SimProxy("web-1", "team2", states={"CDS": "SYNCED"}))
    order[-1].proxies.append(SimProxy("web-1", "team", states={"CDS": "SYNCED"}))
    for r in order:
        r.invalidate()


@pytest.mark.parametrize("identity", [False, True], ids=["forward", "identity"])
async def test_config_dump_comes_from_the_holder_not_a_lookalike(identity: bool) -> None:
    # Issue 11 item 1: the first non-empty answer (web-1.team2's dump) was returned.
    async with stack(mesh=make_mesh(3, 0, tokens=TOKENS), identity=identity) as s:
        _place_lookalike_first(s)
        target = s.pki.admin_target(s.address) if s.pki is not None else s.target()
        resp, _ = await ads_client.request(target, CONFIG_DUMP, ["web-1.team"])
        text = _dump_text(resp)
        assert "web-1.team.svc" in text and "web-1.team2" not in text
        resp, _ = await ads_client.request(target, "istio.io/debug", ["config_dump?proxyID=web-1.team"])
        assert json.loads(resp.resources[0].value)["proxy"] == "web-1.team"
        # The look-alike itself is still found where it is.
        resp, _ = await ads_client.request(target, CONFIG_DUMP, ["web-1.team2"])
        assert "web-1.team2.svc" in _dump_text(resp)


async def test_scope_check_and_fan_out_share_one_deadline() -> None:
    # Issue 11 item 5: the fan-out after the scope check got a fresh, full timeout.
    mesh = _ns2_mesh()
    for r in mesh:
        r.faults.latency = 0.05
    async with stack(mesh=mesh, identity=True, upstream_timeout=5.0) as s:
        assert s.pki is not None
        fanout = s.proxy.service.aggregator.fanout
        ends: list[float] = []
        real_all = fanout.all

        async def recording_all(
            replicas: Any, request: bytes, metadata: Any, timeout: float, **kw: Any
        ) -> list[Answer]:
            ends.append(time.monotonic() + timeout)
            return await real_all(replicas, request, metadata, timeout, **kw)

        fanout.all = recording_all  # type: ignore[method-assign]
        target = s.target(leaf=s.pki.client("ns-1"), namespace="ns-1")
        resp, _ = await ads_client.request(target, CONFIG_DUMP, ["mine.ns-1"])
        assert len(resp.resources) == 7
        assert len(ends) == 2  # the scope check's syncz, then the dump
        assert ends[1] <= ends[0] + 1e-3, "the dump's deadline is later than the call's"


async def test_a_request_that_broke_a_replica_is_not_tried_on_the_next() -> None:
    # istiod panics on a name Go's url.Parse rejects (the simulator too). Sent raw, below the policy's checks.
    mesh = make_mesh(3, 3, tokens=TOKENS)
    sim = SimulatedMesh(mesh)
    await sim.start()
    metrics = Metrics()
    pool = UpstreamPool(UpstreamTLS(plaintext=True), max_message_bytes=1 << 20)
    try:
        fanout = FanOut(pool, on_answer=metrics.observe_upstream)
        replicas = tuple(Replica(a) for a in sim.addresses)
        req = discovery_pb2.DiscoveryRequest(type_url="istio.io/debug", resource_names=["config_dump?proxyID=x\t"])
        req.node.CopyFrom(client.istioctl_node("istio-system"))
        auth = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
        answers = await fanout.first(replicas, req.SerializeToString(), auth, 5.0)
        assert len(answers) == 1 and answers[0].broken and answers[0].code == grpc.StatusCode.UNAVAILABLE
        assert "not retried" in answers[0].error
        assert sum(r.crashed for r in mesh) == 1
        assert sum(r.requests for r in mesh) == 1  # the others never saw it
        assert metrics.registry.get_sample_value("istioctl_proxy_upstream_connection_broken_total") == 1.0
        # A replica that is merely down (connection refused) is not "broken by the request": failover goes on.
        answers = await fanout.first(replicas, client_syncz_request(), auth, 5.0)
        assert answers[-1].ok and not any(a.broken for a in answers)
    finally:
        await pool.close()
        await sim.stop()


def client_syncz_request() -> bytes:
    req = discovery_pb2.DiscoveryRequest(type_url=client.SYNCZ)
    req.node.CopyFrom(client.istioctl_node("istio-system"))
    return req.SerializeToString()


async def test_debug_names_go_cannot_parse_never_reach_a_replica() -> None:
    async with stack(3, 6) as s:
        for name in ("config_dump?proxyID=x\t", "syncz\r\n", ":x", "1a:b", "config_dump%zz", "syncz#%zz", "//[x"):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ads_client.request(s.target(), "istio.io/debug", [name])
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert sum(r.requests for r in s.replicas) == 0
        assert not any(r.crashed for r in s.replicas)
        resp, _ = await ads_client.request(s.target(), "istio.io/debug", ["list"])
        assert "syncz" in json.loads(resp.resources[0].value)


async def test_concurrent_scope_checks_share_one_syncz_fetch() -> None:
    """Red-team F6: every scoped dump reads every replica's syncz; concurrent ones must share that read."""
    async with stack(mesh=_ns2_mesh(), identity=True) as s:
        assert s.pki is not None
        aggregator = s.proxy.service.aggregator
        fanout_all = aggregator.fanout.all
        release = asyncio.Event()
        syncz_fetches = 0

        async def gated(replicas: Any, request: bytes, *args: Any, **kw: Any) -> Any:
            nonlocal syncz_fetches
            if discovery_pb2.DiscoveryRequest.FromString(request).type_url == SYNCZ:
                syncz_fetches += 1
                await release.wait()  # hold the scope check's fetch until every caller has arrived
            return await fanout_all(replicas, request, *args, **kw)

        aggregator.fanout.all = gated  # type: ignore[method-assign]
        target = s.target(leaf=s.pki.client("ns-1"), namespace="ns-1")
        calls = [asyncio.create_task(ads_client.request(target, CONFIG_DUMP, ["mine.ns-1"])) for _ in range(8)]
        await until(lambda: aggregator.syncz_checks.stats.joined == 7, "the seven other callers to join the check")
        release.set()
        for resp, _ in await asyncio.gather(*calls):
            assert len(resp.resources) == 7 and "mine.ns-1.svc" in _dump_text(resp)
        assert syncz_fetches == 1
