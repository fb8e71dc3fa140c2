"""What every benchmark script shares: the lab modules, statistics, and the report's header.

Every report says when it was made, on what machine, under what load, and by which exact
command, because these machines are noisy and a figure without its context means little.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import math
import os
import platform
import shlex
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"


def load_netns_module(name: str) -> ModuleType:
    """netns-lab/NAME.py (the directory's dash keeps it from being a package)."""
    module_name = f"netns_lab_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, REPO / "netns-lab" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def p95(values: Sequence[float]) -> float:
    """Nearest-rank 95th percentile (with 10 runs, the largest value; with 20, the 19th)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def cpu_model() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine() -> str:
    """One line: cores, CPU model, kernel, Python."""
    return (
        f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu_model()}, "
        f"Linux {platform.release()}, Python {platform.python_version()}"
    )


def command_line() -> str:
    """How this script was run, with the interpreter relative to the repository when it is inside."""
    executable = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable
    return shlex.join([executable, *sys.argv])


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


class BenchError(Exception):
    """A run could not be measured; the message says which and where its logs are."""


class Context:
    """Date, machine, command and the load average at start and end of one benchmark run."""

    def __init__(self) -> None:
        self.date = utc_now()
        self.machine = machine()
        self.command = command_line()
        self.load_start = os.getloadavg()[0]
        self.load_end = self.load_start

    def finish(self) -> None:
        self.load_end = os.getloadavg()[0]

    def markdown(self) -> list[str]:
        return [
            f"- date: {self.date}",
            f"- machine: {self.machine}",
            f"- load average (1 min) at start / end: {self.load_start:.2f} / {self.load_end:.2f}",
            f"- command: `{self.command}`",
        ]

    def as_dict(self) -> dict[str, Any]:
        return {
            "date": self.date,
            "machine": self.machine,
            "command": self.command,
            "load": [round(self.load_start, 2), round(self.load_end, 2)],
        }


def missing_prerequisites(script: str, lab_module: ModuleType, *, plots: bool) -> str | None:
    """Why ``script`` cannot run here (no matplotlib for its plots, the lab's tools or root missing), or None."""
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return f"{script}: the plots need matplotlib: .venv/bin/pip install -e '.[bench]'"
    try:
        lab_module.check_prerequisites()
    except lab_module.LabError as exc:
        return f"{script}: {exc}"
    return None


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2) + "\n")
