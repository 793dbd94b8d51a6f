"""The syncz fast path (C-speed index) must give exactly what the field-by-field reader gives, or step aside.

Correctness only: the speed is measured by bench/, not asserted here.
"""

from __future__ import annotations

import random

import pytest
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from istioctl_proxy import merge, wire
from istioctl_proxy.discovery import Replica
from istioctl_proxy.model import Answer
from istioctl_proxy.policy import SYNCZ, plan_request
from istioctl_proxy.sim.simulator import SimProxy, SimReplica, make_mesh

PLAN = plan_request(SYNCZ, [])
CTX = merge.MergeContext()


def answers_of(replicas: list[SimReplica], scope: str = "") -> list[Answer]:
    return [Answer(Replica(f"10.0.0.{i}:15012"), r.syncz(scope)) for i, r in enumerate(replicas)]


def exact(
    answers: list[Answer], ctx: merge.MergeContext = CTX, monkeypatch: pytest.MonkeyPatch | None = None
) -> merge.Merged:
    assert monkeypatch is not None
    with monkeypatch.context() as m:
        m.setattr(merge, "merge_syncz_fast", lambda *_a: None)
        return merge.merge(PLAN, answers, ctx)


def canonical(body: bytes) -> bytes:
    resp = discovery_pb2.DiscoveryResponse.FromString(body)
    resp.nonce = ""
    return resp.SerializeToString(deterministic=True)


