"""Which API server, as whom: kubeconfig / in-cluster resolution, and kubectl's label selector syntax (parsed
here so that a typo fails at start-up). The istio namespace and istiod's SAN defaults (`own_namespace`,
`istiod_san`) are config.py's, re-exported here."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
from lightkube import AsyncClient, operators
from lightkube.config.kubeconfig import KubeConfig, SingleConfig
from lightkube.core.exceptions import ConfigError

from .. import errors
from ..config import SERVICE_ACCOUNT_DIR, Config, istiod_san, own_namespace

__all__ = [
    "DEFAULT_SELECTOR",
    "SERVICE_ACCOUNT_DIR",
    "FieldSelector",
    "KubeTarget",
    "LabelSelector",
    "istiod_san",
    "load_kube_target",
    "own_namespace",
    "parse_label_selector",
    "revision_selector",
    "target_from_flags",
]

DEFAULT_SELECTOR = Config.istiod_selector
REVISION_LABEL = "istio.io/rev"
IN_CLUSTER = "in-cluster"


# ---------------------------------------------------------------------------------------------------------
# Configuration: which API server, as whom.


@dataclass(frozen=True)
class KubeTarget:
    """A resolved client configuration plus a short name for labels ("in-cluster" or the context name)."""

    config: SingleConfig
    label: str

    def client(self, *, timeout: float = 10.0) -> AsyncClient:
        """A new API client for this target (requests time out after `timeout` s)."""
        # trust_env=False: HTTP(S)_PROXY variables meant for other traffic must not divert API calls, and
        # lightkube must not silently fall back to ~/.kube/config (the config is already resolved here).
        return AsyncClient(self.config, timeout=httpx2.Timeout(timeout), trust_env=False)


def _in_cluster_available(service_account_dir: str | os.PathLike[str]) -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and Path(service_account_dir, "token").is_file()


def load_kube_target(
    kubeconfig: str | os.PathLike[str] | None = None,
    context: str | None = None,
    *,
    service_account_dir: str | os.PathLike[str] = SERVICE_ACCOUNT_DIR,
) -> KubeTarget:
    """Resolve `--kubeconfig`/`--context`, else in-cluster config, else $KUBECONFIG or ~/.kube/config.

    An explicit kubeconfig or context always wins over in-cluster config, so a proxy running in one
    cluster can discover istiod in another (the external control plane's own cluster is the usual case,
    where in-cluster config applies). Raises lightkube's ConfigError with a readable message.

    Token rotation: in-cluster config (and kubeconfig users with `tokenFile:`) authenticate with
    lightkube's BearerTokenFileAuth, which re-reads the token file whenever the API server answers 401.
    The kubelet rewrites the projected token well before it expires, so an expired or revoked token is
    replaced by the current file content on the next request instead of failing until a restart.
    """
    if kubeconfig is None and context is None and _in_cluster_available(service_account_dir):
        config = KubeConfig.from_service_account(service_account=service_account_dir).get()
        assert config is not None  # from_one always sets the current context
        return KubeTarget(config, IN_CLUSTER)
    path = kubeconfig if kubeconfig is not None else os.environ.get("KUBECONFIG", "~/.kube/config")
    # $KUBECONFIG may list several files; like kubectl we take the first one that exists.
    candidates = [p for p in str(path).split(os.pathsep) if p] or ["~/.kube/config"]
    existing = [p for p in candidates if Path(p).expanduser().is_file()]
    if not existing:
        raise ConfigError(f"kubeconfig {path} not found and not running in a cluster")
    config = KubeConfig.from_file(existing[0]).get(context)
    assert config is not None  # get() raises for an unknown or missing context
    return KubeTarget(config, config.context_name)


def target_from_flags(kubeconfig: str, context: str, *, flag: str = "--kubeconfig") -> KubeTarget:
    """`load_kube_target` for a flag: every way a kubeconfig can be unusable is one ConfigError line.

    lightkube reports a broken file as KeyError/AttributeError/YAML errors, an unknown context as its own
    ConfigError, and a certificate file that the kubeconfig names but that does not exist only when a client
    is built (which would then fail on every list, forever, in the background). All of them are found here,
    before serving, by building a client once.
    """
    where = f"{flag} {kubeconfig}" if kubeconfig else f"{flag} (default: in-cluster, $KUBECONFIG or ~/.kube/config)"
    if context:
        where += f" --context {context}"
    try:
        target = load_kube_target(kubeconfig or None, context or None)
        _check_files(target.config)
        target.client()  # builds TLS contexts and auth from the config; opens no connection
    except Exception as err:
        detail = str(err) if isinstance(err, ConfigError | OSError | ValueError) else f"{type(err).__name__}: {err}"
        # PyYAML's messages span lines (with a caret under the column): one line, as every config error.
        raise errors.ConfigError(f"{where}: not a usable kubeconfig: {' '.join(detail.split())}") from None
    return target


def _check_files(config: SingleConfig) -> None:
    """Files a kubeconfig names must exist (the ssl module's error would not say which one is missing)."""
    cluster, user = config.cluster, config.user
    named = (
        ("certificate-authority", cluster.certificate_auth if cluster else None),
        ("client-certificate", user.client_cert if user else None),
        ("client-key", user.client_key if user else None),
        ("tokenFile", user.token_file if user else None),
    )
    for key, name in named:
        if name and not Path(config.abs_file(name)).is_file():
            raise ConfigError(f"its {key} {config.abs_file(name)} does not exist")


# ---------------------------------------------------------------------------------------------------------
# Label selectors


_SELECTOR_TERM = re.compile(
    r"""^\s*(?:
        (?P<notexists>!\s*(?P<nk>[^\s!=,()]+))
      | (?P<sk>[^\s!=,()]+)\s+(?P<setop>in|notin)\s*\((?P<values>[^()]*)\)
      | (?P<ek>[^\s!=,()]+)\s*(?P<op>==|=|!=)\s*(?P<value>[^\s!=,()]*)
      | (?P<exists>[^\s!=,()]+)
    )\s*$""",
    re.VERBOSE,
)

LabelSelector = dict[str, "str | operators.Operator[Any] | Iterable[Any] | None"]
FieldSelector = dict[str, "str | operators.BinaryOperator | operators.SequenceOperator"]


_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _check_label(key: str, values: Iterable[str], selector: str) -> None:
    """The API server's syntax for label keys and values: a typo fails at start-up, not on every relist."""
    prefix, _, name = key.rpartition("/")
    if not _LABEL_NAME.match(name) or (prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix))):
        raise ValueError(f"invalid label key {key!r} in {selector!r}")
    for value in values:
        if value and not _LABEL_NAME.match(value):
            raise ValueError(f"invalid label value {value!r} for {key!r} in {selector!r}")


