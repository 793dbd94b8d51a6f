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
import contextlib
import dataclasses
import datetime
import gc
import json
import logging
import os
import re
import sys
import types
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2

from istioctl_proxy import client
from istioctl_proxy import server as server_module
from istioctl_proxy.app import Proxy, free_port
from istioctl_proxy.config import Config, add_serve_flags, from_args, plaintext_exposed, validate
from istioctl_proxy.errors import ConfigError
from istioctl_proxy.policy import CONFIG_DUMP, DEBUG, SYNCZ
from istioctl_proxy.sim.pki import Leaf, TestCA, write_file
from istioctl_proxy.sim.simulate import SimulatedMesh
from istioctl_proxy.sim.simulator import SimProxy, SimReplica, make_mesh
from istioctl_proxy.tls import CertificateReloader, ServingTLS

from . import ads_client
from .ads_client import DELTA, SOTW, ads_call, bearer
from .helpers import ADMIN_TOKEN, TOKENS, Stack, rss_bytes, stack
from .reliability import record_figures
from .waits import EVENT_TIMEOUT, until

FIGURES: dict[str, int] = {}


def _count(name: str, n: int = 1) -> None:
    FIGURES[name] = FIGURES.get(name, 0) + n


async def _code(target: client.Target, type_url: str = SYNCZ, names: list[str] | None = None) -> grpc.StatusCode:
    try:
        await ads_client.request(target, type_url, names, timeout=EVENT_TIMEOUT)
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
            resp, _ = await ads_client.request(target(ns), SYNCZ)
            assert {r.name for r in client.rows(resp)} == own, ns
            # Every dump a scoped caller can get is of its own namespace, whatever id it asks for.
            for asked in LOOKALIKES:
                resp, _ = await ads_client.request(target(ns), CONFIG_DUMP, [asked])
                dumped = _dump_names(resp)
                for other in {"team", "team2", "team-1"} - {ns}:
                    assert f".{other}.svc" not in dumped, f"{ns} asked {asked!r} and got {other}'s dump"
                _count("lookalike dump requests")
                body, _ = await ads_client.request(target(ns), DEBUG, [f"config_dump?proxyID={asked}"])
                text = bytes(body.resources[0].value)
                if text.startswith(b"{"):
                    assert str(json.loads(text)["proxy"]).rpartition(".")[2] == ns, (ns, asked, text)
                _count("lookalike debug requests")
            # Cluster-wide debug data is for the istio namespace only.
            for path in ("syncz", "adsz", "configz", "registryz", "connections"):
                assert await _code(target(ns), DEBUG, [path]) == grpc.StatusCode.PERMISSION_DENIED, (ns, path)
        # The caller's own proxy, when unambiguous, is dumped (the scoping is not just "refuse everything").
        resp, _ = await ads_client.request(target("team"), CONFIG_DUMP, ["api.team"])
        assert ".team.svc" in _dump_names(resp)


async def test_coalesced_and_cached_answers_never_cross_namespaces() -> None:
    """Identical requests from different callers at the same moment, with a cache: each sees its own view."""
    async with stack(3, 24, cache_ttl=30.0) as s:
        callers = [("istio-system", ADMIN_TOKEN), ("ns-1", "ns-1-token"), ("ns-2", "ns-2-token")]
        want = {ns: {p.id for r in s.replicas for p in r.proxies if ns == "istio-system" or p.namespace == ns}
                for ns, _ in callers}

        async def one(ns: str, token: str) -> tuple[str, set[str]]:
            resp, _ = await ads_client.request(s.target(token, namespace=ns), SYNCZ)
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
        resp, _ = await ads_client.request(ns1, SYNCZ)
        assert _namespaces(resp) <= {"ns-1"}
        theirs = next(p for p in s.replicas[0].proxies if p.namespace == "ns-2")
        resp, _ = await ads_client.request(ns1, CONFIG_DUMP, [theirs.id])
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


UPSTREAM = ["--istiod", "istiod.istio-system.svc:15010", "--istiod-plaintext", "--insecure-forward-tokens"]


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
    cfg = _config(["--plaintext", "--istiod", "istiod:15012", "--istiod-insecure-skip-verify",
                   "--insecure-forward-tokens"])
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


# -- Memory before authentication (issue 10 item 3) ----------------------------------------------------------


