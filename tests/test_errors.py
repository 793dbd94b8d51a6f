"""Errors: each bad request gets one precise status with a useful message; a malformed upstream answer is
that replica's failure only.

The first half is a table of the requests istioctl (or a broken or hostile client) can get wrong, with the
status and the words the caller must see. The second half makes one simulated istiod answer garbage
(simulator Faults.garbage) — random bytes, wrong type URLs, Anys that are not Anys, truncated or
ill-shaped JSON on internal-debug — and checks that the call still succeeds with the healthy replicas'
data, in a form istioctl can read, naming the bad replica in the trailers. A hypothesis property then
mangles real answers at random.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable, Iterator

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.status.v3 import csds_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from istioctl_proxy import client, wire
from istioctl_proxy.policy import CONFIG_DUMP, DEBUG, SYNCZ

from .ads_client import Outcome, ads_call, bearer
from .helpers import ADMIN_TOKEN, Stack, stack
from .reliability import Background, env_float, record_figures
from .waits import EVENT_TIMEOUT

NODE = client.istioctl_node("istio-system")
ADMIN = bearer(ADMIN_TOKEN)


def sotw(type_url: str, names: list[str] | None = None, node: bool = True) -> discovery_pb2.DiscoveryRequest:
    req = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names or [])
    if node:
        req.node.CopyFrom(NODE)
    return req


def delta(type_url: str, names: list[str] | None = None, node: bool = True) -> discovery_pb2.DeltaDiscoveryRequest:
    req = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, resource_names_subscribe=names or [])
    if node:
        req.node.CopyFrom(NODE)
    return req


Request = discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest | bytes
BAD_REQUESTS: list[tuple[str, list[Request], tuple[tuple[str, str], ...], grpc.StatusCode, list[str]]] = [
    ("no node on the first request", [sotw(SYNCZ, node=False)], ADMIN, grpc.StatusCode.INVALID_ARGUMENT,
     ["missing node information", "node.id"]),
    ("no type URL", [sotw("")], ADMIN, grpc.StatusCode.INVALID_ARGUMENT, ["no type_url", SYNCZ, CONFIG_DUMP, DEBUG]),
    ("Envoy's CDS (we are not a control plane)", [sotw("type.googleapis.com/envoy.config.cluster.v3.Cluster")],
     ADMIN, grpc.StatusCode.UNIMPLEMENTED, ["not a control plane", SYNCZ, CONFIG_DUMP, DEBUG]),
    ("a 200 kB type URL (echoed, but the status still fits its trailer)", [sotw("t" * 200_000)], ADMIN,
     grpc.StatusCode.UNIMPLEMENTED, ["ttttt", "supported: istio.io/debug/syncz"]),
    ("internal-debug without a path", [sotw(DEBUG)], ADMIN, grpc.StatusCode.INVALID_ARGUMENT,
     ["exactly one resource name", "got 0"]),
    ("internal-debug with two paths", [sotw(DEBUG, ["syncz", "adsz"])], ADMIN, grpc.StatusCode.INVALID_ARGUMENT,
     ["exactly one resource name", "got 2"]),
    ("internal-debug path that is no URL path", [sotw(DEBUG, ["//[oops"])], ADMIN, grpc.StatusCode.INVALID_ARGUMENT,
     ["not a valid path", "//[oops"]),
    ("resource name over 4 KiB", [sotw(CONFIG_DUMP, ["x" * 5000])], ADMIN, grpc.StatusCode.INVALID_ARGUMENT,
     ["resource name longer than 4096"]),
    ("bytes that are no protobuf", [b"\xff\xff\xff\xff"], ADMIN, grpc.StatusCode.INVALID_ARGUMENT,
     ["malformed request", "DiscoveryRequest"]),
    ("a type URL that is not UTF-8", [b"\x22\x02\xff\xfe"], ADMIN, grpc.StatusCode.INVALID_ARGUMENT,
     ["malformed request", "UTF-8"]),
    ("no credentials", [sotw(SYNCZ)], (), grpc.StatusCode.UNAUTHENTICATED, ["no bearer token", "Bearer"]),
    ("not a bearer token", [sotw(SYNCZ)], (("authorization", "Basic YWRtaW46YWRtaW4="),),
     grpc.StatusCode.UNAUTHENTICATED, ["Bearer <token>"]),
    ("a token istiod does not know", [sotw(SYNCZ)], bearer("forged"), grpc.StatusCode.UNAUTHENTICATED,
     ["invalid token"]),
    ("a node that does not match the token", [discovery_pb2.DiscoveryRequest(
        type_url=SYNCZ, node=client.istioctl_node("ns-1"))], ADMIN, grpc.StatusCode.PERMISSION_DENIED,
     ["authorization failed"]),
    ("a scoped token asking for a cluster-wide debug path", [discovery_pb2.DiscoveryRequest(
        type_url=DEBUG, resource_names=["configz"], node=client.istioctl_node("ns-1"))], bearer("ns-1-token"),
     grpc.StatusCode.PERMISSION_DENIED, ["not available"]),
    ("an error after two good answers on one stream", [sotw(SYNCZ), sotw(CONFIG_DUMP, ["x"]), sotw("bogus")],
     ADMIN, grpc.StatusCode.UNIMPLEMENTED, ["supported"]),
    ("a message over the size limit",
     [discovery_pb2.DiscoveryRequest(type_url=SYNCZ, node=NODE, response_nonce="n" * (3 << 20))],
     ADMIN, grpc.StatusCode.RESOURCE_EXHAUSTED, ["larger than max"]),
]


@pytest.fixture(scope="module")
def small_stack() -> Iterator[Background]:
    """One stack for the table: 2 replicas, a 2 MiB message limit."""
    with Background(lambda: stack(2, 6, max_message_mib=2)) as bg:
        yield bg


@pytest.mark.parametrize("use_delta", [False, True], ids=["sotw", "delta"])
@pytest.mark.parametrize(("what", "requests", "metadata", "code", "words"), BAD_REQUESTS,
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_gets_precise_status(
    small_stack: Background, use_delta: bool, what: str, requests: list[Request],
    metadata: tuple[tuple[str, str], ...], code: grpc.StatusCode, words: list[str],
) -> None:
    raw = [r if isinstance(r, bytes) else _as(r, use_delta).SerializeToString() for r in requests]
    if use_delta and what == "a type URL that is not UTF-8":
        raw = [b"\x12\x02\xff\xfe"]  # type_url is field 2 of DeltaDiscoveryRequest

    out = small_stack.run(ads_call(small_stack.value.address, raw, metadata=metadata, timeout=EVENT_TIMEOUT,
                                   delta=use_delta))
    assert out.code == code, f"{what}: {out.code.name}: {out.details}"
    for word in words:
        assert word.lower() in out.details.lower(), f"{what}: {out.details!r} lacks {word!r}"
    assert len(out.details.encode()) < 2048
    good_before = sum(1 for r in requests if not isinstance(r, bytes) and r.type_url in (SYNCZ, CONFIG_DUMP)
                      and code == grpc.StatusCode.UNIMPLEMENTED)
    assert len(out.responses) == good_before


def test_status_messages_are_capped_to_fit_a_trailer() -> None:
    """The safety net behind every status: a message is cut to 1 KiB of valid UTF-8, however long."""
    from istioctl_proxy.errors import _fit_trailer

    assert _fit_trailer("short") == "short"
    long = _fit_trailer("\u00e9" * 100_000)
    assert len(long.encode()) <= 1024 + 20 and long.endswith("(truncated)")
    long.encode("utf-8")


def _as(req: discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest,
        use_delta: bool) -> discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest:
    if not use_delta or isinstance(req, discovery_pb2.DeltaDiscoveryRequest):
        return req
    out = discovery_pb2.DeltaDiscoveryRequest(type_url=req.type_url, resource_names_subscribe=req.resource_names,
                                              response_nonce=req.response_nonce)
    if req.HasField("node"):
        out.node.CopyFrom(req.node)
    return out


# -- Malformed upstream answers ---------------------------------------------------------------------------------

Mangle = Callable[[str, bytes], bytes]


def _each_resource(change: Callable[[discovery_pb2.DiscoveryResponse], None]) -> Mangle:
    def mangle(type_url: str, body: bytes) -> bytes:
        resp = discovery_pb2.DiscoveryResponse.FromString(body)
        change(resp)
        return resp.SerializeToString()

    return mangle


def _set_values(value: Callable[[bytes], bytes]) -> Callable[[discovery_pb2.DiscoveryResponse], None]:
    def change(resp: discovery_pb2.DiscoveryResponse) -> None:
        for res in resp.resources:
            res.value = value(res.value)

    return change


def _retype(resp: discovery_pb2.DiscoveryResponse) -> None:
    for res in resp.resources:
        res.type_url = "type.googleapis.com/google.protobuf.Empty"


def _wrong_envelope_type(resp: discovery_pb2.DiscoveryResponse) -> None:
    resp.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster"


def _not_an_any(type_url: str, body: bytes) -> bytes:
    envelope = discovery_pb2.DiscoveryResponse(type_url=type_url, version_info="v").SerializeToString()
    return envelope + b"\x12\x04\xff\xff\xff\xff"  # field 2 (resources): four bytes that are no Any


GARBAGE: dict[str, Mangle] = {
    "random bytes": lambda t, b: b"\xde\xad\xbe\xef" * 16,
    "truncated answer": lambda t, b: b[: len(b) // 2 + 1] if len(b) > 2 else b"\x0a",
    "wrong type URL on the answer": _each_resource(_wrong_envelope_type),
    "resources that are not Anys": _not_an_any,
    "Anys of the wrong type": _each_resource(_retype),
    "truncated JSON / truncated values": _each_resource(_set_values(lambda v: v[: len(v) // 2])),
    "JSON of the wrong shape": _each_resource(_set_values(lambda v: b'{"totalClients": [1], "clients": 5}')),
    "JSON nested 100k deep": _each_resource(_set_values(lambda v: b"[" * 100_000 + b"]" * 100_000)),
    "empty answer": lambda t, b: b"",
    # Envelope strings that are not UTF-8: passed through, they would make the whole merged answer unreadable.
    "nonce not UTF-8": lambda t, b: b + b"\x2a\x02\xff\xfe",
    "version not UTF-8": lambda t, b: b + b"\x0a\x02\xff\xfe",
    "control plane id not UTF-8": lambda t, b: b + b"\x32\x04\x0a\x02\xff\xfe",
}
# Which garbage a request kind can notice. Resource bytes the proxy passes through without reading (an
# internal-debug body of a single-replica path, a config dump's content, a ClientConfig past its header)
# cannot be checked without decoding them; docs/security.md lists this.
UNNOTICED = {
    ("Anys of the wrong type", "config_dump"), ("Anys of the wrong type", "debug configz"),
    ("Anys of the wrong type", "debug syncz"), ("Anys of the wrong type", "debug adsz"),
    ("Anys of the wrong type", "debug proxy"),
    ("truncated JSON / truncated values", "syncz"), ("truncated JSON / truncated values", "config_dump"),
    ("truncated JSON / truncated values", "debug configz"), ("truncated JSON / truncated values", "debug proxy"),
    ("JSON of the wrong shape", "config_dump"), ("JSON of the wrong shape", "debug configz"),
    ("JSON of the wrong shape", "debug proxy"),
    ("JSON nested 100k deep", "config_dump"), ("JSON nested 100k deep", "debug configz"),
    ("JSON nested 100k deep", "debug proxy"),
    ("empty answer", "debug configz"),
    # zero bytes are a valid, empty DiscoveryResponse: "no proxies here", as far as the wire can tell.
    ("empty answer", "syncz"), ("empty answer", "config_dump"),
    # config_dump takes the first replica that holds the proxy; a garbage replica later in line is not read.
    ("resources that are not Anys", "config_dump"),
}
KINDS = ["syncz", "config_dump", "debug syncz", "debug adsz", "debug configz", "debug proxy"]


@pytest.fixture(scope="module")
def mesh() -> Iterator[Background]:
    """3 replicas; the one asked first, or the one asked last, will answer garbage."""
    with Background(lambda: stack(3, 12)) as bg:
        yield bg


BAD = {"index": 1}  # which replica answers garbage right now


def _bad_index(s: Stack, position: str) -> int:
    """The replica asked first (its address sorts first: single-replica paths and merge order) or last."""
    order = sorted(range(len(s.mesh.addresses)), key=lambda i: s.mesh.addresses[i])
    return order[0] if position == "first" else order[-1]


def _healthy_ids(s: Stack) -> set[str]:
    return {p.id for i, r in enumerate(s.replicas) if i != BAD["index"] for p in r.proxies}


async def _ask(s: Stack, kind: str) -> tuple[Outcome, str]:
    """One request of `kind` for data held by a healthy replica; returns the outcome and what to look for."""
    proxy = s.replicas[(BAD["index"] + 1) % len(s.replicas)].proxies[0].id
    reqs = {
        "syncz": sotw(SYNCZ), "config_dump": sotw(CONFIG_DUMP, [proxy]), "debug syncz": sotw(DEBUG, ["syncz"]),
        "debug adsz": sotw(DEBUG, ["adsz"]), "debug configz": sotw(DEBUG, ["configz"]),
        "debug proxy": sotw(DEBUG, [f"config_dump?proxyID={proxy}"]),
    }
    return await ads_call(s.address, [reqs[kind]], metadata=ADMIN, timeout=EVENT_TIMEOUT), proxy


def readable(s: Stack, kind: str, out: Outcome, proxy: str, strict: bool = True) -> str:
    """'' if the answer has what the healthy replicas hold, in a form istioctl reads; else why not.

    strict=False (a ClientConfig corrupted past its node id, which the proxy passes through unread): the
    healthy replicas' proxies must all be there, read as the proxy reads them."""
    if not out.ok:
        return f"{out.code.name}: {out.details}"
    resp = out.sotw()
    healthy = _healthy_ids(s)
    if kind == "syncz":
        ids = set()
        for res in resp.resources:
            if not strict:
                ids.add(wire.syncz_node_id(res.SerializeToString()))
                continue
            cfg = csds_pb2.ClientConfig()
            if not res.Unpack(cfg):  # what istioctl's status writer does with every resource
                return f"a resource istioctl cannot read: {res.type_url}"
            ids.add(cfg.node.id)
        return "" if healthy <= ids else f"missing {sorted(healthy - ids)[:3]}"
    if kind == "config_dump":
        return "" if len(resp.resources) == 7 else f"{len(resp.resources)} config dump resources"
    body = bytes(resp.resources[0].value)
    if kind == "debug syncz":
        # Entries of the bad replica may be anything JSON; the healthy replicas' must all be there.
        got = {entry.get("proxy") for entry in json.loads(body) if isinstance(entry, dict)}
        return "" if healthy <= got else "debug syncz misses healthy proxies"
    if kind == "debug adsz":
        clients = json.loads(body)["clients"]
        got = {str(c.get("connectionId", "")).rpartition("-")[0] for c in clients if isinstance(c, dict)}
        return "" if healthy <= got else "adsz misses the healthy replicas' clients"
    if kind == "debug configz":  # one replica's body, passed through: unchecked when that is the bad one
        return "" if body == b"[]" or not strict else f"configz body {body[:40]!r}"
    if not strict:  # valid JSON from the bad replica claiming the proxy: indistinguishable from a dump
        return ""
    return "" if json.loads(body).get("proxy") == proxy else f"debug dump body {body[:40]!r}"


