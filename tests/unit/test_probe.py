"""Tests for traversal/probe.py and `traversal probe`: the classification as pure functions
(table-driven), and end-to-end probes against our STUN server on loopback (no NAT: open
internet, endpoint-independent mapping and filtering), a server without RFC 5780, a server
that ignores CHANGE-REQUEST, and a closed port.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from click.testing import CliRunner

from relay_server.stun_server import Outgoing, StunServer
from traversal.cli import main as cli_main
from traversal.probe import (
    ADDRESS_AND_PORT_DEPENDENT as APD,
)
from traversal.probe import (
    ADDRESS_DEPENDENT as AD,
)
from traversal.probe import (
    DIRECT,
    PEER_KINDS,
    PREDICTION,
    PROBE_JSON_VERSION,
    RELAY,
    NatBehaviour,
    ProbeOptions,
    ProbeResult,
    classify_allocation,
    classify_filtering,
    classify_mapping,
    direct_reach,
    format_human,
    lifetime_schedule,
    rfc3489_name,
    run_probe,
    verdict,
)
from traversal.probe import (
    ENDPOINT_INDEPENDENT as EI,
)

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")

X = ("203.0.113.11", 40000)
Y = ("203.0.113.11", 40001)
Z = ("203.0.113.11", 40002)


# --- pure classification -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("test1", "test2", "test3", "expected"),
    [
        (X, X, None, EI),
        (X, X, X, EI),
        (X, Y, Y, AD),
        (X, Y, Z, APD),
        (X, None, None, None),
        (X, Y, None, None),
    ],
)
def test_classify_mapping(test1: Any, test2: Any, test3: Any, expected: str | None) -> None:
    assert classify_mapping(test1, test2, test3) == expected


@pytest.mark.parametrize(
    ("both", "port_only", "expected"),
    [
        (True, True, EI),
        (True, False, EI),
        (True, None, EI),
        (False, True, AD),
        (False, False, APD),
        (None, True, None),
        (False, None, None),
    ],
)
def test_classify_filtering(both: bool | None, port_only: bool | None, expected: str | None) -> None:
    assert classify_filtering(both, port_only) == expected


@pytest.mark.parametrize(
    ("samples", "expected"),
    [
        ([(5000, 5000), (5001, 5001), (6000, 6000)], ("preserving", None)),
        ([(5000, 5000)], ("preserving", None)),
        ([(5000, 20000), (5000, 20001), (5000, 20002), (6000, 20003)], ("sequential", 1)),
        ([(5000, 20000), (5000, 20007), (5000, 20014), (6000, 20021), (7000, 20028)], ("sequential", 7)),
        ([(5000, 30000), (5000, 29998), (5000, 29996)], ("sequential", -2)),
        # One larger jump the same way: someone else's flows took ports in between.
        ([(5000, 20000), (5000, 20001), (5000, 20005), (6000, 20006), (7000, 20007)], ("sequential", 1)),
        ([(5000, 20000), (5000, 20001), (5000, 19000), (6000, 19001)], ("random", None)),
        ([(5000, 41234), (5000, 18812), (5000, 60321), (6000, 2345)], ("random", None)),
        ([(5000, 20000), (5000, 21000), (5000, 22000)], ("random", None)),  # too far apart to predict
        ([(5000, 20000), (5000, 20000), (5000, 20000)], ("random", None)),  # delta 0 is not an allocation
        ([(5000, 20000), (5000, 20001)], (None, None)),  # one step shows no pattern
        ([], (None, None)),
    ],
)
def test_classify_allocation(samples: list[tuple[int, int]], expected: tuple[str | None, int | None]) -> None:
    assert classify_allocation(samples) == expected


def test_classify_allocation_wraps_around_the_port_space() -> None:
    assert classify_allocation([(1, 65534), (1, 65535), (1, 0), (1, 1)]) == ("sequential", 1)


@pytest.mark.parametrize(
    ("udp", "nat", "mapping", "filtering", "expected"),
    [
        (False, None, None, None, "udp-blocked"),
        (True, False, EI, EI, "open-internet"),
        (True, False, EI, APD, "symmetric-udp-firewall"),
        (True, True, EI, EI, "full-cone"),
        (True, True, EI, AD, "restricted-cone"),
        (True, True, EI, APD, "port-restricted-cone"),
        (True, True, AD, APD, "symmetric"),
        (True, True, APD, APD, "symmetric"),
        (True, True, APD, None, "symmetric"),
        (True, True, None, None, None),
        (True, True, EI, None, None),
        (True, None, None, None, None),
    ],
)
def test_rfc3489_name(udp: bool, nat: bool | None, mapping: str | None, filtering: str | None, expected: str) -> None:
    assert rfc3489_name(udp, nat, mapping, filtering) == expected


# Who reaches whom, for the lab's peer kinds (rows and columns in PEER_KINDS order:
# public, fullcone, cone, symseq, symrand). D direct, P via port prediction, R relay.
REACH = """
public   D D D D D
fullcone D D D D D
cone     D D D P R
symseq   D D P P R
symrand  D D R R R
"""


def test_direct_reach_matrix() -> None:
    letters = {"D": DIRECT, "P": PREDICTION, "R": RELAY}
    for row in REACH.strip().splitlines():
        name, *cells = row.split()
        for other, cell in zip(PEER_KINDS, cells, strict=True):
            assert direct_reach(PEER_KINDS[name], PEER_KINDS[other]) == letters[cell], (name, other)
            assert direct_reach(PEER_KINDS[other], PEER_KINDS[name]) == letters[cell], "not symmetric"


def test_direct_reach_special_cases() -> None:
    blocked = NatBehaviour(False, None, None, None, None)
    assert direct_reach(blocked, PEER_KINDS["public"]) == RELAY
    # Address-dependent filtering admits a random-port peer once we have sent to its IP.
    ad_filter = NatBehaviour(True, True, EI, AD, "preserving")
    assert direct_reach(ad_filter, PEER_KINDS["symrand"]) == DIRECT
    # A public host behind a port-restricted firewall is as good as a cone NAT.
    firewall = NatBehaviour(True, False, EI, APD, "preserving")
    assert direct_reach(firewall, PEER_KINDS["symrand"]) == RELAY
    assert direct_reach(firewall, PEER_KINDS["cone"]) == DIRECT


VERDICT_CASES = [
    ((True, False, EI, EI, "preserving", None, True), ["No NAT", "with public, fullcone, cone, symseq and symrand"]),
    (
        (True, True, EI, APD, "preserving", None, True),
        ["Endpoint-independent mapping", "port prediction with symseq", "relay only with symrand"],
    ),
    (
        (True, True, APD, APD, "sequential", 3, True),
        ["sequential ports (delta +3)", "port prediction with cone and symseq", "relay only with symrand"],
    ),
    (
        (True, True, APD, APD, "random", None, True),
        ["random ports", "direct with public and fullcone peers", "relay only with cone, symseq and symrand"],
    ),
    ((False, None, None, None, None, None, False), ["UDP gets no answer", "relay"]),
    ((True, True, None, None, "preserving", None, False), ["lacks RFC 5780", "--stun-alt"]),
]


@pytest.mark.parametrize(("args", "phrases"), VERDICT_CASES)
def test_verdict(args: tuple[Any, ...], phrases: list[str]) -> None:
    text, reach = verdict(*args)
    assert "\n" not in text
    for phrase in phrases:
        assert phrase in text, text
    if args[0] and args[2] is not None:
        assert set(reach) == set(PEER_KINDS)


def test_lifetime_schedule() -> None:
    assert lifetime_schedule(8) == [1, 2, 3, 5, 8]
    assert lifetime_schedule(120) == [1, 2, 3, 5, 8, 13, 20, 30, 45, 60, 90, 120]
    assert lifetime_schedule(1) == [1]


def test_json_schema_is_stable() -> None:
    keys = list(ProbeResult(server="192.0.2.1:3478").to_json())
    assert keys == [
        "version", "server", "udp", "rfc5780", "other_address", "server_software", "local_address",
        "mapped_address", "public_ipv4", "public_ipv6", "nat", "mapping", "filtering", "allocation", "delta",
        "hairpinning", "lifetime_s", "lifetime_upper_s", "rfc3489", "verdict", "direct", "notes", "duration_s",
    ]  # fmt: skip
    assert ProbeResult(server="x").to_json()["version"] == PROBE_JSON_VERSION == 1


def test_human_output_is_an_aligned_table() -> None:
    result = ProbeResult(
        server="203.0.113.1:3478", udp=True, rfc5780=True, other_address="203.0.113.2:3479", nat=True,
        mapped_address="203.0.113.11:20000", public_ipv4="203.0.113.11", mapping=APD, filtering=APD,
        allocation="sequential", delta=7, hairpinning=False, rfc3489="symmetric", verdict="V.",
        lifetime_s=30, lifetime_upper_s=45,
    )  # fmt: skip
    text = format_human(result)
    lines = text.splitlines()
    table = lines[: lines.index("")]
    assert len({len(line) - len(line[len(line.split("  ")[0]) :].lstrip()) for line in table}) == 1  # one column
    assert "sequential (delta +7)" in text and "30 s to 45 s" in text and "Verdict: V." in text


# --- end to end on loopback ------------------------------------------------------------------------


def _run(coro: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(coro(), 30))


@asynccontextmanager
async def stun_server(alternate: bool = True) -> AsyncIterator[StunServer]:
    server = StunServer(("127.0.0.1", 0), ("127.0.0.2", 0) if alternate else None)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


def test_probe_without_nat_is_open_internet() -> None:
    async def main() -> ProbeResult:
        async with stun_server() as server:
            return await run_probe(ProbeOptions("127.0.0.1", server.primary[1], timeout=1.0))

    result = _run(main)
    assert result.udp and result.rfc5780 and result.nat is False
    assert (result.mapping, result.filtering) == (EI, EI)
    assert result.allocation == "preserving" and result.delta is None
    assert result.hairpinning is True
    assert result.rfc3489 == "open-internet"
    assert result.public_ipv4 == "127.0.0.1" and result.mapped_address == result.local_address
    assert result.other_address is not None and result.other_address.startswith("127.0.0.2:")
    assert result.server_software == "traversal-stun"
    assert result.direct == dict.fromkeys(PEER_KINDS, DIRECT)
    assert result.notes == []
    assert result.duration_s < 2.0  # nothing waited for an answer that never came


def test_probe_against_a_server_without_rfc5780() -> None:
    async def main() -> ProbeResult:
        async with stun_server(alternate=False) as server:
            return await run_probe(ProbeOptions("127.0.0.1", server.primary[1], timeout=0.5))

    result = _run(main)
    assert result.udp and not result.rfc5780 and result.nat is False
    assert result.mapping is None and result.filtering is None and result.rfc3489 is None
    assert result.public_ipv4 == "127.0.0.1" and result.allocation == "preserving"
    assert any("RFC 5780" in note for note in result.notes)
    assert "lacks RFC 5780" in result.verdict


def test_probe_notices_a_server_that_ignores_change_request() -> None:
    async def main() -> ProbeResult:
        async with stun_server() as server:
            core = server.core
            assert core is not None
            honest = core.handle_datagram

            def lazy(data: bytes, source: tuple[str, int], local: tuple[str, int]) -> list[Outgoing]:
                return [Outgoing(local, out.destination, out.data) for out in honest(data, source, local)]

            core.handle_datagram = lazy  # type: ignore[method-assign]
            return await run_probe(ProbeOptions("127.0.0.1", server.primary[1], timeout=0.5))

    result = _run(main)
    assert result.mapping == EI and result.filtering is None
    assert any("ignores CHANGE-REQUEST" in note for note in result.notes), result.notes


def test_probe_of_a_closed_port_reports_udp_blocked_or_server_down() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once this block ends

    result = _run(lambda: run_probe(ProbeOptions("127.0.0.1", port, timeout=0.3)))
    assert not result.udp and result.rfc3489 == "udp-blocked"
    assert result.hairpinning is None and result.mapping is None
    assert any("port unreachable" in note for note in result.notes), result.notes
    assert result.direct == dict.fromkeys(PEER_KINDS, RELAY)
    assert result.duration_s < 2.0


def test_probe_measures_lifetime_up_to_its_maximum() -> None:
    async def main() -> ProbeResult:
        async with stun_server() as server:
            options = ProbeOptions("127.0.0.1", server.primary[1], timeout=0.5, lifetime=True, lifetime_max=1.5)
            return await run_probe(options)

    result = _run(main)
    # No NAT: the "mapping" never expires; the probe reports the longest idle time it tried.
    assert result.lifetime_s == 1.5 and result.lifetime_upper_s is None
    assert any("still alive" in note for note in result.notes)


# --- the CLI -------------------------------------------------------------------------------------


def _invoke_with_server(args_for_port: Callable[[int], list[str]]) -> Any:
    """Run `traversal probe` (in a worker thread: it runs its own event loop) while our
    STUN server runs on this thread's loop."""

    async def main() -> Any:
        async with stun_server() as server:
            return await asyncio.to_thread(CliRunner().invoke, cli_main, args_for_port(server.primary[1]))

    return _run(main)


