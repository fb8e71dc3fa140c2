"""NAT behaviour discovery for `traversal probe`: RFC 5780 tests, reported in RFC 4787 terms.

Like ``tailscale netcheck``, it answers "what NAT am I behind, and what does that mean
for direct connections?": whether UDP gets out at all, the public address, the
mapping behaviour (RFC 5780 s4.3 tests I-III) and filtering behaviour (s4.4), how
ports are allocated (preserving, sequential with its delta, random), hairpinning
(s4.5), optionally the idle mapping lifetime (s4.6, with RESPONSE-PORT), the
familiar RFC 3489 name and a one-line verdict.

The classification is a set of pure functions (``classify_*``, :func:`rfc3489_name`,
:func:`direct_reach`, :func:`verdict`) so it can be tested table by table; the
network part is :func:`run_probe`, a short asyncio sequence over :class:`StunClient`
sockets whose every wait is bounded by the probe's timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import socket
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from traversal.stun import (
    Address,
    StunClass,
    StunClient,
    StunError,
    StunResponse,
    StunTimeout,
    binding_request,
    format_address,
    normalize_address,
    route_source,
    stun_request,
)

#: Bumped only when a key changes meaning or disappears; new keys may appear in version 1.
PROBE_JSON_VERSION = 1

ENDPOINT_INDEPENDENT = "endpoint-independent"
ADDRESS_DEPENDENT = "address-dependent"
ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"
BEHAVIOURS = (ENDPOINT_INDEPENDENT, ADDRESS_DEPENDENT, ADDRESS_AND_PORT_DEPENDENT)

PRESERVING = "preserving"
SEQUENTIAL = "sequential"
RANDOM = "random"

RFC3489_NAMES = (
    "open-internet",
    "full-cone",
    "restricted-cone",
    "port-restricted-cone",
    "symmetric",
    "symmetric-udp-firewall",
    "udp-blocked",
)

#: Consecutive allocations further apart than this are not "sequential" (the lab's
#: sequential NAT goes up to a step of 178; real ones use 1 or 2).
MAX_SEQUENTIAL_DELTA = 256

#: Extra local sockets, each making one new mapping, for the port allocation test.
ALLOCATION_SOCKETS = 3

#: Idle times (s) at which a mapping is checked when measuring its lifetime.
LIFETIME_STEPS = (1, 2, 3, 5, 8, 13, 20, 30, 45, 60, 90, 120, 180, 300, 600)
LIFETIME_MAX_LIMIT = 600.0

#: First retransmission timeout of the probe's transactions (RFC 5389 uses 0.5 s; a
#: probe that waits for answers that may never come is better off trying sooner).
PROBE_RTO = 0.25


class ProbeError(Exception):
    """The probe cannot run as asked (e.g. the server name does not resolve); the message says what to do."""


# --- classification (pure) -------------------------------------------------------------------


def classify_mapping(test1: Address, test2: Address | None, test3: Address | None) -> str | None:
    """RFC 5780 s4.3: mapped addresses seen from one local socket towards the primary
    address (test I), the alternate IP with the primary port (test II) and the alternate
    IP and port (test III). None when test II (or a needed test III) got no answer."""
    if test2 is None:
        return None
    if test2 == test1:
        return ENDPOINT_INDEPENDENT
    if test3 is None:
        return None
    return ADDRESS_DEPENDENT if test3 == test2 else ADDRESS_AND_PORT_DEPENDENT


def classify_filtering(change_ip_and_port: bool | None, change_port: bool | None) -> str | None:
    """RFC 5780 s4.4: did the answer sent from the other IP and port (test II) or from
    the other port only (test III) get through? None for "could not test"."""
    if change_ip_and_port is None:
        return None
    if change_ip_and_port:
        return ENDPOINT_INDEPENDENT
    if change_port is None:
        return None
    return ADDRESS_DEPENDENT if change_port else ADDRESS_AND_PORT_DEPENDENT


def _port_delta(a: int, b: int) -> int:
    """b - a on the 16-bit port circle, in -32768..32767."""
    return (b - a + 0x8000) % 0x10000 - 0x8000


def classify_allocation(samples: Sequence[tuple[int, int]]) -> tuple[str | None, int | None]:
    """Port allocation from (local port, mapped port) of distinct mappings, in the order
    they were made. Returns (allocation, delta):

    - "preserving": every mapped port equals its local port;
    - "sequential": consecutive mapped ports differ by one constant ``delta``
      (1 <= |delta| <= MAX_SEQUENTIAL_DELTA), or by it in all but one step when that
      step is a larger jump the same way (other hosts took ports in between);
    - "random": anything else;
    - (None, None) with fewer than three mappings (two steps are needed to see a pattern).
    """
    if samples and all(local == mapped for local, mapped in samples):
        return PRESERVING, None
    if len(samples) < 3:
        return None, None
    deltas = [_port_delta(a[1], b[1]) for a, b in itertools.pairwise(samples)]
    delta, count = Counter(deltas).most_common(1)[0]
    if not 1 <= abs(delta) <= MAX_SEQUENTIAL_DELTA:
        return RANDOM, None
    if count == len(deltas):
        return SEQUENTIAL, delta
    outliers = [d for d in deltas if d != delta]
    if (
        len(deltas) >= 3
        and len(outliers) == 1
        and outliers[0] * delta > 0
        and abs(outliers[0]) > abs(delta)
        and abs(outliers[0]) <= 4 * MAX_SEQUENTIAL_DELTA
    ):
        return SEQUENTIAL, delta
    return RANDOM, None


def rfc3489_name(udp: bool, nat: bool | None, mapping: str | None, filtering: str | None) -> str | None:
    """The RFC 3489 s5 name for these RFC 4787 facts; None when they do not decide it."""
    if not udp:
        return "udp-blocked"
    if nat is None:
        return None
    if not nat:
        if filtering is None:
            return None
        return "open-internet" if filtering == ENDPOINT_INDEPENDENT else "symmetric-udp-firewall"
    if mapping is None:
        return None
    if mapping != ENDPOINT_INDEPENDENT:
        return "symmetric"
    return {
        ENDPOINT_INDEPENDENT: "full-cone",
        ADDRESS_DEPENDENT: "restricted-cone",
        ADDRESS_AND_PORT_DEPENDENT: "port-restricted-cone",
    }.get(filtering or "")


@dataclass(frozen=True, slots=True)
class NatBehaviour:
    """What decides whether two peers can punch a direct UDP path."""

    udp: bool
    nat: bool | None
    mapping: str | None
    filtering: str | None
    allocation: str | None


#: The peer kinds a verdict talks about, named as the NAT lab's profiles.
PEER_KINDS: dict[str, NatBehaviour] = {
    "public": NatBehaviour(True, False, ENDPOINT_INDEPENDENT, ENDPOINT_INDEPENDENT, PRESERVING),
    "fullcone": NatBehaviour(True, True, ENDPOINT_INDEPENDENT, ENDPOINT_INDEPENDENT, PRESERVING),
    "cone": NatBehaviour(True, True, ENDPOINT_INDEPENDENT, ADDRESS_AND_PORT_DEPENDENT, PRESERVING),
    "symseq": NatBehaviour(True, True, ADDRESS_AND_PORT_DEPENDENT, ADDRESS_AND_PORT_DEPENDENT, SEQUENTIAL),
    "symrand": NatBehaviour(True, True, ADDRESS_AND_PORT_DEPENDENT, ADDRESS_AND_PORT_DEPENDENT, RANDOM),
}

DIRECT = "direct"
PREDICTION = "prediction"
RELAY = "relay"


def _endpoint_knowable(peer: NatBehaviour) -> str | None:
    """Can the other side aim at this peer's mapping? "known" (its STUN address is the
    one everybody sees), "predicted" (next port guessable), or None."""
    if peer.nat is False or peer.mapping == ENDPOINT_INDEPENDENT:
        return "known"
    if peer.mapping in (ADDRESS_DEPENDENT, ADDRESS_AND_PORT_DEPENDENT) and peer.allocation in (SEQUENTIAL, PRESERVING):
        return "predicted"
    return None


def _admits(receiver: NatBehaviour, sender: NatBehaviour) -> str | None:
    """Does ``receiver``'s filter let ``sender``'s packets in once ``receiver`` has sent
    towards the sender? Address-and-port filtering needs the sender's exact port."""
    if receiver.filtering in (ENDPOINT_INDEPENDENT, ADDRESS_DEPENDENT):
        return "known"
    if receiver.filtering is None and receiver.nat is False:
        return "known"
    if receiver.filtering == ADDRESS_AND_PORT_DEPENDENT:
        return _endpoint_knowable(sender)
    return None


