"""Batch adapters: what a batch is, how the model takes it, and what its loss is.

Batches come in three forms:

* ``(inputs, targets, ...)`` tuples or lists: the model is called as ``model(inputs)`` and
  the loss is cross-entropy against ``targets`` unless a ``loss_fn`` is given. Besides
  PyTorch's layouts (logits ``(N, C)`` or ``(N, C, d1, ...)`` against targets ``(N,)`` or
  ``(N, d1, ...)``), per-token logits with the classes last, ``(N, L, ..., C)`` against
  targets ``(N, L, ...)`` (a Transformer's output), are accepted: the loss is the mean over
  all positions (:func:`class_last`). PyTorch's layout wins where both fit;
* ``dict`` (any mapping, e.g. a collator's ``BatchEncoding``; moved batches become plain
  dicts): passed as keyword arguments, ``model(**batch)``; the loss is the model's own
  (``output.loss`` or ``output["loss"]``) unless a ``loss_fn`` is given;
* a bare tensor: ``model(batch)``, which needs a ``loss_fn``.

``loss_fn(output, batch) -> scalar`` replaces the default loss; ``forward_fn(model, batch)
-> output`` replaces the default call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from initopt.errors import DataError, LossError

__all__ = [
    "BatchSource",
    "Task",
    "batch_size",
    "check_finite",
    "class_last",
    "concat_batches",
    "describe",
    "is_single_batch",
    "move_batch",
    "split_batch",
]

Batch = Any


def class_last(logits: torch.Tensor, targets: torch.Tensor) -> bool:
    """Whether ``logits`` hold per-position scores with the classes in the *last* dimension.

    True for ``(N, L, ..., C)`` logits against integer targets ``(N, L, ...)`` when PyTorch's
    own layout (classes in dimension 1: ``(N, C, L, ...)``) does not fit. Where both fit (e.g.
    ``L == C``), PyTorch's layout is kept, as ``F.cross_entropy`` reads it.
    """
    if logits.ndim < 3 or targets.is_floating_point() or targets.ndim != logits.ndim - 1:
        return False
    torch_layout = logits.shape[0] == targets.shape[0] and logits.shape[2:] == targets.shape[1:]
    return not torch_layout and logits.shape[:-1] == targets.shape


def is_single_batch(data: Any) -> bool:
    """True when ``data`` is one batch rather than an iterable of batches."""
    if isinstance(data, (torch.Tensor, Mapping)):
        return True
    if isinstance(data, (tuple, list)):
        return len(data) > 0 and all(isinstance(x, torch.Tensor) for x in data)
    return False


def _tensors(batch: Batch) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [v for v in batch.values() if isinstance(v, torch.Tensor)]
    if isinstance(batch, (tuple, list)):
        return [v for v in batch if isinstance(v, torch.Tensor)]
    raise DataError(
        f"a batch must be an (inputs, targets) tuple or list, a dict, or a tensor; got {type(batch).__name__}"
    )


def batch_size(batch: Batch) -> int:
    """Number of examples: the leading dimension of the batch's first tensor."""
    ts = [t for t in _tensors(batch) if t.ndim > 0]
    if not ts:
        raise DataError(f"the batch holds no tensor with a batch dimension: {describe(batch)}")
    return int(ts[0].shape[0])


def _map(batch: Batch, fn: Callable[[torch.Tensor], Any]) -> Batch:
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(fn(v) if isinstance(v, torch.Tensor) else v for v in batch)
    raise DataError(
        f"a batch must be an (inputs, targets) tuple or list, a dict, or a tensor; got {type(batch).__name__}"
    )


def move_batch(batch: Batch, device: torch.device) -> Batch:
    """The batch with every tensor on ``device``."""
    return _map(batch, lambda t: t.to(device, non_blocking=True))


def split_batch(batch: Batch, parts: int) -> list[Batch]:
    """Split along the batch dimension into ``parts`` contiguous, disjoint sub-batches.

    Sizes differ by at most one (``torch.tensor_split``). Tensors whose leading dimension is
    not the batch size (masks shared by all examples, scalars) are passed to every part.
    """
    n = batch_size(batch)
    if parts < 1 or parts > n:
        raise DataError(f"cannot split a batch of {n} examples into {parts} parts")

    def pieces(t: torch.Tensor) -> list[Any]:
        if t.ndim > 0 and t.shape[0] == n:
            return list(torch.tensor_split(t, parts, dim=0))
        return [t] * parts

    if isinstance(batch, torch.Tensor):
        return pieces(batch)
    if isinstance(batch, Mapping):
        split = {k: pieces(v) if isinstance(v, torch.Tensor) else [v] * parts for k, v in batch.items()}
        return [{k: v[i] for k, v in split.items()} for i in range(parts)]
    cols = [pieces(v) if isinstance(v, torch.Tensor) else [v] * parts for v in batch]
    return [type(batch)(c[i] for c in cols) for i in range(parts)]


def concat_batches(batches: list[Batch]) -> Batch:
    """Concatenate batches of one form along the batch dimension (inverse of :func:`split_batch`)."""
    first = batches[0]
    sizes = [batch_size(b) for b in batches]

    def cat(vals: list[Any]) -> Any:
        v0 = vals[0]
        if (
            isinstance(v0, torch.Tensor)
            and v0.ndim > 0
            and all(v.shape[0] == s for v, s in zip(vals, sizes, strict=True))
        ):
            return torch.cat(vals, dim=0)
        return v0

    if isinstance(first, torch.Tensor):
        return torch.cat(batches, dim=0)
    if isinstance(first, Mapping):
        return {k: cat([b[k] for b in batches]) for k in first}
    return type(first)(cat([b[i] for b in batches]) for i in range(len(first)))


