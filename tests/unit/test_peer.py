"""Tests for traversal/peer.py: two sans-I/O PeerLinks joined by a tiny in-test relay, clock driven here.

The relay below does what the real one does for a single session: it forwards
session frames to the other end, collects READY, and once both ends are ready
hands each an ESTABLISHED naming the other's public address. Tests can drop
frames on the way and move time explicitly; nothing sleeps.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from transport import frames
from transport.constants import DEAD_PEER_TIMEOUT, HANDSHAKE_TIMEOUT
from transport.frames import MsgType, SessionFrame
from transport.handshake import MSG1_SIZE, MSG2_SIZE, MSG3_SIZE
from transport.identity import encode_public, generate_identity, generate_psk, public_bytes
from traversal.peer import CONSUMED, ETHERNET_OVERHEAD, MIN_ETHERNET_FRAME, LinkState, PeerLink

SESSION_ID = bytes(range(16))
NETWORK = "chr-001"
MTU = 1280  # not the default, so a test can tell the relay's MTU is the one applied
HEARTBEAT = 5
ROTATION = 120
ADDRESSES = {0: ("198.51.100.7", 40001), 1: ("2001:db8::2", 40002)}

Drop = Callable[["PeerLink", SessionFrame], bool]


def ethernet(size: int) -> bytes:
    return os.urandom(size)


class Relay:
    """One relay session between links ``a`` and ``b``; the test pumps it at a time of its choosing."""

    def __init__(self, a: PeerLink, b: PeerLink, *, auto_establish: bool = True) -> None:
        self.a, self.b = a, b
        self.auto_establish = auto_establish
        self.queue: list[tuple[PeerLink, bytes]] = []
        self.ready: set[int] = set()
        self.established_sent = False
        self.delivered: dict[int, list[bytes]] = {id(a): [], id(b): []}
        self.sent: list[tuple[PeerLink, SessionFrame]] = []  # every session frame a link sent, dropped or not
        self.drop: Drop = lambda _sender, _frame: False
        self.down = False  # drop everything

    def other(self, link: PeerLink) -> PeerLink:
        return self.b if link is self.a else self.a

    def send(self, sender: PeerLink, wire: list[bytes]) -> None:
        self.queue.extend((sender, data) for data in wire)

    def established_for(self, link: PeerLink) -> frames.Established:
        ip, port = ADDRESSES[0 if self.other(link) is self.a else 1]
        return frames.Established(SESSION_ID, MTU, HEARTBEAT, ROTATION, ip, port, True)

    def establish(self, now: float) -> None:
        for link in (self.a, self.b):
            link.on_established(frames.decode(frames.encode(self.established_for(link))), now)  # type: ignore[arg-type]

    def pump(self, now: float) -> None:
        """Deliver everything queued (and everything that causes) at ``now``."""
        while self.queue:
            sender, data = self.queue.pop(0)
            frame = frames.decode(data)
            if isinstance(frame, frames.Ready):
                assert frame.session_id == SESSION_ID
                if self.down:
                    continue
                self.ready.add(id(sender))
                if self.auto_establish and len(self.ready) == 2 and not self.established_sent:
                    self.established_sent = True
                    self.establish(now)
                continue
            assert isinstance(frame, SessionFrame), frame
            assert frame.session_id == SESSION_ID
            self.sent.append((sender, frame))
            if self.down or self.drop(sender, frame):
                continue
            receiver = self.other(sender)
            out, eth = receiver.on_frame(frame, now)
            self.delivered[id(receiver)].extend(eth)
            self.send(receiver, out)

    def tick(self, now: float) -> None:
        """Both links' timers at ``now``, then deliver what they sent."""
        for link in (self.a, self.b):
            self.send(link, link.handle_timer(now))
        self.pump(now)

    def handshakes_from(self, link: PeerLink) -> list[bytes]:
        return [f.payload for s, f in self.sent if s is link and f.type == MsgType.HANDSHAKE]


def ordered_keys() -> tuple[Ed25519PrivateKey, Ed25519PrivateKey]:
    """Two fresh identities as (initiator's, responder's): the smaller public key initiates."""
    one, two = generate_identity(), generate_identity()
    return (one, two) if public_bytes(one) < public_bytes(two) else (two, one)


