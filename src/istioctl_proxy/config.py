"""`serve` configuration: flag definitions (each also an ISTIOCTL_PROXY_* variable) and one typed Config.

Validation happens here, before anything starts: a bad combination or unreadable file is a ConfigError
with one line that says what to change.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .discovery import parse_entry, split_host_port
from .errors import ConfigError

ENV_PREFIX = "ISTIOCTL_PROXY_"
MiB = 1024 * 1024


@dataclass(frozen=True)
class Config:
    """Every `serve` setting, typed; each field's default is its flag's default (add_serve_flags reads it)."""

    listen: str = "0.0.0.0:9090"
    plaintext: bool = False
    tls_cert: str = ""
    tls_key: str = ""
    client_ca: str = ""
    istiod: tuple[str, ...] = ()
    istiod_dns: tuple[str, ...] = ()
    istiod_dns_interval: float = 5.0
    istiod_k8s: bool = False
    istiod_selector: str = "app=istiod"
    revision: str = ""
    istiod_port: int = 15012
    istiod_allow_loopback: bool = False
    istiod_allow_host_network: bool = False
    kubeconfig: str = ""
    context: str = ""
    istiod_plaintext: bool = False
    istiod_ca: str = ""
    istiod_ca_configmap: bool = False
    istiod_san: str = ""
    istiod_insecure_skip_verify: bool = False
    insecure_forward_tokens: bool = False
    istio_namespace: str = "istio-system"
    trust_domain: str = "cluster.local"
    debug_allowed_namespaces: tuple[str, ...] = ()
    require_all: bool = False
    upstream_timeout: float = 10.0
    upstream_identity: bool = False
    upstream_cert: str = ""
    upstream_key: str = field(default="", repr=False)
    upstream_token_file: str = ""
    token_review: bool = False
    token_review_kubeconfig: str = ""
    token_review_audiences: tuple[str, ...] = ("istio-ca",)
    token_review_cache_ttl: float = 10.0
    token_review_rate: float = 20.0
    token_review_peer_rate: float = 2.0
    token_review_concurrency: int = 4
    external_id: str = "<external>"
    max_message_mib: int = 256
    max_request_kib: int = 1024
    first_message_timeout: float = 10.0
    stream_idle_timeout: float = 300.0
    # istioctl makes one short connection per run; a cut answer stays charged to its caller for up to its
    # connection's life (server.connection_life), so callers' connections live minutes, not istiod's 30.
    max_stream_age: float = 300.0
    max_streams: int = 10000
    max_streams_per_connection: int = 1000
    send_budget_mib: int = 48
    send_timeout: float = 60.0
    slow_reader_seconds: float = 5.0
    slow_reader_min_kib_per_second: int = 1024
    admin_listen: str = "127.0.0.1:15090"
    admin_status_page: bool = False
    admin_status_page_remote: bool = False
    cert_listen: str = ""
    cache_ttl: float = 0.0
    coalesce: bool = True
    log_level: str = "info"
    log_format: str = "text"
    drain_seconds: float = 20.0
    # Canary upgrades (docs/deploy.md): several revisions in one view.
    all_revisions: bool = False
    ready_policy: str = "every-revision"
    istiod_column: str = "external"

    @property
    def max_message_bytes(self) -> int:
        """--max-message-mib in bytes."""
        return self.max_message_mib * MiB

    @property
    def max_request_bytes(self) -> int:
        """--max-request-kib in bytes."""
        return self.max_request_kib * 1024

    @property
    def san(self) -> str:
        """The name istiod's certificate must carry: --istiod-san, else derived from namespace and revision."""
        if self.istiod_san:
            return self.istiod_san
        return istiod_san(self.istio_namespace, self.revisions[0] if len(self.revisions) == 1 else None)

    @property
    def revisions(self) -> tuple[str, ...]:
        """`--revision` as a list (it takes one revision or several, comma-separated)."""
        return _csv(self.revision)

    @property
    def multi_revision(self) -> bool:
        """Several revisions in one view: each replica is verified against its own revision's SAN."""
        return self.all_revisions or len(self.revisions) > 1


