"""Gather the benchmarks' JSON figures into bench/results.md: every target of issue 6, measured.

Reads what the other bench scripts wrote (``throughput.json``, ``time_to_direct.json``,
``switch.json``, ``relay_capacity.json``, ``soak.json``, ``hostile_clients.json`` in bench/) and
writes one page: each target with the figure measured against it and the verdict, then the main
tables, with links to the detailed reports and plots. Each source keeps its own date, machine,
load and command; this page repeats them per section. A missing source is reported as such, not skipped.

Run after the benchmarks (``make bench`` does): ``.venv/bin/python bench/results.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from common import BENCH, Context

SOURCES = {
    "throughput": "throughput.json",
    "time_to_direct": "time_to_direct.json",
    "switch": "switch.json",
    "relay_capacity": "relay_capacity.json",
    "soak": "soak.json",
    "hostile_clients": "hostile_clients.json",
    "mesh": "mesh.json",
    "mesh_direct": "mesh_direct.json",
}
REPORTS = {
    "throughput": "throughput.md",
    "time_to_direct": "time_to_direct.md",
    "switch": "switch.md",
    "relay_capacity": "relay_capacity.md",
    "soak": "soak.md",
    "hostile_clients": "hostile_clients.md",
    "mesh": "mesh.md",
    "mesh_direct": "mesh_direct.md",
}


def load(directory: Path) -> dict[str, dict[str, Any] | None]:
    found: dict[str, dict[str, Any] | None] = {}
    for key, name in SOURCES.items():
        path = directory / name
        found[key] = json.loads(path.read_text()) if path.exists() else None
    return found


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("**met**" if ok else "**not met**")


def _ratio(throughput: dict[str, Any], comparison: str, metric: str) -> tuple[float | None, str]:
    for entry in throughput.get("ratios", []):
        if entry["comparison"] == comparison:
            cell = entry.get(metric) or {}
            ratio = cell.get("ratio")
            if ratio is None:
                return None, "not measured"
            rounds = cell.get("per_round") or []
            spread = f"; rounds {min(rounds):.2f}-{max(rounds):.2f}" if rounds else ""
            return ratio, (
                f"{ratio:.2f} ({cell['numerator_median']:.0f} / {cell['denominator_median']:.0f} Mbit/s{spread})"
                if metric.endswith("mbps")
                else f"{ratio:.2f} ({cell['numerator_median']:.2f} / {cell['denominator_median']:.2f} ms/Mbit{spread})"
            )
    return None, "not measured"


def _pair(ttd: dict[str, Any], key: str) -> dict[str, Any] | None:
    return next((p for p in ttd.get("pairs", []) if p["pair"] == key), None)


def _seconds(value: float | None) -> str:
    return f"{value * 1000:.0f} ms" if value is not None and value < 1 else f"{value:.2f} s" if value else "-"


def targets(data: dict[str, dict[str, Any] | None]) -> list[str]:
    rows = ["| target | measured | verdict | source |", "|---|---|---|---|"]
    throughput = data["throughput"]
    if throughput:
        for comparison, metric, goal in (
            ("ours direct / wireguard-go", "tcp_mbps", "TCP direct >= wireguard-go (ratio >= 1.0)"),
            ("ours direct / wireguard-go", "udp_mbps", "UDP direct >= wireguard-go"),
            ("ours direct / tinc direct", "tcp_mbps", "TCP direct >= tinc"),
            ("ours direct / tinc direct", "udp_mbps", "UDP direct >= tinc"),
            ("ours relay / tinc relay", "tcp_mbps", "TCP relayed >= tinc relayed"),
            ("ours relay / tinc relay", "udp_mbps", "UDP relayed >= tinc relayed"),
        ):
            ratio, text = _ratio(throughput, comparison, metric)
            rows.append(f"| {goal} | {text} | {_verdict(None if ratio is None else ratio >= 1.0)} | throughput |")
        for comparison in ("ours direct / wireguard-go", "ours direct / tinc direct"):
            _, text = _ratio(throughput, comparison, "tcp_cpu_ms_per_mbit")
            rows.append(
                f"| CPU per Mbit, TCP direct, {comparison} (report; < 1: ours cheaper) | {text} | - | throughput |"
            )
    else:
        rows.append("| throughput targets | not measured (no throughput.json) | - | throughput |")
    ttd = data["time_to_direct"]
    if ttd:
        cone = _pair(ttd, "cone-cone")
        checks: list[tuple[str, str, Any]] = [
            (
                "cone-cone",
                "median <= 150 ms, p95 <= 500 ms",
                lambda p: p["to_direct_median_s"] <= 0.150 and p["to_direct_p95_s"] <= 0.500,
            ),
            ("cone-symseq", "p95 <= 2 s", lambda p: p["to_direct_p95_s"] <= 2.0),
            ("symseq-symseq", "p95 <= 2 s", lambda p: p["to_direct_p95_s"] <= 2.0),
            ("cone-cone@geo", "(report)", None),
            ("symseq-symseq@geo", "(report)", None),
        ]
        for key, goal, check in checks:
            pair = _pair(ttd, key)
            if pair is None or pair["to_direct_median_s"] is None:
                continue
            rows.append(
                f"| ESTABLISHED -> direct, {pair['label']}, {pair['runs']} runs: {goal} "
                f"| median {_seconds(pair['to_direct_median_s'])}, p95 {_seconds(pair['to_direct_p95_s'])} "
                f"| {_verdict(None if check is None else check(pair))} | time_to_direct |"
            )
        if cone and cone["relay_forwarded_bytes_median"] is not None:
            forwarded = cone["relay_forwarded_bytes_median"]
            wire = cone["relay_wire_bytes_median"]
            rows.append(
                f"| relay bytes per set-up (cone x cone, connect -> direct): <= 10 KB, aim 8 KB "
                f"| {forwarded / 1000:.1f} kB of session frames forwarded; {wire / 1000:.1f} kB "
                f"on the wire for both relay connections, login, TLS and TCP/IP headers included "
                f"| {_verdict(forwarded <= 10_000)} (forwarded) | time_to_direct |"
            )
    else:
        rows.append("| time-to-direct targets | not measured (no time_to_direct.json) | - | time_to_direct |")
    switch = data["switch"]
    if switch:
        rows.append(
            f"| overlay RTT before -> after the switch, seed geography (expect ~80 -> ~30 ms) "
            f"| {switch['relay_rtt_ms']['median']:.1f} -> {switch['direct_rtt_ms']['median']:.1f} ms (medians of "
            f"{switch['runs']} runs); {switch['echo_requests']} echo requests across the switch, "
            f"{switch['lost']} lost, {switch['duplicated']} duplicated "
            f"| {_verdict(switch['lost'] == 0)} (no loss) | switch |"
        )
    capacity = data["relay_capacity"]
    if capacity:
        rows.extend(capacity_rows(capacity))
    else:
        rows.append("| relay capacity | not measured (no relay_capacity.json) | - | relay_capacity |")
    soak = data.get("soak")
    rows.extend(soak_rows(soak) if soak else ["| soak | not measured (no soak.json) | - | soak |"])
    return rows


def capacity_rows(capacity: dict[str, Any]) -> list[str]:
    headline = capacity.get("headline", {})
    held = headline.get("clients_held")
    rows = [
        f"| idle authenticated clients per relay process (aim 10,000) | {held if held is not None else '-'} held, "
        f"{headline.get('kib_per_client', 0):.0f} KiB each | {_verdict(None if held is None else held >= 10_000)} "
        f"| relay_capacity |"
    ]
    if headline.get("setups_per_s") is not None:
        rows.append(
            f"| session set-ups per second, one relay (report) | {headline['setups_per_s']:.0f}/s, relay CPU "
            f"{headline.get('relay_cpu_ms_per_setup', 0):.1f} ms per set-up | - | relay_capacity |"
        )
    return rows


def soak_rows(soak: dict[str, Any]) -> list[str]:
    """The soak's verdict (bench/soak.py): data intact, no stuck session, memory within its bound."""
    figures = soak.get("summary", {})
    config = soak.get("config", {})
    failed = [c["check"] for c in figures.get("checks", []) if not c["ok"]]
    growth = ", ".join(f"{n} {m['growth_after_warmup_mib']:+.1f}" for n, m in figures.get("memory", {}).items())
    fall_back, back = figures.get("fall_back_s", {}), figures.get("return_to_direct_s", {})
    tcp = soak.get("tcp", {})
    intact = tcp.get("sent", {}).get("sha256") == tcp.get("received", {}).get("sha256")
    return [
        f"| soak, {config.get('duration_s', 0) / 60:.0f} min of traffic with the direct path cut every "
        f"{config.get('cut_every_s', 0):g} s: data intact, no stuck session, RSS growth < "
        f"{config.get('rss_bound_mib', 0):g} MiB per process | {figures.get('cuts', 0)} cuts, "
        f"{figures.get('cuts_stuck', 0)} stuck; fall-back median {_seconds(fall_back.get('median'))} "
        f"(max {_seconds(fall_back.get('max'))}), back on direct median {_seconds(back.get('median'))} "
        f"(max {_seconds(back.get('max'))}); TCP {tcp.get('received', {}).get('bytes', 0) / 2**20:.0f} MiB, "
        f"SHA-256 {'equal' if intact else 'different'}; RSS growth MiB: {growth}"
        f"{'; failed: ' + '; '.join(failed) if failed else ''} | {_verdict(figures.get('passed'))} | soak |"
    ]


