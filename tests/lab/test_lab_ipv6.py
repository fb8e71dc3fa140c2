"""Lab tests for the ``dualstack`` profile (netns-lab/lab.py): IPv4 behind a symrand NAT,
IPv6 routed to global host addresses through a home router's stateful firewall.

The issue it reproduces: two such peers cannot punch through their IPv4 NATs by port
prediction, but must go direct over IPv6, where each side's outbound packet opens the
firewall for the other's. Waits are bounded by deadlines inside NETTOOL6.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from types import ModuleType
from typing import Any

import pytest

from tests.lab.conftest import NetTool

pytestmark = pytest.mark.timeout(60)

RELAY6, OTHER_RELAY6 = "2001:db8::1", "2001:db8::2"
# Three distinct IPv6 destinations: two relay addresses, two ports.
DESTS6 = (f"[{RELAY6}]:3478", f"[{OTHER_RELAY6}]:3478", f"[{RELAY6}]:3479")
DESTS4 = ("203.0.113.1:3478", "203.0.113.2:3478", "203.0.113.1:3479")
#: Scheduling slack allowed above an ideal RTT (as in test_delay.py).
RTT_SLACK_MS = 40.0

# The IPv6 counterpart of conftest's NETTOOL, run as `python -c NETTOOL6 mode args...`.
# Endpoints are "[address]:port", in arguments and in results alike.
NETTOOL6 = r"""
import json, selectors, socket, sys, time

def addr(text):
    host, port = text.rsplit(":", 1)
    return host.strip("[]"), int(port)

def show(src):
    return f"[{src[0]}]:{src[1]}"

def udp(bind=("::", 0)):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.bind(bind)
    return s

