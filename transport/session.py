"""The sans-I/O data session between two peers, after their end-to-end handshake.

It seals and opens the records carried in session frames (DATA, HEARTBEAT,
REKEY, BYE, PATH, CANDIDATES), rejects replays, ratchets keys in-band, measures
round-trip time and notices a silent peer. Like aioquic's ``QuicConnection`` it
does no I/O and reads no clock: time is an argument, results are bytes and
:class:`SessionEvent` dataclasses, and :meth:`Session.next_deadline` tells the
driver when to call :meth:`Session.handle_timer`.

Sealed payload (the ``payload`` of a :class:`~transport.frames.SessionFrame`)::

    epoch (1 byte, mod 256) | counter (8 bytes, big-endian) | ChaCha20-Poly1305 ciphertext + 16-byte tag

* nonce = 4 zero bytes + counter; associated data = ``WIRE_VERSION, kind,
  epoch, counter``, so a relay can change neither a record's type nor its
  header without the tag failing.
* One 64-bit counter space per direction, never reset on rekey, so a single
  :class:`~transport.replay.ReplayWindow` per direction covers every epoch and
  every path: a record sent on two paths during a path switch is accepted once.
  The (key, nonce) pair never repeats because the counter never repeats.
* Key rotation: each side ratchets only its own send key,
  ``next = HKDF-SHA256(current, info=b"traversal rekey v1")``, after
  ``key_rotation_interval`` or ``rekey_after_messages`` records, and announces
  it with a REKEY record sealed under the new key (so an idle link rotates too).
  The receiver follows when a record with an epoch up to ``MAX_EPOCHS_AHEAD``
  ahead of its own authenticates (a whole epoch's records, REKEY included, can
  be lost in a relay outage), and keeps the previous key
  ``PREVIOUS_KEY_GRACE`` seconds for records still in flight. Old keys are
  dropped (forward secrecy within the session); Python cannot scrub memory, so "dropped" means no reference is kept.

Driver contract: after every call into the session (``receive``,
``handle_timer``, ``seal``/``send_frame``, ``close``), drain
:meth:`Session.records_to_send` and send what it returns. While output is
waiting, :meth:`Session.next_deadline` returns a deadline already due.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from transport.constants import (
    DEAD_PEER_TIMEOUT,
    HEARTBEAT_INTERVAL,
    KEY_ROTATION_INTERVAL,
    MAX_EPOCHS_AHEAD,
    MAX_REASON,
    PREVIOUS_KEY_GRACE,
    REKEY_AFTER_MESSAGES,
    REPLAY_WINDOW_SIZE,
    WIRE_VERSION,
)
from transport.frames import MAX_SESSION_PAYLOAD, SEALED_TYPES, MsgType
from transport.replay import MAX_COUNTER, ReplayWindow

KEY_SIZE = 32
TAG_SIZE = 16
HEADER_SIZE = 9  # epoch + counter
#: Smallest well-formed sealed payload: a header and the tag of an empty plaintext.
MIN_SEALED_SIZE = HEADER_SIZE + TAG_SIZE
#: Largest plaintext whose sealed payload still fits in one session frame.
MAX_PLAINTEXT = MAX_SESSION_PAYLOAD - MIN_SEALED_SIZE

REKEY_INFO = b"traversal rekey v1"

HEARTBEAT_REQUEST = 0
HEARTBEAT_REPLY = 1
#: Heartbeat requests whose reply we still wait for. A reply later than this
#: many intervals says nothing useful about the path's current RTT.
MAX_OUTSTANDING_HEARTBEATS = 4

# Reasons carried by RecordDropped, one counter in SessionStats each.
DROP_MALFORMED = "malformed"  # wrong kind, size out of bounds, bad sealed body
DROP_REPLAY = "replay"  # duplicate counter, or older than the replay window
DROP_EPOCH = "epoch"  # key epoch not current, next, or previous within grace
DROP_AUTH = "auth"  # AEAD tag did not verify (tampered, forged, wrong kind)
DROP_CLOSED = "closed"  # session already closed

_HEADER = struct.Struct("!BQ")
_HEARTBEAT = struct.Struct("!BQd")  # flag, id, sender's timestamp (IEEE double)
_NONCE_PREFIX = bytes(4)
#: Associated-data prefix per kind, built once: the hot path only concatenates.
_AAD_PREFIX: dict[int, bytes] = {kind: bytes([WIRE_VERSION, kind]) for kind in SEALED_TYPES}
_AAD_DATA = _AAD_PREFIX[MsgType.DATA]


class SessionError(Exception):
    """Misuse of a session by the local program (bad key, kind or size); the message says what."""


class SessionClosedError(SessionError):
    """The session is closed (by us or by the peer's BYE): a new handshake is needed to send."""


class CounterExhaustedError(SessionError):
    """All 2^64 counters of this direction are used: run a new handshake to get fresh keys."""


# --- events --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FrameReceived:
    """A DATA record opened: ``frame`` is the Ethernet frame to write to the TAP."""

    frame: bytes


@dataclass(frozen=True, slots=True)
class RecordReceived:
    """A PATH or CANDIDATES record opened; upper layers interpret ``plaintext``."""

    kind: MsgType
    plaintext: bytes


@dataclass(frozen=True, slots=True)
class HeartbeatRtt:
    """A heartbeat reply came back after ``rtt`` seconds."""

    rtt: float


@dataclass(frozen=True, slots=True)
class KeyRotated:
    """A key ratcheted: ``direction`` is "send" or "recv"; ``epoch`` counts rotations (not mod 256)."""

    direction: str
    epoch: int


@dataclass(frozen=True, slots=True)
class PeerClosed:
    """The peer sent BYE; the session is closed."""

    reason: str


@dataclass(frozen=True, slots=True)
class PeerDead:
    """No authenticated record for ``silent_for`` seconds. Reported once per silence."""

    silent_for: float


@dataclass(frozen=True, slots=True)
class RecordDropped:
    """A received payload was discarded; ``reason`` is one of the ``DROP_*`` strings."""

    reason: str


SessionEvent = FrameReceived | RecordReceived | HeartbeatRtt | KeyRotated | PeerClosed | PeerDead | RecordDropped


@dataclass(slots=True)
class SessionStats:
    """Counters for ``traversal status``. Byte counts are sealed payload sizes (what the path carries)."""

    last_received: float
    tx_records: int = 0
    rx_records: int = 0
    tx_bytes: int = 0
    rx_bytes: int = 0
    dropped_replay: int = 0
    dropped_auth: int = 0
    dropped_malformed: int = 0
    dropped_epoch: int = 0
    dropped_closed: int = 0
    rekeys_sent: int = 0
    rekeys_received: int = 0
    last_rtt: float | None = None


def _next_key(key: bytes) -> bytes:
    return HKDF(algorithm=SHA256(), length=KEY_SIZE, salt=None, info=REKEY_INFO).derive(key)


def _check_key(key: bytes, what: str) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_SIZE:
        raise SessionError(f"{what} must be {KEY_SIZE} bytes from the handshake")
    return bytes(key)


class Session:
    """Sealing, opening, replay protection, rekeying and liveness for one peer.

    Heartbeat requests go out every ``heartbeat_interval`` whether or not data
    flows: a DATA-only link would otherwise never refresh its RTT, which the
    path logic needs to compare paths, and the cost is one 42-byte record per
    interval. The peer answers each request at once, so both sides also hear
    from each other at least once per interval and ``dead_peer_timeout``
    (three intervals by default) means three missed heartbeats.
    """

    def __init__(
        self,
        *,
        send_key: bytes,
        recv_key: bytes,
        now: float,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        dead_peer_timeout: float = DEAD_PEER_TIMEOUT,
        key_rotation_interval: float = KEY_ROTATION_INTERVAL,
        rekey_after_messages: int = REKEY_AFTER_MESSAGES,
        previous_key_grace: float = PREVIOUS_KEY_GRACE,
        replay_window_size: int = REPLAY_WINDOW_SIZE,
    ) -> None:
        send_key = _check_key(send_key, "send key")
        recv_key = _check_key(recv_key, "recv key")
        if send_key == recv_key:
            # One key both ways would let a relay reflect our own records back to us.
            raise SessionError("send and recv keys are equal: the handshake must derive one key per direction")
        if heartbeat_interval <= 0 or dead_peer_timeout <= 0 or key_rotation_interval <= 0 or previous_key_grace < 0:
            raise SessionError("session intervals must be positive")
        if rekey_after_messages < 1:
            raise SessionError(f"rekey_after_messages must be at least 1, got {rekey_after_messages}")

        self._heartbeat_interval = heartbeat_interval
        self._dead_peer_timeout = dead_peer_timeout
        self._key_rotation_interval = key_rotation_interval
        self._rekey_after_messages = rekey_after_messages
        self._previous_key_grace = previous_key_grace

        # send direction
        self._send_key: bytes | None = send_key
        self._send_aead: ChaCha20Poly1305 | None = ChaCha20Poly1305(send_key)
        self._send_epoch = 0
        self._send_counter = 0
        self._send_key_records = 0
        self._send_rotate_at = now + key_rotation_interval

        # receive direction: current key, lazily derived next key, previous key in grace
        self._recv_key: bytes | None = recv_key
        self._recv_aead: ChaCha20Poly1305 | None = ChaCha20Poly1305(recv_key)
        self._recv_epoch = 0
        # Keys of epochs current+1, current+2, ... derived on demand and cached, so
        # forged "future epoch" records cost an AEAD check, not fresh HKDFs each.
        self._ahead: list[tuple[bytes, ChaCha20Poly1305]] = []
        self._prev_aead: ChaCha20Poly1305 | None = None
        self._prev_expires = 0.0
        self._replay = ReplayWindow(replay_window_size)

        # liveness
        self._next_heartbeat = now + heartbeat_interval
        self._heartbeat_seq = 0
        self._outstanding: dict[int, float] = {}  # heartbeat id -> when sent
        self._dead_reported = False

        self._closed = False
        self._outgoing: list[tuple[MsgType, bytes]] = []
        self._output_since = 0.0  # when the oldest record in _outgoing was queued
        self._events: list[SessionEvent] = []
        self.stats = SessionStats(last_received=now)

    # --- public API -----------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def has_output(self) -> bool:
        """True when records_to_send() has something (e.g. a REKEY queued by seal)."""
        return bool(self._outgoing)

    @property
    def send_epoch(self) -> int:
        return self._send_epoch

    @property
    def recv_epoch(self) -> int:
        return self._recv_epoch

    def set_intervals(self, *, heartbeat_interval: float, key_rotation_interval: float, now: float) -> None:
        """Adopt the intervals the relay announced in ESTABLISHED (the seed's fields).

        The dead-peer timeout keeps its ratio to the heartbeat interval.
        """
        if heartbeat_interval <= 0 or key_rotation_interval <= 0:
            raise SessionError("session intervals must be positive")
        self._dead_peer_timeout *= heartbeat_interval / self._heartbeat_interval
        self._heartbeat_interval = heartbeat_interval
        self._key_rotation_interval = key_rotation_interval
        self._next_heartbeat = min(self._next_heartbeat, now + heartbeat_interval)
        self._send_rotate_at = min(self._send_rotate_at, now + key_rotation_interval)

    def ping(self, now: float) -> None:
        """Queue a heartbeat request now (e.g. to confirm the peer still holds these keys)."""
        if not self._closed:
            self._send_heartbeat_request(now)

    def seal(self, kind: MsgType, plaintext: bytes, now: float) -> bytes:
        """Seal ``plaintext`` as a record of ``kind``; returns the payload for a SessionFrame.

        Raises :class:`SessionClosedError`, :class:`CounterExhaustedError`, or
        :class:`SessionError` for a kind that is not sealed or an oversized plaintext.
        """
        aad_prefix = _AAD_PREFIX.get(kind)
        if aad_prefix is None:
            raise SessionError(f"{kind!r} is not a sealed record kind")
        return self._seal(aad_prefix, plaintext, now)

    def send_frame(self, frame: bytes, now: float) -> bytes:
        """Seal one Ethernet frame as DATA (the hot path)."""
        return self._seal(_AAD_DATA, frame, now)

    def receive(self, kind: MsgType, payload: bytes, now: float) -> list[SessionEvent]:
        """Open one sealed payload of ``kind`` and return what it means.

        Never raises on network input: anything that does not authenticate, is
        replayed or malformed becomes a :class:`RecordDropped` event and a count.
        """
        if self._closed:
            return self._drop(DROP_CLOSED)
        aad_prefix = _AAD_PREFIX.get(kind)
        size = len(payload)
        if aad_prefix is None or size < MIN_SEALED_SIZE or size > MAX_SESSION_PAYLOAD:
            return self._drop(DROP_MALFORMED)
        header = bytes(payload[:HEADER_SIZE])
        epoch_byte, counter = _HEADER.unpack(header)
        # Cheap rejection before any crypto; the window moves only after the tag verifies.
        if not self._replay.check(counter):
            return self._drop(DROP_REPLAY)

        distance = (epoch_byte - self._recv_epoch) & 0xFF
        if distance == 0:
            aead = self._recv_aead
        elif distance <= MAX_EPOCHS_AHEAD:
            aead = self._key_ahead(distance)
        elif distance == 0xFF and self._prev_aead is not None and now < self._prev_expires:
            aead = self._prev_aead
        else:
            return self._drop(DROP_EPOCH)
        assert aead is not None
        try:
            plaintext = aead.decrypt(_NONCE_PREFIX + header[1:], bytes(payload[HEADER_SIZE:]), aad_prefix + header)
        except InvalidTag:
            return self._drop(DROP_AUTH)

        self._accept(counter, size, now)
        events, self._events = self._events, []
        if distance and distance <= MAX_EPOCHS_AHEAD:
            self._advance_recv(distance, now)
            events.append(KeyRotated("recv", self._recv_epoch))

        if kind == MsgType.DATA:
            events.append(FrameReceived(plaintext))
        elif kind == MsgType.HEARTBEAT:
            self._on_heartbeat(plaintext, now, events)
        elif kind == MsgType.BYE:
            reason = plaintext[:MAX_REASON].decode("utf-8", errors="replace")
            self._shut()
            events.append(PeerClosed(reason))
        elif kind != MsgType.REKEY:
            # REKEY's whole message is the epoch it authenticated under (handled above).
            events.append(RecordReceived(MsgType(kind), plaintext))
        return events

    def open_data(self, payload: bytes, now: float) -> bytes | None:
        """The hot path for DATA: the Ethernet frame, or None to say "use :meth:`receive`".

        Accepts only the common case (session open, current key epoch, counter new to the
        replay window, tag valid) and then does exactly what :meth:`receive` would; anything
        else (a key rotation, a replay, a forgery, a closed session) returns None having
        changed nothing, so :meth:`receive` handles and counts it as usual.
        """
        size = len(payload)
        if self._closed or size < MIN_SEALED_SIZE or size > MAX_SESSION_PAYLOAD or self._events:
            return None
        epoch_byte, counter = _HEADER.unpack_from(payload)
        if epoch_byte != self._recv_epoch & 0xFF or not self._replay.check(counter):
            return None
        header = payload[:HEADER_SIZE]
        try:
            plaintext = self._recv_aead.decrypt(  # type: ignore[union-attr]
                _NONCE_PREFIX + header[1:], payload[HEADER_SIZE:], _AAD_DATA + header
            )
        except InvalidTag:
            return None
        self._accept(counter, size, now)
        return plaintext

    def close(self, reason: str, now: float) -> bytes:
        """Seal a BYE carrying ``reason`` (truncated to MAX_REASON bytes) and close the session."""
        raw = reason.encode("utf-8")[:MAX_REASON]
        # Cut at a character boundary so the peer does not see a replacement character.
        raw = raw.decode("utf-8", errors="ignore").encode("utf-8")
        bye = self._seal(_AAD_PREFIX[MsgType.BYE], raw, now)
        self._shut()
        return bye

    def handle_timer(self, now: float) -> list[SessionEvent]:
        """Do whatever is due at ``now``: erase an expired previous key, rotate, heartbeat, check liveness."""
        events, self._events = self._events, []
        if self._closed:
            return events
        if self._prev_aead is not None and now >= self._prev_expires:
            self._prev_aead = None
        try:
            if now >= self._send_rotate_at:
                self._rotate_send(now)
            if now >= self._next_heartbeat:
                self._send_heartbeat_request(now)
        except CounterExhaustedError:
            # Nothing more can be sealed; seal() tells the caller, who must re-handshake.
            self._next_heartbeat = self._send_rotate_at = float("inf")
        events.extend(self._events)
        self._events.clear()
        silent_for = now - self.stats.last_received
        if not self._dead_reported and silent_for >= self._dead_peer_timeout:
            self._dead_reported = True
            events.append(PeerDead(silent_for))
        return events

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` should next run; None once the session is closed."""
        if self._closed:
            return None
        deadline = min(self._next_heartbeat, self._send_rotate_at)
        if not self._dead_reported:
            deadline = min(deadline, self.stats.last_received + self._dead_peer_timeout)
        if self._prev_aead is not None:
            deadline = min(deadline, self._prev_expires)
        if self._outgoing or self._events:
            deadline = min(deadline, self._output_since)
        return deadline

    def records_to_send(self) -> list[tuple[MsgType, bytes]]:
        """Sealed records the session produced itself (heartbeats, replies, REKEY), oldest first; drained."""
        out, self._outgoing = self._outgoing, []
        return out

    # --- internals --------------------------------------------------------------

    def _seal(self, aad_prefix: bytes, plaintext: bytes, now: float) -> bytes:
        if self._closed:
            raise SessionClosedError("the session is closed; run a new handshake to talk to this peer again")
        if now >= self._send_rotate_at or self._send_key_records >= self._rekey_after_messages:
            self._rotate_send(now)
        return self._seal_now(aad_prefix, plaintext, now)

    def _seal_now(self, aad_prefix: bytes, plaintext: bytes, now: float) -> bytes:
        counter = self._send_counter
        if counter > MAX_COUNTER:
            raise CounterExhaustedError("the 64-bit record counter is exhausted; run a new handshake")
        if len(plaintext) > MAX_PLAINTEXT:
            raise SessionError(f"record of {len(plaintext)} bytes exceeds the {MAX_PLAINTEXT}-byte limit")
        header = _HEADER.pack(self._send_epoch & 0xFF, counter)
        assert self._send_aead is not None
        sealed = header + self._send_aead.encrypt(_NONCE_PREFIX + header[1:], plaintext, aad_prefix + header)
        self._send_counter = counter + 1
        self._send_key_records += 1
        stats = self.stats
        stats.tx_records += 1
        stats.tx_bytes += len(sealed)
        return sealed

    def _queue(self, kind: MsgType, sealed: bytes, now: float) -> None:
        if not self._outgoing:
            self._output_since = now
        self._outgoing.append((kind, sealed))

    def _rotate_send(self, now: float) -> None:
        # Refuse before touching the key if even the REKEY record cannot be sealed.
        if self._send_counter > MAX_COUNTER:
            raise CounterExhaustedError("the 64-bit record counter is exhausted; run a new handshake")
        assert self._send_key is not None
        self._send_key = _next_key(self._send_key)
        self._send_aead = ChaCha20Poly1305(self._send_key)
        self._send_epoch += 1
        self._send_rotate_at = now + self._key_rotation_interval
        self.stats.rekeys_sent += 1
        self._events.append(KeyRotated("send", self._send_epoch))
        self._queue(MsgType.REKEY, self._seal_now(_AAD_PREFIX[MsgType.REKEY], b"", now), now)
        # The announcement is part of the rotation, not one of the records it
        # budgets for; counting it would make rekey_after_messages=1 rotate forever.
        self._send_key_records = 0

    def _key_ahead(self, distance: int) -> ChaCha20Poly1305:
        while len(self._ahead) < distance:
            base = self._ahead[-1][0] if self._ahead else self._recv_key
            assert base is not None
            key = _next_key(base)
            self._ahead.append((key, ChaCha20Poly1305(key)))
        return self._ahead[distance - 1][1]

    def _advance_recv(self, distance: int, now: float) -> None:
        self._prev_aead = self._recv_aead if distance == 1 else self._ahead[distance - 2][1]
        self._prev_expires = now + self._previous_key_grace
        self._recv_key, self._recv_aead = self._ahead[distance - 1]
        del self._ahead[:distance]
        self._recv_epoch += distance
        self.stats.rekeys_received += distance

    def _send_heartbeat_request(self, now: float) -> None:
        self._heartbeat_seq += 1
        ident = self._heartbeat_seq & MAX_COUNTER
        record = self._seal(_AAD_PREFIX[MsgType.HEARTBEAT], _HEARTBEAT.pack(HEARTBEAT_REQUEST, ident, now), now)
        self._queue(MsgType.HEARTBEAT, record, now)
        self._outstanding[ident] = now
        if len(self._outstanding) > MAX_OUTSTANDING_HEARTBEATS:
            del self._outstanding[next(iter(self._outstanding))]  # dicts keep insertion order: oldest first
        # Scheduled from now, not from the missed deadline: a driver that was
        # suspended should send one heartbeat, not a burst.
        self._next_heartbeat = now + self._heartbeat_interval

    def _on_heartbeat(self, plaintext: bytes, now: float, events: list[SessionEvent]) -> None:
        if len(plaintext) != _HEARTBEAT.size:
            self.stats.dropped_malformed += 1
            events.append(RecordDropped(DROP_MALFORMED))
            return
        flag, ident, sent_at = _HEARTBEAT.unpack(plaintext)
        if flag == HEARTBEAT_REQUEST:
            try:
                reply = self._seal(
                    _AAD_PREFIX[MsgType.HEARTBEAT], _HEARTBEAT.pack(HEARTBEAT_REPLY, ident, sent_at), now
                )
            except CounterExhaustedError:
                return
            self._queue(MsgType.HEARTBEAT, reply, now)
            events.extend(self._events)  # a rotation the reply triggered
            self._events.clear()
        elif flag == HEARTBEAT_REPLY:
            # Measured against our own record of the send time, so the peer's
            # echo cannot skew it; a reply we no longer wait for is ignored.
            mine = self._outstanding.pop(ident, None)
            if mine is not None:
                rtt = max(0.0, now - mine)
                self.stats.last_rtt = rtt
                events.append(HeartbeatRtt(rtt))
        else:
            self.stats.dropped_malformed += 1
            events.append(RecordDropped(DROP_MALFORMED))

    def _accept(self, counter: int, size: int, now: float) -> None:
        """A record authenticated: move the replay window, count it, and the peer is alive."""
        self._replay.update(counter)
        stats = self.stats
        stats.rx_records += 1
        stats.rx_bytes += size
        stats.last_received = now
        self._dead_reported = False

    def _drop(self, reason: str) -> list[SessionEvent]:
        stats = self.stats
        if reason == DROP_REPLAY:
            stats.dropped_replay += 1
        elif reason == DROP_AUTH:
            stats.dropped_auth += 1
        elif reason == DROP_EPOCH:
            stats.dropped_epoch += 1
        elif reason == DROP_CLOSED:
            stats.dropped_closed += 1
        else:
            stats.dropped_malformed += 1
        events, self._events = self._events, []
        events.append(RecordDropped(reason))
        return events

    def _shut(self) -> None:
        self._closed = True
        # Forward secrecy: a closed session needs no key.
        self._send_key = self._send_aead = None
        self._recv_key = self._recv_aead = None
        self._ahead.clear()
        self._prev_aead = None
        self._outgoing.clear()
        self._outstanding.clear()
