"""A TAP device (python-pytun) read and written from an asyncio event loop without blocking it.

The node hands every Ethernet frame the kernel sends into the TAP to ``on_frames`` in
batches, and writes frames from peers with ``write``, which drops rather than blocks.
pytun is used only to create and configure the interface; frames move with ``os.read`` and
``os.write`` on its file descriptor, which raise the standard ``BlockingIOError``.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
from collections.abc import Callable

import pytun

log = logging.getLogger(__name__)

TUN_PATH = "/dev/net/tun"

#: Frames read per reader wakeup before yielding to the loop, so one busy TAP cannot
#: starve the sockets that carry the frames away.
READ_BATCH = 64

#: Ethernet header (14) plus one 802.1Q tag (4): the largest frame is mtu + 18 bytes.
#: A read with a smaller buffer truncates the frame silently (LIBRARY-NOTES.md).
FRAME_OVERHEAD = 18

#: Linux interface names are at most IFNAMSIZ - 1 bytes.
MAX_NAME = 15


class TapError(Exception):
    """The TAP device could not be created, configured or used; the message says why."""


def _open_error(name: str, exc: OSError) -> TapError:
    if exc.errno in (errno.EPERM, errno.EACCES):
        return TapError(f"not permitted to create TAP {name!r}: run as root (or with CAP_NET_ADMIN)")
    if exc.errno == errno.EBUSY:
        return TapError(f"TAP name {name!r} is taken by another interface or process: choose another name")
    if exc.errno == errno.ENOENT:
        return TapError(f"{TUN_PATH} is missing: load the tun module (modprobe tun) or expose it to the container")
    return TapError(f"cannot create TAP {name!r}: {exc}")


class TapDevice:
    """One non-persistent TAP interface (IFF_TAP | IFF_NO_PI: frames carry no extra header).

    Created up, with the given MTU and optional IPv4 address. The kernel deletes the
    interface when ``close()`` drops the last file descriptor.
    """

    def __init__(self, name: str, *, mtu: int, address: str | None = None, hwaddr: bytes | None = None) -> None:
        if not name or len(name.encode()) > MAX_NAME:
            raise TapError(f"bad TAP name {name!r}: 1 to {MAX_NAME} bytes")
        if not 68 <= mtu <= 65535:
            raise TapError(f"bad MTU {mtu}: IPv4 needs 68 to 65535")
        interface = None
        if address is not None:
            try:
                interface = ipaddress.ip_interface(address)
            except ValueError as exc:
                raise TapError(f"bad TAP address {address!r}: give IPv4 CIDR like 10.10.10.3/24") from exc
            if interface.version != 4 or "/" not in address:
                raise TapError(f"bad TAP address {address!r}: give IPv4 CIDR like 10.10.10.3/24")
        if not os.path.exists(TUN_PATH):
            raise TapError(f"{TUN_PATH} is missing: load the tun module (modprobe tun) or expose it to the container")

        try:
            self._dev = pytun.TunTapDevice(name=name, flags=pytun.IFF_TAP | pytun.IFF_NO_PI)
        except OSError as exc:  # pytun.Error is an OSError
            raise _open_error(name, exc) from exc
        try:
            if hwaddr is not None:
                if len(hwaddr) != 6:
                    raise OSError(f"a MAC address is 6 bytes, got {len(hwaddr)}")
                self._dev.hwaddr = hwaddr
            self._dev.mtu = mtu
            if interface is not None:
                self._dev.addr = str(interface.ip)
                self._dev.netmask = str(interface.netmask)
            self._dev.up()
        except OSError as exc:
            self._dev.close()
            raise TapError(f"cannot configure TAP {name!r} (mtu {mtu}, address {address}): {exc}") from exc

        self._fd = self._dev.fileno()
        self._mtu = mtu
        self._read_size = mtu + FRAME_OVERHEAD
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_frames: Callable[[list[bytes]], None] | None = None
        self._closed = False
        self._rx_frames = 0
        self._tx_frames = 0
        self._tx_dropped = 0

    @property
    def name(self) -> str:
        return str(self._dev.name)

    @property
    def mtu(self) -> int:
        return self._mtu

    def set_mtu(self, mtu: int) -> None:
        """Adopt the MTU the relay announced in ESTABLISHED."""
        if not 68 <= mtu <= 65535:
            raise TapError(f"bad MTU {mtu}: IPv4 needs 68 to 65535")
        try:
            self._dev.mtu = mtu
        except OSError as exc:
            raise TapError(f"cannot set MTU {mtu} on TAP {self.name!r}: {exc}") from exc
        self._mtu = mtu
        self._read_size = mtu + FRAME_OVERHEAD

    @property
    def hwaddr(self) -> bytes:
        """The interface's 6-byte MAC address (the kernel picks a random one)."""
        return bytes(self._dev.hwaddr)

    @property
    def rx_frames(self) -> int:
        """Frames read from the kernel and handed to ``on_frames``."""
        return self._rx_frames

    @property
    def tx_frames(self) -> int:
        """Frames written to the kernel."""
        return self._tx_frames

    @property
    def tx_dropped(self) -> int:
        """Frames ``write`` dropped because the kernel would have blocked or the link was down."""
        return self._tx_dropped

    def start(self, loop: asyncio.AbstractEventLoop, on_frames: Callable[[list[bytes]], None]) -> None:
        """Start reading: each time the fd is readable, up to READ_BATCH frames are passed to
        ``on_frames`` in one call. ``on_frames`` runs in the loop and must not block."""
        if self._closed:
            raise TapError(f"TAP {self.name} is closed")
        if self._loop is not None:
            raise TapError(f"TAP {self.name} is already started")
        os.set_blocking(self._fd, False)
        self._loop, self._on_frames = loop, on_frames
        loop.add_reader(self._fd, self._on_readable)

    def _on_readable(self) -> None:
        frames: list[bytes] = []
        while len(frames) < READ_BATCH:
            try:
                frame = os.read(self._fd, self._read_size)
            except BlockingIOError:
                break
            except OSError as exc:
                # E.g. EBADFD after someone deleted the interface: the fd stays readable
                # forever, so stop watching it instead of spinning the loop.
                log.error("TAP %s read failed, no longer reading: %s", self.name, exc)
                self._stop_reading()
                break
            if not frame:
                break
            frames.append(frame)
        if frames:
            self._rx_frames += len(frames)
            assert self._on_frames is not None
            self._on_frames(frames)

    def write(self, frame: bytes) -> None:
        """Hand one Ethernet frame to the kernel. Never blocks: when the kernel cannot take
        it now, the frame is dropped and counted, as a full NIC queue would."""
        if self._closed:
            raise TapError(f"TAP {self.name} is closed")
        try:
            os.write(self._fd, frame)
        except BlockingIOError:
            self._tx_dropped += 1
            return
        except OSError as exc:
            if exc.errno == errno.EIO:  # the kernel refuses frames while the link is down
                self._tx_dropped += 1
                return
            raise TapError(f"write to TAP {self.name} failed ({len(frame)} bytes): {exc}") from exc
        self._tx_frames += 1

    def _stop_reading(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        self._loop = None

    def close(self) -> None:
        """Stop reading and close the fd; the kernel then removes the interface. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop_reading()
        self._dev.close()
