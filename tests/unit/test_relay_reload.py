"""Tests for the relay's members reload (SIGHUP): relay_server.server.reload_members and run_relay's handler.

Real websockets over real TLS on 127.0.0.1, with the harness of test_relay_server.py. What a
reload must do: apply every members file or none; keep the sessions of members who stay;
disconnect removed members with their ERROR frame (their peers hear PEER_LEFT); on a file that
is missing or malformed, keep serving the old lists and say which file is wrong; count both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from relay_server.server import RelayConfig, RelayServer, reload_members, run_relay
from relay_server.tls import client_ssl_context, ensure_self_signed, server_ssl_context
from tests.unit.test_relay_server import (
    NET,
    OTHER_NET,
    STEP,
    Harness,
    _https_get,
    expect_forwarding,
    expect_refused,
    keys,
    members,
    metric,
    run,
)
from transport.frames import ErrorCode, Members, PeerJoined, PeerLeft
from transport.identity import encode_public, public_bytes

RELOADS = "traversal_relay_member_reloads_total"


def write_members(path: Path, *ks: Ed25519PrivateKey) -> Path:
    path.write_text("".join(f"{encode_public(public_bytes(k))}  # member\n" for k in ks))
    return path


@contextlib.asynccontextmanager
async def started_relay(tmp_path: Path, networks: dict[str, frozenset[bytes]]) -> AsyncIterator[Harness]:
    """A running relay; unlike test_relay_server's harness, ERROR log lines are allowed (a failed reload logs one)."""
    cert, key, _ = ensure_self_signed(tmp_path / "tls", "127.0.0.1")
    relay = RelayServer(RelayConfig("127.0.0.1", 0, networks, server_ssl_context(cert, key)))
    await relay.start()
    try:
        yield Harness(relay, client_ssl_context(cert), "127.0.0.1")
    finally:
        await relay.close()


def reload_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "traversal.relay" and r.getMessage().startswith(("event=members_reload", "event=evicted"))
    ]


def test_reload_adds_and_removes_members_keeping_the_sessions_of_those_who_stay(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="traversal.relay")
    a_key, b_key, c_key, d_key = keys(4)
    file = write_members(tmp_path / "chr-001.members", a_key, b_key, c_key)
    other = write_members(tmp_path / "chr-002.members", d_key)
    files = {NET: file, OTHER_NET: other}

    async def main() -> None:
        async with started_relay(tmp_path, {NET: members(a_key, b_key, c_key), OTHER_NET: members(d_key)}) as h:
            a, b, sid_ab = await h.pair(a_key, b_key)
            c = await h.login(c_key)
            joined_a, joined_b = await a.recv(), await b.recv()
            assert isinstance(joined_a, PeerJoined) and isinstance(joined_b, PeerJoined)
            sid_ac = joined_a.session_id
            for _ in range(2):
                assert isinstance(await c.recv(), PeerJoined)
            d = await h.login(d_key, OTHER_NET)
            # b goes, e comes (in the file only: e is not online).
            e_key = keys(1)[0]
            write_members(file, a_key, c_key, e_key)
            assert reload_members(h.relay, files) is True
            err = await expect_refused(b.ws, ErrorCode.NOT_A_MEMBER, 1008)
            assert encode_public(b.identity) in err.reason and "removed" in err.reason
            told_a = {await a.recv(), await a.recv()}
            assert PeerLeft(sid_ab, b.identity, "removed from the network") in told_a
            assert Members(3, tuple(sorted(members(a_key, c_key, e_key)))) in told_a
            # a and c kept their session: it still forwards, byte-exact, both ways.
            told_c = {await c.recv(), await c.recv()}
            assert {type(f) for f in told_c} == {PeerLeft, Members}
            await expect_forwarding(a, c, sid_ac)
            # The other network did not change: d is told nothing and stays.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(d.ws.recv(), 0.3)
            # The newcomer gets in, and meets a and c.
            e = await h.login(e_key)
            assert {(await e.recv()).peer, (await e.recv()).peer} == {a.identity, c.identity}  # type: ignore[union-attr]
            text = h.relay.metrics_text()
            assert metric(text, f'{RELOADS}{{result="ok"}}') == 1
            assert metric(text, f'{RELOADS}{{result="error"}}') == 0
            assert metric(text, "traversal_relay_clients_connected") == 4  # a, c, d, e

    run(main())
    lines = reload_lines(caplog)
    assert any(line.startswith("event=evicted ") and "network=chr-001" in line for line in lines), lines
    (summary,) = [line for line in lines if line.startswith("event=members_reloaded ")]
    assert 'changes="chr-001 +1 -1 (3 members); chr-002 +0 -0 (1 member)"' in summary
    assert "changed=1" in summary


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("not-a-key\n", "line 1: not a base64 public key"),
        (None, "does not exist"),
        (b"\xff\xfe\n", "is not UTF-8 text"),
    ],
)
def test_a_bad_members_file_changes_nothing_and_says_which_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str | bytes | None, words: str
) -> None:
    caplog.set_level(logging.INFO, logger="traversal.relay")
    a_key, b_key = keys(2)
    good = write_members(tmp_path / "good.members", a_key, b_key)
    bad = tmp_path / "bad.members"
    if isinstance(content, str):
        bad.write_text(content)
    elif isinstance(content, bytes):
        bad.write_bytes(content)

    async def main() -> None:
        networks = {NET: members(a_key, b_key), OTHER_NET: members(a_key)}
        async with started_relay(tmp_path, networks) as h:
            a, b, sid = await h.pair(a_key, b_key)
            # The good file drops b; the bad one is wrong: all or nothing, so b stays.
            write_members(good, a_key)
            assert reload_members(h.relay, {NET: good, OTHER_NET: bad}) is False
            await expect_forwarding(a, b, sid)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(b.ws.recv(), 0.3)
            text = h.relay.metrics_text()
            assert metric(text, f'{RELOADS}{{result="error"}}') == 1
            assert metric(text, f'{RELOADS}{{result="ok"}}') == 0
            assert metric(text, "traversal_relay_clients_connected") == 2

    run(main())
    (line,) = reload_lines(caplog)
    assert line.startswith("event=members_reload_failed ")
    assert str(bad) in line and words in line and 'action="kept the previous members of every network"' in line
    (record,) = [r for r in caplog.records if r.getMessage() == line]
    assert record.levelno == logging.ERROR