def _split_selector(selector: str) -> list[str]:
    """Split on commas that are not inside `in (a,b)` value lists."""
    terms: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    terms.append("".join(cur))
    return [t for t in (t.strip() for t in terms) if t]


def parse_label_selector(selector: str) -> LabelSelector:
    """Parse kubectl's label selector syntax (`a=b,c!=d,e,!f,g in (h,i),j notin (k)`) for lightkube.

    Parsing locally (rather than passing the string through) rejects a typo in `--istiod-selector` at
    start-up with a clear message instead of as a 400 from the API server on every relist.
    """
    out: LabelSelector = {}
    for term in _split_selector(selector):
        m = _SELECTOR_TERM.match(term)
        if m is None:
            raise ValueError(f"invalid label selector term {term!r} in {selector!r}")
        key: str
        value: str | operators.Operator[Any] | None
        values: list[str] = []
        if m["notexists"]:
            key, value = m["nk"], operators.not_exists()
        elif m["sk"]:
            values = [v.strip() for v in m["values"].split(",") if v.strip()]
            key, value = m["sk"], operators.in_(values) if m["setop"] == "in" else operators.not_in(values)
        elif m["ek"]:
            values = [m["value"]]
            key, value = m["ek"], operators.not_equal(m["value"]) if m["op"] == "!=" else m["value"]
        else:
            key, value = m["exists"], None
        _check_label(key, values, selector)
        if key in out:
            # lightkube takes a mapping; two terms on one key (a!=x,a!=y) would silently lose one.
            raise ValueError(
                f"label selector {selector!r} has two terms for {key!r}; use `{key} notin (...)`"
            )
        out[key] = value
    if not out:
        raise ValueError("empty label selector")
    return out


def revision_selector(selector: str = DEFAULT_SELECTOR, revision: str | None = None) -> str:
    """`--istiod-selector` plus `istio.io/rev=<rev>` when `--revision` is given."""
    if not revision:
        return selector
    return f"{selector},{REVISION_LABEL}={revision}" if selector.strip() else f"{REVISION_LABEL}={revision}"
