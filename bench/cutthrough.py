"""Cut-through forwarding: a measured prototype (issue 14, item 4). Not part of the product.

The product (grpc.aio) is store-and-forward: it receives every replica's whole syncz answer, merges, and only
then hands one message to gRPC. This prototype, on the pure-Python `h2` library over asyncio sockets (h2c,
prior knowledge, plaintext only), forwards instead: concatenated serialized protobuf messages are a valid merge
of them (repeated fields append, scalars last-wins, sub-messages merge), so for an unscoped syncz answer with
no proxy on two replicas the merged DiscoveryResponse is the replicas' message bytes in replica order followed
by a trailer of our own version_info, nonce and control_plane (last-wins overrides theirs). Its length is known
once every replica's 5-byte gRPC prefix is in, so the response's prefix goes out then, replica 0's bytes
stream as they arrive, later replicas' bytes are buffered until their turn, and the trailer closes the message.

The trailer is a fixed TRAILER bytes, padded with an unknown field (PAD_FIELD): its contents (the newest
version, the first replica's control-plane Info) are only known after the last byte, its length before the
first. What this cannot do (dedup, scoping, dropping a malformed replica) is in docs/benchmarks.md,
"Cut-through prototype (issue 14, item 4)".

    .venv/bin/python -m bench.cutthrough serve --istiod A,B,C [--listen 127.0.0.1:0] [--upstream-token T]
    .venv/bin/python -m bench.cutthrough bench [--replicas 5] [--proxies 30k] [--latency 0,50] [--rounds 9]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import weakref
from collections.abc import Sequence
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import DecodeError

from istioctl_proxy import merge, wire
from istioctl_proxy.policy import SYNCZ

from .child import Child

ADS_PATH = b"/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
MiB = 1 << 20
TRAILER = 1024  # bytes reserved for our envelope at the end of every answer
PAD_FIELD = (1 << 29) - 1  # the largest field number: never a DiscoveryResponse field, so parsers skip it
_PAD_TAG = wire._varint_bytes(PAD_FIELD << 3 | 2)
WINDOW = 16 * MiB  # stream window and frame size as the product's tuned transport (upstream.LARGE_MESSAGE_OPTIONS)
CONN_WINDOW = 64 * MiB
MAX_FRAME = 4 * MiB
MAX_ANSWER = 256 * MiB
MAX_REQUEST = 1 * MiB
# gRPC status codes as numbers (the wire form).
OK, CANCELLED, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED = 0, 1, 2, 3, 4, 8
UNIMPLEMENTED, INTERNAL, UNAVAILABLE = 12, 13, 14


class Malformed(Exception):
    """A replica's answer is not a well-framed DiscoveryResponse."""


