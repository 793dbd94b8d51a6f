"""`istioctl-proxy check` against real simulated istiod replicas over TLS on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import pytest

from istioctl_proxy import cli
from istioctl_proxy.app import free_port
from istioctl_proxy.check import run_check, san_matches
from istioctl_proxy.sim.pki import TestCA
from istioctl_proxy.sim.simulate import SimulatedMesh
from istioctl_proxy.sim.simulator import make_mesh

from .helpers import ADMIN_TOKEN, TOKENS, Pki, make_pki


@dataclass
class Setup:
    mesh: SimulatedMesh
    pki: Pki

    def file(self, name: str, data: bytes | str) -> str:
        return self.pki.path(name, data.encode() if isinstance(data, str) else data)

    def args(self, *extra: str, replicas: Sequence[str] | None = None, token: str | None = ADMIN_TOKEN) -> list[str]:
        argv = ["check", "--plaintext", "--istiod", ",".join(replicas or self.mesh.addresses),
                "--istiod-ca", self.file("ca.pem", self.pki.ca.cert_pem), "--timeout", "2", "--upstream-timeout", "5"]
        if token is not None:
            argv += ["--token-file", self.file("token", token)]
        return argv + list(extra)


@contextlib.asynccontextmanager
async def istiods(tmp_path: str, replicas: int = 3) -> AsyncIterator[Setup]:
    """Replicas serving TLS with istiod's certificate; like istiod, no client certificate required."""
    pki = make_pki(tmp_path)
    mesh = SimulatedMesh(make_mesh(replicas, 3 * replicas, tokens=TOKENS))
    await mesh.start(tls=(pki.istiod.cert_pem, pki.istiod.key_pem, None))
    try:
        yield Setup(mesh, pki)
    finally:
        await mesh.stop()


async def check(argv: list[str]) -> tuple[int, list[str]]:
    out = io.StringIO()
    code = await run_check(cli.parser().parse_args(argv), out, io.StringIO())
    return code, out.getvalue().splitlines()


def only(lines: list[str], prefix: str) -> list[str]:
    return [line for line in lines if line.startswith(prefix)]


async def test_healthy_setup_passes_every_step(tmp_path: str) -> None:
    async with istiods(tmp_path) as s:
        code, lines = await check(s.args())
    assert code == 0, "\n".join(lines)
    assert lines[0] == "✓ configuration: forward mode, istiod over TLS, SAN istiod.istio-system.svc"
    assert only(lines, "✓ discovery static: ") == [f"✓ discovery static: {', '.join(s.mesh.addresses)}"]
    for i, address in enumerate(s.mesh.addresses):
        for step in ("tcp", "tls ca", "tls san", "auth", "syncz"):
            assert only(lines, f"✓ {step} {address}: "), (step, address, lines)
        assert only(lines, f"✓ syncz {address}: istiod-{i} 1.30.3: 3 proxies in ")
    assert not only(lines, "✗")
    assert lines[-1].startswith("all ") and lines[-1].endswith(" checks passed")


async def test_wrong_ca_fails_the_tls_ca_step(tmp_path: str) -> None:
    async with istiods(tmp_path, 1) as s:
        other = s.file("other-ca.pem", TestCA(name="some other root").cert_pem)
        code, lines = await check(s.args("--istiod-ca", other))
    assert code == 1
    [failed] = only(lines, "✗")
    assert failed.startswith(f"✗ tls ca {s.mesh.addresses[0]}: istiod's certificate does not chain to the istio CA")
    assert "issued by CN=istioctl-proxy test root" in failed
    assert "→ try: the mesh root: kubectl -n istio-system get configmap istio-ca-root-cert" in failed
    assert not only(lines, "✓ syncz") and not only(lines, "✓ tls san")
    assert lines[-1].startswith("1 of ")


async def test_wrong_san_fails_the_tls_san_step(tmp_path: str) -> None:
    async with istiods(tmp_path, 1) as s:
        code, lines = await check(s.args("--istiod-san", "istiod-canary.istio-system.svc"))
    assert code == 1
    [failed] = only(lines, "✗")
    address = s.mesh.addresses[0]
    assert failed == (f"✗ tls san {address}: certificate names istiod.istio-system.svc, not "
                      "istiod-canary.istio-system.svc  → try: --istiod-san istiod.istio-system.svc (or --revision "
                      "for istiod-<rev>.<namespace>.svc)")
    assert only(lines, f"✓ tls ca {address}: chain verified (TLSv1.3, ALPN h2)")


