"""``auto``: choose a starting point and at most one learned stage by short trial runs.

Built on the claims studies (``docs/studies.md``): the starting point decides most of what
a learned method can reach (GradInit and NIO from PyTorch's default init stay at chance on
deep plain nets, from Kaiming or the Hessian rule they train); which start is best depends
on the model (LSUV on a SiLU CNN, the model's own init on a post-LN Transformer, where the
Hessian rule and LSUV stall it); GradCosine does not predict accuracy, while the loss a few
real optimizer steps reach does. So ``auto`` measures that directly:

1. **Starts.** For each start in ``starts`` (``"model"``: the model's own tensors;
   ``"kaiming"``, ``"lsuv"``, ``"hessian"``: those methods at their defaults), train copies
   of the tensors for ``trial_steps`` real steps of the training optimizer on the same
   batches, and measure the mean loss on ``holdout`` held-out batches. The first start in
   the order given whose loss is within the margin of the lowest,
   :math:`(1 - \\text{margin})\\,\\ell \\le \\ell_{\\min}`, wins: a simpler start is not
   replaced for a difference the trial cannot resolve (a start that fails or diverges is out).
2. **At most one learned stage.** Each method in ``learned`` runs ``steps`` iterations from
   the winning start (settings in :func:`learned_stage`) and is trialled the same way. The
   best is kept only if its held-out loss is below
   :math:`(1 - \\text{margin})\\,\\ell_{\\text{start}}`.

The optimizer is the user's (``optimizer=``); without one, SGD with lr 0.01 and momentum
0.9 is assumed and the result says so. The result's ``info`` lists every candidate with its
measures, the choice and the reason, and the cost in training steps (total time over the
median time of one trial step).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from initopt.core.functional import search_mode
from initopt.core.progress import Progress
from initopt.core.step import DEFAULT_OPTIMIZER, TrainStep, Trial, unresolved
from initopt.errors import ConfigError, InitOptError
from initopt.methods.base import Method, Outcome, Problem, get_method, register

__all__ = ["Auto", "AutoConfig"]

STARTS = ("model", "kaiming", "lsuv", "hessian")
LEARNED = ("gradinit", "nio")


@dataclass(frozen=True)
class AutoConfig:
    """Settings of ``auto``.

    Attributes:
        starts: starting points tried (``"model"`` and scale-only methods).
        learned: learned methods tried on the best start (at most one is kept).
        trial_steps: real optimizer steps of each trial run, and the length by which the
            start trials are extended while unresolved.
        max_trial_steps: the longest the start trials are extended to.
        min_progress: the start trials are resolved once the best one's held-out loss is this
            fraction below the lowest held-out loss any start had before training.
        holdout: batches held out of the trial runs to measure their loss on.
        margin: relative held-out loss improvement a learned stage must show to be kept.
        steps: iterations of each learned stage (``0``: a no-op, scales of 1).
        mode: ``"train"`` (BatchNorm on batch statistics, dropout off) or ``"eval"``.
    """

    starts: tuple[str, ...] = STARTS
    learned: tuple[str, ...] = LEARNED
    trial_steps: int = 25
    max_trial_steps: int = 100
    min_progress: float = 0.05
    holdout: int = 2
    margin: float = 0.02
    steps: int = 100
    mode: str = "train"

    def __post_init__(self) -> None:
        object.__setattr__(self, "starts", tuple(self.starts))
        object.__setattr__(self, "learned", tuple(self.learned))
        if not self.starts:
            raise ConfigError("auto: starts must name at least one start")
        if len(set(self.starts)) != len(self.starts) or len(set(self.learned)) != len(self.learned):
            raise ConfigError(f"auto: starts and learned must not repeat a name, got {self.starts}, {self.learned}")
        for s in self.starts:
            if s != "model":
                cls = get_method(s)
                if cls.name in ("auto",) or cls.name in LEARNED:
                    raise ConfigError(f"auto: {s!r} is not a starting point; starts are 'model' or {STARTS[1:]}")
        for s in self.learned:
            if s not in LEARNED:
                raise ConfigError(f"auto: learned stages are {LEARNED}, got {s!r}")
        for k in ("trial_steps", "max_trial_steps", "holdout"):
            v = getattr(self, k)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ConfigError(f"auto: {k} must be a positive integer, got {v!r}")
        for k in ("margin", "min_progress"):
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and 0 <= v < 1):
                raise ConfigError(f"auto: {k} must be in [0, 1), got {v!r}")
        if self.mode not in ("train", "eval"):
            raise ConfigError(f"auto: mode must be 'train' or 'eval', got {self.mode!r}")


def learned_stage(name: str, steps: int, step: TrainStep) -> tuple[Method, bool]:
    """The learned method ``auto`` runs, its settings, and whether it gets the optimizer's step.

    GradInit: :math:`T\\tau` of the paper's CIFAR runs (390 × 0.01). With an Adam-like
    optimizer, its real first step as the look-ahead and the paper's Adam bound (γ = 1000,
    gains ≤ 100); with SGD-like ones, the paper's normalized step η = 0.1, because the real
    SGD step was worse on every SGD task of ``benchmarks/study_auto.py``. NIO: a quarter of the
    iterations (for cost: one NIO iteration costs several GradInit ones on small models), two
    sub-batches, :math:`T\\tau` of the released 100 × 3e-3. Both without their guard: ``auto``'s
    own trial judges them.
    """
    cls = get_method(name)
    if name == "gradinit":
        base = cls.Config(lr=3.9 / max(steps, 1), steps=steps, guard=False)
        if step.scale_invariant:
            return cls(replace(base, target="adam", gamma=1000.0, max_gain_scale=100.0)), True
        return cls(base), False
    quarter = max(steps // 4, 1)
    return cls(cls.Config(steps=quarter, lr=0.3 / quarter, num_splits=2, guard=False)), False


def _measures(trial: Trial) -> dict[str, Any]:
    r = trial.record()
    return {k: r[k] for k in ("holdout_before", "holdout_after", "diverged", "steps")}


@register
class Auto(Method):
    """Chooses a start and at most one learned stage by trial runs of the real optimizer."""

    name = "auto"
    Config = AutoConfig
    summary = "tries starts and learned stages with short real training runs; keeps the best"
    uses_optimizer = True

    def progress_total(self, steps: int) -> int:
        """One tick per candidate trialled."""
        return 0 if steps == 0 else len(self.config.starts) + len(self.config.learned)

    def search(self, problem: Problem, steps: int, progress: Progress) -> Outcome:
        cfg = self.config
        space = problem.space
        if steps == 0:
            info = {"choice": "model", "reason": "steps=0: nothing tried", "candidates": []}
            return Outcome(alpha=space.ones(), info=info)
        t_start = time.perf_counter()
        assumed = problem.step is None
        step = TrainStep.from_spec(DEFAULT_OPTIMIZER, space) if assumed else problem.step
        problem = Problem(
            problem.model, space, problem.evaluator, problem.batches, problem.generator, problem.seed, step
        )
        holdout = [problem.next_batch() for _ in range(cfg.holdout)]
        train = [problem.next_batch() for _ in range(cfg.trial_steps)]
        overlap = problem.batches.single
        candidates: list[dict[str, Any]] = []
        alphas: dict[str, torch.Tensor] = {}
        trials: dict[str, Trial] = {}

        def add(name: str, kind: str, alpha: torch.Tensor | None, error: str | None, t0: float) -> dict[str, Any]:
            rec: dict[str, Any] = {"name": name, "stage": kind}
            if alpha is not None:
                try:
                    trials[name] = Trial(problem.evaluator, step, space.leaves(alpha), holdout)
                    trials[name].advance(train)
                    alphas[name] = alpha
                except InitOptError as e:
                    error = f"{type(e).__name__}: {e}"
            if error is not None:
                rec["error"] = error
            rec["seconds"] = time.perf_counter() - t0
            candidates.append(rec)
            progress.update(candidate=name)
            return rec

        for name in cfg.starts:
            t0 = time.perf_counter()
            if name == "model":
                add(name, "start", space.ones(), None, t0)
                continue
            alpha, error = self._run(get_method(name)(), problem)
            add(name, "start", alpha, error, t0)

        def live_starts() -> list[dict[str, Any]]:
            return [c for c in candidates if c["name"] in trials and not trials[c["name"]].diverged]

        def starts_unresolved() -> bool:
            return unresolved([trials[c["name"]] for c in live_starts()], cfg.min_progress)

        while starts_unresolved():
            more = min(cfg.trial_steps, cfg.max_trial_steps - len(train))
            if more <= 0:
                break
            batch = [problem.next_batch() for _ in range(more)]
            train += batch
            for c in live_starts():
                t0 = time.perf_counter()
                trials[c["name"]].advance(batch)
                c["seconds"] += time.perf_counter() - t0
        for c in candidates:
            if c["name"] in trials:
                c.update(_measures(trials[c["name"]]))
        ok = live_starts()
        if not ok:
            raise InitOptError(
                "auto: every start failed or diverged in its trial run: "
                + "; ".join(f"{c['name']}: {c.get('error', 'diverged')}" for c in candidates)
                + " (lower the learning rate of the optimizer, or check the model and data)"
            )
        best = min(ok, key=lambda c: c["holdout_after"])
        base = alphas[best["name"]]
        others = ", ".join(
            f"{c['name']} failed" if "error" in c else f"{c['name']} {c['holdout_after']:.4g}"
            for c in candidates
            if c is not best
        )
        resolved = not starts_unresolved()
        chosen, reason = (
            best,
            (
                f"{best['name']} reached the lowest held-out loss after {len(train)} trial steps "
                f"({best['holdout_after']:.4g}; {others})"
                + ("" if resolved else f"; no start lowered its held-out loss by {cfg.min_progress:.0%} in that time")
            ),
        )
        sub = problem.rebased(base)
        learned = []
        for name in cfg.learned:
            t0 = time.perf_counter()
            method, real_step = learned_stage(name, steps, step)
            beta, error = self._run(method, sub if real_step else dataclasses.replace(sub, step=None))
            label = f"{best['name']}+{name}"
            rec = add(label, "learned", None if beta is None else base * beta, error, t0)
            if label in trials:
                rec.update(_measures(trials[label]))
            learned.append(rec)
        good = [c for c in learned if "error" not in c and not c["diverged"]]
        threshold = (1 - cfg.margin) * best["holdout_after"]
        if good:
            top = min(good, key=lambda c: c["holdout_after"])
            if top["holdout_after"] < threshold:
                chosen = top
                reason += (
                    f"; {top['name']} lowered it to {top['holdout_after']:.4g}, below the "
                    f"{cfg.margin:.0%} margin ({threshold:.4g})"
                )
            else:
                reason += (
                    f"; no learned stage beat it by the {cfg.margin:.0%} margin (best: "
                    f"{top['name']} {top['holdout_after']:.4g} vs {threshold:.4g} needed)"
                )
        alpha = alphas[chosen["name"]]
        seconds = time.perf_counter() - t_start
        history = [{"step": i, **c} for i, c in enumerate(candidates)]
        step_seconds = sorted(x for t in trials.values() for x in t.seconds)
        per_step = step_seconds[len(step_seconds) // 2] if step_seconds else math.nan
        info = {
            "choice": chosen["name"],
            "reason": reason,
            "optimizer": {**step.describe(), "assumed": assumed},
            "trial": {
                "steps": len(train),
                "resolved": resolved,
                "holdout_batches": cfg.holdout,
                "holdout_is_train": overlap,
            },
            "candidates": candidates,
            "cost_train_steps": seconds / per_step if per_step > 0 else math.nan,
        }
        model_rec = next((c for c in candidates if c["name"] == "model" and "holdout_after" in c), None)
        finite = model_rec is not None and math.isfinite(model_rec["holdout_after"])
        before = {"trial_holdout_loss": model_rec["holdout_after"]} if finite else {}
        after = {"trial_holdout_loss": chosen["holdout_after"]}
        return Outcome(alpha=alpha, history=history, before=before, after=after, info=info)

    @staticmethod
    def _run(method: Method, problem: Problem) -> tuple[torch.Tensor | None, str | None]:
        """Run ``method``'s search at its default steps; ``(alpha, None)`` or ``(None, error)``."""
        try:
            with search_mode(problem.model, method.mode):
                out = method.search(problem, method.config.steps, Progress(0, method.name, enabled=False))
        except InitOptError as e:
            return None, f"{type(e).__name__}: {e}"
        alpha = out.alpha.detach()
        if not bool(torch.isfinite(alpha).all()):
            return None, "non-finite scales"
        return alpha, None