def link(own: Ed25519PrivateKey, peer: Ed25519PrivateKey, now: float, **kwargs: Any) -> PeerLink:
    return PeerLink(
        session_id=SESSION_ID,
        peer=public_bytes(peer),
        identity=own,
        network=NETWORK,
        psk=kwargs.get("psk"),
        allowed_peers=kwargs.get("allowed_peers"),
        now=now,
    )


def make_links(
    now: float = 0.0,
    *,
    psk_ini: bytes | None = None,
    psk_res: bytes | None = None,
    allowed_ini: frozenset[bytes] | None = None,
    allowed_res: frozenset[bytes] | None = None,
) -> tuple[PeerLink, PeerLink]:
    """Two links of one relay session, as (initiator, responder)."""
    key_ini, key_res = ordered_keys()
    ini = link(key_ini, key_res, now, psk=psk_ini, allowed_peers=allowed_ini)
    res = link(key_res, key_ini, now, psk=psk_res, allowed_peers=allowed_res)
    return ini, res


def connect(now: float = 0.0, **kwargs: Any) -> tuple[PeerLink, PeerLink, Relay]:
    ini, res = make_links(now, **kwargs)
    relay = Relay(ini, res)
    relay.send(ini, ini.start(now))
    relay.send(res, res.start(now))
    relay.pump(now)
    return ini, res, relay


def assert_data_flows(ini: PeerLink, res: PeerLink, relay: Relay, now: float) -> None:
    for sender, receiver in ((ini, res), (res, ini)):
        frame = ethernet(60)
        before = len(relay.delivered[id(receiver)])
        relay.send(sender, sender.send_frame(frame, now))
        relay.pump(now)
        assert relay.delivered[id(receiver)][before:] == [frame]


# --- roles and the handshake ---------------------------------------------------


def test_roles_are_complementary() -> None:
    for _ in range(8):
        ini, res = make_links()
        assert ini.initiator and not res.initiator
        assert ini.status(0.0)["role"] == "initiator" and res.status(0.0)["role"] == "responder"
        # Only the initiator speaks first.
        assert res.start(0.0) == []
        (msg1,) = ini.start(0.0)
        frame = frames.decode(msg1)
        assert isinstance(frame, SessionFrame) and frame.type == MsgType.HANDSHAKE
        assert len(frame.payload) == MSG1_SIZE


def test_full_handshake_establishes_both_with_the_same_session_tag() -> None:
    ini, res, relay = connect()
    assert ini.state is LinkState.ESTABLISHED and res.state is LinkState.ESTABLISHED
    assert len(ini.session_tag) == 16 and ini.session_tag == res.session_tag
    assert [len(m) for m in relay.handshakes_from(ini)] == [MSG1_SIZE, MSG3_SIZE]
    assert [len(m) for m in relay.handshakes_from(res)] == [MSG2_SIZE]
    assert ini.mtu == MTU and res.mtu == MTU
    assert ini.last_error is None and res.last_error is None
    assert ini.next_deadline() is not None  # the session's heartbeat, no more handshake deadline


def test_handshake_alone_waits_for_the_relay_established() -> None:
    ini, res = make_links()
    relay = Relay(ini, res, auto_establish=False)
    relay.send(ini, ini.start(0.0))
    relay.send(res, res.start(0.0))
    relay.pump(0.0)
    assert ini.state is LinkState.AWAITING_ESTABLISHED and res.state is LinkState.AWAITING_ESTABLISHED
    assert len(relay.ready) == 2
    relay.establish(0.5)
    assert ini.state is LinkState.ESTABLISHED and res.state is LinkState.ESTABLISHED


def test_established_before_the_handshake_ends_is_remembered() -> None:
    ini, res = make_links()
    relay = Relay(ini, res, auto_establish=False)
    relay.establish(0.0)  # overtakes the whole handshake
    assert ini.state is LinkState.HANDSHAKING and res.state is LinkState.HANDSHAKING
    assert ini.send_frame(ethernet(60), 0.0) == []
    relay.send(ini, ini.start(0.0))
    relay.send(res, res.start(0.0))
    relay.pump(0.1)
    assert ini.state is LinkState.ESTABLISHED and res.state is LinkState.ESTABLISHED
    assert ini.session_tag == res.session_tag
    assert_data_flows(ini, res, relay, 0.2)


# --- data ----------------------------------------------------------------------


