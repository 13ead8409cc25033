"""Search mode and functional evaluation leave the model alone and switch randomness off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from initopt import zoo
from initopt.core import Evaluator, ScaleSpace, Task, evaluation, search_mode


class FunctionalDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        return F.dropout(self.lin(x), 0.5, training=self.training)


@pytest.mark.parametrize(
    "make,batch",
    [
        (lambda: nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.5), nn.Linear(6, 3)), torch.randn(5, 6)),
        (FunctionalDropout, torch.randn(5, 6)),
        (lambda: zoo.post_ln_transformer(dropout=0.5), torch.randint(0, 32, (4, 8))),
    ],
)
def test_dropout_is_off_in_train_mode_search(make, batch):
    torch.manual_seed(0)
    model = make()
    space = ScaleSpace(model)
    ev = Evaluator(model, space, Task(loss_fn=lambda o, b: o.sum()))
    with search_mode(model, "train"):
        outs = [ev.output(space.leaves(space.ones()), batch) for _ in range(3)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    model.eval()
    with torch.no_grad():
        ref = model(batch)
    torch.testing.assert_close(outs[0], ref)  # no dropout, and (no BN here) the same as eval


def test_batchnorm_uses_batch_statistics_and_buffers_stay():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5)).eval()
    with torch.no_grad():
        model[1].running_mean.fill_(3.0)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    space = ScaleSpace(model)
    ev = Evaluator(model, space, Task(loss_fn=lambda o, b: o.sum()))
    x = torch.randn(16, 4)
    with search_mode(model, "train"):
        out = ev.output(space.leaves(space.ones()), x)
    torch.testing.assert_close(out.mean(0), torch.zeros(5) + model[1].bias, atol=1e-5, rtol=0)
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert not model.training and not model[1].training


def test_modes_restored_on_exception_and_eval_mode():
    model = zoo.cnn(batchnorm=True, dropout=0.1)
    model.train()
    model[1].eval()
    flags = [m.training for m in model.modules()]
    with pytest.raises(RuntimeError):
        with search_mode(model, "eval"):
            assert not any(m.training for m in model.modules())
            raise RuntimeError("x")
    assert [m.training for m in model.modules()] == flags


def test_evaluation_context_is_read_only():
    model = zoo.cnn(batchnorm=True)
    x = (torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,)))
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with evaluation(model) as ev:
        loss = ev.loss(ev.space.leaves(ev.space.ones()), x)
        torch.autograd.grad(loss, [b.param for b in ev.space.blocks], allow_unused=True)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
