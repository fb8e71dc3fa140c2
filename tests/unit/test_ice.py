"""Tests for traversal/ice.py: two IceAgents on loopback, exchanging offers in-process.

Nomination within the deadline, synchronous datagrams both ways, the port range, the
bounded receive path, failure within the deadline towards candidates that never
answer, the check order for predicted candidates, and gathering against a loopback
STUN server that pretends to sit behind a sequential NAT (RFC 5780 OTHER-ADDRESS).
Only 127.0.0.0/8 is used.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from transport.constants import ICE_MAX_EARLY_DATAGRAMS
from traversal import stun
from traversal.candidates import (
    CandidateOffer,
    decode_offer,
    encode_offer,
    host_candidate,
    parse_candidate,
    predicted_candidates,
    predicted_index,
    reflexive_candidate,
)
from traversal.ice import (
    IceAgent,
    IceConfigError,
    IceFailed,
    IceStateError,
    NominatedPair,
    PortRangeError,
    is_controlling,
)

pytestmark = pytest.mark.timeout(60)

LOOPBACK = ["127.0.0.1"]


def run(coro: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(coro())  # type: ignore[arg-type]


def offer_of(agent: IceAgent, candidates: list[str], attempt: int = 0) -> CandidateOffer:
    """The offer as the peer receives it (through the codec)."""
    offer = CandidateOffer(attempt=attempt, ufrag=agent.local_ufrag, pwd=agent.local_pwd, candidates=tuple(candidates))
    return decode_offer(encode_offer(offer))


async def connected_pair(**kwargs: Any) -> tuple[IceAgent, IceAgent, NominatedPair, NominatedPair]:
    a = IceAgent(controlling=True, stun_server=None, addresses=LOOPBACK, **kwargs)
    b = IceAgent(controlling=False, stun_server=None, addresses=LOOPBACK, **kwargs)
    local_a, local_b = await a.gather(), await b.gather()
    pair_a, pair_b = await asyncio.gather(
        a.connect(offer_of(b, local_b), timeout=2.0), b.connect(offer_of(a, local_a), timeout=2.0)
    )
    return a, b, pair_a, pair_b


@contextmanager
def silent_sockets(count: int) -> Iterator[list[socket.socket]]:
    """Bound UDP sockets nobody answers on (checks to them time out)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def test_roles_follow_identity_order() -> None:
    assert is_controlling(b"\x01" * 32, b"\x02" * 32) is True
    assert is_controlling(b"\x02" * 32, b"\x01" * 32) is False
    with pytest.raises(IceConfigError):
        is_controlling(b"\x01", b"\x01")


def test_connect_and_exchange_both_ways() -> None:
    async def main() -> None:
        started = time.monotonic()
        a, b, pair_a, pair_b = await connected_pair()
        try:
            assert time.monotonic() - started < 2.0
            assert (pair_a.local.port, pair_a.remote.port) == (pair_b.remote.port, pair_b.local.port)
            assert str(pair_a) == f"127.0.0.1:{pair_a.local.port} host -> 127.0.0.1:{pair_a.remote.port} host"
            assert a.nominated == pair_a and b.nominated == pair_b
            got_a: list[bytes] = []
            got_b: list[bytes] = []
            a.set_receiver(got_a.append)
            b.set_receiver(got_b.append)
            for i in range(20):
                a.send(b"Q" + bytes([i]) * 1000)
                b.send(b"R" + bytes([i]))
            deadline = time.monotonic() + 2.0
            while (len(got_a) < 20 or len(got_b) < 20) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert got_b == [b"Q" + bytes([i]) * 1000 for i in range(20)]
            assert got_a == [b"R" + bytes([i]) for i in range(20)]
            stats = a.stats()
            assert stats.datagrams_sent == 20 and stats.datagrams_received == 20
            assert a.checks_sent >= 1 and stats.pairs >= 1 and stats.connect_s is not None
        finally:
            await a.close()
            await b.close()
        assert a.closed
        a.send(b"Xafter close")  # dropped, never raised: the carriage may still flush
        assert a.stats().datagrams_dropped == 1
        await a.close()  # idempotent

    run(main)


