"""`istioctl-proxy check`: walk the chain serve depends on and say, step by step, what works and what to fix.

configuration → serving certificate → upstream credentials → istio CA → discovery → per replica:
TCP → TLS (CA) → TLS (SAN) → authentication → one syncz. Each step prints one line, ✓ or ✗ (· for a
step that does not apply), and a failing step says what to try. The exit code is 0 when nothing failed.

It builds the same objects `serve` would (Proxy(cfg): upstream pool, identity node) so a ✓ here means
the real code path works, not a look-alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import itertools
import os
import ssl
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TextIO

import grpc
from cryptography import x509
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from . import client, wire
from .app import Proxy, root_cert_watcher_from_config, sources_of, upstream_identity_node
from .auth import jwt_expiry
from .config import Config, from_args, replicas_all_loopback, tokens_unprotected
from .discovery import DnsSource, Replica, ReplicaSource, parse_entry, split_host_port
from .errors import CaRejected, ConfigError
from .policy import SYNCZ
from .statuspage import identity_of
from .upstream import UpstreamError, UpstreamPool

OK, FAIL, INFO = "✓", "✗", "·"
_SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


@dataclass(frozen=True)
class Step:
    """One line of the report: what was checked, OK/FAIL/INFO, what was seen, and the fix to try."""

    name: str
    mark: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        """The step as printed."""
        return f"{self.mark} {self.name}: {self.detail}" + (f"  → try: {self.fix}" if self.fix else "")


class Report:
    """Prints steps as they finish; a spinner on stderr while slow steps run (only on a terminal)."""

    def __init__(self, out: TextIO, err: TextIO) -> None:
        self.out = out
        self.err = err
        self.steps: list[Step] = []

    def add(self, *steps: Step) -> None:
        """Record and print steps as they finish."""
        for step in steps:
            self.steps.append(step)
            print(step.line(), file=self.out, flush=True)

    @property
    def failed(self) -> int:
        """Steps that failed."""
        return sum(s.mark == FAIL for s in self.steps)

    @contextlib.asynccontextmanager
    async def waiting(self, what: str) -> AsyncIterator[None]:
        """A spinner on a terminal while a slow step runs."""
        if not self.err.isatty():
            yield
            return
        task = asyncio.create_task(self._spin(what))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.err.write("\r\033[K")
            self.err.flush()

    async def _spin(self, what: str) -> None:
        await asyncio.sleep(0.2)  # fast steps finish without a flicker
        for frame in itertools.cycle(_SPINNER):
            self.err.write(f"\r{frame} {what}…")
            self.err.flush()
            await asyncio.sleep(0.1)


# -- certificates -------------------------------------------------------------------------------------------
def _expiry(cert: x509.Certificate) -> str:
    left = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    if left.total_seconds() <= 0:
        return "EXPIRED"
    hours = left.total_seconds() / 3600
    return f"valid {hours:.0f}h more" if hours < 48 else f"valid {hours / 24:.0f} days more"


def _names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *(str(i) for i in san.get_values_for_type(x509.IPAddress)),
            *san.get_values_for_type(x509.UniformResourceIdentifier)]


def san_matches(wanted: str, names: Sequence[str]) -> bool:
    """gRPC's check: an exact (case-insensitive) name, or a left-most-label wildcard."""
    wanted = wanted.lower().rstrip(".")
    for name in (n.lower().rstrip(".") for n in names):
        if name == wanted or (name.startswith("*.") and wanted.partition(".")[2] == name[2:] and "." in wanted):
            return True
    return False


def _pair_step(name: str, cert_file: str, key_file: str, fix: str) -> tuple[Step, x509.Certificate | None]:
    try:
        ssl.create_default_context().load_cert_chain(cert_file, key_file)
        with open(cert_file, "rb") as f:
            cert = x509.load_pem_x509_certificates(f.read())[0]
    except (OSError, ssl.SSLError, ValueError) as err:
        return Step(name, FAIL, f"cannot use {cert_file} with {key_file}: {err}", fix), None
    if _expiry(cert) == "EXPIRED":
        return Step(name, FAIL, f"{cert_file} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC", fix), cert
    shown = ", ".join(_names(cert)) or cert.subject.rfc4514_string()
    return Step(name, OK, f"{shown} ({_expiry(cert)})"), cert


