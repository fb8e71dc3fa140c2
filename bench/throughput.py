"""Throughput and CPU cost of traversal against wireguard-go, tinc and n2n, side by side in one NAT lab.

One netns lab (cone x cone, no added delay) for the whole run; every system runs between host-a
and host-b through bench/vpns.py's adapters (which say how each is set up: MTUs, keys, hubs).
Configurations: traversal direct (the default lean carriage), traversal relay (``--no-direct``),
traversal direct with ``--carriage quic`` (the old QUIC-datagram carriage, the "before" figure),
wireguard-go direct, tinc direct and relay, n2n direct and relay.

``--rounds`` rounds; in each round every configuration runs once, the list rotated by
rounds/configurations so that no system always runs first or last (other labs may share the
machine: rotation and medians are there for that noise). Per configuration and round:

* start -> first ping: ``wait_ready``'s time from launching the two ends (hub, keys and
  configuration already in place) to the first echo reply across the overlay;
* TCP: one iperf3 stream host-a -> host-b for ``--seconds``: the receiver's Mbit/s, retransmits;
* UDP: iperf3 at a fixed offered rate, ``UDP_BITRATE`` (400M, vpns.DEFAULT_UDP_BITRATE), in
  ``UDP_DATAGRAM``-byte datagrams (1200: they fit every tunnel), for ``--seconds``: delivered
  Mbit/s (receiver) and loss %. The rate is above
  what any of these tunnels carries on this 2-core machine (the tunnels' own processes then use
  most of both cores), so the delivered rate is the tunnel's UDP capacity, while the iperf3 sender
  still leaves the tunnel most of the machine (a higher rate would take more of it from the tunnel);
  a loss under ``SATURATION_LOSS_PERCENT`` is flagged, as the offer then may not have been above
  the tunnel's capacity, and the report gives the lowest loss of the run;
* CPU: user + system seconds of the system's processes (both ends and the hub or relay, from
  /proc) over each iperf3 run, as core-milliseconds per Mbit delivered
  (cpu_s * 1000 / Mbit received); iperf3's own CPU is not counted;
* the path: nat-a's counters (``VpnSystem.path_counters``) during each iperf3 run: at least
  ``PATH_SHARE`` of host-a's tunnel bytes on the mode's path (direct: to b's NAT; relay: to the
  relay/hub addresses), and at least as many bytes on it as were delivered; otherwise the round is
  recorded as invalid, with the reason, and left out of the medians.

A system that cannot run here (its packages do not install) is reported as not measured; a
configuration that fails in one round has that round's error recorded, and the bench goes on.

Writes ``bench/throughput.md`` (``--out``), ``bench/throughput.json`` (``--json``: every round's
figures, the medians and the ratios) and ``bench/throughput.png`` (``--png``). Run as root, from the
repository: ``.venv/bin/python bench/throughput.py [--rounds 3] [--seconds 10] [--systems
traversal,tinc]``; ``--quick`` (1 round of 3 s runs, report in /tmp) is a smoke test.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import vpns
from common import BENCH, Context, missing_prerequisites, write_json

lab_module = vpns.lab_module

#: Offered UDP rate (iperf3 -b) and datagram size: see the module docstring.
UDP_BITRATE = vpns.DEFAULT_UDP_BITRATE
UDP_DATAGRAM = vpns.UDP_DATAGRAM
#: Below this UDP loss the offered rate may not have been above the tunnel's capacity.
SATURATION_LOSS_PERCENT = 5.0
#: Share of host-a's tunnel bytes that must take the mode's path.
PATH_SHARE = 0.95
READY_TIMEOUT_S = 60.0
#: Rough cost of one configuration beyond its two iperf3 runs (start, path check, stop), for the estimate.
OVERHEAD_S = 9.0
QUICK_ROUNDS = 1
QUICK_SECONDS = 3.0


@dataclass(frozen=True)
class Config:
    """One system in one mode (with extra flags, for traversal's carriages)."""

    key: str
    label: str
    system: str
    mode: str
    extra_args: tuple[str, ...] = ()

    def make(self) -> vpns.VpnSystem:
        if self.system == "traversal":
            return vpns.Traversal(list(self.extra_args))
        return vpns.SYSTEMS[self.system]()


CONFIGS = (
    Config("traversal-direct", "traversal direct", "traversal", "direct"),
    Config("traversal-relay", "traversal relay", "traversal", "relay"),
    Config("traversal-quic-direct", "traversal (quic carriage)", "traversal", "direct", ("--carriage", "quic")),
    Config("wireguard-go-direct", "wireguard-go direct", "wireguard-go", "direct"),
    Config("tinc-direct", "tinc direct", "tinc", "direct"),
    Config("tinc-relay", "tinc relay", "tinc", "relay"),
    Config("n2n-direct", "n2n direct", "n2n", "direct"),
    Config("n2n-relay", "n2n relay", "n2n", "relay"),
)
BY_KEY = {c.key: c for c in CONFIGS}

#: The headline: (comparison, numerator, denominator), all from this run.
RATIOS = (
    ("ours direct / wireguard-go", "traversal-direct", "wireguard-go-direct"),
    ("ours direct / tinc direct", "traversal-direct", "tinc-direct"),
    ("ours direct / n2n direct", "traversal-direct", "n2n-direct"),
    ("ours relay / tinc relay", "traversal-relay", "tinc-relay"),
    ("ours relay / n2n relay", "traversal-relay", "n2n-relay"),
    ("lean / quic carriage (after / before)", "traversal-direct", "traversal-quic-direct"),
)
RATIO_METRICS = ("tcp_mbps", "udp_mbps", "tcp_cpu_ms_per_mbit", "udp_cpu_ms_per_mbit")

#: What each system's start -> first ping includes, for the reader.
FIRST_PING_INCLUDES = {
    "traversal": (
        "Python start-up and imports of both nodes, their WebSocket/TLS login to the relay, the end-to-end "
        "hybrid X25519 + ML-KEM-768 handshake through the relay, TAP set-up; the first ping takes whatever "
        "path there is then (the relay until the direct path is validated; relay mode: the relay only)"
    ),
    "wireguard-go": (
        "two wireguard-go processes starting, `wg set` (key, peer, endpoint) and address/MTU set-up, then "
        "WireGuard's handshake straight between the NATs (static endpoints: the cone NATs keep the ports)"
    ),
    "tinc": (
        "two tincd processes (the hub already up) connecting to the hub and authenticating (RSA), then the "
        "key exchange; the first ping may go via the hub before tinc's direct UDP is up"
    ),
    "n2n": (
        "two edge processes registering with the supernode (already up); the first packets go via the "
        "supernode until the edges learn each other's address"
    ),
}


class BenchError(Exception):
    """A measurement could not be taken; the message says why."""


@dataclass
class Iperf:
    """One iperf3 run through a tunnel, with the tunnel's CPU and path counters over it."""

    protocol: str  # "tcp" or "udp"
    mbps: float  # receiver's rate
    delivered_mbit: float
    seconds: float
    lost_percent: float | None
    retransmits: int | None
    cpu_s: float
    cpu_ms_per_mbit: float | None
    #: Host-a's bytes to b's NAT ("direct"), to the relay/hub ("relay", of which "relay_udp" over
    #: UDP), and its non-first IP fragments ("fragments", packets), during the run.
    sent: dict[str, int]
    path_problem: str | None = None


@dataclass
class Run:
    """One configuration in one round."""

    config: str
    round: int
    position: int  # 1-based place in the round's order
    started: str
    first_ping_s: float | None = None
    tcp: Iperf | None = None
    udp: Iperf | None = None
    error: str | None = None
    invalid: str | None = None
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def valid(self) -> bool:
        return self.error is None and self.invalid is None and self.tcp is not None and self.udp is not None

    def figure(self, metric: str) -> float | None:
        """``tcp_mbps``, ``udp_lost_percent``, ``first_ping_s``, ...: one figure of this run."""
        if metric == "first_ping_s":
            return self.first_ping_s
        protocol, _, name = metric.partition("_")
        result = self.tcp if protocol == "tcp" else self.udp
        value = getattr(result, name) if result is not None else None
        return float(value) if value is not None else None


# --- measuring ---------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if isinstance(exc, vpns.VpnError | lab_module.LabError) else f"{type(exc).__name__}: {text}"


def _path_problem(mode: str, sent: dict[str, int], delivered_bytes: float) -> str | None:
    """Why the counters say the data did not take ``mode``'s path, or None if it did."""
    other = "relay" if mode == "direct" else "direct"
    on, off = sent[mode], sent[other]
    if on + off == 0:
        return "no tunnel bytes left host-a towards b's NAT or the relay"
    if on < PATH_SHARE * (on + off):
        share = 100 * on / (on + off)
        split = f"{sent['direct']} B direct, {sent['relay']} B via the relay"
        return f"only {share:.0f}% of host-a's tunnel bytes went {mode} ({split})"
    if on < delivered_bytes:
        return f"{on} B left host-a on the {mode} path for {delivered_bytes:.0f} B delivered"
    return None


def measure(system: vpns.VpnSystem, lab: Any, mode: str, *, udp: bool, seconds: float) -> Iperf:
    """One iperf3 run (TCP, or UDP at UDP_BITRATE) with the system's CPU and path counters around it."""
    pids = system.pids()
    counters, cpu = system.path_counters(), vpns.cpu_seconds(pids)
    result = vpns.iperf3(lab, system.overlay_b, udp=udp, seconds=seconds, bitrate=UDP_BITRATE if udp else None)
    cpu = vpns.cpu_seconds(pids) - cpu
    sent = {name: value - counters[name] for name, value in system.path_counters().items()}
    if gone := set(pids) - set(system.pids()):
        raise BenchError(f"process(es) {sorted(gone)} of {system.name} exited during the iperf3 run")
    received = result["raw"]["end"].get("sum_received") or result["raw"]["end"]["sum"]
    duration = float(received.get("seconds") or seconds)
    delivered_bytes = float(received.get("bytes") or result["mbps"] * 1e6 * duration / 8)
    delivered_mbit = delivered_bytes * 8 / 1e6
    return Iperf(
        protocol="udp" if udp else "tcp",
        mbps=result["mbps"],
        delivered_mbit=delivered_mbit,
        seconds=duration,
        lost_percent=result["lost_percent"],
        retransmits=result["retransmits"],
        cpu_s=cpu,
        cpu_ms_per_mbit=cpu * 1000 / delivered_mbit if delivered_mbit > 0 else None,
        sent=sent,
        path_problem=_path_problem(mode, sent, delivered_bytes),
    )


def run_config(
    config: Config, system: vpns.VpnSystem, lab: Any, workdir: Path, rnd: int, position: int, seconds: float
) -> Run:
    """Start, wait_ready, TCP and UDP iperf3, stop; every failure ends up in the Run, not raised."""
    run = Run(config.key, rnd, position, datetime.datetime.now(datetime.UTC).strftime("%H:%M:%S"))
    started = time.monotonic()
    try:
        system.start(lab, workdir / f"round{rnd}-{config.key}", config.mode)
        try:
            run.first_ping_s = system.wait_ready(READY_TIMEOUT_S)
            run.tcp = measure(system, lab, config.mode, udp=False, seconds=seconds)
            run.udp = measure(system, lab, config.mode, udp=True, seconds=seconds)
        finally:
            system.stop()
    except Exception as exc:  # one configuration's failure must not end the bench
        run.error = _one_line(exc)
    problems = [f"{r.protocol.upper()}: {r.path_problem}" for r in (run.tcp, run.udp) if r and r.path_problem]
    if problems:
        run.invalid = "; ".join(problems)
    for r in (run.tcp, run.udp):
        if r is not None and r.sent.get("fragments"):
            run.notes.append(f"{r.protocol.upper()}: host-a sent {r.sent['fragments']} IP fragments")
    if run.udp is not None and run.udp.lost_percent is not None and run.udp.lost_percent < SATURATION_LOSS_PERCENT:
        run.notes.append(f"UDP loss {run.udp.lost_percent:.1f}%: {UDP_BITRATE} may not be above its capacity")
    try:
        if left := vpns.leftovers(lab):
            run.notes.append(f"left behind after stop: {'; '.join(left)}")
    except Exception as exc:
        run.notes.append(f"could not check for leftovers: {_one_line(exc)}")
    run.wall_s = time.monotonic() - started
    return run


def _progress(run: Run, config: Config) -> str:
    head = f"  round {run.round} #{run.position} {config.label}:"
    if run.error:
        first = f" first ping {run.first_ping_s:.3f} s," if run.first_ping_s is not None else ""
        return f"{head}{first} FAILED: {run.error.splitlines()[0]}"
    parts = [f"first ping {run.first_ping_s:.3f} s"]
    if run.tcp:
        parts.append(
            f"TCP {run.tcp.mbps:.0f} Mbit/s (retr {run.tcp.retransmits}, {_num(run.tcp.cpu_ms_per_mbit, 2)} ms/Mbit)"
        )
    if run.udp:
        parts.append(
            f"UDP {run.udp.mbps:.0f} Mbit/s (loss {_num(run.udp.lost_percent, 1)}%, "
            f"{_num(run.udp.cpu_ms_per_mbit, 2)} ms/Mbit)"
        )
    line = f"{head} {', '.join(parts)} [{run.wall_s:.0f} s]"
    if run.invalid:
        line += f" INVALID: {run.invalid}"
    for note in run.notes:
        line += f" ({note})"
    return line


def round_order(configs: list[Config], rnd: int, rounds: int) -> list[Config]:
    """Round ``rnd`` (0-based) runs the list rotated by rnd * len / rounds (evenly spread starts)."""
    shift = (rnd * len(configs)) // rounds % len(configs)
    return configs[shift:] + configs[:shift]


def bench(
    configs: list[Config], available: dict[str, str | None], rounds: int, seconds: float, workdir: Path
) -> list[Run]:
    """Every available configuration once per round, in one cone x cone lab."""
    measured = [c for c in configs if available[c.key] is None]
    runs: list[Run] = []
    if not measured:
        return runs
    with lab_module.Lab(nat_a="cone", nat_b="cone") as lab:
        print(f"lab {lab.prefix} (cone x cone); logs in {workdir}", flush=True)
        for rnd in range(rounds):
            order = round_order(measured, rnd, rounds)
            print(f"round {rnd + 1}/{rounds}: {', '.join(c.label for c in order)}", flush=True)
            for position, config in enumerate(order, start=1):
                run = run_config(config, config.make(), lab, workdir, rnd + 1, position, seconds)
                runs.append(run)
                print(_progress(run, config), flush=True)
    return runs


# --- figures -----------------------------------------------------------------------------


def _stat(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


SUMMARY_METRICS = (
    "first_ping_s",
    "tcp_mbps",
    "tcp_retransmits",
    "tcp_cpu_ms_per_mbit",
    "udp_mbps",
    "udp_lost_percent",
    "udp_cpu_ms_per_mbit",
)


def summarize(config: Config, runs: list[Run], reason: str | None) -> dict[str, Any]:
    """Medians (and min, max) over the configuration's valid rounds; first ping over every round that had one."""
    mine = [r for r in runs if r.config == config.key]
    valid = [r for r in mine if r.valid]
    summary: dict[str, Any] = {
        "config": config.key,
        "label": config.label,
        "system": config.system,
        "mode": config.mode,
        "extra_args": list(config.extra_args),
        "not_measured": reason,
        "rounds": len(mine),
        "valid_rounds": len(valid),
        "failed_rounds": [{"round": r.round, "error": r.error} for r in mine if r.error],
        "invalid_rounds": [{"round": r.round, "reason": r.invalid} for r in mine if r.invalid and not r.error],
    }
    for metric in SUMMARY_METRICS:
        source = mine if metric == "first_ping_s" else valid
        values = [v for r in source if (v := r.figure(metric)) is not None]
        summary[metric] = _stat(values)
    return summary


def ratios(summaries: dict[str, dict[str, Any]], runs: list[Run]) -> list[dict[str, Any]]:
    """The headline ratios: of the two configurations' medians, and per round where both were valid."""
    found = []
    for label, ours, theirs in RATIOS:
        entry: dict[str, Any] = {"comparison": label, "numerator": ours, "denominator": theirs}
        missing = [k for k in (ours, theirs) if k not in summaries or summaries[k]["valid_rounds"] == 0]
        if missing:
            why = [
                summaries[k]["not_measured"] or "no valid round" if k in summaries else "not selected" for k in missing
            ]
            entry["missing"] = "; ".join(f"{BY_KEY[k].label}: {w}" for k, w in zip(missing, why, strict=True))
            found.append(entry)
            continue
        by_round = {(r.config, r.round): r for r in runs if r.valid}
        for metric in RATIO_METRICS:
            a, b = summaries[ours][metric], summaries[theirs][metric]
            per_round = []
            for rnd in sorted({r.round for r in runs}):
                x, y = by_round.get((ours, rnd)), by_round.get((theirs, rnd))
                if x and y and (fx := x.figure(metric)) is not None and (fy := y.figure(metric)):
                    per_round.append(fx / fy)
            entry[metric] = {
                "ratio": a["median"] / b["median"] if a and b and b["median"] else None,
                "numerator_median": a["median"] if a else None,
                "denominator_median": b["median"] if b else None,
                "per_round": per_round,
            }
        found.append(entry)
    return found


# --- report ------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _cell(stat: dict[str, float] | None, digits: int = 0) -> str:
    """ "median (min-max)"."""
    if stat is None:
        return "-"
    if stat["n"] == 1:
        return _num(stat["median"], digits)
    return f"{stat['median']:.{digits}f} ({stat['min']:.{digits}f}-{stat['max']:.{digits}f})"


def _ratio_cell(entry: dict[str, Any], metric: str) -> str:
    figures = entry.get(metric)
    if not figures or figures["ratio"] is None:
        return "-"
    digits = 0 if metric.endswith("mbps") else 2
    medians = f"{figures['numerator_median']:.{digits}f} / {figures['denominator_median']:.{digits}f}"
    text = f"**{figures['ratio']:.2f}** ({medians}"
    per_round = figures["per_round"]
    if len(per_round) > 1:
        text += f"; rounds {min(per_round):.2f}-{max(per_round):.2f}"
    return text + ")"


def headline(ratio_list: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| comparison | TCP Mbit/s | UDP Mbit/s | CPU per Mbit, TCP | CPU per Mbit, UDP |",
        "|---|---|---|---|---|",
    ]
    for entry in ratio_list:
        if "missing" in entry:
            lines.append(f"| {entry['comparison']} | not measured: {entry['missing']} | | | |")
            continue
        cells = " | ".join(_ratio_cell(entry, m) for m in RATIO_METRICS)
        lines.append(f"| {entry['comparison']} | {cells} |")
    return lines


def _path_cell(result: Iperf | None) -> str:
    if result is None:
        return "-"
    kb = {k: result.sent.get(k, 0) / 1e6 for k in ("direct", "relay", "relay_udp")}
    text = f"{kb['direct']:.0f} / {kb['relay']:.0f}"
    if result.sent.get("relay") and kb["relay_udp"] != kb["relay"]:
        text += f" ({kb['relay_udp']:.0f} UDP)"
    return text


def saturation(runs: list[Run]) -> str:
    """The lowest UDP loss of the run, and whether it means the offered rate was above every capacity."""
    losses = [(r.udp.lost_percent, r) for r in runs if r.valid and r.udp and r.udp.lost_percent is not None]
    if not losses:
        return "no valid UDP run"
    loss, run = min(losses, key=lambda item: item[0])
    where = f"{BY_KEY[run.config].label}, round {run.round}"
    if loss < SATURATION_LOSS_PERCENT:
        limit = f"{SATURATION_LOSS_PERCENT:g}%"
        return f"but the lowest loss, {loss:.1f}% ({where}), is under {limit}: such rows may be capped"
    return f"the lowest loss of the run, {loss:.1f}% ({where}), says it was"


def render(
    context: Context,
    args: argparse.Namespace,
    configs: list[Config],
    systems: dict[str, dict[str, Any]],
    summaries: dict[str, dict[str, Any]],
    ratio_list: list[dict[str, Any]],
    runs: list[Run],
    png: str | None,
) -> str:
    lines = [
        "# Throughput: traversal vs wireguard-go, tinc and n2n",
        "",
        "Generated by `bench/throughput.py` (its docstring says what is measured and how). One cone x cone",
        f"netns lab for the whole run; {args.rounds} round(s), in each every configuration once, the order rotated",
        f"from round to round; iperf3 host-a -> host-b for {args.seconds:g} s per run: one TCP stream, then UDP at",
        f"an offered {UDP_BITRATE}bit/s in {UDP_DATAGRAM}-byte datagrams, meant to be above every tunnel's capacity",
        "here, so that the delivered rate is that capacity, without an iperf3 sender that takes the CPU from",
        f"the tunnel (at 1G some tunnels carried less than half as much): {saturation(runs)}.",
        "Figures are medians over the valid rounds, (min-max) beside them. CPU per Mbit is core-milliseconds",
        "of the system's own processes (both ends and the hub/relay; not iperf3) per Mbit delivered.",
        "Other labs may share this machine: mind the load average below.",
        "",
        *context.markdown(),
        "",
        "## Headline: ratios measured in this run",
        "",
        "Each cell: the ratio of the two medians (**bold**), the medians themselves, and the range of the",
        "same ratio computed per round (both sides from the same round). Mbit/s: above 1 means ours carries",
        "more. CPU per Mbit: below 1 means ours spends less CPU per bit.",
        "",
        *headline(ratio_list),
        "",
        "## Per configuration",
        "",
        "| configuration | mode | valid rounds | TCP Mbit/s | TCP retransmits | TCP CPU ms/Mbit "
        "| UDP Mbit/s | UDP loss % | UDP CPU ms/Mbit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for config in configs:
        s = summaries[config.key]
        if s["not_measured"]:
            lines.append(f"| {config.label} | {config.mode} | not measured: {s['not_measured']} | | | | | | |")
            continue
        cells = [
            _cell(s["tcp_mbps"]),
            _cell(s["tcp_retransmits"]),
            _cell(s["tcp_cpu_ms_per_mbit"], 2),
            _cell(s["udp_mbps"]),
            _cell(s["udp_lost_percent"], 1),
            _cell(s["udp_cpu_ms_per_mbit"], 2),
        ]
        lines.append(f"| {config.label} | {config.mode} | {s['valid_rounds']}/{s['rounds']} | {' | '.join(cells)} |")
    if png:
        lines += ["", f"![median TCP and UDP Mbit/s and CPU per Mbit per configuration]({png})"]
    lines += [
        "",
        "## Start -> first ping",
        "",
        "Seconds from launching the two ends (hub or relay, keys and configuration already in place) to",
        "the first echo reply from host-b's overlay address (pings every 10 ms from host-a), over every",
        "round that got one. What each figure includes:",
        "",
        "| configuration | median (min-max) s | includes |",
        "|---|---|---|",
    ]
    for config in configs:
        s = summaries[config.key]
        figure = f"not measured: {s['not_measured']}" if s["not_measured"] else _cell(s["first_ping_s"], 3)
        lines.append(f"| {config.label} | {figure} | {FIRST_PING_INCLUDES[config.system]} |")
    lines += [
        "",
        "## Systems",
        "",
        "| system | version (Debian package / this tree) | overlay MTU | relay mode forced by | availability |",
        "|---|---|---|---|---|",
    ]
    for name, info in systems.items():
        lines.append(
            f"| {name} | {info['version']} | {info['mtu']} | {info['relay_how'] or 'no relay mode: direct only'} "
            f"| {'ok' if info['available'] is None else 'not measured: ' + info['available']} |"
        )
    lines += [
        f"| iperf3 | {vpns.package_version('iperf3') or '-'} | | | |",
        "",
        "The traversal configurations use the node's default MTU; `traversal (quic carriage)` is the same",
        "node with `--carriage quic` (the carriage before the lean one). Every configuration starts from a",
        "clean lab: no process, device, nftables table or conntrack entry of the one before it.",
        "",
        "## Every round",
        "",
        "Path: MB host-a sent to b's NAT / to the relay or hub during the run (of which over UDP, where",
        "not all), from nat-a's counters.",
        "",
        "| round | # | configuration | first ping s | TCP Mbit/s | retr | CPU s | ms/Mbit | path MB "
        "| UDP Mbit/s | loss % | CPU s | ms/Mbit | path MB | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in sorted(runs, key=lambda r: (r.round, r.position)):
        tcp, udp = run.tcp, run.udp
        cells = [
            _num(run.first_ping_s, 3),
            _num(tcp.mbps if tcp else None),
            str(tcp.retransmits) if tcp else "-",
            _num(tcp.cpu_s if tcp else None, 2),
            _num(tcp.cpu_ms_per_mbit if tcp else None, 2),
            _path_cell(tcp),
            _num(udp.mbps if udp else None),
            _num(udp.lost_percent if udp else None, 1),
            _num(udp.cpu_s if udp else None, 2),
            _num(udp.cpu_ms_per_mbit if udp else None, 2),
            _path_cell(udp),
        ]
        if run.error:
            status = "FAILED: " + " ".join(run.error.split())[:300].replace("|", "/")
        elif run.invalid:
            status = "INVALID: " + run.invalid
        else:
            status = "ok"
        if run.notes:
            status += "; " + "; ".join(run.notes)
        lines.append(f"| {run.round} | {run.position} | {BY_KEY[run.config].label} | {' | '.join(cells)} | {status} |")
    return "\n".join(lines)


def plot(configs: list[Config], summaries: dict[str, dict[str, Any]], path: Path, subtitle: str) -> None:
    """Grouped bars: median TCP and UDP Mbit/s (min-max error bars), then CPU core-ms per Mbit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 8.5), dpi=110, sharex=True)
    width = 0.38
    colours = {"tcp": "tab:blue", "udp": "tab:orange"}
    xs = list(range(len(configs)))
    panels = ((top, "mbps", "median Mbit/s (min-max)"), (bottom, "cpu_ms_per_mbit", "CPU core-ms per Mbit (min-max)"))
    for ax, metric, ylabel in panels:
        for offset, protocol in ((-width / 2, "tcp"), (width / 2, "udp")):
            for x, config in zip(xs, configs, strict=True):
                stat = summaries[config.key][f"{protocol}_{metric}"]
                if stat is None:
                    continue
                ax.bar(
                    x + offset,
                    stat["median"],
                    width,
                    yerr=[[stat["median"] - stat["min"]], [stat["max"] - stat["median"]]],
                    capsize=3,
                    color=colours[protocol],
                    alpha=0.55 if config.mode == "relay" else 0.95,
                    hatch="//" if config.mode == "relay" else None,
                    edgecolor="black",
                    linewidth=0.6,
                )
                digits = 0 if metric == "mbps" else 2
                ax.annotate(
                    f"{stat['median']:.{digits}f}",
                    (x + offset, stat["max"]),
                    textcoords="offset points",
                    xytext=(0, 2),
                    ha="center",
                    fontsize=7,
                )
        for x, config in zip(xs, configs, strict=True):
            s = summaries[config.key]
            if s[f"tcp_{metric}"] is None and s[f"udp_{metric}"] is None:
                why = "not measured" if s["not_measured"] else "no valid round"
                ax.annotate(
                    why, (x, 0), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8, rotation=90
                )
        ax.set_ylabel(ylabel)
        ax.set_xlim(-0.6, len(configs) - 0.4)
        ax.set_ylim(bottom=0)
        ax.margins(y=0.12)
        ax.grid(axis="y", alpha=0.3)
    top.set_title(f"iperf3 through each tunnel, host-a -> host-b, cone x cone netns lab\n{subtitle}", fontsize=10)
    top.legend(
        handles=[
            Patch(facecolor=colours["tcp"], edgecolor="black", label="TCP"),
            Patch(facecolor=colours["udp"], edgecolor="black", label=f"UDP (offered {UDP_BITRATE})"),
            Patch(facecolor="white", edgecolor="black", hatch="//", label="relay mode"),
        ],
        fontsize=8,
        loc="upper right",
    )
    bottom.set_xticks(xs)
    bottom.set_xticklabels([c.label for c in configs], rotation=20, ha="right", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- main --------------------------------------------------------------------------------


def select(text: str | None) -> list[Config]:
    """Configurations named by system (all its modes) or by key, in CONFIGS' order."""
    if not text:
        return list(CONFIGS)
    names = {n.strip() for n in text.split(",") if n.strip()}
    unknown = names - set(vpns.SYSTEMS) - set(BY_KEY)
    if unknown:
        choices = ", ".join([*vpns.SYSTEMS, *BY_KEY])
        raise ValueError(f"unknown system or configuration {', '.join(sorted(unknown))}: choose from {choices}")
    return [c for c in CONFIGS if c.system in names or c.key in names]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every configuration (default 3)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each iperf3 run (default 10)")
    parser.add_argument(
        "--systems",
        help="comma-separated systems (traversal, wireguard-go, tinc, n2n: all their configurations) "
        "or configuration keys (e.g. traversal-quic-direct); default: all",
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"smoke test: {QUICK_ROUNDS} round of {QUICK_SECONDS:g} s, report in /tmp"
    )
    parser.add_argument("--out", type=Path, help="Markdown report (default bench/throughput.md)")
    parser.add_argument("--json", type=Path, help="JSON figures (default bench/throughput.json)")
    parser.add_argument("--png", type=Path, help="plot (default bench/throughput.png)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds = QUICK_ROUNDS, QUICK_SECONDS
    if args.rounds < 1 or args.seconds < 1:
        parser.error("--rounds and --seconds must be at least 1")
    outdir, stem = (Path(tempfile.gettempdir()), "throughput-quick") if args.quick else (BENCH, "throughput")
    args.out = args.out or outdir / f"{stem}.md"
    args.json = args.json or outdir / f"{stem}.json"
    args.png = args.png or outdir / f"{stem}.png"
    try:
        configs = select(args.systems)
    except ValueError as exc:
        parser.error(str(exc))
    if problem := missing_prerequisites("throughput", lab_module, plots=True):
        print(problem, file=sys.stderr)
        return 1
    if error := vpns.install_packages(["iperf3", "conntrack"]):
        print(f"throughput: {error}", file=sys.stderr)
        return 1
    context = Context()
    started = time.monotonic()

    # Availability (installing packages where needed), once per configuration; versions per system.
    available: dict[str, str | None] = {}
    systems: dict[str, dict[str, Any]] = {}
    for config in configs:
        system = config.make()
        available[config.key] = system.available()
        if available[config.key]:
            print(f"{config.label}: not measured: {available[config.key]}", flush=True)
        if config.system not in systems or (systems[config.system]["available"] and not available[config.key]):
            systems[config.system] = {
                "version": system.version(),
                "mtu": system.mtu,
                "relay_how": system.relay_how,
                "modes": list(system.modes),
                "available": available[config.key],
            }
    measured = sum(available[c.key] is None for c in configs)
    estimate = args.rounds * measured * (2 * max(1, round(args.seconds)) + OVERHEAD_S)
    print(
        f"{args.rounds} round(s) x {measured} configuration(s), TCP + UDP ({UDP_BITRATE}) {args.seconds:g} s each: "
        f"about {estimate / 60:.0f} min",
        flush=True,
    )
    workdir = Path(tempfile.mkdtemp(prefix="throughput-"))
    try:
        runs = bench(configs, available, args.rounds, args.seconds, workdir)
    except lab_module.LabError as exc:
        print(f"throughput: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted; logs in {workdir}", file=sys.stderr)
        return 130
    context.finish()

    summaries = {c.key: summarize(c, runs, available[c.key]) for c in configs}
    ratio_list = ratios(summaries, runs)
    load = f"load {context.load_start:.1f} / {context.load_end:.1f}"
    subtitle = f"{context.date}, {args.rounds} round(s) x {args.seconds:g} s, {load}"
    plot(configs, summaries, args.png, subtitle)
    png = os.path.relpath(args.png, args.out.parent)
    report = render(context, args, configs, systems, summaries, ratio_list, runs, png)
    args.out.write_text(report + "\n")
    write_json(
        args.json,
        {
            **context.as_dict(),
            "parameters": {
                "rounds": args.rounds,
                "seconds": args.seconds,
                "udp_bitrate": UDP_BITRATE,
                "udp_datagram_bytes": UDP_DATAGRAM,
                "path_share": PATH_SHARE,
                "lab": "cone x cone",
            },
            "systems": systems,
            "configurations": [asdict(c) for c in configs],
            "runs": [{**asdict(r), "valid": r.valid} for r in runs],
            "summary": summaries,
            "ratios": ratio_list,
        },
    )
    bad = [r for r in runs if not r.valid]
    print(f"\nwrote {args.out}, {args.json} and {args.png} in {time.monotonic() - started:.0f} s\n")
    print("\n".join(headline(ratio_list)))
    if bad:
        print(f"\n{len(bad)} failed or invalid run(s) (see the report); logs in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
