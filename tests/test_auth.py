"""Both auth modes: forward (istiod decides) and identity (the proxy scopes callers itself)."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from istioctl_proxy import client
from istioctl_proxy.sim.simulator import SimProxy

from . import ads_client
from .helpers import stack, unused_kubeconfig
from .waits import EVENT_TIMEOUT


async def test_forward_mode_sends_the_token_and_node_to_every_replica() -> None:
    async with stack(3, 12) as s:
        seen: list[tuple[str, str]] = []
        for r in s.replicas:
            original = r.identify

            def spy(context, node, original=original):  # type: ignore[no-untyped-def]
                md = dict(context.invocation_metadata())
                seen.append((md.get("authorization", ""), node.metadata.fields["NAMESPACE"].string_value))
                return original(context, node)

            r.identify = spy  # type: ignore[method-assign]
        await ads_client.request(s.target("ns-1-token", namespace="ns-1"), client.SYNCZ)
        assert seen == [("Bearer ns-1-token", "ns-1")] * 3


async def test_forward_mode_namespace_token_sees_only_its_namespace() -> None:
    async with stack(3, 24) as s:
        resp, _ = await ads_client.request(s.target("ns-1-token", namespace="ns-1"), client.SYNCZ)
        namespaces = {r.name.rpartition(".")[2] for r in client.rows(resp)}  # type: ignore[union-attr]
        assert namespaces == {"ns-1"} and len(resp.resources) == 6


async def test_no_token_is_refused_and_never_forwarded() -> None:
    async with stack(2, 4) as s:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ads_client.request(s.target(token=""), client.SYNCZ)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "bearer token" in (err.value.details() or "")
        assert sum(r.requests for r in s.replicas) == 0


async def test_token_refused_upstream_is_passed_through_not_partial() -> None:
    async with stack(3, 6) as s:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ads_client.request(s.target("forged-token"), client.SYNCZ)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_forward_mode_node_not_matching_token_is_permission_denied() -> None:
    async with stack(2, 4) as s:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ads_client.request(s.target("ns-1-token", namespace="ns-2"), client.SYNCZ)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_identity_mode_system_caller_sees_everything() -> None:
    async with stack(3, 12, identity=True) as s:
        assert s.pki is not None
        resp, _ = await ads_client.request(s.target(leaf=s.pki.client("istio-system")), client.SYNCZ)
        assert len(resp.resources) == 12


async def test_identity_mode_scopes_syncz_and_dumps_by_namespace() -> None:
    async with stack(3, 12, identity=True) as s:
        assert s.pki is not None
        ns1 = s.target(leaf=s.pki.client("ns-1", "reader"))
        resp, _ = await ads_client.request(ns1, client.SYNCZ)
        assert {r.name.rpartition(".")[2] for r in client.rows(resp)} == {"ns-1"}
        assert len(resp.resources) == 3
        mine = next(p for r in s.replicas for p in r.proxies if p.namespace == "ns-1")
        theirs = next(p for r in s.replicas for p in r.proxies if p.namespace == "ns-2")
        ok, _ = await ads_client.request(ns1, "istio.io/debug/config_dump", [mine.id])
        assert len(ok.resources) == 7
        denied, _ = await ads_client.request(ns1, "istio.io/debug/config_dump", [theirs.id])
        assert len(denied.resources) == 0
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ads_client.request(ns1, "istio.io/debug", ["syncz"])
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        body, _ = await ads_client.request(ns1, "istio.io/debug", [f"config_dump?proxyID={theirs.id}"])
        assert body.resources[0].value.startswith(b"Proxy not connected")
        body, _ = await ads_client.request(ns1, "istio.io/debug", [f"config_dump?proxyID={mine.id}"])
        assert json.loads(body.resources[0].value)["proxy"] == mine.id


async def test_identity_mode_substring_lookalike_in_other_namespace_is_not_dumped() -> None:
    from istioctl_proxy.sim.simulator import make_mesh

    mesh = make_mesh(2, 0)
    mesh[0].proxies.append(SimProxy("web", "team2", states={"CDS": "SYNCED"}))  # id web.team2 contains "web.team"
    async with stack(mesh=mesh, identity=True) as s:
        assert s.pki is not None
        team = s.target(leaf=s.pki.client("team"))
        resp, _ = await ads_client.request(team, "istio.io/debug/config_dump", ["web.team"])
        assert len(resp.resources) == 0


async def test_identity_mode_without_client_certificate_is_refused() -> None:
    async with stack(1, 2, identity=True) as s:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ads_client.request(s.target(token="whatever"), client.SYNCZ, timeout=EVENT_TIMEOUT)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)


async def test_identity_mode_certificate_from_another_ca_is_refused() -> None:
    from istioctl_proxy.sim.pki import TestCA

    async with stack(1, 2, identity=True) as s:
        stranger = TestCA().issue_spiffe("istio-system", "default")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ads_client.request(s.target(leaf=stranger), client.SYNCZ, timeout=EVENT_TIMEOUT)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_token_review_limits_per_peer_address() -> None:
    from istioctl_proxy.tokenreview import ReviewLimits, peer_host

    # The per-peer limits count addresses, not connections: the port a client dials from does not matter.
    assert peer_host("ipv4:10.0.0.1:5000") == peer_host("ipv4:10.0.0.1:5001") == "10.0.0.1"
    assert peer_host("ipv6:[::1]:5000") == "::1"
    assert peer_host("unix:/run/x.sock") == "unix:/run/x.sock"
    # The flags' shape: bursts are two seconds' worth (at least 1), a peer gets half the concurrency.
    assert ReviewLimits.from_rates(20, 2, 4) == ReviewLimits(rate=20, burst=40, peer_rate=2, peer_burst=4,
                                                             concurrency=4, peer_concurrency=2)
    tiny = ReviewLimits.from_rates(0.001, 0.001, 1)
    assert (tiny.burst, tiny.peer_burst, tiny.peer_concurrency) == (1, 1, 1)


async def test_token_reviewer_gets_the_callers_peer_address(tmp_path: Path) -> None:
    kubeconfig = unused_kubeconfig(str(tmp_path))
    peers: list[str] = []

    async def reviewer(token: str, peer: str) -> tuple[str, str] | None:
        peers.append(peer)
        return ("istio-system", "default") if token == "good" else None

    async with stack(2, 4, identity=True, token_review=True, token_review_kubeconfig=kubeconfig) as s:
        s.proxy.service.authenticator.token_reviewer = reviewer
        resp, _ = await ads_client.request(s.target("good"), client.SYNCZ)
        assert len(resp.resources) == 4
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ads_client.request(s.target("bad"), client.SYNCZ)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert len(peers) == 2 and all(p.startswith("ipv4:127.0.0.1:") for p in peers), peers


async def test_identity_mode_allowed_namespace_sees_everything_but_istio_io_debug_is_scoped() -> None:
    """Red team: istiod consults DEBUG_ENDPOINT_AUTH_ALLOWED_NAMESPACES for syncz and config_dump only; its
    DebugGen exempts the system namespace alone (debuggen.go parseAndValidateDebugRequest, getDebugConnection).
    An allowed namespace got every istio.io/debug path (configz, adsz, ...) and other namespaces' debug dumps."""
    async with stack(3, 12, identity=True, debug_allowed_namespaces=("ns-1",)) as s:
        assert s.pki is not None
        ns1 = s.target(leaf=s.pki.client("ns-1", "reader"))
        resp, _ = await ads_client.request(ns1, client.SYNCZ)
        assert len(resp.resources) == 12  # syncz: everything, as istiod allows
        theirs = next(p for r in s.replicas for p in r.proxies if p.namespace == "ns-2")
        dump, _ = await ads_client.request(ns1, "istio.io/debug/config_dump", [theirs.id])
        assert len(dump.resources) == 7  # config_dump type: any proxy, as istiod allows
        for path in ("syncz", "adsz", "configz"):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ads_client.request(ns1, "istio.io/debug", [path])
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, path
        body, _ = await ads_client.request(ns1, "istio.io/debug", [f"config_dump?proxyID={theirs.id}"])
        assert body.resources[0].value.startswith(b"Proxy not connected")
        mine = next(p for r in s.replicas for p in r.proxies if p.namespace == "ns-1")
        body, _ = await ads_client.request(ns1, "istio.io/debug", [f"config_dump?proxyID={mine.id}"])
        assert json.loads(body.resources[0].value)["proxy"] == mine.id


