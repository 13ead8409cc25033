"""MetaInit against finite differences, a hand-written loop, and its defining post-conditions."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo_cases import MODEL_CASES, assert_same, data_for, snapshot

import initopt
from initopt.core import Evaluator, ScaleSpace, Task
from initopt.core.quotient import gradient_quotient
from initopt.methods.metainit import MetaInit, MetaInitConfig


def _tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 4, 3, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(16, 3),
    ).double()


def _img_batch(seed: int, n: int = 5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


# ---- the gradient the update uses ------------------------------------------------------


@pytest.mark.parametrize("projected", [True, False])
def test_norm_gradient_equals_finite_differences(projected):
    """dGQ/drho_j = (dGQ/dalpha_j) / rho0_j, against central differences of GQ in the norms."""
    model = _tiny_cnn()
    space = ScaleSpace(model)
    ev = Evaluator(model, space, Task())
    batch = _img_batch(1)
    alpha = torch.tensor([1.1, 0.9, 0.8, 1.2, 1.05, 0.95], dtype=torch.float64)
    mi = MetaInit(projected_grads=projected, projected_min_macs=0)
    blocks = mi.tuned(space)
    assert blocks == [0, 2, 4]
    d_alpha, gq, _ = mi.objective(ev, space, alpha, batch, blocks)
    rho0 = torch.tensor([space.blocks[i].init_norm for i in blocks], dtype=torch.float64)
    d_rho = d_alpha / rho0

    def gq_at_norms(rho: torch.Tensor) -> float:
        a = alpha.clone()
        a[blocks] = rho / rho0
        theta = space.leaves(a)
        return float(gradient_quotient(ev.loss(theta, batch), theta))

    rho = alpha[blocks] * rho0
    h = 1e-7
    fd = torch.tensor(
        [
            (gq_at_norms(rho + h * e) - gq_at_norms(rho - h * e)) / (2 * h)
            for e in torch.eye(len(blocks), dtype=torch.float64)
        ],
        dtype=torch.float64,
    )
    assert float(gq) == pytest.approx(gq_at_norms(rho), rel=1e-12)
    torch.testing.assert_close(d_rho, fd, rtol=1e-6, atol=1e-9)


def test_projected_and_plain_scale_gradients_agree_on_a_tied_model():
    torch.manual_seed(0)
    model = initopt.zoo.tied_lm().double()
    batch = data_for(MODEL_CASES[-1], 1)[0]
    space = ScaleSpace(model)
    ev = Evaluator(model, space, Task())
    with initopt.core.search_mode(model, "eval"):
        a, _, _ = MetaInit(variant="adam", projected_min_macs=0).objective(
            ev, space, space.ones(), batch, list(range(len(space)))
        )
        b, _, _ = MetaInit(variant="adam", projected_grads=False).objective(
            ev, space, space.ones(), batch, list(range(len(space)))
        )
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_size_threshold_mixes_projected_and_plain_layers_exactly():
    """With ``projected_min_macs`` between the layers' sizes some layers are projected and some
    are not; the scale gradient equals plain autograd's either way (float64)."""
    torch.manual_seed(0)
    model = _tiny_cnn()
    space = ScaleSpace(model)
    ev = Evaluator(model, space, Task())
    batch = _img_batch(3)
    alpha = torch.tensor([1.1, 0.9, 0.8, 1.2, 1.05, 0.95], dtype=torch.float64)
    blocks = MetaInit().tuned(space)
    ref, _, _ = MetaInit(projected_grads=False).objective(ev, space, alpha, batch, blocks)
    for min_macs in (0, 2000, 10**12):
        d, _, _ = MetaInit(projected_min_macs=min_macs).objective(ev, space, alpha, batch, blocks)
        torch.testing.assert_close(d, ref, rtol=1e-10, atol=1e-13)


# ---- one loop, written out by hand -------------------------------------------------------


