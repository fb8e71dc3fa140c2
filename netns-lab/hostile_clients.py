"""Hostile clients against a live relay (issue 7, "Strangers"), every attack bounded in count and time.

Two halves, one file, so the benchmark (bench/hostile_clients.py) and the lab test
(tests/lab/test_hostile_clients.py) run the very same attacks:

* The attacker: ``python netns-lab/hostile_clients.py ATTACK --config FILE ...``, run by
  :class:`AttackLab` inside a lab's WAN namespace (never the root namespace), from source
  addresses it adds to the WAN bridge (/32s of 203.0.113.0/24) or, for the SYN burst, from
  spoofed TEST-NET-2 addresses (198.51.100.0/24) routed into a dead end inside the WAN
  namespace. It refuses to run in the root namespace or at a non-lab address. Each attack opens at most
  ``--count`` connections for at most ``--duration`` seconds, records what the relay did to
  each (frames received, close code, how long until it closed the connection) and prints one
  JSON line. The attacker does not verify the relay's certificate: a stranger would not.
* The orchestrator's side: :class:`AttackLab` (keys and members files for the networks the
  attacks need, attacker addresses, attacker processes) and :class:`ProcessSampler` (the
  relay's RSS and open files from /proc while an attack runs).

The attacks: ``syn`` (SYN, then nothing), ``tcp-idle`` / ``tls-idle`` / ``ws-idle`` (half-open:
connected, then silent before the ClientHello, the HTTP upgrade or the HELLO), ``slow``
(slowloris: a ClientHello, an HTTP upgrade or a HELLO frame a byte at a time), ``oversize``
(messages above the frame limit and the WebSocket limit, before and after a login),
``preauth`` (every frame type before HELLO, the wrong frame between HELLO and AUTH, relay-only
frames and unknown sessions after a login), ``garbage`` (random bytes as TCP, inside TLS, as
WebSocket messages before and after a login), ``authflood`` (logins with bad signatures for a
member's identity, by non-members, for unknown networks) and ``flood`` (many TLS + WebSocket
connects at once, each silent for ``--hold`` seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ipaddress
import json
import os
import random
import re
import resource
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import Protocol, Side, State

from relay_server.server import WEBSOCKET_MAX_SIZE
from transport import frames
from transport.constants import MAX_FRAME_SIZE, WIRE_VERSION
from transport.identity import decode_public, encode_public, public_bytes

HERE = Path(__file__).resolve()

#: Attacker source addresses are 203.0.113.N/32 on the WAN bridge, N in this range (the relay
#: is .1 and .2, the NATs .11 and .12, public hosts .21 and .22).
ATTACKER_FIRST = 100
ATTACKER_LAST = 254
#: Every address an attacker connects to or from is in the lab's WAN (checked before any attack),
#: and it runs only in a lab namespace (named by `ip netns`, which keeps them here).
LAB_WAN = "203.0.113.0/24"
NETNS_DIR = "/run/netns"
#: Where the legitimate login probe comes from: an address no attack uses.
PROBE_ADDRESS = "203.0.113.99"
#: Spoofed sources of the SYN burst: TEST-NET-2, routed in the WAN namespace onto a veth pair
#: that ends in the WAN namespace itself, with no address behind it (:meth:`AttackLab.prepare_syn`),
#: so the relay's kernel keeps each half-open connection (it drops a SYN it has no route to
#: answer) and nothing ever answers its SYN-ACK (there is no neighbour to deliver it to).
SYN_SOURCES = "198.51.100."
SYN_SINK = ("hc-syn0", "hc-syn1")
#: Networks the attacks log in to: each insider key is the only member of its own network
#: (``insider-00``, ``insider-01``, ...), so an insider's login pairs with nobody, least of all
#: the real peers; the probe has a network of its own.
INSIDER_NETWORK = "insider-{:02d}"
PROBE_NETWORK = "probe"
#: Keys generated for insiders (logins that then misbehave), and how many of them each attacker
#: process gets: a block of its own, so attackers running at once never log in as the same key
#: (that would be a duplicate login, which is not the attack).
INSIDER_KEYS = 48
INSIDER_BLOCK = 8
#: Per-read and per-connect bound inside an attack (each attack also has its own deadline).
STEP_S = 15.0
#: Niceness of the attacker processes: the relay and the members get the CPU first, so what the
#: members see is the relay's doing, not the attacker's appetite on this shared machine.
ATTACKER_NICE = 10

ATTACKS = ("syn", "tcp-idle", "tls-idle", "ws-idle", "slow", "oversize", "preauth", "garbage", "authflood", "flood")


# --- the attacker: building blocks ---------------------------------------------------------


def insecure_tls() -> ssl.SSLContext:
    """A TLS client context that checks nothing (an attacker does not care who the relay is)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def client_hello() -> bytes:
    """The bytes of a real TLS ClientHello (what a slowloris dribbles)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = insecure_tls().wrap_bio(incoming, outgoing, server_side=False)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def upgrade_request(host: str, port: int) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def ws_frame(opcode: Opcode, data: bytes, *, fin: bool = True) -> bytes:
    """One masked client frame."""
    return Frame(opcode, data, fin=fin).serialize(mask=True)


def ws_declared_frame(declared: int, sent: bytes) -> bytes:
    """A binary frame header claiming ``declared`` payload bytes, followed by only ``sent``."""
    return bytes([0x82, 0x80 | 127]) + struct.pack("!Q", declared) + os.urandom(4) + sent


def frame_name(data: bytes | str) -> str:
    """What a relay message was, for counting: "CHALLENGE", "ERROR:PROTOCOL", "text", "?"."""
    if isinstance(data, str):
        return "text"
    try:
        frame = frames.decode(data)
    except frames.FrameError:
        return "?"
    if isinstance(frame, frames.Error):
        try:
            return f"ERROR:{frames.ErrorCode(frame.code).name}"
        except ValueError:
            return f"ERROR:{frame.code}"
    return frames.peek_type(data).name


@dataclass
class Target:
    """Where the relay is and which source addresses the attacker may use."""

    host: str
    port: int
    sources: list[str]

    def source(self, index: int) -> str:
        return self.sources[index % len(self.sources)]


class Conn:
    """One hostile connection: TCP, then optionally TLS, an HTTP upgrade and WebSocket frames.

    It records how far it got (``stage``), the relay frames it received, the close code the
    relay sent, and when the relay closed the connection (its WebSocket close frame, or EOF
    or a reset), in seconds since the TCP connect.
    """

    def __init__(self, target: Target, source: str) -> None:
        self.target = target
        self.source = source
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.ws: Protocol | None = None
        self.stage = "new"
        self.opened_at = 0.0
        self.received: list[str] = []
        self.messages: list[bytes | str] = []
        self.pongs: set[bytes] = set()
        self.close_code: int | None = None
        self.closed_after: float | None = None
        self.error: str | None = None

    # -- opening ----------------------------------------------------------------------

    async def connect(self, *, tls: bool, timeout: float = STEP_S) -> bool:
        """TCP (and TLS, if asked) from our source address; False (with ``error`` set) if refused."""
        self.stage = "connecting"
        try:
            async with asyncio.timeout(timeout):
                self.reader, self.writer = await asyncio.open_connection(
                    self.target.host,
                    self.target.port,
                    local_addr=(self.source, 0),
                    ssl=insecure_tls() if tls else None,
                    ssl_handshake_timeout=timeout if tls else None,
                    limit=1 << 20,
                )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            self.stage = "connect_failed"
            self.error = _describe(exc)
            return False
        self.opened_at = time.monotonic()
        self.stage = "tls" if tls else "tcp"
        return True

    async def upgrade(self, timeout: float = STEP_S) -> bool:
        """The WebSocket opening handshake, by hand (so a slowloris can dribble it instead)."""
        if not await self.send_raw(upgrade_request(self.target.host, self.target.port)):
            return False
        return await self.read_upgrade_response(timeout)

    async def read_upgrade_response(self, timeout: float = STEP_S) -> bool:
        assert self.reader is not None
        try:
            async with asyncio.timeout(timeout):
                head = await self.reader.readuntil(b"\r\n\r\n")
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError) as exc:
            self._closed_by_relay(exc)
            return False
        status = head.split(b" ", 2)[1].decode(errors="replace") if head.count(b" ") >= 2 else "?"
        if status != "101":
            self.stage = f"http_{status}"
            return False
        self.ws = Protocol(Side.CLIENT, state=State.OPEN, max_size=None)
        self.stage = "websocket"
        return True

    # -- sending ----------------------------------------------------------------------

    async def send_raw(self, data: bytes) -> bool:
        """Write ``data``; False if the relay already closed the connection."""
        if self.writer is None or self.closed_after is not None:
            return False
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (OSError, RuntimeError) as exc:
            self._closed_by_relay(exc)
            return False
        return True

    async def send_message(self, data: bytes | str) -> bool:
        """One WebSocket message (binary for bytes, text for str)."""
        assert self.ws is not None
        if isinstance(data, str):
            self.ws.send_text(data.encode())
        else:
            self.ws.send_binary(data)
        return await self._flush()

    async def dribble(self, data: bytes, interval: float, deadline: float) -> int:
        """Send ``data`` one byte every ``interval`` seconds while the relay listens; bytes sent."""
        sent = 0
        for byte in data:
            if time.monotonic() >= deadline or not await self.send_raw(bytes([byte])):
                break
            sent += 1
            with contextlib.suppress(TimeoutError):
                await self.wait_closed(min(deadline, time.monotonic() + interval))
            if self.closed_after is not None:
                break
        return sent

    async def _flush(self) -> bool:
        assert self.ws is not None
        out = b"".join(self.ws.data_to_send())
        return await self.send_raw(out) if out else True

    # -- receiving --------------------------------------------------------------------

    async def _read_some(self, deadline: float) -> bool:
        """Read what the relay sent (until ``deadline``); False once it closed the connection."""
        assert self.reader is not None
        try:
            async with asyncio.timeout_at(_loop_time(deadline)):
                chunk = await self.reader.read(65536)
        except TimeoutError:
            raise
        except (OSError, ssl.SSLError) as exc:
            self._closed_by_relay(exc)
            return False
        if not chunk:
            self._closed_by_relay(None)
            return False
        if self.ws is not None:
            self.ws.receive_data(chunk)
            for event in self.ws.events_received():
                self._event(event)
            await self._flush()  # pongs and the close handshake, as a client would
            if self.close_code is not None:
                # The relay's close frame is its closing of the connection: the TCP close follows
                # once the closing handshake is over (or its close timeout, for a client that never
                # finishes a frame), which is websockets' business, not the relay's decision.
                self._closed_by_relay(None)
                return False
        return True

    def _event(self, event: Frame) -> None:
        if event.opcode in (Opcode.BINARY, Opcode.TEXT):
            raw = bytes(event.data)
            data: bytes | str = raw if event.opcode == Opcode.BINARY else raw.decode(errors="replace")
            self.received.append(frame_name(data))
            self.messages.append(data)
        elif event.opcode == Opcode.PONG:
            self.pongs.add(bytes(event.data))
        elif event.opcode == Opcode.CLOSE:
            self.close_code = Close.parse(event.data).code if event.data else 1005

    async def next_message(self, deadline: float) -> bytes | str | None:
        """The next relay message, None if the relay closed first or ``deadline`` passed."""
        while not self.messages:
            if self.closed_after is not None:
                return None
            try:
                await self._read_some(deadline)  # may queue a message and see the close in one read
            except TimeoutError:
                return None
        return self.messages.pop(0)

    async def wait_closed(self, deadline: float) -> None:
        """Read until the relay closes the connection; raises TimeoutError at ``deadline``."""
        while self.closed_after is None:
            await self._read_some(deadline)

    def _closed_by_relay(self, exc: BaseException | None) -> None:
        if self.closed_after is None:
            self.closed_after = time.monotonic() - self.opened_at if self.opened_at else 0.0
            if exc is not None and self.error is None:
                self.error = _describe(exc)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()

    # -- a login ----------------------------------------------------------------------

    async def login(self, network: str, identity: bytes, sign: Callable[[bytes], bytes], deadline: float) -> str:
        """HELLO, CHALLENGE, AUTH; returns the relay's answer ("AUTH_OK", "ERROR:BAD_SIGNATURE", "closed")."""
        if not await self.send_message(frames.encode(frames.Hello(network, identity))):
            return "closed"
        reply = await self.next_message(deadline)
        if reply is None:
            return "closed"
        if frame_name(reply) != "CHALLENGE":
            return frame_name(reply)
        challenge = frames.decode(reply)  # type: ignore[arg-type]
        assert isinstance(challenge, frames.Challenge)
        signature = sign(frames.relay_auth_message(network, identity, challenge.nonce))
        if not await self.send_message(frames.encode(frames.Auth(signature))):
            return "closed"
        reply = await self.next_message(deadline)
        if reply is None:
            return "closed"
        if frame_name(reply) == "AUTH_OK":
            self.stage = "logged_in"
        return frame_name(reply)

    async def alive(self, deadline: float) -> bool:
        """Does the relay still answer a WebSocket ping on this connection?"""
        assert self.ws is not None
        payload = os.urandom(4)
        self.ws.send_ping(payload)
        if not await self._flush():
            return False
        while payload not in self.pongs:
            try:
                if not await self._read_some(deadline):
                    return False
            except TimeoutError:
                return False
        return True


