"""scripts/e2e-cluster: the proxy image, installed with our Helm chart in a real cluster beside real istiod Pods,
serving real istioctl for a remote mesh cluster. One line per check; last line `cluster e2e: N/N checks passed`.

Run through scripts/e2e-cluster (which tears everything down on exit, interrupt or crash); this module only
brings things up and checks. Waits are on conditions (kubectl wait / rollout status / polling a predicate),
never fixed sleeps.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import objects, pki
from .cluster import (
    BIN,
    GATEWAY,
    ISTIO_NS,
    MESH_CLUSTER_ID,
    MESH_SERVICE_CIDR,
    PORTS,
    ROOT,
    SERVICE_CIDR,
    STATE,
    ApiCluster,
    ClusterError,
    Images,
    Node,
    Processes,
    kubeconfig,
    setup_network,
    sh,
    wait_for,
)

RELEASE = "istioctl-proxy"
CHART = ROOT / "deploy" / "helm" / "istioctl-proxy"
ENVOYS = (("shop", "gw-0"), ("shop", "gw-1"), ("pay", "gw-0"), ("pay", "gw-1"), ("shop", "gw-2"))
PROXY_VERSION = "1.30.3"
CANARY = "1-31"  # the canary revision (docs/deploy.md "Canary upgrades")


def say(line: str) -> None:
    print(line, flush=True)


@dataclass
class Row:
    name: str
    cluster: str
    istiod: str
    version: str
    types: str

    def key(self) -> tuple[str, str, str, str]:
        return (self.name, self.cluster, self.version, self.types)


def parse_ps(out: str) -> list[Row]:
    lines = [ln for ln in out.splitlines() if ln.strip()]
    if not lines or not lines[0].startswith("NAME"):
        raise ClusterError(f"not a proxy-status table:\n{out}")
    rows = []
    for ln in lines[1:]:
        cols = re.split(r"\s{2,}", ln.strip())
        rows.append(Row(*cols[:4], " ".join(cols[4:])))
    return rows


_HTTP_OPTS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = "envoy.extensions.filters.http.router.v3.Router"


def _addr(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


_STATIC_LISTENER = {
    "name": "static", "address": _addr("127.0.0.1", 0),
    "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": f"type.googleapis.com/{_HCM}", "stat_prefix": "static",
        "route_config": {"name": "static", "virtual_hosts": [{"name": "l", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "direct_response": {"status": 200}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router",
                          "typed_config": {"@type": f"type.googleapis.com/{_ROUTER}"}}],
    }}]}],
}  # fmt: skip


@dataclass
class Envoy:
    namespace: str
    name: str
    istiod_ip: str
    dir: Path

    @property
    def proxy_id(self) -> str:
        return f"{self.name}.{self.namespace}"

    def bootstrap(self) -> dict[str, Any]:
        """A router (all SYNCED with stock Envoy) on ADS to one istiod Pod's plaintext port, as in tests/e2e."""
        return {
            "node": {"id": f"router~{GATEWAY}~{self.proxy_id}~{self.namespace}.svc.cluster.local",
                     "cluster": self.proxy_id,
                     "metadata": {"PROXY_CONFIG": {}, "ISTIO_VERSION": PROXY_VERSION, "NAMESPACE": self.namespace,
                                  "CLUSTER_ID": MESH_CLUSTER_ID}},
            "admin": {"address": _addr("127.0.0.1", 0)},
            "dynamic_resources": {
                "ads_config": {"api_type": "GRPC", "transport_api_version": "V3",
                               "set_node_on_first_message_only": True,
                               "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}]},
                "cds_config": {"ads": {}, "resource_api_version": "V3"},
                "lds_config": {"ads": {}, "resource_api_version": "V3"},
            },
            # A static HCM with an inline route table, as istio-proxy's own listeners: `ps <pod> --file` needs
            # a RoutesConfigDump in the dump.
            "static_resources": {"listeners": [_STATIC_LISTENER], "clusters": [{
                "name": "xds-grpc", "type": "STATIC", "connect_timeout": "1s",
                "load_assignment": {"cluster_name": "xds-grpc", "endpoints": [
                    {"lb_endpoints": [{"endpoint": {"address": _addr(self.istiod_ip, 15010)}}]}]},
                "typed_extension_protocol_options": {_HTTP_OPTS: {
                    "@type": f"type.googleapis.com/{_HTTP_OPTS}",
                    "explicit_http_config": {"http2_protocol_options": {}}}},
            }]},
        }  # fmt: skip

    def start(self, procs: Processes) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "bootstrap.json").write_text(json.dumps(self.bootstrap()))
        procs.spawn(f"envoy-{self.namespace}-{self.name}", [
            BIN / "envoy", "-c", self.dir / "bootstrap.json", "--admin-address-path", self.dir / "admin",
            "--disable-hot-restart", "-l", "warning"])  # fmt: skip

    def config_dump(self) -> Path:
        admin = wait_for("envoy admin address", lambda: (self.dir / "admin").read_text().strip(), 30)
        with urllib.request.urlopen(f"http://{admin}/config_dump", timeout=10) as r:
            path = self.dir / "config_dump.json"
            path.write_bytes(r.read())
        return path


