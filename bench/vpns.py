"""One adapter per VPN system, to run it between host-a and host-b of a netns NAT lab (for bench/throughput.py).

Every adapter implements :class:`VpnSystem`: ``available()`` (installs its Debian packages if
needed), ``start(lab, workdir, mode)``, ``wait_ready(timeout)``, ``pids()`` (for CPU accounting)
and ``stop()``, which kills every process it started, deletes its tun/tap devices, the nftables
table it added to nat-a and the NATs' conntrack entries, so that systems can take turns in one lab.
Host-a's end is 10.10.10.3/24 and host-b's 10.10.10.4/24 (``overlay_b``) for every system; the
hub, where a system has one, runs in the "wan" namespace at 203.0.113.1. Every process logs to a
file in ``workdir``.

* ``traversal`` (ours): netns-lab/overlay.py's Overlay: relay with STUN in wan, a node per host
  (TAP, MTU 1360, the node's default). "relay" is ``--no-direct``; ``extra_args`` go to both nodes.
* ``wireguard-go``: the userspace WireGuard (``wireguard-go -f``), one tun per host, MTU 1420 (its
  usual 1500 - 80), each side's endpoint the other NAT's public address, port 51820. The lab's cone
  NATs keep the port, so the two sides' first packets open both NATs (persistent-keepalive 1).
  Direct only: it has no relay. Its UAPI socket lives in /var/run/wireguard, shared by every
  namespace, so the device names carry the lab prefix.
* ``tinc`` (1.0): a hub node in wan (DeviceType = dummy) and a node per host with ConnectTo = hub,
  Mode = switch (layer 2, like ours), tap MTU 1400 (tinc's UDP overhead with its default
  blowfish/SHA1 leaves about 1445), default ciphers. Direct is tinc's own UDP hole punching.
* ``n2n`` (v1, 1.3): a supernode in wan and an edge per host (tap, Twofish with a per-run key,
  LZO compression, which the random iperf3 payload defeats and even inflates a little). MTU 1360:
  with its default 1400, and down to 1364, full TCP frames left host-a in IP fragments.

Relay mode for tinc and n2n: a table in nat-a drops everything between host-a and host-b's public
address, so only the hub path is left, as behind NATs that cannot be punched. n2n then sends
everything through the supernode (UDP). tinc relays through the hub too: frames larger than the
path MTU it has confirmed go over its TCP connections, the rest as UDP that the hub forwards;
it confirms the full MTU within seconds, and ``wait_ready`` waits for that (all UDP via the hub).

Every start also puts counters in nat-a (:meth:`VpnSystem.path_counters`): bytes host-a sends to
b's public address ("direct") and to the relay/hub addresses ("relay", and of those over UDP,
"relay_udp"), and IP fragments (a tunnel MTU too large for the path). ``wait_ready`` uses them to
check that data really takes the mode's path: after the first overlay ping, it sends bursts of
pings of the overlay's full MTU until they do. ``wait_ready``'s time is from launching the two
ends (the hub, keys and configuration already in place) to the first echo reply (ping -D stamps).

Self-test (root, from the repository): one cone x cone lab, every system and mode in turn:
``.venv/bin/python bench/vpns.py --selftest [--systems traversal,tinc] [--seconds 3]``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

from common import load_netns_module

lab_module = load_netns_module("lab")
overlay_module = load_netns_module("overlay")

#: netns-lab/lab.py's Lab (loaded by path, hence untyped here).
Lab = Any

MODES = ("direct", "relay")
OVERLAY_A = "10.10.10.3"
OVERLAY_B = "10.10.10.4"
OVERLAY = {"a": OVERLAY_A, "b": OVERLAY_B}
OVERLAY_PREFIXLEN = 24
HUB_IP = lab_module.RELAY_ADDRESSES[0]

#: The first overlay ping is retried every 10 ms (ping -i 0.01) until a reply or the deadline.
PING_INTERVAL_S = 0.01
#: ARP retransmit time on host-a's overlay device: the kernel's 1 s default would round the
#: first ping of a layer-2 VPN up to the next second whenever the first request is lost.
ARP_RETRANSMIT_MS = 100
#: The path check: a burst of this many pings of the overlay's MTU; a path carries the burst if
#: host-a sent at least a burst's worth of bytes on it, and the other path less than half of that.
PROBE_COUNT = 20
STOP_TIMEOUT_S = 5.0
IPERF_PORT = 5201
#: UDP datagrams fit every tunnel here (the smallest overlay MTU is traversal's 1360).
UDP_DATAGRAM = 1200
#: UDP target rate when none is given: above what these tunnels carry on a small machine, so
#: the receiver's rate is the tunnel's UDP capacity (and the loss says how far above it we were);
#: not much above it, though: on 2 cores an iperf3 sender at 1G takes so much CPU from the tunnel
#: that some carried less than half of what they carry at 400M.
DEFAULT_UDP_BITRATE = "400M"
#: The nftables table put in nat-a (counters, and in relay mode the block).
NAT_TABLE = "vpnbench"


class VpnError(Exception):
    """A system could not be started or did not come up; the message says why and where its logs are."""


# --- helpers ---------------------------------------------------------------------------------


def package_version(package: str) -> str | None:
    """The Debian package's installed version (``dpkg-query -W``), or None if it is not installed."""
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, check=False)
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def _dpkg_installed(package: str) -> bool:
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False)
    return proc.returncode == 0 and proc.stdout.endswith("install ok installed")


