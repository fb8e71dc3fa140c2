"""The relay path end to end (direct paths disabled), with real parts: a relay in the lab's WAN namespace, two peers
behind nftables cone NATs, real TAP devices, real WebSocket/TLS, the real PQ handshake.

The tests share one lab (building it and starting three processes is the slow part) and
run in file order: traffic first, then refusals, then a relay restart.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.lab.conftest import load_netns_module

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.lab


overlay_module = load_netns_module("overlay")


def _received(ping_output: str) -> tuple[int, int]:
    match = re.search(r"(\d+) packets transmitted, (\d+) received", ping_output)
    assert match, f"unexpected ping output:\n{ping_output}"
    return int(match.group(1)), int(match.group(2))


@pytest.fixture(scope="module")
def overlay(lab_module: ModuleType, lab_prerequisites: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    lab = lab_module.Lab(nat_a="cone", nat_b="cone")
    with overlay_module.running(lab, tmp_path_factory.mktemp("relay-path")) as run:
        for name in ("a", "b", "stranger"):
            run.keygen(name)
        members = run.write_members(["a", "b"])
        run.start_relay(members)
        # --no-direct keeps these peers on the relay path, which is what this file tests.
        run.start_peer("a", "a", extra=["--no-direct"])
        run.start_peer("b", "b", extra=["--no-direct", "--members", str(members)])
        yield run


def test_peers_reach_established_on_the_relay_path(overlay: Any) -> None:
    started = time.monotonic()
    peer_a = overlay.wait_path("a", "a", "relay", timeout=45)
    peer_b = overlay.wait_path("b", "b", "relay", timeout=45)
    assert peer_a["identity"] == overlay.pubkeys["b"]
    assert peer_b["identity"] == overlay.pubkeys["a"]
    # The relay reports each side's address as it observed it: the other NAT's public address.
    lab = overlay.lab
    assert peer_a["endpoint"].startswith(lab.public_address("b") + ":")
    assert peer_b["endpoint"].startswith(lab.public_address("a") + ":")
    status_a = overlay.status("a", "a")
    assert status_a["trust"] == "relay-membership"  # a was started without --members
    assert overlay.status("b", "b")["trust"] == "allow-list"
    assert time.monotonic() - started < 45
    log_a = overlay.log_text("a")
    for event in ("event=joined", "event=handshake_done", "event=established", "event=path"):
        assert event in log_a, f"peer a never logged {event}:\n{log_a}"


def test_ping_crosses_the_tap_overlay_through_the_relay(overlay: Any) -> None:
    overlay.wait_path("a", "a", "relay", timeout=45)
    overlay.wait_path("b", "b", "relay", timeout=45)
    before = overlay.metrics()["traversal_relay_forwarded_bytes_total"]
    output = overlay.ping("a", "10.10.10.4", count=10, interval=0.1)
    sent, received = _received(output)
    assert (sent, received) == (10, 10), output
    after = overlay.metrics()["traversal_relay_forwarded_bytes_total"]
    # 10 echo requests and 10 replies of 98-byte Ethernet frames, sealed: well over 2000 bytes.
    assert after - before >= 20 * 98, (before, after)
    peer_a = overlay.status("a", "a")["peers"][0]
    assert peer_a["tx_bytes"] > 0 and peer_a["rx_bytes"] > 0


def test_relay_metrics_count_clients_and_sessions(overlay: Any) -> None:
    metrics = overlay.metrics()
    assert metrics["traversal_relay_clients_connected"] == 2
    assert metrics["traversal_relay_sessions_active"] == 1
    per_session = [v for k, v in metrics.items() if k.startswith("traversal_relay_session_forwarded_bytes{")]
    assert per_session and per_session[0] > 0


def test_non_member_is_refused_with_one_clear_line(overlay: Any) -> None:
    failures_before = sum(
        v for k, v in overlay.metrics().items() if k.startswith("traversal_relay_auth_failures_total")
    )
    # A /32 adds no route, so the stranger cannot disturb peer a in the same namespace.
    proc = overlay.start_peer("stranger", "a", extra=["--tap", "tap9", "--address", "10.10.10.99/32"])
    proc.wait(30)
    assert proc.returncode not in (0, None)
    log = overlay.log_text("stranger")
    errors = [line for line in log.splitlines() if line.startswith("traversal: error:")]
    assert len(errors) == 1 and "member" in errors[0], log
    assert "Traceback" not in log
    failures_after = sum(v for k, v in overlay.metrics().items() if k.startswith("traversal_relay_auth_failures_total"))
    assert failures_after == failures_before + 1
    # The members were not disturbed.
    assert overlay.metrics()["traversal_relay_clients_connected"] == 2


def test_relay_restart_mid_session_is_survived(overlay: Any) -> None:
    before = {name: overlay.wait_path(name, name, "relay", timeout=45)["e2e_session"] for name in ("a", "b")}
    assert overlay.stop("relay") is not None
    members = overlay.workdir / "members.txt"
    overlay.start_relay(members)

    def resumed(name: str) -> bool:
        status = overlay.status(name, name) or {}
        relay = status.get("relay", {})
        return (
            relay.get("connects", 0) >= 2
            and relay.get("state") == "connected"
            and any(p.get("state") == "established" for p in status.get("peers", []))
        )

    # Both peers notice, reconnect with backoff and resume the SAME end-to-end session
    # (same keys, counters and replay window) over the new relay session: no new handshake.
    for name in ("a", "b"):
        overlay_module.wait_until(lambda name=name: resumed(name), 60, f"{name} to resume over the new relay")
    overlay_module.wait_until(
        lambda: all("event=session_resumed" in overlay.log_text(n) for n in ("a", "b")), 30, "proof of life"
    )
    after = {name: overlay.wait_path(name, name, "relay", timeout=10)["e2e_session"] for name in ("a", "b")}
    assert after == before
    output = overlay.ping("a", "10.10.10.4", count=5, interval=0.2)
    sent, received = _received(output)
    assert received == sent, output


def test_ctrl_c_says_bye_and_removes_the_tap(overlay: Any) -> None:
    overlay.wait_path("b", "b", "relay", timeout=45)
    assert overlay.lab.run("host-a", "ip", "link", "show", "tap0", check=False).returncode == 0
    assert overlay.stop("a") == 0
    # b hears the end-to-end BYE (sealed, so only a could have sent it) ...
    overlay_module.wait_until(lambda: "event=peer_bye" in overlay.log_text("b"), 15, "b to log a's BYE")
    assert 'reason="peer shutting down"' in overlay.log_text("b")
    # ... and a's TAP device is gone with the process.
    assert overlay.lab.run("host-a", "ip", "link", "show", "tap0", check=False).returncode != 0
    assert "event=tap_down" in overlay.log_text("a")
    overlay_module.wait_until(
        lambda: overlay.metrics()["traversal_relay_clients_connected"] == 1, 15, "the relay to drop a"
    )
