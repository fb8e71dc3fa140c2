"""Network-namespace NAT lab: real Linux NATs (nftables) between two hosts and a closed WAN.

Used by people (``python netns-lab/lab.py up --nat-a cone --nat-b symseq``) and by the
lab tests (``tests/lab/conftest.py`` loads this file and builds a :class:`Lab` per test).

Topology (``P`` is the per-run prefix, ``X`` is a peer, ``a`` or ``b``, ``i`` is 1 or 2)::

    P-host-X  eth0 192.168.i.2/24, default via 192.168.i.1
        |
    P-nat-X   lan0 192.168.i.1/24   wan0 203.0.113.1i/24     (nftables NAT, per profile)
        |
    P-wan     br0 203.0.113.1/24 + 203.0.113.2/24            (relay / STUN, two addresses)

``double`` puts ``P-cgn-X`` between the NAT and the WAN (cgn wan0 203.0.113.1i, cgn lan0
100.64.i.1/24, nat wan0 100.64.i.2/24). ``public`` turns ``P-nat-X`` into a plain bridge
and gives the host 203.0.113.2i/24 directly. ``dualstack`` adds routed IPv6 (no NAT66)
to a ``symrand`` NAT: host eth0 2001:db8:i::2/64, nat lan0 2001:db8:i::1/64, nat wan0
2001:db8::1i/64, and br0 2001:db8::1/64 + 2001:db8::2/64 (RELAY_ADDRESSES6). A link
delay for peer X (no netem on this kernel) splices ``P-dly-X`` between the outer NAT's
wan0 and br0: two address-less veth ends joined by delay.py, which delays frames to or
from RELAY_ADDRESSES and RELAY_ADDRESSES6 by the peer's relay delay and all others by
its peer delay. The WAN has no default route and nothing is connected to the root
namespace: the lab is a closed world.

NAT profiles, in RFC 4787 terms (mapping = how the public port is chosen; filtering =
which inbound packets reach the host):

============  ===============================  ====================================  =======
profile       mapping (RFC 4787 s4.1)           filtering (RFC 4787 s5)               inbound
============  ===============================  ====================================  =======
public        none (host has a public address)  none                                   open
cone          endpoint-independent, port        address-and-port-dependent             dropped
              preserved while free              ("port-restricted cone")
fullcone      endpoint-independent, port        endpoint-independent once a mapping    mapped
              preserved                         exists (true "full cone")              ports
symrand       address-and-port-dependent,       address-and-port-dependent             dropped
              random port per new flow
symseq        address-and-port-dependent,       address-and-port-dependent             dropped
              port = base + n * delta
udpblock      TCP/ICMP as cone; UDP from LAN    address-and-port-dependent             dropped
              to WAN is dropped
double        two cone NATs in a row (CGN)      address-and-port-dependent, twice      dropped
dualstack     IPv4 as symrand; IPv6 none (a     IPv4 as symrand; IPv6 stateful         dropped
              global address, no NAT66)         firewall: only replies come in
============  ===============================  ====================================  =======

Every NAT drops unsolicited inbound ``ct state new`` on its WAN side (only ICMP echo to the
router itself is answered). Without that, a peer's early punch packet creates a conntrack
entry and the masquerade later picks another port for our outbound packet, which is not
how home routers behave and breaks hole punching (see DESIGN.md, "The NAT lab").
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import ipaddress
import json
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

PROFILES = ("public", "cone", "fullcone", "symrand", "symseq", "udpblock", "double", "dualstack")
PEERS = ("a", "b")
BASE_ROLES = ("wan", "nat-a", "host-a", "nat-b", "host-b")
#: Every role suffix a lab namespace can carry; down_all() deletes nothing else.
ALL_ROLES = (*BASE_ROLES, "cgn-a", "cgn-b", "dly-a", "dly-b")

RELAY_ADDRESSES = ("203.0.113.1", "203.0.113.2")
WAN_PREFIXLEN = 24
#: The relay / STUN addresses on br0 when a peer is ``dualstack`` (in the compressed form
#: sockets report), and the prefix length of the WAN and of each peer's LAN.
RELAY_ADDRESSES6 = ("2001:db8::1", "2001:db8::2")
PREFIXLEN6 = 64

#: Prefixes are short and start with "tv" so crashed runs are recognisable and namespace
#: names stay readable; the random part keeps parallel runs apart.
PREFIX_RE = re.compile(r"^tv[0-9a-z]{1,12}$")
#: Roles of the multi-site labs of netns-lab/mesh.py (MeshLab): a NAT per site sK (and a CGN
#: for a ``double`` site), a host per peer pN, K and N from 1 to 99.
MESH_ROLE_PATTERNS = (r"nat-s[1-9][0-9]?", r"cgn-s[1-9][0-9]?", r"host-p[1-9][0-9]?")
NAMESPACE_RE = re.compile(
    r"^(tv[0-9a-z]{1,12})-(" + "|".join([*(re.escape(r) for r in ALL_ROLES), *MESH_ROLE_PATTERNS]) + r")$"
)

STATE_DIR = Path("/run/traversal-lab")

#: First public port and default step of the sequential symmetric NAT, and how many
#: consecutive allocations it makes before wrapping around.
SYMSEQ_BASE_PORT = 20000
SYMSEQ_SLOTS = 256

#: Outbound traffic keeps a full-cone mapping open this long (like a conntrack UDP stream).
FULLCONE_MAPPING_TIMEOUT_S = 120

COMMAND_TIMEOUT_S = 15.0
#: The seed's geography as Lab keyword arguments: peers 7 and 8 ms from each other's side of the
#: WAN, 20 ms each from the relay, so about 30 ms direct and 80 ms through the relay (RTT).
SEED_GEOGRAPHY = {"delay_a_ms": 7, "delay_b_ms": 8, "relay_delay_a_ms": 20, "relay_delay_b_ms": 20}

#: The link-delay forwarder (a userspace stand-in for netem, which this kernel lacks),
#: how long Lab.up() waits for it to say "ready", and the largest delay accepted (its
#: queue holds at most 10,000 frames per direction, so huge delays would only drop).
DELAY_FORWARDER = Path(__file__).resolve().with_name("delay.py")
DELAY_READY_TIMEOUT_S = 10.0
MAX_DELAY_MS = 5000


class LabError(Exception):
    """Building, using or tearing down the lab failed; the message says what to do."""


class LabCommandError(LabError):
    """A command run for the lab exited non-zero."""

    def __init__(self, argv: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        detail = (stderr or stdout).strip().splitlines()
        super().__init__(f"{' '.join(self.argv)!r} exited {returncode}: {detail[-1] if detail else 'no output'}")


# --- nftables rulesets, one small function per profile -------------------------------------
#
# All NAT namespaces name their interfaces the same way: "wan0" faces the internet (or the
# CGN), "lan0" faces the host. Rulesets live in one table, "ip lab", so `nft list ruleset`
# inside a namespace shows exactly what the profile does.

_INBOUND_GUARD = """\
    chain input {
        type filter hook input priority filter; policy accept;
        # The router itself answers pings, which helps debugging and opens no NAT port.
        iifname "wan0" ct state new icmp type echo-request accept
        # Unsolicited inbound: dropping it before conntrack confirms the entry keeps a
        # peer's early punch packet from occupying the tuple our own mapping needs.
        iifname "wan0" ct state new counter drop comment "unsolicited inbound"
    }
