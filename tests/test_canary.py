"""Canary upgrades without a mesh: entries, flags, the per-replica SAN, the merged identifier and readiness.

The real thing (two pilot-discovery revisions, real istioctl, real kube-apiserver) is tests/e2e/test_canary.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from envoy.service.discovery.v3 import discovery_pb2

from istioctl_proxy import merge
from istioctl_proxy.admin import Probe, Readiness
from istioctl_proxy.app import sources_of
from istioctl_proxy.config import Config, add_serve_flags, from_args
from istioctl_proxy.discovery import DnsSource, Entry, Replica, ReplicaSet, StaticSource, parse_entry
from istioctl_proxy.errors import ConfigError
from istioctl_proxy.metrics import Metrics
from istioctl_proxy.model import Answer
from istioctl_proxy.policy import SYNCZ, plan_request
from istioctl_proxy.sim.simulator import make_mesh
from istioctl_proxy.tls import UpstreamTLS
from istioctl_proxy.upstream import UpstreamPool

NS = "istio-system"
DEFAULT_SAN, CANARY_SAN = f"istiod.{NS}.svc", f"istiod-1-31.{NS}.svc"


def cfg_of(tmp_path: Path, *args: str) -> Config:
    ca = tmp_path / "root.pem"
    ca.write_text("x")
    p = argparse.ArgumentParser()
    add_serve_flags(p, {})
    return from_args(p.parse_args(["--plaintext", "--istiod-ca", str(ca), *args]), {})


def test_entries_name_their_revision_and_san() -> None:
    assert parse_entry("10.0.0.1:15012") == Entry("10.0.0.1:15012")
    assert parse_entry("10.0.0.1:15012@1-31") == Entry("10.0.0.1:15012", "1-31")
    assert parse_entry("[fd00::1]:15012@1-31=x.svc") == Entry("[fd00::1]:15012", "1-31", "x.svc")
    assert parse_entry("istiod.istio-system.svc:15012=istiod.istio-system.svc").san == DEFAULT_SAN
    for bad in ("10.0.0.1:15012@", "10.0.0.1:15012@Canary", "10.0.0.1:15012=", "10.0.0.1@1-31", "x:99999@a"):
        with pytest.raises(ValueError):
            parse_entry(bad)


def test_single_revision_keeps_the_proxy_wide_san(tmp_path: Path) -> None:
    """The old single-value --revision: same SAN as before, entries untouched, --istiod-san still wins."""
    cfg = cfg_of(tmp_path, "--istiod", "10.0.0.1:15012", "--revision", "canary")
    assert cfg.revisions == ("canary",) and cfg.san == f"istiod-canary.{NS}.svc" and not cfg.multi_revision
    (source,) = sources_of(cfg)
    assert isinstance(source, StaticSource)
    assert source.replicas() == [Replica("10.0.0.1:15012", "static", revision="canary")]
    cfg = cfg_of(tmp_path, "--istiod", "10.0.0.1:15012", "--revision", "canary", "--istiod-san", "x.example")
    assert cfg.san == "x.example"
    assert cfg_of(tmp_path, "--istiod", "10.0.0.1:15012").san == DEFAULT_SAN


def test_several_revisions_give_each_replica_its_own_san(tmp_path: Path) -> None:
    cfg = cfg_of(tmp_path, "--revision", "default,1-31", "--istiod",
                 "10.0.0.1:15012@default,10.0.0.2:15012@1-31,10.0.0.3:15012=custom.example",
                 "--istiod-dns", "istiod-1-31.istio-system.svc:15012@1-31")
    assert cfg.multi_revision
    static, dns = sources_of(cfg)
    assert isinstance(static, StaticSource) and isinstance(dns, DnsSource)
    assert [(r.address, r.revision, r.san) for r in static.replicas()] == [
        ("10.0.0.1:15012", "default", DEFAULT_SAN), ("10.0.0.2:15012", "1-31", CANARY_SAN),
        ("10.0.0.3:15012", "", "custom.example")]
    assert (dns.replica("10.1.0.7", 15012).revision, dns.replica("10.1.0.7", 15012).san) == ("1-31", CANARY_SAN)


@pytest.mark.parametrize("args,why", [
    (["--istiod", "10.0.0.1:15012", "--revision", "a,b"], "each entry says its revision"),
    (["--istiod-dns", "istiod:15012", "--all-revisions"], "each entry says its revision"),
    (["--istiod", "10.0.0.1:15012@a", "--revision", "a,b", "--istiod-san", "x"], "--istiod-san names one"),
    (["--istiod", "10.0.0.1:15012", "--revision", "Canary"], "not a valid istio.io/rev"),
    (["--istiod", "10.0.0.1:15012@a", "--revision", "a", "--all-revisions"], "give one of them"),
    (["--istiod", "10.0.0.1:15012", "--ready-policy", "most"], "--ready-policy"),
    (["--istiod", "10.0.0.1:15012", "--istiod-column", "pod"], "--istiod-column"),
    (["--istiod", "10.0.0.1:15012@"], "istiod address"),
])  # fmt: skip
def test_ambiguous_or_bad_revision_flags_are_refused(tmp_path: Path, args: list[str], why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        cfg_of(tmp_path, *args)


async def test_a_channel_verifies_its_own_replicas_san() -> None:
    pool = UpstreamPool(UpstreamTLS(ca_pem=b"x", san=DEFAULT_SAN), max_message_bytes=1 << 20, retire_after=0)
    try:
        pool.retain((Replica("10.0.0.9:15012", revision="1-31", san=CANARY_SAN),))
        first = pool.channel("10.0.0.9:15012", CANARY_SAN)
        assert dict(pool._options(CANARY_SAN))["grpc.ssl_target_name_override"] == CANARY_SAN
        assert pool.channel("10.0.0.9:15012", CANARY_SAN) is first
        # The address now belongs to a replica of the default revision (a reused pod IP): a new channel
        # with the default name; the canary's channel is never used for it.
        second = pool.channel("10.0.0.9:15012", "")
        assert second is not first and pool._channel_san["10.0.0.9:15012"] == DEFAULT_SAN
        assert pool.channels_opened == 2
    finally:
        await pool.close()


def _syncz(answers: list[Answer], ctx: merge.MergeContext) -> dict[str, object]:
    body = merge.merge(plan_request(SYNCZ, []), answers, ctx).body
    ident: dict[str, object] = json.loads(discovery_pb2.DiscoveryResponse.FromString(body).control_plane.identifier)
    return ident


def test_x_version_lists_each_control_plane_version_and_the_istiod_column_the_revisions() -> None:
    old, new = make_mesh(2, 10, seed=3, version="1.29.2")[0], make_mesh(2, 10, seed=4, version="1.30.3")[1]
    new.pod_name = "istiod-1-31-0"
    answers = [Answer(Replica("10.0.0.1:15012", revision="default"), old.syncz("")),
               Answer(Replica("10.0.0.2:15012", revision="1-31"), new.syncz(""))]
    ident = _syncz(answers, merge.MergeContext())
    assert ident["ID"] == "<external>"
    assert isinstance(ident["Info"], dict) and ident["Info"]["version"] == "1.29.2, 1.30.3"
    assert _syncz(answers, merge.MergeContext(istiod_column="revision"))["ID"] == "<external>/1-31,default"
    # Only the revisions that hold a listed proxy: the old revision with none left is not named.
    old.proxies.clear()
    old.invalidate()
    answers[0] = Answer(answers[0].replica, old.syncz(""))
    assert _syncz(answers, merge.MergeContext(istiod_column="revision"))["ID"] == "<external>/1-31"
    # One version: untouched, as before.
    same = make_mesh(2, 4, seed=5)
    one = [Answer(Replica(f"10.0.0.{i}:15012"), r.syncz("")) for i, r in enumerate(same)]
    assert _syncz(one, merge.MergeContext())["Info"] == json.loads(same[0].identifier())["Info"]


def test_istiod_column_is_the_same_on_the_fast_and_exact_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = make_mesh(2, 6, seed=8)
    b.proxies.append(a.proxies[0])  # a proxy on both revisions mid-move: the exact path deduplicates
    b.invalidate()
    answers = [Answer(Replica("10.0.0.1:15012", revision="default"), a.syncz("")),
               Answer(Replica("10.0.0.2:15012", revision="1-31"), b.syncz(""))]
    ctx = merge.MergeContext(istiod_column="revision")
    assert merge.merge_syncz_fast(plan_request(SYNCZ, []), answers, ctx) is None
    assert _syncz(answers, ctx)["ID"] == "<external>/1-31,default"
    clean = [answers[0], Answer(answers[1].replica, make_mesh(2, 6, seed=8)[1].syncz(""))]
    assert merge.merge_syncz_fast(plan_request(SYNCZ, []), clean, ctx) is not None
    fast = _syncz(clean, ctx)
    monkeypatch.setattr(merge, "merge_syncz_fast", lambda *_a: None)
    assert _syncz(clean, ctx) == fast


@pytest.mark.parametrize("scope", ["", "ns-1"])
def test_istiod_column_is_the_same_on_the_split_and_exact_paths(monkeypatch: pytest.MonkeyPatch, scope: str) -> None:
    # Duplicates and scoped callers take merge_syncz_split; the revisions it shows must be the exact path's.
    a, b = make_mesh(2, 12, seed=9)
    b.proxies.append(a.proxies[0])
    b.invalidate()
    answers = [Answer(Replica("10.0.0.1:15012", revision="default"), a.syncz("")),
               Answer(Replica("10.0.0.2:15012", revision="1-31"), b.syncz(""))]
    ctx = merge.MergeContext(scope=scope, istiod_column="revision")
    assert merge.merge_syncz_split(plan_request(SYNCZ, []), answers, ctx) is not None
    split = _syncz(answers, ctx)
    assert str(split["ID"]).startswith("<external>/")
    monkeypatch.setattr(merge, "merge_syncz_split", lambda *_a: None)
    assert _syncz(answers, ctx)["ID"] == split["ID"]


class _Probed(Readiness):
    """Readiness with the channel probe replaced: which replicas are up is the test's to say."""

    up: set[str] = set()

    async def _probe(self, replica: Replica) -> Probe:
        return Probe(replica, replica.address in self.up, "" if replica.address in self.up else "down")


