"""InitOptCallback in a real lightning.Trainer on CPU: same weights as initialize_ by hand, then training."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import initopt

L = pytest.importorskip("lightning.pytorch")
from initopt.integrations.lightning import InitOptCallback  # noqa: E402


class LitMLP(L.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def _loader(shuffle: bool = True) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 8, generator=g)
    y = (x[:, :3]).argmax(1)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=shuffle)


class Snapshot(L.Callback):
    """Records the weights right after InitOptCallback (callbacks run in list order)."""

    def __init__(self) -> None:
        self.at_fit_start: dict[str, torch.Tensor] | None = None

    def on_fit_start(self, trainer, pl_module):
        self.at_fit_start = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def _trainer(tmp_path, callbacks, max_steps=4, **kw):
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **kw,
    )


def test_fit_start_equals_initialize_by_hand_then_trains(tmp_path):
    torch.manual_seed(0)
    module = LitMLP()
    by_hand = copy.deepcopy(module)
    loader = _loader(shuffle=False)
    batches = initopt.integrations.take_batches(loader, 4)
    expected = initopt.initialize_(
        by_hand,
        batches,
        "gradinit",
        steps=5,
        seed=3,
        progress=False,
        optimizer=torch.optim.SGD(by_hand.parameters(), lr=0.05, momentum=0.9),
    )

    cb = InitOptCallback("gradinit", batches=4, steps=5, seed=3, verbose=False)
    snap = Snapshot()
    trainer = _trainer(tmp_path, [cb, snap])
    trainer.fit(module, loader)

    assert cb.result is not None and cb.skipped is None
    assert cb.result.scales == expected.scales
    assert cb.result.info["lookahead"]["optimizer"] == "SGD"  # the fit's optimizer was replayed
    for k, v in by_hand.state_dict().items():
        assert torch.equal(snap.at_fit_start[k], v), k
    # training proceeded from there
    assert trainer.global_step == 4
    after = module.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in snap.at_fit_start.items())
    assert all(torch.isfinite(v).all() for v in after.values())
    assert not list(tmp_path.iterdir())  # no logs or checkpoints written


def test_resumed_fit_is_skipped_and_run_once(tmp_path):
    torch.manual_seed(0)
    module = LitMLP()
    cb = InitOptCallback("kaiming", batches=2, verbose=False)
    trainer = _trainer(tmp_path, [cb], max_steps=2)
    trainer.fit(module, _loader())
    assert cb.result is not None and cb.result.method == "kaiming"
    ckpt = tmp_path / "a.ckpt"
    trainer.save_checkpoint(ckpt)

    # resuming from the checkpoint: its weights are kept, the method does not run
    cb2 = InitOptCallback("kaiming", batches=2, verbose=False)
    snap = Snapshot()
    module2 = LitMLP()
    state = torch.load(ckpt, weights_only=False)
    trainer2 = _trainer(tmp_path, [cb2, snap], max_steps=4)
    trainer2.fit(module2, _loader(), ckpt_path=ckpt)
    assert cb2.result is None and "checkpoint" in cb2.skipped
    assert trainer2.global_step == 4
    assert any(k.startswith("InitOptCallback") and v["done"] for k, v in state["callbacks"].items())

    # a second fit with the same callback does not run it again
    trainer3 = _trainer(tmp_path, [cb], max_steps=1)
    trainer3.fit(module, _loader())
    assert cb.skipped is not None and "already ran" in cb.skipped


class Recorder(L.loggers.Logger):
    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[dict] = []

    name = "recorder"
    version = 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append(dict(metrics))


def test_auto_with_the_fits_optimizer_logs_to_the_loggers(tmp_path, caplog):
    torch.manual_seed(0)
    module = LitMLP()
    rec = Recorder()
    cb = InitOptCallback(batches=6, trial_steps=3, max_trial_steps=3, steps=3)
    trainer = _trainer(tmp_path, [cb], max_steps=2)
    trainer.loggers = [rec]
    with caplog.at_level("INFO"):
        trainer.fit(module, _loader())
    assert cb.result.method == "auto" and cb.result.info["optimizer"]["optimizer"] == "SGD"
    assert not cb.result.info["optimizer"].get("assumed")
    assert "initopt: method auto" in caplog.text
    first = rec.metrics[0]
    assert "initopt/seconds" in first and any(k.startswith("initopt/after/") for k in first)


def test_forward_and_default_loss_given_data_and_scales_file(tmp_path):
    torch.manual_seed(0)
    module = LitMLP()
    by_hand = copy.deepcopy(module)
    loader = _loader(shuffle=False)
    data = [next(iter(loader))]
    initopt.initialize_(by_hand, data, "nio", steps=3, seed=0, progress=False)
    path = tmp_path / "scales.json"
    cb = InitOptCallback("nio", data=data, training_step=False, steps=3, verbose=False, scales_path=path)
    _trainer(tmp_path, [cb, snap := Snapshot()], max_steps=1).fit(module, loader)
    for k, v in by_hand.state_dict().items():
        assert torch.equal(snap.at_fit_start[k], v), k
    assert initopt.load_scales(path)["scales"] == cb.result.scales


def test_bad_training_step_output_is_a_clear_error(tmp_path):
    class NoLoss(LitMLP):
        def training_step(self, batch, batch_idx):
            return None

    cb = InitOptCallback("kaiming", batches=1, verbose=False)
    with pytest.raises(initopt.LossError, match="training_step returned NoneType"):
        _trainer(tmp_path, [cb], max_steps=1).fit(NoLoss(), _loader())


def test_manual_optimization_needs_a_loss(tmp_path):
    class Manual(LitMLP):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            loss = F.cross_entropy(self(batch[0]), batch[1])
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    torch.manual_seed(0)
    module = Manual()
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(initopt.ConfigError, match="manual optimization"):
        _trainer(tmp_path, [InitOptCallback("kaiming", batches=1, verbose=False)], max_steps=1).fit(module, _loader())
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())
    cb = InitOptCallback("kaiming", batches=1, verbose=False, training_step=False)
    _trainer(tmp_path, [cb], max_steps=1).fit(Manual(), _loader())
    assert cb.result is not None


def test_bad_arguments():
    with pytest.raises(initopt.ConfigError, match="batches"):
        InitOptCallback(batches=0)
    with pytest.raises(initopt.ConfigError, match="training_step=True"):
        InitOptCallback(training_step=True, loss_fn=lambda o, b: o.sum())


class Seen(L.Callback):
    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch[1].clone())


def test_training_sees_the_same_shuffled_batches_as_without_the_callback(tmp_path):
    seen = []
    for callbacks in ([], [InitOptCallback("kaiming", batches=3, verbose=False)]):
        torch.manual_seed(0)
        rec = Seen()
        _trainer(tmp_path, [*callbacks, rec], max_steps=8).fit(LitMLP(), _loader(shuffle=True))
        seen.append(rec.batches)
    assert len(seen[0]) == 8
    assert all(torch.equal(a, b) for a, b in zip(*seen, strict=True))
