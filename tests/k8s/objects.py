"""Objects the tests create through the real API server, standing in for the controllers and kubelet we
do not run: namespaces with their `default` ServiceAccount, istiod pods whose status we set ourselves."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

from lightkube import ApiError, AsyncClient
from lightkube.models.authentication_v1 import BoundObjectReference, TokenRequestSpec
from lightkube.models.core_v1 import Container, PodSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Namespace, Pod, Secret, ServiceAccount
from lightkube.types import PatchType

from istioctl_proxy.discovery import Replica

from ..waits import EVENT_TIMEOUT

ISTIOD_IMAGE = "docker.io/istio/pilot:1.30.3"  # never pulled: there is no kubelet


async def ensure_namespace(
    client: AsyncClient, name: str, *, service_accounts: Sequence[str] = ("default",)
) -> None:
    """A namespace and its service accounts (the controller manager would create `default`)."""
    with contextlib.suppress(ApiError):
        await client.create(Namespace(metadata=ObjectMeta(name=name)))
    for sa in service_accounts:
        with contextlib.suppress(ApiError):
            await client.create(ServiceAccount(metadata=ObjectMeta(name=sa)), namespace=name)


async def create_istiod_pod(
    client: AsyncClient,
    namespace: str,
    name: str,
    ip: str | None,
    *,
    ready: bool = True,
    phase: str = "Running",
    revision: str | None = None,
    labels: dict[str, str] | None = None,
    node: str | None = "node-1",
    host_network: bool = False,
) -> Pod:
    """An istiod pod as the Deployment would create it, then the status the kubelet would report.

    `node` binds the pod: a bound pod is deleted gracefully (it lingers with a deletionTimestamp until its
    kubelet confirms, which here means until `force_delete_pod`), an unbound one is deleted at once.
    """
    pod_labels = {"app": "istiod", "istio": "pilot"}
    if revision:
        pod_labels["istio.io/rev"] = revision
    pod_labels.update(labels or {})
    pod = Pod(
        metadata=ObjectMeta(name=name, labels=pod_labels),
        spec=PodSpec(
            containers=[Container(name="discovery", image=ISTIOD_IMAGE)],
            nodeName=node,
            automountServiceAccountToken=False,
            hostNetwork=host_network or None,
        ),
    )
    await client.create(pod, namespace=namespace)
    return await set_pod_status(client, namespace, name, ip=ip, ready=ready, phase=phase)


async def set_pod_status(
    client: AsyncClient, namespace: str, name: str, *, ip: str | None, ready: bool, phase: str = "Running"
) -> Pod:
    """Write the pod's status through the status subresource, as a kubelet does."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    cond = "True" if ready else "False"
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": [
            {
                "type": t,
                "status": cond if t in ("Ready", "ContainersReady") else "True",
                "lastTransitionTime": now,
            }
            for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
        ],
        "podIP": ip,
        "podIPs": [{"ip": ip}] if ip else None,
        "hostIP": "127.0.0.1",
        "hostIPs": [{"ip": "127.0.0.1"}],
    }
    result: Pod = await client.patch(
        Pod.Status, name, {"status": status}, namespace=namespace, patch_type=PatchType.MERGE
    )
    return result


async def delete_pod(client: AsyncClient, namespace: str, name: str) -> None:
    """A normal (graceful) delete: a bound pod stays, terminating, until `force_delete_pod`."""
    await client.delete(Pod, name, namespace=namespace)


async def force_delete_pod(client: AsyncClient, namespace: str, name: str) -> None:
    with contextlib.suppress(ApiError):
        await client.delete(Pod, name, namespace=namespace, grace_period=0)


async def request_token(
    client: AsyncClient,
    namespace: str,
    service_account: str,
    *,
    audiences: Sequence[str] = ("istio-ca",),
    bound_secret: str | None = None,
    expiration: int = 3600,
) -> str:
    """TokenRequest, as the kubelet (projected volume) or istioctl (`istio-ca` audience) asks for one.

    With `bound_secret` the token is bound to that Secret (created if needed): deleting the Secret revokes
    the token, which is how a test makes a token stop working without waiting for it to expire.
    """
    ref = None
    if bound_secret is not None:
        try:
            secret = await client.get(Secret, bound_secret, namespace=namespace)
        except ApiError:
            secret = await client.create(Secret(metadata=ObjectMeta(name=bound_secret)), namespace=namespace)
        assert secret.metadata is not None
        ref = BoundObjectReference(apiVersion="v1", kind="Secret", name=bound_secret, uid=secret.metadata.uid)
    spec = TokenRequestSpec(audiences=list(audiences), expirationSeconds=expiration, boundObjectRef=ref)
    request = ServiceAccount.Token(metadata=ObjectMeta(name=service_account), spec=spec)
    result = await client.create(request, service_account, namespace=namespace)
    assert result.status is not None
    token: str = result.status.token
    return token


class Recorder:
    """Collects what a source reports, with timestamps, and waits for a condition on the latest report."""

    def __init__(self) -> None:
        self.reports: list[tuple[float, tuple[Replica, ...]]] = []
        self._changed = asyncio.Event()

    def __call__(self, replicas: Sequence[Replica]) -> None:
        self.reports.append((time.monotonic(), tuple(replicas)))
        self._changed.set()

    @property
    def latest(self) -> tuple[Replica, ...]:
        return self.reports[-1][1] if self.reports else ()

    def addresses(self) -> dict[str, str]:
        """pod name -> address of the latest report."""
        return {r.name: r.address for r in self.latest}

    async def wait_for(self, predicate: Callable[[tuple[Replica, ...]], bool], timeout: float = EVENT_TIMEOUT) -> float:
        """Wait until the latest report satisfies `predicate`; returns how long that took."""
        start = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                while not (self.reports and predicate(self.latest)):
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"no report satisfied the condition within {timeout}s; latest: {self.addresses()}"
            ) from None
        return time.monotonic() - start

    async def wait_pods(self, expected: dict[str, str], timeout: float = EVENT_TIMEOUT) -> float:
        return await self.wait_for(lambda _: self.addresses() == expected, timeout)
