"""A node among several peers (traversal/node.py, issue 8): the learning switch's wiring, and the
relay's MEMBERS list. Real sessions and handshakes between Node objects over the in-test relay of
test_node_members (no TAP device: a recorder stands in for it, since what is checked is which
session a frame is sealed for, not the TAP)."""

from __future__ import annotations

import asyncio
import logging
import types
from pathlib import Path

import pytest

from tests.unit.test_node_members import InTestRelay, events, make_node, peers, run
from transport import frames
from transport.frames import MsgType
from transport.identity import generate_identity, public_bytes
from transport.paths import Route
from traversal.node import Node
from traversal.peer import LinkState

BROADCAST = b"\xff" * 6


class RecordingTap:
    """Where a node writes the Ethernet frames its peers send (stands in for the TAP device)."""

    name = "tap-test"
    mtu = 1400

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def write(self, frame: bytes) -> None:
        self.frames.append(frame)

    def set_mtu(self, mtu: int) -> None:
        self.mtu = mtu


def ethernet(dst: bytes, src: bytes) -> bytes:
    return dst + src + b"\x08\x00" + bytes(46)


def mac(i: int) -> bytes:
    return bytes([2, 0, 0, 0, 0, i])


def mesh_of_three(tmp_path: Path) -> tuple[InTestRelay, list[Node]]:
    nodes = [make_node(tmp_path, generate_identity(), name) for name in ("a", "b", "c")]
    for node in nodes:
        node.tap = RecordingTap()  # type: ignore[assignment]
    relay = InTestRelay()
    for i, x in enumerate(nodes):
        for y in nodes[i + 1 :]:
            relay.pair(x, y)
    relay.pump(*nodes)
    for node in nodes:
        assert list(peers(node).values()) == [LinkState.ESTABLISHED] * 2
    return relay, nodes


def sealed_for(relay: InTestRelay, node: Node) -> dict[bytes, int]:
    """DATA frames ``node`` queued for the relay, by the peer they are for (and forward them)."""
    counts: dict[bytes, int] = {}
    queued = []
    while not node._send_queue.empty():
        queued.append(node._send_queue.get_nowait())
    for data in queued:
        kind = frames.peek_type(data)
        if kind in (MsgType.DATA, MsgType.BUNDLE):
            session_id = frames.peek_session_id(data, kind)
            x, y = relay.sessions[session_id]
            peer = (y if x is node else x).identity_raw
            records = len(frames.split_bundle(data[frames.SESSION_HEADER_SIZE :])) if kind == MsgType.BUNDLE else 1
            counts[peer] = counts.get(peer, 0) + records
        relay._handle(node, data)
    return counts


def test_unicast_goes_to_the_owner_of_the_mac_broadcast_to_everyone(tmp_path: Path) -> None:
    async def body() -> None:
        relay, (a, b, c) = mesh_of_three(tmp_path)
        # Unknown destination: flooded, to b and c once each.
        a._on_tap_frames([ethernet(mac(2), mac(1))])
        assert sealed_for(relay, a) == {b.identity_raw: 1, c.identity_raw: 1}
        # b's kernel answers from mac(2): a learns that mac(2) is behind b.
        b._on_tap_frames([ethernet(mac(1), mac(2))])
        sealed_for(relay, b)
        relay.pump(a, b, c)
        assert a.tap.frames[-1] == ethernet(mac(1), mac(2))  # type: ignore[union-attr]
        # Now frames to mac(2) go to b alone; broadcasts still go to both.
        a._on_tap_frames([ethernet(mac(2), mac(1))] * 3 + [ethernet(BROADCAST, mac(1))])
        assert sealed_for(relay, a) == {b.identity_raw: 4, c.identity_raw: 1}
        relay.pump(a, b, c)
        # c's TAP got the first (flooded) frame and the broadcast, never the unicast meant for b.
        assert c.tap.frames == [ethernet(mac(2), mac(1)), ethernet(BROADCAST, mac(1))]  # type: ignore[union-attr]
        assert (a.switch.counters.unicast, a.switch.counters.flooded) == (3, 2)
        now = asyncio.get_running_loop().time()
        assert a.switch.addresses(b.identity_raw, now) == ["02:00:00:00:00:02"]
        assert a.switch.addresses(c.identity_raw, now) == []

    run(body)


