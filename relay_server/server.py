"""The relay ("matchmaker"): authenticates peers, pairs them into sessions, and forwards their frames.

Peers connect over ``wss://``, prove their Ed25519 identity by signing a fresh
challenge, and are admitted if that identity is on the network's members list.
Every pair of admitted peers of a network gets a relay session (a 16-byte id);
the relay forwards the session's frames between the two ends byte for byte,
without being able to read them: the end-to-end handshake and every sealed
payload belong to the peers (DESIGN.md, "Trust"). When both ends report READY
the relay tells each the other's observed address (ESTABLISHED); when they go
direct each end RELEASEs its direction of the session, and once both have, the relay
forgets it.

The same port answers ``GET /metrics`` in the Prometheus text format.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import signal
import ssl
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from relay_server.admission import (
    DEFAULT_CONNECTION_BURST,
    DEFAULT_CONNECTION_RATE,
    DEFAULT_FAILURE_LIMIT,
    DEFAULT_FAILURE_WINDOW,
    DEFAULT_MAX_CLIENTS,
    DEFAULT_MAX_PENDING,
    REFUSED_RATE,
    Admission,
    AdmissionError,
)
from relay_server.metrics import CONTENT_TYPE, RelayCounters, SessionSample, render_metrics
from relay_server.ratelimit import RateLimiter
from relay_server.resources import prepare_process
from transport.constants import (
    AUTH_TIMEOUT,
    DEFAULT_MTU,
    HEARTBEAT_INTERVAL,
    KEY_ROTATION_INTERVAL,
    MAX_FRAME_SIZE,
    MAX_MTU,
    MAX_NETWORK_NAME,
    MAX_REASON,
    MIN_MTU,
    RELAY_DUPLICATE_PING_TIMEOUT,
    RELAY_KEEPALIVE_INTERVAL,
    RELAY_SHUTDOWN_GRACE,
)
from transport.frames import (
    FORWARDED_TYPES,
    IDENTITY_SIZE,
    MAX_MEMBERS_LISTED,
    NONCE_SIZE,
    SESSION_ID_SIZE,
    Auth,
    AuthOk,
    Challenge,
    Error,
    ErrorCode,
    Established,
    FrameError,
    Hello,
    Members,
    MsgType,
    PeerJoined,
    PeerLeft,
    Ready,
    Release,
    decode,
    encode,
    peek_session_id,
    peek_type,
    relay_auth_message,
)
from transport.identity import IdentityError, encode_public, short_id
from traversal.config import diff_networks, load_networks
from traversal.logfmt import LogLimiter, format_event

log = logging.getLogger("traversal.relay")

_F = TypeVar("_F", Hello, Auth, Ready, Release, Error)

#: websockets drops (close 1009) anything above this by itself; between
#: MAX_FRAME_SIZE and this, the relay answers FRAME_TOO_LARGE so the client
#: learns why it was cut off.
WEBSOCKET_MAX_SIZE = 2 * MAX_FRAME_SIZE
#: Pending TCP connections the kernel queues for us (it caps this at net.core.somaxconn).
LISTEN_BACKLOG = 1024

#: Frame types only the relay may send; a client sending one is confused or hostile.
_RELAY_ONLY_TYPES = frozenset(
    {MsgType.CHALLENGE, MsgType.AUTH_OK, MsgType.MEMBERS, MsgType.PEER_JOINED, MsgType.PEER_LEFT, MsgType.ESTABLISHED}
)


class _CountingConnection(ServerConnection):
    """websockets' server connection, counting how far each TCP connection gets (``connections``
    on /metrics): websockets makes one per accepted TCP connection, before TLS, and calls
    ``connection_made`` only once TLS is done. Subclassed per relay with its counter
    (``create_connection`` takes a class)."""

    stages: Counter[str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stages["accepted"] += 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if transport.get_extra_info("ssl_object") is not None:
            self.stages["tls"] += 1

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super().handshake(*args, **kwargs)
        finally:
            # The WebSocket side is counted by the relay's handler, which only opened ones reach.
            if self.response is not None and self.response.status_code != HTTPStatus.SWITCHING_PROTOCOLS:
                self.stages["http"] += 1


class RelayError(Exception):
    """The relay cannot run as asked (e.g. the port is taken); the message says what to do."""


class RelayConfigError(RelayError):
    """A relay configuration value is out of range."""


class _ClientRefused(RelayError):
    """Internal: stop serving one client, tell it why with an ERROR frame, and close."""

    def __init__(
        self, code: ErrorCode, reason: str, *, event: str, close_code: CloseCode, metric_reason: str = ""
    ) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.event = event  # "auth_failed" or "protocol_error"
        self.close_code = close_code
        self.metric_reason = metric_reason
        #: Who the client claimed to be, once its HELLO was read (for the log line).
        self.network = "-"
        self.peer = "-"


def _protocol_error(reason: str) -> _ClientRefused:
    return _ClientRefused(ErrorCode.PROTOCOL, reason, event="protocol_error", close_code=CloseCode.PROTOCOL_ERROR)


def _auth_failure(code: ErrorCode, reason: str, metric_reason: str) -> _ClientRefused:
    return _ClientRefused(
        code, reason, event="auth_failed", close_code=CloseCode.POLICY_VIOLATION, metric_reason=metric_reason
    )


# --- configuration ---------------------------------------------------------------


def _validate_networks(networks: dict[str, frozenset[bytes]]) -> dict[str, frozenset[bytes]]:
    checked: dict[str, frozenset[bytes]] = {}
    for name, members in networks.items():
        # HELLO cannot name a network outside these bounds, so such an entry could never be joined.
        if not name or len(name.encode("utf-8")) > MAX_NETWORK_NAME:
            raise RelayConfigError(f"network name {name!r} must be 1..{MAX_NETWORK_NAME} UTF-8 bytes")
        for member in members:
            if not isinstance(member, bytes) or len(member) != IDENTITY_SIZE:
                raise RelayConfigError(f"network {name!r}: a member key must be {IDENTITY_SIZE} raw bytes")
        checked[name] = frozenset(members)
    return checked


@dataclass
class RelayConfig:
    """What the relay serves and the session parameters it announces in ESTABLISHED."""

    host: str
    port: int
    networks: dict[str, frozenset[bytes]]
    ssl: ssl.SSLContext | None
    mtu: int = DEFAULT_MTU
    heartbeat_interval: int = int(HEARTBEAT_INTERVAL)
    key_rotation_interval: int = int(KEY_ROTATION_INTERVAL)
    auth_timeout: float = AUTH_TIMEOUT
    duplicate_ping_timeout: float = RELAY_DUPLICATE_PING_TIMEOUT
    max_clients: int = DEFAULT_MAX_CLIENTS
    max_pending_logins: int = DEFAULT_MAX_PENDING
    auth_failure_limit: int = DEFAULT_FAILURE_LIMIT
    auth_failure_window: float = DEFAULT_FAILURE_WINDOW
    connection_rate: float = DEFAULT_CONNECTION_RATE  # per IP address and second; 0: no limit
    connection_burst: int = DEFAULT_CONNECTION_BURST

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 0xFFFF:
            raise RelayConfigError(f"port must be 0..65535, got {self.port}")
        if not MIN_MTU <= self.mtu <= MAX_MTU:
            raise RelayConfigError(f"mtu must be {MIN_MTU}..{MAX_MTU}, got {self.mtu}")
        # ESTABLISHED carries these as u16 and u32 seconds.
        if not 1 <= self.heartbeat_interval <= 0xFFFF:
            raise RelayConfigError(f"heartbeat interval must be 1..65535 s, got {self.heartbeat_interval}")
        if not 1 <= self.key_rotation_interval <= 0xFFFFFFFF:
            raise RelayConfigError(f"key rotation interval must be at least 1 s, got {self.key_rotation_interval}")
        if self.connection_rate < 0 or self.connection_burst < 1:
            raise RelayConfigError("connection rate must be 0 (no limit) or more, and its burst at least 1")
        if self.auth_timeout <= 0 or self.duplicate_ping_timeout <= 0:
            raise RelayConfigError("auth timeout and duplicate-login ping timeout must be positive")
        try:
            self.admission()
        except AdmissionError as exc:
            raise RelayConfigError(str(exc)) from None
        self.networks = _validate_networks(self.networks)

    def admission(self) -> Admission:
        """A fresh admission policy with this configuration's limits."""
        return Admission(
            max_clients=self.max_clients,
            max_pending=self.max_pending_logins,
            failure_limit=self.auth_failure_limit,
            failure_window=self.auth_failure_window,
        )


