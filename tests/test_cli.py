"""The command line: one clear line for bad configuration, environment variables, SIGTERM drain."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

import pytest

from istioctl_proxy.config import add_serve_flags, from_args
from istioctl_proxy.errors import ConfigError

from .waits import until_sync


def _cfg(args: list[str], env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    p = argparse.ArgumentParser()
    add_serve_flags(p, env or {})
    return from_args(p.parse_args(args), env or {})


def test_flags_from_environment() -> None:
    cfg = _cfg(
        [],
        {
            "ISTIOCTL_PROXY_ISTIOD": "10.0.0.1:15012,10.0.0.2:15012",
            "ISTIOCTL_PROXY_PLAINTEXT": "true",
            "ISTIOCTL_PROXY_ISTIOD_PLAINTEXT": "1",
            "ISTIOCTL_PROXY_UPSTREAM_TIMEOUT": "3.5",
            "ISTIOCTL_PROXY_INSECURE_FORWARD_TOKENS": "true",  # forward mode + plaintext to non-loopback
        },
    )
    assert cfg.istiod == ("10.0.0.1:15012", "10.0.0.2:15012")
    assert cfg.plaintext and cfg.istiod_plaintext and cfg.upstream_timeout == 3.5


SWITCHES = ("plaintext", "istiod-k8s", "istiod-plaintext", "istiod-ca-configmap", "istiod-insecure-skip-verify",
            "require-all", "upstream-identity", "token-review", "admin-status-page", "coalesce",
            "istiod-allow-loopback", "istiod-allow-host-network", "insecure-forward-tokens",
            "admin-status-page-remote", "all-revisions")


def _switch_fields(args: list[str], env: dict[str, str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_serve_flags(p, env)
    return p.parse_args(args)


def test_every_switch_is_a_boolean_flag_with_a_no_form() -> None:
    p = argparse.ArgumentParser()
    add_serve_flags(p, {})
    switches = {a.option_strings[0][2:] for a in p._actions if a.nargs == 0 and a.option_strings[0] != "-h"}
    assert switches == set(SWITCHES)
    for name in SWITCHES:
        assert any(a.option_strings == [f"--{name}", f"--no-{name}"] for a in p._actions), name


@pytest.mark.parametrize("name", SWITCHES)
def test_a_switch_set_by_its_variable_is_turned_off_by_its_no_flag(name: str) -> None:
    var = "ISTIOCTL_PROXY_" + name.upper().replace("-", "_")
    dest = name.replace("-", "_")
    assert getattr(_switch_fields([], {var: "true"}), dest) is True
    assert getattr(_switch_fields([f"--no-{name}"], {var: "true"}), dest) is False
    assert getattr(_switch_fields([f"--{name}"], {var: "false"}), dest) is True
    assert getattr(_switch_fields([], {var: "off"}), dest) is False


def test_switches_through_the_whole_config() -> None:
    base = ["--istiod", "127.0.0.1:1", "--plaintext"]
    on = {"ISTIOCTL_PROXY_ISTIOD_PLAINTEXT": "true", "ISTIOCTL_PROXY_REQUIRE_ALL": "1"}
    cfg = _cfg(base, on)
    assert cfg.istiod_plaintext and cfg.require_all and cfg.coalesce
    with pytest.raises(ConfigError, match="--istiod-ca"):  # plaintext upstream turned off: TLS needs a CA
        _cfg([*base, "--no-istiod-plaintext", "--no-require-all"], on)
    cfg = _cfg([*base, "--no-require-all", "--no-coalesce"], on)
    assert not cfg.require_all and not cfg.coalesce and cfg.istiod_plaintext
    # The variable of the old --no-coalesce switch still turns sharing off, and --coalesce back on.
    assert not _cfg(base, {**on, "ISTIOCTL_PROXY_NO_COALESCE": "true"}).coalesce
    assert _cfg([*base, "--coalesce"], {**on, "ISTIOCTL_PROXY_NO_COALESCE": "true"}).coalesce


def test_a_switch_variable_that_is_not_a_boolean_is_one_clear_error() -> None:
    with pytest.raises(ConfigError, match="ISTIOCTL_PROXY_REQUIRE_ALL='maybe': a switch takes true or false"):
        _cfg(["--istiod", "127.0.0.1:1", "--plaintext", "--istiod-plaintext"], {"ISTIOCTL_PROXY_REQUIRE_ALL": "maybe"})


def test_plaintext_listens_on_loopback_unless_told_otherwise() -> None:
    assert _cfg(["--plaintext", "--istiod", "127.0.0.1:1", "--istiod-plaintext"]).listen == "127.0.0.1:9090"
    assert (
        _cfg(["--plaintext", "--istiod", "127.0.0.1:1", "--istiod-plaintext", "--listen", "0.0.0.0:9090"]).listen
        == "0.0.0.0:9090"
    )


def test_san_default_follows_namespace_and_revision() -> None:
    base = ["--plaintext", "--istiod", "a:1", "--istiod-ca", __file__]
    assert _cfg(base).san == "istiod.istio-system.svc"
    assert (
        _cfg([*base, "--revision", "canary", "--istio-namespace", "external-istiod"]).san
        == "istiod-canary.external-istiod.svc"
    )
    assert _cfg(base, {"POD_NAMESPACE": "external-istiod"}).istio_namespace == "external-istiod"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "no istiod replicas"),
        (["--istiod", "a:1", "--istiod-plaintext"], "serving TLS needs --tls-cert"),
        (["--istiod", "a:1", "--plaintext"], "upstream TLS needs the istio root CA"),
        (["--istiod", "nonsense", "--plaintext", "--istiod-plaintext"], "not HOST:PORT"),
        (["--istiod", "a:1", "--plaintext", "--istiod-ca", "/nonexistent/ca.pem"], "cannot read"),
        (["--istiod", "a:1", "--plaintext", "--istiod-plaintext", "--upstream-identity"], "needs TLS and --client-ca"),
        (["--istiod", "a:1", "--plaintext", "--istiod-plaintext", "--upstream-timeout", "x"], "not a number"),
        (["--istiod", "a:1", "--plaintext", "--istiod-plaintext", "--log-format", "xml"], "text or json"),
    ],
)
def test_invalid_configuration_is_one_clear_error(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _cfg(args)


def test_cli_prints_one_line_not_a_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "istioctl_proxy", "serve", "--istiod", "a:1", "--plaintext"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HOME": "/nonexistent"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "istio root CA" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_busy_listen_port_is_one_line_not_a_traceback() -> None:
    """grpcio raises RuntimeError("Failed to bind ...") for a busy port (it no longer returns 0): before, `serve`
    only knew OSError, and the caller got a traceback instead of the one-line "cannot listen"."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        proc = subprocess.run(
            [sys.executable, "-m", "istioctl_proxy", "serve", "--istiod", "127.0.0.1:1", "--plaintext",
             "--istiod-plaintext", "--admin-listen", "", "--listen", busy],
            capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": "/nonexistent"},
        )
    assert proc.returncode == 2, proc.stderr
    # gRPC's core logs its own line first ("E... add_port.cc ... Address already in use"); ours is the last.
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"istioctl-proxy: cannot listen on {busy}")


def test_sigterm_drains_and_exits() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "istioctl_proxy",
            "serve",
            "--plaintext",
            "--listen",
            "127.0.0.1:0",
            "--istiod",
            "127.0.0.1:1",
            "--istiod-plaintext",
            "--admin-listen",
            "",
            "--drain-seconds",
            "1",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stderr = proc.stderr
        assert stderr is not None
        until_sync(lambda: "serving ADS" in stderr.readline(), "the proxy to log 'serving ADS'", step=0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert "draining" in proc.stderr.read()
    finally:
        proc.kill()
