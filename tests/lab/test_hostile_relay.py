"""A malicious relay (issue 7): it records, flips bits, replays, swaps sessions, injects forged
frames and lies about addresses; the real nodes, TAPs and NATs must hold.

The relay is ``netns-lab/hostile_relay.py``: the real relay with hooks, switched between
behaviours over its HTTPS port. Three members (a and c behind NAT a, b behind NAT b) stay on
the relay path (``--no-direct``) for the tampering tests, so every frame they exchange
crosses the attacker. The expected outcomes come from DESIGN.md's trust model:

- everything the relay sees is sealed: its recording holds no Ethernet frame and no
  host candidate;
- whatever it tampers with, replays, swaps or forges is rejected and counted by the
  receiver (its ``dropped`` counters rise by what the relay says it did), never reaches
  a TAP (tcpdump on the TAP sees none of it) and never ends a session;
- a lie in ESTABLISHED costs at most the direct path, and the direct path still goes to
  the real peer.

The tests share one lab and run in file order; the recording is checked last, over all of it.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.lab.conftest import load_netns_module

REPO = Path(__file__).resolve().parents[2]
HOSTILE_RELAY = REPO / "netns-lab" / "hostile_relay.py"

pytestmark = pytest.mark.lab

overlay_module = load_netns_module("overlay")

ADDRESS = {"a": "10.10.10.3", "b": "10.10.10.4", "c": "10.10.10.5"}
#: Where each node runs, and its TAP (c shares host-a with a; a /32 adds no route there).
PLACES = {"a": ("a", "tap0"), "b": ("b", "tap0"), "c": ("a", "tap1")}
#: The ping payload pattern: 16 bytes no ciphertext will show by chance, and that every
#: echo request carries in the clear inside its Ethernet frame.
PATTERN = "7261766572736121deadbeefc0ffee42"
DIRECT_TIMEOUT_S = 3.0


def _start(run: Any, name: str, *, direct: bool) -> None:
    peer, tap = PLACES[name]
    extra = ["--tap", tap, "--address", f"{ADDRESS[name]}/{'32' if name == 'c' else '24'}"]
    extra += ["--direct-timeout", str(DIRECT_TIMEOUT_S)] if direct else ["--no-direct"]
    run.start_peer(name, peer, extra=extra)


@pytest.fixture(scope="module")
def overlay(lab_module: ModuleType, lab_prerequisites: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    lab = lab_module.Lab(nat_a="cone", nat_b="cone")
    with overlay_module.running(lab, tmp_path_factory.mktemp("hostile-relay")) as run:
        for name in ADDRESS:
            run.keygen(name)
        run.recording = run.workdir / "recording.bin"
        command = [sys.executable, str(HOSTILE_RELAY), "--record", str(run.recording)]
        run.start_relay(run.write_members(list(ADDRESS)), command=[*command, "--lie-ip", overlay_module.RELAY_ALT_IP])
        for name in ADDRESS:
            _start(run, name, direct=False)
        yield run


# --- helpers ----------------------------------------------------------------------------


def _hostile(run: Any, mode: str | None = None) -> dict[str, Any]:
    """Switch the relay's behaviour (or just read its counts): {victim public key: {what: n}}."""
    body = json.loads(run.relay_get("/hostile" + (f"?mode={mode}" if mode else "")))
    return body["counts"]


def _did(counts: dict[str, Any], run: Any, victim: str, what: str) -> int:
    return int(counts.get(run.pubkeys[victim], {}).get(what, 0))


def _links(run: Any, name: str) -> dict[str, dict[str, Any]]:
    """Node ``name``'s peers by name."""
    status = run.status(name, PLACES[name][0]) or {}
    names = {key: n for n, key in run.pubkeys.items()}
    return {names[p["identity"]]: p for p in status.get("peers", []) if p["identity"] in names}


def _dropped(run: Any, name: str) -> int:
    """Everything node ``name`` has rejected, over all its sessions."""
    return sum(sum(p["dropped"].values()) for p in _links(run, name).values())


def _sessions(run: Any) -> dict[tuple[str, str], tuple[str, int]]:
    """(node, peer) -> (end-to-end session tag, handshakes run): what must not change under attack."""
    return {(n, p): (link["e2e_session"], link["handshakes"]) for n in ADDRESS for p, link in _links(run, n).items()}