# --- state ---------------------------------------------------------------------------


@dataclass(eq=False)
class _Client:
    """An authenticated connection."""

    ws: ServerConnection
    network: str
    identity: bytes
    supports_direct: bool
    observed: tuple[str, int]
    sessions: dict[bytes, _Session] = field(default_factory=dict)
    detached: bool = False

    @property
    def name(self) -> str:
        return short_id(self.identity)

    @property
    def addr(self) -> str:
        return _format_addr(*self.observed)


@dataclass(eq=False)
class _Session:
    """Forwarding state for one pair: ``a`` joined first, ``b`` second."""

    session_id: bytes
    network: str
    a: _Client
    b: _Client
    ready_a: bool = False
    ready_b: bool = False
    established: bool = False
    # RELEASE is per direction: an end that released sends nothing more through us on this
    # session (it went direct). Its earlier frames were forwarded first (one TCP stream, in
    # order), so releasing loses nothing; the session is forgotten once both ends released.
    released_a: bool = False
    released_b: bool = False
    bytes_a_to_b: int = 0
    frames_a_to_b: int = 0
    bytes_b_to_a: int = 0
    frames_b_to_a: int = 0

    @property
    def label(self) -> str:
        return self.session_id.hex()[:8]

    def other(self, client: _Client) -> _Client:
        return self.b if client is self.a else self.a

    def released_by(self, client: _Client) -> bool:
        return self.released_a if client is self.a else self.released_b

    def count(self, sender: _Client, size: int) -> None:
        if sender is self.a:
            self.bytes_a_to_b += size
            self.frames_a_to_b += 1
        else:
            self.bytes_b_to_a += size
            self.frames_b_to_a += 1


