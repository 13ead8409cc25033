"""LSUV: after the search, every affine layer's output variance on the batch used, measured by
plain forward hooks on the baked model (float64), is within ``tol`` of the target."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo_cases import PlainAttention

import initopt
from initopt import zoo
from initopt.methods.lsuv import LSUVConfig

AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 5)
    )


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(12 * 2 * 2, 5),
    )


def _cnn_bn() -> nn.Module:
    return zoo.cnn(channels=(6, 8), batchnorm=True, num_classes=5)


MODELS = {"mlp": (_mlp, (10,)), "cnn": (_cnn, (3, 8, 8)), "cnn_bn": (_cnn_bn, (3, 8, 8))}


def _batch(shape: tuple[int, ...], n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g)


def _make(name: str, factor: float) -> nn.Module:
    torch.manual_seed(1)
    model = MODELS[name][0]().double()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(factor)
    return model


def output_variances(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Population variance of every affine module's output, by plain forward hooks (training mode)."""
    out: dict[str, float] = {}
    handles = []

    def hook(name):
        def f(mod, args, y):
            out[name] = float(y.detach().double().var(correction=0))

        return f

    for name, m in model.named_modules():
        if isinstance(m, AFFINE):
            handles.append(m.register_forward_hook(hook(name)))
    model.train()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return out


@pytest.mark.parametrize("factor", [1.0, 0.25, 4.0])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_affine_output_has_unit_variance(name, factor):
    model = _make(name, factor)
    batch = _batch(MODELS[name][1])
    biases = {n: p.detach().clone() for n, p in model.named_parameters() if p.ndim == 1}
    before = output_variances(model, batch[0])
    if factor != 1.0:
        assert max(abs(v - 1) for v in before.values()) > 0.1  # the case is not trivially satisfied
    res = initopt.initialize_(model, batch, "lsuv")
    after = output_variances(model, batch[0])
    assert len(after) == sum(isinstance(m, AFFINE) for m in model.modules())
    for layer, v in after.items():
        assert abs(v - 1.0) < 0.1, (layer, v)
    for n, b in biases.items():  # biases and norm gains stay at scale 1
        assert torch.equal(dict(model.named_parameters())[n], b)
        assert res.scales.get(n, 1.0) == 1.0
    assert res.after["max_var_error"] < 0.1
    assert res.after["max_var_error"] == pytest.approx(max(abs(v - 1) for v in after.values()), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_other_target_and_tighter_tolerance_on_the_first_batch(name):
    model = _make(name, 1.0)
    shape = MODELS[name][1]
    data = [_batch(shape, seed=s) for s in range(3)]
    initopt.initialize_(model, data, "lsuv", target_var=2.0, tol=1e-3, max_iters=50)
    for layer, v in output_variances(model, data[0][0]).items():
        assert abs(v - 2.0) < 1e-3, (layer, v)


def test_residual_branches_keep_their_scale():
    torch.manual_seed(0)
    model = zoo.post_ln_transformer(dropout=0.0).double()
    g = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, 32, (8, 12), generator=g), torch.randint(0, 4, (8,), generator=g))
    res = initopt.initialize_(model, batch, "lsuv")
    skipped = {h["param"]: h["skipped"] for h in res.history if "skipped" in h}
    branch = [k for k in res.scales if k.startswith("encoder.layers.") and k.endswith("weight") and "norm" not in k]
    assert len(branch) == 8
    for k in branch:
        assert res.scales[k] == 1.0 and "summed" in skipped[k], k
    assert res.scales["head.weight"] != 1.0


def test_attention_projections_are_set():
    torch.manual_seed(0)
    model = PlainAttention().double()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 32, (8, 12), generator=g)
    batch = (tokens, torch.randint(0, 4, (8,), generator=g))
    res = initopt.initialize_(model, batch, "lsuv", tol=0.01)
    seen: dict[str, float] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):

            def pre(mod, args, kwargs, name=name):
                x = args[0]
                seen[name + ".in_proj_weight"] = float(
                    F.linear(x, mod.in_proj_weight, mod.in_proj_bias).var(correction=0)
                )

            def post(mod, args, kwargs, out, name=name):
                seen[name + ".out_proj.weight"] = float(out[0].var(correction=0))

            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True))
        elif isinstance(m, nn.Linear) and not isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear):
            handles.append(
                m.register_forward_hook(
                    lambda mod, a, y, name=name: seen.__setitem__(name + ".weight", float(y.var(correction=0)))
                )
            )
    model.train()
    with torch.no_grad():
        model(tokens)
    for h in handles:
        h.remove()
    assert set(seen) == {"attn.in_proj_weight", "attn.out_proj.weight", "ff.weight", "head.weight"}
    for layer, v in seen.items():
        assert abs(v - 1.0) < 0.01, (layer, v)
        assert res.scales[layer] != 1.0
    skipped = {h["param"]: h["skipped"] for h in res.history if "skipped" in h}
    assert set(skipped) == {"embed.weight"}
    assert "F.embedding" in skipped["embed.weight"]


