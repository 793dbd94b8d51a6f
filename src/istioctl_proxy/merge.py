"""Merge rules: many replicas' DiscoveryResponses → the one response istioctl expects.

Each rule takes the successful answers and returns the merged bytes plus the answers it had to reject
(malformed bytes are contained to the replica that sent them). See docs/merge-rules.md.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate, chain, compress, islice, pairwise, repeat
from operator import eq, itemgetter
from typing import TypeVar

from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.status.v3 import csds_pb2
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from . import wire
from .model import Answer, Merge, Plan
from .policy import DEBUG

_T = TypeVar("_T")

NOT_CONNECTED = b"Proxy not connected to this Pilot instance"
MUST_PROVIDE = b"You must provide a proxyID"
NOT_FOUND = b"404 page not found\n"  # Go's http.NotFound body, as istiod's debug mux answers


@dataclass(frozen=True)
class MergeContext:
    """What a merge needs beyond the answers: the external id, the caller's scope, the holders."""

    external_id: str = "<external>"
    scope: str = ""  # namespace-scoped caller (identity mode): keep only that namespace's proxies
    # Addresses of the replicas whose syncz lists the requested proxy id exactly: when several replicas
    # answer for a proxy (istiod matches ids by substring), theirs is the answer (the holder rule).
    holders: frozenset[str] = frozenset()
    # "revision": the ISTIOD value is `<external_id>/<revisions holding the listed proxies>` (--istiod-column).
    istiod_column: str = "external"
    # What the split path remembers across calls (the Aggregator's); None: a fresh memo for this merge only.
    memo: wire.SynczMemo | None = field(default=None, compare=False)
    # Answers already read as they arrived (see index_early), by replica address.
    early: dict[str, wire.SynczIndex | wire.SynczSplit | None] = field(default_factory=dict, compare=False)
    # During one merge_syncz call: the fast index of each answer (by body), for the split path to reuse.
    indexes: dict[int, tuple[bytes, wire.SynczIndex]] | None = field(default=None, compare=False, repr=False)


def index_early(plan: Plan, ctx: MergeContext, answer: Answer) -> None:
    """Read one syncz answer as soon as it arrives, while the other replicas' answers are still in transit.

    The merge then finds the reading in ctx.early instead of doing it after the last answer. Only the
    reading moves: the merge itself, and so its result, is the same.
    """
    if plan.merge is not Merge.SYNCZ or answer.body is None:
        return
    if ctx.scope:
        split = wire.syncz_split(answer.body, ctx.memo or wire.SynczMemo())
        if split is not None and ctx.memo is not None:
            ctx.memo.facts(split.nodes)  # its nodes listed and their facts remembered now, not after the last answer
        ctx.early[answer.replica.address] = split
    else:
        ctx.early[answer.replica.address] = wire.syncz_fast_index(answer.body, ctx.memo)


@dataclass
class Merged:
    """A merge's outcome: the serialized response, its resource count, and the answers it rejected (with why)."""

    body: bytes
    resources: int
    rejected: list[tuple[Answer, str]] = field(default_factory=list)


def _nonce(version_info: str) -> str:
    # istiod's form (xds.go nonce()): the push version directly followed by a dashed UUID, a bare UUID
    # before the first push. istioctl ≥ 1.30 prints it with `-o json`, so it must read like one istiod's.
    return version_info + str(uuid.uuid4())


def _version(views: Sequence[wire.ResponseView]) -> str:
    # istiod versions are "RFC3339/counter": the newest push across replicas is the largest string.
    return max((v.version_info for v in views), default="")


Rejected = list[tuple[Answer, str]]


def _views(answers: Sequence[Answer], type_url: str) -> tuple[list[tuple[Answer, wire.ResponseView]], Rejected]:
    good: list[tuple[Answer, wire.ResponseView]] = []
    bad: list[tuple[Answer, str]] = []
    for answer in answers:
        assert answer.body is not None
        try:
            view = wire.view_response(answer.body)
        except wire.WireError as err:
            bad.append((answer, f"malformed DiscoveryResponse: {err}"))
            continue
        if view.type_url not in ("", type_url):
            bad.append((answer, f"answered type {view.type_url!r} to a {type_url!r} request"))
            continue
        good.append((answer, view))
    return good, bad