def _header(buf: bytes | memoryview, pos: int) -> tuple[int, int, int, int] | None:
    """(field number, wire type, length or varint value, position after) of the field at pos; None if cut."""
    values = []
    for _ in range(2):
        shift = value = 0
        while True:
            if pos >= len(buf):
                return None
            b = buf[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                break
            shift += 7
            if shift > 63:
                raise Malformed("varint longer than 10 bytes")
        values.append(value)
        if len(values) == 1 and value & 7 not in (0, 2):
            break  # fixed-width or group: no second varint
    tag = values[0]
    number, wiretype = tag >> 3, tag & 7
    if number == 0:
        raise Malformed("field number 0")
    if wiretype == 1:
        return number, 1, 8, pos
    if wiretype == 5:
        return number, 5, 4, pos
    if wiretype not in (0, 2):
        raise Malformed(f"wire type {wiretype} at the top level")
    return number, wiretype, values[1], pos


def _skip_resources(chunk: bytes | memoryview, pos: int, limit: int) -> tuple[int, int]:
    """Jump over consecutive resources (tag 0x12, a 1-2 byte length) starting before `limit`: the one loop that
    runs per resource, so locals only. Returns (the position after the last one, which may lie past the
    chunk, and how many)."""
    count = 0
    while pos < limit and chunk[pos] == 0x12:
        b1 = chunk[pos + 1]
        if b1 < 0x80:
            pos += 2 + b1
        else:
            b2 = chunk[pos + 2]
            if b2 >= 0x80:
                break
            pos += 3 + ((b1 & 0x7F) | b2 << 7)
        count += 1
    return pos, count


class Envelope:
    """The top-level fields of one replica's DiscoveryResponse, read as its bytes stream through.

    Resources are only counted and skipped by their length prefix (nothing inside is read); the other fields'
    values are kept. `complete()` says the bytes so far end exactly at a field boundary.
    """

    KEEP = frozenset({1, 4, 5, 6})  # version_info, type_url, nonce, control_plane
    MAX_KEPT = 64 * 1024

    def __init__(self) -> None:
        self.skip = 0  # bytes of the current field's value still to come
        self.value: bytearray | None = None  # the current kept field's value so far
        self.number = 0
        self.head = b""  # a tag/length cut by the end of the last chunk
        self.resources = 0
        self.fields: dict[int, bytes] = {}

    def feed(self, chunk: bytes | memoryview) -> None:
        pos, n = 0, len(chunk)
        while pos < n:
            if self.skip:
                take = min(self.skip, n - pos)
                if self.value is not None:
                    self.value += chunk[pos : pos + take]
                self.skip -= take
                pos += take
                if not self.skip:
                    self._close()
                continue
            if not self.head and pos < n - 4 and chunk[pos] == 0x12:
                pos, count = _skip_resources(chunk, pos, n - 4)
                self.resources += count
                if pos > n:  # the last resource goes on in the next chunk
                    self.skip, self.number, self.value, pos = pos - n, 2, None, n
                if count:
                    continue
                # else a resource of 16 KiB or more: the general reader
            pos = self._field(chunk, pos)

    def _field(self, chunk: bytes | memoryview, pos: int) -> int:
        """Read the header at pos (joining a cut one); returns where its value starts, or len(chunk) if cut."""
        window = self.head + chunk[pos : pos + 16] if self.head else chunk
        start = 0 if self.head else pos
        got = _header(window, start)
        if got is None:
            if len(window) - start >= 16:
                raise Malformed("field header longer than 15 bytes")
            self.head = bytes(window[start:])
            return len(chunk)
        number, wiretype, value, end = got
        consumed = end - start - len(self.head)
        self.head = b""
        self.number = number
        if number == 2:
            if wiretype != 2:
                raise Malformed("resources is not length-delimited")
            self.resources += 1
        if wiretype == 0:
            self.skip, self.value = 0, None
            if number in self.KEEP:
                raise Malformed(f"field {number} is not length-delimited")
        else:
            if value > MAX_ANSWER:
                raise Malformed("field longer than the largest answer")
            self.skip = value
            keep = number in self.KEEP and wiretype == 2
            if keep and value > self.MAX_KEPT:
                raise Malformed(f"envelope field {number} of {value} bytes")
            self.value = bytearray() if keep else None
            if not value:
                self._close()
        return pos + consumed

    def _close(self) -> None:
        if self.value is not None:
            self.fields[self.number] = bytes(self.value)  # last wins, as in a parser
        self.value = None

    def complete(self) -> bool:
        return not self.skip and not self.head

    def text(self, number: int) -> str:
        try:
            return self.fields.get(number, b"").decode()
        except UnicodeDecodeError as err:
            raise Malformed(f"invalid UTF-8 in field {number}") from err

    def identifier(self) -> str | None:
        raw = self.fields.get(6)
        if raw is None:
            return None
        try:
            ident: str = base_pb2.ControlPlane.FromString(raw).identifier
        except DecodeError as err:
            raise Malformed(f"control_plane: {err}") from err
        return ident


def quiet_frame_repr() -> None:
    """h2 logs `repr(frame)` of every frame it receives even with logging off, and hyperframe's repr hex-encodes
    the whole payload: ~20 ms of CPU per 14 MB answer. Only the first bytes are ever shown, so hex only those."""
    import hyperframe.frame

    def short(data: bytes | None) -> str:
        return "None" if not data else "<hex:" + bytes(data[:10]).hex() + "...>"

    hyperframe.frame._raw_data_repr = short


class Parsed:
    """What Envelope reads, from upb's parse of a replica's whole answer once its last byte is in (check="end":
    C speed, but the answer's bytes are held until then, as store-and-forward holds them)."""

    def __init__(self, body: bytes) -> None:
        try:
            msg = discovery_pb2.DiscoveryResponse.FromString(body)
        except DecodeError as err:
            raise Malformed(str(err)) from err
        self.resources = len(msg.resources)
        self.texts: dict[int, str] = {1: msg.version_info, 4: msg.type_url, 5: msg.nonce}
        self.ident = msg.control_plane.identifier if msg.HasField("control_plane") else None

    def complete(self) -> bool:
        return True

    def text(self, number: int) -> str:
        return self.texts[number]

    def identifier(self) -> str | None:
        return self.ident


def filler(size: int) -> bytes:
    """Exactly `size` bytes of unknown fields (PAD_FIELD, zeros): what parsers skip. Pads the trailer, and could
    stand in for a resource dropped after its length was counted (a duplicate): same length, nothing listed."""
    tag = len(_PAD_TAG)
    for width in (1, 2, 3, 4):
        value = size - tag - width
        if value >= 0 and len(wire._varint_bytes(value)) == width:
            return _PAD_TAG + wire._varint_bytes(value) + bytes(value)
    if size >= 2 * (tag + 1):  # a size between two varint widths: an empty field first
        return _PAD_TAG + b"\0" + filler(size - tag - 1)
    raise ValueError(f"no unknown field is {size} bytes long (the smallest is {tag + 1})")


def padded(envelope: bytes, size: int = TRAILER) -> bytes:
    """`envelope` followed by filler making it exactly `size` bytes."""
    if len(envelope) > size - len(_PAD_TAG) - 1:
        raise ValueError(f"envelope of {len(envelope)} bytes does not fit a {size}-byte trailer")
    return envelope + filler(size - len(envelope))


def _grpc_message(text: str) -> bytes:
    # gRPC's percent-encoding of grpc-message: every byte outside printable ASCII, and '%'.
    return b"".join(bytes([b]) if 0x20 <= b < 0x7F and b != 0x25 else b"%%%02X" % b for b in text.encode())


# -- the replicas' side (client) -------------------------------------------------------------------------------


class Upstream(asyncio.Protocol):
    """One HTTP/2 connection to one replica; each call is a new stream on it."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.transport: asyncio.Transport | None = None
        self.legs: dict[int, Leg] = {}
        self.closed = False
        self.pending = bytearray()  # a frame header, or a whole non-DATA frame, being assembled
        self.need = 0  # bytes of that whole frame
        self.in_data = 0  # payload bytes of the current DATA frame still to come
        self.data_sid = 0
        self.unacked: dict[int, int] = {}  # stream (0: the connection) → DATA bytes not yet given back

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.conn.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        })
        # initial_values are current at once; h2 reads this copy of the frame size (set from the defaults)
        self.conn.max_inbound_frame_size = MAX_FRAME
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(CONN_WINDOW - 65535)
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def open(self, leg: Leg, request: bytes, authorization: bytes | None) -> int:
        sid: int = self.conn.get_next_available_stream_id()
        headers = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", ADS_PATH),
                   (b":authority", self.address.encode()), (b"content-type", b"application/grpc"), (b"te", b"trailers")]
        if authorization:
            headers.append((b"authorization", authorization))
        self.conn.send_headers(sid, headers)
        self.conn.send_data(sid, b"\0" + len(request).to_bytes(4, "big") + request)
        self.legs[sid] = leg
        self.flush()
        return sid

    def cancel(self, sid: int) -> None:
        self.unacked.pop(sid, None)
        if self.legs.pop(sid, None) is not None and not self.closed:
            with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            self.flush()

    def data_received(self, data: bytes) -> None:
        """Split the bytes into frames: plain DATA frames' payloads go straight to their call as zero-copy views
        (h2 would copy each payload three times and hex-format it); every other frame goes to h2."""
        mv, pos, n = memoryview(data), 0, len(data)
        while pos < n:
            if self.in_data:
                take = min(self.in_data, n - pos)
                leg = self.legs.get(self.data_sid)
                if leg is not None:
                    leg.on_data(mv[pos : pos + take])
                self.in_data -= take
                pos += take
                continue
            if len(self.pending) < 9:
                take = min(9 - len(self.pending), n - pos)
                self.pending += mv[pos : pos + take]
                pos += take
                if len(self.pending) < 9:
                    break
                length = int.from_bytes(self.pending[:3], "big")
                kind, flags = self.pending[3], self.pending[4]
                sid = int.from_bytes(self.pending[5:9], "big") & 0x7FFFFFFF
                if length > MAX_FRAME:
                    self._h2(bytes(self.pending))  # h2 says what is wrong (FRAME_SIZE_ERROR) and closes
                    return
                if kind == 0 and not flags & 0x9 and sid:  # DATA, neither PADDED nor END_STREAM
                    self.pending = bytearray()
                    self.in_data, self.data_sid = length, sid
                    self._consumed(sid, length)
                    continue
                self.need = 9 + length
            take = min(self.need - len(self.pending), n - pos)
            self.pending += mv[pos : pos + take]
            pos += take
            if len(self.pending) == self.need:
                frame, self.pending = bytes(self.pending), bytearray()
                if not self._h2(frame):
                    return

    def _consumed(self, sid: int, length: int) -> None:
        """Flow control for the DATA h2 never saw: give the window back once half of it is used."""
        self.unacked[0] = self.unacked.get(0, 0) + length
        self.unacked[sid] = self.unacked.get(sid, 0) + length
        for key, limit in ((0, CONN_WINDOW // 2), (sid, WINDOW // 2)):
            if self.unacked[key] >= limit:
                assert self.transport is not None
                self.flush()
                self.transport.write(b"\0\0\x04\x08\0" + key.to_bytes(4, "big") + self.unacked[key].to_bytes(4, "big"))
                self.unacked[key] = 0

    def _h2(self, data: bytes) -> bool:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as err:
            self._fail_all(f"HTTP/2 protocol error from {self.address}: {err}")
            assert self.transport is not None
            self.transport.close()
            return False
        for ev in events:
            if isinstance(ev, h2.events.DataReceived):  # padded, or ending the stream: rare
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                leg = self.legs.get(ev.stream_id)
                if leg is not None:
                    leg.on_data(memoryview(ev.data))
            elif isinstance(ev, h2.events.ResponseReceived | h2.events.TrailersReceived):
                leg = self.legs.get(ev.stream_id)
                if leg is not None:
                    leg.on_headers(dict(ev.headers))
            elif isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset):
                leg = self.legs.pop(ev.stream_id, None)
                if leg is not None:
                    leg.on_end()
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self._fail_all(f"{self.address} closed the connection (GOAWAY {ev.error_code})")
        self.flush()
        return True

    def _fail_all(self, why: str) -> None:
        self.closed = True
        legs, self.legs = list(self.legs.values()), {}
        for leg in legs:
            leg.call.fail(UNAVAILABLE, why)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all(f"connection to {self.address} lost: {exc or 'closed'}")


class Pool:
    """One warm connection per replica, made again after it broke."""

    def __init__(self, addresses: Sequence[str]) -> None:
        self.addresses = list(addresses)
        self.conns: dict[str, Upstream] = {}

    async def get(self, address: str) -> Upstream:
        up = self.conns.get(address)
        if up is None or up.closed:
            host, _, port = address.rpartition(":")
            _, proto = await asyncio.get_running_loop().create_connection(lambda: Upstream(address), host, int(port))
            up = self.conns[address] = proto
        return up

    def close(self) -> None:
        for up in self.conns.values():
            if up.transport is not None:
                up.transport.close()


class Leg:
    """One replica's share of one call: its prefix, its bytes waiting for their turn, its envelope."""

    def __init__(self, call: Call, index: int) -> None:
        self.call, self.index = call, index
        self.prefix = b""
        self.length = -1  # the replica's message length, once its prefix is in
        self.received = 0
        self.chunks: collections.deque[memoryview] = collections.deque()
        self.envelope: Envelope | Parsed | None = Envelope() if call.check == "stream" else None  # Parsed at the end
        self.kept: list[memoryview] = []  # check="end": the whole answer, for upb
        self.done = False
        self.upstream: Upstream | None = None
        self.sid = 0

    def on_data(self, data: memoryview) -> None:
        if self.done:
            return
        if self.length < 0:
            need = 5 - len(self.prefix)
            self.prefix, data = self.prefix + data[:need], data[need:]
            if len(self.prefix) < 5:
                return
            if self.prefix[0]:
                self.call.fail(INTERNAL, f"replica {self.index} sent a compressed answer")
                return
            self.length = int.from_bytes(self.prefix[1:], "big")
            self.call.on_prefix()
        if len(data) > self.length - self.received:
            data = data[: self.length - self.received]  # a second message: not ours to forward
        if data:
            self.received += len(data)
            try:
                if isinstance(self.envelope, Envelope):
                    self.envelope.feed(data)
                else:
                    self.kept.append(data)
            except Malformed as err:
                self.call.fail(INTERNAL, f"replica {self.index}: malformed answer: {err}")
                return
            self.chunks.append(data)
        if self.received == self.length:
            if self.call.check == "end":
                try:
                    self.envelope = Parsed(b"".join(self.kept))
                except Malformed as err:
                    self.call.fail(INTERNAL, f"replica {self.index}: malformed answer: {err}")
                    return
                self.kept = []
            self.done = True
            if self.upstream is not None:
                self.upstream.cancel(self.sid)  # as a client that read its one answer: the ADS stream is done
        self.call.pump()

    def on_headers(self, headers: dict[bytes, bytes]) -> None:
        status = headers.get(b"grpc-status")
        if status is not None and status != b"0" and not self.done:
            message = headers.get(b"grpc-message", b"").decode(errors="replace")
            code = int(status) if status.isdigit() and int(status) <= 16 else UNKNOWN
            self.call.fail(code, f"replica {self.index}: {message}")
        elif headers.get(b":status", b"200") != b"200":
            self.call.fail(UNAVAILABLE, f"replica {self.index}: HTTP status {headers[b':status'].decode()}")

    def on_end(self) -> None:
        if not self.done:
            self.call.fail(UNAVAILABLE, f"replica {self.index} ended the stream without an answer")


class Call:
    """One caller's syncz: fan out, then forward the replicas' bytes in order as they arrive."""

    def __init__(self, front: Downstream, sid: int, k: int, timeout: float, external_id: str, check: str) -> None:
        self.front, self.sid, self.check = front, sid, check
        self.legs = [Leg(self, i) for i in range(k)]
        self.external_id = external_id
        self.started = False  # response headers and prefix sent: from here on an error can only reset
        self.current = 0
        self.out: collections.deque[memoryview] = collections.deque()
        self.finished = False  # our whole message is queued
        self.failed = False
        self.timer = asyncio.get_running_loop().call_later(timeout, self.fail, DEADLINE_EXCEEDED,
                                                           f"no complete answer from every replica in {timeout:g}s")

    async def start(self, pool: Pool, request: bytes, authorization: bytes | None) -> None:
        try:
            ups = await asyncio.gather(*(pool.get(a) for a in pool.addresses))
        except OSError as err:
            self.fail(UNAVAILABLE, f"cannot reach a replica: {err}")
            return
        for leg, up in zip(self.legs, ups, strict=True):
            if self.failed:
                return
            leg.upstream, leg.sid = up, up.open(leg, request, authorization)

    def on_prefix(self) -> None:
        if self.started or self.failed or any(leg.length < 0 for leg in self.legs):
            return
        total = sum(leg.length for leg in self.legs) + TRAILER
        if total > MAX_ANSWER:
            self.fail(RESOURCE_EXHAUSTED, f"merged answer of {total} bytes exceeds {MAX_ANSWER}")
            return
        self.started = True
        self.front.send_headers(self.sid)
        self.out.append(memoryview(b"\0" + total.to_bytes(4, "big")))

    def pump(self) -> None:
        if not self.started or self.failed or self.finished:
            return
        while self.current < len(self.legs):
            leg = self.legs[self.current]
            while leg.chunks:
                self.out.append(leg.chunks.popleft())
            if not leg.done:
                break
            if leg.envelope is None or not leg.envelope.complete():
                self.fail(INTERNAL, f"replica {leg.index}: answer ends inside a field")
                return
            self.current += 1
        else:
            try:
                self.out.append(memoryview(self.trailer()))
            except (Malformed, ValueError) as err:
                self.fail(INTERNAL, str(err))
                return
            self.finished = True
            self.timer.cancel()
        self.front.flush_stream(self)

    def trailer(self) -> bytes:
        envs = [leg.envelope for leg in self.legs if leg.envelope is not None]
        for i, env in enumerate(envs):
            if env.text(4) not in ("", SYNCZ):
                raise Malformed(f"replica {i} answered type {env.text(4)!r}")
        version = max(env.text(1) for env in envs)
        ident = merge.external_identifier([env.identifier() for env in envs], self.external_id)
        return padded(wire.envelope(type_url=SYNCZ, version_info=version, nonce=version + str(uuid.uuid4()),
                                    control_plane_identifier=ident))

    def fail(self, code: int, message: str) -> None:
        if self.failed or self.finished:
            return
        self.failed = True
        self.timer.cancel()
        for leg in self.legs:
            if leg.upstream is not None:
                leg.upstream.cancel(leg.sid)
            leg.chunks.clear()
        self.out.clear()
        self.front.end_call(self, code, message)


# -- the callers' side (server) ------------------------------------------------------------------------------


class Downstream(asyncio.Protocol):
    """One caller's HTTP/2 connection: gRPC's StreamAggregatedResources, one unscoped syncz per stream."""

    def __init__(self, pool: Pool, timeout: float, external_id: str, upstream_token: str, check: str) -> None:
        self.pool, self.timeout, self.external_id, self.check = pool, timeout, external_id, check
        self.upstream_token = upstream_token
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.transport: asyncio.Transport | None = None
        self.requests: dict[int, tuple[bytes, bytearray]] = {}  # stream → (authorization, request bytes so far)
        self.calls: dict[int, Call] = {}
        self.half_closed: set[int] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 16 * 1024,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: MAX_REQUEST,
        })
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.flush()  # h2 queued the GOAWAY
            assert self.transport is not None
            self.transport.close()
            return
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                self.on_request(ev.stream_id, dict(ev.headers))
            elif isinstance(ev, h2.events.DataReceived):
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                self.on_data(ev.stream_id, ev.data)
            elif isinstance(ev, h2.events.StreamEnded):
                self.half_closed.add(ev.stream_id)
                self.maybe_close(ev.stream_id)
            elif isinstance(ev, h2.events.StreamReset):
                call = self.calls.pop(ev.stream_id, None)
                self.requests.pop(ev.stream_id, None)
                if call is not None:
                    call.fail(CANCELLED, "caller reset the stream")
            elif isinstance(ev, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                for call in list(self.calls.values()):
                    self.flush_stream(call)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                assert self.transport is not None
                self.transport.close()
        self.flush()

    def on_request(self, sid: int, headers: dict[bytes, bytes]) -> None:
        if headers.get(b":path") != ADS_PATH or not headers.get(b"content-type", b"").startswith(b"application/grpc"):
            path = headers.get(b":path", b"").decode(errors="replace")
            self.trailers_only(sid, UNIMPLEMENTED, f"unknown method {path}")
            return
        self.requests[sid] = (headers.get(b"authorization", b""), bytearray())

    def on_data(self, sid: int, data: bytes) -> None:
        pending = self.requests.get(sid)
        if pending is None:
            return  # later messages on an answered stream (an ACK): this prototype ignores them
        authorization, buf = pending
        buf += data
        if len(buf) < 5:
            return
        length = int.from_bytes(buf[1:5], "big")
        if buf[0] or length > MAX_REQUEST:
            del self.requests[sid]
            self.trailers_only(sid, RESOURCE_EXHAUSTED if length > MAX_REQUEST else UNIMPLEMENTED,
                               "request too large" if length > MAX_REQUEST else "compressed requests unsupported")
            return
        if len(buf) < 5 + length:
            return
        del self.requests[sid]
        message = bytes(buf[5 : 5 + length])
        try:
            req = discovery_pb2.DiscoveryRequest.FromString(message)
        except DecodeError as err:
            self.trailers_only(sid, INVALID_ARGUMENT, f"malformed DiscoveryRequest: {err}")
            return
        if req.type_url != SYNCZ or req.resource_names:
            self.trailers_only(sid, UNIMPLEMENTED, f"the cut-through prototype serves only an unscoped {SYNCZ}; "
                                                   f"got {req.type_url!r} names {list(req.resource_names)}")
            return
        call = self.calls[sid] = Call(self, sid, len(self.pool.addresses), self.timeout, self.external_id, self.check)
        token = authorization or (b"Bearer " + self.upstream_token.encode() if self.upstream_token else None)
        task = asyncio.ensure_future(call.start(self.pool, message, token))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def send_headers(self, sid: int) -> None:
        self.conn.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])

    def flush_stream(self, call: Call) -> None:
        """Send what the caller's flow-control windows allow; the rest waits for its WINDOW_UPDATE."""
        if call.sid not in self.calls:
            return
        out = call.out
        try:
            while out:
                room = min(self.conn.local_flow_control_window(call.sid), self.conn.max_outbound_frame_size)
                if room <= 0:
                    break
                head = out[0]
                if len(head) <= room:
                    self.write_data(call.sid, out.popleft())
                else:
                    self.write_data(call.sid, head[:room])
                    out[0] = head[room:]
        except h2.exceptions.StreamClosedError:
            self.calls.pop(call.sid, None)
            return
        self.maybe_close(call.sid)

    def write_data(self, sid: int, piece: memoryview) -> None:
        """One DATA frame, written here rather than by h2 (whose send_data copies the payload three times); h2's
        flow-control accounting is kept exact, so its windows stay the truth for everything it still sends."""
        stream = self.conn._get_stream_by_id(sid)  # raises StreamClosedError if the caller reset it
        n = len(piece)
        self.conn.outbound_flow_control_window -= n
        stream.outbound_flow_control_window -= n
        self.flush()  # whatever h2 queued (the response HEADERS) goes first
        assert self.transport is not None
        self.transport.writelines((n.to_bytes(3, "big") + b"\0\0" + sid.to_bytes(4, "big"), piece))

    def maybe_close(self, sid: int) -> None:
        """End the stream with OK once our answer is out and the caller half-closed (ADS streams stay open)."""
        call = self.calls.get(sid)
        if call is not None and call.finished and not call.out and sid in self.half_closed:
            del self.calls[sid]
            self.half_closed.discard(sid)
            self.conn.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
            self.flush()
        elif call is None and sid in self.half_closed and sid in self.requests:
            del self.requests[sid]
            self.trailers_only(sid, INVALID_ARGUMENT, "stream ended before a whole request")

    def end_call(self, call: Call, code: int, message: str) -> None:
        if self.calls.pop(call.sid, None) is None:
            return
        self.half_closed.discard(call.sid)
        if not call.started:
            self.trailers_only(call.sid, code, message)
            return
        # Part of the message is out: the caller must not mistake a cut answer for a whole one.
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self.conn.reset_stream(call.sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
        self.flush()

    def trailers_only(self, sid: int, code: int, message: str) -> None:
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self.conn.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc"),
                                         (b"grpc-status", str(code).encode()),
                                         (b"grpc-message", _grpc_message(message))], end_stream=True)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        for call in list(self.calls.values()):
            call.fail(CANCELLED, "caller went away")
        self.calls.clear()


