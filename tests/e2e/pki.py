"""Test PKI for the real mesh: one root CA that istiod uses as its plugged CA, and leaves it trusts.

istiod (ROOT_CA_DIR) only lets tests mint certificates it accepts if the CA key is on disk, so the root is
minted here and handed to every replica; all replicas then trust the same root and sign with it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRUST_DOMAIN = "cluster.local"
# Backdate so that small clock differences between processes never make a fresh cert "not yet valid".
_BACKDATE = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class CertKey:
    """A certificate with its private key, both also available as PEM bytes."""

    cert: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        # PKCS#8 unencrypted: Go's tls.LoadX509KeyPair, grpcio and Envoy all read it.
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def spiffe_id(namespace: str, service_account: str, trust_domain: str = TRUST_DOMAIN) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def _new_key(kind: str) -> CertificateIssuerPrivateKeyTypes:
    # P-256 is the default because it keeps minting fast (RSA-2048 costs ~50 ms per identity).
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key type {kind!r} (want 'ec' or 'rsa')")


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return builder.not_valid_before(now - _BACKDATE).not_valid_after(now + dt.timedelta(days=days))


def _san_entries(uris: Iterable[str], dns_names: Iterable[str], ips: Iterable[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    entries += [x509.DNSName(d) for d in dns_names]
    entries += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    return entries


def _write(directory: Path, files: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        path = directory / name
        path.write_bytes(data)
        if name.endswith("key.pem"):
            path.chmod(0o600)
    return directory


class TestCA:
    """A self-signed root CA. It signs leaves directly, so every chain is just leaf + root."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, root: CertKey, key_type: str = "ec") -> None:
        self.root = root
        self.key_type = key_type

    @classmethod
    def create(cls, common_name: str = "istioctl-proxy e2e root", *, key_type: str = "ec", days: int = 30) -> TestCA:
        """Mint a root; key_type ('ec' or 'rsa') is used for the root and every leaf it issues."""
        key = _new_key(key_type)
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "istioctl-proxy e2e"),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                # keyCertSign + cRLSign only, and no EKU: istiod's KeyCertBundle.Verify checks the CA cert
                # like Go's x509 does, and an EKU on a root would constrain every leaf under it.
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        )
        cert = _validity(builder, days).sign(key, hashes.SHA256())
        return cls(CertKey(cert, key), key_type)

    @property
    def root_pem(self) -> bytes:
        return self.root.cert_pem

    def write_plugged_ca(self, directory: Path) -> Path:
        """Write istiod's plugged-CA layout (ROOT_CA_DIR). All four files are required by istiod."""
        return _write(
            directory,
            {
                "ca-cert.pem": self.root.cert_pem,
                "ca-key.pem": self.root.key_pem,
                "root-cert.pem": self.root.cert_pem,
                # The chain from ca-cert up to the root, excluding ca-cert; a self-signed CA is its own chain.
                "cert-chain.pem": self.root.cert_pem,
            },
        )

    def issue(
        self,
        *,
        common_name: str,
        uris: Iterable[str] = (),
        dns_names: Iterable[str] = (),
        ips: Iterable[str] = (),
        days: int = 7,
    ) -> CertKey:
        """Sign a leaf with EKU serverAuth+clientAuth (Go's TLS checks clientAuth on client certs and
        istiod re-verifies peer chains with serverAuth, so both are needed)."""
        key = _new_key(self.key_type)
        sans = _san_entries(uris, dns_names, ips)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.root.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                # keyEncipherment only means something for RSA key transport.
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=self.key_type == "rsa",
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.root.key.public_key()), critical=False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = _validity(builder, days).sign(self.root.key, hashes.SHA256())
        return CertKey(cert, key)

    def issue_spiffe(
        self,
        namespace: str,
        service_account: str,
        *,
        dns_names: Iterable[str] = (),
        ips: Iterable[str] = (),
        trust_domain: str = TRUST_DOMAIN,
    ) -> CertKey:
        """A workload leaf with exactly one URI SAN, as istiod's 15012 peer verifier demands."""
        return self.issue(
            common_name=f"{service_account}.{namespace}",
            uris=[spiffe_id(namespace, service_account, trust_domain)],
            dns_names=dns_names,
            ips=ips,
        )

    def issue_serving(self, dns_names: Iterable[str] = ("localhost",), ips: Iterable[str] = ("127.0.0.1",)) -> CertKey:
        """A plain serving cert (e.g. for our proxy's listener): DNS/IP SANs, no SPIFFE URI."""
        dns = list(dns_names)
        return self.issue(common_name=dns[0] if dns else "istioctl-proxy", dns_names=dns, ips=ips)

    def write_cert_dir(self, directory: Path, leaf: CertKey) -> Path:
        """Write the layout istioctl --cert-dir (and istio-agent) reads."""
        return _write(
            directory,
            {
                "cert-chain.pem": leaf.cert_pem,
                "key.pem": leaf.key_pem,
                "root-cert.pem": self.root.cert_pem,
            },
        )

    def mint_cert_dir(self, directory: Path, namespace: str, service_account: str = "default") -> Path:
        """Mint a SPIFFE leaf for ns/sa and write it as an istioctl --cert-dir."""
        return self.write_cert_dir(directory, self.issue_spiffe(namespace, service_account))

    def write_serving(self, directory: Path, leaf: CertKey | None = None) -> Path:
        """Write a serving cert as tls.crt / tls.key / ca.crt (the names a kube TLS secret would have)."""
        leaf = leaf or self.issue_serving()
        return _write(
            directory,
            {
                "tls.crt": leaf.cert_pem,
                "tls.key": leaf.key_pem,
                "ca.crt": self.root.cert_pem,
            },
        )
