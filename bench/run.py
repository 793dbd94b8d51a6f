"""The benchmark: `make bench` (or `.venv/bin/python -m bench.run [--quick]`).

Per scenario (replicas K, proxies P, injected replica latency, TLS) it starts the simulated replicas in one
process (bench.replicas) and the proxy in another (`istioctl-proxy serve`, so psutil can read its CPU
seconds and peak RSS), then measures four ways of getting the same answer, alternating in every round so
that the noise of a shared 2-core machine falls on all of them alike:

  proxy     one call to istioctl-proxy over a warm channel (it fans out over its warm channels and merges)
  floor     the client asks every replica itself, concurrently, over warm channels, and merges nothing
  slowest   the slowest replica (the one holding the most proxies) asked alone, warm channel
  baseline  the seed sample's algorithm, re-implemented here: replicas one after another, a fresh
            connection (and TLS handshake) per replica per call, decode every answer and re-encode one

Every client reads raw response bytes (no decoding) except the baseline, whose decode is part of it.
Results: bench/results/<stamp>.json, then bench.report writes docs/benchmarks.md and docs/bench-*.png.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import psutil
from envoy.service.discovery.v3 import discovery_pb2

from istioctl_proxy import client, wire
from istioctl_proxy.app import free_port
from istioctl_proxy.policy import SYNCZ
from istioctl_proxy.sim.pki import TestCA, write_file

from .child import Child
from .replicas import TOKEN

ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
MODES = ("proxy", "floor", "slowest", "baseline")
# A second proxy process started with ISTIOCTL_PROXY_GRPC_DEFAULTS=1, alternated with the others: the A/B
# of the gRPC transport tuning (upstream.LARGE_MESSAGE_OPTIONS) under the same noise.
UNTUNED = "proxy-grpc-defaults"
MiB = 1024 * 1024
# The environment the image and the chart run the proxy with (glibc: one arena, freed memory returned at once).
DEPLOYED_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_TRIM_THRESHOLD_": "0"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The harness's own client settings, identical for every mode (so no mode is favoured).
CLIENT_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", 256 * MiB),
    ("grpc.max_send_message_length", 256 * MiB),
    ("grpc.use_local_subchannel_pool", 1),
]


@dataclass(frozen=True)
class Scenario:
    replicas: int
    proxies: int
    latency: float  # seconds injected in every replica
    tls: bool

    @property
    def name(self) -> str:
        security = "TLS" if self.tls else "plain"
        return f"K={self.replicas} P={self.proxies // 1000}k lat={self.latency * 1e3:.0f}ms {security}"


@dataclass
class Pki:
    directory: str
    ca: str
    istiod_cert: str
    istiod_key: str
    proxy_cert: str
    proxy_key: str
    ca_pem: bytes

    @classmethod
    def make(cls, directory: str) -> Pki:
        ca = TestCA()
        istiod = ca.issue(dns=("istiod.istio-system.svc",))
        proxy = ca.issue_serving()

        def w(name: str, data: bytes) -> str:
            return write_file(os.path.join(directory, name), data)

        return cls(
            directory,
            w("ca.pem", ca.cert_pem),
            w("istiod.pem", istiod.cert_pem),
            w("istiod-key.pem", istiod.key_pem),
            w("proxy.pem", proxy.cert_pem),
            w("proxy-key.pem", proxy.key_pem),
            ca.cert_pem,
        )


# -- processes -----------------------------------------------------------------------------------------


class ReplicaProcess:
    """bench.replicas in a child process."""

    def __init__(self, replicas: int, proxies: int, pki: Pki | None, client_ca: str = "") -> None:
        cmd = [sys.executable, "-m", "bench.replicas", "--replicas", str(replicas), "--proxies", str(proxies)]
        if pki is not None:
            cmd += ["--tls-cert", pki.istiod_cert, "--tls-key", pki.istiod_key]
        if client_ca:
            cmd += ["--client-ca", client_ca]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self._read()
        self.addresses: list[str] = line["addresses"]

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("replica process exited")
        out: dict[str, Any] = json.loads(line)
        return out

    def command(self, text: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self._read()

    def requests(self) -> list[int]:
        return list(self.command("stats")["requests"])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.command("quit")
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class ProxyProcess(Child):
    """`istioctl-proxy serve` in a child process, observed with psutil."""

    def __init__(
        self, addresses: Sequence[str], pki: Pki | None, extra: Sequence[str] = (), env: dict[str, str] | None = None,
        transport: Sequence[str] | None = None,
    ) -> None:
        self.port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "istioctl_proxy",
            "serve",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--istiod",
            ",".join(addresses),
            "--admin-listen",
            "",
            "--log-level",
            "warning",
            *extra,
        ]
        if transport is not None:
            cmd += transport
        elif pki is None:
            cmd += ["--plaintext", "--istiod-plaintext"]
        else:
            cmd += ["--tls-cert", pki.proxy_cert, "--tls-key", pki.proxy_key, "--istiod-ca", pki.ca]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **DEPLOYED_ENV, **(env or {})})
        self.ps = psutil.Process(self.proc.pid)

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    async def idle_rss(self, seconds: float = 30.0) -> int:
        """RSS once the proxy listens and before any call: imports, gRPC, channels."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)
        return self.rss()

    def peak_rss(self) -> int:
        """VmHWM: the kernel's own high-water mark of resident memory, so no sample can miss a peak."""
        with open(f"/proc/{self.proc.pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return self.rss()


# -- the client side ---------------------------------------------------------------------------------------


def _channel(address: str, pki: Pki | None, authority: str) -> grpc.aio.Channel:
    if pki is None:
        return grpc.aio.insecure_channel(address, options=CLIENT_OPTIONS)
    opts = [*CLIENT_OPTIONS, ("grpc.ssl_target_name_override", authority), ("grpc.default_authority", authority)]
    return grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(pki.ca_pem), options=opts)


