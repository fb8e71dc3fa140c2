"""Run traversal inside a NAT lab: a relay in the WAN namespace, a node in each host namespace.

Shared by ``netns-lab/demo.py`` (``make demo``) and the lab tests, so what the
demo shows is what the tests check. Every process is started through
``Lab.popen`` (so ``Lab.down()`` reaps it even if we crash), logs to a file
in the work directory, and is waited for by polling its control socket or
its log with a deadline, never by sleeping and hoping.
"""

from __future__ import annotations

import bisect
import contextlib
import ipaddress
import json
import re
import selectors
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RELAY_IP = "203.0.113.1"
RELAY_ALT_IP = "203.0.113.2"
RELAY_PORT = 8443
#: The relay's STUN server (RFC 5780: a second address and port for CHANGE-REQUEST).
STUN_PORT = 3478
STUN_ALT_PORT = 3479
NETWORK = "chr-001"
OVERLAY = {"a": "10.10.10.3/24", "b": "10.10.10.4/24"}
TRAVERSAL = [sys.executable, "-m", "traversal"]
#: The same CLI with microsecond wall-clock log timestamps (``%(created).6f``, seconds since the
#: epoch) instead of ``HH:MM:SS``, so a bench can time events in a log against each other and
#: against other processes (every namespace shares one clock). Only the formatter differs.
TRAVERSAL_PRECISE_LOG = [
    sys.executable,
    "-c",
    "import logging, sys, traversal.cli as cli, traversal.logfmt as logfmt\n"
    "def setup(verbose=False):\n"
    "    logfmt.setup_logging(verbose)\n"
    "    for handler in logging.getLogger().handlers:\n"
    "        handler.setFormatter(logging.Formatter('%(created).6f %(levelname)-5s %(name)s %(message)s'))\n"
    "cli.setup_logging = setup\n"
    "cli.main()\n",
]

#: How long a capture may take to open its interface, and to flush and exit when stopped.
CAPTURE_READY_TIMEOUT_S = 10.0
CAPTURE_STOP_TIMEOUT_S = 10.0
#: Bytes kept per captured frame: Ethernet + IPv6 + UDP/TCP headers fit with room to spare.
CAPTURE_SNAPLEN = 128


class OverlayError(Exception):
    """Something in the overlay run did not come up; the message points at the log to read."""


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise OverlayError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def running(lab: Any, workdir: Path, **kwargs: Any) -> Iterator[Overlay]:
    """Bring ``lab`` up and yield an :class:`Overlay` on it; afterwards stop every process it
    started and take the lab down, whatever happened (a lab test's fixture in one line)."""
    try:
        lab.up()
        run = Overlay(lab, workdir, **kwargs)
        try:
            yield run
        finally:
            run.stop_all()
    finally:
        lab.down()


