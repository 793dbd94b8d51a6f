from __future__ import annotations

import importlib
import inspect
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


def test_component_defaults_are_the_flags_defaults() -> None:
    # Config holds each default once: a component built without arguments is the one a proxy started with
    # default flags builds (plaintext and one static replica only make it buildable here; they set neither).
    from istioctl_proxy.aggregator import Settings
    from istioctl_proxy.app import Proxy
    from istioctl_proxy.client import Target
    from istioctl_proxy.config import Config
    from istioctl_proxy.server import StreamLimits
    from istioctl_proxy.tokenreview import ReviewLimits, TokenReviewAuthenticator

    cfg = Config(plaintext=True, istiod=("127.0.0.1:15012",))
    proxy = Proxy(cfg)
    assert StreamLimits() == proxy.service.limits
    assert Settings() == proxy.service.aggregator.settings
    # What app.token_reviewer_from_config builds (it needs a kubeconfig, so by the same call here).
    flags = ReviewLimits.from_rates(cfg.token_review_rate, cfg.token_review_peer_rate, cfg.token_review_concurrency)
    assert ReviewLimits() == flags
    ttl = inspect.signature(TokenReviewAuthenticator).parameters["ttl"].default
    assert ttl == cfg.token_review_cache_ttl
    # The `ps` client: the proxy's namespace and the largest message it may send.
    target = Target("127.0.0.1:9090")
    assert (target.namespace, target.max_message_bytes) == (cfg.istio_namespace, cfg.max_message_bytes)
