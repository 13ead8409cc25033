"""Helpers for Hugging Face ``transformers`` models.

Needs transformers (``pip install 'initopt[hf]'``; its ``Trainer`` also needs ``accelerate``,
which the extra installs).

initopt already takes dict batches (``model(**batch)``, the loss is ``output.loss``); these
helpers cover what is left between a tokenized data set and such batches, and check the
property of tied embeddings that matters:

* :func:`to_batch` / :func:`to_batches`: a collator's output (``BatchEncoding``, any
  mapping), lists of tokenized examples (dicts of lists, as ``datasets`` yields them) or a
  DataLoader of either, as a list of plain ``dict[str, Tensor]`` batches; ``labels=
  "input_ids"`` adds causal-LM labels (padding masked with -100).
* :func:`tied_parameters`: the groups of parameter names that share one tensor (tied input
  and output embeddings).
* :func:`initialize_hf_`: :func:`initopt.initialize_` on such batches, then a check that every
  tie still holds and each tied tensor was scaled exactly once.
* :class:`InitOptTrainerCallback`: a ``transformers.TrainerCallback`` that runs a method at
  ``on_train_begin``.

Example:
    >>> import torch
    >>> from initopt.integrations.huggingface import to_batches
    >>> examples = [{"input_ids": [1, 2, 3, 4], "attention_mask": [1, 1, 1, 0]}] * 4
    >>> b = to_batches(examples, batch_size=2, labels="input_ids")
    >>> len(b), b[0]["labels"][0].tolist()
    (2, [1, 2, 3, -100])
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from initopt.errors import ConfigError, DataError, ModelError
from initopt.integrations import require
from initopt.integrations.loop import DEFAULT_BATCHES, take_batches, training_optimizer, uses_optimizer
from initopt.result import InitResult

transformers = require("transformers", integration="huggingface", extra="hf")

__all__ = ["InitOptTrainerCallback", "initialize_hf_", "tied_parameters", "to_batch", "to_batches"]

Batch = dict[str, torch.Tensor]


def _as_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if hasattr(value, "__array__") and not isinstance(value, (str, bytes)):
        try:
            return torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            return None
    if isinstance(value, (list, tuple)) and value:
        try:
            return torch.tensor(value)
        except (TypeError, ValueError, RuntimeError):
            return None
    return None


def _add_labels(batch: Batch, labels: str | None) -> Batch:
    if labels is None or "labels" in batch:
        return batch
    if labels not in batch:
        raise DataError(f"labels={labels!r}: the batch has no {labels!r} (keys: {sorted(batch)})")
    out = batch[labels].clone()
    mask = batch.get("attention_mask")
    if mask is not None and mask.shape == out.shape:
        out = out.masked_fill(mask == 0, -100)
    return {**batch, "labels": out}


def to_batch(batch: Mapping[str, Any], *, labels: str | None = None) -> Batch:
    """One collated batch as a plain ``dict`` of tensors, ready for ``model(**batch)``.

    Takes a ``BatchEncoding``, a dict, or any mapping: tensors are kept, lists and arrays
    become tensors, anything else (strings, ``None``) is dropped. With ``labels="input_ids"``
    (or another key) and no ``"labels"`` in the batch, ``labels`` is a copy of that key with
    the positions where ``attention_mask`` is 0 set to -100 (ignored by the loss): the labels
    of a causal language model, which shifts them itself.
    """
    if not isinstance(batch, Mapping):
        raise DataError(f"a Hugging Face batch is a mapping of names to tensors, got {type(batch).__name__}")
    out = {}
    for k, v in batch.items():
        t = _as_tensor(v)
        if t is not None:
            out[str(k)] = t
    if not out:
        raise DataError(f"the batch holds no tensor (keys: {sorted(map(str, batch))})")
    return _add_labels(out, labels)


def _is_batch(item: Mapping[str, Any]) -> bool:
    """A collated batch has 2-D ``input_ids`` (or, without them, a first value of >= 2 dims)."""
    key = "input_ids" if "input_ids" in item else next(iter(item), None)
    t = None if key is None else _as_tensor(item[key])
    return t is not None and t.ndim >= 2


def to_batches(
    data: Any,
    *,
    batch_size: int = DEFAULT_BATCHES,
    collate_fn: Callable[[list[Any]], Mapping[str, Any]] | None = None,
    max_batches: int | None = None,
    labels: str | None = None,
    examples: bool | None = None,
) -> list[Batch]:
    """Plain dict batches from tokenized examples, collated batches, or a DataLoader of either.

    Args:
        data: one collated batch (a mapping), an iterable of collated batches, or an iterable
            of tokenized examples (mappings of one example each, e.g. a ``datasets.Dataset``
            or a list of ``tokenizer(text)`` outputs). A DataLoader (or Accelerate's wrapper)
            is read by :func:`initopt.integrations.take_batches`, which leaves its epochs as
            they were.
        batch_size: examples per batch when ``data`` holds examples.
        collate_fn: turns a list of examples into a batch, e.g.
            ``DataCollatorWithPadding(tokenizer)`` for examples of different lengths;
            default ``transformers.default_data_collator`` (equal lengths).
        max_batches: stop after this many batches (``None``: all of ``data``).
        labels: see :func:`to_batch`.
        examples: whether the items are single examples; ``None`` decides from the first
            item: a batch has 2-D ``input_ids`` (or, without them, a first value of two or
            more dimensions).

    Returns:
        A list of ``dict[str, Tensor]`` batches.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ConfigError(f"max_batches must be a positive integer or None, got {max_batches!r}")
    if isinstance(data, Mapping):
        return [to_batch(data, labels=labels)]
    if isinstance(data, torch.utils.data.DataLoader) or hasattr(data, "base_dataloader"):
        data = take_batches(data, max_batches or 2**62)
    if not isinstance(data, Iterable) or isinstance(data, (str, bytes, torch.Tensor)):
        raise DataError(f"to_batches takes examples, batches or a DataLoader; got {type(data).__name__}")
    it = iter(data)
    try:
        first = next(it)
    except StopIteration:
        raise DataError("the data is empty: it yielded no example or batch") from None
    if not isinstance(first, Mapping):
        raise DataError(
            f"Hugging Face data are mappings of names to values (tokenized examples or batches); got "
            f"{type(first).__name__}"
        )
    items: Iterable[Any] = itertools.chain([first], it)
    if not (_is_batch(first) if examples is None else not examples):
        collate = transformers.default_data_collator if collate_fn is None else collate_fn
        source = iter(items)
        groups = iter(lambda: list(itertools.islice(source, batch_size)), [])
        items = (_collate(collate, g) for g in groups)
    return [to_batch(b, labels=labels) for b in itertools.islice(items, max_batches)]


def _collate(collate: Callable[[list[Any]], Any], group: list[Any]) -> Any:
    try:
        return collate(group)
    except Exception as e:
        raise DataError(
            f"collating {len(group)} examples failed ({type(e).__name__}: {e}); for examples of different lengths "
            "pass collate_fn=transformers.DataCollatorWithPadding(tokenizer) (or pad them)"
        ) from e


def tied_parameters(model: nn.Module) -> list[tuple[str, ...]]:
    """Groups of parameter names that reach one tensor (e.g. tied input and output embeddings).

    Example:
        >>> emb = torch.nn.Embedding(5, 3); head = torch.nn.Linear(3, 5, bias=False)
        >>> head.weight = emb.weight
        >>> tied_parameters(torch.nn.ModuleDict({"emb": emb, "head": head}))
        [('emb.weight', 'head.weight')]
    """
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [tuple(names) for names in groups.values() if len(names) > 1]


def initialize_hf_(
    model: nn.Module,
    data: Any,
    method: Any = "gradinit",
    *,
    batch_size: int = DEFAULT_BATCHES,
    collate_fn: Callable[[list[Any]], Mapping[str, Any]] | None = None,
    max_batches: int | None = DEFAULT_BATCHES,
    labels: str | None = None,
    **kwargs: Any,
) -> InitResult:
    """:func:`initopt.initialize_` for a ``transformers`` model, with its ties checked.

    ``data`` goes through :func:`to_batches` (``batch_size``, ``collate_fn``, ``max_batches``
    and ``labels`` are its arguments); the loss is the model's own ``output.loss`` unless a
    ``loss_fn`` is given, so the batches must hold ``labels`` (``labels="input_ids"`` for a
    causal LM). Every other keyword is that of :func:`initopt.initialize_`.

    After the method, every group of tied parameters (:func:`tied_parameters`) must still be
    one tensor, scaled exactly once by its scale: a tied input/output embedding stays tied
    (``model.get_input_embeddings().weight is model.get_output_embeddings().weight``).
    A violation raises :class:`~initopt.ModelError` (it would be a bug in initopt).
    """
    from initopt.api import initialize_

    batches = to_batches(data, batch_size=batch_size, collate_fn=collate_fn, max_batches=max_batches, labels=labels)
    ties = tied_parameters(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    before = {g[0]: params[g[0]].detach().clone() for g in ties}
    result = initialize_(model, batches, method, **kwargs)
    after = tied_parameters(model)
    if after != ties:
        raise ModelError(f"initialize_hf_: the model's tied parameters changed: {ties} before, {after} after")
    params = dict(model.named_parameters(remove_duplicate=False))
    for group in ties:
        scales = {result.scales[n] for n in group if n in result.scales}
        if len(scales) > 1:
            raise ModelError(f"initialize_hf_: the tied parameters {group} got different scales {sorted(scales)}")
        s = scales.pop() if scales else 1.0
        if not torch.allclose(params[group[0]].detach(), before[group[0]] * s, rtol=1e-5, atol=0.0):
            raise ModelError(f"initialize_hf_: the tied tensor {group} was not scaled exactly once by {s}")
    return result


class InitOptTrainerCallback(transformers.TrainerCallback):
    """Run an initopt method on the model when a ``transformers.Trainer`` begins training.

    At ``on_train_begin`` (the model is on its device, the optimizer and scheduler are built,
    no step taken) it reads the first ``batches`` batches of the Trainer's train dataloader
    (through Accelerate's ``base_dataloader``, so the epochs are the same as without the
    callback) or uses ``data``, and runs :func:`initialize_hf_` on the model. For methods
    that model a training step (``"auto"``, ``"gradinit"``) the Trainer's optimizer is passed
    at its schedule's base learning rate (a warmup would start it at 0; see
    :func:`initopt.integrations.loop.training_optimizer`). It runs once per callback and not
    on a run resumed from a checkpoint (``state.global_step > 0``). The result is kept as
    ``callback.result``; on the main process the summary is printed (``verbose``) and the
    scales are written to ``scales_path`` if given.

    Args:
        method: a registered name or a pipeline (default ``"gradinit"``).
        batches: batches of the train dataloader to use (default 8).
        data: batches or examples to use instead (anything :func:`to_batches` takes).
        optimizer: ``"trainer"`` (default): the Trainer's; ``None``: none; or a spec passed as given.
        verbose, scales_path: as above.
        **kwargs: :func:`initialize_hf_` / :func:`initopt.initialize_` keywords (``steps``,
            ``seed``, ``loss_fn``, ``labels``, config fields, ...). ``progress`` defaults to off.
    """

    def __init__(
        self,
        method: Any = "gradinit",
        *,
        batches: int = DEFAULT_BATCHES,
        data: Any = None,
        optimizer: Any = "trainer",
        verbose: bool = True,
        scales_path: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(batches, int) or isinstance(batches, bool) or batches < 1:
            raise ConfigError(f"InitOptTrainerCallback: batches must be a positive integer, got {batches!r}")
        self.method = method
        self.batches = batches
        self.data = data
        self.optimizer = optimizer
        self.verbose = verbose
        self.scales_path = scales_path
        self.kwargs = {"progress": False, **kwargs}
        self.result: InitResult | None = None
        self.skipped: str | None = None

    def on_train_begin(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: nn.Module | None = None,
        train_dataloader: Any = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        """Run the method once, before the first step."""
        if self.result is not None:
            self.skipped = "the method already ran for this callback"
        elif state.global_step > 0:
            self.skipped = f"training resumes at step {state.global_step}: the checkpoint's weights are kept"
        if self.skipped is not None:
            if self.verbose and state.is_world_process_zero:
                print(f"initopt: skipped ({self.skipped})")
            return
        if model is None:
            raise ModelError("InitOptTrainerCallback: the Trainer passed no model to on_train_begin")
        if self.data is not None:
            data = self.data
        elif train_dataloader is not None:
            data = take_batches(train_dataloader, self.batches)
        else:
            raise DataError("InitOptTrainerCallback: the Trainer has no train dataloader; give data=...")
        opt = self.optimizer
        if isinstance(opt, str) and opt == "trainer":
            opt = training_optimizer(optimizer) if uses_optimizer(self.method) else None
        self.result = initialize_hf_(model, data, self.method, max_batches=self.batches, optimizer=opt, **self.kwargs)
        if state.is_world_process_zero:
            if self.verbose:
                print(f"initopt: {self.result.summary()}")
            if self.scales_path is not None:
                from initopt.saved import save_scales

                save_scales(self.result, self.scales_path, model=model)
