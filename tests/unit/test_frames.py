"""Tests of the binary frame codec (``transport/frames.py``).

Properties: every frame round-trips; ``decode`` raises nothing but
:class:`FrameError` on arbitrary input and, whenever it accepts bytes, those
bytes are the canonical encoding of the frame; every truncation / extension /
field corruption of a valid encoding is rejected; ``encode`` rejects
out-of-range fields. Golden vectors pin the wire format.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from transport.constants import MAX_FRAME_SIZE, MAX_HANDSHAKE_SIZE, MAX_NETWORK_NAME, MAX_REASON, WIRE_VERSION
from transport.frames import (
    FORWARDED_TYPES,
    IDENTITY_SIZE,
    MAX_MEMBERS_LISTED,
    MAX_SESSION_PAYLOAD,
    NONCE_SIZE,
    SEALED_TYPES,
    SESSION_ID_SIZE,
    SIGNATURE_SIZE,
    Auth,
    AuthOk,
    Challenge,
    Error,
    ErrorCode,
    Established,
    Frame,
    FrameError,
    Hello,
    Members,
    MsgType,
    PeerJoined,
    PeerLeft,
    Ready,
    Release,
    SessionFrame,
    bundle_data_frames,
    data_head,
    data_record,
    decode,
    encode,
    encode_data,
    encode_session_frame,
    peek_type,
    split_bundle,
)

V = bytes([WIRE_VERSION])
SID = bytes(range(SESSION_ID_SIZE))
IDENT = bytes(range(0x20, 0x20 + IDENTITY_SIZE))
KNOWN_TYPES = {int(t) for t in MsgType}
CONTROL_TYPES = sorted(set(MsgType) - FORWARDED_TYPES)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def payload_limit(kind: MsgType) -> int:
    return MAX_HANDSHAKE_SIZE if kind == MsgType.HANDSHAKE else MAX_SESSION_PAYLOAD


# --- strategies ------------------------------------------------------------------


def fixed(size: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=size, max_size=size)


session_ids = fixed(SESSION_ID_SIZE)
identities = fixed(IDENTITY_SIZE)
u16s = st.integers(0, 0xFFFF)
u32s = st.integers(0, 0xFFFFFFFF)
ipv4s = st.ip_addresses(v=4).map(str)
ipv6s = st.ip_addresses(v=6).map(str)
ips = st.one_of(ipv4s, ipv6s)


def _cut_utf8(text: str, limit: int) -> str:
    return text.encode("utf-8")[:limit].decode("utf-8", errors="ignore")


def utf8_text(limit: int, *, min_size: int = 0) -> st.SearchStrategy[str]:
    """Strings of at most ``limit`` UTF-8 bytes, including ones exactly at it."""
    at_limit = st.sampled_from(["x" * limit, "\u00e9" * (limit // 2), "\U0001f600" * (limit // 4)])
    any_text = st.text(max_size=limit).map(lambda s: _cut_utf8(s, limit))
    return st.one_of(any_text, at_limit).filter(lambda s: len(s) >= min_size)


def payloads(limit: int, *, big: bool = True) -> st.SearchStrategy[bytes]:
    """Random short payloads plus patterned ones of any length up to ``limit``."""
    small = st.binary(max_size=min(limit, 300))
    if not big:
        return small
    patterned = st.builds(
        lambda n, seed: (seed * (n // len(seed) + 1))[:n], st.integers(0, limit), st.binary(min_size=1, max_size=8)
    )
    return st.one_of(small, patterned, st.just(bytes([0xA5]) * limit))


def session_frames(*, big: bool = True) -> st.SearchStrategy[SessionFrame]:
    return st.sampled_from(sorted(FORWARDED_TYPES)).flatmap(
        lambda kind: st.builds(SessionFrame, st.just(kind), session_ids, payloads(payload_limit(kind), big=big))
    )


hellos = st.builds(Hello, utf8_text(MAX_NETWORK_NAME, min_size=1), identities, st.booleans())
challenges = st.builds(Challenge, fixed(NONCE_SIZE))
auths = st.builds(Auth, fixed(SIGNATURE_SIZE))
auth_oks = st.builds(AuthOk, ips, u16s)
peer_joineds = st.builds(PeerJoined, session_ids, identities)
members_listed = st.lists(identities, max_size=MAX_MEMBERS_LISTED).map(lambda ids: Members(len(ids), tuple(ids)))
members_counted = st.integers(MAX_MEMBERS_LISTED + 1, 0xFFFFFFFF).map(lambda total: Members(total, ()))
memberses = st.one_of(members_listed, members_counted)
peer_lefts = st.builds(PeerLeft, session_ids, identities, utf8_text(MAX_REASON))
readies = st.builds(Ready, session_ids)
establisheds = st.builds(
    Established,
    session_id=session_ids,
    mtu=u16s,
    heartbeat_interval=u16s,
    key_rotation_interval=u32s,
    peer_public_ip=ips,
    peer_public_port=u16s,
    peer_supports_direct=st.booleans(),
)
releases = st.builds(Release, session_ids)
errors = st.builds(Error, st.one_of(st.sampled_from(ErrorCode), u16s), utf8_text(MAX_REASON))

control_frames = st.one_of(
    hellos, challenges, auths, auth_oks, memberses, peer_joineds, peer_lefts, readies, establisheds, releases, errors
)
all_frames = st.one_of(control_frames, session_frames())
small_frames = st.one_of(control_frames, session_frames(big=False))


def assert_decode_contract(data: bytes) -> Frame | None:
    """``decode`` returns a frame whose encoding is ``data``, or raises FrameError."""
    try:
        frame = decode(data)
    except FrameError:
        return None
    assert encode(frame) == data, f"non-canonical encoding accepted: {data.hex()}"
    return frame


# --- round trip --------------------------------------------------------------------


CONTROL_STRATEGIES = {
    "hello": hellos,
    "challenge": challenges,
    "auth": auths,
    "auth_ok": auth_oks,
    "members": memberses,
    "peer_joined": peer_joineds,
    "peer_left": peer_lefts,
    "ready": readies,
    "established": establisheds,
    "release": releases,
    "error": errors,
}


@pytest.mark.parametrize("strategy", CONTROL_STRATEGIES.values(), ids=CONTROL_STRATEGIES.keys())
@FAST
@given(data=st.data())
def test_control_frame_round_trip(strategy: st.SearchStrategy[Frame], data: st.DataObject) -> None:
    frame = data.draw(strategy)
    wire = encode(frame)
    assert wire[0] == WIRE_VERSION
    assert len(wire) <= MAX_FRAME_SIZE
    back = decode(wire)
    assert back == frame
    assert type(back) is type(frame)
    assert encode(back) == wire
    assert peek_type(wire) == wire[1]


@pytest.mark.parametrize("kind", sorted(FORWARDED_TYPES), ids=lambda k: k.name)
@SLOW
@given(session_id=session_ids, data=st.data())
def test_session_frame_round_trip(kind: MsgType, session_id: bytes, data: st.DataObject) -> None:
    payload = data.draw(payloads(payload_limit(kind)))
    frame = SessionFrame(kind, session_id, payload)
    wire = encode(frame)
    assert wire == encode_session_frame(kind, session_id, payload)
    assert len(wire) == 2 + SESSION_ID_SIZE + 2 + len(payload) <= MAX_FRAME_SIZE
    back = decode(wire)
    assert back == frame
    assert back.type is kind
    assert encode(back) == wire
    assert peek_type(wire) is kind


@pytest.mark.parametrize("ip", ["0.0.0.0", "255.255.255.255", "::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "::1"])
@pytest.mark.parametrize("n", [0, 1, 0xFFFF])
def test_established_and_auth_ok_extremes(ip: str, n: int) -> None:
    for frame in (
        AuthOk(ip, n),
        Established(SID, n, n, {0: 0, 1: 1}.get(n, 0xFFFFFFFF), ip, n, n == 1),
    ):
        assert decode(encode(frame)) == frame


def test_largest_frames_fit_exactly() -> None:
    sealed = encode_session_frame(MsgType.DATA, SID, bytes(MAX_SESSION_PAYLOAD))
    assert len(sealed) == MAX_FRAME_SIZE
    assert decode(sealed) == SessionFrame(MsgType.DATA, SID, bytes(MAX_SESSION_PAYLOAD))
    handshake = encode_session_frame(MsgType.HANDSHAKE, SID, bytes(MAX_HANDSHAKE_SIZE))
    assert decode(handshake).payload == bytes(MAX_HANDSHAKE_SIZE)


def test_decode_accepts_bytearray_and_memoryview() -> None:
    wire = encode(Hello("net", IDENT))
    assert decode(bytearray(wire)) == decode(memoryview(wire)) == Hello("net", IDENT)


@pytest.mark.parametrize("value", [None, "abc", 42, [10, 1]])
def test_decode_rejects_non_bytes(value: object) -> None:
    with pytest.raises(FrameError, match="must be bytes"):
        decode(value)  # type: ignore[arg-type]


# --- golden vectors ------------------------------------------------------------


def test_golden_hello() -> None:
    wire = bytes.fromhex(
        "0a01"  # version, HELLO
        "04"
        + b"home".hex()  # network name
        + IDENT.hex()  # identity
        + "01"  # supports direct
    )
    assert encode(Hello("home", IDENT, True)) == wire
    assert decode(wire) == Hello("home", IDENT, True)
    assert wire == bytes.fromhex(
        "0a010468 6f6d6520 21222324 25262728 292a2b2c 2d2e2f30 31323334 35363738 393a3b3c 3d3e3f01".replace(" ", "")
    )


def test_golden_established() -> None:
    frame = Established(SID, 1400, 5, 120, "203.0.113.7", 51820, True)
    wire = bytes.fromhex(
        "0a08"  # version, ESTABLISHED
        "000102030405060708090a0b0c0d0e0f"  # session id
        "0578"  # mtu 1400
        "0005"  # heartbeat 5 s
        "00000078"  # key rotation 120 s
        "04cb007107"  # IPv4 203.0.113.7
        "ca6c"  # port 51820
        "01"  # peer supports direct
    )
    assert encode(frame) == wire
    assert decode(wire) == frame
    frame6 = Established(SID, 9000, 0, 0xFFFFFFFF, "2001:db8::1", 443, False)
    wire6 = bytes.fromhex(
        "0a08000102030405060708090a0b0c0d0e0f"
        "2328"  # mtu 9000
        "0000"  # heartbeat 0
        "ffffffff"  # key rotation 2**32 - 1
        "0620010db8000000000000000000000001"  # IPv6 2001:db8::1
        "01bb"  # port 443
        "00"  # peer does not support direct
    )
    assert encode(frame6) == wire6
    assert decode(wire6) == frame6


def test_golden_members() -> None:
    wire = encode(Members(2, (IDENT, SID * 2)))
    assert wire == V + bytes([MsgType.MEMBERS]) + b"\x00\x00\x00\x02" + b"\x00\x02" + IDENT + SID * 2
    assert encode(Members(1000, ())) == V + bytes([MsgType.MEMBERS]) + struct.pack("!IH", 1000, 0)
    with pytest.raises(FrameError, match="all of them"):
        decode(V + bytes([MsgType.MEMBERS]) + struct.pack("!IH", 3, 1) + IDENT)


def test_golden_session_frame() -> None:
    assert encode_session_frame(MsgType.DATA, SID, b"hi") == bytes.fromhex(
        "0a12000102030405060708090a0b0c0d0e0f00026869"
    )


# --- decode never raises anything but FrameError; accepted bytes are canonical ------


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=1200))
def test_decode_arbitrary_bytes(data: bytes) -> None:
    assert_decode_contract(data)


@settings(max_examples=1500, deadline=None)
@given(kind=st.sampled_from(sorted(MsgType)), body=st.binary(max_size=600))
def test_decode_arbitrary_body_after_valid_header(kind: MsgType, body: bytes) -> None:
    assert_decode_contract(V + bytes([kind]) + body)


@settings(max_examples=1500, deadline=None)
@given(
    frame=small_frames,
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=3),
)
def test_decode_byte_flips_of_valid_frames(frame: Frame, edits: list[tuple[int, int]]) -> None:
    wire = bytearray(encode(frame))
    for pos, value in edits:
        wire[pos % len(wire)] = value
    assert_decode_contract(bytes(wire))


@settings(max_examples=300, deadline=None)
@given(frame=small_frames, cut=st.integers(0, 10_000), insert=st.binary(min_size=1, max_size=20))
def test_decode_splices_of_valid_frames(frame: Frame, cut: int, insert: bytes) -> None:
    wire = encode(frame)
    cut %= len(wire) + 1
    assert_decode_contract(wire[:cut] + insert + wire[cut:])
    assert_decode_contract(wire[:cut] + wire[cut + len(insert) :])


# --- mutations of valid encodings ------------------------------------------------------


@SLOW
@given(small_frames)
def test_every_truncation_rejected(frame: Frame) -> None:
    wire = encode(frame)
    for i in range(len(wire)):
        with pytest.raises(FrameError):
            decode(wire[:i])


def test_truncations_of_largest_frame_rejected() -> None:
    wire = encode_session_frame(MsgType.DATA, SID, bytes(MAX_SESSION_PAYLOAD))
    for i in [*range(24), MAX_FRAME_SIZE // 2, MAX_FRAME_SIZE - 1]:
        with pytest.raises(FrameError):
            decode(wire[:i])


@FAST
@given(frame=all_frames, extra=st.binary(min_size=1, max_size=4))
def test_trailing_bytes_rejected(frame: Frame, extra: bytes) -> None:
    wire = encode(frame)
    match = "exceeds" if len(wire) + len(extra) > MAX_FRAME_SIZE else "trailing"
    with pytest.raises(FrameError, match=match):
        decode(wire + extra)


@FAST
@given(frame=small_frames, version=st.integers(0, 255).filter(lambda v: v != WIRE_VERSION))
def test_wrong_version_rejected(frame: Frame, version: int) -> None:
    wire = bytes([version]) + encode(frame)[1:]
    with pytest.raises(FrameError, match="wire version"):
        decode(wire)
    with pytest.raises(FrameError, match="wire version"):
        peek_type(wire)


@pytest.mark.parametrize("kind", sorted(set(range(256)) - KNOWN_TYPES))
def test_unknown_type_rejected(kind: int) -> None:
    for body in (b"", SID + b"\x00\x00", bytes(100)):
        with pytest.raises(FrameError, match="unknown frame type"):
            decode(V + bytes([kind]) + body)


@pytest.mark.parametrize("data", [b"", V, b"\x0b"])
def test_shorter_than_header_rejected(data: bytes) -> None:
    with pytest.raises(FrameError, match="shorter than its header"):
        decode(data)
    with pytest.raises(FrameError, match="shorter than its header"):
        peek_type(data)


@pytest.mark.parametrize("kind", sorted(FORWARDED_TYPES), ids=lambda k: k.name)
@FAST
@given(payload=st.binary(max_size=64), excess=st.integers(1, 0xFFFF))
def test_session_length_prefix_beyond_data(kind: MsgType, payload: bytes, excess: int) -> None:
    claimed = len(payload) + excess
    assume(claimed <= 0xFFFF)
    wire = V + bytes([kind]) + SID + struct.pack("!H", claimed) + payload
    match = "limit" if claimed > payload_limit(kind) else "truncated"
    with pytest.raises(FrameError, match=match):
        decode(wire)


def _hello_wire(name: bytes, length: int | None = None, flag: int = 1) -> bytes:
    n = len(name) if length is None else length
    return V + bytes([MsgType.HELLO, n]) + name + IDENT + bytes([flag])


def _peer_left_wire(reason: bytes, length: int | None = None) -> bytes:
    n = len(reason) if length is None else length
    return V + bytes([MsgType.PEER_LEFT]) + SID + IDENT + bytes([n]) + reason


def _error_wire(reason: bytes, length: int | None = None) -> bytes:
    n = len(reason) if length is None else length
    return V + bytes([MsgType.ERROR]) + b"\x00\x01" + bytes([n]) + reason


def test_text_length_prefixes_beyond_data() -> None:
    # HELLO: a too-large name length eats into the identity and leaves it short.
    for n in range(5, MAX_NETWORK_NAME + 1):
        with pytest.raises(FrameError, match="truncated"):
            decode(_hello_wire(b"home", n))
    for build in (_peer_left_wire, _error_wire):
        assert_decode_contract(build(b"bye"))
        for n in (4, 100, 255):
            with pytest.raises(FrameError, match="truncated"):
                decode(build(b"bye", n))


def test_over_limit_fields_rejected_by_decode() -> None:
    for n in (MAX_NETWORK_NAME + 1, 200, 255):
        with pytest.raises(FrameError, match="limit"):
            decode(_hello_wire(b"a" * n))
    # MAX_REASON equals the u8 maximum: a reason length byte can never exceed it.
    assert MAX_REASON == 0xFF
    assert decode(_error_wire(b"r" * MAX_REASON)) == Error(1, "r" * MAX_REASON)
    handshake = V + bytes([MsgType.HANDSHAKE]) + SID + struct.pack("!H", MAX_HANDSHAKE_SIZE + 1)
    with pytest.raises(FrameError, match="limit"):
        decode(handshake + bytes(MAX_HANDSHAKE_SIZE + 1))
    for kind in SEALED_TYPES:
        sealed = V + bytes([kind]) + SID + struct.pack("!H", MAX_SESSION_PAYLOAD + 1)
        with pytest.raises(FrameError, match="limit"):
            decode(sealed)


def test_empty_network_rejected_by_decode() -> None:
    with pytest.raises(FrameError, match="empty"):
        decode(_hello_wire(b""))


@pytest.mark.parametrize(
    "bad",
    [b"\xff", b"\xc3\x28", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"ok\xe2\x82", b"\x80"],
    ids=["ff", "bad-continuation", "overlong", "surrogate", "above-max", "cut-sequence", "lone-continuation"],
)
def test_non_utf8_text_rejected(bad: bytes) -> None:
    for wire in (_hello_wire(bad), _peer_left_wire(bad), _error_wire(bad)):
        with pytest.raises(FrameError, match="UTF-8"):
            decode(wire)


@pytest.mark.parametrize("flag", [2, 3, 0x80, 0xFF])
def test_flag_byte_above_one_rejected(flag: int) -> None:
    with pytest.raises(FrameError, match="0 or 1"):
        decode(_hello_wire(b"home", flag=flag))
    wire = bytearray(encode(Established(SID, 1400, 5, 120, "::1", 1, True)))
    wire[-1] = flag
    with pytest.raises(FrameError, match="0 or 1"):
        decode(bytes(wire))


@pytest.mark.parametrize("family", [0, 1, 5, 41, 0xFF])
def test_unknown_address_family_rejected(family: int) -> None:
    for frame in (AuthOk("192.0.2.1", 7), Established(SID, 1400, 5, 120, "192.0.2.1", 7, False)):
        wire = bytearray(encode(frame))
        family_at = wire.index(bytes([4, 192, 0, 2, 1]))
        wire[family_at] = family
        with pytest.raises(FrameError, match="address family"):
            decode(bytes(wire))


def test_address_family_length_mismatch_rejected() -> None:
    v4 = encode(AuthOk("192.0.2.1", 7))
    as_v6 = v4[:2] + b"\x06" + v4[3:]
    with pytest.raises(FrameError, match="truncated"):
        decode(as_v6)
    v6 = encode(AuthOk("2001:db8::1", 7))
    as_v4 = v6[:2] + b"\x04" + v6[3:]
    with pytest.raises(FrameError, match="trailing"):
        decode(as_v4)


# --- oversize frames ---------------------------------------------------------------


@pytest.mark.parametrize("first_two", [V + bytes([t]) for t in sorted(MsgType)] + [b"\x00\x00", b"\x0a\xee"])
def test_oversize_rejected_before_parsing(first_two: bytes) -> None:
    for size in (MAX_FRAME_SIZE + 1, 2 * MAX_FRAME_SIZE):
        data = first_two + bytes(size - 2)
        with pytest.raises(FrameError, match="exceeds"):
            decode(data)
        with pytest.raises(FrameError, match="exceeds"):
            peek_type(data)


def test_oversize_otherwise_well_formed_session_frame_rejected() -> None:
    # Self-consistent length prefix, but the frame is one byte over the limit.
    payload = bytes(MAX_SESSION_PAYLOAD + 1)
    data = V + bytes([MsgType.DATA]) + SID + struct.pack("!H", len(payload)) + payload
    assert len(data) == MAX_FRAME_SIZE + 1
    with pytest.raises(FrameError, match="exceeds"):
        decode(data)


# --- encode rejects out-of-range fields ----------------------------------------------

BAD_FRAMES = {
    "auth_ok port 70000": AuthOk("192.0.2.1", 70000),
    "auth_ok port -1": AuthOk("192.0.2.1", -1),
    "established port 70000": Established(SID, 1400, 5, 120, "192.0.2.1", 70000, True),
    "established mtu 65536": Established(SID, 0x10000, 5, 120, "192.0.2.1", 1, True),
    "established mtu -1": Established(SID, -1, 5, 120, "192.0.2.1", 1, True),
    "established heartbeat 65536": Established(SID, 1400, 0x10000, 120, "192.0.2.1", 1, True),
    "established key rotation 2**32": Established(SID, 1400, 5, 1 << 32, "192.0.2.1", 1, True),
    "established key rotation -1": Established(SID, 1400, 5, -1, "192.0.2.1", 1, True),
    "error code 65536": Error(0x10000, "x"),
    "error code -1": Error(-1, "x"),
    "hello identity 31": Hello("net", bytes(31)),
    "hello identity 33": Hello("net", bytes(33)),
    "hello empty network": Hello("", IDENT),
    "hello network 65 bytes": Hello("n" * (MAX_NETWORK_NAME + 1), IDENT),
    "hello network 33 two-byte chars": Hello("\u00e9" * 33, IDENT),
    "challenge nonce 31": Challenge(bytes(NONCE_SIZE - 1)),
    "challenge nonce 33": Challenge(bytes(NONCE_SIZE + 1)),
    "auth signature 63": Auth(bytes(SIGNATURE_SIZE - 1)),
    "auth signature 65": Auth(bytes(SIGNATURE_SIZE + 1)),
    "auth signature empty": Auth(b""),
    "peer_joined session id 15": PeerJoined(bytes(15), IDENT),
    "members listing some": Members(3, (IDENT, IDENT)),
    "members listing too many": Members(MAX_MEMBERS_LISTED + 1, (IDENT,) * (MAX_MEMBERS_LISTED + 1)),
    "members identity 31": Members(1, (bytes(31),)),
    "members count -1": Members(-1, ()),
    "peer_joined peer 31": PeerJoined(SID, bytes(31)),
    "peer_left session id 17": PeerLeft(bytes(17), IDENT, "x"),
    "peer_left peer 33": PeerLeft(SID, bytes(33), "x"),
    "peer_left reason 256 bytes": PeerLeft(SID, IDENT, "r" * (MAX_REASON + 1)),
    "error reason 256 bytes": Error(1, "\u00e9" * 128),
    "ready session id 15": Ready(bytes(15)),
    "release session id 17": Release(bytes(17)),
    "established session id 0": Established(b"", 1400, 5, 120, "192.0.2.1", 1, True),
    "session frame session id 15": SessionFrame(MsgType.DATA, bytes(15), b""),
    "handshake payload too long": SessionFrame(MsgType.HANDSHAKE, SID, bytes(MAX_HANDSHAKE_SIZE + 1)),
    "data payload too long": SessionFrame(MsgType.DATA, SID, bytes(MAX_SESSION_PAYLOAD + 1)),
    "session frame of control type": SessionFrame(MsgType.HELLO, SID, b""),
} | {
    f"auth_ok ip {ip!r}": AuthOk(ip, 1)
    for ip in ["", "1.2.3", "256.1.1.1", "01.2.3.4", "localhost", "::g", "1.2.3.4:80", "[::1]", " 1.2.3.4", "1::2::3"]
}


@pytest.mark.parametrize("frame", BAD_FRAMES.values(), ids=BAD_FRAMES.keys())
def test_encode_rejects_out_of_range(frame: Frame) -> None:
    with pytest.raises(FrameError):
        encode(frame)


def test_encode_established_rejects_invalid_ip() -> None:
    with pytest.raises(FrameError, match="not an IP address"):
        encode(Established(SID, 1400, 5, 120, "example.com", 1, True))


@pytest.mark.parametrize("kind", sorted(SEALED_TYPES), ids=lambda k: k.name)
def test_encode_payload_limit_boundary(kind: MsgType) -> None:
    encode_session_frame(kind, SID, bytes(MAX_SESSION_PAYLOAD))
    encode_session_frame(MsgType.HANDSHAKE, SID, bytes(MAX_HANDSHAKE_SIZE))
    with pytest.raises(FrameError, match="limit"):
        encode_session_frame(kind, SID, bytes(MAX_SESSION_PAYLOAD + 1))
    with pytest.raises(FrameError, match="limit"):
        encode_session_frame(MsgType.HANDSHAKE, SID, bytes(MAX_HANDSHAKE_SIZE + 1))


@pytest.mark.parametrize("value", [object(), b"\x0a\x01", None, 3])
def test_encode_rejects_non_frames(value: object) -> None:
    with pytest.raises(FrameError, match="not a frame"):
        encode(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", CONTROL_TYPES, ids=lambda k: k.name)
def test_encode_session_frame_rejects_control_types(kind: MsgType) -> None:
    with pytest.raises(FrameError, match="not a session frame"):
        encode_session_frame(kind, SID, b"")


# --- encoder input validation (regressions found by this suite) -------------------------


@pytest.mark.parametrize(
    "frame",
    [Error(1, "\ud800"), PeerLeft(SID, IDENT, "a\udfff"), Hello("n\ud83d", IDENT)],
    ids=["error", "peer_left", "hello"],
)
def test_encode_lone_surrogate_raises_frame_error(frame: Frame) -> None:
    with pytest.raises(FrameError):
        encode(frame)


def test_encode_session_frame_accepts_plain_int_type() -> None:
    assert encode_session_frame(0x12, SID, b"hi") == encode_session_frame(MsgType.DATA, SID, b"hi")  # type: ignore[arg-type]


def test_encode_non_integer_port_raises_frame_error() -> None:
    with pytest.raises(FrameError):
        encode(AuthOk("192.0.2.1", 1.5))  # type: ignore[arg-type]


def test_encode_scoped_ipv6_is_rejected() -> None:
    with pytest.raises(FrameError):
        encode(AuthOk("fe80::1%eth0", 1))


# --- BUNDLE: several DATA records of one session in one relayed frame ----------------------


def _data(session_id: bytes, payload: bytes) -> bytes:
    return encode_session_frame(MsgType.DATA, session_id, payload)


def _records(wire: list[bytes]) -> list[tuple[MsgType, bytes, bytes]]:
    """What the wire carries, record by record: (type, session id, record)."""
    out = []
    for data in wire:
        frame = decode(data)
        assert isinstance(frame, SessionFrame)
        if frame.type == MsgType.BUNDLE:
            out += [(MsgType.DATA, frame.session_id, record) for record in split_bundle(frame.payload)]
        else:
            out.append((frame.type, frame.session_id, frame.payload))
    return out


def test_bundles_keep_every_record_and_the_order() -> None:
    other = bytes(16)
    per_bundle = MAX_SESSION_PAYLOAD // (2 + 1400)  # full-sized records one BUNDLE holds
    wire = [
        *(_data(SID, bytes([i]) * 1400) for i in range(per_bundle + 3)),
        encode_session_frame(MsgType.PATH, SID, b"p" * 40),
        _data(SID, b"lone"),
        encode_session_frame(MsgType.HEARTBEAT, SID, b"h" * 30),
        _data(SID, b"x" * 100),
        _data(other, b"y" * 100),
        _data(other, b"z" * 100),
    ]
    bundled = bundle_data_frames(wire)
    assert _records(bundled) == _records(wire)
    kinds = [decode(data).type for data in bundled]  # type: ignore[union-attr]
    # Full frames fill a BUNDLE, the 3 left over make the next; lone frames stay DATA; sessions never mix.
    assert kinds == [
        MsgType.BUNDLE,
        MsgType.BUNDLE,
        MsgType.PATH,
        MsgType.DATA,
        MsgType.HEARTBEAT,
        MsgType.DATA,
        MsgType.BUNDLE,
    ]
    assert all(len(data) <= MAX_FRAME_SIZE for data in bundled)
    assert bundle_data_frames([]) == []


@given(st.lists(st.binary(min_size=1, max_size=3000), max_size=30))
def test_bundles_round_trip_any_payload_sizes(payloads: list[bytes]) -> None:
    wire = [_data(SID, payload) for payload in payloads]
    bundled = bundle_data_frames(wire)
    assert _records(bundled) == _records(wire)
    assert all(len(data) <= MAX_FRAME_SIZE for data in bundled)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"", "at least 2"),
        (b"\x00\x03abc", "at least 2"),  # one record: a plain DATA frame's job
        (b"\x00\x03abc\x00", "truncated length prefix"),
        (b"\x00\x03abc\x00\x05ab", "length 5, 2 bytes left"),
        (b"\x00\x00\x00\x01a", "length 0"),
    ],
)
def test_split_bundle_is_strict(payload: bytes, match: str) -> None:
    with pytest.raises(FrameError, match=match):
        split_bundle(payload)


@given(st.binary(max_size=600))
def test_split_bundle_raises_only_frame_errors(payload: bytes) -> None:
    try:
        records = split_bundle(payload)
    except FrameError:
        return
    assert len(records) >= 2 and sum(2 + len(r) for r in records) == len(payload)


def _data_record_agrees_with_decode(data: bytes) -> None:
    try:
        frame = decode(data)
    except FrameError:
        frame = None
    expected = frame.payload if isinstance(frame, SessionFrame) and frame.type == MsgType.DATA else None
    assert data_record(data) == expected


@given(st.binary(max_size=64))
def test_data_record_is_as_strict_as_decode_on_junk(data: bytes) -> None:
    _data_record_agrees_with_decode(data)


@given(payload=st.binary(max_size=300), cut=st.integers(0, 400), byte=st.integers(0, 255), at=st.integers(0, 400))
def test_data_record_is_as_strict_as_decode_on_damaged_frames(payload: bytes, cut: int, byte: int, at: int) -> None:
    wire = bytearray(encode_session_frame(MsgType.DATA, SID, payload))
    _data_record_agrees_with_decode(bytes(wire))
    if at < len(wire):
        wire[at] = byte
    _data_record_agrees_with_decode(bytes(wire))
    _data_record_agrees_with_decode(bytes(wire[:cut]))
    _data_record_agrees_with_decode(bytes(wire) + b"\x00")
    _data_record_agrees_with_decode(bytes(MAX_FRAME_SIZE - 19) + bytes(wire))  # oversized


@given(payload=st.binary(max_size=MAX_SESSION_PAYLOAD))
def test_encode_data_is_encode_session_frame(payload: bytes) -> None:
    assert encode_data(data_head(SID), payload) == encode_session_frame(MsgType.DATA, SID, payload)


def test_encode_data_checks_its_inputs() -> None:
    with pytest.raises(FrameError, match="session id"):
        data_head(b"short")
    with pytest.raises(FrameError, match="limit"):
        encode_data(data_head(SID), bytes(MAX_SESSION_PAYLOAD + 1))