def test_jwt_expiry_reads_only_a_numeric_exp_of_a_three_part_token() -> None:
    import base64

    from istioctl_proxy.auth import jwt_expiry

    def token(claims: object, parts: int = 3) -> str:
        body = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
        return ".".join(["e30", body, "sig", "x"][:parts])

    assert jwt_expiry(token({"exp": 1700000000})) == 1700000000.0
    assert jwt_expiry(token({"exp": 1.5})) == 1.5
    # Read by the TokenReview cache (a verdict never outlives the token) and by `check`: one reading of
    # a token for both, and anything that is not plainly a JWT with a NumericDate has no expiry.
    assert jwt_expiry(token({"exp": "1700000000"})) is None
    assert jwt_expiry(token({"exp": 1700000000}, parts=2)) is None
    assert jwt_expiry(token({"exp": 1700000000}, parts=4)) is None
    assert jwt_expiry(token([1700000000])) is None
    assert jwt_expiry("a.!!!.c") is None
    assert jwt_expiry("") is None


def _jwt_spellings() -> tuple[str, list[str]]:
    """A token shaped as an RS256 JWT (not signed: the proxy verifies nothing) and spellings of it that Go's
    non-strict base64url decoding reads as the same bytes: each part's last character varied in its spare
    bits (istiod 1.30 accepts them all: tests/e2e/test_redteam_fairness.py), and padding."""
    import base64

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    header = b64(json.dumps({"alg": "RS256", "kid": "k1", "typ": "JWT"}).encode())
    payload = b64(json.dumps({"iss": "https://test.local", "sub": "system:serviceaccount:istio-system:default",
                              "exp": 2000000000, "p": "xx"}).encode())
    sig = b64(bytes(range(256)))  # 2048 bits in 342 characters: 4 spare bits
    assert len(header) % 4 and len(payload) % 4 and len(sig) % 4  # every part has spare bits

    def flip(part: str) -> str:  # the lowest bit of the last character: never a data bit
        return part[:-1] + alphabet[alphabet.index(part[-1]) ^ 1]

    token = f"{header}.{payload}.{sig}"
    return token, [f"{flip(header)}.{payload}.{sig}", f"{header}.{flip(payload)}.{sig}",
                   f"{header}.{payload}.{flip(sig)}", f"{flip(header)}.{flip(payload)}.{flip(sig)}",
                   f"{header}.{payload}.{sig}=="]


