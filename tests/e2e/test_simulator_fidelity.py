"""The simulator says what istiod says: each debug type URL compared field by field with a real istiod.

If istiod changes a shape (a field, a metadata key, an identifier key, a debug body), this fails, so the
simulator — the embedded default and the benchmarks' load source — cannot drift silently.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.status.v3 import csds_pb2
from google.protobuf.message import Message

from istioctl_proxy.fanout import connection_broke
from istioctl_proxy.sim.pki import TestCA
from istioctl_proxy.sim.simulator import SimProxy, SimReplica, _Abort, _Crash

from ..waits import until
from .ads import (
    CDS,
    CONFIG_DUMP,
    DEBUG,
    LDS,
    SYNCZ,
    AdsClient,
    XdsState,
    close_clients,
    debug_request,
    start_clients,
    tls_channel,
)
from .jwt_issuer import JwtIssuer
from .mesh import MATRIX_VERSIONS, EnvoyProxy, Mesh, Peers, PeersMissingError

pytestmark = pytest.mark.e2e

ADMIN = {"namespace": "istio-system"}


def fields(msg: Message) -> set[str]:
    return {f.name for f, _ in msg.ListFields()}


def sim_response(raw: bytes) -> discovery_pb2.DiscoveryResponse:
    return discovery_pb2.DiscoveryResponse.FromString(raw)


@pytest.fixture
async def real(mesh: Mesh) -> AsyncIterator[tuple[Mesh, list[AdsClient]]]:
    r = mesh.replicas[0]
    clients = [
        mesh.ads_client(r, "fid-synced", "team-f", {CDS: XdsState.SYNCED, LDS: XdsState.SYNCED}),
        mesh.ads_client(r, "fid-stale", "team-f", {CDS: XdsState.SYNCED, LDS: XdsState.STALE}),
        mesh.ads_client(r, "fid-error", "team-f", {CDS: XdsState.ERROR, LDS: XdsState.SYNCED}),
    ]
    await start_clients(clients)

    async def settled() -> bool:
        return r.proxy_states().get("fid-error.team-f", {}).get("CDS") == "ERROR"

    await until(settled, "fidelity proxies settled")
    yield mesh, clients
    await close_clients(clients)


def simulated() -> SimReplica:
    rep = SimReplica("istiod-sim")
    rep.proxies = [
        SimProxy("fid-synced", "team-f", states={"CDS": "SYNCED", "LDS": "SYNCED"}),
        SimProxy("fid-stale", "team-f", states={"CDS": "SYNCED", "LDS": "STALE"}),
        SimProxy("fid-error", "team-f", states={"CDS": "ERROR", "LDS": "SYNCED"}),
    ]
    return rep


async def ask(mesh: Mesh, type_url: str, names: tuple[str, ...] = ()) -> discovery_pb2.DiscoveryResponse:
    admin = mesh.ca.issue_spiffe("istio-system", "default")
    async with tls_channel(mesh.replicas[0].secure_address, mesh.root_cert_pem, client=admin) as ch:
        return await debug_request(ch, type_url, names)


def shape_of_syncz(resp: discovery_pb2.DiscoveryResponse, only: set[str]) -> dict[str, Any]:
    shape: dict[str, Any] = {"envelope": fields(resp), "any_types": {a.type_url for a in resp.resources}}
    ident = json.loads(resp.control_plane.identifier)
    shape["identifier_keys"] = set(ident)
    shape["info_keys"] = set(ident["Info"])
    per_status: dict[str, set[str]] = {}
    for a in resp.resources:
        cfg = csds_pb2.ClientConfig()
        assert a.Unpack(cfg)
        if cfg.node.id not in only:
            continue
        shape.setdefault("client_config", set()).update(fields(cfg))
        shape.setdefault("node", set()).update(fields(cfg.node))
        shape.setdefault("metadata_keys", set()).update(cfg.node.metadata.fields)
        assert "~" not in cfg.node.id  # proxy.ID (pod.ns), not the raw node id
        for x in cfg.generic_xds_configs:
            status = csds_pb2.ConfigStatus.Name(x.config_status)
            per_status.setdefault(status, set()).update(fields(x))
            if x.HasField("error_state"):
                shape.setdefault("error_state", set()).update(fields(x.error_state))
        types = [x.type_url for x in cfg.generic_xds_configs]
        assert types == sorted(types)  # istiod sorts them by type URL
    shape["per_status"] = per_status
    return shape


async def test_syncz_has_istiods_shape(real: tuple[Mesh, list[AdsClient]]) -> None:
    mesh, clients = real
    ids = {c.proxy_id for c in clients}
    got = shape_of_syncz(await ask(mesh, SYNCZ), ids)
    want = shape_of_syncz(sim_response(simulated().syncz("")), ids)
    assert set(got["per_status"]) == {"SYNCED", "STALE", "ERROR"}
    assert want == got


async def test_config_dump_has_istiods_shape(real: tuple[Mesh, list[AdsClient]], envoy_router: EnvoyProxy) -> None:
    mesh, _ = real
    real_dump = await _dump(mesh, envoy_router)
    sim = simulated()
    sim_dump = sim_response(sim.config_dump(["fid-synced.team-f"], ""))
    assert fields(sim_dump) == fields(real_dump)
    assert [a.type_url for a in sim_dump.resources] == [a.type_url for a in real_dump.resources]
    assert not real_dump.HasField("control_plane")
    unknown_real = await ask(mesh, CONFIG_DUMP, ("nobody.nowhere",))
    unknown_sim = sim_response(sim.config_dump(["nobody.nowhere"], ""))
    assert len(unknown_real.resources) == len(unknown_sim.resources) == 0
    assert fields(unknown_sim) - {"version_info"} == fields(unknown_real) - {"version_info"}


async def _dump(mesh: Mesh, envoy: EnvoyProxy) -> discovery_pb2.DiscoveryResponse:
    admin = mesh.ca.issue_spiffe("istio-system", "default")
    async with tls_channel(envoy.replica.secure_address, mesh.root_cert_pem, client=admin) as ch:
        return await debug_request(ch, CONFIG_DUMP, (envoy.proxy_id,))


def _body(resp: discovery_pb2.DiscoveryResponse) -> str:
    assert len(resp.resources) == 1 and resp.resources[0].type_url == DEBUG
    return resp.resources[0].value.decode()


async def test_debug_bodies_have_istiods_shape(real: tuple[Mesh, list[AdsClient]]) -> None:
    mesh, _ = real
    sim = simulated()
    identity = ("istio-system", "default")

    real_syncz = await ask(mesh, DEBUG, ("syncz",))
    sim_syncz = sim_response(sim.debug(["syncz"], identity))
    assert fields(sim_syncz) - {"version_info"} == fields(real_syncz) - {"version_info"}
    real_rows = {row["proxy"]: row for row in json.loads(_body(real_syncz))}
    sim_rows = {row["proxy"]: row for row in json.loads(_body(sim_syncz))}
    for pid in ("fid-synced.team-f", "fid-stale.team-f"):
        assert set(sim_rows[pid]) == set(real_rows[pid]), (pid, json.dumps(real_rows[pid]))

    real_ads, sim_ads = (
        json.loads(_body(await ask(mesh, DEBUG, ("adsz",)))),
        json.loads(_body(sim_response(sim.debug(["adsz"], identity)))),
    )
    assert set(sim_ads) == set(real_ads)
    assert set(sim_ads["clients"][0]) <= set(real_ads["clients"][0])

    real_list = json.loads(_body(await ask(mesh, DEBUG, ("list",))))
    sim_list = json.loads(_body(sim_response(sim.debug(["list"], identity))))
    assert sim_list == real_list, json.dumps(real_list)

    for path in ("config_dump?proxyID=nobody.nowhere", "edsz", "no-such-path"):
        assert _body(sim_response(sim.debug([path], identity))) == _body(await ask(mesh, DEBUG, (path,))), path


# -- Names as istiod reads them: a set, "" matches any proxy, substrings, Go's query parsing -----------------

NAME_EDGE_CASES: list[tuple[str, tuple[str, ...]]] = [
    (CONFIG_DUMP, ("fid-synced.team-f", "fid-synced.team-f")),  # a set: one name, served
    (CONFIG_DUMP, ("",)),  # "" is a substring of every connection id
    (CONFIG_DUMP, ("", "")),
    (CONFIG_DUMP, ("fid-sync",)),  # substring
    (CONFIG_DUMP, ("fid-synced.team-f", "fid-stale.team-f")),  # two names: empty
    (CONFIG_DUMP, ()),
    (CONFIG_DUMP, ("nobody.nowhere",)),
    (DEBUG, ("config_dump?proxyID=fid-synced.team-f", "config_dump?proxyID=fid-synced.team-f")),
    (DEBUG, ("config_dump?proxyID=fid-sync",)),
    (DEBUG, ("config_dump?proxyID=",)),
    (DEBUG, ("config_dump",)),
    (DEBUG, ("config_dump?proxyID=%zz&proxyID=fid-synced.team-f",)),  # Go drops the bad pair, reads the second
    (DEBUG, ("config_dump?proxyID=fid-synced.team-f;x=1",)),  # Go drops a pair with ';'
    (DEBUG, ("config_dump?proxyID=fid%2Dsynced.team-f",)),
    (DEBUG, ("syncz", "list")),  # two names: InvalidArgument
]


def _kind(type_url: str, resp: discovery_pb2.DiscoveryResponse) -> str:
    if type_url == CONFIG_DUMP:
        return "dump" if resp.resources else "empty"
    body = _body(resp)
    if body.startswith("Proxy not connected"):
        return "not connected"
    if body.startswith("You must provide a proxyID"):
        return "no proxyID"
    return "found" if body.startswith("{") else body[:40]


@pytest.mark.parametrize(("type_url", "names"), NAME_EDGE_CASES, ids=[repr(n) for _, n in NAME_EDGE_CASES])
async def test_names_are_read_as_istiod_reads_them(
    real: tuple[Mesh, list[AdsClient]], type_url: str, names: tuple[str, ...]
) -> None:
    mesh, _ = real
    sim = simulated()
    identity = ("istio-system", "default")
    try:
        real_kind = _kind(type_url, await ask(mesh, type_url, names))
    except grpc.aio.AioRpcError as err:
        real_kind = err.code().name
    try:
        raw = sim.config_dump(list(names), "") if type_url == CONFIG_DUMP else sim.debug(list(names), identity)
        sim_kind = _kind(type_url, sim_response(raw))
    except _Abort as err:
        sim_kind = err.code.name
    assert sim_kind == real_kind


# istiod dereferences url.Parse's nil result (debuggen.go parseAndValidateDebugRequest): the process dies.
CRASHING_NAMES = ["syncz\t", ":x", "config_dump%zz"]


@pytest.mark.parametrize("name", CRASHING_NAMES, ids=repr)
async def test_unparsable_debug_names_break_both(mesh: Mesh, name: str) -> None:
    with pytest.raises(_Crash):
        simulated().debug([name], ("istio-system", "default"))
    victim = mesh.replicas[-1]
    admin = mesh.ca.issue_spiffe("istio-system", "default")
    try:
        async with tls_channel(victim.secure_address, mesh.root_cert_pem, client=admin) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await debug_request(ch, DEBUG, (name,), timeout_s=20)
        # The connection died under the request (no status from istiod): what fanout.connection_broke reads.
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
        assert connection_broke(err.value.code(), err.value.details() or ""), err.value.details()
        await until(lambda: not victim.is_running(), f"{victim.pod_name} exits")
        assert "nil pointer dereference" in victim.log_tail(200)
    finally:
        victim.restart(graceful=False)


# -- Every built release (issue 13): the simulator's `--istio-version` behaviour matches that istiod's --------


@pytest.fixture(scope="module", params=MATRIX_VERSIONS)
def release_mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, test_ca: TestCA, jwt_issuer: JwtIssuer
) -> Iterator[Mesh]:
    """One replica of each matrix release, on 127.0.0.50 (one release at a time)."""
    try:
        peers = Peers.find_version(request.param)
    except PeersMissingError as e:
        pytest.fail(str(e), pytrace=False)
    with Mesh(tmp_path_factory.mktemp("release"), peers, replicas=1, first_host=50, ca=test_ca,
              jwt_issuer=jwt_issuer) as m:  # fmt: skip
        yield m


@pytest.fixture
async def release_real(release_mesh: Mesh) -> AsyncIterator[tuple[Mesh, SimReplica]]:
    """The fidelity proxies on the release's replica, and a simulated replica of the same release."""
    mesh = release_mesh
    r = mesh.replicas[0]
    clients = [
        mesh.ads_client(r, "fid-synced", "team-f", {CDS: XdsState.SYNCED, LDS: XdsState.SYNCED}),
        mesh.ads_client(r, "fid-stale", "team-f", {CDS: XdsState.SYNCED, LDS: XdsState.STALE}),
        mesh.ads_client(r, "fid-error", "team-f", {CDS: XdsState.ERROR, LDS: XdsState.SYNCED}),
        mesh.ads_client(r, "fid-other", "team-g", {CDS: XdsState.SYNCED, LDS: XdsState.SYNCED}),
    ]
    await start_clients(clients)

    async def settled() -> bool:
        return r.proxy_states().get("fid-error.team-f", {}).get("CDS") == "ERROR"

    await until(settled, "fidelity proxies settled")
    sim = simulated()
    sim.version = r.peers.istio_version
    sim.proxies.append(SimProxy("fid-other", "team-g", states={"CDS": "SYNCED", "LDS": "SYNCED"}))
    yield mesh, sim
    await close_clients(clients)


