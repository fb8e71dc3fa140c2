"""The relay's STUN Binding server (RFC 5389 / 8489), with RFC 5780 NAT behaviour discovery.

With only a primary address it answers on one socket. With an alternate address
(a second IP *and* a second port) it binds the four combinations

    primary IP : primary port     primary IP : alternate port
    alternate IP : primary port   alternate IP : alternate port

and implements RFC 5780: OTHER-ADDRESS (the combination differing in both IP and
port from where the request arrived), RESPONSE-ORIGIN, CHANGE-REQUEST (answer
from the socket with the other IP and/or port) and RESPONSE-PORT (s7.5: answer to
the request's source IP at that port, which the probe's ``--lifetime`` needs).

:class:`StunServerCore` is sans-I/O: a datagram, its source and the local address
it arrived on go in; ``(from_local, to, bytes)`` tuples come out.
:class:`StunServer` is the thin asyncio driver that owns the sockets.

Never an amplifier or an oracle for junk: truncated, malformed and non-STUN
datagrams, indications and stray responses are dropped and counted, never
answered. A CHANGE-REQUEST with a flag set that this server cannot honour (no
alternate address) gets 420 Unknown Attribute, as RFC 5389 s7.3.1 prescribes for
a comprehension-required attribute the server does not implement and as coturn
does ("configured without RFC 5780 support"); an all-zero CHANGE-REQUEST is
accepted (a JSTUN-era habit of clients, which coturn also tolerates). PADDING is
echoed at the size the request carried (never more), and PADDING together with
RESPONSE-PORT is refused with 400 as coturn does, so a small request can never
draw a large answer towards another port.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

from relay_server.ratelimit import RateLimiter
from traversal.logfmt import log_event
from traversal.stun import (
    BINDING,
    Address,
    Attr,
    StunClass,
    StunError,
    StunMessage,
    binding_success,
    error_response,
    format_address,
    looks_like_stun,
    normalize_address,
    parse,
)

log = logging.getLogger("traversal.stun_server")

#: What the server says it is (SOFTWARE attribute).
SOFTWARE = "traversal-stun"

#: Comprehension-required request attributes the server understands or may safely
#: ignore (no authentication: USERNAME / MESSAGE-INTEGRITY are ignored, RFC 5389 s10).
UNDERSTOOD_ATTRIBUTES = frozenset(
    {
        Attr.CHANGE_REQUEST,
        Attr.RESPONSE_PORT,
        Attr.PADDING,
        Attr.USERNAME,
        Attr.MESSAGE_INTEGRITY,
        Attr.MESSAGE_INTEGRITY_SHA256,
        Attr.USERHASH,
        Attr.REALM,
        Attr.NONCE,
    }
)

#: Retries when binding the four sockets on an ephemeral port clashes with something.
_BIND_ATTEMPTS = 20


class StunServerError(Exception):
    """The STUN server cannot run as configured (bad addresses, port taken); the message says what to do."""


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One datagram to send: from the local socket bound to ``source``, to ``destination``."""

    source: Address
    destination: Address
    data: bytes


@dataclass
class StunCounters:
    """Monotonic counters, exposed on /metrics by :func:`metrics_lines`."""

    requests: int = 0
    responses: int = 0
    error_responses: int = 0
    change_requests: int = 0
    dropped_malformed: int = 0
    dropped_non_stun: int = 0
    dropped_unexpected: int = 0
    dropped_rate_limited: int = 0


