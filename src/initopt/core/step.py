"""The user's training optimizer, replayed on copies of the model's tensors.

Methods whose objective models a training step (GradInit's look-ahead, ``auto``'s trial
runs) take the training optimizer as ``optimizer=``: a ``torch.optim.Optimizer`` instance,
its class, or ``(class, settings)``. :class:`TrainStep` keeps only its class and the
hyperparameters of its parameter groups, and replays its steps on *fresh* optimizers built
over copies of the model's tensors, so the user's optimizer, its state and its parameters
are never touched.

* :meth:`TrainStep.first_step` is the optimizer's first update from a fresh state,
  :math:`\\theta_1 = \\theta_0 - \\Delta(g)`: for SGD with momentum and no dampening on the
  first step :math:`\\Delta = \\mathrm{lr}\\,(g + \\lambda\\theta)` (Nesterov:
  :math:`(1+\\mu)\\,\\mathrm{lr}\\,g`), for Adam :math:`\\Delta = \\mathrm{lr}\\,
  g/(|g|+\\epsilon)`, about :math:`\\mathrm{lr}\\,\\mathrm{sign}(g)`. This replaces GradInit's
  fixed :math:`\\eta A[g]`.
* :func:`trial_run` trains copies of the tensors for a few real steps and measures the loss
  on held-out batches before and after: ``auto``'s measure of trainability.

A tensor that is not in any of the instance's parameter groups is not moved.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from initopt.core import dist
from initopt.core.batches import Batch
from initopt.core.blocks import ScaleSpace
from initopt.core.functional import Evaluator
from initopt.errors import ConfigError, LossError

__all__ = ["DEFAULT_OPTIMIZER", "OptimizerSpec", "TrainStep", "Trial", "parse_optimizer", "trial_run", "unresolved"]

OptimizerSpec = Any  # torch.optim.Optimizer | type[Optimizer] | tuple[type[Optimizer], dict] | None

#: The optimizer assumed when the user gives none (``auto``'s trials, the guard's first trial).
DEFAULT_OPTIMIZER: tuple[type[torch.optim.Optimizer], dict[str, Any]] = (torch.optim.SGD, {"lr": 0.01, "momentum": 0.9})

_NEEDS_CLOSURE = ("LBFGS",)


def parse_optimizer(text: str) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """``"sgd:lr=0.01,momentum=0.9"`` or ``"adamw:lr=1e-3,betas=[0.9,0.98]"`` -> (class, settings).

    The name is a ``torch.optim`` class, case-insensitive; values are JSON (else strings).
    """
    import json

    name, _, rest = text.partition(":")
    classes = {
        k.lower(): v
        for k, v in vars(torch.optim).items()
        if isinstance(v, type) and issubclass(v, torch.optim.Optimizer) and v is not torch.optim.Optimizer
    }
    if name.lower() not in classes:
        raise ConfigError(f"unknown optimizer {name!r}; one of {', '.join(sorted(classes))}")
    settings: dict[str, Any] = {}
    for item in filter(None, _split_top(rest)):
        if "=" not in item:
            raise ConfigError(f"optimizer {text!r}: expected key=value after ':', got {item!r}")
        k, v = item.split("=", 1)
        try:
            settings[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            settings[k.strip()] = v
        if isinstance(settings[k.strip()], list):
            settings[k.strip()] = tuple(settings[k.strip()])
    return classes[name.lower()], settings


def _split_top(text: str) -> list[str]:
    """Split at commas outside brackets."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [*out, cur]


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return float(v)
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    return v


