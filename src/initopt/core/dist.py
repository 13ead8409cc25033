"""Distributed runs: the few collectives a search needs under ``torch.distributed``.

Under ``torchrun`` (any backend: gloo on CPU, nccl on GPU) every rank calls
:func:`initopt.initialize_` on its own copy of the bare model with its own data shard. Each
rank evaluates the method's objective on its shard; what drives the search is then averaged
over ranks with :func:`all_reduce_mean`:

* the scale gradients (one scalar per tensor, one all-reduce of ``n`` scalars per iteration),
* every data-derived quantity a decision reads (gradient-norm bound checks, measured
  variances and moments, Hessian-block norms, trial losses), so all ranks take the same branch,
* the measures reported before and after.

Ranks are weighted equally (as DDP averages gradients). Randomness that is not the data
(probes, noise inputs) comes from the same seed on every rank. :func:`agree_` checks at the end
that the scales are identical on all ranks.

Outside ``torch.distributed`` (not initialized, or a world of one), and inside :func:`local`,
every function here is a no-op that returns its input: single-process runs are unchanged and
pay nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as torch_dist

from initopt.errors import DistributedError

__all__ = [
    "DistributedError",
    "active",
    "agree_",
    "all_reduce_mean",
    "check_same",
    "fail_together",
    "local",
    "mean_floats",
    "pool_moments_",
    "rank",
    "world_size",
]

_LOCAL: contextvars.ContextVar[bool] = contextvars.ContextVar("initopt_dist_local", default=False)


def _initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def world_size() -> int:
    """Number of ranks of the default process group (1 when not distributed)."""
    return torch_dist.get_world_size() if _initialized() else 1


def rank() -> int:
    """This process's rank in the default process group (0 when not distributed)."""
    return torch_dist.get_rank() if _initialized() else 0


