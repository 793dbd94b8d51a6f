"""The simulator's `--istio-version` behaviour switch, and the proxy's envelope read like one istiod's.

The behaviours themselves are checked against real binaries in tests/e2e/test_simulator_fidelity.py and
tests/e2e/test_version_skew.py; here: which release gets which behaviour, and the proxy over such replicas.
"""

from __future__ import annotations

import json
import re

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2

from istioctl_proxy import client
from istioctl_proxy.cli import parser
from istioctl_proxy.policy import CONFIG_DUMP, DEBUG, SYNCZ
from istioctl_proxy.sim.simulator import Behaviour, SimProxy, SimReplica, make_mesh

from .helpers import ADMIN_TOKEN, TOKENS, stack

UUID = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


@pytest.mark.parametrize(
    ("version", "control_plane_everywhere", "need_identity", "scoped"),
    [
        ("1.24.6", True, False, False),
        ("1.26.0", False, False, False),
        ("1.27.0", False, False, False),
        ("1.27.8", False, True, False),
        ("1.28.5", False, True, False),
        ("1.28.7", False, True, True),
        ("1.29.1", False, True, False),
        ("1.29.3", False, True, True),
        ("1.30.0-alpha.1-48-gb01690e6db7d", False, True, True),
        ("1.30.3", False, True, True),
        ("1.31-dev", False, True, True),
    ],
)
def test_behaviour_of_each_release(
    version: str, control_plane_everywhere: bool, need_identity: bool, scoped: bool
) -> None:
    assert Behaviour.of(version) == Behaviour(control_plane_everywhere, need_identity, scoped)


def test_istio_version_flag_is_checked() -> None:
    ns = parser().parse_args(["simulate", "--istio-version", "1.24.6"])
    assert ns.istio_version == "1.24.6"
    assert parser().parse_args(["simulate"]).istio_version == "1.30.3"
    with pytest.raises(SystemExit):
        parser().parse_args(["simulate", "--istio-version", "latest"])


def _replica(version: str) -> SimReplica:
    rep = SimReplica("istiod-0", version=version)
    rep.proxies = [SimProxy("a", "team-a", states={"CDS": "SYNCED"}), SimProxy("b", "team-b", states={"CDS": "SYNCED"})]
    return rep


def test_1_24_puts_the_control_plane_on_every_response() -> None:
    old, new = _replica("1.24.6"), _replica("1.30.3")
    for rep, want in ((old, True), (new, False)):
        dump = discovery_pb2.DiscoveryResponse.FromString(rep.config_dump(["a.team-a"], ""))
        debug = discovery_pb2.DiscoveryResponse.FromString(rep.debug(["syncz"], ("istio-system", "default")))
        assert dump.HasField("control_plane") is want and debug.HasField("control_plane") is want
        assert json.loads(dump.control_plane.identifier or "{}").get("ID") == ("istiod-0" if want else None)
        assert discovery_pb2.DiscoveryResponse.FromString(rep.syncz("")).HasField("control_plane")


def test_before_the_scoping_fix_a_namespace_caller_sees_everything() -> None:
    for version, want in (("1.26.0", {"a.team-a", "b.team-b"}), ("1.30.3", {"a.team-a"})):
        rep = _replica(version)
        resp = discovery_pb2.DiscoveryResponse.FromString(rep.syncz(rep.caller_scope(("team-a", "default"))))
        assert {r.name for r in client.rows(resp)} == want, version
        dump = discovery_pb2.DiscoveryResponse.FromString(
            rep.config_dump(["b.team-b"], rep.caller_scope(("team-a", "default")))
        )
        assert bool(dump.resources) is (version == "1.26.0")


async def test_1_26_serves_syncz_without_an_identity_and_the_proxy_still_asks_for_one() -> None:
    """istiod 1.26 answers syncz to anyone on its plaintext port; 1.30 wants an identity. The proxy in forward
    mode never lets an anonymous caller through, whatever the replicas' release."""
    for version, served in (("1.26.0", True), ("1.30.3", False)):
        async with stack(mesh=make_mesh(2, 6, tokens=TOKENS, version=version)) as s:
            anonymous = client.Target(s.mesh.addresses[0], plaintext=True)
            if served:
                resp, _ = await client.request(anonymous, SYNCZ)
                assert len(resp.resources) == 3
            else:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await client.request(anonymous, SYNCZ)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.request(client.Target(s.address, plaintext=True), SYNCZ)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.request(anonymous, DEBUG, ["syncz"])
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("type_url", [SYNCZ, CONFIG_DUMP, DEBUG])
async def test_the_proxys_nonce_reads_like_istiods(type_url: str) -> None:
    """istioctl ≥ 1.30 `-o json` prints the envelope: the nonce is the push version followed by a UUID, as
    istiod's (xds.go nonce()), never a bare hex string."""
    async with stack(2, 6) as s:
        names = {SYNCZ: None, CONFIG_DUMP: [s.replicas[0].proxies[0].id], DEBUG: ["syncz"]}[type_url]
        direct_target = client.Target(s.mesh.addresses[0], plaintext=True, token=ADMIN_TOKEN)
        direct, _ = await client.request(direct_target, type_url, names)
        resp, _ = await client.request(s.target(), type_url, names)
        for r in (direct, resp):
            assert r.version_info and re.fullmatch(re.escape(r.version_info) + UUID, r.nonce), (r.version_info, r.nonce)


async def test_1_24_replicas_through_the_proxy() -> None:
    """istiod 1.24's ControlPlane on every response: syncz still says <external>; a config_dump passes through
    with the holder's own ControlPlane (it is that replica's answer); debug envelopes are built by the proxy
    without one, as istiod ≥ 1.25 sends them."""
    async with stack(mesh=make_mesh(2, 6, tokens=TOKENS, version="1.24.6")) as s:
        syncz, _ = await client.request(s.target(), SYNCZ)
        assert json.loads(syncz.control_plane.identifier)["ID"] == "<external>"
        assert json.loads(syncz.control_plane.identifier)["Info"]["version"] == "1.24.6"
        holder = s.replicas[1]
        dump, _ = await client.request(s.target(), CONFIG_DUMP, [holder.proxies[0].id])
        assert dump.resources and json.loads(dump.control_plane.identifier)["ID"] == holder.pod_name
        debug, _ = await client.request(s.target(), DEBUG, ["syncz"])
        assert not debug.HasField("control_plane") and len(json.loads(debug.resources[0].value)) == 6
