"""Tests for traversal/candidates.py: the CANDIDATES offer codec, candidate parsing,
port prediction, observed candidates and the choice of local addresses.

Round trips, one test per strictness rule, and hypothesis fuzzing (arbitrary and mutated
bytes only ever raise CandidateError).
"""

from __future__ import annotations

import contextlib
import struct

import ifaddr
import pytest
from aioice import Candidate
from hypothesis import given, settings
from hypothesis import strategies as st

from transport.constants import MAX_CANDIDATES, MAX_OBSERVED_CANDIDATES, MAX_PREDICTED_CANDIDATES
from traversal.candidates import (
    MAX_ATTEMPT,
    MAX_OFFER_SIZE,
    CandidateError,
    CandidateOffer,
    decode_offer,
    encode_offer,
    host_candidate,
    observed_candidates,
    parse_candidate,
    predict_ports,
    predicted_candidates,
    predicted_index,
    reflexive_candidate,
    usable_host_addresses,
)

pytestmark = pytest.mark.timeout(60)

HOST = host_candidate("192.168.1.2", 40000).to_sdp()
HOST6 = host_candidate("2001:db8::2", 40000).to_sdp()
SRFLX = reflexive_candidate(("203.0.113.11", 40000), ("192.168.1.2", 40000)).to_sdp()
PREDICTED = [c.to_sdp() for c in predicted_candidates("203.0.113.11", [20021, 20028], ("192.168.1.2", 40000))]
UFRAG, PWD = "abcd", "A" * 22


def offer(**changes: object) -> CandidateOffer:
    fields: dict[str, object] = {
        "attempt": 3,
        "ufrag": UFRAG,
        "pwd": PWD,
        "candidates": (HOST, SRFLX, *PREDICTED, HOST6),
        "fingerprint": bytes(range(32)),
    }
    fields.update(changes)
    return CandidateOffer(**fields)  # type: ignore[arg-type]


# --- the offer codec ---------------------------------------------------------------------------


@pytest.mark.parametrize("fingerprint", [None, bytes(32), b"\xff" * 32])
@pytest.mark.parametrize("attempt", [0, 1, MAX_ATTEMPT])
def test_offer_round_trip(fingerprint: bytes | None, attempt: int) -> None:
    original = offer(fingerprint=fingerprint, attempt=attempt)
    data = encode_offer(original)
    assert len(data) <= MAX_OFFER_SIZE
    assert decode_offer(data) == original


def test_offer_round_trip_limits() -> None:
    many = tuple(host_candidate(f"10.0.0.{i + 1}", 40000 + i).to_sdp() for i in range(MAX_CANDIDATES))
    big = offer(ufrag="u" * 256, pwd="p" * 256, candidates=many)
    data = encode_offer(big)
    assert decode_offer(data) == big
    assert decode_offer(encode_offer(offer(candidates=()))).candidates == ()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"attempt": -1}, "attempt"),
        ({"attempt": MAX_ATTEMPT + 1}, "attempt"),
        ({"attempt": True}, "attempt"),
        ({"ufrag": "abc"}, "ufrag"),
        ({"ufrag": "ab cd"}, "ufrag"),
        ({"ufrag": "é" * 4}, "ufrag"),
        ({"pwd": "A" * 21}, "pwd"),
        ({"pwd": "A" * 257}, "pwd"),
        ({"fingerprint": bytes(31)}, "fingerprint"),
        ({"fingerprint": "x" * 32}, "fingerprint"),
        ({"candidates": [HOST]}, "tuple"),
        ({"candidates": (HOST,) * (MAX_CANDIDATES + 1)}, "candidates"),
        ({"candidates": ("nonsense",)}, "candidate 0"),
    ],
)
def test_encode_refuses_invalid_offers(changes: dict[str, object], message: str) -> None:
    with pytest.raises(CandidateError, match=message):
        encode_offer(offer(**changes))


