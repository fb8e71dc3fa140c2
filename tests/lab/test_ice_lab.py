"""ICE connectivity checks (traversal/ice.py) between two NATed hosts of the lab.

Per profile pair, one lab: the relay's STUN server (RFC 5780, two addresses) in the WAN
namespace, and in host-a and host-b one ``tests/lab/ice_peer.py`` each. This test plays
the relay: it hands each peer the other's offer and the public address the relay
would have observed for it (ESTABLISHED), then reads both outcomes. A direct outcome
means a nominated pair within the 5 s deadline and datagrams through it both ways; a
relay outcome means IceFailed within the deadline (plus a small margin).

The lab has one host per NAT, so "both peers behind the same NAT" runs both peers in
host-a: they meet over their host candidates (the NAT does not hairpin).
"""

from __future__ import annotations

import base64
import contextlib
import json
import selectors
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from traversal.candidates import decode_offer, parse_candidate, predicted_index

pytestmark = [pytest.mark.lab, pytest.mark.timeout(60)]

PEER_SCRIPT = Path(__file__).resolve().with_name("ice_peer.py")
STUN = ("203.0.113.1", 3478)
STUN_ALT = ("203.0.113.2", 3479)
DEADLINE = 5.0
#: Scheduling slack over the deadline for a failure to be reported.
MARGIN = 0.5
SYMSEQ_DELTA = 7

DIRECT = "direct"
RELAY = "relay"

#: (profile of a, profile of b, expected outcome). Peer a is the controlling side.
CASES = [
    ("cone", "cone", DIRECT),
    ("fullcone", "symrand", DIRECT),
    ("cone", "symseq", DIRECT),
    ("symseq", "cone", DIRECT),
    ("symseq", "symseq", DIRECT),
    ("double", "cone", DIRECT),
    ("public", "cone", DIRECT),
    ("public", "symrand", DIRECT),
    ("cone", "symrand", RELAY),
    ("symrand", "symrand", RELAY),
    ("udpblock", "cone", RELAY),
]


def _wait_udp_listening(lab: Any, addresses: list[tuple[str, int]], proc: Any, log: Path, timeout: float) -> None:
    wanted = {f"{ip}:{port}" for ip, port in addresses}
    deadline = time.monotonic() + timeout
    while True:
        listening = {line.split()[3] for line in lab.run("wan", "ss", "-Hlun").stdout.splitlines() if line.strip()}
        if wanted <= listening:
            return
        if proc.poll() is not None:
            raise AssertionError(f"STUN server exited with {proc.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"not listening on {sorted(wanted - listening)} after {timeout} s:\n{log.read_text()}")
        time.sleep(0.05)


def _start_stun(lab: Any, workdir: Path) -> None:
    """The relay's STUN server with RFC 5780 (both WAN addresses, two ports)."""
    log = workdir / "stun.log"
    argv = [
        sys.executable, "-m", "relay_server.stun_server",
        "--stun", f"{STUN[0]}:{STUN[1]}", "--stun-alt", f"{STUN_ALT[0]}:{STUN_ALT[1]}",
    ]  # fmt: skip
    with open(log, "w") as out:
        proc = lab.popen("wan", argv, stdout=out, stderr=out)
    combos = [(ip, port) for ip in (STUN[0], STUN_ALT[0]) for port in (STUN[1], STUN_ALT[1])]
    _wait_udp_listening(lab, combos, proc, log, timeout=15)


class Peer:
    """One ice_peer.py process and its line-by-line JSON output, read with deadlines."""

    def __init__(self, lab: Any, role: str, name: str, controlling: bool, workdir: Path) -> None:
        self.name = name
        self.stderr_path = workdir / f"peer-{name}.err"
        argv = [sys.executable, str(PEER_SCRIPT), "--name", name, "--stun", f"{STUN[0]}:{STUN[1]}"]
        argv += ["--timeout", str(DEADLINE)]
        if controlling:
            argv.append("--controlling")
        with open(self.stderr_path, "w") as err:
            self.proc: subprocess.Popen[str] = lab.popen(
                role, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True
            )

    def read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise AssertionError(f"peer {self.name}: no output in {timeout} s\n{self.stderr_path.read_text()}")
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=5)
            raise AssertionError(f"peer {self.name} exited {self.proc.returncode}:\n{self.stderr_path.read_text()}")
        return json.loads(line)

    def write(self, record: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(record) + "\n")
        self.proc.stdin.flush()


def _run(lab: Any, tmp_path: Path, roles: tuple[str, str], observed: tuple[str, str]) -> tuple[dict, dict, dict, dict]:
    """Offers exchanged through the test; returns (offer a, offer b, result a, result b)."""
    _start_stun(lab, tmp_path)
    a = Peer(lab, roles[0], "a", True, tmp_path)
    b = Peer(lab, roles[1], "b", False, tmp_path)
    offer_a, offer_b = a.read(15), b.read(15)
    a.write({"offer": offer_b["offer"], "observed_ip": observed[1]})
    b.write({"offer": offer_a["offer"], "observed_ip": observed[0]})
    wait = DEADLINE + 10
    result_a, result_b = a.read(wait), b.read(wait)
    for peer in (a, b):
        if peer.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError):  # a failed peer exits without waiting
                peer.write({"close": True})
        peer.proc.wait(timeout=10)
    return offer_a, offer_b, result_a, result_b


