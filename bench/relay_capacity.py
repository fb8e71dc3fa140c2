"""Relay capacity: how many idle authenticated clients one relay process holds, and how fast it pairs.

Starts ONE real relay (``python -m traversal relay``, wss:// with its self-signed certificate,
on 127.0.0.1) and drives it from worker processes (multiprocessing, one asyncio loop each) that
log in with the node's own code, ``traversal.relay_client.connect_relay`` (TCP, TLS, WebSocket,
HELLO / CHALLENGE / Ed25519-signed AUTH / AUTH_OK). Every identity is generated here and listed
in the relay's members files, so every login is a real one.

1. Idle clients. N clients (``--clients``, default 10,000), each the only member of its own
   network (``--idle-network-size`` groups them; a network is a full mesh, so larger networks
   add relay sessions), log in in steps (10, 20, 50, 100 % of N) and then stay idle the way a
   node does: websockets answers the relay's keepalive pings (every 20 s) and sends its own
   (every 15 s). Per step: logins/s and login latency, the relay's CPU during the logins, then,
   after a quiet window, its RSS (VmRSS), the memory per client ((RSS - RSS at 0 clients) /
   clients) and its idle CPU (keepalives only). At the end /metrics must count N clients.
2. Session set-ups. M pairs (``--setups``, default 200), each in its own two-member network,
   ``--concurrency`` pairs in flight: both ends log in, get PEER_JOINED, run the end-to-end
   handshake through the relay with the node's ``PeerLink`` (transport/handshake.py: X25519 +
   ML-KEM-768, SIGMA-I), send READY and wait for ESTABLISHED; both ends must derive the same
   session. Reported: set-ups/s, median and p95 time per set-up, the relay's CPU seconds per
   set-up (/proc/PID/stat) and the bytes it forwarded per set-up (/metrics). The pairs stay
   connected until the phase is measured; their teardown is measured on its own.

The relay prepares its own process (relay_server/resources.py): it raises its soft limit on open
files to the hard limit and sets asyncio's per-connection TLS read buffer to 32 KiB. The bench
starts it with a soft limit of 1024, as systemd starts a service, and checks the
``max_open_files`` its ``relay_listening`` line reports. ``--relay-nofile N`` imposes a lower hard
limit instead, to see the limit bite; ``--relay-ssl-read-buffer BYTES`` runs the relay with another
TLS read buffer (262144: asyncio's stock one).

The relay and the clients share this machine's cores. The workers run at a lower priority
(``--worker-nice``) so the relay gets a whole core whenever it can use one; the report gives
the relay's CPU use during each phase, which tells a relay-bound result from a client-bound one.

Writes ``bench/relay_capacity.md`` (``--out``) and ``bench/relay_capacity.json`` (``--json``: the
figures, a headline and the summary that bench/results.py puts in bench/results.md). Run from the
repository; root is only needed to raise the file-descriptor hard limit for the client workers:
``.venv/bin/python bench/relay_capacity.py [--clients 10000] [--setups 200] [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import functools
import json
import math
import multiprocessing
import os
import re
import resource
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import cryptography
import websockets
from common import BENCH, BenchError, Context, median, p95, write_json
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from websockets.protocol import State

from relay_server.resources import TLS_READ_BUFFER
from transport import frames
from transport.constants import (
    MAX_FRAME_SIZE,
    RECONNECT_INITIAL_DELAY,
    RECONNECT_JITTER,
    RELAY_KEEPALIVE_INTERVAL,
)
from transport.identity import encode_public
from traversal.config import MAX_CONFIG_SIZE
from traversal.peer import LinkState, PeerLink
from traversal.relay_client import LOGIN_TIMEOUT, RelayLink, client_ssl_context, connect_relay

CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1

#: A set-up (two logins, handshake, ESTABLISHED) that takes longer than this failed.
SETUP_TIMEOUT_S = 30.0
#: The relay reads one members file per network before it listens.
RELAY_START_TIMEOUT_S = 60.0
#: SIGTERM makes the relay tell every client and wait for its handlers (bounded by its own grace).
RELAY_STOP_TIMEOUT_S = 30.0
#: File descriptors the client workers need beyond one per connection (interpreter, pipes, ...).
FD_MARGIN = 1024
#: The relay's own file descriptors beyond one per client (listening socket, log, epoll, /metrics...).
RELAY_FD_SPARE = 64
#: The soft open-files limit the relay is started with: systemd's default for a service
#: (DefaultLimitNOFILE=1024:524288). The relay raises it to the hard limit itself.
RELAY_START_SOFT_NOFILE = 1024
#: How long the relay may take to notice that closed clients are gone.
DRAIN_TIMEOUT_S = 60.0
#: asyncio's stock per-connection TLS read buffer (asyncio.sslproto.SSLProtocol.max_size, Python 3.11+);
#: the relay sets its own, relay_server.resources.TLS_READ_BUFFER.
ASYNCIO_TLS_READ_BUFFER = 256 * 1024
#: What an idle client cost the relay with asyncio's stock buffer, for the report's comparison (293.6 KiB at
#: 10,000 clients); run ``--relay-ssl-read-buffer 262144 --setups 0`` to measure it again.
STOCK_BUFFER_KIB_PER_CLIENT = 294
STOCK_BUFFER_MEASURED = "at 10,000 clients on 2026-11-27"
#: glibc malloc's initial mmap threshold: larger blocks are mmapped (and unmapped when freed), smaller come
#: from the heap. It rises to the size of a freed mmapped block, up to 32 MiB (mallopt(3), M_MMAP_THRESHOLD).
GLIBC_MMAP_THRESHOLD = 128 * 1024


class SetupFailed(Exception):
    """One session set-up went wrong (a data point, not a reason to stop)."""


def _die_with_parent() -> None:
    """Linux: have the kernel kill this process if the bench dies without cleaning up."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _describe(exc: BaseException) -> str:
    """A short, stable text for counting failures by kind."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", str(exc))
    return f"{type(exc).__name__}: {text}"[:160]


# --- client workers (child processes) -------------------------------------------------------


def _worker_main(conn: Connection, url: str, ca: str, nice: int) -> None:
    """Entry point of a worker process: serve the coordinator's commands until "exit" or EOF."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator decides when we stop
    if nice:
        os.nice(nice)
    asyncio.run(_ClientWorker(conn, url, Path(ca)).serve())


class _ClientWorker:
    """Thousands of relay clients on one asyncio loop; commands arrive on a multiprocessing pipe."""

    def __init__(self, conn: Connection, url: str, ca: Path) -> None:
        self._conn = conn
        self._url = url
        self._ssl = client_ssl_context(ca)
        self._idle: list[RelayLink] = []
        self._paired: list[RelayLink] = []

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    command, kwargs = await loop.run_in_executor(None, self._conn.recv)
                except (EOFError, OSError):
                    return
                if command == "exit":
                    return
                try:
                    result = await getattr(self, f"cmd_{command}")(**kwargs)
                except Exception:
                    self._conn.send(("error", traceback.format_exc()))
                else:
                    self._conn.send(("ok", result))
        finally:
            await self._close(self._idle + self._paired, 200)

    async def _login(self, network: str, seed: bytes) -> RelayLink:
        identity = Ed25519PrivateKey.from_private_bytes(seed)
        return await connect_relay(self._url, ssl_context=self._ssl, network=network, identity=identity)

    async def cmd_login(self, clients: list[tuple[str, bytes]], concurrency: int) -> dict[str, Any]:
        """Log every (network, seed) in, at most ``concurrency`` at a time, and keep them connected."""
        loop = asyncio.get_running_loop()
        semaphore = asyncio.Semaphore(concurrency)
        latencies: list[float] = []
        errors: Counter[str] = Counter()

        async def one(network: str, seed: bytes) -> None:
            async with semaphore:
                started = loop.time()
                try:
                    link = await self._login(network, seed)
                except Exception as exc:
                    errors[_describe(exc)] += 1
                    return
                latencies.append(loop.time() - started)
                self._idle.append(link)

        await asyncio.gather(*(one(network, seed) for network, seed in clients))
        return {"latencies": latencies, "errors": dict(errors)}

    async def cmd_status(self) -> dict[str, Any]:
        """How many idle clients are still open, and how the others were closed."""
        closed: Counter[str] = Counter()
        for link in self._idle:
            if link.ws.state is not State.OPEN:
                closed[f"close code {link.ws.close_code}"] += 1
        return {"open": len(self._idle) - sum(closed.values()), "closed": dict(closed)}

    async def cmd_close_idle(self) -> int:
        count = len(self._idle)
        await self._close(self._idle, 200)
        return count

    async def cmd_close_paired(self) -> int:
        count = len(self._paired)
        await self._close(self._paired, 200)
        return count

    @staticmethod
    async def _close(links: list[RelayLink], concurrency: int) -> None:
        """Close cleanly (WebSocket close handshake), bounded; abort what does not close in time."""
        semaphore = asyncio.Semaphore(concurrency)

        async def one(link: RelayLink) -> None:
            async with semaphore:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(5):
                        await link.close()
                if link.ws.state is not State.CLOSED:
                    link.ws.transport.abort()

        await asyncio.gather(*(one(link) for link in links))
        links.clear()

    async def cmd_setups(self, pairs: list[tuple[str, bytes, bytes]], concurrency: int) -> list[dict[str, float] | str]:
        """Run each pair's set-up, ``concurrency`` at a time; a result is its timings or why it failed."""
        semaphore = asyncio.Semaphore(concurrency)

        async def one(network: str, seed_a: bytes, seed_b: bytes) -> dict[str, float] | str:
            async with semaphore:
                try:
                    return await self._setup(network, seed_a, seed_b)
                except Exception as exc:
                    return _describe(exc)

        return list(await asyncio.gather(*(one(*pair) for pair in pairs)))

    async def _setup(self, network: str, seed_a: bytes, seed_b: bytes) -> dict[str, float]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        keys = [Ed25519PrivateKey.from_private_bytes(seed) for seed in (seed_a, seed_b)]
        async with asyncio.timeout(SETUP_TIMEOUT_S):
            logins = await asyncio.gather(
                *(self._login(network, seed) for seed in (seed_a, seed_b)), return_exceptions=True
            )
            links = [link for link in logins if isinstance(link, RelayLink)]
            self._paired.extend(links)  # closed by close_paired, once the phase is measured
            for outcome in logins:
                if isinstance(outcome, BaseException):
                    raise outcome
            logged_in = loop.time()
            async with asyncio.TaskGroup() as group:
                ends = [
                    group.create_task(_establish(link, key, network)) for link, key in zip(links, keys, strict=True)
                ]
        done = loop.time()
        if ends[0].result().session_tag != ends[1].result().session_tag:
            raise SetupFailed("the two ends derived different session keys")
        return {"total": done - started, "login": logged_in - started, "handshake": done - logged_in}


