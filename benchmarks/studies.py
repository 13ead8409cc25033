"""The harness every claims study (``benchmarks/study_*.py``) shares.

A study trains one task from several initializations over several seeds with
:func:`initopt.compare.compare` (the engine behind ``initopt compare``), compares each
initialization with the baselines *paired by seed* (same seed: same model draw, same batch
order), repeats its headline case at 1 and 2 threads, and writes one JSON file
``benchmarks/results/study_<name>.json`` with this layout (the README's tables are rendered
from it by ``benchmarks/readme_tables.py``)::

    {"study": name, "claim": "...", "provenance": {...}, "config": {...},
     "table": {"title": "...", "columns": [...], "rows": [[...], ...]},
     "verdicts": [{"claim": "...", "verdict": "supported" | "not supported" | "inconclusive",
                   "evidence": "..."}],
     "notes": ["..."], "runs": [...]}

The studies test the papers' claims, so every learned stage runs the paper's algorithm: its
guard (``initopt.core.guard``, on by default in the library) is turned off by
:func:`paper_algorithm`. Run-cache keys leave the guard fields out: every cached run is
guard-free.

Verdict rule (:func:`verdict`): a paired difference is *supported* when its mean exceeds the
margin by more than two standard errors at every thread count, *not supported* when it is
below the margin by more than two standard errors at any thread count or when the thread
counts disagree in sign, and *inconclusive* otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from common import provenance
from torch import nn

from initopt import get_method, methods
from initopt.compare import compare

RESULTS = Path(__file__).resolve().parent / "results"

__all__ = [
    "RESULTS",
    "fmt",
    "kaiming_",
    "paired",
    "paper_algorithm",
    "rows_by_init",
    "train_grid",
    "verdict",
    "write_study",
]


def kaiming_(model: nn.Module, nonlinearity: str = "relu") -> nn.Module:
    """PyTorch's Kaiming-normal init (fan-in) on every Linear/Conv weight, zero biases."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(m.weight, nonlinearity=nonlinearity)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
    return model


CACHE = Path(__file__).resolve().parent / ".cache"  # finished runs, one JSON line each (not committed)

# the methods with a guard (a ``guard`` config field), which the studies turn off
GUARDED = tuple(n for n in methods() if "guard" in {f.name for f in dataclasses.fields(get_method(n).Config)})
_GUARD_FIELDS = ("guard", "guard_steps")


def paper_algorithm(spec: Any, init_steps: int | None = None) -> Any:
    """``spec`` with every learned stage's guard off (the paper's algorithm, scales always applied).

    A bare name becomes ``(name, {"guard": False})``, carrying ``init_steps`` (which
    :func:`initopt.compare.compare` applies to bare names only) as the stage's ``steps``.
    """
    if isinstance(spec, str):
        if spec not in GUARDED:
            return spec
        return (spec, {"guard": False, **({"steps": init_steps} if init_steps is not None else {})})
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], dict):
        return (spec[0], {**spec[1], "guard": False}) if spec[0] in GUARDED else spec
    if isinstance(spec, list):
        return [paper_algorithm(s) for s in spec]
    config = getattr(spec, "config", None)
    if config is not None and hasattr(config, "guard"):
        return type(spec)(dataclasses.replace(config, guard=False))
    return spec


def _key_spec(spec: Any, paper: bool) -> Any:
    """The spec as cache keys record it: for the papers' algorithms without guard fields (they
    are all off); guarded runs (``paper=False``) carry ``"guarded": True`` in their key."""
    if not paper:
        return {"spec": spec, "guarded": True}
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], dict):
        return (spec[0], {k: v for k, v in spec[1].items() if k not in _GUARD_FIELDS})
    if isinstance(spec, list):
        return [_key_spec(s, paper) for s in spec]
    return spec


def _cache_key(
    spec: Any, label: str, seed: int, threads: int, start: str, tags: dict, train_kw: dict, paper: bool = True
) -> str:
    return json.dumps(
        {
            "spec": _key_spec(spec, paper),
            "label": label,
            "seed": seed,
            "threads": threads,
            "start": start,
            **tags,
            **train_kw,
        },
        sort_keys=True,
        default=str,
    )


def _cache_load(path: Path | None) -> dict[str, dict[str, Any]]:
    if path is None or not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            out[rec["key"]] = rec["run"]
    return out


