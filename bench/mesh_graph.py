"""Draw a mesh of traversal nodes with each pair's path, from the nodes' ``traversal status --json``.

Each node is a dot on a circle (coloured by the NAT in front of it when that is known), the relay
sits in the middle; a pair whose both ends say direct is a solid line, a relayed pair a dashed
curve bowed towards the relay, and a pair whose ends disagree (or where one end does not list
the other) a dotted red line. Used by bench/mesh.py; runs alone too, so anyone can redraw it:

    .venv/bin/python bench/mesh_graph.py --from-bench bench/mesh.json --out bench/mesh.png
    .venv/bin/python bench/mesh_graph.py a.json b.json c.json --out mesh.png   # status --json files

Needs matplotlib (``.venv/bin/pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Line style per pair path: colour, line style, width.
PATH_STYLE = {
    "direct": ("#1a9850", "-", 2.0),
    "relay": ("#8c8c8c", "--", 0.9),
    "mixed": ("#d73027", ":", 1.6),
    #: Relayed although the direct-path matrix predicts direct (when the caller knows predictions).
    "relay, predicted direct": ("#c51b7d", "--", 1.8),
}
#: Dot colour per NAT profile (netns-lab/lab.py's names); unknown profiles are grey.
PROFILE_COLOURS = {
    "public": "#4575b4",
    "fullcone": "#74add1",
    "cone": "#abd9e9",
    "double": "#e0f3f8",
    "symseq": "#fdae61",
    "symrand": "#f46d43",
    "udpblock": "#a50026",
}


@dataclass(frozen=True)
class NodeLabel:
    """How to show one node: its name (p3), and where known its site and NAT profile."""

    name: str
    site: str | None = None
    profile: str | None = None


def entry_for(status: Mapping[str, Any] | None, identity: str) -> dict[str, Any] | None:
    """``status``'s peer entry for ``identity`` (established or not), or None."""
    for peer in (status or {}).get("peers", []):
        if peer.get("identity") == identity:
            return dict(peer)
    return None


def pair_path(mine: Mapping[str, Any] | None, theirs: Mapping[str, Any] | None) -> str:
    """What a picture shows for a pair: "direct" when both ends are direct both ways, "relay" when
    both are on the relay, otherwise "mixed" (the ends disagree, or one does not list the other)."""
    if mine is None or theirs is None:
        return "mixed"
    if any(e.get("state") != "established" for e in (mine, theirs)):
        return "mixed"
    routes = {(e.get("path"), e.get("peer_path")) for e in (mine, theirs)}
    if routes == {("direct", "direct")}:
        return "direct"
    if routes == {("relay", "relay")}:
        return "relay"
    return "mixed"


def pair_decided(mine: Mapping[str, Any] | None, theirs: Mapping[str, Any] | None) -> str | None:
    """A pair's settled path: "direct" (both ends direct both ways), "relay" (both ends on the relay
    after a failed direct attempt, or with direct paths off), or None while it is being decided."""
    path = pair_path(mine, theirs)
    if path == "direct":
        return path
    if path != "relay":
        return None
    for entry in (mine, theirs):
        direct = (entry or {}).get("direct")
        if direct is not None and not (direct.get("state") == "relay" and direct.get("last_error")):
            return None
    return "relay"


def pair_paths(statuses: Mapping[str, Mapping[str, Any]]) -> dict[tuple[str, str], str]:
    """Per pair of node names (in the mapping's order), the path :func:`pair_path` shows."""
    names = list(statuses)
    identity = {name: statuses[name].get("identity") for name in names}
    paths = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            mine, theirs = entry_for(statuses[a], identity[b]), entry_for(statuses[b], identity[a])
            paths[(a, b)] = pair_path(mine, theirs)
    return paths


