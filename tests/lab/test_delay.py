"""Lab tests for the link delay (netns-lab/delay.py, spliced in by ``Lab(delay_a_ms=...)``).

The delay is one way, each direction, on a peer's WAN link, so a round trip through one
delayed link grows by twice the delay. Traffic to or from the relay addresses can have a
delay of its own (``relay_delay_a_ms``), so the relay path can cost more than the direct
one, as in the seed's UK -> Frankfurt -> Belgium. RTT bounds are generous upwards: the
forwarder is a Python process and test machines are busy.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import socket
import statistics
import struct
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.lab.conftest import LAB_PATH, REPO, NetTool

pytestmark = pytest.mark.timeout(60)

DELAY_PATH = REPO / "netns-lab" / "delay.py"
RELAY = "203.0.113.1"
#: Scheduling slack allowed above the ideal RTT.
RTT_SLACK_MS = 40.0

# Echo every UDP datagram back to its sender (wan side of the burst test).
UDP_ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)  # SO_RCVBUFFORCE: a burst must not overflow us
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    data, src = s.recvfrom(2048)
    s.sendto(data, src)
"""

# Send a numbered burst as fast as possible, then collect the echoes (bounded wait).
UDP_BURST = r"""
import json, socket, struct, sys, time
dest, count = (sys.argv[1], int(sys.argv[2])), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)
for seq in range(count):
    s.sendto(struct.pack("!I", seq) + b"x" * 508, dest)
s.settimeout(0.2)
seen, deadline = [], time.monotonic() + 5.0
while len(seen) < count and time.monotonic() < deadline:
    try:
        seen.append(struct.unpack("!I", s.recv(2048)[:4])[0])
    except socket.timeout:
        pass
print(json.dumps(seen))
"""

# Receive one TCP stream to its end and report its length and digest.
TCP_SINK = r"""
import hashlib, json, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
print("ready", flush=True)
conn, _ = s.accept()
digest, size = hashlib.sha256(), 0
while data := conn.recv(1 << 20):
    digest.update(data)
    size += len(data)
print(json.dumps({"size": size, "sha256": digest.hexdigest()}), flush=True)
"""

# A relay in miniature (wan side): "a" and "b" register their mapped addresses, then every
# other datagram from one is forwarded to the other.
UDP_RELAY = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
peers = {}
while True:
    data, src = s.recvfrom(2048)
    if data in (b"a", b"b"):
        peers[data] = src
        s.sendto(b"ok", src)
    elif (other := peers.get(b"b" if src == peers.get(b"a") else b"a")) is not None:
        s.sendto(data, other)
"""

# Register with UDP_RELAY as argv[3] (bounded), then: "b" echoes every datagram back through
# the relay; "a" sends argv[4] numbered pings through it and prints their RTTs in ms.
UDP_RELAY_CLIENT = r"""
import json, socket, struct, sys, time
relay, me = (sys.argv[1], int(sys.argv[2])), sys.argv[3].encode()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.5)
deadline = time.monotonic() + 5.0
while time.monotonic() < deadline:
    s.sendto(me, relay)
    try:
        if s.recv(2048) == b"ok":
            break
    except socket.timeout:
        pass
else:
    sys.exit("no answer from the relay")
if me == b"b":
    print("ready", flush=True)
    s.settimeout(None)
    while True:
        s.sendto(s.recv(2048), relay)
rtts = []
for seq in range(int(sys.argv[4])):
    sent = time.monotonic()
    s.sendto(struct.pack("!I", seq), relay)
    try:
        while struct.unpack("!I", s.recv(2048)[:4])[0] != seq:
            pass
    except socket.timeout:
        continue
    rtts.append((time.monotonic() - sent) * 1000)
    time.sleep(0.1)
print(json.dumps(rtts))
"""

TCP_SOURCE = r"""
import hashlib, json, socket, sys, time
data = bytes(range(256)) * (int(sys.argv[3]) // 256)
start = time.monotonic()
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20) as c:
    c.sendall(data)
