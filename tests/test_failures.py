"""Failure policy: a dead or slow replica never makes the caller wait past its deadline."""

from __future__ import annotations

import grpc
import pytest

from istioctl_proxy import client
from istioctl_proxy.server import FAILED_REPLICAS_KEY

from . import ads_client
from .helpers import stack


async def test_dead_replica_yields_partial_answer_naming_it() -> None:
    async with stack(3, 9) as s:
        dead = s.mesh.addresses[1]
        await s.mesh.servers[1].stop(0)
        resp, trailers = await ads_client.request(s.target(), client.SYNCZ)
        assert len(resp.resources) == 6
        failed = [v for k, v in trailers if k == FAILED_REPLICAS_KEY]
        assert len(failed) == 1 and failed[0].startswith(dead) and "UNAVAILABLE" in failed[0]


async def test_slow_replica_is_cut_off_before_the_callers_deadline() -> None:
    # The caller's own deadline is the clock: had the proxy waited for the slow replica, the call would
    # end DEADLINE_EXCEEDED instead of answering with the other two (a generous deadline, for loaded machines).
    async with stack(3, 9, upstream_timeout=600) as s:
        s.replicas[0].faults.latency = 3600.0
        resp, trailers = await ads_client.request(s.target(), client.SYNCZ, timeout=10.0)
        assert len(resp.resources) == 6
        failed = [v for k, v in trailers if k == FAILED_REPLICAS_KEY]
        assert len(failed) == 1 and failed[0].startswith(s.mesh.addresses[0]) and "DEADLINE_EXCEEDED" in failed[0]


async def test_hung_replica_is_cut_off_by_the_upstream_timeout_cap() -> None:
    # The cap, not the caller's hour-long deadline, ends the wait: the answer says it gave up after the cap.
    async with stack(2, 4, upstream_timeout=0.5) as s:
        s.replicas[1].faults.hang = True
        resp, trailers = await ads_client.request(s.target(), client.SYNCZ, timeout=3600)
        assert len(resp.resources) == 2
        failed = [v for k, v in trailers if k == FAILED_REPLICAS_KEY]
        assert len(failed) == 1 and failed[0].startswith(s.mesh.addresses[1]) and "DEADLINE_EXCEEDED" in failed[0]


async def test_require_all_fails_the_call_when_a_replica_fails() -> None:
    async with stack(3, 9, require_all=True) as s:
        await s.mesh.servers[2].stop(0)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ads_client.request(s.target(), client.SYNCZ)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "require-all" in (err.value.details() or "")


async def test_every_replica_failing_gives_the_most_telling_status() -> None:
    async with stack(2, 4) as s:
        s.replicas[0].faults.fail_code = grpc.StatusCode.INTERNAL
        await s.mesh.servers[1].stop(0)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ads_client.request(s.target(), client.SYNCZ)
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "every replica failed" in (err.value.details() or "")


async def test_no_replicas_known_is_unavailable() -> None:
    async with stack(1, 1) as s:
        s.proxy.replicas._update("static", [])
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ads_client.request(s.target(), client.SYNCZ)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
