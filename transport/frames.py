"""The binary frame codec: one format on every path (relay WebSocket, QUIC).

Every frame is ``WIRE_VERSION (1 byte) | type (1 byte) | fields``, integers
in network byte order, variable parts length-prefixed and bounded. ``decode``
is strict: it never allocates from an unchecked length, rejects trailing
bytes, and raises nothing but :class:`FrameError`.

Two families of frames exist:

* relay control (client <-> relay): HELLO, CHALLENGE, AUTH, AUTH_OK,
  MEMBERS, PEER_JOINED, PEER_LEFT, READY, ESTABLISHED, RELEASE, ERROR;
* session frames (peer <-> peer, the relay only forwards them by their
  16-byte relay session id): HANDSHAKE (end-to-end handshake messages) and the
  sealed kinds CANDIDATES, DATA, HEARTBEAT, REKEY, BYE, PATH whose payload the
  session layer seals and opens (see ``transport/session.py``).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from transport.constants import (
    MAX_FRAME_SIZE,
    MAX_HANDSHAKE_SIZE,
    MAX_NETWORK_NAME,
    MAX_REASON,
    WIRE_VERSION,
)

SESSION_ID_SIZE = 16
IDENTITY_SIZE = 32  # raw Ed25519 public key
NONCE_SIZE = 32
SIGNATURE_SIZE = 64  # Ed25519


class FrameError(ValueError):
    """A frame could not be decoded or encoded; the message says why."""


class MsgType(IntEnum):
    # relay control
    HELLO = 0x01
    CHALLENGE = 0x02
    AUTH = 0x03
    AUTH_OK = 0x04
    PEER_JOINED = 0x05
    PEER_LEFT = 0x06
    READY = 0x07
    ESTABLISHED = 0x08
    RELEASE = 0x09
    MEMBERS = 0x0A  # relay -> client: who the network's members are (after AUTH_OK, and on a reload)
    ERROR = 0x0F
    # session frames, forwarded by the relay
    HANDSHAKE = 0x10
    CANDIDATES = 0x11
    DATA = 0x12
    HEARTBEAT = 0x13
    REKEY = 0x14
    BYE = 0x15
    PATH = 0x16
    BUNDLE = 0x17  # several sealed DATA records of one session in one relayed frame


#: Session frames whose payload is sealed by the session layer.
SEALED_TYPES = frozenset(
    {MsgType.CANDIDATES, MsgType.DATA, MsgType.HEARTBEAT, MsgType.REKEY, MsgType.BYE, MsgType.PATH}
)

#: Frames the relay forwards opaquely between the two ends of a session.
FORWARDED_TYPES = SEALED_TYPES | {MsgType.HANDSHAKE, MsgType.BUNDLE}

#: A BUNDLE carries at least two records (one would be a plain DATA frame), each behind a
#: two-byte length prefix.
MIN_BUNDLE_RECORDS = 2


class ErrorCode(IntEnum):
    """Codes carried by ERROR frames. The reason string is for humans."""

    PROTOCOL = 1  # malformed or unexpected frame
    UNKNOWN_NETWORK = 2
    NOT_A_MEMBER = 3
    BAD_SIGNATURE = 4
    DUPLICATE_LOGIN = 5
    FRAME_TOO_LARGE = 6
    AUTH_TIMEOUT = 7
    UNKNOWN_SESSION = 8
    SERVER_SHUTDOWN = 9
    OVERLOADED = 10


#: Error codes after which a client must not retry (the user has to act).
FATAL_ERRORS = frozenset({ErrorCode.UNKNOWN_NETWORK, ErrorCode.NOT_A_MEMBER, ErrorCode.BAD_SIGNATURE})


# --- message dataclasses -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """Client -> relay: join ``network`` as ``identity``."""

    network: str
    identity: bytes
    supports_direct: bool = True


@dataclass(frozen=True, slots=True)
class Challenge:
    """Relay -> client: sign this fresh nonce."""

    nonce: bytes


@dataclass(frozen=True, slots=True)
class Auth:
    """Client -> relay: Ed25519 signature over ``relay_auth_message(...)``."""

    signature: bytes


@dataclass(frozen=True, slots=True)
class AuthOk:
    """Relay -> client: admitted; the relay saw the client at this address."""

    observed_ip: str
    observed_port: int


#: Identities a MEMBERS frame lists at most (32 bytes each: the list fits one 16 KiB frame).
MAX_MEMBERS_LISTED = 480


@dataclass(frozen=True, slots=True)
class Members:
    """Relay -> client: the network has ``total`` members; ``identities`` lists them all when
    ``total`` is at most :data:`MAX_MEMBERS_LISTED`, else it is empty (the list is too long to send).

    A node keeps its relay connection while a member it knows of is not reached directly.
    """

    total: int
    identities: tuple[bytes, ...]

    @property
    def complete(self) -> bool:
        return len(self.identities) == self.total


@dataclass(frozen=True, slots=True)
class PeerJoined:
    """Relay -> client: ``peer`` is online; ``session_id`` routes to it."""

    session_id: bytes
    peer: bytes


@dataclass(frozen=True, slots=True)
class PeerLeft:
    """Relay -> client: the session's other end went away."""

    session_id: bytes
    peer: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class Ready:
    """Client -> relay: my end-to-end handshake for this session is done."""

    session_id: bytes


