"""Bad input: property-based fuzzing of what callers send, over real gRPC, against one running proxy.

One stack (2 simulated replicas, forward mode, 1 MiB message limit so "oversized" is cheap to reach) runs
in a background thread for the whole module; hypothesis fires its cases over one synchronous channel.
For every case a small model of the proxy and of istiod (`expect`) says what must happen: how many
answers, then which status and a phrase of its message. So each case checks *precisely* — not just
"did not crash" — and a hang shows up as a missed deadline.

At least 10,000 cases run by default (FUZZ_SCALE multiplies them, e.g. under `make soak`).
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from istioctl_proxy import wire
from istioctl_proxy.errors import InvalidRequest
from istioctl_proxy.policy import (
    CONFIG_DUMP,
    DEBUG,
    DEBUG_PATHS,
    MAX_RESOURCE_NAME,
    MAX_RESOURCE_NAMES,
    NAMESPACE_DEBUG_PATHS,
    SYNCZ,
    parse_debug_name,
)
from istioctl_proxy.sim.simulator import make_mesh

from .ads_client import ARTIFACTS, CLIENT_ARTIFACT, Outcome, ads_call, channel_options, sync_call
from .helpers import ADMIN_TOKEN, TOKENS, stack
from .reliability import Background, env_float, record_figures

MAX_MIB = 1
REPLICAS, PROXIES = 2, 10
MAX_BYTES = MAX_MIB << 20
DEADLINE = 10.0
SCALE = env_float("FUZZ_SCALE", 1.0)
ROOT_NS = "istio-system"
MD = tuple[tuple[str, str | bytes], ...]  # gRPC metadata


# The stack's mesh is deterministic (make_mesh is seeded): its proxy ids are known before it starts, so
# every strategy below is built (and validated by hypothesis) once, not per example.
IDS = sorted(p.id for r in make_mesh(REPLICAS, PROXIES, tokens=TOKENS) for p in r.proxies)


def n(examples: int) -> int:
    return max(1, int(examples * SCALE))


@dataclass
class World:
    bg: Background
    channel: grpc.aio.Channel
    proxy_ids: list[str]
    by_namespace: dict[str, set[str]]
    address: str = ""


CASES: collections.Counter[str] = collections.Counter()
OUTCOMES: collections.Counter[str] = collections.Counter()


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Background(lambda: stack(REPLICAS, PROXIES, max_message_mib=MAX_MIB, upstream_timeout=5.0)) as bg:
        s = bg.value
        by_ns: dict[str, set[str]] = collections.defaultdict(set)
        for r in s.replicas:
            for p in r.proxies:
                by_ns[p.namespace].add(p.id)

        async def open_channel() -> grpc.aio.Channel:
            return grpc.aio.insecure_channel(s.address, options=channel_options(64))

        ch = bg.run(open_channel())
        try:
            world = World(bg, ch, sorted(i for ids in by_ns.values() for i in ids), dict(by_ns), s.address)
            assert world.proxy_ids == IDS
            yield world
        finally:
            bg.run(ch.close())
            tasks = bg.tasks()
    # The proxy survived everything: record what it was put through.
    record_figures("fuzz", {"cases": dict(CASES), "cases_total": sum(CASES.values()),
                            "outcomes": dict(OUTCOMES), "client_artifacts_retried": dict(ARTIFACTS),
                            "timing": dict(TIMING),
                            "tasks_left_in_server_loop": tasks})


# -- The model: what the proxy (and istiod behind it) must answer -------------------------------------------


@dataclass(frozen=True)
class Expect:
    answers: int
    code: grpc.StatusCode = grpc.StatusCode.OK
    phrase: str = ""  # must appear in the status message (lower case)
    exact_answers: bool = True  # a stream cut by an oversized message may lose answers in flight


def _auth(metadata: Sequence[tuple[str, str | bytes]]) -> tuple[str, Expect | None]:
    for key, value in metadata:
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return "", Expect(0, grpc.StatusCode.UNAUTHENTICATED, "bearer")
            return token.strip(), None
    return "", Expect(0, grpc.StatusCode.UNAUTHENTICATED, "no bearer token")


def _node_identity(node: base_pb2.Node) -> tuple[str, str]:
    fields = node.metadata.fields
    ns = fields["NAMESPACE"].string_value if "NAMESPACE" in fields else ""
    sa = fields["SERVICE_ACCOUNT"].string_value if "SERVICE_ACCOUNT" in fields else ""
    return ns, sa


def _plan_error(type_url: str, names: Sequence[str]) -> Expect | None:
    names = list(dict.fromkeys(names))  # a set, as istiod keeps them
    if len(names) > MAX_RESOURCE_NAMES:
        return Expect(0, grpc.StatusCode.INVALID_ARGUMENT, "distinct resource names")
    if any(len(name) > MAX_RESOURCE_NAME for name in names):
        return Expect(0, grpc.StatusCode.INVALID_ARGUMENT, "longer than")
    if type_url in (SYNCZ, CONFIG_DUMP):
        return None
    if type_url == DEBUG:
        if len(names) != 1:
            return Expect(0, grpc.StatusCode.INVALID_ARGUMENT, "exactly one resource name")
        # The debug-name rules themselves are pinned against Go's verdicts in tests/test_policy.py.
        try:
            parse_debug_name(names[0])
        except InvalidRequest:
            return Expect(0, grpc.StatusCode.INVALID_ARGUMENT, "debug")
        return None
    if not type_url:
        return Expect(0, grpc.StatusCode.INVALID_ARGUMENT, "no type_url")
    return Expect(0, grpc.StatusCode.UNIMPLEMENTED, "supported: istio.io/debug/syncz")


def expect(
    metadata: Sequence[tuple[str, str | bytes]],
    requests: Sequence[discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest],
) -> tuple[Expect, list[tuple[str, str]]]:
    """The outcome of a stream, and for each answer (type_url, namespace the caller is scoped to)."""
    token, refused = _auth(metadata)
    if refused:
        return refused, []
    identity = TOKENS.get(token)
    node: base_pb2.Node | None = None
    answered: list[tuple[str, str]] = []
    subscribed: dict[str, dict[str, None]] = {}

    def stop(e: Expect, exact: bool = True) -> tuple[Expect, list[tuple[str, str]]]:
        return Expect(len(answered), e.code, e.phrase, exact), answered

    for req in requests:
        if req.ByteSize() > MAX_BYTES:
            return stop(Expect(0, grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"), exact=False)
        if req.HasField("node") and req.node.id:
            node = req.node
        if node is None:
            return stop(Expect(0, grpc.StatusCode.INVALID_ARGUMENT, "missing node"))
        if isinstance(req, discovery_pb2.DeltaDiscoveryRequest):
            names = subscribed.setdefault(req.type_url, {})
            names.update(dict.fromkeys(req.resource_names_subscribe))
            for name in req.resource_names_unsubscribe:
                names.pop(name, None)
            resource_names = list(names)
        else:
            resource_names = list(req.resource_names)
        if error := _plan_error(req.type_url, resource_names):
            return stop(error)
        if req.type_url == DEBUG and not parse_debug_name(resource_names[0]).known:
            # istiod's 404 body, answered by the proxy: no replica, so no upstream credential check.
            answered.append((req.type_url, ""))
            continue
        # Upstream: the simulated istiod checks the forwarded token and node like istiod does.
        if identity is None:
            return stop(Expect(0, grpc.StatusCode.UNAUTHENTICATED, "invalid token"))
        ns, sa = _node_identity(node)
        if ns != identity[0] or (sa and sa != identity[1]):
            return stop(Expect(0, grpc.StatusCode.PERMISSION_DENIED, "authorization failed"))
        if req.type_url == DEBUG and identity[0] != ROOT_NS:
            if parse_debug_name(resource_names[0]).path not in NAMESPACE_DEBUG_PATHS:
                return stop(Expect(0, grpc.StatusCode.PERMISSION_DENIED, "not available"))
        answered.append((req.type_url, "" if identity[0] == ROOT_NS else identity[0]))
    return Expect(len(answered)), answered


# -- Calling --------------------------------------------------------------------------------------------------


def call(world: World, requests: Sequence[bytes], metadata: Sequence[tuple[str, str | bytes]], delta: bool) -> Outcome:
    """One stream, made by an asyncio client in the server's own loop (no thread hand-offs per message)."""
    return run_batch(world, [(tuple(metadata), requests, delta)])[0]


