"""Bring-up of the real clusters scripts/e2e-cluster runs (teardown is scripts/cluster/teardown).

* external cluster: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy (iptables),
  containerd + runc, kubelet, the bridge CNI plugin. One node, `e2e-node`.
* mesh (remote) cluster: etcd + kube-apiserver only; istiod's config cluster (its KUBECONFIG, as Istio's
  external control plane runs it), where istioctl users and their tokens live.

Every address is one this run creates: the bridge `ipxe2e0` (10.244.0.1/24, the pod gateway, and
10.250.250.1/32, where both API servers and the kubelet listen so pods reach them), pods in 10.244.0.0/24,
Services in 10.96.100.0/24 (routed on this machine from 10.244.0.1 so host clients reach ClusterIPs). Every
process is recorded in STATE/pids before anything waits on it, every host setting changed in STATE/sysctl,
so scripts/cluster/teardown can undo all of it even after a crash.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from ..waits import until_sync
from . import pki

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".peers" / "bin"
STATE = Path(os.environ.get("ISTIOCTL_PROXY_CLUSTER_STATE", "/tmp/istioctl-proxy-cluster"))
BASE = int(os.environ.get("ISTIOCTL_PROXY_E2E_BASE_PORT", "31000"))

BRIDGE = "ipxe2e0"
GATEWAY = "10.244.0.1"
POD_CIDR = "10.244.0.0/24"
NODE_IP = "10.250.250.1"          # advertise address of both API servers and the kubelet's address
SERVICE_CIDR = "10.96.100.0/24"   # external cluster; routed on this host via the bridge
KUBERNETES_SVC = "10.96.100.1"
MESH_SERVICE_CIDR = "10.96.101.0/24"  # mesh cluster: never routed, it has no nodes
NODE = "e2e-node"
ISTIO_NS = "external-istiod"
MESH_CLUSTER_ID = "mesh"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"

# Host settings the node changes (kubelet sets kernel tunables, kube-proxy and the bridge need forwarding):
# saved before and restored by the teardown.
SYSCTLS = ("net/ipv4/ip_forward", "net/bridge/bridge-nf-call-iptables", "net/ipv4/conf/all/route_localnet",
           "vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
           "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes")


@dataclass(frozen=True)
class Ports:
    etcd_ext: int = BASE + 1
    etcd_ext_peer: int = BASE + 2
    etcd_mesh: int = BASE + 3
    etcd_mesh_peer: int = BASE + 4
    api_ext: int = BASE + 43
    api_mesh: int = BASE + 44
    kcm: int = BASE + 57
    scheduler: int = BASE + 59
    kubelet: int = BASE + 50
    kubelet_healthz: int = BASE + 48
    proxy_healthz: int = BASE + 56
    proxy_metrics: int = BASE + 49
    cri_stream: int = BASE + 51


PORTS = Ports()
T = TypeVar("T")


class ClusterError(RuntimeError):
    pass


def wait_for(what: str, check: Callable[[], T | None], timeout: float, on_fail: Callable[[], str] = lambda: "") -> T:
    """The one wait (tests/waits.py) over a condition whose own failures (a kubectl call, a socket) are retried
    until the backstop; the last one and `on_fail()` (a log tail) go into the message."""
    last: list[BaseException] = []

    def attempt() -> T | None:
        try:
            return check()
        except Exception as e:  # retried: the thing awaited may not answer yet
            last[:] = [e]
            return None

    def describe() -> str:
        return what + (f" (last error: {last[0]})" if last else "") + (f"\n{tail}" if (tail := on_fail()) else "")

    return cast(T, until_sync(attempt, describe, timeout, step=0.2))


def sh(*argv: str | Path, check: bool = True, input: str | None = None, env: Mapping[str, str] | None = None,
       timeout: float = 120) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True, input=input, timeout=timeout,
                       env=None if env is None else {**os.environ, **env})
    if check and p.returncode != 0:
        raise ClusterError(f"{' '.join(map(str, argv))} exited {p.returncode}: {p.stderr.strip()[-2000:]}")
    return p


@dataclass
class Processes:
    """Long-running processes, each in its own session (so a process group kill takes its children)."""

    state: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def spawn(self, name: str, argv: Sequence[str | Path], env: Mapping[str, str] | None = None) -> None:
        log = (self.state / "logs" / f"{name}.log").open("ab")
        p = subprocess.Popen([str(a) for a in argv], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, env={**os.environ, **(env or {})}, cwd=self.state)
        with (self.state / "pids").open("a") as f:
            f.write(f"{name} {p.pid}\n")
        self.procs[name] = p

    def alive(self, name: str) -> bool:
        return self.procs[name].poll() is None

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.state / "logs" / f"{name}.log"
        text = path.read_text(errors="replace").splitlines() if path.exists() else []
        return f"--- {name}.log\n" + "\n".join(text[-lines:])


def kubeconfig(server: str, ca: Path, cert: Path | None = None, key: Path | None = None,
               token: str | None = None, user: str = "user") -> str:
    u: dict[str, Any] = {"token": token} if token else {
        "client-certificate-data": base64.b64encode(Path(cert or "").read_bytes()).decode(),
        "client-key-data": base64.b64encode(Path(key or "").read_bytes()).decode()}
    return json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {
            "server": server, "certificate-authority-data": base64.b64encode(ca.read_bytes()).decode()}}],
        "users": [{"name": user, "user": u}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": user}}],
    })  # fmt: skip


@dataclass
class ApiCluster:
    """One etcd + kube-apiserver and the certificates of its cluster."""

    name: str
    dir: Path
    port: int
    etcd_port: int
    etcd_peer: int
    service_cidr: str
    service_ip: str
    ca: pki.TestCA = field(init=False)
    ca_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = pki.TestCA(name=f"{self.name} cluster CA", days=2)
        self.ca_file = self.dir / "ca.crt"
        self.ca_file.write_bytes(self.ca.cert_pem)

    @property
    def server(self) -> str:
        return f"https://{NODE_IP}:{self.port}"

    def user_kubeconfig(self, file: str, cn: str, orgs: Sequence[str] = ()) -> Path:
        crt, key = pki.write(self.ca.issue(cn=cn, orgs=orgs, eku=[pki.CLIENT_AUTH]), self.dir / "pki", file)
        path = self.dir / f"{file}.kubeconfig"
        path.write_text(kubeconfig(self.server, self.ca_file, crt, key, user=cn))
        return path

    def start(self, procs: Processes, extra: Sequence[str] = ()) -> None:
        d = self.dir
        etcd_url, peer = f"http://127.0.0.1:{self.etcd_port}", f"http://127.0.0.1:{self.etcd_peer}"
        procs.spawn(f"etcd-{self.name}", [
            BIN / "etcd", "--name", self.name, "--data-dir", d / "etcd",
            "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}", "--unsafe-no-fsync", "--log-level", "warn",
            "--listen-metrics-urls", "",
        ])  # fmt: skip
        serving = self.ca.issue(cn="kube-apiserver", eku=[pki.SERVER_AUTH], ips=[NODE_IP, self.service_ip, "127.0.0.1"],
                                dns=["kubernetes", "kubernetes.default", "kubernetes.default.svc",
                                     "kubernetes.default.svc.cluster.local", "localhost"])
        crt, key = pki.write(serving, d / "pki", "apiserver")
        sa_private, sa_public = pki.sa_keys()
        (d / "pki" / "sa.key").write_bytes(sa_private)
        (d / "pki" / "sa.pub").write_bytes(sa_public)
        self.admin = self.user_kubeconfig("admin", "admin", ["system:masters"])
        procs.spawn(f"kube-apiserver-{self.name}", [
            BIN / "kube-apiserver", "--etcd-servers", etcd_url,
            "--bind-address", NODE_IP, "--advertise-address", NODE_IP, "--secure-port", str(self.port),
            "--cert-dir", d / "pki", "--tls-cert-file", crt, "--tls-private-key-file", key,
            "--client-ca-file", self.ca_file,
            "--service-account-issuer", SA_ISSUER, "--service-account-key-file", d / "pki" / "sa.pub",
            "--service-account-signing-key-file", d / "pki" / "sa.key",
            "--service-cluster-ip-range", self.service_cidr, "--profiling=false",
            *extra,
        ])  # fmt: skip
        wait_for(f"{self.name} kube-apiserver /readyz", lambda: self.kubectl("get", "--raw", "/readyz", check=False)
                 .stdout.strip() == "ok", 120, lambda: procs.log_tail(f"kube-apiserver-{self.name}"))

    def kubectl(self, *args: str | Path, check: bool = True, input: str | None = None,
                timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return sh(BIN / "kubectl", "--kubeconfig", self.admin, *args, check=check, input=input, timeout=timeout)

    def apply(self, *docs: Mapping[str, Any]) -> None:
        self.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(docs)}))

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def token(self, namespace: str, account: str, duration: str = "48h", audience: str | None = None) -> str:
        args = ["create", "token", account, "-n", namespace, "--duration", duration]
        if audience:
            args += ["--audience", audience]
        return self.kubectl(*args).stdout.strip()


def read_sysctl(name: str) -> str | None:
    try:
        return (Path("/proc/sys") / name).read_text().strip()
    except OSError:
        return None


def write_sysctl(name: str, value: str) -> None:
    (Path("/proc/sys") / name).write_text(value)


def check_addresses_free() -> None:
    """Refuse to start when anything on this machine already uses our ranges (another run, another network)."""
    addrs = sh("ip", "-o", "addr").stdout + sh("ip", "route").stdout + sh("ip", "link").stdout
    for needle in ("10.244.0.", "10.250.250.", "10.96.100.", "10.96.101.", BRIDGE):
        if needle in addrs:
            raise ClusterError(f"{needle} is already in use on this machine (ip addr/route/link); "
                               "a previous run not torn down? scripts/cluster/teardown")


def setup_network(state: Path) -> None:
    check_addresses_free()
    saved = {n: v for n in SYSCTLS if (v := read_sysctl(n)) is not None}
    (state / "sysctl").write_text("".join(f"{n} {v}\n" for n, v in saved.items()))
    sh("ip", "link", "add", BRIDGE, "type", "bridge")
    sh("ip", "addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
    sh("ip", "addr", "add", f"{NODE_IP}/32", "dev", BRIDGE)
    sh("ip", "link", "set", BRIDGE, "up")
    # Host clients (istioctl, Envoys) reach ClusterIPs through kube-proxy's OUTPUT rules; this route makes their
    # source the bridge address, never the machine's own.
    sh("ip", "route", "add", SERVICE_CIDR, "dev", BRIDGE, "src", GATEWAY)
    write_sysctl("net/ipv4/ip_forward", "1")
    write_sysctl("net/bridge/bridge-nf-call-iptables", "1")
    # Pods talk to each other, to the host (API servers on NODE_IP) and to Services: nothing is forwarded
    # anywhere else (no NAT to the outside exists either; this makes it explicit).
    sh("iptables", "-w", "-N", "IPX-E2E")
    sh("iptables", "-w", "-A", "IPX-E2E", "-s", POD_CIDR, "-d", POD_CIDR, "-j", "RETURN")
    sh("iptables", "-w", "-A", "IPX-E2E", "-s", POD_CIDR, "-j", "DROP")
    sh("iptables", "-w", "-A", "IPX-E2E", "-d", POD_CIDR, "!", "-s", POD_CIDR, "!", "-i", BRIDGE, "-j", "DROP")
    sh("iptables", "-w", "-I", "FORWARD", "1", "-j", "IPX-E2E")


def containerd_config(state: Path, pause_ref: str) -> Path:
    c = state / "containerd"
    text = f"""version = 2