def _hand_written_metainit(
    model, x_shape, classes, steps, seed, lr=0.1, momentum=0.9, eps=1e-5, min_norm=1e-3, anneal=0.0
):
    """The paper's loop on a copy: in-place norm updates, literal GQ formula with grad of ||g||^2/2.

    Noise is drawn like initopt draws it: one probe batch first, then one batch per step,
    inputs before labels, from one generator seeded with ``seed``. ``anneal > 0``: initopt's
    deviation, the step decays linearly to 0 over the last ``anneal * steps`` steps.
    """
    net = copy.deepcopy(model).eval()
    params = list(net.parameters())
    weights = [p for p in params if p.ndim >= 2]
    floors = [min(min_norm, float(p.detach().norm())) for p in weights]
    memory = [0.0] * len(weights)
    gen = torch.Generator().manual_seed(seed)

    def draw():
        x = torch.randn(x_shape, generator=gen, dtype=torch.float64)
        return x, torch.randint(0, classes, (x_shape[0],), generator=gen)

    draw()  # the probe batch used for before/after
    for t in range(steps):
        lr_t = lr * min(1.0, (steps - t) / (anneal * steps)) if anneal > 0 else lr
        x, y = draw()
        loss = F.cross_entropy(net(x), y)
        g = torch.autograd.grad(loss, params, create_graph=True)
        hg = torch.autograd.grad(sum((gi**2).sum() / 2 for gi in g), params, create_graph=True)
        total = 0
        for gi, hi in zip(g, hg, strict=True):
            s = (2 * (gi >= 0).to(gi.dtype) - 1).detach()
            total = total + ((gi - hi) / (gi + eps * s) - 1).abs().sum()
        gq = total / sum(p.numel() for p in params)
        d = torch.autograd.grad(gq, weights)
        with torch.no_grad():
            for j, (p, dj) in enumerate(zip(weights, d, strict=True)):
                norm = float(p.norm())
                sign = math.copysign(1.0, float((p * dj).sum() / norm)) if float((p * dj).sum()) != 0 else 0.0
                memory[j] = momentum * memory[j] - lr_t * sign
                new = max(norm + memory[j], floors[j])
                p.mul_(new / norm)
    return net


@pytest.mark.parametrize("anneal", [0.0, None], ids=["paper-constant-step", "default-anneal"])
def test_loop_equals_hand_written_paper_loop_on_noise(anneal):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    batch = (torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 4, (10,)))
    kw = {} if anneal is None else {"anneal": anneal}
    ref = _hand_written_metainit(model, (10, 6), 4, steps=12, seed=3, anneal=MetaInitConfig(**kw).anneal)
    res = initopt.initialize_(model, batch, "metainit", guard=False, steps=12, seed=3, **kw)
    assert len(res.history) == 12
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-10, atol=1e-12, msg=n)
    assert all(res.scales[n] == 1.0 for n in ("0.bias", "2.bias", "4.bias"))
    assert any(abs(res.scales[n] - 1.0) > 0.05 for n in ("0.weight", "2.weight", "4.weight"))


# ---- post-conditions ----------------------------------------------------------------------


def _he_scaled(model: nn.Module, factor: float) -> dict[str, float]:
    """Set every weight to ``factor`` times its He norm (Kaiming normal, fan-in, ReLU), biases 0.

    Returns the He norms sqrt(2 / fan_in * numel)."""
    he = {}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim >= 2:
                nn.init.kaiming_normal_(p, mode="fan_in", nonlinearity="relu")
                he[n] = math.sqrt(2.0 / p[0].numel() * p.numel())
                p.mul_(factor * he[n] / p.norm())
            else:
                p.zero_()
    return he


def _scale_error(model: nn.Module, he: dict[str, float]) -> float:
    """|mean over layers of log(norm / He norm)|."""
    params = dict(model.named_parameters())
    return abs(sum(math.log(float(params[n].detach().norm()) / h) for n, h in he.items()) / len(he))


def _plain_cnn(depth: int = 8, width: int = 16) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * 16, 10))


