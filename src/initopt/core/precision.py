"""Half-precision models: searched on float32 copies of their tensors.

A model whose parameters or buffers are ``bfloat16`` or ``float16`` is evaluated by every search
on float32 copies: :class:`~initopt.core.ScaleSpace` keeps float32 copies of the initial tensors
:math:`W_i^0`, and :class:`~initopt.core.Evaluator` passes float32 copies of the buffers and of
the parameters it does not scale, and casts the half-precision float tensors of each batch to
float32. The scales, objectives, gradients and curvature products are float32; the model's own
tensors keep their dtype and identity, and the scales are folded into them at the end
(``p.mul_(alpha)`` in the tensor's dtype). Float32 and float64 models are evaluated as they are.

Why (measured on CPU, torch 2.13): every double-backward kernel the methods use exists in
bfloat16 and float16 (linear, conv, norms, attention, pooling, embedding), but half precision
breaks the objectives: MetaInit's gradient quotient divides by :math:`g_i + \\epsilon s_i` with
:math:`\\epsilon = 10^{-5}`, which overflows float16 at the first step, and native bfloat16
searches of 5 steps ended away from the float32 search of the same rounded weights (max
:math:`|\\log|` ratio of the scales 0.78 for MetaInit, 0.013 for GradInit, 4e-3 for NIO). On
float32 copies the search of a half-precision model is bit for bit the float32 search of the
same rounded weights and inputs (docs/mixed-precision.md).

A model that casts to a half dtype inside its forward, or a kernel that lacks a half-precision
(double) backward, raises :class:`~initopt.errors.PrecisionError` naming the dtype.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from initopt.core.batches import _map
from initopt.errors import InitOptError, PrecisionError

__all__ = ["HALF", "batch_to_float32", "half_dtypes", "precision_error", "to_float32"]

HALF = (torch.float16, torch.bfloat16)
_NAMES = {"Half": torch.float16, "float16": torch.float16, "BFloat16": torch.bfloat16, "bfloat16": torch.bfloat16}


def half_dtypes(model: nn.Module) -> list[torch.dtype]:
    """The half-precision dtypes among the model's parameters and buffers."""
    seen = {t.dtype for t in [*model.parameters(), *model.buffers()] if t.dtype in HALF}
    return sorted(seen, key=str)


def to_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 if it is half precision, else ``t`` itself."""
    return t.float() if t.dtype in HALF else t


def precision_error(e: BaseException, model: nn.Module, where: str) -> PrecisionError | None:
    """A :class:`PrecisionError` for a ``RuntimeError`` raised by a half-precision kernel, else ``None``.

    Recognized by the message naming a half dtype (``not implemented for 'BFloat16'``, ``mat1
    and mat2 must have the same dtype, but got BFloat16 and Float``), as PyTorch's dispatcher
    writes them.
    """
    if isinstance(e, InitOptError) or not isinstance(e, RuntimeError):
        return None
    msg = str(e)
    named = [dt for name, dt in _NAMES.items() if f"'{name}'" in msg or f" {name}" in msg or f"torch.{name}" in msg]
    if not named:
        return None
    own = half_dtypes(model)
    dtype = str((own or named)[0]).replace("torch.", "")
    head = f"{where} failed in {dtype}: {type(e).__name__}: {msg.strip()[:400]}. "
    if not own:
        return PrecisionError(
            head + f"The model's tensors are not {dtype}, but it computes in {dtype} somewhere (a cast or an "
            f"autocast region inside its forward), where a kernel has no {dtype} (double) backward; run the "
            "search without that cast (in float32) and use the scales for the model as it is"
        )
    return PrecisionError(
        head + f"initopt searches {dtype} models on float32 copies of their tensors; this model or one of its "
        f"kernels still computes in {dtype} (it casts inside its forward, or a kernel has no {dtype} (double) "
        f"backward). Search a float32 copy (without casts to {dtype} in its forward) and fold its scales in: "
        "ref = copy.deepcopy(model).float(); result = initopt.initialize_(ref, data, ...); "
        "initopt.apply_scales_(model, result.scales)"
    )


def batch_to_float32(batch: Any) -> Any:
    """The batch with its half-precision float tensors in float32 (other entries as they are)."""
    if isinstance(batch, (torch.Tensor, dict, tuple, list)):
        return _map(batch, to_float32)
    return batch
