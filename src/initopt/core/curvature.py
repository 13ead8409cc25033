"""Matrix-free curvature: Hessian- and Gauss–Newton-vector products and the estimators built on them.

The Hessian of a scalar loss :math:`L(\\theta)` is never formed. Everything here needs only
products :math:`v \\mapsto Hv`:

* **Hessian-vector product** (Pearlmutter 1994), :math:`Hv = \\nabla_\\theta \\langle
  \\nabla_\\theta L, v\\rangle`, by *double backward* (reverse over reverse) or by
  *forward over reverse*, ``torch.func.jvp`` of ``torch.func.grad`` (falls back to double
  backward where a model has no forward-mode derivative, e.g. BatchNorm writing running
  statistics inside a transform).
* **Gauss–Newton-vector product** :math:`G v = J^\\top H_{\\mathrm{out}} J v` with
  :math:`J = \\partial f/\\partial\\theta` the Jacobian of the model output and
  :math:`H_{\\mathrm{out}} = \\partial^2 \\ell/\\partial f^2` the loss Hessian w.r.t. the
  output: :math:`Jv` by the transpose of a vector-Jacobian product, :math:`J^\\top u` by one.
* Operators restricted to any block of tensors (a layer) and averaged over several batches,
  :math:`H = \\sum_b w_b H_b` with :math:`w_b \\propto` batch size.

Estimators take any *operator* (an object with ``dim``, ``dtype``, ``device`` and
``matvec(v)`` on flat vectors, e.g. :class:`HessianOperator`, :class:`DenseOperator`):

* :func:`lanczos` with full reorthogonalization (Lanczos 1950; Golub & Van Loan §10.1),
  :func:`top_eigenvalues` (largest magnitude, Ritz values) and :func:`power_iteration`;
* :func:`hutchinson` (Hutchinson 1989): :math:`\\operatorname{tr} H = \\mathbb E[v^\\top Hv]`
  and :math:`\\|H\\|_F^2 = \\mathbb E\\|Hv\\|^2` for Rademacher :math:`v`, from the same products;
* :func:`hutchpp` (Meyer, Musco, Musco, Woodruff 2021, "Hutch++"): exact on the range of
  :math:`HS`, Hutchinson on the rest;
* :func:`slq` stochastic Lanczos quadrature (Golub & Meurant 1994; Ubaru, Chen, Saad 2017;
  Ghorbani, Krishnan, Xiao 2019) for the spectral density.

Randomness comes from a ``torch.Generator`` passed in. No estimator synchronizes with the
host per product: scalars stay on the device and convergence is checked every
``check_every`` products.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from initopt.core.batches import Batch, batch_size
from initopt.core.functional import Evaluator
from initopt.errors import ConfigError, LossError

__all__ = [
    "Closure",
    "DenseOperator",
    "GaussNewtonOperator",
    "HessianOperator",
    "LanczosResult",
    "Operator",
    "PowerResult",
    "SpectralDensity",
    "flatten",
    "gauss_newton_operator",
    "gnvp",
    "hessian_operator",
    "hutchinson",
    "hutchpp",
    "hvp",
    "hvp_double_backward",
    "hvp_forward_over_reverse",
    "lanczos",
    "power_iteration",
    "rademacher",
    "ritz",
    "slq",
    "top_eigenvalues",
    "unflatten",
]

Closure = Callable[[Sequence[torch.Tensor]], torch.Tensor]
"""A loss as a function of a list of tensors."""

HVP_METHODS = ("auto", "double_backward", "forward_over_reverse")


# ---- flat vectors -------------------------------------------------------------------------


def flatten(tensors: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """Concatenate tensors into one flat vector."""
    return torch.cat([t.reshape(-1).to(dtype or t.dtype) for t in tensors])


def unflatten(vec: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split a flat vector into tensors shaped (and typed) like ``like``."""
    out, i = [], 0
    for t in like:
        n = t.numel()
        out.append(vec[i : i + n].view(t.shape).to(t.dtype))
        i += n
    return out


