"""GradCosine: how well the gradients of different examples agree.

Yang, Wang, Yuan, Lin, "Towards Theoretically Inspired Neural Initialization Optimization",
NeurIPS 2022, arXiv:2210.05956 (NIO). For groups of examples :math:`k = 1..D` (single
examples, or D disjoint sub-batches) with gradients :math:`G_k = \\nabla_\\theta L_k`,
everything is read off the Gram matrix :math:`\\Gamma_{kl} = \\langle G_k, G_l\\rangle`:

.. math::

    \\mathrm{GC} = \\frac{1}{D(D-1)} \\sum_{k \\ne l}
        \\frac{\\Gamma_{kl}}{\\|G_k\\|\\,\\|G_l\\| + \\epsilon}, \\qquad
    \\mathrm{GN} = \\frac{1}{D} \\sum_k \\|G_k\\|, \\qquad \\|G_k\\| = \\sqrt{\\Gamma_{kk}}.

With :math:`\\epsilon > 0` a zero group gradient gives a finite GC (and finite gradients of
it); the released code has no :math:`\\epsilon`. Sample-wise GC is the case where every
group is one example, :math:`L_k = \\ell(x_k, y_k)` (the loss on the batch of that one
example); batch-wise B-GC / B-GN take D contiguous disjoint sub-batches.

Two engines compute :math:`\\Gamma`, both exact:

* :func:`subbatch_gram` — one forward per group (BatchNorm in training mode uses each
  group's own batch statistics), one backward, and it is differentiable (``create_graph``)
  for NIO's search over the scales :math:`\\alpha`.
* :func:`sample_gram` — per-example gradients from one forward and one backward of the
  summed per-example losses (read-only; the model must treat the examples of a batch
  independently, e.g. BatchNorm in eval mode).

**Accelerated layers.** For ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` (zero padding mode,
any stride, dilation and groups) the weight gradient of a group is
:math:`G = \\sum_{p} \\delta_p u_p^\\top` over the positions p of its examples, with
:math:`\\delta` the gradient at the layer output and :math:`u` the input (unfolded patches for
a convolution), both captured by forward hooks. Hence per-example Gram entries
:math:`\\langle g_i, g_j\\rangle = \\sum_{p,q} (\\delta_{ip}\\cdot\\delta_{jq})(u_{ip}\\cdot u_{jq})`,
i.e. :math:`\\sum_\\text{layers} (\\Delta\\Delta^\\top)\\odot(AA^\\top)` summed over position
blocks, without materializing per-example gradients. The sample engine takes, per layer, the
cheaper of two exact forms by flop count (as mixed ghost clipping does for per-example
gradient norms, Bu et al. 2022): this Gram over positions (:math:`B^2T^2(o+k)`; it wins for
dense layers and small feature maps) or explicit per-example gradients, one batched matrix
product of the output gradients and the unfolded inputs, and their Gram
(:math:`BTok + B^2ok`). It also covers the gains and shifts of BatchNorm (running statistics),
LayerNorm and GroupNorm, whose per-example gradients are sums over positions of
:math:`\\delta \\odot \\hat x` and :math:`\\delta`. In the
differentiable sub-batch engine the layer's scale enters as a scalar on its output,
:math:`z = \\alpha_W (W^0 * x) + \\alpha_b b^0`, so that the double backward never forms a
weight gradient, and the group gradients' Gram has a hand-written backward (convolutions
by one transposed and one forward convolution). In its fused form (one forward for all groups)
the dense layers called once on vectors share one autograd node, each by the cheaper of the
two exact forms above: the Gram over rows, :math:`(\\Delta\\Delta^\\top)\\odot(XX^\\top + 1)`
summed over group blocks (layers of equal shapes batched), or explicit group gradients.

Every other trainable tensor (embeddings, raw ``nn.Parameter`` s such as
``MultiheadAttention.in_proj_weight``, tied tensors, layers whose weight is also used
outside their own call) falls back to plain autograd per group (sub-batch engine) or to
``torch.func.vmap`` over ``torch.func.grad`` in chunks (sample engine). Which layers are
accelerated is decided by :func:`build_plan` (once per NIO search), which checks on a real
batch that the hooked layers reproduce autograd's summed gradients (relative error <= 1e-4 in
float32, 1e-9 in float64; otherwise the layer falls back) and, with ``verify_scaling``, that
the output-scaled evaluation equals the plain one at scales away from 1. :func:`sample_gram`
without a plan checks inline, in its own forward, without computing any weight gradient: it
walks the autograd graph and drops every layer whose weight, bias or gain is reached by a
node outside the layer's recorded calls.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.autograd.graph import get_gradient_edge

from initopt.core.batches import Batch, batch_size, check_loss, concat_batches, split_batch
from initopt.core.bilinear import ProjectedWeightGrads
from initopt.core.functional import Evaluator
from initopt.errors import LossError, ModelError

__all__ = [
    "GramPlan",
    "build_plan",
    "cosine_from_gram",
    "gram_of",
    "norms_and_gc",
    "sample_gram",
    "subbatch_gram",
]

# largest intermediate tensor (elements) the sample engine builds at once
_BUDGET = 1 << 25
# sub-batch engine: accelerated biases inside the layer, scaled by alpha_b / alpha_W
_FOLD_BIASES = True


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the call when it already has that dtype (hot paths)."""
    return t if t.dtype == dtype else t.to(dtype)


# ---- GC and GN from a Gram matrix --------------------------------------------------------


