"""The one-line entry point :func:`initialize_`."""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from initopt.core import dist
from initopt.core.batches import BatchSource, Task, check_loss, describe
from initopt.core.blocks import apply_scales_
from initopt.core.functional import Evaluator, search_mode
from initopt.core.guard import guard
from initopt.core.precision import precision_error
from initopt.core.progress import Progress
from initopt.core.step import OptimizerSpec, TrainStep
from initopt.errors import ConfigError, DataError, InitOptError, LossError, ModelError
from initopt.methods.base import Method, Problem, get_method, make_config, methods
from initopt.result import InitResult

__all__ = ["initialize_", "run_method"]

MethodSpec = str | Method | Sequence[str | tuple[str, dict[str, Any]] | Method]


def _devices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


def _validate(evaluator: Evaluator, batch: Any) -> None:
    """One forward and loss on the first batch, with every failure named."""
    tensors = evaluator.space.leaves(evaluator.space.ones())
    try:
        loss = evaluator.loss(tensors, batch, where="the first batch")
    except InitOptError:
        raise
    except Exception as e:
        pe = precision_error(e, evaluator.model, "the forward pass on the first batch")
        if pe is not None and evaluator.space.upcast:  # a float32 model that fails on half data: a DataError
            raise pe from e
        raise DataError(f"the model could not take the first batch {describe(batch)}: {type(e).__name__}: {e}") from e
    check_loss(loss, "the first batch")
    if not loss.requires_grad:
        raise LossError("the loss on the first batch does not depend on any trainable parameter")
    if not bool(torch.isfinite(loss)):
        raise LossError(f"the loss on the first batch is {float(loss.detach())}; expected a finite number")


def run_method(
    method: Method,
    model: nn.Module,
    data: Any,
    *,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    steps: int | None = None,
    seed: int = 0,
    progress: bool | None = None,
    optimizer: OptimizerSpec = None,
) -> InitResult:
    """Run one method on ``model`` in place (the engine behind :func:`initialize_`)."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    steps = method.config.steps if steps is None else steps
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ConfigError(f"steps must be a non-negative integer, got {steps!r}")
    task = Task(loss_fn=loss_fn, forward_fn=forward_fn)
    space = method.make_space(model)
    step = None if optimizer is None else TrainStep.from_spec(optimizer, space)
    evaluator = Evaluator(model, space, task)
    if dist.active():
        _check_ranks(method.name, space, steps, seed)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=_devices(model)), search_mode(model, method.mode):
        torch.manual_seed(seed)
        try:
            batches = BatchSource(data, space.device)
            _validate(evaluator, batches.first)
        except InitOptError as e:
            dist.fail_together(e, f"{method.name}: the check of the data and the first batch")
            raise
        dist.fail_together(None, f"{method.name}: the check of the data and the first batch")
        generator = torch.Generator(device=space.device).manual_seed(seed)
        problem = Problem(model, space, evaluator, batches, generator, seed, step)
        with Progress(method.progress_total(steps), desc=method.name, enabled=progress) as bar:
            try:
                outcome = method.search(problem, steps, bar)
                if getattr(method.config, "guard", False) and steps > 0:
                    _guard(method, problem, outcome)
            except RuntimeError as e:
                pe = precision_error(e, model, f"{method.name}'s search")
                if pe is not None:
                    raise pe from e
                raise
    seconds = time.perf_counter() - t0
    if dist.active():
        outcome.alpha = dist.agree_(outcome.alpha, method.name)
    _check_outcome(method.name, outcome)
    scales = space.to_scales(outcome.alpha)
    apply_scales_(model, scales)
    config = method.config
    if getattr(config, "steps", steps) != steps:  # the config records the iterations actually run
        config = dataclasses.replace(config, steps=steps)
    return InitResult(
        method=method.name,
        config=config,
        scales=scales,
        history=outcome.history,
        seconds=seconds,
        unscalable=tuple(space.unscalable),
        before=outcome.before,
        after=outcome.after,
        info=outcome.info,
        seed=seed,
    )


def _guard(method: Method, problem: Problem, outcome: Any) -> None:
    """Replace ``outcome``'s scales by ones unless they train better than the start (in place;
    see :mod:`initopt.core.guard`). A warning says when the model is left as it was."""
    alpha = outcome.alpha.detach()
    if not bool(torch.isfinite(alpha).all()) or bool((alpha == 1).all()):
        return  # non-finite scales are an error below; ones need no trial
    with search_mode(problem.model, "train"):
        kept, info = guard(
            problem.evaluator, problem.space, problem.next_batch, alpha, problem.step, method.config.guard_steps
        )
    outcome.info = {**outcome.info, "guard": info}
    if not info["kept"]:
        outcome.alpha = kept
        outcome.info["guard"]["search_after"] = dict(outcome.after)
        outcome.after = dict(outcome.before)
        warnings.warn(
            f"{method.name}: its scales did not train better than the model's own tensors, so the model was "
            f"left as it was: {info['reason']}. Pass guard=False to apply them anyway.",
            UserWarning,
            stacklevel=4,
        )


def _check_ranks(name: str, space: Any, steps: int, seed: int) -> None:
    """Distributed: every rank must start from the same model, seed and number of steps."""
    shape = torch.tensor([float(len(space.blocks))], dtype=torch.float64)
    dist.check_same(shape, f"{name}: the numbers of trainable tensors of the models")
    norms = [b.init_norm for b in space.blocks]
    dist.check_same(
        torch.tensor([float(seed), float(steps), *norms], dtype=torch.float64),
        f"{name}: the seeds, steps or initial tensor norms (the models must be identical on every rank "
        "before the call: build them with the same seed, or broadcast rank 0's state)",
        ["seed", "steps", *(f"the norm of {b.name}" for b in space.blocks)],
    )


def _check_outcome(name: str, outcome: Any) -> None:
    """Non-finite scales or measures are an error, wherever they came from; nothing is applied."""
    if not bool(torch.isfinite(outcome.alpha).all()):
        raise LossError(
            f"{name}: the search produced non-finite scales (a loss or gradient turned NaN/Inf during it); "
            "the model was left as it was"
        )
    for when, measures in (("before", outcome.before), ("after", outcome.after)):
        bad = {k: v for k, v in measures.items() if isinstance(v, float) and not math.isfinite(v)}
        if bad:
            raise LossError(
                f"{name}: its measures {when} the search are not finite ({bad}): a loss or gradient turned "
                "NaN/Inf; the model was left as it was"
            )


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
