"""The recovery study (benchmarks/study_recovery.py): its bad-init wrapper, its norm probe and its small version."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import studies  # noqa: E402
import study_recovery as sr  # noqa: E402

VERDICTS = {"supported", "not supported", "inconclusive"}


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))


def test_bad_init_is_the_good_one_rescaled():
    torch.manual_seed(3)
    good = sr.scaled_kaiming(_net, 1.0)()
    torch.manual_seed(3)
    bad = sr.scaled_kaiming(_net, 0.25)()
    for (n, g), (_, b) in zip(good.named_parameters(), bad.named_parameters(), strict=True):
        if g.ndim >= 2:
            assert torch.equal(b, g * 0.25), n  # a power of two: exact
        else:
            assert torch.count_nonzero(b) == 0  # Kaiming biases are zero
    names, norms = sr.weight_norms(bad)
    assert names == ["0.weight", "2.weight"]
    good_norms = sr.weight_norms(good)[1]
    assert sr.scale_error(norms, good_norms) == pytest.approx(math.log(4))
    assert sr.log_ratios(norms, good_norms) == pytest.approx([-math.log(4)] * 2)


def test_scale_error_by_hand():
    # log ratios log 2 and -log 8: mean |.| = (log 2 + 3 log 2) / 2 = 2 log 2
    assert sr.scale_error([2.0, 1.0], [1.0, 8.0]) == pytest.approx(2 * math.log(2))


def test_norm_probe_reads_the_weights_training_starts_from():
    probe = sr.NormProbe(_net)
    with probe:
        model = probe()
        with torch.no_grad():
            model[0].weight.mul_(3.0)  # what an init method does in place
        expected = sr.weight_norms(model)[1]
        other = torch.optim.SGD(_net().parameters(), lr=0.1)  # an unrelated optimizer: ignored
        other.step()
        assert probe.records[-1]["norms"] is None
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        model(torch.randn(4, 5)).sum().backward()
        opt.step()  # the probe reads before the step moves anything
        opt.step()
    rec = probe.records[-1]
    assert rec["norms"] == pytest.approx(expected)
    assert rec["norms_start"][0] * 3.0 == pytest.approx(rec["norms"][0])
    torch.optim.SGD(model.parameters(), lr=1.0).step()  # the hook is gone after the block
    assert rec["norms"] == pytest.approx(expected)


def test_study_recovery_quick(tmp_path):
    out = tmp_path / "study_recovery.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "study_recovery.py"), "--quick", "--out", str(out)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    d = json.loads(out.read_text())
    assert d["study"] == "recovery" and d["claim"]
    assert {"torch", "git_revision", "threads"} <= set(d["provenance"])
    table = d["table"]
    assert table["title"] and table["columns"] == sr.TABLE_COLUMNS
    assert table["rows"] and all(len(row) == len(table["columns"]) for row in table["rows"])
    assert d["notes"] and d["runs"]
    methods = d["config"]["methods"]
    assert {"metainit", "gradinit", "nio", "hessian"} <= set(methods)

    # one verdict per (task, factor, method), the headline first
    assert len(d["verdicts"]) == len(d["config"]["tasks"]) * len(sr.FACTORS) * len(methods)
    head = d["verdicts"][0]
    assert head["task"] == sr.HEADLINE_TASK and head["factor"] == "x1/4" and head["method"].startswith("metainit")
    assert [q["threads"] for q in head["pairs"]] == [1, 2]
    for v in d["verdicts"]:
        assert v["verdict"] in VERDICTS and v["claim"] and v["evidence"]
        parts = [v["parts"]["scale"]["verdict"], v["parts"]["accuracy"]["verdict"]]
        if v["verdict"] == "supported":
            assert parts == ["supported", "supported"]
        elif v["verdict"] == "not supported":
            assert "not supported" in parts
        # every paired difference is recomputable from the runs
        runs = [r for r in d["runs"] if r["task"] == v["task"]]
        for q in v["parts"]["scale"]["pairs"] + v["parts"]["accuracy"]["pairs"]:
            again = studies.paired(runs, tuple(q["a"]), tuple(q["b"]), q["key"], q["threads"])
            assert again["diffs"] == pytest.approx(q["diffs"])

    # the recorded scale errors follow from the recorded norms
    assert {r["threads"] for r in d["runs"]} == {1, 2}
    for r in d["runs"]:
        good, start, after = r["norms_good"], r["norms_start"], r["norms"]
        assert len(good) == len(start) == len(after) == len(r["layers"]) > 0
        lr = [math.log(a / g) for a, g in zip(after, good, strict=True)]
        assert r["log_ratio"] == pytest.approx(lr)
        assert r["mean_log_ratio"] == pytest.approx(sum(lr) / len(lr))
        assert r["scale_error"] == pytest.approx(sum(abs(x) for x in lr) / len(lr))
        err0 = sum(abs(math.log(s / g)) for s, g in zip(start, good, strict=True)) / len(good)
        assert r["scale_error_start"] == pytest.approx(err0)
        assert err0 == pytest.approx(abs(math.log(r["factor"])), abs=1e-5)
        if r["init"] == "default":  # the untouched start: nothing moved
            assert after == pytest.approx(start)
        assert 0.0 <= r["final_test_acc"] <= 1.0 and isinstance(r["diverged"], bool)
    assert out.with_suffix(".png").exists()
