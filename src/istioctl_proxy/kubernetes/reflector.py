"""The list + watch engine the pod source and the CA ConfigMap watch share (`_Reflector`), with its backoff.

It behaves like client-go's reflector: list once, watch from the list's resourceVersion, re-watch from the last
seen version when a watch ends, relist when the server says that version is gone (410), back off with jitter
on errors, and never forget the last known state because the API server is unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import httpx2
from lightkube import ApiError, AsyncClient
from lightkube.resources.core_v1 import ConfigMap, Pod

from .config import FieldSelector, KubeTarget, LabelSelector

log = logging.getLogger(__name__)

__all__ = ["Backoff", "ReflectorStats"]


# ---------------------------------------------------------------------------------------------------------
# Backoff


@dataclass
class Backoff:
    """Exponential backoff with jitter (each delay drawn from [delay/2, delay]).

    Jitter matters: after an API server restart every proxy replica (and every other client) reconnects;
    without it they would all retry in lock-step.
    """

    initial: float = 0.5
    maximum: float = 15.0
    factor: float = 2.0
    _next: float = field(default=0.0, init=False)

    def reset(self) -> None:
        """Start over from `initial` (after a success)."""
        self._next = 0.0

    def next_delay(self) -> float:
        """The next delay: exponential up to `maximum`, with jitter."""
        self._next = self.initial if self._next == 0.0 else min(self.maximum, self._next * self.factor)
        return self._next * random.uniform(0.5, 1.0)


# ---------------------------------------------------------------------------------------------------------
# The list + watch engine


@dataclass
class ReflectorStats:
    """Counters for logs, metrics and tests."""

    lists: int = 0  # successful full lists
    relists_gone: int = 0  # relists forced by 410 Gone / Expired
    watches: int = 0  # watch streams started (lightkube itself resumes one that the server ended cleanly)
    watch_streams: int = 0  # watch requests the server accepted (200), lightkube's own resumes included
    unauthorized: int = 0  # requests answered 401 (lightkube re-reads the token file and retries once)
    events: int = 0  # watch events applied (ADDED, MODIFIED, DELETED; bookmarks only move the resourceVersion)
    errors: int = 0  # failed list or watch attempts
    synced: bool = False  # a list has succeeded at least once
    connected: bool = False  # the last list/watch attempt succeeded (false while the API server is away)
    last_error: str = ""
    last_sync: float = 0.0  # time.time() of the last successful list


def _status_code(err: BaseException) -> int | None:
    if isinstance(err, ApiError) and err.status is not None and err.status.code is not None:
        return int(err.status.code)
    if isinstance(err, httpx2.HTTPStatusError):
        return err.response.status_code
    return None


class _Gone(Exception):
    """The watch's resourceVersion is no longer available: the state must be rebuilt from a list."""


R = TypeVar("R", Pod, ConfigMap)


