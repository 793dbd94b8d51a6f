"""Red team stop 21: hostile spellings against the syncz fast index (upb ids), the split path's reuse of its cuts,
the dedup by set intersection and the scoped slices. Each hostile answer is merged on every path and compared with
the exact reader's merge and with what protobuf (istioctl's rules) decodes. docs/security.md, "Attacks tried:
one-pass index and split reuse (red team stop 21)".
"""

from __future__ import annotations

import random

import pytest
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.status.v3 import csds_pb2
from google.protobuf.message import DecodeError

from istioctl_proxy import merge, wire
from istioctl_proxy.discovery import Replica
from istioctl_proxy.model import Answer
from istioctl_proxy.policy import SYNCZ, plan_request

PLAN = plan_request(SYNCZ, [])
V = wire._varint_bytes
# The ClientConfig URL header and a fake layout after it (value, node and id length prefixes): quoted in an id,
# it proposes one resource too many to the regexes.
FAKE_HEAD = wire._URL_HEADER + b"\x12\x07\n\x05\n\x03abc"


@pytest.fixture(autouse=True)
def fixed_nonce(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(merge, "_nonce", lambda *_a: "n")


def ld(number: int, value: bytes) -> bytes:
    """A length-delimited field."""
    return V(number << 3 | 2) + V(len(value)) + value


def ld_odd(rng: random.Random, number: int, value: bytes) -> bytes:
    """ld, sometimes with a non-minimal key or length varint (protobuf reads both; the regexes want minimal)."""
    def two(n: int) -> bytes:
        return bytes([n & 0x7F | 0x80, n >> 7])

    r = rng.random()
    if r < 0.05 and number << 3 < 0x80:
        return two(number << 3 | 2) + V(len(value)) + value
    if r < 0.1 and len(value) < 0x4000:
        return V(number << 3 | 2) + two(len(value)) + value
    return ld(number, value)


def struct_namespace(ns: str) -> bytes:
    """google.protobuf.Struct fields entry {NAMESPACE: string_value ns}."""
    return ld(1, ld(1, b"NAMESPACE") + ld(2, ld(3, ns.encode())))


def timestamp(seconds: int, nanos: int) -> bytes:
    out = b""
    if seconds:
        out += b"\x08" + V(seconds & (2**64 - 1))
    if nanos:
        out += b"\x10" + V(nanos & (2**64 - 1))
    return out


# Bytes a hostile replica adds to a Node after its id: a varint, an unknown group and an unterminated one's
# neighbour, a second id (protobuf keeps the last), an id in an unknown field and inside the metadata, a fixed32 /
# fixed64 field 1, an empty second id, a second metadata of another namespace (merged: its NAMESPACE last).
NODE_EXTRAS = [b"\x08\x05", b"\x0b\x0a\x01z\x0c", ld(1, b"other-id"), ld(2, b"cluster"), b"\x0d\x00\x00\x00\x00",
               ld(20, ld(1, b"x")), ld(3, struct_namespace("ns-2")), b"\x09" + b"\0" * 8, ld(1, b""),
               ld(3, ld(1, ld(1, b"x") + ld(2, ld(1, b"\n\x03abc")))),
               b"\x1b" + struct_namespace("ns-2") + b"\x1c",  # metadata as a group: an unknown field to both
               ld(3, ld(1, ld(1, b"NAMESPACE") + ld(2, b"\x18\x05"))),  # NAMESPACE's string_value as a varint
               b"\xa0\x01" + b"\xff" * 9 + b"\x01"]  # a ten-byte varint
# And to a ClientConfig after its node: an empty second node (upb merges it), a second node with an id, another
# with another namespace, field 1 as a varint or a group, an unknown field quoting a node.
CONFIG_EXTRAS = [ld(1, b""), ld(1, ld(1, b"x2")), ld(1, ld(3, struct_namespace("ns-2"))), b"\x08\x01", b"\x0b\x0c",
                 ld(9, ld(1, ld(1, b"zz")))]
# And to an Any after its value: a second value, a second type URL of another type, an unknown field.
ANY_EXTRAS = [ld(2, ld(1, ld(1, b"q"))), ld(1, b"type.googleapis.com/x"), ld(3, b"z")]


def hostile_node(rng: random.Random, node_id: bytes, ns: str) -> bytes:
    if rng.random() < 0.1:
        node_id += FAKE_HEAD[: rng.randint(1, len(FAKE_HEAD))]
    parts = [ld_odd(rng, 1, node_id)]
    metadata = struct_namespace(ns) if rng.random() < 0.7 else b""
    if rng.random() < 0.15:  # NAMESPACE twice: protobuf keeps the last map entry
        metadata += struct_namespace(rng.choice(["ns-1", "ns-2"]))
    if metadata:
        parts.append(ld(3, metadata))
    if rng.random() < 0.25:
        parts.insert(rng.randint(1, len(parts)), rng.choice(NODE_EXTRAS))
    return b"".join(parts)


def hostile_resource(rng: random.Random, node_id: bytes, ns: str) -> bytes:
    config = [ld_odd(rng, 1, hostile_node(rng, node_id, ns))]
    for _ in range(rng.randint(0, 2)):  # stamps: negative, out of range, today's a few ns apart, seconds twice
        stamp = timestamp(rng.choice([1_780_000_000, 1_780_000_001, -5, 2**40, 0]),
                          rng.choice([0, 10, 20, 999_999_999, 2_000_000_000, -1]))
        if rng.random() < 0.2:
            stamp += b"\x08" + V(rng.choice([1, 1_800_000_000]))
        config.append(ld(3, ld(1, b"CDS") + ld(5, stamp)))
    if rng.random() < 0.15:
        config.insert(rng.randint(1, len(config)), rng.choice(CONFIG_EXTRAS))
    value = b"".join(config)
    any_bytes = ld_odd(rng, 1, wire.CLIENT_CONFIG_URL) + ld_odd(rng, 2, value)
    if rng.random() < 0.05:
        any_bytes += rng.choice(ANY_EXTRAS)
    return ld_odd(rng, 2, any_bytes)


def hostile_answer(rng: random.Random, proxies: list[tuple[bytes, str]]) -> bytes:
    envelope = discovery_pb2.DiscoveryResponse(type_url=SYNCZ, version_info=rng.choice(["v1", "v2"]))
    resources = b"".join(hostile_resource(rng, node_id, ns) for node_id, ns in proxies)
    head = bytes(envelope.SerializeToString())
    return resources + head if rng.random() < 0.7 else head + resources


def exact(answers: list[Answer], ctx: merge.MergeContext, monkeypatch: pytest.MonkeyPatch) -> merge.Merged:
    with monkeypatch.context() as m:
        m.setattr(merge, "merge_syncz_fast", lambda *_a: None)
        m.setattr(merge, "merge_syncz_split", lambda *_a: None)
        return merge.merge(PLAN, answers, ctx)


def outcome(m: merge.Merged) -> tuple[bytes, int, list[str]]:
    return m.body, m.resources, [why for _, why in m.rejected]


def namespaces_as_istioctl_decodes(body: bytes) -> set[str]:
    out = set()
    for res in discovery_pb2.DiscoveryResponse.FromString(body).resources:
        cc = csds_pb2.ClientConfig()
        try:
            if not res.Unpack(cc):
                out.add(f"<{res.type_url}>")  # another type shown to a scoped caller
                continue
        except DecodeError:
            continue  # istioctl fails on it: nothing of it shown
        fields = cc.node.metadata.fields
        out.add(fields["NAMESPACE"].string_value if "NAMESPACE" in fields else "")
    return out


def test_hostile_spellings_merge_alike_on_every_path_and_scoped_callers_see_only_their_namespace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 1-3 replicas, each listing 0-4 of 6 proxies (ids with NUL, non-ASCII, a quoted ClientConfig header and fake
    # layout), one sometimes twice, in resources with the hostile spellings above; unscoped and scoped, with and
    # without early readings and a warm memo. Every path's merge must be the exact reader's, byte for byte.
    rng = random.Random(2121)
    answered = {"fast": 0, "split": 0, "shown to a scoped caller": 0}
    for _ in range(400):
        pool = [(f"p{i}.ns".encode() + rng.choice([b"", "é".encode(), b"\x00"]), rng.choice(["ns-1", "ns-2"]))
                for i in range(6)]
        answers = []
        for r in range(rng.randint(1, 3)):
            listed = rng.sample(pool, rng.randint(0, 4))
            if listed and rng.random() < 0.1:
                listed.append(listed[0])  # one proxy twice in one answer
            answers.append(Answer(Replica(f"10.0.0.{r}:15012"), hostile_answer(rng, listed)))
        scope = rng.choice(["", "ns-1"])
        slow = exact(answers, merge.MergeContext(scope=scope), monkeypatch)
        fast = merge.merge_syncz_fast(PLAN, answers, merge.MergeContext(scope=scope))
        if fast is not None:
            answered["fast"] += 1
            assert outcome(fast) == outcome(slow)
        split = merge.merge_syncz_split(PLAN, answers, merge.MergeContext(scope=scope))
        if split is not None:
            answered["split"] += 1
            assert outcome(split) == outcome(slow)
        ctx = merge.MergeContext(scope=scope, memo=rng.choice([None, wire.SynczMemo()]))
        if rng.random() < 0.5:
            for answer in answers:
                merge.index_early(PLAN, ctx, answer)
        assert outcome(merge.merge(PLAN, answers, ctx)) == outcome(slow)
        if scope:
            assert namespaces_as_istioctl_decodes(slow.body) <= {scope}
            answered["shown to a scoped caller"] += slow.resources
    assert answered["fast"] > 20 and answered["split"] > 100 and answered["shown to a scoped caller"] > 100, answered


def _answer(*copies: tuple[str, bytes]) -> bytes:
    """A syncz answer of (node id, serialized ClientConfig after its node) resources."""
    resources = b""
    for node_id, rest in copies:
        value = ld(1, ld(1, node_id.encode()) + ld(3, struct_namespace("ns-1"))) + rest
        resources += ld(2, ld(1, wire.CLIENT_CONFIG_URL) + ld(2, value))
    return resources + bytes(discovery_pb2.DiscoveryResponse(type_url=SYNCZ, version_info="v1").SerializeToString())


def _stamped(seconds: int, nanos: int, state: bytes) -> bytes:
    # generic_xds_configs {type_url, config_status (a varint), last_updated}
    return ld(3, ld(1, b"CDS") + b"\x30" + state + ld(5, timestamp(seconds, nanos)))


def _kept(body: bytes) -> list[bytes]:
    return [r.value for r in discovery_pb2.DiscoveryResponse.FromString(body).resources]


def _every_path(answers: list[Answer], monkeypatch: pytest.MonkeyPatch) -> list[merge.Merged]:
    ctx = merge.MergeContext()
    split = merge.merge_syncz_split(PLAN, answers, ctx)
    assert split is not None, "a duplicate in regular answers is the split path's"
    return [merge.merge(PLAN, answers, ctx), split, exact(answers, ctx, monkeypatch)]


def test_the_newer_copy_wins_however_close_the_stamps(monkeypatch: pytest.MonkeyPatch) -> None:
    # Found: the stamps (wire numbers, seconds·10⁹ + nanos) were divided by 1e9 into floats. Today's stamps are
    # ~1.8e18 ns, where a float64 steps by 256 ns: copies 10 ns apart compared equal and the first (older) one
    # won on every path (a proxy that just reconnected to another replica was shown with its stale state).
    older, newer = _stamped(1_780_000_000, 10, b"\x02"), _stamped(1_780_000_000, 20, b"\x01")
    for first, second in ((older, newer), (newer, older)):
        answers = [Answer(Replica("10.0.0.1:15012"), _answer(("a.ns-1", first))),
                   Answer(Replica("10.0.0.2:15012"), _answer(("a.ns-1", second)))]
        for got in _every_path(answers, monkeypatch):
            assert got.resources == 1
            assert _kept(got.body)[0].endswith(newer), "the newer copy (20 ns) must win, wherever it is listed"


def test_an_undecodable_copy_never_wins_over_a_readable_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # Found: an undecodable copy's stamp was 0.0, a readable copy's without last_updated 0 (a tie: the first
    # won) and one stamped before 1970 negative: the copy istioctl cannot decode was kept, failing its whole
    # `proxy-status`, though another replica had a readable copy of that proxy.
    unreadable = ld(3, ld(1, b"\xff\xfe"))  # a type_url that is not UTF-8: the ClientConfig does not decode
    for readable in (b"", _stamped(-5, 0, b"\x01"), _stamped(0, -1, b"\x01")):
        answers = [Answer(Replica("10.0.0.1:15012"), _answer(("a.ns-1", unreadable))),
                   Answer(Replica("10.0.0.2:15012"), _answer(("a.ns-1", readable)))]
        for got in _every_path(answers, monkeypatch):
            assert got.resources == 1 and not got.rejected
            discovery_pb2.DiscoveryResponse.FromString(got.body).resources[0].Unpack(csds_pb2.ClientConfig())


def test_a_copy_with_two_ids_cannot_hide_the_proxy_it_dedups_against(monkeypatch: pytest.MonkeyPatch) -> None:
    # Found: a hostile replica lists a newer copy of an honest replica's proxy whose node carries the id twice:
    # the victim's id first, a decoy last. Every path deduplicated by the first id (the exact reader's) and
    # dropped the honest copy; real istioctl 1.30 decodes the last id (tests/e2e/test_redteam_parse.py: `x ps`
    # shows the decoy), so the victim's row disappeared from `proxy-status`, for every caller. Now a copy of a
    # duplicate that the caller decodes under another id makes its replica malformed, on every path.
    honest = _answer(("victim.ns-1", _stamped(1_780_000_000, 0, b"\x01")))
    node = ld(1, b"victim.ns-1") + ld(1, b"decoy.ns-1") + ld(3, struct_namespace("ns-1"))
    two_ids = ld(1, node) + _stamped(1_780_000_001, 0, b"\x01")
    hostile = ld(2, ld(1, wire.CLIENT_CONFIG_URL) + ld(2, two_ids))
    hostile += discovery_pb2.DiscoveryResponse(type_url=SYNCZ, version_info="v1").SerializeToString()
    answers = [Answer(Replica("10.0.0.1:15012"), honest), Answer(Replica("10.0.0.2:15012"), hostile)]
    for ctx in (merge.MergeContext(), merge.MergeContext(scope="ns-1")):
        assert merge.merge_syncz_split(PLAN, answers, ctx) is None, "the exact reader decides"
        got = merge.merge(PLAN, answers, ctx)
        assert outcome(got) == outcome(exact(answers, ctx, monkeypatch))
        assert [(a.replica.address, why) for a, why in got.rejected] == \
            [("10.0.0.2:15012", "malformed syncz resource: a node id given twice")]
        shown = []
        for res in discovery_pb2.DiscoveryResponse.FromString(got.body).resources:
            cc = csds_pb2.ClientConfig()
            assert res.Unpack(cc)
            shown.append(cc.node.id)  # as istioctl decodes it: the last id
        assert shown == ["victim.ns-1"], (ctx.scope, shown)


@pytest.mark.xfail(strict=True, reason="open (low): a resource's decoded id is checked only for duplicates; fix in "
                   "docs/security.md, red team stop 21")
def test_a_copy_whose_last_id_is_another_proxys_is_not_shown_under_that_name() -> None:
    # The mirror image: the hostile copy's first id is its own (no duplicate for the readers), its last the
    # victim's. istioctl decodes the last, so `proxy-status` lists the victim twice, once with the hostile
    # replica's status. Expected: its replica rejected as malformed (a node id given twice), as for a duplicate.
    honest = _answer(("victim.ns-1", _stamped(1_780_000_000, 0, b"\x01")))
    node = ld(1, b"decoy.ns-1") + ld(1, b"victim.ns-1") + ld(3, struct_namespace("ns-1"))
    hostile = ld(2, ld(1, wire.CLIENT_CONFIG_URL) + ld(2, ld(1, node) + _stamped(1_780_000_001, 0, b"\x02")))
    hostile += bytes(discovery_pb2.DiscoveryResponse(type_url=SYNCZ, version_info="v1").SerializeToString())
    answers = [Answer(Replica("10.0.0.1:15012"), honest), Answer(Replica("10.0.0.2:15012"), hostile)]
    got = merge.merge(PLAN, answers, merge.MergeContext())
    shown = []
    for res in discovery_pb2.DiscoveryResponse.FromString(got.body).resources:
        cc = csds_pb2.ClientConfig()
        assert res.Unpack(cc)
        shown.append(cc.node.id)
    assert shown == ["victim.ns-1"]


def test_copies_remembered_across_calls_are_read_as_each_call_sends_them(monkeypatch: pytest.MonkeyPatch) -> None:
    # The split path remembers each copy's decoded id and stamp by its bytes (SynczMemo.copy_facts), across calls:
    # a replica that turns a copy unreadable, newer, older or two-faced from one call to the next is read anew
    # each time, and every call agrees with the exact reader.
    memo = wire.SynczMemo()
    unreadable = ld(3, ld(1, b"\xff\xfe"))
    newer, older = _stamped(1_780_000_001, 0, b"\x01"), _stamped(1_780_000_000, 0, b"\x02")
    node = ld(1, b"a.ns-1") + ld(1, b"decoy.ns-1") + ld(3, struct_namespace("ns-1"))
    two_ids = ld(2, ld(1, wire.CLIENT_CONFIG_URL) + ld(2, ld(1, node) + newer))
    two_ids += discovery_pb2.DiscoveryResponse(type_url=SYNCZ, version_info="v1").SerializeToString()
    honest = _answer(("a.ns-1", older))
    for second in (_answer(("a.ns-1", unreadable)), _answer(("a.ns-1", newer)), two_ids, _answer(("a.ns-1", newer)),
                   _answer(("a.ns-1", older)), _answer(("a.ns-1", unreadable)), two_ids):
        answers = [Answer(Replica("10.0.0.1:15012"), honest), Answer(Replica("10.0.0.2:15012"), second)]
        for scope in ("", "ns-1"):
            ctx = merge.MergeContext(scope=scope, memo=memo)
            assert outcome(merge.merge(PLAN, answers, ctx)) == outcome(exact(answers, ctx, monkeypatch))