class _GramCosine(torch.autograd.Function):
    """GC and the norms from a Gram matrix, with a hand-written backward (one autograd node
    instead of about fifteen). With :math:`n_k = \\sqrt{\\Gamma_{kk}}` (0 where
    :math:`\\Gamma_{kk} \\le 0`), :math:`\\rho_{kl} = n_k n_l + \\epsilon`,
    :math:`c = \\bar g_{\\mathrm{GC}} / (D(D-1))` and :math:`Q_{kl} = c\\,\\Gamma_{kl}/\\rho_{kl}^2`
    off the diagonal (0 on it):

    .. math::

        \\bar\\Gamma_{kl} = [k \\ne l]\\, \\frac{c}{\\rho_{kl}}, \\qquad
        \\bar n = \\bar g_n - (Q + Q^\\top)\\, n, \\qquad
        \\bar\\Gamma_{kk} \\mathrel{+}= \\frac{\\bar n_k}{2 n_k}\\ (0 \\text{ where } n_k = 0).
    """

    @staticmethod
    def forward(ctx: Any, gram: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        d = gram.shape[0]
        norms = gram.diagonal().clamp_min(0).sqrt()
        den = torch.outer(norms, norms).add_(eps)
        cos = gram / den
        gc = (cos.sum() - cos.diagonal().sum()).div_(d * (d - 1))
        ctx.save_for_backward(gram, norms, den)
        return gc, norms

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_gc: torch.Tensor, g_norms: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        gram, norms, den = ctx.saved_tensors
        d = gram.shape[0]
        w = (g_gc / (d * (d - 1))) / den
        w.fill_diagonal_(0)
        q = w * gram / den
        dn = g_norms - (q + q.T) @ norms
        dg = w
        dg.diagonal().add_((dn / (2 * norms)).masked_fill_(norms == 0, 0))
        return dg, None


def cosine_from_gram(gram: torch.Tensor, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """GC and the gradient norms from the D x D Gram matrix of group gradients.

    .. math::

        \\mathrm{GC} = \\frac{1}{D(D-1)}\\sum_{k\\ne l}\\frac{\\Gamma_{kl}}{\\|G_k\\|\\|G_l\\|+\\epsilon}

    Differentiable once (:class:`_GramCosine`), also where a group gradient is 0 (its norm
    then has gradient 0, not NaN).

    Returns:
        ``(gc, norms)``: a 0-d tensor and the D norms :math:`\\|G_k\\|`.

    Example:
        >>> g = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
        >>> gc, norms = cosine_from_gram(g @ g.T, eps=0.0)
        >>> round(float(gc), 4), [round(float(n), 4) for n in norms]
        (0.7071, [1.0, 1.4142])
    """
    d = gram.shape[0]
    if gram.ndim != 2 or gram.shape[1] != d or d < 2:
        raise ValueError(f"need a D x D Gram matrix with D >= 2, got shape {tuple(gram.shape)}")
    gc, norms = _GramCosine.apply(gram, eps)
    return gc, norms


class _StackGram(torch.autograd.Function):
    """:math:`\\Gamma = G G^\\top` of D same-shaped tensors, with backward :math:`(S+S^\\top) G`
    (faster than autograd through ``stack`` and a skinny ``mm``)."""

    @staticmethod
    def forward(ctx: Any, *gs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        m = torch.stack([g.reshape(-1) for g in gs])
        ctx.save_for_backward(m)
        ctx.shape = gs[0].shape
        return m @ m.T

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, s: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        (m,) = ctx.saved_tensors
        d = (s + s.T).to(m.dtype) @ m
        return tuple(x.view(ctx.shape) for x in d.unbind(0))


class _DenseGram(torch.autograd.Function):
    """D x D Gram matrix of the group gradients of dense layers, each called once on a
    ``(n, in)`` input whose D consecutive blocks of s = n / D rows are the groups; one autograd
    node for all the layers, each by one of two exact forms (:func:`_dense_form`):

    * ``"gram"`` — the Gram over rows: with :math:`P = (\\Delta\\Delta^\\top) \\odot
      (XX^\\top + [\\text{bias}])` (n x n; the 1 adds the bias gradient),
      :math:`\\Gamma_{kl} \\mathrel{+}= \\sum_{i \\in k, j \\in l} P_{ij}`, since
      :math:`\\langle \\sum_{i\\in k}\\delta_i x_i^\\top, \\sum_{j\\in l}\\delta_j x_j^\\top\\rangle =
      \\sum_{i,j} (\\delta_i\\cdot\\delta_j)(x_i\\cdot x_j)`. Layers of equal shapes are stacked and
      run as one batched product. Backward, with :math:`\\tilde S` the D x D
      :math:`S + S^\\top` repeated over the rows of each group:
      :math:`\\partial/\\partial\\Delta = (\\tilde S \\odot (XX^\\top + [\\text{bias}]))\\Delta`,
      :math:`\\partial/\\partial X = (\\tilde S \\odot \\Delta\\Delta^\\top) X`.
    * ``"explicit"`` — the group gradients: row k of M holds :math:`\\delta_k^\\top x_k` (and
      :math:`\\sum_r \\delta_{k,r}`), one batched product per layer; :math:`\\Gamma \\mathrel{+}=
      M M^\\top`. Backward, with :math:`V = (S + S^\\top) M` in the same per-layer pieces
      :math:`V^W_k, V^b_k`: :math:`\\partial/\\partial\\delta_k = x_k V^{W\\top}_k + V^b_k` (on every
      row), :math:`\\partial/\\partial x_k = \\delta_k V^W_k`.

    Arguments: D, per layer ``(form, has bias)``, then ``x, δ`` of each layer.
    """

    @staticmethod
    def forward(ctx: Any, d: int, layout: tuple[tuple[str, bool], ...], *xs_dzs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        dtype = xs_dzs[1].dtype
        n = xs_dzs[1].shape[0]
        xs = [_cast(x, dtype) for x in xs_dzs[0::2]]
        dzs = [_cast(dz, dtype) for dz in xs_dzs[1::2]]
        gram = None
        stacks: list[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for idx in _DenseGram._shape_groups(layout, xs, dzs):
            x = torch.stack([xs[r] for r in idx])  # (L, n, in)
            dz = torch.stack([dzs[r] for r in idx])  # (L, n, out)
            ones = torch.tensor([float(layout[r][1]) for r in idx], dtype=dtype, device=x.device)
            dd = torch.bmm(dz, dz.transpose(1, 2))
            xx = torch.baddbmm(ones.view(-1, 1, 1), x, x.transpose(1, 2))
            block = (dd * xx).sum(0).view(d, n // d, d, n // d).sum(dim=(1, 3))
            gram = block if gram is None else gram + block
            stacks.append((idx, x, dz, dd, xx))
        rows = []
        for r, (form, b) in enumerate(layout):
            if form != "explicit":
                continue
            xg, dzg = xs[r].reshape(d, -1, xs[r].shape[-1]), dzs[r].reshape(d, -1, dzs[r].shape[-1])
            rows.append(torch.bmm(dzg.transpose(1, 2), xg).view(d, -1))
            if b:
                rows.append(dzg.sum(1))
        m = None
        if rows:
            m = torch.cat(rows, dim=1)
            gram = m @ m.T if gram is None else gram + m @ m.T
        ctx.layout, ctx.stacks, ctx.n = layout, stacks, n
        ctx.save_for_backward(m, *xs_dzs)
        assert gram is not None
        return gram

    @staticmethod
    def _shape_groups(
        layout: tuple[tuple[str, bool], ...], xs: Sequence[torch.Tensor], dzs: Sequence[torch.Tensor]
    ) -> list[list[int]]:
        """The ``"gram"`` layers, grouped by (input, output) width in order of appearance."""
        groups: dict[tuple[int, int], list[int]] = {}
        for r, (form, _) in enumerate(layout):
            if form == "gram":
                groups.setdefault((xs[r].shape[-1], dzs[r].shape[-1]), []).append(r)
        return list(groups.values())

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, s: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        m, *xs_dzs = ctx.saved_tensors
        layout, n = ctx.layout, ctx.n
        d = s.shape[0]
        needs = ctx.needs_input_grad
        grads: list[torch.Tensor | None] = [None] * len(xs_dzs)
        sym = s + s.T
        if ctx.stacks:
            dtype = ctx.stacks[0][1].dtype
            big = _cast(sym, dtype)[:, None, :, None].expand(d, n // d, d, n // d).reshape(n, n)
            for idx, x, dz, dd, xx in ctx.stacks:
                if any(needs[2 + 2 * r] for r in idx):
                    gx = torch.bmm(big * dd, x).unbind(0)
                    for r, g in zip(idx, gx, strict=True):
                        grads[2 * r] = _cast(g, xs_dzs[2 * r].dtype) if needs[2 + 2 * r] else None
                gdz = torch.bmm(big * xx, dz).unbind(0)
                for r, g in zip(idx, gdz, strict=True):
                    grads[2 * r + 1] = _cast(g, xs_dzs[2 * r + 1].dtype) if needs[3 + 2 * r] else None
        if m is not None:
            v = _cast(sym, m.dtype) @ m
            off = 0
            for r, (form, b) in enumerate(layout):
                if form != "explicit":
                    continue
                x, dz = xs_dzs[2 * r], xs_dzs[2 * r + 1]
                xg = _cast(x, m.dtype).reshape(d, -1, x.shape[-1])
                dzg = _cast(dz, m.dtype).reshape(d, -1, dz.shape[-1])
                o, k = dzg.shape[-1], xg.shape[-1]
                vw = v[:, off : off + o * k].view(d, o, k)
                off += o * k
                vb = None
                if b:
                    vb = v[:, off : off + o].unsqueeze(1)
                    off += o
                if needs[2 + 2 * r]:
                    grads[2 * r] = _cast(torch.bmm(dzg, vw).reshape(x.shape), x.dtype)
                if needs[3 + 2 * r]:
                    wt = vw.transpose(1, 2)
                    gdz = torch.bmm(xg, wt) if vb is None else torch.baddbmm(vb, xg, wt)
                    grads[2 * r + 1] = _cast(gdz.reshape(dz.shape), dz.dtype)
        return (None, None, *grads)


# which form the fused sub-batch engine uses for its dense layers: None picks by cost
# (_dense_form); "explicit" or "gram" force one (tests)
_DENSE_FORM: str | None = None
# the explicit form's cost weight: its products contract over the s = n / D rows of a group and
# it writes and reads a D x (out * in) matrix per layer; measured about 1.5x slower per flop than
# the Gram form's square products on a 2-core CPU (64-128 rows, 16-256 features)
_EXPLICIT_WEIGHT = 1.5


def _dense_form(n: int, d: int, o: int, k: int, form: str | None = None) -> str:
    """Cheaper exact form for a dense layer's D x D group Gram in the fused engine, forward
    and backward (:class:`_DenseGram`): ``"gram"`` (:math:`2 n^2 (o + k)` multiply-adds) or
    ``"explicit"`` (:math:`3 n o k + 2 D^2 o k`, weighted by
    ``_EXPLICIT_WEIGHT``). n rows, D groups, o outputs, k inputs."""
    costs = {"gram": 2 * n * n * (o + k), "explicit": _EXPLICIT_WEIGHT * (3 * n * o * k + 2 * d * d * o * k)}
    return _choose_form(costs, form)


def gram_of(grads: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """Gram matrix :math:`\\Gamma_{kl} = \\sum_i \\langle G_{k,i}, G_{l,i}\\rangle` of D gradients,
    each a list of tensors (one per parameter block); differentiable."""
    out = None
    for parts in zip(*grads, strict=True):
        g = _StackGram.apply(*parts)
        out = g if out is None else out + g
    assert out is not None
    return out


# ---- accelerated layers ------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Layer:
    """A ``Linear`` / ``Conv1d`` / ``Conv2d`` whose weight (and bias) are blocks of their own."""

    module: nn.Module
    name: str
    weight: int
    bias: int | None
    conv: int  # 0: linear; 1 or 2: spatial dimensions of the convolution
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1

    @property
    def wshape(self) -> torch.Size:
        return self.module.weight.shape  # type: ignore[union-attr,return-value]

    def channel_view(self, ndim: int) -> list[int]:
        """Shape that broadcasts a per-channel vector over an output of ``ndim`` dims."""
        shape = [1] * ndim
        shape[1 if self.conv else ndim - 1] = -1
        return shape

    # gradients of one group (differentiable building blocks) ----------------------------

    def wgrad(self, x: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
        if not self.conv:
            return dz.reshape(-1, dz.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        fn = torch.nn.grad.conv1d_weight if self.conv == 1 else torch.nn.grad.conv2d_weight
        return fn(x, self.wshape, dz, self.stride, self.padding, self.dilation, self.groups)

    def input_grad(self, x: torch.Tensor, v: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
        """:math:`\\partial \\langle v, \\mathrm{wgrad}(x, dz)\\rangle / \\partial x`."""
        if not self.conv:
            return dz @ v
        fn = torch.nn.grad.conv1d_input if self.conv == 1 else torch.nn.grad.conv2d_input
        return fn(x.shape, v, dz, self.stride, self.padding, self.dilation, self.groups)

    def output_grad(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """:math:`\\partial \\langle v, \\mathrm{wgrad}(x, dz)\\rangle / \\partial dz` (a forward with ``v``)."""
        if not self.conv:
            return x @ v.T
        fn = F.conv1d if self.conv == 1 else F.conv2d
        return fn(x, v, None, self.stride, self.padding, self.dilation, self.groups)

    def bgrad(self, dz: torch.Tensor) -> torch.Tensor:
        if not self.conv:
            return dz.reshape(-1, dz.shape[-1]).sum(0)
        return dz.sum(dim=[d for d in range(dz.ndim) if d != 1])

    # per-example rows for the sample engine ---------------------------------------------

    def unfold(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs as (B, K, P): K = fan-in of the weight (all groups, ordered as the weight's
        ``(in, *kernel)``), P positions. Patches are a strided view of the padded input copied
        once (several times faster than ``F.unfold``'s im2col on CPU)."""
        b = x.shape[0]
        if not self.conv:
            return x.reshape(b, -1, x.shape[-1]).transpose(1, 2)
        kernel = self.wshape[2:]
        pad: list[int] = []
        for q in reversed(self.padding):
            pad += [q, q]
        v = F.pad(x, pad) if any(pad) else x
        for d, (k, s, dil) in enumerate(zip(kernel, self.stride, self.dilation, strict=True)):
            v = v.unfold(2 + d, (k - 1) * dil + 1, s)  # (B, C, *out, window...)
            if dil > 1:
                v = v[..., ::dil]
        nd = self.conv
        # (B, C, *out, *kernel) -> (B, C, *kernel, *out)
        v = v.permute(0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd))
        return v.reshape(b, -1, math.prod(v.shape[2 + nd :]))

    def delta(self, dz: torch.Tensor) -> torch.Tensor:
        """Output gradients as (B, out, P)."""
        b = dz.shape[0]
        if not self.conv:
            return dz.reshape(b, -1, dz.shape[-1]).transpose(1, 2)
        return dz.reshape(b, dz.shape[1], -1)


def _conv_padding(m: nn.Module) -> tuple[int, ...] | None:
    pad = m.padding  # type: ignore[attr-defined]
    k, d = m.kernel_size, m.dilation  # type: ignore[attr-defined]
    if isinstance(pad, str):
        if pad == "valid":
            return tuple(0 for _ in k)
        total = [di * (ki - 1) for di, ki in zip(d, k, strict=True)]
        if any(t % 2 for t in total):
            return None  # asymmetric "same" padding
        return tuple(t // 2 for t in total)
    return tuple(int(p) for p in pad)


def _own_blocks(space: Any, index: dict[int, int], m: nn.Module) -> tuple[int, int | None] | str:
    """The block indices of ``m``'s own ``weight`` and ``bias`` (``None``: no bias), or why
    the module cannot be accelerated (not scaled tensors, or tied ones)."""
    w = m._parameters.get("weight")
    b = m._parameters.get("bias")
    iw = index.get(id(w))
    ib = None if b is None else index.get(id(b))
    if iw is None or (b is not None and ib is None):
        return "weight or bias is not a scaled tensor"
    if len(space.blocks[iw].names) > 1 or (ib is not None and len(space.blocks[ib].names) > 1):
        return "tied tensor"
    return iw, ib


def _candidates(ev: Evaluator) -> tuple[list[_Layer], dict[str, str]]:
    space = ev.space
    index = {id(b.param): i for i, b in enumerate(space.blocks)}
    layers: list[_Layer] = []
    skipped: dict[str, str] = {}
    for name, m in ev.model.named_modules():
        kind = {nn.Linear: 0, nn.Conv1d: 1, nn.Conv2d: 2}.get(type(m))
        if kind is None:
            continue
        own = _own_blocks(space, index, m)
        if isinstance(own, str):
            skipped[name] = own
            continue
        iw, ib = own
        if kind == 0:
            layers.append(_Layer(m, name, iw, ib, 0))
            continue
        if m.padding_mode != "zeros":  # type: ignore[attr-defined]
            skipped[name] = f"padding_mode {m.padding_mode!r}"
            continue
        pad = _conv_padding(m)
        if pad is None:
            skipped[name] = "asymmetric 'same' padding"
            continue
        layers.append(
            _Layer(m, name, iw, ib, kind, tuple(m.stride), pad, tuple(m.dilation), int(m.groups))  # type: ignore[arg-type]
        )
    return layers, skipped


@dataclass(frozen=True)
class GramPlan:
    """Which layers the engines accelerate; the rest is computed by plain autograd / vmap.

    Attributes:
        layers: the accelerated layers.
        fallback: indices of the blocks computed without acceleration.
        skipped: ``{module name: reason}`` for Linear/Conv layers that are not accelerated.
    """

    layers: tuple[_Layer, ...]
    fallback: tuple[int, ...]
    skipped: dict[str, str] = field(default_factory=dict)

    @staticmethod
    def plain(ev: Evaluator, reason: str = "acceleration off") -> GramPlan:
        """No acceleration: every block by autograd (sub-batch) or vmap (sample)."""
        layers, skipped = _candidates(ev)
        skipped = {**skipped, **{ly.name: reason for ly in layers}}
        return GramPlan((), tuple(range(len(ev.space.blocks))), skipped)

    @cached_property
    def scale_index(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CPU index tensors of the accelerated weight blocks (sorted), of the accelerated bias
        blocks, and of those biases' weight blocks (the gathers of :func:`subbatch_gram`;
        built once per plan)."""
        biased = [ly for ly in self.layers if ly.bias is not None]
        return (
            torch.tensor(sorted({ly.weight for ly in self.layers}), dtype=torch.long),
            torch.tensor([ly.bias for ly in biased], dtype=torch.long),
            torch.tensor([ly.weight for ly in biased], dtype=torch.long),
        )

    def accelerated_names(self, ev: Evaluator) -> list[str]:
        """Canonical names of the accelerated blocks."""
        blocks = ev.space.blocks
        out = []
        for ly in self.layers:
            out.append(blocks[ly.weight].name)
            if ly.bias is not None:
                out.append(blocks[ly.bias].name)
        return out


class _Recorder:
    """Forward hooks on accelerated layers that record (layer, input, version, output edge).

    With ``alpha`` the hook also returns the scaled output
    :math:`\\alpha_W z + \\alpha_b b^0` (the layer itself then runs with :math:`W^0` and a
    zero bias).
    """

    def __init__(
        self,
        layers: Sequence[_Layer],
        ev: Evaluator,
        alpha: torch.Tensor | None = None,
        folded: dict[int, torch.Tensor] | None = None,
    ) -> None:
        self.layers = layers
        self.ev = ev
        self.alpha = alpha
        # folded: {weight block: its scale as a 0-d tensor} (one gather and unbind of alpha,
        # fewer graph nodes than one index per layer); the layers run with bias
        # (alpha_b / alpha_W) b0, so the output scale alone gives alpha_W (W0 x) + alpha_b b0
        self._cols = folded
        self.groups: list[list[tuple[_Layer, torch.Tensor, int, Any]]] = []

    def _hook(self, layer: _Layer) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: torch.Tensor) -> Any:
            x = args[0] if args else kwargs["input"]
            z = out
            if self._cols is not None:
                z = out * _cast(self._cols[layer.weight], out.dtype)
            elif self.alpha is not None:
                a = self.alpha
                z = out * a[layer.weight].to(out.dtype)
                if layer.bias is not None:
                    b0 = self.ev.space.initial[layer.bias]
                    z = z + (b0 * a[layer.bias].to(b0.dtype)).view(layer.channel_view(out.ndim))
            edge = get_gradient_edge(z) if z.requires_grad else None  # None: called without autograd
            self.groups[-1].append((layer, x, x._version, edge))
            return z if self.alpha is not None else None

        return hook

    @contextmanager
    def active(self) -> Iterator[_Recorder]:
        handles = []
        try:
            for ly in self.layers:
                handles.append(ly.module.register_forward_hook(self._hook(ly), with_kwargs=True))
            yield self
        finally:
            for h in handles:
                h.remove()

    def new_group(self) -> None:
        self.groups.append([])


def _check_unchanged(ly: Any, x: torch.Tensor, version: int) -> None:
    """The layer's recorded input must not have been changed in place after the layer ran."""
    if x._version != version:
        raise ModelError(
            f"the input of layer {ly.name!r} was changed in place after the layer ran; "
            "the gradient engine cannot use it (pass accelerate=False)"
        )


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    rtol = 1e-9 if a.dtype == torch.float64 else 1e-4
    scale = torch.linalg.vector_norm(b.double())
    return bool(torch.linalg.vector_norm((a - b).double()) <= rtol * scale + 1e-30)


def _drop_untracked(records: list, skipped: dict[str, str]) -> list:
    """Records of layers that always ran with autograd; the others are marked as skipped."""
    bad = {r[0].name for r in records if r[3] is None}
    for name in bad:
        skipped[name] = "called without gradient tracking"
    return [r for r in records if r[0].name not in bad]


def _untracked_error(records: list) -> None:
    for r in records:
        if r[3] is None:
            raise ModelError(
                f"layer {r[0].name!r} ran without gradient tracking (no_grad or checkpointing?); "
                "the gradient engine cannot use it (pass accelerate=False)"
            )


def _checked_blocks(layers: Sequence[_Layer]) -> list[int]:
    return sorted({i for ly in layers for i in (ly.weight, ly.bias) if i is not None})


def _by_layer(records: list, dzs: Sequence[torch.Tensor | None]) -> dict[int, list]:
    """``{id(layer): [(input, version at the call, output gradient), ...]}``."""
    out: dict[int, list[tuple[torch.Tensor, int, torch.Tensor | None]]] = {}
    for (ly, x, version, _), dz in zip(records, dzs, strict=True):
        out.setdefault(id(ly), []).append((x, version, dz))
    return out


def _check_layers(
    space: Any,
    layers: Sequence[_Layer],
    by_layer: dict[int, list],
    true: dict[int, torch.Tensor | None],
    skipped: dict[str, str],
) -> list[_Layer]:
    """Keep the layers whose hooks fired, whose inputs were not changed in place, and whose
    summed weight (bias) gradient :math:`\\sum_p \\delta_p u_p^\\top` equals autograd's."""
    kept = []
    with torch.no_grad():
        for ly in layers:
            recs = by_layer.get(id(ly), [])
            if not recs:
                skipped[ly.name] = "never called as a module (used functionally)"
                continue
            if any(x._version != v for x, v, _ in recs):
                skipped[ly.name] = "input changed in place after the layer"
                continue
            w0 = space.initial[ly.weight]
            gw = torch.zeros_like(w0)
            gb = None if ly.bias is None else torch.zeros_like(space.initial[ly.bias])
            for x, _, dz in recs:
                if dz is None:
                    continue
                gw += ly.wgrad(x, dz)
                if gb is not None:
                    gb += ly.bgrad(dz)
            tw = true[ly.weight]
            ok = _close(gw, torch.zeros_like(w0) if tw is None else tw)
            if gb is not None and ly.bias is not None:
                tb = true[ly.bias]
                ok = ok and _close(gb, torch.zeros_like(gb) if tb is None else tb)
            if not ok:
                skipped[ly.name] = "weight also used outside the layer's call"
                continue
            kept.append(ly)
    return kept


def build_plan(ev: Evaluator, batch: Batch, *, verify_scaling: bool = False, max_examples: int | None = 16) -> GramPlan:
    """Decide which Linear/Conv layers the engines accelerate, checked on ``batch``.

    A candidate is an ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d`` (exact type, zero padding
    mode) whose weight and bias are scaled blocks of their own (not tied). It is kept only if,
    in one forward and backward of the loss on ``batch``, its hook fired, its input was not
    changed in place afterwards, and :math:`\\sum_p \\delta_p u_p^\\top` (and
    :math:`\\sum_p\\delta_p`) equal autograd's gradients of its weight (and bias) — which
    fails when the weight is also used outside the layer's own call. With ``verify_scaling``
    the output-scaled sub-batch engine is compared with plain autograd at scales away from 1;
    on any mismatch nothing is accelerated.

    The checks use the first ``max_examples`` examples of ``batch`` (about; ``None``: all),
    which bounds their memory. Run it inside :func:`initopt.core.search_mode` (the mode the
    engines will run in).
    """
    n = batch_size(batch)
    if max_examples is not None and n > max_examples:
        batch = split_batch(batch, math.ceil(n / max_examples))[0]
    layers, skipped = _candidates(ev)
    space = ev.space
    if layers:
        rec = _Recorder(layers, ev)
        theta = space.leaves(space.ones())
        with rec.active():
            rec.new_group()
            loss = ev.loss(theta, batch, where="the batch used to plan the gradient engine")
        records = _drop_untracked(rec.groups[0], skipped)
        layers = [ly for ly in layers if ly.name not in skipped]
        wanted = _checked_blocks(layers)
        grads = torch.autograd.grad(loss, [r[3] for r in records] + [theta[i] for i in wanted], allow_unused=True)
        true = dict(zip(wanted, grads[len(records) :], strict=True))
        layers = _check_layers(space, layers, _by_layer(records, grads[: len(records)]), true, skipped)
    used = {i for ly in layers for i in (ly.weight, ly.bias) if i is not None}
    plan = GramPlan(tuple(layers), tuple(i for i in range(len(space.blocks)) if i not in used), skipped)
    if verify_scaling and plan.layers and batch_size(batch) >= 2:
        g = torch.Generator(device="cpu").manual_seed(1234)
        alpha = (0.7 + 0.6 * torch.rand(len(space.blocks), generator=g, dtype=torch.float64)).to(
            space.device, space.dtype
        )
        parts = split_batch(batch, 2)
        fast = subbatch_gram(ev, alpha, parts, plan=plan)[0].detach()
        slow = subbatch_gram(ev, alpha, parts, plan=GramPlan.plain(ev))[0].detach()
        if not _close(fast, slow):
            return GramPlan.plain(ev, reason="output-scaled evaluation differs from the plain one")
    return plan


# ---- differentiable sub-batch engine -----------------------------------------------------


class _WeightGram(torch.autograd.Function):
    """Gram matrix of the D group weight gradients of one layer.

    Forward: :math:`G_k = \\sum_{r \\in k} \\mathrm{wgrad}(x_r, \\delta_r)` and
    :math:`\\Gamma = G G^\\top`. Backward, with :math:`V = (S + S^\\top) G`: input gradient
    ``input_grad(x_r, V_k, δ_r)`` (a transposed convolution) and output gradient
    ``output_grad(x_r, V_k)`` (a forward convolution) — cheaper than autograd's double
    backward of the weight-gradient convolution.
    """

    @staticmethod
    def forward(ctx: Any, layer: _Layer, groups: list[int], d: int, *xs_dzs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        xs, dzs = xs_dzs[0::2], xs_dzs[1::2]
        g = torch.zeros((d, *layer.wshape), dtype=dzs[0].dtype, device=dzs[0].device)
        for k, x, dz in zip(groups, xs, dzs, strict=True):
            g[k] += layer.wgrad(x, dz)
        ctx.layer, ctx.groups = layer, groups
        ctx.save_for_backward(g, *xs_dzs)
        gf = g.reshape(d, -1)
        return gf @ gf.T

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, s: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        g, *xs_dzs = ctx.saved_tensors
        layer: _Layer = ctx.layer
        sym = (s + s.T).to(g.dtype)
        gf = g.reshape(g.shape[0], -1)
        out: list[torch.Tensor | None] = []
        vk, last = None, None
        for r, k in enumerate(ctx.groups):
            if k != last:  # V_k = sum_l (S + S^T)_kl G_l, one group at a time
                vk, last = (sym[k] @ gf).view(g.shape[1:]), k
            x, dz = xs_dzs[2 * r], xs_dzs[2 * r + 1]
            out.append(layer.input_grad(x, vk, dz) if ctx.needs_input_grad[3 + 2 * r] else None)
            out.append(layer.output_grad(x, vk) if ctx.needs_input_grad[4 + 2 * r] else None)
        return (None, None, None, *out)


def _folded_biases(
    space: Any, a: torch.Tensor, acc_b: dict[int, int], index: tuple[torch.Tensor, torch.Tensor]
) -> dict[int, torch.Tensor] | None:
    """:math:`(\\alpha_b / \\alpha_W)\\, b^0` of every accelerated bias (``acc_b``: bias block ->
    weight block; ``index``: the same as two index tensors), by one division of the gathered
    scales and one product over all the biases concatenated (a few autograd nodes instead of
    two per layer); ``None`` when one of those weights' scales is 0."""
    if not acc_b:
        return {}
    ib, iw = index
    den = a.index_select(0, iw)
    if not bool((den.detach() != 0).all()):
        return None
    b0 = [space.initial[i] for i in acc_b]
    sizes = [t.numel() for t in b0]
    flat = torch.cat([t.reshape(-1) for t in b0])
    ratio = _cast(a.index_select(0, ib) / den, flat.dtype)
    scaled = flat * ratio.repeat_interleave(torch.tensor(sizes, device=a.device), output_size=flat.numel())
    pieces = scaled.split(sizes)
    return {
        i: _cast(t if t.shape == t0.shape else t.view(t0.shape), t0.dtype)
        for i, t, t0 in zip(acc_b, pieces, b0, strict=True)
    }


def subbatch_gram(
    ev: Evaluator,
    alpha: torch.Tensor,
    parts: Sequence[Batch],
    *,
    plan: GramPlan | None = None,
    create_graph: bool = False,
    fused: bool = False,
    projector: ProjectedWeightGrads | None = None,
    fallback_leaves: Sequence[torch.Tensor] | None = None,
    clock: Callable[[str], None] | None = None,
    whole: Batch | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram matrix of the gradients of D groups, :math:`G_k = \\nabla_\\theta L(\\text{part}_k)`,
    at :math:`\\theta = \\alpha \\odot W^0`.

    One forward per part (so BatchNorm in training mode uses the part's own statistics), one
    backward per part. With ``create_graph`` the result is differentiable with respect to
    ``alpha`` (pass ``alpha`` with ``requires_grad=True``); this is NIO's objective.

    ``fused=True`` (for models that treat the examples of a batch independently, and plans
    that accelerate every block): one forward of the concatenated parts and one backward of
    :math:`\\sum_k L_k`, the loss of part k computed from its rows of the output; the output
    gradient of a row then comes from its own part's loss only, so each accelerated layer's
    group gradients are its per-row terms summed by part. The same Gram matrix (to round-off)
    with a D-th of the forwards and backwards; :meth:`NIO.fused_ok
    <initopt.methods.nio.NIO.fused_ok>` checks a model against the per-part engine before
    using it.

    Args:
        ev: evaluator of the model (mode set by the caller's :func:`search_mode`).
        alpha: scales, one per block.
        parts: the D groups (e.g. :func:`~initopt.core.split_batch` of a batch).
        plan: from :func:`build_plan`; ``None`` accelerates nothing.
        create_graph: keep the graph for a derivative of the result.
        fused: one forward and backward for all parts (see above).
        projector, fallback_leaves: for a scale gradient by Euler's identity
            (:mod:`initopt.core.bilinear`): the blocks not accelerated by ``plan`` are evaluated
            at ``fallback_leaves[i]`` (detached leaves :math:`\\alpha_i W^0_i`, registered with
            ``projector``) instead of :math:`\\alpha_i W^0_i` on the graph of ``alpha``, and the
            forwards run under ``projector.intercept()``. The Gram matrix is the same; its
            derivative with respect to those blocks' scales is then
            ``projector.scale_gradient_with`` (NIO's outer backward), with respect to the
            accelerated ones the gradient to ``alpha``.
        clock: called with ``"forward"``, ``"gradients"`` and ``"gram"`` after each phase.
        whole: with ``fused``, the batch whose contiguous split ``parts`` is (saves
            concatenating the parts again); ignored otherwise.

    Returns:
        ``(gram, losses)``: the D x D Gram matrix and the D group losses.
    """
    space = ev.space
    plan = GramPlan.plain(ev) if plan is None else plan
    a = alpha if alpha.requires_grad else alpha.detach().requires_grad_(True)
    acc_w = {ly.weight for ly in plan.layers}
    acc_b = {ly.bias: ly.weight for ly in plan.layers if ly.bias is not None}
    # accelerated biases enter as (alpha_b / alpha_W) b0 inside the layer, whose output the
    # hook multiplies by alpha_W (possible where those weights' scales are non-zero)
    biases, cols = None, None
    if _FOLD_BIASES and plan.layers:
        iw_all, ib, iwb = (t.to(a.device) for t in plan.scale_index)
        biases = _folded_biases(space, a, acc_b, (ib, iwb))
        if biases is not None:
            cols = dict(zip(sorted(acc_w), a.index_select(0, iw_all).unbind(0), strict=True))
    tensors = []
    for i, w0 in enumerate(space.initial):
        if i in acc_w:
            tensors.append(w0)
        elif i in acc_b:
            tensors.append(torch.zeros_like(w0) if biases is None else biases[i])
        elif fallback_leaves is not None:
            tensors.append(fallback_leaves[i])
        else:
            tensors.append(w0 * a[i].to(w0.dtype))
    rest = list(plan.fallback)
    rec = _Recorder(plan.layers, ev, alpha=a, folded=cols)
    if fused:
        return _fused_gram(ev, a, tensors, parts, plan, rec, create_graph, clock, whole)
    losses = []
    with rec.active(), projector.intercept() if projector is not None else contextlib.nullcontext():
        for k, part in enumerate(parts):
            rec.new_group()
            losses.append(ev.loss(tensors, part, where=f"sub-batch {k}"))
    if clock is not None:
        clock("forward")
    d = len(parts)
    fallback_grads: list[list[torch.Tensor]] = []
    per_layer: dict[int, tuple[_Layer, list[int], list[torch.Tensor]]] = {}
    bias_sums: dict[int, list[Any]] = {}
    for k in range(d):
        records = rec.groups[k]
        _untracked_error(records)
        inputs = [r[3] for r in records] + [tensors[i] for i in rest]
        grads = torch.autograd.grad(losses[k], inputs, create_graph=create_graph, allow_unused=True)
        fallback_grads.append(
            [torch.zeros_like(tensors[i]) if g is None else g for i, g in zip(rest, grads[len(records) :], strict=True)]
        )
        for (ly, x, version, _), dz in zip(records, grads[: len(records)], strict=True):
            _check_unchanged(ly, x, version)
            if dz is None:
                continue
            _, groups, flat = per_layer.setdefault(id(ly), (ly, [], []))
            groups.append(k)
            flat += [x, dz]
            if ly.bias is not None:
                sums = bias_sums.setdefault(id(ly), [0] * d)
                sums[k] = sums[k] + ly.bgrad(dz)
    if clock is not None:
        clock("gradients")
    gram = torch.zeros((d, d), dtype=space.dtype, device=space.device)
    with torch.set_grad_enabled(create_graph):
        gram = _assemble(gram, per_layer, bias_sums, fallback_grads, rest, space)
    if clock is not None:
        clock("gram")
    return gram, torch.stack([loss.detach() if not create_graph else loss for loss in losses]).to(gram.dtype)


def _fused_gram(
    ev: Evaluator,
    a: torch.Tensor,
    tensors: list[torch.Tensor],
    parts: Sequence[Batch],
    plan: GramPlan,
    rec: _Recorder,
    create_graph: bool,
    clock: Callable[[str], None] | None,
    whole: Batch | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`subbatch_gram` with ``fused=True``: one forward and one backward for all parts
    (of the batch ``whole``, their concatenation, when given)."""
    if plan.fallback:
        raise ValueError("the fused sub-batch engine needs a plan that accelerates every block")
    space = ev.space
    sizes = [batch_size(p) for p in parts]
    if whole is None:
        whole = concat_batches(list(parts))
    with rec.active():
        rec.new_group()
        out = ev.output(tensors, whole)
    if not (isinstance(out, torch.Tensor) and out.ndim > 0 and out.shape[0] == sum(sizes)):
        raise ValueError("the fused sub-batch engine needs a model output tensor with one row per example")
    y = whole[1] if isinstance(whole, (tuple, list)) and len(whole) >= 2 else None
    if (
        ev.task.loss_fn is None
        and len(set(sizes)) == 1
        and out.ndim == 2
        and isinstance(y, torch.Tensor)
        and y.ndim == 1
        and not y.is_floating_point()
        and bool((y >= 0).all())
    ):
        # the default loss, F.cross_entropy (mean) of each part: one call over all rows
        stacked = F.cross_entropy(out, y, reduction="none").reshape(len(parts), sizes[0]).mean(1)
    else:
        stacked = torch.stack(
            [
                check_loss(ev.task.loss(rows, part), f"sub-batch {k}")
                for k, (rows, part) in enumerate(zip(torch.split(out, sizes), parts, strict=True))
            ]
        )
    if not torch._C._are_functorch_transforms_active() and not bool(torch.isfinite(stacked.detach()).all()):
        raise LossError(f"the sub-batch losses are {stacked.detach().tolist()}: non-finite")
    if clock is not None:
        clock("forward")
    records = rec.groups[0]
    _untracked_error(records)
    total = stacked.sum()
    dzs = torch.autograd.grad(total, [r[3] for r in records], create_graph=create_graph, allow_unused=True)
    d = len(parts)
    per_layer: dict[int, tuple[_Layer, list[int], list[torch.Tensor]]] = {}
    bias_sums: dict[int, list[Any]] = {}
    # x, dz and (form, has bias) of dense layers called once on vectors: one _DenseGram
    dense: list[torch.Tensor] = []
    layout: list[tuple[str, bool]] = []
    equal = len(set(sizes)) == 1
    calls: dict[int, int] = {}
    for r in records:
        calls[id(r[0])] = calls.get(id(r[0]), 0) + 1
    for (ly, x, version, _), dz in zip(records, dzs, strict=True):
        _check_unchanged(ly, x, version)
        if dz is None:
            continue
        if not ly.conv and equal and x.ndim == 2 and calls[id(ly)] == 1:
            # a dense layer called once on vectors: one Gram node for all of them
            o, k = ly.wshape[0], ly.wshape[1]
            dense += [x, dz]
            layout.append((_dense_form(x.shape[0], d, o, k, _DENSE_FORM), ly.bias is not None))
            continue
        _, groups, flat = per_layer.setdefault(id(ly), (ly, [], []))
        sums = bias_sums.setdefault(id(ly), [0] * d) if ly.bias is not None else None
        for k, (xk, dzk) in enumerate(zip(torch.split(x, sizes), torch.split(dz, sizes), strict=True)):
            groups.append(k)
            flat += [xk, dzk]
            if sums is not None:
                sums[k] = sums[k] + ly.bgrad(dzk)
    if clock is not None:
        clock("gradients")
    gram = torch.zeros((d, d), dtype=space.dtype, device=space.device)
    with torch.set_grad_enabled(create_graph):
        if per_layer:
            gram = _assemble(gram, per_layer, bias_sums, [], [], space)
        if dense:
            dg = _cast(_DenseGram.apply(d, tuple(layout), *dense), gram.dtype)
            gram = gram + dg if per_layer else dg
    if clock is not None:
        clock("gram")
    return gram, _cast(stacked if create_graph else stacked.detach(), gram.dtype)


def _assemble(
    gram: torch.Tensor, per_layer: dict, bias_sums: dict, fallback_grads: list, rest: list, space: Any
) -> torch.Tensor:
    """Sum of the per-layer Gram matrices (accelerated layers, biases, fallback blocks)."""
    d = gram.shape[0]
    for ly, groups, flat in per_layer.values():
        gram = gram + _WeightGram.apply(ly, groups, d, *flat).to(gram.dtype)
        if ly.bias is not None:
            b0 = space.initial[ly.bias]
            sums = [torch.zeros_like(b0) if isinstance(s, int) else s for s in bias_sums[id(ly)]]
            gram = gram + _StackGram.apply(*sums).to(gram.dtype)
    if rest:
        gram = gram + gram_of(fallback_grads).to(gram.dtype)
    return gram


# ---- per-example engine ------------------------------------------------------------------


def _leading(tree: Any, n: int) -> Any:
    """vmap ``in_dims`` for a batch or output: 0 for tensors with leading dimension n."""
    if isinstance(tree, torch.Tensor):
        return 0 if tree.ndim > 0 and tree.shape[0] == n else None
    if isinstance(tree, dict) and type(tree) is dict:
        return {k: _leading(v, n) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)) and type(tree) in (tuple, list):
        return type(tree)(_leading(v, n) for v in tree)
    if tree is None or isinstance(tree, (int, float, str, bool)):
        return None
    raise TypeError(f"cannot map over {type(tree).__name__}")


def _one(tree: Any, dims: Any) -> Any:
    """Inside vmap: give the mapped leaves back a batch dimension of 1."""
    if isinstance(tree, torch.Tensor):
        return tree.unsqueeze(0) if dims == 0 else tree
    if isinstance(tree, dict):
        return {k: _one(v, dims[k]) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(_one(v, d) for v, d in zip(tree, dims, strict=True))
    return tree


def _per_example_losses(ev: Evaluator, out: Any, batch: Batch, n: int) -> torch.Tensor:
    """:math:`\\ell_i` = the loss of example i computed from its row of the batched output."""
    if ev.task.loss_fn is None and isinstance(batch, (tuple, list)) and len(batch) >= 2:
        logits = out.logits if hasattr(out, "logits") else out
        y = batch[1]
        if (
            isinstance(logits, torch.Tensor)
            and isinstance(y, torch.Tensor)
            and logits.ndim >= 2
            and logits.shape[0] == n == y.shape[0]
            and (y.is_floating_point() or not bool((y == -100).any()))
        ):
            # the default loss is F.cross_entropy(logits, y) (mean): per example, the mean over
            # its positions of the unreduced loss
            return F.cross_entropy(logits, y, reduction="none").reshape(n, -1).mean(1)
    od, bd = _leading(out, n), _leading(batch, n)

    def one(o: Any, b: Any) -> torch.Tensor:
        return check_loss(ev.task.loss(_one(o, od), _one(b, bd)), "one example")

    return torch.func.vmap(one, in_dims=(od, bd))(out, batch)


def _per_example_grads(
    ev: Evaluator, theta: list[torch.Tensor], idx: list[int], batch: Batch, chunk_size: int | None
) -> list[torch.Tensor]:
    """Per-example gradients (B, *shape) of the blocks ``idx`` by vmap over grad."""
    n = batch_size(batch)
    bd = _leading(batch, n)
    fixed = [t.detach() for t in theta]

    def loss(left: tuple[torch.Tensor, ...], example: Any) -> torch.Tensor:
        ts = list(fixed)
        for j, t in zip(idx, left, strict=True):
            ts[j] = t
        return ev.loss(ts, _one(example, bd), where="one example")

    fn = torch.func.vmap(torch.func.grad(loss), in_dims=(None, bd), chunk_size=chunk_size)
    return list(fn(tuple(fixed[j] for j in idx), batch))


def _chunked_gram(make: Callable[[slice], torch.Tensor], n: int, row_elems: int) -> torch.Tensor:
    """Gram of n rows produced in chunks by ``make(slice) -> (c, F)`` within the memory budget."""
    c = max(1, min(n, _BUDGET // max(1, 2 * row_elems)))
    if c >= n:
        m = make(slice(0, n))
        return m @ m.T
    chunks = [slice(s, min(s + c, n)) for s in range(0, n, c)]
    out = None
    for ia, sa in enumerate(chunks):
        ma = make(sa)
        if out is None:
            out = torch.zeros((n, n), dtype=ma.dtype, device=ma.device)
        for sb in chunks[ia:]:
            mb = ma if sb == sa else make(sb)
            blk = ma @ mb.T
            out[sa, sb] = blk
            out[sb, sa] = blk.T
    assert out is not None
    return out


# which exact form the sample engine uses for every accelerated layer: None picks the cheaper
# by flop count (per layer); "gram" or "explicit" force one (tests)
_FORM: str | None = None


def _form_costs(n: int, p: int, og: int, kg: int, g: int) -> dict[str, int]:
    """Flops (multiply-adds) of the two exact per-example Gram forms of one layer.

    ``gram``: the Gram over positions, :math:`B^2 T^2 (o + k)` per group; ``explicit``:
    per-example gradients :math:`\\delta_i u_i^\\top` (:math:`B T o k` per group) and their
    :math:`B \\times B` Gram (:math:`B^2 o k` per group). n examples, p positions per example,
    og / kg output / input features per group, g groups.
    """
    return {"gram": n * n * p * p * (og + kg) * g, "explicit": n * p * og * kg * g + n * n * og * kg * g}


def _choose_form(costs: dict[str, float], form: str | None) -> str:
    if form is None:
        return "gram" if costs["gram"] <= costs["explicit"] else "explicit"
    if form not in costs:
        raise ValueError(f"form must be None, 'gram' or 'explicit', got {form!r}")
    return form


def _layer_sample_gram(
    ly: _Layer,
    xs: list[torch.Tensor],
    dzs: list[torch.Tensor],
    *,
    form: str | None = None,
    sums: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-example Gram of one layer's weight (and bias) gradients, by one of two exact forms.

    With :math:`u_{ip}` the input (unfolded patch) and :math:`\\delta_{ip}` the output gradient
    of example i at position p (all calls of the layer concatenated over positions):

    * ``"gram"`` — :math:`\\langle g_i, g_j\\rangle = \\sum_{p,q}(\\delta_{ip}\\cdot\\delta_{jq})
      (u_{ip}\\cdot u_{jq})`, per group of a grouped convolution, in row chunks within
      ``_BUDGET``; about :math:`B^2 T^2 (o + k)` flops;
    * ``"explicit"`` — per-example gradients :math:`g_i = \\sum_p \\delta_{ip} u_{ip}^\\top` by one
      batched matrix product of the output gradients and the unfolded inputs, then their Gram;
      about :math:`B T o k + B^2 o k` flops.

    ``form=None`` takes the cheaper by :func:`_form_costs` (as mixed ghost clipping does for
    per-example gradient norms, Bu et al. 2022). Both are exact up to float round-off.

    Returns ``(gram, summed weight gradient, summed bias gradient)``; with ``sums=False`` the
    sums (which only serve to check the layer against autograd) are ``None``.
    """
    n = xs[0].shape[0]
    dtype = dzs[0].dtype
    o = ly.wshape[0]
    g = ly.groups
    og, kg = o // g, math.prod(ly.wshape[1:])
    deltas = [ly.delta(dz) for dz in dzs]  # (B, O, P_c)
    p = sum(d.shape[-1] for d in deltas)
    chosen = _choose_form(_form_costs(n, p, og, kg, g), form)
    dl = deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=-1)  # (B, O, P)
    u = torch.cat([ly.unfold(x).to(dtype) for x in xs], dim=-1) if len(xs) > 1 else ly.unfold(xs[0]).to(dtype)
    gb = bias = None
    if ly.bias is not None:
        bias = dl.sum(-1)  # per-example bias gradients (B, O)
        gb = bias.sum(0) if sums else None
    gw = None
    if chosen == "gram":
        if p == 1 and g == 1:  # vectors: (ΔΔᵀ) ⊙ (AAᵀ)
            d2, a2 = dl[..., 0], u[..., 0]
            gram = (d2 @ d2.T) * (a2 @ a2.T)
            if sums:
                gw = d2.T @ a2
        else:
            # (G, B·P, o) and (G, B·P, k): example-major rows
            df = dl.reshape(n, g, og, p).permute(1, 0, 3, 2).reshape(g, n * p, og)
            uf = u.reshape(n, g, kg, p).permute(1, 0, 3, 2).reshape(g, n * p, kg)
            c = max(1, min(n, _BUDGET // max(1, n * g * p * p)))
            rows = []
            for s in range(0, n, c):
                e = min(s + c, n)
                dd = torch.bmm(df[:, s * p : e * p], df.transpose(1, 2))  # (G, c·P, B·P)
                dd.mul_(torch.bmm(uf[:, s * p : e * p], uf.transpose(1, 2)))
                rows.append(dd.view(g, e - s, p, n, p).sum(dim=(0, 2, 4)))
            gram = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
            if sums:
                gw = torch.bmm(df.transpose(1, 2), uf)  # (G, o, k)
    else:
        d4 = dl.reshape(n, g, og, p)
        ut = u.reshape(n, g, kg, p).transpose(-1, -2)  # (B, G, P, k)
        oc = max(1, min(og, _BUDGET // max(1, n * g * kg)))  # output channels per slice
        gram = None
        parts = []
        for s in range(0, og, oc):
            m = torch.matmul(d4[:, :, s : s + oc], ut)  # per-example gradients (B, G, oc, k)
            mf = m.reshape(n, -1)
            gram = mf @ mf.T if gram is None else gram.addmm_(mf, mf.T)
            if sums:
                parts.append(m.sum(0))
        if sums:
            gw = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    if bias is not None:
        gram = gram + bias @ bias.T
    return gram, None if gw is None else gw.reshape(ly.wshape), gb


# ---- per-example engine: norm layers ------------------------------------------------------

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True, eq=False)
class _Norm:
    """A BatchNorm (running statistics), LayerNorm or GroupNorm whose gain (and shift) are blocks
    of their own; the sample engine only.

    With :math:`\\hat x` the normalized input (a function of the example alone: BatchNorm with
    running statistics, LayerNorm, GroupNorm) and :math:`\\delta` the output gradient, example
    i's gradients are :math:`\\sum_p \\delta_{ip} \\odot \\hat x_{ip}` (gain) and
    :math:`\\sum_p \\delta_{ip}` (shift), summed over the positions p the gain is shared by.
    """

    module: nn.Module
    name: str
    weight: int
    bias: int | None

    def normalized(self, x: torch.Tensor) -> torch.Tensor | None:
        """:math:`\\hat x` of an input, at the call (``None``: batch statistics, not per example)."""
        m = self.module
        with torch.no_grad():
            if isinstance(m, nn.LayerNorm):
                return F.layer_norm(x, m.normalized_shape, None, None, m.eps)
            if isinstance(m, nn.GroupNorm):
                return F.group_norm(x, m.num_groups, None, None, m.eps)
            if m.training or m.running_mean is None or m.running_var is None:  # type: ignore[attr-defined]
                return None
            return F.batch_norm(x, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)  # type: ignore[arg-type]

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the positions that share a gain entry: (B, gain entries)."""
        if isinstance(self.module, nn.LayerNorm):
            k = len(self.module.normalized_shape)
            return t.reshape(t.shape[0], -1, *t.shape[t.ndim - k :]).sum(1).reshape(t.shape[0], -1)
        return t.reshape(t.shape[0], t.shape[1], -1).sum(-1)


def _norm_candidates(ev: Evaluator) -> tuple[list[_Norm], dict[str, str]]:
    space = ev.space
    index = {id(b.param): i for i, b in enumerate(space.blocks)}
    out: list[_Norm] = []
    skipped: dict[str, str] = {}
    for name, m in ev.model.named_modules():
        if type(m) not in _NORMS:
            continue
        if m._parameters.get("weight") is None:
            continue  # no affine parameters
        own = _own_blocks(space, index, m)
        if isinstance(own, str):
            skipped[name] = own
        else:
            out.append(_Norm(m, name, *own))
    return out, skipped


class _SampleRecorder(_Recorder):
    """:class:`_Recorder` that records :math:`\\hat x` instead of the input for norm layers,
    and for every call the autograd node of the input (``stops``, parallel to the records)."""

    def __init__(self, layers: Sequence[Any], ev: Evaluator) -> None:
        super().__init__(layers, ev)
        self.stops: list[Any] = []

    def _hook(self, layer: Any) -> Callable[..., Any]:
        base = None if isinstance(layer, _Norm) else super()._hook(layer)

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: torch.Tensor) -> None:
            x = args[0] if args else kwargs["input"]
            self.stops.append(get_gradient_edge(x).node if x.requires_grad else None)
            if base is not None:
                base(module, args, kwargs, out)
                return
            xhat = layer.normalized(x)
            edge = get_gradient_edge(out) if out.requires_grad and xhat is not None else None
            self.groups[-1].append((layer, xhat, 0, edge))

        return hook


def _outside_uses(root: Any, records: list, stops: list, layers: Sequence[Any], theta: list[torch.Tensor]) -> set[str]:
    """Layers whose weight or bias is used in the autograd graph of ``root`` by a node outside
    the layer's own recorded calls (walking the graph; no gradient is computed).

    A call's nodes are those reachable from its output's node before its input's node; for an
    accelerated layer the gradient of its weight is then exactly the sum over its calls of
    :math:`\\sum_p \\delta_p u_p^\\top`.
    """
    owner: dict[Any, str] = {}
    for ly in layers:
        for i in (ly.weight, ly.bias):
            if i is not None:
                owner[get_gradient_edge(theta[i]).node] = ly.name
    inside: dict[Any, set[str]] = {}
    for (ly, _, _, edge), stop in zip(records, stops, strict=True):
        if edge is None:
            continue
        todo, seen = [edge.node], set()
        while todo:
            nd = todo.pop()
            if nd is None or nd is stop or nd in owner or nd in seen:
                continue
            seen.add(nd)
            inside.setdefault(nd, set()).add(ly.name)
            todo += [c for c, _ in nd.next_functions]
    bad: set[str] = set()
    todo, seen = [root], set()
    while todo:
        nd = todo.pop()
        if nd is None or nd in seen:
            continue
        seen.add(nd)
        for c, _ in nd.next_functions:
            name = owner.get(c)
            if name is None:
                todo.append(c)
            elif name not in inside.get(nd, ()):
                bad.add(name)
    return bad


def _norm_sample_gram(
    ly: _Norm, xhats: list[torch.Tensor], dzs: list[torch.Tensor], *, sums: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-example Gram of a norm layer's gain (and shift) gradients; as :func:`_layer_sample_gram`."""
    gw = sum(ly.rows(dz * xh.to(dz.dtype)) for xh, dz in zip(xhats, dzs, strict=True))
    assert isinstance(gw, torch.Tensor)
    gram = gw @ gw.T
    gb = None
    if ly.bias is not None:
        rb = sum(ly.rows(dz) for dz in dzs)
        assert isinstance(rb, torch.Tensor)
        gram = gram.addmm_(rb, rb.T)
        gb = rb.sum(0) if sums else None
    shape = ly.module.weight.shape  # type: ignore[union-attr]
    return gram, gw.sum(0).reshape(shape) if sums else None, gb


def sample_gram(
    ev: Evaluator,
    alpha: torch.Tensor,
    batch: Batch,
    *,
    plan: GramPlan | None = None,
    accelerate: bool = True,
    chunk_size: int | None = 32,
) -> tuple[torch.Tensor, GramPlan]:
    """B x B Gram matrix of the per-example gradients :math:`g_i = \\nabla_\\theta \\ell(x_i, y_i)`.

    Accelerated layers use one forward and one backward of :math:`\\sum_i \\ell_i`, where
    :math:`\\ell_i` is the loss of example i computed from its row of the batched output
    (cross-entropy with ``reduction="none"`` for the default loss, else ``vmap`` of the loss
    over rows); every other block, or every block when the loss cannot be split by example (a
    model that returns its own batch loss), uses ``vmap(grad)`` over examples in chunks of
    ``chunk_size``. The model must treat the examples independently (run BatchNorm in eval
    mode). Not differentiable; for a differentiable per-example Gram use
    :func:`subbatch_gram` with one part per example.

    Args:
        plan: layers to accelerate without checking them again; ``None``: the candidate
            layers (Linear/Conv as in :func:`build_plan`, and norm layers), checked in the
            same forward by walking its autograd graph (:func:`_outside_uses`).
        accelerate: ``False``: ``vmap`` for every block.

    Returns:
        ``(gram, plan)``: the Gram matrix and the plan actually used.
    """
    space = ev.space
    n = batch_size(batch)
    theta = space.leaves(alpha.detach())
    gram = torch.zeros((n, n), dtype=space.dtype, device=space.device)
    if plan is not None:
        layers, skipped, check = list(plan.layers), dict(plan.skipped), False
    elif accelerate:
        cands, skipped = _candidates(ev)
        norms, skipped_norms = _norm_candidates(ev)
        layers, check = [*cands, *norms], True
        skipped.update(skipped_norms)
    else:
        plan = GramPlan.plain(ev)
        layers, skipped, check = [], dict(plan.skipped), False
    if layers and ev.task.loss_fn is None and isinstance(batch, dict):
        skipped.update({ly.name: "loss not separable by example" for ly in layers})
        layers = []
    if layers:
        rec = _SampleRecorder(layers, ev)
        with rec.active():
            rec.new_group()
            out = ev.output(theta, batch)
        try:
            losses = _per_example_losses(ev, out, batch, n)
        except (TypeError, RuntimeError, ValueError):
            losses = None  # the loss cannot be split by example: vmap everything below
        if losses is None:
            skipped.update({ly.name: "loss not separable by example" for ly in layers})
            layers = []
        else:
            if check:
                records = _drop_untracked(rec.groups[0], skipped)
                for r in rec.groups[0]:
                    if r[1] is None:
                        skipped[r[0].name] = "BatchNorm uses batch statistics (training mode)"
                layers = [ly for ly in layers if ly.name not in skipped]
            else:
                records = rec.groups[0]
                _untracked_error(records)
            total = losses.sum()
            if check:
                keep = {id(r) for r in records}
                stops = [s for r, s in zip(rec.groups[0], rec.stops, strict=True) if id(r) in keep]
                called = {r[0].name for r in records}
                for ly in layers:
                    if ly.name not in called:
                        skipped[ly.name] = "never called as a module (used functionally)"
                layers = [ly for ly in layers if ly.name in called]
                outside = _outside_uses(total.grad_fn, records, stops, layers, theta)
                for name in outside:
                    skipped[name] = "weight also used outside the layer's call"
                layers = [ly for ly in layers if ly.name not in outside]
                records = [r for r in records if r[0].name not in outside]
            grads = torch.autograd.grad(total, [r[3] for r in records], allow_unused=True)
            by_layer = _by_layer(records, grads)
            kept = []
            with torch.no_grad():
                for ly in layers:
                    recs = by_layer.get(id(ly), [])
                    if any(x._version != v for x, v, _ in recs):
                        if not check:
                            raise ModelError(f"the input of layer {ly.name!r} was changed in place after the layer ran")
                        skipped[ly.name] = "input changed in place after the layer"
                        continue
                    if not recs:
                        skipped[ly.name] = "never called as a module (used functionally)"
                        continue
                    pairs = [(x, dz) for x, _, dz in recs if dz is not None]
                    if pairs:
                        xs, dzs = [q[0] for q in pairs], [q[1] for q in pairs]
                        if isinstance(ly, _Norm):
                            lg, _, _ = _norm_sample_gram(ly, xs, dzs, sums=False)
                        else:
                            lg, _, _ = _layer_sample_gram(ly, xs, dzs, form=_FORM, sums=False)
                        gram += lg.to(gram.dtype)
                    kept.append(ly)  # (a layer whose output does not reach the loss adds 0)
                layers = kept
    used = {i for ly in layers for i in (ly.weight, ly.bias) if i is not None}
    plan = GramPlan(tuple(layers), tuple(i for i in range(len(space.blocks)) if i not in used), skipped)
    if plan.fallback:
        grads = _per_example_grads(ev, theta, list(plan.fallback), batch, chunk_size)
        with torch.no_grad():
            for gi in grads:
                gram += _chunked_gram(lambda sl, gi=gi: gi[sl].reshape(sl.stop - sl.start, -1), n, gi[0].numel()).to(
                    gram.dtype
                )
    return gram, plan


def norms_and_gc(gram: torch.Tensor, eps: float) -> dict[str, Any]:
    """Plain floats from a Gram matrix: ``gc``, ``gn`` (mean norm) and ``norms``."""
    gc, norms = cosine_from_gram(gram.detach().double(), eps)
    values = torch.cat([gc.reshape(1), norms.mean().reshape(1), norms]).tolist()
    if not all(math.isfinite(v) for v in values):
        raise LossError(f"non-finite gradient cosine ({values[0]}) or mean gradient norm ({values[1]})")
    return {"gc": values[0], "gn": values[1], "norms": tuple(values[2:])}
