"""The gradient quotient against brute force in float64 (dense Hessians, explicit loops)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo_cases import MODEL_CASES, assert_same, data_for, snapshot

import initopt
from initopt.core import Evaluator, ScaleSpace, Task
from initopt.core.quotient import gradient_and_hvp, gradient_quotient, gradient_terms, quotient_sums


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _batch(seed: int = 1, n: int = 7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _flat_loss(model: nn.Module, batch):
    """The loss as a function of one flat parameter vector (for the dense Hessian)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]

    def f(flat: torch.Tensor) -> torch.Tensor:
        parts = torch.split(flat, sizes)
        params = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        return F.cross_entropy(torch.func.functional_call(model, params, (batch[0],)), batch[1])

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return f, flat


def _brute_force_gq(model: nn.Module, batch, eps: float = 1e-5, scale: float = 1.0) -> float:
    """q_i = (g_i - (Hg)_i)/(g_i + eps s_i) - 1 with H from torch.autograd.functional.hessian."""
    f, flat = _flat_loss(model, batch)
    flat = flat.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(scale * f(flat), flat)
    H = torch.autograd.functional.hessian(lambda v: scale * f(v), flat.detach())
    hg = H @ g
    total = 0.0
    for i in range(len(g)):
        s = 1.0 if g[i] >= 0 else -1.0
        q = (float(g[i]) - float(hg[i])) / (float(g[i]) + eps * s) - 1.0
        total += abs(q)
    return total / len(g)


def _ours(model: nn.Module, batch, eps: float = 1e-5, scale: float = 1.0) -> float:
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    out = torch.func.functional_call(model, dict(zip(names, params, strict=True)), (batch[0],))
    return float(gradient_quotient(scale * F.cross_entropy(out, batch[1]), params, eps=eps))


@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_gq_equals_brute_force_with_dense_hessian(eps):
    model, batch = _net(), _batch()
    ref = _brute_force_gq(model, batch, eps)
    assert ref > 1e-3
    assert _ours(model, batch, eps) == pytest.approx(ref, rel=1e-10, abs=1e-14)


def test_hvp_equals_dense_hessian_times_gradient():
    model, batch = _net(), _batch()
    f, flat = _flat_loss(model, batch)
    H = torch.autograd.functional.hessian(f, flat)
    leaf = flat.clone().requires_grad_(True)
    g, hg = gradient_and_hvp(f(leaf), [leaf])
    torch.testing.assert_close(hg[0], H @ g[0], rtol=1e-10, atol=1e-14)


def test_public_diagnostic_equals_brute_force_and_is_read_only():
    model, batch = _net(), _batch()
    before = snapshot(model)
    r = initopt.gradient_quotient(model, batch)
    assert_same(before, snapshot(model))
    assert r.gq == pytest.approx(_brute_force_gq(model, batch), rel=1e-10)
    assert float(r) == r.gq and r.num_scalars == 43 and r.unreached == () and r.mode == "eval"
    assert set(r.per_tensor) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    assert sum(v * sizes[n] for n, v in r.per_tensor.items()) / 43 == pytest.approx(r.gq, rel=1e-12)
    assert r.loss == pytest.approx(float(F.cross_entropy(model(batch[0]), batch[1]).detach()), rel=1e-12)


def test_gq_of_a_loss_linear_in_theta_is_about_zero():
    # Hg = 0 exactly, so |q_i| = eps / (|g_i| + eps)
    torch.manual_seed(0)
    w = torch.randn(50, dtype=torch.float64, requires_grad=True)
    c = torch.rand(50, dtype=torch.float64) + 0.5
    gq = float(gradient_quotient(lambda t: (c * t[0]).sum(), [w]))
    assert gq == pytest.approx(float((1e-5 / (c + 1e-5)).mean()), rel=1e-9)
    assert gq < 3e-5
    # a linear model with a loss linear in its output is linear in theta as well
    net = nn.Linear(4, 3).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    r = initopt.gradient_quotient(net, x, loss_fn=lambda out, b: out.sum() / 6)
    assert r.gq < 1e-4


