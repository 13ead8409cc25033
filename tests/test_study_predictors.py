"""The predictors study (benchmarks/study_predictors.py): its rank statistics and its small version."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import study_predictors as sp  # noqa: E402

VERDICTS = {"supported", "not supported", "inconclusive"}


def test_rankdata_averages_ties():
    assert sp.rankdata([10, 20, 20, 30]) == [1, 2.5, 2.5, 4]
    assert sp.rankdata([3, 1, 3, 3, 0]) == [4, 2, 4, 4, 1]


def test_spearman_hand_computed_with_ties():
    # ranks x = [1, 2.5, 2.5, 4], y = [1, 3, 2, 4]; centred: dx = [-1.5, 0, 0, 1.5],
    # dy = [-1.5, 0.5, -0.5, 1.5]; sum dx dy = 4.5, sum dx^2 = 4.5, sum dy^2 = 5
    # -> rho = 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
    assert sp.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / math.sqrt(10))
    assert sp.spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert sp.spearman([1, 2, 3], [1.0, 8.0, 27.0]) == pytest.approx(1.0)  # invariant under monotone maps
    assert math.isnan(sp.spearman([1, 1, 1], [1, 2, 3]))


def test_spearman_matches_scipy_if_installed():
    stats = pytest.importorskip("scipy.stats")
    x = [0.3, 0.1, 0.1, 0.7, 0.5, 0.5, 0.5, 0.2]
    y = [1, 2, 2, 5, 3, 4, 3, 0]
    assert sp.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])


def test_partial_and_bootstrap():
    x = [1, 2, 3, 4, 5, 6]
    # y follows x exactly, z is unrelated noise: partialling z out leaves rho = 1
    assert sp.partial_spearman(x, x, [3, 1, 2, 6, 5, 4]) == pytest.approx(1.0)
    point, lo, hi = sp.bootstrap(sp.spearman, [x, x], reps=100)
    assert point == pytest.approx(1.0) and lo == pytest.approx(1.0) and hi == pytest.approx(1.0)


def test_correlation_verdict():
    pos = {"rho": 0.5, "lo": 0.2, "hi": 0.7}
    wide = {"rho": 0.2, "lo": -0.2, "hi": 0.5}
    neg = {"rho": -0.5, "lo": -0.7, "hi": -0.2}
    assert sp.correlation_verdict([pos, pos], [pos]) == "supported"
    assert sp.correlation_verdict([pos, wide], [pos]) == "inconclusive"
    assert sp.correlation_verdict([pos, neg], [pos]) == "not supported"
    flipped = {"rho": -0.1, "lo": -0.4, "hi": 0.3}
    assert sp.correlation_verdict([wide, flipped], [wide, flipped]) == "not supported"


def test_study_predictors_quick(tmp_path):
    out = tmp_path / "study_predictors.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "study_predictors.py"), "--quick", "--out", str(out)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    d = json.loads(out.read_text())
    assert d["study"] == "predictors" and d["claim"]
    assert {"torch", "git_revision", "threads"} <= set(d["provenance"])
    table = d["table"]
    assert table["title"] and table["columns"][:2] == ["measure", "theory: better when"]
    assert all(len(row) == len(table["columns"]) for row in table["rows"])
    labels = [row[0] for row in table["rows"]]
    for k in ("gc", "bgc", "gq", "hess", "gn"):
        assert sp.MEASURES[k][0] in labels
    assert len(d["verdicts"]) >= 3
    for v in d["verdicts"]:
        assert v["verdict"] in VERDICTS and v["claim"] and v["evidence"]
    assert d["notes"] and d["runs"]
    threads = {r["threads"] for r in d["runs"]}
    assert threads == {1, 2}
    for r in d["runs"]:
        assert set(sp.MEASURES) <= set(r["measures"])
        assert 0.0 <= r["final_test_acc"] <= 1.0
    assert out.with_suffix(".png").exists()
