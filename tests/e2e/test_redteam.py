"""Red-team attacks on identity-mode scoping that the hostile corpus (test_hostile.py) does not cover.

Real pilot-discovery replicas; the attacker controls a workload in the scoped namespace, so it can connect
its own proxy to istiod with any node id (istiod checks only NAMESPACE / SERVICE_ACCOUNT against the
caller's certificate, never the id), and it calls the proxy with a certificate of that namespace.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from istioctl_proxy import client
from istioctl_proxy.policy import CONFIG_DUMP, DEBUG

from .ads import CDS, LDS, AdsClient, XdsState, close_clients, start_clients
from .mesh import Mesh, async_wait_until
from .proxy_process import ProxyProcess
from .test_hostile import SCOPED_NS, _proxy

pytestmark = pytest.mark.e2e

# istiod's connection id of every upstream stream the identity-mode proxy opens is
# "istioctl-proxy.istio-system-<n>" (app.upstream_identity_node): any substring of it names that connection.
CRAFTED_ID = "istioctl-proxy"
CONTROL_ID = f"control.{SCOPED_NS}"


@pytest.fixture(scope="module")
def identity_proxy(mesh: Mesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    proxy = _proxy(mesh, tmp_path_factory.mktemp("redteam-identity"), True)
    yield proxy
    proxy.stop()


@pytest.fixture
async def crafted_proxy(mesh: Mesh) -> AsyncIterator[AdsClient]:
    """The attacker's own proxy, alone on the last replica, with node id `sidecar~…~istioctl-proxy~<ns>…`."""
    replica = mesh.replicas[-1]
    ads = mesh.ads_client(replica, "crafted", SCOPED_NS, {CDS: XdsState.SYNCED, LDS: XdsState.SYNCED})
    ads.node.id = f"sidecar~127.0.0.1~{CRAFTED_ID}~{SCOPED_NS}.svc.cluster.local"
    control = mesh.ads_client(replica, "control", SCOPED_NS, {CDS: XdsState.SYNCED, LDS: XdsState.SYNCED})
    await start_clients([ads, control])
    await async_wait_until(lambda: {CRAFTED_ID, CONTROL_ID} <= set(replica.proxy_states()), 30,
                           what="crafted and control proxies in syncz")
    yield ads
    await close_clients([ads, control])


async def test_scoped_caller_cannot_dump_the_proxys_own_upstream_connection(
    mesh: Mesh, identity_proxy: ProxyProcess, crafted_proxy: AdsClient
) -> None:
    """The holder rule looks for look-alikes in syncz, but syncz lists only proxies (PROXY_CONFIG); istiod's
    getProxyConnection matches the id against *every* initialized connection, in map order, including the
    debug stream the proxy itself opens (node istioctl-proxy.istio-system) to ask for the dump. Before the
    fix a scoped caller whose own proxy's id was a substring of that connection id got, about one time in
    two, the dump of the proxy's own istio-system debug connection (observed with real istiod: 552 / 48
    bytes instead of the crafted proxy's 16546 / 8948). Such an id is ambiguous: istiod's empty answer."""
    leaf = mesh.ca.issue_spiffe(SCOPED_NS, "default")
    target = client.Target(identity_proxy.address, ca_pem=mesh.root_cert_pem, authority="localhost",
                           cert_pem=leaf.cert_pem, key_pem=leaf.key_pem, namespace=SCOPED_NS)  # fmt: skip
    answered: list[str] = []
    for attempt in range(12):
        dump, _ = await client.request(target, CONFIG_DUMP, [CRAFTED_ID])
        debug, _ = await client.request(target, DEBUG, [f"config_dump?proxyID={CRAFTED_ID}"])
        assert [r.value for r in debug.resources] != [], "the debug path always answers one body"
        body = debug.resources[0].value
        if dump.resources:
            answered.append(f"attempt {attempt}: config_dump of {sum(len(r.value) for r in dump.resources)} bytes")
        if not body.startswith(b"Proxy not connected"):
            answered.append(f"attempt {attempt}: debug body {body[:80]!r}")
    assert not answered, "\n".join(answered)
    # Not vacuous: an ordinary id of the same namespace on the same replica is still dumped.
    own, _ = await client.request(target, CONFIG_DUMP, [CONTROL_ID])
    assert own.resources, "the control proxy's own dump is missing: the setup is wrong"
