"""The training optimizer replayed on copies: against the real optimizer on a model copy, in float64."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import initopt
from initopt.core import Evaluator, ScaleSpace, Task
from initopt.core.step import TrainStep, parse_optimizer, trial_run
from initopt.methods.gradinit import GradInit


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _batch(seed: int, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _grads(model: nn.Module, batch) -> list[torch.Tensor]:
    loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
    return list(torch.autograd.grad(loss, list(model.parameters())))


SPECS = [
    (torch.optim.SGD, {"lr": 0.1}),
    (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}),
    (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    (torch.optim.Adam, {"lr": 1e-3}),
    (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1, "betas": (0.8, 0.9)}),
    (torch.optim.RMSprop, {"lr": 1e-3}),
]


@pytest.mark.parametrize("cls,settings", SPECS, ids=lambda x: getattr(x, "__name__", None) or str(x))
def test_first_step_equals_the_real_optimizer_step(cls, settings):
    model = _net()
    g = _grads(model, _batch(0))
    ref = copy.deepcopy(model)
    opt = cls(ref.parameters(), **settings)
    for p, gi in zip(ref.parameters(), g, strict=True):
        p.grad = gi.clone()
    opt.step()
    step = TrainStep.from_spec((cls, settings), ScaleSpace(model))
    theta = [p.detach() for p in model.parameters()]
    moved = step.first_step(theta, g)
    for m, r in zip(moved, ref.parameters(), strict=True):
        torch.testing.assert_close(m, r.detach(), rtol=1e-12, atol=1e-14)
    for t, p in zip(theta, model.parameters(), strict=True):  # inputs untouched
        assert torch.equal(t, p.detach())


def test_instance_groups_are_mapped_and_its_state_is_untouched():
    model = _net()
    opt = torch.optim.SGD(
        [{"params": [model[0].weight], "lr": 0.5}, {"params": [model[2].weight], "lr": 0.01, "momentum": 0.9}],
        lr=0.1,
    )
    for p in model.parameters():  # one real step, so the optimizer has momentum state
        p.grad = torch.ones_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    state = copy.deepcopy(opt.state_dict())
    space = ScaleSpace(model)
    step = TrainStep.from_spec(opt, space)
    assert step.group_of == (0, None, 1, None)  # the biases are in no group: never moved
    g = _grads(model, _batch(1))
    moved = step.first_step([p.detach() for p in model.parameters()], g)
    w = [p.detach() for p in model.parameters()]
    torch.testing.assert_close(moved[0], w[0] - 0.5 * g[0])
    torch.testing.assert_close(moved[2], w[2] - 0.01 * g[2])  # fresh state: the first step is lr * g
    assert torch.equal(moved[1], w[1]) and torch.equal(moved[3], w[3])
    initopt.initialize_(model, [_batch(2), _batch(3)], "gradinit", steps=3, optimizer=opt)
    after = opt.state_dict()
    assert after["param_groups"] == state["param_groups"]
    for k, v in state["state"].items():
        assert torch.equal(after["state"][k]["momentum_buffer"], v["momentum_buffer"])


def test_scale_invariance_tells_adam_from_sgd():
    space = ScaleSpace(_net())
    assert not TrainStep.from_spec((torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}), space).scale_invariant
    assert TrainStep.from_spec((torch.optim.Adam, {"lr": 0.1}), space).scale_invariant
    assert TrainStep.from_spec(torch.optim.AdamW, space).scale_invariant


@pytest.mark.parametrize(
    "spec,match",
    [
        ("sgd", "takes a torch.optim.Optimizer"),
        ((int, {}), "not a torch.optim.Optimizer class"),
        ((torch.optim.SGD, {"lr": -1.0}), "failed"),
        ((torch.optim.SGD, {"foo": 1}), "failed"),
        ((torch.optim.LBFGS, {}), "closure"),
    ],
)
def test_bad_optimizer_specs_are_config_errors(spec, match):
    with pytest.raises(initopt.ConfigError, match=match):
        TrainStep.from_spec(spec, ScaleSpace(_net()))


def test_optimizer_of_another_model_is_an_error_and_changes_nothing():
    model, other = _net(), _net()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(initopt.ConfigError, match="none of the model's trainable parameters"):
        initopt.initialize_(model, _batch(0), "gradinit", steps=2, optimizer=torch.optim.SGD(other.parameters(), 0.1))
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_parse_optimizer():
    assert parse_optimizer("sgd:lr=0.01,momentum=0.9") == (torch.optim.SGD, {"lr": 0.01, "momentum": 0.9})
    assert parse_optimizer("AdamW:betas=[0.9,0.98],lr=1e-3") == (torch.optim.AdamW, {"betas": (0.9, 0.98), "lr": 1e-3})
    with pytest.raises(initopt.ConfigError, match="unknown optimizer 'adamm'; one of"):
        parse_optimizer("adamm")
    with pytest.raises(initopt.ConfigError, match="key=value"):
        parse_optimizer("sgd:0.1")


def test_trial_run_equals_training_a_copy_by_hand():
    model = _net()
    train = [_batch(s) for s in range(5)]
    holdout = [_batch(10), _batch(11)]
    space = ScaleSpace(model)
    ev = Evaluator(model, space, Task())
    step = TrainStep.from_spec((torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}), space)
    r = trial_run(ev, step, space.leaves(space.ones()), train, holdout)

    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)

    def held() -> float:
        with torch.no_grad():
            return sum(float(nn.functional.cross_entropy(ref(x), y)) for x, y in holdout) / len(holdout)

    before = held()
    losses = []
    for x, y in train:
        loss = nn.functional.cross_entropy(ref(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert r["holdout_before"] == pytest.approx(before, rel=1e-12)
    assert r["holdout_after"] == pytest.approx(held(), rel=1e-10)
    assert r["train_loss"] == pytest.approx(losses, rel=1e-10)
    assert not r["diverged"]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), _net().parameters(), strict=True))


def test_trial_run_reports_divergence():
    model = nn.Linear(5, 3)
    space = ScaleSpace(model)
    task = Task(loss_fn=lambda out, b: (out - b[1][:, None].float()).pow(2).mean())
    step = TrainStep.from_spec((torch.optim.SGD, {"lr": 1e3}), space)
    batches = [tuple(t.float() if t.is_floating_point() else t for t in _batch(0))]
    r = trial_run(Evaluator(model, space, task), step, space.leaves(space.ones()), batches * 200, batches)
    assert r["diverged"] and r["holdout_after"] == float("inf")
    assert len(r["train_loss"]) < 200  # stopped at the first non-finite loss


def test_gradinit_with_plain_sgd_equals_unnormalized_eta():
    """optimizer=SGD(lr=eta) is GradInit's unnormalized sgd target at that eta."""
    data = [_batch(s) for s in range(4)]
    a, b = _net(), _net()
    ra = initopt.initialize_(a, data, "gradinit", steps=6, lr=0.05, normalize=False, eta=0.2, gamma=100.0, guard=False)
    rb = initopt.initialize_(
        b,
        data,
        "gradinit",
        steps=6,
        lr=0.05,
        eta=0.2,
        gamma=100.0,
        optimizer=(torch.optim.SGD, {"lr": 0.2}),
        guard=False,
    )
    assert ra.scales == pytest.approx(rb.scales, rel=1e-9)
    assert rb.info["bound"] == "l2" and rb.info["lookahead"]["optimizer"] == "SGD"
    assert rb.after["lookahead_loss"] < rb.before["lookahead_loss"]  # its post-condition, with the real step


def test_gradinit_with_adam_bounds_the_l1_norm():
    model = _net()
    res = initopt.initialize_(model, _batch(0), "gradinit", steps=2, optimizer=(torch.optim.Adam, {"lr": 1e-3}))
    assert res.info["bound"] == "l1"
    assert GradInit().norm_order(TrainStep.from_spec(torch.optim.Adam, ScaleSpace(model))) == 1


def test_unused_optimizer_warns_once_per_call():
    with pytest.warns(UserWarning, match="optimizer= is not used by hessian"):
        initopt.initialize_(_net(), _batch(0), "hessian", optimizer=torch.optim.SGD)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        initopt.initialize_(
            _net(), _batch(0), ["hessian", ("gradinit", {"steps": 1, "guard": False})], optimizer=torch.optim.SGD
        )