async def _serve_subprocess(port: int) -> asyncio.subprocess.Process:
    """`istioctl-proxy serve` in its own process (so its RSS is its own), once it listens."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "istioctl_proxy", "serve", "--plaintext", "--listen", f"127.0.0.1:{port}",
        "--istiod", "127.0.0.1:9", "--istiod-plaintext", "--admin-listen", "",
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    while b"serving ADS on" not in (line := await asyncio.wait_for(proc.stderr.readline(), 60)):
        assert line, "the proxy exited before serving"
    return proc


async def test_a_huge_request_is_refused_at_the_request_limit_before_memory_grows() -> None:
    """One 250 MiB request took the proxy's RSS from 67 to 838 MiB; now gRPC refuses it at 1 MiB."""
    port = free_port()
    proc = await _serve_subprocess(port)
    try:
        before = rss_bytes(proc.pid)
        name = "x" * (250 * 2**20)
        req = discovery_pb2.DiscoveryRequest(type_url=SYNCZ, resource_names=[name],
                                             node=client.istioctl_node("istio-system")).SerializeToString()
        del name
        peaks = [before]
        for md in ((), bearer(ADMIN_TOKEN)):  # refused caller, then an authenticated one
            out = await ads_call(f"127.0.0.1:{port}", [req], metadata=md, timeout=60)
            peaks.append(rss_bytes(proc.pid))
            assert out.code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED), out
            if md:
                assert out.code == grpc.StatusCode.RESOURCE_EXHAUSTED, out
        # Just under the limit is still read and decoded: the policy's own check answers it.
        small = discovery_pb2.DiscoveryRequest(type_url=SYNCZ, resource_names=["y" * 1_000_000],
                                               node=client.istioctl_node("istio-system"))
        out = await ads_call(f"127.0.0.1:{port}", [small], metadata=bearer(ADMIN_TOKEN), timeout=60)
        assert out.code == grpc.StatusCode.INVALID_ARGUMENT and "resource name longer" in out.details, out
        grown = max(peaks) - before
        FIGURES["rss_growth_mib_after_250mib_request"] = round(grown / 2**20)
        assert grown < 64 * 2**20, f"RSS grew {grown / 2**20:.0f} MiB for a refused 250 MiB request"
    finally:
        proc.terminate()
        await proc.wait()


async def test_refused_callers_see_unauthenticated_not_a_write_race() -> None:
    """Authentication is decided from metadata before anything is read, yet grpc.aio clients that write
    first still read UNAUTHENTICATED (not their own "Internal error from Core"), and nothing is decoded:
    a refused caller's garbage is UNAUTHENTICATED, not INVALID_ARGUMENT."""
    async with stack(2, 4, first_message_timeout=0.5) as s:
        garbage = b"\xff\xff\xff\xff"
        async with grpc.aio.insecure_channel(s.address) as ch:
            for is_delta in (False, True):
                for req in (discovery_pb2.DiscoveryRequest(type_url=SYNCZ, node=client.istioctl_node("x")), garbage):
                    for _ in range(5):
                        out = await ads_call(ch, [req], delta=is_delta)  # the aio write path, not retried
                        assert out.code == grpc.StatusCode.UNAUTHENTICATED, (is_delta, out.details)
                # A refused caller that sends nothing is ended by the first-message timeout, still UNAUTHENTICATED.
                silent = ch.stream_stream(DELTA if is_delta else SOTW)(timeout=30)
                with contextlib.suppress(grpc.aio.AioRpcError):
                    assert await silent.read() is grpc.aio.EOF
                assert await silent.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ads_client.request(s.target(token=""), SYNCZ)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert sum(r.requests for r in s.replicas) == 0


def _server_frames() -> list[object]:
    """Live frames of server.py functions and exceptions raised through them (tracebacks hold frames)."""
    gc.collect()
    out: list[object] = []
    for o in gc.get_objects():
        if isinstance(o, types.FrameType) and o.f_code.co_filename == server_module.__file__:
            out.append(o)
        elif isinstance(o, BaseException) and o.__traceback__ is not None:
            tb: types.TracebackType | None = o.__traceback__
            while tb is not None:
                if tb.tb_frame.f_code.co_filename == server_module.__file__:
                    out.append(o)
                    break
                tb = tb.tb_next
    return out


async def test_nothing_of_an_aborted_stream_stays_referenced() -> None:
    """grpc.aio keeps an abort's AbortError (so its traceback, frames and their requests) on the call's
    state until the next call arrives: streams ended by an error must leave no frame behind."""
    async with stack(2, 4) as s:
        async with grpc.aio.insecure_channel(s.address) as ch:
            big = ["n" * 500_000]
            no_node = discovery_pb2.DiscoveryRequest(type_url=SYNCZ, resource_names=big)
            bad_type = discovery_pb2.DiscoveryRequest(type_url="bogus" * 100_000,
                                                      node=client.istioctl_node("istio-system"))
            for req, code in ((no_node, grpc.StatusCode.INVALID_ARGUMENT), (bad_type, grpc.StatusCode.UNIMPLEMENTED),
                              (b"\xff\xff", grpc.StatusCode.INVALID_ARGUMENT)):
                out = await ads_call(ch, [req], metadata=bearer(ADMIN_TOKEN))
                assert out.code == code, out
                await until(lambda: not _server_frames(), lambda: f"server frames to be freed: {_server_frames()}")


