"""Security: who may call, what each caller may see, what is never logged, and safe defaults.

- No credentials, or credentials the proxy must not accept (other CA, expired, not yet valid, no or a
  foreign SPIFFE id) → refused, and nothing is forwarded.
- A namespace-scoped caller never receives another namespace's proxies or dumps, in either mode, also
  when its requests are coalesced or cached together with other callers' and through istiod's substring
  lookup of proxy ids (look-alike ids, including connection-id suffixes "<id>-<n>").
- Tokens and private keys never appear in any log record at any level, nor on stderr.
- `--plaintext` binds loopback unless a listen address is given; upstream TLS verification is on unless
  explicitly disabled.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import os
import re
from collections.abc import AsyncIterator

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2

from istioctl_proxy import client
from istioctl_proxy.app import Proxy
from istioctl_proxy.config import Config, add_serve_flags, from_args, plaintext_exposed, validate
from istioctl_proxy.errors import ConfigError
from istioctl_proxy.pki import Leaf, TestCA, write_file
from istioctl_proxy.policy import CONFIG_DUMP, DEBUG, SYNCZ
from istioctl_proxy.simulate import SimulatedMesh
from istioctl_proxy.simulator import SimProxy, SimReplica, make_mesh

from .helpers import ADMIN_TOKEN, TOKENS, Stack, stack
from .reliability import ads_call, record_figures

FIGURES: dict[str, int] = {}


def _count(name: str, n: int = 1) -> None:
    FIGURES[name] = FIGURES.get(name, 0) + n


async def _code(target: client.Target, type_url: str = SYNCZ, names: list[str] | None = None) -> grpc.StatusCode:
    try:
        await client.request(target, type_url, names, timeout=5)
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def _namespaces(resp: discovery_pb2.DiscoveryResponse) -> set[str]:
    return {r.name.rpartition(".")[2] for r in client.rows(resp)}


# -- Who may call --------------------------------------------------------------------------------------------


async def test_forward_mode_without_credentials_is_refused_on_both_endpoints() -> None:
    async with stack(2, 4) as s:
        for md in ((), (("authorization", "Basic eDp5"),), (("authorization", "Bearer"),), (("x-token", ADMIN_TOKEN),)):
            for is_delta in (False, True):
                req: discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest = (
                    discovery_pb2.DeltaDiscoveryRequest if is_delta else discovery_pb2.DiscoveryRequest
                )(type_url=SYNCZ, node=client.istioctl_node("istio-system"))
                out = await ads_call(s.address, [req], metadata=md, delta=is_delta)
                assert out.code == grpc.StatusCode.UNAUTHENTICATED, (md, out.details)
                _count("refused: no usable credentials")
        assert sum(r.requests for r in s.replicas) == 0, "an anonymous call reached istiod"


def _leaf(ca: TestCA, spiffe: str = "", *, days: float = 1.0, start: datetime.timedelta | None = None,
          dns: tuple[str, ...] = ()) -> Leaf:
    now = datetime.datetime.now(datetime.UTC)
    return ca.issue(spiffe=spiffe, dns=dns, days=days, not_before=now + start if start is not None else None)


async def test_identity_mode_refuses_every_unacceptable_client_certificate() -> None:
    async with stack(2, 4, identity=True) as s:
        assert s.pki is not None
        ca = s.pki.ca
        admin = "spiffe://cluster.local/ns/istio-system/sa/default"
        refused_at_handshake = {
            "no certificate": None,
            "another CA": _leaf(TestCA(), admin),
            "expired": _leaf(ca, admin, start=-datetime.timedelta(days=3), days=1),
            "not yet valid": _leaf(ca, admin, start=datetime.timedelta(days=2)),
        }
        for what, leaf in refused_at_handshake.items():
            code = await _code(s.target(token="" if leaf else ADMIN_TOKEN, leaf=leaf))
            assert code == grpc.StatusCode.UNAVAILABLE, what  # the TLS handshake fails: no call is made
            _count("refused: TLS handshake")
        refused_by_proxy = {
            "no SPIFFE id": _leaf(ca, dns=("istioctl.example",)),
            "foreign trust domain": _leaf(ca, "spiffe://evil.example/ns/istio-system/sa/default"),
            "not a workload id": _leaf(ca, "spiffe://cluster.local/istio-system/default"),
        }
        for what, leaf in refused_by_proxy.items():
            assert await _code(s.target(leaf=leaf)) == grpc.StatusCode.UNAUTHENTICATED, what
            _count("refused: certificate identity")
        # A bearer token is no way into identity mode (no TokenReview configured).
        assert await _code(s.target(token=ADMIN_TOKEN)) == grpc.StatusCode.UNAVAILABLE
        assert sum(r.requests for r in s.replicas) == 0
        # And the right certificate works, so the refusals above are about the certificates.
        assert await _code(s.target(leaf=_leaf(ca, admin))) == grpc.StatusCode.OK


# -- What each caller may see ---------------------------------------------------------------------------------


def _lookalike_mesh() -> list[SimReplica]:
    """Ids that contain each other, and a namespace whose name ends in "-1" (istiod finds a proxy by
    substring over connection ids "<proxy id>-<counter>": "web.team-1" is also web.team's connection)."""
    mesh = make_mesh(2, 8, tokens={**TOKENS, "team-token": ("team", "default"), "team2-token": ("team2", "default"),
                                   "team-1-token": ("team-1", "default")})
    mesh[0].proxies[:0] = [SimProxy("web", "team", states={"CDS": "SYNCED"})]  # first: connection "web.team-1"
    mesh[1].proxies += [SimProxy(pod, ns, states={"CDS": "SYNCED"})
                        for pod, ns in (("web", "team2"), ("web", "team-1"), ("api", "team"))]
    return mesh


LOOKALIKES = ("web.team", "web.team2", "web.team-1", "api.team", "web", "team", "eb.tea", "-1", "web.team-")


def _dump_names(resp: discovery_pb2.DiscoveryResponse) -> str:
    return " ".join(str(r.value) for r in resp.resources)


@pytest.mark.parametrize("identity", [False, True], ids=["forward", "identity"])
async def test_scoped_callers_see_only_their_namespace_even_through_lookalikes(identity: bool) -> None:
    async with stack(mesh=_lookalike_mesh(), identity=identity, cache_ttl=30.0) as s:

        def target(ns: str) -> client.Target:
            if s.pki is not None:
                return s.target(leaf=s.pki.client(ns), namespace=ns)
            return s.target(f"{ns}-token", namespace=ns)

        for ns, own in (("team", {"web.team", "api.team"}), ("team2", {"web.team2"}), ("team-1", {"web.team-1"})):
            resp, _ = await client.request(target(ns), SYNCZ)
            assert {r.name for r in client.rows(resp)} == own, ns
            # Every dump a scoped caller can get is of its own namespace, whatever id it asks for.
            for asked in LOOKALIKES:
                resp, _ = await client.request(target(ns), CONFIG_DUMP, [asked])
                dumped = _dump_names(resp)
                for other in {"team", "team2", "team-1"} - {ns}:
                    assert f".{other}.svc" not in dumped, f"{ns} asked {asked!r} and got {other}'s dump"
                _count("lookalike dump requests")
                body, _ = await client.request(target(ns), DEBUG, [f"config_dump?proxyID={asked}"])
                text = bytes(body.resources[0].value)
                if text.startswith(b"{"):
                    assert str(json.loads(text)["proxy"]).rpartition(".")[2] == ns, (ns, asked, text)
                _count("lookalike debug requests")
            # Cluster-wide debug data is for the istio namespace only.
            for path in ("syncz", "adsz", "configz", "registryz", "connections"):
                assert await _code(target(ns), DEBUG, [path]) == grpc.StatusCode.PERMISSION_DENIED, (ns, path)
        # The caller's own proxy, when unambiguous, is dumped (the scoping is not just "refuse everything").
        resp, _ = await client.request(target("team"), CONFIG_DUMP, ["api.team"])
        assert ".team.svc" in _dump_names(resp)


async def test_coalesced_and_cached_answers_never_cross_namespaces() -> None:
    """Identical requests from different callers at the same moment, with a cache: each sees its own view."""
    async with stack(3, 24, cache_ttl=30.0) as s:
        callers = [("istio-system", ADMIN_TOKEN), ("ns-1", "ns-1-token"), ("ns-2", "ns-2-token")]
        want = {ns: {p.id for r in s.replicas for p in r.proxies if ns == "istio-system" or p.namespace == ns}
                for ns, _ in callers}

        async def one(ns: str, token: str) -> tuple[str, set[str]]:
            resp, _ = await client.request(s.target(token, namespace=ns), SYNCZ)
            return ns, {r.name for r in client.rows(resp)}

        for _ in range(3):  # the first round is coalesced, the next ones come from the cache
            results = await asyncio.gather(*(one(ns, t) for ns, t in callers * 20))
            for ns, ids in results:
                assert ids == want[ns], ns
            _count("concurrent cross-namespace syncz", len(results))


async def test_identity_mode_scoping_holds_with_a_garbage_replica() -> None:
    """A malformed answer must not confuse the scoping: no crash, no other namespace's proxies."""
    async with stack(3, 12, identity=True) as s:
        assert s.pki is not None
        s.replicas[1].faults.garbage = lambda t, b: b[: len(b) * 2 // 3]
        ns1 = s.target(leaf=s.pki.client("ns-1"), namespace="ns-1")
        resp, _ = await client.request(ns1, SYNCZ)
        assert _namespaces(resp) <= {"ns-1"}
        theirs = next(p for p in s.replicas[0].proxies if p.namespace == "ns-2")
        resp, _ = await client.request(ns1, CONFIG_DUMP, [theirs.id])
        assert not resp.resources


# -- What is logged -------------------------------------------------------------------------------------------


def _key_lines(pem: bytes) -> list[str]:
    return [line for line in pem.decode().splitlines() if line and "-----" not in line]


async def test_tokens_and_keys_never_logged(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
                                            tmp_path: os.PathLike[str]) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("", "istioctl_proxy", "grpc", "asyncio"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    secrets: list[str] = [ADMIN_TOKEN, "ns-1-token", "forged-token-4f1d2c9a", "upstream-file-token-77e1b0"]
    # Forward mode: good, scoped, refused and failing calls, and a dead replica (warnings, partial answers).
    async with stack(3, 9) as s:
        await s.mesh.servers[2].stop(0)
        calls = ((ADMIN_TOKEN, "istio-system"), ("ns-1-token", "ns-1"), ("forged-token-4f1d2c9a", "istio-system"),
                 (ADMIN_TOKEN, "ns-1"))
        for token, ns in calls:
            for type_url, names in ((SYNCZ, []), (CONFIG_DUMP, ["x.y"]), (DEBUG, ["adsz"]), ("bogus", [])):
                await _code(s.target(token, namespace=ns), type_url, names)
                _count("calls made while logs were captured")
    # Identity mode, with an upstream token file as well: serving, upstream and caller keys in play.
    token_file = os.path.join(str(tmp_path), "token")
    write_file(token_file, b"upstream-file-token-77e1b0\n")
    async with stack(2, 6, identity=True, upstream_token_file=token_file) as s:
        assert s.pki is not None
        callers = [s.pki.client("istio-system"), s.pki.client("ns-1"), _leaf(TestCA(), "spiffe://cluster.local/ns/x/sa/y")]
        for leaf in callers:
            for type_url, names in ((SYNCZ, []), (CONFIG_DUMP, ["x.y"]), (DEBUG, ["configz"])):
                await _code(s.target(leaf=leaf), type_url, names)
                _count("calls made while logs were captured")
        keys = [s.pki.proxy_serving.key_pem, s.pki.upstream.key_pem, s.pki.istiod.key_pem, s.pki.ca.key_pem,
                *(leaf.key_pem for leaf in callers)]
    records = caplog.records
    assert records, "nothing was logged: the test would prove nothing"
    text = "\n".join([caplog.text, *(r.getMessage() for r in records), *(str(r.args) for r in records),
                      *(r.exc_text or "" for r in records)])
    err = capfd.readouterr().err
    for secret in secrets:
        assert secret not in text, f"token {secret!r} logged"
        assert secret not in err, f"token {secret!r} on stderr"
    for pem in keys:
        for line in _key_lines(pem):
            assert line not in text and line not in err, "private key material logged"
    assert not re.search(r"PRIVATE KEY", text + err)
    _count("log records scanned", len(records))


# -- Safe defaults --------------------------------------------------------------------------------------------


def _config(argv: list[str], env: dict[str, str] | None = None) -> Config:
    p = argparse.ArgumentParser()
    add_serve_flags(p, env or {})
    return from_args(p.parse_args(argv), env or {})


UPSTREAM = ["--istiod", "istiod.istio-system.svc:15010", "--istiod-plaintext"]


def test_plaintext_listens_on_loopback_unless_an_address_is_given() -> None:
    cfg = _config(["--plaintext", *UPSTREAM])
    assert cfg.listen == "127.0.0.1:9090" and not plaintext_exposed(cfg)
    cfg = _config([*UPSTREAM], {"ISTIOCTL_PROXY_PLAINTEXT": "true"})
    assert cfg.listen == "127.0.0.1:9090" and not plaintext_exposed(cfg)
    for explicit in ("0.0.0.0:9090", "[::]:9090", "10.1.2.3:9090"):
        cfg = _config(["--plaintext", "--listen", explicit, *UPSTREAM])
        assert cfg.listen == explicit and plaintext_exposed(cfg)
    with pytest.raises(ConfigError):
        _config(["--plaintext", "--listen", ":9090", *UPSTREAM])  # no host is not "all interfaces"
    # TLS serving is what may listen everywhere by default.
    assert Config().listen.startswith("0.0.0.0:") and not Config().plaintext


async def test_exposed_plaintext_listener_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    async with stack(1, 1, listen="0.0.0.0:0"):
        pass
    assert any("plaintext" in r.getMessage() and r.levelno >= logging.WARNING for r in caplog.records)


def test_upstream_verification_is_on_unless_explicitly_disabled() -> None:
    assert not Config().istiod_insecure_skip_verify and not Config().istiod_plaintext
    with pytest.raises(ConfigError, match="istio root CA"):
        _config(["--plaintext", "--istiod", "istiod:15012"])
    with pytest.raises(ConfigError, match="excludes"):
        _config(["--plaintext", "--istiod", "istiod:15012", "--istiod-plaintext", "--istiod-insecure-skip-verify"])
    with pytest.raises(ConfigError):
        validate(Config(plaintext=True, istiod=("istiod:15012",)))
    cfg = _config(["--plaintext", "--istiod", "istiod:15012", "--istiod-insecure-skip-verify"])
    assert cfg.istiod_insecure_skip_verify  # only when asked for by name


@pytest.fixture
async def tls_istiod(tmp_path: os.PathLike[str]) -> AsyncIterator[tuple[TestCA, str, dict[str, SimulatedMesh]]]:
    """Simulated istiods serving TLS with certificates from the trusted CA (right and wrong SAN) and from
    a rogue CA; token authentication, as a real istiod on 15012 does for istioctl."""
    trusted, rogue = TestCA(), TestCA()
    ca_file = write_file(os.path.join(str(tmp_path), "root.pem"), trusted.cert_pem)
    meshes = {
        "trusted": trusted.issue(dns=("istiod.istio-system.svc",)),
        "wrong SAN": trusted.issue(dns=("evil.istio-system.svc",)),
        "rogue CA": rogue.issue(dns=("istiod.istio-system.svc",)),
    }
    started: dict[str, SimulatedMesh] = {}
    try:
        for name, leaf in meshes.items():
            m = SimulatedMesh(make_mesh(2, 4, tokens=TOKENS))
            await m.start(tls=(leaf.cert_pem, leaf.key_pem, None))
            started[name] = m
        yield trusted, ca_file, started
    finally:
        for m in started.values():
            await m.stop()


async def test_upstream_certificates_are_verified(tls_istiod: tuple[TestCA, str, dict[str, SimulatedMesh]]) -> None:
    _, ca_file, meshes = tls_istiod
    for name, m in meshes.items():
        cfg = Config(listen="127.0.0.1:0", plaintext=True, istiod=tuple(m.addresses), istiod_ca=ca_file,
                     admin_listen="", drain_seconds=1.0, upstream_timeout=3.0)
        validate(cfg)
        proxy = Proxy(cfg)
        await proxy.start()
        try:
            target = client.Target(f"127.0.0.1:{proxy.port}", plaintext=True, token=ADMIN_TOKEN)
            code = await _code(target)
            if name == "trusted":
                assert code == grpc.StatusCode.OK
            else:
                assert code == grpc.StatusCode.UNAVAILABLE, name  # every replica failed the TLS check
                assert sum(r.requests for r in m.replicas) == 0, f"{name}: the token reached an unverified istiod"
                _count("refused upstream: unverified istiod")
        finally:
            await proxy.stop(0)


def test_zz_record_figures() -> None:
    record_figures("security", dict(FIGURES))


__all__ = ["Stack"]
