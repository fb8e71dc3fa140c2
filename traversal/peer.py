"""One peer as this node sees it: handshake, then session, over one relay session id.

``PeerLink`` is sans-I/O like the cores it wraps: the node feeds it frames
and the time, and sends whatever wire frames it returns. Its life:

    HANDSHAKING --handshake done, READY sent--> AWAITING_ESTABLISHED
        --ESTABLISHED from the relay--> ESTABLISHED --BYE / dead / left--> CLOSED

A handshake that does not finish in time is restarted by the initiator (the
responder simply accepts the new first message). A peer silent past the
dead-peer timeout is re-handshaken the same way on the same relay session.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from transport import frames
from transport.constants import DEFAULT_MTU, HANDSHAKE_TIMEOUT, MAX_MTU, MIN_MTU, RESUME_TIMEOUT
from transport.frames import MsgType
from transport.handshake import MSG1_SIZE, Handshake, HandshakeError, HandshakeState, is_initiator
from transport.identity import encode_public, public_bytes, short_id
from transport.paths import PathSwitch
from transport.session import (
    CounterExhaustedError,
    FrameReceived,
    HeartbeatRtt,
    KeyRotated,
    PeerClosed,
    PeerDead,
    RecordDropped,
    RecordReceived,
    Session,
    SessionClosedError,
    SessionError,
    SessionEvent,
)
from traversal.logfmt import log_event

log = logging.getLogger("traversal.peer")

#: Ethernet header (14) + 802.1Q tag (4): the largest frame is MTU + 18 bytes.
ETHERNET_OVERHEAD = 18
MIN_ETHERNET_FRAME = 14

#: What :meth:`PeerLink.receive_data` returns for a record it opened and then dropped (an
#: Ethernet frame out of bounds, counted): nothing for the TAP, and nothing left for
#: :meth:`PeerLink.on_frame` to do (the record's counter is spent: it would count a replay).
CONSUMED = b""


class LinkState(Enum):
    HANDSHAKING = "handshaking"
    AWAITING_ESTABLISHED = "awaiting-established"
    ESTABLISHED = "established"
    CLOSED = "closed"


@dataclass
class LinkCounters:
    tx_frames: int = 0  # Ethernet frames
    rx_frames: int = 0
    dropped_oversize: int = 0  # opened, but longer than MTU + ETHERNET_OVERHEAD
    dropped_undersize: int = 0  # opened, but shorter than an Ethernet header
    handshakes: int = 0
    extra: dict[str, int] = field(default_factory=dict)


def established_problem(est: frames.Established) -> str | None:
    """Why the relay's session parameters cannot be used, or None if they can."""
    if not MIN_MTU <= est.mtu <= MAX_MTU:
        return f"MTU {est.mtu} outside {MIN_MTU}-{MAX_MTU}"
    if not 1 <= est.heartbeat_interval <= 3600:
        return f"heartbeat interval {est.heartbeat_interval}s outside 1-3600"
    if not 10 <= est.key_rotation_interval <= 86400:
        return f"key rotation interval {est.key_rotation_interval}s outside 10-86400"
    return None


def handshake_prologue(network: str, session_id: bytes) -> bytes:
    """Bind the handshake to this network and this relay session."""
    return b"traversal/1\x00" + network.encode("utf-8") + b"\x00" + session_id