def direct_reach(a: NatBehaviour, b: NatBehaviour) -> str:
    """ "direct", "prediction" (direct, with port prediction) or "relay" for a pair of peers.

    One direction suffices: if A's packet reaches B's mapping and B's filter admits it,
    B answers to the source it saw, which A's filter admits because A sent there.
    """
    if not (a.udp and b.udp):
        return RELAY
    best = RELAY
    for sender, receiver in ((a, b), (b, a)):
        target = _endpoint_knowable(receiver)
        admitted = _admits(receiver, sender)
        if target is None or admitted is None:
            continue
        level = PREDICTION if "predicted" in (target, admitted) else DIRECT
        if level == DIRECT:
            return DIRECT
        best = PREDICTION
    return best


def _join(names: Sequence[str]) -> str:
    if len(names) <= 1:
        return "".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]


def describe_nat(
    nat: bool | None, mapping: str | None, filtering: str | None, allocation: str | None, delta: int | None
) -> str:
    """A short phrase for this NAT, e.g. "address-and-port-dependent mapping with sequential ports (delta +7)"."""
    if nat is False:
        return "no NAT" if filtering in (ENDPOINT_INDEPENDENT, None) else "no NAT but a stateful firewall"
    if mapping is None:
        return "a NAT of unknown kind"
    ports = ""
    if mapping != ENDPOINT_INDEPENDENT:
        if allocation == SEQUENTIAL and delta is not None:
            ports = f" with sequential ports (delta {delta:+d})"
        elif allocation == RANDOM:
            ports = " with random ports"
        elif allocation == PRESERVING:
            ports = " preserving ports"
    return f"{mapping} mapping{ports}" + (f", {filtering} filtering" if filtering else "")


