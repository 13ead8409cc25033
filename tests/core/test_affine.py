"""The data-flow part of ``record_affine``: which layers are summed with another path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import initopt
from initopt.core.affine import record_affine
from initopt.core.batches import Task
from initopt.core.functional import Evaluator


def _found(model: nn.Module, batch, loss_fn=None) -> dict[str, str]:
    method = initopt.get_method("kaiming")
    space = method(method.Config()).make_space(model)
    ev = Evaluator(model, space, Task(loss_fn=loss_fn))
    trace, _ = record_affine(ev, space.initial, batch, measure=False, flow=True)
    return {space.blocks[i].name: note for i, note in trace.branch.items()}


def _summed(model: nn.Module, batch, loss_fn=None) -> set[str]:
    """Layers inside a residual branch (or parallel branches)."""
    return {n for n, note in _found(model, batch, loss_fn).items() if "summed" in note}


def _stream(model: nn.Module, batch, loss_fn=None) -> set[str]:
    """Layers that feed a residual stream."""
    return {n for n, note in _found(model, batch, loss_fn).items() if "feeds a residual stream" in note}


def _cls(n_in: int = 6):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(8, n_in, generator=g), torch.randint(0, 3, (8,), generator=g))


class Block(nn.Module):
    def __init__(self, inplace: bool = False, shortcut: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 6)
        self.f1 = nn.Linear(6, 6)
        self.f2 = nn.Linear(6, 6)
        self.short = nn.Linear(6, 6) if shortcut else None
        self.out = nn.Linear(6, 3)
        self.inplace = inplace

    def forward(self, x):
        h = torch.relu(self.inp(x))
        r = self.f2(torch.relu(self.f1(h)))
        s = self.short(h) if self.short is not None else h
        if self.inplace:
            s = s.clone()
            s += r
        else:
            s = s + r
        return self.out(s)


def test_a_chain_has_no_summed_layer():
    mlp = nn.Sequential(nn.Linear(6, 8), nn.GELU(approximate="tanh"), nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 3))
    # GELU's x + 0.044715 x^3 adds two functions of one layer's output: not a branch, not a stream
    assert _found(mlp, _cls()) == {}


@pytest.mark.parametrize("inplace", [False, True])
def test_residual_branch_is_found(inplace):
    assert _summed(Block(inplace=inplace), _cls()) == {"f1.weight", "f2.weight"}
    assert _stream(Block(inplace=inplace), _cls()) == {"inp.weight"}  # the layer before the fork


def test_projection_shortcut_and_parallel_branches_are_found():
    assert _summed(Block(shortcut=True), _cls()) == {"f1.weight", "f2.weight", "short.weight"}
    assert _stream(Block(shortcut=True), _cls()) == {"inp.weight"}

    class Parallel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.out = nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.out(torch.tanh(self.a(x)) + torch.tanh(self.b(x)))

    assert _summed(Parallel(), _cls()) == {"a.weight", "b.weight"}
    assert _stream(Parallel(), _cls()) == set()  # both branches read the input itself


def test_biases_tables_masks_and_summed_losses_are_not_paths():
    class Tables(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(8, 6) / 3)
            self.b1 = nn.Parameter(torch.zeros(8))
            self.pos = nn.Parameter(torch.randn(1, 8))
            self.l2 = nn.Linear(8, 8)
            self.head1, self.head2 = nn.Linear(8, 3), nn.Linear(8, 3)

        def forward(self, x):
            h = F.linear(x, self.w1) + self.b1  # a bias added by hand
            h = torch.relu(h + self.pos)  # a broadcast table
            h = self.l2(h)
            mask = (x[:, :1] > 0).to(h.dtype)  # data, but broadcast over the layer's units
            h = torch.relu(h + mask)
            return self.head1(h), self.head2(h)

    def loss_fn(out, batch):
        return F.cross_entropy(out[0], batch[1]) + F.cross_entropy(out[1], batch[1])  # two losses summed

    assert _found(Tables(), _cls(), loss_fn) == {}


def _hf(name: str) -> tuple[nn.Module, dict]:
    """A tiny model of ``tests/hf_cases.py`` and one of its batches."""
    pytest.importorskip("transformers")
    from hf_cases import MODELS

    torch.manual_seed(0)
    model, batch = MODELS[name]()
    return model, batch(torch.Generator().manual_seed(0))


def test_hf_bert_encoder_layers_are_summed_and_the_head_is_not():
    model, batch = _hf("bert")
    summed = _summed(model, batch)
    encoder = {n for n, p in model.named_parameters() if n.startswith("bert.encoder.") and p.ndim == 2}
    assert len(encoder) == 12 and summed == encoder
    assert _stream(model, batch) == set()  # BERT's stream starts at embedding tables, not an affine layer


def test_hf_vit_patch_embedding_feeds_the_stream():
    model, batch = _hf("vit")
    assert _stream(model, batch) == {"vit.embeddings.patch_embeddings.projection.weight"}
    found = _found(model, batch)
    assert "classifier.weight" not in found  # the output layer after the final LayerNorm is a chain's end