def external_identifier(identifiers: Sequence[str | None], external_id: str) -> str:
    """istiod's ControlPlane JSON with the ID replaced; version info kept from the first replica that has one.

    istioctl shows one control plane per response (`x version`: `control plane version: <Info.version>`):
    when the replicas run different versions (a canary upgrade), Info.version lists each, "1.29.2, 1.30.3".
    """
    first: dict[str, object] | None = None
    versions: set[str] = set()
    for ident in identifiers:
        if not ident:
            continue
        try:
            data = json.loads(ident)
        except ValueError:
            continue
        if isinstance(data, dict):
            first = first or data
            info = data.get("Info")
            if isinstance(info, dict) and isinstance(info.get("version"), str):
                versions.add(info["version"])
    if first is None:
        return json.dumps({"Component": "istiod", "ID": external_id}, separators=(",", ":"))
    first["ID"] = external_id
    info = first.get("Info")
    if len(versions) > 1 and isinstance(info, dict):
        info["version"] = ", ".join(sorted(versions, key=_version_key))
    return json.dumps(first, separators=(",", ":"))


def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    # "1.9.0" before "1.30.3": numeric parts compare as numbers.
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in version.replace("-", ".").split("."))


def shown_id(ctx: MergeContext, held: Sequence[tuple[Answer, int]]) -> str:
    """The ISTIOD value: --external-id, or with --istiod-column revision `<external-id>/<revisions>` of the
    replicas that hold the listed proxies (every answering replica's when none is listed)."""
    if ctx.istiod_column != "revision":
        return ctx.external_id
    revisions = {a.replica.revision for a, n in held if n} or {a.replica.revision for a, _ in held}
    shown = ",".join(sorted(r for r in revisions if r))
    return f"{ctx.external_id}/{shown}" if shown else ctx.external_id


def merge_syncz_fast(plan: Plan, answers: Sequence[Answer], ctx: MergeContext) -> Merged | None:
    """The common case at C speed: every answer regular, no proxy on two replicas, no scoping.

    Returns None whenever anything is unusual (a malformed answer, a duplicate, a scoped caller); the
    exact reader in merge_syncz then decides, so the two paths always give the same bytes.
    """
    if ctx.scope:
        return None
    indexes: list[wire.SynczIndex] = []
    total = 0
    for answer in answers:
        assert answer.body is not None
        early = ctx.early.get(answer.replica.address, False)
        index = early if early is None or isinstance(early, wire.SynczIndex) else \
            wire.syncz_fast_index(answer.body, ctx.memo)
        if index is None or index.type_url not in ("", plan.type_url):
            return None
        if ctx.indexes is not None:
            ctx.indexes[id(answer.body)] = (answer.body, index)
        indexes.append(index)
        total += index.count
    # One set over all replicas: a key seen twice (across or within replicas) needs the exact dedup.
    if len(set().union(*(index.node_keys for index in indexes))) != total:
        return None
    parts = [a.body for a in answers if a.body is not None]
    held = [(a, i.count) for a, i in zip(answers, indexes, strict=True)]
    ident = external_identifier([i.identifier() for i in indexes], shown_id(ctx, held))
    version = max((i.version_info for i in indexes), default="")
    parts.append(wire.envelope(type_url=plan.type_url, version_info=version, nonce=_nonce(version),
                               control_plane_identifier=ident))
    return Merged(b"".join(parts), total, [])


def _indexed_ids(splits: Sequence[wire.SynczSplit], indexes: Sequence[wire.SynczIndex | None]) -> list[str] | None:
    """Every resource's node id from the fast indexes of these answers, or None if one is missing."""
    ids: list[str] = []
    for split, index in zip(splits, indexes, strict=True):
        keys = split.ids_of(index) if index is not None else None
        if keys is None:
            return None
        ids += keys
    return ids


