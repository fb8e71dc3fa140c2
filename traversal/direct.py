"""DirectPathManager: from the relay path to a direct QUIC path for one peer (the seed's Story 2).

After ESTABLISHED, both peers gather ICE candidates (host, server-reflexive,
predicted), exchange them end-to-end encrypted through the relay (CANDIDATES
records), let aioice find a working pair, run a QUIC connection over it
(``transport/wsquic.py``, certificate pinned through the CANDIDATES exchange)
and validate the path with a PROBE / PROBE_ACK in both directions
(``transport/paths.py``). Only then does traffic move. If nothing works within
the deadline the session stays on the relay and the attempt is retried later
with fresh candidates.

Roles are fixed by identity order (the handshake initiator): the controlling
side drives attempts (it starts them and retries them) and is the QUIC client;
the controlled side answers each attempt it hears about and is the QUIC
server, so its offer carries the certificate fingerprint the client pins.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from transport.certs import make_session_certificate
from transport.constants import (
    DIRECT_DEAD_AFTER,
    DIRECT_KEEPALIVE_INTERVAL,
    DIRECT_RELEASE_LINGER,
    ICE_GATHER_TIMEOUT,
    RELAY_CHECKIN_INTERVAL,
    WIRE_VERSION,
)
from transport.frames import MsgType
from transport.paths import (
    DirectRequested,
    PathError,
    PathMsg,
    PathValidated,
    PeerFellBack,
    PeerSwitched,
    RelayRequested,
    encode_path,
)
from transport.wsquic import (
    Connected,
    ConnectionClosed,
    ControlBacklogFullError,
    ControlFrameReceived,
    DatagramFrameReceived,
    WsQuicConnection,
    WsQuicError,
)
from traversal.candidates import CandidateError, CandidateOffer, decode_offer, encode_offer, observed_candidates
from traversal.ice import IceAgent, IceFailed, NominatedPair
from traversal.logfmt import log_event
from traversal.peer import LinkState, PeerLink

log = logging.getLogger("traversal.direct")

#: Path switches kept per peer for `traversal status`.
PATH_HISTORY = 8


@dataclass
class DirectSettings:
    """The user's direct-path options (``traversal connect`` flags)."""

    enabled: bool = True
    timeout: float = 5.0
    retry: float = 60.0
    stun_server: tuple[str, int] | None = None
    port_range: tuple[int, int] | None = None
    exclude_addresses: frozenset[str] = field(default_factory=frozenset)
    standby: str = "close"  # what to do with the relay connection once every peer is direct
    checkin: float = RELAY_CHECKIN_INTERVAL  # once it is closed, log in again this often (0: never)
    carriage: str = "lean"  # how DATA travels on a direct path: "lean" (sealed UDP) or "quic" (QUIC datagrams)