def test_sighup_reloads_the_members_files_of_run_relay(tmp_path: Path) -> None:
    a_key, b_key = keys(2)
    file = write_members(tmp_path / "chr-001.members", a_key)
    cert, key, _ = ensure_self_signed(tmp_path, "127.0.0.1")
    ca = client_ssl_context(cert)

    class Watcher(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self.reloads: asyncio.Queue[str] = asyncio.Queue()

        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith("relay listening on wss://127.0.0.1:") and not self.port.done():
                self.port.set_result(int(message.split(":")[2].split(" ")[0]))
            if message.startswith("event=members_reload"):
                self.reloads.put_nowait(message)

    async def main() -> None:
        watcher = Watcher()
        logger = logging.getLogger("traversal.relay")
        logger.addHandler(watcher)
        level = logger.level
        logger.setLevel(logging.INFO)
        config = RelayConfig("127.0.0.1", 0, {NET: members(a_key)}, server_ssl_context(cert, key))
        task = asyncio.create_task(run_relay(config, members_files={NET: file}))
        try:
            port = await asyncio.wait_for(watcher.port, STEP)
            # Only signal once the handler is in (the default action of SIGHUP ends the process).
            assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, None)
            h = Harness(SimpleNamespace(port=port), ca, "127.0.0.1")  # type: ignore[arg-type]  # only .port is used
            await h.login(a_key)
            write_members(file, a_key, b_key)
            os.kill(os.getpid(), signal.SIGHUP)
            assert (await asyncio.wait_for(watcher.reloads.get(), STEP)).startswith("event=members_reloaded ")
            await h.login(b_key)  # admitted without a restart
            file.write_text("garbage\n")
            os.kill(os.getpid(), signal.SIGHUP)
            assert (await asyncio.wait_for(watcher.reloads.get(), STEP)).startswith("event=members_reload_failed ")
            _, _, text = await asyncio.to_thread(_https_get, port, ca, "/metrics")
            assert metric(text, f'{RELOADS}{{result="ok"}}') == 1
            assert metric(text, f'{RELOADS}{{result="error"}}') == 1
            assert metric(text, "traversal_relay_clients_connected") == 2
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            logger.removeHandler(watcher)
            logger.setLevel(level)
        # Shut down: the handler went with the relay.
        assert signal.getsignal(signal.SIGHUP) in (signal.SIG_DFL, None)

    run(main())
