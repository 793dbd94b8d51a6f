"""wire.py on its own: the field reader, the response view, the envelope override and the syncz readers."""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.status.v3 import csds_pb2
from google.protobuf import any_pb2, struct_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from istioctl_proxy import wire
from istioctl_proxy.wire import WireError

SYNCZ = "istio.io/debug/syncz"


def syncz_resource(node_id: str) -> any_pb2.Any:
    resource = any_pb2.Any()
    resource.Pack(csds_pb2.ClientConfig(node=base_pb2.Node(id=node_id)))
    return resource


def response(ids: list[str], *, version: str = "v1", nonce: str = "n1", identifier: str | None = "istiod-0") -> bytes:
    resp = discovery_pb2.DiscoveryResponse(type_url=SYNCZ, version_info=version, nonce=nonce,
                                           resources=[syncz_resource(i) for i in ids])
    if identifier is not None:
        resp.control_plane.identifier = identifier
    return bytes(resp.SerializeToString())


def test_iter_fields_spans_every_wire_type() -> None:
    # 1: varint 150, 2: "ab", 3: fixed64, 4: fixed32
    raw = b"\x08\x96\x01" + b"\x12\x02ab" + b"\x19" + bytes(8) + b"\x25" + bytes(4)
    fields = list(wire.iter_fields(raw))
    assert [(n, t) for n, t, *_ in fields] == [(1, 0), (2, 2), (3, 1), (4, 5)]
    assert [raw[start:end] for _, _, start, _, end in fields] == [raw[0:3], raw[3:7], raw[7:16], raw[16:21]]
    assert raw[fields[1][3]:fields[1][4]] == b"ab"  # the value start of a length-delimited field skips its length


@pytest.mark.parametrize(("raw", "message"), [
    (b"\x08", "truncated varint"),
    (b"\x08" + b"\xff" * 10 + b"\x01", "varint too long"),
    (b"\x0b", "unsupported wire type 3"),
    (b"\x12\x05ab", "truncated or invalid field"),
    (b"\x02\x00", "truncated or invalid field"),  # field number 0
    (b"\x19\x00", "truncated or invalid field"),  # fixed64 with one byte
])
def test_iter_fields_rejects_malformed_input(raw: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message):
        list(wire.iter_fields(raw))


def test_view_response_indexes_resources_and_envelope_without_decoding_them() -> None:
    raw = response(["a.ns-1", "b.ns-2"])
    view = wire.view_response(raw)
    assert (view.type_url, view.version_info, view.identifier()) == (SYNCZ, "v1", "istiod-0")
    assert len(view.resources) == 2
    parsed = discovery_pb2.DiscoveryResponse.FromString(raw)
    for i, original in enumerate(parsed.resources):
        assert any_pb2.Any.FromString(view.resource_any(i)) == original
        # A resource's bytes are a field of its own: alone they parse as a response with just that resource.
        assert list(discovery_pb2.DiscoveryResponse.FromString(view.resource_bytes(i)).resources) == [original]


def test_view_of_a_response_without_control_plane_has_no_identifier() -> None:
    assert wire.view_response(response(["a.ns-1"], identifier=None)).identifier() is None


@pytest.mark.parametrize(("raw", "message"), [
    (b"\x10\x01", "field 2 has wire type 0"),  # resources as a varint
    (b"\x22\x02\xff\xfe", "invalid UTF-8"),  # type_url
    (b"\x0a\x01\xff", "invalid UTF-8"),  # version_info
    (b"\x2a\x01\xff", "invalid UTF-8"),  # nonce
    (b"\x32\x03\x0a\x01\xff", "malformed control_plane"),  # identifier not UTF-8
    (b"\x32\x02\x0a\x05", "malformed control_plane"),  # identifier truncated inside control_plane
])
def test_view_response_rejects_what_istioctl_could_not_parse(raw: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message):
        wire.view_response(raw)


