"""GradInit against independent computations in float64."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import initopt
from initopt import zoo
from initopt.core import Evaluator, ScaleSpace, Task
from initopt.data import digits, loader
from initopt.methods.gradinit import GradInit, GradInitConfig


def _tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _batch(seed: int, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _setup(**cfg):
    model = _tiny_mlp()
    space = ScaleSpace(model)
    ev = Evaluator(model, space, Task())
    return model, space, ev, GradInit(**cfg)


def _central_diff(f, alpha: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    out = torch.zeros_like(alpha)
    for i in range(len(alpha)):
        e = torch.zeros_like(alpha)
        e[i] = h
        out[i] = (f(alpha + e) - f(alpha - e)) / (2 * h)
    return out


@pytest.mark.parametrize("target,normalize", [("sgd", True), ("sgd", False), ("adam", False)])
def test_lookahead_scale_gradient_equals_finite_differences(target, normalize):
    _, space, ev, gi = _setup(target=target, normalize=normalize, gamma=1e9, eta=0.3)
    S, S2 = _batch(1), _batch(2)
    alpha0 = torch.tensor([1.3, 0.7, 0.9, 1.1], dtype=torch.float64)
    grad, rec = gi.iteration(ev, space, alpha0, S, S2)
    assert rec["branch"] == "objective"

    # the step direction A[g] is held fixed at alpha0 (first order: no gradient through g)
    theta0 = space.leaves(alpha0)
    g = torch.autograd.grad(ev.loss(theta0, S), theta0)
    n = gi.grad_norm(list(g))
    step = [a.detach() for a in gi.step_direction(list(g), n)]

    def J(alpha):
        with torch.no_grad():
            th = [w * a - 0.3 * s for w, a, s in zip(space.initial, alpha, step, strict=True)]
            return ev.loss(th, S2) / 0.3

    torch.testing.assert_close(grad, _central_diff(J, alpha0), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("target", ["sgd", "adam"])
def test_constraint_scale_gradient_equals_finite_differences(target):
    _, space, ev, gi = _setup(target=target, gamma=1e-9)
    S, S2 = _batch(1), _batch(2)
    alpha0 = torch.tensor([1.2, 0.8, 1.1, 0.95], dtype=torch.float64)
    grad, rec = gi.iteration(ev, space, alpha0, S, S2)
    assert rec["branch"] == "constraint"

    def norm(alpha):
        th = [(w * a).requires_grad_() for w, a in zip(space.initial, alpha, strict=True)]
        g = torch.autograd.grad(ev.loss(th, S), th)
        if target == "adam":
            return sum(x.abs().sum() for x in g)
        return math.sqrt(sum(float((x**2).sum()) for x in g))

    torch.testing.assert_close(grad, _central_diff(norm, alpha0), rtol=1e-6, atol=1e-8)


def _tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # fan-in 27: unfold-and-multiply forward, weight gradients
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 4, 3),  # fan-in 72: the look-ahead's direction kernel
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(16, 3),
    ).double()


@pytest.mark.parametrize("gamma,branch", [(1e9, "objective"), (1e-9, "constraint")])
@pytest.mark.parametrize("with_optimizer", [False, True])
def test_projected_scale_gradients_equal_plain_autograd_on_a_cnn(gamma, branch, with_optimizer):
    """Both branches through core.bilinear (Euler / direction kernels) against plain autograd."""
    from initopt.core.step import TrainStep

    model = _tiny_cnn()
    space = ScaleSpace(model)
    ev = Evaluator(model, space, Task())
    g = torch.Generator().manual_seed(3)
    S = (torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g))
    S2 = (torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g))
    alpha0 = torch.linspace(0.7, 1.3, len(space.blocks), dtype=torch.float64)
    step = TrainStep.from_spec((torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}), space) if with_optimizer else None
    out = {}
    for projected in (False, True):
        gi = GradInit(gamma=gamma, eta=0.3, projected_grads=projected, projected_min_macs=0)
        out[projected], rec = gi.iteration(ev, space, alpha0, S, S2, step)
        assert rec["branch"] == branch
    torch.testing.assert_close(out[True], out[False], rtol=1e-10, atol=1e-13)
    assert torch.count_nonzero(out[False]) >= len(space.blocks) - 1


# ---- one loop, re-computed by hand ------------------------------------------------------


def _manual_loss(params, batch):
    w1, b1, w2, b2 = params
    x, y = batch
    h = torch.tanh(x @ w1.T + b1)
    logits = h @ w2.T + b2
    logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return -logp[torch.arange(len(y)), y].mean()


def _manual_gradinit(w0, batches, *, steps, eta, gamma, lr, betas=(0.9, 0.999), eps=1e-8, clip=1.0, min_scale=0.01):
    """GradInit with normalized SGD target, written out with plain Python floats for Adam."""
    alpha = [1.0] * len(w0)
    m = {"constraint": [0.0] * len(w0), "objective": [0.0] * len(w0)}
    t = {"constraint": 0, "objective": 0}
    v = [0.0] * len(w0)
    branches = []
    for k in range(steps):
        S, nxt = batches[k % len(batches)], batches[(k + 1) % len(batches)]
        half = len(S[0]) // 2
        S2 = (torch.cat([S[0][:half], nxt[0][:half]]), torch.cat([S[1][:half], nxt[1][:half]]))
        a = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
        theta = [w * a[i] for i, w in enumerate(w0)]
        g = torch.autograd.grad(_manual_loss(theta, S), theta, create_graph=True)
        n = torch.sqrt(sum((x**2).sum() for x in g))
        if float(n.detach()) > gamma:
            kind = "constraint"
            (da,) = torch.autograd.grad(n, a)
        else:
            kind = "objective"
            step = [(x / n).detach() for x in g]
            moved = [th - eta * s for th, s in zip(theta, step, strict=True)]
            (da,) = torch.autograd.grad(_manual_loss(moved, S2) / eta, a)
        branches.append(kind)
        t[kind] += 1
        total = k + 1
        for i in range(len(alpha)):
            gi = min(max(float(da[i]), -clip), clip)
            m[kind][i] = betas[0] * m[kind][i] + (1 - betas[0]) * gi
            v[i] = betas[1] * v[i] + (1 - betas[1]) * gi * gi
            mh = m[kind][i] / (1 - betas[0] ** t[kind])
            vh = v[i] / (1 - betas[1] ** total)
            alpha[i] -= lr * mh / (math.sqrt(vh) + eps)
            lower = 0.0 if w0[i].ndim == 1 else min_scale
            alpha[i] = max(alpha[i], lower)
    return alpha, branches


def test_loop_equals_hand_written_recomputation():
    model = _tiny_mlp()
    w0 = [p.detach().clone() for p in model.parameters()]
    batches = [_batch(s) for s in range(4)]
    # gamma between the gradient norms seen so that both branches occur
    cfg = {"eta": 0.2, "gamma": 0.45, "lr": 0.2}
    alpha_ref, branches_ref = _manual_gradinit(w0, batches, steps=8, **cfg)
    res = initopt.initialize_(model, batches, "gradinit", steps=8, **cfg)
    assert [h["branch"] for h in res.history] == branches_ref
    assert set(branches_ref) == {"constraint", "objective"}
    names = [n for n, _ in model.named_parameters()]
    torch.testing.assert_close(
        torch.tensor([res.scales[n] for n in names]), torch.tensor(alpha_ref), rtol=1e-10, atol=1e-12
    )
    for p, w, a in zip(model.parameters(), w0, alpha_ref, strict=True):
        torch.testing.assert_close(p.detach(), w * a, rtol=1e-10, atol=0)


# ---- post-conditions --------------------------------------------------------------------


def _lookahead(model: nn.Module, S, S2, eta: float) -> float:
    """L(S2; theta - eta g/||g||), g = grad L(S; theta): plain autograd on a model copy."""
    m = copy.deepcopy(model).train()
    params = list(m.parameters())
    g = torch.autograd.grad(F.cross_entropy(m(S[0]), S[1]), params)
    n = torch.sqrt(sum((x**2).sum() for x in g))
    with torch.no_grad():
        for p, x in zip(params, g, strict=True):
            p.sub_(eta * x / n)
        return float(F.cross_entropy(m(S2[0]), S2[1]))


@pytest.mark.parametrize("seed", [0, 1])
def test_postcondition_lookahead_loss_drops_on_held_out_batches(seed):
    """Deep plain ReLU MLP (10 hidden layers, PyTorch default init) on digits: the look-ahead
    loss L([B0; B2]; theta - eta g/||g||), g from S = B0 + B1, on held-out batches drops."""
    train, test = digits()
    torch.manual_seed(seed)
    model = zoo.mlp(depth=10, width=64, in_features=64)
    held = list(loader(test, 64, seed=1))
    pairs = []
    for S, nxt in itertools.pairwise(held):
        S2 = (torch.cat([S[0][:32], nxt[0][:32]]), torch.cat([S[1][:32], nxt[1][:32]]))
        pairs.append((S, S2))
    before = sum(_lookahead(model, S, S2, 0.1) for S, S2 in pairs) / len(pairs)
    res = initopt.initialize_(model, loader(train, 64, seed=seed), "gradinit", steps=150, lr=0.05, seed=seed)
    after = sum(_lookahead(model, S, S2, 0.1) for S, S2 in pairs) / len(pairs)
    assert after < before - 0.005, (before, after)
    assert res.after["lookahead_loss"] < res.before["lookahead_loss"]


def test_constraint_steps_bring_the_norm_under_gamma():
    torch.manual_seed(0)
    model = zoo.mlp(depth=3, width=32, in_features=12)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(32, 12, generator=g), torch.randint(0, 10, (32,), generator=g)) for _ in range(4)]
    res = initopt.initialize_(model, data, "gradinit", steps=60, gamma=1.0, lr=0.05, guard=False)
    assert res.history[0]["grad_norm"] > 1.0 and res.history[0]["branch"] == "constraint"
    assert res.after["grad_norm"] < 1.0 < res.before["grad_norm"]


def test_transformer_preset_and_gain_cap():
    cfg = GradInitConfig.transformer()
    assert (cfg.target, cfg.eta, cfg.lr, cfg.gamma, cfg.max_gain_scale) == ("adam", 1e-3, 2.5e-3, 1000.0, 100.0)
    assert cfg.betas == (0.9, 0.98)
    torch.manual_seed(0)
    model = zoo.post_ln_transformer(dropout=0.0)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 32, (8, 12), generator=g), torch.randint(0, 4, (8,), generator=g))]
    res = initopt.initialize_(model, data, GradInit(cfg.transformer(lr=50.0, max_gain_scale=1.5, guard=False)), steps=5)
    gains = [n for n in res.scales if n.endswith("norm1.weight") or n.endswith("norm2.weight")]
    assert gains and all(res.scales[n] <= 1.5 + 1e-12 for n in gains)
    assert any(abs(res.scales[n] - 1.5) < 1e-12 for n in gains)


def test_bad_config_values():
    for bad in (
        {"target": "sgdm"},
        {"eta": -1.0},
        {"gamma": 0.0},
        {"lr": float("nan")},
        {"betas": (0.9, 1.0)},
        {"mode": "inference"},
        {"clip": 0.0},
    ):
        with pytest.raises(initopt.ConfigError):
            GradInitConfig(**bad)