# --plaintext serves on loopback unless --listen says otherwise: callers' tokens must not cross a network in clear.
PLAINTEXT_LISTEN = "127.0.0.1:" + Config.listen.rpartition(":")[2]
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"  # the kubelet's mount in every pod


def own_namespace(
    default: str = Config.istio_namespace, *, environ: Mapping[str, str] | None = None,
    service_account_dir: str | os.PathLike[str] | None = SERVICE_ACCOUNT_DIR,
) -> str:
    """The namespace this process runs in: $POD_NAMESPACE, else the service account's namespace file (not read
    when `service_account_dir` is None), else `default`.

    `--istio-namespace` defaults to it without the file (from_args): istiod's namespace is the proxy's own
    only because the deployment says so, and the manifests and chart say so with POD_NAMESPACE. `rotate-token`
    reads the file too: it must write its Secrets where it runs, whoever deployed it.
    """
    environ = os.environ if environ is None else environ
    env = environ.get("POD_NAMESPACE", "").strip()
    if env:
        return env
    if service_account_dir is not None:
        with contextlib.suppress(OSError):
            ns = Path(service_account_dir, "namespace").read_text().strip()
            if ns:
                return ns
    return default


def istiod_san(namespace: str, revision: str | None = None) -> str:
    """The DNS SAN istiod's serving certificate carries, as istioctl expects it for a revision.

    As istioctl does: the revision's Service name when a revision is set.
    """
    if revision and revision != "default":
        return f"istiod-{revision}.{namespace}.svc"
    return f"istiod.{namespace}.svc"


