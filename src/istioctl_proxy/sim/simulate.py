"""Running simulated meshes: `istioctl-proxy simulate` and the embedded-default `istioctl-proxy demo`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import grpc

from .. import client
from ..app import Proxy, free_port
from ..config import Config
from .pki import Leaf, TestCA, write_file
from .simulator import SimReplica, build_simulator_server, make_mesh

__all__ = ["DemoFiles", "SimulatedMesh", "demo_pki", "parse_tokens", "run_demo", "run_simulator", "simulated_mesh"]


def parse_tokens(values: list[str]) -> dict[str, tuple[str, str]]:
    out = {}
    for value in values:
        token, _, ident = value.partition("=")
        ns, _, sa = ident.partition("/")
        if not token or not ns:
            raise SystemExit(f"--token {value!r}: use TOKEN=NAMESPACE/SERVICEACCOUNT")
        out[token] = (ns, sa or "default")
    return out


@dataclass
class SimulatedMesh:
    """Simulated replicas, each serving on its own port."""

    replicas: list[SimReplica]
    addresses: list[str] = field(default_factory=list)
    servers: list[grpc.aio.Server] = field(default_factory=list)
    _crashes: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(
        self, host: str = "127.0.0.1", base_port: int = 0, tls: tuple[bytes, bytes, bytes | None] | None = None
    ) -> None:
        for i, replica in enumerate(self.replicas):
            server, port = build_simulator_server(replica, f"{host}:{base_port + i if base_port else 0}", tls=tls)
            await server.start()
            self.servers.append(server)
            self.addresses.append(f"{host}:{port}")
            replica.on_crash = lambda server=server: self._crash(server)

    def _crash(self, server: grpc.aio.Server) -> None:
        """A replica "panicked": its server stops at once, breaking every stream on it."""
        task = asyncio.get_running_loop().create_task(server.stop(0))
        self._crashes.add(task)
        task.add_done_callback(self._crashes.discard)

    async def stop(self) -> None:
        for server in self.servers:
            await server.stop(0)
        self.servers.clear()


@contextlib.asynccontextmanager
async def simulated_mesh(
    replicas: int,
    proxies: int,
    *,
    tokens: Mapping[str, tuple[str, str]] | None = None,
    tls: tuple[bytes, bytes, bytes | None] | None = None,
    **kw: object,
) -> AsyncIterator[SimulatedMesh]:
    mesh = SimulatedMesh(make_mesh(replicas, proxies, tokens=tokens, **kw))  # type: ignore[arg-type]
    await mesh.start(tls=tls)
    try:
        yield mesh
    finally:
        await mesh.stop()


async def run_simulator(ns: argparse.Namespace) -> None:
    tokens = parse_tokens(ns.token) or {"demo-admin-token": ("istio-system", "default")}
    mesh = SimulatedMesh(
        make_mesh(ns.replicas, ns.proxies, namespaces=ns.namespaces, tokens=tokens, version=ns.istio_version)
    )
    for r in mesh.replicas:
        r.faults.latency = ns.latency
    await mesh.start(ns.listen_host, ns.base_port)
    for r, a in zip(mesh.replicas, mesh.addresses, strict=True):
        print(f"{r.pod_name}: {a} ({len(r.proxies)} proxies)", flush=True)
    print("accepted tokens: " + ", ".join(f"{t} → {n}/{s}" for t, (n, s) in tokens.items()), flush=True)
    await asyncio.Event().wait()


@dataclass
class DemoFiles:
    directory: str
    ca: str
    proxy_cert: str
    proxy_key: str
    upstream_cert: str
    upstream_key: str
    cert_dir: str


def demo_pki(directory: str) -> tuple[DemoFiles, TestCA, Leaf]:
    """One CA for everything: istiod's serving cert, the proxy's two certs and an admin cert-dir for istioctl."""
    ca = TestCA()
    istiod = ca.issue(dns=("istiod.istio-system.svc",))
    proxy = ca.issue_serving()
    upstream = ca.issue_spiffe("istio-system", "istioctl-proxy")
    admin = ca.issue_spiffe("istio-system", "default")

    def j(name: str) -> str:
        return os.path.join(directory, name)

    files = DemoFiles(
        directory,
        write_file(j("ca.pem"), ca.cert_pem),
        write_file(j("proxy.pem"), proxy.cert_pem),
        write_file(j("proxy-key.pem"), proxy.key_pem),
        write_file(j("upstream.pem"), upstream.cert_pem),
        write_file(j("upstream-key.pem"), upstream.key_pem),
        str(ca.write_cert_dir(j("istioctl-certs"), admin)),
    )
    return files, ca, istiod


async def run_demo(ns: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="istioctl-proxy-demo-") as tmp:
        files, ca, istiod = demo_pki(tmp)
        async with simulated_mesh(ns.replicas, ns.proxies, tls=(istiod.cert_pem, istiod.key_pem, ca.cert_pem)) as mesh:
            port = ns.port or free_port()
            cfg = Config(
                listen=f"127.0.0.1:{port}",
                tls_cert=files.proxy_cert,
                tls_key=files.proxy_key,
                client_ca=files.ca,
                istiod=tuple(mesh.addresses),
                istiod_ca=files.ca,
                upstream_identity=True,
                upstream_cert=files.upstream_cert,
                upstream_key=files.upstream_key,
                admin_listen="",
            )
            proxy = Proxy(cfg)
            await proxy.start()
            try:
                for r, a in zip(mesh.replicas, mesh.addresses, strict=True):
                    print(f"simulated istiod {r.pod_name} on {a}: {len(r.proxies)} proxies")
                print(f"istioctl-proxy on 127.0.0.1:{proxy.port} (identity mode, mTLS)\n")
                admin = ca.issue_spiffe("istio-system", "default")
                target = client.Target(
                    f"127.0.0.1:{proxy.port}",
                    ca_pem=ca.cert_pem,
                    cert_pem=admin.cert_pem,
                    key_pem=admin.key_pem,
                    authority="localhost",
                )
                resp, _ = await client.request(target, client.SYNCZ)
                print("$ istioctl x ps   # through istioctl-proxy, all replicas merged")
                print(client.table(resp))
                print("To point a real istioctl at it (run with --serve to keep it up):")
                print(
                    f"  istioctl x ps --xds-address 127.0.0.1:{proxy.port} --cert-dir {files.cert_dir} "
                    "--authority localhost -r default"
                )
                if ns.serve:
                    print("serving; Ctrl-C to stop", flush=True)
                    await asyncio.Event().wait()
            finally:
                await proxy.stop(0)
    return 0
