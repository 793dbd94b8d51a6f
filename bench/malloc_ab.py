"""Peak RSS of the proxy under glibc malloc settings: `python -m bench.malloc_ab [K] [P] [calls]`.

The proxy's live data per call is a few copies of the merged answer; what pushes the peak RSS past that
is memory glibc keeps in per-thread arenas and in the heap top after large frees. This compares the
default with settings an operator can put in the pod's environment (no code change).
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time

from .run import MiB, ProxyProcess, ReplicaProcess, clients, wait_ready

VARIANTS: list[dict[str, str]] = [
    {},
    {"MALLOC_ARENA_MAX": "2"},
    {"MALLOC_ARENA_MAX": "1", "MALLOC_TRIM_THRESHOLD_": "0"},
    {"MALLOC_MMAP_THRESHOLD_": "65536"},
]


def _open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def main(k: int, p: int, calls: int) -> None:
    reps = ReplicaProcess(k, p, None)
    try:
        for env in VARIANTS:
            proxy = ProxyProcess(reps.addresses, None, env=env)
            try:
                while not _open(proxy.port):
                    await asyncio.sleep(0.1)
                await asyncio.sleep(0.5)
                idle = proxy.rss()
                async with clients(proxy, reps, None, k) as c:
                    await wait_ready(c)
                    cpu0, t = proxy.cpu(), time.perf_counter()
                    for _ in range(calls):
                        size = await c.call("proxy")
                    wall = (time.perf_counter() - t) / calls
                    print(
                        f"{env or 'glibc defaults'}: idle {idle / MiB:.0f} MiB, peak {proxy.peak_rss() / MiB:.0f} MiB "
                        f"(merged {size / MiB:.1f} MiB), proxy CPU {(proxy.cpu() - cpu0) / calls * 1e3:.0f} ms/call, "
                        f"mean latency {wall * 1e3:.0f} ms",
                        flush=True,
                    )
            finally:
                proxy.close()
    finally:
        reps.close()


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]]
    asyncio.run(main(*(args + [5, 30_000, 10][len(args) :])))
