"""The data path, top to bottom: request → policy → fan-out → merge → response."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from . import wire
from .auth import AuthMode, Caller, authorize
from .coalesce import Coalescer, FlightKey
from .config import Config
from .discovery import Replica, ReplicaSet
from .errors import NoReplicas, UpstreamFailed
from .fanout import FanOut, most_telling, upstream_timeout
from .merge import MUST_PROVIDE, NOT_CONNECTED, MergeContext, claims_proxy, debug_response, index_early, merge
from .model import Answer, Merge, Plan, Result
from .policy import CONFIG_DUMP, SYNCZ, plan_request

log = logging.getLogger(__name__)

_PASSED_THROUGH = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


@dataclass(frozen=True)
class Settings:
    """How the aggregator serves every call (from flags: app.py builds it from Config, whose defaults these are)."""

    mode: AuthMode = AuthMode.FORWARD  # Config.upstream_identity is off
    require_all: bool = Config.require_all
    upstream_timeout: float = Config.upstream_timeout
    external_id: str = Config.external_id
    upstream_node: base_pb2.Node | None = None  # identity mode: the node matching the proxy's own identity
    coalesce: bool = Config.coalesce  # identical concurrent requests of one caller key share one fan-out
    cache_ttl: float = Config.cache_ttl  # seconds a complete answer is reused for the same caller key; 0 = off
    cache_max_bytes: int = 64 * 1024 * 1024  # bound on cached bodies (entries are also capped in number)
    istiod_column: str = Config.istiod_column  # or "revision": the ISTIOD value names the revisions holding the proxies


class Budget(Protocol):
    """Room for bytes held on a caller's behalf (budget.SendBudget): fan-outs reserve in it."""

    def hold(
        self, caller: str, size: int, wait: float, *, fan_out: bool = False
    ) -> AbstractAsyncContextManager[object]:
        """Room for `size` bytes of `caller`, waited for up to `wait` s (else ResourceExhausted)."""
        ...


# Fan-out sizes remembered (per request shape) to reserve room before the next identical fan-out.
_SIZES_KEPT = 256


def _may_match_connection(proxy_id: str, node_id: str) -> bool:
    """Could istiod's lookup pick `node_id`'s connection for `proxy_id`?

    istiod finds a proxy by substring over connection ids "<node id>-<counter>" (getProxyConnection), so
    "web.team" matches "web.team2", and "web.team-1" also matches the connection "web.team-1" of proxy
    "web.team" in namespace "team".
    """
    if proxy_id in node_id or proxy_id.isdigit():  # digits alone are in some "-<counter>" of every connection
        return True
    # Else proxy_id must run past the end of node_id into "-<counter>": "<tail of node id>-<digits or none>".
    # Only the last '-' can start an all-digit rest. O(len) per id: the ids are the caller's (up to 4 KiB),
    # and this runs for every proxy of every replica.
    k = proxy_id.rfind("-")
    if k < 0:
        return False
    rest = proxy_id[k + 1:]
    return (not rest or rest.isdigit()) and node_id.endswith(proxy_id[:k])


def _istiod_proxy_id(node_id: str) -> str:
    """The id istiod gives a node (`<pod>.<ns>`, the third part of `type~ip~id~domain`), used in connection ids."""
    parts = node_id.split("~")
    return parts[2] if len(parts) == 4 else node_id


def _left(deadline: float) -> float:
    """Seconds until `deadline`; never zero, so that a late stage still fails as a timeout, not a bug."""
    return max(0.01, deadline - time.monotonic())


def _syncz_entries(body: bytes) -> list[bytes]:
    view = wire.view_response(body)
    return [view.resource_any(i) for i in range(len(view.resources))]


def _id_and_namespace(any_bytes: bytes) -> tuple[str, str]:
    """A syncz entry's proxy id and NAMESPACE ("" without it: istiod's fallback, the DNS domain, is not in syncz)."""
    cfg = wire.client_config(any_bytes)
    ns_value = cfg.node.metadata.fields.get("NAMESPACE")
    return str(cfg.node.id), str(ns_value.string_value) if ns_value is not None else ""


