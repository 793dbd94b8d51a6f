"""The one way tests wait: for an event the code under test makes observable (a counter, a state, a log
line, a process being ready), never for a stretch of wall-clock time.

`until` (async) and `until_sync` (for synchronous code: the real mesh harness, subprocesses) poll `check`
until it returns something truthy, and return that. The timeout is a backstop against hangs, generous
enough to hold on a loaded machine, not a bound the test asserts; on it they fail naming what they waited
for (`what` may be a function, to say what was last seen).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

EVENT_TIMEOUT = 120.0


class WaitTimeout(AssertionError, TimeoutError):
    """The event never came: a test failure (AssertionError) that harness code may catch as a TimeoutError."""


def _gave_up(what: str | Callable[[], str], timeout: float) -> WaitTimeout:
    return WaitTimeout(f"gave up after {timeout:.0f}s waiting for {what() if callable(what) else what}")


async def until(
    check: Callable[[], T | Awaitable[T]],
    what: str | Callable[[], str] = "the condition",
    timeout: float = EVENT_TIMEOUT,
    *,
    step: float = 0.02,
) -> T:
    """Wait until `check()` (a function or a coroutine function) returns something truthy; return it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        value: T = await result if inspect.isawaitable(result) else result  # type: ignore[assignment]
        if value:
            return value
        if loop.time() > deadline:
            raise _gave_up(what, timeout)
        await asyncio.sleep(step)


def until_sync(
    check: Callable[[], T],
    what: str | Callable[[], str] = "the condition",
    timeout: float = EVENT_TIMEOUT,
    *,
    step: float = 0.1,
) -> T:
    """`until` for synchronous code: blocks the calling thread between polls."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise _gave_up(what, timeout)
        time.sleep(step)
