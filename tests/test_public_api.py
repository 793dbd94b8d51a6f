from __future__ import annotations

import importlib

import istioctl_proxy


def test_public_api_is_sorted_and_importable() -> None:
    assert istioctl_proxy.__all__ == sorted(istioctl_proxy.__all__)
    for name in istioctl_proxy.__all__:
        assert getattr(istioctl_proxy, name) is not None


def test_xds_protos_coexist_with_googleapis_common_protos() -> None:
    # xds-protos ships its own google/rpc tree; both must import side by side (grpcio-health pulls the other).
    importlib.import_module("google.rpc.status_pb2")
    importlib.import_module("envoy.service.discovery.v3.discovery_pb2")
    importlib.import_module("grpc_health.v1.health_pb2")
