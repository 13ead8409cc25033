"""Hessian-norm initialization: the analytic rule against closed forms and Monte Carlo, the
activation tracing, and the data-driven rule against dense per-layer Hessians (float64)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import initopt
from initopt import zoo
from initopt.core import Evaluator, ScaleSpace, Task, search_mode
from initopt.methods.hessian import (
    HessianInitConfig,
    expect,
    hessian_normal_,
    hessian_variance,
    trace_layers,
)

# ---- the rule -----------------------------------------------------------------------------


@pytest.mark.parametrize("q", [1e-6, 0.3, 1.0, 17.0])
def test_relu_gives_exactly_he(q):
    assert expect(torch.relu, q, derivative=True) == 0.5
    for fan in (1, 3, 7, 64, 1000, 4608):
        assert hessian_variance(nn.ReLU(), fan, q) == 2 / fan
        assert hessian_variance(F.relu, fan, q, keep_prob=0.5) == 1 / fan


def _mc(phi, q: float, n: int = 2_000_000, derivative: bool = True) -> tuple[float, float]:
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(n, generator=g, dtype=torch.float64) * math.sqrt(q)).requires_grad_(True)
    y = phi(z)
    if derivative:
        (y,) = torch.autograd.grad(y.sum(), z)
    v = y.detach() ** 2
    return float(v.mean()), float(v.std() / math.sqrt(n))


@pytest.mark.parametrize(
    "name,phi", [("gelu", nn.GELU()), ("silu", F.silu), ("tanh", torch.tanh), ("sigmoid", torch.sigmoid)]
)
@pytest.mark.parametrize("q", [0.25, 1.0, 4.0])
def test_quadrature_matches_monte_carlo(name, phi, q):
    mean, se = _mc(phi, q)
    got = expect(phi, q, derivative=True)
    assert abs(got - mean) < 5 * se + 1e-12, (name, q, got, mean, se)
    mean2, se2 = _mc(phi, q, derivative=False)
    assert abs(expect(phi, q) - mean2) < 5 * se2 + 1e-12


def test_small_variance_limits_lecun_and_sixteen():
    assert hessian_variance(torch.tanh, 10, q=1e-8) == pytest.approx(1 / 10, rel=1e-6)
    assert hessian_variance(torch.sigmoid, 10, q=1e-8) == pytest.approx(16 / 10, rel=1e-6)
    # GELU'(0) = 1/2: four times the linear rule
    assert hessian_variance(nn.GELU(), 10, q=1e-8) == pytest.approx(4 / 10, rel=1e-5)


def test_config_validation():
    for bad in (
        {"mode": "x"},
        {"fan": "both"},
        {"keep_prob": 0.0},
        {"redraw": True},
        {"nodes": 7},
        {"target": "lr"},
        {"target": "equal", "lr": 0.1},
        {"norm": "nuclear"},
        {"tol": 0.0},
        {"iterations": 0},
    ):
        with pytest.raises(initopt.ConfigError):
            HessianInitConfig(**bad)
    with pytest.raises(initopt.ConfigError, match="hessian_normal_"):
        initopt.initialize_(nn.Linear(2, 2), (torch.randn(4, 2), torch.randint(0, 2, (4,))), "hessian", redraw=True)


# ---- tracing ------------------------------------------------------------------------------


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 7)
        self.b = nn.Linear(7, 7)
        self.c = nn.Linear(7, 6)
        self.d = nn.Linear(6, 6)
        self.e = nn.Linear(6, 3)

    def forward(self, x):
        h = F.gelu(self.a(x), approximate="tanh")  # functional, with a keyword
        h = torch.tanh(0.5 * self.b(h))  # scalar factor, then the nonlinearity
        h = F.dropout(F.relu(self.c(h), inplace=True), p=0.25, training=self.training)
        u = self.d(h)
        h = u * torch.sigmoid(u)  # SiLU by hand: u is used twice
        return self.e(h)


def _trace(model, batch):
    space = ScaleSpace(model)
    ev = Evaluator(model, space, Task())
    with search_mode(model):
        layers, _ = trace_layers(model, ev, batch)
    return {info.module: info for info in layers}


def test_trace_finds_functional_composed_and_dropout_activations():
    torch.manual_seed(0)
    model = _Custom().double()
    x = torch.randn(16, 5, dtype=torch.float64)
    layers = _trace(model, (x, torch.randint(0, 3, (16,))))
    assert list(layers) == ["a", "b", "c", "d", "e"]
    t = torch.linspace(-3, 3, 11, dtype=torch.float64)
    assert torch.allclose(layers["a"].activation(t), F.gelu(t, approximate="tanh"))
    assert torch.allclose(layers["b"].activation(t), torch.tanh(0.5 * t))
    assert torch.allclose(layers["c"].activation(t), torch.relu(t))
    assert layers["c"].keep_prob == 0.75 and layers["a"].keep_prob == 1.0
    assert layers["d"].activation is None and "more than one operation" in layers["d"].note
    assert layers["e"].activation_name.startswith("identity")
    assert (layers["a"].fan_in, layers["a"].fan_out) == (5, 7)


def test_trace_notes_batchnorm_residual_and_ties_and_strict_raises():
    torch.manual_seed(0)
    cnn = zoo.cnn(channels=(4, 8), batchnorm=True)
    layers = _trace(cnn, (torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))))
    assert "batch_norm" in layers["0"].note and layers["0"].activation is None
    lm = zoo.tied_lm()
    ids = torch.randint(0, 32, (4, 6))
    layers = _trace(lm, {"input_ids": ids, "labels": ids})
    assert "summed" in layers["mix.0"].note and layers["mix.0"].activation is None  # h + mix(h)
    assert "add" in layers["mix.2"].note
    assert "tied" in layers["head"].note
    with pytest.raises(initopt.ConfigError, match=r"layer '0'.*batch_norm"):
        initopt.initialize_(cnn, (torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))), "hessian", strict=True)
    res = initopt.initialize_(cnn, (torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))), "hessian")
    assert res.scales["0.weight"] == 1.0 and res.scales["10.weight"] != 1.0
    assert any(h.get("param") == "0.weight" and "batch_norm" in h.get("skipped", "") for h in res.history)


# ---- the analytic initialization ----------------------------------------------------------


def test_relu_mlp_gets_he_variance_through_the_scale_path():
    torch.manual_seed(0)
    model = zoo.mlp(depth=4, width=32, in_features=12).double()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = (torch.randn(64, 12, dtype=torch.float64), torch.randint(0, 10, (64,)))
    res = initopt.initialize_(model, batch, "hessian")
    for name, p in model.named_parameters():
        if p.ndim == 2:
            fan = p.shape[1]
            target = 1 / fan if name.startswith("9.") else 2 / fan  # output layer: identity
            assert float((p.detach() ** 2).mean()) == pytest.approx(target, rel=1e-12)
            cos = F.cosine_similarity(p.detach().flatten(), w0[name].flatten(), dim=0)
            assert cos > 1 - 1e-12
        else:
            assert res.scales[name] == 1.0 and torch.equal(p.detach(), w0[name])
    assert res.before["loss"] > 0 and res.after["loss"] > 0


def test_fan_out_and_dropout_keep_probability():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 20), nn.ReLU(), nn.Dropout(0.5), nn.Linear(20, 4)).double()
    batch = (torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 4, (32,)))
    initopt.initialize_(model, batch, "hessian")
    assert float((model[0].weight.detach() ** 2).mean()) == pytest.approx(0.5 * 2 / 6, rel=1e-12)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 20), nn.ReLU(), nn.Dropout(0.5), nn.Linear(20, 4)).double()
    initopt.initialize_(model, batch, "hessian", fan="out", keep_prob=1.0)
    assert float((model[0].weight.detach() ** 2).mean()) == pytest.approx(2 / 20, rel=1e-12)
    assert float((model[3].weight.detach() ** 2).mean()) == pytest.approx(1 / 4, rel=1e-12)


def test_tanh_chain_measured_moments_follow_the_mean_field_recursion():
    """The layer-input second moment the rule measures equals E[tanh(z)^2] at the previous q."""
    torch.manual_seed(0)
    model = zoo.mlp(depth=3, width=1024, in_features=64, activation=nn.Tanh).double()
    batch = (torch.randn(256, 64, dtype=torch.float64), torch.randint(0, 10, (256,)))
    res = initopt.initialize_(model, batch, "hessian")
    recs = [h for h in res.history if "variance" in h and h["sweep"] == 1]
    assert len(recs) == 4
    assert recs[0]["input_moment"] == pytest.approx(float((batch[0] ** 2).mean()), rel=1e-9)
    for prev, cur in itertools.pairwise(recs):
        assert cur["input_moment"] == pytest.approx(expect(torch.tanh, prev["q"]), rel=0.03)
    for r in recs[:-1]:
        assert r["variance"] == pytest.approx(1 / (r["fan"] * expect(torch.tanh, r["q"], derivative=True)), rel=1e-9)


def test_hessian_normal_redraws_with_the_rule_variance():
    torch.manual_seed(0)
    model = zoo.mlp(depth=2, width=256, in_features=64).double()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = [id(p) for p in model.parameters()]
    batch = (torch.randn(32, 64, dtype=torch.float64), torch.randint(0, 10, (32,)))
    stds = hessian_normal_(model, batch, seed=3)
    assert stds["1.weight"] == pytest.approx(math.sqrt(2 / 64))
    w = model[1].weight.detach()
    assert float(w.std()) == pytest.approx(stds["1.weight"], rel=0.02)
    assert abs(float(F.cosine_similarity(w.flatten(), before["1.weight"].flatten(), dim=0))) < 0.05
    assert [id(p) for p in model.parameters()] == ids
    assert torch.equal(model[1].bias, before["1.bias"])


# ---- the data-driven initialization ------------------------------------------------------


def _deep_mlp(activation=nn.Tanh):
    """Six hidden layers, PyTorch's default init: Hessian-block norms spread over a factor > 5."""
    torch.manual_seed(0)
    return zoo.mlp(depth=6, width=10, in_features=8, activation=activation).double()