@pytest.mark.parametrize("position", ["first", "last"])
@pytest.mark.parametrize("garbage", list(GARBAGE))
def test_malformed_upstream_answer_is_contained_to_that_replica(mesh: Background, garbage: str, position: str) -> None:
    s: Stack = mesh.value
    BAD["index"] = _bad_index(s, position)
    bad = s.mesh.addresses[BAD["index"]]
    s.replicas[BAD["index"]].faults.garbage = GARBAGE[garbage]
    try:
        for kind in KINDS:
            out, proxy = mesh.run(_ask(s, kind))
            strict = (garbage, kind) not in {("truncated JSON / truncated values", "syncz"),
                                             ("JSON of the wrong shape", "debug proxy")} | {
                (g, k) for g, k in UNNOTICED if k == "debug configz"}
            assert not (why := readable(s, kind, out, proxy, strict)), f"{garbage} / {kind}: {why}"
            named = [f for f in out.failed_replicas if f.startswith(bad)]
            if (garbage, kind) not in UNNOTICED and kind != "debug configz":
                assert named, f"{garbage} / {kind}: the bad replica is not named: {out.failed_replicas}"
            assert all(f.startswith(bad) for f in out.failed_replicas), out.failed_replicas
    finally:
        s.replicas[BAD["index"]].faults.garbage = None


