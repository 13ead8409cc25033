"""The soak benchmark (benchmarks/soak.py) runs in its quick version and finds nothing left
behind; its per-call checks do see state a call leaves behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

import initopt
from initopt import ConfigError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import soak  # noqa: E402
from zoo_cases import MODEL_CASES  # noqa: E402


def test_soak_quick(tmp_path):
    out = tmp_path / "soak.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--quick", "--out", str(out)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    d = json.loads(out.read_text())
    assert d["config"]["quick"] and d["provenance"]["torch"]
    assert len(d["config"]["method_cases"]) == 2 and len(d["config"]["models"]) == 2
    assert len(d["rounds"]) == 1
    mem = d["rounds"][0]["memory"]
    assert mem["rss_mib"] > 0 and mem["hwm_mib"] >= mem["rss_mib"] - 1
    assert mem["live_tensors"] >= 0 and mem["live_modules"] >= 0
    assert d["memory_verdict"]["stable"] is None and d["memory_verdict"]["rule"]
    calls = d["calls"]
    assert len(calls) == d["counts"]["calls"] == 2 * 2 * len(d["config"]["variants"])
    for c in calls:
        assert {"method", "model", "seed", "steps", "seconds", "outcome"} <= set(c)
        assert c["outcome"] in ("ok", "InitOptError", "failure")
        assert c["outcome"] == "ok" or c["message"]
    assert d["violations"] == [] and d["failures"] == []
    assert d["verdict"] == {"no_violations": True, "no_failures": True, "memory_stable": None, "passed": True}


def test_soak_checks_see_left_behind_state(monkeypatch):
    case = next(c for c in MODEL_CASES if c.name == "mlp")

    def leaky(model, data, method, **kw):
        model.register_forward_hook(lambda *a: None)
        next(model.modules()).training = False
        p = next(model.parameters())
        p.grad = torch.ones_like(p)
        torch.rand(1)  # consumes the global RNG
        torch.set_grad_enabled(False)

    monkeypatch.setattr(initopt, "initialize_", leaky)
    rec = soak.run_one("kaiming", {}, 1, case, seed=0, round_index=0)
    assert torch.is_grad_enabled()  # restored for the calls that follow
    v = " | ".join(rec["violations"])
    for needle in ("module hooks changed", "training flags", ".grad of", "RNG", "grad_enabled"):
        assert needle in v, (needle, v)

    def refuses(*a, **kw):
        raise ConfigError("not for this model")

    def crashes(*a, **kw):
        raise ValueError("bug")

    monkeypatch.setattr(initopt, "initialize_", refuses)
    rec = soak.run_one("kaiming", {}, 1, case, seed=0, round_index=0)
    assert rec["outcome"] == "InitOptError" and "not for this model" in rec["message"] and "violations" not in rec
    monkeypatch.setattr(initopt, "initialize_", crashes)
    assert soak.run_one("kaiming", {}, 1, case, seed=0, round_index=0)["outcome"] == "failure"
