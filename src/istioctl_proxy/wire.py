"""Byte-level reading and writing of the few protobuf fields the merge needs.

Protobuf merge semantics make the syncz merge a byte operation: concatenating serialized messages is
`MergeFrom` — repeated fields (the resources) concatenate, a later singular field wins. So the merged
answer is the replicas' bodies (or chosen resource spans) followed by one small envelope that overrides
`version_info`, `nonce`, `type_url` and `control_plane`. Resources are never decoded here unless a
caller of this module asks for a node id or namespace.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.status.v3 import csds_pb2

# DiscoveryResponse field numbers (envoy/service/discovery/v3/discovery.proto).
_VERSION_INFO, _RESOURCES, _TYPE_URL, _NONCE, _CONTROL_PLANE = 1, 2, 4, 5, 6
_LEN = 2  # wire type of length-delimited fields


class WireError(ValueError):
    """The bytes are not the protobuf message they should be."""


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


def iter_fields(buf: bytes | memoryview) -> Iterator[tuple[int, int, int, int]]:
    """Yield (field number, field start, value start, field end) for each top-level field."""
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
        yield number, start, value_start, pos


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
        start, end = self.resources[i]
        return self.raw[start:end]

    def resource_any(self, i: int) -> bytes:
        start, end = self.resource_values[i]
        return self.raw[start:end]

    def identifier(self) -> str | None:
        if self.control_plane is None:
            return None
        cp = base_pb2.ControlPlane.FromString(self.control_plane)
        return cp.identifier


def view_response(raw: bytes) -> ResponseView:
    """Index a serialized DiscoveryResponse; raises WireError if it is not one."""
    view = ResponseView(raw)
    mv = memoryview(raw)
    try:
        for number, start, value_start, end in iter_fields(mv):
            if number == _RESOURCES:
                view.resources.append((start, end))
                view.resource_values.append((value_start, end))
            elif number == _TYPE_URL:
                view.type_url = bytes(mv[value_start:end]).decode()
            elif number == _VERSION_INFO:
                view.version_info = bytes(mv[value_start:end]).decode()
            elif number == _CONTROL_PLANE:
                view.control_plane = bytes(mv[value_start:end])
    except UnicodeDecodeError as err:
        raise WireError(f"invalid UTF-8 in envelope: {err}") from err
    return view


def envelope(
    *, type_url: str, version_info: str, nonce: str, control_plane_identifier: str | None = None
) -> bytes:
    """The trailing fields that override whatever the concatenated bodies set."""
    resp = discovery_pb2.DiscoveryResponse(type_url=type_url, version_info=version_info, nonce=nonce)
    if control_plane_identifier is not None:
        resp.control_plane.identifier = control_plane_identifier
    return resp.SerializeToString()


def client_config(any_bytes: bytes) -> csds_pb2.ClientConfig:
    """Decode one syncz resource (a google.protobuf.Any holding a ClientConfig)."""
    from google.protobuf import any_pb2

    msg = any_pb2.Any.FromString(any_bytes)
    cfg = csds_pb2.ClientConfig()
    if not msg.Unpack(cfg):
        raise WireError(f"resource is {msg.type_url}, not a ClientConfig")
    return cfg


def syncz_node_id(any_bytes: bytes) -> str:
    """The node id of a syncz resource, read without decoding the rest of it.

    Any{1: type_url, 2: value=ClientConfig{1: node=Node{1: id}}}: three nested first fields.
    """
    mv = memoryview(any_bytes)
    for path_number in (2, 1, 1):
        for number, _start, value_start, end in iter_fields(mv):
            if number == path_number:
                mv = mv[value_start:end]
                break
        else:
            return ""
    try:
        return bytes(mv).decode()
    except UnicodeDecodeError as err:
        raise WireError("node id is not UTF-8") from err
