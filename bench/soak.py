"""Soak: two peers push checksummed traffic through the overlay while the direct path is cut at random.

One cone x cone netns lab (its own prefix, torn down on every exit, Ctrl-C included), the real
relay and two ``traversal connect`` nodes (lean carriage, direct allowed, ``--direct-retry``
seconds between attempts while on the relay) logging with epoch timestamps
(``TRAVERSAL_PRECISE_LOG``). Once the pair is direct, for ``--duration`` seconds:

* TCP, host-a -> host-b across the overlay (10.10.10.3 -> 10.10.10.4), at about ``--rate``
  Mbit/s (paced, bursts after a stall bounded to one second's worth): a deterministic
  pseudo-random byte stream; the sender keeps a running SHA-256 of what it sent, the receiver of
  what it got, and the receiver also regenerates the stream and compares every byte (the first
  differing offset, if any, is reported). It records every pause of more than 0.5 s in delivery.
* UDP, host-b -> host-a, ``--udp-rate`` datagrams per second of 1000 bytes, each carrying its
  sequence number, its send time and a payload derived from the sequence number: the receiver
  counts lost, duplicated, reordered and corrupted datagrams and their one-way delay (the
  namespaces share one clock), and dates each run of lost datagrams between its neighbours.
* ``ping -D`` every 0.2 s from host-a to 10.10.10.4, for loss and outage per cut.

Every ``--cut-every`` seconds (a slot), at a random moment in the slot (``--seed``, recorded), the
direct path is cut with an nftables ``meta l4proto udp drop`` rule at the top of nat-a's or
nat-b's forward chain (the side chosen at random; the relay is TCP, so it is untouched) for a
random ``--hold`` time, then the rule is deleted. The moment is drawn so that at least
``SETTLE_ROOM_S`` of the slot remain after the lift. Per cut, from the nodes' logs: cut -> each
side's ``path=relay`` (the fall-back) and ``session_resumed`` (traffic on the relay again), lift
-> each side's ``path=direct`` (the return); from ``traversal status``: back on direct both ways,
relay released, the same end-to-end session. A side not back on direct ``STUCK_AFTER_S`` after
the lift is stuck. The relay's ``/metrics`` give the bytes it forwarded per cut.

Every ``--sample-every`` seconds the RSS (``VmRSS``), open fds and threads of the relay and both
nodes are read from /proc (asyncio tasks are not visible from outside the processes). The bound:
after the warm-up (``--warmup``, default two slots), no process's RSS may rise more than
``--rss-bound`` MiB above its value at the end of the warm-up, nor its fd count by more than
``FD_BOUND``.

Exits 1 if a criterion fails (data not intact, a stuck or renewed session, a cut without
fall-back or without return, a process that died, the memory or fd bound), after writing
``bench/soak.md`` (``--out``) and ``bench/soak.json`` (``--json``). Run as root, from the
repository: ``.venv/bin/python bench/soak.py [--duration 600] [--cut-every 30] [--seed N]``
(``--duration 60`` for a quick check).
"""

from __future__ import annotations

import argparse
import array
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from common import BENCH, BenchError, Context, load_netns_module, median, write_json

lab_module = load_netns_module("lab")
overlay_module = load_netns_module("overlay")

NODES = ("a", "b")
PROCESSES = ("relay", "a", "b")
ADDRESS = {peer: cidr.split("/")[0] for peer, cidr in overlay_module.OVERLAY.items()}
TCP_PORT = 5201
UDP_PORT = 5202
UDP_SIZE = 1000
PING_INTERVAL_S = 0.2

#: From starting the nodes to direct both ways, with room.
SETTLE_TIMEOUT_S = 30.0
#: A side not back on direct this long after the drop rule is deleted is stuck.
STUCK_AFTER_S = 30.0
#: Room left in each slot after the lift, for the return to direct (retry + ICE + validation).
SETTLE_ROOM_S = 10.0
#: After the lift, how long a fall-back may still show: the keepalive ticks once a second and
#: declares the path dead before it sends its next probe (DIRECT_KEEPALIVE_INTERVAL, 3 s dead).
LATE_FALLBACK_S = 1.5
#: A cut this long must make both sides fall back (3 s without an answer, checked every second).
MUST_FALL_BACK_S = 5.0
#: Margins around a cut for the traffic it may cost: frames in flight at the cut and at the return.
WINDOW_BEFORE_S = 0.3
WINDOW_AFTER_S = 1.0
#: The fd bound: more open fds than this above the warm-up value is a leak.
FD_BOUND = 16
#: How long the traffic workers may take to start, and to finish after their end time.
WORKER_READY_S = 15.0
WORKER_FINISH_S = 120.0
#: Delivery pauses longer than this are recorded by the TCP receiver.
TCP_GAP_S = 0.5
TCP_BLOCK = 16 * 1024
MIB = 1024 * 1024

VALIDATED = 'reason="validated both ways'
_LOG_LINE = re.compile(r"^(\d+\.\d+) \S+\s+\S+ event=(\S+)(.*)$")


# --- the traffic workers (run inside the host namespaces: `soak.py _worker KIND ...`) ----------


def _emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def _pace(started: float, done: float, rate: float) -> float:
    """Sleep until ``done`` units are due at ``rate`` per second since ``started``; returns the
    (possibly moved) start, so that a stall earns at most one second of catching up."""
    now = time.monotonic()
    due = started + done / rate
    if due > now:
        time.sleep(due - now)
    elif now - due > 1.0:
        started += now - due - 1.0
    return started


