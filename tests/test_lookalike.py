"""The identity-mode look-alike check (aggregator._may_match_connection) against istiod's substring lookup."""

from __future__ import annotations

import itertools

from istioctl_proxy.aggregator import _may_match_connection


def _istiod_could_match(proxy_id: str, node_id: str, counters: range) -> bool:
    """istiod's getProxyConnection: strings.Contains(conID, proxyID), conID = "<node id>-<counter>"."""
    return any(proxy_id in f"{node_id}-{c}" for c in counters)


def test_lookalike_rule_is_istiods_substring_match() -> None:
    node_ids = ["web.team", "web.team-1", "web.team2", "a-b.c-1", "x", "web-1.e2e-sidecars", "t-12.ns-3"]
    pieces = ["web", ".team", "-1", "-12", "2", "-", "-1-", "team-1-", "-3-1", "a-b.c-1-", "e2e", "x-9", "-2"]
    proxy_ids = {"".join(p) for p in itertools.product(pieces, repeat=2)} | set(pieces) | set(node_ids)
    for proxy_id, node_id in itertools.product(sorted(proxy_ids), node_ids):
        # Counters 1..1999 cover every digit prefix the proxy ids above can end with.
        assert _may_match_connection(proxy_id, node_id) == _istiod_could_match(proxy_id, node_id, range(1, 2000)), \
            (proxy_id, node_id)


class _CountingStr(str):
    slices = 0

    def __getitem__(self, key: object) -> str:
        type(self).slices += 1
        return str.__getitem__(self, key)  # type: ignore[index]


def test_a_long_requested_id_costs_linear_time_per_proxy() -> None:
    """Red team: a scoped caller's 4000-byte config_dump name made the check copy the rest of the id at
    every character, for every proxy of every replica (O(n^2) each): one request held the event loop
    0.76 s per replica of 250 proxies (about 30 s per replica of 10k), freezing every caller."""
    proxy_id = _CountingStr("a-" * 2000)
    assert not _may_match_connection(proxy_id, "web-1.team")
    assert _CountingStr.slices <= 2
