"""Pipelines: ``initialize_(model, data, ["hessian", ("gradinit", {...})])`` runs the stages in order."""

from __future__ import annotations

import copy

import pytest
import torch

import initopt
from initopt import zoo


def _setup():
    torch.manual_seed(0)
    model = zoo.mlp(depth=4, width=16, in_features=12)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 12, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(3)]
    return model, data


def test_pipeline_equals_its_stages_run_by_hand():
    model, data = _setup()
    by_hand = copy.deepcopy(model)
    stages = [("hessian", {}), ("gradinit", {"steps": 4, "lr": 0.05})]
    res = initopt.initialize_(model, data, stages, seed=3)
    r1 = initopt.initialize_(by_hand, data, "hessian", seed=3)
    r2 = initopt.initialize_(by_hand, data, "gradinit", seed=3, steps=4, lr=0.05)
    for (n, p), q in zip(model.named_parameters(), by_hand.parameters(), strict=True):
        assert torch.equal(p, q), n
    assert res.method == "hessian+gradinit"
    assert [s.method for s in res.stages] == ["hessian", "gradinit"]
    assert res.config == (r1.config, r2.config) and res.config[1].lr == 0.05
    assert res.stages[1].scales == r2.scales
    for name in res.scales:  # the pipeline's scales are the products of the stages' scales
        expected = r1.scales.get(name, 1.0) * r2.scales.get(name, 1.0)
        assert res.scales[name] == pytest.approx(expected, rel=1e-12)
    assert {h["stage"] for h in res.history} == {0, 1}
    assert res.before == r1.before and res.after == r2.after
    d = res.to_dict()
    assert [s["method"] for s in d["stages"]] == ["hessian", "gradinit"] and d["config"][1]["steps"] == 4


def test_pipeline_scales_reproduce_the_model_from_a_fresh_copy():
    model, data = _setup()
    fresh = copy.deepcopy(model)
    res = initopt.initialize_(model, data, ["kaiming", ("nio", {"steps": 3, "num_splits": 2})])
    initopt.apply_scales_(fresh, res.scales)
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=0)


def test_pipeline_rejects_flat_config_and_empty_lists():
    model, data = _setup()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(initopt.ConfigError, match="per stage"):
        initopt.initialize_(model, data, ["hessian", "gradinit"], lr=0.1)
    with pytest.raises(initopt.ConfigError):
        initopt.initialize_(model, data, [])
    with pytest.raises(initopt.ConfigError, match="unknown method"):
        initopt.initialize_(model, data, ["hessian", "nope"])
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