class DirectCarriage:
    """A nominated ICE pair carrying one QUIC connection: pumps datagrams and QUIC timers.

    QUIC validates the path, pins the peer's certificate and carries the path's
    control records. DATA takes one of two carriages (DESIGN.md, "Direct path"):

    * lean (default): each sealed DATA frame is one UDP datagram on the ICE 5-tuple,
      as it is, with no QUIC around it. Its first byte is WIRE_VERSION (0x0A), which
      is neither STUN (0-3) nor QUIC (0x40-0xFF, the fixed bit), so one socket
      carries all three (RFC 9443's demultiplexing). The session's AEAD and replay
      window protect these frames exactly as they do on the relay.
    * quic: DATA in QUIC DATAGRAM frames (about 4x the per-packet CPU in pure Python).

    Whichever carriage the peer sends with, both are always received.
    """

    def __init__(
        self,
        agent: IceAgent,
        quic: WsQuicConnection,
        *,
        on_frame: Callable[[bytes], None],
        on_connected: Callable[[], None],
        on_closed: Callable[[str], None],
        lean: bool = True,
    ) -> None:
        self._agent = agent
        self.quic = quic
        self.lean = lean
        self._loop = asyncio.get_running_loop()
        self._on_frame = on_frame
        self._on_connected = on_connected
        self._on_closed = on_closed
        self._timer: asyncio.TimerHandle | None = None
        self.closed = False

    def start(self) -> None:
        self._agent.set_receiver(self._on_udp)
        if self.quic.is_client:
            self.quic.connect(self._loop.time())
        self._flush()

    def _on_udp(self, data: bytes) -> None:
        if data[0] == WIRE_VERSION:  # a lean DATA frame: the session authenticates it
            self._on_frame(data)
            return
        self.quic.receive_datagram(data, self._loop.time())
        self._process()
        self._flush()

    def _process(self) -> None:
        while (event := self.quic.next_event()) is not None:
            if isinstance(event, (ControlFrameReceived, DatagramFrameReceived)):
                self._on_frame(event.frame)
            elif isinstance(event, Connected):
                self._on_connected()
            elif isinstance(event, ConnectionClosed) and not self.closed:
                self.closed = True
                self._on_closed(event.reason)

    def _flush(self) -> None:
        for datagram in self.quic.datagrams_to_send(self._loop.time()):
            self._agent.send(datagram)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.quic.get_timer()
        if deadline is not None and not self.closed:
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.quic.handle_timer(self._loop.time())
        self._process()
        self._flush()

    def send(self, wire: list[bytes]) -> int:
        """Send wire frames (DATA as QUIC datagrams, the rest on the control stream); returns drops."""
        # One flush for the whole batch: the TAP hands frames over in batches.
        dropped = 0
        if self.lean:
            data_frames = [data for data in wire if data[1] == MsgType.DATA]
            dropped = self._agent.send_many(data_frames)
            if len(data_frames) == len(wire):
                return dropped
            wire = [data for data in wire if data[1] != MsgType.DATA]
        for data in wire:
            try:
                if data[1] == MsgType.DATA and len(data) <= self.quic.max_datagram_payload:
                    dropped += not self.quic.send_datagram(data)
                else:
                    # Control records, and any frame too big for one datagram (an overlay
                    # MTU above the default), go on the reliable stream rather than be lost.
                    self.quic.send_control(data)
            except (ControlBacklogFullError, WsQuicError):
                dropped += 1
        self._flush()
        return dropped

    async def close(self, reason: str) -> None:
        if not self.quic.closed:
            self.quic.close(reason)
            self._flush()
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        await self._agent.close()


#: How long an attempt behind a sequentially allocating NAT keeps the node's gathering turn at
#: most: long enough for the peer's offer and our first checks, short enough that a silent peer
#: delays the node's other attempts by little.
SEQUENTIAL_TURN_S = 1.0
#: How long an attempt waits for the node's first NAT measurement before gathering anyway.
FIRST_TURN_WAIT_S = 1.0
#: Retries come up to this fraction of the retry interval early, at random.
RETRY_JITTER = 0.2


class GatheringTurns:
    """A node's turns at gathering candidates, shared by its DirectPathManagers.

    Behind a NAT that allocates ports in sequence, the ports an attempt predicts are the next ones
    the NAT hands out, so another attempt of the same node must not take them (by its own STUN
    queries, or by opening its mappings) before they are used: such attempts take turns. Whether
    the NAT is like that is known from the last gathering (``sequential``); until the first one,
    attempts take turns too. Behind any other NAT, or with no STUN answer at all, they run at once.
    """

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.sequential: bool | None = None  # None: not measured yet


