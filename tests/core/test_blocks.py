"""Blocks, roles, ties and the one function that writes into the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import initopt
from initopt import zoo
from initopt.core import ScaleSpace, apply_scales_, infer_role


class Custom(nn.Module):
    """Raw parameters with no standard layer: a gain vector, a bias, a matrix, a frozen one."""

    def __init__(self) -> None:
        super().__init__()
        self.mat = nn.Parameter(torch.randn(4, 3))
        self.gain = nn.Parameter(torch.full((3,), 0.5))
        self.shift = nn.Parameter(torch.tensor([0.1, -0.2, 0.3]))
        self.zero = nn.Parameter(torch.zeros(3))
        self.frozen = nn.Parameter(torch.randn(3, 3), requires_grad=False)

    def forward(self, x):
        return ((x @ self.mat) * self.gain + self.shift + self.zero) @ self.frozen


def test_roles_follow_the_tensor_not_names():
    assert infer_role(torch.randn(3, 4)) == "weight"
    assert infer_role(torch.ones(5)) == "gain"
    assert infer_role(-torch.ones(5)) == "gain"
    assert infer_role(torch.tensor([0.1, -0.1])) == "bias"
    assert infer_role(torch.zeros(4)) == "bias"
    space = ScaleSpace(Custom(), min_scale=0.05, max_gain_scale=7.0)
    roles = {b.name: b.role for b in space.blocks}
    assert roles == {"mat": "weight", "gain": "gain", "shift": "bias", "zero": "bias"}
    lo, hi = space.bounds()
    torch.testing.assert_close(lo, torch.tensor([0.05, 0.05, 0.0, 0.0]))
    torch.testing.assert_close(hi, torch.tensor([float("inf"), 7.0, float("inf"), float("inf")]))
    assert space.unscalable == ["zero"]


def test_transformer_raw_parameters_are_blocks():
    space = ScaleSpace(zoo.post_ln_transformer())
    names = {b.name: b.role for b in space.blocks}
    assert names["pos"] == "weight"
    assert names["encoder.layers.0.self_attn.in_proj_weight"] == "weight"
    assert names["encoder.layers.0.norm1.weight"] == "gain"
    assert names["encoder.layers.0.self_attn.in_proj_bias"] == "bias"


def test_tied_weights_are_one_block_with_every_name():
    model = zoo.tied_lm()
    space = ScaleSpace(model)
    tied = [b for b in space.blocks if len(b.names) > 1]
    assert len(tied) == 1 and set(tied[0].names) == {"embed.weight", "head.weight"}
    assert sum(p.numel() for p in model.parameters()) == sum(b.param.numel() for b in space.blocks)


def test_frozen_parameters_are_left_alone():
    torch.manual_seed(0)
    m = Custom()
    frozen = m.frozen.detach().clone()
    res = initopt.initialize_(
        m, torch.randn(8, 4), "gradinit", steps=5, lr=0.1, loss_fn=lambda out, b: out.pow(2).mean()
    )
    assert "frozen" not in res.scales
    assert torch.equal(m.frozen, frozen)
    assert res.unscalable == ("zero",)
    assert torch.equal(m.zero, torch.zeros(3))


def test_apply_scales_in_place_keeps_identity_and_ties():
    model = zoo.tied_lm()
    w = model.embed.weight
    w0 = w.detach().clone()
    apply_scales_(model, {"head.weight": 0.5})
    assert model.embed.weight is w and model.head.weight is w
    torch.testing.assert_close(w.detach(), 0.5 * w0)
    # naming both tied names with one value scales once
    apply_scales_(model, {"head.weight": 2.0, "embed.weight": 2.0})
    torch.testing.assert_close(w.detach(), w0)


@pytest.mark.parametrize(
    "scales,words",
    [
        ({"nope": 1.0}, "no parameter"),
        ({"0.weight": float("nan")}, "finite"),
        ({"head.weight": 2.0, "embed.weight": 3.0}, "tied"),
    ],
)
def test_apply_scales_checks_everything_before_writing(scales, words):
    model = zoo.tied_lm() if "head.weight" in scales else nn.Sequential(nn.Linear(2, 2))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(initopt.ModelError, match=words):
        apply_scales_(model, {**{n: 3.0 for n, _ in list(model.named_parameters())[:1]}, **scales})
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_scale_grad_is_inner_product_with_initial_tensor():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    space = ScaleSpace(model)
    x = torch.randn(5, 3, dtype=torch.float64)
    alpha = torch.tensor([0.9, 1.1, 1.2, 0.8], dtype=torch.float64, requires_grad=True)
    # autograd straight through theta(alpha) ...
    th = space.scaled(alpha)
    out = torch.func.functional_call(model, dict(zip(space.names, th, strict=True)), (x,))
    (direct,) = torch.autograd.grad(out.pow(3).sum(), alpha)
    # ... equals <dJ/dtheta_i, W_i0> through detached leaves
    leaves = space.leaves(alpha)
    out = torch.func.functional_call(model, dict(zip(space.names, leaves, strict=True)), (x,))
    via = space.scale_grad(torch.autograd.grad(out.pow(3).sum(), leaves))
    torch.testing.assert_close(via, direct, rtol=1e-12, atol=1e-12)
