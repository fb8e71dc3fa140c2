"""Time to a direct path per NAT pair, in the netns lab, with the real relay and nodes.

For each pair: one lab and one relay (with its STUN server), then ``--runs`` times a fresh
pair of ``traversal connect`` nodes (only the two nodes restart between runs; they keep
the pair's two identities, so the same side controls the ICE checks in every run). Per run:

* ESTABLISHED -> direct: the nodes' own ``direct.time_to_direct_s`` (each side times
  from the ESTABLISHED it received to its path validated both ways; the later side
  counts, since only then is the pair direct);
* start -> first ping: from starting both nodes to the first echo reply across the
  overlay (echo requests every 10 ms from host-a), whatever the path then (relay or direct);
* relay bytes per set-up: everything the relay carried for the pair from the nodes'
  first packet to the direct switch, counted three ways: the session frames it forwarded
  (its ``/metrics``), the bytes of the two relay connections on the wire (tcpdump on the
  WAN bridge: IP packets to or from the relay's TCP port, so TLS, TCP and IP headers
  included, login and signalling too) and the STUN exchanges with its STUN server.

A pair may be run with the seed's geography (``cone-cone@geo``: about 30 ms direct and
80 ms through the relay, see ``SEED_GEOGRAPHY`` in netns-lab/lab.py).

Node a's TAP gets an ARP retransmit time of 100 ms (the kernel's default is 1 s) before
the pinging starts: the first ARP request leaves before the session exists and is lost,
and the 1 s retry would otherwise round every first-ping figure up to the next second.

Writes ``bench/time_to_direct.md`` (``--out``) and the same figures as JSON (``--json``).
Run as root, from the repository:
``.venv/bin/python bench/time_to_direct.py [--runs 20] [--pairs cone-cone,double-cone,cone-cone@geo]``.
"""

from __future__ import annotations

import argparse
import selectors
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import BENCH, BenchError, Context, load_netns_module, median, p95, write_json

#: (nat a, nat b, with the seed's geography).
PAIRS = [
    ("cone", "cone", False),
    ("cone", "symseq", False),
    ("symseq", "symseq", False),
    ("double", "cone", False),
    ("public", "cone", False),
    ("fullcone", "symrand", False),
    ("dualstack", "dualstack", False),
    ("cone", "cone", True),
    ("symseq", "symseq", True),
]

#: From starting the nodes to a decided path (relay login, handshake, one 5 s attempt), with room.
SETTLE_TIMEOUT_S = 30.0
#: How long the relay may take to notice that the previous run's nodes left.
RELAY_IDLE_TIMEOUT_S = 15.0
FIRST_PING_TIMEOUT_S = 20
ARP_RETRANSMIT_MS = 100
PEER_B_ADDRESS = "10.10.10.4"


lab_module = load_netns_module("lab")
overlay_module = load_netns_module("overlay")


@dataclass
class Run:
    outcome: str  # "direct" or "relay"
    time_to_direct_s: float | None
    first_ping_s: float | None
    nominated: str | None
    error: str | None = None
    forwarded_bytes: float = 0.0  # session frames the relay forwarded (its /metrics)
    relay_wire_bytes: int = 0  # both relay connections on the wire (IP packets, TLS included)
    stun_bytes: int = 0  # STUN requests and responses with the relay's STUN server
    quiet: bool = False  # no pinger: the byte counts are the set-up's alone


@dataclass
class PairResult:
    nat_a: str
    nat_b: str
    geography: bool = False
    runs: list[Run] = field(default_factory=list)
    quiet: list[Run] = field(default_factory=list)  # runs without the pinger, for the relay bytes
    seconds: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.nat_a} x {self.nat_b}" + (" (seed geography)" if self.geography else "")


def _peer(status: dict[str, Any] | None) -> dict[str, Any] | None:
    peers = (status or {}).get("peers") or []
    return peers[0] if peers else None


def _decided(status: dict[str, Any]) -> dict[str, Any] | None:
    """The peer entry once its path is settled: direct both ways, or back on the relay after an attempt."""
    peer = _peer(status)
    if peer is None or peer.get("direct") is None:
        return None
    if (peer["path"], peer["peer_path"]) == ("direct", "direct"):
        return peer
    return peer if peer["direct"]["state"] == "relay" and peer["direct"]["last_error"] else None


