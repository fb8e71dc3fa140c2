"""Sixteen peers on one network in the netns lab (issue 8): how long until the full mesh settles,
what it costs the relay, how much memory it takes, and which path each pair ends on.

One multi-site lab (netns-lab/mesh.py: twelve NATs of every IPv4 profile, some with several hosts
behind them), the real relay with its STUN server, a ``traversal connect`` node per host, default
settings (5 s direct deadline, 60 s retry). Two phases:

* all at once: the sixteen nodes are started together; join-to-full-mesh is the time from the
  first start until every pair has its final path (both ends direct both ways, or both on the
  relay after a failed attempt), as the nodes' ``traversal status --json`` says, polled every
  half second through their control sockets. A pair that lands off the path the direct-path
  matrix predicts (tests/lab/test_direct_matrix.py) is watched for one retry interval more;
* one more join: the last node leaves (SIGINT, so it says BYE) and starts again into the
  settled mesh; join time as above, for its fifteen pairs.

Per phase, the relay's cost: the session frames it forwarded (its ``/metrics``), the bytes of
its TCP connections on the wire (tcpdump on the WAN bridge: login, TLS, TCP/IP headers
included) and the STUN exchanges; for the single join, less what the settled mesh costs the
relay in the same time without a join (heartbeats of the relayed pairs), measured just before.
Once settled: the relay connections held (``traversal_relay_clients_connected`` and each node's
``relay.state``), the RSS of every node and of the relay, a ping between every pair, and each
pair's path.

Writes bench/mesh.md, bench/mesh.json (with every node's final status) and bench/mesh.png
(drawn by bench/mesh_graph.py, which redraws it from the JSON). Bounded throughout: every wait
has a deadline, so the run stops by itself, in about three minutes when the mesh settles and
within about twelve when nothing does. Run as root from the repository:
``.venv/bin/python bench/mesh.py``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import BENCH, REPO, BenchError, Context, load_netns_module, median, missing_prerequisites, write_json
from mesh_graph import draw, entry_for, from_bench, pair_decided, pair_path

sys.path.insert(0, str(REPO))
from tests.lab.test_direct_matrix import DIRECT_PAIRS, RELAY_PAIRS
from transport.constants import DIRECT_RETRY_INTERVAL

lab_module = load_netns_module("lab")
mesh_module = load_netns_module("mesh")
overlay_module = load_netns_module("overlay")

#: Twelve sites, sixteen peers (p1..p16 in this order): every IPv4 profile, hosts sharing a
#: cone NAT (p3-p5, p14-p15) and a symrand NAT (p10-p11). p16, the peer that joins last, is
#: behind a full-cone NAT (direct with everything but the UDP-blocked peer).
SITES = (
    "public",
    "fullcone",
    "cone:3",
    "cone",
    "symseq",
    "symseq",
    "symrand",
    "symrand:2",
    "udpblock",
    "double",
    "cone:2",
    "fullcone",
)
POLL_INTERVAL_S = 0.5
#: From starting the nodes to every pair decided: logins, handshakes, one 5 s attempt per pair,
#: an udpblock peer's 3 s STUN wait first, all on two shared cores.
DECIDE_LIMIT_S = 90.0
#: How long pairs off their predicted path are watched for a retry (one retry interval, plus the
#: attempt itself and room).
RETRY_WATCH_S = DIRECT_RETRY_INTERVAL + 20.0
#: The departing node's peers forget it (it says BYE) within this.
LEAVE_LIMIT_S = 30.0
#: Idle window that measures what the settled mesh costs the relay without a join.
BASELINE_S = 5.0
#: After settling, before reading connections and memory (relay connections close, if they do).
SETTLE_GRACE_S = 3.0
PING_COUNT = 3
PING_TIMEOUT_S = 120.0


@dataclass
class Phase:
    """One measured phase: when each pair was first decided, its last decided path (a retry that is
    running leaves it), and when it took that path."""

    started: float
    pairs: list[tuple[str, str]]
    first_decided: dict[tuple[str, str], float] = field(default_factory=dict)
    final_at: dict[tuple[str, str], float] = field(default_factory=dict)
    outcome: dict[tuple[str, str], str | None] = field(default_factory=dict)
    ended: float = 0.0

    def all_decided_s(self) -> float | None:
        if len(self.first_decided) < len(self.pairs):
            return None
        return max(self.first_decided.values()) - self.started

    def final_s(self) -> float | None:
        if any(self.outcome.get(p) is None for p in self.pairs):
            return None
        return max(self.final_at.values()) - self.started


def _predicted(lab: Any, a: str, b: str) -> str | None:
    path = mesh_module.predicted_path(
        lab.profile(a), lab.profile(b), same_lan=lab.same_lan(a, b), direct_pairs=DIRECT_PAIRS, relay_pairs=RELAY_PAIRS
    )
    return None if path is None else str(path)


def _statuses(run: Any, names: list[str]) -> dict[str, dict[str, Any] | None]:
    return {name: run.control_status(name) for name in names}


def _observe(run: Any, phase: Phase, names: list[str]) -> None:
    now = time.monotonic()
    statuses = _statuses(run, names)
    for a, b in phase.pairs:
        decided = pair_decided(_established(statuses[a], run.pubkeys[b]), _established(statuses[b], run.pubkeys[a]))
        if decided is None:
            continue  # undecided again (a retry running): the pair keeps its last decided path
        phase.first_decided.setdefault((a, b), now)
        if decided != phase.outcome.get((a, b)):
            phase.outcome[(a, b)] = decided
            phase.final_at[(a, b)] = now


def _established(status: Mapping[str, Any] | None, identity: str) -> dict[str, Any] | None:
    """``status``'s entry for ``identity`` once established (a half-made link decides nothing)."""
    entry = entry_for(status, identity)
    return entry if entry is not None and entry.get("state") == "established" else None