def tcp_receive(bind: str, port: int, seed: int, deadline: float) -> None:
    """Accept one connection; hash, verify against the regenerated stream and time everything received."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((bind, port))
    server.listen(1)
    server.settimeout(WORKER_READY_S * 2)
    _emit({"ready": time.time()})
    conn, _ = server.accept()
    conn.settimeout(1.0)
    rng = random.Random(seed)
    digest = hashlib.sha256()
    expected = bytearray()
    position = size = 0
    mismatch: int | None = None
    gaps: list[list[float]] = []
    first = last = None
    error = None
    while True:
        try:
            chunk = conn.recv(1 << 16)
        except TimeoutError:
            if time.time() > deadline:
                error = "timed out waiting for the end of the stream"
                break
            continue
        except OSError as exc:
            error = f"receive failed: {exc}"
            break
        if not chunk:
            break
        now = time.time()
        if first is None:
            first = now
            _emit({"first_byte": now})
        elif last is not None and now - last > TCP_GAP_S:
            gaps.append([last, now])
        last = now
        digest.update(chunk)
        while len(expected) - position < len(chunk):
            expected += rng.randbytes(TCP_BLOCK)
        if mismatch is None and expected[position : position + len(chunk)] != chunk:
            offset = next(i for i, byte in enumerate(chunk) if byte != expected[position + i])
            mismatch = size + offset
        position += len(chunk)
        size += len(chunk)
        if position > MIB:
            del expected[:position]
            position = 0
    conn.close()
    _emit(
        {
            "bytes": size,
            "sha256": digest.hexdigest(),
            "first_mismatch": mismatch,
            "gaps": gaps,
            "first_at": first,
            "last_at": last,
            "error": error,
        }
    )


def tcp_send(host: str, port: int, seed: int, mbps: float, seconds: float) -> None:
    """Send the seeded stream for ``seconds`` at about ``mbps``, then close and wait for the receiver."""
    rng = random.Random(seed)
    digest = hashlib.sha256()
    sent = 0
    error = None
    rate = mbps * 1e6 / 8
    conn = socket.create_connection((host, port), timeout=30)
    conn.settimeout(60)  # a send blocked this long means the overlay is stuck
    started = time.monotonic()
    end = started + seconds
    try:
        while time.monotonic() < end:
            block = rng.randbytes(TCP_BLOCK)
            conn.sendall(block)
            digest.update(block)
            sent += len(block)
            started = _pace(started, sent, rate)
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(WORKER_FINISH_S)
        conn.recv(1)
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
    _emit({"bytes": sent, "sha256": digest.hexdigest(), "error": error, "done_at": time.time()})


def _udp_payload(seq: int) -> bytes:
    seed = hashlib.sha256(seq.to_bytes(8, "big")).digest()
    return (seed * (UDP_SIZE // len(seed) + 1))[: UDP_SIZE - 16]


def udp_send(host: str, port: int, pps: float, seconds: float) -> None:
    """Datagrams of UDP_SIZE bytes: sequence number, send time, payload derived from the sequence number."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    seq = errors = 0
    started = time.monotonic()
    end = started + seconds
    first = time.time()
    while time.monotonic() < end:
        try:
            sock.sendto(struct.pack("!Qd", seq, time.time()) + _udp_payload(seq), (host, port))
        except OSError:
            errors += 1
        seq += 1
        started = _pace(started, seq, pps)
    _emit({"sent": seq, "send_errors": errors, "first_at": first, "done_at": time.time()})


def udp_receive(bind: str, port: int, deadline: float) -> None:
    """Count what arrives until ``deadline``: unique, duplicated, reordered, corrupted; date the gaps."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((bind, port))
    sock.settimeout(0.5)
    _emit({"ready": time.time()})
    seen = bytearray()
    sent_at = array.array("d")
    delays: list[float] = []
    duplicates = reordered = corrupted = 0
    highest = -1
    while time.time() < deadline:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except KeyboardInterrupt:  # the controller's signal that the sender is done
            break
        now = time.time()
        if len(data) != UDP_SIZE:
            corrupted += 1
            continue
        seq, stamp = struct.unpack("!Qd", data[:16])
        if data[16:] != _udp_payload(seq) or seq > 10_000_000:
            corrupted += 1
            continue
        if seq >= len(seen):
            grow = seq + 1 - len(seen) + 4096
            seen.extend(bytes(grow))
            sent_at.extend([0.0] * grow)
        if seen[seq]:
            duplicates += 1
            continue
        seen[seq] = 1
        sent_at[seq] = stamp
        delays.append(now - stamp)
        if seq < highest:
            reordered += 1
        highest = max(highest, seq)
    # Runs of lost datagrams below the highest received, dated by their received neighbours.
    lost_runs: list[list[float]] = []
    seq = 0
    while seq <= highest:
        if seen[seq]:
            seq += 1
            continue
        start = seq
        while seq <= highest and not seen[seq]:
            seq += 1
        before = sent_at[start - 1] if start > 0 else sent_at[seq]
        lost_runs.append([start, seq - 1, before, sent_at[seq]])
    delays.sort()
    _emit(
        {
            "received": sum(seen),
            "highest": highest,
            "duplicates": duplicates,
            "reordered": reordered,
            "corrupted": corrupted,
            "lost_runs": lost_runs,
            "delay_ms": {
                "median": delays[len(delays) // 2] * 1000 if delays else None,
                "p99": delays[int(len(delays) * 0.99)] * 1000 if delays else None,
                "max": delays[-1] * 1000 if delays else None,
            },
        }
    )


def worker(argv: list[str]) -> int:
    kind, *rest = argv
    if kind == "tcp-recv":
        tcp_receive(rest[0], int(rest[1]), int(rest[2]), float(rest[3]))
    elif kind == "tcp-send":
        tcp_send(rest[0], int(rest[1]), int(rest[2]), float(rest[3]), float(rest[4]))
    elif kind == "udp-recv":
        udp_receive(rest[0], int(rest[1]), float(rest[2]))
    elif kind == "udp-send":
        udp_send(rest[0], int(rest[1]), float(rest[2]), float(rest[3]))
    else:
        print(f"soak: unknown worker {kind!r}", file=sys.stderr)
        return 2
    return 0


class Worker:
    """One traffic worker in a lab namespace, its JSON lines going to a file."""

    def __init__(self, run: Any, role: str, name: str, args: list[str]) -> None:
        self.name = name
        self.path = run.workdir / f"{name}.jsonl"
        argv = [sys.executable, str(Path(__file__).resolve()), "_worker", *args]
        with open(self.path, "wb") as out, open(run.workdir / f"{name}.err", "wb") as err:
            self.proc = run.lab.popen(role, argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        self.err_path = run.workdir / f"{name}.err"

    def records(self) -> list[dict[str, Any]]:
        text = self.path.read_text() if self.path.exists() else ""
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def wait_for(self, key: str, timeout: float) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            if self.proc.poll() is not None and not any(key in r for r in self.records()):
                raise BenchError(f"{self.name} exited: {self.err_path.read_text(errors='replace')[-2000:]}")
            return next((r for r in self.records() if key in r), None)

        return overlay_module.wait_until(found, timeout, f"{self.name} to report {key!r}", 0.05)

    def result(self, timeout: float) -> dict[str, Any]:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            return {"error": f"{self.name} did not finish within {timeout:.0f} s"}
        records = self.records()
        if not records or self.proc.returncode != 0:
            stderr = self.err_path.read_text(errors="replace")[-2000:]
            return {"error": f"{self.name} exited {self.proc.returncode}: {stderr}"}
        return records[-1]


# --- process sampling ---------------------------------------------------------------------------


@dataclass
class Sample:
    at: float  # seconds since the traffic started
    rss_kib: dict[str, int]
    fds: dict[str, int]
    threads: dict[str, int]
    cpu_s: dict[str, float]


def read_process(pid: int) -> tuple[int, int, int, float] | None:
    """(VmRSS KiB, open fds, threads, user+system CPU seconds) of ``pid``, or None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if "VmRSS" not in fields:
        return None  # a zombie: it exited, its parent has not reaped it yet
    rss = int(fields["VmRSS"].split()[0])
    threads = int(fields["Threads"].strip())
    ticks = stat.rsplit(")", 1)[1].split()  # fields after the command name, from field 3 (state)
    cpu = (int(ticks[11]) + int(ticks[12])) / os.sysconf("SC_CLK_TCK")
    return rss, fds, threads, cpu