def _copies(ids: Sequence[Hashable], counts: Sequence[int]) -> dict[Hashable, list[int]]:
    """Each id listed more than once → its positions, ascending (`counts`: how many ids each answer gave); {} if
    none is."""
    bounds = list(accumulate(counts, initial=0))
    sets = [set(ids[begin:end]) for begin, end in pairwise(bounds)]
    if sum(map(len, sets)) == len(ids):
        # None twice within one answer: those on two answers, by set intersections, and their positions looked for
        # only in the answers that share one (a proxy reconnecting is on two replicas, not on all of them).
        twice: set[Hashable] = set()
        shared: set[int] = set()
        for i, one in enumerate(sets):
            for j in range(i + 1, len(sets)):
                if both := one & sets[j]:
                    twice |= both
                    shared.update((i, j))
        spans = [(bounds[i], bounds[i + 1]) for i in sorted(shared)]
    else:
        twice = {k for k, n in Counter(ids).items() if n > 1}
        spans = [(0, len(ids))]
    owners: dict[Hashable, list[int]] = {}
    for begin, end in spans:
        for g in compress(range(begin, end), map(twice.__contains__, ids[begin:end])):
            owners.setdefault(ids[g], []).append(g)
    return owners


def merge_syncz_split(plan: Plan, answers: Sequence[Answer], ctx: MergeContext) -> Merged | None:
    """Duplicates and scoped callers at C speed: the exact path's rules on resources cut by wire.syncz_split.

    Returns None whenever an answer is unusual (malformed, a wrong type, an unreadable node id); the exact
    reader in merge_syncz then decides, so the two paths always give the same bytes.
    """
    memo = ctx.memo or wire.SynczMemo()
    splits: list[wire.SynczSplit] = []
    indexed: list[wire.SynczIndex | None] = []
    for answer in answers:
        assert answer.body is not None
        early = ctx.early.get(answer.replica.address, False)
        read = ctx.indexes.get(id(answer.body)) if ctx.indexes is not None else None
        index = early if isinstance(early, wire.SynczIndex) else \
            read[1] if read is not None and read[0] is answer.body else None
        if index is None and early is False and not ctx.scope:
            # Unscoped, only ids matter: the fast index reads them (and the cuts) in C, no node bytes needed.
            index = wire.syncz_fast_index(answer.body, memo)
        # The fast index's chain when it read this answer (it steps aside for duplicates): the same cuts.
        split = early if isinstance(early, wire.SynczSplit) else \
            index.split if index is not None and index.split is not None else wire.syncz_split(answer.body, memo)
        if split is None or split.envelope.type_url not in ("", plan.type_url):
            return None
        splits.append(split)
        indexed.append(index)
    facts: list[tuple[str, str]] | None = None
    indexed_ids = None if ctx.scope else _indexed_ids(splits, indexed)
    ids: Sequence[Hashable]
    counts = [s.count for s in splits]
    if indexed_ids is None:
        facts = memo.facts(list(chain.from_iterable(s.nodes for s in splits)))
        if facts is None:
            return None
        ids = list(map(itemgetter(0), facts))
    else:
        # Unscoped, this path runs when the fast index stepped aside, for a duplicate.
        ids = indexed_ids
    # _copies finds them (one set per answer) without a set of all ids first; a scoped call, where they are rare,
    # checks with one set first (cheaper than _copies's sets and intersections when there are none).
    owners = {} if ctx.scope and len(set(ids)) == len(ids) else _copies(ids, counts)
    dropped: list[int] = []  # positions of the copies that lose, ascending
    if owners:
        # A proxy on two replicas (or twice on one): the newest copy, the first of equals (as merge_syncz).
        ends = list(accumulate(counts))  # resource g is in splits[bisect_right(ends, g)]

        def located(g: int) -> tuple[wire.SynczSplit, int]:
            at = bisect_right(ends, g)
            return splits[at], g - (ends[at - 1] if at else 0)

        copies = [g for locs in owners.values() for g in locs]
        decoded = memo.copy_facts([s.resource_field(i) for s, i in map(located, copies)], _copy_facts)
        if decoded is None or any(i is not None and i != ids[g] for g, (i, _) in zip(copies, decoded, strict=True)):
            return None  # a copy the caller decodes under another id: the exact reader rejects its replica
        stamps = {g: stamp for g, (_, stamp) in zip(copies, decoded, strict=True)}
        for locs in owners.values():
            newest = max(locs, key=stamps.__getitem__)
            dropped += [g for g in locs if g != newest]
        dropped.sort()
    if ctx.scope:
        assert facts is not None  # scoped: read above
        # One byte per flag (a list of them is 8 bytes each).
        keep: Sequence[int] = bytes(map(eq, map(itemgetter(1), facts), repeat(ctx.scope)))
        if dropped:
            flags = bytearray(keep)
            for g in dropped:
                flags[g] = False
            keep = flags
        parts = wire.join_kept(splits, keep)
        kept = [sum(keep[at - n : at]) for at, n in zip(accumulate(counts), counts, strict=True)]
    elif dropped:
        parts = wire.join_dropping(splits, dropped)
        kept = [n - (bisect_right(dropped, at - 1) - bisect_right(dropped, at - n - 1))
                for at, n in zip(accumulate(counts), counts, strict=True)]
    else:  # As merge_syncz: with nothing to drop, the replicas' bytes pass through untouched.
        parts = [a.body for a in answers if a.body is not None]
        kept = counts
    views = [s.envelope for s in splits]
    # Kept proxies per replica: only the revision column needs them.
    held = list(zip(answers, kept, strict=True)) if ctx.istiod_column == "revision" else []
    ident = external_identifier([v.identifier() for v in views], shown_id(ctx, held))
    version = _version(views)
    parts.append(wire.envelope(type_url=plan.type_url, version_info=version, nonce=_nonce(version),
                               control_plane_identifier=ident))
    body, count = b"".join(parts), sum(kept)
    # What a scoped caller is shown must be the node the scope read (see wire.one_node): else the exact reader
    # decides (it rejects that replica).
    if ctx.scope and not (all(s.one_node_each for s in splits) or wire.kept_one_node(body, count)):
        return None
    return Merged(body, count, [])