def _he_relu_mlp():
    torch.manual_seed(0)
    model = zoo.mlp(depth=6, width=10, in_features=8).double()
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def _deep_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (64,), generator=g)


def _dense_block_norms(model, batch) -> dict[str, tuple[float, float]]:
    """Spectral and Frobenius norm of every weight's Hessian block, from dense Hessians."""
    space = ScaleSpace(model)
    ev = Evaluator(model, space, Task())
    w0 = [t.detach() for t in space.initial]
    out = {}
    with search_mode(model):
        for i, b in enumerate(space.blocks):
            if b.role != "weight":
                continue

            def f(flat, i=i):
                ts = list(w0)
                ts[i] = flat.view(w0[i].shape)
                return ev.loss(ts, batch)

            H = torch.autograd.functional.hessian(f, w0[i].reshape(-1))
            out[b.name] = (float(torch.linalg.eigvalsh(H).abs().max()), float(torch.linalg.norm(H)))
    return out


@pytest.mark.parametrize("norm", ["spectral", "frobenius"])
def test_data_mode_equalizes_per_layer_hessian_norms_within_10_percent(norm):
    model, batch = _deep_mlp(), _deep_batch()
    k = 0 if norm == "spectral" else 1
    spread0 = [v[k] for v in _dense_block_norms(model, batch).values()]
    assert max(spread0) / min(spread0) > 5  # far from equal before
    res = initopt.initialize_(model, batch, "hessian", mode="data", norm=norm, probes=60, iterations=15)
    assert res.history[-1]["converged"]
    vals = [v[k] for v in _dense_block_norms(model, batch).values()]
    target = math.exp(sum(math.log(v) for v in vals) / len(vals))
    assert all(abs(v / target - 1) <= 0.10 for v in vals), (vals, target)
    assert all(s == 1.0 for n, s in res.scales.items() if n.endswith("bias"))


@pytest.mark.parametrize("lr", [0.5, 10.0])
def test_data_mode_reaches_one_over_lr(lr):
    model, batch = _he_relu_mlp(), _deep_batch()
    res = initopt.initialize_(model, batch, "hessian", mode="data", target="lr", lr=lr, iterations=15)
    assert res.history[-1]["converged"]
    vals = [v[0] for v in _dense_block_norms(model, batch).values()]
    assert all(abs(v * lr - 1) <= 0.10 for v in vals), vals


@pytest.mark.parametrize(
    "make,batch",
    [
        (
            lambda: zoo.cnn(channels=(4, 8), batchnorm=True, dropout=0.2),
            lambda: (torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))),
        ),
        (lambda: zoo.tied_lm(), lambda: {"input_ids": (ids := torch.randint(0, 32, (4, 6))), "labels": ids}),
    ],
)
def test_data_mode_runs_on_batchnorm_and_tied_models(make, batch):
    torch.manual_seed(0)
    model = make()
    res = initopt.initialize_(model, batch(), "hessian", mode="data", steps=2, iterations=5)
    assert len(res.history) >= 1 and all(math.isfinite(s) for s in res.scales.values())