@dataclass(frozen=True, slots=True)
class SessionStats:
    """A snapshot of one active relay session (for status output and tests)."""

    session_id: bytes
    network: str
    a: bytes  # identity of the end that joined first
    b: bytes
    established: bool
    bytes_a_to_b: int
    frames_a_to_b: int
    bytes_b_to_a: int
    frames_b_to_a: int


# --- small helpers -------------------------------------------------------------------


def _format_addr(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _kv(event: str, **fields: object) -> str:
    """One ``event=... key=value`` log line (the project's logfmt, see traversal/logfmt.py)."""
    return format_event(event, fields)


def _clip(reason: str) -> str:
    """Shorten ``reason`` to what an ERROR / PEER_LEFT frame can carry, on a UTF-8 boundary."""
    raw = reason.encode("utf-8")
    if len(raw) <= MAX_REASON:
        return reason
    return raw[:MAX_REASON].decode("utf-8", errors="ignore")


def _observed_address(ws: ServerConnection) -> tuple[str, int] | None:
    peer = ws.remote_address
    if not peer:
        return None  # the transport is already gone
    host, port = str(peer[0]), int(peer[1])
    addr = ipaddress.ip_address(host.split("%", 1)[0])
    # A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d; peers need the IPv4 address.
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr), port


def _members_frame(members: frozenset[bytes]) -> bytes:
    """MEMBERS for a network: the whole list while it fits one frame, else the count alone."""
    listed = tuple(sorted(members)) if len(members) <= MAX_MEMBERS_LISTED else ()
    return encode(Members(len(members), listed))


def _classify(data: str | bytes) -> tuple[MsgType, bytes]:
    """Check what every client message must be (binary, in bounds, a known type); return its type and bytes."""
    if isinstance(data, str):
        raise _protocol_error("text message: the relay protocol uses binary frames only")
    if len(data) > MAX_FRAME_SIZE:
        raise _ClientRefused(
            ErrorCode.FRAME_TOO_LARGE,
            f"frame of {len(data)} bytes exceeds the {MAX_FRAME_SIZE}-byte limit",
            event="protocol_error",
            close_code=CloseCode.MESSAGE_TOO_BIG,
        )
    try:
        return peek_type(data), data
    except FrameError as exc:
        raise _protocol_error(f"malformed frame: {exc}") from None


def _decode_as(data: bytes, cls: type[_F]) -> _F:
    try:
        frame = decode(data)
    except FrameError as exc:
        raise _protocol_error(f"malformed {cls.__name__.upper()} frame: {exc}") from None
    if not isinstance(frame, cls):  # the caller dispatched on the type byte, so this cannot happen
        raise _protocol_error(f"expected a {cls.__name__.upper()} frame")
    return frame


# --- the server ----------------------------------------------------------------------


