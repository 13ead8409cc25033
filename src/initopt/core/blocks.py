"""Parameter blocks and their scales.

The learned methods (GradInit, MetaInit, NIO) keep the direction of every initial tensor
:math:`W_i^0` and learn one scalar per tensor, :math:`\\theta_i = \\alpha_i W_i^0`.
A *block* is one trainable tensor, reached under one or more names (tied weights give
one block, one scale). Frozen parameters (``requires_grad=False``) are not blocks: they
are left alone.

The role of a tensor decides its bounds and is read from the tensor itself, never from
its name or the class of the module that owns it:

* ``"weight"``: two or more dimensions (linear and convolution kernels, embeddings,
  position tables, ``MultiheadAttention.in_proj_weight``); lower bound ``min_scale``.
* ``"gain"``: at most one dimension, every entry non-zero and of one sign (norm-layer
  gains, learnable scalar gains); lower bound ``min_scale``, optional upper bound
  ``max_gain_scale``.
* ``"bias"``: any other tensor of at most one dimension; lower bound 0.

A tensor whose initial norm is 0 (zero biases, zero-initialized residual gains) cannot
be rescaled: it keeps scale 1 and is listed as *unscalable*.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from initopt.core.precision import half_dtypes, to_float32
from initopt.errors import ModelError

__all__ = ["Block", "ScaleSpace", "apply_scales_", "infer_role"]


def infer_role(tensor: torch.Tensor) -> str:
    """Role of a parameter tensor: ``"weight"``, ``"gain"`` or ``"bias"`` (see module docs)."""
    if tensor.ndim >= 2:
        return "weight"
    with torch.no_grad():
        if tensor.numel() > 0 and (bool((tensor > 0).all()) or bool((tensor < 0).all())):
            return "gain"
    return "bias"


@dataclass(frozen=True, eq=False)
class Block:
    """One trainable tensor, reached under ``names`` (``names[0]`` is the canonical name)."""

    names: tuple[str, ...]
    param: torch.Tensor
    role: str
    init_norm: float

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def scalable(self) -> bool:
        return self.init_norm > 0.0


class ScaleSpace:
    """The trainable tensors of a model as blocks, with one scale variable each.

    Args:
        model: the network; its parameters are only read.
        min_scale: lower bound on the scale of weights and gains (:math:`\\alpha_{\\min}`).
        max_gain_scale: optional upper bound on the scale of gains (``None``: no bound).
        params: optional selection: an iterable of parameter names, or a module prefix such
            as ``"layers.3"`` (``None``: every trainable tensor).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        min_scale: float = 0.01,
        max_gain_scale: float | None = None,
        params: Iterable[str] | str | None = None,
    ) -> None:
        groups: dict[int, list[str]] = {}
        tensors: dict[int, torch.Tensor] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if not p.requires_grad:
                continue
            groups.setdefault(id(p), []).append(name)
            tensors[id(p)] = p
        if isinstance(params, str):
            prefix = params.rstrip(".")
            wanted = {n for names in groups.values() for n in names if n == prefix or n.startswith(prefix + ".")}
            if not wanted:
                raise ModelError(f"no trainable parameter under the module prefix {params!r}")
            params = wanted
        if params is not None:
            wanted = set(params)
            unknown = wanted - {n for names in groups.values() for n in names}
            if unknown:
                raise ModelError(
                    f"unknown or frozen parameter names {sorted(unknown)}; "
                    "expected names from model.named_parameters() with requires_grad=True"
                )
            groups = {k: v for k, v in groups.items() if wanted.intersection(v)}
        if not groups:
            raise ModelError(
                f"{type(model).__name__} has no trainable parameters "
                "(every parameter has requires_grad=False, or the model has none)"
            )
        blocks = []
        for key, names in groups.items():
            p = tensors[key]
            if not p.is_floating_point():
                raise ModelError(f"parameter {names[0]!r} has dtype {p.dtype}; expected floating point")
            if p.device.type == "meta":
                raise ModelError(
                    f"parameter {names[0]!r} is on the meta device (shapes only, no values): materialize the "
                    "model first (e.g. model.to_empty(device=...) and its own init)"
                )
            with torch.no_grad():
                norm = float(torch.linalg.vector_norm(p.detach().double()))
            if not math.isfinite(norm):
                raise ModelError(f"parameter {names[0]!r} holds non-finite values")
            blocks.append(Block(tuple(names), p, infer_role(p), norm))
        self.blocks: list[Block] = blocks
        self.min_scale = float(min_scale)
        self.max_gain_scale = None if max_gain_scale is None else float(max_gain_scale)
        first = blocks[0].param
        self.device = first.device
        self.dtype = first.dtype if first.dtype in (torch.float64,) else torch.float32
        # a model with half-precision tensors is searched on float32 copies (core/precision.py)
        self.upcast = bool(half_dtypes(model))
        self._w0 = [to_float32(b.param.detach()) for b in blocks]

    def rebased(self, alpha: torch.Tensor) -> ScaleSpace:
        """A copy whose initial tensors are :math:`\\alpha_i W_i^0` (new tensors; the model's
        are not touched). Scales found on it multiply ``alpha``."""
        out = object.__new__(ScaleSpace)
        out.__dict__.update(self.__dict__)
        a = alpha.detach()
        with torch.no_grad():
            out._w0 = [w * a[i].to(w.device, w.dtype) for i, w in enumerate(self._w0)]
        out.blocks = [
            Block(b.names, b.param, b.role, float(b.init_norm * abs(float(a[i])))) for i, b in enumerate(self.blocks)
        ]
        return out

    # -- bounds and variables ----------------------------------------------------------

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.blocks]

    @property
    def initial(self) -> list[torch.Tensor]:
        """The initial tensors :math:`W_i^0` (detached views of the user's parameters; float32
        copies of half-precision ones)."""
        return self._w0

    @property
    def scalable_mask(self) -> torch.Tensor:
        return torch.tensor([b.scalable for b in self.blocks], device=self.device)

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Lower and upper bounds of the scales, one entry per block."""
        lo, hi = [], []
        for b in self.blocks:
            lo.append(0.0 if b.role == "bias" else self.min_scale)
            cap = self.max_gain_scale if b.role == "gain" and self.max_gain_scale else math.inf
            hi.append(cap)
        kw = {"device": self.device, "dtype": self.dtype}
        return torch.tensor(lo, **kw), torch.tensor(hi, **kw)

    def ones(self) -> torch.Tensor:
        """Scales of 1, one per block."""
        return torch.ones(len(self.blocks), device=self.device, dtype=self.dtype)

    # -- evaluation ------------------------------------------------------------------------

    def leaves(self, alpha: torch.Tensor) -> list[torch.Tensor]:
        """Detached leaf tensors :math:`\\alpha_i W_i^0` that require grad.

        The gradient of any objective with respect to :math:`\\alpha_i` is then
        :math:`\\langle \\nabla_{\\theta_i} J, W_i^0 \\rangle` (:meth:`scale_grad`).
        """
        a = alpha.detach()
        return [(w * a[i].to(w.device, w.dtype)).requires_grad_(True) for i, w in enumerate(self._w0)]

    def scaled(self, alpha: torch.Tensor) -> list[torch.Tensor]:
        """Tensors :math:`\\alpha_i W_i^0` carrying the graph to ``alpha``."""
        return [w * alpha[i].to(w.device, w.dtype) for i, w in enumerate(self._w0)]

    def scale_grad(self, theta_grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """:math:`\\partial J / \\partial \\alpha_i = \\langle \\nabla_{\\theta_i} J, W_i^0\\rangle`."""
        out = []
        for g, w in zip(theta_grads, self._w0, strict=True):
            if g is None:
                out.append(torch.zeros((), device=self.device, dtype=self.dtype))
            else:
                out.append(torch.dot(g.reshape(-1), w.reshape(-1)).to(self.device, self.dtype))
        return torch.stack(out)

    def as_dict(self, tensors: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` for every name of every block (tied names share a tensor)."""
        return {n: t for b, t in zip(self.blocks, tensors, strict=True) for n in b.names}

    def to_scales(self, alpha: torch.Tensor) -> dict[str, float]:
        """Scales of the scalable blocks as ``{canonical name: float}``."""
        values = alpha.detach().double().cpu().tolist()
        return {b.name: v for b, v in zip(self.blocks, values, strict=True) if b.scalable}

    @property
    def unscalable(self) -> list[str]:
        return [b.name for b in self.blocks if not b.scalable]