@dataclass
class Run:
    state: Path
    procs: Processes
    results: list[tuple[str, bool, str]] = field(default_factory=list)
    envoys: list[Envoy] = field(default_factory=list)

    # -- bring-up ------------------------------------------------------------------------------------------
    def up(self) -> None:
        t0 = time.monotonic()
        self.images = Images.current()
        setup_network(self.state)
        self.ext = ApiCluster("external", self.state / "external", PORTS.api_ext, PORTS.etcd_ext, PORTS.etcd_ext_peer,
                              SERVICE_CIDR, SERVICE_CIDR.replace("0/24", "1"))
        self.mesh = ApiCluster("mesh", self.state / "mesh", PORTS.api_mesh, PORTS.etcd_mesh, PORTS.etcd_mesh_peer,
                               MESH_SERVICE_CIDR, MESH_SERVICE_CIDR.replace("0/24", "1"))
        self.ext.start(self.procs, ["--authorization-mode", "Node,RBAC",
                                    "--enable-admission-plugins", "NodeRestriction",
                                    "--kubelet-client-certificate", self._kubelet_client()[0],
                                    "--kubelet-client-key", self._kubelet_client()[1],
                                    "--kubelet-certificate-authority", self.state / "external" / "ca.crt",
                                    "--kubelet-preferred-address-types", "InternalIP"])
        # The mesh cluster has no nodes and no endpoints to reconcile.
        self.mesh.start(self.procs, ["--authorization-mode", "RBAC", "--endpoint-reconciler-type", "none"])
        self.node = Node(self.state, self.ext, self.procs, self.images)
        self.node.start()
        say(f"# clusters up in {time.monotonic() - t0:.0f} s (node Ready)")
        self._mesh_side()
        self._istiod(2)
        self._proxy_install()
        self._start_envoys()
        say(f"# everything up in {time.monotonic() - t0:.0f} s")
        self._session()

    def _session(self) -> None:
        """A transcript of the running setup for docs/deploy.md (logs/session.txt, copied out with the logs)."""
        out = []
        for cmd, text in [
            ("kubectl -n external-istiod get pods -o wide", self.ext.kubectl("get", "pods", "-n", ISTIO_NS, "-o",
                                                                             "wide").stdout),
            ("kubectl -n external-istiod get deploy,svc,pdb", self.ext.kubectl("get", "deploy,svc,pdb", "-n",
                                                                              ISTIO_NS).stdout),
            (f"ISTIOCTL_XDS_ADDRESS={self.proxy_address()} istioctl proxy-status", self.ok_istioctl("proxy-status")),
            *((f"ISTIOCTL_XDS_ADDRESS={ip}:15012 istioctl proxy-status    # {name} directly",
               self.ok_istioctl("proxy-status", xds=f"{ip}:15012")) for name, ip in sorted(self.istiod_pods().items())),
            ("istioctl x version", self.ok_istioctl("x", "version")),
        ]:
            out.append(f"$ {cmd}\n{text.rstrip()}\n")
        (self.state / "logs" / "session.txt").write_text("\n".join(out))

    def _kubelet_client(self) -> tuple[Path, Path]:
        d = self.state / "external" / "pki"
        if not (d / "apiserver-kubelet-client.crt").exists():
            leaf = self.ext.ca.issue(cn="kube-apiserver-kubelet-client", orgs=["system:masters"], eku=[pki.CLIENT_AUTH])
            pki.write(leaf, d, "apiserver-kubelet-client")
        return d / "apiserver-kubelet-client.crt", d / "apiserver-kubelet-client.key"

    def _mesh_side(self) -> None:
        m = self.mesh
        m.apply(*(objects.namespace(n) for n in (ISTIO_NS, *objects.WORKLOAD_NAMESPACES)))
        # No controller manager in the mesh cluster: the `default` accounts istioctl and workloads use, by hand.
        m.apply(*(objects.service_account("default", n) for n in (ISTIO_NS, *objects.WORKLOAD_NAMESPACES)),
                objects.service_account("istiod", ISTIO_NS), *objects.istiod_config_cluster_rbac(),
                *objects.mesh_operator_rbac("mesh-operator"),
                {"apiVersion": "v1", "kind": "ConfigMap", "metadata": objects.meta("istio", ISTIO_NS),
                 "data": {"mesh": objects.MESH_CONFIG}})
        self.istioctl_kubeconfig = m.user_kubeconfig("mesh-operator", "mesh-operator")

    def _istiod(self, replicas: int) -> None:
        e, m = self.ext, self.mesh
        e.apply(objects.namespace(ISTIO_NS))
        # istio-kubeconfig, as `istioctl create-remote-secret --type=config` writes it: istiod's credential for
        # its config cluster (a token of the mesh cluster's istiod account).
        config = kubeconfig(m.server, m.ca_file, token=m.token(ISTIO_NS, "istiod"), user="istiod")
        self.root = pki.TestCA(name="istio e2e root", days=2)
        root_pem = self.root.cert_pem.decode()
        e.apply(
            {"apiVersion": "v1", "kind": "Secret", "metadata": objects.meta("istio-kubeconfig", ISTIO_NS),
             "stringData": {"config": config}},
            {"apiVersion": "v1", "kind": "Secret", "metadata": objects.meta("cacerts", ISTIO_NS),
             "stringData": {"ca-cert.pem": root_pem, "root-cert.pem": root_pem, "cert-chain.pem": root_pem,
                            "ca-key.pem": self.root.key_pem.decode()}},
            *objects.istiod_deployment(self.images.istiod_ref, replicas),
        )
        self.rollout("deploy/istiod")
        # istiod writes istio-ca-root-cert into the namespaces of its config cluster (the mesh cluster); the
        # proxy beside it reads it in the external one: copied as docs/deploy.md step 3 says.
        m.kubectl("wait", "--for=create", "configmap/istio-ca-root-cert", "-n", ISTIO_NS, "--timeout=120s")
        pem = m.get("configmap", "istio-ca-root-cert", "-n", ISTIO_NS)["data"]["root-cert.pem"]
        if pem.strip() != root_pem.strip():
            raise ClusterError("istio-ca-root-cert in the mesh cluster is not the plugged root")
        e.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": objects.meta("istio-ca-root-cert", ISTIO_NS),
                 "data": {"root-cert.pem": pem}})

    def _proxy_install(self) -> None:
        e = self.ext
        ca = pki.TestCA(name="istioctl-proxy serving CA", days=2)
        leaf = ca.issue(cn="istioctl-proxy", eku=[pki.SERVER_AUTH],
                        dns=["istioctl-proxy.external-istiod.svc", "localhost"])
        e.apply({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                 "metadata": objects.meta("istioctl-proxy-tls", ISTIO_NS),
                 "stringData": {"tls.crt": leaf.cert_pem.decode(), "tls.key": leaf.key_pem.decode(),
                                "ca.crt": ca.cert_pem.decode()}})
        self.helm("install", *self.image_values())
        self.rollout(f"deploy/{RELEASE}")

    def image_values(self) -> list[str]:
        repo, tag = self.images.proxy_ref.rsplit(":", 1)
        return ["--set", f"image.repository={repo}", "--set", f"image.tag={tag}", "--set", "image.pullPolicy=Never"]

    def helm(self, verb: str, *args: str) -> str:
        return sh(BIN / "helm", verb, RELEASE, CHART, "-n", ISTIO_NS, "--kubeconfig", self.ext.admin, *args,
                  timeout=300).stdout

    def rollout(self, what: str, timeout: str = "180s") -> None:
        self.ext.kubectl("rollout", "status", what, "-n", ISTIO_NS, f"--timeout={timeout}", timeout=240)

    def istiod_pods(self) -> dict[str, str]:
        """Ready istiod pods: name -> IP."""
        pods = self.ext.get("pods", "-n", ISTIO_NS, "-l", "app=istiod")["items"]
        return {p["metadata"]["name"]: p["status"]["podIP"] for p in pods
                if not p["metadata"].get("deletionTimestamp")
                and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))}

    def _start_envoys(self) -> None:
        ips = sorted(self.istiod_pods().values())
        for proc in [n for n in self.procs.procs if n.startswith("envoy-")]:
            sh("kill", str(self.procs.procs[proc].pid), check=False)
            self.procs.procs[proc].wait()
            del self.procs.procs[proc]
        self.envoys = [Envoy(ns, name, ips[i % len(ips)], self.state / "envoys" / f"{ns}-{name}")
                       for i, (ns, name) in enumerate(ENVOYS)]
        for e in self.envoys:
            e.start(self.procs)
        want = {e.proxy_id for e in self.envoys}
        wait_for("every Envoy listed by the istiod it is connected to",
                 lambda: {r.name for r in self.direct_union()} >= want, 120)

    # -- istioctl ------------------------------------------------------------------------------------------
    def proxy_address(self) -> str:
        svc = self.ext.get("service", RELEASE, "-n", ISTIO_NS)
        return f"{svc['spec']['clusterIP']}:9090"

    def istioctl(self, *args: str, xds: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        home = self.state / "istioctl-home"
        home.mkdir(exist_ok=True)
        env = {"HOME": str(home), "KUBECONFIG": str(self.istioctl_kubeconfig),
               "ISTIOCTL_XDS_ADDRESS": xds or self.proxy_address(), "ISTIOCTL_ISTIONAMESPACE": ISTIO_NS,
               "ISTIOCTL_PREFER_EXPERIMENTAL": "true"}
        return subprocess.run([str(BIN / "istioctl"), *args], capture_output=True, text=True, timeout=timeout,
                               env={k: v for k, v in os.environ.items() if not k.startswith("ISTIOCTL_")} | env)

    def ok_istioctl(self, *args: str, xds: str | None = None) -> str:
        p = self.istioctl(*args, xds=xds)
        if p.returncode != 0:
            raise ClusterError(f"istioctl {' '.join(args)} exited {p.returncode}: {p.stderr.strip()[-1500:]}")
        return p.stdout

    def direct(self) -> dict[str, list[Row]]:
        return {name: parse_ps(self.ok_istioctl("proxy-status", xds=f"{ip}:15012"))
                for name, ip in self.istiod_pods().items()}

    def direct_union(self) -> list[Row]:
        return [r for rows in self.direct().values() for r in rows]

    # -- checks --------------------------------------------------------------------------------------------
    def check(self, name: str, fn: Callable[[], str]) -> None:
        t = time.monotonic()
        try:
            detail = fn()
            ok = True
        except Exception as e:  # a failed check is reported and the run goes on to the next one
            ok, detail = False, f"{type(e).__name__}: {e}"
            (self.state / "logs" / "failures.log").open("a").write(f"== {name}\n{traceback.format_exc()}\n")
        self.results.append((name, ok, detail))
        say(f"{'PASS' if ok else 'FAIL'} {name} ({time.monotonic() - t:.1f} s): {detail}")

    def ps_equals_union(self) -> str:
        def compare() -> str | None:
            direct = self.direct()
            union = sorted(r.key() for rows in direct.values() for r in rows)
            for pod, rows in direct.items():
                if {r.istiod for r in rows} - {pod}:
                    raise ClusterError(f"{pod} answered rows for {[r.istiod for r in rows]}")
            via = parse_ps(self.ok_istioctl("proxy-status"))
            if {r.istiod for r in via} != {"<external>"}:
                raise ClusterError(f"ISTIOD column through the proxy: {sorted({r.istiod for r in via})}")
            got = sorted(r.key() for r in via)
            if got != union or len(union) < len(self.envoys):
                return None
            return f"{len(via)} rows from {len(direct)} istiod Pods ({', '.join(sorted(direct))}), ISTIOD <external>"
        # A row's age/state can move between the asks: equal within a few tries, or the rows themselves differ.
        return wait_for("proxy-status through the proxy == union of each istiod Pod", compare, 60)

    def ps_json(self) -> str:
        out = json.loads(self.ok_istioctl("proxy-status", "-o", "json"))
        responses = out if isinstance(out, list) else [out]
        ids, cps = set(), set()
        for resp in responses:
            cps.add(json.loads(resp["controlPlane"]["identifier"])["ID"])
            for res in resp["resources"]:
                ids.add(res["node"]["id"])
        want = {e.proxy_id for e in self.envoys}
        if cps != {"<external>"} or ids != want:
            raise ClusterError(f"control planes {cps}, proxies {sorted(ids)} (want {sorted(want)})")
        return f"{len(responses)} response(s), control plane <external>, {len(ids)} proxies"

    def x_version(self) -> str:
        out = self.ok_istioctl("x", "version")
        pilot = sh(BIN / "pilot-discovery", "version", "-s").stdout.strip().split()[-1]
        want_cp = f"control plane version: {pilot}"
        want_dp = f"data plane version: {PROXY_VERSION} ({len(self.envoys)} proxies)"
        if want_cp not in out or want_dp not in out:
            raise ClusterError(f"want {want_cp!r} and {want_dp!r} in:\n{out}")
        return f"{want_cp}; {want_dp}"

    def internal_debug_syncz(self) -> str:
        rows = json.loads(self.ok_istioctl("x", "internal-debug", "syncz"))
        ids = {row["proxy"] for row in rows}
        direct = set()
        for ip in self.istiod_pods().values():
            direct |= {row["proxy"] for row in json.loads(self.ok_istioctl("x", "internal-debug", "syncz",
                                                                             xds=f"{ip}:15012"))}
        if ids != direct or not {e.proxy_id for e in self.envoys} <= ids:
            raise ClusterError(f"syncz through the proxy {sorted(ids)}, asking each istiod {sorted(direct)}")
        return f"{len(rows)} entries, the same proxies as asking each istiod Pod"

    def ps_pod(self) -> str:
        envoy = self.envoys[-1]
        dump = envoy.config_dump()
        out = self.ok_istioctl("proxy-status", envoy.proxy_id, "--file", str(dump))
        if out.split() != ["Clusters", "Match", "Listeners", "Match", "Routes", "Match"]:
            raise ClusterError(f"proxy-status {envoy.proxy_id}: {out}")
        return f"{envoy.proxy_id} (on {envoy.istiod_ip}): Clusters/Listeners/Routes Match"

    def container_pid(self, pod: dict[str, Any]) -> int:
        cid = pod["status"]["containerStatuses"][0]["containerID"].removeprefix("containerd://")
        tasks = sh("ctr", "--address", self.state / "containerd.sock", "-n", "k8s.io", "tasks", "ls").stdout
        for line in tasks.splitlines()[1:]:
            task, pid, *_ = line.split()
            if task == cid:
                return int(pid)
        raise ClusterError(f"no containerd task for {cid}")

    def security_context(self) -> str:
        """Read from the running container, not from the manifest: what the kernel applies to the process."""
        out = []
        for pod in self.ext.get("pods", "-n", ISTIO_NS, "-l", f"app.kubernetes.io/name={RELEASE}")["items"]:
            pid = self.container_pid(pod)
            status = dict(ln.split(":", 1) for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in ln)
            uids = status["Uid"].split()
            root_mount = next(ln.split() for ln in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
                              if ln.split()[4] == "/")
            facts = {"uid": uids[0], "euid": uids[1], "gid": status["Gid"].split()[0],
                     "no_new_privs": status["NoNewPrivs"].strip(), "cap_eff": status["CapEff"].strip(),
                     "cap_bnd": status["CapBnd"].strip(), "seccomp": status["Seccomp"].strip(),
                     "rootfs": "ro" if "ro" in root_mount[5].split(",") else "rw"}
            want = {"uid": "65532", "euid": "65532", "gid": "65532", "no_new_privs": "1",
                    "cap_eff": "0000000000000000", "cap_bnd": "0000000000000000", "seccomp": "2", "rootfs": "ro"}
            if facts != want:
                raise ClusterError(f"{pod['metadata']['name']} (pid {pid}): {facts}, want {want}")
            out.append(pod["metadata"]["name"])
        if len(out) != 2:
            raise ClusterError(f"{len(out)} proxy pods, want 2")
        return (f"{', '.join(out)}: uid/gid 65532, NoNewPrivs 1, CapEff=CapBnd=0, seccomp filter, root filesystem ro "
                "(/proc/<pid>/status, mountinfo)")

    def probes_and_pdb(self) -> str:
        dep = self.ext.get("deploy", RELEASE, "-n", ISTIO_NS)
        c = dep["spec"]["template"]["spec"]["containers"][0]
        if c["readinessProbe"]["httpGet"]["path"] != "/readyz" or c["livenessProbe"]["httpGet"]["path"] != "/healthz":
            raise ClusterError(f"probes: {c['readinessProbe']}, {c['livenessProbe']}")
        pods = self.ext.get("pods", "-n", ISTIO_NS, "-l", f"app.kubernetes.io/name={RELEASE}")["items"]
        ready = [p["metadata"]["name"] for p in pods if any(
            x["type"] == "Ready" and x["status"] == "True" for x in p["status"]["conditions"])]
        pdb = wait_for("the disruption controller's PDB status", lambda: (
            p if (p := self.ext.get("pdb", RELEASE, "-n", ISTIO_NS)).get("status", {}).get("currentHealthy") == 2
            else None), 60)
        if pdb["spec"]["minAvailable"] != 1 or pdb["status"]["disruptionsAllowed"] != 1 or len(ready) != 2:
            raise ClusterError(f"pdb {pdb['spec']} {pdb['status']}, ready {ready}")
        # The eviction API applies the budget: the first eviction is allowed, a second at once is refused (429).
        first = self.evict(ready[0])
        second = self.evict(ready[1])
        if first != 0 or "disruption budget" not in second:
            raise ClusterError(f"evictions: first {first!r}, second {second!r}")
        self.rollout(f"deploy/{RELEASE}")
        # The rollout is complete while the evicted pod still terminates (preStop wait): a later `kubectl wait -l`
        # that resolved it would fail NotFound when it goes.
        self.ext.kubectl("wait", "--for=delete", f"pod/{ready[0]}", "-n", ISTIO_NS, "--timeout=60s", timeout=90)
        return (f"readiness /readyz + liveness /healthz (kubelet-probed, {len(ready)} Ready); PDB minAvailable 1, "
                f"currentHealthy 2, disruptionsAllowed 1; eviction of {ready[0]} allowed, of {ready[1]} refused: "
                f"{second.strip().splitlines()[-1][:90]}")

    def evict(self, pod: str) -> Any:
        body = json.dumps({"apiVersion": "policy/v1", "kind": "Eviction",
                           "metadata": {"name": pod, "namespace": ISTIO_NS}})
        p = self.ext.kubectl("create", "--raw", f"/api/v1/namespaces/{ISTIO_NS}/pods/{pod}/eviction", "-f", "-",
                             input=body, check=False)
        return 0 if p.returncode == 0 else p.stderr

    def helm_lint_and_dry_run(self) -> str:
        lint = sh(BIN / "helm", "lint", CHART, "--strict").stdout
        rendered = sh(BIN / "helm", "template", RELEASE, CHART, "-n", ISTIO_NS).stdout
        out = self.ext.kubectl("apply", "--dry-run=server", "-n", ISTIO_NS, "-f", "-", input=rendered).stdout
        kinds = len([ln for ln in out.splitlines() if "(server dry run)" in ln])
        return f"{lint.strip().splitlines()[-1]}; template | apply --dry-run=server: {kinds} objects accepted"

    def proxy_pods(self) -> dict[str, str]:
        pods = self.ext.get("pods", "-n", ISTIO_NS, "-l", f"app.kubernetes.io/name={RELEASE}")["items"]
        return {p["metadata"]["name"]: p["status"]["podIP"] for p in pods
                if not p["metadata"].get("deletionTimestamp") and p["status"].get("podIP")}

    def proxy_known(self, ip: str) -> set[str]:
        """The istiod replicas one proxy pod knows now, from its /metrics (reached on the pod IP)."""
        with urllib.request.urlopen(f"http://{ip}:15090/metrics", timeout=5) as r:
            text = r.read().decode()
        return set(re.findall(r'^istioctl_proxy_replica_up\{replica="([^"]+)"', text, re.M))

    def readyz(self, ip: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://{ip}:15090/readyz", timeout=5) as r:
                return r.status, r.read().decode().strip()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode().strip()

    def proxies_follow(self) -> bool:
        live = {f"{ip}:15012" for ip in self.istiod_pods().values()}
        return all(self.proxy_known(ip) == live for ip in self.proxy_pods().values())

    def scale(self) -> str:
        notes = []
        for n in (3, 1, 0, 2):
            self.ext.kubectl("scale", "deploy/istiod", "-n", ISTIO_NS, f"--replicas={n}")
            self.rollout("deploy/istiod")
            wait_for(f"istiod at {n} replicas", lambda n=n: len(self.istiod_pods()) == n and len(
                self.ext.get("pods", "-n", ISTIO_NS, "-l", "app=istiod")["items"]) == n, 120)
            if n:
                wait_for(f"every proxy pod knowing exactly the {n} istiod pods", self.proxies_follow, 60)
                self.ext.kubectl("wait", "--for=condition=Ready", "pod", "-l", f"app.kubernetes.io/name={RELEASE}",
                                 "-n", ISTIO_NS, "--timeout=60s")
                notes.append(f"{n}: both proxies know {n}, Ready")
            else:
                # No replica: /readyz fails and the kubelet takes the proxy pods out of the Service.
                self.ext.kubectl("wait", "--for=condition=Ready=false", "pod", "-l",
                                 f"app.kubernetes.io/name={RELEASE}", "-n", ISTIO_NS, "--timeout=60s")
                code, body = self.readyz(next(iter(self.proxy_pods().values())))
                eps = self.ext.get("endpointslices", "-n", ISTIO_NS, "-l", f"kubernetes.io/service-name={RELEASE}")
                ready_eps = [e for s in eps["items"] for e in s.get("endpoints") or []
                             if e.get("conditions", {}).get("ready")]
                if code != 503 or ready_eps:
                    raise ClusterError(f"with 0 istiod: /readyz {code} {body!r}, ready endpoints {ready_eps}")
                notes.append(f"0: /readyz {code} ({body[:60]}), pods NotReady, no ready endpoint")
        self._start_envoys()
        return "istiod " + " → ".join(notes)

    def rollout_restart(self) -> str:
        before = self.istiod_pods()
        stop = threading.Event()
        calls: list[tuple[int, str]] = []

        def hammer() -> None:
            while not stop.is_set():
                p = self.istioctl("proxy-status", timeout=60)
                calls.append((p.returncode, p.stderr.strip()[-200:]))

        # When each istiod pod was first seen terminating, from a watch (not polling the API server).
        terminating: dict[str, float] = {}
        watch = subprocess.Popen(
            [str(BIN / "kubectl"), "--kubeconfig", str(self.ext.admin), "get", "pods", "-n", ISTIO_NS, "-l",
             "app=istiod", "-w", "-o", 'jsonpath={.status.podIP} {.metadata.deletionTimestamp}{"\\n"}'],
            stdout=subprocess.PIPE, text=True)

        def watcher() -> None:
            assert watch.stdout
            for line in watch.stdout:
                parts = line.split()
                if len(parts) == 2:
                    terminating.setdefault(f"{parts[0]}:15012", time.monotonic())

        proxies = self.proxy_pods()
        threading.Thread(target=watcher, daemon=True).start()
        t = threading.Thread(target=hammer, daemon=True)
        t.start()
        wait_for("a first call", lambda: calls, 60)
        self.ext.kubectl("rollout", "restart", "deploy/istiod", "-n", ISTIO_NS)
        started = time.monotonic()
        # Poll what each proxy lists (cheap: its /metrics on the pod IP) until the rollout is over and both know
        # exactly the new pods; an address is stale from its pod's first terminating event to its last listing.
        last_listed: dict[str, float] = {}
        samples = 0
        while True:
            for ip in proxies.values():
                now = time.monotonic()
                for addr in self.proxy_known(ip):
                    last_listed[addr] = now
            samples += 1
            if samples % 10 == 0:
                dep = self.ext.get("deploy", "istiod", "-n", ISTIO_NS)
                st = dep["status"]
                if (st.get("updatedReplicas") == st.get("replicas") == st.get("readyReplicas") == 2
                        and dep["metadata"]["generation"] == st.get("observedGeneration")
                        and not set(self.istiod_pods()) & set(before) and self.proxies_follow()):
                    break
            if time.monotonic() - started > 180:
                raise ClusterError("rollout restart not followed in 180 s")
        done = time.monotonic() - started
        stop.set()
        t.join()
        watch.terminate()
        watch.wait()
        old = {f"{ip}:15012" for ip in before.values()}
        if not old <= set(terminating):
            raise ClusterError(f"never saw {old - set(terminating)} terminate")
        stale = max(max(0.0, last_listed.get(a, 0.0) - terminating[a]) for a in old)
        failed = [c for c in calls if c[0] != 0]
        self._start_envoys()
        if failed:
            raise ClusterError(f"{len(failed)}/{len(calls)} istioctl calls failed during the restart: {failed[:3]}")
        return (f"{sorted(before)} → {sorted(self.istiod_pods())} in {done:.1f} s; an old istiod stayed listed by "
                f"a proxy at most {stale:.2f} s after it began terminating ({samples} polls of both proxies); "
                f"{len(calls)} istioctl calls during it, 0 failed")

    def delete_proxy_pod(self) -> str:
        victim = sorted(self.proxy_pods())[0]
        stop = threading.Event()
        calls: list[tuple[int, str]] = []
        connects: list[str] = []
        host, port = self.proxy_address().split(":")

        def hammer() -> None:
            while not stop.is_set():
                p = self.istioctl("proxy-status", timeout=60)
                calls.append((p.returncode, p.stderr.strip()[-200:]))

        def dial() -> None:
            # New TCP connections to the Service, back to back: the window where kube-proxy still routes to a
            # pod that has stopped accepting is well under a second, too short for istioctl calls alone.
            while not stop.is_set():
                try:
                    conn = socket.create_connection((host, int(port)), timeout=5)
                    # Closed with a reset: no TIME_WAIT left behind to exhaust the host's ephemeral ports.
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    conn.close()
                    connects.append("")
                except OSError as e:
                    connects.append(str(e))
                # ~200 dials/s: well inside the refusal window seen without the preStop wait (31 refusals at
                # ~950/s, i.e. ~30 ms), without starving the proxy and istiod Pods of CPU on 2 shared cores.
                stop.wait(0.005)

        threads = [threading.Thread(target=f, daemon=True) for f in (hammer, dial)]
        for t in threads:
            t.start()
        wait_for("a first call", lambda: calls, 60)
        self.ext.kubectl("delete", "pod", victim, "-n", ISTIO_NS, "--wait=true", timeout=120)
        self.rollout(f"deploy/{RELEASE}")
        n = len(calls)
        wait_for("two more calls after the rollout", lambda: len(calls) >= n + 2, 60)
        stop.set()
        for t in threads:
            t.join()
        failed = [c for c in calls if c[0] != 0]
        refused = [c for c in connects if c]
        if failed or refused:
            raise ClusterError(f"through the Service: {len(failed)}/{len(calls)} istioctl calls failed {failed[:2]}, "
                               f"{len(refused)}/{len(connects)} connections refused {refused[:1]}")
        return (f"deleted {victim}; through the Service meanwhile: {len(calls)} proxy-status calls, "
                f"{len(connects)} new connections, none failed")

    def identity_upgrade(self) -> str:
        e, m = self.ext, self.mesh
        m.kubectl("apply", "-f", ROOT / "deploy" / "manifests" / "mesh-cluster-tokenreview.yaml")
        reviewer = kubeconfig(m.server, m.ca_file, token=m.token(ISTIO_NS, "istioctl-proxy-reviewer", "24h"),
                              user="reviewer")
        # The proxy's own identity towards istiod: a SPIFFE leaf of istiod's (plugged) CA.
        leaf = self.root.issue_spiffe(ISTIO_NS, RELEASE)
        e.apply({"apiVersion": "v1", "kind": "Secret",
                 "metadata": objects.meta("istioctl-proxy-mesh-kubeconfig", ISTIO_NS),
                 "stringData": {"kubeconfig": reviewer}},
                {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                 "metadata": objects.meta("istioctl-proxy-upstream", ISTIO_NS),
                 "stringData": {"tls.crt": leaf.cert_pem.decode(), "tls.key": leaf.key_pem.decode()}})
        before = e.get("deploy", RELEASE, "-n", ISTIO_NS)
        old_pods = set(self.proxy_pods())
        self.helm("upgrade", "--reuse-values", "--set", "auth.mode=identity",
                  "--set", "auth.identity.tokenReview.enabled=true",
                  "--set", "auth.identity.tokenReview.kubeconfigSecret=istioctl-proxy-mesh-kubeconfig",
                  "--set", "auth.identity.upstreamCertSecret=istioctl-proxy-upstream")
        self.rollout(f"deploy/{RELEASE}")
        wait_for("the old proxy pods gone", lambda: not (set(self.proxy_pods()) & old_pods), 120)
        after = e.get("deploy", RELEASE, "-n", ISTIO_NS)
        args = after["spec"]["template"]["spec"]["containers"][0]["args"]
        if after["metadata"]["generation"] <= before["metadata"]["generation"] or "--token-review" not in args:
            raise ClusterError(f"helm upgrade did not roll the Deployment: {args}")
        return (f"generation {before['metadata']['generation']} → {after['metadata']['generation']}, pods "
                f"{sorted(old_pods)} → {sorted(self.proxy_pods())} (--upstream-identity --token-review against the "
                "mesh cluster)")

    # -- canary upgrade (issue 16): a second istiod Deployment, workloads rolled over to it, the old one removed --
    def istiod_revisions(self) -> dict[str, tuple[str, str]]:
        """Ready istiod pods: name -> (IP, istio.io/rev)."""
        pods = self.ext.get("pods", "-n", ISTIO_NS, "-l", "app=istiod")["items"]
        ips = self.istiod_pods()
        return {p["metadata"]["name"]: (ips[p["metadata"]["name"]], p["metadata"]["labels"].get("istio.io/rev", ""))
                for p in pods if p["metadata"]["name"] in ips}

    def canary_view(self, held: dict[str, str]) -> str:
        """Asking each istiod pod: every proxy held by exactly the revision `held` says; through the proxy: each
        proxy once, ISTIOD `<external>/<revisions holding them>`; each proxy pod's /readyz counts both revisions."""
        last: list[str] = [""]

        def compare() -> str | None:
            pods = self.istiod_revisions()
            where: dict[str, list[str]] = {}
            for pod, rows in self.direct().items():
                for r in rows:
                    where.setdefault(r.name, []).append(pods[pod][1])
            via = parse_ps(self.ok_istioctl("proxy-status"))
            column = "<external>/" + ",".join(sorted(set(held.values())))
            last[0] = f"istiod pods hold {where}; through the proxy {[(r.name, r.istiod) for r in via]}"
            if where != {pid: [rev] for pid, rev in held.items()}:
                return None
            if sorted(r.name for r in via) != sorted(held) or {r.istiod for r in via} != {column}:
                return None
            return f"{len(via)} rows, each proxy once, ISTIOD {column}"

        shown = wait_for("proxy-status through the proxy: each proxy once, on its revision", compare, 90,
                         on_fail=lambda: last[0])
        per_rev = {rev: sum(1 for _, r in self.istiod_revisions().values() if r == rev)
                   for rev in {r for _, r in self.istiod_revisions().values()}}
        want = [f"revision {rev}: {n} of {n}" for rev, n in sorted(per_rev.items())]
        bodies: dict[str, tuple[int, str]] = {}

        def ready() -> bool:
            bodies.update({ip: self.readyz(ip) for ip in self.proxy_pods().values()})
            return len(bodies) == 2 and all(c == 200 and ", ".join(want) in b for c, b in bodies.values())

        wait_for(f"/readyz of both proxy pods counting {want}", ready, 60, on_fail=lambda: str(bodies))
        return f"{shown}; /readyz 200 `{next(iter(bodies.values()))[1]}`"

    def move_envoys(self, namespace: str) -> list[str]:
        """The rollout of a namespace: its Envoys restarted against the canary istiod (a workload's new pod)."""
        ip = next(ip for ip, rev in self.istiod_revisions().values() if rev == CANARY)
        moved = []
        for e in self.envoys:
            if e.namespace != namespace:
                continue
            proc = self.procs.procs.pop(f"envoy-{e.namespace}-{e.name}")
            proc.kill()
            proc.wait()
            (e.dir / "admin").unlink(missing_ok=True)
            e.istiod_ip = ip
            e.start(self.procs)
            moved.append(e.proxy_id)
        return moved

    def canary_install(self) -> str:
        old = set(self.proxy_pods())
        # docs/deploy.md canary step 1: the proxy follows every revision (no --istiod-san), shows them in ISTIOD.
        self.helm("upgrade", "--reuse-values", "--set", "revision=",
                  "--set", "extraArgs={--all-revisions,--istiod-column=revision}")
        self.ext.apply(*objects.istiod_deployment(self.images.istiod_ref, 1, CANARY))
        self.rollout(f"deploy/istiod-{CANARY}")
        self.rollout(f"deploy/{RELEASE}")
        wait_for("the old proxy pods gone", lambda: not (set(self.proxy_pods()) & old), 120)
        wait_for("every proxy pod knowing the istiod pods of both revisions", self.proxies_follow, 60)
        revs = sorted(f"{n} ({r})" for n, (_, r) in self.istiod_revisions().items())
        return f"istiod pods {', '.join(revs)}; " + self.canary_view({e.proxy_id: "default" for e in self.envoys})

    def canary_rollout(self) -> str:
        moved = self.move_envoys("shop")
        held = {e.proxy_id: CANARY if e.proxy_id in moved else "default" for e in self.envoys}
        view = self.canary_view(held)
        # Mid-upgrade transcript for docs/deploy.md "Canary upgrades" (logs/canary-session.txt).
        out = []
        for cmd, text in [
            ("kubectl -n external-istiod get deploy,svc,pods -l app=istiod -L istio.io/rev",
             self.ext.kubectl("get", "deploy,svc,pods", "-n", ISTIO_NS, "-l", "app=istiod", "-L",
                              "istio.io/rev").stdout),
            ("istioctl proxy-status    # through the proxy, --all-revisions --istiod-column revision",
             self.ok_istioctl("proxy-status")),
            ("curl <proxy pod>:15090/readyz", self.readyz(next(iter(self.proxy_pods().values())))[1]),
        ]:
            out.append(f"$ {cmd}\n{text.rstrip()}\n")
        (self.state / "logs" / "canary-session.txt").write_text("\n".join(out))
        return f"moved {', '.join(moved)} to {CANARY}: {view}"

    def canary_remove_old(self) -> str:
        moved = self.move_envoys("pay")
        self.ext.kubectl("delete", "deploy/istiod", "service/istiod", "-n", ISTIO_NS, "--wait=true", timeout=120)
        self.ext.kubectl("wait", "--for=delete", "pod", "-l", "app=istiod,istio.io/rev=default", "-n", ISTIO_NS,
                         "--timeout=60s", timeout=90)
        wait_for("every proxy pod knowing only the canary istiod", self.proxies_follow, 60)
        self.ext.kubectl("wait", "--for=condition=Ready", "pod", "-l", f"app.kubernetes.io/name={RELEASE}",
                         "-n", ISTIO_NS, "--timeout=60s")
        view = self.canary_view({e.proxy_id: CANARY for e in self.envoys})
        if any("default" in b for _, b in (self.readyz(ip) for ip in self.proxy_pods().values())):
            raise ClusterError("/readyz still names revision default")
        return f"moved {', '.join(moved)}; deploy/istiod deleted, its pods gone, proxy pods Ready: {view}"


CHECKS: list[tuple[str, str]] = [
    ("proxy-status through the proxy Service == union of each istiod Pod, ISTIOD <external>", "ps_equals_union"),
    ("proxy-status -o json", "ps_json"),
    ("x version", "x_version"),
    ("x internal-debug syncz", "internal_debug_syncz"),
    ("proxy-status <pod> --file <its config dump>", "ps_pod"),
    ("security context in effect in the running proxy containers", "security_context"),
    ("probes and PodDisruptionBudget in effect", "probes_and_pdb"),
    ("helm lint, helm template | kubectl apply --dry-run=server", "helm_lint_and_dry_run"),
    ("scale istiod 2→3→1→0→2: proxies follow, /readyz and Pod readiness track the replicas", "scale"),
    ("kubectl rollout restart istiod: the proxy follows, istioctl keeps working", "rollout_restart"),
    ("proxy-status == union after the restart", "ps_equals_union"),
    ("delete one proxy Pod: the Service keeps answering", "delete_proxy_pod"),
    ("helm upgrade to identity mode (chart values) rolls the Deployment", "identity_upgrade"),
    ("identity mode: proxy-status == union (TokenReview against the mesh cluster)", "ps_equals_union"),
    ("identity mode: x version", "x_version"),
    (f"canary: istiod-{CANARY} Deployment beside the default one, proxy --all-revisions: each proxy once",
     "canary_install"),
    (f"canary: rollout of namespace shop to {CANARY}: each proxy once, on its revision", "canary_rollout"),
    ("canary: rollout of pay, old revision's Deployment deleted: a clean view", "canary_remove_old"),
]


def main() -> int:
    STATE.mkdir(parents=True, exist_ok=True)
    (STATE / "logs").mkdir(exist_ok=True)
    procs = Processes(STATE)
    run = Run(STATE, procs)
    try:
        run.up()
    except Exception as e:
        traceback.print_exc()
        for name in procs.procs:
            print(procs.log_tail(name, 15), file=sys.stderr)
        say(f"FAIL bring-up: {type(e).__name__}: {e}")
        say(f"cluster e2e: 0/{len(CHECKS)} checks passed")
        return 1
    for title, method in CHECKS:
        run.check(title, getattr(run, method))
    passed = sum(ok for _, ok, _ in run.results)
    say(f"cluster e2e: {passed}/{len(CHECKS)} checks passed")
    return 0 if passed == len(CHECKS) else 1


if __name__ == "__main__":
    sys.exit(main())
