"""Public Hessian diagnostics and the tracker: values against dense Hessians, and read-only."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn
from zoo_cases import assert_same, snapshot

import initopt
from initopt import zoo
from initopt.core import Evaluator, ScaleSpace, Task
from initopt.core.curvature import flatten, unflatten


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _batch(seed=0, n=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _dense(model, batch, params=None):
    space = ScaleSpace(model, params=params)
    ev = Evaluator(model, space, Task())
    w0 = space.initial
    return torch.autograd.functional.hessian(lambda f: ev.loss(unflatten(f, w0), batch), flatten(w0))


def test_eigenvalues_trace_frobenius_against_dense_and_read_only():
    model, b = _model(), _batch()
    before = snapshot(model)
    H = _dense(model, b)
    ev = torch.linalg.eigvalsh(H)
    ref = ev[torch.argsort(ev.abs(), descending=True)[:2]]
    got = initopt.hessian_eigenvalues(model, b, k=2, iters=30)
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), ref, rtol=1e-8, atol=0)
    tr = initopt.hessian_trace(model, b, probes=300, estimator="hutchpp")
    assert tr == pytest.approx(float(torch.trace(H)), rel=0.05)
    fro = initopt.hessian_frobenius(model, b, probes=300, estimator="hutchpp")
    assert fro == pytest.approx(float(torch.linalg.norm(H)), rel=0.05)
    assert initopt.hessian_trace(model, b, probes=7, seed=1) == initopt.hessian_trace(model, b, probes=7, seed=1)
    assert_same(before, snapshot(model))


def test_block_selection_by_prefix_and_batches_are_averaged():
    model = _model()
    b1, b2 = _batch(1, 16), _batch(2, 16)
    cat = (torch.cat([b1[0], b2[0]]), torch.cat([b1[1], b2[1]]))
    H = _dense(model, cat, params="2")
    top = float(torch.linalg.eigvalsh(H).abs().max())
    got = initopt.hessian_eigenvalues(model, [b1, b2], params="2", iters=H.shape[0])
    assert abs(got[0]) == pytest.approx(top, rel=1e-8)
    gn = initopt.hessian_eigenvalues(model, b1, k=3, curvature="gauss_newton", iters=30)
    assert all(v > -1e-10 for v in gn)


def test_spectral_density_integrates_to_one():
    model, b = _model(), _batch()
    d = initopt.hessian_spectral_density(model, b, probes=5, iters=15)
    assert d.total() == pytest.approx(1.0, abs=1e-12)
    grid = torch.linspace(float(d.nodes.min()) - 1, float(d.nodes.max()) + 1, 2001, dtype=torch.float64)
    assert float(torch.trapezoid(d.smooth(grid), grid)) == pytest.approx(1.0, abs=1e-3)


def test_diagnostics_leave_batchnorm_and_dropout_models_untouched():
    torch.manual_seed(0)
    model = zoo.cnn(channels=(4, 8), batchnorm=True, dropout=0.3).eval()
    b = (torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,)))
    before = snapshot(model)
    initopt.hessian_eigenvalues(model, b, k=1, iters=5)
    initopt.hessian_frobenius(model, b, probes=3)
    assert_same(before, snapshot(model))


def test_tracker_records_every_k_steps_plots_and_serializes(tmp_path):
    model = _model()
    b = _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = initopt.HessianTracker(model, b, every=3, iters=5, probes=4).attach(opt)
    for _ in range(7):
        opt.zero_grad()
        nn.functional.cross_entropy(model(b[0]), b[1]).backward()
        opt.step()
    tracker.detach()
    steps = sorted({r["step"] for r in tracker.records})
    assert steps == [0, 3, 6]
    assert {r["layer"] for r in tracker.records} == {"0", "2"}
    assert all(r["spectral"] > 0 and r["frobenius"] >= r["spectral"] * 0.5 for r in tracker.records)
    assert all(r["products"] == 5 + 4 for r in tracker.records)
    json.dumps(tracker.to_dict())
    out = tracker.plot(tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 1000 and out == tmp_path / "h.png"
    # the measured layer value equals the direct diagnostic on the same block
    t2 = initopt.HessianTracker(model, b, layers={"first": ["0.weight"]}, iters=24, probes=0)
    rec = t2.measure()[0]
    direct = initopt.hessian_eigenvalues(model, b, params=["0.weight"], iters=24, tol=None)
    assert rec["spectral"] == pytest.approx(abs(direct[0]), rel=1e-10)


def test_tracker_plot_without_matplotlib_says_what_to_install(monkeypatch, tmp_path):
    model, b = _model(), _batch()
    tracker = initopt.HessianTracker(model, b, every=1, iters=3, probes=1)
    tracker.step()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"initopt\[plots\]"):
        tracker.plot(tmp_path / "x.png")


def test_tracker_validates():
    with pytest.raises(initopt.ConfigError):
        initopt.HessianTracker(_model(), every=0)
    with pytest.raises(initopt.ConfigError, match="selects no known parameter"):
        initopt.HessianTracker(_model(), _batch(), layers={"x": "nope"}).measure()
    with pytest.raises(initopt.DataError):
        initopt.HessianTracker(_model()).measure()