def watch(run: Any, phase: Phase, names: list[str]) -> None:
    """Poll until every pair is decided and on its predicted path (pairs the matrix says nothing
    about count once decided), bounded by DECIDE_LIMIT_S, then RETRY_WATCH_S for the off ones."""
    lab = run.lab
    while True:
        for name in names:
            run._check_alive(name)
        _observe(run, phase, names)
        now = time.monotonic()
        decided = phase.all_decided_s() is not None
        off = [p for p in phase.pairs if (want := _predicted(lab, *p)) is not None and phase.outcome.get(p) != want]
        if decided and not off:
            break
        if not decided and now - phase.started > DECIDE_LIMIT_S:
            break
        if decided and now - max(phase.first_decided.values()) > RETRY_WATCH_S:
            break
        time.sleep(POLL_INTERVAL_S)
    phase.ended = time.monotonic()


def _relay_bytes(packets: list[Any], only: str | None = None) -> tuple[int, int]:
    """(bytes of the relay's TCP connections, bytes of STUN with the relay) among captured
    packets; ``only``: just those to or from that address (one node's public address)."""
    relay = overlay_module.RELAY_IP
    stun_ports = {overlay_module.STUN_PORT, overlay_module.STUN_ALT_PORT}
    wire = stun = 0
    for p in packets:
        if only is not None and not p.touches([only]):
            continue
        if p.proto == 6 and p.touches([relay]) and overlay_module.RELAY_PORT in (p.sport, p.dport):
            wire += p.length
        elif p.proto == 17 and p.touches(lab_module.RELAY_ADDRESSES) and stun_ports & {p.sport, p.dport}:
            stun += p.length
    return wire, stun


def _forwarded(metrics: Mapping[str, float]) -> float:
    return metrics["traversal_relay_forwarded_bytes_total"]