def echo(binds):
    # Answer every datagram with the source we saw; one socket per address, so the
    # answer comes from the address that was asked.
    sel = selectors.DefaultSelector()
    for bind in binds:
        sel.register(udp(addr(bind)), selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            data, src = key.fileobj.recvfrom(2048)
            key.fileobj.sendto(show(src).encode(), src)

def probe(lport, timeout, dests):
    s = udp(("::", lport))
    s.settimeout(0.2)
    seen = {}
    for dest in dests:
        deadline, seen[dest] = time.monotonic() + timeout, None
        while seen[dest] is None and time.monotonic() < deadline:
            s.sendto(b"probe", addr(dest))
            try:
                data, src = s.recvfrom(2048)
            except socket.timeout:
                continue
            if src[:2] == addr(dest):
                seen[dest] = data.decode()
    print(json.dumps({"local_port": s.getsockname()[1], "seen_as": seen}))

def punch(lport, peer, timeout):
    # As NETTOOL's punch: send until the peer is heard, then a few more for its sake.
    s = udp(("::", lport))
    s.settimeout(0.05)
    deadline, got, extra = time.monotonic() + timeout, None, 0
    while time.monotonic() < deadline and extra < 5:
        s.sendto(b"punch", addr(peer))
        extra += got is not None
        try:
            data, src = s.recvfrom(2048)
        except socket.timeout:
            continue
        if got is None and src[:2] == addr(peer):
            got = show(src)
    print(json.dumps({"received_from": got}))

def poke(bind, other_ip):
    # On each "hello": "unsolicited" from an address the host never contacted, then
    # "marker" from the contacted one, which the firewall lets in.
    s, other = udp(addr(bind)), udp((other_ip, 0))
    print("ready", flush=True)
    while True:
        data, src = s.recvfrom(2048)
        if data == b"hello":
            other.sendto(b"unsolicited", src)
            s.sendto(b"marker", src)

def listen(lport, relay, timeout, grace):
    # Keep a flow to `relay` open; end once "unsolicited" arrived, or `grace` seconds
    # after the marker (sent after it, over the same path) if it did not.
    s = udp(("::", lport))
    s.settimeout(0.1)
    deadline, marker_at = time.monotonic() + timeout, None
    result = {"unsolicited_from": None, "marker": False}
    while time.monotonic() < deadline:
        if result["unsolicited_from"] or (marker_at and time.monotonic() - marker_at > grace):
            break
        if not result["marker"]:
            s.sendto(b"hello", addr(relay))
        try:
            data, src = s.recvfrom(2048)
        except socket.timeout:
            continue
        if data == b"unsolicited":
            result["unsolicited_from"] = show(src)
        elif data == b"marker" and not result["marker"]:
            result["marker"], marker_at = True, time.monotonic()
    print(json.dumps(result))

def refused(dest, timeout):
    # A connected UDP socket learns of an ICMPv6 port unreachable as ECONNREFUSED.
    s = udp()
    s.connect(addr(dest))
    s.settimeout(timeout)
    s.send(b"anyone?")
    try:
        s.recv(2048)
        outcome = "answered"
    except ConnectionRefusedError:
        outcome = "refused"
    except socket.timeout:
        outcome = "silence"
    print(json.dumps({"outcome": outcome}))

def send(dest):
    print(json.dumps({"sent": udp().sendto(b"unsolicited", addr(dest))}))

mode, args = sys.argv[1], sys.argv[2:]
if mode == "echo":
    echo(args)
elif mode == "probe":
    probe(int(args[0]), float(args[1]), args[2:])
elif mode == "punch":
    punch(int(args[0]), args[1], float(args[2]))
elif mode == "poke":
    poke(args[0], args[1])
elif mode == "listen":
    listen(int(args[0]), args[1], float(args[2]), float(args[3]))
elif mode == "refused":
    refused(args[0], float(args[1]))
elif mode == "send":
    send(args[0])
else:
    sys.exit(f"unknown mode {mode}")
"""


class NetTool6(NetTool):
    """conftest's NetTool (start a server mode, run a client mode) over NETTOOL6."""

    def argv(self, mode: str, *args: object) -> list[str]:
        return [sys.executable, "-c", NETTOOL6, mode, *map(str, args)]


@pytest.fixture
def nettool6() -> NetTool6:
    return NetTool6()


@pytest.fixture
def dualstack(lab_factory: Any) -> Any:
    return lab_factory(nat_a="dualstack", nat_b="dualstack")


def _split(endpoint: str) -> tuple[str, int]:
    host, port = endpoint.rsplit(":", 1)
    return host.strip("[]"), int(port)


def _ip6_drops(lab: Any, peer: str) -> int:
    """Packets the IPv6 firewall of peer's router dropped as unsolicited inbound."""
    table = json.loads(lab.run(f"nat-{peer}", "nft", "-j", "list", "table", "ip6", "lab").stdout)["nftables"]
    rules = [item["rule"] for item in table if item.get("rule", {}).get("comment") == "unsolicited inbound"]
    return sum(e["counter"]["packets"] for rule in rules for e in rule["expr"] if "counter" in e)


def _ping6_ok(lab: Any, role: str, dest: str) -> bool:
    return lab.run(role, "ping", "-6", "-n", "-c", "1", "-W", "1", dest, check=False, timeout=5).returncode == 0


def _median_rtt_ms(lab: Any, role: str, dest: str, count: int = 5) -> float:
    out = lab.run(role, "ping", "-n", "-c", str(count), "-i", "0.2", "-W", "2", dest, timeout=20).stdout
    rtts = [float(word[5:]) for word in out.split() if word.startswith("time=")]
    assert len(rtts) == count, out
    return statistics.median(rtts)


def test_hosts_reach_the_wan_over_both_families(dualstack: Any, lab_module: ModuleType) -> None:
    lab = dualstack
    assert lab_module.RELAY_ADDRESSES6 == (RELAY6, OTHER_RELAY6)
    for peer, i in (("a", 1), ("b", 2)):
        assert lab.host_address6(peer) == lab.public_address6(peer) == f"2001:db8:{i}::2"
        for dest in (RELAY6, OTHER_RELAY6, "203.0.113.1"):
            lab.run(f"host-{peer}", "ping", "-n", "-c", "1", "-W", "2", dest, timeout=5)
    # Still a closed world: IPv6 adds routes to the LAN prefixes, no default route.
    for family in ("-4", "-6"):
        assert lab.run("wan", "ip", family, "route", "show", "default").stdout.strip() == ""
    # Only the routers forward.
    for role, forwarding in (("wan", "0"), ("host-a", "0"), ("nat-a", "1")):
        assert lab.run(role, "sysctl", "-n", "net.ipv6.conf.all.forwarding").stdout.strip() == forwarding
    state = lab.status()
    assert state["public6"] == {"a": "2001:db8:1::2", "b": "2001:db8:2::2"}
    assert state["relay6"] == [RELAY6, OTHER_RELAY6]


def test_ipv6_source_is_the_hosts_global_address(dualstack: Any, nettool6: NetTool6) -> None:
    lab = dualstack
    nettool6.start(lab, "wan", "echo", *DESTS6)
    for peer, lport in (("a", 40001), ("b", 40002)):
        result = nettool6.run(lab, f"host-{peer}", "probe", lport, 5.0, *DESTS6)
        # No NAT66: every destination sees the host's own address and port.
        assert result["seen_as"] == dict.fromkeys(DESTS6, f"[{lab.host_address6(peer)}]:{lport}"), result


def test_ipv6_firewall_drops_unsolicited_inbound(dualstack: Any, nettool6: NetTool6) -> None:
    lab = dualstack
    nettool6.start(lab, "wan", "poke", f"[{RELAY6}]:3478", OTHER_RELAY6)
    result = nettool6.run(lab, "host-a", "listen", 40003, f"[{RELAY6}]:3478", 5.0, 0.3)
    assert result["marker"], f"the contacted endpoint's answer did not arrive: {result}"
    assert result["unsolicited_from"] is None, result
    drops = _ip6_drops(lab, "a")
    assert drops >= 1
    # A port the host never used, and a ping: both new inbound, both dropped.
    nettool6.run(lab, "wan", "send", f"[{lab.host_address6('a')}]:40999")
    assert not _ping6_ok(lab, "wan", lab.host_address6("a"))
    assert _ip6_drops(lab, "a") >= drops + 2
    # The router itself still answers pings, as over IPv4.
    assert _ping6_ok(lab, "wan", "2001:db8::11")


def test_ipv6_firewall_lets_icmp_errors_about_a_flow_in(dualstack: Any, nettool6: NetTool6) -> None:
    # Nothing listens on port 9: the WAN's port unreachable is "related" to our flow.
    result = nettool6.run(dualstack, "host-a", "refused", f"[{RELAY6}]:9", 2.0)
    assert result == {"outcome": "refused"}


def test_ipv6_hole_punch_goes_direct(dualstack: Any, nettool6: NetTool6) -> None:
    lab = dualstack
    a_end, b_end = f"[{lab.host_address6('a')}]:40010", f"[{lab.host_address6('b')}]:40020"
    a = lab.popen("host-a", nettool6.argv("punch", 40010, b_end, 5.0), stdout=subprocess.PIPE, text=True)
    b = lab.popen("host-b", nettool6.argv("punch", 40020, a_end, 5.0), stdout=subprocess.PIPE, text=True)
    out_a, _ = a.communicate(timeout=10)
    out_b, _ = b.communicate(timeout=10)
    assert json.loads(out_a)["received_from"] == b_end
    assert json.loads(out_b)["received_from"] == a_end


def test_ipv4_behaves_like_symrand(dualstack: Any, lab_module: ModuleType, nettool: NetTool) -> None:
    lab = dualstack
    assert lab_module.ruleset_dualstack().startswith(lab_module.ruleset_symrand())
    nettool.start(lab, "wan", "echo", *DESTS4)
    for peer, lport in (("a", 40001), ("b", 40002)):
        result = nettool.run(lab, f"host-{peer}", "probe", "udp", lport, 5.0, *DESTS4)
        mapped = [result["mapped"][d] for d in DESTS4]
        assert None not in mapped, result
        assert {_split(m)[0] for m in mapped} == {lab.public_address(peer)}
        ports = [_split(m)[1] for m in mapped]
        assert len(set(ports)) == 3, f"dualstack reused an IPv4 port across destinations: {ports}"


def test_ipv6_crosses_the_delay_forwarder(lab_factory: Any) -> None:
    lab = lab_factory(nat_a="dualstack", nat_b="dualstack", delay_a_ms=5, relay_delay_a_ms=30)
    # The IPv6 relay addresses take the relay delay; router b (the direct path) the peer delay.
    for dest in (RELAY6, OTHER_RELAY6):
        to_relay = _median_rtt_ms(lab, "host-a", dest)
        assert 2 * 30 <= to_relay < 2 * 30 + RTT_SLACK_MS, (dest, to_relay)
    direct = _median_rtt_ms(lab, "host-a", "2001:db8::12")
    assert 2 * 5 <= direct < 2 * 5 + RTT_SLACK_MS, direct


def test_only_dualstack_peers_get_ipv6(lab_factory: Any, lab_module: ModuleType) -> None:
    assert lab_module.Lab(nat_a="symrand", nat_b="cone").addresses6 == {}
    lab = lab_factory(nat_a="dualstack", nat_b="cone")
    assert lab.host_address6("a") == "2001:db8:1::2"
    with pytest.raises(lab_module.LabError, match="no IPv6"):
        lab.host_address6("b")
    assert _ping6_ok(lab, "host-a", RELAY6)
    for role in ("host-b", "nat-b"):
        assert lab.run(role, "ip", "-6", "addr", "show", "scope", "global").stdout.strip() == ""
    assert lab.run("nat-b", "nft", "list", "tables").stdout.split() == ["table", "ip", "lab"]
    assert lab.status()["public6"] == {"a": "2001:db8:1::2"}