@dataclass
class Overlay:
    lab: Any  # netns-lab/lab.py Lab (loaded by path, hence untyped here)
    workdir: Path
    relay_port: int = RELAY_PORT
    #: How the relay and nodes are run: TRAVERSAL, or TRAVERSAL_PRECISE_LOG for timestamped logs.
    command: list[str] = field(default_factory=lambda: list(TRAVERSAL))
    procs: dict[str, subprocess.Popen[Any]] = field(default_factory=dict)
    pubkeys: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)

    # --- files -----------------------------------------------------------------

    def keygen(self, name: str) -> str:
        out = subprocess.run(
            [*TRAVERSAL, "keygen", "--out", str(self.key_path(name)), "--force"],
            check=True,
            capture_output=True,
            text=True,
        )
        self.pubkeys[name] = out.stdout.strip()
        return self.pubkeys[name]

    def key_path(self, name: str) -> Path:
        return self.workdir / f"{name}.key"

    def write_members(self, names: list[str], file: str = "members.txt") -> Path:
        path = self.workdir / file
        path.write_text("".join(f"{self.pubkeys[n]}  # {n}\n" for n in names))
        return path

    @property
    def cert(self) -> Path:
        return self.workdir / "relay" / "cert.pem"

    def control(self, name: str) -> Path:
        return self.workdir / f"{name}.sock"

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def log_tails(self, names: tuple[str, ...] = ("a", "b", "relay"), lines: int = 30) -> str:
        """The last lines of each process log, for assertion messages."""
        tails = []
        for name in names:
            tail = self.log_text(name).splitlines()[-lines:]
            tails.append(f"--- {name}.log (last {len(tail)} lines, in {self.workdir})\n" + "\n".join(tail))
        return "\n".join(tails)

    def log_text(self, name: str) -> str:
        path = self.log_path(name)
        return path.read_text(errors="replace") if path.exists() else ""

    # --- processes ---------------------------------------------------------------

    def _start(self, name: str, role: str, argv: list[str]) -> subprocess.Popen[Any]:
        log = open(self.log_path(name), "ab")  # noqa: SIM115 - the child owns it until it exits
        proc = self.lab.popen(role, argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self.procs[name] = proc
        return proc

    def start_relay(self, members: Path, *, extra: list[str] | None = None, command: list[str] | None = None) -> None:
        """Start the relay in the WAN namespace; ``command`` replaces ``traversal relay`` (the hostile relay)."""
        argv = [
            *(command or [*self.command, "relay"]),
            "--listen",
            f"{RELAY_IP}:{self.relay_port}",
            "--members",
            f"{NETWORK}:{members}",
            "--self-signed",
            str(self.cert.parent),
            "--stun",
            f"{RELAY_IP}:{STUN_PORT}",
            "--stun-alt",
            f"{RELAY_ALT_IP}:{STUN_ALT_PORT}",
            *(extra or []),
        ]
        self._start("relay", "wan", argv)
        wait_until(
            lambda: self._exited("relay") or "event=relay_listening" in self.log_text("relay"),
            20,
            "the relay to listen",
        )
        self._check_alive("relay")

    def start_peer(
        self, name: str, peer: str, *, extra: list[str] | None = None, address: str | None = None
    ) -> subprocess.Popen[Any]:
        """Start node ``name`` in host-``peer`` with the overlay address of that side: ``address``
        (CIDR) if given, else OVERLAY's for peers a and b, else the lab's ``overlay_address(peer)``
        (a multi-site lab, netns-lab/mesh.py)."""
        if address is None:
            address = OVERLAY[peer] if peer in OVERLAY else self.lab.overlay_address(peer)
        argv = [
            *self.command,
            "connect",
            "--relay",
            f"wss://{RELAY_IP}:{self.relay_port}",
            "--ca",
            str(self.cert),
            "--network",
            NETWORK,
            "--identity",
            str(self.key_path(name)),
            "--tap",
            "tap0",
            "--address",
            address,
            "--control",
            str(self.control(name)),
            *(extra or []),
        ]
        return self._start(name, f"host-{peer}", argv)

    def start_peers(
        self, extra: list[str] | None = None, *, extra_a: list[str] | None = None, extra_b: list[str] | None = None
    ) -> None:
        """Start node "a" in host-a and node "b" in host-b: ``extra`` flags for both, then each one's own."""
        self.start_peer("a", "a", extra=[*(extra or []), *(extra_a or [])])
        self.start_peer("b", "b", extra=[*(extra or []), *(extra_b or [])])

    def _exited(self, name: str) -> bool:
        return self.procs[name].poll() is not None

    def _check_alive(self, name: str) -> None:
        if self._exited(name):
            tail = "\n".join(self.log_text(name).splitlines()[-15:])
            raise OverlayError(f"{name} exited with status {self.procs[name].returncode}; its log ends:\n{tail}")

    def stop(self, name: str, timeout: float = 10.0) -> int:
        """SIGINT (as Ctrl-C would) and wait; returns the exit status."""
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return proc.returncode

    def kill(self, name: str, timeout: float = 10.0) -> int:
        """SIGKILL (a crash: no BYE, no cleanup) and wait; returns the exit status."""
        proc = self.procs[name]
        if proc.poll() is None:
            proc.kill()
        return proc.wait(timeout)

    def send_signal(self, name: str, sig: signal.Signals = signal.SIGHUP) -> None:
        """Send ``sig`` to a running process (SIGHUP: the relay and the nodes re-read their members files)."""
        self._check_alive(name)
        self.procs[name].send_signal(sig)

    def stop_all(self) -> None:
        for name in list(self.procs):
            if name != "relay":
                self.stop(name)
        if "relay" in self.procs:
            self.stop("relay")

    # --- observation -------------------------------------------------------------

    def status(self, name: str, peer: str) -> dict[str, Any] | None:
        """``traversal status --json`` of a node, run inside its namespace; None if not answering."""
        proc = self.lab.run(
            f"host-{peer}",
            *TRAVERSAL,
            "status",
            "--json",
            "--control",
            str(self.control(name)),
            check=False,
            timeout=15,
        )
        if proc.returncode != 0:
            return None
        return json.loads(proc.stdout)

    def control_status(self, name: str, timeout: float = 5.0) -> dict[str, Any] | None:
        """What ``traversal status --json`` prints for node ``name`` (the same control-socket query),
        asked from this process: a Unix socket is reached through the file system whatever the
        network namespace, so many nodes can be polled often without a process per look."""
        from traversal.control import ControlError, query

        try:
            return query(self.control(name), timeout=timeout)
        except (ControlError, OSError, ValueError):
            return None

    def wait_path(self, name: str, peer: str, path: str = "relay", timeout: float = 30.0) -> dict[str, Any]:
        """Wait until node ``name`` has a peer on ``path``; returns that peer's status."""

        def ready() -> dict[str, Any] | None:
            self._check_alive(name)
            status = self.status(name, peer)
            for p in (status or {}).get("peers", []):
                if p.get("path") == path:
                    return p
            return None

        return wait_until(ready, timeout, f"{name} to have a peer on the {path} path")

    def wait_established(self, name: str, peer: str, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until node ``name`` has an established peer, on whichever path."""

        def ready() -> dict[str, Any] | None:
            self._check_alive(name)
            status = self.status(name, peer)
            for p in (status or {}).get("peers", []):
                if p.get("state") == "established":
                    return p
            return None

        return wait_until(ready, timeout, f"{name} to have an established peer")

    def request_path(self, name: str, peer: str, where: str) -> str:
        """``traversal path relay|direct`` against node ``name``; returns its one-line answer."""
        proc = self.lab.run(f"host-{peer}", *TRAVERSAL, "path", where, "--control", str(self.control(name)), timeout=15)
        return proc.stdout.strip()

    def wait_status(
        self, name: str, peer: str, predicate: Callable[[dict[str, Any]], Any], timeout: float, what: str
    ) -> Any:
        """Poll node ``name``'s status until ``predicate(status)`` is truthy; returns that value."""

        def ready() -> Any:
            self._check_alive(name)
            status = self.status(name, peer)
            return predicate(status) if status is not None else None

        return wait_until(ready, timeout, f"{name}: {what}")

    def log_count(self, name: str, needle: str) -> int:
        """How many lines of ``name``'s log contain ``needle``."""
        return sum(needle in line for line in self.log_text(name).splitlines())

    def log_times(self, name: str, needle: str) -> list[float]:
        """When (epoch seconds) each line of ``name``'s log containing ``needle`` was logged; needs
        ``command=TRAVERSAL_PRECISE_LOG``, whose lines start with that timestamp."""
        times = []
        for line in self.log_text(name).splitlines():
            if needle in line:
                stamp = line.split(" ", 1)[0]
                try:
                    times.append(float(stamp))
                except ValueError:
                    why = "carry no epoch timestamp: start it with TRAVERSAL_PRECISE_LOG"
                    raise OverlayError(f"{name}'s log lines {why}") from None
        return times

    def wait_log(self, name: str, needle: str, timeout: float, *, count: int = 1, interval: float = 0.005) -> None:
        """Wait until ``count`` lines of ``name``'s log contain ``needle`` (reading a file is cheap,
        so this polls far faster than :meth:`status`, which runs a process per look)."""
        wait_until(lambda: self.log_count(name, needle) >= count, timeout, f"{name} to log {needle!r}", interval)

    def capture(
        self,
        role: str = "wan",
        interface: str = "br0",
        file: str = "capture.pcap",
        *,
        direction: str | None = None,
        snaplen: int = CAPTURE_SNAPLEN,
    ) -> Capture:
        """Start tcpdump on ``interface`` inside ``role`` (by default the WAN bridge, which sees every
        packet between the NATs and the relay) and return once it is capturing. ``direction="in"``
        keeps only frames the interface receives: on a TAP, exactly what the node wrote into it."""
        capture = Capture(self.lab, role, interface, self.workdir / file, direction=direction, snaplen=snaplen)
        capture.start()
        return capture

    def ping(self, peer: str, target: str, count: int = 5, interval: float = 0.2, timeout: float = 60) -> str:
        proc = self.lab.run(
            f"host-{peer}",
            "ping",
            "-c",
            str(count),
            "-i",
            str(interval),
            "-W",
            "2",
            target,
            check=False,
            timeout=timeout,
        )
        return proc.stdout + proc.stderr

    def start_ping(
        self, peer: str, target: str, *, count: int, interval: float = 0.01, file: str | None = None
    ) -> PingRun:
        """Start ``ping`` in host-``peer`` in the background (see :class:`PingRun`)."""
        path = self.workdir / (file or f"ping-{peer}-{target}.txt")
        return PingRun(self.lab, f"host-{peer}", target, count, interval, path)

    def insert_drop_rule(self, role: str, match: str = "meta l4proto udp", chain: str = "forward") -> int:
        """Insert ``MATCH drop`` at the top of ``role``'s ``ip lab`` chain; returns the rule's handle."""
        self.lab.run(role, "nft", "insert", "rule", "ip", "lab", chain, *match.split(), "drop")
        listing = self.lab.run(role, "nft", "-a", "list", "chain", "ip", "lab", chain).stdout
        handles = re.findall(rf"^\s*{re.escape(match)} drop # handle (\d+)$", listing, re.MULTILINE)
        if not handles:
            raise OverlayError(f"inserted rule {match!r} drop not found in {role}'s chain {chain}:\n{listing}")
        return int(handles[0])

    def delete_rule(self, role: str, handle: int, chain: str = "forward") -> None:
        self.lab.run(role, "nft", "delete", "rule", "ip", "lab", chain, "handle", str(handle))

    def metrics(self) -> dict[str, float]:
        """The relay's /metrics, fetched over TLS from inside the WAN namespace."""
        return parse_metrics(self.relay_get("/metrics"))

    def relay_get(self, path: str) -> str:
        """GET ``path`` from the relay's port over TLS, from inside the WAN namespace; the body."""
        code = (
            "import ssl,sys,urllib.request;"
            f"c=ssl.create_default_context(cafile={str(self.cert)!r});"
            f"sys.stdout.write(urllib.request.urlopen('https://{RELAY_IP}:{self.relay_port}{path}',"
            "context=c,timeout=5).read().decode())"
        )
        return self.lab.run("wan", sys.executable, "-c", code, timeout=20).stdout


def first_peer(status: dict[str, Any] | None) -> dict[str, Any] | None:
    """The first peer of a `traversal status --json` answer, or None."""
    peers = (status or {}).get("peers") or []
    return peers[0] if peers else None


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format -> {'name{labels}': value} (comments skipped)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            values[name] = float(value)
        except ValueError:
            continue
    return values


# --- ping in the background -----------------------------------------------------------------

_PING_SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) received(?:, \+(\d+) duplicates)?")
_PING_REPLY = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from [^:]+: icmp_seq=(\d+) .*time=([\d.]+) ms(.*)$")


@dataclass(frozen=True)
class EchoReply:
    """One echo reply as ping printed it: when it arrived (epoch seconds), its sequence number, its RTT."""

    at: float
    seq: int
    rtt_ms: float
    duplicate: bool

    @property
    def sent_at(self) -> float:
        return self.at - self.rtt_ms / 1000


@dataclass(frozen=True)
class PingResult:
    output: str
    transmitted: int
    received: int
    duplicates: int
    replies: list[EchoReply]

    @property
    def lost(self) -> int:
        return self.transmitted - self.received

    def missing(self) -> list[int]:
        """Sequence numbers sent but never answered."""
        answered = {r.seq for r in self.replies}
        return [seq for seq in range(1, self.transmitted + 1) if seq not in answered]

    def sent_at(self, seq: int) -> float:
        """When echo request ``seq`` left (epoch seconds): from its reply if it has one, else
        interpolated between the nearest answered requests (ping sends at a steady interval)."""
        sent = sorted({r.seq: r.sent_at for r in self.replies if not r.duplicate}.items())
        if not sent:
            raise OverlayError("no echo request was answered: send times are unknown")
        seqs = [s for s, _ in sent]
        if len(sent) == 1:
            return sent[0][1]
        # The two answered requests around seq (or the two nearest, at either end).
        right = min(max(1, bisect.bisect_left(seqs, seq)), len(sent) - 1)
        (s0, t0), (s1, t1) = sent[right - 1], sent[right]
        return t0 + (seq - s0) * (t1 - t0) / (s1 - s0)

    def missing_outside(self, windows: Iterable[tuple[float, float]]) -> list[int]:
        """Unanswered requests sent outside every ``(start, end)`` window (epoch seconds)."""
        spans = list(windows)
        return [seq for seq in self.missing() if not any(start <= self.sent_at(seq) <= end for start, end in spans)]

    def summary(self) -> str:
        missing = self.missing()
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        return f"{self.transmitted} sent, {self.received} received, {self.duplicates} duplicates" + (
            f"; no reply to icmp_seq {shown}" if missing else ""
        )


def parse_ping(output: str) -> PingResult:
    """iputils ``ping -D`` output -> counts and per-reply times (raises OverlayError without a summary)."""
    match = _PING_SUMMARY.search(output)
    if not match:
        raise OverlayError(f"ping printed no summary:\n{output[-2000:]}")
    replies = []
    for line in output.splitlines():
        reply = _PING_REPLY.match(line)
        if reply:
            at, seq, rtt, rest = reply.groups()
            replies.append(EchoReply(float(at), int(seq), float(rtt), "DUP!" in rest))
    return PingResult(output, int(match.group(1)), int(match.group(2)), int(match.group(3) or 0), replies)


class PingRun:
    """``ping -D -i INTERVAL -c COUNT`` in a lab namespace, its output going to a file (a pipe
    could fill up and stall it). ``wait()`` returns the parsed result."""

    def __init__(self, lab: Any, role: str, target: str, count: int, interval: float, path: Path) -> None:
        self.path = path
        self.target = target
        argv = ["ping", "-D", "-n", "-c", str(count), "-i", str(interval), "-W", "2", target]
        with open(path, "wb") as out:
            self.proc = lab.popen(role, argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        #: Long enough for every request to go out, plus ping's wait for the last replies.
        self.expected_s = count * interval + 5

    def wait(self, timeout: float | None = None) -> PingResult:
        try:
            self.proc.wait(timeout if timeout is not None else self.expected_s + 30)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGINT)  # prints the summary of what it did
            self.proc.wait(5)
        return parse_ping(self.path.read_text(errors="replace"))

    def answered(self) -> int:
        """Echo replies printed so far (ping still running)."""
        text = self.path.read_text(errors="replace") if self.path.exists() else ""
        return sum(1 for line in text.splitlines() if _PING_REPLY.match(line))

    def wait_answered(self, count: int, timeout: float) -> None:
        """Wait until ``count`` replies came back: the ping is really flowing."""
        wait_until(lambda: self.answered() >= count, timeout, f"{count} echo replies from {self.target}", 0.02)

    def stop(self) -> PingResult:
        """SIGINT now (ping prints its summary) and return the result."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.wait(10)


# --- packet capture ----------------------------------------------------------------------

_PCAP_MAGIC = {b"\xd4\xc3\xb2\xa1": "<", b"\xa1\xb2\xc3\xd4": ">", b"\x4d\x3c\xb2\xa1": "<", b"\xa1\xb2\x3c\x4d": ">"}
_LINKTYPE_ETHERNET = 1
_LINKTYPE_LINUX_SLL = 113
_ETHERTYPE_IPV4 = 0x0800
_ETHERTYPE_IPV6 = 0x86DD
_ETHERTYPE_VLAN = 0x8100
PROTO_TCP = 6
PROTO_UDP = 17


@dataclass(frozen=True)
class Packet:
    """One captured IP packet: its addresses, IP protocol number, ports (TCP and UDP only), wire
    length, and for UDP the first payload byte (which tells STUN, QUIC and our frames apart)."""

    src: str
    dst: str
    proto: int
    sport: int | None
    dport: int | None
    length: int
    first_byte: int | None = None

    def touches(self, addresses: Iterable[str]) -> bool:
        """True if the packet comes from or goes to one of ``addresses``."""
        wanted = {str(ipaddress.ip_address(a)) for a in addresses}
        return self.src in wanted or self.dst in wanted

    def is_udp(self, src: str, dst: str) -> bool:
        return self.proto == PROTO_UDP and self.src == _canonical(src) and self.dst == _canonical(dst)


def _canonical(address: str) -> str:
    return str(ipaddress.ip_address(address))


def _ip_packet(ethertype: int, data: bytes, length: int) -> Packet | None:
    if ethertype == _ETHERTYPE_IPV4 and len(data) >= 20:
        header = (data[0] & 0x0F) * 4
        proto, src, dst = data[9], data[12:16], data[16:20]
        fragment_offset = struct.unpack("!H", data[6:8])[0] & 0x1FFF
        ports = data[header : header + 4] if fragment_offset == 0 else b""
    elif ethertype == _ETHERTYPE_IPV6 and len(data) >= 40:
        # The lab's traffic carries no extension headers; anything else keeps proto and no ports.
        proto, src, dst = data[6], data[8:24], data[24:40]
        header = 40
        ports = data[40:44]
    else:
        return None
    sport = dport = first_byte = None
    if proto in (PROTO_TCP, PROTO_UDP) and len(ports) == 4:
        sport, dport = struct.unpack("!HH", ports)
        if proto == PROTO_UDP and len(data) > header + 8:
            first_byte = data[header + 8]
    source, destination = str(ipaddress.ip_address(src)), str(ipaddress.ip_address(dst))
    return Packet(source, destination, proto, sport, dport, length, first_byte)


@dataclass(frozen=True)
class CapturedFrame:
    """One frame of a pcap file as captured: its length on the wire and its first bytes (up to the snaplen)."""

    length: int
    data: bytes


def read_pcap_frames(path: Path) -> list[CapturedFrame]:
    """Every frame of a pcap file, whatever it carries (ARP, IPv6, unknown EtherTypes, runts)."""
    data = path.read_bytes()
    if len(data) < 24 or data[:4] not in _PCAP_MAGIC:
        raise OverlayError(f"{path} is not a pcap file (tcpdump -w output)")
    order = _PCAP_MAGIC[data[:4]]
    captured = []
    offset = 24
    while offset + 16 <= len(data):
        caplen, wirelen = struct.unpack(order + "II", data[offset + 8 : offset + 16])
        captured.append(CapturedFrame(wirelen, data[offset + 16 : offset + 16 + caplen]))
        offset += 16 + caplen
    return captured


def read_pcap(path: Path) -> list[Packet]:
    """The IPv4 and IPv6 packets of a pcap file (Ethernet or Linux cooked); ARP and the like are skipped."""
    data = path.read_bytes()
    if len(data) < 24 or data[:4] not in _PCAP_MAGIC:
        raise OverlayError(f"{path} is not a pcap file (tcpdump -w output)")
    order = _PCAP_MAGIC[data[:4]]
    linktype = struct.unpack(order + "I", data[20:24])[0] & 0x0FFFFFFF
    if linktype not in (_LINKTYPE_ETHERNET, _LINKTYPE_LINUX_SLL):
        raise OverlayError(f"{path}: link type {linktype} is not Ethernet or Linux cooked; capture one interface")
    packets: list[Packet] = []
    offset = 24
    while offset + 16 <= len(data):
        caplen, wirelen = struct.unpack(order + "II", data[offset + 8 : offset + 16])
        frame = data[offset + 16 : offset + 16 + caplen]
        offset += 16 + caplen
        if linktype == _LINKTYPE_ETHERNET:
            header = 14
            ethertype = struct.unpack("!H", frame[12:14])[0] if len(frame) >= 14 else 0
            if ethertype == _ETHERTYPE_VLAN and len(frame) >= 18:
                header, ethertype = 18, struct.unpack("!H", frame[16:18])[0]
        else:
            header = 16
            ethertype = struct.unpack("!H", frame[14:16])[0] if len(frame) >= 16 else 0
        packet = _ip_packet(ethertype, frame[header:], wirelen - header)
        if packet is not None:
            packets.append(packet)
    return packets


class Capture:
    """tcpdump on one interface of a lab namespace, written to a pcap file.

    ``start()`` returns once tcpdump says it is listening, so nothing sent afterwards is
    missed; ``stop()`` (SIGINT, so it flushes) returns the IP packets it saw. Promiscuous
    mode (tcpdump's default) matters on a bridge: only then does the bridge hand the
    frames it forwards between its ports to the capture, not just its own.
    """

    def __init__(
        self,
        lab: Any,
        role: str,
        interface: str,
        path: Path,
        *,
        direction: str | None = None,
        snaplen: int = CAPTURE_SNAPLEN,
    ) -> None:
        if direction not in (None, "in", "out"):
            raise OverlayError(f"capture direction is 'in', 'out' or None (both), not {direction!r}")
        self.lab = lab
        self.role = role
        self.interface = interface
        self.path = path
        self.direction = direction
        self.snaplen = snaplen
        self.proc: subprocess.Popen[bytes] | None = None
        #: What tcpdump reported on exit ("N packets dropped by kernel" and the like).
        self.summary = ""

    def start(self) -> None:
        self.path.unlink(missing_ok=True)
        argv = ["tcpdump", "-i", self.interface, "-n", "-U", "--immediate-mode", "-s", str(self.snaplen)]
        if self.direction is not None:
            argv += ["-Q", self.direction]
        # -Z root: Debian's tcpdump otherwise drops to the tcpdump user before opening the file.
        argv += ["-Z", "root", "-w", str(self.path)]
        self.proc = self.lab.popen(self.role, argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert self.proc.stderr is not None
        seen = b""
        deadline = time.monotonic() + CAPTURE_READY_TIMEOUT_S
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stderr, selectors.EVENT_READ)
            while b"listening on" not in seen:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    self._abort()
                    raise OverlayError(f"tcpdump on {self.role} {self.interface} not listening: {seen.decode()!r}")
                line = self.proc.stderr.readline()
                if not line:
                    self._abort()
                    raise OverlayError(f"tcpdump on {self.role} {self.interface} exited: {seen.decode()!r}")
                seen += line

    def _abort(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> list[Packet]:
        """Stop capturing and return the IP packets captured."""
        if self.proc is None:
            raise OverlayError("capture not started")
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=CAPTURE_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._abort()
            raise OverlayError(f"tcpdump on {self.role} {self.interface} did not exit on SIGINT") from None
        self.summary = err.decode(errors="replace").strip()
        if "0 packets dropped by kernel" not in self.summary:
            raise OverlayError(f"the capture lost packets, so it proves nothing: {self.summary}")
        return read_pcap(self.path)
