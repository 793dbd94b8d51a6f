"""`istioctl-proxy rotate-token`: keep the mesh-cluster TokenReview credential short-lived.

The proxy reviews callers' tokens with the mesh cluster's API server. Its credential there is a
TokenRequest-minted token of the `istioctl-proxy-reviewer` service account (tokenreviews: create, nothing
else) that expires; a CronJob in the external cluster runs this command well before it does
(deploy/manifests/external-cluster-token-rotation.yaml, docs/deploy.md):

1. with the *minter*'s kubeconfig for the mesh cluster, mint a new reviewer token (TokenRequest);
2. write it into the Secret the chart mounts (keys `token`, and `kubeconfig` whose user reads `tokenFile:`,
   so the proxy picks the new token up on the next 401 without a restart);
3. mint a new minter token too and store it in the minter's Secret: the chain renews itself, and no
   credential in it lives longer than its expiry. If the job stops for longer than that, re-bootstrap.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import logging
from dataclasses import dataclass
from typing import Any

from lightkube import ApiError, AsyncClient
from lightkube.config.kubeconfig import KubeConfig
from lightkube.models.authentication_v1 import TokenRequestSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Secret, ServiceAccount
from lightkube.types import PatchType

from .errors import ConfigError

log = logging.getLogger(__name__)

MIN_SECONDS = 600  # the API server's floor for TokenRequest expirationSeconds


@dataclass(frozen=True)
class Rotation:
    """What `rotate-token` renews, and where it stores the results (flags of the same names)."""

    mesh_kubeconfig: str  # the minter's kubeconfig for the mesh cluster (a file, mounted from minter_secret)
    mesh_namespace: str  # where both service accounts live in the mesh cluster
    reviewer: str
    reviewer_seconds: int
    secret: str  # external cluster, local namespace: what the chart mounts (kubeconfigSecret)
    minter: str  # "" = do not renew the minter's own token
    minter_seconds: int
    minter_secret: str
    token_path: str = "/etc/istioctl-proxy/token-review/token"


@dataclass(frozen=True)
class Rotated:
    """When the new tokens expire."""

    reviewer_expires: datetime.datetime
    minter_expires: datetime.datetime | None


def _mesh_cluster(kubeconfig: str) -> dict[str, Any]:
    """The cluster entry of the current context: where the reviewer's token is valid."""
    config = KubeConfig.from_file(kubeconfig).get()
    assert config is not None  # get() raises without a current context
    cluster = config.cluster
    entry: dict[str, Any] = {"server": cluster.server}
    if cluster.certificate_auth_data:
        entry["certificate-authority-data"] = cluster.certificate_auth_data
    elif cluster.certificate_auth:
        with open(cluster.certificate_auth, "rb") as f:  # embedded: the proxy's pod has no such file
            entry["certificate-authority-data"] = base64.b64encode(f.read()).decode()
    return entry


def _kubeconfig(cluster: dict[str, Any], user: dict[str, str]) -> str:
    # JSON is YAML: every kubeconfig reader takes it.
    return json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "mesh",
        "clusters": [{"name": "mesh", "cluster": cluster}],
        "users": [{"name": "istioctl-proxy", "user": user}],
        "contexts": [{"name": "mesh", "context": {"cluster": "mesh", "user": "istioctl-proxy"}}],
    }, indent=2)


async def _mint(mesh: AsyncClient, namespace: str, account: str, seconds: int) -> tuple[str, datetime.datetime]:
    # No audiences: the API server's own, so the token authenticates to it (and to nothing else).
    request = ServiceAccount.Token(metadata=ObjectMeta(name=account), spec=TokenRequestSpec(
        audiences=[], expirationSeconds=seconds))
    result = await mesh.create(request, account, namespace=namespace)
    status = result.status
    assert status is not None and status.token and status.expirationTimestamp is not None
    return status.token, status.expirationTimestamp


