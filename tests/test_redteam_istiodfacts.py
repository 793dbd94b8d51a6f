"""Red team stop 22: the cold memo's byte reading of istiod-shaped nodes (wire._istiod_facts, wire._namespaces).

For nodes that start with their id field (one-byte length) the id is sliced and decoded by Python and the namespace
read from the node's tail (the bytes after the id), each distinct tail once, in one upb parse. The contract attacked
here: node by node, whatever the other nodes of the list, `_nodes_facts(nodes)[i] == _node_facts(nodes[i])` (the
exact reader: the first id field, UTF-8 checked by Python; the namespace as node_namespace reads the WHOLE node).
A wrong answer is a fact the memo shares with every caller: a scoped caller shown another namespace's proxy.
"""

from __future__ import annotations

import random

from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from istioctl_proxy import wire

from .test_redteam_parse import ld

V = wire._varint_bytes


def _meta(ns: str, **more: str) -> bytes:
    """Node.metadata (field 3): a Struct of NAMESPACE and more string entries, as istiod writes it."""
    fields = {"NAMESPACE": struct_pb2.Value(string_value=ns)} | {
        k: struct_pb2.Value(string_value=v) for k, v in more.items()
    }
    return ld(3, struct_pb2.Struct(fields=fields).SerializeToString())


def _node(node_id: bytes, tail: bytes) -> bytes:
    return b"\n" + bytes([len(node_id)]) + node_id + tail


def _exact(nodes: list[bytes]) -> list[tuple[str, str] | None]:
    return list(map(wire._node_facts, nodes))


def _check(nodes: list[bytes]) -> None:
    """The contract, for the list and for each node alone, and the bytes path (when it answers) agreeing."""
    exact = _exact(nodes)
    assert wire._nodes_facts(nodes) == exact, nodes
    fast = wire._istiod_facts(nodes)
    assert fast is None or fast == exact, nodes
    for node, want in zip(nodes, exact, strict=True):
        assert wire._nodes_facts([node]) == [want], node


def _upb_accepts(node: bytes) -> bool:
    from envoy.config.core.v3 import base_pb2

    try:
        base_pb2.Node.FromString(node)
    except DecodeError:
        return False
    return True


# -- UTF-8: Python (the id) and upb (the namespace of the whole node) must agree on every id ----------------------


def _utf8_candidates() -> list[bytes]:
    """Every 3-byte form with a lead E0-EF over every second byte (third byte at the continuation edges and beyond),
    every 4-byte form's edges (leads F0-F7), 5/6-byte forms (F8-FD), noncharacters, overlong NUL, lone surrogates,
    truncated sequences."""
    edges = [0x00, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xFF]
    out = [bytes([a, b, c]) for a in range(0xE0, 0xF0) for b in range(256) for c in edges]
    out += [bytes([a, b, c, d]) for a in range(0xF0, 0xF8) for b in edges for c in edges for d in (0x80, 0xBF, 0x7F)]
    out += [bytes([a]) + b"\x80" * n for a in range(0xF8, 0xFE) for n in (4, 5)]
    out += [chr(c).encode() for c in (0xFDD0, 0xFDEF, 0xFFFE, 0xFFFF, 0x1FFFE, 0x10FFFF, 0)]
    out += [b"\xc0\x80", b"\xc1\xbf", b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xed\xa0\x80\xed\xb0\x80"]
    out += [chr(0x10FFFF).encode()[:k] for k in (1, 2, 3)] + [b"\xe2\x82", b"\xc3"]
    return out


def test_python_and_upb_agree_on_every_3_byte_and_the_4_5_6_byte_edges_of_an_id() -> None:
    """An id that Python decodes but upb refuses would give the exact reader (id, "") (the node does not decode)
    and the bytes path (id, the tail's namespace): the proxy in a namespace istioctl cannot decode it in."""
    tail = _meta("ns-1")
    disagree = []
    for raw in _utf8_candidates():
        try:
            raw.decode()
            py = True
        except UnicodeDecodeError:
            py = False
        node = _node(b"p." + raw, tail)
        if py != _upb_accepts(node):
            disagree.append(raw)
    assert disagree == []
    # And the readers on a sample of them, alone and in one list (the bytes path declines the whole list on one).
    sample = random.Random(22).sample(_utf8_candidates(), 400)
    _check([_node(b"p." + raw, tail) for raw in sample if len(raw) < 120])


def test_ids_cut_inside_a_character_at_the_ids_end_and_the_127_128_byte_edges() -> None:
    """A character cut by the id's end (the rest in the tail's first byte: a tag there), ids of 126-128 bytes."""
    tail = _meta("ns-1")
    nodes = []
    for k in (124, 125, 126, 127):
        for ch in ("\u00e9", "\u20ac", "\U0001f600"):
            whole = b"i" * k + ch.encode()
            nodes.append(ld(1, whole[:127]) + tail)  # cut at 127 bytes when longer
            nodes.append(ld(1, whole) + tail)  # whole: 128+ bytes, a two-byte length (not the bytes path)
    nodes += [ld(1, b"i" * n) + tail for n in (0, 1, 126, 127, 128, 129)]
    _check(nodes)
    for n in nodes:
        _check([n, _node(b"ok.ns-2", _meta("ns-2"))])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.one_of(st.binary(max_size=130), st.text(max_size=60).map(str.encode)), min_size=1, max_size=5),
    st.lists(st.sampled_from(["ns-1", "ns-2", ""]), min_size=5, max_size=5),
)
def test_any_id_bytes_before_istiods_metadata(ids: list[bytes], namespaces: list[str]) -> None:
    """Random id bytes (valid or not, up to 130 bytes) before a real metadata Struct: the readers agree."""
    _check([ld(1, i) + _meta(ns) for i, ns in zip(ids, namespaces, strict=False)])


