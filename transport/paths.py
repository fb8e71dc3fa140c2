"""Which path a session's frames take, and the PATH messages that move it (sans-I/O).

A session has the relay path from the start and at most one direct path.
Moving to the direct path is decided here, from messages that are sealed by
the session (so the relay can neither forge nor replay them):

    direct path up (QUIC connected)      -> send PROBE(nonce) on it
    PROBE(nonce) received on direct      -> answer PROBE_ACK(nonce) on direct
    PROBE_ACK(our nonce) received        -> the path works both ways: VALIDATED,
                                            send on direct from now on, send SWITCHED
    SWITCHED received                    -> the peer sends on direct too: once both
                                            sides are switched, the relay may be let go

While direct, each side keeps probing (``keepalive``) and the path counts as
alive only while its own probes are acknowledged (``direct_alive``): an answer
proves both directions, so a path cut one way is noticed by both sides.
Leaving the direct path (it died, or was released) returns to the relay, and
FALLBACK tells the peer. The record format inside a sealed PATH record:
``kind (1 byte) | nonce (8 bytes)``.
"""

from __future__ import annotations

import secrets
import struct
from dataclasses import dataclass
from enum import Enum, IntEnum


class PathError(ValueError):
    """A PATH message could not be decoded."""


class PathMsg(IntEnum):
    PROBE = 1
    PROBE_ACK = 2
    SWITCHED = 3
    FALLBACK = 4
    PREPARE_RELAY = 5  # the sender's user asked for the relay: get onto it, a clean switch follows
    RETRY_DIRECT = 6  # the sender's user asked for a direct attempt now


_PATH = struct.Struct("!B8s")

#: Keepalive probes remembered for their answers; older ones count as lost.
MAX_OUTSTANDING_KEEPALIVES = 8


def encode_path(kind: PathMsg, nonce: bytes) -> bytes:
    return _PATH.pack(kind, nonce)


def decode_path(data: bytes) -> tuple[PathMsg, bytes]:
    if len(data) != _PATH.size:
        raise PathError(f"PATH message of {len(data)} bytes, expected {_PATH.size}")
    kind, nonce = _PATH.unpack(data)
    try:
        return PathMsg(kind), nonce
    except ValueError:
        raise PathError(f"unknown PATH message kind {kind}") from None


class Route(Enum):
    RELAY = "relay"
    DIRECT = "direct"


@dataclass(frozen=True, slots=True)
class PathValidated:
    """Our probe came back over the direct path: it carries traffic both ways."""

    rtt: float


@dataclass(frozen=True, slots=True)
class PeerSwitched:
    """The peer now sends on the direct path."""


@dataclass(frozen=True, slots=True)
class PeerFellBack:
    """The peer went back to the relay path."""


@dataclass(frozen=True, slots=True)
class RelayRequested:
    """The peer asked both sides to move to the relay (a clean, agreed release)."""


@dataclass(frozen=True, slots=True)
class DirectRequested:
    """The peer asked for a direct attempt now."""


PathEvent = PathValidated | PeerSwitched | PeerFellBack | RelayRequested | DirectRequested


class PathSwitch:
    """Per-session path choice. Call ``direct_up`` when a direct carriage connects,
    feed every PATH record to ``on_message``, and send what they return on the
    direct path. ``route`` says where this side sends now."""

    def __init__(self) -> None:
        self.route = Route.RELAY
        self.peer_route = Route.RELAY
        self._probe_nonce: bytes | None = None
        self._probe_sent_at = 0.0
        self._keepalives: dict[bytes, float] = {}  # nonce -> sent at, the few most recent
        self.last_ack = 0.0  # when our last probe was answered on the direct path
        self.last_rtt: float | None = None

    @property
    def both_direct(self) -> bool:
        return self.route is Route.DIRECT and self.peer_route is Route.DIRECT

    def direct_up(self, now: float) -> list[bytes]:
        """A direct carriage connected: probe it. Returns PATH messages for the direct path."""
        self._probe_nonce = secrets.token_bytes(8)
        self._probe_sent_at = now
        return [encode_path(PathMsg.PROBE, self._probe_nonce)]

    def keepalive(self, now: float) -> list[bytes]:
        """While direct: a fresh PROBE to send on the direct path."""
        if self.route is not Route.DIRECT:
            return []
        nonce = secrets.token_bytes(8)
        self._keepalives[nonce] = now
        while len(self._keepalives) > MAX_OUTSTANDING_KEEPALIVES:
            del self._keepalives[next(iter(self._keepalives))]
        return [encode_path(PathMsg.PROBE, nonce)]

    def direct_alive(self, now: float, dead_after: float) -> bool:
        """Has one of our probes been answered within ``dead_after`` seconds?"""
        return self.route is Route.DIRECT and now - self.last_ack <= dead_after

    def direct_down(self) -> list[bytes]:
        """The direct carriage is gone: back to the relay. Returns PATH messages for the relay path."""
        was_direct = self.route is Route.DIRECT
        self.route = Route.RELAY
        self.peer_route = Route.RELAY
        self._probe_nonce = None
        self._keepalives.clear()
        return [encode_path(PathMsg.FALLBACK, bytes(8))] if was_direct else []

    def on_message(self, data: bytes, now: float) -> tuple[list[bytes], list[PathEvent]]:
        """Handle one PATH message; returns (messages for the direct path, events).

        Raises :class:`PathError` for a malformed message (the caller drops it).
        """
        kind, nonce = decode_path(data)
        if kind is PathMsg.PROBE:
            return [encode_path(PathMsg.PROBE_ACK, nonce)], []
        if kind is PathMsg.PROBE_ACK:
            sent_at = self._keepalives.pop(nonce, None)
            if sent_at is not None:
                self.last_ack = now
                self.last_rtt = now - sent_at
                return [], []
            if self._probe_nonce is None or nonce != self._probe_nonce or self.route is Route.DIRECT:
                return [], []  # stale or duplicate: ignore
            self._probe_nonce = None
            self.route = Route.DIRECT
            self.last_ack = now
            self.last_rtt = now - self._probe_sent_at
            return [encode_path(PathMsg.SWITCHED, bytes(8))], [PathValidated(self.last_rtt)]
        if kind is PathMsg.SWITCHED:
            if self.peer_route is Route.DIRECT:
                return [], []
            self.peer_route = Route.DIRECT
            return [], [PeerSwitched()]
        if kind is PathMsg.PREPARE_RELAY:
            return [], [RelayRequested()]
        if kind is PathMsg.RETRY_DIRECT:
            return [], [DirectRequested()]
        # FALLBACK
        if self.peer_route is Route.RELAY:
            return [], []
        self.peer_route = Route.RELAY
        return [], [PeerFellBack()]
