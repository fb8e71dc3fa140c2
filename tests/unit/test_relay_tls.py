"""Tests for relay_server/tls.py: the self-signed certificate, its fingerprint and the SSL contexts."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import os
import ssl
import stat
from pathlib import Path

import ifaddr
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from relay_server.tls import (
    TlsError,
    certificate_fingerprint,
    client_ssl_context,
    ensure_self_signed,
    server_ssl_context,
)

STEP = 5.0


def _load(cert: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(cert.read_bytes())


def _sans(cert: Path) -> tuple[set[ipaddress.IPv4Address | ipaddress.IPv6Address], set[str]]:
    ext = _load(cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(ext.get_values_for_type(x509.IPAddress)), set(ext.get_values_for_type(x509.DNSName))


def test_certificate_for_a_listen_address(tmp_path: Path) -> None:
    cert, key, fingerprint = ensure_self_signed(tmp_path, "127.0.0.1")
    assert (cert, key) == (tmp_path / "cert.pem", tmp_path / "key.pem")
    ips, dns = _sans(cert)
    assert ips == {ipaddress.ip_address("127.0.0.1")}
    assert dns == {"localhost"}
    loaded = _load(cert)
    public = loaded.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"
    lifetime = loaded.not_valid_after_utc - loaded.not_valid_before_utc
    assert lifetime > datetime.timedelta(days=3600)
    assert len(fingerprint.split(":")) == 32


def test_wildcard_listen_address_covers_every_local_address(tmp_path: Path) -> None:
    cert, _, _ = ensure_self_signed(tmp_path, "0.0.0.0")
    ips, dns = _sans(cert)
    assert "localhost" in dns
    assert ipaddress.ip_address("127.0.0.1") in ips
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            addr = ipaddress.ip_address(ip.ip if isinstance(ip.ip, str) else ip.ip[0])
            if not addr.is_link_local:
                assert addr in ips, addr


def test_hostname_listen_address_becomes_a_dns_name(tmp_path: Path) -> None:
    cert, _, _ = ensure_self_signed(tmp_path, "relay.example.org")
    ips, dns = _sans(cert)
    assert dns == {"localhost", "relay.example.org"} and not ips


def test_key_is_private(tmp_path: Path) -> None:
    _, key, _ = ensure_self_signed(tmp_path, "127.0.0.1")
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600


def test_fingerprint_is_stable_and_is_sha256_of_der(tmp_path: Path) -> None:
    cert, _, first = ensure_self_signed(tmp_path, "127.0.0.1")
    pem_before = cert.read_bytes()
    _, _, second = ensure_self_signed(tmp_path, "127.0.0.1")
    assert first == second == certificate_fingerprint(cert)
    assert cert.read_bytes() == pem_before  # kept, not regenerated
    der = ssl.PEM_cert_to_DER_cert(pem_before.decode())
    assert first.replace(":", "") == hashlib.sha256(der).hexdigest().upper()


async def _tls_roundtrip(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str) -> bytes:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"relay")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=client_ctx, server_hostname=server_hostname), STEP
        )
        data = await asyncio.wait_for(reader.read(), STEP)
        writer.close()
        return data
    finally:
        server.close()
        await server.wait_closed()


def test_client_context_verifies_the_relay_by_ip(tmp_path: Path) -> None:
    cert, key, _ = ensure_self_signed(tmp_path / "relay", "127.0.0.1")
    other_cert, _, _ = ensure_self_signed(tmp_path / "other", "127.0.0.1")
    server_ctx = server_ssl_context(cert, key)
    client_ctx = client_ssl_context(cert)
    assert client_ctx.check_hostname and client_ctx.verify_mode == ssl.CERT_REQUIRED

    async def main() -> None:
        assert await _tls_roundtrip(server_ctx, client_ctx, "127.0.0.1") == b"relay"
        with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
            await _tls_roundtrip(server_ctx, client_ctx, "127.0.0.2")
        # Trusting another relay's certificate must not let this one in.
        with pytest.raises(ssl.SSLCertVerificationError):
            await _tls_roundtrip(server_ctx, client_ssl_context(other_cert), "127.0.0.1")

    asyncio.run(asyncio.wait_for(main(), 30))


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(TlsError, match="does not exist"):
        certificate_fingerprint(tmp_path / "nope.pem")
    with pytest.raises(TlsError, match="does not exist"):
        client_ssl_context(tmp_path / "nope.pem")
    with pytest.raises(TlsError, match="does not exist"):
        server_ssl_context(tmp_path / "cert.pem", tmp_path / "key.pem")


def test_lone_certificate_or_key_is_not_silently_replaced(tmp_path: Path) -> None:
    cert, key, _ = ensure_self_signed(tmp_path, "127.0.0.1")
    key.unlink()
    with pytest.raises(TlsError, match=r"key\.pem does not"):
        ensure_self_signed(tmp_path, "127.0.0.1")
    cert.rename(tmp_path / "saved.pem")
    ensure_self_signed(tmp_path / "k", "127.0.0.1")
    (tmp_path / "k" / "cert.pem").unlink()
    with pytest.raises(TlsError, match=r"cert\.pem does not"):
        ensure_self_signed(tmp_path / "k", "127.0.0.1")


def test_mismatched_pair(tmp_path: Path) -> None:
    cert, _, _ = ensure_self_signed(tmp_path / "a", "127.0.0.1")
    _, other_key, _ = ensure_self_signed(tmp_path / "b", "127.0.0.1")
    with pytest.raises(TlsError, match="does not belong"):
        server_ssl_context(cert, other_key)
    (tmp_path / "a" / "key.pem").write_bytes(other_key.read_bytes())
    with pytest.raises(TlsError, match="does not belong"):
        ensure_self_signed(tmp_path / "a", "127.0.0.1")


def test_garbage_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(TlsError, match="not a PEM certificate"):
        certificate_fingerprint(junk)
    with pytest.raises(TlsError, match="not a PEM certificate"):
        client_ssl_context(junk)
    cert, _, _ = ensure_self_signed(tmp_path / "a", "127.0.0.1")
    with pytest.raises(TlsError, match="not an unencrypted PEM private key"):
        server_ssl_context(cert, junk)
