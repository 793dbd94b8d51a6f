"""Ask the replicas concurrently, each with a deadline that leaves the caller time for the answer."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

from .discovery import Replica
from .model import Answer
from .upstream import UpstreamError, UpstreamPool

log = logging.getLogger(__name__)

# What gRPC reports when the replica's connection died under a request (its process exited, e.g. an
# istiod panic) rather than the replica answering with a status. "failed to connect" is not one of them:
# that request never reached the replica.
_BROKE = ("socket closed", "stream removed", "connection reset", "broken pipe", "goaway", "end of tcp stream",
          "connection closed", "keepalive watchdog timeout")

# Status codes ordered from most to least telling, for when every replica fails.
_TELLING = (
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAVAILABLE,
)


def connection_broke(code: grpc.StatusCode, message: str) -> bool:
    """Did the replica's connection die during the request, instead of the replica ending it with a status?"""
    text = message.lower()
    return code is grpc.StatusCode.UNAVAILABLE and not text.startswith("failed to connect") and any(
        phrase in text for phrase in _BROKE)


def most_telling(answers: Sequence[Answer]) -> grpc.StatusCode:
    """The status of the failed answers that best explains the failure (auth first, UNAVAILABLE last)."""
    codes = {a.code for a in answers if not a.ok}
    for code in _TELLING:
        if code in codes:
            return code
    return grpc.StatusCode.UNAVAILABLE


def upstream_timeout(caller_remaining: float | None, cap: float) -> float:
    """The caller's remaining time minus a margin for merging and sending, capped."""
    if caller_remaining is None:
        return cap
    margin = min(1.0, max(0.05, caller_remaining * 0.1))
    return max(0.01, min(cap, caller_remaining - margin))


@dataclass
class FanOut:
    """Asks replicas over an UpstreamPool: every one at once (`all`) or one at a time (`first`)."""

    pool: UpstreamPool
    # Told every replica's outcome (metrics: per-replica latency and errors); must not raise or block.
    on_answer: Callable[[Answer], None] | None = None

    async def _one(
        self, replica: Replica, request: bytes, metadata: tuple[tuple[str, str], ...], timeout: float,
        on_each: Callable[[Answer], None] | None = None,
    ) -> Answer:
        answer = await self._ask(replica, request, metadata, timeout)
        if self.on_answer is not None:
            self.on_answer(answer)
        if on_each is not None:
            on_each(answer)
        return answer

    async def _ask(
        self, replica: Replica, request: bytes, metadata: tuple[tuple[str, str], ...], timeout: float
    ) -> Answer:
        started = time.monotonic()
        try:
            # wait_for backs up the gRPC deadline: a replica that accepts and never answers is cut off.
            body = await asyncio.wait_for(self.pool.ask(replica, request, metadata, timeout), timeout + 0.05)
        except UpstreamError as err:
            return Answer(replica, None, err.code, err.message, time.monotonic() - started,
                          broken=connection_broke(err.code, err.message))
        except TimeoutError:
            return Answer(replica, None, grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer in {timeout:.2f}s",
                          time.monotonic() - started)
        return Answer(replica, body, seconds=time.monotonic() - started)

    async def all(
        self, replicas: Sequence[Replica], request: bytes, metadata: tuple[tuple[str, str], ...], timeout: float,
        on_each: Callable[[Answer], None] | None = None,
    ) -> list[Answer]:
        """Every replica at once; `on_each` sees each answer as it arrives (work overlapping the others' transfers)."""
        return list(await asyncio.gather(*(self._one(r, request, metadata, timeout, on_each) for r in replicas)))

    async def first(
        self, replicas: Sequence[Replica], request: bytes, metadata: tuple[tuple[str, str], ...], timeout: float,
        accept: Callable[[Answer], bool] | None = None,
    ) -> list[Answer]:
        """One replica at a time, healthiest first, until one answers usably (`accept`) or the time is up."""
        deadline = time.monotonic() + timeout
        ordered = sorted(replicas, key=lambda r: (r.address in self.pool.last_error, r.address))
        answers: list[Answer] = []
        for n, replica in enumerate(ordered):
            remaining = deadline - time.monotonic()
            if remaining <= 0.01:
                break
            # A replica that accepts and never answers must not use up the whole budget while others could
            # answer: every candidate but the last gets half of what is left.
            budget = remaining if n == len(ordered) - 1 else remaining / 2
            answer = await self._one(replica, request, metadata, budget)
            answers.append(answer)
            if answer.broken:
                # This request may be what broke the replica (istiod panics on some inputs): asking the next
                # replica could take it down too. Stop here; the call ends UNAVAILABLE.
                log.warning("%s: the connection broke during a request; not retrying it on another replica: %s",
                            replica.label, answer.error[:200].encode("unicode_escape").decode("ascii"))
                answers[-1] = dataclasses.replace(
                    answer, error=f"{answer.error} (the connection broke under this request: not retried on "
                                  "another replica)")
                break
            if answer.ok and accept is not None and not accept(answer):
                # A malformed answer is that replica's failure: rank it last next time, ask the next one now.
                self.pool.last_error[replica.address] = "malformed answer"
                continue
            if answer.ok:
                break
        return answers


__all__ = ["FanOut", "connection_broke", "most_telling", "upstream_timeout"]
