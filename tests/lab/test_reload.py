"""Membership changes without a restart (issue 8): SIGHUP re-reads the relay's members files and a
node's --members allow-list, in the NAT lab with real processes.

One lab for the file (cone NATs both sides), three identities: a in host-a with its own
allow-list (b only at first), b in host-b keeping its relay connection (``--relay-standby keep``,
so it hears the relay at once), and c, on no list at first, in host-b beside b (its own TAP and
a /32 overlay address; ``--no-direct`` keeps its sessions on the relay). a and b go direct, so a
lets its relay connection go: adding c to a's allow-list must bring it back. The tests run in
file order, each building on the last.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

from tests.lab.conftest import load_netns_module

pytestmark = pytest.mark.lab

overlay_module = load_netns_module("overlay")

#: How long anything here may take: a login and a handshake are well under a second in the lab; a
#: responder that takes up an earlier announcement waits for the initiator's next try (10 s).
STEP_S = 20.0
C_ARGS = ["--tap", "tap1", "--address", "10.10.10.5/32", "--no-direct"]


@pytest.fixture(scope="module")
def overlay(lab_module: ModuleType, lab_prerequisites: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    lab = lab_module.Lab(nat_a="cone", nat_b="cone")
    with overlay_module.running(lab, tmp_path_factory.mktemp("reload")) as run:
        for name in ("a", "b", "c"):
            run.keygen(name)
        run.start_relay(run.write_members(["a", "b"], "relay.members"))
        run.start_peer("a", "a", extra=["--members", str(run.write_members(["b"], "a.members"))])
        run.start_peer("b", "b", extra=["--relay-standby", "keep"])
        yield run


def sessions(overlay: Any, name: str) -> dict[str, tuple[str, str | None]]:
    """Node ``name``'s peers by name: (state, end-to-end session)."""
    host = {"a": "a", "b": "b", "c": "b"}[name]
    status = overlay.status(name, host) or {}
    names = {key: peer for peer, key in overlay.pubkeys.items()}
    return {names.get(p["identity"], "?"): (p["state"], p.get("e2e_session")) for p in status.get("peers", [])}


def wait_sessions(overlay: Any, name: str, predicate: Any, what: str) -> dict[str, tuple[str, str | None]]:
    seen: list[dict[str, tuple[str, str | None]]] = [{}]

    def check() -> bool:
        overlay._check_alive(name)
        seen[0] = sessions(overlay, name)
        return bool(predicate(seen[0]))

    try:
        overlay_module.wait_until(check, STEP_S, f"{name}: {what}", interval=0.2)
        return seen[0]
    except overlay_module.OverlayError as exc:
        tails = overlay.log_tails(("a", "b", "c", "relay"))
        raise AssertionError(f"{exc}; last seen {seen[0]}\n{tails}") from None


def established(*names: str) -> Any:
    return lambda s: all(s.get(n, ("",))[0] == "established" for n in names)


def log_lines(overlay: Any, name: str, event: str) -> list[str]:
    return [line for line in overlay.log_text(name).splitlines() if f"event={event} " in line]


def reload_metric(overlay: Any, result: str) -> float:
    return overlay.metrics()[f'traversal_relay_member_reloads_total{{result="{result}"}}']


def hup(overlay: Any, name: str, event: str) -> str:
    """SIGHUP ``name`` and return the log line of the reload it caused (``event=members_reload...``)."""
    before = overlay.log_count(name, f"event={event} ")
    overlay.send_signal(name)
    overlay.wait_log(name, f"event={event} ", STEP_S, count=before + 1)
    return log_lines(overlay, name, event)[-1]


def test_members_and_a_b_session(overlay: Any) -> None:
    wait_sessions(overlay, "a", established("b"), "b established")
    wait_sessions(overlay, "b", established("a"), "a established")
    assert overlay.status("a", "a")["trust"] == "allow-list"


def test_a_malformed_relay_members_file_keeps_the_old_list(overlay: Any) -> None:
    before = sessions(overlay, "a")
    members = overlay.workdir / "relay.members"
    good = members.read_text()
    members.write_text(good + "this-is-not-a-key\n")
    try:
        line = hup(overlay, "relay", "members_reload_failed")
    finally:
        members.write_text(good)
    assert str(members) in line and "line 3: not a base64 public key" in line, line
    assert "ERROR" in line and "kept the previous members" in line
    assert reload_metric(overlay, "error") == 1 and reload_metric(overlay, "ok") == 0
    assert not log_lines(overlay, "relay", "evicted") and not log_lines(overlay, "relay", "networks_updated")
    assert sessions(overlay, "a") == before  # nobody noticed
    assert overlay.procs["relay"].poll() is None


