"""Throughput of the direct path's carriage (transport/wsquic.py) over real loopback UDP.

Two processes (one core each, as LIBRARY-NOTES.md measured aioquic): a server
that receives and counts, a client that pushes for ``--seconds`` per phase:

* DATAGRAM phases: sealed-size DATA frames (``encode_session_frame``) of 1200 and
  1400 bytes through ``send_datagram``, offered as fast as the bounded queue admits
  (the client waits for ACKs or timers when the queue is full, so this is QUIC's
  congestion-controlled rate, not a count of refusals);
* control phases: frames through ``send_control`` (WebSocket over the QUIC
  stream), kept under the pending-bytes bound.

The receiver's window runs from its first data frame to the client's END control
frame. Run: ``.venv/bin/python bench/wsquic_loopback.py [--seconds 5]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import time
from dataclasses import asdict, dataclass
from multiprocessing.queues import Queue

from transport.certs import make_session_certificate
from transport.constants import WSQUIC_MAX_PENDING_DATAGRAMS
from transport.frames import MsgType, encode_session_frame
from transport.wsquic import (
    Connected,
    ConnectionClosed,
    ControlFrameReceived,
    DatagramFrameReceived,
    WsQuicConnection,
    WsQuicEvent,
)

END = b"\x0a\x15END"  # a control frame the receiver recognises (not a valid BYE; never decoded)
SESSION_ID = bytes(16)
SESSION_FRAME_HEADER = 20  # version, type, session id, payload length


@dataclass
class PhaseResult:
    """One phase's numbers, as the receiver saw them (plus the sender's counters)."""

    mode: str
    frame_size: int
    frames: int = 0
    frame_bytes: int = 0
    seconds: float = 0.0
    udp_packets: int = 0
    sender_offered: int = 0
    sender_refused: int = 0
    sender_udp_packets: int = 0
    smoothed_rtt_ms: float | None = None

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0

    @property
    def mbit_per_second(self) -> float:
        return self.frame_bytes * 8 / self.seconds / 1e6 if self.seconds else 0.0


class Driver(asyncio.DatagramProtocol):
    """A minimal asyncio driver: one UDP socket, one timer, events to a callback."""

    def __init__(self, conn: WsQuicConnection, peer: tuple[str, int] | None = None) -> None:
        self.conn = conn
        self.peer = peer
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.DatagramTransport | None = None
        self.wakeup = asyncio.Event()
        self.on_event = lambda event: None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.peer is None:
            self.peer = addr
        self.conn.receive_datagram(data, self.loop.time())
        self.pump()

    def pump(self) -> None:
        conn = self.conn
        assert self.transport is not None
        sendto = self.transport.sendto
        for data in conn.datagrams_to_send(self.loop.time()):
            sendto(data, self.peer)
        while (event := conn.next_event()) is not None:
            self.on_event(event)
        deadline = conn.get_timer()
        if deadline != self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = None if deadline is None else self.loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline
        self.wakeup.set()

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        self.conn.handle_timer(self.loop.time())
        self.pump()

    async def wait(self) -> None:
        self.wakeup.clear()
        await self.wakeup.wait()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.transport is not None:
            self.transport.close()


async def _serve(mode: str, frame_size: int, to_parent: Queue, from_parent: Queue) -> None:
    loop = asyncio.get_running_loop()
    cert = make_session_certificate()
    conn = WsQuicConnection(is_client=False, certificate=cert, now=loop.time())
    _, driver = await loop.create_datagram_endpoint(lambda: Driver(conn), local_addr=("127.0.0.1", 0))
    assert driver.transport is not None
    to_parent.put((driver.transport.get_extra_info("sockname"), cert.fingerprint))
    result = PhaseResult(mode, frame_size)
    first: float | None = None
    done = asyncio.Event()

    def on_event(event: WsQuicEvent) -> None:
        nonlocal first
        if isinstance(event, (DatagramFrameReceived, ControlFrameReceived)):
            if event.frame == END:
                result.seconds = time.perf_counter() - (first or time.perf_counter())
                done.set()
                return
            if first is None:
                first = time.perf_counter()
            result.frames += 1
            result.frame_bytes += len(event.frame)
        elif isinstance(event, ConnectionClosed):
            done.set()

    driver.on_event = on_event
    await asyncio.wait_for(done.wait(), timeout=120)
    result.udp_packets = conn.stats.udp_received
    # Keep the loop running (ACKs for END) while the parent relays the sender's counters.
    sender = await loop.run_in_executor(None, lambda: from_parent.get(timeout=60))
    result.sender_offered, result.sender_refused, result.sender_udp_packets, rtt = sender
    result.smoothed_rtt_ms = None if rtt is None else rtt * 1e3
    conn.close("bench over")
    driver.pump()
    driver.stop()
    to_parent.put(asdict(result))


async def _push(mode: str, frame_size: int, seconds: float, server: tuple[str, int], fingerprint: bytes) -> tuple:
    loop = asyncio.get_running_loop()
    conn = WsQuicConnection(is_client=True, expected_fingerprint=fingerprint, now=loop.time())
    _, driver = await loop.create_datagram_endpoint(lambda: Driver(conn, peer=server), local_addr=("127.0.0.1", 0))
    connected = asyncio.Event()
    driver.on_event = lambda event: connected.set() if isinstance(event, Connected) else None
    conn.connect(loop.time())
    driver.pump()
    await asyncio.wait_for(connected.wait(), timeout=5)

    frame = encode_session_frame(MsgType.DATA, SESSION_ID, bytes(frame_size - SESSION_FRAME_HEADER))
    assert len(frame) == frame_size
    offered = 0
    end = loop.time() + seconds
    if mode == "datagram":
        bound = WSQUIC_MAX_PENDING_DATAGRAMS
        while loop.time() < end:
            while conn.pending_datagrams < bound:
                conn.send_datagram(frame)
                offered += 1
            driver.pump()
            await driver.wait()
    else:
        limit = 256 * 1024 - frame_size - 64
        while loop.time() < end:
            while conn.pending_control_bytes < limit:
                conn.send_control(frame)
                offered += 1
            driver.pump()
            await driver.wait()
    conn.send_control(END)
    driver.pump()
    while conn.pending_control_bytes and not conn.closed:
        await asyncio.wait_for(driver.wait(), timeout=10)
    stats = conn.stats
    driver.stop()
    return offered, stats.dropped_queue_full, stats.udp_sent, stats.smoothed_rtt


def _server_process(mode: str, frame_size: int, to_parent: Queue, from_parent: Queue) -> None:
    asyncio.run(_serve(mode, frame_size, to_parent, from_parent))


def _client_process(
    mode: str, frame_size: int, seconds: float, server: tuple[str, int], fingerprint: bytes, to_parent: Queue
) -> None:
    to_parent.put(asyncio.run(_push(mode, frame_size, seconds, server, fingerprint)))


def run_phase(mode: str, frame_size: int, seconds: float) -> PhaseResult:
    ctx = multiprocessing.get_context("spawn")
    from_server: Queue = ctx.Queue()
    to_server: Queue = ctx.Queue()
    from_client: Queue = ctx.Queue()
    server = ctx.Process(target=_server_process, args=(mode, frame_size, from_server, to_server))
    server.start()
    addr, fingerprint = from_server.get(timeout=30)
    client = ctx.Process(target=_client_process, args=(mode, frame_size, seconds, addr, fingerprint, from_client))
    client.start()
    to_server.put(from_client.get(timeout=seconds + 60))
    raw = from_server.get(timeout=60)
    client.join(10)
    server.join(10)
    return PhaseResult(**raw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="push time per phase")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    args = parser.parse_args()
    phases = [("datagram", 1200), ("datagram", 1400), ("control", 1400), ("control", 10_240)]
    if not args.json:
        head = ("mode", "frame", "frames/s", "Mbit/s", "MB/s", "UDP pkts", "refused", "rtt ms")
        print("{:9} {:>6} {:>10} {:>8} {:>6} {:>9} {:>8} {:>7}".format(*head))
    for mode, size in phases:
        r = run_phase(mode, size, args.seconds)
        if args.json:
            print(
                json.dumps(asdict(r) | {"frames_per_second": r.frames_per_second, "mbit_per_second": r.mbit_per_second})
            )
            continue
        lost = r.sender_offered - r.frames if mode == "datagram" else 0
        rtt = f"{r.smoothed_rtt_ms:.2f}" if r.smoothed_rtt_ms is not None else "-"
        print(
            f"{mode:9} {size:>6} {r.frames_per_second:>10.0f} {r.mbit_per_second:>8.1f} "
            f"{r.mbit_per_second / 8:>6.2f} {r.udp_packets:>9} {r.sender_refused:>8} {rtt:>7}"
            + (f"   (offered {r.sender_offered}, not received {lost})" if mode == "datagram" else "")
        )


if __name__ == "__main__":
    main()
