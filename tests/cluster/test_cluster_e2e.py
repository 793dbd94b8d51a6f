"""Issue 12: scripts/e2e-cluster under pytest, and its teardown: after a full run and after an interrupt in the
middle of one, nothing it started or changed is left on this shared machine.

Needs root and what scripts/test installs first (scripts/install-cluster-peers, scripts/image); without them the
run fails and says which script to run. Never skipped."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .cluster import ROOT, SYSCTLS, read_sysctl

E2E = ROOT / "scripts" / "e2e-cluster"
OURS = re.compile(r"KUBE-|CNI-|IPX-E2E")


def machine_state(state: Path) -> dict[str, object]:
    """What a run could leave behind: links, iptables chains and rules, mounts, processes, cgroups, sysctls."""
    links = {ln.split(":")[1].strip().split("@")[0] for ln in
             subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout.splitlines()}
    chains = [ln for ln in subprocess.run(["iptables-save"], capture_output=True, text=True).stdout.splitlines()
              if OURS.search(ln)]
    mounts = [ln for ln in Path("/proc/self/mounts").read_text().splitlines()
              if str(state) in ln or " /run/netns " in ln]
    procs = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(state) in text or "/.peers/bin/kubelet" in text:
            procs.append(text[:120])
    cgroups = sorted(str(p) for p in Path("/sys/fs/cgroup").glob("*/kubepods"))
    return {"links": sorted(links), "iptables": chains, "mounts": mounts, "processes": procs, "cgroups": cgroups,
            "sysctls": {n: read_sysctl(n) for n in SYSCTLS}, "state dir": state.exists()}


def _env(tmp_path: Path, state: Path) -> dict[str, str]:
    return {**os.environ, "ISTIOCTL_PROXY_CLUSTER_STATE": str(state),
            "ISTIOCTL_PROXY_CLUSTER_LOGS": str(tmp_path / "logs"), "ISTIOCTL_PROXY_CLUSTER_LOCK_HELD": "1"}


@pytest.fixture(autouse=True)
def _one_cluster_run() -> Iterator[None]:
    """Hold e2e-cluster's machine-wide lock from the first look at the machine to the last: another run (another
    checkout's suite on this machine) between the two would be counted as ours."""
    with open("/tmp/istioctl-proxy-cluster.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_cluster_e2e_passes_every_check_and_leaves_nothing(tmp_path: Path) -> None:
    state = Path("/tmp/istioctl-proxy-cluster-test")
    # A state directory left by an earlier killed run is torn down by the run itself: afterwards there is none.
    before = {**machine_state(state), "state dir": False}
    p = subprocess.run([E2E], capture_output=True, text=True, env=_env(tmp_path, state), timeout=1400)
    lines = p.stdout.strip().splitlines()
    report = f"{p.stdout}\n--- stderr\n{p.stderr[-4000:]}\n(process logs in {tmp_path / 'logs'})"
    assert lines, report
    m = re.fullmatch(r"cluster e2e: (\d+)/(\d+) checks passed", lines[-1])
    assert m and m[1] == m[2] and int(m[2]) >= 15, report
    assert p.returncode == 0, report
    assert sum(ln.startswith("PASS ") for ln in lines) == int(m[2]), report
    assert machine_state(state) == before


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_an_interrupted_run_is_torn_down(tmp_path: Path) -> None:
    """Ctrl-C once the Pods run (the first check line): the trap tears down everything at once."""
    state = Path("/tmp/istioctl-proxy-cluster-test")
    # A state directory left by an earlier killed run is torn down by the run itself: afterwards there is none.
    before = {**machine_state(state), "state dir": False}
    p = subprocess.Popen([E2E], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=_env(tmp_path, state))
    assert p.stdout
    seen = []
    for line in p.stdout:
        seen.append(line)
        if line.startswith(("PASS ", "FAIL ", "cluster e2e:")):
            break
    assert seen and seen[-1].startswith(("PASS ", "FAIL ")), "".join(seen)
    running = machine_state(state)
    assert running["processes"] and "ipxe2e0" in running["links"] and running["iptables"], running
    p.send_signal(signal.SIGINT)
    rest, err = p.communicate(timeout=600)
    assert p.returncode == 130, f"{''.join(seen)}{rest}\n{err[-3000:]}"
    assert "cluster e2e:" not in rest, "the run went on after the interrupt"
    assert machine_state(state) == before
