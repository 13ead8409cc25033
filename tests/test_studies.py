"""The claims-study harness (benchmarks/studies.py) and the small versions of its studies."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import studies  # noqa: E402

VERDICTS = {"supported", "not supported", "inconclusive"}


def _run(seed: int, init: str, acc: float, threads: int = 1, start: str = "default") -> dict:
    return {"seed": seed, "init": init, "start": start, "threads": threads, "final_test_acc": acc}


def test_paired_is_the_per_seed_difference():
    runs = [_run(s, "a", a) for s, a in enumerate([0.5, 0.6, 0.7])]
    runs += [_run(s, "b", b) for s, b in enumerate([0.4, 0.65, 0.5])]
    runs += [_run(9, "a", 0.9)]  # no partner: not counted
    p = studies.paired(runs, ("default", "a"), ("default", "b"))
    diffs = [0.1, -0.05, 0.2]
    assert p["n"] == 3 and p["wins"] == 2
    assert p["diffs"] == pytest.approx(diffs)
    mean = sum(diffs) / 3
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    assert p["mean"] == pytest.approx(mean) and p["std"] == pytest.approx(std)
    assert p["se"] == pytest.approx(std / math.sqrt(3))


def test_verdict_rule():
    def pair(diffs: list[float], threads: int = 1) -> dict:
        runs = [_run(s, "a", d, threads) for s, d in enumerate(diffs)]
        runs += [_run(s, "b", 0.0, threads) for s in range(len(diffs))]
        return studies.paired(runs, ("default", "a"), ("default", "b"), threads=threads)

    clear = pair([0.10, 0.11, 0.12, 0.10])
    assert studies.verdict([clear]) == "supported"
    assert studies.verdict([clear], margin=0.2) == "not supported"
    assert studies.verdict([pair([-0.10, -0.11, -0.12])]) == "not supported"
    assert studies.verdict([pair([0.3, -0.2, 0.1])]) == "inconclusive"
    assert studies.verdict([pair([0.1])]) == "inconclusive"  # one seed decides nothing
    # thread counts that disagree in sign are not a result
    assert studies.verdict([clear, pair([-0.01, 0.02, -0.03, -0.01], threads=2)]) == "not supported"


def test_judge_uses_every_thread_count():
    runs = [_run(s, "a", 0.5 + 0.01 * s, t) for s in range(3) for t in (1, 2)]
    runs += [_run(s, "b", 0.4, t) for s in range(3) for t in (1, 2)]
    j = studies.judge(runs, ("default", "a"), ("default", "b"), "a beats b")
    assert j["verdict"] == "supported" and [q["threads"] for q in j["pairs"]] == [1, 2]
    assert "1 thr" in j["evidence"] and "2 thr" in j["evidence"]


def test_kaiming_matches_torch_init():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv1d(2, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 6, 4))
    studies.kaiming_(m)
    assert torch.count_nonzero(m[0].bias) == 0 and torch.count_nonzero(m[2].bias) == 0
    for layer, fan in ((m[0], 2 * 3), (m[2], 48)):
        std = float(layer.weight.std())
        assert abs(std - math.sqrt(2 / fan)) < 0.35 * math.sqrt(2 / fan)


@pytest.mark.parametrize(
    "script", ["study_deep.py", "study_start.py", "study_gradinit.py", "study_auto.py", "study_guard.py"]
)
def test_study_quick(tmp_path, script):
    out = tmp_path / script.replace(".py", ".json")
    args = [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out)]
    args += ["--tasks", "mlp16_relu_mnist1d"] + (["cnn16_relu_bn_mnist1d"] if script == "study_deep.py" else [])
    args += ["transformer12_sort"] if script == "study_auto.py" else []
    subprocess.run(args, check=True, capture_output=True, text=True, timeout=600)
    d = json.loads(out.read_text())
    assert d["claim"] and d["provenance"]["torch"]
    assert d["verdicts"] and all(v["verdict"] in VERDICTS | {"met", "not met"} for v in d["verdicts"])
    assert all(len(row) == len(d["table"]["columns"]) for row in d["table"]["rows"])
    assert d["runs"] and all(isinstance(r["diverged"], bool) and "seed" in r for r in d["runs"])
    # every verdict's evidence is recomputable from the runs
    for v in d["verdicts"]:
        runs = [r for r in d["runs"] if r.get("task") == v["task"]]
        assert v["pairs"] and runs
        for q in v["pairs"]:
            again = studies.paired(runs, tuple(q["a"]), tuple(q["b"]), q["key"], q["threads"])
            assert again["diffs"] == pytest.approx(q["diffs"])
    assert out.with_suffix(".png").exists()


def test_study_hf_quick(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "study_hf.json"
    args = [sys.executable, str(ROOT / "benchmarks" / "study_hf.py"), "--quick", "--out", str(out)]
    subprocess.run(args, check=True, capture_output=True, text=True, timeout=600)
    d = json.loads(out.read_text())
    assert d["claim"] and d["provenance"]["transformers"]
    tasks, inits = d["config"]["tasks"], d["config"]["inits"]
    assert len(d["table"]) == len(tasks) * len(inits)
    for row in d["table"]:
        assert row["errors"] == 0, row  # every method runs on every model
        if row["init"] != "default":
            # the paired difference is recomputable from the runs
            runs = {(r["init"], r["seed"]): r for r in d["runs"] if r["task"] == row["task"]}
            diffs = [
                runs[(row["init"], s)]["test_loss"] - runs[("default", s)]["test_loss"] for s in d["config"]["seeds"]
            ]
            assert row["loss_vs_default"]["diffs"] == pytest.approx(diffs)
    # the learned methods' guard decided on every run; where it rejected the scales, the model
    # was left as it was and trained exactly like the model's own init
    guarded = [r for r in d["runs"] if r["init"] in ("gradinit", "metainit", "nio")]
    assert guarded and all(isinstance(r["guard"]["kept"], bool) for r in guarded)
    for r in guarded:
        if not r["guard"]["kept"]:
            own = next(b for b in d["runs"] if (b["task"], b["init"], b["seed"]) == (r["task"], "default", r["seed"]))
            assert r["test_loss"] == own["test_loss"] and r["scale_range"] == [1.0, 1.0]
