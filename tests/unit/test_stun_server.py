"""Tests for relay_server/stun_server.py: the sans-I/O core, the asyncio driver on loopback
(primary 127.0.0.1, alternate 127.0.0.2: both loopback on Linux), and interop with coturn's
`turnutils_stunclient` and `turnutils_natdiscovery` as real, time-bounded subprocesses.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay_server.ratelimit import RateLimiter
from relay_server.server import RelayConfig, RelayServer
from relay_server.stun_server import (
    SOFTWARE,
    StunCounters,
    StunServer,
    StunServerCore,
    StunServerError,
    metrics_lines,
)
from transport.identity import encode_public, generate_identity, public_bytes
from traversal.cli import main as cli_main
from traversal.stun import (
    BINDING,
    Attr,
    StunClass,
    StunMessage,
    binding_request,
    binding_success,
    parse,
)

pytestmark = pytest.mark.timeout(60)

P = ("127.0.0.1", 3478)
A = ("127.0.0.2", 3479)
CLIENT = ("198.51.100.7", 40000)


def _core(alternate: tuple[str, int] | None = A) -> StunServerCore:
    return StunServerCore(P, alternate)


# --- the core -----------------------------------------------------------------------------------


def test_plain_binding_answer() -> None:
    core = _core(None)
    request = binding_request()
    [out] = core.handle_datagram(request.encode(), CLIENT, P)
    assert (out.source, out.destination) == (P, CLIENT)
    response = parse(out.data)
    assert response.cls == StunClass.SUCCESS and response.transaction_id == request.transaction_id
    assert response.xor_mapped_address == CLIENT == response.mapped_address
    assert response.response_origin == P
    assert response.other_address is None  # no RFC 5780 without an alternate
    assert response.software == SOFTWARE and response.fingerprint
    assert core.counters == StunCounters(requests=1, responses=1)


# received on, CHANGE-REQUEST (ip, port) -> answered from; OTHER-ADDRESS differs in both.
CHANGE_CASES = [
    (P, (False, False), P),
    (P, (True, False), ("127.0.0.2", 3478)),
    (P, (False, True), ("127.0.0.1", 3479)),
    (P, (True, True), A),
    (A, (False, False), A),
    (A, (True, True), P),
    (("127.0.0.2", 3478), (False, True), A),
    (("127.0.0.1", 3479), (True, False), A),
]


@pytest.mark.parametrize(("local", "change", "origin"), CHANGE_CASES)
def test_change_request_answers_from_the_right_socket(
    local: tuple[str, int], change: tuple[bool, bool], origin: tuple[str, int]
) -> None:
    core = _core()
    [out] = core.handle_datagram(binding_request(change_ip=change[0], change_port=change[1]).encode(), CLIENT, local)
    assert out.source == origin and out.destination == CLIENT
    response = parse(out.data)
    assert response.response_origin == origin
    other = response.other_address
    assert other is not None and other[0] != local[0] and other[1] != local[1]
    assert core.counters.change_requests == int(any(change))


def test_local_addresses_are_the_four_combinations() -> None:
    assert _core().local_addresses == [P, ("127.0.0.1", 3479), ("127.0.0.2", 3478), A]
    assert _core(None).local_addresses == [P]


def test_change_request_without_alternate_is_420() -> None:
    core = _core(None)
    [out] = core.handle_datagram(binding_request(change_ip=True).encode(), CLIENT, P)
    response = parse(out.data)
    assert out.source == P and response.cls == StunClass.ERROR
    assert response.error is not None and response.error[0] == 420
    assert response.unknown_attributes == (Attr.CHANGE_REQUEST,)
    # An all-zero CHANGE-REQUEST asks for nothing: answered normally (as coturn does).
    zero = StunMessage(BINDING, StunClass.REQUEST, bytes(12), ((Attr.CHANGE_REQUEST, bytes(4)),))
    [out] = core.handle_datagram(zero.encode(), CLIENT, P)
    assert parse(out.data).cls == StunClass.SUCCESS


def test_response_port_sends_to_the_source_ip() -> None:
    core = _core()
    [out] = core.handle_datagram(binding_request(response_port=50123).encode(), CLIENT, P)
    assert out.destination == (CLIENT[0], 50123) and out.source == P
    assert parse(out.data).xor_mapped_address == CLIENT


@pytest.mark.parametrize(
    ("request_bytes", "code"),
    [
        (StunMessage(BINDING, StunClass.REQUEST, bytes(12), ((0x0031, b"x"),)).encode(), 420),
        (StunMessage(0x003, StunClass.REQUEST, bytes(12)).encode(), 400),  # Allocate: not served here
        (binding_request(response_port=5, padding=8).encode(), 400),
        (StunMessage(BINDING, StunClass.REQUEST, bytes(12), ((Attr.RESPONSE_PORT, bytes(4)),)).encode(), 400),
    ],
    # Fixed ids: the requests carry random transaction ids, and parallel workers must agree on the names.
    ids=["unknown-comprehension-required", "allocate", "response-port-with-padding", "bad-response-port"],
)
def test_error_responses(request_bytes: bytes, code: int) -> None:
    core = _core()
    [out] = core.handle_datagram(request_bytes, CLIENT, P)
    response = parse(out.data)
    assert response.cls == StunClass.ERROR and response.error is not None and response.error[0] == code
    assert out.destination == CLIENT  # errors always go back to the source, never to RESPONSE-PORT
    assert core.counters.error_responses == 1


def test_unknown_optional_attributes_are_ignored() -> None:
    message = StunMessage(BINDING, StunClass.REQUEST, bytes(12), ((0x8031, b"whatever"),))
    [out] = _core().handle_datagram(message.encode(), CLIENT, P)
    assert parse(out.data).cls == StunClass.SUCCESS


def test_padding_is_echoed_never_grown() -> None:
    request = binding_request(padding=400)
    [out] = _core().handle_datagram(request.encode(), CLIENT, P)
    assert parse(out.data).padding_size == 400
    assert len(out.data) < len(request.encode()) + 100


@pytest.mark.parametrize(
    ("data", "counter"),
    [
        (b"", "dropped_non_stun"),
        (b"GET / HTTP/1.1\r\n\r\n", "dropped_non_stun"),
        (b"\x17\xfe\xfd" + bytes(40), "dropped_non_stun"),  # DTLS
        (binding_request().encode()[:19], "dropped_non_stun"),
        (binding_request().encode()[:-4], "dropped_malformed"),  # truncated
        (binding_request().encode() + b"\x00\x00\x00\x00", "dropped_malformed"),
        (binding_request(software="abcd").encode()[:-1] + b"\x00", "dropped_malformed"),  # bad FINGERPRINT
        (binding_success(binding_request(), CLIENT).encode(), "dropped_unexpected"),
        (StunMessage(BINDING, StunClass.INDICATION, bytes(12)).encode(), "dropped_unexpected"),
        (binding_request(padding=1500).encode() + bytes(1000), "dropped_malformed"),
    ],
    ids=[
        "empty",
        "http",
        "dtls",
        "short-header",
        "truncated",
        "trailing-bytes",
        "bad-fingerprint",
        "a-response",
        "an-indication",
        "oversized",
    ],
)
def test_junk_is_dropped_and_counted(data: bytes, counter: str) -> None:
    core = _core()
    assert core.handle_datagram(data, CLIENT, P) == []
    assert getattr(core.counters, counter) == 1
    assert core.counters.requests == core.counters.responses == core.counters.error_responses == 0


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=700), st.sampled_from(_core().local_addresses))
def test_fuzzed_datagrams_never_crash_and_only_requests_are_answered(data: bytes, local: tuple[str, int]) -> None:
    core = _core()
    out = core.handle_datagram(data, CLIENT, local)
    if out:
        request = parse(data)  # only a valid request can be answered ...
        assert request.cls == StunClass.REQUEST
        assert len(out) == 1 and out[0].destination[0] == CLIENT[0]  # ... and only towards its source IP


@pytest.mark.parametrize(
    ("primary", "alternate", "message"),
    [
        (("127.0.0.1", 3478), ("127.0.0.1", 3479), "another IP and another port"),
        (("127.0.0.1", 3478), ("127.0.0.2", 3478), "another IP and another port"),
        (("127.0.0.1", 3478), ("::1", 3479), "same family"),
        (("0.0.0.0", 3478), ("127.0.0.2", 3479), "specific IPs"),
        (("localhost", 3478), None, "must be an IP address"),
        (("127.0.0.1", 70000), None, "1..65535"),
    ],
)
def test_bad_configuration(primary: tuple[str, int], alternate: tuple[str, int] | None, message: str) -> None:
    with pytest.raises(StunServerError, match=message):
        StunServerCore(primary, alternate)


def test_wildcard_primary_omits_response_origin() -> None:
    core = StunServerCore(("0.0.0.0", 3478))
    [out] = core.handle_datagram(binding_request().encode(), CLIENT, ("0.0.0.0", 3478))
    assert parse(out.data).response_origin is None


def test_metrics_lines() -> None:
    counters = StunCounters(requests=5, responses=4, error_responses=1, change_requests=2, dropped_malformed=3)
    lines = metrics_lines(counters, rfc5780=True)
    samples = dict(line.rsplit(" ", 1) for line in lines if not line.startswith("#"))
    assert samples == {
        "traversal_stun_rfc5780": "1",
        "traversal_stun_requests_total": "5",
        "traversal_stun_responses_total": "4",
        "traversal_stun_error_responses_total": "1",
        "traversal_stun_change_requests_total": "2",
        'traversal_stun_dropped_total{reason="malformed"}': "3",
        'traversal_stun_dropped_total{reason="non_stun"}': "0",
        'traversal_stun_dropped_total{reason="unexpected"}': "0",
        'traversal_stun_dropped_total{reason="rate_limited"}': "0",
    }
    for name in {key.split("{")[0] for key in samples}:
        assert f"# TYPE {name} " in "\n".join(lines)


# --- the driver on loopback ------------------------------------------------------------------------


@asynccontextmanager
async def running(alternate: bool = True) -> AsyncIterator[StunServer]:
    server = StunServer(("127.0.0.1", 0), ("127.0.0.2", 0) if alternate else None)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


class _Collector(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait((data, addr[:2]))


async def _client() -> tuple[asyncio.DatagramTransport, _Collector]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(_Collector, local_addr=("127.0.0.1", 0))
    return transport, protocol  # type: ignore[return-value]


def _run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 20))


def test_driver_binds_four_sockets_and_answers_change_requests() -> None:
    async def main() -> None:
        async with running() as server:
            primary, alternate = server.primary, server.alternate
            assert alternate is not None
            assert sorted(server.addresses) == sorted(
                [primary, (primary[0], alternate[1]), (alternate[0], primary[1]), alternate]
            )
            transport, collector = await _client()
            try:
                for change_ip, change_port in ((False, False), (True, False), (False, True), (True, True)):
                    request = binding_request(change_ip=change_ip, change_port=change_port)
                    transport.sendto(request.encode(), primary)
                    data, source = await asyncio.wait_for(collector.queue.get(), 2)
                    expected = (alternate[0] if change_ip else primary[0], alternate[1] if change_port else primary[1])
                    assert source == expected
                    response = parse(data)
                    assert response.transaction_id == request.transaction_id
                    assert response.response_origin == expected
                    assert response.other_address == alternate
                    assert response.xor_mapped_address == transport.get_extra_info("sockname")[:2]
            finally:
                transport.close()
            assert server.counters.change_requests == 3

    _run(main)


def test_driver_never_answers_junk() -> None:
    async def main() -> None:
        async with running() as server:
            junk = [b"", b"\x00" * 20, b"hello", binding_request().encode()[:-2], bytes(range(256)) * 3]
            junk += [bytes([0x00, 0x01, 0x00, 0x04]) + struct.pack("!I", 0x2112A442) + bytes(12) + b"\xff\xff\x00\x08"]
            # A plain socket: asyncio's sendto() silently skips empty datagrams.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
                raw.bind(("127.0.0.1", 0))
                raw.setblocking(False)
                for local in server.addresses:
                    for data in junk:
                        raw.sendto(data, local)
                # The four sockets are read in no particular order: wait (bounded) until every
                # junk datagram was counted; an answer to one would be sent in that same step.
                counters = server.counters
                deadline = asyncio.get_running_loop().time() + 2
                while counters.dropped_non_stun + counters.dropped_malformed < len(junk) * 4:
                    assert asyncio.get_running_loop().time() < deadline, counters
                    await asyncio.sleep(0.01)
                # A valid request from the same socket afterwards: its answer is the only datagram.
                request = binding_request()
                raw.sendto(request.encode(), server.primary)
                data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(raw, 4096), 2)
                assert parse(data).transaction_id == request.transaction_id
                with pytest.raises(BlockingIOError):
                    raw.recv(4096)
            assert counters.requests == counters.responses == 1
            assert counters.dropped_non_stun + counters.dropped_malformed == len(junk) * 4

    _run(main)


def test_driver_response_port() -> None:
    async def main() -> None:
        async with running() as server:
            sender, _ = await _client()
            receiver, collector = await _client()
            try:
                port = receiver.get_extra_info("sockname")[1]
                request = binding_request(response_port=port)
                sender.sendto(request.encode(), server.primary)
                data, source = await asyncio.wait_for(collector.queue.get(), 2)
                assert source == server.primary
                assert parse(data).xor_mapped_address == sender.get_extra_info("sockname")[:2]
            finally:
                sender.close()
                receiver.close()

    _run(main)


def test_driver_reports_a_taken_port() -> None:
    async def main() -> None:
        async with running(alternate=False) as server:
            clash = StunServer(server.primary)
            with pytest.raises(StunServerError, match=r"cannot listen for STUN on 127\.0\.0\.1"):
                await clash.start()

    _run(main)


def test_driver_on_ipv6_loopback() -> None:
    probe = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback (::1) on this host")
    finally:
        probe.close()

    async def main() -> None:
        server = StunServer(("::1", 0))
        await server.start()
        try:
            loop = asyncio.get_running_loop()
            transport, collector = await loop.create_datagram_endpoint(_Collector, local_addr=("::1", 0))
            try:
                request = binding_request()
                transport.sendto(request.encode(), server.primary)
                data, _ = await asyncio.wait_for(collector.queue.get(), 2)
                assert parse(data).xor_mapped_address == transport.get_extra_info("sockname")[:2]
            finally:
                transport.close()
        finally:
            await server.close()

    _run(main)


# --- coturn's clients against our server ----------------------------------------------------------


needs_coturn = pytest.mark.skipif(
    shutil.which("turnutils_natdiscovery") is None or shutil.which("turnutils_stunclient") is None,
    reason="coturn's turnutils are not installed (apt-get install coturn)",
)


async def _tool(*argv: str, timeout: float = 20) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{argv[0]} did not finish in {timeout} s") from None
    return proc.returncode or 0, out.decode(errors="replace")


@needs_coturn
def test_turnutils_stunclient_interop() -> None:
    async def main() -> Any:
        async with running() as server:
            rc, out = await _tool("turnutils_stunclient", "-p", str(server.primary[1]), server.primary[0])
            assert rc == 0, out
            assert f"Response origin: : {server.primary[0]}:{server.primary[1]}" in out
            assert f"Other addr: : 127.0.0.2:{server.alternate[1]}" in out  # type: ignore[index]
            assert "UDP reflexive addr: 127.0.0.1:" in out
            # RFC 5780 responses 2 and 3 came from the changed addresses.
            assert f"Response origin: : 127.0.0.2:{server.alternate[1]}" in out  # type: ignore[index]

    _run(main)


@needs_coturn
def test_turnutils_natdiscovery_without_nat_reports_endpoint_independent() -> None:
    async def main() -> None:
        async with running() as server:
            rc, out = await _tool("turnutils_natdiscovery", "-m", "-f", "-p", str(server.primary[1]), "127.0.0.1")
            assert rc == 0, out
            assert "NAT with Endpoint Independent Mapping!" in out, out
            assert "NAT with Endpoint Independent Filtering!" in out, out
            assert "error" not in out.lower(), out
            # Its -P variant pads requests to 1500 bytes: still answered.
            rc, out = await _tool("turnutils_natdiscovery", "-m", "-P", "-p", str(server.primary[1]), "127.0.0.1")
            assert "NAT with Endpoint Independent Mapping!" in out, out

    _run(main)


# --- `traversal relay --stun` argument errors: one line each -----------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--stun-alt", "127.0.0.2:3479"], "--stun-alt needs --stun"),
        (["--stun", "127.0.0.1:3478", "--stun-alt", "127.0.0.1:3479"], "another IP and another port"),
        (["--stun", "127.0.0.1"], "--stun must be HOST:PORT"),
        (["--stun", "127.0.0.1:0"], "need a port"),
        (["--stun", "stun.example.net:3478"], "must be an IP address"),
    ],
)
def test_relay_stun_flag_errors(tmp_path: Any, args: list[str], message: str) -> None:
    members = tmp_path / "members.txt"
    members.write_text(encode_public(public_bytes(generate_identity())) + "\n")
    result = CliRunner().invoke(
        cli_main, ["relay", "--insecure", "--listen", "127.0.0.1:0", "--members", f"n:{members}", *args]
    )
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("traversal: error:") and message in lines[0], result.output


def test_relay_reports_a_taken_stun_port(tmp_path: Any) -> None:
    members = tmp_path / "members.txt"
    members.write_text(encode_public(public_bytes(generate_identity())) + "\n")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        args = ["relay", "--insecure", "--listen", "127.0.0.1:0", "--members", f"n:{members}"]
        result = CliRunner().invoke(cli_main, [*args, "--stun", f"127.0.0.1:{port}"])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("traversal: error:")]
    assert len(lines) == 1 and f"cannot listen for STUN on 127.0.0.1:{port}" in lines[0], result.output


def test_relay_metrics_carry_the_stun_lines() -> None:
    config = RelayConfig(host="127.0.0.1", port=0, networks={}, ssl=None)
    counters = StunCounters(requests=3)
    text = RelayServer(config, extra_metrics=lambda: metrics_lines(counters, rfc5780=False)).metrics_text()
    assert "traversal_relay_clients_connected 0\n" in text
    assert text.endswith('traversal_stun_dropped_total{reason="rate_limited"} 0\n')
    assert "\ntraversal_stun_requests_total 3\n" in text and "\ntraversal_stun_rfc5780 0\n" in text


# --- per-source rate limit ---------------------------------------------------------------------


def test_rate_limiter_refills_over_time_and_keeps_sources_apart() -> None:
    limiter = RateLimiter(rate=10.0, burst=3)
    assert [limiter.allow("192.0.2.1", 0.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("198.51.100.1", 0.0)  # another source has its own bucket
    assert not limiter.allow("192.0.2.1", 0.05)  # half a token back
    assert limiter.allow("192.0.2.1", 0.11)
    with pytest.raises(ValueError):
        RateLimiter(rate=0)


def test_a_flood_from_one_source_is_dropped_unanswered_and_counted() -> None:
    async def main() -> None:
        server = StunServer(("127.0.0.1", 0), limiter=RateLimiter(rate=1.0, burst=5))
        await server.start()
        flood, flood_got = await _client()
        try:
            for _ in range(20):
                flood.sendto(binding_request().encode(), server.primary)
            answers = 0
            with contextlib.suppress(TimeoutError):
                while True:
                    await asyncio.wait_for(flood_got.queue.get(), 0.5)
                    answers += 1
            assert answers == 5  # the burst, then nothing: no amplification of a flood
            assert server.counters.dropped_rate_limited == 15
            assert 'traversal_stun_dropped_total{reason="rate_limited"} 15' in server.metrics_lines()
        finally:
            flood.close()
            await server.close()

    _run(main)
