"""Tests for relay_server/server.py: real websockets over real TLS on 127.0.0.1 (and ::1).

Each test is a plain function running one ``asyncio.run`` bounded by
``asyncio.wait_for``; every wait is for an event the relay must cause (a frame,
a close), never a sleep. Test clients are small helpers on websockets' asyncio
client with real Ed25519 identities.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import http.client
import logging
import random
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from relay_server.server import (
    WEBSOCKET_MAX_SIZE,
    RelayConfig,
    RelayConfigError,
    RelayError,
    RelayServer,
    _observed_address,
    run_relay,
)
from relay_server.tls import client_ssl_context, ensure_self_signed, server_ssl_context
from transport import frames
from transport.constants import MAX_FRAME_SIZE, MAX_HANDSHAKE_SIZE
from transport.frames import (
    MAX_MEMBERS_LISTED,
    Auth,
    AuthOk,
    Challenge,
    Error,
    ErrorCode,
    Established,
    Frame,
    Hello,
    Members,
    MsgType,
    PeerJoined,
    PeerLeft,
    Ready,
    Release,
    decode,
    encode,
    encode_session_frame,
    relay_auth_message,
)
from transport.identity import encode_public, generate_identity, public_bytes, short_id

NET = "chr-001"
OTHER_NET = "chr-002"
STEP = 5.0  # seconds any single expected event may take
TEST_TIMEOUT = 30.0


def run(coro: Awaitable[None], timeout: float = TEST_TIMEOUT) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout))


# --- harness ------------------------------------------------------------------------


class _ErrorCollector(logging.Handler):
    """Collects ERROR records: a relay that logs an error (an exception escaped somewhere) fails the test."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Peer:
    ws: ClientConnection
    key: Ed25519PrivateKey
    auth_ok: AuthOk
    members: Members

    @property
    def identity(self) -> bytes:
        return public_bytes(self.key)

    @property
    def local_port(self) -> int:
        return int(self.ws.local_address[1])

    async def send(self, message: Frame | bytes | str) -> None:
        await self.ws.send(message if isinstance(message, (bytes, str)) else encode(message))

    async def recv_raw(self) -> bytes:
        data = await asyncio.wait_for(self.ws.recv(), STEP)
        assert isinstance(data, bytes)
        return data

    async def recv(self) -> Frame:
        return decode(await self.recv_raw())


class Harness:
    def __init__(self, relay: RelayServer, ca: ssl.SSLContext, host: str) -> None:
        self.relay = relay
        self.ca = ca
        self.host = host

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"wss://{host}:{self.relay.port}/"

    async def open(self) -> ClientConnection:
        return await asyncio.wait_for(
            connect(self.url, ssl=self.ca, compression=None, ping_interval=None, max_size=None), STEP
        )

    async def login(self, key: Ed25519PrivateKey, network: str = NET, supports_direct: bool = True) -> Peer:
        ws = await self.open()
        identity = public_bytes(key)
        await ws.send(encode(Hello(network, identity, supports_direct)))
        challenge = decode(await asyncio.wait_for(ws.recv(), STEP))
        assert isinstance(challenge, Challenge), challenge
        await ws.send(encode(Auth(key.sign(relay_auth_message(network, identity, challenge.nonce)))))
        auth_ok = decode(await asyncio.wait_for(ws.recv(), STEP))
        assert isinstance(auth_ok, AuthOk), auth_ok
        members = decode(await asyncio.wait_for(ws.recv(), STEP))  # the network's members, always next
        assert isinstance(members, Members), members
        return Peer(ws, key, auth_ok, members)

    async def pair(
        self, a_key: Ed25519PrivateKey, b_key: Ed25519PrivateKey, **b_kwargs: Any
    ) -> tuple[Peer, Peer, bytes]:
        a = await self.login(a_key)
        b = await self.login(b_key, **b_kwargs)
        joined_a, joined_b = await a.recv(), await b.recv()
        assert isinstance(joined_a, PeerJoined) and isinstance(joined_b, PeerJoined)
        assert joined_a.session_id == joined_b.session_id
        assert joined_a.peer == b.identity and joined_b.peer == a.identity
        return a, b, joined_a.session_id


@contextlib.asynccontextmanager
async def relay_running(
    tmp_path: Path, networks: dict[str, frozenset[bytes]], host: str = "127.0.0.1", **config: Any
) -> AsyncIterator[Harness]:
    cert, key, _ = ensure_self_signed(tmp_path / "tls", host)
    relay = RelayServer(RelayConfig(host, 0, networks, server_ssl_context(cert, key), **config))
    collector = _ErrorCollector()
    loggers = [logging.getLogger("traversal.relay"), logging.getLogger("websockets")]
    for logger in loggers:
        logger.addHandler(collector)
    await relay.start()
    try:
        yield Harness(relay, client_ssl_context(cert), host)
    finally:
        await relay.close()
        for logger in loggers:
            logger.removeHandler(collector)
    assert not collector.records, [r.getMessage() for r in collector.records]


def keys(n: int) -> list[Ed25519PrivateKey]:
    return [generate_identity() for _ in range(n)]


def members(*ks: Ed25519PrivateKey) -> frozenset[bytes]:
    return frozenset(public_bytes(k) for k in ks)


async def expect_refused(ws: ClientConnection, code: ErrorCode, close_code: int) -> Error:
    """The relay's refusal: one ERROR frame with ``code``, then the close."""
    frame = decode(await asyncio.wait_for(ws.recv(), STEP))
    assert isinstance(frame, Error), frame
    assert frame.code == code, frame
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(ws.recv(), STEP)
    assert ws.close_code == close_code
    return frame


async def expect_forwarding(a: Peer, b: Peer, session_id: bytes) -> None:
    """The pair still forwards both ways, byte-exact."""
    for sender, receiver in ((a, b), (b, a)):
        wire = encode_session_frame(MsgType.DATA, session_id, random.randbytes(100))
        await sender.send(wire)
        assert await receiver.recv_raw() == wire


