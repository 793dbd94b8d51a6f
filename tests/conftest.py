from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

# Loggers whose levels tests or logs.setup change (istioctl_proxy.logs sets grpc's and the HTTP clients').
_LOGGERS = ("", "istioctl_proxy", "grpc", "asyncio", "httpx", "httpx2", "httpcore")


@pytest.fixture(autouse=True)
def _logging_left_as_found() -> Iterator[None]:
    """Logging as each test found it: a test that runs the CLI in-process (logs.setup) or raises a logger to
    DEBUG would otherwise leave a handler on its own, closed, captured stderr and chatty loggers behind, and
    every later record (grpc's own DEBUG lines among them) would print "--- Logging error ---" to the run."""
    root = logging.getLogger()
    before = set(root.handlers)
    levels = {name: logging.getLogger(name).level for name in _LOGGERS}
    yield
    # pytest's own capture handlers (subclasses, added and removed per phase) are left to pytest.
    for handler in [h for h in root.handlers if type(h) is logging.StreamHandler and h not in before]:
        root.removeHandler(handler)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