def rss_kib(pid: int) -> int | None:
    """Resident set size of a process, KiB (None once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


#: Run in each host: ping every other overlay address PING_COUNT times, one line per target.
PING_SWEEP = (
    'for ip in "$@"; do n=$(ping -n -q -c {count} -i 0.2 -W 2 "$ip" | sed -n "s/.* \\([0-9]*\\) received.*/\\1/p"); '
    'echo "$ip ${{n:-0}}"; done'
)


def ping_sweep(run: Any, names: list[str]) -> dict[tuple[str, str], int]:
    """Replies out of PING_COUNT for every ordered pair, all sources at once."""
    lab = run.lab
    address = {name: lab.overlay_address(name).split("/")[0] for name in names}
    procs = {}
    for name in names:
        targets = [address[o] for o in names if o != name]
        script = PING_SWEEP.format(count=PING_COUNT)
        procs[name] = lab.popen(
            f"host-{name}", ["sh", "-c", script, "sweep", *targets], stdout=subprocess.PIPE, text=True
        )
    by_address = {a: n for n, a in address.items()}
    replies: dict[tuple[str, str], int] = {}
    deadline = time.monotonic() + PING_TIMEOUT_S
    for name, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        for line in out.splitlines():
            ip, _, n = line.partition(" ")
            if ip in by_address:
                replies[(name, by_address[ip])] = int(n or 0)
    return replies


def _trim(status: Mapping[str, Any]) -> dict[str, Any]:
    """What the report keeps of a status: enough to redraw the picture and read each pair's path."""
    keep = ("identity", "name", "state", "path", "peer_path", "session_id", "relay_released", "rtt_ms")
    peers = []
    for peer in status.get("peers", []):
        direct = peer.get("direct") or None
        peers.append(
            {k: peer.get(k) for k in keep}
            | {
                "direct": None
                if direct is None
                else {k: direct.get(k) for k in ("state", "attempts", "last_error", "nominated", "time_to_direct_s")}
            }
        )
    return {
        "identity": status.get("identity"),
        "relay": {k: (status.get("relay") or {}).get(k) for k in ("state", "connects", "standby")},
        "tap": {"address": (status.get("tap") or {}).get("address")},
        "uptime_s": status.get("uptime_s"),
        "peers": peers,
    }


def cli_statuses(run: Any, names: list[str]) -> dict[str, dict[str, Any]]:
    """Every node's ``traversal status --json``, run in its namespace (what a user would see)."""
    with ThreadPoolExecutor(4) as pool:
        found = dict(zip(names, pool.map(lambda n: run.status(n, n), names), strict=True))
    missing = [n for n, s in found.items() if s is None]
    if missing:
        raise BenchError(f"`traversal status --json` did not answer for {missing}; logs in {run.workdir}")
    return {n: s for n, s in found.items() if s is not None}