async def wait_until(predicate: Callable[[], bool], timeout: float = STEP) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting for a condition"
        await asyncio.sleep(0.01)


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics:\n{text}")


# --- authentication and pairing -------------------------------------------------------


def test_auth_pairing_and_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="traversal.relay")
    a_key, b_key = keys(2)

    async def main() -> None:
        async with relay_running(tmp_path, {NET: members(a_key, b_key)}) as h:
            a = await h.login(a_key)
            assert (a.auth_ok.observed_ip, a.auth_ok.observed_port) == ("127.0.0.1", a.local_port)
            b = await h.login(b_key)
            joined_a, joined_b = await a.recv(), await b.recv()
            assert isinstance(joined_a, PeerJoined) and isinstance(joined_b, PeerJoined)
            assert joined_a.session_id == joined_b.session_id and len(joined_a.session_id) == 16
            assert joined_a.peer == b.identity and joined_b.peer == a.identity
            text = h.relay.metrics_text()
            assert metric(text, "traversal_relay_clients_connected") == 2
            assert metric(text, "traversal_relay_connections_open") == 2
            assert metric(text, "traversal_relay_sessions_active") == 1
            (stats,) = h.relay.sessions()
            assert (stats.a, stats.b, stats.established) == (a.identity, b.identity, False)

            session = joined_a.session_id.hex()[:8]
            lines = [r.getMessage() for r in caplog.records if r.name == "traversal.relay"]
            assert (
                f"event=auth_ok network={NET} peer={short_id(a.identity)} addr=127.0.0.1:{a.local_port}"
                in "\n".join(lines)
            )
            assert any(
                line.startswith(f"event=paired network={NET} session={session} a={short_id(a.identity)}")
                for line in lines
            )

    run(main())


def test_three_peers_form_a_full_mesh(tmp_path: Path) -> None:
    a_key, b_key, c_key = keys(3)

    async def main() -> None:
        async with relay_running(tmp_path, {NET: members(a_key, b_key, c_key)}) as h:
            a, b, _ = await h.pair(a_key, b_key)
            c = await h.login(c_key)
            got = {p.identity: await p.recv() for p in (a, b)}
            to_c = [await c.recv(), await c.recv()]
            assert all(isinstance(f, PeerJoined) for f in [*got.values(), *to_c])
            by_peer = {f.peer: f.session_id for f in to_c if isinstance(f, PeerJoined)}
            assert by_peer[a.identity] == got[a.identity].session_id  # type: ignore[union-attr]
            assert by_peer[b.identity] == got[b.identity].session_id  # type: ignore[union-attr]
            assert len(h.relay.sessions()) == 3

    run(main())


def test_concurrent_logins_hear_auth_ok_first_and_mesh_fully(tmp_path: Path) -> None:
    peer_keys = keys(5)

    async def main() -> None:
        async with relay_running(tmp_path, {NET: members(*peer_keys)}) as h:
            # login() insists on CHALLENGE then AUTH_OK: a PEER_JOINED overtaking AUTH_OK would fail it.
            peers = await asyncio.gather(*(h.login(k) for k in peer_keys))
            seen: dict[bytes, set[bytes]] = {}
            for peer in peers:
                for _ in range(len(peers) - 1):
                    joined = await peer.recv()
                    assert isinstance(joined, PeerJoined)
                    seen.setdefault(joined.session_id, set()).update({peer.identity, joined.peer})
            assert len(seen) == 10 and all(len(ends) == 2 for ends in seen.values())
            assert {s.session_id for s in h.relay.sessions()} == set(seen)

    run(main())


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    async def main() -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            relay = RelayServer(RelayConfig("127.0.0.1", taken.getsockname()[1], {NET: frozenset()}, None))
            with pytest.raises(RelayError, match=r"cannot listen on 127\.0\.0\.1:"):
                await relay.start()

    run(main())


def test_observed_address_unmaps_ipv4_mapped_ipv6() -> None:
    class FakeWs:
        remote_address = ("::ffff:203.0.113.11", 40000, 0, 0)

    assert _observed_address(FakeWs()) == ("203.0.113.11", 40000)  # type: ignore[arg-type]
    FakeWs.remote_address = ("2001:db8::7", 5000, 0, 0)
    assert _observed_address(FakeWs()) == ("2001:db8::7", 5000)  # type: ignore[arg-type]


def _ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback_available(), reason="no ::1 here")
def test_ipv6_observed_address(tmp_path: Path) -> None:
    a_key, b_key = keys(2)

    async def main() -> None:
        async with relay_running(tmp_path, {NET: members(a_key, b_key)}, host="::1") as h:
            a, b, session_id = await h.pair(a_key, b_key)
            assert (b.auth_ok.observed_ip, b.auth_ok.observed_port) == ("::1", b.local_port)
            await a.send(Ready(session_id))
            await b.send(Ready(session_id))
            est = await a.recv()
            assert isinstance(est, Established)
            assert (est.peer_public_ip, est.peer_public_port) == ("::1", b.local_port)

    run(main())


def test_ready_from_both_ends_sends_established(tmp_path: Path) -> None:
    a_key, b_key = keys(2)

    async def main() -> None:
        config = {"mtu": 1300, "heartbeat_interval": 7, "key_rotation_interval": 99}
        async with relay_running(tmp_path, {NET: members(a_key, b_key)}, **config) as h:
            a, b, session_id = await h.pair(a_key, b_key, supports_direct=False)
            await a.send(Ready(session_id))
            # One READY is not enough: the next thing A hears is B's frame, not ESTABLISHED.
            probe = encode_session_frame(MsgType.HANDSHAKE, session_id, b"after one ready")
            await b.send(probe)
            assert await a.recv_raw() == probe
            await a.send(Ready(session_id))  # a repeated READY changes nothing
            await b.send(Ready(session_id))
            est_a, est_b = await a.recv(), await b.recv()
            assert est_a == Established(session_id, 1300, 7, 99, "127.0.0.1", b.local_port, False)
            assert est_b == Established(session_id, 1300, 7, 99, "127.0.0.1", a.local_port, True)
            (stats,) = h.relay.sessions()
            assert stats.established
            assert metric(h.relay.metrics_text(), "traversal_relay_sessions_established_total") == 1

    run(main())


