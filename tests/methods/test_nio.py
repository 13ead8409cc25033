"""NIO against independent computations in float64, and its defining post-conditions."""

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
from initopt.core import Evaluator, ScaleSpace, Task, search_mode, split_batch
from initopt.data import digits, loader
from initopt.methods.nio import NIO, NIOConfig


def _tiny(batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(5, 7)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(7))
    layers += [nn.Tanh(), nn.Linear(7, 3)]
    return nn.Sequential(*layers).double()


def _batch(seed: int, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _explicit(params, forward, parts, create_graph=False):
    """Sub-batch gradients by plain autograd, their Gram, B-GC and B-GN (eps = 1e-8)."""
    gs = []
    for x, y in parts:
        g = torch.autograd.grad(F.cross_entropy(forward(params, x), y), params, create_graph=create_graph)
        gs.append(torch.cat([t.reshape(-1) for t in g]))
    m = torch.stack(gs)
    gram = m @ m.T
    d = len(parts)
    n = gram.diagonal().sqrt()
    gc = sum(gram[k, l] / (n[k] * n[l] + 1e-8) for k in range(d) for l in range(d) if k != l) / (d * (d - 1))
    return gc, n.mean()


def _mlp_forward(params, x):
    w1, b1, w2, b2 = params
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def test_defaults_are_the_released_configuration():
    cfg = NIOConfig()
    assert (cfg.num_splits, cfg.gamma, cfg.lr, cfg.steps, cfg.mu, cfg.target) == (4, 10.0, 3e-3, 100, 1.0, "gc_gn")
    assert cfg.eps > 0 and cfg.mode == "train" and cfg.clip == 1.0


def test_bad_config_values():
    for bad in (
        {"num_splits": 1},
        {"num_splits": "all"},
        {"num_splits": True},
        {"target": "gn"},
        {"gamma": 0.0},
        {"lr": float("nan")},
        {"mu": -1.0},
        {"eps": -1e-8},
        {"betas": (0.9, 1.0)},
        {"mode": "inference"},
        {"clip": 0.0},
        {"min_scale": 0.0},
    ):
        with pytest.raises(initopt.ConfigError):
            NIOConfig(**bad)
    with pytest.raises(initopt.ConfigError, match="unknown config key"):
        initopt.initialize_(_tiny(), _batch(0), "nio", splits=2)


def test_batch_smaller_than_num_splits_is_a_data_error():
    with pytest.raises(initopt.DataError, match="cannot be split"):
        initopt.initialize_(_tiny(), _batch(0, n=3), "nio", num_splits=4, steps=1)


@pytest.mark.parametrize(
    "target,gamma,branch", [("gc_gn", 1e9, "objective"), ("gc", 1e9, "objective"), ("gc_gn", 1e-9, "constraint")]
)
@pytest.mark.parametrize("accelerate", [True, False])
def test_iteration_scale_gradient_equals_finite_differences(target, gamma, branch, accelerate):
    model = _tiny()
    space = ScaleSpace(model)
    ev = Evaluator(model, space, Task())
    nio = NIO(num_splits=4, target=target, gamma=gamma, mu=0.7, accelerate=accelerate)
    S = _batch(1)
    alpha0 = torch.tensor([1.3, 0.7, 0.9, 1.1], dtype=torch.float64)
    with search_mode(model):
        grad, rec = nio.iteration(ev, alpha0, S)
    assert rec["branch"] == branch
    w0 = [p.detach() for p in model.parameters()]

    def J(alpha):
        params = [(w * a).requires_grad_() for w, a in zip(w0, alpha, strict=True)]
        gc, gn = _explicit(params, _mlp_forward, split_batch(S, 4))
        if branch == "constraint":
            return float(gn)
        return float(-gc - (0.7 * gn if target == "gc_gn" else 0.0))

    h = 1e-6
    fd = torch.stack(
        [
            torch.tensor((J(alpha0 + h * e) - J(alpha0 - h * e)) / (2 * h), dtype=torch.float64)
            for e in torch.eye(4, dtype=torch.float64)
        ]
    )
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("branch", ["objective", "constraint"])
def test_euler_scale_gradient_equals_plain_autograd_and_finite_differences(conv, branch):
    """projected_grads (Euler's identity through the not-accelerated conv/linear tensors) gives
    the scale gradient of plain autograd, and central differences, in float64."""
    from initopt.core.cosine import build_plan

    torch.manual_seed(0)
    if conv:
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(8, 3)
        ).double()
        g = torch.Generator().manual_seed(3)
        S = torch.randn(8, 2, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
    else:
        model, S = _tiny(), _batch(1)
    space = ScaleSpace(model)
    ev = Evaluator(model, space, Task())
    gamma = 1e9 if branch == "objective" else 1e-9
    alpha0 = torch.linspace(0.7, 1.3, len(space), dtype=torch.float64)
    grads = {}
    with search_mode(model):
        plans = {"plain": None, "accelerated": build_plan(ev, S, max_examples=None)}
        for key, projected, min_macs in (("euler", True, 0), ("autograd", False, 0), ("gated", True, 10**12)):
            for pname, plan in plans.items():
                nio = NIO(num_splits=4, gamma=gamma, mu=0.7, projected_grads=projected, projected_min_macs=min_macs)
                grads[key, pname], rec = nio.iteration(ev, alpha0, S, plan)
                assert rec["branch"] == branch
    for key in grads:
        torch.testing.assert_close(grads[key], grads["autograd", "plain"], rtol=1e-9, atol=1e-12)
    w0 = [p.detach() for p in model.parameters()]

    def J(alpha):
        params = [(w * a).requires_grad_() for w, a in zip(w0, alpha, strict=True)]
        gs = []
        for x, y in split_batch(S, 4):
            out = torch.func.functional_call(
                model, dict(zip([n for n, _ in model.named_parameters()], params, strict=True)), (x,)
            )
            g = torch.autograd.grad(F.cross_entropy(out, y), params)
            gs.append(torch.cat([t.reshape(-1) for t in g]))
        G = torch.stack(gs)
        gram = G @ G.T
        n = gram.diagonal().sqrt()
        cos = gram / (n[:, None] * n[None, :] + 1e-8)
        gc = (cos.sum() - cos.diagonal().sum()) / 12
        return float(n.mean()) if branch == "constraint" else float(-gc - 0.7 * n.mean())

    h = 1e-6
    eye = torch.eye(len(space), dtype=torch.float64)
    fd = torch.tensor([(J(alpha0 + h * e) - J(alpha0 - h * e)) / (2 * h) for e in eye], dtype=torch.float64)
    torch.testing.assert_close(grads["euler", "plain"], fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("n", [8, 10])  # equal sub-batches (batched dense path) and unequal (per-part slices)
def test_fused_engine_scale_gradient_equals_finite_differences(n):
    """One forward for all sub-batches (NIO.fused_ok holds for a model without BatchNorm): the
    scale gradient equals central differences of B-GC/B-GN recomputed per sub-batch by autograd."""
    from initopt.core.cosine import build_plan

    model = _tiny()
    space = ScaleSpace(model)
    ev = Evaluator(model, space, Task())
    nio = NIO(num_splits=4, gamma=1e9, mu=0.7)
    S = _batch(1, n)
    alpha0 = torch.tensor([1.3, 0.7, 0.9, 1.1], dtype=torch.float64)
    with search_mode(model):
        plan = build_plan(ev, S, max_examples=None)
        assert not plan.fallback and nio.fused_ok(ev, S, plan)
        grad, rec = nio.iteration(ev, alpha0, S, plan, fused=True)
        slow, rec_slow = nio.iteration(ev, alpha0, S, plan)
    torch.testing.assert_close(grad, slow, rtol=1e-10, atol=1e-13)
    assert rec["gc"] == pytest.approx(rec_slow["gc"], rel=1e-12)
    w0 = [p.detach() for p in model.parameters()]

    def J(alpha):
        params = [(w * a).requires_grad_() for w, a in zip(w0, alpha, strict=True)]
        gc, gn = _explicit(params, _mlp_forward, split_batch(S, 4))
        return float(-gc - 0.7 * gn)

    h = 1e-6
    fd = torch.stack(
        [
            torch.tensor((J(alpha0 + h * e) - J(alpha0 - h * e)) / (2 * h), dtype=torch.float64)
            for e in torch.eye(4, dtype=torch.float64)
        ]
    )
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-9)


def test_fused_engine_matches_on_a_cnn_and_is_refused_with_batchnorm():
    from initopt.core.cosine import build_plan

    g = torch.Generator().manual_seed(0)
    for batchnorm, expected in ((False, True), (True, False)):
        torch.manual_seed(0)
        model = zoo.cnn(channels=(3, 4), batchnorm=batchnorm).double()
        S = (torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (8,), generator=g))
        space = ScaleSpace(model)
        ev = Evaluator(model, space, Task())
        nio = NIO(num_splits=2)
        with search_mode(model):
            plan = build_plan(ev, S, max_examples=None)
            assert nio.fused_ok(ev, S, plan) is expected
            if expected:
                alpha = torch.linspace(0.8, 1.2, len(space), dtype=torch.float64)
                fast, _ = nio.iteration(ev, alpha, S, plan, fused=True)
                slow, _ = nio.iteration(ev, alpha, S, plan)
                torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-13)
    res = initopt.initialize_(
        zoo.mlp(depth=2, width=8, in_features=5).double(), [_batch(2)], "nio", steps=2, guard=False
    )
    assert res.info["engine"] == "fused"


