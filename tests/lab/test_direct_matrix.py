"""Issue 4's outcome matrix: for each pair of NAT profiles, does a relayed session go direct, and is
the traffic then really direct? Real parts throughout: the relay with its STUN server in the lab's
WAN namespace, a ``traversal connect`` node behind each NAT, real TAP devices and pings.

A "direct" pair must reach path=direct on both sides with the relay connection closed (the
default), and then, during a ping burst, a capture on the WAN bridge must show the pings as UDP
between the two NATs' public addresses (the hosts' own addresses over IPv6) and not one packet to or
from the relay's addresses, while the relay's forwarded-bytes counter stands still. A "relay" pair
must stay on the relay with the reason recorded, the retry timer armed on the controlling side, and
pings crossing the relay.

Each case builds its own lab (building one takes a tenth of a second; the relay and the two nodes
about a second more), so cases cannot disturb each other. Which side controls the ICE check
(the handshake initiator) follows from the random identities of each run.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.lab.conftest import load_netns_module, tear_down_labs
from transport.constants import WIRE_VERSION

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.lab


overlay_module = load_netns_module("overlay")
_peer_or_none = overlay_module.first_peer

#: Pairs expected to go direct. public and fullcone go direct with anything that lets UDP out; the
#: symseq pairs need the predicted candidates (the nominated remote is "predicted +k").
DIRECT_PAIRS = [
    ("public", "public"),
    ("public", "cone"),
    ("public", "fullcone"),
    ("public", "symseq"),
    ("public", "symrand"),
    ("public", "double"),
    ("public", "dualstack"),
    ("fullcone", "fullcone"),
    ("fullcone", "cone"),
    ("fullcone", "symseq"),
    ("fullcone", "symrand"),
    ("fullcone", "double"),
    ("fullcone", "dualstack"),
    ("cone", "cone"),
    ("cone", "symseq"),
    ("symseq", "symseq"),
    ("double", "cone"),
    ("double", "symseq"),
]

#: Pairs expected to stay on the relay: UDP blocked on one side (even facing the most open
#: partners), or a random symmetric NAT facing one that filters by address and port.
RELAY_PAIRS = [
    ("udpblock", "public"),
    ("fullcone", "udpblock"),
    ("udpblock", "cone"),
    ("symrand", "symrand"),
    ("cone", "symrand"),
]

#: A short deadline keeps the relay cases fast; every direct case keeps the default (5 s).
RELAY_CASE_FLAGS = ["--direct-timeout", "3"]
DEFAULT_DIRECT_TIMEOUT_S = 5.0
DEFAULT_RETRY_S = 60.0

#: Nodes: from start to a decided path (relay login, handshake and one attempt) with room to spare.
SETTLE_TIMEOUT_S = 30.0
PING_COUNT = 20
PING_INTERVAL_S = 0.05
#: A relayed echo request or reply: a 98-byte Ethernet frame, sealed and framed.
MIN_RELAYED_FRAME_BYTES = 98

PEER_B_ADDRESS = overlay_module.OVERLAY["b"].split("/")[0]


# --- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture
def start_overlay(lab_prerequisites: None, tmp_path: Path) -> Iterator[Callable[[Any], Any]]:
    """``start_overlay(lab)`` brings the (not yet built) lab up, makes identities a and b and
    starts the relay; the lab, with every process in it, is torn down when the test ends."""
    labs: list[Any] = []

    def start(lab: Any) -> Any:
        labs.append(lab)  # before up(): a half-built lab is torn down too
        lab.up()
        run = overlay_module.Overlay(lab, tmp_path / lab.prefix)
        for name in ("a", "b"):
            run.keygen(name)
        run.start_relay(run.write_members(["a", "b"]))
        return run

    yield start
    tear_down_labs(labs)


def _logs(run: Any) -> str:
    return str(run.log_tails())


def _peer(status: dict[str, Any] | None) -> dict[str, Any]:
    """The one peer of a node's status (each lab network has two members)."""
    peer = _peer_or_none(status)
    assert peer is not None, f"no peer in {status}"
    return peer


def _wait(run: Any, name: str, predicate: Callable[[dict[str, Any]], Any], what: str) -> Any:
    try:
        return run.wait_status(name, name, predicate, SETTLE_TIMEOUT_S, what)
    except overlay_module.OverlayError as exc:
        raise AssertionError(f"{exc}\n{_logs(run)}") from None