def run_bench(sites: list[str], workdir: Path) -> dict[str, Any]:
    mesh = mesh_module.MeshLab(sites)
    run = overlay_module.Overlay(mesh, workdir)
    names = list(mesh.peers)
    pairs = mesh_module.pair_names(names)
    result: dict[str, Any] = {
        "sites": [{"name": s, "profile": mesh.profiles[s], "peers": mesh.site_peers(s)} for s in mesh.profiles],
        "peers": {n: {"site": mesh.site_of[n], "profile": mesh.profile(n)} for n in names},
    }
    try:
        mesh.up()
        print(f"mesh {mesh.prefix}: {len(mesh.profiles)} sites, {len(names)} peers", flush=True)
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(run.keygen, names))
        for n in names:
            result["peers"][n]["identity"] = run.pubkeys[n]
        run.start_relay(run.write_members(names))
        relay_pid = run.procs["relay"].pid
        result["relay_rss_kib_idle"] = rss_kib(relay_pid)

        # --- phase 1: everyone at once -------------------------------------------------
        before = run.metrics()
        capture = run.capture(file="all.pcap")
        phase = Phase(time.monotonic(), pairs)
        for n in names:
            run.start_peer(n, n)
        try:
            watch(run, phase, names)
        finally:
            packets = capture.stop()
        after = run.metrics()
        wire, stun = _relay_bytes(packets)
        result["all_at_once"] = {
            "peers": len(names),
            "pairs": len(pairs),
            "all_decided_s": _round(phase.all_decided_s()),
            "final_s": _round(phase.final_s()),
            "watched_s": round(phase.ended - phase.started, 1),
            "relay_forwarded_bytes": int(_forwarded(after) - _forwarded(before)),
            "relay_wire_bytes": wire,
            "stun_bytes": stun,
            "sessions_created": int(
                after["traversal_relay_sessions_created_total"] - before["traversal_relay_sessions_created_total"]
            ),
            "outcome": {f"{a}-{b}": phase.outcome.get((a, b)) for a, b in pairs},
        }
        print(f"all at once: {result['all_at_once']['all_decided_s']} s to every pair decided", flush=True)

        # --- phase 2: the last peer leaves and joins the settled mesh ------------------
        last = names[-1]
        others = [n for n in names if n != last]
        run.stop(last)
        overlay_module.wait_until(
            lambda: not any(entry_for(s, run.pubkeys[last]) for s in _statuses(run, others).values()),
            LEAVE_LIMIT_S,
            f"the others to forget {last}",
            interval=POLL_INTERVAL_S,
        )
        time.sleep(SETTLE_GRACE_S)
        base_capture = run.capture(file="baseline.pcap")
        base_before, base_started = run.metrics(), time.monotonic()
        time.sleep(BASELINE_S)
        base_after, base_s = run.metrics(), time.monotonic() - base_started
        base_wire, base_stun = _relay_bytes(base_capture.stop())
        base_forwarded_rate = (_forwarded(base_after) - _forwarded(base_before)) / base_s

        before = run.metrics()
        capture = run.capture(file="join.pcap")
        join_pairs = [p for p in pairs if last in p]
        join = Phase(time.monotonic(), join_pairs)
        run.start_peer(last, last)
        try:
            watch(run, join, names)
        finally:
            packets = capture.stop()
        after = run.metrics()
        join_s = join.ended - join.started
        wire, stun = _relay_bytes(packets)
        own_wire, own_stun = _relay_bytes(packets, only=mesh.public_address(last))
        forwarded = _forwarded(after) - _forwarded(before)
        result["join"] = {
            "peer": last,
            "profile": mesh.profile(last),
            "pairs": len(join_pairs),
            "all_decided_s": _round(join.all_decided_s()),
            "final_s": _round(join.final_s()),
            "watched_s": round(join_s, 1),
            "relay_forwarded_bytes": int(forwarded),
            "relay_forwarded_bytes_less_baseline": int(forwarded - base_forwarded_rate * join_s),
            "relay_wire_bytes": wire,
            "relay_wire_bytes_less_baseline": int(wire - base_wire / base_s * join_s),
            "stun_bytes": stun,
            "newcomer_relay_wire_bytes": own_wire,
            "newcomer_stun_bytes": own_stun,
            "baseline": {
                "seconds": round(base_s, 1),
                "forwarded_bytes_per_s": round(base_forwarded_rate, 1),
                "wire_bytes_per_s": round(base_wire / base_s, 1),
                "stun_bytes": base_stun,
            },
            "outcome": {f"{a}-{b}": join.outcome.get((a, b)) for a, b in join_pairs},
        }
        print(f"join of {last}: {result['join']['all_decided_s']} s to its pairs decided", flush=True)

        # --- settled: connections, memory, pings, paths ----------------------------------
        time.sleep(SETTLE_GRACE_S)
        metrics = run.metrics()
        statuses = cli_statuses(run, names)
        rss = {n: rss_kib(run.procs[n].pid) for n in names}
        result["settled"] = {
            "relay_clients_connected": int(metrics["traversal_relay_clients_connected"]),
            "relay_sessions_active": int(metrics["traversal_relay_sessions_active"]),
            "relay_state": {n: statuses[n]["relay"]["state"] for n in names},
            "node_rss_kib": rss,
            "relay_rss_kib": rss_kib(relay_pid),
        }
        replies = ping_sweep(run, names)
        result["pings"] = {
            "count": PING_COUNT,
            "ordered_pairs": len(replies),
            "all_answered": sum(n == PING_COUNT for n in replies.values()),
            "some_answered": sum(n > 0 for n in replies.values()),
            "none_answered": sorted(f"{a}->{b}" for (a, b), n in replies.items() if n == 0),
        }
        result["pairs"] = []
        for a, b in pairs:
            mine, theirs = entry_for(statuses[a], run.pubkeys[b]), entry_for(statuses[b], run.pubkeys[a])
            direct = [(e or {}).get("direct") or {} for e in (mine, theirs)]
            result["pairs"].append(
                {
                    "a": a,
                    "b": b,
                    "profiles": [mesh.profile(a), mesh.profile(b)],
                    "same_lan": mesh.same_lan(a, b),
                    "path": None if (path := pair_path(mine, theirs)) == "mixed" else path,
                    "decided": pair_decided(mine, theirs),
                    "predicted": _predicted(mesh, a, b),
                    "nominated": direct[0].get("nominated") or direct[1].get("nominated"),
                    "attempts": max(d.get("attempts") or 0 for d in direct),
                    "last_error": direct[0].get("last_error") or direct[1].get("last_error"),
                    "pinged": min(replies.get((a, b), 0), replies.get((b, a), 0)),
                }
            )
        result["statuses"] = {n: _trim(statuses[n]) for n in names}
    finally:
        try:
            run.stop_all()
        finally:
            mesh.down()
    return result


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _kib(values: list[int | None]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    return f"median {median(known) / 1024:.1f} MiB (min {min(known) / 1024:.1f}, max {max(known) / 1024:.1f})"


def _seconds(value: float | None, watched: float) -> str:
    return f"{value:.1f} s" if value is not None else f"not within {watched:.0f} s"


def _kb(n: float, per: int | None = None) -> str:
    return f"{n / 1000:.1f} kB" + (f" ({n / 1000 / per:.1f} kB per peer)" if per else "")


def figures(result: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The report's main table: (measure, value) rows."""
    everyone, join, settled = result["all_at_once"], result["join"], result["settled"]
    n, pairs = everyone["peers"], result["pairs"]
    direct = sum(p["path"] == "direct" for p in pairs)
    relayed = sum(p["path"] == "relay" for p in pairs)
    held = sum(state == "connected" for state in settled["relay_state"].values())
    idle_rss, rss = result["relay_rss_kib_idle"] or 0, settled["relay_rss_kib"] or 0
    pings = result["pings"]
    return [
        (
            f"all {n} started at once: every one of {everyone['pairs']} pairs decided",
            _seconds(everyone["all_decided_s"], everyone["watched_s"]),
        ),
        ("... and every pair on its final path", _seconds(everyone["final_s"], everyone["watched_s"])),
        (
            f"relay, from the {n} starts to the end of the watch ({everyone['watched_s']:.0f} s, retries included): "
            "session frames forwarded",
            _kb(everyone["relay_forwarded_bytes"], n),
        ),
        (
            "... its TCP connections on the wire (logins, TLS, headers); STUN",
            f"{_kb(everyone['relay_wire_bytes'], n)}; {_kb(everyone['stun_bytes'])}",
        ),
        (
            f"one more peer ({join['peer']}, {join['profile']}) joining the settled mesh: its {join['pairs']} "
            "pairs decided (on their final paths)",
            f"{_seconds(join['all_decided_s'], join['watched_s'])} ({_seconds(join['final_s'], join['watched_s'])})",
        ),
        (
            "relay bytes for that join: session frames forwarded, less what the idle mesh costs (in all)",
            f"{_kb(join['relay_forwarded_bytes_less_baseline'])} ({_kb(join['relay_forwarded_bytes'])})",
        ),
        (
            "relay bytes for that join on the wire: all connections less the idle mesh's; the newcomer's own",
            f"{_kb(join['relay_wire_bytes_less_baseline'])}; {_kb(join['newcomer_relay_wire_bytes'])}",
        ),
        (
            "relay connections held once settled (`traversal_relay_clients_connected`; nodes saying `connected`)",
            f"{settled['relay_clients_connected']} of {n}; {held}",
        ),
        ("relay sessions with forwarding state once settled", str(settled["relay_sessions_active"])),
        ("node memory (RSS)", _kib(list(settled["node_rss_kib"].values()))),
        (f"relay memory (RSS): idle; with {n} peers", f"{idle_rss / 1024:.1f} MiB; {rss / 1024:.1f} MiB"),
        (
            "pairs direct / relayed / ends disagree, at the end",
            f"{direct} / {relayed} / {len(pairs) - direct - relayed}",
        ),
        (
            f"pings ({pings['count']} per ordered pair, the first may wait for ARP): all answered; some",
            f"{pings['all_answered']}; {pings['some_answered']} of {pings['ordered_pairs']} ordered pairs",
        ),
    ]


def render(result: Mapping[str, Any], context: Context) -> str:
    peers = result["peers"]
    names = list(peers)
    pairs = result["pairs"]
    off = [p for p in pairs if p["predicted"] is not None and p["path"] != p["predicted"]]
    unknown = [p for p in pairs if p["predicted"] is None]

    lines = [
        f"# Full mesh: {len(names)} peers on one network",
        "",
        "Generated by `bench/mesh.py` (see its docstring for the method). One lab run: the sites",
        "below on one WAN, the real relay, one `traversal connect` node per host, default settings",
        "(5 s direct deadline, 60 s retry). Times come from the nodes' `traversal status --json`,",
        f"polled every {POLL_INTERVAL_S} s through their control sockets.",
        "",
        *context.markdown(),
        "",
        "Sites: " + ", ".join(f"{s['name']} {s['profile']} ({' '.join(s['peers'])})" for s in result["sites"]) + ".",
        "",
        "![The mesh: each pair's path](mesh.png)",
        "",
        "## Figures",
        "",
        "| measure | value |",
        "|---|---|",
        *(f"| {measure} | {value} |" for measure, value in figures(result)),
        "",
        "## Path per pair",
        "",
        "At the end of the run, from both ends' status. D: direct, R: relayed, ?: the ends disagree;",
        "lower-case: not the path the direct-path matrix predicts (tests/lab/test_direct_matrix.py);",
        "`*`: the matrix does not cover this pair.",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    cell = {}
    for p in pairs:
        mark = {"direct": "D", "relay": "R"}.get(p["path"] or "", "?")
        if p["predicted"] is not None and p["path"] != p["predicted"]:
            mark = mark.lower()
        if p["predicted"] is None:
            mark += "*"
        cell[(p["a"], p["b"])] = cell[(p["b"], p["a"])] = mark
    for a in names:
        label = f"{a} {peers[a]['profile']}"
        lines.append(f"| {label} | " + " | ".join(cell.get((a, b), "-") for b in names) + " |")
    lines += ["", "## Pairs off the matrix's prediction", ""]
    if off:
        lines += [
            "| pair | profiles | path | predicted | direct attempts | last direct error |",
            "|---|---|---|---|---|---|",
        ]
        for p in off:
            lines.append(
                f"| {p['a']}-{p['b']} | {' x '.join(p['profiles'])} | {p['path'] or 'ends disagree'} "
                f"| {p['predicted']} | {p['attempts']} | {p['last_error'] or '-'} |"
            )
    else:
        lines.append("None: every pair the matrix covers ended on the predicted path.")
    if unknown:
        lines += [
            "",
            "Not covered by the matrix: "
            + ", ".join(f"{p['a']}-{p['b']} ({' x '.join(p['profiles'])}: {p['path']})" for p in unknown)
            + ".",
        ]
    lines += [
        "",
        "## Reproduce",
        "",
        "`.venv/bin/python bench/mesh.py` (root; part of `make bench`); redraw the picture from the JSON with",
        "`.venv/bin/python bench/mesh_graph.py --from-bench bench/mesh.json --out bench/mesh.png`.",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sites", default=",".join(SITES), help="comma-separated PROFILE[:HOSTS] (default: %(default)s)"
    )
    parser.add_argument("--out", type=Path, default=BENCH / "mesh.md", help="Markdown report")
    parser.add_argument("--json", type=Path, default=BENCH / "mesh.json", help="JSON figures and statuses")
    parser.add_argument("--png", type=Path, default=BENCH / "mesh.png", help="the picture")
    parser.add_argument("--keep-logs", action="store_true", help="keep the nodes' logs (printed path)")
    args = parser.parse_args()
    why = missing_prerequisites("mesh", lab_module, plots=True)
    if why:
        print(why, file=sys.stderr)
        return 1
    context = Context()
    workdir = Path(tempfile.mkdtemp(prefix="traversal-mesh-"))
    try:
        result = run_bench(args.sites.split(","), workdir)
    except (BenchError, lab_module.LabError, overlay_module.OverlayError) as exc:
        print(f"mesh: {exc} (logs in {workdir})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    context.finish()
    args.out.write_text(render(result, context) + "\n")
    # bench/results.py shows this, as it does the other benchmarks' summaries.
    summary = ["| measure | value |", "|---|---|", *(f"| {m} | {v} |" for m, v in figures(result))]
    summary += ["", "![The mesh: each pair's path](mesh.png)"]
    write_json(args.json, {**context.as_dict(), "summary_markdown": summary, **result})
    # Drawn from the JSON just written, exactly as `mesh_graph.py --from-bench` redraws it.
    mesh = from_bench(args.json)
    draw(mesh.statuses, args.png, labels=mesh.labels, title=mesh.title, predicted_direct=mesh.predicted_direct)
    print(f"wrote {args.out}, {args.json} and {args.png}")
    if args.keep_logs:
        print(f"logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
