"""GradCosine as a read-only diagnostic (Yang et al., NeurIPS 2022, arXiv:2210.05956).

:func:`grad_cosine` measures how well the gradients of different examples of one batch agree:
the mean cosine similarity over pairs of distinct groups,

.. math::

    \\mathrm{GC} = \\frac{1}{D(D-1)} \\sum_{k \\ne l}
    \\frac{\\langle G_k, G_l\\rangle}{\\|G_k\\|\\,\\|G_l\\| + \\epsilon},

with :math:`G_k` the gradient of the loss of one example (sample-wise, ``num_splits=None``,
D = batch size) or of one of D contiguous equal sub-batches (batch-wise B-GC). It also
returns the group gradient norms and their mean (B-GN).

**BatchNorm.** Per-example gradients must not mix examples through batch statistics, so the
sample-wise measure runs the model in eval mode: BatchNorm normalizes with its running
statistics (read from copies of the buffers), dropout is off. The batch-wise measure runs in
training mode with dropout off: every sub-batch has its own forward, so BatchNorm uses that
sub-batch's statistics, as in NIO's search. Neither writes anything into the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from initopt.core.batches import Batch, batch_size, is_single_batch, move_batch, split_batch
from initopt.core.cosine import GramPlan, build_plan, norms_and_gc, sample_gram, subbatch_gram
from initopt.core.functional import evaluation
from initopt.errors import ConfigError, DataError

__all__ = ["GradCosine", "grad_cosine"]


@dataclass(frozen=True)
class GradCosine:
    """Result of :func:`grad_cosine`.

    Attributes:
        gc: mean pairwise cosine similarity of the group gradients (GC or B-GC).
        gn: mean gradient norm over the groups (B-GN; sample-wise: mean per-example norm).
        norms: the D group gradient norms :math:`\\|G_k\\|`, in batch order.
        num_groups: D (the batch size for the sample-wise measure).
        sample_wise: ``True`` when each group is one example.
        mode: ``"eval"`` (sample-wise) or ``"train"`` (batch-wise), the mode the model ran in.
        accelerated: parameter names whose gradients the Gram identity computed (the rest
            by autograd per group or by ``torch.func.vmap``).
    """

    gc: float
    gn: float
    norms: tuple[float, ...]
    num_groups: int
    sample_wise: bool
    mode: str
    accelerated: tuple[str, ...] = ()


def grad_cosine(
    model: nn.Module,
    batch: Batch,
    *,
    loss_fn: Callable[[Any, Batch], torch.Tensor] | None = None,
    num_splits: int | None = None,
    forward_fn: Callable[[nn.Module, Batch], Any] | None = None,
    params: Any = None,
    eps: float = 1e-8,
    chunk_size: int | None = 32,
    accelerate: bool = True,
) -> GradCosine:
    """GradCosine of ``model`` on one batch: sample-wise (``num_splits=None``) or batch-wise.

    Args:
        model: the network; nothing in it changes (parameters, buffers, modes, ``.grad``).
        batch: one batch (``(inputs, targets)``, a dict, or a tensor with ``loss_fn``).
        loss_fn: ``loss_fn(output, batch) -> scalar``; ``None``: cross-entropy / the model's loss.
        num_splits: ``None`` for per-example gradients; D >= 2 for D contiguous sub-batches
            (sizes differ by at most one when D does not divide the batch).
        forward_fn: ``forward_fn(model, batch) -> output``; ``None`` calls the model.
        params: restrict the gradients to these parameter names or a module prefix.
        eps: :math:`\\epsilon` in the cosine's denominator.
        chunk_size: examples per ``vmap`` call for tensors the Gram identity does not cover.
        accelerate: use the Gram identity for Linear/Conv layers (``False``: vmap/autograd only).

    Returns:
        A frozen :class:`GradCosine`.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> batch = (torch.randn(6, 4), torch.randint(0, 3, (6,)))
        >>> r = grad_cosine(net, batch)
        >>> r.num_groups, len(r.norms), -1 <= r.gc <= 1
        (6, 6, True)
    """
    if not is_single_batch(batch):
        raise DataError(f"grad_cosine takes one batch, got {type(batch).__name__}")
    n = batch_size(batch)
    if num_splits is not None:
        if not isinstance(num_splits, int) or isinstance(num_splits, bool) or not 2 <= num_splits <= n:
            raise ConfigError(
                f"num_splits must be None or an integer in [2, {n}] for a batch of {n}; got {num_splits!r}"
            )
    elif n < 2:
        raise DataError("sample-wise GradCosine needs a batch of at least 2 examples")
    if not eps >= 0:
        raise ConfigError(f"eps must be >= 0, got {eps!r}")
    mode = "eval" if num_splits is None else "train"
    with evaluation(model, loss_fn=loss_fn, forward_fn=forward_fn, params=params, mode=mode) as ev:
        batch = move_batch(batch, ev.space.device)
        alpha = ev.space.ones()
        if num_splits is None:
            gram, plan = sample_gram(ev, alpha, batch, accelerate=accelerate, chunk_size=chunk_size)
        else:
            plan = build_plan(ev, batch) if accelerate else GramPlan.plain(ev)
            gram, _ = subbatch_gram(ev, alpha, split_batch(batch, num_splits), plan=plan)
        vals = norms_and_gc(gram, eps)
        names = tuple(plan.accelerated_names(ev))
    return GradCosine(
        gc=vals["gc"],
        gn=vals["gn"],
        norms=vals["norms"],
        num_groups=n if num_splits is None else num_splits,
        sample_wise=num_splits is None,
        mode=mode,
        accelerated=names,
    )