class Aggregator:
    """Answers one caller's request from every replica: policy, scope checks, coalescing, fan-out, merge."""

    def __init__(self, replicas: ReplicaSet, fanout: FanOut, settings: Settings) -> None:
        self.replicas = replicas
        self.fanout = fanout
        self.settings = settings
        # Partial answers (a replica failed) are shared with concurrent callers but never cached, so a
        # replica that comes back is seen on the next call.
        self.coalescer: Coalescer[Result] = Coalescer(
            ttl=settings.cache_ttl, enabled=settings.coalesce, max_bytes=settings.cache_max_bytes,
            size=lambda r: len(r.body), cacheable=lambda r: not r.failures,
        )
        # Scope and holder checks read every replica's own syncz: concurrent checks share one fetch, so a
        # tenant asking for dumps in a loop does not make the proxy read the whole mesh once per request.
        self.syncz_checks: Coalescer[list[Answer]] = Coalescer(enabled=settings.coalesce)
        # Each proxy's node id and namespace, by node bytes: scoped and deduplicating merges read them (merge.py).
        self.syncz_memo = wire.SynczMemo()
        # Told (type URL, "coalesced" | "cached") for each call served without its own fan-out (metrics).
        self.on_shared: Callable[[str, str], None] | None = None
        # Where fan-outs reserve room for the answers they will hold (the server's send budget; None: unbounded).
        self.budget: Budget | None = None
        # Bytes the last fan-out of each request shape held (its answers + its merge): the next one's reservation.
        self.fan_out_sizes: OrderedDict[Hashable, int] = OrderedDict()
        # Per (type URL, replicas) whose size is not known yet: the one fan-out learning it (the others wait).
        self._learning: dict[Hashable, asyncio.Future[None]] = {}

    async def answer(
        self, type_url: str, names: list[str], node: base_pb2.Node, caller: Caller, remaining: float | None
    ) -> Result:
        """One request's merged answer.

        Args:
            type_url, names: the request (policy.py decides what is served).
            node: the caller's node, sent upstream in forward mode.
            caller: the authenticated caller (auth.py).
            remaining: seconds left of the caller's deadline, None without one.

        Raises a ProxyError subclass: InvalidRequest, UnsupportedType, PermissionDenied, NoReplicas, or
        UpstreamFailed when the failure policy turns replica failures into a failed call.
        """
        started = time.monotonic()
        plan = plan_request(type_url, names)
        authorize(plan, caller)
        if plan.merge is Merge.NOT_FOUND:
            return Result(merge(plan, [], MergeContext(self.settings.external_id)).body, plan, 1, [])
        replicas = self.replicas.current()
        if not replicas:
            raise NoReplicas("no istiod replica is known yet: check --istiod / --istiod-dns / --istiod-k8s")
        # One absolute deadline for the whole call: the scope check and the fan-out share it.
        deadline = started + upstream_timeout(remaining, self.settings.upstream_timeout)
        # Waiting for room in the budget may use the caller's whole deadline (less the same margin; without
        # one, the upstream timeout); the upstream timeout then counts from when the fan-out starts.
        caller_end = float("inf") if remaining is None else started + upstream_timeout(remaining, remaining)
        request, metadata = self._upstream_request(plan, node, caller)
        scope = caller.scope_for(plan.type_url)
        ctx = MergeContext(
            self.settings.external_id, scope, istiod_column=self.settings.istiod_column, memo=self.syncz_memo
        )

        if scope and plan.names_proxy:
            # Identity mode: the replicas are asked with the proxy's own identity, so istiod's namespace
            # check is ours. Only one exact, non-empty id of the caller's namespace is looked up, and only
            # on the replicas whose syncz lists exactly that id (istiod matches ids by substring, "" = any).
            # istiod's lookup also sees connections syncz does not list, among them the very stream that asks
            # for the dump (our own node, on every replica): an id that could match it is ambiguous too.
            own = _istiod_proxy_id(self.settings.upstream_node.id) if self.settings.upstream_node else ""
            ambiguous = not plan.proxy_id or bool(own and _may_match_connection(plan.proxy_id, own))
            holders = frozenset() if ambiguous else \
                await self._exact_holders(plan.proxy_id, scope, node, replicas, deadline)
            if not holders:
                return Result(self._not_found(plan), plan, 0, [])
            replicas = tuple(r for r in replicas if r.address in holders)
            ctx = dataclasses.replace(ctx, holders=holders)

        # The coalescing/caching hook. The key holds the caller's credential key, so a shared or cached
        # answer is always one that this caller's own credentials fetched (or would fetch: same token or
        # principal, same node, same request).
        key = FlightKey(caller.key, plan.type_url, plan.resource_names, request, ctx.scope,
                        (plan.fan_out, tuple(r.address for r in replicas)))
        shared, kind = await self.coalescer.serve(
            key, lambda: self._fan_out_and_merge(plan, replicas, request, metadata, deadline, ctx, node, caller, key,
                                                 caller_end),
            deadline=deadline,
        )
        if kind and self.on_shared is not None:
            self.on_shared(plan.type_url, kind)
        log.debug("%s answered in %.1f ms", plan.type_url, (time.monotonic() - started) * 1e3)
        # A copy per caller: the body is shared (immutable bytes), the lists are not.
        return Result(shared.body, shared.plan, shared.resources, list(shared.answers), list(shared.failures), kind)

    async def _fan_out_and_merge(
        self, plan: Plan, replicas: tuple[Replica, ...], request: bytes,
        metadata: tuple[tuple[str, str], ...], deadline: float, ctx: MergeContext,
        node: base_pb2.Node, caller: Caller, shape: Hashable, caller_end: float,
    ) -> Result:
        """The fan-out and merge within a reservation of the budget: the replicas' answers and the merge are
        held before any send, so N callers' own fan-outs (no coalescing) would otherwise hold N × that.

        The reservation is what the last fan-out of the same `shape` (the coalescing key: same caller, request
        and replicas) held, else the last of the same type URL and replicas (another caller, other names). While
        neither is known, one fan-out of that type runs to learn it and the others wait for it (so a burst of
        callers right after start cannot all fan out unbounded). A caller waits for room until `caller_end` (its
        own deadline, less a margin; without one, `deadline`), in turn with everyone else's sends; the upstream
        timeout counts from then.
        """
        patience = deadline if caller_end == float("inf") else caller_end
        asked = time.monotonic()
        kind = (plan.type_url, tuple(r.address for r in replicas))
        learner: asyncio.Future[None] | None = None
        # A learner that ends without a size (its caller hung up, its replicas failed) hands learning on to one
        # of the callers waiting: else they would all fan out at once, unreserved.
        while self.budget is not None and shape not in self.fan_out_sizes and kind not in self.fan_out_sizes:
            learning = self._learning.get(kind)
            if learning is None:
                learner = self._learning[kind] = asyncio.get_running_loop().create_future()
                break
            if patience <= time.monotonic():
                break
            await asyncio.wait({learning}, timeout=_left(patience))
        estimate = self.fan_out_sizes.get(shape, self.fan_out_sizes.get(kind, 0))
        reserve: AbstractAsyncContextManager[object] = contextlib.nullcontext()
        if self.budget is not None and estimate:
            reserve = self.budget.hold(caller.budget_key, estimate, _left(patience), fan_out=True)
        try:
            async with reserve:
                # Time spent waiting for room is given back (within the caller's deadline): the scope check
                # and the fan-out still share one deadline otherwise.
                deadline = max(deadline, min(caller_end, deadline + time.monotonic() - asked))
                result = await self._fan_out_and_merge_now(plan, replicas, request, metadata, deadline, ctx, node,
                                                           caller)
            for key in (shape, kind):
                self.fan_out_sizes[key] = result.held
                self.fan_out_sizes.move_to_end(key)
            while len(self.fan_out_sizes) > _SIZES_KEPT:
                self.fan_out_sizes.popitem(last=False)
        finally:
            if learner is not None:
                del self._learning[kind]
                learner.set_result(None)
        return result

    async def _fan_out_and_merge_now(
        self, plan: Plan, replicas: tuple[Replica, ...], request: bytes,
        metadata: tuple[tuple[str, str], ...], deadline: float, ctx: MergeContext,
        node: base_pb2.Node, caller: Caller,
    ) -> Result:
        if plan.fan_out:
            ctx = dataclasses.replace(ctx, early={})  # this fan-out's own early readings
            answers = await self.fanout.all(replicas, request, metadata, _left(deadline),
                                            on_each=lambda a: index_early(plan, ctx, a))
        else:
            answers = await self.fanout.first(replicas, request, metadata, _left(deadline),
                                              accept=lambda a: not merge(plan, [a], ctx).rejected)
        failures = self._apply_failure_policy(plan, answers)
        if plan.proxy_id and not ctx.holders and sum(claims_proxy(plan, a) for a in answers) > 1:
            # Several replicas answer for one id: istiod matched a look-alike ("web-1.team" in
            # "web-1.team2-3"). The answer is the holder's: the replica whose syncz lists the exact id.
            holders = await self._exact_holders(plan.proxy_id, "", node, replicas, deadline, caller)
            ctx = dataclasses.replace(ctx, holders=holders)
        merged = merge(plan, answers, ctx)
        for answer, reason in merged.rejected:
            failures.append((answer.replica.label, reason))
        if merged.rejected and (self.settings.require_all or len(merged.rejected) == sum(a.ok for a in answers)):
            raise UpstreamFailed(
                "; ".join(f"{r}: {why}" for r, why in failures), grpc.StatusCode.UNAVAILABLE
            )
        if failures:
            log.warning("partial answer for %s: %s", plan.type_url, "; ".join(f"{r}: {w}" for r, w in failures))
        # The replicas' bodies are merged now: drop them (keeping ok-ness) so that they are not held while
        # the merged answer is sent, shared or cached — for 30k proxies that is the size of the answer again.
        held = sum(len(a.body) for a in answers if a.body) + len(merged.body)
        answers = [dataclasses.replace(a, body=b"") if a.body else a for a in answers]
        return Result(merged.body, plan, merged.resources, answers, failures, held=held)

    def _upstream_request(
        self, plan: Plan, node: base_pb2.Node, caller: Caller
    ) -> tuple[bytes, tuple[tuple[str, str], ...]]:
        if self.settings.mode is AuthMode.FORWARD:
            metadata: tuple[tuple[str, str], ...] = (("authorization", "Bearer " + caller.token),)
            upstream_node = node
        else:
            metadata = ()
            upstream_node = self.settings.upstream_node or node
        req = discovery_pb2.DiscoveryRequest(type_url=plan.type_url, resource_names=plan.resource_names)
        req.node.CopyFrom(upstream_node)
        # Deterministic: the bytes are part of the coalescing key, and map order must not split a flight.
        return req.SerializeToString(deterministic=True), metadata

    def _apply_failure_policy(self, plan: Plan, answers: list[Answer]) -> list[tuple[str, str]]:
        failed = [a for a in answers if not a.ok]
        for a in failed:
            if a.code in _PASSED_THROUGH:
                # Never a partial success: the caller's credentials were refused by istiod.
                raise UpstreamFailed(f"istiod {a.replica.label}: {a.error}", a.code)
        if failed and (self.settings.require_all or len(failed) == len(answers)):
            reasons = "; ".join(f"{a.replica.label}: {a.code.name}: {a.error}" for a in failed)
            scope = "every replica failed" if len(failed) == len(answers) else "--require-all and replicas failed"
            raise UpstreamFailed(f"{scope}: {reasons}", most_telling(failed))
        return [(a.replica.label, f"{a.code.name}: {a.error}") for a in failed]

    async def _exact_holders(
        self, proxy_id: str, scope: str, node: base_pb2.Node, replicas: tuple[Replica, ...], deadline: float,
        caller: Caller | None = None,
    ) -> frozenset[str]:
        """The replicas whose syncz lists exactly `proxy_id` (in namespace `scope`, if given) and no look-alike.

        Each replica's own syncz, not the merged one: the lookup runs on one replica, so that replica must
        hold the proxy and no other id that istiod's substring match could pick instead. A replica whose
        syncz failed or cannot be read holds nothing. `caller` asks with the caller's credentials (forward
        mode); without it, with the proxy's own (the scope check: identity mode only).
        """
        syncz = Plan(SYNCZ, Merge.SYNCZ, ())
        asking = caller or Caller("istioctl-proxy")
        request, metadata = self._upstream_request(syncz, node, asking)
        key = FlightKey(asking.key, SYNCZ, (), request, "", ("holders", tuple(r.address for r in replicas)))
        answers, _ = await self.syncz_checks.serve(
            key, lambda: self.fanout.all(replicas, request, metadata, _left(deadline)), deadline=deadline)
        holders: set[str] = set()
        for answer in answers:
            if not answer.ok or answer.body is None:
                continue
            try:
                # Ids only (cheap); a whole ClientConfig is decoded only for the exact id, for its namespace.
                entries = _syncz_entries(answer.body)
                ids = [wire.syncz_node_id(any_bytes) for any_bytes in entries]
                exact = [_id_and_namespace(e)[1] for e, node_id in zip(entries, ids, strict=True)
                         if node_id == proxy_id]
            except wire.WireError:
                continue  # an unreadable entry could be a look-alike: refuse rather than guess
            lookalike = any(node_id != proxy_id and _may_match_connection(proxy_id, node_id) for node_id in ids)
            if exact and not lookalike and all(not scope or ns == scope for ns in exact):
                holders.add(answer.replica.address)
        return frozenset(holders)

    def _not_found(self, plan: Plan) -> bytes:
        """What istiod answers when it finds no proxy for the request (the plan keeps its names: Delta needs them)."""
        if plan.type_url == CONFIG_DUMP:
            return wire.envelope(type_url=plan.type_url, version_info="", nonce="")
        if not plan.proxy_id:
            return debug_response(plan, [], MUST_PROVIDE + b" in the query string\n")
        return debug_response(plan, [], NOT_CONNECTED + b". It may be connected to another instance.\n")


__all__ = ["Aggregator", "Budget", "Settings"]