# ---- one loop, re-computed by hand ------------------------------------------------------


def _manual_nio(w0, batches, *, steps, d, gamma, mu, lr, betas=(0.9, 0.999), eps=1e-8, clip=1.0, min_scale=0.01):
    """NIO written out with plain autograd per sub-batch and Python floats for Adam."""
    alpha = [1.0] * len(w0)
    m = {"constraint": [0.0] * len(w0), "objective": [0.0] * len(w0)}
    t = {"constraint": 0, "objective": 0}
    v = [0.0] * len(w0)
    branches = []
    for k in range(steps):
        S = batches[k % len(batches)]
        a = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
        theta = [w * a[i] for i, w in enumerate(w0)]
        gc, gn = _explicit(theta, _mlp_forward, split_batch(S, d), create_graph=True)
        kind = "constraint" if float(gn.detach()) > gamma else "objective"
        (da,) = torch.autograd.grad(gn if kind == "constraint" else -gc - mu * gn, a)
        branches.append(kind)
        t[kind] += 1
        for i in range(len(alpha)):
            gi = min(max(float(da[i]), -clip), clip)
            m[kind][i] = betas[0] * m[kind][i] + (1 - betas[0]) * gi
            v[i] = betas[1] * v[i] + (1 - betas[1]) * gi * gi
            mh = m[kind][i] / (1 - betas[0] ** t[kind])
            vh = v[i] / (1 - betas[1] ** (k + 1))
            alpha[i] = max(alpha[i] - lr * mh / (math.sqrt(vh) + eps), 0.0 if w0[i].ndim == 1 else min_scale)
    return alpha, branches


