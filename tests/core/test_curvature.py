"""Curvature core against dense Hessians in float64 (torch.autograd.functional.hessian)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from initopt.core import Evaluator, ScaleSpace, Task, search_mode
from initopt.core.curvature import (
    DenseOperator,
    GaussNewtonOperator,
    HessianOperator,
    flatten,
    gauss_newton_operator,
    gnvp,
    hessian_operator,
    hutchinson,
    hutchpp,
    hvp,
    lanczos,
    power_iteration,
    ritz,
    slq,
    top_eigenvalues,
    unflatten,
)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Softplus(), nn.Linear(5, 3)).double()


def _batch(seed: int, n: int = 10):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _setup(params=None, seed: int = 0):
    model = _model(seed)
    space = ScaleSpace(model, params=params)
    return model, space, Evaluator(model, space, Task())


def _dense_hessian(ev: Evaluator, batches) -> torch.Tensor:
    w0 = ev.space.initial
    sizes = torch.tensor([len(b[0]) for b in batches], dtype=torch.float64)
    wts = sizes / sizes.sum()

    def f(flat):
        ts = unflatten(flat, w0)
        return sum(w * ev.loss(ts, b) for w, b in zip(wts, batches, strict=True))

    return torch.autograd.functional.hessian(f, flatten(w0))


def _dense_gauss_newton(ev: Evaluator, batch) -> torch.Tensor:
    w0 = ev.space.initial
    flat = flatten(w0)
    out = ev.output(w0, batch)
    J = torch.autograd.functional.jacobian(lambda v: ev.output(unflatten(v, w0), batch).reshape(-1), flat)
    Hout = torch.autograd.functional.hessian(lambda o: ev.task.loss(o.reshape(out.shape), batch), out.reshape(-1))
    return J.T @ Hout @ J


@pytest.mark.parametrize("method", ["double_backward", "forward_over_reverse", "auto"])
def test_hvp_equals_dense_hessian(method):
    _, space, ev = _setup()
    b = _batch(1)
    H = _dense_hessian(ev, [b])
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = torch.randn(H.shape[0], generator=g, dtype=torch.float64)
        got = hvp(lambda ts: ev.loss(list(ts), b), space.initial, unflatten(v, space.initial), method=method)
        torch.testing.assert_close(flatten(got), H @ v, rtol=0, atol=1e-10)


@pytest.mark.parametrize("method,reuse", [("double_backward", True), ("double_backward", False), ("auto", True)])
def test_operator_over_batches_equals_dense_hessian_of_mean_loss(method, reuse):
    _, _, ev = _setup()
    batches = [_batch(1, 10), _batch(2, 6)]
    H = _dense_hessian(ev, batches)
    op = hessian_operator(ev, batches, method=method, reuse_graph=reuse)
    V = torch.randn(H.shape[0], 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = torch.stack([op.matvec(V[:, i]) for i in range(4)], 1)
    torch.testing.assert_close(got, H @ V, rtol=0, atol=1e-10)
    assert op.products == 4


@pytest.mark.parametrize("params", ["2", ["0.weight", "4.bias"]])
def test_block_restricted_hvp_equals_dense_sub_block(params):
    _, _, ev_all = _setup()
    b = _batch(3)
    H = _dense_hessian(ev_all, [b])
    names = [n for bl in ev_all.space.blocks for n in bl.names]
    offsets, i = {}, 0
    for bl, t in zip(ev_all.space.blocks, ev_all.space.initial, strict=True):
        offsets[bl.name] = (i, i + t.numel())
        i += t.numel()
    _, space, ev = _setup(params=params)
    idx = torch.cat([torch.arange(*offsets[n]) for n in space.names])
    sub = H[idx][:, idx]
    for method in ("double_backward", "forward_over_reverse"):
        op = hessian_operator(ev, [b], method=method)
        v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(op.matvec(v), sub @ v, rtol=0, atol=1e-10)
    # the same block taken from an operator over all tensors (shared gradient graph)
    root = hessian_operator(ev_all, [b])
    blk = root.block([names.index(n) for n in space.names])
    v = torch.randn(blk.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(blk.matvec(v), sub @ v, rtol=0, atol=1e-10)


def test_gauss_newton_product_equals_dense_jt_h_j():
    _, space, ev = _setup()
    b = _batch(4)
    G = _dense_gauss_newton(ev, b)
    op = gauss_newton_operator(ev, [b])
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = torch.randn(G.shape[0], generator=g, dtype=torch.float64)
        torch.testing.assert_close(op.matvec(v), G @ v, rtol=0, atol=1e-10)
        one = gnvp(
            lambda ts: ev.output(list(ts), b), lambda o: ev.task.loss(o, b), space.initial, unflatten(v, space.initial)
        )
        torch.testing.assert_close(flatten(one), G @ v, rtol=0, atol=1e-10)
    # Gauss–Newton is positive semi-definite, the Hessian here is not
    assert torch.linalg.eigvalsh(G).min() > -1e-12


def test_gauss_newton_equals_hessian_for_a_linear_model():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    space = ScaleSpace(model)
    ev = Evaluator(model, space, Task())
    b = _batch(5)
    H = _dense_hessian(ev, [b])
    op = GaussNewtonOperator([lambda ts: ev.output(list(ts), b)], [lambda o: ev.task.loss(o, b)], space.initial)
    v = torch.randn(op.dim, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), H @ v, rtol=0, atol=1e-10)


class _NoForwardAD(torch.autograd.Function):
    """tanh with a backward (twice differentiable through torch ops) but no forward-mode rule."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (1 - torch.tanh(x) ** 2)