def _loop_time(deadline: float) -> float:
    """A ``time.monotonic()`` deadline on the event loop's clock."""
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:100]


@dataclass
class Keys:
    """What the orchestrator gave the attacker (``--config``): keys of the insider and probe networks,
    and one real member's public identity (claimed, without its key, by the bad-signature flood)."""

    insiders: list[Ed25519PrivateKey]
    probe: Ed25519PrivateKey
    member_network: str
    member_identity: bytes

    @classmethod
    def load(cls, path: Path) -> Keys:
        data = json.loads(path.read_text())
        return cls(
            insiders=[Ed25519PrivateKey.from_private_bytes(bytes.fromhex(s)) for s in data["insider_seeds"]],
            probe=Ed25519PrivateKey.from_private_bytes(bytes.fromhex(data["probe_seed"])),
            member_network=data["member_network"],
            member_identity=decode_public(data["member_identity"]),
        )


@dataclass
class Plan:
    """One attack's bounds."""

    target: Target
    keys: Keys
    count: int
    concurrency: int
    duration: float
    interval: float = 1.0
    hold: float = 0.0
    junk_frames: int = 30
    insider_slots: range = range(INSIDER_BLOCK)
    variants: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    @property
    def deadline(self) -> float:
        return self.started + self.duration


async def _run_all(plan: Plan, jobs: Sequence[Callable[[], Awaitable[None]]]) -> None:
    """Run ``jobs`` at most ``plan.concurrency`` at a time, all cut off at the plan's deadline."""
    semaphore = asyncio.Semaphore(plan.concurrency)

    async def bounded(job: Callable[[], Awaitable[None]]) -> None:
        async with semaphore:
            if time.monotonic() < plan.deadline:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(_loop_time(plan.deadline)):
                        await job()

    await asyncio.gather(*(bounded(job) for job in jobs))


