"""One contract for every registered method, on a zoo of small models.

Generated from ``METHOD_CASES x MODEL_CASES`` in ``zoo_cases.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from zoo_cases import METHOD_CASES, MODEL_CASES, assert_same, data_for, snapshot

import initopt
from initopt.core.batches import Task

CASES = [
    pytest.param(m, cfg, steps, mc, id=f"{m}{i}-{mc.name}")
    for i, (m, cfg, steps) in enumerate(METHOD_CASES)
    for mc in MODEL_CASES
]


def _model(mc, seed=0):
    torch.manual_seed(seed)
    return mc.make()


def _eval_output(model, batch):
    """Model output in eval mode without touching anything (dropout off, running stats)."""
    flags = [m.training for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return Task().forward(model, batch)
    finally:
        for m, f in zip(model.modules(), flags, strict=True):
            m.training = f


def _as_tensor(out):
    return out["logits"] if isinstance(out, dict) else out


def test_every_registered_method_has_a_case():
    assert {m for m, _, _ in METHOD_CASES} >= set(initopt.methods())


@pytest.mark.parametrize("method,cfg,steps,mc", CASES)
def test_zero_steps_change_nothing(method, cfg, steps, mc):
    model = _model(mc)
    data = data_for(mc)
    before = snapshot(model)
    res = initopt.initialize_(model, data, method, steps=0, **cfg)
    assert all(s == 1.0 for s in res.scales.values())
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("method,cfg,steps,mc", CASES)
def test_scales_of_one_change_nothing(method, cfg, steps, mc):
    model = _model(mc)
    data = data_for(mc)
    ref = _as_tensor(_eval_output(model, data[0]))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    before = snapshot(model)
    initopt.apply_scales_(model, dict.fromkeys(names, 1.0))
    assert_same(before, snapshot(model))
    assert torch.equal(ref, _as_tensor(_eval_output(model, data[0])))


@pytest.mark.parametrize("method,cfg,steps,mc", CASES)
def test_baked_equals_scaled_forward_and_preserves_state(method, cfg, steps, mc):
    model = _model(mc)
    data = data_for(mc)
    original = copy.deepcopy(model)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = snapshot(model)
    res = initopt.initialize_(model, data, method, steps=steps, **cfg)
    after = snapshot(model)
    assert_same(before, after, params=False)
    # the scaled forward of the untouched copy, computed independently with functional_call
    by_id: dict[int, float] = {}
    named = dict(model.named_parameters(remove_duplicate=False))
    for n, s in res.scales.items():
        by_id[id(named[n])] = s
    scaled = {
        n: w0[n] * by_id.get(id(p), 1.0)
        for n, p in model.named_parameters()  # one name per tensor
    }
    original.eval()
    model.eval()
    with torch.no_grad():
        expect = _as_tensor(torch.func.functional_call(original, scaled, _args(data[0]), _kwargs(data[0])))
        got = _as_tensor(Task().forward(model, data[0]))
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)
    # directions unchanged, every tensor scaled by its reported scale
    for n, p in model.named_parameters(remove_duplicate=False):
        s = by_id.get(id(p), 1.0)
        torch.testing.assert_close(p.detach(), w0[n] * s, rtol=1e-6, atol=0)
        if w0[n].norm() > 0 and s > 0:
            cos = torch.nn.functional.cosine_similarity(p.detach().flatten(), w0[n].flatten(), dim=0)
            assert cos > 1 - 1e-6
    # ties preserved and scaled once
    if mc.name == "tied_lm":
        assert model.head.weight is model.embed.weight
        assert sum(1 for n in res.scales if n in ("embed.weight", "head.weight")) == 1
    # an optimizer built before the call still trains the model
    model.train()
    loss = _loss(model, data[0])
    loss.backward()
    snap = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(snap, model.parameters(), strict=True))
    assert all(p is q for p, q in zip(opt.param_groups[0]["params"], model.parameters(), strict=True))


@pytest.mark.parametrize("method,cfg,steps,mc", CASES)
def test_eval_mode_model_keeps_modes(method, cfg, steps, mc):
    model = _model(mc).eval()
    before = snapshot(model)
    initopt.initialize_(model, data_for(mc), method, steps=1, **cfg)
    assert_same(before, snapshot(model), params=False)


@pytest.mark.parametrize("method,cfg,steps,mc", CASES)
def test_same_seed_same_result(method, cfg, steps, mc):
    runs = []
    for _ in range(2):
        model = _model(mc)
        runs.append(initopt.initialize_(model, data_for(mc), method, steps=steps, seed=3, **cfg).scales)
    assert runs[0] == runs[1]


@pytest.mark.parametrize("method,cfg,steps,mc", CASES)
def test_model_untouched_when_method_fails(method, cfg, steps, mc):
    # the loss fails at its 4th evaluation (the 1st is the validation of the first batch); a
    # method that evaluates it fewer times (a closed-form rule) fails at its last one instead
    limit = 3
    for attempt in range(2):
        model = _model(mc)
        model.train()
        before = snapshot(model)
        calls = {"n": 0}

        def failing_loss(output, batch, calls=calls, limit=limit):
            calls["n"] += 1
            if calls["n"] > limit:
                raise RuntimeError("boom")
            return _default_loss(output, batch)

        try:
            initopt.initialize_(model, data_for(mc), method, steps=max(steps, 5), loss_fn=failing_loss, **cfg)
        except RuntimeError as e:
            assert "boom" in str(e)
            assert_same(before, snapshot(model))
            return
        assert attempt == 0 and calls["n"] >= 2, "the search never evaluated the loss, so it cannot fail"
        limit = calls["n"] - 1
    pytest.fail("DID NOT RAISE RuntimeError")


@pytest.mark.parametrize("method,cfg,steps,mc", CASES)
def test_keyboard_interrupt_restores(method, cfg, steps, mc):
    model = _model(mc).eval()
    before = snapshot(model)

    def interrupting_loss(output, batch):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        initopt.initialize_(model, data_for(mc), method, steps=steps, loss_fn=interrupting_loss, **cfg)
    assert_same(before, snapshot(model))


def _default_loss(output, batch):
    return Task().loss(output, batch)


def _loss(model, batch):
    return _default_loss(Task().forward(model, batch), batch)


def _args(batch):
    return () if isinstance(batch, dict) else (batch[0],)


def _kwargs(batch):
    return batch if isinstance(batch, dict) else {}
