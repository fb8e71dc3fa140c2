"""STUN messages (RFC 5389 / RFC 8489, with the RFC 5780 NAT behaviour discovery attributes).

A strict, bounded codec (:func:`parse` raises only :class:`StunError`, whatever the
bytes), builders for the Binding messages the probe and the relay's STUN server
exchange, and a small asyncio client (:class:`StunClient`, :func:`stun_request`)
with RFC 5389 style retransmission and transaction-id matching.

Address attribute encoding and the FINGERPRINT CRC come from ``aioice.stun``; the
parser is our own because aioice's ``parse_message`` checks neither the magic
cookie nor the attribute bounds (LIBRARY-NOTES.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import os
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import cast

from aioice.stun import message_fingerprint, pack_address, pack_xor_address, unpack_address, unpack_xor_address

#: An (IP address, port) pair; IPv6 addresses without scope or brackets.
Address = tuple[str, int]

MAGIC_COOKIE = 0x2112A442
HEADER_SIZE = 20
TRANSACTION_ID_SIZE = 12
FINGERPRINT_XOR = 0x5354554E

#: Largest datagram :func:`parse` accepts by default: room for a 1500-byte PADDING
#: (RFC 5780 s7.6, coturn's ``natdiscovery -P``) and the usual attributes.
MAX_MESSAGE_SIZE = 4096
#: Most attributes :func:`parse` accepts by default; a Binding message has fewer than 10.
MAX_ATTRIBUTES = 32
#: RFC 8489 s14.9 / s14.8: SOFTWARE and an ERROR-CODE reason are at most 763 bytes of UTF-8.
MAX_TEXT_SIZE = 763
#: Largest PADDING a builder writes (a typical MTU, rounded to 4).
MAX_PADDING = 1500

#: CHANGE-REQUEST flags (RFC 5780 s7.2).
CHANGE_IP_FLAG = 0x04
CHANGE_PORT_FLAG = 0x02

BINDING = 0x001

#: RFC 5389 s7.2.1: the first retransmission timeout.
DEFAULT_RTO = 0.5


class StunError(Exception):
    """A datagram is not a valid STUN message, or a message cannot be built as asked."""


class StunTimeout(Exception):
    """No STUN response arrived before the deadline (the server is down, or UDP to it is blocked)."""


class StunClass(enum.IntEnum):
    """The message class (the C1 C0 bits of the message type)."""

    REQUEST = 0
    INDICATION = 1
    SUCCESS = 2
    ERROR = 3


class Attr(enum.IntEnum):
    """Attribute types this codec knows (RFC 5389, 8489, 5780; 3489 names kept for decoding)."""

    MAPPED_ADDRESS = 0x0001
    RESPONSE_ADDRESS = 0x0002
    CHANGE_REQUEST = 0x0003
    SOURCE_ADDRESS = 0x0004
    CHANGED_ADDRESS = 0x0005
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    REALM = 0x0014
    NONCE = 0x0015
    MESSAGE_INTEGRITY_SHA256 = 0x001C
    PASSWORD_ALGORITHM = 0x001D
    USERHASH = 0x001E
    XOR_MAPPED_ADDRESS = 0x0020
    PADDING = 0x0026
    RESPONSE_PORT = 0x0027
    PASSWORD_ALGORITHMS = 0x8002
    ALTERNATE_DOMAIN = 0x8003
    SOFTWARE = 0x8022
    ALTERNATE_SERVER = 0x8023
    FINGERPRINT = 0x8028
    RESPONSE_ORIGIN = 0x802B
    OTHER_ADDRESS = 0x802C


_ADDRESS_ATTRS = frozenset(
    {
        Attr.MAPPED_ADDRESS,
        Attr.RESPONSE_ADDRESS,
        Attr.SOURCE_ADDRESS,
        Attr.CHANGED_ADDRESS,
        Attr.ALTERNATE_SERVER,
        Attr.RESPONSE_ORIGIN,
        Attr.OTHER_ADDRESS,
    }
)
_TEXT_ATTRS = {Attr.SOFTWARE: MAX_TEXT_SIZE, Attr.USERNAME: 513, Attr.REALM: MAX_TEXT_SIZE, Attr.NONCE: MAX_TEXT_SIZE}
_INTEGRITY_ATTRS = frozenset({Attr.MESSAGE_INTEGRITY, Attr.MESSAGE_INTEGRITY_SHA256})

ERROR_REASONS = {
    300: "Try Alternate",
    400: "Bad Request",
    401: "Unauthorized",
    420: "Unknown Attribute",
    438: "Stale Nonce",
    500: "Server Error",
}


# --- the message ---------------------------------------------------------------------


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


def _encode_type(method: int, cls: StunClass) -> int:
    # RFC 5389 s6: the class bits C0 and C1 sit between method bits M3/M4 and M6/M7.
    c = int(cls)
    return (method & 0x000F) | ((method & 0x0070) << 1) | ((method & 0x0F80) << 2) | ((c & 0x1) << 4) | ((c & 0x2) << 7)


def _decode_type(value: int) -> tuple[int, StunClass]:
    method = (value & 0x000F) | ((value & 0x00E0) >> 1) | ((value & 0x3E00) >> 2)
    cls = ((value >> 4) & 0x1) | ((value >> 7) & 0x2)
    return method, StunClass(cls)


def _decode_address(attr_type: int, value: bytes, transaction_id: bytes) -> Address:
    # RFC 5389 s15.1: 1 reserved byte, family (1 = IPv4, 2 = IPv6), port, address.
    if len(value) not in (8, 20):
        raise StunError(f"attribute 0x{attr_type:04x}: address of {len(value)} bytes (must be 8 or 20)")
    family = value[1]
    if (family, len(value)) not in ((1, 8), (2, 20)):
        raise StunError(f"attribute 0x{attr_type:04x}: family {family} does not match length {len(value)}")
    try:
        if attr_type == Attr.XOR_MAPPED_ADDRESS:
            return unpack_xor_address(value, transaction_id)
        return unpack_address(value)
    except ValueError as exc:  # cannot happen after the checks above; kept so only StunError escapes
        raise StunError(f"attribute 0x{attr_type:04x}: {exc}") from None


def _check_attribute(attr_type: int, value: bytes, transaction_id: bytes) -> None:
    """Validate the value of a known attribute, so the accessors never fail later."""
    if attr_type in _ADDRESS_ATTRS or attr_type == Attr.XOR_MAPPED_ADDRESS:
        _decode_address(attr_type, value, transaction_id)
    elif attr_type == Attr.CHANGE_REQUEST:
        if len(value) != 4:
            raise StunError(f"CHANGE-REQUEST of {len(value)} bytes (must be 4)")
    elif attr_type == Attr.RESPONSE_PORT:
        # A 16-bit port followed by 2 bytes of padding inside the value (RFC 5780 s7.5);
        # some encoders give the attribute length 2 and let the attribute padding do it.
        if len(value) not in (2, 4):
            raise StunError(f"RESPONSE-PORT of {len(value)} bytes (must be 4)")
    elif attr_type == Attr.ERROR_CODE:
        if not 4 <= len(value) <= 4 + MAX_TEXT_SIZE:
            raise StunError(f"ERROR-CODE of {len(value)} bytes")
        if not 3 <= (value[2] & 0x07) <= 6 or value[3] > 99:
            raise StunError(f"ERROR-CODE class {value[2] & 0x07} number {value[3]} out of range")
        _utf8(value[4:], "ERROR-CODE reason")
    elif attr_type == Attr.UNKNOWN_ATTRIBUTES:
        if len(value) % 2:
            raise StunError("UNKNOWN-ATTRIBUTES of odd length")
    elif attr_type in _TEXT_ATTRS:
        if len(value) > _TEXT_ATTRS[attr_type]:
            raise StunError(f"attribute 0x{attr_type:04x} longer than {_TEXT_ATTRS[attr_type]} bytes")
        _utf8(value, f"attribute 0x{attr_type:04x}")
    elif attr_type == Attr.MESSAGE_INTEGRITY:
        if len(value) != 20:
            raise StunError(f"MESSAGE-INTEGRITY of {len(value)} bytes (must be 20)")
    elif attr_type == Attr.MESSAGE_INTEGRITY_SHA256 and (len(value) % 4 or not 16 <= len(value) <= 32):
        raise StunError(f"MESSAGE-INTEGRITY-SHA256 of {len(value)} bytes")


def _utf8(value: bytes, what: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise StunError(f"{what} is not UTF-8") from None


@dataclass(frozen=True, slots=True)
class StunMessage:
    """One STUN message. ``attributes`` are raw (type, value) pairs in wire order, without
    FINGERPRINT; ``fingerprint`` says whether the encoded message carries one (last)."""

    method: int
    cls: StunClass
    transaction_id: bytes
    attributes: tuple[tuple[int, bytes], ...] = ()
    fingerprint: bool = True

    def __post_init__(self) -> None:
        if len(self.transaction_id) != TRANSACTION_ID_SIZE:
            raise StunError(f"transaction id must be {TRANSACTION_ID_SIZE} bytes")
        if not 0 <= self.method <= 0xFFF:
            raise StunError(f"method 0x{self.method:x} does not fit 12 bits")

    # --- encoding ----------------------------------------------------------------

    def encode(self) -> bytes:
        """The wire form, with FINGERPRINT appended last if ``fingerprint``."""
        body = bytearray()
        for attr_type, value in self.attributes:
            if not 0 <= attr_type <= 0xFFFF or len(value) > 0xFFFF:
                raise StunError(f"attribute 0x{attr_type:x} of {len(value)} bytes cannot be encoded")
            if attr_type == Attr.FINGERPRINT:
                raise StunError("FINGERPRINT is added by encode(); set fingerprint=True instead")
            body += struct.pack("!HH", attr_type, len(value)) + value + bytes(_pad4(len(value)))
        extra = 8 if self.fingerprint else 0
        if len(body) + extra > 0xFFFF:
            raise StunError("message longer than 65535 bytes")
        header = struct.pack(
            "!HHI12s", _encode_type(self.method, self.cls), len(body) + extra, MAGIC_COOKIE, self.transaction_id
        )
        data = header + bytes(body)
        if self.fingerprint:
            data += struct.pack("!HHI", Attr.FINGERPRINT, 4, message_fingerprint(data))
        return data

    def __bytes__(self) -> bytes:
        return self.encode()

    # --- raw access --------------------------------------------------------------

    def get(self, attr_type: int) -> bytes | None:
        """The value of the first attribute of ``attr_type`` (RFC 5389: later duplicates are ignored)."""
        for t, value in self.attributes:
            if t == attr_type:
                return value
        return None

    def has(self, attr_type: int) -> bool:
        return self.get(attr_type) is not None

    def attribute_types(self) -> list[int]:
        return [t for t, _ in self.attributes]

    # --- typed accessors ---------------------------------------------------------

    def _address(self, attr_type: int) -> Address | None:
        value = self.get(attr_type)
        return None if value is None else _decode_address(attr_type, value, self.transaction_id)

    @property
    def xor_mapped_address(self) -> Address | None:
        return self._address(Attr.XOR_MAPPED_ADDRESS)

    @property
    def mapped_address(self) -> Address | None:
        return self._address(Attr.MAPPED_ADDRESS)

    @property
    def reflexive_address(self) -> Address | None:
        """XOR-MAPPED-ADDRESS, else MAPPED-ADDRESS (servers of the RFC 3489 era send only that)."""
        return self.xor_mapped_address or self.mapped_address

    @property
    def response_origin(self) -> Address | None:
        return self._address(Attr.RESPONSE_ORIGIN)

    @property
    def other_address(self) -> Address | None:
        """OTHER-ADDRESS, else the RFC 3489 CHANGED-ADDRESS it replaced."""
        return self._address(Attr.OTHER_ADDRESS) or self._address(Attr.CHANGED_ADDRESS)

    @property
    def change_request(self) -> tuple[bool, bool] | None:
        """(change IP, change port), or None without CHANGE-REQUEST."""
        value = self.get(Attr.CHANGE_REQUEST)
        if value is None:
            return None
        flags = struct.unpack("!I", value)[0]
        return bool(flags & CHANGE_IP_FLAG), bool(flags & CHANGE_PORT_FLAG)

    @property
    def response_port(self) -> int | None:
        value = self.get(Attr.RESPONSE_PORT)
        return None if value is None else struct.unpack("!H", value[:2])[0]

    @property
    def padding_size(self) -> int:
        value = self.get(Attr.PADDING)
        return 0 if value is None else len(value)

    @property
    def software(self) -> str | None:
        value = self.get(Attr.SOFTWARE)
        return None if value is None else _utf8(value, "SOFTWARE")

    @property
    def error(self) -> tuple[int, str] | None:
        """(code, reason) of ERROR-CODE, or None."""
        value = self.get(Attr.ERROR_CODE)
        if value is None:
            return None
        return (value[2] & 0x07) * 100 + value[3], _utf8(value[4:], "ERROR-CODE reason")

    @property
    def unknown_attributes(self) -> tuple[int, ...]:
        value = self.get(Attr.UNKNOWN_ATTRIBUTES)
        if value is None:
            return ()
        return tuple(struct.unpack(f"!{len(value) // 2}H", value))

    def unknown_comprehension_required(self, known: Iterable[int]) -> list[int]:
        """Types in 0x0000-0x7FFF (comprehension-required, RFC 5389 s15) not in ``known``."""
        known_set = set(known)
        seen: list[int] = []
        for t, _ in self.attributes:
            if t < 0x8000 and t not in known_set and t not in seen:
                seen.append(t)
        return seen


# --- parsing -------------------------------------------------------------------------------


def looks_like_stun(data: bytes) -> bool:
    """The cheap demultiplexing test of RFC 5389 s8 / RFC 7983: top two bits zero, the
    magic cookie, a length that is a multiple of 4. Says nothing about validity."""
    return (
        len(data) >= HEADER_SIZE
        and data[0] & 0xC0 == 0
        and data[4:8] == b"\x21\x12\xa4\x42"
        and (data[2] << 8 | data[3]) % 4 == 0
    )


def parse(data: bytes, *, max_size: int = MAX_MESSAGE_SIZE, max_attributes: int = MAX_ATTRIBUTES) -> StunMessage:
    """Parse one datagram strictly. Raises :class:`StunError` (and nothing else) unless:
    the first two bits are 0, the magic cookie is present, the message length is a
    multiple of 4 and equals the rest of the datagram, every attribute fits, there are
    at most ``max_attributes``, known attributes have valid values, and a FINGERPRINT,
    if present, is last and correct. Attributes after MESSAGE-INTEGRITY other than
    FINGERPRINT are ignored (RFC 5389 s15.4)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise StunError("not bytes")
    data = bytes(data)
    if len(data) > max_size:
        raise StunError(f"datagram of {len(data)} bytes exceeds {max_size}")
    if len(data) < HEADER_SIZE:
        raise StunError(f"datagram of {len(data)} bytes is shorter than the 20-byte header")
    msg_type, length, cookie = struct.unpack_from("!HHI", data)
    if msg_type & 0xC000:
        raise StunError("first two bits are not zero")
    if cookie != MAGIC_COOKIE:
        raise StunError("no magic cookie (not STUN, or RFC 3489 only)")
    if length % 4:
        raise StunError(f"message length {length} is not a multiple of 4")
    if length != len(data) - HEADER_SIZE:
        raise StunError(f"message length {length} but {len(data) - HEADER_SIZE} bytes follow the header")
    method, cls = _decode_type(msg_type)
    transaction_id = data[8:HEADER_SIZE]

    attributes: list[tuple[int, bytes]] = []
    fingerprint = False
    after_integrity = False
    count = 0
    pos = HEADER_SIZE
    while pos < len(data):
        if fingerprint:
            raise StunError("attribute after FINGERPRINT (it must be last)")
        if len(data) - pos < 4:
            raise StunError("truncated attribute header")
        count += 1
        if count > max_attributes:
            raise StunError(f"more than {max_attributes} attributes")
        attr_type, attr_len = struct.unpack_from("!HH", data, pos)
        end = pos + 4 + attr_len
        if end + _pad4(attr_len) > len(data):
            raise StunError(f"attribute 0x{attr_type:04x} of {attr_len} bytes overruns the message")
        value = data[pos + 4 : end]
        if attr_type == Attr.FINGERPRINT:
            if attr_len != 4:
                raise StunError(f"FINGERPRINT of {attr_len} bytes (must be 4)")
            if struct.unpack("!I", value)[0] != message_fingerprint(data[:pos]):
                raise StunError("FINGERPRINT does not match")
            fingerprint = True
        elif not after_integrity or attr_type == Attr.MESSAGE_INTEGRITY_SHA256:
            _check_attribute(attr_type, value, transaction_id)
            attributes.append((attr_type, value))
            after_integrity = after_integrity or attr_type in _INTEGRITY_ATTRS
        pos = end + _pad4(attr_len)
    return StunMessage(method, cls, transaction_id, tuple(attributes), fingerprint)