async def test_each_release_has_the_simulators_syncz_and_debug_shapes(release_real: tuple[Mesh, SimReplica]) -> None:
    mesh, sim = release_real
    ids = {"fid-synced.team-f", "fid-stale.team-f", "fid-error.team-f"}
    real_syncz = await ask(mesh, SYNCZ)
    # version_info is "" (so absent) until istiod's first push since start: not a difference between releases.
    got, want = shape_of_syncz(real_syncz, ids), shape_of_syncz(sim_response(sim.syncz("")), ids)
    got["envelope"] |= {"version_info"}
    assert want == got
    assert json.loads(real_syncz.control_plane.identifier)["Info"]["version"] == sim.version
    identity = ("istio-system", "default")
    real_list = json.loads(_body(await ask(mesh, DEBUG, ("list",))))
    assert json.loads(_body(sim_response(sim.debug(["list"], identity)))) == real_list, json.dumps(real_list)
    for path in ("config_dump?proxyID=nobody.nowhere", "no-such-path", "config_dump"):
        assert _body(sim_response(sim.debug([path], identity))) == _body(await ask(mesh, DEBUG, (path,))), path
    dump = await ask(mesh, CONFIG_DUMP, ("fid-synced.team-f",))
    sim_dump = sim_response(sim.config_dump(["fid-synced.team-f"], ""))
    assert [a.type_url for a in sim_dump.resources] == [a.type_url for a in dump.resources]
    assert sim_dump.HasField("control_plane") is dump.HasField("control_plane") is False  # from 1.25 on


