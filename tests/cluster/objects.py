"""The Kubernetes objects scripts/e2e-cluster creates: istiod as Istio's chart runs an external control plane
(its config cluster is the mesh cluster, through the `istio-kubeconfig` Secret) and the mesh cluster's side."""

from __future__ import annotations

from typing import Any

from .cluster import ISTIO_NS, MESH_CLUSTER_ID

DISCOVERY_LABEL = "istioctl-proxy-e2e/discovery"
# discoverySelectors: istiod would turn the mesh cluster's `default/kubernetes` Service into an outbound cluster
# carrying Istio's metadata-exchange filter, which stock Envoy rejects; only labelled namespaces (no Services)
# are selected, so stock Envoy routers are fully SYNCED (docs/real-peers.md).
MESH_CONFIG = f"""\
rootNamespace: {ISTIO_NS}
trustDomain: cluster.local
discoverySelectors:
- matchLabels:
    {DISCOVERY_LABEL}: enabled
"""
WORKLOAD_NAMESPACES = ("shop", "pay")

Obj = dict[str, Any]


def meta(name: str, namespace: str | None = None, **labels: str) -> Obj:
    m: Obj = {"name": name}
    if namespace:
        m["namespace"] = namespace
    if labels:
        m["labels"] = labels
    return m


def namespace(name: str) -> Obj:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta(name, **{DISCOVERY_LABEL: "enabled"})}


def service_account(name: str, ns: str, automount: bool = True) -> Obj:
    sa: Obj = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(name, ns)}
    if not automount:
        sa["automountServiceAccountToken"] = False
    return sa


def rule(groups: list[str], resources: list[str], verbs: list[str], names: list[str] | None = None) -> Obj:
    r: Obj = {"apiGroups": groups, "resources": resources, "verbs": verbs}
    if names:
        r["resourceNames"] = names
    return r


def binding(kind: str, name: str, role_kind: str, subject: Obj, ns: str | None = None) -> Obj:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind, "metadata": meta(name, ns),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": name},
            "subjects": [subject]}


def istiod_config_cluster_rbac() -> list[Obj]:
    """What Istio's istiod chart grants istiod in its config cluster (istiod-clusterrole + the namespace Role),
    minus the Gateway API deployment controller, which this istiod runs with disabled. Not cluster-admin."""
    sa = {"kind": "ServiceAccount", "name": "istiod", "namespace": ISTIO_NS}
    istio_groups = ["config.istio.io", "security.istio.io", "networking.istio.io", "authentication.istio.io",
                    "rbac.istio.io", "telemetry.istio.io", "extensions.istio.io"]
    rw = ["get", "watch", "list", "update", "patch", "create", "delete"]
    cluster_rules = [
        rule(["admissionregistration.k8s.io"], ["mutatingwebhookconfigurations"],
             ["get", "list", "watch", "update", "patch"]),
        rule(["admissionregistration.k8s.io"], ["validatingwebhookconfigurations"], ["get", "list", "watch", "update"]),
        rule(istio_groups, ["*"], ["get", "watch", "list"]),
        rule(["networking.istio.io"], ["workloadentries", "workloadentries/status"], rw),
        rule(["apiextensions.k8s.io"], ["customresourcedefinitions"], ["get", "list", "watch"]),
        rule([""], ["pods", "nodes", "services", "namespaces", "endpoints"], ["get", "list", "watch"]),
        rule(["discovery.k8s.io"], ["endpointslices"], ["get", "list", "watch"]),
        rule(["networking.k8s.io"], ["ingresses", "ingressclasses"], ["get", "list", "watch"]),
        rule(["networking.k8s.io"], ["ingresses/status"], ["*"]),
        rule([""], ["configmaps"], ["create", "get", "list", "watch", "update"]),
        rule(["certificates.k8s.io"],
             ["certificatesigningrequests", "certificatesigningrequests/approval", "certificatesigningrequests/status"],
             ["update", "create", "get", "delete", "watch"]),
        rule(["certificates.k8s.io"], ["signers"], ["approve"], ["kubernetes.io/legacy-unknown"]),
        rule(["authentication.k8s.io"], ["tokenreviews"], ["create"]),
        rule(["authorization.k8s.io"], ["subjectaccessreviews"], ["create"]),
        rule(["networking.x-k8s.io", "gateway.networking.k8s.io"], ["*"], ["get", "watch", "list", "update", "patch"]),
        rule([""], ["secrets"], ["get", "watch", "list"]),
        rule(["multicluster.x-k8s.io"], ["serviceexports"], ["get", "watch", "list", "create", "delete"]),
        rule(["multicluster.x-k8s.io"], ["serviceimports"], ["get", "watch", "list"]),
    ]  # fmt: skip
    name = f"istiod-clusterrole-{ISTIO_NS}"
    return [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": meta(name),
         "rules": cluster_rules},
        binding("ClusterRoleBinding", name, "ClusterRole", sa),
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta("istiod", ISTIO_NS),
         "rules": [rule([""], ["configmaps", "secrets"], ["create", "get", "watch", "list", "update", "delete"]),
                   rule(["coordination.k8s.io"], ["leases"], ["get", "update", "patch", "create"])]},
        binding("RoleBinding", "istiod", "Role", sa, ISTIO_NS),
    ]  # fmt: skip