# -- Tails that decode alone but not after the id, or the reverse --------------------------------------------------


def _tails() -> dict[str, bytes]:
    meta = _meta("ns-1")
    return {
        "end group first": b"\x0c" + meta,  # END_GROUP of field 1
        "end group of metadata first": b"\x1c" + meta,
        "end group last": meta + b"\x1c",
        "start group never ended": meta + b"\x0b",
        "group around the metadata": b"\x0b" + meta + b"\x0c",  # field 1 as a group: protobuf skips it as unknown
        "group of field 3 holding metadata": b"\x1b" + meta + b"\x1c",
        "group then metadata": b"\x2b" + ld(1, b"x") + b"\x2c" + meta,
        "unterminated varint": meta + b"\x10\x80",
        "varint continuation first": b"\x80\x01" + meta,
        "tag zero": b"\x00" + meta,
        "wire type 6": b"\x0e" + meta,
        "wire type 7": meta + b"\x1f",
        "second id utf-8": meta + ld(1, b"other.ns-2"),
        "second id not utf-8": meta + ld(1, b"\xff"),
        "second id surrogate": ld(1, b"\xed\xa0\x80") + meta,
        "second id as varint": meta + b"\x08\x05",  # field 1 of another wire type: unknown
        "metadata twice": meta + _meta("ns-2"),  # merged: the second map's NAMESPACE wins
        "metadata twice, second without ns": meta + ld(3, ld(1, ld(1, b"OTHER") + ld(2, ld(3, b"x")))),
        "metadata as varint after": meta + b"\x18\x01",
        "metadata of bad utf-8 key": ld(3, ld(1, ld(1, b"\xff") + ld(2, ld(3, b"x")))) + meta,
        "metadata with ns bytes not utf-8": ld(3, ld(1, ld(1, b"NAMESPACE") + ld(2, ld(3, b"\xc0\x80")))),
        "length past the tail": meta + b"\x1a\x05ab",
        "empty": b"",
        "only metadata empty": ld(3, b""),
        "cluster not utf-8": ld(2, b"\xff") + meta,  # Node.cluster is a proto3 string
        "locality malformed": ld(4, b"\x0a\x05a") + meta,  # Node.locality a message that does not decode
        "user agent build version oneof": ld(8, b"\xff\xff") + meta,
        "extensions bad": ld(9, b"\x0a\x01\xff") + meta,
        "listening address garbage": ld(11, b"\x07") + meta,
        "dynamic parameters bad key": ld(13, ld(1, b"\xff")) + meta,
    }


