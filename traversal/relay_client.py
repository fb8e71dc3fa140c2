"""The peer's connection to the relay: WebSocket over TLS, then challenge-response login.

``connect_relay`` returns an authenticated :class:`RelayLink` or raises
:class:`RelayRefused` (the relay said no: retrying will not help, the user
must act) or :class:`RelayUnavailable` (transient: unreachable, restarting,
timed out; the caller retries with backoff).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import websockets
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from websockets.asyncio.client import ClientConnection, connect

from transport import frames
from transport.constants import MAX_FRAME_SIZE
from transport.identity import public_bytes

log = logging.getLogger("traversal.relay_client")

#: Time allowed for TCP + TLS + WebSocket opening and for each login step.
LOGIN_TIMEOUT = 10.0


class RelayRefused(Exception):
    """The relay refused us for a reason retrying cannot fix."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class RelayUnavailable(Exception):
    """The relay could not be reached or dropped us; worth retrying."""


@dataclass
class RelayLink:
    """An authenticated relay connection and what the relay told us at login."""

    ws: ClientConnection
    observed_ip: str
    observed_port: int

    async def send(self, data: bytes) -> None:
        await self.ws.send(data)

    async def close(self) -> None:
        await self.ws.close()


def client_ssl_context(ca: Path | None) -> ssl.SSLContext:
    """Verify the relay against ``ca`` (its self-signed cert or a CA bundle); system CAs if None."""
    try:
        return ssl.create_default_context(cafile=str(ca) if ca else None)
    except (OSError, ssl.SSLError) as exc:
        raise RelayRefused(0, f"cannot load the relay CA file {ca}: {exc}") from None


def validate_relay_url(url: str, insecure: bool) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("wss", "ws") or not parts.hostname:
        raise RelayRefused(0, f"relay URL must look like wss://HOST:PORT, got {url!r}")
    if parts.scheme == "ws" and not insecure:
        raise RelayRefused(0, "refusing plain ws:// without --insecure: the relay login would not be protected by TLS")


async def _recv_frame(ws: ClientConnection) -> frames.Frame:
    try:
        message = await asyncio.wait_for(ws.recv(), LOGIN_TIMEOUT)
    except TimeoutError:
        raise RelayUnavailable("relay did not answer the login in time") from None
    except websockets.ConnectionClosed as exc:
        raise RelayUnavailable(f"relay closed the connection during login ({exc})") from None
    if isinstance(message, str):
        raise RelayUnavailable("relay sent a text message during login")
    try:
        frame = frames.decode(message)
    except frames.FrameError as exc:
        raise RelayUnavailable(f"relay sent a malformed frame during login: {exc}") from None
    if isinstance(frame, frames.Error):
        if frame.code in frames.FATAL_ERRORS or frame.code == frames.ErrorCode.DUPLICATE_LOGIN:
            raise RelayRefused(frame.code, frame.reason)
        raise RelayUnavailable(f"relay error {frame.code}: {frame.reason}")
    return frame


async def connect_relay(
    url: str,
    *,
    ssl_context: ssl.SSLContext | None,
    network: str,
    identity: Ed25519PrivateKey,
    supports_direct: bool = True,
) -> RelayLink:
    """Open the WebSocket and log in; see the module docstring for the errors."""
    identity_raw = public_bytes(identity)
    try:
        ws = await connect(
            url,
            ssl=ssl_context if url.startswith("wss:") else None,
            max_size=2 * MAX_FRAME_SIZE,
            compression=None,
            open_timeout=LOGIN_TIMEOUT,
            ping_interval=15,
            ping_timeout=15,
            close_timeout=2,
        )
    except ssl.SSLCertVerificationError as exc:
        raise RelayRefused(0, f"relay certificate not trusted ({exc.verify_message}); check --ca") from None
    except (OSError, TimeoutError, websockets.InvalidHandshake, websockets.InvalidURI) as exc:
        raise RelayUnavailable(f"cannot reach relay {url}: {exc}") from None
    try:
        await ws.send(frames.encode(frames.Hello(network, identity_raw, supports_direct)))
        challenge = await _recv_frame(ws)
        if not isinstance(challenge, frames.Challenge):
            raise RelayUnavailable(f"relay sent {type(challenge).__name__} instead of CHALLENGE")
        signature = identity.sign(frames.relay_auth_message(network, identity_raw, challenge.nonce))
        await ws.send(frames.encode(frames.Auth(signature)))
        ok = await _recv_frame(ws)
        if not isinstance(ok, frames.AuthOk):
            raise RelayUnavailable(f"relay sent {type(ok).__name__} instead of AUTH_OK")
    except websockets.ConnectionClosed as exc:
        await ws.close()
        raise RelayUnavailable(f"relay closed the connection during login ({exc})") from None
    except BaseException:
        await ws.close()
        raise
    return RelayLink(ws, ok.observed_ip, ok.observed_port)
