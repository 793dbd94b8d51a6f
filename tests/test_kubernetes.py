"""Kubernetes discovery, TokenReview, the CA ConfigMap watch and the deployment artefacts, all against a
real etcd + kube-apiserver (tests/k8s/, binaries from scripts/install-k8s-peers). No mock of the API.

There is no kubelet: the tests create istiod Pod objects and write their status (Running, Ready, podIP)
through the status subresource, exactly what a kubelet's status manager sends.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import itertools
import json
import os
import secrets
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightkube import AsyncClient
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.models.rbac_v1 import RoleRef, Subject
from lightkube.resources.core_v1 import ConfigMap, Pod, Secret, ServiceAccount
from lightkube.resources.rbac_authorization_v1 import ClusterRoleBinding, Role, RoleBinding
from lightkube.types import PatchType

from istioctl_proxy import app, tokenreview
from istioctl_proxy import kubernetes as k8s
from istioctl_proxy.discovery import ReplicaSet
from istioctl_proxy.kubernetes import (
    Backoff,
    KubernetesPodSource,
    RootCertWatcher,
    load_kube_target,
)
from istioctl_proxy.sim.pki import TestCA
from istioctl_proxy.tokenreview import TokenIdentity, TokenReviewAuthenticator, TokenReviewUnavailable

from . import ads_client
from .k8s.cluster import (
    BIN,
    ROOT,
    SA_ISSUER,
    ApiServer,
    KubeCluster,
    PeersMissingError,
    free_port,
)
from .k8s.objects import (
    Recorder,
    create_istiod_pod,
    delete_pod,
    ensure_namespace,
    force_delete_pod,
    request_token,
    set_pod_status,
)
from .waits import EVENT_TIMEOUT, until

pytestmark = pytest.mark.timeout(240)

MANIFEST = ROOT / "deploy" / "manifests" / "istioctl-proxy.yaml"
CHART = ROOT / "deploy" / "helm" / "istioctl-proxy"
HELM = BIN / "helm"
FOLLOW = 60.0  # a backstop only: discovery follows a change well within a second; under load it may take longer
FAST = Backoff(initial=0.05, maximum=0.5)  # tests do not want to wait out production backoff

_ns_counter = itertools.count(1)


@pytest.fixture(scope="session")
def cluster() -> Iterator[KubeCluster]:
    try:
        c = KubeCluster()
    except PeersMissingError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
async def admin(cluster: KubeCluster) -> AsyncIterator[AsyncClient]:
    client = load_kube_target(cluster.apiserver.admin_kubeconfig()).client()
    try:
        yield client
    finally:
        await client.close()


def _ns_name(prefix: str = "t") -> str:
    return f"{prefix}-{os.getpid() % 10000}-{next(_ns_counter)}"


@pytest.fixture
async def ns(admin: AsyncClient) -> str:
    name = _ns_name()
    await ensure_namespace(admin, name)
    return name


@contextlib.asynccontextmanager
async def running(*coros: Awaitable[None]) -> AsyncIterator[list[asyncio.Task[None]]]:
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        yield tasks
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t


def pod_source(server: ApiServer, namespace: str, **kw: Any) -> KubernetesPodSource:
    kw.setdefault("backoff", Backoff(FAST.initial, FAST.maximum))
    kw.setdefault("allow_loopback", True)  # the tests' pods report 127.0.0.x IPs; the default skips them
    return KubernetesPodSource(namespace, kubeconfig=server.admin_kubeconfig(), **kw)


def addr(ip: str, port: int = 15012) -> str:
    return f"{ip}:{port}"


# ---------------------------------------------------------------------------------------------------------
# Discovery


async def test_pods_follow_creation_readiness_ip_and_deletion(
    cluster: KubeCluster, admin: AsyncClient, ns: str
) -> None:
    # One pod exists before the source starts (found by the list), the rest arrive through the watch.
    await create_istiod_pod(admin, ns, "istiod-a", "127.0.0.11")
    source = pod_source(cluster.apiserver, ns)
    rec = Recorder()
    latencies = []
    async with running(source.run(rec)):
        await rec.wait_pods({"istiod-a": addr("127.0.0.11")})
        assert source.name == f"k8s:{cluster.apiserver.tag}-admin/{ns}"
        assert {r.source for r in rec.latest} == {source.name}

        # Not ready, not running, no IP, or not istiod: never a replica.
        await create_istiod_pod(admin, ns, "istiod-b", "127.0.0.12", ready=False)
        await create_istiod_pod(admin, ns, "istiod-pending", None, phase="Pending", ready=False)
        await create_istiod_pod(admin, ns, "istiod-noip", None)
        await create_istiod_pod(admin, ns, "other", "127.0.0.99", labels={"app": "other"})

        # Readiness flips on.
        await set_pod_status(admin, ns, "istiod-b", ip="127.0.0.12", ready=True)
        latencies.append(
            await rec.wait_pods({"istiod-a": addr("127.0.0.11"), "istiod-b": addr("127.0.0.12")})
        )

        # The pod IP changes (a sandbox recreated on the same pod).
        await set_pod_status(admin, ns, "istiod-a", ip="127.0.0.21", ready=True)
        latencies.append(
            await rec.wait_pods({"istiod-a": addr("127.0.0.21"), "istiod-b": addr("127.0.0.12")})
        )

        # Readiness flips off, then on again.
        await set_pod_status(admin, ns, "istiod-a", ip="127.0.0.21", ready=False)
        latencies.append(await rec.wait_pods({"istiod-b": addr("127.0.0.12")}))
        await set_pod_status(admin, ns, "istiod-a", ip="127.0.0.21", ready=True)
        latencies.append(
            await rec.wait_pods({"istiod-a": addr("127.0.0.21"), "istiod-b": addr("127.0.0.12")})
        )

        # A graceful delete: the pod lingers with a deletionTimestamp (its kubelet would now stop it) and
        # must leave the set at once, not when it finally disappears.
        await delete_pod(admin, ns, "istiod-b")
        latencies.append(await rec.wait_pods({"istiod-a": addr("127.0.0.21")}))
        await force_delete_pod(admin, ns, "istiod-b")

        # A label change that takes the pod out of the selector reads as a deletion on the watch.
        await admin.patch(Pod, "istiod-a", {"metadata": {"labels": {"app": "retired"}}}, namespace=ns,
                          patch_type=PatchType.MERGE)  # fmt: skip
        latencies.append(await rec.wait_pods({}))

    assert max(latencies) < FOLLOW, latencies
    seen = {r.name for _, replicas in rec.reports for r in replicas}
    assert seen == {"istiod-a", "istiod-b"}, seen
    # Every report is a full, sorted set, and none repeats the previous one.
    assert all(a[1] != b[1] for a, b in itertools.pairwise(rec.reports))
    assert source.stats.lists == 1 and source.stats.errors == 0


async def test_revision_selects_only_that_revisions_pods(
    cluster: KubeCluster, admin: AsyncClient, ns: str
) -> None:
    await create_istiod_pod(admin, ns, "istiod-7d9", "127.0.0.31", revision="default")
    await create_istiod_pod(admin, ns, "istiod-canary-5f4", "127.0.0.32", revision="canary")
    canary = pod_source(cluster.apiserver, ns, revision="canary", port=15013)
    every = pod_source(cluster.apiserver, ns)
    rec_canary, rec_every = Recorder(), Recorder()
    async with running(canary.run(rec_canary), every.run(rec_every)):
        await rec_canary.wait_pods({"istiod-canary-5f4": addr("127.0.0.32", 15013)})
        await rec_every.wait_pods(
            {"istiod-7d9": addr("127.0.0.31"), "istiod-canary-5f4": addr("127.0.0.32")}
        )
        # A second canary replica comes up; the default revision's pod never shows in the canary set.
        await create_istiod_pod(admin, ns, "istiod-canary-8c1", "127.0.0.33", revision="canary")
        await rec_canary.wait_pods(
            {"istiod-canary-5f4": addr("127.0.0.32", 15013), "istiod-canary-8c1": addr("127.0.0.33", 15013)}
        )
    assert canary.selector == "app=istiod,istio.io/rev=canary"
    assert canary.name.endswith(f"/{ns}/canary")
    assert all(r.name.startswith("istiod-canary") for _, rs in rec_canary.reports for r in rs)
    assert k8s.istiod_san(ns, "canary") == f"istiod-canary.{ns}.svc"
    assert k8s.istiod_san(ns, "default") == k8s.istiod_san(ns) == f"istiod.{ns}.svc"


async def test_every_revision_each_replica_with_its_own_san(
    cluster: KubeCluster, admin: AsyncClient, ns: str
) -> None:
    """--all-revisions: one source, each replica's revision from its own istio.io/rev label (none: default)
    and that revision's SAN; a pod relabelled to another revision is verified against the new name."""
    await create_istiod_pod(admin, ns, "istiod-7d9", "127.0.0.51")  # no label: the default revision
    await create_istiod_pod(admin, ns, "istiod-1-31-5f4", "127.0.0.52", revision="1-31")
    await create_istiod_pod(admin, ns, "other", "127.0.0.53", labels={"app": "other"}, revision="1-31")
    every = pod_source(cluster.apiserver, ns, per_replica_san=True)
    rec = Recorder()

    def seen() -> set[tuple[str, str, str]]:
        return {(r.name, r.revision, r.san) for r in rec.latest}

    async with running(every.run(rec)):
        await rec.wait_for(lambda _: seen() == {("istiod-7d9", "default", f"istiod.{ns}.svc"),
                                                ("istiod-1-31-5f4", "1-31", f"istiod-1-31.{ns}.svc")}, 10)
        await admin.patch(Pod, "istiod-7d9", {"metadata": {"labels": {"istio.io/rev": "1-32"}}}, namespace=ns,
                          patch_type=PatchType.MERGE)  # fmt: skip
        await rec.wait_for(lambda _: ("istiod-7d9", "1-32", f"istiod-1-32.{ns}.svc") in seen(), FOLLOW)
    # Listed revisions (--revision a,b): one source each, the selector pins the revision.
    from istioctl_proxy.config import Config

    cfg = Config(istiod_k8s=True, kubeconfig=str(cluster.apiserver.admin_kubeconfig()), istio_namespace=ns,
                 istiod_allow_loopback=True, revision="1-31,1-32")
    sources = app.pod_sources_from_config(cfg)
    assert [s.selector for s in sources] == ["app=istiod,istio.io/rev=1-31", "app=istiod,istio.io/rev=1-32"]
    assert all(s.per_replica_san for s in sources)


