"""The clusters' certificates, from the one test CA (istioctl_proxy.sim.pki), written where the binaries read them."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from istioctl_proxy.sim.pki import CLIENT_AUTH, SERVER_AUTH, Leaf, TestCA, private_pem, spiffe_id

__all__ = ["CLIENT_AUTH", "SERVER_AUTH", "Leaf", "TestCA", "sa_keys", "spiffe_id", "write"]


def write(leaf: Leaf, directory: Path, name: str) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    crt, key = directory / f"{name}.crt", directory / f"{name}.key"
    crt.write_bytes(leaf.cert_pem)
    key.write_bytes(leaf.key_pem)
    key.chmod(0o600)
    return crt, key


def sa_keys() -> tuple[bytes, bytes]:
    """A service-account signing key (RS256, what kube-apiserver signs tokens with): private and public PEM."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private_pem(key), public
