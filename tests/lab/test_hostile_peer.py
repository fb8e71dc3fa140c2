"""A malicious member (issue 7): garbage after the handshake, replayed counters, frames outside
the MTU, a DATA flood and spoofed datagrams on the direct path; the victim must reject and count
them, deliver to its TAP only what authenticated, and stay up with its other session untouched.

The attacker is ``netns-lab/hostile_peer.py``, a member of the network (its key is in the
members file) that completes the real handshake with the victim b through the relay, so it
holds valid session keys, and then attacks. It runs in the WAN namespace, like a host on the
internet: to b it talks through the relay only (it refuses direct paths), and it aims the
spoofed datagrams at b's direct path with a (a and b go direct, behind cone NATs) from a raw
socket carrying a's public address and port.

What each test checks comes from DESIGN.md's session rules: a record is accepted once, only
if it authenticates under the session's keys, and only if its Ethernet frame fits the MTU;
everything else costs that record (counted in ``traversal status`` by reason), never the
session, another session, or the process. The attack runs once (the module's fixture); the
tests read its results. Every frame the attacker seals carries a numbered marker, so the
capture on b's TAP says exactly which of them got through.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.lab.conftest import load_netns_module
from transport.identity import decode_public
from traversal.logfmt import LOG_BURST
from traversal.node import stable_mac
from traversal.peer import ETHERNET_OVERHEAD, MIN_ETHERNET_FRAME

REPO = Path(__file__).resolve().parents[2]
HOSTILE_PEER = REPO / "netns-lab" / "hostile_peer.py"

pytestmark = pytest.mark.lab

overlay_module = load_netns_module("overlay")
hostile = load_netns_module("hostile_peer")

#: The attacks, in order: wait for the go-ahead (and the spoof addresses), attack, wait while
#: the test reads b's counters, then end with a frame the relay must refuse.
ATTACKS = "wait,garbage,oversize,flood,replay,spoof,wait,malformed"
FLOOD_FRAMES = 100_000
FLOOD_SECONDS = 3.0
#: Forgeries per kind and per variant in each attack.
COUNT = 8
#: a pings b through the whole attack: one echo request every PING_INTERVAL seconds.
PING_INTERVAL = 0.02
#: The loss the overlay ping may suffer while b digests the flood (it is b's CPU the flood takes).
MAX_PING_LOSS = 0.2
#: Generous bounds on things that take well under a second when the machine is idle.
SETTLE_TIMEOUT = 30.0
DIRECT_TIMEOUT_S = 3.0


@dataclass
class Stage:
    """The running lab: relay, nodes a and b, and the attacker m (its stdin is our go-ahead)."""

    overlay: Any
    hostile: subprocess.Popen[str]
    output: Path

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        text = self.output.read_text(errors="replace") if self.output.exists() else ""
        return hostile.events(text, kind)

    def wait_event(self, kind: str, count: int = 1, timeout: float = SETTLE_TIMEOUT) -> dict[str, Any]:
        def seen() -> dict[str, Any] | None:
            found = self.events(kind)
            if len(found) >= count:
                return found[count - 1]
            if self.hostile.poll() is not None:
                raise AssertionError(f"the hostile peer exited ({self.hostile.returncode}):\n{self.tail()}")
            return None

        return overlay_module.wait_until(seen, timeout, f"the hostile peer to print {kind!r} #{count}", 0.02)

    def go(self, line: str = "go") -> None:
        assert self.hostile.stdin is not None
        self.hostile.stdin.write(line + "\n")
        self.hostile.stdin.flush()

    def tail(self) -> str:
        text = self.output.read_text(errors="replace") if self.output.exists() else ""
        return "\n".join(line[:300] for line in text.splitlines()[-15:])


@dataclass
class Outcome:
    """What the attack did, and what b and a showed for it."""

    reports: dict[str, dict[str, Any]]
    before: dict[str, dict[str, Any]]  # b's view of each peer ("a", "m") before the attacks
    during: dict[str, dict[str, Any]]  # ... once b had digested them (before the session ended)
    after: dict[str, Any]  # b's whole status once m is gone
    a_after: dict[str, Any]  # a's view of b at the end
    kernel_udp_drops: int  # datagrams host-b's kernel dropped (full socket buffer) during the attacks
    ping: Any  # overlay_module.PingResult
    frames: list[Any]  # overlay_module.CapturedFrame, inbound on b's tap0
    mtu: int
    hostile_exit: int
    digested_at: float  # when b had read the last of m's frames (epoch seconds)

    def expected_drops(self) -> Counter[str]:
        """What b must have counted for m: every attack but the spoof (which lands on a's session)."""
        total: Counter[str] = Counter()
        for name, report in self.reports.items():
            if name != "spoof":
                total.update(report["expect"])
        return total

    def valid(self) -> set[int]:
        return {seq for report in self.reports.values() for seq in hostile.valid_markers(report)}

    def rejected(self) -> set[int]:
        return {seq for report in self.reports.values() for seq in report["rejected"]}


def _by_name(status: dict[str, Any] | None, names: dict[str, str]) -> dict[str, dict[str, Any]]:
    """b's peers keyed "a" / "m" (by public key)."""
    found = {}
    for peer in (status or {}).get("peers", []):
        for name, key in names.items():
            if peer["identity"] == key:
                found[name] = peer
    return found


def _udp_receive_errors(lab: Any, role: str) -> int:
    """UDP datagrams the kernel of ``role`` dropped on receive (RcvbufErrors: a full socket buffer)."""
    snmp = lab.run(role, "cat", "/proc/net/snmp").stdout.splitlines()
    header, values = (line.split() for line in snmp if line.startswith("Udp:"))
    return int(dict(zip(header, values, strict=True))["RcvbufErrors"])


def _addr(candidate: str) -> str:
    """ "203.0.113.12:4242 srflx" -> "203.0.113.12:4242"."""
    return candidate.split()[0]


@pytest.fixture(scope="module")
def stage(lab_module: ModuleType, lab_prerequisites: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stage]:
    lab = lab_module.Lab(nat_a="cone", nat_b="cone")
    proc: subprocess.Popen[str] | None = None
    try:
        lab.up()
        run = overlay_module.Overlay(lab, tmp_path_factory.mktemp("hostile-peer"))
        for name in ("a", "b", "m"):
            run.keygen(name)
        members = run.write_members(["a", "b", "m"])
        run.start_relay(members)
        output = run.workdir / "m.out"
        argv = [
            sys.executable,
            str(HOSTILE_PEER),
            "--relay",
            f"wss://{overlay_module.RELAY_IP}:{run.relay_port}",
            "--ca",
            str(run.cert),
            "--network",
            overlay_module.NETWORK,
            "--identity",
            str(run.key_path("m")),
            "--victim",
            run.pubkeys["b"],
            "--attacks",
            ATTACKS,
            "--count",
            str(COUNT),
            "--flood-frames",
            str(FLOOD_FRAMES),
            "--flood-seconds",
            str(FLOOD_SECONDS),
        ]
        # The attacker is on the relay first, so b keeps its relay connection for m's session
        # after it and a go direct.
        with open(output, "w") as out, open(run.log_path("m"), "w") as err:
            proc = lab.popen("wan", argv, stdin=subprocess.PIPE, stdout=out, stderr=err, text=True)
        run.start_peers(["--direct-timeout", str(DIRECT_TIMEOUT_S)])
        yield Stage(run, proc, output)
    finally:
        try:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(5)
            if "run" in locals():
                run.stop_all()
        finally:
            lab.down()


@pytest.fixture(scope="module")
def outcome(stage: Stage) -> Outcome:
    run, lab = stage.overlay, stage.overlay.lab
    names = {"a": run.pubkeys["a"], "m": run.pubkeys["m"]}
    run.wait_path("a", "a", "direct", timeout=SETTLE_TIMEOUT)
    established = stage.wait_event("established")
    stage.wait_event("waiting")

    def both_ready(status: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
        peers = _by_name(status, names)
        ready = peers.get("a", {}).get("path") == "direct" and peers.get("m", {}).get("state") == "established"
        return peers if ready else None

    before = run.wait_status("b", "b", both_ready, SETTLE_TIMEOUT, "a direct and m established")
    a_status = run.wait_path("a", "a", "direct", timeout=SETTLE_TIMEOUT)
    # Spoof a's side of the direct path: from a's public address (as b sees it) to b's.
    spoof = f"{_addr(before['a']['direct']['remote_candidate'])} {_addr(a_status['direct']['remote_candidate'])}"
    udp_errors = _udp_receive_errors(lab, "host-b")

    capture = run.capture("host-b", "tap0", "tap-b.pcap", direction="in", snaplen=96)
    ping = run.start_ping("a", "10.10.10.4", count=int(60 / PING_INTERVAL), interval=PING_INTERVAL)
    ping.wait_answered(5, SETTLE_TIMEOUT)
    stage.go(spoof)
    stage.wait_event("waiting", count=2, timeout=60)
    reports = {e["attack"]: e for e in stage.events("attack")}
    valid_from_m = sum(len(hostile.valid_markers(r)) for r in reports.values())
    spoofed = reports["spoof"]["sent"]

    def digested(status: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
        """b has read everything m sent (the relay keeps order: the last marker came last), and
        every spoofed datagram it was given."""
        peers = _by_name(status, names)
        if peers.get("m", {}).get("rx_frames", -1) < valid_from_m:
            return None
        dropped_a, before_a = peers.get("a", {}).get("dropped", {}), before["a"]["dropped"]
        seen = sum(dropped_a.get(r, 0) - before_a.get(r, 0) for r in ("auth", "malformed-frame"))
        lost = _udp_receive_errors(lab, "host-b") - udp_errors
        return peers if seen + lost >= spoofed["forged-data"] + spoofed["bad-frame"] else None

    during = run.wait_status("b", "b", digested, SETTLE_TIMEOUT, "b to digest the attacks")
    digested_at = time.time()
    ping.wait_answered(ping.answered() + 3, SETTLE_TIMEOUT)  # the ping outlasts the flood
    ping_result = ping.stop()
    kernel_udp_drops = _udp_receive_errors(lab, "host-b") - udp_errors

    # The end: a frame whose length field lies makes the relay drop m, and b hears that.
    stage.go()
    hostile_exit = stage.hostile.wait(SETTLE_TIMEOUT)
    reports = {e["attack"]: e for e in stage.events("attack")}
    run.wait_log("b", "event=peer_left", SETTLE_TIMEOUT)
    after = run.wait_status(
        "b", "b", lambda s: s if "m" not in _by_name(s, names) else None, SETTLE_TIMEOUT, "m's session to end"
    )
    capture.stop()
    frames = overlay_module.read_pcap_frames(capture.path)
    a_after = run.wait_path("a", "a", "direct", timeout=SETTLE_TIMEOUT)
    numbers = {
        name: {"sent": r["sent"], "expect": r["expect"], "valid": len(hostile.valid_markers(r))}
        for name, r in reports.items()
    }
    counted = {name: during[name]["dropped"] for name in ("a", "m")}
    flood = reports["flood"].get("note")
    (run.workdir / "outcome.json").write_text(json.dumps({"attacks": numbers, "counted_at_b": counted, "flood": flood}))
    return Outcome(
        reports=reports,
        before=before,
        during=during,
        after=after,
        a_after=a_after,
        kernel_udp_drops=kernel_udp_drops,
        ping=ping_result,
        frames=frames,
        mtu=established["mtu"],
        hostile_exit=hostile_exit,
        digested_at=digested_at,
    )


def test_every_attack_ran_and_the_session_was_real(stage: Stage, outcome: Outcome) -> None:
    assert outcome.hostile_exit == 0, stage.tail()
    assert set(outcome.reports) == {"garbage", "oversize", "flood", "replay", "spoof", "malformed"}
    # m held the real session: b shows the same end-to-end session tag m derived.
    established = stage.events("established")[0]
    assert outcome.before["m"]["e2e_session"] == established["e2e"]
    # Each attack did what it says (a run that silently sent nothing would pass everything else).
    sent = {name: sum(r["sent"].values()) for name, r in outcome.reports.items()}
    assert min(sent.values()) >= 1, sent
    assert outcome.reports["flood"]["sent"]["valid-marker"] >= 1000, outcome.reports["flood"]
    assert outcome.reports["replay"]["sent"]["copy-too-old"] >= 1, "the flood did not move the replay window"


def test_the_victim_counts_every_rejected_frame_by_reason(outcome: Outcome) -> None:
    """Over the relay nothing is lost, so the counts are exact: each reason rose by what m did."""
    dropped = {reason: n for reason, n in outcome.during["m"]["dropped"].items() if n}
    expected = dict(outcome.expected_drops())
    assert dropped == expected
    # Replays are counted as replays, and nothing else was (no record counted twice).
    assert dropped["replay"] == outcome.reports["replay"]["expect"]["replay"]
    assert dropped["oversize"] == outcome.reports["oversize"]["expect"]["oversize"]
    assert dropped["undersize"] == MIN_ETHERNET_FRAME + 1  # 0..13 bytes, and one in a BUNDLE
    # What authenticated and fit was delivered, each frame once.
    assert outcome.during["m"]["rx_frames"] == len(outcome.valid())


def test_spoofed_datagrams_are_counted_on_the_session_they_impersonate(outcome: Outcome) -> None:
    """Datagrams with a's address land on a's session at b: forged records fail the AEAD, bad
    framing is dropped before it, both counted. UDP may lose some in the kernel, never more."""
    spoof = outcome.reports["spoof"]
    before, during = outcome.before["a"]["dropped"], outcome.during["a"]["dropped"]
    rose = {reason: during.get(reason, 0) - before.get(reason, 0) for reason in ("auth", "malformed-frame")}
    lost = outcome.kernel_udp_drops
    for reason, expected in spoof["expect"].items():
        assert expected - lost <= rose[reason] <= expected, (reason, rose, spoof, lost)
    assert sum(rose.values()) + lost >= sum(spoof["expect"].values())
    # Nothing else on a's session moved: no replay, no frame out of bounds.
    for reason in ("replay", "epoch", "malformed", "oversize", "undersize"):
        assert during.get(reason, 0) == before.get(reason, 0), (reason, before, during)


def test_only_authenticated_frames_reach_the_tap(stage: Stage, outcome: Outcome) -> None:
    """Every frame b wrote into its TAP came from a, or is one of m's validly sealed markers, once;
    none of m's garbage, replays, oversized or runt frames; and no valid marker went missing."""
    a_mac = stable_mac(decode_public(stage.overlay.pubkeys["a"]))
    valid, rejected = outcome.valid(), outcome.rejected()
    limit = outcome.mtu + ETHERNET_OVERHEAD
    seen: Counter[int] = Counter()
    from_a = 0
    strays = []
    for frame in outcome.frames:
        found = hostile.parse_marker(frame.data)
        if found is not None:
            seen[found[0]] += 1
            assert MIN_ETHERNET_FRAME <= frame.length <= limit, (found, frame.length)
        elif frame.data[6:12] == a_mac and MIN_ETHERNET_FRAME <= frame.length <= outcome.mtu + 14:
            from_a += 1
        else:
            strays.append((frame.length, frame.data[:32].hex()))
    assert strays == [], f"{len(strays)} frames on b's TAP are neither a's nor m's valid markers: {strays[:5]}"
    assert not set(seen) & rejected, f"markers that must not arrive did: {sorted(set(seen) & rejected)[:20]}"
    duplicates = {seq: n for seq, n in seen.items() if n > 1}
    assert duplicates == {}, f"markers delivered more than once: {list(duplicates.items())[:20]}"
    assert set(seen) == valid, f"valid markers missing on the TAP: {sorted(valid - set(seen))[:20]}"
    assert from_a >= outcome.ping.received  # a's echo requests were among them


def test_the_legitimate_session_is_undisturbed(outcome: Outcome) -> None:
    before, during = outcome.before["a"], outcome.during["a"]
    final = _by_name(outcome.after, {"a": before["identity"]})["a"]
    assert final["e2e_session"] == during["e2e_session"] == before["e2e_session"]
    assert final["state"] == "established" and final["path"] == "direct"
    assert outcome.a_after["e2e_session"] == before["e2e_session"]
    assert final["handshakes"] == before["handshakes"]
    # a's pings to b went on through the flood: from before it began until b had digested it.
    ping, flood = outcome.ping, outcome.reports["flood"]
    window = (flood["started"], outcome.digested_at)
    sent = [r.sent_at for r in ping.replies]
    assert min(sent) < window[0] and max(sent) > window[1], (ping.summary(), window)
    during = [seq for seq in range(1, ping.transmitted + 1) if window[0] <= ping.sent_at(seq) <= window[1]]
    lost = set(ping.missing()) & set(during)
    assert len(during) >= 10, (ping.summary(), window)
    assert len(lost) <= MAX_PING_LOSS * len(during), (len(lost), len(during), ping.summary())
    assert ping.duplicates == 0, ping.summary()


def test_a_malformed_frame_ends_only_the_hostile_session(stage: Stage, outcome: Outcome) -> None:
    run = stage.overlay
    malformed = outcome.reports["malformed"]
    assert "truncated" in malformed["note"] or "protocol error" in malformed["note"], malformed
    # The relay refused the frame and said why ...
    relay_log = run.log_text("relay")
    refusals = [line for line in relay_log.splitlines() if "event=protocol_error" in line]
    assert len(refusals) == 1 and "malformed DATA frame" in refusals[0], refusals
    # ... b logged the end of that one session with the reason, and of no other.
    left = [line for line in run.log_text("b").splitlines() if "event=peer_left" in line]
    assert len(left) == 1, left
    assert f"session={outcome.before['m']['session_id'][:8]}" in left[0] and 'reason="protocol error"' in left[0]
    assert [p["identity"] for p in outcome.after["peers"]] == [run.pubkeys["a"]]


def test_the_victim_stays_up_and_the_garbage_does_not_flood_its_log(stage: Stage, outcome: Outcome) -> None:
    """Last: stop b. It ran through everything, exits cleanly, and its log holds a few drop lines
    per peer and a summary of the rest, not a line per bad frame."""
    run = stage.overlay
    assert run.procs["b"].poll() is None, "b died"
    ping = run.ping("a", "10.10.10.4", count=3, interval=0.2)
    assert " 0% packet loss" in ping, ping
    assert run.stop("b") == 0
    log = run.log_text("b")
    assert "Traceback" not in log and "internal-error" not in log
    bad_frames = outcome.during["a"]["dropped"].get("malformed-frame", 0)
    assert bad_frames > LOG_BURST, "the spoof must send more bad frames than the log shows"
    logged = [line for line in log.splitlines() if "event=direct_frame_dropped " in line]
    assert len(logged) == LOG_BURST, len(logged)
    summaries = [line for line in log.splitlines() if "event=direct_frame_dropped_suppressed" in line]
    assert len(summaries) == 1 and f"suppressed={bad_frames - LOG_BURST} " in summaries[0], summaries
    # Nothing else was logged per bad frame either.
    per_event = Counter(line.split("event=", 1)[1].split()[0] for line in log.splitlines() if "event=" in line)
    assert max(per_event.values()) <= 2 * LOG_BURST, per_event.most_common(5)