class CutThrough:
    """The prototype's server: `await start()`, then `port`; `close()`."""

    def __init__(self, istiod: Sequence[str], listen: str = "127.0.0.1:0", *, timeout: float = 30.0,
                 external_id: str = "<external>", upstream_token: str = "", check: str = "stream") -> None:
        if check not in ("stream", "end"):
            raise ValueError(f"check must be 'stream' or 'end', not {check!r}")
        self.check = check
        quiet_frame_repr()
        self.pool = Pool(istiod)
        self.listen, self.timeout, self.external_id, self.upstream_token = listen, timeout, external_id, upstream_token
        self.server: asyncio.Server | None = None
        self.fronts: weakref.WeakSet[Downstream] = weakref.WeakSet()
        self.port = 0

    async def start(self) -> None:
        host, _, port = self.listen.rpartition(":")
        def accept() -> Downstream:
            front = Downstream(self.pool, self.timeout, self.external_id, self.upstream_token, self.check)
            self.fronts.add(front)
            return front

        self.server = await asyncio.get_running_loop().create_server(accept, host, int(port))
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for front in self.fronts:
                if front.transport is not None:
                    front.transport.close()
            await self.server.wait_closed()
        self.pool.close()


async def serve(ns: argparse.Namespace) -> None:
    ct = CutThrough(ns.istiod.split(","), ns.listen, timeout=ns.timeout, upstream_token=ns.upstream_token,
                    check=ns.check)
    await ct.start()
    print(json.dumps({"port": ct.port}), flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await ct.close()


# -- the benchmark ------------------------------------------------------------------------------------------

MODES = ("floor", "proxy", "cutthrough", "cutthrough-upb", "floor-via-envoy")


class CutThroughProcess(Child):
    """`python -m bench.cutthrough serve` in a child process, observed with psutil."""

    def __init__(self, addresses: Sequence[str], upstream_token: str = "", check: str = "stream") -> None:
        import psutil  # the bench extra; the prototype itself needs only h2

        from .run import DEPLOYED_ENV, ROOT

        cmd = [sys.executable, "-m", "bench.cutthrough", "serve", "--istiod", ",".join(addresses), "--check", check]
        if upstream_token:
            cmd += ["--upstream-token", upstream_token]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, **DEPLOYED_ENV})
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("cut-through process exited")
        self.port = int(json.loads(line)["port"])
        self.ps = psutil.Process(self.proc.pid)