def _check(offers: tuple[dict, dict], results: tuple[dict, dict], expected: str) -> None:
    for offer in offers:
        decode_offer(base64.b64decode(offer["offer"]))  # what travelled is a valid offer
    context = json.dumps({"offers": offers, "results": results}, indent=1)
    for name, result in zip("ab", results, strict=True):  # shown with pytest -rP
        detail = (
            f"{result['pair']} in {result['nominate_s']:.3f} s" if result["outcome"] == DIRECT else result["reason"]
        )
        print(f"peer {name}: {result['outcome']}: {detail}; {result['checks_sent']} checks sent")
    for name, result, other in (("a", results[0], "b"), ("b", results[1], "a")):
        assert result["outcome"] == expected, f"peer {name}: {context}"
        if expected == DIRECT:
            assert result["nominate_s"] < DEADLINE, context
            assert result["received"] == [f"D{other}{i}" for i in range(5)], context
        else:
            assert result["elapsed_s"] <= DEADLINE + MARGIN, context
            assert "within 5.0 s" in result["reason"] or "failed" in result["reason"], context


@pytest.mark.parametrize(("nat_a", "nat_b", "expected"), CASES, ids=[f"{a}-{b}" for a, b, _ in CASES])
def test_ice_outcome(lab_factory: Any, tmp_path: Path, nat_a: str, nat_b: str, expected: str) -> None:
    lab = lab_factory(nat_a=nat_a, nat_b=nat_b, symseq_delta=SYMSEQ_DELTA)
    observed = (lab.public_address("a"), lab.public_address("b"))
    offer_a, offer_b, result_a, result_b = _run(lab, tmp_path, ("host-a", "host-b"), observed)
    _check((offer_a, offer_b), (result_a, result_b), expected)
    for offer, profile in ((offer_a, nat_a), (offer_b, nat_b)):
        # Only a sequential NAT makes gathering advertise predicted ports, and then with the lab's delta.
        predicted = [c for c in offer["candidates"] if predicted_index(parse_candidate(c)) is not None]
        if profile == "symseq":
            assert offer["allocation"] == "sequential" and offer["delta"] == SYMSEQ_DELTA, offer
            assert len(predicted) == 4, offer
        else:
            assert predicted == [], offer
    if (nat_a, nat_b) == ("symseq", "symseq"):
        # The pair found is one predicted port on each side: A's k-th check met B's k-th.
        assert result_a["remote_predicted"] is not None and result_b["remote_predicted"] is not None
        assert result_a["remote_predicted"] == result_b["remote_predicted"], (result_a, result_b)


def test_ice_same_nat(lab_factory: Any, tmp_path: Path) -> None:
    """Both peers behind the same (non-hairpinning) NAT: host candidates meet directly."""
    lab = lab_factory(nat_a="cone", nat_b="cone")
    public = lab.public_address("a")
    offer_a, offer_b, result_a, result_b = _run(lab, tmp_path, ("host-a", "host-a"), (public, public))
    _check((offer_a, offer_b), (result_a, result_b), DIRECT)
    assert result_a["local_type"] == "host" and result_a["remote_type"] in ("host", "prflx"), result_a


@pytest.mark.parametrize("delta", [1, 178])
def test_ice_symseq_deltas(lab_factory: Any, tmp_path: Path, delta: int) -> None:
    """Prediction follows the measured delta, the smallest and the largest the lab allows."""
    lab = lab_factory(nat_a="symseq", nat_b="symseq", symseq_delta=delta)
    observed = (lab.public_address("a"), lab.public_address("b"))
    offer_a, offer_b, result_a, result_b = _run(lab, tmp_path, ("host-a", "host-b"), observed)
    assert offer_a["delta"] == offer_b["delta"] == delta, (offer_a, offer_b)
    _check((offer_a, offer_b), (result_a, result_b), DIRECT)


def test_ice_dualstack(lab_factory: Any, lab_module: Any, tmp_path: Path) -> None:
    """IPv4 behind symmetric NATs with random ports, IPv6 routed: the IPv6 host candidates meet."""
    if "dualstack" not in lab_module.PROFILES:
        pytest.skip("this lab has no dualstack profile")
    lab = lab_factory(nat_a="dualstack", nat_b="dualstack")
    observed = (lab.public_address("a"), lab.public_address("b"))
    offer_a, offer_b, result_a, result_b = _run(lab, tmp_path, ("host-a", "host-b"), observed)
    _check((offer_a, offer_b), (result_a, result_b), DIRECT)
    for result in (result_a, result_b):
        assert result["pair"].startswith("[2001:db8:"), result
