"""One peer of a network: the asyncio driver around relay login, peer links, direct paths and the TAP.

The node owns every piece of I/O (the relay WebSocket, the TAP file
descriptor, the control socket, the clock); the protocol logic lives in the
sans-I/O :class:`~traversal.peer.PeerLink`, and each link's direct path in its
:class:`~traversal.direct.DirectPathManager`. Lifecycle:

1. bring the TAP up (fail fast if we cannot), serve the control socket;
2. log in to the relay; for each PEER_JOINED make a PeerLink and handshake;
3. after ESTABLISHED, try for a direct path; forward TAP frames on each
   link's current path (relay or direct) and received frames to the TAP;
4. once a link is direct, RELEASE our direction of its relay session; once
   every link is direct both ways, close the relay connection (the seed's
   criterion) unless ``--relay-standby keep``;
5. if the relay goes away, keep direct links, drop the others, reconnect
   with backoff; a refusal (not a member...) is fatal;
6. on stop: BYE to every peer, close the relay connection, remove the TAP.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import ipaddress
import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import websockets
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tap.device import TapDevice
from transport import frames
from transport.constants import (
    DEFAULT_MTU,
    RECONNECT_BACKOFF_FACTOR,
    RECONNECT_INITIAL_DELAY,
    RECONNECT_JITTER,
    RECONNECT_MAX_DELAY,
)
from transport.frames import MsgType
from transport.identity import IdentityError, encode_public, load_members, public_bytes, short_id
from transport.paths import PathSwitch, Route
from traversal.config import diff_members
from traversal.control import ControlServer
from traversal.direct import DirectPathManager, DirectSettings, GatheringTurns
from traversal.logfmt import LogLimiter, log_event
from traversal.peer import LinkState, PeerLink
from traversal.relay_client import RelayLink, RelayRefused, RelayUnavailable, client_ssl_context, connect_relay
from traversal.switch import LearningSwitch

log = logging.getLogger("traversal.node")

#: Frames queued towards the relay before we drop (like a NIC's tx ring).
SEND_QUEUE_FRAMES = 2048

#: Frame types that belong to the relay connection whatever path a link uses.
_RELAY_ONLY = frozenset({MsgType.READY, MsgType.RELEASE, MsgType.HANDSHAKE})


def stable_mac(identity: bytes) -> bytes:
    """A locally administered unicast MAC derived from the identity.

    A restarted node keeps its MAC, so its peers' ARP caches stay right
    (a random MAC per start leaves them pointing at a MAC that no longer exists).
    """
    digest = hashlib.sha256(b"traversal tap mac\x00" + identity).digest()
    return bytes([(digest[0] & 0xFC) | 0x02]) + digest[1:6]


def members_to_reach(
    allowed: Iterable[bytes] | None, listed: frozenset[bytes] | None, me: bytes
) -> frozenset[bytes] | None:
    """The other members a node should reach: the relay's list (``listed``), narrowed by the node's
    allow-list if it has one (a listed identity the relay does not admit can never join). None: not
    known, because the node has no allow-list and the relay's list is too long to be sent (or has not
    come yet)."""
    if allowed is None:
        return None if listed is None else listed - {me}
    mine = frozenset(allowed) - {me}
    return mine if listed is None else mine & listed


def _jittered(delay: float) -> float:
    """A reconnect wait of at most ``delay``, spread so that a relay's clients do not return at once."""
    return delay * (1 - RECONNECT_JITTER * random.random())


class NodeError(Exception):
    """The node cannot run; the message says what the user should do."""