def verdict(
    udp: bool,
    nat: bool | None,
    mapping: str | None,
    filtering: str | None,
    allocation: str | None,
    delta: int | None,
    rfc5780: bool,
) -> tuple[str, dict[str, str]]:
    """The one-line verdict and, per peer kind of :data:`PEER_KINDS`, how a direct path works."""
    if not udp:
        return (
            "UDP gets no answer: no direct path from here; traffic stays on the relay (WebSocket over TLS/TCP).",
            dict.fromkeys(PEER_KINDS, RELAY),
        )
    me = NatBehaviour(udp, nat, mapping, filtering, allocation)
    if nat is None or filtering is None or (nat and mapping is None):
        why = "the STUN server lacks RFC 5780 (OTHER-ADDRESS/CHANGE-REQUEST)" if not rfc5780 else "tests got no answer"
        return (
            f"UDP works but {why}, so the NAT kind is unknown: direct paths will be tried and the relay kept as "
            "fallback; use a server with two addresses (traversal relay --stun ... --stun-alt ...) for a full answer.",
            {},
        )
    reach = {kind: direct_reach(me, peer) for kind, peer in PEER_KINDS.items()}
    direct = [k for k, v in reach.items() if v == DIRECT]
    predicted = [k for k, v in reach.items() if v == PREDICTION]
    relayed = [k for k, v in reach.items() if v == RELAY]
    parts = []
    if direct:
        parts.append(f"direct with {_join(direct)} peers")
    if predicted:
        parts.append(f"direct via port prediction with {_join(predicted)} peers")
    if relayed:
        parts.append(f"relay only with {_join(relayed)} peers")
    head = describe_nat(nat, mapping, filtering, allocation, delta)
    return f"{head[0].upper()}{head[1:]}: {'; '.join(parts)}.", reach


# --- the result --------------------------------------------------------------------------------