def test_concatenated_bodies_and_envelope_are_the_merged_response() -> None:
    """The merge's premise: bodies concatenate their resources, the trailing envelope's fields win."""
    one, two = response(["a.ns-1"], version="1", nonce="x"), response(["b.ns-2", "c.ns-3"], version="2")
    env = wire.envelope(type_url=SYNCZ, version_info="merged", nonce="n", control_plane_identifier="<external>")
    merged = discovery_pb2.DiscoveryResponse.FromString(one + two + env)
    ids = [csds_pb2.ClientConfig.FromString(r.value).node.id for r in merged.resources]
    assert ids == ["a.ns-1", "b.ns-2", "c.ns-3"]
    assert (merged.version_info, merged.nonce, merged.control_plane.identifier) == ("merged", "n", "<external>")


def test_envelope_without_identifier_leaves_the_bodies_control_plane() -> None:
    raw = response(["a.ns-1"]) + wire.envelope(type_url=SYNCZ, version_info="v", nonce="n")
    assert discovery_pb2.DiscoveryResponse.FromString(raw).control_plane.identifier == "istiod-0"


def test_client_config_decodes_syncz_resources_and_refuses_others() -> None:
    good = syncz_resource("a.ns-1").SerializeToString()
    assert wire.client_config(good).node.id == "a.ns-1"
    other = any_pb2.Any()
    other.Pack(base_pb2.Node(id="x"))
    with pytest.raises(WireError, match="not a ClientConfig"):
        wire.client_config(other.SerializeToString())
    with pytest.raises(WireError, match="undecodable"):
        wire.client_config(b"\x0a\x05ab")


def test_any_type_url_reads_field_one_only() -> None:
    assert wire.any_type_url(syncz_resource("a").SerializeToString()) == wire.CLIENT_CONFIG_URL
    assert wire.any_type_url(b"\x12\x01x") == b""


def test_syncz_node_id_reads_three_nested_first_fields() -> None:
    assert wire.syncz_node_id(syncz_resource("sidecar~10.0.0.1~a.ns-1~ns-1.svc.cluster.local").SerializeToString()) \
        == "sidecar~10.0.0.1~a.ns-1~ns-1.svc.cluster.local"
    no_node = any_pb2.Any()
    no_node.Pack(csds_pb2.ClientConfig())
    assert wire.syncz_node_id(no_node.SerializeToString()) == ""
    with pytest.raises(WireError, match="not UTF-8"):
        # Any{2: ClientConfig{1: Node{1: b"\xff"}}}
        wire.syncz_node_id(b"\x12\x05\x0a\x03\x0a\x01\xff")


def test_fast_index_declines_what_it_cannot_prove() -> None:
    assert wire.syncz_fast_index(b"\x0b") is None  # not a response
    long_id = "x" * 200  # ids of 128+ bytes have a two-byte length: the exact reader's job
    assert wire.syncz_fast_index(response([long_id])) is None
    # A resource quoting the ClientConfig type URL inside its id: the chain reads each layout from its own
    # resource's header, so the quote is only an id (the count of URL headers used to make it decline).
    quoted = wire.syncz_fast_index(response([wire.CLIENT_CONFIG_URL.decode(), "b"]))
    assert quoted is not None and quoted.node_keys == [wire.CLIENT_CONFIG_URL.decode(), "b"]
    index = wire.syncz_fast_index(response(["a.ns-1", "b.ns-2"]))
    assert index is not None
    assert (index.count, index.type_url, index.version_info, index.identifier()) == (2, SYNCZ, "v1", "istiod-0")
    assert index.node_keys == ["a.ns-1", "b.ns-2"]


ids = st.lists(st.text(min_size=1, max_size=150), max_size=8)


@settings(max_examples=200, deadline=None)
@given(ids=ids, version=st.text(max_size=20), identifier=st.none() | st.text(max_size=30))
def test_the_byte_readers_agree_with_protobuf(ids: list[str], version: str, identifier: str | None) -> None:
    raw = response(ids, version=version, identifier=identifier)
    view = wire.view_response(raw)
    assert (len(view.resources), view.version_info, view.identifier()) == (len(ids), version, identifier)
    assert [wire.syncz_node_id(view.resource_any(i)) for i in range(len(ids))] == ids
    index = wire.syncz_fast_index(raw)
    if index is not None:  # when it answers, it answers exactly
        assert index.count == len(ids) and index.node_keys == ids


