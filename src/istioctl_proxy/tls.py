"""TLS and credentials on both sides: the serving certificate (`ServingTLS`, reloaded on rotation by
`CertificateReloader`) and how the proxy reaches istiod (`UpstreamTLS`, a rotating `TokenFile`, and the
unverified root for --istiod-insecure-skip-verify)."""

from __future__ import annotations

import logging
import os
import socket
import ssl
from dataclasses import dataclass, field

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .discovery import split_host_port
from .errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["CertificateReloader", "ServingTLS", "TlsRefusal", "TokenFile", "UpstreamTLS", "check_pair",
           "diagnose_upstream", "fetch_unverified_root"]


@dataclass(frozen=True)
class ServingTLS:
    """The serving certificate files, and whether callers must present a client certificate."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None
    require_client_cert: bool = False


def check_pair(cert_pem: bytes, key_pem: bytes) -> None:
    """Raise ValueError unless cert_pem is a certificate chain whose first certificate belongs to key_pem."""
    try:
        leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError as err:
        raise ValueError(f"the certificate file holds no PEM certificate ({err})") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as err:
        # The exception text of a key parser is about the key's structure, never its content.
        raise ValueError(f"the key file holds no unencrypted PEM private key ({err})") from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if leaf.public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
        raise ValueError("the key does not belong to the certificate (a rotation half done?)")


class CertificateReloader:
    """Serves the current files of a ServingTLS; new handshakes pick up rotated files (cert-manager).

    A changed pair is used only if the key belongs to the certificate: a half-written rotation (the
    certificate written before its key) or a broken file keeps the previous pair, logged once per change.
    """

    def __init__(self, tls: ServingTLS) -> None:
        self.tls = tls
        self._stamp: tuple[int, ...] = ()
        self._rejected: tuple[int, ...] = ()
        self._config: grpc.ServerCertificateConfiguration | None = None
        self.reloads = 0
        self.rejected = 0

    def _files(self) -> list[str]:
        return [f for f in (self.tls.cert_file, self.tls.key_file, self.tls.client_ca_file) if f]

    def _read(self) -> grpc.ServerCertificateConfiguration:
        with open(self.tls.cert_file, "rb") as c, open(self.tls.key_file, "rb") as k:
            cert, key = c.read(), k.read()
        check_pair(cert, key)
        ca = None
        if self.tls.client_ca_file:
            with open(self.tls.client_ca_file, "rb") as f:
                ca = f.read()
            try:
                x509.load_pem_x509_certificates(ca)
            except ValueError as err:
                raise ValueError(f"the client CA file holds no PEM certificate ({err})") from None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def load(self) -> grpc.ServerCertificateConfiguration:
        """The current configuration; raises (OSError, ValueError) only when there is none yet."""
        try:
            stamp = tuple(os.stat(f).st_mtime_ns for f in self._files())
        except OSError:
            if self._config is None:
                raise
            stamp = self._rejected  # a file is missing mid-rotation: keep serving, retry on the next handshake
        if self._config is not None and stamp in (self._stamp, self._rejected):
            return self._config
        try:
            config = self._read()
        except (OSError, ValueError) as err:
            if self._config is None:
                raise
            self._rejected = stamp
            self.rejected += 1
            log.error("serving certificate files changed but were not loaded, still serving the previous "
                      "certificate: %s: %s", self.tls.cert_file, err)
            return self._config
        if self._config is not None:
            self.reloads += 1
            log.info("serving certificate reloaded from %s", self.tls.cert_file)
        self._config, self._stamp, self._rejected = config, stamp, ()
        return config

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's per-handshake hook: the new configuration when the files changed and parse, else None."""
        # Called by gRPC on each new handshake; None keeps the current configuration.
        before = self._config
        try:
            config = self.load()
        except Exception:  # never into gRPC's handshake: keep what is served
            log.exception("could not check the serving certificate files; keeping the current certificate")
            return None
        return config if config is not before else None

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that re-read the files on change. Raises ConfigError if they do not load now."""
        try:
            first = self.load()
        except (OSError, ValueError) as err:
            raise ConfigError(f"--tls-cert/--tls-key: {err}") from None
        return grpc.dynamic_ssl_server_credentials(
            first, self.fetch, require_client_authentication=self.tls.require_client_cert
        )


@dataclass(frozen=True)
class UpstreamTLS:
    """How the proxy reaches istiod. Secrets are held as bytes and never printed."""

    plaintext: bool = False
    ca_pem: bytes | None = None  # istio root CA; None with skip_verify only
    san: str = "istiod.istio-system.svc"
    cert_pem: bytes | None = field(default=None, repr=False)
    key_pem: bytes | None = field(default=None, repr=False)
    skip_verify: bool = False


class TokenFile:
    """A token read from a file and re-read when the file changes (projected tokens rotate)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[float, int] | None = None
        self._token = ""

    def read(self) -> str:
        """The token, re-read only when the file's mtime or size changed."""
        st = os.stat(self.path)
        stamp = (st.st_mtime, st.st_size)
        if stamp != self._stamp:
            with open(self.path, encoding="utf-8") as f:
                self._token = f.read().strip()
            self._stamp = stamp
        return self._token


def fetch_unverified_root(address: str, timeout: float = 5.0) -> bytes:
    """The top certificate istiod presents, for --istiod-insecure-skip-verify only.

    gRPC Python cannot switch verification off, so we trust whatever chain the server shows.
    """
    host, port = split_host_port(address)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host, port), timeout=timeout) as sock, ctx.wrap_socket(sock) as tls:
        # Private in 3.11 (public from 3.13): the full chain as sent, unverified.
        chain = tls._sslobj.get_unverified_chain()  # type: ignore[attr-defined]
        der = chain[-1].public_bytes(ssl._ssl.ENCODING_DER) if chain else tls.getpeercert(binary_form=True)  # type: ignore[attr-defined]
    if not der:
        raise OSError(f"{address} presented no certificate")
    return ssl.DER_cert_to_PEM_cert(bytes(der)).encode()


@dataclass(frozen=True)
class TlsRefusal:
    """Why a replica's certificate is refused: `reason` "san" (it does not name `wanted`) or "ca"."""

    reason: str
    detail: str


def _dns_names(der: bytes) -> list[str]:
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n) for n in san.get_values_for_type(x509.DNSName)]


def diagnose_upstream(address: str, ca_pem: bytes, san: str, timeout: float = 2.0) -> TlsRefusal | None:
    """Handshake with `address` as gRPC would verify it (chain to `ca_pem`, name `san`): why it is refused,
    or None when it is not (or the replica cannot be reached at all: that is not a TLS verdict).

    gRPC's channel state says only TRANSIENT_FAILURE; this names the cause for /readyz and metrics. Blocking:
    run it in a thread.
    """
    host, port = split_host_port(address)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # the name is compared below, exactly against this replica's own SAN
    ctx.load_verify_locations(cadata=ca_pem.decode())
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock, ctx.wrap_socket(sock) as tls:
            der = tls.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError as err:
        return TlsRefusal("ca", f"certificate does not chain to the istio CA ({err.verify_message})")
    except (OSError, ValueError):
        return None
    names = _dns_names(der) if der else []
    wanted = san.lower().rstrip(".")
    if any(n.lower().rstrip(".") == wanted for n in names):
        return None
    return TlsRefusal("san", f"certificate names {', '.join(names) or 'no DNS name'}, not {san}")