async def _establish(link: RelayLink, identity: Ed25519PrivateKey, network: str) -> PeerLink:
    """One end of a set-up, as a node runs it: PEER_JOINED, handshake frames, READY, ESTABLISHED."""
    loop = asyncio.get_running_loop()
    peer: PeerLink | None = None
    while peer is None or peer.state is not LinkState.ESTABLISHED:
        message = await link.ws.recv()
        if isinstance(message, str):
            raise SetupFailed("the relay sent a text message")
        frame = frames.decode(message)
        now = loop.time()
        out: list[bytes] = []
        if isinstance(frame, frames.PeerJoined):
            if peer is not None:
                raise SetupFailed("a second PEER_JOINED in a two-member network")
            peer = PeerLink(
                session_id=frame.session_id,
                peer=frame.peer,
                identity=identity,
                network=network,
                psk=None,
                allowed_peers=None,
                now=now,
            )
            out = peer.start(now)
        elif isinstance(frame, frames.SessionFrame) and peer is not None and frame.session_id == peer.session_id:
            out, _ = peer.on_frame(frame, now)
            if peer.last_error:
                raise SetupFailed(f"handshake failed: {peer.last_error}")
        elif isinstance(frame, frames.Established) and peer is not None and frame.session_id == peer.session_id:
            peer.on_established(frame, now)
        elif isinstance(frame, frames.Error | frames.PeerLeft):
            raise SetupFailed(f"relay sent {type(frame).__name__.upper()}: {frame.reason}")
        else:
            raise SetupFailed(f"unexpected {type(frame).__name__} frame")
        for data in out:
            await link.send(data)
    return peer


# --- the coordinator's side ----------------------------------------------------------------


class WorkerPool:
    """The client worker processes and the pipes to them."""

    def __init__(self, count: int, url: str, ca: Path, nice: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._procs: list[multiprocessing.process.BaseProcess] = []
        self._conns: list[Connection] = []
        for index in range(count):
            parent, child = context.Pipe()
            proc = context.Process(
                target=_worker_main, args=(child, url, str(ca), nice), name=f"relay-capacity-{index}", daemon=True
            )
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)

    def __len__(self) -> int:
        return len(self._conns)

    def cpu_seconds(self) -> float:
        """CPU time of all the workers together."""
        return sum(_cpu_seconds(proc.pid) for proc in self._procs if proc.pid is not None)

    def call(self, command: str, per_worker: Sequence[dict[str, Any]], timeout: float) -> list[Any]:
        """Send ``command`` to every worker (its own arguments each) and wait for all the answers."""
        for conn, kwargs in zip(self._conns, per_worker, strict=True):
            conn.send((command, kwargs))
        deadline = time.monotonic() + timeout
        results = []
        for index, conn in enumerate(self._conns):
            try:
                if not conn.poll(max(0.0, deadline - time.monotonic())):
                    raise BenchError(f"client worker {index} did not finish {command!r} within {timeout:.0f} s")
                status, result = conn.recv()
            except (EOFError, OSError):
                raise BenchError(f"client worker {index} died during {command!r}") from None
            if status != "ok":
                raise BenchError(f"client worker {index} failed in {command!r}:\n{result}")
            results.append(result)
        return results

    def call_same(self, command: str, timeout: float, **kwargs: Any) -> list[Any]:
        return self.call(command, [kwargs] * len(self), timeout)

    def close(self) -> None:
        """Ask every worker to close its connections and exit; kill the ones that do not."""
        for conn in self._conns:
            with contextlib.suppress(OSError, ValueError):
                conn.send(("exit", {}))
        deadline = time.monotonic() + 30
        for proc in self._procs:
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for conn in self._conns:
            conn.close()


