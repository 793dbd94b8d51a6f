"""/metrics after real traffic: simulated replicas + the proxy on loopback, scraped over HTTP."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping

import aiohttp
import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from prometheus_client.parser import text_string_to_metric_families

from istioctl_proxy import client
from istioctl_proxy.discovery import Replica
from istioctl_proxy.metrics import CACHED, COALESCED, Metrics
from istioctl_proxy.model import Answer
from istioctl_proxy.policy import SYNCZ
from istioctl_proxy.sim.pki import write_file

from . import ads_client
from .ads_client import ads_call
from .helpers import stack
from .waits import EVENT_TIMEOUT, until

Samples = Mapping[tuple[str, frozenset[tuple[str, str]]], float]
ANY_PORT = "127.0.0.1:0"


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def scrape(port: int) -> Samples:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return parse(await response.text())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def eventually(port: int, name: str, expected: float, **labels: str) -> Samples:
    """The scraped samples once `name{labels}` reads `expected`."""

    async def reached() -> tuple[Samples] | None:
        samples = await scrape(port)
        return (samples,) if value(samples, name, **labels) == expected else None

    (samples,) = await until(reached, f"{name}{labels or ''} to read {expected}")
    return samples


async def test_call_and_upstream_metrics_move_with_traffic() -> None:
    async with stack(3, 12, admin_listen=ANY_PORT) as s:
        port = s.proxy.admin_port
        before = await scrape(port)
        assert value(before, "istioctl_proxy_calls_total", type_url=SYNCZ, outcome="OK") == 0

        for _ in range(2):
            await ads_client.request(s.target(), client.SYNCZ)
        after = await scrape(port)

        assert value(after, "istioctl_proxy_calls_total", type_url=SYNCZ, outcome="OK") == 2
        assert value(after, "istioctl_proxy_call_duration_seconds_count", type_url=SYNCZ) == 2
        assert value(after, "istioctl_proxy_call_duration_seconds_sum", type_url=SYNCZ) > 0
        assert value(after, "istioctl_proxy_merged_resources_total", type_url=SYNCZ) == 24
        assert value(after, "istioctl_proxy_response_bytes_total", type_url=SYNCZ) > 24 * 50
        assert value(after, "istioctl_proxy_calls_in_flight", type_url=SYNCZ) == 0
        for r, address in zip(s.replicas, s.mesh.addresses, strict=True):
            assert r.requests == 2
            assert value(after, "istioctl_proxy_upstream_duration_seconds_count", replica=address, source="static") == 2
        assert not [k for k in after if k[0] == "istioctl_proxy_upstream_errors_total"]


async def test_replica_gauges_follow_the_readiness_probe() -> None:
    async with stack(3, 6, admin_listen=ANY_PORT) as s:
        port = s.proxy.admin_port
        samples = await eventually(port, "istioctl_proxy_replicas_healthy", 3)
        assert value(samples, "istioctl_proxy_replicas_known") == 3
        assert value(samples, "istioctl_proxy_ready") == 1
        for address in s.mesh.addresses:
            assert value(samples, "istioctl_proxy_replica_up", replica=address, source="static") == 1


async def test_partial_and_refused_calls_are_counted_by_outcome() -> None:
    async with stack(3, 12, admin_listen=ANY_PORT) as s:
        port = s.proxy.admin_port
        s.replicas[1].faults.fail_code = grpc.StatusCode.UNAVAILABLE
        resp, trailers = await ads_client.request(s.target(), client.SYNCZ)
        assert trailers, "a partial answer names the failed replica"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await ads_client.request(s.target(token="not-a-token"), client.SYNCZ)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

        samples = await scrape(port)
        assert value(samples, "istioctl_proxy_calls_total", type_url=SYNCZ, outcome="PARTIAL") == 1
        assert value(samples, "istioctl_proxy_calls_total", type_url=SYNCZ, outcome="UNAUTHENTICATED") == 1
        assert value(samples, "istioctl_proxy_merged_resources_total", type_url=SYNCZ) == len(resp.resources)
        failing = s.mesh.addresses[1]
        assert value(samples, "istioctl_proxy_upstream_errors_total", replica=failing, source="static",
                     code="UNAVAILABLE") == 1
        # The refused token is refused by all three replicas.
        assert sum(v for (name, labels), v in samples.items() if name == "istioctl_proxy_upstream_errors_total"
                   and ("code", "UNAUTHENTICATED") in labels) == 3


async def test_unknown_type_urls_share_one_label() -> None:
    async with stack(2, 2, admin_listen=ANY_PORT) as s:
        for type_url in ("type.googleapis.com/a.B", "anything/else"):
            with pytest.raises(grpc.aio.AioRpcError):
                await ads_client.request(s.target(), type_url)
        samples = await scrape(s.proxy.admin_port)
        assert value(samples, "istioctl_proxy_calls_total", type_url="other", outcome="UNIMPLEMENTED") == 2
        assert not [k for k in samples if ("type_url", "anything/else") in k[1]]


async def test_in_flight_gauge_counts_a_slow_call() -> None:
    async with stack(2, 4, admin_listen=ANY_PORT) as s:
        for r in s.replicas:
            r.faults.latency = 0.6
        call = asyncio.create_task(ads_client.request(s.target(), client.SYNCZ))
        await eventually(s.proxy.admin_port, "istioctl_proxy_calls_in_flight", 1, type_url=SYNCZ)
        await call
        samples = await scrape(s.proxy.admin_port)
        assert value(samples, "istioctl_proxy_calls_in_flight", type_url=SYNCZ) == 0
        # At least the 0.6 s the replicas wait (a loaded machine may add any amount on top).
        assert value(samples, "istioctl_proxy_call_duration_seconds_bucket", type_url=SYNCZ, le="0.5") == 0
        assert value(samples, "istioctl_proxy_call_duration_seconds_bucket", type_url=SYNCZ, le="+Inf") == 1


async def test_openmetrics_is_negotiated() -> None:
    async with stack(1, 1, admin_listen=ANY_PORT) as s, aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{s.proxy.admin_port}/metrics"
        async with http.get(url, headers={"Accept": "application/openmetrics-text; version=1.0.0"}) as response:
            assert response.headers["Content-Type"].startswith("application/openmetrics-text")
            assert (await response.text()).endswith("# EOF\n")


def test_shared_answers_and_registry_isolation() -> None:
    one, two = Metrics(), Metrics()
    one.shared_answer(SYNCZ, COALESCED)
    one.shared_answer(SYNCZ, CACHED)
    one.shared_answer(SYNCZ, CACHED)
    samples = parse(one.exposition("")[0].decode())
    assert value(samples, "istioctl_proxy_shared_answers_total", type_url=SYNCZ, kind="coalesced") == 1
    assert value(samples, "istioctl_proxy_shared_answers_total", type_url=SYNCZ, kind="cached") == 2
    assert value(parse(two.exposition("")[0].decode()), "istioctl_proxy_shared_answers_total",
                 type_url=SYNCZ, kind="cached") == 0
    with pytest.raises(ValueError):
        one.shared_answer(SYNCZ, "other")


def test_series_of_a_dropped_replica_are_removed() -> None:
    m = Metrics()
    gone, kept = Replica("10.0.0.1:15012", "dns:istiod:15012"), Replica("10.0.0.2:15012", "dns:istiod:15012")
    for r in (gone, kept):
        m.observe_upstream(Answer(r, None, grpc.StatusCode.UNAVAILABLE, "down", 0.01))
    m.set_replicas({gone: False, kept: True})
    m.retain([kept])
    text = m.exposition("")[0].decode()
    assert gone.address not in text
    assert kept.address in text
    assert set(m.last_answer) == {kept.address}


async def test_unexpected_exceptions_become_internal_logged_and_counted(
    caplog: pytest.LogCaptureFixture, tmp_path: os.PathLike[str]
) -> None:
    """One catch-all at the gRPC boundary: INTERNAL with a short message (no Python class name, no text of
    the exception), the traceback in the log, and a counter."""
    token_file = write_file(os.path.join(str(tmp_path), "token"), b"upstream-token\n")
    async with stack(2, 4, identity=True, upstream_token_file=token_file, admin_listen=ANY_PORT) as s:
        assert s.pki is not None
        target = s.target(leaf=s.pki.client("istio-system"))
        os.remove(token_file)  # a missing --upstream-token-file: an OSError deep in the data path
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ads_client.request(target, SYNCZ, timeout=EVENT_TIMEOUT)
        assert err.value.code() == grpc.StatusCode.INTERNAL, err.value.details()
        assert err.value.details() == "internal error in istioctl-proxy (logged there)", err.value.details()

        async def broken(*args: object) -> object:
            raise KeyError("secret-looking internal detail")

        s.proxy.service.aggregator.answer = broken  # type: ignore[method-assign]
        await eventually(s.proxy.admin_port, "istioctl_proxy_internal_errors_total", 1)
        for is_delta in (False, True):
            req: object = (discovery_pb2.DeltaDiscoveryRequest if is_delta else discovery_pb2.DiscoveryRequest)(
                type_url=SYNCZ, node=client.istioctl_node("istio-system"))
            async with grpc.aio.secure_channel(s.address, grpc.ssl_channel_credentials(
                s.pki.ca.cert_pem, target.key_pem, target.cert_pem),
                    options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
                out = await ads_call(ch, [req], delta=is_delta)  # type: ignore[list-item]
            assert out.code == grpc.StatusCode.INTERNAL, out
            assert out.details == "internal error in istioctl-proxy (logged there)", out.details
        after = await eventually(s.proxy.admin_port, "istioctl_proxy_internal_errors_total", 3)
        assert value(after, "istioctl_proxy_calls_total", type_url=SYNCZ, outcome="INTERNAL") == 3
    logged = [r for r in caplog.records if r.exc_info and "unexpected error" in r.getMessage()]
    assert len(logged) == 3, [r.getMessage() for r in logged]
    assert isinstance(logged[0].exc_info[1], FileNotFoundError)  # type: ignore[index]
    assert "secret-looking internal detail" in str(logged[-1].exc_info[1])  # type: ignore[index]