def test_tails_that_decode_alone_but_not_after_the_id_or_the_reverse() -> None:
    """Each tail after an id: alone, after other nodes (the bulk parse of the distinct tails fails on one and falls
    back per tail), and repeated with other ids (each distinct tail is read once, its answer shared)."""
    tails = _tails()
    ok = _node(b"ok.ns-2", _meta("ns-2"))
    for name, tail in tails.items():
        node = _node(b"p.ns-1", tail)
        _check([node])
        _check([ok, node, ok, _node(b"q.ns-1", tail)])
        assert wire._nodes_facts([node]) == [("p.ns-1", wire.node_namespace(node))], name
    every = [_node(f"p{i}".encode(), t) for i, t in enumerate(tails.values())]
    _check(every + every[::-1])
    facts = wire._nodes_facts(every)
    # The exact reader's answers, spelled out where a wrong one would move a proxy between namespaces.
    named = dict(zip(tails, facts, strict=True))
    assert named["metadata twice"] == ("p16", "ns-2")
    assert named["second id utf-8"] == ("p12", "ns-1")
    for name in (
        "second id not utf-8",
        "second id surrogate",
        "end group first",
        "cluster not utf-8",
        "locality malformed",
        "tag zero",
        "length past the tail",
        "metadata with ns bytes not utf-8",
    ):
        assert named[name] is not None and named[name][1] == "", name


def test_the_first_byte_after_the_id_is_every_byte() -> None:
    """Every byte as the tail's first (a tag, a group end, a varint's continuation), before istiod's metadata."""
    meta = _meta("ns-1")
    nodes = [_node(b"p.ns-1", bytes([b]) + meta) for b in range(256)]
    nodes += [_node(b"p.ns-1", bytes([b, 0x00]) + meta) for b in range(256)]
    _check(nodes)


# -- Depth: the bulk parse frames the tails one level deeper than node_namespace parses a node -------------------


def _deep_struct(depth: int, ns: str) -> bytes:
    """A Struct {NAMESPACE: ns, d: Value{struct_value: Struct{d: ...}}} nested `depth` Struct levels down."""
    inner = b""
    for _ in range(depth):
        inner = ld(1, ld(1, b"d") + ld(2, ld(5, inner)))  # entry d: Value.struct_value (field 5)
    return ld(1, ld(1, b"NAMESPACE") + ld(2, ld(3, ns.encode()))) + inner


def _deep_list(depth: int, ns: str) -> bytes:
    """The same with ListValues: entry d: Value{list_value: ListValue{values: Value{list_value: ...}}}."""
    inner = b""
    for _ in range(depth):
        inner = ld(6, ld(1, inner))  # Value.list_value (field 6) { values (field 1): Value{...} }
    return ld(1, ld(1, b"NAMESPACE") + ld(2, ld(3, ns.encode()))) + ld(1, ld(1, b"d") + ld(2, inner))


def _limit(make: object) -> int:
    """The deepest nesting at which node_namespace still decodes the node."""
    assert callable(make)
    deepest = 0
    for depth in range(0, 200):
        if wire.node_namespace(_node(b"p", ld(3, make(depth, "ns-1")))) != "ns-1":
            break
        deepest = depth
    else:
        raise AssertionError("no depth limit found")
    return deepest


def test_nesting_at_upbs_depth_limit_is_read_as_the_exact_reader_reads_it() -> None:
    """At the deepest nesting node_namespace decodes, the tail framed in the bulk NodeList is one level too deep:
    the bulk parse fails and each tail is read alone (at the node's own depth). One level deeper the node does not
    decode at all: "". Alone, in a list with shallow nodes, and the same tail under many ids."""
    for make in (_deep_struct, _deep_list):
        limit = _limit(make)
        assert 20 < limit < 120, limit
        shallow = _node(b"ok.ns-2", _meta("ns-2"))
        for depth in range(limit - 2, limit + 3):
            deep = _node(b"p.ns-1", ld(3, make(depth, "ns-1")))
            _check([deep])
            _check([shallow, deep, shallow])
            _check([_node(f"p{i}".encode(), ld(3, make(depth, "ns-1"))) for i in range(5)] + [shallow])
            want = "ns-1" if depth <= limit else ""
            assert wire._nodes_facts([shallow, deep]) == [("ok.ns-2", "ns-2"), ("p.ns-1", want)], (make, depth)
        # The deep namespace in a second metadata field after a shallow one: merged, still at the node's depth.
        both = _node(b"m", _meta("ns-2") + ld(3, make(limit, "ns-1")))
        _check([shallow, both])
        assert wire._nodes_facts([both]) == [("m", "ns-1")]