def soak_lines(soak: dict[str, Any]) -> list[str]:
    """A few lines on the soak: per-cut times and losses, and each process's memory."""
    figures = soak.get("summary", {})
    lines = [
        "| per cut | median | max |",
        "|---|---|---|",
    ]
    for key, label in (
        ("fall_back_s", "cut -> fall-back to the relay (s)"),
        ("return_to_direct_s", "rule lifted -> back on direct (s)"),
        ("ping_lost_per_cut", "pings lost (every 0.2 s)"),
        ("tcp_stall_per_cut_s", "longest TCP delivery pause (s)"),
    ):
        cell = figures.get(key, {})
        lines.append(f"| {label} | {cell.get('median', '-')} | {cell.get('max', '-')} |")
    lines += ["", "| process | RSS start | max | end | growth after warm-up |", "|---|---|---|---|---|"]
    for name, m in figures.get("memory", {}).items():
        lines.append(
            f"| {name} | {m['rss_start_mib']} MiB | {m['rss_max_mib']} MiB | {m['rss_end_mib']} MiB "
            f"| {m['growth_after_warmup_mib']:+.1f} MiB |"
        )
    forwarded = figures.get("relay_forwarded_bytes")
    if forwarded is not None:
        lines += ["", f"The relay forwarded {forwarded / 1e6:.1f} MB during the soak (the traffic of the fall-backs)."]
    return lines


