"""TLS for the relay's WebSocket port: a self-signed certificate, its fingerprint, and SSL contexts.

The relay serves ``wss://`` with a certificate it makes itself on first start
(ECDSA P-256, IP SANs for the addresses it listens on). Clients trust it by
being given that certificate file as their CA, and can cross-check the SHA-256
fingerprint the relay prints, the way SSH host keys are checked.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

import ifaddr
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from transport.identity import write_private_file

CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
#: Long enough that an operator never meets an expiry; clients pin this exact
#: certificate rather than relying on a CA's revocation anyway.
CERT_VALIDITY = datetime.timedelta(days=3650)
#: Bound on PEM files we read (a certificate is ~1 kB).
MAX_PEM_SIZE = 1024 * 1024

_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})


class TlsError(Exception):
    """A certificate or key file is missing, unreadable or does not match; the message says what to do."""


def _read_pem(path: Path, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PEM_SIZE + 1)
    except FileNotFoundError:
        raise TlsError(f"{what} file {path} does not exist") from None
    except OSError as exc:
        raise TlsError(f"cannot read {what} file {path}: {exc.strerror}") from None
    if len(data) > MAX_PEM_SIZE:
        raise TlsError(f"{what} file {path} is larger than {MAX_PEM_SIZE} bytes; is it really a PEM {what}?")
    return data


def _load_certificate(path: Path) -> x509.Certificate:
    data = _read_pem(path, "certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise TlsError(f"{path} is not a PEM certificate") from None


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def certificate_fingerprint(cert: Path) -> str:
    """SHA-256 fingerprint of the certificate in ``cert``, as colon-separated upper-case hex."""
    return _fingerprint(_load_certificate(cert))


def _local_addresses() -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            # ifaddr gives IPv4 as a string and IPv6 as (address, flowinfo, scope_id).
            text = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            try:
                addr = ipaddress.ip_address(text.split("%", 1)[0])
            except ValueError:
                continue
            # A link-local address only means something with a zone id, which a
            # URL (and so a certificate name check) cannot carry.
            if addr.is_link_local:
                continue
            addresses.append(addr)
    return addresses


def _subject_alt_names(host: str) -> list[x509.GeneralName]:
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    dns = ["localhost"]
    if host in _WILDCARD_HOSTS:
        # Listening on every address: clients may reach us on any of them.
        ips.extend(_local_addresses())
    else:
        try:
            ips.append(ipaddress.ip_address(host))
        except ValueError:
            dns.append(host)
    names: list[x509.GeneralName] = [x509.DNSName(name) for name in dict.fromkeys(dns)]
    names.extend(x509.IPAddress(addr) for addr in dict.fromkeys(ips))
    return names


def _generate(cert_path: Path, key_path: Path, host: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"traversal relay {host or '*'}")])
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # Backdated a little so a client whose clock lags still accepts it.
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + CERT_VALIDITY)
        .add_extension(x509.SubjectAlternativeName(_subject_alt_names(host)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(ski, critical=False)
        # Strict X.509 checking (Python 3.13's default) wants an AKI even on a
        # self-signed certificate.
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        # The key is created 0600 from the start (never world-readable, even briefly).
        write_private_file(key_path, key_pem)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    except OSError as exc:
        raise TlsError(f"cannot write the relay certificate into {cert_path.parent}: {exc.strerror}") from None


def _check_pair(cert_path: Path, key_path: Path) -> x509.Certificate:
    cert = _load_certificate(cert_path)
    data = _read_pem(key_path, "key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise TlsError(f"{key_path} is not an unencrypted PEM private key") from None
    if key.public_key() != cert.public_key():
        raise TlsError(
            f"key {key_path} does not belong to certificate {cert_path}; "
            "delete both files to have the relay generate a new pair"
        )
    return cert


def ensure_self_signed(directory: Path, host: str) -> tuple[Path, Path, str]:
    """Make sure ``directory`` holds a certificate and key for ``host``; return (cert, key, fingerprint).

    Existing files are kept (clients have pinned that certificate), after
    checking that they belong together. A lone certificate or lone key is an
    error rather than being replaced, so a pinned certificate never changes
    behind the operator's back.
    """
    cert_path = directory / CERT_FILE
    key_path = directory / KEY_FILE
    cert_exists, key_exists = cert_path.exists(), key_path.exists()
    if cert_exists != key_exists:
        present, missing = (cert_path, key_path) if cert_exists else (key_path, cert_path)
        raise TlsError(
            f"{present} exists but {missing} does not; restore it, or delete {present} to generate a new pair"
        )
    if not cert_exists:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TlsError(f"cannot create certificate directory {directory}: {exc.strerror}") from None
        _generate(cert_path, key_path, host)
    cert = _check_pair(cert_path, key_path)
    return cert_path, key_path, _fingerprint(cert)


def server_ssl_context(cert: Path, key: Path) -> ssl.SSLContext:
    """Server-side context for the relay's ``wss://`` port."""
    # Read both first so a missing or foreign file gets our message, not OpenSSL's.
    _check_pair(cert, key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"cannot load certificate {cert} with key {key}: {exc}") from None
    return context


def client_ssl_context(ca: Path) -> ssl.SSLContext:
    """Client-side context that trusts exactly the certificate(s) in ``ca`` and checks the host name or IP."""
    _load_certificate(ca)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED by default
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # The relay's certificate is self-signed and not a CA: PARTIAL_CHAIN lets
    # it be its own trust anchor; X509_STRICT is what Python 3.13 enables by
    # default, set here so 3.11 behaves the same.
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN | ssl.VERIFY_X509_STRICT
    try:
        context.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"cannot load CA certificate {ca}: {exc}") from None
    return context