class PeerLink:
    """Handshake and session with one peer, reached through one relay session id."""

    def __init__(
        self,
        *,
        session_id: bytes,
        peer: bytes,
        identity: Ed25519PrivateKey,
        network: str,
        psk: bytes | None,
        allowed_peers: frozenset[bytes] | None,
        now: float,
    ) -> None:
        self.session_id = session_id
        self._data_head = frames.data_head(session_id)  # what every DATA frame of ours starts with
        self.peer = peer
        self.peer_name = short_id(peer)
        self.sid = session_id.hex()[:8]
        self._identity = identity
        self._network = network
        self._psk = psk
        self._allowed = allowed_peers
        self.initiator = is_initiator(public_bytes(identity), peer)
        self.state = LinkState.HANDSHAKING
        self.counters = LinkCounters()
        self.session: Session | None = None  # set through _set_session
        self.session_tag = ""
        self.established: frames.Established | None = None
        self.established_at: float | None = None
        self.created_at = now
        self.created_wall = time.time()
        self.last_rtt: float | None = None
        self.last_error: str | None = None
        self.mtu = DEFAULT_MTU
        self._handshake: Handshake | None = None
        self._handshake_deadline: float | None = None
        self._restart_pending = False
        self._resume_deadline: float | None = None  # set while a rebound session awaits proof of life
        self.resumed_at: float | None = None
        self.paths = PathSwitch()
        #: Called with CANDIDATES and PATH records (the direct-path manager's business).
        self.on_record: Callable[[MsgType, bytes], None] | None = None
        self._retired_tx = 0
        self._retired_rx = 0

    # --- byte accounting ------------------------------------------------------------

    def _set_session(self, session: Session | None) -> None:
        """Replace the session, keeping its byte counts (they describe the link, not one key set)."""
        if self.session is not None:
            self._retired_tx += self.session.stats.tx_bytes
            self._retired_rx += self.session.stats.rx_bytes
        self.session = session

    @property
    def tx_bytes(self) -> int:
        """Wire bytes of every sealed record sent (data, heartbeats, rekeys, BYE)."""
        return self._retired_tx + (self.session.stats.tx_bytes if self.session else 0)

    @property
    def rx_bytes(self) -> int:
        """Wire bytes of every sealed record received that authenticated."""
        return self._retired_rx + (self.session.stats.rx_bytes if self.session else 0)

    # --- handshake -------------------------------------------------------------

    def _new_handshake(self, now: float) -> Handshake:
        self.counters.handshakes += 1
        self._handshake_deadline = now + HANDSHAKE_TIMEOUT
        return Handshake(
            initiator=self.initiator,
            identity=self._identity,
            prologue=handshake_prologue(self._network, self.session_id),
            psk=self._psk,
            allowed_peers=self._allowed,
            expected_peer=self.peer,
        )

    def start(self, now: float) -> list[bytes]:
        """Begin (or restart) the handshake; returns frames to send."""
        self.state = LinkState.HANDSHAKING
        self._set_session(None)
        self._handshake = self._new_handshake(now)
        if not self.initiator:
            return []
        log_event(log, "handshake_start", peer=self.peer_name, session=self.sid, role="initiator")
        return [frames.encode_session_frame(MsgType.HANDSHAKE, self.session_id, self._handshake.start())]

    def _on_handshake(self, payload: bytes, now: float) -> list[bytes]:
        restarted = self._handshake is None or self._handshake.state is not HandshakeState.START
        if not self.initiator and self._resume_deadline is not None and len(payload) == MSG1_SIZE:
            # We tried to resume our keys on a new relay session, and the peer answers
            # with a new handshake: it lost them (it restarted). Follow it.
            log_event(log, "resume_refused", peer=self.peer_name, session=self.sid, reason="peer started a handshake")
            self._resume_deadline = None
            self._set_session(None)
            self.state = LinkState.HANDSHAKING
        if not self.initiator and self.state is not LinkState.ESTABLISHED and restarted and len(payload) == MSG1_SIZE:
            # A first message while we wait means the initiator restarted: follow it.
            # Once established, a stray first message (a replay) is ignored.
            self._handshake = self._new_handshake(now)
        if self._handshake is None or self.state is LinkState.ESTABLISHED:
            # A replay, or a peer that handshakes for no reason: it costs this message, not the session.
            self.count_drop("stray-handshake")
            log_event(log, "handshake_ignored", logging.DEBUG, peer=self.peer_name, session=self.sid)
            return []
        try:
            reply = self._handshake.receive(payload)
        except HandshakeError as exc:
            self.last_error = str(exc)
            log_event(log, "handshake_failed", logging.WARNING, peer=self.peer_name, session=self.sid, reason=str(exc))
            self._handshake = self._new_handshake(now) if not self.initiator else None
            return []
        out: list[bytes] = []
        if reply is not None:
            # Progress: the other side gets a full timeout for its next message.
            self._handshake_deadline = now + HANDSHAKE_TIMEOUT
            out.append(frames.encode_session_frame(MsgType.HANDSHAKE, self.session_id, reply))
        if self._handshake.complete:
            out += self._handshake_done(now)
        return out

    def _handshake_done(self, now: float) -> list[bytes]:
        assert self._handshake is not None
        result = self._handshake.result
        self._handshake = None
        self._handshake_deadline = now + HANDSHAKE_TIMEOUT  # ESTABLISHED must follow in time
        self._set_session(Session(send_key=result.send_key, recv_key=result.recv_key, now=now))
        self.session_tag = result.session_tag.hex()
        self.state = LinkState.AWAITING_ESTABLISHED
        self.last_error = None
        log_event(
            log,
            "handshake_done",
            peer=self.peer_name,
            session=self.sid,
            e2e=self.session_tag,
            role="initiator" if self.initiator else "responder",
        )
        out = [frames.encode(frames.Ready(self.session_id))]
        self._maybe_established(now)
        return out

    def rebind(self, session_id: bytes, now: float) -> list[bytes]:
        """Carry on over a new relay session (the relay restarted, or we reconnected to it).

        With keys, the session resumes as it is (same keys, counters and replay
        window): READY asks the relay for ESTABLISHED, and a heartbeat asks the
        peer to prove it still holds the keys. Without an answer in
        RESUME_TIMEOUT the link falls back to a new handshake.
        """
        self.session_id = session_id
        self._data_head = frames.data_head(session_id)
        self.sid = session_id.hex()[:8]
        if self.session is None or self.state is not LinkState.ESTABLISHED:
            return self.start(now)
        self._resume_deadline = now + RESUME_TIMEOUT
        self.session.ping(now)
        log_event(log, "session_resume", peer=self.peer_name, session=self.sid, e2e=self.session_tag)
        return [frames.encode(frames.Ready(session_id)), *self._drain()]

    @property
    def resuming(self) -> bool:
        """A rebound session still waits for the peer's proof that it holds the keys."""
        return self._resume_deadline is not None

    # --- relay signals -----------------------------------------------------------

    def on_established(self, est: frames.Established, now: float) -> None:
        """The relay's ESTABLISHED: remembered even if it overtakes our handshake's end."""
        problem = established_problem(est)
        if problem is not None:
            self.last_error = f"relay sent an unusable ESTABLISHED: {problem}"
            log_event(
                log, "established_rejected", logging.WARNING, peer=self.peer_name, session=self.sid, reason=problem
            )
            return
        self.established = est
        self.mtu = est.mtu
        self._maybe_established(now)

    def _maybe_established(self, now: float) -> None:
        # ESTABLISHED depends only on the relay session, not on which handshake
        # run produced our keys, so whichever arrives second completes the link.
        if self.session is None or self.established is None or self.state is LinkState.ESTABLISHED:
            return
        est = self.established
        self.state = LinkState.ESTABLISHED
        self.established_at = now
        self._handshake_deadline = None
        self.session.set_intervals(
            heartbeat_interval=float(est.heartbeat_interval),
            key_rotation_interval=float(est.key_rotation_interval),
            now=now,
        )
        log_event(
            log,
            "established",
            peer=self.peer_name,
            session=self.sid,
            endpoint=self.endpoint,
            mtu=est.mtu,
            heartbeat=est.heartbeat_interval,
            rekey=est.key_rotation_interval,
            direct_capable=est.peer_supports_direct,
        )
        log_event(log, "path", peer=self.peer_name, session=self.sid, path="relay", reason="no direct path yet")

    @property
    def endpoint(self) -> str | None:
        if self.established is None:
            return None
        ip = self.established.peer_public_ip
        host = f"[{ip}]" if ":" in ip else ip
        return f"{host}:{self.established.peer_public_port}"

    # --- data ------------------------------------------------------------------

    def send_frame(self, frame: bytes, now: float) -> list[bytes]:
        """Seal one Ethernet frame for the wire (plus a REKEY if sealing rotated the key)."""
        if self.state is not LinkState.ESTABLISHED or self.session is None:
            return []
        try:
            payload = self.session.send_frame(frame, now)
        except (SessionClosedError, CounterExhaustedError) as exc:
            # The keys are spent: this frame is lost and the link re-handshakes.
            log_event(log, "send_failed", logging.WARNING, peer=self.peer_name, session=self.sid, reason=str(exc))
            self._set_session(None)
            self._restart_pending = True
            return []
        except SessionError:
            self.counters.dropped_oversize += 1
            return []
        self.counters.tx_frames += 1
        data = frames.encode_data(self._data_head, payload)
        return [*self._drain(), data] if self.session.has_output else [data]

    def seal_record(self, kind: MsgType, plaintext: bytes, now: float) -> bytes | None:
        """Seal a CANDIDATES or PATH record as a wire frame; None if there is no session."""
        if self.session is None:
            return None
        try:
            payload = self.session.seal(kind, plaintext, now)
        except SessionError as exc:
            log_event(log, "seal_failed", logging.WARNING, peer=self.peer_name, session=self.sid, reason=str(exc))
            return None
        return frames.encode_session_frame(kind, self.session_id, payload)

    def receive_data(self, record: bytes, now: float) -> bytes | None:
        """The hot path for one sealed DATA record: its Ethernet frame for the TAP; :data:`CONSUMED`
        (empty) if it opened but the frame is out of bounds (dropped and counted, nothing more to
        do); or None when it needs :meth:`on_frame` (anything but the common case: see
        Session.open_data)."""
        session = self.session
        if session is None or self._resume_deadline is not None:
            return None
        frame = session.open_data(record, now)
        if frame is None:
            return None
        if not self._frame_in_bounds(frame):
            return CONSUMED
        self.counters.rx_frames += 1
        return frame

    def _frame_in_bounds(self, frame: bytes) -> bool:
        """An opened Ethernet frame the TAP may take; anything else is counted here."""
        size = len(frame)
        if size > self.mtu + ETHERNET_OVERHEAD:
            self.counters.dropped_oversize += 1
            return False
        if size < MIN_ETHERNET_FRAME:
            self.counters.dropped_undersize += 1
            return False
        return True

    def count_drop(self, reason: str) -> None:
        """Count one frame from this peer that was dropped for ``reason`` (shown in status "dropped")."""
        self.counters.extra[reason] = self.counters.extra.get(reason, 0) + 1

    def on_frame(self, frame: frames.SessionFrame, now: float) -> tuple[list[bytes], list[bytes]]:
        """Handle a forwarded frame; returns (wire frames to send, Ethernet frames for the TAP)."""
        if frame.type == MsgType.HANDSHAKE:
            return self._on_handshake(frame.payload, now), []
        if self.session is None:
            return [], []
        session = self.session
        before = session.stats.rx_records
        if frame.type == MsgType.BUNDLE:
            try:
                records = frames.split_bundle(frame.payload)
            except frames.FrameError as exc:
                self.count_drop("malformed-bundle")
                log_event(log, "bundle_dropped", logging.DEBUG, peer=self.peer_name, session=self.sid, reason=str(exc))
                return [], []
            events = []
            for record in records:
                events += session.receive(MsgType.DATA, record, now)
        else:
            events = session.receive(frame.type, frame.payload, now)
        if self._resume_deadline is not None and session.stats.rx_records > before:
            self._resume_deadline = None  # the peer answered under our keys: resumed
            self.resumed_at = now
            log_event(log, "session_resumed", peer=self.peer_name, session=self.sid, e2e=self.session_tag)
        return self._drain(), self._handle_events(events, now)

    def _handle_events(self, events: list[SessionEvent], now: float) -> list[bytes]:
        delivered: list[bytes] = []
        for event in events:
            if isinstance(event, FrameReceived):
                if not self._frame_in_bounds(event.frame):
                    continue
                self.counters.rx_frames += 1
                delivered.append(event.frame)
            elif isinstance(event, HeartbeatRtt):
                self.last_rtt = event.rtt
            elif isinstance(event, KeyRotated):
                log_event(
                    log,
                    "key_rotated",
                    peer=self.peer_name,
                    session=self.sid,
                    direction=event.direction,
                    epoch=event.epoch,
                )
            elif isinstance(event, PeerClosed):
                log_event(log, "peer_bye", peer=self.peer_name, session=self.sid, reason=event.reason)
                self.state = LinkState.CLOSED
            elif isinstance(event, PeerDead):
                log_event(
                    log,
                    "peer_dead",
                    logging.WARNING,
                    peer=self.peer_name,
                    session=self.sid,
                    silent_for=event.silent_for,
                )
                self.last_error = f"peer silent for {event.silent_for:.1f}s"
                self._set_session(None)
                self._restart_pending = True
            elif isinstance(event, RecordReceived):
                if self.on_record is not None:
                    self.on_record(event.kind, event.plaintext)
                else:  # PATH or CANDIDATES, but we offered no direct path (--no-direct, or the peer cannot)
                    self.count_drop("unsolicited")
            elif isinstance(event, RecordDropped):
                self.count_drop(event.reason)
                log_event(
                    log, "record_dropped", logging.DEBUG, peer=self.peer_name, session=self.sid, reason=event.reason
                )
        return delivered

    def _drain(self) -> list[bytes]:
        if self.session is None:
            return []
        return [
            frames.encode_session_frame(kind, self.session_id, payload)
            for kind, payload in self.session.records_to_send()
        ]

    # --- time ------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        session_deadline = self.session.next_deadline() if self.session is not None else None
        deadlines = [d for d in (self._handshake_deadline, session_deadline, self._resume_deadline) if d is not None]
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> list[bytes]:
        out: list[bytes] = []
        if self._resume_deadline is not None and now >= self._resume_deadline:
            self._resume_deadline = None
            log_event(
                log,
                "resume_failed",
                logging.WARNING,
                peer=self.peer_name,
                session=self.sid,
                reason=f"no answer under the old keys within {RESUME_TIMEOUT:.0f} s",
            )
            self._set_session(None)
            return self.start(now)
        if self._handshake_deadline is not None and now >= self._handshake_deadline:
            if self.state is not LinkState.ESTABLISHED:
                reason = "handshake timed out" if self.state is LinkState.HANDSHAKING else "no ESTABLISHED from relay"
                log_event(log, "handshake_retry", logging.WARNING, peer=self.peer_name, session=self.sid, reason=reason)
                self.last_error = reason
                return self.start(now)
            self._handshake_deadline = None
        if self.session is not None:
            self._handle_events(self.session.handle_timer(now), now)
            out += self._drain()
        if self._restart_pending:
            self._restart_pending = False
            out += self.start(now)
        return out

    def close(self, reason: str, now: float) -> list[bytes]:
        """Say BYE (if there is a session) and stop."""
        out: list[bytes] = []
        if self.session is not None and self.state is not LinkState.CLOSED:
            out.append(frames.encode_session_frame(MsgType.BYE, self.session_id, self.session.close(reason, now)))
        self.state = LinkState.CLOSED
        self._set_session(None)
        self._handshake = None
        self._handshake_deadline = None
        return out

    # --- status ----------------------------------------------------------------

    def status(self, now: float) -> dict[str, Any]:
        return {
            "identity": encode_public(self.peer),
            "name": self.peer_name,
            "state": self.state.value,
            "path": self.paths.route.value if self.state is LinkState.ESTABLISHED else None,
            "peer_path": self.paths.peer_route.value if self.state is LinkState.ESTABLISHED else None,
            "endpoint": self.endpoint,
            "session_id": self.session_id.hex(),
            "e2e_session": self.session_tag or None,
            "role": "initiator" if self.initiator else "responder",
            "rx_bytes": self.rx_bytes,
            "tx_bytes": self.tx_bytes,
            "rx_frames": self.counters.rx_frames,
            "tx_frames": self.counters.tx_frames,
            # The last heartbeat's RTT; until the first one, the path probe's.
            "rtt_ms": round(rtt * 1000, 2) if (rtt := self.last_rtt or self.paths.last_rtt) is not None else None,
            "session_age_s": round(now - self.established_at, 1) if self.established_at is not None else None,
            "handshakes": self.counters.handshakes,
            "dropped": {
                **self.counters.extra,
                "oversize": self.counters.dropped_oversize,
                "undersize": self.counters.dropped_undersize,
            },
            "last_error": self.last_error,
        }
