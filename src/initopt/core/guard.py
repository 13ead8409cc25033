"""The guard of the learned methods: keep their scales only if they train better than the start.

GradInit, MetaInit and NIO each optimize a proxy of trainability (a one-step look-ahead loss,
the gradient quotient, GradCosine). On some models the proxy and training disagree: on Hugging
Face GPT-2, MetaInit shrinks every attention projection to its norm floor (GQ falls from 26 to
0.4) and the model then trains to a held-out loss 1.4 nats worse than from its own init; GradInit
shrinks GPT-2's LayerNorm gains, NIO moves T5's tensors by up to 20 % and both lose 0.1 nats
(``benchmarks/study_hf.py``). The guard is the measurement ``auto`` is built on
(``docs/studies.md``: the loss a few real optimizer steps reach predicts the outcome, the
proxies do not), applied to one method's answer:

1. Draw ``holdout`` held-out batches, then training batches, from the method's data.
2. Train copies of the start tensors (:math:`\\alpha = 1`) and of the scaled tensors
   (:math:`\\alpha_i W_i^0`) for ``steps`` real optimizer steps each, on the same batches
   (:class:`~initopt.core.step.Trial`), and measure their mean held-out loss. While neither copy
   has lowered its loss by ``min_progress`` (5 %) below the lower of the two initial losses, the
   trial cannot tell them apart: both are extended by ``steps``, up to ``max_factor * steps``.
3. Keep the scales only if the scaled copy's loss is *lower* than the start's in a trial that
   resolved; otherwise return :math:`\\alpha = 1`, the model as it was.

Why the resolution rule: on a Hugging Face ViT, GradInit shrank the classifier and the final
LayerNorm gain to their floor (×0.01); after 25 steps both copies were still at chance (held-out
loss 2.302 with the scales, 2.313 without), and the scales, kept on that difference, trained to
1.74 after 300 steps against 0.50 from the model's own init.

The optimizer is the user's (``optimizer=``). Without one, the guard cannot know how the model
will be trained, so it tries two, SGD (lr 0.01, momentum 0.9) and Adam (lr 1e-3), and the scales
must be lower under both: when the training is unknown, scales that help one optimizer and hurt
the other are not applied. (An earlier rule let the scales be up to 2 % worse under the second
optimizer; on a Hugging Face T5, NIO's scales were then kept on two seeds where SGD's trial
favoured them, 1.14 against 1.33 and 1.08 against 1.56, and Adam's was 1.2 % and 0.3 % worse,
and AdamW training from them ended 0.13 and 0.12 above the model's own init.) A trial that
diverges loses; if the start's trial diverges and the scaled one does not, the scales win. The
model is never changed here; the caller folds the scales.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from initopt.core.batches import Batch
from initopt.core.blocks import ScaleSpace
from initopt.core.functional import Evaluator
from initopt.core.step import DEFAULT_OPTIMIZER, TrainStep, Trial, unresolved
from initopt.errors import InitOptError

__all__ = ["GUARD_OPTIMIZERS", "guard"]

GUARD_OPTIMIZERS: tuple[tuple[type[torch.optim.Optimizer], dict[str, Any]], ...] = (
    DEFAULT_OPTIMIZER,
    (torch.optim.Adam, {"lr": 1e-3}),
)


def _pair(
    evaluator: Evaluator,
    step: TrainStep,
    tensors: dict[str, list[torch.Tensor]],
    hold: list[Batch],
    batches: Callable[[int], list[Batch]],
    steps: int,
    max_steps: int,
    min_progress: float,
) -> dict[str, Any]:
    """Train the start and the scaled copies side by side with one optimizer; extend both by
    ``steps`` while unresolved (no copy has lowered its held-out loss by ``min_progress`` below the
    lower of the two initial losses), up to ``max_steps``. Losses are ``inf`` for a trial that
    diverged or failed."""
    trials: dict[str, Trial | None] = {}
    rec: dict[str, Any] = {**step.describe()}
    for name, leaves in tensors.items():
        try:
            trials[name] = Trial(evaluator, step, leaves, hold)
        except InitOptError as e:
            trials[name], rec[f"{name}_error"] = None, f"{type(e).__name__}: {e}"

    made = [t for t in trials.values() if t is not None]
    done = 0
    while done == 0 or (unresolved(made, min_progress) and done < max_steps):
        n = min(steps, max_steps - done)
        chunk = batches(done + n)[done : done + n]
        for t in made:
            t.advance(chunk)  # a diverged trial does not move
        done += n
    for name, t in trials.items():
        rec[name] = math.inf if t is None or t.diverged else t.after
        rec[f"{name}_before"] = math.nan if t is None else t.before
    rec.update(steps=done, resolved=not unresolved(made, min_progress))
    return rec


def _better(trials: list[dict[str, Any]]) -> bool:
    """Lower under every optimizer tried, each in a resolved trial (or the only copy of its
    trial that did not diverge)."""

    def lower(t: dict[str, Any]) -> bool:
        if math.isinf(t["start"]):
            return not math.isinf(t["scaled"])
        return bool(t.get("resolved", True)) and t["scaled"] < t["start"]

    return all(lower(t) for t in trials)


def guard(
    evaluator: Evaluator,
    space: ScaleSpace,
    next_batch: Callable[[], Batch],
    alpha: torch.Tensor,
    step: TrainStep | None,
    steps: int = 25,
    holdout: int = 2,
    max_factor: int = 4,
    min_progress: float = 0.05,
    on_trial: Callable[[str], None] | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Return ``(alpha, info)`` if the scales train better than the start, else ``(ones, info)``.

    Args:
        evaluator: the search's functional evaluator (the loss of the model at given tensors).
        space: the scale space whose leaves ``alpha`` scales.
        next_batch: draws the next batch of the method's data (held-out batches first).
        alpha: the scales the method found.
        step: the training optimizer (``None``: SGD and Adam defaults, both must agree).
        steps: optimizer steps of each trial, and the length by which an unresolved trial is
            extended (up to ``max_factor * steps``).
        holdout: batches the losses are measured on.
        max_factor: the longest trial, in multiples of ``steps``.
        on_trial: called with the optimizer's name after each optimizer's pair of trials
            (progress display).
        min_progress: a trial is resolved once a copy's held-out loss is this fraction below the
            lower of the two copies' losses before training; an unresolved trial cannot show
            that the scales are better.

    ``info`` holds ``kept``, ``reason``, the optimizers (``assumed`` when none was given), the
    longest trial's ``steps`` and, per optimizer, the held-out losses of the start and of the
    scales after their trial (``start``, ``scaled``) and before it, the trial's length and
    whether it ``resolved``.
    """
    hold = [next_batch() for _ in range(holdout)]
    train: list[Batch] = []

    def batches(n: int) -> list[Batch]:  # one stream, shared by every trial
        while len(train) < n:
            train.append(next_batch())
        return train

    assumed = step is None
    trial_steps = [TrainStep.from_spec(s, space) for s in GUARD_OPTIMIZERS] if step is None else [step]
    tensors = {"start": space.leaves(space.ones()), "scaled": space.leaves(alpha.detach())}
    max_steps = max_factor * steps
    trials = []
    for s in trial_steps:
        trials.append(_pair(evaluator, s, tensors, hold, batches, steps, max_steps, min_progress))
        if on_trial is not None:
            on_trial(s.cls.__name__)
    kept = _better(trials)
    if all(math.isinf(t["start"]) and math.isinf(t["scaled"]) for t in trials):
        kept, why = True, "both trials diverged under every optimizer tried: the guard cannot judge; scales kept"
    else:
        losses = ", ".join(
            f"{t['optimizer']} {t['scaled']:.4g} vs {t['start']:.4g} after {t['steps']} steps"
            + ("" if t["resolved"] else f" (unresolved: neither copy lowered its loss by {min_progress:.0%})")
            for t in trials
        )
        rule = "lower under both optimizers" if assumed else "lower"
        why = (
            f"held-out loss of the trials with the scales vs without: {losses}; the scales are kept only if "
            f"{rule}, in trials that resolved"
        )
    info = {
        "kept": kept,
        "reason": why,
        "steps": max(t["steps"] for t in trials),
        "holdout_batches": holdout,
        "assumed": assumed,
        "trials": trials,
    }
    return (alpha if kept else space.ones().to(alpha)), info