def install_packages(packages: Iterable[str]) -> str | None:
    """apt-get install the packages dpkg does not list as installed; None on success, else why not.

    If the install fails, the package lists are updated once and the install retried (on a fresh
    machine they may be missing or stale)."""
    missing = [p for p in packages if not _dpkg_installed(p)]
    if not missing:
        return None
    if os.geteuid() != 0:
        return f"not root: cannot apt-get install {' '.join(missing)}"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    argv = ["apt-get", "install", "-y", "-qq", *missing]
    for attempt in range(2):
        if attempt:
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, check=False, timeout=600)
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False, timeout=900)
        if proc.returncode == 0:
            return None
    detail = (proc.stderr or proc.stdout).strip().splitlines()
    return f"{' '.join(argv)} failed: {detail[-1] if detail else f'exit status {proc.returncode}'}"


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds the processes (all their threads, not their children) have used;
    processes that are gone count 0."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        # The command name, in parentheses, may hold spaces: count fields after its ")".
        # Fields 14 and 15 of proc(5), utime and stime, are then at 11 and 12.
        fields = stat.rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / tick


def _wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() >= deadline:
            raise VpnError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
    return value


def _listening(lab: Lab, role: str, proto: str, port: int) -> bool:
    """True if something in ``role`` listens on (TCP) or is bound to (UDP) ``port``."""
    flag = "-Htln" if proto == "tcp" else "-Huln"
    return bool(lab.run(role, "ss", flag, f"sport = :{port}", check=False).stdout.strip())


