"""The pod source: istiod replicas from the ready pods of one namespace, followed by list + watch."""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Callable, Mapping

from lightkube.resources.core_v1 import Pod

from ..config import Config
from ..discovery import OnChange, Replica, istiod_san, join_host_port
from .config import (
    DEFAULT_SELECTOR,
    REVISION_LABEL,
    KubeTarget,
    load_kube_target,
    parse_label_selector,
    revision_selector,
)
from .reflector import Backoff, ReflectorStats, _Reflector

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_ISTIOD_PORT", "KubernetesPodSource", "address_refusal", "pod_replica_ip", "pod_revision"]

DEFAULT_ISTIOD_PORT = Config.istiod_port


def pod_replica_ip(pod: Pod) -> str | None:
    """The IP to dial if the pod should receive traffic, else None.

    Same rule as the EndpointSlice controller's "ready" endpoints: phase Running, condition Ready=True,
    a pod IP, and not terminating (a pod being deleted drains; istiod stops serving soon after).
    Whether the address is one we may dial at all is `address_refusal`'s question.
    """
    meta, status = pod.metadata, pod.status
    if meta is None or status is None or meta.deletionTimestamp is not None:
        return None
    if status.phase != "Running" or not status.podIP:
        return None
    ready = any(c.type == "Ready" and c.status == "True" for c in status.conditions or ())
    return status.podIP if ready else None


def pod_revision(pod: Pod) -> str:
    """The pod's `istio.io/rev` label; "default" without one (istiod's own default revision)."""
    labels = (pod.metadata.labels if pod.metadata is not None else None) or {}
    return labels.get(REVISION_LABEL) or "default"


def address_refusal(
    pod: Pod, ip: str, *, allow_loopback: bool = False, allow_host_network: bool = False
) -> str | None:
    """Why discovery must not dial `ip` of `pod` ("loopback", "link-local", ...), or None if it may.

    Anyone who can write a pod's status (or run a pod matching the selector) chooses the address: the
    proxy would send istioctl callers' tokens to it. Loopback would reach the proxy's own host, link-local
    the cloud metadata service (169.254.169.254), the unspecified address the local host too; a
    hostNetwork pod's IP is its node's, where anything may listen. istiod never runs like that in a real
    mesh; `allow_loopback` is for single-host setups and tests, `allow_host_network` for a hostNetwork
    istiod.
    """
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return "invalid"
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_unspecified:
        return "unspecified"
    if addr.is_link_local:
        return "link-local"
    if addr.is_multicast:
        return "multicast"
    if addr.is_loopback and not allow_loopback:
        return "loopback"
    if pod.spec is not None and pod.spec.hostNetwork and not allow_host_network:
        return "host-network"
    return None


class KubernetesPodSource:
    """A `ReplicaSource` that follows the ready istiod pods of one namespace by list + watch.

    `name` is "k8s:<context>/<namespace>" (plus "/<revision>" when one is selected), so replicas found in
    two clusters or two namespaces stay distinguishable in logs and metrics.

    `per_replica_san` (several revisions followed): each replica carries its revision, from its own
    `istio.io/rev` label, and that revision's SAN, so its certificate is checked against its own name only.
    """

    def __init__(
        self,
        namespace: str,
        *,
        port: int = DEFAULT_ISTIOD_PORT,
        selector: str = DEFAULT_SELECTOR,
        revision: str | None = None,
        kubeconfig: str | os.PathLike[str] | None = None,
        context: str | None = None,
        target: KubeTarget | None = None,
        name: str | None = None,
        watch_timeout: float = 300.0,
        backoff: Backoff | None = None,
        request_timeout: float = 10.0,
        allow_loopback: bool = False,
        allow_host_network: bool = False,
        on_skip: Callable[[str], None] | None = None,
        per_replica_san: bool = False,
    ) -> None:
        # Configuration errors (bad selector, missing kubeconfig/context) surface here, at start-up.
        self.target = target or load_kube_target(kubeconfig, context)
        self.namespace = namespace
        self.port = port
        self.revision = revision
        self.per_replica_san = per_replica_san
        self.allow_loopback = allow_loopback
        self.allow_host_network = allow_host_network
        self.on_skip = on_skip  # called with the reason each time a pod is newly skipped
        self.skipped = 0  # pods (or pod IP changes) skipped because of their address
        self._skipping: dict[str, tuple[str, str]] = {}  # pod name → (ip, reason) currently skipped
        self.selector = revision_selector(selector, revision)
        labels = parse_label_selector(self.selector)
        suffix = f"/{revision}" if revision else ""
        self.name = name or f"k8s:{self.target.label}/{namespace}{suffix}"
        self._on_change: OnChange | None = None
        self._replicas: tuple[Replica, ...] | None = None
        self._reflector: _Reflector[Pod] = _Reflector(
            self.target,
            Pod,
            namespace,
            labels=labels,
            on_state=self._pods_changed,
            what=f"{self.name} pods ({self.selector})",
            watch_timeout=watch_timeout,
            backoff=backoff,
            request_timeout=request_timeout,
        )

    @property
    def stats(self) -> ReflectorStats:
        """The list/watch counters and last error (for check and /readyz)."""
        return self._reflector.stats

    def current(self) -> tuple[Replica, ...]:
        """The last reported replicas (empty before the first successful list)."""
        return self._replicas or ()

    async def run(self, on_change: OnChange) -> None:
        """List and watch istiod pods until cancelled, reporting the usable ones as replicas."""
        self._on_change = on_change
        await self._reflector.run()

    def _replica(self, pod: Pod, pod_name: str, ip: str) -> Replica:
        # The selector already pins a listed revision; following every revision, the pod's label says it.
        revision = self.revision or (pod_revision(pod) if self.per_replica_san else "")
        san = istiod_san(self.namespace, revision) if self.per_replica_san else ""
        return Replica(join_host_port(ip, self.port), self.name, pod_name, revision=revision, san=san)

    def _pods_changed(self, pods: Mapping[str, Pod]) -> None:
        replicas: list[Replica] = []
        skipping: dict[str, tuple[str, str]] = {}
        for pod_name, pod in pods.items():
            ip = pod_replica_ip(pod)
            if ip is None:
                continue
            why = address_refusal(
                pod, ip, allow_loopback=self.allow_loopback, allow_host_network=self.allow_host_network
            )
            if why is not None:
                skipping[pod_name] = (ip, why)
                continue
            replicas.append(self._replica(pod, pod_name, ip))
        for pod_name, (ip, why) in skipping.items():
            # Once per pod and address: the whole map is re-examined on every watch event.
            if self._skipping.get(pod_name) != (ip, why):
                self.skipped += 1
                log.warning(
                    "%s: not dialling pod %s at %s (%s address); see --istiod-allow-loopback and "
                    "--istiod-allow-host-network in docs/kubernetes.md", self.name, pod_name, ip, why,
                )  # fmt: skip
                if self.on_skip is not None:
                    self.on_skip(why)
        self._skipping = skipping
        new = tuple(sorted(replicas))
        # The first list is always reported, even when empty, so consumers know the source has synced.
        if new == self._replicas:
            return
        if self._replicas is not None or new:
            shown = ", ".join(f"{r.name}={r.address}" for r in new)
            log.info("%s: %s", self.name, shown or "no ready replicas")
        self._replicas = new
        if self._on_change is not None:
            self._on_change(new)
