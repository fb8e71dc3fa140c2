"""One peer of a network: the asyncio driver around relay login, peer links and the TAP.

The node owns every piece of I/O (the relay WebSocket, the TAP file
descriptor, the control socket, the clock); the protocol logic lives in the
sans-I/O :class:`~traversal.peer.PeerLink`. Lifecycle:

1. bring the TAP up (fail fast if we cannot), serve the control socket;
2. log in to the relay; for each PEER_JOINED make a PeerLink and handshake;
3. forward TAP frames to established links and received frames to the TAP;
4. if the relay goes away, drop the links, reconnect with backoff, and
   handshake again (the TAP stays up); a refusal (not a member...) is fatal;
5. on stop: BYE to every peer, close the relay connection, remove the TAP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
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
    RECONNECT_MAX_DELAY,
)
from transport.identity import encode_public, public_bytes, short_id
from traversal.control import ControlServer
from traversal.logfmt import log_event
from traversal.peer import LinkState, PeerLink
from traversal.relay_client import RelayLink, RelayRefused, RelayUnavailable, client_ssl_context, connect_relay

log = logging.getLogger("traversal.node")

#: Frames queued towards the relay before we drop (like a NIC's tx ring).
SEND_QUEUE_FRAMES = 2048


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
    psk: bytes | None = None
    insecure: bool = False

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
        self.tap: TapDevice | None = None
        self.relay: RelayLink | None = None
        self.relay_state = "connecting"
        self.relay_error: str | None = None
        self.relay_connects = 0
        self.started_wall = time.time()
        self.tap_dropped = 0
        self._loop = asyncio.get_running_loop()
        self._send_queue: asyncio.Queue[bytes] = asyncio.Queue(SEND_QUEUE_FRAMES)
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._control = ControlServer(config.control_path, self.status)

    # --- lifecycle ---------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Run until :meth:`stop`; raises :class:`NodeError` on a fatal condition."""
        cfg = self.config
        self.tap = TapDevice(cfg.tap_name, mtu=DEFAULT_MTU, address=cfg.address)
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
        """Send every peer a sealed BYE, so it knows at once that we left (not after a timeout)."""
        relay = self.relay
        if relay is None or not self.links:
            return
        now = self._loop.time()
        for link in list(self.links.values()):
            for data in link.close("peer shutting down", now):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(relay.send(data), 1.0)
        log_event(log, "bye_sent", peers=",".join(link.peer_name for link in self.links.values()))
        self.links.clear()

    async def _shutdown(self) -> None:
        # The relay task closed its connection when it was cancelled.
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
            self.relay_state = "connecting"
            try:
                relay = await connect_relay(
                    cfg.relay_url, ssl_context=ssl_context, network=cfg.network, identity=cfg.identity
                )
            except RelayRefused as exc:
                self.relay_state = "refused"
                self.relay_error = exc.reason
                raise NodeError(f"the relay refused this node: {exc.reason}") from None
            except RelayUnavailable as exc:
                self.relay_state = "retrying"
                self.relay_error = str(exc)
                log_event(log, "relay_unavailable", logging.WARNING, reason=str(exc), retry_in=delay)
                await asyncio.sleep(delay)
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
                self._drop_links()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(relay.close(), 2.0)
            if reason is not None:
                self.relay_state = "refused"
                raise NodeError(reason)
            self.relay_state = "retrying"
            log_event(log, "relay_lost", logging.WARNING, reason=self.relay_error, retry_in=delay)
            await asyncio.sleep(delay)

    def _drop_links(self) -> None:
        for link in self.links.values():
            log_event(log, "peer_unreachable", peer=link.peer_name, session=link.sid, reason="relay connection lost")
        self.links.clear()
        # Anything queued belonged to the lost connection's sessions.
        while not self._send_queue.empty():
            self._send_queue.get_nowait()

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
            self.relay_error = "relay closed the connection"
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, websockets.ConnectionClosed):
                await sender
        return None

    async def _sender(self, relay: RelayLink) -> None:
        while True:
            data = await self._send_queue.get()
            await relay.send(data)

    def _send(self, data: list[bytes]) -> None:
        for item in data:
            try:
                self._send_queue.put_nowait(item)
            except asyncio.QueueFull:
                self.tap_dropped += 1

    def _on_relay_frame(self, message: bytes) -> str | None:
        now = self._loop.time()
        try:
            frame = frames.decode(message)
        except frames.FrameError as exc:
            # A broken frame from the relay costs that frame, never the node.
            log_event(log, "relay_frame_dropped", logging.WARNING, reason=str(exc))
            return None
        if isinstance(frame, frames.SessionFrame):
            link = self.links.get(frame.session_id)
            if link is None:
                return None
            try:
                out, delivered = link.on_frame(frame, now)
            except Exception:
                # Last line of defence (nothing here is expected to raise): a frame
                # we failed to handle costs that peer's session, never the node.
                log.exception("event=session_closed peer=%s session=%s reason=internal-error", link.peer_name, link.sid)
                self.links.pop(frame.session_id, None)
                return None
            self._send(out)
            if delivered and self.tap is not None:
                for eth in delivered:
                    self.tap.write(eth)
            if link.state is LinkState.CLOSED:
                self.links.pop(frame.session_id, None)
            self._wake.set()
        elif isinstance(frame, frames.PeerJoined):
            self._on_peer_joined(frame, now)
        elif isinstance(frame, frames.Established):
            link = self.links.get(frame.session_id)
            if link is not None:
                link.on_established(frame, now)
                if link.established is frame and self.tap is not None and frame.mtu != self.tap.mtu:
                    self.tap.set_mtu(frame.mtu)
                self._wake.set()
        elif isinstance(frame, frames.PeerLeft):
            link = self.links.pop(frame.session_id, None)
            if link is not None:
                log_event(log, "peer_left", peer=link.peer_name, session=link.sid, reason=frame.reason)
        elif isinstance(frame, frames.Error):
            log_event(log, "relay_error", logging.ERROR, code=frame.code, reason=frame.reason)
            if frame.code in frames.FATAL_ERRORS:
                return f"the relay refused this node: {frame.reason}"
            self.relay_error = f"relay error {frame.code}: {frame.reason}"
        else:
            log_event(log, "relay_frame_unexpected", logging.WARNING, type=type(frame).__name__)
        return None

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
            return
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
        self._send(link.start(now))
        self._wake.set()

    # --- TAP -----------------------------------------------------------------------

    def _on_tap_frames(self, batch: list[bytes]) -> None:
        now = self._loop.time()
        links = [link for link in self.links.values() if link.state is LinkState.ESTABLISHED]
        if not links:
            self.tap_dropped += len(batch)
            return
        out: list[bytes] = []
        for eth in batch:
            for link in links:
                out += link.send_frame(eth, now)
        self._send(out)

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
                    self._send(link.handle_timer(now))
                    if link.state is LinkState.CLOSED:
                        self.links.pop(session_id, None)

    # --- status --------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = self._loop.time()
        cfg = self.config
        relay = self.relay
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
            },
            "tap": {
                "name": self.tap.name if self.tap else cfg.tap_name,
                "address": cfg.address,
                "mtu": self.tap.mtu if self.tap else None,
                "dropped": self.tap_dropped,
            },
            "uptime_s": round(time.time() - self.started_wall, 1),
            "peers": [link.status(now) for link in self.links.values()],
        }
