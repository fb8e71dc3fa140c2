"""The local control socket: how `traversal status` asks a running node what it is doing.

A Unix stream socket (mode 0600, so only the node's user can ask). The client
writes one line with a command (``status``, ``path relay``, ``path direct``);
the node answers one JSON object and closes. Requests are bounded; anything else gets ``{"error": ...}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_CONTROL_DIR = Path("/run/traversal")
MAX_REQUEST = 256
MAX_RESPONSE = 16 * 1024 * 1024


class ControlError(Exception):
    """The control socket cannot be served or reached; the message says what to do."""


def default_control_path(tap: str) -> Path:
    return DEFAULT_CONTROL_DIR / f"{tap}.sock"


def _socket_is_live(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


class ControlServer:
    """Serves ``status`` from a callback that returns a JSON-able dict."""

    def __init__(
        self,
        path: Path,
        status: Callable[[], dict[str, Any]],
        commands: dict[str, Callable[[], dict[str, Any]]] | None = None,
    ) -> None:
        self.path = path
        self._commands: dict[str, Callable[[], dict[str, Any]]] = {"status": status, **(commands or {})}
        self._server: asyncio.base_events.Server | None = None
        self._created = False  # only a socket we made is ours to remove

    async def start(self) -> None:
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise ControlError(f"{self.path} exists and is not a socket; remove it or pass a different --control")
            if _socket_is_live(self.path):
                raise ControlError(
                    f"another traversal node already answers on {self.path}; pass a different --control path"
                )
            self.path.unlink()  # left over by a node that crashed
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
            self._created = True
        except OSError as exc:
            raise ControlError(f"cannot create control socket {self.path}: {exc.strerror}") from None
        finally:
            os.umask(old_umask)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            command = line[:MAX_REQUEST].decode("utf-8", "replace").strip()
            handler = self._commands.get(command)
            if handler is not None:
                reply: dict[str, Any] = handler()
            else:
                known = ", ".join(sorted(self._commands))
                reply = {"error": f"unknown command {command[:40]!r}; known: {known}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._created:
            self._created = False
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def query(path: Path, command: str = "status", timeout: float = 5.0) -> dict[str, Any]:
    """Ask a running node; raises :class:`ControlError` with a hint when none answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise ControlError(
                f"no control socket at {path}: is `traversal connect` running? (see --control)"
            ) from None
        except OSError as exc:
            raise ControlError(f"cannot reach the node at {path}: {exc.strerror}") from None
        sock.sendall(command.encode() + b"\n")
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise ControlError(f"the node at {path} did not answer within {timeout:.0f}s") from None
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_RESPONSE:
                raise ControlError("the node's answer is too large")
            chunks.append(chunk)
    try:
        reply = json.loads(b"".join(chunks))
    except ValueError:
        raise ControlError(f"the node at {path} sent an answer that is not JSON") from None
    if not isinstance(reply, dict):
        raise ControlError(f"the node at {path} sent an unexpected answer")
    return reply


def find_control_socket() -> Path:
    """The only control socket in the default directory, for `status` without --control."""
    sockets = sorted(DEFAULT_CONTROL_DIR.glob("*.sock")) if DEFAULT_CONTROL_DIR.is_dir() else []
    if len(sockets) == 1:
        return sockets[0]
    if not sockets:
        raise ControlError(
            f"no running node found in {DEFAULT_CONTROL_DIR}; start `traversal connect` or pass --control"
        )
    names = ", ".join(str(s) for s in sockets)
    raise ControlError(f"several nodes are running ({names}); pass --control to pick one")