def test_ethernet_frames_flow_both_ways() -> None:
    ini, res, relay = connect()
    sent_ini = [ethernet(n) for n in (14, 60, 1000)]
    sent_res = [ethernet(n) for n in (64, MTU + ETHERNET_OVERHEAD)]
    for frame in sent_ini:
        relay.send(ini, ini.send_frame(frame, 1.0))
    for frame in sent_res:
        relay.send(res, res.send_frame(frame, 1.0))
    relay.pump(1.0)
    assert relay.delivered[id(res)] == sent_ini
    assert relay.delivered[id(ini)] == sent_res
    assert ini.counters.tx_frames == 3 and res.counters.rx_frames == 3
    assert res.counters.tx_frames == 2 and ini.counters.rx_frames == 2


def test_a_bundle_of_data_records_delivers_every_frame_in_order() -> None:
    ini, res, relay = connect()
    sent = [ethernet(n) for n in (60, 1000, MTU + ETHERNET_OVERHEAD, 70)]
    wire = [data for frame in sent for data in ini.send_frame(frame, 1.0)]
    relay.sent.clear()  # the handshake's frames
    relay.send(ini, frames.bundle_data_frames(wire))
    relay.pump(1.0)
    assert [frame.type for _, frame in relay.sent] == [MsgType.BUNDLE]
    assert relay.delivered[id(res)] == sent
    assert res.counters.rx_frames == len(sent)


def test_a_malformed_bundle_is_dropped_and_counted_and_the_session_goes_on() -> None:
    ini, res, relay = connect()
    relay.send(ini, [frames.encode_session_frame(MsgType.BUNDLE, SESSION_ID, b"\x00\x05abc")])
    relay.pump(1.0)
    assert res.counters.extra["malformed-bundle"] == 1
    assert res.state is LinkState.ESTABLISHED
    assert_data_flows(ini, res, relay, 2.0)


def test_a_forged_record_in_a_bundle_costs_only_itself() -> None:
    ini, res, relay = connect()
    genuine = [ethernet(100), ethernet(200)]
    records = [data[frames.SESSION_HEADER_SIZE :] for frame in genuine for data in ini.send_frame(frame, 1.0)]
    forged = bytes(len(records[0]))  # epoch 0, counter 0, a tag that cannot verify
    body = b"".join(len(r).to_bytes(2, "big") + r for r in (records[0], forged, records[1]))
    relay.send(ini, [frames.encode_session_frame(MsgType.BUNDLE, SESSION_ID, body)])
    relay.pump(1.0)
    assert relay.delivered[id(res)] == genuine
    assert sum(res.counters.extra.values()) == 1, res.counters.extra


_BOUNDS = [
    (0, "undersize"),
    (MIN_ETHERNET_FRAME - 1, "undersize"),
    (MIN_ETHERNET_FRAME, None),
    (MTU + ETHERNET_OVERHEAD, None),
    (MTU + ETHERNET_OVERHEAD + 1, "oversize"),  # would pass under the default MTU: the relay's MTU applies
    (4000, "oversize"),
]


def _bound_drops(link: PeerLink) -> dict[str, int]:
    dropped = link.status(1.0)["dropped"]
    return {reason: count for reason, count in dropped.items() if count}


@pytest.mark.parametrize(("size", "dropped"), _BOUNDS)
def test_frames_outside_ethernet_bounds_are_dropped_and_counted(size: int, dropped: str | None) -> None:
    ini, res, relay = connect()
    frame = ethernet(size)
    relay.send(ini, ini.send_frame(frame, 1.0))
    relay.pump(1.0)
    assert relay.delivered[id(res)] == ([] if dropped else [frame])
    assert _bound_drops(res) == ({dropped: 1} if dropped else {})
    assert res.counters.rx_frames == (0 if dropped else 1)


@pytest.mark.parametrize(("size", "dropped"), _BOUNDS)
def test_the_hot_path_consumes_an_out_of_bounds_frame_and_counts_it_once(size: int, dropped: str | None) -> None:
    """receive_data opens the record (its counter is spent): for a frame out of bounds it must say
    "consumed", not "use on_frame", or the driver hands the record on and it counts as a replay too."""
    ini, res, _ = connect()
    frame = ethernet(size)
    (wire,) = ini.send_frame(frame, 1.0)
    record = frames.decode(wire).payload  # type: ignore[union-attr]
    got = res.receive_data(record, 1.0)
    if dropped:
        assert got is CONSUMED and not got
    else:
        assert got == frame
    assert _bound_drops(res) == ({dropped: 1} if dropped else {})
    # The same record again is a replay, and only a replay: the hot path passes it on.
    assert res.receive_data(record, 1.1) is None
    res.on_frame(frames.decode(wire), 1.1)  # type: ignore[arg-type]
    assert _bound_drops(res) == ({dropped: 1, "replay": 1} if dropped else {"replay": 1})


