"""Tests for the frame handling of traversal/node.py that needs no network: what the node does with
frames that must be dropped (counted, logged within a budget) and with frames for the TAP.

A Node is built without running it (no TAP device, no relay, no control socket): its links are
two sans-I/O PeerLinks joined by the in-test relay of test_peer.py, and its TAP is a list.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_peer import MTU, SESSION_ID, connect, ethernet
from transport import frames
from transport.frames import MsgType
from transport.identity import generate_identity
from traversal.logfmt import LOG_BURST
from traversal.node import Node, NodeConfig
from traversal.peer import ETHERNET_OVERHEAD, PeerLink


class ListTap:
    """The TAP as the node uses it: ``write`` and ``mtu``."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.mtu = MTU
        self.name = "tap-test"

    def write(self, frame: bytes) -> None:
        self.written.append(frame)


def run_with_node(body: Callable[[Node, PeerLink, PeerLink, ListTap], None]) -> None:
    """Build a node whose only link is the responder of an established pair, and run ``body``."""

    async def main() -> None:
        config = NodeConfig(
            relay_url="wss://relay.invalid:8443",
            ca=None,
            network="chr-001",
            identity=generate_identity(),
            tap_name="tap-test",
            address="10.10.10.9/24",
            control_path=Path("/nonexistent/traversal-test.sock"),
        )
        node = Node(config)
        ini, res, _ = connect()
        node.links[SESSION_ID] = res
        tap = ListTap()
        node.tap = tap  # type: ignore[assignment]
        body(node, ini, res, tap)

    asyncio.run(main())


def node_lines(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "traversal.node" and f"event={event} " in r.getMessage()
    ]


def test_a_frame_out_of_bounds_is_counted_once_and_never_written(caplog: pytest.LogCaptureFixture) -> None:
    """The hot path opens the record, finds the frame too long and drops it; the node must not then
    hand the same record to the general path (which would count it again, as a replay)."""

    def body(node: Node, ini: PeerLink, res: PeerLink, tap: ListTap) -> None:
        for size in (MTU + ETHERNET_OVERHEAD + 1, 5):
            (wire,) = ini.send_frame(ethernet(size), 1.0)
            node._on_relay_frame(wire)  # over the relay
            (wire,) = ini.send_frame(ethernet(size), 1.0)
            node._on_direct_frame(res, wire)  # over the direct path
        good = ethernet(100)
        (wire,) = ini.send_frame(good, 1.0)
        node._on_direct_frame(res, wire)
        assert tap.written == [good]
        dropped = {k: v for k, v in res.status(1.0)["dropped"].items() if v}
        assert dropped == {"oversize": 2, "undersize": 2}

    run_with_node(body)


def test_garbage_on_the_direct_path_is_counted_per_peer_and_logged_within_budget(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="traversal.node")

    def body(node: Node, ini: PeerLink, res: PeerLink, tap: ListTap) -> None:
        for i in range(100):
            node._on_direct_frame(res, bytes([0x0A, 0xEE]) + bytes(i))  # unknown frame type
        for _ in range(3):
            node._on_direct_frame(res, frames.encode(frames.Ready(SESSION_ID)))  # decodes, but not a session frame
        assert res.status(1.0)["dropped"]["malformed-frame"] == 100
        assert res.status(1.0)["dropped"]["unexpected-frame"] == 3
        assert len(node_lines(caplog, "direct_frame_dropped")) == LOG_BURST
        assert tap.written == []
        # The summary is due at the end of the interval: the node keeps a timer for it.
        assert node._drop_log_timer is not None
        node._flush_drop_log()  # the timer firing early changes nothing ...
        assert node_lines(caplog, "direct_frame_dropped_suppressed") == []
        node._drop_log.flush(float("inf"))  # ... at its deadline it says how much was left out
        (summary,) = node_lines(caplog, "direct_frame_dropped_suppressed")
        assert f"peer={res.peer_name} " in summary and f"suppressed={103 - LOG_BURST} " in summary

    run_with_node(body)


def test_frames_from_the_relay_that_do_not_decode_are_counted_and_logged_within_budget(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="traversal.node")

    def body(node: Node, ini: PeerLink, res: PeerLink, tap: ListTap) -> None:
        for i in range(50):
            assert node._on_relay_frame(b"\x0a\x12" + bytes(i % 18)) is None  # truncated DATA frames
        status: dict[str, Any] = node.status()
        assert status["relay"]["dropped"] == 50
        assert len(node_lines(caplog, "relay_frame_dropped")) == LOG_BURST
        # The session was not touched, and still works.
        good = ethernet(60)
        (wire,) = ini.send_frame(good, 2.0)
        node._on_relay_frame(wire)
        assert tap.written == [good]

    run_with_node(body)


def test_a_stray_handshake_over_the_relay_is_counted_not_fatal() -> None:
    def body(node: Node, ini: PeerLink, res: PeerLink, tap: ListTap) -> None:
        tag = res.session_tag
        node._on_relay_frame(frames.encode_session_frame(MsgType.HANDSHAKE, SESSION_ID, bytes(1217)))
        assert res.counters.extra == {"stray-handshake": 1}
        assert res.session_tag == tag and node.links[SESSION_ID] is res

    run_with_node(body)