def train_grid(
    make_model: Callable[[], nn.Module],
    train: Any,
    test: Any,
    inits: Sequence[Any],
    *,
    seeds: Sequence[int],
    threads: int = 1,
    start: str = "default",
    tags: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = print,
    cache: Path | None = None,
    paper: bool = True,
    **train_kw: Any,
) -> list[dict[str, Any]]:
    """:func:`initopt.compare.compare` at ``threads`` threads; returns its per-run records
    (training curves kept every 10th step), tagged with ``threads``, ``start`` and ``tags``.

    With ``cache`` (a JSON-lines file), a run already recorded under the same init, seed,
    thread count, start, tags and training settings is read back instead of repeated, and every
    new run is appended as soon as it ends, so an interrupted study resumes where it stopped.
    Runs are deterministic at a given thread count, so a cached run equals a repeated one; the
    key does not cover the model factory, so tags must name the task.

    ``paper``: run every learned stage as its paper's algorithm (guard off,
    :func:`paper_algorithm`); ``False``: as the library runs it by default (guard on).
    """
    tags = tags or {}
    known = _cache_load(cache)
    runs = []
    for init in inits:
        label, spec = (init, init) if isinstance(init, str) else init
        for seed in seeds:
            key = _cache_key(spec, label, seed, threads, start, tags, train_kw, paper)
            if key in known:
                r = known[key]
            else:
                old = torch.get_num_threads()
                torch.set_num_threads(threads)
                try:
                    run_spec = paper_algorithm(spec, train_kw.get("init_steps")) if paper else spec
                    report = compare(
                        make_model, train, test, [(label, run_spec)], seeds=[seed], progress=False, **train_kw
                    )
                finally:
                    torch.set_num_threads(old)
                r = dict(report.runs[0])
                curve = r.pop("train_loss")
                r["train_loss_every_10"] = curve[::10]
                r.update(threads=threads, start=start, train_steps=train_kw.get("steps", 200), **tags)
                if cache is not None:
                    cache.parent.mkdir(parents=True, exist_ok=True)
                    with cache.open("a") as f:
                        f.write(json.dumps(_finite({"key": key, "run": r})) + "\n")
            if log:
                log(
                    f"  [{start} / {threads} thr] {r['init']:>28} seed {r['seed']}: "
                    f"epoch-1 acc {_f(r['epoch1_test_acc'])}, final acc {r['final_test_acc'] or 0:.3f}"
                    f"{' DIVERGED' if r['diverged'] else ''}, init {r['init_in_train_steps'] or 0:.0f} train steps"
                    + (" (cached)" if key in known else "")
                )
            runs.append(r)
    return runs


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _select(runs: list[dict[str, Any]], init: str, threads: int, start: str | None) -> dict[int, dict[str, Any]]:
    return {
        r["seed"]: r
        for r in runs
        if r["init"] == init and r["threads"] == threads and (start is None or r["start"] == start)
    }


def paired(
    runs: list[dict[str, Any]],
    a: tuple[str, str],
    b: tuple[str, str],
    key: str = "final_test_acc",
    threads: int = 1,
) -> dict[str, Any]:
    """Per-seed difference ``a - b`` of ``key``; ``a`` and ``b`` are ``(start, init)`` pairs.

    A diverged run counts with accuracy 0 (as :func:`~initopt.compare.compare` records it).
    """
    ra, rb = _select(runs, a[1], threads, a[0]), _select(runs, b[1], threads, b[0])
    seeds = sorted(set(ra) & set(rb))
    diffs = [ra[s][key] - rb[s][key] for s in seeds if ra[s][key] is not None and rb[s][key] is not None]
    n = len(diffs)
    mean = statistics.fmean(diffs) if diffs else math.nan
    std = statistics.stdev(diffs) if n > 1 else 0.0
    return {
        "a": list(a),
        "b": list(b),
        "key": key,
        "threads": threads,
        "diffs": diffs,
        "mean": mean,
        "std": std,
        "se": std / math.sqrt(n) if n else math.nan,
        "n": n,
        "wins": sum(d > 0 for d in diffs),
    }


def verdict(pairs: Sequence[dict[str, Any]], margin: float = 0.0) -> str:
    """``supported`` / ``not supported`` / ``inconclusive`` for "a beats b by more than
    ``margin``", given the same paired comparison at one or more thread counts."""
    if not pairs or any(p["n"] < 2 for p in pairs):
        return "inconclusive"
    lo = [p["mean"] - 2 * p["se"] for p in pairs]
    hi = [p["mean"] + 2 * p["se"] for p in pairs]
    if all(x > margin for x in lo):
        return "supported"
    signs = {p["mean"] > margin for p in pairs}
    if any(x < margin for x in hi) or len(signs) > 1:
        return "not supported"
    return "inconclusive"


def fmt(p: dict[str, Any], scale: float = 100.0, unit: str = " pts") -> str:
    """``+3.1 ± 2.0 pts (4/5 seeds)`` for a :func:`paired` result (accuracy in points)."""
    return f"{p['mean'] * scale:+.1f} ± {p['std'] * scale:.1f}{unit} ({p['wins']}/{p['n']} seeds)"