@dataclass(frozen=True)
class TrainStep:
    """A training optimizer's class and per-group settings, mapped onto a model's blocks.

    Attributes:
        cls: the optimizer class.
        groups: hyperparameters of each parameter group (``params`` removed).
        group_of: for each block of the space, the index of its group (``None``: the
            optimizer does not train that tensor).
    """

    cls: type[torch.optim.Optimizer]
    groups: tuple[dict[str, Any], ...]
    group_of: tuple[int | None, ...]

    @classmethod
    def from_spec(cls, spec: OptimizerSpec, space: ScaleSpace) -> TrainStep:
        """Read ``optimizer=``: an instance, a class, or ``(class, settings dict)``."""
        if isinstance(spec, torch.optim.Optimizer):
            where = {id(p): i for i, g in enumerate(spec.param_groups) for p in g["params"]}
            groups = tuple({k: v for k, v in g.items() if k != "params"} for g in spec.param_groups)
            group_of = tuple(where.get(id(b.param)) for b in space.blocks)
            if all(i is None for i in group_of):
                raise ConfigError(
                    "optimizer= holds none of the model's trainable parameters (was it built for another model "
                    "or a copy? pass (class, settings) to use its settings on this model)"
                )
            out = cls(type(spec), groups, group_of)
        else:
            if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], dict):
                klass, settings = spec
            elif isinstance(spec, type):
                klass, settings = spec, {}
            else:
                raise ConfigError(
                    "optimizer= takes a torch.optim.Optimizer instance, its class, or (class, settings dict); "
                    f"got {spec!r}"
                )
            if not (isinstance(klass, type) and issubclass(klass, torch.optim.Optimizer)):
                raise ConfigError(f"optimizer=: {klass!r} is not a torch.optim.Optimizer class")
            try:
                probe = klass([torch.zeros(1, requires_grad=True)], **settings)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"optimizer=: {klass.__name__}(**{settings}) failed: {e}") from None
            groups = ({k: v for k, v in probe.param_groups[0].items() if k != "params"},)
            out = cls(klass, groups, tuple(0 for _ in space.blocks))
        if out.cls.__name__ in _NEEDS_CLOSURE:
            raise ConfigError(f"optimizer=: {out.cls.__name__} needs a closure per step and cannot be replayed")
        return out

    # -- what it is -----------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """``{"optimizer": class name, "groups": [settings, ...]}``, JSON-ready."""
        keep = ("lr", "momentum", "dampening", "nesterov", "weight_decay", "betas", "eps", "alpha", "amsgrad")
        groups = [{k: _plain(g[k]) for k in keep if k in g} for g in self.groups]
        return {"optimizer": self.cls.__name__, "groups": groups}

    @property
    def lr(self) -> float:
        """The learning rate of the first group (the one most tensors are in)."""
        return float(_plain(self.groups[0].get("lr", math.nan)))

    def optimizer(self, tensors: Sequence[torch.Tensor]) -> torch.optim.Optimizer:
        """A fresh optimizer of this class over ``tensors`` (leaf tensors, one per block)."""
        groups = [
            {"params": [t for t, i in zip(tensors, self.group_of, strict=True) if i == k], **hp}
            for k, hp in enumerate(self.groups)
        ]
        groups = [g for g in groups if g["params"]]
        return self.cls(groups)

    @property
    def scale_invariant(self) -> bool:
        """Whether the first step ignores the gradient's scale (Adam-like): then GradInit's
        bound is on :math:`\\|g\\|_1`, as for the paper's ``adam`` target."""
        d = [self._probe(1.0), self._probe(2.0)]
        return bool(torch.allclose(d[0], d[1], rtol=1e-3, atol=0.0))

    def _probe(self, c: float) -> torch.Tensor:
        t = torch.full((4,), 1.0, dtype=torch.float64)
        g = torch.tensor([0.5, -0.25, 1.0, -2.0], dtype=torch.float64) * c
        step = TrainStep(self.cls, self.groups[:1], (0,))
        return t - step.first_step([t], [g])[0]

    # -- replaying it ---------------------------------------------------------------------

    @torch.no_grad()
    def first_step(self, tensors: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """:math:`\\theta - \\Delta(g)`: the optimizer's first step from a fresh state, on copies.

        Returns new detached tensors; ``tensors`` and ``grads`` are not changed.
        """
        moved = [t.detach().clone() for t in tensors]
        for m, g in zip(moved, grads, strict=True):
            m.grad = g.detach()
        opt = self.optimizer(moved)
        opt.step()
        for m in moved:
            m.grad = None
        return moved


def _holdout_loss(ev: Evaluator, tensors: list[torch.Tensor], holdout: Sequence[Batch]) -> float:
    """Mean held-out loss (distributed: also over ranks); ``inf`` when it is not finite."""
    try:
        with torch.no_grad():
            losses = torch.stack([ev.loss(tensors, b, where="a held-out batch").detach().double() for b in holdout])
    except LossError:
        value = math.inf
    else:
        value = float(losses.mean())
    if dist.active():
        value = dist.mean_floats([value])[0]
        value = value if math.isfinite(value) else math.inf
    return value


def _reduce_step(loss: torch.Tensor | None, params: Sequence[torch.Tensor], grads: Sequence[Any]) -> float:
    """Distributed trial step: average the gradients over ranks in place (as DDP does) and
    return the mean loss, in one all-reduce; a rank whose loss failed (``None``) makes it ``inf``."""
    dtype = torch.float32  # at least: half-precision sums over ranks would lose the gradient's low bits
    for p in params:
        dtype = torch.promote_types(dtype, p.dtype)
    flat = [
        (torch.zeros_like(p) if g is None or loss is None else g).detach().reshape(-1).to(dtype)
        for p, g in zip(params, grads, strict=True)
    ]
    v = math.inf if loss is None else float(loss.detach())
    both = dist.all_reduce_mean(torch.cat([*flat, torch.tensor([v], dtype=dtype, device=flat[0].device)]))
    pos = 0
    for p in params:
        n = p.numel()
        p.grad = both[pos : pos + n].view_as(p).to(p.dtype)
        pos += n
    mean = float(both[-1])
    return mean if math.isfinite(mean) else math.inf


class Trial:
    """Copies of a model's tensors trained by the training optimizer, measured on held-out batches.

    ``before`` is the mean held-out loss before any step; :meth:`advance` trains on more batches
    (its optimizer state carries over) and updates ``after``. A non-finite training loss stops
    the run: ``diverged`` is set and ``after`` is ``inf``. The model is never changed.
    """

    def __init__(
        self, ev: Evaluator, step: TrainStep, tensors: Sequence[torch.Tensor], holdout: Sequence[Batch]
    ) -> None:
        self.ev, self.holdout = ev, list(holdout)
        self.params = [t.detach().clone().requires_grad_(True) for t in tensors]
        self.before = _holdout_loss(ev, self.params, self.holdout)
        if not math.isfinite(self.before):
            raise LossError(f"the held-out loss is {self.before} before any training step")
        self.after = self.before
        self.opt = step.optimizer(self.params)
        self.train_loss: list[float] = []
        self.seconds: list[float] = []
        self.diverged = False

    @property
    def steps(self) -> int:
        return len(self.train_loss)

    def advance(self, batches: Sequence[Batch]) -> float:
        """Train on ``batches``, one optimizer step each; returns the held-out loss after."""
        if self.diverged:
            return self.after
        if dist.active():
            return self._advance_distributed(batches)
        for b in batches:
            t0 = time.perf_counter()
            try:
                loss = self.ev.loss(self.params, b)
            except LossError:
                self.train_loss.append(math.inf)
                self.diverged, self.after = True, math.inf
                return self.after
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
            for p, g in zip(self.params, grads, strict=True):
                p.grad = g
            self.opt.step()
            self.seconds.append(time.perf_counter() - t0)
            v = float(loss.detach())
            self.train_loss.append(v)
            if not math.isfinite(v):
                self.diverged, self.after = True, math.inf
                return self.after
        self.after = _holdout_loss(self.ev, self.params, self.holdout)
        if not math.isfinite(self.after):
            self.diverged, self.after = True, math.inf
        return self.after

    def _advance_distributed(self, batches: Sequence[Batch]) -> float:
        """:meth:`advance` under ``torch.distributed``: gradients and losses averaged over ranks,
        so every rank trains the same copies and stops at the same step."""
        for b in batches:
            t0 = time.perf_counter()
            try:
                loss: torch.Tensor | None = self.ev.loss(self.params, b)
            except LossError:
                loss = None
            grads: Sequence[Any] = [None] * len(self.params)
            if loss is not None:
                grads = torch.autograd.grad(loss, self.params, allow_unused=True)
            v = _reduce_step(loss, self.params, grads)
            self.train_loss.append(v)
            if not math.isfinite(v):
                self.diverged, self.after = True, math.inf
                return self.after
            self.opt.step()
            self.seconds.append(time.perf_counter() - t0)
        self.after = _holdout_loss(self.ev, self.params, self.holdout)
        if not math.isfinite(self.after):
            self.diverged, self.after = True, math.inf
        return self.after

    def record(self) -> dict[str, Any]:
        """``holdout_before``, ``holdout_after``, ``train_loss``, ``diverged``, ``steps`` and
        ``step_seconds`` (median wall time of one step)."""
        s = sorted(self.seconds)
        return {
            "holdout_before": self.before,
            "holdout_after": self.after,
            "train_loss": list(self.train_loss),
            "diverged": self.diverged,
            "steps": self.steps,
            "step_seconds": s[len(s) // 2] if s else math.nan,
        }


def unresolved(trials: Sequence[Trial], min_progress: float) -> bool:
    """Whether side-by-side trials cannot yet be told apart: no trial that has not diverged has
    lowered its held-out loss by ``min_progress`` below the lowest loss any of them began at (a
    network that learned nothing stays near that level). ``False`` when every trial diverged."""
    live = [t for t in trials if not t.diverged]
    if not live:
        return False
    ref = min(t.before for t in live)
    return min(t.after for t in live) > (1 - min_progress) * ref


def trial_run(
    ev: Evaluator,
    step: TrainStep,
    tensors: Sequence[torch.Tensor],
    train: Sequence[Batch],
    holdout: Sequence[Batch],
) -> dict[str, Any]:
    """Train copies of ``tensors`` with the optimizer for ``len(train)`` steps (a :class:`Trial`).

    Returns ``holdout_before`` and ``holdout_after`` (mean loss on the held-out batches),
    ``train_loss`` (the loss of each step), ``diverged`` (a non-finite loss stopped the run;
    ``holdout_after`` is then ``inf``), ``steps`` and ``step_seconds`` (median wall time of
    one step). The model and ``tensors`` are not changed.
    """
    t = Trial(ev, step, tensors, holdout)
    t.advance(train)
    return t.record()
