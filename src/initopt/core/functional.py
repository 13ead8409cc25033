"""Functional evaluation of a network at other parameters, and the search mode.

The network is evaluated at :math:`\\theta(\\alpha)` with :func:`torch.func.functional_call`
on a dict of tensors; the user's ``Parameter`` objects are never replaced, and buffers are
*copies*, so BatchNorm cannot write running statistics into the model.

:func:`search_mode` puts the model in the state every search runs in and restores every
module's ``training`` flag on exit, also on exceptions and ``KeyboardInterrupt``.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from initopt.core.batches import Batch, Task, check_loss
from initopt.core.blocks import ScaleSpace
from initopt.core.precision import HALF, batch_to_float32, to_float32
from initopt.errors import LossError

__all__ = [
    "DROPOUT_FUNCTIONS",
    "Evaluator",
    "NoDropout",
    "caller_handles_dropout",
    "check_finite_loss",
    "evaluation",
    "search_mode",
]

DROPOUT_FUNCTIONS = frozenset(
    {
        F.dropout,
        F.dropout1d,
        F.dropout2d,
        F.dropout3d,
        F.alpha_dropout,
        F.feature_alpha_dropout,
        torch.dropout,
        torch.alpha_dropout,
        torch.feature_alpha_dropout,
        torch.feature_dropout,
    }
)


class NoDropout(TorchFunctionMode):
    """Makes every dropout the identity: the ``F.dropout`` family, the ``dropout_p`` of
    scaled-dot-product attention and of ``F.multi_head_attention_forward``.

    (A function mode is not active inside the functions it intercepts, so functions that
    call dropout internally are handled by their dropout argument.)
    """

    intercepted = False  # set once a dropout function was called under this mode

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func in DROPOUT_FUNCTIONS:
            self.intercepted = True
            return args[0] if args else kwargs["input"]
        position = _DROPOUT_ARG.get(func)
        if position is not None:
            self.intercepted = True
            if len(args) > position:
                args = (*args[:position], 0.0, *args[position + 1 :])
            else:
                kwargs = {**kwargs, "dropout_p": 0.0}
        return func(*args, **kwargs)


_DROPOUT_ARG = {F.scaled_dot_product_attention: 4, F.multi_head_attention_forward: 10}


# Set inside search_mode: forwards run by an Evaluator then turn every dropout off. The
# function mode is entered around forwards only, so the bookkeeping between them (norms,
# scale gradients, optimizer) does not pay its per-call Python cost.
_DROPOUT_OFF: contextvars.ContextVar[bool] = contextvars.ContextVar("initopt_dropout_off", default=False)


@contextlib.contextmanager
def caller_handles_dropout() -> Iterator[None]:
    """Inside this context, forwards run by an :class:`Evaluator` leave dropout as it is, so a
    caller can place :class:`NoDropout` itself, e.g. below a function mode that must see the
    dropout calls (and their ``p``) before they become the identity."""
    token = _DROPOUT_OFF.set(False)
    try:
        yield
    finally:
        _DROPOUT_OFF.reset(token)


@contextlib.contextmanager
def search_mode(model: nn.Module, mode: str = "train") -> Iterator[nn.Module]:
    """Enter the state in which a search evaluates the model; restore it on exit.

    ``mode="train"``: every module in training mode (BatchNorm uses batch statistics; the
    running buffers are protected by :class:`Evaluator`'s buffer copies) with every dropout
    turned off. ``mode="eval"``: every module in eval mode. In both, scaled-dot-product
    attention runs on the math backend, which supports double backward.
    """
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.train(mode == "train")
        with contextlib.ExitStack() as stack:
            token = _DROPOUT_OFF.set(True)
            stack.callback(_DROPOUT_OFF.reset, token)
            try:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
            except ImportError:  # pragma: no cover - torch < 2.3
                pass
            yield model
    finally:
        for m, flag in flags:
            m.training = flag


class _Caller(nn.Module):
    """Holds the model as ``m`` so that ``functional_call`` can run any ``forward_fn``."""

    def __init__(self, model: nn.Module, task: Task) -> None:
        super().__init__()
        self.m = model
        self._task = task

    def forward(self, batch: Batch) -> Any:
        return self._task.forward(self.m, batch)


class _Swap:
    """Puts tensors into a module's parameter and buffer slots for one call and restores them,
    as :func:`torch.func.functional_call` does, with the slots looked up once (``None`` when a
    name is not a plain parameter or buffer slot: the caller then uses ``functional_call``)."""

    def __init__(self, root: nn.Module, names: list[str]) -> None:
        slots = []
        for name in names:
            owner_name, _, attr = name.rpartition(".")
            try:
                owner = root.get_submodule(owner_name)
            except AttributeError:
                self.slots = None
                return
            if attr in owner._parameters:
                slots.append((owner._parameters, attr))
            elif attr in owner._buffers:
                slots.append((owner._buffers, attr))
            else:
                self.slots = None
                return
        self.slots: list[tuple[dict[str, Any], str]] | None = slots

    @contextlib.contextmanager
    def __call__(self, tensors: list[torch.Tensor]) -> Iterator[None]:
        assert self.slots is not None
        saved = [d[k] for d, k in self.slots]
        try:
            for (d, k), t in zip(self.slots, tensors, strict=True):
                d[k] = t
            yield
        finally:
            for (d, k), t in zip(self.slots, saved, strict=True):
                d[k] = t


def check_finite_loss(loss: torch.Tensor, where: str) -> None:
    """Raise :class:`~initopt.LossError` unless the scalar ``loss`` is finite."""
    if not bool(torch.isfinite(loss.detach())):
        raise LossError(
            f"the loss on {where} is {float(loss.detach())}: non-finite (NaN/Inf in the data, the "
            "model's output or the loss; or the scales reached a region where the loss overflows)"
        )


class Evaluator:
    """Loss of the model at arbitrary values of its trainable tensors.

    Args:
        model: the network (only read).
        space: its blocks.
        task: batch form and loss.
    """

    def __init__(self, model: nn.Module, space: ScaleSpace, task: Task) -> None:
        self.model = model
        self.space = space
        self.task = task
        self._caller = _Caller(model, task)
        self._swap_key: tuple[str, ...] | None = None
        self._swap: Any = None
        self._dropout_seen: dict[bool, bool] = {}
        self.fresh_buffers()

    def fresh_buffers(self) -> None:
        """Reset the buffer copies to the model's current buffers.

        For a half-precision model (``space.upcast``) the copies are float32, and so are the
        parameters outside the space, passed as copies too (:mod:`initopt.core.precision`).
        """
        named = self.model.named_buffers(remove_duplicate=False)
        if not self.space.upcast:
            self._buffers = {"m." + n: b.detach().clone() for n, b in named}
            return
        self._buffers = {"m." + n: to_float32(b.detach()).clone() for n, b in named}
        scaled = {n for b in self.space.blocks for n in b.names}
        for n, p in self.model.named_parameters(remove_duplicate=False):
            if n not in scaled and p.dtype in HALF:
                self._buffers["m." + n] = p.detach().float()

    def output(self, tensors: list[torch.Tensor], batch: Batch) -> Any:
        """Model output with the blocks' tensors replaced by ``tensors``.

        Equivalent to :func:`torch.func.functional_call` of the model on the blocks' tensors
        and the buffer copies. Where every name is a plain parameter or buffer slot of the
        module tree, the slots are swapped directly (looked up once; restored on exit, also
        on exceptions), which saves ``functional_call``'s per-call traversal of the module
        tree. Inside :func:`search_mode` dropout is turned off by :class:`NoDropout`,
        entered only for models whose forward calls a dropout function: the first forward
        in each training mode runs under the mode and records whether one was called.
        """
        state = {"m." + k: v for k, v in self.space.as_dict(tensors).items()}
        state.update(self._buffers)
        if self.space.upcast:
            batch = batch_to_float32(batch)
        swap = self._swap_for(state)
        if _DROPOUT_OFF.get():
            seen = self._dropout_seen.get(self.model.training)
            if seen is None:
                mode = NoDropout()
                with mode:
                    out = self._call(swap, state, batch)
                self._dropout_seen[self.model.training] = mode.intercepted
                return out
            if seen:
                with NoDropout():
                    return self._call(swap, state, batch)
        return self._call(swap, state, batch)

    def _swap_for(self, state: dict[str, torch.Tensor]) -> _Swap | None:
        key = tuple(state)
        if self._swap_key != key:
            self._swap_key, self._swap = key, _Swap(self._caller, list(key))
        return self._swap if self._swap.slots is not None else None

    def _call(self, swap: _Swap | None, state: dict[str, torch.Tensor], batch: Batch) -> Any:
        if swap is None:
            return torch.func.functional_call(self._caller, state, (batch,), strict=False)
        with swap(list(state.values())):
            return self._caller(batch)

    def loss(self, tensors: list[torch.Tensor], batch: Batch, where: str = "a batch") -> torch.Tensor:
        """Scalar loss with the blocks' tensors replaced by ``tensors``.

        Raises :class:`~initopt.LossError` when it is not a finite scalar: every search and
        diagnostic stops there, and :func:`initopt.initialize_` leaves the model as it was.
        (Under ``torch.func`` transforms such as ``vmap`` the value cannot be read; the
        callers there check what they compute from it.)
        """
        out = self.output(tensors, batch)
        loss = check_loss(self.task.loss(out, batch), where)
        if not torch._C._are_functorch_transforms_active():
            check_finite_loss(loss, where)
        return loss

    def loss_fn(self, batch: Batch) -> Callable[[list[torch.Tensor]], torch.Tensor]:
        """``tensors -> loss`` on a fixed batch."""
        return lambda tensors: self.loss(tensors, batch)


@contextlib.contextmanager
def evaluation(
    model: nn.Module,
    *,
    loss_fn: Callable[[Any, Batch], torch.Tensor] | None = None,
    forward_fn: Callable[[nn.Module, Batch], Any] | None = None,
    params: Any = None,
    mode: str = "train",
) -> Iterator[Evaluator]:
    """Read-only evaluation context for diagnostics.

    Yields an :class:`Evaluator` over the selected trainable tensors (``params``: names or a
    module prefix, see :class:`ScaleSpace`) inside :func:`search_mode`. Nothing in the model
    changes: not its parameters, buffers, modes or ``.grad``. Move batches to
    ``evaluator.space.device`` with :func:`initopt.core.batches.move_batch`.
    """
    space = ScaleSpace(model, params=params)
    ev = Evaluator(model, space, Task(loss_fn=loss_fn, forward_fn=forward_fn))
    with search_mode(model, mode):
        yield ev