def _parse_ip(text: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise StunServerError(f"{what} must be an IP address, got {text!r}") from None


class StunServerCore:
    """Answers STUN Binding requests; no sockets, no clock.

    ``primary`` and ``alternate`` are (IP, port); the alternate must differ in both and
    be of the same family. Port 0 is not allowed here: the driver resolves it first.
    """

    def __init__(
        self,
        primary: Address,
        alternate: Address | None = None,
        *,
        software: str | None = SOFTWARE,
        max_message_size: int = 2048,
    ) -> None:
        p_ip = _parse_ip(primary[0], "the STUN address")
        if not 1 <= primary[1] <= 0xFFFF:
            raise StunServerError(f"STUN port must be 1..65535, got {primary[1]}")
        if alternate is not None:
            a_ip = _parse_ip(alternate[0], "the alternate STUN address")
            if not 1 <= alternate[1] <= 0xFFFF:
                raise StunServerError(f"alternate STUN port must be 1..65535, got {alternate[1]}")
            if a_ip.version != p_ip.version:
                raise StunServerError("the alternate STUN address must be of the same family as the primary")
            if a_ip == p_ip or alternate[1] == primary[1]:
                raise StunServerError(
                    "RFC 5780 needs an alternate address with another IP and another port than the primary "
                    f"(got {format_address(primary)} and {format_address(alternate)})"
                )
            if a_ip.is_unspecified or p_ip.is_unspecified:
                raise StunServerError(
                    "with an alternate address, both STUN addresses must be specific IPs, not 0.0.0.0/::"
                )
            alternate = (str(a_ip), alternate[1])
        self.primary: Address = (str(p_ip), primary[1])
        self.alternate: Address | None = alternate
        self.software = software
        self.max_message_size = max_message_size
        self.counters = StunCounters()
        # A wildcard socket cannot tell which local address a request reached.
        self._origin_known = not p_ip.is_unspecified

    @property
    def rfc5780(self) -> bool:
        return self.alternate is not None

    @property
    def local_addresses(self) -> list[Address]:
        """The sockets to bind: one, or the four IP x port combinations."""
        if self.alternate is None:
            return [self.primary]
        (p_ip, p_port), (a_ip, a_port) = self.primary, self.alternate
        return [(p_ip, p_port), (p_ip, a_port), (a_ip, p_port), (a_ip, a_port)]

    def _swap(self, local: Address, change_ip: bool, change_port: bool) -> Address:
        assert self.alternate is not None
        (p_ip, p_port), (a_ip, a_port) = self.primary, self.alternate
        ip, port = local
        if change_ip:
            ip = a_ip if ip == p_ip else p_ip
        if change_port:
            port = a_port if port == p_port else p_port
        return ip, port

    def handle_datagram(self, data: bytes, source: Address, local: Address) -> list[Outgoing]:
        """Process one datagram that ``local`` received from ``source``; what to send back."""
        if not looks_like_stun(data):
            self.counters.dropped_non_stun += 1
            return []
        try:
            request = parse(data, max_size=self.max_message_size)
        except StunError as exc:
            self.counters.dropped_malformed += 1
            if log.isEnabledFor(logging.DEBUG):
                log_event(log, "stun_dropped", logging.DEBUG, source=format_address(source), reason=str(exc))
            return []
        if request.cls != StunClass.REQUEST:
            self.counters.dropped_unexpected += 1
            return []
        self.counters.requests += 1
        if request.method != BINDING:
            return [self._error(request, source, local, 400, "Bad Request: only Binding is served here")]

        unknown = request.unknown_comprehension_required(UNDERSTOOD_ATTRIBUTES)
        if unknown:
            return [self._error(request, source, local, 420, unknown=unknown[:16])]
        change = request.change_request
        change_ip, change_port = change or (False, False)
        if change_ip or change_port:
            self.counters.change_requests += 1
            if self.alternate is None:
                return [
                    self._error(
                        request,
                        source,
                        local,
                        420,
                        "Unknown Attribute: CHANGE-REQUEST needs an alternate address (RFC 5780)",
                        unknown=[Attr.CHANGE_REQUEST],
                    )
                ]
        response_port = request.response_port
        destination = source
        if response_port is not None:
            if request.has(Attr.PADDING):
                return [self._error(request, source, local, 400, "Bad Request: PADDING with RESPONSE-PORT")]
            if response_port == 0:
                return [self._error(request, source, local, 400, "Bad Request: RESPONSE-PORT 0")]
            destination = (source[0], response_port)

        origin = local if self.alternate is None else self._swap(local, change_ip, change_port)
        other = None if self.alternate is None else self._swap(local, True, True)
        response = binding_success(
            request,
            source,
            response_origin=origin if self._origin_known else None,
            other_address=other,
            software=self.software,
            padding=request.padding_size,
        )
        self.counters.responses += 1
        return [Outgoing(origin, destination, response.encode())]

    def _error(
        self,
        request: StunMessage,
        source: Address,
        local: Address,
        code: int,
        reason: str | None = None,
        *,
        unknown: Sequence[int] = (),
    ) -> Outgoing:
        self.counters.error_responses += 1
        message = error_response(request, code, reason, unknown_attributes=unknown, software=self.software)
        return Outgoing(local, source, message.encode())


# --- metrics --------------------------------------------------------------------------------

_METRICS = (
    ("requests", "traversal_stun_requests_total", "STUN requests received (well-formed)."),
    ("responses", "traversal_stun_responses_total", "Binding success responses sent."),
    ("error_responses", "traversal_stun_error_responses_total", "STUN error responses sent (400, 420)."),
    ("change_requests", "traversal_stun_change_requests_total", "Binding requests with a CHANGE-REQUEST flag set."),
)
_DROP_REASONS = (
    ("dropped_malformed", "malformed"),
    ("dropped_non_stun", "non_stun"),
    ("dropped_unexpected", "unexpected"),
    ("dropped_rate_limited", "rate_limited"),
)


def metrics_lines(counters: StunCounters, *, rfc5780: bool | None = None) -> list[str]:
    """Prometheus text-format lines (HELP, TYPE, samples) for the STUN server's counters."""
    lines: list[str] = []
    if rfc5780 is not None:
        lines += [
            "# HELP traversal_stun_rfc5780 1 if the STUN server has an alternate address (RFC 5780).",
            "# TYPE traversal_stun_rfc5780 gauge",
            f"traversal_stun_rfc5780 {int(rfc5780)}",
        ]
    for attr, name, help_text in _METRICS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name} {getattr(counters, attr)}"]
    name = "traversal_stun_dropped_total"
    lines += [
        f"# HELP {name} Datagrams dropped unanswered, by reason (malformed, non_stun, unexpected class, "
        "over the per-source rate).",
        f"# TYPE {name} counter",
    ]
    lines += [f'{name}{{reason="{reason}"}} {getattr(counters, attr)}' for attr, reason in _DROP_REASONS]
    return lines


