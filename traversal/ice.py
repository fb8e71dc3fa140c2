"""Connectivity checks for the direct path: aioice, wrapped to nominate one UDP pair in time.

:class:`IceAgent` is what ``traversal/direct.py`` drives for one attempt: ``gather()``
local candidates (host, server-reflexive, predicted), send them in a CANDIDATES offer,
``connect(peer_offer, timeout)`` to get a :class:`NominatedPair` or :class:`IceFailed`
with a reason, then carry QUIC over the pair with the synchronous ``send()`` and
``set_receiver()``. One agent per attempt (aioice has no ICE restart); roles come
from the identities (:func:`is_controlling`); aioice's aggressive nomination means
the first pair that answers wins.

What aioice 0.13 needed around it (LIBRARY-NOTES.md, "aioice"), done by subclassing
``Connection`` and ``StunProtocol`` rather than forking:

- sockets bind to the addresses we choose (:func:`usable_host_addresses` minus the
  TAP overlay) and, with ``port_range``, to the first free port of the range;
- server-reflexive candidates come from our own STUN logic (``traversal/stun.py``,
  the strict codec) on the ICE sockets, which also measures how the NAT allocates
  ports and advertises predicted candidates (below);
- the receive path is bounded: STUN is parsed strictly before aioice sees it, a
  request without PRIORITY is dropped rather than crash aioice, and non-STUN
  datagrams (first byte > 3, RFC 7983) go synchronously to the receiver, never to
  aioice's unbounded queue; before the receiver is set, at most
  ICE_MAX_EARLY_DATAGRAMS wait;
- ``send()`` is one ``sendto`` on the nominated pair's transport, not a coroutine;
- ``connect()`` runs under the deadline (aioice gives up on a pair only after ~40 s);
- the check list is ordered for port prediction (below).

Port prediction. A NAT whose mapping depends on the destination (RFC 4787
"address(-and-port)-dependent", a "symmetric" NAT) gives every new flow a new
public port, so the STUN-learnt one is useless to the peer. If it allocates those
ports sequentially, the next ones are predictable: ``gather()`` asks the STUN
server's primary address, its OTHER-ADDRESS and a third address (RFC 5780) from
the same socket, one after the other, and if the mapped ports step by a constant
delta it advertises ``last + k * delta`` for k = 1..predict, foundation
``predicted<k>``.

The lab's ``symseq`` NAT (nftables ``numgen inc``) allocates per NEW flow for the
whole NAT: every STUN query and every check towards a new destination takes the
next port. Hence:

- cone x symseq: the symseq side's first new flow after gathering is its check to
  the cone side's srflx (whose mapping is stable); it leaves from predicted port
  k for some small k (k = 1 unless other flows got in between, which the spare
  predicted ports absorb). The cone side checks every predicted port; the one
  that matches has then been sent to from both ends, and passes both filters.
- symseq x symseq: each side's k-th new flow must go to the peer's k-th predicted
  port. Side A's check to B's port k leaves from A's port k, and B's check to A's
  port k from B's port k: the same 5-tuple from both ends, so whichever arrives
  second is a reply for its NAT. This needs both sides to send their first checks
  to the predicted candidates, in k order, before anything else that crosses the
  NAT. :meth:`_IceConnection.sort_check_list` therefore puts pairs with a
  predicted remote first, by k, then the rest by RFC 8445 pair priority; and
  predicted remotes are paired with one local socket only (the one whose
  mapping was measured), since checks from other sockets would interleave.
  Checks are paced by aioice (one new check every 20 ms), so order is kept.
  It fails if anything else opens a flow on either NAT between gathering and the
  checks (another host behind it, our relay's own reconnect), or if either
  side's first checks go elsewhere: an offset of m flows on one side and m' on
  the other only lines up if m + m' = 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from aioice import Candidate, Connection
from aioice import stun as aioice_stun
from aioice.ice import CandidatePair, StunProtocol, candidate_pair_priority

from transport.constants import (
    DEFAULT_PREDICTED_CANDIDATES,
    ICE_CHECK_EARLY_RETRANSMITS,
    ICE_GATHER_TIMEOUT,
    ICE_MAX_EARLY_DATAGRAMS,
    ICE_MAX_STUN_SIZE,
    ICE_STUN_RTO,
    MAX_CANDIDATES,
    MAX_HOST_CANDIDATES,
    MAX_OBSERVED_CANDIDATES,
    MAX_PREDICTED_CANDIDATES,
)
from traversal import stun as stun_codec
from traversal.candidates import (
    COMPONENT,
    CandidateError,
    CandidateOffer,
    host_candidate,
    parse_candidate,
    predict_ports,
    predicted_candidates,
    predicted_index,
    reflexive_candidate,
    usable_host_addresses,
)
from traversal.logfmt import log_event
from traversal.probe import SEQUENTIAL, classify_allocation
from traversal.stun import (
    Address,
    StunClass,
    StunMessage,
    format_address,
    normalize_address,
    retransmit_schedule,
    route_source,
)
from traversal.udpio import BatchedSocket

log = logging.getLogger("traversal.ice")

#: Socket buffers of the ICE sockets (they carry the direct path's data too).
SOCKET_BUFFER_SIZE = 1 << 20

#: Datagram receiver signature: the payload of one non-STUN datagram.
Receiver = Callable[[bytes], None]


class IceError(Exception):
    """Base of this module's errors."""


