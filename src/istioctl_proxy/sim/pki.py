"""A throwaway certificate authority: for the demo, the simulator and tests (never for production)."""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass
class Leaf:
    cert_pem: bytes
    key_pem: bytes = field(repr=False)


@dataclass
class TestCA:
    """A root CA in memory. `issue()` mints SPIFFE and/or DNS/IP leaf certificates."""

    __test__ = False  # not a pytest test class, despite the name

    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()), repr=False)
    name: str = "istioctl-proxy test root"
    cert: x509.Certificate = field(init=False)

    def __post_init__(self) -> None:
        now = datetime.datetime.now(datetime.UTC)
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cluster.local"),
                x509.NameAttribute(NameOID.COMMON_NAME, self.name),
            ]
        )
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _pem_key(self.key)

    def issue(
        self,
        *,
        spiffe: str = "",
        dns: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
        days: float = 1.0,
        not_before: datetime.datetime | None = None,
    ) -> Leaf:
        key = ec.generate_private_key(ec.SECP256R1())
        now = not_before or datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
        sans: list[x509.GeneralName] = []
        if spiffe:
            sans.append(x509.UniformResourceIdentifier(spiffe))
        sans += [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cluster.local")]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=bool(spiffe))
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return Leaf(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key))

    def write_istioctl_cert_dir(self, directory: str, leaf: Leaf) -> str:
        """The layout `istioctl --cert-dir` reads: cert-chain.pem, key.pem, root-cert.pem."""
        os.makedirs(directory, exist_ok=True)
        for name, data in (
            ("cert-chain.pem", leaf.cert_pem),
            ("key.pem", leaf.key_pem),
            ("root-cert.pem", self.cert_pem),
        ):
            write_file(os.path.join(directory, name), data)
        return directory


def write_file(path: str, data: bytes) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path
