"""ICE candidates for the direct path: what a peer advertises, and the CANDIDATES offer codec.

A peer offers, in one end-to-end encrypted CANDIDATES record (DESIGN.md, "Getting a
direct path"): host candidates (every usable local address, IPv4 and IPv6,
:func:`usable_host_addresses`), a server-reflexive candidate (its mapping as the
relay's STUN server saw it) and, behind a NAT that allocates ports sequentially,
predicted server-reflexive candidates (:func:`predict_ports`). The other side adds
:func:`observed_candidates`: the public IP the relay observed for the peer
(ESTABLISHED) with the ports the peer advertised.

Candidates are aioice ``Candidate.to_sdp()`` lines. Two conventions of this project
ride on the foundation, which is free-form (RFC 8445 s5.1.1.3, 1 to 32 ice-chars):

- a predicted candidate's foundation is ``predicted<k>``, k = 1 for the port the NAT
  should allocate next; its priority also decreases with k. The receiver checks
  predicted candidates first, in k order (``traversal/ice.py`` explains why the order
  matters to a sequential symmetric NAT);
- a candidate made from the relay-observed address has foundation ``observed<i>``.

:func:`decode_offer` is strict and bounded: whatever the bytes, it returns a valid
:class:`CandidateOffer` or raises :class:`CandidateError`, and every candidate in it
parses with aioice, is of type host, srflx or prflx, and names an IP literal (never
an mDNS name) and a port in 1..65535.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import ifaddr
from aioice import Candidate
from aioice.candidate import candidate_foundation, candidate_priority

from transport.constants import (
    MAX_CANDIDATE_SDP,
    MAX_CANDIDATES,
    MAX_OBSERVED_CANDIDATES,
    MAX_PREDICTED_CANDIDATES,
)

#: Version byte of the encoded offer.
OFFER_VERSION = 1

#: Highest attempt number an offer may carry (both sides number their attempts from 0).
MAX_ATTEMPT = 2**31

#: SHA-256 of the QUIC server certificate.
FINGERPRINT_SIZE = 32

#: The only ICE component (one UDP flow carries QUIC and the data).
COMPONENT = 1

#: Candidate types an offer may carry. Relayed candidates have no place here (the
#: relay is our WebSocket server, not TURN).
OFFER_TYPES = frozenset({"host", "srflx", "prflx"})

#: Local preferences (RFC 8445 s5.1.2.1) below a plain srflx's 65535: predicted
#: candidates rank after the STUN-learnt one and decrease with k; observed ones
#: rank after the predicted ones.
PREDICTED_LOCAL_PREF = 0x8000
OBSERVED_LOCAL_PREF = 0x4000

#: Bounds of an encoded offer: header, credentials, fingerprint, candidates.
MAX_UFRAG = 256
MAX_PWD = 256
MAX_OFFER_SIZE = (
    1 + 4 + 1 + 2 + MAX_UFRAG + 2 + MAX_PWD + FINGERPRINT_SIZE + 1 + MAX_CANDIDATES * (2 + MAX_CANDIDATE_SDP)
)

_HEADER = struct.Struct("!BIB")  # version, attempt, flags
_FLAG_FINGERPRINT = 0x01
_UFRAG_RE = re.compile(r"[A-Za-z0-9+/]{4,256}")
_PWD_RE = re.compile(r"[A-Za-z0-9+/]{22,256}")
_FOUNDATION_RE = re.compile(r"[A-Za-z0-9+/]{1,32}")
_PREDICTED_RE = re.compile(r"predicted([1-9][0-9]?)")
_SDP_CHARS = re.compile(r"[\x21-\x7e]+(?: [\x21-\x7e]+)*")
_DIGITS = re.compile(r"[0-9]{1,10}")


class CandidateError(ValueError):
    """An offer or candidate is malformed, out of bounds or unsupported; the message says which part."""


@dataclass(frozen=True)
class CandidateOffer:
    """Everything one side needs to run connectivity checks towards the other, for one attempt."""

    #: Which direct-path attempt this belongs to (both sides number attempts; 0..2**31).
    attempt: int
    #: ICE credentials: the sender's ``local_username`` / ``local_password``.
    ufrag: str
    pwd: str
    #: aioice ``Candidate.to_sdp()`` lines, at most MAX_CANDIDATES, each <= MAX_CANDIDATE_SDP chars.
    candidates: tuple[str, ...]
    #: SHA-256 of the QUIC server certificate (sent by the QUIC server side), else None.
    fingerprint: bytes | None = None


# --- candidates ------------------------------------------------------------------------


def _ip(text: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if "%" in text:
        raise CandidateError(f"{what} {text!r} carries an IPv6 scope")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise CandidateError(f"{what} {text!r} is not an IP address") from None


def parse_candidate(sdp: str) -> Candidate:
    """Parse one candidate line strictly; :class:`CandidateError` on anything unexpected.

    Beyond ``Candidate.from_sdp``: printable ASCII separated by single spaces, at most
    MAX_CANDIDATE_SDP characters, canonical (``to_sdp()`` gives the same line back, so
    nothing is hidden in fields aioice ignores), component 1, UDP, priority 1..2**31-1,
    type host/srflx/prflx, an IP literal (no mDNS name, no scope), port 1..65535, and a
    related address and port, when present, that are an IP and 0..65535.
    """
    if not isinstance(sdp, str):
        raise CandidateError("a candidate must be a string")
    if len(sdp) > MAX_CANDIDATE_SDP:
        raise CandidateError(f"candidate longer than {MAX_CANDIDATE_SDP} characters")
    if not sdp.isascii() or not _SDP_CHARS.fullmatch(sdp):
        raise CandidateError("candidate is not printable ASCII fields separated by single spaces")
    bits = sdp.split(" ")
    if len(bits) < 8 or len(bits) % 2:
        raise CandidateError(f"candidate has {len(bits)} fields (need 8, then name/value pairs)")
    if bits[6] != "typ":
        raise CandidateError("candidate lacks 'typ' in seventh position")
    for name, value in ((bits[1], "component"), (bits[3], "priority"), (bits[5], "port")):
        if not _DIGITS.fullmatch(name):
            raise CandidateError(f"candidate {value} {name!r} is not a decimal number")
    try:
        candidate = Candidate.from_sdp(sdp)
    except (ValueError, IndexError) as exc:
        raise CandidateError(f"candidate does not parse: {exc}") from None
    if candidate.to_sdp() != sdp:
        raise CandidateError("candidate is not in canonical form (unknown or repeated fields, leading zeros)")
    if not _FOUNDATION_RE.fullmatch(candidate.foundation):
        raise CandidateError(f"foundation {candidate.foundation!r} is not 1-32 ice-chars")
    if candidate.component != COMPONENT:
        raise CandidateError(f"component {candidate.component} (only {COMPONENT} is used)")
    if candidate.transport.lower() != "udp":
        raise CandidateError(f"transport {candidate.transport!r} (only UDP)")
    if not 1 <= candidate.priority <= 2**31 - 1:
        raise CandidateError(f"priority {candidate.priority} outside 1..2**31-1")
    if candidate.type not in OFFER_TYPES:
        raise CandidateError(f"candidate type {candidate.type!r} (only host, srflx, prflx)")
    ip = _ip(candidate.host, "candidate address")
    if ip.is_unspecified or ip.is_multicast:
        raise CandidateError(f"candidate address {candidate.host} is unspecified or multicast")
    if not 1 <= candidate.port <= 65535:
        raise CandidateError(f"candidate port {candidate.port} outside 1..65535")
    if (candidate.related_address is None) != (candidate.related_port is None):
        raise CandidateError("raddr and rport come together")
    if candidate.related_address is not None:
        _ip(candidate.related_address, "related address")
        assert candidate.related_port is not None
        if not 0 <= candidate.related_port <= 65535:
            raise CandidateError(f"related port {candidate.related_port} outside 0..65535")
    if candidate.tcptype is not None:
        raise CandidateError("tcptype on a UDP candidate")
    if candidate.generation is not None and not 0 <= candidate.generation <= 255:
        raise CandidateError(f"generation {candidate.generation} outside 0..255")
    return candidate


def predicted_index(candidate: Candidate) -> int | None:
    """k of a predicted candidate (foundation ``predicted<k>``, type srflx), else None."""
    if candidate.type != "srflx":
        return None
    match = _PREDICTED_RE.fullmatch(candidate.foundation)
    return int(match.group(1)) if match else None


def host_candidate(address: str, port: int) -> Candidate:
    """The host candidate of a socket bound to ``address``:``port`` (aioice's priority)."""
    return Candidate(
        foundation=candidate_foundation("host", "udp", address),
        component=COMPONENT,
        transport="udp",
        priority=candidate_priority(COMPONENT, "host"),
        host=address,
        port=port,
        type="host",
    )


def reflexive_candidate(mapped: tuple[str, int], base: tuple[str, int]) -> Candidate:
    """The server-reflexive candidate ``mapped`` learnt from the socket at ``base``."""
    return Candidate(
        foundation=candidate_foundation("srflx", "udp", base[0]),
        component=COMPONENT,
        transport="udp",
        priority=candidate_priority(COMPONENT, "srflx"),
        host=mapped[0],
        port=mapped[1],
        type="srflx",
        related_address=base[0],
        related_port=base[1],
    )


def predicted_candidates(public_ip: str, ports: Sequence[int], base: tuple[str, int]) -> list[Candidate]:
    """Predicted server-reflexive candidates for ``ports`` (from :func:`predict_ports`, in
    allocation order): foundation ``predicted<k>`` and a priority decreasing with k."""
    if len(ports) > MAX_PREDICTED_CANDIDATES:
        raise CandidateError(f"at most {MAX_PREDICTED_CANDIDATES} predicted candidates")
    return [
        Candidate(
            foundation=f"predicted{k}",
            component=COMPONENT,
            transport="udp",
            priority=candidate_priority(COMPONENT, "srflx", PREDICTED_LOCAL_PREF - k),
            host=public_ip,
            port=port,
            type="srflx",
            related_address=base[0],
            related_port=base[1],
        )
        for k, port in enumerate(ports, start=1)
    ]


def predict_ports(base_port: int, delta: int, count: int) -> list[int]:
    """The next ``count`` ports a sequential NAT should allocate after ``base_port``:
    ``base_port + k * delta`` for k = 1..count, leaving out those outside 1..65535 (no
    wrap-around is assumed). ``count`` is at most MAX_PREDICTED_CANDIDATES; a zero
    delta (a port-preserving or endpoint-independent NAT) predicts nothing."""
    for value, name in ((base_port, "base port"), (delta, "delta"), (count, "count")):
        if not isinstance(value, int) or isinstance(value, bool):
            raise CandidateError(f"{name} must be an integer")
    if not 1 <= base_port <= 65535:
        raise CandidateError(f"base port {base_port} outside 1..65535")
    if not 0 <= count <= MAX_PREDICTED_CANDIDATES:
        raise CandidateError(f"count {count} outside 0..{MAX_PREDICTED_CANDIDATES}")
    if delta == 0:
        return []
    return [port for k in range(1, count + 1) if 1 <= (port := base_port + k * delta) <= 65535]


def observed_candidates(
    peer_ip: str, peer_candidates: Iterable[str], *, limit: int = MAX_OBSERVED_CANDIDATES
) -> list[str]:
    """Candidates at the peer's public IP as the relay observed it (ESTABLISHED), with the
    ports the peer advertised: first those of its server-reflexive candidates (the relay
    may see another public address than the STUN server, e.g. a NAT with an address
    pool), then those of its host candidates (a port-preserving NAT maps the host port
    to the same public port, which helps when STUN got no answer). Predicted and
    observed candidates are not reused; ports of the other address family are ignored;
    addresses the peer already advertised are skipped; at most ``limit`` results.
    ESTABLISHED's peer port is not used: it is the relay connection's TCP port, which
    says nothing about the peer's UDP mappings.

    Returns SDP lines of type srflx, foundation ``observed<i>``, ranked below the
    peer's own candidates, for ``IceAgent.connect(..., extra_remote=...)``. An
    observed address that cannot be a public mapping (loopback, link-local,
    unspecified, multicast) gives none. :class:`CandidateError` if ``peer_ip`` is not
    an IP address or a candidate does not parse.
    """
    ip = _ip(peer_ip, "observed address")
    if ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast:
        return []
    if not 0 <= limit <= MAX_OBSERVED_CANDIDATES:
        raise CandidateError(f"limit {limit} outside 0..{MAX_OBSERVED_CANDIDATES}")
    parsed = [parse_candidate(sdp) for sdp in peer_candidates]
    known = {(str(_ip(c.host, "candidate address")), c.port) for c in parsed}
    ports: list[int] = []
    for kind in ("srflx", "prflx", "host"):
        for c in parsed:
            if c.type != kind or predicted_index(c) is not None or c.foundation.startswith("observed"):
                continue
            if _ip(c.host, "candidate address").version == ip.version and c.port not in ports:
                ports.append(c.port)
    result: list[str] = []
    for port in ports:
        if len(result) >= limit:
            break
        if (str(ip), port) in known:
            continue
        i = len(result) + 1
        candidate = Candidate(
            foundation=f"observed{i}",
            component=COMPONENT,
            transport="udp",
            priority=candidate_priority(COMPONENT, "srflx", OBSERVED_LOCAL_PREF - i),
            host=str(ip),
            port=port,
            type="srflx",
        )
        result.append(candidate.to_sdp())
    return result


# --- local addresses -----------------------------------------------------------------------


def _excluded_networks(exclude: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    networks = []
    for item in exclude:
        try:
            networks.append(ipaddress.ip_network(str(item).split("%", 1)[0], strict=False))
        except ValueError:
            raise CandidateError(f"cannot exclude {item!r}: not an IP address or network") from None
    return networks


def usable_host_addresses(
    exclude: Iterable[str] = (), *, use_ipv6: bool = True, adapters: Iterable[ifaddr.Adapter] | None = None
) -> list[str]:
    """Every local address a host candidate can use (from ifaddr), IPv4 then IPv6, in
    interface order, without duplicates: minus loopback (127/8, ::1), link-local
    (169.254/16, fe80::/10, which would need a scope and never cross a router),
    unspecified and multicast addresses, IPv4-mapped IPv6, and ``exclude``: addresses
    or networks (e.g. the TAP overlay's "10.10.10.3" or "10.10.10.0/24", which must
    never carry the tunnel that carries them). ``adapters`` replaces ifaddr's (tests).
    """
    excluded = _excluded_networks(exclude)
    v4: list[str] = []
    v6: list[str] = []
    for adapter in ifaddr.get_adapters() if adapters is None else adapters:
        for entry in adapter.ips:
            text = entry.ip if isinstance(entry.ip, str) else entry.ip[0]
            try:
                ip = ipaddress.ip_address(str(text).split("%", 1)[0])
            except ValueError:
                continue
            if ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast:
                continue
            if isinstance(ip, ipaddress.IPv6Address) and (ip.ipv4_mapped is not None or not use_ipv6):
                continue
            if any(ip.version == net.version and ip in net for net in excluded):
                continue
            bucket = v4 if ip.version == 4 else v6
            if str(ip) not in bucket:
                bucket.append(str(ip))
    return v4 + v6


# --- the offer codec -------------------------------------------------------------------------


def _validate(offer: CandidateOffer) -> None:
    attempt = offer.attempt
    if not isinstance(attempt, int) or isinstance(attempt, bool) or not 0 <= attempt <= MAX_ATTEMPT:
        raise CandidateError(f"attempt {attempt!r} outside 0..2**31")
    if not isinstance(offer.ufrag, str) or not _UFRAG_RE.fullmatch(offer.ufrag):
        raise CandidateError("ufrag must be 4-256 ice-chars (RFC 8445 s5.3)")
    if not isinstance(offer.pwd, str) or not _PWD_RE.fullmatch(offer.pwd):
        raise CandidateError("pwd must be 22-256 ice-chars (RFC 8445 s5.3)")
    if offer.fingerprint is not None and (
        not isinstance(offer.fingerprint, bytes) or len(offer.fingerprint) != FINGERPRINT_SIZE
    ):
        raise CandidateError(f"fingerprint must be {FINGERPRINT_SIZE} bytes or None")
    if not isinstance(offer.candidates, tuple):
        raise CandidateError("candidates must be a tuple of strings")
    if len(offer.candidates) > MAX_CANDIDATES:
        raise CandidateError(f"{len(offer.candidates)} candidates (at most {MAX_CANDIDATES})")
    for index, sdp in enumerate(offer.candidates):
        try:
            parse_candidate(sdp)
        except CandidateError as exc:
            raise CandidateError(f"candidate {index}: {exc}") from None


def encode_offer(offer: CandidateOffer) -> bytes:
    """The offer as bytes (at most MAX_OFFER_SIZE); :class:`CandidateError` if it is invalid.

    Layout, network byte order: version (1), attempt (u32), flags (u8, bit 0 =
    fingerprint present), ufrag and pwd (u16 length + ASCII each), the 32-byte
    fingerprint if flagged, the candidate count (u8), then each candidate (u16 length
    + ASCII). Nothing follows.
    """
    _validate(offer)
    flags = _FLAG_FINGERPRINT if offer.fingerprint is not None else 0
    out = bytearray(_HEADER.pack(OFFER_VERSION, offer.attempt, flags))
    for text in (offer.ufrag, offer.pwd):
        raw = text.encode("ascii")
        out += struct.pack("!H", len(raw)) + raw
    if offer.fingerprint is not None:
        out += offer.fingerprint
    out.append(len(offer.candidates))
    for sdp in offer.candidates:
        raw = sdp.encode("ascii")
        out += struct.pack("!H", len(raw)) + raw
    return bytes(out)


class _Reader:
    """Bounded reads over one encoded offer; running short is a CandidateError."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, size: int, what: str) -> bytes:
        if size > len(self.data) - self.pos:
            raise CandidateError(f"offer truncated in {what}")
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def text(self, limit: int, what: str) -> str:
        (size,) = struct.unpack("!H", self.take(2, what))
        if size > limit:
            raise CandidateError(f"{what} of {size} bytes (at most {limit})")
        raw = self.take(size, what)
        if not raw.isascii():
            raise CandidateError(f"{what} is not ASCII")
        return raw.decode("ascii")


def decode_offer(data: bytes) -> CandidateOffer:
    """Parse an encoded offer strictly: :class:`CandidateError` (and nothing else) unless
    it is exactly one well-formed offer whose every field and candidate is valid."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CandidateError("offer must be bytes")
    data = bytes(data)
    if len(data) > MAX_OFFER_SIZE:
        raise CandidateError(f"offer of {len(data)} bytes (at most {MAX_OFFER_SIZE})")
    reader = _Reader(data)
    version, attempt, flags = _HEADER.unpack(reader.take(_HEADER.size, "header"))
    if version != OFFER_VERSION:
        raise CandidateError(f"offer version {version} (this build reads {OFFER_VERSION})")
    if flags & ~_FLAG_FINGERPRINT:
        raise CandidateError(f"unknown offer flags 0x{flags:02x}")
    ufrag = reader.text(MAX_UFRAG, "ufrag")
    pwd = reader.text(MAX_PWD, "pwd")
    fingerprint = reader.take(FINGERPRINT_SIZE, "fingerprint") if flags & _FLAG_FINGERPRINT else None
    (count,) = reader.take(1, "candidate count")
    if count > MAX_CANDIDATES:
        raise CandidateError(f"{count} candidates (at most {MAX_CANDIDATES})")
    candidates = tuple(reader.text(MAX_CANDIDATE_SDP, f"candidate {i}") for i in range(count))
    if reader.pos != len(data):
        raise CandidateError(f"{len(data) - reader.pos} bytes after the offer")
    offer = CandidateOffer(attempt=attempt, ufrag=ufrag, pwd=pwd, candidates=candidates, fingerprint=fingerprint)
    _validate(offer)
    return offer
