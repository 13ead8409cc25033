"""The guard of the learned methods: keep their scales only if they train better than the start.

GradInit, MetaInit and NIO each optimize a proxy of trainability (a one-step look-ahead loss,
the gradient quotient, GradCosine). On some models the proxy and training disagree: on Hugging
Face GPT-2, MetaInit shrinks every attention projection to its norm floor (GQ falls from 26 to
0.4) and the model then trains to a held-out loss 1.4 nats worse than from its own init; GradInit
shrinks GPT-2's LayerNorm gains, NIO moves T5's tensors by up to 20 % and both lose 0.1 nats
(``benchmarks/study_hf.py``). The guard is the measurement ``auto`` is built on
(``docs/studies.md``: the loss a few real optimizer steps reach predicts the outcome, the
proxies do not), applied to one method's answer:

1. Draw ``holdout`` held-out batches and ``steps`` training batches from the method's data.
2. Train copies of the start tensors (:math:`\\alpha = 1`) and of the scaled tensors
   (:math:`\\alpha_i W_i^0`) for ``steps`` real optimizer steps each (:class:`~initopt.core.step.Trial`)
   and measure their mean held-out loss.
3. Keep the scales only if the scaled copy's loss is *lower* than the start's; otherwise
   return :math:`\\alpha = 1`, the model as it was.

The optimizer is the user's (``optimizer=``). Without one, the guard cannot know how the model
will be trained, so it tries two, SGD (lr 0.01, momentum 0.9) and Adam (lr 1e-3): the scales
must be lower under one and no more than ``tolerance`` (2 %, relative) higher under the other.
(At 25 steps Adam at lr 1e-3 often barely moves a small model, and its two losses then differ by
round-off-sized amounts that should not decide.) A trial that diverges loses; if the start's
trial diverges and the scaled one does not, the scales win. The model is never changed here;
the caller folds the scales.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from initopt.core.batches import Batch
from initopt.core.blocks import ScaleSpace
from initopt.core.functional import Evaluator
from initopt.core.step import DEFAULT_OPTIMIZER, TrainStep, Trial
from initopt.errors import InitOptError

__all__ = ["GUARD_OPTIMIZERS", "guard"]

GUARD_OPTIMIZERS: tuple[tuple[type[torch.optim.Optimizer], dict[str, Any]], ...] = (
    DEFAULT_OPTIMIZER,
    (torch.optim.Adam, {"lr": 1e-3}),
)


def _loss(evaluator: Evaluator, step: TrainStep, tensors: list[torch.Tensor], holdout: list[Batch], train: list[Batch]):
    """Held-out loss after the trial, ``inf`` when the trial diverged or failed; and its record."""
    try:
        trial = Trial(evaluator, step, tensors, holdout)
        trial.advance(train)
    except InitOptError as e:
        return math.inf, {"error": f"{type(e).__name__}: {e}"}
    rec = trial.record()
    value = math.inf if rec["diverged"] else rec["holdout_after"]
    return value, {k: rec[k] for k in ("holdout_before", "holdout_after", "diverged")}


def _better(trials: list[dict[str, Any]], tolerance: float) -> bool:
    """Lower under at least one optimizer, and under every other within ``tolerance`` of the start."""

    def lower(t: dict[str, Any]) -> bool:
        return t["scaled"] < t["start"] or (math.isinf(t["start"]) and not math.isinf(t["scaled"]))

    def close(t: dict[str, Any]) -> bool:
        return lower(t) or (math.isfinite(t["scaled"]) and t["scaled"] <= t["start"] + tolerance * abs(t["start"]))

    return any(lower(t) for t in trials) and all(close(t) for t in trials)


def guard(
    evaluator: Evaluator,
    space: ScaleSpace,
    next_batch: Callable[[], Batch],
    alpha: torch.Tensor,
    step: TrainStep | None,
    steps: int = 25,
    holdout: int = 2,
    tolerance: float = 0.02,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Return ``(alpha, info)`` if the scales train better than the start, else ``(ones, info)``.

    Args:
        evaluator: the search's functional evaluator (the loss of the model at given tensors).
        space: the scale space whose leaves ``alpha`` scales.
        next_batch: draws the next batch of the method's data (held-out batches first).
        alpha: the scales the method found.
        step: the training optimizer (``None``: SGD and Adam defaults, both must agree).
        steps: optimizer steps of each trial.
        holdout: batches the losses are measured on.
        tolerance: without ``step``: how much higher (relative) the scales' loss may be under
            one of the two optimizers when it is lower under the other.

    ``info`` holds ``kept``, ``reason``, the optimizers (``assumed`` when none was given), the
    trial ``steps`` and, per optimizer, the held-out losses of the start and of the scales.
    """
    hold = [next_batch() for _ in range(holdout)]
    train = [next_batch() for _ in range(steps)]
    assumed = step is None
    trial_steps = [TrainStep.from_spec(s, space) for s in GUARD_OPTIMIZERS] if step is None else [step]
    start = space.leaves(space.ones())
    scaled = space.leaves(alpha.detach())
    trials = []
    for s in trial_steps:
        l0, r0 = _loss(evaluator, s, start, hold, train)
        l1, r1 = _loss(evaluator, s, scaled, hold, train)
        trials.append({**s.describe(), "start": l0, "scaled": l1, "start_trial": r0, "scaled_trial": r1})
    kept = _better(trials, tolerance)
    if all(math.isinf(t["start"]) and math.isinf(t["scaled"]) for t in trials):
        kept, why = True, "both trials diverged under every optimizer tried: the guard cannot judge; scales kept"
    else:
        losses = ", ".join(f"{t['optimizer']} {t['scaled']:.4g} vs {t['start']:.4g}" for t in trials)
        rule = f"lower under one optimizer and within {tolerance:.0%} under the other" if assumed else "lower"
        why = (
            f"held-out loss after {steps} trial steps with the scales vs without: {losses} "
            f"(the scales are kept only if {rule})"
        )
    info = {
        "kept": kept,
        "reason": why,
        "steps": steps,
        "holdout_batches": holdout,
        "assumed": assumed,
        "trials": trials,
    }
    return (alpha if kept else space.ones().to(alpha)), info