def describe(batch: Batch) -> str:
    """A short description of a batch (or one entry of it) for error messages:
    ``{'input_ids': Tensor(8, 12):int64, ...}``, ``(Tensor(8, 4):float32, ...)``."""

    def d(x: Any) -> str:
        if isinstance(x, torch.Tensor):
            return f"Tensor{tuple(x.shape)}:{str(x.dtype).replace('torch.', '')}"
        return type(x).__name__

    if isinstance(batch, Mapping):
        return "{" + ", ".join(f"{k!r}: {d(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return "(" + ", ".join(d(v) for v in batch) + ")"
    return d(batch)


class BatchSource:
    """Endless supply of batches from a DataLoader, an iterable of batches, or one batch.

    An iterable is started again when it runs out (a one-shot generator is replayed from the
    batches it gave). Every batch is moved to ``device``.
    """

    def __init__(self, data: Any, device: torch.device) -> None:
        if data is None:
            raise DataError("no data given; pass a DataLoader, an iterable of batches, or one batch")
        self.device = device
        self.single = is_single_batch(data)
        self._data = data
        self._cache: list[Batch] = []
        self._replay: Iterator[Batch] | None = None
        self._one_shot = False
        if self.single:
            self._it: Iterator[Batch] | None = None
            self._first = move_batch(data, device)
            return
        if not isinstance(data, Iterable):
            raise DataError(
                "data must be a DataLoader, an iterable of batches, or one batch "
                f"((inputs, targets), dict or tensor); got {type(data).__name__}"
            )
        self._it = iter(data)
        self._one_shot = self._it is data
        try:
            first = next(self._it)
        except StopIteration:
            raise DataError("the data is empty: it yielded no batch") from None
        self._first = move_batch(first, device)
        if self._one_shot:
            self._cache.append(self._first)
        self._pending: Batch | None = self._first

    @property
    def first(self) -> Batch:
        """The first batch (used to validate the model and loss before any search)."""
        return self._first

    def __iter__(self) -> BatchSource:
        return self

    def __next__(self) -> Batch:
        if self.single:
            return self._first
        if self._pending is not None:
            b, self._pending = self._pending, None
            return b
        if self._replay is not None:
            try:
                return next(self._replay)
            except StopIteration:
                self._replay = iter(self._cache)
                return next(self._replay)
        assert self._it is not None
        try:
            b = move_batch(next(self._it), self.device)
        except StopIteration:
            if self._one_shot:
                self._replay = iter(self._cache)
                return next(self._replay)
            self._it = iter(self._data)
            try:
                b = move_batch(next(self._it), self.device)
            except StopIteration:
                raise DataError("the data yielded no batch when iterated again") from None
        if self._one_shot:
            self._cache.append(b)
        return b


@dataclass(frozen=True)
class Task:
    """How to run the model on a batch and reduce its output to a scalar loss."""

    loss_fn: Callable[[Any, Batch], torch.Tensor] | None = None
    forward_fn: Callable[[nn.Module, Batch], Any] | None = None

    def forward(self, model: Callable[..., Any], batch: Batch) -> Any:
        if self.forward_fn is not None:
            return self.forward_fn(model, batch)  # type: ignore[arg-type]
        if isinstance(batch, Mapping):
            return model(**batch)
        if isinstance(batch, (tuple, list)):
            return model(batch[0])
        return model(batch)

    def loss(self, output: Any, batch: Batch) -> torch.Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(output, batch)
        if isinstance(batch, (tuple, list)):
            if len(batch) < 2:
                raise LossError(
                    "a tuple batch needs (inputs, targets) for the default cross-entropy loss; "
                    "pass loss_fn=... for other batches"
                )
            logits = output.logits if hasattr(output, "logits") else output
            if not isinstance(logits, torch.Tensor):
                raise LossError(
                    f"the model returned {type(output).__name__}; the default loss needs a logits "
                    "tensor (pass loss_fn=... to reduce other outputs)"
                )
            targets = batch[1]
            if isinstance(targets, torch.Tensor) and class_last(logits, targets):
                return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
            return F.cross_entropy(logits, targets)
        if isinstance(batch, Mapping):
            if hasattr(output, "loss") and output.loss is not None:
                return output.loss
            if isinstance(output, dict) and "loss" in output:
                return output["loss"]
            raise LossError(
                "a dict batch uses the model's own loss, but the output has no 'loss' "
                f"(got {type(output).__name__}); return it from the model or pass loss_fn=..."
            )
        raise LossError("a tensor batch needs a loss_fn(output, batch) -> scalar")


def check_loss(loss: Any, where: str) -> torch.Tensor:
    """Raise :class:`LossError` unless ``loss`` is a scalar floating tensor."""
    if not isinstance(loss, torch.Tensor):
        raise LossError(f"the loss on {where} is a {type(loss).__name__}; expected a scalar tensor")
    if loss.ndim != 0:
        raise LossError(
            f"the loss on {where} has shape {tuple(loss.shape)}; expected a scalar "
            "(reduce it with mean or sum in loss_fn)"
        )
    if not loss.is_floating_point():
        raise LossError(f"the loss on {where} has dtype {loss.dtype}; expected floating point")
    return loss


def check_finite(what: str, *values: Any) -> None:
    """Raise :class:`LossError` naming ``what`` unless every value (floats or tensors) is finite."""
    for v in values:
        if isinstance(v, torch.Tensor):
            ok = bool(torch.isfinite(v).all())
        else:
            ok = v is None or math.isfinite(float(v))
        if not ok:
            shown = v if not isinstance(v, torch.Tensor) or v.numel() <= 4 else "a tensor with non-finite entries"
            raise LossError(
                f"{what} is not finite ({shown}): a gradient or curvature product turned NaN/Inf "
                "(check the data, the loss and the model for NaN/Inf)"
            )
