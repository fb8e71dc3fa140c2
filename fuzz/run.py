"""Coverage-guided fuzzing of one target with atheris (libFuzzer): ``fuzz/run.py TARGET [libFuzzer args]``.

``make fuzz`` runs every target for FUZZ_SECONDS over its corpus in fuzz/corpus/TARGET (new
inputs that reach new code are added there). A crash stops the run and leaves the input in
crash-*; reproduce it with ``fuzz/run.py TARGET crash-...``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

with atheris.instrument_imports(include=["transport", "traversal", "relay_server"]):
    from fuzz.targets import TARGETS


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        names = ",".join(TARGETS)
        sys.exit(f"usage: fuzz/run.py {{{names}}} [libFuzzer arguments, e.g. CORPUS_DIR -max_total_time=60]")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