def merge_syncz(plan: Plan, answers: Sequence[Answer], ctx: MergeContext) -> Merged:
    """syncz: every replica's ClientConfigs, each proxy once (the latest update wins), scoped if asked."""
    return _merge_syncz(plan, answers, dataclasses.replace(ctx, indexes={}))


def _merge_syncz(plan: Plan, answers: Sequence[Answer], ctx: MergeContext) -> Merged:
    fast = merge_syncz_fast(plan, answers, ctx)
    if fast is None:
        fast = merge_syncz_split(plan, answers, ctx)
    if fast is not None:
        return fast
    good, bad = _views(answers, plan.type_url)
    # First pass: node ids only (three nested first fields), to find proxies seen on two replicas.
    owners: dict[str, list[tuple[int, int]]] = {}
    for vi, (answer, view) in enumerate(good):
        try:
            ids = [wire.syncz_node_id(view.resource_any(i)) for i in range(len(view.resources))]
            for i in range(len(view.resources)):
                if wire.any_type_url(view.resource_any(i)) != wire.CLIENT_CONFIG_URL:
                    raise wire.WireError(f"resource {i} is not a ClientConfig")
        except wire.WireError as err:
            bad.append((answer, f"malformed syncz resource: {err}"))
            good[vi] = (answer, wire.ResponseView(b""))
            continue
        for i, node_id in enumerate(ids):
            owners.setdefault(node_id, []).append((vi, i))
    views = [v for _, v in good]
    dup = {k: v for k, v in owners.items() if len(v) > 1}
    if not dup and not ctx.scope:
        # The common case: nothing to drop, so the replicas' bytes pass through untouched.
        parts = [v.raw for v in views]
        count = sum(len(v.resources) for v in views)
        held = [(a, len(v.resources)) for a, v in good]
    else:
        # Each copy of a proxy listed twice, as the caller decodes it (None: it does not decode).
        configs = {loc: _copy_config(views[loc[0]].resource_any(loc[1])) for locs in dup.values() for loc in locs}
        renamed = sorted({loc[0] for node_id, locs in dup.items() for loc in locs
                          if (cfg := configs[loc]) is not None and cfg.node.id != node_id})
        if renamed:
            # A copy deduplicated under the id read here (the first) that the caller decodes under another (the
            # last id field): it would drop another proxy's real copy. Its replica is malformed.
            return _without(plan, renamed, "malformed syncz resource: a node id given twice", good, bad, ctx)
        keep: set[tuple[int, int]] = {locs[0] for locs in owners.values()}
        for locs in dup.values():
            keep.discard(locs[0])
            keep.add(max(locs, key=lambda loc: _copy_stamp(configs[loc])))
        if ctx.scope:
            keep = {loc for loc in keep if _namespace(views[loc[0]].resource_any(loc[1])) == ctx.scope}
            two_faced = sorted({vi for vi, i in keep if not wire.one_node(views[vi].resource_any(i))})
            if two_faced:
                # A kept resource whose scope reading is not what the caller decodes: its replica is malformed,
                # and the merge runs again without it (another replica's copy of a proxy may then win).
                return _without(plan, two_faced, "malformed syncz resource: a repeated Any value or ClientConfig node",
                                good, bad, ctx)
        parts = [views[vi].resource_bytes(i) for vi, i in sorted(keep)]
        count = len(parts)
        per_replica = Counter(vi for vi, _ in keep) if ctx.istiod_column == "revision" else Counter[int]()
        held = [(a, per_replica[vi]) for vi, (a, _) in enumerate(good)]
    ident = external_identifier([v.identifier() for v in views], shown_id(ctx, held))
    version = _version(views)
    parts.append(wire.envelope(type_url=plan.type_url, version_info=version, nonce=_nonce(version),
                               control_plane_identifier=ident))
    return Merged(b"".join(parts), count, bad)