async def test_token_review_callers_of_one_service_account_are_one_view_but_each_token_its_own_budget_caller() -> None:
    """Red team stop 21 F3: istioctl mints every user's token for the istio namespace's default service account,
    so keying the send budget by `k8s:<ns>/<sa>` made every istioctl user one caller (one user's unread answers
    refused all). The budget keys the token (however spelled); the view (coalescing, cache) stays the identity."""
    from istioctl_proxy.auth import Authenticator, AuthMode

    token, spellings = _jwt_spellings()
    other = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]

    async def reviewer(t: str, peer: str) -> tuple[str, str] | None:
        return ("istio-system", "default")

    auth = Authenticator(AuthMode.IDENTITY, token_reviewer=reviewer)
    first, respelled, second = [await auth.authenticate(_Metadata(t)) for t in (token, spellings[0], other)]  # type: ignore[arg-type]
    assert first.key == second.key == "k8s:istio-system/default"  # one view
    assert first.budget_key == respelled.budget_key != second.budget_key
    assert token not in first.budget_key and first.token == ""  # no secret kept or keyed; istiod gets ours


class _Metadata:
    def __init__(self, token: str) -> None:
        self.token = token

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}  # no client certificate

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


async def test_one_jwt_however_spelled_is_one_caller_to_the_send_budget_but_not_to_the_cache() -> None:
    from istioctl_proxy.auth import Authenticator, AuthMode, Caller, canonical_jwt

    token, spellings = _jwt_spellings()
    auth = Authenticator(AuthMode.FORWARD)
    callers = [await auth.authenticate(_Metadata(t)) for t in [token, *spellings]]  # type: ignore[arg-type]
    # Red team stop 20, F1: before, each spelling was its own caller (its own share, turn and queue).
    assert {c.budget_key for c in callers} == {callers[0].principal}
    assert {c.principal for c in callers} == {callers[0].principal}
    # The coalescing/cache key stays the exact credential: whose view is shared is not widened.
    assert len({c.key for c in callers}) == len(callers)
    assert all(canonical_jwt(t) == token for t in spellings)
    # Another token, or a token that is not base64url in three parts, keeps its own bytes' fingerprint.
    other = await auth.authenticate(_Metadata(token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]))  # type: ignore[arg-type]
    assert other.budget_key != callers[0].budget_key
    for odd in ("opaque-token", "a.b", "a.b.c.d", f"{token[:-1]}+", f"{token[:-1]}/", "e30.e30.A", "e30.e=30.AA"):
        assert canonical_jwt(odd) == odd
    assert Caller("bearer:x", token="opaque-token").budget_key == Caller("bearer:y", token="opaque-token").budget_key
    assert "opaque-token" not in Caller("bearer:x", token="opaque-token").budget_key  # no secret in the key