def test_only_replica_answering_garbage_fails_the_call_precisely(mesh: Background) -> None:
    """Nothing healthy to answer: UNAVAILABLE naming what was wrong, not UNKNOWN and not an empty success."""
    s: Stack = mesh.value
    for r in s.replicas:
        r.faults.garbage = GARBAGE["random bytes"]
    try:
        for kind in ("syncz", "debug adsz"):
            out, _ = mesh.run(_ask(s, kind))
            assert out.code == grpc.StatusCode.UNAVAILABLE, (kind, out.code, out.details)
            assert "malformed DiscoveryResponse" in out.details
    finally:
        for r in s.replicas:
            r.faults.garbage = None


GARBAGE_CASES: collections.Counter[str] = collections.Counter()


@st.composite
def mangles(draw: st.DrawFn) -> Mangle:
    """A random way to corrupt a real answer: cut it, flip bytes, splice junk, or rewrite one field."""
    how = draw(st.sampled_from(["cut", "flip", "splice", "junk", "retype", "value"]))
    where = draw(st.floats(0, 1))
    junk = draw(st.binary(min_size=1, max_size=32))
    type_url = draw(st.sampled_from(["", "x", SYNCZ, DEBUG, "type.googleapis.com/envoy.service.status.v3.Client"]))

    def mangle(t: str, body: bytes) -> bytes:
        at = int(where * len(body))
        if how == "cut":
            return body[:at]
        if how == "flip":
            at = min(at, len(body) - 1)
            return body[:at] + bytes([body[at] ^ junk[0]]) + body[at + 1:] if body else junk
        if how == "splice":
            return body[:at] + junk + body[at:]
        if how == "junk":
            return junk
        resp = discovery_pb2.DiscoveryResponse.FromString(body)
        for res in resp.resources:
            if how == "retype":
                res.type_url = type_url
            else:
                res.value = res.value[: int(where * len(res.value))] + junk
        return resp.SerializeToString()

    mangle.__qualname__ = f"mangle({how}, at={where:.2f}, junk={junk!r}, type_url={type_url!r})"
    return mangle