REQUEST = discovery_pb2.DiscoveryRequest(type_url=SYNCZ, node=client.istioctl_node("istio-system")).SerializeToString()
METADATA = (("authorization", f"Bearer {TOKEN}"),)


async def ask(
    ch: grpc.aio.Channel, timeout: float = 120.0, *, request: bytes = REQUEST,
    metadata: tuple[tuple[str, str], ...] = METADATA,
) -> bytes:
    """One syncz on a new stream; the raw response bytes (nothing decoded)."""
    method = ch.stream_stream(ADS, request_serializer=None, response_deserializer=None)
    call = method(metadata=metadata, timeout=timeout)
    try:
        await call.write(request)
        body = await call.read()
    finally:
        call.cancel()
    if not isinstance(body, bytes):
        raise RuntimeError("stream closed without an answer")
    return body


def baseline_merge(bodies: Sequence[bytes]) -> bytes:
    """What a straightforward aggregator does: decode each answer, append resources, re-encode."""
    out = discovery_pb2.DiscoveryResponse(type_url=SYNCZ)
    for body in bodies:
        resp = discovery_pb2.DiscoveryResponse.FromString(body)
        out.resources.extend(resp.resources)
        out.version_info = max(out.version_info, resp.version_info)
    out.control_plane.identifier = '{"Component":"istiod","ID":"<external>"}'
    return bytes(out.SerializeToString())


@dataclass
class Clients:
    proxy: grpc.aio.Channel
    replicas: list[grpc.aio.Channel]
    untuned: grpc.aio.Channel | None
    addresses: list[str]
    slowest: int
    pki: Pki | None

    async def call(self, mode: str) -> int:
        """One call in `mode`; returns the bytes the client received."""
        if mode == "proxy":
            return len(await ask(self.proxy))
        if mode == UNTUNED:
            assert self.untuned is not None
            return len(await ask(self.untuned))
        if mode == "floor":
            return sum(map(len, await asyncio.gather(*(ask(ch) for ch in self.replicas))))
        if mode == "slowest":
            return len(await ask(self.replicas[self.slowest]))
        bodies = []
        for address in self.addresses:
            async with _channel(address, self.pki, "istiod.istio-system.svc") as ch:
                bodies.append(await ask(ch))
        return len(baseline_merge(bodies))


@contextlib.asynccontextmanager
async def clients(
    proxy: ProxyProcess, replicas: ReplicaProcess, pki: Pki | None, k: int, untuned: ProxyProcess | None = None
) -> AsyncIterator[Clients]:
    c = Clients(
        _channel(f"127.0.0.1:{proxy.port}", pki, "localhost"),
        [_channel(a, pki, "istiod.istio-system.svc") for a in replicas.addresses],
        _channel(f"127.0.0.1:{untuned.port}", pki, "localhost") if untuned else None,
        replicas.addresses,
        0,
        pki,
    )  # make_mesh deals proxies round-robin: replica 0 holds the most
    try:
        yield c
    finally:
        await c.proxy.close()
        if c.untuned is not None:
            await c.untuned.close()
        for ch in c.replicas:
            await ch.close()