class EnvoyHop(Child):
    """Real Envoy (.peers/bin/envoy, one worker) as a plain HTTP/2 router in front of each replica, one listener
    per replica: the floor through a native hop. What a native cut-through forwarder would cost at least (it
    forwards the same bytes the same way, and would add only the trailer), measured instead of guessed."""

    def __init__(self, addresses: Sequence[str], directory: str) -> None:
        import psutil

        from istioctl_proxy.app import free_port

        from .run import ROOT

        window = {"initial_stream_window_size": WINDOW, "initial_connection_window_size": CONN_WINDOW}
        self.ports = [free_port() for _ in addresses]
        listeners, clusters = [], []
        for i, (address, port) in enumerate(zip(addresses, self.ports, strict=True)):
            host, _, rport = address.rpartition(":")
            route = {"match": {"prefix": "/"}, "route": {"cluster": f"r{i}", "timeout": "0s"}}
            router = {"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
            listeners.append({"name": f"l{i}", "address": {"socket_address": {"address": "127.0.0.1",
                                                                                  "port_value": port}},
                              "filter_chains": [{"filters": [{
                                  "name": "envoy.filters.network.http_connection_manager",
                                  "typed_config": {
                                      "@type": "type.googleapis.com/envoy.extensions.filters.network."
                                               "http_connection_manager.v3.HttpConnectionManager",
                                      "stat_prefix": f"l{i}", "codec_type": "HTTP2", "http2_protocol_options": window,
                                      "stream_idle_timeout": "0s",
                                      "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"],
                                                                          "routes": [route]}]},
                                      "http_filters": [router],
                                  }}]}],
                              "per_connection_buffer_limit_bytes": WINDOW})
            clusters.append({"name": f"r{i}", "type": "STATIC", "per_connection_buffer_limit_bytes": WINDOW,
                             "typed_extension_protocol_options": {
                                 "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                                     "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                                              "HttpProtocolOptions",
                                     "explicit_http_config": {"http2_protocol_options": window}}},
                             "load_assignment": {"cluster_name": f"r{i}", "endpoints": [{"lb_endpoints": [{
                                 "endpoint": {"address": {"socket_address": {"address": host,
                                                                             "port_value": int(rport)}}}}]}]}})
        config = os.path.join(directory, "envoy.json")
        with open(config, "w", encoding="utf-8") as f:
            json.dump({"static_resources": {"listeners": listeners, "clusters": clusters}}, f)
        self.proc = subprocess.Popen(
            [os.path.join(ROOT, ".peers", "bin", "envoy"), "-c", config, "--concurrency", "1", "--log-level", "error",
             "--base-id", str(os.getpid() % 60000)], cwd=directory)
        self.ps = psutil.Process(self.proc.pid)


