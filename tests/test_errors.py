"""Bad input gets an InitOptError naming what is wrong, and the model is unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo_cases import assert_same, snapshot

import initopt


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _batch(n=8, features=4):
    return torch.randn(n, features), torch.randint(0, 3, (n,))


CASES = {
    "no trainable parameters": (
        lambda m: [p.requires_grad_(False) for p in m.parameters()],
        {"data": [_batch()]},
        initopt.ModelError,
        "no trainable parameters",
    ),
    "empty data": (None, {"data": []}, initopt.DataError, "empty"),
    "empty generator": (None, {"data": (b for b in [])}, initopt.DataError, "empty"),
    "no data": (None, {"data": None}, initopt.DataError, "no data"),
    "not a batch": (None, {"data": 42}, initopt.DataError, "int"),
    "batch the model cannot take": (
        None,
        {"data": [_batch(features=5)]},
        initopt.DataError,
        "could not take the first batch",
    ),
    "non-scalar loss": (
        None,
        {"data": [_batch()], "loss_fn": lambda out, b: (out - 1).pow(2).mean(0)},
        initopt.LossError,
        "shape",
    ),
    "non-finite loss": (
        None,
        {"data": [_batch()], "loss_fn": lambda out, b: out.sum() * float("nan")},
        initopt.LossError,
        "finite",
    ),
    "loss not a tensor": (None, {"data": [_batch()], "loss_fn": lambda out, b: 1.0}, initopt.LossError, "float"),
    "loss independent of parameters": (
        None,
        {"data": [_batch()], "loss_fn": lambda out, b: torch.tensor(1.0)},
        initopt.LossError,
        "depend",
    ),
    "tensor batch without loss_fn": (None, {"data": torch.randn(8, 4)}, initopt.LossError, "loss_fn"),
    "unknown method": (None, {"data": [_batch()], "method": "xavier-magic"}, initopt.ConfigError, "unknown method"),
    "unknown config key": (None, {"data": [_batch()], "etta": 0.1}, initopt.ConfigError, "etta"),
    "bad config value": (None, {"data": [_batch()], "eta": -1.0}, initopt.ConfigError, "eta"),
    "bad steps": (None, {"data": [_batch()], "steps": -3}, initopt.ConfigError, "steps"),
    "pipeline with flat config": (
        None,
        {"data": [_batch()], "method": ["gradinit", "gradinit"], "eta": 0.2},
        initopt.ConfigError,
        "per stage",
    ),
    "batch too small to halve": (None, {"data": [_batch(n=1)]}, initopt.DataError, "split"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises_named_error_and_leaves_model(case):
    prepare, kwargs, err, words = CASES[case]
    model = _model()
    if prepare:
        prepare(model)
    before = snapshot(model)
    kwargs = dict(kwargs)
    data = kwargs.pop("data")
    method = kwargs.pop("method", "gradinit")
    kwargs.setdefault("steps", 2)
    with pytest.raises(err, match=words):
        initopt.initialize_(model, data, method, **kwargs)
    assert_same(before, snapshot(model))


def test_every_error_is_an_initopt_error():
    for cls in (initopt.ConfigError, initopt.DataError, initopt.LossError, initopt.ModelError):
        assert issubclass(cls, initopt.InitOptError)


def test_not_a_module():
    with pytest.raises(initopt.ModelError, match=r"nn\.Module"):
        initopt.initialize_(lambda x: x, [_batch()])


def test_pipeline_failure_restores_earlier_stages():
    model = _model()
    before = snapshot(model)
    calls = {"n": 0}

    def loss_fn(out, b):
        calls["n"] += 1
        if calls["n"] > 12:
            raise RuntimeError("late failure")
        return torch.nn.functional.cross_entropy(out, b[1])

    with pytest.raises(RuntimeError, match="late failure"):
        initopt.initialize_(
            model,
            [_batch(), _batch()],
            [("gradinit", {"steps": 3, "lr": 0.5}), ("gradinit", {"steps": 5})],
            loss_fn=loss_fn,
        )
    assert_same(before, snapshot(model))
