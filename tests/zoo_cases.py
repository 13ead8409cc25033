"""The zoo of small models and the list of method cases shared by the contract suite.

A new method joins every contract test by adding one line to ``METHOD_CASES``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from initopt import zoo


@dataclass(frozen=True)
class ModelCase:
    name: str
    make: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], Any]


class PlainAttention(nn.Module):
    """Attention with no residual connection: every projection is a link of a chain."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.ff = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        a, _ = self.attn(h, h, h)
        return self.head(torch.relu(self.ff(a)).mean(1))


def _cls(shape: tuple[int, ...], classes: int = 10, n: int = 8) -> Callable[[torch.Generator], Any]:
    return lambda g: (torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g))


def _tokens(g: torch.Generator) -> Any:
    return (torch.randint(0, 32, (8, 12), generator=g), torch.randint(0, 4, (8,), generator=g))


def _lm(g: torch.Generator) -> Any:
    ids = torch.randint(0, 32, (8, 10), generator=g)
    return {"input_ids": ids, "labels": torch.roll(ids, -1, dims=1)}


MODEL_CASES = [
    ModelCase("mlp", lambda: zoo.mlp(depth=3, width=16, in_features=12), _cls((12,))),
    ModelCase("cnn", lambda: zoo.cnn(channels=(4, 8)), _cls((3, 8, 8))),
    ModelCase("cnn_bn", lambda: zoo.cnn(channels=(4, 8), batchnorm=True, dropout=0.2), _cls((3, 8, 8))),
    ModelCase("resnet_bn", lambda: zoo.resnet(blocks=2, width=4), _cls((3, 8, 8))),
    ModelCase("post_ln_transformer", lambda: zoo.post_ln_transformer(), _tokens),
    ModelCase("tied_lm", lambda: zoo.tied_lm(), _lm),
]

# (method name, config fields, steps): one line per method.
# The learned methods run without their guard here, so that their scales are applied and the
# contract checks them; one case keeps the guard (short trials), so the contract covers it too.
METHOD_CASES: list[tuple[str, dict[str, Any], int]] = [
    ("gradinit", {"lr": 0.05, "guard": False}, 4),
    ("gradinit", {"target": "adam", "gamma": 1e4, "eta": 1e-3, "max_gain_scale": 100.0, "guard": False}, 3),
    ("gradinit", {"lr": 0.5, "guard_steps": 3}, 3),
    ("hessian", {}, 2),
    ("nio", {"num_splits": 2, "lr": 0.05, "guard": False}, 3),
    ("metainit", {"source": "batches", "guard": False}, 3),
    ("lsuv", {"max_iters": 3}, 2),
    ("kaiming", {"fan": "out"}, 1),
    ("auto", {"trial_steps": 2, "holdout": 1}, 2),
]


def data_for(case: ModelCase, n_batches: int = 3, seed: int = 0) -> list[Any]:
    g = torch.Generator().manual_seed(seed)
    return [case.batch(g) for _ in range(n_batches)]


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything about a model a method must not change unasked."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers(remove_duplicate=False)},
        "modes": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad for p in model.parameters()],
        "ids": [id(p) for p in model.parameters()],
    }


def assert_same(a: dict[str, Any], b: dict[str, Any], params: bool = True) -> None:
    if params:
        assert a["params"].keys() == b["params"].keys()
        for n in a["params"]:
            assert torch.equal(a["params"][n], b["params"][n]), f"parameter {n} changed"
    for n in a["buffers"]:
        assert torch.equal(a["buffers"][n], b["buffers"][n]), f"buffer {n} changed"
    assert a["modes"] == b["modes"], "module train/eval modes changed"
    assert a["requires_grad"] == b["requires_grad"], "requires_grad changed"
    assert all(g is None for g in b["grads"]), ".grad was written"
    assert a["ids"] == b["ids"], "Parameter objects were replaced"
