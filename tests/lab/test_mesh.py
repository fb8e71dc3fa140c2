"""Issue 8's full mesh in the lab: four peers on one network, behind cone, symseq, symrand and
udpblock NATs (one site each, netns-lab/mesh.py), with the real relay and ``traversal connect``
nodes on real TAP devices.

* every pair pings across the overlay, each pair ends on the path the direct-path matrix
  predicts (tests/lab/test_direct_matrix.py's lists), and the relay forwards the pings of the
  relayed pairs only: the relay sessions of the direct pairs carry nothing while they ping;
* an ARP request broadcast from one peer reaches every other peer's TAP exactly once;
* a peer killed with SIGKILL and started again: the others get fresh sessions with it, on the
  predicted paths, and ping it, within the dead-peer timeout plus one retry interval.

One lab serves the whole file (building it and starting five processes is the slow part);
the tests run in file order, the restart last.
"""

from __future__ import annotations

import contextlib
import re
import struct
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lab.conftest import load_netns_module
from tests.lab.test_direct_matrix import DIRECT_PAIRS, MIN_RELAYED_FRAME_BYTES, RELAY_PAIRS
from transport.constants import DEAD_PEER_TIMEOUT, DIRECT_RETRY_INTERVAL

pytestmark = [pytest.mark.lab, pytest.mark.timeout(240)]

overlay_module = load_netns_module("overlay")
mesh_module = load_netns_module("mesh")

#: Sites s1..s4, one peer each: p1 cone, p2 symseq, p3 symrand, p4 udpblock.
SITES = ("cone", "symseq", "symrand", "udpblock")
#: The matrix's relay cases use a 3 s deadline; a direct pair here needs well under 1 s.
NODE_FLAGS = ["--direct-timeout", "3"]
#: From starting the nodes to every pair's decided path (login, handshakes, one attempt;
#: an udpblock peer first waits out its STUN gathering), with room for a busy machine.
SETTLE_TIMEOUT_S = 60.0
#: The issue's bound for recovering from a restarted peer, plus the restarted node's own
#: start-up (interpreter, TAP, login), generously.
RESTART_STARTUP_S = 20.0
RECOVERY_BOUND_S = DEAD_PEER_TIMEOUT + DIRECT_RETRY_INTERVAL + RESTART_STARTUP_S
PING_COUNT = 10
PING_INTERVAL_S = 0.05
#: An address on the overlay nobody has, so the ARP request for it goes unanswered.
UNUSED_OVERLAY_IP = "10.10.10.250"
ARP_DELIVERY_TIMEOUT_S = 10.0
#: After the first copy arrived everywhere, how long a second copy is given to show up.
DUPLICATE_GRACE_S = 1.0

# Sends one ARP request (who-has argv[2], tell argv[1]) out of tap0, from tap0's MAC.
SEND_ARP = r"""
import socket, sys
mac = bytes.fromhex(open("/sys/class/net/tap0/address").read().strip().replace(":", ""))
sender, target = socket.inet_aton(sys.argv[1]), socket.inet_aton(sys.argv[2])
arp = b"\x00\x01\x08\x00\x06\x04\x00\x01" + mac + sender + b"\x00" * 6 + target
with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
    s.bind(("tap0", 0))
    s.send(b"\xff" * 6 + mac + b"\x08\x06" + arp)
"""