@dataclass
class ProbeResult:
    """Everything the probe learnt; :meth:`to_json` is the documented ``--json`` form."""

    server: str
    udp: bool = False
    rfc5780: bool = False
    other_address: str | None = None
    server_software: str | None = None
    local_address: str | None = None
    mapped_address: str | None = None
    public_ipv4: str | None = None
    public_ipv6: str | None = None
    nat: bool | None = None
    mapping: str | None = None
    filtering: str | None = None
    allocation: str | None = None
    delta: int | None = None
    hairpinning: bool | None = None
    lifetime_s: float | None = None
    lifetime_upper_s: float | None = None
    rfc3489: str | None = None
    verdict: str = ""
    direct: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "version": PROBE_JSON_VERSION,
            "server": self.server,
            "udp": self.udp,
            "rfc5780": self.rfc5780,
            "other_address": self.other_address,
            "server_software": self.server_software,
            "local_address": self.local_address,
            "mapped_address": self.mapped_address,
            "public_ipv4": self.public_ipv4,
            "public_ipv6": self.public_ipv6,
            "nat": self.nat,
            "mapping": self.mapping,
            "filtering": self.filtering,
            "allocation": self.allocation,
            "delta": self.delta,
            "hairpinning": self.hairpinning,
            "lifetime_s": self.lifetime_s,
            "lifetime_upper_s": self.lifetime_upper_s,
            "rfc3489": self.rfc3489,
            "verdict": self.verdict,
            "direct": self.direct,
            "notes": self.notes,
            "duration_s": round(self.duration_s, 2),
        }


def _yes_no(value: bool | None, unknown: str = "unknown") -> str:
    return unknown if value is None else ("yes" if value else "no")


def format_human(result: ProbeResult, *, lifetime_requested: bool = False) -> str:
    """The aligned table ``traversal probe`` prints."""
    server = result.server
    if result.rfc5780 and result.other_address:
        server += f" (RFC 5780, other address {result.other_address})"
    elif result.udp:
        server += " (no RFC 5780 support)"
    allocation = result.allocation or "unknown"
    if result.allocation == SEQUENTIAL and result.delta is not None:
        allocation += f" (delta {result.delta:+d})"
    if result.lifetime_s is None and result.lifetime_upper_s is not None:
        lifetime = f"less than {result.lifetime_upper_s:g} s"
    elif result.lifetime_s is not None and result.lifetime_upper_s is not None:
        lifetime = f"{result.lifetime_s:g} s to {result.lifetime_upper_s:g} s"
    elif result.lifetime_s is not None:
        lifetime = f"at least {result.lifetime_s:g} s (the longest tried)"
    else:
        lifetime = "not measured" if lifetime_requested else "not measured (--lifetime)"
    public4 = result.public_ipv4 or "-"
    if result.mapped_address and result.public_ipv4:
        public4 += f" (mapped {result.mapped_address})"
    rows = [
        ("STUN server", server),
        ("UDP", _yes_no(result.udp)),
        ("Public IPv4", public4),
        ("Public IPv6", result.public_ipv6 or "-"),
        ("Behind NAT", _yes_no(result.nat)),
        ("Mapping", result.mapping or "unknown"),
        ("Filtering", result.filtering or "unknown"),
        ("Port allocation", allocation),
        ("Hairpinning", _yes_no(result.hairpinning)),
        ("Mapping lifetime", lifetime),
        ("RFC 3489 name", result.rfc3489 or "unknown"),
    ]
    if not result.udp:
        rows = [*rows[:2], ("Public IPv4", "-")]
    width = max(len(name) for name, _ in rows) + 2
    lines = [f"{name:<{width}}{value}" for name, value in rows]
    lines.append("")
    lines.append(f"Verdict: {result.verdict}")
    lines.extend(f"Note: {note}" for note in result.notes)
    return "\n".join(lines)


# --- the network part ---------------------------------------------------------------------------


@dataclass
class ProbeOptions:
    """How to probe: the server, and how long to wait for each answer."""

    host: str
    port: int
    timeout: float = 2.0
    retries: int = 4
    rto: float = PROBE_RTO
    lifetime: bool = False
    lifetime_max: float = 120.0


