"""take_batches / initialize_from_loader_ before a plain PyTorch training loop."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import initopt
from initopt.integrations import MissingDependencyError, initialize_from_loader_, take_batches
from initopt.integrations.loop import training_optimizer


def _data(n: int = 128) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 10, generator=g)
    return TensorDataset(x, x[:, :4].argmax(1))


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def _epoch_targets(loader: DataLoader) -> list[torch.Tensor]:
    return [y for _, y in loader]


def test_take_batches_leaves_the_epochs_as_they_were():
    loader = DataLoader(_data(), batch_size=16, shuffle=True)
    torch.manual_seed(5)
    plain = _epoch_targets(loader) + _epoch_targets(loader)
    torch.manual_seed(5)
    taken = take_batches(loader, 3)
    after = _epoch_targets(loader) + _epoch_targets(loader)
    assert len(taken) == 3
    assert all(torch.equal(a, b) for a, b in zip(plain, after, strict=True))
    # the batches taken are the first ones of the epoch that would have started here
    assert torch.equal(taken[0][1], plain[0])
    assert len(take_batches(loader, 100)) == 8  # one pass holds 8


def test_take_batches_refuses_what_it_cannot_take_safely():
    loader = DataLoader(_data(), batch_size=16)
    with pytest.raises(initopt.DataError, match="one-shot iterator"):
        take_batches(iter(loader), 2)
    with pytest.raises(initopt.DataError, match="yielded no batch"):
        take_batches([], 2)
    with pytest.raises(initopt.ConfigError, match="positive integer"):
        take_batches(loader, 0)
    with pytest.raises(initopt.DataError, match="DataLoader or an iterable"):
        take_batches(torch.zeros(3), 2)


def test_with_worker_processes():
    loader = DataLoader(_data(64), batch_size=16, shuffle=True, num_workers=1)
    torch.manual_seed(2)
    plain = _epoch_targets(loader)
    torch.manual_seed(2)
    take_batches(loader, 2)
    assert all(torch.equal(a, b) for a, b in zip(plain, _epoch_targets(loader), strict=True))


def test_initialize_from_loader_in_a_training_loop():
    torch.manual_seed(0)
    model = _model()
    by_hand = copy.deepcopy(model)
    loader = DataLoader(_data(), batch_size=16, shuffle=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    params_before = list(model.parameters())

    torch.manual_seed(1)
    res = initialize_from_loader_(
        model, loader, opt, batches=6, trial_steps=3, max_trial_steps=3, steps=3, progress=False
    )
    torch.manual_seed(1)
    expected = initopt.initialize_(
        by_hand,
        take_batches(loader, 6),
        "auto",
        trial_steps=3,
        max_trial_steps=3,
        steps=3,
        progress=False,
        optimizer=torch.optim.SGD(by_hand.parameters(), lr=0.05, momentum=0.9),
    )
    assert res.method == "auto" and res.info["choice"] == expected.info["choice"]
    assert res.info["optimizer"]["optimizer"] == "SGD" and not res.info["optimizer"].get("assumed")
    for a, b in zip(model.parameters(), by_hand.parameters(), strict=True):
        assert torch.equal(a, b)
    assert all(a is b for a, b in zip(params_before, model.parameters(), strict=True))
    assert not opt.state  # the optimizer is untouched

    start = None
    for _epoch in range(2):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            start = float(loss.detach()) if start is None else start
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert float(loss.detach()) < start


def test_training_optimizer_uses_the_schedules_base_lr():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: step / 10)  # warmup from 0
    assert opt.param_groups[0]["lr"] == 0.0
    replay = training_optimizer(opt)
    assert replay is not opt and type(replay) is torch.optim.AdamW
    assert replay.param_groups[0]["lr"] == 1e-3 and replay.param_groups[0]["weight_decay"] == 0.1
    assert opt.param_groups[0]["lr"] == 0.0 and not opt.state
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    assert training_optimizer(plain) is plain
    assert training_optimizer(None) is None

    class Wrapper:  # the shape of Accelerate's AcceleratedOptimizer
        def __init__(self, optimizer):
            self.optimizer = optimizer

    assert training_optimizer(Wrapper(plain)) is plain


IMPORTS = """
import sys
import initopt, initopt.integrations
assert not any(m == "lightning" or m.startswith(("lightning.", "pytorch_lightning", "transformers"))
               for m in sys.modules), sorted(m for m in sys.modules if "lightning" in m or "transformers" in m)
for name in ("lightning", "lightning.pytorch", "pytorch_lightning", "transformers"):
    sys.modules[name] = None
for sub, extra in (("lightning", "lightning"), ("huggingface", "hf")):
    try:
        __import__("initopt.integrations." + sub)
    except initopt.integrations.MissingDependencyError as e:
        assert isinstance(e, ImportError) and isinstance(e, initopt.InitOptError)
        assert f"pip install 'initopt[{extra}]'" in str(e), str(e)
    else:
        raise AssertionError(sub + " imported without its dependency")
print("ok")
"""


def test_optional_imports():
    assert issubclass(MissingDependencyError, ImportError)
    r = subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_the_loaders_own_generator_is_restored():
    loader = DataLoader(_data(), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(7))
    state = loader.generator.get_state()
    plain = _epoch_targets(loader)
    loader.generator.set_state(state)
    take_batches(loader, 3)
    assert all(torch.equal(a, b) for a, b in zip(plain, _epoch_targets(loader), strict=True))