async def test_the_send_budget_sees_one_caller_for_two_spellings_of_one_token() -> None:
    """Sends and fan-out reservations are held under `Caller.budget_key`; the cache still tells them apart."""
    from istioctl_proxy.sim.simulator import make_mesh

    token, spellings = _jwt_spellings()
    respelled = spellings[3]
    tokens = {t: ("istio-system", "default") for t in (token, respelled)}
    async with stack(mesh=make_mesh(3, 12, tokens=tokens), cache_ttl=60.0) as s:
        budget = s.proxy.service.budget
        held: list[tuple[str, bool]] = []
        original = budget.hold

        def spy(caller: str, size: int, wait: float, *, fan_out: bool = False):  # type: ignore[no-untyped-def]
            held.append((caller, fan_out))
            return original(caller, size, wait, fan_out=fan_out)

        budget.hold = spy  # type: ignore[method-assign]
        asked: list[str] = []
        for r in s.replicas:
            identify = r.identify

            def count(context, node, identify=identify):  # type: ignore[no-untyped-def]
                asked.append(dict(context.invocation_metadata())["authorization"])
                return identify(context, node)

            r.identify = count  # type: ignore[method-assign]
        for t in (token, respelled, token):
            resp, _ = await ads_client.request(s.target(t), client.SYNCZ)
            assert len(resp.resources) == 12
        # Each spelling fetched its own answer (the third call was the first spelling's cached one).
        assert sorted(asked) == sorted([f"Bearer {token}"] * 3 + [f"Bearer {respelled}"] * 3)
        # Three sends and the second call's fan-out reservation (the first learnt the size): one caller.
        assert sorted(f for _, f in held) == [False, False, False, True]
        assert {c for c, _ in held} == {"bearer:" + _sha(token)}


def _sha(token: str) -> str:
    import hashlib

    return hashlib.sha256(token.encode()).hexdigest()[:24]