def serving_step(cfg: Config) -> Step:
    """The serving side: plaintext, or whether the certificate and key load and match."""
    if cfg.plaintext:
        return Step("serving", INFO, f"plaintext on {cfg.listen} (--plaintext: for port-forward and local use)")
    step, _ = _pair_step("serving certificate", cfg.tls_cert, cfg.tls_key,
                         "--tls-cert and --tls-key must be a matching, current PEM pair (cert-manager renews them)")
    return step


def _token_step(name: str, path: str, fix: str) -> tuple[Step, str]:
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as err:
        return Step(name, FAIL, f"cannot read {path}: {err}", fix), ""
    if not token:
        return Step(name, FAIL, f"{path} is empty", fix), ""
    exp = jwt_expiry(token)
    if exp is not None and exp < time.time():
        return Step(name, FAIL, f"the token in {path} expired {time.time() - exp:.0f}s ago", fix), token
    left = f", expires in {(exp - time.time()) / 60:.0f} min" if exp is not None else ""
    return Step(name, OK, f"bearer token from {path} ({len(token)} bytes{left})"), token


def credentials_step(cfg: Config, token_file: str) -> tuple[Step, str]:
    """The credentials the syncz steps will use; returns the forward-mode check token, if any."""
    if cfg.upstream_identity and cfg.upstream_cert:
        step, _ = _pair_step("upstream credentials", cfg.upstream_cert, cfg.upstream_key,
                             "--upstream-cert/--upstream-key: a current pair issued by the istio CA")
        return step, ""
    if cfg.upstream_identity:
        step, _ = _token_step("upstream credentials", cfg.upstream_token_file,
                              "mount a projected service-account token with audience istio-ca")
        return step, ""
    if token_file:
        return _token_step("check token", token_file, "--token-file: a caller's token (kubectl create token "
                           f"default -n {cfg.istio_namespace} --audience istio-ca)")
    return Step("credentials", INFO, "forward mode: the proxy has none of its own, istiod checks each caller's "
                "token; give --token-file with a caller's token to check authentication too"), ""


def forwarded_tokens_step(cfg: Config) -> Step | None:
    """Forward mode: how callers' tokens travel to istiod. An unprotected path to a non-loopback replica
    never gets here without --insecure-forward-tokens (the configuration step fails first)."""
    if cfg.upstream_identity:
        return None
    why = tokens_unprotected(cfg)
    if not why:
        return Step("forwarded tokens", OK, "callers' tokens go to istiod over TLS verified against the istio CA")
    if replicas_all_loopback(cfg):
        return Step("forwarded tokens", INFO, f"sent without verified TLS ({why}), to loopback replicas only")
    return Step("forwarded tokens", INFO, f"INSECURE: sent to istiod without verified TLS ({why}), accepted by "
                "--insecure-forward-tokens", "--istiod-ca or --istiod-ca-configmap, or --upstream-identity")


async def trust_step(cfg: Config, timeout: float) -> tuple[Step, bytes | None]:
    """The istio root CA that istiod's certificate must chain to."""
    if cfg.istiod_plaintext:
        return Step("istio CA", INFO, "not needed: --istiod-plaintext"), None
    if cfg.istiod_insecure_skip_verify:
        return Step("istio CA", INFO, "NOT verifying istiod (--istiod-insecure-skip-verify): testing only",
                    "--istiod-ca root-cert.pem or --istiod-ca-configmap"), None
    if cfg.istiod_ca_configmap and not cfg.istiod_ca:
        return await _configmap_ca(cfg, timeout)
    try:
        pem = _read_bytes(cfg.istiod_ca)
        certs = x509.load_pem_x509_certificates(pem)
    except (OSError, ValueError) as err:
        return Step("istio CA", FAIL, f"cannot read a PEM certificate from {cfg.istiod_ca}: {err}", _CA_FIX), None
    first = certs[0]
    return Step("istio CA", OK, f"{cfg.istiod_ca}: {len(certs)} certificate(s), {first.subject.rfc4514_string()} "
                f"({_expiry(first)})"), pem


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:  # a small local file: not worth a thread
        return f.read()