def _ping(run: Any, src: str, dst: str, count: int) -> Any:
    """``count`` echo requests (payload ``PATTERN``) from node ``src`` to node ``dst``."""
    proc = run.lab.run(
        f"host-{PLACES[src][0]}",
        *("ping", "-c", str(count), "-i", "0.1", "-W", "1", "-p", PATTERN, "-I", PLACES[src][1], ADDRESS[dst]),
        check=False,
        timeout=60,
    )
    match = re.search(r"(\d+) packets transmitted, (\d+) received(?:, \+(\d+) duplicates)?", proc.stdout)
    assert match, f"unexpected ping output:\n{proc.stdout}{proc.stderr}"
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def _mac(run: Any, name: str) -> str:
    """The MAC address of node ``name``'s TAP."""
    peer, tap = PLACES[name]
    return run.lab.run(f"host-{peer}", "cat", f"/sys/class/net/{tap}/address").stdout.strip()


def _echo_requests(packets: list[Any], src: str, dst: str) -> int:
    return sum(1 for p in packets if p.proto == 1 and p.src == ADDRESS[src] and p.dst == ADDRESS[dst])


def _wait_dropped(run: Any, name: str, at_least: int, what: str) -> None:
    overlay_module.wait_until(
        lambda: _dropped(run, name) >= at_least, 15, f"{name} to count {what} ({at_least} dropped in all)"
    )


# --- the tests ------------------------------------------------------------------------------


def test_members_meet_through_the_hostile_relay(overlay: Any) -> None:
    for name in ADDRESS:
        overlay.wait_status(
            name,
            PLACES[name][0],
            lambda s: sum(p["state"] == "established" and p["path"] == "relay" for p in s["peers"]) == 2,
            45,
            "both other members established on the relay path",
        )
    tap_c = overlay.capture(f"host-{PLACES['c'][0]}", PLACES["c"][1], "switch-c.pcap")
    sent, received, _ = _ping(overlay, "a", "b", 5)
    seen_by_c = tap_c.stop()
    assert received == sent == 5
    # The learning switch: a's ARP request went to both, but once b answered, a's echo requests
    # went to b alone (c's TAP saw none of them), and each node knows which peer owns which MAC.
    assert _echo_requests(seen_by_c, "a", "b") == 0
    mac_b, mac_c = (_mac(overlay, n) for n in ("b", "c"))
    links_a = _links(overlay, "a")
    assert links_a["b"]["macs"] == [mac_b]
    assert set(links_a["c"]["macs"]) <= {mac_c}  # c's kernel may have spoken (IPv6 solicitations)
    switch_a = overlay.status("a", "a")["switch"]
    assert switch_a["unicast"] >= 5 and switch_a["flooded"] >= 1, switch_a


def test_flipped_bits_are_rejected_counted_and_kept_off_the_tap(overlay: Any) -> None:
    sessions = _sessions(overlay)
    before = {n: _dropped(overlay, n) for n in ADDRESS}
    tap_b = overlay.capture(f"host-{PLACES['b'][0]}", PLACES["b"][1], "flip-b.pcap")
    counts_before = _hostile(overlay, "flip")
    try:
        sent, received, _ = _ping(overlay, "a", "b", 10)
    finally:
        counts = _hostile(overlay, "honest")
    seen_by_b = tap_b.stop()
    assert received == 0, "a frame with a flipped bit was accepted"
    for name in ADDRESS:
        flipped = _did(counts, overlay, name, "flipped") - _did(counts_before, overlay, name, "flipped")
        _wait_dropped(overlay, name, before[name] + flipped, "the flipped frames")
        # Exactly one rejection per flipped frame: nothing tampered got through, nothing was counted twice.
        assert _dropped(overlay, name) - before[name] == flipped, name
    assert _did(counts, overlay, "b", "flipped") - _did(counts_before, overlay, "b", "flipped") >= sent
    assert _echo_requests(seen_by_b, "a", "b") == 0
    assert _sessions(overlay) == sessions
    assert _ping(overlay, "a", "b", 5)[1] == 5


