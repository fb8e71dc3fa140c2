"""A token bucket per source address, for traffic the relay answers without a login (STUN).

Sans-I/O: ``allow(ip, now)`` says whether one more request from ``ip`` fits its bucket
(``rate`` per second, up to ``burst`` at once). The table of sources is bounded: the
least recently seen are forgotten first, which only ever lets a forgotten source start
again with a full bucket.
"""

from __future__ import annotations

from collections import OrderedDict

#: STUN Binding requests per second per source IP address, and the burst allowed. A peer's
#: gathering and `traversal probe` send a few dozen at most; a NAT of many users shares one
#: address, hence the room.
DEFAULT_STUN_RATE = 50.0
DEFAULT_STUN_BURST = 200
#: Source addresses remembered at most.
MAX_SOURCES = 65_536


class RateLimiter:
    def __init__(self, rate: float = DEFAULT_STUN_RATE, burst: int = DEFAULT_STUN_BURST) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a rate limit needs a positive rate and a burst of at least 1")
        self.rate = rate
        self.burst = float(burst)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # ip -> (tokens, when)

    def allow(self, ip: str, now: float) -> bool:
        tokens, then = self._buckets.get(ip, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[ip] = (tokens - 1.0 if allowed else tokens, now)
        self._buckets.move_to_end(ip)
        if len(self._buckets) > MAX_SOURCES:
            self._buckets.popitem(last=False)
        return allowed