# At the paper's 500 steps (with the default annealing of the step) the scale error ends at
# 0.54-0.79 over seeds 0-9 of all four cases (bound 2/3 log 4 = 0.92), GQ on held-out noise
# 0.41-0.80. MetaInit settles below the He norms (geometric mean 0.45-0.58 of them; GQ is
# smallest there), so the bound is not loose: the method must get there on every CPU (see
# test_recovery_does_not_depend_on_round_off). 200 steps are too few from 4x He: the CNN
# wanders on a plateau at 1-2x He for 28 to 318 steps, depending on round-off.
RECOVERY = [
    pytest.param("mlp", 0.25, 1, id="mlp-quarter"),
    pytest.param("mlp", 4.0, 1, id="mlp-four"),
    pytest.param("cnn", 0.25, 1, id="cnn-quarter"),
    pytest.param("cnn", 4.0, 1, id="cnn-four"),
    # the case that failed on another CPU with the paper's constant step; the sweep over seeds
    # 0-9 of all four cases (0 of 40 fail with the annealed step, 1 of 40 with the constant one)
    # is an experiment, run by hand, not part of the suite
    pytest.param("cnn", 4.0, 2, id="cnn-4.0-seed2", marks=pytest.mark.slow),
]


def _recovery(kind: str, factor: float, seed: int, perturb: float = 0.0) -> tuple[float, float, float, float, Any]:
    """MetaInit at its defaults (the paper's 500 steps, lr, momentum and noise inputs; the step
    annealed at the end) on a deep plain ReLU MLP / CNN
    with all weights at ``factor`` times their He norms, optionally times ``1 + perturb * N(0, 1)``
    elementwise (a round-off-sized change). Returns the scale error and the GQ on held-out noise
    before and after, and the result."""
    torch.manual_seed(seed)
    if kind == "mlp":
        model, shape = initopt.zoo.mlp(depth=8, width=32, in_features=32), (32,)
    else:
        model, shape = _plain_cnn(), (3, 4, 4)
    he = _he_scaled(model, factor)
    if perturb:
        gp = torch.Generator().manual_seed(1000 + seed)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + perturb * torch.randn(p.shape, generator=gp))
    g = torch.Generator().manual_seed(100 + seed)
    batch = (torch.randn(32, *shape, generator=g), torch.randint(0, 10, (32,), generator=g))
    held = [(torch.randn(32, *shape, generator=g), torch.randint(0, 10, (32,), generator=g)) for _ in range(3)]
    before_err = _scale_error(model, he)
    before_gq = sum(initopt.gradient_quotient(model, b).gq for b in held) / len(held)
    res = initopt.initialize_(model, batch, "metainit", guard=False, seed=seed)
    assert len(res.history) == MetaInitConfig().steps
    after_err = _scale_error(model, he)
    after_gq = sum(initopt.gradient_quotient(model, b).gq for b in held) / len(held)
    return before_err, after_err, before_gq, after_gq, res


@pytest.mark.parametrize("kind,factor,seed", RECOVERY)
def test_recovers_from_badly_scaled_he_init(kind, factor, seed):
    """Deep plain ReLU MLP / CNN with all weights at 1/4 or 4 times their He norms: MetaInit
    (paper defaults, noise inputs) shrinks |mean log(norm / He norm)| by at least a third and
    lowers GQ on held-out noise."""
    before_err, after_err, before_gq, after_gq, res = _recovery(kind, factor, seed)
    assert before_err == pytest.approx(math.log(4), rel=1e-5)
    assert after_err <= (2 / 3) * before_err, (before_err, after_err, res.scales)
    assert after_gq < before_gq and res.after["gq"] < res.before["gq"]


@pytest.mark.slow
def test_recovery_does_not_depend_on_round_off():
    """The case that failed on another CPU (CNN from 4x He, seed 2) with the paper's constant
    step: weights changed by 1e-7 relative (what another thread count or CPU does to the
    trajectory) must all recover, to nearly the same scale. With the constant step
    (``anneal=0``) the end point is a random point of the step's oscillation."""
    errs = []
    for perturb in (0.0, 1e-7, -1e-7):
        before_err, after_err, _, after_gq, res = _recovery("cnn", 4.0, 2, perturb)
        assert after_err <= (2 / 3) * before_err, (perturb, after_err, res.scales)
        # settled in the low-GQ basin (~0.6; ~60 at the He norms, 1e3-1e5 on the plateau at
        # 1-2x He that a run too short or not at rest ends on)
        assert after_gq < 1.0 and res.after["gq"] < res.before["gq"], (perturb, after_gq)
        errs.append(after_err)
    # 36 such perturbed runs (1/2 threads, float32/64, weights or inputs) end within 0.68-0.77;
    # with the constant step within 0.64-1.51, and these three at anneal=0 spread 0.62-0.81 at one
    # thread and 0.62-1.00 (past the bound) at two
    assert max(errs) - min(errs) < 0.15, errs