def test_auto_falls_back_to_double_backward():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    space = ScaleSpace(model)
    b = _batch(6)
    ev = Evaluator(model, space, Task(forward_fn=lambda m, batch: _NoForwardAD.apply(m(batch[0]))))
    with pytest.raises(Exception):  # noqa: B017 - any error from forward mode
        hvp(
            lambda ts: ev.loss(list(ts), b),
            space.initial,
            [torch.ones_like(t) for t in space.initial],
            "forward_over_reverse",
        )
    op = hessian_operator(ev, [b], method="auto")
    v = torch.randn(op.dim, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), _dense_hessian(ev, [b]) @ v, rtol=0, atol=1e-10)
    assert op.method_used == "double_backward"


def test_batchnorm_model_hvp_falls_back_and_leaves_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).double()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    space = ScaleSpace(model)
    ev = Evaluator(model, space, Task())
    b = _batch(7)
    with search_mode(model):
        H = _dense_hessian(ev, [b])
        op = hessian_operator(ev, [b], method="auto")
        v = torch.randn(op.dim, dtype=torch.float64)
        torch.testing.assert_close(op.matvec(v), H @ v, rtol=0, atol=1e-10)
    for n, buf in model.named_buffers():
        assert torch.equal(buf, buffers[n])


# ---- estimators ---------------------------------------------------------------------------


def _hessian_and_op():
    _, _, ev = _setup()
    b = _batch(8, 32)
    return _dense_hessian(ev, [b]), hessian_operator(ev, [b])