def test_early_datagrams_wait_bounded_for_the_receiver() -> None:
    async def main() -> None:
        a, b, _, _ = await connected_pair()
        try:
            for i in range(ICE_MAX_EARLY_DATAGRAMS + 10):
                b.send(b"E" + i.to_bytes(2, "big"))
            await asyncio.sleep(0.1)
            got: list[bytes] = []
            a.set_receiver(got.append)
            # The newest ICE_MAX_EARLY_DATAGRAMS are kept, in order; the rest were dropped.
            assert got == [b"E" + i.to_bytes(2, "big") for i in range(10, ICE_MAX_EARLY_DATAGRAMS + 10)]
            assert a.stats().datagrams_dropped == 10
        finally:
            await a.close()
            await b.close()

    run(main)


def test_receive_path_drops_junk_and_survives() -> None:
    async def main() -> None:
        a, b, pair_a, _ = await connected_pair()
        got: list[bytes] = []
        a.set_receiver(got.append)
        junk = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            target = ("127.0.0.1", pair_a.local.port)
            request = stun.binding_request().encode()
            junk.sendto(b"Dnot from a valid pair", target)  # data from a stranger
            junk.sendto(b"\x00\x01" + b"\xff" * 30, target)  # STUN range, malformed
            junk.sendto(request, target)  # a Binding request without PRIORITY/USERNAME
            junk.sendto(b"\x00" * 4000, target)  # oversized STUN-range datagram
            junk.sendto(b"", target)
            await asyncio.sleep(0.1)
            assert got == []
            stats = a.stats()
            assert stats.stun_dropped == 3 and stats.datagrams_dropped == 1
            b.send(b"Dstill works")
            await asyncio.sleep(0.05)
            assert got == [b"Dstill works"]
        finally:
            junk.close()
            await a.close()
            await b.close()

    run(main)


