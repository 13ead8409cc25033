"""NIO: Yang, Wang, Yuan, Lin, "Towards Theoretically Inspired Neural Initialization
Optimization", NeurIPS 2022, arXiv:2210.05956.

One scale :math:`\\alpha_i` per tensor, :math:`\\theta_i = \\alpha_i W_i^0`, chosen so that the
gradients of different sub-batches agree (large GradCosine) while their norm stays bounded.
Each iteration splits one batch into D contiguous disjoint sub-batches with gradients
:math:`G_k = \\nabla_\\theta L_k` and computes (:mod:`initopt.core.cosine`)

.. math::

    \\text{B-GC} = \\frac{1}{D(D-1)}\\sum_{k\\ne l}
        \\frac{\\langle G_k, G_l\\rangle}{\\|G_k\\|\\|G_l\\| + \\epsilon}, \\qquad
    \\text{B-GN} = \\frac{1}{D}\\sum_k \\|G_k\\|.

If B-GN :math:`> \\gamma` the iteration is a *constraint step* minimizing B-GN; otherwise an
*objective step* minimizing :math:`-\\text{B-GC} - \\mu\\,\\text{B-GN}` (target ``"gc_gn"``, the
released objective; B-GN is the mean norm, so :math:`\\mu` does not depend on D) or
:math:`-\\text{B-GC}` (target ``"gc"``). Both need the derivative of gradients (double
backward). The scales follow :class:`~initopt.core.RescaleAdam` with separate first moments
for the two kinds of step, as in GradInit.

Two faults of the released code are fixed: the sub-batches are disjoint and of equal size
(sizes differ by at most one when D does not divide the batch), and the cosine has an
:math:`\\epsilon`, so a zero sub-batch gradient gives a finite objective. BatchNorm runs on
each sub-batch's own statistics (one forward per sub-batch) and never writes its running
buffers. ``num_splits="batch"`` is the sample-wise variant (D = batch size, one forward per
example; for small models).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from initopt.core import dist
from initopt.core.batches import Batch, batch_size, split_batch
from initopt.core.bilinear import ProjectedWeightGrads
from initopt.core.cosine import GramPlan, build_plan, cosine_from_gram, subbatch_gram
from initopt.core.functional import Evaluator
from initopt.core.optim import RescaleAdam
from initopt.core.progress import Progress
from initopt.errors import ConfigError, DataError, InitOptError, LossError
from initopt.methods.base import Method, Outcome, Problem, check_guard, register

__all__ = ["NIO", "NIOConfig"]


@dataclass(frozen=True)
class NIOConfig:
    """NIO settings; defaults are the released ImageNet ResNet-50 configuration (batch 64).

    Attributes:
        num_splits: D, the number of disjoint sub-batches per batch (>= 2), or ``"batch"`` for
            one per example (sample-wise GradCosine; one forward per example).
        gamma: bound :math:`\\gamma` on B-GN; above it the step minimizes B-GN.
        lr: scale learning rate :math:`\\tau`.
        steps: iterations (both kinds count).
        mu: weight :math:`\\mu` of B-GN in the ``"gc_gn"`` target.
        target: ``"gc_gn"`` (:math:`-\\text{B-GC} - \\mu\\,\\text{B-GN}`) or ``"gc"`` (:math:`-\\text{B-GC}`).
        eps: :math:`\\epsilon` in the cosine's denominator.
        min_scale: :math:`\\alpha_{\\min}` for weights and gains (biases: 0).
        max_gain_scale: optional cap on norm-layer gains.
        clip: bound on each scalar scale gradient (``None``: none).
        betas, adam_eps: of the scale optimizer.
        accelerate: compute Linear/Conv gradients through the hooked Gram engine (exact, faster);
            ``False``: plain autograd for every tensor.
        projected_grads: in the derivative with respect to the scales, the tensors the engine
            does not accelerate (all of them with ``accelerate=False``) contribute
            :math:`\\langle\\nabla_W J, W^0\\rangle` by Euler's identity through conv/linear
            layers, without weight-gradient kernels (:mod:`initopt.core.bilinear`, as in
            MetaInit; same values). Accelerated layers never form weight gradients there: their
            scale multiplies the layer output.
        projected_min_macs: layers with fewer multiply-adds per call keep plain autograd (as
            MetaInit's; the algebra's Python-level cost exceeds the kernels saved on small layers).
        mode: ``"train"`` (BatchNorm on batch statistics, dropout off) or ``"eval"``.
        guard: keep the scales only if copies trained from them for ``guard_steps`` real
            optimizer steps reach a lower held-out loss than copies trained from the start
            (:func:`initopt.core.guard.guard`); otherwise leave the model as it was. ``False``:
            the paper's algorithm, scales always applied.
        guard_steps: optimizer steps of each guard trial.
    """

    num_splits: int | str = 4
    gamma: float = 10.0
    lr: float = 3e-3
    steps: int = 100
    mu: float = 1.0
    target: str = "gc_gn"
    eps: float = 1e-8
    min_scale: float = 0.01
    max_gain_scale: float | None = None
    clip: float | None = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    accelerate: bool = True
    projected_grads: bool = True
    projected_min_macs: int = 1 << 23
    mode: str = "train"
    guard: bool = True
    guard_steps: int = 25

    def __post_init__(self) -> None:
        check_guard(self, "nio")
        d = self.num_splits
        if not (d == "batch" or (isinstance(d, int) and not isinstance(d, bool) and d >= 2)):
            raise ConfigError(f"nio: num_splits must be an integer >= 2 or 'batch', got {d!r}")
        if self.target not in ("gc_gn", "gc"):
            raise ConfigError(f"nio: target must be 'gc_gn' or 'gc', got {self.target!r}")
        for k in ("gamma", "lr"):
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(f"nio: {k} must be a positive number, got {v!r}")
        for k in ("mu", "eps"):
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ConfigError(f"nio: {k} must be a number >= 0, got {v!r}")
        if not 0 < self.min_scale <= 1:
            raise ConfigError(
                f"nio: min_scale must be in (0, 1] (the search starts at scale 1), got {self.min_scale!r}"
            )
        if self.max_gain_scale is not None and self.max_gain_scale < 1:
            raise ConfigError(
                f"nio: max_gain_scale must be >= 1 (the search starts at scale 1), got {self.max_gain_scale!r}"
            )
        if self.clip is not None and self.clip <= 0:
            raise ConfigError(f"nio: clip must be > 0 or None, got {self.clip!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"nio: betas must be two numbers in [0, 1), got {self.betas!r}")
        if not self.adam_eps > 0:
            raise ConfigError(f"nio: adam_eps must be > 0, got {self.adam_eps!r}")
        v = self.projected_min_macs
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            raise ConfigError(f"nio: projected_min_macs must be an integer >= 0, got {v!r}")
        if self.mode not in ("train", "eval"):
            raise ConfigError(f"nio: mode must be 'train' or 'eval', got {self.mode!r}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))


@register
class NIO(Method):
    """NIO (Yang et al. 2022): scales that make sub-batch gradients agree, under a norm bound."""

    name = "nio"
    Config = NIOConfig
    summary = "scales that maximize the gradient cosine across sub-batches, under a gradient-norm bound"
    uses_optimizer = True

    def parts(self, batch: Batch) -> list[Batch]:
        """The D disjoint contiguous sub-batches of ``batch``."""
        n = batch_size(batch)
        d = n if self.config.num_splits == "batch" else self.config.num_splits
        if n < d or n < 2:
            raise DataError(f"nio: a batch of {n} examples cannot be split into {d} sub-batches (num_splits)")
        return split_batch(batch, d)

    def check_subbatches(self, ev: Evaluator, tensors: list[torch.Tensor], batch: Batch) -> None:
        """Raise :class:`~initopt.DataError` when the model takes the batch but not its sub-batches
        (e.g. BatchNorm in training mode on one-example sub-batches)."""
        part = self.parts(batch)[0]
        try:
            with torch.no_grad():
                ev.loss(tensors, part, where="a sub-batch")
        except InitOptError:
            raise
        except Exception as e:
            with torch.no_grad():
                ev.loss(tensors, batch, where="the first batch")  # the whole batch fails too: not ours to name
            raise DataError(
                f"nio: the model takes the batch of {batch_size(batch)} examples but not its sub-batches of "
                f"{batch_size(part)} (num_splits={self.config.num_splits}): {type(e).__name__}: {e}; use fewer "
                "num_splits or larger batches"
            ) from e

    def fused_ok(self, ev: Evaluator, batch: Batch, plan: GramPlan) -> bool:
        """Whether the fused engine (``subbatch_gram(..., fused=True)``: one forward and backward
        for all D sub-batches) reproduces the per-sub-batch engine on ``batch``.

        It needs a plan that accelerates every block, a model output tensor with one row per
        example, and a model that treats examples independently (not BatchNorm on batch
        statistics). Checked once, numerically, at scales away from 1: the two Gram matrices and
        losses must agree to 1e-4 relative (1e-9 in float64); on any mismatch or error the
        search keeps one forward per sub-batch.
        """
        if plan.fallback or not plan.layers:
            return False
        space = ev.space
        g = torch.Generator(device="cpu").manual_seed(4321)
        alpha = (0.7 + 0.6 * torch.rand(len(space.blocks), generator=g, dtype=torch.float64)).to(
            space.device, space.dtype
        )
        parts = self.parts(batch)
        try:
            fast = subbatch_gram(ev, alpha, parts, plan=plan, fused=True)
        except (InitOptError, ValueError, RuntimeError, TypeError):
            return False
        slow = subbatch_gram(ev, alpha, parts, plan=plan)
        tol = 1e-9 if space.dtype == torch.float64 else 1e-4
        for x, y in zip(fast, slow, strict=True):
            x, y = x.detach().double(), y.detach().double()
            if not bool(torch.linalg.vector_norm(x - y) <= tol * torch.linalg.vector_norm(y) + 1e-30):
                return False
        return True

    def objective(self, gc: torch.Tensor, gn: torch.Tensor, branch: str) -> torch.Tensor:
        """B-GN (constraint) or :math:`-\\text{B-GC} - \\mu\\,\\text{B-GN}` / :math:`-\\text{B-GC}`."""
        if branch == "constraint":
            return gn
        if self.config.target == "gc":
            return -gc
        return -gc - self.config.mu * gn

    def iteration(
        self,
        ev: Evaluator,
        alpha: torch.Tensor,
        batch: Batch,
        plan: GramPlan | None = None,
        clock: Callable[[str], None] | None = None,
        *,
        fused: bool = False,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """One NIO iteration at ``alpha``: the scale gradient and a record (branch, gc, gn, loss).

        ``clock``, if given, is called with ``"forward"``, ``"gradients"``, ``"gram"`` and
        ``"backward"`` after each phase (for timing breakdowns); ``fused``: one forward for all
        sub-batches (only where :meth:`fused_ok`)."""
        cfg = self.config
        space = ev.space
        a = alpha.detach().clone().requires_grad_(True)
        rest = list(range(len(space.blocks))) if plan is None else list(plan.fallback)
        pwg, theta = None, None
        if cfg.projected_grads and rest and not fused:
            theta = space.leaves(alpha)
            pwg = ProjectedWeightGrads([theta[i] for i in rest], min_macs=cfg.projected_min_macs)
        gram, losses = subbatch_gram(
            ev,
            a,
            self.parts(batch),
            plan=plan,
            create_graph=True,
            fused=fused,
            projector=pwg,
            fallback_leaves=theta,
            clock=clock,
            whole=batch,
        )
        gc, norms = cosine_from_gram(gram, cfg.eps)
        gn = norms.mean()
        # distributed: the bound is on the mean over ranks, so every rank takes the same branch
        gn_v, gc_v, loss_v = dist.all_reduce_mean(torch.stack([gn, gc, losses.mean()]).detach().double()).tolist()
        if not all(math.isfinite(v) for v in (gn_v, gc_v, loss_v)):
            raise LossError(
                f"nio: non-finite loss ({loss_v}), gradient cosine ({gc_v}) or norm ({gn_v}); "
                "lower lr or check the model and data"
            )
        branch = "constraint" if gn_v > cfg.gamma else "objective"
        obj = self.objective(gc, gn, branch)
        if pwg is not None and theta is not None:
            idx = torch.tensor(rest, dtype=torch.long, device=a.device)
            d_rest, (d_a,) = pwg.scale_gradient_with(
                obj, [theta[i] for i in rest], [space.initial[i] for i in rest], alpha.detach()[idx], [a]
            )
            grad = torch.zeros_like(a) if d_a is None else d_a.clone()
            grad[idx] += d_rest.to(grad.dtype)
        else:
            (grad,) = torch.autograd.grad(obj, a)
        if clock is not None:
            clock("backward")
        return dist.all_reduce_mean(grad.detach()), {"branch": branch, "gc": gc_v, "gn": gn_v, "loss": loss_v}

    def measure(self, ev: Evaluator, alpha: torch.Tensor, batch: Batch, plan: GramPlan | None) -> dict[str, float]:
        """B-GC, B-GN and the mean sub-batch loss at ``alpha`` (first order only)."""
        gram, losses = subbatch_gram(ev, alpha, self.parts(batch), plan=plan)
        gc, norms = cosine_from_gram(gram.detach(), self.config.eps)
        v = dist.all_reduce_mean(torch.stack([gc, norms.mean(), losses.detach().mean()]).double()).tolist()
        return {"gc": v[0], "gn": v[1], "loss": v[2]}

    def search(self, problem: Problem, steps: int, progress: Progress) -> Outcome:
        cfg = self.config
        space, ev = problem.space, problem.evaluator
        alpha = space.ones()
        lo, hi = space.bounds()
        opt = RescaleAdam(lo, hi, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps, clip=cfg.clip)
        S = problem.next_batch()
        probe = S
        self.check_subbatches(ev, space.leaves(alpha), S)
        plan = build_plan(ev, S, verify_scaling=True) if cfg.accelerate else GramPlan.plain(ev)
        fused = cfg.accelerate and self.fused_ok(ev, S, plan)
        before = self.measure(ev, alpha, probe, plan)
        history: list[dict[str, Any]] = []
        for t in range(steps):
            t0 = time.perf_counter()
            grad, rec = self.iteration(ev, alpha, S, plan, fused=fused)
            opt.step(alpha, grad, kind=rec["branch"])
            history.append({"step": t, **rec, "seconds": time.perf_counter() - t0})
            progress.update(branch=rec["branch"][:3], gc=f"{rec['gc']:.3f}", gn=f"{rec['gn']:.3g}")
            S = problem.next_batch()
        after = self.measure(ev, alpha, probe, plan)
        return Outcome(
            alpha=alpha,
            history=history,
            before=before,
            after=after,
            info={"engine": "fused" if fused else "per sub-batch"},
        )