TIMING: collections.Counter[str] = collections.Counter()


def run_batch(world: World, streams: Sequence[tuple[MD, Sequence[bytes], bool]]) -> list[Outcome]:
    """Several independent streams at once (each its own case)."""

    async def all_of() -> list[Outcome]:
        return list(await asyncio.gather(*(
            ads_call(world.channel, raw, metadata=md, timeout=DEADLINE, delta=delta) for md, raw, delta in streams
        )))

    t0 = time.monotonic()
    outs = world.bg.run(all_of())
    TIMING["calls"] += time.monotonic() - t0
    for i, (out, (md, raw, delta)) in enumerate(zip(outs, streams, strict=True)):
        if out.code == grpc.StatusCode.INTERNAL and out.details == CLIENT_ARTIFACT:
            # The client-side write race (see ads_client.CLIENT_ARTIFACT): ask again, synchronously.
            ARTIFACTS["aio-write-race-retried"] += 1
            outs[i] = sync_call(world.address, raw, md, delta, DEADLINE, options=channel_options(64))
    return outs


Case = tuple[MD, Sequence[discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest], bool]


def check(world: World, kind: str, cases: Sequence[Case]) -> None:
    """Run a batch of cases concurrently; each must end exactly as the model says."""
    outs = run_batch(world, [(md, [r.SerializeToString() for r in reqs], delta) for md, reqs, delta in cases])
    for n_case, ((md, reqs, delta), seen) in enumerate(zip(cases, outs, strict=True)):
        want, answered = expect(md, reqs)
        CASES[kind] += 1
        OUTCOMES[seen.code.name] += 1
        where = f"case {n_case} of the batch"
        # A hung call ends DEADLINE_EXCEEDED, which no case expects: the status check below catches it.
        assert seen.code == want.code, (
            f"{where}: got {seen.code.name} ({seen.details[:300]!r}), want {want.code.name} ({want.phrase})")
        assert want.phrase.lower() in seen.details.lower(), f"{where}: {seen.details!r} does not say {want.phrase!r}"
        if want.exact_answers:
            assert len(seen.responses) == want.answers, where
        else:
            assert len(seen.responses) <= want.answers, where
        for raw, (type_url, scope) in zip(seen.responses, answered, strict=False):
            check_answer(world, raw, type_url, scope, delta)


