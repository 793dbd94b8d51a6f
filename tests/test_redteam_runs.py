"""Red team stop 22: the syncz merge's memo (SynczMemo: node facts, copy facts) shared by every caller of one
Aggregator, as calls follow each other while the mesh changes. Each test reproduces one attack; every answer through
the shared memo is compared with a fresh exact merge (the field-by-field reader: merge_syncz_fast and
merge_syncz_split off) of the same answers. (The runs this red team attacked, SynczMemo.node_run and id_run, were
removed: real istiod never repeats one, finding R1.)

Findings and results: docs/security.md, "Attacks tried: remembered merge runs (red team stop 22)".
"""

from __future__ import annotations

import random
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from envoy.service.discovery.v3 import discovery_pb2

from istioctl_proxy import merge, wire
from istioctl_proxy.discovery import Replica
from istioctl_proxy.model import Answer
from istioctl_proxy.policy import SYNCZ, plan_request
from istioctl_proxy.sim.simulator import SimProxy, SimReplica, make_mesh

PLAN = plan_request(SYNCZ, [])
MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def fixed_nonce(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every merged answer gets the same nonce, so that the paths can be compared byte for byte."""
    monkeypatch.setattr(merge, "_nonce", lambda *_a: "n")


def exact(answers: list[Answer], ctx: merge.MergeContext, monkeypatch: pytest.MonkeyPatch) -> merge.Merged:
    """The reference: a fresh memo, the exact reader alone."""
    with monkeypatch.context() as m:
        m.setattr(merge, "merge_syncz_fast", lambda *_a: None)
        m.setattr(merge, "merge_syncz_split", lambda *_a: None)
        return merge.merge(PLAN, answers, merge.MergeContext(scope=ctx.scope, istiod_column=ctx.istiod_column))


def outcome(got: merge.Merged) -> tuple[bytes, int, list[tuple[str, str]]]:
    return got.body, got.resources, [(a.replica.address, why) for a, why in got.rejected]


def through(
    memo: wire.SynczMemo, answers: list[Answer], scope: str, early: bool, column: str = "external"
) -> merge.Merged:
    """One call as the Aggregator makes it: the shared memo, each answer read early if asked."""
    ctx = merge.MergeContext(scope=scope, memo=memo, istiod_column=column)
    if early:
        for answer in answers:
            merge.index_early(PLAN, ctx, answer)
    return merge.merge(PLAN, answers, ctx)


def answers_of(bodies: list[bytes]) -> list[Answer]:
    return [Answer(Replica(f"10.0.0.{i + 1}:15012", revision=f"rev-{i % 2}"), b) for i, b in enumerate(bodies)]


def _edited(body: bytes, rng: random.Random) -> bytes:
    if not body:
        return b"\x12\x01"
    edited = bytearray(body)
    at = rng.randrange(len(edited))
    edited[at] = rng.randrange(256)
    return bytes(edited)


def _mesh_calls(seed: int, calls: int) -> Iterator[tuple[list[bytes], str, bool, str]]:
    """A seeded sequence of calls: (each replica's body, scope, read early, ISTIOD column) while the mesh changes
    and the answers are cut, ordered, dropped and poisoned differently from call to call."""
    rng = random.Random(seed)
    mesh = make_mesh(3, 30, seed=seed)
    everyone = [p for r in mesh for p in r.proxies]
    # Two proxies on two replicas each (reconnecting), one with equal stamps (the tie: the first copy wins).
    for n, k in ((0, 1), (4, 2)):
        p = mesh[0].proxies[n]
        mesh[k].proxies.insert(
            2, SimProxy(p.pod, p.namespace, states={"LDS": "STALE"}, updated=p.updated + (0.0 if n == 0 else 10.0))
        )
    hostile_toggle = False
    for _ in range(calls):
        op = rng.random()
        everyone = [p for r in mesh for p in r.proxies]
        if op < 0.15:  # a copy's stamp flips: the same nodes, another copy wins
            p = rng.choice(everyone)
            p.updated += rng.choice([-100.0, 0.0, 100.0])
        elif op < 0.25:  # a proxy moves to a namespace of the same length: the same ids, other node bytes
            rng.choice(everyone).namespace = rng.choice(["ns-0", "ns-1", "ns-2", "ns-3"])
        elif op < 0.35:  # the same node list cut elsewhere: the last proxy of one replica first on the next
            i = rng.randrange(len(mesh) - 1)
            if mesh[i].proxies:
                mesh[i + 1].proxies.insert(0, mesh[i].proxies.pop())
        elif op < 0.42:  # a proxy leaves, or arrives (sometimes as a copy of one already listed)
            r = rng.choice(mesh)
            if r.proxies and rng.random() < 0.5:
                r.proxies.pop(rng.randrange(len(r.proxies)))
            else:
                q = rng.choice(everyone)
                r.proxies.insert(
                    rng.randint(0, len(r.proxies)),
                    SimProxy(
                        q.pod if rng.random() < 0.6 else f"new-{rng.randrange(10**6)}",
                        q.namespace,
                        states={"CDS": "SYNCED"},
                        updated=q.updated + rng.choice([-1.0, 0.0, 1.0]),
                    ),
                )
        for r in mesh:
            r.invalidate()
        bodies = [r.syncz("") for r in mesh]
        shape = rng.random()
        if shape < 0.15:  # the same replicas in another order: the same nodes, other positions
            rng.shuffle(bodies)
        elif shape < 0.25:  # one replica answers nothing (no proxy connected to it)
            bodies[rng.randrange(len(bodies))] = b""
        elif shape < 0.35:  # fewer replicas answer
            bodies.pop(rng.randrange(len(bodies)))
        elif shape < 0.5:  # a hostile replica alternating an honest and a poisoned answer
            hostile_toggle = not hostile_toggle
            if hostile_toggle:
                bodies[0] = _edited(bodies[0], rng)
        elif shape < 0.55:  # an answer's resources concatenated as one node list of another cut (two replicas' in one)
            bodies = [bodies[0] + bodies[1], *bodies[2:]]
        scope = rng.choice(["", "", "ns-1", "ns-1", "ns-2", "ns-3", "nowhere", "ids", "owners", "keep ns-1"])
        yield bodies, scope, rng.random() < 0.5, rng.choice(["external", "external", "revision"])


@pytest.mark.parametrize("seed", [2201, 2202, 2203])
def test_random_calls_through_one_memo_agree_with_a_fresh_exact_merge(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    memo = wire.SynczMemo()
    for step, (bodies, scope, early, column) in enumerate(_mesh_calls(seed, 150)):
        answers = answers_of(bodies)
        got = through(memo, answers, scope, early, column)
        want = exact(answers, merge.MergeContext(scope=scope, istiod_column=column), monkeypatch)
        assert outcome(got) == outcome(want), (step, scope)


def test_a_caller_of_one_namespace_then_another_through_one_memo_sees_only_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # ns-1 then ns-2 then ns-1 through one memo, the same nodes: each sees exactly its namespace's proxies.
    memo = wire.SynczMemo()
    mesh = make_mesh(3, 40, seed=5)
    answers = answers_of([r.syncz("") for r in mesh])
    for scope in ("ns-1", "ns-2", "ns-1", "", "ns-2", "ns-1"):
        got = through(memo, answers, scope, early=False)
        shown = {r.value for r in discovery_pb2.DiscoveryResponse.FromString(got.body).resources}
        want = exact(answers, merge.MergeContext(scope=scope), monkeypatch)
        assert outcome(got) == outcome(want)
        if scope:
            assert got.resources == 10 and all(scope.encode() in v for v in shown)


@dataclass
class _SameId(SimProxy):
    """A proxy whose node id stays while its NAMESPACE metadata moves (ids are the replicas' strings)."""

    fixed_id: str = ""

    @property
    def id(self) -> str:
        return self.fixed_id


def test_the_same_ids_in_other_namespaces_do_not_reuse_a_scopes_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    # Equal id lists, other namespaces: a scope's keep flags follow the nodes' bytes, not their ids. A copy on two
    # replicas makes the duplicates non-trivial.
    memo = wire.SynczMemo()
    replicas = [SimReplica(f"istiod-{i}") for i in range(2)]
    for n in range(20):
        replicas[n % 2].proxies.append(
            _SameId(f"p{n}", f"ns-{n % 2 + 1}", fixed_id=f"p{n}.fixed", states={"CDS": "SYNCED"}, updated=1e9 + n)
        )
    replicas[1].proxies.append(_SameId("p0", "ns-1", fixed_id="p0.fixed", states={"LDS": "SYNCED"}, updated=2e9))
    for flip in range(4):
        for p in (p for r in replicas for p in r.proxies):
            p.namespace = "ns-1" if (int(p.pod[1:]) + flip) % 2 else "ns-2"
        for r in replicas:
            r.invalidate()
        answers = answers_of([r.syncz("") for r in replicas])
        for scope in ("ns-1", "", "ns-2"):
            got = through(memo, answers, scope, early=bool(flip % 2))
            assert outcome(got) == outcome(exact(answers, merge.MergeContext(scope=scope), monkeypatch))
            if scope:
                shown = discovery_pb2.DiscoveryResponse.FromString(got.body).resources
                assert len(shown) == 10 and all(scope.encode() in r.value for r in shown)


def test_a_replica_rejected_in_the_second_call_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # Call 1: every replica regular (its facts are remembered). Call 2: one replica's answer malformed (rejected by
    # the exact reader), the others the same bytes: call 1's readings must not stand in for call 2's nodes.
    memo = wire.SynczMemo()
    mesh = make_mesh(3, 30, seed=13)
    good = [r.syncz("") for r in mesh]
    for scope in ("ns-1", "", "ns-1"):
        for bodies in (good, [good[0], good[1][:-3], good[2]], good, [good[0], b"\x12\x05\x0a\x03abc", good[2]]):
            answers = answers_of(bodies)
            got = through(memo, answers, scope, early=True)
            assert outcome(got) == outcome(exact(answers, merge.MergeContext(scope=scope), monkeypatch))


def _big_node_mesh(nodes: int, pad: int, tag: str) -> list[bytes]:
    """Replica bodies listing `nodes` proxies whose nodes carry `pad` bytes of labels (CLUSTER_ID stands in)."""
    replicas = [SimReplica(f"istiod-{i}") for i in range(3)]
    for n in range(nodes):
        replicas[n % 3].proxies.append(
            SimProxy(f"{tag}-{n:06d}", f"ns-{n % 4}", cluster_id="c" * pad, states={"CDS": "SYNCED"}, updated=1e9)
        )
    return [r.syncz("") for r in replicas]


def test_the_memo_holds_no_more_than_its_byte_bound() -> None:
    # 30k proxies of ~1 KiB nodes (labels and annotations), meshes alternating (two Aggregator callers of another
    # replica set, or a churn window): what the memo holds across calls against max_bytes (64 MiB by default, the
    # documented bound of the memo's keys; the values, ids and namespaces, beside them).
    memo = wire.SynczMemo(max_bytes=32 * MiB)
    meshes = [_big_node_mesh(30_000, 900 + k, f"m{k}") for k in range(3)]
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        for k in (0, 1, 2, 0, 1):
            merge.merge(PLAN, answers_of(meshes[k]), merge.MergeContext(scope="ns-1", memo=memo))
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The memo's keys are bounded by max_bytes; the values and the dicts' slots are less than the ~1 KiB keys.
    assert held - base <= 2 * memo.max_bytes + 8 * MiB, f"{(held - base) / MiB:.0f} MiB held"