# -- Replicas' error texts (issue 10 item 4) ---------------------------------------------------------------------

ROGUE_TEXT = "caf\u00e9\nx-forged: 1\r\n\u2028" + "\u00e9" * 600


@contextlib.asynccontextmanager
async def _rogue_replica(message: str) -> AsyncIterator[str]:
    """An 'istiod' that fails every call with `message` as its status details."""

    async def fail(requests: object, context: grpc.aio.ServicerContext[object, object]) -> None:
        await context.abort(grpc.StatusCode.INTERNAL, message)

    server = grpc.aio.server()
    handler = grpc.stream_stream_rpc_method_handler(fail)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "envoy.service.discovery.v3.AggregatedDiscoveryService",
        {"StreamAggregatedResources": handler, "DeltaAggregatedResources": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


async def test_replica_error_texts_never_break_the_call_and_the_trailer_is_per_request() -> None:
    async with _rogue_replica(ROGUE_TEXT) as rogue, stack(2, 4) as s:
        proxy = Proxy(dataclasses.replace(s.proxy.cfg, istiod=(*s.proxy.cfg.istiod, rogue), listen="127.0.0.1:0"))
        await proxy.start()
        try:
            address = f"127.0.0.1:{proxy.port}"
            reqs = [discovery_pb2.DiscoveryRequest(type_url=SYNCZ, node=client.istioctl_node("istio-system"))] * 300
            async with grpc.aio.insecure_channel(address) as ch:
                out = await ads_call(ch, reqs, metadata=bearer(ADMIN_TOKEN), timeout=120)
            assert out.code == grpc.StatusCode.OK, out.details
            assert len(out.responses) == 300
            assert len(out.failed_replicas) == 1, out.failed_replicas  # the latest request's, not 300 of them
            value = out.failed_replicas[0]
            assert rogue in value and value.isascii() and value.isprintable() and len(value) <= 256, value
            assert "caf\\xe9\\nx-forged: 1\\r\\n\\u2028" in value
        finally:
            await proxy.stop(0)


def test_trailer_is_bounded_in_total() -> None:
    from istioctl_proxy.server import failed_replicas_trailer

    failures = [(f"10.0.0.{i}:15012", "\u00e9\n" * 1000) for i in range(100)]
    trailer = failed_replicas_trailer(failures)
    assert sum(len(v) for _, v in trailer) <= 2048 + 100
    assert trailer[-1][1].startswith("... and ") and all(v.isascii() and v.isprintable() for _, v in trailer)
    assert failed_replicas_trailer([]) == ()


# -- Serving certificate rotation ------------------------------------------------------------------------------


def test_a_broken_or_half_written_serving_certificate_is_not_reloaded(
    tmp_path: os.PathLike[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    ca = TestCA()
    first, second = ca.issue(dns=("localhost",)), ca.issue(dns=("localhost",))
    cert = write_file(os.path.join(str(tmp_path), "tls.crt"), first.cert_pem)
    key = write_file(os.path.join(str(tmp_path), "tls.key"), first.key_pem)
    reloader = CertificateReloader(ServingTLS(cert, key))
    reloader.credentials()

    def bump(path: str, data: bytes) -> None:
        write_file(path, data)
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a visibly new mtime on any filesystem

    bump(cert, second.cert_pem)  # the certificate written before its key
    assert reloader.fetch() is None
    assert reloader.fetch() is None  # logged once per change, not per handshake
    bump(cert, b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    assert reloader.fetch() is None
    messages = [r.getMessage() for r in caplog.records]
    assert not any("reloaded" in m for m in messages), messages
    assert sum("were not loaded" in m and "does not belong" in m for m in messages) == 1, messages
    assert sum("were not loaded" in m for m in messages) == 2, messages
    assert reloader.rejected == 2 and reloader.reloads == 0
    bump(cert, second.cert_pem)
    bump(key, second.key_pem)  # the rotation completes
    assert reloader.fetch() is not None
    assert reloader.reloads == 1 and any("reloaded" in r.getMessage() for r in caplog.records)
    # A broken pair at start-up is a one-line configuration error, not a traceback at the first handshake.
    bump(key, first.key_pem)
    with pytest.raises(ConfigError, match="does not belong"):
        CertificateReloader(ServingTLS(cert, key)).credentials()


@pytest.fixture(scope="module", autouse=True)
def _figures() -> Iterator[None]:
    """Writes what this module's tests counted once they have all run, whatever their order."""
    FIGURES.clear()
    yield
    record_figures("security", dict(FIGURES))


__all__ = ["Stack"]