def iperf3(lab: Lab, server_ip: str, *, udp: bool, seconds: float, bitrate: str | None = None) -> dict[str, Any]:
    """One iperf3 run from host-a to ``server_ip`` (host-b's overlay address, where the server binds).

    TCP: as fast as it goes (or ``bitrate``). UDP: ``UDP_DATAGRAM``-byte datagrams at ``bitrate``
    (default ``DEFAULT_UDP_BITRATE``). ``seconds`` is rounded to whole seconds (iperf3's -t).
    Returns {"mbps": the receiver's Mbit/s, "lost_percent": UDP loss (None for TCP),
    "retransmits": TCP retransmits (None for UDP), "raw": the client's JSON}."""
    server = lab.popen(
        "host-b",
        ["iperf3", "-s", "-1", "-B", server_ip, "-p", str(IPERF_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        _wait_until(lambda: server.poll() is not None or _listening(lab, "host-b", "tcp", IPERF_PORT), 10, "iperf3 -s")
        if server.poll() is not None:
            raise VpnError(f"iperf3 -s on {server_ip} exited: {server.communicate()[1].strip()}")
        argv = ["iperf3", "-c", server_ip, "-p", str(IPERF_PORT), "-t", str(max(1, round(seconds))), "-J"]
        if udp:
            argv += ["-u", "-l", str(UDP_DATAGRAM), "-b", bitrate or DEFAULT_UDP_BITRATE]
        elif bitrate:
            argv += ["-b", bitrate]
        proc = lab.run("host-a", *argv, check=False, timeout=seconds + 30)
        try:
            raw = json.loads(proc.stdout)
        except json.JSONDecodeError:
            raise VpnError(f"iperf3 -c {server_ip} printed no JSON (exit {proc.returncode}): {proc.stderr}") from None
        if "error" in raw:
            raise VpnError(f"iperf3 -c {server_ip}: {raw['error']}")
    finally:
        if server.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(5)
        if server.poll() is None:
            server.kill()
        server.communicate()
    end = raw["end"]
    received = end.get("sum_received") or end["sum"]  # iperf3 before 3.11 has only "sum" for UDP
    return {
        "mbps": received["bits_per_second"] / 1e6,
        "lost_percent": received.get("lost_percent") if udp else None,
        "retransmits": None if udp else end["sum_sent"].get("retransmits"),
        "raw": raw,
    }


def _nat_ruleset(lab: Lab, *, block_direct: bool) -> str:
    """nat-a's table: counters of what host-a sends where, after every filter (so a dropped
    packet counts nowhere), and optionally a block of everything between host-a and b's NAT."""
    host, peer = lab.host_address("a"), lab.public_address("b")
    relays = ", ".join(lab_module.RELAY_ADDRESSES)
    block = (
        f"""\
    chain block_direct {{
        type filter hook forward priority filter - 10; policy accept;
        ip daddr {peer} counter drop
        ip saddr {peer} counter drop
    }}
"""
        if block_direct
        else ""
    )
    return f"""\
table ip {NAT_TABLE} {{
{block}    chain count {{
        type filter hook forward priority filter + 10; policy accept;
        ip saddr {host} ip daddr {peer} counter comment "direct"
        ip saddr {host} ip daddr {{ {relays} }} counter comment "relay"
        ip saddr {host} ip daddr {{ {relays} }} meta l4proto udp counter comment "relay_udp"
    }}
    chain fragments {{
        # Before conntrack reassembles them (defragmentation runs at priority -400).
        type filter hook prerouting priority -450; policy accept;
        ip saddr {host} ip frag-off & 0x1fff != 0 counter comment "fragments"
    }}
}}
"""


# --- the adapters ----------------------------------------------------------------------------


class VpnSystem(ABC):
    """A VPN system run between host-a and host-b of a lab; one start/stop cycle at a time."""

    name: ClassVar[str]
    modes: ClassVar[tuple[str, ...]]
    #: Debian packages ``available()`` installs, and the programs it then expects on PATH.
    packages: ClassVar[tuple[str, ...]] = ()
    programs: ClassVar[tuple[str, ...]] = ()
    #: In "relay" mode, drop everything between host-a and b's NAT (systems without a relay switch).
    block_direct_for_relay: ClassVar[bool] = True
    #: Signal that makes the processes exit cleanly.
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM
    #: MTU of the overlay device.
    mtu: ClassVar[int]
    #: How "relay" mode is forced, for reports ("" for systems that have no relay mode).
    relay_how: ClassVar[str] = (
        "an nftables table in nat-a drops everything between host-a and b's public address, "
        "so only the hub path is left"
    )
    overlay_b: str = OVERLAY_B

    def __init__(self) -> None:
        self.lab: Lab | None = None
        self.workdir = Path()
        self.mode = ""
        self.procs: dict[str, subprocess.Popen[Any]] = {}
        #: time.time() when the two ends were launched (the hub, if any, already up).
        self.launched_at = 0.0

    # -- interface --------------------------------------------------------------------------

    def available(self) -> str | None:
        """None if the system can run here (installing its packages if needed), else why not."""
        if error := install_packages(self.packages):
            return error
        missing = [p for p in self.programs if shutil.which(p) is None]
        return f"{', '.join(missing)} not found after installing {', '.join(self.packages)}" if missing else None

    def version(self) -> str:
        """The installed version of each of the system's packages, e.g. "tinc 1.0.36-2+b2"."""
        return ", ".join(f"{p} {package_version(p) or '(not installed)'}" for p in self.packages)

    def start(self, lab: Lab, workdir: Path, mode: str) -> None:
        """Start the hub (in wan) and both ends (host-a, host-b); returns once they are launched.
        On failure everything started is stopped again before the error propagates."""
        if mode not in self.modes:
            raise VpnError(f"{self.name} has no {mode!r} mode: it supports {', '.join(self.modes)}")
        if self.lab is not None:
            raise VpnError(f"{self.name} is already running: stop() it first")
        self.lab, self.workdir, self.mode, self.procs = lab, workdir, mode, {}
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._flush_conntrack()
            block = mode == "relay" and self.block_direct_for_relay
            lab.run("nat-a", "nft", "-f", "-", input=_nat_ruleset(lab, block_direct=block))
            self._start()
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout: float) -> float:
        """Block until host-a pings host-b's overlay address and data takes the mode's path;
        returns seconds from launching the two ends to the first echo reply."""
        deadline = time.monotonic() + timeout
        first_reply = self._first_ping(deadline)
        self._settle(deadline)
        self._check_path(deadline)
        return first_reply - self.launched_at

    def pids(self) -> list[int]:
        """Every running process of the system: both ends and the hub."""
        return [p.pid for p in self.procs.values() if p.poll() is None]

    def stop(self) -> None:
        """Stop every process, delete the devices, nat-a's table and the NATs' conntrack entries.
        Idempotent."""
        lab = self.lab
        if lab is None:
            return
        try:
            for proc in self.procs.values():
                if proc.poll() is None:
                    proc.send_signal(self.stop_signal)
            for proc in self.procs.values():
                try:
                    proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(STOP_TIMEOUT_S)
            lab.run("nat-a", "nft", "delete", "table", "ip", NAT_TABLE, check=False)
            self._flush_conntrack()
            self._cleanup()
        finally:
            self.lab = None

    # -- observation ------------------------------------------------------------------------

    def path_counters(self) -> dict[str, int]:
        """Since start(): bytes host-a sent to b's NAT ("direct"), to the relay/hub addresses
        ("relay"; over UDP: "relay_udp"), and how many non-first IP fragments host-a sent
        ("fragments": the tunnel's datagrams did not fit the 1500-byte path)."""
        listing = json.loads(self._lab.run("nat-a", "nft", "-j", "list", "table", "ip", NAT_TABLE).stdout)
        counters = {}
        for item in listing["nftables"]:
            rule = item.get("rule")
            if rule and rule.get("comment"):
                counter = next(e["counter"] for e in rule["expr"] if "counter" in e)
                counters[rule["comment"]] = counter["packets" if rule["comment"] == "fragments" else "bytes"]
        return counters

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    # -- for the adapters -------------------------------------------------------------------

    @property
    def _lab(self) -> Lab:
        if self.lab is None:
            raise VpnError(f"{self.name} is not running")
        return self.lab

    @abstractmethod
    def _start(self) -> None:
        """Start the hub and both ends; set ``launched_at`` just before launching the ends."""

    @abstractmethod
    def _devices(self) -> dict[str, str]:
        """The overlay device per role, deleted by stop() if still there."""

    def _settle(self, deadline: float) -> None:
        """Wait (until ``deadline``) for the system's own view of the path, where it has one."""
        return None  # only traversal reports its path; for all, _check_path then checks the packets

    def _cleanup(self) -> None:
        """Delete the overlay devices the processes left (called once they are gone)."""
        for role, device in self._devices().items():
            if self._lab.run(role, "ip", "link", "show", device, check=False).returncode == 0:
                self._lab.run(role, "ip", "link", "del", device)

    def _spawn(self, name: str, role: str, argv: list[str]) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``role``, logging to ``name``.log in the work directory."""
        with open(self.log_path(name), "ab") as log:
            proc = self._lab.popen(role, argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.procs[name] = proc
        return proc

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = "\n".join(self.log_path(name).read_text(errors="replace").splitlines()[-15:])
                raise VpnError(f"{self.name}: {name} exited with status {proc.returncode}; its log ends:\n{tail}")

    def _wait_log(self, name: str, needle: str, timeout: float) -> None:
        def seen() -> bool:
            self._check_alive()
            return needle in self.log_path(name).read_text(errors="replace")

        _wait_until(seen, timeout, f"{self.name}'s {name} to log {needle!r} (log: {self.log_path(name)})")

    def _flush_conntrack(self) -> None:
        for role in ("nat-a", "nat-b"):
            self._lab.run(role, "conntrack", "-F", check=False)

    def _first_ping(self, deadline: float) -> float:
        """Ping from host-a every PING_INTERVAL_S until a reply; returns its wall-clock time.

        Pinging starts once host-a's overlay device exists and its ARP retransmit time is
        lowered, so that no ARP request leaves with the kernel's default (see ARP_RETRANSMIT_MS)."""
        setting = f"net.ipv4.neigh.{self._devices()['host-a']}.retrans_time_ms={ARP_RETRANSMIT_MS}"
        arp_tuned = False
        while time.monotonic() < deadline:
            self._check_alive()
            arp_tuned = arp_tuned or self._lab.run("host-a", "sysctl", "-qw", setting, check=False).returncode == 0
            if arp_tuned:
                wait = max(1, min(5, int(deadline - time.monotonic())))
                argv = ["ping", "-D", "-n", "-c", "1", "-i", str(PING_INTERVAL_S), "-w", str(wait), self.overlay_b]
                proc = self._lab.run("host-a", *argv, check=False, timeout=wait + 10)
                if reply := re.search(r"^\[(\d+\.\d+)\] \d+ bytes from", proc.stdout, re.MULTILINE):
                    return float(reply.group(1))
            time.sleep(PING_INTERVAL_S)  # no device yet, or no route yet (then ping gives up at once)
        raise VpnError(
            f"{self.name} ({self.mode}): no overlay ping reply from {self.overlay_b} (logs in {self.workdir})"
        )

    def _check_path(self, deadline: float) -> None:
        """Send bursts of full-size pings until nat-a's counters show them on this mode's path."""
        while True:
            self._check_alive()
            before = self.path_counters()
            # Frames of the full MTU: some systems carry large frames differently until they
            # know the path MTU (tinc sends them over its TCP connection meanwhile).
            size = str(self.mtu - 28)  # IP and ICMP headers
            argv = ["ping", "-q", "-n", "-c", str(PROBE_COUNT), "-i", "0.01", "-s", size, "-W", "1", self.overlay_b]
            self._lab.run("host-a", *argv, check=False)
            after = self.path_counters()
            sent = {name: after[name] - before[name] for name in after}
            if self._on_path(sent, PROBE_COUNT * self.mtu):
                return
            if time.monotonic() >= deadline:
                raise VpnError(
                    f"{self.name} ({self.mode}): {PROBE_COUNT} pings of {self.mtu} bytes left host-a with "
                    f"{sent['direct']} bytes direct and {sent['relay']} via the relay, {sent['relay_udp']} of "
                    f"them over UDP (logs in {self.workdir})"
                )
            time.sleep(0.5)

    def _on_path(self, sent: dict[str, int], burst: int) -> bool:
        """True if the ``sent`` counters (of a burst of ``burst`` bytes) show it on this mode's path."""
        other = "relay" if self.mode == "direct" else "direct"
        return sent[self.mode] >= burst and sent[other] < burst / 2


class Traversal(VpnSystem):
    """Ours, through netns-lab/overlay.py: relay + STUN in wan, ``traversal connect`` per host."""

    name = "traversal"
    modes = MODES
    block_direct_for_relay = False  # --no-direct
    relay_how = "`--no-direct` on both nodes: no direct attempt, all data through the relay's WebSocket/TLS (TCP)"
    stop_signal = signal.SIGINT  # as Ctrl-C, like Overlay.stop
    mtu = 1360  # transport.constants.DEFAULT_MTU

    def __init__(self, extra_args: list[str] | None = None) -> None:
        super().__init__()
        #: Flags for both nodes, e.g. ["--carriage", "quic"].
        self.extra_args = list(extra_args or [])
        self.overlay: Any = None

    def available(self) -> str | None:
        if importlib.util.find_spec("traversal") is None:
            return f"the traversal package is not importable by {sys.executable}: run `make install`"
        proc = subprocess.run(
            [*overlay_module.TRAVERSAL, "connect", "--help"], capture_output=True, text=True, check=False
        )
        unknown = [a for a in self.extra_args if a.startswith("--") and a.split("=")[0] not in proc.stdout]
        return f"`traversal connect` has no {', '.join(unknown)} option" if unknown else None

    def version(self) -> str:
        try:
            return f"traversal {importlib.metadata.version('traversal')} (this tree)"
        except importlib.metadata.PackageNotFoundError:
            return "traversal (not installed: run `make install`)"

    def _start(self) -> None:
        self.overlay = overlay_module.Overlay(self._lab, self.workdir)
        for name in ("a", "b"):
            self.overlay.keygen(name)
        try:
            self.overlay.start_relay(self.overlay.write_members(["a", "b"]))
            self.launched_at = time.time()
            self.overlay.start_peers([*self.extra_args, *(["--no-direct"] if self.mode == "relay" else [])])
        finally:
            self.procs = self.overlay.procs  # the same dict: stop() sees whatever was started

    def _devices(self) -> dict[str, str]:
        return {"host-a": "tap0", "host-b": "tap0"}

    def _settle(self, deadline: float) -> None:
        for name in ("a", "b"):
            try:
                self.overlay.wait_path(name, name, self.mode, max(1.0, deadline - time.monotonic()))
            except overlay_module.OverlayError as exc:
                raise VpnError(f"traversal ({self.mode}): {exc} (logs in {self.workdir})") from None


class WireGuardGo(VpnSystem):
    """wireguard-go, static endpoints: each side's endpoint is the other NAT's public address."""

    name = "wireguard-go"
    modes = ("direct",)
    packages = ("wireguard-go", "wireguard-tools")
    programs = ("wireguard-go", "wg")
    mtu = 1420
    relay_how = ""  # no relay
    port = 51820
    #: NAT profiles that keep the source port, so the peer's public endpoint is known in advance.
    port_preserving = ("public", "cone", "fullcone", "double")
    uapi_dir = Path("/var/run/wireguard")

    def _devices(self) -> dict[str, str]:
        # Unique per lab: wireguard-go's control socket is /var/run/wireguard/DEVICE.sock in the
        # one file system every namespace shares (and a device name has at most 15 characters).
        return {f"host-{p}": f"wg{p}{self._lab.prefix[2:]}" for p in ("a", "b")}

    def _start(self) -> None:
        lab = self._lab
        for peer in ("a", "b"):
            if lab.profiles[peer] not in self.port_preserving:
                raise VpnError(
                    f"wireguard-go needs port-preserving NATs for static endpoints; nat-{peer} is {lab.profiles[peer]}"
                )
        keys, public = {}, {}
        for peer in ("a", "b"):
            keys[peer] = self.workdir / f"wg-{peer}.key"
            private = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout
            keys[peer].touch(mode=0o600)
            keys[peer].write_text(private)
            public[peer] = subprocess.run(
                ["wg", "pubkey"], input=private, capture_output=True, text=True, check=True
            ).stdout.strip()
        devices = self._devices()
        self.launched_at = time.time()
        for peer in ("a", "b"):
            self._spawn(peer, f"host-{peer}", ["wireguard-go", "-f", devices[f"host-{peer}"]])
        for peer, other in (("a", "b"), ("b", "a")):
            role, device = f"host-{peer}", devices[f"host-{peer}"]
            socket = self.uapi_dir / f"{device}.sock"
            _wait_until(lambda s=socket: self._check_alive() or s.exists(), 10, f"wireguard-go's socket {socket}")
            lab.run(
                role,
                *("wg", "set", device, "private-key", str(keys[peer]), "listen-port", str(self.port)),
                *("peer", public[other], "endpoint", f"{lab.public_address(other)}:{self.port}"),
                *("allowed-ips", f"{OVERLAY[other]}/32", "persistent-keepalive", "1"),
            )
            lab.run(role, "ip", "addr", "add", f"{OVERLAY[peer]}/{OVERLAY_PREFIXLEN}", "dev", device)
            lab.run(role, "ip", "link", "set", device, "mtu", str(self.mtu), "up")

    def _cleanup(self) -> None:
        super()._cleanup()
        # wireguard-go removes its socket on SIGTERM, but not if it had to be killed.
        for device in self._devices().values():
            (self.uapi_dir / f"{device}.sock").unlink(missing_ok=True)


class Tinc(VpnSystem):
    """tinc 1.0 in switch mode: a hub in wan, a node per host connecting to it."""

    name = "tinc"
    modes = MODES
    packages = ("tinc",)
    programs = ("tincd",)
    mtu = 1400
    relay_how = (
        "nat-a drops everything between host-a and b's public address (nftables); tinc then relays "
        "through the hub node in wan: UDP the hub forwards, once tinc has confirmed the path MTU"
    )
    port = 655
    device = "tinc0"

    def _devices(self) -> dict[str, str]:
        return {"host-a": self.device, "host-b": self.device}

    def _on_path(self, sent: dict[str, int], burst: int) -> bool:
        # Relayed, tinc first sends frames larger than the MTU it has confirmed to the hub over its
        # TCP connection; within seconds it confirms the full MTU and relays everything over UDP.
        relayed_udp = self.mode == "direct" or sent["relay_udp"] >= burst
        return super()._on_path(sent, burst) and relayed_udp

    def _write_config(self, node: str) -> Path:
        """Config directory of ``node`` ("hub", "a" or "b") with its own host file and key."""
        conf = self.workdir / "tinc" / node
        (conf / "hosts").mkdir(parents=True, exist_ok=True)
        lines = [f"Name = {node}", "Mode = switch", "AddressFamily = ipv4", f"Port = {self.port}"]
        host = [f"Port = {self.port}"]
        if node == "hub":
            lines.append("DeviceType = dummy")
            host.insert(0, f"Address = {HUB_IP} {self.port}")
        else:
            lines += ["DeviceType = tap", "Device = /dev/net/tun", f"Interface = {self.device}", "ConnectTo = hub"]
            up = conf / "tinc-up"
            up.write_text(
                "#!/bin/sh\n"
                f"ip addr add {OVERLAY[node]}/{OVERLAY_PREFIXLEN} dev $INTERFACE\n"
                f"ip link set $INTERFACE mtu {self.mtu} up\n"
            )
            up.chmod(0o755)
        (conf / "tinc.conf").write_text("\n".join(lines) + "\n")
        (conf / "hosts" / node).write_text("\n".join(host) + "\n")
        # Appends the public key to hosts/NODE; with no terminal it asks nothing.
        subprocess.run(
            ["tincd", "-c", str(conf), "-K", "2048"], stdin=subprocess.DEVNULL, capture_output=True, check=True
        )
        return conf

    def _start(self) -> None:
        confs = {node: self._write_config(node) for node in ("hub", "a", "b")}
        for node, conf in confs.items():
            for other in confs:
                if other != node:
                    shutil.copy(confs[other] / "hosts" / other, conf / "hosts" / other)

        def tincd(node: str) -> list[str]:
            # Without -D it forks; with -D it logs to stderr (our log file).
            pidfile = self.workdir / f"tinc-{node}.pid"
            return ["tincd", "-D", "-d1", "-c", str(confs[node]), f"--pidfile={pidfile}"]

        self._spawn("hub", "wan", tincd("hub"))
        self._wait_log("hub", "Ready", 10)
        self.launched_at = time.time()
        self._spawn("a", "host-a", tincd("a"))
        self._spawn("b", "host-b", tincd("b"))


class N2n(VpnSystem):
    """n2n v1: a supernode in wan, an edge per host."""

    name = "n2n"
    modes = MODES
    packages = ("n2n",)
    programs = ("edge", "supernode")
    mtu = 1360  # the largest multiple of 4 that sent no fragments in the lab (see the module docstring)
    relay_how = (
        "nat-a drops everything between host-a and b's public address (nftables); the edges then "
        "send everything through the supernode in wan (UDP)"
    )
    supernode_port = 7654
    edge_port = 7655
    device = "n2n0"

    def _devices(self) -> dict[str, str]:
        return {"host-a": self.device, "host-b": self.device}

    def _start(self) -> None:
        self._spawn("supernode", "wan", ["supernode", "-l", str(self.supernode_port)])
        _wait_until(
            lambda: self._check_alive() or _listening(self._lab, "wan", "udp", self.supernode_port),
            10,
            f"the supernode to bind UDP {self.supernode_port}",
        )
        key = secrets.token_hex(16)
        self.launched_at = time.time()
        for peer in ("a", "b"):
            # Foreground by default (-f would fork); -p fixes the local port (the cone NATs keep it).
            argv = ["edge", "-d", self.device, "-a", OVERLAY[peer], "-s", "255.255.255.0", "-c", "vpnbench", "-k", key]
            argv += ["-l", f"{HUB_IP}:{self.supernode_port}", "-p", str(self.edge_port), "-M", str(self.mtu)]
            self._spawn(peer, f"host-{peer}", argv)


SYSTEMS: dict[str, type[VpnSystem]] = {s.name: s for s in (Traversal, WireGuardGo, Tinc, N2n)}


# --- self-test -------------------------------------------------------------------------------

READY_TIMEOUT_S = 60.0


def leftovers(lab: Lab) -> list[str]:
    """What a stopped system left in the lab: processes, devices, nat-a's table, conntrack entries."""
    found = []
    for role in ("wan", "nat-a", "nat-b", "host-a", "host-b"):
        if pids := subprocess.run(["ip", "netns", "pids", lab.ns(role)], capture_output=True, text=True).stdout.split():
            found.append(f"processes {' '.join(pids)} in {role}")
        links = json.loads(lab.run(role, "ip", "-j", "link", "show").stdout)
        extra = [link["ifname"] for link in links if link["ifname"] not in ("lo", "eth0", "lan0", "wan0", "br0")]
        extra = [name for name in extra if not name.startswith("port-")]
        if extra:
            found.append(f"devices {' '.join(extra)} in {role}")
    if NAT_TABLE in lab.run("nat-a", "nft", "list", "tables").stdout:
        found.append(f"table ip {NAT_TABLE} in nat-a")
    for role in ("nat-a", "nat-b"):
        count = lab.run(role, "conntrack", "-C").stdout.strip()
        if count != "0":
            found.append(f"{count} conntrack entries in {role}")
    return found


def _selftest_one(system: VpnSystem, lab: Lab, workdir: Path, mode: str, seconds: float, bitrate: str) -> list[str]:
    """Start, wait, TCP and UDP iperf3, stop; returns the table row."""
    system.start(lab, workdir / f"{system.name}-{mode}", mode)
    try:
        first = system.wait_ready(READY_TIMEOUT_S)
        print(f"  {system.name} {mode}: first overlay ping after {first:.3f} s", flush=True)
        row = [system.name, mode, f"{first:.3f}"]
        for udp in (False, True):
            counters, cpu = system.path_counters(), cpu_seconds(system.pids())
            result = iperf3(lab, system.overlay_b, udp=udp, seconds=seconds, bitrate=bitrate if udp else None)
            cpu = cpu_seconds(system.pids()) - cpu
            sent = {name: value - counters[name] for name, value in system.path_counters().items()}
            path = f"{100 * sent['direct'] / max(1, sent['direct'] + sent['relay']):.0f}% direct"
            if sent["relay"] > sent["direct"]:
                path += f" (relayed {100 * sent['relay_udp'] / sent['relay']:.0f}% over UDP)"
            extra = f"loss {result['lost_percent']:.1f}%" if udp else f"retr {result['retransmits']}"
            row += [f"{result['mbps']:.0f}", extra, f"{cpu:.2f}", f"{path}, {sent['fragments']} frag"]
        return row
    finally:
        system.stop()


def selftest(names: list[str], seconds: float, bitrate: str, extra_args: list[str]) -> int:
    error = install_packages(["iperf3", "conntrack"])
    if error:
        print(f"vpns: {error}", file=sys.stderr)
        return 1
    lab_module.check_prerequisites()
    workdir = Path(tempfile.mkdtemp(prefix="vpns-selftest-"))
    header = ["system", "mode", "1st ping s", "TCP Mbit/s", "", "CPU s", "path", "UDP Mbit/s", "", "CPU s", "path"]
    rows, failures = [header], 0
    with lab_module.Lab(nat_a="cone", nat_b="cone") as lab:
        print(f"lab {lab.prefix} (cone x cone), logs in {workdir}", flush=True)
        for name in names:
            system = Traversal(extra_args) if name == "traversal" else SYSTEMS[name]()
            reason = system.available()
            if reason:
                print(f"  {name}: unavailable: {reason}", flush=True)
                rows.append([name, "-", "unavailable"])
                failures += 1
                continue
            for mode in system.modes:
                try:
                    rows.append(_selftest_one(system, lab, workdir, mode, seconds, bitrate))
                except (VpnError, lab_module.LabError) as exc:
                    print(f"  {name} {mode}: FAILED: {exc}", flush=True)
                    rows.append([name, mode, "FAILED"])
                    failures += 1
                if left := leftovers(lab):
                    print(f"  {name} {mode}: LEFT BEHIND: {'; '.join(left)}", flush=True)
                    failures += 1
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(header))]
    print(f"\nTCP, then UDP at {bitrate} ({UDP_DATAGRAM}-byte datagrams), {seconds:g} s each; MTUs: ", end="")
    print(", ".join(f"{n} {SYSTEMS[n].mtu}" for n in names))
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)).rstrip())
    if failures:
        print(f"\n{failures} problem(s); logs in {workdir}")
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--selftest", action="store_true", help="run every system and mode in one cone x cone lab")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated (default {','.join(SYSTEMS)})")
    parser.add_argument("--seconds", type=float, default=3, help="length of each iperf3 run (default 3)")
    parser.add_argument("--udp-bitrate", default=DEFAULT_UDP_BITRATE, help="iperf3 -b for UDP")
    parser.add_argument(
        "--traversal-args", default="", help="extra flags for both traversal nodes, e.g. '--carriage quic'"
    )
    args = parser.parse_args()
    if not args.selftest:
        parser.error("nothing to do: this module is for bench/throughput.py; run --selftest to check it")
    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    if unknown := [n for n in names if n not in SYSTEMS]:
        parser.error(f"unknown system(s) {', '.join(unknown)}: choose from {', '.join(SYSTEMS)}")
    try:
        return selftest(names, args.seconds, args.udp_bitrate, args.traversal_args.split())
    except lab_module.LabError as exc:
        print(f"vpns: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
