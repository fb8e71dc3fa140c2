"""Per-session, self-signed TLS certificates for the direct path's QUIC connection.

The certificate proves nothing by itself: its SHA-256 fingerprint travels
inside the end-to-end encrypted handshake and the peer pins it (DESIGN.md,
"Trust"), so no CA, name or validity period is part of the trust decision.
The key is Ed25519 (aioquic signs and verifies ``ed25519`` CertificateVerify
when the cryptography backend supports it, which ``cryptography>=47`` does).
"""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

FINGERPRINT_SIZE = 32  # SHA-256

#: The certificate is only ever checked by fingerprint, never by date, so the
#: validity window merely has to look sane to tools that print it. It starts an
#: hour early so that a peer with a skewed clock inspecting it sees nothing odd.
_BACKDATE = datetime.timedelta(hours=1)
_LIFETIME = datetime.timedelta(days=365)


class CertificateError(ValueError):
    """A certificate or key could not be made or loaded; the message says which and why."""


@dataclass(frozen=True, slots=True)
class SessionCertificate:
    """One session's certificate: PEM-encoded certificate and key, and the fingerprint the peer pins."""

    cert_pem: bytes
    key_pem: bytes
    fingerprint: bytes  # SHA-256 of the certificate's DER encoding

    def __repr__(self) -> str:
        # Keep the private key out of logs and tracebacks.
        return f"SessionCertificate(fingerprint={self.fingerprint.hex()})"

    def load(self) -> tuple[x509.Certificate, ed25519.Ed25519PrivateKey]:
        """The certificate and key as objects, as aioquic's ``QuicConfiguration`` wants them."""
        try:
            cert = x509.load_pem_x509_certificate(self.cert_pem)
            key = serialization.load_pem_private_key(self.key_pem, password=None)
        except ValueError as exc:
            raise CertificateError(f"session certificate cannot be loaded: {exc}") from exc
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise CertificateError(f"session key must be Ed25519, got {type(key).__name__}")
        if certificate_fingerprint(cert) != self.fingerprint:
            raise CertificateError("session certificate does not match its recorded fingerprint")
        return cert, key


def certificate_fingerprint(cert: x509.Certificate | bytes) -> bytes:
    """SHA-256 of a certificate's DER encoding (``cert`` is a certificate object or its DER bytes)."""
    der = cert if isinstance(cert, bytes) else cert.public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).digest()


def make_session_certificate(*, common_name: str = "traversal session") -> SessionCertificate:
    """Generate a fresh Ed25519 key and a self-signed certificate for one session.

    Reads the wall clock for the (unchecked) validity dates only.
    """
    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        # A random 63-bit serial (positive, under the 20-byte limit of RFC 5280 4.1.2.2).
        .serial_number(int.from_bytes(os.urandom(8), "big") >> 1 or 1)
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, algorithm=None)  # Ed25519 signs without a separate hash
    )
    return SessionCertificate(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        fingerprint=certificate_fingerprint(cert),
    )
