"""The cold memo's bulk node reading (wire._nodes_facts): node by node the exact reader's, on hostile metadata.

The bulk reading decodes every new node in one upb parse and reads each NAMESPACE there; any faster reading of it
(a lighter schema, a value's bytes, a proposal by pattern) must agree with node_namespace / _node_facts on the
Structs a hostile proxy could send: duplicate keys, every kind of Value, oneof members in sequence, value fields
twice (they merge), nested Structs with bad UTF-8, unknown fields, groups, long and overlong length prefixes.
"""

from __future__ import annotations

import random

from google.protobuf import struct_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from istioctl_proxy import wire

from .helpers import pb_field as _field

_STRINGS = [b"ns-1", b"ns-2", b"", "\u00e9".encode(), b"\xff", b"\xed\xa0\x80", b"n" * 127, b"n" * 128, b"n" * 200]
_KEYS = [b"NAMESPACE", b"NAMESPACE", b"OTHER", b"namespace", b"\xff", b"NAMESPACE\x00"]


def _struct(r: random.Random, depth: int) -> bytes:
    """A Struct's bytes: entries (field 1) and what else a hostile proxy may put there."""
    parts = []
    for _ in range(r.randrange(4)):
        kind = r.randrange(10)
        if kind < 7:
            parts.append(_field(1, 2, _entry(r, depth)))
        elif kind == 7:
            parts.append(_field(r.choice([2, 9, 1]), r.choice([0, 1, 5])))  # unknown, or field 1 of another type
        elif kind == 8:
            parts.append(_field(7, 3, _field(1, 2, b"in-group")))
        else:
            parts.append(bytes([r.randrange(256)]))  # malformed (or a lucky tag)
    return b"".join(parts)


def _entry(r: random.Random, depth: int) -> bytes:
    parts = []
    for _ in range(r.randrange(5)):
        kind = r.randrange(8)
        if kind < 2:
            parts.append(_field(1, 2, r.choice(_KEYS)))
        elif kind < 6:
            parts.append(_field(2, 2, _value(r, depth)))  # value fields, maybe several (they merge)
        elif kind == 6:
            parts.append(_field(r.choice([1, 2, 3]), r.choice([0, 5, 3])))  # key/value of another wire type, unknown
        else:
            parts.append(_field(2, 2, b""))  # an empty value field after others: the merged value keeps theirs
    return b"".join(parts)


def _value(r: random.Random, depth: int) -> bytes:
    """A Value's bytes: oneof members in sequence (the last one set wins), unknown fields, groups, long lengths."""
    parts = []
    for _ in range(r.randrange(4)):
        kind = r.randrange(11)
        if kind < 4:
            parts.append(_field(3, 2, r.choice(_STRINGS)))
        elif kind == 4:
            parts.append(_field(2, 1))  # number_value
        elif kind == 5:
            parts.append(_field(r.choice([1, 4]), 0))  # null_value, bool_value
        elif kind == 6 and depth < 3:
            parts.append(_field(5, 2, _struct(r, depth + 1)))  # a nested Struct: bad UTF-8 there fails the Node
        elif kind == 7 and depth < 3:
            parts.append(_field(6, 2, _field(1, 2, _value(r, depth + 1))))  # list_value
        elif kind == 8:
            parts.append(_field(3, r.choice([0, 5, 3])))  # string_value's number of another wire type: unknown
        elif kind == 9:
            parts.append(b"\x1a\x84\x00ns-1"[: r.choice([3, 7])])  # an overlong length prefix (or truncated)
        else:
            parts.append(_field(r.choice([7, 15, 100]), r.choice([0, 2])))
    return b"".join(parts)


def _node(r: random.Random) -> bytes:
    parts = []
    if r.random() < 0.8:
        parts.append(_field(1, 2, r.choice([b"a.ns-1", b"b", "\u00e9".encode(), b"\xff"])))
    for _ in range(r.randrange(1, 4)):
        kind = r.randrange(6)
        if kind < 4:
            parts.append(_field(3, 2, _struct(r, 0)))  # metadata, maybe twice (the Structs merge)
        elif kind == 4:
            parts.append(_field(r.choice([2, 6, 9, 16]), 2, b"x"))
        else:
            parts.append(_field(3, r.choice([0, 3, 5])))  # metadata of another wire type: unknown
    if r.random() < 0.1:
        parts.append(_field(3, 2, struct_pb2.Struct(fields={"NAMESPACE": struct_pb2.Value(string_value="ns-3")})
                            .SerializeToString()))
    r.shuffle(parts)
    return b"".join(parts)


