"""Session fixtures for the real mesh (istiod replicas, Envoys, istioctl). They never skip: if the peers are
missing the tests fail, because CI installs them with scripts/install-peers before running pytest."""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from istioctl_proxy.sim.pki import TestCA

from .jwt_issuer import JwtIssuer
from .mesh import EnvoyProxy, Istioctl, Mesh, Peers, PeersMissingError, copy_logs

REPLICAS = int(os.environ.get("ISTIOCTL_PROXY_E2E_REPLICAS", "3"))
# Where to copy replica/Envoy logs at the end of the session (e.g. a CI artifact dir); unset = keep in tmp.
LOG_DIR = os.environ.get("ISTIOCTL_PROXY_E2E_LOG_DIR")


@pytest.fixture(scope="session")
def peers() -> Peers:
    try:
        return Peers.find()
    except PeersMissingError as e:
        missing = str(e)
    pytest.fail(missing, pytrace=False)


@pytest.fixture(scope="session")
def test_ca() -> TestCA:
    return TestCA()


@pytest.fixture(scope="session")
def jwt_issuer() -> Iterator[JwtIssuer]:
    with JwtIssuer() as issuer:
        yield issuer


@pytest.fixture(scope="session")
def mesh(
    peers: Peers, test_ca: TestCA, jwt_issuer: JwtIssuer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mesh]:
    m = Mesh(tmp_path_factory.mktemp("mesh"), peers, replicas=REPLICAS, ca=test_ca, jwt_issuer=jwt_issuer)
    with m:
        yield m
        if LOG_DIR:
            copy_logs(m, Path(LOG_DIR))


@pytest.fixture(scope="session")
def istioctl(mesh: Mesh) -> Istioctl:
    return mesh.istioctl


@pytest.fixture(scope="session")
def envoy_router(mesh: Mesh) -> EnvoyProxy:
    """A stock Envoy as a `router` (gateway) node on replica 0: with no Gateway config it ACKs everything."""
    return mesh.start_envoy(mesh.replicas[0], "ingress-0", "istio-ingress", node_type="router")


@pytest.fixture(scope="session")
def envoy_sidecar(mesh: Mesh) -> EnvoyProxy:
    """A stock Envoy as a `sidecar` node on replica 1 (if any): it NACKs istiod's CDS and LDS, which carry
    Istio-only filters (see SIDECAR_NAMESPACE)."""
    return mesh.start_envoy(mesh.replicas[1 % len(mesh.replicas)], "app-0", node_type="sidecar")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # On failure, attach the tail of every replica and Envoy log: the cause is usually in there.
    report = yield
    m = getattr(item, "funcargs", {}).get("mesh")
    if report.failed and isinstance(m, Mesh):
        for r in m.replicas:
            report.sections.append((f"{r.pod_name} log tail", r.log_tail(30)))
        for e in m.envoys:
            report.sections.append((f"envoy {e.proxy_id} log tail", e.log_tail(20)))
    return report
