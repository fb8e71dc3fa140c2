"""Who the relay lets in: a cap on clients, on logins in progress, and on failed logins per address.

Sans-I/O (addresses and times in, a refusal or None out), so the policy can be read
and tested apart from the sockets. The relay asks :meth:`Admission.connect` as soon
as a WebSocket is open, before it spends anything on the login (a signature check
costs far more than a refusal), and tells it how each login ended.

* ``max_clients``: authenticated clients at once. One more is refused with
  OVERLOADED (the client retries later with backoff) rather than let the process
  run out of file descriptors or memory, which would hurt every client.
* ``max_pending``: connections that have not finished logging in. They are also
  bounded in time (the relay's login timeout); this bounds their number, so a
  flood of silent connections cannot crowd out the members.
* ``failure_limit`` failed logins (wrong signature, not a member, unknown
  network, garbage) from one IP address within ``failure_window`` seconds: that
  address is refused until the window has passed. Addresses tracked are bounded
  (the oldest are forgotten first). A login fails only when it ends, so once an
  address has failed, its logins still in progress count against the limit too:
  otherwise every wave of concurrent logins would overshoot it by its size
  (bench/hostile_clients.md measured that). An address with no recent failure is
  not held to it, so a NAT full of honest clients may log in at once; the price is
  that an address's first wave can exceed the limit, by the logins it had in flight.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

#: Default limits (``traversal relay`` flags override them).
DEFAULT_MAX_CLIENTS = 20_000
DEFAULT_MAX_PENDING = 1_000
DEFAULT_FAILURE_LIMIT = 20
DEFAULT_FAILURE_WINDOW = 60.0
#: New WebSocket connections per second per IP address, and the burst allowed (0: no limit).
#: A node opens one and keeps it; a NAT of many users, or every node coming back after a relay
#: restart (with jitter), needs the burst.
DEFAULT_CONNECTION_RATE = 20.0
DEFAULT_CONNECTION_BURST = 100
#: IP addresses whose recent failures are remembered at most.
MAX_TRACKED_ADDRESSES = 65_536

#: Refusal reasons, as /metrics labels them.
REFUSED_FULL = "full"
REFUSED_PENDING = "pending"
REFUSED_FAILURES = "failures"
REFUSED_RATE = "rate"  # too many new connections from one address (before the WebSocket upgrade)
REFUSAL_REASONS = (REFUSED_FULL, REFUSED_PENDING, REFUSED_FAILURES, REFUSED_RATE)


class AdmissionError(ValueError):
    """A limit is out of range."""


@dataclass(frozen=True)
class Refusal:
    reason: str  # one of the REFUSED_* labels
    message: str  # for the client's ERROR frame and the log


@dataclass
class Admission:
    max_clients: int = DEFAULT_MAX_CLIENTS
    max_pending: int = DEFAULT_MAX_PENDING
    failure_limit: int = DEFAULT_FAILURE_LIMIT
    failure_window: float = DEFAULT_FAILURE_WINDOW
    pending: int = 0
    refused: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REFUSAL_REASONS, 0))
    _failures: OrderedDict[str, deque[float]] = field(default_factory=OrderedDict)
    #: Logins in progress per address (at most ``max_pending`` entries).
    _in_flight: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_clients < 1 or self.max_pending < 1 or self.failure_limit < 1 or self.failure_window <= 0:
            raise AdmissionError("relay limits must be positive (max clients, pending logins, failed logins, window)")

    def connect(self, ip: str, now: float, clients: int) -> Refusal | None:
        """A new connection from ``ip`` while ``clients`` are logged in: None admits it to log in
        (then call :meth:`login_ended`), else why not."""
        refusal = self._check(ip, now, clients)
        if refusal is not None:
            self.refused[refusal.reason] += 1
            return refusal
        self.pending += 1
        self._in_flight[ip] = self._in_flight.get(ip, 0) + 1
        return None

    def _check(self, ip: str, now: float, clients: int) -> Refusal | None:
        if clients >= self.max_clients:
            return Refusal(REFUSED_FULL, f"the relay is full ({self.max_clients} clients); try again later")
        if self.pending >= self.max_pending:
            return Refusal(REFUSED_PENDING, f"too many logins in progress ({self.max_pending}); try again later")
        recent = self._recent_failures(ip, now)
        in_flight = self._in_flight.get(ip, 0)
        if recent and len(recent) + in_flight >= self.failure_limit:
            retry = recent[0] + self.failure_window - now
            busy = f" and {in_flight} more logging in" if in_flight else ""
            return Refusal(
                REFUSED_FAILURES,
                f"{len(recent)} failed logins from {ip} in {self.failure_window:.0f} s{busy}; "
                f"try again in {retry:.0f} s",
            )
        return None

    def login_ended(self, ip: str, now: float, *, failed: bool) -> None:
        """The login of a connection :meth:`connect` let in is over; ``failed`` if it failed by the
        client's fault (a refusal, garbage, silence): that counts against its address."""
        self.pending -= 1
        left = self._in_flight.get(ip, 0) - 1
        if left > 0:
            self._in_flight[ip] = left
        else:
            self._in_flight.pop(ip, None)
        if failed:
            recent = self._recent_failures(ip, now)
            recent.append(now)
            self._failures[ip] = recent
            self._failures.move_to_end(ip)
            while len(self._failures) > MAX_TRACKED_ADDRESSES:
                self._failures.popitem(last=False)

    def _recent_failures(self, ip: str, now: float) -> deque[float]:
        recent = self._failures.get(ip)
        if recent is None:
            return deque()
        while recent and recent[0] <= now - self.failure_window:
            recent.popleft()
        if not recent:
            del self._failures[ip]
        return recent