class InsiderPool:
    """Hands out insider keys one connection at a time: a key logged in twice at once would be a
    duplicate login, which is not the attack."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.free: asyncio.Queue[int] = asyncio.Queue()
        for slot in plan.insider_slots:
            self.free.put_nowait(slot)

    @contextlib.asynccontextmanager
    async def login(self, source: str) -> AsyncIterator[Conn]:
        """A connection logged in as a free insider; ``stage`` is "insider_failed" if that did not work.
        The key is free again once the relay closed the connection (or we aborted it)."""
        slot = await self.free.get()
        key = self.plan.keys.insiders[slot]
        conn = Conn(self.plan.target, source)
        try:
            if await conn.connect(tls=True) and await conn.upgrade():
                network = INSIDER_NETWORK.format(slot)
                answer = await conn.login(network, public_bytes(key), key.sign, time.monotonic() + STEP_S)
                if answer != "AUTH_OK":
                    conn.stage, conn.error = "insider_failed", f"login answered {answer}"
            else:
                conn.stage = "insider_failed"
            yield conn
        finally:
            conn.abort()
            # Let the relay's handler see the end before the key logs in again.
            await asyncio.sleep(0.05)
            self.free.put_nowait(slot)


# --- the attacks ----------------------------------------------------------------------------


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def syn_packet(src: str, sport: int, dst: str, dport: int) -> bytes:
    """An IPv4 TCP SYN (the kernel fills in the IP checksum and id under IP_HDRINCL)."""
    tcp = struct.pack("!HHIIBBHHH", sport, dport, random.getrandbits(32), 0, 5 << 4, 0x02, 64240, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(tcp),
        0,
        0,
        64,
        socket.IPPROTO_TCP,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    return ip + tcp


def _syn_recv(port: int) -> int:
    """Connections in SYN-RECV towards local ``port`` in this namespace (/proc/net/tcp state 03)."""
    count = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            parts = line.split()
            if parts[3] == "03" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


async def attack_syn(plan: Plan) -> dict[str, Any]:
    """``count`` SYNs at ``count / duration`` per second from spoofed addresses, then nothing."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sent, peak = 0, 0
    gap = plan.duration / max(plan.count, 1) / 2  # send in the first half, watch the queue in the second
    try:
        for i in range(plan.count):
            src = f"{SYN_SOURCES}{1 + i % 254}"
            raw.sendto(
                syn_packet(src, 1024 + random.randrange(60000), plan.target.host, plan.target.port),
                (plan.target.host, 0),
            )
            sent += 1
            if i % 50 == 49:
                peak = max(peak, _syn_recv(plan.target.port))
                await asyncio.sleep(gap * 50)
        while time.monotonic() < plan.deadline:
            peak = max(peak, _syn_recv(plan.target.port))
            await asyncio.sleep(0.2)
    finally:
        raw.close()
    return {"syn_sent": sent, "syn_recv_peak": peak, "syn_recv_end": _syn_recv(plan.target.port)}


async def _hold_open(plan: Plan, conns: list[Conn]) -> None:
    async def one(conn: Conn) -> None:
        with contextlib.suppress(TimeoutError):
            await conn.wait_closed(plan.deadline)

    await asyncio.gather(*(one(c) for c in conns))