@pytest.mark.parametrize("policy,listed,ready", [
    ("every-revision", (), False), ("any-replica", (), True), ("every-revision", ("default", "1-31", "1-32"), False),
])  # fmt: skip
async def test_readiness_per_revision(policy: str, listed: tuple[str, ...], ready: bool) -> None:
    replicas = ReplicaSet([StaticSource(["10.0.0.1:1@default", "10.0.0.2:1@1-31", "10.0.0.3:1@1-31"],
                                        per_replica_san=True)])
    metrics = Metrics()
    pool = UpstreamPool(UpstreamTLS(plaintext=True), max_message_bytes=1 << 20)
    readiness = _Probed(replicas, pool, metrics, revisions=listed, policy=policy)
    await replicas.start()
    try:
        if replicas.version == 0:
            await replicas.wait_changed(0)
        # Both revisions have served (a found revision counts once it has: finding 5 of docs/security.md) ...
        readiness.up = {"10.0.0.1:1", "10.0.0.2:1"}
        await readiness.probe_once()
        # ... then the canary serves, the default revision's only replica does not.
        readiness.up = {"10.0.0.2:1"}
        await readiness.probe_once()
    finally:
        await replicas.stop()
    assert readiness.ready is ready, readiness.reason
    assert readiness.by_revision["default"] == (1, 0) and readiness.by_revision["1-31"] == (2, 1)
    if listed:
        assert readiness.by_revision["1-32"] == (0, 0)
        assert "no reachable replica of revision 1-32, default " in readiness.reason
    elif not ready:
        assert "no reachable replica of revision default " in readiness.reason
    assert "revision 1-31: 1 of 2" in readiness.reason
    text = metrics.exposition("")[0].decode()
    assert 'istioctl_proxy_revision_replicas_healthy{revision="1-31"} 1.0' in text
    assert 'istioctl_proxy_revision_replicas_known{revision="1-31"} 2.0' in text
    # A revision no longer found loses its series.
    metrics.set_revisions({"1-31": (2, 2)})
    assert 'revision="default"' not in metrics.exposition("")[0].decode()


def test_check_counts_replicas_per_revision(tmp_path: Path) -> None:
    from istioctl_proxy.check import FAIL, OK, revisions_step

    cfg = cfg_of(tmp_path, "--revision", "default,1-31", "--istiod", "10.0.0.1:15012@default")
    one = [Replica("10.0.0.1:15012", revision="default", san=DEFAULT_SAN)]
    step = revisions_step(cfg, one)
    assert step.mark == FAIL and "1-31: 0 replicas, default: 1 replica; no replica of 1-31" in step.detail
    both = [*one, Replica("10.0.0.2:15012", revision="1-31", san=CANARY_SAN)]
    assert revisions_step(cfg, both).mark == OK
    relaxed = cfg_of(tmp_path, "--revision", "default,1-31", "--istiod", "10.0.0.1:15012@default",
                     "--ready-policy", "any-replica")
    assert revisions_step(relaxed, one).mark == OK