def check_answer(world: World, raw: bytes, type_url: str, scope: str, delta: bool) -> None:
    """An answer is of the asked type, and a scoped caller's syncz holds its namespace's proxies only."""
    if delta:
        d = discovery_pb2.DeltaDiscoveryResponse.FromString(raw)
        assert d.type_url == type_url
        ids = [r.name for r in d.resources] if type_url == SYNCZ else None
    else:
        resp = discovery_pb2.DiscoveryResponse.FromString(raw)
        assert resp.type_url == type_url
        ids = [wire.syncz_node_id(r.SerializeToString()) for r in resp.resources] if type_url == SYNCZ else None
    if ids is not None:
        want = world.by_namespace[scope] if scope else set(world.proxy_ids)
        assert sorted(ids) == sorted(want)


# -- Strategies -----------------------------------------------------------------------------------------------
# Cheap on purpose: hypothesis draws mostly from pools (built once, with a seeded generator, full of odd
# values) and only a few small free-text fields, so ten thousand cases fit in the default suite.

ENVOY_TYPES = [
    "type.googleapis.com/envoy.config.cluster.v3.Cluster",
    "type.googleapis.com/envoy.config.listener.v3.Listener",
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
    "type.googleapis.com/envoy.service.status.v3.ClientConfig",
]
NEAR_MISSES = [
    "", "istio.io/debug/", "istio.io/debug/syncz ", " istio.io/debug", "ISTIO.IO/DEBUG/SYNCZ", "istio.io/debug/syncz/",
    "type.googleapis.com/istio.io/debug/syncz", "istio.io/debug/config_dump\x00", "istio.io/debug?x=1", "istio.io",
    "istio.io/debug/configz", "istio.io/debug/syncz\n", "istio.io/debug/\u202esyncz", "%69stio.io/debug",
    "istio.io/debug/" + "x" * 5000, "t" * 150_000,  # long ones are echoed in errors: must not break the trailers
    "\u00e9" * 3000,
]
ODD_TEXT = [
    "", " ", "\x00", "\ufffd", "\u202e", "\U0001f600" * 10, "%s%n", "%00", "../../etc/passwd", "\r\n", "\t", "\x7f",
    "a" * 4096, "\u00e9" * 2000, "<script>", "' OR 1=1", "${jndi:ldap://x}", "nonce-" + "9" * 64, "z" * 200_000,
]
type_urls = st.one_of(
    st.sampled_from([SYNCZ, CONFIG_DUMP, DEBUG]),
    st.sampled_from([SYNCZ, CONFIG_DUMP, DEBUG]),
    st.sampled_from([SYNCZ, CONFIG_DUMP, DEBUG]),
    st.sampled_from(ENVOY_TYPES + NEAR_MISSES + ODD_TEXT),
    st.text(max_size=24),
)
ODD_PATHS = [
    "", "/", "//", "nonexistent", "syncz?namespace=ns-1", "//[", "http://[::1/x", "//a]b", "config_dump?proxyID=",
    "?proxyID=%ff", "adsz?proxyID=nobody", "../../../../etc/passwd", "%00", "syncz#frag", "syncz?" + "a=b&" * 500,
    "config_dump?proxyID=a&proxyID=b", "/debug/syncz", "list?x=\u00e9", "[", "//x:99999/", "\x7f", "edsz?proxyID=\n",
    "config_dump?proxyID=" + IDS[0][:8], "ndsz?proxyID=" + IDS[1], "adsz?proxyID=" + IDS[2], "mesh?" + "\u00e9" * 100,
]
PLAIN_PATHS = sorted(DEBUG_PATHS)
debug_paths = st.one_of(
    st.sampled_from(PLAIN_PATHS),
    st.sampled_from(ODD_PATHS + [f"{p}?proxyID={i}" for p in ("config_dump", "edsz", "syncz") for i in IDS]),
    st.builds(lambda p, t: f"{p}?{t}", st.sampled_from(PLAIN_PATHS), st.text(max_size=12)),
)
NAME_POOL = [*IDS, "nobody.nowhere", "", ".", "app", "ns-1", IDS[0][:6], *ODD_TEXT, *ODD_PATHS,
             "n" * (MAX_RESOURCE_NAME - 1), "n" * MAX_RESOURCE_NAME, "n" * (MAX_RESOURCE_NAME + 1), "h" * 70_000]