def test_norms_never_reach_zero_or_flip():
    torch.manual_seed(0)
    model = initopt.zoo.mlp(depth=3, width=8, in_features=6)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = (torch.randn(16, 6), torch.randint(0, 10, (16,)))
    res = initopt.initialize_(model, batch, "metainit", guard=False, steps=40, lr=3.0, min_norm=0.05)
    floors = {n: min(0.05, float(w.norm())) for n, w in w0.items() if w.ndim >= 2}
    assert any(
        float(p.detach().norm()) == pytest.approx(floors[n], rel=1e-5)
        for n, p in model.named_parameters()
        if n in floors
    )
    for n, p in model.named_parameters():
        if n in floors:
            assert float(p.detach().norm()) >= floors[n] * (1 - 1e-6)
            assert res.scales[n] > 0
            assert float(F.cosine_similarity(p.detach().flatten(), w0[n].flatten(), dim=0)) > 1 - 1e-6


# ---- noise inputs --------------------------------------------------------------------------


class _Recorder:
    def __init__(self) -> None:
        self.batches: list = []

    def __call__(self, output, batch):
        self.batches.append(tuple(t.detach().clone() for t in batch))
        return F.cross_entropy(output, batch[1])


def test_noise_inputs_are_fresh_standard_normal_and_labels_uniform_over_inferred_classes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 7))
    user = (torch.full((64, 3, 4), 5.0), torch.zeros(64, dtype=torch.long))
    rec = _Recorder()
    initopt.initialize_(model, user, "metainit", guard=False, steps=4, loss_fn=rec, seed=1)
    # validation (user batch), probe before, 4 steps, probe after
    assert len(rec.batches) == 7
    assert torch.equal(rec.batches[0][0], user[0])
    noise = rec.batches[1:-1]
    assert torch.equal(rec.batches[1][0], rec.batches[-1][0])  # the same probe before and after
    xs = torch.stack([b[0] for b in noise])
    assert xs.shape == (5, 64, 3, 4) and xs.dtype == torch.float32
    assert abs(float(xs.mean())) < 0.05 and abs(float(xs.std()) - 1) < 0.05
    assert all(not torch.equal(noise[i][0], noise[i + 1][0]) for i in range(len(noise) - 1))
    ys = torch.cat([b[1] for b in noise])
    assert ys.dtype == torch.long and int(ys.min()) == 0 and int(ys.max()) == 6
    # the same seed draws the same noise; another seed other noise
    rec2, rec3 = _Recorder(), _Recorder()
    initopt.initialize_(copy.deepcopy(model), user, "metainit", guard=False, steps=2, loss_fn=rec2, seed=1)
    initopt.initialize_(copy.deepcopy(model), user, "metainit", guard=False, steps=2, loss_fn=rec3, seed=2)
    assert torch.equal(rec2.batches[2][0], rec.batches[2][0])
    assert not torch.equal(rec3.batches[2][0], rec.batches[2][0])


def test_noise_shape_overrides():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 7))
    user = (torch.randn(8, 12), torch.zeros(8, dtype=torch.long))
    rec = _Recorder()
    initopt.initialize_(
        model, user, "metainit", guard=False, steps=1, loss_fn=rec, input_shape=(3, 4), num_classes=2, batch_size=5
    )
    x, y = rec.batches[1]
    assert x.shape == (5, 3, 4) and y.shape == (5,) and int(y.max()) <= 1