# --- builders --------------------------------------------------------------------------------


def new_transaction_id() -> bytes:
    return os.urandom(TRANSACTION_ID_SIZE)


def _software(software: str | None) -> list[tuple[int, bytes]]:
    if software is None:
        return []
    raw = software.encode("utf-8")
    if len(raw) > MAX_TEXT_SIZE:
        raise StunError(f"SOFTWARE longer than {MAX_TEXT_SIZE} bytes")
    return [(Attr.SOFTWARE, raw)]


def _padding(size: int) -> list[tuple[int, bytes]]:
    if not 0 <= size <= MAX_PADDING:
        raise StunError(f"padding must be 0..{MAX_PADDING} bytes")
    return [(Attr.PADDING, bytes(size))] if size else []


def encode_address(address: Address) -> bytes:
    """MAPPED-ADDRESS style value (also RESPONSE-ORIGIN, OTHER-ADDRESS)."""
    try:
        return pack_address((address[0], address[1]))
    except (ValueError, struct.error) as exc:
        raise StunError(f"cannot encode address {address!r}: {exc}") from None


def encode_xor_address(address: Address, transaction_id: bytes) -> bytes:
    try:
        return pack_xor_address((address[0], address[1]), transaction_id)
    except (ValueError, struct.error) as exc:
        raise StunError(f"cannot encode address {address!r}: {exc}") from None