def _reencode(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


def test_decode_strictness() -> None:
    data = encode_offer(offer())
    assert decode_offer(data)
    with pytest.raises(CandidateError, match="version"):
        decode_offer(_reencode(data, 0, b"\x02"))
    with pytest.raises(CandidateError, match="flags"):
        decode_offer(_reencode(data, 5, b"\x03"))
    with pytest.raises(CandidateError, match="after the offer"):
        decode_offer(data + b"\x00")
    with pytest.raises(CandidateError, match="bytes"):
        decode_offer(b"\x01" * (MAX_OFFER_SIZE + 1))
    with pytest.raises(CandidateError, match="attempt"):
        decode_offer(_reencode(data, 1, struct.pack("!I", MAX_ATTEMPT + 1)))
    with pytest.raises(CandidateError):
        decode_offer("not bytes")  # type: ignore[arg-type]
    for cut in range(len(data)):
        with pytest.raises(CandidateError):
            decode_offer(data[:cut])


def test_decode_refuses_oversized_fields() -> None:
    head = struct.pack("!BIB", 1, 0, 0)
    with pytest.raises(CandidateError, match="ufrag of 257"):
        decode_offer(head + struct.pack("!H", 257) + b"a" * 257)
    body = head + struct.pack("!H", 4) + b"abcd" + struct.pack("!H", 22) + b"A" * 22
    with pytest.raises(CandidateError, match="candidates"):
        decode_offer(body + bytes([MAX_CANDIDATES + 1]))
    with pytest.raises(CandidateError, match="at most 256"):
        decode_offer(body + b"\x01" + struct.pack("!H", 300) + b"a" * 300)
    with pytest.raises(CandidateError, match="not ASCII"):
        decode_offer(body + b"\x01" + struct.pack("!H", 2) + "é".encode())


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_decode_arbitrary_bytes_only_raise_candidate_error(data: bytes) -> None:
    with contextlib.suppress(CandidateError):
        decode_offer(data)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_decode_mutated_offers_only_raise_candidate_error(data: st.DataObject) -> None:
    raw = bytearray(encode_offer(offer()))
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(raw) - 1))
        raw[index] = data.draw(st.integers(0, 255))
    try:
        decoded = decode_offer(bytes(raw))
    except CandidateError:
        return
    assert decode_offer(encode_offer(decoded)) == decoded


# --- candidates ----------------------------------------------------------------------------------


def test_parse_candidate_accepts_aioice_lines() -> None:
    for sdp in (HOST, HOST6, SRFLX, *PREDICTED):
        assert parse_candidate(sdp).to_sdp() == sdp
    prflx = "abc 1 udp 1845501695 203.0.113.12 5000 typ prflx"
    assert parse_candidate(prflx).type == "prflx"
    assert parse_candidate("abc 1 udp 100 203.0.113.12 5000 typ host generation 0").generation == 0


@pytest.mark.parametrize(
    "sdp",
    [
        "",
        "abc 1 udp 100 203.0.113.12 5000 typ relay",  # relayed: not ours
        "abc 1 tcp 100 203.0.113.12 5000 typ host",
        "abc 1 udp 100 203.0.113.12 5000 typ host tcptype active",
        "abc 2 udp 100 203.0.113.12 5000 typ host",  # one component only
        "abc 1 udp 0 203.0.113.12 5000 typ host",  # priority 1..2**31-1
        "abc 1 udp 2147483648 203.0.113.12 5000 typ host",
        "abc 1 udp 100 203.0.113.12 0 typ host",
        "abc 1 udp 100 203.0.113.12 65536 typ host",
        "abc 1 udp 100 203.0.113.12 05000 typ host",  # not canonical
        "abc 1 udp +100 203.0.113.12 5000 typ host",
        "abc 1 udp 100 peer.local 5000 typ host",  # mDNS names are never resolved
        "abc 1 udp 100 example.org 5000 typ host",
        "abc 1 udp 100 fe80::1%eth0 5000 typ host",
        "abc 1 udp 100 0.0.0.0 5000 typ host",
        "abc 1 udp 100 224.0.0.1 5000 typ host",
        "abc 1 udp 100 203.0.113.12 5000 typ host extra",  # odd trailing field
        "abc 1 udp 100 203.0.113.12 5000 typ host foo bar",  # unknown field
        "abc 1 udp 100 203.0.113.12 5000 typ srflx raddr 10.0.0.1",  # raddr without rport
        "abc 1 udp 100 203.0.113.12 5000 typ srflx raddr nowhere rport 9",
        "abc 1 udp 100 203.0.113.12 5000 typ srflx raddr 10.0.0.1 rport 70000",
        "abc  1 udp 100 203.0.113.12 5000 typ host",  # double space
        "abc 1 udp 100 203.0.113.12 5000 typ host\n",
        "abç 1 udp 100 203.0.113.12 5000 typ host",
        "a-b 1 udp 100 203.0.113.12 5000 typ host",  # foundation: ice-chars only
        "a" * 33 + " 1 udp 100 203.0.113.12 5000 typ host",
        "abc 1 udp 100 203.0.113.12 5000 type host",
        "abc 1 udp 100 203.0.113.12 5000 typ host generation 999",
        "abc 1 udp 100 203.0.113.12 5000 typ host raddr " + "1" * 250,
    ],
)
def test_parse_candidate_refuses(sdp: str) -> None:
    with pytest.raises(CandidateError):
        parse_candidate(sdp)


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=300))
def test_parse_candidate_arbitrary_text_only_raises_candidate_error(text: str) -> None:
    with contextlib.suppress(CandidateError):
        parse_candidate(text)


