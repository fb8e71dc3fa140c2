"""The fuzz targets (fuzz/targets.py): the kept corpus passes, and a short coverage-guided pass
of each target with atheris finds nothing (``make fuzz`` runs the long one)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fuzz.targets import TARGETS

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "fuzz" / "corpus"
#: Seconds of fuzzing per target in the test suite (CI); `make fuzz` runs FUZZ_SECONDS each.
SHORT_PASS_S = 2


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_the_kept_corpus_passes(name: str) -> None:
    files = sorted((CORPUS / name).iterdir())
    assert files, f"no corpus for {name} in {CORPUS / name}"
    for path in files:
        TARGETS[name](path.read_bytes())  # only the parser's own errors, caught inside the target


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_a_short_coverage_guided_pass_finds_nothing(name: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris is in the test extras: pip install -e '.[test]'")
    # New inputs go to tmp_path (the first directory); the kept corpus is only read.
    argv = [sys.executable, str(REPO / "fuzz" / "run.py"), name, str(tmp_path), str(CORPUS / name)]
    argv += [f"-max_total_time={SHORT_PASS_S}", f"-artifact_prefix={tmp_path}/"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Done " in proc.stderr, proc.stderr[-3000:]
