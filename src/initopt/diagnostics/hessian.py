"""The loss Hessian as a read-only diagnostic: eigenvalues, trace, Frobenius norm, spectral
density, and a tracker that records per-layer Hessian norms during training.

Skorski, Temperoni, Theobald (ACML 2021, arXiv:2004.09506) track the spectral and Frobenius
norm of each layer's Hessian block :math:`\\nabla^2_{W_l} L` while training: a badly scaled
layer shows curvature that explodes and oscillates (too large a scale) or vanishes (too small).
All estimates are matrix-free (:mod:`initopt.core.curvature`): Lanczos for the largest-magnitude
eigenvalues (:math:`\\|H\\|_2 = |\\lambda|_{\\max}`), Hutchinson/Hutch++ for
:math:`\\operatorname{tr}H` and :math:`\\|H\\|_F^2 = \\mathbb E\\|Hv\\|^2`, stochastic Lanczos
quadrature for the density.

Nothing here changes the model: not its parameters, buffers (BatchNorm runs on copies), modes
(restored on exit; dropout off while measuring) or ``.grad``.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from initopt.core.batches import Batch, check_finite, is_single_batch, move_batch
from initopt.core.curvature import (
    HessianOperator,
    SpectralDensity,
    gauss_newton_operator,
    hessian_operator,
    hutchinson,
    hutchpp,
    slq,
    top_eigenvalues,
)
from initopt.core.functional import Evaluator, evaluation
from initopt.errors import ConfigError, DataError

__all__ = [
    "HessianTracker",
    "hessian_eigenvalues",
    "hessian_frobenius",
    "hessian_spectral_density",
    "hessian_trace",
]

LossFn = Callable[[Any, Batch], torch.Tensor] | None
ForwardFn = Callable[[nn.Module, Batch], Any] | None


def _as_batches(data: Any, num_batches: int | None) -> list[Batch]:
    """One batch, or the first ``num_batches`` (``None``: all) of an iterable of batches."""
    if data is None:
        raise DataError("no batch given; pass one batch or an iterable of batches")
    if is_single_batch(data):
        return [data]
    if not isinstance(data, Iterable):
        raise DataError(f"expected a batch or an iterable of batches, got {type(data).__name__}")
    batches = list(itertools.islice(data, num_batches)) if num_batches is not None else list(data)
    if not batches:
        raise DataError("the data yielded no batch")
    return batches


def _operator(ev: Evaluator, batches: list[Batch], curvature: str, method: str) -> Any:
    batches = [move_batch(b, ev.space.device) for b in batches]
    if curvature == "hessian":
        return hessian_operator(ev, batches, method=method)
    if curvature == "gauss_newton":
        return gauss_newton_operator(ev, batches)
    raise ConfigError(f"curvature must be 'hessian' or 'gauss_newton', got {curvature!r}")


def _generator(ev: Evaluator, seed: int) -> torch.Generator:
    return torch.Generator(device=ev.space.device).manual_seed(int(seed))


def hessian_eigenvalues(
    model: nn.Module,
    batch: Any,
    *,
    loss_fn: LossFn = None,
    k: int = 1,
    params: Any = None,
    seed: int = 0,
    forward_fn: ForwardFn = None,
    iters: int | None = None,
    tol: float | None = 1e-6,
    num_batches: int | None = None,
    curvature: str = "hessian",
    method: str = "double_backward",
    mode: str = "train",
) -> list[float]:
    """The ``k`` eigenvalues of largest magnitude of the loss Hessian, by Lanczos.

    Args:
        model: the network (only read).
        batch: one batch, or an iterable of batches (the Hessian of their mean loss; the first
            ``num_batches``).
        loss_fn, forward_fn: as :func:`initopt.initialize_`.
        k: how many eigenvalues.
        params: a block (names, or a module prefix such as ``"layers.3"``); ``None``: all.
        seed: seed of the Lanczos start vector.
        iters, tol: Lanczos steps (``None``: ``min(n, max(30, 4k))``) and early-stop tolerance.
        curvature: ``"hessian"`` or ``"gauss_newton"`` (the Gauss–Newton part alone).
        method: Hessian-vector product, see :class:`~initopt.core.curvature.HessianOperator`.
        mode: ``"train"`` (BatchNorm on batch statistics, dropout off) or ``"eval"``.

    Returns:
        ``k`` floats ordered by decreasing magnitude; ``abs(result[0])`` is :math:`\\|H\\|_2`.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> batch = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
        >>> len(hessian_eigenvalues(net, batch, k=2))
        2
    """
    batches = _as_batches(batch, num_batches)
    with evaluation(model, loss_fn=loss_fn, forward_fn=forward_fn, params=params, mode=mode) as ev:
        op = _operator(ev, batches, curvature, method)
        vals = top_eigenvalues(op, k, iters=iters, tol=tol, generator=_generator(ev, seed))
    check_finite("the Hessian eigenvalue estimate", vals)
    return [float(v) for v in vals.tolist()]


def hessian_trace(
    model: nn.Module,
    batch: Any,
    *,
    loss_fn: LossFn = None,
    params: Any = None,
    probes: int = 100,
    seed: int = 0,
    forward_fn: ForwardFn = None,
    estimator: str = "hutchinson",
    num_batches: int | None = None,
    curvature: str = "hessian",
    method: str = "double_backward",
    mode: str = "train",
) -> float:
    """:math:`\\operatorname{tr} H` by Hutchinson (:math:`\\mathbb E[v^\\top Hv]`, Rademacher
    :math:`v`, ``probes`` products) or ``estimator="hutchpp"``. Arguments as
    :func:`hessian_eigenvalues`."""
    return _trace_frob(
        model, batch, loss_fn, params, probes, seed, forward_fn, estimator, num_batches, curvature, method, mode
    )[0]


def hessian_frobenius(
    model: nn.Module,
    batch: Any,
    *,
    loss_fn: LossFn = None,
    params: Any = None,
    probes: int = 100,
    seed: int = 0,
    forward_fn: ForwardFn = None,
    estimator: str = "hutchinson",
    num_batches: int | None = None,
    curvature: str = "hessian",
    method: str = "double_backward",
    mode: str = "train",
) -> float:
    """The Frobenius norm :math:`\\|H\\|_F = \\sqrt{\\mathbb E\\|Hv\\|^2}` (Hutchinson on
    :math:`H^2`, or ``estimator="hutchpp"``). Arguments as :func:`hessian_eigenvalues`.

    Returns the norm, not its square.
    """
    fro2 = _trace_frob(
        model, batch, loss_fn, params, probes, seed, forward_fn, estimator, num_batches, curvature, method, mode
    )[1]
    return math.sqrt(max(fro2, 0.0))


def _trace_frob(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    params: Any,
    probes: int,
    seed: int,
    forward_fn: ForwardFn,
    estimator: str,
    num_batches: int | None,
    curvature: str,
    method: str,
    mode: str,
) -> tuple[float, float]:
    if estimator not in ("hutchinson", "hutchpp"):
        raise ConfigError(f"estimator must be 'hutchinson' or 'hutchpp', got {estimator!r}")
    batches = _as_batches(batch, num_batches)
    with evaluation(model, loss_fn=loss_fn, forward_fn=forward_fn, params=params, mode=mode) as ev:
        op = _operator(ev, batches, curvature, method)
        est = hutchinson if estimator == "hutchinson" else hutchpp
        tr, fro2 = est(op, probes, generator=_generator(ev, seed))
    t, f = torch.stack([tr, fro2]).double().tolist()
    check_finite("the Hessian trace / Frobenius estimate", t, f)
    return t, f


def hessian_spectral_density(
    model: nn.Module,
    batch: Any,
    *,
    loss_fn: LossFn = None,
    params: Any = None,
    probes: int = 10,
    iters: int = 30,
    seed: int = 0,
    forward_fn: ForwardFn = None,
    num_batches: int | None = None,
    curvature: str = "hessian",
    method: str = "double_backward",
    mode: str = "train",
) -> SpectralDensity:
    """Spectral density of the Hessian by stochastic Lanczos quadrature.

    ``probes`` Rademacher starts, ``iters`` Lanczos steps each. The result's ``nodes`` and
    ``weights`` give the density; ``.smooth(grid)`` a Gaussian-smoothed curve, ``.mean()``
    :math:`\\approx \\operatorname{tr}H/n`. Other arguments as :func:`hessian_eigenvalues`.
    """
    batches = _as_batches(batch, num_batches)
    with evaluation(model, loss_fn=loss_fn, forward_fn=forward_fn, params=params, mode=mode) as ev:
        op = _operator(ev, batches, curvature, method)
        density = slq(op, probes=probes, iters=iters, generator=_generator(ev, seed))
    check_finite("the Hessian spectral density", density.nodes, density.weights)
    return density


# ---- tracking -----------------------------------------------------------------------------


def _default_layers(model: nn.Module) -> dict[str, list[str]]:
    """One layer per module that directly owns trainable parameters (its own tensors only)."""
    layers: dict[str, list[str]] = {}
    seen: set[int] = set()
    for mname, mod in model.named_modules():
        own = [
            (f"{mname}.{n}" if mname else n, p)
            for n, p in mod.named_parameters(recurse=False)
            if p.requires_grad and id(p) not in seen
        ]
        for _, p in own:
            seen.add(id(p))
        if own:
            layers[mname or "(root)"] = [n for n, _ in own]
    return layers


class HessianTracker:
    """Records per-layer Hessian norms every ``every`` steps of any training loop.

    For each layer :math:`l` (a block of parameters) it estimates the spectral norm
    :math:`\\|\\nabla^2_{W_l}L\\|_2` (Lanczos, ``iters`` products) and the Frobenius norm
    :math:`\\|\\nabla^2_{W_l}L\\|_F` (Hutchinson, ``probes`` products) on a fixed batch; the cost
    of one measurement is bounded by one gradient with its graph plus
    ``len(layers) * (iters + probes)`` second backward passes.

    Args:
        model: the network being trained (only read).
        batch: the batch the Hessian is measured on (``None``: pass one to :meth:`step`). A
            fixed batch makes the curves comparable over time.
        loss_fn, forward_fn: as :func:`initopt.initialize_`.
        every: measure at steps 0, every, 2·every, ...
        layers: ``None`` (one layer per module owning parameters), a list of module prefixes,
            or ``{label: names or prefix}``.
        iters: Lanczos steps for the spectral norm; ``probes``: Hutchinson products for the
            Frobenius norm (``0`` skips it).
        seed: probes and start vectors are drawn from a generator seeded with it (the same at
            every measurement).
        mode: ``"train"`` (dropout off, BatchNorm on batch statistics) or ``"eval"``.

    Use it by calling :meth:`step` once per training step, or :meth:`attach` it to an optimizer
    (a step post-hook). Results: :attr:`records`, :meth:`series`, :meth:`to_dict`, :meth:`plot`.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> batch = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
        >>> tracker = HessianTracker(net, batch, every=2, iters=5, probes=5)
        >>> for _ in range(3):
        ...     _ = tracker.step()
        >>> sorted(tracker.series("spectral"))
        ['0', '2']
    """

    def __init__(
        self,
        model: nn.Module,
        batch: Batch | None = None,
        *,
        loss_fn: LossFn = None,
        forward_fn: ForwardFn = None,
        every: int = 10,
        layers: Sequence[str] | Mapping[str, Any] | None = None,
        iters: int = 10,
        probes: int = 10,
        seed: int = 0,
        mode: str = "train",
    ) -> None:
        if not (isinstance(every, int) and every >= 1):
            raise ConfigError(f"every must be a positive integer, got {every!r}")
        if iters < 1 or probes < 0:
            raise ConfigError(f"iters must be >= 1 and probes >= 0, got {iters} and {probes}")
        self.model = model
        self.batch = batch
        self.loss_fn = loss_fn
        self.forward_fn = forward_fn
        self.every = every
        self.iters = iters
        self.probes = probes
        self.seed = seed
        self.mode = mode
        if layers is None:
            self.layers: dict[str, Any] = _default_layers(model)
        elif isinstance(layers, Mapping):
            self.layers = dict(layers)
        else:
            self.layers = {str(p): p for p in layers}
        if not self.layers:
            raise ConfigError("HessianTracker: no layers to track (the model has no trainable parameters)")
        self.records: list[dict[str, Any]] = []
        self.count = 0
        self._handle: Any = None

    # -- measuring ------------------------------------------------------------------------

    def _names(self) -> tuple[list[str], dict[str, list[str]]]:
        named = dict(self.model.named_parameters(remove_duplicate=False))
        per: dict[str, list[str]] = {}
        for label, sel in self.layers.items():
            if isinstance(sel, str):
                prefix = sel.rstrip(".")
                names = [n for n in named if n == prefix or n.startswith(prefix + ".")]
            else:
                names = list(sel)
            missing = [n for n in names if n not in named]
            if not names or missing:
                raise ConfigError(f"HessianTracker: layer {label!r} selects no known parameter ({sel!r})")
            per[label] = names
        union = sorted({n for names in per.values() for n in names})
        return union, per

    def measure(self, batch: Batch | None = None, *, step: int | None = None) -> list[dict[str, Any]]:
        """Measure now (whatever the step) and append one record per layer."""
        batch = self.batch if batch is None else batch
        if batch is None:
            raise DataError("HessianTracker: no batch; pass one to the constructor or to step()")
        step = self.count if step is None else step
        union, per = self._names()
        t0 = time.perf_counter()
        with evaluation(
            self.model, loss_fn=self.loss_fn, forward_fn=self.forward_fn, params=union, mode=self.mode
        ) as ev:
            b = move_batch(batch, ev.space.device)
            root = hessian_operator(ev, [b])
            index = {n: i for i, blk in enumerate(ev.space.blocks) for n in blk.names}
            gen = torch.Generator(device=ev.space.device)
            values: list[torch.Tensor] = []
            counts = []
            for names in per.values():
                op: HessianOperator = root.block(sorted({index[n] for n in names}))
                gen.manual_seed(self.seed)
                lam = top_eigenvalues(op, 1, iters=self.iters, tol=None, generator=gen)
                spec = lam.abs()[0].to(torch.float64)
                if self.probes:
                    _, fro2 = hutchinson(op, self.probes, generator=gen)
                    fro = fro2.clamp_min(0).sqrt().double().cpu()
                else:
                    fro = torch.tensor(math.nan, dtype=torch.float64)
                values += [spec, fro]
                counts.append(op.products)
            root.release()
        flat = torch.stack(values).tolist()
        check_finite("HessianTracker: a layer's Hessian norm", *(flat[0::2] + (flat[1::2] if self.probes else [])))
        seconds = time.perf_counter() - t0
        new = []
        for j, label in enumerate(per):
            rec = {
                "step": int(step),
                "layer": label,
                "spectral": flat[2 * j],
                "frobenius": flat[2 * j + 1],
                "products": counts[j],
                "seconds": seconds / len(per),
            }
            new.append(rec)
        self.records += new
        return new

    def step(self, batch: Batch | None = None) -> list[dict[str, Any]] | None:
        """Call once per training step; measures at steps 0, every, 2·every, ... (else returns None)."""
        try:
            if self.count % self.every == 0:
                return self.measure(batch, step=self.count)
            return None
        finally:
            self.count += 1

    __call__ = step

    def attach(self, optimizer: torch.optim.Optimizer) -> HessianTracker:
        """Call :meth:`step` after every ``optimizer.step()`` (a step post-hook); :meth:`detach` removes it."""
        self.detach()
        self._handle = optimizer.register_step_post_hook(lambda opt, args, kwargs: self.step())
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    # -- results --------------------------------------------------------------------------

    def series(self, norm: str = "spectral") -> dict[str, dict[str, list[float]]]:
        """``{layer: {"step": [...], "value": [...]}}`` for ``norm`` in ``spectral``, ``frobenius``."""
        if norm not in ("spectral", "frobenius"):
            raise ConfigError(f"norm must be 'spectral' or 'frobenius', got {norm!r}")
        out: dict[str, dict[str, list[float]]] = {}
        for r in self.records:
            s = out.setdefault(r["layer"], {"step": [], "value": []})
            s["step"].append(r["step"])
            s["value"].append(r[norm])
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: settings and every record."""
        return {
            "every": self.every,
            "iters": self.iters,
            "probes": self.probes,
            "seed": self.seed,
            "mode": self.mode,
            "layers": {k: v if isinstance(v, str) else list(v) for k, v in self.layers.items()},
            "records": [
                {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
                for r in self.records
            ],
        }

    def plot(self, path: Any, *, title: str | None = None) -> Any:
        """Plot spectral and Frobenius norm per layer against the step (log scale) into ``path``.

        Needs matplotlib (``pip install 'initopt[plots]'``).
        """
        try:
            import matplotlib

            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError("HessianTracker.plot needs matplotlib: pip install 'initopt[plots]'") from e
        if not self.records:
            raise DataError("HessianTracker.plot: nothing recorded yet")
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for ax, norm in zip(axes, ("spectral", "frobenius"), strict=True):
            for label, s in self.series(norm).items():
                ax.plot(s["step"], s["value"], label=label, lw=1.2)
            ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_ylabel(f"{norm} norm of the layer's Hessian")
        axes[0].legend(fontsize=7)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path
