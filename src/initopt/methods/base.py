"""The one interface every initialization method implements, and the method registry.

A method is a frozen config dataclass plus a class with one verb, :meth:`Method.search`,
which returns per-tensor scales without touching the model; :func:`initopt.initialize_`
validates the input, enters the search mode, runs the search and folds the scales in.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from initopt.core.batches import Batch, BatchSource
from initopt.core.blocks import ScaleSpace
from initopt.core.functional import Evaluator
from initopt.core.progress import Progress
from initopt.core.step import TrainStep
from initopt.errors import ConfigError

__all__ = ["Method", "Outcome", "Problem", "check_guard", "get_method", "methods", "register"]

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

    def initialize_(self, model: nn.Module, data: Any, **kwargs: Any) -> Any:
        """Run this method on ``model`` in place; see :func:`initopt.initialize_`."""
        from initopt.api import run_method

        return run_method(self, model, data, **kwargs)
