"""A benchmark child process: its CPU seconds, and a stop that never hangs."""

from __future__ import annotations

import subprocess
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # psutil is in the bench extra only; the tests import bench modules without it
    import psutil


class Child:
    """A child process observed with psutil (`proc` and `ps` are set by the subclass)."""

    proc: subprocess.Popen[Any]
    ps: psutil.Process
    stop_seconds = 30.0

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(self.stop_seconds)
        except subprocess.TimeoutExpired:
            self.proc.kill()
