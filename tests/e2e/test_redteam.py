"""Red-team attacks on identity-mode scoping that the hostile corpus (test_hostile.py) does not cover.

Real pilot-discovery replicas; the attacker controls a workload in the scoped namespace, so it can connect
its own proxy to istiod with any node id (istiod checks only NAMESPACE / SERVICE_ACCOUNT against the
caller's certificate, never the id), and it calls the proxy with a certificate of that namespace.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from istioctl_proxy import client
from istioctl_proxy.policy import CONFIG_DUMP, DEBUG, SYNCZ

from .. import ads_client
from ..waits import until
from .ads import CDS, LDS, AdsClient, XdsState, close_clients, start_clients
from .jwt_issuer import JwtIssuer
from .mesh import Mesh
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
    await until(lambda: {CRAFTED_ID, CONTROL_ID} <= set(replica.proxy_states()),
                "crafted and control proxies in syncz")
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
        dump, _ = await ads_client.request(target, CONFIG_DUMP, [CRAFTED_ID])
        debug, _ = await ads_client.request(target, DEBUG, [f"config_dump?proxyID={CRAFTED_ID}"])
        assert [r.value for r in debug.resources] != [], "the debug path always answers one body"
        body = debug.resources[0].value
        if dump.resources:
            answered.append(f"attempt {attempt}: config_dump of {sum(len(r.value) for r in dump.resources)} bytes")
        if not body.startswith(b"Proxy not connected"):
            answered.append(f"attempt {attempt}: debug body {body[:80]!r}")
    assert not answered, "\n".join(answered)
    # Not vacuous: an ordinary id of the same namespace on the same replica is still dumped.
    own, _ = await ads_client.request(target, CONFIG_DUMP, [CONTROL_ID])
    assert own.resources, "the control proxy's own dump is missing: the setup is wrong"


VICTIM_NS = "hostile-victim"
SPOOF_ID = f"spoof.{VICTIM_NS}"


@pytest.fixture
async def namespace_less_proxy(mesh: Mesh) -> AsyncIterator[AdsClient]:
    """The attacker's proxy (namespace hostile-a, as istiod reads it) with no NAMESPACE metadata and an id that
    ends like a proxy of the victim's namespace: istiod takes the config namespace from the node id's DNS
    domain (`hostile-a.svc.cluster.local`), never from the pod id's suffix."""
    replica = mesh.replicas[0]
    ads = mesh.ads_client(replica, "spoof", VICTIM_NS, {CDS: XdsState.SYNCED, LDS: XdsState.SYNCED})
    ads.node.id = f"sidecar~127.0.0.1~{SPOOF_ID}~{SCOPED_NS}.svc.cluster.local"
    del ads.node.metadata.fields["NAMESPACE"]
    await start_clients([ads])
    await until(lambda: SPOOF_ID in replica.proxy_states(), "namespace-less proxy in syncz")
    yield ads
    await close_clients([ads])


async def _syncz_ids(target: client.Target) -> set[str]:
    resp, _ = await ads_client.request(target, SYNCZ, [])
    return {_node_id(r.value) for r in resp.resources}


def _node_id(any_value: bytes) -> str:
    from envoy.service.status.v3 import csds_pb2

    return str(csds_pb2.ClientConfig.FromString(any_value).node.id)


async def test_a_proxy_without_namespace_metadata_is_in_the_namespace_istiod_says(
    mesh: Mesh, identity_proxy: ProxyProcess, namespace_less_proxy: AdsClient
) -> None:
    """Before the fix the proxy placed a syncz entry without NAMESPACE in the namespace after the last '.' of
    its id; istiod uses the DNS domain of the node id, which syncz does not report. A workload of hostile-a
    could thus plant a proxy in hostile-victim's view (listed in its syncz, dumpable by it) while istiod
    shows it to hostile-a only. Now such an entry is in no namespace for scoped callers (fail closed)."""
    replica = mesh.replicas[0]

    def target(ns: str, address: str, authority: str) -> client.Target:
        leaf = mesh.ca.issue_spiffe(ns, "default")
        return client.Target(address, ca_pem=mesh.root_cert_pem, authority=authority, cert_pem=leaf.cert_pem,
                             key_pem=leaf.key_pem, namespace=ns)  # fmt: skip

    # The oracle: istiod itself, asked by each namespace.
    direct = {ns: await _syncz_ids(target(ns, replica.secure_address, "istiod.istio-system.svc"))
              for ns in (SCOPED_NS, VICTIM_NS)}  # fmt: skip
    assert SPOOF_ID in direct[SCOPED_NS] and SPOOF_ID not in direct[VICTIM_NS], direct
    victim = target(VICTIM_NS, identity_proxy.address, "localhost")
    assert SPOOF_ID not in await _syncz_ids(victim)
    dump, _ = await ads_client.request(victim, CONFIG_DUMP, [SPOOF_ID])
    assert not dump.resources, "the victim's namespace was handed the attacker-planted proxy's dump"
    # The system view still lists it (not vacuous).
    system = target("istio-system", identity_proxy.address, "localhost")
    assert SPOOF_ID in await _syncz_ids(system)