async def wait_ready(c: Clients, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            await ask(c.proxy, timeout=5)
            if c.untuned is not None:
                await ask(c.untuned, timeout=5)
            return
        except grpc.aio.AioRpcError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


# -- measuring -----------------------------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    i = (len(s) - 1) * q / 100
    lo, hi = int(i), min(int(i) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (i - lo)


@dataclass
class ModeStats:
    latencies: list[float] = field(default_factory=list)
    round_p50: list[float] = field(default_factory=list)
    busy: float = 0.0  # wall seconds spent in this mode's blocks
    bytes: int = 0

    def summary(self) -> dict[str, float]:
        lat = self.latencies
        return {
            "p50_ms": pct(lat, 50) * 1e3,
            "p95_ms": pct(lat, 95) * 1e3,
            "p99_ms": pct(lat, 99) * 1e3,
            "calls": len(lat),
            "calls_per_s": len(lat) / self.busy if self.busy else 0.0,
            "bytes": self.bytes,
        }


async def run_scenario(
    sc: Scenario, replicas: ReplicaProcess, pki: Pki | None, rounds: int, calls: int, modes: Sequence[str]
) -> dict[str, Any]:
    replicas.command(f"latency {sc.latency}")
    proxy = ProxyProcess(replicas.addresses, pki)
    untuned = (
        ProxyProcess(replicas.addresses, pki, env={"ISTIOCTL_PROXY_GRPC_DEFAULTS": "1"}) if UNTUNED in modes else None
    )
    try:
        idle_rss = await proxy.idle_rss()
        async with clients(proxy, replicas, pki, sc.replicas, untuned) as c:
            await wait_ready(c)
            for mode in modes:  # warm every path (and the proxy's upstream channels) before measuring
                await c.call(mode)
            stats = {m: ModeStats() for m in modes}
            cpu = 0.0
            upstream = [0] * sc.replicas
            for r in range(rounds):
                order = list(modes[r % len(modes) :]) + list(modes[: r % len(modes)])
                for mode in order:
                    before_cpu, before_req = proxy.cpu(), replicas.requests() if mode == "proxy" else []
                    block: list[float] = []
                    started = time.perf_counter()
                    for _ in range(calls):
                        t = time.perf_counter()
                        stats[mode].bytes = await c.call(mode)
                        block.append(time.perf_counter() - t)
                    stats[mode].busy += time.perf_counter() - started
                    stats[mode].latencies += block
                    stats[mode].round_p50.append(statistics.median(block))
                    if mode == "proxy":
                        cpu += proxy.cpu() - before_cpu
                        upstream = [
                            u + a - b for u, a, b in zip(upstream, replicas.requests(), before_req, strict=True)
                        ]
            out: dict[str, Any] = {
                "scenario": dataclasses.asdict(sc),
                "name": sc.name,
                "modes": {m: s.summary() for m, s in stats.items()},
            }
            if "proxy" in stats:
                n = len(stats["proxy"].latencies)
                out["proxy_cpu_s_per_call"] = cpu / n
                out["upstream_calls_per_replica_per_call"] = [u / n for u in upstream]
                out["peak_rss"] = proxy.peak_rss()
                out["idle_rss"] = idle_rss
                out["merged_bytes"] = stats["proxy"].bytes
            if "proxy" in stats and "floor" in stats:
                # Per-round ratios: each round's proxy and floor ran seconds apart, so the machine's mood cancels.
                ratios = [p / f for p, f in zip(stats["proxy"].round_p50, stats["floor"].round_p50, strict=True)]
                out["proxy_over_floor"] = statistics.median(ratios)
                out["added_ms_per_mib"] = (stats["proxy"].summary()["p50_ms"] - stats["floor"].summary()["p50_ms"]) / (
                    stats["proxy"].bytes / MiB
                )
            if UNTUNED in stats:
                ratios = [u / p for p, u in zip(stats["proxy"].round_p50, stats[UNTUNED].round_p50, strict=True)]
                out["untuned_over_tuned"] = statistics.median(ratios)
            if "proxy" in stats and "baseline" in stats:
                ratios = [b / p for p, b in zip(stats["proxy"].round_p50, stats["baseline"].round_p50, strict=True)]
                out["baseline_over_proxy"] = statistics.median(ratios)
            return out
    finally:
        proxy.close()
        if untuned is not None:
            untuned.close()


async def _closed_loop(
    port: int, pki: Pki | None, callers: int, seconds: float, p: int
) -> tuple[list[float], int]:
    """`callers` identical syncz callers on their own channels for `seconds`: latencies, wrong answers (a
    failed call counts as wrong: on a loaded machine the simulated replicas can miss the upstream timeout)."""
    channels = [_channel(f"127.0.0.1:{port}", pki, "localhost") for _ in range(callers)]
    latencies: list[float] = []
    wrong = 0
    stop = time.monotonic() + seconds

    async def caller(ch: grpc.aio.Channel) -> None:
        nonlocal wrong
        while time.monotonic() < stop:
            t = time.perf_counter()
            try:
                body = await ask(ch)
            except grpc.aio.AioRpcError:
                wrong += 1
                continue
            latencies.append(time.perf_counter() - t)
            # Every node id field of the merged answer, at C speed. Not the fast index: it reads istiod's answers
            # (envelope around the resources), and the proxy's own carries each replica's envelope between runs.
            ids = wire._LITE.ids_merged.FromString(body).resources.value.node.id
            if len(ids) != p or len(set(ids)) != p:
                wrong += 1

    try:
        await asyncio.gather(*(caller(ch) for ch in channels))
    finally:
        for ch in channels:
            await ch.close()
    return latencies, wrong


async def run_concurrency(
    replicas: ReplicaProcess,
    pki: Pki | None,
    k: int,
    p: int,
    callers: int,
    seconds: float,
    variant: str,
    latency: float,
    old_src: str = "",
) -> dict[str, Any]:
    """`callers` identical syncz callers (same token) in a closed loop for `seconds`; every answer checked.

    Memory is read on two fresh proxies of the same settings (VmHWM only grows): one serves a single
    caller for a third of the time (its idle RSS is read first), the other the many callers. A variant
    ending in "@old" runs the proxy of `old_src` (another checkout's src/, e.g. main before a change).
    """
    base, _, old = variant.partition("@")
    extra = {"no-coalesce": ["--no-coalesce"], "coalesce": [], "cache-1s": ["--cache-ttl", "1"]}[base]
    env = {"PYTHONPATH": old_src} if old else None
    if old and not old_src:
        raise SystemExit(f"variant {variant} needs --old-src")
    replicas.command(f"latency {latency}")
    single = ProxyProcess(replicas.addresses, pki, extra, env=env)
    try:
        idle_rss = await single.idle_rss()
        async with clients(single, replicas, pki, k) as c:
            await wait_ready(c)
        single_latencies, single_wrong = await _closed_loop(single.port, pki, 1, max(seconds / 3, 3.0), p)
        single_peak = single.peak_rss()
    finally:
        single.close()
    proxy = ProxyProcess(replicas.addresses, pki, extra, env=env)
    try:
        async with clients(proxy, replicas, pki, k) as c:
            await wait_ready(c)
            await c.call("proxy")
            before, cpu0 = replicas.requests(), proxy.cpu()
            started = time.monotonic()
            latencies, wrong = await _closed_loop(proxy.port, pki, callers, seconds, p)
            wall = time.monotonic() - started
            after = replicas.requests()
            n = len(latencies)
            return {
                "variant": variant,
                "replicas": k,
                "proxies": p,
                "callers": callers,
                "seconds": wall,
                "latency": latency,
                "tls": pki is not None,
                "calls": n,
                "calls_per_s": n / wall,
                "wrong": wrong + single_wrong,
                "p50_ms": pct(latencies, 50) * 1e3,
                "p95_ms": pct(latencies, 95) * 1e3,
                "p99_ms": pct(latencies, 99) * 1e3,
                "upstream_per_replica_per_s": [(a - b) / wall for a, b in zip(after, before, strict=True)],
                "proxy_cpu_s_per_call": (proxy.cpu() - cpu0) / max(n, 1),
                "peak_rss": proxy.peak_rss(),
                "idle_rss": idle_rss,
                "single_peak_rss": single_peak,
                "single_calls": len(single_latencies),
            }
    finally:
        proxy.close()


MERGE_PATHS = {
    "fast": "fast path: no duplicate, unscoped",
    "split-dups": "split path: 1 % of proxies on two replicas",
    "dups": "the same duplicates as a caller meets them: the fast index steps aside, then the split path",
    "split-scoped": "split path: scoped caller (one namespace of 4)",
    "split-scoped-cold": "split path: scoped, memo cold (the first call)",
    # The memo remembers the last two calls' node and id lists and each copy's bytes: the same answers on every call
    # (the rows above) are a steady mesh's. These two change between calls, rotating three meshes.
    "split-scoped-moved": "split path: scoped, one proxy differs from the last two calls' (no remembered run)",
    "dups-churn": "duplicates as met, their copies re-stamped since the last two calls (no remembered copy)",
    "exact-dups": "exact (field-by-field) path: the same duplicates",
}
# --merge-gc: the garbage collector's share, on the split paths, in a process holding a proxy's own objects.
GC_VARIANTS = {
    "gc-on": "the collector on, as the proxy runs",
    "gc-off": "the collector disabled around the merge (as a context manager would)",
    "gc-on+frozen": "the collector on, the heap frozen before (gc.freeze after start-up)",
    "gc-off+frozen": "both",
}


def _merge_at(rev: str) -> Any:
    """merge.py and wire.py as they were at git revision `rev`, imported beside the current ones (the rest of
    the package is the current one: same Answer and Plan types), so that old and new alternate in one run."""
    import importlib.util
    import types

    from istioctl_proxy import errors, model, policy

    name = "istioctl_proxy_at_" + "".join(c if c.isalnum() else "_" for c in rev)
    if name + ".merge" in sys.modules:
        return sys.modules[name + ".merge"]
    package = types.ModuleType(name)
    sys.modules[name] = package
    for alias, module in (("errors", errors), ("model", model), ("policy", policy)):
        sys.modules[f"{name}.{alias}"] = module
    loaded = None
    with tempfile.TemporaryDirectory(prefix="istioctl-proxy-merge-at-") as where:  # only while importing
        package.__path__ = [where]
        for module_name in ("wire", "merge"):
            path = os.path.join(where, module_name + ".py")
            with open(path, "w", encoding="utf-8") as f:
                f.write(subprocess.run(["git", "-C", ROOT, "show", f"{rev}:src/istioctl_proxy/{module_name}.py"],
                                       check=True, capture_output=True, text=True).stdout)
            spec = importlib.util.spec_from_file_location(f"{name}.{module_name}", path)
            assert spec is not None and spec.loader is not None
            loaded = importlib.util.module_from_spec(spec)
            sys.modules[f"{name}.{module_name}"] = loaded
            spec.loader.exec_module(loaded)
    return loaded


def _proxy_heap(k: int) -> Any:
    """A configured (not started) Proxy in this process, as `serve` builds it: its objects are what the collector
    walks in a real proxy (modules, gRPC, metrics, the aggregator). Held by the caller for the whole run."""
    from istioctl_proxy.app import Proxy
    from istioctl_proxy.config import Config

    cfg = Config(listen="127.0.0.1:0", plaintext=True, istiod=tuple(f"127.0.0.1:{20000 + i}" for i in range(k)),
                 istiod_plaintext=True, admin_listen="")
    return Proxy(cfg)


def merge_microbench(k: int = 5, p: int = 30_000, rounds: int = 7, baseline: str = "",
                     gc_variants: bool = False) -> dict[str, Any]:
    """Every syncz merge path alone, in this process, on one core, alternated round by round.

    The answers are the same bytes for every path but "split-dups"/"exact-dups", whose mesh also lists 1 % of
    its proxies on a second replica (a reconnect window). Warm paths share one SynczMemo, as the proxy does.
    `baseline`: the same paths with merge.py/wire.py of that git revision ("<path>@<rev>"), alternated too.
    `gc_variants`: split-dups and split-scoped under GC_VARIANTS ("<path>/<variant>").
    """
    import gc

    from istioctl_proxy import merge
    from istioctl_proxy.discovery import Replica
    from istioctl_proxy.model import Answer
    from istioctl_proxy.policy import plan_request
    from istioctl_proxy.sim.simulator import make_mesh

    held = _proxy_heap(k)  # a proxy's own objects in the heap, as in `serve`
    answers = [Answer(Replica(f"r{i}"), r.syncz("")) for i, r in enumerate(make_mesh(k, p))]
    # A mesh of its own: the simulator serialises a replica's answer once (SimReplica.syncz caches it).
    dup_mesh = make_mesh(k, p)
    dup_mesh[-1].proxies.extend(dup_mesh[0].proxies[: p // 100])
    dup_answers = [Answer(Replica(f"r{i}"), r.syncz("")) for i, r in enumerate(dup_mesh)]
    # Three meshes each: one proxy replaced (another id, node and namespace), or the duplicates re-stamped.
    moved, churn = [], []
    for v in range(3):
        mesh = make_mesh(k, p)
        mesh[0].proxies[0] = dataclasses.replace(mesh[0].proxies[0], pod=f"moved-{v}", namespace=f"ns-{v % 2}")
        moved.append([Answer(Replica(f"r{i}"), r.syncz("")) for i, r in enumerate(mesh)])
        mesh = make_mesh(k, p)
        mesh[-1].proxies.extend(dataclasses.replace(x, updated=x.updated + 1 + v) for x in mesh[0].proxies[: p // 100])
        churn.append([Answer(Replica(f"r{i}"), r.syncz("")) for i, r in enumerate(mesh)])
    del dup_mesh, mesh  # the simulator's objects are not the proxy's
    rotation = collections.Counter[str]()
    plan = plan_request(SYNCZ, [])
    modules = {"": merge, **({"@" + baseline: _merge_at(baseline)} if baseline else {})}
    memos = {at: m.wire.SynczMemo() for at, m in modules.items()}
    changing = {at: m.wire.SynczMemo() for at, m in modules.items()}
    names = [name + at for at in modules for name in MERGE_PATHS if not (at and name.startswith("exact"))]
    if gc_variants:
        names += [f"{name}/{variant}" for name in ("split-dups", "split-scoped") for variant in GC_VARIANTS]

    def no_fast(*_a: object) -> None:
        return None

    def run(path: str) -> tuple[int, float]:
        path, _, variant = path.partition("/")
        path, at, rev = path.partition("@")
        m = modules[at + rev]
        with contextlib.ExitStack() as undo:
            if path not in ("fast", "dups", "dups-churn"):
                undo.enter_context(_patched(m, "merge_syncz_fast", no_fast))
            if path.startswith("exact"):
                undo.enter_context(_patched(m, "merge_syncz_split", no_fast))
            if "gc-off" in variant and gc.isenabled():
                gc.disable()
                undo.callback(gc.enable)
            if "frozen" in variant:
                gc.freeze()
                undo.callback(gc.unfreeze)
            batch = dup_answers if path.endswith("dups") else answers
            if path in ("split-scoped-moved", "dups-churn"):
                rotation[at + rev + path] += 1
                batch = (moved if path == "split-scoped-moved" else churn)[rotation[at + rev + path] % 3]
            memo = m.wire.SynczMemo() if path.endswith("cold") else memos[at + rev]
            if path in ("split-scoped-moved", "dups-churn"):
                memo = changing[at + rev]  # its own: the rotating meshes would push the steady one's runs out
            ctx = m.MergeContext(scope="ns-1" if "scoped" in path else "", memo=memo)
            # CPU seconds of this process: what one core spends, whatever else the machine is running.
            t = time.process_time()
            out = m.merge_syncz(plan, batch, ctx)
            elapsed = time.process_time() - t
            assert not out.rejected
            # Each proxy once: the duplicates were there, and were dropped.
            assert "scoped" in path or out.resources == p, (path, out.resources)
            return sum(len(a.body or b"") for a in batch), elapsed

    for at in modules:
        run("split-scoped" + at)  # warm the node facts, as any call before would
    times: dict[str, list[float]] = {name: [] for name in names}
    sizes: dict[str, int] = {}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            if name.startswith("exact") and r % 3:
                continue  # the exact path takes ~half a second: a third of the rounds is enough
            sizes[name], elapsed = run(name)
            times[name].append(elapsed)
    paths = {
        name: {
            "label": MERGE_PATHS.get(name.partition("/")[0].partition("@")[0], "")
            + (f" [{name.partition('@')[2]}]" if "@" in name else "")
            + (f" ({GC_VARIANTS[name.partition('/')[2]]})" if "/" in name else ""),
            "payload_bytes": sizes[name],
            "ms_median": statistics.median(ts) * 1e3,
            "ms_best": min(ts) * 1e3,
            "mb_s_median": sizes[name] / statistics.median(ts) / 1e6,
            "mb_s_best": sizes[name] / min(ts) / 1e6,
            "runs": len(ts),
        }
        for name, ts in times.items()
    }
    f, e = paths["fast"], paths["exact-dups"]
    return {
        "replicas": k,
        "proxies": p,
        "payload_bytes": f["payload_bytes"],
        "fast_ms_median": f["ms_median"],
        "fast_ms_best": f["ms_best"],
        "fast_mb_s_median": f["mb_s_median"],
        "fast_mb_s_best": f["mb_s_best"],
        "exact_ms_median": e["ms_median"],
        "exact_mb_s_median": e["mb_s_median"],
        "paths": paths,
        "baseline": baseline,
        "heap_objects": len(gc.get_objects()) if held else 0,
        "load": os.getloadavg(),
    }


@contextlib.contextmanager
def _patched(module: Any, name: str, value: object) -> Iterator[None]:
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


HOP_MODES = ("floor", "read-after-last", "read-as-arriving")


async def hop_microbench(k: int = 5, p: int = 30_000, rounds: int = 9, calls: int = 3) -> dict[str, Any]:
    """What reading each answer as it arrives buys (merge.index_early), in this process, alternated:

      floor              every replica asked concurrently over warm channels, nothing read
      read-after-last    the same, then the syncz merge reads every answer (as before)
      read-as-arriving   each answer read as it arrives, the merge after the last uses those readings
    """
    from istioctl_proxy import merge
    from istioctl_proxy.discovery import Replica
    from istioctl_proxy.model import Answer
    from istioctl_proxy.policy import plan_request

    plan = plan_request(SYNCZ, [])
    reps = ReplicaProcess(k, p, None)
    chans = [_channel(a, None, "") for a in reps.addresses]
    try:

        async def one(i: int, ctx: merge.MergeContext | None) -> Answer:
            answer = Answer(Replica(reps.addresses[i]), await ask(chans[i]))
            if ctx is not None:
                merge.index_early(plan, ctx, answer)
            return answer

        async def call(mode: str) -> None:
            ctx = merge.MergeContext() if mode == "read-as-arriving" else None
            answers = await asyncio.gather(*(one(i, ctx) for i in range(k)))
            if mode != "floor":
                merge.merge(plan, answers, ctx or merge.MergeContext())

        for mode in HOP_MODES:
            await call(mode)
        per_round: dict[str, list[float]] = {m: [] for m in HOP_MODES}
        for r in range(rounds):
            for mode in HOP_MODES[r % 3:] + HOP_MODES[: r % 3]:
                block = []
                for _ in range(calls):
                    t = time.perf_counter()
                    await call(mode)
                    block.append(time.perf_counter() - t)
                per_round[mode].append(statistics.median(block))
        floor = per_round["floor"]
        added = {m: statistics.median(x - f for x, f in zip(per_round[m], floor, strict=True)) * 1e3
                 for m in HOP_MODES[1:]}
        return {
            "replicas": k, "proxies": p, "rounds": rounds, "calls": calls,
            "p50_ms": {m: statistics.median(v) * 1e3 for m, v in per_round.items()},
            "added_over_floor_ms": added,
            "ratio_as_arriving_over_after_last": statistics.median(
                a / b for a, b in zip(per_round["read-as-arriving"], per_round["read-after-last"], strict=True)),
            "load": os.getloadavg(),
        }
    finally:
        for ch in chans:
            await ch.close()
        reps.close()


# -- the matrix ----------------------------------------------------------------------------------------------


def matrix(ns: argparse.Namespace) -> Iterator[Scenario]:
    for tls in ns.tls:
        for k in ns.replicas:
            for p in ns.proxies:
                for lat in ns.latency:
                    if ns.quick and not (k == 5 or p == 30_000):
                        continue  # quick: the K=5 row and the P=30k column of the matrix
                    if ns.quick and tls and not (k == 5 and p == 30_000):
                        continue  # quick: TLS only where its target is (K=5, P=30k)
                    yield Scenario(k, p, lat, tls)


async def amain(ns: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "args": vars(ns).copy(),
        "scenarios": [],
        "concurrency": [],
    }
    results["args"]["command"] = "python -m bench.run " + " ".join(sys.argv[1:])
    only = ns.merge_only or ns.concurrency_only or ns.hop_only
    scenarios = [] if only else list(matrix(ns))
    print(f"{len(scenarios)} scenarios, {ns.rounds} rounds x {ns.calls} calls per mode", flush=True)
    with tempfile.TemporaryDirectory(prefix="istioctl-proxy-bench-") as tmp:
        pki = Pki.make(tmp)
        groups: dict[tuple[int, int, bool], list[Scenario]] = {}
        for sc in scenarios:
            groups.setdefault((sc.replicas, sc.proxies, sc.tls), []).append(sc)
        for (k, p, tls), group in groups.items():
            reps = ReplicaProcess(k, p, pki if tls else None)
            try:
                for sc in group:
                    t = time.monotonic()
                    modes = (*MODES, UNTUNED) if (k, p) == (5, 30_000) and ns.ab_grpc else MODES
                    res = await run_scenario(sc, reps, pki if tls else None, ns.rounds, ns.calls, modes)
                    results["scenarios"].append(res)
                    m = res["modes"]
                    print(
                        f"{sc.name:32s} proxy {m['proxy']['p50_ms']:7.1f} floor {m['floor']['p50_ms']:7.1f} "
                        f"slowest {m['slowest']['p50_ms']:7.1f} baseline {m['baseline']['p50_ms']:7.1f} ms p50; "
                        f"proxy/floor {res['proxy_over_floor']:.2f} baseline/proxy {res['baseline_over_proxy']:.2f} "
                        f"cpu {res['proxy_cpu_s_per_call'] * 1e3:.1f} ms/call rss {res['peak_rss'] / MiB:.0f} MiB "
                        f"({time.monotonic() - t:.0f}s)"
                        + (f" untuned/tuned {res['untuned_over_tuned']:.2f}" if "untuned_over_tuned" in res else ""),
                        flush=True,
                    )
            finally:
                reps.close()
        if ns.concurrency_seconds > 0 and (not only or ns.concurrency_only):
            k, p = ns.concurrency_replicas, ns.concurrency_proxies
            reps = ReplicaProcess(k, p, None)
            try:
                # Rounds alternate the variants (each on fresh proxies), so the machine's mood is shared.
                for variant in [v for _ in range(ns.concurrency_rounds) for v in ns.concurrency_variants]:
                    res = await run_concurrency(
                        reps, None, k, p, ns.callers, ns.concurrency_seconds, variant, ns.concurrency_latency,
                        ns.old_src,
                    )
                    res["load_average"] = os.getloadavg()
                    results["concurrency"].append(res)
                    print(
                        f"concurrency {variant:16s} {res['calls_per_s']:6.1f} calls/s p50 {res['p50_ms']:.0f} ms "
                        f"upstream/replica/s {max(res['upstream_per_replica_per_s']):.2f} wrong {res['wrong']} "
                        f"rss idle {res['idle_rss'] / MiB:.0f} single {res['single_peak_rss'] / MiB:.0f} "
                        f"{res['callers']} callers {res['peak_rss'] / MiB:.0f} MiB load {res['load_average'][0]:.1f}",
                        flush=True,
                    )
            finally:
                reps.close()
    if not only or ns.hop_only:
        results["hop"] = h = await hop_microbench()
        print(f"hop K=5 P=30k, 0 ms: added over the floor {h['added_over_floor_ms']}; as-arriving/after-last "
              f"{h['ratio_as_arriving_over_after_last']:.2f}", flush=True)
    if ns.merge_bench and (not only or ns.merge_only):
        results["merge"] = merge_microbench(rounds=ns.merge_rounds, baseline=ns.merge_baseline,
                                            gc_variants=ns.merge_gc)
        for name, m in results["merge"]["paths"].items():
            print(f"merge 5x30k {name:32s} {m['mb_s_median']:5.0f} MB/s median, {m['mb_s_best']:5.0f} best "
                  f"({m['ms_median']:.1f} ms for {m['payload_bytes'] / 1e6:.1f} MB)", flush=True)
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return results


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="a subset of the matrix and shorter runs (~10 minutes)")
    p.add_argument("--replicas", default="1,3,5", help="K values")
    p.add_argument("--proxies", default="1k,10k,30k", help="P values (k = thousand)")
    p.add_argument("--latency", default="0,50", help="injected replica latency values, ms")
    p.add_argument("--tls", default="off,on", help="off, on or both")
    p.add_argument("--rounds", type=int, default=0, help="alternation rounds (default 7; quick 5)")
    p.add_argument("--calls", type=int, default=0, help="calls per mode per round (default 3; quick 2)")
    p.add_argument("--callers", type=int, default=50)
    p.add_argument("--concurrency-seconds", type=float, default=-1, help="default 30 (quick 10); 0 skips")
    p.add_argument("--concurrency-replicas", type=int, default=5)
    p.add_argument("--concurrency-proxies", type=int, default=30_000)
    p.add_argument("--concurrency-latency", type=float, default=0.05)
    p.add_argument(
        "--concurrency-variants",
        default="no-coalesce,coalesce,cache-1s",
        help="no-coalesce, coalesce, cache-1s; with @old (e.g. coalesce@old): the proxy of --old-src",
    )
    p.add_argument("--concurrency-rounds", type=int, default=1, help="alternation rounds of the variants")
    p.add_argument("--old-src", default="", help="another checkout's src/ for the @old variants (PYTHONPATH)")
    p.add_argument("--no-merge-bench", dest="merge_bench", action="store_false")
    p.add_argument("--merge-only", action="store_true", help="only the in-process merge paths (~1 minute)")
    p.add_argument("--merge-baseline", default="", metavar="REV",
                   help="also the merge paths of merge.py/wire.py at this git revision, alternated")
    p.add_argument("--merge-gc", action="store_true", help="also the split paths with and without the collector")
    p.add_argument("--merge-rounds", type=int, default=7, help="alternation rounds of the merge paths")
    p.add_argument("--concurrency-only", action="store_true", help="only the many-callers runs")
    p.add_argument("--hop-only", action="store_true", help="only what reading answers as they arrive buys")
    p.add_argument(
        "--no-ab-grpc",
        dest="ab_grpc",
        action="store_false",
        help="skip the gRPC-defaults proxy alternated in the K=5 P=30k scenarios",
    )
    p.add_argument("--out", default="", help="results JSON (default bench/results/<stamp>.json)")
    p.add_argument("--no-report", dest="report", action="store_false", help="do not rewrite docs/benchmarks.md")
    ns = p.parse_args(argv)
    ns.replicas = [int(x) for x in ns.replicas.split(",")]
    ns.proxies = [int(float(x[:-1]) * 1000) if x.endswith("k") else int(x) for x in ns.proxies.split(",")]
    ns.latency = [float(x) / 1e3 for x in ns.latency.split(",")]
    ns.tls = [{"off": False, "on": True}[x] for x in ns.tls.split(",")]
    ns.rounds = ns.rounds or (5 if ns.quick else 7)
    ns.calls = ns.calls or (2 if ns.quick else 3)
    if ns.concurrency_seconds < 0:
        ns.concurrency_seconds = 10.0 if ns.quick else 30.0
    ns.concurrency_variants = ns.concurrency_variants.split(",")
    return ns


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse(argv)
    results = asyncio.run(amain(ns))
    out = ns.out or os.path.join(ROOT, "bench", "results", time.strftime("%Y%m%d-%H%M%S") + ".json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    print(f"results: {out}")
    if ns.report:
        from .report import write_report

        print(f"report: {write_report(results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
