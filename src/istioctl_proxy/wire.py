"""Byte-level reading and writing of the few protobuf fields the merge needs.

Protobuf merge semantics make the syncz merge a byte operation: concatenating serialized messages is
`MergeFrom` — repeated fields (the resources) concatenate, a later singular field wins. So the merged
answer is the replicas' bodies (or chosen resource spans) followed by one small envelope that overrides
`version_info`, `nonce`, `type_url` and `control_plane`. Resources are never decoded here unless a
caller of this module asks for a node id or namespace.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import accumulate, compress, repeat
from operator import add, gt, itemgetter, le, not_
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.status.v3 import csds_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

from .errors import WireError

# DiscoveryResponse field numbers (envoy/service/discovery/v3/discovery.proto).
_VERSION_INFO, _RESOURCES, _TYPE_URL, _NONCE, _CONTROL_PLANE = 1, 2, 4, 5, 6
_LEN = 2  # wire type of length-delimited fields
_ENVELOPE = frozenset({_VERSION_INFO, _RESOURCES, _TYPE_URL, _NONCE, _CONTROL_PLANE})


@dataclass(frozen=True)
class _Lite:
    """Private message types that let upb count and collect what the syncz merge reads, many resources at once.

    Nodes1 is a ClientConfig seen only as its node fields (field 1, kept as bytes); Any1 an Any seen only as
    its values (field 2). ResourcesMerged is a DiscoveryResponse whose resources (field 2) and their values are
    *singular*: parsing concatenated resources merges them, so `resources.value.node` lists every node field
    of every resource. NodeList is any number of envoy Nodes, decoded in one call; ClientConfigs resource fields
    whose Any values are decoded as ClientConfigs (the type URL as any string: checked by the caller).
    """

    any_values: type[Message]
    resources_merged: type[Message]
    node_list: type[Message]
    client_configs: type[Message]
    ids_merged: type[Message]
    node_list_ids: type[Message]


def _lite() -> _Lite:
    # Versioned: the bench imports an older wire.py beside this one (--merge-baseline), into the same pool.
    name, package = "istioctl_proxy/wire_lite_3.proto", "istioctl_proxy.wire_lite_3"
    pool = descriptor_pool.Default()
    try:
        file = pool.FindFileByName(name)
    except KeyError:
        proto = descriptor_pb2.FileDescriptorProto(name=name, package=package, syntax="proto3",
                                                   dependency=[base_pb2.DESCRIPTOR.name, csds_pb2.DESCRIPTOR.name])
        f = descriptor_pb2.FieldDescriptorProto
        rows: list[tuple[str, str, int, int, str]] = [
            ("Nodes1", "node", 1, f.LABEL_REPEATED, ""),
            ("Any1", "value", 2, f.LABEL_REPEATED, f".{package}.Nodes1"),
            ("AnyMerged", "value", 2, f.LABEL_OPTIONAL, f".{package}.Nodes1"),
            ("ResourcesMerged", "resources", 2, f.LABEL_OPTIONAL, f".{package}.AnyMerged"),
            ("NodeList", "nodes", 1, f.LABEL_REPEATED, ".envoy.config.core.v3.Node"),
            ("ClientConfigAny", "value", 2, f.LABEL_OPTIONAL, ".envoy.service.status.v3.ClientConfig"),
            ("ClientConfigs", "resources", 2, f.LABEL_REPEATED, f".{package}.ClientConfigAny"),
            # IdsMerged: a DiscoveryResponse whose resources, values and nodes merge; its repeated `id` collects
            # every id field (field 1; a proto3 string: upb refuses one that is not UTF-8) of every node field of
            # every value, in order.
            ("NodeIds", "id", 1, f.LABEL_REPEATED, "string"),
            ("ClientConfigIds", "node", 1, f.LABEL_OPTIONAL, f".{package}.NodeIds"),
            ("AnyIds", "value", 2, f.LABEL_OPTIONAL, f".{package}.ClientConfigIds"),
            ("IdsMerged", "resources", 2, f.LABEL_OPTIONAL, f".{package}.AnyIds"),
            # NodeListIds: a node list (NodeList's framing) whose nodes merge: `node.id` is every id field of every
            # node, in order.
            ("NodeListIds", "node", 1, f.LABEL_OPTIONAL, f".{package}.NodeIds"),
        ]
        # The other fields of the merged messages as known repeated bytes: upb keeps each as a span, where as
        # unknown fields it appended them to one buffer per merged message, growing to megabytes (~2-3 × slower
        # and erratic). A field of another wire type is still unknown; the counts above are unchanged.
        for message, numbers in (("Nodes1", range(2, 6)), ("AnyMerged", (1,)), ("NodeIds", range(2, 16)),
                                 ("ClientConfigIds", range(2, 6)), ("AnyIds", (1,))):
            rows += [(message, f"other{n}", n, f.LABEL_REPEATED, "") for n in numbers]
        messages: dict[str, descriptor_pb2.DescriptorProto] = {}
        for message, field_name, number, label, type_name in rows:
            if message not in messages:
                messages[message] = proto.message_type.add(name=message)
            one = messages[message].field.add(name=field_name, number=number, label=label)
            one.type = f.TYPE_STRING if type_name == "string" else f.TYPE_MESSAGE if type_name else f.TYPE_BYTES
            if type_name.startswith("."):
                one.type_name = type_name
        pool.Add(proto)
        file = pool.FindFileByName(name)
    classes = {n: message_factory.GetMessageClass(d) for n, d in file.message_types_by_name.items()}
    return _Lite(classes["Any1"], classes["ResourcesMerged"], classes["NodeList"], classes["ClientConfigs"],
                 classes["IdsMerged"], classes["NodeListIds"])


_LITE = _lite()


def _varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise WireError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError("varint too long")


def iter_fields(buf: bytes | memoryview) -> Iterator[tuple[int, int, int, int, int]]:
    """Yield (field number, wire type, field start, value start, field end) for each top-level field."""
    pos, end = 0, len(buf)
    while pos < end:
        start = pos
        key, pos = _varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = _varint(buf, pos)
            value_start = start
        elif wire_type == _LEN:
            length, value_start = _varint(buf, pos)
            pos = value_start + length
        elif wire_type == 1:
            value_start, pos = pos, pos + 8
        elif wire_type == 5:
            value_start, pos = pos, pos + 4
        else:
            raise WireError(f"unsupported wire type {wire_type}")
        if pos > end or number == 0:
            raise WireError("truncated or invalid field")
        yield number, wire_type, start, value_start, pos


@dataclass
class ResponseView:
    """A DiscoveryResponse as spans of its own bytes: nothing decoded but the envelope strings."""

    raw: bytes
    resources: list[tuple[int, int]] = field(default_factory=list)  # (start, end) of each field incl. tag
    resource_values: list[tuple[int, int]] = field(default_factory=list)  # the Any inside each
    type_url: str = ""
    version_info: str = ""
    control_plane: bytes | None = None

    def resource_bytes(self, i: int) -> bytes:
        """Resource `i` as its field bytes (tag, length and value): concatenable into a response."""
        start, end = self.resources[i]
        return self.raw[start:end]

    def resource_any(self, i: int) -> bytes:
        """Resource `i`'s value: a serialized google.protobuf.Any."""
        start, end = self.resource_values[i]
        return self.raw[start:end]

    def identifier(self) -> str | None:
        """control_plane.identifier, None if absent or undecodable."""
        if self.control_plane is None:
            return None
        try:
            cp = base_pb2.ControlPlane.FromString(self.control_plane)
        except DecodeError:
            return None  # unreadable: the merge takes another replica's identifier; never fail the call
        return str(cp.identifier)


