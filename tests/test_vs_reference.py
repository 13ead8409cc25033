"""The side-by-side runner against the papers' code, with stand-ins for the upstream modules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STANDIN = Path(__file__).resolve().parent / "standin_reference"


@pytest.mark.parametrize("method", ["gradinit", "metainit"])
def test_vs_reference_quick_with_standin(tmp_path, method):
    out = tmp_path / f"{method}.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "vs_reference.py"), method, "--reference", str(STANDIN)]
    cmd += ["--quick", "--rounds", "2", "--iters", "2", "--threads", "1", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    d = json.loads(out.read_text())
    assert d["config"]["model"] == "cnn(8, 16)" and d["config"]["rounds"] == 2
    res = d["threads"]["1"]
    ratio = res["ratio"]["wall"]["objective"] if method == "gradinit" else res["ratio"]["wall"]
    assert ratio["n"] == 2 and len(ratio["per_round"]) == 2 and ratio["min"] <= ratio["median"] <= ratio["max"]
    assert isinstance(res["meets_target"], bool)
    assert all(v > 0 for v in ratio["per_round"])
    if method == "gradinit":
        # every natural run counted its constraint iterations, for both codes
        assert {len(v) for v in res["constraint_iterations_in_natural_runs"].values()} == {2}
        assert set(res["in_train_steps"]) == {"ours_objective", "ref_objective", "ours_natural", "ref_natural"}
    assert not list(tmp_path.glob("*.pth"))  # the reference's checkpoint was not written


def test_vs_reference_rejects_a_path_without_the_module(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "vs_reference.py"), "gradinit", "--reference", str(tmp_path)]
    cmd += ["--quick", "--rounds", "1", "--iters", "1", "--threads", "1", "--out", str(tmp_path / "x.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "has no gradinit_utils.py" in proc.stdout + proc.stderr