def test_send_frame_before_established_returns_nothing() -> None:
    ini, res = make_links()
    assert ini.send_frame(ethernet(60), 0.0) == []  # not even started
    relay = Relay(ini, res, auto_establish=False)
    relay.send(ini, ini.start(0.0))
    assert ini.send_frame(ethernet(60), 0.0) == []  # handshaking
    relay.send(res, res.start(0.0))
    relay.pump(0.0)
    assert ini.state is LinkState.AWAITING_ESTABLISHED
    assert ini.send_frame(ethernet(60), 0.0) == []  # keys, but the relay has not said ESTABLISHED
    assert res.send_frame(ethernet(60), 0.0) == []
    assert ini.counters.tx_frames == 0 and ini.tx_bytes == 0


# --- failures and recovery ----------------------------------------------------------


def test_lost_msg3_initiator_restarts_and_the_pair_establishes() -> None:
    ini, res = make_links()
    relay = Relay(ini, res)
    relay.drop = lambda sender, frame: (
        sender is ini and frame.type == MsgType.HANDSHAKE and len(relay.handshakes_from(ini)) == 2
    )
    relay.send(ini, ini.start(0.0))
    relay.send(res, res.start(0.0))
    relay.pump(0.0)
    assert ini.state is LinkState.AWAITING_ESTABLISHED  # it finished; its msg3 did not arrive
    assert res.state is LinkState.HANDSHAKING
    deadline = ini.next_deadline()
    assert deadline is not None and deadline <= HANDSHAKE_TIMEOUT

    relay.tick(HANDSHAKE_TIMEOUT - 0.001)
    assert ini.state is LinkState.AWAITING_ESTABLISHED and len(relay.handshakes_from(ini)) == 2

    relay.drop = lambda _sender, _frame: False
    restart = ini.handle_timer(HANDSHAKE_TIMEOUT)
    (frame,) = (frames.decode(data) for data in restart)
    assert isinstance(frame, SessionFrame) and frame.type == MsgType.HANDSHAKE and len(frame.payload) == MSG1_SIZE
    assert ini.state is LinkState.HANDSHAKING and ini.last_error == "no ESTABLISHED from relay"
    relay.send(ini, restart)
    relay.tick(HANDSHAKE_TIMEOUT)
    assert ini.state is LinkState.ESTABLISHED and res.state is LinkState.ESTABLISHED
    assert ini.session_tag == res.session_tag
    assert ini.counters.handshakes == 2
    assert_data_flows(ini, res, relay, HANDSHAKE_TIMEOUT + 1)


def test_responder_timer_does_not_discard_a_handshake_in_progress() -> None:
    # The responder has waited since t=0 (its deadline is t=10); the initiator starts at 9.9, e.g. after a
    # dead-peer restart on its side, so its msg1 arrives at 9.95 and msg3 is in flight when the
    # responder's timer is due at 10.0.
    key_ini, key_res = ordered_keys()
    res = link(key_res, key_ini, 0.0)
    assert res.start(0.0) == []
    ini = link(key_ini, key_res, 9.9)
    relay = Relay(ini, res)
    (msg1,) = ini.start(9.9)
    relay.send(res, res.on_frame(frames.decode(msg1), 9.95)[0])  # type: ignore[arg-type]
    relay.tick(10.0)  # the responder's timer runs; msg2 reaches the initiator, msg3 goes back
    relay.pump(10.05)
    assert ini.state is LinkState.ESTABLISHED and res.state is LinkState.ESTABLISHED


def test_psk_mismatch_never_establishes() -> None:
    ini, res, relay = connect(psk_ini=generate_psk(), psk_res=generate_psk())
    for step in range(1, 4):
        relay.tick(step * HANDSHAKE_TIMEOUT)
        assert ini.state is not LinkState.ESTABLISHED and res.state is not LinkState.ESTABLISHED
    assert ini.last_error is not None and "PSK mismatch" in ini.last_error
    assert ini.counters.handshakes == 4  # it kept retrying
    assert not relay.ready


def test_same_psk_establishes() -> None:
    psk = generate_psk()
    ini, res, _ = connect(psk_ini=psk, psk_res=psk)
    assert ini.state is LinkState.ESTABLISHED and res.state is LinkState.ESTABLISHED


