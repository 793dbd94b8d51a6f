"""The syncz fast paths (C-speed index, C-speed split) must give exactly what the field-by-field reader gives,
or step aside.

Correctness only: the speed is measured by bench/, not asserted here.
"""

from __future__ import annotations

import asyncio
import random
from itertools import pairwise

import pytest
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.status.v3 import csds_pb2
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from istioctl_proxy import merge, wire
from istioctl_proxy.discovery import Replica
from istioctl_proxy.model import Answer
from istioctl_proxy.policy import SYNCZ, plan_request
from istioctl_proxy.sim.simulator import SimProxy, SimReplica, make_mesh

PLAN = plan_request(SYNCZ, [])
CTX = merge.MergeContext()


def _edited_byte(body: bytes, rng: random.Random) -> bytes:
    """One random edit at a random place: a byte flipped, 1-4 bytes cut, or 1-4 random bytes inserted."""
    edited = bytearray(body)
    at = rng.randrange(len(edited))
    op = rng.random()
    if op < 0.5:
        edited[at] = rng.randrange(256)
    elif op < 0.75:
        del edited[at : at + rng.randint(1, 4)]
    else:
        edited[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
    return bytes(edited)


def answers_of(replicas: list[SimReplica], scope: str = "") -> list[Answer]:
    return [Answer(Replica(f"10.0.0.{i}:15012"), r.syncz(scope)) for i, r in enumerate(replicas)]


def exact(
    answers: list[Answer], ctx: merge.MergeContext = CTX, monkeypatch: pytest.MonkeyPatch | None = None
) -> merge.Merged:
    assert monkeypatch is not None
    with monkeypatch.context() as m:
        m.setattr(merge, "merge_syncz_fast", lambda *_a: None)
        m.setattr(merge, "merge_syncz_split", lambda *_a: None)
        return merge.merge(PLAN, answers, ctx)


def canonical(body: bytes) -> bytes:
    resp = discovery_pb2.DiscoveryResponse.FromString(body)
    resp.nonce = ""
    return resp.SerializeToString(deterministic=True)


@pytest.mark.parametrize("replicas,proxies,seed", [(1, 1, 1), (1, 50, 2), (3, 100, 3), (5, 333, 4), (5, 0, 5)])
def test_fast_path_equals_exact_reader(replicas: int, proxies: int, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    answers = answers_of(make_mesh(replicas, proxies, seed=seed))
    fast = merge.merge_syncz_fast(PLAN, [a for a in answers if a.ok], CTX)
    assert fast is not None, "a regular mesh must take the fast path"
    slow = exact(answers, monkeypatch=monkeypatch)
    assert fast.resources == slow.resources == proxies
    assert canonical(fast.body) == canonical(slow.body)
    assert not fast.rejected and not slow.rejected


def test_node_keys_are_the_node_ids() -> None:
    replica = make_mesh(1, 40, seed=9)[0]
    index = wire.syncz_fast_index(replica.syncz(""))
    assert index is not None and index.count == 40
    assert index.node_keys == [p.id for p in replica.proxies]


def _mesh_with(extra: dict[int, list[SimProxy]], seed: int = 11) -> list[SimReplica]:
    mesh = make_mesh(3, 30, seed=seed)
    for i, proxies in extra.items():
        mesh[i].proxies.extend(proxies)
    return mesh


def test_duplicates_step_aside_and_are_deduplicated(monkeypatch: pytest.MonkeyPatch) -> None:
    mesh = _mesh_with({0: [SimProxy("moving", "ns-1", states={"CDS": "STALE"}, updated=1e6)],
                       2: [SimProxy("moving", "ns-1", states={"CDS": "SYNCED"}, updated=2e6)]})
    answers = answers_of(mesh)
    assert merge.merge_syncz_fast(PLAN, answers, CTX) is None
    merged = merge.merge(PLAN, answers, CTX)
    assert merged.resources == 31
    assert canonical(merged.body) == canonical(exact(answers, monkeypatch=monkeypatch).body)


def test_duplicate_within_one_replica_steps_aside() -> None:
    p = SimProxy("twice", "ns-0", states={"CDS": "SYNCED"})
    answers = answers_of(_mesh_with({1: [p, p]}))
    assert merge.merge_syncz_fast(PLAN, answers, CTX) is None
    assert merge.merge(PLAN, answers, CTX).resources == 31


def test_a_resource_quoting_a_client_config_header_cannot_fool_the_index(monkeypatch: pytest.MonkeyPatch) -> None:
    # An error detail carrying the exact bytes the regex looks for, including a fake node id that collides
    # with a real proxy: the fast index must refuse and let the exact reader decide.
    url = wire.CLIENT_CONFIG_URL.decode()
    victim = make_mesh(3, 30, seed=11)[1].proxies[0].id
    fake = "\n" + chr(len(url)) + url + "\x12\x05\n\x03\n" + chr(len(victim)) + victim
    sneaky = SimProxy("sneaky", "ns-2", states={"LDS": "ERROR"}, error=fake)
    answers = answers_of(_mesh_with({0: [sneaky]}))
    assert wire.syncz_fast_index(answers[0].body or b"") is None
    merged = merge.merge(PLAN, answers, CTX)
    assert merged.resources == 31
    assert canonical(merged.body) == canonical(exact(answers, monkeypatch=monkeypatch).body)


def test_long_node_ids_take_the_exact_path() -> None:
    long_one = SimProxy("p" * 200, "ns-0", states={"CDS": "SYNCED"})
    answers = answers_of(_mesh_with({0: [long_one]}))
    assert wire.syncz_fast_index(answers[0].body or b"") is None
    assert merge.merge(PLAN, answers, CTX).resources == 31


def _raw_resource(any_msg: any_pb2.Any) -> bytes:
    return discovery_pb2.DiscoveryResponse(resources=[any_msg]).SerializeToString()


def test_non_utf8_node_id_is_rejected_as_before() -> None:
    # ClientConfig{node{id: b"\xff\xfe"}} packed by hand: protobuf would refuse to build it.
    node = b"\n\x02\xff\xfe"
    cfg = b"\n" + bytes([len(node)]) + node
    bad = _raw_resource(any_pb2.Any(type_url=wire.CLIENT_CONFIG_URL.decode(), value=cfg))
    good = make_mesh(2, 4, seed=3)
    answers = [Answer(Replica("a:1"), bad + good[0].syncz("")), Answer(Replica("b:1"), good[1].syncz(""))]
    assert wire.syncz_fast_index(answers[0].body or b"") is None
    merged = merge.merge(PLAN, answers, CTX)
    assert [why for _, why in merged.rejected] and merged.resources == 2


def test_malformed_and_wrong_type_answers_are_rejected_as_before() -> None:
    good = make_mesh(2, 4, seed=3)
    wrong_type = discovery_pb2.DiscoveryResponse(type_url="istio.io/debug/config_dump").SerializeToString()
    answers = [Answer(Replica("a:1"), b"\x12\xff\xff\xff"), Answer(Replica("b:1"), wrong_type),
               Answer(Replica("c:1"), good[0].syncz("")), Answer(Replica("d:1"), good[1].syncz(""))]
    merged = merge.merge(PLAN, answers, CTX)
    assert len(merged.rejected) == 2 and merged.resources == 4


def test_scoped_callers_always_take_the_exact_path() -> None:
    answers = answers_of(make_mesh(3, 30, seed=5))
    scoped = merge.MergeContext(scope="ns-1")
    assert merge.merge_syncz_fast(PLAN, answers, scoped) is None
    merged = merge.merge(PLAN, answers, scoped)
    assert 0 < merged.resources < 30


def test_random_meshes_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(42)
    for _ in range(20):
        mesh = make_mesh(rng.randint(1, 5), rng.randint(0, 60), seed=rng.randrange(10**6))
        if rng.random() < 0.3 and len(mesh) > 1 and mesh[0].proxies:
            mesh[-1].proxies.append(mesh[0].proxies[0])  # a proxy seen by two replicas
        answers = answers_of(mesh)
        fast_or_exact = merge.merge(PLAN, answers, CTX)
        assert canonical(fast_or_exact.body) == canonical(exact(answers, monkeypatch=monkeypatch).body)


# -- The split path: duplicates and scoped callers -----------------------------------------------------------


@pytest.fixture
def fixed_nonce(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every merged answer gets the same nonce, so that the paths can be compared byte for byte."""
    monkeypatch.setattr(merge, "_nonce", lambda *_a: "n")


def split_only(answers: list[Answer], ctx: merge.MergeContext = CTX) -> merge.Merged | None:
    return merge.merge_syncz_split(PLAN, [a for a in answers if a.ok], ctx)


@pytest.mark.usefixtures("fixed_nonce")
@pytest.mark.parametrize("scope", ["", "ns-1", "ns-9"])
def test_duplicates_and_scopes_take_the_split_path(scope: str, monkeypatch: pytest.MonkeyPatch) -> None:
    mesh = _mesh_with({0: [SimProxy("moving", "ns-1", states={"CDS": "STALE"}, updated=1e6)],
                       2: [SimProxy("moving", "ns-1", states={"CDS": "SYNCED"}, updated=2e6)]})
    answers = answers_of(mesh)
    ctx = merge.MergeContext(scope=scope)
    split = split_only(answers, ctx)
    assert split is not None, "a regular answer with a duplicate or a scope must not need the exact reader"
    slow = exact(answers, ctx, monkeypatch)
    assert split.body == slow.body and split.resources == slow.resources
    assert merge.merge(PLAN, answers, ctx).body == slow.body
    if scope == "ns-9":
        assert split.resources == 0


def test_the_newest_duplicate_wins_and_ties_keep_the_first(monkeypatch: pytest.MonkeyPatch) -> None:
    older = SimProxy("moving", "ns-1", states={"CDS": "STALE"}, updated=1e6)
    newer = SimProxy("moving", "ns-1", states={"CDS": "SYNCED"}, updated=2e6)
    tie = SimProxy("moving", "ns-1", states={"LDS": "SYNCED"}, updated=2e6)
    for extra in ({0: [newer], 1: [older]}, {0: [older], 2: [newer]}, {1: [newer], 2: [tie]}, {0: [tie, newer]}):
        answers = answers_of(_mesh_with(extra))
        split = split_only(answers)
        assert split is not None and split.resources == 31
        kept = [wire.client_config(r.SerializeToString())
                for r in discovery_pb2.DiscoveryResponse.FromString(split.body).resources]
        moving = [c for c in kept if c.node.id == "moving.ns-1"]
        assert len(moving) == 1
        assert canonical(split.body) == canonical(exact(answers, monkeypatch=monkeypatch).body)


def _envelope_first(body: bytes) -> bytes:
    """The same answer in the order Go writes it: version_info first, then the resources, then the rest."""
    resp = discovery_pb2.DiscoveryResponse.FromString(body)
    head = discovery_pb2.DiscoveryResponse(version_info=resp.version_info).SerializeToString()
    tail = discovery_pb2.DiscoveryResponse(type_url=resp.type_url, nonce=resp.nonce)
    tail.control_plane.CopyFrom(resp.control_plane)
    resources = discovery_pb2.DiscoveryResponse(resources=resp.resources).SerializeToString()
    return head + resources + tail.SerializeToString()


def _random_mesh(rng: random.Random) -> list[SimReplica]:
    mesh = make_mesh(rng.randint(1, 4), rng.randint(0, 40), seed=rng.randrange(10**6))
    everyone = [p for r in mesh for p in r.proxies]
    for _ in range(rng.choice([0, 0, 1, 3, 8])):
        if everyone:  # a proxy seen again, by another replica or the same one, newer, older or as new
            p = rng.choice(everyone)
            copy = SimProxy(p.pod, p.namespace, states={"CDS": rng.choice(["SYNCED", "STALE"])},
                            updated=p.updated + rng.choice([-5.0, 0.0, 5.0]))
            rng.choice(mesh).proxies.insert(rng.randint(0, 3), copy)
    if rng.random() < 0.3:  # no NAMESPACE metadata: in no namespace
        mesh[0].proxies.append(SimProxy("nons", "", states={"CDS": "SYNCED"}))
    if rng.random() < 0.3:  # a node of 128+ bytes: two-byte length prefixes
        mesh[-1].proxies.append(SimProxy("q" * rng.randint(100, 300), "ns-2", states={"CDS": "SYNCED"}))
    return mesh


@pytest.mark.usefixtures("fixed_nonce")
def test_random_duplicates_and_scopes_agree_byte_for_byte(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(1414)
    split_answered = 0
    for _ in range(150):
        mesh = _random_mesh(rng)
        answers = answers_of(mesh)
        if rng.random() < 0.5:
            answers = [Answer(a.replica, _envelope_first(a.body or b"")) for a in answers]
        ctx = merge.MergeContext(scope=rng.choice(["", "", "ns-0", "ns-1", "ns-3", "nowhere"]),
                                 memo=rng.choice([None, wire.SynczMemo()]))
        slow = exact(answers, ctx, monkeypatch)
        split = split_only(answers, ctx)
        if split is not None:
            split_answered += 1
            assert (split.body, split.resources) == (slow.body, slow.resources)
        assert merge.merge(PLAN, answers, ctx).body == slow.body
    assert split_answered == 150, "every regular answer takes the split path, duplicates and scopes included"


@pytest.mark.usefixtures("fixed_nonce")
def test_mangled_answers_agree_with_the_exact_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    # Random byte flips, cuts and insertions: the split path either steps aside or answers exactly as the exact
    # reader does (the same bytes, the same count, the same replicas rejected).
    rng = random.Random(77)
    for _ in range(300):
        mesh = make_mesh(2, rng.randint(1, 12), seed=rng.randrange(10**6))
        mesh[1].proxies.append(mesh[0].proxies[0])
        answers = answers_of(mesh)
        body = answers[0].body or b""
        for _ in range(rng.randint(1, 3)):
            body = _edited_byte(body, rng)
        answers[0] = Answer(answers[0].replica, body)
        ctx = merge.MergeContext(scope=rng.choice(["", "ns-1"]))
        slow = exact(answers, ctx, monkeypatch)
        split = split_only(answers, ctx)
        if split is not None:
            assert (split.body, split.resources, split.rejected) == (slow.body, slow.resources, [])
            assert not slow.rejected
        got = merge.merge(PLAN, answers, ctx)
        assert (got.body, got.resources, [why for _, why in got.rejected]) == \
            (slow.body, slow.resources, [why for _, why in slow.rejected])


@pytest.mark.usefixtures("fixed_nonce")
def test_quoted_headers_and_stray_fields_break_the_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    url = wire.CLIENT_CONFIG_URL.decode()
    victim = make_mesh(3, 30, seed=11)[1].proxies[0].id
    fake = "\n" + chr(len(url)) + url + "\x12\x05\n\x03\n" + chr(len(victim)) + victim
    sneaky = SimProxy("sneaky", "ns-2", states={"LDS": "ERROR"}, error=fake)
    answers = answers_of(_mesh_with({0: [sneaky]}))
    assert wire.syncz_split(answers[0].body or b"", wire.SynczMemo()) is None
    ctx = merge.MergeContext(scope="ns-2")
    assert merge.merge(PLAN, answers, ctx).body == exact(answers, ctx, monkeypatch).body
    # A field between two resources (the exact reader keeps it out of a cut answer): not cut, exact decides.
    body = answers[1].body or b""
    view = wire.view_response(body)
    cut = view.resources[1][0]
    stray = body[:cut] + discovery_pb2.DiscoveryResponse(version_info="x").SerializeToString() + body[cut:]
    assert wire.syncz_split(stray, wire.SynczMemo()) is None
    answers[1] = Answer(answers[1].replica, stray)
    assert merge.merge(PLAN, answers, ctx).body == exact(answers, ctx, monkeypatch).body


def _resource_spans(body: bytes) -> list[tuple[int, int]]:
    """(start, end) of each resource's ClientConfig value in a syncz answer (the bytes the scope reads)."""
    view = wire.view_response(body)
    out = []
    for start, end in view.resource_values:
        any_mv = memoryview(body)[start:end]
        for number, _w, _s, value_start, value_end in wire.iter_fields(any_mv):
            if number == 2:
                out.append((start + value_start, start + value_end))
    return out


def _namespaces_as_the_caller_reads_them(body: bytes) -> list[str]:
    out = []
    for res in discovery_pb2.DiscoveryResponse.FromString(body).resources:
        cc = csds_pb2.ClientConfig()
        try:
            res.Unpack(cc)
        except DecodeError:
            continue  # istioctl fails on it: shows nothing of it, in no namespace
        out.append(cc.node.metadata.fields["NAMESPACE"].string_value if "NAMESPACE" in cc.node.metadata.fields
                   else "")
    return out


_HOSTILE_NODE_BYTES = [
    b"\n\x00",  # a second (empty) node
    b"\x0a\x0c\x3a\x0a\n\x08\n\x02NS\x12\x02\x1a\x00",  # a second node with metadata
    b"\x4b\x08\x01\x4c",  # an unknown group
    b"\x0b",  # an unterminated group
    b"\x08\x05",  # field 1 as a varint
    b"\x1a\x09NAMESPACE",  # NAMESPACE quoted in another field
]


@pytest.mark.usefixtures("fixed_nonce")
def test_scoped_callers_with_hostile_node_bytes_agree_and_see_only_their_namespace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A hostile replica edits the ClientConfigs the scope reads (the node, fields around it): the split path
    # steps aside or answers exactly as the exact reader, and the caller never decodes another namespace's proxy.
    rng = random.Random(2718)
    split_answered = 0
    for _ in range(300):
        mesh = make_mesh(2, rng.randint(1, 12), seed=rng.randrange(10**6))
        if rng.random() < 0.5:
            mesh[1].proxies.append(mesh[0].proxies[0])
        answers = answers_of(mesh)
        body = answers[0].body or b""
        spans = _resource_spans(body)
        pieces, at = [], 0
        edits = sorted(rng.sample(spans, rng.randint(1, min(3, len(spans)))))
        for start, end in edits:
            pieces.append(body[at:start])
            value = bytearray(body[start:end])
            op = rng.random()
            if op < 0.4:  # a byte of the node or around it changed
                i = rng.randrange(min(len(value), 160))
                value[i] = rng.randrange(256)
            elif op < 0.7:  # bytes after the node (or inside it, at a random point)
                i = rng.choice([len(value), rng.randrange(len(value) + 1)])
                value[i:i] = rng.choice(_HOSTILE_NODE_BYTES)
            else:  # the node given another namespace's NAMESPACE bytes
                value = bytearray(bytes(value).replace(b"ns-2", b"ns-1").replace(b"ns-0", b"ns-1")) \
                    if rng.random() < 0.5 else bytearray(bytes(value).replace(b"ns-1", b"ns-3"))
            # The lengths that enclose the value (the Any's and the resource field's) follow the edit, as a
            # careful attacker would write them; sometimes they do not.
            if rng.random() < 0.8:
                any_start = body.rfind(wire._URL_HEADER, 0, start)
                head_start = body.rfind(b"\x12", 0, any_start)
                value_head = b"\x12" + wire._varint_bytes(len(value))
                any_bytes = body[any_start:start - len(b"\x12" + wire._varint_bytes(end - start))] + value_head
                any_bytes += bytes(value)
                pieces[-1] = pieces[-1][: len(pieces[-1]) - (start - head_start)]
                pieces.append(b"\x12" + wire._varint_bytes(len(any_bytes)) + any_bytes)
            else:
                pieces.append(bytes(value))
            at = end
        pieces.append(body[at:])
        answers[0] = Answer(answers[0].replica, b"".join(pieces))
        ctx = merge.MergeContext(scope="ns-1", memo=rng.choice([None, wire.SynczMemo()]))
        slow = exact(answers, ctx, monkeypatch)
        split = split_only(answers, ctx)
        if split is not None:
            split_answered += 1
            assert (split.body, split.resources, split.rejected) == (slow.body, slow.resources, [])
        got = merge.merge(PLAN, answers, ctx)
        assert (got.body, got.resources, [why for _, why in got.rejected]) == \
            (slow.body, slow.resources, [why for _, why in slow.rejected])
        assert set(_namespaces_as_the_caller_reads_them(got.body)) <= {"ns-1"}
    assert split_answered > 30, "the split path must answer some edited answers, not only step aside"


@pytest.mark.usefixtures("fixed_nonce")
def test_duplicates_reuse_the_fast_index_ids_only_where_they_are_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    # With a duplicate the fast path steps aside after reading every node id; the split path reuses those ids.
    # A node whose own length ends inside its id field: the fast regex still reads the whole id, the exact reader
    # finds the id field truncated and rejects the replica. The split path must not take the regex's word for it.
    mesh = _mesh_with({0: [SimProxy("moving", "ns-1", states={"CDS": "STALE"}, updated=1e6)],
                       2: [SimProxy("moving", "ns-1", states={"CDS": "SYNCED"}, updated=2e6)]})
    answers = answers_of(mesh)
    used: list[bool] = []
    real = merge._indexed_ids
    monkeypatch.setattr(merge, "_indexed_ids", lambda *a: used.append(real(*a) is not None) or real(*a))
    assert merge.merge(PLAN, answers, CTX).body == exact(answers, CTX, monkeypatch).body
    assert used == [True], "a duplicate must not make the split path read every node again"
    body = bytearray(answers[1].body or b"")
    at = body.find(wire._URL_HEADER) + len(wire._URL_HEADER)
    assert body[at] == 0x12
    _, at = wire._varint(bytes(body), at + 1)
    assert body[at] == 0x0A and body[at + 2] == 0x0A  # the node's tag and length, then its id's tag
    body[at + 1] = body[at + 3]  # the node as long as the id's length + 1: its id field runs one byte past it
    answers[1] = Answer(answers[1].replica, bytes(body))
    assert wire.syncz_fast_index(answers[1].body or b"") is None  # the regex reads the id, the chain proof refuses it
    slow = exact(answers, CTX, monkeypatch)
    assert [why for _, why in slow.rejected] == ["malformed syncz resource: truncated or invalid field"]
    got = merge.merge(PLAN, answers, CTX)
    assert (got.body, [why for _, why in got.rejected]) == (slow.body, [why for _, why in slow.rejected])


@pytest.mark.usefixtures("fixed_nonce")
def test_the_fast_path_agrees_with_the_exact_reader_on_a_node_shorter_than_its_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Once a strict xfail: the regex read the whole id, the fast path passed the answer through (istioctl would fail
    # to decode all of it) where the exact reader rejects that replica and the caller gets the others' proxies.
    answers = answers_of(make_mesh(3, 30, seed=11))
    body = bytearray(answers[1].body or b"")
    at = body.find(wire._URL_HEADER) + len(wire._URL_HEADER)
    _, at = wire._varint(bytes(body), at + 1)
    body[at + 1] = body[at + 3]  # the node as long as its id's length + 1: the id field runs one byte past it
    answers[1] = Answer(answers[1].replica, bytes(body))
    assert wire.syncz_fast_index(answers[1].body or b"") is None
    assert merge.merge_syncz_fast(PLAN, answers, CTX) is None
    slow = exact(answers, CTX, monkeypatch)
    assert [why for _, why in slow.rejected] == ["malformed syncz resource: truncated or invalid field"]
    got = merge.merge(PLAN, answers, CTX)
    assert (got.body, [why for _, why in got.rejected]) == (slow.body, [why for _, why in slow.rejected])
    assert got.resources == 20  # the two other replicas' proxies


@pytest.mark.usefixtures("fixed_nonce")
def test_the_fast_path_agrees_with_the_exact_reader_on_a_resource_swallowing_the_next_header(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The first resource's length grown by the second one's tag, length and URL field: upb reads one Any fewer,
    # the exact reader finds the next "resource" truncated. Neither may pass through.
    answers = answers_of(make_mesh(2, 10, seed=12))
    body = answers[0].body or b""
    (start, end), (nxt, _) = wire.view_response(body).resources[:2]
    _, any_at = wire._varint(body, start + 1)
    swallowed = end - any_at + (body.find(wire._URL_HEADER, nxt) + len(wire._URL_HEADER) - nxt)
    edited = body[:start] + b"\x12" + wire._varint_bytes(swallowed) + body[any_at:]
    answers[0] = Answer(answers[0].replica, edited)
    assert wire.syncz_fast_index(edited) is None
    slow = exact(answers, CTX, monkeypatch)
    assert [why for _, why in slow.rejected] and not merge.merge_syncz_fast(PLAN, answers, CTX)
    got = merge.merge(PLAN, answers, CTX)
    assert (got.body, got.resources, [why for _, why in got.rejected]) == \
        (slow.body, slow.resources, [why for _, why in slow.rejected])


def _resource_fields(body: bytes) -> list[tuple[int, int]]:
    try:
        return wire.view_response(body).resources
    except wire.WireError:
        return []  # an earlier edit left nothing to read: the next edit is a random one


def _reframed_resource(field: bytes, rng: random.Random, next_header: int) -> bytes:
    """A resource field (tag, length, Any{URL, ClientConfig{node, rest}}) with its node, id or metadata edited and
    its three length prefixes (the resource's, the value's, the node's) rewritten: to the new lengths, or wrong
    on purpose (a node shorter than its id field, a resource swallowing the next one's header, off by a few)."""
    _, at = wire._varint(field, 1)
    any_bytes = field[at:]
    url = any_bytes[: len(wire._URL_HEADER)]
    _, value_at = wire._varint(any_bytes, len(url) + 1)
    value = any_bytes[value_at:]
    node_length, node_at = wire._varint(value, 1)
    node, rest = bytearray(value[node_at : node_at + node_length]), value[node_at + node_length :]
    id_length = node[1]
    shape = rng.random()
    if shape < 0.25:  # a byte of the id's length, the id or the metadata
        node[rng.randrange(1, len(node))] = rng.randrange(256)
    elif shape < 0.4:  # the id cut to a prefix of itself, its length byte following or not
        cut = rng.randint(0, id_length)
        node[2 : 2 + id_length] = node[2 : 2 + cut]
        node[1] = cut if rng.random() < 0.7 else node[1]
    elif shape < 0.55:  # bytes inserted in the node (a second id, a group, a varint field 1)
        i = rng.randrange(len(node) + 1)
        node[i:i] = rng.choice([b"\n\x01x", b"\x0b", b"\x08\x05", b"\x4b\x08\x01\x4c", b"\n\x00"])
    elif shape < 0.7:  # bytes cut out of the node
        i = rng.randrange(len(node))
        del node[i : i + rng.randint(1, 3)]

    def length(true: int, kind: str) -> int:
        r = rng.random()
        if r < 0.6:
            return true
        if kind == "node" and r < 0.8:
            return rng.randint(0, 2 + id_length)  # the node ends inside (or just after) its id field
        if kind == "resource" and r < 0.8:
            return true + next_header  # the resource swallows the next resource's tag and length
        return max(0, true + rng.choice([-3, -2, -1, 1, 2, 3]))

    value = b"\n" + wire._varint_bytes(length(len(node), "node")) + bytes(node) + rest
    any_bytes = url + b"\x12" + wire._varint_bytes(length(len(value), "value")) + value
    return b"\x12" + wire._varint_bytes(length(len(any_bytes), "resource")) + any_bytes


def _mangled(body: bytes, rng: random.Random) -> bytes:
    """The body with one to three edits: random bytes anywhere, or a resource's node/id/metadata re-framed."""
    for _ in range(rng.randint(1, 3)):
        spans = _resource_fields(body) if rng.random() < 0.7 else []
        if spans:  # the spans of the current body (an earlier edit may have left none to read)
            k = rng.randrange(len(spans))
            start, end = spans[k]
            nxt = spans[k + 1][1] - spans[k + 1][0] if k + 1 < len(spans) else 0
            header = len(wire._varint_bytes(nxt)) + 1 + len(wire._URL_HEADER) if nxt else rng.randint(1, 5)
            try:
                body = body[:start] + _reframed_resource(body[start:end], rng, header) + body[end:]
                continue
            except (IndexError, ValueError, wire.WireError):
                pass  # an earlier edit left this resource irregular: a random edit instead
        body = _edited_byte(body, rng)
    return body


@pytest.mark.usefixtures("fixed_nonce")
@pytest.mark.parametrize("seed", [14, 15, 16, 17, 18, 19])
def test_the_fast_path_agrees_with_the_exact_reader_on_mangled_answers(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Unscoped callers, mostly without duplicates: the fast path (fast index + pass-through) answers or steps aside;
    # when it answers it must be the exact reader's answer, and the merge (whoever answers) must be it too: the same
    # bytes, the same count, the same replicas rejected for the same reasons (a bad replica costs only its part).
    rng = random.Random(seed)
    fast_answered = 0
    for _ in range(200):
        mesh = make_mesh(rng.randint(1, 3), rng.randint(1, 15), seed=rng.randrange(10**6))
        if rng.random() < 0.2 and len(mesh) > 1:
            mesh[1].proxies.append(mesh[0].proxies[0])
        answers = answers_of(mesh)
        for k in rng.sample(range(len(answers)), rng.randint(1, len(answers))):
            if rng.random() < 0.8:
                answers[k] = Answer(answers[k].replica, _mangled(answers[k].body or b"", rng))
        slow = exact(answers, CTX, monkeypatch)
        fast = merge.merge_syncz_fast(PLAN, answers, merge.MergeContext())
        if fast is not None:
            fast_answered += 1
            assert (fast.body, fast.resources, fast.rejected, slow.rejected) == (slow.body, slow.resources, [], [])
        early = merge.MergeContext(memo=rng.choice([None, wire.SynczMemo()]))
        for answer in answers:
            merge.index_early(PLAN, early, answer)
        for ctx in (CTX, early):
            got = merge.merge(PLAN, answers, ctx)
            assert (got.body, got.resources, [(a.replica, why) for a, why in got.rejected]) == \
                (slow.body, slow.resources, [(a.replica, why) for a, why in slow.rejected])
    assert fast_answered > 20, "the fast path must answer some answers an edit left regular, not only step aside"


def test_an_unknown_group_in_a_client_config_is_shown_as_istioctl_decodes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # Protobuf (istioctl's Go decoder too) keeps a well-formed group of an unknown field as an unknown field:
    # the node is the one the scope read, so the proxy is shown, by both paths alike (it used to cost the whole
    # replica: the field reader refused the wire type).
    mesh = make_mesh(2, 8, seed=21)
    body = mesh[0].syncz("")
    start, end = _resource_spans(body)[0]
    value = body[start:end] + b"\x4b\x08\x01\x4c"
    any_start = body.rfind(wire._URL_HEADER, 0, start)
    head_start = body.rfind(b"\x12", 0, any_start)
    any_bytes = body[any_start:start - len(b"\x12" + wire._varint_bytes(end - start))]
    any_bytes += b"\x12" + wire._varint_bytes(len(value)) + value
    edited = body[:head_start] + b"\x12" + wire._varint_bytes(len(any_bytes)) + any_bytes + body[end:]
    answers = [Answer(Replica("10.0.0.0:15012"), edited), Answer(Replica("10.0.0.1:15012"), mesh[1].syncz(""))]
    scope = mesh[0].proxies[0].namespace
    ctx = merge.MergeContext(scope=scope)
    slow = exact(answers, ctx, monkeypatch)
    assert not slow.rejected
    assert mesh[0].proxies[0].id in [c.node.id for c in (
        wire.client_config(r.SerializeToString())
        for r in discovery_pb2.DiscoveryResponse.FromString(slow.body).resources)]
    split = split_only(answers, ctx)
    assert split is not None and split.resources == slow.resources


def test_node_facts_are_remembered_and_bounded() -> None:
    replica = make_mesh(1, 20, seed=4)[0]
    memo = wire.SynczMemo(max_entries=30)
    split = wire.syncz_split(replica.syncz(""), memo)
    assert split is not None
    first = memo.facts(split.nodes)
    assert first == [(p.id, p.namespace) for p in replica.proxies]
    assert memo.facts(split.nodes) == first and len(memo._facts) == 20
    memo.facts([n + b"\x28\x00" for n in split.nodes])  # 20 more nodes (a trailing field): over the bound
    assert len(memo._facts) <= 30


# -- Reading each answer as it arrives (the hop) ---------------------------------------------------------------


async def test_each_answer_is_read_while_the_others_are_still_in_transit() -> None:
    from istioctl_proxy.fanout import FanOut

    mesh = make_mesh(2, 30, seed=8)
    bodies = {f"10.0.0.{i}:15012": r.syncz("") for i, r in enumerate(mesh)}
    straggler_may_answer = asyncio.Event()
    first_read = asyncio.Event()

    class Pool:
        last_error: dict[str, str] = {}

        async def ask(self, replica: Replica, request: bytes, metadata: object, timeout: float) -> bytes:
            if replica.address.endswith("1:15012"):
                await straggler_may_answer.wait()
            return bodies[replica.address]

    ctx = merge.MergeContext()

    def on_each(answer: Answer) -> None:
        merge.index_early(PLAN, ctx, answer)
        first_read.set()

    replicas = [Replica(address) for address in bodies]
    fan = asyncio.create_task(FanOut(Pool()).all(replicas, b"", (), 5.0, on_each=on_each))  # type: ignore[arg-type]
    await first_read.wait()
    # Before the straggler answered, the first answer is already indexed.
    assert list(ctx.early) == ["10.0.0.0:15012"] and not fan.done()
    assert isinstance(ctx.early["10.0.0.0:15012"], wire.SynczIndex)
    straggler_may_answer.set()
    answers = await fan
    assert set(ctx.early) == set(bodies)
    merged = merge.merge(PLAN, answers, ctx)
    assert canonical(merged.body) == canonical(merge.merge(PLAN, answers, CTX).body) and merged.resources == 30


@pytest.mark.usefixtures("fixed_nonce")
@pytest.mark.parametrize("scope", ["", "ns-1"])
def test_early_readings_are_used_and_change_nothing(scope: str, monkeypatch: pytest.MonkeyPatch) -> None:
    answers = answers_of(_mesh_with({0: [SimProxy("long" * 40, "ns-1", states={"CDS": "SYNCED"})]}))
    ctx = merge.MergeContext(scope=scope, memo=wire.SynczMemo())
    for answer in answers:
        merge.index_early(PLAN, ctx, answer)
    with monkeypatch.context() as m:
        m.setattr(wire, "syncz_fast_index", lambda *_a: pytest.fail("read again after the fan-out"))
        if scope:
            m.setattr(wire, "syncz_split", lambda *_a: pytest.fail("cut again after the fan-out"))
        early = merge.merge(PLAN, answers, ctx)
    assert early.body == merge.merge(PLAN, answers, merge.MergeContext(scope=scope)).body


def _client_config_answer(*copies: tuple[str, int, int]) -> bytes:
    """A syncz answer whose resources are ClientConfigs of these (node id, last_updated seconds, nanos)."""
    resp = discovery_pb2.DiscoveryResponse(type_url=SYNCZ, version_info="v1")
    for node_id, seconds, nanos in copies:
        cfg = csds_pb2.ClientConfig()
        cfg.node.id = node_id
        cfg.generic_xds_configs.add(type_url="CDS").last_updated.FromNanoseconds(0)
        cfg.generic_xds_configs[0].last_updated.seconds = seconds
        cfg.generic_xds_configs[0].last_updated.nanos = nanos  # protobuf lets any int32 through, as Go does
        any_msg = any_pb2.Any()
        any_msg.Pack(cfg)
        resp.resources.append(any_msg)
    return resp.SerializeToString()


@pytest.mark.usefixtures("fixed_nonce")
def test_a_duplicate_with_a_stamp_out_of_timestamp_range_does_not_fail_the_merge(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A copy whose last_updated has nanos ≥ 1e9 (or seconds past year 9999) made ToNanoseconds raise ValueError:
    # the whole merge failed for every caller. Stamps are now compared as the numbers on the wire, on every path.
    for bad in ((1, 2_000_000_000), (10**12, 0), (-(10**12), -5)):
        answers = [Answer(Replica("10.0.0.1:15012"), _client_config_answer(("a.ns-1", 5, 0), ("b.ns-1", 1, 0))),
                   Answer(Replica("10.0.0.2:15012"), _client_config_answer(("a.ns-1", *bad)))]
        slow = exact(answers, CTX, monkeypatch)
        got = merge.merge(PLAN, answers, CTX)
        assert got.body == slow.body and got.resources == slow.resources == 2 and not got.rejected
        kept = [wire.syncz_node_id(r.SerializeToString())
                for r in discovery_pb2.DiscoveryResponse.FromString(got.body).resources]
        assert sorted(kept) == ["a.ns-1", "b.ns-1"]
        newest = bad[0] * 10**9 + bad[1] > 5 * 10**9
        copy = discovery_pb2.DiscoveryResponse.FromString(got.body).resources[-1 if newest else 0]
        assert wire.client_config(copy.SerializeToString()).generic_xds_configs[0].last_updated.seconds == \
            (bad[0] if newest else 5)


def test_the_fast_index_counts_one_id_per_resource(monkeypatch: pytest.MonkeyPatch) -> None:
    # The fast index takes its ids from one upb parse that collects every id field of every node of every value:
    # as many as resources only if each resource has just the one its layout shows. A second id field (protobuf
    # keeps the last, the exact reader the first), a second node or a second value must make it step aside.
    def resource(node: bytes, after_node: bytes = b"", after_value: bytes = b"") -> bytes:
        value = b"\n" + wire._varint_bytes(len(node)) + node + after_node
        body = wire._URL_HEADER + b"\x12" + wire._varint_bytes(len(value)) + value + after_value
        return b"\x12" + wire._varint_bytes(len(body)) + body

    def answer(*resources: bytes) -> bytes:
        return b"".join(resources) + discovery_pb2.DiscoveryResponse(type_url=SYNCZ).SerializeToString()

    plain = resource(b"\n\x05a.ns1")
    index = wire.syncz_fast_index(answer(plain, resource(b"\n\x05b.ns1")))
    assert index is not None and index.node_keys == ["a.ns1", "b.ns1"]
    for hostile in (resource(b"\n\x05b.ns1\n\x05c.ns1"),  # a second id field in the node
                    resource(b"\n\x05b.ns1", after_node=b"\n\x07\n\x05c.ns1"),  # a second node
                    resource(b"\n\x05b.ns1", after_value=b"\x12\x07\n\x05\n\x03c.x"),  # a second value
                    resource(b"\n\x05b.ns\xff")):  # an id that is not UTF-8
        raw = answer(plain, hostile)
        assert wire.syncz_fast_index(raw) is None, hostile
        answers = [Answer(Replica("10.0.0.1:15012"), raw), Answer(Replica("10.0.0.2:15012"), answer(plain))]
        slow = exact(answers, CTX, monkeypatch)
        got = merge.merge(PLAN, answers, CTX)
        assert (canonical(got.body), got.resources, [w for _, w in got.rejected]) == \
            (canonical(slow.body), slow.resources, [w for _, w in slow.rejected])


# -- The duplicates' positions (merge._copies), against a plain count -----------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 12), max_size=40), st.lists(st.integers(0, 40), max_size=4))
def test_copies_lists_every_id_seen_twice_with_its_positions_ascending(ids: list[int], cuts: list[int]) -> None:
    # Any number of answers (cut at `cuts`), an id twice within one of them or across them.
    names = [f"app-{i}.ns" for i in ids]
    bounds = [0, *sorted(min(c, len(names)) for c in cuts), len(names)]
    counts = [b - a for a, b in pairwise(bounds)]
    expected = {k: [g for g, n in enumerate(names) if n == k] for k in dict.fromkeys(names)}
    assert merge._copies(names, counts) == {k: v for k, v in expected.items() if len(v) > 1}


def test_copies_of_a_mesh_with_duplicates_within_and_across_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    # The merge agrees with the exact reader when one id is twice on one replica and thrice across replicas.
    mesh = make_mesh(3, 30, seed=11)
    mesh[0].proxies.append(mesh[0].proxies[0])
    mesh[1].proxies.append(mesh[0].proxies[0])
    mesh[2].proxies.append(mesh[1].proxies[3])
    answers = answers_of(mesh)
    slow = exact(answers, CTX, monkeypatch)
    split = merge.merge_syncz_split(PLAN, answers, CTX)
    assert split is not None and canonical(split.body) == canonical(slow.body)
    assert split.resources == slow.resources == 30


def test_node_facts_too_many_to_remember_are_read_and_not_kept() -> None:
    replica = make_mesh(1, 20, seed=5)[0]
    memo = wire.SynczMemo(max_entries=5)
    split = wire.syncz_split(replica.syncz(""), memo)
    assert split is not None
    memo.facts(split.nodes[:3])  # remembered
    assert memo.facts(split.nodes) == [(p.id, p.namespace) for p in replica.proxies]  # 17 new: read, not kept
    assert len(memo._facts) == 0  # the bound cleared it; the 17 were over it
    assert memo.facts(split.nodes[:3]) == [(p.id, p.namespace) for p in replica.proxies[:3]]


# -- One memo across calls ------------------------------------------------------------------------------------


@pytest.mark.usefixtures("fixed_nonce")
def test_scoped_merges_through_one_memo_agree_as_the_mesh_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    # One memo across calls, as the Aggregator holds it: between calls proxies move to a namespace of the same
    # length (the same node lengths, other bytes), stamps change (the same nodes, another copy wins), proxies
    # come and go, and a replica sends hostile bytes. Every call agrees with the exact reader.
    rng = random.Random(5150)
    memo = wire.SynczMemo()
    mesh = make_mesh(3, 24, seed=77)
    moving = next(p for p in mesh[0].proxies if p.namespace == "ns-1")
    copies = [moving, SimProxy(moving.pod, "ns-1", states={"CDS": "SYNCED"}, updated=moving.updated + 50)]
    mesh[2].proxies.append(copies[1])
    for step in range(120):
        op = rng.random()
        everyone = [p for r in mesh for p in r.proxies]
        if op < 0.3:  # a copy of a proxy seen twice becomes the newer or the older one
            p = rng.choice(copies) if rng.random() < 0.7 else rng.choice(everyone)
            p.updated += rng.choice([-100.0, 100.0])
        elif op < 0.45:  # a proxy moves to another namespace of the same length
            p = rng.choice(everyone)
            p.namespace = rng.choice(["ns-0", "ns-1", "ns-2", "ns-3"])
        elif op < 0.55:  # a proxy leaves, or one arrives (sometimes as a second copy)
            r = rng.choice(mesh)
            if r.proxies and rng.random() < 0.5:
                r.proxies.pop(rng.randrange(len(r.proxies)))
            else:
                q = rng.choice(everyone)
                r.proxies.insert(rng.randint(0, len(r.proxies)), SimProxy(
                    q.pod if rng.random() < 0.5 else f"new-{step}", q.namespace, states={"LDS": "STALE"}))
        for r in mesh:
            r.invalidate()
        answers = answers_of(mesh)
        if rng.random() < 0.1:  # hostile bytes from one replica for this call only
            answers[0] = Answer(answers[0].replica, _edited_byte(answers[0].body or b"", rng))
        ctx = merge.MergeContext(scope=rng.choice(["ns-1", "ns-1", "ns-2", "nowhere", ""]), memo=memo)
        slow = exact(answers, ctx, monkeypatch)
        got = merge.merge(PLAN, answers, ctx)
        assert (got.body, got.resources, [why for _, why in got.rejected]) == \
            (slow.body, slow.resources, [why for _, why in slow.rejected]), step


@pytest.mark.usefixtures("fixed_nonce")
def test_copies_whose_bytes_did_not_change_are_not_decoded_again(monkeypatch: pytest.MonkeyPatch) -> None:
    mesh = make_mesh(3, 60, seed=23)
    mesh[2].proxies.append(SimProxy(mesh[0].proxies[5].pod, mesh[0].proxies[5].namespace, states={"CDS": "SYNCED"}))
    memo = wire.SynczMemo()
    ctx = merge.MergeContext(memo=memo)
    first = split_only(answers_of(mesh), ctx)
    assert first is not None and first.resources == 60
    decoded: list[int] = []
    read = wire.split_client_configs
    monkeypatch.setattr(wire, "split_client_configs", lambda fields: decoded.append(len(fields)) or read(fields))
    again = [Answer(a.replica, bytes(bytearray(a.body or b""))) for a in answers_of(mesh)]
    second = split_only(again, ctx)
    assert second is not None and (second.body, second.resources) == (exact(again, ctx, monkeypatch).body, 60)
    assert decoded == [], "copies whose bytes did not change were decoded again"
    mesh[2].proxies[-1].updated += 1000  # the other copy wins now: the same ids, other stamps
    for r in mesh:
        r.invalidate()
    again = answers_of(mesh)
    third = split_only(again, ctx)
    assert third is not None and (third.body, third.resources) == (exact(again, ctx, monkeypatch).body, 60)
    assert decoded == [1], "only the copy that changed is decoded"
