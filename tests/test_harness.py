"""The test harness itself: missing peers fail fast with the command to run, never build inside a test."""

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