def test_a_peer_that_leaves_takes_its_addresses_with_it(tmp_path: Path) -> None:
    async def body() -> None:
        relay, (a, b, _c) = mesh_of_three(tmp_path)
        b._on_tap_frames([ethernet(BROADCAST, mac(2))])
        sealed_for(relay, b)
        relay.pump(a, b)
        assert len(a.switch) == 1
        relay.leave(b)
        assert len(a.switch) == 0

    run(body)


def test_a_member_the_relay_no_longer_lists_is_dropped_when_we_trust_the_relay(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="traversal")

    async def body() -> None:
        _relay, (a, b, c) = mesh_of_three(tmp_path)
        a._on_relay_frame(frames.encode(frames.Members(2, tuple(sorted([a.identity_raw, c.identity_raw])))))
        assert set(peers(a)) == {c.identity_raw}
        assert a.known_members() == {c.identity_raw}
        assert any("no longer a member on the relay" in line for line in events(caplog, "peer_removed"))
        # A list too long to be sent says nothing about who left: nobody is dropped.
        c._on_relay_frame(frames.encode(frames.Members(100_000, ())))
        assert set(peers(c)) == {a.identity_raw, b.identity_raw}
        assert c.known_members() is None

    run(body)


def test_a_node_that_let_the_relay_go_checks_in_on_time_or_when_needed(tmp_path: Path) -> None:
    async def body() -> None:
        node = make_node(tmp_path, generate_identity(), "a")
        node.config.direct.checkin = 0.05
        assert await asyncio.wait_for(node._wait_unparked(), 2) == "check-in: hear of members added since"
        node.config.direct.checkin = 0  # never: only a need brings it back
        waiting = asyncio.ensure_future(node._wait_unparked())
        await asyncio.sleep(0.1)
        assert not waiting.done()
        node._unpark.set()
        assert await asyncio.wait_for(waiting, 2) == "a peer needs the relay again"

    run(body)


class FakeRelayConnection:
    """Stands in for the node's relay connection: only whether it was closed matters here."""

    closed = False

    async def close(self) -> None:
        self.closed = True


def test_the_relay_is_let_go_only_once_every_known_member_is_direct(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="traversal")

    async def body() -> None:
        _relay, (a, b, c) = mesh_of_three(tmp_path)
        relay = FakeRelayConnection()
        a.relay = relay  # type: ignore[assignment]
        for link in a.links.values():  # both of a's peers reached directly, both ways
            link.paths = types.SimpleNamespace(both_direct=True, route=Route.DIRECT)  # type: ignore[assignment]
        d = generate_identity()
        members = sorted([a.identity_raw, b.identity_raw, c.identity_raw, public_bytes(d)])
        a._on_relay_frame(frames.encode(frames.Members(4, tuple(members))))
        await asyncio.sleep(0)
        # d is a member but not online: a keeps its relay connection to hear when d comes.
        assert not a._parked and not relay.closed
        assert a.members_missing() == {public_bytes(d)}
        assert any("1 member(s) not reached directly" in line for line in events(caplog, "relay_kept"))
        # d is removed from the network: every member a knows of is direct, so the relay goes.
        a._on_relay_frame(frames.encode(frames.Members(3, tuple(m for m in members if m != public_bytes(d)))))
        await asyncio.sleep(0)
        assert a._parked and relay.closed
        # c is lost for good: a logs in again, or it would never hear of c's return.
        (c_session,) = [sid for sid, link in a.links.items() if link.peer == c.identity_raw]
        a._forget_link(c_session)
        assert a._unpark.is_set()

    run(body)