@dataclass(frozen=True, slots=True)
class Established:
    """Relay -> client: both ends are ready. The seed's fields, verbatim."""

    session_id: bytes
    mtu: int
    heartbeat_interval: int  # seconds
    key_rotation_interval: int  # seconds
    peer_public_ip: str
    peer_public_port: int
    peer_supports_direct: bool


@dataclass(frozen=True, slots=True)
class Release:
    """Client -> relay: stop forwarding for this session (it went direct)."""

    session_id: bytes


@dataclass(frozen=True, slots=True)
class Error:
    """Either direction: a refusal or failure, then the connection closes."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class SessionFrame:
    """A frame forwarded between the two ends of ``session_id``.

    ``type`` is HANDSHAKE, BUNDLE or one of :data:`SEALED_TYPES`; ``payload`` is
    opaque to the relay (a handshake message, a record sealed by the session, or
    for a BUNDLE several sealed DATA records, see :func:`bundle_data_frames`).
    """

    type: MsgType
    session_id: bytes
    payload: bytes


Frame = (
    Hello
    | Challenge
    | Auth
    | AuthOk
    | Members
    | PeerJoined
    | PeerLeft
    | Ready
    | Established
    | Release
    | Error
    | SessionFrame
)


# --- primitives ----------------------------------------------------------------


class _Reader:
    """Bounded cursor over one frame; every read checks the remaining length."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def take(self, n: int, what: str) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            raise FrameError(f"truncated {what}: need {n} bytes, have {len(self._data) - self._pos}")
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return struct.unpack("!H", self.take(2, what))[0]

    def u32(self, what: str) -> int:
        return struct.unpack("!I", self.take(4, what))[0]

    def flag(self, what: str) -> bool:
        value = self.u8(what)
        if value > 1:
            raise FrameError(f"{what} must be 0 or 1, got {value}")
        return value == 1

    def text(self, what: str, limit: int) -> str:
        n = self.u8(what)
        if n > limit:
            raise FrameError(f"{what} is {n} bytes, limit {limit}")
        try:
            return self.take(n, what).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FrameError(f"{what} is not valid UTF-8") from exc

    def blob(self, what: str, limit: int) -> bytes:
        n = self.u16(what)
        if n > limit:
            raise FrameError(f"{what} is {n} bytes, limit {limit}")
        return self.take(n, what)

    def ip(self, what: str) -> str:
        family = self.u8(what)
        if family == 4:
            return str(ipaddress.IPv4Address(self.take(4, what)))
        if family == 6:
            return str(ipaddress.IPv6Address(self.take(16, what)))
        raise FrameError(f"{what}: unknown address family {family}")

    def end(self) -> None:
        if self._pos != len(self._data):
            raise FrameError(f"{len(self._data) - self._pos} trailing bytes")


