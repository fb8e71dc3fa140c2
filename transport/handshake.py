"""End-to-end peer handshake through an untrusted relay: hybrid X25519 + ML-KEM-768, SIGMA-I authenticated.

A sans-I/O state machine (like h11 / aioquic): bytes in, bytes out, no sockets, no clock. The relay
only forwards the three messages; it learns neither session key nor the initiator's identity in
clear, and anything it alters, replays or splices in makes the handshake fail with HandshakeError.

Pattern: SIGMA-I (Krawczyk, "SIGMA: the SIGn-and-MAc approach to authenticated Diffie-Hellman",
CRYPTO 2003), the design behind IKEv2 and the TLS 1.3 handshake. Each side signs the transcript hash
with its long-term Ed25519 key; the "MAC" over its identity is the AEAD tag under a key derived from
the ephemeral secrets. The key schedule is Noise's SymmetricState (Noise Protocol Framework rev 34,
section 5.2: chaining key ck, handshake hash h, MixHash / MixKey / MixKeyAndHash with its HKDF over
HMAC-SHA256) and the network PSK is mixed in as by Noise's psk0 modifier (section 9).

    init:  h = ck = SHA-256(PROTOCOL_NAME); MixHash(prologue); if psk: MixKeyAndHash(psk)
    msg1   I -> R   version | eI (X25519) | ekI (ML-KEM-768 encapsulation key)       MixHash(msg1)
    msg2   R -> I   eR | ct = Encaps(ekI) | AEAD(idR | Sig_R("responder" | h | idR))
                    MixHash(eR | ct); MixKey(ss_mlkem | X25519(eI, eR)); EncryptAndHash(...)
    msg3   I -> R   AEAD(idI | Sig_I("initiator" | h | idI))                          EncryptAndHash(...)
    keys:  k_i2r, k_r2i = HKDF(ck, h)   (Noise's Split, with h as input to bind the keys to the transcript)

The AEAD is ChaCha20-Poly1305 with h as associated data, so every byte sent so far is authenticated
by each tag and by each signature. The two shared secrets go into one HKDF call, concatenated
ML-KEM first as X25519MLKEM768 does (draft-ietf-tls-ecdhe-mlkem): the result stays secret if either
X25519 or ML-KEM-768 holds. Forward secrecy comes from the ephemerals alone; long-term keys only
sign. The initiator names itself only in msg3, after it has verified and authorised the responder,
so an active attacker never learns it (SIGMA-I identity protection); the responder's identity is
hidden from passive observers only. The prologue (protocol, network name, relay session id) makes
a transcript from another network or session worthless.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from transport.constants import MAX_HANDSHAKE_SIZE
from transport.frames import IDENTITY_SIZE, SIGNATURE_SIZE
from transport.identity import PSK_SIZE, public_bytes, short_id

PROTOCOL_NAME = b"traversal_SIGMA-I_X25519MLKEM768_Ed25519_ChaChaPoly_SHA256"
HANDSHAKE_VERSION = 1

X25519_SIZE = 32
MLKEM_PUBLIC_SIZE = 1184
MLKEM_CIPHERTEXT_SIZE = 1088
TAG_SIZE = 16
#: An encrypted identity + signature (msg2's tail and all of msg3).
AUTH_SIZE = IDENTITY_SIZE + SIGNATURE_SIZE + TAG_SIZE

MSG1_SIZE = 1 + X25519_SIZE + MLKEM_PUBLIC_SIZE  # 1217
MSG2_SIZE = X25519_SIZE + MLKEM_CIPHERTEXT_SIZE + AUTH_SIZE  # 1232
MSG3_SIZE = AUTH_SIZE  # 112
#: Bytes on the wire for one whole handshake (the three payloads, without frame headers).
HANDSHAKE_OVERHEAD = MSG1_SIZE + MSG2_SIZE + MSG3_SIZE  # 2561
SESSION_TAG_SIZE = 8

# Role labels keep a signature made as one role from being replayed as the other (reflection).
_SIGNATURE_LABEL = {True: b"traversal handshake initiator\x00", False: b"traversal handshake responder\x00"}


class HandshakeError(Exception):
    """The handshake failed or was misused; the message says why. The session must not be used."""


class HandshakeState(Enum):
    START = "start"
    SENT_INIT = "sent-init"  # initiator, waiting for msg2
    SENT_RESPONSE = "sent-response"  # responder, waiting for msg3
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class HandshakeResult:
    """What a completed handshake hands to the data session."""

    peer_identity: bytes  # raw Ed25519 public key the peer proved
    send_key: bytes = field(repr=False)
    recv_key: bytes = field(repr=False)
    handshake_hash: bytes  # final h: the whole transcript
    session_tag: bytes  # 8 bytes, the same on both ends: names the session in logs


def _hkdf(chaining_key: bytes, ikm: bytes, outputs: int) -> list[bytes]:
    """Noise rev 34 section 4.3 HKDF: extract with ck as HMAC key, then chained HMAC expands."""
    prk = hmac.digest(chaining_key, ikm, "sha256")
    out: list[bytes] = []
    prev = b""
    for i in range(1, outputs + 1):
        prev = hmac.digest(prk, prev + bytes([i]), "sha256")
        out.append(prev)
    return out


class _SymmetricState:
    """Noise's SymmetricState (rev 34 section 5.2) with ChaCha20-Poly1305 and SHA-256."""

    def __init__(self, prologue: bytes) -> None:
        # The name is longer than HASHLEN, so InitializeSymmetric hashes it.
        self.h = hashlib.sha256(PROTOCOL_NAME).digest()
        self.ck = self.h
        self.k = b""
        self.n = 0
        self.mix_hash(prologue)

    def mix_hash(self, data: bytes) -> None:
        self.h = hashlib.sha256(self.h + data).digest()

    def mix_key(self, ikm: bytes) -> None:
        self.ck, self.k = _hkdf(self.ck, ikm, 2)
        self.n = 0

    def mix_key_and_hash(self, ikm: bytes) -> None:
        self.ck, temp_h, self.k = _hkdf(self.ck, ikm, 3)
        self.mix_hash(temp_h)
        self.n = 0

    def _nonce(self) -> bytes:
        nonce = bytes(4) + self.n.to_bytes(8, "little")
        self.n += 1
        return nonce

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = ChaCha20Poly1305(self.k).encrypt(self._nonce(), plaintext, self.h)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = ChaCha20Poly1305(self.k).decrypt(self._nonce(), ciphertext, self.h)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[bytes, bytes]:
        # Noise's Split feeds an empty input; feeding h binds the session keys to the full transcript.
        k_i2r, k_r2i = _hkdf(self.ck, self.h, 2)
        self.ck, self.k = b"", b""
        return k_i2r, k_r2i