DIGITS_ID = "1"


@pytest.fixture
async def digits_and_victim(mesh: Mesh) -> AsyncIterator[list[AdsClient]]:
    """The attacker's proxy with id "1" (hostile-a) and a victim proxy on the same replica."""
    replica = mesh.replicas[-1]
    subs = {CDS: XdsState.SYNCED, LDS: XdsState.SYNCED}
    attacker = mesh.ads_client(replica, "digits", SCOPED_NS, subs)
    attacker.node.id = f"sidecar~127.0.0.1~{DIGITS_ID}~{SCOPED_NS}.svc.cluster.local"
    victim = mesh.ads_client(replica, "payroll", VICTIM_NS, subs)
    await start_clients([attacker, victim])
    await until(lambda: {DIGITS_ID, victim.proxy_id} <= set(replica.proxy_states()),
                "digit-id and victim proxies in syncz")
    yield [attacker, victim]
    await close_clients([attacker, victim])


async def test_an_all_digit_id_is_ambiguous(
    mesh: Mesh, identity_proxy: ProxyProcess, digits_and_victim: list[AdsClient]
) -> None:
    """istiod's connection ids end in "-<counter>", so an id of digits alone is a substring of the victim's
    connection id ("payroll.hostile-victim-1234" contains "1"), and of the proxy's own. The look-alike rule
    missed it (no '-', not in any node id): a scoped caller with its own proxy "1" got another connection's
    dump in map order. Now such an id gets istiod's empty answer."""
    leaf = mesh.ca.issue_spiffe(SCOPED_NS, "default")
    target = client.Target(identity_proxy.address, ca_pem=mesh.root_cert_pem, authority="localhost",
                           cert_pem=leaf.cert_pem, key_pem=leaf.key_pem, namespace=SCOPED_NS)  # fmt: skip
    sizes = []
    for _ in range(12):
        dump, _ = await ads_client.request(target, CONFIG_DUMP, [DIGITS_ID])
        sizes.append(sum(len(r.value) for r in dump.resources))
        if VICTIM_NS.encode() in b"".join(r.value for r in dump.resources):
            sizes.append(-1)  # marks a dump that names the victim's namespace
    assert sizes == [0] * 12, sizes


@pytest.fixture(scope="module")
def forward_proxy(mesh: Mesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    proxy = _proxy(mesh, tmp_path_factory.mktemp("redteam-forward"), False)
    yield proxy
    proxy.stop()


async def test_forward_mode_all_digit_id_is_judged_by_istiod(
    mesh: Mesh, jwt_issuer: JwtIssuer, forward_proxy: ProxyProcess, digits_and_victim: list[AdsClient]
) -> None:
    """The same attack in forward mode: istiod checks the namespace of the connection it found against the
    caller's token, so the victim's dump never comes back (an empty answer when istiod picks another one)."""
    target = client.Target(forward_proxy.address, ca_pem=mesh.root_cert_pem, authority="localhost",
                           token=jwt_issuer.mint(SCOPED_NS), namespace=SCOPED_NS)  # fmt: skip
    answered = 0
    for _ in range(12):
        dump, _ = await ads_client.request(target, CONFIG_DUMP, [DIGITS_ID])
        assert VICTIM_NS.encode() not in b"".join(r.value for r in dump.resources)
        answered += bool(dump.resources)
    assert answered, "istiod never found a connection of the caller's namespace: the setup is wrong"