names_one = st.one_of(debug_paths, st.sampled_from(NAME_POOL), st.text(max_size=16))
resource_names = st.one_of(
    st.just([]),
    st.lists(names_one, min_size=1, max_size=1),
    st.lists(debug_paths, min_size=1, max_size=1),
    st.lists(st.sampled_from(NAME_POOL), max_size=6),
    st.one_of(
        st.integers(50, 3000).map(lambda k: [IDS[i % len(IDS)] + "x" * (i % 3) for i in range(k)]),  # many
        st.integers(50, 150).map(lambda k: ["m" * 4000] * k),  # many large (oversized: test_oversized_requests)
    ),
)


def _node(node_id: str, meta: dict[str, object], extra: dict[str, str]) -> base_pb2.Node:
    node = base_pb2.Node(id=node_id, **extra)
    node.metadata.update(meta)
    return node


def _json(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0.0, -1.5, 1e308, float("nan"), float("inf"), float("-inf"), 2.0**53 + 1])
    if kind == 3:
        return rng.choice([*ODD_TEXT[:12], "istio-system", "default", "ns-1"])
    if kind in (4, 5):
        return {rng.choice(["NAMESPACE", "SERVICE_ACCOUNT", "", "\x00", "k"]) + str(i): _json(rng, depth + 1)
                for i in range(rng.randrange(4))}
    return [_json(rng, depth + 1) for _ in range(rng.randrange(4))]


