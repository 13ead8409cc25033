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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from initopt.core import dist
from initopt.core.affine import fname, record_affine, tensors_in
from initopt.core.batches import Batch
from initopt.core.blocks import ScaleSpace
from initopt.core.curvature import HessianOperator, hutchpp, top_eigenvalues
from initopt.core.functional import DROPOUT_FUNCTIONS, Evaluator, NoDropout, caller_handles_dropout
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

# ---- Gauss–Hermite expectations -----------------------------------------------------------

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


# ---- finding the activation that follows each layer ---------------------------------------

_SHAPE_ONLY = {
    torch.Tensor.view,
    torch.Tensor.reshape,
    torch.reshape,
    torch.Tensor.flatten,
    torch.flatten,
    torch.Tensor.contiguous,
    torch.Tensor.permute,
    torch.permute,
    torch.Tensor.transpose,
    torch.transpose,
    torch.Tensor.squeeze,
    torch.squeeze,
    torch.Tensor.unsqueeze,
    torch.unsqueeze,
    torch.Tensor.detach,
    torch.Tensor.clone,
    torch.clone,
    torch.Tensor.to,
    torch.Tensor.float,
    torch.Tensor.double,
    torch.Tensor.type_as,
    torch.Tensor.view_as,
    torch.Tensor.reshape_as,
}

_LOSSES = {
    torch.nn.functional.cross_entropy,
    torch.nn.functional.nll_loss,
    torch.nn.functional.log_softmax,
    torch.nn.functional.softmax,
    torch.nn.functional.mse_loss,
    torch.nn.functional.l1_loss,
    torch.nn.functional.smooth_l1_loss,
    torch.nn.functional.huber_loss,
    torch.nn.functional.binary_cross_entropy_with_logits,
    torch.nn.functional.kl_div,
    torch.log_softmax,
    torch.softmax,
    torch.Tensor.log_softmax,
    torch.Tensor.softmax,
}


class _Unary:
    """``func`` with every argument but the first fixed: :math:`t \\mapsto f(t, \\ldots)`."""

    def __init__(self, func: Any, args: tuple, kwargs: dict, name: str) -> None:
        self.func, self.kwargs, self.name = func, dict(kwargs), name
        if args:
            self.args = tuple(args[1:])
        else:
            self.args = ()
            self.kwargs.pop("input", None)
        if "inplace" in self.kwargs:
            self.kwargs["inplace"] = False

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return self.func(t, *self.args, **self.kwargs)


