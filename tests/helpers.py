"""Test helpers: real gRPC servers on loopback — simulated replicas and the proxy, in-process."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from istioctl_proxy import client, wire
from istioctl_proxy.app import Proxy
from istioctl_proxy.config import Config
from istioctl_proxy.sim.pki import Leaf, TestCA, write_file
from istioctl_proxy.sim.simulate import SimulatedMesh
from istioctl_proxy.sim.simulator import SimReplica, make_mesh

ADMIN_TOKEN = "admin-token"
TOKENS: Mapping[str, tuple[str, str]] = {
    ADMIN_TOKEN: ("istio-system", "default"),
    "ns-1-token": ("ns-1", "default"),
    "ns-2-token": ("ns-2", "default"),
}


@dataclass
class Pki:
    ca: TestCA
    directory: str
    istiod: Leaf
    proxy_serving: Leaf
    upstream: Leaf

    def path(self, name: str, data: bytes) -> str:
        return write_file(os.path.join(self.directory, name), data)

    def client(self, namespace: str, sa: str = "default") -> Leaf:
        return self.ca.issue_spiffe(namespace, sa)

    def identity_config(self, istiod: tuple[str, ...], **overrides: object) -> Config:
        """Identity mode, mTLS on both sides, everything from this CA; `overrides` replace any field."""
        ca = self.path("ca.pem", self.ca.cert_pem)
        cfg = Config(
            listen="127.0.0.1:0",
            tls_cert=self.path("tls.crt", self.proxy_serving.cert_pem),
            tls_key=self.path("tls.key", self.proxy_serving.key_pem),
            client_ca=ca,
            istiod=istiod,
            istiod_ca=ca,
            upstream_identity=True,
            upstream_cert=self.path("up.crt", self.upstream.cert_pem),
            upstream_key=self.path("up.key", self.upstream.key_pem),
            admin_listen="",
            drain_seconds=1.0,
        )
        return dataclasses.replace(cfg, **overrides)  # type: ignore[arg-type]

    def admin_target(self, address: str) -> client.Target:
        """An istio-system/default mTLS caller of the proxy at `address`."""
        leaf = self.client("istio-system")
        return client.Target(address, ca_pem=self.ca.cert_pem, cert_pem=leaf.cert_pem, key_pem=leaf.key_pem,
                             authority="localhost")


def rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of a process (this one by default), from /proc."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def unused_kubeconfig(directory: str) -> str:
    """A kubeconfig for --token-review that nothing dials (tests replace the reviewer); its path."""
    path = os.path.join(directory, "kubeconfig.json")
    with open(path, "w") as f:
        json.dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "x",
            "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
            "users": [{"name": "u", "user": {"token": "unused"}}],
            "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        }, f)  # fmt: skip
    return path


def make_pki(directory: str) -> Pki:
    ca = TestCA()
    return Pki(
        ca,
        directory,
        ca.issue(dns=("istiod.istio-system.svc",)),
        ca.issue_serving(),
        ca.issue_spiffe("istio-system", "istioctl-proxy"),
    )


@dataclass
class Stack:
    """Simulated replicas + a running proxy."""

    mesh: SimulatedMesh
    proxy: Proxy
    pki: Pki | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.proxy.port}"

    @property
    def replicas(self) -> list[SimReplica]:
        return self.mesh.replicas

    def target(
        self, token: str = ADMIN_TOKEN, namespace: str = "istio-system", leaf: Leaf | None = None
    ) -> client.Target:
        if self.pki is None:
            return client.Target(self.address, plaintext=True, token=token, namespace=namespace)
        return client.Target(
            self.address,
            ca_pem=self.pki.ca.cert_pem,
            authority="localhost",
            namespace=namespace,
            cert_pem=leaf.cert_pem if leaf else None,
            key_pem=leaf.key_pem if leaf else None,
            token=token if leaf is None else "",
        )


@contextlib.asynccontextmanager
async def stack(
    replicas: int = 3,
    proxies: int = 12,
    *,
    identity: bool = False,
    mesh: list[SimReplica] | None = None,
    **config: object,
) -> AsyncIterator[Stack]:
    """Forward mode over plaintext by default; `identity=True` runs mTLS everywhere with a test CA."""
    sim = SimulatedMesh(mesh if mesh is not None else make_mesh(replicas, proxies, tokens=TOKENS))
    with tempfile.TemporaryDirectory() as tmp:
        pki = make_pki(tmp) if identity else None
        if pki is None:
            await sim.start()
            cfg = Config(
                listen="127.0.0.1:0",
                plaintext=True,
                istiod=(),
                istiod_plaintext=True,
                admin_listen="",
                drain_seconds=1.0,
            )
        else:
            await sim.start(tls=(pki.istiod.cert_pem, pki.istiod.key_pem, pki.ca.cert_pem))
            cfg = pki.identity_config(())
        cfg = dataclasses.replace(cfg, istiod=tuple(sim.addresses), **config)  # type: ignore[arg-type]
        try:
            proxy = Proxy(cfg)
            await proxy.start()
            try:
                yield Stack(sim, proxy, pki)
            finally:
                await proxy.stop(0)
        finally:
            # Also when the proxy fails to start (a busy port): running replicas would outlive the event loop.
            await sim.stop()


def in_flight(proxy: Proxy, type_url: str) -> int:
    """Calls of `type_url` the proxy is answering now (its istioctl_proxy_calls_in_flight gauge)."""
    value = proxy.metrics.registry.get_sample_value("istioctl_proxy_calls_in_flight", {"type_url": type_url})
    return int(value or 0)


def pb_field(number: int, wire_type: int, payload: bytes = b"") -> bytes:
    """One protobuf field as bytes: LEN (2) with `payload`, a group (3) around it, else a fixed dummy value."""
    tag = wire._varint_bytes(number << 3 | wire_type)
    if wire_type == 2:
        return tag + wire._varint_bytes(len(payload)) + payload
    if wire_type == 3:  # a group: its fields, then its end tag
        return tag + payload + wire._varint_bytes(number << 3 | 4)
    return tag + {0: b"\x05", 1: b"\0" * 8, 5: b"\0" * 4}[wire_type]
