from __future__ import annotations

from istioctl_proxy import client

from . import ads_client
from .helpers import stack


async def test_syncz_merges_all_replicas_forward_mode() -> None:
    async with stack(3, 12) as s:
        resp, _ = await ads_client.request(s.target(), client.SYNCZ)
        ids = sorted(r.name for r in client.rows(resp))
        assert ids == sorted(p.id for r in s.replicas for p in r.proxies)
        assert {r.istiod for r in client.rows(resp)} == {"<external>"}


async def test_syncz_identity_mode() -> None:
    async with stack(3, 12, identity=True) as s:
        assert s.pki is not None
        resp, _ = await ads_client.request(s.target(leaf=s.pki.client("istio-system")), client.SYNCZ)
        assert len(resp.resources) == 12