class IceFailed(IceError):
    """No direct path this attempt; ``str()`` says why (e.g. "no candidate pair answered within 5.0 s")."""


class PortRangeError(IceFailed):
    """Every port of ``--udp-ports`` is taken on an address; free one or widen the range."""


class IceStateError(IceError):
    """An agent method was called out of order (send before connect, connect twice)."""


class IceConfigError(IceError, ValueError):
    """An argument to :class:`IceAgent` is out of range."""


def is_controlling(local_identity: bytes, peer_identity: bytes) -> bool:
    """The deterministic ICE role: the side with the lower identity (bytewise) controls."""
    if local_identity == peer_identity:
        raise IceConfigError("both sides have the same identity: roles cannot be decided")
    return local_identity < peer_identity


def _format(candidate: Candidate) -> str:
    host = f"[{candidate.host}]" if ":" in candidate.host else candidate.host
    return f"{host}:{candidate.port}"


@dataclass(frozen=True)
class NominatedPair:
    """The candidate pair ICE chose: our socket's host candidate and the peer's address."""

    local: Candidate
    remote: Candidate

    @property
    def predicted(self) -> int | None:
        """k if the remote end is the peer's k-th predicted candidate."""
        return predicted_index(self.remote)

    def __str__(self) -> str:
        k = self.predicted
        suffix = f" (predicted +{k})" if k is not None else ""
        return f"{_format(self.local)} {self.local.type} -> {_format(self.remote)} {self.remote.type}{suffix}"


@dataclass(frozen=True)
class NatObservation:
    """What gathering learnt about the NAT in front of the measured socket."""

    base: Address
    mapped: tuple[Address, ...]
    allocation: str | None
    delta: int | None
    predicted_ports: tuple[int, ...]


@dataclass(frozen=True)
class IceStats:
    """Counters and timings of one agent (for logs and ``traversal status``)."""

    gather_s: float | None
    connect_s: float | None
    local_candidates: int
    remote_candidates: int
    pairs: int
    checks_sent: int
    checks_received: int
    datagrams_sent: int
    datagrams_received: int
    datagrams_dropped: int
    stun_dropped: int


# --- aioice, extended ------------------------------------------------------------------------


