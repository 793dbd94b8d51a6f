"""Where the istiod replicas are: static lists, DNS names, and the interface other sources plug into.

A source yields the *full* current set of replicas each time it changes. `ReplicaSet` merges the sets of
all sources; the data path only ever reads `ReplicaSet.current()`, so a change never disturbs calls
already in flight (they keep the replica list they started with).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import re
import socket
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

OnChange = Callable[[Sequence["Replica"]], None]
Listener = Callable[[tuple["Replica", ...]], None]


@dataclass(frozen=True, order=True)
class Replica:
    """One istiod replica: where to dial it and which source found it."""

    address: str  # "host:port"; IPv6 hosts in brackets
    source: str = "static"  # label for logs and metrics
    name: str = ""  # pod name, when the source knows it
    revision: str = ""  # istio.io/rev of the replica; "" when its source does not say (one revision)
    # The name its serving certificate must carry; "" = the proxy-wide one (--istiod-san / --revision).
    # Set per replica when several revisions are followed, so none is verified against another's name.
    san: str = ""

    @property
    def label(self) -> str:
        """The replica's name for logs and trailers: its pod/DNS name, else its address."""
        return self.name or self.address


def istiod_san(namespace: str, revision: str = "") -> str:
    """The DNS SAN istiod's serving certificate carries for a revision (istiod's getDNSNames, istioctl's
    makeSan): `istiod-<rev>.<ns>.svc`, or `istiod.<ns>.svc` for the default revision."""
    if revision and revision != "default":
        return f"istiod-{revision}.{namespace}.svc"
    return f"istiod.{namespace}.svc"


@dataclass(frozen=True)
class Entry:
    """One `--istiod` / `--istiod-dns` entry: `HOST:PORT[@REVISION][=SAN]`."""

    target: str  # HOST:PORT (a DNS name for --istiod-dns)
    revision: str = ""
    san: str = ""


_REVISION = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # istio.io/rev values are DNS labels


def parse_entry(value: str) -> Entry:
    """Split `HOST:PORT[@REVISION][=SAN]`; raises ValueError saying what is wrong."""
    rest, has_san, san = value.partition("=")
    target, has_rev, revision = rest.partition("@")
    if has_san and not san:
        raise ValueError(f"{value!r}: nothing after '=' (the SAN its certificate must carry)")
    if has_rev and not _REVISION.match(revision):
        raise ValueError(f"{value!r}: revision {revision!r} is not a valid istio.io/rev value")
    split_host_port(target)
    return Entry(target, revision, san)


def entry_replica(entry: Entry, address: str, source: str, *, namespace: str, revision: str = "",
                  per_replica_san: bool = False) -> Replica:
    """The replica an entry stands for: its own revision (else `revision`), its own SAN (else the revision's
    when `per_replica_san`, else the proxy-wide one)."""
    rev = entry.revision or revision
    san = entry.san or (istiod_san(namespace, rev) if (entry.revision or per_replica_san) and rev else "")
    return Replica(address, source, revision=rev, san=san)


class ReplicaSource(Protocol):
    """Finds replicas. `run` never returns while the proxy serves; it reports every change."""

    @property
    def name(self) -> str:
        """Where the replicas come from ("static", "dns:<name>", "k8s:<context>/<ns>"): label and log key."""
        ...

    async def run(self, on_change: OnChange) -> None:
        """Report this source's whole replica list through `on_change` whenever it changes, until cancelled.

        Args:
            on_change: takes the complete current list (not a delta); must not block. An exception raised
                by `run` is logged and the source restarted after a second (ReplicaSet).
        """
        ...


def split_host_port(value: str, *, default_port: int | None = None, allow_zero: bool = False) -> tuple[str, int]:
    """Parse `host:port` or `[v6]:port`; raises ValueError with a readable message."""
    host, sep, port = value.rpartition(":")
    if not sep or "]" in port:
        if default_port is None:
            raise ValueError(f"{value!r} is not HOST:PORT")
        host, port = value, str(default_port)
    host = host.strip("[]")
    if not host:
        raise ValueError(f"{value!r} has no host")
    if not port.isdigit() or not (0 if allow_zero else 1) <= int(port) < 65536:
        raise ValueError(f"{value!r} has no valid port")
    return host, int(port)


def join_host_port(host: str, port: int) -> str:
    """HOST:PORT, with brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class StaticSource:
    """A fixed list given on the command line (`--istiod`)."""

    addresses: Sequence[str]  # HOST:PORT[@REVISION][=SAN]
    name: str = "static"
    namespace: str = "istio-system"  # for the SAN of an entry's revision
    revision: str = ""  # the revision of entries that name none
    per_replica_san: bool = False  # several revisions: each replica gets its revision's SAN

    def replicas(self) -> list[Replica]:
        """The replicas the entries stand for, each with its revision and SAN."""
        out = []
        for value in self.addresses:
            entry = parse_entry(value)
            out.append(entry_replica(entry, entry.target, self.name, namespace=self.namespace,
                                     revision=self.revision, per_replica_san=self.per_replica_san))
        return out

    async def run(self, on_change: OnChange) -> None:
        """Report the fixed addresses once, then wait to be cancelled."""
        on_change(self.replicas())
        await asyncio.Event().wait()


Resolver = Callable[[str, int], Awaitable[Sequence[str]]]


async def resolve_all(host: str, port: int) -> Sequence[str]:
    """All A and AAAA addresses of `host`, as the system resolver returns them."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