async def attack_idle(plan: Plan, stage: str) -> list[Conn]:
    """Half-open: connect up to ``stage`` ("tcp", "tls" or "ws") and then say nothing."""
    conns: list[Conn] = []

    async def open_one(i: int) -> None:
        conn = Conn(plan.target, plan.target.source(i))
        conns.append(conn)
        if await conn.connect(tls=stage != "tcp") and stage == "ws":
            await conn.upgrade()

    await _run_all(plan, [lambda i=i: open_one(i) for i in range(plan.count)])
    await _hold_open(plan, [c for c in conns if c.stage in ("tcp", "tls", "websocket")])
    return conns


async def attack_slow(plan: Plan) -> list[Conn]:
    """Slowloris: ``count`` connections per variant, each sending one byte per ``interval`` s of a
    ClientHello ("clienthello"), an HTTP upgrade ("http") or a HELLO frame ("hello")."""
    conns: list[Conn] = []
    hello = ws_frame(Opcode.BINARY, frames.encode(frames.Hello(plan.keys.member_network, plan.keys.member_identity)))

    async def one(i: int, variant: str) -> None:
        conn = Conn(plan.target, plan.target.source(i))
        conns.append(conn)
        if variant == "clienthello":
            if await conn.connect(tls=False):
                conn.stage = "slow_clienthello"
                await conn.dribble(client_hello(), plan.interval, plan.deadline)
        elif variant == "http":
            if await conn.connect(tls=True):
                conn.stage = "slow_http"
                await conn.dribble(upgrade_request(plan.target.host, plan.target.port), plan.interval, plan.deadline)
        elif await conn.connect(tls=True) and await conn.upgrade():
            conn.stage = "slow_hello"
            await conn.dribble(hello, plan.interval, plan.deadline)
        with contextlib.suppress(TimeoutError):
            await conn.wait_closed(plan.deadline)

    variants = plan.variants or ["clienthello", "http", "hello"]
    jobs = [lambda i=i, v=v: one(i, v) for v in variants for i in range(plan.count)]
    await _run_all(plan, jobs)
    return conns