class _IceSocket(StunProtocol):
    """One ICE UDP socket: strict STUN demultiplexing, our STUN queries, the data fast path."""

    def __init__(self, connection: _IceConnection) -> None:
        super().__init__(connection)
        self.connection = connection
        self._queries: dict[bytes, asyncio.Future[tuple[StunMessage, Address]]] = {}
        #: The nominated socket's batched reader and sender (see udpio.py).
        self.batched: BatchedSocket | None = None
        #: Our connectivity check awaiting an answer, per remote address.
        self._checks_in_flight: dict[tuple[str, int], aioice_stun.Message] = {}

    def resend_check(self, addr: tuple[str, int]) -> bool:
        """Send our check in flight to ``addr`` again now (same transaction); False if there is none."""
        request = self._checks_in_flight.get(addr)
        if request is None or self.transport.is_closing():
            return False
        self.send_stun(request, addr)
        return True

    def read_in_batches(self) -> BatchedSocket | None:
        """From now on, read this socket in batches and send data through it (None if it cannot)."""
        if self.batched is None:
            try:
                self.batched = BatchedSocket(self.transport, self.datagram_received)
            except OSError as exc:
                log_event(log, "udp_batching_off", logging.INFO, reason=str(exc))
                return None
            self.batched.start()
        return self.batched

    def datagram_received(self, data: bytes | str, addr: tuple[Any, ...]) -> None:
        if not isinstance(data, bytes) or not data:
            return
        source = (addr[0], addr[1])
        connection = self.connection
        if data[0] > 3:  # not STUN (RFC 7983): QUIC, or the session's own frames
            connection.data_from(data, source, self)
            return
        if len(data) > ICE_MAX_STUN_SIZE:
            connection.stun_dropped += 1
            return
        try:
            message = stun_codec.parse(data)
        except stun_codec.StunError:
            connection.stun_dropped += 1
            return
        query = self._queries.get(message.transaction_id)
        if query is not None:
            if message.cls in (StunClass.SUCCESS, StunClass.ERROR) and not query.done():
                query.set_result((message, normalize_address(source)))
            return
        try:
            parsed = aioice_stun.parse_message(data)
        except Exception:  # aioice's parser raises struct.error, UnicodeDecodeError, ... on junk
            connection.stun_dropped += 1
            return
        if parsed.message_class in (aioice_stun.Class.RESPONSE, aioice_stun.Class.ERROR):
            transaction = self.transactions.get(parsed.transaction_id)
            if transaction is not None:
                transaction.response_received(parsed, source)
        elif parsed.message_class == aioice_stun.Class.REQUEST:
            # aioice reads PRIORITY of every authenticated check (RFC 8445 s7.1.1 requires it).
            if "PRIORITY" not in parsed.attributes:
                connection.stun_dropped += 1
                return
            connection.checks_received += 1
            connection.request_received(parsed, source, self)
        else:
            connection.stun_dropped += 1

    def send_stun(self, message: aioice_stun.Message, addr: tuple[str, int]) -> None:
        if message.message_class == aioice_stun.Class.REQUEST:
            self.connection.checks_sent += 1
        super().send_stun(message, addr)

    async def request(
        self,
        request: aioice_stun.Message,
        addr: tuple[str, int],
        integrity_key: bytes | None = None,
        retransmissions: int | None = None,
    ) -> tuple[aioice_stun.Message, tuple[str, int]]:
        # A connectivity check (authenticated, default retransmissions; consent checks
        # pass retransmissions=0) is also resent at ICE_CHECK_EARLY_RETRANSMITS: the same
        # bytes, so the one transaction matches whichever copy gets an answer.
        transaction = asyncio.ensure_future(super().request(request, addr, integrity_key, retransmissions))
        is_check = integrity_key is not None and retransmissions is None
        if is_check:
            self._checks_in_flight[addr] = request
        try:
            if is_check:
                sent_at = asyncio.get_running_loop().time()
                for at in ICE_CHECK_EARLY_RETRANSMITS:
                    await asyncio.wait({transaction}, timeout=max(sent_at + at - asyncio.get_running_loop().time(), 0))
                    if transaction.done() or self.transport.is_closing():
                        break
                    self.send_stun(request, addr)
            return await transaction
        finally:
            if is_check and self._checks_in_flight.get(addr) is request:
                del self._checks_in_flight[addr]
            if not transaction.done():
                transaction.cancel()
                with contextlib.suppress(asyncio.CancelledError, aioice_stun.TransactionError):
                    await transaction

    async def query(self, server: Address, deadline: float) -> StunMessage | None:
        """One Binding transaction with our codec (RFC 5389 retransmissions from
        ICE_STUN_RTO), bounded by ``deadline`` (loop time). The success response, or None."""
        loop = asyncio.get_running_loop()
        timeout = deadline - loop.time()
        if timeout <= 0:
            return None
        request = stun_codec.binding_request()
        data = request.encode()
        future: asyncio.Future[tuple[StunMessage, Address]] = loop.create_future()
        self._queries[request.transaction_id] = future
        start = loop.time()
        try:
            for at in retransmit_schedule(timeout, retries=6, rto=ICE_STUN_RTO):
                delay = start + at - loop.time()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(future), delay)
                if future.done():
                    break
                if self.transport.is_closing():
                    return None
                self.transport.sendto(data, server)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(future), max(deadline - loop.time(), 0.0))
        finally:
            self._queries.pop(request.transaction_id, None)
            if not future.done():
                future.cancel()
        if not future.done() or future.cancelled():
            return None
        message, source = future.result()
        if source != normalize_address(server) or message.cls != StunClass.SUCCESS:
            return None
        return message


