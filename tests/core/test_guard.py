"""The learned methods' guard: its trials against training scaled copies by hand, in float64."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import initopt
from initopt.core import Evaluator, ScaleSpace, Task
from initopt.core.guard import GUARD_OPTIMIZERS, _better, guard
from initopt.core.step import TrainStep
from initopt.errors import ConfigError

_W = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def _batch(seed: int, n: int = 32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    return x, (x @ _W).argmax(1)


DATA = [_batch(s) for s in range(8)]


def _hand_trial(model: nn.Module, alpha: list[float], spec, train, holdout) -> float:
    """Scale a copy's tensors by ``alpha``, train it with ``spec`` by hand, return the held-out loss."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p, a in zip(ref.parameters(), alpha, strict=True):
            p.mul_(a)
    cls, settings = spec
    opt = cls(ref.parameters(), **settings)
    for x, y in train:
        loss = nn.functional.cross_entropy(ref(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return sum(float(nn.functional.cross_entropy(ref(x), y)) for x, y in holdout) / len(holdout)


def _draws(batches):
    it = iter(batches)
    return lambda: next(it)


@pytest.mark.parametrize("alpha", [[0.3, 1.0, 2.0, 0.5], [1.5, 1.0, 1.2, 1.0]], ids=["bad", "good"])
@pytest.mark.parametrize(
    "user",
    [None, (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}), (torch.optim.SGD, {"lr": 1e-4})],
    ids=["assumed", "given", "given-too-slow"],
)
def test_trials_equal_hand_training_and_the_rule_follows(alpha, user):
    model = _net()
    space = ScaleSpace(model)
    ev = Evaluator(model, space, Task())
    order = [_batch(100 + s) for s in range(2 + 24)]  # two held out, then up to 4 x 6 trial steps
    a = torch.tensor(alpha, dtype=space.dtype)
    step = None if user is None else TrainStep.from_spec(user, space)
    kept, info = guard(ev, space, _draws(order), a, step, steps=6)
    specs = list(GUARD_OPTIMIZERS) if user is None else [user]
    assert [t["optimizer"] for t in info["trials"]] == [s[0].__name__ for s in specs]
    assert info["assumed"] is (user is None)
    hold = order[:2]
    lower = []
    for t, spec in zip(info["trials"], specs, strict=True):
        b0, b1 = (_hand_trial(model, x, spec, [], hold) for x in ([1.0] * 4, alpha))
        lowest = min(b0, b1)

        def resolved(n: int, spec=spec, ref=lowest) -> bool:  # by hand: a 5 % fall below the lower start
            after = min(_hand_trial(model, x, spec, order[2 : 2 + n], hold) for x in ([1.0] * 4, alpha))
            return after <= 0.95 * ref

        # extended by 6 steps while unresolved, up to 24
        assert t["steps"] in (6, 12, 18, 24) and all(not resolved(n) for n in range(6, t["steps"], 6))
        assert t["resolved"] is resolved(t["steps"])
        assert (t["steps"] == 24) or t["resolved"]
        train = order[2 : 2 + t["steps"]]
        start = _hand_trial(model, [1.0] * 4, spec, train, hold)
        scaled = _hand_trial(model, alpha, spec, train, hold)
        assert t["start"] == pytest.approx(start, rel=1e-10) and t["start_before"] == pytest.approx(b0, rel=1e-12)
        assert t["scaled"] == pytest.approx(scaled, rel=1e-10) and t["scaled_before"] == pytest.approx(b1, rel=1e-12)
        lower.append(t["resolved"] and scaled < start)
    expect = all(lower)
    assert info["kept"] is expect
    assert torch.equal(kept, a if expect else torch.ones_like(a))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), _net().parameters(), strict=True))
    if user is not None and user[1]["lr"] == 1e-4:  # nothing learns at this rate: never resolved, start kept
        assert not info["trials"][0]["resolved"] and info["steps"] == 24 and not info["kept"]


def test_two_diverging_trials_keep_the_scales():
    model = nn.Linear(6, 3)  # float32, so that the losses overflow
    space = ScaleSpace(model)
    task = Task(loss_fn=lambda out, b: (out - nn.functional.one_hot(b[1], 3).float()).pow(2).mean())
    ev = Evaluator(model, space, task)
    step = TrainStep.from_spec((torch.optim.SGD, {"lr": 1e3}), space)
    order = [(x.float(), y) for x, y in (_batch(200 + s) for s in range(2 + 50))]
    _, info = guard(ev, space, _draws(order), torch.full((2,), 0.5, dtype=space.dtype), step, 50)
    assert all(math.isinf(t["start"]) and math.isinf(t["scaled"]) for t in info["trials"])
    assert info["kept"] and "cannot judge" in info["reason"]


