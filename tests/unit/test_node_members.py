"""Tests for Node.reload_members (traversal/node.py): the node's --members allow-list re-read on SIGHUP.

Nodes are built without running them (no TAP, no sockets): what they send to the relay is
taken from their send queue by a small in-test relay that announces peers (PEER_JOINED),
forwards session frames and answers two READYs with ESTABLISHED, as the real one does.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from transport import frames
from transport.constants import HANDSHAKE_TIMEOUT
from transport.frames import MsgType
from transport.identity import encode_public, generate_identity, load_members, public_bytes
from traversal.direct import DirectSettings
from traversal.node import Node, NodeConfig
from traversal.peer import LinkState


class InTestRelay:
    """Sessions between nodes: forwards what their send queues hold, as the relay would."""

    def __init__(self) -> None:
        self.sessions: dict[bytes, tuple[Node, Node]] = {}
        self.ready: dict[bytes, set[int]] = {}

    def pair(self, x: Node, y: Node) -> bytes:
        """Both are online: announce each to the other on a new session."""
        session_id = secrets.token_bytes(16)
        self.sessions[session_id] = (x, y)
        x._on_relay_frame(frames.encode(frames.PeerJoined(session_id, y.identity_raw)))
        y._on_relay_frame(frames.encode(frames.PeerJoined(session_id, x.identity_raw)))
        return session_id

    def leave(self, node: Node) -> None:
        """``node`` disconnects: its peers hear PEER_LEFT."""
        for session_id, (x, y) in list(self.sessions.items()):
            if node in (x, y):
                other = y if node is x else x
                other._on_relay_frame(frames.encode(frames.PeerLeft(session_id, node.identity_raw, "disconnected")))
                del self.sessions[session_id]

    def pump(self, *nodes: Node) -> None:
        moved = True
        while moved:
            moved = False
            for node in nodes:
                while not node._send_queue.empty():
                    moved = True
                    self._handle(node, node._send_queue.get_nowait())

    def _handle(self, sender: Node, data: bytes) -> None:
        kind = frames.peek_type(data)
        if kind == MsgType.RELEASE:
            return
        if kind == MsgType.READY:
            session_id = frames.decode(data).session_id  # type: ignore[union-attr]
            ready = self.ready.setdefault(session_id, set())
            ready.add(id(sender))
            if len(ready) == 2:
                est = frames.Established(session_id, 1400, 5, 3600, "203.0.113.10", 4000, False)
                for end in self.sessions[session_id]:
                    end._on_relay_frame(frames.encode(est))
            return
        session_id = frames.peek_session_id(data, kind)
        if session_id not in self.sessions:
            return  # the relay drops frames of sessions it does not know
        x, y = self.sessions[session_id]
        (y if sender is x else x)._on_relay_frame(data)


def write_members(path: Path, *keys: Ed25519PrivateKey) -> Path:
    path.write_text("".join(f"{encode_public(public_bytes(k))}\n" for k in keys))
    return path


def make_node(tmp_path: Path, key: Ed25519PrivateKey, name: str, allow: Path | None = None) -> Node:
    config = NodeConfig(
        relay_url="wss://relay.invalid:8443",
        ca=None,
        network="chr-001",
        identity=key,
        tap_name=f"tap-{name}",
        address="10.10.10.9/24",
        control_path=tmp_path / f"{name}.sock",
        members=load_members(allow) if allow else None,
        members_file=allow,
        direct=DirectSettings(enabled=False),
    )
    node = Node(config)
    node.relay = object()  # type: ignore[assignment]  # "connected": PEER_JOINED came on this connection
    return node


def keys_in_role_order() -> tuple[Ed25519PrivateKey, Ed25519PrivateKey]:
    """Two identities, the first of which initiates handshakes with the second."""
    x, y = generate_identity(), generate_identity()
    return (x, y) if public_bytes(x) < public_bytes(y) else (y, x)


def run(body: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), 10))


def events(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"event={event} ")]


def peers(node: Node) -> dict[bytes, LinkState]:
    return {link.peer: link.state for link in node.links.values()}


def test_without_members_there_is_nothing_to_reload(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="traversal.node")

    async def body() -> None:
        node = make_node(tmp_path, generate_identity(), "a")
        node.reload_members()
        assert node.config.members is None and node.config.trust == "relay-membership"

    run(body)
    (line,) = events(caplog, "members_reload_skipped")
    assert "no allow-list to re-read" in line


@pytest.mark.parametrize("a_initiates", [True, False])
def test_a_peer_refused_earlier_is_accepted_on_the_same_relay_session(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, a_initiates: bool
) -> None:
    """The relay announced c while a refused it; once listed, a takes up that announcement
    (no reconnect, so no other session is disturbed) and the two handshake."""
    caplog.set_level(logging.INFO, logger="traversal.node")
    first, second = keys_in_role_order()
    a_key, c_key = (first, second) if a_initiates else (second, first)
    b_key = generate_identity()

    async def body() -> None:
        allow = write_members(tmp_path / "a.members", b_key)
        a = make_node(tmp_path, a_key, "a", allow)
        b, c = make_node(tmp_path, b_key, "b"), make_node(tmp_path, c_key, "c")
        relay = InTestRelay()
        relay.pair(a, b)
        relay.pump(a, b)
        session_ab = next(iter(a.links.values())).session_tag
        relay.pair(a, c)  # refused by a
        relay.pump(a, b, c)
        assert set(peers(a)) == {public_bytes(b_key)}
        assert peers(c) == {public_bytes(a_key): LinkState.HANDSHAKING}
        write_members(allow, b_key, c_key)
        a.reload_members()
        relay.pump(a, b, c)
        if not a_initiates:  # a waits for c's first message, which c resends when its attempt times out
            (link,) = c.links.values()
            c._send_link(link, link.handle_timer(c._loop.time() + HANDSHAKE_TIMEOUT))
            relay.pump(a, b, c)
        assert peers(a) == {public_bytes(b_key): LinkState.ESTABLISHED, public_bytes(c_key): LinkState.ESTABLISHED}
        assert peers(c) == {public_bytes(a_key): LinkState.ESTABLISHED}
        ab = next(link for link in a.links.values() if link.peer == public_bytes(b_key))
        assert ab.session_tag == session_ab  # a-b untouched

    run(body)
    (reloaded,) = events(caplog, "members_reloaded")
    assert "added=1 removed=0 members=2" in reloaded
    assert len(events(caplog, "peer_accepted")) == 1


def test_a_refused_peer_that_left_is_not_taken_up_later(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="traversal.node")
    a_key, c_key = generate_identity(), generate_identity()

    async def body() -> None:
        allow = write_members(tmp_path / "a.members")
        a, c = make_node(tmp_path, a_key, "a", allow), make_node(tmp_path, c_key, "c")
        relay = InTestRelay()
        relay.pair(a, c)
        relay.leave(c)  # its relay session is gone: nothing to take up
        write_members(allow, c_key)
        a.reload_members()
        assert a.links == {} and a._send_queue.empty()
        # It is announced when it comes back, and accepted then.
        relay.pair(a, c)
        relay.pump(a, c)
        assert peers(a) == {public_bytes(c_key): LinkState.ESTABLISHED}

    run(body)
    assert events(caplog, "peer_accepted") == []


def test_a_parked_node_reconnects_when_the_allow_list_gains_a_member(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With the relay connection let go (every peer direct), only a reconnect lets the relay introduce the newcomer."""
    caplog.set_level(logging.INFO, logger="traversal.node")
    a_key, c_key = generate_identity(), generate_identity()

    async def body() -> None:
        allow = write_members(tmp_path / "a.members")
        a = make_node(tmp_path, a_key, "a", allow)
        a.relay, a._parked = None, True
        a.reload_members()  # nothing added: stays parked
        assert not a._unpark.is_set()
        write_members(allow, c_key)
        a.reload_members()
        assert a._unpark.is_set()

    run(body)
    (line,) = events(caplog, "relay_needed")
    assert "added to --members" in line