@pytest.mark.parametrize("refuser", ["initiator", "responder"])
def test_peer_outside_the_allow_list_never_establishes(refuser: str) -> None:
    stranger_only = frozenset({public_bytes(generate_identity())})
    kwargs = {"allowed_ini" if refuser == "initiator" else "allowed_res": stranger_only}
    ini, res, relay = connect(**kwargs)
    for step in range(1, 4):
        relay.tick(step * HANDSHAKE_TIMEOUT)
        assert ini.state is not LinkState.ESTABLISHED and res.state is not LinkState.ESTABLISHED
    refusing = ini if refuser == "initiator" else res
    assert refusing.last_error is not None and "allow-list" in refusing.last_error
    assert len(relay.ready) < 2


def test_peer_in_the_allow_list_establishes() -> None:
    key_ini, key_res = ordered_keys()
    both = frozenset({public_bytes(key_ini), public_bytes(key_res)})
    ini = link(key_ini, key_res, 0.0, allowed_peers=both)
    res = link(key_res, key_ini, 0.0, allowed_peers=both)
    relay = Relay(ini, res)
    relay.send(ini, ini.start(0.0))
    relay.send(res, res.start(0.0))
    relay.pump(0.0)
    assert ini.state is LinkState.ESTABLISHED and res.state is LinkState.ESTABLISHED


def test_replayed_handshake_after_established_does_not_disturb_the_session() -> None:
    ini, res, relay = connect()
    tag = ini.session_tag
    msg1, msg3 = (frames.encode_session_frame(MsgType.HANDSHAKE, SESSION_ID, m) for m in relay.handshakes_from(ini))
    (msg2,) = (frames.encode_session_frame(MsgType.HANDSHAKE, SESSION_ID, m) for m in relay.handshakes_from(res))
    for receiver, data in ((res, msg1), (res, msg3), (ini, msg2), (res, msg1)):
        out, eth = receiver.on_frame(frames.decode(data), 1.0)  # type: ignore[arg-type]
        assert out == [] and eth == []
    assert ini.state is LinkState.ESTABLISHED and res.state is LinkState.ESTABLISHED
    assert ini.session_tag == tag and res.session_tag == tag
    assert ini.counters.handshakes == 1 and res.counters.handshakes == 1
    # Each stray message is counted where it landed.
    assert res.counters.extra == {"stray-handshake": 3} and ini.counters.extra == {"stray-handshake": 1}
    assert_data_flows(ini, res, relay, 1.0)


@pytest.mark.parametrize("kind", [MsgType.PATH, MsgType.CANDIDATES])
def test_a_record_for_a_direct_path_nobody_offered_is_counted(kind: MsgType) -> None:
    ini, res, relay = connect()
    seen: list[tuple[MsgType, bytes]] = []
    wire = ini.seal_record(kind, b"\x01nonsense", 1.0)
    assert wire is not None
    res.on_frame(frames.decode(wire), 1.0)  # type: ignore[arg-type]
    assert res.counters.extra == {"unsolicited": 1}
    # With a direct-path manager listening, the same kind of record goes to it instead.
    res.on_record = lambda k, plaintext: seen.append((k, plaintext))
    wire = ini.seal_record(kind, b"\x02offer", 1.0)
    assert wire is not None
    res.on_frame(frames.decode(wire), 1.0)  # type: ignore[arg-type]
    assert seen == [(kind, b"\x02offer")] and res.counters.extra == {"unsolicited": 1}
    assert_data_flows(ini, res, relay, 2.0)


def test_count_drop_shows_in_status() -> None:
    ini, _ = make_links()
    ini.count_drop("malformed-frame")
    ini.count_drop("malformed-frame")
    ini.count_drop("unexpected-frame")
    assert ini.status(0.0)["dropped"] == {
        "malformed-frame": 2,
        "unexpected-frame": 1,
        "oversize": 0,
        "undersize": 0,
    }


# --- closing, liveness -----------------------------------------------------------------


def test_close_sends_bye_and_the_other_side_closes() -> None:
    ini, res, relay = connect()
    out = ini.close("shutting down", 1.0)
    assert [frames.decode(d).type for d in out] == [MsgType.BYE]  # type: ignore[union-attr]
    assert ini.state is LinkState.CLOSED
    relay.send(ini, out)
    relay.pump(1.0)
    assert res.state is LinkState.CLOSED
    assert ini.send_frame(ethernet(60), 1.0) == [] and res.send_frame(ethernet(60), 1.0) == []
    assert ini.close("again", 1.1) == []  # no second BYE