def _flag_text(value: object) -> str:
    """A Config default as the flag (or its variable) would spell it: 10.0 → "10", ("a", "b") → "a,b"."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _config_default(name: str) -> object:
    """The Config field's default behind --NAME: the one place a flag's default is written."""
    return {f.name: f.default for f in dataclasses.fields(Config)}[name.replace("-", "_")]


def add_serve_flags(p: argparse.ArgumentParser, env: Mapping[str, str] | None = None) -> None:
    """Every flag, with its default taken from ISTIOCTL_PROXY_<FLAG> when set, else from `Config`."""
    env = os.environ if env is None else env

    def d(flag: str, default: object) -> object:
        return env.get(env_name(flag), default)

    def env_name(name: str) -> str:
        return ENV_PREFIX + name.upper().replace("-", "_")

    def flag(name: str, help: str, *, computed: bool = False) -> None:
        # computed: the default depends on other flags or the environment, so from_args works it out.
        default = None if computed else _flag_text(_config_default(name))
        p.add_argument(f"--{name}", default=d(name, default), help=f"{help} [env {env_name(name)}]")

    def switch(name: str, help: str, default: bool | None = None) -> None:
        # --NAME / --no-NAME: a switch the environment turned on can be turned off on the command line.
        raw = str(d(name, "")).strip().lower()
        if default is None:
            default = bool(_config_default(name))
        value: bool | str = _SWITCH_VALUES.get(raw, raw) if raw else default
        p.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=value,
                       help=f"{help} [env {env_name(name)}=true|false]")

    flag("listen", f"HOST:PORT to serve ADS on (default {Config.listen}; {PLAINTEXT_LISTEN} with --plaintext)",
         computed=True)
    switch("plaintext", "serve without TLS (for port-forward and local use)")
    flag("tls-cert", "serving certificate (PEM); re-read when the file changes")
    flag("tls-key", "serving key (PEM)")
    flag("client-ca", "CA that client certificates must chain to (identity mode callers)")
    flag("max-message-mib", "largest answer sent to a caller or accepted from istiod, in MiB")
    flag("max-request-kib", "largest request accepted from a caller, in KiB (istioctl's are tiny)")
    flag("first-message-timeout", "seconds a new stream may take to send its first request")
    flag("stream-idle-timeout", "seconds a stream may wait between answers and its next request")
    flag("max-stream-age", "seconds after which a stream is ended (UNAVAILABLE) when it next waits, and a "
         "connection is closed (GOAWAY; --send-timeout later at most): short, as istioctl's runs, because an "
         "answer cut unread stays charged to its caller until its connection closes")
    flag("max-streams", "ADS streams open at once, over all connections")
    flag("max-streams-per-connection", "ADS streams open at once on one client connection (gRPC "
         "clients in one process share one)")
    flag("send-budget-mib", "MiB of answers waiting for their callers to read them, over all streams")
    flag("send-timeout", "seconds a caller may take to read one answer before its stream is cut")
    flag("slow-reader-seconds", "an answer unread this long is cut when other streams need the send budget")
    flag("slow-reader-min-kib-per-second", "slowest link a reader may have: an answer is cut as unread only "
         "after --slow-reader-seconds plus its size at this rate, in KiB/s")
    flag("istiod", "static istiod replicas, HOST:PORT[@REVISION][=SAN][,...] (revision and SAN their "
         "certificate is verified against)")
    flag("istiod-dns", "DNS name(s) NAME:PORT[@REVISION][=SAN] whose A/AAAA records are the replicas "
         "(headless Service; one per revision)")
    flag("istiod-dns-interval", "seconds between DNS re-resolutions")
    switch("istiod-k8s", "discover istiod pods with the Kubernetes API (list + watch)")
    flag("istiod-selector", "label selector of istiod pods")
    flag("revision", "istio revision(s), comma-separated: istio.io/rev=<rev> selects its pods and "
         "istiod[-<rev>].<ns>.svc is the SAN its replicas must carry (several: a canary upgrade)")
    switch("all-revisions", "--istiod-k8s: follow the istiod pods of every revision (any istio.io/rev), each "
           "verified against its own revision's SAN")
    flag("ready-policy", "every-revision: ready while each revision (listed, or found) has a reachable "
         "replica; any-replica: while any replica is reachable")
    flag("istiod-column", "ISTIOD value of merged syncz answers: external (--external-id) or revision "
         "(<external-id>/<revisions that hold the listed proxies>)")
    flag("istiod-port", "port of the pods found by --istiod-k8s")
    switch("istiod-allow-loopback", "--istiod-k8s: also dial pods whose IP is loopback (single-host setups, tests)")
    switch("istiod-allow-host-network", "--istiod-k8s: also dial hostNetwork pods (their IP is the node's)")
    flag("kubeconfig", "kubeconfig(s) for --istiod-k8s, comma-separated (default: in-cluster, then ~/.kube/config)")
    flag("context", "kubeconfig context(s), comma-separated: one replica source per cluster")
    switch("istiod-plaintext", "talk to istiod without TLS (15010-style)")
    flag("istiod-ca", "istio root CA (PEM) that istiod's certificate must chain to")
    switch("istiod-ca-configmap", "trust the istio-ca-root-cert ConfigMap of --istio-namespace (watched)")
    flag("istiod-san", "name istiod's certificate must carry (default istiod[-<rev>].<istio ns>.svc)")
    switch("istiod-insecure-skip-verify", "do NOT verify istiod's certificate (testing only)")
    switch("insecure-forward-tokens", "forward mode: allow callers' tokens to go to non-loopback istiods over "
           "--istiod-plaintext or --istiod-insecure-skip-verify (refused otherwise)")
    flag("istio-namespace", f"istio system namespace (default $POD_NAMESPACE or {Config.istio_namespace})",
         computed=True)
    flag("trust-domain", "SPIFFE trust domain of callers' certificates")
    flag("debug-allowed-namespaces",
         "identity mode: namespaces besides the istio one that see every proxy in syncz and config_dump "
         "(istio.io/debug stays scoped, as in istiod)")
    switch("require-all", "fail the call if any replica fails (default: answer with the healthy ones)")
    flag("upstream-timeout", "cap, in seconds, on each upstream call")
    switch("upstream-identity", "identity mode: use the proxy's own credentials upstream, scope callers here")
    flag("upstream-cert", "identity mode: client certificate for istiod (SPIFFE id of the proxy)")
    flag("upstream-key", "identity mode: key of --upstream-cert")
    flag("upstream-token-file", "identity mode: bearer token file for istiod, re-read when it changes")
    switch("token-review", "identity mode: also accept Kubernetes service-account tokens (TokenReview)")
    flag("token-review-kubeconfig", "kubeconfig of the cluster that issues caller tokens")
    flag("token-review-audiences", "audiences a caller token must have, comma-separated")
    flag("token-review-cache-ttl", "seconds a TokenReview's acceptance is cached (a revoked token works "
         "this long); refusals are cached 30 s")
    flag("token-review-rate", "TokenReviews per second all callers together may cause (burst: 2 s worth)")
    flag("token-review-peer-rate", "TokenReviews per second one caller address may cause (burst: 2 s worth)")
    flag("token-review-concurrency", "TokenReviews in flight at once (one caller address: half of it)")
    flag("external-id", "the ISTIOD value of merged syncz answers")
    flag("cache-ttl", "seconds identical answers are cached per caller (0: coalescing only)")
    # Was a --no-coalesce store_true switch; its ISTIOCTL_PROXY_NO_COALESCE=true still turns sharing off.
    no_coalesce = str(env.get(env_name("no-coalesce"), "")).strip().lower()
    switch("coalesce", "share one fan-out between identical concurrent requests of one caller",
           default=not _SWITCH_VALUES.get(no_coalesce, not Config.coalesce))
    flag("admin-listen", "HOST:PORT of the admin HTTP port (metrics, health); '' disables")
    switch("admin-status-page", "serve the status page at / on the admin port (shows the whole mesh) to "
           "loopback peers only (kubectl port-forward)")
    switch("admin-status-page-remote", "also serve the status page to non-loopback peers (only behind a "
           "NetworkPolicy or an authenticating proxy)")
    flag("cert-listen", "with --token-review: HOST:PORT of a second ADS port that requires client "
         "certificates (the main port then serves token callers only)")
    flag("log-level", "debug, info, warning or error")
    flag("log-format", "text or json")
    flag("drain-seconds", "on SIGTERM, how long in-flight calls may take to finish")


# What a switch's ISTIOCTL_PROXY_* variable may say; anything else is a ConfigError naming the variable.
_SWITCH_VALUES = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
                  "off": False}


def _switch(ns: argparse.Namespace, name: str) -> bool:
    value = getattr(ns, name.replace("-", "_"))
    if not isinstance(value, bool):
        raise ConfigError(f"{ENV_PREFIX}{name.upper().replace('-', '_')}={value!r}: a switch takes true or false")
    return value


def _csv(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


def _number(name: str, value: str, kind: type[float] | type[int]) -> float:
    try:
        number = kind(value)
    except ValueError:
        raise ConfigError(f"--{name}: {value!r} is not a number") from None
    if number <= 0 and name not in ("cache-ttl", "token-review-cache-ttl"):
        raise ConfigError(f"--{name} must be positive")
    return number


def _readable(name: str, path: str) -> None:
    if path and not os.access(path, os.R_OK):
        raise ConfigError(f"--{name}: cannot read {path!r}")


def _is_loopback(listen: str) -> bool:
    host, _ = split_host_port(listen, allow_zero=True)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def from_args(ns: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Config:
    """The Config of parsed flags (`environ` for POD_NAMESPACE). Raises ConfigError naming the flag."""
    environ = os.environ if environ is None else environ
    plaintext = _switch(ns, "plaintext")
    listen = ns.listen or (PLAINTEXT_LISTEN if plaintext else Config.listen)
    for name, value in (("listen", listen), ("admin-listen", ns.admin_listen or "127.0.0.1:1"),
                        ("cert-listen", ns.cert_listen or "127.0.0.1:1")):
        try:
            split_host_port(value, allow_zero=True)  # port 0: any free port (tests, local use)
        except ValueError as err:
            raise ConfigError(f"--{name}: {err}") from None
    cfg = Config(
        listen=listen,
        plaintext=plaintext,
        tls_cert=ns.tls_cert,
        tls_key=ns.tls_key,
        client_ca=ns.client_ca,
        istiod=_csv(ns.istiod),
        istiod_dns=_csv(ns.istiod_dns),
        istiod_dns_interval=_number("istiod-dns-interval", ns.istiod_dns_interval, float),
        istiod_k8s=_switch(ns, "istiod-k8s"),
        istiod_selector=ns.istiod_selector,
        revision=ns.revision,
        istiod_port=int(_number("istiod-port", ns.istiod_port, int)),
        istiod_allow_loopback=_switch(ns, "istiod-allow-loopback"),
        istiod_allow_host_network=_switch(ns, "istiod-allow-host-network"),
        kubeconfig=ns.kubeconfig,
        context=ns.context,
        istiod_plaintext=_switch(ns, "istiod-plaintext"),
        istiod_ca=ns.istiod_ca,
        istiod_ca_configmap=_switch(ns, "istiod-ca-configmap"),
        istiod_san=ns.istiod_san,
        istiod_insecure_skip_verify=_switch(ns, "istiod-insecure-skip-verify"),
        insecure_forward_tokens=_switch(ns, "insecure-forward-tokens"),
        istio_namespace=ns.istio_namespace or own_namespace(environ=environ, service_account_dir=None),
        trust_domain=ns.trust_domain,
        debug_allowed_namespaces=_csv(ns.debug_allowed_namespaces),
        require_all=_switch(ns, "require-all"),
        upstream_timeout=_number("upstream-timeout", ns.upstream_timeout, float),
        upstream_identity=_switch(ns, "upstream-identity"),
        upstream_cert=ns.upstream_cert,
        upstream_key=ns.upstream_key,
        upstream_token_file=ns.upstream_token_file,
        token_review=_switch(ns, "token-review"),
        token_review_kubeconfig=ns.token_review_kubeconfig,
        token_review_audiences=_csv(ns.token_review_audiences) or Config.token_review_audiences,
        token_review_cache_ttl=_number("token-review-cache-ttl", ns.token_review_cache_ttl, float),
        token_review_rate=_number("token-review-rate", ns.token_review_rate, float),
        token_review_peer_rate=_number("token-review-peer-rate", ns.token_review_peer_rate, float),
        token_review_concurrency=int(_number("token-review-concurrency", ns.token_review_concurrency, int)),
        external_id=ns.external_id,
        max_message_mib=int(_number("max-message-mib", ns.max_message_mib, int)),
        max_request_kib=int(_number("max-request-kib", ns.max_request_kib, int)),
        first_message_timeout=_number("first-message-timeout", ns.first_message_timeout, float),
        stream_idle_timeout=_number("stream-idle-timeout", ns.stream_idle_timeout, float),
        max_stream_age=_number("max-stream-age", ns.max_stream_age, float),
        max_streams=int(_number("max-streams", ns.max_streams, int)),
        max_streams_per_connection=int(_number("max-streams-per-connection", ns.max_streams_per_connection, int)),
        send_budget_mib=int(_number("send-budget-mib", ns.send_budget_mib, int)),
        send_timeout=_number("send-timeout", ns.send_timeout, float),
        slow_reader_seconds=_number("slow-reader-seconds", ns.slow_reader_seconds, float),
        slow_reader_min_kib_per_second=int(_number("slow-reader-min-kib-per-second",
                                                   ns.slow_reader_min_kib_per_second, int)),
        admin_listen=ns.admin_listen,
        admin_status_page=_switch(ns, "admin-status-page"),
        admin_status_page_remote=_switch(ns, "admin-status-page-remote"),
        cert_listen=ns.cert_listen or "",
        cache_ttl=_number("cache-ttl", ns.cache_ttl, float),
        coalesce=_switch(ns, "coalesce"),
        log_level=ns.log_level.lower(),
        log_format=ns.log_format.lower(),
        drain_seconds=_number("drain-seconds", ns.drain_seconds, float),
        all_revisions=_switch(ns, "all-revisions"),
        ready_policy=str(ns.ready_policy).lower(),
        istiod_column=str(ns.istiod_column).lower(),
    )
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Check a Config's combinations and files; raises ConfigError with one line saying what to change."""
    if not (cfg.istiod or cfg.istiod_dns or cfg.istiod_k8s):
        raise ConfigError("no istiod replicas: give --istiod HOST:PORT, --istiod-dns NAME:PORT or --istiod-k8s")
    for value in cfg.istiod + cfg.istiod_dns:
        try:
            parse_entry(value)
        except ValueError as err:
            raise ConfigError(f"istiod address: {err}") from None
    _check_revisions(cfg)
    if cfg.plaintext and (cfg.tls_cert or cfg.tls_key):
        raise ConfigError("--plaintext and --tls-cert/--tls-key exclude each other")
    if not cfg.plaintext and not (cfg.tls_cert and cfg.tls_key):
        raise ConfigError("serving TLS needs --tls-cert and --tls-key (or --plaintext for local use)")
    if cfg.istiod_plaintext and (cfg.istiod_ca or cfg.istiod_insecure_skip_verify):
        raise ConfigError("--istiod-plaintext excludes --istiod-ca and --istiod-insecure-skip-verify")
    if not cfg.istiod_plaintext and not (cfg.istiod_ca or cfg.istiod_ca_configmap or cfg.istiod_insecure_skip_verify):
        raise ConfigError(
            "upstream TLS needs the istio root CA: --istiod-ca FILE (or --istiod-ca-configmap); "
            "--istiod-plaintext for a plaintext istiod"
        )
    if cfg.upstream_identity:
        if cfg.plaintext or not cfg.client_ca:
            raise ConfigError("--upstream-identity authenticates callers by certificate: it needs TLS and --client-ca")
        if bool(cfg.upstream_cert) != bool(cfg.upstream_key):
            raise ConfigError("--upstream-cert and --upstream-key go together")
        if not (cfg.upstream_cert or cfg.upstream_token_file):
            raise ConfigError("--upstream-identity needs --upstream-cert/--upstream-key or --upstream-token-file")
    elif cfg.upstream_cert or cfg.upstream_token_file or cfg.token_review:
        raise ConfigError("--upstream-cert/--upstream-token-file/--token-review need --upstream-identity")
    if cfg.admin_status_page and not cfg.admin_listen:
        raise ConfigError("--admin-status-page needs the admin port: set --admin-listen (e.g. 127.0.0.1:15090)")
    if cfg.admin_status_page and not cfg.upstream_identity:
        # Forward mode holds no credentials by design; a standing token just for the page would turn the
        # admin port into a mesh-wide read credential. See docs/operations.md.
        raise ConfigError(
            "--admin-status-page shows the proxy's own view of the mesh, which needs the proxy's own "
            "credentials: use it with --upstream-identity (forward mode has none)"
        )
    if cfg.admin_status_page_remote and not cfg.admin_status_page:
        raise ConfigError("--admin-status-page-remote widens --admin-status-page, which is off")
    if cfg.cert_listen and not cfg.token_review:
        raise ConfigError("--cert-listen is the certificate port beside a --token-review port; without "
                          "--token-review the --listen port already requires client certificates")
    if cfg.cert_listen and cfg.cert_listen == cfg.listen:
        raise ConfigError(f"--cert-listen and --listen are both {cfg.listen}: give the certificate port its own")
    if cfg.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"--log-level {cfg.log_level!r}: use debug, info, warning or error")
    if cfg.cache_ttl < 0:
        raise ConfigError("--cache-ttl must be 0 (off) or a positive number of seconds")
    if cfg.token_review_cache_ttl < 0:
        raise ConfigError("--token-review-cache-ttl must be 0 (off) or a positive number of seconds")
    if cfg.log_format not in ("text", "json"):
        raise ConfigError(f"--log-format {cfg.log_format!r}: use text or json")
    _check_forwarded_tokens(cfg)
    for name, path in (
        ("tls-cert", cfg.tls_cert), ("tls-key", cfg.tls_key), ("client-ca", cfg.client_ca),
        ("istiod-ca", cfg.istiod_ca), ("upstream-cert", cfg.upstream_cert), ("upstream-key", cfg.upstream_key),
        ("upstream-token-file", cfg.upstream_token_file), *(("kubeconfig", k) for k in cfg.kubeconfig.split(",") if k),
        ("token-review-kubeconfig", cfg.token_review_kubeconfig),
    ):
        _readable(name, path)


