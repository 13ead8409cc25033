"""Exact replacements for PyTorch CPU kernels that are slow on the searches' hot path.

:func:`max_pool2d_2x2`: 2x2 max pooling with stride 2 (VGG's pooling) on a contiguous NCHW
CPU tensor. PyTorch's kernel walks each window with strided loads and tracks indices element by
element; on VGG-11's pools at batch 64 it takes about 45 ms per forward on one thread (the
first pool alone, 64x64x32x32, about 22 ms). Here the maxima come from contiguous halves of
each row pair and then of each column pair; the indices (PyTorch's flat ``h * W + w`` per
plane, the first maximum in raster order, as its kernel picks) from the same comparisons; about
30 ms with indices, 3 ms without. Values and indices are identical to
``F.max_pool2d(x, 2, return_indices=True)`` (NaN-free inputs; with NaNs the values still
propagate them, only the index picked may differ), and the backward is PyTorch's own
``max_pool2d_with_indices_backward`` with those indices, so gradients are bit-identical and
differentiable again (its double backward is PyTorch's gather).

The searches apply it inside :class:`initopt.core.bilinear.ProjectedWeightGrads.intercept`
(the function mode their forwards already run under); anywhere else it is a plain function.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd import Function

__all__ = ["max_pool2d_2x2", "pool_call"]

_aten = torch.ops.aten


def _pool(x: torch.Tensor, with_index: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    n, c, h, w = x.shape
    h2, w2 = h // 2, w // 2
    rows = x.view(n, c, h2, 2 * w)
    top, bot = rows[..., :w], rows[..., w:]
    m = torch.maximum(top, bot)  # (n, c, h2, w), contiguous
    pairs = m.view(n, c, h2, w2, 2)
    v0, v1 = pairs[..., 0], pairs[..., 1]
    y = torch.maximum(v0, v1)
    if not with_index:
        return y, None
    down = (bot > top).view(n, c, h2, w2, 2)  # ties keep the upper row
    d0, d1 = down[..., 0], down[..., 1]
    # the right column wins if larger, or equal with its maximum in an earlier row
    right = (v1 > v0) | ((v1 == v0) & d0 & ~d1)
    row = (right & d1) | (d0 & ~right)
    base = torch.arange(h2, device=x.device).mul_(2 * w)[:, None] + torch.arange(w2, device=x.device).mul_(2)
    idx = row.long().mul_(w).add_(right).add_(base)
    return y, idx


class _MaxPool2x2(Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        y, idx = _pool(x, with_index=True)
        ctx.save_for_backward(x, idx)
        ctx.mark_non_differentiable(idx)
        return y

    @staticmethod
    def backward(ctx, gy):  # type: ignore[no-untyped-def, override]
        x, idx = ctx.saved_tensors
        return _aten.max_pool2d_with_indices_backward(gy, x, [2, 2], [2, 2], [0, 0], [1, 1], False, idx)


def _eligible(x: Any) -> bool:
    return (
        isinstance(x, torch.Tensor)
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and x.ndim == 4
        and x.shape[2] % 2 == 0
        and x.shape[3] % 2 == 0
        and x.shape[2] > 0
        and x.shape[3] > 0
        and x.is_contiguous()
        and type(x) is torch.Tensor
    )


def max_pool2d_2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)`` for a contiguous NCHW CPU tensor with even height and width."""
    if not _eligible(x):
        raise ValueError("max_pool2d_2x2: needs a contiguous 4-d float CPU tensor with even height and width")
    if torch.is_grad_enabled() and x.requires_grad:
        return _MaxPool2x2.apply(x)
    return _pool(x, with_index=False)[0]


_POOL_DEFAULTS = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False}
_POOL_ORDER = ["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"]


def _pair(v: Any) -> tuple[int, int] | None:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) in (1, 2) and all(isinstance(a, int) for a in v):
        return (v[0], v[-1])
    return None


def pool_call(func: Any, args: tuple, kwargs: dict) -> Any:
    """The fast pooling for an ``F.max_pool2d`` call it covers, else ``NotImplemented``."""
    if func is not F.max_pool2d or len(args) > len(_POOL_ORDER):
        return NotImplemented
    a = {**_POOL_DEFAULTS, **dict(zip(_POOL_ORDER, args, strict=False)), **kwargs}
    if set(a) != set(_POOL_ORDER):
        return NotImplemented
    kernel = _pair(a["kernel_size"])
    stride = kernel if a["stride"] is None or a["stride"] == [] else _pair(a["stride"])
    if (
        kernel != (2, 2)
        or stride != (2, 2)
        or _pair(a["padding"]) != (0, 0)
        or _pair(a["dilation"]) != (1, 1)
        or a["ceil_mode"]
        or a["return_indices"]
        or not _eligible(a["input"])
    ):
        return NotImplemented
    return max_pool2d_2x2(a["input"])