_CA_FIX = ("the mesh root: kubectl -n istio-system get configmap istio-ca-root-cert "
           "-o jsonpath='{.data.root-cert\\.pem}' > root-cert.pem, then --istiod-ca root-cert.pem")


async def _configmap_ca(cfg: Config, timeout: float) -> tuple[Step, bytes | None]:
    where = f"ConfigMap istio-ca-root-cert in {cfg.istio_namespace}"
    try:
        pem = await asyncio.wait_for(root_cert_watcher_from_config(cfg).first(), timeout)
    except TimeoutError:
        return Step("istio CA", FAIL, f"no {where} after {timeout:.0f}s",
                    "is istiod running (it writes the ConfigMap), and may this identity get/list/watch it?"), None
    except CaRejected as err:  # a running proxy keeps its last good root; a new one would not start
        return Step("istio CA", FAIL, str(err), "the ConfigMap's root-cert.pem must be the PEM bundle istiod "
                    "writes: find who changed it (kubectl get configmap istio-ca-root-cert -o yaml shows "
                    "managedFields) and restore it, or give --istiod-ca"), None
    except Exception as err:  # kubeconfig, RBAC, API server: all reported the same way
        return Step("istio CA", FAIL, f"cannot read {where}: {err}", "check --kubeconfig/--context and RBAC "
                    "(configmaps get/list/watch), or give --istiod-ca"), None
    return Step("istio CA", OK, f"from {where}"), pem


# -- discovery ------------------------------------------------------------------------------------------------
async def _first_report(source: ReplicaSource, timeout: float) -> list[Replica]:
    """Run a source until it reports its first set of replicas."""
    if isinstance(source, DnsSource):
        host, port = split_host_port(parse_entry(source.target).target)
        # Resolved here rather than through run(): run() only logs a failure, and the error is the point.
        found = await asyncio.wait_for(source.resolver(host, port), timeout)
        return [source.replica(ip, port) for ip in found]
    got: asyncio.Future[list[Replica]] = asyncio.get_running_loop().create_future()

    def once(replicas: Sequence[Replica]) -> None:
        if not got.done():
            got.set_result(list(replicas))

    task = asyncio.create_task(source.run(once))
    waiting: set[asyncio.Future[object]] = {got, task}  # type: ignore[arg-type]
    try:
        done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if got in done:
            return got.result()
        if task in done:
            task.result()  # raises what the source raised
        raise TimeoutError
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


_DISCOVERY_FIX = {
    "static": "--istiod HOST:PORT[,HOST:PORT]",
    "dns": "the headless Service name and port (NAME.NAMESPACE.svc:15012) must resolve here and have ready endpoints",
    "k8s": "are istiod pods Ready in --istio-namespace with --istiod-selector/--revision, and may this identity "
           "list/watch pods there (RBAC)?",
}


async def discovery_steps(cfg: Config, timeout: float) -> tuple[list[Step], list[Replica]]:
    """What each replica source finds within `timeout` s; returns the steps and the replicas found."""
    steps: list[Step] = []
    seen: dict[str, Replica] = {}
    try:
        sources = sources_of(cfg)
    except Exception as err:  # e.g. no kubeconfig for --istiod-k8s
        return [Step("discovery", FAIL, str(err), _DISCOVERY_FIX["k8s"])], []
    for source in sources:
        fix = _DISCOVERY_FIX.get(source.name.partition(":")[0], "")
        try:
            found = await _first_report(source, timeout)
        except TimeoutError:
            steps.append(Step(f"discovery {source.name}", FAIL, f"no answer in {timeout:.0f}s", fix))
            continue
        except Exception as err:
            steps.append(Step(f"discovery {source.name}", FAIL, f"{type(err).__name__}: {err}", fix))
            continue
        if not found:
            skipped = getattr(source, "skipped", 0)  # Kubernetes: ready pods at addresses it must not dial
            why = (f"found no replicas ({skipped} ready pod(s) skipped for their address: loopback, link-local "
                   "or hostNetwork; see --istiod-allow-loopback/--istiod-allow-host-network)") if skipped else (
                   "found no replicas")  # fmt: skip
            steps.append(Step(f"discovery {source.name}", FAIL, why, fix))
            continue
        steps.append(Step(f"discovery {source.name}", OK, ", ".join(r.label if r.label == r.address else
                                                                       f"{r.name}={r.address}" for r in found)))
        for r in found:
            seen.setdefault(r.address, r)
    return steps, sorted(seen.values())


