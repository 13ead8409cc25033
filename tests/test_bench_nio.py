"""The NIO / GradCosine cost benchmark runs in its small version and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_nio_quick(tmp_path):
    out = tmp_path / "nio_cost.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_nio.py"), "--quick", "--out", str(out)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    d = json.loads(out.read_text())
    for name in ("tiny_mlp", "tiny_cnn"):
        e = d["sample_wise"][name]
        assert e["speedup_initopt_vs_loop"]["median"] > 0 and e["speedup_vmap_vs_loop"]["median"] > 0
        assert e["equality"]["float64"]["abs_diff_gc_initopt"] < 1e-10
        assert e["equality"]["float32"]["abs_diff_gc_initopt"] < 1e-5
    e = d["nio"]["tiny_cnn"]
    for key in ("nio_d2", "nio_d4", "nio_d2_plain", "nio_d4_plain"):
        assert e[f"{key}_in_train_steps"]["median"] > 0
    assert all(v > 0 for v in e["memory"]["peak_kib_median"].values())  # PyTorch-allocator live bytes
    assert "nio_d2_in_train_steps" in e["memory"]
    assert d["provenance"]["torch"] and (tmp_path / "nio_cost.png").exists()