class Sampler(threading.Thread):
    """Reads /proc for the relay and both nodes every ``interval`` seconds until stopped."""

    def __init__(self, pids: dict[str, int], interval: float, origin: float) -> None:
        super().__init__(name="soak-sampler", daemon=True)
        self.pids = pids
        self.interval = interval
        self.origin = origin
        self.samples: list[Sample] = []
        self.halt = threading.Event()

    def sample(self) -> None:
        rss, fds, threads, cpu = {}, {}, {}, {}
        for name, pid in self.pids.items():
            figures = read_process(pid)
            if figures is not None:
                rss[name], fds[name], threads[name], cpu[name] = figures
        self.samples.append(Sample(round(time.time() - self.origin, 2), rss, fds, threads, cpu))

    def run(self) -> None:
        while not self.halt.is_set():
            self.sample()
            self.halt.wait(self.interval)

    def stop(self) -> None:
        self.halt.set()
        self.join(10)
        self.sample()


# --- the nodes' logs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogEvent:
    at: float
    event: str
    rest: str

    @property
    def path(self) -> str | None:
        match = re.search(r"\bpath=(\w+)", self.rest)
        return match.group(1) if match else None


def log_events(run: Any, name: str) -> list[LogEvent]:
    events = []
    for line in run.log_text(name).splitlines():
        match = _LOG_LINE.match(line)
        if match:
            events.append(LogEvent(float(match.group(1)), match.group(2), match.group(3)))
    return events


def transitions(events: list[LogEvent]) -> list[LogEvent]:
    """The ``event=path`` lines that change the path (a failed attempt logs ``path=relay`` again)."""
    changes, path = [], None
    for event in events:
        if event.event == "path" and event.path != path:
            changes.append(event)
            path = event.path
    return changes


def current_path(run: Any, name: str) -> str | None:
    paths = [e.path for e in log_events(run, name) if e.event == "path"]
    return paths[-1] if paths else None


# --- the soak ---------------------------------------------------------------------------------------


@dataclass
class Cut:
    index: int
    nat: str
    slot_at_s: float  # the slot's start, seconds since the traffic started
    at_s: float  # the cut, seconds since the traffic started
    hold_s: float
    cut_at: float = 0.0  # epoch
    lifted_at: float = 0.0
    back_at: float | None = None  # both sides confirmed direct both ways, relay released
    fell_back_s: dict[str, float | None] = field(default_factory=dict)
    resumed_s: dict[str, float | None] = field(default_factory=dict)
    returned_s: dict[str, float | None] = field(default_factory=dict)
    path_changes: int = 0  # both sides' path transitions in the window (2 each is a clean cut)
    failed_attempts: int = 0  # direct attempts that failed in the window (the rule still on), both sides
    stuck: bool = False
    late: bool = False  # the previous cut's return overran this slot's moment
    session_same: bool = True
    e2e: dict[str, str | None] = field(default_factory=dict)
    relay_forwarded_bytes: float = 0.0
    ping_sent: int = 0
    ping_lost: int = 0
    ping_outage_s: float = 0.0
    udp_lost: int = 0
    tcp_stall_s: float = 0.0
    note: str = ""

    @property
    def fell_back(self) -> bool:
        return all(self.fell_back_s.get(n) is not None for n in NODES)

    @property
    def window(self) -> tuple[float, float]:
        end = self.back_at if self.back_at is not None else self.lifted_at + STUCK_AFTER_S
        return self.cut_at - WINDOW_BEFORE_S, end + WINDOW_AFTER_S


@dataclass
class Soak:
    seed: int
    duration_s: float
    cut_every_s: float
    hold_s: tuple[float, float]
    rate_mbps: float
    udp_pps: float
    direct_retry_s: float
    warmup_s: float
    rss_bound_mib: float
    sample_every_s: float
    prefix: str = ""
    workdir: str = ""
    to_direct_s: float = 0.0
    e2e: dict[str, str] = field(default_factory=dict)
    traffic_start: float = 0.0
    traffic_end: float = 0.0
    cuts: list[Cut] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    tcp_sent: dict[str, Any] = field(default_factory=dict)
    tcp_received: dict[str, Any] = field(default_factory=dict)
    udp_sent: dict[str, Any] = field(default_factory=dict)
    udp_received: dict[str, Any] = field(default_factory=dict)
    ping: dict[str, Any] = field(default_factory=dict)
    relay_before: dict[str, float] = field(default_factory=dict)
    relay_after: dict[str, float] = field(default_factory=dict)
    final_status: dict[str, Any] = field(default_factory=dict)
    path_events: dict[str, dict[str, int]] = field(default_factory=dict)
    relay_session_ends: dict[str, int] = field(default_factory=dict)  # from the relay's log, during the traffic
    handshakes: dict[str, int] = field(default_factory=dict)
    log_problems: dict[str, list[str]] = field(default_factory=dict)
    alive_at_end: dict[str, bool] = field(default_factory=dict)
    exit_status: dict[str, int | None] = field(default_factory=dict)
    error: str | None = None


def _status_direct(status: dict[str, Any] | None) -> dict[str, Any] | None:
    peer = overlay_module.first_peer(status)
    if peer is None or peer.get("state") != "established":
        return None
    settled = (peer["path"], peer["peer_path"], peer["relay_released"]) == ("direct", "direct", True)
    return peer if settled else None


def wait_back_direct(run: Any, deadline: float) -> dict[str, dict[str, Any]] | None:
    """Wait (until ``deadline``, epoch) for both sides direct both ways with the relay released:
    first from the logs (cheap), then confirmed by ``traversal status``. None if it never happens."""
    while time.time() < deadline:
        for name in PROCESSES:
            run._check_alive(name)
        if all(current_path(run, n) == "direct" for n in NODES):
            peers = {n: _status_direct(run.status(n, n)) for n in NODES}
            if all(peers.values()):
                return {n: p for n, p in peers.items() if p is not None}
            time.sleep(0.5)
        else:
            time.sleep(0.05)
    return None


