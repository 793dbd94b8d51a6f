"""Simulated istiod replicas in their own process, for the benchmark (driven over stdin/stdout).

The same simulator as `istioctl-proxy simulate` (istioctl_proxy.sim.simulator), plus what a benchmark needs
and the CLI does not offer: TLS with a given certificate, and a control channel to change the injected
latency and read per-replica request counts without restarting (restarts would re-serialize 30k
ClientConfigs and cost seconds per scenario).

Protocol: prints one JSON line {"addresses": [...]} when serving; then reads commands, one per line:
  latency SECONDS   → {"ok": true}
  stats             → {"requests": [n, ...]}
  quit              → exits
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from istioctl_proxy.sim.simulate import SimulatedMesh
from istioctl_proxy.sim.simulator import make_mesh

TOKEN = "bench-admin-token"


async def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--replicas", type=int, required=True)
    p.add_argument("--proxies", type=int, required=True)
    p.add_argument("--tls-cert", default="")
    p.add_argument("--tls-key", default="")
    p.add_argument("--client-ca", default="", help="require client certificates (identity mode callers)")
    ns = p.parse_args(argv)
    mesh = SimulatedMesh(make_mesh(ns.replicas, ns.proxies, tokens={TOKEN: ("istio-system", "default")}))
    tls = None
    if ns.tls_cert:
        with open(ns.tls_cert, "rb") as c, open(ns.tls_key, "rb") as k, open(ns.client_ca or os.devnull, "rb") as ca:
            # Without a client CA: forward mode, callers authenticate by token.
            tls = (c.read(), k.read(), ca.read() if ns.client_ca else None)
    await mesh.start(tls=tls)
    for r in mesh.replicas:
        r.syncz("")  # serialize once now, not during the first measured call
    print(json.dumps({"addresses": mesh.addresses}), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().strip():
        cmd, _, arg = line.partition(" ")
        if cmd == "latency":
            for r in mesh.replicas:
                r.faults.latency = float(arg)
            out: dict[str, object] = {"ok": True}
        elif cmd == "stats":
            out = {"requests": [r.requests for r in mesh.replicas]}
        elif cmd == "quit":
            break
        else:
            out = {"error": f"unknown command {cmd!r}"}
        print(json.dumps(out), flush=True)
    await mesh.stop()


if __name__ == "__main__":
    asyncio.run(main())
