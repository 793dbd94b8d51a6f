"""Red team (stop 20) against real istiod: who is "one caller" to the send budget in forward mode.

The budget's share is per `Caller.key`; in forward mode that is a fingerprint of the token's bytes, and the
proxy never verifies the token (istiod does). The simulated half is tests/test_redteam_fairness.py.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator

import pytest

from istioctl_proxy import client
from istioctl_proxy.policy import SYNCZ

from .. import ads_client
from .jwt_issuer import JwtIssuer
from .mesh import Mesh
from .proxy_process import ProxyProcess
from .test_hostile import _proxy

pytestmark = pytest.mark.e2e

_B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def re_spellings(part: str) -> list[str]:
    """One base64url part with its last character varied in the bits no byte uses (itself first).

    Every variant decodes to the same bytes; a decoder that is not strict (Go's RawURLEncoding, which go-jose
    and go-oidc use) accepts them all."""
    unused = 6 * len(part) - 8 * len(_decode(part))
    last = _B64URL.index(part[-1])
    base = last & ~((1 << unused) - 1)
    out = [part] + [f"{part[:-1]}{_B64URL[base | k]}" for k in range(1 << unused) if base | k != last]
    assert all(_decode(v) == _decode(part) for v in out)
    return out


def re_encodings(token: str) -> list[str]:
    """The same JWT with its signature's last base64url character varied in its spare bits."""
    header, payload, sig = token.split(".")
    return [f"{header}.{payload}.{v}" for v in re_spellings(sig)]


@pytest.fixture(scope="module")
def forward_proxy(mesh: Mesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    proxy = _proxy(mesh, tmp_path_factory.mktemp("redteam-fairness-forward"), False)
    yield proxy
    proxy.stop()


async def test_one_token_re_spelled_is_still_one_caller(
    mesh: Mesh, jwt_issuer: JwtIssuer, forward_proxy: ProxyProcess
) -> None:
    # A claim that gives the payload spare bits too (its length not a multiple of 3 bytes).
    token = next(t for t in (jwt_issuer.mint("istio-system", extra_claims={"pad": "x" * k}) for k in range(3))
                 if len(re_spellings(t.split(".")[1])) > 1)
    header, payload, sig = token.split(".")
    spellings = re_encodings(token)
    assert len(spellings) == 16 and token in spellings  # RS256, 2048-bit key: 4 spare bits
    # The header's and payload's spare bits too: go-jose verifies the signature over its re-encoding of the
    # decoded header and payload, not over the bytes sent. (Padding is refused: "illegal base64 data".)
    spellings += [f"{h}.{payload}.{sig}" for h in re_spellings(header)[1:]]
    spellings += [f"{header}.{p}.{sig}" for p in re_spellings(payload)[1:]]
    for spelling in spellings:
        target = client.Target(forward_proxy.address, ca_pem=mesh.root_cert_pem, authority="localhost",
                               token=spelling, namespace="istio-system")  # fmt: skip
        resp, _ = await ads_client.request(target, SYNCZ)  # raises if istiod refuses this spelling
        assert resp.type_url == SYNCZ
    # Verified: istiod (go-oidc / go-jose, non-strict base64) accepts every spelling: one credential.
    n = len(spellings)
    callers = re.findall(r"call type=" + re.escape(SYNCZ) + r" caller=(\S+) outcome=OK", forward_proxy.log())
    assert len(callers) >= n
    # Before the fix: one caller per spelling, each with its own share of the send budget
    # (half of it), its own round-robin turn and its own per-caller queue. The log names the budget's caller.
    assert len(set(callers[-n:])) == 1, sorted(set(callers[-n:]))
