"""Which activation follows each affine layer: one traced forward pass.

:func:`trace_layers` runs the model once under a function mode that follows every affine
layer's output through the elementwise functions applied to it (activations, dropout, shape
changes) until something else consumes it, and returns, per layer, the composed activation as
a callable (for :func:`initopt.core.meanfield.expect`), its name, the dropout keep probability
on the way, and the layer's input second moment. The Hessian-norm rule
(:class:`initopt.methods.hessian.HessianInit`) reads a network this way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from initopt.core.affine import fname, record_affine, tensors_in
from initopt.core.batches import Batch
from initopt.core.blocks import ScaleSpace
from initopt.core.functional import DROPOUT_FUNCTIONS, Evaluator, NoDropout, caller_handles_dropout

__all__ = ["LayerInfo", "trace_layers"]

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
