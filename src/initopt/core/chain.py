"""Gradient and Hessian-vector product of a chain of linear layers, written out.

MetaInit needs :math:`g = \\nabla_\\theta L` and :math:`Hg` *with their graphs*, to
differentiate the gradient quotient once more (:mod:`initopt.core.quotient`). Autograd gets
them by two nested backward passes that record graphs (``create_graph=True``): on a small
network most of the cost is then per operation rather than per multiply-add (a 10-layer MLP
of width 64 at batch 64 runs about 1600 operations per MetaInit step, 630 of them transposes).

For a network that is a plain chain -- an ``nn.Sequential`` of ``nn.Linear`` layers and
elementwise activations (:data:`ACTIVATIONS`), optionally starting with ``nn.Flatten()`` --
under the default cross-entropy loss, :class:`Chain` computes the same two vectors as ordinary
differentiable operations, so one backward pass differentiates them:

* the forward :math:`z_l = h_{l-1}W_l^\\top + b_l`, :math:`h_l = \\phi(z_l)`;
* the backward :math:`\\delta = \\partial L/\\partial z`: at the logits
  :math:`w_n(\\mathrm{softmax}(z_n) - e_{y_n})` (:math:`w_n` = 1/number of counted targets,
  0 for the ignore index -100), then :math:`\\nabla_{W_l} L = \\delta_l^\\top h_{l-1}`,
  :math:`\\nabla_{b_l} L = \\sum_n \\delta_{l,n}` and :math:`\\delta \\leftarrow \\phi'(z)
  \\odot \\delta W_l` going down;
* :math:`Hg` as the directional derivative of that backward along :math:`g`
  (Pearlmutter's :math:`\\mathcal R` operator): :math:`r_l = \\mathcal R\\{z_l\\} =
  \\mathcal R\\{h_{l-1}\\}W_l^\\top + h_{l-1}G_l^\\top + g_{b_l}` with
  :math:`\\mathcal R\\{h\\} = \\phi'(z) \\odot r`; at the logits :math:`\\mathcal R\\{\\delta\\} =
  w \\odot (p \\odot r - p\\,\\langle p, r\\rangle)`; then :math:`(Hg)_{W_l} =
  \\mathcal R\\{\\delta_l\\}^\\top h_{l-1} + \\delta_l^\\top \\mathcal R\\{h_{l-1}\\}`,
  :math:`(Hg)_{b_l} = \\sum_n \\mathcal R\\{\\delta_l\\}_n` and :math:`\\mathcal R\\{\\delta\\}
  \\leftarrow \\phi'(z) \\odot (\\mathcal R\\{\\delta\\} W_l + \\delta G_l) + \\phi''(z) \\odot r
  \\odot \\delta W_l` going down.

The values are those of the nested backward passes up to float round-off (the same
mathematics in another order), checked against the dense float64 Hessian in the tests.
Anything else (other modules, hooks, tied or frozen weights, a user loss or forward,
half-precision models, inputs that are not ``(inputs, class labels)``) is not a chain:
:meth:`Chain.of` and :meth:`Chain.accepts` return ``None``/``False`` and the caller keeps
autograd.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from initopt.core.batches import Batch, Task
from initopt.core.blocks import ScaleSpace

__all__ = ["ACTIVATIONS", "Activation", "Chain"]

IGNORE_INDEX = -100  # F.cross_entropy's default


class Activation:
    """An elementwise :math:`\\phi` with :math:`\\phi'(z)\\,t` and :math:`\\phi''(z)\\,t`
    as differentiable operations of ``z`` (its input), ``y`` (its output) and ``t``."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def d1(self, t: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """:math:`\\phi'(z) \\odot t`."""
        raise NotImplementedError

    def d2(self, t: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """:math:`\\phi''(z) \\odot t`; ``None`` where :math:`\\phi'' = 0` (piecewise linear)."""
        return None


class _Identity(Activation):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def d1(self, t: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return t


class _ReLU(Activation):
    """As autograd differentiates ``relu``: :math:`\\phi'` is 1 where the output is positive."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.relu(z)

    def d1(self, t: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.threshold_backward(t, y, 0)


@dataclass(frozen=True)
class _LeakyReLU(Activation):
    slope: float

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(z, self.slope)

    def d1(self, t: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.leaky_relu_backward(t, z, self.slope, False)


class _Tanh(Activation):
    """:math:`\\phi' = 1 - y^2`, :math:`\\phi'' = -2y(1 - y^2)`."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z)

    def d1(self, t: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.tanh_backward(t, y)

    def d2(self, t: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.tanh_backward(t * y, y) * -2


ACTIVATIONS: dict[type[nn.Module], Callable[[Any], Activation]] = {
    nn.ReLU: lambda m: _ReLU(),
    nn.LeakyReLU: lambda m: _LeakyReLU(float(m.negative_slope)),
    nn.Tanh: lambda m: _Tanh(),
    nn.Identity: lambda m: _Identity(),
}
"""The elementwise modules a chain may hold (exact types; subclasses may change ``forward``)."""


@dataclass(frozen=True)
class _Linear:
    weight: int  # block index
    bias: int | None
    in_features: int
    out_features: int


_Op = _Linear | Activation


def _plain(m: nn.Module) -> bool:
    """No hooks that could change what the module computes or differentiates."""
    return not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _no_global_hooks() -> bool:
    return not any(
        getattr(_module, name, None)
        for name in (
            "_global_forward_hooks",
            "_global_forward_pre_hooks",
            "_global_backward_hooks",
            "_global_backward_pre_hooks",
        )
    )


class Chain:
    """A model read as ``inputs -> [Linear | activation]* -> logits`` with the default
    cross-entropy loss; :meth:`terms` gives the loss, :math:`g` and :math:`Hg` with graphs."""

    def __init__(self, ops: list[_Op], flatten: bool, n_blocks: int, like: torch.Tensor) -> None:
        self.ops = ops
        self.flatten = flatten
        self.n_blocks = n_blocks
        self.dtype, self.device = like.dtype, like.device
        self.linears = [op for op in ops if isinstance(op, _Linear)]

    @classmethod
    def of(cls, model: nn.Module, space: ScaleSpace, task: Task) -> Chain | None:
        """The chain of ``model`` over the blocks of ``space``, or ``None`` if it is not one."""
        if type(model) is not nn.Sequential or task.loss_fn is not None or task.forward_fn is not None:
            return None
        if space.upcast or not _plain(model) or not _no_global_hooks():
            return None
        block_of: dict[str, int] = {}
        for i, b in enumerate(space.blocks):
            if len(b.names) != 1:
                return None  # tied weights
            block_of[b.names[0]] = i
        ops: list[_Op] = []
        flatten = False
        used: set[str] = set()
        width: int | None = None
        for key, m in model._modules.items():
            if m is None or not _plain(m) or next(m.buffers(), None) is not None:
                return None
            if type(m) is nn.Flatten and not ops and (m.start_dim, m.end_dim) == (1, -1):
                flatten = True
            elif type(m) is nn.Linear:
                names = [f"{key}.weight"] + ([f"{key}.bias"] if m.bias is not None else [])
                if any(n not in block_of for n in names) or (width is not None and m.in_features != width):
                    return None  # frozen or unselected tensors, or mismatched shapes
                used.update(names)
                bias = block_of[names[1]] if m.bias is not None else None
                ops.append(_Linear(block_of[names[0]], bias, m.in_features, m.out_features))
                width = m.out_features
            elif type(m) in ACTIVATIONS:
                ops.append(ACTIVATIONS[type(m)](m))
            else:
                return None
        if not ops or not isinstance(ops[-1], _Linear) or used != set(block_of):
            return None
        if len({(t.dtype, t.device) for t in space.initial}) != 1:
            return None
        return cls(ops, flatten, len(space.blocks), space.initial[0])

    def accepts(self, batch: Batch) -> bool:
        """Whether ``batch`` is ``(inputs, class labels, ...)`` this chain runs on as the model
        would (float inputs of the weights' dtype and device, flattened if the chain starts
        with ``nn.Flatten``)."""
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            return False
        x, y = batch[0], batch[1]
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
            return False
        if (x.dtype, x.device, y.device) != (self.dtype, self.device, self.device) or x.requires_grad:
            return False
        if y.is_floating_point() or y.dtype == torch.bool or y.ndim != 1:
            return False
        if x.ndim < 2 or (x.ndim > 2 and not self.flatten) or x.shape[0] != y.shape[0]:
            return False
        return x[0].numel() == self.linears[0].in_features

    def max_macs(self, batch: Batch) -> int:
        """Largest multiply-adds of one linear layer's forward on ``batch``."""
        return int(batch[0].shape[0]) * max(op.in_features * op.out_features for op in self.linears)

    def terms(
        self, theta: Sequence[torch.Tensor], batch: Batch, clock: Callable[[str], None] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """``(loss, g, Hg)`` at ``theta`` (one tensor per block) on ``batch``; ``g`` and
        ``Hg`` carry their graphs to ``theta``, the loss is detached. ``clock``, if given, is
        called with ``"forward"``, ``"gradient"`` and ``"hvp"`` after each part."""
        x, y = batch[0], batch[1]
        h = x.flatten(1) if self.flatten else x
        hs: list[torch.Tensor] = []  # the input of every op
        wt: dict[int, torch.Tensor] = {}
        for op in self.ops:
            hs.append(h)
            if isinstance(op, _Linear):
                wt[op.weight] = w_t = theta[op.weight].t()
                h = h @ w_t if op.bias is None else torch.addmm(theta[op.bias], h, w_t)
            else:
                h = op.forward(h)
        logits = h
        loss = F.cross_entropy(logits.detach(), y)  # also raises on invalid labels, as the model's loss would
        if clock is not None:
            clock("forward")

        valid = (y != IGNORE_INDEX).to(logits.dtype)
        weight = (valid / valid.sum())[:, None]
        p = torch.softmax(logits, 1)
        target = F.one_hot(torch.where(y == IGNORE_INDEX, 0, y), logits.shape[1]).to(logits.dtype)
        delta = (p - target) * weight
        first = next(i for i, op in enumerate(self.ops) if isinstance(op, _Linear))
        g: list[torch.Tensor | None] = [None] * self.n_blocks
        deltas: list[torch.Tensor] = [delta] * len(self.ops)  # dL/d(output) of every op
        deltas_t: dict[int, torch.Tensor] = {}  # their transposes at linear layers (one graph node each)
        outs = [*hs[1:], logits]
        for i in range(len(self.ops) - 1, first - 1, -1):
            op = self.ops[i]
            deltas[i] = delta
            if isinstance(op, _Linear):
                deltas_t[i] = delta.t()
                g[op.weight] = deltas_t[i] @ hs[i]
                if op.bias is not None:
                    g[op.bias] = delta.sum(0)
                if i > first:
                    delta = delta @ theta[op.weight]
            else:
                delta = op.d1(delta, hs[i], outs[i])
        if clock is not None:
            clock("gradient")

        r: torch.Tensor | None = None  # R{input of the op}; None: 0
        rs: list[torch.Tensor | None] = []
        for i, op in enumerate(self.ops):
            rs.append(r)
            if isinstance(op, _Linear):
                gw = g[op.weight]
                assert gw is not None
                if op.bias is None:
                    out = hs[i] @ gw.t()
                else:
                    out = torch.addmm(g[op.bias], hs[i], gw.t())  # type: ignore[arg-type]
                r = out if r is None else torch.addmm(out, r, wt[op.weight])
            elif r is not None:
                r = op.d1(r, hs[i], outs[i])
        assert r is not None
        pr = p * r
        rdelta = (pr - p * pr.sum(1, keepdim=True)) * weight
        hg: list[torch.Tensor | None] = [None] * self.n_blocks
        for i in range(len(self.ops) - 1, first - 1, -1):
            op, delta, r_in = self.ops[i], deltas[i], rs[i]
            if isinstance(op, _Linear):
                hw = rdelta.t() @ hs[i]
                hg[op.weight] = hw if r_in is None else torch.addmm(hw, deltas_t[i], r_in)
                if op.bias is not None:
                    hg[op.bias] = rdelta.sum(0)
                if i > first:
                    rdelta = torch.addmm(rdelta @ theta[op.weight], delta, g[op.weight])  # type: ignore[arg-type]
            else:
                curv = op.d2(delta, hs[i], outs[i]) if r_in is not None else None
                rdelta = op.d1(rdelta, hs[i], outs[i])
                if curv is not None:
                    rdelta = rdelta + curv * r_in
        if clock is not None:
            clock("hvp")
        return loss, _filled(g), _filled(hg)


def _filled(ts: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """The list, checked complete (a chain's layers hold every block)."""
    out = [t for t in ts if t is not None]
    assert len(out) == len(ts)
    return out
