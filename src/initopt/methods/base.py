"""The one interface every initialization method implements, the method registry, and the
engine that runs one method.

A method is a frozen config dataclass plus a class with one verb, :meth:`Method.search`,
which returns per-tensor scales without touching the model; :func:`run_method` (behind
:func:`initopt.initialize_` and :meth:`Method.initialize_`) validates the input, enters the
search mode, runs the search and the learned methods' guard, and folds the scales in.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from initopt.core import dist
from initopt.core.batches import Batch, BatchSource, Task, check_loss, describe
from initopt.core.blocks import ScaleSpace, apply_scales_
from initopt.core.functional import Evaluator, search_mode
from initopt.core.guard import GUARD_OPTIMIZERS, guard
from initopt.core.precision import precision_error
from initopt.core.progress import Progress
from initopt.core.step import OptimizerSpec, TrainStep
from initopt.errors import ConfigError, DataError, InitOptError, LossError, ModelError
from initopt.result import InitResult

__all__ = ["Method", "Outcome", "Problem", "check_guard", "get_method", "methods", "register", "run_method"]

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: register a method under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ConfigError(f"a method named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def methods() -> list[str]:
    """Names of the registered methods."""
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    """The method class registered under ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; registered methods: {', '.join(methods())}") from None


def make_config(config_cls: type, fields: dict[str, Any], method: str) -> Any:
    """Build a frozen config, naming unknown keys and listing the valid ones."""
    valid = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(fields) - valid)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown} for method {method!r}; valid keys: {sorted(valid)}")
    try:
        return config_cls(**fields)
    except TypeError as e:  # pragma: no cover - guarded above
        raise ConfigError(f"{method}: {e}") from None


def check_guard(config: Any, method: str) -> None:
    """Validate the ``guard`` and ``guard_steps`` fields of a learned method's config."""
    if not isinstance(config.guard, bool):
        raise ConfigError(f"{method}: guard must be True or False, got {config.guard!r}")
    v = config.guard_steps
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        raise ConfigError(f"{method}: guard_steps must be a positive integer, got {v!r}")


@dataclass
class Problem:
    """What a search works on: the model (read-only), its blocks, data and loss, and the
    training optimizer's step when the user gave one (``optimizer=``)."""

    model: nn.Module
    space: ScaleSpace
    evaluator: Evaluator
    batches: BatchSource
    generator: torch.Generator
    seed: int
    step: TrainStep | None = None

    def rebased(self, alpha: torch.Tensor) -> Problem:
        """The same problem with the initial tensors replaced by :math:`\\alpha_i W_i^0`:
        a method searched on it learns scales relative to ``alpha``."""
        space = self.space.rebased(alpha)
        ev = Evaluator(self.model, space, self.evaluator.task)
        return Problem(self.model, space, ev, self.batches, self.generator, self.seed, self.step)

    def next_batch(self) -> Batch:
        return next(self.batches)


@dataclass
class Outcome:
    """What a search returns: final scales (one per block), history, measures before/after,
    and anything else the method reports (``info``, JSON-ready)."""

    alpha: torch.Tensor
    history: list[dict[str, Any]] = field(default_factory=list)
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


class Method(ABC):
    """Base class of initialization methods.

    Subclasses set ``name``, ``Config`` (a frozen dataclass with a ``steps`` field) and
    ``summary``, and implement :meth:`search`. ``uses_optimizer`` is true for methods whose
    objective models a training step or whose result is checked by training (they read
    :attr:`Problem.step`; the learned methods' guard, :mod:`initopt.core.guard`, trains with it).
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    summary: ClassVar[str] = ""
    uses_optimizer: ClassVar[bool] = False

    def __init__(self, config: Any = None, /, **fields: Any) -> None:
        if config is None:
            config = make_config(self.Config, fields, self.name)
        elif fields:
            config = dataclasses.replace(config, **fields)
        if not isinstance(config, self.Config):
            raise ConfigError(f"{self.name} takes a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config

    @property
    def mode(self) -> str:
        """Search mode (see :func:`initopt.core.search_mode`)."""
        return getattr(self.config, "mode", "train")

    def make_space(self, model: nn.Module) -> ScaleSpace:
        """The blocks this method scales, with its bounds."""
        return ScaleSpace(
            model,
            min_scale=getattr(self.config, "min_scale", 0.01),
            max_gain_scale=getattr(self.config, "max_gain_scale", None),
        )

    def progress_total(self, steps: int) -> int:
        """Length of the progress bar of a search of ``steps`` iterations."""
        return steps

    @abstractmethod
    def search(self, problem: Problem, steps: int, progress: Progress) -> Outcome:
        """Find the scales. Must not write into ``problem.model``."""

    def initialize_(self, model: nn.Module, data: Any, **kwargs: Any) -> InitResult:
        """Run this method on ``model`` in place; see :func:`initopt.initialize_`."""
        return run_method(self, model, data, **kwargs)


# -- the engine: validate, search, guard, fold the scales in ---------------------------------


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
                    _guard(method, problem, outcome, progress)
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


def _guard(method: Method, problem: Problem, outcome: Any, progress: bool | None = None) -> None:
    """Replace ``outcome``'s scales by ones unless they train better than the start (in place;
    see :mod:`initopt.core.guard`). A warning says when the model is left as it was; a
    progress bar (one tick per optimizer tried) shows the trials."""
    alpha = outcome.alpha.detach()
    if not bool(torch.isfinite(alpha).all()) or bool((alpha == 1).all()):
        return  # non-finite scales are an error below; ones need no trial
    n = 1 if problem.step is not None else len(GUARD_OPTIMIZERS)
    with search_mode(problem.model, "train"), Progress(n, desc=f"{method.name} guard", enabled=progress) as bar:
        kept, info = guard(
            problem.evaluator,
            problem.space,
            problem.next_batch,
            alpha,
            problem.step,
            method.config.guard_steps,
            on_trial=lambda name: bar.update(trial=name),
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
