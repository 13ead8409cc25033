"""Train one model from several initializations over several seeds and compare.

:func:`compare` is what ``initopt compare`` and ``initopt demo`` run. For every
initialization and seed it builds a fresh model (``torch.manual_seed(seed)`` then the
factory), runs the initialization (``"default"`` runs none), trains it for ``steps`` SGD or
Adam steps (optionally with a linear learning-rate warmup) on the training batches and
records the training loss of every step, the test loss and accuracy after the first epoch
and at the end, the init time (also in training steps of the same run) and whether training
diverged (a non-finite loss stops that run).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from initopt.api import initialize_
from initopt.core.batches import Task, class_last
from initopt.core.progress import Progress
from initopt.data import loader
from initopt.errors import ConfigError
from initopt.methods.base import Method, get_method

__all__ = ["CompareReport", "InitSpec", "compare", "evaluate", "make_optimizer", "models_a_step", "parse_init"]

InitSpec = str | tuple[str, dict[str, Any]] | list[Any]


def parse_init(text: str) -> tuple[str, InitSpec]:
    """``"gradinit"``, ``"gradinit:lr=0.05,steps=100"`` or ``"hessian+gradinit"`` -> (label, spec)."""
    import json

    def one(part: str) -> Any:
        name, _, rest = part.partition(":")
        if not rest:
            return name
        cfg: dict[str, Any] = {}
        for item in rest.split(","):
            if "=" not in item:
                raise ConfigError(f"init spec {text!r}: expected key=value after ':', got {item!r}")
            k, v = item.split("=", 1)
            try:
                cfg[k] = json.loads(v)
            except json.JSONDecodeError:
                cfg[k] = v
        return (name, cfg)

    parts = [one(p) for p in text.split("+")]
    return text, parts[0] if len(parts) == 1 else parts


@torch.no_grad()
def evaluate(model: nn.Module, data: DataLoader, task: Task | None = None) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` in eval mode over ``data`` (modes restored).

    The loss is averaged over examples; the accuracy over target entries, so per-token logits
    ``(N, L, C)`` against targets ``(N, L)`` give the per-token accuracy (see
    :func:`initopt.core.batches.class_last`; PyTorch's ``(N, C, L)`` layout is read too).
    """
    task = task or Task()
    flags = [m.training for m in model.modules()]
    model.eval()
    total, correct, n = 0.0, 0, 0
    try:
        for batch in data:
            out = task.forward(model, batch)
            loss = task.loss(out, batch)
            k = len(batch[1])
            total += float(loss) * k
            logits = out.logits if hasattr(out, "logits") else out
            targets = batch[1]
            if logits.ndim > 2 and not class_last(logits, targets):
                pred = logits.argmax(1)  # PyTorch's layout: classes in dimension 1
            else:
                pred = logits.argmax(-1)
            correct += int((pred == targets).sum())
            n += targets.numel()
    finally:
        for m, f in zip(model.modules(), flags, strict=True):
            m.training = f
    return total / max(n, 1), correct / max(n, 1)


