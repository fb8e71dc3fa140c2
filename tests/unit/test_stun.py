"""Tests for traversal/stun.py: the strict STUN codec, its builders and the asyncio client.

Round trips and interop with aioice's codec, one test per strictness rule, hypothesis
fuzzing (arbitrary and mutated datagrams only ever raise StunError), and the client's
retransmission and transaction-id matching against small loopback responders.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable

import aioice.stun
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from traversal import stun
from traversal.stun import (
    BINDING,
    Attr,
    StunClass,
    StunClient,
    StunError,
    StunMessage,
    StunTimeout,
    binding_request,
    binding_success,
    error_response,
    looks_like_stun,
    parse,
    retransmit_schedule,
    stun_request,
)

pytestmark = pytest.mark.timeout(60)

TXID = bytes(range(12))


def _raw(msg_type: int, body: bytes, *, cookie: int = stun.MAGIC_COOKIE, length: int | None = None) -> bytes:
    return struct.pack("!HHI12s", msg_type, len(body) if length is None else length, cookie, TXID) + body


def _attr(attr_type: int, value: bytes) -> bytes:
    return struct.pack("!HH", attr_type, len(value)) + value + bytes((4 - len(value) % 4) % 4)


# --- round trips -----------------------------------------------------------------------------


def test_binding_request_round_trip() -> None:
    request = binding_request(change_ip=True, change_port=True, response_port=40000, padding=64, software="t 1")
    data = request.encode()
    assert len(data) % 4 == 0 and looks_like_stun(data)
    parsed = parse(data)
    assert parsed == request
    assert parsed.method == BINDING and parsed.cls == StunClass.REQUEST
    assert parsed.change_request == (True, True)
    assert parsed.response_port == 40000
    assert parsed.padding_size == 64
    assert parsed.software == "t 1"
    assert parsed.fingerprint


@pytest.mark.parametrize(
    ("change_ip", "change_port", "flags"), [(False, False, None), (True, False, 4), (False, True, 2), (True, True, 6)]
)
def test_change_request_flags(change_ip: bool, change_port: bool, flags: int | None) -> None:
    request = binding_request(change_ip=change_ip, change_port=change_port)
    value = request.get(Attr.CHANGE_REQUEST)
    assert (None if value is None else struct.unpack("!I", value)[0]) == flags
    assert parse(request.encode()).change_request == (None if flags is None else (change_ip, change_port))


@pytest.mark.parametrize("mapped", [("198.51.100.7", 54321), ("2001:db8::1", 3478), ("0.0.0.0", 1)])
def test_success_response_round_trip(mapped: tuple[str, int]) -> None:
    request = binding_request()
    response = binding_success(
        request,
        mapped,
        response_origin=("203.0.113.1", 3478),
        other_address=("203.0.113.2", 3479),
        software="traversal-stun",
        padding=12,
    )
    parsed = parse(response.encode())
    assert parsed == response
    assert parsed.cls == StunClass.SUCCESS and parsed.transaction_id == request.transaction_id
    assert parsed.xor_mapped_address == mapped == parsed.mapped_address == parsed.reflexive_address
    assert parsed.response_origin == ("203.0.113.1", 3478)
    assert parsed.other_address == ("203.0.113.2", 3479)
    # XOR-MAPPED-ADDRESS really is XORed: the plain port never appears in its value.
    xor_value = parsed.get(Attr.XOR_MAPPED_ADDRESS)
    assert xor_value is not None and xor_value[2:4] != struct.pack("!H", mapped[1])


def test_error_response_round_trip() -> None:
    request = binding_request()
    response = error_response(request, 420, unknown_attributes=[0x0031, 0x7FFF], software="s")
    parsed = parse(response.encode())
    assert parsed.cls == StunClass.ERROR
    assert parsed.error == (420, "Unknown Attribute")
    assert parsed.unknown_attributes == (0x0031, 0x7FFF)
    assert parse(error_response(request, 400, "Bad Request: x").encode()).error == (400, "Bad Request: x")


def test_message_type_encoding_covers_every_class() -> None:
    # RFC 5389 s6: Binding request 0x0001, indication 0x0011, success 0x0101, error 0x0111.
    for cls, value in ((StunClass.REQUEST, 0x0001), (StunClass.INDICATION, 0x0011),
                       (StunClass.SUCCESS, 0x0101), (StunClass.ERROR, 0x0111)):  # fmt: skip
        data = StunMessage(BINDING, cls, TXID).encode()
        assert struct.unpack("!H", data[:2])[0] == value
        assert parse(data).cls == cls
    for method in (0x001, 0x003, 0x07F, 0x080, 0xFFF):
        assert parse(StunMessage(method, StunClass.REQUEST, TXID, fingerprint=False).encode()).method == method


def test_interop_with_aioice_both_ways() -> None:
    ours = binding_success(binding_request(), ("192.0.2.1", 1234), response_origin=("192.0.2.9", 3478))
    theirs = aioice.stun.parse_message(ours.encode())  # verifies our FINGERPRINT
    assert theirs.attributes["XOR-MAPPED-ADDRESS"] == ("192.0.2.1", 1234)
    assert theirs.attributes["RESPONSE-ORIGIN"] == ("192.0.2.9", 3478)
    message = aioice.stun.Message(aioice.stun.Method.BINDING, aioice.stun.Class.REQUEST)
    message.attributes["CHANGE-REQUEST"] = 6
    message.add_fingerprint()
    parsed = parse(bytes(message))
    assert parsed.change_request == (True, True) and parsed.fingerprint


def test_unknown_comprehension_required() -> None:
    attrs = ((0x0031, b""), (0x8031, b""), (Attr.CHANGE_REQUEST, bytes(4)), (0x0031, b""))
    message = StunMessage(BINDING, StunClass.REQUEST, TXID, attrs)
    assert message.unknown_comprehension_required({Attr.CHANGE_REQUEST}) == [0x0031]


# --- strictness: one rule each ---------------------------------------------------------------------


def _valid_body() -> bytes:
    return _attr(Attr.SOFTWARE, b"abc")


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "shorter"),
        (bytes(19), "shorter"),
        (_raw(0x4001, b""), "two bits"),
        (_raw(0x8001, b""), "two bits"),
        (_raw(0x0001, b"", cookie=0x2112A443), "cookie"),
        (_raw(0x0001, _valid_body() + b"\x00\x00", length=len(_valid_body()) + 2), "multiple of 4"),
        (_raw(0x0001, _valid_body(), length=len(_valid_body()) + 4), "follow the header"),
        (_raw(0x0001, _valid_body(), length=len(_valid_body()) - 4), "follow the header"),
        (_raw(0x0001, b"\x80\x22\x00\x10abcd"), "overruns"),
        (_raw(0x0001, _attr(Attr.SOFTWARE, b"ab") + b"\x80\x22\x00\x08abcd"), "overruns"),
        (_raw(0x0001, _attr(Attr.MAPPED_ADDRESS, b"\x00\x01\x00\x01\x01\x02\x03")), "address"),
        (_raw(0x0001, _attr(Attr.MAPPED_ADDRESS, b"\x00\x02\x00\x01\x01\x02\x03\x04")), "family"),
        (_raw(0x0001, _attr(Attr.XOR_MAPPED_ADDRESS, b"\x00\x03" + bytes(18))), "family"),
        (_raw(0x0001, _attr(Attr.CHANGE_REQUEST, bytes(8))), "CHANGE-REQUEST"),
        (_raw(0x0001, _attr(Attr.RESPONSE_PORT, bytes(8))), "RESPONSE-PORT"),
        (_raw(0x0111, _attr(Attr.ERROR_CODE, b"\x00\x00\x09\x00")), "ERROR-CODE class"),
        (_raw(0x0111, _attr(Attr.ERROR_CODE, b"\x00\x00\x04\x64")), "ERROR-CODE class"),
        (_raw(0x0111, _attr(Attr.ERROR_CODE, b"\x00\x00")), "ERROR-CODE of"),
        (_raw(0x0111, _attr(Attr.UNKNOWN_ATTRIBUTES, b"\x00\x01\x00")), "odd"),
        (_raw(0x0001, _attr(Attr.SOFTWARE, b"\xff\xfe")), "UTF-8"),
        (_raw(0x0001, _attr(Attr.SOFTWARE, b"a" * 764)), "longer"),
        (_raw(0x0001, _attr(Attr.MESSAGE_INTEGRITY, bytes(16))), "MESSAGE-INTEGRITY"),
        (_raw(0x0001, _attr(Attr.FINGERPRINT, bytes(4))), "FINGERPRINT does not match"),
        (_raw(0x0001, _attr(Attr.FINGERPRINT, bytes(8))), "FINGERPRINT of"),
        (_raw(0x0001, b"".join(_attr(0x8050, b"") for _ in range(33))), "more than 32"),
    ],
)
def test_malformed_is_rejected(data: bytes, why: str) -> None:
    with pytest.raises(StunError, match=why):
        parse(data)


def test_fingerprint_must_be_last() -> None:
    data = binding_request(software="x").encode()
    extra = _attr(0x8050, b"late")
    broken = data[:2] + struct.pack("!H", len(data) - 20 + len(extra)) + data[4:] + extra
    with pytest.raises(StunError, match="after FINGERPRINT"):
        parse(broken)


def test_fingerprint_corruption_is_detected() -> None:
    data = bytearray(binding_request(software="abcd").encode())
    data[-12] ^= 0x01  # inside SOFTWARE
    with pytest.raises(StunError, match="FINGERPRINT"):
        parse(bytes(data))


def test_attributes_after_message_integrity_are_ignored() -> None:
    body = _attr(Attr.SOFTWARE, b"a") + _attr(Attr.MESSAGE_INTEGRITY, bytes(20)) + _attr(Attr.SOFTWARE, b"zz")
    parsed = parse(_raw(0x0001, body))
    assert parsed.software == "a"
    assert parsed.attribute_types() == [Attr.SOFTWARE, Attr.MESSAGE_INTEGRITY]


def test_limits_are_parameters() -> None:
    data = binding_request(padding=1000).encode()
    parse(data)
    with pytest.raises(StunError, match="exceeds"):
        parse(data, max_size=512)
    with pytest.raises(StunError, match="more than 1"):
        parse(binding_request(padding=4, software="x").encode(), max_attributes=1)


def test_rfc3489_message_without_cookie_is_not_stun() -> None:
    legacy = struct.pack("!HH16s", 0x0001, 0, bytes(16))
    assert not looks_like_stun(legacy)
    with pytest.raises(StunError, match="cookie"):
        parse(legacy)


@pytest.mark.parametrize(
    "build",
    [
        lambda: StunMessage(BINDING, StunClass.REQUEST, b"short"),
        lambda: StunMessage(0x1000, StunClass.REQUEST, TXID),
        lambda: binding_request(response_port=0),
        lambda: binding_request(padding=5000),
        lambda: binding_request(software="x" * 800),
        lambda: error_response(binding_request(), 200),
        lambda: binding_success(binding_request(), ("not-an-ip", 1)),
        lambda: StunMessage(BINDING, StunClass.REQUEST, TXID, ((Attr.FINGERPRINT, bytes(4)),)).encode(),
    ],
)
def test_bad_builds_raise_stun_error(build: Callable[[], object]) -> None:
    with pytest.raises(StunError):
        build()


# --- fuzzing ------------------------------------------------------------------------------------

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


ACCESSORS = (
    "xor_mapped_address",
    "mapped_address",
    "response_origin",
    "other_address",
    "change_request",
    "response_port",
    "padding_size",
    "software",
    "error",
    "unknown_attributes",
)


def _parse_or_stun_error(data: bytes) -> StunMessage | None:
    try:
        message = parse(data)
    except StunError:
        return None
    # Whatever parses, every accessor works on it and it re-encodes to something that parses.
    for accessor in ACCESSORS:
        getattr(message, accessor)
    assert parse(message.encode()).attributes == message.attributes
    return message


@FUZZ
@given(st.binary(max_size=600))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    _parse_or_stun_error(data)


@FUZZ
@given(st.binary(min_size=0, max_size=300))
def test_fuzz_bytes_behind_a_valid_header(body: bytes) -> None:
    # Past the cheap checks, so the attribute walker itself is exercised.
    body = body[: len(body) - len(body) % 4]
    _parse_or_stun_error(_raw(0x0001, body))


_ATTR_TYPES = st.sampled_from([int(a) for a in Attr] + [0x0031, 0x8050, 0xFFFF])


@FUZZ
@given(st.lists(st.tuples(_ATTR_TYPES, st.binary(max_size=40)), max_size=12), st.sampled_from(list(StunClass)))
def test_fuzz_structured_attributes(attrs: list[tuple[int, bytes]], cls: StunClass) -> None:
    body = b"".join(_attr(t, v) for t, v in attrs)
    _parse_or_stun_error(_raw(0x0001 | (0x0010 if cls & 1 else 0) | (0x0100 if cls & 2 else 0), body))


VALID = [
    binding_request(change_ip=True, response_port=9, software="abc"),
    binding_success(
        binding_request(), ("2001:db8::7", 7), response_origin=("192.0.2.1", 1), other_address=("192.0.2.2", 2)
    ),
    error_response(binding_request(), 420, unknown_attributes=[1, 2, 3]),
]


@FUZZ
@given(st.sampled_from(VALID), st.data())
def test_fuzz_mutated_valid_messages(message: StunMessage, data: st.DataObject) -> None:
    raw = bytearray(message.encode())
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "truncate", "extend", "set_length"]))
        if op == "flip" and raw:
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "truncate":
            del raw[data.draw(st.integers(0, len(raw))) :]
        elif op == "extend":
            raw += data.draw(st.binary(max_size=16))
        elif len(raw) >= 4:
            raw[2:4] = struct.pack("!H", data.draw(st.integers(0, 0xFFFF)))
    _parse_or_stun_error(bytes(raw))


@FUZZ
@given(
    st.lists(
        st.tuples(st.integers(0x8040, 0xFFFF).filter(lambda t: t != Attr.FINGERPRINT), st.binary(max_size=30)),
        max_size=10,
    ),
    st.booleans(),
)
def test_round_trip_of_optional_attributes(attrs: list[tuple[int, bytes]], fingerprint: bool) -> None:
    message = StunMessage(BINDING, StunClass.INDICATION, TXID, tuple(attrs), fingerprint)
    assert parse(message.encode()) == message


# --- the asyncio client --------------------------------------------------------------------------


def test_retransmit_schedule_follows_rfc5389_and_the_deadline() -> None:
    assert retransmit_schedule(100, 6, 0.5) == [0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert retransmit_schedule(2.0, 6, 0.5) == [0, 0.5, 1.5]
    assert retransmit_schedule(2.0, 0, 0.5) == [0]


class _Responder(asyncio.DatagramProtocol):
    """Answers Binding requests after ignoring the first ``drop`` copies; optionally sends a
    response with a wrong transaction id and some junk first."""

    def __init__(self, drop: int = 0, decoy: bool = False) -> None:
        self.drop = drop
        self.decoy = decoy
        self.seen = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        request = parse(data)
        self.seen += 1
        if self.seen <= self.drop:
            return
        if self.decoy:
            other = binding_request()
            self.transport.sendto(b"junk that is not STUN", addr)
            self.transport.sendto(binding_success(other, ("192.0.2.66", 66)).encode(), addr)
        self.transport.sendto(binding_success(request, (addr[0], addr[1])).encode(), addr)


async def _responder(**kwargs: int | bool) -> tuple[asyncio.DatagramTransport, _Responder]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(lambda: _Responder(**kwargs), local_addr=("127.0.0.1", 0))  # type: ignore[arg-type]
    return transport, protocol  # type: ignore[return-value]


def test_client_retransmits_until_answered() -> None:
    async def main() -> None:
        transport, responder = await _responder(drop=2)
        client = await StunClient.open(("127.0.0.1", 0))
        try:
            server = transport.get_extra_info("sockname")[:2]
            response = await stun_request(client, server, timeout=2.0, rto=0.05)
            assert responder.seen == 3
            assert response.message.xor_mapped_address == client.local_address
            assert response.source == tuple(server)
        finally:
            client.close()
            transport.close()

    asyncio.run(asyncio.wait_for(main(), 10))


def test_client_matches_transaction_ids_and_ignores_junk() -> None:
    async def main() -> None:
        transport, _ = await _responder(decoy=True)
        client = await StunClient.open(("127.0.0.1", 0))
        try:
            server = transport.get_extra_info("sockname")[:2]
            response = await stun_request(client, server, timeout=2.0)
            assert response.message.xor_mapped_address == client.local_address  # not the decoy's 192.0.2.66
        finally:
            client.close()
            transport.close()

    asyncio.run(asyncio.wait_for(main(), 10))


def test_concurrent_transactions_on_one_socket() -> None:
    async def main() -> None:
        transport, responder = await _responder()
        client = await StunClient.open(("127.0.0.1", 0))
        try:
            server = transport.get_extra_info("sockname")[:2]
            results = await asyncio.gather(*(stun_request(client, server, timeout=2.0) for _ in range(5)))
            assert len({r.message.transaction_id for r in results}) == 5
            assert responder.seen == 5
        finally:
            client.close()
            transport.close()

    asyncio.run(asyncio.wait_for(main(), 10))


def test_client_times_out_within_its_deadline() -> None:
    async def main() -> None:
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind(("127.0.0.1", 0))
        client = await StunClient.open(("127.0.0.1", 0))
        try:
            started = time.monotonic()
            with pytest.raises(StunTimeout, match="no STUN response"):
                await stun_request(client, silent.getsockname(), timeout=0.6, rto=0.1)
            assert 0.55 <= time.monotonic() - started < 1.5
            # Every retransmission reached the silent server: 0, 0.1, 0.3 (0.7 is past the deadline).
            silent.setblocking(False)
            copies = 0
            with pytest.raises(BlockingIOError):
                while True:
                    silent.recv(2048)
                    copies += 1
            assert copies == 3
        finally:
            client.close()
            silent.close()

    asyncio.run(asyncio.wait_for(main(), 10))


def test_stun_request_on_a_plain_socket() -> None:
    async def main() -> None:
        transport, _ = await _responder(drop=1, decoy=True)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        try:
            server = transport.get_extra_info("sockname")[:2]
            response = await stun_request(sock, server, timeout=2.0, rto=0.05)
            assert response.message.xor_mapped_address == sock.getsockname()
            with pytest.raises(StunTimeout):
                await stun_request(sock, ("127.0.0.1", 9), timeout=0.2, rto=0.05)
        finally:
            sock.close()
            transport.close()

    asyncio.run(asyncio.wait_for(main(), 10))


def test_closed_client_fails_pending_requests_with_stun_error() -> None:
    async def main() -> None:
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind(("127.0.0.1", 0))
        client = await StunClient.open(("127.0.0.1", 0))
        try:
            task = asyncio.ensure_future(stun_request(client, silent.getsockname(), timeout=5.0))
            await asyncio.sleep(0.05)
            client.close()
            with pytest.raises(StunError):
                await asyncio.wait_for(task, 2)
        finally:
            silent.close()

    asyncio.run(asyncio.wait_for(main(), 10))