"""


def _forward_chain(extra: str = "") -> str:
    return f"""\
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
{extra}        iifname "lan0" oifname "wan0" accept
        iifname "wan0" counter drop comment "unsolicited inbound"
    }}
"""


def ruleset_cone() -> str:
    """Endpoint-independent mapping (masquerade keeps the port while it is free),
    address-and-port-dependent filtering (only conntrack replies come back in)."""
    return f"""\
table ip lab {{
{_INBOUND_GUARD}{_forward_chain()}    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan0" masquerade
    }}
}}
"""


def ruleset_fullcone(wan_address: str, host_address: str) -> str:
    """Endpoint-independent mapping and filtering.

    Outbound UDP/TCP is source-NATed with the port preserved (one host per NAT, so the
    port is always free) and its (protocol, port) is recorded in a timed set that every
    outbound packet refreshes. Inbound new flows to a recorded port are DNATed to the
    host whatever their source: a mapping, once made, accepts anyone (RFC 4787 s5,
    endpoint-independent filtering). Ports never used outbound stay closed.
    """
    inbound_dnat = '        iifname "wan0" oifname "lan0" ct status dnat accept\n'
    return f"""\
table ip lab {{
    set mapped {{
        type inet_proto . inet_service
        flags dynamic, timeout
        timeout {FULLCONE_MAPPING_TIMEOUT_S}s
    }}
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "wan0" meta l4proto . th dport @mapped counter dnat to {host_address}
    }}
    chain track_mappings {{
        # Before the forward chain's "established" shortcut, so every outbound packet,
        # not just a flow's first, refreshes its port: the mapping lives while it is used.
        type filter hook forward priority mangle; policy accept;
        iifname "lan0" oifname "wan0" meta l4proto {{ tcp, udp }} update @mapped {{ meta l4proto . th sport }}
    }}
{_INBOUND_GUARD}{_forward_chain(inbound_dnat)}    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan0" snat to {wan_address}
    }}
}}
"""


def ruleset_symrand() -> str:
    """Address-and-port-dependent mapping with a random public port for every new flow
    (``masquerade random`` randomises even when the original port is free)."""
    return f"""\
table ip lab {{
{_INBOUND_GUARD}{_forward_chain()}    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan0" masquerade random
    }}
}}
"""


def ruleset_symseq(wan_address: str, base_port: int, delta: int) -> str:
    """Address-and-port-dependent mapping with sequential ports: the n-th new UDP/TCP flow
    gets ``base_port + n * delta`` (mod SYMSEQ_SLOTS), whatever its destination.

    The map turns the counter into a port because ``numgen`` alone yields a host byte
    order value that snat would use as a network byte order port (LIBRARY-NOTES.md).
    NAT chains see only a flow's first packet, so the counter advances once per flow.
    """
    last = base_port + (SYMSEQ_SLOTS - 1) * delta
    if delta < 1 or last > 65535:
        raise LabError(f"symseq delta {delta} runs past port 65535: use a delta of 1..{(65535 - base_port) // 255}")
    slots = ", ".join(f"{n} : {base_port + n * delta}" for n in range(SYMSEQ_SLOTS))
    port = f"numgen inc mod {SYMSEQ_SLOTS} map {{ {slots} }}"
    return f"""\
table ip lab {{
{_INBOUND_GUARD}{_forward_chain()}    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan0" meta l4proto {{ tcp, udp }} snat to {wan_address} : {port}
        oifname "wan0" masquerade
    }}
}}
"""


def ruleset_udpblock() -> str:
    """UDP from the LAN never leaves (a firewall that only allows TCP); TCP and ICMP are
    masqueraded as in ``cone``. Clients must fall back to the relay over TCP."""
    udp_drop = '        iifname "lan0" oifname "wan0" meta l4proto udp counter drop comment "udp blocked"\n'
    return f"""\
table ip lab {{
{_INBOUND_GUARD}{_forward_chain(udp_drop)}    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan0" masquerade
    }}
}}
"""


def ruleset_ipv6_firewall() -> str:
    """A home router's IPv6 firewall (RFC 6092): global addresses, no NAT66, and a stateful
    filter. The LAN may open flows; from the WAN only their replies, and the ICMPv6 errors
    about them (``related``: packet too big, unreachable), come in. New inbound flows,
    echo requests to the hosts included, are dropped, as most home routers do."""
    return """\