def test_unreached_entries_contribute_exactly_one():
    class Partly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(4, 3)
            self.unused = nn.Linear(6, 2)  # 14 scalars the loss never sees

        def forward(self, x):
            return self.used(x)

    torch.manual_seed(0)
    model = Partly().double()
    batch = _batch()
    r = initopt.gradient_quotient(model, batch)
    assert r.unreached == ("unused.weight", "unused.bias")
    assert r.per_tensor["unused.weight"] == 1.0 and r.per_tensor["unused.bias"] == 1.0
    used = initopt.gradient_quotient(model, batch, params="used")
    assert used.num_scalars == 15 and r.num_scalars == 29
    assert r.gq == pytest.approx((used.gq * 15 + 14) / 29, rel=1e-12)
    # the same at the level of the pure function: g = 0 and Hg = 0 give |q| = 1 per entry
    zeros = [torch.zeros(3, 5, dtype=torch.float64), torch.zeros(7)]
    assert quotient_sums(zeros, zeros).tolist() == [15.0, 7.0]


def test_partly_reached_embedding_rows_contribute_one_each():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 3).double()
    ids = torch.tensor([[1, 2], [2, 3]])
    r = initopt.gradient_quotient(emb, ids, loss_fn=lambda out, b: out.pow(2).mean())
    rows = [0, 4, 5, 6, 7, 8, 9]
    leaf = emb.weight.detach().clone().requires_grad_(True)
    g, hg = gradient_and_hvp(F.embedding(ids, leaf).pow(2).mean(), [leaf])
    assert torch.all(g[0][rows] == 0) and torch.all(hg[0][rows] == 0)
    per_row = (
        (hg[0] + 1e-5 * torch.where(g[0] >= 0, 1.0, -1.0)) / (g[0] + 1e-5 * torch.where(g[0] >= 0, 1.0, -1.0))
    ).abs()
    assert torch.all(per_row[rows] == 1.0)
    assert r.gq == pytest.approx(float(per_row.mean()), rel=1e-12)


def test_gq_grows_linearly_with_a_loss_multiplier():
    """q_i = -(c^2 Hg_i + eps s_i)/(c g_i + eps s_i) for the loss c L: linear in c where eps is negligible."""
    model, batch = _net(), _batch()
    base = _ours(model, batch, eps=1e-12)
    for c in (3.0, 10.0, 100.0):
        assert _ours(model, batch, eps=1e-12, scale=c) == pytest.approx(c * base, rel=1e-6)
        assert _ours(model, batch, scale=c) == pytest.approx(_brute_force_gq(model, batch, scale=c), rel=1e-9)
    # with the default eps, entries with |g_i| ~ eps bend it at small c; the slope settles as c grows
    assert _ours(model, batch, scale=1000.0) == pytest.approx(10 * _ours(model, batch, scale=100.0), rel=2e-3)