def test_a_member_added_to_the_relay_gets_in_without_a_restart(overlay: Any) -> None:
    a_b = sessions(overlay, "a")["b"]
    # a and b went direct; a (standby "close") let the relay go, b kept it.
    overlay.wait_status("a", "a", lambda s: s["relay"]["state"] == "released", STEP_S, "relay released")
    overlay.write_members(["a", "b", "c"], "relay.members")
    line = hup(overlay, "relay", "members_reloaded")
    assert 'changes="chr-001 +1 -0 (3 members)"' in line, line
    overlay.start_peer("c", "b", extra=C_ARGS)
    wait_sessions(overlay, "c", established("b"), "b established")
    wait_sessions(overlay, "b", established("a", "c"), "a and c established")
    assert sessions(overlay, "a")["b"] == a_b  # untouched
    assert "c" not in sessions(overlay, "a")  # not on a's own allow-list (and a is not listening)
    assert reload_metric(overlay, "ok") == 1


def test_a_peer_added_to_a_nodes_allow_list_is_accepted(overlay: Any) -> None:
    a_b = sessions(overlay, "a")["b"]
    overlay.write_members(["b", "c"], "a.members")
    line = hup(overlay, "a", "members_reloaded")
    assert "added=1 removed=0 members=2" in line, line
    # a had let the relay go: it comes back for c (the relay announces c, and b again).
    needed = [line for line in log_lines(overlay, "a", "relay_needed") if "added to --members" in line]
    assert len(needed) == 1 and f"peers={overlay.pubkeys['c'][:8]}" in needed[0], overlay.log_tails(("a",))
    wait_sessions(overlay, "a", established("b", "c"), "b and c established")
    wait_sessions(overlay, "c", established("a", "b"), "a and b established")
    assert sessions(overlay, "a")["b"] == a_b  # the same end-to-end session, resumed on the new relay session


def test_a_member_removed_from_the_relay_is_disconnected(overlay: Any) -> None:
    a_c = sessions(overlay, "a")["c"]
    overlay.write_members(["a", "c"], "relay.members")
    started = time.monotonic()
    hup(overlay, "relay", "members_reloaded")
    assert overlay.procs["b"].wait(STEP_S) not in (0, None)
    errors = [line for line in overlay.log_text("b").splitlines() if line.startswith("traversal: error:")]
    assert len(errors) == 1 and "removed from the members of network 'chr-001'" in errors[0], errors
    assert "Traceback" not in overlay.log_text("b")
    # b's peers lose it at once: a (direct with b) hears b's BYE, c (relayed) the relay's PEER_LEFT.
    wait_sessions(overlay, "a", lambda s: "b" not in s, "b gone")
    wait_sessions(overlay, "c", lambda s: "b" not in s, "b gone")
    assert time.monotonic() - started < 10
    assert sessions(overlay, "a") == {"c": a_c}  # a-c unaffected
    assert overlay.metrics()["traversal_relay_clients_connected"] == 2
    assert any(f"peer={overlay.pubkeys['b'][:8]}" in line for line in log_lines(overlay, "relay", "evicted"))


def test_a_peer_removed_from_a_nodes_allow_list_is_closed_and_refused(overlay: Any) -> None:
    byes = len(log_lines(overlay, "c", "peer_bye"))
    overlay.write_members(["b"], "a.members")
    line = hup(overlay, "a", "members_reloaded")
    assert "added=0 removed=1 members=1" in line, line
    (removed,) = log_lines(overlay, "a", "peer_removed")
    assert f"peer={overlay.pubkeys['c'][:8]}" in removed and "bye=sent" in removed
    overlay.wait_log("c", "event=peer_bye ", STEP_S, count=byes + 1)
    assert "removed from the peer's --members allow-list" in log_lines(overlay, "c", "peer_bye")[-1]
    wait_sessions(overlay, "a", lambda s: s == {}, "no peers")
    wait_sessions(overlay, "c", lambda s: "a" not in s, "a gone")
    # From now on a refuses c: c comes back and the relay introduces it again.
    refused = len(log_lines(overlay, "a", "peer_refused"))
    assert overlay.stop("c") == 0
    overlay.start_peer("c", "b", extra=C_ARGS)
    overlay.wait_log("a", "event=peer_refused ", STEP_S, count=refused + 1)
    assert re.search(r'reason="not in --members allow-list"', log_lines(overlay, "a", "peer_refused")[-1])
    assert sessions(overlay, "a") == {}