def test_predicted_candidates_rank_by_k() -> None:
    cands = predicted_candidates("203.0.113.11", [20021, 20028, 20035], ("192.168.1.2", 40000))
    assert [predicted_index(c) for c in cands] == [1, 2, 3]
    assert [c.port for c in cands] == [20021, 20028, 20035]
    priorities = [c.priority for c in cands]
    assert priorities == sorted(priorities, reverse=True)
    srflx = reflexive_candidate(("203.0.113.11", 20000), ("192.168.1.2", 40000))
    assert srflx.priority > priorities[0]
    assert predicted_index(srflx) is None
    assert predicted_index(host_candidate("192.168.1.2", 1)) is None
    with pytest.raises(CandidateError):
        predicted_candidates("203.0.113.11", list(range(1, MAX_PREDICTED_CANDIDATES + 2)), ("10.0.0.1", 1))


# --- predict_ports ----------------------------------------------------------------------------------


def test_predict_ports() -> None:
    assert predict_ports(20014, 7, 4) == [20021, 20028, 20035, 20042]
    assert predict_ports(20014, 1, 2) == [20015, 20016]
    assert predict_ports(5000, -2, 3) == [4998, 4996, 4994]
    assert predict_ports(65530, 3, 4) == [65533]  # the rest would pass 65535: skipped, no wrap
    assert predict_ports(3, -2, 3) == [1]
    assert predict_ports(20000, 0, 4) == []
    assert predict_ports(20000, 7, 0) == []
    assert len(predict_ports(1, 1, MAX_PREDICTED_CANDIDATES)) == MAX_PREDICTED_CANDIDATES


@pytest.mark.parametrize(
    ("base", "delta", "count"),
    [(0, 1, 1), (65536, 1, 1), (1000, 1, -1), (1000, 1, MAX_PREDICTED_CANDIDATES + 1), (True, 1, 1), (1000, 1.5, 1)],
)
def test_predict_ports_refuses(base: int, delta: int, count: int) -> None:
    with pytest.raises(CandidateError):
        predict_ports(base, delta, count)


# --- observed candidates ------------------------------------------------------------------------------


def test_observed_candidates_use_advertised_ports() -> None:
    srflx = reflexive_candidate(("198.51.100.9", 50000), ("192.168.1.2", 40000)).to_sdp()
    lines = observed_candidates("203.0.113.11", [HOST, srflx, *PREDICTED, HOST6])
    parsed = [parse_candidate(line) for line in lines]
    # srflx port first (the STUN server saw another public IP), then the host port.
    assert [(c.host, c.port, c.type) for c in parsed] == [
        ("203.0.113.11", 50000, "srflx"),
        ("203.0.113.11", 40000, "srflx"),
    ]
    assert [c.foundation for c in parsed] == ["observed1", "observed2"]
    assert parsed[0].priority > parsed[1].priority
    assert all(c.priority < parse_candidate(p).priority for c in parsed for p in PREDICTED)