def _raw(key: X25519PublicKey | MLKEM768PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _x25519(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:
        raise HandshakeError("the peer's X25519 ephemeral key is a low-order point (tampered message?)") from None


def is_initiator(own_identity: bytes, peer_identity: bytes) -> bool:
    """Both ends agree on roles without talking: the lexicographically smaller public key initiates."""
    if own_identity == peer_identity:
        raise HandshakeError(f"peer {short_id(peer_identity)} has our own identity; two nodes share one identity file")
    return own_identity < peer_identity


class Handshake:
    """One end of one handshake. The initiator calls start(); both feed received messages to receive()."""

    def __init__(
        self,
        *,
        initiator: bool,
        identity: Ed25519PrivateKey,
        prologue: bytes,
        psk: bytes | None = None,
        allowed_peers: frozenset[bytes] | None = None,
        expected_peer: bytes | None = None,
    ) -> None:
        if psk is not None and len(psk) != PSK_SIZE:
            raise HandshakeError(f"a network PSK is {PSK_SIZE} bytes, this one is {len(psk)}")
        if expected_peer is not None and len(expected_peer) != IDENTITY_SIZE:
            raise HandshakeError(f"expected_peer must be a {IDENTITY_SIZE}-byte public key, got {len(expected_peer)}")
        self._initiator = initiator
        self._identity = identity
        self._own_id = public_bytes(identity)
        self._allowed_peers = allowed_peers
        self._expected_peer = expected_peer
        self._sym = _SymmetricState(prologue)
        if psk is not None:
            self._sym.mix_key_and_hash(psk)
        self._state = HandshakeState.START
        self._e_x25519: X25519PrivateKey | None = None
        self._e_mlkem: MLKEM768PrivateKey | None = None
        self._result: HandshakeResult | None = None

    @property
    def state(self) -> HandshakeState:
        return self._state

    @property
    def complete(self) -> bool:
        return self._state is HandshakeState.DONE

    @property
    def result(self) -> HandshakeResult:
        if self._result is None:
            raise HandshakeError(f"handshake is not complete (state {self._state.name})")
        return self._result

    def start(self) -> bytes:
        """Initiator only: generate the ephemerals and return msg1."""
        with self._fail_on_error():
            if not self._initiator:
                raise HandshakeError("start() is for the initiator; the responder waits for message 1")
            if self._state is not HandshakeState.START:
                raise HandshakeError(f"start() called in state {self._state.name}; a handshake starts once")
            self._e_x25519 = X25519PrivateKey.generate()
            self._e_mlkem = MLKEM768PrivateKey.generate()
            msg1 = bytes([HANDSHAKE_VERSION]) + _raw(self._e_x25519.public_key()) + _raw(self._e_mlkem.public_key())
            self._sym.mix_hash(msg1)
            self._state = HandshakeState.SENT_INIT
            return msg1

    def receive(self, message: bytes) -> bytes | None:
        """Process one message from the peer; return the reply to send (msg2 or msg3), or None after msg3."""
        if self._state is HandshakeState.DONE:
            # Stays DONE: a duplicate forwarded by the relay must not tear down an authenticated session.
            raise HandshakeError("handshake already complete; ignoring a repeated handshake message")
        with self._fail_on_error():
            if self._state is HandshakeState.FAILED:
                raise HandshakeError("this handshake already failed; start a new one")
            if not isinstance(message, (bytes, bytearray, memoryview)):
                raise HandshakeError(f"a handshake message is bytes, got {type(message).__name__}")
            message = bytes(message)
            if len(message) > MAX_HANDSHAKE_SIZE:
                raise HandshakeError(f"handshake message of {len(message)} bytes exceeds {MAX_HANDSHAKE_SIZE}")
            if self._initiator and self._state is HandshakeState.SENT_INIT:
                return self._on_msg2(message)
            if not self._initiator and self._state is HandshakeState.START:
                return self._on_msg1(message)
            if not self._initiator and self._state is HandshakeState.SENT_RESPONSE:
                self._on_msg3(message)
                return None
            role = "initiator" if self._initiator else "responder"
            raise HandshakeError(f"unexpected handshake message for the {role} in state {self._state.name}")

    @contextmanager
    def _fail_on_error(self) -> Iterator[None]:
        try:
            yield
        except HandshakeError:
            self._fail()
            raise
        except (ValueError, TypeError, InvalidTag, InvalidSignature) as exc:
            # Call sites translate the failures they expect; this keeps the "only HandshakeError" promise.
            self._fail()
            raise HandshakeError(f"malformed handshake message: {exc or type(exc).__name__}") from exc

    def _fail(self) -> None:
        self._state = HandshakeState.FAILED
        self._e_x25519 = self._e_mlkem = None
        self._sym.ck = self._sym.k = b""

    def _on_msg1(self, message: bytes) -> bytes:
        _check_size(message, MSG1_SIZE, 1)
        if message[0] != HANDSHAKE_VERSION:
            raise HandshakeError(
                f"peer speaks handshake version {message[0]}, this node speaks {HANDSHAKE_VERSION}; "
                "upgrade the older node"
            )
        try:
            peer_kem = MLKEM768PublicKey.from_public_bytes(message[1 + X25519_SIZE :])
        except ValueError:
            raise HandshakeError("message 1 carries an invalid ML-KEM-768 key (tampered message?)") from None
        self._sym.mix_hash(message)
        ephemeral = X25519PrivateKey.generate()
        kem_secret, kem_ciphertext = peer_kem.encapsulate()
        clear = _raw(ephemeral.public_key()) + kem_ciphertext
        self._sym.mix_hash(clear)
        self._sym.mix_key(kem_secret + _x25519(ephemeral, message[1 : 1 + X25519_SIZE]))
        self._state = HandshakeState.SENT_RESPONSE
        return clear + self._sym.encrypt_and_hash(self._signed_identity())

    def _on_msg2(self, message: bytes) -> bytes:
        _check_size(message, MSG2_SIZE, 2)
        if self._e_x25519 is None or self._e_mlkem is None:
            raise HandshakeError("internal error: the initiator's ephemeral keys are gone")
        clear_end = X25519_SIZE + MLKEM_CIPHERTEXT_SIZE
        self._sym.mix_hash(message[:clear_end])
        # ML-KEM decapsulation never fails (implicit rejection): a forged ciphertext surfaces as a bad AEAD tag.
        kem_secret = self._e_mlkem.decapsulate(message[X25519_SIZE:clear_end])
        self._sym.mix_key(kem_secret + _x25519(self._e_x25519, message[:X25519_SIZE]))
        peer = self._verify_peer(message[clear_end:], 2)
        msg3 = self._sym.encrypt_and_hash(self._signed_identity())
        self._finish(peer)
        return msg3

    def _on_msg3(self, message: bytes) -> None:
        _check_size(message, MSG3_SIZE, 3)
        self._finish(self._verify_peer(message, 3))

    def _signed_identity(self) -> bytes:
        signed = _SIGNATURE_LABEL[self._initiator] + self._sym.h + self._own_id
        return self._own_id + self._identity.sign(signed)

    def _verify_peer(self, sealed: bytes, index: int) -> bytes:
        transcript = self._sym.h
        try:
            plaintext = self._sym.decrypt_and_hash(sealed)
        except InvalidTag:
            raise HandshakeError(
                f"PSK mismatch or tampered message: handshake message {index} does not decrypt (the peers use "
                "different network PSKs or session prologues, or the relay altered a message)"
            ) from None
        peer, signature = plaintext[:IDENTITY_SIZE], plaintext[IDENTITY_SIZE:]
        signed = _SIGNATURE_LABEL[not self._initiator] + transcript + peer
        try:
            Ed25519PublicKey.from_public_bytes(peer).verify(signature, signed)
        except (ValueError, InvalidSignature):
            raise HandshakeError(
                f"peer {short_id(peer)} did not prove its identity: its signature over the transcript is invalid"
            ) from None
        if peer == self._own_id:
            raise HandshakeError("the peer proved our own identity: a reflected handshake or a shared identity file")
        if self._expected_peer is not None and peer != self._expected_peer:
            raise HandshakeError(
                f"relay introduced {short_id(self._expected_peer)} but the peer proved identity {short_id(peer)}"
            )
        if self._allowed_peers is not None and peer not in self._allowed_peers:
            raise HandshakeError(f"peer {short_id(peer)} is not in your members allow-list")
        return peer

    def _finish(self, peer: bytes) -> None:
        handshake_hash = self._sym.h
        k_i2r, k_r2i = self._sym.split()
        send, recv = (k_i2r, k_r2i) if self._initiator else (k_r2i, k_i2r)
        tag = hashlib.sha256(b"traversal session tag\x00" + k_i2r + k_r2i).digest()[:SESSION_TAG_SIZE]
        self._result = HandshakeResult(peer, send, recv, handshake_hash, tag)
        self._e_x25519 = self._e_mlkem = None  # forward secrecy: nothing left that opens this session
        self._state = HandshakeState.DONE


def _check_size(message: bytes, size: int, index: int) -> None:
    if len(message) != size:
        raise HandshakeError(f"handshake message {index} must be {size} bytes, got {len(message)}")
