"""The reliability contract of docs/reliability.md: one test per row (R01, R02, ...), for every
registered method where the row applies; the model is checked bit for bit after each failure."""

from __future__ import annotations

import copy
import json
import pickle
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo_cases import assert_same, snapshot

import initopt

DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
SMALL = {
    "gradinit": {"steps": 3},
    "metainit": {"steps": 3, "source": "batches"},
    "nio": {"steps": 3, "num_splits": 2},
    "hessian": {},
    "lsuv": {},
    "kaiming": {},
    "auto": {"trial_steps": 2, "max_trial_steps": 2, "holdout": 1, "steps": 2},
}
METHODS = initopt.methods()
GRADIENT_FREE = {"lsuv", "kaiming", "hessian"}  # the analytic Hessian rule needs no gradient


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _data(n: int = 4, features: int = 4) -> list:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, features, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def _run(model, data, method, **kw):
    return initopt.initialize_(model, data, method, **{**SMALL[method], **kw})


def _fails_and_keeps(model, data, method, error, match=None, **kw):
    before = snapshot(model)
    with pytest.raises(error, match=match):
        _run(model, data, method, **kw)
    assert_same(before, snapshot(model))


def test_every_row_of_the_table_has_a_test():
    ids = re.findall(r"^\| (R\d\d) \|", DOC.read_text(), re.M)
    assert ids == sorted(ids) and len(ids) == len(set(ids)) and ids
    tests = {name.split("_")[1] for name in globals() if re.match(r"test_R\d\d_", name)}
    assert set(ids) == tests


@pytest.mark.parametrize("method", METHODS)
def test_R01_no_trainable_parameters(method):
    model = _net().requires_grad_(False)
    _fails_and_keeps(model, _data(), method, initopt.ModelError, "no trainable parameters")


@pytest.mark.parametrize("method", METHODS)
def test_R02_frozen_parameters_are_left_alone(method):
    model = _net()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    res = _run(model, _data(), method)
    assert torch.equal(model[0].weight, frozen) and "0.weight" not in res.scales


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3).double()

    def forward(self, x):
        return self.b(torch.relu(self.a(x)).double()).float()


@pytest.mark.parametrize("method", METHODS)
def test_R03_mixed_dtypes_keep_their_dtype(method):
    model = _Mixed()
    res = _run(model, _data(), method)
    assert model.a.weight.dtype == torch.float32 and model.b.weight.dtype == torch.float64
    assert all(torch.isfinite(torch.tensor(v)) for v in res.scales.values())


def test_R04_meta_device_is_a_model_error():
    with pytest.raises(initopt.ModelError, match="meta device"):
        initopt.initialize_(nn.Linear(4, 3, device="meta"), _data(), "gradinit", steps=1)


@pytest.mark.parametrize("data,match", [([], "empty"), ((b for b in []), "empty"), (None, "no data")])
@pytest.mark.parametrize("method", METHODS)
def test_R05_empty_data(method, data, match):
    _fails_and_keeps(_net(), data, method, initopt.DataError, match)


@pytest.mark.parametrize("method", METHODS)
def test_R06_fewer_batches_than_needed_are_reused(method):
    one = _data(1)
    for data in (one, one[0], (x for x in _data(2))):  # a list of one, a single batch, a one-shot generator
        res = _run(_net(), data, method)
        assert res.scales and all(v == v and abs(v) < float("inf") for v in res.scales.values())
    a, b = _run(_net(), one, method), _run(_net(), one, method)
    assert a.scales == b.scales


@pytest.mark.parametrize("method", METHODS)
def test_R07_wrong_batch(method):
    _fails_and_keeps(_net(), _data(features=5), method, initopt.DataError, "could not take the first batch")
    _fails_and_keeps(_net(), [(torch.randn(8, 4),)], method, initopt.LossError, "needs \\(inputs, targets\\)")


