"""Red team of the canary (issue 16) and syncz split (issue 14) code: each test reproduces one attack.

Tests marked xfail(strict) are open findings (docs/security.md, "Red team: canary revisions and the split path").
"""

from __future__ import annotations

import pytest
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.status.v3 import csds_pb2
from google.protobuf import any_pb2

from istioctl_proxy import merge, wire
from istioctl_proxy.discovery import Replica
from istioctl_proxy.model import Answer
from istioctl_proxy.policy import SYNCZ, plan_request

PLAN = plan_request(SYNCZ, [])
MiB = 1024 * 1024


def _node(pod: str, namespace: str, pad: int = 0) -> bytes:
    cc = csds_pb2.ClientConfig()
    cc.node.id = f"{pod}.{namespace}"
    cc.node.metadata.fields["NAMESPACE"].string_value = namespace
    if pad:
        cc.node.metadata.fields["LABELS"].string_value = "x" * pad
    return cc.node.SerializeToString()


def test_the_split_memo_is_bounded_in_bytes_not_only_in_entries() -> None:
    # A node is the proxy's own metadata (labels, annotations): large, and new on every reconnect. 200k
    # entries of 256 KiB would be 50 GB held across calls; 300 of them held 75 MiB before the fix.
    memo = wire.SynczMemo()
    for call in range(300):
        assert memo.facts([_node(f"churn-{call}", "ns-1", pad=256 * 1024)]) is not None
    held = sum(map(len, memo._facts))
    assert held <= memo.max_bytes <= 64 * MiB


def test_one_answer_larger_than_the_memo_is_read_but_not_remembered() -> None:
    memo = wire.SynczMemo(max_bytes=1024)
    nodes = [_node(f"p{i}", "ns-1", pad=100) for i in range(20)]
    assert memo.facts(nodes) == [(f"p{i}.ns-1", "ns-1") for i in range(20)]
    assert sum(map(len, memo._facts)) <= 1024


def _client_config(pod: str, namespace: str) -> bytes:
    cc = csds_pb2.ClientConfig()
    cc.node.id = f"{pod}.{namespace}"
    cc.node.metadata.fields["NAMESPACE"].string_value = namespace
    return cc.SerializeToString()


def _any(*values: bytes) -> bytes:
    # An Any whose value field is written once per value: protobuf keeps the last one.
    head = any_pb2.Any(type_url=wire.CLIENT_CONFIG_URL.decode()).SerializeToString()
    return head + b"".join(any_pb2.Any(value=v).SerializeToString() for v in values)


def _response(*anys: bytes) -> bytes:
    body = discovery_pb2.DiscoveryResponse(type_url=SYNCZ, version_info="v").SerializeToString()
    return body + b"".join(b"\x12" + wire._varint_bytes(len(a)) + a for a in anys)


def _as_the_caller_reads_it(body: bytes) -> list[tuple[str, str]]:
    out = []
    for res in discovery_pb2.DiscoveryResponse.FromString(body).resources:
        cc = csds_pb2.ClientConfig()
        assert res.Unpack(cc)
        out.append((cc.node.id, cc.node.metadata.fields["NAMESPACE"].string_value))
    return out