# --- forwarding ------------------------------------------------------------------------


def test_forwarding_is_byte_exact_and_counted(tmp_path: Path) -> None:
    a_key, b_key = keys(2)

    async def main() -> None:
        async with relay_running(tmp_path, {NET: members(a_key, b_key)}) as h:
            a, b, sid = await h.pair(a_key, b_key)
            a_frames = [
                encode_session_frame(MsgType.HANDSHAKE, sid, random.randbytes(MAX_HANDSHAKE_SIZE)),
                encode_session_frame(MsgType.DATA, sid, b""),
                encode_session_frame(MsgType.DATA, sid, random.randbytes(frames.MAX_SESSION_PAYLOAD)),
                encode_session_frame(MsgType.CANDIDATES, sid, random.randbytes(300)),
                # Several sealed DATA records in one frame: opaque to the relay like the rest.
                encode_session_frame(MsgType.BUNDLE, sid, random.randbytes(frames.MAX_SESSION_PAYLOAD)),
            ]
            b_frames = [encode_session_frame(kind, sid, random.randbytes(64)) for kind in frames.SEALED_TYPES]
            for wire in a_frames:
                await a.send(wire)
            for wire in b_frames:
                await b.send(wire)
            assert [await b.recv_raw() for _ in a_frames] == a_frames
            assert [await a.recv_raw() for _ in b_frames] == b_frames

            stats = h.relay.session_stats(sid)
            assert stats is not None
            assert (stats.bytes_a_to_b, stats.frames_a_to_b) == (sum(map(len, a_frames)), len(a_frames))
            assert (stats.bytes_b_to_a, stats.frames_b_to_a) == (sum(map(len, b_frames)), len(b_frames))
            text = h.relay.metrics_text()
            total = sum(map(len, a_frames + b_frames))
            assert metric(text, "traversal_relay_forwarded_bytes_total") == total
            assert metric(text, "traversal_relay_forwarded_frames_total") == len(a_frames) + len(b_frames)
            assert f'traversal_relay_session_forwarded_bytes{{session="{sid.hex()[:8]}"}} {total}' in text

    run(main())


def test_release_drops_later_frames_and_foreign_sessions_are_dropped(tmp_path: Path) -> None:
    a_key, b_key, c_key = keys(3)

    async def main() -> None:
        async with relay_running(tmp_path, {NET: members(a_key, b_key, c_key)}) as h:
            a, b, ab = await h.pair(a_key, b_key)
            c = await h.login(c_key)
            ac = (await a.recv()).session_id  # type: ignore[union-attr]
            bc = (await b.recv()).session_id  # type: ignore[union-attr]
            await c.recv()
            await c.recv()

            await a.send(Release(ab))
            await b.send(Release(ab))  # the second RELEASE finds nothing: ignored, not an error
            await a.send(encode_session_frame(MsgType.DATA, ab, b"late"))  # released: dropped
            await c.send(encode_session_frame(MsgType.DATA, ab, b"not mine"))  # not C's session: dropped
            await c.send(encode_session_frame(MsgType.DATA, bytes(16), b"unknown"))  # unknown: dropped
            # Barrier: each client's frames are handled in order, so once these arrive the drops happened.
            barrier_a = encode_session_frame(MsgType.DATA, ac, b"barrier from a")
            await a.send(barrier_a)
            assert await c.recv_raw() == barrier_a
            barrier_c = encode_session_frame(MsgType.DATA, bc, b"barrier from c")
            await c.send(barrier_c)
            assert await b.recv_raw() == barrier_c  # B never saw the released session's frame

            assert h.relay.session_stats(ab) is None
            text = h.relay.metrics_text()
            assert metric(text, "traversal_relay_releases_total") == 1
            assert metric(text, "traversal_relay_dropped_frames_total") == 3
            assert metric(text, "traversal_relay_sessions_active") == 2
            assert metric(text, "traversal_relay_protocol_errors_total") == 0

    run(main())