#: Runs in host-a: ICMP echo requests every 10 ms to argv[1] until the first reply (or argv[2]
#: seconds), then prints that reply's wall-clock time. Sends fail until the node's TAP and
#: its route exist; the moment the TAP appears, before anything is sent through it, its ARP
#: retransmit time is lowered (see the module docstring).
PINGER = r"""
import os, select, socket, struct, sys, time
dst, deadline = sys.argv[1], time.time() + float(sys.argv[2])
arp = "/proc/sys/net/ipv4/neigh/%s/retrans_time_ms" % sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
ident, seq, tuned = os.getpid() & 0xFFFF, 0, False
print("ready", flush=True)
def echo(seq):
    body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"traversal bench!"  # an even length
    total = sum(struct.unpack("!%dH" % (len(body) // 2), body))
    total = (total >> 16) + (total & 0xFFFF)
    csum = ~(total + (total >> 16)) & 0xFFFF
    return body[:2] + struct.pack("!H", csum) + body[4:]
while time.time() < deadline:
    if not tuned:
        if not os.path.exists(arp):
            time.sleep(0.002)
            continue
        with open(arp, "w") as f:
            f.write(sys.argv[4])
        tuned = True
    seq = (seq + 1) & 0xFFFF
    try:
        s.sendto(echo(seq), (dst, 0))
    except OSError:
        pass  # no route yet
    end = time.time() + 0.01
    while (left := end - time.time()) > 0 and select.select([s], [], [], left)[0]:
        data, src = s.recvfrom(2048)
        head = (data[0] & 0x0F) * 4
        if src[0] == dst and data[head] == 0 and struct.unpack("!H", data[head + 4 : head + 6])[0] == ident:
            print(repr(time.time()), flush=True)
            sys.exit(0)
print("none", flush=True)
"""


