"""benchmarks/bench_metainit.py --quick runs and writes its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_metainit_quick(tmp_path):
    script = os.path.join(ROOT, "benchmarks", "bench_metainit.py")
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, script, "--quick", "--out", str(tmp_path)], check=True, env=env, timeout=300)
    with open(tmp_path / "metainit_cost_quick.json") as f:
        r = json.load(f)
    keys = {"claim", "config", "provenance", "timing", "breakdown", "flops_in_forward_passes", "hvp", "memory"}
    assert keys <= set(r)
    assert {"torch", "git_revision", "threads"} <= set(r["provenance"])
    for clock in ("wall", "cpu"):
        for k in ("train_step", "metainit", "metainit_plain"):
            assert {"mean", "std", "median"} <= set(r["timing"][clock]["x_train_step"][k])
    assert set(r["breakdown"]["fraction"]) == {"draw", "forward", "gradient", "hvp", "quotient", "backward", "update"}
    assert abs(sum(r["breakdown"]["fraction"].values()) - 1) < 1e-9
    # Euler's identity removes weight-gradient kernels from the last backward pass
    flops = r["flops_in_forward_passes"]
    assert flops["metainit"] < flops["metainit_plain"]
    assert r["memory"]["x_train_step"]["metainit"] > 0
    assert (tmp_path / "metainit_cost_quick.png").exists()