def stat(values: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def rows_by_init(
    runs: list[dict[str, Any]], threads: int = 1, start: str | None = None, labels: Sequence[str] | None = None
) -> list[list[str]]:
    """One table row per (start, init) at ``threads``: epoch-1 and final accuracy mean ± std,
    diverged seeds, init cost in training steps and as a share of the training time."""
    rows = []
    keys = dict.fromkeys((r["start"], r["init"]) for r in runs if r["threads"] == threads)
    for st, init in keys:
        if start is not None and st != start:
            continue
        if labels is not None and init not in labels:
            continue
        rs = [r for r in runs if r["threads"] == threads and r["start"] == st and r["init"] == init]
        e1 = stat([r["epoch1_test_acc"] for r in rs])
        fin = stat([r["final_test_acc"] for r in rs])
        cost = stat([r["init_in_train_steps"] or 0.0 for r in rs])
        steps = rs[0]["train_steps"] if "train_steps" in rs[0] else None
        share = f"{100 * cost[0] / steps:.0f} %" if steps else "n/a"
        div = [r["seed"] for r in rs if r["diverged"]]
        rows.append(
            [
                f"{st} → {init}" if init != "default" else st,
                f"{e1[0]:.3f} ± {e1[1]:.3f}",
                f"{fin[0]:.3f} ± {fin[1]:.3f}",
                f"{len(div)}/{len(rs)}" + (f" (seeds {', '.join(map(str, div))})" if div else ""),
                f"{cost[0]:.0f}",
                share,
            ]
        )
    return rows


TABLE_COLUMNS = [
    "start → init",
    "test acc, epoch 1",
    "test acc, end",
    "diverged",
    "init cost (train steps)",
    "init / training time",
]


def write_study(name: str, payload: dict[str, Any], out: Path | None = None) -> Path:
    """Write ``study_<name>.json`` (with provenance) and return its path."""
    path = out or RESULTS / f"study_{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"study": name, **payload, "provenance": provenance(torch.get_num_threads())}
    path.write_text(json.dumps(_finite(payload), indent=1, default=str) + "\n")
    return path


def _finite(x: Any) -> Any:
    """JSON-safe copy: non-finite floats become ``None``."""
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# ---------------------------------------------------------------------------------------------
# The deep-network tasks shared by the studies of deep plain networks and of starting points.


def _mnist1d() -> tuple[Any, Any]:
    from initopt.data import mnist1d

    return mnist1d(num_samples=4000, seed=0)


def _digits() -> tuple[Any, Any]:
    from initopt.data import digits

    return digits()


def deep_tasks(quick: bool = False) -> dict[str, dict[str, Any]]:
    """Deep plain networks (no normalization, no skips) and one BatchNorm control.

    Each task: ``make(start)`` builds a fresh model (``start``: ``"default"`` = PyTorch's own
    init, ``"kaiming"`` = :func:`kaiming_`), ``data()`` returns ``(train, test)``, ``act`` the
    activation's name, and the training settings (SGD with momentum 0.9 at a fixed lr).
    """
    from initopt import zoo

    d, w_mlp, w_cnn = (4, 16, 8) if quick else (16, 96, 24)
    acts = {"relu": nn.ReLU, "silu": nn.SiLU}

    def builder(factory: Callable[[], nn.Module], act: str) -> Callable[[str], nn.Module]:
        def make(start: str = "default") -> nn.Module:
            m = factory()
            return kaiming_(m) if start == "kaiming" else m

        return make

    specs = {
        "mlp16_relu_mnist1d": (lambda: zoo.mlp(depth=d, width=w_mlp, in_features=40), "relu", _mnist1d),
        "cnn16_relu_mnist1d": (
            lambda: zoo.plain_cnn(depth=d, width=w_cnn, input_shape=(40,)),
            "relu",
            _mnist1d,
        ),
        "cnn16_silu_mnist1d": (
            lambda: zoo.plain_cnn(depth=d, width=w_cnn, activation=acts["silu"], input_shape=(40,)),
            "silu",
            _mnist1d,
        ),
        "cnn12_relu_digits": (
            lambda: zoo.plain_cnn(depth=3 if quick else 12, width=w_cnn, dim=2, input_shape=(8, 8)),
            "relu",
            _digits,
        ),
        "mlp16_relu_digits": (lambda: zoo.mlp(depth=d, width=w_mlp, in_features=64), "relu", _digits),
        "cnn16_relu_bn_mnist1d": (
            lambda: zoo.plain_cnn(depth=d, width=w_cnn, batchnorm=True, input_shape=(40,)),
            "relu",
            _mnist1d,
        ),
    }
    return {
        name: {"make": builder(f, act), "act": act, "data": data, "batchnorm": "bn" in name}
        for name, (f, act, data) in specs.items()
    }


def baseline_of(runs: list[dict], key: str = "final_test_acc") -> tuple[str, str]:
    """The better (by mean ``key`` at 1 thread) of the default and the Kaiming init."""
    best, score = ("default", "default"), -1.0
    for start in ("default", "kaiming"):
        vals = [r[key] or 0.0 for r in runs if r["start"] == start and r["init"] == "default" and r["threads"] == 1]
        if vals and statistics.fmean(vals) > score:
            best, score = (start, "default"), statistics.fmean(vals)
    return best


def thread_spread(runs: list[dict[str, Any]], key: str = "final_test_acc") -> list[float]:
    """``|key at 1 thread - key at 2 threads|`` for every (start, init, seed) run at both."""
    two = {(r["start"], r["init"], r["seed"]): r for r in runs if r["threads"] == 2}
    out = []
    for r in runs:
        other = two.get((r["start"], r["init"], r["seed"])) if r["threads"] == 1 else None
        if other is not None and r[key] is not None and other[key] is not None:
            out.append(abs(r[key] - other[key]))
    return out


def thread_note(runs: list[dict[str, Any]], task: str, per: str = "init, seed") -> str:
    """The note on the 1-vs-2-thread spread of the final accuracy of ``task``'s runs."""
    spread = thread_spread([r for r in runs if r["task"] == task])
    return f"Thread check on {task}: |final acc at 1 thread - at 2 threads| per ({per}): " + (
        f"mean {statistics.fmean(spread):.3f}, max {max(spread):.3f} over {len(spread)} runs." if spread else "n/a"
    )


def print_report(notes: list[str], verdicts: list[dict[str, Any]]) -> None:
    """A study's notes, then one line per verdict."""
    print("\n".join(notes))
    for v in verdicts:
        print(f"{v['verdict']:>14}: {v['claim']} ({v['evidence']})")


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or ``None`` without matplotlib (no plot then)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return None
    return plt


def plot_final_acc(runs: list[dict], names: list[str], path: Path) -> None:
    """Final test accuracy per (start, init), one panel per task, one dot per seed (1 thread)."""
    plt = pyplot()
    if plt is None:  # pragma: no cover
        return
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        rs = [r for r in runs if r["task"] == name and r["threads"] == 1]
        keys = list(dict.fromkeys((r["start"], r["init"]) for r in rs))
        for i, key in enumerate(keys):
            acc = [r["final_test_acc"] for r in rs if (r["start"], r["init"]) == key]
            ax.scatter([i] * len(acc), acc, s=12)
            ax.plot([i - 0.3, i + 0.3], [statistics.fmean(acc)] * 2, color="k", lw=1)
        ax.set_xticks(range(len(keys)), [f"{s}→{m}" if m != "default" else s for s, m in keys], rotation=90, fontsize=7)
        ax.set_title(name, fontsize=8)
        ax.set_ylabel("final test accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def judge(
    runs: list[dict[str, Any]], a: tuple[str, str], b: tuple[str, str], claim: str, key: str = "final_test_acc"
) -> dict[str, Any]:
    """The verdict on "``a`` beats ``b`` in ``key``", paired by seed at every thread count in ``runs``."""
    pairs = [q for q in (paired(runs, a, b, key, threads=t) for t in sorted({r["threads"] for r in runs})) if q["n"]]
    tasks = {r.get("task") for r in runs}
    return {
        "task": tasks.pop() if len(tasks) == 1 else None,
        "claim": claim,
        "verdict": verdict(pairs),
        "evidence": "; ".join(f"{q['threads']} thr: {fmt(q)}" for q in pairs),
        "a": list(a),
        "b": list(b),
        "key": key,
        "pairs": pairs,
    }


def compute_seconds(runs: list[dict[str, Any]]) -> float:
    """Seconds of computation in ``runs``: each init's wall time plus its training steps at the
    run's median step time (unlike the study's wall time, it survives resuming from the cache)."""
    return sum((r.get("init_seconds") or 0.0) + (r.get("step_seconds") or 0.0) * r["train_steps"] for r in runs)


def study_args(
    doc: str, name: str, argv: list[str] | None, tasks: list[str] | None, *, training: bool = True
) -> argparse.Namespace:
    """The command line every study shares: ``--quick``, ``--out``, ``--tasks``, ``--cache``
    (and ``--lr``/``--steps`` with ``training``). The small version never reads the cache."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models and runs (seconds)")
    p.add_argument("--out", type=Path, default=RESULTS / f"study_{name}.json")
    p.add_argument("--tasks", nargs="+", default=tasks)
    p.add_argument("--cache", type=Path, default=CACHE / "runs.jsonl", help="finished runs (resume)")
    if training:
        p.add_argument("--lr", type=float, default=0.01, help="training learning rate")
        p.add_argument("--steps", type=int, default=None, help="training steps (default 200)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: the study's)")
    args = p.parse_args(argv)
    if args.quick:
        args.cache = None  # the small version always computes
    return args
