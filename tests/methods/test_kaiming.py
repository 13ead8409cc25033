"""Kaiming scale: after the call, every affine weight's RMS (float64) equals gain/sqrt(fan)
with the fan worked out by hand from the layer's constructor arguments."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from zoo_cases import PlainAttention

import initopt
from initopt import zoo
from initopt.methods.kaiming import KaimingConfig, fans


class Net(nn.Module):
    """Linear, grouped Conv2d, Conv1d, Conv3d and an embedding, with known fans."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.c1 = nn.Conv1d(4, 6, 3, padding=1)  # fan_in 4*3, fan_out 6*3
        self.c2 = nn.Conv2d(6, 8, (3, 2), groups=2)  # fan_in 3*3*2, fan_out 8*3*2
        self.c3 = nn.Conv3d(1, 2, 2, bias=False)  # fan_in 1*8, fan_out 2*8
        self.fc = nn.Linear(8 + 2, 5)  # fan_in 10, fan_out 5
        self.gain = nn.Parameter(torch.full((5,), 0.5))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.c1(self.embed(ids).transpose(1, 2))  # (n, 6, 6)
        a = self.c2(torch.relu(h).unsqueeze(-1).expand(-1, -1, -1, 2)).mean(dim=(2, 3))  # (n, 8)
        b = self.c3(h[:, :1].reshape(-1, 1, 1, 1, 6).expand(-1, -1, 2, 2, -1)).mean(dim=(2, 3, 4))  # (n, 2)
        return self.fc(torch.cat([a, b], 1)) * self.gain


HAND = {  # weight: (fan_in, fan_out)
    "c1.weight": (4 * 3, 6 * 3),
    "c2.weight": (3 * 3 * 2, 8 * 3 * 2),
    "c3.weight": (1 * 8, 2 * 8),
    "fc.weight": (10, 5),
}


def _data(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 11, (n, 6), generator=g), torch.randint(0, 5, (n,), generator=g)


def _net() -> Net:
    torch.manual_seed(0)
    return Net().double()


def _rms(t: torch.Tensor) -> float:
    return math.sqrt(float((t.detach().double() ** 2).mean()))


@pytest.mark.parametrize("factor", [1.0, 0.25, 4.0])
@pytest.mark.parametrize(
    "cfg,gain,which",
    [({}, math.sqrt(2), 0), ({"gain": 1.0}, 1.0, 0), ({"fan": "out", "gain": 5 / 3}, 5 / 3, 1)],
)
def test_rms_is_gain_over_sqrt_fan(cfg, gain, which, factor):
    model = _net()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(factor)
    fixed = {n: p.detach().clone() for n, p in model.named_parameters() if n not in HAND}
    res = initopt.initialize_(model, _data(), "kaiming", **cfg)
    params = dict(model.named_parameters())
    for name, fan in HAND.items():
        want = gain / math.sqrt(fan[which])
        assert _rms(params[name]) == pytest.approx(want, rel=1e-12), name
        assert res.scales[name] != 1.0
    for name, value in fixed.items():  # embedding, biases and gains untouched
        assert torch.equal(params[name], value), name
        assert res.scales.get(name, 1.0) == 1.0
    assert any(h["param"] == "embed.weight" and "F.embedding" in h["skipped"] for h in res.history if "skipped" in h)


def test_std_mode_sets_the_centred_standard_deviation():
    model = _net()
    with torch.no_grad():
        model.fc.weight.add_(0.3)  # a non-zero mean: RMS and std now differ
    initopt.initialize_(model, _data(), "kaiming", mode="std")
    w = model.fc.weight.detach()
    assert float(w.std(correction=0)) == pytest.approx(math.sqrt(2) / math.sqrt(10), rel=1e-12)
    assert _rms(w) > math.sqrt(2) / math.sqrt(10) * 1.01


def test_idempotent_and_more_steps_change_nothing():
    a, b = _net(), _net()
    r1 = initopt.initialize_(a, _data(), "kaiming")
    r3 = initopt.initialize_(b, _data(), "kaiming", steps=3)
    assert r1.scales == r3.scales
    again = initopt.initialize_(a, _data(), "kaiming")
    assert all(s == pytest.approx(1.0, rel=1e-12) for s in again.scales.values())
    assert math.isfinite(r1.before["loss"]) and math.isfinite(r1.after["loss"])


def test_attention_and_tied_models():
    torch.manual_seed(0)
    model = PlainAttention().double()
    tokens = torch.randint(0, 32, (4, 12))
    res = initopt.initialize_(model, (tokens, torch.randint(0, 4, (4,))), "kaiming", gain=1.0)
    w = model.attn.in_proj_weight
    assert w.shape == (48, 16) and _rms(w) == pytest.approx(1 / 4, rel=1e-12)  # fan_in = d_model
    assert _rms(model.attn.out_proj.weight) == pytest.approx(1 / 4, rel=1e-12)
    assert res.scales["embed.weight"] == 1.0

    # a post-LN Transformer: every projection sits in a residual branch and keeps its scale
    torch.manual_seed(0)
    model = zoo.post_ln_transformer(d_model=16, nhead=2)
    res = initopt.initialize_(model.double(), (tokens, torch.randint(0, 4, (4,))), "kaiming", gain=1.0)
    skipped = {h["param"]: h["skipped"] for h in res.history if "skipped" in h}
    for layer in range(2):
        for name in ("self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight", "linear2.weight"):
            key = f"encoder.layers.{layer}.{name}"
            assert res.scales[key] == 1.0 and "summed" in skipped[key]
    assert _rms(model.head.weight) == pytest.approx(1 / 4, rel=1e-12)
    assert res.scales["pos"] == 1.0 and res.scales["embed.weight"] == 1.0

    torch.manual_seed(0)
    lm = zoo.tied_lm()
    ids = torch.randint(0, 32, (4, 10))
    res = initopt.initialize_(lm, {"input_ids": ids, "labels": ids}, "kaiming")
    assert res.scales["embed.weight"] == 1.0  # the head is tied to the embedding
    assert res.scales["mix.0.weight"] == 1.0 and res.scales["mix.2.weight"] == 1.0  # h + mix(h)


def test_fans_follow_torch_nn_init():
    for shape in [(5, 10), (8, 3, 3, 2), (2, 1, 2, 2, 2), (6, 4, 3), (48, 16)]:
        w = torch.empty(shape)
        assert fans(shape) == nn.init._calculate_fan_in_and_fan_out(w)
    with pytest.raises(initopt.ConfigError):
        fans((5,))


@pytest.mark.parametrize(
    "bad",
    [
        {"gain": 0.0},
        {"gain": -1.0},
        {"gain": math.nan},
        {"fan": "both"},
        {"mode": "var"},
        {"mode": "train"},
        {"steps": -1},
        {"a": 0.0},
    ],
)
def test_bad_config_raises(bad):
    with pytest.raises(initopt.ConfigError):
        initopt.initialize_(_net(), _data(), "kaiming", **bad)


def test_config_defaults():
    cfg = KaimingConfig()
    assert (cfg.gain, cfg.fan, cfg.mode, cfg.steps) == (math.sqrt(2), "in", "rms", 1)
    assert initopt.Kaiming.Config is KaimingConfig and "kaiming" in initopt.methods()
