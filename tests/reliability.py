"""Shared machinery of the reliability suites (load, faults, fuzz, errors, security).

- `Tally` and `run_workers`: concurrent clients calling the proxy one stream at a time, each call checked,
  and what they saw by kind (test_load, test_faults).
- `Background`: a proxy stack running in its own thread and event loop, so synchronous hypothesis tests
  can fire thousands of cases at one server over one channel.
- `Usage`: tasks, file descriptors and RSS, for leak and plateau checks.
- `record_figures`: the numbers docs/security.md quotes, written to bench/results/reliability/.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from .ads_client import Outcome, ads_call
from .waits import EVENT_TIMEOUT

FIGURES_DIR = Path(__file__).resolve().parent.parent / "bench" / "results" / "reliability"

T = TypeVar("T")


# -- Traffic: concurrent clients, each call checked --------------------------------------------------------

Check = Callable[[Outcome], str]  # "" when the outcome is right, else why not
Call = Callable[[grpc.aio.Channel], Awaitable[tuple[str, Outcome, Check]]]  # one call: its kind, outcome, check


@dataclass
class Tally:
    """What a run of calls saw, by kind: calls, status codes, wrong answers, latencies, late calls, and the
    replicas that partial answers named as failed (by `labels`: address -> name)."""

    labels: dict[str, str] = field(default_factory=dict)
    late_slack: float = 0.0  # a call is late once past its deadline + this
    calls: collections.Counter[str] = field(default_factory=collections.Counter)
    codes: collections.Counter[str] = field(default_factory=collections.Counter)
    failures: collections.Counter[str] = field(default_factory=collections.Counter)  # "<kind>: <why to its ':'>"
    examples: list[str] = field(default_factory=list)  # the first ten "<kind>: <why>"
    latencies: list[float] = field(default_factory=list)
    late: int = 0
    named: collections.Counter[str] = field(default_factory=collections.Counter)

    def add(self, kind: str, out: Outcome, why: str) -> None:
        self.calls[kind] += 1
        self.codes[out.code.name] += 1
        self.latencies.append(out.elapsed)
        if out.elapsed > out.deadline + self.late_slack:
            self.late += 1
        if why:
            self.failures[f"{kind}: {why.split(':')[0]}"] += 1
            if len(self.examples) < 10:
                self.examples.append(f"{kind}: {why}")
        for f in out.failed_replicas:  # "<host:port>: <why>"
            address = ":".join(f.split(":")[:2])
            self.named[self.labels.get(address, address)] += 1

    @property
    def total(self) -> int:
        return sum(self.calls.values())


async def run_workers(
    workers: int, make_call: Callable[[random.Random], Call], tally: Tally, *,
    channel: Callable[[], grpc.aio.Channel], going: Callable[[], bool], redial_every: int, seed: int = 0,
) -> None:
    """`workers` concurrent clients, each one stream at a time, while `going()`; worker i makes its calls
    with `make_call(Random(seed * 1000 + i))`. Every `redial_every`-th worker dials a new channel per call
    (istioctl runs one command per process, and new TLS handshakes see certificate rotations), the others
    reuse theirs. An answer the check cannot read is a wrong answer, not a test crash."""

    async def worker(i: int) -> None:
        call = make_call(random.Random(seed * 1000 + i))
        redial = i % redial_every == 0
        ch: grpc.aio.Channel | None = None
        try:
            while going():
                ch = ch or channel()
                kind, out, check = await call(ch)
                try:
                    why = check(out)
                except Exception as err:
                    why = f"unreadable answer: {err!r}"
                tally.add(kind, out, why)
                if redial:
                    await ch.close()
                    ch = None
        finally:
            if ch is not None:
                await ch.close()

    await asyncio.gather(*(worker(i) for i in range(workers)))


# -- A stack in a background thread ------------------------------------------------------------------------


class Background:
    """Run an async context manager (e.g. helpers.stack()) in a thread with its own event loop."""

    def __init__(self, factory: Callable[[], contextlib.AbstractAsyncContextManager[T]]) -> None:
        self._factory = factory
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="background-stack", daemon=True)
        self._cm: contextlib.AbstractAsyncContextManager[Any] | None = None
        self.value: Any = None

    def run(self, coro: Awaitable[T], timeout: float = EVENT_TIMEOUT) -> T:
        async def wrapper() -> T:
            return await coro

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(timeout)

    def __enter__(self) -> Background:
        self._thread.start()
        self._cm = self._factory()
        self.value = self.run(self._cm.__aenter__())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._cm is not None:
                self.run(self._cm.__aexit__(None, None, None))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()

    def tasks(self) -> int:
        async def count() -> int:
            return len(asyncio.all_tasks())

        return self.run(count())


# -- Resource usage ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    tasks: int
    fds: int
    rss: int  # bytes
    threads: int

    @classmethod
    def now(cls) -> Usage:
        status = _proc_status()
        return cls(tasks=_tasks_here(), fds=len(os.listdir("/proc/self/fd")), rss=status["VmRSS"] * 1024,
                   threads=status["Threads"])

    def as_dict(self) -> dict[str, float]:
        return {"tasks": self.tasks, "fds": self.fds, "rss_mib": round(self.rss / 2**20, 1), "threads": self.threads}


def _proc_status() -> dict[str, int]:
    """The numeric fields of /proc/self/status (VmRSS in KiB, Threads, ...)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            parts = value.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0])
    return out