async def test_two_sources_merge_into_one_replica_set(cluster: KubeCluster, admin: AsyncClient) -> None:
    # Two namespaces through two kubeconfig contexts: the shape of "two clusters" as the proxy sees it.
    ns1, ns2 = _ns_name("east"), _ns_name("west")
    for n in (ns1, ns2):
        await ensure_namespace(admin, n)
    await create_istiod_pod(admin, ns1, "istiod-1", "127.0.0.41")
    await create_istiod_pod(admin, ns2, "istiod-2", "127.0.0.42")
    s1 = KubernetesPodSource(ns1, kubeconfig=cluster.apiserver.admin_kubeconfig(context="east"), backoff=FAST,
                             allow_loopback=True)
    s2 = KubernetesPodSource(ns2, kubeconfig=cluster.apiserver.admin_kubeconfig(context="west"), backoff=FAST,
                             allow_loopback=True)
    assert (s1.name, s2.name) == (f"k8s:east/{ns1}", f"k8s:west/{ns2}")
    replicas = ReplicaSet([s1, s2])
    await replicas.start()
    try:
        await until(lambda: len(replicas.current()) == 2, "both sources")
        assert {(r.name, r.address, r.source) for r in replicas.current()} == {
            ("istiod-1", addr("127.0.0.41"), s1.name),
            ("istiod-2", addr("127.0.0.42"), s2.name),
        }
        await force_delete_pod(admin, ns2, "istiod-2")
        await until(lambda: [r.name for r in replicas.current()] == ["istiod-1"], "west to empty")
    finally:
        await replicas.stop()


@pytest.mark.slow
async def test_watch_expiry_410_relists(cluster: KubeCluster, admin: AsyncClient, ns: str) -> None:
    # An API server without a watch cache serves watches straight from etcd, so once etcd has compacted
    # past the source's resourceVersion its next watch gets 410 Expired: the source must relist.
    direct = cluster.start_apiserver(f"nocache{next(_ns_counter)}", ["--watch-cache=false"])
    try:
        await create_istiod_pod(admin, ns, "istiod-a", "127.0.0.51")
        source = pod_source(direct, ns, watch_timeout=1)  # the server ends each watch after ~1 s
        rec = Recorder()
        async with running(source.run(rec)):
            await rec.wait_pods({"istiod-a": addr("127.0.0.51")})
            # Two writes elsewhere move etcd's revision at least two past the source's (its watch resumes from
            # the next one: with a single write, compacting at it would leave that revision watchable), then
            # compact them away: the source's next watch (the server ends each after ~1 s) gets 410.
            for i in range(2):
                await admin.create(ConfigMap(metadata=ObjectMeta(name=f"churn-{i}"), data={"i": str(i)}),
                                   namespace=ns)  # fmt: skip
            cluster.etcd.compact()
            await until(lambda: source.stats.relists_gone >= 1, lambda: f"a relist after 410 Gone: {source.stats}")
            # The relisted state is right and the watch works again afterwards.
            await create_istiod_pod(admin, ns, "istiod-b", "127.0.0.52")
            await rec.wait_pods({"istiod-a": addr("127.0.0.51"), "istiod-b": addr("127.0.0.52")})
        assert source.stats.lists >= 2
        # A relist of an unchanged set reports nothing new.
        assert [set(r.name for r in rs) for _, rs in rec.reports] == [{"istiod-a"}, {"istiod-a", "istiod-b"}]
    finally:
        direct.stop()


