"""The GradInit cost benchmark runs in its small version and writes what the README table reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_gradinit_quick(tmp_path):
    out = tmp_path / "gradinit_cost.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gradinit.py"), "--quick", "--out", str(out)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    d = json.loads(out.read_text())
    entry = d["models"]["tiny_mlp"]
    for key in ("objective_iteration_in_train_steps", "constraint_iteration_in_train_steps"):
        assert entry[key]["median"] > 0
    assert all(v > 0 for v in entry["memory"]["peak_kib_median"].values())  # PyTorch-allocator live bytes
    assert d["provenance"]["torch"]


def test_readme_tables_match_committed_results():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "readme_tables.py"), "--check"], capture_output=True)
    assert r.returncode == 0, r.stdout
