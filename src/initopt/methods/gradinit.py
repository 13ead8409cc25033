"""GradInit: Zhu, Ni, Xu, Kong, Huang, Goldstein, "GradInit: Learning to Initialize Neural
Networks for Stable and Efficient Training", NeurIPS 2021, arXiv:2102.08098.

One scale :math:`\\alpha_i` per tensor, :math:`\\theta_i = \\alpha_i W_i^0`, chosen so that one
step of the target optimizer lowers the loss most, under a bound on the gradient norm:

.. math::

    \\min_\\alpha \\; \\frac{1}{\\eta} L\\big(\\tilde S;\\, \\theta(\\alpha) - \\eta\\,
    \\mathrm{sg}(A[g])\\big) \\quad \\text{s.t.} \\quad \\|g\\|_p \\le \\gamma,
    \\qquad g = \\nabla_\\theta L(S; \\theta(\\alpha)),

with :math:`A[g] = g/\\|g\\|_2` (or :math:`g`) and :math:`p = 2` for the ``sgd`` target, and
:math:`A[g] = \\mathrm{sign}(g)`, :math:`p = 1` for the ``adam`` target. Each iteration takes
one batch :math:`S = [B_0; B_1]` and half of the next batch :math:`B_2`;
:math:`\\tilde S = [B_0; B_2]` (with a single batch, :math:`\\tilde S = S`). If
:math:`\\|g\\|_p > \\gamma` the iteration is a *constraint step* (minimize :math:`\\|g\\|_p`,
double backward); otherwise an *objective step*, first order: the look-ahead gradient does
not flow through :math:`g`, so it costs one more forward and backward and no
double-backward graph is built. Scales are updated by :class:`~initopt.core.RescaleAdam`.

With the training optimizer given (``initialize_(..., optimizer=...)``), the look-ahead is
its real first step instead of :math:`\\eta A[g]`: :math:`\\theta - \\Delta(g)` with the
optimizer's learning rate, momentum, weight decay or Adam's :math:`g/(|g|+\\epsilon)`
(:meth:`~initopt.core.step.TrainStep.first_step`), and the bound is on
:math:`\\|g\\|_1` when that step ignores the gradient's scale (Adam-like), on
:math:`\\|g\\|_2` otherwise. ``eta`` then only divides the objective, and ``target`` and
``normalize`` are not used. The paper's :math:`\\eta` is a fixed step length (0.1 after
normalization), usually far longer than a real first step at lr 0.01.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from initopt.core import dist
from initopt.core.batches import Batch, concat_batches, split_batch
from initopt.core.bilinear import ProjectedWeightGrads
from initopt.core.blocks import ScaleSpace
from initopt.core.functional import Evaluator
from initopt.core.optim import RescaleAdam
from initopt.core.progress import Progress
from initopt.core.step import TrainStep
from initopt.errors import ConfigError, LossError
from initopt.methods.base import Method, Outcome, Problem, check_guard, register

__all__ = ["GradInit", "GradInitConfig"]


@dataclass(frozen=True)
class GradInitConfig:
    """GradInit settings; defaults are the paper's CIFAR-10 scripts (VGG-19 without BN).

    Attributes:
        target: optimizer of the first training step, ``"sgd"`` (L2 bound) or ``"adam"``
            (L1 bound, sign step).
        normalize: ``sgd`` target only: step :math:`g/\\|g\\|_2` (the published runs) or
            :math:`g`.
        eta: look-ahead step :math:`\\eta`.
        gamma: gradient-norm bound :math:`\\gamma`.
        lr: scale learning rate :math:`\\tau`.
        min_scale: :math:`\\alpha_{\\min}` for weights and gains (biases: 0).
        max_gain_scale: optional cap on norm-layer gains (Transformer recipe: 100).
        clip: bound on each scalar scale gradient (``None``: none).
        betas, eps: of the scale optimizer.
        steps: iterations :math:`T` (both kinds count).
        mode: ``"train"`` (BatchNorm on batch statistics, dropout off) or ``"eval"``.
        guard: keep the scales only if copies trained from them for ``guard_steps`` real
            optimizer steps reach a lower held-out loss than copies trained from the start
            (:func:`initopt.core.guard.guard`); otherwise leave the model as it was. ``False``:
            the paper's algorithm, scales always applied.
        guard_steps: optimizer steps of each guard trial.
        projected_grads: take :math:`\\langle\\nabla_\\theta J, W^0\\rangle` through convolution
            and linear layers without weight-gradient kernels (:mod:`initopt.core.bilinear`):
            Euler's identity in the constraint step's last backward, one forward kernel with
            :math:`W^0` in the look-ahead's. Same result to float round-off; ``False``: plain
            autograd (also used for models without convolutions, where it is faster).
        projected_min_macs: operations with fewer multiply-adds per call keep plain autograd
            (as MetaInit's: below it the algebra's Python cost exceeds the kernels it saves).
    """

    target: str = "sgd"
    normalize: bool = True
    eta: float = 0.1
    gamma: float = 1.0
    lr: float = 1e-2
    min_scale: float = 0.01
    max_gain_scale: float | None = None
    clip: float | None = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    steps: int = 390
    mode: str = "train"
    guard: bool = True
    guard_steps: int = 25
    projected_grads: bool = True
    projected_min_macs: int = 1 << 23

    def __post_init__(self) -> None:
        check_guard(self, "gradinit")
        v = self.projected_min_macs
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            raise ConfigError(f"gradinit: projected_min_macs must be an integer >= 0, got {v!r}")
        if self.target not in ("sgd", "adam"):
            raise ConfigError(f"gradinit: target must be 'sgd' or 'adam', got {self.target!r}")
        for k in ("eta", "gamma", "lr"):
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(f"gradinit: {k} must be a positive number, got {v!r}")
        if not 0 < self.min_scale <= 1:
            raise ConfigError(
                f"gradinit: min_scale must be in (0, 1] (the search starts at scale 1), got {self.min_scale!r}"
            )
        if self.max_gain_scale is not None and self.max_gain_scale < 1:
            raise ConfigError(
                f"gradinit: max_gain_scale must be >= 1 (the search starts at scale 1), got {self.max_gain_scale!r}"
            )
        if self.clip is not None and self.clip <= 0:
            raise ConfigError(f"gradinit: clip must be > 0 or None, got {self.clip!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"gradinit: betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.mode not in ("train", "eval"):
            raise ConfigError(f"gradinit: mode must be 'train' or 'eval', got {self.mode!r}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    @classmethod
    def transformer(cls, **overrides: Any) -> GradInitConfig:
        """The paper's IWSLT'14 post-LN Transformer recipe (Adam, no warmup)."""
        base = cls(
            target="adam",
            eta=1e-3,
            lr=2.5e-3,
            betas=(0.9, 0.98),
            steps=780,
            gamma=1000.0,
            max_gain_scale=100.0,
        )
        return replace(base, **overrides)


def _zeros_for_none(grads: tuple[torch.Tensor | None, ...], like: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, like, strict=True)]


def _scale_grad(
    space: ScaleSpace,
    alpha: torch.Tensor,
    output: torch.Tensor,
    tensors: list[torch.Tensor],
    pwg: ProjectedWeightGrads | None,
) -> torch.Tensor:
    """:math:`\\partial J/\\partial\\alpha` for ``output`` taken at ``tensors``: through the
    projector when there is one, else plain autograd contracted with :math:`W^0`."""
    if pwg is not None:
        return pwg.scale_gradient(output, tensors, space.initial, alpha).to(space.dtype)
    return space.scale_grad(torch.autograd.grad(output, tensors, allow_unused=True))


@register
class GradInit(Method):
    """GradInit (Zhu et al. 2021): scales that make the first optimizer step most effective."""

    name = "gradinit"
    Config = GradInitConfig
    summary = "scales so that one SGD/Adam step lowers the loss most, under a gradient-norm bound"
    uses_optimizer = True

    # -- pieces ---------------------------------------------------------------------------

    def norm_order(self, step: TrainStep | None = None) -> int:
        """1 for the ``adam`` target or an Adam-like optimizer, else 2."""
        if step is not None:
            return 1 if step.scale_invariant else 2
        return 1 if self.config.target == "adam" else 2

    def grad_norm(self, g: list[torch.Tensor], p: int | None = None) -> torch.Tensor:
        """:math:`\\|g\\|_2` (``sgd``) or :math:`\\|g\\|_1` (``adam``), differentiable."""
        p = self.norm_order() if p is None else p
        if not any(x.requires_grad for x in g):  # first-order pass: one fused kernel
            return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g, p)), p)
        if p == 1:
            return torch.stack([x.abs().sum() for x in g]).sum()
        return torch.stack([x.pow(2).sum() for x in g]).sum().sqrt()

    def step_direction(self, g: list[torch.Tensor], norm: torch.Tensor) -> list[torch.Tensor]:
        """:math:`A[g]`: the first step of the target optimizer (learning rate excluded)."""
        if self.config.target == "adam":
            return [x.sign() for x in g]
        if self.config.normalize:
            d = norm.clamp_min(torch.finfo(norm.dtype).tiny)
            return [x / d for x in g]
        return list(g)

    def lookahead(
        self,
        ev: Evaluator,
        theta: list[torch.Tensor],
        g: list[torch.Tensor],
        norm: torch.Tensor,
        batch: Batch,
        step: TrainStep | None = None,
        directions: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor], ProjectedWeightGrads | None]:
        """:math:`L(\\tilde S; \\theta - \\eta A[g]) / \\eta`, the leaves it was taken at and
        the projector of its scale gradient (``None`` without ``directions``).

        Consumes ``theta`` and ``g``: the step is taken in their storage, so that no extra
        copy of the parameters is made (peak memory close to a training step's). With a
        training ``step``, :math:`\\theta - \\Delta(g)` is its real first step (on copies).
        With ``directions`` (the initial tensors :math:`W^0`), the forward runs through
        :class:`~initopt.core.bilinear.ProjectedWeightGrads`, whose ``scale_gradient`` gives
        :math:`\\langle\\nabla_{\\theta'} L, W^0\\rangle` without weight-gradient kernels.
        """
        eta = self.config.eta
        if step is not None:
            moved = step.first_step(theta, g)
            g.clear()
            moved = [m.requires_grad_(True) for m in moved]
            return self._loss_at(ev, moved, batch, directions)
        with torch.no_grad():
            moved = [t.detach() for t in theta]
            if self.config.target == "adam":
                torch._foreach_sign_(g)
                torch._foreach_add_(moved, g, alpha=-eta)
            elif self.config.normalize:
                d = norm.detach().clamp_min(torch.finfo(norm.dtype).tiny)
                torch._foreach_mul_(g, eta / d)
                torch._foreach_sub_(moved, g)
            else:
                torch._foreach_add_(moved, g, alpha=-eta)
        g.clear()
        moved = [m.requires_grad_(True) for m in moved]
        return self._loss_at(ev, moved, batch, directions)

    def _loss_at(
        self, ev: Evaluator, moved: list[torch.Tensor], batch: Batch, directions: list[torch.Tensor] | None
    ) -> tuple[torch.Tensor, list[torch.Tensor], ProjectedWeightGrads | None]:
        eta = self.config.eta
        if directions is None or not torch.is_grad_enabled():
            return ev.loss(moved, batch) / eta, moved, None
        pwg = ProjectedWeightGrads(moved, directions, min_macs=self.config.projected_min_macs)
        with pwg.intercept():
            obj = ev.loss(moved, batch) / eta
        return obj, moved, pwg

    def iteration(
        self,
        ev: Evaluator,
        space: ScaleSpace,
        alpha: torch.Tensor,
        S: Batch,
        S_tilde: Batch,
        step: TrainStep | None = None,
        p: int | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """One GradInit iteration at ``alpha``: the scale gradient and a record.

        Returns ``(dJ/dalpha, record)`` where the record holds ``branch``, ``loss`` (on S),
        ``grad_norm`` and, for objective steps, ``lookahead_loss`` (a 0-d tensor).
        """
        theta = space.leaves(alpha)
        # the algebra pays through convolutions; on dense-only models its per-call Python
        # cost is larger than the kernels it saves (10-layer MLP: 22-30 ms per iteration
        # against 19 ms with plain autograd)
        projected = self.config.projected_grads and any(w.dim() > 2 for w in space.initial)
        pwg = ProjectedWeightGrads(theta, min_macs=self.config.projected_min_macs) if projected else None
        with pwg.intercept() if pwg is not None else contextlib.nullcontext():
            loss = ev.loss(theta, S)
        g = _zeros_for_none(torch.autograd.grad(loss, theta, retain_graph=True, allow_unused=True), theta)
        norm = self.grad_norm(g, p)
        # distributed: the bound is on the mean over ranks, so every rank takes the same branch
        loss_v, norm_v = dist.all_reduce_mean(torch.stack([loss.detach().double(), norm.detach().double()])).tolist()
        if not (math.isfinite(loss_v) and math.isfinite(norm_v)):
            raise LossError(
                f"gradinit: non-finite loss ({loss_v}) or gradient norm ({norm_v}); "
                "lower lr or check the model and data"
            )
        rec: dict[str, Any] = {"loss": loss_v, "grad_norm": norm_v}
        if norm_v > self.config.gamma:
            g2 = _zeros_for_none(torch.autograd.grad(loss, theta, create_graph=True, allow_unused=True), theta)
            n2 = self.grad_norm(g2, p)
            rec["branch"] = "constraint"
            return dist.all_reduce_mean(_scale_grad(space, alpha, n2, theta, pwg)), rec  # pwg: Euler
        del loss, pwg
        directions = space.initial if projected else None
        obj, moved, pwg = self.lookahead(ev, theta, g, norm, S_tilde, step, directions)
        rec["branch"] = "objective"
        rec["lookahead_loss"] = obj.detach() * self.config.eta
        return dist.all_reduce_mean(_scale_grad(space, alpha, obj, moved, pwg)), rec

    def measure(
        self,
        ev: Evaluator,
        space: ScaleSpace,
        alpha: torch.Tensor,
        S: Batch,
        S_tilde: Batch,
        step: TrainStep | None = None,
        p: int | None = None,
    ) -> dict[str, float]:
        """Loss, gradient norm and look-ahead loss :math:`L(\\tilde S; \\theta - \\eta A[g])`."""
        theta = space.leaves(alpha)
        loss = ev.loss(theta, S)
        g = _zeros_for_none(torch.autograd.grad(loss, theta, allow_unused=True), theta)
        norm = self.grad_norm(g, p)
        with torch.no_grad():
            obj, _, _ = self.lookahead(ev, theta, g, norm, S_tilde, step)
        v = dist.all_reduce_mean(torch.stack([loss.detach(), norm, obj * self.config.eta]).double()).tolist()
        return {"loss": v[0], "grad_norm": v[1], "lookahead_loss": v[2]}

    @staticmethod
    def pair(problem: Problem, S: Batch, nxt: Batch) -> Batch:
        """:math:`\\tilde S = [B_0; B_2]`: first halves of this batch and the next one."""
        if problem.batches.single:
            return S
        return concat_batches([split_batch(S, 2)[0], split_batch(nxt, 2)[0]])

    # -- the verb -------------------------------------------------------------------------

    def search(self, problem: Problem, steps: int, progress: Progress) -> Outcome:
        cfg = self.config
        space, ev = problem.space, problem.evaluator
        alpha = space.ones()
        lo, hi = space.bounds()
        opt = RescaleAdam(lo, hi, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, clip=cfg.clip)
        S = problem.next_batch()
        nxt = problem.next_batch()
        step = problem.step
        p = self.norm_order(step)
        probe = (S, self.pair(problem, S, nxt))
        before = self.measure(ev, space, alpha, *probe, step, p)
        history: list[dict[str, Any]] = []
        for t in range(steps):
            t0 = time.perf_counter()
            grad, rec = self.iteration(ev, space, alpha, S, self.pair(problem, S, nxt), step, p)
            opt.step(alpha, grad, kind=rec["branch"])
            history.append({"step": t, **rec, "seconds": time.perf_counter() - t0})
            progress.update(branch=rec["branch"][:3], norm=f"{rec['grad_norm']:.3g}")
            S, nxt = nxt, problem.next_batch()
        lookahead = [h.pop("lookahead_loss") for h in history if "lookahead_loss" in h]
        values = dist.all_reduce_mean(torch.stack(lookahead).double()).tolist() if lookahead else []
        it = iter(values)
        for h in history:
            h["lookahead_loss"] = next(it) if h["branch"] == "objective" else None
        after = self.measure(ev, space, alpha, *probe, step, p)
        info = {} if step is None else {"lookahead": step.describe(), "bound": f"l{p}"}
        return Outcome(alpha=alpha, history=history, before=before, after=after, info=info)