def _wait_direct(run: Any, name: str, *, relay_state: str = "released") -> dict[str, Any]:
    """Wait until ``name`` is direct both ways, its relay direction released and its relay
    connection in ``relay_state``; returns the whole status."""

    def ready(status: dict[str, Any]) -> dict[str, Any] | None:
        peer = _peer_or_none(status)
        if peer is None or (peer["path"], peer["peer_path"]) != ("direct", "direct"):
            return None
        if not peer["relay_released"] or status["relay"]["state"] != relay_state:
            return None
        return status

    return _wait(run, name, ready, f"direct both ways, relay {relay_state}")


def _wait_relay_decided(run: Any, name: str) -> dict[str, Any]:
    """Wait until ``name``'s direct attempt has failed (it is back on the relay with a reason)."""

    def ready(status: dict[str, Any]) -> dict[str, Any] | None:
        peer = _peer_or_none(status)
        direct = (peer or {}).get("direct") or {}
        return status if direct.get("state") == "relay" and direct.get("last_error") else None

    return _wait(run, name, ready, "a failed direct attempt")


def _received(output: str) -> tuple[int, int]:
    match = re.search(r"(\d+) packets transmitted, (\d+) received", output)
    assert match, f"unexpected ping output:\n{output}"
    return int(match.group(1)), int(match.group(2))


def _ping_all(run: Any, count: int = PING_COUNT) -> None:
    output = run.ping("a", PEER_B_ADDRESS, count=count, interval=PING_INTERVAL_S)
    assert _received(output) == (count, count), f"{output}\n{_logs(run)}"


def _forwarded(metrics: dict[str, float]) -> float:
    return metrics["traversal_relay_forwarded_bytes_total"]


def _session_series(metrics: dict[str, float], session_id: str) -> float | None:
    """The relay's forwarded-bytes sample of one session (labelled by 8 hex digits), None if gone."""
    return metrics.get(f'traversal_relay_session_forwarded_bytes{{session="{session_id[:8]}"}}')


def _host(candidate: str) -> str:
    """A status candidate's address: '192.168.1.2:4000 host' -> '192.168.1.2', '[::1]:4000 host' -> '::1'."""
    return candidate.split()[0].rsplit(":", 1)[0].strip("[]")


def _port(candidate: str) -> int:
    return int(candidate.split()[0].rsplit(":", 1)[1])


def _wan_ends(lab: Any, peer_a: dict[str, Any]) -> tuple[str, str]:
    """The addresses the WAN sees for a and b on the nominated pair's address family."""
    if ":" in _host(peer_a["direct"]["local_candidate"]):
        return lab.public_address6("a"), lab.public_address6("b")
    return lab.public_address("a"), lab.public_address("b")


def _relay_addresses(lab_module: ModuleType) -> tuple[str, ...]:
    return (*lab_module.RELAY_ADDRESSES, *lab_module.RELAY_ADDRESSES6)


def _assert_decision_logged(run: Any, name: str) -> None:
    log = run.log_text(name)
    assert re.search(r"event=path .*path=direct reason=\"validated both ways", log), log
    assert "event=relay_released" in log, log


def _assert_traffic_is_direct(run: Any, lab_module: ModuleType, ends: tuple[str, str], session_id: str) -> None:
    """During a ping burst: pings as UDP between ``ends`` on the WAN, nothing to or from the relay,
    and the relay's forwarded-bytes counter standing still."""
    before = run.metrics()
    capture = run.capture()
    try:
        output = run.ping("a", PEER_B_ADDRESS, count=PING_COUNT, interval=PING_INTERVAL_S)
    finally:
        packets = capture.stop()
    after = run.metrics()
    assert _received(output) == (PING_COUNT, PING_COUNT), f"{output}\n{_logs(run)}"
    to_relay = [p for p in packets if p.touches(_relay_addresses(lab_module))]
    assert not to_relay, f"traffic to or from the relay after the switch: {to_relay[:5]}\n{_logs(run)}"
    end_a, end_b = ends
    a_to_b = sum(p.is_udp(end_a, end_b) for p in packets)
    b_to_a = sum(p.is_udp(end_b, end_a) for p in packets)
    assert a_to_b >= PING_COUNT and b_to_a >= PING_COUNT, (a_to_b, b_to_a, packets[:10])
    assert _forwarded(after) == _forwarded(before), (before, after)
    assert _session_series(after, session_id) in (None, _session_series(before, session_id)), after


