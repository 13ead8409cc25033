"""Layer-sequential unit-variance initialization (LSUV): Mishkin & Matas, "All you need is a
good init", ICLR 2016 (arXiv:1511.06422).

The paper's second stage, as a scale search: for each affine layer :math:`k` in forward order,
on one batch :math:`B`, rescale its weight until the variance of its output
:math:`z_k = W_k x_{k-1} + b_k` (over every element of the output tensor: examples, units,
positions) is within ``tol`` of ``target_var``:

.. math::

    \\alpha_k \\leftarrow \\alpha_k \\sqrt{\\frac{v^\\ast}{\\operatorname{Var}_B[z_k(\\alpha)]}}
    \\quad\\text{until}\\quad |\\operatorname{Var}_B[z_k(\\alpha)] - v^\\ast| < \\mathrm{tol},

at most ``max_iters`` rescalings per layer, each followed by one forward pass that measures
every layer's output at the current scales :math:`\\alpha` (the network is evaluated
functionally; the model is not written until the search ends). Without a bias the variance
is quadratic in :math:`\\alpha_k`, so one rescaling is exact; biases keep scale 1, so a few
iterations may be needed. ``steps`` is the number of sweeps over the layers: in a
feed-forward network a layer's output does not depend on later layers, so the second sweep
only checks (it costs no forward pass unless some layer moved out of tolerance, e.g. a layer
called at two places).

What the paper does and initopt does not: its first stage replaces each weight with an
orthonormal matrix, which changes directions; every initopt method only rescales tensors, so
call :func:`torch.nn.init.orthogonal_` on the weights yourself first if you want it.

Layers are the weights used as ``weight`` of ``F.linear`` / ``F.conv1d/2d/3d`` or as the
packed input and the output projection of ``F.multi_head_attention_forward`` (see
:mod:`initopt.core.affine`), found on one recorded forward pass of the first batch, never by
names or module types. Left at scale 1, with a note in the history: weights also used by a
non-affine function (an output layer tied to an embedding, ``F.embedding``, position tables),
weights not seen in an affine call, weights of norm 0, layers whose output is summed with
another path of the network (a residual branch or parallel branches, see
:mod:`initopt.core.affine`: unit variance of a branch is not what the paper's chain of layers
asks for) and layers whose output variance is 0 or not finite. BatchNorm after a convolution
does not matter: the convolution's own output (before the normalization) is what is
measured and set, which is LSUV's definition; the
search runs in training mode with dropout off, so BatchNorm uses batch statistics and its
running buffers stay untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from initopt.core.affine import AffineTrace, record_affine
from initopt.core.progress import Progress
from initopt.errors import ConfigError
from initopt.methods.base import Method, Outcome, Problem, register

__all__ = ["LSUV", "LSUVConfig"]


@dataclass(frozen=True)
class LSUVConfig:
    """LSUV settings; defaults are the paper's (variance 1, tolerance 0.1, 10 iterations).

    Attributes:
        target_var: output variance every affine layer is brought to.
        tol: a layer is done when |Var - target_var| < tol (absolute).
        max_iters: at most this many rescalings of each layer per sweep (each costs one forward).
        steps: sweeps over the layers in forward order (a sweep after a converged one costs
            nothing; 0 leaves every scale at 1).
    """

    target_var: float = 1.0
    tol: float = 0.1
    max_iters: int = 10
    steps: int = 2

    def __post_init__(self) -> None:
        for name in ("target_var", "tol"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise ConfigError(f"lsuv: {name} must be a finite number > 0, got {v!r}")
        if isinstance(self.max_iters, bool) or not isinstance(self.max_iters, int) or self.max_iters < 1:
            raise ConfigError(f"lsuv: max_iters must be a positive integer, got {self.max_iters!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigError(f"lsuv: steps must be a non-negative integer, got {self.steps!r}")


@register
class LSUV(Method):
    """LSUV (Mishkin & Matas 2016): each affine layer's weight rescaled, in forward order, until
    its output variance on a batch is ``target_var``.

    Example:
        >>> import torch, initopt
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> batch = (torch.randn(32, 4), torch.randint(0, 3, (32,)))
        >>> initopt.initialize_(net, batch, "lsuv").after["max_var_error"] < 0.1
        True
    """

    name = "lsuv"
    Config = LSUVConfig
    summary = "each affine layer's weight rescaled in forward order until its output variance on a batch is 1"

    def search(self, problem: Problem, steps: int, progress: Progress) -> Outcome:
        cfg, space = self.config, problem.space
        alpha = space.ones()
        history: list[dict[str, Any]] = []
        if steps == 0:
            return Outcome(alpha=alpha, history=history)
        batch = problem.batches.first

        def measure(flow: bool = False) -> tuple[AffineTrace, float]:
            trace, loss = record_affine(problem.evaluator, space.scaled(alpha), batch, flow=flow)
            return trace, float(loss)

        trace, loss = measure(flow=True)
        for i, b in enumerate(space.blocks):
            if b.param.ndim < 2:
                continue
            note = trace.note(i)
            if note is None and not b.scalable:
                note = "its weight has norm 0 and cannot be rescaled"
            if note is None:
                continue
            history.append({"sweep": 0, "param": b.name, "skipped": note})
        layers = [i for i in trace.order if trace.note(i) is None and space.blocks[i].scalable]

        def variance(i: int) -> float:
            v = trace.uses[i].variance
            return math.nan if v is None else float(v)

        def errors() -> dict[str, float]:
            return {space.blocks[i].name: abs(variance(i) - cfg.target_var) for i in layers}

        start = errors()
        before = {"loss": loss, "max_var_error": max(start.values(), default=0.0)}
        for sweep in range(1, steps + 1):
            moved = False
            for i in list(layers):
                name = space.blocks[i].name
                kinds = ",".join(dict.fromkeys(trace.uses[i].calls))
                it = 0
                while True:
                    var = variance(i)
                    entry: dict[str, Any] = {
                        "sweep": sweep,
                        "param": name,
                        "layer": kinds,
                        "iteration": it,
                        "variance": var,
                        "scale": float(alpha[i]),
                        "loss": loss,
                    }
                    history.append(entry)
                    if not (math.isfinite(var) and var > 0):
                        entry["skipped"] = f"output variance is {var}; left at scale 1"
                        layers.remove(i)
                        if float(alpha[i]) != 1.0:
                            alpha[i] = 1.0
                            trace, loss = measure()
                            moved = True
                        break
                    if abs(var - cfg.target_var) < cfg.tol:
                        break
                    if it == cfg.max_iters:
                        entry["converged"] = False
                        break
                    alpha[i] = alpha[i] * math.sqrt(cfg.target_var / var)
                    it += 1
                    moved = True
                    trace, loss = measure()
            progress.update(max_var_error=f"{max(errors().values(), default=0.0):.3g}")
            if not moved:
                break
        end = errors()
        after = {"loss": loss, "max_var_error": max(end.values(), default=0.0)}
        return Outcome(alpha=alpha, history=history, before=before, after=after)
