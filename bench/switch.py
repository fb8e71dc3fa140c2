"""The relay -> direct switch under the seed's geography, in the netns lab, with the real relay and nodes.

One cone/cone lab with the seed's delays (a 7 ms and b 8 ms one way from the WAN, each 20 ms
from the relay: about 80 ms RTT through the relay, 30 ms direct), one relay, then ``--runs`` times
a fresh pair of ``traversal connect`` nodes. The relay and the nodes log with epoch timestamps
(``TRAVERSAL_PRECISE_LOG`` in netns-lab/overlay.py), so their events and the pings share one clock.
As soon as both nodes log ESTABLISHED, each pings the other every 10 ms (``ping -D -i 0.01 -c
COUNT``, host-a -> 10.10.10.4 and host-b -> 10.10.10.3 at once). Per run:

* ESTABLISHED -> direct: from the later ESTABLISHED to the later "path validated both ways" (only
  then is the pair direct), from the logs; the nodes' own ``direct.time_to_direct_s`` is kept too;
* the switch: per side, path validated -> that side's relay direction RELEASEd (the node's log),
  and for the pair, the first validation -> the relay forgetting the session, both directions
  released (the relay's log): how long the relay still carries frames for the pair;
* echo requests sent before their sender switched (they crossed the relay), lost, duplicated.

Writes ``bench/switch.md``, ``bench/switch.json`` and ``bench/switch_rtt.png`` (the RTT of each echo request of the
median run over time, with the switch marked; needs matplotlib: ``pip install -e '.[bench]'``).
Run as root, from the repository: ``.venv/bin/python bench/switch.py [--runs 10] [--count 300]``.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import BENCH, BenchError, Context, load_netns_module, missing_prerequisites, p95, write_json

TARGET = {"a": "10.10.10.4", "b": "10.10.10.3"}
PING_INTERVAL_S = 0.01
#: From starting the nodes to ESTABLISHED, and to direct, with room to spare.
SETTLE_TIMEOUT_S = 30.0
#: How long the relay may take to notice that the previous run's nodes left.
RELAY_IDLE_TIMEOUT_S = 15.0
VALIDATED = 'path=direct reason="validated both ways'


lab_module = load_netns_module("lab")
overlay_module = load_netns_module("overlay")


@dataclass
class Run:
    index: int
    to_direct_s: float  # later ESTABLISHED -> later validation
    status_to_direct_s: float  # the nodes' own figure (the later side)
    release_ms: dict[str, float]  # per side: validated -> own relay direction released
    relay_free_ms: float  # first validation -> the relay forgot the session (both directions released)
    relayed: dict[str, int]  # echo requests sent before their sender switched
    sent: dict[str, int]
    lost: dict[str, int]
    duplicates: dict[str, int]
    relay_rtt_ms: float  # median RTT of the requests that crossed the relay
    direct_rtt_ms: float  # median RTT once both sides switched
    pings: dict[str, Any]  # the PingResults, for the plot
    validated_at: dict[str, float]


def _one(run: Any, index: int, count: int) -> Run:
    run.start_peers()
    for name in ("a", "b"):
        run.wait_log(name, "event=established", SETTLE_TIMEOUT_S)
    pings = {}
    for name in ("a", "b"):
        ping_file = f"ping-{index:02d}-{name}.txt"
        pings[name] = run.start_ping(name, TARGET[name], count=count, interval=PING_INTERVAL_S, file=ping_file)
    results = {name: ping.wait() for name, ping in pings.items()}
    peers = {
        name: run.wait_status(name, name, _direct, SETTLE_TIMEOUT_S, "direct both ways, relay released")
        for name in ("a", "b")
    }
    established = {name: run.log_times(name, "event=established")[0] for name in ("a", "b")}
    validated = {name: run.log_times(name, VALIDATED)[0] for name in ("a", "b")}
    released = {name: run.log_times(name, "event=relay_released")[0] for name in ("a", "b")}
    line = next(line for line in run.log_text("a").splitlines() if VALIDATED in line)
    session = re.search(r" session=([0-9a-f]{8}) ", line)
    assert session is not None, line
    # The relay logs event=released once both ends released their direction: it forgets the session.
    freed = [
        float(entry.split(" ", 1)[0])
        for entry in run.log_text("relay").splitlines()
        if " event=released " in entry and f" session={session.group(1)} " in entry
    ]
    if not freed:
        raise BenchError(f"run {index}: the relay never released session {session.group(1)}")
    switched_both = max(validated.values())
    relay_rtts = [r.rtt_ms for n in ("a", "b") for r in results[n].replies if r.sent_at < validated[n]]
    direct_rtts = [r.rtt_ms for n in ("a", "b") for r in results[n].replies if r.sent_at > switched_both + 0.1]
    outcome = Run(
        index=index,
        to_direct_s=max(validated.values()) - max(established.values()),
        status_to_direct_s=max(p["direct"]["time_to_direct_s"] for p in peers.values()),
        release_ms={n: (released[n] - validated[n]) * 1000 for n in ("a", "b")},
        relay_free_ms=(freed[0] - min(validated.values())) * 1000,
        relayed={n: sum(r.sent_at < validated[n] for r in results[n].replies) for n in ("a", "b")},
        sent={n: results[n].transmitted for n in ("a", "b")},
        lost={n: results[n].lost for n in ("a", "b")},
        duplicates={n: results[n].duplicates for n in ("a", "b")},
        relay_rtt_ms=statistics.median(relay_rtts) if relay_rtts else math.nan,
        direct_rtt_ms=statistics.median(direct_rtts) if direct_rtts else math.nan,
        pings=results,
        validated_at=validated,
    )
    for name in ("a", "b"):
        run.stop(name)
        log = run.log_path(name)
        log.rename(log.with_name(f"{name}-run{index:02d}.log"))
    overlay_module.wait_until(
        lambda: run.metrics()["traversal_relay_clients_connected"] == 0, RELAY_IDLE_TIMEOUT_S, "the relay to be idle"
    )
    return outcome


def _direct(status: dict[str, Any]) -> dict[str, Any] | None:
    peers = status.get("peers") or []
    peer = peers[0] if peers else None
    if peer is None or (peer["path"], peer["peer_path"], peer["relay_released"]) != ("direct", "direct", True):
        return None
    return peer


def bench(runs: int, count: int, workdir: Path) -> list[Run]:
    lab = lab_module.Lab(nat_a="cone", nat_b="cone", **lab_module.SEED_GEOGRAPHY)
    results = []
    try:
        lab.up()
        run = overlay_module.Overlay(lab, workdir, command=list(overlay_module.TRAVERSAL_PRECISE_LOG))
        for name in ("a", "b"):
            run.keygen(name)
        run.start_relay(run.write_members(["a", "b"]))
        for index in range(1, runs + 1):
            try:
                outcome = _one(run, index, count)
            except overlay_module.OverlayError as exc:
                raise BenchError(f"run {index}: {exc} (logs in {workdir})") from None
            results.append(outcome)
            print(
                f"  run {index}: to direct {outcome.to_direct_s:.3f} s, relay free after "
                f"{outcome.relay_free_ms:.1f} ms, relayed requests a {outcome.relayed['a']} b {outcome.relayed['b']}, "
                f"lost a {outcome.lost['a']} b {outcome.lost['b']}, dup a {outcome.duplicates['a']} "
                f"b {outcome.duplicates['b']}",
                flush=True,
            )
    finally:
        lab.down()
    return results


# --- report -----------------------------------------------------------------------------


def _row(label: str, values: list[float], fmt: str) -> str:
    cells = " | ".join(format(v, fmt) for v in (statistics.median(values), p95(values), min(values), max(values)))
    return f"| {label} | {cells} |"


def _median_run(runs: list[Run]) -> Run:
    ordered = sorted(runs, key=lambda r: r.to_direct_s)
    return ordered[(len(ordered) - 1) // 2]


def plot(run: Run, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = min(r.sent_at for result in run.pings.values() for r in result.replies)
    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=120)
    colours = {"a": "tab:blue", "b": "tab:orange"}
    for name, label in (("a", "host-a -> 10.10.10.4"), ("b", "host-b -> 10.10.10.3")):
        replies = [r for r in run.pings[name].replies if not r.duplicate]
        ax.plot(
            [r.sent_at - start for r in replies],
            [r.rtt_ms for r in replies],
            ".",
            markersize=3,
            color=colours[name],
            label=f"{label} (echo request sent at x)",
        )
    for name in ("a", "b"):
        at = run.validated_at[name] - start
        ax.axvline(at, color=colours[name], linestyle="--", linewidth=1)
    first = min(run.validated_at.values()) - start
    ax.annotate(
        f"switch: {first:.2f} s (dashed: a, b validated the direct path)",
        xy=(first, 0.92),
        xycoords=("data", "axes fraction"),
        xytext=(8, 0),
        textcoords="offset points",
        fontsize=9,
    )
    ax.set_xlabel("seconds since the first echo request (sent right after ESTABLISHED)")
    ax.set_ylabel("RTT (ms)")
    ax.set_title(f"ping -i 0.01 through the relay -> direct switch (run {run.index}, the median time to direct)")
    ax.set_ylim(bottom=0)
    ax.set_xlim(left=0, right=max(3.0, first * 3))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8, bbox_to_anchor=(1.0, 0.86))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def summary(runs: list[Run]) -> dict[str, Any]:
    """The headline figures, as written to the JSON file."""

    def stats(values: list[float]) -> dict[str, float]:
        return {"median": statistics.median(values), "p95": p95(values)}

    return {
        "runs": len(runs),
        "to_direct_s": stats([r.to_direct_s for r in runs]),
        "relay_rtt_ms": stats([r.relay_rtt_ms for r in runs]),
        "direct_rtt_ms": stats([r.direct_rtt_ms for r in runs]),
        "echo_requests": sum(sum(r.sent.values()) for r in runs),
        "lost": sum(sum(r.lost.values()) for r in runs),
        "duplicated": sum(sum(r.duplicates.values()) for r in runs),
    }


def render(runs: list[Run], context: Context, count: int, png: str) -> str:
    sent = sum(sum(r.sent.values()) for r in runs)
    lost = sum(sum(r.lost.values()) for r in runs)
    dups = sum(sum(r.duplicates.values()) for r in runs)
    intervals = []
    for r in runs:
        for result in r.pings.values():
            times = sorted(reply.sent_at for reply in result.replies)
            if len(times) > 1:
                intervals.append((times[-1] - times[0]) / (len(times) - 1))
    lines = [
        "# Relay -> direct switch, under the seed's geography",
        "",
        "Generated by `bench/switch.py` (its docstring says what is measured). Lab: cone x cone, one-way",
        "delays a 7 ms and b 8 ms to the WAN, 20 ms each to the relay (about 80 ms RTT relayed, 30 ms",
        f"direct). {len(runs)} runs, each a fresh pair of nodes pinging each other from ESTABLISHED on",
        f"(`ping -D -i 0.01 -c {count}` from both hosts at once; ping really sent every "
        f"{statistics.mean(intervals) * 1000:.1f} ms",
        "on this machine). p95 is nearest-rank, so with 10 runs it is the largest value.",
        "",
        *context.markdown(),
        "",
        "| measure | median | p95 | min | max |",
        "|---|---|---|---|---|",
        _row("ESTABLISHED -> direct both ways (s)", [r.to_direct_s for r in runs], ".3f"),
        _row("same, the nodes' own `time_to_direct_s` (s)", [r.status_to_direct_s for r in runs], ".3f"),
        _row("a: path validated -> its relay direction released (ms)", [r.release_ms["a"] for r in runs], ".2f"),
        _row("b: path validated -> its relay direction released (ms)", [r.release_ms["b"] for r in runs], ".2f"),
        _row("first validation -> relay session released both ways (ms)", [r.relay_free_ms for r in runs], ".1f"),
        _row("echo requests from a that crossed the relay", [float(r.relayed["a"]) for r in runs], ".0f"),
        _row("echo requests from b that crossed the relay", [float(r.relayed["b"]) for r in runs], ".0f"),
        _row("RTT while relayed, median of the run (ms)", [r.relay_rtt_ms for r in runs], ".1f"),
        _row("RTT once direct, median of the run (ms)", [r.direct_rtt_ms for r in runs], ".1f"),
        "",
        f"Loss across the switch, all runs, both directions: {sent} echo requests, {lost} lost, {dups} duplicated.",
        "",
        "How to read the switch rows: a side releases its direction of the relay session as soon as",
        'its route flips to direct, so "validated -> released" is a fraction of a',
        "millisecond; it comes out negative (by a millisecond or two) when the peer's SWITCHED arrived in",
        "the same QUIC packet as the PROBE_ACK: the release then goes out before the attempt's task resumes",
        'to log the validation. "Relay session released both ways" is the relay\'s own log: until then it',
        "still forwards what the slower side sends, which is what keeps the switch lossless.",
        "",
        f"![RTT per echo request through the switch]({png})",
        "",
        "The plot is the run with the median time to direct. The first two or three requests wait for",
        "ARP (through the relay); the points near 60 ms just after the switch went one way direct and",
        "came back through the relay (the peer had not switched yet). The switch itself is",
        "make-before-break: each side sends on the direct path from the moment it validated it,",
        "releases only its own direction of the relay session, and keeps receiving what the peer still",
        "sends through the relay; one counter space and replay window across both paths drop nothing",
        "and deliver nothing twice.",
        "",
        "Reproduce: `make bench` (as root; it also runs `bench/time_to_direct.py`), or",
        "`.venv/bin/python bench/switch.py --runs 10` after `.venv/bin/pip install -e '.[bench]'`.",
        "",
        "## Per run",
        "",
        "| run | ESTABLISHED -> direct (s) | released a / b (ms) | relay free (ms) | relayed a / b "
        "| lost a / b | dup a / b |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r.index} | {r.to_direct_s:.3f} | {r.release_ms['a']:.2f} / {r.release_ms['b']:.2f} "
            f"| {r.relay_free_ms:.1f} | {r.relayed['a']} / {r.relayed['b']} | {r.lost['a']} / {r.lost['b']} "
            f"| {r.duplicates['a']} / {r.duplicates['b']} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="fresh node pairs (default 10)")
    parser.add_argument("--count", type=int, default=300, help="echo requests per side and run (default 300)")
    parser.add_argument("--out", type=Path, default=BENCH / "switch.md", help="Markdown report")
    parser.add_argument("--png", type=Path, default=BENCH / "switch_rtt.png", help="RTT plot")
    parser.add_argument("--json", type=Path, default=BENCH / "switch.json", help="JSON figures")
    args = parser.parse_args()
    if args.runs < 1 or args.count < 10:
        parser.error("--runs must be at least 1 and --count at least 10")
    if problem := missing_prerequisites("switch", lab_module, plots=True):
        print(problem, file=sys.stderr)
        return 1
    context = Context()
    workdir = Path(tempfile.mkdtemp(prefix="switch-"))
    started = time.monotonic()
    print(f"relay -> direct switch, seed's geography: {args.runs} runs", flush=True)
    try:
        runs = bench(args.runs, args.count, workdir)
    except (BenchError, lab_module.LabError, overlay_module.OverlayError) as exc:
        print(f"switch: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    plot(_median_run(runs), args.png)
    png = os.path.relpath(args.png, args.out.parent)
    context.finish()
    report = render(runs, context, args.count, png)
    args.out.write_text(report + "\n")
    write_json(args.json, {**context.as_dict(), **summary(runs)})
    print(f"\nwrote {args.out} and {args.png} in {time.monotonic() - started:.0f} s\n")
    lines = report.splitlines()
    table = lines.index("| measure | median | p95 | min | max |")
    print("\n".join(lines[table : lines.index("", table) + 2]))
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