def test_observed_candidates_skip_known_and_bound() -> None:
    # A port-preserving NAT: the srflx is what the observed address would give; nothing new.
    assert observed_candidates("203.0.113.11", [HOST, SRFLX]) == []
    hosts = [host_candidate(f"10.0.0.{i}", 30000 + i).to_sdp() for i in range(1, 20)]
    assert len(observed_candidates("203.0.113.11", hosts)) == MAX_OBSERVED_CANDIDATES
    assert len(observed_candidates("203.0.113.11", hosts, limit=2)) == 2
    assert observed_candidates("2001:db8::5", [HOST]) == []  # other family: the port says nothing
    assert [parse_candidate(c).port for c in observed_candidates("2001:db8::5", [HOST6])] == [40000]


@pytest.mark.parametrize("ip", ["127.0.0.1", "::1", "169.254.1.1", "fe80::1", "0.0.0.0", "224.0.0.5"])
def test_observed_candidates_ignore_unroutable(ip: str) -> None:
    assert observed_candidates(ip, [HOST]) == []


def test_observed_candidates_refuse_junk() -> None:
    with pytest.raises(CandidateError):
        observed_candidates("not-an-ip", [HOST])
    with pytest.raises(CandidateError):
        observed_candidates("203.0.113.11", ["junk"])
    with pytest.raises(CandidateError):
        observed_candidates("203.0.113.11", [HOST], limit=MAX_OBSERVED_CANDIDATES + 1)


# --- local addresses --------------------------------------------------------------------------------------


def _adapters() -> list[ifaddr.Adapter]:
    return [
        ifaddr.Adapter("lo", "lo", [ifaddr.IP("127.0.0.1", 8, "lo"), ifaddr.IP(("::1", 0, 0), 128, "lo")]),
        ifaddr.Adapter(
            "eth0",
            "eth0",
            [
                ifaddr.IP("192.168.1.2", 24, "eth0"),
                ifaddr.IP("169.254.7.7", 16, "eth0"),
                ifaddr.IP(("fe80::1", 0, 2), 64, "eth0"),
                ifaddr.IP(("2001:db8::2", 0, 0), 64, "eth0"),
                ifaddr.IP(("::ffff:192.0.2.1", 0, 0), 128, "eth0"),
            ],
        ),
        ifaddr.Adapter(
            "tap0", "tap0", [ifaddr.IP("10.10.10.3", 24, "tap0"), ifaddr.IP(("fd00:10::3", 0, 0), 64, "tap0")]
        ),
        ifaddr.Adapter("eth1", "eth1", [ifaddr.IP("192.168.1.2", 24, "eth1"), ifaddr.IP("100.64.0.5", 10, "eth1")]),
    ]


def test_usable_host_addresses_filters() -> None:
    found = usable_host_addresses(adapters=_adapters())
    assert found == ["192.168.1.2", "10.10.10.3", "100.64.0.5", "2001:db8::2", "fd00:10::3"]
    excluded = usable_host_addresses(["10.10.10.3", "fd00:10::/64"], adapters=_adapters())
    assert excluded == ["192.168.1.2", "100.64.0.5", "2001:db8::2"]
    assert usable_host_addresses(["10.10.10.0/24"], use_ipv6=False, adapters=_adapters()) == [
        "192.168.1.2",
        "100.64.0.5",
    ]


def test_usable_host_addresses_refuses_bad_exclusions() -> None:
    with pytest.raises(CandidateError, match="cannot exclude"):
        usable_host_addresses(["tap0"], adapters=_adapters())


def test_usable_host_addresses_real_interfaces() -> None:
    for address in usable_host_addresses():
        candidate = Candidate.from_sdp(host_candidate(address, 1).to_sdp())
        assert not address.startswith(("127.", "169.254.", "fe80:")) and address != "::1", candidate
