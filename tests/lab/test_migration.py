"""Issue 5: moving between the relay and the direct path, cleanly and under faults, with real parts
(the relay with its STUN server, two ``traversal connect`` nodes behind cone NATs, TAP devices,
pings and a TCP transfer) and the seed's geography: a and b are 7 and 8 ms one way from the WAN and
20 ms each from the relay, so about 80 ms RTT through the relay and 30 ms direct, and the relay
phase before a switch is real.

What is asserted is paths and flows: the path each side reports, the events each side logged and
in which order, which echo requests were answered, which end-to-end session carries the traffic and
what the relay still holds. Times appear only as generous upper bounds. The nodes log with epoch
timestamps (``TRAVERSAL_PRECISE_LOG``), which puts a ping's echo requests and the nodes' events on
one clock: a fault may cost the requests sent while it lasts, never one sent before or after.

Each test builds its own lab and relay (about a second), so a fault injected in one cannot leak
into the next.
"""

from __future__ import annotations

import json
import selectors
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.lab.conftest import load_netns_module, tear_down_labs

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.lab


overlay_module = load_netns_module("overlay")
_peer = overlay_module.first_peer

#: The seed's geography (one-way delays in ms, each direction).
GEOGRAPHY = load_netns_module("lab").SEED_GEOGRAPHY
ADDRESS = {peer: cidr.split("/")[0] for peer, cidr in overlay_module.OVERLAY.items()}
#: Where each side pings: the other side's overlay address.
TARGET = {"a": ADDRESS["b"], "b": ADDRESS["a"]}

#: From starting the nodes (or a fault) to a settled path: relay login, handshake, an attempt, with room.
SETTLE_TIMEOUT_S = 30.0
PING_INTERVAL_S = 0.01
SWITCH_PINGS = 1000
SWITCH_RUNS = 5
#: Echo requests that must have left before a side switched, for its relay phase to count as real.
MIN_RELAYED_REQUESTS = 5
#: Frames already on the wire when a fault starts or ends (the relayed RTT is ~80 ms): margin for
#: the window in which echo requests may be lost.
IN_FLIGHT_S = 0.25
#: A relayed echo request or reply: a 98-byte Ethernet frame, sealed and framed.
MIN_RELAYED_FRAME_BYTES = 98
FAST_RETRY = ["--direct-retry", "2"]
DIRECT_DEAD = 'path=relay reason="no answer on the direct path for 3 s"'
VALIDATED = 'path=direct reason="validated both ways'


