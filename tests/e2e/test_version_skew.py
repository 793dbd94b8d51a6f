"""The version-skew matrix (issue 13): real istioctl of one release → istioctl-proxy → real istiod replicas of
the same or another release, and a mesh of mixed replicas (the oldest and the newest at once, as during an
upgrade). Each cell compares what istioctl prints through the proxy with what the same istioctl prints when
it asks the replicas directly; the versions are MATRIX_VERSIONS (`scripts/install-peers matrix`).

docs/real-peers.md has the matrix and what each release does differently.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from istioctl_proxy import client
from istioctl_proxy.sim.pki import TestCA

from ..k8s.cluster import KubeCluster
from ..waits import until
from .ads import CDS, LDS, AdsClient, XdsState, close_clients, start_clients
from .jwt_issuer import JwtIssuer
from .mesh import (
    MATRIX_VERSIONS,
    PIN_VERSION,
    EnvoyProxy,
    Istioctl,
    IstioctlResult,
    Mesh,
    Peers,
    PeersMissingError,
    parse_table,
)
from .proxy_process import ProxyProcess

pytestmark = pytest.mark.e2e

OLDEST, NEWEST = MATRIX_VERSIONS[0], MATRIX_VERSIONS[-1]
MIXED = "mixed"
# Which istiod build each replica of a mesh runs (two replicas each).
MESHES: dict[str, tuple[str, str]] = {v: (v, v) for v in MATRIX_VERSIONS} | {MIXED: (OLDEST, NEWEST)}
# (istioctl, mesh): every same-version pair, newest istioctl against the oldest istiod and the other way
# round, and both ends of the range against the mixed mesh. Grouped by mesh so each mesh starts once.
CELLS: list[tuple[str, str]] = sorted(
    [(v, v) for v in MATRIX_VERSIONS] + [(NEWEST, OLDEST), (OLDEST, NEWEST), (OLDEST, MIXED), (NEWEST, MIXED)],
    key=lambda cell: list(MESHES).index(cell[1]),
)
FIRST_HOST = 40  # 127.0.0.40+: clear of the session mesh (127.0.0.2+) on the same ports
STATES = (
    {CDS: XdsState.SYNCED, LDS: XdsState.SYNCED},
    {CDS: XdsState.SYNCED, LDS: XdsState.STALE},
    {CDS: XdsState.ERROR, LDS: XdsState.SYNCED},
)
NAMESPACES = ("team-a", "team-b")
# istioctl prints ages ("SYNCED (2s)", "STALE (1m30s)"); they differ between two runs.
AGE = re.compile(r" \((\d+(\.\d+)?(ns|us|µs|ms|s|m|h|d|y))+\)")
UUID = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def release(version: str) -> tuple[int, int]:
    """(minor, patch) of a matrix version (the pin is the 1.30 line; a -dev build is newer than any patch)."""
    if version == PIN_VERSION:
        return 30, 0
    core = version.split("-", 1)[0].split(".")
    return int(core[1]), int(core[2]) if len(core) > 2 else 1_000


def peers_of(version: str) -> Peers:
    try:
        return Peers.find_version(version)
    except PeersMissingError as e:
        missing = str(e)
    pytest.fail(missing, pytrace=False)


@dataclass
class SkewMesh:
    key: str
    mesh: Mesh
    identity: ProxyProcess
    forward: ProxyProcess
    envoys: list[EnvoyProxy] = field(default_factory=list)

    def stop(self) -> None:
        self.identity.stop()
        self.forward.stop()
        self.mesh.stop()


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


class Meshes:
    """One mesh at a time on 127.0.0.40+, sharing one kube-apiserver: asking for another stops the last."""

    def __init__(self, root: Path, ca: TestCA, jwt: JwtIssuer) -> None:
        self.root, self.ca, self.jwt = root, ca, jwt
        self.kube: KubeCluster | None = None
        self.current: SkewMesh | None = None

    def get(self, key: str) -> SkewMesh:
        if self.current is not None and self.current.key == key:
            return self.current
        self.close_mesh()
        versions = MESHES[key]
        replica_peers = [peers_of(v) for v in versions]
        if self.kube is None:
            self.kube = KubeCluster(self.root / "k8s")
        d = self.root / key
        mesh = Mesh(
            d,
            replica_peers[0],
            replicas=len(versions),
            first_host=FIRST_HOST,
            ca=self.ca,
            jwt_issuer=self.jwt,
            kube=self.kube,
            replica_peers=replica_peers,
        ).start()
        started: list[ProxyProcess] = []
        try:
            serving = mesh.ca.issue_serving()
            upstream = mesh.ca.issue_spiffe("istio-system", "istioctl-proxy")
            root = _write(d / "root.pem", mesh.root_cert_pem)
            common = [
                "--tls-cert",
                _write(d / "tls.crt", serving.cert_pem),
                "--tls-key",
                _write(d / "tls.key", serving.key_pem),
                "--istiod",
                ",".join(r.secure_address for r in mesh.replicas),
                "--istiod-ca",
                root,
                "--upstream-timeout",
                "10",
            ]
            identity = ProxyProcess(
                d / "identity",
                [
                    *common,
                    "--client-ca",
                    root,
                    "--upstream-identity",
                    "--upstream-cert",
                    _write(d / "up.crt", upstream.cert_pem),
                    "--upstream-key",
                    _write(d / "up.key", upstream.key_pem),
                ],
            )
            forward = ProxyProcess(d / "forward", common)
            # Generous: a Python interpreter starting under the CI's load; they signal readiness in their log.
            for proc in (identity, forward):
                started.append(proc)  # stop() of a process that never started is a no-op
                proc.start(timeout_s=180)
        except BaseException:
            for proc in started:  # one may have started before the other failed: no process left behind
                proc.stop()
            mesh.stop()
            raise
        self.current = SkewMesh(key, mesh, identity, forward)
        return self.current

    def close_mesh(self) -> None:
        if self.current is not None:
            self.current.stop()
            self.current = None

    def close(self) -> None:
        self.close_mesh()
        if self.kube is not None:
            self.kube.close()
            self.kube = None


@pytest.fixture(scope="module")
def meshes(tmp_path_factory: pytest.TempPathFactory, test_ca: TestCA, jwt_issuer: JwtIssuer) -> Iterator[Meshes]:
    m = Meshes(tmp_path_factory.mktemp("skew"), test_ca, jwt_issuer)
    try:
        yield m
    finally:
        m.close()


@contextlib.asynccontextmanager
async def data_plane(sm: SkewMesh) -> AsyncIterator[tuple[list[AdsClient], EnvoyProxy]]:
    """Python proxies in every state and both namespaces on every replica, and one stock Envoy router on the
    last replica; all gone again (as istiod sees it) on exit."""
    mesh = sm.mesh
    clients = [
        mesh.ads_client(r, f"skew-{r.index}-{i}", NAMESPACES[i % 2], STATES[i % 3])
        for r in mesh.replicas
        for i in range(4)
    ]
    await start_clients(clients)
    envoy = mesh.start_envoy(mesh.replicas[-1], "skew-ingress", "istio-ingress", node_type="router")
    try:

        def settled() -> bool:
            states: dict[str, dict[str, str]] = {}
            for r in mesh.replicas:
                states.update(r.proxy_states())
            return (
                all(c.proxy_id in states for c in clients)
                and all("ERROR" in states[c.proxy_id].values() for c in clients if XdsState.ERROR in c.types.values())
                and states.get(envoy.proxy_id) == {"CDS": "SYNCED", "LDS": "SYNCED"}
            )

        await until(settled, "the skew data plane registered and settled")
        yield clients, envoy
    finally:
        await close_clients(clients)
        envoy.stop()
        mesh.envoys.remove(envoy)
        await until(lambda: not _listed(mesh), "the skew data plane gone from every replica")


def _listed(mesh: Mesh) -> set[str]:
    """Data-plane proxies (not debug callers) that some replica still lists."""
    return {p for r in mesh.replicas for p in r.proxy_states() if p.startswith("skew-")}


# -- comparing one istioctl's output through the proxy with its output against each replica --------------


@dataclass
class Cell:
    sm: SkewMesh
    ctl: Istioctl
    version: str  # the matrix label (PIN_VERSION for the default build)
    ctl_version: str  # what the binary is stamped with
    failures: list[str] = field(default_factory=list)

    def through(self) -> list[str]:
        return [
            "--xds-address",
            self.sm.identity.address,
            "--cert-dir",
            str(self.sm.mesh.admin_cert_dir),
            "-r",
            "default",
        ]

    def direct(self, replica_index: int) -> list[str]:
        mesh = self.sm.mesh
        return [*mesh.istioctl_xds_args(mesh.replicas[replica_index]), "-r", "default"]

    async def both(self, *args: str) -> tuple[IstioctlResult, list[IstioctlResult]]:
        proxied = await self.ctl.arun(*args, *self.through())
        direct = [await self.ctl.arun(*args, *self.direct(i)) for i in range(len(self.sm.mesh.replicas))]
        return proxied, direct

    def check(self, what: str, ok: bool, detail: str) -> None:
        if not ok:
            self.failures.append(f"[{what}] {detail}")


def _rows(out: str) -> dict[str, dict[str, str]]:
    return {row["NAME"]: {k: AGE.sub("", v) for k, v in row.items()} for row in parse_table(out)}


def _show(r: IstioctlResult) -> str:
    return f"rc={r.rc}\n--- stdout\n{r.stdout[-1500:]}\n--- stderr\n{r.stderr[-1500:]}"


async def check_table(cell: Cell, *extra: str) -> None:
    what = " ".join(("proxy-status", *extra))
    proxied, direct = await cell.both("x", "ps", *extra)
    if extra and "unknown shorthand flag" in direct[0].stderr:  # istioctl 1.26 has no -v: its table has the types
        cell.check(what, (proxied.rc, proxied.stderr) == (direct[0].rc, direct[0].stderr), _show(proxied))
        return
    for d in direct:
        if d.rc != 0:
            cell.failures.append(f"[{what}] direct failed: {_show(d)}")
            return
    if proxied.rc != 0:
        cell.failures.append(f"[{what}] through the proxy failed: {_show(proxied)}")
        return
    union: dict[str, dict[str, str]] = {}
    for d in direct:
        union |= _rows(d.stdout)
    rows = _rows(proxied.stdout)
    cell.check(what, set(rows) == set(union), f"names {sorted(rows)} != direct {sorted(union)}")
    header = parse_table(proxied.stdout)[0].keys() if rows else []
    want_header = parse_table(direct[0].stdout)[0].keys() if union else []
    cell.check(what, list(header) == list(want_header), f"columns {list(header)} != {list(want_header)}")
    for name in set(rows) & set(union):
        got = {k: v for k, v in rows[name].items() if k != "ISTIOD"}
        want = {k: v for k, v in union[name].items() if k != "ISTIOD"}
        cell.check(what, got == want, f"{name}: {got} != direct {want}")
        cell.check(what, rows[name]["ISTIOD"] == "<external>", f"ISTIOD of {name}: {rows[name]}")


async def check_json(cell: Cell) -> None:
    proxied, direct = await cell.both("x", "ps", "-o", "json")
    if direct[0].rc != 0:  # no -o flag in this istioctl: it must fail the same way through the proxy
        cell.check(
            "ps -o json",
            (proxied.rc, proxied.stderr) == (direct[0].rc, direct[0].stderr),
            f"{_show(proxied)}\n  vs direct\n{_show(direct[0])}",
        )
        return
    if not direct[0].stdout.lstrip().startswith("{"):
        # istioctl 1.27/1.28 take -o but print the table: the table check applies.
        await check_table(cell, "-o", "json")
        return
    if proxied.rc != 0:
        cell.failures.append(f"[ps -o json] through the proxy failed: {_show(proxied)}")
        return
    doc = json.loads(proxied.stdout)
    directs = [json.loads(d.stdout) for d in direct]
    ids = {res["node"]["id"] for res in doc.get("resources", [])}
    want = {res["node"]["id"] for d in directs for res in d.get("resources", [])}
    cell.check("ps -o json", ids == want, f"{sorted(ids)} != direct {sorted(want)}")
    # The envelope must read like one istiod's: its control plane, version_info and nonce forms.
    cp = json.loads(doc["controlPlane"]["identifier"])
    infos = [json.loads(d["controlPlane"]["identifier"]) for d in directs]

    # One replica's Info; with replicas of several versions, Info.version lists each ("1.26.0, 1.31-dev").
    def but_version(info: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in info.items() if k != "version"}

    cell.check(
        "ps -o json",
        cp["ID"] == "<external>"
        and but_version(cp["Info"]) in [but_version(i["Info"]) for i in infos]
        and set(cp["Info"]["version"].split(", ")) == {i["Info"]["version"] for i in infos},
        f"control plane {cp} is not one of the replicas' {infos}",
    )
    cell.check("ps -o json", set(cp) == set(infos[0]), f"identifier keys {set(cp)} != {set(infos[0])}")
    version, nonce = doc.get("versionInfo", ""), doc.get("nonce", "")
    cell.check(
        "ps -o json",
        version == max(d.get("versionInfo", "") for d in directs),
        f"versionInfo {version!r} is not the newest of {[d.get('versionInfo') for d in directs]}",
    )
    for d in (doc, *directs):
        n, v = d.get("nonce", ""), d.get("versionInfo", "")
        cell.check(
            "ps -o json",
            re.fullmatch(re.escape(v) + UUID, n) is not None,
            f"nonce {n!r} is not versionInfo {v!r} + a UUID",
        )
    cell.check("ps -o json", set(doc) == set(directs[0]), f"fields {set(doc)} != direct {set(directs[0])}")
    assert nonce


async def check_proxy(cell: Cell, envoy: EnvoyProxy) -> None:
    dump = envoy.write_config_dump()
    proxied = await cell.ctl.arun("x", "ps", envoy.proxy_id, "--file", str(dump), *cell.through())
    direct = await cell.ctl.arun("x", "ps", envoy.proxy_id, "--file", str(dump), *cell.direct(envoy.replica.index))
    cell.check("proxy-status <pod>", direct.rc == 0 and "Match" in direct.stdout, f"direct: {_show(direct)}")
    cell.check(
        "proxy-status <pod>",
        (proxied.rc, proxied.stdout.split()) == (direct.rc, direct.stdout.split()),
        f"{_show(proxied)}\n  vs direct\n{_show(direct)}",
    )


async def check_version(cell: Cell) -> None:
    proxied = await cell.ctl.arun("x", "version", *cell.through()[:-2])
    replica_versions = {r.peers.istio_version for r in cell.sm.mesh.replicas}
    plane = re.search(r"control plane version: (.+)", proxied.stdout)
    cell.check(
        "x version",
        proxied.rc == 0 and plane is not None and set(plane.group(1).strip().split(", ")) == replica_versions,
        f"want {replica_versions} (each version once): {_show(proxied)}",
    )
    cell.check("x version", f"client version: {cell.ctl_version}" in proxied.stdout, _show(proxied))
    cell.check(
        "x version", re.search(r"data plane version: \S+ \(\d+ proxies\)", proxied.stdout) is not None, _show(proxied)
    )


async def check_syncz(cell: Cell) -> None:
    proxied, direct = await cell.both("x", "internal-debug", "syncz")
    if proxied.rc != 0 or any(d.rc != 0 for d in direct):
        cell.failures.append(f"[internal-debug syncz] failed: {_show(proxied)}\n{[_show(d) for d in direct]}")
        return
    # The HTTP syncz lists debug callers too: istioctl itself when asked directly, the proxy's upstream
    # stream when asked through it. Only the data plane is compared.
    got = {row["proxy"] for row in json.loads(proxied.stdout) if row["proxy"].startswith("skew-")}
    want = {row["proxy"] for d in direct for row in json.loads(d.stdout) if row["proxy"].startswith("skew-")}
    cell.check("internal-debug syncz", got == want, f"{sorted(got)} != direct {sorted(want)}")


async def check_list(cell: Cell) -> None:
    proxied, direct = await cell.both("x", "internal-debug", "--list")
    if release(cell.version) < (28, 0):  # no --list before 1.28: the same flag error through the proxy
        cell.check(
            "internal-debug --list",
            direct[0].rc != 0 and "unknown flag" in direct[0].stderr,
            f"expected no --list in {cell.version}: {_show(direct[0])}",
        )
        cell.check(
            "internal-debug --list", (proxied.rc, proxied.stderr) == (direct[0].rc, direct[0].stderr), _show(proxied)
        )
        return
    cell.check("internal-debug --list", proxied.rc == 0 and "syncz" in proxied.stdout, _show(proxied))
    cell.check(
        "internal-debug --list",
        any(proxied.stdout == d.stdout for d in direct),
        f"{_show(proxied)}\n  is none of\n" + "\n".join(_show(d) for d in direct),
    )


async def check_bogus(cell: Cell) -> None:
    proxied, direct = await cell.both("x", "internal-debug", "no-such-path")
    # istioctl ≥ 1.26 sees istiod's "404 page not found" and lists the paths instead.
    cell.check(
        "bogus path",
        "please check all supported internal debug commands" in direct[0].stdout,
        f"direct: {_show(direct[0])}",
    )
    cell.check(
        "bogus path",
        any((proxied.rc, proxied.stdout, proxied.stderr) == (d.rc, d.stdout, d.stderr) for d in direct),
        f"{_show(proxied)}\n  is none of\n" + "\n".join(_show(d) for d in direct),
    )


async def check_empty(cell: Cell) -> None:
    """No data plane at all: istioctl ≥ 1.27.0 says "no proxies found", 1.26 prints the bare header."""
    proxied, direct = await cell.both("x", "ps")
    cell.check(
        "empty mesh",
        all((d.rc, d.stdout, d.stderr) == (direct[0].rc, direct[0].stdout, direct[0].stderr) for d in direct),
        "\n".join(_show(d) for d in direct),
    )
    cell.check(
        "empty mesh",
        (proxied.rc, proxied.stdout, proxied.stderr) == (direct[0].rc, direct[0].stdout, direct[0].stderr),
        f"{_show(proxied)}\n  vs direct\n{_show(direct[0])}",
    )


@pytest.mark.parametrize(("istioctl_version", "mesh_key"), CELLS, ids=[f"istioctl-{c}-istiod-{m}" for c, m in CELLS])
async def test_cell(meshes: Meshes, tmp_path: Path, istioctl_version: str, mesh_key: str) -> None:
    sm = meshes.get(mesh_key)
    ctl_peers = peers_of(istioctl_version)
    cell = Cell(sm, Istioctl(ctl_peers.istioctl, tmp_path / "istioctl-home"), istioctl_version, ctl_peers.istio_version)
    assert not _listed(sm.mesh), "a data plane was left over"
    await check_empty(cell)
    async with data_plane(sm) as (_, envoy):
        await check_table(cell)
        await check_table(cell, "-v", "1")
        await check_json(cell)
        await check_proxy(cell, envoy)
        await check_version(cell)
        await check_syncz(cell)
        await check_list(cell)
        await check_bogus(cell)
    assert not cell.failures, f"{len(cell.failures)} checks failed:\n" + "\n\n".join(cell.failures)


# -- scoping: what a caller of one namespace sees, per istiod release ---------------------------------------


@pytest.mark.parametrize("mesh_key", list(MESHES))
async def test_scoped_caller(meshes: Meshes, jwt_issuer: JwtIssuer, mesh_key: str) -> None:
    """istiod filters syncz for non-root callers only from 1.28.7/1.29.3/1.30: 1.26 and 1.27.0 show a team-a
    caller everything. Forward mode shows what istiod shows; identity mode scopes itself on every version."""
    sm = meshes.get(mesh_key)
    mesh = sm.mesh
    scoping = [release(v) >= (30, 0) for v in MESHES[mesh_key]]
    async with data_plane(sm) as (clients, _):
        everyone = {c.proxy_id for c in clients}
        team_a = {c.proxy_id for c in clients if c.namespace == "team-a"}
        fwd = client.Target(sm.forward.address, ca_pem=mesh.root_cert_pem, authority="localhost")
        jwt = dataclasses.replace(fwd, token=jwt_issuer.mint("team-a"), namespace="team-a")
        seen_direct: set[str] = set()
        for r, scoped in zip(mesh.replicas, scoping, strict=True):
            resp, _ = await client.request(
                dataclasses.replace(jwt, address=r.secure_address, authority="istiod.istio-system.svc"), client.SYNCZ
            )
            names = {row.name for row in client.rows(resp)} & everyone
            mine = {c.proxy_id for c in clients if c.proxy_id.startswith(f"skew-{r.index}-")}
            assert names == (mine & team_a if scoped else mine), (r.peers.istio_version, sorted(names))
            seen_direct |= names
        resp, _ = await client.request(jwt, client.SYNCZ)
        forwarded = {row.name for row in client.rows(resp)} & everyone
        assert forwarded == seen_direct, "forward mode must show what istiod shows"
        if not all(scoping):
            assert forwarded - team_a, "istiod before 1.28.7 shows a scoped caller other namespaces"
        cert = mesh.ca.issue_spiffe("team-a", "default")
        ident = client.Target(
            sm.identity.address,
            ca_pem=mesh.root_cert_pem,
            cert_pem=cert.cert_pem,
            key_pem=cert.key_pem,
            authority="localhost",
            namespace="team-a",
        )
        resp, _ = await client.request(ident, client.SYNCZ)
        assert {row.name for row in client.rows(resp)} & everyone == team_a, "identity mode scopes on every version"


def test_matrix_is_what_install_peers_installs() -> None:
    script = (Path(__file__).resolve().parents[2] / "scripts" / "install-peers").read_text()
    block = script.split("MATRIX=(", 1)[1].split(")", 1)[0]
    installed = [line.split()[0].strip('"') for line in block.strip().splitlines()]
    assert [v for v in MATRIX_VERSIONS if v != PIN_VERSION] == installed