# Below every stamp a ClientConfig can carry (int64 seconds, int32 nanos, none at all = 0).
_UNREADABLE = -(2**63) * 1_000_000_000 - 2**31 - 1


def _without(plan: Plan, malformed: Sequence[int], why: str, good: Sequence[tuple[Answer, wire.ResponseView]],
             bad: Rejected, ctx: MergeContext) -> Merged:
    """The merge again without the replicas good[i] for i in `malformed` (rejected with `why`) nor those in `bad`."""
    bad = bad + [(good[vi][0], why) for vi in malformed]
    rejected = {id(a) for a, _ in bad}
    rest = [a for a, _ in good if id(a) not in rejected]
    again = merge_syncz(plan, rest, ctx)
    return Merged(again.body, again.resources, bad + again.rejected)


def _copy_facts(fields: list[bytes]) -> list[tuple[str | None, int]]:
    """(node id, stamp) of each resource field's ClientConfig as the caller decodes it ((None, below every stamp)
    if it does not decode): every copy in one parse, else each on its own (as _copy_config decodes it)."""
    configs: Sequence[csds_pb2.ClientConfig | None] | None = wire.split_client_configs(fields)
    if configs is None:
        configs = [_copy_config(f[value_start:end]) for f in fields
                   for _n, _w, _s, value_start, end in islice(wire.iter_fields(f), 1)]
    return [(None if c is None else c.node.id, _copy_stamp(c)) for c in configs]


def _copy_config(any_bytes: bytes) -> csds_pb2.ClientConfig | None:
    try:
        return wire.client_config(any_bytes)
    except wire.WireError:
        return None


def _copy_stamp(cfg: csds_pb2.ClientConfig | None) -> int:
    # Undecodable: never preferred over a readable copy, even one stamped before 1970.
    return _UNREADABLE if cfg is None else _stamp(cfg)


def _stamp(cfg: csds_pb2.ClientConfig) -> int:
    # Read as the numbers on the wire: ToNanoseconds raised on a stamp out of Timestamp's range (a replica's
    # nanos of 2e9 failed the whole merge), and its checks were most of the dedup's time. Kept as integers: as
    # float seconds, today's stamps less than ~256 ns apart were equal and the older copy (the first) won.
    # A plain loop: the generator and list it replaces were a third of the duplicates' stamp reading.
    newest = None
    for c in cfg.generic_xds_configs:
        if c.HasField("last_updated"):
            t = c.last_updated
            stamp = t.seconds * 1_000_000_000 + t.nanos
            if newest is None or stamp > newest:
                newest = stamp
    return 0 if newest is None else newest


