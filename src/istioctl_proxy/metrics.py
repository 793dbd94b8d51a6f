"""Prometheus metrics of one Proxy, in a registry of its own.

Each Proxy owns a `Metrics` (and so a CollectorRegistry): two proxies in one process (tests, the demo)
never share counters, and nothing here is module-level state. Names follow the Prometheus conventions:
`istioctl_proxy_` prefix, `_total` on counters (prometheus-client adds it), `_seconds` and `_bytes` units.

Label values are bounded: type URLs are folded to the three served ones (callers choose type URLs, and a
label per arbitrary string would let any caller grow the registry), and per-replica series are removed
when discovery drops the replica (pods come and go; their series must not pile up for months).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from .discovery import Replica
from .model import Answer
from .policy import SUPPORTED_TYPES

# Calls fan out to every replica and may merge large answers: seconds, not milliseconds, at the top.
_CALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_UPSTREAM_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

OTHER_TYPE = "other"
COALESCED = "coalesced"
CACHED = "cached"


def type_label(type_url: str) -> str:
    """The type URL as a label value: one of the served types, or "other"."""
    return type_url if type_url in SUPPORTED_TYPES else OTHER_TYPE


@dataclass
class LastAnswer:
    """The latest upstream outcome of one replica, for the status page ("last latency")."""

    seconds: float
    code: str  # gRPC status code name; "OK" on success
    error: str
    at: float  # time.time() of the answer


class Metrics:
    """Every metric the proxy exports, and the methods the data path calls to move them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.last_answer: dict[str, LastAnswer] = {}  # by replica address
        self._define_call_metrics()
        self._define_upstream_metrics()
        self._define_state_metrics()
        self._define_stream_metrics()
        self._define_kubernetes_metrics()

    def _define_call_metrics(self) -> None:
        r = self.registry
        self.calls = Counter("istioctl_proxy_calls", "Calls answered, by type URL and outcome "
                             "(OK, PARTIAL: some replicas failed, or the gRPC status code returned).",
                             ["type_url", "outcome"], registry=r)
        self.call_seconds = Histogram("istioctl_proxy_call_duration_seconds",
                                      "Time from a request to its merged answer (or failure), by type URL.",
                                      ["type_url"], buckets=_CALL_BUCKETS, registry=r)
        self.in_flight = Gauge("istioctl_proxy_calls_in_flight", "Calls being answered now, by type URL.",
                               ["type_url"], registry=r)
        self.resources = Counter("istioctl_proxy_merged_resources", "Resources in merged answers, by type URL.",
                                 ["type_url"], registry=r)
        self.response_bytes = Counter("istioctl_proxy_response_bytes", "Bytes of merged answers sent, by type URL.",
                                      ["type_url"], registry=r)
        self.shared = Counter("istioctl_proxy_shared_answers",
                              "Calls answered from another caller's in-flight fan-out (kind=coalesced) or "
                              "from the answer cache (kind=cached), by type URL.",
                              ["type_url", "kind"], registry=r)

    def _define_upstream_metrics(self) -> None:
        r = self.registry
        self.upstream_seconds = Histogram("istioctl_proxy_upstream_duration_seconds",
                                          "Time one istiod replica took to answer (or fail), by replica.",
                                          ["replica", "source"], buckets=_UPSTREAM_BUCKETS, registry=r)
        self.upstream_errors = Counter("istioctl_proxy_upstream_errors",
                                       "Upstream calls that failed, by replica and gRPC status code.",
                                       ["replica", "source", "code"], registry=r)
        self.upstream_broken = Counter("istioctl_proxy_upstream_connection_broken",
                                       "Upstream requests under which the replica's connection broke (no status: "
                                       "the replica may have crashed on it); such a request is never retried on "
                                       "another replica.", registry=r)

    def _define_state_metrics(self) -> None:
        r = self.registry
        self.replicas_known = Gauge("istioctl_proxy_replicas_known", "istiod replicas discovery lists now.",
                                    registry=r)
        self.replicas_healthy = Gauge("istioctl_proxy_replicas_healthy",
                                      "Known replicas whose channel was connected at the last probe.", registry=r)
        self.replica_up = Gauge("istioctl_proxy_replica_up", "1 if the replica's channel was connected at the "
                                "last probe, else 0.", ["replica", "source"], registry=r)
        self.ready = Gauge("istioctl_proxy_ready", "1 when /readyz answers 200.", registry=r)
        # Canary upgrades: replicas per istio.io/rev ("" when discovery does not say), and certificates
        # refused because they do not carry the replica's own revision's name (or chain to the CA).
        self.revision_known = Gauge("istioctl_proxy_revision_replicas_known",
                                    "istiod replicas discovery lists now, by revision.", ["revision"], registry=r)
        self.revision_healthy = Gauge("istioctl_proxy_revision_replicas_healthy",
                                      "Replicas of the revision whose channel was connected at the last probe.",
                                      ["revision"], registry=r)
        self.upstream_tls_refused = Counter("istioctl_proxy_upstream_tls_refused",
                                            "Readiness probes that found a replica's certificate refused, by "
                                            "revision and reason (san: it does not name the replica's own "
                                            "revision's SAN; ca: it does not chain to the istio CA).",
                                            ["revision", "reason"], registry=r)

    def _define_stream_metrics(self) -> None:
        r = self.registry
        self.streams_open = Gauge("istioctl_proxy_streams_open", "ADS streams open now.", registry=r)
        self.streams_cut = Counter("istioctl_proxy_streams_cut",
                                   "Streams the proxy ended or refused to protect itself, by reason "
                                   "(first_message_timeout, idle_timeout, max_age, max_streams, "
                                   "max_streams_per_connection, send_budget, slow_reader, send_timeout, "
                                   "send_budget_caller_share, send_budget_fanout, send_budget_unread).",
                                   ["reason"], registry=r)
        self.send_queued_bytes = Gauge("istioctl_proxy_send_queued_bytes",
                                       "Bytes of answers handed to gRPC and not yet taken by their callers "
                                       "(bounded by --send-budget-mib).", registry=r)
        self.send_pinned_bytes = Gauge("istioctl_proxy_send_pinned_bytes",
                                       "Bytes of cut answers that may still wait in gRPC's buffers until their "
                                       "connections close, charged to their callers (at most --send-budget-mib).",
                                       registry=r)
        self.internal_errors = Counter("istioctl_proxy_internal_errors",
                                       "Unexpected exceptions at the gRPC boundary (answered INTERNAL, logged "
                                       "with a traceback): each one is a bug.", registry=r)

    def _define_kubernetes_metrics(self) -> None:
        r = self.registry
        self.token_reviews = Counter("istioctl_proxy_token_reviews", "TokenReview API calls made, by result "
                                     "(authenticated, refused, unavailable).", ["result"], registry=r)
        self.token_reviews_limited = Counter("istioctl_proxy_token_reviews_limited",
                                             "Calls refused (RESOURCE_EXHAUSTED) because a TokenReview would exceed "
                                             "a limit (rate, peer-rate, peer-concurrency).", ["limit"], registry=r)
        self.ca_updates_rejected = Counter("istioctl_proxy_ca_updates_rejected",
                                           "istio-ca-root-cert ConfigMap values refused because they do not parse "
                                           "as a PEM bundle (the last good root stays in use).", registry=r)
        self.discovery_skipped = Counter("istioctl_proxy_discovery_skipped_pods",
                                         "istiod pods not dialled because of their address (loopback, link-local, "
                                         "unspecified, multicast, host-network, invalid), by reason.",
                                         ["reason"], registry=r)

    # -- the data path ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def calling(self, type_url: str) -> Iterator[None]:
        """Counts a call as in flight for the duration of the block."""
        gauge = self.in_flight.labels(type_label(type_url))
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()

    def observe_call(self, type_url: str, outcome: str, seconds: float, resources: int, body_bytes: int) -> None:
        """Count one call by type and outcome, with its latency, resources and bytes."""
        label = type_label(type_url)
        self.calls.labels(label, outcome).inc()
        self.call_seconds.labels(label).observe(seconds)
        if resources:
            self.resources.labels(label).inc(resources)
        if body_bytes:
            self.response_bytes.labels(label).inc(body_bytes)

    def shared_answer(self, type_url: str, kind: str) -> None:
        """For the coalescing/caching layer: a call served without a fan-out of its own.

        kind is COALESCED (joined a fan-out already in flight) or CACHED (served from --cache-ttl).
        """
        if kind not in (COALESCED, CACHED):
            raise ValueError(f"kind must be {COALESCED!r} or {CACHED!r}, not {kind!r}")
        self.shared.labels(type_label(type_url), kind).inc()

    def observe_upstream(self, answer: Answer) -> None:
        """The FanOut hook: one replica's answer or failure."""
        replica = answer.replica
        self.upstream_seconds.labels(replica.address, replica.source).observe(answer.seconds)
        if not answer.ok:
            self.upstream_errors.labels(replica.address, replica.source, answer.code.name).inc()
        if answer.broken:
            self.upstream_broken.inc()
        self.last_answer[replica.address] = LastAnswer(answer.seconds, answer.code.name, answer.error, time.time())

    # -- replica state ---------------------------------------------------------------------------------
    def set_replicas(self, up: dict[Replica, bool]) -> None:
        """The readiness probe's view: which known replicas are connected."""
        self.replicas_known.set(len(up))
        self.replicas_healthy.set(sum(up.values()))
        for replica, ok in up.items():
            self.replica_up.labels(replica.address, replica.source).set(1 if ok else 0)

    def set_revisions(self, counts: dict[str, tuple[int, int]]) -> None:
        """Per revision (known, healthy); revisions no longer listed lose their series."""
        for family in self.revision_known.collect():
            for sample in family.samples:
                if sample.labels["revision"] not in counts:
                    self.revision_known.remove(sample.labels["revision"])
                    with contextlib.suppress(KeyError):
                        self.revision_healthy.remove(sample.labels["revision"])
        # Revisions are pod labels anyone who can create a pod there chooses: a gone revision's refusal
        # counts go with it, or churning labels would grow the series without bound.
        for family in self.upstream_tls_refused.collect():
            for sample in family.samples:
                if sample.labels["revision"] not in counts:
                    self.upstream_tls_refused.remove_by_labels({"revision": sample.labels["revision"]})
        for revision, (known, healthy) in counts.items():
            self.revision_known.labels(revision).set(known)
            self.revision_healthy.labels(revision).set(healthy)

    def retain(self, replicas: Sequence[Replica]) -> None:
        """A discovery listener: drop the series of replicas that are gone."""
        keep = {r.address for r in replicas}
        for address in [a for a in self._known_addresses() if a not in keep]:
            for metric in (self.upstream_seconds, self.upstream_errors, self.replica_up):
                metric.remove_by_labels({"replica": address})
            self.last_answer.pop(address, None)
        self.replicas_known.set(len(keep))

    def _known_addresses(self) -> set[str]:
        seen = set(self.last_answer)
        for metric in (self.upstream_seconds, self.upstream_errors, self.replica_up):
            for family in metric.collect():
                seen.update(s.labels["replica"] for s in family.samples if "replica" in s.labels)
        return seen

    def exposition(self, accept: str) -> tuple[bytes, str]:
        """The scrape body and its content type, negotiated like prometheus-client's own handler."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


__all__ = ["CACHED", "COALESCED", "LastAnswer", "Metrics", "type_label"]