@pytest.fixture(scope="module")
def mesh(lab_prerequisites: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The four-site mesh with its relay and a node per peer (named after the peer: p1..p4)."""
    lab = mesh_module.MeshLab(SITES)
    with overlay_module.running(lab, tmp_path_factory.mktemp("mesh")) as run:
        for peer in lab.peers:
            run.keygen(peer)
        run.start_relay(run.write_members(lab.peers))
        for peer in lab.peers:
            run.start_peer(peer, peer, extra=NODE_FLAGS)
        yield run


# --- helpers ----------------------------------------------------------------------------------


def _logs(run: Any) -> str:
    return str(run.log_tails(("relay", *run.lab.peers), lines=15))


def _predicted(lab: Any, a: str, b: str) -> str:
    path = mesh_module.predicted_path(
        lab.profile(a), lab.profile(b), same_lan=lab.same_lan(a, b), direct_pairs=DIRECT_PAIRS, relay_pairs=RELAY_PAIRS
    )
    assert path is not None, f"the direct-path matrix says nothing about {lab.profile(a)} x {lab.profile(b)}"
    return str(path)


def _entry(status: dict[str, Any] | None, identity: str) -> dict[str, Any] | None:
    """``status``'s established peer entry for ``identity``, or None."""
    for peer in (status or {}).get("peers", []):
        if peer.get("identity") == identity and peer.get("state") == "established":
            return dict(peer)
    return None


def _outcome(mine: dict[str, Any] | None, theirs: dict[str, Any] | None) -> str | None:
    """A pair's decided path from both ends' entries: "direct" (direct both ways on both sides),
    "relay" (both on the relay after a failed attempt, as the matrix's relay cases wait for), or
    None while it is still being decided."""
    if mine is None or theirs is None:
        return None
    routes = {(e["path"], e["peer_path"]) for e in (mine, theirs)}
    if routes == {("direct", "direct")}:
        return "direct"
    if routes != {("relay", "relay")}:
        return None
    for entry in (mine, theirs):
        direct = entry.get("direct")
        if direct is not None and not (direct.get("state") == "relay" and direct.get("last_error")):
            return None
    return "relay"


def _statuses(run: Any) -> dict[str, dict[str, Any] | None]:
    return {peer: run.control_status(peer) for peer in run.lab.peers}


def _pairs(run: Any, statuses: dict[str, dict[str, Any] | None]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per pair: both ends' entries and the decided outcome."""
    pairs = {}
    for a, b in mesh_module.pair_names(run.lab.peers):
        mine, theirs = _entry(statuses[a], run.pubkeys[b]), _entry(statuses[b], run.pubkeys[a])
        pairs[(a, b)] = {"a": mine, "b": theirs, "outcome": _outcome(mine, theirs)}
    return pairs


def _wait_settled(
    run: Any, timeout: float, extra: Callable[[dict[tuple[str, str], dict[str, Any]]], bool] | None = None
) -> dict[tuple[str, str], dict[str, Any]]:
    """Wait until every pair's path is decided (and ``extra`` holds); returns the pairs."""
    last: dict[tuple[str, str], dict[str, Any]] = {}

    def settled() -> bool:
        nonlocal last
        for peer in run.lab.peers:
            run._check_alive(peer)
        last = _pairs(run, _statuses(run))
        return all(p["outcome"] is not None for p in last.values()) and (extra is None or extra(last))

    try:
        overlay_module.wait_until(settled, timeout, "every pair of the mesh to settle", interval=0.2)
    except overlay_module.OverlayError as exc:
        undecided = {pair: _summary(p) for pair, p in last.items() if p["outcome"] is None}
        raise AssertionError(f"{exc}; undecided: {undecided}\n{_logs(run)}") from None
    return last


def _summary(pair: dict[str, Any]) -> list[Any]:
    return [
        None if e is None else (e["path"], e["peer_path"], (e.get("direct") or {}).get("state")) for e in pair.values()
    ][:2]


def _assert_predicted(run: Any, pairs: dict[tuple[str, str], dict[str, Any]]) -> None:
    off = [(a, b) for (a, b), p in pairs.items() if p["outcome"] != _predicted(run.lab, a, b)]
    wrong = {
        f"{a} {run.lab.profile(a)} x {b} {run.lab.profile(b)}": (pairs[(a, b)]["outcome"], _predicted(run.lab, a, b))
        for a, b in off
    }
    # What each end gathered and advertised (a sequential NAT's predicted ports) and why it gave up.
    story = [
        f"{name}: {line}"
        for name in sorted({name for pair in off for name in pair})
        for line in run.log_text(name).splitlines()
        if re.search(r"event=(ice_gathered|candidates_sent|direct_attempt|direct_failed|path) ", line)
    ]
    assert not wrong, f"(observed, predicted) per pair: {wrong}\n" + "\n".join(story) + f"\n{_logs(run)}"


def _overlay_ip(run: Any, peer: str) -> str:
    return str(run.lab.overlay_address(peer).split("/")[0])


def _session_series(metrics: dict[str, float], session_id: str) -> float | None:
    return metrics.get(f'traversal_relay_session_forwarded_bytes{{session="{session_id[:8]}"}}')


def _ping_every_pair(run: Any, pairs: list[tuple[str, str]], tag: str) -> None:
    """Ping from the first peer of each pair to the second, every pair at once; all must answer."""
    pings = {
        (a, b): run.start_ping(
            a, _overlay_ip(run, b), count=PING_COUNT, interval=PING_INTERVAL_S, file=f"{tag}-{a}-{b}"
        )
        for a, b in pairs
    }
    results = {pair: ping.wait() for pair, ping in pings.items()}
    lost = {f"{a}->{b}": r.summary() for (a, b), r in results.items() if r.received != PING_COUNT}
    assert not lost, f"pings lost across the mesh: {lost}\n{_logs(run)}"


def _arp_requests(path: Path, sender_ip: str, target_ip: str) -> int:
    """ARP requests who-has ``target_ip`` tell ``sender_ip`` in a pcap file (Ethernet link type)."""
    data = path.read_bytes() if path.exists() else b""
    if len(data) < 24:
        return 0
    order = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    sender, target = bytes(map(int, sender_ip.split("."))), bytes(map(int, target_ip.split(".")))
    count, offset = 0, 24
    while offset + 16 <= len(data):
        caplen = struct.unpack(order + "I", data[offset + 8 : offset + 12])[0]
        frame = data[offset + 16 : offset + 16 + caplen]
        offset += 16 + caplen
        if len(frame) >= 42 and frame[12:14] == b"\x08\x06" and frame[20:22] == b"\x00\x01":
            count += frame[28:32] == sender and frame[38:42] == target
    return count


# --- tests ------------------------------------------------------------------------------------


def test_matrix_rule_agrees_with_the_matrix() -> None:
    """The rule predicted_path falls back on for pairs the matrix does not list gives no verdict
    that contradicts a listed one (dualstack, which meets over IPv6, is not a mesh profile)."""
    for a, b in RELAY_PAIRS:
        assert mesh_module.predicted_path(a, b, same_lan=False, direct_pairs=[], relay_pairs=[]) == "relay", (a, b)
    for a, b in DIRECT_PAIRS:
        if "dualstack" not in (a, b):
            assert mesh_module.predicted_path(a, b, same_lan=False, direct_pairs=[], relay_pairs=[]) is None, (a, b)


def test_mesh_lab_wiring_and_teardown(lab_module: Any, lab_prerequisites: None) -> None:
    """Hosts sharing a NAT share its LAN, every host reaches the relay's addresses, and down_all
    (what `make lab-down` runs) finds every namespace of a mesh by its prefix."""
    lab = mesh_module.MeshLab(["cone:2", "public", "double"])
    try:
        lab.up()
        assert all(lab_module.is_lab_namespace(ns) for ns in lab.namespaces), lab.namespaces
        assert lab.public_address("p1") == lab.public_address("p2") != lab.host_address("p1")
        assert lab.public_address("p3") == lab.host_address("p3")
        lab.run("host-p1", "ping", "-c", "1", "-W", "2", lab.host_address("p2"), timeout=5)
        for peer in lab.peers:
            for relay in lab_module.RELAY_ADDRESSES:
                lab.run(f"host-{peer}", "ping", "-c", "1", "-W", "2", relay, timeout=5)
        assert lab.run("wan", "ip", "route", "show", "default").stdout.strip() == ""
        deleted = lab_module.down_all(lab.prefix)
        assert sorted(deleted) == sorted(lab.namespaces)
    finally:
        lab.down()


def test_every_pair_pings_on_its_predicted_path(mesh: Any) -> None:
    run, lab = mesh, mesh.lab
    pairs = _wait_settled(run, SETTLE_TIMEOUT_S)
    _assert_predicted(run, pairs)
    direct = [pair for pair, p in pairs.items() if p["outcome"] == "direct"]
    relayed = [pair for pair, p in pairs.items() if p["outcome"] == "relay"]
    assert direct and relayed, pairs  # cone x symseq goes direct, the rest stay relayed
    sessions = {pair: p["a"]["session_id"] for pair, p in pairs.items()}
    for pair, p in pairs.items():
        assert p["a"]["session_id"] == p["b"]["session_id"], (pair, p)
    # A direct pair's node released its relay direction; a relayed one did not.
    for pair in direct:
        assert pairs[pair]["a"]["relay_released"] and pairs[pair]["b"]["relay_released"], pairs[pair]
    for pair in relayed:
        assert not pairs[pair]["a"]["relay_released"], pairs[pair]

    before = run.metrics()
    _ping_every_pair(run, list(pairs), "paths")
    after = run.metrics()
    moved = {pair: (_session_series(after, s) or 0) - (_session_series(before, s) or 0) for pair, s in sessions.items()}
    for pair in direct:
        # Gone (the relay freed the released session) or standing still.
        assert _session_series(after, sessions[pair]) in (None, _session_series(before, sessions[pair])), (
            f"the relay forwarded {moved[pair]} bytes for direct pair {pair}\n{_logs(run)}"
        )
    for pair in relayed:
        # Each echo request and reply crossed the relay sealed (>= 98 bytes each).
        assert moved[pair] >= 2 * PING_COUNT * MIN_RELAYED_FRAME_BYTES, (pair, moved)
    total = after["traversal_relay_forwarded_bytes_total"] - before["traversal_relay_forwarded_bytes_total"]
    assert total == sum(moved[pair] for pair in relayed), (total, moved)
    assert after["traversal_relay_clients_connected"] == len(lab.peers), after
    _assert_predicted(run, _pairs(run, _statuses(run)))


def test_broadcast_reaches_every_other_peer_once(mesh: Any) -> None:
    run, lab = mesh, mesh.lab
    _wait_settled(run, SETTLE_TIMEOUT_S)
    sender, others = lab.peers[0], lab.peers[1:]
    captures = {peer: run.capture(f"host-{peer}", "tap0", file=f"arp-{peer}.pcap") for peer in others}
    try:
        lab.run(f"host-{sender}", sys.executable, "-c", SEND_ARP, _overlay_ip(run, sender), UNUSED_OVERLAY_IP)

        def everywhere() -> bool:
            seen = [_arp_requests(c.path, _overlay_ip(run, sender), UNUSED_OVERLAY_IP) for c in captures.values()]
            return all(seen)

        with contextlib.suppress(overlay_module.OverlayError):  # the counts below say where it is missing
            overlay_module.wait_until(everywhere, ARP_DELIVERY_TIMEOUT_S, "the ARP request on every TAP", 0.05)
        time.sleep(DUPLICATE_GRACE_S)
    finally:
        for capture in captures.values():
            capture.stop()
    counts = {peer: _arp_requests(c.path, _overlay_ip(run, sender), UNUSED_OVERLAY_IP) for peer, c in captures.items()}
    assert counts == dict.fromkeys(others, 1), f"copies of {sender}'s ARP request per TAP: {counts}\n{_logs(run)}"


def test_killed_peer_recovers_with_fresh_sessions(mesh: Any) -> None:
    run, lab = mesh, mesh.lab
    before = _wait_settled(run, SETTLE_TIMEOUT_S)
    victim = lab.peers[0]  # cone: one direct pair (symseq), two relayed ones
    old = {pair: p["a"]["session_id"] for pair, p in before.items() if victim in pair}
    old_e2e = {pair: {p["a"]["e2e_session"], p["b"]["e2e_session"]} for pair, p in before.items() if victim in pair}
    killed_at = time.monotonic()
    run.kill(victim)
    run.start_peer(victim, victim, extra=NODE_FLAGS)

    def fresh(pairs: dict[tuple[str, str], dict[str, Any]]) -> bool:
        return all(
            pairs[pair]["a"]["session_id"] != old[pair]
            and not {pairs[pair]["a"]["e2e_session"], pairs[pair]["b"]["e2e_session"]} & old_e2e[pair]
            for pair in old
        )

    after = _wait_settled(run, RECOVERY_BOUND_S, fresh)
    recovered_s = time.monotonic() - killed_at
    _assert_predicted(run, after)
    _ping_every_pair(run, [pair for pair in after if victim in pair], "restart")
    print(f"{victim} killed and restarted: every pair fresh and settled after {recovered_s:.1f} s")
    assert recovered_s < RECOVERY_BOUND_S
    # The log is appended to across the restart: one login before the kill, one after.
    assert run.log_count(victim, "event=joined") >= 2, run.log_text(victim)