def _namespace(any_bytes: bytes) -> str:
    # The node's, like the id (wire.syncz_node_id): an undecodable node is in no namespace, never shown to a
    # scoped caller; the rest of the ClientConfig is passed through undecoded, as for every other caller.
    return wire.syncz_namespace(any_bytes)


def _holders_first(items: list[_T], answer_of: Callable[[_T], Answer], ctx: MergeContext) -> list[_T]:
    """The holder rule: answers of replicas whose syncz lists the exact id first (stable otherwise)."""
    if not ctx.holders:
        return items
    return sorted(items, key=lambda item: answer_of(item).replica.address not in ctx.holders)


def claims_proxy(plan: Plan, answer: Answer) -> bool:
    """Does this answer claim to be about the requested proxy (non-empty dump, not "not connected")?"""
    if not answer.ok or not answer.body:
        return False
    try:
        view = wire.view_response(answer.body)
    except wire.WireError:
        return False
    if plan.merge is Merge.PROXY_HOLDER:
        return bool(view.resources)
    if len(view.resources) != 1:
        return False
    try:
        body = bytes(any_pb2.Any.FromString(view.resource_any(0)).value)
    except DecodeError:
        return False
    return not body.startswith((NOT_CONNECTED, MUST_PROVIDE))


def merge_proxy_holder(plan: Plan, answers: Sequence[Answer], ctx: MergeContext) -> Merged:
    """config_dump: the replica that holds the proxy answers non-empty; pass its bytes through."""
    good, bad = _views(answers, plan.type_url)
    for answer, view in _holders_first(good, lambda g: g[0], ctx):
        if view.resources:
            try:  # upb checks every Any's framing (not the dumps inside): the caller must be able to read it
                discovery_pb2.DiscoveryResponse.FromString(view.raw)
            except DecodeError as err:
                bad.append((answer, f"malformed config_dump answer: {err}"))
                continue
            return Merged(view.raw, len(view.resources), bad)
    # Nobody holds it: istiod's answer for an unknown proxy is an empty response, not an error.
    views = [v for _, v in good]
    version = _version(views)
    return Merged(wire.envelope(type_url=plan.type_url, version_info=version, nonce=_nonce(version)), 0, bad)


def _debug_bodies(
    plan: Plan, answers: Sequence[Answer]
) -> tuple[list[tuple[Answer, wire.ResponseView, bytes]], Rejected]:
    good, bad = _views(answers, plan.type_url)
    out = []
    for answer, view in good:
        if len(view.resources) != 1:
            bad.append((answer, f"expected one debug resource, got {len(view.resources)}"))
            continue
        try:
            msg = any_pb2.Any.FromString(view.resource_any(0))
        except DecodeError as err:
            bad.append((answer, f"malformed debug resource: {err}"))
            continue
        out.append((answer, view, bytes(msg.value)))
    return out, bad


def debug_response(plan: Plan, views: Sequence[wire.ResponseView], body: bytes) -> bytes:
    """A DiscoveryResponse carrying one istio.io/debug body, as istiod wraps it."""
    version = _version(views)
    resp = wire.envelope(type_url=plan.type_url, version_info=version, nonce=_nonce(version))
    res = any_pb2.Any(type_url=DEBUG, value=body).SerializeToString()
    # Field 2 (resources), length-delimited: hand-built so the body is copied once.
    return resp + b"\x12" + _varint_bytes(len(res)) + res