# --- the asyncio driver ---------------------------------------------------------------------


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, server: StunServer, local: Address) -> None:
        self._server = server
        self._local = local

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self._server._received(data, normalize_address(addr), self._local)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors for earlier responses: nothing to do


class StunServer:
    """Binds the core's sockets and runs it on the event loop.

    ``primary`` / ``alternate`` may use port 0 (tests): the driver then picks free
    ports such that all four combinations can be bound.
    """

    def __init__(
        self,
        primary: Address,
        alternate: Address | None = None,
        *,
        software: str | None = SOFTWARE,
        limiter: RateLimiter | None = None,
    ) -> None:
        # Validate early (same rules as the core) so the CLI can fail before binding anything.
        StunServerCore((primary[0], primary[1] or 1), None if alternate is None else (alternate[0], alternate[1] or 2))
        if alternate is not None and (primary[1] == 0) != (alternate[1] == 0):
            raise StunServerError("give both STUN ports or neither as 0")
        self._primary = primary
        self._alternate = alternate
        self._software = software
        self._transports: dict[Address, asyncio.DatagramTransport] = {}
        self.core: StunServerCore | None = None
        #: Requests per source IP address (a flood from one source is dropped, not answered).
        self._limiter = limiter if limiter is not None else RateLimiter()

    @property
    def counters(self) -> StunCounters:
        return self.core.counters if self.core is not None else StunCounters()

    @property
    def primary(self) -> Address:
        return self.core.primary if self.core is not None else self._primary

    @property
    def alternate(self) -> Address | None:
        return self.core.alternate if self.core is not None else self._alternate

    @property
    def addresses(self) -> list[Address]:
        """The bound (IP, port) of every socket."""
        return list(self._transports)

    def metrics_lines(self) -> list[str]:
        return metrics_lines(self.counters, rfc5780=self._alternate is not None)

    async def start(self) -> None:
        if self.core is not None:
            raise StunServerError("STUN server already started")
        last: OSError | None = None
        for _ in range(_BIND_ATTEMPTS):
            try:
                await self._bind()
            except OSError as exc:
                self._close_transports()
                last = exc
                if exc.errno == errno.EADDRINUSE and (self._primary[1] == 0):
                    continue  # an ephemeral pick collided on the other IP: pick again
                break
            else:
                log_event(
                    log,
                    "stun_listening",
                    primary=format_address(self.primary),
                    alternate=format_address(self.alternate) if self.alternate else "-",
                    rfc5780=str(self.alternate is not None).lower(),
                )
                return
        where = format_address(self._primary)
        if self._alternate is not None:
            where += f" / {format_address(self._alternate)}"
        detail = last.strerror if last is not None and last.strerror else str(last)
        raise StunServerError(f"cannot listen for STUN on {where}: {detail}")

    async def _bind(self) -> None:
        loop = asyncio.get_running_loop()
        primary, alternate = self._primary, self._alternate
        family = socket.AF_INET6 if ":" in primary[0] else socket.AF_INET
        socks: dict[Address, socket.socket] = {}
        try:
            if primary[1] == 0:
                first = _udp_socket(family, primary)
                socks[normalize_address(first.getsockname())] = first
                primary = normalize_address(first.getsockname())
                if alternate is not None:
                    probe = _udp_socket(family, (primary[0], 0))
                    alternate = (alternate[0], probe.getsockname()[1])
                    socks[normalize_address(probe.getsockname())] = probe
            core = StunServerCore(primary, alternate, software=self._software)
            for local in core.local_addresses:
                if local not in socks:
                    socks[local] = _udp_socket(family, local)
            for local, sock in socks.items():
                transport, _ = await loop.create_datagram_endpoint(
                    lambda local=local: _Endpoint(self, local), sock=sock
                )
                self._transports[local] = transport  # type: ignore[assignment]
        except BaseException:
            for sock in socks.values():
                sock.close()
            raise
        self.core = core

    def _received(self, data: bytes, source: Address, local: Address) -> None:
        assert self.core is not None
        if not self._limiter.allow(source[0], time.monotonic()):
            self.core.counters.dropped_rate_limited += 1  # never answered: no amplification, no oracle
            return
        for out in self.core.handle_datagram(data, source, local):
            transport = self._transports.get(out.source)
            if transport is not None and not transport.is_closing():
                transport.sendto(out.data, out.destination)

    def _close_transports(self) -> None:
        for transport in self._transports.values():
            transport.close()
        self._transports.clear()

    async def close(self) -> None:
        """Close every socket (idempotent)."""
        self._close_transports()
        await asyncio.sleep(0)  # let the transports' connection_lost callbacks run


def _udp_socket(family: int, local: Address) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(local)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_stun(primary: Address, alternate: Address | None = None) -> None:
    """Run a standalone STUN server until cancelled (``python -m relay_server.stun_server``)."""
    server = StunServer(primary, alternate)
    await server.start()
    try:
        await asyncio.Event().wait()
    finally:
        await server.close()


def _main() -> None:  # pragma: no cover - a convenience for people; tests use `traversal relay --stun`
    import argparse

    from traversal.logfmt import setup_logging

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--stun", required=True, metavar="IP:PORT")
    parser.add_argument("--stun-alt", metavar="IP:PORT")
    args = parser.parse_args()
    setup_logging()

    def split(text: str) -> Address:
        host, _, port = text.rpartition(":")
        return host.strip("[]"), int(port)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_stun(split(args.stun), split(args.stun_alt) if args.stun_alt else None))


if __name__ == "__main__":  # pragma: no cover
    _main()
