"""The affine layers of a network, found by recording one forward pass.

A weight tensor (two or more dimensions) is an *affine weight* when the forward pass uses it
as the ``weight`` argument of ``F.linear`` or ``F.conv1d/2d/3d``, or as the
``in_proj_weight`` / ``out_proj_weight`` of ``F.multi_head_attention_forward`` (what
``nn.MultiheadAttention`` calls; its ``out_proj`` module is never called itself, so module
hooks would miss it). The calls are seen by a ``TorchFunctionMode`` at the level of torch
functions, so ``nn.Linear`` and a hand-written ``F.linear(x, self.w)`` look alike, and
tensors are recognized by identity, never by their names or module types.

Any other use of a watched tensor that produces a tensor (``F.embedding``, indexing a
position table, ``w.t()`` in custom code, the separate ``q/k/v_proj_weight`` of attention
with ``kdim != embed_dim``) is recorded as well, so that callers can leave such tensors
alone. Metadata reads (``w.shape``, ``w.device``, ``w.dim()``) are ignored.

With ``measure=True`` the recorder also accumulates, per weight, the mean and variance of
every output element of its affine calls (float64, pooled over repeated calls), which is
what LSUV sets.

With ``flow=True`` it also follows the data flow of the pass to find the layers whose output
is *summed with another path*: a layer is one when its output reaches exactly one operand of
an addition :math:`a + b` of two data tensors of the same shape. That is every layer of a
residual branch :math:`y = x + f(x)` (pre- and post-LN Transformers, ResNet blocks, the
projection shortcut of a ResNet block, the cross-attention of a decoder) and of parallel
branches that are summed, but not a bias or a broadcast table (position embeddings, attention
masks), not a sum of losses, and not an activation that adds two functions of the layer's own
output (``x + 0.044715 x^3`` in GELU). Data is the batch and what is computed from it, never
parameters, buffers or constants alone. A layer that reaches *both* operands of such a sum,
where one operand went through layers the other did not, feeds the residual stream (a ResNet
stem, a ViT patch embedding); it is recorded too. The variance rules (He/Kaiming, LSUV, the
Hessian rule) are derived for a chain of layers; they leave all these layers alone
(:meth:`AffineTrace.note`): a branch's scale and the stream's first layer set magnitudes
relative to the other paths, which a chain rule does not model.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from initopt.core.batches import Batch
from initopt.core.functional import Evaluator

__all__ = ["AffineTrace", "AffineUse", "fname", "record_affine", "tensors_in"]

_AFFINE = {
    F.linear: "linear",
    F.conv1d: "conv1d",
    F.conv2d: "conv2d",
    F.conv3d: "conv3d",
}
_MHA = F.multi_head_attention_forward
_MHA_SIG = inspect.signature(_MHA)


def fname(func: Any) -> str:
    """A readable name of a torch function (``F.relu``, ``Tensor.add``, ``torch.tanh``)."""
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    mod = getattr(func, "__module__", "") or ""
    if mod.startswith("torch.nn.functional"):
        return f"F.{name}"
    if name.startswith(("_TensorBase.", "TensorBase.")):
        name = "Tensor." + name.split(".", 1)[1]
    return name if "." in name else f"torch.{name}"


def tensors_in(x: Any) -> list[torch.Tensor]:
    """Every tensor in ``x``, looking inside lists, tuples and dicts."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in tensors_in(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in tensors_in(v)]
    return []


@dataclass
class AffineUse:
    """How one watched tensor was used in the recorded forward pass.

    Attributes:
        index: position of the tensor in the list passed to :func:`record_affine` (the block).
        calls: kind of every affine call that used it as its weight, in call order
            (``"linear"``, ``"conv2d"``, ``"mha.in_proj"``, ``"mha.out_proj"``, ...).
        other: names of the other functions that used it (``"F.embedding"``, ...).
        count, mean, m2: number of output elements of its affine calls, their mean and sum of
            squared deviations (float64 scalars; only with ``measure=True``).
    """

    index: int
    calls: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)
    count: int = 0
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None

    def add(self, out: torch.Tensor) -> None:
        """Pool the elements of one affine output into the running mean and variance (Chan et al.)."""
        x = out.detach().reshape(-1).double()
        n = x.numel()
        if n == 0:
            return
        var, mean = torch.var_mean(x, correction=0)
        m2 = var * n
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.count * n / total)
        self.count = total

    @property
    def variance(self) -> torch.Tensor | None:
        """Population variance of all output elements of its affine calls (``None``: not measured)."""
        if self.m2 is None or self.count == 0:
            return None
        return self.m2 / self.count