async def test_each_release_authenticates_and_scopes_as_the_simulator_says(
    release_real: tuple[Mesh, SimReplica], jwt_issuer: JwtIssuer
) -> None:
    mesh, sim = release_real
    r = mesh.replicas[0]
    behaviour = sim.behaviour
    # No identity at all, on the plaintext port: istiod < 1.27.8 serves syncz to anyone.
    async with grpc.aio.insecure_channel(r.xds_address) as ch:
        try:
            anonymous = {row.node.id for row in _client_configs(await debug_request(ch, SYNCZ))}
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err
            anonymous = None
    assert (anonymous is None) is behaviour.debug_types_need_identity, anonymous
    # A team-f caller: only its namespace from 1.28.7/1.29.3/1.30 on, everything before.
    async with tls_channel(r.secure_address, mesh.root_cert_pem) as ch:
        resp = await debug_request(ch, SYNCZ, namespace="team-f", token=jwt_issuer.mint("team-f"))
        other = await debug_request(ch, CONFIG_DUMP, ("fid-other.team-g",), namespace="team-f",
                                    token=jwt_issuer.mint("team-f"))  # fmt: skip
    seen = {cfg.node.id for cfg in _client_configs(resp)}
    want = {p.id for p in sim.proxies if not sim.caller_scope(("team-f", "default")) or p.namespace == "team-f"}
    assert seen & {p.id for p in sim.proxies} == want
    assert ("fid-other.team-g" in seen) is not behaviour.scopes_debug_types
    assert bool(other.resources) is not behaviour.scopes_debug_types


def _client_configs(resp: discovery_pb2.DiscoveryResponse) -> list[csds_pb2.ClientConfig]:
    out = []
    for a in resp.resources:
        cfg = csds_pb2.ClientConfig()
        assert a.Unpack(cfg)
        out.append(cfg)
    return out
