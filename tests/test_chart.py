"""Issue 17: the chart and manifests as deployed, under attack. `helm template` (real helm) + server-side dry
run, and for RBAC a real kube-apiserver that the rendered objects are applied to and that the credentials they
grant are tried against (tests/k8s/).

Each test names the item it covers; each fails on the chart before the fix (said next to the assertion).
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightkube import AsyncClient
from lightkube.resources.core_v1 import Secret

from istioctl_proxy.kubernetes import load_kube_target
from istioctl_proxy.rotate import Rotation, rotate

from .k8s.cluster import ROOT, SA_ISSUER, KubeCluster, peers_missing
from .k8s.objects import ensure_namespace, request_token
from .test_kubernetes import _ns_name, helm_template, server_dry_run

# The session's kube-apiserver and helm fixtures, shared with test_kubernetes (one API server per run).
from .test_kubernetes import admin as admin
from .test_kubernetes import cluster as cluster
from .test_kubernetes import helm as helm

pytestmark = pytest.mark.timeout(3600 if peers_missing() else 240)

MANIFESTS = ROOT / "deploy" / "manifests"


async def render(*values: str) -> list[dict[str, Any]]:
    args = [a for v in values for a in ("--set", v)]
    return await asyncio.to_thread(helm_template, *args)


async def render_fails(*values: str) -> str:
    with pytest.raises(AssertionError, match="failed") as failed:
        await render(*values)
    return str(failed.value)


async def accepted(cluster: KubeCluster, admin: AsyncClient, docs: list[dict[str, Any]]) -> None:
    await ensure_namespace(admin, "external-istiod")
    await ensure_namespace(admin, "istio-system")
    assert await asyncio.to_thread(server_dry_run, cluster, docs, "external-istiod") == []


def kinds(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def args_of(docs: list[dict[str, Any]]) -> list[str]:
    (dep,) = kinds(docs, "Deployment")
    args: list[str] = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    return args


IDENTITY = ("auth.mode=identity",)
TOKEN_REVIEW = (*IDENTITY, "auth.identity.tokenReview.enabled=true")


# --- the API server, as a token holder sees it ------------------------------------------------------------


def call(cluster: KubeCluster, token: str, path: str, body: dict[str, Any]) -> int:
    """POST as the holder of `token`; the HTTP status (201 created, 403 forbidden, 401 unauthenticated)."""
    ctx = ssl.create_default_context(cafile=str(cluster.pki.ca_file))
    req = urllib.request.Request(cluster.apiserver.url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def can_review_tokens(cluster: KubeCluster, token: str) -> bool:
    status = call(cluster, token, "/apis/authentication.k8s.io/v1/tokenreviews",
                  {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": "x.y.z"}})
    assert status in (201, 403), status
    return status == 201


def can_ask_subject_access(cluster: KubeCluster, token: str) -> bool:
    """system:auth-delegator's other half: ask what system:masters may do."""
    status = call(cluster, token, "/apis/authorization.k8s.io/v1/subjectaccessreviews", {
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {"user": "someone", "groups": ["system:masters"],
                 "resourceAttributes": {"verb": "get", "resource": "secrets"}}})
    assert status in (201, 403), status
    return status == 201


def can_mint(cluster: KubeCluster, token: str, namespace: str, account: str) -> bool:
    status = call(cluster, token, f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token",
                  {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                   "spec": {"expirationSeconds": 600}})
    assert status in (201, 403), status
    return status == 201


def claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return decoded