def _exact(nodes: list[bytes]) -> list[tuple[str, str] | None]:
    return list(map(wire._node_facts, nodes))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.randoms(use_true_random=False), st.integers(1, 6))
def test_the_bulk_namespace_reading_is_the_exact_readers_on_hostile_metadata(r: random.Random, n: int) -> None:
    """Node lists with hostile metadata: every node's (id, namespace) is the exact reader's, node by node."""
    nodes = [_node(r) for _ in range(n)]
    assert wire._nodes_facts(nodes) == _exact(nodes), nodes


def test_many_hostile_lists_that_decode_as_a_whole() -> None:
    """The bulk path proper: lists of nodes that each decode, so that the list decodes as a whole and no node-by-node
    fallback hides a divergence; some with namespaces that are not plain (long, non-ASCII, merged)."""
    r = random.Random(14)
    bulk = odd = 0
    for _ in range(3000):
        nodes = [node for node in (_node(r) for _ in range(r.randrange(1, 8))) if _decodes(node)]
        if not nodes:
            continue
        want = _exact(nodes)
        assert wire._nodes_facts(nodes) == want, nodes
        bulk += 1
        odd += any(f is not None and f[1] not in ("", "ns-1", "ns-2", "ns-3") for f in want)
    # Enough decodable lists for the bulk path to be the one tested, and enough odd namespaces among them.
    assert bulk > 2000 and odd > 30, (bulk, odd)


def _decodes(node: bytes) -> bool:
    try:
        wire.base_pb2.Node.FromString(node)
    except wire.DecodeError:
        return False
    return True


def test_values_the_bulk_reading_must_not_trust() -> None:
    """Each of these NAMESPACE entries has a last value field that is not exactly one string_value: a reading that
    took its bytes at face value would give another namespace than protobuf's (the exact reader's)."""
    def node(*entry: bytes) -> bytes:
        return _field(1, 2, b"p.ns-1") + _field(3, 2, _field(1, 2, _field(1, 2, b"NAMESPACE") + b"".join(entry)))

    s = lambda ns: _field(3, 2, ns)  # noqa: E731
    cases = {
        # An empty last value field: the merged Value keeps the earlier string.
        "empty after": node(_field(2, 2, s(b"ns-1")), _field(2, 2, b"")),
        # A number after the string in the last value field: the oneof holds the number, "".
        "string then number": node(_field(2, 2, s(b"ns-1") + _field(2, 1))),
        # A string with a length prefix of two bytes (a 200-byte namespace).
        "long string": node(_field(2, 2, s(b"n" * 200))),
        # Two strings in one value field: the last wins.
        "two strings": node(_field(2, 2, s(b"ns-1") + s(b"ns-2"))),
        # The string then an unknown field.
        "string then unknown": node(_field(2, 2, s(b"ns-1") + _field(9, 0))),
        # An overlong (but valid) length prefix.
        "overlong length": node(_field(2, 2, b"\x1a\x84\x00ns-1")),
        # The last entry of the key wins, even an empty one.
        "second entry": node(_field(2, 2, s(b"ns-1"))) + _field(3, 2, _field(1, 2, _field(1, 2, b"NAMESPACE"))),
    }
    nodes = list(cases.values())
    want = ["ns-1", "", "n" * 200, "ns-2", "ns-1", "ns-1", ""]
    assert list(map(wire.node_namespace, nodes)) == want
    assert wire._nodes_facts(nodes) == [("p.ns-1", ns) for ns in want]  # one list: the bulk path


