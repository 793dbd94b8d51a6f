"""Hostile requests through the proxy to real istiod replicas, in both auth modes, as system and scoped callers.

After the corpus: every replica is still alive (istiod panics on a debug name Go's url.Parse rejects, so one
such name forwarded would have killed them all), no scoped caller got anything of another namespace, and
every call ended with a precise status. Also here: the holder rule with real Envoys and real istioctl.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from urllib.parse import quote

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2

from istioctl_proxy import client
from istioctl_proxy.policy import CONFIG_DUMP, DEBUG, SYNCZ

from .. import ads_client
from ..ads_client import Outcome, ads_call
from ..waits import until, until_sync
from .ads import CDS, LDS, AdsClient, XdsState, close_clients, start_clients
from .jwt_issuer import JwtIssuer
from .mesh import SIDECAR_NAMESPACE, EnvoyProxy, Istioctl, Mesh
from .proxy_process import ProxyProcess

pytestmark = pytest.mark.e2e

SCOPED_NS = "hostile-a"
VICTIM_NS = "hostile-victim"
OWN = f"mine.{SCOPED_NS}"
VICTIM = f"secret-0.{VICTIM_NS}"
# A call may end only like this; UNKNOWN, INTERNAL, UNAVAILABLE, DEADLINE_EXCEEDED would be a defect here.
PRECISE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED}
EMPTY_DEBUG = (b"Proxy not connected to this Pilot instance", b"You must provide a proxyID")


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _proxy(mesh: Mesh, d: Path, identity: bool) -> ProxyProcess:
    serving = mesh.ca.issue_serving()
    root = _write(d / "root.pem", mesh.root_cert_pem)
    args = ["--tls-cert", _write(d / "tls.crt", serving.cert_pem), "--tls-key", _write(d / "tls.key", serving.key_pem),
            "--istiod", ",".join(r.secure_address for r in mesh.replicas), "--istiod-ca", root,
            "--upstream-timeout", "5"]  # fmt: skip
    if identity:
        upstream = mesh.ca.issue_spiffe("istio-system", "istioctl-proxy")
        args += ["--client-ca", root, "--upstream-identity", "--upstream-cert", _write(d / "up.crt", upstream.cert_pem),
                 "--upstream-key", _write(d / "up.key", upstream.key_pem)]  # fmt: skip
    return ProxyProcess(d, args).start()


@pytest.fixture(scope="module")
def proxies(mesh: Mesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ProxyProcess]]:
    running = {"identity": _proxy(mesh, tmp_path_factory.mktemp("hostile-identity"), True),
               "forward": _proxy(mesh, tmp_path_factory.mktemp("hostile-forward"), False)}
    yield running
    for p in running.values():
        p.stop()


@pytest.fixture
async def population(mesh: Mesh) -> AsyncIterator[list[AdsClient]]:
    """A victim on every replica, and the scoped caller's own proxy on the second."""
    subs = {CDS: XdsState.SYNCED, LDS: XdsState.SYNCED}
    clients = [mesh.ads_client(r, f"secret-{r.index}", VICTIM_NS, subs) for r in mesh.replicas]
    clients.append(mesh.ads_client(mesh.replicas[1 % len(mesh.replicas)], "mine", SCOPED_NS, subs))
    await start_clients(clients)

    await until(lambda: {c.proxy_id for c in clients} <= mesh.listed(), "hostile population in syncz")
    yield clients
    await close_clients(clients)


