"""A tiny OIDC-less JWT issuer: an RS256 key, a JWKS document served on loopback, and token minting.

istiod's JwtAuthenticator (JWT_RULE with jwks_uri) fetches the key set lazily over plain http and accepts
tokens whose `sub` is `system:serviceaccount:<ns>:<sa>` and whose `aud` (a JSON array) holds one of the
rule's audiences; the caller then has the identity spiffe://<trustDomain>/ns/<ns>/sa/<sa>.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

DEFAULT_ISSUER = "https://istioctl-proxy-e2e.test"
DEFAULT_AUDIENCES = ("istio-ca",)


class JwtIssuer:
    """Serves /jwks.json on 127.0.0.1 from a daemon thread and mints tokens signed with its key."""

    def __init__(self, issuer: str = DEFAULT_ISSUER, host: str = "127.0.0.1", port: int = 0) -> None:
        self.issuer = issuer
        self.kid = "e2e-key-1"
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._host, self._port = host, port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.jwks_fetches = 0  # lets tests prove istiod really fetched the key set

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> JwtIssuer:
        self._server = ThreadingHTTPServer((self._host, self._port), self._handler_class())
        self._server.daemon_threads = True
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="jwks", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> JwtIssuer:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # -- what istiod is configured with ------------------------------------------------------------
    @property
    def jwks_uri(self) -> str:
        return f"http://{self._host}:{self._port}/jwks.json"

    def jwks(self) -> dict[str, Any]:
        jwk: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(self._key.public_key()))
        jwk.update(kid=self.kid, alg="RS256", use="sig")
        return {"keys": [jwk]}

    def jwt_rule(self, audiences: tuple[str, ...] = DEFAULT_AUDIENCES) -> str:
        """The JWT_RULE env value for istiod. jwks_uri avoids OIDC discovery, which istiod would run at
        startup (and die on) without it."""
        return json.dumps({"issuer": self.issuer, "jwks_uri": self.jwks_uri, "audiences": list(audiences)})

    # -- tokens ------------------------------------------------------------------------------------
    def mint(
        self,
        namespace: str,
        service_account: str = "default",
        *,
        audiences: tuple[str, ...] = DEFAULT_AUDIENCES,
        ttl_s: int = 3600,
        issuer: str | None = None,
        extra_claims: dict[str, Any] | None = None,
    ) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": issuer or self.issuer,
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
            # Must be a JSON array: istiod unmarshals aud into []string and a bare string fails.
            "aud": list(audiences),
            "iat": now,
            "exp": now + ttl_s,
        }
        claims.update(extra_claims or {})
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self.kid})

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/jwks.json":
                    self.send_error(404)
                    return
                issuer.jwks_fetches += 1
                body = json.dumps(issuer.jwks()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # keep pytest output quiet
                pass

        return Handler
