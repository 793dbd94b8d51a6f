"""The CA ConfigMap watch: upstream trust from `istio-ca-root-cert`, followed across mesh CA rotations."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cryptography import x509
from lightkube.resources.core_v1 import ConfigMap

from ..errors import CaRejected
from .config import KubeTarget, load_kube_target
from .reflector import Backoff, ReflectorStats, _Reflector

log = logging.getLogger(__name__)

__all__ = ["ROOT_CERT_CONFIGMAP", "ROOT_CERT_KEY", "CaRejected", "Rejection", "RootCertWatcher", "parse_root_bundle"]

ROOT_CERT_CONFIGMAP = "istio-ca-root-cert"
ROOT_CERT_KEY = "root-cert.pem"


@dataclass(frozen=True)
class Rejection:
    """The latest CA ConfigMap update that was refused, for logs, /readyz and `check`."""

    reason: str
    resource_version: str
    at: float  # time.time()


def parse_root_bundle(value: str) -> bytes:
    """The PEM bytes of `value` if every certificate in it parses; raises ValueError saying what is wrong.

    gRPC would take any text containing a BEGIN CERTIFICATE line and only fail at the next handshake
    ("Failed to create security handshaker"), taking every upstream call down with it. Parsing every
    block here (with `cryptography`) is what lets a bad update be refused while the last good root stays.
    """
    begins = value.count("-----BEGIN CERTIFICATE-----")
    if not begins:
        raise ValueError("no PEM certificate in it")
    if value.count("-----END CERTIFICATE-----") != begins:
        raise ValueError("a certificate block is not terminated")
    try:
        certs = x509.load_pem_x509_certificates(value.encode())
    except ValueError as err:
        raise ValueError(f"a certificate does not parse: {err}") from None
    if len(certs) != begins:
        raise ValueError(f"only {len(certs)} of {begins} certificate blocks parse")
    return value.encode()


class RootCertWatcher:
    """Watches `istio-ca-root-cert` (key `root-cert.pem`) in one namespace; calls back with new PEM bytes.

    istiod writes this ConfigMap into every namespace and rewrites it when the mesh CA rotates, so
    watching it keeps upstream TLS verification right across a rotation without a restart. The watch is
    narrowed to the one object by a field selector, which is what lets RBAC restrict it by resourceNames.
    A deleted ConfigMap or a missing key keeps the last good PEM: a transient gap must not break TLS. A
    value that does not parse as a PEM bundle is refused (counted in `rejected`, the latest in
    `rejection`, reported to `on_rejected`) and the last good PEM stays.
    """

    def __init__(
        self,
        namespace: str,
        *,
        name: str = ROOT_CERT_CONFIGMAP,
        key: str = ROOT_CERT_KEY,
        kubeconfig: str | os.PathLike[str] | None = None,
        context: str | None = None,
        target: KubeTarget | None = None,
        watch_timeout: float = 300.0,
        backoff: Backoff | None = None,
        on_rejected: Callable[[Rejection], None] | None = None,
    ) -> None:
        self.target = target or load_kube_target(kubeconfig, context)
        self.namespace = namespace
        self.configmap = name
        self.key = key
        self.pem: bytes | None = None
        self.rejected = 0  # updates refused because they do not parse
        self.rejection: Rejection | None = None  # the latest refused update, until a good value arrives
        self.on_rejected = on_rejected
        self._on_change: Callable[[bytes], None] | None = None
        self._refused_value: str | None = None  # not counted twice when the watch replays the same object
        self._reflector: _Reflector[ConfigMap] = _Reflector(
            self.target,
            ConfigMap,
            namespace,
            fields={"metadata.name": name},
            on_state=self._configmaps_changed,
            what=f"k8s:{self.target.label}/{namespace} configmap {name}",
            watch_timeout=watch_timeout,
            backoff=backoff,
        )

    @property
    def stats(self) -> ReflectorStats:
        """The list/watch counters and last error."""
        return self._reflector.stats

    @property
    def resource_version(self) -> str | None:
        """The resourceVersion of the last list or event seen: lets a caller wait until an update was looked at."""
        return self._reflector.resource_version

    async def run(self, on_change: Callable[[bytes], None]) -> None:
        """Watch until cancelled, calling `on_change` with each accepted new root bundle."""
        self._on_change = on_change
        await self._reflector.run()

    async def first(self) -> bytes:
        """Run until the first usable PEM arrives and return it, then stop (for start-up, before serving).

        Raises CaRejected when the ConfigMap holds a value that does not parse and no good root is known:
        waiting would not help, and the reason is what the operator needs. Wrap it in `asyncio.timeout()`:
        while the ConfigMap does not exist this keeps waiting.
        """
        got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        def once(pem: bytes) -> None:
            if not got.done():
                got.set_result(pem)

        def refused(rejection: Rejection) -> None:
            if not got.done():
                got.set_exception(CaRejected(self._describe(rejection)))

        previous, self.on_rejected = self.on_rejected, refused
        task = asyncio.create_task(self.run(once))
        try:
            return await got
        finally:
            self.on_rejected = previous
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _describe(self, rejection: Rejection) -> str:
        return (
            f"{self.namespace}/{self.configmap} key {self.key} (resourceVersion {rejection.resource_version}) "
            f"is not a usable root certificate bundle: {rejection.reason}"
        )

    def describe_rejection(self) -> str:
        """One line about the current refused value, or "" when the ConfigMap's value is in use."""
        return "" if self.rejection is None else self._describe(self.rejection)

    def _configmaps_changed(self, configmaps: Mapping[str, ConfigMap]) -> None:
        cm = configmaps.get(self.configmap)
        value = (cm.data or {}).get(self.key) if cm is not None else None
        if not value or not value.strip():
            if self.pem is not None:
                log.warning(
                    "%s/%s has no %s; keeping the previous root certificate",
                    self.namespace, self.configmap, self.key,
                )  # fmt: skip
            return
        try:
            pem = parse_root_bundle(value)
        except ValueError as err:
            self._refuse(cm, value, str(err))
            return
        self.rejection, self._refused_value = None, None
        if pem == self.pem:
            return
        log.info("root certificate from %s/%s changed (%d bytes)", self.namespace, self.configmap, len(pem))
        self.pem = pem
        if self._on_change is not None:
            self._on_change(pem)

    def _refuse(self, cm: ConfigMap | None, value: str, reason: str) -> None:
        if value == self._refused_value:
            return  # the same refused value seen again (a relist): already counted and logged
        self._refused_value = value
        version = (cm.metadata.resourceVersion if cm is not None and cm.metadata is not None else None) or "?"
        self.rejected += 1
        self.rejection = Rejection(reason, version, time.time())
        log.error(
            "%s; %s", self._describe(self.rejection),
            "keeping the previous root certificate" if self.pem is not None else "no root certificate yet",
        )  # fmt: skip
        if self.on_rejected is not None:
            self.on_rejected(self.rejection)
