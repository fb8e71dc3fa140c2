"""PathSwitch: the PROBE / PROBE_ACK / SWITCHED exchange that moves a session onto a direct path."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from transport.paths import (
    PathError,
    PathMsg,
    PathSwitch,
    PathValidated,
    PeerFellBack,
    PeerSwitched,
    Route,
    decode_path,
    encode_path,
)


def exchange(a: PathSwitch, b: PathSwitch, messages: list[bytes], now: float) -> list[object]:
    """Deliver ``messages`` from a to b, and b's replies back to a, until quiet; returns every event."""
    events: list[object] = []
    pending = [(b, m) for m in messages]
    while pending:
        target, message = pending.pop(0)
        replies, evs = target.on_message(message, now)
        events += evs
        other = a if target is b else b
        pending += [(other, r) for r in replies]
    return events


def test_probe_ack_validates_and_switches_both_sides() -> None:
    a, b = PathSwitch(), PathSwitch()
    events = exchange(a, b, a.direct_up(1.0), 1.25)
    assert a.route is Route.DIRECT and b.peer_route is Route.DIRECT
    assert b.route is Route.RELAY  # b has not validated its own probe yet
    assert PathValidated(0.25) in events and PeerSwitched() in events
    exchange(b, a, b.direct_up(2.0), 2.0)
    assert a.both_direct and b.both_direct


def test_stale_or_forged_ack_does_not_switch() -> None:
    a = PathSwitch()
    a.direct_up(0.0)
    replies, events = a.on_message(encode_path(PathMsg.PROBE_ACK, b"12345678"), 1.0)
    assert (replies, events) == ([], [])
    assert a.route is Route.RELAY


def test_duplicate_ack_and_switched_are_ignored() -> None:
    a, b = PathSwitch(), PathSwitch()
    probe = a.direct_up(0.0)
    ack, _ = b.on_message(probe[0], 0.1)
    first = a.on_message(ack[0], 0.2)
    assert a.on_message(ack[0], 0.3) == ([], [])
    switched = first[0][0]
    assert b.on_message(switched, 0.3)[1] == [PeerSwitched()]
    assert b.on_message(switched, 0.4) == ([], [])


def test_direct_down_returns_to_relay_and_tells_the_peer() -> None:
    a, b = PathSwitch(), PathSwitch()
    exchange(a, b, a.direct_up(0.0), 0.0)
    fallback = a.direct_down()
    assert a.route is Route.RELAY and len(fallback) == 1
    assert b.on_message(fallback[0], 1.0) == ([], [PeerFellBack()])
    assert b.peer_route is Route.RELAY
    assert a.direct_down() == []  # already on the relay: nothing to say


@given(st.binary(max_size=32))
def test_arbitrary_bytes_decode_canonically_or_raise_path_error(data: bytes) -> None:
    try:
        kind, nonce = decode_path(data)
    except PathError:
        assert len(data) != 9 or data[0] not in {int(k) for k in PathMsg}
    else:
        assert encode_path(kind, nonce) == data


def test_malformed_messages_are_refused() -> None:
    with pytest.raises(PathError):
        decode_path(b"\x01short")
    with pytest.raises(PathError):
        decode_path(bytes([9]) + bytes(8))


def test_keepalive_answers_keep_the_path_alive_and_silence_kills_it() -> None:
    a, b = PathSwitch(), PathSwitch()
    exchange(a, b, a.direct_up(0.0), 0.0)
    assert a.direct_alive(2.9, dead_after=3.0)
    assert not a.direct_alive(3.1, dead_after=3.0)  # no probe answered for 3.1 s
    exchange(a, b, a.keepalive(3.0), 3.05)
    assert a.direct_alive(6.0, dead_after=3.0) and a.last_rtt == pytest.approx(0.05)
    lost = a.keepalive(7.0)  # a probe the path swallows: its answer never comes
    assert lost and not a.direct_alive(9.1, dead_after=3.0)


def test_keepalive_only_while_direct() -> None:
    a = PathSwitch()
    assert a.keepalive(0.0) == []
    assert not a.direct_alive(0.0, dead_after=3.0)
