"""The gradient quotient of MetaInit as a read-only diagnostic (Dauphin & Schoenholz, NeurIPS 2019).

.. math::

    \\mathrm{GQ} = \\frac1N \\sum_i \\Big|\\frac{g_i - (Hg)_i}{g_i + \\epsilon s_i} - 1\\Big|,
    \\qquad g = \\nabla_\\theta L,\\; s_i = \\pm 1 \\text{ the sign of } g_i \\;(+1 \\text{ at } 0).

GQ is 0 when one gradient step leaves the gradient unchanged (no curvature along the
gradient) and grows as curvature along :math:`g` grows relative to :math:`g`; a vanishing
gradient gives about 1. See :mod:`initopt.core.quotient` for the computation.

**Parameters the loss does not reach** (unused layers, embedding rows not in the batch) have
:math:`g = 0` and :math:`Hg = 0`, so each of their entries contributes exactly 1 and counts in
:math:`N`; they are listed in :attr:`GradientQuotient.unreached` (whole tensors only).
Nothing in the model changes: not its parameters, buffers, modes or ``.grad``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from initopt.core.batches import Batch, check_finite, is_single_batch, move_batch
from initopt.core.functional import evaluation
from initopt.core.quotient import gradient_terms, quotient_sums
from initopt.errors import ConfigError, DataError

__all__ = ["GradientQuotient", "gradient_quotient"]


@dataclass(frozen=True)
class GradientQuotient:
    """Result of :func:`gradient_quotient`; ``float(result)`` is the GQ.

    Attributes:
        gq: the gradient quotient over all considered tensors.
        loss: the loss on the batch.
        num_scalars: :math:`N`.
        per_tensor: ``{name: mean |q_i| over that tensor}`` (canonical names).
        unreached: tensors the loss does not depend on (each entry contributes 1).
        mode: ``"eval"`` or ``"train"``, the mode the model ran in.
        eps: :math:`\\epsilon`.
    """

    gq: float
    loss: float
    num_scalars: int
    per_tensor: dict[str, float]
    unreached: tuple[str, ...]
    mode: str
    eps: float

    def __float__(self) -> float:
        return self.gq


def gradient_quotient(
    model: nn.Module,
    batch: Batch,
    *,
    loss_fn: Callable[[Any, Batch], torch.Tensor] | None = None,
    eps: float = 1e-5,
    forward_fn: Callable[[nn.Module, Batch], Any] | None = None,
    params: Any = None,
    mode: str = "eval",
) -> GradientQuotient:
    """MetaInit's gradient quotient of ``model`` on one batch.

    Args:
        model: the network; nothing in it changes.
        batch: one batch (``(inputs, targets)``, a dict, or a tensor with ``loss_fn``).
        loss_fn: ``loss_fn(output, batch) -> scalar`` (mean-reduced); ``None``: cross-entropy
            for tuples, the model's own loss for dicts.
        eps: :math:`\\epsilon`.
        forward_fn: ``forward_fn(model, batch) -> output``; ``None`` calls the model.
        params: the tensors considered (names or a module prefix); ``None``: every trainable
            tensor, tied tensors once.
        mode: ``"eval"`` (as MetaInit measures it) or ``"train"`` (BatchNorm on batch
            statistics, dropout off).

    Returns:
        A frozen :class:`GradientQuotient`.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> r = gradient_quotient(net, (torch.randn(16, 4), torch.randint(0, 3, (16,))))
        >>> r.num_scalars, r.gq > 0
        (67, True)
    """
    if not is_single_batch(batch):
        raise DataError(f"gradient_quotient takes one batch, got {type(batch).__name__}")
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ConfigError(f"gradient_quotient: eps must be > 0, got {eps!r}")
    if mode not in ("train", "eval"):
        raise ConfigError(f"gradient_quotient: mode must be 'eval' or 'train', got {mode!r}")
    with torch.enable_grad(), evaluation(model, loss_fn=loss_fn, forward_fn=forward_fn, params=params, mode=mode) as ev:
        batch = move_batch(batch, ev.space.device)
        theta = ev.space.leaves(ev.space.ones())
        loss = ev.loss(theta, batch)
        terms = gradient_terms(loss, theta)
        sums = quotient_sums(terms.g, terms.hg, eps).detach()
        n = sum(t.numel() for t in theta)
        sizes = torch.tensor([t.numel() for t in theta], dtype=sums.dtype, device=sums.device)
        values = torch.cat([(sums.sum() / n).reshape(1), loss.detach().to(sums.dtype).reshape(1), sums / sizes])
        check_finite("the gradient quotient", values)
        values = values.double().tolist()
        names = ev.space.names
    return GradientQuotient(
        gq=values[0],
        loss=values[1],
        num_scalars=n,
        per_tensor=dict(zip(names, values[2:], strict=True)),
        unreached=tuple(nm for nm, r in zip(names, terms.reached, strict=True) if not r),
        mode=mode,
        eps=float(eps),
    )
