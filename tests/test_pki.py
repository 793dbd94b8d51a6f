"""The one test CA (istioctl_proxy.sim.pki): each option shows up in the certificates it mints."""

from __future__ import annotations

import datetime
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from istioctl_proxy.auth import spiffe_ids_of_pem
from istioctl_proxy.sim.pki import CLIENT_AUTH, SERVER_AUTH, TestCA, spiffe_id


@pytest.mark.parametrize(("key_type", "key_class"), [("ec", ec.EllipticCurvePrivateKey), ("rsa", rsa.RSAPrivateKey)])
def test_key_type_is_used_for_the_root_and_its_leaves(key_type: str, key_class: type) -> None:
    ca = TestCA(key_type=key_type)  # type: ignore[arg-type]
    leaf = ca.issue_serving()
    assert isinstance(ca.key, key_class) and isinstance(leaf.key, key_class)
    leaf.cert.verify_directly_issued_by(ca.cert)
    usage = leaf.cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment == (key_type == "rsa")


def test_unknown_key_type_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown key type 'dsa'"):
        TestCA(key_type="dsa")  # type: ignore[arg-type]


def test_root_is_a_ca_without_eku() -> None:
    ca = TestCA("some root", days=2)
    assert ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = ca.cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    with pytest.raises(x509.ExtensionNotFound):
        ca.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert ca.cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "some root"
    lifetime = ca.cert.not_valid_after_utc - ca.cert.not_valid_before_utc
    assert datetime.timedelta(days=2) < lifetime < datetime.timedelta(days=2, hours=1)


def test_leaf_sans_eku_subject_and_validity() -> None:
    ca = TestCA()
    spiffe = ca.issue_spiffe("ns-1", "reader")
    assert spiffe_ids_of_pem(spiffe.cert_pem) == (spiffe_id("ns-1", "reader"),)
    assert spiffe_id("ns-1", "reader") == "spiffe://cluster.local/ns/ns-1/sa/reader"
    eku = spiffe.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [SERVER_AUTH, CLIENT_AUTH]

    start = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    client = ca.issue(cn="admin", orgs=["system:masters"], dns=["a.example"], ips=["127.0.0.1"],
                      eku=[CLIENT_AUTH], days=3, not_before=start)
    assert client.cert.subject.rfc4514_string() == "O=system:masters,CN=admin"
    san = client.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["a.example"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert list(client.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [CLIENT_AUTH]
    assert client.cert.not_valid_before_utc == start
    assert client.cert.not_valid_after_utc == start + datetime.timedelta(days=3)


def test_plugged_ca_and_cert_dir_layouts(tmp_path: Path) -> None:
    ca = TestCA()
    plugged = ca.write_plugged_ca(tmp_path / "cacerts")
    assert sorted(p.name for p in plugged.iterdir()) == ["ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"]
    for name in ("ca-cert.pem", "root-cert.pem", "cert-chain.pem"):
        assert (plugged / name).read_bytes() == ca.cert_pem
    key = serialization.load_pem_private_key((plugged / "ca-key.pem").read_bytes(), None)
    assert key.public_key() == ca.key.public_key()
    assert stat.S_IMODE((plugged / "ca-key.pem").stat().st_mode) == 0o600

    leaf = ca.issue_spiffe("istio-system")
    cert_dir = ca.write_cert_dir(str(tmp_path / "certs"), leaf)
    assert {p.name: p.read_bytes() for p in cert_dir.iterdir()} == {
        "cert-chain.pem": leaf.cert_pem, "key.pem": leaf.key_pem, "root-cert.pem": ca.cert_pem
    }