def test_heartbeats_measure_rtt() -> None:
    ini, res, relay = connect()
    assert ini.status(0.0)["rtt_ms"] is None
    assert ini.next_deadline() == pytest.approx(HEARTBEAT)
    relay.send(ini, ini.handle_timer(HEARTBEAT))
    relay.send(res, res.handle_timer(HEARTBEAT))
    assert [f.type for _, f in relay.sent] == [MsgType.HANDSHAKE] * 3  # nothing delivered yet
    relay.pump(HEARTBEAT + 0.05)  # the requests and the replies cross the relay 50 ms later
    assert ini.status(HEARTBEAT + 0.05)["rtt_ms"] == pytest.approx(50.0)
    assert res.status(HEARTBEAT + 0.05)["rtt_ms"] == pytest.approx(50.0)
    assert [f.type for _, f in relay.sent].count(MsgType.HEARTBEAT) == 4  # two requests, two replies


def test_bytes_sent_by_one_side_are_the_bytes_received_by_the_other() -> None:
    ini, res, relay = connect()
    relay.send(ini, ini.send_frame(ethernet(100), 1.0))
    relay.pump(1.0)
    relay.tick(HEARTBEAT)
    relay.send(res, res.send_frame(ethernet(100), HEARTBEAT + 1))
    relay.pump(HEARTBEAT + 1)
    assert ini.tx_bytes == res.rx_bytes
    assert res.tx_bytes == ini.rx_bytes


def test_silent_peer_restarts_the_handshake_and_the_pair_recovers() -> None:
    ini, res, relay = connect()
    old_tag = ini.session_tag
    relay.down = True
    now = 0.0
    while now < DEAD_PEER_TIMEOUT - 1:
        now += 1.0
        relay.tick(now)
        assert ini.state is LinkState.ESTABLISHED and res.state is LinkState.ESTABLISHED
    relay.tick(DEAD_PEER_TIMEOUT)
    assert ini.state is LinkState.HANDSHAKING and res.state is LinkState.HANDSHAKING
    assert ini.last_error is not None and "silent" in ini.last_error
    restarted = [f for s, f in relay.sent if s is ini and f.type == MsgType.HANDSHAKE]
    assert len(restarted[-1].payload) == MSG1_SIZE and len(restarted) == 3  # msg1, msg3, then a new msg1
    assert ini.status(DEAD_PEER_TIMEOUT)["path"] is None

    relay.down = False  # the relay path heals; the initiator's next retry gets through
    relay.tick(DEAD_PEER_TIMEOUT + HANDSHAKE_TIMEOUT)
    assert ini.state is LinkState.ESTABLISHED and res.state is LinkState.ESTABLISHED
    assert ini.session_tag == res.session_tag != old_tag
    assert_data_flows(ini, res, relay, DEAD_PEER_TIMEOUT + HANDSHAKE_TIMEOUT + 1)


# --- status -------------------------------------------------------------------------------


def test_status_reports_the_link() -> None:
    ini, res = make_links()
    before = ini.status(0.0)
    assert before["path"] is None and before["endpoint"] is None and before["session_age_s"] is None
    assert before["state"] == "handshaking"
    relay = Relay(ini, res)
    relay.send(ini, ini.start(0.0))
    relay.send(res, res.start(0.0))
    relay.pump(2.0)
    relay.send(ini, ini.send_frame(ethernet(60), 3.0))
    relay.pump(3.0)
    status = ini.status(12.34)
    for key in ("identity", "path", "endpoint", "rx_bytes", "tx_bytes", "rtt_ms", "session_age_s"):
        assert key in status
    assert status["identity"] == encode_public(ini.peer)
    assert status["path"] == "relay" and status["state"] == "established"
    assert status["session_age_s"] == pytest.approx(10.3)
    assert status["tx_bytes"] > 60 and status["rx_bytes"] == 0
    assert res.status(12.34)["rx_bytes"] == status["tx_bytes"]
    assert status["e2e_session"] == ini.session_tag
    # Each side sees the other's public address, IPv6 in brackets.
    endpoints = {ini.status(3.0)["endpoint"], res.status(3.0)["endpoint"]}
    assert endpoints == {"198.51.100.7:40001", "[2001:db8::2]:40002"}