def compare(proxy_body: bytes, cut_body: bytes, proxies: int) -> dict[str, Any]:
    """The prototype's answer against the real proxy's, decoded: the same resources, the same control plane."""
    a = discovery_pb2.DiscoveryResponse.FromString(proxy_body)
    b = discovery_pb2.DiscoveryResponse.FromString(cut_body)
    ra = collections.Counter(r.SerializeToString() for r in a.resources)
    rb = collections.Counter(r.SerializeToString() for r in b.resources)
    problems = []
    if ra != rb:
        problems.append(f"resources differ: {sum((ra - rb).values())} only in the proxy's, "
                        f"{sum((rb - ra).values())} only in the prototype's")
    if len(b.resources) != proxies:
        problems.append(f"{len(b.resources)} resources, expected {proxies}")
    if a.control_plane.identifier != b.control_plane.identifier:
        problems.append(f"control plane {b.control_plane.identifier!r} != proxy's {a.control_plane.identifier!r}")
    if a.type_url != b.type_url:
        problems.append(f"type_url {b.type_url!r} != {a.type_url!r}")
    if not b.version_info or not b.nonce.startswith(b.version_info):
        problems.append(f"version {b.version_info!r} nonce {b.nonce!r}")
    return {"equal": not problems, "problems": problems, "resources": len(b.resources),
            "same_order": [r.SerializeToString() for r in a.resources] == [r.SerializeToString() for r in b.resources],
            "identifier": b.control_plane.identifier, "proxy_bytes": len(proxy_body), "cut_bytes": len(cut_body)}


