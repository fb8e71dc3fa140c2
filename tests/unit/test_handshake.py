"""Tests for transport/handshake.py: the end-to-end handshake, driven message by message, with a hostile relay."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from transport.constants import MAX_HANDSHAKE_SIZE
from transport.handshake import (
    HANDSHAKE_OVERHEAD,
    HANDSHAKE_VERSION,
    MLKEM_PUBLIC_SIZE,
    MSG1_SIZE,
    MSG2_SIZE,
    MSG3_SIZE,
    SESSION_TAG_SIZE,
    X25519_SIZE,
    Handshake,
    HandshakeError,
    HandshakeResult,
    HandshakeState,
    is_initiator,
)
from transport.identity import generate_psk, public_bytes

PROLOGUE = b"traversal/1\x00chr-001\x00" + bytes(range(16))

Relay = Callable[[int, bytes], bytes | None]  # (message index 1..3, message) -> forwarded message or None (dropped)


def _forward(index: int, message: bytes) -> bytes | None:
    return message


class Peers:
    """An initiator/responder pair with fresh identities; keyword arguments go to both ends unless prefixed."""

    def __init__(self, **kwargs: object) -> None:
        self.i_key = Ed25519PrivateKey.generate()
        self.r_key = Ed25519PrivateKey.generate()
        self.i_id, self.r_id = public_bytes(self.i_key), public_bytes(self.r_key)
        self.kwargs = kwargs

    def make(self) -> tuple[Handshake, Handshake]:
        def side(prefix: str) -> dict[str, object]:
            common = {k: v for k, v in self.kwargs.items() if not k.startswith(("i_", "r_"))}
            own = {k[2:]: v for k, v in self.kwargs.items() if k.startswith(prefix)}
            return {"prologue": PROLOGUE, **common, **own}

        initiator = Handshake(initiator=True, identity=self.i_key, **side("i_"))  # type: ignore[arg-type]
        responder = Handshake(initiator=False, identity=self.r_key, **side("r_"))  # type: ignore[arg-type]
        return initiator, responder


def run(initiator: Handshake, responder: Handshake, relay: Relay = _forward) -> list[bytes]:
    """Drive a handshake to its end through ``relay``; returns the messages as sent. Raises HandshakeError."""
    sent = [initiator.start()]
    forwarded = relay(1, sent[0])
    if forwarded is None:
        return sent
    msg2 = responder.receive(forwarded)
    assert msg2 is not None
    sent.append(msg2)
    forwarded = relay(2, msg2)
    if forwarded is None:
        return sent
    msg3 = initiator.receive(forwarded)
    assert msg3 is not None
    sent.append(msg3)
    forwarded = relay(3, msg3)
    if forwarded is not None:
        assert responder.receive(forwarded) is None
    return sent


def assert_matched(initiator: Handshake, responder: Handshake) -> tuple[HandshakeResult, HandshakeResult]:
    a, b = initiator.result, responder.result
    assert a.send_key == b.recv_key and a.recv_key == b.send_key and a.send_key != a.recv_key
    assert a.handshake_hash == b.handshake_hash and a.session_tag == b.session_tag
    return a, b


def flip(message: bytes, bit: int) -> bytes:
    out = bytearray(message)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


# --- success ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("psk", [None, generate_psk()], ids=["no-psk", "psk"])
def test_handshake_completes_with_crosswise_keys(psk: bytes | None) -> None:
    peers = Peers(psk=psk)
    initiator, responder = peers.make()
    run(initiator, responder)
    assert initiator.complete and responder.complete
    assert initiator.state is responder.state is HandshakeState.DONE
    a, b = assert_matched(initiator, responder)
    assert a.peer_identity == peers.r_id and b.peer_identity == peers.i_id
    assert len(a.send_key) == len(a.recv_key) == len(a.handshake_hash) == 32
    assert len(a.session_tag) == SESSION_TAG_SIZE
    assert "send_key" not in repr(a) and a.send_key.hex() not in repr(a)
    # Ephemeral private keys are dropped once done (forward secrecy).
    for side in (initiator, responder):
        assert side._e_x25519 is None and side._e_mlkem is None


def test_expected_peer_and_allow_list_accept_the_right_peer() -> None:
    peers = Peers()
    peers.kwargs.update(
        i_expected_peer=peers.r_id,
        i_allowed_peers=frozenset({peers.r_id}),
        r_expected_peer=peers.i_id,
        r_allowed_peers=frozenset({peers.i_id}),
    )
    initiator, responder = peers.make()
    run(initiator, responder)
    assert_matched(initiator, responder)


def test_keys_differ_per_run() -> None:
    peers = Peers()
    results = []
    for _ in range(2):
        initiator, responder = peers.make()
        run(initiator, responder)
        results.append(initiator.result)
    assert results[0].send_key != results[1].send_key
    assert results[0].recv_key != results[1].recv_key
    assert results[0].handshake_hash != results[1].handshake_hash
    assert results[0].session_tag != results[1].session_tag


def test_message_sizes_match_constants() -> None:
    initiator, responder = Peers().make()
    sizes = [len(m) for m in run(initiator, responder)]
    assert sizes == [MSG1_SIZE, MSG2_SIZE, MSG3_SIZE] == [1217, 1232, 112]
    assert sum(sizes) == HANDSHAKE_OVERHEAD == 2561
    assert max(sizes) <= MAX_HANDSHAKE_SIZE
    print(f"handshake bytes on the wire: {sizes} = {sum(sizes)}")


def test_is_initiator_is_deterministic_and_complementary() -> None:
    a, b = bytes(31) + b"\x01", bytes(31) + b"\x02"
    assert is_initiator(a, b) and not is_initiator(b, a)
    with pytest.raises(HandshakeError, match="own identity"):
        is_initiator(a, a)


# --- PSK, prologue, authorisation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("i_psk", "r_psk"),
    [(generate_psk(), generate_psk()), (generate_psk(), None), (None, generate_psk())],
    ids=["different", "initiator-only", "responder-only"],
)
def test_psk_mismatch_fails_at_first_encrypted_message(i_psk: bytes | None, r_psk: bytes | None) -> None:
    initiator, responder = Peers(i_psk=i_psk, r_psk=r_psk).make()
    with pytest.raises(HandshakeError, match="PSK mismatch or tampered message"):
        run(initiator, responder)
    assert initiator.state is HandshakeState.FAILED
    assert not responder.complete  # it never gets a msg3


def test_psk_mismatch_detected_by_responder_too() -> None:
    # A msg3 built under another PSK (here: by a genuine run under PSK A) must not open under PSK B.
    psk_a, psk_b = generate_psk(), generate_psk()
    peers = Peers(psk=psk_a)
    initiator, responder = peers.make()
    msg1, _, msg3 = run(initiator, responder)
    peers.kwargs["psk"] = psk_b
    _, other = peers.make()
    other.receive(msg1)
    with pytest.raises(HandshakeError, match="PSK mismatch or tampered message"):
        other.receive(msg3)
    assert other.state is HandshakeState.FAILED


def test_different_prologue_fails() -> None:
    initiator, responder = Peers(r_prologue=PROLOGUE[:-1] + b"\xff").make()
    with pytest.raises(HandshakeError, match="PSK mismatch or tampered message"):
        run(initiator, responder)


def test_responder_rejects_non_member() -> None:
    peers = Peers(r_allowed_peers=frozenset({bytes(32)}))
    initiator, responder = peers.make()
    with pytest.raises(HandshakeError, match="not in your members allow-list"):
        run(initiator, responder)
    assert initiator.complete and responder.state is HandshakeState.FAILED


def test_initiator_rejects_non_member_before_revealing_itself() -> None:
    initiator, responder = Peers(i_allowed_peers=frozenset()).make()
    msg1 = initiator.start()
    msg2 = responder.receive(msg1)
    assert msg2 is not None
    with pytest.raises(HandshakeError, match="not in your members allow-list"):
        initiator.receive(msg2)
    assert initiator.state is HandshakeState.FAILED


@pytest.mark.parametrize("side", ["i", "r"])
def test_expected_peer_mismatch_fails(side: str) -> None:
    claimed = public_bytes(Ed25519PrivateKey.generate())
    initiator, responder = Peers(**{f"{side}_expected_peer": claimed}).make()
    with pytest.raises(HandshakeError, match=r"relay introduced .* but the peer proved identity"):
        run(initiator, responder)
    assert (initiator if side == "i" else responder).state is HandshakeState.FAILED


def test_peer_with_our_own_identity_fails() -> None:
    key = Ed25519PrivateKey.generate()
    initiator = Handshake(initiator=True, identity=key, prologue=PROLOGUE)
    responder = Handshake(initiator=False, identity=key, prologue=PROLOGUE)
    with pytest.raises(HandshakeError, match="our own identity"):
        run(initiator, responder)


def test_bad_constructor_arguments() -> None:
    key = Ed25519PrivateKey.generate()
    with pytest.raises(HandshakeError, match="PSK is 32 bytes"):
        Handshake(initiator=True, identity=key, prologue=PROLOGUE, psk=b"short")
    with pytest.raises(HandshakeError, match="expected_peer"):
        Handshake(initiator=True, identity=key, prologue=PROLOGUE, expected_peer=b"short")


# --- a hostile relay ----------------------------------------------------------------------------------------------

_FLIPS = [
    (1, 0),  # version byte
    (1, 8 * 1 + 3),  # initiator X25519 key
    (1, 8 * X25519_SIZE + 7),  # X25519 ignores this top bit (RFC 7748); only the transcript catches it
    (1, 8 * (1 + X25519_SIZE) + 5),  # ML-KEM encapsulation key, first byte
    (1, 8 * (1 + X25519_SIZE + MLKEM_PUBLIC_SIZE // 2)),  # ML-KEM encapsulation key, middle
    (1, 8 * MSG1_SIZE - 1),  # ML-KEM encapsulation key, last bit (inside the 32-byte seed rho)
    (2, 0),  # responder X25519 key
    (2, 8 * X25519_SIZE - 1),  # responder X25519 top bit
    (2, 8 * (X25519_SIZE + 1)),  # ML-KEM ciphertext, start
    (2, 8 * (X25519_SIZE + 1087) + 6),  # ML-KEM ciphertext, end
    (2, 8 * (X25519_SIZE + 1088) + 2),  # encrypted identity
    (2, 8 * (X25519_SIZE + 1088 + 32 + 10)),  # encrypted signature
    (2, 8 * MSG2_SIZE - 1),  # AEAD tag
    (3, 0),  # encrypted identity
    (3, 8 * 40),  # encrypted signature
    (3, 8 * MSG3_SIZE - 1),  # AEAD tag
]


@pytest.mark.parametrize(("index", "bit"), _FLIPS)
def test_any_flipped_bit_fails(index: int, bit: int) -> None:
    initiator, responder = Peers().make()

    def relay(i: int, message: bytes) -> bytes:
        return flip(message, bit) if i == index else message

    with pytest.raises(HandshakeError):
        run(initiator, responder, relay)
    assert not responder.complete
    assert HandshakeState.FAILED in (initiator.state, responder.state)
    if index < 3:
        assert not initiator.complete


@pytest.mark.parametrize("dropped", [1, 2, 3])
def test_dropped_message_means_no_completion(dropped: int) -> None:
    initiator, responder = Peers().make()
    run(initiator, responder, lambda i, m: None if i == dropped else m)
    assert not responder.complete
    assert initiator.complete == (dropped == 3)  # the caller's timeout covers a lost msg3


@pytest.mark.parametrize(("index", "delta"), [(i, d) for i in (1, 2, 3) for d in (-1, 1, -16)])
def test_truncated_or_extended_message_fails(index: int, delta: int) -> None:
    initiator, responder = Peers().make()

    def relay(i: int, message: bytes) -> bytes:
        if i != index:
            return message
        return message[:delta] if delta < 0 else message + b"\x00" * delta

    with pytest.raises(HandshakeError, match=f"message {index} must be"):
        run(initiator, responder, relay)


def test_replayed_msg1_then_msg3_from_an_old_run_fails() -> None:
    peers = Peers()
    msg1, _, msg3 = run(*peers.make())
    _, responder = peers.make()
    assert responder.receive(msg1) is not None  # a responder cannot tell a replayed msg1; it answers with fresh keys
    with pytest.raises(HandshakeError, match="PSK mismatch or tampered message"):
        responder.receive(msg3)
    assert not responder.complete


def test_replayed_msg2_from_an_old_run_fails() -> None:
    peers = Peers()
    _, msg2, _ = run(*peers.make())
    initiator, _ = peers.make()
    initiator.start()
    with pytest.raises(HandshakeError, match="PSK mismatch or tampered message"):
        initiator.receive(msg2)
    assert initiator.state is HandshakeState.FAILED


def test_replayed_msg3_into_a_new_run_fails() -> None:
    peers = Peers()
    _, _, old_msg3 = run(*peers.make())
    initiator, responder = peers.make()
    with pytest.raises(HandshakeError, match="PSK mismatch or tampered message"):
        run(initiator, responder, lambda i, m: old_msg3 if i == 3 else m)
    assert not responder.complete


def test_low_order_x25519_key_fails() -> None:
    _, responder = Peers().make()
    msg1 = bytes([HANDSHAKE_VERSION]) + bytes(X25519_SIZE) + Peers().make()[0].start()[1 + X25519_SIZE :]
    with pytest.raises(HandshakeError, match="low-order"):
        responder.receive(msg1)


def _mitm(peers: Peers, psk: bytes | None = None) -> tuple[Handshake, Handshake, Handshake, Handshake]:
    """A relay that splices itself in: it answers the initiator and initiates to the responder as itself."""
    relay_key = Ed25519PrivateKey.generate()
    initiator, responder = peers.make()
    fake_responder = Handshake(initiator=False, identity=relay_key, prologue=PROLOGUE, psk=psk)
    fake_initiator = Handshake(initiator=True, identity=relay_key, prologue=PROLOGUE, psk=psk)
    msg2 = fake_responder.receive(initiator.start())
    msg2b = responder.receive(fake_initiator.start())
    assert msg2 is not None and msg2b is not None
    try:
        msg3b = fake_initiator.receive(msg2b)
        assert msg3b is not None
        responder.receive(msg3b)
    finally:
        msg3 = initiator.receive(msg2)
        assert msg3 is not None
        fake_responder.receive(msg3)
    return initiator, responder, fake_initiator, fake_responder


def test_mitm_refused_by_expected_peer() -> None:
    peers = Peers()
    peers.kwargs.update(i_expected_peer=peers.r_id, r_expected_peer=peers.i_id)
    with pytest.raises(HandshakeError, match="relay introduced"):
        _mitm(peers)


def test_mitm_refused_by_allow_list() -> None:
    peers = Peers()
    peers.kwargs["allowed_peers"] = frozenset({peers.i_id, peers.r_id})
    with pytest.raises(HandshakeError, match="not in your members allow-list"):
        _mitm(peers)


def test_mitm_without_psk_refused_by_psk() -> None:
    with pytest.raises(HandshakeError, match="PSK mismatch"):
        _mitm(Peers(psk=generate_psk()))


def test_mitm_succeeds_only_when_the_peer_trusts_the_relay() -> None:
    # Documented trust mode (DESIGN.md "Trust"): no allow-list, no PSK, no expected peer. Then the peers see
    # the relay's identity, never each other's, so the splice is visible in status, not silent.
    peers = Peers()
    initiator, responder, *_ = _mitm(peers)
    assert initiator.result.peer_identity not in (peers.r_id, peers.i_id)
    assert responder.result.peer_identity not in (peers.r_id, peers.i_id)


# --- misuse and arbitrary input -----------------------------------------------------------------------------------


def test_wrong_state_calls_raise() -> None:
    initiator, responder = Peers().make()
    with pytest.raises(HandshakeError, match="not complete"):
        _ = initiator.result
    with pytest.raises(HandshakeError, match="for the initiator"):
        responder.start()
    assert responder.state is HandshakeState.FAILED
    with pytest.raises(HandshakeError, match="already failed"):
        responder.receive(b"x" * MSG1_SIZE)

    initiator, _ = Peers().make()
    with pytest.raises(HandshakeError, match="unexpected handshake message"):
        initiator.receive(b"x" * MSG2_SIZE)  # before start()
    initiator, _ = Peers().make()
    initiator.start()
    with pytest.raises(HandshakeError, match="starts once"):
        initiator.start()

    initiator, responder = Peers().make()
    msg1 = initiator.start()
    msg2 = responder.receive(msg1)
    assert msg2 is not None
    with pytest.raises(HandshakeError, match="must be"):
        responder.receive(msg1)  # msg1 again where msg3 is due
    msg3 = initiator.receive(msg2)
    assert msg3 is not None
    with pytest.raises(HandshakeError, match="already complete"):
        initiator.receive(msg2)
    assert initiator.complete  # a duplicate does not tear down a finished handshake
    with pytest.raises(HandshakeError, match="is bytes"):
        Peers().make()[1].receive("text")  # type: ignore[arg-type]
    with pytest.raises(HandshakeError, match="exceeds"):
        Peers().make()[1].receive(bytes(MAX_HANDSHAKE_SIZE + 1))


def _sized(size: int) -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, biased to exact message sizes (and the right version byte) so parsing goes deep."""
    exact = st.binary(min_size=size, max_size=size)
    versioned = st.binary(min_size=size - 1, max_size=size - 1).map(lambda b: bytes([HANDSHAKE_VERSION]) + b)
    return st.one_of(st.binary(max_size=2 * size), exact, versioned)