def view_response(raw: bytes) -> ResponseView:
    """Index a serialized DiscoveryResponse; raises WireError if it is not one."""
    view = ResponseView(raw)
    mv = memoryview(raw)
    others: list[memoryview] = []
    try:
        for number, wire_type, start, value_start, end in iter_fields(mv):
            if number in _ENVELOPE and wire_type != _LEN:
                # upb would skip it as an unknown field; a "resource" that is not one must not count as one.
                raise WireError(f"field {number} has wire type {wire_type}, not length-delimited")
            if number == _RESOURCES:
                view.resources.append((start, end))
                view.resource_values.append((value_start, end))
                continue
            others.append(mv[start:end])
            if number == _TYPE_URL:
                view.type_url = bytes(mv[value_start:end]).decode()
            elif number == _VERSION_INFO:
                view.version_info = bytes(mv[value_start:end]).decode()
            elif number == _CONTROL_PLANE:
                view.control_plane = bytes(mv[value_start:end])
                base_pb2.ControlPlane.FromString(view.control_plane)  # its identifier must be valid UTF-8
            elif number == _NONCE:
                bytes(mv[value_start:end]).decode()  # passed through with the body: the caller would reject it
    except UnicodeDecodeError as err:
        raise WireError(f"invalid UTF-8 in envelope: {err}") from err
    except DecodeError as err:
        raise WireError(f"malformed control_plane: {err}") from err
    try:
        # The other fields pass through to the caller, whose decoder reads every known one (resource_errors, a
        # field number out of protobuf's range...): what it would refuse is this replica's fault, not the answer's.
        discovery_pb2.DiscoveryResponse.FromString(b"".join(others))
    except DecodeError as err:
        raise WireError(f"envelope fields the caller could not decode: {err}") from err
    return view