async def test_dead_replica_fails_its_tcp_step_only(tmp_path: str) -> None:
    dead = f"127.0.0.1:{free_port()}"
    async with istiods(tmp_path, 2) as s:
        code, lines = await check(s.args(replicas=[*s.mesh.addresses, dead]))
    assert code == 1
    assert only(lines, "✗") == [f"✗ tcp {dead}: Connection refused  → try: is istiod running and listening on "
                                f"{dead}? (15012: TLS, 15010: plaintext)"]
    assert len(only(lines, "✓ syncz ")) == 2
    # Its later steps are not run: they would only repeat the same failure.
    assert not [line for line in lines if f" {dead}:" in line and not line.startswith(f"✗ tcp {dead}")]


async def test_refused_token_fails_the_auth_step(tmp_path: str) -> None:
    async with istiods(tmp_path, 2) as s:
        code, lines = await check(s.args(token="not-a-token-istiod-knows"))
    assert code == 1
    failed = only(lines, "✗")
    assert len(failed) == 2
    for address in s.mesh.addresses:
        [line] = only(failed, f"✗ auth {address}: ")
        assert line.startswith(f"✗ auth {address}: istiod refused the token: authentication failure: invalid token")
        assert "--audience istio-ca" in line
    assert only(lines, "✓ check token: bearer token from ")
    assert "not-a-token-istiod-knows" not in "\n".join(lines)


async def test_refused_upstream_token_in_identity_mode(tmp_path: str) -> None:
    async with istiods(tmp_path, 1) as s:
        p = s.pki
        argv = ["check", "--istiod", s.mesh.addresses[0], "--istiod-ca", s.file("ca.pem", p.ca.cert_pem),
                "--tls-cert", s.file("tls.crt", p.proxy_serving.cert_pem),
                "--tls-key", s.file("tls.key", p.proxy_serving.key_pem), "--client-ca", s.file("ca.pem", p.ca.cert_pem),
                "--upstream-identity", "--upstream-token-file", s.file("up-token", "stale-token")]
        code, lines = await check(argv)
        assert code == 1
        assert only(lines, "✓ serving certificate: localhost, 127.0.0.1 (valid ")
        assert only(lines, f"✗ auth {s.mesh.addresses[0]}: istiod refused the token: authentication failure")

        s.file("up-token", ADMIN_TOKEN)
        code, lines = await check(argv)
        assert code == 0, "\n".join(lines)


async def test_forward_mode_without_a_token_checks_up_to_authentication(tmp_path: str) -> None:
    async with istiods(tmp_path, 1) as s:
        code, lines = await check(s.args(token=None))
    assert code == 0
    assert only(lines, "· credentials: forward mode: the proxy has none of its own")
    assert only(lines, f"· auth {s.mesh.addresses[0]}: istiod answers over gRPC and wants credentials")


async def test_configuration_errors_stop_at_the_first_step() -> None:
    code, lines = await check(["check", "--plaintext", "--istiod-plaintext"])
    assert code == 1
    assert lines == ["✗ configuration: no istiod replicas: give --istiod HOST:PORT, --istiod-dns NAME:PORT or "
                     "--istiod-k8s  → try: change the flag (or ISTIOCTL_PROXY_* variable) named"]


async def test_unresolvable_dns_name_fails_discovery(tmp_path: str) -> None:
    async with istiods(tmp_path, 1) as s:
        argv = s.args("--istiod-dns", "istiod-headless.nowhere.invalid:15012")
        code, lines = await check(argv)
    assert code == 1
    assert only(lines, "✗ discovery dns:istiod-headless.nowhere.invalid:15012: ")
    assert only(lines, f"✓ syncz {s.mesh.addresses[0]}: ")


async def test_cli_exit_code_and_environment_like_serve(tmp_path: str) -> None:
    async with istiods(tmp_path, 1) as s:
        argv = s.args(replicas=["placeholder:1"])
        i = argv.index("--istiod")
        del argv[i:i + 2]  # the replicas come from the environment, as serve would take them
        env = {**os.environ, "ISTIOCTL_PROXY_ISTIOD": s.mesh.addresses[0]}
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "istioctl_proxy", *argv, env=env,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        assert proc.returncode == 0, out.decode() + err.decode()
        assert f"✓ syncz {s.mesh.addresses[0]}: istiod-0" in out.decode()
        assert err == b"", "no spinner and no logs when stderr is not a terminal"

        env["ISTIOCTL_PROXY_ISTIOD"] = f"127.0.0.1:{free_port()}"
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "istioctl_proxy", *argv, env=env,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        assert proc.returncode == 1
        assert "✗ tcp " in out.decode()