def rss() -> int:
    return _proc_status()["VmRSS"] * 1024


def _tasks_here() -> int:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return 0
    return len(asyncio.all_tasks())


def open_fds() -> dict[int, str]:
    """This process's file descriptors and what they are (for leak reports)."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return out


async def warm_grpc(tls: tuple[bytes, bytes] | None = None) -> None:
    """gRPC creates process-wide descriptors and threads on first use (pollers, event engine): use a server
    and a channel once, so that a leak check's baseline already has them."""
    from istioctl_proxy.sim.simulator import SimReplica, build_simulator_server

    server, port = build_simulator_server(SimReplica("warm-up"), "127.0.0.1:0",
                                          tls=(tls[0], tls[1], None) if tls else None)
    await server.start()
    try:
        if tls:
            creds = grpc.ssl_channel_credentials(tls[0])
            ch = grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=[("grpc.ssl_target_name_override", "x")])
        else:
            ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        async with ch:
            await ads_call(ch, [discovery_pb2.DiscoveryRequest(type_url="x")], timeout=2)
    finally:
        await server.stop(0)


@dataclass
class RssSampler:
    """Samples the process RSS every `every` seconds while running."""

    every: float = 0.5
    samples: list[tuple[float, int]] = field(default_factory=list)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[RssSampler]:
        started = time.monotonic()

        async def loop() -> None:
            while True:
                self.samples.append((time.monotonic() - started, rss()))
                await asyncio.sleep(self.every)

        task = asyncio.create_task(loop())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def thirds(self) -> tuple[int, int, int]:
        """Peak RSS in each third of the run."""
        values = [rss for _, rss in self.samples]
        n = max(1, len(values) // 3)
        parts = [values[:n], values[n : 2 * n], values[2 * n :] or values[-1:]]
        return max(parts[0]), max(parts[1] or parts[0]), max(parts[2])


# -- Figures for docs/security.md -----------------------------------------------------------------------------


def record_figures(name: str, figures: dict[str, Any]) -> None:
    """Write one suite's figures (and print them, so `pytest -s` shows them too)."""
    FIGURES_DIR.mkdir(parents=True, exist_ok=True)
    figures = {"recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **figures}
    (FIGURES_DIR / f"{name}.json").write_text(json.dumps(figures, indent=2, sort_keys=True, default=str) + "\n")
    print(f"\n[figures] {name}: {json.dumps(figures, sort_keys=True, default=str)}")


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "")
    return float(value) if value else default