table ip6 lab {
    chain input {
        type filter hook input priority filter; policy accept;
        # Conntrack leaves neighbour discovery untracked, and without it nothing on a link
        # can reach anything (RFC 4890): accept it before any ct state rule.
        icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, nd-router-advert } accept
        # As over IPv4, the router itself answers pings.
        iifname "wan0" ct state new icmpv6 type echo-request accept
        iifname "wan0" ct state new counter drop comment "unsolicited inbound"
    }
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "lan0" oifname "wan0" accept
        iifname "wan0" counter drop comment "unsolicited inbound"
    }
}
"""


def ruleset_dualstack() -> str:
    """IPv4 exactly as ``symrand``, plus IPv6 routed through a stateful firewall: two
    hosts that both send first meet directly over IPv6 (each one's outbound packet lets
    the other's in), while their IPv4 NATs would defeat port prediction."""
    return ruleset_symrand() + ruleset_ipv6_firewall()


# --- namespace helpers shared by Lab and down_all ------------------------------------------


def _run(argv: Sequence[str], *, timeout: float = COMMAND_TIMEOUT_S, input: str | None = None) -> str:
    try:
        proc = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise LabError(f"{argv[0]} not found: install iproute2 and nftables") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{' '.join(argv)!r} timed out after {timeout:.0f} s") from exc
    if proc.returncode != 0:
        raise LabCommandError(argv, proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout


def list_namespaces() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    out = _run(["ip", "netns", "list"])
    # Lines look like "name (id: 3)" or just "name".
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def is_lab_namespace(name: str) -> bool:
    """True if ``name`` follows the lab's naming scheme (``tv<id>-<role>``)."""
    return NAMESPACE_RE.match(name) is not None


def _kill_namespace_processes(ns: str, *, deadline_s: float = 5.0) -> None:
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            pids = [int(p) for p in _run(["ip", "netns", "pids", ns]).split()]
        except LabCommandError:
            return  # namespace already gone
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise LabError(f"processes {pids} in namespace {ns} survive SIGKILL; check `ip netns pids {ns}`")
        time.sleep(0.02)


def _teardown_prefix(prefix: str, state_dir: Path) -> list[str]:
    """Kill processes in and delete every namespace of one lab; returns the names deleted."""
    existing = [ns for ns in list_namespaces() if NAMESPACE_RE.match(ns) and ns.startswith(prefix + "-")]
    # Kill everywhere first: a process in one namespace may hold sockets peers still use.
    for ns in existing:
        _kill_namespace_processes(ns)
    for ns in existing:
        with contextlib.suppress(LabCommandError):  # raced with another teardown
            _run(["ip", "netns", "del", ns])
    with contextlib.suppress(FileNotFoundError):
        (state_dir / f"{prefix}.json").unlink()
    return existing


def down_all(prefix_pattern: str = "tv*", *, state_dir: Path = STATE_DIR) -> list[str]:
    """Remove leftovers of crashed runs: every namespace whose name follows the lab scheme
    and whose prefix matches the shell pattern ``prefix_pattern``. Returns the names deleted.
    Namespaces that merely start with "tv" but do not end in a lab role are never touched."""
    prefixes = set()
    for ns in list_namespaces():
        match = NAMESPACE_RE.match(ns)
        if match and fnmatch.fnmatchcase(match.group(1), prefix_pattern):
            prefixes.add(match.group(1))
    if state_dir.is_dir():
        # A state file without namespaces (crash between writes) is stale too.
        for path in state_dir.glob("*.json"):
            if PREFIX_RE.match(path.stem) and fnmatch.fnmatchcase(path.stem, prefix_pattern):
                prefixes.add(path.stem)
    deleted: list[str] = []
    for prefix in sorted(prefixes):
        deleted += _teardown_prefix(prefix, state_dir)
    return deleted


def check_prerequisites() -> None:
    """Raise LabError with a one-line reason if this machine cannot build a lab."""
    if os.geteuid() != 0:
        raise LabError("not root: the lab needs root to create network namespaces")
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("sysctl", "procps")):
        if shutil.which(tool) is None:
            raise LabError(f"{tool} not found: install {package}")
    try:
        list_namespaces()
    except LabError as exc:
        raise LabError(f"`ip netns` does not work here: {exc}") from exc


def _interfaces(ns: str) -> list[dict[str, Any]]:
    return json.loads(_run(["ip", "-n", ns, "-j", "-4", "addr", "show"]) or "[]")


# --- the lab -------------------------------------------------------------------------------


class NamespaceSet:
    """What every lab shares (:class:`Lab`, and ``mesh.py``'s ``MeshLab``): commands run inside
    its namespaces, the processes it started, and building and tearing down all of it.

    A subclass plans ``prefix``, ``state_dir``, ``namespaces`` and ``ns(role)``, starts with
    ``_procs = []`` and ``_up = False``, and provides ``_build()`` and ``_write_state()``.
    """

    prefix: str
    state_dir: Path
    _procs: list[subprocess.Popen[Any]]
    _up: bool

    @property
    def namespaces(self) -> list[str]:
        raise NotImplementedError

    def ns(self, role: str) -> str:
        raise NotImplementedError

    def _build(self) -> None:
        raise NotImplementedError

    def _write_state(self) -> None:
        raise NotImplementedError

    # -- running things inside ------------------------------------------------------------

    def exec_argv(self, role: str, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside the namespace of ``role``."""
        return ["ip", "netns", "exec", self.ns(role), *argv]

    def run(
        self, role: str, *argv: str, check: bool = True, timeout: float = COMMAND_TIMEOUT_S, **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        """Run a command to completion inside ``role``; output is captured as text unless
        ``stdout``/``stderr`` are given. ``check`` raises LabCommandError on non-zero exit."""
        if "stdout" not in kwargs and "stderr" not in kwargs:
            kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        full = self.exec_argv(role, argv)
        proc = subprocess.run(full, timeout=timeout, check=False, **kwargs)
        if check and proc.returncode != 0:
            raise LabCommandError(full, proc.returncode, proc.stdout or "", proc.stderr or "")
        return proc

    def popen(self, role: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a long-running command inside ``role``. ``down()`` kills and reaps it."""
        # `ip netns exec` execs the command, so the Popen pid is the command itself.
        proc = subprocess.Popen(self.exec_argv(role, argv), **kwargs)
        self._procs.append(proc)
        return proc

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.up()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.down()

    def up(self) -> Self:
        """Build every namespace, link, address, route, sysctl and ruleset. On any failure
        the partial lab is torn down before the LabError propagates."""
        if self._up:
            return self
        check_prerequisites()
        taken = set(list_namespaces()) & set(self.namespaces)
        if taken:
            raise LabError(f"namespaces {sorted(taken)} exist: pick another prefix or run `lab.py down --all`")
        try:
            self._build()
            self._write_state()
        except BaseException:
            self.down()
            raise
        self._up = True
        return self

    def down(self) -> None:
        """Kill every process in the lab's namespaces and delete them. Safe to call twice,
        or on a lab that never came up."""
        try:
            _teardown_prefix(self.prefix, self.state_dir)
        finally:
            for proc in self._procs:
                # Killed above via `ip netns pids`; this reaps them (and catches any that
                # were still in `ip netns exec` before entering the namespace).
                if proc.poll() is None:
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
            self._procs.clear()
            self._up = False

    def _veth(self, ns1: str, name1: str, ns2: str, name2: str) -> None:
        # Both ends are created directly inside lab namespaces: nothing ever appears in
        # the root namespace, not even for an instant.
        _run(["ip", "link", "add", name1, "netns", ns1, "type", "veth", "peer", "name", name2, "netns", ns2])
        _run(["ip", "-n", ns1, "link", "set", name1, "up"])
        _run(["ip", "-n", ns2, "link", "set", name2, "up"])

    def _sysctl(self, ns: str, setting: str) -> None:
        # Inside the namespace only: net.ipv4.* sysctls are per network namespace.
        _run(["ip", "netns", "exec", ns, "sysctl", "-qw", setting])


class Lab(NamespaceSet):
    """One NAT lab: a WAN, and for each of peers a and b a NAT (per profile) and a host.

    ``Lab(nat_a="cone", nat_b="symseq")`` plans names and addresses; ``up()`` builds it,
    ``down()`` (idempotent) kills every process inside and deletes the namespaces. Use it
    as a context manager to get ``down()`` on every exit path.
    """

    def __init__(
        self,
        *,
        nat_a: str = "cone",
        nat_b: str = "cone",
        prefix: str | None = None,
        symseq_delta: int = 1,
        delay_a_ms: int = 0,
        delay_b_ms: int = 0,
        relay_delay_a_ms: int | None = None,
        relay_delay_b_ms: int | None = None,
        state_dir: Path = STATE_DIR,
    ) -> None:
        for peer, profile in (("a", nat_a), ("b", nat_b)):
            if profile not in PROFILES:
                raise LabError(f"unknown NAT profile {profile!r} for peer {peer}: choose from {', '.join(PROFILES)}")
        self.prefix = prefix if prefix is not None else "tv" + secrets.token_hex(2)
        if not PREFIX_RE.match(self.prefix):
            raise LabError(f"bad prefix {self.prefix!r}: use 'tv' followed by 1-12 lowercase letters or digits")
        delays = (("a", "", delay_a_ms), ("b", "", delay_b_ms))
        relay_delays = (("a", "relay ", relay_delay_a_ms), ("b", "relay ", relay_delay_b_ms))
        for peer, kind, delay in (*delays, *(d for d in relay_delays if d[2] is not None)):
            if not isinstance(delay, int) or isinstance(delay, bool) or not 0 <= delay <= MAX_DELAY_MS:
                raise LabError(f"bad {kind}delay {delay!r} for peer {peer}: use whole milliseconds, 0..{MAX_DELAY_MS}")
        #: One-way delay, in ms, each direction, of everything peer X exchanges with the WAN
        #: except the relay: the other peer, ARP.
        self.delays_ms = {"a": delay_a_ms, "b": delay_b_ms}
        #: One-way delay, in ms, each direction, between peer X and RELAY_ADDRESSES (the
        #: peer delay unless given). Direct RTT a<->b is 2*(dA+dB), relayed 2*(rA+rB).
        self.relay_delays_ms = {
            "a": delay_a_ms if relay_delay_a_ms is None else relay_delay_a_ms,
            "b": delay_b_ms if relay_delay_b_ms is None else relay_delay_b_ms,
        }
        self._forwarders: dict[str, subprocess.Popen[Any]] = {}
        self.profiles = {"a": nat_a, "b": nat_b}
        self.symseq_delta = symseq_delta
        self.state_dir = state_dir
        self._procs: list[subprocess.Popen[Any]] = []
        self._up = False
        self.addresses = self._plan_addresses()
        #: IPv6 addresses (CIDR) per role; only ``dualstack`` peers and then the WAN have any.
        self.addresses6 = self._plan_addresses6()

    # -- naming and addressing ------------------------------------------------------------

    @property
    def roles(self) -> tuple[str, ...]:
        """Roles present in this lab: the five base roles plus cgn-X for ``double`` peers
        and dly-X for peers with a link delay."""
        extra = tuple(f"cgn-{p}" for p in PEERS if self.profiles[p] == "double")
        delayed = tuple(f"dly-{p}" for p in PEERS if self.has_delay_link(p))
        return BASE_ROLES + extra + delayed

    def has_delay_link(self, peer: str) -> bool:
        """True if peer's WAN link runs through P-dly-X: it has a delay of either kind."""
        return bool(self.delays_ms[peer] or self.relay_delays_ms[peer])

    def ns(self, role: str) -> str:
        """Namespace name of ``role`` (e.g. "host-a" -> "tv1a2b-host-a")."""
        if role not in self.roles:
            raise LabError(f"no role {role!r} in this lab: roles are {', '.join(self.roles)}")
        return f"{self.prefix}-{role}"

    @property
    def namespaces(self) -> list[str]:
        return [self.ns(role) for role in self.roles]

    def _plan_addresses(self) -> dict[str, list[str]]:
        plan: dict[str, list[str]] = {"wan": [f"{a}/{WAN_PREFIXLEN}" for a in RELAY_ADDRESSES]}
        for i, peer in enumerate(PEERS, start=1):
            profile = self.profiles[peer]
            wan = f"203.0.113.1{i}/{WAN_PREFIXLEN}"
            if profile == "public":
                plan[f"nat-{peer}"] = [wan]
                plan[f"host-{peer}"] = [f"203.0.113.2{i}/{WAN_PREFIXLEN}"]
                continue
            if profile == "double":
                plan[f"cgn-{peer}"] = [wan, f"100.64.{i}.1/24"]
                plan[f"nat-{peer}"] = [f"100.64.{i}.2/24", f"192.168.{i}.1/24"]
            else:
                plan[f"nat-{peer}"] = [wan, f"192.168.{i}.1/24"]
            plan[f"host-{peer}"] = [f"192.168.{i}.2/24"]
        return plan

    def _plan_addresses6(self) -> dict[str, list[str]]:
        peers: dict[str, list[str]] = {}
        for i, peer in enumerate(PEERS, start=1):
            if self.profiles[peer] == "dualstack":
                peers[f"nat-{peer}"] = [f"2001:db8::1{i}/{PREFIXLEN6}", f"2001:db8:{i}::1/{PREFIXLEN6}"]
                peers[f"host-{peer}"] = [f"2001:db8:{i}::2/{PREFIXLEN6}"]
        if not peers:
            return {}
        return {"wan": [f"{a}/{PREFIXLEN6}" for a in RELAY_ADDRESSES6], **peers}

    def has_ipv6(self, peer: str) -> bool:
        """True if peer's host has a global IPv6 address (the ``dualstack`` profile)."""
        return f"host-{peer}" in self.addresses6

    def host_address6(self, peer: str) -> str:
        """The host's global IPv6 address (what its IPv6 sockets bind to)."""
        if not self.has_ipv6(peer):
            raise LabError(f"peer {peer} ({self.profiles[peer]}) has no IPv6: use the dualstack profile")
        return self.addresses6[f"host-{peer}"][0].split("/")[0]

    def public_address6(self, peer: str) -> str:
        """The IPv6 address the WAN sees for this peer's host: its own (no NAT66)."""
        return self.host_address6(peer)

    def host_address(self, peer: str) -> str:
        """The host's own address (what its sockets bind to)."""
        return self.addresses[f"host-{peer}"][0].split("/")[0]

    def public_address(self, peer: str) -> str:
        """The address the WAN sees for traffic from this peer's host (its mapped address)."""
        if self.profiles[peer] == "public":
            return self.host_address(peer)
        outer = f"cgn-{peer}" if self.profiles[peer] == "double" else f"nat-{peer}"
        return self.addresses[outer][0].split("/")[0]

    def _build(self) -> None:
        for ns in self.namespaces:
            _run(["ip", "netns", "add", ns])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        for role in self.addresses6:
            # Before any interface exists, so link-local addresses skip DAD too: a router
            # sends neighbour solicitations for forwarded packets only from a usable
            # link-local address, and a tentative one would stall the first second.
            for scope in ("all", "default"):
                self._sysctl(self.ns(role), f"net.ipv6.conf.{scope}.accept_dad=0")
        wan = self.ns("wan")
        _run(["ip", "-n", wan, "link", "add", "br0", "type", "bridge"])
        for cidr in self.addresses["wan"] + self.addresses6.get("wan", []):
            _run(["ip", "-n", wan, "addr", "add", cidr, "dev", "br0"])
        _run(["ip", "-n", wan, "link", "set", "br0", "up"])
        for peer in PEERS:
            self._build_peer(peer)
        self._route_ipv6()
        for peer in PEERS:
            if self.has_delay_link(peer):
                self._start_delay_forwarder(peer)

    def _addr(self, ns: str, cidr: str, dev: str) -> None:
        _run(["ip", "-n", ns, "addr", "add", cidr, "dev", dev])

    def _build_peer(self, peer: str) -> None:
        profile = self.profiles[peer]
        wan, nat, host = self.ns("wan"), self.ns(f"nat-{peer}"), self.ns(f"host-{peer}")
        nat_addrs, host_addr = self.addresses[f"nat-{peer}"], self.addresses[f"host-{peer}"][0]
        outer = self.ns(f"cgn-{peer}") if profile == "double" else nat
        # The namespace facing the WAN gets a port on the WAN bridge; with a delay, through
        # P-dly-X, so every packet of this peer to the WAN (relay, STUN, the other peer)
        # crosses the forwarder, which picks the delay by the far end's address.
        if self.has_delay_link(peer):
            self._build_delay_link(peer, outer)
        else:
            self._veth(outer, "wan0", wan, f"port-{peer}")
        _run(["ip", "-n", wan, "link", "set", f"port-{peer}", "master", "br0"])
        self._veth(nat, "lan0", host, "eth0")
        for ns in {outer, nat}:
            self._sysctl(ns, "net.ipv4.ip_forward=1")

        if profile == "public":
            # A modem in bridge mode: the host sits on the WAN segment with its own address.
            _run(["ip", "-n", nat, "link", "add", "br0", "type", "bridge"])
            for dev in ("wan0", "lan0"):
                _run(["ip", "-n", nat, "link", "set", dev, "master", "br0"])
            self._addr(nat, nat_addrs[0], "br0")
            _run(["ip", "-n", nat, "link", "set", "br0", "up"])
            self._addr(host, host_addr, "eth0")
            return

        if profile == "double":
            cgn_wan, cgn_lan = self.addresses[f"cgn-{peer}"]
            self._veth(outer, "lan0", nat, "wan0")
            self._addr(outer, cgn_wan, "wan0")
            self._addr(outer, cgn_lan, "lan0")
            self._load_ruleset(outer, ruleset_cone())
            nat_wan, nat_lan = nat_addrs
            self._addr(nat, nat_wan, "wan0")
            _run(["ip", "-n", nat, "route", "add", "default", "via", cgn_lan.split("/")[0]])
        else:
            nat_wan, nat_lan = nat_addrs
            self._addr(nat, nat_wan, "wan0")
        self._addr(nat, nat_lan, "lan0")
        self._addr(host, host_addr, "eth0")
        _run(["ip", "-n", host, "route", "add", "default", "via", nat_lan.split("/")[0]])
        if self.has_ipv6(peer):
            # A router, not a NAT66: the host's global address is what the WAN sees.
            nat6_wan, nat6_lan = self.addresses6[f"nat-{peer}"]
            self._sysctl(nat, "net.ipv6.conf.all.forwarding=1")
            self._addr(nat, nat6_wan, "wan0")
            self._addr(nat, nat6_lan, "lan0")
            self._addr(host, self.addresses6[f"host-{peer}"][0], "eth0")
            _run(["ip", "-n", host, "-6", "route", "add", "default", "via", nat6_lan.split("/")[0], "dev", "eth0"])
        self._load_ruleset(nat, self._ruleset(peer))

    def _route_ipv6(self) -> None:
        """Route each dualstack LAN prefix via its router's WAN address, from the WAN and
        from the other router. br0 stands for the whole IPv6 internet, as its one /24 does
        for IPv4, so only the routers forward and the WAN keeps no default route."""
        routers = [peer for peer in PEERS if self.has_ipv6(peer)]
        for peer in routers:
            router_wan, router_lan = self.addresses6[f"nat-{peer}"]
            prefix, via = str(ipaddress.ip_interface(router_lan).network), router_wan.split("/")[0]
            _run(["ip", "-n", self.ns("wan"), "-6", "route", "add", prefix, "via", via, "dev", "br0"])
            for other in routers:
                if other != peer:
                    _run(["ip", "-n", self.ns(f"nat-{other}"), "-6", "route", "add", prefix, "via", via, "dev", "wan0"])

    def _build_delay_link(self, peer: str, outer: str) -> None:
        """``outer`` wan0 <-> P-dly-X lan0 [forwarder] P-dly-X wan0 <-> P-wan port-X (on br0).

        P-dly-X is a wire, not a host: no addresses, no IPv6 (which would otherwise send
        router solicitations and MLD reports of its own), no forwarding. Everything that
        crosses it is forwarded by delay.py, started once the lab is wired."""
        dly, wan = self.ns(f"dly-{peer}"), self.ns("wan")
        if Path("/proc/sys/net/ipv6").is_dir():
            # Before the veths exist, so they are born without IPv6 and never send a packet.
            for scope in ("all", "default"):
                self._sysctl(dly, f"net.ipv6.conf.{scope}.disable_ipv6=1")
        self._veth(outer, "wan0", dly, "lan0")
        self._veth(dly, "wan0", wan, f"port-{peer}")

    def _start_delay_forwarder(self, peer: str) -> None:
        """Run delay.py in P-dly-X and wait (bounded) for its "ready"."""
        dly = self.ns(f"dly-{peer}")
        argv = [sys.executable, str(DELAY_FORWARDER), "--delay-ms", str(self.delays_ms[peer]), "--netns", dly]
        argv += ["--relay-delay-ms", str(self.relay_delays_ms[peer])]
        for address in RELAY_ADDRESSES + RELAY_ADDRESSES6:
            argv += ["--relay", address]
        # stderr goes to an unlinked file: readable here if startup fails, and the
        # forwarder can still write its exit summary after `lab.py up` has exited.
        # A new session keeps terminal signals (Ctrl-C, hangup) of `lab.py up` away from it.
        with tempfile.TemporaryFile() as errors:
            proc = self.popen(
                "dly-" + peer,
                [*argv, "lan0", "wan0"],
                stdout=subprocess.PIPE,
                stderr=errors,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            self._forwarders[peer] = proc
            assert proc.stdout is not None
            with proc.stdout, selectors.DefaultSelector() as sel:
                sel.register(proc.stdout, selectors.EVENT_READ)
                line = proc.stdout.readline().strip() if sel.select(DELAY_READY_TIMEOUT_S) else b""
                if line == b"ready":
                    return
                proc.kill()
                proc.wait(timeout=5)
                errors.seek(0)
                detail = errors.read().decode(errors="replace").strip().splitlines()
        why = detail[-1] if detail else f"no 'ready' within {DELAY_READY_TIMEOUT_S:.0f} s"
        raise LabError(f"delay forwarder for peer {peer} did not start: {why}")

    @property
    def forwarders(self) -> Mapping[str, subprocess.Popen[Any]]:
        """The delay forwarder processes this object started, per peer (none for a lab
        attached from another process; ``down()`` kills them with everything else)."""
        return dict(self._forwarders)

    def _ruleset(self, peer: str) -> str:
        profile = self.profiles[peer]
        wan_address = self.addresses[f"nat-{peer}"][0].split("/")[0]
        if profile in ("cone", "double"):
            return ruleset_cone()
        if profile == "fullcone":
            return ruleset_fullcone(wan_address, self.host_address(peer))
        if profile == "symrand":
            return ruleset_symrand()
        if profile == "dualstack":
            return ruleset_dualstack()
        if profile == "symseq":
            return ruleset_symseq(wan_address, SYMSEQ_BASE_PORT, self.symseq_delta)
        if profile == "udpblock":
            return ruleset_udpblock()
        raise LabError(f"no ruleset for profile {profile!r}")

    def _load_ruleset(self, ns: str, ruleset: str) -> None:
        _run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=ruleset)

    # -- state ----------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "profiles": self.profiles,
            "symseq_delta": self.symseq_delta,
            "delays_ms": self.delays_ms,
            "relay_delays_ms": self.relay_delays_ms,
            "namespaces": {role: self.ns(role) for role in self.roles},
            "addresses": self.addresses,
            "public": {p: self.public_address(p) for p in PEERS},
            "relay": list(RELAY_ADDRESSES),
            # Only dualstack peers (and then the WAN) have IPv6.
            "addresses6": self.addresses6,
            "public6": {p: self.public_address6(p) for p in PEERS if self.has_ipv6(p)},
            "relay6": list(RELAY_ADDRESSES6) if self.addresses6 else [],
        }

    def _write_state(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.state_dir / f"{self.prefix}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._state(), indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def attach(cls, prefix: str, *, state_dir: Path = STATE_DIR) -> Lab:
        """A Lab object for a lab another process brought up (from its state file)."""
        path = state_dir / f"{prefix}.json"
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise LabError(f"no lab with prefix {prefix!r} (no {path}); see `lab.py status`") from exc
        if state.get("kind") == "mesh":
            raise LabError(f"lab {prefix} is a multi-site mesh: use netns-lab/mesh.py (MeshLab.attach)")
        lab = cls(
            nat_a=state["profiles"]["a"],
            nat_b=state["profiles"]["b"],
            prefix=prefix,
            symseq_delta=state.get("symseq_delta", 1),
            delay_a_ms=state.get("delays_ms", {}).get("a", 0),
            delay_b_ms=state.get("delays_ms", {}).get("b", 0),
            # State files from before relay delays: None, the peer delay, as then.
            relay_delay_a_ms=state.get("relay_delays_ms", {}).get("a"),
            relay_delay_b_ms=state.get("relay_delays_ms", {}).get("b"),
            state_dir=state_dir,
        )
        lab._up = True
        return lab

    def status(self) -> dict[str, Any]:
        """The planned lab plus what actually exists: per role, the namespace, whether it
        exists, and the IPv4 addresses found on its interfaces."""
        existing = set(list_namespaces())
        roles: dict[str, Any] = {}
        for role in self.roles:
            ns = self.ns(role)
            found: dict[str, list[str]] = {}
            if ns in existing:
                for iface in _interfaces(ns):
                    cidrs = [f"{a['local']}/{a['prefixlen']}" for a in iface.get("addr_info", [])]
                    if cidrs and iface["ifname"] != "lo":
                        found[iface["ifname"]] = cidrs
            roles[role] = {"namespace": ns, "exists": ns in existing, "addresses": found}
        # A delayed peer whose forwarder died has no WAN link at all: make that visible.
        forwarding = {}
        for peer in PEERS:
            ns = f"{self.prefix}-dly-{peer}"
            if self.has_delay_link(peer) and ns in existing:
                forwarding[peer] = bool(_run(["ip", "netns", "pids", ns]).split())
            elif self.has_delay_link(peer):
                forwarding[peer] = False
        return {**self._state(), "roles": roles, "delay_forwarder_running": forwarding}


# --- CLI -----------------------------------------------------------------------------------


def _print_lab(state: Mapping[str, Any]) -> None:
    profiles = state["profiles"]
    print(f"lab {state['prefix']}: nat-a={profiles['a']} nat-b={profiles['b']}")
    print(f"  relay/STUN (wan): {', '.join(state['relay'] + state.get('relay6', []))}")
    roles = state.get("roles")
    for role, ns in state["namespaces"].items():
        if roles is not None:
            info = roles[role]
            addrs = "; ".join(f"{dev} {' '.join(c)}" for dev, c in info["addresses"].items()) or "-"
            mark = "" if info["exists"] else "  (MISSING)"
            print(f"  {role:7} {ns:22} {addrs}{mark}")
        else:
            print(f"  {role:7} {ns:22} {' '.join(state['addresses'][role])}")
    public6 = state.get("public6", {})
    for peer in PEERS:
        also = f" and {public6[peer]} (IPv6, no NAT66)" if peer in public6 else ""
        print(f"  peer {peer} is seen on the WAN as {state['public'][peer]}{also}")
    delays = state.get("delays_ms", {})
    relay_delays = state.get("relay_delays_ms", delays)
    for peer in PEERS:
        delay, relay_delay = delays.get(peer, 0), relay_delays.get(peer, 0)
        if not (delay or relay_delay):
            continue
        running = state.get("delay_forwarder_running", {}).get(peer)
        # With two delays, the "expected RTT" line below gives the arithmetic.
        notes = [f"+{2 * delay} ms RTT to the WAN"] if relay_delay == delay else []
        if running is not None:
            notes.append("forwarder running" if running else "FORWARDER NOT RUNNING")
        line = f"  peer {peer} link delay: {delay} ms each way"
        if relay_delay != delay:
            line += f", {relay_delay} ms each way to/from the relay"
        print(f"{line} ({', '.join(notes)})" if notes else line)
    if any(delays.values()) or any(relay_delays.values()):
        # What a path decision should see: the relay sits on br0, so a relayed packet
        # crosses both relay delays and a direct one both peer delays, each way.
        direct = 2 * sum(delays.get(p, 0) for p in PEERS)
        relayed = 2 * sum(relay_delays.get(p, 0) for p in PEERS)
        print(f"  expected RTT host-a <-> host-b: {direct} ms direct, {relayed} ms via the relay (+ processing)")


def _mesh_state(prefix: str, state_dir: Path) -> dict[str, Any] | None:
    """The state file of a multi-site lab (netns-lab/mesh.py) with ``prefix``, or None."""
    try:
        state = json.loads((state_dir / f"{prefix}.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return state if isinstance(state, dict) and state.get("kind") == "mesh" else None


def _print_mesh(state: Mapping[str, Any]) -> None:
    sites = state["sites"]
    print(f"lab {state['prefix']}: multi-site mesh (netns-lab/mesh.py), {len(sites)} sites")
    print(f"  relay/STUN (wan): {', '.join(state['relay'])}")
    for site in sites:
        peers = ", ".join(f"{p} {state['addresses'][f'host-{p}'][0]}" for p in site["peers"])
        print(f"  {site['name']:4} {site['profile']:9} seen as {state['public'][site['peers'][0]]:15} hosts: {peers}")


def _known_prefixes(state_dir: Path) -> list[str]:
    prefixes = {m.group(1) for ns in list_namespaces() if (m := NAMESPACE_RE.match(ns))}
    if state_dir.is_dir():
        prefixes |= {p.stem for p in state_dir.glob("*.json") if PREFIX_RE.match(p.stem)}
    return sorted(prefixes)


def _delay_ms(text: str) -> int:
    """A CLI delay: whole milliseconds, "25" or "25ms"."""
    match = re.fullmatch(r"(\d+)(ms)?", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"bad delay {text!r}: use whole milliseconds, e.g. 25 or 25ms")
    return int(match.group(1))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lab.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build a lab and leave it running")
    up.add_argument("--nat-a", choices=PROFILES, default="cone")
    up.add_argument("--nat-b", choices=PROFILES, default="cone")
    up.add_argument("--prefix", help="namespace prefix (default: tv + 4 random hex digits)")
    up.add_argument("--symseq-delta", type=int, default=1, help="port step of the symseq profile")
    for peer in PEERS:
        up.add_argument(
            f"--delay-{peer}",
            type=_delay_ms,
            default=0,
            metavar="MS",
            help=f"one-way delay of peer {peer}'s WAN link, each direction (e.g. 25 or 25ms)",
        )
    for peer in PEERS:
        up.add_argument(
            f"--relay-delay-{peer}",
            type=_delay_ms,
            metavar="MS",
            help=f"one-way delay between peer {peer} and the relay addresses instead (default: --delay-{peer})",
        )
    up.add_argument("--json", action="store_true", help="print the lab as JSON")
    down = sub.add_parser("down", help="tear a lab down")
    which = down.add_mutually_exclusive_group()
    which.add_argument("--prefix", help="the lab to remove (default: the only one running)")
    which.add_argument("--all", action="store_true", help="remove every lab namespace (tv*-<role>)")
    status = sub.add_parser("status", help="show running labs")
    status.add_argument("--prefix")
    status.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    state_dir = STATE_DIR

    try:
        check_prerequisites()
        if args.command == "up":
            lab = Lab(
                nat_a=args.nat_a,
                nat_b=args.nat_b,
                prefix=args.prefix,
                symseq_delta=args.symseq_delta,
                delay_a_ms=args.delay_a,
                delay_b_ms=args.delay_b,
                relay_delay_a_ms=args.relay_delay_a,
                relay_delay_b_ms=args.relay_delay_b,
            )
            lab.up()
            state = lab.status()
            if args.json:
                print(json.dumps(state, indent=2))
            else:
                _print_lab(state)
                print(f"tear down with: {sys.executable} {sys.argv[0]} down --prefix {lab.prefix}")
        elif args.command == "down":
            if args.all:
                deleted = down_all("tv*", state_dir=state_dir)
            else:
                prefixes = [args.prefix] if args.prefix else _known_prefixes(state_dir)
                if len(prefixes) > 1:
                    raise LabError(f"several labs ({', '.join(prefixes)}): pass --prefix or --all")
                if args.prefix and not PREFIX_RE.match(args.prefix):
                    raise LabError(f"bad prefix {args.prefix!r}: lab prefixes look like tv1a2b")
                deleted = [ns for p in prefixes for ns in _teardown_prefix(p, state_dir)]
            print(f"deleted {len(deleted)} namespaces" + (f": {' '.join(deleted)}" if deleted else ""))
        else:
            prefixes = [args.prefix] if args.prefix else _known_prefixes(state_dir)
            states = []
            for prefix in prefixes:
                mesh = _mesh_state(prefix, state_dir)
                if mesh is not None:
                    states.append(mesh)
                    continue
                try:
                    states.append(Lab.attach(prefix, state_dir=state_dir).status())
                except LabError:
                    # Namespaces without a state file: a crashed run; show them by name.
                    names = [ns for ns in list_namespaces() if ns.startswith(prefix + "-") and is_lab_namespace(ns)]
                    states.append({"prefix": prefix, "orphaned_namespaces": names})
            if args.json:
                print(json.dumps(states, indent=2))
            elif not states:
                print("no lab running")
            for state in [] if args.json else states:
                if "orphaned_namespaces" in state:
                    print(f"lab {state['prefix']}: no state file; namespaces {' '.join(state['orphaned_namespaces'])}")
                    print("  remove with: lab.py down --all")
                elif state.get("kind") == "mesh":
                    _print_mesh(state)
                else:
                    _print_lab(state)
    except LabError as exc:
        print(f"lab.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