@pytest.mark.parametrize("replicas,proxies,seed", [(1, 1, 1), (1, 50, 2), (3, 100, 3), (5, 333, 4), (5, 0, 5)])
def test_fast_path_equals_exact_reader(replicas: int, proxies: int, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    answers = answers_of(make_mesh(replicas, proxies, seed=seed))
    fast = merge.merge_syncz_fast(PLAN, [a for a in answers if a.ok], CTX)
    assert fast is not None, "a regular mesh must take the fast path"
    slow = exact(answers, monkeypatch=monkeypatch)
    assert fast.resources == slow.resources == proxies
    assert canonical(fast.body) == canonical(slow.body)
    assert not fast.rejected and not slow.rejected


def test_node_keys_are_the_node_ids() -> None:
    replica = make_mesh(1, 40, seed=9)[0]
    index = wire.syncz_fast_index(replica.syncz(""))
    assert index is not None and index.count == 40
    assert [k[1:].decode() for k in index.node_keys] == [p.id for p in replica.proxies]
    assert all(k[0] == len(k) - 1 for k in index.node_keys)


def _mesh_with(extra: dict[int, list[SimProxy]], seed: int = 11) -> list[SimReplica]:
    mesh = make_mesh(3, 30, seed=seed)
    for i, proxies in extra.items():
        mesh[i].proxies.extend(proxies)
    return mesh


def test_duplicates_step_aside_and_are_deduplicated(monkeypatch: pytest.MonkeyPatch) -> None:
    mesh = _mesh_with({0: [SimProxy("moving", "ns-1", states={"CDS": "STALE"}, updated=1e6)],
                       2: [SimProxy("moving", "ns-1", states={"CDS": "SYNCED"}, updated=2e6)]})
    answers = answers_of(mesh)
    assert merge.merge_syncz_fast(PLAN, answers, CTX) is None
    merged = merge.merge(PLAN, answers, CTX)
    assert merged.resources == 31
    assert canonical(merged.body) == canonical(exact(answers, monkeypatch=monkeypatch).body)


def test_duplicate_within_one_replica_steps_aside() -> None:
    p = SimProxy("twice", "ns-0", states={"CDS": "SYNCED"})
    answers = answers_of(_mesh_with({1: [p, p]}))
    assert merge.merge_syncz_fast(PLAN, answers, CTX) is None
    assert merge.merge(PLAN, answers, CTX).resources == 31


def test_a_resource_quoting_a_client_config_header_cannot_fool_the_index(monkeypatch: pytest.MonkeyPatch) -> None:
    # An error detail carrying the exact bytes the regex looks for, including a fake node id that collides
    # with a real proxy: the fast index must refuse and let the exact reader decide.
    url = wire.CLIENT_CONFIG_URL.decode()
    victim = make_mesh(3, 30, seed=11)[1].proxies[0].id
    fake = "\n" + chr(len(url)) + url + "\x12\x05\n\x03\n" + chr(len(victim)) + victim
    sneaky = SimProxy("sneaky", "ns-2", states={"LDS": "ERROR"}, error=fake)
    answers = answers_of(_mesh_with({0: [sneaky]}))
    assert wire.syncz_fast_index(answers[0].body or b"") is None
    merged = merge.merge(PLAN, answers, CTX)
    assert merged.resources == 31
    assert canonical(merged.body) == canonical(exact(answers, monkeypatch=monkeypatch).body)


def test_long_node_ids_take_the_exact_path() -> None:
    long_one = SimProxy("p" * 200, "ns-0", states={"CDS": "SYNCED"})
    answers = answers_of(_mesh_with({0: [long_one]}))
    assert wire.syncz_fast_index(answers[0].body or b"") is None
    assert merge.merge(PLAN, answers, CTX).resources == 31


def _raw_resource(any_msg: any_pb2.Any) -> bytes:
    return discovery_pb2.DiscoveryResponse(resources=[any_msg]).SerializeToString()


def test_non_utf8_node_id_is_rejected_as_before() -> None:
    # ClientConfig{node{id: b"\xff\xfe"}} packed by hand: protobuf would refuse to build it.
    node = b"\n\x02\xff\xfe"
    cfg = b"\n" + bytes([len(node)]) + node
    bad = _raw_resource(any_pb2.Any(type_url=wire.CLIENT_CONFIG_URL.decode(), value=cfg))
    good = make_mesh(2, 4, seed=3)
    answers = [Answer(Replica("a:1"), bad + good[0].syncz("")), Answer(Replica("b:1"), good[1].syncz(""))]
    assert wire.syncz_fast_index(answers[0].body or b"") is None
    merged = merge.merge(PLAN, answers, CTX)
    assert [why for _, why in merged.rejected] and merged.resources == 2


def test_malformed_and_wrong_type_answers_are_rejected_as_before() -> None:
    good = make_mesh(2, 4, seed=3)
    wrong_type = discovery_pb2.DiscoveryResponse(type_url="istio.io/debug/config_dump").SerializeToString()
    answers = [Answer(Replica("a:1"), b"\x12\xff\xff\xff"), Answer(Replica("b:1"), wrong_type),
               Answer(Replica("c:1"), good[0].syncz("")), Answer(Replica("d:1"), good[1].syncz(""))]
    merged = merge.merge(PLAN, answers, CTX)
    assert len(merged.rejected) == 2 and merged.resources == 4


def test_scoped_callers_always_take_the_exact_path() -> None:
    answers = answers_of(make_mesh(3, 30, seed=5))
    scoped = merge.MergeContext(scope="ns-1")
    assert merge.merge_syncz_fast(PLAN, answers, scoped) is None
    merged = merge.merge(PLAN, answers, scoped)
    assert 0 < merged.resources < 30


def test_random_meshes_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(42)
    for _ in range(20):
        mesh = make_mesh(rng.randint(1, 5), rng.randint(0, 60), seed=rng.randrange(10**6))
        if rng.random() < 0.3 and len(mesh) > 1 and mesh[0].proxies:
            mesh[-1].proxies.append(mesh[0].proxies[0])  # a proxy seen by two replicas
        answers = answers_of(mesh)
        fast_or_exact = merge.merge(PLAN, answers, CTX)
        assert canonical(fast_or_exact.body) == canonical(exact(answers, monkeypatch=monkeypatch).body)
