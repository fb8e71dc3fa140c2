"""Tests for traversal/cli.py through click's CliRunner: key commands, option and config errors, status.

Commands that would run a node or a relay are only driven into errors that
happen after option parsing, so nothing here opens a TAP or a port (the
``status`` tests serve a real ControlServer on a socket in tmp_path).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from transport.identity import encode_public, generate_identity, load_identity, load_psk, public_bytes
from traversal.cli import main
from traversal.control import ControlServer

STEP = 5.0


@pytest.fixture(autouse=True)
def keep_logging() -> Iterator[None]:
    """`connect` and `relay` call setup_logging, which replaces the root handlers; put them back."""
    names = ("", "websockets", "aioice", "aioquic", "asyncio")
    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).level) for name in names}
    yield
    for name, (handlers, level) in saved.items():
        logging.getLogger(name).handlers[:] = handlers
        logging.getLogger(name).setLevel(level)


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_user_error(result: Result, *words: str) -> str:
    """Exit status 1 and exactly one line on stderr, 'traversal: error: ...', containing ``words``."""
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("traversal: error: ")
    for word in words:
        assert word in lines[0]
    assert "Traceback" not in result.output
    return lines[0]


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


# --- keys ------------------------------------------------------------------------------


def test_keygen_prints_the_public_key_and_writes_a_private_file(tmp_path: Path) -> None:
    out = tmp_path / "keys" / "node.key"
    result = invoke("keygen", "--out", out)
    assert result.exit_code == 0, result.output
    (line,) = result.stdout.splitlines()
    assert len(base64.b64decode(line, validate=True)) == 32
    assert mode(out) == 0o600
    assert encode_public(public_bytes(load_identity(out))) == line


def test_keygen_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    out = tmp_path / "node.key"
    first = invoke("keygen", "--out", out).stdout.strip()
    before = out.read_bytes()
    assert_user_error(invoke("keygen", "--out", out), "already exists", "--force")
    assert out.read_bytes() == before
    forced = invoke("keygen", "--out", out, "--force")
    assert forced.exit_code == 0
    assert forced.stdout.strip() != first
    assert encode_public(public_bytes(load_identity(out))) == forced.stdout.strip()
    assert mode(out) == 0o600


def test_pubkey_prints_the_same_key_as_keygen(tmp_path: Path) -> None:
    out = tmp_path / "node.key"
    printed = invoke("keygen", "--out", out).stdout
    result = invoke("pubkey", "--identity", out)
    assert result.exit_code == 0
    assert result.stdout == printed


def test_pubkey_of_a_bad_file_is_one_clear_error(tmp_path: Path) -> None:
    assert_user_error(invoke("pubkey", "--identity", tmp_path / "none.key"), "does not exist")
    bad = tmp_path / "bad.key"
    bad.write_text("hello\n")
    assert_user_error(invoke("pubkey", "--identity", bad), "not an identity file", "traversal keygen")


def test_genpsk_writes_a_32_byte_psk_once(tmp_path: Path) -> None:
    out = tmp_path / "net.psk"
    result = invoke("genpsk", "--out", out)
    assert result.exit_code == 0
    assert str(out) in result.stdout
    assert len(load_psk(out)) == 32
    assert mode(out) == 0o600
    before = out.read_bytes()
    assert_user_error(invoke("genpsk", "--out", out), "already exists")
    assert out.read_bytes() == before
    assert invoke("genpsk", "--out", out, "--force").exit_code == 0
    assert out.read_bytes() != before


# --- connect -----------------------------------------------------------------------------


def test_connect_without_options_names_what_is_missing() -> None:
    line = assert_user_error(invoke("connect"), "missing --relay, --network, --identity, --address", "--config")
    assert "--ca" not in line


def test_connect_config_with_an_unknown_key(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[connect]\nnetwork = "chr-001"\nrelay_uri = "wss://x:1"\n')
    assert_user_error(invoke("connect", "--config", config), "unknown key 'relay_uri'", "relay_url")


def test_connect_config_with_a_wrong_type(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[connect]\ninsecure = "yes"\n')
    assert_user_error(invoke("connect", "--config", config), "insecure must be a bool")


def test_connect_missing_config_file(tmp_path: Path) -> None:
    assert_user_error(invoke("connect", "--config", tmp_path / "none.toml"), "cannot read config file")


def _connect_config(tmp_path: Path, relay: str) -> Path:
    config = tmp_path / "node.toml"
    config.write_text(
        f'[connect]\nrelay_url = "{relay}"\nnetwork = "chr-001"\nidentity = "{tmp_path / "node.key"}"\n'
        'address = "10.10.10.3/24"\n'
    )
    return config


def test_connect_uses_the_config_file(tmp_path: Path) -> None:
    # Everything comes from the file; its plain ws:// URL is what gets refused.
    config = _connect_config(tmp_path, "ws://x:1")
    assert_user_error(invoke("connect", "--config", config), "refusing plain ws://", "--insecure")


def test_connect_flags_win_over_the_config_file(tmp_path: Path) -> None:
    config = _connect_config(tmp_path, "ws://x:1")
    # The flag's wss:// URL replaces the file's ws:// one: the complaint is now the missing --ca.
    line = assert_user_error(invoke("connect", "--config", config, "--relay", "wss://y:2"), "--ca is required")
    assert "--insecure" not in line
    # Flag order does not matter: --config is eager, the flag still wins.
    assert_user_error(invoke("connect", "--relay", "wss://y:2", "--config", config), "--ca is required")


def test_connect_rejects_a_bad_address(tmp_path: Path) -> None:
    config = _connect_config(tmp_path, "ws://x:1")
    args = ("connect", "--config", config, "--insecure", "--address")
    assert_user_error(invoke(*args, "10.10.10.300/24"), "--address must be an address with prefix length")
    assert_user_error(invoke(*args, "10.10.10.3"), "--address needs a prefix length")


# --- relay ---------------------------------------------------------------------------------


def _members_file(tmp_path: Path) -> Path:
    members = tmp_path / "members"
    members.write_text(encode_public(public_bytes(generate_identity())) + "\n")
    return members


def test_relay_without_members_is_refused() -> None:
    assert_user_error(invoke("relay", "--insecure", "--listen", "127.0.0.1:0"), "no --members", "admit nobody")


def test_relay_members_must_be_network_and_file(tmp_path: Path) -> None:
    assert_user_error(invoke("relay", "--insecure", "--members", "chr-001"), "--members must be NETWORK:FILE")
    assert_user_error(
        invoke("relay", "--insecure", "--members", f"chr-001:{tmp_path / 'none'}"), "members file", "does not exist"
    )
    bad = tmp_path / "bad.members"
    bad.write_text("not-a-key\n")
    assert_user_error(invoke("relay", "--insecure", "--members", f"chr-001:{bad}"), f"{bad} line 1", "not a base64")


@pytest.mark.parametrize("command", ["relay", "connect"])
def test_help_says_sighup_rereads_the_members(command: str) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "SIGHUP re-reads" in " ".join(result.stdout.split())


@pytest.mark.parametrize(
    "tls",
    [
        ("--insecure", "--self-signed", "{tmp}/tls"),
        ("--cert", "{tmp}/c.pem", "--key", "{tmp}/k.pem", "--insecure"),
        ("--cert", "{tmp}/c.pem", "--self-signed", "{tmp}/tls"),
        (),
    ],
)
def test_relay_needs_exactly_one_tls_mode(tmp_path: Path, tls: tuple[str, ...]) -> None:
    args = [arg.format(tmp=tmp_path) for arg in tls]
    result = invoke("relay", "--listen", "127.0.0.1:0", "--members", f"chr-001:{_members_file(tmp_path)}", *args)
    assert_user_error(result, "choose exactly one of --cert/--key, --self-signed DIR or --insecure")
    assert not (tmp_path / "tls").exists()  # refused before making a certificate


def test_relay_rejects_a_bad_listen_address(tmp_path: Path) -> None:
    assert_user_error(invoke("relay", "--listen", "8443", "--insecure"), "--listen must be HOST:PORT")


def test_relay_config_with_an_unknown_key(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text('[relay]\nlisten = "127.0.0.1:0"\nself_sign = "/tmp/x"\n')
    assert_user_error(invoke("relay", "--config", config), "unknown key 'self_sign' in [relay]", "self_signed")


# --- status --------------------------------------------------------------------------------


def test_status_without_a_node_is_one_clear_error(tmp_path: Path) -> None:
    line = assert_user_error(invoke("status", "--control", tmp_path / "nonexistent.sock"), "no control socket")
    assert "traversal connect" in line


STATUS: dict[str, Any] = {
    "identity": "AAAA",
    "network": "chr-001",
    "trust": "members file",
    "relay": {"url": "wss://relay.example:8443", "state": "connected", "observed": "203.0.113.9:51000"},
    "tap": {"name": "tap0", "address": "10.10.10.3/24", "mtu": 1400},
    "peers": [
        {
            "identity": "PEERKEY1",
            "state": "established",
            "path": "relay",
            "endpoint": "198.51.100.7:40001",
            "rx_bytes": 2048,
            "tx_bytes": 100,
            "rtt_ms": 50.0,
            "session_age_s": 12.3,
        }
    ],
}


@pytest.fixture
def control_socket(tmp_path: Path) -> Iterator[Path]:
    """A real ControlServer answering STATUS, on an event loop in a background thread."""
    path = tmp_path / "node.sock"
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = ControlServer(path, lambda: STATUS)
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(STEP)
        yield path
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(STEP)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(STEP)
        loop.close()


def test_status_json_prints_what_the_node_answers(control_socket: Path) -> None:
    result = invoke("status", "--control", control_socket, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == STATUS


def test_status_table_shows_path_endpoint_and_rtt(control_socket: Path) -> None:
    result = invoke("status", "--control", control_socket)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "identity  AAAA"
    assert "seen as 203.0.113.9:51000" in result.stdout
    (row,) = (line for line in lines if line.startswith("PEERKEY1"))
    columns = row.split()
    assert columns[:4] == ["PEERKEY1", "established", "relay", "198.51.100.7:40001"]
    assert " ".join(columns[4:]) == "2.0 KiB 100 B 50.0 ms 12 s"  # rx, tx, rtt, age


def test_relay_limits_are_flags_with_their_defaults_shown() -> None:
    text = invoke("relay", "--help").stdout
    for flag, default in (
        ("--max-clients", "20000"),
        ("--max-pending-logins", "1000"),
        ("--auth-timeout", "10.0"),
        ("--auth-failures", "20"),
        ("--conn-rate", "20.0"),
        ("--stun-rate", "50.0"),
        ("--stun-burst", "200"),
    ):
        assert flag in text, flag
        entry = " ".join(text[text.index(f"\n  {flag} ") :].split())  # its own entry; click wraps the help
        assert entry[entry.index("[default: ") :].startswith(f"[default: {default}"), (flag, default)


def test_relay_refuses_a_zero_stun_rate(tmp_path: Path) -> None:
    result = invoke("relay", "--members", f"net:{tmp_path / 'm'}", "--insecure", "--stun-rate", "0")
    assert result.exit_code == 2 and "--stun-rate" in result.output


def test_connect_refuses_a_relay_checkin_out_of_range() -> None:
    result = invoke(
        "connect", "--relay", "wss://r:1", "--network", "n", "--identity", "k", "--address", "10.10.10.3/24",
        "--relay-checkin", "5",
    )  # fmt: skip
    assert result.exit_code != 0 and "--relay-checkin" in result.output