@pytest.mark.parametrize(
    "loss_fn,match",
    [
        (lambda out, b: (out - 1).pow(2).mean(0), "shape"),
        (lambda out, b: 1.0, "float"),
        (lambda out, b: torch.tensor(1.0), "depend"),
    ],
)
@pytest.mark.parametrize("method", METHODS)
def test_R08_bad_loss(method, loss_fn, match):
    _fails_and_keeps(_net(), _data(), method, initopt.LossError, match, loss_fn=loss_fn)


@pytest.mark.parametrize("where", ["inputs", "loss"])
@pytest.mark.parametrize("method", METHODS)
def test_R09_non_finite_at_the_start(method, where):
    data = _data()
    kw = {}
    if where == "inputs":
        data[0][0][0, 0] = float("nan")
    else:
        kw["loss_fn"] = lambda out, b: F.cross_entropy(out, b[1]) * float("inf")
    _fails_and_keeps(_net(), data, method, initopt.LossError, "first batch", **kw)


@pytest.mark.parametrize("method", METHODS)
def test_R10_loss_turns_non_finite_in_the_middle(method):
    calls = {"n": 0}

    def turning(out, b):
        calls["n"] += 1
        loss = F.cross_entropy(out, b[1])
        return loss * float("nan") if calls["n"] > 2 else loss

    model = _net()
    before = snapshot(model)
    if method == "auto":  # a diverging trial is a measurement: every start diverges here
        with pytest.raises(initopt.InitOptError, match="every start failed or diverged"):
            _run(model, _data(), method, loss_fn=turning)
        assert_same(before, snapshot(model))
        return
    try:
        res = _run(model, _data(), method, loss_fn=turning)
    except initopt.LossError as e:
        assert "not finite" in str(e) or "non-finite" in str(e)
        assert_same(before, snapshot(model))
        return
    # only a method that never evaluated the loss again after the first batch may finish
    assert calls["n"] <= 2, f"{method} saw a NaN loss and finished: {res.after}"


@pytest.mark.parametrize("method", METHODS)
def test_R10_a_bad_batch_later_in_the_data(method):
    data = _data(6)
    for x, _ in data[2:]:
        x.fill_(float("nan"))
    model = _net()
    before = snapshot(model)
    try:
        res = _run(model, data, method)
    except initopt.InitOptError:
        assert_same(before, snapshot(model))
        return
    assert all(v == v and abs(v) < float("inf") for v in res.scales.values())


@pytest.mark.parametrize("method", METHODS)
def test_R11_non_finite_gradients(method):
    def nan_grad(out, b):  # finite value (+0), gradient 0 * inf = NaN
        return F.cross_entropy(out, b[1]) + torch.sqrt(out.sum() * 0)

    model = _net()
    before = snapshot(model)
    try:
        res = _run(model, _data(), method, loss_fn=nan_grad)
    except initopt.InitOptError:
        assert_same(before, snapshot(model))
        return
    assert method in GRADIENT_FREE, f"{method} finished on NaN gradients"
    assert all(v == v for v in res.scales.values())


def test_R11_diagnostics_refuse_non_finite_gradients():
    def nan_grad(out, b):
        return F.cross_entropy(out, b[1]) + torch.sqrt(out.sum() * 0)

    model, batch = _net(), _data(1)[0]
    before = snapshot(model)
    calls = [
        lambda: initopt.grad_cosine(model, batch, loss_fn=nan_grad),
        lambda: initopt.gradient_quotient(model, batch, loss_fn=nan_grad),
        lambda: initopt.hessian_eigenvalues(model, batch, loss_fn=nan_grad),
        lambda: initopt.hessian_trace(model, batch, loss_fn=nan_grad, probes=2),
        lambda: initopt.hessian_spectral_density(model, batch, loss_fn=nan_grad, probes=2, iters=3),
        lambda: initopt.diagnose(model, [batch], loss_fn=nan_grad, probes=2),
    ]
    for call in calls:
        with pytest.raises(initopt.LossError, match=r"not finite|non-finite"):
            call()
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("method", METHODS)
def test_R12_non_finite_parameter(method):
    model = _net()
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")
    _fails_and_keeps(model, _data(), method, initopt.ModelError, "non-finite values")


