"""Hessian-norm initialization: Skorski, Temperoni, Theobald, "Revisiting Weight Initialization
of Deep Neural Networks", ACML 2021 (arXiv:2004.09506).

Principle: keep the norm of every layer's loss Hessian from exploding or vanishing with depth.
For a dense or convolutional layer :math:`z = Wx`, the Gauss–Newton part of its Hessian block
is :math:`H_W = (xx^\\top) \\otimes H_z`, and backwards
:math:`H_{z_k} \\approx D_k W_{k+1}^\\top H_{z_{k+1}} W_{k+1} D_k` with
:math:`D_k = \\mathrm{diag}(\\phi'(z_k))` (times the dropout mask over the keep probability
:math:`p`). Keeping the per-layer factor at 1 gives

.. math::

    \\sigma^2 = \\frac{p}{\\mathrm{fan} \\cdot \\mathbb E_{z\\sim\\mathcal N(0, q)}[\\phi'(z)^2]},

which is He's :math:`2/\\mathrm{fan}` for ReLU, about :math:`1/\\mathrm{fan}` for tanh and
:math:`16/\\mathrm{fan}` for sigmoid at small :math:`q` (the spec's reconstruction; the paper's
exact normalization could not be checked).

Two modes (``HessianInitConfig.mode``):

``"analytic"`` (default)
    The activation :math:`\\phi` that follows each layer is found by tracing one forward pass
    (:func:`trace_layers`); :math:`\\mathbb E[\\phi'(z)^2]` is computed by Gauss–Hermite
    quadrature for any elementwise callable (:func:`expect`), at the pre-activation variance
    :math:`q` of a mean-field forward pass: :math:`q = \\sigma^2\\,\\mathrm{fan_{in}}\\,m +
    \\overline{b^2}` with :math:`m` the layer's input second moment, measured on the first
    batch after the earlier layers were set (in a chain this is the previous layer's
    :math:`\\mathbb E[\\phi(z)^2]`), solved with :math:`\\sigma^2(q)` as a fixed point. Each weight
    tensor is then rescaled to the target norm :math:`\\|W\\| = \\sqrt{\\mathrm{numel}\\cdot
    \\sigma^2}` (its uncentered second moment :math:`\\|W\\|^2/\\mathrm{numel}` becomes exactly
    :math:`\\sigma^2`), direction kept: scale :math:`\\alpha = \\sqrt{\\mathrm{numel}\\,\\sigma^2}
    /\\|W^0\\|`. Biases and norm gains keep scale 1.

``"data"``
    LSUV-style: measure every weight tensor's Hessian block norm (spectral by Lanczos, or
    Frobenius by Hutch++) on fixed batches and rescale until all sit within ``tol`` of the
    target — their geometric mean (``target="equal"``) or :math:`1/\\mathrm{lr}`
    (``target="lr"``).

Fan: ``fan="in"`` (default) uses :math:`\\mathrm{fan_{in}}` = ``weight[0].numel()`` (the
``torch.nn.init`` convention), like He's and PyTorch's ``kaiming_*`` default; ``fan="out"``
uses :math:`\\mathrm{fan_{out}}`, which is what the backward recursion above literally
multiplies by. They agree for square layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from initopt.core import dist
from initopt.core.activations import LayerInfo, trace_layers
from initopt.core.batches import Batch
from initopt.core.curvature import HessianOperator, hutchpp, top_eigenvalues
from initopt.core.meanfield import expect, hessian_variance
from initopt.core.progress import Progress
from initopt.errors import ConfigError, LossError
from initopt.methods.base import Method, Outcome, Problem, register

__all__ = [
    "HessianInit",
    "HessianInitConfig",
    "LayerInfo",
    "expect",
    "hessian_normal_",
    "hessian_variance",
    "trace_layers",
]


# ---- configuration ------------------------------------------------------------------------


@dataclass(frozen=True)
class HessianInitConfig:
    """Settings of the Hessian-norm initialization.

    Attributes:
        mode: ``"analytic"`` (closed-form per-layer variance) or ``"data"`` (measured Hessian norms).
        fan: ``"in"`` or ``"out"`` in :math:`\\sigma^2 = p/(\\mathrm{fan}\\,\\mathbb E[\\phi'^2])` (analytic).
        keep_prob: dropout keep probability :math:`p` for every layer (``None``: found per layer
            from the dropouts that follow it; 1 without dropout).
        redraw: write fresh :math:`\\mathcal N(0,\\sigma^2)` draws instead of rescaling. Not
            expressible as a scale, so :func:`initopt.initialize_` rejects it; call
            :func:`hessian_normal_` instead.
        strict: analytic mode: raise :class:`~initopt.ConfigError` naming a layer whose activation
            cannot be determined (default: leave it at scale 1, with a note in the history).
        nodes: Gauss–Hermite nodes (even).
        target: data mode: ``"equal"`` (all blocks at their geometric mean) or ``"lr"``
            (:math:`\\|H\\| = 1/\\mathrm{lr}`).
        lr: the training learning rate for ``target="lr"``.
        norm: data mode: ``"spectral"`` (Lanczos) or ``"frobenius"`` (Hutch++).
        iterations: Lanczos steps per spectral norm estimate.
        probes: products per Frobenius estimate (Hutch++).
        batches: number of batches the measured Hessian is averaged over.
        tol: data mode: stop when every block is within this relative distance of the target.
        steps: analytic: at most this many sweeps over the layers (stops when a sweep changes
            nothing); data: at most this many measurements after the first (each measures every
            weight's Hessian-block norm; a finite-difference Jacobian takes one per weight).
    """

    mode: str = "analytic"
    fan: str = "in"
    keep_prob: float | None = None
    redraw: bool = False
    strict: bool = False
    nodes: int = 100
    target: str = "equal"
    lr: float | None = None
    norm: str = "spectral"
    iterations: int = 20
    probes: int = 30
    batches: int = 1
    tol: float = 0.1
    steps: int = 20

    def __post_init__(self) -> None:
        if self.mode not in ("analytic", "data"):
            raise ConfigError(f"hessian: mode must be 'analytic' or 'data', got {self.mode!r}")
        if self.fan not in ("in", "out"):
            raise ConfigError(f"hessian: fan must be 'in' or 'out', got {self.fan!r}")
        if self.keep_prob is not None and not (0 < self.keep_prob <= 1):
            raise ConfigError(f"hessian: keep_prob must be in (0, 1] or None, got {self.keep_prob!r}")
        if self.redraw:
            raise ConfigError(
                "hessian: redraw=True writes fresh N(0, sigma^2) draws, which initialize_ cannot express "
                "(it only rescales tensors, directions kept); call "
                "initopt.methods.hessian.hessian_normal_(model, data, ...) instead"
            )
        if self.nodes < 2 or self.nodes % 2:
            raise ConfigError(f"hessian: nodes must be an even number >= 2, got {self.nodes!r}")
        if self.target not in ("equal", "lr"):
            raise ConfigError(f"hessian: target must be 'equal' or 'lr', got {self.target!r}")
        if self.target == "lr" and not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ConfigError(f"hessian: target='lr' needs the training learning rate lr > 0, got {self.lr!r}")
        if self.target == "equal" and self.lr is not None:
            raise ConfigError("hessian: lr is only used with target='lr'")
        if self.norm not in ("spectral", "frobenius"):
            raise ConfigError(f"hessian: norm must be 'spectral' or 'frobenius', got {self.norm!r}")
        for k in ("iterations", "probes", "batches"):
            v = getattr(self, k)
            if not (isinstance(v, int) and v >= 1):
                raise ConfigError(f"hessian: {k} must be a positive integer, got {v!r}")
        if not (0 < self.tol < 1):
            raise ConfigError(f"hessian: tol must be in (0, 1), got {self.tol!r}")


# ---- the method ---------------------------------------------------------------------------


def _solve_q(phi: Callable, m: float, b2: float, fan_in: int, fan: int, p: float, nodes: int) -> tuple[float, float]:
    """Fixed point :math:`q = \\sigma^2(q)\\,\\mathrm{fan_{in}}\\,m + \\overline{b^2}`; returns (q, E[phi'^2])."""
    q = p * m + b2
    e = expect(phi, q, derivative=True, nodes=nodes)
    for _ in range(200):
        if not e > 0:
            break
        q_new = p * fan_in * m / (fan * e) + b2
        if abs(q_new - q) <= 1e-12 * max(q, 1e-300):
            q = q_new
            break
        q = 0.5 * (q + q_new) if q_new > 4 * q or q_new < 0.25 * q else q_new
        e = expect(phi, q, derivative=True, nodes=nodes)
    return q, e


@register
class HessianInit(Method):
    """Hessian-norm initialization (Skorski et al. 2021): per-layer scales that keep the
    loss-Hessian blocks from exploding or vanishing with depth."""

    name = "hessian"
    Config = HessianInitConfig
    summary = "per-layer variance p/(fan E[phi'(z)^2]) (analytic) or measured Hessian-block norms (data)"

    @property
    def mode(self) -> str:
        """Search mode: training mode with dropout off (``config.mode`` names the variant)."""
        return "train"

    def search(self, problem: Problem, steps: int, progress: Progress) -> Outcome:
        if self.config.mode == "analytic":
            return self._analytic(problem, steps, progress)
        return self._data(problem, steps, progress)

    # -- analytic -------------------------------------------------------------------------

    def _moments(
        self, problem: Problem, alpha: torch.Tensor, layers: Sequence[LayerInfo]
    ) -> tuple[dict[str, float], float]:
        """One forward pass and loss at ``alpha``: input second moment of each layer, and the loss."""
        model, ev = problem.model, problem.evaluator
        modules = dict(model.named_modules())
        acc: dict[str, torch.Tensor] = {}
        handles = []

        def pre(name: str) -> Callable[..., None]:
            def hook(mod: nn.Module, args: tuple) -> None:
                if name not in acc and args and isinstance(args[0], torch.Tensor):
                    acc[name] = args[0].detach().double().pow(2).mean()

            return hook

        try:
            for info in layers:
                handles.append(modules[info.module].register_forward_pre_hook(pre(info.module)))
            with torch.no_grad():
                loss = ev.loss(problem.space.scaled(alpha), problem.batches.first)
        finally:
            for h in handles:
                h.remove()
        names = list(acc)
        # distributed: moments and loss averaged over ranks, so every rank sets the same variances
        vals = dist.all_reduce_mean(torch.stack([acc[n] for n in names] + [loss.detach().double()]).cpu()).tolist()
        return dict(zip(names, vals[:-1], strict=True)), vals[-1]

    def _analytic(self, problem: Problem, steps: int, progress: Progress) -> Outcome:
        cfg = self.config
        space = problem.space
        alpha = space.ones()
        history: list[dict[str, Any]] = []
        if steps == 0:
            return Outcome(alpha=alpha, history=history)
        layers, loss0 = trace_layers(problem.model, problem.evaluator, problem.batches.first)
        check = dist.mean_floats([float(loss0.detach())])[0]
        if not math.isfinite(check):
            raise LossError(f"hessian: the loss on the first batch is {check}")
        usable = [info for info in layers if info.note is None]
        for info in layers:
            if info.note is not None:
                if cfg.strict:
                    raise ConfigError(
                        f"hessian: cannot determine the activation after layer {info.module!r} "
                        f"({info.param}): {info.note}"
                    )
                history.append({"sweep": 0, "layer": info.module, "param": info.param, "skipped": info.note})
        touched = {info.param for info in usable}
        for b in space.blocks:
            if b.role == "weight" and b.name not in touched and all(b.name != i.param for i in layers):
                history.append(
                    {"sweep": 0, "layer": None, "param": b.name, "skipped": "not the weight of an affine layer call"}
                )
        params = {n: p for n, p in problem.model.named_parameters()}
        b2 = {}
        for info in usable:
            bias = params.get(info.bias) if info.bias else None
            b2[info.module] = float(bias.detach().double().pow(2).mean()) if bias is not None else 0.0
        before = {"loss": check}
        loss = check
        for sweep in range(1, steps + 1):
            old = alpha.clone()
            for k, info in enumerate(usable):
                moments, loss = self._moments(problem, alpha, usable[k:])
                if sweep == 1 and k == 0:
                    before["loss"] = loss
                m = moments.get(info.module, 0.0)
                p = cfg.keep_prob if cfg.keep_prob is not None else info.keep_prob
                fan = info.fan_in if cfg.fan == "in" else info.fan_out
                assert info.activation is not None and info.block is not None
                q, e = _solve_q(info.activation, m, b2[info.module], info.fan_in, fan, p, cfg.nodes)
                if not e > 0:
                    history.append(
                        {
                            "sweep": sweep,
                            "layer": info.module,
                            "param": info.param,
                            "skipped": f"E[phi'(z)^2] = {e} at q = {q}: no slope",
                        }
                    )
                    continue
                var = p / (fan * e)
                norm0 = space.blocks[info.block].init_norm
                a = math.sqrt(var * info.numel) / norm0
                alpha[info.block] = a
                history.append(
                    {
                        "sweep": sweep,
                        "layer": info.module,
                        "param": info.param,
                        "activation": info.activation_name,
                        "keep_prob": p,
                        "fan_in": info.fan_in,
                        "fan": fan,
                        "input_moment": m,
                        "q": q,
                        "e_dphi2": e,
                        "variance": var,
                        "scale": a,
                        "loss": loss,
                    }
                )
                progress.update(layer=info.module, scale=f"{a:.3g}")
            if usable:
                _, loss = self._moments(problem, alpha, [])
            if not usable or bool(torch.allclose(alpha, old, rtol=1e-9, atol=0)):
                break
        return Outcome(alpha=alpha, history=history, before=before, after={"loss": loss})

    # -- data-driven ----------------------------------------------------------------------

    def _norms(self, problem: Problem, alpha: torch.Tensor, idx: list[int], batches: list[Batch]) -> torch.Tensor:
        """Hessian-block norm of each selected tensor at ``alpha`` (float64, CPU)."""
        cfg, ev, space = self.config, problem.evaluator, problem.space
        tensors = [t.detach() for t in space.scaled(alpha)]
        closures = [(lambda ts, b=b: ev.loss(list(ts), b)) for b in batches]
        root = HessianOperator(closures, tensors, select=idx, weights=[1.0] * len(batches))
        gen = torch.Generator(device=space.device)
        out = []
        for i in idx:
            gen.manual_seed(problem.seed * 1000003 + i)  # the same probes at every iteration
            op = root.block([i])
            if cfg.norm == "spectral":
                lam = top_eigenvalues(op, 1, iters=cfg.iterations, tol=1e-4, generator=gen)
                out.append(lam.abs()[0])
            else:
                _, fro2 = hutchpp(op, cfg.probes, generator=gen)
                out.append(fro2.clamp_min(0).sqrt().double().cpu())
        root.release()
        return dist.all_reduce_mean(torch.stack(out).double().cpu())  # distributed: mean over ranks

    def _data(self, problem: Problem, steps: int, progress: Progress) -> Outcome:
        """Rescale weights until their Hessian-block norms reach the target: a damped Newton
        iteration on :math:`y_i(u) = \\log\\|H_{W_i}\\|` over log scales :math:`u_i = \\log\\alpha_i`.

        The Jacobian :math:`\\partial y/\\partial u` starts from the homogeneous model: in a network
        positively homogeneous in each weight (ReLU, no normalization), :math:`\\|H_{W_i}\\|`
        scales with :math:`\\prod_{j\\ne i}\\alpha_j^2`, i.e. :math:`J = 2(\\mathbf 1\\mathbf 1^\\top - I)`
        (its equal-norm step is LSUV-like, :math:`\\Delta u_i = (y_i - \\bar y)/2`). Every new
        measurement updates it (Broyden's rank-one update); when a step has to be halved three
        times the Jacobian is measured by finite differences (one measurement per weight).
        ``target="equal"`` solves for :math:`y_i = \\bar y` with :math:`\\sum_i u_i` fixed (the
        overall level is kept); ``target="lr"`` for :math:`y_i = \\log(1/\\mathrm{lr})`. Steps are
        capped at a factor 4 per scale; a step is accepted when the largest log-error falls, else
        halved. Each measurement (``L`` Hessian-block norm estimates) is one history entry.
        """
        cfg, space = self.config, problem.space
        alpha = space.ones()
        history: list[dict[str, Any]] = []
        if steps == 0:
            return Outcome(alpha=alpha, history=history)
        idx = [i for i, b in enumerate(space.blocks) if b.role == "weight" and b.scalable]
        if not idx:
            history.append({"step": 0, "skipped": "no weight tensor (>= 2 dimensions) to rescale"})
            return Outcome(alpha=alpha, history=history)
        batches = [problem.batches.first] + [problem.next_batch() for _ in range(cfg.batches - 1)]
        L = len(idx)
        names = [space.blocks[i].name for i in idx]
        cap = math.log(4.0)
        equal = cfg.target == "equal"
        ones = torch.ones(L, dtype=torch.float64)

        def measure(u: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
            a = space.ones()
            a[idx] = torch.exp(u).to(a.dtype)
            norms = self._norms(problem, a, idx, batches)
            if not bool(torch.isfinite(norms).all()) or not bool((norms > 0).all()):
                raise LossError(
                    f"hessian: Hessian-block norms must be finite and positive, got {norms.tolist()} "
                    f"for {names}; the loss may be flat (dead units) or diverging"
                )
            y = norms.log()
            tgt = float(y.mean()) if equal else -math.log(cfg.lr)
            rel = norms / math.exp(tgt) - 1
            history.append(
                {
                    "step": len(history),
                    "kind": kind,
                    "target": math.exp(tgt),
                    "max_rel_error": float(rel.abs().max()),
                    "norms": dict(zip(names, norms.tolist(), strict=True)),
                }
            )
            progress.update(err=f"{float(rel.abs().max()):.3g}")
            return a, y

        def residual(y: torch.Tensor) -> torch.Tensor:
            return y - y.mean() if equal else y + math.log(cfg.lr)

        def error(y: torch.Tensor) -> float:
            return float((torch.exp(residual(y)) - 1).abs().max())

        u = torch.zeros(L, dtype=torch.float64)
        alpha, y = measure(u, "start")
        before = {"max_rel_error": error(y), "norm_spread": float(torch.exp(y.max() - y.min()))}
        J = 2.0 * (torch.ones(L, L, dtype=torch.float64) - torch.eye(L, dtype=torch.float64))
        if L == 1:
            J = torch.full((1, 1), 2.0, dtype=torch.float64)
        shrink, fails, measured_fd = 1.0, 0, False
        while error(y) > cfg.tol and len(history) < steps + 1:
            if fails >= 3 and not measured_fd and len(history) + L <= steps + 1:
                h = 0.25
                cols = []
                for j in range(L):
                    e = torch.zeros(L, dtype=torch.float64)
                    e[j] = h
                    _, yj = measure(u + e, "jacobian")
                    cols.append((yj - y) / h)
                J = torch.stack(cols, 1)
                measured_fd, shrink, fails = True, 1.0, 0
                continue
            F = residual(y)
            if equal:
                P = torch.eye(L, dtype=torch.float64) - 1.0 / L
                A = torch.cat([P @ J, ones.unsqueeze(0)], 0)
                rhs = torch.cat([-F, torch.zeros(1, dtype=torch.float64)])
            else:
                A, rhs = J, -F
            d = torch.linalg.lstsq(A, rhs.unsqueeze(1)).solution.squeeze(1)
            big = float(d.abs().max())
            if big > cap:
                d = d * (cap / big)
            du = shrink * d
            a_new, y_new = measure(u + du, "step")
            J = J + torch.outer((y_new - y) - J @ du, du) / max(float(du @ du), 1e-12)
            if error(y_new) < error(y):
                u, y, alpha = u + du, y_new, a_new
                shrink, fails = min(1.0, 2 * shrink), 0
                history[-1]["accepted"] = True
            else:
                shrink, fails = shrink / 2, fails + 1
                history[-1]["accepted"] = False
        history[-1]["converged"] = error(y) <= cfg.tol
        history[-1]["final_scales"] = dict(zip(names, torch.exp(u).tolist(), strict=True))
        after = {"max_rel_error": error(y), "norm_spread": float(torch.exp(y.max() - y.min()))}
        return Outcome(alpha=alpha, history=history, before=before, after=after)


def hessian_normal_(
    model: nn.Module,
    data: Any,
    *,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    seed: int = 0,
    **config: Any,
) -> dict[str, float]:
    """The redraw variant of the analytic rule: fresh :math:`W \\sim \\mathcal N(0, \\sigma^2)`.

    Runs ``initopt.initialize_(model, data, "hessian", mode="analytic", ...)`` to find
    :math:`\\sigma^2` per layer, then overwrites each of those weights in place with a normal draw
    from a generator seeded with ``seed`` (``Parameter`` objects are kept). Layers whose activation
    could not be determined are left as they were.

    Returns:
        ``{weight name: sigma}`` for every redrawn tensor.
    """
    if config.get("mode", "analytic") != "analytic":
        raise ConfigError("hessian_normal_ redraws with the analytic rule; mode must be 'analytic'")
    res = HessianInit(**config).initialize_(model, data, loss_fn=loss_fn, forward_fn=forward_fn, seed=seed)
    last: dict[str, float] = {}
    for h in res.history:
        if "variance" in h:
            last[h["param"]] = math.sqrt(h["variance"])
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, std in last.items():
            p = named[name]
            g = torch.Generator(device=p.device).manual_seed(seed + sum(map(ord, name)))
            p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype) * std)
    return last