# --- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture
def geo(lab_module: ModuleType, lab_prerequisites: None, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """``geo(relay_extra=[...])`` builds a cone/cone lab with the seed's geography, makes identities
    a and b and starts the relay; every lab built is torn down when the test ends."""
    labs: list[Any] = []

    def start(relay_extra: list[str] | None = None) -> Any:
        lab = lab_module.Lab(nat_a="cone", nat_b="cone", **GEOGRAPHY)
        labs.append(lab)  # before up(): a half-built lab is torn down too
        lab.up()
        run = overlay_module.Overlay(lab, tmp_path / lab.prefix, command=list(overlay_module.TRAVERSAL_PRECISE_LOG))
        for name in ("a", "b"):
            run.keygen(name)
        run.start_relay(run.write_members(["a", "b"]), extra=relay_extra)
        return run

    yield start
    tear_down_labs(labs)


def _logs(run: Any) -> str:
    return str(run.log_tails())


def _wait(run: Any, name: str, predicate: Callable[[dict[str, Any]], Any], what: str, timeout: float) -> Any:
    try:
        return run.wait_status(name, name, predicate, timeout, what)
    except overlay_module.OverlayError as exc:
        raise AssertionError(f"{exc}\n{_logs(run)}") from None


def _wait_direct(run: Any, name: str, timeout: float = SETTLE_TIMEOUT_S) -> dict[str, Any]:
    """Wait until ``name`` sends and receives on the direct path with its relay direction released."""

    def ready(status: dict[str, Any]) -> dict[str, Any] | None:
        peer = _peer(status)
        if peer is None or peer["state"] != "established":
            return None
        return peer if (peer["path"], peer["peer_path"], peer["relay_released"]) == ("direct", "direct", True) else None

    return _wait(run, name, ready, "direct both ways, relay released", timeout)


def _wait_relay(run: Any, name: str, timeout: float = SETTLE_TIMEOUT_S) -> dict[str, Any]:
    """Wait until ``name`` is established on the relay path both ways over a connected relay."""

    def ready(status: dict[str, Any]) -> dict[str, Any] | None:
        peer = _peer(status)
        if peer is None or peer["state"] != "established" or status["relay"]["state"] != "connected":
            return None
        return peer if (peer["path"], peer["peer_path"], peer["relay_released"]) == ("relay", "relay", False) else None

    return _wait(run, name, ready, "on the relay both ways", timeout)


def _cut_direct_path(run: Any, pings: dict[str, Any]) -> tuple[float, Any, float]:
    """Once pings flow, cut the direct path at nat-a; wait until both sides saw it die and resumed
    the session on the relay. Returns (when cut, the drop rule's handle, when resumed on both)."""
    for ping in pings.values():
        ping.wait_answered(50, 10)
    cut_at = time.time()
    handle = run.insert_drop_rule("nat-a")
    for name in ("a", "b"):
        _wait_log(run, name, DIRECT_DEAD, 15)
    resumed_at = max(_wait_log(run, name, "event=session_resumed", 20) for name in ("a", "b"))
    return cut_at, handle, resumed_at


def _wait_log(run: Any, name: str, needle: str, timeout: float = SETTLE_TIMEOUT_S, count: int = 1) -> float:
    """Wait for ``count`` log lines of ``name`` with ``needle``; returns when the last one was logged."""
    try:
        run.wait_log(name, needle, timeout, count=count)
    except overlay_module.OverlayError as exc:
        raise AssertionError(f"{exc}\n{_logs(run)}") from None
    return run.log_times(name, needle)[count - 1]


def _start_pings(run: Any, count: int, tag: str) -> dict[str, Any]:
    """Ping from both sides at once, every PING_INTERVAL_S."""
    return {
        name: run.start_ping(name, TARGET[name], count=count, interval=PING_INTERVAL_S, file=f"ping-{tag}-{name}.txt")
        for name in ("a", "b")
    }


def _stop_pings(pings: dict[str, Any]) -> tuple[dict[str, Any], tuple[float, float]]:
    """Stop pings started with a generous count once the test is done; returns the results and the
    window in which requests were still in flight when they stopped (their loss means nothing)."""
    results = {name: ping.stop() for name, ping in pings.items()}
    stopped_at = time.time()
    return results, (stopped_at - 1.0, stopped_at + 60)


def _assert_lossless(run: Any, results: dict[str, Any]) -> None:
    for name, result in results.items():
        assert (result.lost, result.duplicates) == (0, 0), f"ping from {name}: {result.summary()}\n{_logs(run)}"


def _assert_lost_only_within(run: Any, results: dict[str, Any], windows: list[tuple[float, float]]) -> None:
    """No duplicates, and every unanswered echo request left inside one of ``windows``."""
    for name, result in results.items():
        assert result.duplicates == 0, f"ping from {name}: {result.summary()}\n{_logs(run)}"
        outside = result.missing_outside(windows)
        assert not outside, (
            f"ping from {name} lost requests outside the fault ({windows}): icmp_seq {outside[:20]}; "
            f"{result.summary()}\n{_logs(run)}"
        )


def _assert_alive(run: Any, names: tuple[str, ...] = ("a", "b", "relay")) -> None:
    for name in names:
        assert run.procs[name].poll() is None, f"{name} exited\n{_logs(run)}"
        assert "Traceback" not in run.log_text(name), f"{name} logged a traceback\n{run.log_text(name)[-4000:]}"


def _archive_log(run: Any, name: str, tag: str) -> None:
    """Keep a finished node's log under another name; a restarted node starts a fresh one."""
    log = run.log_path(name)
    if log.exists():
        log.rename(log.with_name(f"{name}-{tag}.log"))


def _ping_ok(run: Any, name: str, count: int = 20) -> None:
    output = run.ping(name, TARGET[name], count=count, interval=0.02)
    assert f"{count} packets transmitted, {count} received" in output, f"{output}\n{_logs(run)}"


# --- 1. the relay -> direct switch ----------------------------------------------------------------


def test_ping_both_ways_across_the_switch_to_direct_loses_nothing(geo: Callable[..., Any]) -> None:
    """Both sides ping each other every 10 ms from ESTABLISHED on, through the switch: every echo
    request is answered once, the first ones went through the relay, and the pair ends direct."""
    run = geo()
    for rep in range(1, SWITCH_RUNS + 1):
        run.start_peers()
        for name in ("a", "b"):
            _wait_log(run, name, "event=established")
        pings = _start_pings(run, SWITCH_PINGS, f"run{rep}")
        results = {name: ping.wait() for name, ping in pings.items()}
        _assert_lossless(run, results)
        for name in ("a", "b"):
            peer = _peer(run.status(name, name))
            assert peer is not None and (peer["path"], peer["peer_path"]) == ("direct", "direct"), (
                f"run {rep}: {name} ends on {peer}\n{_logs(run)}"
            )
            # This side sent on the relay until it validated the direct path: the requests that
            # left before that crossed the relay, so the switch happened mid-ping.
            switched = run.log_times(name, VALIDATED)[0]
            relayed = sum(reply.sent_at < switched for reply in results[name].replies)
            assert relayed >= MIN_RELAYED_REQUESTS, f"run {rep}: only {relayed} requests from {name} before the switch"
            assert run.log_count(name, "event=relay_released") == 1
        for name in ("a", "b"):
            assert run.stop(name) == 0, _logs(run)
            _archive_log(run, name, f"run{rep}")
    _assert_alive(run, ("relay",))


# --- 2. and 3. the relay goes away ----------------------------------------------------------------


@pytest.mark.parametrize("standby", ["close", "keep"])
def test_relay_killed_while_direct_loses_nothing(geo: Callable[..., Any], standby: str) -> None:
    """SIGKILL the relay under a ping burst while the peers are direct. With the default standby the
    nodes have let the relay go already; with ``keep`` they see their connection drop, and carry on."""
    run = geo()
    run.start_peers(["--relay-standby", standby])
    e2e = {name: _wait_direct(run, name)["e2e_session"] for name in ("a", "b")}
    pings = _start_pings(run, 300, "kill")
    for ping in pings.values():
        ping.wait_answered(50, 10)
    run.kill("relay")
    if standby == "keep":
        for name in ("a", "b"):
            _wait_log(run, name, "event=relay_lost", 15)
    results = {name: ping.wait() for name, ping in pings.items()}
    _assert_lossless(run, results)
    for name in ("a", "b"):
        status = run.status(name, name)
        peer = _peer(status)
        assert peer is not None and (peer["path"], peer["peer_path"]) == ("direct", "direct"), peer
        assert peer["e2e_session"] == e2e[name]
        assert status["relay"]["state"] == ("released" if standby == "close" else "retrying"), status["relay"]
        assert run.log_count(name, "event=path ") == 2, "path changes other than relay -> direct:\n" + _logs(run)
    _assert_alive(run, ("a", "b"))


def test_relay_restart_under_traffic_resumes_the_same_session(geo: Callable[..., Any]) -> None:
    """Relay restarted (SIGKILL, then started again) while the peers are on it: only the echo
    requests sent during the outage are lost, both sides resume the same end-to-end session over
    a new relay session, and traffic recovers fully."""
    run = geo()
    run.start_peers(["--no-direct"])
    before = {name: _wait_relay(run, name) for name in ("a", "b")}
    pings = _start_pings(run, 3000, "restart")
    for ping in pings.values():
        ping.wait_answered(50, 10)
    killed_at = time.time()
    run.kill("relay")
    run.start_relay(run.workdir / "members.txt")
    resumed_at = max(_wait_log(run, name, "event=session_resumed", 30) for name in ("a", "b"))
    assert resumed_at - killed_at < 20, f"took {resumed_at - killed_at:.1f} s to resume\n{_logs(run)}"
    answered = {name: ping.answered() for name, ping in pings.items()}
    for name, ping in pings.items():
        ping.wait_answered(answered[name] + 100, 10)  # flowing again over the new relay session
    results, in_flight = _stop_pings(pings)
    _assert_lost_only_within(run, results, [(killed_at - IN_FLIGHT_S, resumed_at + IN_FLIGHT_S), in_flight])
    for name in ("a", "b"):
        peer = _wait_relay(run, name)
        assert peer["e2e_session"] == before[name]["e2e_session"], (before[name], peer)
        assert peer["session_id"] != before[name]["session_id"], "no new relay session"
        assert run.log_count(name, "event=handshake_done") == 1, "a new handshake was made:\n" + _logs(run)
    _assert_lossless(run, {name: ping.wait() for name, ping in _start_pings(run, 200, "after").items()})
    metrics = run.metrics()
    assert (metrics["traversal_relay_clients_connected"], metrics["traversal_relay_sessions_active"]) == (2, 1)
    _assert_alive(run)


# --- 4. the direct path cut -----------------------------------------------------------------------


def test_direct_path_cut_falls_back_to_the_relay_and_returns(geo: Callable[..., Any]) -> None:
    """Drop all UDP through nat-a mid-ping: both sides give the direct path up, resume the same
    session over the relay (a new relay session), carry traffic there; once the rule is deleted the
    controlling side's retry takes them back to direct. Requests are lost only while the path is
    dead and undetected, none across either switch."""
    run = geo()
    run.start_peers(FAST_RETRY)
    e2e = {name: _wait_direct(run, name)["e2e_session"] for name in ("a", "b")}
    pings = _start_pings(run, 3000, "cut")
    cut_at, handle, resumed_at = _cut_direct_path(run, pings)
    for name in ("a", "b"):
        peer = _wait_relay(run, name, 10)
        assert peer["e2e_session"] == e2e[name], peer
        assert "event=resume_failed" not in run.log_text(name) and run.log_count(name, "event=handshake_done") == 1
    # Traffic flows on the relay while the direct path is still cut.
    forwarded = run.metrics()["traversal_relay_forwarded_bytes_total"]
    _ping_ok(run, "a", count=50)
    assert run.metrics()["traversal_relay_forwarded_bytes_total"] - forwarded >= 2 * 50 * MIN_RELAYED_FRAME_BYTES
    assert _peer(run.status("a", "a"))["path"] == "relay"
    run.delete_rule("nat-a", handle)
    for name in ("a", "b"):
        assert _wait_direct(run, name)["e2e_session"] == e2e[name]
        assert run.log_count(name, "event=relay_released") == 2
        # The operator view: status keeps the last switches, with their reasons and durations.
        history = _peer(run.status(name, name))["direct"]["history"]
        assert [h["path"] for h in history] == ["direct", "relay", "direct"], history
        assert "no answer on the direct path" in history[1]["reason"] and history[1]["took_ms"] >= 2000
    results, in_flight = _stop_pings(pings)
    _assert_lost_only_within(run, results, [(cut_at - IN_FLIGHT_S, resumed_at + IN_FLIGHT_S), in_flight])
    _ping_ok(run, "b")
    _assert_alive(run)


def test_conntrack_flush_at_nat_a_keeps_the_direct_path(geo: Callable[..., Any]) -> None:
    """Flush nat-a's connection tracking mid-ping (its NAT forgets every mapping). The next packet
    from a makes the mapping again on the same port (the cone NAT keeps a port while it is free),
    so the direct path carries on: no fallback, the same session, at most the requests in flight
    at the flush lost."""
    if shutil.which("conntrack") is None:
        pytest.skip("needs the conntrack tool (`make system-packages` installs it)")
    run = geo()
    run.start_peers(FAST_RETRY)
    e2e = {name: _wait_direct(run, name)["e2e_session"] for name in ("a", "b")}
    pings = _start_pings(run, 3000, "flush")
    for ping in pings.values():
        ping.wait_answered(50, 10)
    answered = {name: ping.answered() for name, ping in pings.items()}
    flushed_at = time.time()
    run.lab.run("nat-a", "conntrack", "-F")
    # Flowing on for longer than the dead-path timeout (3 s) shows the path survived.
    for name, ping in pings.items():
        ping.wait_answered(answered[name] + 400, 15)
    results, in_flight = _stop_pings(pings)
    _assert_lost_only_within(run, results, [(flushed_at - IN_FLIGHT_S, flushed_at + 1.0), in_flight])
    for name in ("a", "b"):
        assert DIRECT_DEAD not in run.log_text(name), _logs(run)
        peer = _peer(run.status(name, name))
        assert peer is not None and (peer["path"], peer["e2e_session"]) == ("direct", e2e[name]), peer
    _assert_alive(run)


# --- 5. a peer restarted --------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["direct", "relay"])
def test_restarted_peer_gets_a_new_session_and_the_relay_no_stale_state(geo: Callable[..., Any], path: str) -> None:
    """SIGKILL node b and start it again with the same identity. a notices (its direct path stops
    answering, or the relay says b left), a new end-to-end session is made, pings work again, and
    the relay holds exactly the sessions in use: none once both are direct, one on the relay."""
    run = geo()
    flags = FAST_RETRY if path == "direct" else ["--no-direct"]
    run.start_peers(flags)
    wait_path = _wait_direct if path == "direct" else _wait_relay
    old = {name: wait_path(run, name)["e2e_session"] for name in ("a", "b")}
    assert old["a"] == old["b"]
    run.kill("b")
    _archive_log(run, "b", "killed")
    run.start_peer("b", "b", extra=flags)
    if path == "direct":
        _wait_log(run, "a", DIRECT_DEAD, 15)
        # a tried to resume its old keys over the relay; the new b holds none.
        _wait_log(run, "a", "event=handshake_done", count=2)
        log_a = run.log_text("a")
        assert "event=resume_failed" in log_a or "event=resume_refused" in log_a, _logs(run)
    else:
        _wait_log(run, "a", "event=peer_left", 15)
    new = {name: wait_path(run, name, 45)["e2e_session"] for name in ("a", "b")}
    assert new["a"] == new["b"] != old["a"], (old, new)
    # b's TAP keeps the MAC derived from its identity, so a's ARP entry stays right.
    _ping_ok(run, "b")
    _ping_ok(run, "a")
    in_use = 0 if path == "direct" else 1
    clients = 0 if path == "direct" else 2

    def relay_state() -> tuple[float, float]:
        metrics = run.metrics()
        return metrics["traversal_relay_sessions_active"], metrics["traversal_relay_clients_connected"]

    try:
        overlay_module.wait_until(lambda: relay_state() == (in_use, clients), 15, "the relay to drop stale state")
    except overlay_module.OverlayError:
        raise AssertionError(f"relay holds {relay_state()} (sessions, clients), not {(in_use, clients)}") from None
    _assert_alive(run)


def test_survivor_reaches_a_restarted_peer_before_it_speaks(geo: Callable[..., Any]) -> None:
    run = geo()
    run.start_peers(["--no-direct"])
    old = {name: _wait_relay(run, name)["e2e_session"] for name in ("a", "b")}
    _ping_ok(run, "a", count=5)  # a now holds b's MAC address
    run.kill("b")
    _archive_log(run, "b", "killed")
    run.start_peer("b", "b", extra=["--no-direct"])
    for name in ("a", "b"):
        _wait(
            run,
            name,
            lambda s: (_peer(s) or {}).get("e2e_session") not in (None, old["a"]),
            "a new session",
            30,
        )
        _wait_relay(run, name)
    output = run.ping("a", TARGET["a"], count=30, interval=0.1)
    assert " 0 received" not in output, output


# --- 6. key rotation ------------------------------------------------------------------------------


def test_key_rotation_on_the_relay_after_a_fallback_and_back_on_direct(geo: Callable[..., Any]) -> None:
    """Keys rotate every 10 s (the relay's --key-rotation) under a ping of about 20 s that crosses a
    cut of the direct path: the first rotation happens on the relay after the fallback, the
    second on the direct path after the return. No crash, the same session, traffic at the end."""
    run = geo(relay_extra=["--key-rotation", "10"])
    run.start_peers(FAST_RETRY)
    e2e = {name: _wait_direct(run, name)["e2e_session"] for name in ("a", "b")}
    for name in ("a", "b"):
        assert "rekey=10 " in run.log_text(name), _logs(run)
        assert "event=key_rotated" not in run.log_text(name), "rotated before the test began"
    pings = _start_pings(run, 3000, "rekey")
    cut_at, handle, resumed_at = _cut_direct_path(run, pings)
    # Each side's "recv" rotation means both directions moved on: the peer's send key, then ours.
    rotated_on_relay = max(_wait_log(run, name, "direction=recv epoch=1", 20) for name in ("a", "b"))
    assert resumed_at < rotated_on_relay, _logs(run)
    for name in ("a", "b"):
        assert _peer(run.status(name, name))["path"] == "relay", "the first rotation was not on the relay"
    run.delete_rule("nat-a", handle)
    for name in ("a", "b"):
        _wait_direct(run, name)
    back_at = max(run.log_times(name, VALIDATED)[-1] for name in ("a", "b"))
    rotated_on_direct = max(_wait_log(run, name, "direction=recv epoch=2", 20) for name in ("a", "b"))
    assert back_at < rotated_on_direct, _logs(run)
    results, in_flight = _stop_pings(pings)
    _assert_lost_only_within(run, results, [(cut_at - IN_FLIGHT_S, resumed_at + IN_FLIGHT_S), in_flight])
    for name in ("a", "b"):
        peer = _peer(run.status(name, name))
        assert peer is not None and (peer["path"], peer["e2e_session"]) == ("direct", e2e[name]), peer
        assert run.log_count(name, "event=handshake_done") == 1
        _ping_ok(run, name)
    _assert_alive(run)


# --- 7. a TCP transfer --------------------------------------------------------------------------

TRANSFER_BYTES = 20 * 1024 * 1024
TRANSFER_PORT = 5001
#: The sender paces itself so the transfer lasts about 10 s whatever the relay's speed: the switch
#: then falls mid-transfer.
TRANSFER_RATE = 2 * 1024 * 1024
TRANSFER_TIMEOUT_S = 120.0

# Runs in host-b: one connection, SHA-256 of everything received; "progress" once 1 MiB is in.
RECEIVER = r"""
import hashlib, json, socket, sys, time
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1])))
srv.listen(1)
srv.settimeout(float(sys.argv[2]))
print("ready", flush=True)
conn, _ = srv.accept()
conn.settimeout(float(sys.argv[2]))
digest, size, first, told = hashlib.sha256(), 0, None, False
while chunk := conn.recv(1 << 16):
    first = first or time.time()
    digest.update(chunk)
    size += len(chunk)
    if not told and size >= 1 << 20:
        print("progress", flush=True)
        told = True
print(json.dumps({"bytes": size, "sha256": digest.hexdigest(), "first_byte_at": first, "done_at": time.time()}))
"""

# Runs in host-a: argv[3] pseudo-random bytes at about argv[4] bytes/s; prints their SHA-256.
SENDER = r"""
import hashlib, json, random, socket, sys, time
host, port, total, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng, digest, sent = random.Random(5), hashlib.sha256(), 0
conn = socket.create_connection((host, port), timeout=30)
started = time.monotonic()
while sent < total:
    block = rng.randbytes(min(1 << 16, total - sent))
    conn.sendall(block)
    digest.update(block)
    sent += len(block)
    ahead = sent / rate - (time.monotonic() - started)
    if ahead > 0:
        time.sleep(ahead)  # pacing, not waiting for anything
conn.shutdown(socket.SHUT_WR)
conn.recv(1)
print(json.dumps({"bytes": sent, "sha256": digest.hexdigest()}))
"""


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError(f"no output within {timeout} s from {proc.args}")
    return proc.stdout.readline().strip()


def test_tcp_transfer_across_the_switch_to_direct_is_intact(geo: Callable[..., Any]) -> None:
    """20 MiB over TCP from host-a to host-b, started on the relay: UDP is dropped at nat-a until
    the first MiB is in, so the next direct attempt switches the pair mid-transfer. The bytes
    arrive complete and identical, the first ones before the switch, the last ones after."""
    run = geo()
    receiver = run.lab.popen(
        "host-b",
        [sys.executable, "-c", RECEIVER, str(TRANSFER_PORT), str(TRANSFER_TIMEOUT_S)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert _read_line(receiver, 10) == "ready"
    handle = run.insert_drop_rule("nat-a")  # holds the pair on the relay
    run.start_peers([*FAST_RETRY, "--direct-timeout", "2"])
    for name in ("a", "b"):
        _wait_relay(run, name)
    sender = run.lab.popen(
        "host-a",
        [sys.executable, "-c", SENDER, ADDRESS["b"], str(TRANSFER_PORT), str(TRANSFER_BYTES), str(TRANSFER_RATE)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert _read_line(receiver, 30) == "progress", _logs(run)
    assert _peer(run.status("a", "a"))["path"] == "relay"
    run.delete_rule("nat-a", handle)
    for name in ("a", "b"):
        _wait_direct(run, name)
    sent_out, sent_err = sender.communicate(timeout=TRANSFER_TIMEOUT_S)
    received = json.loads(_read_line(receiver, TRANSFER_TIMEOUT_S))
    sent = json.loads(sent_out or "{}") if sender.returncode == 0 else {"error": sent_err}
    assert sent.get("bytes") == TRANSFER_BYTES, sent
    assert (received["bytes"], received["sha256"]) == (TRANSFER_BYTES, sent["sha256"]), (sent, received)
    switched = [run.log_times(name, VALIDATED)[-1] for name in ("a", "b")]
    assert received["first_byte_at"] < min(switched) and received["done_at"] > max(switched), (received, switched)
    _assert_alive(run)


# --- 8. an agreed release to the relay ------------------------------------------------------------


def _roles(run: Any) -> dict[str, str]:
    """Which side is "controlling" (the handshake initiator runs the direct attempts) and which "controlled"."""
    roles = {}
    for name in ("a", "b"):
        peer = _peer(run.status(name, name))
        assert peer is not None
        roles["controlling" if peer["role"] == "initiator" else "controlled"] = name
    assert len(roles) == 2, roles
    return roles


def test_agreed_release_to_the_relay_loses_nothing(geo: Callable[..., Any]) -> None:
    """``traversal path relay`` on a while both sides ping every 10 ms: the pair moves to the relay
    make-before-break (same session, new relay session, no retries while pinned) without losing an
    echo request. ``traversal path direct`` on the controlled side then takes it back, again
    without loss (and from the controlling side, tested below)."""
    run = geo()
    run.start_peers()
    e2e = {name: _wait_direct(run, name)["e2e_session"] for name in ("a", "b")}
    roles = _roles(run)
    pings = _start_pings(run, SWITCH_PINGS, "release")
    for ping in pings.values():
        ping.wait_answered(100, 10)
    run.request_path("a", "a", "relay")
    for name in ("a", "b"):
        peer = _wait_relay(run, name, 15)
        assert peer["e2e_session"] == e2e[name] and peer["direct"]["pinned_relay"], peer
        assert peer["direct"]["next_retry_in_s"] is None, peer["direct"]
    on_relay = {name: ping.answered() for name, ping in pings.items()}
    for name, ping in pings.items():
        ping.wait_answered(on_relay[name] + 100, 10)  # a second of traffic on the relay
    run.request_path(roles["controlled"], roles["controlled"], "direct")
    for name in ("a", "b"):
        assert _wait_direct(run, name, 15)["e2e_session"] == e2e[name]
    results = {name: ping.wait() for name, ping in pings.items()}
    _assert_lossless(run, results)
    assert "by=user" in run.log_text("a") and "event=relay_requested" in run.log_text("b"), _logs(run)
    for name in ("a", "b"):
        assert DIRECT_DEAD not in run.log_text(name)
        assert run.log_count(name, "event=handshake_done") == 1
    _assert_alive(run)


def test_path_direct_on_the_controlling_side_after_a_release(geo: Callable[..., Any]) -> None:
    run = geo()
    run.start_peers()
    e2e = {name: _wait_direct(run, name)["e2e_session"] for name in ("a", "b")}
    roles = _roles(run)
    run.request_path(roles["controlled"], roles["controlled"], "relay")
    for name in ("a", "b"):
        _wait_relay(run, name, 15)
    released = 'reason="released on request"'
    before = run.log_count(roles["controlled"], released)
    run.request_path(roles["controlling"], roles["controlling"], "direct")

    def settled() -> bool:
        # Direct both ways, or the controlled side already released the new direct path again.
        if run.log_count(roles["controlled"], released) > before:
            return True
        return all((_peer(run.status(n, n)) or {}).get("relay_released") for n in ("a", "b"))

    overlay_module.wait_until(settled, 15, "the pair to settle after `path direct`")
    for name in ("a", "b"):
        assert _wait_direct(run, name, 5)["e2e_session"] == e2e[name]