@pytest.mark.parametrize("method", METHODS)
def test_R13_keyboard_interrupt(method):
    calls = {"n": 0}

    def interrupting(out, b):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt
        return F.cross_entropy(out, b[1])

    model = _net().eval()
    before = snapshot(model)
    try:
        _run(model, _data(), method, loss_fn=interrupting)
    except KeyboardInterrupt:
        pass
    assert_same(before, snapshot(model)) if calls["n"] > 1 else None


def test_R14_unknown_names_list_the_valid_ones():
    with pytest.raises(initopt.ConfigError, match=r"registered methods: .*gradinit"):
        initopt.initialize_(_net(), _data(), "xavier-magic")
    for method in METHODS:
        with pytest.raises(initopt.ConfigError, match="valid keys: \\["):
            initopt.initialize_(_net(), _data(), method, etta=0.1)


@pytest.mark.parametrize(
    "method,cfg",
    [
        ("gradinit", {"lr": -1.0}),
        ("gradinit", {"gamma": 0.0}),
        ("gradinit", {"target": "lion"}),
        ("nio", {"lr": 0.0}),
        ("nio", {"gamma": -1.0}),
        ("metainit", {"lr": -0.1}),
        ("lsuv", {"tol": -1.0}),
        ("hessian", {"mode": "magic"}),
        ("auto", {"trial_steps": 0}),
        ("gradinit", {"mode": "test"}),
        ("gradinit", {"min_scale": 2.0}),
        ("nio", {"max_gain_scale": 0.5}),
    ],
)
def test_R15_invalid_values(method, cfg):
    _fails_and_keeps(_net(), _data(), method, initopt.ConfigError, None, **cfg)


@pytest.mark.parametrize("steps", [-1, 1.5, "3", True])
@pytest.mark.parametrize("method", METHODS)
def test_R15_invalid_steps(method, steps):
    _fails_and_keeps(_net(), _data(), method, initopt.ConfigError, "steps", steps=steps)


@pytest.mark.parametrize("method", METHODS)
def test_R16_zero_steps_is_a_no_op(method):
    model = _net()
    before = snapshot(model)
    res = _run(model, _data(), method, steps=0)
    assert all(s == 1.0 for s in res.scales.values())
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("method", METHODS)
def test_R17_second_call(method):
    model = _net()
    _run(model, _data(), method)
    mid = copy.deepcopy(model)
    res = _run(model, _data(), method)
    for name, p in model.named_parameters():  # scales relative to the weights after the first call
        torch.testing.assert_close(p, dict(mid.named_parameters())[name] * res.scales.get(name, 1.0))
    if method in ("kaiming", "hessian", "lsuv"):
        assert all(abs(s - 1.0) < 0.1 for s in res.scales.values())


class _Flow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 3), nn.Linear(8, 3)
        self.unused = nn.Linear(5, 5)

    def forward(self, x):
        h = self.a(x)
        h.relu_()  # in place
        return self.b(h) if x.mean() > 0 else self.c(h)  # data-dependent control flow


@pytest.mark.parametrize("method", METHODS)
def test_R18_control_flow_and_in_place(method):
    model = _Flow()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = _run(model, _data(), method)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n] * res.scales.get(n, 1.0))


@pytest.mark.parametrize("method", ["gradinit", "nio", "metainit"])
def test_R19_unused_parameters_keep_scale_one_in_learned_methods(method):
    model = _Flow()
    res = _run(model, _data(), method)
    assert res.scales["unused.weight"] == 1.0 and res.scales["unused.bias"] == 1.0


def _saved(tmp_path) -> Path:
    model = _net()
    res = initopt.initialize_(model, _data(), "kaiming")
    return initopt.save_scales(res, tmp_path / "s.json", model=model)


