"""The frozen result of :func:`initopt.initialize_`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["InitResult"]


def _jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


@dataclass(frozen=True)
class InitResult:
    """What an initialization did.

    Attributes:
        method: registered name (``"a+b"`` for a pipeline).
        config: the frozen config actually used (a tuple of them for a pipeline).
        scales: ``{parameter name: scale}`` for every tensor the method rescaled.
        history: one dict per iteration (objective, gradient norm, branch, ...).
        seconds: wall time of the search.
        stages: for a pipeline, one result per stage in order; empty otherwise.
        unscalable: trainable tensors of norm 0 that no scale can change.
        before, after: the method's own measures on a fixed batch before and after.
        seed: the seed the method ran with.
        info: what else the method reports (``auto``: the candidates it tried, what each
            measured and why it chose; methods given ``optimizer=``: the step they modeled;
            learned methods: ``"guard"``, the trial that decided whether their scales were
            kept, see :mod:`initopt.core.guard`; when they were not, ``after`` equals
            ``before`` and the search's own measures are in ``info["guard"]["search_after"]``).
    """

    method: str
    config: Any
    scales: dict[str, float]
    history: list[dict[str, Any]]
    seconds: float
    stages: tuple[InitResult, ...] = ()
    unscalable: tuple[str, ...] = ()
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (non-finite floats become ``None``/``"inf"``)."""
        return _jsonable(
            {
                "method": self.method,
                "config": self.config,
                "scales": self.scales,
                "history": self.history,
                "seconds": self.seconds,
                "stages": [s.to_dict() for s in self.stages],
                "unscalable": list(self.unscalable),
                "before": self.before,
                "after": self.after,
                "info": self.info,
                "seed": self.seed,
            }
        )

    def summary(self) -> str:
        """A short human-readable table of measures and scales."""
        lines = [f"method {self.method}: {len(self.history)} iterations in {self.seconds:.2f} s"]
        for k in sorted(set(self.before) | set(self.after)):
            b, a = self.before.get(k, math.nan), self.after.get(k, math.nan)
            lines.append(f"  {k:<24} before {b:>12.5g}   after {a:>12.5g}")
        if "choice" in self.info:
            lines.append(f"  choice: {self.info['choice']}: {self.info.get('reason', '')}")
            for c in self.info.get("candidates", []):
                what = c.get("error") or (
                    "diverged" if c.get("diverged") else f"held-out loss {c.get('holdout_after', math.nan):.4g}"
                )
                lines.append(f"    {c['stage']:<8} {c['name']:<24} {what}")
            if "cost_train_steps" in self.info:
                lines.append(f"  cost: {self.info['cost_train_steps']:.0f} training steps")
        guard = self.info.get("guard")
        if guard:
            verdict = "scales kept" if guard["kept"] else "scales rejected, the model was left as it was"
            lines.append(f"  guard: {verdict}: {guard['reason']}")
        if self.scales:
            width = max(len(n) for n in self.scales)
            lines.append("  scales:")
            lines += [f"    {n:<{width}}  {s:8.4f}" for n, s in self.scales.items()]
        if self.unscalable:
            lines.append(f"  unscalable (norm 0, left at 0): {', '.join(self.unscalable)}")
        return "\n".join(lines)