class _Turn:
    """One hold of a node's gathering lock, given back exactly once: at once, or after a delay."""

    def __init__(self, lock: asyncio.Lock, loop: asyncio.AbstractEventLoop) -> None:
        self._lock = lock
        self._loop = loop
        self._held = False
        self._timer: asyncio.TimerHandle | None = None

    async def take(self) -> None:
        await self._lock.acquire()
        self._held = True

    def give_back(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._held:
            self._held = False
            self._lock.release()

    def give_back_after(self, delay: float) -> None:
        if self._held and self._timer is None:
            self._timer = self._loop.call_later(delay, self.give_back)


class DirectPathManager:
    """Gets and keeps a direct path for one PeerLink; the node owns the I/O it asks for."""

    def __init__(
        self,
        link: PeerLink,
        settings: DirectSettings,
        *,
        send_relay: Callable[[list[bytes]], None],
        deliver: Callable[[PeerLink, bytes], None],
        on_change: Callable[[PeerLink], None],
        observed_peer_ip: str | None,
        log_drop: Callable[..., None] | None = None,
        gathering: GatheringTurns | None = None,
    ) -> None:
        self.link = link
        #: Shared by a node's managers: one attempt at a time gathers and opens its first mappings
        #: (see :meth:`_run_attempt`).
        self._gathering = gathering or GatheringTurns()
        #: How a rejected record from the peer is logged: the node passes its rate-limited logger
        #: (a member sending bad candidates or path messages by the thousand must not flood the log).
        self._log_drop = log_drop or (lambda name, **fields: log_event(log, name, logging.WARNING, **fields))
        self.settings = settings
        self._send_relay = send_relay
        self._deliver = deliver
        self._on_change = on_change
        self._observed_ip = observed_peer_ip
        self._loop = asyncio.get_running_loop()
        self.controlling = link.initiator
        self.session_tag = link.session_tag  # the end-to-end session this manager serves
        self.state = "idle"
        self.attempt = 0
        self.attempts_made = 0
        self.last_error: str | None = None
        self.nominated: NominatedPair | None = None
        self.time_to_direct: float | None = None
        self.carriage: DirectCarriage | None = None
        self._task: asyncio.Task[None] | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._offers: dict[int, asyncio.Future[CandidateOffer]] = {}
        self._connected: asyncio.Future[None] | None = None
        self._validated: asyncio.Future[float] | None = None
        self._established_at = self._loop.time()
        self.next_retry_at: float | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        #: The user asked for the relay (`traversal path relay`): no attempts until asked otherwise.
        self.pinned_relay = False
        #: The last few path switches, newest last, for `traversal status`.
        self.history: deque[dict[str, object]] = deque(maxlen=PATH_HISTORY)

    # --- entry points ------------------------------------------------------------------

    def start(self) -> None:
        """Called once the relay said ESTABLISHED."""
        self._established_at = self._loop.time()
        if self.controlling:
            self._begin(self.attempt + 1)
        else:
            self.state = "waiting-offer"

    def on_candidates(self, plaintext: bytes) -> None:
        try:
            offer = decode_offer(plaintext)
        except CandidateError as exc:
            self.link.count_drop("bad-candidates")
            self._log_drop("candidates_rejected", peer=self.link.peer_name, reason=str(exc))
            return
        if not self.controlling and offer.attempt > self.attempt:
            self.pinned_relay = False  # a new attempt means the pin was lifted on the other side
            self._begin(offer.attempt)  # the controlling side started a new attempt: follow it
        future = self._offers.get(offer.attempt)
        if future is not None and not future.done():
            future.set_result(offer)

    def on_path(self, plaintext: bytes) -> None:
        now = self._loop.time()
        try:
            replies, events = self.link.paths.on_message(plaintext, now)
        except PathError as exc:
            self.link.count_drop("bad-path-message")
            self._log_drop("path_message_dropped", peer=self.link.peer_name, reason=str(exc))
            return
        if replies:
            self._send_direct_path(replies, now)
        for event in events:
            if isinstance(event, PathValidated):
                if self._validated is not None and not self._validated.done():
                    self._validated.set_result(event.rtt)
            elif isinstance(event, PeerSwitched):
                log_event(log, "peer_switched", peer=self.link.peer_name, session=self.link.sid, path="direct")
                self._on_change(self.link)
            elif isinstance(event, PeerFellBack):
                log_event(log, "peer_fell_back", peer=self.link.peer_name, session=self.link.sid)
                if self.state == "direct":
                    # After an agreed release the peer's last direct frames may still be in
                    # flight: keep receiving on the direct path a moment (make-before-break).
                    self._direct_lost("the peer moved to the relay", linger=DIRECT_RELEASE_LINGER)
            elif isinstance(event, RelayRequested):
                log_event(log, "relay_requested", peer=self.link.peer_name, session=self.link.sid, by="peer")
                self.pinned_relay = True
                self._on_change(self.link)
            elif isinstance(event, DirectRequested):
                self.pinned_relay = False
                if self.controlling and self.state != "direct" and not (self._task and not self._task.done()):
                    self._begin(self.attempt + 1)

    def send_direct(self, wire: list[bytes]) -> int:
        """Send wire frames on the direct carriage; returns how many were dropped."""
        if self.carriage is None or self.carriage.closed:
            return len(wire)
        return self.carriage.send(wire)

    async def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        if self._keepalive is not None:
            self._keepalive.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self._drop_carriage("closing")

    # --- attempts ----------------------------------------------------------------------

    def _begin(self, attempt: int) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self.next_retry_at = None
        self.attempt = attempt
        self._offers = {attempt: self._loop.create_future()}
        self._task = self._loop.create_task(self._run_attempt(attempt))

    async def _run_attempt(self, attempt: int) -> None:
        link = self.link
        self.attempts_made += 1
        started = self._loop.time()
        deadline = started + self.settings.timeout
        agent: IceAgent | None = None
        turns = self._gathering
        turn = _Turn(turns.lock, self._loop)
        log_event(log, "direct_attempt", peer=link.peer_name, session=link.sid, attempt=attempt)
        try:
            self.state = "gathering"
            agent = IceAgent(
                controlling=self.controlling,
                stun_server=self.settings.stun_server,
                port_range=self.settings.port_range,
                exclude_addresses=self.settings.exclude_addresses,
            )
            # Gathering counts against the attempt's deadline too (STUN may get no answer).
            # Behind a sequentially allocating NAT, attempts take turns (see GatheringTurns); one
            # holds its turn until its first checks are out, for a bounded time (a peer slow to
            # answer must not stall every other attempt of the node).
            if turns.sequential is not False:
                # Unknown yet: wait for the first measurement briefly (a STUN server that never
                # answers must not hold every attempt up; a NAT that numbers ports in sequence
                # answers fast). Known to be sequential: wait our turn, within our deadline.
                wait = FIRST_TURN_WAIT_S if turns.sequential is None else max(0.0, deadline - self._loop.time())
                try:
                    async with asyncio.timeout(wait):
                        await turn.take()
                except TimeoutError:
                    pass  # go on without a turn
                if turns.sequential is False:
                    turn.give_back()  # measured while we waited: no need
            local = await agent.gather(timeout=min(ICE_GATHER_TIMEOUT, self._left(deadline, "STUN answers")))
            nat = agent.nat
            turns.sequential = nat is not None and bool(nat.predicted_ports)
            if turns.sequential:
                turn.give_back_after(SEQUENTIAL_TURN_S)
            else:
                turn.give_back()
            certificate = None if self.controlling else make_session_certificate()
            offer = CandidateOffer(
                attempt=attempt,
                ufrag=agent.local_ufrag,
                pwd=agent.local_pwd,
                candidates=tuple(local),
                fingerprint=certificate.fingerprint if certificate else None,
            )
            self._send_record(MsgType.CANDIDATES, encode_offer(offer))
            log_event(log, "candidates_sent", peer=link.peer_name, attempt=attempt, count=len(local))
            self.state = "exchanging"
            remote = await asyncio.wait_for(self._offers[attempt], self._left(deadline, "the peer's candidates"))
            self.state = "checking"
            extra = self._observed(remote)
            pair = await agent.connect(
                remote, timeout=self._left(deadline, "a working candidate pair"), extra_remote=extra
            )
            self.nominated = pair
            log_event(log, "ice_nominated", peer=link.peer_name, attempt=attempt, pair=str(pair))
            self.state = "connecting"
            if self.controlling and remote.fingerprint is None:
                raise IceFailed("the peer's offer carries no QUIC certificate fingerprint")
            quic = WsQuicConnection(
                is_client=self.controlling,
                certificate=certificate,
                expected_fingerprint=remote.fingerprint if self.controlling else None,
                now=self._loop.time(),
            )
            self._connected = self._loop.create_future()
            self._validated = self._loop.create_future()
            carriage = DirectCarriage(
                agent,
                quic,
                on_frame=lambda wire: self._deliver(link, wire),
                on_connected=self._carriage_connected,
                on_closed=lambda reason: self._carriage_closed(carriage, reason),
                lean=self.settings.carriage == "lean",
            )
            self.carriage = carriage
            agent = None  # the carriage owns it now
            carriage.start()
            await asyncio.wait_for(asyncio.shield(self._connected), self._left(deadline, "the QUIC handshake"))
            self.state = "validating"
            self._send_direct_path(link.paths.direct_up(self._loop.time()), self._loop.time())
            rtt = await asyncio.wait_for(asyncio.shield(self._validated), self._left(deadline, "path validation"))
        except (IceFailed, TimeoutError, WsQuicError) as exc:
            reason = str(exc) or "timed out"
            await self._fail(attempt, reason, agent)
            return
        except asyncio.CancelledError:
            if agent is not None:
                await agent.close()
            raise
        finally:
            turn.give_back()  # checks are out (or the attempt is over): the next attempt may gather
        self.state = "direct"
        self.last_error = None
        self.time_to_direct = self._loop.time() - self._established_at
        self._keepalive = self._loop.call_later(DIRECT_KEEPALIVE_INTERVAL, self._keepalive_tick)
        took_ms = (self._loop.time() - started) * 1000
        self._record("direct", f"validated both ways (attempt {attempt})", took_ms)
        log_event(
            log,
            "path",
            peer=link.peer_name,
            session=link.sid,
            path="direct",
            reason=f"validated both ways in {(self._loop.time() - started) * 1000:.0f} ms",
            rtt_ms=round(rtt * 1000, 2),
            pair=str(self.nominated),
        )
        self._on_change(link)

    def _observed(self, remote: CandidateOffer) -> list[str]:
        """ESTABLISHED's view of the peer (its public IP) as extra candidates, if it says anything new."""
        if self._observed_ip is None:
            return []
        try:
            return observed_candidates(self._observed_ip, remote.candidates)
        except CandidateError:
            return []

    def _left(self, deadline: float, what: str) -> float:
        left = deadline - self._loop.time()
        if left <= 0:
            raise TimeoutError(f"gave up waiting for {what} after {self.settings.timeout:.1f} s")
        return left

    async def _fail(self, attempt: int, reason: str, agent: IceAgent | None) -> None:
        if reason.startswith("timed out") or not reason:
            reason = f"no direct path within {self.settings.timeout:.1f} s"
        self.last_error = reason
        if agent is not None:
            await agent.close()
        await self._drop_carriage(reason)
        self.state = "relay"
        retry_in = self.settings.retry
        log_event(
            log,
            "direct_failed",
            logging.WARNING,
            peer=self.link.peer_name,
            session=self.link.sid,
            attempt=attempt,
            reason=reason,
            retry_in=retry_in if self.controlling else None,
        )
        log_event(log, "path", peer=self.link.peer_name, session=self.link.sid, path="relay", reason=reason)
        if self.controlling:
            self._schedule_retry(attempt + 1)

    # --- carriage callbacks --------------------------------------------------------------

    def _carriage_connected(self) -> None:
        if self._connected is not None and not self._connected.done():
            self._connected.set_result(None)

    def _carriage_closed(self, carriage: DirectCarriage, reason: str) -> None:
        if carriage is not self.carriage:
            return
        for future in (self._connected, self._validated):
            if future is not None and not future.done():
                future.set_exception(WsQuicError(f"direct connection closed: {reason}"))
        if self.state == "direct":
            self._direct_lost(f"the direct connection closed: {reason}")
        else:
            self.carriage = None

    def _keepalive_tick(self) -> None:
        """While direct: probe the path, and give it up when our probes go unanswered."""
        self._keepalive = None
        if self.state != "direct":
            return
        now = self._loop.time()
        if not self.link.paths.direct_alive(now, DIRECT_DEAD_AFTER):
            self._direct_lost(f"no answer on the direct path for {DIRECT_DEAD_AFTER:.0f} s")
            return
        self._send_direct_path(self.link.paths.keepalive(now), now)
        self._keepalive = self._loop.call_later(DIRECT_KEEPALIVE_INTERVAL, self._keepalive_tick)

    def request_relay(self) -> None:
        """The user wants the relay: tell the peer, then switch cleanly once the relay is ready (node)."""
        self.pinned_relay = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
            self.next_retry_at = None
        now = self._loop.time()
        self._send_direct_path([encode_path(PathMsg.PREPARE_RELAY, bytes(8))], now)

    def request_direct(self) -> None:
        """The user wants a direct attempt now: unpin both sides; the controlling side runs it."""
        self.pinned_relay = False
        if self.state == "direct":
            return
        # Tell the peer in any case: it may still be pinned to the relay by an earlier request.
        wire = self.link.seal_record(MsgType.PATH, encode_path(PathMsg.RETRY_DIRECT, bytes(8)), self._loop.time())
        if wire is not None:
            self._send_relay([wire])
        if self.controlling:
            self._begin(self.attempt + 1)

    def release_direct(self) -> None:
        """Clean switch to the relay (the relay path is ready): FALLBACK, then close after a linger."""
        if self.state == "direct":
            self._direct_lost("released on request", linger=DIRECT_RELEASE_LINGER)

    def _direct_lost(self, reason: str, linger: float = 0.0) -> None:
        """The direct path is gone: traffic returns to the relay, and the direct path is retried."""
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        self.last_error = reason
        self.state = "relay"
        lost_at = self._loop.time()
        # Best effort: tell the peer on the direct path (it may still work one way).
        fallback = self.link.paths.direct_down()
        self._send_direct_path(fallback, lost_at)
        carriage = self.carriage
        if carriage is not None:
            if linger > 0:
                # Still receiving (frames the peer sent before it switched), no longer sending.
                self._loop.call_later(linger, self._close_lingering, carriage, reason)
            else:
                self.carriage = None
                self._loop.create_task(carriage.close(reason))
        # How long the switch took: from the last sign of life of the direct path (a cut) or now.
        took_ms = (lost_at - self.link.paths.last_ack) * 1000 if not linger else 0.0
        self._record("relay", reason, took_ms)
        # Expected (a lingering switch, or the peer said BYE and closed its end): not a warning.
        level = logging.INFO if linger or self.link.state is LinkState.CLOSED else logging.WARNING
        log_event(log, "path", level, peer=self.link.peer_name, session=self.link.sid, path="relay", reason=reason)
        self._on_change(self.link)
        if self.controlling and not self.pinned_relay:
            self._schedule_retry(self.attempt + 1)

    def _close_lingering(self, carriage: DirectCarriage, reason: str) -> None:
        if self.carriage is carriage:
            self.carriage = None
        self._loop.create_task(carriage.close(reason))

    def _schedule_retry(self, attempt: int) -> None:
        # Up to a fifth earlier, at random: the attempts that failed together (a node's peers all
        # met at once) do not all come back together.
        retry_in = round(self.settings.retry * random.uniform(1 - RETRY_JITTER, 1.0), 3)
        self.next_retry_at = self._loop.time() + retry_in
        if self._retry is not None:
            self._retry.cancel()
        self._retry = self._loop.call_later(retry_in, self._begin, attempt)
        log_event(log, "direct_retry_armed", peer=self.link.peer_name, attempt=attempt, retry_in=retry_in)

    async def _drop_carriage(self, reason: str) -> None:
        carriage, self.carriage = self.carriage, None
        if carriage is not None:
            await carriage.close(reason)

    # --- sending -------------------------------------------------------------------------

    def _send_record(self, kind: MsgType, plaintext: bytes) -> None:
        wire = self.link.seal_record(kind, plaintext, self._loop.time())
        if wire is not None:
            self._send_relay([wire])

    def _send_direct_path(self, messages: list[bytes], now: float) -> None:
        wire = [w for w in (self.link.seal_record(MsgType.PATH, m, now) for m in messages) if w is not None]
        self.send_direct(wire)

    def _record(self, path: str, reason: str, took_ms: float) -> None:
        self.history.append(
            {
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "path": path,
                "reason": reason,
                "took_ms": round(took_ms, 1),
            }
        )

    # --- status --------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        pair = self.nominated
        return {
            "state": self.state,
            "attempts": self.attempts_made,
            "last_error": self.last_error,
            "nominated": str(pair) if pair else None,
            "local_candidate": f"{pair.local.host}:{pair.local.port} {pair.local.type}" if pair else None,
            "remote_candidate": f"{pair.remote.host}:{pair.remote.port} {pair.remote.type}" if pair else None,
            "time_to_direct_s": round(self.time_to_direct, 3) if self.time_to_direct is not None else None,
            "next_retry_in_s": round(self.next_retry_at - self._loop.time(), 1) if self.next_retry_at else None,
            "pinned_relay": self.pinned_relay,
            "history": list(self.history),
        }