def _check_revisions(cfg: Config) -> None:
    for rev in cfg.revisions:
        try:
            parse_entry(f"x:1@{rev}")
        except ValueError:
            raise ConfigError(f"--revision {rev!r} is not a valid istio.io/rev value (a DNS label)") from None
    if cfg.all_revisions and cfg.revisions:
        raise ConfigError("--all-revisions follows every revision; --revision lists some: give one of them")
    if cfg.ready_policy not in ("every-revision", "any-replica"):
        raise ConfigError(f"--ready-policy {cfg.ready_policy!r}: use every-revision or any-replica")
    if cfg.istiod_column not in ("external", "revision"):
        raise ConfigError(f"--istiod-column {cfg.istiod_column!r}: use external or revision")
    if not cfg.multi_revision:
        return
    if cfg.istiod_san:
        # One name for replicas of several revisions would verify each against a name that is not its own.
        raise ConfigError("--istiod-san names one certificate name; with several revisions each replica is "
                          "verified against its own revision's (istiod[-<rev>].<ns>.svc), or give it per entry "
                          "as HOST:PORT=SAN")
    for flag, values in (("--istiod", cfg.istiod), ("--istiod-dns", cfg.istiod_dns)):
        for value in values:
            entry = parse_entry(value)
            if not (entry.revision or entry.san):
                raise ConfigError(f"{flag} {value!r}: with several revisions each entry says its revision "
                                  f"({entry.target}@<rev>) or its SAN ({entry.target}=<name>)")