def _node_pool() -> list[base_pb2.Node]:
    """Nodes istioctl sends, and odd ones: metadata of every Struct kind, wrong NAMESPACE types, odd ids."""
    rng = random.Random(20260101)
    ids = ["sidecar~127.0.0.1~test-1.istio-system~istio-system.svc.cluster.local", "x", *ODD_TEXT[1:], "i" * 50_000]
    matching = [{"NAMESPACE": ROOT_NS, "SERVICE_ACCOUNT": "default", "GENERATOR": "event"}, {"NAMESPACE": ROOT_NS}]
    odd = [{"NAMESPACE": "ns-1", "SERVICE_ACCOUNT": "default"}, {"NAMESPACE": ROOT_NS, "SERVICE_ACCOUNT": "someone"},
           {"NAMESPACE": 7.0}, {"NAMESPACE": {"nested": ROOT_NS}}, {"NAMESPACE": [ROOT_NS]}, {"NAMESPACE": None}, {}]
    pool = []
    for i in range(300):
        if i % 3 == 2:
            meta = dict(rng.choice(odd)) if i % 2 else {"k": _json(rng)}
        else:
            meta = {**{f"X{j}": _json(rng) for j in range(rng.randrange(3))}, **rng.choice(matching)}
        extra = {k: rng.choice(ODD_TEXT[:12]) for k in ("cluster", "user_agent_name") if rng.random() < 0.3}
        pool.append(_node(rng.choice(ids) if i % 4 else ids[0], meta, extra))
    pool.append(_node("", matching[0], {}))  # a node without id does not count
    return pool


NODES = _node_pool()
nodes = st.sampled_from(NODES)
maybe_node = st.one_of(nodes, nodes, nodes, st.none())
garbage = st.one_of(st.just(""), st.sampled_from(ODD_TEXT), st.text(max_size=12))
ERROR_DETAILS = [None, None, None, status_pb2.Status(code=3, message="NACK: unknown field"),
                 status_pb2.Status(code=-5, message="\ufffd"), status_pb2.Status(code=2**31 - 1, message="z" * 5000)]
error_details = st.sampled_from(ERROR_DETAILS)


unsubscribe_names = st.one_of(st.just([]), st.just([]), resource_names)
coin = st.booleans()


@st.composite
def _sotw_requests(draw: st.DrawFn, first_node: bool = False) -> discovery_pb2.DiscoveryRequest:
    req = discovery_pb2.DiscoveryRequest(
        type_url=draw(type_urls), resource_names=draw(resource_names),
        version_info=draw(garbage), response_nonce=draw(garbage),
    )
    node = draw(nodes if first_node else maybe_node)
    if node is not None:
        req.node.CopyFrom(node)
    detail = draw(error_details)
    if detail is not None:  # a NACK: istiod answers debug types afresh anyway
        req.error_detail.CopyFrom(detail)
    return req


@st.composite
def _delta_requests(draw: st.DrawFn) -> discovery_pb2.DeltaDiscoveryRequest:
    req = discovery_pb2.DeltaDiscoveryRequest(
        type_url=draw(type_urls), resource_names_subscribe=draw(resource_names),
        resource_names_unsubscribe=draw(unsubscribe_names),
        response_nonce=draw(garbage),
    )
    if draw(coin):
        req.initial_resource_versions.update({draw(st.sampled_from(NAME_POOL[:20])): draw(garbage)})
    node = draw(maybe_node)
    if node is not None:
        req.node.CopyFrom(node)
    detail = draw(error_details)
    if detail is not None:
        req.error_detail.CopyFrom(detail)
    return req


sotw_requests, first_sotw_requests = _sotw_requests(), _sotw_requests(first_node=True)
delta_requests = _delta_requests()

ADMIN_MD: MD = (("authorization", f"Bearer {ADMIN_TOKEN}"),)