def first_ping_rows(throughput: dict[str, Any]) -> list[str]:
    rows = ["| configuration | start -> first ping, median (min-max) |", "|---|---|"]
    for key, entry in throughput.get("summary", {}).items():
        ping = entry.get("first_ping_s") or {}
        if ping.get("median") is None:
            rows.append(f"| {entry.get('label', key)} | {entry.get('not_measured') or '-'} |")
            continue
        rows.append(f"| {entry['label']} | {ping['median']:.3f} s ({ping['min']:.3f}-{ping['max']:.3f}) |")
    return rows


def throughput_rows(throughput: dict[str, Any]) -> list[str]:
    rows = [
        "| configuration | TCP Mbit/s | TCP CPU ms/Mbit | UDP Mbit/s | UDP loss % | UDP CPU ms/Mbit |",
        "|---|---|---|---|---|---|",
    ]

    def cell(entry: dict[str, Any], name: str, fmt: str) -> str:
        figure = entry.get(name) or {}
        if figure.get("median") is None:
            return "-"
        return f"{format(figure['median'], fmt)} ({format(figure['min'], fmt)}-{format(figure['max'], fmt)})"

    for key, entry in throughput.get("summary", {}).items():
        if entry.get("not_measured"):
            rows.append(f"| {entry.get('label', key)} | {entry['not_measured']} | | | | |")
            continue
        rows.append(
            f"| {entry['label']} | {cell(entry, 'tcp_mbps', '.0f')} | {cell(entry, 'tcp_cpu_ms_per_mbit', '.2f')} "
            f"| {cell(entry, 'udp_mbps', '.0f')} | {cell(entry, 'udp_lost_percent', '.1f')} "
            f"| {cell(entry, 'udp_cpu_ms_per_mbit', '.2f')} |"
        )
    return rows


def time_to_direct_rows(ttd: dict[str, Any]) -> list[str]:
    rows = [
        "| pair (a x b) | direct runs | ESTABLISHED -> direct: median | p95 | start -> first ping: median "
        "| relay kB forwarded | relay kB on the wire |",
        "|---|---|---|---|---|---|---|",
    ]
    for pair in ttd.get("pairs", []):
        forwarded = pair.get("relay_forwarded_bytes_median")
        wire = pair.get("relay_wire_bytes_median")
        rows.append(
            f"| {pair['label']} | {pair['direct_runs']}/{pair['runs']} | {_seconds(pair['to_direct_median_s'])} "
            f"| {_seconds(pair['to_direct_p95_s'])} | {_seconds(pair['first_ping_median_s'])} "
            f"| {forwarded / 1000 if forwarded is not None else '-'} | {wire / 1000 if wire is not None else '-'} |"
        )
    return rows


