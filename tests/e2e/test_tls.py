"""`medserve serve --ssl-certfile/--ssl-keyfile`: HTTPS without a reverse proxy."""

from __future__ import annotations

import datetime
import ipaddress
import sys
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import AUTH, DEV_KEY
from tests.serverproc import fake_registry, free_port, running_process

pytestmark = pytest.mark.e2e


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "medserve test")])
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
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def test_https_with_a_certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = self_signed(tmp_path)
    config = fake_registry(tmp_path / "fake.toml")
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # httpx trusts the test certificate
    port = free_port()
    cmd = [sys.executable, "-m", "medserve", "serve", "-c", str(config), "--port", str(port)]
    cmd += ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
    env = {
        "MEDSERVE_AUDIT__PATH": str(tmp_path / "audit" / "audit.db"),
        "MEDSERVE_AUTH__DEV_KEY": DEV_KEY,
    }
    url = f"https://127.0.0.1:{port}"
    with running_process(cmd, tmp_path / "serve.log", f"{url}/ready", env, AUTH):
        body = {"model": "fake-echo", "prompt": "over tls"}
        r = httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "over tls"
        with pytest.raises(httpx.TransportError):  # plain HTTP is not served
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