def test_cli_probe_json() -> None:
    result = _invoke_with_server(lambda port: ["probe", "--stun", f"127.0.0.1:{port}", "--json", "--timeout", "1"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["version"] == 1 and data["udp"] is True and data["rfc3489"] == "open-internet"
    assert data["mapping"] == data["filtering"] == EI


def test_cli_probe_reads_stun_from_the_connect_table(tmp_path: Path) -> None:
    config = tmp_path / "traversal.toml"

    def args(port: int) -> list[str]:
        # The rest of [connect] belongs to `traversal connect` and is accepted alongside.
        config.write_text(f'[connect]\nstun = "127.0.0.1:{port}"\nnetwork = "chr-001"\n')
        return ["probe", "--config", str(config), "--timeout", "1"]

    result = _invoke_with_server(args)
    assert result.exit_code == 0, result.output
    assert "Mapping           endpoint-independent" in result.output
    assert "RFC 3489 name     open-internet" in result.output
    assert "Verdict: No NAT" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["probe"], "no STUN server: pass --stun HOST:PORT"),
        (["probe", "--stun", "127.0.0.1"], "--stun must be HOST:PORT"),
        (["probe", "--stun", "127.0.0.1:0"], "port other than 0"),
        (["probe", "--stun", "stun.example.invalid:3478"], "cannot resolve STUN server"),
    ],
)
def test_cli_probe_usage_errors_are_one_line(monkeypatch: pytest.MonkeyPatch, args: list[str], message: str) -> None:
    def no_dns(*_args: object, **_kwargs: object) -> None:
        # Tests never send a DNS query: a name lookup fails here as it would for an unknown name.
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    result = CliRunner().invoke(cli_main, args)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("traversal: error:") and message in lines[0], result.output


def test_cli_probe_config_errors(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[connect]\nstun = 3478\n")
    result = CliRunner().invoke(cli_main, ["probe", "--config", str(config)])
    assert result.exit_code == 1 and "stun must be a str" in result.output
    config.write_text('[connect]\nstunn = "x:1"\n')
    result = CliRunner().invoke(cli_main, ["probe", "--config", str(config)])
    assert result.exit_code == 1 and "unknown key 'stunn'" in result.output