def revisions_step(cfg: Config, replicas: Sequence[Replica]) -> Step:
    """Several revisions: how many replicas each has; a listed revision without any fails (readiness would)."""
    counts = {rev: 0 for rev in cfg.revisions}
    for r in replicas:
        counts[r.revision] = counts.get(r.revision, 0) + 1
    shown = ", ".join(f"{rev or '(none)'}: {n} replica{'s' if n != 1 else ''}" for rev, n in sorted(counts.items()))
    empty = [rev for rev, n in counts.items() if not n]
    if empty and cfg.ready_policy == "every-revision":
        return Step("revisions", FAIL, f"{shown}; no replica of {', '.join(empty)}",
                    "a finished upgrade: drop the old revision from --revision (or --ready-policy any-replica)")
    return Step("revisions", OK, shown)


# -- one replica ------------------------------------------------------------------------------------------------
@dataclass
class Checker:
    """Per-replica steps with what they share: config, trust, the serve-equivalent pool and request."""

    cfg: Config
    ca_pem: bytes | None
    pool: UpstreamPool
    node: base_pb2.Node
    token: str
    timeout: float

    async def replica(self, r: Replica) -> list[Step]:
        """TCP, TLS and syncz of one replica, stopping at the first failure."""
        steps: list[Step] = []
        for run in (self.tcp, self.tls, self.syncz):
            more = await run(r)
            steps.extend(more)
            if any(s.mark == FAIL for s in more):
                break  # later steps would only repeat the same failure
        return steps

    async def tcp(self, r: Replica) -> list[Step]:
        """Can a TCP connection be opened?"""
        host, port = split_host_port(r.address)
        started = time.monotonic()
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), self.timeout)
        except TimeoutError:
            return [Step(f"tcp {r.label}", FAIL, f"no answer in {self.timeout:.0f}s",
                         "a firewall or NetworkPolicy drops traffic from here to istiod")]
        except OSError as err:
            # asyncio words it "Connect call failed (...)"; the errno says what happened.
            why = os.strerror(err.errno) if err.errno else str(err)
            return [Step(f"tcp {r.label}", FAIL, why,
                         f"is istiod running and listening on {r.address}? (15012: TLS, 15010: plaintext)")]
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return [Step(f"tcp {r.label}", OK, f"connected in {(time.monotonic() - started) * 1e3:.1f} ms")]

    def _context(self, verify: bool) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False  # the SAN is checked as its own step, against --istiod-san
        ctx.verify_mode = ssl.CERT_REQUIRED if verify else ssl.CERT_NONE
        if verify and self.ca_pem:
            ctx.load_verify_locations(cadata=self.ca_pem.decode())
        ctx.set_alpn_protocols(["h2"])
        if self.cfg.upstream_identity and self.cfg.upstream_cert:
            ctx.load_cert_chain(self.cfg.upstream_cert, self.cfg.upstream_key)
        return ctx

    async def _handshake(self, r: Replica, verify: bool) -> tuple[x509.Certificate, str]:
        host, port = split_host_port(r.address)
        _, writer = await asyncio.open_connection(host, port, ssl=self._context(verify),
                                                  server_hostname=self.pool.san_of(r.san),
                                                  ssl_handshake_timeout=self.timeout)
        try:
            tls: ssl.SSLObject = writer.get_extra_info("ssl_object")
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return x509.load_der_x509_certificate(der), f"{tls.version()}, ALPN {tls.selected_alpn_protocol()}"
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()

    async def tls(self, r: Replica) -> list[Step]:
        """Does the TLS handshake verify against the istio CA, and does istiod's certificate carry the SAN?"""
        if self.cfg.istiod_plaintext:
            return [Step(f"tls {r.label}", INFO, "plaintext (--istiod-plaintext)")]
        verify = not self.cfg.istiod_insecure_skip_verify
        try:
            cert, how = await self._handshake(r, verify)
        except ssl.SSLCertVerificationError as err:
            return [Step(f"tls ca {r.label}", FAIL, f"istiod's certificate does not chain to the istio CA "
                         f"({err.verify_message}){await self._issuer(r)}", _CA_FIX)]
        except (ssl.SSLError, OSError, TimeoutError) as err:
            return [Step(f"tls {r.label}", FAIL, f"handshake failed: {err or type(err).__name__}",
                         "is this istiod's TLS port (15012)? For 15010 use --istiod-plaintext")]
        if not verify:
            return [Step(f"tls {r.label}", INFO, f"{how}; certificate NOT verified (--istiod-insecure-skip-verify)")]
        steps = [Step(f"tls ca {r.label}", OK, f"chain verified ({how})")]
        names = _names(cert)
        san = self.pool.san_of(r.san)  # the replica's own revision's name when several are followed
        if san_matches(san, names):
            steps.append(Step(f"tls san {r.label}", OK, f"certificate names {san}"))
        elif r.san:
            steps.append(Step(f"tls san {r.label}", FAIL, f"certificate names {', '.join(names) or 'nothing'}, "
                              f"not {san} (revision {r.revision or '?'}): not this revision's istiod",
                              "is the pod's istio.io/rev label (or the entry's @REVISION / =SAN) its own?"))
        else:
            steps.append(Step(f"tls san {r.label}", FAIL, f"certificate names {', '.join(names) or 'nothing'}, "
                              f"not {san}", f"--istiod-san {names[0] if names else '<name>'} (or --revision "
                              "for istiod-<rev>.<namespace>.svc)"))
        return steps

    async def _issuer(self, r: Replica) -> str:
        """Who signed what istiod presents, to tell 'wrong CA file' from 'not istiod at all'."""
        with contextlib.suppress(ssl.SSLError, OSError, TimeoutError):
            cert, _ = await self._handshake(r, verify=False)
            return f"; it is issued by {cert.issuer.rfc4514_string()}"
        return ""

    async def syncz(self, r: Replica) -> list[Step]:
        """Does istiod accept the credentials and answer syncz?"""
        request = discovery_pb2.DiscoveryRequest(type_url=SYNCZ, node=self.node).SerializeToString()
        metadata = (("authorization", "Bearer " + self.token),) if self.token else ()
        started = time.monotonic()
        try:
            body = await asyncio.wait_for(self.pool.ask(r, request, metadata, self.cfg.upstream_timeout),
                                          self.cfg.upstream_timeout + 0.5)
        except UpstreamError as err:
            return self._refused(r, err)
        except TimeoutError:
            return [Step(f"syncz {r.label}", FAIL, f"no answer in {self.cfg.upstream_timeout:.0f}s",
                         "istiod is slow or overloaded: raise --upstream-timeout")]
        ms = (time.monotonic() - started) * 1e3
        try:
            view = wire.view_response(body)
        except wire.WireError as err:
            return [Step(f"syncz {r.label}", FAIL, f"the answer is not a DiscoveryResponse: {err}",
                         "is this really istiod's xDS port?")]
        istiod, version = identity_of(view.identifier())
        return [Step(f"auth {r.label}", OK, "accepted"),
                Step(f"syncz {r.label}", OK, f"{istiod or r.label} {version or '(version unknown)'}: "
                     f"{len(view.resources)} proxies in {ms:.0f} ms")]

    def _refused(self, r: Replica, err: UpstreamError) -> list[Step]:
        code, message = err.code, err.message
        if code == grpc.StatusCode.UNAUTHENTICATED and not (self.token or self.cfg.upstream_identity):
            return [Step(f"auth {r.label}", INFO, "istiod answers over gRPC and wants credentials: forward mode "
                         "passes each caller's own (check one with --token-file)")]
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return [Step(f"auth {r.label}", FAIL, f"istiod refused {self._what()}: {message}", self._auth_fix())]
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return [Step(f"auth {r.label}", FAIL, f"authenticated, but not allowed: {message}",
                         f"istiod compares the identity's namespace with the node's NAMESPACE "
                         f"({self.cfg.istio_namespace}): use an identity of --istio-namespace")]
        return [Step(f"syncz {r.label}", FAIL, f"{code.name}: {message}",
                     "TCP and TLS passed, so look between gRPC and istiod: HTTP/2 through a middlebox, a client "
                     "certificate istiod requires, or istiod's log")]

    def _what(self) -> str:
        if self.cfg.upstream_identity and self.cfg.upstream_cert:
            return "the proxy's client certificate"
        return "the token"

    def _auth_fix(self) -> str:
        if self.cfg.upstream_identity and self.cfg.upstream_cert:
            return "--upstream-cert must be issued by the mesh CA with spiffe://<td>/ns/<ns>/sa/<sa>"
        return (f"a current service-account token istiod accepts: audience istio-ca, namespace "
                f"{self.cfg.istio_namespace} (kubectl create token <sa> -n {self.cfg.istio_namespace} "
                "--audience istio-ca)")