print(json.dumps({"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "s": time.monotonic() - start}))
"""


@pytest.fixture(scope="module")
def delay_module() -> ModuleType:
    """netns-lab/delay.py as a module (its directory name is not importable)."""
    spec = importlib.util.spec_from_file_location("traversal_netns_delay", DELAY_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _median_rtt_ms(lab: Any, role: str, dest: str, count: int = 5) -> float:
    """Median of ``count`` pings: the first one also waits out ARP through the delay."""
    out = lab.run(role, "ping", "-n", "-c", str(count), "-i", "0.2", "-W", "2", dest, timeout=20).stdout
    rtts = [float(word[5:]) for word in out.split() if word.startswith("time=")]
    assert len(rtts) == count, out
    return statistics.median(rtts)


def _ethernet(ethertype: int, payload: bytes) -> bytes:
    return b"\x02" * 6 + b"\x04" * 6 + struct.pack("!H", ethertype) + payload


def _ipv4(src: str, dst: str) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 17, 0, socket.inet_aton(src), socket.inet_aton(dst))
    return _ethernet(0x0800, header + b"\x00" * 8)


def _ipv6(src: str, dst: str) -> bytes:
    addresses = socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
    return _ethernet(0x86DD, struct.pack("!IHBB", 6 << 28, 8, 17, 64) + addresses + b"\x00" * 8)


def _arp_request(sender: str, target: str) -> bytes:
    body = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
    body += b"\x04" * 6 + socket.inet_aton(sender) + b"\x00" * 6 + socket.inet_aton(target)
    return _ethernet(0x0806, body)


def _start(lab: Any, role: str, script: str, *args: object) -> subprocess.Popen[str]:
    proc = lab.popen(role, [sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def _wait_exit(proc: subprocess.Popen[Any], timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"forwarder {proc.pid} still running after {timeout} s")


# --- the queue, without I/O ------------------------------------------------------------


def test_delay_line_releases_in_order_after_the_delay(delay_module: ModuleType) -> None:
    line = delay_module.DelayLine(0.025)
    for i in range(3):
        assert line.offer(bytes([i]), now=10.0 + i * 0.001)
    assert line.next_release() == pytest.approx(10.025)
    assert line.pop_due(10.0249) == []
    assert line.pop_due(10.026) == [b"\x00", b"\x01"]
    assert line.pop_due(11.0) == [b"\x02"]
    assert line.next_release() is None and line.queued_bytes == 0


def test_delay_line_drops_and_counts_when_full(delay_module: ModuleType) -> None:
    line = delay_module.DelayLine(1.0, max_frames=2, max_bytes=10)
    assert line.offer(b"1234", 0.0) and line.offer(b"5678", 0.0)
    assert not line.offer(b"9", 0.0)  # frame limit
    line.pop_due(1.0)
    assert line.offer(b"12345678", 2.0)
    assert not line.offer(b"123", 2.0)  # byte limit
    assert (line.accepted, line.dropped, len(line)) == (3, 2, 1)


def test_far_end_is_the_destination_going_out_and_the_source_coming_in(delay_module: ModuleType) -> None:
    far_end = delay_module.far_end_address
    relay = delay_module.pack_address(RELAY)
    out_v4, in_v4 = _ipv4("203.0.113.11", RELAY), _ipv4(RELAY, "203.0.113.11")
    assert far_end(out_v4, from_wan=False) == relay
    assert far_end(in_v4, from_wan=True) == relay
    # The peer's own address is never the far end.
    assert far_end(out_v4, from_wan=True) == far_end(in_v4, from_wan=False) == socket.inet_aton("203.0.113.11")
    # Frames read by the forwarder carry a virtio_net_hdr first.
    vnet = b"\x00" * delay_module.VNET_HDR_LEN
    assert far_end(vnet + out_v4, from_wan=False, offset=delay_module.VNET_HDR_LEN) == relay
    v6 = delay_module.pack_address("2001:db8::1")
    assert far_end(_ipv6("2001:db8::b", "2001:db8::1"), from_wan=False) == v6
    assert far_end(_ipv6("2001:db8::1", "2001:db8::b"), from_wan=True) == v6
    assert far_end(_ipv6("2001:db8::1", "2001:db8::b"), from_wan=False) != v6


def test_arp_and_garbage_have_no_far_end(delay_module: ModuleType) -> None:
    far_end = delay_module.far_end_address
    v4, v6 = _ipv4("203.0.113.11", RELAY), _ipv6("2001:db8::b", "2001:db8::1")
    unparseable = [
        _arp_request("203.0.113.11", RELAY),  # ARP names the relay, but it is not IP
        b"",
        b"\x00" * 13,
        v4[:33],  # IPv4 header cut short
        v6[:53],  # IPv6 header cut short
        v4[:14] + b"\x65" + v4[15:],  # says IPv4, version nibble 6
        v6[:14] + b"\x45" + v6[15:],  # says IPv6, version nibble 4
        _ethernet(0x8100, v4[12:]),  # VLAN tagged: not in the lab
        bytes(range(256)),
    ]
    for frame in unparseable:
        for from_wan in (False, True):
            assert far_end(frame, from_wan=from_wan) is None, frame


def test_relay_addresses_must_be_ip_addresses(delay_module: ModuleType) -> None:
    assert delay_module.pack_address("2001:db8::1") == socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    with pytest.raises(delay_module.DelayError, match="bad relay address"):
        delay_module.pack_address("relay.example")


def test_classified_line_keeps_order_per_class_and_releases_the_earliest_first(delay_module: ModuleType) -> None:
    line = delay_module.ClassifiedDelayLine(0.007, 0.020)
    assert line.offer(b"r0", 10.000, relay=True)
    assert line.offer(b"p0", 10.001, relay=False)
    assert line.offer(b"r1", 10.002, relay=True)
    assert line.offer(b"p1", 10.015, relay=False)
    assert (len(line), line.queued_bytes) == (4, 8)
    assert line.next_release() == pytest.approx(10.008)
    assert line.pop_due(10.0085) == [b"p0"]
    # Due at 10.020 (r0), 10.022 (p1), 10.022 (r1): by release time, peer first on a tie.
    assert line.pop_due(10.030) == [b"r0", b"p1", b"r1"]
    assert line.next_release() is None and line.queued_bytes == 0
    assert (line.peer.accepted, line.relay.accepted, line.dropped) == (2, 2, 0)


def test_classified_line_limits_count_both_classes(delay_module: ModuleType) -> None:
    line = delay_module.ClassifiedDelayLine(1.0, 2.0, max_frames=2, max_bytes=10)
    assert line.offer(b"1234", 0.0, relay=True) and line.offer(b"5678", 0.0, relay=False)
    assert not line.offer(b"9", 0.0, relay=True)  # frame limit, across both FIFOs
    assert line.pop_due(1.0) == [b"5678"]
    assert line.offer(b"123456", 1.0, relay=False)
    assert not line.offer(b"1", 1.0, relay=False)  # byte limit, across both FIFOs
    assert (line.dropped, len(line), line.queued_bytes) == (2, 2, 10)


# --- through a lab -----------------------------------------------------------------------


def test_delay_adds_twice_the_delay_to_the_rtt(lab_factory: Any) -> None:
    lab = lab_factory(nat_a="cone", nat_b="cone", delay_a_ms=25)
    assert lab.roles == ("wan", "nat-a", "host-a", "nat-b", "host-b", "dly-a")
    delayed = _median_rtt_ms(lab, "host-a", RELAY)
    assert 50.0 <= delayed < 50.0 + RTT_SLACK_MS, delayed
    undelayed = _median_rtt_ms(lab, "host-b", RELAY)
    assert undelayed < 10.0, undelayed
    # P-dly-X is a wire: no addresses, no IPv6 of its own, and the forwarder is running.
    links = json.loads(lab.run("dly-a", "ip", "-j", "addr", "show").stdout)
    assert {link["ifname"]: link.get("addr_info", []) for link in links if link["ifname"] != "lo"} == {
        "lan0": [],
        "wan0": [],
    }
    for dev in ("lan0", "wan0"):
        assert lab.run("dly-a", "sysctl", "-n", f"net.ipv6.conf.{dev}.disable_ipv6").stdout.strip() == "1"
    status = lab.status()
    assert status["delays_ms"] == {"a": 25, "b": 0}
    assert status["relay_delays_ms"] == {"a": 25, "b": 0}  # the peer delay unless given
    assert status["delay_forwarder_running"] == {"a": True}


def test_relay_delay_makes_the_relay_path_the_longer_one(lab_factory: Any) -> None:
    # The seed's geography: UK <-> Belgium ~30 ms direct, ~80 ms through Frankfurt.
    lab = lab_factory(nat_a="cone", nat_b="cone", delay_a_ms=7, delay_b_ms=8, relay_delay_a_ms=20, relay_delay_b_ms=20)
    # Resolving ARP must cross the forwarder: ARP frames take the peer delay.
    lab.run("nat-a", "ip", "neigh", "flush", "dev", "wan0")
    to_relay = _median_rtt_ms(lab, "host-a", RELAY)
    assert 2 * 20 <= to_relay < 2 * 20 + RTT_SLACK_MS, to_relay
    to_other_relay_address = _median_rtt_ms(lab, "host-a", "203.0.113.2")
    assert 2 * 20 <= to_other_relay_address < 2 * 20 + RTT_SLACK_MS, to_other_relay_address
    direct = _median_rtt_ms(lab, "host-a", lab.public_address("b"))
    assert 2 * (7 + 8) <= direct < 2 * (7 + 8) + RTT_SLACK_MS, direct
    neighbours = json.loads(lab.run("nat-a", "ip", "-j", "neigh", "show", "dev", "wan0").stdout)
    resolved = {n["dst"] for n in neighbours if n.get("lladdr") and "FAILED" not in n.get("state", [])}
    assert {RELAY, "203.0.113.2", lab.public_address("b")} <= resolved, neighbours
    # host-a -> relay -> host-b and back crosses both relay delays, each way.
    _start(lab, "wan", UDP_RELAY, RELAY, 5007)
    _start(lab, "host-b", UDP_RELAY_CLIENT, RELAY, 5007, "b")
    out = lab.run("host-a", sys.executable, "-c", UDP_RELAY_CLIENT, RELAY, "5007", "a", "7", timeout=15).stdout
    relayed = statistics.median(json.loads(out))
    assert 2 * (20 + 20) <= relayed < 2 * (20 + 20) + RTT_SLACK_MS, relayed
    status = lab.status()
    assert status["delays_ms"] == {"a": 7, "b": 8}
    assert status["relay_delays_ms"] == {"a": 20, "b": 20}
    assert status["delay_forwarder_running"] == {"a": True, "b": True}


def test_either_kind_of_delay_works_alone(lab_factory: Any) -> None:
    # Peer a: only a relay delay (it still needs the forwarder). Peer b: only a peer delay.
    lab = lab_factory(nat_a="cone", nat_b="cone", relay_delay_a_ms=20, delay_b_ms=25, relay_delay_b_ms=0)
    assert lab.roles == ("wan", "nat-a", "host-a", "nat-b", "host-b", "dly-a", "dly-b")
    to_relay_a = _median_rtt_ms(lab, "host-a", RELAY)
    assert 2 * 20 <= to_relay_a < 2 * 20 + RTT_SLACK_MS, to_relay_a
    to_relay_b = _median_rtt_ms(lab, "host-b", RELAY)
    assert to_relay_b < 10.0, to_relay_b
    direct = _median_rtt_ms(lab, "host-a", lab.public_address("b"))
    assert 2 * 25 <= direct < 2 * 25 + RTT_SLACK_MS, direct


def test_delays_of_both_peers_add_up(lab_factory: Any) -> None:
    lab = lab_factory(nat_a="cone", nat_b="cone", delay_a_ms=15, delay_b_ms=10)
    # host-a -> nat-b's public address crosses both delayed links, each way.
    rtt = _median_rtt_ms(lab, "host-a", lab.public_address("b"))
    assert 2 * (15 + 10) <= rtt < 2 * (15 + 10) + RTT_SLACK_MS, rtt


def test_udp_burst_arrives_complete_and_in_order(lab_factory: Any) -> None:
    lab = lab_factory(nat_a="cone", nat_b="cone", delay_a_ms=20)
    _start(lab, "wan", UDP_ECHO, RELAY, 5005)
    # Resolve ARP first: while nat-a waits (a delayed round trip) for the relay's MAC, the
    # kernel queues only a few packets per neighbour, so the burst would test ARP, not us.
    lab.run("host-a", "ping", "-c", "1", "-W", "2", RELAY, timeout=5)
    # Out through the forwarder, echoed, back through it: both directions at once.
    seen = json.loads(lab.run("host-a", sys.executable, "-c", UDP_BURST, RELAY, "5005", "200", timeout=15).stdout)
    assert seen == list(range(200))


def test_tcp_works_through_the_delay(lab_factory: Any, nettool: NetTool) -> None:
    lab = lab_factory(nat_a="cone", nat_b="cone", delay_a_ms=20)
    nettool.start(lab, "wan", "echo", f"{RELAY}:3478")
    result = nettool.run(lab, "host-a", "probe", "tcp", 0, 5.0, f"{RELAY}:3478")
    assert result["mapped"][f"{RELAY}:3478"].startswith(lab.public_address("a") + ":")
    # A bulk transfer exercises full-size and GSO frames (and their offloaded checksums).
    sink = _start(lab, "wan", TCP_SINK, RELAY, 5006)
    sent = json.loads(lab.run("host-a", sys.executable, "-c", TCP_SOURCE, RELAY, "5006", "4000000", timeout=30).stdout)
    out, _ = sink.communicate(timeout=10)
    received = json.loads(out)
    assert received == {"size": sent["size"], "sha256": sent["sha256"]}


def test_forwarder_stops_on_sigterm_and_when_its_namespace_goes(lab_factory: Any) -> None:
    lab = lab_factory(nat_a="cone", nat_b="cone", delay_a_ms=10, delay_b_ms=10)
    lab.forwarders["a"].send_signal(signal.SIGTERM)
    assert _wait_exit(lab.forwarders["a"], 5.0) == 0
    # `ip netns del` does not destroy a namespace a process lives in: the forwarder
    # notices its name is gone (checked once a second) and exits, freeing it.
    subprocess.run(["ip", "netns", "del", lab.ns("dly-b")], check=True)
    assert _wait_exit(lab.forwarders["b"], 5.0) == 0


def test_forwarder_stops_when_its_link_goes(lab_factory: Any) -> None:
    lab = lab_factory(nat_a="cone", nat_b="cone", delay_a_ms=10)
    # Deleting nat-a destroys the veth pair whose end is dly-a's lan0.
    subprocess.run(["ip", "netns", "del", lab.ns("nat-a")], check=True)
    assert _wait_exit(lab.forwarders["a"], 5.0) == 0


def test_down_leaves_no_namespace_or_forwarder(lab_factory: Any) -> None:
    lab = lab_factory(nat_a="double", nat_b="public", delay_a_ms=10, delay_b_ms=10)
    pids = [proc.pid for proc in lab.forwarders.values()]
    assert len(pids) == 2 and all(Path(f"/proc/{pid}").exists() for pid in pids)
    lab.down()
    assert not [ns for ns in _namespaces() if ns.startswith(lab.prefix + "-")]
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]


def test_bad_delays_are_rejected(lab_module: ModuleType) -> None:
    for bad in (-1, 2.5, lab_module.MAX_DELAY_MS + 1):
        with pytest.raises(lab_module.LabError, match="bad delay"):
            lab_module.Lab(delay_b_ms=bad)
        with pytest.raises(lab_module.LabError, match="bad relay delay"):
            lab_module.Lab(relay_delay_a_ms=bad)


def test_cli_up_with_delays(lab_module: ModuleType, lab_prerequisites: None) -> None:
    prefix = "tvdly" + lab_module.secrets.token_hex(2)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(LAB_PATH), *args], capture_output=True, text=True, timeout=30)

    try:
        up = cli("up", "--prefix", prefix, "--delay-a", "25ms", "--delay-b", "15", "--relay-delay-b", "40ms")
        assert up.returncode == 0, up.stderr
        assert "peer a link delay: 25 ms each way (+50 ms RTT to the WAN" in up.stdout
        assert "peer b link delay: 15 ms each way, 40 ms each way to/from the relay" in up.stdout
        assert "expected RTT host-a <-> host-b: 80 ms direct, 130 ms via the relay" in up.stdout
        # The forwarders outlive `lab.py up`, and a later `status` finds them.
        status = cli("status", "--prefix", prefix, "--json")
        [state] = json.loads(status.stdout)
        assert state["delays_ms"] == {"a": 25, "b": 15}
        assert state["relay_delays_ms"] == {"a": 25, "b": 40}
        assert state["delay_forwarder_running"] == {"a": True, "b": True}
        text = cli("status", "--prefix", prefix)
        assert "40 ms each way to/from the relay (forwarder running)" in text.stdout, text.stdout
        bad = cli("up", "--prefix", prefix + "x", "--delay-a", "25s")
        assert bad.returncode != 0 and "bad delay" in bad.stderr
        down = cli("down", "--prefix", prefix)
        assert down.returncode == 0, down.stderr
        assert not [ns for ns in _namespaces() if ns.startswith(prefix + "-")]
    finally:
        lab_module.down_all(prefix)