def test_tied_output_layer_is_left_alone():
    torch.manual_seed(0)
    model = zoo.tied_lm()
    ids = torch.randint(0, 32, (4, 10))
    res = initopt.initialize_(model, {"input_ids": ids, "labels": ids}, "lsuv")
    assert res.scales["embed.weight"] == 1.0
    notes = [h for h in res.history if h.get("param") == "embed.weight"]
    assert notes and "also used by F.embedding" in notes[0]["skipped"]
    assert res.scales["mix.0.weight"] == 1.0 and res.scales["mix.2.weight"] == 1.0  # h + mix(h): a residual branch


def test_zero_output_variance_is_left_at_one_with_a_note():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4, bias=False), nn.Linear(4, 3)).double()
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every ReLU output is 0, so layer 2's output is exactly 0
    x = torch.randn(16, 6, dtype=torch.float64)
    res = initopt.initialize_(model, (x, torch.randint(0, 3, (16,))), "lsuv")
    assert res.scales["2.weight"] == 1.0
    note = [h for h in res.history if h["param"] == "2.weight" and "skipped" in h]
    assert note and "variance is 0" in note[0]["skipped"]
    assert res.scales["0.weight"] != 1.0
    # the last layer sees a constant input: its output variance comes from its bias only
    assert math.isfinite(res.scales["3.weight"])


def test_zero_weight_is_noted():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    with torch.no_grad():
        model[2].weight.zero_()
    x = torch.randn(16, 6, dtype=torch.float64)
    res = initopt.initialize_(model, (x, torch.randint(0, 3, (16,))), "lsuv")
    assert "2.weight" not in res.scales  # unscalable: reported by the framework
    assert "2.weight" in res.unscalable
    assert any(h["param"] == "2.weight" and "norm 0" in h["skipped"] for h in res.history if "skipped" in h)


def test_unreachable_target_stops_after_max_iters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    with torch.no_grad():
        model[0].bias.copy_(torch.linspace(-10, 10, 8, dtype=torch.float64))  # bias variance alone is > 1
    x = torch.randn(16, 6, dtype=torch.float64)
    res = initopt.initialize_(model, (x, torch.randint(0, 3, (16,))), "lsuv", max_iters=4, steps=1)
    first = [h for h in res.history if h["param"] == "0.weight"]
    assert len(first) == 5 and first[-1]["converged"] is False
    assert all(math.isfinite(s) for s in res.scales.values())


def test_history_and_steps():
    model = _make("mlp", 4.0)
    batch = _batch((10,))
    res = initopt.initialize_(model, batch, "lsuv", steps=1)
    sweeps = {h["sweep"] for h in res.history}
    assert sweeps == {1}
    assert all(math.isfinite(h["loss"]) and h["layer"] == "linear" for h in res.history)
    # a second sweep only checks: it adds one entry per layer and no rescaling
    model2 = _make("mlp", 4.0)
    res2 = initopt.initialize_(model2, batch, "lsuv", steps=5)
    assert res2.scales == res.scales
    assert [h for h in res2.history if h["sweep"] == 2] and not [h for h in res2.history if h["sweep"] > 2]


@pytest.mark.parametrize(
    "bad",
    [
        {"tol": -0.1},
        {"tol": 0.0},
        {"tol": math.nan},
        {"target_var": 0.0},
        {"target_var": -1.0},
        {"target_var": math.inf},
        {"max_iters": 0},
        {"max_iters": 2.5},
        {"steps": -1},
        {"orthogonal": True},
    ],
)
def test_bad_config_raises(bad):
    model = _mlp()
    with pytest.raises(initopt.ConfigError):
        initopt.initialize_(model, (torch.randn(4, 10), torch.randint(0, 5, (4,))), "lsuv", **bad)


def test_config_is_frozen_with_paper_defaults():
    cfg = LSUVConfig()
    assert (cfg.target_var, cfg.tol, cfg.max_iters) == (1.0, 0.1, 10)
    with pytest.raises(AttributeError):
        cfg.tol = 0.2  # type: ignore[misc]
    assert "lsuv" in initopt.methods()
    assert initopt.LSUV.Config is LSUVConfig