class _Compose:
    """Composition of elementwise maps, applied left to right."""

    def __init__(self, parts: Sequence[Callable[[torch.Tensor], torch.Tensor]]) -> None:
        self.parts = list(parts)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        for p in self.parts:
            t = p(t)
        return t

    @property
    def name(self) -> str:
        return " ∘ ".join(getattr(p, "name", "?") for p in reversed(self.parts)) or "identity"


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _classify(phi: _Unary, x: torch.Tensor) -> str | None:
    """``"nonlinear"`` / ``"affine"`` if ``phi`` acts as one scalar function on every entry of
    tensors shaped like ``x``, else ``None``."""
    try:
        with torch.no_grad():
            shape, kw = x.shape, {"dtype": x.dtype, "device": x.device}
            n = x.numel()
            if n < 2:
                return None
            outs = []
            for c in (-1.3, 0.7):
                y = phi(torch.full(shape, c, **kw))
                if not isinstance(y, torch.Tensor) or y.shape != shape:
                    return None
                y = y.reshape(-1)
                if not torch.allclose(y, y[:1].expand_as(y), rtol=1e-5, atol=1e-6):
                    return None
                outs.append(y[0])
            g = torch.Generator(device=x.device).manual_seed(0)
            t1 = torch.randn(n, generator=g, device=x.device).to(x.dtype)
            t2 = torch.randn(n, generator=g, device=x.device).to(x.dtype)
            t2[0] = t1[0]
            y1 = phi(t1.reshape(shape)).reshape(-1)
            y2 = phi(t2.reshape(shape)).reshape(-1)
            if not torch.allclose(y1[0], y2[0], rtol=1e-5, atol=1e-6):
                return None
            grid = torch.linspace(-3, 3, 13, **kw)
            t = grid.repeat(n // 13 + 1)[:n].reshape(shape)
            v = phi(t).reshape(-1)[:13].double()
            gd = grid.double()
            A = torch.stack([gd, torch.ones_like(gd)], 1)
            coef = torch.linalg.lstsq(A, v.unsqueeze(1)).solution
            resid = (A @ coef).squeeze(1) - v
            nonlinear = float(resid.abs().max()) > 1e-4 * (1.0 + float(v.abs().max()))
            return "nonlinear" if nonlinear else "affine"
    except Exception:
        return None


@dataclass
class LayerInfo:
    """One affine layer of the model and what follows it.

    Attributes:
        module: the module's name; ``param``: the name of its weight tensor (canonical block name).
        block: index of the weight in the :class:`~initopt.core.ScaleSpace` (``None``: not a block).
        fan_in, fan_out, numel: of the weight (``torch.nn.init`` convention).
        activation: the elementwise map :math:`\\phi` applied to the layer's output (identity for
            an output layer); ``None`` when it could not be determined.
        activation_name: how it was called (``"F.relu"``, ``"identity (feeds 3)"``, ...).
        keep_prob: product of the keep probabilities of dropouts between this layer and the next.
        bias: name of the layer's bias, if any.
        note: why the layer is left alone (``None``: usable).
    """

    module: str
    param: str
    block: int | None
    fan_in: int
    fan_out: int
    numel: int
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None
    activation_name: str = "unknown"
    keep_prob: float = 1.0
    bias: str | None = None
    note: str | None = None
    calls: int = 0


@dataclass
class _Chain:
    layer: LayerInfo
    current: torch.Tensor
    past: list[torch.Tensor] = field(default_factory=list)
    parts: list[Any] = field(default_factory=list)
    nonlinear: bool = False
    keep: float = 1.0
    state: str = "open"  # open | done | unknown
    end: str = ""

    def finish(self, state: str, end: str) -> None:
        self.state, self.end = state, end


class _Recorder(TorchFunctionMode):
    """Follows each layer's output through the ops that consume it during one forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.chains: list[_Chain] = []
        self.in_loss = False

    def _find(self, t: torch.Tensor) -> tuple[_Chain | None, bool]:
        for ch in self.chains:
            if ch.state == "open" and ch.current is t:
                return ch, True
        for ch in self.chains:
            if ch.state != "unknown" and any(p is t for p in ch.past):
                return ch, False
        return None, False

    def close_for_layer(self, t: torch.Tensor, layer: str) -> None:
        ch, current = self._find(t)
        if ch is None:
            return
        if not current:
            ch.finish("unknown", f"its output is used again by layer {layer!r}")
        elif ch.nonlinear:
            ch.finish("done", ch.end)
        else:
            ch.finish("done", f"identity (feeds {layer!r})")

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.chains or not tensors_in(out):
            return out
        first = args[0] if args else kwargs.get("input")
        seen: set[int] = set()
        for t in tensors_in(list(args) + list(kwargs.values())):
            if id(t) in seen:
                continue
            seen.add(id(t))
            ch, current = self._find(t)
            if ch is None:
                continue
            if not current:
                ch.finish("unknown", f"its output is used by more than one operation (also {fname(func)})")
                continue
            self._advance(ch, func, args, kwargs, out, t is first)
        return out

    def _advance(self, ch: _Chain, func: Any, args: tuple, kwargs: dict, out: Any, is_first: bool) -> None:
        name = fname(func)
        if not is_first or not isinstance(out, torch.Tensor):
            self._stop(ch, f"{name} (not an elementwise function of the layer output)")
            return
        if func in DROPOUT_FUNCTIONS:
            p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
            ch.keep *= 1.0 - float(p)
            self._move(ch, out)
            return
        if func in _SHAPE_ONLY:
            self._move(ch, out)
            return
        if func in _LOSSES or self.in_loss:
            self._stop(ch, f"{name} (the loss)", output=True)
            return
        phi = _Unary(func, args, kwargs, name)
        kind = _classify(phi, ch.current)
        if kind is None:
            self._stop(ch, f"{name} (not an elementwise activation)")
            return
        ch.parts.append(phi)
        if kind == "nonlinear":
            ch.nonlinear = True
            ch.end = _Compose(ch.parts).name
        self._move(ch, out)

    @staticmethod
    def _move(ch: _Chain, out: torch.Tensor) -> None:
        if out is not ch.current:
            ch.past.append(ch.current)
            ch.current = out

    @staticmethod
    def _stop(ch: _Chain, what: str, output: bool = False) -> None:
        if ch.nonlinear:
            ch.finish("done", ch.end)
        elif output:
            ch.finish("done", "identity (output layer)")
        else:
            ch.finish("unknown", f"its output goes into {what} before any activation")

    def model_output(self, out: Any) -> None:
        outs = tensors_in(out)
        for ch in self.chains:
            if ch.state == "open" and any(ch.current is o for o in outs):
                ch.finish("done", ch.end if ch.nonlinear else "identity (output layer)")


def _candidates(model: nn.Module, space: ScaleSpace) -> dict[str, LayerInfo]:
    """Leaf modules that own exactly one trainable tensor of >= 2 dimensions."""
    block_of = {n: i for i, b in enumerate(space.blocks) for n in b.names}
    out: dict[str, LayerInfo] = {}
    for mname, mod in model.named_modules():
        if next(mod.children(), None) is not None:
            continue
        own = [(n, p) for n, p in mod.named_parameters(recurse=False) if p.requires_grad]
        weights = [(n, p) for n, p in own if p.ndim >= 2]
        if len(weights) != 1:
            continue
        pname, w = weights[0]
        full = f"{mname}.{pname}" if mname else pname
        bias = next((f"{mname}.{n}" if mname else n for n, p in own if p.ndim == 1 and n == "bias"), None)
        blk = block_of.get(full)
        info = LayerInfo(
            module=mname,
            param=space.blocks[blk].name if blk is not None else full,
            block=blk,
            fan_in=int(w[0].numel()),
            fan_out=int(w.shape[0] * (w[0][0].numel() if w.ndim > 2 else 1)),
            numel=int(w.numel()),
            bias=bias,
        )
        if blk is None:
            info.note = "its weight is not a selected trainable tensor"
        elif len(space.blocks[blk].names) > 1:
            info.note = f"its weight is tied ({', '.join(space.blocks[blk].names)}); left at scale 1"
        elif not space.blocks[blk].scalable:
            info.note = "its weight has norm 0 and cannot be rescaled"
        out[mname] = info
    return out


def trace_layers(
    model: nn.Module,
    evaluator: Evaluator,
    batch: Batch,
    tensors: Sequence[torch.Tensor] | None = None,
) -> tuple[list[LayerInfo], torch.Tensor]:
    """Run one forward pass (and the loss) and find, for each affine layer, the activation after it.

    A *layer* is a leaf module owning exactly one trainable tensor of two or more dimensions
    whose first input is a floating-point tensor (Linear, Conv, ...; an Embedding takes integer
    ids and is not one). Its output is followed through the torch functions that consume it
    (a ``TorchFunctionMode`` sees ``nn.ReLU`` and ``F.relu`` alike): dropouts (their keep
    probability is recorded), shape-only ops and elementwise maps (checked numerically: one
    scalar function on every entry) are passed through; the first nonlinear elementwise map
    ends the search (composed with any scalar factors before it). An output that reaches the
    next layer, the model output or the loss with no nonlinearity has the identity. Anything
    else first (a norm layer, a residual addition, pooling, a second use) leaves the activation
    undetermined, with ``LayerInfo.note`` saying what was found. A layer whose output is summed
    with another path of the network (every layer of a residual branch) or that feeds a residual
    stream (a stem, a patch embedding), found by :func:`~initopt.core.affine.record_affine` with
    ``flow=True``, gets a note too: the rule's recursion is for a chain of layers.

    Returns the layers in call order and the loss of the pass.
    """
    space = evaluator.space
    cands = _candidates(model, space)
    rec = _Recorder()
    order: list[LayerInfo] = []
    handles = []
    modules = dict(model.named_modules())

    def pre(name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor):
                rec.close_for_layer(args[0], name)

        return hook

    def post(name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple, out: Any) -> None:
            if not (args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point()):
                return
            info = cands[name]
            info.calls += 1
            if info.calls == 1:
                order.append(info)
            if isinstance(out, torch.Tensor):
                rec.chains.append(_Chain(info, out))

        return hook

    if tensors is None:
        tensors = space.initial
    try:
        for name in cands:
            handles.append(modules[name].register_forward_pre_hook(pre(name)))
            handles.append(modules[name].register_forward_hook(post(name)))
        # dropout off as in every search, but with the recorder above the dropout switch so that
        # it sees the dropout calls (and their p) before they become the identity
        with caller_handles_dropout(), torch.no_grad(), NoDropout(), rec:
            out = evaluator.output(list(tensors), batch)
            rec.model_output(out)
            rec.in_loss = True
            loss = evaluator.task.loss(out, batch)
    finally:
        for h in handles:
            h.remove()
    summed = record_affine(evaluator, list(tensors), batch, measure=False, flow=True)[0].branch
    for info in order:
        chains = [c for c in rec.chains if c.layer is info]
        if info.note is None and info.block is not None and info.block in summed:
            info.note = summed[info.block]
        if info.note is not None:
            continue
        if info.calls > 1:
            info.note = f"called {info.calls} times in one forward pass (shared); left at scale 1"
            continue
        ch = chains[0] if chains else None
        if ch is None or ch.state == "open":
            info.note = "its output is not used by the forward pass or the loss"
            continue
        if ch.state == "unknown":
            info.note = ch.end
            continue
        info.activation = _Compose(ch.parts) if ch.parts else _identity
        info.activation_name = ch.end
        info.keep_prob = ch.keep
    return order, loss


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
