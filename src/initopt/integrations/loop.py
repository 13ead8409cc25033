"""Run a method before a hand-written PyTorch training loop.

:func:`take_batches` reads the first ``n`` batches of a fresh pass over a DataLoader and
leaves everything the training loop depends on as it was: the global RNG (so a shuffling
loader gives the same epochs as without it), the loader object and any epoch iterator the
loop will create. :func:`initialize_from_loader_` runs a method (``"auto"`` by default,
given the training optimizer) on those batches.

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from initopt.integrations import initialize_from_loader_
    >>> ds = TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,)))
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> res = initialize_from_loader_(net, DataLoader(ds, batch_size=16), method="kaiming", progress=False)
    >>> res.method
    'kaiming'
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from initopt.errors import ConfigError, DataError
from initopt.result import InitResult

__all__ = ["initialize_from_loader_", "take_batches", "training_optimizer", "uses_optimizer"]

DEFAULT_BATCHES = 8


def take_batches(loader: Iterable[Any], n: int = DEFAULT_BATCHES) -> list[Any]:
    """The first ``n`` batches of a fresh pass over ``loader``, as a list.

    A new iterator is opened with ``iter(loader)``, read ``n`` times and closed (a DataLoader's
    workers are shut down), inside :func:`torch.random.fork_rng`: the draws a shuffling sampler
    or worker seeding takes from the global RNG are undone, and so are those taken from the
    loader's own generators (``DataLoader(generator=...)``, its sampler's): the training loop
    that follows sees exactly the epochs it would have seen without this call (except with
    ``persistent_workers=True``, whose one iterator is then created here). Wrappers that keep their own
    iteration state (Hugging Face Accelerate's ``DataLoaderShard``) are read through their
    ``base_dataloader``, so that state is untouched. Fewer than ``n`` batches are returned when
    one pass holds fewer.

    Raises:
        DataError: ``loader`` is a one-shot iterator (reading from it would take these
            batches away from training: pass the DataLoader or a list), is not iterable, or is
            empty.
        ConfigError: ``n`` is not a positive integer.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"the number of batches must be a positive integer, got {n!r}")
    source = getattr(loader, "base_dataloader", loader)
    if not isinstance(source, Iterable) or isinstance(source, (torch.Tensor, dict, str)):
        raise DataError(f"take_batches needs a DataLoader or an iterable of batches, got {type(loader).__name__}")
    batches: list[Any] = []
    generators = _generators(source)
    states = [g.get_state() for g in generators]
    with torch.random.fork_rng(devices=[]):
        it = iter(source)
        if it is source:
            raise DataError(
                f"{type(loader).__name__} is a one-shot iterator: reading batches from it would take them away from "
                "training; pass the DataLoader itself (or a list of batches)"
            )
        try:
            for _ in range(n):
                try:
                    batches.append(next(it))
                except StopIteration:
                    break
        finally:
            shutdown = getattr(it, "_shutdown_workers", None)
            if callable(shutdown) and not getattr(source, "persistent_workers", False):
                shutdown()
            del it
            for g, state in zip(generators, states, strict=True):
                g.set_state(state)
    if not batches:
        raise DataError(f"the {type(loader).__name__} yielded no batch")
    return batches


def _generators(loader: Any) -> list[torch.Generator]:
    """The loader's own RNGs (``DataLoader(generator=...)``, its sampler's), to restore after reading."""
    found: dict[int, torch.Generator] = {}
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    for obj in (loader, sampler, batch_sampler, getattr(batch_sampler, "sampler", None)):
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator):
            found[id(g)] = g
    return list(found.values())


def training_optimizer(optimizer: Any) -> Any:
    """The optimizer to hand to ``initialize_(..., optimizer=)`` for a training run's optimizer.

    Framework wrappers are unwrapped (Accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``). If a learning-rate scheduler has already set a group's ``lr`` away
    from its base value ``initial_lr`` (a warmup starts at 0), a fresh optimizer of the same
    class is built over the same parameters with ``lr = initial_lr``, so that the methods
    replay steps at the schedule's base learning rate rather than at its first, often zero,
    value. The given optimizer and its state are never changed. ``None`` stays ``None``.
    """
    if optimizer is None:
        return None
    for attr in ("optimizer", "_optimizer"):
        inner = getattr(optimizer, attr, None)
        if isinstance(inner, torch.optim.Optimizer):
            optimizer = inner
            break
    if not isinstance(optimizer, torch.optim.Optimizer):
        return optimizer  # a class or (class, settings): initialize_ checks it
    groups = optimizer.param_groups
    if not any("initial_lr" in g and g["initial_lr"] != g["lr"] for g in groups):
        return optimizer
    try:
        return type(optimizer)([{**g, "lr": g.get("initial_lr", g["lr"])} for g in groups])
    except Exception as e:  # an optimizer whose constructor needs more than its groups
        warnings.warn(
            f"could not rebuild {type(optimizer).__name__} at its base learning rate ({type(e).__name__}: {e}); "
            "the methods replay its current learning rate",
            UserWarning,
            stacklevel=2,
        )
        return optimizer


def uses_optimizer(method: Any) -> bool:
    """Whether any stage of ``method`` models a training step (and so takes ``optimizer=``)."""
    from initopt.methods.base import Method, get_method

    stages = method if isinstance(method, list) else [method]
    for stage in stages:
        if isinstance(stage, tuple):
            stage = stage[0]
        if isinstance(stage, Method):
            if stage.uses_optimizer:
                return True
        elif isinstance(stage, str) and getattr(get_method(stage), "uses_optimizer", False):
            return True
    return False


def initialize_from_loader_(
    model: nn.Module,
    loader: Iterable[Any],
    optimizer: Any = None,
    *,
    method: Any = "auto",
    batches: int = DEFAULT_BATCHES,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    steps: int | None = None,
    seed: int = 0,
    progress: bool | None = None,
    **config: Any,
) -> InitResult:
    """Run ``method`` on the first ``batches`` batches of ``loader``, before training ``model``.

    Call it after building the model and its optimizer and before the training loop::

        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        initialize_from_loader_(model, train_loader, opt)      # "auto", with the real optimizer
        for epoch in range(epochs):
            for batch in train_loader: ...

    The batches are read by :func:`take_batches` (the loader's epochs and the global RNG are
    left as they were). The model's tensors are rescaled in place, so the optimizer built on
    them stays valid; its state is not touched. Every keyword is that of
    :func:`initopt.initialize_`; ``optimizer`` goes through :func:`training_optimizer`.

    Args:
        model: the network to initialize in place.
        loader: the training DataLoader (or any re-iterable of batches).
        optimizer: the training optimizer (instance, class or ``(class, settings)``), used by
            ``"auto"`` and ``"gradinit"``; ``None``: the method's default.
        method: a registered name or a pipeline (default ``"auto"``).
        batches: how many batches to read (default 8). ``"auto"`` holds out 2 of them.

    Returns:
        The :class:`~initopt.InitResult`; if anything fails the model is left as it was.
    """
    from initopt.api import initialize_

    data = take_batches(loader, batches)
    return initialize_(
        model,
        data,
        method,
        loss_fn=loss_fn,
        forward_fn=forward_fn,
        steps=steps,
        seed=seed,
        progress=progress,
        optimizer=training_optimizer(optimizer),
        **config,
    )