class RelayServer:
    """The relay: one WebSocket port for peers, the same port for ``GET /metrics``.

    All state lives on the event loop thread; every method runs there.
    """

    def __init__(self, config: RelayConfig, *, extra_metrics: Callable[[], Iterable[str]] | None = None) -> None:
        self._config = config
        #: More /metrics lines from a component sharing the process (the STUN server).
        self._extra_metrics = extra_metrics
        self._networks = _validate_networks(config.networks)
        self._members_frames = {name: _members_frame(members) for name, members in self._networks.items()}
        self._admission = config.admission()
        self._connection_limiter = (
            RateLimiter(config.connection_rate, config.connection_burst) if config.connection_rate > 0 else None
        )
        #: A flood of refusals is counted on /metrics; the log gets a few lines per address a minute.
        self._refusal_log = LogLimiter(log, key_fields=("addr",))
        self._client_count = 0
        self.port: int = config.port
        self._server: Server | None = None
        self._close_task: asyncio.Task[None] | None = None
        self._closing = False
        #: Every WebSocket connection inside the handler, authenticated or not.
        self._connections: set[ServerConnection] = set()
        #: network -> identity -> admitted client.
        self._clients: dict[str, dict[bytes, _Client]] = {}
        self._sessions: dict[bytes, _Session] = {}
        self._labels: set[bytes] = set()
        self._counters = RelayCounters()
        self._connection_class = type("RelayConnection", (_CountingConnection,), {"stages": self._counters.connections})
        self._tasks: set[asyncio.Task[None]] = set()

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and start serving; afterwards :attr:`port` is the bound port."""
        if self._server is not None:
            raise RelayError("relay already started")
        try:
            self._server = await serve(
                self._handle,
                self._config.host,
                self._config.port,
                ssl=self._config.ssl,
                process_request=self._process_request,
                # Frames are small and mostly sealed (incompressible): deflate would only cost CPU.
                compression=None,
                max_size=WEBSOCKET_MAX_SIZE,
                ping_interval=RELAY_KEEPALIVE_INTERVAL,
                ping_timeout=RELAY_KEEPALIVE_INTERVAL,
                # asyncio's default backlog (100) overflows under a few hundred logins a second.
                backlog=LISTEN_BACKLOG,
                create_connection=self._connection_class,
            )
        except OSError as exc:
            raise RelayError(
                f"cannot listen on {_format_addr(self._config.host, self._config.port)}: {exc.strerror or exc}"
            ) from None
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Tell every client the relay is going away (ERROR SERVER_SHUTDOWN), close with 1001, wait for handlers.

        Idempotent; concurrent callers all wait for the one shutdown.
        """
        if self._server is None:
            return
        if self._close_task is None:
            self._close_task = asyncio.get_running_loop().create_task(self._shutdown(self._server))
        await asyncio.shield(self._close_task)

    async def _shutdown(self, server: Server) -> None:
        self._closing = True
        notice = encode(Error(ErrorCode.SERVER_SHUTDOWN, "relay shutting down"))

        async def tell(ws: ServerConnection) -> None:
            with contextlib.suppress(ConnectionClosed, TimeoutError):
                async with asyncio.timeout(RELAY_SHUTDOWN_GRACE):
                    await ws.send(notice)

        open_connections = list(self._connections)
        await asyncio.gather(*(tell(ws) for ws in open_connections))
        server.close(close_connections=True, code=CloseCode.GOING_AWAY, reason="relay shutting down")
        await server.wait_closed()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        log.info(_kv("shutdown", connections=len(open_connections)))

    # --- operator interface ---------------------------------------------------------

    def set_networks(self, networks: dict[str, frozenset[bytes]]) -> None:
        """Replace the served networks and their member sets; disconnect clients no longer allowed in."""
        previous = self._networks
        self._networks = _validate_networks(networks)
        self._members_frames = {name: _members_frame(members) for name, members in self._networks.items()}
        log.info(
            _kv(
                "networks_updated",
                networks=",".join(f"{name}:{len(members)}" for name, members in sorted(self._networks.items())),
            )
        )
        for network, clients in list(self._clients.items()):
            members = self._networks.get(network)
            for identity, client in list(clients.items()):
                if members is None:
                    code, reason = ErrorCode.UNKNOWN_NETWORK, f"network '{network}' is no longer served by this relay"
                elif identity not in members:
                    code = ErrorCode.NOT_A_MEMBER
                    reason = f"{encode_public(identity)} was removed from the members of network '{network}'"
                else:
                    continue
                notes = self._detach(client, "removed from the network")
                log.info(_kv("evicted", network=network, peer=client.name, addr=client.addr, reason=reason))
                self._spawn(self._evict(client, notes or [], code, reason))
        # Who is a member decides when a node may let its relay connection go: tell the ones that stay.
        for network, clients in self._clients.items():
            if network in self._networks and self._networks[network] != previous.get(network):
                for client in list(clients.values()):
                    self._spawn(self._tell(client, self._members_frames[network]))

    def metrics_text(self) -> str:
        """The Prometheus text exposition served at ``/metrics``."""
        text = render_metrics(
            self._counters,
            clients_connected=self._client_count,
            connections_open=len(self._connections),
            logins_pending=self._admission.pending,
            refused=self._admission.refused,
            sessions=[
                SessionSample(s.label, s.bytes_a_to_b + s.bytes_b_to_a, s.frames_a_to_b + s.frames_b_to_a)
                for s in self._sessions.values()
            ],
        )
        if self._extra_metrics is not None:
            text += "".join(line + "\n" for line in self._extra_metrics())
        return text

    def sessions(self) -> list[SessionStats]:
        """Snapshots of the active sessions."""
        return [self._stats(s) for s in self._sessions.values()]

    def session_stats(self, session_id: bytes) -> SessionStats | None:
        session = self._sessions.get(session_id)
        return None if session is None else self._stats(session)

    @staticmethod
    def _stats(s: _Session) -> SessionStats:
        return SessionStats(
            s.session_id,
            s.network,
            s.a.identity,
            s.b.identity,
            s.established,
            s.bytes_a_to_b,
            s.frames_a_to_b,
            s.bytes_b_to_a,
            s.frames_b_to_a,
        )

    # --- HTTP ---------------------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        upgrade = request.headers.get("Upgrade", "")
        if upgrade.lower() == "websocket":
            return self._rate_limit(connection)  # a peer (None): carry on with the WebSocket handshake
        if urlsplit(request.path).path == "/metrics":
            response = connection.respond(HTTPStatus.OK, self.metrics_text())
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = CONTENT_TYPE
            return response
        return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")

    def _rate_limit(self, connection: ServerConnection) -> Response | None:
        """Too many new connections from one address: 429 before the upgrade, counted, no handler."""
        if self._connection_limiter is None:
            return None
        observed = _observed_address(connection)
        if observed is None or self._connection_limiter.allow(observed[0], asyncio.get_running_loop().time()):
            return None
        self._admission.refused[REFUSED_RATE] += 1
        self._refusal_log.event(
            asyncio.get_running_loop().time(),
            "refused",
            logging.INFO,
            addr=observed[0],
            reason=f"more than {self._config.connection_rate:g} new connections a second from this address",
        )
        return connection.respond(HTTPStatus.TOO_MANY_REQUESTS, "too many connections from your address: retry later\n")

    # --- one connection ---------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        self._counters.connections["websocket"] += 1
        self._connections.add(ws)
        addr = "-"
        client: _Client | None = None
        leave_reason = "disconnected"
        try:
            observed = _observed_address(ws)
            if observed is None:
                return  # gone before we looked
            addr = _format_addr(*observed)
            client, new_sessions = await self._admit_login(ws, observed, addr)
            # No await between admission and here: the client is in the registry
            # only while this handler owns it, so the finally below always cleans up.
            await self._announce(client, new_sessions)
            await self._serve(client)
        except _ClientRefused as refusal:
            self._record_refusal(addr, client, refusal)
            leave_reason = "protocol error" if refusal.event == "protocol_error" else "refused"
            if client is not None:
                await self._leave(client, leave_reason)
            with contextlib.suppress(ConnectionClosed):
                await ws.send(encode(Error(refusal.code, _clip(refusal.reason))))
            await ws.close(refusal.close_code, refusal.code.name.lower().replace("_", " "))
        except ConnectionClosed as exc:
            # websockets itself closes with 1009 above max_size; that is the client's protocol error.
            if exc.sent is not None and exc.sent.code == CloseCode.MESSAGE_TOO_BIG:
                self._counters.protocol_errors += 1
                leave_reason = "protocol error"
                log.info(
                    _kv(
                        "protocol_error",
                        addr=addr,
                        peer=client.name if client else "-",
                        reason=f"message over {WEBSOCKET_MAX_SIZE} bytes, closed with 1009",
                    )
                )
            elif client is None and not self._closing and addr != "-":
                # Gone in the middle of its login. The admission policy counts that against the
                # address like a failed login (a flood of connect-and-hang-up is one), so count it here too.
                self._counters.auth_failures["abandoned"] += 1
                log.info(
                    _kv(
                        "auth_failed",
                        reason="abandoned",
                        network="-",
                        peer="-",
                        addr=addr,
                        detail="the connection closed before the login was over",
                    )
                )
        except Exception:
            # Nothing a client sends may take the relay down; this is a bug, so keep the traceback.
            log.exception(_kv("internal_error", addr=addr, peer=client.name if client else "-"))
            leave_reason = "relay internal error"
            with contextlib.suppress(Exception):
                await ws.close(CloseCode.INTERNAL_ERROR, "relay internal error")
        finally:
            self._connections.discard(ws)
            if self._closing:
                leave_reason = "relay shutting down"
            if client is not None:
                try:
                    await self._leave(client, leave_reason)
                except Exception:
                    log.exception(_kv("internal_error", addr=addr, peer=client.name, stage="leave"))

    async def _recv_pre_auth(self, ws: ServerConnection, deadline: float, expected: MsgType) -> bytes:
        try:
            async with asyncio.timeout_at(deadline):
                data = await ws.recv()
        except TimeoutError:
            raise _auth_failure(
                ErrorCode.AUTH_TIMEOUT,
                f"no {expected.name} within {self._config.auth_timeout:g} s of connecting",
                "auth_timeout",
            ) from None
        kind, frame = _classify(data)
        if kind != expected:
            raise _protocol_error(f"expected {expected.name}, got {kind.name}: authenticate (HELLO, AUTH) first")
        return frame

    def _check_member(self, network: str, identity: bytes) -> None:
        members = self._networks.get(network)
        if members is None:
            raise _auth_failure(
                ErrorCode.UNKNOWN_NETWORK, f"network '{network}' is not served by this relay", "unknown_network"
            )
        if identity not in members:
            raise _auth_failure(
                ErrorCode.NOT_A_MEMBER,
                f"not a member of network '{network}'; ask the relay operator to add "
                f"{encode_public(identity)} to the members file of network '{network}'",
                "not_a_member",
            )

    async def _admit_login(
        self, ws: ServerConnection, observed: tuple[str, int], addr: str
    ) -> tuple[_Client, list[_Session]]:
        """The admission policy first (a refusal costs the relay next to nothing), then the login."""
        loop = asyncio.get_running_loop()
        ip = observed[0]
        refusal = self._admission.connect(ip, loop.time(), self._client_count)
        if refusal is not None:
            raise _ClientRefused(
                ErrorCode.OVERLOADED,
                refusal.message,
                event="refused",
                close_code=CloseCode.TRY_AGAIN_LATER,
                metric_reason=refusal.reason,
            )
        failed = True
        try:
            result = await self._authenticate(ws, observed)
            failed = False
            return result
        except _ClientRefused as login_refusal:
            failed = login_refusal.code != ErrorCode.DUPLICATE_LOGIN
            raise
        finally:
            self._admission.login_ended(ip, loop.time(), failed=failed)

    async def _authenticate(self, ws: ServerConnection, observed: tuple[str, int]) -> tuple[_Client, list[_Session]]:
        """HELLO, CHALLENGE, AUTH, membership, duplicate check; on success the client is admitted."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.auth_timeout
        hello = _decode_as(await self._recv_pre_auth(ws, deadline, MsgType.HELLO), Hello)
        try:
            if hello.network not in self._networks:
                raise _auth_failure(
                    ErrorCode.UNKNOWN_NETWORK,
                    f"network '{hello.network}' is not served by this relay",
                    "unknown_network",
                )
            nonce = secrets.token_bytes(NONCE_SIZE)
            await ws.send(encode(Challenge(nonce)))
            auth = _decode_as(await self._recv_pre_auth(ws, deadline, MsgType.AUTH), Auth)
            try:
                public = Ed25519PublicKey.from_public_bytes(hello.identity)
                public.verify(auth.signature, relay_auth_message(hello.network, hello.identity, nonce))
            except (InvalidSignature, ValueError):
                raise _auth_failure(
                    ErrorCode.BAD_SIGNATURE,
                    f"the AUTH signature does not verify for identity {encode_public(hello.identity)}",
                    "bad_signature",
                ) from None
            # Membership only after the signature: nobody learns who is on the list without the key.
            self._check_member(hello.network, hello.identity)
            client = _Client(ws, hello.network, hello.identity, hello.supports_direct, observed)
            await self._claim_slot(client)
        except _ClientRefused as refusal:
            refusal.network, refusal.peer = hello.network, short_id(hello.identity)
            raise
        return client, self._admit(client)

    async def _announce(self, client: _Client, new_sessions: list[_Session]) -> None:
        """AUTH_OK to the newcomer, then PEER_JOINED to both ends of each new session."""
        # The first write happens before any await, so AUTH_OK always precedes
        # any PEER_JOINED another newcomer could send this client.
        await self._send(client, encode(AuthOk(*client.observed)))
        await self._send(client, self._members_frames[client.network])
        log.info(
            _kv(
                "auth_ok",
                network=client.network,
                peer=client.name,
                addr=client.addr,
                direct="yes" if client.supports_direct else "no",
                peers=len(new_sessions),
            )
        )
        for session in new_sessions:
            if session.session_id not in self._sessions:
                continue  # the other end left while we were announcing; it already said PEER_LEFT
            other = session.a
            log.info(_kv("paired", network=session.network, session=session.label, a=other.name, b=client.name))
            await self._send(client, encode(PeerJoined(session.session_id, other.identity)))
            await self._send(other, encode(PeerJoined(session.session_id, client.identity)))

    async def _claim_slot(self, client: _Client) -> None:
        """Make room for ``client``'s identity: refuse it if a live login holds the slot, evict a stale one."""
        while True:
            self._check_member(client.network, client.identity)  # set_networks may have run while we waited
            existing = self._clients.get(client.network, {}).get(client.identity)
            if existing is None:
                return
            alive = await self._answers_ping(existing)
            if self._clients.get(client.network, {}).get(client.identity) is not existing:
                continue  # it left (or was replaced) while we pinged; look again
            if alive:
                raise _auth_failure(
                    ErrorCode.DUPLICATE_LOGIN,
                    f"identity {client.name} is already logged in to network '{client.network}' "
                    f"from {existing.addr}, and that connection is alive",
                    "duplicate_login",
                )
            # A restarted peer process: its old connection no longer answers.
            notes = self._detach(existing, "replaced by a new login") or []
            log.info(
                _kv("stale_replaced", network=client.network, peer=client.name, old=existing.addr, new=client.addr)
            )
            existing.ws.transport.abort()
            await self._notify(notes)

    async def _answers_ping(self, client: _Client) -> bool:
        try:
            async with asyncio.timeout(self._config.duplicate_ping_timeout):
                pong = await client.ws.ping()
                await pong
        except (TimeoutError, ConnectionClosed):
            return False
        return True

    def _admit(self, client: _Client) -> list[_Session]:
        """Register ``client`` and create a session with every other admitted client of its network."""
        peers = self._clients.setdefault(client.network, {})
        sessions = []
        for other in peers.values():
            session_id = secrets.token_bytes(SESSION_ID_SIZE)
            # Unique in the first 4 bytes too: that prefix is the session's label in logs and
            # metrics, and two series with one label would make Prometheus reject the scrape.
            while session_id[:4] in self._labels:
                session_id = secrets.token_bytes(SESSION_ID_SIZE)
            self._labels.add(session_id[:4])
            session = _Session(session_id, client.network, a=other, b=client)
            self._sessions[session_id] = session
            other.sessions[session_id] = session
            client.sessions[session_id] = session
            sessions.append(session)
            self._counters.sessions_created += 1
        peers[client.identity] = client
        self._client_count += 1
        return sessions

    async def _serve(self, client: _Client) -> None:
        while True:
            message = await client.ws.recv()
            if client.detached:
                # Evicted or replaced while the message was in flight; whoever detached us
                # closes the connection (after its ERROR frame), so do not race it with a close of our own.
                await client.ws.wait_closed()
                return
            kind, data = _classify(message)
            if kind in FORWARDED_TYPES:
                await self._forward(client, kind, data)
            elif kind == MsgType.READY:
                await self._ready(client, _decode_as(data, Ready).session_id)
            elif kind == MsgType.RELEASE:
                self._release(client, _decode_as(data, Release).session_id)
            elif kind == MsgType.ERROR:
                error = _decode_as(data, Error)
                log.info(_kv("client_error", peer=client.name, addr=client.addr, code=error.code, reason=error.reason))
                await client.ws.close()
                return
            elif kind in _RELAY_ONLY_TYPES:
                raise _protocol_error(f"{kind.name} frames are sent by the relay, not by clients")
            else:  # HELLO or AUTH
                raise _protocol_error(f"{kind.name} after authentication: this connection is already logged in")

    async def _forward(self, sender: _Client, kind: MsgType, data: bytes) -> None:
        try:
            session_id = peek_session_id(data, kind)
        except FrameError as exc:
            raise _protocol_error(f"malformed {kind.name} frame: {exc}") from None
        session = sender.sessions.get(session_id)
        if session is None:
            # Normal in a race (the peer just left, the session was released): drop, never disconnect.
            self._drop(sender, kind, session_id, "unknown session")
            return
        if session.released_by(sender):
            self._drop(sender, kind, session_id, "released")
            return
        if not await self._send(session.other(sender), data):
            self._drop(sender, kind, session_id, "peer gone")
            return
        session.count(sender, len(data))
        self._counters.forwarded_bytes += len(data)
        self._counters.forwarded_frames += 1

    def _drop(self, sender: _Client, kind: MsgType, session_id: bytes, why: str) -> None:
        self._counters.dropped_frames += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug(_kv("dropped", peer=sender.name, type=kind.name, session=session_id.hex()[:8], reason=why))

    async def _ready(self, client: _Client, session_id: bytes) -> None:
        session = client.sessions.get(session_id)
        if session is None:
            log.debug(_kv("unknown_session", peer=client.name, type="READY", session=session_id.hex()[:8]))
            return
        if client is session.a:
            session.ready_a = True
        else:
            session.ready_b = True
        if session.established or not (session.ready_a and session.ready_b):
            return
        session.established = True
        self._counters.sessions_established += 1
        log.info(
            _kv(
                "established",
                network=session.network,
                session=session.label,
                a=session.a.name,
                a_addr=session.a.addr,
                b=session.b.name,
                b_addr=session.b.addr,
            )
        )
        for end in (session.a, session.b):
            other = session.other(end)
            await self._send(
                end,
                encode(
                    Established(
                        session_id=session.session_id,
                        mtu=self._config.mtu,
                        heartbeat_interval=self._config.heartbeat_interval,
                        key_rotation_interval=self._config.key_rotation_interval,
                        peer_public_ip=other.observed[0],
                        peer_public_port=other.observed[1],
                        peer_supports_direct=other.supports_direct,
                    )
                ),
            )

    def _release(self, client: _Client, session_id: bytes) -> None:
        session = client.sessions.get(session_id)
        if session is None:
            log.debug(_kv("unknown_session", peer=client.name, type="RELEASE", session=session_id.hex()[:8]))
            return
        if session.released_by(client):
            return
        if client is session.a:
            session.released_a = True
        else:
            session.released_b = True
        both = session.released_a and session.released_b
        if both:
            self._forget(session)
            self._counters.releases += 1
        log.info(
            _kv(
                "released" if both else "half_released",
                network=session.network,
                session=session.label,
                by=client.name,
                a=session.a.name,
                b=session.b.name,
                bytes_a_to_b=session.bytes_a_to_b,
                bytes_b_to_a=session.bytes_b_to_a,
            )
        )

    def _forget(self, session: _Session) -> None:
        self._sessions.pop(session.session_id, None)
        self._labels.discard(session.session_id[:4])
        session.a.sessions.pop(session.session_id, None)
        session.b.sessions.pop(session.session_id, None)

    # --- leaving -------------------------------------------------------------------------

    def _detach(self, client: _Client, reason: str) -> list[tuple[_Client, bytes]] | None:
        """Unregister ``client`` and end its sessions; return the PEER_LEFT frames to send, None if already done."""
        if client.detached:
            return None
        client.detached = True
        peers = self._clients.get(client.network, {})
        if peers.get(client.identity) is client:
            del peers[client.identity]
            self._client_count -= 1
            if not peers:
                self._clients.pop(client.network, None)
        notes = []
        for session in list(client.sessions.values()):
            self._forget(session)
            other = session.other(client)
            log.info(
                _kv(
                    "peer_left",
                    network=session.network,
                    session=session.label,
                    peer=client.name,
                    other=other.name,
                    reason=reason,
                    bytes_a_to_b=session.bytes_a_to_b,
                    bytes_b_to_a=session.bytes_b_to_a,
                )
            )
            notes.append((other, encode(PeerLeft(session.session_id, client.identity, _clip(reason)))))
        return notes

    async def _notify(self, notes: list[tuple[_Client, bytes]]) -> None:
        if notes and not self._closing:
            await asyncio.gather(*(self._send(other, data) for other, data in notes))

    async def _leave(self, client: _Client, reason: str) -> None:
        notes = self._detach(client, reason)
        if notes is None:
            return
        log.info(_kv("disconnected", network=client.network, peer=client.name, addr=client.addr, reason=reason))
        await self._notify(notes)

    async def _evict(self, client: _Client, notes: list[tuple[_Client, bytes]], code: ErrorCode, reason: str) -> None:
        await self._send(client, encode(Error(code, _clip(reason))))
        await self._notify(notes)
        await client.ws.close(CloseCode.POLICY_VIOLATION, "no longer a member")

    def _record_refusal(self, addr: str, client: _Client | None, refusal: _ClientRefused) -> None:
        if refusal.event == "refused":
            # Counted by the admission policy (its reasons are /metrics labels).
            log.info(_kv("refused", addr=addr, reason=refusal.metric_reason, detail=refusal.reason))
        elif refusal.event == "auth_failed":
            self._counters.auth_failures[refusal.metric_reason] += 1
            log.info(
                _kv(
                    "auth_failed",
                    reason=refusal.metric_reason,
                    network=refusal.network,
                    peer=refusal.peer,
                    addr=addr,
                    detail=refusal.reason,
                )
            )
        else:
            self._counters.protocol_errors += 1
            log.info(
                _kv(
                    "protocol_error",
                    network=client.network if client else refusal.network,
                    peer=client.name if client else refusal.peer,
                    addr=addr,
                    reason=refusal.reason,
                )
            )

    # --- plumbing --------------------------------------------------------------------------

    async def _send(self, client: _Client, data: bytes) -> bool:
        """Send to ``client``; False if its connection is gone (its own handler cleans up)."""
        try:
            await client.ws.send(data)
        except ConnectionClosed:
            return False
        return True

    async def _tell(self, client: _Client, data: bytes) -> None:
        await self._send(client, data)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def reload_members(relay: RelayServer, files: Mapping[str, Path]) -> bool:
    """SIGHUP: re-read every network's members file and apply them all, or none.

    Members who stay keep their sessions; removed ones are told NOT_A_MEMBER and
    disconnected, and their peers get PEER_LEFT (:meth:`RelayServer.set_networks`). A file
    that is missing or malformed changes nothing: the relay keeps serving the lists it
    has (never an empty one in their place) and says which file is wrong and why.
    """
    try:
        networks = load_networks(files)
        changes = diff_networks(relay._networks, networks)
        relay.set_networks(networks)
    except (IdentityError, RelayConfigError) as exc:
        relay._counters.member_reloads["error"] += 1
        log.error(_kv("members_reload_failed", error=str(exc), action="kept the previous members of every network"))
        return False
    relay._counters.member_reloads["ok"] += 1
    log.info(
        _kv(
            "members_reloaded",
            changes="; ".join(f"{name} {change.summary()}" for name, change in changes.items()),
            changed=sum(change.changed for change in changes.values()),
        )
    )
    return True