root = "{c}/root"
state = "{c}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{state}/containerd.sock"
[ttrpc]
  address = "{state}/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{c}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause_ref}"
  # Without it every sandbox fails here (root cannot lower oom_score_adj): "can't get final child's PID from pipe".
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "{PORTS.cri_stream}"
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "/usr/sbin/runc"
        Root = "{state}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{state}/cni/net.d"
"""
    c.mkdir(parents=True, exist_ok=True)
    path = c / "config.toml"
    path.write_text(text)
    net = state / "cni" / "net.d"
    net.mkdir(parents=True, exist_ok=True)
    (net / "10-ipx-e2e.conflist").write_text(json.dumps({
        "cniVersion": "0.4.0", "name": "ipx-e2e",
        "plugins": [{"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
                     "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR, "gateway": GATEWAY}]],
                              "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(state / "cni" / "ipam")}}],
    }))  # fmt: skip
    return path


def ctr(state: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return sh("ctr", "--address", state / "containerd.sock", "-n", "k8s.io", *args, timeout=600)


@dataclass
class Images:
    proxy_ref: str
    istiod_ref: str
    pause_ref: str
    tars: tuple[Path, ...]

    @classmethod
    def current(cls) -> Images:
        path = ROOT / ".peers" / "images" / "current"
        if not path.exists():
            raise ClusterError(f"{path} missing: run scripts/image first")
        kv = dict(line.split("=", 1) for line in path.read_text().split())
        return cls(kv["PROXY_REF"], kv["ISTIOD_REF"], kv["PAUSE_REF"],
                   (Path(kv["PROXY_TAR"]), Path(kv["ISTIOD_TAR"]), Path(kv["PAUSE_TAR"])))


@dataclass
class Node:
    """The external cluster's node side: containerd, kubelet, kube-proxy, controllers."""

    state: Path
    ext: ApiCluster
    procs: Processes
    images: Images

    def start(self) -> None:
        s, ext = self.state, self.ext
        cfg = containerd_config(s, self.images.pause_ref)
        self.procs.spawn("containerd", ["containerd", "--config", cfg])
        wait_for("containerd", lambda: sh("ctr", "--address", s / "containerd.sock", "version", check=False)
                 .returncode == 0, 60, lambda: self.procs.log_tail("containerd"))
        for tar in self.images.tars:  # unpacked into the overlayfs snapshotter the CRI plugin uses
            ctr(s, "images", "import", tar)
        self._controllers()
        self._kubelet()
        self._kube_proxy()
        wait_for("node Ready", lambda: any(c["type"] == "Ready" and c["status"] == "True" for c in
                                           ext.get("node", NODE)["status"]["conditions"]), 180,
                 lambda: self.procs.log_tail("kubelet"))

    def _controllers(self) -> None:
        ext, d = self.ext, self.ext.dir
        kcm = ext.user_kubeconfig("kube-controller-manager", "system:kube-controller-manager")
        self.procs.spawn("kube-controller-manager", [
            BIN / "kube-controller-manager", "--kubeconfig", kcm, "--authentication-kubeconfig", kcm,
            "--authorization-kubeconfig", kcm, "--bind-address", "127.0.0.1", "--secure-port", str(PORTS.kcm),
            "--service-account-private-key-file", d / "pki" / "sa.key", "--root-ca-file", ext.ca_file,
            "--use-service-account-credentials", "--leader-elect=false", "--cluster-name", "external",
            "--cert-dir", d / "pki" / "kcm", "--profiling=false",
        ])  # fmt: skip
        sched = ext.user_kubeconfig("kube-scheduler", "system:kube-scheduler")
        self.procs.spawn("kube-scheduler", [
            BIN / "kube-scheduler", "--kubeconfig", sched, "--authentication-kubeconfig", sched,
            "--authorization-kubeconfig", sched, "--bind-address", "127.0.0.1", "--secure-port", str(PORTS.scheduler),
            "--leader-elect=false", "--cert-dir", d / "pki" / "scheduler", "--profiling=false",
        ])  # fmt: skip

    def _kubelet(self) -> None:
        s, ext = self.state, self.ext
        node_kc = ext.user_kubeconfig("kubelet", f"system:node:{NODE}", ["system:nodes"])
        serving = ext.ca.issue(cn=NODE, eku=[pki.SERVER_AUTH], ips=[NODE_IP], dns=[NODE])
        crt, key = pki.write(serving, ext.dir / "pki", "kubelet-serving")
        (s / "resolv.conf").write_text("")
        cfg = s / "kubelet.json"
        cfg.write_text(json.dumps({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "address": NODE_IP, "port": PORTS.kubelet, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": PORTS.kubelet_healthz,
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(ext.ca_file)}},
            "authorization": {"mode": "Webhook"},
            "tlsCertFile": str(crt), "tlsPrivateKeyFile": str(key),
            # This machine: cgroup v1 (hybrid), no systemd, no swap accounting wanted, rlimits not raisable.
            "failCgroupV1": False, "cgroupDriver": "cgroupfs", "failSwapOn": False,
            "enforceNodeAllocatable": [], "protectKernelDefaults": False,
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%"},
            # Our images exist only locally (pullPolicy Never): never garbage-collect them.
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "containerRuntimeEndpoint": f"unix://{s}/containerd.sock",
            "podLogsDir": str(s / "pod-logs"), "resolvConf": str(s / "resolv.conf"),
            "serializeImagePulls": False, "maxPods": 30, "rotateCertificates": False,
            "syncFrequency": "10s", "fileCheckFrequency": "10s", "nodeStatusUpdateFrequency": "5s",
        }))  # fmt: skip
        self.procs.spawn("kubelet", [
            BIN / "kubelet", "--config", cfg, "--kubeconfig", node_kc, "--root-dir", s / "kubelet",
            "--hostname-override", NODE, "--node-ip", NODE_IP, "--v=1",
        ])  # fmt: skip

    def _kube_proxy(self) -> None:
        s = self.state
        kc = self.ext.user_kubeconfig("kube-proxy", "system:kube-proxy")
        cfg = s / "kube-proxy.json"
        cfg.write_text(json.dumps({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(kc)}, "mode": "iptables", "clusterCIDR": POD_CIDR,
            "hostnameOverride": NODE,
            "healthzBindAddress": f"127.0.0.1:{PORTS.proxy_healthz}",
            "metricsBindAddress": f"127.0.0.1:{PORTS.proxy_metrics}",
            # It cannot raise conntrack limits here (no CAP_SYS_RESOURCE-like rights over them): leave them.
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
            # NodePorts only on our bridge address, never on the machine's own; no localhost NodePorts
            # (they would flip route_localnet).
            "nodePortAddresses": [f"{NODE_IP}/32"],
            "iptables": {"localhostNodePorts": False, "syncPeriod": "30s", "minSyncPeriod": "0s"},
        }))  # fmt: skip
        self.procs.spawn("kube-proxy", [BIN / "kube-proxy", "--config", cfg])