def _provenance(source: dict[str, Any] | None, name: str) -> str:
    if source is None:
        return f"_not run: no bench/{SOURCES[name]}_"
    load = source.get("load") or ["?", "?"]
    return (
        f"_{source.get('date', '?')}; {source.get('machine', '?')}; load {load[0]} / {load[-1]}; "
        f"`{source.get('command', '?')}`; details: [{REPORTS[name]}]({REPORTS[name]})_"
    )


def render(data: dict[str, dict[str, Any] | None], context: Context) -> str:
    lines = [
        "# Benchmark results",
        "",
        "Every target of issue 6 next to what was measured, then the main tables. Generated by",
        "`bench/results.py` from the JSON the benchmarks wrote; each section names its own run (date,",
        "machine, load average, exact command). The machine is small and noisy (2 cores, shared), so",
        "comparisons are made side by side in one run, as medians over rounds and as ratios.",
        "",
        *context.markdown(),
        "",
        "## Targets",
        "",
        *targets(data),
        "",
    ]
    throughput = data["throughput"]
    lines += ["## Throughput through the overlay (iperf3, cone x cone)", "", _provenance(throughput, "throughput"), ""]
    if throughput:
        lines += [*throughput_rows(throughput), "", "![throughput per configuration](throughput.png)", ""]
        lines += ["### Start -> first overlay ping", "", *first_ping_rows(throughput), ""]
        lines += [
            "Ours includes the Python interpreter's start-up and imports (about 0.35 s), the TLS login to",
            "the relay and the end-to-end hybrid post-quantum handshake through it; the first ping",
            "goes through the relay. See throughput.md for what each system's figure includes.",
            "",
        ]
    ttd = data["time_to_direct"]
    lines += ["## Time to direct and relay bytes per set-up", "", _provenance(ttd, "time_to_direct"), ""]
    if ttd:
        lines += [*time_to_direct_rows(ttd), ""]
    switch = data["switch"]
    lines += ["## The relay -> direct switch, seed geography", "", _provenance(switch, "switch"), ""]
    if switch:
        lines += ["![RTT per echo request through the switch](switch_rtt.png)", ""]
    capacity = data["relay_capacity"]
    lines += ["## Relay capacity", "", _provenance(capacity, "relay_capacity"), ""]
    if capacity:
        lines += [*capacity.get("summary_markdown", []), ""]
    soak = data.get("soak")
    lines += ["## Soak: traffic with the direct path cut at random", "", _provenance(soak, "soak"), ""]
    if soak:
        lines += [*soak_lines(soak), ""]
    hostile = data.get("hostile_clients")
    lines += ["## The relay under hostile clients", "", _provenance(hostile, "hostile_clients"), ""]
    if hostile:
        lines += [*hostile.get("summary_markdown", []), ""]
    mesh = data.get("mesh")
    lines += ["## Full mesh: 16 peers on one network", "", _provenance(mesh, "mesh"), ""]
    if mesh:
        lines += [*mesh.get("summary_markdown", []), ""]
    mesh_direct = data.get("mesh_direct")
    lines += ["## Full mesh where every pair can go direct", "", _provenance(mesh_direct, "mesh_direct"), ""]
    if mesh_direct:
        lines += [line.replace("(mesh.png)", "(mesh_direct.png)") for line in mesh_direct.get("summary_markdown", [])]
        lines += [""]
    lines += [
        "## Reproduce",
        "",
        "`make bench` (root; installs iperf3, wireguard-go, tinc and n2n from Debian if missing) runs",
        "`bench/throughput.py`, `bench/time_to_direct.py`, `bench/switch.py`, `bench/relay_capacity.py`,",
        "`bench/soak.py`, `bench/hostile_clients.py` and `bench/mesh.py` (twice: every NAT profile, and `--sites` "
        "of NATs that all allow direct paths), then this script.",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=BENCH, help="where the JSON files are (default bench/)")
    parser.add_argument("--out", type=Path, default=BENCH / "results.md")
    args = parser.parse_args()
    data = load(args.dir)
    if not any(data.values()):
        print(f"results: no benchmark JSON in {args.dir}: run `make bench` first", file=sys.stderr)
        return 1
    context = Context()
    context.finish()
    args.out.write_text(render(data, context) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