def test_noise_mode_refuses_batches_it_cannot_imitate():
    # token ids (tuple and dict batches) are drawn now (tests/methods/test_metainit_noise.py)
    for mc in MODEL_CASES:
        if mc.name not in ("post_ln_transformer", "tied_lm"):
            continue
        torch.manual_seed(0)
        res = initopt.initialize_(mc.make(), data_for(mc), "metainit", guard=False, steps=2)
        assert len(res.history) == 2
    model = nn.Linear(3, 2)
    before = snapshot(model)
    with pytest.raises(initopt.ConfigError, match="source='batches'"):
        initopt.initialize_(
            model, (torch.randn(4, 3), torch.randn(4, 2)), "metainit", steps=1, loss_fn=lambda o, b: F.mse_loss(o, b[1])
        )
    assert_same(before, snapshot(model))
    with pytest.raises(initopt.ConfigError, match="source='batches'"):
        initopt.initialize_(
            model, torch.randn(4, 3), "metainit", guard=False, steps=1, loss_fn=lambda o, b: o.pow(2).mean()
        )
    # with the user's batches all of them work
    res = initopt.initialize_(
        model,
        torch.randn(4, 3),
        "metainit",
        guard=False,
        steps=2,
        loss_fn=lambda o, b: o.pow(2).mean(),
        source="batches",
    )
    assert len(res.history) == 2


# ---- the adam variant, config ----------------------------------------------------------------


def test_adam_variant_tunes_every_tensor_within_bounds_and_lowers_gq():
    torch.manual_seed(0)
    model = initopt.zoo.mlp(depth=6, width=32, in_features=32)
    _he_scaled(model, 4.0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(-0.1, 0.1)
    batch = (torch.randn(32, 32), torch.randint(0, 10, (32,)))
    res = initopt.initialize_(model, batch, "metainit", guard=False, steps=60, variant="adam", lr=0.05, min_scale=0.2)
    assert set(res.scales) == {n for n, _ in model.named_parameters()}
    assert any(abs(s - 1) > 1e-3 for n, s in res.scales.items() if n.endswith("bias"))
    assert all(s >= 0.2 - 1e-7 for n, s in res.scales.items() if n.endswith("weight"))
    assert all(s >= 0 for s in res.scales.values())
    assert res.after["gq"] < res.before["gq"]


def test_config_validation_and_defaults():
    cfg = MetaInitConfig()
    assert (cfg.lr, cfg.momentum, cfg.steps, cfg.eps, cfg.mode, cfg.source, cfg.variant, cfg.anneal) == (
        0.1,
        0.9,
        500,
        1e-5,
        "eval",
        "noise",
        "sign",
        0.25,
    )
    mi = MetaInit(steps=8, anneal=0.25)
    assert [mi.step_size(t, 8) for t in range(9)] == pytest.approx([0.1] * 7 + [0.05, 0.0])
    assert [MetaInit(anneal=0.0).step_size(t, 8) for t in (0, 7)] == [0.1, 0.1]
    assert MetaInitConfig(input_shape=[3, 4]).input_shape == (3, 4)
    for bad in (
        {"lr": 0.0},
        {"momentum": 1.0},
        {"eps": -1.0},
        {"mode": "inference"},
        {"source": "data"},
        {"variant": "sgd"},
        {"min_norm": 0.0},
        {"num_classes": 0},
        {"batch_size": 1.5},
        {"input_shape": (3, -1)},
        {"clip": 0.0},
        {"beta2": 1.0},
        {"anneal": -0.1},
        {"anneal": 1.5},
    ):
        with pytest.raises(initopt.ConfigError):
            MetaInitConfig(**bad)
    with pytest.raises(initopt.ConfigError, match="valid keys"):
        initopt.initialize_(
            nn.Linear(2, 2), (torch.randn(2, 2), torch.zeros(2, dtype=torch.long)), "metainit", dataset="x"
        )


def test_non_finite_gq_is_reported():
    model = nn.Linear(3, 2)
    calls = {"n": 0}

    def loss_fn(out, batch):
        calls["n"] += 1
        loss = F.cross_entropy(out, batch[1])
        return loss * float("nan") if calls["n"] > 2 else loss

    before = snapshot(model)
    with pytest.raises(initopt.LossError, match="non-finite"):
        initopt.initialize_(
            model, (torch.randn(4, 3), torch.zeros(4, dtype=torch.long)), "metainit", steps=3, loss_fn=loss_fn
        )
    assert_same(before, snapshot(model))
