"""Sliding anti-replay window over 64-bit record counters (WireGuard / RFC 6479 style).

A receiver accepts each counter at most once, and only if it is newer than
the highest counter seen minus the window width; anything older is dropped as
a possible replay. The window is kept apart from the session (as wireguard-go
keeps ``replay/``) so it can be tested exhaustively on its own.

Callers must :meth:`ReplayWindow.check` before authenticating a record and
:meth:`ReplayWindow.update` only after the AEAD verified it: an unauthenticated
counter must never move the window, or a forger could slide it forward and
make every genuine record look "too old".
"""

from __future__ import annotations

from transport.constants import REPLAY_WINDOW_SIZE

#: Counters are 64-bit on the wire; this is the largest one a record can carry.
MAX_COUNTER = (1 << 64) - 1


class ReplayWindowError(ValueError):
    """The window was configured with an impossible width."""


class ReplayWindow:
    """Which of the last ``size`` counters below the highest one have been seen.

    The bitmap is one Python int: bit ``i`` set means counter ``highest - i``
    was accepted. RFC 6479 uses a ring of machine words so that advancing never
    shifts memory; in Python a shift of a 2048-bit int is one C loop over 32
    digits, cheaper than any ring bookkeeping done in bytecode.
    """

    __slots__ = ("_bits", "_highest", "_mask", "_size")

    def __init__(self, size: int = REPLAY_WINDOW_SIZE) -> None:
        if size < 1:
            raise ReplayWindowError(f"replay window width must be at least 1, got {size}")
        self._size = size
        self._mask = (1 << size) - 1
        self._highest = -1  # nothing seen yet: every valid counter is "newer"
        self._bits = 0

    @property
    def size(self) -> int:
        return self._size

    @property
    def highest(self) -> int | None:
        """Highest counter accepted so far, or None before the first one."""
        return None if self._highest < 0 else self._highest

    def check(self, counter: int) -> bool:
        """Would ``counter`` be accepted? Does not change the window."""
        highest = self._highest
        if counter > highest:
            return counter <= MAX_COUNTER
        offset = highest - counter
        if offset >= self._size or counter < 0:
            return False
        return not (self._bits >> offset) & 1

    def update(self, counter: int) -> bool:
        """Record ``counter`` as seen; False (and no change) for a duplicate or too old a counter."""
        highest = self._highest
        if counter > highest:
            if counter > MAX_COUNTER:
                return False
            shift = counter - highest
            # A jump of a whole window or more forgets everything older at once.
            self._bits = ((self._bits << shift) | 1) & self._mask if shift < self._size else 1
            self._highest = counter
            return True
        offset = highest - counter
        if offset >= self._size or counter < 0:
            return False
        bit = 1 << offset
        if self._bits & bit:
            return False
        self._bits |= bit
        return True
