"""Gauss–Hermite expectations over a Gaussian pre-activation, and the Hessian-norm variance.

For any elementwise callable :math:`\\phi`, :func:`expect` computes
:math:`\\mathbb E_{z\\sim\\mathcal N(0, q)}[\\phi(z)^2]` or :math:`\\mathbb E[\\phi'(z)^2]` by
Gauss–Hermite quadrature (the derivative by autograd), so new activations need no table;
:func:`hessian_variance` is the Hessian-norm rule :math:`\\sigma^2 = p / (\\mathrm{fan}\\,
\\mathbb E[\\phi'(z)^2])` of Skorski, Temperoni and Theobald (arXiv:2004.09506), which
:class:`initopt.methods.hessian.HessianInit` applies layer by layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from initopt.errors import ConfigError

__all__ = ["expect", "hessian_variance"]

_NODES: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _hermite(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive nodes and weights of the n-point rule for :math:`\\int f(x) e^{-x^2/2}dx` (n even).

    Golub–Welsch: the nodes are the eigenvalues of the Jacobi matrix of the probabilists'
    Hermite polynomials (off-diagonal :math:`\\sqrt k`), the weights the squared first
    components of its eigenvectors (up to the constant :math:`\\sqrt{2\\pi}`, which cancels).
    """
    if n not in _NODES:
        k = torch.arange(1, n, dtype=torch.float64).sqrt()
        x, vecs = torch.linalg.eigh(torch.diag(k, 1) + torch.diag(k, -1))
        w = vecs[0] ** 2
        pos = x > 0
        # symmetrize: one weight per pair (x, -x), so that odd/even parts integrate exactly
        xp = x[pos]
        wp = 0.5 * (w[pos] + w.flip(0)[pos])
        _NODES[n] = (xp, wp)
    return _NODES[n]


def _derivative(phi: Callable[[torch.Tensor], torch.Tensor], t: torch.Tensor) -> torch.Tensor:
    """:math:`\\phi'(t)` elementwise, by autograd (central differences if that fails)."""
    try:
        with torch.enable_grad():
            x = t.detach().clone().requires_grad_(True)
            y = phi(x.clone())
            (g,) = torch.autograd.grad(y.sum(), x)
        return g.detach()
    except RuntimeError:
        h = 1e-5 * torch.clamp(t.abs(), min=1.0)
        return (phi(t + h) - phi(t - h)) / (2 * h)


def expect(
    f: Callable[[torch.Tensor], torch.Tensor],
    q: float,
    *,
    derivative: bool = False,
    power: int = 2,
    nodes: int = 100,
) -> float:
    """:math:`\\mathbb E_{z\\sim\\mathcal N(0,q)}[g(z)^{\\mathrm{power}}]` for g = f or f' (Gauss–Hermite).

    ``nodes`` (even) probabilists' Hermite nodes :math:`x_i` with weights :math:`w_i`
    (Golub–Welsch, computed once per ``nodes``), used in symmetric pairs:
    :math:`\\mathbb E g(z) \\approx \\sum_i w_i\\,[g(\\sqrt q x_i) + g(-\\sqrt q x_i)] /
    (2\\sum_i w_i)`. For ReLU, :math:`\\mathbb E[\\phi'(z)^2]` is exactly 1/2.

    Example:
        >>> expect(torch.relu, 3.0, derivative=True)
        0.5
    """
    if not (math.isfinite(q) and q >= 0):
        raise ConfigError(f"the variance q must be a finite number >= 0, got {q}")
    if nodes < 2 or nodes % 2:
        raise ConfigError(f"nodes must be an even number >= 2, got {nodes}")
    xp, wp = _hermite(nodes)
    s = math.sqrt(q)
    t = torch.cat([s * xp, -s * xp])
    vals = _derivative(f, t) if derivative else f(t)
    vals = vals.detach().double().cpu().reshape(-1) ** power
    k = len(xp)
    pair = vals[:k] + vals[k:]
    return math.fsum((wp * pair).tolist()) / (2 * math.fsum(wp.tolist()))


def hessian_variance(
    activation: Callable[[torch.Tensor], torch.Tensor],
    fan: int,
    q: float = 1.0,
    keep_prob: float = 1.0,
    nodes: int = 100,
) -> float:
    """:math:`\\sigma^2 = p / (\\mathrm{fan}\\cdot\\mathbb E_{z\\sim\\mathcal N(0,q)}[\\phi'(z)^2])`.

    Example:
        >>> hessian_variance(torch.relu, 50)   # He: 2 / fan
        0.04
    """
    if fan < 1:
        raise ConfigError(f"fan must be a positive integer, got {fan}")
    e = expect(activation, q, derivative=True, nodes=nodes)
    if not e > 0:
        raise ConfigError(f"E[phi'(z)^2] is {e} at q={q}: the activation has no slope there")
    return keep_prob / (fan * e)