def mesh_operator_rbac(user: str) -> list[Obj]:
    """istioctl's user in the mesh cluster: mint a token for `default` in the istio namespace (what istioctl
    sends), resolve the default revision (`x ps` lists webhooks), look a pod up (`ps <pod>`). Nothing more."""
    subject = {"kind": "User", "name": user, "apiGroup": "rbac.authorization.k8s.io"}
    return [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": meta("mesh-operator"),
         "rules": [rule(["admissionregistration.k8s.io"], ["mutatingwebhookconfigurations"], ["get", "list", "watch"]),
                   rule([""], ["pods"], ["get"])]},
        binding("ClusterRoleBinding", "mesh-operator", "ClusterRole", subject),
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta("mesh-operator", ISTIO_NS),
         "rules": [rule([""], ["serviceaccounts/token"], ["create"], ["default"])]},
        binding("RoleBinding", "mesh-operator", "Role", subject, ISTIO_NS),
    ]  # fmt: skip


def istiod_deployment(image: str, replicas: int, revision: str = "default") -> list[Obj]:
    """istiod in the external cluster, as Istio's chart renders it for an external control plane: the config
    cluster through KUBECONFIG from the istio-kubeconfig Secret, a plugged CA (cacerts), non-root, read-only root
    filesystem, no capabilities. Its ServiceAccount here has no RBAC at all and no token mounted.

    A revision other than `default` is a canary as the chart installs it: Deployment, Service and mesh ConfigMap
    named `istiod-<rev>`/`istio-<rev>`, pods labelled `istio.io/rev=<rev>`, REVISION set (which puts
    `istiod-<rev>.<ns>.svc` into its serving certificate)."""
    suffix = "" if revision == "default" else f"-{revision}"
    labels = {"app": "istiod", "istio.io/rev": revision}
    def env(name: str, value: str) -> Obj:
        return {"name": name, "value": value}

    def field_env(name: str, path: str) -> Obj:
        return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}

    container = {
        "name": "discovery", "image": image, "imagePullPolicy": "Never",
        "args": ["discovery", "--monitoringAddr=:15014", "--log_output_level=default:info", "--domain", "cluster.local",
                 "--keepaliveMaxServerConnectionAge", "30m", "--registries=Kubernetes",
                 "--configDir=/var/lib/istio/config", "--meshConfig=/etc/istio/config/mesh",
                 "--networksConfig=/etc/istio/config/meshNetworks", "--shutdownDuration=1s"],
        "ports": [{"containerPort": p, "protocol": "TCP", "name": n}
                  for p, n in ((8080, "http-debug"), (15010, "grpc-xds"), (15012, "tls-xds"),
                               (15014, "http-monitoring"))],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}, "periodSeconds": 1, "timeoutSeconds": 5,
                           "failureThreshold": 3},
        "env": [
            env("REVISION", revision), field_env("POD_NAME", "metadata.name"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
            field_env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
            env("KUBECONFIG", "/var/run/secrets/remote/config"), env("CLUSTER_ID", MESH_CLUSTER_ID),
            env("PILOT_ENABLE_GATEWAY_API_DEPLOYMENT_CONTROLLER", "false"), env("PILOT_ENABLE_ANALYSIS", "false"),
        ],
        "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
                            "runAsUser": 1337, "runAsGroup": 1337, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [
            {"name": "local-certs", "mountPath": "/var/run/secrets/istio-dns"},
            {"name": "config-dir", "mountPath": "/var/lib/istio/config"},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "cacerts", "mountPath": "/etc/cacerts", "readOnly": True},
            {"name": "istio-kubeconfig", "mountPath": "/var/run/secrets/remote", "readOnly": True},
            {"name": "config-volume", "mountPath": "/etc/istio/config", "readOnly": True},
        ],
    }  # fmt: skip
    return [
        service_account("istiod", ISTIO_NS, automount=False),
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(f"istio{suffix}", ISTIO_NS),
         "data": {"mesh": MESH_CONFIG}},
        {"apiVersion": "v1", "kind": "Service", "metadata": meta(f"istiod{suffix}", ISTIO_NS, **labels),
         "spec": {"selector": labels, "ports": [{"name": n, "port": p, "protocol": "TCP"}
                                                for p, n in ((15010, "grpc-xds"), (15012, "https-dns"),
                                                             (15014, "http-monitoring"))]}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(f"istiod{suffix}", ISTIO_NS, **labels),
         "spec": {
             "replicas": replicas, "selector": {"matchLabels": labels},
             "strategy": {"rollingUpdate": {"maxSurge": "100%", "maxUnavailable": "25%"}},
             "template": {
                 "metadata": {"labels": {**labels, "istio": "pilot", "sidecar.istio.io/inject": "false"}},
                 "spec": {
                     "serviceAccountName": "istiod", "automountServiceAccountToken": False,
                     "enableServiceLinks": False, "terminationGracePeriodSeconds": 5,
                     "securityContext": {"fsGroup": 1337, "seccompProfile": {"type": "RuntimeDefault"}},
                     "containers": [container],
                     "volumes": [
                         {"name": "local-certs", "emptyDir": {"medium": "Memory"}},
                         {"name": "config-dir", "emptyDir": {}},
                         {"name": "tmp", "emptyDir": {}},
                         {"name": "cacerts", "secret": {"secretName": "cacerts"}},
                         {"name": "istio-kubeconfig", "secret": {"secretName": "istio-kubeconfig"}},
                         {"name": "config-volume", "configMap": {"name": f"istio{suffix}"}},
                     ],
                 },
             },
         }},
    ]  # fmt: skip