def envelope(
    *, type_url: str, version_info: str, nonce: str, control_plane_identifier: str | None = None
) -> bytes:
    """The trailing fields that override whatever the concatenated bodies set."""
    resp = discovery_pb2.DiscoveryResponse(type_url=type_url, version_info=version_info, nonce=nonce)
    if control_plane_identifier is not None:
        resp.control_plane.identifier = control_plane_identifier
    return bytes(resp.SerializeToString())


def client_config(any_bytes: bytes) -> csds_pb2.ClientConfig:
    """Decode one syncz resource (a google.protobuf.Any holding a ClientConfig)."""
    from google.protobuf import any_pb2

    try:
        msg = any_pb2.Any.FromString(any_bytes)
        cfg = csds_pb2.ClientConfig()
        if not msg.Unpack(cfg):
            raise WireError(f"resource is {msg.type_url}, not a ClientConfig")
    except DecodeError as err:
        raise WireError(f"undecodable ClientConfig: {err}") from None
    return cfg


def any_type_url(any_bytes: bytes) -> bytes:
    """The type URL of a serialized Any (field 1), read without decoding its value.

    As protobuf (istioctl) decodes it: the last occurrence wins, and one of another wire type is an unknown
    field (the first occurrence let a replica show a scoped caller a resource it decodes as another type).
    """
    url = b""
    for number, wire_type, _start, value_start, end in iter_fields(any_bytes):
        if number == 1 and wire_type == _LEN:
            url = bytes(any_bytes[value_start:end])
    return url


def _first_field(mv: memoryview, path: Sequence[int]) -> memoryview | None:
    """The value of the first field `path[0]`, then within it the first `path[1]`, ...; None if one is missing."""
    for path_number in path:
        for number, _wire_type, _start, value_start, end in iter_fields(mv):
            if number == path_number:
                mv = mv[value_start:end]
                break
        else:
            return None
    return mv


def syncz_node_id(any_bytes: bytes) -> str:
    """The node id of a syncz resource, read without decoding the rest of it.

    Any{1: type_url, 2: value=ClientConfig{1: node=Node{1: id}}}: three nested first fields.
    """
    mv = _first_field(memoryview(any_bytes), (2, 1, 1))
    return "" if mv is None else _utf8_id(mv)


def _utf8_id(mv: memoryview) -> str:
    try:
        return bytes(mv).decode()
    except UnicodeDecodeError as err:
        raise WireError("node id is not UTF-8") from err


def node_namespace(node: bytes | memoryview) -> str:
    """NAMESPACE of a serialized Node ("" without it, or if the Node does not decode).

    Without NAMESPACE istiod takes the namespace from the node id's DNS domain, which syncz does not carry
    (the id's ".<ns>" suffix is the proxy's own claim): in no namespace then, never shown to a scoped caller.
    """
    try:
        ns = base_pb2.Node.FromString(bytes(node)).metadata.fields.get("NAMESPACE")
    except DecodeError:
        return ""
    return str(ns.string_value) if ns is not None else ""


def _first_len(mv: memoryview, number: int) -> memoryview | None:
    """The value of the first field `number` if it is length-delimited; None if it is missing or is not."""
    for n, wire_type, _start, value_start, end in iter_fields(mv):
        if n == number:
            return mv[value_start:end] if wire_type == _LEN else None
    return None


def one_node(any_bytes: bytes) -> bool:
    """Does the Any carry its value once, and that ClientConfig its node once, as protobuf decodes them?

    The readers here take a field's first occurrence; protobuf (istioctl) keeps the last value and merges
    repeated messages. Only with one of each is the node they read the node the caller decodes. Counted by
    upb with protobuf's own rules (a field of another wire type is an unknown field, as in Go), so that the
    split path can count a whole answer's at once (kept_one_node) and agree resource by resource.
    """
    try:
        value = _first_len(memoryview(any_bytes), 2)
        if value is None or _first_len(value, 1) is None:
            return False  # the node the readers take is not one protobuf would decode as the node
        parsed: Any = _LITE.any_values.FromString(any_bytes)
    except (WireError, DecodeError):
        return False
    return len(parsed.value) == 1 and len(parsed.value[0].node) == 1


def syncz_namespace(any_bytes: bytes) -> str:
    """The namespace of a syncz resource: that of its ClientConfig's (first) node, see node_namespace."""
    try:
        node = _first_field(memoryview(any_bytes), (2, 1))
    except WireError:
        return ""
    return "" if node is None else node_namespace(node)