def apply_scales_(model: nn.Module, scales: dict[str, Any]) -> nn.Module:
    """Fold per-tensor scales into a model in place: ``p.mul_(scales[name])``.

    The one function of initopt that writes into the user's model. ``Parameter`` objects
    keep their identity, so optimizers, hooks and tied weights survive; a tied tensor named
    more than once is scaled once. All names are checked before anything is written.

    Args:
        model: the network to change.
        scales: ``{parameter name: scale}``; any name that reaches the tensor may be used. Or
            what :func:`initopt.load_scales` returned: then the recorded shapes are checked too,
            so scales saved from another architecture are refused.

    Returns:
        The model.

    Example:
        >>> m = torch.nn.Linear(2, 2); w = m.weight.detach().clone()
        >>> _ = apply_scales_(m, {"weight": 2.0}); bool(torch.equal(m.weight, 2 * w))
        True
    """
    by_name = dict(model.named_parameters(remove_duplicate=False))
    if isinstance(scales.get("scales"), dict):  # a loaded scales file
        shapes = scales.get("shapes") or {}
        scales = scales["scales"]
        for name, shape in shapes.items():
            if name in by_name and list(by_name[name].shape) != list(shape):
                raise ModelError(
                    f"apply_scales_: {name!r} has shape {list(by_name[name].shape)} in the model but {list(shape)} "
                    "in the scales file: the scales come from another model"
                )
    todo: dict[int, tuple[torch.Tensor, float, str]] = {}
    for name, s in scales.items():
        if name not in by_name:
            raise ModelError(f"apply_scales_: the model has no parameter named {name!r}")
        s = float(s)
        if not math.isfinite(s):
            raise ModelError(f"apply_scales_: scale of {name!r} is {s}; expected a finite number")
        p = by_name[name]
        if id(p) in todo and todo[id(p)][1] != s:
            raise ModelError(f"apply_scales_: tied names {todo[id(p)][2]!r} and {name!r} get different scales")
        todo[id(p)] = (p, s, name)
    with torch.no_grad():
        for p, s, _ in todo.values():
            if s != 1.0:
                p.mul_(s)
    return model
