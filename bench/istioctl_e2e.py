"""What a user feels: real `istioctl x ps` (and `-o json`) through istioctl-proxy, next to the same istioctl
asking one replica that holds the same proxies directly (the best a user could ever get).

Per P: K simulated replicas behind the proxy (identity mode, mTLS both ways, as deployed) and one simulated
replica holding all P proxies, asked directly; the same proxies in both (make_mesh deals one mesh out). The
simulator's answers are checked against real istiod in tests/e2e/test_simulator_fidelity.py. Modes alternate
in every round (the order rotates); each call is one istioctl process, timed from exec to exit:

  proxy        istioctl x ps --xds-address <proxy>          (K replicas merged)
  direct       istioctl x ps --xds-address <one replica>    (all P on it)
  proxy-json / direct-json   the same with -o json
  fetch-proxy / fetch-direct the raw syncz answer fetched by a warm Python client: istioctl's own share is
                             its time minus this (process start, TLS handshake, decoding, rendering)

    .venv/bin/python -m bench.istioctl_e2e [--proxies 1k,10k,30k] [--replicas 5] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from istioctl_proxy.sim.pki import TestCA, write_file

from . import run
from .run import ROOT, ProxyProcess, ReplicaProcess

ISTIOCTL = Path(ROOT) / ".peers" / "bin" / "istioctl"
MODES = ("proxy", "direct", "proxy-json", "direct-json", "fetch-proxy", "fetch-direct")


class Pki:
    def __init__(self, directory: str) -> None:
        ca = TestCA()
        self.ca_pem = ca.cert_pem
        j = lambda name: os.path.join(directory, name)  # noqa: E731
        self.ca = write_file(j("ca.pem"), ca.cert_pem)
        istiod = ca.issue(dns=("istiod.istio-system.svc",))
        self.istiod_cert, self.istiod_key = write_file(j("istiod.pem"), istiod.cert_pem), write_file(
            j("istiod-key.pem"), istiod.key_pem)
        proxy = ca.issue(dns=("localhost",), ips=("127.0.0.1",))
        self.proxy_cert, self.proxy_key = write_file(j("proxy.pem"), proxy.cert_pem), write_file(
            j("proxy-key.pem"), proxy.key_pem)
        upstream = ca.issue(spiffe="spiffe://cluster.local/ns/istio-system/sa/istioctl-proxy")
        self.upstream_cert, self.upstream_key = write_file(j("up.pem"), upstream.cert_pem), write_file(
            j("up-key.pem"), upstream.key_pem)
        self.admin = ca.issue(spiffe="spiffe://cluster.local/ns/istio-system/sa/default")
        self.cert_dir = str(ca.write_cert_dir(j("istioctl-certs"), self.admin))
        self.home = j("home")
        os.makedirs(self.home, exist_ok=True)


def channel(address: str, pki: Pki, authority: str) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(pki.ca_pem, pki.admin.key_pem, pki.admin.cert_pem)
    opts = [*run.CLIENT_OPTIONS, ("grpc.ssl_target_name_override", authority), ("grpc.default_authority", authority)]
    return grpc.aio.secure_channel(address, creds, options=opts)


async def istioctl(pki: Pki, address: str, authority: str, json_out: bool) -> tuple[float, int]:
    args = ["x", "ps", "--xds-address", address, "--cert-dir", pki.cert_dir, "--authority", authority,
            "-r", "default", *(["-o", "json"] if json_out else [])]
    env = {"HOME": pki.home, "PATH": "/usr/bin:/bin", "KUBECONFIG": os.path.join(pki.home, "none")}
    t = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(str(ISTIOCTL), *args, env=env, cwd=pki.home,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    elapsed = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"istioctl {' '.join(args)} failed: {err.decode(errors='replace')[-500:]}")
    return elapsed, out.count(b"\n")


async def scenario(pki: Pki, k: int, p: int, rounds: int) -> dict[str, Any]:
    behind = ReplicaProcess(k, p, pki, client_ca=pki.ca)  # type: ignore[arg-type]  # has istiod_cert/_key
    alone = ReplicaProcess(1, p, pki, client_ca=pki.ca)  # type: ignore[arg-type]
    proxy = ProxyProcess(behind.addresses, None, transport=[
        "--tls-cert", pki.proxy_cert, "--tls-key", pki.proxy_key, "--client-ca", pki.ca,
        "--istiod-ca", pki.ca, "--upstream-identity", "--upstream-cert", pki.upstream_cert,
        "--upstream-key", pki.upstream_key])
    try:
        await proxy.idle_rss()
        targets = {"proxy": (f"127.0.0.1:{proxy.port}", "localhost"),
                   "direct": (alone.addresses[0], "istiod.istio-system.svc")}
        chans = {m: channel(a, pki, auth) for m, (a, auth) in targets.items()}
        lines: dict[str, int] = {}

        async def call(mode: str) -> float:
            if mode.startswith("fetch-"):
                t = time.perf_counter()
                await run.ask(chans[mode[6:]], request=run.REQUEST, metadata=())
                return time.perf_counter() - t
            where = "proxy" if mode.startswith("proxy") else "direct"
            elapsed, lines[mode] = await istioctl(pki, *targets[where], mode.endswith("json"))
            return elapsed

        for mode in MODES:
            await call(mode)  # warm: the proxy's channels, the page cache holding istioctl
        times: dict[str, list[float]] = {m: [] for m in MODES}
        for r in range(rounds):
            for mode in MODES[r % len(MODES):] + MODES[: r % len(MODES)]:
                times[mode].append(await call(mode))
        for ch in chans.values():
            await ch.close()
        med = {m: statistics.median(ts) * 1e3 for m, ts in times.items()}

        def ratio(a: str, b: str) -> float:
            return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

        return {
            "replicas": k, "proxies": p, "rounds": rounds, "p50_ms": med, "lines": lines,
            "ps_ratio": ratio("proxy", "direct"), "json_ratio": ratio("proxy-json", "direct-json"),
            # istioctl's own share of the direct call: all but fetching the answer.
            "istioctl_share_ps": 1 - med["fetch-direct"] / med["direct"],
            "istioctl_share_json": 1 - med["fetch-direct"] / med["direct-json"],
            "load": os.getloadavg(),
        }
    finally:
        proxy.close()
        behind.close()
        alone.close()


async def amain(ns: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "scenarios": []}
    with tempfile.TemporaryDirectory(prefix="istioctl-proxy-e2e-bench-") as tmp:
        pki = Pki(tmp)
        for p in ns.proxies:
            res = await scenario(pki, ns.replicas, p, ns.rounds)
            out["scenarios"].append(res)
            m = res["p50_ms"]
            print(f"P={p // 1000}k x ps: proxy {m['proxy']:.0f} direct {m['direct']:.0f} ms ({res['ps_ratio']:.2f} x); "
                  f"-o json: proxy {m['proxy-json']:.0f} direct {m['direct-json']:.0f} ms ({res['json_ratio']:.2f} x); "
                  f"fetch proxy {m['fetch-proxy']:.0f} direct {m['fetch-direct']:.0f} ms; istioctl's share "
                  f"{res['istioctl_share_ps']:.0%} / {res['istioctl_share_json']:.0%}", flush=True)
    out["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return out


BEGIN, END = "<!-- istioctl-e2e:begin -->", "<!-- istioctl-e2e:end -->"


def report(res: dict[str, Any]) -> str:
    """The block between the istioctl-e2e markers of docs/benchmarks.md."""
    load = ", ".join(f"{x:.1f}" for x in res["scenarios"][0]["load"]) if res["scenarios"] else "?"
    lines = [
        BEGIN, "",
        f"Run {res['started']} → {res['finished']}, `python -m bench.istioctl_e2e`, load average {load} on 2 CPUs. "
        "p50 ms of whole istioctl runs (exec to exit), modes alternated per round; ratios are medians of per-round "
        "ratios. istioctl's share: its time minus a warm client's fetch of the same answer, over its time.", "",
        "| P | rounds | `x ps` proxy | `x ps` direct | proxy/direct | `-o json` proxy | `-o json` direct | "
        "proxy/direct | fetch proxy | fetch direct | istioctl's share |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in res["scenarios"]:
        m = s["p50_ms"]
        lines.append(
            f"| {s['proxies'] // 1000}k | {s['rounds']} | {m['proxy']:.0f} | {m['direct']:.0f} | {s['ps_ratio']:.2f} | "
            f"{m['proxy-json']:.0f} | {m['direct-json']:.0f} | {s['json_ratio']:.2f} | {m['fetch-proxy']:.0f} | "
            f"{m['fetch-direct']:.0f} | {s['istioctl_share_ps']:.0%} / {s['istioctl_share_json']:.0%} |")
    lines += ["", END]
    return "\n".join(lines)


def write_report(res: dict[str, Any]) -> None:
    path = os.path.join(ROOT, "docs", "benchmarks.md")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + report(res) + text[text.index(END) + len(END):]
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.istioctl_e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--proxies", default="1k,10k,30k")
    p.add_argument("--replicas", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="")
    p.add_argument("--no-report", dest="report", action="store_false", help="do not rewrite docs/benchmarks.md")
    p.add_argument("--report-only", default="", help="re-render a saved results JSON into docs/benchmarks.md")
    ns = p.parse_args(argv)
    if ns.report_only:
        with open(ns.report_only, encoding="utf-8") as f:
            write_report(json.load(f))
        return 0
    ns.proxies = [int(float(x[:-1]) * 1000) if x.endswith("k") else int(x) for x in ns.proxies.split(",")]
    if not ISTIOCTL.exists():
        print(f"{ISTIOCTL} is missing: scripts/install-peers", file=sys.stderr)
        return 2
    res = asyncio.run(amain(ns))
    path = ns.out or os.path.join(ROOT, "bench", "results", "istioctl-e2e-" + time.strftime("%Y%m%d-%H%M%S") + ".json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
    print(f"results: {path}")
    if ns.report:
        write_report(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
