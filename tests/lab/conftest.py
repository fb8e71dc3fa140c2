"""Shared fixtures for the lab tests: load netns-lab/lab.py, build labs that are always torn
down, and a small UDP/TCP tool to run inside lab namespaces.

Lab tests need root, ``ip netns`` and nftables; without them they skip with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import selectors
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
LAB_PATH = REPO / "netns-lab" / "lab.py"

# Runs inside lab namespaces with the venv's python (`python -c NETTOOL mode args...`).
# Every mode is bounded by a deadline and prints one JSON line (servers print "ready").
NETTOOL = r"""
import json, selectors, socket, sys, time

def addr(text):
    host, port = text.rsplit(":", 1)
    return host, int(port)

def echo(binds):
    # Reply to every UDP datagram and TCP connection with the source address we saw.
    # One socket per address: a wildcard socket would answer from the primary address.
    sel = selectors.DefaultSelector()
    for bind in binds:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(addr(bind))
        sel.register(u, selectors.EVENT_READ, "udp")
        t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        t.bind(addr(bind))
        t.listen(16)
        sel.register(t, selectors.EVENT_READ, "tcp")
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            if key.data == "udp":
                data, src = key.fileobj.recvfrom(2048)
                key.fileobj.sendto(f"{src[0]}:{src[1]}".encode(), src)
            else:
                conn, src = key.fileobj.accept()
                conn.sendall(f"{src[0]}:{src[1]}".encode())
                conn.close()

def probe(proto, lport, timeout, dests):
    # Ask each destination which source address it saw, from one local port (UDP) so the
    # answers show the NAT's mapping behaviour.
    mapped = {}
    if proto == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", lport))
        lport = s.getsockname()[1]
        for dest in dests:
            deadline = time.monotonic() + timeout
            mapped[dest] = None
            while mapped[dest] is None and time.monotonic() < deadline:
                s.sendto(b"probe", addr(dest))
                s.settimeout(0.2)
                try:
                    data, src = s.recvfrom(2048)
                except socket.timeout:
                    continue
                if src == addr(dest):
                    mapped[dest] = data.decode()
    else:
        for dest in dests:
            try:
                with socket.create_connection(addr(dest), timeout=timeout) as c:
                    mapped[dest] = c.recv(2048).decode()
            except OSError:
                mapped[dest] = None
    print(json.dumps({"local_port": lport, "mapped": mapped}))

def punch(lport, peer, timeout):
    # Simultaneous open: send until the peer's packet arrives, then a few more so the
    # peer (whose NAT may have dropped our first packets) hears us too.
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", lport))
    s.settimeout(0.05)
    deadline = time.monotonic() + timeout
    got, extra = None, 0
    while time.monotonic() < deadline and extra < 5:
        s.sendto(b"punch", addr(peer))
        extra += got is not None
        try:
            data, src = s.recvfrom(2048)
        except socket.timeout:
            continue
        if got is None and src == addr(peer):
            got = f"{src[0]}:{src[1]}"
    print(json.dumps({"received_from": got}))

def wan_poke(bind, other_ip):
    # On each "hello", answer first from an address the host never contacted
    # ("unsolicited"), then from the contacted one ("marker", which conntrack lets in).
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(addr(bind))
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.bind((other_ip, 0))
    print("ready", flush=True)
    while True:
        data, src = s.recvfrom(2048)
        if data == b"hello":
            other.sendto(b"unsolicited", src)
            s.sendto(b"marker", src)

def host_listen(lport, relay, timeout, grace):
    # Keep a mapping open towards `relay` and report whether the unsolicited packet
    # arrived. Ends as soon as it did, or `grace` seconds after the marker (which was
    # sent after it over the same path) if it did not.
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", lport))
    s.settimeout(0.1)
    deadline = time.monotonic() + timeout
    result = {"unsolicited_from": None, "marker": False}
    marker_at = None
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
            result["unsolicited_from"] = f"{src[0]}:{src[1]}"
        elif data == b"marker" and not result["marker"]:
            result["marker"], marker_at = True, time.monotonic()
    print(json.dumps(result))

mode, args = sys.argv[1], sys.argv[2:]
if mode == "echo":
    echo(args)
elif mode == "probe":
    probe(args[0], int(args[1]), float(args[2]), args[3:])
elif mode == "punch":
    punch(int(args[0]), args[1], float(args[2]))
elif mode == "wan-poke":
    wan_poke(args[0], args[1])
elif mode == "host-listen":
    host_listen(int(args[0]), args[1], float(args[2]), float(args[3]))
else:
    sys.exit(f"unknown mode {mode}")
"""


class NetTool:
    """Runs NETTOOL modes inside a lab's namespaces."""

    def argv(self, mode: str, *args: object) -> list[str]:
        return [sys.executable, "-c", NETTOOL, mode, *map(str, args)]

    def start(self, lab: Any, role: str, mode: str, *args: object, ready_timeout: float = 5.0) -> subprocess.Popen[str]:
        """Start a server mode and wait (bounded) for its "ready" line."""
        proc = lab.popen(role, self.argv(mode, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            if not sel.select(ready_timeout):
                raise AssertionError(f"{mode} in {role} not ready after {ready_timeout} s")
        line = proc.stdout.readline().strip()
        if line != "ready":
            raise AssertionError(f"{mode} in {role} failed: {line!r} {proc.stderr.read() if proc.stderr else ''}")
        return proc

    def run(self, lab: Any, role: str, mode: str, *args: object, timeout: float = 10.0) -> dict[str, Any]:
        """Run a client mode to completion and return its JSON result."""
        proc = lab.run(role, *self.argv(mode, *args), timeout=timeout)
        return json.loads(proc.stdout)


def load_netns_module(name: str) -> ModuleType:
    """A module of netns-lab/ (lab, overlay, ...): its directory name is not importable."""
    module_name = f"traversal_netns_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    path = REPO / "netns-lab" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None, f"cannot load {path}"
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def tear_down_labs(labs: list[Any]) -> None:
    """Tear every lab down, even if one fails; then report the first failure."""
    errors = []
    for lab in labs:
        try:
            lab.down()
        except Exception as exc:  # tear down the others before reporting
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture(scope="session")
def lab_module() -> ModuleType:
    """netns-lab/lab.py as a module."""
    return load_netns_module("lab")


@pytest.fixture(scope="session")
def lab_prerequisites(lab_module: ModuleType) -> None:
    """Skip, with the reason, only when a lab cannot be built here at all."""
    try:
        lab_module.check_prerequisites()
    except lab_module.LabError as exc:
        pytest.skip(f"lab tests need root, ip netns and nft: {exc}")


@pytest.fixture
def lab_factory(lab_module: ModuleType, lab_prerequisites: None) -> Iterator[Callable[..., Any]]:
    """``lab_factory(nat_a=..., nat_b=..., ...)`` builds and returns a running Lab; every
    lab built is torn down when the test ends, whether it passed, failed or timed out."""
    labs: list[Any] = []

    def make(**kwargs: Any) -> Any:
        lab = lab_module.Lab(**kwargs)
        labs.append(lab)  # before up(): a half-built lab is torn down too
        return lab.up()

    yield make
    tear_down_labs(labs)


@pytest.fixture
def nettool() -> NetTool:
    return NetTool()