async def run_istioctl(port: int, proxies: int) -> dict[str, Any]:
    """Real istioctl `x ps` against the prototype, once: rows, and the ISTIOD column of each."""
    from .run import ROOT

    istioctl = os.path.join(ROOT, ".peers", "bin", "istioctl")
    with tempfile.TemporaryDirectory(prefix="cutthrough-istioctl-") as home:
        env = {"HOME": home, "PATH": "/usr/bin:/bin", "KUBECONFIG": os.path.join(home, "none")}
        t = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            istioctl, "x", "ps", "--xds-address", f"127.0.0.1:{port}", "--plaintext", "-r", "default", env=env,
            cwd=home, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        elapsed = time.perf_counter() - t
    rows = out.decode().splitlines()[1:]
    return {"returncode": proc.returncode, "rows": len(rows), "expected": proxies, "seconds": elapsed,
            "external_rows": sum("<external>" in r.split() for r in rows), "stderr": err.decode()[-400:]}


async def scenario(replicas: Any, latency: float, proxies: int, rounds: int, calls: int,
                   with_istioctl: bool) -> dict[str, Any]:
    from .replicas import TOKEN
    from .run import ProxyProcess, _channel, ask, pct

    replicas.command(f"latency {latency}")
    proxy = ProxyProcess(replicas.addresses, None)
    cut = CutThroughProcess(replicas.addresses, upstream_token=TOKEN)
    cut_upb = CutThroughProcess(replicas.addresses, upstream_token=TOKEN, check="end")
    tmp = tempfile.TemporaryDirectory(prefix="cutthrough-envoy-")
    envoy = EnvoyHop(replicas.addresses, tmp.name)
    chans = {"proxy": _channel(f"127.0.0.1:{proxy.port}", None, ""),
             "cutthrough": _channel(f"127.0.0.1:{cut.port}", None, ""),
             "cutthrough-upb": _channel(f"127.0.0.1:{cut_upb.port}", None, "")}
    floor = [_channel(a, None, "") for a in replicas.addresses]
    via_envoy = [_channel(f"127.0.0.1:{port}", None, "") for port in envoy.ports]
    try:
        await proxy.idle_rss()
        for ch in via_envoy:  # Envoy listens once its config is loaded
            await asyncio.wait_for(ch.channel_ready(), 30)

        async def call(mode: str) -> bytes | int:
            if mode in ("floor", "floor-via-envoy"):
                chs = floor if mode == "floor" else via_envoy
                return sum(map(len, await asyncio.gather(*(ask(ch) for ch in chs))))
            return await ask(chans[mode])

        for mode in MODES:  # warm every path; then the answers' check
            await call(mode)
        reference = await ask(chans["proxy"])
        check = {m: compare(reference, await ask(chans[m]), proxies) for m in ("cutthrough", "cutthrough-upb")}
        sizes: dict[str, int] = {}
        lat: dict[str, list[float]] = {m: [] for m in MODES}
        round_p50: dict[str, list[float]] = {m: [] for m in MODES}
        procs: dict[str, CutThroughProcess | EnvoyHop | Any] = {
            "proxy": proxy, "cutthrough": cut, "cutthrough-upb": cut_upb, "floor-via-envoy": envoy}
        cpu = dict.fromkeys(procs, 0.0)
        load = [os.getloadavg()]
        for r in range(rounds):
            for mode in MODES[r % len(MODES):] + MODES[: r % len(MODES)]:
                before = procs[mode].cpu() if mode in procs else 0.0
                block = []
                for _ in range(calls):
                    t = time.perf_counter()
                    got = await call(mode)
                    block.append(time.perf_counter() - t)
                    sizes[mode] = got if isinstance(got, int) else len(got)
                if mode in procs:
                    cpu[mode] += procs[mode].cpu() - before
                lat[mode] += block
                round_p50[mode].append(statistics.median(block))
        load.append(os.getloadavg())
        istioctl = await run_istioctl(cut.port, proxies) if with_istioctl else None
        n = rounds * calls
        out: dict[str, Any] = {
            "latency_ms": latency * 1e3, "proxies": proxies, "replicas": len(replicas.addresses),
            "rounds": rounds, "calls": calls, "check": check, "istioctl": istioctl, "load": load,
            "bytes": sizes, "modes": {},
        }
        mib = sizes["proxy"] / MiB
        for mode in MODES:
            ratios = [x / f for x, f in zip(round_p50[mode], round_p50["floor"], strict=True)]
            out["modes"][mode] = {
                "p50_ms": pct(lat[mode], 50) * 1e3, "p90_ms": pct(lat[mode], 90) * 1e3,
                "over_floor": statistics.median(ratios),
                "added_ms_per_mib": (pct(lat[mode], 50) - pct(lat["floor"], 50)) * 1e3 / mib,
                "cpu_ms_per_call": cpu[mode] / n * 1e3 if mode in cpu else None,
            }
        out["over_proxy"] = {m: statistics.median(c / p for c, p in zip(round_p50[m], round_p50["proxy"], strict=True))
                             for m in ("cutthrough", "cutthrough-upb")}
        return out
    finally:
        for ch in [*chans.values(), *floor, *via_envoy]:
            await ch.close()
        proxy.close()
        cut.close()
        cut_upb.close()
        envoy.close()
        tmp.cleanup()