@dataclass
class NodeConfig:
    relay_url: str
    ca: Path | None
    network: str
    identity: Ed25519PrivateKey
    tap_name: str
    address: str
    control_path: Path
    members: frozenset[bytes] | None = None
    members_file: Path | None = None  # where ``members`` came from: re-read on SIGHUP
    psk: bytes | None = None
    insecure: bool = False
    direct: DirectSettings = field(default_factory=DirectSettings)

    @property
    def trust(self) -> str:
        if self.members is not None and self.psk is not None:
            return "allow-list+psk"
        if self.members is not None:
            return "allow-list"
        if self.psk is not None:
            return "psk"
        return "relay-membership"


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.identity_raw = public_bytes(config.identity)
        self.links: dict[bytes, PeerLink] = {}
        self.direct: dict[bytes, DirectPathManager] = {}  # by relay session id, like links
        self.released: set[bytes] = set()  # sessions whose relay direction we released
        self.tap: TapDevice | None = None
        self.relay: RelayLink | None = None
        self.relay_state = "connecting"
        self.relay_error: str | None = None
        self.relay_connects = 0
        self.started_wall = time.time()
        self.tap_dropped = 0
        self.direct_dropped = 0
        #: Which peer owns which MAC address: TAP frames go to that peer alone (issue 8).
        self.switch: LearningSwitch[bytes] = LearningSwitch()
        self.relay_frames_dropped = 0  # frames from the relay that did not decode
        # Per-frame drop warnings, a few per peer a minute: a flood of garbage must not flood the log.
        self._drop_log = LogLimiter(log)
        self._drop_log_timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self._send_queue: asyncio.Queue[bytes] = asyncio.Queue(SEND_QUEUE_FRAMES)
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._unpark = asyncio.Event()  # set when the relay is needed again after we let it go
        self._parked = False
        #: Peers we refused (not on --members), by identity: the relay connection and PEER_JOINED.
        self._refused: dict[bytes, tuple[RelayLink | None, frames.PeerJoined]] = {}
        #: The network's other members as the relay last listed them (None: not known).
        self.relay_members: frozenset[bytes] | None = None
        self._relay_hold: str | None = None  # why the relay connection is kept, as last logged
        #: One direct attempt at a time gathers candidates (see DirectPathManager._run_attempt).
        self._gathering = GatheringTurns()
        self._control = ControlServer(
            config.control_path,
            self.status,
            {"path relay": lambda: self.request_path("relay"), "path direct": lambda: self.request_path("direct")},
        )
        overlay_ip = str(ipaddress.ip_interface(config.address).ip)
        config.direct.exclude_addresses = config.direct.exclude_addresses | {overlay_ip}

    # --- lifecycle ---------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Run until :meth:`stop`; raises :class:`NodeError` on a fatal condition."""
        cfg = self.config
        self.tap = TapDevice(cfg.tap_name, mtu=DEFAULT_MTU, address=cfg.address, hwaddr=stable_mac(self.identity_raw))
        self.tap.start(self._loop, self._on_tap_frames)
        log_event(log, "tap_up", tap=self.tap.name, address=cfg.address, mtu=DEFAULT_MTU)
        try:
            await self._control.start()
            log_event(
                log,
                "node_start",
                identity=short_id(self.identity_raw),
                network=cfg.network,
                relay=cfg.relay_url,
                trust=cfg.trust,
                direct="on" if cfg.direct.enabled else "off",
                control=str(cfg.control_path),
            )
            if cfg.trust == "relay-membership":
                log_event(
                    log,
                    "trust_warning",
                    logging.WARNING,
                    detail="no --members or --psk: any identity the relay admits to the network can reach this node",
                )
            ssl_context = client_ssl_context(cfg.ca) if cfg.relay_url.startswith("wss:") else None
            tasks = [
                asyncio.create_task(self._relay_loop(ssl_context), name="relay"),
                asyncio.create_task(self._timer_loop(), name="timers"),
            ]
            stop_wait = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait([*tasks, stop_wait], return_when=asyncio.FIRST_COMPLETED)
            if stop_wait in done:
                await self._say_bye()  # while the relay connection is still served
            else:
                stop_wait.cancel()
                await self._say_bye()  # a fatal refusal (removed from the members...): tell the direct peers now
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            for task in done:
                if task is not stop_wait and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            await self._shutdown()

    async def _say_bye(self) -> None:
        """Send every peer a sealed BYE on its current path, so it knows at once that we left."""
        if not self.links:
            return
        now = self._loop.time()
        relay = self.relay
        for link in list(self.links.values()):
            manager = self.direct.get(link.session_id)
            bye = link.close("peer shutting down", now)
            if manager is not None and manager.carriage is not None:
                manager.send_direct(bye)
            elif relay is not None:
                for data in bye:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(relay.send(data), 1.0)
        log_event(log, "bye_sent", peers=",".join(link.peer_name for link in self.links.values()))
        self.links.clear()

    async def _shutdown(self) -> None:
        self._drop_log.flush(float("inf"))  # say what was suppressed before we go
        # The relay task closed its connection when it was cancelled.
        for manager in list(self.direct.values()):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(manager.close(), 2.0)
        self.direct.clear()
        self.links.clear()
        await self._control.close()
        if self.tap is not None:
            self.tap.close()
            log_event(log, "tap_down", tap=self.tap.name)
            self.tap = None

    # --- relay -------------------------------------------------------------------

    async def _relay_loop(self, ssl_context: Any) -> None:
        delay = RECONNECT_INITIAL_DELAY
        cfg = self.config
        while True:
            if self._parked:
                self.relay_state = "released"
                reason = await self._wait_unparked()
                self._unpark.clear()
                self._parked = False
                log_event(log, "relay_reconnect", reason=reason)
            self.relay_state = "connecting"
            try:
                relay = await connect_relay(
                    cfg.relay_url,
                    ssl_context=ssl_context,
                    network=cfg.network,
                    identity=cfg.identity,
                    supports_direct=cfg.direct.enabled,
                )
            except RelayRefused as exc:
                self.relay_state = "refused"
                self.relay_error = exc.reason
                raise NodeError(f"the relay refused this node: {exc.reason}") from None
            except RelayUnavailable as exc:
                self.relay_state = "retrying"
                self.relay_error = str(exc)
                wait = _jittered(delay)
                log_event(log, "relay_unavailable", logging.WARNING, reason=str(exc), retry_in=round(wait, 2))
                await asyncio.sleep(wait)
                delay = min(delay * RECONNECT_BACKOFF_FACTOR, RECONNECT_MAX_DELAY)
                continue
            delay = RECONNECT_INITIAL_DELAY
            self.relay = relay
            self.relay_state = "connected"
            self.relay_error = None
            self.relay_connects += 1
            log_event(
                log,
                "joined",
                network=cfg.network,
                relay=cfg.relay_url,
                observed=f"{relay.observed_ip}:{relay.observed_port}",
                attempt=self.relay_connects,
            )
            try:
                reason = await self._serve_relay(relay)
            finally:
                self.relay = None
                self._drop_relayed_links()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(relay.close(), 2.0)
            if reason is not None:
                self.relay_state = "refused"
                raise NodeError(reason)
            if self._parked:
                continue
            self.relay_state = "retrying"
            wait = _jittered(delay)
            log_event(log, "relay_lost", logging.WARNING, reason=self.relay_error, retry_in=round(wait, 2))
            await asyncio.sleep(wait)

    async def _wait_unparked(self) -> str:
        """While the relay is let go: wait until a peer needs it, or until it is time to check in."""
        checkin = self.config.direct.checkin
        try:
            async with asyncio.timeout(_jittered(checkin) if checkin > 0 else None):
                await self._unpark.wait()
        except TimeoutError:
            return "check-in: hear of members added since"
        return self.relay_error or "a peer needs the relay again"

    def _drop_relayed_links(self) -> None:
        """The relay connection ended. Direct links carry on; links with keys wait to be resumed
        on the next relay connection (same keys, new relay session); the rest are dropped."""
        for session_id, link in list(self.links.items()):
            if link.state is LinkState.ESTABLISHED:
                if link.paths.route is not Route.DIRECT:
                    log_event(
                        log, "peer_detached", peer=link.peer_name, session=link.sid, reason="relay connection lost"
                    )
                continue
            log_event(log, "peer_unreachable", peer=link.peer_name, session=link.sid, reason="relay connection lost")
            self._forget_link(session_id)
        # Anything queued belonged to the lost connection's sessions.
        while not self._send_queue.empty():
            self._send_queue.get_nowait()

    def _forget_link(self, session_id: bytes) -> None:
        link = self.links.pop(session_id, None)
        if link is not None and not any(other.peer == link.peer for other in self.links.values()):
            self.switch.forget(link.peer)
            self._member_lost(link.peer)
        self.released.discard(session_id)
        manager = self.direct.pop(session_id, None)
        if manager is not None:
            self._loop.create_task(manager.close())

    async def _serve_relay(self, relay: RelayLink) -> str | None:
        """Pump frames until the relay connection ends; returns a fatal reason or None."""
        sender = asyncio.create_task(self._sender(relay))
        try:
            async for message in relay.ws:
                if isinstance(message, str):
                    self.relay_error = "relay sent a text message"
                    return None
                fatal = self._on_relay_frame(message)
                if fatal is not None:
                    return fatal
        except websockets.ConnectionClosed as exc:
            self.relay_error = f"connection closed ({exc})"
        else:
            self.relay_error = "relay closed the connection" if not self._parked else None
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, websockets.ConnectionClosed):
                await sender
        return None

    async def _sender(self, relay: RelayLink) -> None:
        while True:
            data = await self._send_queue.get()
            await relay.send(data)

    def _send_relay(self, data: list[bytes]) -> None:
        for item in data:
            try:
                self._send_queue.put_nowait(item)
            except asyncio.QueueFull:
                self.tap_dropped += 1

    def _send_link(self, link: PeerLink, data: list[bytes]) -> None:
        """Send a link's wire frames on its current path (relay control always to the relay)."""
        if not data:
            return
        manager = self.direct.get(link.session_id)
        if manager is None or link.paths.route is not Route.DIRECT:
            # A burst of DATA crosses the relay as a few BUNDLEs: its cost is per message.
            self._send_relay(frames.bundle_data_frames(data) if len(data) > 1 else data)
            return
        direct = [d for d in data if d[1] not in _RELAY_ONLY]
        relayed = [d for d in data if d[1] in _RELAY_ONLY]
        if direct:
            self.direct_dropped += manager.send_direct(direct)
        if relayed:
            self._send_relay(relayed)

    def _on_relay_frame(self, message: bytes) -> str | None:
        now = self._loop.time()
        try:
            frame = frames.decode(message)
        except frames.FrameError as exc:
            # A broken frame from the relay costs that frame, never the node.
            self.relay_frames_dropped += 1
            self._log_drop("relay_frame_dropped", reason=str(exc))
            return None
        if isinstance(frame, frames.SessionFrame):
            link = self.links.get(frame.session_id)
            if link is not None:
                self._on_session_frame(link, frame, now)
        elif isinstance(frame, frames.PeerJoined):
            self._on_peer_joined(frame, now)
        elif isinstance(frame, frames.Members):
            self._on_members(frame)
        elif isinstance(frame, frames.Established):
            self._on_established(frame, now)
        elif isinstance(frame, frames.PeerLeft):
            self._forget_refused(frame)
            link = self.links.get(frame.session_id)
            if link is not None and link.paths.route is Route.DIRECT:
                log_event(log, "relay_session_ended", peer=link.peer_name, session=link.sid, path="direct")
            elif link is not None:
                log_event(log, "peer_left", peer=link.peer_name, session=link.sid, reason=frame.reason)
                self._forget_link(frame.session_id)
        elif isinstance(frame, frames.Error):
            log_event(log, "relay_error", logging.ERROR, code=frame.code, reason=frame.reason)
            if frame.code in frames.FATAL_ERRORS:
                return f"the relay refused this node: {frame.reason}"
            self.relay_error = f"relay error {frame.code}: {frame.reason}"
        else:
            self._log_drop("relay_frame_unexpected", type=type(frame).__name__)
        return None

    def _on_session_frame(
        self, link: PeerLink, frame: frames.SessionFrame, now: float, *, hot_path_tried: bool = False
    ) -> None:
        """A session frame from either path: the session's replay window makes the path irrelevant."""
        if frame.type == MsgType.DATA and self.tap is not None and not hot_path_tried:
            eth = link.receive_data(frame.payload, now)
            if eth is not None:
                if eth:  # empty: opened but out of bounds, dropped and counted
                    if len(self.links) > 1:  # with one peer there is nothing to choose
                        self.switch.learn(eth, link.peer, now)
                    self.tap.write(eth)
                return
        try:
            out, delivered = link.on_frame(frame, now)
        except Exception:
            # Last line of defence (nothing here is expected to raise): a frame
            # we failed to handle costs that peer's session, never the node.
            log.exception("event=session_closed peer=%s session=%s reason=internal-error", link.peer_name, link.sid)
            self._forget_link(link.session_id)
            return
        self._send_link(link, out)
        if delivered and self.tap is not None:
            for eth in delivered:
                if len(self.links) > 1:
                    self.switch.learn(eth, link.peer, now)
                self.tap.write(eth)
        if link.state is LinkState.CLOSED:
            self._forget_link(link.session_id)
        elif link.resumed_at == now:
            self._check_pinned(link)
        elif link.state is LinkState.ESTABLISHED and link.established is not None:
            manager = self.direct.get(link.session_id)
            if manager is not None and manager.session_tag != link.session_tag:
                # A new handshake replaced the session (the peer restarted): the old
                # direct-path state (attempt numbers, QUIC connection) belongs to it.
                self.direct.pop(link.session_id, None)
                self._loop.create_task(manager.close())
                link.paths = PathSwitch()
                self._start_direct(link, link.established)
        if frame.type != MsgType.DATA:
            # Control records may move a deadline earlier (a reply to send, a resumption);
            # DATA only ever moves the dead-peer deadline later, so it need not wake the timers.
            self._wake.set()

    def _on_direct_frame(self, link: PeerLink, wire: bytes) -> None:
        """A frame that arrived on the link's direct carriage."""
        record = frames.data_record(wire)
        tried = record is not None and self.tap is not None and self.links.get(link.session_id) is link
        if tried:
            now = self._loop.time()
            eth = link.receive_data(record, now)  # the hot path; None: the general one below
            if eth is not None:
                if eth:  # empty: opened but out of bounds, dropped and counted
                    if len(self.links) > 1:  # with one peer there is nothing to choose
                        self.switch.learn(eth, link.peer, now)
                    self.tap.write(eth)
                return
        try:
            frame = frames.decode(wire)
        except frames.FrameError as exc:
            link.count_drop("malformed-frame")
            self._log_drop("direct_frame_dropped", peer=link.peer_name, reason=str(exc))
            return
        if not isinstance(frame, frames.SessionFrame):
            link.count_drop("unexpected-frame")
            self._log_drop("direct_frame_dropped", peer=link.peer_name, reason="not a session frame")
            return
        # The carriage belongs to this link alone, so the relay session id in the frame's
        # header does not matter here (it changes when the relay session is rebound, and
        # the two ends rebind at slightly different times); the session authenticates it.
        if self.links.get(link.session_id) is link:
            # A DATA record the hot path could not open goes straight to the general path, which
            # opens it once more to say why (a forgery costs two AEAD checks, not three).
            self._on_session_frame(link, frame, self._loop.time(), hot_path_tried=tried)

    def _log_drop(self, name: str, **fields: Any) -> None:
        """Log a dropped frame within the limiter's budget; its summary comes out on a timer."""
        self._drop_log.event(self._loop.time(), name, logging.WARNING, **fields)
        deadline = self._drop_log.next_deadline()
        if deadline is not None and self._drop_log_timer is None:
            self._drop_log_timer = self._loop.call_at(deadline, self._flush_drop_log)

    def _flush_drop_log(self) -> None:
        self._drop_log_timer = None
        self._drop_log.flush(self._loop.time())
        deadline = self._drop_log.next_deadline()
        if deadline is not None:
            self._drop_log_timer = self._loop.call_at(deadline, self._flush_drop_log)

    def _on_peer_joined(self, frame: frames.PeerJoined, now: float) -> None:
        cfg = self.config
        peer_name = short_id(frame.peer)
        if cfg.members is not None and frame.peer not in cfg.members:
            log_event(
                log,
                "peer_refused",
                logging.WARNING,
                peer=peer_name,
                reason="not in --members allow-list",
                identity=encode_public(frame.peer),
            )
            self._refused[frame.peer] = (self.relay, frame)
            return
        existing = next((lk for lk in self.links.values() if lk.peer == frame.peer), None)
        if existing is not None and existing.state is LinkState.ESTABLISHED:
            self._rebind(existing, frame.session_id, now)
            return
        if existing is not None:
            self._forget_link(existing.session_id)
        link = PeerLink(
            session_id=frame.session_id,
            peer=frame.peer,
            identity=cfg.identity,
            network=cfg.network,
            psk=cfg.psk,
            allowed_peers=cfg.members,
            now=now,
        )
        self.links[frame.session_id] = link
        log_event(
            log, "peer_joined", peer=peer_name, session=link.sid, role="initiator" if link.initiator else "responder"
        )
        self._send_relay(link.start(now))
        self._wake.set()

    def _rebind(self, link: PeerLink, session_id: bytes, now: float) -> None:
        """Resume an existing session over a new relay session (no new handshake)."""
        old = link.session_id
        self.links.pop(old, None)
        self.released.discard(old)
        manager = self.direct.pop(old, None)
        self.links[session_id] = link
        if manager is not None:
            self.direct[session_id] = manager
        self._send_relay(link.rebind(session_id, now))
        if link.paths.route is Route.DIRECT:
            self._on_path_change(link)  # release the new relay session at once, unless the relay was asked for
        self._wake.set()

    def _on_established(self, frame: frames.Established, now: float) -> None:
        link = self.links.get(frame.session_id)
        if link is None:
            return
        link.on_established(frame, now)
        if link.established is frame and self.tap is not None and frame.mtu != self.tap.mtu:
            self.tap.set_mtu(frame.mtu)
        if link.state is LinkState.ESTABLISHED:
            self._supersede(link)
            self._start_direct(link, frame)
            self._check_pinned(link)
        self._wake.set()

    def _supersede(self, link: PeerLink) -> None:
        """A new session with a peer replaces any older link to the same identity."""
        for session_id, other in list(self.links.items()):
            if other is not link and other.peer == link.peer:
                log_event(log, "link_superseded", peer=other.peer_name, old=other.sid, new=link.sid)
                self._forget_link(session_id)

    # --- direct paths ----------------------------------------------------------------

    def _start_direct(self, link: PeerLink, est: frames.Established) -> None:
        settings = self.config.direct
        if link.session_id in self.direct:
            return
        if not settings.enabled or not est.peer_supports_direct:
            reason = "--no-direct here" if not settings.enabled else "the peer does not accept direct connections"
            log_event(log, "direct_skipped", peer=link.peer_name, session=link.sid, reason=reason)
            return
        manager = DirectPathManager(
            link,
            settings,
            send_relay=self._send_relay,
            deliver=self._on_direct_frame,
            on_change=self._on_path_change,
            observed_peer_ip=est.peer_public_ip,
            log_drop=self._log_drop,
            gathering=self._gathering,
        )
        self.direct[link.session_id] = manager

        def on_record(kind: MsgType, plaintext: bytes) -> None:
            if kind == MsgType.CANDIDATES:
                manager.on_candidates(plaintext)
            elif kind == MsgType.PATH:
                manager.on_path(plaintext)

        link.on_record = on_record
        manager.start()

    def _on_path_change(self, link: PeerLink) -> None:
        """A link's path changed: release our relay direction, maybe let the relay go, or get it back."""
        session_id = link.session_id
        manager = self.direct.get(session_id)
        if manager is not None and manager.pinned_relay:
            # The relay was asked for: get onto it (keeping the direct path until it is ready).
            if session_id in self.released or self.relay is None:
                self._need_relay()
            self._check_pinned(link)
            return
        if link.paths.route is Route.DIRECT:
            if session_id not in self.released and self.relay is not None:
                self.released.add(session_id)
                self._send_relay([frames.encode(frames.Release(session_id))])
                log_event(log, "relay_released", peer=link.peer_name, session=link.sid)
            self._maybe_park_relay()
            return
        # Back on the relay. If our direction of the relay session was released, or the
        # relay connection was let go, the session resumes over a fresh relay connection
        # (same keys, new relay session id: see _rebind).
        if session_id in self.released or self.relay is None:
            manager = self.direct.get(session_id)
            reason = manager.last_error if manager is not None else None
            log_event(log, "relay_needed", peer=link.peer_name, session=link.sid, reason=reason)
            self._need_relay()

    def _check_pinned(self, link: PeerLink) -> None:
        """Make-before-break to the relay: switch only once the relay session works both ways."""
        manager = self.direct.get(link.session_id)
        if manager is None or not manager.pinned_relay or link.paths.route is not Route.DIRECT:
            return
        relay_ready = (
            self.relay is not None
            and link.session_id not in self.released
            and link.state is LinkState.ESTABLISHED
            and not link.resuming
        )
        if relay_ready:
            manager.release_direct()

    def request_path(self, kind: str) -> dict[str, Any]:
        """`traversal path relay|direct`: an agreed move of every peer to the relay, or a direct attempt now."""
        peers = []
        for link in list(self.links.values()):
            manager = self.direct.get(link.session_id)
            if manager is None:
                continue
            if kind == "relay":
                log_event(log, "relay_requested", peer=link.peer_name, session=link.sid, by="user")
                manager.request_relay()
                self._on_path_change(link)
            else:
                log_event(log, "direct_requested", peer=link.peer_name, session=link.sid, by="user")
                manager.request_direct()
            peers.append(link.peer_name)
        return {"ok": True, "path": kind, "peers": peers}

    # --- which members we should reach, and so whether we need the relay --------------

    def _on_members(self, frame: frames.Members) -> None:
        self.relay_members = frozenset(frame.identities) - {self.identity_raw} if frame.complete else None
        log_event(log, "members", total=frame.total, listed=len(frame.identities))
        if self.config.members is None and self.relay_members is not None:
            # We trust the relay's list (no allow-list of our own): a peer it no longer lists was
            # removed from the network, and its direct path must not outlive that.
            now = self._loop.time()
            for link in list(self.links.values()):
                if link.peer not in self.relay_members:
                    self._close_removed_peer(link, now, reason="no longer a member on the relay")
        self._maybe_park_relay()

    def known_members(self) -> frozenset[bytes] | None:
        """The other members this node should reach (see :func:`members_to_reach`)."""
        return members_to_reach(self.config.members, self.relay_members, self.identity_raw)

    def members_missing(self) -> frozenset[bytes] | None:
        """Known members we do not reach directly (None: we do not know who the members are)."""
        known = self.known_members()
        if known is None:
            return None
        return known - {link.peer for link in self.links.values() if link.paths.both_direct}

    def _maybe_park_relay(self) -> None:
        """The seed: once the peers are direct, the relay connection is closed (unless kept as standby).
        In a mesh, only once every member we know of is reached directly: until then an idle
        signalling-only connection is how we hear of members who come online (issue 8)."""
        if self.config.direct.standby != "close" or self.relay is None or self._parked:
            return
        if not self.links or not all(link.paths.both_direct for link in self.links.values()):
            return
        if any(manager.pinned_relay for manager in self.direct.values()):
            return
        missing = self.members_missing()
        if missing is None or missing:
            hold = "the member list is unknown" if missing is None else f"{len(missing)} member(s) not reached directly"
            if hold != self._relay_hold:
                self._relay_hold = hold
                log_event(log, "relay_kept", reason=hold, peers=len(self.links), signalling_only=True)
            return
        self._relay_hold = None
        self._parked = True
        log_event(log, "relay_closed", reason="every member is reached directly", peers=len(self.links))
        relay = self.relay
        self._loop.create_task(relay.close())

    def _member_lost(self, peer: bytes) -> None:
        """A link is gone for good: with the relay let go, we would not hear of that member again."""
        known = self.known_members()
        if self._parked and (known is None or peer in known):
            log_event(log, "relay_needed", peer=short_id(peer), reason="a member is no longer reached")
            self._need_relay()

    def _need_relay(self) -> None:
        if self._parked:
            self._unpark.set()
        elif self.relay is not None:
            # Our released sessions cannot be reopened on this connection: start a fresh one.
            self._loop.create_task(self.relay.close())

    # --- TAP -----------------------------------------------------------------------

    def _on_tap_frames(self, batch: list[bytes]) -> None:
        """Frames from our kernel: each to the peer owning its destination MAC, or to every peer."""
        now = self._loop.time()
        links = {link.peer: link for link in self.links.values() if link.state is LinkState.ESTABLISHED}
        if not links:
            self.tap_dropped += len(batch)
            return
        if len(links) == 1:
            # One peer: every frame goes to it, known destination or not (no lookups on the fast path).
            (link,) = links.values()
            out: list[bytes] = []
            for eth in batch:
                out += link.send_frame(eth, now)
            self._send_link(link, out)
            return
        switch = self.switch
        per_link: dict[bytes, list[bytes]] = {peer: [] for peer in links}
        for eth in batch:
            owner = switch.port_for(eth, now)
            if owner is not None and owner in links:
                switch.counters.unicast += 1
                per_link[owner] += links[owner].send_frame(eth, now)
            else:
                switch.counters.flooded += 1
                for peer, link in links.items():
                    per_link[peer] += link.send_frame(eth, now)
        for peer, out in per_link.items():
            self._send_link(links[peer], out)

    # --- timers --------------------------------------------------------------------

    async def _timer_loop(self) -> None:
        """Fire the links' deadlines: the cores say when, this loop only waits."""
        while True:
            deadlines = [d for d in (link.next_deadline() for link in self.links.values()) if d is not None]
            timeout = max(0.0, min(deadlines) - self._loop.time()) if deadlines else None
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            now = self._loop.time()
            for session_id, link in list(self.links.items()):
                deadline = link.next_deadline()
                if deadline is not None and deadline <= now:
                    self._send_link(link, link.handle_timer(now))
                    detached = self.relay is None and link.paths.route is not Route.DIRECT
                    if link.state is LinkState.CLOSED or (detached and link.state is LinkState.HANDSHAKING):
                        self._forget_link(session_id)

    # --- allow-list reload (SIGHUP) -------------------------------------------------------

    def reload_members(self) -> None:
        """SIGHUP: re-read the ``--members`` allow-list; sessions with peers still on it are kept.

        A peer no longer listed is told BYE on its current path and forgotten (its direct path
        closed), and refused from then on. A newly listed peer is accepted when the relay
        (re)announces it (:meth:`_reach_added_members`). A file that is now missing or
        malformed changes nothing: the node keeps the list it has and says what is wrong.
        """
        cfg = self.config
        if cfg.members is None or cfg.members_file is None:
            log_event(log, "members_reload_skipped", reason="started without --members: no allow-list to re-read")
            return
        try:
            members = load_members(cfg.members_file)
        except IdentityError as exc:
            log_event(
                log,
                "members_reload_failed",
                logging.ERROR,
                error=str(exc),
                action=f"kept the previous allow-list of {len(cfg.members)} members",
            )
            return
        change = diff_members(cfg.members, members)
        cfg.members = members
        log_event(
            log,
            "members_reloaded",
            file=str(cfg.members_file),
            added=len(change.added),
            removed=len(change.removed),
            members=change.total,
        )
        now = self._loop.time()
        for link in list(self.links.values()):
            if link.peer not in members:
                self._close_removed_peer(link, now)
        self._reach_added_members(change.added, now)
        if change.removed:
            self._maybe_park_relay()  # the peers that remain may all be direct now
        self._wake.set()

    def _close_removed_peer(
        self, link: PeerLink, now: float, reason: str = "no longer in --members allow-list"
    ) -> None:
        # The peer reads why in its log (peer_bye); none is sent before the handshake is done.
        allow_list = reason.startswith("no longer in")
        bye = link.close("removed from the peer's --members allow-list" if allow_list else f"removed: {reason}", now)
        self._send_link(link, bye)
        log_event(
            log,
            "peer_removed",
            logging.WARNING,
            peer=link.peer_name,
            session=link.sid,
            reason=reason,
            bye="sent" if bye else "no session yet",
            identity=encode_public(link.peer),
        )
        self._forget_link(link.session_id)

    def _reach_added_members(self, added: frozenset[bytes], now: float) -> None:
        """Only the relay introduces peers (PEER_JOINED: when a member logs in, and every online
        member when we log in), so a newly listed peer we have no link to is reached thus:

        - relay let go (every peer was direct): reconnect, the only way to hear of it;
        - connected, and the relay had announced it while we refused it: that relay session is
          still open at both ends, so accept the remembered PEER_JOINED now. A reconnect would
          also work, but it ends the relay sessions of our relayed peers, who would have to
          handshake afresh. The handshake starts at once if we initiate it, else at the peer's
          next attempt (within HANDSHAKE_TIMEOUT);
        - otherwise it is not online yet (or we are reconnecting): it is announced when it comes.
        """
        waiting = added - {link.peer for link in self.links.values()} - {self.identity_raw}
        if not waiting:
            return
        names = ",".join(short_id(peer) for peer in sorted(waiting))
        if self._parked:
            log_event(log, "relay_needed", peers=names, reason="added to --members: only the relay introduces peers")
            self._need_relay()
            return
        for peer in sorted(waiting):
            remembered = self._refused.pop(peer, None)
            if remembered is not None and remembered[0] is not None and remembered[0] is self.relay:
                log_event(log, "peer_accepted", peer=short_id(peer), reason="added to --members allow-list")
                self._on_peer_joined(remembered[1], now)

    def _forget_refused(self, left: frames.PeerLeft) -> None:
        """A refused peer's relay session ended: there is nothing left to accept later."""
        remembered = self._refused.get(left.peer)
        if remembered is not None and remembered[1].session_id == left.session_id:
            del self._refused[left.peer]

    # --- status --------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = self._loop.time()
        cfg = self.config
        relay = self.relay
        peers = []
        for link in self.links.values():
            entry = link.status(now)
            manager = self.direct.get(link.session_id)
            entry["direct"] = manager.status() if manager is not None else None
            entry["relay_released"] = link.session_id in self.released
            entry["macs"] = self.switch.addresses(link.peer, now)
            peers.append(entry)
        known, missing = self.known_members(), self.members_missing()
        return {
            "version": 1,
            "identity": encode_public(self.identity_raw),
            "network": cfg.network,
            "trust": cfg.trust,
            "relay": {
                "url": cfg.relay_url,
                "state": self.relay_state,
                "observed": f"{relay.observed_ip}:{relay.observed_port}" if relay else None,
                "connects": self.relay_connects,
                "last_error": self.relay_error,
                "dropped": self.relay_frames_dropped,
                "standby": cfg.direct.standby,
                # Kept (idle, signalling only) while a member we know of is not reached directly.
                "members_known": len(known) if known is not None else None,
                "members_missing": sorted(short_id(m) for m in missing) if missing is not None else None,
            },
            "switch": {"addresses": len(self.switch), **dataclasses.asdict(self.switch.counters)},
            "tap": {
                "name": self.tap.name if self.tap else cfg.tap_name,
                "address": cfg.address,
                "mtu": self.tap.mtu if self.tap else None,
                "dropped": self.tap_dropped,
            },
            "direct": {
                "enabled": cfg.direct.enabled,
                "timeout_s": cfg.direct.timeout,
                "retry_s": cfg.direct.retry,
                "stun": f"{cfg.direct.stun_server[0]}:{cfg.direct.stun_server[1]}" if cfg.direct.stun_server else None,
                "dropped": self.direct_dropped,
            },
            "uptime_s": round(time.time() - self.started_wall, 1),
            "peers": peers,
        }
