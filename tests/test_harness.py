"""The test harness itself: missing peers fail fast with the command to run, never build inside a test; the
shared traffic harness (reliability.Tally, run_workers) counts and dials as it says; the one wait
(waits.until) returns what it waited for and fails naming it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .k8s import cluster


def test_missing_kubernetes_peers_fail_fast_with_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster, "ETCD", tmp_path / "etcd")
    monkeypatch.setattr(cluster, "KUBE_APISERVER", tmp_path / "kube-apiserver")

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a test tried to run {args!r}: installing peers is scripts/test's job")

    monkeypatch.setattr(subprocess, "run", no_build)
    monkeypatch.setattr(subprocess, "Popen", no_build)
    with pytest.raises(cluster.PeersMissingError) as err:
        cluster.KubeCluster(tmp_path / "cluster")
    message = str(err.value)
    assert str(tmp_path / "etcd") in message and str(tmp_path / "kube-apiserver") in message
    assert "scripts/install-k8s-peers" in message


def test_tally_counts_kinds_codes_failures_lateness_and_named_replicas() -> None:
    import grpc

    from istioctl_proxy.server import FAILED_REPLICAS_KEY

    from .ads_client import Outcome
    from .reliability import Tally

    tally = Tally(labels={"127.0.0.1:1": "r1"}, late_slack=0.25)
    trailers = ((FAILED_REPLICAS_KEY, "127.0.0.1:1: UNAVAILABLE: gone"), (FAILED_REPLICAS_KEY, "10.0.0.9:2: hung"))
    tally.add("syncz", Outcome(grpc.StatusCode.OK, "", [b""], trailers, 1.2, 1.0), "")
    tally.add("syncz", Outcome(grpc.StatusCode.OK, "", [b""], (), 1.0, 1.0), "")
    for i in range(12):
        tally.add("dump", Outcome(grpc.StatusCode.INTERNAL, "boom", [], (), 0.1, 1.0), f"INTERNAL: boom {i}")
    assert tally.calls == {"syncz": 2, "dump": 12} and tally.total == 14
    assert tally.codes == {"OK": 2, "INTERNAL": 12}
    assert tally.failures == {"dump: INTERNAL": 12} and len(tally.examples) == 10
    assert tally.examples[0] == "dump: INTERNAL: boom 0"
    assert tally.late == 0  # 1.2 s against a 1 s deadline is inside the 0.25 s slack
    assert tally.named == {"r1": 1, "10.0.0.9:2": 1}


async def test_run_workers_redials_as_asked_and_closes_every_channel() -> None:
    import asyncio
    import random

    import grpc

    from .ads_client import Outcome
    from .reliability import Check, Tally, run_workers

    class FakeChannel:
        closed = False

        async def close(self) -> None:
            self.closed = True

    opened: list[FakeChannel] = []
    started = [0]

    def channel() -> FakeChannel:
        opened.append(FakeChannel())
        return opened[-1]

    used: dict[int, set[int]] = {0: set(), 1: set()}  # worker -> the channels it called on

    def make_call(rng: random.Random):  # type: ignore[no-untyped-def]
        worker = 0 if rng.random() == random.Random(0).random() else 1  # worker i draws from Random(i)

        async def call(ch: FakeChannel) -> tuple[str, Outcome, Check]:
            used[worker].add(id(ch))
            started[0] += 1
            await asyncio.sleep(0)  # the two workers take turns
            used_closed = ch.closed
            return "k", Outcome(grpc.StatusCode.OK, "", [], (), 0.0, 1.0), lambda o: "closed" if used_closed else ""

        return call

    tally = Tally()
    await run_workers(2, make_call, tally, channel=channel, going=lambda: started[0] < 6,  # type: ignore[arg-type]
                      redial_every=2)
    # Worker 0 dials anew for each of its three calls, worker 1 keeps one channel; all are closed at the end.
    assert tally.total == 6 and not tally.failures
    assert [len(used[0]), len(used[1])] == [3, 1]
    assert len(opened) == 4 and all(ch.closed for ch in opened)


async def test_until_returns_the_value_and_fails_naming_what_it_waited_for() -> None:
    import pytest

    from .waits import WaitTimeout, until, until_sync

    polls = iter([0, None, "", "ready"])
    assert await until(lambda: next(polls), "a value", step=0) == "ready"

    async def never() -> bool:
        return False

    with pytest.raises(AssertionError, match=r"gave up after 0s waiting for the thing: seen 3"):
        await until(never, lambda: "the thing: seen 3", timeout=0.01, step=0)
    with pytest.raises(TimeoutError):  # harness code (mesh.wait_ready) catches it as a TimeoutError
        until_sync(lambda: False, "never", timeout=0.01, step=0)
    assert issubclass(WaitTimeout, AssertionError) and issubclass(WaitTimeout, TimeoutError)
    sync_polls = iter([False, 7])
    assert until_sync(lambda: next(sync_polls), step=0) == 7
