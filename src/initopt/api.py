"""The one-line entry point :func:`initialize_`."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from initopt.core.step import OptimizerSpec
from initopt.errors import ConfigError
from initopt.methods.base import Method, get_method, make_config, methods, run_method
from initopt.result import InitResult

__all__ = ["initialize_", "run_method"]

MethodSpec = str | Method | Sequence[str | tuple[str, dict[str, Any]] | Method]


def _as_stage(spec: Any, config: dict[str, Any]) -> tuple[Method, int | None]:
    if isinstance(spec, Method):
        if config:
            raise ConfigError("config keywords cannot be combined with a Method instance")
        return spec, None
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], dict):
        name, fields = spec
    elif isinstance(spec, str):
        name, fields = spec, {}
    else:
        raise ConfigError(f"a method is a registered name, a (name, config dict) pair or a Method; got {spec!r}")
    fields = {**fields, **config}
    cls = get_method(name)
    return cls(make_config(cls.Config, fields, name)), None


def initialize_(
    model: nn.Module,
    data: Any,
    method: MethodSpec = "gradinit",
    *,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    steps: int | None = None,
    seed: int = 0,
    progress: bool | None = None,
    optimizer: OptimizerSpec = None,
    **config: Any,
) -> InitResult:
    """Optimize the initialization of ``model`` in place and return what was done.

    Args:
        model: any ``torch.nn.Module``; its trainable tensors are rescaled in place
            (``Parameter`` identity, ties, hooks and optimizers survive).
        data: a DataLoader, an iterable of batches, or one batch (see
            :mod:`initopt.core.batches` for the batch forms).
        method: a registered name (:func:`initopt.methods`), a :class:`Method`, or a
            pipeline run in order, e.g. ``["hessian", ("gradinit", {"steps": 200})]``.
        loss_fn: ``loss_fn(output, batch) -> scalar``; ``None`` uses cross-entropy for
            ``(inputs, targets)`` batches and the model's own loss for dict batches.
        forward_fn: ``forward_fn(model, batch) -> output``; ``None`` calls the model.
        steps: iterations (``None``: the method's default).
        seed: seed of all randomness of the method (batch order, probes, noise inputs).
        progress: ``None`` shows a progress bar when standard error is a terminal.
        optimizer: the training optimizer: a ``torch.optim.Optimizer`` instance, its class,
            or ``(class, settings dict)``. Methods that model a training step (GradInit's
            look-ahead, ``auto``'s trial runs) replay its real steps on copies; the
            optimizer and its state are not touched. Other methods do not use it (a
            warning says so when no stage of the call does).
        **config: fields of the method's config dataclass; unknown keys are an error.

    Returns:
        The frozen :class:`InitResult`. If anything fails, the model is left as it was.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> batch = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
        >>> sorted(initialize_(net, batch, "gradinit", steps=3).scales)[:2]
        ['0.bias', '0.weight']
    """
    kw = {"loss_fn": loss_fn, "forward_fn": forward_fn, "seed": seed, "progress": progress, "optimizer": optimizer}
    if isinstance(method, (str, Method)) or (
        isinstance(method, tuple) and len(method) == 2 and isinstance(method[1], dict)
    ):
        stage, _ = _as_stage(method, config)
        _warn_unused_optimizer(optimizer, [stage])
        return run_method(stage, model, data, steps=steps, **kw)
    if not isinstance(method, Sequence) or not method:
        raise ConfigError(f"method must be a name, a Method or a non-empty list of them; got {method!r}")
    if config or steps is not None:
        raise ConfigError("for a pipeline, give steps and config per stage: [(name, {...}), ...]")
    stages = [_as_stage(s, {})[0] for s in method]
    _warn_unused_optimizer(optimizer, stages)
    saved = [(p, p.detach().clone()) for p in {id(p): p for p in model.parameters()}.values()]
    results: list[InitResult] = []
    try:
        for stage in stages:
            results.append(run_method(stage, model, data, **kw))
    except BaseException:
        with torch.no_grad():
            for p, v in saved:
                p.copy_(v)
        raise
    scales: dict[str, float] = {}
    for r in results:
        for n, s in r.scales.items():
            scales[n] = scales.get(n, 1.0) * s
    history = [{"stage": i, **h} for i, r in enumerate(results) for h in r.history]
    return InitResult(
        method="+".join(r.method for r in results),
        config=tuple(r.config for r in results),
        scales=scales,
        history=history,
        seconds=sum(r.seconds for r in results),
        stages=tuple(results),
        unscalable=results[-1].unscalable,
        before=results[0].before,
        after=results[-1].after,
        info={f"stage {i}": r.info for i, r in enumerate(results) if r.info},
        seed=seed,
    )


def _warn_unused_optimizer(optimizer: OptimizerSpec, stages: list[Method]) -> None:
    if optimizer is not None and not any(s.uses_optimizer for s in stages):
        names = ", ".join(s.name for s in stages)
        users = ", ".join(m for m in methods() if get_method(m).uses_optimizer)
        warnings.warn(
            f"optimizer= is not used by {names}: only methods that model or trial a training step use it ({users})",
            UserWarning,
            stacklevel=3,
        )