# -- Lists: many distinct tails, empty and two-byte nodes, one bad node ------------------------------------------


def test_empty_and_two_byte_nodes_beside_istiod_shaped_ones() -> None:
    """Nodes of 0, 1 and 2 bytes (an empty id field with no tail, a lone tag): the bytes path declines or reads
    them as the exact reader does."""
    ok = _node(b"ok.ns-2", _meta("ns-2"))
    for small in [b"", b"\n", b"\n\x00", b"\n\x01", b"\x1a\x00", b"\x00\x00", b"\n\x80", b"\x0b\x0c"]:
        _check([small])
        _check([ok, small, ok])


def test_many_distinct_tails_with_one_bad_one_fall_back_per_tail() -> None:
    """20k nodes with ~5k distinct tails (namespaces, versions, key orders); then one malformed tail in the list:
    the bulk parse fails, every tail read alone, the same facts for all others."""
    r = random.Random(2022)
    nodes = []
    for i in range(20_000):
        ns = f"ns-{r.randrange(50)}"
        more = {"CLUSTER_ID": f"c{r.randrange(10)}", "ISTIO_VERSION": f"1.30.{r.randrange(10)}"}
        nodes.append(_node(f"p{i}.{ns}".encode(), _meta(ns, **more)))
    good = wire._nodes_facts(nodes)
    assert good == _exact(nodes)
    assert len({n[2 + n[1] :] for n in nodes}) > 1000
    bad = _node(b"bad.ns-1", b"\x0c" + _meta("ns-1"))
    mixed = [*nodes[:10_000], bad, *nodes[10_000:]]
    assert wire._nodes_facts(mixed) == [*good[:10_000], ("bad.ns-1", ""), *good[10_000:]]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.randoms(use_true_random=False), st.integers(1, 8))
def test_random_spliced_tails(r: random.Random, n: int) -> None:
    """Tails spliced from the attack tails above and random bytes, behind ids of every kind."""
    tails = list(_tails().values())
    ids = [b"p.ns-1", b"", b"\xff", "\u00e9".encode(), b"i" * 127, b"\xed\xa0\x80", b"\xf4\x8f\xbf\xbf"]
    nodes = []
    for _ in range(n):
        tail = b"".join(r.choice(tails) for _ in range(r.randrange(3)))
        if r.random() < 0.3:
            cut = r.randrange(len(tail) + 1)
            tail = tail[:cut] + bytes(r.randrange(256) for _ in range(r.randrange(3))) + tail[cut:]
        nodes.append(ld(1, r.choice(ids)) + tail)
    _check(nodes)


def test_depth_limit_nodes_beside_a_long_id_take_the_node_list_path_as_exactly() -> None:
    """A 128-byte id (two-byte length) makes the bytes path decline the whole list: the NodeList path parses every
    node one level deeper too, and must fall back the same way."""
    long_id = ld(1, b"i" * 128) + _meta("ns-2")
    for make in (_deep_struct, _deep_list):
        limit = _limit(make)
        for depth in (limit, limit + 1):
            deep = _node(b"p.ns-1", ld(3, make(depth, "ns-1")))
            assert wire._istiod_facts([long_id, deep]) is None
            _check([long_id, deep, long_id])
            assert wire._nodes_facts([long_id, deep])[1] == ("p.ns-1", "ns-1" if depth == limit else "")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.randoms(use_true_random=False))
def test_a_shared_memo_over_calls_in_any_order_remembers_only_the_exact_facts(r: random.Random) -> None:
    """The memo keeps each node's facts for every later caller: lists drawn from one pool of hostile nodes (in any
    order, repeated, some with an id the exact reader rejects), call after call on one SynczMemo."""
    tails = [*_tails().values(), _meta("ns-1"), _meta("ns-2"), ld(3, _deep_struct(_limit(_deep_struct), "n"))]
    ids = [b"a.ns-1", b"b.ns-2", b"", b"\xff", b"i" * 127, b"j" * 128, "\u00e9".encode()]
    pool = [ld(1, r.choice(ids)) + r.choice(tails) for _ in range(30)]
    memo = wire.SynczMemo()
    for _ in range(6):
        nodes = [r.choice(pool) for _ in range(r.randrange(1, 12))]
        exact = _exact(nodes)
        got = memo.facts(nodes)
        assert got == (None if None in exact else exact), nodes