#: Oversized messages: (name, how to send it).
def _oversize_payloads(first: bytes) -> dict[str, list[bytes]]:
    """The raw WebSocket bytes of each oversized variant; ``first`` is the frame header to start with."""
    just_over_frame = first + os.urandom(MAX_FRAME_SIZE + 1 - len(first))
    just_over_ws = first + os.urandom(WEBSOCKET_MAX_SIZE + 1 - len(first))
    chunk = 8 * 1024
    pieces = (WEBSOCKET_MAX_SIZE // chunk) + 1
    fragments = [ws_frame(Opcode.BINARY, first + os.urandom(chunk - len(first)), fin=False)]
    fragments += [ws_frame(Opcode.CONT, os.urandom(chunk), fin=False) for _ in range(pieces - 1)]
    fragments.append(ws_frame(Opcode.CONT, os.urandom(16), fin=True))
    return {
        "over_frame_limit": [ws_frame(Opcode.BINARY, just_over_frame)],
        "over_websocket_limit": [ws_frame(Opcode.BINARY, just_over_ws)],
        "declared_2^62": [ws_declared_frame(1 << 62, first + os.urandom(1024))],
        "fragments_over_limit": fragments,
    }


async def attack_oversize(plan: Plan) -> list[Conn]:
    """Each oversized variant ``count`` times before a login ("pre") and after one ("post", insiders)."""
    conns: list[Conn] = []
    insiders = InsiderPool(plan)

    async def send(conn: Conn, first: bytes, variant: str) -> None:
        for piece in _oversize_payloads(first)[variant]:
            if not await conn.send_raw(piece):
                break
        with contextlib.suppress(TimeoutError):
            await conn.wait_closed(min(plan.deadline, time.monotonic() + STEP_S))

    async def one(i: int, when: str, variant: str) -> None:
        if when == "pre":
            conn = Conn(plan.target, plan.target.source(i))
            conns.append(conn)
            if await conn.connect(tls=True) and await conn.upgrade():
                conn.stage = f"pre:{variant}"
                await send(conn, bytes([WIRE_VERSION, frames.MsgType.HELLO]), variant)
            return
        async with insiders.login(plan.target.source(i)) as conn:
            conns.append(conn)
            if conn.stage != "insider_failed":
                conn.stage = f"post:{variant}"
                head = bytes([WIRE_VERSION, frames.MsgType.DATA]) + os.urandom(frames.SESSION_ID_SIZE)
                await send(conn, head, variant)

    variants = plan.variants or list(_oversize_payloads(b"\0\0"))
    jobs = [lambda i=i, w=w, v=v: one(i, w, v) for i in range(plan.count) for w in ("pre", "post") for v in variants]
    await _run_all(plan, jobs)
    return conns


def _preauth_messages(keys: Keys) -> dict[str, bytes | str]:
    """Every frame type a client could send instead of HELLO, validly encoded, and some junk."""
    sid = os.urandom(frames.SESSION_ID_SIZE)
    ident = keys.member_identity
    out: dict[str, bytes | str] = {
        "CHALLENGE": frames.encode(frames.Challenge(os.urandom(frames.NONCE_SIZE))),
        "AUTH": frames.encode(frames.Auth(os.urandom(frames.SIGNATURE_SIZE))),
        "AUTH_OK": frames.encode(frames.AuthOk("203.0.113.5", 4242)),
        "PEER_JOINED": frames.encode(frames.PeerJoined(sid, ident)),
        "PEER_LEFT": frames.encode(frames.PeerLeft(sid, ident, "bye")),
        "READY": frames.encode(frames.Ready(sid)),
        "ESTABLISHED": frames.encode(frames.Established(sid, 1400, 10, 3600, "203.0.113.5", 4242, True)),
        "RELEASE": frames.encode(frames.Release(sid)),
        "ERROR": frames.encode(frames.Error(frames.ErrorCode.PROTOCOL, "hostile")),
        "unknown_type": bytes([WIRE_VERSION, 0x7E]) + os.urandom(20),
        "wrong_version": bytes([WIRE_VERSION ^ 0xFF, frames.MsgType.HELLO]) + os.urandom(40),
        "empty": b"",
        "one_byte": bytes([WIRE_VERSION]),
        "text": "HELLO",
        "truncated_hello": frames.encode(frames.Hello(keys.member_network, ident))[:-10],
    }
    for kind in sorted(frames.FORWARDED_TYPES):
        payload = os.urandom(64)
        out[kind.name] = frames.encode_session_frame(kind, sid, payload)
    # Any type added since: its header and some bytes (the relay must refuse it by its type alone).
    for kind in frames.MsgType:
        if kind != frames.MsgType.HELLO and kind.name not in out:
            out[kind.name] = bytes([WIRE_VERSION, kind]) + os.urandom(40)
    return out


#: After a login: frames the relay must shrug off (dropped or ignored, the connection stays).
HARMLESS_AFTER_LOGIN = ("DATA_unknown_session", "READY_unknown_session", "RELEASE_unknown_session")
#: After a login: frames that must cost the sender its connection.
FATAL_AFTER_LOGIN = ("PEER_JOINED", "CHALLENGE", "HELLO", "AUTH")


async def attack_preauth(plan: Plan) -> list[Conn]:
    """``count`` rounds of: each message of :func:`_preauth_messages` as the first message of its own
    connection; HELLO then something other than AUTH; and per insider, after its login, frames for
    sessions it does not have (``--junk-frames`` of them, must be dropped, the connection kept) followed by
    a frame only the relay may send (must cost it the connection)."""
    conns: list[Conn] = []
    insiders = InsiderPool(plan)

    async def first_message(i: int, name: str, message: bytes | str) -> None:
        conn = Conn(plan.target, plan.target.source(i))
        conns.append(conn)
        if await conn.connect(tls=True) and await conn.upgrade():
            conn.stage = f"pre:{name}"
            await conn.send_message(message)
            with contextlib.suppress(TimeoutError):
                await conn.wait_closed(min(plan.deadline, time.monotonic() + STEP_S))

    async def between(i: int) -> None:
        conn = Conn(plan.target, plan.target.source(i))
        conns.append(conn)
        if await conn.connect(tls=True) and await conn.upgrade():
            conn.stage = "between:DATA"
            hello = frames.Hello(INSIDER_NETWORK.format(0), public_bytes(plan.keys.insiders[0]))
            await conn.send_message(frames.encode(hello))
            await conn.send_message(frames.encode_session_frame(frames.MsgType.DATA, os.urandom(16), b"x"))
            with contextlib.suppress(TimeoutError):
                await conn.wait_closed(min(plan.deadline, time.monotonic() + STEP_S))

    async def after_login(i: int, fatal: str) -> None:
        async with insiders.login(plan.target.source(i)) as conn:
            conns.append(conn)
            if conn.stage != "insider_failed":
                await misbehave(conn, fatal)

    async def misbehave(conn: Conn, fatal: str) -> None:
        conn.stage = "post:unknown_sessions"
        for n in range(plan.junk_frames):
            sid = os.urandom(frames.SESSION_ID_SIZE)
            kind = (frames.MsgType.DATA, frames.MsgType.HEARTBEAT, frames.MsgType.BUNDLE)[n % 3]
            await conn.send_message(frames.encode_session_frame(kind, sid, os.urandom(48)))
        await conn.send_message(frames.encode(frames.Ready(os.urandom(16))))
        await conn.send_message(frames.encode(frames.Release(os.urandom(16))))
        if not await conn.alive(time.monotonic() + STEP_S):
            conn.stage = "post:dropped_by_relay"
            return
        conn.stage = f"post:{fatal}"
        sid = os.urandom(16)
        fatal_frames = {
            "PEER_JOINED": frames.encode(frames.PeerJoined(sid, plan.keys.member_identity)),
            "CHALLENGE": frames.encode(frames.Challenge(os.urandom(frames.NONCE_SIZE))),
            "HELLO": frames.encode(frames.Hello(INSIDER_NETWORK.format(0), public_bytes(plan.keys.insiders[0]))),
            "AUTH": frames.encode(frames.Auth(os.urandom(frames.SIGNATURE_SIZE))),
        }
        await conn.send_message(fatal_frames[fatal])
        with contextlib.suppress(TimeoutError):
            await conn.wait_closed(min(plan.deadline, time.monotonic() + STEP_S))

    jobs: list[Callable[[], Awaitable[None]]] = []
    k = 0
    for _ in range(plan.count):
        for name, message in _preauth_messages(plan.keys).items():
            jobs.append(lambda k=k, n=name, m=message: first_message(k, n, m))
            k += 1
        jobs.append(lambda k=k: between(k))
        k += 1
    for j in range(plan.count * len(FATAL_AFTER_LOGIN)):
        jobs.append(lambda j=j: after_login(j, FATAL_AFTER_LOGIN[j % len(FATAL_AFTER_LOGIN)]))
    await _run_all(plan, jobs)
    return conns


async def attack_garbage(plan: Plan) -> list[Conn]:
    """Random bytes: as raw TCP ("tcp"), inside TLS ("tls"), as a WebSocket binary message before a
    login ("ws") and after one ("post", insiders); ``count`` connections each."""
    conns: list[Conn] = []
    insiders = InsiderPool(plan)

    def junk() -> bytes:
        data = bytearray(os.urandom(random.randint(1, 4096)))
        if data[0] == 0x16:  # a TLS handshake record would only make the relay wait for more
            data[0] = 0x17
        return bytes(data)

    async def one(i: int, variant: str) -> None:
        if variant == "post":
            async with insiders.login(plan.target.source(i)) as conn:
                conns.append(conn)
                if conn.stage == "insider_failed":
                    return
                # Any first byte but the wire version: not a frame, so it must cost the connection.
                message = bytearray(os.urandom(random.randint(1, 2048)))
                message[0] = random.choice([b for b in range(256) if b != WIRE_VERSION])
                conn.stage = "post:ws"
                await conn.send_message(bytes(message))
                with contextlib.suppress(TimeoutError):
                    await conn.wait_closed(min(plan.deadline, time.monotonic() + STEP_S))
            return
        conn = Conn(plan.target, plan.target.source(i))
        conns.append(conn)
        if not await conn.connect(tls=variant != "tcp"):
            return
        conn.stage = f"pre:{variant}"
        if variant == "ws":
            if not await conn.upgrade():
                return
            conn.stage = "pre:ws"
            await conn.send_message(os.urandom(random.randint(1, 4096)))
        else:
            await conn.send_raw(junk() + b"\r\n\r\n")
        with contextlib.suppress(TimeoutError):
            await conn.wait_closed(min(plan.deadline, time.monotonic() + STEP_S))

    variants = plan.variants or ["tcp", "tls", "ws", "post"]
    await _run_all(plan, [lambda i=i, v=v: one(i, v) for i in range(plan.count) for v in variants])
    return conns


async def attack_authflood(plan: Plan) -> list[Conn]:
    """Failed logins, as fast as ``concurrency`` allows, ``count`` per variant: "bad_signature" (a real
    member's identity, signed with another key), "not_a_member" (a valid signature, an unknown key)
    and "unknown_network"."""
    conns: list[Conn] = []
    rogue = Ed25519PrivateKey.generate()

    async def one(i: int, variant: str) -> None:
        conn = Conn(plan.target, plan.target.source(i))
        conns.append(conn)
        if not (await conn.connect(tls=True) and await conn.upgrade()):
            return
        deadline = min(plan.deadline, time.monotonic() + STEP_S)
        if variant == "bad_signature":
            answer = await conn.login(plan.keys.member_network, plan.keys.member_identity, rogue.sign, deadline)
        elif variant == "not_a_member":
            key = Ed25519PrivateKey.generate()
            answer = await conn.login(plan.keys.member_network, public_bytes(key), key.sign, deadline)
        else:
            answer = await conn.login("no-such-network", public_bytes(rogue), rogue.sign, deadline)
        conn.stage = f"{variant}:{answer}"
        with contextlib.suppress(TimeoutError):
            await conn.wait_closed(min(plan.deadline, time.monotonic() + STEP_S))

    variants = plan.variants or ["bad_signature", "not_a_member", "unknown_network"]
    # Interleaved, so every variant meets the per-address failure limit alike.
    await _run_all(plan, [lambda i=i, v=v: one(i, v) for i in range(plan.count) for v in variants])
    return conns


async def attack_flood(plan: Plan) -> list[Conn]:
    """``count`` TLS + WebSocket connects, ``concurrency`` in flight, each silent for ``hold`` s and
    then closed by us (or earlier by the relay)."""
    conns: list[Conn] = []

    async def one(i: int) -> None:
        conn = Conn(plan.target, plan.target.source(i))
        conns.append(conn)
        if not (await conn.connect(tls=True) and await conn.upgrade()):
            return
        with contextlib.suppress(TimeoutError):
            await conn.wait_closed(min(plan.deadline, time.monotonic() + plan.hold))
        if conn.closed_after is None:
            conn.stage = "closed_by_us"
            await conn.send_raw(ws_frame(Opcode.CLOSE, Close(1000, "").serialize()))
            conn.abort()

    await _run_all(plan, [lambda i=i: one(i) for i in range(plan.count)])
    return conns


# --- the attacker: running one attack -------------------------------------------------------


def summarize(conns: Sequence[Conn]) -> dict[str, Any]:
    """What the attack saw, counted: stages reached, relay frames, close codes, close times."""
    closed = [c.closed_after for c in conns if c.closed_after is not None]
    return {
        "connections": len(conns),
        "stages": dict(Counter(c.stage for c in conns)),
        "frames": dict(Counter(name for c in conns for name in c.received)),
        "close_codes": dict(Counter(str(c.close_code) for c in conns if c.close_code is not None)),
        "closed_by_relay": len(closed),
        "still_open_at_end": sum(1 for c in conns if c.closed_after is None and c.stage not in ("connect_failed",)),
        "closed_after_s": _spread(closed),
        "errors": dict(Counter(c.error.split(":")[0] for c in conns if c.error).most_common(6)),
        # Per stage: which relay frames and close codes came back (the test checks these).
        "by_stage": {
            stage: {
                "count": sum(1 for c in conns if c.stage == stage),
                "frames": dict(Counter(n for c in conns if c.stage == stage for n in c.received)),
                "close_codes": dict(Counter(str(c.close_code) for c in conns if c.stage == stage)),
                "closed": sum(1 for c in conns if c.stage == stage and c.closed_after is not None),
                "closed_after_s": _spread([c.closed_after for c in conns if c.stage == stage and c.closed_after]),
            }
            for stage in sorted({c.stage for c in conns})
        },
    }


def _spread(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    return {
        "min": round(ordered[0], 3),
        "median": round(statistics.median(ordered), 3),
        "max": round(ordered[-1], 3),
    }


async def probe_login(target: Target, keys: Keys, delay: float) -> dict[str, Any]:
    """A legitimate login (the probe network's member) ``delay`` s into the attack: did it get in, how fast."""
    await asyncio.sleep(delay)
    started = time.monotonic()
    conn = Conn(Target(target.host, target.port, [PROBE_ADDRESS]), PROBE_ADDRESS)
    try:
        if not (await conn.connect(tls=True) and await conn.upgrade()):
            return {"ok": False, "answer": conn.stage, "error": conn.error, "seconds": time.monotonic() - started}
        answer = await conn.login(PROBE_NETWORK, public_bytes(keys.probe), keys.probe.sign, started + STEP_S)
        return {"ok": answer == "AUTH_OK", "answer": answer, "seconds": round(time.monotonic() - started, 3)}
    finally:
        conn.abort()


async def run_attack(attack: str, plan: Plan, probe_at: float | None) -> dict[str, Any]:
    probe = (
        asyncio.get_running_loop().create_task(probe_login(plan.target, plan.keys, probe_at))
        if probe_at is not None
        else None
    )
    conns: list[Conn] = []
    extra: dict[str, Any] = {}
    try:
        if attack == "syn":
            extra = await attack_syn(plan)
        elif attack in ("tcp-idle", "tls-idle", "ws-idle"):
            conns = await attack_idle(plan, attack.split("-")[0])
        else:
            runner = {
                "slow": attack_slow,
                "oversize": attack_oversize,
                "preauth": attack_preauth,
                "garbage": attack_garbage,
                "authflood": attack_authflood,
                "flood": attack_flood,
            }[attack]
            conns = await runner(plan)
        result = {"attack": attack, "seconds": round(time.monotonic() - plan.started, 2), **summarize(conns), **extra}
        if probe is not None:
            result["probe"] = await probe
        return result
    finally:
        for conn in conns:
            conn.abort()
        if probe is not None and not probe.done():
            probe.cancel()


def _in_a_lab_namespace() -> bool:
    """True if this process's network namespace is a named lab one (``ip netns`` names them in /run/netns)."""
    mine = os.stat("/proc/self/ns/net")
    try:
        names = os.listdir(NETNS_DIR)
    except OSError:
        return False
    for name in names:
        with contextlib.suppress(OSError):
            ns = os.stat(os.path.join(NETNS_DIR, name))
            if (ns.st_dev, ns.st_ino) == (mine.st_dev, mine.st_ino):
                return re.match(r"^tv[0-9a-z]{1,12}-", name) is not None
    return False


def _outside_the_lab(host: str, sources: Sequence[str]) -> str | None:
    """Why this attack may not run here, or None: only from a lab namespace, only at lab addresses."""
    if not _in_a_lab_namespace():
        return "refusing to attack from outside a lab network namespace (tvXXXX-*): AttackLab runs it in one"
    lab = ipaddress.ip_network(LAB_WAN)
    for address in (host, *sources):
        if ipaddress.ip_address(address) not in lab:
            return f"{address} is not a lab WAN address ({LAB_WAN})"
    return None


def _raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def attacker_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="One bounded hostile-client attack against a relay (lab only).")
    parser.add_argument("attack", choices=ATTACKS)
    parser.add_argument("--relay", required=True, help="HOST:PORT of the relay")
    parser.add_argument("--config", type=Path, required=True, help="the keys file AttackLab wrote")
    parser.add_argument("--sources", required=True, help="comma-separated source addresses")
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--duration", type=float, default=20.0, help="hard bound on the attack, s")
    parser.add_argument("--interval", type=float, default=1.0, help="slowloris: seconds between bytes")
    parser.add_argument("--hold", type=float, default=0.0, help="flood: seconds each connection stays silent")
    parser.add_argument("--junk-frames", type=int, default=30, help="preauth: frames for unknown sessions per insider")
    parser.add_argument("--insider-block", type=int, default=0, help="which block of insider keys is this process's")
    parser.add_argument("--variants", default="", help="comma-separated subset of the attack's variants")
    parser.add_argument("--probe-at", type=float, help="also log in legitimately this many s into the attack")
    args = parser.parse_args(argv)
    if not 0 <= args.insider_block < INSIDER_KEYS // INSIDER_BLOCK:
        parser.error(f"--insider-block must be 0..{INSIDER_KEYS // INSIDER_BLOCK - 1}")
    if not 1 <= args.count <= 5000 or not 1 <= args.concurrency <= 5000 or not 0 < args.duration <= 120:
        parser.error("bounds: --count and --concurrency 1..5000, --duration up to 120 s")
    host, port = args.relay.rsplit(":", 1)
    sources = [s for s in args.sources.split(",") if s]
    problem = _outside_the_lab(host, sources)
    if problem:
        parser.error(problem)
    _raise_nofile()
    plan = Plan(
        target=Target(host, int(port), sources),
        keys=Keys.load(args.config),
        count=args.count,
        concurrency=args.concurrency,
        duration=args.duration,
        interval=args.interval,
        hold=args.hold,
        junk_frames=args.junk_frames,
        insider_slots=range(args.insider_block * INSIDER_BLOCK, (args.insider_block + 1) * INSIDER_BLOCK),
        variants=[v for v in args.variants.split(",") if v],
    )
    result = asyncio.run(run_attack(args.attack, plan, args.probe_at))
    print(json.dumps(result), flush=True)
    return 0


# --- the orchestrator's side ----------------------------------------------------------------


class AttackError(Exception):
    """An attacker process failed (not the relay: the attack itself); the message has its stderr."""


class AttackRun:
    """One attacker process in the WAN namespace; :meth:`result` waits for its JSON line."""

    def __init__(self, lab: Any, argv: list[str], out: Path, timeout: float) -> None:
        self.out = out
        self.timeout = timeout
        self.started = time.time()
        with open(out, "wb") as stdout, open(out.with_suffix(".err"), "wb") as stderr:
            self.proc = lab.popen("wan", argv, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL)

    def result(self) -> dict[str, Any]:
        try:
            self.proc.wait(self.timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AttackError(f"attacker {self.out.name} overran its {self.timeout:.0f} s") from None
        lines = self.out.read_text().strip().splitlines()
        if self.proc.returncode != 0 or not lines:
            err = self.out.with_suffix(".err").read_text()[-3000:]
            raise AttackError(f"attacker {self.out.name} exited {self.proc.returncode}:\n{err}")
        return json.loads(lines[-1])


@dataclass
class AttackLab:
    """The lab side of the attacks: keys and members files, attacker addresses, attacker processes.

    ``members_args()`` are the relay flags that serve the insider and probe networks; give them to
    the relay at start. Addresses are handed out in blocks (:meth:`sources`), never reused in a
    run, so one attack's failed logins never count against another's addresses.
    """

    lab: Any
    workdir: Path
    relay_host: str
    relay_port: int
    member_network: str
    member_identity: str  # base64, as `traversal keygen` prints it
    next_address: int = ATTACKER_FIRST
    _seq: int = 0

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        insiders = [Ed25519PrivateKey.generate() for _ in range(INSIDER_KEYS)]
        probe = Ed25519PrivateKey.generate()
        self.config = self.workdir / "attacker-keys.json"
        seeds = [k.private_bytes_raw().hex() for k in insiders]
        self.config.write_text(
            json.dumps(
                {
                    "insider_seeds": seeds,
                    "probe_seed": probe.private_bytes_raw().hex(),
                    "member_network": self.member_network,
                    "member_identity": self.member_identity,
                }
            )
        )
        os.chmod(self.config, 0o600)
        self.insider_files: list[Path] = []
        for slot, key in enumerate(insiders):
            path = self.workdir / f"insider-{slot:02d}.txt"
            path.write_text(encode_public(public_bytes(key)) + "\n")
            self.insider_files.append(path)
        self.probe_file = self.workdir / "probe.txt"
        self.probe_file.write_text(encode_public(public_bytes(probe)) + "\n")
        self._probe_added = False

    def members_args(self) -> list[str]:
        args = ["--members", f"{PROBE_NETWORK}:{self.probe_file}"]
        for slot, path in enumerate(self.insider_files):
            args += ["--members", f"{INSIDER_NETWORK.format(slot)}:{path}"]
        return args

    def sources(self, count: int) -> list[str]:
        """``count`` fresh attacker addresses, added to the WAN bridge as /32s."""
        if self.next_address + count - 1 > ATTACKER_LAST:
            raise AttackError(f"out of attacker addresses (203.0.113.{ATTACKER_FIRST}-{ATTACKER_LAST})")
        addresses = [f"203.0.113.{n}" for n in range(self.next_address, self.next_address + count)]
        self.next_address += count
        for address in addresses:
            self.lab.run("wan", "ip", "addr", "add", f"{address}/32", "dev", "br0")
        return addresses

    def prepare_syn(self) -> None:
        """Route the spoofed SYN sources (198.51.100.0/24) into a veth pair with both ends in the WAN
        namespace and nothing behind it (this kernel has no dummy interfaces)."""
        near, far = SYN_SINK
        if near not in self.lab.run("wan", "ip", "-o", "link", "show").stdout:
            wan = self.lab.ns("wan")
            self.lab.run(
                "wan", "ip", "link", "add", near, "netns", wan, "type", "veth", "peer", "name", far, "netns", wan
            )
            self.lab.run("wan", "ip", "link", "set", near, "up")
            self.lab.run("wan", "ip", "link", "set", far, "up")
            self.lab.run("wan", "ip", "route", "add", f"{SYN_SOURCES}0/24", "dev", near)

    def _ensure_probe_address(self) -> None:
        if not self._probe_added:
            self.lab.run("wan", "ip", "addr", "add", f"{PROBE_ADDRESS}/32", "dev", "br0")
            self._probe_added = True

    def start(
        self,
        attack: str,
        sources: Sequence[str],
        *,
        count: int,
        duration: float,
        concurrency: int = 100,
        interval: float = 1.0,
        hold: float = 0.0,
        junk_frames: int = 30,
        variants: Sequence[str] = (),
        probe_at: float | None = None,
    ) -> AttackRun:
        """Start one attack in the WAN namespace (at nice 10); :meth:`AttackRun.result` collects it."""
        if probe_at is not None:
            self._ensure_probe_address()
        if attack == "syn":
            self.prepare_syn()
        self._seq += 1
        argv = [
            "nice",
            "-n",
            str(ATTACKER_NICE),
            sys.executable,
            str(HERE),
            attack,
            "--relay",
            f"{self.relay_host}:{self.relay_port}",
            "--config",
            str(self.config),
            "--sources",
            ",".join(sources),
            "--count",
            str(count),
            "--concurrency",
            str(concurrency),
            "--duration",
            str(duration),
            "--interval",
            str(interval),
            "--hold",
            str(hold),
            "--junk-frames",
            str(junk_frames),
            # Attackers started one after another get different blocks of insider keys.
            "--insider-block",
            str(self._seq % (INSIDER_KEYS // INSIDER_BLOCK)),
            "--variants",
            ",".join(variants),
        ]
        if probe_at is not None:
            argv += ["--probe-at", str(probe_at)]
        out = self.workdir / f"attack-{self._seq:02d}-{attack}.json"
        # The attacker's own bound plus room to start Python and print.
        return AttackRun(self.lab, argv, out, timeout=duration + 30)


def proc_status_kib(pid: int, key: str) -> int:
    """A ``kB`` line of /proc/PID/status (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise AttackError(f"/proc/{pid}/status has no {key}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/PID/stat (fields 14 and 15 of proc(5))."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ProcessSampler:
    """Samples a process's RSS and open files every ``interval`` s in a thread, between
    :meth:`start` and :meth:`stop` (a context manager): first, peak and last values."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.interval = interval
        self.rss_kib: list[int] = []
        self.fds: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> tuple[int, int]:
        rss, fds = proc_status_kib(self.pid, "VmRSS"), open_fds(self.pid)
        self.rss_kib.append(rss)
        self.fds.append(fds)
        return rss, fds

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(OSError, AttackError):
                self.sample()

    @contextlib.contextmanager
    def running(self) -> Iterator[ProcessSampler]:
        self.sample()
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(5)
            with contextlib.suppress(OSError, AttackError):
                self.sample()

    def figures(self) -> dict[str, int]:
        return {
            "rss_kib_before": self.rss_kib[0],
            "rss_kib_peak": max(self.rss_kib),
            "rss_kib_after": self.rss_kib[-1],
            "fds_before": self.fds[0],
            "fds_peak": max(self.fds),
            "fds_after": self.fds[-1],
        }


#: The /metrics series the attacks move (as overlay.parse_metrics names them).
WATCHED_COUNTERS = (
    'traversal_relay_refused_total{reason="pending"}',
    'traversal_relay_refused_total{reason="failures"}',
    'traversal_relay_refused_total{reason="full"}',
    'traversal_relay_auth_failures_total{reason="bad_signature"}',
    'traversal_relay_auth_failures_total{reason="not_a_member"}',
    'traversal_relay_auth_failures_total{reason="unknown_network"}',
    'traversal_relay_auth_failures_total{reason="auth_timeout"}',
    'traversal_relay_auth_failures_total{reason="duplicate_login"}',
    'traversal_relay_auth_failures_total{reason="abandoned"}',
    "traversal_relay_protocol_errors_total",
    "traversal_relay_dropped_frames_total",
)
WATCHED_GAUGES = (
    "traversal_relay_logins_pending",
    "traversal_relay_connections_open",
    "traversal_relay_clients_connected",
    "traversal_relay_sessions_active",
)


def counter_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    """How much each /metrics counter the attacks move (and any other counter) grew; zeros left out."""
    names = set(WATCHED_COUNTERS) | {n for n in after if n.split("{")[0].endswith("_total")}
    deltas = {name: int(after.get(name, 0) - before.get(name, 0)) for name in sorted(names)}
    return {name: value for name, value in deltas.items() if value}


def short_metric(name: str) -> str:
    """``traversal_relay_refused_total{reason="pending"}`` -> ``refused{pending}``."""
    base, _, labels = name.partition("{")
    base = base.removeprefix("traversal_relay_").removeprefix("traversal_").removesuffix("_total")
    if labels:
        values = ",".join(part.split("=", 1)[1].strip('"') for part in labels.rstrip("}").split(","))
        return f"{base}{{{values}}}"
    return base


if __name__ == "__main__":
    sys.exit(attacker_main())
