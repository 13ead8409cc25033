"""Scale gradients through convolution and linear layers without weight-gradient kernels.

The learned methods need :math:`\\partial J/\\partial\\alpha_j = \\langle \\nabla_{W_j} J, W_j^0\\rangle`
for :math:`W_j = \\alpha_j W_j^0`, never the full :math:`\\nabla_{W_j} J`. Every operation
:math:`B(P, W)` that is linear in the weight satisfies Euler's identity

.. math::

    \\langle \\nabla_W \\langle G, B(P, W)\\rangle, W\\rangle = \\langle G, B(P, W)\\rangle,

so the contribution of that operation to the scale gradient is one dot product of tensors
the backward pass holds anyway, where plain autograd runs a weight-gradient kernel (as
costly as the forward convolution) and then contracts it with :math:`W^0`.

MetaInit differentiates the gradient quotient, which holds a gradient and a Hessian-vector
product, so every weight enters the graph four times (the forward, the backward, and both
again in the Hessian-vector product): in the last backward pass this saves four of the
eighteen convolution-sized kernels per layer (27 -> 23 in a whole MetaInit step).

How: while :meth:`ProjectedWeightGrads.intercept` is active, ``conv1d/2d/3d`` and ``linear``
calls whose weight is one of the registered tensors run as three mutually-differentiating
bilinear operations (forward :math:`y = B(x, W)`, input gradient :math:`B_x^\\top(g_y, W)`,
weight gradient :math:`B_W^\\top(x, g_y)`), each of whose derivatives is again one of the three,
so the graph can be differentiated any number of times. Each registered weight has a scalar
leaf, its *Euler scalar*. Inside :meth:`ProjectedWeightGrads.projecting`, an operation on a
registered weight sends :math:`\\langle G, B(P, W)\\rangle` (computed as
:math:`\\langle B_x^\\top(G, W), x\\rangle`, a dot product of tensors the pass holds anyway) to
the Euler scalar instead of a weight gradient to :math:`W`;
:meth:`ProjectedWeightGrads.scale_gradient` adds the Euler scalars to the gradients from all
other operations, contracted with :math:`W^0`. Outside ``projecting`` every gradient is exact.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd import Function
from torch.overrides import TorchFunctionMode
from torch.utils import _python_dispatch

from initopt.core.kernels import pool_call

__all__ = ["DIRECTION_MIN_FAN_IN", "ProjectedWeightGrads"]

_aten = torch.ops.aten


class _Conv:
    """Geometry of an N-d convolution (zero padding given as numbers)."""

    def __init__(self, nd: int, stride: Any, padding: Any, dilation: Any, groups: int) -> None:
        def tup(v: Any) -> list[int]:
            return [int(a) for a in v] if isinstance(v, (tuple, list)) else [int(v)] * nd

        self.stride, self.padding, self.dilation = tup(stride), tup(padding), tup(dilation)
        self.groups = int(groups)
        self.zeros = [0] * nd
        self.nd = nd

    def fwd(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self._im2col(x, w):
            return torch._C._nn.thnn_conv2d(x, w, w.shape[2:], None, self.stride, self.padding)
        return _aten.convolution(x, w, None, self.stride, self.padding, self.dilation, False, self.zeros, self.groups)

    def _im2col(self, x: torch.Tensor, w: torch.Tensor) -> bool:
        """Unfold-and-multiply forward for a CPU 2-d convolution with a small fan-in (the first
        layer of an image network) where it measured faster than oneDNN's kernel: for VGG-11's
        3 -> 64 convolution oneDNN takes 3 ms at batch 32 but 27 ms at batch 64, this 3 and
        5 ms. Timed once per shape and thread count (:func:`_faster_im2col`)."""
        if not (
            self.nd == 2
            and self.groups == 1
            and self.dilation == [1, 1]
            and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64)
            and math.prod(w.shape[1:]) < DIRECTION_MIN_FAN_IN
            # under a dispatch mode (flop counting, fake tensors) the canonical operation:
            # torch.utils.flop_counter cannot count thnn_conv2d's kernel
            and _python_dispatch._get_current_dispatch_mode() is None
        ):
            return False
        key = (
            tuple(x.shape),
            tuple(w.shape),
            tuple(self.stride),
            tuple(self.padding),
            x.dtype,
            torch.get_num_threads(),
        )
        if key not in _IM2COL_FASTER:
            _IM2COL_FASTER[key] = self._time_im2col(x.detach(), w.detach())
        return _IM2COL_FASTER[key]

    def _time_im2col(self, x: torch.Tensor, w: torch.Tensor) -> bool:
        def im2col() -> Any:
            return torch._C._nn.thnn_conv2d(x, w, w.shape[2:], None, self.stride, self.padding)

        def onednn() -> Any:
            return _aten.convolution(x, w, None, self.stride, self.padding, self.dilation, False, self.zeros, 1)

        with torch.no_grad():
            best = {}
            for name, f in (("im2col", im2col), ("onednn", onednn)):
                f()
                t = []
                for _ in range(2):
                    t0 = time.perf_counter()
                    f()
                    t.append(time.perf_counter() - t0)
                best[name] = min(t)
        return best["im2col"] < 0.8 * best["onednn"]

    def both(self, gy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, mask: list[bool]) -> tuple[Any, Any]:
        """Input and weight gradients in one kernel call (first-order backward passes)."""
        out = self._back(gy, x, w, [*mask, False])
        return out[0], out[1]

    def _back(self, gy, x, w, mask):  # type: ignore[no-untyped-def]
        return _aten.convolution_backward(
            gy, x, w, None, self.stride, self.padding, self.dilation, False, self.zeros, self.groups, mask
        )

    def igrad(self, gy: torch.Tensor, w: torch.Tensor, xshape: torch.Size) -> torch.Tensor:
        dummy = gy.new_empty(()).expand(xshape)  # only its shape is read
        return self._back(gy, dummy, w, [True, False, False])[0]

    def wgrad(self, x: torch.Tensor, gy: torch.Tensor, wshape: torch.Size) -> torch.Tensor:
        dummy = gy.new_empty(()).expand(wshape)
        return self._back(gy, x, dummy, [False, True, False])[1]

    def bias(self, y: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return y + b.reshape(-1, *([1] * self.nd))


class _Linear:
    """:math:`y = x W^\\top` over the last dimension."""

    def fwd(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, w.t())

    def igrad(self, gy: torch.Tensor, w: torch.Tensor, xshape: torch.Size) -> torch.Tensor:
        return torch.matmul(gy, w).reshape(xshape)

    def wgrad(self, x: torch.Tensor, gy: torch.Tensor, wshape: torch.Size) -> torch.Tensor:
        return torch.matmul(gy.reshape(-1, wshape[0]).t(), x.reshape(-1, wshape[1]))

    def bias(self, y: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return y + b

    def both(self, gy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, mask: list[bool]) -> tuple[Any, Any]:
        return (
            self.igrad(gy, w, x.shape) if mask[0] else None,
            self.wgrad(x, gy, w.shape) if mask[1] else None,
        )


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.sum(a * b)


class _Fwd(Function):
    """:math:`y = B(x, W)`; ``e`` is the Euler scalar of a registered weight (else ``None``)."""

    @staticmethod
    def forward(ctx, x, w, e, k, owner):  # type: ignore[no-untyped-def, override]
        y = k.fwd(x, w)
        d = owner.direction_of(w) if e is not None else None
        # Euler needs <G, y> when the input has no gradient to give <dx, x>; y may be changed
        # in place later (inplace ReLU), so keep a copy
        keep = y.detach().clone() if e is not None and d is None and not x.requires_grad else None
        ctx.save_for_backward(x, w, keep)
        ctx.k, ctx.owner, ctx.e, ctx.registered, ctx.d = k, owner, e, e is not None, d
        return y

    @staticmethod
    def backward(ctx, gy):  # type: ignore[no-untyped-def, override]
        x, w, y = ctx.saved_tensors
        k, owner = ctx.k, ctx.owner
        e = ctx.e
        project = ctx.registered and owner.projecting_now
        if not torch.is_grad_enabled() and not project:
            # first-order backward (no graph to build): one kernel call for both gradients,
            # as autograd's own convolution backward does
            return (*k.both(gy, x, w, [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]), None, None, None)
        dx = _IGrad.apply(gy, w, e, k, owner, x.shape) if ctx.needs_input_grad[0] else None
        dw = de = None
        if project:
            if ctx.needs_input_grad[2]:
                if ctx.d is not None:  # <G, B(x, D)>: one forward kernel instead of B_W^T(x, G)
                    de = _dot(gy, _Fwd.apply(x, ctx.d, None, k, owner))
                else:
                    de = _dot(dx, x) if dx is not None else _dot(gy, y)
        elif ctx.needs_input_grad[1]:
            dw = _WGrad.apply(x, gy, k, owner, w.shape)
        return dx, dw, de, None, None


class _IGrad(Function):
    """:math:`g_x = B_x^\\top(g_y, W)` (the gradient of :math:`B` with respect to its input)."""

    @staticmethod
    def forward(ctx, gy, w, e, k, owner, xshape):  # type: ignore[no-untyped-def, override]
        ctx.save_for_backward(gy, w)
        ctx.k, ctx.owner, ctx.e, ctx.registered = k, owner, e, e is not None
        ctx.d = owner.direction_of(w) if e is not None else None
        return k.igrad(gy, w, xshape)

    @staticmethod
    def backward(ctx, ggx):  # type: ignore[no-untyped-def, override]
        gy, w = ctx.saved_tensors
        k, owner = ctx.k, ctx.owner
        e = ctx.e
        project = ctx.registered and owner.projecting_now
        euler = project and ctx.needs_input_grad[2]
        direct = euler and ctx.d is not None
        dgy = _Fwd.apply(ggx, w, e, k, owner) if (ctx.needs_input_grad[0] or (euler and not direct)) else None
        dw = de = None
        if direct:  # <ggx, B_x^T(gy, D)> = <B(ggx, D), gy>
            de = _dot(_Fwd.apply(ggx, ctx.d, None, k, owner), gy)
        elif euler:
            de = _dot(dgy, gy)
        elif not project and ctx.needs_input_grad[1]:
            dw = _WGrad.apply(ggx, gy, k, owner, w.shape)
        return (dgy if ctx.needs_input_grad[0] else None), dw, de, None, None, None


class _WGrad(Function):
    """:math:`g_W = B_W^\\top(x, g_y)` (the gradient of :math:`B` with respect to its weight)."""

    @staticmethod
    def forward(ctx, x, gy, k, owner, wshape):  # type: ignore[no-untyped-def, override]
        ctx.save_for_backward(x, gy)
        ctx.k, ctx.owner = k, owner
        return k.wgrad(x, gy, wshape)

    @staticmethod
    def backward(ctx, ggw):  # type: ignore[no-untyped-def, override]
        x, gy = ctx.saved_tensors
        k, owner = ctx.k, ctx.owner
        dx = _IGrad.apply(gy, ggw, None, k, owner, x.shape) if ctx.needs_input_grad[0] else None
        dgy = _Fwd.apply(x, ggw, None, k, owner) if ctx.needs_input_grad[1] else None
        return dx, dgy, None, None, None


_CONVS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


_IM2COL_FASTER: dict[tuple, bool] = {}  # (shapes, geometry, dtype, threads) -> im2col measured faster

DIRECTION_MIN_FAN_IN = 64
"""Convolutions with fewer input channels times kernel elements per group than this (the
first layer of an image network: 3 x 3 x 3 = 27) keep the weight-gradient kernel under a
direction: for them the forward kernel is the slower one (VGG-11's first layer on CPU: 20 ms
forward against 4 ms weight gradient at batch 64)."""


def _direction_pays(k: Any, w: torch.Tensor) -> bool:
    """Whether ``<G, B(x, D)>`` (a forward kernel) is cheaper than the weight gradient."""
    return isinstance(k, _Conv) and math.prod(w.shape[1:]) >= DIRECTION_MIN_FAN_IN


class _Intercept(TorchFunctionMode):
    def __init__(self, owner: ProjectedWeightGrads) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func in _CONVS or func is F.linear:
            out = self.owner._call(func, args, kwargs)
            if out is not NotImplemented:
                return out
        elif func is F.max_pool2d:  # a faster exact CPU kernel (core.kernels)
            out = pool_call(func, args, kwargs)
            if out is not NotImplemented:
                return out
        return func(*args, **kwargs)


class ProjectedWeightGrads:
    """Conv/linear layers on ``weights`` as a bilinear algebra with Euler scale gradients.

    Every registered weight :math:`W` gets a scalar leaf :math:`e_W` (its *Euler scalar*,
    value 0, unused in the forward). Outside :meth:`projecting`, gradients are exact and
    :math:`e_W` receives none. Inside, the conv/linear operations on :math:`W` send
    :math:`\\langle \\nabla_W J, W\\rangle` (their share of it) to :math:`e_W` instead of a
    gradient to :math:`W`; operations outside the algebra still send theirs to :math:`W`.
    :meth:`scale_gradient` adds both up.

    With ``directions`` (one tensor :math:`D` per weight, or ``None`` to keep Euler's
    identity for it), the algebra sends :math:`\\langle \\nabla_W J, D\\rangle` to
    :math:`e_W` instead, computed as :math:`\\langle G, B(x, D)\\rangle`: one forward kernel
    with :math:`D` in place of the weight-gradient kernel. That pays on CPU where the
    forward kernel is the faster of the two (convolutions with at least
    :data:`DIRECTION_MIN_FAN_IN` input channels times kernel elements per group; on
    VGG-11 the weight-gradient kernel of such layers takes 1.1-2x the forward's). Other
    operations on a weight with a direction stay exact and send their gradient to the
    weight, as do all of them outside :meth:`projecting`. Used by GradInit's look-ahead:
    the scale gradient at :math:`\\theta' = \\alpha W^0 - \\Delta` with :math:`D = W^0`.
    Any order works (the forward and the input-gradient operations send their shares).

    The forward kernel of a 2-d convolution with a small fan-in on CPU is unfold-and-multiply
    (``thnn_conv2d``) instead of oneDNN's, several times faster there; results agree to
    float round-off. 2x2 max pooling runs :func:`initopt.core.kernels.max_pool2d_2x2`
    (identical values, indices and gradients, faster on CPU).

    Args:
        weights: tensors (usually the leaves a search evaluates the model at).
        directions: optional tensors aligned with ``weights`` (``None`` entries: Euler).
        min_macs: operations with fewer multiply-adds than this (batch x output positions x
            weight size / groups, estimated from the input's shape) keep the plain autograd
            path: on small layers the Python-level algebra costs more than the
            weight-gradient kernels it saves (the caller measures where; 0: every operation
            on a registered weight is projected).

    Example:
        >>> lin = torch.nn.Linear(3, 2)
        >>> w = lin.weight.detach().clone().requires_grad_()
        >>> pwg = ProjectedWeightGrads([w])
        >>> with pwg.intercept():
        ...     y = torch.func.functional_call(lin, {"weight": w}, (torch.randn(4, 3),), strict=False)
        >>> loss = y.pow(2).sum()  # <dloss/dw, w> = 2 <y, y - b>
        >>> d = pwg.scale_gradient(loss, [w], [w.detach()], torch.ones(1))
        >>> bool(torch.allclose(d, (2 * y * (y - lin.bias)).sum()))
        True
    """

    def __init__(
        self,
        weights: Iterable[torch.Tensor],
        directions: Sequence[torch.Tensor | None] | None = None,
        *,
        min_macs: int = 0,
    ) -> None:
        weights = list(weights)
        self.min_macs = int(min_macs)
        self._weights = {id(w): w for w in weights}
        self._euler = {
            k: torch.zeros((), dtype=w.dtype, device=w.device, requires_grad=True) for k, w in self._weights.items()
        }
        self._directions: dict[int, torch.Tensor] = {}
        if directions is not None:
            for w, d in zip(weights, directions, strict=True):
                if d is not None:
                    if d.shape != w.shape:
                        raise ValueError(f"direction of shape {tuple(d.shape)} for a weight of shape {tuple(w.shape)}")
                    self._directions[id(w)] = d.detach()
        self.projecting_now = False
        self.projected_calls = 0  # operations run through the algebra so far

    def is_weight(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and self._weights.get(id(t)) is t

    def direction_of(self, w: torch.Tensor) -> torch.Tensor | None:
        """The direction registered for weight ``w`` (``None``: Euler's identity)."""
        return self._directions.get(id(w))

    @contextlib.contextmanager
    def intercept(self) -> Iterator[ProjectedWeightGrads]:
        """Run conv/linear calls on registered weights through the bilinear algebra."""
        with _Intercept(self):
            yield self

    @contextlib.contextmanager
    def projecting(self) -> Iterator[ProjectedWeightGrads]:
        """Backward passes inside send Euler scalars instead of registered weights' gradients."""
        prev = self.projecting_now
        self.projecting_now = True
        try:
            yield self
        finally:
            self.projecting_now = prev

    def scale_gradient(
        self,
        output: torch.Tensor,
        tensors: Sequence[torch.Tensor],
        initial: Sequence[torch.Tensor],
        scales: torch.Tensor,
    ) -> torch.Tensor:
        """:math:`\\partial J/\\partial\\alpha_j` for tensors :math:`t_j = \\alpha_j W^0_j` (one backward).

        :math:`\\langle g_j, W^0_j\\rangle + E_j/\\alpha_j`, with :math:`g_j` the gradient from
        operations outside the algebra and :math:`E_j` the Euler scalar's gradient
        (:math:`\\langle\\nabla_{t_j}J, t_j\\rangle` from the algebra's operations). For a
        weight with a direction :math:`D_j` the term is :math:`E_j` itself
        (:math:`\\langle\\nabla_{t_j}J, D_j\\rangle`), which is the scale gradient when
        :math:`D_j = W^0_j`, whatever :math:`t_j` is.
        """
        return self.scale_gradient_with(output, tensors, initial, scales, ())[0]

    def scale_gradient_with(
        self,
        output: torch.Tensor,
        tensors: Sequence[torch.Tensor],
        initial: Sequence[torch.Tensor],
        scales: torch.Tensor,
        inputs: Sequence[torch.Tensor],
    ) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
        """:meth:`scale_gradient` and, in the same backward pass, the plain gradients of
        ``output`` with respect to ``inputs`` (``None`` where it does not reach them), for
        objectives that depend on the scales also by other paths (e.g. NIO's output-scaled
        layers)."""
        tensors, inputs = list(tensors), list(inputs)
        eulers = [self._euler[id(t)] for t in tensors if self.is_weight(t)]
        with self.projecting():
            grads = torch.autograd.grad(output, [*inputs, *tensors, *eulers], allow_unused=True)
        extra, grads = tuple(grads[: len(inputs)]), grads[len(inputs) :]
        if not tensors:
            return scales.new_zeros(0), extra
        direct = self.contract(grads[: len(tensors)], initial)
        it = iter(grads[len(tensors) :])
        zero = torch.zeros((), dtype=direct.dtype, device=direct.device)
        euler = []
        for t in tensors:
            g = next(it) if self.is_weight(t) else None
            euler.append(zero if g is None else g.to(direct.dtype))
        e = torch.stack(euler)
        s = scales.to(direct.dtype)
        ones = torch.ones_like(s)
        by_direction = torch.tensor(
            [self.is_weight(t) and id(t) in self._directions for t in tensors], device=s.device, dtype=torch.bool
        )
        s = torch.where(by_direction | (s == 0), ones, s)
        return direct + torch.where(e == 0, zero, e / s), extra

    def _call(self, func: Any, args: tuple, kwargs: dict) -> Any:
        x = _arg(args, kwargs, 0, "input", None)
        w = _arg(args, kwargs, 1, "weight", None)
        b = _arg(args, kwargs, 2, "bias", None)
        if not (isinstance(x, torch.Tensor) and self.is_weight(w)):
            return NotImplemented
        if b is not None and not isinstance(b, torch.Tensor):
            return NotImplemented
        if func is F.linear:
            if x.ndim < 1 or w.ndim != 2:
                return NotImplemented
            if self.min_macs and (x.numel() // max(1, x.shape[-1])) * w.numel() < self.min_macs:
                return NotImplemented
            k: Any = _Linear()
        else:
            nd = _CONVS[func]
            padding = _arg(args, kwargs, 4, "padding", 0)
            if isinstance(padding, str) or x.ndim != nd + 2 or w.ndim != nd + 2:
                return NotImplemented  # 'same'/'valid' strings and unbatched inputs: plain path
            if self.min_macs:
                stride = _arg(args, kwargs, 3, "stride", 1)
                steps = math.prod(stride) if isinstance(stride, (tuple, list)) else int(stride) ** nd
                positions = x.shape[0] * math.prod(x.shape[2:]) // max(1, steps)
                if positions * w.numel() < self.min_macs:
                    return NotImplemented
            k = _Conv(
                nd,
                _arg(args, kwargs, 3, "stride", 1),
                padding,
                _arg(args, kwargs, 5, "dilation", 1),
                _arg(args, kwargs, 6, "groups", 1),
            )
        e = self._euler[id(w)]
        if id(w) in self._directions and not _direction_pays(k, w):
            e = None  # the weight-gradient kernel is the cheaper one here: an exact gradient to w
        self.projected_calls += 1
        y = _Fwd.apply(x, w, e, k, self)
        return y if b is None else k.bias(y, b)

    @staticmethod
    def contract(grads: Sequence[torch.Tensor | None], directions: Sequence[torch.Tensor]) -> torch.Tensor:
        """:math:`\\langle g_j, d_j\\rangle` for each pair (0 for ``None``)."""
        return torch.stack(
            [
                torch.zeros((), dtype=d.dtype, device=d.device) if g is None else torch.sum(g * d)
                for g, d in zip(grads, directions, strict=True)
            ]
        )