async def _resolve(host: str, port: int) -> tuple[Address | None, Address | None]:
    """(IPv4, IPv6) addresses of the server; an IP literal needs no lookup."""
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(host)
        return ((str(ip), port), None) if ip.version == 4 else (None, (str(ip), port))
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM), 10.0)
    except (OSError, TimeoutError) as exc:
        raise ProbeError(f"cannot resolve STUN server {host!r}: {getattr(exc, 'strerror', None) or exc}") from None
    v4 = next((normalize_address(i[4]) for i in infos if i[0] == socket.AF_INET), None)
    v6 = next((normalize_address(i[4]) for i in infos if i[0] == socket.AF_INET6), None)
    if v4 is None and v6 is None:
        raise ProbeError(f"STUN server {host!r} has no IPv4 or IPv6 address")
    return v4, v6


class _IcmpWatch(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.refused = asyncio.get_running_loop().create_future()

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, ConnectionRefusedError) and not self.refused.done():
            self.refused.set_result(True)


async def _port_unreachable(server: Address, timeout: float) -> bool:
    """Does the server's host answer ICMP port unreachable? Only a connected UDP socket
    hears that, which tells "STUN server down" from "UDP silently dropped"."""
    loop = asyncio.get_running_loop()
    try:
        transport, protocol = await loop.create_datagram_endpoint(_IcmpWatch, remote_addr=server)
    except OSError:
        return False
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                transport.sendto(binding_request().encode())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(protocol.refused), min(0.2, max(deadline - time.monotonic(), 0)))
                return True
        return False
    finally:
        transport.close()


@dataclass
class _Probe:
    options: ProbeOptions
    primary: Address
    result: ProbeResult
    sockets: list[StunClient] = field(default_factory=list)

    async def open(self) -> StunClient:
        client = await StunClient.open(("::", 0) if ":" in self.primary[0] else ("0.0.0.0", 0))
        self.sockets.append(client)
        return client

    def close(self) -> None:
        for client in self.sockets:
            client.close()

    async def ask(
        self,
        client: StunClient,
        destination: Address,
        *,
        change_ip: bool = False,
        change_port: bool = False,
        timeout: float | None = None,
    ) -> StunResponse | None:
        """One Binding transaction; None on timeout."""
        try:
            return await stun_request(
                client,
                destination,
                change_ip=change_ip,
                change_port=change_port,
                timeout=self.options.timeout if timeout is None else timeout,
                retries=self.options.retries,
                rto=self.options.rto,
            )
        except StunTimeout:
            return None

    def mapped(self, response: StunResponse | None) -> Address | None:
        if response is None or response.message.cls != StunClass.SUCCESS:
            return None
        return response.message.reflexive_address


async def run_probe(options: ProbeOptions) -> ProbeResult:
    """Run the tests against ``options.host``:``options.port`` and classify. Bounded: every
    transaction waits at most ``options.timeout``; ``--lifetime`` adds up to ``lifetime_max``."""
    started = time.monotonic()
    v4, v6 = await _resolve(options.host, options.port)
    primary = v4 or v6
    assert primary is not None
    result = ProbeResult(server=format_address(primary))
    probe = _Probe(options, primary, result)
    try:
        await _run(probe, v6 if v4 is not None else None)
    finally:
        probe.close()
    result.duration_s = time.monotonic() - started
    return result


