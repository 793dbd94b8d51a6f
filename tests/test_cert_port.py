"""Issue 17 item 7: with --token-review, certificate callers keep working, on a second port.

grpcio's Python API cannot ask for a client certificate optionally (require_client_auth maps to "do not
request" or "request and require"; verified with openssl s_client against grpcio 1.85), so a port that takes
token callers never sees certificates. --cert-listen adds a port on the same server that requires them.
"""

from __future__ import annotations

import grpc
import pytest

from istioctl_proxy import app, client, tokenreview
from istioctl_proxy.errors import ConfigError

from . import ads_client
from .helpers import Stack, stack
from .waits import EVENT_TIMEOUT

NS1_TOKEN = "ns-1-token"


class _StandInReviewer:
    """Answers like TokenReviewAuthenticator for one known token (no API server)."""

    on_review: object = None
    on_limited: object = None

    async def review(self, token: str, peer: str) -> tokenreview.TokenIdentity | None:
        return tokenreview.TokenIdentity("ns-1", "default") if token == NS1_TOKEN else None

    async def close(self) -> None:
        pass


@pytest.fixture
def fake_reviewer(monkeypatch: pytest.MonkeyPatch) -> None:
    # The Kubernetes side of TokenReview is tested against a real API server in tests/test_kubernetes.py;
    # what is under test here is which TLS port asks for what.
    monkeypatch.setattr(app, "token_reviewer_from_config", lambda cfg: _StandInReviewer())


def _target(s: Stack, port: int, *, cert_ns: str = "", token: str = "") -> client.Target:
    assert s.pki is not None
    leaf = s.pki.client(cert_ns) if cert_ns else None
    return client.Target(f"127.0.0.1:{port}", ca_pem=s.pki.ca.cert_pem, authority="localhost", namespace="ns-1",
                         cert_pem=leaf.cert_pem if leaf else None, key_pem=leaf.key_pem if leaf else None,
                         token=token)


@pytest.mark.usefixtures("fake_reviewer")
async def test_token_port_and_certificate_port_serve_both_kinds_of_caller() -> None:
    async with stack(2, 8, identity=True, token_review=True, cert_listen="127.0.0.1:0") as s:
        assert s.proxy.cert_port and s.proxy.cert_port != s.proxy.port
        # Token callers: the --listen port, which does not ask for a certificate.
        resp, _ = await ads_client.request(_target(s, s.proxy.port, token=NS1_TOKEN), client.SYNCZ,
                                           timeout=EVENT_TIMEOUT)
        assert resp.resources
        # A certificate caller there offers no certificate (none was asked for): refused, as before.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await ads_client.request(_target(s, s.proxy.port, cert_ns="istio-system"), client.SYNCZ,
                                     timeout=EVENT_TIMEOUT)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Certificate callers: the --cert-listen port, with their SPIFFE identity and its scope.
        everything, _ = await ads_client.request(_target(s, s.proxy.cert_port, cert_ns="istio-system"), client.SYNCZ,
                                             timeout=EVENT_TIMEOUT)
        scoped, _ = await ads_client.request(_target(s, s.proxy.cert_port, cert_ns="ns-1"), client.SYNCZ,
                                             timeout=EVENT_TIMEOUT)
        assert len(everything.resources) == 8 and 0 < len(scoped.resources) < 8
        assert len(scoped.resources) == len(resp.resources)  # ns-1 by token or by certificate: the same view
        # And the certificate port requires one: a token alone does not get through the handshake.
        with pytest.raises(grpc.aio.AioRpcError) as no_cert:
            await ads_client.request(_target(s, s.proxy.cert_port, token=NS1_TOKEN), client.SYNCZ,
                                     timeout=EVENT_TIMEOUT)
        assert no_cert.value.code() == grpc.StatusCode.UNAVAILABLE


def test_cert_listen_needs_token_review() -> None:
    from istioctl_proxy import cli
    from istioctl_proxy.config import from_args

    with pytest.raises(ConfigError, match="--cert-listen is the certificate port beside a --token-review port"):
        from_args(cli.parser().parse_args(["serve", "--plaintext", "--istiod", "127.0.0.1:1", "--istiod-plaintext",
                                           "--cert-listen", "0.0.0.0:9091"]), {})


@pytest.mark.usefixtures("fake_reviewer")
async def test_a_busy_cert_port_is_an_os_error_naming_the_flag_and_frees_the_ads_port() -> None:
    """grpcio raises RuntimeError for a busy port (it no longer returns 0): the start now fails with the
    OSError that `serve` turns into one line, and gives back the ADS port it had bound."""
    import socket

    ads = app.free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(OSError, match=f"cannot listen on --cert-listen {busy}"):
            async with stack(1, 1, identity=True, token_review=True, cert_listen=busy, listen=f"127.0.0.1:{ads}"):
                pass
    with socket.socket() as again:
        again.bind(("127.0.0.1", ads))  # raises if the failed start kept it
