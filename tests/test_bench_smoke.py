"""Every benchmark runs in the suite with tiny counts, so the harness cannot
rot.  The figures themselves are `make bench`'s business, not asserted here."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.root
def test_reaction_benchmark_runs(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "reaction.py"),
                           "--flaps", "3", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "reaction.json").read_text())
    for key in ("appear", "disappear"):
        assert result[key]["n"] == 3 and result[key]["p50_ms"] > 0
    assert "| tunnel appears → map | 3 |" in proc.stdout
    assert (tmp_path / "reaction.md").read_text().startswith("# Reaction time")
