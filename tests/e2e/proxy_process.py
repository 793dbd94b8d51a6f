"""Our proxy as a separate process (`istioctl-proxy serve`), the way operators run it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from istioctl_proxy.app import free_port

from ..waits import until_sync


class ProxyProcess:
    def __init__(self, workdir: Path, args: Sequence[str]) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.args = ["--listen", self.address, "--admin-listen", "", "--drain-seconds", "1", *args]
        self.log_path = workdir / f"proxy-{self.port}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> ProxyProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "istioctl_proxy", "serve", *self.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HOME": str(self.workdir)},
        )
        proc = self._proc

        def serving() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"istioctl-proxy did not start:\n{self.log()}")
            return "serving ADS" in self.log()

        until_sync(serving, lambda: f"istioctl-proxy to serve:\n{self.log()}", timeout_s, step=0.05)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