class RelayProcess:
    """``python -m traversal relay`` as a subprocess, and what /proc and /metrics say about it."""

    def __init__(self, argv: list[str], workdir: Path, nofile: tuple[int, int]) -> None:
        self.argv = argv
        self.workdir = workdir
        self.log_path = workdir / "relay.log"
        self.nofile = nofile  # (soft, hard) RLIMIT_NOFILE the relay starts with
        self.url = ""
        self.max_open_files = 0  # what the relay says it raised its soft limit to
        self.tls_read_buffer: int | None = None  # what an experiment's prelude says it set
        self.proc: subprocess.Popen[bytes] | None = None
        self._metrics_ssl: ssl.SSLContext | None = None

    def start(self, ca: Path) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the bench only; it stops the relay in order
                preexec_fn=functools.partial(_relay_preexec, self.nofile),
            )
        deadline = time.monotonic() + RELAY_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"the relay exited with status {self.proc.returncode}:\n{self.log_tail()}")
            with open(self.log_path, "rb") as log:
                head = log.read(1 << 20)
            found = re.search(rb"event=relay_listening url=(wss://\S+).* max_open_files=(\d+)", head)
            if found:
                self.url = found.group(1).decode()
                self.max_open_files = int(found.group(2))
                buffer = re.search(rf"{TLS_BUFFER_MARKER}=(\d+)".encode(), head)
                self.tls_read_buffer = int(buffer.group(1)) if buffer else None
                self._metrics_ssl = client_ssl_context(ca)
                return
            time.sleep(0.1)
        raise BenchError(f"the relay did not listen within {RELAY_START_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_seconds(self) -> float:
        return _cpu_seconds(self.pid)

    def status_kib(self, key: str) -> int:
        """A ``kB`` line of /proc/PID/status (VmRSS, VmHWM...)."""
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise BenchError(f"/proc/{self.pid}/status has no {key}")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def metrics(self) -> dict[str, float]:
        """The unlabelled samples of the relay's /metrics page."""
        url = self.url.replace("wss://", "https://", 1) + "/metrics"
        try:
            with urllib.request.urlopen(url, context=self._metrics_ssl, timeout=10) as response:
                text = response.read().decode()
        except OSError as exc:  # URLError, timeouts and resets are all OSErrors
            raise BenchError(f"cannot read the relay's /metrics: {exc}") from None
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        return samples

    def wait_clients(self, count: int, timeout: float) -> float:
        """Wait until /metrics counts ``count`` authenticated clients; return how long that took."""
        started = time.monotonic()
        while True:
            try:
                seen: float | str = self.metrics()["traversal_relay_clients_connected"]
            except BenchError as exc:
                seen = str(exc)  # e.g. no file descriptor left to accept the request: try again
            if seen == count:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise BenchError(f"the relay still counts {seen} clients, expected {count}, after {timeout:.0f} s")
            time.sleep(0.2)

    def stop(self) -> int | None:
        """SIGTERM (the relay's graceful shutdown), then SIGKILL if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(RELAY_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return None

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - 65536))
                return b"\n".join(log.read().splitlines()[-lines:]).decode(errors="replace")
        except OSError:
            return ""

    def log_events(self) -> Counter[str]:
        """How many log lines of each event the relay wrote (plus tracebacks and warnings)."""
        events: Counter[str] = Counter()
        with open(self.log_path, "rb") as log:
            for line in log:
                found = re.search(rb"event=(\w+)", line)
                if found:
                    events[found.group(1).decode()] += 1
                elif line.startswith(b"Traceback"):
                    events["traceback"] += 1
                elif b" WARNING " in line or b" ERROR " in line:
                    events["other warning/error"] += 1
        return events


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/PID/stat (fields 14 and 15 of proc(5))."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs together, from /proc/stat; busy excludes idle and iowait."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    total = sum(values)
    return total - values[3] - values[4], total


def _busy_pct(before: tuple[int, int], after: tuple[int, int]) -> float:
    """How busy the whole machine was between two _machine_jiffies() samples, 0-100 %."""
    return 100 * (after[0] - before[0]) / max(1, after[1] - before[1])


@dataclass
class Usage:
    """Wall time and CPU seconds of one measured phase."""

    wall_s: float = 0.0
    relay_s: float = 0.0  # the relay process
    clients_s: float = 0.0  # the client workers together
    other_s: float = 0.0  # everything else on the machine (other processes, unaccounted kernel work)
    machine_pct: float = 0.0  # how busy all cores together were, 0-100 %

    def pct(self, seconds: float) -> float:
        """``seconds`` of CPU over this phase as % of one core."""
        return 100 * seconds / max(1e-9, self.wall_s)


class Meter:
    """Measures a phase from creation to :meth:`stop`: relay, workers, this process and the whole machine."""

    def __init__(self, relay: RelayProcess, pool: WorkerPool) -> None:
        self._relay, self._pool = relay, pool
        self._machine = _machine_jiffies()
        self._relay_cpu, self._clients_cpu, self._own = relay.cpu_seconds(), pool.cpu_seconds(), time.process_time()
        self._started = time.monotonic()

    def stop(self) -> Usage:
        wall = time.monotonic() - self._started
        relay = self._relay.cpu_seconds() - self._relay_cpu
        clients = self._pool.cpu_seconds() - self._clients_cpu
        own = time.process_time() - self._own
        machine = _machine_jiffies()
        busy_s = (machine[0] - self._machine[0]) / CLK_TCK
        return Usage(
            wall_s=wall,
            relay_s=relay,
            clients_s=clients,
            other_s=max(0.0, busy_s - relay - clients - own),
            machine_pct=_busy_pct(self._machine, machine),
        )


def _relay_preexec(nofile: tuple[int, int]) -> None:
    """In the relay's child process before exec: its (soft, hard) fd limits, and death with the bench."""
    resource.setrlimit(resource.RLIMIT_NOFILE, nofile)
    _die_with_parent()


def _listen_drops() -> int:
    """The kernel's ListenOverflows + ListenDrops (accept queue full, SYNs dropped), system-wide."""
    with open("/proc/net/netstat") as netstat:
        rows = [line.split() for line in netstat if line.startswith("TcpExt:")]
    counters = dict(zip(rows[0][1:], map(int, rows[1][1:]), strict=True))
    return counters.get("ListenOverflows", 0) + counters.get("ListenDrops", 0)


def _raise_nofile(want: int) -> int:
    """Raise this process's RLIMIT_NOFILE (soft and hard) to ``want`` if possible; return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard) if hard != resource.RLIM_INFINITY else hard))
    except (ValueError, OSError):
        if hard != resource.RLIM_INFINITY and hard > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return want


# --- measurement ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    network: str
    seed: bytes  # raw Ed25519 private key
    public: bytes


def _member(network: str) -> Member:
    key = Ed25519PrivateKey.generate()
    return Member(network, key.private_bytes_raw(), key.public_key().public_bytes_raw())


@dataclass
class Step:
    """One batch of logins: a step of the idle ramp, or the reconnect storm."""

    clients: int  # target after the step
    added: int
    logged_in: int = 0
    login: Usage = field(default_factory=Usage)
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    listen_drops: int = 0
    rss_kib: int = 0
    idle: Usage = field(default_factory=Usage)
    open_after_idle: int = 0
    closed: Counter[str] = field(default_factory=Counter)
    metrics_clients: float = 0.0
    relay_fds: int = 0

    @property
    def rate(self) -> float:
        return self.logged_in / max(1e-9, self.login.wall_s)

    @property
    def relay_ms_per_login(self) -> float:
        return 1000 * self.login.relay_s / max(1, self.logged_in)


@dataclass
class Setups:
    count: int
    concurrency: int
    usage: Usage = field(default_factory=Usage)
    timings: list[dict[str, float]] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    forwarded_bytes: float = 0.0
    forwarded_frames: float = 0.0
    sessions_created: float = 0.0
    sessions_established: float = 0.0
    teardown: Usage = field(default_factory=Usage)


@dataclass
class Results:
    context: Context
    relay_command: str
    relay_config: str
    workers: int
    worker_nice: int
    login_concurrency: int
    relay_nofile: tuple[int, int]  # (soft, hard) RLIMIT_NOFILE the relay was started with
    nofile_imposed: bool  # --relay-nofile: both limits set low on purpose
    shell_nofile: tuple[int, int]
    idle_network_size: int
    ssl_read_buffer: int | None
    settle_s: float
    idle_window_s: float
    relay_max_open_files: int = 0  # the soft limit the relay raised itself to (its relay_listening line)
    rss_base_kib: int = 0
    steps: list[Step] = field(default_factory=list)
    final_metrics: dict[str, float] = field(default_factory=dict)
    drain: Usage = field(default_factory=Usage)
    rss_after_drain_kib: int = 0
    setups: Setups | None = None
    herd: Step | None = None
    hwm_kib: int = 0
    rss_end_kib: int = 0  # after every phase, before SIGTERM
    relay_exit: int | None = None
    log_events: Counter[str] = field(default_factory=Counter)
    runtime_s: float = 0.0

    def ramp_total(self) -> Usage:
        """The login phases of every ramp step together."""
        return Usage(
            wall_s=sum(s.login.wall_s for s in self.steps),
            relay_s=sum(s.login.relay_s for s in self.steps),
            clients_s=sum(s.login.clients_s for s in self.steps),
            other_s=sum(s.login.other_s for s in self.steps),
            machine_pct=sum(s.login.machine_pct * s.login.wall_s for s in self.steps)
            / max(1e-9, sum(s.login.wall_s for s in self.steps)),
        )


def _slices(items: Sequence[Any], parts: int) -> list[list[Any]]:
    """Deal ``items`` round-robin into ``parts`` lists."""
    return [list(items[index::parts]) for index in range(parts)]


def _ramp(clients: int, steps: str | None) -> list[int]:
    """The client counts to stop at: ``--steps`` (ending at ``clients``), or 10, 20, 50 and 100 % of it."""
    if steps:
        return sorted({min(clients, int(step)) for step in steps.split(",")} | {clients})
    return sorted({max(1, round(clients * share)) for share in (0.1, 0.2, 0.5, 1.0)})


def _log_in(relay: RelayProcess, pool: WorkerPool, step: Step, members: list[Member], per_worker: int | None) -> None:
    """Log ``members`` in from the workers (``per_worker`` at a time each; None: all at once) and keep them."""
    drops_before = _listen_drops()
    meter = Meter(relay, pool)
    parts = _slices(members, len(pool))
    answers = pool.call(
        "login",
        [
            {"clients": [(m.network, m.seed) for m in part], "concurrency": per_worker or max(1, len(part))}
            for part in parts
        ],
        timeout=max(120.0, len(members) / 10),
    )
    step.login = meter.stop()
    step.listen_drops = _listen_drops() - drops_before
    for answer in answers:
        step.latencies += answer["latencies"]
        step.errors.update(answer["errors"])
    step.logged_in = len(step.latencies)


def run_idle(
    relay: RelayProcess, pool: WorkerPool, members: list[Member], args: argparse.Namespace, results: Results
) -> None:
    per_worker = max(1, math.ceil(args.login_concurrency / len(pool)))
    done = 0
    for target in _ramp(len(members), args.steps):
        step = Step(clients=target, added=target - done)
        print(f"  logging in {step.added} clients ({done} -> {target}) ...", flush=True)
        _log_in(relay, pool, step, members[done:target], per_worker)
        done = target
        time.sleep(args.settle)
        meter = Meter(relay, pool)
        time.sleep(args.idle_window)
        step.idle = meter.stop()
        step.rss_kib = relay.status_kib("VmRSS")
        step.relay_fds = relay.open_fds()
        for status in pool.call_same("status", timeout=60):
            step.open_after_idle += status["open"]
            step.closed.update(status["closed"])
        try:
            step.metrics_clients = relay.metrics()["traversal_relay_clients_connected"]
        except BenchError:
            step.metrics_clients = math.nan  # reported as "nan": /metrics did not answer
        results.steps.append(step)
        print(
            f"  {target} clients: {step.rate:.0f} logins/s, relay RSS {step.rss_kib / 1024:.0f} MiB, "
            f"{step.added - step.logged_in} failed, /metrics {step.metrics_clients:.0f}",
            flush=True,
        )
    with contextlib.suppress(BenchError):
        results.final_metrics = relay.metrics()


def run_drain(relay: RelayProcess, pool: WorkerPool, results: Results) -> None:
    print("  closing the idle clients ...", flush=True)
    meter = Meter(relay, pool)
    pool.call_same("close_idle", timeout=120)
    relay.wait_clients(0, DRAIN_TIMEOUT_S)
    results.drain = meter.stop()
    time.sleep(1)
    results.rss_after_drain_kib = relay.status_kib("VmRSS")


def run_herd(relay: RelayProcess, pool: WorkerPool, members: list[Member]) -> Step:
    """A reconnect storm: every client starts its login at the same moment, as after a relay restart."""
    step = Step(clients=len(members), added=len(members))
    print(f"  {len(members)} logins at once ...", flush=True)
    _log_in(relay, pool, step, members, None)
    step.rss_kib = relay.status_kib("VmRSS")
    pool.call_same("close_idle", timeout=120)
    relay.wait_clients(0, DRAIN_TIMEOUT_S)
    print(f"  {step.logged_in}/{len(members)} logged in, {step.added - step.logged_in} failed", flush=True)
    return step


def run_setups(relay: RelayProcess, pool: WorkerPool, pairs: list[tuple[Member, Member]], concurrency: int) -> Setups:
    result = Setups(count=len(pairs), concurrency=concurrency)
    per_worker = max(1, math.ceil(concurrency / len(pool)))
    specs = [(a.network, a.seed, b.seed) for a, b in pairs]
    print(f"  {len(pairs)} set-ups, {concurrency} in flight ...", flush=True)
    before = relay.metrics()
    meter = Meter(relay, pool)
    answers = pool.call(
        "setups",
        [{"pairs": part, "concurrency": per_worker} for part in _slices(specs, len(pool))],
        timeout=max(120.0, len(pairs) * 2.0),
    )
    result.usage = meter.stop()
    after = relay.metrics()
    for answer in answers:
        for item in answer:
            if isinstance(item, dict):
                result.timings.append(item)
            else:
                result.errors[item] += 1

    def delta(name: str) -> float:
        return after[name] - before[name]

    result.forwarded_bytes = delta("traversal_relay_forwarded_bytes_total")
    result.forwarded_frames = delta("traversal_relay_forwarded_frames_total")
    result.sessions_created = delta("traversal_relay_sessions_created_total")
    result.sessions_established = delta("traversal_relay_sessions_established_total")
    meter = Meter(relay, pool)
    pool.call_same("close_paired", timeout=120)
    relay.wait_clients(0, DRAIN_TIMEOUT_S)
    result.teardown = meter.stop()
    ok = len(result.timings)
    print(f"  {ok}/{len(pairs)} set-ups in {result.usage.wall_s:.1f} s: {ok / result.usage.wall_s:.1f}/s", flush=True)
    return result


# --- report -------------------------------------------------------------------------------------


def _ms(values: Sequence[float], how: str) -> str:
    if not values:
        return "-"
    value = {"p50": median, "p95": p95, "max": max}[how](values)
    return f"{value * 1000:.0f}"


def _mem_total_gib() -> float:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    return 0.0


def _mib(kib: float) -> str:
    return f"{kib / 1024:.0f}"


def _about(value: float) -> str:
    """Two significant digits, for extrapolations: 62,697 -> "63,000"."""
    if value < 100:
        return f"{value:.0f}"
    return f"{round(value, 1 - math.floor(math.log10(value))):,.0f}"


def _failures(errors: Counter[str]) -> str:
    return "; ".join(f"{count} x {text}" for text, count in errors.most_common(3)) or "none"


def _per_client_kib(r: Results, step: Step) -> float:
    return (step.rss_kib - r.rss_base_kib) / max(1, step.open_after_idle)


def _tls_read_buffer(r: Results) -> int:
    """The TLS read buffer per connection the relay ran with."""
    return r.ssl_read_buffer or TLS_READ_BUFFER


def headline(r: Results) -> dict[str, Any]:
    """The figures bench/results.py and the summaries quote; set-up figures are None without set-ups."""
    last = r.steps[-1]
    ramp = r.ramp_total()
    logged_in = sum(s.logged_in for s in r.steps)
    held = r.final_metrics.get("traversal_relay_clients_connected")
    figures: dict[str, Any] = {
        # the relay's own count; the clients' count of open connections if /metrics did not answer at the end
        "clients_held": int(held) if held is not None else last.open_after_idle,
        "clients_wanted": last.clients,
        "kib_per_client": round(_per_client_kib(r, last), 1),
        "logins_per_s": round(logged_in / max(1e-9, ramp.wall_s), 1),
        "relay_cpu_ms_per_login": round(1000 * ramp.relay_s / max(1, logged_in), 3),
        "setups_per_s": None,
        "setup_median_ms": None,
        "setup_p95_ms": None,
        "relay_cpu_ms_per_setup": None,
        "forwarded_bytes_per_setup": None,
        "idle_relay_cpu_percent": round(last.idle.pct(last.idle.relay_s), 2),
    }
    s = r.setups
    if s is not None and s.timings:
        ok = len(s.timings)
        total = [t["total"] for t in s.timings]
        figures.update(
            setups_per_s=round(ok / max(1e-9, s.usage.wall_s), 1),
            setup_median_ms=round(1000 * (median(total) or 0.0), 1),
            setup_p95_ms=round(1000 * p95(total), 1),
            relay_cpu_ms_per_setup=round(1000 * s.usage.relay_s / ok, 3),
            forwarded_bytes_per_setup=round(s.forwarded_bytes / ok, 1),
        )
    return figures


def _brief(r: Results) -> list[str]:
    h = headline(r)
    last = r.steps[-1]
    ramp = r.ramp_total()
    lines = [
        f"- idle clients held: {h['clients_held']} of {h['clients_wanted']} (relay /metrics), relay RSS "
        f"{_mib(last.rss_kib)} MiB, {h['kib_per_client']:.0f} KiB per client; idle relay CPU "
        f"{h['idle_relay_cpu_percent']:.1f} % of a core",
        f"- logins: {h['logins_per_s']:.0f}/s over the ramp (relay busy {ramp.pct(ramp.relay_s):.0f} % of a core), "
        f"{h['relay_cpu_ms_per_login']:.2f} ms of relay CPU per login",
    ]
    if h["setups_per_s"] is not None:
        assert r.setups is not None
        lines.append(
            f"- set-ups: {h['setups_per_s']:.0f}/s with {r.setups.concurrency} in flight, "
            f"{h['setup_median_ms']:.0f} ms median and {h['setup_p95_ms']:.0f} ms p95 per set-up, "
            f"{h['relay_cpu_ms_per_setup']:.1f} ms of relay CPU and {h['forwarded_bytes_per_setup']:.0f} forwarded "
            "bytes per set-up"
        )
    return lines


def _bottleneck(usage: Usage, clients_do: str) -> str:
    """Who set the pace of a phase, from how busy the relay, the clients and the machine were."""
    relay, clients = usage.pct(usage.relay_s), usage.pct(usage.clients_s)
    if relay >= 85:
        return f"the relay was busy {relay:.0f} % of a core: it was the bottleneck"
    if usage.machine_pct >= 90:
        return (
            f"the relay was busy {relay:.0f} % of a core and the clients ({clients_do}) {clients:.0f} %, with the "
            f"machine {usage.machine_pct:.0f} % busy (other processes {usage.pct(usage.other_s):.0f} % of a core): "
            "the cores were full, so the relay shared them with its clients and would go faster with the machine "
            "to itself"
        )
    return (
        f"the relay was busy {relay:.0f} % of a core, the clients {clients:.0f} %, the machine "
        f"{usage.machine_pct:.0f} % of all cores: with no core full, waiting (round trips, the work in flight) "
        "set the pace"
    )


@dataclass(frozen=True)
class Ceilings:
    """Where the resources that grow with idle clients would run out, extrapolated linearly from this run."""

    ram_clients: float  # this machine's RAM, at this run's memory per client
    cpu_clients: float | None  # the relay's one core full of keepalives; None if too small to extrapolate
    storm_logins: float  # logins at once that the relay, filling up from empty, admits in a client's login timeout
    fd_clients: int  # the relay's open-files limit, less its own descriptors


def _ceilings(r: Results) -> Ceilings:
    last = r.steps[-1]
    idle_pct = last.idle.pct(last.idle.relay_s)
    return Ceilings(
        ram_clients=_mem_total_gib() * 1024 * 1024 / max(1.0, _per_client_kib(r, last)),
        cpu_clients=max(1, last.open_after_idle) * 100 / idle_pct if idle_pct > 0.5 else None,
        storm_logins=LOGIN_TIMEOUT * 1000 / max(1e-9, headline(r)["relay_cpu_ms_per_login"]),
        fd_clients=max(0, r.relay_max_open_files - (last.relay_fds - last.open_after_idle)),
    )


def summary_markdown(r: Results) -> list[str]:
    """A short table of the headline figures and what limits them, for bench/results.md."""
    h = headline(r)
    c = _ceilings(r)
    setups = r.setups
    rows = [
        "| relay capacity (one process; it shares the cores with its clients) | measured |",
        "|---|---|",
        f"| idle authenticated clients held | {h['clients_held']:,} of {h['clients_wanted']:,} |",
        f"| relay memory per idle client | {h['kib_per_client']:.0f} KiB"
        + (
            f" (TLS read buffer {r.ssl_read_buffer} bytes in this run)"
            if r.ssl_read_buffer is not None
            else f" (asyncio's stock TLS read buffer: {STOCK_BUFFER_KIB_PER_CLIENT} KiB)"
        )
        + " |",
        f"| relay CPU holding them (keepalives) | {h['idle_relay_cpu_percent']:.1f} % of a core |",
        f"| logins per second, paced ramp | {h['logins_per_s']:.0f}/s, {h['relay_cpu_ms_per_login']:.2f} ms "
        "relay CPU each |",
    ]
    if h["setups_per_s"] is not None and setups is not None:
        rows += [
            f"| session set-ups per second, {setups.concurrency} in flight | {h['setups_per_s']:.0f}/s; "
            f"{h['setup_median_ms']:.0f} ms median, {h['setup_p95_ms']:.0f} ms p95 each |",
            f"| relay per set-up | {h['relay_cpu_ms_per_setup']:.1f} ms CPU, "
            f"{h['forwarded_bytes_per_setup']:.0f} bytes forwarded |",
        ]
    limit = (
        f"CPU before memory: the keepalives would fill the relay's one core near {_about(c.cpu_clients)} idle "
        f"clients, this machine's RAM near {_about(c.ram_clients)}"
        if c.cpu_clients is not None and c.cpu_clients < c.ram_clients
        else f"memory: this machine's RAM would hold about {_about(c.ram_clients)} idle clients"
    )
    if c.fd_clients < min(c.ram_clients, c.cpu_clients or math.inf):
        limit += f" (here the open-files hard limit, {r.relay_max_open_files}, comes first)"
    return [
        *rows,
        "",
        f"What limits it: {limit}. The weak point is a reconnect storm: of more than about "
        f"{_about(c.storm_logins)} logins at once (what the relay's CPU admits within a client's "
        f"{LOGIN_TIMEOUT:.0f} s login timeout) the excess time out and retry, unless `--max-pending-logins` "
        "refuses them first with OVERLOADED (see SECURITY.md).",
    ]


def _memory_paragraphs(r: Results) -> list[str]:
    last = r.steps[-1]
    per_client_kib = _per_client_kib(r, last)
    buffer = _tls_read_buffer(r)
    buffer_kib = buffer / 1024
    if r.ssl_read_buffer is None:
        buffer_text = (
            f"{buffer_kib:.0f} KiB, which the relay sets itself (`TLS_READ_BUFFER` in relay_server/resources.py; "
            f"asyncio's stock size is {ASYNCIO_TLS_READ_BUFFER // 1024} KiB)"
        )
        stock = (
            f" With asyncio's stock {ASYNCIO_TLS_READ_BUFFER // 1024} KiB buffer a client cost "
            f"{STOCK_BUFFER_KIB_PER_CLIENT} KiB ({STOCK_BUFFER_MEASURED}; "
            f"`--relay-ssl-read-buffer {ASYNCIO_TLS_READ_BUFFER} --setups 0` measures it again)."
        )
    else:
        buffer_text = (
            f"{r.ssl_read_buffer} bytes (`--relay-ssl-read-buffer`; the relay's own setting is "
            f"{TLS_READ_BUFFER // 1024} KiB, asyncio's stock one {ASYNCIO_TLS_READ_BUFFER // 1024} KiB)"
        )
        stock = ""
    held_gib = (last.rss_kib - r.rss_base_kib) / 1024 / 1024
    lines = [
        f"**Memory.** Each idle client costs the relay about {per_client_kib:.0f} KiB, {buffer_kib:.0f} KiB of "
        "it one buffer: asyncio's TLS layer (`asyncio.sslproto.SSLProtocol`, Python 3.11+) gives every connection "
        f"a read buffer of `max_size` bytes, here {buffer_text}. It is a zero-filled `bytearray`, so all of it is "
        f"resident for as long as the connection lives; a relay frame is at most {MAX_FRAME_SIZE // 1024} KiB. "
        f"The rest, about {per_client_kib - buffer_kib:.0f} KiB, is the OpenSSL session and the WebSocket "
        "connection (websockets' protocol and parser, its keepalive task, the relay's handler task and client "
        f"record). At this rate 1 GiB holds about {_about(1024 * 1024 / max(1.0, per_client_kib))} idle clients; "
        f"{last.clients} took {held_gib:.2f} GiB.{stock}",
    ]
    peak = r.hwm_kib - r.rss_base_kib
    kept = r.rss_after_drain_kib - r.rss_base_kib
    if peak > 0 and kept > peak / 2:
        if buffer >= GLIBC_MMAP_THRESHOLD:
            why = (
                f"glibc's malloc serves the first {buffer_kib:.0f} KiB buffers with mmap but raises its mmap "
                "threshold when one is freed, so later ones come from the heap, which keeps freed memory for "
                "reuse (`MALLOC_MMAP_THRESHOLD_=131072` in the relay's environment pins the threshold)"
            )
        else:
            why = (
                f"the {buffer_kib:.0f} KiB buffers are below glibc's mmap threshold "
                f"({GLIBC_MMAP_THRESHOLD // 1024} KiB), so they and the rest come from malloc's heap, which gives "
                "back only a free top of the heap, and CPython's small-object allocator frees an arena only once "
                "every object in it is gone; what the clients freed is kept for reuse, not returned"
            )
        after_setups = f", and {_mib(r.rss_end_kib)} MiB after the set-ups" if r.setups is not None else ""
        lines += [
            "",
            f"**Memory is kept after clients leave.** With all {last.clients} clients gone the relay still held "
            f"{_mib(r.rss_after_drain_kib)} MiB of its {_mib(r.hwm_kib)} MiB peak ({_mib(r.rss_base_kib)} MiB at "
            f"the start){after_setups}: {why}. A relay's RSS therefore stays near its peak, however few clients "
            "it holds now.",
        ]
    else:
        lines += [
            "",
            f"**Memory after clients leave.** With all {last.clients} clients gone the relay's RSS fell to "
            f"{_mib(r.rss_after_drain_kib)} MiB from its {_mib(r.hwm_kib)} MiB peak ({_mib(r.rss_base_kib)} MiB at "
            "the start).",
        ]
    return lines


def _cpu_paragraphs(r: Results) -> list[str]:
    first, last = r.steps[0], r.steps[-1]
    ramp = r.ramp_total()
    ms_per_login = 1000 * ramp.relay_s / max(1, sum(s.logged_in for s in r.steps))
    idle_pct = last.idle.pct(last.idle.relay_s)
    lines = [
        "**CPU.** The relay is one asyncio thread: one core at most. During the paced logins "
        f"{_bottleneck(ramp, 'TLS, Ed25519 signatures')}. The relay spent {ms_per_login:.2f} ms of CPU per login on "
        "average (TCP accept, TLS handshake, HTTP upgrade, HELLO/CHALLENGE/AUTH with an Ed25519 verification, one "
        f"log line), from {first.relay_ms_per_login:.2f} ms in the first step to {last.relay_ms_per_login:.2f} ms "
        "in the last"
        + (
            " (the keepalive traffic of the clients already held runs during the logins and is counted in, and "
            "every allocation and garbage collection works on a larger heap)"
            if last.relay_ms_per_login > 1.2 * first.relay_ms_per_login
            else ""
        )
        + f". One core of this CPU therefore admits roughly {1000 / max(1e-9, first.relay_ms_per_login):.0f} "
        f"logins/s into a nearly empty relay and {1000 / max(1e-9, last.relay_ms_per_login):.0f}/s into one holding "
        f"{r.steps[-2].clients if len(r.steps) > 1 else 0}-{last.clients} clients, however fast the clients are. "
        f"Holding {last.open_after_idle} idle clients cost {idle_pct:.1f} % of a core: websockets keepalives (the "
        f"relay pings every client every {RELAY_KEEPALIVE_INTERVAL:.0f} s, each client pings every 15 s; every ping "
        "and pong is a TLS record).",
    ]
    if r.setups is not None and r.setups.timings:
        s = r.setups
        ok = len(s.timings)
        per_setup_ms = 1000 * s.usage.relay_s / ok
        lines += [
            "",
            f"**Set-ups.** A set-up costs the relay {per_setup_ms:.1f} ms of CPU. Its two logins account for about "
            f"{2 * first.relay_ms_per_login:.1f} ms (at the first ramp step's rate, on a nearly empty relay as "
            "here); the rest is pairing, two PEER_JOINED, forwarding the "
            f"{s.forwarded_frames / ok:.0f} handshake frames ({s.forwarded_bytes / ok:.0f} bytes), two READY, two "
            "ESTABLISHED (each a TLS record) and four log lines. The end-to-end handshake (X25519 + ML-KEM-768 + "
            f"Ed25519) is computed by the peers, never by the relay. Here {_bottleneck(s.usage, 'both ends')}; "
            f"on a core of its own the relay would manage about {1000 / max(1e-9, per_setup_ms):.0f} set-ups/s.",
        ]
    return lines


def _limit_paragraphs(r: Results) -> list[str]:
    """File descriptors, the missing client cap, where it saturates, storms and pairing."""
    first, last = r.steps[0], r.steps[-1]
    held = max(1, last.open_after_idle)
    idle_pct = last.idle.pct(last.idle.relay_s)
    c = _ceilings(r)
    soft, hard = r.relay_nofile
    if r.nofile_imposed:
        started = f"this run imposed `--relay-nofile {soft}` as both its soft and hard limit"
    else:
        started = f"the bench started it with soft {soft} / hard {hard}, as systemd starts a service"
    lines = [
        "**File descriptors.** One per client. The relay raises its soft RLIMIT_NOFILE to the hard limit when it "
        f"starts (relay_server/resources.py): {started}, and its `relay_listening` line said "
        f"`max_open_files={r.relay_max_open_files}` (the shell that started the bench had soft "
        f"{r.shell_nofile[0]}, hard {r.shell_nofile[1]}). So the hard limit caps the clients (systemd's default "
        "for a service is 524288; `LimitNOFILE=` sets it), and past it the failure mode is still bad: Python "
        "3.11's asyncio keeps looping in `_accept_connection` after EMFILE (CPython issue #151615), logs a full "
        "traceback per attempt (thousands a second) and spins the CPU, and /metrics cannot be reached because it "
        "needs a descriptor too. `--relay-nofile 1024 --clients 1200` reproduces it (both limits 1024, which the "
        "relay cannot raise).",
        "",
        "**Limits.** The relay refuses one client more than `--max-clients` (20,000 by default) with OVERLOADED, "
        "and logins beyond `--max-pending-logins` (1,000) the same way, before memory, descriptors or CPU run out; "
        "SECURITY.md lists every limit.",
    ]
    saturation = (
        f"**Where it saturates.** Of what grows with idle clients, this machine's {_mem_total_gib():.1f} GiB of RAM "
        f"would run out near {_about(c.ram_clients)} clients (at {_per_client_kib(r, last):.0f} KiB each, nothing "
        "else running)"
    )
    if c.cpu_clients is not None:
        sooner = "RAM" if c.ram_clients < c.cpu_clients else "the keepalives' CPU"
        per_first = 1e6 * first.idle.relay_s / max(1e-9, first.idle.wall_s) / max(1, first.open_after_idle)
        per_last = 1e6 * last.idle.relay_s / max(1e-9, last.idle.wall_s) / held
        caveat = ""
        if per_first > 0 and per_last > 1.3 * per_first:
            caveat = (
                f" The keepalive cost per client rose from {per_first:.0f} to {per_last:.0f} microseconds of CPU "
                "per second as the count grew, so the linear estimate is optimistic."
            )
        saturation += (
            f" and the keepalives would fill the relay's core near {_about(c.cpu_clients)} clients (linear from "
            f"{idle_pct:.1f} % at {held}): {sooner} first.{caveat}"
        )
    else:
        saturation += "; the keepalive CPU at this size was too small to extrapolate."
    if c.fd_clients < min(c.ram_clients, c.cpu_clients or math.inf):
        saturation += (
            f" Here the open-files limit comes before both: the relay's hard limit of {r.relay_max_open_files} "
            f"leaves room for about {_about(c.fd_clients)} clients."
        )
    rate = headline(r)["logins_per_s"]
    saturation += (
        f" Filling a relay takes time too: at the ramp's {rate:.0f} logins/s, {held:,} clients took "
        f"{held / max(1e-9, rate):.0f} s to log in."
    )
    lines += ["", saturation]
    low, high = RECONNECT_INITIAL_DELAY * (1 - RECONNECT_JITTER), RECONNECT_INITIAL_DELAY
    arrival = (
        f"After a relay restart its nodes come back nearly together: their reconnect wait has jitter "
        f"(traversal/node.py), but the first one is drawn from {low:.2f}-{high:.2f} s, so they all arrive within "
        f"{1000 * (high - low):.0f} ms. Filling up from empty, the relay's CPU admits about "
        f"{1000 / max(1e-9, headline(r)['relay_cpu_ms_per_login']):.0f} logins/s (the ramp's average cost), and all "
        "the handshakes in progress interleave on its one loop, so "
        "they finish late together rather than first come, first served, and of a batch of more than about "
        f"{_about(c.storm_logins)} logins (what it admits in a client's {LOGIN_TIMEOUT:.0f} s login timeout) the "
        "excess time out; their retries (each wait up to twice the last, with jitter) come back as a smaller storm."
    )
    if r.herd is None:
        lines += [
            "",
            f"**Reconnect storms and admission are not measured by default.** Logins here are paced "
            f"({r.login_concurrency} in flight). {arrival} `--herd N` measures N logins started at the same "
            "moment. Admission control in the relay (a cap on handshakes in progress, OVERLOADED beyond it) would "
            "turn a storm into a queue.",
        ]
    else:
        h = r.herd
        slowest = max(h.latencies, default=0.0)
        if h.logged_in == h.added and slowest > 0:
            text = (
                f"All {h.added} logins started at once got through, the last after {slowest:.1f} s: at this rate a "
                f"storm of about {_about(h.added * LOGIN_TIMEOUT / slowest)} would take longer than the "
                f"{LOGIN_TIMEOUT:.0f} s a client waits"
            )
        else:
            text = f"Of {h.added} logins started at once, {h.logged_in} got through"
        lines += [
            "",
            f"**Reconnect storm.** {text}. {arrival} Admission control in the relay (a cap on handshakes in "
            "progress, OVERLOADED beyond it) would turn a storm into a queue.",
        ]
    lines += [
        "",
        "**Pairing.** A network is a full mesh: the k-th member to log in creates k-1 relay sessions, so a network "
        "of n online members holds n(n-1)/2 sessions, each with its own series on /metrics. The idle phase used "
        f"networks of {r.idle_network_size} member(s) to measure the cost per client alone.",
    ]
    return lines


def _what_limits(r: Results) -> list[str]:
    """The "what limits it" paragraphs, from the numbers of this run."""
    return [
        "## What limits it",
        "",
        *_memory_paragraphs(r),
        "",
        *_cpu_paragraphs(r),
        "",
        *_limit_paragraphs(r),
    ]


def _login_row(step: Step, r: Results | None) -> str:
    """A row of the idle-ramp table (``r`` given) or of the storm table."""
    u = step.login
    cells = [
        str(step.clients) if r is not None else str(step.added),
        f"{step.logged_in}/{step.added}",
        f"{u.wall_s:.1f}",
        f"{step.rate:.0f}",
        f"{_ms(step.latencies, 'p50')} / {_ms(step.latencies, 'p95')} / {_ms(step.latencies, 'max')}",
        f"{u.pct(u.relay_s):.0f}",
        f"{step.relay_ms_per_login if r is not None else 1000 * u.relay_s / max(1, step.added):.2f}",
        f"{u.pct(u.clients_s):.0f}",
        f"{u.machine_pct:.0f}",
        f"{u.pct(u.other_s):.0f}",
        str(step.listen_drops),
    ]
    failures = Counter(step.errors)
    if r is not None:
        per_client = f"{_per_client_kib(r, step) / 1024:.3f}" if step.open_after_idle else "-"
        failures.update(step.closed)
        cells += [
            _mib(step.rss_kib),
            per_client,
            f"{step.idle.pct(step.idle.relay_s):.1f}",
            str(step.relay_fds),
            str(step.open_after_idle),
            f"{step.metrics_clients:.0f}",
        ]
    cells.append(_failures(failures))
    return "| " + " | ".join(cells) + " |"


def _login_columns(per: str) -> list[str]:
    return [
        "logged in",
        "login wall s",
        "logins/s",
        "login ms p50 / p95 / max",
        "relay CPU, % of a core",
        f"relay CPU ms per {per}",
        "clients' CPU, % of a core",
        "machine busy, % of all cores",
        "other processes' CPU, % of a core",
        "listen-queue overflows",
    ]


def _table(columns: list[str]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def render(r: Results) -> str:
    ramp = r.ramp_total()
    wall = ramp.wall_s + (r.setups.usage.wall_s if r.setups else 0.0)
    other = ramp.other_s + (r.setups.usage.other_s if r.setups else 0.0)
    other_pct = 100 * other / max(1e-9, wall)
    lines = [
        "# Relay capacity: idle clients held and session set-ups per second",
        "",
        "Generated by `bench/relay_capacity.py` (its docstring says what is measured). One relay process,",
        "real TLS WebSocket logins and real end-to-end handshakes, everything on 127.0.0.1.",
        "",
        *r.context.markdown(),
        f"- also: {_mem_total_gib():.1f} GiB RAM, websockets {websockets.__version__}, cryptography "
        f"{cryptography.__version__}, {ssl.OPENSSL_VERSION} (Python's ssl, used by the relay's TLS); whole run "
        f"{r.runtime_s:.0f} s",
        f"- relay: `{r.relay_command}` with {r.relay_config}; started with RLIMIT_NOFILE soft {r.relay_nofile[0]} / "
        f"hard {r.relay_nofile[1]}, raised by the relay itself to `max_open_files={r.relay_max_open_files}`",
        f"- clients: {r.workers} worker processes (multiprocessing, one asyncio loop each) at nice "
        f"{r.worker_nice}, at most {r.login_concurrency} logins in flight in all. **The relay and the clients "
        f"share these {os.cpu_count()} cores**: the clients' TLS, Ed25519 and ML-KEM work competes with the relay "
        "for CPU, so rates here are lower bounds for a relay with the machine to itself; the relay's own CPU "
        "seconds (from /proc/PID/stat) are what carry over.",
        f"- other load: processes outside this bench (and kernel work charged to no process) used {other_pct:.0f} % "
        "of a core on average while logins and set-ups ran"
        + (". **The machine was not quiet: rates are depressed and noisy.**" if other_pct > 15 else ""),
    ]
    if r.ssl_read_buffer is not None:
        lines.append(
            f"- **experiment**: PRELUDE replaced `relay_server.resources.shrink_tls_read_buffers` so that the "
            f"relay's prepare_process() set `asyncio.sslproto.SSLProtocol.max_size = {r.ssl_read_buffer}` (the "
            f"relay's own setting: {TLS_READ_BUFFER}; asyncio's stock one: {ASYNCIO_TLS_READ_BUFFER}), and the "
            "relay's log confirmed it; the memory figures below are not those of the relay as shipped."
        )
    lines += ["", "## In brief", "", *_brief(r)]
    lines += [
        "",
        "## 1. Idle authenticated clients",
        "",
        f"Relay RSS at 0 clients: {_mib(r.rss_base_kib)} MiB. Each step logs clients in, waits {r.settle_s:g} s, "
        f"then measures the relay's idle CPU over a quiet window ({r.idle_window_s:g} s; when it is the relay's "
        f"keepalive interval, {RELAY_KEEPALIVE_INTERVAL:.0f} s, every client is pinged once in it), then its RSS. "
        "CPU columns are over the step's logins. Listen-queue overflows are the kernel's TcpExt ListenOverflows + "
        "ListenDrops (system-wide, /proc/net/netstat) during the logins.",
        "",
        *_table(
            [
                "clients",
                *_login_columns("login"),
                "relay RSS MiB",
                "MiB per client",
                "relay idle CPU, % of a core",
                "relay fds",
                "still open",
                "/metrics clients",
                "failures",
            ]
        ),
        *(_login_row(step, r) for step in r.steps),
    ]
    last = r.steps[-1]
    held = r.final_metrics.get("traversal_relay_clients_connected", math.nan)
    verdict = "matches" if held == last.open_after_idle == last.clients else "DOES NOT match"
    lines += [
        "",
        f"At the end /metrics said `traversal_relay_clients_connected {held:.0f}` and "
        f"`traversal_relay_connections_open {r.final_metrics.get('traversal_relay_connections_open', math.nan):.0f}`: "
        f"{verdict} the {last.clients} clients asked for. Peak relay RSS (VmHWM): {_mib(r.hwm_kib)} MiB.",
        "",
        f"Closing all {last.clients} (WebSocket close handshake) until /metrics counted 0 took {r.drain.wall_s:.1f} s "
        f"and {r.drain.relay_s:.2f} s of relay CPU; the relay's RSS afterwards was {_mib(r.rss_after_drain_kib)} MiB "
        "(see below).",
    ]
    if r.setups is not None:
        s = r.setups
        u = s.usage
        ok = len(s.timings)
        total = [t["total"] for t in s.timings]
        login = [t["login"] for t in s.timings]
        handshake = [t["handshake"] for t in s.timings]
        lines += [
            "",
            "## 2. Session set-ups",
            "",
            "Each set-up: both ends log in at once, get PEER_JOINED, run the end-to-end handshake through the relay "
            "(the node's PeerLink: 3 HANDSHAKE frames), send READY, and wait for ESTABLISHED; both ends derived the "
            "same session tag. Time per set-up runs from the start of the two logins to the second ESTABLISHED.",
            "",
            *_table(
                [
                    "set-ups ok",
                    "in flight",
                    "wall s",
                    "set-ups/s",
                    "time per set-up ms p50 / p95 / max",
                    "of which logins p50",
                    "handshake + READY + ESTABLISHED p50",
                    "relay CPU s",
                    "relay CPU ms per set-up",
                    "relay CPU, % of a core",
                    "clients' CPU, % of a core",
                    "machine busy, % of all cores",
                    "other processes' CPU, % of a core",
                    "forwarded bytes per set-up",
                    "forwarded frames per set-up",
                    "sessions created / established",
                    "failures",
                ]
            ),
            f"| {ok}/{s.count} | {s.concurrency} | {u.wall_s:.1f} | {ok / u.wall_s:.1f} "
            f"| {_ms(total, 'p50')} / {_ms(total, 'p95')} / {_ms(total, 'max')} | {_ms(login, 'p50')} "
            f"| {_ms(handshake, 'p50')} | {u.relay_s:.2f} | {1000 * u.relay_s / max(1, ok):.2f} "
            f"| {u.pct(u.relay_s):.0f} | {u.pct(u.clients_s):.0f} | {u.machine_pct:.0f} | {u.pct(u.other_s):.0f} "
            f"| {s.forwarded_bytes / max(1, ok):.0f} | {s.forwarded_frames / max(1, ok):.1f} "
            f"| {s.sessions_created:.0f} / {s.sessions_established:.0f} | {_failures(s.errors)} |",
            "",
            "The forwarded bytes are the three handshake messages with their 20-byte frame headers "
            "(1217 + 1232 + 112 payload bytes); the relay counts the frames it forwards, not its own control frames. "
            f"Tearing the {2 * ok} connections down afterwards took {s.teardown.wall_s:.1f} s and "
            f"{1000 * s.teardown.relay_s / max(1, ok):.2f} ms of relay CPU per set-up (not in the table).",
        ]
    if r.herd is not None:
        lines += [
            "",
            "## 3. Reconnect storm",
            "",
            f"{r.herd.added} clients (the idle phase's identities, logged out by then) start their logins at the "
            "same moment, as the nodes of a restarted relay do within a fraction of a second. A client gives up "
            f"after {LOGIN_TIMEOUT:.0f} s (LOGIN_TIMEOUT, traversal/relay_client.py). The clients' own TLS work "
            "shares the cores with the relay here, so this failure point is a lower bound.",
            "",
            *_table(["logins at once", *_login_columns("attempt"), "failures"]),
            _login_row(r.herd, None),
        ]
    events = ", ".join(f"{name} {count}" for name, count in sorted(r.log_events.items()))
    lines += [
        "",
        f"Relay log events over the run: {events}. Relay exit status after SIGTERM: {r.relay_exit}.",
        "",
        *_what_limits(r),
    ]
    return "\n".join(lines)


def _usage_dict(usage: Usage) -> dict[str, float]:
    return {
        "wall_s": round(usage.wall_s, 3),
        "relay_cpu_s": round(usage.relay_s, 3),
        "clients_cpu_s": round(usage.clients_s, 3),
        "other_cpu_s": round(usage.other_s, 3),
        "machine_busy_percent": round(usage.machine_pct, 1),
    }


def _latency_ms(values: Sequence[float]) -> dict[str, float | None]:
    return {
        "median": round(1000 * value, 1) if (value := median(values)) is not None else None,
        "p95": round(1000 * p95(values), 1) if values else None,
        "max": round(1000 * max(values), 1) if values else None,
    }


def _step_dict(r: Results, step: Step) -> dict[str, Any]:
    return {
        "clients": step.clients,
        "added": step.added,
        "logged_in": step.logged_in,
        "logins_per_s": round(step.rate, 1),
        "login_latency_ms": _latency_ms(step.latencies),
        "login": _usage_dict(step.login),
        "relay_cpu_ms_per_login": round(step.relay_ms_per_login, 3),
        "listen_drops": step.listen_drops,
        "errors": dict(step.errors),
        "idle": _usage_dict(step.idle),
        "idle_relay_cpu_percent": round(step.idle.pct(step.idle.relay_s), 2),
        "relay_rss_kib": step.rss_kib,
        "kib_per_client": round(_per_client_kib(r, step), 1) if step.open_after_idle else None,
        "relay_fds": step.relay_fds,
        "open_after_idle": step.open_after_idle,
        "closed": dict(step.closed),
        "metrics_clients": None if math.isnan(step.metrics_clients) else step.metrics_clients,
    }


def document(r: Results) -> dict[str, Any]:
    """What --json writes: the run's context, its settings, the raw figures, the headline and the summary."""
    setups: dict[str, Any] | None = None
    if r.setups is not None:
        s = r.setups
        setups = {
            "count": s.count,
            "ok": len(s.timings),
            "concurrency": s.concurrency,
            "usage": _usage_dict(s.usage),
            **{f"{part}_ms": _latency_ms([t[part] for t in s.timings]) for part in ("total", "login", "handshake")},
            "errors": dict(s.errors),
            "forwarded_bytes": s.forwarded_bytes,
            "forwarded_frames": s.forwarded_frames,
            "sessions_created": s.sessions_created,
            "sessions_established": s.sessions_established,
            "teardown": _usage_dict(s.teardown),
        }
    return {
        **r.context.as_dict(),
        "runtime_s": round(r.runtime_s, 1),
        "settings": {
            "relay_command": r.relay_command,
            "workers": r.workers,
            "worker_nice": r.worker_nice,
            "login_concurrency": r.login_concurrency,
            "idle_network_size": r.idle_network_size,
            "settle_s": r.settle_s,
            "idle_window_s": r.idle_window_s,
            "tls_read_buffer": _tls_read_buffer(r),
            "tls_read_buffer_experiment": r.ssl_read_buffer is not None,
            "relay_nofile_start": list(r.relay_nofile),
            "relay_nofile_imposed": r.nofile_imposed,
            "relay_max_open_files": r.relay_max_open_files,
            "shell_nofile": list(r.shell_nofile),
            "mem_total_gib": round(_mem_total_gib(), 1),
        },
        "headline": headline(r),
        "relay_rss_kib": {
            "start": r.rss_base_kib,
            "peak": r.hwm_kib,
            "after_drain": r.rss_after_drain_kib,
            "end": r.rss_end_kib,
        },
        "steps": [_step_dict(r, step) for step in r.steps],
        "final_metrics": r.final_metrics,
        "drain": _usage_dict(r.drain),
        "setups": setups,
        "herd": None if r.herd is None else _step_dict(r, r.herd),
        "log_events": dict(r.log_events),
        "relay_exit": r.relay_exit,
        "summary_markdown": summary_markdown(r),
    }


# --- main -----------------------------------------------------------------------------------------


def _write_members(workdir: Path, groups: dict[str, list[Member]]) -> list[str]:
    """One members file per network (the relay's format: one base64 key per line); the --members values."""
    directory = workdir / "members"
    directory.mkdir()
    values = []
    for network, members in groups.items():
        (directory / network).write_text("".join(encode_public(m.public) + "\n" for m in members))
        values.append(f"{network}:members/{network}")
    return values


#: What the experiment's prelude writes to the relay's log once it has set the TLS read buffer.
TLS_BUFFER_MARKER = "bench_tls_read_buffer"
#: Runs the relay with another TLS read buffer. prepare_process() calls shrink_tls_read_buffers()
#: with its default argument, which Python bound to TLS_READ_BUFFER when resources.py was imported,
#: so setting that constant from here would change nothing: the prelude replaces the function.
_TLS_BUFFER_PRELUDE = """\
import asyncio.sslproto, sys
from relay_server import resources
stock = resources.shrink_tls_read_buffers
def shrink_tls_read_buffers(size: int = {size}) -> None:
    stock(size)
    print(f"{marker}={{asyncio.sslproto.SSLProtocol.max_size}}", file=sys.stderr, flush=True)
resources.shrink_tls_read_buffers = shrink_tls_read_buffers
from traversal.cli import main
sys.exit(main(prog_name="traversal"))
"""


def _relay_argv(tls_read_buffer: int | None) -> list[str]:
    args = ["relay", "--config", "relay.toml"]
    if tls_read_buffer is None:
        return [sys.executable, "-m", "traversal", *args]
    prelude = _TLS_BUFFER_PRELUDE.format(size=tls_read_buffer, marker=TLS_BUFFER_MARKER)
    return [sys.executable, "-c", prelude, *args]


@contextlib.contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    def expired(_signum: int, _frame: Any) -> None:
        raise BenchError(f"the whole run exceeded --time-limit {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _relay_nofile(args: argparse.Namespace) -> tuple[int, int]:
    """The (soft, hard) RLIMIT_NOFILE to start the relay with: systemd's soft default under the bench's hard
    limit, or ``--relay-nofile`` as both (a lower hard limit the relay cannot raise itself past)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if args.relay_nofile is not None:
        if hard != resource.RLIM_INFINITY and args.relay_nofile > hard:
            raise BenchError(f"--relay-nofile {args.relay_nofile} is above the hard limit here ({hard})")
        return args.relay_nofile, args.relay_nofile
    return (RELAY_START_SOFT_NOFILE if hard == resource.RLIM_INFINITY else min(RELAY_START_SOFT_NOFILE, hard)), hard


def _check_relay(relay: RelayProcess, args: argparse.Namespace) -> None:
    """The relay prepared its process: enough open files for the run (unless limited on purpose), and the
    experiment's TLS read buffer if one was asked for."""
    peak = max(args.clients, 2 * args.setups) + RELAY_FD_SPARE
    if args.relay_nofile is None and relay.max_open_files < peak:
        raise BenchError(
            f"the relay raised its open-files limit to {relay.max_open_files} only (its hard limit), but this run "
            f"needs about {peak}; raise the hard limit (ulimit -Hn, as root) or lower --clients"
        )
    if args.relay_ssl_read_buffer is not None and relay.tls_read_buffer != args.relay_ssl_read_buffer:
        raise BenchError(
            f"the relay's TLS read buffer is {relay.tls_read_buffer}, not --relay-ssl-read-buffer "
            f"{args.relay_ssl_read_buffer}: the prelude's patch of relay_server.resources did not take"
        )


def run(args: argparse.Namespace) -> Results:
    context = Context()
    started = time.monotonic()
    shell_nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.clients + 2 * args.setups + FD_MARGIN  # the client workers inherit this process's limit
    nofile = _raise_nofile(need)
    if nofile < need:
        raise BenchError(
            f"need {need} file descriptors but RLIMIT_NOFILE stays at {nofile}; run as root or lower --clients"
        )
    relay_nofile = _relay_nofile(args)
    ports = [int(p) for p in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()]
    if args.clients + 2 * args.setups > ports[1] - ports[0]:
        raise BenchError(
            f"{args.clients + 2 * args.setups} connections from 127.0.0.1 exceed the ephemeral port range {ports}"
        )

    print(f"generating {args.clients + 2 * args.setups} Ed25519 identities ...", flush=True)
    idle = [_member(f"idle-{i // args.idle_network_size:05d}") for i in range(args.clients)]
    pairs = [(_member(f"pair-{i:04d}"), _member(f"pair-{i:04d}")) for i in range(args.setups)]
    groups: dict[str, list[Member]] = {}
    for member in [*idle, *(m for pair in pairs for m in pair)]:
        groups.setdefault(member.network, []).append(member)

    workdir = Path(tempfile.mkdtemp(prefix="relay-capacity-"))
    relay: RelayProcess | None = None
    pool: WorkerPool | None = None
    try:
        config = {"listen": "127.0.0.1:0", "self_signed": "tls", "members": _write_members(workdir, groups)}
        text = "[relay]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in config.items())
        if len(text.encode()) > MAX_CONFIG_SIZE:
            raise BenchError(
                f"{len(groups)} networks do not fit a {MAX_CONFIG_SIZE}-byte config; use --idle-network-size"
            )
        (workdir / "relay.toml").write_text(text)
        argv = _relay_argv(args.relay_ssl_read_buffer)
        results = Results(
            context=context,
            relay_command=(
                "python -m traversal relay --config relay.toml"
                if args.relay_ssl_read_buffer is None
                else "python -c PRELUDE relay --config relay.toml"
            ),
            relay_config=(
                f'relay.toml = `[relay] listen = "127.0.0.1:0"`, `self_signed = "tls"`, `members = [...]` '
                f"({len(groups)} networks: {math.ceil(args.clients / args.idle_network_size)} idle of "
                f"{args.idle_network_size} member(s), {args.setups} pairs of 2; one members file each)"
            ),
            workers=args.workers,
            worker_nice=args.worker_nice,
            login_concurrency=args.login_concurrency,
            relay_nofile=relay_nofile,
            nofile_imposed=args.relay_nofile is not None,
            shell_nofile=shell_nofile,
            idle_network_size=args.idle_network_size,
            ssl_read_buffer=args.relay_ssl_read_buffer,
            settle_s=args.settle,
            idle_window_s=args.idle_window,
        )
        print(f"starting the relay ({len(groups)} networks) in {workdir} ...", flush=True)
        relay = RelayProcess(argv, workdir, relay_nofile)
        ca = workdir / "tls" / "cert.pem"
        relay.start(ca)
        results.relay_max_open_files = relay.max_open_files
        _check_relay(relay, args)
        pool = WorkerPool(args.workers, relay.url, ca, args.worker_nice)
        pool.call_same("status", timeout=60)  # every worker is up and has its TLS context
        time.sleep(args.settle)
        results.rss_base_kib = relay.status_kib("VmRSS")
        print(f"relay at {relay.url}, pid {relay.pid}, RSS {_mib(results.rss_base_kib)} MiB", flush=True)

        print(f"1. idle clients: {args.clients}", flush=True)
        run_idle(relay, pool, idle, args, results)
        run_drain(relay, pool, results)
        results.hwm_kib = relay.status_kib("VmHWM")  # the peak so far: the idle clients, or their close
        if pairs:
            print(f"2. session set-ups: {args.setups}", flush=True)
            results.setups = run_setups(relay, pool, pairs, args.concurrency)
        if args.herd:
            print(f"3. reconnect storm: {args.herd} logins at once", flush=True)
            results.herd = run_herd(relay, pool, idle[: args.herd])
        results.rss_end_kib = relay.status_kib("VmRSS")
        pool.close()
        pool = None
        results.relay_exit = relay.stop()
        results.log_events = relay.log_events()
    except BaseException:
        if relay is not None and relay.proc is not None:
            kept = "" if args.keep else " (--keep keeps the whole log)"
            print(f"relay log, last lines{kept}:\n{relay.log_tail()}", file=sys.stderr)
        raise
    finally:
        if pool is not None:
            pool.close()
        if relay is not None:
            relay.stop()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results.runtime_s = time.monotonic() - started
    context.finish()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10_000, help="idle clients to hold (default 10000)")
    parser.add_argument("--setups", type=int, default=200, help="session set-ups to run (default 200)")
    parser.add_argument("--concurrency", type=int, default=20, help="set-ups in flight (default 20)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1000 clients, 50 set-ups, short windows")
    parser.add_argument("--steps", help="comma-separated client counts to stop at (default 10,20,50,100 %% of N)")
    parser.add_argument("--workers", type=int, default=2, help="client worker processes (default 2)")
    parser.add_argument("--worker-nice", type=int, default=10, help="niceness of the workers (default 10)")
    parser.add_argument(
        "--login-concurrency", type=int, default=128, help="logins in flight, all workers (default 128)"
    )
    parser.add_argument("--idle-network-size", type=int, default=1, help="members per idle network (default 1)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds to wait after each step (default 2)")
    parser.add_argument(
        "--idle-window",
        type=float,
        default=RELAY_KEEPALIVE_INTERVAL,
        help=f"quiet window after each step for idle CPU, s (default {RELAY_KEEPALIVE_INTERVAL:.0f}: one relay "
        "keepalive interval, so every client is pinged once in it whatever its phase)",
    )
    parser.add_argument(
        "--relay-ssl-read-buffer",
        type=int,
        metavar="BYTES",
        help=f"experiment: have the relay set asyncio's TLS read buffer (SSLProtocol.max_size) to BYTES instead "
        f"of its own {TLS_READ_BUFFER} (asyncio's stock: {ASYNCIO_TLS_READ_BUFFER})",
    )
    parser.add_argument(
        "--time-limit", type=int, default=600, help="abort the whole run after this many s (default 600)"
    )
    parser.add_argument(
        "--relay-nofile",
        type=int,
        metavar="N",
        help=f"start the relay with N as both its soft and hard RLIMIT_NOFILE, which it cannot raise (to see the "
        f"limit bite); by default it starts with soft {RELAY_START_SOFT_NOFILE} and raises that itself",
    )
    parser.add_argument(
        "--herd",
        type=int,
        default=0,
        metavar="N",
        help="also measure a reconnect storm: N of the idle identities log in at the same moment (default off)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (members, relay log)")
    parser.add_argument("--out", type=Path, default=BENCH / "relay_capacity.md", help="Markdown report")
    parser.add_argument(
        "--json", type=Path, default=BENCH / "relay_capacity.json", help="the figures, for bench/results.py"
    )
    args = parser.parse_args()
    if args.quick:
        args.clients, args.setups = min(args.clients, 1000), min(args.setups, 50)
        args.idle_window = min(args.idle_window, 3.0)
    if args.clients < 1 or args.setups < 0 or args.workers < 1 or args.concurrency < 1:
        parser.error("--clients, --workers and --concurrency must be at least 1, --setups at least 0")
    if not 0 <= args.herd <= args.clients:
        parser.error("--herd must be between 0 and --clients")
    if args.steps and not re.fullmatch(r"[1-9]\d*(,[1-9]\d*)*", args.steps):
        parser.error("--steps must be positive integers separated by commas, e.g. 1000,2000,5000")
    if args.idle_network_size < 1 or args.login_concurrency < 1:
        parser.error("--idle-network-size and --login-concurrency must be at least 1")
    if args.relay_ssl_read_buffer is not None and args.relay_ssl_read_buffer < 16 * 1024 + 256:
        parser.error("--relay-ssl-read-buffer must hold a whole TLS record (at least 16640 bytes)")
    try:
        with _time_limit(args.time_limit):
            results = run(args)
    except BenchError as exc:
        print(f"relay_capacity: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    report = render(results)
    args.out.write_text(report + "\n")
    write_json(args.json, document(results))
    print(f"\nwrote {args.out} and {args.json}\n")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