@settings(deadline=None, max_examples=max(1, int(300 * env_float("FUZZ_SCALE", 1.0))),
          suppress_health_check=list(HealthCheck))
@given(mangle=mangles(), kind=st.sampled_from(KINDS), position=st.sampled_from(["first", "last"]))
def test_randomly_corrupted_answers_never_break_the_call(
    mesh: Background, mangle: Mangle, kind: str, position: str,
) -> None:
    """Whatever one replica sends, the call ends OK, every failure named is that replica, and the answer
    parses as a DiscoveryResponse; for the kinds the proxy reads (syncz, merged debug JSON, config_dump
    routing) the healthy replicas' data is all there."""
    s: Stack = mesh.value
    BAD["index"] = _bad_index(s, position)
    s.replicas[BAD["index"]].faults.garbage = mangle
    try:
        out, proxy = mesh.run(_ask(s, kind))
    finally:
        s.replicas[BAD["index"]].faults.garbage = None
    GARBAGE_CASES[kind] += 1
    assert out.ok, (out.code, out.details)
    assert all(f.startswith(s.mesh.addresses[BAD["index"]]) for f in out.failed_replicas)
    resp = out.sotw()
    assert resp.type_url == (SYNCZ if kind == "syncz" else CONFIG_DUMP if kind == "config_dump" else DEBUG)
    if kind == "syncz":
        ids = set()
        for r in resp.resources:
            try:
                ids.add(wire.syncz_node_id(r.SerializeToString()))
            except wire.WireError:
                # The bad replica's ClientConfig, corrupted past the bytes the proxy reads: passed through
                # unread (a known limit, docs/security.md). The healthy replicas' must all be there.
                GARBAGE_CASES["syncz: corrupt ClientConfig passed through"] += 1
        assert _healthy_ids(s) <= ids
    elif kind in ("debug syncz", "debug adsz", "config_dump"):
        assert not (why := readable(s, kind, out, proxy)), why