def test_loop_equals_hand_written_recomputation():
    model = _tiny()
    w0 = [p.detach().clone() for p in model.parameters()]
    batches = [_batch(s) for s in range(3)]
    # gamma between the norms seen so that both branches occur
    cfg = {"num_splits": 2, "gamma": 0.65, "mu": 0.5, "lr": 0.1}
    alpha_ref, branches_ref = _manual_nio(w0, batches, steps=8, d=2, gamma=0.65, mu=0.5, lr=0.1)
    res = initopt.initialize_(model, batches, "nio", steps=8, **cfg)
    assert [h["branch"] for h in res.history] == branches_ref
    assert set(branches_ref) == {"constraint", "objective"}
    names = [n for n, _ in model.named_parameters()]
    torch.testing.assert_close(
        torch.tensor([res.scales[n] for n in names]), torch.tensor(alpha_ref), rtol=1e-9, atol=1e-12
    )


def test_accelerated_and_plain_engines_give_the_same_search():
    torch.manual_seed(0)
    model = zoo.cnn(channels=(4, 6), batchnorm=True).double()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (8,), generator=g))]
    runs = [
        initopt.initialize_(copy.deepcopy(model), data, "nio", steps=4, lr=0.05, num_splits=2, accelerate=a)
        for a in (True, False)
    ]
    for n in runs[0].scales:
        assert runs[0].scales[n] == pytest.approx(runs[1].scales[n], rel=1e-9)