def binding_request(
    *,
    transaction_id: bytes | None = None,
    change_ip: bool = False,
    change_port: bool = False,
    response_port: int | None = None,
    padding: int = 0,
    software: str | None = None,
    fingerprint: bool = True,
) -> StunMessage:
    """A Binding request, optionally with CHANGE-REQUEST, RESPONSE-PORT and PADDING (RFC 5780)."""
    attrs: list[tuple[int, bytes]] = []
    if change_ip or change_port:
        flags = (CHANGE_IP_FLAG if change_ip else 0) | (CHANGE_PORT_FLAG if change_port else 0)
        attrs.append((Attr.CHANGE_REQUEST, struct.pack("!I", flags)))
    if response_port is not None:
        if not 1 <= response_port <= 0xFFFF:
            raise StunError(f"RESPONSE-PORT must be 1..65535, got {response_port}")
        attrs.append((Attr.RESPONSE_PORT, struct.pack("!HH", response_port, 0)))
    attrs += _software(software) + _padding(padding)
    return StunMessage(BINDING, StunClass.REQUEST, transaction_id or new_transaction_id(), tuple(attrs), fingerprint)


def binding_success(
    request: StunMessage,
    mapped: Address,
    *,
    response_origin: Address | None = None,
    other_address: Address | None = None,
    software: str | None = None,
    padding: int = 0,
    fingerprint: bool = True,
) -> StunMessage:
    """A Binding success response to ``request``: XOR-MAPPED-ADDRESS and MAPPED-ADDRESS
    (for clients of the RFC 3489 era that read only that), then RESPONSE-ORIGIN and
    OTHER-ADDRESS (RFC 5780) when given, SOFTWARE, PADDING."""
    attrs = [
        (Attr.XOR_MAPPED_ADDRESS, encode_xor_address(mapped, request.transaction_id)),
        (Attr.MAPPED_ADDRESS, encode_address(mapped)),
    ]
    if response_origin is not None:
        attrs.append((Attr.RESPONSE_ORIGIN, encode_address(response_origin)))
    if other_address is not None:
        attrs.append((Attr.OTHER_ADDRESS, encode_address(other_address)))
    attrs += _software(software) + _padding(padding)
    return StunMessage(request.method, StunClass.SUCCESS, request.transaction_id, tuple(attrs), fingerprint)