def test_replays_are_rejected_counted_and_never_duplicated(overlay: Any) -> None:
    sessions = _sessions(overlay)
    before = {n: _links(overlay, n) for n in ADDRESS}
    tap_b = overlay.capture(f"host-{PLACES['b'][0]}", PLACES["b"][1], "replay-b.pcap")
    counts_before = _hostile(overlay, "replay")  # and, at once, every frame it forwarded so far, again
    try:
        sent, received, duplicates = _ping(overlay, "a", "b", 10)
    finally:
        counts = _hostile(overlay, "honest")
    seen_by_b = tap_b.stop()
    assert (sent, received, duplicates) == (10, 10, 0)
    # The TAP saw each echo request once, though the relay delivered each one twice.
    assert _echo_requests(seen_by_b, "a", "b") == 10
    assert _did(counts, overlay, "b", "duplicated") - _did(counts_before, overlay, "b", "duplicated") >= 10
    assert _did(counts, overlay, "b", "replayed") > 0  # the old handshake and DATA frames
    for name in ADDRESS:
        duplicated = _did(counts, overlay, name, "duplicated") - _did(counts_before, overlay, name, "duplicated")

        def replays(name: str = name) -> int:
            return sum(p["dropped"].get("replay", 0) for p in _links(overlay, name).values())

        replays_before = sum(p["dropped"].get("replay", 0) for p in before[name].values())
        overlay_module.wait_until(
            lambda name=name, duplicated=duplicated, replays_before=replays_before: (
                replays(name) - replays_before >= duplicated
            ),
            15,
            f"{name} to count {duplicated} replays",
        )
    # The replayed handshakes started nothing: same sessions, no new handshake.
    assert _sessions(overlay) == sessions


def test_swapped_sessions_deliver_nothing(overlay: Any) -> None:
    sessions = _sessions(overlay)
    before = {n: _dropped(overlay, n) for n in ADDRESS}
    taps = {n: overlay.capture(f"host-{PLACES[n][0]}", PLACES[n][1], f"swap-{n}.pcap") for n in ("b", "c")}
    counts_before = _hostile(overlay, "swap")
    try:
        _, received, _ = _ping(overlay, "a", "b", 10)
    finally:
        counts = _hostile(overlay, "honest")
    seen = {n: tap.stop() for n, tap in taps.items()}
    assert received == 0, "a frame delivered on the wrong session was accepted"
    # a's echo requests went to c under a-c's session: neither TAP saw any of them.
    assert _echo_requests(seen["b"], "a", "b") == 0
    assert not [p for p in seen["c"] if p.src == ADDRESS["a"]]
    for name in ADDRESS:
        swapped = _did(counts, overlay, name, "swapped") - _did(counts_before, overlay, name, "swapped")
        # a's echo requests for b (unicast: b alone) were delivered to c; the others had little to say.
        assert name != "c" or swapped >= 10
        _wait_dropped(overlay, name, before[name] + swapped, "the swapped frames")
    assert _sessions(overlay) == sessions
    assert _ping(overlay, "a", "b", 5)[1] == 5


def test_forged_and_broken_frames_from_the_relay_are_rejected(overlay: Any) -> None:
    sessions = _sessions(overlay)
    before = {n: _dropped(overlay, n) for n in ADDRESS}
    connects = {n: overlay.status(n, PLACES[n][0])["relay"]["connects"] for n in ADDRESS}
    tap_b = overlay.capture(f"host-{PLACES['b'][0]}", PLACES["b"][1], "inject-b.pcap")
    counts_before = _hostile(overlay, "inject")  # a volley of forgeries and garbage to everyone at once
    try:
        sent, received, duplicates = _ping(overlay, "a", "b", 10)  # each echo request preceded by a forgery
    finally:
        counts = _hostile(overlay, "honest")
    seen_by_b = tap_b.stop()
    assert (sent, received, duplicates) == (10, 10, 0)
    assert _echo_requests(seen_by_b, "a", "b") == 10
    for name in ADDRESS:
        forged = _did(counts, overlay, name, "forged") - _did(counts_before, overlay, name, "forged")
        assert forged > 0
        _wait_dropped(overlay, name, before[name] + forged, "the forged frames")
        assert _did(counts, overlay, name, "garbage") > 0
        overlay.wait_log(name, "event=relay_frame_dropped", 5)
        assert "Traceback" not in overlay.log_text(name)
        # The garbage cost frames, not the relay connection.
        assert overlay.status(name, PLACES[name][0])["relay"]["connects"] == connects[name]
    assert _sessions(overlay) == sessions