async def wait_for_metric(h: Any, name: str, value: float, timeout: float = 5.0) -> None:
    """Poll the relay's own counters until ``name`` reaches ``value`` (bounded)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while metric(h.relay.metrics_text(), name) != value:
        assert asyncio.get_running_loop().time() < deadline, f"{name} never reached {value}"
        await asyncio.sleep(0.01)


def test_release_is_per_direction(tmp_path: Path) -> None:
    """An end that RELEASEs stops sending through the relay; the other direction keeps flowing until it releases."""
    a_key, b_key = keys(2)

    async def main() -> None:
        async with relay_running(tmp_path, {NET: members(a_key, b_key)}) as h:
            a, b, ab = await h.pair(a_key, b_key)
            await a.send(Release(ab))
            await a.send(encode_session_frame(MsgType.DATA, ab, b"after a released"))  # dropped
            from_b = encode_session_frame(MsgType.DATA, ab, b"b has not released")
            await b.send(from_b)
            assert await a.recv_raw() == from_b  # still forwarded: b's direction is open
            stats = h.relay.session_stats(ab)
            assert stats is not None and stats.bytes_a_to_b == 0
            assert metric(h.relay.metrics_text(), "traversal_relay_releases_total") == 0
            await b.send(Release(ab))
            await b.send(encode_session_frame(MsgType.DATA, ab, b"late"))  # dropped: forgotten
            barrier = encode_session_frame(MsgType.DATA, bytes(16), b"unknown")
            await b.send(barrier)
            await wait_for_metric(h, "traversal_relay_dropped_frames_total", 3)
            assert h.relay.session_stats(ab) is None
            assert metric(h.relay.metrics_text(), "traversal_relay_releases_total") == 1

    run(main())


def test_disconnect_sends_peer_left(tmp_path: Path) -> None:
    a_key, b_key = keys(2)

    async def main() -> None:
        async with relay_running(tmp_path, {NET: members(a_key, b_key)}) as h:
            a, b, sid = await h.pair(a_key, b_key)
            await b.ws.close()
            left = await a.recv()
            assert left == PeerLeft(sid, b.identity, "disconnected")
            assert h.relay.sessions() == []
            text = h.relay.metrics_text()
            assert metric(text, "traversal_relay_clients_connected") == 1
            assert metric(text, "traversal_relay_sessions_active") == 0

    run(main())


# --- refusals ------------------------------------------------------------------------------


def test_unknown_network(tmp_path: Path) -> None:
    (a_key,) = keys(1)

    async def main() -> None:
        async with relay_running(tmp_path, {NET: members(a_key)}) as h:
            ws = await h.open()
            await ws.send(encode(Hello("nope", public_bytes(a_key))))
            err = await expect_refused(ws, ErrorCode.UNKNOWN_NETWORK, 1008)
            assert err.reason == "network 'nope' is not served by this relay"
            assert 'traversal_relay_auth_failures_total{reason="unknown_network"} 1' in h.relay.metrics_text()

    run(main())


def test_non_member_is_told_what_to_ask_for(tmp_path: Path) -> None:
    a_key, stranger = keys(2)

    async def main() -> None:
        async with relay_running(tmp_path, {NET: members(a_key)}) as h:
            ws = await h.open()
            identity = public_bytes(stranger)
            await ws.send(encode(Hello(NET, identity)))
            challenge = decode(await ws.recv())
            assert isinstance(challenge, Challenge)
            await ws.send(encode(Auth(stranger.sign(relay_auth_message(NET, identity, challenge.nonce)))))
            err = await expect_refused(ws, ErrorCode.NOT_A_MEMBER, 1008)
            assert encode_public(identity) in err.reason and f"network '{NET}'" in err.reason
            assert 'traversal_relay_auth_failures_total{reason="not_a_member"} 1' in h.relay.metrics_text()

    run(main())


@pytest.mark.parametrize("forgery", ["other_key", "other_nonce", "other_network"])
def test_bad_signature(tmp_path: Path, forgery: str) -> None:
    a_key, mallory = keys(2)

    async def main() -> None:
        async with relay_running(tmp_path, {NET: members(a_key), OTHER_NET: members(a_key)}) as h:
            ws = await h.open()
            identity = public_bytes(a_key)
            await ws.send(encode(Hello(NET, identity)))
            challenge = decode(await ws.recv())
            assert isinstance(challenge, Challenge)
            if forgery == "other_key":
                sig = mallory.sign(relay_auth_message(NET, identity, challenge.nonce))
            elif forgery == "other_nonce":
                sig = a_key.sign(relay_auth_message(NET, identity, bytes(32)))
            else:
                sig = a_key.sign(relay_auth_message(OTHER_NET, identity, challenge.nonce))
            await ws.send(encode(Auth(sig)))
            await expect_refused(ws, ErrorCode.BAD_SIGNATURE, 1008)
            assert 'traversal_relay_auth_failures_total{reason="bad_signature"} 1' in h.relay.metrics_text()

    run(main())


def test_duplicate_login_with_live_connection_is_refused(tmp_path: Path) -> None:
    a_key, b_key = keys(2)

    async def main() -> None:
        async with relay_running(tmp_path, {NET: members(a_key, b_key)}) as h:
            a, b, sid = await h.pair(a_key, b_key)
            ws = await h.open()
            identity = public_bytes(a_key)
            await ws.send(encode(Hello(NET, identity)))
            challenge = decode(await ws.recv())
            assert isinstance(challenge, Challenge)
            await ws.send(encode(Auth(a_key.sign(relay_auth_message(NET, identity, challenge.nonce)))))
            await expect_refused(ws, ErrorCode.DUPLICATE_LOGIN, 1008)
            await expect_forwarding(a, b, sid)  # the original login is untouched
            assert 'traversal_relay_auth_failures_total{reason="duplicate_login"} 1' in h.relay.metrics_text()

    run(main())


def test_duplicate_login_replaces_a_dead_connection(tmp_path: Path) -> None:
    a_key, b_key = keys(2)

    async def main() -> None:
        async with relay_running(tmp_path, {NET: members(a_key, b_key)}, duplicate_ping_timeout=0.3) as h:
            old, b, old_sid = await h.pair(a_key, b_key)
            # A hung peer process: its socket stays open but nothing reads it, so no pong comes back.
            old.ws.transport.pause_reading()
            new = await h.login(a_key)
            assert await b.recv() == PeerLeft(old_sid, old.identity, "replaced by a new login")
            joined_b, joined_new = await b.recv(), await new.recv()
            assert isinstance(joined_b, PeerJoined) and isinstance(joined_new, PeerJoined)
            assert joined_b.session_id == joined_new.session_id != old_sid
            await expect_forwarding(new, b, joined_new.session_id)
            old.ws.transport.resume_reading()
            await asyncio.wait_for(old.ws.wait_closed(), STEP)

    run(main())


def test_auth_timeout(tmp_path: Path) -> None:
    (a_key,) = keys(1)

    async def main() -> None:
        async with relay_running(tmp_path, {NET: members(a_key)}, auth_timeout=0.3) as h:
            silent = await h.open()
            await expect_refused(silent, ErrorCode.AUTH_TIMEOUT, 1008)
            # The deadline covers the whole login, not just the first frame.
            half = await h.open()
            await half.send(encode(Hello(NET, public_bytes(a_key))))
            assert isinstance(decode(await half.recv()), Challenge)
            await expect_refused(half, ErrorCode.AUTH_TIMEOUT, 1008)
            assert 'traversal_relay_auth_failures_total{reason="auth_timeout"} 2' in h.relay.metrics_text()

    run(main())


_OVER_HANDSHAKE = MAX_HANDSHAKE_SIZE + 1


def _head(kind: MsgType) -> bytes:
    return bytes([frames.WIRE_VERSION, kind])


#: (case, log in first?, message, expected ERROR code, expected close code).
#: An ERROR code of None: websockets itself closes (1009) before the relay sees the message.
MISBEHAVIOUR = [
    ("oversize", True, _head(MsgType.DATA) + bytes(MAX_FRAME_SIZE), ErrorCode.FRAME_TOO_LARGE, 1009),
    ("oversize_before_auth", False, bytes(MAX_FRAME_SIZE + 1), ErrorCode.FRAME_TOO_LARGE, 1009),
    ("beyond_max_size", True, bytes(WEBSOCKET_MAX_SIZE + 1), None, 1009),
    ("empty", True, b"", ErrorCode.PROTOCOL, 1002),
    ("bad_version", True, b"\x09" + encode(Ready(bytes(16)))[1:], ErrorCode.PROTOCOL, 1002),
    ("unknown_type", True, bytes([frames.WIRE_VERSION, 0x7F]), ErrorCode.PROTOCOL, 1002),
    ("truncated_session_frame", True, _head(MsgType.DATA) + bytes(10), ErrorCode.PROTOCOL, 1002),
    ("length_mismatch", True, _head(MsgType.DATA) + bytes(16) + b"\x00\x05abc", ErrorCode.PROTOCOL, 1002),
    ("trailing_bytes", True, _head(MsgType.DATA) + bytes(16) + b"\x00\x01ab", ErrorCode.PROTOCOL, 1002),
    (
        "handshake_over_limit",
        True,
        _head(MsgType.HANDSHAKE)
        + bytes(16)
        + (MAX_HANDSHAKE_SIZE + 1).to_bytes(2, "big")
        + bytes(MAX_HANDSHAKE_SIZE + 1),
        ErrorCode.PROTOCOL,
        1002,
    ),
    ("truncated_ready", True, encode(Ready(bytes(16)))[:-1], ErrorCode.PROTOCOL, 1002),
    ("text", True, "hello relay", ErrorCode.PROTOCOL, 1002),
    ("text_before_auth", False, "hello relay", ErrorCode.PROTOCOL, 1002),
    ("data_before_auth", False, encode_session_frame(MsgType.DATA, bytes(16), b"x"), ErrorCode.PROTOCOL, 1002),
    ("auth_before_hello", False, encode(Auth(bytes(64))), ErrorCode.PROTOCOL, 1002),
    ("relay_only_challenge", True, encode(Challenge(bytes(32))), ErrorCode.PROTOCOL, 1002),
    (
        "relay_only_established",
        True,
        encode(Established(bytes(16), 1400, 5, 120, "127.0.0.1", 1, True)),
        ErrorCode.PROTOCOL,
        1002,
    ),
    ("relay_only_peer_joined", True, encode(PeerJoined(bytes(16), bytes(32))), ErrorCode.PROTOCOL, 1002),
    ("hello_after_auth", True, encode(Hello(OTHER_NET, bytes(32))), ErrorCode.PROTOCOL, 1002),
]


@pytest.mark.parametrize(
    ("log_in", "message", "code", "close_code"),
    [case[1:] for case in MISBEHAVIOUR],
    ids=[case[0] for case in MISBEHAVIOUR],
)
def test_misbehaving_client_is_closed_alone(
    tmp_path: Path, log_in: bool, message: bytes | str, code: ErrorCode | None, close_code: int
) -> None:
    a_key, b_key, bad_key = keys(3)

    async def main() -> None:
        networks = {NET: members(a_key, b_key), OTHER_NET: members(bad_key)}
        async with relay_running(tmp_path, networks) as h:
            a, b, sid = await h.pair(a_key, b_key)
            await a.send(Ready(sid))
            await b.send(Ready(sid))
            assert isinstance(await a.recv(), Established) and isinstance(await b.recv(), Established)

            bad_ws = (await h.login(bad_key, OTHER_NET)).ws if log_in else await h.open()
            await bad_ws.send(message)
            if code is None:
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(bad_ws.recv(), STEP)
                assert bad_ws.close_code == close_code
            else:
                await expect_refused(bad_ws, code, close_code)
            await expect_forwarding(a, b, sid)
            assert metric(h.relay.metrics_text(), "traversal_relay_protocol_errors_total") == 1
            assert metric(h.relay.metrics_text(), "traversal_relay_clients_connected") == 2

    run(main())


def test_protocol_error_in_the_same_network_sends_peer_left(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="traversal.relay")
    a_key, b_key = keys(2)

    async def main() -> None:
        async with relay_running(tmp_path, {NET: members(a_key, b_key)}) as h:
            a, b, sid = await h.pair(a_key, b_key)
            await b.send("not binary")
            await expect_refused(b.ws, ErrorCode.PROTOCOL, 1002)
            assert await a.recv() == PeerLeft(sid, b.identity, "protocol error")
            assert any(
                r.getMessage().startswith("event=protocol_error") and "text message" in r.getMessage()
                for r in caplog.records
            )

    run(main())


def test_client_error_frame_closes_quietly(tmp_path: Path) -> None:
    a_key, b_key = keys(2)

    async def main() -> None:
        async with relay_running(tmp_path, {NET: members(a_key, b_key)}) as h:
            a, b, sid = await h.pair(a_key, b_key)
            await b.send(Error(ErrorCode.PROTOCOL, "client giving up"))
            assert await a.recv() == PeerLeft(sid, b.identity, "disconnected")
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(b.ws.recv(), STEP)
            assert b.ws.close_code == 1000
            assert metric(h.relay.metrics_text(), "traversal_relay_protocol_errors_total") == 0

    run(main())


def test_random_garbage_never_breaks_the_relay(tmp_path: Path) -> None:
    a_key, b_key = keys(2)
    rng = random.Random(20240601)

    async def main() -> None:
        # Failed logins are limited per address (tested below); here every junk connection gets in.
        async with relay_running(tmp_path, {NET: members(a_key, b_key)}, auth_failure_limit=1000) as h:
            a, b, sid = await h.pair(a_key, b_key)
            for _ in range(25):
                junk = bytes([frames.WIRE_VERSION, rng.randrange(256)]) + rng.randbytes(rng.randrange(0, 80))
                ws = await h.open()
                await ws.send(junk)
                try:
                    frame = decode(await asyncio.wait_for(ws.recv(), STEP))
                except ConnectionClosed:
                    continue
                # A junk HELLO may parse; anything else must be refused.
                assert isinstance(frame, (Error, Challenge)), frame
                await ws.close()
            await expect_forwarding(a, b, sid)

    run(main())


# --- admission limits ------------------------------------------------------------------------


def test_too_many_new_connections_from_one_address_get_429_before_the_upgrade(tmp_path: Path) -> None:
    from websockets.exceptions import InvalidStatus

    (a_key,) = keys(1)

    async def main() -> None:
        async with relay_running(tmp_path, {NET: members(a_key)}, connection_rate=0.5, connection_burst=2) as h:
            first, second = await h.open(), await h.open()  # the burst
            with pytest.raises(InvalidStatus) as refused:
                await h.open()
            assert refused.value.response.status_code == 429
            text = h.relay.metrics_text()
            assert metric(text, 'traversal_relay_refused_total{reason="rate"}') == 1
            assert metric(text, "traversal_relay_connections_open") == 2  # the refused one never got a handler
            await first.close()
            await second.close()
            # The refusal is per address and the bucket refills: after 2 s one more may come.
            await asyncio.sleep(2.1)
            a = await h.login(a_key)
            await a.ws.close()

    run(main())


def test_a_full_relay_refuses_with_overloaded_and_admits_again_when_a_client_leaves(tmp_path: Path) -> None:
    a_key, b_key, c_key = keys(3)

    async def main() -> None:
        async with relay_running(tmp_path, {NET: members(a_key, b_key, c_key)}, max_clients=2) as h:
            a, b, _ = await h.pair(a_key, b_key)
            ws = await h.open()
            error = await expect_refused(ws, ErrorCode.OVERLOADED, 1013)
            assert "full" in error.reason, error
            text = h.relay.metrics_text()
            assert metric(text, 'traversal_relay_refused_total{reason="full"}') == 1
            assert metric(text, "traversal_relay_clients_connected") == 2
            await a.ws.close()
            await wait_until(lambda: metric(h.relay.metrics_text(), "traversal_relay_clients_connected") == 1)
            assert isinstance(await b.recv(), PeerLeft)
            c = await h.login(c_key)
            assert isinstance(await b.recv(), PeerJoined)  # b and the newcomer pair as usual
            await c.ws.close()
            await b.ws.close()

    run(main())


def test_logins_in_progress_are_bounded(tmp_path: Path) -> None:
    (a_key,) = keys(1)

    async def main() -> None:
        async with relay_running(tmp_path, {NET: members(a_key)}, max_pending_logins=3, auth_timeout=1.0) as h:
            silent = [await h.open() for _ in range(3)]  # connected, never say HELLO
            await wait_until(lambda: metric(h.relay.metrics_text(), "traversal_relay_logins_pending") == 3)
            late = await h.open()
            error = await expect_refused(late, ErrorCode.OVERLOADED, 1013)
            assert "in progress" in error.reason, error
            # The silent ones time out of their login; then members get in again.
            for ws in silent:
                await expect_refused(ws, ErrorCode.AUTH_TIMEOUT, 1008)
            a = await h.login(a_key)
            text = h.relay.metrics_text()
            assert metric(text, 'traversal_relay_refused_total{reason="pending"}') == 1
            assert metric(text, "traversal_relay_logins_pending") == 0
            await a.ws.close()

    run(main())


def test_abandoned_logins_are_counted_like_the_failures_they_are(tmp_path: Path) -> None:
    (member,) = keys(1)

    async def main() -> None:
        limits = {"auth_failure_limit": 2, "auth_failure_window": 60.0}
        async with relay_running(tmp_path, {NET: members(member)}, **limits) as h:
            silent = await h.open()  # connects, then hangs up without a word
            await silent.close()
            halfway = await h.open()  # hangs up after its CHALLENGE
            await halfway.send(encode(Hello(NET, public_bytes(member), True)))
            assert isinstance(decode(await asyncio.wait_for(halfway.recv(), STEP)), Challenge)
            await halfway.close()
            abandoned = 'traversal_relay_auth_failures_total{reason="abandoned"}'
            await wait_until(lambda: metric(h.relay.metrics_text(), abandoned) == 2)
            # They count against the address like any failed login, so /metrics must show them:
            # otherwise the refusal below would have no visible cause.
            ws = await h.open()
            error = await expect_refused(ws, ErrorCode.OVERLOADED, 1013)
            assert "2 failed logins from 127.0.0.1" in error.reason, error
            text = h.relay.metrics_text()
            assert metric(text, 'traversal_relay_refused_total{reason="failures"}') == 1
            assert metric(text, abandoned) == 2  # the refusal is not an abandoned login
            assert metric(text, "traversal_relay_protocol_errors_total") == 0
            assert metric(text, "traversal_relay_logins_pending") == 0

    run(main())


def test_an_address_with_too_many_failed_logins_waits_out_the_window(tmp_path: Path) -> None:
    member, stranger = keys(2)

    async def main() -> None:
        limits = {"auth_failure_limit": 3, "auth_failure_window": 1.0}
        async with relay_running(tmp_path, {NET: members(member)}, **limits) as h:
            for _ in range(3):
                ws = await h.open()
                await ws.send(encode(Hello(NET, public_bytes(stranger), True)))
                assert isinstance(decode(await asyncio.wait_for(ws.recv(), STEP)), Challenge)
                await ws.send(encode(Auth(bytes(64))))  # a signature that cannot verify
                await expect_refused(ws, ErrorCode.BAD_SIGNATURE, 1008)
            # Now even a member is turned away from this address, before any signature check...
            ws = await h.open()
            error = await expect_refused(ws, ErrorCode.OVERLOADED, 1013)
            assert "3 failed logins from 127.0.0.1" in error.reason, error
            assert metric(h.relay.metrics_text(), 'traversal_relay_refused_total{reason="failures"}') == 1
            # ...until the window has passed.
            await asyncio.sleep(1.1)
            a = await h.login(member)
            await a.ws.close()

    run(main())


# --- operator interface --------------------------------------------------------------------


def _https_get(port: int, ca: ssl.SSLContext, path: str) -> tuple[int, str, str]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ca, timeout=STEP)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read().decode()
    finally:
        conn.close()


def test_metrics_over_https(tmp_path: Path) -> None:
    a_key, b_key = keys(2)

    async def main() -> None:
        async with relay_running(tmp_path, {NET: members(a_key, b_key)}) as h:
            a, b, sid = await h.pair(a_key, b_key)
            wire = encode_session_frame(MsgType.DATA, sid, b"x" * 50)
            await a.send(wire)
            assert await b.recv_raw() == wire
            status, content_type, body = await asyncio.to_thread(_https_get, h.relay.port, h.ca, "/metrics")
            assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
            for name, kind in [
                ("traversal_relay_clients_connected", "gauge"),
                ("traversal_relay_connections_open", "gauge"),
                ("traversal_relay_sessions_active", "gauge"),
                ("traversal_relay_forwarded_bytes_total", "counter"),
                ("traversal_relay_forwarded_frames_total", "counter"),
                ("traversal_relay_session_forwarded_bytes", "gauge"),
                ("traversal_relay_auth_failures_total", "counter"),
                ("traversal_relay_protocol_errors_total", "counter"),
                ("traversal_relay_dropped_frames_total", "counter"),
                ("traversal_relay_releases_total", "counter"),
            ]:
                assert f"# TYPE {name} {kind}\n" in body and f"# HELP {name} " in body
            assert metric(body, "traversal_relay_clients_connected") == 2
            assert metric(body, "traversal_relay_forwarded_bytes_total") == len(wire)
            assert f'traversal_relay_session_forwarded_bytes{{session="{sid.hex()[:8]}"}} {len(wire)}' in body
            status, _, _ = await asyncio.to_thread(_https_get, h.relay.port, h.ca, "/")
            assert status == 404
            status, _, _ = await asyncio.to_thread(_https_get, h.relay.port, h.ca, "/metricsx")
            assert status == 404
            await expect_forwarding(a, b, sid)

    run(main())


def test_members_follow_auth_ok_and_every_change(tmp_path: Path) -> None:
    a_key, b_key, c_key = keys(3)

    async def main() -> None:
        async with relay_running(tmp_path, {NET: members(a_key, b_key)}) as h:
            a = await h.login(a_key)
            assert a.members == Members(2, tuple(sorted([a.identity, public_bytes(b_key)])))
            h.relay.set_networks({NET: members(a_key, b_key, c_key)})
            grown = await a.recv()
            assert isinstance(grown, Members) and set(grown.identities) == {
                public_bytes(k) for k in (a_key, b_key, c_key)
            }
            h.relay.set_networks({NET: members(a_key, b_key, c_key)})  # no change: nothing to tell
            h.relay.set_networks({NET: members(a_key)})
            assert await a.recv() == Members(1, (a.identity,))

    run(main())


def test_members_beyond_one_frame_are_counted_not_listed(tmp_path: Path) -> None:
    many = [Ed25519PrivateKey.generate() for _ in range(MAX_MEMBERS_LISTED + 1)]

    async def main() -> None:
        async with relay_running(tmp_path, {NET: members(*many)}) as h:
            a = await h.login(many[0])
            assert a.members == Members(MAX_MEMBERS_LISTED + 1, ())

    run(main())


def test_metrics_count_how_far_each_connection_got(tmp_path: Path) -> None:
    (a_key,) = keys(1)

    def stages(text: str) -> dict[str, float]:
        names = ("accepted", "tls", "http", "websocket")
        return {name: metric(text, f'traversal_relay_connections_total{{stage="{name}"}}') for name in names}

    async def main() -> None:
        async with relay_running(tmp_path, {NET: members(a_key)}) as h:
            assert stages(h.relay.metrics_text()) == {"accepted": 0, "tls": 0, "http": 0, "websocket": 0}
            # TCP, then garbage instead of a ClientHello: dropped during TLS.
            _, writer = await asyncio.open_connection("127.0.0.1", h.relay.port)
            writer.write(random.randbytes(64) + b"\r\n\r\n")
            await writer.drain()
            await wait_until(lambda: stages(h.relay.metrics_text())["accepted"] == 1)
            writer.close()
            # TLS, then garbage instead of an HTTP request: dropped after TLS, before a request.
            reader, writer = await asyncio.open_connection("127.0.0.1", h.relay.port, ssl=h.ca)
            writer.write(b"\x00\xff garbage \r\n\r\n")
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), STEP) == b""
            writer.close()
            # A plain HTTP request (/metrics) and a WebSocket login.
            status, _, _ = await asyncio.to_thread(_https_get, h.relay.port, h.ca, "/metrics")
            assert status == 200
            a = await h.login(a_key)
            assert stages(h.relay.metrics_text()) == {"accepted": 4, "tls": 3, "http": 1, "websocket": 1}
            await a.ws.close()

    run(main())


def test_set_networks_disconnects_removed_members(tmp_path: Path) -> None:
    a_key, b_key, c_key = keys(3)

    async def main() -> None:
        networks = {NET: members(a_key, b_key), OTHER_NET: members(c_key)}
        async with relay_running(tmp_path, networks) as h:
            a, b, sid = await h.pair(a_key, b_key)
            c = await h.login(c_key, OTHER_NET)
            h.relay.set_networks({NET: members(a_key)})
            err = await expect_refused(b.ws, ErrorCode.NOT_A_MEMBER, 1008)
            assert encode_public(b.identity) in err.reason
            # The member who stays hears that b left, and the network's new member list (in either order).
            told = {await a.recv(), await a.recv()}
            assert told == {PeerLeft(sid, b.identity, "removed from the network"), Members(1, (a.identity,))}
            await expect_refused(c.ws, ErrorCode.UNKNOWN_NETWORK, 1008)
            # The removed identity cannot come back; the remaining member stays.
            ws = await h.open()
            await ws.send(encode(Hello(NET, b.identity)))
            challenge = decode(await ws.recv())
            assert isinstance(challenge, Challenge)
            await ws.send(encode(Auth(b_key.sign(relay_auth_message(NET, b.identity, challenge.nonce)))))
            await expect_refused(ws, ErrorCode.NOT_A_MEMBER, 1008)
            assert metric(h.relay.metrics_text(), "traversal_relay_clients_connected") == 1

    run(main())


def test_close_tells_clients_and_uses_1001(tmp_path: Path) -> None:
    a_key, b_key = keys(2)

    async def main() -> None:
        cert, key, _ = ensure_self_signed(tmp_path, "127.0.0.1")
        relay = RelayServer(RelayConfig("127.0.0.1", 0, {NET: members(a_key, b_key)}, server_ssl_context(cert, key)))
        await relay.start()
        h = Harness(relay, client_ssl_context(cert), "127.0.0.1")
        a, b, _ = await h.pair(a_key, b_key)
        pending = await h.open()  # not logged in yet: told as well
        await relay.close()
        for ws in (a.ws, b.ws, pending):
            err = await expect_refused(ws, ErrorCode.SERVER_SHUTDOWN, 1001)
            assert err.reason == "relay shutting down"

    run(main())


def test_run_relay_serves_until_cancelled(tmp_path: Path) -> None:
    (a_key,) = keys(1)
    cert, key, _ = ensure_self_signed(tmp_path, "127.0.0.1")

    class PortFinder(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.found: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self.events = 0

        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith("event=relay_listening"):
                assert f" networks={NET},{OTHER_NET} max_open_files=" in message
                self.events += 1
            if message.startswith("relay listening on wss://127.0.0.1:") and not self.found.done():
                assert message.endswith(f"(networks: {NET}, {OTHER_NET})")
                self.found.set_result(int(message.split(":")[2].split(" ")[0]))

    async def main() -> None:
        finder = PortFinder()
        logger = logging.getLogger("traversal.relay")
        logger.addHandler(finder)
        level = logger.level
        logger.setLevel(logging.INFO)
        try:
            config = RelayConfig(
                "127.0.0.1", 0, {OTHER_NET: frozenset(), NET: members(a_key)}, server_ssl_context(cert, key)
            )
            task = asyncio.create_task(run_relay(config))
            port = await asyncio.wait_for(finder.found, STEP)
            assert finder.events == 1
            ws = await asyncio.wait_for(
                connect(f"wss://127.0.0.1:{port}/", ssl=client_ssl_context(cert), ping_interval=None), STEP
            )
            task.cancel()
            await expect_refused(ws, ErrorCode.SERVER_SHUTDOWN, 1001)
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, STEP)
        finally:
            logger.removeHandler(finder)
            logger.setLevel(level)

    run(main())


def test_config_validation() -> None:
    with pytest.raises(RelayConfigError):
        RelayConfig("127.0.0.1", 0, {NET: frozenset()}, None, mtu=100)
    with pytest.raises(RelayConfigError):
        RelayConfig("127.0.0.1", 0, {"x" * 65: frozenset()}, None)
    with pytest.raises(RelayConfigError):
        RelayConfig("127.0.0.1", 0, {NET: frozenset({b"short"})}, None)
    with pytest.raises(RelayConfigError):
        RelayConfig("127.0.0.1", 0, {NET: frozenset()}, None, heartbeat_interval=0)
    relay = RelayServer(RelayConfig("127.0.0.1", 0, {NET: frozenset()}, None))
    with pytest.raises(RelayConfigError):
        relay.set_networks({"": frozenset()})


# --- trust -----------------------------------------------------------------------------------

_FORBIDDEN_MODULES = ("transport.handshake", "transport.session")
_FORBIDDEN_NAMES = ("X25519", "x25519", "MLKEM", "mlkem", "ML_KEM")


def _imports(tree: ast.AST) -> list[str]:
    """Every imported module and imported name, dotted, e.g. 'transport.session' or 'x.y.Name'."""
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            found.append(module)
            found.extend(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("__import__", "import_module"):
            found.extend(str(arg.value) for arg in node.args if isinstance(arg, ast.Constant))
    return found


def test_relay_never_imports_session_keys_machinery() -> None:
    """DESIGN.md "Trust": the relay holds no session keys, so it must not even import the code that makes them."""
    package = Path(__file__).resolve().parents[2] / "relay_server"
    modules = sorted(package.rglob("*.py"))
    assert any(m.name == "server.py" for m in modules)
    for path in modules:
        for name in _imports(ast.parse(path.read_text(), filename=str(path))):
            for forbidden in _FORBIDDEN_MODULES:
                assert not (name == forbidden or name.startswith(forbidden + ".")), f"{path}: imports {name}"
            assert not any(token in name for token in _FORBIDDEN_NAMES), f"{path}: imports {name}"


def test_import_scanner_catches_forbidden_imports() -> None:
    source = (
        "from transport import session\n"
        "import transport.handshake as hs\n"
        "from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey\n"
        "from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey\n"
    )
    names = _imports(ast.parse(source))
    assert "transport.session" in names and "transport.handshake" in names
    assert any("x25519" in n for n in names) and any("MLKEM" in n for n in names)