def _metadata_pool() -> list[MD]:
    """Valid admin metadata with extras, and every way to get authorization wrong."""
    rng = random.Random(99)
    printable = [chr(c) for c in range(0x21, 0x7F)]
    key_chars = "abcdefghijklmnopqrstuvwxyz0123456789-_."

    def value() -> str:
        return "".join(rng.choice(printable) for _ in range(rng.randrange(1, 40)))

    def key() -> str:
        k = rng.choice("abcxyz") + "".join(rng.choice(key_chars) for _ in range(rng.randrange(12)))
        return k + "x" if k.endswith("-bin") else k

    pool: list[MD] = [
        (), (("authorization", "Basic YWRtaW46YWRtaW4="),), (("authorization", "Bearer"),),
        (("authorization", "bearer admin-token"),), (("authorization", "BEARER   admin-token"),),
        (("authorization", "Bearer not-a-known-token"),), (("authorization", "admin-token"),),
        (("authorization", "Bearer ns-2-token"), ("authorization", "Bearer admin-token")),
        (("authorization", "Bearer admin-token"), ("authorization", "Bearer ns-2-token")),
        (("x-authorization", "Bearer admin-token"),), (("authorization", "Bearer ns-1-token"),),
        (("authorization", "Bearer " + "t" * 6000),), (("authorization", "Bearer admin-token extra"),),
    ]
    for _ in range(60):
        pool.append((("authorization", "Bearer " + value()),))
        pool.append((*ADMIN_MD, *((key(), value()) for _ in range(rng.randrange(1, 4)))))
        pool.append((*ADMIN_MD, ("x-garbage-bin", bytes(rng.randrange(256) for _ in range(rng.randrange(64))))))
    return pool


metadata = st.one_of(st.just(ADMIN_MD), st.just(ADMIN_MD), st.sampled_from(_metadata_pool()))

FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)


# -- The properties -------------------------------------------------------------------------------------------


# Each example is a batch of independent cases fired concurrently (hypothesis' per-example overhead and
# the loop's idle time are shared); the counts below are cases, not examples.
callers = st.one_of(st.just(ADMIN_MD), st.just(ADMIN_MD), metadata)


@settings(FUZZ, max_examples=n(400))
@given(st.lists(st.tuples(callers, sotw_requests), min_size=10, max_size=10))
def test_single_discovery_requests(world: World, batch: list[tuple[MD, discovery_pb2.DiscoveryRequest]]) -> None:
    """4000 cases: one request per stream, every field odd in some way."""
    check(world, "sotw-single", [(md, [req], False) for md, req in batch])


@settings(FUZZ, max_examples=n(250))
@given(st.lists(st.tuples(first_sotw_requests, st.lists(sotw_requests, max_size=4)), min_size=6, max_size=6))
def test_request_sequences_on_one_stream(
    world: World, batch: list[tuple[discovery_pb2.DiscoveryRequest, list[discovery_pb2.DiscoveryRequest]]],
) -> None:
    """1500 cases: several requests on one stream: ACK/NACK-looking ones, garbage nonces, node only on the first."""
    check(world, "sotw-stream", [(ADMIN_MD, [first, *rest], False) for first, rest in batch])


@settings(FUZZ, max_examples=n(313))
@given(st.lists(st.tuples(callers, st.lists(delta_requests, min_size=1, max_size=3)), min_size=8, max_size=8))
def test_delta_request_sequences(
    world: World, batch: list[tuple[MD, list[discovery_pb2.DeltaDiscoveryRequest]]],
) -> None:
    """2500 cases: Delta streams; subscriptions accumulate per type, so the model tracks them too."""
    check(world, "delta-stream", [(md, reqs, True) for md, reqs in batch])


@settings(FUZZ, max_examples=n(100))
@given(st.lists(st.tuples(metadata, st.sampled_from([SYNCZ, CONFIG_DUMP]), nodes, coin), min_size=10, max_size=10))
def test_invalid_metadata(world: World, batch: list[tuple[MD, str, base_pb2.Node, bool]]) -> None:
    """1000 cases: every way to get the authorization header wrong, plus odd extra metadata."""
    cases: list[Case] = []
    for md, type_url, node, delta in batch:
        req = (discovery_pb2.DeltaDiscoveryRequest if delta else discovery_pb2.DiscoveryRequest)(
            type_url=type_url, node=node)
        cases.append((md, [req], delta))
    check(world, "metadata", cases)


def _parsed(raw: bytes, delta: bool) -> discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest | None:
    cls = discovery_pb2.DeltaDiscoveryRequest if delta else discovery_pb2.DiscoveryRequest
    try:
        return cls.FromString(raw)
    except Exception:
        return None