def test_the_node_list_is_each_node_framed_alone_on_every_framing_branch() -> None:
    """_framed has two ways (frames from a table below 16 KiB, each computed beyond): each is the nodes framed one
    by one, whichever node is the longest."""
    for longest in (0, 1, 127, 128, 2019, (1 << 14) - 1, 1 << 14, 70_000):
        nodes = [b"a" * longest, b"b" * (longest // 2), b"", b"c"]
        assert wire._framed(nodes) == b"".join(b"\n" + wire._varint_bytes(len(n)) + n for n in nodes), longest
    assert wire._framed([]) == b""


_IDS = [b"a.ns-1", b"", "\u00e9.ns-2".encode(), b"\xff", b"\xed\xa0\x80", b"\xef\xbf\xbe", b"i" * 127, b"i" * 128]


def _istiod_like(r: random.Random) -> bytes:
    """A node that starts as istiod writes one (its id field), then anything: istiod's metadata, a hostile Struct,
    a second id, a second metadata, other fields, an id longer than the node (truncated), malformed bytes."""
    node_id = r.choice(_IDS)
    parts = [_field(1, 2, node_id)]
    if r.random() < 0.05:
        parts = [b"\n" + bytes([len(node_id) + r.randrange(1, 4)]) + node_id]  # its length past the node's end
    for _ in range(r.randrange(4)):
        kind = r.randrange(8)
        if kind < 2:
            parts.append(_field(3, 2, struct_pb2.Struct(fields={
                "CLUSTER_ID": struct_pb2.Value(string_value="Kubernetes"),
                "NAMESPACE": struct_pb2.Value(string_value=r.choice(["ns-1", "ns-2"])),
                "ISTIO_VERSION": struct_pb2.Value(string_value="1.30.3")}).SerializeToString()))
        elif kind < 5:
            parts.append(_field(3, 2, _struct(r, 0)))
        elif kind == 5:
            parts.append(_field(1, 2, r.choice(_IDS)))  # a second id: protobuf's, not the exact reader's
        elif kind == 6:
            parts.append(_field(r.choice([2, 6, 16]), r.choice([0, 2])))
        else:
            parts.append(bytes([r.randrange(256)]))
    return b"".join(parts)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.randoms(use_true_random=False), st.integers(1, 6))
def test_nodes_read_from_their_bytes_are_the_exact_readers(r: random.Random, n: int) -> None:
    """Nodes that start with their id field (istiod's shape) are read from their bytes, the rest of each node's
    namespace read once per distinct tail: node by node the exact reader's, whatever follows the id."""
    nodes = [_istiod_like(r) for _ in range(n)]
    fast = wire._istiod_facts(nodes)
    assert fast is None or fast == _exact(nodes), nodes
    assert wire._nodes_facts(nodes) == _exact(nodes), nodes


def test_many_lists_of_istiod_shaped_nodes_are_read_from_their_bytes() -> None:
    """Seeded: most lists take the bytes path (it is the one compared), and it declines exactly the lists with an id
    that is not UTF-8 or runs past its node."""
    r = random.Random(30)
    taken = 0
    for _ in range(3000):
        nodes = [_istiod_like(r) for _ in range(r.randrange(1, 6))]
        fast = wire._istiod_facts(nodes)
        exact = _exact(nodes)
        if fast is None:
            assert None in exact or any(n[1] >= 0x80 for n in nodes), nodes
        else:
            assert fast == exact, nodes
            taken += 1
    assert taken > 600, taken


def test_istiods_own_nodes_repeat_their_tails() -> None:
    """istiod's nodes (the simulator's: id, then a Struct of CLUSTER_ID, NAMESPACE, ISTIO_VERSION) are read from
    their bytes, each namespace's tail once."""
    from istioctl_proxy.sim.simulator import make_mesh

    nodes = [n for rep in make_mesh(2, 400) for n in wire.syncz_split(rep.syncz(""), wire.SynczMemo()).nodes]
    fast = wire._istiod_facts(nodes)
    assert fast is not None and fast == _exact(nodes)
    assert len({n[2 + n[1]:] for n in nodes}) < 20


def test_the_bytes_path_and_upb_agree_on_which_ids_are_utf8() -> None:
    """The bytes path decodes ids with Python and takes the namespace from the rest of the node: exact only if upb
    (whose Node decode the exact namespace is) accepts the same ids. Every 1- and 2-byte id, the surrogates' and
    the last plane's edges, overlong and out-of-range forms."""
    meta = _field(3, 2, struct_pb2.Struct(fields={"NAMESPACE": struct_pb2.Value(string_value="ns-1")})
                  .SerializeToString())
    ids = [bytes([a]) for a in range(256)] + [bytes([a, b]) for a in range(0x80, 0x100) for b in range(256)]
    ids += [chr(c).encode("utf-8", "surrogatepass") for c in [*range(0xD7F0, 0xE010), *range(0x10FFF0, 0x110000)]]
    ids += [b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80", b"\xc0\x80", b"\xe0\x80\x80", b"\xf0\x80\x80\x80",
            b"\xef\xbf\xbe"]
    for node_id in ids:
        node = _field(1, 2, node_id) + meta
        fast, exact = wire._istiod_facts([node]), _exact([node])
        assert fast == exact or (fast is None and exact == [None]), node_id