def test_a_removed_peer_is_told_bye_forgotten_and_refused_from_then_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="traversal.node")
    caplog.set_level(logging.INFO, logger="traversal.peer")
    a_key, b_key, c_key = generate_identity(), generate_identity(), generate_identity()

    async def body() -> None:
        allow = write_members(tmp_path / "a.members", b_key, c_key)
        a = make_node(tmp_path, a_key, "a", allow)
        b, c = make_node(tmp_path, b_key, "b"), make_node(tmp_path, c_key, "c")
        relay = InTestRelay()
        relay.pair(a, b)
        relay.pair(a, c)
        relay.pump(a, b, c)
        assert set(peers(a).values()) == {LinkState.ESTABLISHED} and len(a.links) == 2
        session_ab = next(link for link in a.links.values() if link.peer == public_bytes(b_key)).session_tag
        write_members(allow, b_key)
        a.reload_members()
        assert set(peers(a)) == {public_bytes(b_key)}
        relay.pump(a, b, c)
        assert c.links == {}  # c heard the sealed BYE
        assert next(iter(a.links.values())).session_tag == session_ab
        # c comes back (or the relay announces it again): refused.
        relay.leave(c)
        relay.pair(a, c)
        relay.pump(a, b, c)
        assert set(peers(a)) == {public_bytes(b_key)}

    run(body)
    (removed,) = events(caplog, "peer_removed")
    assert "bye=sent" in removed and 'reason="no longer in --members allow-list"' in removed
    (bye,) = events(caplog, "peer_bye")
    assert "removed from the peer's --members allow-list" in bye
    assert len(events(caplog, "peer_refused")) == 1


@pytest.mark.parametrize(
    ("content", "words"),
    [("garbage\n", "line 1: not a base64 public key"), (None, "does not exist")],
)
def test_a_bad_allow_list_keeps_the_previous_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str | None, words: str
) -> None:
    caplog.set_level(logging.INFO, logger="traversal.node")
    a_key, b_key = generate_identity(), generate_identity()

    async def body() -> None:
        allow = write_members(tmp_path / "a.members", b_key)
        a, b = make_node(tmp_path, a_key, "a", allow), make_node(tmp_path, b_key, "b")
        relay = InTestRelay()
        relay.pair(a, b)
        relay.pump(a, b)
        if content is None:
            allow.unlink()
        else:
            allow.write_text(content)
        a.reload_members()
        assert a.config.members == {public_bytes(b_key)}
        assert peers(a) == {public_bytes(b_key): LinkState.ESTABLISHED}

    run(body)
    (line,) = events(caplog, "members_reload_failed")
    assert words in line and str(tmp_path / "a.members") in line
    assert 'action="kept the previous allow-list of 1 members"' in line
