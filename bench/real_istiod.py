"""The real-istiod scenario: the proxy in front of real pilot-discovery replicas, alternated with the floor.

Uses the real-peers harness of tests/e2e (scripts/install-peers, scripts/install-k8s-peers): K replicas,
P Python data-plane clients spread over them, the proxy as its own process in identity mode (mTLS both
ways). Modes, alternated per round so machine noise cancels:
  proxy     istioctl's request through istioctl-proxy
  floor     every replica asked directly and concurrently over warm mTLS channels, nothing merged
  slowest   the replica with the most proxies, alone
  baseline  the seed sample's algorithm: replicas one after another, a fresh TLS connection each, then a
            decode-and-re-encode merge (labelled as a baseline, re-implemented here)

    .venv/bin/python -m bench.real_istiod [--replicas 3] [--proxies 90] [--rounds 7] [--calls 5]
Writes bench/results/real-istiod.json and the block between the real-istiod markers of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from tests.e2e.ads import CDS, LDS, XdsState, close_clients, make_node, start_clients
from tests.e2e.jwt_issuer import JwtIssuer
from tests.e2e.mesh import Mesh, Peers
from tests.e2e.proxy_process import ProxyProcess

from istioctl_proxy.sim.pki import Leaf, TestCA

from . import run
from .run import baseline_merge, pct

ROOT = Path(__file__).resolve().parents[1]
SYNCZ = "istio.io/debug/syncz"
MODES = ("proxy", "floor", "slowest", "baseline")
BEGIN, END = "<!-- real-istiod:begin -->", "<!-- real-istiod:end -->"
REQUEST = discovery_pb2.DiscoveryRequest(
    type_url=SYNCZ,
    node=make_node("bench", "istio-system", service_account="default", proxy_config=False,
                   extra_metadata={"GENERATOR": "event"}),
).SerializeToString()  # fmt: skip


def channel(address: str, root: bytes, leaf: Leaf, authority: str) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(root, leaf.key_pem, leaf.cert_pem)
    opts = [("grpc.ssl_target_name_override", authority), ("grpc.max_receive_message_length", 256 << 20)]
    return grpc.aio.secure_channel(address, creds, options=opts)


async def ask(ch: grpc.aio.Channel) -> bytes:
    return await run.ask(ch, 60, request=REQUEST, metadata=())  # identity is the client certificate


async def measure(ns: argparse.Namespace, mesh: Mesh, proxy: ProxyProcess) -> dict[str, Any]:
    root, admin = mesh.root_cert_pem, mesh.ca.issue_spiffe("istio-system", "default")
    direct = [channel(r.secure_address, root, admin, r.host) for r in mesh.replicas]
    through = channel(proxy.address, root, admin, "127.0.0.1")

    async def call(mode: str) -> int:
        if mode == "proxy":
            return len(await ask(through))
        if mode == "floor":
            return sum(map(len, await asyncio.gather(*(ask(ch) for ch in direct))))
        if mode == "slowest":
            return len(await ask(direct[0]))
        bodies = []
        for r in mesh.replicas:  # sequential, fresh connection per replica per call
            async with channel(r.secure_address, root, admin, r.host) as ch:
                bodies.append(await ask(ch))
        return len(baseline_merge(bodies))

    for mode in MODES:
        await call(mode)  # warm every path
    lat: dict[str, list[float]] = {m: [] for m in MODES}
    round_p50: dict[str, list[float]] = {m: [] for m in MODES}
    sizes: dict[str, int] = {}
    for r in range(ns.rounds):
        for mode in MODES[r % 4 :] + MODES[: r % 4]:
            block = []
            for _ in range(ns.calls):
                t = time.perf_counter()
                sizes[mode] = await call(mode)
                block.append(time.perf_counter() - t)
            lat[mode] += block
            round_p50[mode].append(statistics.median(block))
    for ch in [*direct, through]:
        await ch.close()
    ratio = [p / f for p, f in zip(round_p50["proxy"], round_p50["floor"], strict=True)]
    speedup = [b / p for p, b in zip(round_p50["proxy"], round_p50["baseline"], strict=True)]
    return {
        "replicas": len(mesh.replicas), "proxies": ns.proxies, "rounds": ns.rounds, "calls": ns.calls,
        "istio_version": mesh.peers.istio_version, "merged_bytes": sizes["proxy"],
        "modes": {m: {"p50_ms": pct(v, 50) * 1e3, "p95_ms": pct(v, 95) * 1e3, "p99_ms": pct(v, 99) * 1e3}
                  for m, v in lat.items()},
        "proxy_over_floor": statistics.median(ratio), "baseline_over_proxy": statistics.median(speedup),
    }  # fmt: skip


def render(res: dict[str, Any]) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    rows = "\n".join(
        f"| {m} | {v['p50_ms']:.1f} | {v['p95_ms']:.1f} | {v['p99_ms']:.1f} |" for m, v in res["modes"].items()
    )
    return (
        f"{BEGIN}\n"
        f"K={res['replicas']} real `pilot-discovery` ({res['istio_version']}), P={res['proxies']} connected "
        f"Python data-plane clients, mTLS both ways, {res['rounds']} alternated rounds × {res['calls']} calls, "
        f"merged answer {res['merged_bytes'] / 1024:.0f} KiB, commit {commit.stdout.strip()}, "
        f"{os.cpu_count()} CPUs.\n\n| mode | p50 ms | p95 ms | p99 ms |\n|---|---|---|---|\n{rows}\n\n"
        f"proxy / floor (median of per-round p50 ratios): **{res['proxy_over_floor']:.2f} ×**; "
        f"sequential fresh-connection baseline / proxy: **{res['baseline_over_proxy']:.2f} ×**.\n{END}"
    )


async def amain(ns: argparse.Namespace) -> dict[str, Any]:
    peers = Peers.find()
    with tempfile.TemporaryDirectory(prefix="bench-real-") as tmp, JwtIssuer() as issuer:
        work = Path(tmp)
        # istiod rate-limits new xDS connections (PILOT_MAX_REQUESTS_PER_SECOND); the fleet connects at once.
        env = {"PILOT_MAX_REQUESTS_PER_SECOND": "10000"}
        with Mesh(
            work / "mesh", peers, replicas=ns.replicas, ca=TestCA(), jwt_issuer=issuer, extra_env=env
        ) as mesh:
            fleet = [
                mesh.ads_client(mesh.replicas[i % ns.replicas], f"bench-{i}", f"ns-{i % 4}",
                                {CDS: XdsState.SYNCED, LDS: XdsState.SYNCED})
                for i in range(ns.proxies)
            ]  # fmt: skip
            await start_clients(fleet)
            d = work / "proxy"
            d.mkdir()
            serving, upstream = mesh.ca.issue_serving(), mesh.ca.issue_spiffe("istio-system", "istioctl-proxy")
            files = {n: d / n for n in ("root.pem", "tls.crt", "tls.key", "up.crt", "up.key")}
            for name, data in zip(files, (mesh.root_cert_pem, serving.cert_pem, serving.key_pem, upstream.cert_pem,
                                          upstream.key_pem), strict=True):  # fmt: skip
                files[name].write_bytes(data)
            proxy = ProxyProcess(d, [
                "--tls-cert", str(files["tls.crt"]), "--tls-key", str(files["tls.key"]),
                "--client-ca", str(files["root.pem"]), "--istiod-ca", str(files["root.pem"]),
                "--istiod", ",".join(r.secure_address for r in mesh.replicas), "--upstream-identity",
                "--upstream-cert", str(files["up.crt"]), "--upstream-key", str(files["up.key"]), "--no-coalesce",
            ]).start()  # fmt: skip
            try:
                return await measure(ns, mesh, proxy)
            finally:
                proxy.stop()
                await close_clients(fleet)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--proxies", type=int, default=90)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=5)
    ns = p.parse_args()
    res = asyncio.run(amain(ns))
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "real-istiod.json").write_text(json.dumps(res, indent=2))
    doc = ROOT / "docs" / "benchmarks.md"
    text = doc.read_text()
    block = render(res)
    if BEGIN in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text += "\n## Real istiod\n\n" + block + "\n"
    doc.write_text(text)
    print(block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
