"""Lab tests for tap/device.py: a real TAP in a namespace of our own, talked to through the
kernel (ARP and ICMP answered by the kernel's own stack, read back via ``on_frames``).

The device code runs in a subprocess under ``ip netns exec`` so the TAP never appears in
the root namespace. Needs root and /dev/net/tun; skips with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest

from tests.lab.conftest import REPO

pytestmark = pytest.mark.timeout(60)

MTU = 1400

# Runs inside the test namespace. Plays a machine with MAC 02:00:00:00:00:02 and address
# 10.10.10.2 on the TAP's segment; the kernel owns 10.10.10.1 on the TAP itself.
TAP_SCRIPT = r"""
import asyncio, json, socket, struct, subprocess, sys
from tap.device import TapDevice, TapError

MTU = int(sys.argv[1])
PEER_MAC = bytes.fromhex("020000000002")
PEER_IP, TAP_IP = socket.inet_aton("10.10.10.2"), socket.inet_aton("10.10.10.1")
BROADCAST = b"\xff" * 6

def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF

def arp(op, src_mac, src_ip, dst_mac, dst_ip, eth_dst):
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, src_mac, src_ip, dst_mac, dst_ip)
    return eth_dst + src_mac + b"\x08\x06" + body

def icmp_echo(dst_mac, seq, ip_total):
    payload = bytes(i & 0xFF for i in range(ip_total - 28))
    icmp = struct.pack("!BBHHH", 8, 0, 0, 0x1234, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), seq, 0, 64, 1, 0, PEER_IP, TAP_IP)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return dst_mac + PEER_MAC + b"\x08\x00" + ip + icmp

def is_arp(frame, op, sender_ip):
    return len(frame) >= 42 and frame[12:14] == b"\x08\x06" and frame[20:22] == struct.pack("!H", op) \
        and frame[28:32] == sender_ip

def is_echo_reply(frame):
    return len(frame) >= 42 and frame[12:14] == b"\x08\x00" and frame[23] == 1 and frame[34] == 0 \
        and frame[0:6] == PEER_MAC

async def main():
    loop = asyncio.get_running_loop()
    tap = TapDevice("tvtap0", mtu=MTU, address="10.10.10.1/24")
    result = {"name": tap.name, "mtu": tap.mtu, "hwaddr": tap.hwaddr.hex(":")}
    show = ["ip", "-j", "addr", "show", "dev", tap.name]
    result["ip"] = json.loads(subprocess.run(show, capture_output=True, text=True, check=True).stdout)
    try:
        TapDevice("tvtap0", mtu=MTU)
        result["duplicate_error"] = None
    except TapError as exc:
        result["duplicate_error"] = str(exc)

    queue, batches = asyncio.Queue(), []
    def on_frames(frames):
        batches.append(len(frames))
        for frame in frames:
            queue.put_nowait(frame)
    tap.start(loop, on_frames)

    async def wait_for(match, what, timeout=5.0):
        # The kernel also sends IPv6 chatter and may ask who 10.10.10.2 is: answer that,
        # skip the rest, until the awaited frame arrives or the deadline passes.
        deadline = loop.time() + timeout
        while True:
            try:
                frame = await asyncio.wait_for(queue.get(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise SystemExit(f"timed out waiting for {what}")
            if match(frame):
                return frame
            if is_arp(frame, 1, TAP_IP) and frame[38:42] == PEER_IP:
                tap.write(arp(2, PEER_MAC, PEER_IP, frame[6:12], TAP_IP, frame[6:12]))

    tap.write(arp(1, PEER_MAC, PEER_IP, b"\0" * 6, TAP_IP, BROADCAST))
    reply = await wait_for(lambda f: is_arp(f, 2, TAP_IP) and f[0:6] == PEER_MAC, "ARP reply")
    result["arp_reply_sender_mac"] = reply[22:28].hex(":")

    # A full-MTU echo: its reply is the largest frame the TAP can carry (mtu + 14 bytes),
    # so a too-small read buffer would show up as a short frame here.
    tap.write(icmp_echo(tap.hwaddr, 1, MTU))
    big = await wait_for(is_echo_reply, "full-size echo reply")
    result["big_reply_len"] = len(big)

    # Several requests written back to back: the replies queue up in the kernel while the
    # loop is busy here, so one wakeup should deliver them as one batch.
    batches.clear()
    for seq in range(2, 12):
        tap.write(icmp_echo(tap.hwaddr, seq, 100))
    for _ in range(10):
        await wait_for(is_echo_reply, "echo reply")
    result["batches"] = batches
    result["counters"] = {"rx": tap.rx_frames, "tx": tap.tx_frames, "dropped": tap.tx_dropped}
    tap.close()
    tap.close()  # idempotent
    shown = subprocess.run(["ip", "link", "show", "tvtap0"], capture_output=True)
    result["exists_after_close"] = shown.returncode == 0
    print(json.dumps(result))

asyncio.run(main())
"""

NOT_ROOT_SCRIPT = r"""
from tap.device import TapDevice, TapError
try:
    TapDevice("tvtap9", mtu=1400)
except TapError as exc:
    print(exc)
"""


@pytest.fixture
def tap_namespace(lab_module: ModuleType) -> Iterator[str]:
    """A fresh namespace named like a lab host, so `lab.py down --all` also finds it
    after a crash; removed (with anything still running in it) when the test ends."""
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("TAP tests need /dev/net/tun (load the tun module)")
    if os.geteuid() != 0:
        pytest.skip("TAP tests need root to create a TAP and a network namespace")
    prefix = "tv" + secrets.token_hex(3)
    ns = f"{prefix}-host-a"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        yield ns
    finally:
        lab_module.down_all(prefix)


def test_tap_exchanges_frames_with_the_kernel(tap_namespace: str) -> None:
    proc = subprocess.run(
        ["ip", "netns", "exec", tap_namespace, sys.executable, "-c", TAP_SCRIPT, str(MTU)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)

    [iface] = result["ip"]
    assert result["name"] == iface["ifname"] == "tvtap0"
    assert result["mtu"] == iface["mtu"] == MTU
    assert "UP" in iface["flags"]
    assert result["hwaddr"] == iface["address"]
    assert [(a["local"], a["prefixlen"]) for a in iface["addr_info"] if a["family"] == "inet"] == [("10.10.10.1", 24)]

    assert result["duplicate_error"] is not None and "taken" in result["duplicate_error"]
    assert result["arp_reply_sender_mac"] == result["hwaddr"]
    assert result["big_reply_len"] == MTU + 14
    assert max(result["batches"]) > 1, f"replies were not batched: {result['batches']}"
    counters = result["counters"]
    assert counters["tx"] >= 12 and counters["dropped"] == 0
    assert counters["rx"] >= 12
    assert result["exists_after_close"] is False


def test_tap_error_when_not_root(tap_namespace: str) -> None:
    # Drop to nobody only after entering the namespace (setns itself needs root).
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    proc = subprocess.run(
        ["ip", "netns", "exec", tap_namespace, *as_nobody, sys.executable, "-c", NOT_ROOT_SCRIPT],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr
    assert "not permitted" in proc.stdout and "root" in proc.stdout