@dataclass
class CompareReport:
    """Results of :func:`compare`: one record per (init, seed) and the summary table."""

    config: dict[str, Any]
    runs: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> list[dict[str, Any]]:
        """Per init: mean ± std over seeds of every measure."""
        out = []
        for label in dict.fromkeys(r["init"] for r in self.runs):
            rs = [r for r in self.runs if r["init"] == label]
            row: dict[str, Any] = {"init": label, "seeds": len(rs), "diverged": sum(r["diverged"] for r in rs)}
            for key in (
                "epoch1_test_loss",
                "epoch1_test_acc",
                "final_test_loss",
                "final_test_acc",
                "final_train_loss",
                "init_seconds",
                "init_in_train_steps",
            ):
                vals = [r[key] for r in rs if r.get(key) is not None and math.isfinite(r[key])]
                row[key] = (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0) if vals else None
            out.append(row)
        return out

    def paired(self, a: str, b: str, key: str = "final_test_acc") -> dict[str, Any]:
        """``a`` minus ``b`` in ``key``, paired by seed: mean, standard error, seeds ``a`` won, n,
        and a verdict: ``"better"``/``"worse"`` when the mean clears 0 by two standard errors,
        else ``"tie"``."""
        va = {r["seed"]: r[key] for r in self.runs if r["init"] == a and r.get(key) is not None}
        vb = {r["seed"]: r[key] for r in self.runs if r["init"] == b and r.get(key) is not None}
        d = [va[s] - vb[s] for s in sorted(va.keys() & vb.keys())]
        if not d:
            return {"a": a, "b": b, "n": 0, "mean": math.nan, "se": math.nan, "wins": 0, "verdict": "n/a"}
        mean = statistics.fmean(d)
        se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else math.inf
        verdict = "better" if mean - 2 * se > 0 else "worse" if mean + 2 * se < 0 else "tie"
        wins = sum(x > 0 for x in d)
        return {"a": a, "b": b, "n": len(d), "mean": mean, "se": se, "wins": wins, "verdict": verdict}

    def to_markdown(self) -> str:
        cols = [
            ("epoch1_test_loss", "test loss, epoch 1", 3),
            ("epoch1_test_acc", "test acc, epoch 1", 3),
            ("final_test_loss", "test loss, end", 3),
            ("final_test_acc", "test acc, end", 3),
            ("init_in_train_steps", "init cost (train steps)", 1),
        ]
        head = "| init | " + " | ".join(c[1] for c in cols) + " | diverged |"
        lines = [head, "|" + " --- |" * (len(cols) + 2)]
        for row in self.summary():
            cells = []
            for key, _, digits in cols:
                v = row[key]
                cells.append("n/a" if v is None else f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}")
            lines.append(f"| {row['init']} | " + " | ".join(cells) + f" | {row['diverged']}/{row['seeds']} |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "summary": self.summary(), "runs": self.runs}

    def to_csv(self) -> str:
        """Training curves, one row per (init, seed, step)."""
        lines = ["init,seed,step,train_loss"]
        for r in self.runs:
            lines += [f"{r['init']},{r['seed']},{i},{v}" for i, v in enumerate(r["train_loss"])]
        return "\n".join(lines) + "\n"

    def plot(self, path: str) -> str:
        """Training-loss curves (mean over seeds, band = min..max) to a PNG; returns the path."""
        from initopt.plots import plot_curves

        return plot_curves(self, path)


def compare(
    make_model: Callable[[], nn.Module],
    train: TensorDataset,
    test: TensorDataset,
    inits: Sequence[str | tuple[str, InitSpec]],
    *,
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 200,
    batch_size: int = 64,
    optimizer: str = "sgd",
    lr: float = 0.05,
    momentum: float = 0.9,
    init_steps: int | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
    warmup_steps: int = 0,
    betas: tuple[float, float] = (0.9, 0.999),
    pass_optimizer: bool | Sequence[str] = False,
) -> CompareReport:
    """Train ``make_model()`` from each initialization in ``inits`` for every seed.

    Args:
        make_model: factory of a fresh model (called after ``torch.manual_seed(seed)``).
        train, test: data sets of ``(inputs, targets)``.
        inits: ``"default"`` (no method), a method name, or ``(label, spec)`` with any
            ``method`` accepted by :func:`initopt.initialize_`.
        steps: training steps per run (one epoch is ``len(train) // batch_size`` steps).
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"``.
        init_steps: iterations of each method (``None``: the method's default).
        warmup_steps: linear learning-rate warmup: step ``t`` (from 0) runs at
            ``lr * min(1, (t + 1) / warmup_steps)``; ``0`` (default): constant ``lr``.
        betas: Adam's ``(beta1, beta2)`` (``optimizer="adam"`` only; SGD ignores them).
        pass_optimizer: give the run's training optimizer (fresh, with its warmup applied)
            as ``optimizer=`` to the inits that model or trial a training step: ``True`` to
            all of them (GradInit's look-ahead then takes its real first step; the learned
            methods' guard trains with it), a list of method names (e.g. ``["auto"]``) to
            those only, ``False`` to none (GradInit uses the paper's :math:`\\eta`; ``auto``
            assumes SGD with lr 0.01 and momentum 0.9; the guard tries SGD and Adam).
    """
    if optimizer not in ("sgd", "adam"):
        raise ConfigError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    if steps < 1 or batch_size < 2:
        raise ConfigError("steps must be >= 1 and batch_size >= 2")
    if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
        raise ConfigError(f"warmup_steps must be a non-negative integer, got {warmup_steps!r}")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ConfigError(f"betas must be two numbers in [0, 1), got {betas!r}")
    betas = (float(betas[0]), float(betas[1]))
    specs = [(i, i) if isinstance(i, str) else i for i in inits]
    epoch = max(len(train) // batch_size, 1)
    report = CompareReport(
        config={
            "inits": [s[0] for s in specs],
            "seeds": list(seeds),
            "steps": steps,
            "batch_size": batch_size,
            "optimizer": optimizer,
            "lr": lr,
            "momentum": momentum,
            "init_steps": init_steps,
            "warmup_steps": warmup_steps,
            "betas": list(betas),
            "pass_optimizer": pass_optimizer if isinstance(pass_optimizer, bool) else list(pass_optimizer),
            "steps_per_epoch": epoch,
            "torch": torch.__version__,
        }
    )
    test_loader = loader(test, batch_size, shuffle=False)
    with Progress(len(specs) * len(seeds) * steps, desc="compare", enabled=progress) as bar:
        for label, spec in specs:
            for seed in seeds:
                torch.manual_seed(seed)
                model = make_model()
                init_seconds = 0.0
                choice = guard = None
                if spec != "default":
                    train_opt = None
                    if pass_optimizer and models_a_step(spec, None if pass_optimizer is True else pass_optimizer):
                        train_opt, _ = make_optimizer(
                            model, optimizer, lr, momentum, warmup_steps=warmup_steps, betas=betas
                        )
                    t0 = time.perf_counter()
                    init_result = initialize_(
                        model,
                        loader(train, batch_size, seed=seed + 10_000),
                        spec,
                        seed=seed,
                        steps=init_steps if isinstance(spec, str) else None,
                        progress=False,
                        optimizer=train_opt,
                    )
                    init_seconds = time.perf_counter() - t0
                    choice = init_result.info.get("choice")
                    guard = init_result.info.get("guard")
                rec = _train(
                    model,
                    train,
                    test_loader,
                    seed,
                    steps,
                    batch_size,
                    optimizer,
                    lr,
                    momentum,
                    epoch,
                    bar,
                    warmup_steps=warmup_steps,
                    betas=betas,
                )
                rec.update(init=label, seed=seed, init_seconds=init_seconds)
                if choice is not None:  # what auto chose
                    rec["init_choice"] = choice
                if guard is not None:  # whether a learned method's guard kept its scales
                    rec["guard_kept"] = guard["kept"]
                rec["init_in_train_steps"] = init_seconds / rec["step_seconds"] if rec["step_seconds"] else None
                report.runs.append(rec)
                if log:
                    log(
                        f"{label:>20} seed {seed}: final test loss {rec['final_test_loss']:.4f} "
                        f"acc {rec['final_test_acc']:.3f}{' (diverged)' if rec['diverged'] else ''}"
                    )
    return report


def models_a_step(spec: Any, names: Sequence[str] | None = None) -> bool:
    """Whether an init spec has a stage that models or trials a training step (takes
    ``optimizer=``), among the methods ``names`` when given."""
    if isinstance(spec, Method):
        return spec.uses_optimizer and (names is None or spec.name in names)
    if isinstance(spec, str):
        name = spec
    elif isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], dict):
        name = spec[0]
    else:
        return any(models_a_step(s, names) for s in spec)
    return get_method(name).uses_optimizer and (names is None or name in names)


