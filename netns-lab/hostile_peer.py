"""A malicious member for the lab's trust tests (issue 7): a legitimate identity that turns on its peer.

The design says a session only ever delivers what its peer sealed, once, within bounds: garbage,
replays and out-of-bounds frames are rejected and counted, and nothing a peer sends can take
the victim down or disturb its other sessions. This program is the peer an attacker (or a
badly broken implementation) would run, so the lab can check that claim against a real node::

    python netns-lab/hostile_peer.py --relay wss://HOST:PORT --ca CERT --network NET \\
        --identity KEY --victim PUBKEY --attacks garbage,oversize,flood,replay,wait,malformed

It is a member (its key is in the relay's members file): it logs in with the product's relay
client, and completes the real end-to-end handshake with the victim through the product's own
``PeerLink`` (so ``Handshake`` and ``Session``), which leaves it holding valid session keys.
It never answers any other member, and says it does not accept direct paths, so it talks to
the victim over the relay only (``spoof`` reaches the victim's direct path another way).
Then it runs the attacks named by ``--attacks``, in order, each bounded in count and time:

``garbage``    session frames with the right header and session id but bodies that do not
               authenticate: every sealed type with random bodies, bodies of a key epoch the
               victim does not hold, bodies too short to be records, genuine records truncated,
               extended or bit-flipped, records sealed as one type and sent as another, random
               HANDSHAKE messages, broken BUNDLEs, and validly sealed nonsense (heartbeats of the
               wrong size, PATH and CANDIDATES records the victim never asked for);
``oversize``   validly sealed DATA whose Ethernet frame is longer than the relay's MTU allows
               (MTU + 18, the Ethernet header with an 802.1Q tag), or shorter than an Ethernet
               header (14 bytes), alone and inside a BUNDLE; plus the largest frame the MTU
               allows and the smallest that holds a marker, which must arrive;
``flood``      valid DATA (small marker frames, BUNDLEd as a node does) as fast as it can, for
               ``--flood-seconds`` or ``--flood-frames``, whichever ends first;
``replay``     exact copies of records it sent before (in-window duplicates, records older than
               the replay window once a flood moved it, a BUNDLE of copies, its heartbeats), and
               validly sealed new content under counters it already used;
``spoof``      unauthenticated UDP at the victim's direct-path port, from a raw socket with the
               source address of the victim's direct peer (``--spoof-src``, ``--spoof-dst``):
               badly framed, well framed with forged records, and QUIC- and STUN-range junk
               (needs root, in a namespace whose route to the victim's NAT skips the peer's);
``wait``       print ``{"event": "waiting"}`` and wait (bounded) for a line on stdin, so the test
               can set the stage before the attacks or read the victim's counters before the
               session ends; a line ``SRC_IP:PORT DST_IP:PORT`` sets the ``spoof`` addresses
               (known only once the victim's direct path is up);
``malformed``  a session frame whose length field promises more bytes than it has: the relay
               refuses it, drops this client and tells the victim the session is over.

Every Ethernet frame sealed here that is long enough is a *marker*: source MAC
:data:`MARKER_MAC`, EtherType :data:`MARKER_ETHERTYPE`, then :data:`MARKER_MAGIC`, a sequence
number and the attack's id, so a capture on the victim's TAP can tell each one apart. Markers
sealed validly and sent once must reach the TAP exactly once; every other marker (oversize,
replayed, forged) must never appear.

Output: one JSON line per event on stdout. Each attack's line gives what it ``sent``, the
``expect``\\ ed increase of each of the victim's ``dropped`` counters for this peer (the keys of
``traversal status``), the ``valid`` marker sequence numbers (those that must arrive; the flood
gives them as ``valid_range``, see :func:`valid_markers`) and the ``rejected`` ones (those that
must not). Expectations of ``spoof`` belong to the impersonated peer's session. The last
line, ``{"event": "summary", ...}``, adds up the rest. Exit status: 0 once every attack ran, 1
with an ``{"event": "error"}`` line if not.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import random
import socket
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from transport import frames
from transport.constants import MAX_EPOCHS_AHEAD, MAX_HANDSHAKE_SIZE, MAX_MTU, REPLAY_WINDOW_SIZE, WIRE_VERSION
from transport.frames import SEALED_TYPES, SESSION_HEADER_SIZE, MsgType
from transport.handshake import MSG1_SIZE, MSG2_SIZE, MSG3_SIZE
from transport.identity import decode_public, load_identity, public_bytes, short_id
from transport.session import HEADER_SIZE, MAX_PLAINTEXT, MIN_SEALED_SIZE
from traversal.peer import ETHERNET_OVERHEAD, MIN_ETHERNET_FRAME, LinkState, PeerLink
from traversal.relay_client import RelayLink, RelayRefused, RelayUnavailable, client_ssl_context, connect_relay

#: Source MAC of every frame sealed here (locally administered, unicast: "\x02" "hostl").
MARKER_MAC = bytes.fromhex("02686f73746c")
#: Destination MAC: another locally administered address, not the victim's, so its kernel drops them.
MARKER_DST = bytes.fromhex("02686f737464")
#: IEEE 802 "local experimental" EtherType: no protocol stack on the victim takes these frames.
MARKER_ETHERTYPE = 0x88B5
MARKER_MAGIC = b"traversal-hostile-marker"
#: magic | sequence number (u32) | attack id (u8)
MARKER_HEAD = struct.Struct(f"!{len(MARKER_MAGIC)}sIB")
#: The smallest frame that carries a whole marker (Ethernet header, magic, seq, attack id).
MARKER_MIN = MIN_ETHERNET_FRAME + MARKER_HEAD.size
#: Attack ids carried in markers (the capture can say which attack a stray marker came from).
ATTACK_IDS = {"garbage": 1, "oversize": 2, "flood": 3, "replay": 4, "spoof": 5, "malformed": 6}

#: Limits that keep every attack bounded whatever the flags say.
MAX_COUNT = 10_000
MAX_FLOOD_FRAMES = 200_000
MAX_FLOOD_SECONDS = 30.0
#: Frames sent per WebSocket message burst in the flood (BUNDLEd as the node does).
FLOOD_BATCH = 128
#: How long to wait for the relay login, the handshake and ESTABLISHED.
ESTABLISH_TIMEOUT = 30.0
#: How long ``malformed`` waits for the relay to refuse it.
REFUSAL_TIMEOUT = 10.0
#: Spoofed datagrams per burst, and the pause between bursts (the victim's socket buffer is
#: finite; a paced stream tests the victim, not the kernel's queues).
SPOOF_BURST = 32
SPOOF_PAUSE = 0.002

_RECORD_HEADER = struct.Struct("!BQ")


class HostileError(Exception):
    """The attack could not be set up (login, handshake); the message says what failed."""


def marker(seq: int, attack: str, size: int) -> bytes:
    """An Ethernet frame of ``size`` bytes (at least :data:`MARKER_MIN`) carrying marker ``seq``."""
    if size < MARKER_MIN:
        raise ValueError(f"a marker needs {MARKER_MIN} bytes, asked for {size}")
    head = MARKER_DST + MARKER_MAC + struct.pack("!H", MARKER_ETHERTYPE)
    body = MARKER_HEAD.pack(MARKER_MAGIC, seq, ATTACK_IDS[attack])
    return head + body + bytes(size - len(head) - len(body))


def parse_marker(frame: bytes) -> tuple[int, int] | None:
    """(sequence number, attack id) of a marker frame, or None if ``frame`` is not one."""
    if len(frame) < MARKER_MIN or frame[6:12] != MARKER_MAC:
        return None
    if struct.unpack("!H", frame[12:14])[0] != MARKER_ETHERTYPE:
        return None
    magic, seq, attack = MARKER_HEAD.unpack_from(frame, MIN_ETHERNET_FRAME)
    return (seq, attack) if magic == MARKER_MAGIC else None


def seal_as(key: bytes, kind: MsgType, epoch: int, counter: int, plaintext: bytes) -> bytes:
    """A record sealed exactly as ``transport/session.py`` seals, under a chosen epoch and counter
    (which a Session never lets its user pick): the forger's tool for "old counter" records."""
    header = _RECORD_HEADER.pack(epoch & 0xFF, counter)
    aad = bytes([WIRE_VERSION, kind]) + header
    return header + ChaCha20Poly1305(key).encrypt(bytes(4) + header[1:], plaintext, aad)


