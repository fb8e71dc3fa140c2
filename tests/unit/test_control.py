"""Tests for traversal/control.py: a real ControlServer on a Unix socket in tmp_path, queried as `status` does.

The server runs on the test's event loop; the blocking ``query`` runs in a
worker thread (``asyncio.to_thread``), all of it bounded by ``wait_for``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest

from traversal.control import ControlError, ControlServer, query

TEST_TIMEOUT = 10.0
STATUS = {"identity": "AAAA", "peers": [{"identity": "BBBB", "rtt_ms": 1.5}]}


def run(coro: Awaitable[Any]) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, TEST_TIMEOUT)

    return asyncio.run(bounded())


async def ask(path: Path, command: str = "status") -> dict[str, Any]:
    return await asyncio.to_thread(query, path, command, TEST_TIMEOUT / 2)


def test_status_round_trip_on_a_private_socket(tmp_path: Path) -> None:
    path = tmp_path / "run" / "tap0.sock"
    calls: list[int] = []

    def status() -> dict[str, Any]:
        calls.append(1)
        return STATUS

    async def scenario() -> None:
        umask = os.umask(0o022)
        try:
            server = ControlServer(path, status)
            await server.start()
            assert os.umask(0o022) == 0o022  # start() put the process umask back
        finally:
            os.umask(umask)
        try:
            info = path.stat()
            assert stat.S_ISSOCK(info.st_mode)
            assert stat.S_IMODE(info.st_mode) == 0o600
            assert await ask(path) == STATUS
            assert await ask(path) == STATUS
            assert len(calls) == 2  # asked afresh each time
        finally:
            await server.close()

    run(scenario())


def test_unknown_command_gets_an_error_object(tmp_path: Path) -> None:
    path = tmp_path / "tap0.sock"

    async def scenario() -> None:
        server = ControlServer(path, lambda: STATUS)
        await server.start()
        try:
            reply = await ask(path, "reboot")
            assert set(reply) == {"error"}
            assert "unknown command 'reboot'" in reply["error"] and "status" in reply["error"]
            assert await ask(path) == STATUS  # the server carries on
        finally:
            await server.close()

    run(scenario())


def test_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "tap0.sock"
    # What a crashed node leaves: a socket file nobody listens on.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as crashed:
        crashed.bind(str(path))
    assert stat.S_ISSOCK(path.stat().st_mode)
    with pytest.raises(ControlError, match="cannot reach the node"):
        query(path, timeout=1.0)

    async def scenario() -> None:
        server = ControlServer(path, lambda: STATUS)
        await server.start()
        try:
            assert await ask(path) == STATUS
        finally:
            await server.close()

    run(scenario())


def test_live_socket_is_not_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "tap0.sock"

    async def scenario() -> None:
        first = ControlServer(path, lambda: STATUS)
        await first.start()
        try:
            second = ControlServer(path, lambda: {"identity": "intruder"})
            with pytest.raises(ControlError, match=r"another traversal node already answers on .*--control"):
                await second.start()
            assert await ask(path) == STATUS  # the first node still owns it
        finally:
            await first.close()

    run(scenario())


def test_failed_start_then_close_leaves_the_live_socket_alone(tmp_path: Path) -> None:
    path = tmp_path / "tap0.sock"

    async def scenario() -> None:
        first = ControlServer(path, lambda: STATUS)
        await first.start()
        try:
            second = ControlServer(path, lambda: {"identity": "intruder"})
            with pytest.raises(ControlError):
                await second.start()
            await second.close()  # what Node.run's cleanup does after the failed start
            assert await ask(path) == STATUS
        finally:
            await first.close()

    run(scenario())


def test_a_file_that_is_not_a_socket_is_not_deleted(tmp_path: Path) -> None:
    path = tmp_path / "important.conf"
    path.write_text("keep me\n")

    async def scenario() -> None:
        server = ControlServer(path, lambda: STATUS)
        try:
            await server.start()
        except ControlError:
            return
        await server.close()
        pytest.fail(f"start() replaced the regular file {path} with its socket")

    run(scenario())
    assert path.read_text() == "keep me\n"


def test_query_without_a_node_explains(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match=r"no control socket at .*missing\.sock: is `traversal connect` running"):
        query(tmp_path / "missing.sock")
    not_a_socket = tmp_path / "file.sock"
    not_a_socket.write_text("")
    with pytest.raises(ControlError, match="cannot reach the node at"):
        query(not_a_socket, timeout=1.0)


def test_close_removes_the_socket_file(tmp_path: Path) -> None:
    path = tmp_path / "tap0.sock"

    async def scenario() -> None:
        server = ControlServer(path, lambda: STATUS)
        await server.start()
        assert path.exists()
        await server.close()
        assert not path.exists()
        await server.close()  # twice is fine
        with pytest.raises(ControlError, match="no control socket"):
            await ask(path)

    run(scenario())


def test_extra_commands_are_dispatched_by_their_full_line(tmp_path: Path) -> None:
    path = tmp_path / "tap0.sock"
    asked: list[str] = []

    def path_command(where: str) -> dict[str, Any]:
        asked.append(where)
        return {"ok": True, "path": where}

    async def scenario() -> None:
        server = ControlServer(
            path,
            lambda: STATUS,
            {"path relay": lambda: path_command("relay"), "path direct": lambda: path_command("direct")},
        )
        await server.start()
        try:
            assert await ask(path, "path relay") == {"ok": True, "path": "relay"}
            assert await ask(path, "path direct") == {"ok": True, "path": "direct"}
            reply = await ask(path, "path sideways")
            assert "path relay" in reply["error"] and "path direct" in reply["error"]
            assert asked == ["relay", "direct"]
        finally:
            await server.close()

    run(scenario())