def _text(value: str, what: str, limit: int) -> bytes:
    try:
        raw = value.encode("utf-8")
    except (UnicodeEncodeError, AttributeError):
        raise FrameError(f"{what} is not encodable text") from None
    if len(raw) > limit:
        raise FrameError(f"{what} is {len(raw)} bytes, limit {limit}")
    return bytes([len(raw)]) + raw


def _blob(value: bytes, what: str, limit: int) -> bytes:
    if len(value) > limit:
        raise FrameError(f"{what} is {len(value)} bytes, limit {limit}")
    return struct.pack("!H", len(value)) + value


def _fixed(value: bytes, size: int, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != size:
        raise FrameError(f"{what} must be {size} bytes, got {value!r:.40}")
    return value


def _ip(value: str, what: str) -> bytes:
    try:
        addr = ipaddress.ip_address(value)
    except ValueError as exc:
        raise FrameError(f"{what}: not an IP address: {value!r}") from exc
    if getattr(addr, "scope_id", None):
        raise FrameError(f"{what}: scoped IPv6 addresses cannot travel: {value!r}")
    return bytes([addr.version]) + addr.packed


def _int(value: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise FrameError(f"{what} must be an integer, got {type(value).__name__}")
    return value


def _u16(value: int, what: str) -> bytes:
    if not 0 <= _int(value, what) <= 0xFFFF:
        raise FrameError(f"{what} out of range: {value}")
    return struct.pack("!H", value)


def _u32(value: int, what: str) -> bytes:
    if not 0 <= _int(value, what) <= 0xFFFFFFFF:
        raise FrameError(f"{what} out of range: {value}")
    return struct.pack("!I", value)


def _network(value: str) -> bytes:
    if not value:
        raise FrameError("network name is empty")
    return _text(value, "network name", MAX_NETWORK_NAME)


# --- encode --------------------------------------------------------------------

#: Largest payload a session frame may carry (header: version, type, session id,
#: length prefix).
MAX_SESSION_PAYLOAD = MAX_FRAME_SIZE - 2 - SESSION_ID_SIZE - 2
#: version, type, session id, payload length.
SESSION_HEADER_SIZE = 2 + SESSION_ID_SIZE + 2
_LENGTH = struct.Struct("!H")


def encode(frame: Frame) -> bytes:
    """Serialise ``frame``; raises :class:`FrameError` if a field is out of bounds."""
    if isinstance(frame, SessionFrame):
        return encode_session_frame(frame.type, frame.session_id, frame.payload)
    if isinstance(frame, Hello):
        body = (
            _network(frame.network)
            + _fixed(frame.identity, IDENTITY_SIZE, "identity")
            + bytes([1 if frame.supports_direct else 0])
        )
        kind = MsgType.HELLO
    elif isinstance(frame, Challenge):
        body = _fixed(frame.nonce, NONCE_SIZE, "nonce")
        kind = MsgType.CHALLENGE
    elif isinstance(frame, Auth):
        body = _fixed(frame.signature, SIGNATURE_SIZE, "signature")
        kind = MsgType.AUTH
    elif isinstance(frame, AuthOk):
        body = _ip(frame.observed_ip, "observed ip") + _u16(frame.observed_port, "observed port")
        kind = MsgType.AUTH_OK
    elif isinstance(frame, Members):
        body = _members(frame)
        kind = MsgType.MEMBERS
    elif isinstance(frame, PeerJoined):
        body = _fixed(frame.session_id, SESSION_ID_SIZE, "session id") + _fixed(
            frame.peer, IDENTITY_SIZE, "peer identity"
        )
        kind = MsgType.PEER_JOINED
    elif isinstance(frame, PeerLeft):
        body = (
            _fixed(frame.session_id, SESSION_ID_SIZE, "session id")
            + _fixed(frame.peer, IDENTITY_SIZE, "peer identity")
            + _text(frame.reason, "reason", MAX_REASON)
        )
        kind = MsgType.PEER_LEFT
    elif isinstance(frame, Ready):
        body = _fixed(frame.session_id, SESSION_ID_SIZE, "session id")
        kind = MsgType.READY
    elif isinstance(frame, Established):
        body = (
            _fixed(frame.session_id, SESSION_ID_SIZE, "session id")
            + _u16(frame.mtu, "mtu")
            + _u16(frame.heartbeat_interval, "heartbeat interval")
            + _u32(frame.key_rotation_interval, "key rotation interval")
            + _ip(frame.peer_public_ip, "peer public ip")
            + _u16(frame.peer_public_port, "peer public port")
            + bytes([1 if frame.peer_supports_direct else 0])
        )
        kind = MsgType.ESTABLISHED
    elif isinstance(frame, Release):
        body = _fixed(frame.session_id, SESSION_ID_SIZE, "session id")
        kind = MsgType.RELEASE
    elif isinstance(frame, Error):
        body = _u16(frame.code, "error code") + _text(frame.reason, "reason", MAX_REASON)
        kind = MsgType.ERROR
    else:
        raise FrameError(f"not a frame: {type(frame).__name__}")
    return bytes([WIRE_VERSION, kind]) + body


def encode_session_frame(kind: MsgType, session_id: bytes, payload: bytes) -> bytes:
    """Fast path for the frames on the data plane (no dataclass allocation)."""
    if kind not in FORWARDED_TYPES:
        raise FrameError(f"{kind!r} is not a session frame")
    kind = MsgType(kind)
    limit = MAX_HANDSHAKE_SIZE if kind == MsgType.HANDSHAKE else MAX_SESSION_PAYLOAD
    return (
        bytes([WIRE_VERSION, kind])
        + _fixed(session_id, SESSION_ID_SIZE, "session id")
        + _blob(payload, f"{kind.name} payload", limit)
    )


def data_head(session_id: bytes) -> bytes:
    """The first bytes of every DATA frame of ``session_id``, checked once (see :func:`encode_data`)."""
    return bytes([WIRE_VERSION, MsgType.DATA]) + _fixed(session_id, SESSION_ID_SIZE, "session id")


def encode_data(head: bytes, record: bytes) -> bytes:
    """One DATA frame from its :func:`data_head` and a sealed record: the send side's hot path,
    the same bytes as ``encode_session_frame(MsgType.DATA, session_id, record)``."""
    if len(record) > MAX_SESSION_PAYLOAD:
        raise FrameError(f"DATA payload is {len(record)} bytes, limit {MAX_SESSION_PAYLOAD}")
    return head + _LENGTH.pack(len(record)) + record


def bundle_data_frames(wire: Sequence[bytes]) -> list[bytes]:
    """Replace each run of consecutive DATA frames of one session by BUNDLE frames; order is kept.

    The relay path's cost is per WebSocket message (framing, a TLS record, a system call
    and a hop through the relay for each), so a burst of frames travels as a few
    BUNDLEs of up to MAX_SESSION_PAYLOAD bytes instead. The relay forwards a BUNDLE
    like any session frame, opaquely; the records inside are the session's sealed DATA
    records, unchanged. Anything else in ``wire`` passes through as it is.
    """
    out: list[bytes] = []
    run: list[bytes] = []  # payloads of DATA frames of the session ``head`` names
    head = b""
    size = 0

    def flush() -> None:
        if len(run) >= MIN_BUNDLE_RECORDS:
            body = b"".join(struct.pack("!H", len(record)) + record for record in run)
            out.append(bytes([WIRE_VERSION, MsgType.BUNDLE]) + head[2:] + struct.pack("!H", len(body)) + body)
        elif run:
            out.append(head + struct.pack("!H", len(run[0])) + run[0])
        run.clear()

    for frame in wire:
        if len(frame) < SESSION_HEADER_SIZE or frame[1] != MsgType.DATA:
            flush()
            out.append(frame)
            continue
        record = frame[SESSION_HEADER_SIZE:]
        added = 2 + len(record)
        if run and (frame[: 2 + SESSION_ID_SIZE] != head or size + added > MAX_SESSION_PAYLOAD):
            flush()
        if not run:
            head, size = frame[: 2 + SESSION_ID_SIZE], 0
        run.append(record)
        size += added
    flush()
    return out


def split_bundle(payload: bytes) -> list[bytes]:
    """The sealed DATA records of a BUNDLE's payload. Raises :class:`FrameError` (only) if the
    records do not exactly fill it, or if there are fewer than MIN_BUNDLE_RECORDS."""
    records: list[bytes] = []
    offset, end = 0, len(payload)
    while offset < end:
        if end - offset < 2:
            raise FrameError(f"BUNDLE record {len(records) + 1}: truncated length prefix")
        length = int.from_bytes(payload[offset : offset + 2], "big")
        offset += 2
        if length == 0 or length > end - offset:
            raise FrameError(f"BUNDLE record {len(records) + 1}: length {length}, {end - offset} bytes left")
        records.append(bytes(payload[offset : offset + length]))
        offset += length
    if len(records) < MIN_BUNDLE_RECORDS:
        raise FrameError(f"BUNDLE of {len(records)} record(s): at least {MIN_BUNDLE_RECORDS}")
    return records


# --- decode --------------------------------------------------------------------


def peek_type(data: bytes) -> MsgType:
    """Version-check ``data`` and return its type without decoding the body."""
    if len(data) < 2:
        raise FrameError(f"frame of {len(data)} bytes is shorter than its header")
    if len(data) > MAX_FRAME_SIZE:
        raise FrameError(f"frame of {len(data)} bytes exceeds the {MAX_FRAME_SIZE}-byte limit")
    if data[0] != WIRE_VERSION:
        raise FrameError(f"unknown wire version 0x{data[0]:02x} (expected 0x{WIRE_VERSION:02x})")
    try:
        return MsgType(data[1])
    except ValueError:
        raise FrameError(f"unknown frame type 0x{data[1]:02x}") from None


def peek_session_id(data: bytes, kind: MsgType) -> bytes:
    """Check a session frame's framing (as strictly as :func:`decode`) and return its session id.

    The relay's forwarding path uses this: it needs the id, not a copy of the payload.
    """
    if len(data) < SESSION_HEADER_SIZE:
        raise FrameError(f"truncated {kind.name} frame: {len(data)} bytes, its head alone is {SESSION_HEADER_SIZE}")
    length = int.from_bytes(data[SESSION_HEADER_SIZE - 2 : SESSION_HEADER_SIZE], "big")
    limit = MAX_HANDSHAKE_SIZE if kind == MsgType.HANDSHAKE else MAX_SESSION_PAYLOAD
    if length > limit:
        raise FrameError(f"{kind.name} payload is {length} bytes, limit {limit}")
    if SESSION_HEADER_SIZE + length < len(data):
        raise FrameError(f"{len(data) - SESSION_HEADER_SIZE - length} trailing bytes after the {kind.name} payload")
    if SESSION_HEADER_SIZE + length > len(data):
        raise FrameError(f"truncated {kind.name} payload: need {length} bytes, have {len(data) - SESSION_HEADER_SIZE}")
    return bytes(data[2 : 2 + SESSION_ID_SIZE])


def data_record(data: bytes) -> bytes | None:
    """The sealed record of ``data`` if it is a well-formed DATA frame (exactly as strict as
    :func:`decode`), else None: the data plane's framing check, without building a frame."""
    size = len(data)
    if (
        size < SESSION_HEADER_SIZE
        or size > MAX_FRAME_SIZE
        or data[0] != WIRE_VERSION
        or data[1] != MsgType.DATA
        or int.from_bytes(data[SESSION_HEADER_SIZE - 2 : SESSION_HEADER_SIZE], "big") != size - SESSION_HEADER_SIZE
    ):
        return None
    return bytes(data[SESSION_HEADER_SIZE:])


def decode(data: bytes) -> Frame:
    """Parse one frame. Raises :class:`FrameError` (only) on any malformation."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise FrameError(f"frame must be bytes, got {type(data).__name__}")
    data = bytes(data)
    kind = peek_type(data)
    if kind in FORWARDED_TYPES:
        return SessionFrame(kind, peek_session_id(data, kind), data[SESSION_HEADER_SIZE:])
    r = _Reader(data)
    r.take(2, "header")
    frame: Frame
    if kind == MsgType.HELLO:
        network = r.text("network name", MAX_NETWORK_NAME)
        if not network:
            raise FrameError("network name is empty")
        frame = Hello(network, r.take(IDENTITY_SIZE, "identity"), r.flag("supports-direct flag"))
    elif kind == MsgType.CHALLENGE:
        frame = Challenge(r.take(NONCE_SIZE, "nonce"))
    elif kind == MsgType.AUTH:
        frame = Auth(r.take(SIGNATURE_SIZE, "signature"))
    elif kind == MsgType.AUTH_OK:
        frame = AuthOk(r.ip("observed ip"), r.u16("observed port"))
    elif kind == MsgType.MEMBERS:
        total = r.u32("member count")
        listed = r.u16("listed members")
        if listed not in (0, total) or listed > MAX_MEMBERS_LISTED:
            raise FrameError(
                f"MEMBERS lists {listed} of {total} members: all of them (at most {MAX_MEMBERS_LISTED}) or none"
            )
        frame = Members(total, tuple(r.take(IDENTITY_SIZE, "member identity") for _ in range(listed)))
    elif kind == MsgType.PEER_JOINED:
        frame = PeerJoined(r.take(SESSION_ID_SIZE, "session id"), r.take(IDENTITY_SIZE, "peer identity"))
    elif kind == MsgType.PEER_LEFT:
        frame = PeerLeft(
            r.take(SESSION_ID_SIZE, "session id"), r.take(IDENTITY_SIZE, "peer identity"), r.text("reason", MAX_REASON)
        )
    elif kind == MsgType.READY:
        frame = Ready(r.take(SESSION_ID_SIZE, "session id"))
    elif kind == MsgType.ESTABLISHED:
        frame = Established(
            session_id=r.take(SESSION_ID_SIZE, "session id"),
            mtu=r.u16("mtu"),
            heartbeat_interval=r.u16("heartbeat interval"),
            key_rotation_interval=r.u32("key rotation interval"),
            peer_public_ip=r.ip("peer public ip"),
            peer_public_port=r.u16("peer public port"),
            peer_supports_direct=r.flag("peer-supports-direct flag"),
        )
    elif kind == MsgType.RELEASE:
        frame = Release(r.take(SESSION_ID_SIZE, "session id"))
    else:  # MsgType.ERROR: peek_type admits nothing else
        frame = Error(r.u16("error code"), r.text("reason", MAX_REASON))
    r.end()
    return frame


def _members(frame: Members) -> bytes:
    listed = len(frame.identities)
    if listed not in (0, frame.total) or listed > MAX_MEMBERS_LISTED:
        raise FrameError(f"MEMBERS lists {listed} of {frame.total} members: all (at most {MAX_MEMBERS_LISTED}) or none")
    return (
        _u32(frame.total, "member count")
        + _u16(listed, "listed members")
        + b"".join(_fixed(i, IDENTITY_SIZE, "member identity") for i in frame.identities)
    )


def relay_auth_message(network: str, identity: bytes, nonce: bytes) -> bytes:
    """The bytes a client signs to prove its identity to the relay.

    Domain-separated so the signature cannot be replayed as anything else.
    """
    return b"traversal relay auth v1\x00" + network.encode("utf-8") + b"\x00" + identity + nonce