def test_gq_is_differentiable_and_gradcheck_passes():
    model, batch = _net(), _batch(n=4)
    names = [n for n, _ in model.named_parameters()]

    def gq(*params):
        out = torch.func.functional_call(model, dict(zip(names, params, strict=True)), (batch[0],))
        return gradient_quotient(F.cross_entropy(out, batch[1]), list(params), create_graph=True)

    params = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())
    assert torch.autograd.gradcheck(gq, params, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_quotient_sums_derivative_holds_s_constant():
    """d|q|/dg uses d(g + eps s)/dg = 1 with s fixed, also at g = 0 (s = +1 there)."""
    g = torch.tensor([0.0, 2e-6, -3e-6, 0.5, -0.25], dtype=torch.float64, requires_grad=True)
    h = torch.tensor([1e-6, -4e-6, 1e-6, 0.1, 0.3], dtype=torch.float64, requires_grad=True)
    s = torch.tensor([1.0, 1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    eps = 1e-5
    literal = (((g - h) / (g + eps * s) - 1).abs()).sum()
    ours = quotient_sums([g], [h], eps).sum()
    assert float(ours.detach()) == pytest.approx(float(literal.detach()), rel=1e-12)
    ga, ha = torch.autograd.grad(literal, [g, h])
    gb, hb = torch.autograd.grad(ours, [g, h])
    torch.testing.assert_close(gb, ga, rtol=1e-10, atol=0)
    torch.testing.assert_close(hb, ha, rtol=1e-10, atol=0)


def test_gradient_terms_reports_reach_and_zero_fills():
    a = torch.ones(2, requires_grad=True)
    b = torch.ones(3, requires_grad=True)
    lin = torch.ones(2, requires_grad=True)
    t = gradient_terms((a**2).sum() + lin.sum(), [a, b, lin])
    assert t.reached == [True, False, True]
    assert t.g[1].tolist() == [0.0] * 3 and t.hg[1].tolist() == [0.0] * 3
    assert t.hg[2].tolist() == [0.0, 0.0]  # linear: no curvature
    assert t.hg[0].tolist() == [4.0, 4.0]  # H = 2I, g = 2a


@pytest.mark.parametrize("mc", MODEL_CASES, ids=[m.name for m in MODEL_CASES])
def test_diagnostic_on_every_zoo_model_is_read_only(mc):
    torch.manual_seed(0)
    model = mc.make()
    batch = data_for(mc, 1)[0]
    before = snapshot(model)
    r = initopt.gradient_quotient(model, batch, mode="train")
    r2 = initopt.gradient_quotient(model, batch)
    assert_same(before, snapshot(model))
    assert r.gq > 0 and r2.gq > 0 and r.num_scalars == sum(p.numel() for p in model.parameters())


def test_diagnostic_matches_evaluator_path_and_validates():
    model, batch = _net(), _batch()
    space = ScaleSpace(model)
    ev = Evaluator(model, space, Task())
    theta = space.leaves(space.ones())
    direct = float(gradient_quotient(ev.loss(theta, batch), theta))
    assert initopt.gradient_quotient(model, batch).gq == pytest.approx(direct, rel=1e-12)
    with pytest.raises(initopt.ConfigError):
        initopt.gradient_quotient(model, batch, eps=0.0)
    with pytest.raises(initopt.ConfigError):
        initopt.gradient_quotient(model, batch, mode="inference")
    with pytest.raises(initopt.DataError):
        initopt.gradient_quotient(model, [batch, batch])


@pytest.mark.parametrize("limit", [0, 1 << 20])
def test_quotient_total_per_tensor_and_concatenated_agree(monkeypatch, limit):
    from initopt.core import quotient

    monkeypatch.setattr(quotient, "CONCAT_MAX_ENTRIES", limit)
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)]
    hvps = [torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)]
    expect = sum(
        float(((h + 1e-5 * torch.where(x >= 0, 1.0, -1.0)) / (x + 1e-5 * torch.where(x >= 0, 1.0, -1.0))).abs().sum())
        for x, h in zip(grads, hvps, strict=True)
    )
    torch.testing.assert_close(float(quotient.quotient_total(grads, hvps, 1e-5)), expect, rtol=1e-10, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_quotient_total_derivative_equals_autograd_of_the_expression(dtype):
    """The fused derivative of the concatenated quotient against autograd of the plain
    expression (quotient_sums), with g = 0, g = -0.0 (s = +1 for both: a sign taken with
    copysign would flip the derivative there), Hg + e = 0, and Hg in another dtype."""
    from initopt.core.quotient import quotient_total

    gen = torch.Generator().manual_seed(4)
    g = [torch.randn(5, 3, generator=gen, dtype=dtype), torch.randn(4, generator=gen, dtype=dtype)]
    h = [torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64)]
    g[0][0, 0], g[0][0, 1], g[1][2] = 0.0, -0.0, 0.0
    h[1][2] = 0.0
    h[0][1, 1] = -1e-5 if g[0][1, 1] >= 0 else 1e-5
    g = [x.requires_grad_() for x in g]
    h = [x.requires_grad_() for x in h]
    ours = quotient_total(g, h, 1e-5)
    expect = quotient_sums(g, [x.to(dtype) for x in h], 1e-5).sum()
    d_ours = torch.autograd.grad(ours, [*g, *h])
    d_expect = torch.autograd.grad(expect, [*g, *h])
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(ours, expect, rtol=rtol, atol=0)
    for a, b in zip(d_ours, d_expect, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=rtol, atol=0)
    # at g = -0.0 the derivative in g is -|q|/eps < 0 (s = +1), as for g = +0.0
    assert float(d_ours[0][0, 1]) < 0 and float(d_ours[0][0, 0]) < 0