def debug_corpus() -> list[str]:
    names: list[str] = []
    for b in [*range(0x20), 0x7F]:  # every control byte, in the value, the path and in front
        c = chr(b)
        names += [f"config_dump?proxyID={VICTIM}{c}", f"syncz{c}", f"{c}config_dump?proxyID={OWN}"]
    names += [
        "config_dump?proxyID=", f"config_dump?proxyID={VICTIM}", f"config_dump?proxyID={VICTIM[:-3]}",
        f"config_dump?proxyID={VICTIM_NS}", "config_dump?proxyID=secret", f"config_dump?proxyID={VICTIM}-1",
        f"config_dump?proxyID=%zz&proxyID={VICTIM}", f"config_dump?proxyID={OWN};proxyID={VICTIM}",
        f"config_dump?proxyID={OWN}&proxyID={VICTIM}", f"config_dump?proxyID={OWN}&proxy%49D={VICTIM}",
        "config_dump?proxyID=" + "".join(f"%{b:02X}" for b in VICTIM.encode()), f"config%5Fdump?proxyID={VICTIM}",
        "config_dump%zz", "config_dump%", "config_dump?proxyID=%00", "config_dump?proxyID=%0a" + VICTIM,
        f"config_dump?proxyID={quote(VICTIM)}#x", ":x", "1a:b", "config_dump:x", "//[x", "//h/syncz", "syncz#%zz",
        f"/config_dump?proxyID={VICTIM}", "../config_dump", "adsz?push=true", "cachez?clear=true", "pprof/profile",
        f"syncz?namespace={VICTIM_NS}", f"adsz?proxyID={VICTIM}", f"edsz?proxyID={VICTIM}", f"ndsz?proxyID={VICTIM_NS}",
        f"sidecarz?proxyID={VICTIM}", "config_dump?proxyID=" + "a" * 5000, "config_dump?proxyID=" + "a" * 4000,
        "syncz\u00e9", "syncz?" + "&".join(f"p{i}=1" for i in range(300)), "syncz?pretty&pretty", "list", "syncz",
        f"config_dump?proxyID={OWN}", f"edsz?proxyID={OWN}",
    ]  # fmt: skip
    return names


def sotw_corpus() -> list[tuple[str, list[str]]]:
    cases: list[tuple[str, list[str]]] = [(DEBUG, [n]) for n in debug_corpus()]
    cases += [
        (DEBUG, ["syncz", "syncz"]), (DEBUG, ["syncz", "list"]), (DEBUG, []),
        (DEBUG, [f"config_dump?proxyID={VICTIM}"] * 2),
        (CONFIG_DUMP, [""]), (CONFIG_DUMP, ["", ""]), (CONFIG_DUMP, [VICTIM, VICTIM]), (CONFIG_DUMP, [VICTIM]),
        (CONFIG_DUMP, [VICTIM_NS, VICTIM_NS]), (CONFIG_DUMP, ["secret"]), (CONFIG_DUMP, [f"{VICTIM}-1"]),
        (CONFIG_DUMP, [VICTIM[:-1]]), (CONFIG_DUMP, ["a" * 5000]), (CONFIG_DUMP, [str(i) for i in range(100)]),
        (CONFIG_DUMP, [OWN, VICTIM]), (CONFIG_DUMP, []), (CONFIG_DUMP, ["\x00"]), (CONFIG_DUMP, ["\t" + VICTIM]),
        (CONFIG_DUMP, [OWN, OWN]), (SYNCZ, []), (SYNCZ, ["x"] * 1000), (SYNCZ, [str(i) for i in range(100)]),
        (SYNCZ, [VICTIM]),
    ]  # fmt: skip
    return cases


def delta_corpus() -> list[list[discovery_pb2.DeltaDiscoveryRequest]]:
    def d(type_url: str, sub: Sequence[str] = (), unsub: Sequence[str] = ()) -> discovery_pb2.DeltaDiscoveryRequest:
        return discovery_pb2.DeltaDiscoveryRequest(
            type_url=type_url, resource_names_subscribe=sub, resource_names_unsubscribe=unsub)

    return [
        [d(CONFIG_DUMP, [""])], [d(CONFIG_DUMP, [VICTIM, VICTIM])], [d(CONFIG_DUMP, [OWN]), d(CONFIG_DUMP, [VICTIM])],
        [d(CONFIG_DUMP, [VICTIM]), d(CONFIG_DUMP, [], [VICTIM]), d(CONFIG_DUMP, [""])],
        [d(DEBUG, [f"config_dump?proxyID={VICTIM}"])], [d(DEBUG, [f"config_dump?proxyID={VICTIM}\t"])],
        [d(DEBUG, ["config_dump?proxyID="])], [d(DEBUG, [f"config_dump?proxyID={OWN}"]), d(DEBUG, ["syncz"])],
        [d(DEBUG, ["syncz\n"])], [d(SYNCZ)], [d(CONFIG_DUMP, [OWN])],
    ]  # fmt: skip


async def _call(
    ch: grpc.aio.Channel, md: tuple[tuple[str, str], ...], namespace: str,
    requests: Sequence[discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest], delta: bool,
) -> Outcome:
    requests[0].node.CopyFrom(client.istioctl_node(namespace))
    return await ads_call(ch, requests, metadata=md, timeout=30, delta=delta, pipelined=True)


