"""JWKS over HTTPS, as Cognito serves it (https://cognito-idp.<region>.amazonaws.com/...), through
a real Envoy, on both event loops: a certificate chaining to a trusted CA serves; one that does
not (an impostor, or a TLS-intercepting proxy the pod does not trust) leaves the issuer without
keys, so its tokens get 503 and never reach the app, and /readyz names the certificate problem."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .fake_issuer import FakeIssuer
from .harness import http_request, wait_for
from .security_stack import start_security_stack, stop_security_stack

pytestmark = pytest.mark.e2e


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None, signer, *, ca: bool,
          ip: str | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ip is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
                                        critical=False)
    return builder.sign(signer, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> tuple[Path, ssl.SSLContext]:
    """A test CA (its PEM file) and a server context whose certificate for 127.0.0.1 it signed."""
    work = tmp_path_factory.mktemp("pki")
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert("authz-test-ca", ca_key, None, ca_key, ca=True)
    server = _cert("127.0.0.1", server_key, ca.subject, ca_key, ca=False, ip="127.0.0.1")
    (work / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (work / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (work / "server.key").write_bytes(server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(work / "server.pem", work / "server.key")
    return work / "ca.pem", context


def issuer_status(http_port: int, issuer: str) -> dict:
    _, _, body = http_request("GET", f"http://127.0.0.1:{http_port}/readyz")
    return next(i for i in json.loads(body)["issuers"] if i["issuer"] == issuer)


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_jwks_over_https_from_a_trusted_ca_serves(tmp_path, upstream, envoy_factory, pki, event_loop) -> None:
    ca_file, server_context = pki
    fake = FakeIssuer("us-east-1_Tls000001", tls=server_context).start()
    assert fake.jwks_uri.startswith("https://")
    # OpenSSL's default verify paths: the pod's trust store, here exactly our test CA.
    stack = start_security_stack(tmp_path, upstream, envoy_factory, "--event-loop", event_loop, fake=fake,
                                 env={"SSL_CERT_FILE": str(ca_file), "SSL_CERT_DIR": str(tmp_path)})
    try:
        assert issuer_status(stack.service.http_port, fake.issuer)["keys"] == 1
        assert f'"event_loop":"{event_loop}"' in stack.service.process.log_text()  # the start-up line
        answer = stack.send("POST", "/transactions", fake.token())
        assert answer.status == 200 and len(answer.reached_upstream) == 1
        assert answer.reached_upstream[0]["headers"].get("x-auth-client-id") == ["payments-writer"]
    finally:
        stop_security_stack(stack)


def test_jwks_over_https_from_an_untrusted_certificate_gets_no_keys(tmp_path, upstream, envoy_factory,
                                                                      pki) -> None:
    _, server_context = pki
    fake = FakeIssuer("us-east-1_Tls000002", tls=server_context).start()
    stack = start_security_stack(tmp_path, upstream, envoy_factory, fake=fake, wait_ready=False,
                                 env={"SSL_CERT_FILE": "/nonexistent-ca.pem", "SSL_CERT_DIR": str(tmp_path)})
    try:
        status = wait_for(lambda: (s := issuer_status(stack.service.http_port, fake.issuer))["last_error"] and s,
                          60, "a failed JWKS fetch")
        assert status["keys"] == 0
        assert "certificate" in status["last_error"].lower(), status["last_error"]
        assert fake.fetch_count() == 0  # the handshake failed: no request was ever served
        answer = stack.send("POST", "/transactions", fake.token())
        assert answer.status == 503 and answer.reached_upstream == []
        # The other issuer, over plain HTTP here, is unaffected.
        assert stack.send("POST", "/transactions", stack.dev.token("payments-writer")).status == 200
    finally:
        stop_security_stack(stack)
