"""Lab tests for netns-lab/lab.py: each NAT profile maps and filters as its table says.

Every test builds its own lab (prefix per lab) through ``lab_factory``, which tears it down
even on failure. Waits are bounded by deadlines inside the namespaced helper (NETTOOL).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from types import ModuleType
from typing import Any

import pytest

from tests.lab.conftest import LAB_PATH, NetTool

pytestmark = pytest.mark.timeout(60)

ALL_PROFILES = ("public", "cone", "fullcone", "symrand", "symseq", "udpblock", "double")
# Three distinct destinations: two relay addresses, two ports.
DESTS = ("203.0.113.1:3478", "203.0.113.2:3478", "203.0.113.1:3479")


def _namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _split(endpoint: str) -> tuple[str, int]:
    host, port = endpoint.rsplit(":", 1)
    return host, int(port)


def _nft_counter(lab: Any, role: str, comment: str) -> int:
    """Packets counted by the rule carrying ``comment`` in ``role``'s ruleset."""
    ruleset = json.loads(lab.run(role, "nft", "-j", "list", "ruleset").stdout)["nftables"]
    total = 0
    for item in ruleset:
        rule = item.get("rule")
        if rule and rule.get("comment") == comment:
            total += sum(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
    return total


@pytest.mark.parametrize("profile", ALL_PROFILES)
def test_hosts_reach_relay_by_icmp(lab_factory: Any, profile: str) -> None:
    lab = lab_factory(nat_a=profile, nat_b=profile)
    for peer in ("a", "b"):
        lab.run(f"host-{peer}", "ping", "-c", "1", "-W", "2", "203.0.113.1", timeout=5)
    # The WAN is a closed world: no default route anywhere on it.
    assert lab.run("wan", "ip", "route", "show", "default").stdout.strip() == ""


@pytest.mark.parametrize("profile", ALL_PROFILES)
def test_udp_mapping_per_profile(lab_factory: Any, nettool: NetTool, profile: str) -> None:
    lab = lab_factory(nat_a=profile, nat_b=profile)
    nettool.start(lab, "wan", "echo", *DESTS)
    for peer, lport in (("a", 40001), ("b", 40002)):
        if profile == "udpblock":
            # Absence of an answer is weak evidence alone; the drop counter shows why.
            result = nettool.run(lab, f"host-{peer}", "probe", "udp", lport, 0.5, DESTS[0])
            assert result["mapped"] == {DESTS[0]: None}
            assert _nft_counter(lab, f"nat-{peer}", "udp blocked") >= 1
            continue
        result = nettool.run(lab, f"host-{peer}", "probe", "udp", lport, 5.0, *DESTS)
        mapped = [result["mapped"][d] for d in DESTS]
        assert None not in mapped, f"no UDP answer through {profile}: {result}"
        addrs = {_split(m)[0] for m in mapped}
        ports = [_split(m)[1] for m in mapped]
        assert addrs == {lab.public_address(peer)}
        if profile in ("public", "cone", "fullcone", "double"):
            # Endpoint-independent mapping with the port preserved (it was free).
            assert ports == [lport] * 3
        elif profile == "symrand":
            assert len(set(ports)) == 3, f"symrand reused a port across destinations: {ports}"
        elif profile == "symseq":
            assert ports == [ports[0] + i * lab.symseq_delta for i in range(3)], ports


def test_symseq_applies_its_delta(lab_factory: Any, lab_module: ModuleType, nettool: NetTool) -> None:
    lab = lab_factory(nat_a="symseq", nat_b="cone", symseq_delta=7)
    nettool.start(lab, "wan", "echo", *DESTS)
    result = nettool.run(lab, "host-a", "probe", "udp", 40005, 5.0, *DESTS)
    ports = [_split(result["mapped"][d])[1] for d in DESTS]
    # A fresh NAT's counter starts at 0; one step per new flow.
    base = lab_module.SYMSEQ_BASE_PORT
    assert ports == [base, base + 7, base + 14]


def test_udpblock_lets_tcp_through(lab_factory: Any, nettool: NetTool) -> None:
    lab = lab_factory(nat_a="udpblock", nat_b="cone")
    nettool.start(lab, "wan", "echo", *DESTS)
    result = nettool.run(lab, "host-a", "probe", "tcp", 0, 5.0, "203.0.113.1:3478")
    mapped = result["mapped"]["203.0.113.1:3478"]
    assert mapped is not None and _split(mapped)[0] == "203.0.113.11"
    assert _nft_counter(lab, "nat-a", "udp blocked") == 0  # TCP never touched the UDP rule


def test_cone_drops_unsolicited_inbound(lab_factory: Any, nettool: NetTool) -> None:
    lab = lab_factory(nat_a="cone", nat_b="cone")
    nettool.start(lab, "wan", "wan-poke", "203.0.113.1:3478", "203.0.113.2")
    result = nettool.run(lab, "host-a", "host-listen", 40003, "203.0.113.1:3478", 5.0, 0.3)
    assert result["marker"], f"the contacted endpoint's answer did not arrive: {result}"
    assert result["unsolicited_from"] is None
    assert _nft_counter(lab, "nat-a", "unsolicited inbound") >= 1


def test_fullcone_delivers_inbound_once_mapped(lab_factory: Any, nettool: NetTool) -> None:
    lab = lab_factory(nat_a="fullcone", nat_b="cone")
    nettool.start(lab, "wan", "wan-poke", "203.0.113.1:3478", "203.0.113.2")
    result = nettool.run(lab, "host-a", "host-listen", 40004, "203.0.113.1:3478", 5.0, 2.0)
    assert result["unsolicited_from"] is not None, f"full cone did not let a stranger in: {result}"
    assert _split(result["unsolicited_from"])[0] == "203.0.113.2"
    # A port the host never used stays closed: the packet ends in the router's drop rule.
    before = _nft_counter(lab, "nat-a", "unsolicited inbound")
    send = "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('203.0.113.11', 40999))"
    lab.run("wan", sys.executable, "-c", send)
    deadline = time.monotonic() + 2.0
    while _nft_counter(lab, "nat-a", "unsolicited inbound") == before:
        assert time.monotonic() < deadline, "packet to an unmapped full-cone port was not dropped"
        time.sleep(0.02)


def test_hole_punch_between_cones(lab_factory: Any, nettool: NetTool) -> None:
    lab = lab_factory(nat_a="cone", nat_b="cone")
    argv_a = nettool.argv("punch", 40010, "203.0.113.12:40010", 5.0)
    argv_b = nettool.argv("punch", 40010, "203.0.113.11:40010", 5.0)
    a = lab.popen("host-a", argv_a, stdout=subprocess.PIPE, text=True)
    b = lab.popen("host-b", argv_b, stdout=subprocess.PIPE, text=True)
    out_a, _ = a.communicate(timeout=10)
    out_b, _ = b.communicate(timeout=10)
    assert json.loads(out_a)["received_from"] == "203.0.113.12:40010"
    assert json.loads(out_b)["received_from"] == "203.0.113.11:40010"


def test_status_matches_plan(lab_factory: Any) -> None:
    lab = lab_factory(nat_a="double", nat_b="public")
    assert lab.roles == ("wan", "nat-a", "host-a", "nat-b", "host-b", "cgn-a")
    status = lab.status()
    assert status["roles"]["cgn-a"]["addresses"] == {"wan0": ["203.0.113.11/24"], "lan0": ["100.64.1.1/24"]}
    assert status["roles"]["host-a"]["addresses"] == {"eth0": ["192.168.1.2/24"]}
    assert status["roles"]["host-b"]["addresses"] == {"eth0": ["203.0.113.22/24"]}
    assert status["roles"]["wan"]["addresses"] == {"br0": ["203.0.113.1/24", "203.0.113.2/24"]}
    assert lab.public_address("a") == "203.0.113.11"
    assert lab.public_address("b") == "203.0.113.22"


def test_down_kills_processes_and_removes_namespaces(lab_factory: Any) -> None:
    lab = lab_factory(nat_a="cone", nat_b="symrand")
    sleeper = lab.popen("host-a", ["sleep", "60"])
    assert set(lab.namespaces) <= set(_namespaces())
    lab.down()
    assert sleeper.poll() is not None
    assert not [ns for ns in _namespaces() if ns.startswith(lab.prefix + "-")]
    lab.down()  # idempotent


def test_down_all_spares_foreign_namespaces(lab_factory: Any, lab_module: ModuleType) -> None:
    lab = lab_factory(nat_a="cone", nat_b="cone")
    decoy = f"{lab.prefix}-notarole"  # shares the prefix but is not a lab role
    subprocess.run(["ip", "netns", "add", decoy], check=True)
    try:
        deleted = lab_module.down_all(lab.prefix)
        assert sorted(deleted) == sorted(lab.namespaces)
        assert decoy in _namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", decoy], check=False)


def test_naming_scheme(lab_module: ModuleType) -> None:
    assert lab_module.is_lab_namespace("tv1a2b-wan")
    assert lab_module.is_lab_namespace("tv1a2b-cgn-b")
    for name in ("tv1a2b-notarole", "tv-wan", "docker-wan", "tv1a2b-wan-x", "TV1a2b-wan"):
        assert not lab_module.is_lab_namespace(name), name


def test_bad_arguments_are_rejected(lab_module: ModuleType) -> None:
    with pytest.raises(lab_module.LabError, match="unknown NAT profile"):
        lab_module.Lab(nat_a="strict")
    with pytest.raises(lab_module.LabError, match="bad prefix"):
        lab_module.Lab(prefix="lab1")
    with pytest.raises(lab_module.LabError, match="bad delay"):
        lab_module.Lab(delay_a_ms=-1)


def test_cli_up_status_down(lab_module: ModuleType, lab_prerequisites: None) -> None:
    prefix = "tvcli" + lab_module.secrets.token_hex(2)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(LAB_PATH), *args], capture_output=True, text=True, timeout=30)

    try:
        up = cli("up", "--nat-a", "symseq", "--nat-b", "double", "--prefix", prefix)
        assert up.returncode == 0, up.stderr
        assert prefix in up.stdout and "203.0.113.11" in up.stdout
        status = cli("status", "--prefix", prefix, "--json")
        assert status.returncode == 0, status.stderr
        [state] = json.loads(status.stdout)
        assert state["profiles"] == {"a": "symseq", "b": "double"}
        assert all(role["exists"] for role in state["roles"].values())
        again = cli("up", "--prefix", prefix)
        assert again.returncode == 1 and again.stderr.count("\n") == 1 and "exist" in again.stderr
        down = cli("down", "--prefix", prefix)
        assert down.returncode == 0, down.stderr
        assert not [ns for ns in _namespaces() if ns.startswith(prefix + "-")]
        assert not (lab_module.STATE_DIR / f"{prefix}.json").exists()
    finally:
        lab_module.down_all(prefix)