def test_sample_wise_variant_uses_one_group_per_example():
    model = _tiny(batchnorm=False)
    S = _batch(2, n=6)
    space = ScaleSpace(model)
    ev = Evaluator(model, space, Task())
    with search_mode(model):
        _, rec = NIO(num_splits="batch", gamma=1e9).iteration(ev, space.ones(), S)
    gc, gn = _explicit(list(model.parameters()), _mlp_forward, split_batch(S, 6))
    assert rec["gc"] == pytest.approx(float(gc), rel=1e-10)
    assert rec["gn"] == pytest.approx(float(gn), rel=1e-10)
    res = initopt.initialize_(model, S, "nio", num_splits="batch", steps=2)
    assert len(res.history) == 2


# ---- post-conditions --------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_postcondition_gc_rises_on_held_out_batches(seed):
    """Target ``gc`` with the bound inactive: B-GC (4 sub-batches) and sample-wise GC on
    held-out digits batches rise for a 6-hidden-layer ReLU MLP (PyTorch default init)."""
    train, test = digits()
    held = list(loader(test, 64, seed=1))[:4]
    torch.manual_seed(seed)
    model = zoo.mlp(depth=6, width=64, in_features=64)

    def measure(d):
        return sum(initopt.grad_cosine(model, b, num_splits=d).gc for b in held) / len(held)

    before = measure(4), measure(None)
    res = initopt.initialize_(
        model, loader(train, 64, seed=seed), "nio", target="gc", gamma=1e9, steps=40, lr=0.02, seed=seed
    )
    after = measure(4), measure(None)
    assert all(h["branch"] == "objective" for h in res.history)
    assert after[0] > before[0] + 0.05, (before, after)
    assert after[1] > before[1], (before, after)
    assert res.after["gc"] > res.before["gc"]


def test_constraint_steps_bring_the_norm_under_gamma():
    """Starting above gamma, constraint steps lower B-GN step by step until it is under gamma;
    afterwards the search keeps it near the bound."""
    torch.manual_seed(0)
    model = zoo.mlp(depth=3, width=32, in_features=12)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(32, 12, generator=g), torch.randint(0, 10, (32,), generator=g))
    res = initopt.initialize_(copy.deepcopy(model), batch, "nio", steps=40, gamma=1.0, lr=0.05, guard=False)
    gn = [h["gn"] for h in res.history]
    first = next(i for i, h in enumerate(res.history) if h["branch"] == "objective")
    assert first > 1 and gn[0] > 1.0
    assert all(h["branch"] == "constraint" for h in res.history[:first])
    assert all(b < a for a, b in itertools.pairwise(gn[: first + 1]))
    assert gn[first] <= 1.0 and max(gn[first:]) < 1.2
    # stopping right after the constraint phase leaves the model under the bound
    res = initopt.initialize_(model, batch, "nio", steps=first, gamma=1.0, lr=0.05, guard=False)
    assert res.after["gn"] <= 1.0 < res.before["gn"]
    assert initopt.grad_cosine(model, batch, num_splits=4).gn <= 1.0
