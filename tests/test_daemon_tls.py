"""TLS: with a certificate and key in the settings, mepd serves HTTPS only."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import sys
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.daemon_harness import start_daemon, write_deployment


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def test_tls_serves_https_and_refuses_plain_http(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    config = write_deployment(
        tmp_path / "site",
        python=sys.executable,
        settings_extra={"tls": {"cert": str(cert), "key": str(key)}},
    )
    daemon = start_daemon(config, tmp_path / "site" / "state", ca=cert)
    try:
        assert daemon.url.startswith("https://")
        r = httpx.get(
            daemon.url + "/healthz", verify=ssl.create_default_context(cafile=str(cert)), timeout=10
        )
        assert r.json()["status"] == "ok"
        with pytest.raises(httpx.HTTPError):
            httpx.get(daemon.url.replace("https://", "http://") + "/healthz", timeout=5)
    finally:
        assert daemon.stop() == 0