# -- the walk -------------------------------------------------------------------------------------------------
def config_step(ns: argparse.Namespace) -> tuple[Step, Config | None, Proxy | None]:
    """Parse the flags and build the proxy as serve would; returns the step and, when it passed, both."""
    try:
        cfg = from_args(ns)
        proxy = Proxy(cfg)  # what serve builds: identity node, upstream pool, discovery, admin settings
    except ConfigError as err:
        return Step("configuration", FAIL, str(err), "change the flag (or ISTIOCTL_PROXY_* variable) named"), None, None
    except Exception as err:  # e.g. --istiod-k8s without a usable kubeconfig
        return Step("configuration", FAIL, f"{type(err).__name__}: {err}", _DISCOVERY_FIX["k8s"]), None, None
    mode = "identity" if cfg.upstream_identity else "forward"
    upstream = "plaintext" if cfg.istiod_plaintext else f"TLS, SAN {cfg.san}"
    return Step("configuration", OK, f"{mode} mode, istiod over {upstream}"), cfg, proxy


async def run_check(ns: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """The `check` command: print each step as it finishes; returns 1 if any step failed, else 0."""
    report = Report(out, err)
    step, cfg, proxy = config_step(ns)
    report.add(step)
    if cfg is None or proxy is None:
        return 1
    timeout = float(ns.timeout)
    if (tokens := forwarded_tokens_step(cfg)) is not None:
        report.add(tokens)
    report.add(serving_step(cfg))
    cred, token = credentials_step(cfg, ns.token_file or "")
    report.add(cred)
    async with report.waiting("reading the istio CA"):
        trust, ca_pem = await trust_step(cfg, timeout)
    report.add(trust)
    async with report.waiting("discovering istiod replicas"):
        found, replicas = await discovery_steps(cfg, timeout)
    report.add(*found)
    if cfg.multi_revision and replicas:
        report.add(revisions_step(cfg, replicas))
    if replicas and trust.mark != FAIL:
        await _check_replicas(report, cfg, proxy, ca_pem, token, timeout, replicas)
    elif not replicas and not any(s.mark == FAIL for s in found):
        report.add(Step("discovery", FAIL, "no replicas to check", _DISCOVERY_FIX["static"]))
    _summary(report)
    return 1 if report.failed else 0


async def _check_replicas(report: Report, cfg: Config, proxy: Proxy, ca_pem: bytes | None, token: str,
                          timeout: float, replicas: list[Replica]) -> None:
    if ca_pem is not None and proxy.pool.tls.ca_pem != ca_pem:
        proxy.pool.refresh_tls(dataclasses.replace(proxy.pool.tls, ca_pem=ca_pem))
    node = upstream_identity_node(cfg) if cfg.upstream_identity else client.istioctl_node(cfg.istio_namespace)
    checker = Checker(cfg, ca_pem, proxy.pool, node, token, timeout)
    try:
        async with report.waiting(f"checking {len(replicas)} replica(s): tcp, tls, auth, syncz"):
            results = await asyncio.gather(*(checker.replica(r) for r in replicas))
    finally:
        await proxy.pool.close()
    for steps in results:
        report.add(*steps)


def _summary(report: Report) -> None:
    checked = sum(s.mark != INFO for s in report.steps)
    if report.failed:
        print(f"\n{report.failed} of {checked} checks failed", file=report.out, flush=True)
    else:
        print(f"\nall {checked} checks passed", file=report.out, flush=True)


__all__ = ["Report", "Step", "revisions_step", "run_check", "san_matches"]