async def _run(probe: _Probe, extra_v6: Address | None) -> None:
    result, options, primary = probe.result, probe.options, probe.primary
    local_ip = route_source(primary)
    if local_ip is None:
        result.notes.append(f"no route to {format_address(primary)} from this host")
        _finish(result)
        return

    # Test I (RFC 5780 s4.3): the mapping towards the primary address.
    s1 = await probe.open()
    r1 = await probe.ask(s1, primary)
    if r1 is None:
        if await _port_unreachable(primary, min(1.0, options.timeout)):
            result.notes.append(
                f"no STUN answer from {result.server}, but its host answered ICMP port unreachable: the STUN server "
                "is probably not running there (or a firewall rejects UDP to it)"
            )
        else:
            result.notes.append(
                f"no STUN answer from {result.server} in {options.timeout:g} s: UDP is blocked on the way or the "
                "server is down (the two cannot be told apart from here)"
            )
        _finish(result)
        return
    result.udp = True
    result.server_software = r1.message.software
    if r1.message.cls == StunClass.ERROR:
        code, reason = r1.message.error or (0, "")
        result.notes.append(f"the STUN server refused a plain Binding request: {code} {reason}")
        _finish(result)
        return
    x1 = probe.mapped(r1)
    if x1 is None:
        result.notes.append("the STUN server's answer carries no (XOR-)MAPPED-ADDRESS")
        _finish(result)
        return
    local = (local_ip, s1.local_address[1])
    result.local_address = format_address(local)
    result.mapped_address = format_address(x1)
    _set_public(result, x1[0])
    result.nat = x1 != local

    other = r1.message.other_address
    if other is not None and _is_alternate(primary, other):
        result.rfc5780 = True
        result.other_address = format_address(other)
    elif other is not None:
        result.notes.append(
            f"the server's OTHER-ADDRESS {format_address(other)} does not differ from it in both IP and port: "
            "RFC 5780 tests skipped"
        )
    else:
        result.notes.append(
            "the server does not support RFC 5780 (no OTHER-ADDRESS): mapping and filtering cannot be tested, "
            "only UDP, the public address and port allocation"
        )

    # Tests II and III: the same socket towards the alternate IP, then the alternate IP and port.
    samples = [(s1.local_address[1], x1[1])]
    if result.rfc5780:
        assert other is not None
        x2 = probe.mapped(await probe.ask(s1, (other[0], primary[1])))
        x3 = None
        if x2 is None:
            result.notes.append(f"no answer from the alternate address {other[0]}:{primary[1]}: mapping unknown")
        elif x2 != x1:
            x3 = probe.mapped(await probe.ask(s1, other))
            if x3 is None:
                result.notes.append(f"no answer from the alternate address {result.other_address}: mapping unknown")
        result.mapping = classify_mapping(x1, x2, x3)
        for x in (x2, x3):
            if x is not None and x[1] != samples[-1][1]:
                samples.append((s1.local_address[1], x[1]))

    # Port allocation: a few more sockets, one new mapping each, in order.
    extra: list[StunClient] = []
    for _ in range(ALLOCATION_SOCKETS):
        client = await probe.open()
        extra.append(client)
        x = probe.mapped(await probe.ask(client, primary))
        if x is not None:
            samples.append((client.local_address[1], x[1]))
    result.allocation, result.delta = classify_allocation(samples)

    # Filtering (s4.4) and hairpinning (s4.5) wait for answers that may never come: in parallel.
    tasks: list[asyncio.Task[Any]] = []
    if result.rfc5780:
        assert other is not None
        tasks.append(asyncio.ensure_future(_filtering(probe, s1, other)))
    tasks.append(asyncio.ensure_future(_hairpinning(probe, s1, extra[0], x1)))
    if extra_v6 is not None:
        tasks.append(asyncio.ensure_future(_public_ipv6(probe, extra_v6)))
    await asyncio.gather(*tasks)

    if options.lifetime:
        await _lifetime(probe)
    _finish(result)


def _is_alternate(primary: Address, other: Address) -> bool:
    try:
        p, o = ipaddress.ip_address(primary[0]), ipaddress.ip_address(other[0])
    except ValueError:
        return False
    return p.version == o.version and p != o and primary[1] != other[1]


def _set_public(result: ProbeResult, ip: str) -> None:
    if ":" in ip:
        result.public_ipv6 = ip
    else:
        result.public_ipv4 = ip


