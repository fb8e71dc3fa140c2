"""Run traversal inside a NAT lab: a relay in the WAN namespace, a node in each host namespace.

Shared by ``netns-lab/demo.py`` (``make demo``) and the lab tests, so what the
demo shows is what the tests check. Every process is started through
``Lab.popen`` (so ``Lab.down()`` reaps it even if we crash), logs to a file
in the work directory, and is waited for by polling its control socket or
its log with a deadline, never by sleeping and hoping.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RELAY_IP = "203.0.113.1"
RELAY_ALT_IP = "203.0.113.2"
RELAY_PORT = 8443
NETWORK = "chr-001"
OVERLAY = {"a": "10.10.10.3/24", "b": "10.10.10.4/24"}
TRAVERSAL = [sys.executable, "-m", "traversal"]


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


@dataclass
class Overlay:
    lab: Any  # netns-lab/lab.py Lab (loaded by path, hence untyped here)
    workdir: Path
    relay_port: int = RELAY_PORT
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

    def start_relay(self, members: Path, *, extra: list[str] | None = None) -> None:
        argv = [
            *TRAVERSAL,
            "relay",
            "--listen",
            f"{RELAY_IP}:{self.relay_port}",
            "--members",
            f"{NETWORK}:{members}",
            "--self-signed",
            str(self.cert.parent),
            "--stun",
            f"{RELAY_IP}:3478",
            "--stun-alt",
            f"{RELAY_ALT_IP}:3479",
            *(extra or []),
        ]
        self._start("relay", "wan", argv)
        wait_until(
            lambda: self._exited("relay") or "event=relay_listening" in self.log_text("relay"),
            20,
            "the relay to listen",
        )
        self._check_alive("relay")

    def start_peer(self, name: str, peer: str, *, extra: list[str] | None = None) -> subprocess.Popen[Any]:
        """Start node ``name`` in host-``peer`` with the overlay address of that side."""
        argv = [
            *TRAVERSAL,
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
            OVERLAY[peer],
            "--control",
            str(self.control(name)),
            *(extra or []),
        ]
        return self._start(name, f"host-{peer}", argv)

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

    def metrics(self) -> dict[str, float]:
        """The relay's /metrics, fetched over TLS from inside the WAN namespace."""
        code = (
            "import ssl,sys,urllib.request;"
            f"c=ssl.create_default_context(cafile={str(self.cert)!r});"
            f"sys.stdout.write(urllib.request.urlopen('https://{RELAY_IP}:{self.relay_port}/metrics',"
            "context=c,timeout=5).read().decode())"
        )
        proc = self.lab.run("wan", sys.executable, "-c", code, timeout=20)
        return parse_metrics(proc.stdout)


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