def draw(
    statuses: Mapping[str, Mapping[str, Any]],
    out: Path,
    *,
    labels: Mapping[str, NodeLabel] | None = None,
    title: str | None = None,
    predicted_direct: set[tuple[str, str]] | None = None,
) -> dict[str, int]:
    """Draw ``statuses`` (node name -> status JSON, in the order to place them) to ``out`` (PNG);
    returns how many pairs are on each path. Relayed pairs in ``predicted_direct`` (name pairs, in
    placing order) get a style of their own: the matrix says they should have gone direct."""
    import matplotlib

    matplotlib.use("Agg")
    import math

    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import PathPatch
    from matplotlib.path import Path as MplPath

    names = list(statuses)
    labels = labels or {}
    paths = pair_paths(statuses)
    for pair in predicted_direct or set():
        if paths.get(pair) == "relay":
            paths[pair] = "relay, predicted direct"
    count = {kind: sum(p == kind for p in paths.values()) for kind in PATH_STYLE}
    angle = {name: math.pi / 2 - 2 * math.pi * i / max(1, len(names)) for i, name in enumerate(names)}
    where = {name: (math.cos(a), math.sin(a)) for name, a in angle.items()}

    fig, ax = plt.subplots(figsize=(9, 9))
    # Relayed pairs first (underneath), then mixed, then direct on top.
    for kind in ("relay", "relay, predicted direct", "mixed", "direct"):
        colour, style, width = PATH_STYLE[kind]
        for (a, b), path in paths.items():
            if path != kind:
                continue
            (xa, ya), (xb, yb) = where[a], where[b]
            if kind.startswith("relay"):
                # A quadratic curve through a control point near the centre: "via the relay".
                control = (0.15 * (xa + xb), 0.15 * (ya + yb))
                curve = MplPath([(xa, ya), control, (xb, yb)], [MplPath.MOVETO, MplPath.CURVE3, MplPath.CURVE3])
                ax.add_patch(PathPatch(curve, fill=False, edgecolor=colour, linestyle=style, linewidth=width))
            else:
                ax.plot([xa, xb], [ya, yb], color=colour, linestyle=style, linewidth=width, zorder=2)
    ax.scatter([0], [0], marker="s", s=500, color="#333333", zorder=5)
    ax.annotate(
        "relay", (0, 0), xytext=(0, -24), textcoords="offset points", ha="center", fontsize=10, zorder=6,
        bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none", "alpha": 0.85},
    )  # fmt: skip
    for name in names:
        label = labels.get(name, NodeLabel(name))
        status = statuses[name]
        relay_state = (status.get("relay") or {}).get("state", "?")
        x, y = where[name]
        colour = PROFILE_COLOURS.get(label.profile or "", "#cccccc")
        edge = "#000000" if relay_state == "connected" else "#bbbbbb"
        ax.scatter([x], [y], s=420, color=colour, edgecolors=edge, linewidths=1.5, zorder=4)
        text = name if label.profile is None else f"{name}\n{label.profile}" + (f" {label.site}" if label.site else "")
        ax.annotate(text, (x * 1.22, y * 1.22), ha="center", va="center", fontsize=9)
    handles = [
        Line2D([], [], color=PATH_STYLE["direct"][0], linestyle="-", linewidth=2, label=f"direct ({count['direct']})"),
        Line2D([], [], color=PATH_STYLE["relay"][0], linestyle="--", label=f"via the relay ({count['relay']})"),
    ]
    off = count["relay, predicted direct"]
    if off:
        colour = PATH_STYLE["relay, predicted direct"][0]
        label = f"via the relay, the matrix predicts direct ({off})"
        handles.append(Line2D([], [], color=colour, linestyle="--", linewidth=1.8, label=label))
    if count["mixed"]:
        handles.append(
            Line2D([], [], color=PATH_STYLE["mixed"][0], linestyle=":", label=f"ends disagree ({count['mixed']})")
        )
    profiles = [p for p in PROFILE_COLOURS if any((labels.get(n) or NodeLabel(n)).profile == p for n in names)]
    handles += [
        Line2D([], [], marker="o", linestyle="", markersize=10, color=PROFILE_COLOURS[p], label=f"behind {p}")
        for p in profiles
    ]
    handles.append(
        Line2D([], [], marker="o", linestyle="", markersize=10, color="#ffffff", markeredgecolor="#000000",
               label="black rim: holds a relay connection")
    )  # fmt: skip
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9, frameon=False)
    ax.set_xlim(-1.4, 1.4)
    ax.set_ylim(-1.4, 1.4)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title or f"{len(names)} nodes, {len(paths)} pairs: path per pair from `traversal status --json`")
    fig.savefig(out, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return count


@dataclass(frozen=True)
class BenchMesh:
    """What bench/mesh.json holds for a picture."""

    statuses: dict[str, dict[str, Any]]
    labels: dict[str, NodeLabel]
    title: str
    predicted_direct: set[tuple[str, str]]


def from_bench(path: Path) -> BenchMesh:
    """The statuses, labels, title and the pairs the matrix predicts direct, from bench/mesh.json."""
    document = json.loads(path.read_text())
    peers = document["peers"]
    labels = {name: NodeLabel(name, info.get("site"), info.get("profile")) for name, info in peers.items()}
    title = f"{len(peers)} peers on one network ({document.get('date', '?')}): path per pair"
    predicted = {(p["a"], p["b"]) for p in document.get("pairs", []) if p.get("predicted") == "direct"}
    return BenchMesh({name: document["statuses"][name] for name in peers}, labels, title, predicted)


def from_files(paths: Sequence[Path]) -> dict[str, dict[str, Any]]:
    """``traversal status --json`` outputs, named by overlay address (or file name)."""
    statuses = {}
    for path in paths:
        status = json.loads(path.read_text())
        name = ((status.get("tap") or {}).get("address") or path.stem).split("/")[0]
        statuses[name] = status
    return statuses


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("status", nargs="*", type=Path, help="`traversal status --json` outputs, one per node")
    parser.add_argument("--from-bench", type=Path, help="bench/mesh.json (its saved statuses and NAT profiles)")
    parser.add_argument("--out", type=Path, default=Path("mesh.png"), help="PNG to write (default mesh.png)")
    args = parser.parse_args(argv)
    if bool(args.status) == bool(args.from_bench):
        parser.error("give either status JSON files or --from-bench")
    try:
        if args.from_bench:
            mesh = from_bench(args.from_bench)
            count = draw(
                mesh.statuses, args.out, labels=mesh.labels, title=mesh.title, predicted_direct=mesh.predicted_direct
            )
        else:
            count = draw(from_files(args.status), args.out)
    except (OSError, ValueError, KeyError) as exc:
        print(f"mesh_graph: {exc}", file=sys.stderr)
        return 1
    except ImportError:
        print("mesh_graph: needs matplotlib: .venv/bin/pip install -e '.[bench]'", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: " + ", ".join(f"{n} {kind}" for kind, n in count.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