async def _filtering(probe: _Probe, s1: StunClient, other: Address) -> None:
    result, primary = probe.result, probe.primary
    expected_both = other
    expected_port = (primary[0], other[1])

    async def attempt(change_ip: bool, expected: Address) -> bool | None:
        response = await probe.ask(s1, primary, change_ip=change_ip, change_port=True)
        if response is None:
            return False
        if response.message.cls == StunClass.ERROR:
            code, reason = response.message.error or (0, "")
            result.notes.append(f"the server refused CHANGE-REQUEST ({code} {reason}): filtering unknown")
            return None
        if response.source != expected:
            result.notes.append(
                f"the CHANGE-REQUEST answer came from {format_address(response.source)}, not "
                f"{format_address(expected)}: the server ignores CHANGE-REQUEST, filtering unknown"
            )
            return None
        return True

    both, port_only = await asyncio.gather(attempt(True, expected_both), attempt(False, expected_port))
    result.filtering = classify_filtering(both, port_only)


async def _hairpinning(probe: _Probe, s1: StunClient, s2: StunClient, x1: Address) -> None:
    """RFC 5780 s4.5: a request from another local socket to our own mapped address."""
    request = binding_request()
    deadline = time.monotonic() + probe.options.timeout
    interval = probe.options.rto
    while time.monotonic() < deadline:
        try:
            s2.send(request, x1)
        except (StunError, OSError):
            break
        if await s1.wait_request(request.transaction_id, min(interval, max(deadline - time.monotonic(), 0))):
            probe.result.hairpinning = True
            return
        interval *= 2
    probe.result.hairpinning = s1.request_seen(request.transaction_id) is not None


async def _public_ipv6(probe: _Probe, server: Address) -> None:
    """Best effort: the IPv6 address seen by the server, when it has one and so do we."""
    try:
        client = await StunClient.open(("::", 0))
    except OSError:
        return
    try:
        response = await probe.ask(client, server, timeout=min(probe.options.timeout, 1.0))
        mapped = probe.mapped(response)
        if mapped is not None and ":" in mapped[0]:
            probe.result.public_ipv6 = mapped[0]
    except (OSError, StunError):
        pass
    finally:
        client.close()


def lifetime_schedule(lifetime_max: float) -> list[float]:
    """The idle times checked, ending with ``lifetime_max``."""
    steps = [float(t) for t in LIFETIME_STEPS if t < lifetime_max]
    return [*steps, float(lifetime_max)]


async def _lifetime(probe: _Probe) -> None:
    """RFC 5780 s4.6, in parallel rather than by binary search: one fresh mapping per
    idle time, made up front; at its time, another socket asks the server to answer to
    that mapping's port (RESPONSE-PORT). The first mapping that no longer delivers
    bounds the lifetime. Takes at most ``lifetime_max`` plus one timeout."""
    result, options, primary = probe.result, probe.options, probe.primary
    if not result.udp:
        return
    schedule = lifetime_schedule(min(options.lifetime_max, LIFETIME_MAX_LIMIT))
    mappings: list[tuple[float, StunClient, int, float]] = []
    for idle in schedule:
        client = await probe.open()
        mapped = probe.mapped(await probe.ask(client, primary))
        if mapped is None:
            result.notes.append("lifetime: the server stopped answering while mappings were made")
            return
        mappings.append((idle, client, mapped[1], time.monotonic()))
    asker = await probe.open()
    alive_for: float | None = None
    for idle, client, port, made in mappings:
        await asyncio.sleep(max(made + idle - time.monotonic(), 0.0))
        request = binding_request(response_port=port)
        try:
            response = await client.request(
                primary, request, timeout=options.timeout, retries=options.retries, rto=options.rto, sender=asker
            )
        except StunTimeout:
            result.lifetime_s = alive_for
            result.lifetime_upper_s = idle
            return
        if response.message.cls == StunClass.ERROR:
            code, reason = response.message.error or (0, "")
            result.notes.append(f"lifetime not measured: the server refused RESPONSE-PORT ({code} {reason})")
            return
        alive_for = idle
    result.lifetime_s = alive_for
    result.notes.append(f"the mapping was still alive after {alive_for:g} s idle (the --lifetime-max)")


def _finish(result: ProbeResult) -> None:
    result.rfc3489 = rfc3489_name(result.udp, result.nat, result.mapping, result.filtering)
    result.verdict, result.direct = verdict(
        result.udp, result.nat, result.mapping, result.filtering, result.allocation, result.delta, result.rfc5780
    )