async def apply_for_real(cluster: KubeCluster, admin: AsyncClient, docs: list[dict[str, Any]], namespace: str,
                         suffix: str) -> None:
    """Create the objects (not a dry run) in `namespace`, cluster-scoped names suffixed so runs never clash."""
    await ensure_namespace(admin, namespace, service_accounts=())
    docs = json.loads(json.dumps(docs).replace('"external-istiod"', json.dumps(namespace)))
    for doc in docs:
        if doc["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            doc["metadata"]["name"] += suffix
        if doc["kind"] == "ClusterRoleBinding":
            doc["roleRef"]["name"] += suffix
    await asyncio.to_thread(_create_all, cluster, docs, namespace)


def _create_all(cluster: KubeCluster, docs: list[dict[str, Any]], namespace: str) -> None:
    ctx = cluster.admin_ssl()
    for doc in docs:
        cluster_scoped = doc["kind"].startswith("Cluster")
        group = "/api/v1" if doc["apiVersion"] == "v1" else f"/apis/{doc['apiVersion']}"
        plural = {"ServiceAccount": "serviceaccounts", "Secret": "secrets"}.get(doc["kind"], doc["kind"].lower() + "s")
        path = f"{group}/{plural}" if cluster_scoped else f"{group}/namespaces/{namespace}/{plural}"
        req = urllib.request.Request(cluster.apiserver.url + path, data=json.dumps(doc).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            assert r.status == 201


# --- item 2: the status page -------------------------------------------------------------------------------


async def test_status_page_is_loopback_only_unless_an_allowed_source_is_set(
    helm: Path, cluster: KubeCluster, admin: AsyncClient
) -> None:
    docs = await render(*IDENTITY, "admin.statusPage=true")
    await accepted(cluster, admin, docs)
    args = args_of(docs)
    # The page is on, for loopback peers (kubectl port-forward) only: admin.py refuses the others.
    assert "--admin-status-page" in args and "--admin-status-page-remote" not in args
    # Wider only with a NetworkPolicy naming who may come (before: no such value, the page answered any pod).
    msg = await render_fails(*IDENTITY, "admin.statusPage=true", "admin.statusPageRemote=true")
    assert "networkPolicy.adminFrom" in msg
    msg = await render_fails(*IDENTITY, "admin.statusPage=true", "admin.statusPageRemote=true",
                             "networkPolicy.adminFrom[0].podSelector.matchLabels.app=oauth2-proxy",
                             "networkPolicy.enabled=false")
    assert "networkPolicy.adminFrom" in msg
    docs = await render(*IDENTITY, "admin.statusPage=true", "admin.statusPageRemote=true",
                        "networkPolicy.adminFrom[0].podSelector.matchLabels.app=oauth2-proxy")
    await accepted(cluster, admin, docs)
    assert "--admin-status-page-remote" in args_of(docs)
    (netpol,) = kinds(docs, "NetworkPolicy")
    (admin_rule,) = [r for r in netpol["spec"]["ingress"] if r["ports"][0]["port"] == "admin"]
    assert admin_rule["from"] == [{"podSelector": {"matchLabels": {"app": "oauth2-proxy"}}}]


# --- item 11: Service type, PDB, refusing renders, digest --------------------------------------------------


@pytest.mark.parametrize("service_type", ["LoadBalancer", "NodePort"])
async def test_admin_port_is_never_on_a_non_cluster_ip_service(
    service_type: str, helm: Path, cluster: KubeCluster, admin: AsyncClient
) -> None:
    docs = await render(f"service.type={service_type}")
    await accepted(cluster, admin, docs)
    services = {s["metadata"]["name"]: s for s in kinds(docs, "Service")}
    public = services["istioctl-proxy"]
    assert public["spec"]["type"] == service_type
    # Before: http-admin 15090 rode on the LoadBalancer too.
    assert [p["name"] for p in public["spec"]["ports"]] == ["grpc"]
    # Metrics scraping keeps an in-cluster Service.
    scrape = services["istioctl-proxy-admin"]
    assert scrape["spec"]["type"] == "ClusterIP"
    assert [(p["name"], p["port"], p["targetPort"]) for p in scrape["spec"]["ports"]] == [
        ("http-admin", 15090, "admin")]
    # The default ClusterIP Service keeps both ports and no second Service appears.
    default = kinds(await render(), "Service")
    assert len(default) == 1 and [p["name"] for p in default[0]["spec"]["ports"]] == ["grpc", "http-admin"]


async def test_one_replica_gets_no_pdb_that_blocks_drains(helm: Path, cluster: KubeCluster,
                                                           admin: AsyncClient) -> None:
    docs = await render("replicas=1")
    await accepted(cluster, admin, docs)
    assert not kinds(docs, "PodDisruptionBudget")  # before: minAvailable 1 of 1, no eviction ever allowed
    (pdb,) = kinds(await render("replicas=3", "podDisruptionBudget.minAvailable=2"), "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 2
    assert "would block every node drain" in await render_fails("replicas=2", "podDisruptionBudget.minAvailable=2")


async def test_render_fails_for_what_the_proxy_would_refuse(helm: Path) -> None:
    # Each of these rendered fine before and the pod then crash-looped on a configuration error.
    assert "tls.plaintext" in await render_fails(*IDENTITY, "tls.plaintext=true")
    assert "istiod.caFile" in await render_fails("istiod.caFromConfigMap=false")
    # With the CA file it renders, and the Role then has no ConfigMap rule.
    docs = await render("istiod.caFromConfigMap=false", "istiod.caFile=/etc/istio-ca/root-cert.pem")
    assert "--istiod-ca=/etc/istio-ca/root-cert.pem" in args_of(docs)


async def test_image_can_be_pinned_by_digest_and_only_by_a_real_one(helm: Path) -> None:
    digest = "sha256:" + "ab" * 32
    (dep,) = kinds(await render("image.repository=registry.example/istioctl-proxy", f"image.digest={digest}",
                                "image.tag=0.1.0"), "Deployment")
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == f"registry.example/istioctl-proxy@{digest}"
    for bad in ("latest", "sha256:abc", "md5:" + "0" * 32):
        await render_fails(f"image.digest={bad}")  # before: rendered repo@latest


async def test_the_pod_runs_with_the_glibc_settings_of_the_image(helm: Path) -> None:
    # Issue 14: one malloc arena, freed memory returned at once (peak RSS, docs/benchmarks.md); before, only
    # the image set them, so a chart deploying another image ran with glibc's defaults.
    (dep,) = kinds(await render(), "Deployment")
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MALLOC_ARENA_MAX"] == "1" and env["MALLOC_TRIM_THRESHOLD_"] == "0"


# --- item 3: forward mode never forwards tokens in the clear by default ------------------------------------


async def test_forward_mode_with_plaintext_istiod_needs_an_explicit_decision(
    helm: Path, cluster: KubeCluster, admin: AsyncClient
) -> None:
    assert "auth.insecureForwardTokens" in await render_fails("istiod.plaintext=true")  # before: rendered
    docs = await render("istiod.plaintext=true", "auth.insecureForwardTokens=true")
    await accepted(cluster, admin, docs)
    args = args_of(docs)
    assert "--istiod-plaintext" in args and "--insecure-forward-tokens" in args
    # Identity mode forwards no caller token: nothing to decide. Defaults: verified TLS, no override.
    assert "--insecure-forward-tokens" not in args_of(await render(*IDENTITY, "istiod.plaintext=true"))
    defaults = args_of(await render())
    assert "--istiod-ca-configmap" in defaults and not {"--istiod-plaintext", "--insecure-forward-tokens"} & set(
        defaults)


# --- item 7: certificate callers with --token-review ------------------------------------------------------


async def test_token_review_offers_a_certificate_port(helm: Path, cluster: KubeCluster, admin: AsyncClient) -> None:
    docs = await render(*TOKEN_REVIEW, "auth.identity.tokenReview.kubeconfigSecret=mesh-kubeconfig")
    await accepted(cluster, admin, docs)
    assert "--cert-listen=0.0.0.0:9091" in args_of(docs)  # before: no way for certificate callers
    (dep,) = kinds(docs, "Deployment")
    ports = {p["name"]: p["containerPort"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert ports == {"grpc": 9090, "admin": 15090, "grpc-cert": 9091}
    (svc,) = kinds(docs, "Service")
    assert [p["name"] for p in svc["spec"]["ports"]] == ["grpc", "grpc-cert", "http-admin"]
    (netpol,) = kinds(docs, "NetworkPolicy")
    assert sorted(p["port"] for r in netpol["spec"]["ingress"] for p in r["ports"]) == ["admin", "grpc", "grpc-cert"]
    # The choice: token callers only.
    docs = await render(*TOKEN_REVIEW, "auth.identity.tokenReview.kubeconfigSecret=m",
                        "auth.identity.tokenReview.certificatePort=0")
    assert not [a for a in args_of(docs) if a.startswith("--cert-listen")]
    assert [p["name"] for p in kinds(docs, "Service")[0]["spec"]["ports"]] == ["grpc", "http-admin"]


# --- item 9: in-cluster TokenReview has its binding --------------------------------------------------------


async def test_in_cluster_token_review_renders_a_binding_that_works(
    helm: Path, cluster: KubeCluster, admin: AsyncClient
) -> None:
    docs = await render(*TOKEN_REVIEW)
    await accepted(cluster, admin, docs)
    (role,) = kinds(docs, "ClusterRole")  # before: none, so every token caller got UNAVAILABLE
    assert role["rules"] == [{"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"],
                              "verbs": ["create"]}]
    (binding,) = kinds(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "istioctl-proxy",
                                    "namespace": "external-istiod"}]
    # With a kubeconfig for another cluster, the proxy's own account needs nothing here.
    assert not kinds(await render(*TOKEN_REVIEW, "auth.identity.tokenReview.kubeconfigSecret=m"), "ClusterRole")

    # Applied for real: the proxy's service account can review tokens, and do nothing else with it.
    namespace = _ns_name("trbind")
    rbac = [d for d in docs if d["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding")]
    await apply_for_real(cluster, admin, rbac, namespace, suffix="-" + namespace)
    token = await request_token(admin, namespace, "istioctl-proxy", audiences=[SA_ISSUER], expiration=600)
    assert await asyncio.to_thread(can_review_tokens, cluster, token)
    assert not await asyncio.to_thread(can_ask_subject_access, cluster, token)


# --- item 8: the mesh-cluster reviewer: tokenreviews only, an expiring credential, rotated -----------------


def manifest(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((MANIFESTS / name).read_text()) if d]


async def test_mesh_cluster_reviewer_can_review_tokens_and_nothing_else(
    cluster: KubeCluster, admin: AsyncClient
) -> None:
    docs = manifest("mesh-cluster-tokenreview.yaml")
    await accepted(cluster, admin, docs)
    assert not kinds(docs, "Secret"), "no long-lived token Secret"  # before: a service-account-token Secret
    assert all(b["roleRef"]["name"] != "system:auth-delegator" for b in kinds(docs, "ClusterRoleBinding"))

    namespace = _ns_name("mesh")
    await apply_for_real(cluster, admin, docs, namespace, suffix="-" + namespace)
    reviewer = await request_token(admin, namespace, "istioctl-proxy-reviewer", audiences=[SA_ISSUER],
                                   expiration=600)
    assert await asyncio.to_thread(can_review_tokens, cluster, reviewer)
    # system:auth-delegator's SubjectAccessReview, with which "allowed: true" for system:masters was obtained.
    assert not await asyncio.to_thread(can_ask_subject_access, cluster, reviewer)
    assert not await asyncio.to_thread(can_mint, cluster, reviewer, namespace, "istioctl-proxy-reviewer")
    # The minter mints for the reviewer and itself only.
    minter = await request_token(admin, namespace, "istioctl-proxy-token-minter", audiences=[SA_ISSUER],
                                 expiration=600)
    assert await asyncio.to_thread(can_mint, cluster, minter, namespace, "istioctl-proxy-reviewer")
    assert await asyncio.to_thread(can_mint, cluster, minter, namespace, "istioctl-proxy-token-minter")
    await ensure_namespace(admin, namespace, service_accounts=("default",))
    assert not await asyncio.to_thread(can_mint, cluster, minter, namespace, "default")
    assert not await asyncio.to_thread(can_review_tokens, cluster, minter)


async def test_rotation_job_renews_an_expiring_reviewer_token(
    cluster: KubeCluster, admin: AsyncClient, tmp_path: Path
) -> None:
    """What the CronJob runs (`istioctl-proxy rotate-token`), against the real API server as both clusters."""
    external = manifest("external-cluster-token-rotation.yaml")
    await accepted(cluster, admin, external)
    (cron,) = kinds(external, "CronJob")
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["/opt/istioctl-proxy/bin/istioctl-proxy", "rotate-token"]
    (role,) = kinds(external, "Role")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["patch"], "resourceNames": [
        "istioctl-proxy-mesh-kubeconfig", "istioctl-proxy-token-minter"]}]

    mesh_ns, local_ns = _ns_name("mesh"), _ns_name("ext")
    await apply_for_real(cluster, admin, manifest("mesh-cluster-tokenreview.yaml"), mesh_ns, suffix="-" + mesh_ns)
    await apply_for_real(cluster, admin, kinds(external, "Secret"), local_ns, suffix="")
    # Bootstrap (docs/deploy.md): a first, expiring minter token, stored where the job mounts it from.
    first = await request_token(admin, mesh_ns, "istioctl-proxy-token-minter", audiences=[SA_ISSUER],
                                expiration=3600)
    minter_kubeconfig = cluster.apiserver.token_kubeconfig("minter-" + mesh_ns, first)
    await apply_for_real(cluster, admin, [{"apiVersion": "v1", "kind": "Secret", "metadata": {
        "name": "istioctl-proxy-token-minter"}, "stringData": {"kubeconfig": minter_kubeconfig.read_text()}}],
        local_ns, suffix="")

    mesh = load_kube_target(minter_kubeconfig).client()
    try:
        done = await rotate(Rotation(str(minter_kubeconfig), mesh_ns, "istioctl-proxy-reviewer", 7200,
                                     "istioctl-proxy-mesh-kubeconfig", "istioctl-proxy-token-minter", 14400,
                                     "istioctl-proxy-token-minter"), mesh, admin, local_ns)
    finally:
        await mesh.close()

    written = await admin.get(Secret, "istioctl-proxy-mesh-kubeconfig", namespace=local_ns)
    assert written.data is not None
    token = base64.b64decode(written.data["token"]).decode()
    kubeconfig = json.loads(base64.b64decode(written.data["kubeconfig"]))
    assert kubeconfig["users"][0]["user"] == {"tokenFile": "/etc/istioctl-proxy/token-review/token"}
    assert kubeconfig["clusters"][0]["cluster"]["server"] == cluster.apiserver.url
    # The credential expires (2 h here, 24 h in the CronJob) and does TokenReviews, nothing else.
    c = claims(token)
    assert c["exp"] - c["iat"] == 7200 and done.minter_expires is not None
    assert c["sub"] == f"system:serviceaccount:{mesh_ns}:istioctl-proxy-reviewer"
    assert await asyncio.to_thread(can_review_tokens, cluster, token)
    assert not await asyncio.to_thread(can_ask_subject_access, cluster, token)
    # The chain renewed itself: a new, longer-lived minter token that works, replacing the bootstrap one.
    minter = await admin.get(Secret, "istioctl-proxy-token-minter", namespace=local_ns)
    assert minter.data is not None
    renewed = json.loads(base64.b64decode(minter.data["kubeconfig"]))["users"][0]["user"]["token"]
    assert renewed != first and claims(renewed)["exp"] - claims(renewed)["iat"] == 14400
    assert await asyncio.to_thread(can_mint, cluster, renewed, mesh_ns, "istioctl-proxy-reviewer")



def test_rotate_token_refuses_lifetimes_that_break_the_chain(capsys: pytest.CaptureFixture[str]) -> None:
    from istioctl_proxy import cli

    for argv, why in ((["--reviewer-seconds", "60"], "at least 600 s"),
                      (["--reviewer-seconds", "7200", "--minter-seconds", "7200"], "must exceed --reviewer-seconds")):
        assert cli.main(["rotate-token", "--mesh-kubeconfig", "/nonexistent", *argv]) == 2
        assert why in capsys.readouterr().err