def predicted_drop(record: bytes, *, current_epoch: int = 0) -> str:
    """What the victim's session must count for a record that does not authenticate under any
    key it holds: too short, an epoch it cannot use, or (else) a tag that fails. Assumes the
    record's counter is new to the replay window (forged counters here are far above it)."""
    if len(record) < MIN_SEALED_SIZE:
        return "malformed"
    distance = (record[0] - current_epoch) & 0xFF
    return "auth" if distance <= MAX_EPOCHS_AHEAD else "epoch"


def forged_record(rng: random.Random, epoch: int, size: int) -> bytes:
    """``size`` bytes that look like a sealed record of ``epoch``, with a counter far above any
    the peer has used (so the replay window lets it through to the AEAD) and a random tag."""
    counter = rng.randrange(1 << 40, 1 << 63)
    return _RECORD_HEADER.pack(epoch, counter) + rng.randbytes(max(0, size - HEADER_SIZE))


@dataclass
class AttackReport:
    """What one attack did: printed as one JSON line."""

    attack: str
    sent: dict[str, int] = field(default_factory=dict)
    expect: dict[str, int] = field(default_factory=dict)
    valid: list[int] = field(default_factory=list)
    #: [first, end) of a run of valid markers too long to list (the flood's).
    valid_range: tuple[int, int] | None = None
    rejected: list[int] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    ended: float = 0.0
    note: str | None = None

    def add_sent(self, what: str, n: int = 1) -> None:
        self.sent[what] = self.sent.get(what, 0) + n

    def add_expect(self, reason: str, n: int = 1) -> None:
        self.expect[reason] = self.expect.get(reason, 0) + n

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "event": "attack",
            "attack": self.attack,
            "sent": self.sent,
            "expect": self.expect,
            "valid": self.valid,
            "valid_range": self.valid_range,
            "rejected": self.rejected,
            "started": self.started,
            "ended": self.ended,
        }
        if self.note:
            out["note"] = self.note
        return out


