"""Tests of the sans-I/O data session (transport/session.py): two sessions back to back, clock driven here."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transport.constants import (
    DEAD_PEER_TIMEOUT,
    HEARTBEAT_INTERVAL,
    KEY_ROTATION_INTERVAL,
    MAX_EPOCHS_AHEAD,
    MAX_REASON,
    PREVIOUS_KEY_GRACE,
    REPLAY_WINDOW_SIZE,
)
from transport.frames import MAX_SESSION_PAYLOAD, SEALED_TYPES, MsgType
from transport.session import (
    DROP_AUTH,
    DROP_CLOSED,
    DROP_EPOCH,
    DROP_MALFORMED,
    DROP_REPLAY,
    MAX_PLAINTEXT,
    MIN_SEALED_SIZE,
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

KEY_AB = bytes(range(32))
KEY_BA = bytes(range(100, 132))


def pair(now: float = 0.0, **kwargs: float | int) -> tuple[Session, Session]:
    a = Session(send_key=KEY_AB, recv_key=KEY_BA, now=now, **kwargs)  # type: ignore[arg-type]
    b = Session(send_key=KEY_BA, recv_key=KEY_AB, now=now, **kwargs)  # type: ignore[arg-type]
    return a, b


def deliver(dst: Session, records: list[tuple[MsgType, bytes]], now: float) -> list[SessionEvent]:
    events: list[SessionEvent] = []
    for kind, payload in records:
        events.extend(dst.receive(kind, payload, now))
    return events


def frames(events: list[SessionEvent]) -> list[bytes]:
    return [e.frame for e in events if isinstance(e, FrameReceived)]


def drops(events: list[SessionEvent]) -> list[str]:
    return [e.reason for e in events if isinstance(e, RecordDropped)]


def only(events: list[SessionEvent], cls: type) -> list[SessionEvent]:
    return [e for e in events if isinstance(e, cls)]


# --- construction ---------------------------------------------------------------


@pytest.mark.parametrize("key", [b"", bytes(31), bytes(33)])
def test_bad_key_length_refused(key: bytes) -> None:
    with pytest.raises(SessionError):
        Session(send_key=key, recv_key=KEY_BA, now=0.0)
    with pytest.raises(SessionError):
        Session(send_key=KEY_AB, recv_key=key, now=0.0)


def test_same_key_both_ways_refused() -> None:
    with pytest.raises(SessionError):
        Session(send_key=KEY_AB, recv_key=KEY_AB, now=0.0)


@pytest.mark.parametrize(
    "kwargs",
    [{"heartbeat_interval": 0}, {"dead_peer_timeout": -1}, {"key_rotation_interval": 0}, {"rekey_after_messages": 0}],
)
def test_bad_parameters_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(SessionError):
        Session(send_key=KEY_AB, recv_key=KEY_BA, now=0.0, **kwargs)  # type: ignore[arg-type]


# --- sealing and opening --------------------------------------------------------


def test_data_round_trip_both_directions() -> None:
    a, b = pair()
    sealed = a.send_frame(b"ethernet frame", 1.0)
    assert len(sealed) == MIN_SEALED_SIZE + len(b"ethernet frame")
    assert sealed[0] == 0  # epoch
    assert sealed[1:9] == bytes(8)  # counter 0
    assert b.receive(MsgType.DATA, sealed, 1.0) == [FrameReceived(b"ethernet frame")]
    back = b.send_frame(b"reply", 1.1)
    assert a.receive(MsgType.DATA, back, 1.1) == [FrameReceived(b"reply")]
    assert a.stats.tx_records == 1 and a.stats.rx_records == 1
    assert a.stats.tx_bytes == len(sealed) and b.stats.rx_bytes == len(sealed)
    assert b.stats.last_received == 1.0


def test_counter_increments_and_empty_plaintext() -> None:
    a, b = pair()
    records = [a.send_frame(b"", 0.0) for _ in range(3)]
    assert [int.from_bytes(r[1:9], "big") for r in records] == [0, 1, 2]
    assert frames(deliver(b, [(MsgType.DATA, r) for r in records], 0.0)) == [b"", b"", b""]


def test_seal_equals_send_frame_for_data() -> None:
    a, b = pair()
    sealed = a.seal(MsgType.DATA, b"x", 0.0)
    assert b.receive(MsgType.DATA, sealed, 0.0) == [FrameReceived(b"x")]


@pytest.mark.parametrize("kind", [MsgType.PATH, MsgType.CANDIDATES])
def test_path_and_candidates_delivered_generically(kind: MsgType) -> None:
    a, b = pair()
    assert b.receive(kind, a.seal(kind, b"opaque", 0.0), 0.0) == [RecordReceived(kind, b"opaque")]


@pytest.mark.parametrize("kind", [MsgType.HANDSHAKE, MsgType.HELLO, MsgType.ERROR])
def test_seal_refuses_unsealed_kinds(kind: MsgType) -> None:
    a, _ = pair()
    with pytest.raises(SessionError):
        a.seal(kind, b"x", 0.0)


def test_largest_record_fits_a_session_frame() -> None:
    a, b = pair()
    sealed = a.send_frame(bytes(MAX_PLAINTEXT), 0.0)
    assert len(sealed) == MAX_SESSION_PAYLOAD
    assert frames(b.receive(MsgType.DATA, sealed, 0.0)) == [bytes(MAX_PLAINTEXT)]
    with pytest.raises(SessionError):
        a.send_frame(bytes(MAX_PLAINTEXT + 1), 0.0)


def test_counter_exhausted_refuses_to_seal() -> None:
    a, b = pair()
    a._send_counter = (1 << 64) - 1  # reaching it honestly takes 2^64 records
    last = a.send_frame(b"last", 0.0)
    assert last[1:9] == b"\xff" * 8
    assert frames(b.receive(MsgType.DATA, last, 0.0)) == [b"last"]
    with pytest.raises(CounterExhaustedError):
        a.send_frame(b"one too many", 0.0)
    # timers must not raise either, and the session stops scheduling sends
    assert not only(a.handle_timer(KEY_ROTATION_INTERVAL + 1), KeyRotated)
    assert a.records_to_send() == []


# --- tampering, replay, reordering ------------------------------------------------


def test_every_single_bit_flip_is_dropped_and_does_not_poison_the_window() -> None:
    a, b = pair()
    sealed = a.send_frame(b"payload", 0.0)
    for i in range(len(sealed) * 8):
        tampered = bytearray(sealed)
        tampered[i // 8] ^= 1 << (i % 8)
        events = b.receive(MsgType.DATA, bytes(tampered), 0.0)
        # flipping the epoch byte is either "next epoch, bad tag" or "unknown epoch"
        assert drops(events) in ([DROP_AUTH], [DROP_EPOCH]), i
        assert len(events) == 1
    assert b.recv_epoch == 0
    assert b.stats.rx_records == 0
    assert b.stats.dropped_auth + b.stats.dropped_epoch == len(sealed) * 8
    # a forged high counter must not have moved the window: the genuine record still opens
    assert b.receive(MsgType.DATA, sealed, 0.0) == [FrameReceived(b"payload")]


@pytest.mark.parametrize("kind", sorted(SEALED_TYPES - {MsgType.DATA}))
def test_changing_the_kind_fails_authentication(kind: MsgType) -> None:
    a, b = pair()
    sealed = a.send_frame(b"frame", 0.0)
    assert b.receive(kind, sealed, 0.0) == [RecordDropped(DROP_AUTH)]
    assert b.receive(MsgType.DATA, sealed, 0.0) == [FrameReceived(b"frame")]


def test_truncated_or_extended_ciphertext_fails_authentication() -> None:
    a, b = pair()
    sealed = a.send_frame(b"frame", 0.0)
    assert drops(b.receive(MsgType.DATA, sealed[:-1], 0.0)) == [DROP_AUTH]
    assert drops(b.receive(MsgType.DATA, sealed + b"\x00", 0.0)) == [DROP_AUTH]


def test_records_from_the_other_direction_do_not_open() -> None:
    a, _ = pair()
    # a relay reflecting a's own record back at it
    assert drops(a.receive(MsgType.DATA, a.send_frame(b"mine", 0.0), 0.0)) == [DROP_AUTH]


def test_replay_dropped_and_counted() -> None:
    a, b = pair()
    sealed = a.send_frame(b"once", 0.0)
    assert frames(b.receive(MsgType.DATA, sealed, 0.0)) == [b"once"]
    # the same record arriving on a second path during a switch, or replayed by a relay
    assert b.receive(MsgType.DATA, sealed, 0.1) == [RecordDropped(DROP_REPLAY)]
    assert b.receive(MsgType.DATA, sealed, 0.2) == [RecordDropped(DROP_REPLAY)]
    assert b.stats.dropped_replay == 2
    assert b.stats.rx_records == 1
    assert b.stats.last_received == 0.0  # a replay is not a sign of life


def test_reordering_within_window_accepted() -> None:
    a, b = pair()
    records = [a.send_frame(bytes([i]), 0.0) for i in range(50)]
    order = list(range(50))
    random.Random(7).shuffle(order)
    got = frames(deliver(b, [(MsgType.DATA, records[i]) for i in order], 0.0))
    assert got == [bytes([i]) for i in order]
    assert drops(deliver(b, [(MsgType.DATA, r) for r in records], 0.0)) == [DROP_REPLAY] * 50


def test_too_old_dropped() -> None:
    a, b = pair()
    records = [a.send_frame(b"%d" % i, 0.0) for i in range(REPLAY_WINDOW_SIZE + 1)]
    assert frames(b.receive(MsgType.DATA, records[-1], 0.0)) == [b"%d" % REPLAY_WINDOW_SIZE]
    assert frames(b.receive(MsgType.DATA, records[1], 0.0)) == [b"1"]  # last slot inside the window
    assert b.receive(MsgType.DATA, records[0], 0.0) == [RecordDropped(DROP_REPLAY)]


# --- key rotation -----------------------------------------------------------------


def test_rotation_by_interval_both_directions() -> None:
    a, b = pair(key_rotation_interval=10.0, heartbeat_interval=100.0, dead_peer_timeout=100.0)
    assert a.handle_timer(9.9) == [] and a.records_to_send() == []
    assert a.handle_timer(10.0) == [KeyRotated("send", 1)]
    rekey = a.records_to_send()
    assert [k for k, _ in rekey] == [MsgType.REKEY]
    assert rekey[0][1][0] == 1  # sealed under the new key: an idle link still rotates
    assert deliver(b, rekey, 10.0) == [KeyRotated("recv", 1)]
    assert frames(b.receive(MsgType.DATA, a.send_frame(b"e1", 10.5), 10.5)) == [b"e1"]

    assert b.handle_timer(10.0) == [KeyRotated("send", 1)]
    assert deliver(a, b.records_to_send(), 10.0) == [KeyRotated("recv", 1)]
    assert frames(a.receive(MsgType.DATA, b.send_frame(b"e1 back", 10.5), 10.5)) == [b"e1 back"]
    assert a.stats.rekeys_sent == a.stats.rekeys_received == 1
    # the next rotation is an interval after the last one
    assert a.handle_timer(19.9) == []
    assert a.handle_timer(20.0) == [KeyRotated("send", 2)]


def test_rotation_by_interval_also_checked_when_sealing() -> None:
    # a driver whose timer is late must still not seal past the interval
    a, b = pair(key_rotation_interval=10.0, heartbeat_interval=100.0, dead_peer_timeout=100.0)
    sealed = a.send_frame(b"late", 10.0)
    assert sealed[0] == 1
    assert a.next_deadline() == 10.0  # output and the KeyRotated event are waiting: due now
    assert a.handle_timer(10.0) == [KeyRotated("send", 1)]
    rekey = a.records_to_send()
    assert deliver(b, [(MsgType.DATA, sealed), *rekey], 10.0) == [KeyRotated("recv", 1), FrameReceived(b"late")]


def test_rotation_by_counter_limit_both_directions() -> None:
    a, b = pair(rekey_after_messages=3)
    for side, other in ((a, b), (b, a)):
        records = [side.send_frame(b"%d" % i, 0.0) for i in range(7)]
        assert [r[0] for r in records] == [0, 0, 0, 1, 1, 1, 2]
        rekeys = side.records_to_send()
        assert [r[0] for _, r in rekeys] == [1, 2]
        events = deliver(other, [(MsgType.DATA, r) for r in records] + rekeys, 0.0)
        assert frames(events) == [b"%d" % i for i in range(7)]
        assert only(events, KeyRotated) == [KeyRotated("recv", 1), KeyRotated("recv", 2)]
        assert only(side.handle_timer(0.0), KeyRotated) == [KeyRotated("send", 1), KeyRotated("send", 2)]
    assert a.send_epoch == b.send_epoch == a.recv_epoch == b.recv_epoch == 2


def test_counters_continue_across_epochs() -> None:
    a, _ = pair(rekey_after_messages=2)
    counters = [int.from_bytes(a.send_frame(b"", 0.0)[1:9], "big") for _ in range(4)]
    rekey_counters = [int.from_bytes(r[1:9], "big") for _, r in a.records_to_send()]
    assert sorted(counters + rekey_counters) == list(range(len(counters) + len(rekey_counters)))


def test_previous_epoch_in_flight_accepted_during_grace_then_rejected() -> None:
    a = Session(send_key=KEY_AB, recv_key=KEY_BA, now=0.0, key_rotation_interval=10.0)
    b = Session(send_key=KEY_BA, recv_key=KEY_AB, now=0.0, heartbeat_interval=100.0, dead_peer_timeout=100.0)
    old = [a.send_frame(b"old%d" % i, 9.0) for i in range(3)]
    a.handle_timer(10.0)
    rekey = a.records_to_send()
    new = a.send_frame(b"new", 10.0)
    # the new epoch arrives first: b advances and keeps the old key for the grace period
    assert deliver(b, [(MsgType.DATA, new)], 10.0) == [KeyRotated("recv", 1), FrameReceived(b"new")]
    assert frames(b.receive(MsgType.DATA, old[0], 10.0 + PREVIOUS_KEY_GRACE - 0.001)) == [b"old0"]
    assert b.next_deadline() == 10.0 + PREVIOUS_KEY_GRACE  # when the old key is to be erased
    assert b.receive(MsgType.DATA, old[1], 10.0 + PREVIOUS_KEY_GRACE) == [RecordDropped(DROP_EPOCH)]
    # and once the timer has erased it, still rejected
    b.handle_timer(10.0 + PREVIOUS_KEY_GRACE)
    assert b.receive(MsgType.DATA, old[2], 10.0 + PREVIOUS_KEY_GRACE + 1) == [RecordDropped(DROP_EPOCH)]
    assert b.stats.dropped_epoch == 2
    # the REKEY record itself, late and within the window, is still fine
    assert deliver(b, rekey, 20.5) == []


def test_rekey_while_records_in_flight_out_of_order() -> None:
    a, b = pair(rekey_after_messages=4, key_rotation_interval=1000.0)
    records = [(MsgType.DATA, a.send_frame(b"%d" % i, 0.0)) for i in range(8)]
    rekey = a.records_to_send()
    assert len(rekey) == 1
    # epochs: 0 0 0 0 | REKEY(1) 1 1 1 1; deliver new-epoch records first, REKEY last, old ones between
    stream = [records[5], records[4], records[7], records[0], records[6], records[2], records[1], records[3], *rekey]
    events = deliver(b, stream, 1.0)
    assert sorted(frames(events)) == sorted(b"%d" % i for i in range(8))
    assert only(events, KeyRotated) == [KeyRotated("recv", 1)]
    assert drops(events) == []
    assert b.recv_epoch == 1


def test_peer_several_epochs_ahead_is_followed() -> None:
    # A whole epoch's records (REKEY included) lost, e.g. during a relay outage:
    # the receiver derives the keys in between and catches up.
    a, b = pair(rekey_after_messages=1)
    a.send_frame(b"lost", 0.0)
    a.send_frame(b"lost too", 0.0)
    a.records_to_send()
    far = a.send_frame(b"epoch 2", 0.0)
    assert far[0] == 2
    events = b.receive(MsgType.DATA, far, 0.0)
    assert frames(events) == [b"epoch 2"]
    assert KeyRotated("recv", 2) in events
    assert b.recv_epoch == 2 and b.stats.rekeys_received == 2


def test_peer_too_many_epochs_ahead_is_dropped() -> None:
    a, b = pair(rekey_after_messages=1)
    for _ in range(MAX_EPOCHS_AHEAD + 1):
        a.send_frame(b"lost", 0.0)
    a.records_to_send()
    far = a.send_frame(b"too far", 0.0)
    assert far[0] == MAX_EPOCHS_AHEAD + 1
    assert b.receive(MsgType.DATA, far, 0.0) == [RecordDropped(DROP_EPOCH)]
    assert b.recv_epoch == 0


def test_epoch_byte_wraps_mod_256() -> None:
    a, b = pair(rekey_after_messages=1)
    for i in range(300):
        sealed = a.send_frame(b"%d" % i, 0.0)
        rekeys = a.records_to_send()
        events = deliver(b, [*rekeys, (MsgType.DATA, sealed)], 0.0)
        assert frames(events) == [b"%d" % i], i
    assert a.send_epoch == b.recv_epoch == 299  # the first record needs no rotation
    assert sealed[0] == 299 % 256


def test_forged_next_epoch_records_do_not_advance() -> None:
    a, b = pair()
    forged = bytes([1]) + bytes(8) + bytes(20)
    assert b.receive(MsgType.DATA, forged, 0.0) == [RecordDropped(DROP_AUTH)]
    assert b.recv_epoch == 0
    assert frames(b.receive(MsgType.DATA, a.send_frame(b"genuine", 0.0), 0.0)) == [b"genuine"]


# --- heartbeats and liveness ----------------------------------------------------


def test_heartbeat_round_trip_gives_rtt() -> None:
    a, b = pair()
    assert a.next_deadline() == HEARTBEAT_INTERVAL
    assert a.handle_timer(HEARTBEAT_INTERVAL) == []
    request = a.records_to_send()
    assert [k for k, _ in request] == [MsgType.HEARTBEAT]
    assert deliver(b, request, HEARTBEAT_INTERVAL + 0.1) == []
    reply = b.records_to_send()
    assert [k for k, _ in reply] == [MsgType.HEARTBEAT]
    assert deliver(a, reply, HEARTBEAT_INTERVAL + 0.25) == [HeartbeatRtt(0.25)]
    assert a.stats.last_rtt == 0.25
    # the reply is answered by nothing, and a duplicate reply is a replay
    assert drops(deliver(a, reply, HEARTBEAT_INTERVAL + 0.3)) == [DROP_REPLAY]


def test_heartbeats_sent_every_interval_even_while_data_flows() -> None:
    a, b = pair()
    sent: list[float] = []
    t = 0.0
    while t < 4 * HEARTBEAT_INTERVAL:
        t = round(t + 0.5, 3)
        b.receive(MsgType.DATA, a.send_frame(b"busy", t), t)
        deadline = a.next_deadline()
        assert deadline is not None
        if t >= deadline:
            a.handle_timer(t)
            if a.records_to_send():
                sent.append(t)
    assert sent == [HEARTBEAT_INTERVAL * i for i in (1, 2, 3, 4)]


def test_heartbeat_after_a_long_stall_is_one_not_a_burst() -> None:
    a, _ = pair()
    a.handle_timer(10 * HEARTBEAT_INTERVAL)
    assert len(a.records_to_send()) == 1
    assert a.next_deadline() == 11 * HEARTBEAT_INTERVAL


def test_unsolicited_heartbeat_reply_ignored_malformed_heartbeat_dropped() -> None:
    a, b = pair()
    stray = a.seal(MsgType.HEARTBEAT, struct.pack("!BQd", 1, 12345, 0.0), 1.0)
    assert b.receive(MsgType.HEARTBEAT, stray, 1.0) == []
    assert b.stats.last_rtt is None
    bad_flag = a.seal(MsgType.HEARTBEAT, struct.pack("!BQd", 7, 1, 0.0), 1.0)
    assert b.receive(MsgType.HEARTBEAT, bad_flag, 1.0) == [RecordDropped(DROP_MALFORMED)]
    short = a.seal(MsgType.HEARTBEAT, b"\x00", 1.0)
    assert b.receive(MsgType.HEARTBEAT, short, 1.0) == [RecordDropped(DROP_MALFORMED)]
    assert b.records_to_send() == []
    assert b.stats.dropped_malformed == 2


def test_only_the_last_few_heartbeats_are_awaited() -> None:
    a, b = pair()
    requests = []
    for i in range(1, 7):
        a.handle_timer(i * HEARTBEAT_INTERVAL)
        requests += a.records_to_send()
    deliver(b, requests, 31.0)
    events = deliver(a, b.records_to_send(), 32.0)
    # the two oldest requests were forgotten; RTTs measured against our own send times
    assert events == [HeartbeatRtt(32.0 - i * HEARTBEAT_INTERVAL) for i in (3, 4, 5, 6)]


def test_dead_peer_after_timeout_not_before_and_once() -> None:
    a, b = pair()
    assert a.handle_timer(DEAD_PEER_TIMEOUT - 0.001) == []
    a.records_to_send()  # the heartbeat just sent
    assert a.next_deadline() == DEAD_PEER_TIMEOUT
    assert a.handle_timer(DEAD_PEER_TIMEOUT) == [PeerDead(DEAD_PEER_TIMEOUT)]
    assert only(a.handle_timer(DEAD_PEER_TIMEOUT + 10), PeerDead) == []
    a.records_to_send()
    # the peer is heard again: the watch re-arms from that moment
    frame = b.send_frame(b"back", 40.0)
    assert frames(a.receive(MsgType.DATA, frame, 40.0)) == [b"back"]
    assert only(a.handle_timer(40.0 + DEAD_PEER_TIMEOUT - 0.001), PeerDead) == []
    assert only(a.handle_timer(40.0 + DEAD_PEER_TIMEOUT + 1), PeerDead) == [PeerDead(DEAD_PEER_TIMEOUT + 1)]


def test_heartbeat_exchange_keeps_both_alive() -> None:
    a, b = pair()
    t = 0.0
    while t < 10 * DEAD_PEER_TIMEOUT:
        t = round(t + 0.25, 3)
        for side, other in ((a, b), (b, a)):
            events = side.handle_timer(t)
            assert only(events, PeerDead) == []
            deliver(other, side.records_to_send(), t)
    assert a.stats.last_rtt == 0.0  # delivered instantly


def test_forged_records_are_not_signs_of_life() -> None:
    a, _ = pair()
    for t in range(1, int(DEAD_PEER_TIMEOUT)):
        a.receive(MsgType.DATA, bytes(40), float(t))
    assert only(a.handle_timer(DEAD_PEER_TIMEOUT), PeerDead) == [PeerDead(DEAD_PEER_TIMEOUT)]


# --- BYE ----------------------------------------------------------------------------


def test_bye_closes_both_sides() -> None:
    a, b = pair()
    bye = a.close("shutting down", 1.0)
    assert a.closed
    assert b.receive(MsgType.BYE, bye, 1.0) == [PeerClosed("shutting down")]
    assert b.closed
    assert a.next_deadline() is None and b.next_deadline() is None
    assert a.handle_timer(100.0) == [] and b.handle_timer(100.0) == []
    with pytest.raises(SessionClosedError):
        a.send_frame(b"x", 2.0)
    with pytest.raises(SessionClosedError):
        b.close("again", 2.0)


def test_records_after_bye_dropped() -> None:
    a, b = pair()
    late = a.send_frame(b"late", 1.0)
    b.receive(MsgType.BYE, a.close("bye", 1.0), 1.0)
    assert b.receive(MsgType.DATA, late, 1.1) == [RecordDropped(DROP_CLOSED)]
    assert b.stats.dropped_closed == 1
    assert a.receive(MsgType.DATA, b"junk", 1.1) == [RecordDropped(DROP_CLOSED)]


def test_bye_reason_bounded_and_decoded_leniently() -> None:
    a, b = pair()
    long_reason = "é" * 200  # 400 bytes of UTF-8
    (event,) = b.receive(MsgType.BYE, a.close(long_reason, 0.0), 0.0)
    assert isinstance(event, PeerClosed)
    assert event.reason == "é" * (MAX_REASON // 2)  # cut on a character boundary
    c, d = pair()
    (event,) = d.receive(MsgType.BYE, c.seal(MsgType.BYE, b"bad \xff\xfe utf-8", 0.0), 0.0)
    assert event == PeerClosed("bad \ufffd\ufffd utf-8")


def test_bye_discards_queued_output() -> None:
    a, b = pair()
    a.handle_timer(HEARTBEAT_INTERVAL)
    b.receive(MsgType.HEARTBEAT, a.records_to_send()[0][1], HEARTBEAT_INTERVAL)
    b.close("done", HEARTBEAT_INTERVAL)
    assert b.records_to_send() == []


# --- deadlines ----------------------------------------------------------------------


def test_next_deadline_is_the_earliest_timer() -> None:
    a, _ = pair(now=100.0, heartbeat_interval=5.0, dead_peer_timeout=3.0, key_rotation_interval=7.0)
    assert a.next_deadline() == 103.0  # dead peer
    assert a.handle_timer(103.0) == [PeerDead(3.0)]
    assert a.next_deadline() == 105.0  # heartbeat
    a.handle_timer(105.0)
    a.records_to_send()
    assert a.next_deadline() == 107.0  # rotation
    a.handle_timer(107.0)
    a.records_to_send()
    assert a.next_deadline() == 110.0  # heartbeat again (rotation now at 114)


def test_next_deadline_due_while_output_waits() -> None:
    a, b = pair()
    request = a.seal(MsgType.HEARTBEAT, struct.pack("!BQd", 0, 1, 1.0), 1.0)
    assert b.receive(MsgType.HEARTBEAT, request, 1.0) == []
    assert b.next_deadline() == 1.0  # the reply is waiting
    assert len(b.records_to_send()) == 1
    assert b.next_deadline() == HEARTBEAT_INTERVAL


def test_defaults_follow_constants() -> None:
    a, _ = pair()
    assert a.next_deadline() == min(HEARTBEAT_INTERVAL, DEAD_PEER_TIMEOUT, KEY_ROTATION_INTERVAL)


# --- malformed input never raises ---------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x00", bytes(MIN_SEALED_SIZE - 1), bytes(MIN_SEALED_SIZE), b"\xff" * 64, bytes(MAX_SESSION_PAYLOAD + 1)],
)
def test_malformed_payloads_are_dropped(payload: bytes) -> None:
    _, b = pair()
    events = b.receive(MsgType.DATA, payload, 0.0)
    assert len(events) == 1 and isinstance(events[0], RecordDropped)


@pytest.mark.parametrize("kind", [MsgType.HANDSHAKE, MsgType.HELLO, 0, 0xFF, -1])
def test_unsealed_kinds_are_malformed(kind: MsgType) -> None:
    a, b = pair()
    assert b.receive(kind, a.send_frame(b"x", 0.0), 0.0) == [RecordDropped(DROP_MALFORMED)]


def test_bytes_like_payloads_accepted() -> None:
    a, b = pair()
    sealed = a.send_frame(b"view", 0.0)
    assert frames(b.receive(MsgType.DATA, memoryview(sealed), 0.0)) == [b"view"]
    sealed = a.send_frame(b"array", 0.0)
    assert frames(b.receive(MsgType.DATA, bytearray(sealed), 0.0)) == [b"array"]


def test_random_garbage_never_raises() -> None:
    _, b = pair()
    rng = random.Random(1)
    for _ in range(2000):
        payload = rng.randbytes(rng.randrange(0, 120))
        kind = rng.choice(sorted(SEALED_TYPES))
        events = b.receive(kind, payload, 0.0)
        assert all(isinstance(e, RecordDropped) for e in events)
    assert b.stats.rx_records == 0


@settings(derandomize=True, max_examples=500)
@given(
    kind=st.one_of(st.sampled_from(sorted(SEALED_TYPES)), st.integers(min_value=-5, max_value=300)),
    payload=st.binary(max_size=MAX_SESSION_PAYLOAD + 10),
    epoch=st.sampled_from([None, 0, 1, 255]),
)
def test_random_payloads_only_produce_drops(kind: int, payload: bytes, epoch: int | None) -> None:
    _, b = pair()
    if epoch is not None and payload:
        payload = bytes([epoch]) + payload[1:]  # steer toward the current/next/previous key paths
    events = b.receive(kind, payload, 0.0)  # type: ignore[arg-type]
    assert len(events) == 1 and isinstance(events[0], RecordDropped)
    assert b.stats.rx_records == 0 and b.recv_epoch == 0


# --- open_data: the DATA hot path must mean exactly what receive() means ----------------------


def _deliver(session: Session, payload: bytes, now: float, *, fast: bool) -> list[bytes]:
    """What a receiver hands to its TAP for one DATA record: the hot path first (as the node
    does), receive() when it declines; or receive() alone."""
    if fast:
        frame = session.open_data(payload, now)
        if frame is not None:
            return [frame]
    return frames(session.receive(MsgType.DATA, payload, now))


@settings(derandomize=True, max_examples=200)
@given(
    script=st.lists(
        st.tuples(st.sampled_from(["send", "replay", "flip", "junk", "rotate", "reorder"]), st.integers(0, 50)),
        max_size=60,
    )
)
def test_open_data_then_receive_equals_receive_alone(script: list[tuple[str, int]]) -> None:
    """Random traffic with replays, tampering, junk, key rotations and reordering: a receiver that
    tries open_data() first delivers the same frames and counts the same drops as one using receive()."""
    sender, _ = pair()
    sent: list[bytes] = []
    stream: list[bytes] = []
    now = 0.0
    for action, n in script:
        now += 0.5
        if action == "send" or not sent:
            sealed = sender.send_frame(bytes([n]) * (n + 1), now)
            sent.append(sealed)
            stream.append(sealed)
        elif action == "replay":
            stream.append(sent[n % len(sent)])
        elif action == "flip":
            victim = bytearray(sent[n % len(sent)])
            victim[n % len(victim)] ^= 0x01
            stream.append(bytes(victim))
        elif action == "junk":
            stream.append(bytes([n]) * (n % 40))
        elif action == "rotate":
            sender.handle_timer(now + KEY_ROTATION_INTERVAL)  # the next record goes out under a new key
        elif action == "reorder" and len(stream) >= 2:
            stream[-1], stream[-2] = stream[-2], stream[-1]
    _, fast = pair()
    _, slow = pair()
    delivered = 0
    for payload in stream:
        got = _deliver(fast, payload, now, fast=True)
        assert got == _deliver(slow, payload, now, fast=False)
        delivered += len(got)
    assert delivered >= 1 or not script  # the first action always sends a genuine record
    assert fast.stats == slow.stats
    assert fast.recv_epoch == slow.recv_epoch


def test_open_data_declines_all_but_the_common_case() -> None:
    a, b = pair()
    sealed = a.send_frame(b"frame", 0.0)
    assert b.open_data(sealed, 0.0) == b"frame"
    assert b.open_data(sealed, 0.0) is None  # replayed: receive() counts it
    assert b.stats.rx_records == 1 and b.stats.dropped_replay == 0
    a.handle_timer(KEY_ROTATION_INTERVAL)
    rotated = a.send_frame(b"next epoch", KEY_ROTATION_INTERVAL)
    assert b.open_data(rotated, KEY_ROTATION_INTERVAL) is None  # a new epoch: receive() rotates
    assert frames(b.receive(MsgType.DATA, rotated, KEY_ROTATION_INTERVAL)) == [b"next epoch"]
    forged = bytearray(a.send_frame(b"x", KEY_ROTATION_INTERVAL))
    forged[-1] ^= 1
    assert b.open_data(bytes(forged), KEY_ROTATION_INTERVAL) is None
    assert b.stats.dropped_auth == 0