def test_lanczos_top3_matches_dense_eigenvalues():
    H, op = _hessian_and_op()
    evals = torch.linalg.eigvalsh(H)
    ref = evals[torch.argsort(evals.abs(), descending=True)[:3]]
    got = top_eigenvalues(op, 3, iters=40, tol=None, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    assert op.products == 40 < H.shape[0]


def test_lanczos_basis_is_orthonormal_and_tridiagonalizes():
    H, _ = _hessian_and_op()
    res = lanczos(DenseOperator(H), 25, keep_basis=True, generator=torch.Generator().manual_seed(1))
    Q = res.basis
    torch.testing.assert_close(Q @ Q.T, torch.eye(25, dtype=H.dtype), rtol=0, atol=1e-10)
    torch.testing.assert_close(Q @ H @ Q.T, res.tridiagonal(), rtol=0, atol=1e-8 * H.abs().max().item())


def test_lanczos_survives_breakdown_on_a_low_rank_operator():
    U, _ = torch.linalg.qr(torch.randn(30, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    A = U @ torch.diag(torch.tensor([5.0, -2.0, 1.0], dtype=torch.float64)) @ U.T
    res = lanczos(DenseOperator(A), 10, generator=torch.Generator().manual_seed(0))
    theta, _ = ritz(res.alphas, res.betas)
    assert torch.isfinite(theta).all()
    vals = sorted(theta.tolist(), key=abs, reverse=True)[:3]
    torch.testing.assert_close(torch.tensor(vals, dtype=torch.float64), torch.tensor([5.0, -2.0, 1.0]).double())


def test_lanczos_early_stop():
    H, op = _hessian_and_op()
    top = torch.linalg.eigvalsh(H).abs().max()
    got = top_eigenvalues(op, 1, iters=40, tol=1e-10, generator=torch.Generator().manual_seed(0))
    assert op.products < 40
    torch.testing.assert_close(got.abs()[0], top, rtol=1e-8, atol=0)


def test_power_iteration_matches_largest_magnitude_eigenvalue():
    H, op = _hessian_and_op()
    evals = torch.linalg.eigvalsh(H)
    ref = evals[evals.abs().argmax()]
    res = power_iteration(op, iters=1000, tol=1e-12, generator=torch.Generator().manual_seed(0))
    assert abs(float(res.eigenvalue) - float(ref)) <= 1e-4 * abs(float(ref))
    assert res.products == op.products and len(res.history) == res.products


def _wide_case():
    """A Hessian with many comparable eigenvalues (10 classes, batch 128), so that 5 % is > 3 sigma
    of a 1000-probe Hutchinson estimate (checked below): the test does not rest on a lucky seed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 10)).double()
    space = ScaleSpace(model)
    ev = Evaluator(model, space, Task())
    g = torch.Generator().manual_seed(0)
    b = (torch.randn(128, 10, generator=g, dtype=torch.float64), torch.randint(0, 10, (128,), generator=g))
    return _dense_hessian(ev, [b]), hessian_operator(ev, [b])


def _hutchinson_rel_std(A: torch.Tensor, probes: int) -> float:
    """Std of the Rademacher Hutchinson trace estimate relative to the trace: sqrt(2 sum_{i!=j} A_ij^2 / P) / tr A."""
    off = (A * A).sum() - (torch.diag(A) ** 2).sum()
    return float(torch.sqrt(2 * off / probes) / torch.trace(A))


def test_hutchinson_trace_and_frobenius_within_5_percent():
    H, op = _wide_case()
    assert 3 * _hutchinson_rel_std(H, 1000) < 0.05 and 3 * _hutchinson_rel_std(H @ H, 1000) < 0.05
    tr, fro2 = hutchinson(op, 1000, generator=torch.Generator().manual_seed(0))
    ref_tr, ref_fro2 = torch.trace(H), (H * H).sum()
    assert abs(float(tr / ref_tr) - 1) < 0.05
    assert abs(float(fro2 / ref_fro2) - 1) < 0.05
    assert abs(math.sqrt(float(fro2 / ref_fro2)) - 1) < 0.05
    assert op.products == 1000


def test_hutchpp_is_exact_on_low_rank_and_close_on_the_hessian():
    U, _ = torch.linalg.qr(torch.randn(40, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    A = U @ torch.diag(torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=torch.float64)) @ U.T
    tr, fro2 = hutchpp(DenseOperator(A), 15, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(tr, torch.trace(A), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fro2, (A * A).sum(), rtol=1e-10, atol=1e-10)
    H, op = _wide_case()
    tr, fro2 = hutchpp(op, 300, generator=torch.Generator().manual_seed(0))
    assert abs(float(tr / torch.trace(H)) - 1) < 0.05
    assert abs(float(fro2 / (H * H).sum()) - 1) < 0.05


def test_slq_density_integrates_to_one_and_its_mean_is_trace_over_n():
    H, op = _hessian_and_op()
    n = H.shape[0]
    d = slq(op, probes=30, iters=20, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(d.weights.sum(1), torch.ones(30, dtype=torch.float64), rtol=0, atol=1e-12)
    assert abs(d.total() - 1) < 1e-12
    # the SLQ mean is exactly the Hutchinson estimate with the same (normalized) probes ...
    g = torch.Generator().manual_seed(0)
    quad = []
    for _ in range(30):
        res = lanczos(DenseOperator(H), 20, generator=g)
        quad.append(float(res.alphas[0]))
    assert abs(d.mean() - sum(quad) / 30) < 1e-10
    # ... and close to trace / n
    assert abs(d.mean() - float(torch.trace(H)) / n) < 0.1 * float(H.abs().max())
    grid = torch.linspace(float(d.nodes.min()) - 1, float(d.nodes.max()) + 1, 4001, dtype=torch.float64)
    dens = d.smooth(grid)
    assert abs(float(torch.trapezoid(dens, grid)) - 1) < 1e-3
    assert abs(float(torch.trapezoid(dens * grid, grid)) - d.mean()) < 1e-3


def test_slq_mean_equals_trace_over_n_with_many_probes():
    H, op = _wide_case()
    d = slq(op, probes=1000, iters=2, generator=torch.Generator().manual_seed(0))
    assert abs(d.mean() / (float(torch.trace(H)) / H.shape[0]) - 1) < 0.05


def test_seeded_probes_are_reproducible_and_no_model_state_changes():
    model, _, ev = _setup()
    b = _batch(9)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    a = hutchinson(hessian_operator(ev, [b]), 5, generator=torch.Generator().manual_seed(3))
    c = hutchinson(hessian_operator(ev, [b]), 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None


def test_operator_validates_arguments():
    _, space, ev = _setup()
    with pytest.raises(ValueError, match="hvp method"):
        HessianOperator([lambda ts: ev.loss(list(ts), _batch(0))], space.initial, method="nope")
    with pytest.raises(ValueError, match="at least one loss closure"):
        HessianOperator([], space.initial)
    with pytest.raises(ValueError, match="probes"):
        hutchinson(DenseOperator(torch.eye(3)), 0)


def test_loss_independent_of_a_block_gives_zero_products():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    space = ScaleSpace(model)
    ev = Evaluator(model, space, Task(loss_fn=lambda out, batch: F.mse_loss(out, batch[1]) * 0 + out.sum() * 0))
    b = (torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))
    op = hessian_operator(ev, [b])
    assert torch.equal(op.matvec(torch.ones(op.dim, dtype=torch.float64)), torch.zeros(op.dim, dtype=torch.float64))