# --- direct ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("nat_a", "nat_b"), DIRECT_PAIRS, ids=[f"{a}-{b}" for a, b in DIRECT_PAIRS])
def test_pair_goes_direct(nat_a: str, nat_b: str, lab_module: ModuleType, start_overlay: Any) -> None:
    run = start_overlay(lab_module.Lab(nat_a=nat_a, nat_b=nat_b))
    run.start_peers()
    status = {name: _wait_direct(run, name) for name in ("a", "b")}
    peer_a, peer_b = _peer(status["a"]), _peer(status["b"])
    for peer in (peer_a, peer_b):
        direct = peer["direct"]
        assert direct["state"] == "direct" and direct["last_error"] is None, direct
        assert 0 <= direct["time_to_direct_s"] < DEFAULT_DIRECT_TIMEOUT_S, direct
    if "symseq" in (nat_a, nat_b) and not {"public", "fullcone"} & {nat_a, nat_b}:
        # Only a predicted candidate gets through a sequential symmetric NAT's filter here.
        nominated = peer_a["direct"]["nominated"] + " | " + peer_b["direct"]["nominated"]
        assert "predicted +" in nominated, nominated
    for name in ("a", "b"):
        _assert_decision_logged(run, name)
        assert "event=relay_closed" in run.log_text(name)
    _assert_traffic_is_direct(run, lab_module, _wan_ends(run.lab, peer_a), peer_a["session_id"])
    assert run.metrics()["traversal_relay_sessions_active"] == 0


def test_dualstack_peers_go_direct_over_ipv6(lab_module: ModuleType, start_overlay: Any) -> None:
    """Global IPv6 behind stateful firewalls (and symrand IPv4 NATs, which alone would fail):
    the host candidates over IPv6 win, and the pings cross the WAN between the hosts' addresses."""
    run = start_overlay(lab_module.Lab(nat_a="dualstack", nat_b="dualstack"))
    run.start_peers()
    status = {name: _wait_direct(run, name) for name in ("a", "b")}
    lab = run.lab
    for name, other in (("a", "b"), ("b", "a")):
        direct = _peer(status[name])["direct"]
        assert _host(direct["local_candidate"]) == lab.host_address6(name), direct
        assert _host(direct["remote_candidate"]) == lab.host_address6(other), direct
        assert direct["local_candidate"].endswith(" host"), direct
        _assert_decision_logged(run, name)
    peer_a = _peer(status["a"])
    _assert_traffic_is_direct(run, lab_module, (lab.host_address6("a"), lab.host_address6("b")), peer_a["session_id"])


def test_relay_standby_keep_stays_connected_and_idle(lab_module: ModuleType, start_overlay: Any) -> None:
    run = start_overlay(lab_module.Lab(nat_a="cone", nat_b="cone"))
    run.start_peers(["--relay-standby", "keep"])
    status = {name: _wait_direct(run, name, relay_state="connected") for name in ("a", "b")}
    for name in ("a", "b"):
        assert status[name]["relay"]["standby"] == "keep"
        _assert_decision_logged(run, name)
        assert "event=relay_closed" not in run.log_text(name)
    peer_a = _peer(status["a"])
    before = run.metrics()
    _ping_all(run)
    after = run.metrics()
    assert after["traversal_relay_clients_connected"] == 2, after
    assert _forwarded(after) == _forwarded(before), (before, after)
    assert _session_series(after, peer_a["session_id"]) in (None, _session_series(before, peer_a["session_id"]))
    for name in ("a", "b"):
        status_now = run.status(name, name)
        assert status_now["relay"]["state"] == "connected", status_now["relay"]
        assert _peer(status_now)["path"] == "direct"


def test_quic_and_lean_carriages_meet(lab_module: ModuleType, start_overlay: Any) -> None:
    """a sends DATA in QUIC datagrams (``--carriage quic``), b as lean sealed datagrams (the default):
    each side receives both, and the WAN shows which is which by the first UDP payload byte."""
    run = start_overlay(lab_module.Lab(nat_a="cone", nat_b="cone"))
    run.start_peers(extra_a=["--carriage", "quic"])
    peer_a = _peer(_wait_direct(run, "a"))
    _wait_direct(run, "b")
    capture = run.capture()
    try:
        _ping_all(run)
    finally:
        packets = capture.stop()
    end_a, end_b = _wan_ends(run.lab, peer_a)
    # First UDP payload bytes, STUN (0-3: ICE consent checks) left out.
    from_a = [p.first_byte for p in packets if p.is_udp(end_a, end_b) and p.first_byte not in (None, 0, 1, 2, 3)]
    from_b = [p.first_byte for p in packets if p.is_udp(end_b, end_a) and p.first_byte not in (None, 0, 1, 2, 3)]
    # a: QUIC only (the fixed bit 0x40 set), b: the echo replies as lean frames.
    assert len(from_a) >= PING_COUNT and all(byte & 0x40 for byte in from_a), from_a[:20]
    assert sum(byte == WIRE_VERSION for byte in from_b) >= PING_COUNT, from_b[:20]