@pytest.fixture(scope="module", autouse=True)
def _figures() -> Iterator[None]:
    """Writes what this module's tests counted once they have all run, whatever their order."""
    GARBAGE_CASES.clear()
    yield
    record_figures("upstream-garbage", {"fixed_kinds": len(GARBAGE), "request_kinds": len(KINDS),
                                         "random_corruptions": dict(GARBAGE_CASES),
                                         "random_corruptions_total": sum(
                                             v for k, v in GARBAGE_CASES.items() if ":" not in k),
                                         "bad_request_table": len(BAD_REQUESTS) * 2})


def test_a_field_of_the_wrong_wire_type_is_not_a_resource() -> None:
    """Found by the fuzzer: field 2 as fixed32 parses (upb skips it as unknown), so a non-holder's answer
    looked like it held the proxy and the holder's dump was lost. It must count as malformed instead."""
    from istioctl_proxy.discovery import Replica
    from istioctl_proxy.merge import MergeContext, merge
    from istioctl_proxy.model import Answer
    from istioctl_proxy.policy import plan_request
    from istioctl_proxy.sim.simulator import SimProxy, SimReplica

    holder = SimReplica("istiod-1", proxies=[SimProxy("web", "team")])
    empty = SimReplica("istiod-0").config_dump(["web.team"], "")
    plan = plan_request(CONFIG_DUMP, ["web.team"])
    answers = [Answer(Replica("127.0.0.1:1"), b"\x15\x00\x00\x00\x00" + empty),
               Answer(Replica("127.0.0.1:2"), holder.config_dump(["web.team"], ""))]
    merged = merge(plan, answers, MergeContext())
    assert merged.resources == 7
    assert [a.replica.address for a, _ in merged.rejected] == ["127.0.0.1:1"]
