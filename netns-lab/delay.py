"""Userspace link delay for the NAT lab: forwards every Ethernet frame between two
interfaces after a fixed one-way delay, because this kernel has no ``netem`` qdisc.

``Lab`` runs it inside ``P-dly-X``, spliced between nat-X's ``wan0`` and the WAN bridge::

    python delay.py --delay-ms 7 --relay-delay-ms 20 --relay 203.0.113.1 --relay 203.0.113.2 \
        --netns tv1a2b-dly-a lan0 wan0

The first interface faces the peer, the second the WAN. Frames whose far end (the
destination going out to the WAN, the source coming in from it) is a ``--relay`` address
wait ``--relay-delay-ms``; every other frame, ARP and anything unparseable included,
waits ``--delay-ms``. That is how the lab makes the relay path longer than the direct one.

It prints ``ready`` on stdout once both sockets are open, then forwards in both
directions until SIGTERM or SIGINT, until one of its interfaces disappears (a
neighbouring namespace was deleted) or until its own namespace is deleted; on the way
out it prints its counters on stderr. Standard library only: it must run with any
python that can run lab.py.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import os
import selectors
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

# linux/if_ether.h and linux/if_packet.h; Python's socket module does not export these.
ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
PACKET_STATISTICS = 6
PACKET_VNET_HDR = 15
PACKET_IGNORE_OUTGOING = 23
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
#: struct virtio_net_hdr, which PACKET_VNET_HDR puts in front of every frame.
VNET_HDR_LEN = 10
ETH_HDR_LEN = 14
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD

#: Index of the interface facing the WAN in ``Forwarder.ifnames`` (the other faces the peer).
WAN_SIDE = 1

#: Queue limits per direction. 10,000 frames is ~0.8 s of a 100 Mbit/s link at full size;
#: the byte limit matters for GSO frames (up to 64 KiB each), which this forwarder
#: passes whole. A full queue drops the new frame, like a router's tail drop.
MAX_QUEUED_FRAMES = 10_000
MAX_QUEUED_BYTES = 32 * 1024 * 1024

#: Large enough for any GSO frame a veth hands over (64 KiB plus headers).
RECV_BUFFER_BYTES = 256 * 1024
#: Frames read from one socket per wakeup, so a flood in one direction cannot hold
#: back frames due in the other.
READ_BATCH = 64
#: A 64 KiB GSO frame per slot: the default 208 KiB socket buffer would hold only three.
SOCKET_BUFFER_BYTES = 8 * 1024 * 1024
#: How often to check that our namespace still has a name (``ip netns del`` does not
#: destroy a namespace a process still lives in, so nothing else would tell us).
NETNS_CHECK_INTERVAL_S = 1.0

#: errno values meaning the interface a socket is bound to went down or away.
_LINK_GONE = (errno.ENETDOWN, errno.ENODEV, errno.ENXIO)


class DelayError(Exception):
    """The forwarder cannot start; the message says what to fix."""


@dataclass
class DelayLine:
    """Frames of one direction waiting out a fixed delay. No I/O: callers pass the clock.

    The delay is the same for every frame, so release order is arrival order and a
    FIFO is already sorted by release time: no heap needed, and order is preserved.
    """

    delay_s: float
    max_frames: int = MAX_QUEUED_FRAMES
    max_bytes: int = MAX_QUEUED_BYTES
    accepted: int = 0
    dropped: int = 0
    queued_bytes: int = 0
    _queue: collections.deque[tuple[float, bytes]] = field(default_factory=collections.deque)

    def offer(self, frame: bytes, now: float) -> bool:
        """Queue ``frame`` (arrived at ``now``); False, and counted, if the queue is full."""
        if len(self._queue) >= self.max_frames or self.queued_bytes + len(frame) > self.max_bytes:
            self.dropped += 1
            return False
        self._queue.append((now + self.delay_s, frame))
        self.queued_bytes += len(frame)
        self.accepted += 1
        return True

    def next_release(self) -> float | None:
        """When the oldest queued frame is due, or None if nothing is queued."""
        return self._queue[0][0] if self._queue else None

    def pop_due(self, now: float) -> list[bytes]:
        """Remove and return, oldest first, every frame due at or before ``now``."""
        due = []
        while self._queue and self._queue[0][0] <= now:
            frame = self._queue.popleft()[1]
            self.queued_bytes -= len(frame)
            due.append(frame)
        return due

    def pop_oldest(self) -> bytes:
        """Remove and return the oldest queued frame, due or not."""
        frame = self._queue.popleft()[1]
        self.queued_bytes -= len(frame)
        return frame

    def __len__(self) -> int:
        return len(self._queue)


def far_end_address(frame: bytes, *, from_wan: bool, offset: int = 0) -> bytes | None:
    """The packed IPv4 or IPv6 address of the far end of the Ethernet frame starting at
    ``offset``: its source if it came from the WAN, its destination if it goes there.

    None for ARP, VLAN-tagged, truncated or otherwise unparseable frames: their callers
    give them the ordinary (peer) delay. Pure: no I/O, no state.
    """
    ip = offset + ETH_HDR_LEN
    if len(frame) < ip + 1:
        return None
    ethertype = int.from_bytes(frame[ip - 2 : ip], "big")
    version = frame[ip] >> 4
    if ethertype == ETH_P_IP and version == 4 and len(frame) >= ip + 20:
        start = ip + (12 if from_wan else 16)  # RFC 791: source at 12, destination at 16
        return bytes(frame[start : start + 4])
    if ethertype == ETH_P_IPV6 and version == 6 and len(frame) >= ip + 40:
        start = ip + (8 if from_wan else 24)  # RFC 8200: source at 8, destination at 24
        return bytes(frame[start : start + 16])
    return None


def pack_address(text: str) -> bytes:
    """``"203.0.113.1"`` or ``"2001:db8::1"`` as the bytes found in a packet header."""
    for family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            return socket.inet_pton(family, text)
    raise DelayError(f"bad relay address {text!r}: use an IPv4 or IPv6 address")


class ClassifiedDelayLine:
    """One direction of the link: relay frames and all others wait in separate FIFOs,
    each with its own delay. No I/O: callers classify the frame and pass the clock.

    Two FIFOs keep order within each class and still need no heap: ``pop_due`` releases
    from whichever head is due first. The queue limits apply to both together, so the
    link as a whole holds at most ``max_frames`` frames and ``max_bytes`` per direction.
    """

    def __init__(
        self,
        delay_s: float,
        relay_delay_s: float,
        max_frames: int = MAX_QUEUED_FRAMES,
        max_bytes: int = MAX_QUEUED_BYTES,
    ) -> None:
        self.peer = DelayLine(delay_s, max_frames, max_bytes)
        self.relay = DelayLine(relay_delay_s, max_frames, max_bytes)
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        #: Frames lost before reaching a queue: queue full, oversize, unreadable.
        self.dropped = 0

    @property
    def queued_bytes(self) -> int:
        return self.peer.queued_bytes + self.relay.queued_bytes

    def offer(self, frame: bytes, now: float, *, relay: bool) -> bool:
        """Queue ``frame`` in its class; False, and counted, if the link is full."""
        if len(self) >= self.max_frames or self.queued_bytes + len(frame) > self.max_bytes:
            self.dropped += 1
            return False
        return (self.relay if relay else self.peer).offer(frame, now)

    def next_release(self) -> float | None:
        """When the earliest queued frame of either class is due, or None if none is queued."""
        times = [t for t in (self.peer.next_release(), self.relay.next_release()) if t is not None]
        return min(times, default=None)

    def pop_due(self, now: float) -> list[bytes]:
        """Remove and return every frame due at or before ``now``, in release-time order."""
        due = []
        while True:
            heads = [(t, line) for line in (self.peer, self.relay) if (t := line.next_release()) is not None]
            if not heads:
                return due
            when, line = min(heads, key=lambda head: head[0])
            if when > now:
                return due
            due.append(line.pop_oldest())

    def __len__(self) -> int:
        return len(self.peer) + len(self.relay)


def open_packet_socket(ifname: str) -> socket.socket:
    """A non-blocking raw socket seeing every frame that arrives on ``ifname``."""
    try:
        ifindex = socket.if_nametoindex(ifname)
    except OSError as exc:
        raise DelayError(f"no interface {ifname!r} in this namespace") from exc
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        # Frames come with a virtio_net_hdr saying "checksum not filled in yet" and "this
        # is a GSO super-frame"; passing it back on send lets the kernel finish both.
        # Without it, veth's offloaded checksums would leave the forwarder wrong, and
        # super-frames bigger than the MTU could not be sent at all.
        sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        with contextlib.suppress(OSError):  # Linux >= 4.20; sll_pkttype is checked anyway
            sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        for option, fallback in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
            except PermissionError:  # without CAP_NET_ADMIN: as much as rmem_max allows
                sock.setsockopt(socket.SOL_SOCKET, fallback, SOCKET_BUFFER_BYTES)
        sock.bind((ifname, ETH_P_ALL))
        # struct packet_mreq: frames for other MACs must reach us too; a wire forwards all.
        mreq = struct.pack("iHH8s", ifindex, PACKET_MR_PROMISC, 0, b"")
        sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise DelayError(f"cannot open a packet socket on {ifname}: {exc} (needs root)") from exc
    return sock


def _netns_inode() -> tuple[int, int]:
    st = os.stat("/proc/self/ns/net")
    return st.st_dev, st.st_ino


class Forwarder:
    """Forwards frames between two interfaces of this namespace, each direction delayed:
    by ``relay_delay_s`` for frames to or from ``relay_addresses``, by ``delay_s`` for the
    rest. ``ifnames`` is (peer side, WAN side)."""

    def __init__(
        self,
        ifnames: tuple[str, str],
        delay_s: float,
        *,
        relay_delay_s: float | None = None,
        relay_addresses: Iterable[bytes] = (),
        netns: str | None = None,
        max_frames: int = MAX_QUEUED_FRAMES,
        max_bytes: int = MAX_QUEUED_BYTES,
    ) -> None:
        self.ifnames = ifnames
        self.netns = netns
        self.relay_addresses = frozenset(relay_addresses)
        if netns is not None and self._netns_renamed_or_gone():
            raise DelayError(f"not running inside namespace {netns} (use `ip netns exec {netns}`)")
        self.socks = [open_packet_socket(name) for name in ifnames]
        relay_delay = delay_s if relay_delay_s is None else relay_delay_s
        # lines[i] holds frames read on interface i, to be sent on the other one.
        self.lines = [ClassifiedDelayLine(delay_s, relay_delay, max_frames, max_bytes) for _ in ifnames]
        self.sent = [0, 0]
        self.send_errors = [0, 0]
        self.kernel_drops = [0, 0]
        self.stop_reason: str | None = None
        self._buf = bytearray(RECV_BUFFER_BYTES)
        self._view = memoryview(self._buf)

    def _netns_renamed_or_gone(self) -> bool:
        try:
            st = os.stat(f"/run/netns/{self.netns}")
        except FileNotFoundError:
            return True
        return (st.st_dev, st.st_ino) != _netns_inode()

    def _links_present(self) -> bool:
        try:
            for name in self.ifnames:
                socket.if_nametoindex(name)
        except OSError:
            return False
        return True

    def _read(self, side: int, now: float) -> None:
        sock, line = self.socks[side], self.lines[side]
        for _ in range(READ_BATCH):
            try:
                # MSG_TRUNC makes the return value the frame's real length.
                size, address = sock.recvfrom_into(self._view, 0, socket.MSG_TRUNC)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _LINK_GONE:
                    # Reported once per down/unregister; only a vanished link ends us.
                    if not self._links_present():
                        self.stop_reason = f"interface {self.ifnames[side]} went away"
                    return
                if exc.errno == errno.EINVAL:
                    # The kernel could not describe a frame's offloads in a virtio_net_hdr
                    # (e.g. a tunnel GSO type): the frame is consumed; count it lost.
                    line.dropped += 1
                    continue
                raise
            # Our own transmissions come back as PACKET_OUTGOING: forwarding them would loop.
            if address[2] == socket.PACKET_OUTGOING:
                continue
            if size > len(self._buf):
                line.dropped += 1
                continue
            frame = bytes(self._view[:size])
            relay = bool(self.relay_addresses) and (
                far_end_address(frame, from_wan=side == WAN_SIDE, offset=VNET_HDR_LEN) in self.relay_addresses
            )
            line.offer(frame, now, relay=relay)

    def _release(self, now: float) -> None:
        for side, line in enumerate(self.lines):
            out = self.socks[1 - side]
            for frame in line.pop_due(now):
                try:
                    out.send(frame)
                    self.sent[side] += 1
                except OSError as exc:
                    # ENOBUFS/EAGAIN: the peer's backlog is full; a real link loses it too.
                    if exc.errno in _LINK_GONE and not self._links_present():
                        self.stop_reason = f"interface {self.ifnames[1 - side]} went away"
                        return
                    self.send_errors[side] += 1

    def _collect_kernel_drops(self) -> None:
        for side, sock in enumerate(self.socks):
            with contextlib.suppress(OSError):
                # struct tpacket_stats; reading it resets the kernel's counters.
                _, drops = struct.unpack("II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
                self.kernel_drops[side] += drops

    def run(self, ready: Callable[[], None] | None = None) -> str:
        """Forward until stopped; calls ``ready`` once listening. Returns why it stopped."""
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)

        def on_signal(signum: int, _frame: object) -> None:
            self.stop_reason = signal.Signals(signum).name

        old_wakeup = signal.set_wakeup_fd(wake_w.fileno())
        old_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        sel = selectors.DefaultSelector()
        try:
            for side, sock in enumerate(self.socks):
                sel.register(sock, selectors.EVENT_READ, side)
            sel.register(wake_r, selectors.EVENT_READ, None)
            if ready is not None:
                ready()
            next_check = time.monotonic() + NETNS_CHECK_INTERVAL_S
            while self.stop_reason is None:
                now = time.monotonic()
                self._release(now)
                deadlines = [t for t in (line.next_release() for line in self.lines) if t is not None]
                timeout = max(0.0, min([next_check, *deadlines]) - now)
                for key, _ in sel.select(timeout):
                    if key.data is None:
                        with contextlib.suppress(BlockingIOError):
                            wake_r.recv(64)
                    else:
                        self._read(key.data, time.monotonic())
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + NETNS_CHECK_INTERVAL_S
                    if self.netns is not None and self._netns_renamed_or_gone():
                        self.stop_reason = f"namespace {self.netns} was deleted"
                    elif not self._links_present():
                        self.stop_reason = "an interface went away"
            return self.stop_reason or "stopped"
        finally:
            self._collect_kernel_drops()
            sel.close()
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            wake_r.close()
            wake_w.close()
            for sock in self.socks:
                sock.close()

    def summary(self) -> str:
        """Per-direction counters, one line."""
        parts = []
        for side, line in enumerate(self.lines):
            arrow = f"{self.ifnames[side]}->{self.ifnames[1 - side]}"
            parts.append(
                f"{arrow}: {self.sent[side]} forwarded ({line.relay.accepted} with the relay delay), "
                f"{line.dropped} dropped (queue full/oversize), "
                f"{self.send_errors[side]} send errors, {self.kernel_drops[side]} kernel drops, "
                f"{len(line)} still queued"
            )
        return "; ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="delay.py", description=__doc__.splitlines()[0])
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay, each direction")
    parser.add_argument(
        "--relay-delay-ms", type=float, help="one-way delay to/from a --relay address (default: --delay-ms)"
    )
    parser.add_argument(
        "--relay", action="append", default=[], metavar="ADDR", help="a relay address (IPv4 or IPv6; repeatable)"
    )
    parser.add_argument("--netns", help="exit when this named namespace (ours) is deleted")
    parser.add_argument("--max-frames", type=int, default=MAX_QUEUED_FRAMES, help="queue limit per direction")
    parser.add_argument("ifname", nargs=2, help="the two interfaces to join: the peer side, then the WAN side")
    args = parser.parse_args(argv)
    if args.delay_ms < 0 or (args.relay_delay_ms or 0) < 0 or args.max_frames < 1:
        parser.error("--delay-ms and --relay-delay-ms must be >= 0 and --max-frames >= 1")
    try:
        relay_addresses = [pack_address(text) for text in args.relay]
    except DelayError as exc:
        parser.error(str(exc))

    def ready() -> None:
        print("ready", flush=True)

    try:
        forwarder = Forwarder(
            (args.ifname[0], args.ifname[1]),
            args.delay_ms / 1000,
            relay_delay_s=None if args.relay_delay_ms is None else args.relay_delay_ms / 1000,
            relay_addresses=relay_addresses,
            netns=args.netns,
            max_frames=args.max_frames,
        )
        reason = forwarder.run(ready)
    except DelayError as exc:
        print(f"delay.py: {exc}", file=sys.stderr)
        return 1
    # Whoever started us may be long gone (the lab outlives `lab.py up`): never fail on a
    # closed stderr.
    with contextlib.suppress(OSError):
        print(f"delay.py: stopped ({reason}); {forwarder.summary()}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