@dataclass
class AffineTrace:
    """What one recorded forward pass saw: per watched tensor, its uses; ``order``: the tensors
    with at least one affine call, in the order of their first call."""

    uses: dict[int, AffineUse]
    order: list[int]
    branch: dict[int, str] = field(default_factory=dict)

    def note(self, index: int) -> str | None:
        """Why tensor ``index`` is not an affine weight that can be rescaled on its own (``None``: it is)."""
        use = self.uses.get(index)
        if use is None or (not use.calls and not use.other):
            return (
                "not used in the forward pass as the weight of F.linear, F.conv1d/2d/3d or "
                "F.multi_head_attention_forward"
            )
        others = ", ".join(dict.fromkeys(use.other))
        if not use.calls:
            return f"not the weight of an affine layer (used by {others})"
        if use.other:
            return f"an affine weight that is also used by {others} (e.g. tied to an embedding)"
        return self.branch.get(index)


_ADD = {
    torch.Tensor.__add__,
    torch.Tensor.__radd__,
    torch.Tensor.__iadd__,
    torch.Tensor.add,
    torch.Tensor.add_,
    torch.add,
}
# functions whose output takes only the shape, dtype or device of their tensor arguments
_NO_DATA = {
    torch.zeros_like,
    torch.ones_like,
    torch.empty_like,
    torch.full_like,
    torch.rand_like,
    torch.randn_like,
    torch.randint_like,
    torch.Tensor.new_zeros,
    torch.Tensor.new_ones,
    torch.Tensor.new_empty,
    torch.Tensor.new_full,
    torch.Tensor.new_tensor,
}


class _Flow:
    """Data flow of one forward pass: which tensors are data (the batch and what is computed
    from it) and, per tensor, the affine layers whose output it derives from (``deps``, a bit
    set over watched indices). Tensors are kept alive for the pass, so their ``id`` is not
    reused."""

    def __init__(self, roots: Sequence[torch.Tensor]) -> None:
        self.data: set[int] = set()
        self.deps: dict[int, int] = {}
        self.keep: list[torch.Tensor] = []
        self.branch: dict[int, str] = {}
        self.stream: dict[int, str] = {}
        for t in roots:
            self._set(t, True, 0)

    def _set(self, t: torch.Tensor, data: bool, deps: int) -> None:
        if data:
            self.data.add(id(t))
        self.deps[id(t)] = deps
        self.keep.append(t)

    def op(self, func: Any, ins: list[torch.Tensor], outs: list[torch.Tensor], layers: Sequence[int] = ()) -> None:
        if func in _NO_DATA:
            return
        data = any(id(t) in self.data for t in ins)
        deps = 0
        for t in ins:
            deps |= self.deps.get(id(t), 0)
        if func in _ADD and len(ins) >= 2:
            self._merge(ins[0], ins[1], func)
        for layer in layers:
            deps |= 1 << layer
        if not data and not deps:
            return  # parameters, buffers and constants: not data
        if not outs and ins:
            outs = ins[:1]  # in place, returning nothing (``x[i] = y``): the first argument changed
        for o in outs:
            self._set(o, data, deps)

    def _merge(self, a: torch.Tensor, b: torch.Tensor, func: Any) -> None:
        if a.ndim == 0 or a.shape != b.shape or id(a) not in self.data or id(b) not in self.data:
            return  # a bias, a broadcast table or mask, a sum of losses: not two paths of the network
        da, db = self.deps.get(id(a), 0), self.deps.get(id(b), 0)
        only = (da & ~db) | (db & ~da)
        # the layers before the fork feed both operands; if one operand went through layers the
        # other did not, the sum is a residual connection and they make the stream it carries
        both = da & db if only else 0
        i = 0
        while only or both:
            if only & 1 and i not in self.branch:
                self.branch[i] = (
                    f"its output is summed ({fname(func)}) with another path of the network that it does not "
                    "feed (a residual connection or parallel branches); the variance rules assume a chain of "
                    "layers, so it keeps its scale"
                )
            elif both & 1 and i not in self.branch and i not in self.stream:
                self.stream[i] = (
                    f"its output feeds a residual stream (both operands of a residual sum, {fname(func)}, derive "
                    "from it: a stem or patch embedding); its scale sets the stream against the branches and "
                    "position tables, which the variance rules do not model, so it keeps its scale"
                )
            only >>= 1
            both >>= 1
            i += 1


