"""``auto``: its measures against training copies by hand, its choice, its record and its errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import initopt
from initopt import zoo
from initopt.methods.auto import AutoConfig

SMALL = {"trial_steps": 4, "holdout": 2, "steps": 4}


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).double()


def _data(n: int = 8, dtype=torch.float64, features: int = 6):
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(16, features, generator=g, dtype=dtype), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)
    ]


def _hand_trial(model: nn.Module, data, cfg: dict, steps: int, opt_cls=torch.optim.SGD, **settings) -> float:
    """Train a copy for ``steps`` steps on the batches after the held-out ones (the data cycled);
    the held-out loss after."""
    settings = settings or {"lr": 0.01, "momentum": 0.9}
    h = cfg["holdout"]
    m = copy.deepcopy(model)
    opt = opt_cls(m.parameters(), **settings)
    for i in range(h, h + steps):
        x, y = data[i % len(data)]
        loss = nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return sum(float(nn.functional.cross_entropy(m(x), y)) for x, y in data[:h]) / h


def test_candidate_measures_equal_training_by_hand_and_the_best_start_wins():
    model, data = _net(), _data()
    cfg = {**SMALL, "starts": ("model", "kaiming"), "learned": ()}
    res = initopt.initialize_(copy.deepcopy(model), data, "auto", **cfg)
    cands = {c["name"]: c for c in res.info["candidates"]}
    n = res.info["trial"]["steps"]
    assert all(c["steps"] == n for c in cands.values())
    assert cands["model"]["holdout_after"] == pytest.approx(_hand_trial(model, data, cfg, n), rel=1e-9)
    kaiming = copy.deepcopy(model)
    initopt.initialize_(kaiming, data, "kaiming")
    assert cands["kaiming"]["holdout_after"] == pytest.approx(_hand_trial(kaiming, data, cfg, n), rel=1e-9)
    assert res.info["choice"] == min(cands.values(), key=lambda c: c["holdout_after"])["name"]


def test_trials_are_extended_until_the_best_start_makes_progress():
    model, data = _net(), _data()
    slow = {**SMALL, "starts": ("model",), "learned": (), "trial_steps": 3, "max_trial_steps": 9}
    res = initopt.initialize_(model, data, "auto", min_progress=0.5, **slow)  # unreachable in 9 steps
    assert res.info["trial"]["steps"] == 9 and not res.info["trial"]["resolved"]
    assert "no start lowered its held-out loss by 50%" in res.info["reason"]
    res = initopt.initialize_(_net(), data, "auto", min_progress=0.0, **slow)  # resolved at once
    assert res.info["trial"]["steps"] == 3 and res.info["trial"]["resolved"]
    c = res.info["candidates"][0]
    assert c["holdout_after"] == pytest.approx(_hand_trial(_net(), data, slow, 3), rel=1e-9)


def test_the_returned_model_is_the_chosen_candidate():
    model, data = _net(), _data()
    out = copy.deepcopy(model)
    res = initopt.initialize_(out, data, "auto", **SMALL)
    chosen = next(c for c in res.info["candidates"] if c["name"] == res.info["choice"])
    n = res.info["trial"]["steps"]
    assert _hand_trial(out, data, SMALL, n) == pytest.approx(chosen["holdout_after"], rel=1e-9)
    assert res.after["trial_holdout_loss"] == chosen["holdout_after"]
    assert [c["name"] for c in res.info["candidates"]][:4] == ["model", "kaiming", "lsuv", "hessian"]
    learned = [c for c in res.info["candidates"] if c["stage"] == "learned"]
    assert [c["name"].split("+")[1] for c in learned] == ["gradinit", "nio"]
    if "+" in res.info["choice"]:  # a learned stage is kept only past the margin
        start = res.info["choice"].split("+")[0]
        s = next(c for c in res.info["candidates"] if c["name"] == start)
        assert chosen["holdout_after"] < 0.98 * s["holdout_after"]
    else:
        assert all(c["holdout_after"] >= 0.98 * chosen["holdout_after"] for c in learned)
    assert all(c["steps"] == n for c in res.info["candidates"] if "steps" in c)  # learned: same trial length


def test_a_deep_plain_net_from_pytorch_default_gets_a_better_start():
    """PyTorch's default init loses the signal in a deep plain ReLU MLP; auto measures that."""
    torch.manual_seed(0)
    model = zoo.mlp(depth=12, width=32, in_features=12, num_classes=3)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(12, 3, generator=g)
    data = []
    for _ in range(12):
        x = torch.randn(32, 12, generator=g)
        data.append((x, (x @ w).argmax(1)))
    res = initopt.initialize_(model, data, "auto", trial_steps=8, steps=4, learned=("gradinit",))
    cands = {c["name"]: c for c in res.info["candidates"]}
    assert res.info["choice"] != "model"
    assert 0.98 * cands["model"]["holdout_after"] > cands[res.info["choice"]]["holdout_after"]