def _start_pinger(run: Any) -> subprocess.Popen[str]:
    """Start PINGER in host-a and wait (bounded) until it is ready to send."""
    argv = [sys.executable, "-c", PINGER, PEER_B_ADDRESS, str(FIRST_PING_TIMEOUT_S), "tap0", str(ARP_RETRANSMIT_MS)]
    proc = run.lab.popen("host-a", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if _read_line(proc, 10) != "ready":
        proc.kill()
        raise BenchError(f"the pinger did not start: {proc.communicate()[1].strip()}")
    return proc


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str | None:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        return proc.stdout.readline().strip() if sel.select(timeout) else None


def _relay_bytes(packets: list[Any]) -> tuple[int, int]:
    """(bytes of the relay's TCP connections, bytes of STUN with the relay) among captured packets."""
    relay = overlay_module.RELAY_IP
    stun_ports = {overlay_module.STUN_PORT, overlay_module.STUN_ALT_PORT}
    wire = stun = 0
    for p in packets:
        if p.proto == 6 and p.touches([relay]) and overlay_module.RELAY_PORT in (p.sport, p.dport):
            wire += p.length
        elif p.proto == 17 and p.touches(lab_module.RELAY_ADDRESSES) and stun_ports & {p.sport, p.dport}:
            stun += p.length
    return wire, stun


def _one_run(run: Any, index: int, *, ping: bool) -> Run:
    """One fresh pair of nodes. With ``ping``, time the first overlay ping; without, nothing but
    the nodes' own traffic crosses the relay, so its byte counts are the set-up's alone."""
    pinger = _start_pinger(run) if ping else None
    reply = None
    forwarded_before = run.metrics()["traversal_relay_forwarded_bytes_total"]
    capture = run.capture()
    started_wall = time.time()
    run.start_peers()
    try:
        if pinger is not None:
            try:
                reply = _read_line(pinger, FIRST_PING_TIMEOUT_S + 5)
            finally:
                pinger.kill()
                pinger.wait(5)
        peers = {name: run.wait_status(name, name, _decided, SETTLE_TIMEOUT_S, "a decided path") for name in ("a", "b")}
    finally:
        packets = capture.stop()
    first_ping = float(reply) - started_wall if reply and reply != "none" else None
    forwarded = run.metrics()["traversal_relay_forwarded_bytes_total"] - forwarded_before
    relay_wire, stun = _relay_bytes(packets)
    direct = all(p["path"] == "direct" for p in peers.values())
    times = [p["direct"]["time_to_direct_s"] for p in peers.values()]
    for name in ("a", "b"):
        run.stop(name)
    # Keep each run's logs; the next run starts fresh ones under the same names.
    for name in ("a", "b"):
        log = run.log_path(name)
        if log.exists():
            log.rename(log.with_name(f"{name}-{'run' if ping else 'quiet'}{index:02d}.log"))
    overlay_module.wait_until(
        lambda: run.metrics()["traversal_relay_clients_connected"] == 0, RELAY_IDLE_TIMEOUT_S, "the relay to be idle"
    )
    return Run(
        outcome="direct" if direct else "relay",
        time_to_direct_s=max(times) if direct else None,
        first_ping_s=first_ping,
        nominated=peers["a"]["direct"]["nominated"],
        error=None if direct else peers["a"]["direct"]["last_error"],
        forwarded_bytes=forwarded,
        relay_wire_bytes=relay_wire,
        stun_bytes=stun,
        quiet=not ping,
    )


def bench_pair(nat_a: str, nat_b: str, geography: bool, runs: int, quiet_runs: int, workdir: Path) -> PairResult:
    result = PairResult(nat_a, nat_b, geography)
    started = time.monotonic()
    lab = lab_module.Lab(nat_a=nat_a, nat_b=nat_b, **(lab_module.SEED_GEOGRAPHY if geography else {}))
    try:
        lab.up()
        run = overlay_module.Overlay(lab, workdir / f"{nat_a}-{nat_b}{'-geo' if geography else ''}")
        for name in ("a", "b"):
            run.keygen(name)
        run.start_relay(run.write_members(["a", "b"]))
        for index in range(1, runs + quiet_runs + 1):
            ping = index <= runs
            try:
                outcome = _one_run(run, index, ping=ping)
            except overlay_module.OverlayError as exc:
                raise BenchError(f"{result.label} run {index}: {exc} (logs in {run.workdir})") from None
            (result.runs if ping else result.quiet).append(outcome)
            ttd = f"{outcome.time_to_direct_s:.3f} s" if outcome.time_to_direct_s is not None else "-"
            first = f"{outcome.first_ping_s:.3f} s" if outcome.first_ping_s is not None else "none"
            detail = f"first ping {first}" if ping else f"quiet: relay {outcome.relay_wire_bytes} B on the wire"
            print(f"  {result.label} run {index}: {outcome.outcome}, to direct {ttd}, {detail}", flush=True)
    finally:
        lab.down()
    result.seconds = time.monotonic() - started
    return result


# --- report -----------------------------------------------------------------------------


def _stats(values: list[float]) -> str:
    if not values:
        return "- | - | - | -"
    return " | ".join(f"{v:.3f}" for v in (statistics.median(values), p95(values), min(values), max(values)))


def _outcome(result: PairResult) -> str:
    direct = sum(r.outcome == "direct" for r in result.runs)
    if direct == len(result.runs):
        return f"direct ({direct}/{len(result.runs)})"
    if direct == 0:
        return f"relay ({len(result.runs)}/{len(result.runs)})"
    return f"mixed: direct {direct}/{len(result.runs)}"


def summary(result: PairResult) -> dict[str, Any]:
    """One pair's figures, as written to the JSON file (times in seconds, bytes per set-up)."""
    ttd = [x.time_to_direct_s for x in result.runs if x.time_to_direct_s is not None]
    ping = [x.first_ping_s for x in result.runs if x.first_ping_s is not None]
    direct_runs = [x for x in result.quiet if x.outcome == "direct"]
    return {
        "pair": f"{result.nat_a}-{result.nat_b}" + ("@geo" if result.geography else ""),
        "label": result.label,
        "runs": len(result.runs),
        "direct_runs": sum(x.outcome == "direct" for x in result.runs),
        "quiet_runs": len(result.quiet),
        "to_direct_median_s": median(ttd),
        "to_direct_p95_s": p95(ttd) if ttd else None,
        "first_ping_median_s": median(ping),
        "first_ping_p95_s": p95(ping) if ping else None,
        "relay_wire_bytes_median": median([x.relay_wire_bytes for x in direct_runs]),
        "relay_forwarded_bytes_median": median([x.forwarded_bytes for x in direct_runs]),
        "stun_bytes_median": median([x.stun_bytes for x in direct_runs]),
    }


def _kb(value: float | None) -> str:
    return f"{value / 1000:.1f}" if value is not None else "-"


def render(results: list[PairResult], context: Context) -> str:
    lines = [
        "# Time to direct, per NAT pair",
        "",
        "Generated by `bench/time_to_direct.py` (its docstring says what is measured). Times in seconds;",
        "p95 is nearest-rank (with 20 runs, the 19th value). Relay bytes are per set-up (one pair, from the",
        "nodes' first packet to the direct switch), medians in kB (1000 B) over extra 'quiet' runs that went",
        "direct, in which nothing but the nodes' own traffic crossed the relay (no pinger).",
        "",
        *context.markdown(),
        "",
        "| pair (a x b) | outcome | ESTABLISHED -> direct: median | p95 | min | max "
        "| start -> first ping: median | p95 | min | max "
        "| relay kB: on the wire | forwarded frames | STUN |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ttd = [x.time_to_direct_s for x in r.runs if x.time_to_direct_s is not None]
        ping = [x.first_ping_s for x in r.runs if x.first_ping_s is not None]
        figures = summary(r)
        relay = " | ".join(
            _kb(figures[key])
            for key in ("relay_wire_bytes_median", "relay_forwarded_bytes_median", "stun_bytes_median")
        )
        lines.append(f"| {r.label} | {_outcome(r)} | {_stats(ttd)} | {_stats(ping)} | {relay} |")
    lines += ["", "Per pair and run: the nominated pair (a's view), or why it stayed on the relay.", ""]
    for r in results:
        lines.append(f"## {r.label}")
        lines.append("")
        lines.append(f"{_outcome(r)}; {len(r.runs)} runs in {r.seconds:.1f} s (lab, relay and all runs).")
        lines.append("")
        lines.append(
            "| run | outcome | ESTABLISHED -> direct | start -> first ping | relay B: on the wire | forwarded "
            "| nominated pair / reason |"
        )
        lines.append("|---|---|---|---|---|---|---|")
        for i, x in enumerate([*r.runs, *r.quiet], start=1):
            ttd = f"{x.time_to_direct_s:.3f}" if x.time_to_direct_s is not None else "-"
            ping = "(quiet)" if x.quiet else f"{x.first_ping_s:.3f}" if x.first_ping_s is not None else "no reply"
            wire, forwarded = (f"{x.relay_wire_bytes}", f"{x.forwarded_bytes:.0f}") if x.quiet else ("-", "-")
            lines.append(f"| {i} | {x.outcome} | {ttd} | {ping} | {wire} | {forwarded} | {x.nominated or x.error} |")
        lines.append("")
    return "\n".join(lines)


def _parse_pairs(text: str) -> list[tuple[str, str, bool]]:
    pairs = []
    for item in text.split(","):
        spec, _, option = item.strip().partition("@")
        a, _, b = spec.partition("-")
        if a not in lab_module.PROFILES or b not in lab_module.PROFILES or option not in ("", "geo"):
            profiles = ", ".join(lab_module.PROFILES)
            raise ValueError(f"bad pair {item!r}: use A-B or A-B@geo with profiles from {profiles}")
        pairs.append((a, b, option == "geo"))
    return pairs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="fresh node pairs per NAT pair (default 20)")
    parser.add_argument(
        "--quiet-runs", type=int, default=5, help="extra runs without the pinger, for relay bytes (default 5)"
    )
    names = ",".join(f"{a}-{b}" + ("@geo" if geo else "") for a, b, geo in PAIRS)
    parser.add_argument("--pairs", default=names, help=f"comma-separated A-B[@geo] profile pairs (default {names})")
    parser.add_argument("--out", type=Path, default=BENCH / "time_to_direct.md", help="Markdown report")
    parser.add_argument("--json", type=Path, default=BENCH / "time_to_direct.json", help="JSON figures")
    args = parser.parse_args()
    if args.runs < 1 or args.quiet_runs < 0:
        parser.error("--runs must be at least 1 and --quiet-runs at least 0")
    try:
        pairs = _parse_pairs(args.pairs)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        lab_module.check_prerequisites()
    except lab_module.LabError as exc:
        print(f"time_to_direct: {exc}", file=sys.stderr)
        return 1
    context = Context()
    workdir = Path(tempfile.mkdtemp(prefix="time-to-direct-"))
    results = []
    try:
        for a, b, geography in pairs:
            print(f"{a} x {b}{' (seed geography)' if geography else ''}: {args.runs} runs", flush=True)
            results.append(bench_pair(a, b, geography, args.runs, args.quiet_runs, workdir))
    except (BenchError, lab_module.LabError, overlay_module.OverlayError) as exc:
        print(f"time_to_direct: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    context.finish()
    report = render(results, context)
    args.out.write_text(report + "\n")
    write_json(args.json, {**context.as_dict(), "pairs": [summary(r) for r in results]})
    print(f"\nwrote {args.out} and {args.json}\n")
    print("\n".join(report.splitlines()[: 15 + len(results)]))
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