def test_port_range_is_honoured() -> None:
    async def main() -> None:
        blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        blocker.bind(("127.0.0.1", 0))
        low = blocker.getsockname()[1]
        agents: list[IceAgent] = []
        try:
            if low + 2 > 65535:
                pytest.skip("ephemeral port too high for a range")
            # The first port is taken: the agent moves on to the next free one.
            agent = IceAgent(controlling=True, stun_server=None, addresses=LOOPBACK, port_range=(low, low + 2))
            agents.append(agent)
            lines = await agent.gather()
            ports = [parse_candidate(line).port for line in lines]
            assert ports and all(low < port <= low + 2 for port in ports)
            # Fill the range, then one more agent cannot bind: a clear error.
            other = IceAgent(controlling=True, stun_server=None, addresses=LOOPBACK, port_range=(low, low + 2))
            agents.append(other)
            await other.gather()
            full = IceAgent(controlling=True, stun_server=None, addresses=LOOPBACK, port_range=(low, low + 2))
            agents.append(full)
            with pytest.raises(PortRangeError, match=f"no free UDP port in {low}-{low + 2} on 127.0.0.1"):
                await full.gather()
        finally:
            blocker.close()
            for agent in agents:
                await agent.close()

    run(main)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"port_range": (0, 10)},
        {"port_range": (2000, 1000)},
        {"port_range": (60000, 70000)},
        {"predict": -1},
        {"predict": 99},
        {"addresses": ["localhost"]},
        {"stun_server": ("127.0.0.1", 0)},
    ],
)
def test_bad_arguments(kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {"controlling": True, "stun_server": None, **kwargs}
    with pytest.raises(IceConfigError):
        IceAgent(**args)


def test_misuse_is_reported() -> None:
    async def main() -> None:
        agent = IceAgent(controlling=True, stun_server=None, addresses=LOOPBACK)
        offer = CandidateOffer(attempt=0, ufrag="abcd", pwd="A" * 22, candidates=())
        with pytest.raises(IceStateError):
            await agent.connect(offer, timeout=1.0)
        with pytest.raises(IceStateError):
            agent.send(b"Dtoo early")
        await agent.gather()
        with pytest.raises(IceStateError):
            await agent.gather()
        with pytest.raises(IceFailed, match="no candidate pair to check"):
            await agent.connect(offer, timeout=1.0)
        with pytest.raises(IceStateError):
            await agent.connect(offer, timeout=1.0)
        await agent.close()

    run(main)


def test_no_usable_address_fails_clearly() -> None:
    async def main() -> None:
        agent = IceAgent(controlling=True, stun_server=None, addresses=["::1"], use_ipv6=False)
        with pytest.raises(IceFailed, match="no usable local address"):
            await agent.gather()
        await agent.close()

    run(main)


def test_unanswered_candidates_fail_within_the_deadline() -> None:
    async def main() -> None:
        agent = IceAgent(controlling=True, stun_server=None, addresses=LOOPBACK)
        await agent.gather()
        with silent_sockets(3) as socks:
            lines = [host_candidate("127.0.0.1", s.getsockname()[1]).to_sdp() for s in socks]
            offer = CandidateOffer(attempt=0, ufrag="abcd", pwd="A" * 22, candidates=tuple(lines))
            started = time.monotonic()
            with pytest.raises(IceFailed) as failure:
                await agent.connect(offer, timeout=1.0)
            elapsed = time.monotonic() - started
        assert 1.0 <= elapsed < 1.3
        assert str(failure.value) == "no candidate pair answered within 1.0 s (3 of 3 pairs tried)"
        assert agent.closed and agent.nominated is None

    run(main)


def test_predicted_candidates_are_checked_first_in_order() -> None:
    """Pairs towards predicted candidates start before every other pair, by k (the
    alignment a sequential NAT on both sides needs), then host, srflx, observed."""

    async def main() -> None:
        agent = IceAgent(controlling=False, stun_server=None, addresses=LOOPBACK)
        await agent.gather()
        with silent_sockets(6) as socks:
            ports = [s.getsockname()[1] for s in socks]
            base = ("10.9.9.9", 4000)
            predicted = predicted_candidates("127.0.0.1", ports[:3], base)
            host = host_candidate("127.0.0.1", ports[3])
            srflx = reflexive_candidate(("127.0.0.1", ports[4]), base)
            lines = [host.to_sdp(), predicted[2].to_sdp(), srflx.to_sdp(), predicted[0].to_sdp(), predicted[1].to_sdp()]
            observed = f"observed1 1 udp 1677738239 127.0.0.1 {ports[5]} typ srflx"
            offer = CandidateOffer(attempt=0, ufrag="abcd", pwd="A" * 22, candidates=tuple(lines))
            first_seen: dict[int, float] = {}

            async def watch() -> None:
                while len(first_seen) < len(socks):
                    for sock in socks:
                        try:
                            sock.recv(2048)
                        except BlockingIOError:
                            continue
                        first_seen.setdefault(sock.getsockname()[1], time.monotonic())
                    await asyncio.sleep(0.001)

            watcher = asyncio.ensure_future(watch())
            with pytest.raises(IceFailed):
                await agent.connect(offer, timeout=0.5, extra_remote=[observed])
            watcher.cancel()
        order = sorted(first_seen, key=first_seen.__getitem__)
        assert order == ports, (order, ports)  # predicted 1, 2, 3, then host, srflx, observed

    run(main)


# --- gathering against a loopback STUN server ------------------------------------------------------------


class FakeNatStun(asyncio.DatagramProtocol):
    """One address of an RFC 5780 STUN server that reports mappings of a pretend NAT.

    ``mapper(source, local)`` returns the mapped port to report. OTHER-ADDRESS points at
    the other loopback address and port.
    """

    def __init__(self, local: tuple[str, int], other: tuple[str, int], mapper: Callable[..., int]) -> None:
        self.local, self.other, self.mapper = local, other, mapper
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        request = stun.parse(data)
        mapped = ("198.51.100.7", self.mapper(addr, self.local))
        reply = stun.binding_success(request, mapped, response_origin=self.local, other_address=self.other)
        assert self.transport is not None
        self.transport.sendto(reply.encode(), addr)


async def start_fake_stun(mapper: Callable[..., int]) -> tuple[tuple[str, int], list[asyncio.BaseTransport]]:
    loop = asyncio.get_running_loop()
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port_a = probe.getsockname()[1]
    probe.close()
    port_b = port_a + 1 if port_a < 65535 else port_a - 1
    primary, alternate = ("127.0.0.1", port_a), ("127.0.0.2", port_b)
    transports = []
    for ip in ("127.0.0.1", "127.0.0.2"):
        for port in (port_a, port_b):
            local = (ip, port)
            other = alternate if (ip, port) == primary else primary
            transport, _ = await loop.create_datagram_endpoint(
                lambda local=local, other=other: FakeNatStun(local, other, mapper), local_addr=local
            )
            transports.append(transport)
    return primary, transports


def test_gather_predicts_a_sequential_nat() -> None:
    async def main() -> None:
        flows: dict[tuple[tuple[str, int], tuple[str, int]], int] = {}

        def sequential(source: tuple[str, int], local: tuple[str, int]) -> int:
            # A symmetric NAT with ports 20000, 20007, ... per new (source, destination).
            return flows.setdefault((source, local), 20000 + 7 * len(flows))

        server, transports = await start_fake_stun(sequential)
        agent = IceAgent(controlling=True, stun_server=server, addresses=LOOPBACK, predict=3)
        try:
            lines = await agent.gather(timeout=2.0)
            parsed = [parse_candidate(line) for line in lines]
            assert [c.type for c in parsed] == ["host", "srflx", "srflx", "srflx", "srflx"]
            assert (parsed[1].host, parsed[1].port) == ("198.51.100.7", 20000)
            assert [predicted_index(c) for c in parsed[2:]] == [1, 2, 3]
            assert [c.port for c in parsed[2:]] == [20021, 20028, 20035]
            assert agent.nat is not None and agent.nat.allocation == "sequential" and agent.nat.delta == 7
            assert [port for _, port in agent.nat.mapped] == [20000, 20007, 20014]
        finally:
            await agent.close()
            for transport in transports:
                transport.close()

    run(main)


@pytest.mark.parametrize("kind", ["cone", "random"])
def test_gather_predicts_nothing_otherwise(kind: str) -> None:
    async def main() -> None:
        ports = iter([31000, 45017, 38002])

        def mapper(source: tuple[str, int], local: tuple[str, int]) -> int:
            return 40000 if kind == "cone" else next(ports)

        server, transports = await start_fake_stun(mapper)
        agent = IceAgent(controlling=True, stun_server=server, addresses=LOOPBACK)
        try:
            parsed = [parse_candidate(line) for line in await agent.gather(timeout=2.0)]
            assert [c.type for c in parsed] == ["host", "srflx"]
            assert all(predicted_index(c) is None for c in parsed)
            assert agent.nat is not None
            assert len(agent.nat.mapped) == (1 if kind == "cone" else 3)
            assert agent.nat.predicted_ports == ()
        finally:
            await agent.close()
            for transport in transports:
                transport.close()

    run(main)


def test_gather_without_stun_answer_is_bounded() -> None:
    async def main() -> None:
        with silent_sockets(1) as socks:
            server = ("127.0.0.1", socks[0].getsockname()[1])
            agent = IceAgent(controlling=True, stun_server=server, addresses=LOOPBACK)
            started = time.monotonic()
            lines = await agent.gather(timeout=0.5)
            assert time.monotonic() - started < 0.8
            assert [parse_candidate(line).type for line in lines] == ["host"]
            assert agent.nat is None
            await agent.close()

    run(main)


def test_aioice_internals_we_extend_exist() -> None:
    """traversal/ice.py subclasses aioice 0.13's Connection and StunProtocol and reads a few
    of their private members; an aioice upgrade that moves them must fail here, by name."""
    import aioice
    from aioice.ice import CandidatePair, Connection, StunProtocol

    for name in (
        "_pair_remote_candidate",
        "_find_pair",
        "sort_check_list",
        "check_state",
        "request_received",
        "check_incoming",
    ):
        assert callable(getattr(Connection, name, None)), f"aioice.Connection.{name} is gone ({aioice.__version__})"
    for name in ("request", "send_stun", "datagram_received"):
        assert callable(getattr(StunProtocol, name, None)), f"aioice StunProtocol.{name} is gone"
    connection = Connection(ice_controlling=True)
    for name in (
        "_check_list",
        "_nominated",
        "_protocols",
        "_local_candidates",
        "_local_candidates_start",
        "_remote_candidates",
    ):
        assert hasattr(connection, name), f"aioice.Connection().{name} is gone ({aioice.__version__})"
    assert hasattr(aioice.Candidate("f", 1, "udp", 1, "127.0.0.1", 9, "host"), "_network_host")
    assert {"FROZEN", "WAITING", "IN_PROGRESS", "SUCCEEDED", "FAILED"} <= set(CandidatePair.State.__members__)