@st.composite
def _raw_requests(draw: st.DrawFn) -> bytes:
    valid = discovery_pb2.DiscoveryRequest(type_url=SYNCZ, node=draw(nodes)).SerializeToString()
    return draw(st.one_of(
        st.binary(max_size=200),
        st.builds(lambda cut: valid[:cut], st.integers(0, len(valid))),  # truncated
        st.builds(lambda i, b: valid[:i] + bytes([b]) + valid[i + 1:], st.integers(0, max(0, len(valid) - 1)),
                  st.integers(0, 255)),  # one byte changed
        st.builds(lambda b: valid + b, st.binary(min_size=1, max_size=20)),  # trailing junk
        st.sampled_from([b"\x22\x02\xff\xfe", b"\x0a\x80", b"\xff" * 11, b"\x12\x05\x0a\x03\xc3\x28\x00",
                         b"\x0b", b"\x08" + b"\xff" * 10 + b"\x01"]),
    ))


@settings(FUZZ, max_examples=n(100))
@given(st.lists(st.tuples(_raw_requests(), coin), min_size=10, max_size=10))
def test_raw_request_bytes(world: World, batch: list[tuple[bytes, bool]]) -> None:
    """1000 cases: bytes that may not be a request at all: a precise INVALID_ARGUMENT, never UNKNOWN."""
    outs = run_batch(world, [(ADMIN_MD, [raw], delta) for raw, delta in batch])
    for (raw, delta), seen in zip(batch, outs, strict=True):
        CASES["raw-bytes"] += 1
        OUTCOMES[seen.code.name] += 1
        parsed = _parsed(raw, delta)
        if parsed is None:
            assert seen.code == grpc.StatusCode.INVALID_ARGUMENT, (seen.code, seen.details)
            assert "malformed request" in seen.details
            continue
        want, _ = expect(ADMIN_MD, [parsed])
        assert seen.code == want.code, (seen.code, seen.details, want)
        assert want.phrase.lower() in seen.details.lower()