@dataclass
class DnsSource:
    """Every A/AAAA record of one name (a headless Service), re-resolved every `interval` seconds."""

    target: str  # "name:port[@revision][=san]": one headless Service per revision
    interval: float = 5.0
    resolver: Resolver = resolve_all
    namespace: str = "istio-system"
    revision: str = ""
    per_replica_san: bool = False

    @property
    def name(self) -> str:
        """"dns:<NAME:PORT>"."""
        return f"dns:{self.target}"

    def replica(self, ip: str, port: int) -> Replica:
        """The replica at one resolved address, with the entry's revision and SAN."""
        return entry_replica(parse_entry(self.target), join_host_port(ip, port), self.name,
                             namespace=self.namespace, revision=self.revision,
                             per_replica_san=self.per_replica_san)

    async def run(self, on_change: OnChange) -> None:
        """Resolve every `interval` s (jittered) and report changes; a failed lookup keeps the last set."""
        host, port = split_host_port(parse_entry(self.target).target)
        last: list[Replica] | None = None
        while True:
            try:
                ips = await self.resolver(host, port)
            except (OSError, socket.gaierror) as err:
                # Keep serving the last known set: a DNS outage must not empty the mesh view.
                log.warning("resolving %s failed: %s; keeping %d known replicas", host, err, len(last or []))
            else:
                replicas = sorted(self.replica(ip, port) for ip in ips)
                if replicas != last:
                    log.info("%s resolved to %s", self.target, ", ".join(r.address for r in replicas) or "nothing")
                    last = replicas
                    on_change(replicas)
            # Jitter spreads the re-resolutions of many proxy instances.
            await asyncio.sleep(self.interval * random.uniform(0.9, 1.1))


class ReplicaSet:
    """The union of every source's current replicas."""

    def __init__(self, sources: Sequence[ReplicaSource]) -> None:
        self._sources = list(sources)
        self._by_source: dict[str, tuple[Replica, ...]] = {}
        self._current: tuple[Replica, ...] = ()
        self._changed = asyncio.Event()
        self.version = 0  # bumped on every change of the set
        self._tasks: list[asyncio.Task[None]] = []
        self._listeners: list[Listener] = []

    def current(self) -> tuple[Replica, ...]:
        """The replicas known now (a snapshot: callers may keep it)."""
        return self._current

    @property
    def sources(self) -> tuple[ReplicaSource, ...]:
        """The sources this set merges."""
        return tuple(self._sources)

    def add_listener(self, listener: Listener) -> None:
        """Call `listener` with the new replicas on every change; it must not block."""
        self._listeners.append(listener)

    def _update(self, source: str, replicas: Sequence[Replica]) -> None:
        self._by_source[source] = tuple(replicas)
        seen: dict[str, Replica] = {}
        for group in self._by_source.values():
            for replica in group:
                seen.setdefault(replica.address, replica)
        new = tuple(sorted(seen.values()))
        if new != self._current:
            self._current = new
            self.version += 1
            for listener in self._listeners:
                listener(new)
            # Wake the current waiters; later waiters get a fresh event.
            self._changed.set()
            self._changed = asyncio.Event()

    async def start(self) -> None:
        """Run every source in the background."""
        for source in self._sources:
            self._tasks.append(asyncio.create_task(self._run(source), name=f"discovery {source.name}"))

    async def _run(self, source: ReplicaSource) -> None:
        while True:
            try:
                await source.run(functools.partial(self._update, source.name))
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("replica source %s failed; restarting it", source.name)
                await asyncio.sleep(1.0)

    def wait_changed(self, after: int | None = None) -> Coroutine[None, None, int]:
        """Wait until the set's version is past `after` (default: the current one); return the new version."""
        # Not `async def`: the default is the version when this is called. A coroutine would read it when
        # it first runs (asyncio.wait_for and create_task run it a loop turn later), and a change landing
        # in between would then be waited for again, forever.
        return self._wait_past(self.version if after is None else after)

    async def _wait_past(self, after: int) -> int:
        while self.version <= after:
            await self._changed.wait()
        return self.version

    async def stop(self) -> None:
        """Cancel the sources and wait for them."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()


__all__ = [
    "DnsSource",
    "Entry",
    "Listener",
    "OnChange",
    "Replica",
    "ReplicaSet",
    "ReplicaSource",
    "Resolver",
    "StaticSource",
    "entry_replica",
    "istiod_san",
    "join_host_port",
    "parse_entry",
    "resolve_all",
    "split_host_port",
]
