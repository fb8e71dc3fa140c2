"""Batched UDP I/O for the socket of a direct path (Linux).

asyncio's datagram transport wakes the event loop once per received datagram
and sends one datagram per system call. On the data plane both costs are per
packet, and in Python they are most of what a packet costs. Once a direct path
is nominated, :class:`BatchedSocket` takes over that socket:

* reading: one wake-up of the loop drains up to READ_BATCH datagrams;
* sending: runs of equal-sized datagrams (a TCP stream through the tunnel is
  mostly full-sized frames) leave in one ``sendmsg`` with UDP generic
  segmentation offload (``UDP_SEGMENT``, Linux 4.18+): the kernel cuts the
  buffer into datagrams, each exactly what a separate ``sendto`` would have
  sent. If the kernel or the route refuses GSO, we fall back to one
  ``sendto`` per datagram for the rest of the socket's life.

The socket is shared with asyncio's transport (a duplicated descriptor), so
the transport can still send STUN (ICE consent) and close the socket; reads
are ours alone once :meth:`BatchedSocket.start` paused the transport's.
A datagram the kernel cannot queue now is dropped and counted, like a full
NIC queue: nothing waits or buffers without bound.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any

from transport.constants import MAX_FRAME_SIZE

log = logging.getLogger("traversal.udpio")

#: Datagrams drained per wake-up of the event loop (then other callbacks get their turn).
READ_BATCH = 64
#: Receive buffer: the largest frame we accept, plus one byte to notice a larger one.
RECV_SIZE = MAX_FRAME_SIZE + 1
#: Linux's UDP_SEGMENT socket option (linux/udp.h); not exported by Python's socket module.
UDP_SEGMENT = 103
#: Segments per GSO send (the kernel's UDP_MAX_SEGMENTS is 64 on older kernels).
MAX_GSO_SEGMENTS = 64
#: Bytes per GSO send: one IPv6 UDP datagram's payload limit, with room for headers.
MAX_GSO_BYTES = 65_000

Address = tuple[Any, ...]
OnDatagram = Callable[[bytes, Address], None]


class BatchedSocket:
    """Batched reads and segmented sends on an asyncio datagram transport's socket."""

    def __init__(self, transport: asyncio.DatagramTransport, on_datagram: OnDatagram) -> None:
        self._transport = transport
        self._on_datagram = on_datagram
        self._loop = asyncio.get_running_loop()
        original = transport.get_extra_info("socket")
        if original is None:
            raise OSError(errno.EBADF, "the transport has no socket")
        self._sock = socket.socket(fileno=os.dup(original.fileno()))
        self._sock.setblocking(False)
        self._fd = self._sock.fileno()
        self.gso = hasattr(socket, "SOL_UDP")
        self.sent = 0
        self.dropped = 0
        self.received = 0
        self._reading = False
        self.closed = False

    def start(self) -> None:
        """Read from now on in batches, instead of the transport."""
        if self._reading or self.closed:
            return
        self._transport.pause_reading()
        self._loop.add_reader(self._fd, self._on_readable)
        self._reading = True

    def _on_readable(self) -> None:
        recvfrom = self._sock.recvfrom
        on_datagram = self._on_datagram
        for _ in range(READ_BATCH):
            try:
                data, address = recvfrom(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # An ICMP error queued on the socket (port unreachable, ...): consent
                # checks decide whether the path is dead, not one error.
                continue
            self.received += 1
            on_datagram(data, address)

    def sendto(self, data: bytes, address: Address) -> bool:
        """Send one datagram now; False (and counted) if the kernel cannot take it."""
        try:
            self._sock.sendto(data, address)
        except OSError:
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def send_many(self, datagrams: Sequence[bytes], address: Address) -> int:
        """Send datagrams in order, equal-sized runs as one segmented send; returns how many were dropped."""
        if self.closed:
            self.dropped += len(datagrams)
            return len(datagrams)
        if not self.gso or len(datagrams) < 2:
            return sum(not self.sendto(data, address) for data in datagrams)
        dropped = 0
        count = len(datagrams)
        start = 0
        while start < count:
            size = len(datagrams[start])
            end = start + 1
            total = size
            # A run of equal sizes, and at most one shorter datagram to close it (GSO's rule).
            while end < count and end - start < MAX_GSO_SEGMENTS:
                following = len(datagrams[end])
                if following > size or total + following > MAX_GSO_BYTES:
                    break
                total += following
                end += 1
                if following < size:
                    break
            if end - start == 1:
                dropped += not self.sendto(datagrams[start], address)
            else:
                dropped += self._send_segmented(datagrams[start:end], size, address)
            start = end
        return dropped

    def _send_segmented(self, run: Sequence[bytes], size: int, address: Address) -> int:
        try:
            self._sock.sendmsg([b"".join(run)], [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))], 0, address)
        except (BlockingIOError, InterruptedError):
            self.dropped += len(run)
            return len(run)
        except OSError as exc:
            # No GSO here (old kernel, a route whose MTU is below the segment size, ...):
            # say so once and send one datagram per call from now on.
            self.gso = False
            log.info("event=udp_gso_off reason=%s", exc.strerror or exc)
            return sum(not self.sendto(data, address) for data in run)
        self.sent += len(run)
        return 0

    def close(self) -> None:
        """Stop reading and release our descriptor (the transport closes its own). Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self._reading and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        self._reading = False
        self._sock.close()