def test_udp_port_range_bounds_the_direct_socket(lab_module: ModuleType, start_overlay: Any) -> None:
    run = start_overlay(lab_module.Lab(nat_a="cone", nat_b="cone"))
    run.start_peers(["--udp-ports", "40000-40010"])
    for name in ("a", "b"):
        direct = _peer(_wait_direct(run, name))["direct"]
        assert 40000 <= _port(direct["local_candidate"]) <= 40010, direct
    _ping_all(run, count=5)


def test_peers_behind_the_same_nat_meet_on_host_candidates(lab_module: ModuleType, start_overlay: Any) -> None:
    """The lab has one host per NAT, so this case rewires one (see :func:`_shared_nat_lab`): b runs
    on a second host on a's LAN, behind the same cone NAT, which does not hairpin. Only the host
    candidates connect, and the pings never leave the LAN."""
    run = start_overlay(_shared_nat_lab(lab_module))
    run.start_peers()
    lan = {"a": run.lab.host_address("a"), "b": run.lab.host_address("b")}
    status = {name: _wait_direct(run, name) for name in ("a", "b")}
    for name, other in (("a", "b"), ("b", "a")):
        direct = _peer(status[name])["direct"]
        assert direct["local_candidate"] == f"{lan[name]}:{_port(direct['local_candidate'])} host", direct
        assert direct["remote_candidate"] == f"{lan[other]}:{_port(direct['remote_candidate'])} host", direct
    wan = run.capture(file="wan.pcap")
    on_lan = run.capture("nat-a", "lan0", file="lan.pcap")
    try:
        _ping_all(run)
    finally:
        lan_packets = on_lan.stop()
        wan_packets = wan.stop()
    assert sum(p.is_udp(lan["a"], lan["b"]) for p in lan_packets) >= PING_COUNT, lan_packets[:10]
    assert sum(p.is_udp(lan["b"], lan["a"]) for p in lan_packets) >= PING_COUNT, lan_packets[:10]
    public = run.lab.public_address("a")
    leaked = [p for p in wan_packets if p.touches((public, *_relay_addresses(lab_module)))]
    assert not leaked, f"overlay traffic left the LAN: {leaked[:5]}"


def _shared_nat_lab(lab_module: ModuleType) -> Any:
    """A cone lab whose nat-a LAN becomes a bridge with a second host, which stands in for host-b.

    After ``up()``: nat-a's lan0 (the veth to host-a) is renamed lanp0 and enslaved, with a new
    veth lanp1, to a bridge that takes the name lan0 and the address 192.168.1.1, so the
    ruleset (which matches "lan0") is unchanged; the new host ``<prefix>s-host-b`` (a name the
    lab scheme knows, so ``lab.py down --all`` removes a crashed run's) has 192.168.1.3. Role
    "host-b" then means that namespace, and b's public address is a's. The original host-b
    behind nat-b stays, unused.
    """

    class SharedNatLab(lab_module.Lab):
        def __init__(self) -> None:
            super().__init__(nat_a="cone", nat_b="cone")
            self.second_host = f"{self.prefix}s-host-b"
            self.second_address = "192.168.1.3"
            self._shared = False

        def ns(self, role: str) -> str:
            return self.second_host if role == "host-b" and self._shared else super().ns(role)

        def host_address(self, peer: str) -> str:
            return self.second_address if peer == "b" and self._shared else super().host_address(peer)

        def public_address(self, peer: str) -> str:
            return super().public_address("a" if self._shared else peer)

        def up(self) -> Any:
            super().up()
            try:
                self._share_lan()
            except BaseException:
                self.down()
                raise
            return self

        def _share_lan(self) -> None:
            nat, host = super().ns("nat-a"), self.second_host
            gateway = self.addresses["nat-a"][1]
            commands = [
                ["ip", "netns", "add", host],
                ["ip", "-n", host, "link", "set", "lo", "up"],
                ["ip", "-n", nat, "link", "set", "lan0", "down"],
                ["ip", "-n", nat, "link", "set", "lan0", "name", "lanp0"],
                ["ip", "-n", nat, "addr", "flush", "dev", "lanp0"],
                ["ip", "-n", nat, "link", "add", "lan0", "type", "bridge"],
                ["ip", "-n", nat, "addr", "add", gateway, "dev", "lan0"],
                ["ip", "-n", nat, "link", "set", "lanp0", "master", "lan0"],
                ["ip", "link", "add", "lanp1", "netns", nat, "type", "veth", "peer", "name", "eth0", "netns", host],
                ["ip", "-n", nat, "link", "set", "lanp1", "master", "lan0"],
                *(["ip", "-n", nat, "link", "set", dev, "up"] for dev in ("lanp0", "lanp1", "lan0")),
                ["ip", "-n", host, "link", "set", "eth0", "up"],
                ["ip", "-n", host, "addr", "add", f"{self.second_address}/24", "dev", "eth0"],
                ["ip", "-n", host, "route", "add", "default", "via", gateway.split("/")[0]],
                # With br_netfilter loaded, bridged frames would cross the NAT's forward chain
                # (policy drop): keep the LAN a plain switch.
                [
                    "ip", "netns", "exec", nat, "sh", "-c",
                    "test ! -e /proc/sys/net/bridge || sysctl -qw net.bridge.bridge-nf-call-iptables=0",
                ],
            ]  # fmt: skip
            for argv in commands:
                subprocess.run(argv, check=True, capture_output=True, timeout=15)
            self._shared = True

        def down(self) -> None:
            try:
                super().down()
            finally:
                self._shared = False
                if self.second_host in lab_module.list_namespaces():
                    lab_module._kill_namespace_processes(self.second_host)
                    subprocess.run(["ip", "netns", "del", self.second_host], check=True, timeout=15)

    return SharedNatLab()