# -- The split path's batch readers agree with the one-by-one readers ---------------------------------------


def _node_bytes(node_id: str, namespace: str | None) -> bytes:
    node = base_pb2.Node(id=node_id)
    if namespace is not None:
        node.metadata.fields["NAMESPACE"].string_value = namespace
    node.metadata.fields["CLUSTER_ID"].string_value = "Kubernetes"
    return bytes(node.SerializeToString())


_HOSTILE_NODE_EDITS = st.sampled_from([
    lambda n: n,
    lambda n: n + b"\n\x03bad",  # a second id: the readers take the first, protobuf the last
    lambda n: b"\x12\x01x" + n,  # another field before the id
    lambda n: b"\n\x02\xff\xfe" + n,  # a non-UTF-8 first id
    lambda n: n[:-1],  # cut: the metadata does not decode
    lambda n: n + b"\x3a\x05\n\x03\n\x01N",  # a second metadata Struct, merged by protobuf
    lambda n: n + b"\x0b",  # an unterminated group
    lambda n: b"\x08\x05" + n,  # field 1 as a varint first
    # No id field at all: beside a node with two, the id fields still number one per node (the first byte tells).
    lambda n: n[2 + n[1]:] if n[:1] == b"\n" and n[1] < 0x80 else n,
    lambda n: n + b"\x1a\x00" * 8300,  # 16 KiB and more (framed one by one): empty metadata Structs, merged
    lambda n: n + b"\x0a\x00",  # a second, empty id: protobuf's id is ""
    # A second metadata Struct (field 3), merged by protobuf: its NAMESPACE is the last entry for the key.
    lambda n: n + bytes(base_pb2.Node(metadata=struct_pb2.Struct(
        fields={"NAMESPACE": struct_pb2.Value(string_value="ns-2")})).SerializeToString()),
    lambda n: n + bytes(base_pb2.Node(metadata=struct_pb2.Struct(
        fields={"NAMESPACE": struct_pb2.Value(number_value=1)})).SerializeToString()),  # not a string: ""
])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=140), st.sampled_from([None, "", "ns-1", "ns-ü"]), _HOSTILE_NODE_EDITS,
                          st.integers(0, 40), st.integers(0, 255)), max_size=12))
def test_nodes_read_together_as_one_by_one(nodes: list[tuple[str, str | None, object, int, int]]) -> None:
    # The cold memo decodes all new nodes with one upb call; every answer must be _node_facts' own.
    raw = []
    for node_id, namespace, edit, at, byte in nodes:
        node = edit(_node_bytes(node_id, namespace))  # type: ignore[operator]
        if at % 3 == 0 and node:
            node = node[: at % len(node)] + bytes([byte]) + node[at % len(node) + 1 :]  # one byte flipped
        raw.append(node)
    assert wire._nodes_facts(raw) == [wire._node_facts(n) for n in raw]


def _cc_resource(cc: bytes) -> tuple[bytes, bytes]:
    """(resource field, Any) for an Any exactly {ClientConfig URL, value=cc}: the split path's layout."""
    any_bytes = wire._URL_HEADER + b"\x12" + wire._varint_bytes(len(cc)) + cc
    return b"\x12" + wire._varint_bytes(len(any_bytes)) + any_bytes, any_bytes