def table(results: dict[str, Any]) -> str:
    lines = ["| replicas' latency | mode | p50 ms | p90 ms | × floor | added ms/MiB | CPU ms/call |",
             "|---|---|---:|---:|---:|---:|---:|"]
    names = {"floor": "floor (direct, concurrent)", "proxy": "proxy (grpc.aio, store-and-forward)",
             "cutthrough": "cut-through (h2), envelope read as it streams",
             "cutthrough-upb": "cut-through (h2), envelope read by upb at each answer's end",
             "floor-via-envoy": "floor through Envoy (a native HTTP/2 hop per replica)"}
    for sc in results["scenarios"]:
        for mode, m in sc["modes"].items():
            cpu = "" if m["cpu_ms_per_call"] is None else f"{m['cpu_ms_per_call']:.1f}"
            added = "" if mode == "floor" else f"{m['added_ms_per_mib']:.1f}"
            lines.append(f"| {sc['latency_ms']:.0f} ms | {names[mode]} | {m['p50_ms']:.1f} | {m['p90_ms']:.1f} | "
                         f"{m['over_floor']:.2f} | {added} | {cpu} |")
    return "\n".join(lines)


async def bench(ns: argparse.Namespace) -> dict[str, Any]:
    from .run import ReplicaProcess

    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "command": "python -m bench.cutthrough " + " ".join(sys.argv[1:]), "scenarios": []}
    reps = ReplicaProcess(ns.replicas, ns.proxies, None)
    try:
        for i, latency in enumerate(ns.latency):
            sc = await scenario(reps, latency, ns.proxies, ns.rounds, ns.calls, ns.istioctl and i == 0)
            results["scenarios"].append(sc)
            m = sc["modes"]
            print(f"K={ns.replicas} P={ns.proxies} {latency * 1e3:.0f} ms: " + "; ".join(
                f"{mode} p50 {v['p50_ms']:.1f} ({v['over_floor']:.2f} × floor)" for mode, v in m.items())
                + "; check " + ", ".join(f"{m} {c['equal']} {c['problems']}" for m, c in sc["check"].items())
                + (f"; istioctl {sc['istioctl']}" if sc["istioctl"] else ""), flush=True)
    finally:
        reps.close()
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results["cpus"] = os.cpu_count()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cutthrough", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the prototype")
    s.add_argument("--istiod", required=True, help="replica addresses host:port, comma-separated (plaintext)")
    s.add_argument("--listen", default="127.0.0.1:0")
    s.add_argument("--timeout", type=float, default=30.0, help="seconds for every replica's whole answer")
    s.add_argument("--upstream-token", default="", help="bearer token for the replicas when the caller sends none")
    s.add_argument("--check", choices=("stream", "end"), default="stream",
                   help="read each answer's framing and envelope as it streams (Python), or with upb at its end")
    b = sub.add_parser("bench", help="prototype vs proxy vs floor, alternated")
    b.add_argument("--replicas", type=int, default=5)
    b.add_argument("--proxies", default="30k")
    b.add_argument("--latency", default="0,50", help="injected replica latency values, ms")
    b.add_argument("--rounds", type=int, default=9)
    b.add_argument("--calls", type=int, default=3)
    b.add_argument("--no-istioctl", dest="istioctl", action="store_false", help="skip the one real istioctl run")
    b.add_argument("--out", default="")
    ns = p.parse_args(argv)
    if ns.command == "serve":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(ns))
        return 0
    ns.proxies = int(float(ns.proxies[:-1]) * 1000) if ns.proxies.endswith("k") else int(ns.proxies)
    ns.latency = [float(x) / 1e3 for x in ns.latency.split(",")]
    results = asyncio.run(bench(ns))
    from .run import ROOT

    out = ns.out or os.path.join(ROOT, "bench", "results", "cutthrough-" + time.strftime("%Y%m%d-%H%M%S") + ".json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    print(table(results))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