class Gate:
    """A TCP relay in front of an API server. Shut, it accepts each connection and closes it at once (to the
    client the server is down); open, it relays. It marks exactly when the server is back for the client,
    whatever the server did meanwhile (a restarted API server listens well before it is ready)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.is_open = True
        self.port = 0
        self._server: asyncio.Server | None = None
        self._relays: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def shut(self) -> None:
        """Refuse new connections and cut the relayed ones."""
        self.is_open = False
        for relay in self._relays:
            relay.cancel()

    async def stop(self) -> None:
        self.shut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await asyncio.gather(*self._relays, return_exceptions=True)

    def kubeconfig(self, server: ApiServer, path: Path) -> Path:
        """`server`'s admin kubeconfig, pointed at the gate."""
        conf = json.loads(server.admin_kubeconfig().read_text())
        conf["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{self.port}"
        path.write_text(json.dumps(conf))
        return path

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.is_open:
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._relays.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            self._relays.discard(task)
            return
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            writer.close()
            up_writer.close()
            self._relays.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    with contextlib.suppress(OSError):
        writer.write_eof()


@pytest.mark.slow
async def test_api_server_restart_keeps_last_known_set_then_catches_up(
    cluster: KubeCluster, admin: AsyncClient, ns: str, tmp_path: Path
) -> None:
    # The source talks to its own API server through a gate, which we shut while the server stops and
    # starts; changes meanwhile go through the main one (same etcd), as through another control-plane node.
    server = cluster.start_apiserver(f"restart{next(_ns_counter)}")
    gate = Gate(server.port)
    await gate.start()
    try:
        await create_istiod_pod(admin, ns, "istiod-a", "127.0.0.61")
        await create_istiod_pod(admin, ns, "istiod-b", "127.0.0.62")
        source = KubernetesPodSource(ns, kubeconfig=gate.kubeconfig(server, tmp_path / "gated.kubeconfig"),
                                     backoff=Backoff(FAST.initial, FAST.maximum), allow_loopback=True)  # fmt: skip
        rec = Recorder()
        async with running(source.run(rec)):
            before = {"istiod-a": addr("127.0.0.61"), "istiod-b": addr("127.0.0.62")}
            await rec.wait_pods(before)
            gate.shut()
            await asyncio.to_thread(server.stop)
            await until(lambda: not source.stats.connected, "the source to notice the outage")
            await force_delete_pod(admin, ns, "istiod-a")
            await create_istiod_pod(admin, ns, "istiod-c", "127.0.0.63")
            failed = source.stats.errors
            await until(lambda: source.stats.errors >= failed + 2, "two more failed reconnects after the changes")
            assert rec.addresses() == before, "the last known set must survive the outage"
            await asyncio.to_thread(server.start)  # returns once its /readyz answers 200
            failed = source.stats.errors
            gate.is_open = True
            after = {"istiod-b": addr("127.0.0.62"), "istiod-c": addr("127.0.0.63")}
            took = await rec.wait_pods(after)
        # Back at its first attempt once the server was reachable (one may have been under way as the gate
        # opened): counted, not timed. How long that took is a figure.
        assert source.stats.errors <= failed + 1, (failed, source.stats)
        print(f"caught up {took:.2f} s after the API server was reachable again")
        assert source.stats.connected
        # Never an empty set on the way: the outage did not clear it, the relist replaced it.
        assert all(rs for _, rs in rec.reports)
    finally:
        await gate.stop()
        server.stop()


# ---------------------------------------------------------------------------------------------------------
# In-cluster config, RBAC, token rotation


def manifest_docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def shipped_role_rules() -> list[dict[str, Any]]:
    roles = [d for d in manifest_docs() if d["kind"] == "Role"]
    assert len(roles) == 1
    rules: list[dict[str, Any]] = roles[0]["rules"]
    return rules


async def grant_shipped_role(admin: AsyncClient, namespace: str, sa: str = "istioctl-proxy") -> None:
    """The manifest's Role and RoleBinding, applied to `namespace` for service account `sa`."""
    await ensure_namespace(admin, namespace, service_accounts=("default", sa))
    rules = shipped_role_rules()
    await admin.create(
        Role.from_dict({"metadata": {"name": "istioctl-proxy"}, "rules": rules}), namespace=namespace
    )
    await admin.create(
        RoleBinding(
            metadata=ObjectMeta(name="istioctl-proxy"),
            roleRef=RoleRef(apiGroup="rbac.authorization.k8s.io", kind="Role", name="istioctl-proxy"),
            subjects=[Subject(kind="ServiceAccount", name=sa, namespace=namespace)],
        ),
        namespace=namespace,
    )


async def test_in_cluster_config_with_shipped_rbac_and_token_rotation(
    cluster: KubeCluster, admin: AsyncClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    namespace = _ns_name("incluster")
    await grant_shipped_role(admin, namespace)
    await create_istiod_pod(admin, namespace, "istiod-a", "127.0.0.71")
    # What the kubelet mounts: a bound token (here bound to a Secret so we can revoke it), ca.crt, namespace.
    token1 = await request_token(
        admin, namespace, "istioctl-proxy", audiences=[k8s_issuer()], bound_secret="t1"
    )
    sa_dir = cluster.apiserver.service_account_dir(tmp_path / "sa", token1, namespace)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(cluster.apiserver.port))
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    target = load_kube_target(service_account_dir=sa_dir)
    assert target.label == "in-cluster"
    assert k8s.own_namespace(service_account_dir=sa_dir) == namespace

    source = KubernetesPodSource(namespace, target=target, watch_timeout=1, backoff=FAST, allow_loopback=True)
    assert source.name == f"k8s:in-cluster/{namespace}"
    rec = Recorder()
    async with running(source.run(rec)):
        await rec.wait_pods({"istiod-a": addr("127.0.0.71")})
        # Rotation: the kubelet writes a new token; the old one stops working (here: revoked at once).
        token2 = await request_token(
            admin, namespace, "istioctl-proxy", audiences=[k8s_issuer()], bound_secret="t2"
        )
        (sa_dir / "token").write_text(token2)
        await admin.delete(Secret, "t1", namespace=namespace)
        await until(lambda: not _token_works(cluster, token1), "the old token to be rejected")
        # The server ends each watch after 1 s and lightkube resumes it, still with the old token: 401, the
        # token file is re-read and the request retried. Once a watch opened after that 401, it runs on the
        # new token: a pod created now can only be seen through it.
        stats = source.stats
        await until(lambda: stats.unauthorized >= 1, lambda: f"a resumed watch to be refused (401): {stats}")
        opened = stats.watch_streams
        await until(lambda: stats.watch_streams > opened, lambda: f"a watch opened with the new token: {stats}")
        await create_istiod_pod(admin, namespace, "istiod-b", "127.0.0.72")
        await rec.wait_pods({"istiod-a": addr("127.0.0.71"), "istiod-b": addr("127.0.0.72")})
    # The 401 was absorbed by re-reading the token file: no failed list/watch surfaced.
    assert source.stats.errors == 0, source.stats


def k8s_issuer() -> str:
    return SA_ISSUER


def _token_works(cluster: KubeCluster, token: str) -> bool:
    ctx = ssl.create_default_context(cafile=str(cluster.pki.ca_file))
    req = urllib.request.Request(cluster.apiserver.url + "/api", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=5):
            return True
    except urllib.error.HTTPError as e:
        return e.code != 401


async def test_root_cert_configmap_is_watched(cluster: KubeCluster, admin: AsyncClient) -> None:
    namespace = _ns_name("ca")
    await grant_shipped_role(admin, namespace)
    token = await request_token(admin, namespace, "istioctl-proxy", audiences=[k8s_issuer()])
    target = load_kube_target(cluster.apiserver.token_kubeconfig(f"proxy-{namespace}", token))
    watcher = RootCertWatcher(namespace, target=target, backoff=FAST)
    got: list[bytes] = []
    pem1 = cluster.pki.ca_pem.decode()
    pem2 = TestCA("rotated root").cert_pem.decode()

    def cm(pem: str) -> ConfigMap:
        return ConfigMap(metadata=ObjectMeta(name="istio-ca-root-cert"), data={"root-cert.pem": pem})

    async with running(watcher.run(got.append)):
        await until(lambda: watcher.stats.synced, "the watcher to sync (no ConfigMap yet)")
        assert got == []
        await admin.create(cm(pem1), namespace=namespace)
        await until(lambda: got == [pem1.encode()], "the first root cert")
        # A different ConfigMap in the namespace is invisible (and not even allowed by RBAC).
        await admin.create(
            ConfigMap(metadata=ObjectMeta(name="other"), data={"root-cert.pem": pem2}), namespace=namespace
        )
        await admin.replace(cm(pem2), namespace=namespace)
        await until(lambda: got == [pem1.encode(), pem2.encode()], "the rotated root cert")
        # Deleted: keep the last good root rather than failing TLS.
        seen = watcher.stats.events
        await admin.delete(ConfigMap, "istio-ca-root-cert", namespace=namespace)
        await until(lambda: watcher.stats.events > seen, lambda: f"the deletion to reach the watcher: {watcher.stats}")
        assert watcher.pem == pem2.encode() and len(got) == 2
    assert watcher.stats.errors == 0, watcher.stats

    # first(): what start-up uses before serving.
    await admin.create(cm(pem1), namespace=namespace)
    first = await asyncio.wait_for(RootCertWatcher(namespace, target=target).first(), EVENT_TIMEOUT)
    assert first == pem1.encode()


def _expand(rules: list[dict[str, Any]]) -> set[tuple[str, str, str, str]]:
    """(apiGroup, resource, verb, resourceName or '*') for each combination a rule grants."""
    out = set()
    for r in rules:
        for g, res, verb in itertools.product(r["apiGroups"], r["resources"], r["verbs"]):
            for name in r.get("resourceNames") or ["*"]:
                out.add((g, res, verb, name))
    return out


async def test_shipped_role_is_exactly_what_the_code_uses(cluster: KubeCluster, admin: AsyncClient) -> None:
    """Run every Kubernetes path of the proxy as the shipped service account and read the API server's
    audit log: the set of (group, resource, verb, name) requested must equal what the Role grants."""
    namespace = _ns_name("rbac")
    await grant_shipped_role(admin, namespace)
    token = await request_token(admin, namespace, "istioctl-proxy", audiences=[k8s_issuer()])
    target = load_kube_target(cluster.apiserver.token_kubeconfig(f"rbac-{namespace}", token))
    await create_istiod_pod(admin, namespace, "istiod-a", "127.0.0.81")
    await admin.create(
        ConfigMap(
            metadata=ObjectMeta(name="istio-ca-root-cert"),
            data={"root-cert.pem": cluster.pki.ca_pem.decode()},
        ),
        namespace=namespace,
    )
    source = KubernetesPodSource(namespace, target=target, revision="default", backoff=FAST, allow_loopback=True)
    watcher = RootCertWatcher(namespace, target=target, backoff=FAST)
    rec, pems = Recorder(), []
    labels = {"metadata": {"labels": {"istio.io/rev": "default"}}}
    await admin.patch(Pod, "istiod-a", labels, namespace=namespace, patch_type=PatchType.MERGE)
    async with running(source.run(rec), watcher.run(pems.append)):
        await rec.wait_pods({"istiod-a": addr("127.0.0.81")})
        await until(lambda: bool(pems), "the root cert")
    user = f"system:serviceaccount:{namespace}:istioctl-proxy"
    events = [e for e in cluster.apiserver.audit_events() if e.get("user", {}).get("username") == user]
    assert events, "the audit log has no request of the proxy's service account"
    used = set()
    for e in events:
        ref = e.get("objectRef", {})
        assert e.get("responseStatus", {}).get("code", 200) < 400, e
        used.add((ref.get("apiGroup", ""), ref.get("resource"), e["verb"], ref.get("name") or "*"))
    assert used == _expand(shipped_role_rules())
    # And the chart renders the same Role (checked against the manifest in the helm tests too).


# ---------------------------------------------------------------------------------------------------------
# TokenReview


async def test_token_review_maps_tokens_to_their_service_account(
    cluster: KubeCluster, admin: AsyncClient
) -> None:
    mesh_ns, other_ns, proxy_ns = _ns_name("istio-system"), _ns_name("team-a"), _ns_name("external-istiod")
    for n in (mesh_ns, other_ns):
        await ensure_namespace(admin, n)
    # The reviewer's identity has only system:auth-delegator (create tokenreviews), as the docs tell.
    await ensure_namespace(admin, proxy_ns, service_accounts=("default", "istioctl-proxy"))
    await admin.create(
        ClusterRoleBinding(
            metadata=ObjectMeta(name=f"istioctl-proxy-tokenreview-{proxy_ns}"),
            roleRef=RoleRef(
                apiGroup="rbac.authorization.k8s.io", kind="ClusterRole", name="system:auth-delegator"
            ),
            subjects=[Subject(kind="ServiceAccount", name="istioctl-proxy", namespace=proxy_ns)],
        )
    )
    reviewer_token = await request_token(admin, proxy_ns, "istioctl-proxy", audiences=[k8s_issuer()])
    kubeconfig = cluster.apiserver.token_kubeconfig(f"reviewer-{proxy_ns}", reviewer_token)
    auth = TokenReviewAuthenticator(kubeconfig=kubeconfig)  # audiences default to istio-ca
    try:
        # What istioctl sends: a token for `default` in the istio namespace, audience istio-ca.
        mesh_token = await request_token(admin, mesh_ns, "default")
        other_token = await request_token(admin, other_ns, "default")
        assert await auth.review(mesh_token) == TokenIdentity(mesh_ns, "default")
        assert await auth.review(other_token) == (other_ns, "default")
        assert (
            await auth.review(mesh_token)
        ).spiffe_id() == f"spiffe://cluster.local/ns/{mesh_ns}/sa/default"
        # Refused: a token for another audience, garbage, a token of a deleted service account.
        wrong_aud = await request_token(admin, mesh_ns, "default", audiences=["some-other-service"])
        assert await auth.review(wrong_aud) is None
        assert await auth.review("not-a-token") is None
        assert await auth.review("") is None
        await ensure_namespace(admin, mesh_ns, service_accounts=("gone",))
        gone = await request_token(admin, mesh_ns, "gone")
        await admin.delete(ServiceAccount, "gone", namespace=mesh_ns)
        assert await auth.review(gone) is None

        # Cached: repeated and concurrent reviews of known tokens make no new API calls.
        calls = auth.reviews
        results = await asyncio.gather(
            *(auth.review(t) for t in [mesh_token, other_token, "not-a-token"] * 5)
        )
        assert auth.reviews == calls
        assert results[:3] == [(mesh_ns, "default"), (other_ns, "default"), None]
        fresh = await request_token(admin, other_ns, "default")
        results = await asyncio.gather(*(auth.review(fresh) for _ in range(10)))
        assert auth.reviews == calls + 1 and set(results) == {(other_ns, "default")}
    finally:
        await auth.close()

    # Audiences are configurable: the same token is refused for an authenticator that wants another one.
    strict = TokenReviewAuthenticator(kubeconfig=kubeconfig, audiences=["something-else"])
    try:
        assert await strict.review(mesh_token) is None
    finally:
        await strict.close()


async def test_token_review_cache_is_bounded_and_expires(
    cluster: KubeCluster, admin: AsyncClient, ns: str
) -> None:
    now = [1000.0]
    auth = TokenReviewAuthenticator(
        kubeconfig=cluster.apiserver.admin_kubeconfig(),
        ttl=30,
        negative_ttl=2,
        max_entries=2,
        clock=lambda: now[0],
    )
    try:
        tokens = [await request_token(admin, ns, "default") for _ in range(3)]
        for t in tokens:
            assert await auth.review(t) == (ns, "default")
        assert auth.reviews == 3
        await auth.review(tokens[2])  # newest two are cached
        assert auth.reviews == 3
        await auth.review(tokens[0])  # evicted (LRU, max 2)
        assert auth.reviews == 4
        now[0] += 31  # past the TTL
        await auth.review(tokens[0])
        assert auth.reviews == 5
        assert await auth.review("junk") is None and await auth.review("junk") is None
        assert auth.reviews == 6
        now[0] += 3  # negative verdicts expire sooner
        assert await auth.review("junk") is None
        assert auth.reviews == 7
    finally:
        await auth.close()


async def test_token_review_unreachable_api_is_not_a_verdict(cluster: KubeCluster, tmp_path: Path) -> None:
    conf = json.loads(cluster.apiserver.admin_kubeconfig().read_text())
    conf["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{free_port()}"
    dead = tmp_path / "dead.json"
    dead.write_text(json.dumps(conf))
    auth = TokenReviewAuthenticator(kubeconfig=dead, timeout=2)
    try:
        with pytest.raises(TokenReviewUnavailable):
            await auth.review("some-token")
        with pytest.raises(TokenReviewUnavailable):  # not cached as a refusal
            await auth.review("some-token")
    finally:
        await auth.close()


# ---------------------------------------------------------------------------------------------------------
# Configuration helpers


def test_backoff_is_jittered_exponential_and_capped() -> None:
    b = Backoff(initial=0.5, maximum=4.0)
    delays = [b.next_delay() for _ in range(8)]
    caps = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    assert all(cap / 2 <= d <= cap for d, cap in zip(delays, caps, strict=True)), delays
    assert len({round(d, 6) for d in delays}) > 4  # jittered, not lock-step
    b.reset()
    assert 0.25 <= b.next_delay() <= 0.5


def test_label_selector_parsing() -> None:
    from lightkube.core.selector import build_selector

    sel = k8s.parse_label_selector("app=istiod, istio.io/rev!=canary,tier,!legacy,zone in (a, b),x notin (y)")
    assert build_selector(sel) == "app=istiod,istio.io/rev!=canary,tier,!legacy,zone in (a,b),x notin (y)"
    assert k8s.revision_selector("app=istiod", "1-30") == "app=istiod,istio.io/rev=1-30"
    assert k8s.revision_selector("app=istiod", None) == "app=istiod"
    for bad in ("", "a=b=c", "a in b", "a=1,a=2", "(x)"):
        with pytest.raises(ValueError):
            k8s.parse_label_selector(bad)


def test_kube_target_resolution(
    cluster: KubeCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    kc = cluster.apiserver.admin_kubeconfig(context="ctx-one")
    assert load_kube_target(kc).label == "ctx-one"
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'missing'}{os.pathsep}{kc}")
    assert load_kube_target().label == "ctx-one"
    with pytest.raises(Exception, match="not found"):
        load_kube_target(kc, "no-such-context")
    with pytest.raises(Exception, match="not found"):
        load_kube_target(tmp_path / "nope")
    monkeypatch.setenv("POD_NAMESPACE", "external-istiod")
    assert k8s.own_namespace() == "external-istiod"
    monkeypatch.delenv("POD_NAMESPACE")
    assert k8s.own_namespace(service_account_dir=tmp_path) == "istio-system"


# ---------------------------------------------------------------------------------------------------------
# Deployment artefacts


def _discover_kinds(cluster: KubeCluster) -> dict[tuple[str, str], tuple[str, bool]]:
    """(apiVersion, kind) -> (plural, namespaced), from the API server's own discovery."""
    ctx = cluster.admin_ssl()

    def get(path: str) -> Any:
        with urllib.request.urlopen(cluster.apiserver.url + path, context=ctx, timeout=10) as r:
            return json.loads(r.read())

    kinds = {}
    group_versions = ["v1"] + [v["groupVersion"] for g in get("/apis")["groups"] for v in g["versions"]]
    for gv in group_versions:
        path = "/api/v1" if gv == "v1" else f"/apis/{gv}"
        for res in get(path)["resources"]:
            if "/" not in res["name"]:
                kinds[(gv, res["kind"])] = (res["name"], res["namespaced"])
    return kinds


def server_dry_run(cluster: KubeCluster, docs: list[dict[str, Any]], namespace: str) -> list[str]:
    """POST each object with dryRun=All and fieldValidation=Strict (unknown or duplicate fields are errors,
    so this is the API server's own schema validation); returns the errors."""
    kinds = _discover_kinds(cluster)
    errors = []
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key not in kinds:
            errors.append(f"{key}: not served by the API server")
            continue
        plural, namespaced = kinds[key]
        base = "/api/v1" if doc["apiVersion"] == "v1" else f"/apis/{doc['apiVersion']}"
        obj_ns = doc["metadata"].get("namespace", namespace)
        path = f"{base}/namespaces/{obj_ns}/{plural}" if namespaced else f"{base}/{plural}"
        req = urllib.request.Request(
            cluster.apiserver.url + path + "?dryRun=All&fieldValidation=Strict",
            data=json.dumps(doc).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, context=cluster.admin_ssl(), timeout=10) as r:
                created = json.loads(r.read())
                assert created["kind"] == doc["kind"]
        except urllib.error.HTTPError as e:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {e.code} {e.read().decode()[:500]}")
    return errors


async def _namespace_for_manifests(admin: AsyncClient) -> str:
    await ensure_namespace(admin, "external-istiod")
    return "external-istiod"


async def test_plain_manifests_are_accepted_by_the_api_server(
    cluster: KubeCluster, admin: AsyncClient
) -> None:
    docs = manifest_docs()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        [
            "ServiceAccount",
            "Role",
            "RoleBinding",
            "Service",
            "Deployment",
            "PodDisruptionBudget",
            "NetworkPolicy",
        ]
    )
    assert all(d["metadata"]["namespace"] == "external-istiod" for d in docs)
    await _namespace_for_manifests(admin)
    assert await asyncio.to_thread(server_dry_run, cluster, docs, "external-istiod") == []

    dep = next(d for d in docs if d["kind"] == "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert dep["spec"]["replicas"] == 2
    assert (
        pod["securityContext"]["runAsNonRoot"]
        and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    )
    sc = c["securityContext"]
    assert (
        sc["readOnlyRootFilesystem"]
        and sc["capabilities"]["drop"] == ["ALL"]
        and not sc["allowPrivilegeEscalation"]
    )
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"grpc": 9090, "admin": 15090}
    assert "--admin-listen=0.0.0.0:15090" in c["args"] and "--istiod-k8s" in c["args"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["tls"] == "/etc/istioctl-proxy/tls"
    tls = next(v for v in pod["volumes"] if v["name"] == "tls")
    assert tls["secret"]["secretName"] == "istioctl-proxy-tls"
    assert "podAntiAffinity" in pod["affinity"]
    svc = next(d for d in docs if d["kind"] == "Service")
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"grpc": 9090, "http-admin": 15090}
    netpol = next(d for d in docs if d["kind"] == "NetworkPolicy")
    assert sorted(p["port"] for r in netpol["spec"]["ingress"] for p in r["ports"]) == ["admin", "grpc"]
    # No pods/portforward, nothing cluster-wide, no secrets.
    assert {(g, r) for g, r, _, _ in _expand(shipped_role_rules())} == {("", "pods"), ("", "configmaps")}


async def test_mesh_cluster_tokenreview_manifest_is_accepted_and_grants_only_tokenreviews(
    cluster: KubeCluster, admin: AsyncClient
) -> None:
    path = ROOT / "deploy" / "manifests" / "mesh-cluster-tokenreview.yaml"
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    await _namespace_for_manifests(admin)
    assert await asyncio.to_thread(server_dry_run, cluster, docs, "external-istiod") == []
    (crb,) = [d for d in docs if d["kind"] == "ClusterRoleBinding"]
    assert crb["roleRef"]["name"] == "istioctl-proxy-tokenreview"  # tokenreviews only (tests/test_chart.py)


# --- Helm ------------------------------------------------------------------------------------------------


def helm_template(*args: str, namespace: str = "external-istiod") -> list[dict[str, Any]]:
    out = subprocess.run(
        [str(HELM), "template", "istioctl-proxy", str(CHART), "--namespace", namespace, *args],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    if out.returncode != 0:
        raise AssertionError(f"helm template {' '.join(args)} failed:\n{out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="session")
def helm() -> Path:
    if not os.access(HELM, os.X_OK):  # built by scripts/test before pytest, never inside a test
        pytest.fail(f"{HELM} is missing: build it with `scripts/install-k8s-peers helm`", pytrace=False)
    return HELM


HELM_CASES = {
    "defaults": [],
    "revision+identity+tokenreview": [
        "--set", "revision=canary", "--set", "auth.mode=identity",
        "--set", "auth.identity.tokenReview.enabled=true",
        "--set", "auth.identity.tokenReview.kubeconfigSecret=mesh-kubeconfig",
        "--set", "replicas=3", "--set", "podAntiAffinity=hard", "--set", "extraArgs[0]=--require-all",
    ],
    "identity-cert+cafile+plain-istiod-ns": [
        "--set", "auth.mode=identity", "--set", "auth.identity.upstreamCertSecret=proxy-upstream",
        "--set", "istiod.caFromConfigMap=false", "--set", "istiod.caFile=/etc/istio-ca/root-cert.pem",
        "--set", "istiod.namespace=istio-system", "--set", "networkPolicy.enabled=false",
        "--set", "podDisruptionBudget.enabled=false", "--set", "image.digest=sha256:" + "0" * 64,
    ],
}  # fmt: skip


@pytest.mark.parametrize("case", list(HELM_CASES))
async def test_helm_chart_renders_and_is_accepted(
    case: str, helm: Path, cluster: KubeCluster, admin: AsyncClient
) -> None:
    docs = await asyncio.to_thread(helm_template, *HELM_CASES[case])
    await _namespace_for_manifests(admin)
    await ensure_namespace(admin, "istio-system")
    assert await asyncio.to_thread(server_dry_run, cluster, docs, "external-istiod") == []
    dep = next(d for d in docs if d["kind"] == "Deployment")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    role = next(d for d in docs if d["kind"] == "Role")
    if case == "defaults":
        assert "--istiod-ca-configmap" in args and "--upstream-identity" not in args
    elif case.startswith("revision"):
        assert "--revision=canary" in args and "--upstream-identity" in args and "--token-review" in args
        assert "--token-review-kubeconfig=/etc/istioctl-proxy/token-review/kubeconfig" in args
        assert "--upstream-token-file=/var/run/secrets/tokens/istio-token" in args
        assert args[-1] == "--require-all" and dep["spec"]["replicas"] == 3
    else:
        assert "--istiod-ca=/etc/istio-ca/root-cert.pem" in args and "--istiod-ca-configmap" not in args
        assert "--upstream-cert=/etc/istioctl-proxy/upstream/tls.crt" in args
        # Without the ConfigMap watch the Role has no configmaps rule at all, and it lives where istiod is.
        assert [r["resources"] for r in role["rules"]] == [["pods"]]
        assert role["metadata"]["namespace"] == "istio-system"
        assert not {"NetworkPolicy", "PodDisruptionBudget"} & {d["kind"] for d in docs}


def test_helm_lint_strict(helm: Path) -> None:
    for extra in ([], ["--set", "auth.mode=identity", "--set", "auth.identity.tokenReview.enabled=true"]):
        out = subprocess.run(
            [str(helm), "lint", "--strict", str(CHART), *extra], capture_output=True, text=True, check=False
        )
        assert out.returncode == 0, out.stdout + out.stderr


async def test_helm_chart_rejects_inconsistent_values(helm: Path) -> None:
    for bad in (["--set", "auth.mode=both"], ["--set", "auth.identity.tokenReview.enabled=true"],
                ["--set", "istiod.caFile=/x"], ["--set", "replicas=-1"]):  # fmt: skip
        with pytest.raises(AssertionError, match="failed"):
            await asyncio.to_thread(helm_template, *bad)


async def test_plain_manifest_is_the_rendered_chart(helm: Path) -> None:
    """deploy/manifests is `helm template` of the defaults without Helm's own labels, so they never drift
    (regenerate with the command in the manifest's header)."""
    rendered = await asyncio.to_thread(helm_template, "--set", "plainManifest=true")
    assert rendered == manifest_docs()


def test_dockerfile_is_non_root_and_shell_free() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    final = text[text.rindex("\nFROM ") :]
    assert "USER 65532:65532" in final
    assert 'ENTRYPOINT ["/opt/istioctl-proxy/bin/istioctl-proxy", "serve"]' in final
    assert "RUN " not in final, "the runtime stage must not need a shell"


# ---------------------------------------------------------------------------------------------------------
# End to end through the proxy: discovery from the real API server, replicas really listening on pod IPs


@pytest.mark.slow
async def test_rolling_replace_of_three_replicas_fails_no_call(
    cluster: KubeCluster, admin: AsyncClient, ns: str
) -> None:
    """Three simulated istiod replicas listen on the pod IPs of three pods; a Deployment-style rollout
    replaces them one by one (new pod ready → old pod terminating → old replica stops) while a client keeps
    calling the proxy. Routing must follow each step (it takes well under a second; the slowest step is printed)
    and no call may fail or lose a replica."""
    from istioctl_proxy import client
    from istioctl_proxy.app import Proxy
    from istioctl_proxy.config import Config
    from istioctl_proxy.sim.simulator import SimProxy, SimReplica, build_simulator_server

    from .helpers import ADMIN_TOKEN, TOKENS

    port = free_port()
    servers: dict[str, Any] = {}

    async def start_replica(pod: str, ip: str) -> None:
        replica = SimReplica(pod, tokens=dict(TOKENS))
        replica.proxies.append(
            SimProxy(f"app-of-{pod}", "ns-1", states={"CDS": "SYNCED"}, updated=time.time())
        )
        server, bound = build_simulator_server(replica, f"{ip}:{port}")
        assert bound == port
        await server.start()
        servers[pod] = server
        await create_istiod_pod(admin, ns, pod, ip)

    old = [(f"istiod-old-{i}", f"127.0.0.{111 + i}") for i in range(3)]
    new = [(f"istiod-new-{i}", f"127.0.0.{121 + i}") for i in range(3)]
    for pod, ip in old:
        await start_replica(pod, ip)

    cfg = Config(
        listen="127.0.0.1:0", plaintext=True, admin_listen="", drain_seconds=1.0,
        istiod_k8s=True, kubeconfig=str(cluster.apiserver.admin_kubeconfig()), istio_namespace=ns,
        istiod_port=port, istiod_plaintext=True, istiod_allow_loopback=True,
    )  # fmt: skip
    proxy = Proxy(cfg)
    await proxy.start()
    target = client.Target(f"127.0.0.1:{proxy.port}", plaintext=True, token=ADMIN_TOKEN)
    calls, failures, partial = 0, [], []
    stop = asyncio.Event()
    ids = itertools.count()
    pending: set[int] = set()  # the callers' calls now in flight

    async def caller() -> None:
        nonlocal calls
        while not stop.is_set():
            call = next(ids)
            pending.add(call)
            try:
                _, trailers = await ads_client.request(target, client.SYNCZ, timeout=EVENT_TIMEOUT)
            except Exception as e:  # any failed call fails the test
                failures.append(repr(e))
            else:
                calls += 1
                partial.extend(v for k, v in trailers if k == "x-istioctl-proxy-failed-replicas")
            finally:
                pending.discard(call)
            await asyncio.sleep(0.02)

    def names() -> set[str]:
        return {r.name for r in proxy.replicas.current()}

    follow: list[float] = []

    async def follows(expected: set[str]) -> None:
        start = time.monotonic()
        await until(lambda: names() == expected, f"replicas {expected}")
        follow.append(time.monotonic() - start)

    try:
        await until(lambda: names() == {p for p, _ in old}, "the first replicas")
        async with running(caller(), caller()):
            live = {p for p, _ in old}
            for (old_pod, _), (new_pod, new_ip) in zip(old, new, strict=True):
                await start_replica(new_pod, new_ip)
                live.add(new_pod)
                await follows(live)
                await delete_pod(admin, ns, old_pod)  # terminating: leaves the set at once
                live.discard(old_pod)
                await follows(live)
                # Calls that began before the set changed may be routed to it: they finish first (istiod's
                # drain does this); later calls see the new set.
                routed = set(pending)
                await until(lambda r=routed: not r & pending, "the calls that may have been routed to it to end")
                await servers.pop(old_pod).stop(1.0)
                await force_delete_pod(admin, ns, old_pod)
            # Calls go on after the last step (counted, not timed: a loaded machine makes them slow).
            after_rollout = calls
            await until(lambda: calls > max(20, after_rollout + 2), "calls after the rollout")
            stop.set()
        resp, _ = await ads_client.request(target, client.SYNCZ)
        assert sorted(r.name for r in client.rows(resp)) == sorted(f"app-of-{p}.ns-1" for p, _ in new)
    finally:
        stop.set()
        await proxy.stop(0)
        for server in servers.values():
            await server.stop(0)
    assert failures == [], failures[:5]
    assert partial == [], partial[:5]
    assert calls > 20, calls
    print(f"discovery followed each rollout step in at most {max(follow):.2f} s")  # a figure, not a bound


async def test_token_review_callers_are_scoped_through_the_proxy(cluster: KubeCluster, admin: AsyncClient) -> None:
    """Identity mode with --token-review: Kubernetes tokens authenticate callers, scoped like istiod would."""
    import grpc

    from istioctl_proxy import client
    from istioctl_proxy.sim.simulator import make_mesh

    from .helpers import stack

    for n in ("istio-system", "ns-1"):
        await ensure_namespace(admin, n, service_accounts=("default",))
    admin_token = await request_token(admin, "istio-system", "default")
    ns1_token = await request_token(admin, "ns-1", "default")
    kubeconfig = str(cluster.apiserver.admin_kubeconfig())
    async with stack(mesh=make_mesh(3, 12), identity=True, token_review=True, token_review_kubeconfig=kubeconfig) as s:
        resp, _ = await ads_client.request(s.target(admin_token), client.SYNCZ)
        assert len(resp.resources) == 12
        resp, _ = await ads_client.request(s.target(ns1_token, namespace="ns-1"), client.SYNCZ)
        assert {r.name.rpartition(".")[2] for r in client.rows(resp)} == {"ns-1"} and len(resp.resources) == 3
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ads_client.request(s.target("not-a-kubernetes-token"), client.SYNCZ)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ads_client.request(s.target(ns1_token, namespace="ns-1"), "istio.io/debug", ["syncz"])
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_flags_give_one_source_per_cluster(cluster: KubeCluster, admin: AsyncClient) -> None:
    """`--istiod-k8s --kubeconfig a,b` (or several contexts): one labelled source per cluster, merged."""
    import dataclasses as dc

    from istioctl_proxy.app import sources_of
    from istioctl_proxy.config import Config
    from istioctl_proxy.errors import ConfigError

    ns = _ns_name("multi")
    await ensure_namespace(admin, ns)
    await create_istiod_pod(admin, ns, "istiod-m", "127.0.0.61")
    east = cluster.apiserver.admin_kubeconfig(context="east")
    west = cluster.apiserver.admin_kubeconfig(context="west")
    cfg = Config(istiod_k8s=True, istio_namespace=ns, kubeconfig=f"{east},{west}", istiod_allow_loopback=True)
    sources = sources_of(cfg)
    assert [s.name for s in sources] == [f"k8s:east/{ns}", f"k8s:west/{ns}"]
    replicas = ReplicaSet(sources)
    await replicas.start()
    try:
        await until(lambda: len(replicas.current()) == 1, "the pod, seen through both clusters")
        assert replicas.current()[0].address == addr("127.0.0.61")
    finally:
        await replicas.stop()
    with pytest.raises(ConfigError, match="same length"):
        sources_of(dc.replace(cfg, context="a,b,c"))


# ---------------------------------------------------------------------------------------------------------
# Hardening (issue 17 items 1, 4, 5, 6, 10; issue 11 items 4, 6, 8)

GARBAGE_PEM = (
    "-----BEGIN CERTIFICATE-----\nZ2FyYmFnZSBwcmV0ZW5kaW5nIHRvIGJlIGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
)


def root_cm(pem: str) -> ConfigMap:
    return ConfigMap(metadata=ObjectMeta(name="istio-ca-root-cert"), data={"root-cert.pem": pem})


async def replace_cm(admin: AsyncClient, namespace: str, pem: str) -> str:
    """Replace the CA ConfigMap; returns the new resourceVersion (to wait until a watcher has seen it)."""
    result = await admin.replace(root_cm(pem), namespace=namespace)
    assert result.metadata is not None and result.metadata.resourceVersion
    return result.metadata.resourceVersion


async def test_garbage_ca_configmap_is_refused_and_the_last_good_root_stays(
    cluster: KubeCluster, admin: AsyncClient
) -> None:
    namespace = _ns_name("ca-bad")
    await ensure_namespace(admin, namespace)
    target = load_kube_target(cluster.apiserver.admin_kubeconfig())
    good1, good2 = cluster.pki.ca_pem.decode(), TestCA("rotated root").cert_pem.decode()
    bad_values = (
        GARBAGE_PEM,  # looks like PEM, does not parse
        good1 + GARBAGE_PEM,  # a bundle with one good and one broken certificate
        good1 + "-----BEGIN CERTIFICATE-----\nMIIB\n",  # truncated
        "not a certificate at all",
    )
    # At start-up (first()) a garbage value is an error saying why, not an endless wait or a broken root.
    await admin.create(root_cm(GARBAGE_PEM), namespace=namespace)
    with pytest.raises(k8s.CaRejected, match="not a usable root certificate bundle: a certificate does not parse"):
        await asyncio.wait_for(RootCertWatcher(namespace, target=target, backoff=FAST).first(), EVENT_TIMEOUT)

    await replace_cm(admin, namespace, good1)
    refused: list[k8s.Rejection] = []
    watcher = RootCertWatcher(namespace, target=target, backoff=FAST, on_rejected=refused.append)
    got: list[bytes] = []
    async with running(watcher.run(got.append)):
        await until(lambda: got == [good1.encode()], "the first root")
        for i, bad in enumerate(bad_values, 1):
            seen = await replace_cm(admin, namespace, bad)
            await until(lambda v=seen: watcher.resource_version == v, f"bad value {i} to be seen")
            assert watcher.rejected == i and len(refused) == i
            assert watcher.pem == good1.encode() and got == [good1.encode()]
            assert f"(resourceVersion {seen}) is not a usable root certificate bundle" in (
                watcher.describe_rejection()
            )
        # A later empty value keeps the last *good* root, not the garbage before it.
        version = await replace_cm(admin, namespace, "")
        await until(lambda: watcher.resource_version == version, "the empty value to be seen")
        assert watcher.pem == good1.encode() and watcher.rejected == len(bad_values)
        await replace_cm(admin, namespace, good2)
        await until(lambda: got == [good1.encode(), good2.encode()], "the rotated root")
        assert watcher.describe_rejection() == ""
    assert [r.reason.split(":")[0] for r in refused] == [
        "a certificate does not parse", "a certificate does not parse", "a certificate block is not terminated",
        "no PEM certificate in it",
    ]
    assert watcher.stats.errors == 0, watcher.stats


async def test_garbage_ca_configmap_does_not_take_the_proxy_down(
    cluster: KubeCluster, admin: AsyncClient, tmp_path: Path
) -> None:
    """Through a running proxy: calls keep working on the last good root, the refusal is counted, /readyz
    says it, `check` fails on it, and a proxy starting on a garbage value refuses to start, in one line."""
    from istioctl_proxy import cli, client
    from istioctl_proxy.app import Proxy
    from istioctl_proxy.check import run_check
    from istioctl_proxy.errors import ConfigError
    from istioctl_proxy.sim.simulate import SimulatedMesh
    from istioctl_proxy.sim.simulator import make_mesh

    from .helpers import make_pki

    namespace = _ns_name("ca-proxy")
    await ensure_namespace(admin, namespace)
    pki = make_pki(str(tmp_path))
    mesh = SimulatedMesh(make_mesh(2, 6))
    await mesh.start(tls=(pki.istiod.cert_pem, pki.istiod.key_pem, pki.ca.cert_pem))
    await admin.create(root_cm(pki.ca.cert_pem.decode()), namespace=namespace)
    kubeconfig = str(cluster.apiserver.admin_kubeconfig())
    cfg = pki.identity_config(
        tuple(mesh.addresses), istiod_ca="", istiod_ca_configmap=True, kubeconfig=kubeconfig,
        istio_namespace=namespace, istiod_san="istiod.istio-system.svc", admin_listen="127.0.0.1:0",
    )  # fmt: skip
    leaf = pki.client(namespace)
    proxy = Proxy(cfg)
    await proxy.start()
    target = client.Target(f"127.0.0.1:{proxy.port}", ca_pem=pki.ca.cert_pem, cert_pem=leaf.cert_pem,
                           key_pem=leaf.key_pem, authority="localhost")  # fmt: skip

    def readyz() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{proxy.admin_port}/readyz", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    try:
        resp, _ = await ads_client.request(target, client.SYNCZ)
        assert len(resp.resources) == 6
        assert proxy.ca_watcher is not None
        await replace_cm(admin, namespace, GARBAGE_PEM)
        await until(lambda: proxy.ca_watcher is not None and proxy.ca_watcher.rejected == 1, "the refusal")
        # Fresh channels (as after a reconnect) still verify istiod with the last good root.
        proxy.pool.refresh_tls(proxy.pool.tls)
        resp, trailers = await ads_client.request(target, client.SYNCZ)
        assert len(resp.resources) == 6 and not trailers
        assert proxy.metrics.registry.get_sample_value("istioctl_proxy_ca_updates_rejected_total") == 1
        status, text = await asyncio.to_thread(readyz)
        assert status == 200, text
        assert "warning: " in text and "is not a usable root certificate bundle" in text, text

        out = io.StringIO()
        argv = ["check", "--plaintext", "--istiod", ",".join(mesh.addresses), "--istiod-ca-configmap",
                "--kubeconfig", kubeconfig, "--istio-namespace", namespace, "--istiod-san", "istiod.istio-system.svc",
                "--timeout", "5"]  # fmt: skip
        code = await run_check(cli.parser().parse_args(argv), out, io.StringIO())
        assert code == 1
        ca_lines = [line for line in out.getvalue().splitlines() if line.startswith("✗ istio CA:")]
        assert len(ca_lines) == 1 and "is not a usable root certificate bundle" in ca_lines[0], out.getvalue()

        # Starting while the value is garbage: a one-line configuration error, not a proxy with a broken root.
        with pytest.raises(ConfigError, match=r"--istiod-ca-configmap: .* a certificate does not parse"):
            other = Proxy(cfg)
            try:
                await other.start()
            finally:
                await other.pool.close()
    finally:
        await proxy.stop(0)
        await mesh.stop()


async def reviewer_kubeconfig(cluster: KubeCluster, admin: AsyncClient, *, bind: bool = True) -> tuple[Path, str]:
    """A service account that reviews tokens (with system:auth-delegator unless `bind` is false); its
    kubeconfig and its user name (what the audit log records)."""
    proxy_ns = _ns_name("reviewer")
    await ensure_namespace(admin, proxy_ns, service_accounts=("istioctl-proxy",))
    if bind:
        await admin.create(ClusterRoleBinding(
            metadata=ObjectMeta(name=f"istioctl-proxy-tokenreview-{proxy_ns}"),
            roleRef=RoleRef(apiGroup="rbac.authorization.k8s.io", kind="ClusterRole", name="system:auth-delegator"),
            subjects=[Subject(kind="ServiceAccount", name="istioctl-proxy", namespace=proxy_ns)],
        ))  # fmt: skip
    token = await request_token(admin, proxy_ns, "istioctl-proxy", audiences=[k8s_issuer()])
    kubeconfig = cluster.apiserver.token_kubeconfig(f"reviewer-{proxy_ns}", token)
    return kubeconfig, f"system:serviceaccount:{proxy_ns}:istioctl-proxy"


def tokenreviews_by(cluster: KubeCluster, user: str) -> int:
    """TokenReviews the API server received from `user`, from its audit log (written before it answers)."""
    return sum(
        1 for e in cluster.apiserver.audit_events()
        if e.get("user", {}).get("username") == user and e.get("verb") == "create"
        and e.get("objectRef", {}).get("resource") == "tokenreviews"
    )  # fmt: skip


def expired_looking_jwt() -> str:
    """A JWT-shaped token whose (unverified) exp is an hour ago: the shape that used to skip the negative cache."""
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    claims = {"exp": int(time.time()) - 3600, "sub": secrets.token_hex(8)}
    return f"{part({'alg': 'RS256'})}.{part(claims)}.{secrets.token_urlsafe(32)}"


async def test_token_review_cache_ttl_bounds_how_long_a_revoked_token_works(
    cluster: KubeCluster, admin: AsyncClient, ns: str
) -> None:
    from istioctl_proxy.config import Config, add_serve_flags, from_args

    def parsed(env: dict[str, str]) -> Config:
        p = argparse.ArgumentParser()
        add_serve_flags(p, env)
        return from_args(p.parse_args(["--plaintext", "--istiod", "127.0.0.1:1", "--istiod-plaintext"]), env)

    assert parsed({}).token_review_cache_ttl <= 10
    assert parsed({"ISTIOCTL_PROXY_TOKEN_REVIEW_CACHE_TTL": "3"}).token_review_cache_ttl == 3
    cfg = Config(token_review_kubeconfig=str(cluster.apiserver.admin_kubeconfig()), token_review_cache_ttl=4)
    reviewer = app.token_reviewer_from_config(cfg)
    assert reviewer.ttl == 4
    await reviewer.close()

    now = [1000.0]
    auth = TokenReviewAuthenticator(kubeconfig=cluster.apiserver.admin_kubeconfig(), ttl=4, clock=lambda: now[0])
    try:
        token = await request_token(admin, ns, "default", bound_secret="revocable")
        assert await auth.review(token) == (ns, "default")
        await admin.delete(Secret, "revocable", namespace=ns)  # revokes the token
        # The API server caches its own verdicts (~10 s): wait until a review without our cache says no.
        probe = TokenReviewAuthenticator(kubeconfig=cluster.apiserver.admin_kubeconfig(), ttl=0)
        try:
            async def refused() -> bool:
                return await probe.review(token) is None

            await until(refused, "the API server to refuse the revoked token", step=0.2)
        finally:
            await probe.close()
        now[0] += 3.9
        assert await auth.review(token) == (ns, "default")  # still inside the TTL: cached
        assert auth.reviews == 1
        now[0] += 0.2
        assert await auth.review(token) is None  # past the TTL: asked again, refused
        assert auth.reviews == 2
    finally:
        await auth.close()


async def test_random_tokens_cause_at_most_the_bounded_number_of_reviews(
    cluster: KubeCluster, admin: AsyncClient
) -> None:
    """400 calls with random tokens (half of them expired-looking JWTs) from 6 peers make at most `burst`
    TokenReviews at the real API server (counted in its audit log), the rest are refused by a limit; the
    refused tokens are then cached, expired-looking or not, so sending them again costs nothing."""
    kubeconfig, user = await reviewer_kubeconfig(cluster, admin)
    limits = tokenreview.ReviewLimits(rate=1, burst=8, peer_rate=1, peer_burst=3, concurrency=2, peer_concurrency=2)
    now = [1000.0]  # frozen: no bucket refills during the flood, so the bound is exact
    limited: list[str] = []
    auth = TokenReviewAuthenticator(kubeconfig=kubeconfig, limits=limits, clock=lambda: now[0],
                                    on_limited=limited.append)  # fmt: skip
    tokens = [expired_looking_jwt() if i % 2 == 0 else secrets.token_urlsafe(40) for i in range(400)]
    peers = [f"ipv4:10.0.0.{i}:{40000 + i}" for i in range(6)]
    before = tokenreviews_by(cluster, user)
    try:
        results = await asyncio.gather(
            *(auth.review(t, peers[i % len(peers)]) for i, t in enumerate(tokens)), return_exceptions=True
        )
        reviewed = [t for t, r in zip(tokens, results, strict=True) if r is None]
        refused = [r for r in results if isinstance(r, tokenreview.TokenReviewLimited)]
        assert len(reviewed) + len(refused) == len(tokens), [r for r in results if r is not None][:3]
        made = tokenreviews_by(cluster, user) - before
        assert made == auth.reviews == len(reviewed) <= limits.burst, (made, auth.reviews, len(reviewed))
        assert len(reviewed) == limits.burst  # the bound is reached, not just respected by accident
        assert auth.max_in_flight <= limits.concurrency
        assert {r.limit for r in refused} == {"rate", "peer-concurrency"}
        assert len(limited) == len(refused) and sum(auth.limited.values()) == len(refused)
        assert any(t.count(".") == 2 for t in reviewed) and any(t.count(".") != 2 for t in reviewed)

        now[0] += 20.0  # every bucket full again; still inside the 30 s of cached refusals
        again = await asyncio.gather(*(auth.review(t, peers[0]) for t in reviewed))
        assert again == [None] * len(reviewed)
        assert tokenreviews_by(cluster, user) - before == made  # refusals were cached, whatever exp said
    finally:
        await auth.close()


async def test_token_review_floods_through_the_proxy_get_resource_exhausted(
    cluster: KubeCluster, admin: AsyncClient
) -> None:
    import grpc

    from istioctl_proxy import client

    from .helpers import stack

    kubeconfig, user = await reviewer_kubeconfig(cluster, admin)
    before = tokenreviews_by(cluster, user)
    # One peer (every call comes from 127.0.0.1), 0.001 reviews/s: a burst of 1, then one more per 1000 s.
    async with stack(identity=True, token_review=True, token_review_kubeconfig=str(kubeconfig),
                     token_review_peer_rate=0.001, token_review_rate=100.0, token_review_concurrency=4) as s:
        async def call(token: str) -> grpc.StatusCode:
            try:
                await ads_client.request(s.target(token), client.SYNCZ)
            except grpc.aio.AioRpcError as err:
                return err.code()
            return grpc.StatusCode.OK

        codes = await asyncio.gather(*(call(secrets.token_urlsafe(40)) for _ in range(40)))
        metrics = s.proxy.metrics.registry
        exhausted = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert codes.count(grpc.StatusCode.UNAUTHENTICATED) == 1 and exhausted == 39, codes
        assert tokenreviews_by(cluster, user) - before == 1
        assert metrics.get_sample_value("istioctl_proxy_token_reviews_total", {"result": "refused"}) == 1
        limited = sum(metrics.get_sample_value("istioctl_proxy_token_reviews_limited_total", {"limit": lim}) or 0
                      for lim in ("rate", "peer-rate", "peer-concurrency"))  # fmt: skip
        assert limited == exhausted


async def test_token_review_refusal_does_not_name_the_reviewer(
    cluster: KubeCluster, admin: AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """The reviewer may not create TokenReviews (RBAC missing): callers get a generic UNAVAILABLE, the
    detail (which names the reviewer's service account) is in the proxy's log only."""
    import grpc

    from istioctl_proxy import client

    from .helpers import stack

    kubeconfig, user = await reviewer_kubeconfig(cluster, admin, bind=False)
    reviewer_sa = user.rpartition(":")[2]
    reviewer_ns = user.split(":")[2]
    await ensure_namespace(admin, "ns-1", service_accounts=("default",))
    token = await request_token(admin, "ns-1", "default")
    async with stack(identity=True, token_review=True, token_review_kubeconfig=str(kubeconfig)) as s:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ads_client.request(s.target(token, namespace="ns-1"), client.SYNCZ)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    details = err.value.details() or ""
    for secret_detail in (reviewer_ns, reviewer_sa, "serviceaccount", "tokenreviews", "forbidden", "reviewer-"):
        assert secret_detail not in details.lower(), details
    assert "retry" in details
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "cannot create resource" in logged and reviewer_ns in logged


async def test_shared_review_survives_the_first_caller_hanging_up(
    cluster: KubeCluster, admin: AsyncClient, ns: str
) -> None:
    class Gated(TokenReviewAuthenticator):
        """Holds each API call until `gate` opens, so callers can come and go while it is in flight."""

        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self.entered, self.gate = asyncio.Event(), asyncio.Event()

        async def _review(self, token: str) -> TokenIdentity | None:
            self.entered.set()
            await self.gate.wait()
            return await super()._review(token)

    auth = Gated(kubeconfig=cluster.apiserver.admin_kubeconfig())
    try:
        token = await request_token(admin, ns, "default")
        first = asyncio.create_task(auth.review(token))
        await auth.entered.wait()
        second = asyncio.create_task(auth.review(token))
        await asyncio.sleep(0)  # one loop turn: `second` starts and joins the review in flight
        first.cancel()  # the first caller hangs up
        with pytest.raises(asyncio.CancelledError):
            await first
        auth.gate.set()
        assert await second == (ns, "default")
        assert auth.reviews == 1

        # Every caller gone: the review still finishes and its verdict is cached for the next one.
        other = await request_token(admin, ns, "default")
        auth.entered.clear()
        auth.gate.clear()
        leaving = asyncio.create_task(auth.review(other))
        await auth.entered.wait()
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        auth.gate.set()
        assert await auth.review(other) == (ns, "default")
        assert auth.reviews == 2
    finally:
        await auth.close()


async def test_discovery_does_not_dial_addresses_it_must_not(
    cluster: KubeCluster, admin: AsyncClient, ns: str, caplog: pytest.LogCaptureFixture
) -> None:
    from istioctl_proxy.app import sources_of
    from istioctl_proxy.config import Config
    from istioctl_proxy.metrics import Metrics

    await create_istiod_pod(admin, ns, "istiod-ok", "10.1.2.3")
    await create_istiod_pod(admin, ns, "istiod-lo", "127.0.0.5")
    await create_istiod_pod(admin, ns, "istiod-metadata", "169.254.169.254")
    await create_istiod_pod(admin, ns, "istiod-v6-ll", "fe80::1")
    await create_istiod_pod(admin, ns, "istiod-zero", "0.0.0.0")
    await create_istiod_pod(admin, ns, "istiod-hostnet", "10.1.2.4", host_network=True)
    skipped: list[str] = []
    source = pod_source(cluster.apiserver, ns, allow_loopback=False, on_skip=skipped.append)
    rec = Recorder()
    async with running(source.run(rec)):
        await rec.wait_pods({"istiod-ok": addr("10.1.2.3")})
        assert sorted(skipped) == ["host-network", "link-local", "link-local", "loopback", "unspecified"]
        # Another event re-examines every pod: the skips are not logged or counted again.
        await set_pod_status(admin, ns, "istiod-ok", ip="10.1.2.9", ready=True)
        await rec.wait_pods({"istiod-ok": addr("10.1.2.9")})
        assert source.skipped == 5 and len(skipped) == 5
    logged = [r.getMessage() for r in caplog.records if "not dialling pod" in r.getMessage()]
    assert len(logged) == 5 and any("istiod-metadata at 169.254.169.254 (link-local" in m for m in logged)

    # Opt-ins: loopback for single-host setups and tests, hostNetwork for such an istiod. Never link-local.
    opted = pod_source(cluster.apiserver, ns, allow_loopback=True, allow_host_network=True)
    rec = Recorder()
    async with running(opted.run(rec)):
        await rec.wait_pods({"istiod-ok": addr("10.1.2.9"), "istiod-lo": addr("127.0.0.5"),
                             "istiod-hostnet": addr("10.1.2.4")})  # fmt: skip
    assert opted.skipped == 3

    # From the flags, counted in the proxy's metrics.
    metrics = Metrics()
    kubeconfig = str(cluster.apiserver.admin_kubeconfig())
    (flagged,) = sources_of(Config(istiod_k8s=True, istio_namespace=ns, kubeconfig=kubeconfig), metrics)
    assert isinstance(flagged, KubernetesPodSource) and not flagged.allow_loopback
    rec = Recorder()
    async with running(flagged.run(rec)):
        await rec.wait_pods({"istiod-ok": addr("10.1.2.9")})
    assert metrics.registry.get_sample_value("istioctl_proxy_discovery_skipped_pods_total",
                                             {"reason": "link-local"}) == 2  # fmt: skip
    (allowed,) = sources_of(Config(istiod_k8s=True, istio_namespace=ns, kubeconfig=kubeconfig,
                                   istiod_allow_loopback=True, istiod_allow_host_network=True))  # fmt: skip
    assert isinstance(allowed, KubernetesPodSource) and allowed.allow_loopback and allowed.allow_host_network


def test_kubernetes_configuration_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    ca = TestCA()
    leaf = ca.issue_spiffe("istio-system", "istioctl-proxy")
    files = {"ca.pem": ca.cert_pem, "leaf.pem": leaf.cert_pem, "leaf.key": leaf.key_pem, "empty.yaml": b"{}",
             "list.yaml": b"- a\n- b\n", "broken.yaml": b"clusters: [\n",
             "ctx.yaml": b"apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\ncurrent-context: gone\n",
             "missing-ca.yaml": yaml.safe_dump({
                 "apiVersion": "v1", "kind": "Config", "current-context": "x",
                 "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1",
                                                        "certificate-authority": str(tmp_path / "nowhere.crt")}}],
                 "users": [{"name": "u", "user": {"token": "t"}}],
                 "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}]}).encode()}  # fmt: skip
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    k8s_args = ["serve", "--plaintext", "--istiod-plaintext", "--insecure-forward-tokens", "--istiod-k8s",
                "--admin-listen", ""]
    identity = ["serve", "--tls-cert", "leaf.pem", "--tls-key", "leaf.key", "--client-ca", "ca.pem",
                "--istiod", "127.0.0.1:1", "--istiod-ca", "ca.pem", "--upstream-identity", "--upstream-cert",
                "leaf.pem", "--upstream-key", "leaf.key", "--token-review", "--admin-listen", ""]  # fmt: skip
    cases = {
        "--kubeconfig empty.yaml: not a usable kubeconfig": [*k8s_args, "--kubeconfig", "empty.yaml"],
        "--kubeconfig list.yaml: not a usable kubeconfig": [*k8s_args, "--kubeconfig", "list.yaml"],
        "--kubeconfig broken.yaml: not a usable kubeconfig": [*k8s_args, "--kubeconfig", "broken.yaml"],
        "Context 'gone' not found": [*k8s_args, "--kubeconfig", "ctx.yaml"],
        "certificate-authority": [*k8s_args, "--kubeconfig", "missing-ca.yaml"],
        "--istiod-selector/--revision: invalid label selector term": [
            *k8s_args, "--kubeconfig", "missing-ca.yaml", "--istiod-selector", "app = istiod x"],
        # Refused before any selector is built: a revision is a DNS label (istio.io/rev).
        "--revision '-bad-' is not a valid istio.io/rev value": [
            *k8s_args, "--kubeconfig", "missing-ca.yaml", "--revision=-bad-"],
        "--istio-namespace 'Istio_System' is not a valid namespace name": [
            *k8s_args, "--istio-namespace", "Istio_System"],
        "--token-review-kubeconfig empty.yaml: not a usable kubeconfig": [
            *identity, "--token-review-kubeconfig", "empty.yaml"],
        "--kubeconfig broken.yaml: not a usable kubeconfig ": [
            "serve", "--plaintext", "--istiod", "127.0.0.1:1", "--istiod-ca-configmap", "--kubeconfig", "broken.yaml",
            "--admin-listen", ""],
    }  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ISTIOCTL_PROXY_", "KUBERNETES_"))}
    for expected, argv in cases.items():
        out = subprocess.run([sys.executable, "-m", "istioctl_proxy", *argv], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2, (argv, out.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("istioctl-proxy: "), (argv, out.stderr[-2000:])
        assert expected.strip() in lines[0], (expected, lines[0])


async def test_kubernetes_churn_and_stop_leave_nothing_behind(
    cluster: KubeCluster, admin: AsyncClient, ns: str, tmp_path: Path
) -> None:
    """Pods come and go for a fixed number of rounds behind a proxy that also watches the CA ConfigMap and
    reviews tokens; per-replica state follows the pods, and stop() leaves no task, channel or client open."""
    from istioctl_proxy import client
    from istioctl_proxy.app import Proxy
    from istioctl_proxy.sim.simulator import SimReplica, build_simulator_server

    from .helpers import make_pki
    from .test_tls_and_discovery import churn_through_proxy

    pki = make_pki(str(tmp_path))
    port = free_port()
    ips = [f"127.0.0.{i}" for i in range(141, 147)]
    servers = []
    for ip in ips:
        server, _ = build_simulator_server(SimReplica(f"istiod-{ip}"), f"{ip}:{port}",
                                           tls=(pki.istiod.cert_pem, pki.istiod.key_pem, pki.ca.cert_pem))
        await server.start()
        servers.append(server)
    await admin.create(root_cm(pki.ca.cert_pem.decode()), namespace=ns)
    kubeconfig = str(cluster.apiserver.admin_kubeconfig())
    await create_istiod_pod(admin, ns, "istiod-0", ips[0])
    cfg = pki.identity_config(
        (), istiod_k8s=True, kubeconfig=kubeconfig, istio_namespace=ns, istiod_port=port, istiod_allow_loopback=True,
        istiod_ca="", istiod_ca_configmap=True, istiod_san="istiod.istio-system.svc", token_review=True,
        token_review_kubeconfig=kubeconfig, admin_listen="127.0.0.1:0",
    )  # fmt: skip
    baseline = asyncio.all_tasks()
    proxy = Proxy(cfg)
    proxy.pool.retire_after = 0.0
    await proxy.start()
    target = client.Target(f"127.0.0.1:{proxy.port}", ca_pem=pki.ca.cert_pem, authority="localhost",
                           token=await request_token(admin, ns, "default"))  # fmt: skip
    live = {"istiod-0": ips[0]}

    async def change(i: int) -> set[str]:
        name, ip = f"istiod-{i + 1}", ips[(i + 1) % len(ips)]
        await create_istiod_pod(admin, ns, name, ip)
        live[name] = ip
        if len(live) > 2:
            gone = min(live, key=lambda n: int(n.rpartition("-")[2]))
            await force_delete_pod(admin, ns, gone)
            del live[gone]
        return {addr(ip, port) for ip in live.values()}

    try:
        await churn_through_proxy(proxy, 12, change, target)
        assert proxy.reviewer is not None and proxy.reviewer.client_open
    finally:
        await proxy.stop(0)
        for server in servers:
            await server.stop(0)
    assert proxy.reviewer is not None and not proxy.reviewer.client_open
    assert proxy.pool.channels_opened == proxy.pool.channels_closed
    left = asyncio.all_tasks() - baseline - {asyncio.current_task()}
    assert not left, left


async def test_check_says_when_discovery_skipped_pods_for_their_address(
    cluster: KubeCluster, admin: AsyncClient, ns: str
) -> None:
    from istioctl_proxy import cli
    from istioctl_proxy.check import run_check

    await create_istiod_pod(admin, ns, "istiod-lo", "127.0.0.5")
    argv = ["check", "--plaintext", "--istiod-plaintext", "--insecure-forward-tokens", "--istiod-k8s", "--kubeconfig",
            str(cluster.apiserver.admin_kubeconfig()), "--istio-namespace", ns, "--timeout", "5"]  # fmt: skip
    out = io.StringIO()
    assert await run_check(cli.parser().parse_args(argv), out, io.StringIO()) == 1
    lines = [line for line in out.getvalue().splitlines() if line.startswith("✗ discovery k8s:")]
    assert len(lines) == 1 and "1 ready pod(s) skipped for their address" in lines[0], out.getvalue()
