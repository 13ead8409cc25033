"""``initopt.diagnose``: a per-layer table and whole-model measures of a network at initialization.

Read-only: parameters, buffers, modes and ``.grad`` of the model are left as they were.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from initopt.core.batches import BatchSource, batch_size, check_finite
from initopt.core.functional import evaluation

__all__ = ["Report", "diagnose"]


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}g}"
    return str(v)


@dataclass(frozen=True)
class Report:
    """Diagnostics of one model on one batch.

    Attributes:
        layers: one dict per module that owns trainable tensors: ``layer``, ``type``,
            ``param_norm``, ``grad_norm``, ``grad_to_weight``, ``act_mean``, ``act_std``,
            ``hessian_spectral``, ``hessian_frobenius``.
        model: whole-model measures: ``loss``, ``grad_cosine_batch`` (D sub-batches),
            ``grad_cosine_sample``, ``gradient_quotient``, ``hessian_top_eigenvalue``,
            ``hessian_trace``.
        notes: measures that could not be taken, and why.
    """

    layers: list[dict[str, Any]]
    model: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "model": self.model, "notes": list(self.notes)}

    def to_markdown(self) -> str:
        cols = [
            "layer",
            "type",
            "param_norm",
            "grad_norm",
            "grad_to_weight",
            "act_mean",
            "act_std",
            "hessian_spectral",
            "hessian_frobenius",
        ]
        lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
        lines += ["| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |" for row in self.layers]
        lines += ["", "| measure | value |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in self.model.items()]
        if self.notes:
            lines += ["", *[f"- {n}" for n in self.notes]]
        return "\n".join(lines)

    def compare(self, other: Report, labels: tuple[str, str] = ("before", "after")) -> str:
        """Side-by-side markdown of two reports of the same model (for example before/after)."""
        a, b = labels
        lines = [f"| measure | {a} | {b} |", "| --- | --- | --- |"]
        for k in self.model:
            lines.append(f"| {k} | {_fmt(self.model.get(k))} | {_fmt(other.model.get(k))} |")
        lines += [
            "",
            f"| layer | param_norm {a} | param_norm {b} | grad_norm {a} | grad_norm {b} | "
            f"hessian_spectral {a} | hessian_spectral {b} |",
            "|" + " --- |" * 7,
        ]
        right = {r["layer"]: r for r in other.layers}
        for r in self.layers:
            o = right.get(r["layer"], {})
            lines.append(
                f"| {r['layer']} | {_fmt(r.get('param_norm'))} | {_fmt(o.get('param_norm'))} | "
                f"{_fmt(r.get('grad_norm'))} | {_fmt(o.get('grad_norm'))} | "
                f"{_fmt(r.get('hessian_spectral'))} | {_fmt(o.get('hessian_spectral'))} |"
            )
        return "\n".join(lines)


def _layers(model: nn.Module) -> list[tuple[str, nn.Module, list[str]]]:
    seen: set[int] = set()
    out = []
    for mname, module in model.named_modules():
        names = []
        for pname, p in module.named_parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                names.append(f"{mname}.{pname}" if mname else pname)
        if names:
            out.append((mname or "(root)", module, names))
    return out


def _number(x: Any) -> float:
    if isinstance(x, (int, float)):
        return float(x)
    for attr in ("gq", "value", "gc"):
        if hasattr(x, attr):
            return float(getattr(x, attr))
    return float(x)


def diagnose(
    model: nn.Module,
    data: Any,
    *,
    loss_fn: Any = None,
    forward_fn: Any = None,
    probes: int = 20,
    seed: int = 0,
    num_splits: int = 4,
    hessian: bool = True,
) -> Report:
    """Per-layer and whole-model diagnostics on the first batch of ``data``.

    Args:
        model: the network (only read).
        data: a DataLoader, an iterable of batches, or one batch; the first batch is used.
        loss_fn, forward_fn: as :func:`initopt.initialize_`.
        probes: Lanczos steps and Hutchinson probes of the Hessian estimates.
        seed: seed of the probes.
        num_splits: D of the batch GradCosine.
        hessian: ``False`` skips every Hessian measure (the costly part).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> r = diagnose(net, (torch.randn(16, 4), torch.randint(0, 3, (16,))), probes=5)
        >>> [row["layer"] for row in r.layers], -1 <= r.model["grad_cosine_batch"] <= 1
        (['0', '2'], True)
    """
    import initopt

    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    batch = BatchSource(data, device).first
    notes: list[str] = []
    layers = _layers(model)
    rows: list[dict[str, Any]] = []
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name: str):
        def fn(_m: nn.Module, _inp: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                o = out.detach()
                stats[name] = (o.mean(), o.std() if o.numel() > 1 else torch.zeros(()))

        return fn

    with evaluation(model, loss_fn=loss_fn, forward_fn=forward_fn) as ev:
        handles = [m.register_forward_hook(hook(n)) for n, m, _ in layers]
        try:
            theta = ev.space.leaves(ev.space.ones())
            loss = ev.loss(theta, batch, where="the diagnostic batch")
        finally:
            for h in handles:
                h.remove()
        grads = torch.autograd.grad(loss, theta, allow_unused=True)
        check_finite("a gradient on the diagnostic batch", *(g for g in grads if g is not None))
        gnorm = {}
        for b, g in zip(ev.space.blocks, grads, strict=True):
            gnorm[b.name] = 0.0 if g is None else float(g.detach().double().norm()) ** 2
            for n in b.names:
                gnorm[n] = gnorm[b.name]
        loss_v = float(loss.detach())
    for lname, module, names in layers:
        pn = math.sqrt(sum(float(dict(model.named_parameters())[n].detach().double().norm()) ** 2 for n in names))
        gn = math.sqrt(sum(gnorm.get(n, 0.0) for n in names))
        mean, std = stats.get(lname, (None, None))
        row: dict[str, Any] = {
            "layer": lname,
            "type": type(module).__name__,
            "param_norm": pn,
            "grad_norm": gn,
            "grad_to_weight": gn / pn if pn > 0 else None,
            "act_mean": None if mean is None else float(mean),
            "act_std": None if std is None else float(std),
            "hessian_spectral": None,
            "hessian_frobenius": None,
        }
        if hessian:
            try:
                row["hessian_spectral"] = abs(
                    initopt.hessian_eigenvalues(
                        model, batch, loss_fn=loss_fn, forward_fn=forward_fn, params=names, k=1, seed=seed, iters=probes
                    )[0]
                )
                row["hessian_frobenius"] = initopt.hessian_frobenius(
                    model, batch, loss_fn=loss_fn, forward_fn=forward_fn, params=names, probes=probes, seed=seed
                )
            except Exception as e:
                notes.append(f"Hessian of layer {lname}: {type(e).__name__}: {e}")
        rows.append(row)

    whole: dict[str, Any] = {"loss": loss_v}
    n = batch_size(batch)

    def attempt(key: str, fn: Any) -> None:
        try:
            whole[key] = fn()
        except Exception as e:
            whole[key] = None
            notes.append(f"{key}: {type(e).__name__}: {e}")

    kw = {"loss_fn": loss_fn, "forward_fn": forward_fn}
    attempt("grad_cosine_batch", lambda: initopt.grad_cosine(model, batch, num_splits=min(num_splits, n), **kw).gc)
    attempt("grad_cosine_sample", lambda: initopt.grad_cosine(model, batch, **kw).gc)
    if hasattr(initopt, "gradient_quotient"):
        attempt("gradient_quotient", lambda: _number(initopt.gradient_quotient(model, batch, loss_fn=loss_fn)))
    if hessian:
        attempt(
            "hessian_top_eigenvalue",
            lambda: initopt.hessian_eigenvalues(model, batch, k=1, seed=seed, iters=probes, **kw)[0],
        )
        attempt("hessian_trace", lambda: initopt.hessian_trace(model, batch, probes=probes, seed=seed, **kw))
    return Report(layers=rows, model=whole, notes=notes)
