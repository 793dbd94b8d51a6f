"""Start a real etcd + kube-apiserver on loopback for the tests (no kubelet, no controllers).

The binaries come from scripts/install-k8s-peers (.peers/bin/etcd and .peers/bin/kube-apiserver, built from
the Go module proxy). Everything the API server needs is minted here with `cryptography`:

* a cluster CA, the API server's serving certificate (127.0.0.1, localhost) and client certificates (the
  admin user is in `system:masters`, so it bypasses RBAC; other users go through RBAC);
* a service-account signing key, so TokenRequest issues real bound tokens and TokenReview verifies them.

An audit log records what service-account users do, so a test can compare the RBAC we ship with the
requests our code really makes. Without a kubelet, tests set pod status themselves (status subresource);
without a controller manager, they create each namespace's `default` ServiceAccount themselves.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from istioctl_proxy.sim.pki import CLIENT_AUTH, SERVER_AUTH, Leaf, TestCA, private_pem, write_file

from ..waits import EVENT_TIMEOUT, until_sync

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".peers" / "bin"
ETCD = BIN / "etcd"
KUBE_APISERVER = BIN / "kube-apiserver"
INSTALL = ROOT / "scripts" / "install-k8s-peers"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"


class PeersMissingError(RuntimeError):
    pass


def peers_missing() -> list[str]:
    return [str(p) for p in (ETCD, KUBE_APISERVER) if not os.access(p, os.X_OK)]


def ensure_peers() -> None:
    """Fail at once, with the command to run, when the binaries are missing: building them (10-20 min cold)
    is scripts/test's job (it runs scripts/install-k8s-peers before pytest), never a test's setup."""
    if missing := peers_missing():
        raise PeersMissingError(
            f"Kubernetes test peers are missing: {', '.join(missing)}. Build them with `{INSTALL}` "
            "(scripts/test does this before running pytest)."
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------------------
# PKI


@dataclass
class Pki:
    """The cluster CA's files: the serving certificate, the SA signing key and the admin client certificate."""

    dir: Path
    ca: TestCA = field(init=False)

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = TestCA("istioctl-proxy test cluster CA", days=2)
        self.ca_file.write_bytes(self.ca_pem)
        serving = self.ca.issue(
            cn="kube-apiserver",
            dns=["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"],
            ips=["127.0.0.1"],
            eku=[SERVER_AUTH],
        )
        self.serving_cert, self.serving_key = self._write("apiserver", serving)
        # RSA: the API server signs service-account tokens with RS256 from this key.
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.sa_key = Path(write_file(self.dir / "sa.key", private_pem(sa_key)))
        self.sa_pub = self.dir / "sa.pub"
        self.sa_pub.write_bytes(
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        # system:masters bypasses RBAC; other users go through it.
        admin = self.ca.issue(cn="admin", orgs=["system:masters"], eku=[CLIENT_AUTH])
        self.admin_cert, self.admin_key = self._write("admin", admin)

    @property
    def ca_pem(self) -> bytes:
        return self.ca.cert_pem

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.crt"

    def _write(self, stem: str, leaf: Leaf) -> tuple[Path, Path]:
        c, k = self.dir / f"{stem}.crt", self.dir / f"{stem}.key"
        c.write_bytes(leaf.cert_pem)
        write_file(k, leaf.key_pem)
        return c, k


# ---------------------------------------------------------------------------------------------------------
# Processes


class _Process:
    """A child process with its log in a file; stopped on close (and at interpreter exit by the session)."""

    name = "process"

    def __init__(self, log: Path) -> None:
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, argv: Sequence[str]) -> None:
        with self.log.open("ab") as out:
            out.write(f"\n=== {' '.join(argv)}\n".encode())
            out.flush()
            # New session: a Ctrl-C in the terminal must not reach the peers before we stop them ourselves.
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, *, kill: bool = False, grace: float = 3.0) -> None:
        """SIGTERM (the API server closes its watches and drains), SIGKILL after `grace` seconds: a
        kube-apiserver with clients still connected can linger for a long time after its shutdown."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def _wait(self, check: Any, what: str, timeout: float) -> None:
        last = [""]

        def done() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                return bool(check())
            except (OSError, urllib.error.URLError, ssl.SSLError) as e:
                last[0] = str(e)
                return False

        until_sync(done, lambda: f"{self.name} {what} ({last[0]}):\n{self.log_tail()}", timeout, step=0.2)


class Etcd(_Process):
    name = "etcd"

    def __init__(self, dir: Path) -> None:
        super().__init__(dir / "etcd.log")
        self.dir = dir
        self.port = free_port()
        self.peer_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        self._spawn([
            str(ETCD), "--name", "test", "--data-dir", str(self.dir / "data"),
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"test={peer}",
            # A throwaway store: fsync only costs time, and a test never survives a power cut.
            "--unsafe-no-fsync", "--log-level", "warn", "--quota-backend-bytes", str(2 << 30),
        ])  # fmt: skip
        self._wait(lambda: self._post("/health", None).get("health") == "true", "healthy", EVENT_TIMEOUT)

    def _post(self, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        with urllib.request.urlopen(urllib.request.Request(self.url + path, data=data), timeout=5) as r:
            result: dict[str, Any] = json.loads(r.read())
            return result

    def revision(self) -> int:
        # etcd's gRPC gateway: a range over any key returns the store's current revision in the header.
        return int(
            self._post("/v3/kv/range", {"key": base64.b64encode(b"\0").decode()})["header"]["revision"]
        )

    def compact(self) -> int:
        """Compact history up to now, as the API server's periodic compaction would; returns the revision."""
        rev = self.revision()
        self._post("/v3/kv/compaction", {"revision": str(rev), "physical": True})
        return rev


AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    # Only service accounts: they are the identities whose RBAC we ship; the admin's setup calls are noise.
    "rules": [{"level": "Metadata", "userGroups": ["system:serviceaccounts"]}, {"level": "None"}],
}


class ApiServer(_Process):
    name = "kube-apiserver"

    def __init__(self, cluster: KubeCluster, tag: str, extra_args: Sequence[str] = ()) -> None:
        super().__init__(cluster.dir / f"apiserver-{tag}.log")
        self.cluster = cluster
        self.tag = tag
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.extra_args = list(extra_args)
        self.audit_log = cluster.dir / f"audit-{tag}.log"

    def start(self, timeout: float = 120) -> None:
        c, pki = self.cluster, self.cluster.pki
        policy = c.dir / "audit-policy.json"
        policy.write_text(json.dumps(AUDIT_POLICY))
        self._spawn([
            str(KUBE_APISERVER),
            "--etcd-servers", c.etcd.url,
            "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
            "--secure-port", str(self.port), "--cert-dir", str(c.dir / "certs"),
            "--tls-cert-file", str(pki.serving_cert), "--tls-private-key-file", str(pki.serving_key),
            "--client-ca-file", str(pki.ca_file),
            "--authorization-mode", "RBAC",
            "--service-account-issuer", SA_ISSUER,
            "--service-account-key-file", str(pki.sa_pub),
            "--service-account-signing-key-file", str(pki.sa_key),
            "--service-cluster-ip-range", "10.96.0.0/24",
            # No kubelet/endpoints to reconcile the `kubernetes` Service against; loopback is not routable.
            "--endpoint-reconciler-type", "none",
            "--audit-policy-file", str(policy), "--audit-log-path", str(self.audit_log),
            "--profiling=false",
            *self.extra_args,
        ])  # fmt: skip
        self._wait(self._ready, "ready", timeout)

    def restart(self) -> None:
        self.stop()
        self.start()

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(
                self.url + "/readyz", context=self.cluster.admin_ssl(), timeout=5
            ) as r:
                return bool(r.status == 200)
        except urllib.error.HTTPError:
            return False

    def audit_events(self) -> list[dict[str, Any]]:
        events = []
        with contextlib.suppress(FileNotFoundError), self.audit_log.open() as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    events.append(json.loads(line))
        return events

    # Kubeconfigs -----------------------------------------------------------------------------------------

    def kubeconfig(self, name: str, user: dict[str, Any], *, context: str | None = None) -> Path:
        """Write a kubeconfig for this API server (JSON, which is YAML) with one context."""
        ctx = context or f"{self.tag}-{name}"
        conf = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": self.tag, "cluster": {
                "server": self.url,
                "certificate-authority-data": base64.b64encode(self.cluster.pki.ca_pem).decode(),
            }}],
            "users": [{"name": name, "user": user}],
            "contexts": [{"name": ctx, "context": {"cluster": self.tag, "user": name}}],
            "current-context": ctx,
        }  # fmt: skip
        path = self.cluster.dir / f"kubeconfig-{self.tag}-{name}-{ctx}.json"
        path.write_text(json.dumps(conf, indent=1))
        return path

    def admin_kubeconfig(self, *, context: str | None = None) -> Path:
        pki = self.cluster.pki
        return self.kubeconfig("admin", {
            "client-certificate-data": base64.b64encode(pki.admin_cert.read_bytes()).decode(),
            "client-key-data": base64.b64encode(pki.admin_key.read_bytes()).decode(),
        }, context=context)  # fmt: skip

    def token_kubeconfig(
        self, name: str, token: str | None = None, *, token_file: Path | None = None
    ) -> Path:
        user: dict[str, Any] = {"tokenFile": str(token_file)} if token_file else {"token": token}
        return self.kubeconfig(name, user)

    def service_account_dir(self, dir: Path, token: str, namespace: str) -> Path:
        """What the kubelet mounts at /var/run/secrets/kubernetes.io/serviceaccount (in-cluster config)."""
        dir.mkdir(parents=True, exist_ok=True)
        (dir / "ca.crt").write_bytes(self.cluster.pki.ca_pem)
        (dir / "token").write_text(token)
        (dir / "namespace").write_text(namespace)
        return dir


class KubeCluster:
    """One etcd and one or more API servers sharing it (a second one lets a test restart "the" API server,
    or run one with other flags, without disturbing the others)."""

    def __init__(self, dir: Path | None = None) -> None:
        ensure_peers()
        self._own_dir = dir is None
        self.dir = dir or Path(tempfile.mkdtemp(prefix="k8s-"))
        self.pki = Pki(self.dir / "pki")
        self.etcd = Etcd(self.dir)
        self.apiservers: list[ApiServer] = []
        self._ssl: ssl.SSLContext | None = None
        try:
            self.etcd.start()
            self.apiserver = self.start_apiserver("main")
        except BaseException:
            self.close()
            raise

    def admin_ssl(self) -> ssl.SSLContext:
        if self._ssl is None:
            ctx = ssl.create_default_context(cafile=str(self.pki.ca_file))
            ctx.load_cert_chain(str(self.pki.admin_cert), str(self.pki.admin_key))
            self._ssl = ctx
        return self._ssl

    def start_apiserver(self, tag: str, extra_args: Sequence[str] = ()) -> ApiServer:
        server = ApiServer(self, tag, extra_args)
        self.apiservers.append(server)
        server.start()
        return server

    def close(self) -> None:
        for server in self.apiservers:
            server.stop()
        self.etcd.stop()
        if self._own_dir and not os.environ.get("K8S_TEST_KEEP"):
            shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def kube_cluster() -> Iterator[KubeCluster]:
    cluster = KubeCluster()
    try:
        yield cluster
    finally:
        cluster.close()
