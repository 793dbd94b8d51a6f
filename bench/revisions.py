"""The cost of canary-upgrade merging: `--istiod-column revision` and mixed control plane versions, next to the
plain merge, side by side and alternated in one run.

    .venv/bin/python -m bench.revisions [--replicas 3] [--proxies 30000] [--rounds 15]

Two answers sets from the simulator: every replica answering (fast path) and one proxy listed by two replicas
(a proxy mid-move between revisions: the exact reader). Each case merges with the plain context and with
`istiod_column="revision"`, half the replicas on another revision and another version. Prints the median
time per merge and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

from istioctl_proxy import merge
from istioctl_proxy.discovery import Replica
from istioctl_proxy.model import Answer
from istioctl_proxy.policy import SYNCZ, plan_request
from istioctl_proxy.sim.simulator import make_mesh

PLAN = plan_request(SYNCZ, [])


def answers(replicas: int, proxies: int, *, moving: bool) -> list[Answer]:
    old = make_mesh(replicas, proxies, seed=1, version="1.29.2")
    new = make_mesh(replicas, proxies, seed=1, version="1.30.3")
    mesh = [old[i] if i % 2 == 0 else new[i] for i in range(replicas)]
    if moving and replicas > 1:
        mesh[1].proxies.append(mesh[0].proxies[0])
        mesh[1].invalidate()
    return [Answer(Replica(f"10.0.0.{i}:15012", revision="default" if i % 2 == 0 else "1-31"), r.syncz(""))
            for i, r in enumerate(mesh)]


def timed(batch: Sequence[Answer], ctx: merge.MergeContext) -> float:
    started = time.perf_counter()
    merge.merge(PLAN, batch, ctx)
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--proxies", type=int, default=30000)
    p.add_argument("--rounds", type=int, default=15)
    ns = p.parse_args()
    plain, column = merge.MergeContext(), merge.MergeContext(istiod_column="revision")
    print(f"{ns.replicas} replicas, {ns.proxies} proxies, {ns.rounds} alternated rounds (median ms per merge)")
    for name, moving in (("fast path", False), ("exact path (a proxy on two revisions)", True)):
        batch = answers(ns.replicas, ns.proxies, moving=moving)
        times: dict[str, list[float]] = {"external": [], "revision": []}
        for _ in range(ns.rounds):
            times["external"].append(timed(batch, plain))
            times["revision"].append(timed(batch, column))
        a, b = statistics.median(times["external"]), statistics.median(times["revision"])
        print(f"{name}: external {a * 1e3:.2f} ms, revision {b * 1e3:.2f} ms, ratio {b / a:.3f}")


if __name__ == "__main__":
    main()