async def _store(local: AsyncClient, namespace: str, name: str, data: dict[str, str]) -> None:
    """Merge-patch the keys in (the Secret exists: the job may patch these two Secrets, not create any)."""
    encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    await local.patch(Secret, name, {"data": encoded}, namespace=namespace, patch_type=PatchType.MERGE)


async def rotate(r: Rotation, mesh: AsyncClient, local: AsyncClient, local_namespace: str) -> Rotated:
    """Mint the reviewer's (and the minter's) token in the mesh cluster and store them as local Secrets."""
    cluster = _mesh_cluster(r.mesh_kubeconfig)
    token, expires = await _mint(mesh, r.mesh_namespace, r.reviewer, r.reviewer_seconds)
    await _store(local, local_namespace, r.secret, {
        "token": token, "kubeconfig": _kubeconfig(cluster, {"tokenFile": r.token_path})})
    log.info("reviewer token for %s/%s stored in Secret %s, expires %s", r.mesh_namespace, r.reviewer, r.secret,
             expires)
    minter_expires = None
    if r.minter:
        minter_token, minter_expires = await _mint(mesh, r.mesh_namespace, r.minter, r.minter_seconds)
        await _store(local, local_namespace, r.minter_secret, {
            "kubeconfig": _kubeconfig(cluster, {"token": minter_token})})
        log.info("minter token renewed in Secret %s, expires %s", r.minter_secret, minter_expires)
    return Rotated(expires, minter_expires)


def add_flags(p: argparse.ArgumentParser) -> None:
    """The `rotate-token` flags."""
    p.add_argument("--mesh-kubeconfig", required=True, help="the minter's kubeconfig for the mesh cluster")
    p.add_argument("--mesh-namespace", default="external-istiod", help="namespace of the service accounts there")
    p.add_argument("--reviewer", default="istioctl-proxy-reviewer", help="service account that reviews tokens")
    p.add_argument("--reviewer-seconds", type=int, default=86400, help="lifetime of the reviewer's token")
    p.add_argument("--secret", default="istioctl-proxy-mesh-kubeconfig",
                   help="Secret in this namespace to write (auth.identity.tokenReview.kubeconfigSecret)")
    p.add_argument("--minter", default="istioctl-proxy-token-minter",
                   help="service account this job mints as; its token is renewed too ('' = do not)")
    p.add_argument("--minter-seconds", type=int, default=172800, help="lifetime of the minter's token")
    p.add_argument("--minter-secret", default="istioctl-proxy-token-minter",
                   help="Secret in this namespace that holds the minter's kubeconfig")
    p.add_argument("--token-path", default=Rotation.token_path,
                   help="where the proxy reads the token (the chart's mount of --secret)")


async def run_rotate(ns: argparse.Namespace) -> int:
    """The `rotate-token` command; returns the exit code (1 when the API server refuses)."""
    from .config import own_namespace
    from .kubernetes import load_kube_target

    if min(ns.reviewer_seconds, ns.minter_seconds) < MIN_SECONDS:
        raise ConfigError(f"token lifetimes must be at least {MIN_SECONDS} s (the API server's minimum)")
    if ns.minter and ns.minter_seconds <= ns.reviewer_seconds:
        raise ConfigError("--minter-seconds must exceed --reviewer-seconds: the chain must outlive each token")
    r = Rotation(ns.mesh_kubeconfig, ns.mesh_namespace, ns.reviewer, ns.reviewer_seconds, ns.secret, ns.minter,
                 ns.minter_seconds, ns.minter_secret, ns.token_path)
    mesh = load_kube_target(r.mesh_kubeconfig).client()
    local = load_kube_target().client()
    try:
        done = await rotate(r, mesh, local, own_namespace("default"))
    except ApiError as err:
        print(f"istioctl-proxy rotate-token: {err.status.code} {err.status.message}")
        return 1
    finally:
        await mesh.close()
        await local.close()
    print(json.dumps({"reviewerExpires": done.reviewer_expires.isoformat(),
                      "minterExpires": done.minter_expires.isoformat() if done.minter_expires else None}))
    return 0


__all__ = ["Rotated", "Rotation", "add_flags", "rotate", "run_rotate"]
