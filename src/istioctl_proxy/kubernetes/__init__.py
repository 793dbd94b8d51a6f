"""Kubernetes: istiod replicas from pods, and upstream trust from a ConfigMap (callers from TokenReview are
`istioctl_proxy.tokenreview`; the wiring from flags is in `app.py`).

Everything here talks to a real API server through lightkube's asyncio client (see docs/kubernetes.md for
why lightkube). The parts:

- `config`: which API server, as whom (kubeconfig / in-cluster), the istio namespace, label selectors;
- `reflector`: the list + watch engine both watches share, like client-go's reflector, with its backoff;
- `pods`: the pod source (`KubernetesPodSource`, a `ReplicaSource`);
- `rootcert`: the CA ConfigMap watch (`RootCertWatcher`).

The API calls made here are exactly the RBAC the deployment grants (deploy/manifests, tests check it):
pods get/list/watch in the istio namespace; configmaps get/list/watch when `--istiod-ca-configmap` is
used (create tokenreviews, on the token-issuing cluster, is `tokenreview.py`'s).
"""

from __future__ import annotations

from .config import (
    DEFAULT_SELECTOR,
    SERVICE_ACCOUNT_DIR,
    KubeTarget,
    istiod_san,
    load_kube_target,
    own_namespace,
    parse_label_selector,
    revision_selector,
    target_from_flags,
)
from .pods import DEFAULT_ISTIOD_PORT, KubernetesPodSource, address_refusal, pod_replica_ip, pod_revision
from .reflector import Backoff, ReflectorStats
from .rootcert import ROOT_CERT_CONFIGMAP, ROOT_CERT_KEY, CaRejected, Rejection, RootCertWatcher, parse_root_bundle

__all__ = [
    "DEFAULT_ISTIOD_PORT",
    "DEFAULT_SELECTOR",
    "ROOT_CERT_CONFIGMAP",
    "ROOT_CERT_KEY",
    "SERVICE_ACCOUNT_DIR",
    "Backoff",
    "CaRejected",
    "KubeTarget",
    "KubernetesPodSource",
    "ReflectorStats",
    "Rejection",
    "RootCertWatcher",
    "address_refusal",
    "istiod_san",
    "load_kube_target",
    "own_namespace",
    "parse_label_selector",
    "parse_root_bundle",
    "pod_replica_ip",
    "pod_revision",
    "revision_selector",
    "target_from_flags",
]
