"""Kaiming/He scale: He, Zhang, Ren, Sun, "Delving Deep into Rectifiers: Surpassing Human-Level
Performance on ImageNet Classification", ICCV 2015 (arXiv:1502.01852).

He et al. keep the variance of ReLU activations constant with depth by drawing each weight
with standard deviation

.. math::

    \\sigma = \\frac{\\mathrm{gain}}{\\sqrt{\\mathrm{fan}}}, \\qquad \\mathrm{gain} = \\sqrt 2
    \\text{ for ReLU}.

As a scale-only baseline this method keeps every weight's direction and rescales it so that
its measured spread becomes :math:`\\sigma`: :math:`\\alpha = \\sigma / \\mathrm{rms}(W)` with
:math:`\\mathrm{rms}(W) = \\sqrt{\\tfrac{1}{n}\\sum_j W_j^2}` (``mode="rms"``, the default) or
:math:`\\alpha = \\sigma / \\mathrm{std}(W)` (``mode="std"``, population standard deviation
around the mean). A zero-mean draw has :math:`\\mathrm{rms} \\approx \\mathrm{std}`.

Fans follow ``torch.nn.init``: for a weight of shape ``(out, in, *kernel)``,
:math:`\\mathrm{fan_{in}} = \\mathrm{in}\\cdot\\prod\\mathrm{kernel}` and
:math:`\\mathrm{fan_{out}} = \\mathrm{out}\\cdot\\prod\\mathrm{kernel}`; the packed q/k/v projection
of ``nn.MultiheadAttention`` (shape ``(3d, d)``) has fan-in ``d`` and fan-out ``3d``, as
``torch.nn.init`` computes it.

Which tensors: the weights of affine layers, i.e. tensors used as ``weight`` of ``F.linear`` /
``F.conv1d/2d/3d`` or as the input/output projection of ``F.multi_head_attention_forward``,
found on one recorded forward pass of the first batch (:mod:`initopt.core.affine`), never by
names. Embedding tables (and output layers tied to them), position tables, 1-D tensors
(biases, norm gains), weights of norm 0 and layers whose output is summed with another path
of the network (a residual branch, parallel branches: He's derivation is for a chain of
layers; see :mod:`initopt.core.affine`) keep scale 1; the ≥2-D ones are listed in the
history with the reason. No data is used beyond that one pass; the loss before and after is
recorded on the first batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from initopt.core.affine import record_affine
from initopt.core.progress import Progress
from initopt.errors import ConfigError
from initopt.methods.base import Method, Outcome, Problem, register

__all__ = ["Kaiming", "KaimingConfig", "fans"]


def fans(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a weight of ``shape`` (the ``torch.nn.init`` convention).

    Example:
        >>> fans((16, 3, 3, 3))
        (27, 144)
    """
    if len(shape) < 2:
        raise ConfigError(f"fans need a tensor of at least 2 dimensions, got shape {tuple(shape)}")
    field = math.prod(shape[2:])
    return int(shape[1]) * field, int(shape[0]) * field


@dataclass(frozen=True)
class KaimingConfig:
    """Kaiming-scale settings.

    Attributes:
        gain: √2 for ReLU (He et al.); 1 for linear layers (LeCun), 5/3 for tanh.
        fan: ``"in"`` (forward variance, the default of He et al.) or ``"out"`` (backward variance).
        mode: how a weight's current spread is measured: ``"rms"`` (root mean square) or
            ``"std"`` (standard deviation around its mean).
        steps: 0 leaves every scale at 1; any positive number applies the rule once (it is
            idempotent, so further passes would change nothing).
    """

    gain: float = math.sqrt(2.0)
    fan: str = "in"
    mode: str = "rms"
    steps: int = 1

    def __post_init__(self) -> None:
        g = self.gain
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not (math.isfinite(g) and g > 0):
            raise ConfigError(f"kaiming: gain must be a finite number > 0, got {g!r}")
        if self.fan not in ("in", "out"):
            raise ConfigError(f"kaiming: fan must be 'in' or 'out', got {self.fan!r}")
        if self.mode not in ("rms", "std"):
            raise ConfigError(f"kaiming: mode must be 'rms' or 'std', got {self.mode!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigError(f"kaiming: steps must be a non-negative integer, got {self.steps!r}")


@register
class Kaiming(Method):
    """Kaiming/He scale (He et al. 2015): every affine weight rescaled to
    :math:`\\mathrm{rms}(W) = \\mathrm{gain}/\\sqrt{\\mathrm{fan}}`, direction kept.

    Example:
        >>> import torch, initopt
        >>> net = torch.nn.Sequential(torch.nn.Linear(50, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> batch = (torch.randn(16, 50), torch.randint(0, 3, (16,)))
        >>> _ = initopt.initialize_(net, batch, "kaiming")
        >>> round(float(net[0].weight.detach().pow(2).mean().sqrt()), 4)  # sqrt(2 / 50)
        0.2
    """

    name = "kaiming"
    Config = KaimingConfig
    summary = "every affine weight rescaled to rms gain/sqrt(fan) (He et al. 2015), direction kept"

    @property
    def mode(self) -> str:
        """Search mode: training mode with dropout off (``config.mode`` is the spread measure)."""
        return "train"

    def search(self, problem: Problem, steps: int, progress: Progress) -> Outcome:
        cfg, space = self.config, problem.space
        alpha = space.ones()
        history: list[dict[str, Any]] = []
        if steps == 0:
            return Outcome(alpha=alpha, history=history)
        batch = problem.batches.first
        trace, loss0 = record_affine(problem.evaluator, space.scaled(alpha), batch, measure=False, flow=True)
        for i, b in enumerate(space.blocks):
            w = b.param
            if w.ndim < 2:
                continue
            note = trace.note(i)
            if note is None and not b.scalable:
                note = "its weight has norm 0 and cannot be rescaled"
            spread = 0.0
            if note is None:
                w64 = w.detach().double()
                if cfg.mode == "rms":
                    spread = float(w64.pow(2).mean().sqrt())
                else:
                    spread = float(w64.std(correction=0))
                if not spread > 0:
                    note = f"its {cfg.mode} is {spread}; cannot be rescaled"
            if note is not None:
                history.append({"param": b.name, "skipped": note})
                continue
            fan_in, fan_out = fans(w.shape)
            fan = fan_in if cfg.fan == "in" else fan_out
            target = cfg.gain / math.sqrt(fan)
            alpha[i] = target / spread
            history.append(
                {
                    "param": b.name,
                    "layer": ",".join(dict.fromkeys(trace.uses[i].calls)),
                    "fan": fan,
                    "target_std": target,
                    cfg.mode: spread,
                    "scale": float(alpha[i]),
                }
            )
        with torch.no_grad():
            loss1 = problem.evaluator.loss(space.scaled(alpha), batch)
        progress.update()
        return Outcome(alpha=alpha, history=history, before={"loss": float(loss0)}, after={"loss": float(loss1)})