def plan_cuts(rng: random.Random, duration: float, every: float, hold: tuple[float, float]) -> list[Cut]:
    cuts = []
    for index in range(int(duration // every)):
        slot = index * every
        held = rng.uniform(*hold)
        offset = rng.uniform(0.0, max(0.0, every - held - SETTLE_ROOM_S))
        nat = rng.choice(("nat-a", "nat-b"))
        cuts.append(Cut(index + 1, nat, slot, round(slot + offset, 3), round(held, 3)))
    return cuts


def _sleep_until(moment: float) -> None:
    while (left := moment - time.time()) > 0:
        time.sleep(min(left, 0.5))


def run_cut(run: Any, soak: Soak, cut: Cut) -> None:
    moment = soak.traffic_start + cut.at_s
    if time.time() > moment + 0.5:
        cut.late = True
    forwarded = run.metrics()["traversal_relay_forwarded_bytes_total"]
    _sleep_until(moment)
    cut.cut_at = time.time()
    handle = run.insert_drop_rule(cut.nat)
    try:
        _sleep_until(cut.cut_at + cut.hold_s)
    finally:
        run.delete_rule(cut.nat, handle)
    cut.lifted_at = time.time()
    print(f"  cut {cut.index}: {cut.nat} for {cut.hold_s:.1f} s at +{cut.cut_at - soak.traffic_start:.1f} s", end="")
    time.sleep(LATE_FALLBACK_S)
    peers = wait_back_direct(run, cut.lifted_at + STUCK_AFTER_S)
    if peers is None:
        cut.stuck = True
        print(f" -> STUCK: not direct {STUCK_AFTER_S:.0f} s after the lift", flush=True)
        return
    cut.back_at = time.time()
    cut.e2e = {n: p.get("e2e_session") for n, p in peers.items()}
    cut.session_same = cut.e2e == soak.e2e
    cut.relay_forwarded_bytes = run.metrics()["traversal_relay_forwarded_bytes_total"] - forwarded
    print(f" -> direct again {cut.back_at - cut.lifted_at:.1f} s after the lift", flush=True)


def analyse_cut(run: Any, cut: Cut, events: dict[str, list[LogEvent]]) -> None:
    """Fill a cut's fall-back / resume / return times from the nodes' logs."""
    end = cut.back_at if cut.back_at is not None else cut.lifted_at + STUCK_AFTER_S
    for name in NODES:
        inside = [e for e in events[name] if cut.cut_at <= e.at <= end]
        changes = [e for e in transitions(events[name]) if cut.cut_at <= e.at <= end]
        relay = next((e.at for e in changes if e.path == "relay"), None)
        resumed = next((e.at for e in inside if e.event == "session_resumed"), None)
        direct = [e.at for e in changes if e.path == "direct" and e.at >= cut.lifted_at]
        cut.fell_back_s[name] = round(relay - cut.cut_at, 3) if relay is not None else None
        cut.resumed_s[name] = round(resumed - cut.cut_at, 3) if resumed is not None else None
        cut.returned_s[name] = round(direct[-1] - cut.lifted_at, 3) if direct and relay is not None else None
        cut.path_changes += len(changes)
        cut.failed_attempts += sum(e.event == "direct_failed" for e in inside)
    notes = [cut.note] if cut.note else []  # what the run itself noted (a stuck side that came back later)
    if cut.hold_s >= MUST_FALL_BACK_S and not cut.fell_back:
        notes.append(f"no fall-back on {[n for n in NODES if cut.fell_back_s[n] is None]} during a long cut")
    if any((cut.fell_back_s[n] is None) != (cut.fell_back_s[m] is None) for n in NODES for m in NODES):
        notes.append("only one side fell back")
    if cut.fell_back and any(cut.returned_s[n] is None for n in NODES) and not cut.stuck:
        notes.append("fell back but no return logged")
    if cut.path_changes > 4:
        notes.append(f"{cut.path_changes} path changes (flapping)")
    if cut.late:
        notes.append("late: the previous return overran this moment")
    cut.note = "; ".join(notes)


def attribute_traffic(soak: Soak, ping: Any, ping_stopped: float) -> dict[str, Any]:
    """Per cut: pings lost, the longest outage, UDP lost and the longest TCP stall inside its
    window; and what was lost outside every window (but for the requests still in flight when
    the ping was stopped: ping waits 2 s for an answer)."""
    windows = [cut.window for cut in soak.cuts]

    def inside(moment: float) -> Cut | None:
        return next((c for c in soak.cuts if c.window[0] <= moment <= c.window[1]), None)

    ping_outside = []
    missing = ping.missing()
    runs: list[list[int]] = []
    for seq in missing:
        if runs and runs[-1][-1] == seq - 1:
            runs[-1].append(seq)
        else:
            runs.append([seq])
    for run_ in runs:
        start = ping.sent_at(run_[0])
        after = ping.sent_at(run_[-1] + 1) if run_[-1] < ping.transmitted else start + len(run_) * PING_INTERVAL_S
        cut = inside(start)
        if cut is None:
            if start < ping_stopped - 2.5:
                ping_outside.extend(run_)
            continue
        cut.ping_lost += len(run_)
        cut.ping_outage_s = max(cut.ping_outage_s, round(after - start, 3))
    sent_times = [r.sent_at for r in ping.replies if not r.duplicate]
    for cut in soak.cuts:
        lo, hi = cut.window
        answered = sum(lo <= t <= hi for t in sent_times)
        cut.ping_sent = answered + cut.ping_lost
    udp_outside = 0
    for first, last, before, after in soak.udp_received.get("lost_runs", []):
        count = int(last - first + 1)
        cut = inside(before) or inside(after)
        if cut is None:
            udp_outside += count
        else:
            cut.udp_lost += count
    tcp_outside = []
    for start, end in soak.tcp_received.get("gaps", []):
        cut = inside(start) or inside(end)
        if cut is None:
            tcp_outside.append(round(end - start, 3))
        else:
            cut.tcp_stall_s = max(cut.tcp_stall_s, round(end - start, 3))
    return {
        "ping_lost_outside_cuts": len(ping_outside),
        "ping_lost_outside_seqs": ping_outside[:50],
        "udp_lost_outside_cuts": udp_outside,
        "tcp_stalls_outside_cuts_s": tcp_outside,
        "windows": [[round(lo, 3), round(hi, 3)] for lo, hi in windows],
    }


def stop_ping(ping: Any) -> Any:
    """Stop the ping and parse it; a ping killed from outside prints no summary, so count its lines."""
    try:
        return ping.stop()
    except overlay_module.OverlayError:
        text = ping.path.read_text(errors="replace")
        seqs = [int(m) for m in re.findall(r"icmp_seq=(\d+)", text)]
        summary = f"\n{max(seqs, default=0)} packets transmitted, {len(set(seqs))} received\n"
        return overlay_module.parse_ping(text + summary)


def soak_run(args: argparse.Namespace, soak: Soak, workdir: Path) -> dict[str, Any]:
    lab = lab_module.Lab(nat_a="cone", nat_b="cone")
    soak.prefix = lab.prefix
    sampler: Sampler | None = None
    try:
        lab.up()
        print(f"lab {lab.prefix} up (cone x cone); logs in {workdir}", flush=True)
        run = overlay_module.Overlay(lab, workdir, command=list(overlay_module.TRAVERSAL_PRECISE_LOG))
        for name in NODES:
            run.keygen(name)
        run.start_relay(run.write_members(list(NODES)))
        started = time.time()
        run.start_peers(["--direct-retry", str(args.direct_retry)])
        peers = {n: run.wait_status(n, n, _status_direct, SETTLE_TIMEOUT_S, "direct both ways") for n in NODES}
        soak.to_direct_s = round(time.time() - started, 3)
        soak.e2e = {n: p["e2e_session"] for n, p in peers.items()}
        print(f"direct both ways after {soak.to_direct_s:.1f} s; e2e session {soak.e2e['a']}", flush=True)
        soak.relay_before = run.metrics()

        tcp_seed = random.Random(soak.seed).getrandbits(32)
        hard_end = time.time() + args.duration + WORKER_FINISH_S + 60
        tcp_rx = Worker(
            run, "host-b", "tcp-recv", ["tcp-recv", ADDRESS["b"], str(TCP_PORT), str(tcp_seed), str(hard_end)]
        )
        udp_end = time.time() + WORKER_READY_S + args.duration + 5
        udp_rx = Worker(run, "host-a", "udp-recv", ["udp-recv", ADDRESS["a"], str(UDP_PORT), str(udp_end)])
        for receiver in (tcp_rx, udp_rx):
            receiver.wait_for("ready", WORKER_READY_S)
        pings = int(args.duration / PING_INTERVAL_S) + 100
        ping = run.start_ping("a", ADDRESS["b"], count=pings, interval=PING_INTERVAL_S, file="ping.txt")
        duration = str(args.duration)
        tcp_tx = Worker(
            run,
            "host-a",
            "tcp-send",
            ["tcp-send", ADDRESS["b"], str(TCP_PORT), str(tcp_seed), str(args.rate), duration],
        )
        udp_tx = Worker(
            run, "host-b", "udp-send", ["udp-send", ADDRESS["a"], str(UDP_PORT), str(args.udp_rate), duration]
        )
        soak.traffic_start = time.time()
        pids = {name: run.procs[name].pid for name in PROCESSES}
        sampler = Sampler(pids, args.sample_every, soak.traffic_start)
        sampler.start()
        tcp_rx.wait_for("first_byte", WORKER_READY_S)
        ping.wait_answered(3, WORKER_READY_S)
        print(f"traffic flowing: TCP a -> b at {args.rate} Mbit/s, UDP b -> a at {args.udp_rate}/s, ping", flush=True)

        try:
            for cut in soak.cuts:
                run_cut(run, soak, cut)
                if cut.stuck:
                    # Give it the rest of the run to come back, so that later slots still measure something.
                    late = wait_back_direct(run, soak.traffic_start + args.duration)
                    cut.note = "came back later" if late else "never came back"
                    if not late:
                        break
        except (overlay_module.OverlayError, lab_module.LabError) as exc:
            # A process died or a command failed: stop the traffic and report what was measured.
            soak.error = f"the run broke off: {exc}"
            gone = sorted(set(lab.namespaces) - set(lab_module.list_namespaces()))
            if gone:
                soak.error += f" (the lab's namespaces {gone} were deleted from outside this script)"
            print(f"\nsoak: {soak.error}", file=sys.stderr, flush=True)
            for sender in (tcp_tx, udp_tx):
                sender.proc.kill()

        soak.tcp_sent = tcp_tx.result(args.duration + WORKER_FINISH_S)
        soak.traffic_end = time.time()
        soak.udp_sent = udp_tx.result(WORKER_FINISH_S)
        soak.tcp_received = tcp_rx.result(WORKER_FINISH_S)
        time.sleep(1.0)  # the last datagrams in flight
        udp_rx.proc.send_signal(signal.SIGINT)
        soak.udp_received = udp_rx.result(WORKER_FINISH_S)
        ping_stopped = time.time()
        ping_result = stop_ping(ping)
        sampler.stop()
        soak.samples = sampler.samples
        soak.alive_at_end = {name: run.procs[name].poll() is None for name in PROCESSES}
        try:
            soak.relay_after = run.metrics()
        except lab_module.LabError as exc:
            soak.error = (soak.error or "") + f"; no relay metrics at the end: {exc}"
        soak.final_status = {n: overlay_module.first_peer(run.status(n, n)) or {} for n in NODES}
        events = {n: log_events(run, n) for n in NODES}
        for cut in soak.cuts:
            if cut.cut_at:
                analyse_cut(run, cut, events)
        soak.path_events = {
            n: {
                "to_relay": sum(e.path == "relay" for e in transitions(events[n])),
                "to_direct": sum(e.path == "direct" for e in transitions(events[n])),
                "failed_attempts": sum(e.event == "direct_failed" for e in events[n]),
                "session_resumed": sum(e.event == "session_resumed" for e in events[n]),
                "resume_failed": sum(e.event in ("resume_failed", "resume_refused") for e in events[n]),
            }
            for n in NODES
        }
        relay_events = [e for e in log_events(run, "relay") if soak.traffic_start <= e.at <= soak.traffic_end]
        soak.relay_session_ends = {
            kind: sum(e.event == kind for e in relay_events) for kind in ("released", "peer_left")
        }
        soak.handshakes = {n: sum(e.event == "handshake_done" for e in events[n]) for n in NODES}
        for name in PROCESSES:
            lines = run.log_text(name).splitlines()
            soak.log_problems[name] = [
                line[:300] for line in lines if "Traceback" in line or " ERROR " in line or " CRITICAL " in line
            ][:20]
        soak.ping = {
            "sent": ping_result.transmitted,
            "received": ping_result.received,
            "duplicates": ping_result.duplicates,
        }
        attribution = attribute_traffic(soak, ping_result, ping_stopped)
        for name in ("a", "b", "relay"):
            soak.exit_status[name] = run.stop(name)
        return attribution
    finally:
        if sampler is not None and sampler.is_alive():
            sampler.halt.set()
        lab.down()


# --- verdicts and report ------------------------------------------------------------------------------


def memory_summary(soak: Soak) -> dict[str, dict[str, Any]]:
    summary = {}
    for name in PROCESSES:
        series = [
            (s.at, s.rss_kib[name], s.fds.get(name), s.threads.get(name)) for s in soak.samples if name in s.rss_kib
        ]
        if not series:
            continue
        warm = [x for x in series if x[0] <= soak.warmup_s] or series[:1]
        after = [x for x in series if x[0] >= warm[-1][0]]
        rss_warm, fds_warm = warm[-1][1], warm[-1][2]
        # Least-squares slope of RSS after the warm-up, in MiB per minute.
        slope = None
        if len(after) >= 3:
            xs = [x[0] for x in after]
            ys = [x[1] / 1024 for x in after]
            mx, my = statistics.fmean(xs), statistics.fmean(ys)
            var = sum((x - mx) ** 2 for x in xs)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var * 60 if var else None
        cpu = [s.cpu_s[name] for s in soak.samples if name in s.cpu_s]
        span = soak.samples[-1].at - soak.samples[0].at if len(soak.samples) > 1 else 0
        summary[name] = {
            "rss_start_mib": round(series[0][1] / 1024, 1),
            "rss_after_warmup_mib": round(rss_warm / 1024, 1),
            "rss_max_mib": round(max(x[1] for x in series) / 1024, 1),
            "rss_end_mib": round(series[-1][1] / 1024, 1),
            "growth_after_warmup_mib": round((max(x[1] for x in after) - rss_warm) / 1024, 1),
            "end_minus_start_mib": round((series[-1][1] - series[0][1]) / 1024, 1),
            "slope_mib_per_min": round(slope, 3) if slope is not None else None,
            # If the growth went on at that slope: minutes until the bound (a hint, not a verdict).
            "bound_after_min": round(soak.rss_bound_mib / slope) if slope and slope > 0 else None,
            "fds_start": series[0][2],
            "fds_after_warmup": fds_warm,
            "fds_max": max(x[2] or 0 for x in series),
            "fds_end": series[-1][2],
            "threads_max": max(x[3] or 0 for x in series),
            "cpu_percent": round(100 * (cpu[-1] - cpu[0]) / span, 1) if len(cpu) > 1 and span else None,
        }
    return summary


def _stats(values: list[float]) -> dict[str, float | None]:
    return {
        "median": round(median(values), 3) if values else None,
        "max": round(max(values), 3) if values else None,
        "min": round(min(values), 3) if values else None,
        "n": len(values),
    }


def pair_time(values: dict[str, float | None]) -> float | None:
    """The pair's figure for a switch: the later side (only then has the pair switched)."""
    present = [v for v in values.values() if v is not None]
    return max(present) if len(present) == len(NODES) else None


def verdicts(soak: Soak, memory: dict[str, dict[str, Any]]) -> list[tuple[str, bool, str]]:
    sent, received = soak.tcp_sent, soak.tcp_received
    intact = (
        not sent.get("error")
        and not received.get("error")
        and sent.get("bytes") == received.get("bytes")
        and sent.get("sha256") == received.get("sha256")
        and received.get("first_mismatch") is None
    )
    tcp_text = (
        f"{sent.get('bytes', 0) / MIB:.1f} MiB sent, {received.get('bytes', 0) / MIB:.1f} MiB received; "
        f"SHA-256 {'equal' if sent.get('sha256') and sent.get('sha256') == received.get('sha256') else 'DIFFERENT'}"
        + (f"; first wrong byte at offset {received['first_mismatch']}" if received.get("first_mismatch") else "")
        + (f"; sender error: {sent['error']}" if sent.get("error") else "")
        + (f"; receiver error: {received['error']}" if received.get("error") else "")
    )
    udp = soak.udp_received
    udp_ok = udp.get("corrupted", 1) == 0 and not udp.get("error")
    udp_text = f"{udp.get('corrupted', '?')} corrupted of {udp.get('received', '?')} received" + (
        f"; {udp['error']}" if udp.get("error") else ""
    )
    stuck = [c.index for c in soak.cuts if c.stuck]
    not_done = [c.index for c in soak.cuts if not c.cut_at]
    renewed = [c.index for c in soak.cuts if c.back_at is not None and not c.session_same]
    final_e2e = {n: (soak.final_status.get(n) or {}).get("e2e_session") for n in NODES}
    same = not renewed and final_e2e == soak.e2e and all(h == 1 for h in soak.handshakes.values())
    missed = [c.index for c in soak.cuts if c.cut_at and c.hold_s >= MUST_FALL_BACK_S and not c.fell_back]
    alive = all(soak.alive_at_end.values()) and not any(soak.log_problems.values())
    rss_fail = [n for n, m in memory.items() if m["growth_after_warmup_mib"] >= soak.rss_bound_mib]
    fd_fail = [n for n, m in memory.items() if (m["fds_max"] or 0) - (m["fds_after_warmup"] or 0) > FD_BOUND]
    growth = ", ".join(f"{n} {m['growth_after_warmup_mib']:+.1f}" for n, m in memory.items())
    fds = ", ".join(f"{n} {m['fds_after_warmup']} -> max {m['fds_max']}" for n, m in memory.items())
    return [
        ("TCP stream intact end to end (bytes and SHA-256 equal, every byte verified)", intact, tcp_text),
        ("UDP datagrams uncorrupted", udp_ok, udp_text),
        (
            f"no stuck session (each cut: direct both ways again within {STUCK_AFTER_S:.0f} s of the lift)",
            not stuck and not not_done,
            f"{len(soak.cuts) - len(stuck) - len(not_done)}/{len(soak.cuts)} cuts returned"
            + (f"; stuck: cuts {stuck}" if stuck else "")
            + (f"; not run: cuts {not_done}" if not_done else ""),
        ),
        (
            "the same end-to-end session throughout (no renewal, one handshake)",
            same,
            f"e2e {soak.e2e.get('a')} at start, {final_e2e.get('a')} at end; handshakes {soak.handshakes}"
            + (f"; renewed at cuts {renewed}" if renewed else ""),
        ),
        (
            f"every cut of >= {MUST_FALL_BACK_S:.0f} s made both sides fall back to the relay",
            not missed,
            f"missed: cuts {missed}" if missed else "all did",
        ),
        (
            "relay and nodes alive to the end, no traceback or ERROR in their logs",
            alive,
            f"alive {soak.alive_at_end}; exit on SIGINT {soak.exit_status}"
            + "".join(f"; {n}: {len(p)} problem lines" for n, p in soak.log_problems.items() if p),
        ),
        (
            f"RSS growth after the warm-up < {soak.rss_bound_mib:.0f} MiB per process",
            not rss_fail,
            f"MiB: {growth}",
        ),
        (f"open fds after the warm-up grow by <= {FD_BOUND} per process", not fd_fail, fds),
    ]


def _fmt(value: float | None, unit: str = "s", digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f} {unit}".strip()


def summary(soak: Soak, memory: dict[str, Any], attribution: dict[str, Any], checks: list[Any]) -> dict[str, Any]:
    done = [c for c in soak.cuts if c.cut_at]
    fell = [c for c in done if c.fell_back]
    fall_back = [t for c in fell if (t := pair_time(c.fell_back_s)) is not None]
    resumed = [t for c in fell if (t := pair_time(c.resumed_s)) is not None]
    returned = [t for c in fell if (t := pair_time(c.returned_s)) is not None]
    back = [c.back_at - c.lifted_at for c in done if c.back_at is not None]
    forwarded = soak.relay_after.get("traversal_relay_forwarded_bytes_total", 0) - soak.relay_before.get(
        "traversal_relay_forwarded_bytes_total", 0
    )
    seconds = soak.traffic_end - soak.traffic_start
    return {
        "passed": all(ok for _, ok, _ in checks),
        "checks": [{"check": name, "ok": ok, "detail": detail} for name, ok, detail in checks],
        "traffic_s": round(seconds, 1),
        "cuts": len(done),
        "cuts_fell_back": len(fell),
        "cuts_stuck": sum(c.stuck for c in done),
        "fall_back_s": _stats(fall_back),
        "resumed_on_relay_s": _stats(resumed),
        "return_to_direct_s": _stats(returned),
        "lift_to_confirmed_direct_s": _stats(back),
        "ping_lost_per_cut": _stats([c.ping_lost for c in done]),
        "ping_outage_per_cut_s": _stats([c.ping_outage_s for c in done]),
        "udp_lost_per_cut": _stats([c.udp_lost for c in done]),
        "tcp_stall_per_cut_s": _stats([c.tcp_stall_s for c in done]),
        "tcp_mbps": round(soak.tcp_received.get("bytes", 0) * 8 / seconds / 1e6, 2) if seconds > 0 else None,
        "relay_forwarded_bytes": forwarded,
        "relay_forwarded_frames": soak.relay_after.get("traversal_relay_forwarded_frames_total", 0)
        - soak.relay_before.get("traversal_relay_forwarded_frames_total", 0),
        "relay_sessions_created": soak.relay_after.get("traversal_relay_sessions_created_total", 0)
        - soak.relay_before.get("traversal_relay_sessions_created_total", 0),
        "relay_releases": soak.relay_after.get("traversal_relay_releases_total", 0)
        - soak.relay_before.get("traversal_relay_releases_total", 0),
        "relay_session_ends": soak.relay_session_ends,
        "relay_at_end": {
            key: soak.relay_after.get(f"traversal_relay_{key}")
            for key in ("clients_connected", "sessions_active", "connections_open")
        },
        "path_events": soak.path_events,
        "memory": memory,
        **attribution,
    }


def render(soak: Soak, figures: dict[str, Any], context: Context) -> str:
    memory = figures["memory"]
    udp_sent, udp = soak.udp_sent, soak.udp_received
    delay = udp.get("delay_ms") or {}
    udp_lost = (udp_sent.get("sent", 0) - udp.get("received", 0)) if udp_sent and udp else None
    lines = [
        "# Soak: traffic through the overlay, with the direct path cut at random",
        "",
        "Generated by `bench/soak.py` (its docstring says what is measured and how). One cone x cone lab, the",
        f"relay and two nodes (lean carriage, direct allowed, `--direct-retry {soak.direct_retry_s:g}`), "
        f"{soak.duration_s:.0f} s of traffic across",
        f"the TAP overlay: TCP a -> b at ~{soak.rate_mbps:g} Mbit/s (a seeded pseudo-random stream, SHA-256 on both "
        "ends, every byte",
        f"compared), UDP b -> a at {soak.udp_pps:g} datagrams/s of {UDP_SIZE} B, ping a -> b every "
        f"{PING_INTERVAL_S} s. Every {soak.cut_every_s:g} s, at a",
        f"random moment, UDP is dropped at nat-a or nat-b (nftables) for {soak.hold_s[0]:g}-{soak.hold_s[1]:g} s. "
        f"Seed **{soak.seed}** (`--seed {soak.seed}`",
        "replays the schedule). Other work may share this machine: mind the load average.",
        "",
        *context.markdown(),
        f"- lab prefix {soak.prefix}; pair direct {soak.to_direct_s:.1f} s after the nodes started; "
        f"e2e session {soak.e2e.get('a')}",
        "",
        f"## Verdict: {'PASS' if figures['passed'] else 'FAIL'}",
        "",
        "| check | result | detail |",
        "|---|---|---|",
    ]
    for check in figures["checks"]:
        lines.append(f"| {check['check']} | {'PASS' if check['ok'] else '**FAIL**'} | {check['detail']} |")
    sent = soak.tcp_sent
    received = soak.tcp_received
    lines += [
        "",
        "## Data",
        "",
        f"- TCP a -> b: {sent.get('bytes', 0):,} bytes sent, {received.get('bytes', 0):,} received "
        f"({figures['tcp_mbps']} Mbit/s over {figures['traffic_s']:.0f} s)",
        f"  - sender SHA-256   `{sent.get('sha256')}`",
        f"  - receiver SHA-256 `{received.get('sha256')}`",
        f"  - delivery pauses > {TCP_GAP_S} s: {len(received.get('gaps', []))}, of which outside every cut "
        f"window: {len(figures['tcp_stalls_outside_cuts_s'])} {figures['tcp_stalls_outside_cuts_s'] or ''}",
        f"- UDP b -> a: {udp_sent.get('sent', '?')} sent, {udp.get('received', '?')} received, "
        f"{udp_lost if udp_lost is not None else '?'} lost ({figures['udp_lost_outside_cuts']} outside every cut "
        f"window), {udp.get('duplicates', '?')} duplicated, {udp.get('reordered', '?')} reordered, "
        f"{udp.get('corrupted', '?')} corrupted; one-way delay median "
        f"{_fmt(delay.get('median'), 'ms')}, p99 {_fmt(delay.get('p99'), 'ms')}, max {_fmt(delay.get('max'), 'ms')}",
        f"- ping a -> b: {soak.ping.get('sent')} sent, {soak.ping.get('received')} answered, "
        f"{soak.ping.get('duplicates')} duplicates; {figures['ping_lost_outside_cuts']} lost outside every cut window",
        f"- relay: {figures['relay_forwarded_bytes'] / 1e6:.1f} MB ({figures['relay_forwarded_frames']:.0f} frames) "
        f"forwarded during the run; {figures['relay_sessions_created']:.0f} relay sessions created, "
        f"ended by the release of both directions {soak.relay_session_ends.get('released', 0)}, by the "
        f"departure of one side's relay connection (`peer_left`) {soak.relay_session_ends.get('peer_left', 0)}; "
        f"at the end {figures['relay_at_end']}",
        "- path changes (whole run, start-up included): "
        + "; ".join(
            f"{n}: {e['to_relay']} to relay, {e['to_direct']} to direct, {e['failed_attempts']} failed direct "
            f"attempts, {e['session_resumed']} sessions resumed on the relay, {e['resume_failed']} resume failures"
            for n, e in figures["path_events"].items()
        ),
        "",
        "## Cuts",
        "",
        "A cut's window runs from 0.3 s before the rule to 1 s after both sides are confirmed direct again.",
        "Pair figures are the later side's. Fall-back: cut -> `path=relay`; on relay: cut -> `session_resumed`;",
        "return: lift -> `path=direct` (validated both ways); confirmed: lift -> `traversal status` shows both",
        "direct both ways with the relay released (an upper bound: the script first waits 1.5 s for a late",
        "fall-back, then polls).",
        "",
        "| | median | max | min | n |",
        "|---|---|---|---|---|",
    ]
    for key, label in (
        ("fall_back_s", "cut -> fall-back to the relay (s)"),
        ("resumed_on_relay_s", "cut -> session resumed on the relay (s)"),
        ("return_to_direct_s", "lift -> back on direct (s)"),
        ("lift_to_confirmed_direct_s", "lift -> confirmed by status (s)"),
        ("ping_lost_per_cut", "pings lost per cut"),
        ("ping_outage_per_cut_s", "longest ping outage per cut (s)"),
        ("udp_lost_per_cut", "UDP datagrams lost per cut"),
        ("tcp_stall_per_cut_s", "longest TCP delivery pause per cut (s)"),
    ):
        s = figures[key]
        cells = " | ".join("-" if s[k] is None else f"{s[k]:g}" for k in ("median", "max", "min"))
        lines.append(f"| {label} | {cells} | {s['n']} |")
    lines += [
        "",
        "| # | at (s) | side | hold (s) | fall-back a / b (s) | on relay (s) | return a / b (s) | confirmed (s) "
        "| pings lost | outage (s) | UDP lost | TCP pause (s) | relay kB | session | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in soak.cuts:
        if not c.cut_at:
            lines.append(f"| {c.index} | {c.at_s:.1f} | {c.nat} | {c.hold_s:.1f} | not run | | | | | | | | | | |")
            continue
        fb = " / ".join(_fmt(c.fell_back_s.get(n), "") for n in NODES)
        ret = " / ".join(_fmt(c.returned_s.get(n), "") for n in NODES)
        confirmed = _fmt(c.back_at - c.lifted_at, "") if c.back_at is not None else "**stuck**"
        lines.append(
            f"| {c.index} | {c.cut_at - soak.traffic_start:.1f} | {c.nat} | {c.hold_s:.1f} | {fb} "
            f"| {_fmt(pair_time(c.resumed_s), '')} | {ret} | {confirmed} | {c.ping_lost}/{c.ping_sent} "
            f"| {c.ping_outage_s:.1f} | {c.udp_lost} | {c.tcp_stall_s:.1f} | {c.relay_forwarded_bytes / 1000:.0f} "
            f"| {'same' if c.session_same else '**renewed**'} | {c.note} |"
        )
    lines += [
        "",
        "## Processes",
        "",
        f"Sampled every {soak.sample_every_s:g} s from /proc ({len(soak.samples)} samples). Warm-up: the first "
        f"{soak.warmup_s:.0f} s. Bound: RSS after the",
        f"warm-up stays below the warm-up value + {soak.rss_bound_mib:.0f} MiB, open fds below it + {FD_BOUND}. "
        "The slope is a least-squares",
        "fit of RSS after the warm-up (with, were it to go on, the time to reach the bound); CPU is user + system",
        "time over the run. asyncio tasks are not sampled (not visible from outside the processes).",
        "",
        "| process | RSS start | after warm-up | max | end | growth after warm-up | slope "
        "| fds start / warm-up / max / end | threads max | CPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in memory.items():
        slope = f"{m['slope_mib_per_min']:+.2f} MiB/min" if m["slope_mib_per_min"] is not None else "-"
        if m["bound_after_min"] is not None:
            slope += f" (bound in ~{m['bound_after_min']} min)"
        lines.append(
            f"| {name} | {m['rss_start_mib']:.1f} MiB | {m['rss_after_warmup_mib']:.1f} MiB "
            f"| {m['rss_max_mib']:.1f} MiB "
            f"| {m['rss_end_mib']:.1f} MiB | {m['growth_after_warmup_mib']:+.1f} MiB | {slope} "
            f"| {m['fds_start']} / {m['fds_after_warmup']} / {m['fds_max']} / {m['fds_end']} | {m['threads_max']} "
            f"| {_fmt(m['cpu_percent'], '%', 1)} |"
        )
    if any(soak.log_problems.values()):
        lines += ["", "## Problem lines in the logs", ""]
        for name, problems in soak.log_problems.items():
            lines += [f"- {name}: `{p}`" for p in problems]
    if soak.error:
        lines += ["", "## Error", "", soak.error]
    return "\n".join(lines)


def document(soak: Soak, figures: dict[str, Any], context: Context) -> dict[str, Any]:
    config = {
        key: getattr(soak, key)
        for key in (
            "seed",
            "duration_s",
            "cut_every_s",
            "hold_s",
            "rate_mbps",
            "udp_pps",
            "direct_retry_s",
            "warmup_s",
            "rss_bound_mib",
            "sample_every_s",
        )
    }
    config.update({"stuck_after_s": STUCK_AFTER_S, "fd_bound": FD_BOUND, "ping_interval_s": PING_INTERVAL_S})
    cuts = []
    for c in soak.cuts:
        entry = asdict(c)
        entry["cut_at_s"] = round(c.cut_at - soak.traffic_start, 3) if c.cut_at else None
        entry["lift_to_confirmed_s"] = round(c.back_at - c.lifted_at, 3) if c.back_at is not None else None
        cuts.append(entry)
    return {
        **context.as_dict(),
        "config": config,
        "prefix": soak.prefix,
        "to_direct_s": soak.to_direct_s,
        "e2e_session": soak.e2e,
        "summary": figures,
        "tcp": {"sent": soak.tcp_sent, "received": soak.tcp_received},
        "udp": {"sent": soak.udp_sent, "received": soak.udp_received},
        "ping": soak.ping,
        "cuts": cuts,
        "samples": [asdict(s) for s in soak.samples],
        "error": soak.error,
    }


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        return worker(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600, help="seconds of traffic (default 600)")
    parser.add_argument("--cut-every", type=float, default=30, help="one cut per this many seconds (default 30)")
    parser.add_argument("--hold", default="3-12", help="cut duration range in seconds, MIN-MAX (default 3-12)")
    parser.add_argument("--seed", type=int, default=None, help="the schedule's seed (default: a random one)")
    parser.add_argument("--rate", type=float, default=30, help="TCP rate a -> b in Mbit/s (default 30)")
    parser.add_argument("--udp-rate", type=float, default=100, help="UDP datagrams/s b -> a (default 100)")
    parser.add_argument("--direct-retry", type=float, default=2, help="the nodes' --direct-retry (default 2)")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up seconds (default two slots)")
    parser.add_argument("--rss-bound", type=float, default=20, help="MiB of RSS growth after warm-up (default 20)")
    parser.add_argument("--sample-every", type=float, default=2, help="seconds between /proc samples (default 2)")
    parser.add_argument("--keep", action="store_true", help="keep the logs' directory even when everything passed")
    parser.add_argument("--out", type=Path, default=BENCH / "soak.md", help="Markdown report")
    parser.add_argument("--json", type=Path, default=BENCH / "soak.json", help="JSON figures")
    args = parser.parse_args()
    try:
        low, high = (float(x) for x in args.hold.split("-"))
    except ValueError:
        parser.error("--hold takes MIN-MAX seconds, e.g. 3-12")
    if not 0 < low <= high or args.duration < args.cut_every or args.cut_every <= 0 or args.rate <= 0:
        parser.error("need 0 < hold MIN <= MAX, --cut-every > 0, --duration >= --cut-every and --rate > 0")
    try:
        lab_module.check_prerequisites()
    except lab_module.LabError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 1
    seed = args.seed if args.seed is not None else secrets.randbelow(1 << 31)
    warmup = args.warmup if args.warmup is not None else min(2 * args.cut_every, args.duration / 3)
    soak = Soak(
        seed=seed,
        duration_s=args.duration,
        cut_every_s=args.cut_every,
        hold_s=(low, high),
        rate_mbps=args.rate,
        udp_pps=args.udp_rate,
        direct_retry_s=args.direct_retry,
        warmup_s=warmup,
        rss_bound_mib=args.rss_bound,
        sample_every_s=args.sample_every,
    )
    soak.cuts = plan_cuts(random.Random(seed), args.duration, args.cut_every, (low, high))
    print(f"soak: {args.duration:.0f} s, {len(soak.cuts)} cuts, seed {seed}", flush=True)
    context = Context()
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    soak.workdir = str(workdir)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    try:
        attribution = soak_run(args, soak, workdir)
    except KeyboardInterrupt:
        print(f"soak: interrupted; the lab is down, logs in {workdir}", file=sys.stderr)
        return 130
    except (BenchError, lab_module.LabError, overlay_module.OverlayError) as exc:
        print(f"soak: {exc} (logs in {workdir})", file=sys.stderr)
        return 1
    context.finish()
    memory = memory_summary(soak)
    checks = verdicts(soak, memory)
    figures = summary(soak, memory, attribution, checks)
    report = render(soak, figures, context)
    args.out.write_text(report + "\n")
    write_json(args.json, document(soak, figures, context))
    print(f"\nwrote {args.out} and {args.json}\n")
    verdict = report.splitlines().index(f"## Verdict: {'PASS' if figures['passed'] else 'FAIL'}")
    print("\n".join(report.splitlines()[verdict : verdict + len(checks) + 4]))
    if figures["passed"] and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"logs kept in {workdir}")
    return 0 if figures["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