@pytest.mark.parametrize("path", ["split", "exact"])
@pytest.mark.parametrize("shape", ["any value twice", "client config node twice"])
def test_a_scoped_caller_sees_only_its_namespace_as_it_decodes_it(
    path: str, shape: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A hostile (or 1.26/1.27-skewed and compromised) replica: a resource the scope reads as ns-1's but
    # that istioctl decodes as another namespace's proxy.
    own = _client_config("a", "ns-1")
    other = _client_config("secret", "ns-2")
    sneaky = _any(own, other) if shape == "any value twice" else _any(own + other)
    body = _response(_any(_client_config("ok", "ns-1")), sneaky)
    if path == "exact":
        monkeypatch.setattr(merge, "merge_syncz_fast", lambda *_a: None)
        monkeypatch.setattr(merge, "merge_syncz_split", lambda *_a: None)
    honest = _response(_any(_client_config("b", "ns-1")))
    answers = [Answer(Replica("10.0.0.1:15012"), body), Answer(Replica("10.0.0.2:15012"), honest)]
    got = merge.merge(PLAN, answers, merge.MergeContext(scope="ns-1"))
    assert _as_the_caller_reads_it(got.body) == [("b.ns-1", "ns-1")]
    assert [(a.replica.address, why) for a, why in got.rejected] == \
        [("10.0.0.1:15012", "malformed syncz resource: a repeated Any value or ClientConfig node")]
    # Unscoped callers see every namespace anyway: their answers pass through as before.
    assert merge.merge(PLAN, answers, merge.MergeContext()).resources == 3


async def test_one_caller_with_many_unread_streams_does_not_starve_another() -> None:
    import asyncio

    from istioctl_proxy.budget import SendBudget

    # One caller: 30 streams that never read (each answer is cut after slow_reader_seconds, and the stream
    # asks again at once), every answer as large as the budget (a big mesh's syncz against 48 MiB).
    cuts: list[str] = []
    budget = SendBudget(10, slow_reader_seconds=0.05, on_cut=cuts.append)

    async def never_reads() -> None:
        while True:
            async with budget.hold("hog", 10, 600.0) as evicted:
                await evicted

    hogs = [asyncio.create_task(never_reads()) for _ in range(30)]
    try:
        while budget.waiting("hog") < 29:  # every hog but the holder queued
            await asyncio.sleep(0)
        # Another caller's one answer. It used to wait behind them and be pushed back each time it woke (still
        # refused after 3 s, and after --send-timeout). Now it is the very next grant: the hog's answer is
        # cut for it (counted as a share cut), and the room goes to the caller not served yet.
        before, cut_before = budget.grants, len(cuts)
        async with budget.hold("other", 10, 600.0):
            assert budget.grants == before + 1
            assert budget.held("hog") == 0
        # (On a loaded machine the other caller's own hold can be cut too, if its task resumes late.)
        assert cuts[cut_before:cut_before + 1] == ["send_budget_caller_share"]
    finally:
        pending = set(hogs)
        while pending:  # Python 3.11's wait_for can swallow a cancel that races its wake-up: cancel again
            for hog in pending:
                hog.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.1)


# -- Canary revisions: what a pod's istio.io/rev label can do (issue 16) ------------------------------------


def test_refusal_counts_of_gone_revisions_are_dropped() -> None:
    # Anyone who can run a pod labelled app=istiod in the istio namespace picks its istio.io/rev: with
    # --all-revisions every new label made a refusal series that stayed for good.
    from istioctl_proxy.metrics import Metrics

    metrics = Metrics()
    for i in range(50):
        metrics.upstream_tls_refused.labels(f"churn-{i}", "san").inc()
        metrics.set_revisions({"default": (1, 1), f"churn-{i}": (1, 0)})
    metrics.set_revisions({"default": (1, 1)})
    text = metrics.exposition("")[0].decode()
    assert "churn-" not in text


async def test_a_pod_of_an_unknown_revision_does_not_take_the_proxy_out_of_service() -> None:
    from istioctl_proxy.admin import Probe, Readiness
    from istioctl_proxy.discovery import ReplicaSet, StaticSource
    from istioctl_proxy.metrics import Metrics
    from istioctl_proxy.tls import UpstreamTLS
    from istioctl_proxy.upstream import UpstreamPool

    class Probed(Readiness):
        async def _probe(self, replica: Replica) -> Probe:
            up = replica.revision != "evil"  # the attacker's pod: Ready to Kubernetes, no istiod behind it
            return Probe(replica, up, "" if up else "TLS refused: certificate names no DNS name")

    # What --all-revisions finds: both real revisions, and a pod someone labelled app=istiod, istio.io/rev=evil.
    replicas = ReplicaSet([StaticSource(["10.0.0.1:1@default", "10.0.0.2:1@1-31", "10.0.0.9:1@evil"],
                                        per_replica_san=True)])
    readiness = Probed(replicas, UpstreamPool(UpstreamTLS(plaintext=True), max_message_bytes=1 << 20), Metrics(),
                       revisions=(), policy="every-revision")
    await replicas.start()
    try:
        if replicas.version == 0:
            await replicas.wait_changed(0)
        await readiness.probe_once()
    finally:
        await replicas.stop()
    # Every real revision serves: the proxy can answer everyone, yet it goes unready (out of its Service).
    assert readiness.ready, readiness.reason