def error_response(
    request: StunMessage,
    code: int,
    reason: str | None = None,
    *,
    unknown_attributes: Sequence[int] = (),
    software: str | None = None,
    fingerprint: bool = True,
) -> StunMessage:
    """An error response (e.g. 400 Bad Request, 420 Unknown Attribute with UNKNOWN-ATTRIBUTES)."""
    if not 300 <= code <= 699:
        raise StunError(f"error code {code} is not 300..699")
    text = (reason if reason is not None else ERROR_REASONS.get(code, "Error")).encode("utf-8")
    if len(text) > MAX_TEXT_SIZE:
        raise StunError(f"error reason longer than {MAX_TEXT_SIZE} bytes")
    attrs = [(Attr.ERROR_CODE, struct.pack("!HBB", 0, code // 100, code % 100) + text)]
    if unknown_attributes:
        attrs.append((Attr.UNKNOWN_ATTRIBUTES, struct.pack(f"!{len(unknown_attributes)}H", *unknown_attributes)))
    attrs += _software(software)
    return StunMessage(request.method, StunClass.ERROR, request.transaction_id, tuple(attrs), fingerprint)


# --- the asyncio client ------------------------------------------------------------------------


def normalize_address(addr: Sequence[object]) -> Address:
    """(host, port) from a socket address tuple: drops IPv6 flow info and scope, unmaps ::ffff:a.b.c.d."""
    host = str(addr[0]).split("%", 1)[0]
    port = int(addr[1])  # type: ignore[call-overload]
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(host)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        host = str(ip)
    return host, port


def route_source(server: Address) -> str | None:
    """The local IP the kernel would send from towards ``server`` (a UDP connect sends nothing)."""
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(server)
        except OSError:
            return None
        return normalize_address(sock.getsockname())[0]


def format_address(addr: Address) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


@dataclass(frozen=True, slots=True)
class StunResponse:
    """A response and the address it came from (which CHANGE-REQUEST tests must check)."""

    message: StunMessage
    source: Address
    rtt: float


def retransmit_schedule(timeout: float, retries: int, rto: float = DEFAULT_RTO) -> list[float]:
    """Send times (seconds after the first send) for one transaction: 0, RTO, 3 RTO, 7 RTO...
    (RFC 5389 s7.2.1), at most ``1 + retries`` sends, all before ``timeout``."""
    times = [0.0]
    at, interval = 0.0, rto
    for _ in range(max(0, retries)):
        at += interval
        interval *= 2
        if at >= timeout:
            break
        times.append(at)
    return times


#: How many unsolicited requests a client remembers (for the hairpinning test).
_SEEN_REQUESTS = 64


class StunClient(asyncio.DatagramProtocol):
    """One UDP socket that sends STUN requests and matches responses by transaction id.

    Several transactions may run at once on the same socket. Requests that arrive on
    the socket (someone else's Binding request, e.g. our own hairpinned one) are
    remembered by transaction id. Anything that does not parse is ignored.
    """

    def __init__(self) -> None:
        self._transport: asyncio.DatagramTransport | None = None
        self._pending: dict[bytes, asyncio.Future[StunResponse]] = {}
        self._sent_at: dict[bytes, float] = {}
        self._requests_seen: OrderedDict[bytes, Address] = OrderedDict()
        self._request_waiters: dict[bytes, asyncio.Future[Address]] = {}
        self.local_address: Address = ("0.0.0.0", 0)

    @classmethod
    async def open(cls, local: Address = ("0.0.0.0", 0)) -> StunClient:
        """Bind a UDP socket on ``local`` (IPv4 or IPv6 by the address given)."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(local)
            sock.setblocking(False)
            _, protocol = await loop.create_datagram_endpoint(cls, sock=sock)
        except BaseException:
            sock.close()
            raise
        return protocol

    # --- DatagramProtocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector event loop's datagram transport does not subclass DatagramTransport.
        self._transport = cast(asyncio.DatagramTransport, transport)
        self.local_address = normalize_address(transport.get_extra_info("sockname"))

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        try:
            message = parse(data)
        except StunError:
            return
        source = normalize_address(addr)
        if message.cls == StunClass.REQUEST:
            self._requests_seen[message.transaction_id] = source
            while len(self._requests_seen) > _SEEN_REQUESTS:
                self._requests_seen.popitem(last=False)
            waiter = self._request_waiters.pop(message.transaction_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(source)
            return
        if message.cls not in (StunClass.SUCCESS, StunClass.ERROR):
            return
        future = self._pending.get(message.transaction_id)
        if future is not None and not future.done():
            rtt = time.monotonic() - self._sent_at.get(message.transaction_id, time.monotonic())
            future.set_result(StunResponse(message, source, rtt))

    def error_received(self, exc: Exception) -> None:
        # ICMP errors on an unconnected socket: nothing to match them to; retransmission copes.
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        closed = StunError("the STUN client socket was closed")
        for future in self._pending.values():
            if not future.done():
                future.set_exception(closed)
        for waiter in self._request_waiters.values():
            if not waiter.done():
                waiter.cancel()

    # --- API ----------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._transport is None or self._transport.is_closing()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def send(self, message: StunMessage | bytes, destination: Address) -> None:
        if self._transport is None or self._transport.is_closing():
            raise StunError("the STUN client socket is closed")
        data = message if isinstance(message, bytes) else message.encode()
        self._transport.sendto(data, destination)

    def expect(self, transaction_id: bytes) -> asyncio.Future[StunResponse]:
        """A future for the response to ``transaction_id``, whoever sent the request
        (RFC 5780 s4.6: the request goes out from another socket with RESPONSE-PORT)."""
        future = self._pending.get(transaction_id)
        if future is None or future.done():
            future = asyncio.get_running_loop().create_future()
            self._pending[transaction_id] = future
            self._sent_at[transaction_id] = time.monotonic()
        return future

    def forget(self, transaction_id: bytes) -> None:
        future = self._pending.pop(transaction_id, None)
        self._sent_at.pop(transaction_id, None)
        if future is not None and not future.done():
            future.cancel()

    def request_seen(self, transaction_id: bytes) -> Address | None:
        """The source of a request with this transaction id received on this socket, if any."""
        return self._requests_seen.get(transaction_id)

    async def wait_request(self, transaction_id: bytes, timeout: float) -> Address | None:
        """Wait (bounded) until a request with ``transaction_id`` arrives; its source, or None."""
        seen = self._requests_seen.get(transaction_id)
        if seen is not None:
            return seen
        future: asyncio.Future[Address] = asyncio.get_running_loop().create_future()
        self._request_waiters[transaction_id] = future
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return None
        finally:
            self._request_waiters.pop(transaction_id, None)

    async def request(
        self,
        destination: Address,
        message: StunMessage,
        *,
        timeout: float,
        retries: int = 6,
        rto: float = DEFAULT_RTO,
        sender: StunClient | None = None,
    ) -> StunResponse:
        """Send ``message`` to ``destination`` with retransmissions until a response with its
        transaction id arrives here; :class:`StunTimeout` after ``timeout`` seconds.

        ``sender``: send from another socket (the response still arrives here, e.g. with
        RESPONSE-PORT).
        """
        txid = message.transaction_id
        data = message.encode()
        future = self.expect(txid)
        out = sender or self
        try:
            start = time.monotonic()
            self._sent_at[txid] = start
            for at in retransmit_schedule(timeout, retries, rto):
                delay = start + at - time.monotonic()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        return await asyncio.wait_for(asyncio.shield(future), delay)
                elif future.done():
                    return future.result()
                out.send(data, destination)
            remaining = start + timeout - time.monotonic()
            try:
                return await asyncio.wait_for(asyncio.shield(future), max(remaining, 0.0))
            except TimeoutError:
                raise StunTimeout(f"no STUN response from {format_address(destination)} in {timeout:g} s") from None
        finally:
            self.forget(txid)


async def stun_request(
    sock_or_transport: StunClient | socket.socket,
    server: Address,
    *,
    change_ip: bool = False,
    change_port: bool = False,
    response_port: int | None = None,
    timeout: float = 3.0,
    retries: int = 6,
    rto: float = DEFAULT_RTO,
    software: str | None = None,
) -> StunResponse:
    """One Binding transaction to ``server``: build the request, retransmit (bounded), match
    the transaction id, return the response (success or error) and its source address.

    ``sock_or_transport`` is a :class:`StunClient` (several transactions may share it) or
    a bound non-blocking UDP ``socket.socket`` (one transaction at a time).
    Raises :class:`StunTimeout` when nothing arrives in ``timeout`` seconds.
    """
    request = binding_request(
        change_ip=change_ip, change_port=change_port, response_port=response_port, software=software
    )
    if isinstance(sock_or_transport, StunClient):
        return await sock_or_transport.request(server, request, timeout=timeout, retries=retries, rto=rto)
    return await _socket_request(sock_or_transport, server, request, timeout=timeout, retries=retries, rto=rto)


async def _socket_request(
    sock: socket.socket, server: Address, request: StunMessage, *, timeout: float, retries: int, rto: float
) -> StunResponse:
    loop = asyncio.get_running_loop()
    data = request.encode()
    start = time.monotonic()
    schedule = [start + at for at in retransmit_schedule(timeout, retries, rto)]
    deadline = start + timeout
    while True:
        now = time.monotonic()
        while schedule and schedule[0] <= now:
            schedule.pop(0)
            await loop.sock_sendto(sock, data, server)
        wake = min(schedule[0] if schedule else deadline, deadline)
        if now >= deadline:
            raise StunTimeout(f"no STUN response from {format_address(server)} in {timeout:g} s")
        try:
            raw, addr = await asyncio.wait_for(loop.sock_recvfrom(sock, 65535), max(wake - now, 0.0))
        except TimeoutError:
            continue
        with contextlib.suppress(StunError):
            message = parse(raw)
            if message.transaction_id == request.transaction_id and message.cls in (
                StunClass.SUCCESS,
                StunClass.ERROR,
            ):
                return StunResponse(message, normalize_address(addr), time.monotonic() - start)
