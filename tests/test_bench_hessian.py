"""The Hessian benchmarks run in their small versions and write the keys the README reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, out: Path) -> dict:
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return json.loads(out.read_text())


def test_bench_hessian_quick(tmp_path):
    d = _run("bench_hessian.py", tmp_path / "hessian_cost.json")
    lp = d["lanczos_vs_power"]
    assert lp["lanczos_products"]["mean"] > 0 and lp["power_products"]["mean"] > 0
    assert all(r["reference_eigenvalue"] != 0 for r in lp["runs"])
    hc = d["hvp_cost"]
    for k in ("double_backward", "forward_over_reverse", "reuse"):
        assert hc[f"{k}_in_gradients"]["median"] > 0
    assert d["provenance"]["torch"] and d["config"]["quick"]


def test_hessian_tracking_quick(tmp_path):
    out = tmp_path / "hessian_tracking.json"
    d = _run("hessian_tracking.py", out)
    assert set(d["summary"]) == {"1e-05", "0.01", "1"}
    run = d["runs"][0]
    s = run["series"]["layer1"]
    assert len(s["step"]) == len(s["spectral"]) == len(s["frobenius"]) > 1
    assert all(v > 0 for v in s["spectral"])
    assert d["finding"] and out.with_suffix(".png").stat().st_size > 1000