def make_optimizer(
    model: nn.Module,
    optimizer: str = "sgd",
    lr: float = 0.05,
    momentum: float = 0.9,
    *,
    warmup_steps: int = 0,
    betas: tuple[float, float] = (0.9, 0.999),
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """The training optimizer of :func:`compare` and its warmup schedule (``None`` without one).

    SGD with ``momentum``, or Adam with ``betas``. With ``warmup_steps > 0`` the learning rate
    rises linearly: the ``t``-th step (from 0) runs at ``lr * min(1, (t + 1) / warmup_steps)``;
    call the scheduler's ``step()`` after every optimizer step.
    """
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    elif optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr, betas=betas)
    else:
        raise ConfigError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    if warmup_steps <= 0:
        return opt, None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / warmup_steps))
    return opt, sched


def _train(
    model,
    train,
    test_loader,
    seed,
    steps,
    batch_size,
    optimizer,
    lr,
    momentum,
    epoch,
    bar,
    *,
    warmup_steps: int = 0,
    betas: tuple[float, float] = (0.9, 0.999),
) -> dict[str, Any]:
    task = Task()
    opt, sched = make_optimizer(model, optimizer, lr, momentum, warmup_steps=warmup_steps, betas=betas)
    model.train()
    data = loader(train, batch_size, seed=seed)
    it = iter(data)
    losses: list[float] = []
    rec: dict[str, Any] = {"diverged": False, "epoch1_test_loss": None, "epoch1_test_acc": None}
    times = []
    for step in range(steps):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(data)
            batch = next(it)
        t0 = time.perf_counter()
        loss = task.loss(task.forward(model, batch), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        times.append(time.perf_counter() - t0)
        value = float(loss.detach())
        losses.append(value)
        bar.update()
        if not math.isfinite(value):
            rec["diverged"] = True
            for _ in range(steps - step - 1):
                bar.update()
            break
        if step + 1 == epoch:
            rec["epoch1_test_loss"], rec["epoch1_test_acc"] = evaluate(model, test_loader, task)
    if rec["diverged"]:
        rec["final_test_loss"], rec["final_test_acc"] = math.inf, 0.0
    else:
        rec["final_test_loss"], rec["final_test_acc"] = evaluate(model, test_loader, task)
    rec["train_loss"] = losses
    rec["final_train_loss"] = statistics.fmean(losses[-10:]) if losses else None
    rec["step_seconds"] = statistics.median(times) if times else 0.0
    return rec