# -- The syncz fast path ---------------------------------------------------------------------------------
# Reading node ids field by field in Python costs ~10 µs per resource (≈300 ms for 30k proxies). The fast
# path does the same work at C speed: one regex pass captures every resource's header (its value's and node's
# length prefixes) and node id, and the split path's chain proves that each capture is a resource's own header
# (syncz_fast_index, after the split path's helpers it reuses). It answers only with the exact reader's reading;
# otherwise it returns None and the field-by-field reader decides.

CLIENT_CONFIG_URL = b"type.googleapis.com/envoy.service.status.v3.ClientConfig"
_VARINT = rb"[\x80-\xff]{0,9}[\x00-\x7f]"


# -- The syncz split path ----------------------------------------------------------------------------------
# Scoped callers and answers with a proxy on two replicas need each resource's bytes, node id and namespace.
# One regex split cuts an answer at its resources; the cuts are then proven to be the exact field boundaries
# (every resource's own length prefix must agree, the bytes around them must be envelope fields only), so
# nothing is trusted to the regex. Ids and namespaces are read from each resource's node by the exact
# reader's own functions, memoised by the node's bytes (SynczMemo): proxies and their nodes outlive calls.

def _varint_bytes(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_URL_HEADER = b"\n" + bytes([len(CLIENT_CONFIG_URL)]) + CLIENT_CONFIG_URL  # an Any's type URL field
# An Any's header up to its node's length: Any{1: ClientConfig URL, 2: ClientConfig{1: node, ...}}. It starts
# with the URL, a literal, so sre finds it by string search. One group (a list of bytes, not of tuples, which
# the garbage collector would have to visit): the value's length prefix, the node's tag and length prefix.
_RESOURCE_HEAD = re.compile(re.escape(_URL_HEADER) + b"\\x12(" + _VARINT + b"\\n" + _VARINT + b")")

_Layout = tuple[bytes, int, int, int]


def _resource_layout(key: bytes) -> _Layout | None:
    """For a resource whose Any is exactly {URL, value} and whose header ends in `key` (value length prefix,
    node tag, node length prefix): the field's bytes up to the end of the key (tag, length, URL field, value tag,
    key), the field's size, the node's offset in the field and the node's length. None if the node overflows
    the value."""
    value, at = _varint(key, 0)
    node_length, end = _varint(key, at + 1)
    if end - at + node_length > value:
        return None
    any_length = len(_URL_HEADER) + 1 + at + value
    header = b"\x12" + _varint_bytes(any_length) + _URL_HEADER
    return header + b"\x12" + key, len(header) - len(_URL_HEADER) + any_length, len(header) + 1 + end, node_length


@dataclass(frozen=True)
class SynczSplit:
    """A syncz answer cut at its resources, every cut proven to be a field boundary."""

    raw: bytes
    starts: list[int]  # resource i is raw[starts[i]:starts[i + 1]] (tag, length, Any), byte for byte as sent
    layouts: list[_Layout]  # resource i's layout: its node (its ClientConfig's first field) is at node_spans[i]
    envelope: ResponseView  # everything else: version, type URL, nonce, control plane

    @property
    def count(self) -> int:
        return len(self.starts) - 1

    @property
    def nodes(self) -> list[bytes]:
        """The serialized Node of each resource (read when first asked: unscoped callers may not need them)."""
        return self._nodes[0]

    @property
    def one_node_each(self) -> bool:
        """Does every resource carry one node, as protobuf decodes it (see one_node)? Each has one value: the
        chain proves each Any is exactly {URL, value}."""
        return self._nodes[1]

    @cached_property
    def _nodes(self) -> tuple[list[bytes], bool]:
        # One upb parse (as kept_one_node's) lists every node field of every resource's value, in order: each
        # resource has one where its layout says (its value's first field), so there are as many as resources
        # exactly when that is each one's only one, and then node i is resource i's. Else sliced one by one.
        try:
            merged: Any = _LITE.resources_merged.FromString(self.raw)
            nodes = list(merged.resources.value.node)
            if len(nodes) == self.count:
                return nodes, True
        except DecodeError:
            pass
        return list(map(self.raw.__getitem__, self.node_spans)), False

    @property
    def node_spans(self) -> list[slice]:
        """raw[node_spans[i]] is resource i's node."""
        node_starts = list(map(add, self.starts, map(itemgetter(2), self.layouts)))
        return list(map(slice, node_starts, map(add, node_starts, map(itemgetter(3), self.layouts))))

    def resource_any(self, i: int) -> bytes:
        """The Any of resource i (without the resource field's tag and length)."""
        _, start = _varint(self.raw, self.starts[i] + 1)
        return self.raw[start : self.starts[i + 1]]

    def resource_field(self, i: int) -> bytes:
        """Resource i as sent: the field's tag, length and Any."""
        return self.raw[self.starts[i] : self.starts[i + 1]]

    def ids_of(self, index: SynczIndex) -> list[str] | None:
        """The fast index's node ids of this same answer as this split's node ids, or None if they are not.

        Both readings enumerate the ClientConfig URL's occurrences in order (each proves one per resource), so
        id i is read at resource i's header; the fast index proved it is the exact reader's id of that node.
        """
        return index.node_keys if index.count == self.count else None


@dataclass
class SynczMemo:
    """What the split path reads again and again, as pure functions of bytes; bounded, shared by calls.

    Node bytes → (node id, namespace), as the exact reader reads them: a proxy's node (id and metadata) does
    not change while it is connected, so the same nodes come back on every call (real istiod lists them in
    another order each call, its metadata keys too: a few byte forms per node). And resource header endings
    → layouts (a few hundred distinct ones). A remembered answer is the exact one. Nothing is keyed by the
    order of a whole answer's nodes: with real istiod that never repeats (red team stop 22, R1).
    """

    max_entries: int = 200_000
    # Node bytes are the proxies' own metadata (labels, annotations): a count alone would let 200k large or
    # churning nodes hold gigabytes across calls. The keys' bytes are bounded too.
    max_bytes: int = 64 * 1024 * 1024
    _facts: dict[bytes, tuple[str, str] | None] = field(default_factory=dict)
    _layouts: dict[bytes, _Layout | None] = field(default_factory=dict)
    _fast_layouts: dict[bytes, _Layout | None] = field(default_factory=dict)
    _key_bytes: dict[int, int] = field(default_factory=dict)  # id(memo dict) → bytes of its keys
    _copy_facts: dict[bytes, tuple[str | None, int]] = field(default_factory=dict)  # see copy_facts

    def facts(self, nodes: Sequence[bytes]) -> list[tuple[str, str]] | None:
        """(id, namespace) of every node, or None if the exact reader would reject one of their ids."""
        return self._remember(self._facts, _nodes_facts, nodes)

    def copy_facts(
        self, fields: Sequence[bytes], read: Callable[[list[bytes]], list[tuple[str | None, int]]]
    ) -> list[tuple[str | None, int]] | None:
        """`read` of these resource fields (copies of proxies listed twice: the id and stamp the caller decodes),
        remembered by the fields' bytes like the nodes' facts: a copy that did not change since the last call is
        not decoded again."""
        return self._remember(self._copy_facts, read, fields)

    def layouts(self, keys: Sequence[bytes]) -> list[_Layout] | None:
        return self._remember(self._layouts, lambda missing: list(map(_resource_layout, missing)), keys)

    def fast_layouts(self, keys: Sequence[bytes]) -> list[_Layout] | None:
        return self._remember(self._fast_layouts, lambda missing: list(map(_fast_layout, missing)), keys)

    def _remember(
        self, memo: dict[bytes, Any], fn: Callable[[list[bytes]], list[Any]], keys: Sequence[bytes]
    ) -> list[Any] | None:
        found = list(map(memo.get, keys))
        if not all(found):  # a missing key (None); what fn returns is a non-empty tuple or None
            # Each distinct missing key read once (C-level passes: on a first call every key is missing).
            new = list(dict.fromkeys(compress(keys, map(not_, found))))
            values = fn(new)
            size = self._key_bytes.get(id(memo), 0)
            added = sum(map(len, new))  # none of them is in memo: they were missing, and a clear adds none
            if len(memo) + len(new) > self.max_entries or size + added > self.max_bytes:
                memo.clear()
                size = 0
            read = memo
            if added <= self.max_bytes and len(new) <= self.max_entries:
                size += added
                memo.update(zip(new, values, strict=True))
            else:  # read, not remembered
                read = dict(zip(new, values, strict=True))
            self._key_bytes[id(memo)] = size
            found = list(map(read.get, keys, found))  # a key read now, else what it was found as before
            if not all(found):
                return None
        return found


def syncz_split(raw: bytes, memo: SynczMemo) -> SynczSplit | None:
    """Cut a syncz answer at its resources, or None when the exact reader must decide (see merge.py).

    Only Anys that are exactly {type URL, ClientConfig} are cut (what istiod sends). The regex proposes the
    cuts; they are then proven: every resource field's own header, up to the end of the key its layout was read
    from, must sit where the previous field ended, from the envelope before the first resource to the envelope
    after the last. So each layout is read from its own resource's bytes, whichever capture proposed it (a header
    quoted inside a resource proposes one too many: the chain then ends inside the envelope and breaks).
    """
    found = _RESOURCE_HEAD.findall(raw)
    try:
        if not found:
            view = view_response(raw)
            return None if view.resources else SynczSplit(raw, [0], [], view)
        layouts = memo.layouts(found)
        if layouts is None:
            return None
        # Field by field (zip(*layouts) would make an iterator per resource).
        headers, sizes = list(map(itemgetter(0), layouts)), map(itemgetter(1), layouts)
        starts = list(accumulate(sizes, initial=raw.find(_URL_HEADER) - headers[0].find(_URL_HEADER)))
        if starts[0] < 0 or starts[-1] > len(raw) or not all(map(raw.startswith, headers, starts)):
            return None
        # Around the resources: envelope fields only, each complete on its side.
        prefix, suffix = raw[: starts[0]], raw[starts[-1]:]
        if view_response(prefix).resources or view_response(suffix).resources:
            return None
        envelope = view_response(prefix + suffix)
    except WireError:
        return None
    return SynczSplit(raw, starts, layouts, envelope)


# Any{1: ClientConfig URL, 2: ClientConfig{1: Node{1: id, ...}}} up to the id's one-byte length: one group, the
# fast layout key (the value's length prefix, the node's tag and length prefix, the id's tag and length). The id
# itself is not captured: one alternative per id length made sre try ~60 of them per resource (a third of the
# fast path's time); upb collects the ids instead (_LITE.ids_merged), and the layouts prove they are these.
_FAST_HEAD = re.compile(re.escape(_URL_HEADER) + b"\\x12(" + _VARINT + b"\\n" + _VARINT + b"\\n[\\x00-\\x7f])")


def _fast_layout(key: bytes) -> _Layout | None:
    """_resource_layout of a fast key (its split key, then the id's tag and one-byte length), None unless the
    id field lies inside its node."""
    layout = _resource_layout(key[:-2])
    if layout is None or key[-1] + 2 > layout[3]:
        return None
    return layout[0] + key[-2:], *layout[1:]


@dataclass(frozen=True)
class SynczIndex:
    """What the syncz merge needs from one replica's answer, read without touching Python per resource."""

    count: int
    type_url: str
    version_info: str
    control_plane: bytes | None
    node_keys: list[str]  # one per resource: its node id (as the exact reader reads it)
    ident: str | None = None  # the control plane identifier, as the exact reader decodes it
    # The chain the index proved (raw, resource starts, layouts, envelope), for `split`.
    cut: tuple[bytes, list[int], list[_Layout], ResponseView] | None = field(default=None, compare=False, repr=False)

    def identifier(self) -> str | None:
        """control_plane.identifier, None if absent."""
        return self.ident

    @cached_property
    def split(self) -> SynczSplit | None:
        """The same answer cut at its resources: what syncz_split returns for it (made when first asked)."""
        if self.cut is None:
            return None
        raw, starts, layouts, view = self.cut
        return SynczSplit(raw, starts, layouts, view)


def syncz_fast_index(raw: bytes, memo: SynczMemo | None = None) -> SynczIndex | None:
    """Index a syncz answer at C speed, or None when only the exact reader can be trusted with it.

    Nothing is taken on the regex's word. It is trusted only when (as in syncz_split) every resource field's
    header, up to its id's tag and length, is where the previous field ended and is the bytes its layout was read
    from (so the layout is that resource's own, whichever capture proposed it), from the envelope before the
    first resource to the envelope after the last, each Any is exactly {ClientConfig URL, value}, each node lies
    inside its value and each node's first field, the id with a one-byte length, inside its node: then the exact
    reader reads the same resources, the same ids and the same envelope, and rejects nothing. A node shorter
    than its id field, or a resource that swallows the next one's header, breaks the proof.

    The ids are upb's: parsed as the private IdsMerged, every id field (field 1) of every node field of every
    resource's value, in order. Each resource has one where the layout says (its node's first field), so there
    are as many as resources exactly when that is each one's only one, and then id i is resource i's.
    """
    found = _FAST_HEAD.findall(raw)
    cut = None
    try:
        if not found:
            view = view_response(raw)
            if view.resources:
                return None
            ids: list[str] = []
        else:
            layouts = (memo or SynczMemo()).fast_layouts(found)
            if layouts is None:
                return None  # a node that overflows its value, or an id field its node
            headers, sizes = list(map(itemgetter(0), layouts)), map(itemgetter(1), layouts)
            first = raw.find(_URL_HEADER) - headers[0].find(_URL_HEADER)
            starts = list(accumulate(sizes, initial=first))
            if first < 0 or starts[-1] > len(raw) or not all(map(raw.startswith, headers, starts)):
                return None
            prefix, suffix = raw[:first], raw[starts[-1]:]
            if view_response(prefix).resources or view_response(suffix).resources:
                return None
            view = view_response(prefix + suffix)
            merged: Any = _LITE.ids_merged.FromString(raw)  # DecodeError: an id that is not UTF-8, ...
            ids = list(merged.resources.value.node.id)
            if len(ids) != len(found):
                return None  # a second id field, or a second node or value, in some resource
            cut = (raw, starts, layouts, view)
    except (WireError, DecodeError):
        return None
    return SynczIndex(len(found), view.type_url, view.version_info, view.control_plane, ids,
                      view.identifier(), cut)


def _node_facts(node: bytes) -> tuple[str, str] | None:
    """(id, namespace) of a serialized Node; None if the exact reader would reject its id."""
    try:
        id_mv = _first_field(memoryview(node), (1,))
        node_id = "" if id_mv is None else _utf8_id(id_mv)
    except WireError:
        return None
    return node_id, node_namespace(node)


# Each node list field's tag and length prefix, for every node shorter than 16 KiB: framed at C speed.
_NODE_FRAMES = tuple(b"\n" + _varint_bytes(n) for n in range(1 << 14))


def _framed(nodes: list[bytes]) -> bytes:
    """The nodes as a NodeList (each one field 1)."""
    if max(map(len, nodes), default=0) < len(_NODE_FRAMES):
        # Concatenated pairs, not chained tuples: bytes are not tracked by the collector (30k tuples were ~40 young
        # collections, and with them the full collections a cold call set off).
        return b"".join(map(add, map(_NODE_FRAMES.__getitem__, map(len, nodes)), nodes))
    return b"".join(b"\n" + _varint_bytes(len(n)) + n for n in nodes)


def _nodes_facts(nodes: list[bytes]) -> list[tuple[str, str] | None]:
    """_node_facts of every node, with two upb parses for all of them (the first read of a mesh's nodes).

    Nodes that start as istiod writes them are read from their bytes (_istiod_facts). Else: a Node list decodes if and
    only if each of its Nodes does; then each namespace is what node_namespace reads. Else (a node that does not
    decode, or is nested too deep for the extra level) each on its own.
    The ids: parsed as NodeListIds, every id field of every node, in order. When each node starts with one (its
    first byte is field 1's length-delimited tag) and there are as many as nodes, that is each one's only id
    field, which is both the first (the exact reader's) and the last (protobuf's); upb checked its UTF-8.
    """
    facts = _istiod_facts(nodes)
    if facts is not None:
        return facts
    framed = _framed(nodes)
    try:
        listed: Any = _LITE.node_list.FromString(framed)
        merged: Any = _LITE.node_list_ids.FromString(framed)
    except DecodeError:
        return list(map(_node_facts, nodes))
    ids = list(merged.node.id)
    if len(ids) != len(nodes) or b"".join(map(itemgetter(slice(1)), nodes)) != b"\n" * len(nodes):
        values = [d.metadata.fields.get("NAMESPACE") for d in listed.nodes]
        return [_first_id_facts(node, value) for node, value in zip(nodes, values, strict=True)]
    # Each Value read as it is met: a list of 30k upb wrappers kept alive was ~40 young collections.
    return list(zip(ids, [v.string_value if (v := d.metadata.fields.get("NAMESPACE")) is not None else ""
                          for d in listed.nodes], strict=True))


def _istiod_facts(nodes: list[bytes]) -> list[tuple[str, str] | None] | None:
    """_node_facts of every node when each starts with its id field with a one-byte length, else None.

    As istiod writes them (statusgen.go: Node{id, metadata: a Struct of CLUSTER_ID, NAMESPACE, ISTIO_VERSION}). Then
    the exact reader's id is node[2 : 2 + L] (decoded as _utf8_id decodes it), and with an id that is UTF-8 the Node
    decodes exactly when the rest of it does (`tail`: its other fields, a Node of their own at the same depth; the
    fields of a message are read one after the other), with the same metadata: the namespace is
    node_namespace(tail). Tails repeat (istiod's hold a mesh's namespaces, versions, clusters and map orders), so
    each distinct one is read once, in bulk; all in C passes over the nodes. None (the caller reads the nodes as
    before) if a node starts otherwise or an id is not UTF-8.
    """
    if not nodes or min(map(len, nodes)) < 2 or b"".join(map(itemgetter(slice(1)), nodes)) != b"\n" * len(nodes):
        return None
    id_ends = list(map(add, map(itemgetter(1), nodes), repeat(2)))  # 2 + the id's length
    if max(id_ends) >= 0x82 or not all(map(le, id_ends, map(len, nodes))):
        return None
    try:
        ids = list(map(bytes.decode, map(bytes.__getitem__, nodes, map(slice, repeat(2), id_ends))))
    except UnicodeDecodeError:
        return None
    tails = list(map(bytes.__getitem__, nodes, map(slice, id_ends, repeat(None))))
    distinct = list(dict.fromkeys(tails))
    table = dict(zip(distinct, _namespaces(distinct), strict=True))
    return list(zip(ids, map(table.__getitem__, tails), strict=True))


def _namespaces(nodes: list[bytes]) -> list[str]:
    """node_namespace of every node, with one upb parse for all of them (else each on its own)."""
    try:
        listed: Any = _LITE.node_list.FromString(_framed(nodes))
    except DecodeError:
        return list(map(node_namespace, nodes))
    return [v.string_value if (v := d.metadata.fields.get("NAMESPACE")) is not None else "" for d in listed.nodes]


def _first_id_facts(node: bytes, namespace: Any) -> tuple[str, str] | None:
    # Node{1: id, ...} with a one-byte length: the first field is the id the exact reader takes.
    if node[:1] != b"\n" or node[1] >= 0x80 or 2 + node[1] > len(node):
        return _node_facts(node)
    try:
        node_id = node[2 : 2 + node[1]].decode()
    except UnicodeDecodeError:
        return None
    return node_id, str(namespace.string_value) if namespace is not None else ""


def join_kept(splits: Sequence[SynczSplit], keep: Sequence[int]) -> list[bytes | memoryview]:
    """The resource fields whose `keep` flag is set (flags over all splits in order), byte for byte.

    As views of the answers, one per run of consecutive kept resources: the caller's join is then the only
    copy (slicing each resource first copied every byte twice; most runs are long when only duplicates drop).
    """
    out: list[bytes | memoryview] = []
    at = 0
    for s in splits:
        n = len(s.starts) - 1
        flags = keep[at : at + n]
        at += n
        if sum(flags) * 2 < n:
            # A scoped caller's few: one slice each (finding runs costs more than they save). Bytes, not views:
            # making a view costs about what copying a resource (~500 bytes) does, and the join reads bytes faster.
            out += map(s.raw.__getitem__, map(slice, compress(s.starts, flags), compress(s.starts[1:], flags)))
        else:
            # A run begins at a kept resource after a dropped one (or first), ends at one before a dropped one: its
            # bytes are raw[start of its first resource : start of the resource after its last].
            begins = compress(s.starts, map(gt, flags, [False, *flags]))
            ends = compress(s.starts[1:], map(gt, flags, [*flags[1:], False]))
            out += map(memoryview(s.raw).__getitem__, map(slice, begins, ends))
    return out


def join_dropping(splits: Sequence[SynczSplit], dropped: Sequence[int]) -> list[bytes | memoryview]:
    """join_kept with every flag set but at the `dropped` positions (ascending, over all splits in order).

    For a few drops (the older copies of proxies seen twice): the runs are found from the drops themselves, not
    from a flag per resource.
    """
    out: list[bytes | memoryview] = []
    at = d = 0  # the global position of this split's first resource; the next drop
    for s in splits:
        n, view, begin = len(s.starts) - 1, memoryview(s.raw), 0
        while d < len(dropped) and dropped[d] < at + n:
            i = dropped[d] - at
            if i > begin:
                out.append(view[s.starts[begin] : s.starts[i]])
            begin, d = i + 1, d + 1
        if n > begin:
            out.append(view[s.starts[begin] : s.starts[n]])
        at += n
    return out


def split_client_configs(resource_fields: Sequence[bytes]) -> list[csds_pb2.ClientConfig] | None:
    """The ClientConfig of each resource field cut by syncz_split (its Any exactly {ClientConfig URL, value}), in
    one upb parse: what client_config decodes of each, or None if one of them does not decode."""
    try:
        parsed: Any = _LITE.client_configs.FromString(b"".join(resource_fields))
    except DecodeError:
        return None
    return [r.value for r in parsed.resources]


def kept_one_node(body: bytes, count: int) -> bool:
    """one_node of each of the `count` resources of a merged answer whose resources were cut by syncz_split
    (their Anys exactly {type URL, value}, the node the value's first field), in one upb parse.

    Parsed as the private ResourcesMerged, the singular `resources` and `value` merge, and the repeated `node`
    collects every node field of every value: each resource has at least one, so one each ⇔ the total is
    `count`. The envelope fields are unknown to it; a resource upb refuses makes the parse fail (then False).
    """
    try:
        merged: Any = _LITE.resources_merged.FromString(body)
    except DecodeError:
        return False
    return len(merged.resources.value.node) == count


__all__ = [
    "CLIENT_CONFIG_URL",
    "ResponseView",
    "SynczIndex",
    "SynczMemo",
    "SynczSplit",
    "WireError",
    "any_type_url",
    "client_config",
    "envelope",
    "iter_fields",
    "join_dropping",
    "join_kept",
    "kept_one_node",
    "node_namespace",
    "one_node",
    "split_client_configs",
    "syncz_fast_index",
    "syncz_namespace",
    "syncz_node_id",
    "syncz_split",
    "view_response",
]
