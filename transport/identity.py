"""Long-term identities (Ed25519), members files and pre-shared keys on disk.

An identity file is an unencrypted PKCS#8 PEM Ed25519 private key, mode 0600.
A public key is written as one line: the base64 of its 32 raw bytes (as
WireGuard does). A members file lists one public key per line; ``#`` starts a
comment. A PSK file holds the base64 of 32 random bytes.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PUBLIC_KEY_SIZE = 32
PSK_SIZE = 32
#: Bound on files we read: a members file of 100k keys is ~4.5 MB.
MAX_KEY_FILE_SIZE = 8 * 1024 * 1024


class IdentityError(Exception):
    """A key, members or PSK file is missing or malformed; the message says what to do."""


def generate_identity() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def encode_public(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def decode_public(text: str) -> bytes:
    """Parse a one-line base64 public key; raises :class:`IdentityError`."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise IdentityError(f"not a base64 public key: {text.strip()[:60]!r}") from None
    if len(raw) != PUBLIC_KEY_SIZE:
        raise IdentityError(f"a public key is {PUBLIC_KEY_SIZE} bytes, this one is {len(raw)}: {text.strip()[:60]!r}")
    return raw


def short_id(raw: bytes) -> str:
    """A short printable name for logs (first 8 base64 characters)."""
    return encode_public(raw)[:8]


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by the owner only (created 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def save_identity(key: Ed25519PrivateKey, path: Path) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    write_private_file(path, pem)


def _read_bounded(path: Path, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE_SIZE + 1)
    except FileNotFoundError:
        raise IdentityError(f"{what} file {path} does not exist") from None
    except OSError as exc:
        raise IdentityError(f"cannot read {what} file {path}: {exc.strerror}") from None
    if len(data) > MAX_KEY_FILE_SIZE:
        raise IdentityError(f"{what} file {path} is larger than {MAX_KEY_FILE_SIZE} bytes")
    return data


def load_identity(path: Path) -> Ed25519PrivateKey:
    data = _read_bounded(path, "identity")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise IdentityError(
            f"{path} is not an identity file; create one with `traversal keygen --out {path}`"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"{path} holds a {type(key).__name__}, not an Ed25519 identity")
    return key


def parse_members(text: str, source: str = "members file") -> frozenset[bytes]:
    """Parse members-file text: one base64 key per line, ``#`` comments."""
    members: set[bytes] = set()
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            members.add(decode_public(line))
        except IdentityError as exc:
            raise IdentityError(f"{source} line {lineno}: {exc}") from None
    return frozenset(members)


def load_members(path: Path) -> frozenset[bytes]:
    data = _read_bounded(path, "members")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise IdentityError(f"members file {path} is not UTF-8 text") from None
    return parse_members(text, str(path))


def generate_psk() -> bytes:
    return secrets.token_bytes(PSK_SIZE)


def save_psk(psk: bytes, path: Path) -> None:
    write_private_file(path, (base64.b64encode(psk).decode("ascii") + "\n").encode("ascii"))


def load_psk(path: Path) -> bytes:
    data = _read_bounded(path, "PSK")
    try:
        psk = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise IdentityError(f"PSK file {path} is not base64; create one with `traversal genpsk --out {path}`") from None
    if len(psk) != PSK_SIZE:
        raise IdentityError(f"PSK file {path} holds {len(psk)} bytes; a PSK is {PSK_SIZE} bytes")
    return psk