def _varint_bytes(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _json(body: bytes) -> object:
    return json.loads(body)


def _is_json(body: bytes) -> bool:
    try:
        json.loads(body)
    except (ValueError, RecursionError):
        return False
    return True


def _combine_json(kind: Merge, values: list[object]) -> object:
    if kind is Merge.JSON_ARRAY:
        merged_list: list[object] = []
        for v in values:
            if not isinstance(v, list):
                raise ValueError("not a JSON array")
            merged_list.extend(v)
        return merged_list
    if kind is Merge.JSON_CLIENTS:
        total, clients = 0, list[object]()
        for v in values:
            if not isinstance(v, dict):
                raise ValueError("not a JSON object")
            count, listed = v.get("totalClients", 0), v.get("clients") or []
            if not isinstance(count, int) or not isinstance(listed, list):
                raise ValueError("totalClients must be a number and clients a list")
            total += count
            clients.extend(listed)
        return {"totalClients": total, "clients": clients}
    merged: dict[str, object] = {}
    for v in values:
        if not isinstance(v, dict):
            raise ValueError("not a JSON object")
        merged.update(v)
    return merged


def merge_debug(plan: Plan, answers: Sequence[Answer], ctx: MergeContext) -> Merged:
    """istio.io/debug: the bodies merged per the plan's rule (JSON array/object/clients, holder, any one)."""
    bodies, bad = _debug_bodies(plan, answers)
    views = [v for _, v, _ in bodies]
    if plan.merge in (Merge.JSON_ARRAY, Merge.JSON_CLIENTS, Merge.JSON_OBJECT):
        values, used = [], []
        for answer, view, body in bodies:
            try:
                value = _json(body)
                _combine_json(plan.merge, [value])  # shape check per replica, so one bad body stays contained
            except (ValueError, TypeError, RecursionError) as err:
                bad.append((answer, f"debug body of {plan.debug_path!r} is not the expected JSON: {err}"))
                continue
            values.append(value)
            used.append(view)
        if not values:
            return Merged(debug_response(plan, views, bodies[0][2] if bodies else b""), len(bodies), bad)
        merged = json.dumps(_combine_json(plan.merge, values), indent=2).encode()
        return Merged(debug_response(plan, used, merged), 1, bad)
    if plan.merge is Merge.DEBUG_PROXY:
        claimed = [b for b in bodies if not b[2].startswith((NOT_CONNECTED, MUST_PROVIDE))]
        if len(claimed) > 1:
            # Two replicas claim the proxy (a look-alike id, a reconnect window, or one answering garbage):
            # the holder's answer first, then a body that is the JSON istiod's proxy-scoped handlers write.
            claimed.sort(key=lambda b: (bool(ctx.holders) and b[0].replica.address not in ctx.holders,
                                        not _is_json(b[2])))
        holders = [(view, body) for _, view, body in claimed]
        if holders:
            return Merged(debug_response(plan, [holders[0][0]], holders[0][1]), 1, bad)
    # ANY_ONE, or nobody holds the proxy: the first answer as istiod gave it.
    if not bodies:
        return Merged(debug_response(plan, views, b""), 0, bad)
    return Merged(debug_response(plan, views[:1], bodies[0][2]), 1, bad)


def merge_not_found(plan: Plan, answers: Sequence[Answer], ctx: MergeContext) -> Merged:
    """A debug path we do not serve: istiod's own 404 body, whatever replicas said (none are asked)."""
    return Merged(debug_response(plan, [], NOT_FOUND), 1, [])


RULES: dict[Merge, Callable[[Plan, Sequence[Answer], MergeContext], Merged]] = {
    Merge.SYNCZ: merge_syncz,
    Merge.PROXY_HOLDER: merge_proxy_holder,
    Merge.JSON_ARRAY: merge_debug,
    Merge.JSON_CLIENTS: merge_debug,
    Merge.JSON_OBJECT: merge_debug,
    Merge.DEBUG_PROXY: merge_debug,
    Merge.ANY_ONE: merge_debug,
    Merge.NOT_FOUND: merge_not_found,
}


def merge(plan: Plan, answers: Sequence[Answer], ctx: MergeContext) -> Merged:
    """The merged response of the successful answers, by the plan's rule; malformed answers come back rejected."""
    return RULES[plan.merge](plan, [a for a in answers if a.ok], ctx)


__all__ = [
    "MUST_PROVIDE",
    "NOT_CONNECTED",
    "NOT_FOUND",
    "RULES",
    "MergeContext",
    "Merged",
    "claims_proxy",
    "debug_response",
    "external_identifier",
    "merge",
    "merge_syncz_fast",
    "shown_id",
]