# --- relay ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("nat_a", "nat_b"), RELAY_PAIRS, ids=[f"{a}-{b}" for a, b in RELAY_PAIRS])
def test_pair_stays_on_the_relay(nat_a: str, nat_b: str, lab_module: ModuleType, start_overlay: Any) -> None:
    run = start_overlay(lab_module.Lab(nat_a=nat_a, nat_b=nat_b))
    run.start_peers(RELAY_CASE_FLAGS)
    status = {name: _wait_relay_decided(run, name) for name in ("a", "b")}
    controlling = [name for name in ("a", "b") if _peer(status[name])["role"] == "initiator"]
    assert len(controlling) == 1, status
    for name in ("a", "b"):
        peer = _peer(status[name])
        assert (peer["path"], peer["peer_path"]) == ("relay", "relay"), peer
        assert status[name]["relay"]["state"] == "connected", status[name]["relay"]
        assert not peer["relay_released"]
    leader = controlling[0]
    direct = _peer(status[leader])["direct"]
    assert direct["next_retry_in_s"] is not None and 0 < direct["next_retry_in_s"] <= DEFAULT_RETRY_S, direct
    log = run.log_text(leader)
    assert "event=direct_failed" in log, log
    assert re.search(r"event=path .*path=relay reason=", log.split("event=direct_failed", 1)[1]), log
    before = run.metrics()
    _ping_all(run, count=10)
    after = run.metrics()
    assert _forwarded(after) - _forwarded(before) >= 2 * 10 * MIN_RELAYED_FRAME_BYTES, (before, after)
    assert _peer(run.status("a", "a"))["path"] == "relay"


def test_no_direct_stays_on_the_relay_without_trying(lab_module: ModuleType, start_overlay: Any) -> None:
    run = start_overlay(lab_module.Lab(nat_a="cone", nat_b="cone"))  # a pair that would go direct
    run.start_peers(["--no-direct"])
    for name in ("a", "b"):
        # direct_skipped is logged at ESTABLISHED, where an attempt would otherwise start.
        _wait(run, name, lambda _status, n=name: "event=direct_skipped" in run.log_text(n), "direct_skipped")
    before = run.metrics()
    _ping_all(run, count=10)
    after = run.metrics()
    assert _forwarded(after) - _forwarded(before) >= 2 * 10 * MIN_RELAYED_FRAME_BYTES, (before, after)
    for name in ("a", "b"):
        status = run.status(name, name)
        peer = _peer(status)
        assert peer["path"] == "relay" and peer["direct"] is None, peer
        assert status["direct"]["enabled"] is False
        log = run.log_text(name)
        assert "event=direct_attempt" not in log and "event=candidates_sent" not in log, log