# A valid encapsulation key, so fuzzed msg1s also reach encapsulation and the X25519 exchange.
_REAL_KEM_KEY = Peers().make()[0].start()[1 + X25519_SIZE :]


@settings(max_examples=150, deadline=None)
@given(
    data=st.one_of(
        _sized(MSG1_SIZE),
        st.binary(min_size=X25519_SIZE, max_size=X25519_SIZE).map(
            lambda x: bytes([HANDSHAKE_VERSION]) + x + _REAL_KEM_KEY
        ),
        st.sampled_from([bytes(X25519_SIZE), b"\x01" + bytes(X25519_SIZE - 1)]).map(
            lambda x: bytes([HANDSHAKE_VERSION]) + x + _REAL_KEM_KEY
        ),
    )
)
def test_fresh_responder_only_raises_handshake_error(data: bytes) -> None:
    _, responder = Peers().make()
    try:
        reply = responder.receive(data)
    except HandshakeError:
        assert responder.state is HandshakeState.FAILED
    else:
        assert reply is not None and len(reply) == MSG2_SIZE and not responder.complete


@settings(max_examples=150, deadline=None)
@given(data=st.one_of(_sized(MSG2_SIZE), _sized(MSG3_SIZE)))
def test_waiting_initiator_only_raises_handshake_error(data: bytes) -> None:
    initiator, _ = Peers().make()
    initiator.start()
    with pytest.raises(HandshakeError):
        initiator.receive(data)
    assert initiator.state is HandshakeState.FAILED and not initiator.complete
    with pytest.raises(HandshakeError):
        initiator.receive(data)