@settings(FUZZ, max_examples=n(12))
@given(data=st.data())
def test_oversized_requests(world: World, data: st.DataObject) -> None:
    """Past the limit in any field, on either endpoint, first or later on the stream: RESOURCE_EXHAUSTED."""
    size = data.draw(st.integers(MAX_BYTES, 3 * MAX_BYTES))
    field = data.draw(st.sampled_from(["nonce", "names", "node", "type"]))
    node = _node("sidecar~x", {"NAMESPACE": ROOT_NS}, {})
    delta = data.draw(st.booleans())
    big: discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest
    if delta:
        big = discovery_pb2.DeltaDiscoveryRequest(type_url=SYNCZ, node=node)
        names = big.resource_names_subscribe
    else:
        big = discovery_pb2.DiscoveryRequest(type_url=SYNCZ, node=node)
        names = big.resource_names
    if field == "nonce":
        big.response_nonce = "n" * size
    elif field == "names":
        names.extend(["m" * 4000] * (size // 4000 + 1))
    elif field == "node":
        big.node.metadata.update({"BIG": "b" * size})
    else:
        big.type_url = "t" * size
    before = data.draw(st.integers(0, 2))
    kind = discovery_pb2.DeltaDiscoveryRequest if delta else discovery_pb2.DiscoveryRequest
    small = kind(type_url=SYNCZ, node=node)
    check(world, "oversized", [(ADMIN_MD, [small] * before + [big], delta)])


def test_oversized_and_limit_sized_requests(world: World) -> None:
    """Just under the limit is served; just over it is RESOURCE_EXHAUSTED naming both sizes."""
    node = _node("sidecar~x", {"NAMESPACE": ROOT_NS}, {})
    base = discovery_pb2.DiscoveryRequest(type_url=SYNCZ, node=node)
    filler = MAX_BYTES - base.ByteSize() - 8
    for delta_size, code in ((0, grpc.StatusCode.OK), (64, grpc.StatusCode.RESOURCE_EXHAUSTED),
                             (8 << 20, grpc.StatusCode.RESOURCE_EXHAUSTED)):
        req = discovery_pb2.DiscoveryRequest(type_url=SYNCZ, node=node, response_nonce="n" * (filler + delta_size))
        seen = call(world, [req.SerializeToString()], ADMIN_MD, delta=False)
        CASES["oversized"] += 1
        assert seen.code == code, (req.ByteSize(), seen.code, seen.details)
        if code != grpc.StatusCode.OK:
            assert "larger than max" in seen.details
    # The proxy is still fine afterwards.
    ok = call(world, [base.SerializeToString()], ADMIN_MD, delta=False)
    assert ok.code == grpc.StatusCode.OK and len(ok.responses) == 1


def test_many_delta_names_do_not_stall_the_server(world: World) -> None:
    """40k subscribed names in one Delta request: answered quickly (the subscription set is not O(n²)), with
    INVALID_ARGUMENT: more distinct names than any istioctl request has."""
    names = [f"proxy-{i}.nowhere" for i in range(40_000)]
    req = discovery_pb2.DeltaDiscoveryRequest(type_url=CONFIG_DUMP, resource_names_subscribe=names,
                                              node=_node("sidecar~x", {"NAMESPACE": ROOT_NS}, {}))
    seen = call(world, [req.SerializeToString()], ADMIN_MD, delta=True)
    CASES["many-names"] += 1
    # Refused within the call's DEADLINE (10 s): quadratic work on 40k names would take minutes.
    assert seen.code == grpc.StatusCode.INVALID_ARGUMENT and "distinct resource names" in seen.details, seen.details


def test_metadata_values_survive_struct_edge_cases(world: World) -> None:
    """Metadata the Struct type can barely hold (NaN, deep nesting) is forwarded without breaking anything;
    nesting deeper than protobuf's decoder allows is a malformed request, not a crash."""
    def nested(depth: int) -> object:
        deep: object = ROOT_NS
        for _ in range(depth):
            deep = {"d": deep}
        return deep

    meta = {"NAMESPACE": ROOT_NS, "NAN": float("nan"), "INF": float("inf"), "DEEP": nested(20)}
    req = discovery_pb2.DiscoveryRequest(type_url=SYNCZ, node=_node("sidecar~odd", meta, {}))
    seen = call(world, [req.SerializeToString()], ADMIN_MD, delta=False)
    CASES["struct-edge"] += 1
    assert seen.code == grpc.StatusCode.OK, seen.details
    assert len(seen.sotw().resources) == len(world.proxy_ids)

    for delta in (False, True):
        seen = call(world, [_too_deep_request(200, delta)], ADMIN_MD, delta=delta)
        CASES["struct-edge"] += 1
        assert seen.code == grpc.StatusCode.INVALID_ARGUMENT and "malformed request" in seen.details, seen


def _ld(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field."""
    return wire_bytes.tag(number) + wire_bytes.varint(len(payload)) + payload


class wire_bytes:
    @staticmethod
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    @staticmethod
    def tag(number: int) -> bytes:
        return wire_bytes.varint(number << 3 | 2)


def _too_deep_request(depth: int, delta: bool) -> bytes:
    """A request whose node metadata nests Structs deeper than protobuf decoders accept (built by hand:
    the Python protobuf library refuses to build it)."""
    value = _ld(3, b"x")  # Value{string_value}
    for _ in range(depth):
        struct = _ld(1, _ld(1, b"d") + _ld(2, value))  # Struct{fields: {"d": value}}
        value = _ld(5, struct)  # Value{struct_value}
    node = _ld(1, b"sidecar~deep") + _ld(3, _ld(1, _ld(1, b"DEEP") + _ld(2, value)))
    # DiscoveryRequest: node = 2, type_url = 4; DeltaDiscoveryRequest: node = 1, type_url = 2.
    return _ld(1, node) + _ld(2, SYNCZ.encode()) if delta else _ld(2, node) + _ld(4, SYNCZ.encode())


def test_struct_value_kinds_are_covered() -> None:
    """Guard for the strategies above: they can build every Struct value kind."""
    node = _node("x", {"a": None, "b": True, "c": 1.5, "d": "s", "e": [1.0], "f": {"g": "h"}}, {})
    kinds = {v.WhichOneof("kind") for v in node.metadata.fields.values()}
    assert kinds == {"null_value", "bool_value", "number_value", "string_value", "list_value", "struct_value"}
    assert isinstance(node.metadata, struct_pb2.Struct)