def _scoped_view_ok(identity: bool, type_url: str, asked: Sequence[list[str]], outcome: Outcome, delta: bool) -> str:
    """"" if a scoped caller's answers show nothing of another namespace, else what they showed.

    `asked` is, per response, the names that response answers (Delta: the accumulated subscription).
    Identity mode is the proxy's own rule: a dump or a proxy's debug body only for exactly the caller's own
    id. Forward mode is istiod's: there `[""]` may dump the caller's own debug connection (same namespace).
    """
    for raw, names in zip(outcome.responses, asked, strict=False):
        if delta:  # a Delta resource is named after the request: the caller's own words, not a leak
            values = [r.resource.value for r in discovery_pb2.DeltaDiscoveryResponse.FromString(raw).resources]
        else:
            values = [r.value for r in discovery_pb2.DiscoveryResponse.FromString(raw).resources]
        if any(VICTIM_NS.encode() in v or b"secret-" in v for v in values):
            return "the victim's namespace or id is in the answer"
        distinct = set(names)
        if type_url == DEBUG:
            own = len(distinct) == 1 and OWN in names[0]
            if any(not v.startswith(EMPTY_DEBUG) for v in values) and not own:
                return f"a debug body for {names!r}: {values[0][:80]!r}"
        if type_url == CONFIG_DUMP and values and distinct != {OWN} and (identity or distinct != {""}):
            return f"a dump for {names!r}"
    return ""


async def test_hostile_corpus_through_the_proxy_leaves_every_replica_alive_and_nothing_leaks(
    mesh: Mesh, jwt_issuer: JwtIssuer, proxies: dict[str, ProxyProcess], population: list[AdsClient]
) -> None:
    root = mesh.root_cert_pem
    callers: list[tuple[str, client.Target, bool]] = []
    for mode, proxy in proxies.items():
        base = client.Target(proxy.address, ca_pem=root, authority="localhost")
        for ns in ("istio-system", SCOPED_NS):
            if mode == "identity":
                leaf = mesh.ca.issue_spiffe(ns, "default")
                t = dataclasses.replace(base, cert_pem=leaf.cert_pem, key_pem=leaf.key_pem, namespace=ns)
            else:
                t = dataclasses.replace(base, token=jwt_issuer.mint(ns), namespace=ns)
            callers.append((f"{mode}/{ns}", t, ns != "istio-system"))
    identity_mode = {label: label.startswith("identity/") for label, _, _ in callers}

    sotw, deltas = sotw_corpus(), delta_corpus()
    bad: list[str] = []
    calls = 0
    for label, target, scoped in callers:
        md = (("authorization", f"Bearer {target.token}"),) if target.token else ()
        async with client.channel(target) as ch:
            outcomes: list[tuple[str, list[list[str]], bool, Outcome]] = []
            for type_url, names in sotw:
                req = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names)
                outcome = await _call(ch, md, target.namespace, [req], False)
                outcomes.append((type_url, [names], False, outcome))
            for seq in deltas:
                seq = [discovery_pb2.DeltaDiscoveryRequest.FromString(r.SerializeToString()) for r in seq]
                subscribed: dict[str, None] = {}
                per_response: list[list[str]] = []
                for r in seq:  # what each response answers: the subscription so far (all one type here)
                    subscribed.update(dict.fromkeys(r.resource_names_subscribe))
                    for n in r.resource_names_unsubscribe:
                        subscribed.pop(n, None)
                    per_response.append(list(subscribed))
                outcome = await _call(ch, md, target.namespace, seq, True)
                outcomes.append((seq[-1].type_url, per_response, True, outcome))
        for type_url, asked, delta, outcome in outcomes:
            calls += 1
            names = asked[-1]
            what = f"{label} {'delta' if delta else 'sotw'} {type_url} {[n[:60] for n in names[:3]]!r}"
            if outcome.code not in PRECISE:
                bad.append(f"{what}: {outcome.code.name} {outcome.details[:200]}")
            if outcome.code is grpc.StatusCode.INVALID_ARGUMENT and not outcome.details:
                bad.append(f"{what}: INVALID_ARGUMENT without a message")
            if scoped and (leak := _scoped_view_ok(identity_mode[label], type_url, asked, outcome, delta)):
                bad.append(f"{what}: LEAK: {leak}")
    assert not bad, "\n".join(bad[:40])
    assert calls == len(callers) * (len(sotw) + len(deltas))
    # Every replica is alive, still answering, and never crashed (the logs show no panic).
    for r in mesh.replicas:
        assert r.is_running(), f"{r.pod_name} died:\n{r.log_tail(40)}"
        assert r.ready(), r.pod_name
        assert "panic:" not in r.log_tail(400), f"{r.pod_name} panicked:\n{r.log_tail(60)}"
    # Not vacuous: the victim exists for the system caller, and the scoped caller gets its own proxy.
    system = next(t for label, t, _ in callers if label == "identity/istio-system")
    resp, _ = await ads_client.request(system, CONFIG_DUMP, [VICTIM])
    assert len(resp.resources) == 7
    scoped = next(t for label, t, _ in callers if label == "identity/" + SCOPED_NS)
    resp, _ = await ads_client.request(scoped, CONFIG_DUMP, [OWN, OWN])
    assert len(resp.resources) == 7