def rademacher(n: int, generator: torch.Generator | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A vector of ``n`` independent signs :math:`\\pm 1`."""
    dev = generator.device if generator is not None else device
    v = torch.randint(0, 2, (n,), generator=generator, device=dev).to(device=device, dtype=dtype)
    return v.mul_(2).sub_(1)


def _gaussian(n: int, generator: torch.Generator | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    dev = generator.device if generator is not None else device
    return torch.randn(n, generator=generator, device=dev, dtype=dtype).to(device)


def _zeros_for_none(grads: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, like, strict=True)]


# ---- single products ----------------------------------------------------------------------


def hvp_double_backward(
    closure: Closure, tensors: Sequence[torch.Tensor], vecs: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """:math:`Hv` by reverse over reverse: :math:`\\nabla_\\theta\\langle\\nabla_\\theta L, v\\rangle`."""
    leaves = [t.detach().requires_grad_(True) for t in tensors]
    loss = closure(leaves)
    g = _zeros_for_none(torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True), leaves)
    if not any(x.requires_grad for x in g):
        return [torch.zeros_like(t) for t in leaves]
    hv = torch.autograd.grad(g, leaves, grad_outputs=list(vecs), allow_unused=True)
    return _zeros_for_none(hv, leaves)


def hvp_forward_over_reverse(
    closure: Closure, tensors: Sequence[torch.Tensor], vecs: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """:math:`Hv` by forward over reverse: ``torch.func.jvp(torch.func.grad(L), (θ,), (v,))``."""
    primals = [t.detach() for t in tensors]
    tangents = [v.detach().to(t.dtype) for v, t in zip(vecs, primals, strict=True)]
    _, hv = torch.func.jvp(torch.func.grad(lambda ts: closure(list(ts))), (primals,), (tangents,))
    return list(hv)


def hvp(
    closure: Closure, tensors: Sequence[torch.Tensor], vecs: Sequence[torch.Tensor], method: str = "auto"
) -> list[torch.Tensor]:
    """One Hessian-vector product :math:`Hv` of ``closure`` at ``tensors``.

    ``method``: ``"forward_over_reverse"``, ``"double_backward"``, or ``"auto"`` (forward over
    reverse, falling back to double backward when the model has no forward-mode rule).

    Example:
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> hvp(lambda ts: (ts[0] ** 3).sum(), [x], [torch.ones_like(x)])[0]  # 6 x
        tensor([ 6., 12.], dtype=torch.float64)
    """
    if method not in HVP_METHODS:
        raise ConfigError(f"hvp method must be one of {HVP_METHODS}, got {method!r}")
    if method == "double_backward":
        return hvp_double_backward(closure, tensors, vecs)
    if method == "forward_over_reverse":
        return hvp_forward_over_reverse(closure, tensors, vecs)
    try:
        return hvp_forward_over_reverse(closure, tensors, vecs)
    except Exception:  # no forward-mode rule, or an in-place write inside the transform
        return hvp_double_backward(closure, tensors, vecs)


def gnvp(
    output_fn: Callable[[Sequence[torch.Tensor]], torch.Tensor],
    loss_of_output: Callable[[torch.Tensor], torch.Tensor],
    tensors: Sequence[torch.Tensor],
    vecs: Sequence[torch.Tensor],
) -> list[torch.Tensor]:
    """One Gauss–Newton-vector product :math:`J^\\top H_{\\mathrm{out}} J v`.

    ``output_fn(tensors)`` is the model output :math:`f(\\theta)` (a tensor) and
    ``loss_of_output(f)`` the loss as a function of it.
    """
    op = GaussNewtonOperator([output_fn], [loss_of_output], tensors)
    return unflatten(op.matvec(flatten(vecs, op.dtype)), op.tensors)


# ---- operators ----------------------------------------------------------------------------


class Operator(Protocol):
    """What the estimators need: a symmetric linear map on flat vectors."""

    dim: int
    dtype: torch.dtype
    device: torch.device

    def matvec(self, v: torch.Tensor) -> torch.Tensor: ...


class DenseOperator:
    """A dense symmetric matrix as an operator (brute-force reference for tests)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix
        self.dim = matrix.shape[0]
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.products = 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.products += 1
        return self.matrix @ v


def _weights(sizes: Sequence[int] | None, n: int) -> list[float]:
    if sizes is None:
        return [1.0 / n] * n
    if len(sizes) != n or any(s <= 0 for s in sizes):
        raise ConfigError(f"need {n} positive batch weights, got {list(sizes)}")
    total = float(sum(sizes))
    return [s / total for s in sizes]


class _CurvatureBase:
    """Shared bookkeeping: the tensors, the selected block, flat-vector plumbing."""

    def __init__(self, tensors: Sequence[torch.Tensor], select: Sequence[int] | None, n_terms: int) -> None:
        self.all_tensors = [t.detach() for t in tensors]
        if not self.all_tensors:
            raise ConfigError("a curvature operator needs at least one tensor")
        self.select = list(range(len(self.all_tensors))) if select is None else list(select)
        if not self.select or any(not 0 <= i < len(self.all_tensors) for i in self.select):
            raise ConfigError(f"block indices {self.select} out of range for {len(self.all_tensors)} tensors")
        self.tensors = [self.all_tensors[i] for i in self.select]
        self.dim = sum(t.numel() for t in self.tensors)
        self.dtype = self.tensors[0].dtype
        self.device = self.tensors[0].device
        self.products = 0
        self._n_terms = n_terms

    def _merge(self, selected: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        full = list(self.all_tensors)
        for i, t in zip(self.select, selected, strict=True):
            full[i] = t
        return full

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v)


class HessianOperator(_CurvatureBase):
    """:math:`v \\mapsto Hv`, :math:`H = \\sum_b w_b \\nabla^2_{\\theta_S} L_b` for a block ``S``.

    Args:
        closures: one loss closure per batch, each a function of *all* ``tensors``.
        tensors: the point :math:`\\theta` (detached copies are kept).
        select: indices of the tensors that form the block (``None``: all); the others are
            held fixed.
        weights: per-batch weights (normalized; ``None``: equal). Pass batch sizes to get the
            Hessian of the mean loss over all examples.
        method: ``"double_backward"`` (the default), ``"forward_over_reverse"`` or ``"auto"``
            (forward over reverse with a fallback to double backward).
        reuse_graph: with double backward, build each batch's gradient graph
            (``create_graph=True``) once and reuse it for every product: one product then
            costs one backward of the backward (about two backward passes) instead of a full
            forward, backward and double backward. Holds that graph in memory.

    ``products`` counts the products taken (a Python int, no synchronization).
    """

    def __init__(
        self,
        closures: Sequence[Closure],
        tensors: Sequence[torch.Tensor],
        *,
        select: Sequence[int] | None = None,
        weights: Sequence[float] | None = None,
        method: str = "double_backward",
        reuse_graph: bool = True,
        _shared: dict[str, Any] | None = None,
    ) -> None:
        if method not in HVP_METHODS:
            raise ConfigError(f"hvp method must be one of {HVP_METHODS}, got {method!r}")
        if not closures:
            raise ConfigError("a HessianOperator needs at least one loss closure (one per batch)")
        super().__init__(tensors, select, len(closures))
        self.closures = list(closures)
        self.weights = _weights(weights, len(closures))
        self.method = method
        self.reuse_graph = reuse_graph
        # the gradient graphs are shared between blocks made by .block()
        self._shared = _shared if _shared is not None else {"graphs": {}, "fallback": False}

    @property
    def method_used(self) -> str:
        """The product actually used (``"auto"`` resolves after the first product)."""
        if self.method == "auto":
            return "double_backward" if self._shared["fallback"] else "forward_over_reverse"
        return self.method

    def block(self, select: Sequence[int]) -> HessianOperator:
        """The operator of a sub-block (indices into the *full* tensor list); graphs are shared."""
        return HessianOperator(
            self.closures,
            self.all_tensors,
            select=select,
            weights=self.weights,
            method=self.method,
            reuse_graph=self.reuse_graph,
            _shared=self._shared,
        )

    def release(self) -> None:
        """Free the cached gradient graphs."""
        self._shared["graphs"].clear()

    def _graph(self, b: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        graphs = self._shared["graphs"]
        if b not in graphs:
            leaves = [t.requires_grad_(True) for t in (x.detach() for x in self.all_tensors)]
            loss = self.closures[b](leaves)
            g = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
            graphs[b] = (leaves, _zeros_for_none(g, leaves))
        return graphs[b]

    def _product(self, b: int, vecs: list[torch.Tensor]) -> list[torch.Tensor]:
        closure = self.closures[b]

        def on_block(sel: Sequence[torch.Tensor]) -> torch.Tensor:
            return closure(self._merge(sel))

        method = self.method_used
        if method == "forward_over_reverse":
            try:
                return hvp_forward_over_reverse(on_block, self.tensors, vecs)
            except Exception:
                if self.method != "auto":
                    raise
                self._shared["fallback"] = True
        if not self.reuse_graph:
            return hvp_double_backward(on_block, self.tensors, vecs)
        leaves, g = self._graph(b)
        gs = [g[i] for i in self.select]
        ls = [leaves[i] for i in self.select]
        if not any(x.requires_grad for x in gs):
            return [torch.zeros_like(t) for t in ls]
        hv = torch.autograd.grad(gs, ls, grad_outputs=vecs, retain_graph=True, allow_unused=True)
        return _zeros_for_none(hv, ls)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """:math:`Hv` for a flat vector ``v`` of length ``dim``."""
        vecs = unflatten(v, self.tensors)
        out: torch.Tensor | None = None
        for b, w in enumerate(self.weights):
            hv = flatten(self._product(b, vecs), self.dtype)
            out = hv * w if out is None else out.add_(hv, alpha=w)
        self.products += 1
        assert out is not None
        return out


class GaussNewtonOperator(_CurvatureBase):
    """:math:`v \\mapsto \\sum_b w_b J_b^\\top H_{\\mathrm{out},b} J_b v` (generalized Gauss–Newton).

    The graph of each batch's output and of its loss w.r.t. the output are built once and
    reused: :math:`Jv` is the vector-Jacobian product of the (linear) map
    :math:`u \\mapsto J^\\top u` with :math:`v`; :math:`H_{\\mathrm{out}}u` a double backward
    through the loss alone; :math:`J^\\top h` one backward.

    Args:
        output_fns: per batch, the model output as a function of all ``tensors`` (a tensor).
        loss_fns: per batch, the loss as a function of that output.
        tensors, select, weights: as :class:`HessianOperator`.
    """

    def __init__(
        self,
        output_fns: Sequence[Callable[[Sequence[torch.Tensor]], torch.Tensor]],
        loss_fns: Sequence[Callable[[torch.Tensor], torch.Tensor]],
        tensors: Sequence[torch.Tensor],
        *,
        select: Sequence[int] | None = None,
        weights: Sequence[float] | None = None,
    ) -> None:
        if not output_fns or len(output_fns) != len(loss_fns):
            raise ConfigError("a GaussNewtonOperator needs one output function and one loss function per batch")
        super().__init__(tensors, select, len(output_fns))
        self.output_fns = list(output_fns)
        self.loss_fns = list(loss_fns)
        self.weights = _weights(weights, len(output_fns))
        self._graphs: dict[int, Any] = {}

    def release(self) -> None:
        """Free the cached graphs."""
        self._graphs.clear()

    def _graph(self, b: int) -> Any:
        if b not in self._graphs:
            leaves = [t.detach().requires_grad_(True) for t in self.tensors]
            out = self.output_fns[b](self._merge(leaves))
            if not isinstance(out, torch.Tensor):
                raise LossError(
                    f"Gauss–Newton products need the model output as a tensor, got {type(out).__name__}; "
                    "pass a loss_fn(output, batch) and a forward_fn returning the logits"
                )
            u = torch.zeros_like(out, requires_grad=True)
            jtu = _zeros_for_none(torch.autograd.grad(out, leaves, u, create_graph=True, allow_unused=True), leaves)
            od = out.detach().requires_grad_(True)
            loss = self.loss_fns[b](od)
            (gout,) = torch.autograd.grad(loss, od, create_graph=True, allow_unused=True) or (None,)
            if gout is None or not gout.requires_grad:
                raise LossError(
                    "the loss does not depend on the model output through a twice-differentiable path; "
                    "Gauss–Newton products need loss_fn(output, batch) computed from the output"
                )
            self._graphs[b] = (leaves, out, u, jtu, od, gout)
        return self._graphs[b]

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        vecs = unflatten(v, self.tensors)
        out_vec: torch.Tensor | None = None
        for b, w in enumerate(self.weights):
            leaves, out, u, jtu, od, gout = self._graph(b)
            used = [(j, x) for j, x in zip(jtu, vecs, strict=True) if j.requires_grad]
            if not used:
                gv = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
            else:
                (jv,) = torch.autograd.grad([j for j, _ in used], u, [x for _, x in used], retain_graph=True)
                (hjv,) = torch.autograd.grad(gout, od, jv, retain_graph=True)
                g = torch.autograd.grad(out, leaves, hjv, retain_graph=True, allow_unused=True)
                gv = flatten(_zeros_for_none(g, leaves), self.dtype)
            out_vec = gv * w if out_vec is None else out_vec.add_(gv, alpha=w)
        self.products += 1
        assert out_vec is not None
        return out_vec


def _batch_weights(batches: Sequence[Batch]) -> list[float]:
    return [float(batch_size(b)) for b in batches]


def hessian_operator(
    evaluator: Evaluator,
    batches: Sequence[Batch],
    tensors: Sequence[torch.Tensor] | None = None,
    *,
    select: Sequence[int] | None = None,
    method: str = "double_backward",
    reuse_graph: bool = True,
) -> HessianOperator:
    """The Hessian of the mean loss over ``batches`` w.r.t. the evaluator's blocks.

    ``tensors``: the point (``None``: the model's current tensors); ``select``: a sub-block.
    Batches are weighted by their size.
    """
    if tensors is None:
        tensors = evaluator.space.initial
    closures = [(lambda ts, b=b: evaluator.loss(list(ts), b)) for b in batches]
    return HessianOperator(
        closures,
        tensors,
        select=select,
        weights=_batch_weights(batches),
        method=method,
        reuse_graph=reuse_graph,
    )


def gauss_newton_operator(
    evaluator: Evaluator,
    batches: Sequence[Batch],
    tensors: Sequence[torch.Tensor] | None = None,
    *,
    select: Sequence[int] | None = None,
) -> GaussNewtonOperator:
    """The Gauss–Newton matrix of the mean loss over ``batches`` (output = what the model returns)."""
    if tensors is None:
        tensors = evaluator.space.initial
    outs = [(lambda ts, b=b: evaluator.output(list(ts), b)) for b in batches]
    losses = [(lambda o, b=b: evaluator.task.loss(o, b)) for b in batches]
    return GaussNewtonOperator(outs, losses, tensors, select=select, weights=_batch_weights(batches))


# ---- Lanczos ------------------------------------------------------------------------------


@dataclass
class LanczosResult:
    """Tridiagonal :math:`T_m = Q^\\top A Q` from :math:`m` Lanczos steps.

    ``alphas`` (m,), ``betas`` (m−1,) on the operator's device, ``basis`` (m, n) when kept,
    ``products`` the number of operator products taken.
    """

    alphas: torch.Tensor
    betas: torch.Tensor
    basis: torch.Tensor | None
    products: int

    def tridiagonal(self) -> torch.Tensor:
        """:math:`T_m` as a dense float64 CPU matrix."""
        a = self.alphas.detach().double().cpu()
        b = self.betas.detach().double().cpu()
        return torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)


def ritz(alphas: torch.Tensor, betas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvectors of the tridiagonal ``(alphas, betas)`` (float64, CPU)."""
    a = alphas.detach().double().cpu()
    b = betas.detach().double().cpu()
    T = torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)
    return torch.linalg.eigh(T)


def lanczos(
    op: Operator,
    iters: int,
    *,
    generator: torch.Generator | None = None,
    v0: torch.Tensor | None = None,
    keep_basis: bool = False,
    stop: Callable[[torch.Tensor, torch.Tensor], bool] | None = None,
    check_every: int = 5,
) -> LanczosResult:
    """``iters`` Lanczos steps with full reorthogonalization (twice, "twice is enough").

    :math:`w = Aq_j - \\beta_{j-1}q_{j-1}`, :math:`\\alpha_j = q_j^\\top w`, then :math:`w` is
    orthogonalized against all previous :math:`q` (two Gram–Schmidt passes),
    :math:`\\beta_j = \\|w\\|`, :math:`q_{j+1} = w/\\beta_j`. On breakdown (an invariant subspace,
    :math:`\\beta_j \\approx 0`) the next vector is a fresh random one orthogonal to the basis
    and :math:`\\beta_j` is set to 0 — selected with ``torch.where``, without a host sync.

    ``stop(alphas, betas)`` (optional) is called every ``check_every`` steps and ends the
    iteration when it returns True; it is the only place the host waits for the device.
    """
    n = op.dim
    m = max(1, min(int(iters), n))
    dt, dev = op.dtype, op.device
    q = rademacher(n, generator, dt, dev) if v0 is None else v0.to(device=dev, dtype=dt).clone()
    q = q / torch.linalg.vector_norm(q)
    Q = torch.zeros(m, n, dtype=dt, device=dev)
    alphas = torch.zeros(m, dtype=dt, device=dev)
    betas = torch.zeros(max(m - 1, 0), dtype=dt, device=dev)
    beta_prev = torch.zeros((), dtype=dt, device=dev)
    eps = torch.finfo(dt).eps
    scale = torch.zeros((), dtype=dt, device=dev)
    taken = 0
    for j in range(m):
        Q[j] = q
        w = op.matvec(q)
        taken += 1
        if j > 0:
            w = w - beta_prev * Q[j - 1]
        a = torch.dot(q, w)
        alphas[j] = a
        w = w - a * q
        basis = Q[: j + 1]
        for _ in range(2):
            w = w - basis.T @ (basis @ w)
        if j == m - 1:
            break
        beta = torch.linalg.vector_norm(w)
        scale = torch.maximum(scale, a.abs() + beta)
        ok = beta > 100 * eps * scale * math.sqrt(n)
        r = _gaussian(n, generator, dt, dev)
        for _ in range(2):
            r = r - basis.T @ (basis @ r)
        r = r / torch.linalg.vector_norm(r).clamp_min(torch.finfo(dt).tiny)
        q = torch.where(ok, w / beta.clamp_min(torch.finfo(dt).tiny), r)
        beta = torch.where(ok, beta, torch.zeros_like(beta))
        betas[j] = beta
        beta_prev = beta
        if stop is not None and (j + 1) % check_every == 0 and stop(alphas[: j + 1], betas[: j + 1]):
            alphas, betas, Q = alphas[: j + 1], betas[:j], Q[: j + 1]
            break
    return LanczosResult(alphas, betas, Q if keep_basis else None, taken)


def _largest_magnitude(values: torch.Tensor, k: int) -> torch.Tensor:
    idx = torch.argsort(values.abs(), descending=True)[:k]
    return values[idx]


def top_eigenvalues(
    op: Operator,
    k: int = 1,
    *,
    iters: int | None = None,
    tol: float | None = 1e-8,
    generator: torch.Generator | None = None,
    v0: torch.Tensor | None = None,
    check_every: int = 5,
) -> torch.Tensor:
    """The ``k`` eigenvalues of largest magnitude, by Lanczos (Ritz values), largest first.

    ``iters``: Lanczos steps (``None``: ``min(n, max(30, 4k))``). ``tol``: stop early when the
    residual bound :math:`|\\beta_m s_{m,i}| \\le \\mathrm{tol}\\,|\\theta_i|` holds for the wanted
    Ritz pairs (checked every ``check_every`` steps; ``None``: run all steps).

    Returns a float64 CPU tensor of ``k`` values (fewer if the operator is smaller).
    """
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    n = op.dim
    m = min(n, max(30, 4 * k) if iters is None else int(iters))

    def converged(a: torch.Tensor, b: torch.Tensor) -> bool:
        if len(a) < k + 1:
            return False
        theta, S = ritz(a, b[: len(a) - 1])
        res = (b[len(a) - 1].double().cpu() * S[-1, :]).abs() if len(b) >= len(a) else torch.zeros_like(theta)
        idx = torch.argsort(theta.abs(), descending=True)[:k]
        return bool((res[idx] <= tol * theta[idx].abs().clamp_min(1e-300)).all())

    res = lanczos(op, m, generator=generator, v0=v0, stop=converged if tol else None, check_every=check_every)
    theta, _ = ritz(res.alphas, res.betas)
    return _largest_magnitude(theta, min(k, len(theta)))


@dataclass
class PowerResult:
    """Power iteration: the eigenvalue estimate, its vector, the Rayleigh quotient per product."""

    eigenvalue: torch.Tensor
    vector: torch.Tensor
    history: torch.Tensor
    products: int


def power_iteration(
    op: Operator,
    *,
    iters: int = 100,
    tol: float | None = 1e-6,
    generator: torch.Generator | None = None,
    v0: torch.Tensor | None = None,
    check_every: int = 5,
) -> PowerResult:
    """Largest-magnitude eigenvalue by power iteration (von Mises 1929).

    :math:`w = Av`, :math:`\\lambda = v^\\top w` (Rayleigh quotient, :math:`\\|v\\| = 1`),
    :math:`v \\leftarrow w/\\|w\\|`. Stops when :math:`|\\lambda_t - \\lambda_{t-c}| \\le
    \\mathrm{tol}\\,|\\lambda_t|` at a check every ``c = check_every`` products.
    """
    n = op.dim
    dt, dev = op.dtype, op.device
    v = rademacher(n, generator, dt, dev) if v0 is None else v0.to(device=dev, dtype=dt).clone()
    v = v / torch.linalg.vector_norm(v)
    hist = torch.zeros(iters, dtype=dt, device=dev)
    last = None
    t = 0
    for t in range(iters):
        w = op.matvec(v)
        hist[t] = torch.dot(v, w)
        v = w / torch.linalg.vector_norm(w).clamp_min(torch.finfo(dt).tiny)
        if tol is not None and (t + 1) % check_every == 0:
            cur = float(hist[t])
            if last is not None and abs(cur - last) <= tol * abs(cur):
                break
            last = cur
    k = t + 1
    return PowerResult(hist[t], v, hist[:k], k)


# ---- trace and Frobenius norm -------------------------------------------------------------


def hutchinson(
    op: Operator, probes: int, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hutchinson estimates of :math:`\\operatorname{tr} A` and :math:`\\|A\\|_F^2` from the same products.

    For Rademacher :math:`v`: :math:`\\mathbb E[v^\\top Av] = \\operatorname{tr}A` and
    :math:`\\mathbb E\\|Av\\|^2 = \\operatorname{tr}(A^\\top A) = \\|A\\|_F^2`; ``probes``
    products, averaged. Returns two 0-d tensors on the operator's device.
    """
    if probes < 1:
        raise ConfigError(f"probes must be at least 1, got {probes}")
    tr = torch.zeros((), dtype=op.dtype, device=op.device)
    fro = torch.zeros((), dtype=op.dtype, device=op.device)
    for _ in range(probes):
        v = rademacher(op.dim, generator, op.dtype, op.device)
        w = op.matvec(v)
        tr = tr + torch.dot(v, w)
        fro = fro + torch.dot(w, w)
    return tr / probes, fro / probes


def hutchpp(
    op: Operator, probes: int, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hutch++ estimates of :math:`\\operatorname{tr} A` and :math:`\\|A\\|_F^2` (Meyer et al. 2021).

    With ``probes`` = 3s products: :math:`Q = \\mathrm{orth}(AS)` for s Rademacher columns
    :math:`S`; :math:`\\operatorname{tr}A = \\operatorname{tr}(Q^\\top AQ) + \\frac1s\\sum
    g^\\top P^\\perp A P^\\perp g` and :math:`\\|A\\|_F^2 = \\|AQ\\|_F^2 + \\frac1s\\sum \\|AP^\\perp g\\|^2`,
    :math:`P^\\perp = I - QQ^\\top` (both unbiased given Q, exact when A has rank ≤ s).
    """
    s = max(1, probes // 3)
    n, dt, dev = op.dim, op.dtype, op.device
    S = torch.stack([rademacher(n, generator, dt, dev) for _ in range(s)], 1)
    AS = torch.stack([op.matvec(S[:, i]) for i in range(s)], 1)
    Q, _ = torch.linalg.qr(AS)
    AQ = torch.stack([op.matvec(Q[:, i]) for i in range(Q.shape[1])], 1)
    tr = torch.trace(Q.T @ AQ)
    fro = (AQ * AQ).sum()
    tr_r = torch.zeros((), dtype=dt, device=dev)
    fro_r = torch.zeros((), dtype=dt, device=dev)
    for _ in range(s):
        g = rademacher(n, generator, dt, dev)
        pg = g - Q @ (Q.T @ g)
        w = op.matvec(pg)
        tr_r = tr_r + torch.dot(pg, w - Q @ (Q.T @ w))
        fro_r = fro_r + torch.dot(w, w)
    return tr + tr_r / s, fro + fro_r / s


# ---- spectral density ---------------------------------------------------------------------


@dataclass
class SpectralDensity:
    """A spectral density from stochastic Lanczos quadrature.

    ``nodes`` and ``weights`` have shape (probes, m): for each probe the Ritz values
    :math:`\\theta_j` of its Lanczos tridiagonal and the weights :math:`\\tau_j = s_{1j}^2`
    (squared first components of the eigenvectors; each row sums to 1). The density is
    :math:`\\phi(t) = \\frac1{\\#\\mathrm{probes}}\\sum_{\\mathrm{probes}}\\sum_j \\tau_j
    \\delta(t - \\theta_j)`, normalized to integrate to 1 (divide by nothing: it is the density of
    the eigenvalue distribution :math:`\\frac1n\\sum_i\\delta(t-\\lambda_i)`).
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    dim: int

    def mean(self) -> float:
        """:math:`\\int t\\,\\phi(t)\\,dt`, an estimate of :math:`\\operatorname{tr}A / n`."""
        return float((self.nodes * self.weights).sum(1).mean())

    def total(self) -> float:
        """:math:`\\int \\phi = 1` (up to rounding)."""
        return float(self.weights.sum(1).mean())

    def smooth(self, grid: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
        """The density convolved with a Gaussian of width ``sigma`` on ``grid`` (integrates to ~1).

        ``sigma`` (``None``): 1 % of the spectrum's span.
        """
        lo, hi = float(self.nodes.min()), float(self.nodes.max())
        if sigma is None:
            sigma = max(hi - lo, 1e-12) * 0.01
        t = grid.double().reshape(-1, 1)
        x = self.nodes.double().reshape(1, -1)
        w = self.weights.double().reshape(1, -1) / self.nodes.shape[0]
        k = torch.exp(-0.5 * ((t - x) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        return (k * w).sum(1)

    def to_dict(self) -> dict[str, Any]:
        return {"nodes": self.nodes.tolist(), "weights": self.weights.tolist(), "dim": self.dim}


def slq(
    op: Operator, *, probes: int = 10, iters: int = 30, generator: torch.Generator | None = None
) -> SpectralDensity:
    """Stochastic Lanczos quadrature (Golub & Meurant; Ubaru et al. 2017; Ghorbani et al. 2019).

    For each of ``probes`` Rademacher vectors :math:`v` (normalized), ``iters`` Lanczos steps
    give :math:`T = S\\Theta S^\\top`; the Gauss quadrature
    :math:`v^\\top f(A) v \\approx \\sum_j s_{1j}^2 f(\\theta_j)` turns the nodes
    :math:`\\theta_j` and weights :math:`s_{1j}^2` into a density estimate. Its mean is
    :math:`\\frac1{\\#\\mathrm{probes}}\\sum v^\\top Av/\\|v\\|^2`, the Hutchinson trace estimate / n.
    """
    if probes < 1:
        raise ConfigError(f"probes must be at least 1, got {probes}")
    nodes, weights = [], []
    m = min(op.dim, iters)
    for _ in range(probes):
        res = lanczos(op, m, generator=generator)
        theta, S = ritz(res.alphas, res.betas)
        nodes.append(theta)
        weights.append(S[0, :] ** 2)
    return SpectralDensity(torch.stack(nodes), torch.stack(weights), op.dim)