class _Recorder(TorchFunctionMode):
    def __init__(self, watch: dict[int, int], measure: bool, flow: _Flow | None = None) -> None:
        super().__init__()
        self.watch = watch
        self.measure = measure
        self.flow = flow
        self.uses: dict[int, AffineUse] = {}
        self.order: list[int] = []

    def _use(self, t: Any) -> AffineUse | None:
        if not isinstance(t, torch.Tensor):
            return None
        i = self.watch.get(id(t))
        if i is None:
            return None
        if i not in self.uses:
            self.uses[i] = AffineUse(i)
        return self.uses[i]

    def _affine(self, t: Any, kind: str, outs: Sequence[torch.Tensor]) -> bool:
        use = self._use(t)
        if use is None:
            return False
        if not use.calls:
            self.order.append(use.index)
        use.calls.append(kind)
        if self.measure:
            for o in outs:
                use.add(o)
        return True

    def _others(self, func: Any, tensors: list[torch.Tensor], skip: set[int]) -> None:
        name = fname(func)
        for t in tensors:
            if id(t) in skip:
                continue
            use = self._use(t)
            if use is not None:
                use.other.append(name)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is _MHA:
            self._follow(func, args, kwargs, out, self._attention(args, kwargs, out))
            return out
        kind = _AFFINE.get(func)
        if kind is not None and isinstance(out, torch.Tensor):
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            skip = {id(weight)} if self._affine(weight, kind, [out]) else set()
            self._others(func, tensors_in(list(args) + list(kwargs.values())), skip)
            self._follow(func, args, kwargs, out, [self.watch[id(weight)]] if skip else [])
            return out
        if tensors_in(out):
            self._others(func, tensors_in(list(args) + list(kwargs.values())), set())
        self._follow(func, args, kwargs, out, [])
        return out

    def _follow(self, func: Any, args: tuple, kwargs: dict, out: Any, layers: Sequence[int]) -> None:
        if self.flow is not None:
            self.flow.op(func, tensors_in(list(args) + list(kwargs.values())), tensors_in(out), layers)

    def _attention(self, args: tuple, kwargs: dict, out: Any) -> list[int]:
        """``F.multi_head_attention_forward``: the packed input projection and the output
        projection. Returns the watched indices of those recorded as affine weights."""
        try:
            bound = _MHA_SIG.bind(*args, **kwargs)
        except TypeError:  # pragma: no cover - a future signature
            self._others(_MHA, tensors_in(list(args) + list(kwargs.values())), set())
            return []
        a = bound.arguments
        skip: set[int] = set()
        w_in, b_in = a.get("in_proj_weight"), a.get("in_proj_bias")
        if not a.get("use_separate_proj_weight", False) and isinstance(w_in, torch.Tensor):
            outs: list[torch.Tensor] = []
            if self.measure and self._use(w_in) is not None:
                outs = _in_projection(a["query"], a["key"], a["value"], w_in, b_in)
            if self._affine(w_in, "mha.in_proj", outs):
                skip.add(id(w_in))
        w_out = a.get("out_proj_weight")
        result = out[0] if isinstance(out, (tuple, list)) else out
        if isinstance(w_out, torch.Tensor) and isinstance(result, torch.Tensor):
            if self._affine(w_out, "mha.out_proj", [result]):
                skip.add(id(w_out))
        self._others(_MHA, tensors_in(list(a.values())), skip)
        return [self.watch[i] for i in skip]


def _in_projection(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None
) -> list[torch.Tensor]:
    """The outputs of the packed q/k/v projection, as ``F.multi_head_attention_forward`` computes them."""
    with torch.no_grad():
        if k is q and v is q:
            return [F.linear(q, w, b)]
        ws = w.chunk(3)
        bs = b.chunk(3) if b is not None else (None, None, None)
        return [F.linear(x, wi, bi) for x, wi, bi in zip((q, k, v), ws, bs, strict=True)]


def record_affine(
    evaluator: Evaluator,
    tensors: Sequence[torch.Tensor],
    batch: Batch,
    *,
    measure: bool = True,
    flow: bool = False,
) -> tuple[AffineTrace, torch.Tensor]:
    """Run the model and its loss once at ``tensors`` (one per block) and record the affine calls.

    Every tensor of ``tensors`` with two or more dimensions is watched. Runs under
    ``torch.no_grad``; with ``measure=True`` the output statistics of every affine call of a
    watched tensor are pooled (:class:`AffineUse`); with ``flow=True`` the layers inside a
    residual branch and those that feed a residual stream are found (:attr:`AffineTrace.branch`,
    one note each; this keeps every tensor of the pass alive until it ends).

    Returns:
        The trace and the loss.
    """
    watch = {id(t): i for i, t in enumerate(tensors) if t.ndim >= 2}
    follow = _Flow(tensors_in(batch)) if flow else None
    rec = _Recorder(watch, measure, follow)
    with torch.no_grad(), rec:
        loss = evaluator.loss(list(tensors), batch)
    found = {**follow.stream, **follow.branch} if follow is not None else {}
    return AffineTrace(rec.uses, rec.order, found), loss
