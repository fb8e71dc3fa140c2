"""Tests for traversal/relay_client.py against a real RelayServer on 127.0.0.1 with its self-signed TLS.

Sync test functions, each one ``asyncio.run`` bounded by ``asyncio.wait_for``;
the client's own timeouts never come into play because every case ends in an
answer from the relay or the kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import pytest

from relay_server.server import RelayConfig, RelayServer
from relay_server.tls import ensure_self_signed, server_ssl_context
from transport.frames import ErrorCode
from transport.identity import generate_identity, public_bytes
from traversal.relay_client import (
    RelayRefused,
    RelayUnavailable,
    client_ssl_context,
    connect_relay,
    validate_relay_url,
)

NET = "chr-001"
TEST_TIMEOUT = 20.0


def run(coro: Awaitable[Any]) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, TEST_TIMEOUT)

    return asyncio.run(bounded())


@contextlib.asynccontextmanager
async def relay_running(tmp_path: Path, members: frozenset[bytes], tls: bool = True) -> AsyncIterator[tuple[str, Path]]:
    """A relay serving NET on 127.0.0.1; yields its URL and the cert.pem clients pass as --ca."""
    cert, key, _ = ensure_self_signed(tmp_path / "relay-tls", "127.0.0.1")
    context = server_ssl_context(cert, key) if tls else None
    relay = RelayServer(RelayConfig("127.0.0.1", 0, {NET: members}, context))
    await relay.start()
    try:
        yield f"{'wss' if tls else 'ws'}://127.0.0.1:{relay.port}/", cert
    finally:
        await relay.close()


def test_member_logs_in_and_learns_its_observed_address(tmp_path: Path) -> None:
    key = generate_identity()

    async def scenario() -> None:
        async with relay_running(tmp_path, frozenset({public_bytes(key)})) as (url, ca):
            link = await connect_relay(url, ssl_context=client_ssl_context(ca), network=NET, identity=key)
            try:
                assert link.observed_ip == "127.0.0.1"
                assert link.observed_port == link.ws.local_address[1]
            finally:
                await link.close()

    run(scenario())


def test_member_logs_in_over_plain_ws(tmp_path: Path) -> None:
    key = generate_identity()

    async def scenario() -> None:
        async with relay_running(tmp_path, frozenset({public_bytes(key)}), tls=False) as (url, _ca):
            validate_relay_url(url, insecure=True)
            link = await connect_relay(url, ssl_context=None, network=NET, identity=key)
            try:
                assert link.observed_ip == "127.0.0.1"
            finally:
                await link.close()

    run(scenario())


@pytest.mark.parametrize(
    ("network", "member", "code", "words"),
    [
        (NET, False, ErrorCode.NOT_A_MEMBER, "not a member"),
        ("chr-999", True, ErrorCode.UNKNOWN_NETWORK, "not served"),
    ],
)
def test_relay_refuses_non_members_and_unknown_networks(
    tmp_path: Path, network: str, member: bool, code: ErrorCode, words: str
) -> None:
    key = generate_identity()
    members = frozenset({public_bytes(key)}) if member else frozenset({public_bytes(generate_identity())})

    async def scenario() -> RelayRefused:
        async with relay_running(tmp_path, members) as (url, ca):
            with pytest.raises(RelayRefused) as refused:
                await connect_relay(url, ssl_context=client_ssl_context(ca), network=network, identity=key)
            return refused.value

    refusal = run(scenario())
    assert refusal.code == code
    assert words in refusal.reason


def test_closed_port_is_unavailable_not_refused(tmp_path: Path) -> None:
    cert, _, _ = ensure_self_signed(tmp_path / "tls", "127.0.0.1")
    # Bound but not listening: the kernel answers every connection with a reset, and no one can take the port.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        with pytest.raises(RelayUnavailable, match="cannot reach relay"):
            run(
                connect_relay(
                    f"wss://127.0.0.1:{port}/",
                    ssl_context=client_ssl_context(cert),
                    network=NET,
                    identity=generate_identity(),
                )
            )


def test_certificate_other_than_the_ca_file_is_refused_with_a_hint(tmp_path: Path) -> None:
    key = generate_identity()
    other_cert, _, _ = ensure_self_signed(tmp_path / "another-relay", "127.0.0.1")

    async def scenario() -> RelayRefused:
        async with relay_running(tmp_path, frozenset({public_bytes(key)})) as (url, _ca):
            with pytest.raises(RelayRefused) as refused:
                await connect_relay(url, ssl_context=client_ssl_context(other_cert), network=NET, identity=key)
            return refused.value

    refusal = run(scenario())
    assert refusal.code == 0
    assert "not trusted" in refusal.reason and "--ca" in refusal.reason


def test_unreadable_ca_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RelayRefused, match="cannot load the relay CA file"):
        client_ssl_context(tmp_path / "missing.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(RelayRefused, match="cannot load the relay CA file"):
        client_ssl_context(garbage)


def test_plain_ws_needs_insecure() -> None:
    with pytest.raises(RelayRefused, match="--insecure"):
        validate_relay_url("ws://127.0.0.1:8443", insecure=False)
    validate_relay_url("ws://127.0.0.1:8443", insecure=True)
    validate_relay_url("wss://relay.example:8443", insecure=False)
    validate_relay_url("wss://[::1]:8443/", insecure=False)


@pytest.mark.parametrize(
    "url",
    ["", "relay.example:8443", "http://relay.example:8443", "https://relay.example", "wss://", "wss://:8443", "ws:x"],
)
def test_garbage_relay_urls_are_rejected(url: str) -> None:
    for insecure in (False, True):
        with pytest.raises(RelayRefused, match="wss://HOST:PORT") as refused:
            validate_relay_url(url, insecure)
        assert refused.value.code == 0
