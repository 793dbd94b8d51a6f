"""Persistent gRPC channels to the istiod replicas, and one debug request/response over them.

A channel per replica is created once and reused; gRPC reconnects it with exponential backoff. Answers
come back as raw bytes: the merge decides what, if anything, to decode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

import grpc

from .discovery import Replica
from .errors import UpstreamError
from .tls import TokenFile, UpstreamTLS, fetch_unverified_root

log = logging.getLogger(__name__)

ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
# How long a channel to a replica that discovery dropped stays open for calls already using it.
_RETIRE_AFTER = 60.0


# Tuned for multi-MiB answers (30k proxies ≈ 3 MiB per replica); measured in bench/ (docs/benchmarks.md).
# The receiver's settings decide how the sender may frame and pace: a 16 MiB stream/connection window lets a
# whole answer be in flight without WINDOW_UPDATE round trips, bigger frames and read chunks cut per-frame
# and per-read work in the transport. Used on the upstream channels and on the serving side.
LARGE_MESSAGE_OPTIONS: tuple[tuple[str, object], ...] = (
    ("grpc.http2.lookahead_bytes", 16 * 1024 * 1024),
    ("grpc.http2.max_frame_size", 4 * 1024 * 1024),
    ("grpc.experimental.tcp_min_read_chunk_size", 256 * 1024),
    ("grpc.experimental.tcp_read_chunk_size", 1024 * 1024),
    ("grpc.experimental.tcp_max_read_chunk_size", 8 * 1024 * 1024),
    ("grpc.http2.write_buffer_size", 8 * 1024 * 1024),
    # TLS records up to 16 KiB are the maximum anyway; the default is smaller on some builds.
    ("grpc.experimental.http2.preferred_crypto_frame_size", 16 * 1024),
)
if os.environ.get("ISTIOCTL_PROXY_GRPC_DEFAULTS"):
    # gRPC's own defaults (plus the window this proxy always had), so bench/ can A/B the tuning above.
    LARGE_MESSAGE_OPTIONS = (("grpc.http2.lookahead_bytes", 4 * 1024 * 1024),)


class UpstreamPool:
    """One reusable channel per replica address.

    Per-replica state (channels, last_ok, last_error, fetched roots) is kept for the replicas discovery
    lists now and nothing else: `retain` drops the rest, so churning pods never grow it.
    """

    def __init__(self, tls: UpstreamTLS, *, max_message_bytes: int, token_file: TokenFile | None = None,
                 retire_after: float = _RETIRE_AFTER) -> None:
        self.tls = tls
        self.max_message_bytes = max_message_bytes
        self.token_file = token_file
        self.retire_after = retire_after
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._channel_san: dict[str, str] = {}  # the name each open channel verifies its replica against
        self._unverified_roots: dict[str, bytes] = {}  # --istiod-insecure-skip-verify only
        self._retiring: dict[asyncio.Task[None], grpc.aio.Channel] = {}
        self.last_ok: dict[str, float] = {}
        self.last_error: dict[str, str] = {}
        self._known: set[str] | None = None  # the replicas of the last retain(); None: no discovery yet
        self.channels_opened = 0  # for metrics and leak tests: opened - closed is what is open now
        self.channels_closed = 0

    @property
    def open_addresses(self) -> tuple[str, ...]:
        """Replicas with a channel in use now (retiring channels not included)."""
        return tuple(self._channels)

    @property
    def retiring(self) -> int:
        """Channels of dropped replicas still open for calls that were using them."""
        return len(self._retiring)

    def _options(self, san: str = "") -> list[tuple[str, object]]:
        opts: list[tuple[str, object]] = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 10_000),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            *LARGE_MESSAGE_OPTIONS,
            # Each replica gets its own subchannel even when two addresses share a host.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        if not self.tls.plaintext:
            opts.append(("grpc.ssl_target_name_override", self.san_of(san)))
            opts.append(("grpc.default_authority", self.san_of(san)))
        return opts

    def _credentials(self, address: str) -> grpc.ChannelCredentials:
        root = self.tls.ca_pem
        if self.tls.skip_verify and root is None:
            root = self._unverified_roots.get(address) or fetch_unverified_root(address)
        return grpc.ssl_channel_credentials(
            root_certificates=root, private_key=self.tls.key_pem, certificate_chain=self.tls.cert_pem
        )

    def san_of(self, san: str = "") -> str:
        """The name a replica's certificate must carry: its own (several revisions), else the proxy-wide one."""
        return san or self.tls.san

    async def open_channel(self, address: str, timeout: float = 5.0, san: str = "") -> grpc.aio.Channel:
        """The channel to `address`; with --istiod-insecure-skip-verify the root is fetched off the loop first."""
        if (
            address not in self._channels and self.tls.skip_verify and self.tls.ca_pem is None
            and address not in self._unverified_roots
        ):
            # A dead replica must not stall the event loop while we dial it for its certificate.
            self._unverified_roots[address] = await asyncio.to_thread(fetch_unverified_root, address, timeout)
        return self.channel(address, san)

    def channel(self, address: str, san: str = "") -> grpc.aio.Channel:
        """The channel to `address` verified against `san` (the replica's own, else the proxy-wide one),
        opened on first use (see `open_channel` for skip-verify)."""
        san = self.san_of(san)
        ch = self._channels.get(address)
        if ch is not None and self._channel_san.get(address) != san:
            # The address now belongs to a replica of another revision (a pod IP reused): a channel that
            # verified the old name must never serve it.
            self._retire_later(self._channels.pop(address))
            ch = None
        if ch is None:
            if self.tls.plaintext:
                ch = grpc.aio.insecure_channel(address, options=self._options(san))
            else:
                ch = grpc.aio.secure_channel(address, self._credentials(address), options=self._options(san))
            self.channels_opened += 1
            if self._listed(address):
                self._channels[address] = ch
                self._channel_san[address] = san
            else:
                # A call or readiness probe that took its replica list before discovery dropped this one:
                # it gets a channel, which is retired like the others instead of staying open for good.
                self._retire_later(ch)
        return ch

    def retain(self, replicas: tuple[Replica, ...]) -> None:
        """Close, after a grace period, the channels of replicas discovery no longer lists; forget their state."""
        keep = {r.address for r in replicas}
        self._known = keep
        for state in (self._unverified_roots, self.last_ok, self.last_error):
            for address in [a for a in state if a not in keep]:
                del state[address]
        self._retire_channels(keep)

    def _retire_channels(self, keep: set[str]) -> None:
        for address in [a for a in self._channels if a not in keep]:
            self._retire_later(self._channels.pop(address))
            self._channel_san.pop(address, None)

    def _retire_later(self, ch: grpc.aio.Channel) -> None:
        task = asyncio.get_running_loop().create_task(self._retire(ch))
        self._retiring[task] = ch
        task.add_done_callback(self._retired)

    def _retired(self, task: asyncio.Task[None]) -> None:
        self._retiring.pop(task, None)

    async def _retire(self, ch: grpc.aio.Channel) -> None:
        await asyncio.sleep(self.retire_after)
        # Whoever takes the channel out of _retiring closes it: this task, or close() if it came first.
        if self._retiring.pop(asyncio.current_task(), None) is not None:  # type: ignore[arg-type]
            await self._close_channel(ch)

    async def _close_channel(self, ch: grpc.aio.Channel) -> None:
        self.channels_closed += 1
        await ch.close()

    def refresh_tls(self, tls: UpstreamTLS) -> None:
        """New trust material: later calls use new channels; open ones finish on the old."""
        self.tls = tls
        self._unverified_roots.clear()
        self._retire_channels(set())

    async def close(self) -> None:
        """Close every channel, those waiting out their retirement grace included."""
        retiring, self._retiring = dict(self._retiring), {}
        for task in retiring:
            task.cancel()
        for task, ch in retiring.items():
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self._close_channel(ch)
        channels, self._channels = list(self._channels.values()), {}
        self._channel_san.clear()
        for ch in channels:
            await self._close_channel(ch)

    def _note_error(self, address: str, error: str) -> None:
        # A call that outlived its replica (discovery dropped it meanwhile) must not bring its state back.
        if self._listed(address):
            self.last_error[address] = error

    def _listed(self, address: str) -> bool:
        return self._known is None or address in self._known

    async def ask(
        self, replica: Replica, request: bytes, metadata: tuple[tuple[str, str], ...], timeout: float
    ) -> bytes:
        """Send one DiscoveryRequest on a new stream and return the first response's bytes."""
        if self.token_file is not None:
            metadata = (*metadata, ("authorization", "Bearer " + self.token_file.read()))
        started = time.monotonic()
        try:
            channel = await self.open_channel(replica.address, timeout, replica.san)
        except (OSError, ValueError) as err:
            raise UpstreamError(grpc.StatusCode.UNAVAILABLE, f"cannot fetch istiod's certificate: {err}") from None
        call = channel.stream_stream(ADS_METHOD)(metadata=metadata, timeout=timeout)
        try:
            await call.write(request)
            response = await call.read()
            if response is grpc.aio.EOF:
                code = await call.code()
                details = await call.details()
                if code == grpc.StatusCode.OK:
                    raise UpstreamError(grpc.StatusCode.UNAVAILABLE, "istiod closed the stream without answering")
                raise UpstreamError(code, details or code.name)
            assert isinstance(response, bytes)
        except grpc.aio.AioRpcError as err:
            self._note_error(replica.address, f"{err.code().name}: {err.details()}")
            raise UpstreamError(err.code(), err.details() or err.code().name) from None
        except UpstreamError as err:
            self._note_error(replica.address, str(err))
            raise
        finally:
            # istiod would keep the stream open for more requests; we asked for one answer only.
            with contextlib.suppress(Exception):
                call.cancel()
        if self._listed(replica.address):  # see _note_error
            self.last_ok[replica.address] = time.monotonic()
            self.last_error.pop(replica.address, None)
        log.debug("%s answered %d bytes in %.1f ms", replica.label, len(response), (time.monotonic() - started) * 1e3)
        return response


__all__ = ["ADS_METHOD", "LARGE_MESSAGE_OPTIONS", "UpstreamError", "UpstreamPool"]