def test_R20_corrupted_or_foreign_files(tmp_path):
    path = _saved(tmp_path)
    path.write_text(path.read_text()[:-20])
    with pytest.raises(initopt.DataError, match="corrupted JSON"):
        initopt.load_scales(path)
    path.write_text(json.dumps({"scales": {"0.weight": 1.0}}))
    with pytest.raises(initopt.DataError, match="not an initopt scales file"):
        initopt.load_scales(path)
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"format": "initopt-scales"}))  # never unpickled
    with pytest.raises(initopt.DataError):
        initopt.load_scales(evil)
    bad = json.loads(_saved(tmp_path).read_text())
    bad["scales"]["0.weight"] = "2"
    path.write_text(json.dumps(bad))
    with pytest.raises(initopt.DataError, match="finite numbers"):
        initopt.load_scales(path)
    with pytest.raises(initopt.DataError, match="cannot read"):
        initopt.load_scales(tmp_path / "missing.json")


def test_R21_file_from_another_model(tmp_path):
    doc = initopt.load_scales(_saved(tmp_path))
    other = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))  # same names, other shapes
    before = snapshot(other)
    with pytest.raises(initopt.ModelError, match="another model"):
        initopt.apply_scales_(other, doc)
    assert_same(before, snapshot(other))
    renamed = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Identity(), nn.Linear(8, 3))
    with pytest.raises(initopt.ModelError, match="no parameter named"):
        initopt.apply_scales_(renamed, doc)
    fresh = _net()
    initopt.apply_scales_(fresh, doc)  # the right model takes it
    ref = _net()
    initopt.initialize_(ref, _data(), "kaiming")
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), ref.parameters(), strict=True))


def test_R22_file_from_a_newer_version(tmp_path):
    path = _saved(tmp_path)
    doc = json.loads(path.read_text())
    doc["version"] = 99
    path.write_text(json.dumps(doc))
    with pytest.raises(initopt.DataError, match=r"format version 99 .* upgrade"):
        initopt.load_scales(path)


def test_R23_bad_optimizer():
    model = _net()
    for spec, match in [
        (torch.optim.SGD(_net().parameters(), lr=0.1), "none of the model's trainable parameters"),
        ("adam", "takes a torch.optim.Optimizer"),
        (torch.optim.LBFGS, "closure"),
    ]:
        _fails_and_keeps(model, _data(), "gradinit", initopt.ConfigError, match, optimizer=spec)


def test_R24_subbatches_the_model_cannot_take():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))
    batch = (torch.randn(2, 4), torch.tensor([0, 1]))
    _fails_and_keeps(model, [batch, batch], "nio", initopt.DataError, "num_splits")
    res = initopt.initialize_(model, [batch, batch], "auto", **{**SMALL["auto"], "learned": ("nio",)})
    assert "num_splits" in res.info["candidates"][-1]["error"]


class _CastsToBFloat16(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x.to(torch.bfloat16))))


@pytest.mark.parametrize("method", METHODS)
def test_R25_half_precision_kernel_is_a_precision_error(method):
    torch.manual_seed(0)
    model = _CastsToBFloat16().to(torch.bfloat16)
    data = [(x.to(torch.bfloat16), y) for x, y in _data()]
    _fails_and_keeps(model, data, method, initopt.PrecisionError, r"bfloat16.*float32 copy")


@pytest.mark.parametrize("method", ["gradinit", "metainit", "nio"])
def test_R26_scales_that_do_not_train_better_are_not_applied(method):
    model = _net()
    before = snapshot(model)
    raw = initopt.initialize_(_net(), _data(), method, **SMALL[method], guard=False)
    assert any(s != 1.0 for s in raw.scales.values())  # the search itself moved the scales
    # at this learning rate no trial copy learns anything: the guard cannot see the scales train better
    slow = (torch.optim.SGD, {"lr": 1e-9})
    with pytest.warns(UserWarning, match="left as it was"):
        res = initopt.initialize_(model, _data(), method, **SMALL[method], guard_steps=2, optimizer=slow)
    assert res.info["guard"]["kept"] is False and not res.info["guard"]["trials"][0]["resolved"]
    assert set(res.scales.values()) == {1.0} and res.after == res.before
    assert_same(snapshot(model), before)
