"""The merge rules, end to end over real gRPC: simulated replicas as separate servers, the proxy between."""

from __future__ import annotations

import json

import grpc
import pytest
from envoy.admin.v3 import config_dump_shared_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from istioctl_proxy import client
from istioctl_proxy.simulator import SimProxy, make_mesh

from .helpers import ADMIN_TOKEN, TOKENS, stack


async def test_syncz_concatenates_replicas_with_external_id_and_keeps_version_info() -> None:
    async with stack(3, 30) as s:
        resp, trailers = await client.request(s.target(), client.SYNCZ)
        rows = client.rows(resp)
        assert sorted(r.name for r in rows) == sorted(p.id for r in s.replicas for p in r.proxies)
        ident = json.loads(resp.control_plane.identifier)
        assert ident["ID"] == "<external>"
        assert ident["Component"] == "istiod" and ident["Info"]["version"] == "1.30.3"
        assert resp.type_url == client.SYNCZ and resp.nonce
        assert not [t for t in trailers if t[0] == "x-istioctl-proxy-failed-replicas"]


async def test_external_id_is_configurable() -> None:
    async with stack(2, 4, external_id="my-control-plane") as s:
        resp, _ = await client.request(s.target(), client.SYNCZ)
        assert json.loads(resp.control_plane.identifier)["ID"] == "my-control-plane"


async def test_proxy_seen_on_two_replicas_is_kept_once_most_recent_wins() -> None:
    mesh = make_mesh(3, 6, tokens=TOKENS)
    old = SimProxy("moving", "ns-1", states={"CDS": "STALE"}, updated=1_000_000.0)
    new = SimProxy("moving", "ns-1", states={"CDS": "SYNCED"}, updated=2_000_000.0)
    mesh[0].proxies.append(old)
    mesh[2].proxies.append(new)
    async with stack(mesh=mesh) as s:
        resp, _ = await client.request(s.target(), client.SYNCZ)
        rows = [r for r in client.rows(resp) if r.name == "moving.ns-1"]
        assert len(rows) == 1
        assert rows[0].types["type.googleapis.com/envoy.config.cluster.v3.Cluster"].startswith("SYNCED")
        assert len(resp.resources) == 7


async def test_config_dump_routed_to_the_replica_that_holds_the_proxy() -> None:
    async with stack(3, 9) as s:
        target = s.replicas[2].proxies[-1]
        resp, _ = await client.request(s.target(), "istio.io/debug/config_dump", [target.id])
        assert len(resp.resources) == 7
        clusters = config_dump_shared_pb2.ClustersConfigDump()
        assert resp.resources[1].Unpack(clusters)
        assert target.id.split(".")[0] in clusters.dynamic_active_clusters[0].cluster.value.decode(errors="ignore")
        assert not resp.HasField("control_plane")


async def test_config_dump_of_unknown_proxy_is_empty_not_an_error() -> None:
    async with stack(3, 9) as s:
        resp, _ = await client.request(s.target(), "istio.io/debug/config_dump", ["nobody.nowhere"])
        assert len(resp.resources) == 0 and resp.type_url == "istio.io/debug/config_dump"


async def _debug(s: object, name: str, token: str = ADMIN_TOKEN) -> str:
    resp, _ = await client.request(s.target(token), "istio.io/debug", [name])  # type: ignore[attr-defined]
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
        assert (await _debug(s, "nonexistent")).startswith("404 page not found")


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
            await client.request(s.target(), type_url)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "istio.io/debug/syncz" in (err.value.details() or "")


async def test_more_than_16_mib_answer_passes() -> None:
    mesh = make_mesh(2, 2, tokens=TOKENS)
    big = "x" * (64 * 1024)
    for r in mesh:
        for i in range(150):
            r.proxies.append(SimProxy(f"big-{r.pod_name}-{i}", "ns-0", states={"CDS": "ERROR"}, error=big))
    async with stack(mesh=mesh) as s:
        resp, _ = await client.request(s.target(), client.SYNCZ)
        assert resp.ByteSize() > 16 * 1024 * 1024
        assert len(resp.resources) == 302