_CC_TAILS = st.sampled_from([
    b"",
    b"\n\x00",  # a second node: istioctl merges the two
    b"\x1a\x04\x12\x02ab",  # a generic_xds_config
    b"\x4b\x08\x01\x4c",  # a well-formed unknown group (field 9): protobuf (Go too) keeps it as unknown
    b"\x4b\x08\x01",  # an unterminated group
    b"\x08\x05",  # field 1 as a varint: protobuf treats it as an unknown field, not a node
    b"\x0c",  # an end-group tag out of place
    b"\x22\x05ab",  # a string running past the value
    b"\x0a\x81\x01",  # a node whose length runs past the value
])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a.ns-1", "b.ns-2", ""]), _CC_TAILS), min_size=1, max_size=8))
def test_kept_one_node_counts_as_one_node_does(resources: list[tuple[str, bytes]]) -> None:
    # One upb parse over a merged answer's kept resources must say what one_node says of each of them.
    fields, anys = [], []
    for node_id, tail in resources:
        node = _node_bytes(node_id, "ns-1")
        field, any_bytes = _cc_resource(b"\n" + wire._varint_bytes(len(node)) + node + tail)
        fields.append(field)
        anys.append(any_bytes)
    envelope = wire.envelope(type_url=SYNCZ, version_info="v", nonce="n", control_plane_identifier="x")
    body = b"".join(fields) + envelope
    assert wire.kept_one_node(body, len(fields)) == all(map(wire.one_node, anys))


def test_one_node_follows_protobuf_for_groups_and_wire_types() -> None:
    node = _node_bytes("a.ns-1", "ns-1")
    head = b"\n" + wire._varint_bytes(len(node)) + node
    _, kept_group = _cc_resource(head + b"\x4b\x08\x01\x4c")
    _, varint_one = _cc_resource(head + b"\x08\x05")
    _, two_nodes = _cc_resource(head + head)
    _, varint_first = _cc_resource(b"\x08\x05" + head)
    # What istioctl decodes: one node in the first two, so the scope's reading is the caller's.
    for any_bytes in (kept_group, varint_one):
        assert wire.client_config(any_bytes).node.id == "a.ns-1"
        assert wire.one_node(any_bytes)
    assert not wire.one_node(two_nodes)
    # The node the readers take must be the one protobuf decodes: not when a varint field 1 comes first.
    assert not wire.one_node(varint_first)


def test_split_client_configs_decode_as_client_config_does() -> None:
    configs = [csds_pb2.ClientConfig(node=base_pb2.Node(id=f"p{i}.ns-1")) for i in range(3)]
    fields = [_cc_resource(c.SerializeToString())[0] for c in configs]
    decoded = wire.split_client_configs(fields)
    assert decoded is not None
    assert [c.SerializeToString() for c in decoded] == \
        [wire.client_config(_cc_resource(c.SerializeToString())[1]).SerializeToString() for c in configs]
    # One that does not decode (a string field running past its value): None, the caller reads each on its own.
    bad, bad_any = _cc_resource(b"\x22\x05ab")
    with pytest.raises(WireError):
        wire.client_config(bad_any)
    assert wire.split_client_configs([*fields, bad]) is None


def test_view_response_rejects_envelope_fields_the_caller_could_not_decode() -> None:
    # resource_errors (7) that is not a message: iter_fields frames it, the caller's decoder refuses the answer.
    raw = response(["a.ns-1"]) + b"\x3a\x03\x08\x05\xff"
    with pytest.raises(WireError, match="could not decode"):
        wire.view_response(raw)
    assert wire.syncz_fast_index(raw) is None and wire.syncz_split(raw, wire.SynczMemo()) is None


@settings(max_examples=150, deadline=None)
@given(sizes=st.lists(st.integers(min_value=0, max_value=6), min_size=1, max_size=4), data=st.data())
def test_join_dropping_is_join_kept_with_those_flags_cleared(sizes: list[int], data: st.DataObject) -> None:
    memo = wire.SynczMemo()
    splits = [wire.syncz_split(response([f"p{i}-{j}.ns" for j in range(n)]), memo) for i, n in enumerate(sizes)]
    assert all(s is not None for s in splits)
    cut = [s for s in splits if s is not None]
    total = sum(sizes)
    dropped = sorted(data.draw(st.sets(st.integers(min_value=0, max_value=max(total - 1, 0)))) if total else [])
    keep = [g not in dropped for g in range(total)]
    assert b"".join(wire.join_dropping(cut, dropped)) == b"".join(wire.join_kept(cut, keep))
    assert b"".join(wire.join_dropping(cut, [])) == b"".join(wire.join_kept(cut, [True] * total))