def tokens_unprotected(cfg: Config) -> str:
    """Forward mode only: why callers' tokens reach istiod without verified TLS ("" when they do not)."""
    if cfg.upstream_identity:
        return ""
    if cfg.istiod_plaintext:
        return "--istiod-plaintext"
    if cfg.istiod_insecure_skip_verify:
        return "--istiod-insecure-skip-verify"
    return ""


def replicas_all_loopback(cfg: Config) -> bool:
    """Every replica address is a loopback address: only static --istiod ones can be known to be."""
    return bool(cfg.istiod) and not (cfg.istiod_dns or cfg.istiod_k8s) and all(
        _is_loopback(parse_entry(value).target) for value in cfg.istiod)


def _check_forwarded_tokens(cfg: Config) -> None:
    # A forwarded token is a credential istiod (and anyone else who gets it) accepts: sending it where it
    # can be read or to an unverified peer hands it over. Loopback never leaves the host.
    why = tokens_unprotected(cfg)
    if why and not cfg.insecure_forward_tokens and not replicas_all_loopback(cfg):
        raise ConfigError(
            f"forward mode with {why} would send callers' tokens to istiod unprotected: use --istiod-ca or "
            "--istiod-ca-configmap, --upstream-identity, or pass --insecure-forward-tokens to accept it"
        )


def plaintext_exposed(cfg: Config) -> bool:
    """Is the plaintext ADS listener reachable beyond this host?"""
    return cfg.plaintext and not _is_loopback(cfg.listen)


__all__: Sequence[str] = ["ENV_PREFIX", "PLAINTEXT_LISTEN", "SERVICE_ACCOUNT_DIR", "Config", "add_serve_flags",
                          "from_args", "istiod_san", "own_namespace", "plaintext_exposed", "replicas_all_loopback",
                          "tokens_unprotected", "validate"]