async def run_relay(
    config: RelayConfig,
    *,
    extra_metrics: Callable[[], Iterable[str]] | None = None,
    members_files: Mapping[str, Path] | None = None,
) -> None:
    """Serve until cancelled, SIGINT or SIGTERM, then shut down gracefully.

    ``extra_metrics`` adds lines to /metrics (the STUN server's, when `traversal relay --stun` runs one).
    With ``members_files`` (network -> file), SIGHUP re-reads them (:func:`reload_members`).
    """
    open_files = prepare_process()
    relay = RelayServer(config, extra_metrics=extra_metrics)
    await relay.start()
    scheme = "wss" if config.ssl is not None else "ws"
    url = f"{scheme}://{_format_addr(config.host, relay.port)}"
    names = sorted(config.networks)
    # A key=value line for tools that follow the log (the lab waits for it), and the line a person reads.
    log.info(_kv("relay_listening", url=url, networks=",".join(names) or "-", max_open_files=open_files))
    log.info("relay listening on %s (networks: %s)", url, ", ".join(names) or "none")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []
    handlers: dict[signal.Signals, Callable[[], object]] = {signal.SIGINT: stop.set, signal.SIGTERM: stop.set}
    if members_files is not None:
        files = dict(members_files)
        handlers[signal.SIGHUP] = lambda: reload_members(relay, files)
    for sig, handler in handlers.items():
        try:
            loop.add_signal_handler(sig, handler)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread (e.g. tests): cancellation still stops us
    try:
        await stop.wait()
        log.info(_kv("signal", action="shutting down"))
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await relay.close()
