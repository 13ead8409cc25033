"""benchmarks/bench_small.py --quick runs and writes its JSON (structure only, not timings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_small_quick(tmp_path):
    script = os.path.join(ROOT, "benchmarks", "bench_small.py")
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run(
        [sys.executable, script, "--quick", "--threads", "1", "2", "--out", str(tmp_path)],
        check=True,
        env=env,
        timeout=300,
        capture_output=True,
    )
    with open(tmp_path / "small_cost_quick.json") as f:
        r = json.load(f)
    assert {"claim", "config", "provenance", "threads"} <= set(r)
    assert {"torch", "git_revision", "threads"} <= set(r["provenance"])
    assert r["config"]["batch_size"] == 64 and "mlp" in r["config"]["model"]
    assert set(r["threads"]) == {"1", "2"}
    for entry in r["threads"].values():
        assert (
            set(entry["per_round_seconds"]) == set(entry["per_round_cpu_seconds"]) == {"train_step", "metainit", "nio"}
        )
        for k in (
            "metainit_in_train_steps",
            "nio_in_train_steps",
            "metainit_in_train_steps_cpu",
            "nio_in_train_steps_cpu",
        ):
            s = entry[k]
            assert {"median", "min", "max", "n"} <= set(s) and s["n"] == r["config"]["repeats"]
            assert 0 < s["min"] <= s["median"] <= s["max"]
        meta, nio = entry["breakdown"]["metainit"], entry["breakdown"]["nio"]
        assert set(meta["fraction"]) == {"draw", "forward", "gradient", "hvp", "quotient", "backward", "update"}
        assert set(nio["fraction"]) == {"forward", "gradients", "gram", "backward", "update"}
        assert nio["engine"] == "fused"  # the demo MLP treats examples independently
        for b in (meta, nio):
            assert abs(sum(b["fraction"].values()) - 1) < 1e-9
