"""The gradient quotient of MetaInit (Dauphin & Schoenholz, "MetaInit: Initializing learning by
learning to initialize", NeurIPS 2019), as pure functions of a loss and a list of tensors.

With :math:`g = \\nabla_\\theta L` (mean-reduced loss), :math:`H` the Hessian,
:math:`s_i = +1` if :math:`g_i \\ge 0` else :math:`-1` (a constant) and :math:`N` the number of
scalars in the tensors considered:

.. math::

    q_i = \\frac{g_i - (Hg)_i}{g_i + \\epsilon s_i} - 1
        = -\\frac{(Hg)_i + \\epsilon s_i}{g_i + \\epsilon s_i}, \\qquad
    \\mathrm{GQ} = \\frac{1}{N} \\sum_i |q_i|.

:math:`Hg` is one Hessian-vector product, computed as the vector-Jacobian product of the
gradient with itself, :math:`Hg = (\\partial g/\\partial\\theta)^\\top g = \\nabla(\\tfrac12\\|g\\|^2)`
(one extra backward pass, no :math:`\\tfrac12\\|g\\|^2` graph). With ``create_graph=True`` both
graphs are kept, so GQ can be differentiated again (MetaInit's search).

Tensors the loss does not reach have :math:`g = 0` and :math:`Hg = 0`, hence
:math:`q_i = -1`: every such entry contributes exactly 1 to the sum, and is counted in
:math:`N`. (That is the formula itself, not a special case.) GQ grows linearly with a
constant multiplier :math:`c` on the loss while :math:`|c\\,g_i| \\gg \\epsilon`, because
:math:`Hg` scales with :math:`c^2`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

__all__ = [
    "GradientTerms",
    "gradient_and_hvp",
    "gradient_quotient",
    "gradient_terms",
    "quotient_sums",
    "quotient_total",
]


def _zeros_for_none(grads: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, like, strict=True)]


class GradientTerms(NamedTuple):
    """:math:`g`, :math:`Hg` and, per tensor, whether the loss reaches it at all."""

    g: list[torch.Tensor]
    hg: list[torch.Tensor]
    reached: list[bool]


def gradient_terms(
    loss: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    create_graph: bool = False,
    clock: Callable[[str], None] | None = None,
) -> GradientTerms:
    """:math:`g = \\nabla L` and :math:`Hg`, one tensor each per entry of ``tensors``.

    ``g`` is always taken with its graph (the product needs it); ``create_graph`` keeps the
    graph of :math:`Hg` too, for a further derivative. Tensors the loss does not reach get
    zeros in both (and ``reached`` False). ``clock``, if given, is called with
    ``"gradient"`` and ``"hvp"`` after each pass (for timing breakdowns).

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> t = gradient_terms((w**3).sum() / 3, [w])  # g = w^2, H = diag(2w)
        >>> t.hg[0].tolist(), t.reached
        ([2.0, 16.0], [True])
    """
    tensors = list(tensors)
    raw = torch.autograd.grad(loss, tensors, create_graph=True, allow_unused=True)
    reached = [x is not None for x in raw]
    g = _zeros_for_none(raw, tensors)
    if clock is not None:
        clock("gradient")
    live = [i for i, x in enumerate(g) if x.requires_grad]
    hg = [torch.zeros_like(t) for t in tensors]
    if live:
        prods = torch.autograd.grad(
            [g[i] for i in live],
            tensors,
            grad_outputs=[g[i] for i in live],
            create_graph=create_graph,
            allow_unused=True,
        )
        hg = _zeros_for_none(prods, tensors)
    if clock is not None:
        clock("hvp")
    if not create_graph:
        g = [x.detach() for x in g]
    return GradientTerms(g, hg, reached)


def gradient_and_hvp(
    loss: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    create_graph: bool = False,
    clock: Callable[[str], None] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(g, Hg)`` of :func:`gradient_terms`."""
    t = gradient_terms(loss, tensors, create_graph=create_graph, clock=clock)
    return t.g, t.hg


def quotient_sums(g: Sequence[torch.Tensor], hg: Sequence[torch.Tensor], eps: float = 1e-5) -> torch.Tensor:
    """:math:`\\sum_i |q_i|` over the entries of each tensor: one value per tensor.

    Differentiable in ``g`` and ``hg`` (with :math:`s` held constant, as in the paper).
    """
    out = []
    for gi, hi in zip(g, hg, strict=True):
        e = torch.where(gi.detach() >= 0, gi.new_tensor(eps), gi.new_tensor(-eps))
        out.append(((hi + e) / (gi + e)).abs().sum())
    if not out:
        raise ValueError("quotient_sums needs at least one tensor")
    return torch.stack(out)


CONCAT_MAX_ENTRIES = 1 << 20
"""Largest total size that :func:`quotient_total` concatenates (the demo's MLP has 40K entries)."""


