"""The gRPC surface beside ADS, and the less common upstream settings."""

from __future__ import annotations

import dataclasses
import os
import tempfile

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from istioctl_proxy import client
from istioctl_proxy.app import Proxy
from istioctl_proxy.pki import TestCA, write_file
from istioctl_proxy.simulate import SimulatedMesh
from istioctl_proxy.simulator import make_mesh

from .helpers import TOKENS, make_pki, stack


async def test_health_and_reflection_are_served() -> None:
    async with stack(1, 1) as s, grpc.aio.insecure_channel(s.address) as ch:
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = [svc.name async for r in responses for svc in r.list_services_response.service]
        assert "envoy.service.discovery.v3.AggregatedDiscoveryService" in names


async def test_insecure_skip_verify_reaches_an_istiod_with_an_unknown_ca() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        pki = make_pki(tmp)
        stranger = TestCA()
        istiod = stranger.issue(dns=("istiod.istio-system.svc",))
        mesh = SimulatedMesh(make_mesh(2, 4, tokens=TOKENS))
        await mesh.start(tls=(istiod.cert_pem, istiod.key_pem, pki.ca.cert_pem))
        ca = pki.path("ca.pem", pki.ca.cert_pem)
        cfg = pki.identity_config(tuple(mesh.addresses), istiod_ca="", istiod_insecure_skip_verify=True)
        for verify in (False, True):
            proxy = Proxy(
                cfg if not verify else dataclasses.replace(cfg, istiod_insecure_skip_verify=False, istiod_ca=ca)
            )
            await proxy.start()
            try:
                target = pki.admin_target(f"127.0.0.1:{proxy.port}")
                if not verify:
                    resp, _ = await client.request(target, client.SYNCZ)
                    assert len(resp.resources) == 4
                else:
                    # With verification on, an istiod certificate from another CA is refused.
                    try:
                        await client.request(target, client.SYNCZ, timeout=5)
                        raise AssertionError("an unverifiable istiod was trusted")
                    except grpc.aio.AioRpcError as err:
                        assert err.code() == grpc.StatusCode.UNAVAILABLE
            finally:
                await proxy.stop(0)
        await mesh.stop()


async def test_identity_mode_upstream_token_file_is_reread_when_rotated() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        pki = make_pki(tmp)
        mesh = SimulatedMesh(make_mesh(2, 4, tokens={"token-1": ("istio-system", "default")}))
        await mesh.start()
        token_file = write_file(os.path.join(tmp, "token"), b"token-1\n")
        cfg = pki.identity_config(tuple(mesh.addresses), istiod_ca="", istiod_plaintext=True,
                                  upstream_cert="", upstream_key="", upstream_token_file=token_file)
        proxy = Proxy(cfg)
        await proxy.start()
        try:
            target = pki.admin_target(f"127.0.0.1:{proxy.port}")
            resp, _ = await client.request(target, client.SYNCZ)
            assert len(resp.resources) == 4
            # Rotation: the old token stops working and the file holds the new one (mtime and size change).
            write_file(token_file, b"token-2-rotated-and-longer\n")
            for r in mesh.replicas:
                r.tokens = {"token-2-rotated-and-longer": ("istio-system", "default")}
            resp, _ = await client.request(target, client.SYNCZ)
            assert len(resp.resources) == 4
        finally:
            await proxy.stop(0)
            await mesh.stop()