async def test_progress_indicator_only_on_a_terminal(tmp_path: str) -> None:
    async with istiods(tmp_path, 1) as s:
        s.mesh.replicas[0].faults.latency = 0.8
        master, slave = os.openpty()
        with os.fdopen(slave, "w", encoding="utf-8") as tty:
            code = await run_check(cli.parser().parse_args(s.args()), io.StringIO(), tty)
        os.set_blocking(master, False)
        shown = b""
        with contextlib.suppress(BlockingIOError, OSError):  # EIO: drained, and the other end is closed
            while chunk := os.read(master, 65536):
                shown += chunk
        os.close(master)
    assert code == 0
    text = shown.decode()
    assert "checking 1 replica(s): tcp, tls, auth, syncz…" in text
    assert text.endswith("\r\x1b[K"), "the spinner line is cleared when the step is done"


@pytest.mark.parametrize(("wanted", "names", "ok"), [
    ("istiod.istio-system.svc", ["istiod.istio-system.svc"], True),
    ("ISTIOD.istio-system.svc", ["istiod.istio-system.svc"], True),
    ("istiod.istio-system.svc", ["*.istio-system.svc"], True),
    ("a.b.istio-system.svc", ["*.istio-system.svc"], False),
    ("istiod.istio-system.svc", ["istiod-canary.istio-system.svc"], False),
    ("10.0.0.1", ["10.0.0.1"], True),
])
def test_san_matching(wanted: str, names: list[str], ok: bool) -> None:
    assert san_matches(wanted, names) is ok


# --- Issue 17 item 3: forward mode never sends callers' tokens unprotected without the operator's word -----


def _serve_config(*argv: str) -> None:
    from istioctl_proxy.config import from_args

    from_args(cli.parser().parse_args(["serve", "--plaintext", *argv]), {})


@pytest.mark.parametrize("insecure", ["--istiod-plaintext", "--istiod-insecure-skip-verify"])
def test_forward_mode_refuses_unprotected_tokens_to_non_loopback_replicas(insecure: str) -> None:
    from istioctl_proxy.errors import ConfigError

    for replicas in (["--istiod", "10.8.1.12:15012"], ["--istiod", "127.0.0.1:15010,istiod.istio-system.svc:15010"],
                     ["--istiod-dns", "localhost:15010"], ["--istiod-k8s"]):
        with pytest.raises(ConfigError, match=f"forward mode with {insecure} would send callers' tokens"):
            _serve_config(*replicas, insecure)
        _serve_config(*replicas, insecure, "--insecure-forward-tokens")  # the operator's explicit decision
    # Loopback replicas only (a sidecar-style local istiod, the tests' simulators): allowed, and warned about.
    _serve_config("--istiod", "127.0.0.2:15010,[::1]:15010,localhost:15010", insecure)


def test_forward_mode_token_override_is_refused_as_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["serve", "--plaintext", "--istiod", "istiod.istio-system.svc:15010", "--istiod-plaintext"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--insecure-forward-tokens" in err


async def test_check_fails_unprotected_forwarded_tokens_unless_overridden(tmp_path: str) -> None:
    async with istiods(tmp_path, 1) as s:
        far = ["--istiod", "istiod.istio-system.svc:15012", "--istiod-insecure-skip-verify"]
        code, lines = await check(["check", "--plaintext", *far, "--timeout", "1"])
        assert code == 1
        assert lines[0].startswith("✗ configuration: forward mode with --istiod-insecure-skip-verify would send")
        # Overridden: not a failure, but said in capitals.
        code, lines = await check(["check", "--plaintext", *far, "--insecure-forward-tokens", "--timeout", "1"])
        assert only(lines, "· forwarded tokens: INSECURE: sent to istiod without verified TLS")
        # Verified TLS: said so.
        code, lines = await check(s.args())
        assert code == 0 and only(lines, "✓ forwarded tokens: callers' tokens go to istiod over TLS verified")


async def test_serve_warns_whenever_forwarded_tokens_travel_unprotected(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from .helpers import stack

    caplog.set_level(logging.WARNING, logger="istioctl_proxy.app")
    async with stack(1, 1):  # forward mode, --istiod-plaintext, loopback replicas
        pass
    warned = [r for r in caplog.records if "callers' bearer tokens travel to istiod without verified TLS" in
              r.getMessage()]
    assert len(warned) == 1 and "loopback replicas only" in warned[0].getMessage()