@pytest.mark.parametrize(
    "pairs,kept",
    [
        ([(1.0, 0.9)], True),
        ([(1.0, 1.0)], False),  # a tie keeps the start
        ([(math.inf, 2.0)], True),  # the start diverged, the scales did not
        ([(2.0, math.inf)], False),
        ([(1.0, 0.9), (1.0, 0.99)], True),  # lower under both optimizers
        ([(1.0, 0.9), (1.0, 1.001)], False),  # better for one, worse for the other: not applied
        ([(1.0, 0.9), (1.0, math.inf)], False),
    ],
)
def test_the_rule(pairs, kept):
    assert _better([{"start": a, "scaled": b, "resolved": True} for a, b in pairs]) is kept


def test_an_unresolved_trial_cannot_show_the_scales_better():
    assert not _better([{"start": 2.31, "scaled": 2.30, "resolved": False}])
    assert not _better(
        [{"start": 1.0, "scaled": 0.8, "resolved": True}, {"start": 2.3, "scaled": 2.2, "resolved": False}]
    )


def _gradinit(model: nn.Module, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = initopt.initialize_(model, DATA, "gradinit", progress=False, **kw)
    return res, [str(w.message) for w in caught]


def test_rejected_scales_leave_the_model_as_it_was_and_say_so():
    # a scale learning rate far too large: GradInit's scales then train worse under SGD
    model, before = _net(), [p.detach().clone() for p in _net().parameters()]
    ids = [id(p) for p in model.parameters()]
    res, msgs = _gradinit(model, steps=10, lr=2.0)
    assert res.info["guard"]["kept"] is False
    assert set(res.scales.values()) == {1.0}
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert [id(p) for p in model.parameters()] == ids
    assert any("left as it was" in m and "guard=False" in m for m in msgs)
    assert res.after == res.before and "search_after" in res.info["guard"]
    assert "guard: scales rejected" in res.summary()
    # guard=False: the paper's algorithm, the same search, its scales applied
    raw, msgs = _gradinit(_net(), steps=10, lr=2.0, guard=False)
    assert "guard" not in raw.info and not any("left as it was" in m for m in msgs)
    assert set(raw.scales.values()) != {1.0}
    assert raw.after == res.info["guard"]["search_after"]


def test_kept_scales_are_the_unguarded_search_s():
    res, msgs = _gradinit(_net(), steps=20, lr=0.3, gamma=10.0)
    raw, _ = _gradinit(_net(), steps=20, lr=0.3, gamma=10.0, guard=False)
    assert res.info["guard"]["kept"] is True and not any("left as it was" in m for m in msgs)
    assert res.scales == raw.scales
    drop = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert drop(res.history) == drop(raw.history)
    assert "guard: scales kept" in res.summary()


def test_the_user_optimizer_alone_decides():
    res, _ = _gradinit(_net(), steps=5, optimizer=(torch.optim.SGD, {"lr": 0.05}))
    assert [t["optimizer"] for t in res.info["guard"]["trials"]] == ["SGD"]
    assert res.info["guard"]["assumed"] is False


@pytest.mark.parametrize("method", ["gradinit", "metainit", "nio"])
@pytest.mark.parametrize("field,value", [("guard", "yes"), ("guard", 1), ("guard_steps", 0), ("guard_steps", 2.5)])
def test_bad_guard_settings_are_config_errors(method, field, value):
    with pytest.raises(ConfigError, match=field):
        initopt.initialize_(_net(), DATA, method, **{field: value})


def test_steps_zero_runs_no_trial():
    res, _ = _gradinit(_net(), steps=0)
    assert "guard" not in res.info and set(res.scales.values()) == {1.0}


def test_progress_shows_the_guard_trials(capsys):
    pytest.importorskip("tqdm")
    ticks = []
    model = _net()
    space = ScaleSpace(model)
    order = [_batch(300 + s) for s in range(2 + 24)]
    guard(
        Evaluator(model, space, Task()),
        space,
        _draws(order),
        torch.full((4,), 0.9, dtype=space.dtype),
        None,
        6,
        on_trial=ticks.append,
    )
    assert ticks == [s[0].__name__ for s in GUARD_OPTIMIZERS]  # one call per optimizer tried
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        initopt.initialize_(_net(), DATA, "gradinit", steps=3, progress=True)
    assert "gradinit guard" in capsys.readouterr().err
