"""The node's learning switch: which peer owns which MAC address.

A node's TAP is one port of an Ethernet segment whose other ports are its sessions, one
per peer. Like a bridge (IEEE 802.1D, section 7.8), the switch learns each source MAC
address from the frames a peer's session delivers, and a frame from the TAP goes to the
one peer that owns its destination; broadcast, multicast and unknown destinations go to
every peer (flooding), so ARP and IPv6 neighbour discovery work. A frame from a peer is
written to the TAP and never forwarded to another peer: in a full mesh every member
hears every other directly, so nothing needs forwarding, and nothing can loop.

Entries age out (802.1D's default is 300 s) and the table is bounded: when full, the
oldest entry goes. A lost entry only costs flooding. Sans-I/O: time comes in as an
argument. Ports are whatever identifies a peer (the node uses its identity key).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

P = TypeVar("P", bound=Hashable)

#: Seconds an address stays learnt without a frame from it (802.1D's recommended default).
DEFAULT_AGEING_S = 300.0
#: Addresses remembered at most (a peer sending random source addresses cannot grow it further).
DEFAULT_MAX_ENTRIES = 8192
#: A known address's timestamp is refreshed at most this often: the receive path stays cheap.
REFRESH_S = 1.0

ETHERNET_HEADER = 14


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


@dataclass
class SwitchCounters:
    learned: int = 0  # new addresses
    moved: int = 0  # an address seen from another peer than before
    evicted: int = 0  # dropped to stay within the bound
    aged: int = 0  # forgotten after the ageing time
    unicast: int = 0  # TAP frames sent to the one peer owning their destination
    flooded: int = 0  # TAP frames sent to every peer (broadcast, multicast, unknown)


class LearningSwitch(Generic[P]):
    def __init__(self, *, ageing: float = DEFAULT_AGEING_S, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if ageing <= 0 or max_entries < 1:
            raise ValueError("ageing must be positive and max_entries at least 1")
        self.ageing = ageing
        self.max_entries = max_entries
        #: MAC -> (port, last seen); insertion order is refresh order, so the first entry is the oldest.
        self._table: dict[bytes, tuple[P, float]] = {}
        self.counters = SwitchCounters()

    def __len__(self) -> int:
        return len(self._table)

    def learn(self, frame: bytes, port: P, now: float) -> None:
        """A frame ``port`` delivered: its source address lives behind ``port``."""
        if len(frame) < ETHERNET_HEADER or frame[6] & 1:
            return  # too short to carry one, or a group address (never a source)
        src = frame[6:12]
        entry = self._table.get(src)
        if entry is not None:
            if entry[0] == port and now - entry[1] < REFRESH_S:
                return
            del self._table[src]
            if entry[0] != port:
                self.counters.moved += 1
        else:
            self.counters.learned += 1
            if len(self._table) >= self.max_entries:
                del self._table[next(iter(self._table))]
                self.counters.evicted += 1
        self._table[src] = (port, now)

    def port_for(self, frame: bytes, now: float) -> P | None:
        """The one port owning ``frame``'s destination, or None: send it to every port."""
        dst = frame[:6]
        if not dst or dst[0] & 1:
            return None  # broadcast or multicast (or no header at all)
        entry = self._table.get(dst)
        if entry is None:
            return None
        if now - entry[1] > self.ageing:
            del self._table[dst]
            self.counters.aged += 1
            return None
        return entry[0]

    def forget(self, port: P) -> int:
        """The peer behind ``port`` left: forget its addresses; returns how many."""
        gone = [mac for mac, (owner, _) in self._table.items() if owner == port]
        for mac in gone:
            del self._table[mac]
        return len(gone)

    def addresses(self, port: P, now: float) -> list[str]:
        """The live addresses learnt behind ``port`` (for status output)."""
        return [
            format_mac(mac) for mac, (owner, seen) in self._table.items() if owner == port and now - seen <= self.ageing
        ]

    def expire(self, now: float) -> int:
        """Drop entries older than the ageing time (the oldest come first); returns how many."""
        expired = 0
        while self._table:
            mac, (_, seen) = next(iter(self._table.items()))
            if now - seen <= self.ageing:
                break
            del self._table[mac]
            expired += 1
        self.counters.aged += expired
        return expired
