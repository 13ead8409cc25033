"""The scale optimizer shared by GradInit and NIO ("rescale Adam" of the papers).

Adam on each scalar :math:`\\alpha_i`, vectorized over all scales:

.. math::

    \\hat g = \\mathrm{clip}(g, -c, c), \\quad
    m^{(k)} \\leftarrow \\beta_1 m^{(k)} + (1-\\beta_1)\\hat g, \\quad
    v \\leftarrow \\beta_2 v + (1-\\beta_2)\\hat g^2,

    \\alpha \\leftarrow \\mathrm{clamp}\\Big(\\alpha - \\tau
    \\frac{m^{(k)}/(1-\\beta_1^{t_k})}{\\sqrt{v/(1-\\beta_2^{t})} + \\epsilon},
    \\alpha_{\\min}, \\alpha_{\\max}\\Big)

with *separate* first moments :math:`m^{(k)}` (and bias-correction counts :math:`t_k`) for
constraint steps and objective steps, one shared second moment bias-corrected with the
total count :math:`t`. No host synchronization happens in :meth:`RescaleAdam.step`.
"""

from __future__ import annotations

import torch

__all__ = ["RescaleAdam"]


class RescaleAdam:
    """Adam over a vector of scales with clipping, split first moments and bounds.

    Args:
        lower, upper: bounds, one entry per scale (``inf`` for no upper bound).
        lr: scale learning rate :math:`\\tau`.
        betas: :math:`(\\beta_1, \\beta_2)`.
        eps: Adam's :math:`\\epsilon`.
        clip: :math:`c`, the bound on each scalar gradient (``None``: no clipping).
    """

    def __init__(
        self,
        lower: torch.Tensor,
        upper: torch.Tensor,
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        clip: float | None = 1.0,
    ) -> None:
        self.lower, self.upper = lower, upper
        self.lr, self.betas, self.eps, self.clip = lr, betas, eps, clip
        zeros = torch.zeros_like(lower)
        self.m = {"constraint": zeros.clone(), "objective": zeros.clone()}
        self.v = zeros.clone()
        self.t = {"constraint": 0, "objective": 0}
        self.t_total = 0

    @torch.no_grad()
    def step(self, alpha: torch.Tensor, grad: torch.Tensor, *, kind: str) -> torch.Tensor:
        """Update ``alpha`` in place with ``grad``; ``kind`` is ``"constraint"`` or ``"objective"``."""
        b1, b2 = self.betas
        g = grad.to(alpha.dtype)
        if self.clip is not None:
            g = g.clamp(-self.clip, self.clip)
        m = self.m[kind]
        m.mul_(b1).add_(g, alpha=1 - b1)
        self.t[kind] += 1
        self.t_total += 1
        self.v.mul_(b2).addcmul_(g, g, value=1 - b2)
        m_hat = m / (1 - b1 ** self.t[kind])
        v_hat = self.v / (1 - b2**self.t_total)
        alpha.sub_(self.lr * m_hat / (v_hat.sqrt() + self.eps))
        torch.maximum(alpha, self.lower, out=alpha)
        torch.minimum(alpha, self.upper, out=alpha)
        return alpha