@pytest.fixture(scope="module")
def lookalike_envoys(mesh: Mesh) -> Iterator[tuple[EnvoyProxy, EnvoyProxy]]:
    """web-1.e2e-sidecars on the first replica, web-1.e2e on the last: istiod finds "web-1.e2e" in the
    connection id "web-1.e2e-sidecars-<n>". The look-alike's namespace sees a ServiceEntry (SIDECAR_NAMESPACE),
    so istiod's config for it differs from the holder's and the comparison can tell them apart."""
    lookalike = mesh.start_envoy(mesh.replicas[0], "web-1", SIDECAR_NAMESPACE, node_type="router")
    holder = mesh.start_envoy(mesh.replicas[-1], "web-1", "e2e", node_type="router")
    yield lookalike, holder
    holder.stop()
    lookalike.stop()


def test_x_ps_of_a_proxy_with_a_lookalike_uses_the_holders_config(
    mesh: Mesh, istioctl: Istioctl, proxies: dict[str, ProxyProcess], lookalike_envoys: tuple[EnvoyProxy, EnvoyProxy]
) -> None:
    lookalike, holder = lookalike_envoys
    holder.wait_states({"CDS": "SYNCED", "LDS": "SYNCED"})
    until_sync(lambda: lookalike.proxy_id in lookalike.replica.proxy_states(), "look-alike connected")
    assert holder.proxy_id == "web-1.e2e" and lookalike.proxy_id == f"web-1.{SIDECAR_NAMESPACE}"
    dump = holder.write_config_dump()
    through = ["--xds-address", proxies["identity"].address, "--cert-dir", str(mesh.admin_cert_dir)]
    # Asked directly, the replica holding only the look-alike answers for web-1.e2e with the look-alike's
    # config (istiod's substring match): the comparison fails. This is what the proxy must not pass on.
    first = istioctl.run("x", "ps", holder.proxy_id, "--file", dump, *mesh.istioctl_xds_args(lookalike.replica),
                         "-r", "default")  # fmt: skip
    assert first.rc == 0 and "Clusters Don't Match" in first.stdout, first.stdout + first.stderr
    direct = istioctl.run("x", "ps", holder.proxy_id, "--file", dump, *mesh.istioctl_xds_args(holder.replica),
                          "-r", "default")  # fmt: skip
    proxied = istioctl.run("x", "ps", holder.proxy_id, "--file", dump, *through, "-r", "default")
    assert direct.rc == 0 and proxied.rc == 0, proxied.stderr + direct.stderr
    assert direct.stdout.split()[:2] == ["Clusters", "Match"], direct.stdout
    assert proxied.stdout.split() == direct.stdout.split(), proxied.stdout


async def test_replicas_survive_concurrent_hostile_names(
    mesh: Mesh, proxies: dict[str, ProxyProcess]
) -> None:
    """The crash names, all at once, from many streams: all refused, none forwarded."""
    leaf = mesh.ca.issue_spiffe("istio-system", "default")
    target = client.Target(proxies["identity"].address, ca_pem=mesh.root_cert_pem, authority="localhost",
                           cert_pem=leaf.cert_pem, key_pem=leaf.key_pem)  # fmt: skip
    names = [f"config_dump?proxyID=x{chr(b)}" for b in range(0x20)] + [":x", "1a:b", "config_dump%zz", "//[x"]
    async with client.channel(target) as ch:
        outcomes = await asyncio.gather(*(
            _call(ch, (), "istio-system", [discovery_pb2.DiscoveryRequest(type_url=DEBUG, resource_names=[n])], False)
            for n in names * 3))  # fmt: skip
    assert {o.code for o in outcomes} == {grpc.StatusCode.INVALID_ARGUMENT}
    assert all(r.is_running() and r.ready() for r in mesh.replicas)