def test_a_lying_relay_cannot_steer_the_direct_path(overlay: Any) -> None:
    """ESTABLISHED names the relay's other address as each peer's public one: the peers still go
    direct to each other, at the real addresses, and send the liar's address nothing but checks."""
    for name in ADDRESS:
        assert overlay.stop(name) == 0
    lie = overlay_module.RELAY_ALT_IP
    wan = overlay.capture("wan", "br0", "lie-wan.pcap")
    _hostile(overlay, "lie")
    try:
        for name in ("a", "b"):
            _start(overlay, name, direct=True)
        paths = {n: overlay.wait_path(n, n, "direct", timeout=45) for n in ("a", "b")}
    finally:
        counts = _hostile(overlay, "honest")
        packets = wan.stop()
    for name, other in (("a", "b"), ("b", "a")):
        assert _did(counts, overlay, name, "lied") >= 1
        assert paths[name]["endpoint"].startswith(lie + ":")  # what the relay said ...
        remote = paths[name]["direct"]["remote_candidate"]
        assert remote.startswith(overlay.lab.public_address(other) + ":"), remote  # ... and where the path went
    to_liar = [p for p in packets if p.proto == 17 and p.dst == lie and p.dport != overlay_module.STUN_ALT_PORT]
    # Connectivity checks at most (STUN's first byte is 0 or 1): no QUIC, no sealed frame.
    assert all(p.first_byte is not None and p.first_byte < 2 for p in to_liar), to_liar
    assert _ping(overlay, "a", "b", 5)[1] == 5


def test_a_lie_with_censored_candidates_costs_only_the_direct_path(overlay: Any) -> None:
    for name in ("a", "b"):
        assert overlay.stop(name) == 0
    _hostile(overlay, "lie-censor")
    try:
        for name in ("a", "b"):
            _start(overlay, name, direct=True)
        # The controlling side's attempt times out waiting for candidates that never come.
        overlay_module.wait_until(
            lambda: any("event=direct_failed" in overlay.log_text(n) for n in ("a", "b")), 30, "a failed attempt"
        )
        counts = _hostile(overlay)
        sent, received, _ = _ping(overlay, "a", "b", 5)
        paths = {n: overlay.wait_established(n, n) for n in ("a", "b")}
    finally:
        counts = _hostile(overlay, "honest")
    # The controlling side offers first; the other answers only an offer, so one offer is dropped per attempt.
    assert _did(counts, overlay, "a", "censored") + _did(counts, overlay, "b", "censored") >= 1
    assert received == sent == 5
    assert all(p["path"] == "relay" for p in paths.values()), paths


def test_the_recording_holds_no_ethernet_frame_and_no_host_candidate(overlay: Any) -> None:
    """Everything the relay sent in this file's tests, handshakes, candidates, pings, ARP and all."""
    data = overlay.recording.read_bytes()
    frames = 0
    offset = 0
    while offset < len(data):
        offset += 4 + int.from_bytes(data[offset : offset + 4], "big")
        frames += 1
    assert offset == len(data) and frames > 200, (offset, len(data), frames)
    # Every echo request carried PATTERN and both TAPs' MAC addresses in the clear.
    secrets = {"ping payload": bytes.fromhex(PATTERN)}
    for name in ("a", "b"):
        secrets[f"{name}'s MAC"] = bytes.fromhex(_mac(overlay, name).replace(":", ""))
        # Host candidates: the nodes' LAN addresses, as the candidate lines would spell them.
        secrets[f"{name}'s LAN address"] = overlay.lab.host_address(name).encode()
    for what, needle in secrets.items():
        assert needle not in data, f"the relay saw {what} in the clear"
    # The recording is of the real traffic: the same search finds the pattern on a TAP.
    tap = overlay.capture("host-b", "tap0", "control-b.pcap")
    _ping(overlay, "a", "b", 2)
    tap.stop()
    assert bytes.fromhex(PATTERN) in (overlay.workdir / "control-b.pcap").read_bytes()