def quotient_total(g: Sequence[torch.Tensor], hg: Sequence[torch.Tensor], eps: float = 1e-5) -> torch.Tensor:
    """:math:`\\sum_i |q_i|` over all entries of all tensors (0-d): ``quotient_sums(g, hg, eps).sum()``
    computed on the concatenated entries, a handful of operations instead of a few per tensor
    (the same value up to the order of summation). Above :data:`CONCAT_MAX_ENTRIES` entries the
    copies into one tensor cost more than the per-tensor operations they save, and it sums per
    tensor (MetaInit on VGG-11, 9.2M entries: 2.26-2.29 s per step against 2.46-2.69 s
    concatenated, at 1 thread).

    Example:
        >>> g, hg = [torch.tensor([1.0, -2.0]), torch.tensor([4.0])], [torch.tensor([0.5, 1.0]), torch.tensor([2.0])]
        >>> float(quotient_total(g, hg, eps=0.0)), float(quotient_sums(g, hg, eps=0.0).sum())
        (1.5, 1.5)
    """
    if not g:
        raise ValueError("quotient_total needs at least one tensor")
    if len(g) != len(hg):
        raise ValueError(f"quotient_total needs as many Hg tensors as gradients, got {len(hg)} and {len(g)}")
    if sum(x.numel() for x in g) > CONCAT_MAX_ENTRIES:
        return quotient_sums(g, hg, eps).sum()
    return _FlatQuotient.apply(float(eps), len(g), *g, *hg)


class _FlatQuotient(torch.autograd.Function):
    """:math:`\\sum_i |q_i|` over the concatenated entries of ``g`` and ``hg`` (given as
    ``*g, *hg``), and its first derivative, each in a handful of whole-buffer operations.

    With :math:`d_i = g_i + \\epsilon s_i` and :math:`q_i = ((Hg)_i + \\epsilon s_i)/d_i`
    (:math:`s` constant), :math:`\\partial|q_i|/\\partial (Hg)_i = \\mathrm{sgn}(q_i)/d_i` and
    :math:`\\partial|q_i|/\\partial g_i = -|q_i|/d_i`: autograd's rules for ``abs`` and ``div``
    in fewer operations (on the demo's MLP, 40K entries, the autograd graph of the expression
    spent about 0.8 ms per MetaInit step, mostly in whole-buffer temporaries). Not
    differentiable twice (MetaInit differentiates GQ once)."""

    @staticmethod
    def forward(ctx, eps: float, n: int, *tensors: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        g, hg = tensors[:n], tensors[n:]
        den = torch.cat([x.detach().reshape(-1) for x in g])
        num = torch.cat([x.detach().reshape(-1) for x in hg]).to(den.dtype)
        # e = eps s: +eps where g >= 0 (-0.0 included), -eps where g < 0 (sign(sign(g) + 1/2);
        # arithmetic only: comparisons into bool tensors are several times slower on CPU)
        e = den.sign().add_(0.5).sign_().mul_(eps)
        q = num.add_(e).div_(den.add_(e))
        ctx.save_for_backward(q, den)
        ctx.shapes = [x.shape for x in tensors]
        ctx.dtypes = [x.dtype for x in tensors]
        return q.abs().sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        q, den = ctx.saved_tensors
        n = len(ctx.shapes) // 2
        scale = grad / den
        dg = q.abs().mul_(scale).neg_()
        dh = q.sign().mul_(scale)
        sizes = [math.prod(s) for s in ctx.shapes[:n]]
        out: list[torch.Tensor | None] = [None, None]
        for flat, shapes, dtypes, needs in (
            (dg, ctx.shapes[:n], ctx.dtypes[:n], ctx.needs_input_grad[2 : 2 + n]),
            (dh, ctx.shapes[n:], ctx.dtypes[n:], ctx.needs_input_grad[2 + n :]),
        ):
            for part, shape, dtype, need in zip(flat.split(sizes), shapes, dtypes, needs, strict=True):
                out.append(part.view(shape).to(dtype) if need else None)
        return tuple(out)


def gradient_quotient(
    loss: torch.Tensor | Callable[[list[torch.Tensor]], torch.Tensor],
    tensors: Sequence[torch.Tensor],
    *,
    eps: float = 1e-5,
    create_graph: bool = False,
) -> torch.Tensor:
    """The gradient quotient GQ of ``loss`` with respect to ``tensors`` (a 0-d tensor).

    Args:
        loss: a scalar loss computed from ``tensors``, or a closure ``tensors -> loss``.
        tensors: the tensors considered (they require grad); :math:`N` is their total size.
        eps: :math:`\\epsilon`.
        create_graph: keep the graph so that GQ can be differentiated with respect to
            ``tensors`` (MetaInit); ``False`` for a plain measurement.

    Example:
        >>> w = torch.tensor([0.5, -2.0], requires_grad=True)
        >>> gq = gradient_quotient((3 * w).sum(), [w])  # linear loss: Hg = 0, |q_i| = eps/(3 + eps)
        >>> round(float(gq) * 1e6, 3)
        3.333
    """
    tensors = list(tensors)
    if callable(loss):
        loss = loss(tensors)
    g, hg = gradient_and_hvp(loss, tensors, create_graph=create_graph)
    n = sum(t.numel() for t in tensors)
    total = quotient_sums(g, hg, eps).sum()
    return total / n if create_graph else (total / n).detach()