def emit(event: dict[str, Any]) -> None:
    print(json.dumps(event, sort_keys=True), flush=True)


# --- spoofed UDP -------------------------------------------------------------------------------


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_packet(src: tuple[str, int], dst: tuple[str, int], payload: bytes) -> bytes:
    """An IPv4 + UDP packet from ``src`` to ``dst`` (any source address: a raw socket sends it as is)."""
    src_ip, dst_ip = ipaddress.IPv4Address(src[0]).packed, ipaddress.IPv4Address(dst[0]).packed
    length = 8 + len(payload)
    pseudo = src_ip + dst_ip + struct.pack("!BBH", 0, socket.IPPROTO_UDP, length)
    udp = struct.pack("!HHHH", src[1], dst[1], length, 0) + payload
    checksum = _checksum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", checksum) + udp[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, random.getrandbits(16), 0, 64, 17, 0, src_ip, dst_ip)
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return ip + udp


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    try:
        return str(ipaddress.IPv4Address(host)), int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected IPv4:PORT, got {text!r}") from None


# --- the peer ----------------------------------------------------------------------------------


class HostilePeer:
    """A member that completes the handshake with one victim, then attacks it over the relay."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.identity = load_identity(Path(args.identity))
        self.victim = decode_public(args.victim)
        self.rng = random.Random(args.seed)
        self.relay: RelayLink | None = None
        self.link: PeerLink | None = None
        self.loop = asyncio.get_running_loop()
        self.established = asyncio.Event()
        self.refused = asyncio.Event()
        self.relay_error: str | None = None
        self.next_seq = 1
        #: Sealed DATA wire frames sent validly, oldest first (the flood's first few only): the
        #: replay attack's material.
        self.sent_data: list[bytes] = []
        #: Every other record our session sealed and sent (heartbeats and their replies, rekeys).
        self.sent_control: list[bytes] = []
        self.received_frames = 0
        self._wake = asyncio.Event()

    # --- plumbing --------------------------------------------------------------------------

    @property
    def now(self) -> float:
        return self.loop.time()

    def seq(self) -> int:
        value = self.next_seq
        self.next_seq += 1
        return value

    async def send(self, wire: list[bytes], *, genuine: bool = True) -> None:
        """Send wire frames to the relay. ``genuine`` ones (sealed by our session, sent for the first
        time) are kept: the replay attack replays our heartbeats and other control records."""
        assert self.relay is not None
        for data in wire:
            if genuine and len(data) > 1 and data[1] in SEALED_TYPES and data[1] != MsgType.DATA:
                self.sent_control.append(data)
            await self.relay.send(data)

    def _session_key(self) -> bytes:
        # A Session keeps its key private; an attacker holds its own keys all the same.
        assert self.link is not None and self.link.session is not None
        key = self.link.session._send_key
        assert key is not None
        return key

    def _epoch(self) -> int:
        assert self.link is not None and self.link.session is not None
        return self.link.session.send_epoch

    @staticmethod
    def _counter(wire: bytes) -> int:
        return int(_RECORD_HEADER.unpack_from(wire, SESSION_HEADER_SIZE)[1])

    def seal_data(self, frame: bytes) -> bytes:
        """One Ethernet frame sealed validly as a DATA wire frame (and nothing else queued)."""
        assert self.link is not None
        wire = self.link.send_frame(frame, self.now)
        if len(wire) != 1:
            raise HostileError(f"sealing one frame gave {len(wire)} wire frames (a rekey?)")
        return wire[0]

    def seal_record(self, kind: MsgType, plaintext: bytes) -> bytes:
        assert self.link is not None
        wire = self.link.seal_record(kind, plaintext, self.now)
        if wire is None:
            raise HostileError(f"cannot seal a {kind.name} record: the session is gone")
        return wire

    def frame(self, kind: MsgType, payload: bytes) -> bytes:
        assert self.link is not None
        return frames.encode_session_frame(kind, self.link.session_id, payload)

    def bundle(self, records: list[bytes]) -> bytes:
        """A BUNDLE of ``records`` as they are (no checks: they may be anything)."""
        assert self.link is not None
        body = b"".join(struct.pack("!H", len(r)) + r for r in records)
        return bytes([WIRE_VERSION, MsgType.BUNDLE]) + self.link.session_id + struct.pack("!H", len(body)) + body

    # --- relay side ------------------------------------------------------------------------

    async def run(self) -> int:
        args = self.args
        ssl_context = client_ssl_context(Path(args.ca)) if args.relay.startswith("wss:") else None
        self.relay = await asyncio.wait_for(
            connect_relay(
                args.relay,
                ssl_context=ssl_context,
                network=args.network,
                identity=self.identity,
                supports_direct=False,
            ),
            ESTABLISH_TIMEOUT,
        )
        emit({"event": "joined", "identity": short_id(public_bytes(self.identity)), "observed": self.relay.observed_ip})
        reader = asyncio.create_task(self._read())
        timers = asyncio.create_task(self._timers())
        try:
            waiter = asyncio.create_task(self.established.wait())
            done, _ = await asyncio.wait(
                {waiter, reader}, timeout=ESTABLISH_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
            if waiter not in done:
                waiter.cancel()
                raise HostileError(f"no session with the victim within {ESTABLISH_TIMEOUT:.0f} s ({self.relay_error})")
            assert self.link is not None
            emit(
                {
                    "event": "established",
                    "session": self.link.session_id.hex(),
                    "e2e": self.link.session_tag,
                    "role": "initiator" if self.link.initiator else "responder",
                    "mtu": self.link.mtu,
                }
            )
            reports = []
            for name in args.attacks:
                report = await self._attack(name)
                if report is not None:
                    report.ended = time.time()
                    emit(report.as_json())
                    reports.append(report)
            emit(self._summary(reports))
            return 0
        finally:
            for task in (reader, timers):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.relay.close(), 2.0)

    async def _read(self) -> None:
        assert self.relay is not None
        try:
            async for message in self.relay.ws:
                if isinstance(message, bytes):
                    await self._on_relay_frame(message)
        except Exception as exc:  # the relay closing on us is part of the job (``malformed``)
            self.relay_error = f"{type(exc).__name__}: {exc}"
        self.refused.set()

    async def _on_relay_frame(self, message: bytes) -> None:
        try:
            frame = frames.decode(message)
        except frames.FrameError as exc:
            emit({"event": "relay_frame_dropped", "reason": str(exc)})
            return
        now = self.now
        link = self.link
        if isinstance(frame, frames.PeerJoined):
            if frame.peer != self.victim or link is not None:
                return  # only the victim gets a handshake
            self.link = link = PeerLink(
                session_id=frame.session_id,
                peer=frame.peer,
                identity=self.identity,
                network=self.args.network,
                psk=None,
                allowed_peers=None,
                now=now,
            )
            await self.send(link.start(now))
        elif isinstance(frame, frames.SessionFrame):
            if link is None or frame.session_id != link.session_id:
                return
            out, delivered = link.on_frame(frame, now)
            self.received_frames += len(delivered)
            await self.send(out)
            self._wake.set()
        elif isinstance(frame, frames.Established):
            if link is not None and frame.session_id == link.session_id:
                link.on_established(frame, now)
                if link.state is LinkState.ESTABLISHED:
                    self.established.set()
                self._wake.set()
        elif isinstance(frame, frames.PeerLeft):
            if link is not None and frame.session_id == link.session_id:
                emit({"event": "peer_left", "reason": frame.reason})
        elif isinstance(frame, frames.Error):
            self.relay_error = f"relay error {frame.code}: {frame.reason}"
            emit({"event": "relay_error", "code": frame.code, "reason": frame.reason})

    async def _timers(self) -> None:
        """Keep the session alive (heartbeats, handshake retries): the victim must not time us out."""
        while True:
            deadline = self.link.next_deadline() if self.link is not None else None
            timeout = None if deadline is None else max(0.0, deadline - self.now)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            if self.link is not None and (d := self.link.next_deadline()) is not None and d <= self.now:
                await self.send(self.link.handle_timer(self.now))

    # --- attacks ---------------------------------------------------------------------------

    async def _attack(self, name: str) -> AttackReport | None:
        if name == "wait":
            await self._wait_for_go()
            return None
        attack = getattr(self, f"attack_{name}")
        report = AttackReport(name)
        await asyncio.wait_for(attack(report), self.args.attack_timeout)
        return report

    async def _wait_for_go(self) -> None:
        emit({"event": "waiting"})
        line = await asyncio.wait_for(self.loop.run_in_executor(None, sys.stdin.readline), self.args.wait_timeout)
        if not line:
            raise HostileError("stdin closed while waiting for the go-ahead")
        words = line.split()
        if len(words) == 2:  # the victim's direct path is up only now: "SPOOF_SRC SPOOF_DST"
            self.args.spoof_src, self.args.spoof_dst = (_hostport(w) for w in words)
        emit({"event": "go", "line": line.strip()})

    async def _send_marker(self, report: AttackReport, size: int = 64) -> bytes:
        """Seal and send one valid marker (it must reach the TAP once); returns its wire frame."""
        seq = self.seq()
        wire = self.seal_data(marker(seq, report.attack, size))
        await self.send([wire])
        self.sent_data.append(wire)
        report.valid.append(seq)
        report.add_sent("valid-marker")
        return wire

    async def attack_garbage(self, report: AttackReport) -> None:
        rng, n = self.rng, self.args.count
        epoch = self._epoch()
        out: list[bytes] = []

        def forged(kind: MsgType, record: bytes, what: str) -> None:
            out.append(self.frame(kind, record))
            report.add_sent(what)
            report.add_expect(predicted_drop(record, current_epoch=epoch))

        for kind in sorted(SEALED_TYPES):
            for _ in range(n):
                forged(kind, forged_record(rng, epoch, rng.randrange(MIN_SEALED_SIZE, 400)), "bad-tag")
                # Epochs the victim derives keys for (ahead) and epochs it must refuse outright.
                ahead = epoch + rng.randrange(1, MAX_EPOCHS_AHEAD + 1)
                forged(kind, forged_record(rng, ahead & 0xFF, rng.randrange(MIN_SEALED_SIZE, 400)), "epoch-ahead")
                far = epoch + rng.randrange(MAX_EPOCHS_AHEAD + 1, 256)
                forged(kind, forged_record(rng, far & 0xFF, rng.randrange(MIN_SEALED_SIZE, 400)), "epoch-unknown")
                forged(kind, rng.randbytes(rng.randrange(0, MIN_SEALED_SIZE)), "too-short")
                forged(kind, rng.randbytes(rng.randrange(MIN_SEALED_SIZE, 1500)), "random")
        await self.send(out, genuine=False)
        out.clear()

        # Genuine DATA records made invalid: truncated, extended, a flipped bit; then records
        # sealed as one type and sent as another (the type is in the associated data).
        for _ in range(n):
            for what in ("truncated", "extended", "bit-flipped"):
                seq = self.seq()
                record = self.seal_data(marker(seq, "garbage", rng.randrange(MARKER_MIN, 600)))[SESSION_HEADER_SIZE:]
                if what == "truncated":
                    record = record[: rng.randrange(MIN_SEALED_SIZE, len(record))]
                elif what == "extended":
                    record += rng.randbytes(rng.randrange(1, 64))
                else:
                    spot = rng.randrange(len(record))
                    record = record[:spot] + bytes([record[spot] ^ (1 << rng.randrange(8))]) + record[spot + 1 :]
                out.append(self.frame(MsgType.DATA, record))
                report.rejected.append(seq)
                report.add_sent(what)
                report.add_expect("auth")
            as_path, as_data = self.seq(), self.seq()
            path_record = self.seal_record(MsgType.PATH, marker(as_path, "garbage", 80))[SESSION_HEADER_SIZE:]
            out.append(self.frame(MsgType.DATA, path_record))
            data_record = self.seal_data(marker(as_data, "garbage", 80))[SESSION_HEADER_SIZE:]
            out.append(self.frame(rng.choice([MsgType.HEARTBEAT, MsgType.BYE, MsgType.REKEY]), data_record))
            report.rejected += [as_path, as_data]
            report.add_sent("type-confused", 2)
            report.add_expect("auth", 2)
        await self.send(out, genuine=False)
        out.clear()

        # HANDSHAKE messages (of every size the handshake uses, and random ones) on an
        # established session: a stray handshake must not disturb it.
        sizes = [0, 1, MSG1_SIZE, MSG2_SIZE, MSG3_SIZE, MAX_HANDSHAKE_SIZE]
        for i in range(n):
            size = sizes[i] if i < len(sizes) else rng.randrange(0, MAX_HANDSHAKE_SIZE + 1)
            out.append(self.frame(MsgType.HANDSHAKE, rng.randbytes(size)))
            report.add_sent("handshake")
            report.add_expect("stray-handshake")

        # BUNDLEs: broken ones cost one count each; a well-formed one costs each bad record.
        for _ in range(n):
            good = forged_record(rng, epoch, 100)
            broken = [
                b"",  # no records
                struct.pack("!H", len(good)) + good,  # a single record
                struct.pack("!H", 0) + struct.pack("!H", len(good)) + good,  # an empty record
                struct.pack("!H", len(good)) + good + struct.pack("!H", len(good) + 1) + good,  # overruns
                struct.pack("!H", len(good)) + good + struct.pack("!H", len(good)) + good + b"\x00",  # trails
                rng.randbytes(rng.randrange(1, 2000)),
            ]
            for body in broken:
                try:
                    records = frames.split_bundle(body)
                except frames.FrameError:
                    report.add_expect("malformed-bundle")
                else:  # random bytes that happen to parse: then each record counts
                    for record in records:
                        report.add_expect(predicted_drop(record, current_epoch=epoch))
                out.append(self.frame(MsgType.BUNDLE, body))
                report.add_sent("bundle-broken")
            records = [forged_record(rng, epoch, rng.randrange(0, 300)) for _ in range(rng.randrange(2, 8))]
            out.append(self.bundle(records))
            report.add_sent("bundle-of-forgeries")
            for record in records:
                report.add_expect(predicted_drop(record, current_epoch=epoch))
        await self.send(out, genuine=False)
        out.clear()

        # A bundle that mixes genuine markers with a forgery: only the forgery is lost.
        for _ in range(n):
            first, second = self.seq(), self.seq()
            genuine = [self.seal_data(marker(s, "garbage", 64)) for s in (first, second)]
            self.sent_data.extend(genuine)
            forgery = forged_record(rng, epoch, 90)
            body = [genuine[0][SESSION_HEADER_SIZE:], forgery, genuine[1][SESSION_HEADER_SIZE:]]
            out.append(self.bundle(body))
            report.valid += [first, second]
            report.add_sent("bundle-mixed")
            report.add_sent("valid-marker", 2)
            report.add_expect(predicted_drop(forgery, current_epoch=epoch))
        await self.send(out, genuine=False)
        out.clear()

        # Validly sealed nonsense: heartbeats of the wrong size or kind, and PATH / CANDIDATES
        # records to a victim that never offered us a direct path.
        for _ in range(n):
            out.append(self.seal_record(MsgType.HEARTBEAT, rng.randbytes(rng.choice([0, 1, 16, 18, 200]))))
            out.append(self.seal_record(MsgType.HEARTBEAT, struct.pack("!BQd", 7, 1, 0.0)))
            report.add_sent("sealed-bad-heartbeat", 2)
            report.add_expect("malformed", 2)
            out.append(self.seal_record(rng.choice([MsgType.PATH, MsgType.CANDIDATES]), rng.randbytes(100)))
            report.add_sent("sealed-unsolicited")
            report.add_expect("unsolicited")
        await self.send(out)
        out.clear()
        # A last valid marker: the victim has read everything above once this one arrives.
        await self._send_marker(report)

    async def attack_oversize(self, report: AttackReport) -> None:
        assert self.link is not None
        mtu = self.link.mtu
        limit = mtu + ETHERNET_OVERHEAD
        out: list[bytes] = []
        for size in (limit + 1, limit + 2, limit + 100, 2 * limit, MAX_MTU + ETHERNET_OVERHEAD + 1, MAX_PLAINTEXT):
            seq = self.seq()
            out.append(self.seal_data(marker(seq, "oversize", size)))
            report.rejected.append(seq)
            report.add_sent("oversize")
            report.add_expect("oversize")
        for size in range(MIN_ETHERNET_FRAME):
            out.append(self.seal_data(os.urandom(size)))
            report.add_sent("undersize")
            report.add_expect("undersize")
        # The same, inside a BUNDLE between two valid markers.
        seqs = [self.seq() for _ in range(3)]
        inner = [
            self.seal_data(marker(seqs[0], "oversize", 64)),
            self.seal_data(marker(seqs[1], "oversize", limit + 1)),
            self.seal_data(os.urandom(MIN_ETHERNET_FRAME - 1)),
            self.seal_data(marker(seqs[2], "oversize", 64)),
        ]
        out.append(self.bundle([w[SESSION_HEADER_SIZE:] for w in inner]))
        self.sent_data += [inner[0], inner[3]]
        report.valid += [seqs[0], seqs[2]]
        report.rejected.append(seqs[1])
        report.add_sent("bundle-mixed")
        report.add_sent("valid-marker", 2)
        report.add_expect("oversize")
        report.add_expect("undersize")
        await self.send(out)
        # The largest frame the MTU allows, and the smallest that carries a marker: both arrive.
        await self._send_marker(report, limit)
        await self._send_marker(report, MARKER_MIN)

    async def attack_flood(self, report: AttackReport) -> None:
        assert self.link is not None
        args = self.args
        deadline = self.now + args.flood_seconds
        first = self.next_seq
        sent = 0
        started = self.now
        while sent < args.flood_frames and self.now < deadline:
            batch = []
            for _ in range(min(FLOOD_BATCH, args.flood_frames - sent)):
                batch.append(self.seal_data(marker(self.seq(), "flood", 64)))
            if sent == 0:
                self.sent_data += batch[: args.count]  # the oldest records, for the replay attack
            sent += len(batch)
            await self.send(frames.bundle_data_frames(batch))
            await asyncio.sleep(0)  # let the reader answer the victim's heartbeats
        elapsed = self.now - started
        report.valid_range = (first, self.next_seq)
        report.add_sent("valid-marker", sent)
        report.note = f"{sent} frames in {elapsed:.2f} s ({sent / max(elapsed, 1e-6):.0f} frames/s)"

    async def attack_replay(self, report: AttackReport) -> None:
        rng, n = self.rng, self.args.count
        assert self.link is not None and self.link.session is not None
        # Fresh markers, then exact copies of each while they are still inside the window.
        fresh = [await self._send_marker(report) for _ in range(n)]
        out = list(fresh)
        report.add_sent("copy-in-window", len(fresh))
        report.add_expect("replay", len(fresh))
        out += frames.bundle_data_frames(fresh)
        report.add_sent("copy-bundled", len(fresh))
        report.add_expect("replay", len(fresh))
        # Validly sealed new content under counters already used: the counter decides.
        key = self._session_key()
        for wire in fresh:
            epoch, counter = _RECORD_HEADER.unpack_from(wire, SESSION_HEADER_SIZE)
            seq = self.seq()
            out.append(self.frame(MsgType.DATA, seal_as(key, MsgType.DATA, epoch, counter, marker(seq, "replay", 64))))
            report.rejected.append(seq)
            report.add_sent("resealed-old-counter")
            report.add_expect("replay")
        # Copies of records older than the replay window (if a flood moved it past them).
        highest = self._counter(fresh[-1])
        old = [w for w in self.sent_data if self._counter(w) + REPLAY_WINDOW_SIZE <= highest][:n]
        out += old
        report.add_sent("copy-too-old", len(old))
        report.add_expect("replay", len(old))
        # Our own heartbeats and replies, once more each.
        control = self.sent_control[-n:]
        out += control
        report.add_sent("copy-control", len(control))
        report.add_expect("replay", len(control))
        rng.shuffle(out)
        await self.send(out, genuine=False)
        await self._send_marker(report)

    async def attack_spoof(self, report: AttackReport) -> None:
        args = self.args
        if args.spoof_src is None or args.spoof_dst is None:
            report.note = "no --spoof-src/--spoof-dst: the victim has no direct path to aim at"
            return
        rng, n = self.rng, args.count
        head = frames.data_head(rng.randbytes(frames.SESSION_ID_SIZE))
        datagrams: list[tuple[str, bytes]] = []
        for _ in range(n):
            datagrams.append(("bad-frame", self._undecodable(rng)))
            record = forged_record(rng, 0, rng.randrange(MIN_SEALED_SIZE, 1200))
            datagrams.append(("forged-data", head + struct.pack("!H", len(record)) + record))
            datagrams.append(
                ("quic-junk", bytes([rng.randrange(0x40, 0x100)]) + rng.randbytes(rng.randrange(20, 1200)))
            )
            datagrams.append(("stun-junk", bytes([rng.randrange(0, 4)]) + rng.randbytes(rng.randrange(19, 200))))
        rng.shuffle(datagrams)
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
            for i, (what, payload) in enumerate(datagrams):
                raw.sendto(udp_packet(args.spoof_src, args.spoof_dst, payload), (args.spoof_dst[0], 0))
                report.add_sent(what)
                if i % SPOOF_BURST == SPOOF_BURST - 1:
                    await asyncio.sleep(SPOOF_PAUSE)
        # These land on the session of the peer whose address they carry, not on ours.
        report.add_expect("malformed-frame", report.sent.get("bad-frame", 0))
        report.add_expect("auth", report.sent.get("forged-data", 0))
        report.note = "expect counts apply to the spoofed peer's session at the victim"

    @staticmethod
    def _undecodable(rng: random.Random) -> bytes:
        """Our first byte, then framing that does not decode (cut short, a wrong length, a bad type)."""
        while True:
            bad = bytes([WIRE_VERSION]) + rng.randbytes(rng.randrange(0, 200))
            try:
                frames.decode(bad)
            except frames.FrameError:
                return bad

    async def attack_malformed(self, report: AttackReport) -> None:
        assert self.link is not None and self.relay is not None
        body = self.rng.randbytes(40)
        wire = bytes([WIRE_VERSION, MsgType.DATA]) + self.link.session_id + struct.pack("!H", len(body) + 10) + body
        await self.relay.send(wire)
        report.add_sent("overlong-length")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.refused.wait(), REFUSAL_TIMEOUT)
        report.note = self.relay_error or "the relay did not refuse it"

    # --- summary ---------------------------------------------------------------------------

    def _summary(self, reports: list[AttackReport]) -> dict[str, Any]:
        expect: dict[str, int] = {}
        for report in reports:
            if report.attack == "spoof":
                continue  # counted on another session
            for reason, count in report.expect.items():
                expect[reason] = expect.get(reason, 0) + count
        return {
            "event": "summary",
            "expect": expect,
            "valid": sum(len(valid_markers(r.as_json())) for r in reports),
            "rejected": sum(len(r.rejected) for r in reports),
            "received_frames": self.received_frames,
            "relay_error": self.relay_error,
        }


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--relay", required=True, help="wss://HOST:PORT of the relay")
    parser.add_argument("--ca", required=True, help="the relay's certificate")
    parser.add_argument("--network", required=True)
    parser.add_argument("--identity", required=True, help="this member's identity file")
    parser.add_argument("--victim", required=True, help="the victim's public key (base64)")
    parser.add_argument("--attacks", required=True, type=lambda s: [a for a in s.split(",") if a])
    parser.add_argument("--count", type=int, default=10, help="forgeries per kind in each attack")
    parser.add_argument("--flood-seconds", type=float, default=2.0)
    parser.add_argument("--flood-frames", type=int, default=20_000)
    parser.add_argument("--spoof-src", type=_hostport, help="IPv4:PORT the spoofed datagrams come from")
    parser.add_argument("--spoof-dst", type=_hostport, help="IPv4:PORT of the victim's direct path")
    parser.add_argument("--attack-timeout", type=float, default=20.0, help="seconds any one attack may take")
    parser.add_argument("--wait-timeout", type=float, default=60.0, help="seconds `wait` waits for stdin")
    parser.add_argument("--seed", type=int, default=None, help="random seed (for a reproducible run)")
    args = parser.parse_args(argv)
    known = {*ATTACK_IDS, "wait"}
    unknown = [a for a in args.attacks if a not in known]
    if unknown:
        parser.error(f"unknown attacks {unknown}; known: {sorted(known)}")
    if not 1 <= args.count <= MAX_COUNT:
        parser.error(f"--count must be 1..{MAX_COUNT}")
    if not 1 <= args.flood_frames <= MAX_FLOOD_FRAMES or not 0 < args.flood_seconds <= MAX_FLOOD_SECONDS:
        parser.error(f"the flood is bounded: at most {MAX_FLOOD_FRAMES} frames and {MAX_FLOOD_SECONDS:.0f} s")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)

    async def run() -> int:
        return await HostilePeer(args).run()

    try:
        return asyncio.run(run())
    except (HostileError, TimeoutError, OSError, RelayRefused, RelayUnavailable, argparse.ArgumentTypeError) as exc:
        emit({"event": "error", "reason": f"{type(exc).__name__}: {exc}"})
        return 1


def _iter_lines(text: str) -> Iterator[dict[str, Any]]:
    """The JSON events of a run's stdout (for tests that import this module). A last line without
    its newline is still being written, and is left for the next look."""
    for line in text.split("\n")[:-1]:
        line = line.strip()
        if line.startswith("{"):
            yield json.loads(line)


def valid_markers(report: dict[str, Any]) -> set[int]:
    """The sequence numbers of the valid markers an attack event reports (listed, or as a range)."""
    valid = set(report["valid"])
    if report.get("valid_range"):
        valid.update(range(*report["valid_range"]))
    return valid


def events(text: str, kind: str | None = None) -> list[dict[str, Any]]:
    """The events printed by a run, optionally only those whose "event" is ``kind``."""
    return [e for e in _iter_lines(text) if kind is None or e.get("event") == kind]


if __name__ == "__main__":
    sys.exit(main())