class _IceConnection(Connection):
    """aioice's Connection with our sockets, gathering, check order and data path."""

    def __init__(
        self,
        *,
        controlling: bool,
        stun_server: tuple[str, int] | None,
        port_range: tuple[int, int] | None,
        predict: int,
        use_ipv6: bool,
    ) -> None:
        super().__init__(ice_controlling=controlling, components=1, stun_server=stun_server, use_ipv6=use_ipv6)
        self.port_range = port_range
        self.predict = predict
        self.addresses: list[str] = []
        self.gather_timeout = ICE_GATHER_TIMEOUT
        self.primary: _IceSocket | None = None
        self.nat: NatObservation | None = None
        self.checks_sent = 0
        self.checks_received = 0
        self.stun_dropped = 0
        self.datagrams_sent = 0
        self.datagrams_received = 0
        self.datagrams_dropped = 0
        # The data path: valid pairs (RFC 8445 s7.2.5.3.2) may all deliver; one pair sends.
        self.receiver: Receiver | None = None
        self.valid: set[tuple[StunProtocol, tuple[str, int]]] = set()
        self.send_to: tuple[asyncio.DatagramTransport, tuple[str, int]] | None = None
        self.nominated_key: tuple[StunProtocol, tuple[str, int]] | None = None
        self.batched: BatchedSocket | None = None
        self.early: deque[tuple[bytes, tuple[str, int], StunProtocol]] = deque(maxlen=ICE_MAX_EARLY_DATAGRAMS)
        self.shut = False

    # -- gathering ------------------------------------------------------------------------

    async def gather_candidates(self) -> None:
        if self._local_candidates_start:
            return
        self._local_candidates_start = True
        self._local_candidates += await self.get_component_candidates(COMPONENT, self.addresses, self.gather_timeout)
        self._local_candidates_end = True

    async def get_component_candidates(
        self, component: int, addresses: list[str], timeout: float = ICE_GATHER_TIMEOUT
    ) -> list[Candidate]:
        deadline = asyncio.get_running_loop().time() + timeout
        sockets: list[_IceSocket] = []
        for address in addresses:
            bound = await self._bind(address)
            if bound is not None:
                sockets.append(bound)
        if not sockets:
            raise IceFailed(f"could not bind a UDP socket on any of {', '.join(addresses)}")
        self.primary = next((s for s in sockets if ":" not in s.local_candidate.host), None)
        candidates = [s.local_candidate for s in sockets]
        if self.stun_server is not None:
            candidates += await self._reflexive(sockets, deadline)
        return candidates

    async def _bind(self, address: str) -> _IceSocket | None:
        """A socket on ``address``, on the first free port of the range (or any port)."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        ports: Sequence[int] = range(self.port_range[0], self.port_range[1] + 1) if self.port_range else (0,)
        for port in ports:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((address, port))
            except OSError as exc:
                sock.close()
                if self.port_range and exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    continue
                log_event(log, "ice_bind_skipped", logging.WARNING, address=address, reason=exc.strerror or str(exc))
                return None
            break
        else:
            low, high = self.port_range or (0, 0)
            raise PortRangeError(f"no free UDP port in {low}-{high} on {address}: widen --udp-ports")
        try:
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_SIZE)
            sock.setblocking(False)
            _, protocol = await loop.create_datagram_endpoint(lambda: _IceSocket(self), sock=sock)
        except BaseException:
            sock.close()
            raise
        assert isinstance(protocol, _IceSocket)
        protocol.local_candidate = host_candidate(address, sock.getsockname()[1])
        self._protocols.append(protocol)
        return protocol

    async def _resolve_stun(self, deadline: float) -> Address | None:
        assert self.stun_server is not None
        host, port = self.stun_server
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_address(host)), port
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM), max(deadline - loop.time(), 0.0)
            )
        except (OSError, TimeoutError) as exc:
            log_event(log, "ice_stun_unresolved", logging.WARNING, server=host, reason=str(exc) or "timed out")
            return None
        infos.sort(key=lambda info: info[0] != socket.AF_INET)  # IPv4 first: that is where NATs are
        return normalize_address(infos[0][4]) if infos else None

    async def _reflexive(self, sockets: list[_IceSocket], deadline: float) -> list[Candidate]:
        server = await self._resolve_stun(deadline)
        if server is None:
            return []
        version = ipaddress.ip_address(server[0]).version
        eligible = [s for s in sockets if ipaddress.ip_address(s.local_candidate.host).version == version]
        if not eligible:
            return []
        source = route_source(server)
        primary = next((s for s in eligible if s.local_candidate.host == source), eligible[0])
        self.primary = primary
        results: list[Candidate] = []
        # Other sockets first, and all before the measured one: on a sequential NAT a query
        # interleaved with the measurement would take a port the prediction counts on.
        others = [s for s in eligible if s is not primary]
        answers = await asyncio.gather(*(s.query(server, deadline) for s in others))
        for sock, answer in zip(others, answers, strict=True):
            mapped = answer.reflexive_address if answer is not None else None
            base = (sock.local_candidate.host, sock.local_candidate.port)
            if mapped is not None and mapped != base:
                results.append(reflexive_candidate(mapped, base))
        return results + await self._measure(primary, server, deadline)

    async def _measure(self, sock: _IceSocket, server: Address, deadline: float) -> list[Candidate]:
        """srflx from ``sock``, then (RFC 5780 servers only) the mapping towards two more
        server addresses, in turn, to see whether and how the NAT allocates new ports."""
        base = (sock.local_candidate.host, sock.local_candidate.port)
        first = await sock.query(server, deadline)
        mapped1 = first.reflexive_address if first is not None else None
        if first is None or mapped1 is None:
            log_event(log, "ice_no_srflx", server=format_address(server), reason="no STUN answer")
            return []
        out = [reflexive_candidate(mapped1, base)] if mapped1 != base else []
        mapped = [mapped1]
        other = first.other_address
        if self.predict and mapped1 != base and other is not None and _is_alternate(server, other):
            for destination in (other, (server[0], other[1])):
                answer = await sock.query(destination, deadline)
                found = answer.reflexive_address if answer is not None else None
                if found is None or found == mapped[-1]:
                    break  # no answer, or an endpoint-independent mapping: nothing to predict
                mapped.append(found)
        allocation, delta = None, None
        ports: list[int] = []
        if len(mapped) > 1 and all(m[0] == mapped1[0] for m in mapped):
            allocation, delta = classify_allocation([(base[1], m[1]) for m in mapped])
            if allocation == SEQUENTIAL and delta is not None:
                ports = predict_ports(mapped[-1][1], delta, self.predict)
                out += predicted_candidates(mapped1[0], ports, base)
        self.nat = NatObservation(base, tuple(mapped), allocation, delta, tuple(ports))
        return out

    # -- checks -----------------------------------------------------------------------------

    def sort_check_list(self) -> None:
        # Predicted remotes first, by k, so a sequential NAT hands our k-th new flow to the
        # check towards the peer's k-th predicted port (module docstring); then RFC 8445.
        controlling = self.ice_controlling

        def key(pair: CandidatePair) -> tuple[int, int]:
            k = predicted_index(pair.remote_candidate)
            if k is not None:
                return (0, k)
            return (1, -candidate_pair_priority(pair.local_candidate, pair.remote_candidate, controlling))

        self._check_list.sort(key=key)

    def _pair_remote_candidate(self, remote_candidate: Candidate) -> None:
        # Only the measured socket's mapping follows the prediction: other sockets would
        # interleave their flows with it.
        primary = self.primary
        if predicted_index(remote_candidate) is None or primary is None:
            super()._pair_remote_candidate(remote_candidate)
            return
        if primary.local_candidate.can_pair_with(remote_candidate) and not self._find_pair(primary, remote_candidate):
            self._check_list.append(CandidatePair(primary, remote_candidate))

    def check_incoming(self, message: aioice_stun.Message, addr: tuple[str, int], protocol: StunProtocol) -> None:
        super().check_incoming(message, addr, protocol)
        # A triggered check on a pair whose own check is in progress (RFC 8445 s7.3.1.4): the
        # peer's check just opened its NAT towards us, so our check, probably dropped there
        # the first time, gets through now. Resending it at once, rather than at its next
        # retransmission, is what makes the controlled side nominate one round trip after
        # the controlling side instead of ~100 ms later.
        pair = self._find_pair(protocol, self._remote_candidate_at(addr))
        if pair is not None and pair.state == CandidatePair.State.IN_PROGRESS and isinstance(protocol, _IceSocket):
            protocol.resend_check(addr)

    def _remote_candidate_at(self, addr: tuple[str, int]) -> Candidate | None:
        for candidate in self._remote_candidates:
            if candidate._network_host == addr[0] and candidate.port == addr[1]:
                return candidate
        return None

    def check_state(self, pair: CandidatePair, state: CandidatePair.State) -> None:
        super().check_state(pair, state)
        if state == CandidatePair.State.SUCCEEDED:
            self.valid.add((pair.protocol, pair.remote_addr))

    # -- data -----------------------------------------------------------------------------------

    def data_received(self, data: bytes, component: int) -> None:
        # aioice's path to its unbounded recv() queue; our sockets never take it.
        self.datagrams_dropped += 1

    def data_from(self, data: bytes, source: tuple[str, int], protocol: StunProtocol) -> None:
        receiver = self.receiver
        if receiver is not None and (protocol, source) in self.valid:
            self.datagrams_received += 1
            try:
                receiver(data)
            except Exception:
                log.exception("ice receiver failed on a %d-byte datagram", len(data))
            return
        if receiver is None and not self.shut:
            if len(self.early) == self.early.maxlen:
                self.datagrams_dropped += 1
            self.early.append((data, source, protocol))
            return
        self.datagrams_dropped += 1

    def start_data(self, pair: CandidatePair) -> None:
        self.nominated_key = (pair.protocol, pair.remote_addr)
        self.valid.add(self.nominated_key)
        self.send_to = (pair.protocol.transport, pair.remote_addr)
        if isinstance(pair.protocol, _IceSocket):
            self.batched = pair.protocol.read_in_batches()
        self._flush_early()

    def set_receiver(self, receiver: Receiver) -> None:
        self.receiver = receiver
        self._flush_early()

    def _flush_early(self) -> None:
        if self.receiver is None or self.send_to is None:
            return
        early, self.early = list(self.early), deque(maxlen=ICE_MAX_EARLY_DATAGRAMS)
        for data, source, protocol in early:
            self.data_from(data, source, protocol)

    def send_data(self, data: bytes) -> None:
        target = self.send_to
        if target is None:
            if self.shut:
                self.datagrams_dropped += 1
                return
            raise IceStateError("no nominated pair yet: send() only after connect() succeeded")
        if self.batched is not None and not self.batched.sendto(data, target[1]):
            self.datagrams_dropped += 1
            return
        if self.batched is None:
            target[0].sendto(data, target[1])
        self.datagrams_sent += 1

    def send_many(self, datagrams: Sequence[bytes]) -> int:
        """Send datagrams in order on the nominated pair (segmented where it can); returns drops."""
        target = self.send_to
        if target is None or self.batched is None:
            for data in datagrams:
                self.send_data(data)
            return 0
        dropped = self.batched.send_many(datagrams, target[1])
        self.datagrams_sent += len(datagrams) - dropped
        self.datagrams_dropped += dropped
        return dropped

    async def shutdown(self) -> None:
        self.shut = True
        self.send_to = None
        self.receiver = None
        self.early.clear()
        if self.batched is not None:
            self.batched.close()
            self.batched = None
        await self.close()

    def tried_pairs(self) -> tuple[int, int]:
        """(pairs whose check started, pairs that answered)."""
        started = succeeded = 0
        for pair in self._check_list:
            if pair.state != CandidatePair.State.FROZEN and pair.state != CandidatePair.State.WAITING:
                started += 1
            if pair.state == CandidatePair.State.SUCCEEDED:
                succeeded += 1
        return started, succeeded


def _is_alternate(primary: Address, other: Address) -> bool:
    """RFC 5780 OTHER-ADDRESS differs in IP and port (else the server is not RFC 5780)."""
    try:
        p, o = ipaddress.ip_address(primary[0]), ipaddress.ip_address(other[0])
    except ValueError:
        return False
    return p.version == o.version and p != o and primary[1] != other[1]


# --- the agent ----------------------------------------------------------------------------------


class IceAgent:
    """One direct-path attempt: gather, connect within a deadline, then carry datagrams.

    ``addresses`` replaces the interface scan (tests use ``["127.0.0.1"]``); otherwise
    host candidates come from :func:`usable_host_addresses` minus ``exclude_addresses``.
    ``predict`` predicted candidates are advertised behind a sequential NAT (0: none).
    """

    def __init__(
        self,
        *,
        controlling: bool,
        stun_server: tuple[str, int] | None,
        port_range: tuple[int, int] | None = None,
        exclude_addresses: Iterable[str] = (),
        predict: int = DEFAULT_PREDICTED_CANDIDATES,
        use_ipv6: bool = True,
        addresses: Iterable[str] | None = None,
    ) -> None:
        if port_range is not None:
            low, high = port_range
            if not (isinstance(low, int) and isinstance(high, int) and 1 <= low <= high <= 65535):
                raise IceConfigError(f"UDP port range {low}-{high} is not within 1-65535, low to high")
        if not isinstance(predict, int) or not 0 <= predict <= MAX_PREDICTED_CANDIDATES:
            raise IceConfigError(f"predict must be 0..{MAX_PREDICTED_CANDIDATES}")
        if stun_server is not None and not (isinstance(stun_server[1], int) and 1 <= stun_server[1] <= 65535):
            raise IceConfigError(f"STUN server port {stun_server[1]!r} outside 1-65535")
        self._exclude = tuple(exclude_addresses)
        self._use_ipv6 = use_ipv6
        self._addresses = None if addresses is None else [self._check_address(a) for a in addresses]
        self._conn = _IceConnection(
            controlling=controlling, stun_server=stun_server, port_range=port_range, predict=predict, use_ipv6=use_ipv6
        )
        self.controlling = controlling
        #: The pair ``connect()`` nominated (None before, or after a failure).
        self.nominated: NominatedPair | None = None
        self._gathered = False
        self._connect_started = False
        self._closed = False
        self._gather_s: float | None = None
        self._connect_s: float | None = None
        self._remote_count = 0

    @staticmethod
    def _check_address(address: str) -> str:
        try:
            return str(ipaddress.ip_address(address))
        except ValueError:
            raise IceConfigError(f"{address!r} is not an IP address") from None

    # -- credentials and state ------------------------------------------------------------------

    @property
    def local_ufrag(self) -> str:
        return self._conn.local_username

    @property
    def local_pwd(self) -> str:
        return self._conn.local_password

    @property
    def checks_sent(self) -> int:
        """STUN requests sent as connectivity checks (retransmissions and consent included)."""
        return self._conn.checks_sent

    @property
    def nat(self) -> NatObservation | None:
        """The NAT measurement made while gathering (None without a STUN answer)."""
        return self._conn.nat

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> IceStats:
        conn = self._conn
        return IceStats(
            gather_s=self._gather_s,
            connect_s=self._connect_s,
            local_candidates=len(conn.local_candidates),
            remote_candidates=self._remote_count,
            pairs=len(conn._check_list),
            checks_sent=conn.checks_sent,
            checks_received=conn.checks_received,
            datagrams_sent=conn.datagrams_sent,
            datagrams_received=conn.datagrams_received,
            datagrams_dropped=conn.datagrams_dropped,
            stun_dropped=conn.stun_dropped,
        )

    # -- gathering -------------------------------------------------------------------------------

    async def gather(self, timeout: float = ICE_GATHER_TIMEOUT) -> list[str]:
        """Bind the sockets and return the local candidates as SDP lines: host, srflx and,
        behind a sequential NAT, predicted srflx. Waits at most ``timeout`` for STUN.
        :class:`IceFailed` if no socket can be bound (:class:`PortRangeError` if the
        port range is full)."""
        if self._gathered or self._closed:
            raise IceStateError("gather() runs once per agent")
        self._gathered = True
        if self._addresses is not None:
            addresses = [a for a in self._addresses if self._use_ipv6 or ":" not in a]
        else:
            try:
                addresses = usable_host_addresses(self._exclude, use_ipv6=self._use_ipv6)
            except CandidateError as exc:
                raise IceConfigError(str(exc)) from None
        addresses = addresses[:MAX_HOST_CANDIDATES]
        if not addresses:
            raise IceFailed("no usable local address (all are loopback, link-local or excluded)")
        conn = self._conn
        conn.addresses = addresses
        conn.gather_timeout = max(timeout, 0.0)
        started = time.monotonic()
        await conn.gather_candidates()
        self._gather_s = time.monotonic() - started
        lines = [c.to_sdp() for c in conn.local_candidates][:MAX_CANDIDATES]
        nat = conn.nat
        log_event(
            log,
            "ice_gathered",
            candidates=len(lines),
            srflx=format_address(nat.mapped[0]) if nat else None,
            allocation=nat.allocation if nat else None,
            delta=nat.delta if nat else None,
            predicted=",".join(map(str, nat.predicted_ports)) if nat and nat.predicted_ports else None,
            ms=round(self._gather_s * 1000),
        )
        return lines

    # -- checks ------------------------------------------------------------------------------------

    async def connect(self, offer: CandidateOffer, timeout: float, extra_remote: Iterable[str] = ()) -> NominatedPair:
        """Check pairs towards the peer's candidates (and ``extra_remote``, e.g.
        :func:`~traversal.candidates.observed_candidates`) until one is nominated, at most
        ``timeout`` seconds. :class:`IceFailed` with the reason otherwise (the agent is
        then closed)."""
        if not self._gathered:
            raise IceStateError("connect() before gather()")
        if self._connect_started or self._closed:
            raise IceStateError("connect() runs once per agent: make a new IceAgent for each attempt")
        self._connect_started = True
        conn = self._conn
        conn.remote_username = offer.ufrag
        conn.remote_password = offer.pwd
        remotes: list[Candidate] = []
        for sdp in offer.candidates[:MAX_CANDIDATES]:
            try:
                remotes.append(parse_candidate(sdp))
            except CandidateError as exc:
                await self.close()
                raise IceFailed(f"the peer's offer has an invalid candidate: {exc}") from None
        for sdp in list(extra_remote)[:MAX_OBSERVED_CANDIDATES]:
            try:
                remotes.append(parse_candidate(sdp))
            except CandidateError as exc:
                log_event(log, "ice_extra_candidate_ignored", logging.WARNING, reason=str(exc))
        for candidate in remotes:
            if candidate.type == "prflx":  # aioice takes host, srflx and relay from signalling
                candidate.type = "srflx"
            await conn.add_remote_candidate(candidate)
        await conn.add_remote_candidate(None)
        self._remote_count = len(conn.remote_candidates)
        pairs = len(conn._check_list)
        loop = asyncio.get_running_loop()
        started = loop.time()
        if pairs == 0:
            await self.close()
            families = "IPv6" if self._use_ipv6 else "IPv4"
            raise IceFailed(
                f"no candidate pair to check: none of the peer's {len(remotes)} candidates matches a local "
                f"address family ({families} allowed here)"
            )
        try:
            await asyncio.wait_for(conn.connect(), timeout)
        except TimeoutError:
            reason = self._timeout_reason(timeout, pairs)
            await self.close()
            raise IceFailed(reason) from None
        except ConnectionError:
            tried, _ = conn.tried_pairs()
            elapsed = loop.time() - started
            await self.close()
            raise IceFailed(
                f"every candidate pair failed ({max(tried, pairs)} pairs tried in {elapsed:.1f} s)"
            ) from None
        pair = conn._nominated.get(COMPONENT)
        if pair is None:  # aioice reports completion only with a nominated pair; be explicit anyway
            await self.close()
            raise IceFailed("ICE completed without a nominated pair")
        self._connect_s = loop.time() - started
        self.nominated = NominatedPair(local=pair.local_candidate, remote=pair.remote_candidate)
        conn.start_data(pair)
        log_event(
            log,
            "ice_nominated",
            pair=str(self.nominated),
            ms=round(self._connect_s * 1000),
            checks=conn.checks_sent,
            controlling=self.controlling,
        )
        return self.nominated

    def _timeout_reason(self, timeout: float, pairs: int) -> str:
        tried, succeeded = self._conn.tried_pairs()
        if succeeded:
            return (
                f"{succeeded} candidate pair(s) answered but none was nominated within {timeout:.1f} s "
                f"({tried} of {pairs} pairs tried)"
            )
        return f"no candidate pair answered within {timeout:.1f} s ({tried} of {pairs} pairs tried)"

    # -- data ---------------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Send one datagram on the nominated pair, synchronously. After ``close()`` the
        datagram is dropped (counted); before ``connect()`` succeeded, IceStateError."""
        self._conn.send_data(data)

    def send_many(self, datagrams: Sequence[bytes]) -> int:
        """Send datagrams in order on the nominated pair, equal-sized runs in one segmented
        system call where the kernel allows; returns how many were dropped (counted)."""
        return self._conn.send_many(datagrams)

    def set_receiver(self, callback: Receiver) -> None:
        """Deliver every non-STUN datagram from a valid pair of this attempt to
        ``callback``, synchronously, in the socket's callback. Datagrams that arrived
        since the peer's nomination (at most ICE_MAX_EARLY_DATAGRAMS) come first."""
        self._conn.set_receiver(callback)

    async def close(self) -> None:
        """Stop the checks and consent, close every socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._conn.shutdown()
