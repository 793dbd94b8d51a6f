"""The one throwaway certificate authority: for the demo, the simulator, the benchmarks and every test (the
simulated and the real istiod, the test kube-apiserver). Never for production.

A self-signed root that signs leaves directly, so every chain is leaf + root. Options: the key type (EC P-256,
or RSA-2048), each leaf's extended key usages, SPIFFE / DNS / IP SANs, subject organisations (Kubernetes
groups), validity, and the layouts istiod (plugged CA) and istioctl (`--cert-dir`) read.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CLIENT_AUTH",
    "SERVER_AUTH",
    "TRUST_DOMAIN",
    "KeyType",
    "Leaf",
    "PrivateKey",
    "TestCA",
    "private_pem",
    "spiffe_id",
    "write_file",
    "write_files",
]

KeyType = Literal["ec", "rsa"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
TRUST_DOMAIN = "cluster.local"
SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
# Backdated so that small clock differences between processes never make a fresh cert "not yet valid".
_BACKDATE = datetime.timedelta(minutes=5)


def spiffe_id(namespace: str, service_account: str = "default", trust_domain: str = TRUST_DOMAIN) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def private_pem(key: PrivateKey) -> bytes:
    """PKCS#8, unencrypted: what Go's tls.LoadX509KeyPair, grpcio, Envoy and kube-apiserver all read."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _new_key(key_type: KeyType) -> PrivateKey:
    # P-256 is the default because it keeps minting fast (RSA-2048 costs ~50 ms per key).
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key type {key_type!r} (want 'ec' or 'rsa')")


def _key_usage(*, ca: bool, key_encipherment: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


class _Pem:
    """A certificate and its private key, both also as PEM bytes."""

    cert: x509.Certificate
    key: PrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return private_pem(self.key)


@dataclass(frozen=True)
class Leaf(_Pem):
    """A certificate with its private key; both also as PEM bytes."""

    cert: x509.Certificate
    key: PrivateKey = field(repr=False)


@dataclass
class TestCA(_Pem):
    """A root CA in memory; `key_type` is used for the root and every leaf it issues."""

    __test__ = False  # not a pytest test class, despite the name

    name: str = "istioctl-proxy test root"
    key_type: KeyType = "ec"
    days: float = 30.0
    key: PrivateKey = field(init=False, repr=False)
    cert: x509.Certificate = field(init=False)

    def __post_init__(self) -> None:
        self.key = _new_key(self.key_type)
        now = datetime.datetime.now(datetime.UTC)
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, TRUST_DOMAIN),
                x509.NameAttribute(NameOID.COMMON_NAME, self.name),
            ]
        )
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + datetime.timedelta(days=self.days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            # keyCertSign + cRLSign only, and no EKU: istiod's KeyCertBundle.Verify checks the CA cert like
            # Go's x509 does, and an EKU on a root would constrain every leaf under it.
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def issue(
        self,
        *,
        spiffe: str = "",
        dns: Sequence[str] = (),
        ips: Sequence[str] = (),
        cn: str = "",
        orgs: Sequence[str] = (),
        eku: Sequence[x509.ObjectIdentifier] = (SERVER_AUTH, CLIENT_AUTH),
        days: float = 1.0,
        not_before: datetime.datetime | None = None,
    ) -> Leaf:
        """Sign a leaf. The default EKU is serverAuth + clientAuth: Go's TLS checks clientAuth on client
        certificates and istiod re-verifies peer chains with serverAuth, so a workload needs both. `cn`
        defaults to the first DNS name; `orgs` become O= attributes (Kubernetes groups)."""
        key = _new_key(self.key_type)
        start = not_before or datetime.datetime.now(datetime.UTC) - _BACKDATE
        subject = [x509.NameAttribute(NameOID.COMMON_NAME, cn or (dns[0] if dns else "istioctl-proxy test leaf"))]
        subject += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe)] if spiffe else []
        sans += [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(subject))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            # keyEncipherment only means something for RSA key transport.
            .add_extension(_key_usage(ca=False, key_encipherment=self.key_type == "rsa"), critical=True)
            .add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return Leaf(builder.sign(self.key, hashes.SHA256()), key)

    def issue_spiffe(
        self, namespace: str, service_account: str = "default", *, trust_domain: str = TRUST_DOMAIN
    ) -> Leaf:
        """A workload leaf with exactly one URI SAN, as istiod's 15012 peer verifier demands."""
        return self.issue(
            spiffe=spiffe_id(namespace, service_account, trust_domain), cn=f"{service_account}.{namespace}"
        )

    def issue_serving(self, dns: Sequence[str] = ("localhost",), ips: Sequence[str] = ("127.0.0.1",)) -> Leaf:
        """A plain serving cert (e.g. for the proxy's listener): DNS/IP SANs, no SPIFFE URI."""
        return self.issue(dns=dns, ips=ips)

    def write_cert_dir(self, directory: str | os.PathLike[str], leaf: Leaf) -> Path:
        """The layout `istioctl --cert-dir` (and istio-agent) reads: cert-chain.pem, key.pem, root-cert.pem."""
        return write_files(
            directory, {"cert-chain.pem": leaf.cert_pem, "key.pem": leaf.key_pem, "root-cert.pem": self.cert_pem}
        )

    def write_plugged_ca(self, directory: str | os.PathLike[str]) -> Path:
        """istiod's plugged-CA layout (ROOT_CA_DIR, the cacerts secret); istiod requires all four files."""
        return write_files(
            directory,
            {
                "ca-cert.pem": self.cert_pem,
                "ca-key.pem": self.key_pem,
                "root-cert.pem": self.cert_pem,
                # The chain from ca-cert up to the root, excluding ca-cert; a self-signed CA is its own chain.
                "cert-chain.pem": self.cert_pem,
            },
        )


def write_file(path: str | os.PathLike[str], data: bytes) -> str:
    """Write `data` to a file only its owner may read (keys and certificates alike); returns the path."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return os.fspath(path)


def write_files(directory: str | os.PathLike[str], files: Mapping[str, bytes]) -> Path:
    """Write each name → data into `directory` (created if missing) with `write_file`."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        write_file(root / name, data)
    return root
