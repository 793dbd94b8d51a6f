from __future__ import annotations

import importlib
import pkgutil

import istioctl_proxy


def test_public_api_is_sorted_and_importable() -> None:
    assert istioctl_proxy.__all__ == sorted(istioctl_proxy.__all__)
    for name in istioctl_proxy.__all__:
        assert getattr(istioctl_proxy, name) is not None


def test_every_module_declares_its_public_names() -> None:
    # sim/ (the simulated istiod, demo and test CA) is not part of the library's surface, but the demo, the
    # benchmarks and the tests import it: its names are declared as well. __main__ has none.
    modules = [m.name for m in pkgutil.walk_packages(istioctl_proxy.__path__, "istioctl_proxy.")
               if not m.name.endswith("__main__")]
    assert len(modules) > 20 and {"istioctl_proxy.sim", "istioctl_proxy.sim.simulator"} <= set(modules)
    for name in modules:
        module = importlib.import_module(name)
        public = getattr(module, "__all__", None)
        assert public is not None, f"{name} has no __all__"
        assert [n for n in public if not hasattr(module, n)] == [], name
        assert len(set(public)) == len(public), name


def test_xds_protos_coexist_with_googleapis_common_protos() -> None:
    # xds-protos ships its own google/rpc tree; both must import side by side (grpcio-health pulls the other).
    importlib.import_module("google.rpc.status_pb2")
    importlib.import_module("envoy.service.discovery.v3.discovery_pb2")
    importlib.import_module("grpc_health.v1.health_pb2")