class _Reflector(Generic[R]):
    """Keeps `objects` (name → object) equal to the server's view of one namespaced, filtered collection.

    `on_state` is called with the whole map after every list and after every watch event; while the API
    server cannot be reached it is simply not called, so consumers keep their last known state.
    """

    def __init__(
        self,
        target: KubeTarget,
        resource: type[R],
        namespace: str,
        *,
        labels: LabelSelector | None = None,
        fields: FieldSelector | None = None,
        on_state: Callable[[Mapping[str, R]], None],
        what: str,
        watch_timeout: float = 300.0,
        backoff: Backoff | None = None,
        request_timeout: float = 10.0,
    ) -> None:
        self.target = target
        self.resource: type[R] = resource
        self.namespace = namespace
        self.labels = labels
        self.fields = fields
        self.on_state: Callable[[Mapping[str, R]], None] = on_state
        self.what = what
        self.watch_timeout = watch_timeout
        self.backoff = backoff or Backoff()
        self.request_timeout = request_timeout
        self.objects: dict[str, R] = {}
        self.resource_version: str | None = None
        self.stats = ReflectorStats()

    async def run(self) -> None:
        client = self.target.client(timeout=self.request_timeout)
        _count_responses(client, self.stats, self.what)
        try:
            await self._loop(client)
        finally:
            # Shielded so that cancellation of run() still closes the connection pool.
            with contextlib.suppress(Exception):
                await asyncio.shield(client.close())

    async def _loop(self, client: AsyncClient) -> None:
        gone_streak = 0
        while True:
            started = time.monotonic()
            try:
                if self.resource_version is None:
                    await self._list(client)
                await self._watch(client)
                gone_streak = 0
            except asyncio.CancelledError:
                raise
            except _Gone:
                # Not an outage: the server compacted past our version (or restarted its watch cache).
                # Relist at once; the state stays in place until the list replaces it. Only a 410 right
                # after a relist again (a server that keeps expiring us) backs off, to avoid a hot loop.
                self.stats.relists_gone += 1
                self.resource_version = None
                gone_streak = gone_streak + 1 if time.monotonic() - started < 30 else 1
                log.info("%s: watch expired (410); relisting", self.what)
                if gone_streak > 1:
                    await asyncio.sleep(self.backoff.next_delay())
            except Exception as err:
                self.stats.errors += 1
                self.stats.connected = False
                self.stats.last_error = f"{type(err).__name__}: {err}"
                if time.monotonic() - started > 30:
                    # A watch that ran for a while was healthy: this is a new outage, start backing off
                    # from the beginning rather than from where the last outage left off.
                    self.backoff.reset()
                delay = self.backoff.next_delay()
                log.warning(
                    "%s: %s; keeping %d known objects, retrying in %.1fs",
                    self.what, self.stats.last_error, len(self.objects), delay,
                )  # fmt: skip
                await asyncio.sleep(delay)

    async def _list(self, client: AsyncClient) -> None:
        listing = client.list(self.resource, namespace=self.namespace, labels=self.labels, fields=self.fields)
        objects: dict[str, R] = {}
        async for obj in listing:
            assert obj.metadata is not None and obj.metadata.name is not None
            objects[obj.metadata.name] = obj
        self.objects = objects
        self.resource_version = listing.resourceVersion
        self.stats.lists += 1
        self.stats.synced = True
        self.stats.connected = True
        self.stats.last_sync = time.time()
        self.backoff.reset()
        self.on_state(self.objects)

    async def _watch(self, client: AsyncClient) -> None:
        """Watch from `resource_version` until the server ends the watch; raises _Gone on 410."""
        # The server closes the watch after timeoutSeconds; the random spread (as client-go does) keeps
        # many watchers from reconnecting together. The client-side deadline a little later catches a
        # half-open connection (API server gone without a FIN/RST), which would otherwise hang forever.
        server_timeout = int(self.watch_timeout * random.uniform(1.0, 1.5)) or 1
        self.stats.watches += 1
        stream = client.watch(
            self.resource,
            namespace=self.namespace,
            labels=self.labels,
            fields=self.fields,
            resource_version=self.resource_version,
            server_timeout=server_timeout,
        )
        try:
            async with asyncio.timeout(server_timeout + 10):
                async for kind, obj in stream:
                    self._apply(kind, obj)
        except TimeoutError:
            log.debug("%s: watch deadline reached; re-watching from %s", self.what, self.resource_version)
        except httpx2.HTTPStatusError as err:
            if _status_code(err) == 410:
                raise _Gone from err
            raise
        finally:
            await _aclose(stream)

    def _apply(self, kind: str, obj: R) -> None:
        if obj.metadata is not None and obj.metadata.resourceVersion:
            self.resource_version = obj.metadata.resourceVersion
        if kind == "BOOKMARK" or obj.metadata is None or obj.metadata.name is None:
            return  # only moves the resourceVersion
        # Any event proves the connection works again.
        self.stats.connected = True
        self.backoff.reset()
        if kind == "DELETED":
            self.objects.pop(obj.metadata.name, None)
        else:  # ADDED, MODIFIED
            self.objects[obj.metadata.name] = obj
        self.stats.events += 1
        self.on_state(self.objects)


def _count_responses(client: AsyncClient, stats: ReflectorStats, what: str) -> None:
    """Count the watch streams the server accepts and the 401s `client` gets, in `stats`.

    Both happen inside lightkube, out of the loop's sight: its watch re-requests by itself when the server
    ends a stream (every `watch_timeout`), and its token-file auth re-reads the token and retries on a 401.
    An httpx response hook on lightkube's HTTP client sees every response, retries and resumes included.
    """
    # lightkube 1.0: AsyncClient._client (GenericAsyncClient)._client (httpx2.AsyncClient); it has no public
    # hook. Should that change, the counters stay 0 (the tests that wait on them say so); nothing else breaks.
    http = getattr(getattr(client, "_client", None), "_client", None)
    if not isinstance(http, httpx2.AsyncClient):
        log.debug("%s: cannot count watch streams (lightkube's HTTP client not found)", what)
        return

    async def on_response(response: httpx2.Response) -> None:
        if response.status_code == 401:
            stats.unauthorized += 1
        elif response.status_code == 200 and response.request.url.params.get("watch") == "true":
            stats.watch_streams += 1

    http.event_hooks["response"].append(on_response)


async def _aclose(stream: AsyncIterable[Any]) -> None:
    # lightkube's watch is an async generator: closing it runs its `finally`, which closes the response.
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()