def test_the_training_optimizer_is_used_and_recorded():
    model, data = _net(), _data()
    cfg = {**SMALL, "starts": ("model",), "learned": ()}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    res = initopt.initialize_(model, data, "auto", optimizer=opt, **cfg)
    assert res.info["optimizer"]["optimizer"] == "Adam" and not res.info["optimizer"]["assumed"]
    hand = _hand_trial(_net(), data, cfg, res.info["trial"]["steps"], torch.optim.Adam, lr=3e-3)
    assert res.info["candidates"][0]["holdout_after"] == pytest.approx(hand, rel=1e-9)
    assert opt.state == {} or all(len(s) == 0 for s in opt.state.values())  # its state untouched
    res = initopt.initialize_(_net(), data, "auto", **cfg)
    assert res.info["optimizer"]["assumed"] and res.info["optimizer"]["groups"][0]["lr"] == 0.01


def test_result_carries_the_decision_and_cost():
    res = initopt.initialize_(_net(), _data(), "auto", **SMALL)
    d = json.loads(json.dumps(res.to_dict()))
    assert d["info"]["choice"] == res.info["choice"]
    assert res.info["choice"] in d["info"]["reason"]
    assert d["info"]["cost_train_steps"] > SMALL["trial_steps"]  # at least the trial runs themselves
    assert len(res.history) == len(res.info["candidates"])
    assert "auto" in res.summary() and res.info["choice"] in res.summary()


def test_a_failing_start_is_recorded_and_skipped():
    class Boom(nn.Module):  # LSUV needs an affine layer to rescale: this model has only a gain
        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.ones(6, dtype=torch.float64))
            self.head = nn.Parameter(torch.randn(3, 6, dtype=torch.float64))

        def forward(self, x):
            return (x * self.gain) @ self.head.T

    res = initopt.initialize_(Boom(), _data(), "auto", **SMALL, learned=())
    names = [c["name"] for c in res.info["candidates"]]
    assert names == ["model", "kaiming", "lsuv", "hessian"]
    assert res.info["choice"] in names


@pytest.mark.parametrize(
    "cfg,match",
    [
        ({"starts": ()}, "at least one start"),
        ({"starts": ("gradinit",)}, "not a starting point"),
        ({"starts": ("model", "model")}, "must not repeat"),
        ({"starts": ("nope",)}, "unknown method 'nope'"),
        ({"learned": ("metainit",)}, "learned stages are"),
        ({"trial_steps": 0}, "trial_steps must be a positive integer"),
        ({"holdout": 1.5}, "holdout must be a positive integer"),
        ({"margin": 1.0}, r"margin must be in \[0, 1\)"),
    ],
)
def test_bad_config_is_a_config_error(cfg, match):
    with pytest.raises(initopt.ConfigError, match=match):
        AutoConfig(**cfg)


def test_steps_zero_is_a_no_op():
    model = _net()
    before = [p.detach().clone() for p in model.parameters()]
    res = initopt.initialize_(model, _data(), "auto", steps=0)
    assert all(s == 1.0 for s in res.scales.values())
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_every_start_diverging_is_an_error_and_leaves_the_model():
    torch.manual_seed(0)
    model = nn.Linear(6, 3).double()
    before = [p.detach().clone() for p in model.parameters()]

    def mse(out, batch):
        return (out - batch[1][:, None].double()).pow(2).mean()

    with pytest.raises(initopt.InitOptError, match="every start failed or diverged"):
        initopt.initialize_(
            model,
            _data(),
            "auto",
            loss_fn=mse,
            **{**SMALL, "trial_steps": 200},
            starts=("model", "kaiming"),
            optimizer=(torch.optim.SGD, {"lr": 1e3}),
        )
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_compare_gives_the_training_optimizer_to_the_named_inits_only(monkeypatch):
    from torch.utils.data import TensorDataset

    from initopt import compare as cmp

    seen = {}
    real = cmp.initialize_

    def spy(model, data, spec, **kw):
        seen[spec if isinstance(spec, str) else spec[0]] = kw.get("optimizer")
        return real(model, data, spec, **kw)

    monkeypatch.setattr(cmp, "initialize_", spy)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    ds = TensorDataset(x, y)
    rep = cmp.compare(
        lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)),
        ds,
        ds,
        [("gradinit", ("gradinit", {"steps": 1})), ("auto", ("auto", SMALL))],
        seeds=[0],
        steps=2,
        batch_size=16,
        lr=0.01,
        pass_optimizer=["auto"],
    )
    assert seen["gradinit"] is None and isinstance(seen["auto"], torch.optim.SGD)
    assert next(r for r in rep.runs if r["init"] == "auto")["init_choice"]
    assert cmp.models_a_step(["hessian", "gradinit"]) and not cmp.models_a_step("hessian")
    assert not cmp.models_a_step(("gradinit", {}), ["auto"])


def test_progress_bar_counts_candidates(monkeypatch):
    from initopt.core import progress as prog

    ticks = []
    monkeypatch.setattr(
        prog.Progress, "update", lambda self, **kw: ticks.append(kw["candidate"]) if "candidate" in kw else None
    )
    initopt.initialize_(_net(), _data(), "auto", progress=True, **SMALL)
    assert ticks[:4] == ["model", "kaiming", "lsuv", "hessian"] and len(ticks) == 6
    assert initopt.get_method("auto")().progress_total(100) == 6 and initopt.get_method("auto")().progress_total(0) == 0
