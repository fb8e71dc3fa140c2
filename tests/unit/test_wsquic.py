"""Tests of the direct path's carriage (transport/wsquic.py).

Two connections run back to back on an in-memory wire with an explicit clock
(the :class:`Wire` below: one-way delay, optional deterministic loss), and once
over real UDP sockets on 127.0.0.1 with a tiny asyncio driver.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import random
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from websockets.frames import Frame, Opcode

from transport import wsquic
from transport.certs import CertificateError, SessionCertificate, certificate_fingerprint, make_session_certificate
from transport.constants import MAX_FRAME_SIZE, WSQUIC_MAX_DATAGRAM_SIZE
from transport.frames import MsgType, encode_session_frame
from transport.wsquic import (
    DATAGRAM_OVERHEAD,
    ERROR_BAD_CERTIFICATE,
    Connected,
    ConnectionClosed,
    ControlBacklogFullError,
    ControlFrameReceived,
    DatagramFrameReceived,
    WsQuicClosedError,
    WsQuicConnection,
    WsQuicError,
    WsQuicEvent,
)

CERT = make_session_certificate()  # one per module: key generation is the slow part


class Wire:
    """Two connections and the UDP path between them, timed by an explicit clock.

    Every datagram takes ``delay`` seconds one way; with ``drop_every=n`` the
    n-th, 2n-th, ... datagram put on the wire (either direction) is lost.
    """

    def __init__(
        self,
        client: WsQuicConnection,
        server: WsQuicConnection,
        *,
        now: float = 0.0,
        delay: float = 0.005,
        drop_every: int = 0,
    ) -> None:
        self.client = client
        self.server = server
        self.now = now
        self.delay = delay
        self.drop_every = drop_every
        self.sent = 0
        self.dropped = 0
        self.carried: dict[int, list[bytes]] = {id(client): [], id(server): []}  # by sender
        self.events: dict[int, list[WsQuicEvent]] = {id(client): [], id(server): []}
        self._in_flight: list[tuple[float, int, WsQuicConnection, bytes]] = []
        self._seq = 0
        self.blackhole = False

    def peer(self, conn: WsQuicConnection) -> WsQuicConnection:
        return self.server if conn is self.client else self.client

    def events_of(self, conn: WsQuicConnection, kind: type | None = None) -> list[WsQuicEvent]:
        events = self.events[id(conn)]
        return events if kind is None else [e for e in events if isinstance(e, kind)]

    def flush(self) -> None:
        for conn in (self.client, self.server):
            for data in conn.datagrams_to_send(self.now):
                assert len(data) <= WSQUIC_MAX_DATAGRAM_SIZE
                self.sent += 1
                self.carried[id(conn)].append(data)
                if self.blackhole or (self.drop_every and self.sent % self.drop_every == 0):
                    self.dropped += 1
                    continue
                self._seq += 1
                heapq.heappush(self._in_flight, (self.now + self.delay, self._seq, self.peer(conn), data))
            while (event := conn.next_event()) is not None:
                self.events[id(conn)].append(event)

    def inject(self, dst: WsQuicConnection, data: bytes) -> None:
        """Deliver ``data`` to ``dst`` now, as if it came off the path."""
        dst.receive_datagram(data, self.now)
        self.flush()

    def step(self) -> bool:
        """Advance to the next delivery or timer and run it; False when nothing is pending."""
        deadlines = [t for t in (self.client.get_timer(), self.server.get_timer()) if t is not None]
        if self._in_flight:
            deadlines.append(self._in_flight[0][0])
        if not deadlines:
            return False
        self.now = max(self.now, min(deadlines))
        while self._in_flight and self._in_flight[0][0] <= self.now:
            _, _, dst, data = heapq.heappop(self._in_flight)
            dst.receive_datagram(data, self.now)
        for conn in (self.client, self.server):
            timer = conn.get_timer()
            if timer is not None and timer <= self.now:
                conn.handle_timer(self.now)
        self.flush()
        return True

    def run_until(self, done: Callable[[], bool], *, within: float = 30.0) -> None:
        self.flush()
        deadline = self.now + within
        for _ in range(200_000):
            if done():
                return
            if self.now > deadline or not self.step():
                break
        raise AssertionError(f"condition not met by t={self.now:.3f}")

    def run_for(self, seconds: float) -> None:
        """Run everything due within ``seconds`` from now."""
        self.flush()
        end = self.now + seconds
        for _ in range(200_000):
            deadlines = [t for t in (self.client.get_timer(), self.server.get_timer()) if t is not None]
            if self._in_flight:
                deadlines.append(self._in_flight[0][0])
            if not deadlines or min(deadlines) > end:
                self.now = end
                return
            self.step()
        raise AssertionError("wire did not settle")


def make_pair(
    *, fingerprint: bytes | None = None, now: float = 0.0, **kwargs: float | int
) -> tuple[WsQuicConnection, WsQuicConnection]:
    client = WsQuicConnection(
        is_client=True,
        expected_fingerprint=CERT.fingerprint if fingerprint is None else fingerprint,
        now=now,
        **kwargs,  # type: ignore[arg-type]
    )
    server = WsQuicConnection(is_client=False, certificate=CERT, now=now, **kwargs)  # type: ignore[arg-type]
    return client, server


def connected_wire(*, drop_every: int = 0, **kwargs: float | int) -> Wire:
    client, server = make_pair(**kwargs)
    wire = Wire(client, server, drop_every=drop_every)
    client.connect(wire.now)
    wire.run_until(lambda: client.connected and server.connected)
    return wire


def control_frames(wire: Wire, conn: WsQuicConnection) -> list[bytes]:
    return [e.frame for e in wire.events_of(conn, ControlFrameReceived)]  # type: ignore[attr-defined]


def datagram_frames(wire: Wire, conn: WsQuicConnection) -> list[bytes]:
    return [e.frame for e in wire.events_of(conn, DatagramFrameReceived)]  # type: ignore[attr-defined]


def closed_event(wire: Wire, conn: WsQuicConnection) -> ConnectionClosed:
    closes = wire.events_of(conn, ConnectionClosed)
    assert len(closes) == 1, closes
    event = closes[0]
    assert isinstance(event, ConnectionClosed)
    return event


# --- certificates -----------------------------------------------------------------


def test_session_certificate_fingerprint_is_sha256_of_der() -> None:
    cert = x509.load_pem_x509_certificate(CERT.cert_pem)
    assert CERT.fingerprint == hashlib.sha256(cert.public_bytes(Encoding.DER)).digest()
    assert certificate_fingerprint(cert) == CERT.fingerprint
    assert make_session_certificate().fingerprint != CERT.fingerprint  # fresh key per session
    assert b"PRIVATE" not in repr(CERT).encode()


def test_session_certificate_load_checks_its_fingerprint() -> None:
    forged = SessionCertificate(CERT.cert_pem, CERT.key_pem, bytes(32))
    with pytest.raises(CertificateError):
        forged.load()


# --- handshake and pinning ----------------------------------------------------------


def test_handshake_connects_both_sides_with_the_pinned_fingerprint() -> None:
    wire = connected_wire()
    client_connected = wire.events_of(wire.client, Connected)
    server_connected = wire.events_of(wire.server, Connected)
    assert client_connected == [Connected(peer_fingerprint=CERT.fingerprint, certificate_fingerprint=CERT.fingerprint)]
    assert server_connected == [Connected(peer_fingerprint=None, certificate_fingerprint=CERT.fingerprint)]
    assert wire.now < 0.1  # one round trip plus a half, at 5 ms each way


def test_wrong_fingerprint_fails_closed_on_both_sides() -> None:
    other = make_session_certificate()
    client, server = make_pair(fingerprint=other.fingerprint)
    wire = Wire(client, server)
    client.send_control(b"\x0a\x13must never arrive")  # queued before connect: waits for Connected
    client.connect(wire.now)
    wire.run_until(lambda: client.closed and server.closed)
    wire.run_for(5.0)

    event = closed_event(wire, client)
    assert event.error and not event.by_peer
    assert "pinned fingerprint" in event.reason
    peer_event = closed_event(wire, server)
    assert peer_event.error and peer_event.by_peer
    # The client closed before its TLS Finished left: the server never completed its handshake.
    assert not wire.events_of(client, Connected) and not wire.events_of(server, Connected)
    assert not control_frames(wire, server) and not datagram_frames(wire, server)
    assert not client.send_datagram(b"x") and client.stats.dropped_closed == 1
    with pytest.raises(WsQuicClosedError):
        client.send_control(b"x")


def test_pin_failure_closes_with_bad_certificate_code(monkeypatch: pytest.MonkeyPatch) -> None:
    codes: list[int] = []
    real_close = wsquic.QuicConnection.close

    def spy(
        self: wsquic.QuicConnection, error_code: int = 0, frame_type: int | None = None, reason_phrase: str = ""
    ) -> None:
        codes.append(error_code)
        real_close(self, error_code, frame_type, reason_phrase)

    monkeypatch.setattr(wsquic.QuicConnection, "close", spy)
    client, server = make_pair(fingerprint=bytes(32))
    wire = Wire(client, server)
    client.connect(wire.now)
    wire.run_until(lambda: server.closed)
    assert codes[0] == ERROR_BAD_CERTIFICATE


def test_unreadable_server_certificate_fails_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    # If a future aioquic stops exposing the peer certificate, the pin must fail, not pass.
    monkeypatch.setattr(wsquic, "_peer_certificate_der", lambda quic: None)
    client, server = make_pair()
    wire = Wire(client, server)
    client.connect(wire.now)
    wire.run_until(lambda: client.closed and server.closed)
    assert closed_event(wire, client).error
    assert not wire.events_of(client, Connected) and not wire.events_of(server, Connected)


def test_constructor_refuses_misuse() -> None:
    with pytest.raises(WsQuicError):
        WsQuicConnection(is_client=True, now=0.0)  # no pin
    with pytest.raises(WsQuicError):
        WsQuicConnection(is_client=True, expected_fingerprint=b"short", now=0.0)
    with pytest.raises(WsQuicError):
        WsQuicConnection(is_client=True, certificate=CERT, expected_fingerprint=CERT.fingerprint, now=0.0)
    with pytest.raises(WsQuicError):
        WsQuicConnection(is_client=False, now=0.0)  # no certificate
    with pytest.raises(WsQuicError):
        WsQuicConnection(is_client=True, expected_fingerprint=CERT.fingerprint, now=0.0, max_datagram_size=1000)
    server = WsQuicConnection(is_client=False, certificate=CERT, now=0.0)
    with pytest.raises(WsQuicError):
        server.connect(0.0)
    client = WsQuicConnection(is_client=True, expected_fingerprint=CERT.fingerprint, now=0.0)
    client.connect(0.0)
    with pytest.raises(WsQuicError):
        client.connect(0.0)


# --- control stream ------------------------------------------------------------------


def test_control_frames_of_all_sizes_arrive_complete_and_in_order() -> None:
    wire = connected_wire()
    rng = random.Random(7)
    sizes = [1, 2, 125, 126, 127, 1000, 1400, 1423, 4096, 65535 % MAX_FRAME_SIZE, MAX_FRAME_SIZE - 1, MAX_FRAME_SIZE]
    up = [rng.randbytes(n) for n in sizes]
    down = [rng.randbytes(n) for n in reversed(sizes)]
    up.append(encode_session_frame(MsgType.HEARTBEAT, bytes(16), b"sealed heartbeat"))
    for frame in up:
        wire.client.send_control(frame)
    for frame in down:
        wire.server.send_control(frame)
    wire.run_until(
        lambda: (
            len(control_frames(wire, wire.server)) == len(up) and len(control_frames(wire, wire.client)) == len(down)
        )
    )
    assert control_frames(wire, wire.server) == up
    assert control_frames(wire, wire.client) == down
    assert wire.client.stats.control_sent == len(up) and wire.server.stats.control_received == len(up)
    wire.run_for(1.0)
    assert wire.client.pending_control_bytes == 0  # all acknowledged


def test_control_frames_queued_before_connect_leave_after_connected() -> None:
    client, server = make_pair()
    wire = Wire(client, server)
    client.send_control(b"early one")
    client.send_control(b"early two")
    client.connect(wire.now)
    wire.run_until(lambda: len(control_frames(wire, server)) == 2)
    # Connected comes first, then the frames, in order.
    assert [type(e) for e in wire.events_of(server)] == [Connected, ControlFrameReceived, ControlFrameReceived]
    assert control_frames(wire, server) == [b"early one", b"early two"]


def test_server_may_send_control_as_soon_as_it_is_connected() -> None:
    client, server = make_pair()
    wire = Wire(client, server)
    client.connect(wire.now)
    wire.run_until(lambda: server.connected)
    server.send_control(b"from the server first")  # client may not have opened stream 0 yet
    wire.run_until(lambda: bool(control_frames(wire, client)))
    assert control_frames(wire, client) == [b"from the server first"]
    assert not control_frames(wire, server)  # the stream-opening pong is no frame


def test_control_frame_size_is_checked() -> None:
    wire = connected_wire()
    with pytest.raises(WsQuicError):
        wire.client.send_control(b"")
    with pytest.raises(WsQuicError):
        wire.client.send_control(bytes(MAX_FRAME_SIZE + 1))


def test_pending_control_bytes_are_bounded() -> None:
    wire = connected_wire(max_pending_control_bytes=3 * MAX_FRAME_SIZE)
    wire.blackhole = True  # nothing is acknowledged any more
    for _ in range(2):
        wire.client.send_control(bytes(MAX_FRAME_SIZE))
    wire.run_for(0.2)
    with pytest.raises(ControlBacklogFullError):
        wire.client.send_control(bytes(MAX_FRAME_SIZE))
    assert wire.client.pending_control_bytes <= 3 * MAX_FRAME_SIZE
    wire.client.send_control(b"small frames still fit")


# --- datagrams ----------------------------------------------------------------------------


def test_datagram_frames_arrive() -> None:
    wire = connected_wire()
    payload = wire.client.max_datagram_payload
    assert payload == WSQUIC_MAX_DATAGRAM_SIZE - DATAGRAM_OVERHEAD == 1422
    up = [bytes([i]) * n for i, n in enumerate([1, 100, 1200, 1400, payload])]
    down = [encode_session_frame(MsgType.DATA, bytes(16), bytes(100))]
    assert all(wire.client.send_datagram(f) for f in up)
    assert all(wire.server.send_datagram(f) for f in down)
    wire.run_until(
        lambda: len(datagram_frames(wire, wire.server)) == len(up) and bool(datagram_frames(wire, wire.client))
    )
    assert datagram_frames(wire, wire.server) == up
    assert datagram_frames(wire, wire.client) == down
    stats = wire.client.stats
    assert stats.datagrams_sent == len(up) and stats.datagram_bytes_sent == sum(map(len, up))
    assert wire.server.stats.datagrams_received == len(up)


def test_oversize_datagram_is_refused_and_does_not_block_later_ones() -> None:
    wire = connected_wire()
    limit = wire.client.max_datagram_payload
    assert not wire.client.send_datagram(bytes(limit + 1))
    assert wire.client.stats.dropped_oversize == 1
    assert wire.client.send_datagram(b"after the oversize one")
    wire.run_until(lambda: bool(datagram_frames(wire, wire.server)))
    assert datagram_frames(wire, wire.server) == [b"after the oversize one"]


def test_max_datagram_payload_is_exactly_what_fits() -> None:
    # The limit is not merely safe but tight: one byte more, handed to aioquic
    # directly, sticks at the head of its queue and blocks everything behind it
    # (aioquic issue 294), which is why send_datagram refuses it.
    wire = connected_wire()
    quic = wire.client._quic
    assert quic is not None
    quic.send_datagram_frame(bytes(wire.client.max_datagram_payload + 1))
    quic.send_datagram_frame(b"stuck behind it")
    wire.run_for(2.0)
    assert not datagram_frames(wire, wire.server)
    assert wire.client.pending_datagrams == 2


def test_pending_datagram_queue_is_bounded() -> None:
    wire = connected_wire(max_pending_datagrams=8)
    accepted = [wire.client.send_datagram(bytes([i]) * 1000) for i in range(10)]  # nothing flushed in between
    assert accepted == [True] * 8 + [False] * 2
    assert wire.client.stats.dropped_queue_full == 2
    assert wire.client.pending_datagrams == 8
    wire.run_until(lambda: len(datagram_frames(wire, wire.server)) == 8)
    assert wire.client.pending_datagrams == 0
    assert wire.client.send_datagram(b"room again")


def test_datagrams_before_connected_are_refused() -> None:
    client, _server = make_pair()
    assert not client.send_datagram(b"too early")
    assert client.stats.dropped_not_connected == 1


def test_datagram_queue_drains_under_congestion_control() -> None:
    # Many more frames than one congestion window: sent as room frees up, none lost.
    wire = connected_wire()
    frames = [i.to_bytes(4, "big") * 350 for i in range(400)]
    sent = 0
    while sent < len(frames):
        while sent < len(frames) and wire.client.send_datagram(frames[sent]):
            sent += 1
        wire.step()
    wire.run_until(lambda: len(datagram_frames(wire, wire.server)) == len(frames))
    assert datagram_frames(wire, wire.server) == frames
    assert wire.client.stats.dropped_queue_full > 0  # backpressure was exercised


# --- loss ---------------------------------------------------------------------------------


def test_lossy_wire_keeps_control_frames_complete_and_in_order() -> None:
    wire = connected_wire(drop_every=3)  # the handshake itself runs over the lossy wire
    rng = random.Random(3)
    control = [rng.randbytes(rng.choice([20, 300, 1400, 3000, MAX_FRAME_SIZE])) for _ in range(60)]
    datagrams = [i.to_bytes(2, "big") + rng.randbytes(rng.randrange(10, 1400)) for i in range(200)]
    sent_datagrams: list[bytes] = []
    for i, frame in enumerate(control):
        wire.client.send_control(frame)
        wire.server.send_control(frame[::-1])
        for datagram in datagrams[i * 3 : i * 3 + 3]:
            if wire.client.send_datagram(datagram):
                sent_datagrams.append(datagram)
        wire.run_for(0.01)
    wire.run_until(
        lambda: (
            len(control_frames(wire, wire.server)) == len(control)
            and len(control_frames(wire, wire.client)) == len(control)
        ),
        within=120.0,
    )
    assert control_frames(wire, wire.server) == control
    assert control_frames(wire, wire.client) == [f[::-1] for f in control]
    assert wire.dropped > 10

    received = datagram_frames(wire, wire.server)
    assert len(set(received)) == len(received)  # never duplicated
    assert set(received) <= set(sent_datagrams)  # never corrupted
    assert 0 < len(received) < len(sent_datagrams)  # some lost, none retransmitted
    assert not wire.events_of(wire.client, ConnectionClosed) and not wire.events_of(wire.server, ConnectionClosed)


# --- hostile input ------------------------------------------------------------------------


def test_garbage_datagrams_do_not_raise() -> None:
    rng = random.Random(11)
    client, server = make_pair()
    wire = Wire(client, server)
    garbage = [b"", b"\x00", rng.randbytes(40), rng.randbytes(1300), b"\xc0" + rng.randbytes(1299), b"\x40" * 1500]
    for data in garbage:
        wire.inject(server, data)
        wire.inject(client, data)  # before connect()
    client.connect(wire.now)
    wire.run_until(lambda: client.connected and server.connected)
    real = wire.carried[id(client)][-1]
    mutants = [real[:n] for n in (1, 5, 20, len(real) - 1)]
    mutants += [bytes(b ^ (1 << (i % 8)) if i == j else b for i, b in enumerate(real)) for j in (0, 1, 9, 30, 60)]
    for data in garbage + mutants:
        wire.inject(server, data)
        wire.inject(client, data)
    assert client.connected and server.connected
    client.send_control(b"still fine")
    wire.run_until(lambda: control_frames(wire, server) == [b"still fine"])


def test_injected_initial_does_not_capture_the_server() -> None:
    # An off-path packet that looks like an Initial, arriving first, must not fix
    # the server's original destination connection id.
    client, server = make_pair()
    wire = Wire(client, server)
    fake_initial = bytes([0xC0]) + (1).to_bytes(4, "big") + b"\x08" + bytes(8) + b"\x08" + bytes(8) + bytes(1300)
    wire.inject(server, fake_initial)
    assert not server.closed
    client.connect(wire.now)
    wire.run_until(lambda: client.connected and server.connected)


def test_unmasked_websocket_frame_closes_with_error() -> None:
    wire = connected_wire()
    quic = wire.client._quic
    assert quic is not None
    quic.send_stream_data(0, b"\x82\x05hello")  # a client frame must be masked (RFC 6455 5.1)
    wire.run_until(lambda: wire.client.closed and wire.server.closed)
    assert closed_event(wire, wire.server).error
    client_event = closed_event(wire, wire.client)
    assert client_event.error and client_event.by_peer
    assert "malformed control stream" in client_event.reason
    assert not control_frames(wire, wire.server)


def test_websocket_message_over_max_frame_size_closes_with_error() -> None:
    wire = connected_wire()
    quic = wire.server._quic
    assert quic is not None
    quic.send_stream_data(0, Frame(Opcode.BINARY, bytes(MAX_FRAME_SIZE + 1)).serialize(mask=False))
    wire.run_until(lambda: wire.client.closed)
    assert closed_event(wire, wire.client).error and not control_frames(wire, wire.client)


def test_fragmented_message_is_assembled_and_bounded() -> None:
    wire = connected_wire()
    quic = wire.client._quic
    assert quic is not None
    parts = [Frame(Opcode.BINARY, b"abc", fin=False), Frame(Opcode.CONT, b"def", fin=False), Frame(Opcode.CONT, b"g")]
    quic.send_stream_data(0, b"".join(p.serialize(mask=True) for p in parts))
    wire.run_until(lambda: bool(control_frames(wire, wire.server)))
    assert control_frames(wire, wire.server) == [b"abcdefg"]
    half = MAX_FRAME_SIZE // 2 + 1
    parts = [Frame(Opcode.BINARY, bytes(half), fin=False), Frame(Opcode.CONT, bytes(half))]
    quic.send_stream_data(0, b"".join(p.serialize(mask=True) for p in parts))
    wire.run_until(lambda: wire.server.closed)
    assert closed_event(wire, wire.server).error


def test_text_message_and_foreign_stream_close_with_error() -> None:
    wire = connected_wire()
    quic = wire.client._quic
    assert quic is not None
    quic.send_stream_data(0, Frame(Opcode.TEXT, b"hi").serialize(mask=True))
    wire.run_until(lambda: wire.server.closed)
    assert "text message" in closed_event(wire, wire.server).reason

    wire = connected_wire()
    quic = wire.client._quic
    assert quic is not None
    quic.send_stream_data(4, b"second stream")
    wire.run_until(lambda: wire.server.closed)
    assert "stream 4" in closed_event(wire, wire.server).reason


def test_websocket_ping_is_answered_and_not_delivered() -> None:
    wire = connected_wire()
    quic = wire.client._quic
    assert quic is not None
    quic.send_stream_data(0, Frame(Opcode.PING, b"p").serialize(mask=True))
    wire.client.send_control(b"after the ping")
    wire.run_until(lambda: bool(control_frames(wire, wire.server)))
    wire.run_for(0.5)
    assert control_frames(wire, wire.server) == [b"after the ping"]
    assert wire.client.connected and wire.server.connected


# --- close and timeouts -----------------------------------------------------------------------


def test_close_reaches_the_peer_with_its_reason() -> None:
    wire = connected_wire()
    wire.client.send_control(b"BYE frame queued just before close")
    wire.client.close("session over")
    wire.flush()
    assert closed_event(wire, wire.client) == ConnectionClosed("session over", error=False, by_peer=False)
    wire.run_until(lambda: wire.server.closed)
    assert control_frames(wire, wire.server) == [b"BYE frame queued just before close"]
    assert closed_event(wire, wire.server) == ConnectionClosed("session over", error=False, by_peer=True)
    wire.run_until(lambda: wire.client.terminated and wire.server.terminated)
    assert wire.client.get_timer() is None and wire.server.get_timer() is None
    assert not wire.client.send_datagram(b"late")
    wire.client.close("twice")  # idempotent
    assert len(wire.events_of(wire.client, ConnectionClosed)) == 1


def test_close_before_or_during_the_handshake() -> None:
    client, server = make_pair()
    client.close("changed my mind")  # never connected: nothing to send, nothing to time
    assert client.terminated and client.get_timer() is None and client.datagrams_to_send(0.0) == []
    assert client.next_event() == ConnectionClosed("changed my mind", error=False, by_peer=False)

    client, server = make_pair()
    wire = Wire(client, server)
    client.connect(wire.now)
    wire.flush()
    wire.step()  # the server has the Initial, the client has nothing yet
    client.close("ICE pair went away")
    wire.run_until(lambda: server.closed)
    wire.run_for(2.0)
    assert not wire.events_of(server, Connected) and not wire.events_of(client, Connected)
    assert closed_event(wire, server).by_peer
    assert client.terminated and server.terminated


def test_server_close_reaches_the_client() -> None:
    wire = connected_wire()
    wire.server.close("relay asked us to go back")
    wire.run_until(lambda: wire.client.closed)
    assert closed_event(wire, wire.client) == ConnectionClosed("relay asked us to go back", error=False, by_peer=True)


def test_idle_timeout_closes_both_sides() -> None:
    wire = connected_wire(idle_timeout=5.0)
    start = wire.now
    wire.run_until(lambda: wire.client.closed and wire.server.closed, within=60.0)
    assert 5.0 <= wire.now - start < 6.0
    for conn in (wire.client, wire.server):
        assert closed_event(wire, conn) == ConnectionClosed("idle timeout", error=True, by_peer=False)


def test_traffic_keeps_the_connection_alive_past_the_idle_timeout() -> None:
    wire = connected_wire(idle_timeout=5.0)
    for _ in range(10):
        wire.client.send_control(b"heartbeat")
        wire.run_for(2.0)
    assert wire.client.connected and wire.server.connected


def test_handshake_timeout_closes_a_connection_that_hears_nothing() -> None:
    client, server = make_pair(handshake_timeout=4.0)
    wire = Wire(client, server)
    wire.blackhole = True
    client.connect(wire.now)
    wire.run_until(lambda: client.closed and server.closed)
    assert wire.now == pytest.approx(4.0)
    assert closed_event(wire, client).error and closed_event(wire, server).error
    assert "timed out" in closed_event(wire, server).reason
    wire.run_until(lambda: client.terminated and server.terminated)


def test_rtt_estimate_comes_from_quic_recovery() -> None:
    wire = connected_wire()
    for _ in range(5):
        wire.client.send_control(b"ping-ish")
        wire.run_for(0.1)
    stats = wire.client.stats
    assert stats.smoothed_rtt is not None and stats.min_rtt is not None
    assert 0.009 <= stats.min_rtt <= 0.04  # 5 ms each way, plus ACK delay
    assert stats.udp_sent > 0 and stats.udp_received > 0


# --- real UDP on 127.0.0.1 ------------------------------------------------------------------------


class _UdpDriver(asyncio.DatagramProtocol):
    """The smallest driver: socket in, datagrams out, one timer, events to a queue."""

    def __init__(self, conn: WsQuicConnection, peer: tuple[str, int] | None = None) -> None:
        self.conn = conn
        self.peer = peer
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[WsQuicEvent] = asyncio.Queue()
        self.backlog: list[WsQuicEvent] = []
        self.transport: asyncio.DatagramTransport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.peer is None:
            self.peer = addr  # the ICE layer would know this; here the first datagram tells
        self.conn.receive_datagram(data, self.loop.time())
        self.pump()

    def pump(self) -> None:
        assert self.transport is not None
        for data in self.conn.datagrams_to_send(self.loop.time()):
            self.transport.sendto(data, self.peer)
        while (event := self.conn.next_event()) is not None:
            self.events.put_nowait(event)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.conn.get_timer()
        if deadline is not None:
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.conn.handle_timer(self.loop.time())
        self.pump()

    async def next_of(self, kind: type) -> WsQuicEvent:
        """The next event of ``kind``; events of other kinds stay queued, in order."""
        while True:
            for i, event in enumerate(self.backlog):
                if isinstance(event, kind):
                    del self.backlog[i]
                    return event
            self.backlog.append(await asyncio.wait_for(self.events.get(), timeout=5.0))

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        assert self.transport is not None
        self.transport.close()


def test_over_real_udp_sockets_on_loopback() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        client_conn, server_conn = make_pair(now=now)
        _, server = await loop.create_datagram_endpoint(lambda: _UdpDriver(server_conn), local_addr=("127.0.0.1", 0))
        server_addr = server.transport.get_extra_info("sockname")  # type: ignore[union-attr]
        _, client = await loop.create_datagram_endpoint(
            lambda: _UdpDriver(client_conn, peer=server_addr), local_addr=("127.0.0.1", 0)
        )
        try:
            client_conn.connect(loop.time())
            client.pump()
            assert await client.next_of(Connected) == Connected(CERT.fingerprint, CERT.fingerprint)
            await server.next_of(Connected)

            frames = [bytes([i]) * (100 * i + 1) for i in range(1, 40)]
            for frame in frames:
                client_conn.send_control(frame)
            assert client_conn.send_datagram(b"datagram over loopback")
            client.pump()
            got = [await server.next_of(ControlFrameReceived) for _ in frames]
            assert [e.frame for e in got] == frames  # type: ignore[attr-defined]
            datagram = await server.next_of(DatagramFrameReceived)
            assert datagram == DatagramFrameReceived(b"datagram over loopback")

            server_conn.send_control(b"reply")
            server.pump()
            assert await client.next_of(ControlFrameReceived) == ControlFrameReceived(b"reply")

            client_conn.close("done")
            client.pump()
            assert await server.next_of(ConnectionClosed) == ConnectionClosed("done", error=False, by_peer=True)
        finally:
            client.stop()
            server.stop()

    asyncio.run(scenario())