def active() -> bool:
    """Whether searches reduce across ranks: ``torch.distributed`` is initialized with more than
    one rank and we are not inside :func:`local`."""
    return not _LOCAL.get() and _initialized() and torch_dist.get_world_size() > 1


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Run searches on this rank alone, without any collective (e.g. on rank 0 only, then
    broadcast the model yourself).

    Example:
        >>> with local():
        ...     active()
        False
    """
    token = _LOCAL.set(True)
    try:
        yield
    finally:
        _LOCAL.reset(token)


def _comm_device(t: torch.Tensor) -> torch.device:
    """Where the backend can reduce ``t``: nccl needs a CUDA tensor, gloo takes CPU tensors."""
    if torch_dist.get_backend() == "nccl" and t.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def _reduce(t: torch.Tensor, op: Any) -> torch.Tensor:
    """``t`` reduced with ``op`` over ranks, as a new tensor on ``t``'s device and dtype."""
    dev = _comm_device(t)
    # half precision is summed in float32 (and not every backend reduces bfloat16)
    wide = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype
    buf = t.detach().to(dev, dtype=wide, copy=True).contiguous()
    torch_dist.all_reduce(buf, op=op)
    return buf.to(t.device)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over ranks (a new tensor, identical on every rank); ``t`` itself when
    not :func:`active`.

    The sum is reduced and divided by the world size, so every rank gets the same bits. A NaN or
    infinity on any rank gives a non-finite mean on every rank.

    Example:
        >>> all_reduce_mean(torch.tensor([1.0, 2.0])).tolist()  # not distributed: unchanged
        [1.0, 2.0]
    """
    if not active():
        return t
    return (_reduce(t, torch_dist.ReduceOp.SUM) / world_size()).to(t.dtype)


def mean_floats(values: Sequence[float]) -> list[float]:
    """Python floats averaged over ranks in one all-reduce (float64); unchanged when not active."""
    if not active():
        return list(values)
    return all_reduce_mean(torch.tensor(list(values), dtype=torch.float64)).tolist()


def pool_moments_(stats: Sequence[Any], extra: torch.Tensor | None = None) -> torch.Tensor | None:
    """Pool running moments over ranks in place, and average ``extra`` in the same all-reduce.

    Each entry of ``stats`` has ``count`` (int), ``mean`` and ``m2`` (0-d tensors or ``None``: a
    running mean and sum of squared deviations, as :class:`initopt.core.affine.AffineUse`).
    Afterwards each holds the moments of the union of all ranks' elements (every element counts
    once, whichever rank saw it). The entries must be the same, in the same order, on every rank.

    Returns ``extra`` averaged over ranks (``extra`` itself when not active).
    """
    if not active():
        return extra
    rows = []
    for s in stats:
        n = float(s.count) if s.mean is not None else 0.0
        mean = float(s.mean) if s.mean is not None else 0.0
        m2 = float(s.m2) if s.m2 is not None else 0.0
        rows += [n, n * mean, m2 + n * mean * mean]
    k = len(rows)
    flat = torch.tensor(rows, dtype=torch.float64)
    if extra is not None:
        flat = torch.cat([flat, extra.detach().reshape(-1).double().cpu()])
    total = _reduce(flat, torch_dist.ReduceOp.SUM)
    for j, s in enumerate(stats):
        n, s1, s2 = total[3 * j : 3 * j + 3].unbind()
        if float(n) == 0:
            continue
        like = s.mean if s.mean is not None else torch.zeros((), dtype=torch.float64)
        mean = s1 / n
        s.count = int(n)
        s.mean = mean.to(like.device)
        s.m2 = (s2 - n * mean * mean).clamp_min(0).to(like.device)
    if extra is None:
        return None
    return (total[k:] / world_size()).reshape(extra.shape).to(extra.device, extra.dtype)


def check_same(values: torch.Tensor, what: str, labels: Sequence[str] | None = None) -> None:
    """Raise :class:`DistributedError` on every rank unless ``values`` (same shape everywhere)
    are bit-identical on all ranks; ``labels`` name the entries in the message. One all-reduce
    of ``2 * values.numel()`` scalars."""
    if not active():
        return
    v = values.detach().double().reshape(-1)
    both = _reduce(torch.cat([v, -v]), torch_dist.ReduceOp.MAX)
    hi, lo = both[: v.numel()], -both[v.numel() :]
    if not bool(torch.equal(hi, lo)):
        bad = int((hi != lo).nonzero()[0, 0]) if bool((hi != lo).any()) else 0
        entry = labels[bad] if labels is not None and bad < len(labels) else f"entry {bad}"
        raise DistributedError(
            f"{what} differ across the {world_size()} ranks (first difference: {entry}, "
            f"{float(lo[bad])!r} vs {float(hi[bad])!r})"
        )


def fail_together(error: BaseException | None, what: str) -> None:
    """Tell every rank whether some rank failed a step that all must pass (one all-reduce).

    Every rank calls it at the same point, with the error it caught there or ``None``. A rank
    whose own ``error`` is set returns (the caller raises its own error); when only other ranks
    failed, :class:`DistributedError` is raised here, naming the first failed rank. So a failure
    on one rank ends every rank instead of leaving the others waiting in the next collective.
    """
    if not active():
        return
    flag = torch.tensor([1.0 if error is not None else 0.0, float(-rank() if error is not None else -world_size())])
    failed, first = _reduce(flag, torch_dist.ReduceOp.MAX).tolist()
    if failed and error is None:
        raise DistributedError(f"{what} failed on rank {int(-first)} (see that rank's error); every rank stops")


def agree_(alpha: torch.Tensor, name: str, *, rtol: float = 1e-6) -> torch.Tensor:
    """Make the final scales bit-identical on every rank, or fail on every rank.

    One all-reduce (max and min of every scale). Identical: returned as they are. Within
    ``rtol`` (round-off of non-deterministic kernels): rank 0's scales, broadcast, are used
    everywhere. Further apart (the ranks took different decisions: a bug, or data-dependent
    control flow in the model): :class:`DistributedError`. If any rank has a non-finite scale,
    every rank gets NaN scales, so that the caller's finiteness check fails everywhere alike.
    """
    if not active():
        return alpha
    a = alpha.detach().double().reshape(-1)
    bad = torch.tensor([0.0 if bool(torch.isfinite(a).all()) else 1.0], dtype=torch.float64, device=a.device)
    both = _reduce(torch.cat([a, -a, bad]), torch_dist.ReduceOp.MAX)
    n = a.numel()
    hi, lo, nonfinite = both[:n], -both[n : 2 * n], float(both[-1])
    if nonfinite > 0:
        return torch.full_like(alpha, math.nan)
    if bool(torch.equal(hi, lo)):
        return alpha
    gap = float(((hi - lo).abs() / hi.abs().clamp_min(1e-300)).max())
    if gap > rtol:
        raise DistributedError(
            f"{name}: the ranks ended with different scales (largest relative difference {gap:.3g}); "
            "they should take the same decisions from reduced measures: does the model's forward pass "
            "depend on the data (control flow), or do the ranks run different code?"
        )
    out = alpha.detach().clone().to(_comm_device(alpha)).contiguous()
    torch_dist.broadcast(out, src=0)
    return out.to(alpha.device)
