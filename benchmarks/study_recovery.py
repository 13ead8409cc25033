"""Claims study: recovery from a badly scaled initialization (MetaInit's claim).

Claim (MetaInit, Dauphin & Schoenholz 2019): learning the initial tensor norms recovers from badly
scaled initializations, e.g. every weight multiplied by 1/4. Here a method "recovers" from a bad
start when (a) its scale error, the mean over weight layers of |log(norm after the method / norm of
the good init)|, falls by at least half, and (b) its test accuracy after a short SGD run beats the
bad init left untouched, both paired by seed. The same question is asked of every other method.

Setting: a 10-layer plain ReLU MLP (width 64) and an 8-layer plain ReLU 1-D CNN (width 16) on
MNIST-1D. The good init is Kaiming-normal (``studies.kaiming_``, zero biases); the bad inits are
the same draw with every weight multiplied by 1/4 and by 4 (exact in floating point, so the bad
init's scale error is exactly log 4 on every layer). From each bad init every method runs through
``initopt.initialize_`` at its defaults (MetaInit: the paper's 500 steps, noise inputs); then SGD
(momentum 0.9, lr 0.03, 400 steps = 8 epochs, batch 64). Per-layer norms are read from the model
just before its first training step (a global optimizer step pre-hook), i.e. exactly the weights
training starts from. 5 seeds on the MLP, 3 on the CNN, paired by seed; the headline (MetaInit
vs the untouched ×1/4 init on the MLP) also at 2 threads. Writes
``results/study_recovery.json`` and ``results/study_recovery.png`` (per-layer norm ratio to the
good init, per method, for ×1/4 and ×4).

    python benchmarks/study_recovery.py            # default size (about 8 minutes of CPU, one thread)
    python benchmarks/study_recovery.py --quick    # tiny, seconds (what the tests run)
"""

from __future__ import annotations

import os

# Run as a script: idle OpenMP threads sleep instead of spinning. On a shared machine the spinning
# made the 2-thread MetaInit runs cost 4-5x the CPU of 1 thread (same numbers either way). It must
# precede torch's import; imported as a module (tests), the environment is left alone.
if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from studies import RESULTS, fmt, judge, kaiming_, paired, stat, train_grid, verdict, write_study
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import initopt
from initopt import zoo
from initopt.data import mnist1d

CLAIM = (
    "MetaInit recovers from badly scaled initializations (every weight ×1/4, and ×4): the scale error "
    "to the good (Kaiming) init falls by at least half and the network trains better than from the bad init."
)
WANTED = ["metainit", "gradinit", "nio", "hessian", "lsuv", "kaiming"]
FACTORS = {"x1/4": 0.25, "x4": 4.0}
GOOD = "kaiming"
HEADLINE_TASK = "mlp10_relu_mnist1d"
HEADLINE_FACTOR = "x1/4"
REDUCTION = 0.5  # the scale error must fall by at least this fraction
OVERSHOOT = math.log(1.25)  # a layer overshoots when it ends > 25 % beyond the good norm, on the far side


def start_name(factor: str | None) -> str:
    """The ``start`` tag of runs from the good init (``None``) or from a bad one (``"x1/4"``, ``"x4"``)."""
    return GOOD if factor is None else f"{GOOD} {factor}"


# ---------------------------------------------------------------------------------------------
# models, the bad-init wrapper and the norm probe


def tasks(quick: bool) -> dict[str, Callable[[], nn.Module]]:
    """Fresh plain networks (PyTorch's default init; Kaiming is applied by :func:`scaled_kaiming`)."""
    if quick:
        return {
            HEADLINE_TASK: lambda: zoo.mlp(depth=3, width=16, in_features=40),
            "cnn8_relu_mnist1d": lambda: zoo.plain_cnn(depth=3, width=8, input_shape=(40,)),
        }
    return {
        HEADLINE_TASK: lambda: zoo.mlp(depth=10, width=64, in_features=40),
        "cnn8_relu_mnist1d": lambda: zoo.plain_cnn(depth=8, width=16, input_shape=(40,)),
    }


def scaled_kaiming(build: Callable[[], nn.Module], factor: float) -> Callable[[], nn.Module]:
    """Factory of the (bad) init: Kaiming-normal, then every weight (≥ 2-D tensor) times ``factor``.

    Biases are zero under :func:`studies.kaiming_`, so scaling them would change nothing. The same
    seed gives the same draw for every ``factor``: the bad init is the good one, rescaled.
    """

    def make() -> nn.Module:
        model = kaiming_(build())
        if factor != 1.0:
            with torch.no_grad():
                for p in model.parameters():
                    if p.ndim >= 2:
                        p.mul_(factor)
        return model

    return make


def weight_norms(model: nn.Module) -> tuple[list[str], list[float]]:
    """Names and Frobenius norms of the weight tensors (≥ 2-D), in module order."""
    names, norms = [], []
    for n, p in model.named_parameters():
        if p.ndim >= 2:
            names.append(n)
            norms.append(float(p.detach().norm()))
    return names, norms


class NormProbe:
    """Wraps a model factory; records every built model's weight norms at build time and just
    before its first optimizer step (after the init method ran, before training moved anything).

    The second reading comes from a global optimizer step pre-hook that fires only for an
    optimizer over the latest model's parameters (the init methods use no ``torch.optim``).
    """

    def __init__(self, make: Callable[[], nn.Module]) -> None:
        self.make = make
        self.records: list[dict[str, Any]] = []
        self._model: nn.Module | None = None
        self._handle: Any = None

    def __call__(self) -> nn.Module:
        model = self.make()
        names, norms = weight_norms(model)
        self._model = model
        self.records.append({"layers": names, "norms_start": norms, "norms": None})
        return model

    def _hook(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._model is None or self.records[-1]["norms"] is not None:
            return
        ids = {id(p) for g in opt.param_groups for p in g["params"]}
        if any(id(p) in ids for p in self._model.parameters()):
            self.records[-1]["norms"] = weight_norms(self._model)[1]

    def __enter__(self) -> NormProbe:
        self._handle = register_optimizer_step_pre_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()
        self._model = None


def log_ratios(norms: Sequence[float], good: Sequence[float]) -> list[float]:
    return [math.log(a / b) for a, b in zip(norms, good, strict=True)]


def scale_error(norms: Sequence[float], good: Sequence[float]) -> float:
    """Mean over layers of |log(norm / good norm)|."""
    lr = log_ratios(norms, good)
    return statistics.fmean(abs(x) for x in lr)


def good_norms(build: Callable[[], nn.Module], seed: int) -> list[float]:
    """Weight norms of the good (unscaled Kaiming) init of ``seed``, drawn as compare() draws it."""
    torch.manual_seed(seed)
    return weight_norms(scaled_kaiming(build, 1.0)())[1]


def run_start(
    task: str,
    build: Callable[[], nn.Module],
    factor: str | None,
    inits: list[Any],
    seeds: list[int],
    threads: int,
    data: tuple[Any, Any],
    train_kw: dict[str, Any],
) -> list[dict[str, Any]]:
    """train_grid from one start, every run annotated with its norms and scale errors."""
    f = 1.0 if factor is None else FACTORS[factor]
    probe = NormProbe(scaled_kaiming(build, f))
    with probe:
        runs = train_grid(
            probe,
            *data,
            inits,
            seeds=seeds,
            threads=threads,
            start=start_name(factor),
            tags={"task": task, "factor": f},
            **train_kw,
        )
    if len(probe.records) != len(runs) or any(rec["norms"] is None for rec in probe.records):
        raise RuntimeError("the norm probe missed a run")
    good = {s: good_norms(build, s) for s in seeds}
    for r, rec in zip(runs, probe.records, strict=True):
        g = good[r["seed"]]
        start_ratio = log_ratios(rec["norms_start"], g)
        if any(abs(x - math.log(f)) > 1e-4 for x in start_ratio):
            raise RuntimeError(f"seed {r['seed']}: the start is not the good init times {f}")
        lr = log_ratios(rec["norms"], g)
        err0, err = scale_error(rec["norms_start"], g), scale_error(rec["norms"], g)
        far = [x for x in lr if f != 1.0 and x * math.log(f) < 0 and abs(x) > OVERSHOOT]
        r.update(
            layers=rec["layers"],
            norms_good=g,
            norms_start=rec["norms_start"],
            norms=rec["norms"],
            log_ratio=lr,
            mean_log_ratio=statistics.fmean(lr),
            scale_error_start=err0,
            scale_error=err,
            scale_error_reduction=(1.0 - err / err0) if err0 > 0 else 0.0,
            overshoot_layers=len(far),
        )
    return runs


# ---------------------------------------------------------------------------------------------
# verdicts and the table


def recovery_verdict(rs: list[dict[str, Any]], task: str, factor: str, label: str) -> dict[str, Any]:
    """ "``label`` recovers from ``factor``": scale error falls by ≥ half AND accuracy beats the bad init."""
    bad = (start_name(factor), "default")
    me = (start_name(factor), label)
    threads = sorted({r["threads"] for r in rs if r["start"] == me[0] and r["init"] == label})
    scale_pairs = [paired(rs, me, bad, "scale_error_reduction", t) for t in threads]
    scale = {
        "claim": f"scale error falls by at least {REDUCTION:.0%}",
        "verdict": verdict(scale_pairs, margin=REDUCTION),
        "pairs": scale_pairs,
    }
    acc = judge(rs, me, bad, "test accuracy beats the bad init")
    parts = [scale["verdict"], acc["verdict"]]
    if all(v == "supported" for v in parts):
        overall = "supported"
    elif "not supported" in parts:
        overall = "not supported"
    else:
        overall = "inconclusive"
    one = [r for r in rs if r["start"] == me[0] and r["init"] == label and r["threads"] == 1]
    e0, e1 = stat([r["scale_error_start"] for r in one]), stat([r["scale_error"] for r in one])
    red = "; ".join(f"{q['threads']} thr: {fmt(q, 100.0, ' %')}" for q in scale_pairs)
    evidence = (
        f"scale error {e0[0]:.3f} → {e1[0]:.3f} ± {e1[1]:.3f} (reduction {red}; needs ≥ {REDUCTION:.0%}: "
        f"{scale['verdict']}); accuracy vs the untouched bad init: {acc['evidence']} ({acc['verdict']})"
    )
    name = label.split(":")[0]
    return {
        "task": task,
        "factor": factor,
        "method": label,
        "claim": f"{name} recovers from every weight {factor.replace('x', '×')} on {task}",
        "verdict": overall,
        "evidence": evidence,
        "parts": {"scale": scale, "accuracy": {k: acc[k] for k in ("claim", "verdict", "evidence", "pairs")}},
        "pairs": acc["pairs"],
        "a": list(me),
        "b": list(bad),
        "key": "final_test_acc",
    }


TABLE_COLUMNS = [
    "task",
    "start → init",
    "scale error, mean |log(norm / good norm)|",
    "mean log(norm / good norm)",
    "test acc, end",
    "Δ acc vs bad init (paired)",
    "Δ acc vs good init (paired)",
    "diverged",
    "init cost (train steps)",
    "init / training time",
    "verdict: recovers",
]


def table_rows(runs: list[dict[str, Any]], task: str, labels: list[str], verdicts: dict[tuple, str]) -> list[list[str]]:
    rows = []
    rs = [r for r in runs if r["task"] == task]
    keys = [(start_name(None), "default")] + [(start_name(f), lab) for f in FACTORS for lab in ["default", *labels]]
    for st, init in keys:
        sel = [r for r in rs if r["threads"] == 1 and r["start"] == st and r["init"] == init]
        if not sel:
            continue
        err = stat([r["scale_error"] for r in sel])
        mlr = stat([r["mean_log_ratio"] for r in sel])
        fin = stat([r["final_test_acc"] for r in sel])
        cost = stat([r["init_in_train_steps"] or 0.0 for r in sel])
        steps = sel[0]["train_steps"]
        div = [r["seed"] for r in sel if r["diverged"]]
        if st == start_name(None):
            vs_bad, vs_good, verdict_cell = "—", "—", "—"
        else:
            vs_good = fmt(paired(rs, (st, init), (start_name(None), "default")))
            if init == "default":
                vs_bad, verdict_cell = "—", "—"
            else:
                vs_bad = fmt(paired(rs, (st, init), (st, "default")))
                verdict_cell = verdicts[(task, st, init)]
        shown = init if init != "default" else "(untouched)"
        rows.append(
            [
                task,
                f"{st} → {shown}",
                f"{err[0]:.3f} ± {err[1]:.3f}",
                f"{mlr[0]:+.3f} ± {mlr[1]:.3f}",
                f"{fin[0]:.3f} ± {fin[1]:.3f}",
                vs_bad,
                vs_good,
                f"{len(div)}/{len(sel)}",
                f"{cost[0]:.0f}",
                f"{100 * cost[0] / steps:.1f} %",
                verdict_cell,
            ]
        )
    return rows


def plot(runs: list[dict[str, Any]], task_names: list[str], labels: list[str], path: Path) -> None:
    """Per-layer norm ratio to the good init (geometric mean over seeds), one panel per (task, factor)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    fig, axes = plt.subplots(
        len(task_names), len(FACTORS), figsize=(5.2 * len(FACTORS), 3.4 * len(task_names)), squeeze=False
    )
    for i, task in enumerate(task_names):
        for j, factor in enumerate(FACTORS):
            ax = axes[i][j]
            st = start_name(factor)
            for init in ["default", *labels]:
                sel = [
                    r
                    for r in runs
                    if r["task"] == task and r["threads"] == 1 and r["start"] == st and r["init"] == init
                ]
                if not sel:
                    continue
                per_layer = [math.exp(statistics.fmean(v)) for v in zip(*(r["log_ratio"] for r in sel), strict=True)]
                style = {"color": "k", "ls": "--", "lw": 1.2} if init == "default" else {"marker": "o", "ms": 3}
                ax.plot(
                    range(1, len(per_layer) + 1),
                    per_layer,
                    label="bad init, untouched" if init == "default" else init,
                    **style,
                )
            ax.axhline(1.0, color="0.4", lw=4, alpha=0.3, label="good init (Kaiming)")
            ax.set_yscale("log", base=2)
            ax.set_xlabel("weight layer")
            ax.set_ylabel("norm / good init's norm")
            ax.set_title(f"{task}: every weight {factor.replace('x', '×')}", fontsize=9)
            ax.grid(alpha=0.3, which="both")
            if i == 0 and j == len(FACTORS) - 1:
                ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def findings(runs: list[dict[str, Any]], task_names: list[str], labels: list[str], methods: list[str]) -> list[str]:
    """What the numbers say, as notes computed from the runs (1 thread)."""

    def sel(task: str, factor: str, init: str) -> list[dict[str, Any]]:
        st = start_name(factor)
        return [r for r in runs if r["task"] == task and r["threads"] == 1 and r["start"] == st and r["init"] == init]

    def geo(rs: list[dict[str, Any]]) -> float:
        return math.exp(statistics.fmean(r["mean_log_ratio"] for r in rs))

    out = []
    parts = []
    for task in task_names:
        quarter, four = sel(task, "x1/4", "default"), sel(task, "x4", "default")
        parts.append(
            f"{task}: ×1/4 ends at test acc {stat([r['final_test_acc'] for r in quarter])[0]:.3f} (chance: 0.10), "
            f"×4 diverges in {sum(r['diverged'] for r in four)}/{len(four)} runs"
        )
    all_diverge = all(r["diverged"] for task in task_names for r in sel(task, "x4", "default"))
    out.append(
        "The bad inits untouched: "
        + "; ".join(parts)
        + (". So from ×4 the accuracy half of a claim only needs a run that does not diverge." if all_diverge else ".")
    )
    meta = next((lab for lab in labels if lab.split(":")[0] == "metainit"), None)
    if meta is not None:
        ends = []
        for task in task_names:
            for factor in FACTORS:
                rs = sel(task, factor, meta)
                g, red = geo(rs), statistics.fmean(r["scale_error_reduction"] for r in rs)
                side = "stops short of it" if (g - 1) * (FACTORS[factor] - 1) > 0 else "crosses over"
                ends.append(f"{task} from {factor.replace('x', '×')}: {g:.2f}×, {side}, error −{red:.0%}")
        out.append(
            "Where MetaInit ends (geometric mean over layers and seeds of norm / good norm; side of the good "
            "scale; mean fall of the scale error): " + "; ".join(ends) + "."
        )
    nio = next((lab for lab in labels if lab.split(":")[0] == "nio"), None)
    if nio is not None:
        from initopt.methods.base import get_method

        cfg = get_method("nio").Config()
        moved = [
            math.exp(x - math.log(FACTORS[factor]))
            for task in task_names
            for factor in FACTORS
            for r in sel(task, factor, nio)
            for x in r["log_ratio"]
        ]
        out.append(
            f"NIO at its released settings (lr {cfg.lr}, {cfg.steps} steps) moves each scale by at most "
            f"lr × steps = {cfg.lr * cfg.steps:.2f} (one Adam step moves a scale by at most about lr): its scales "
            f"end between {min(moved):.2f} and {max(moved):.2f} times the start"
            + (
                ", so it cannot undo a factor of 4 at this budget, whatever its objective prefers."
                if cfg.lr * cfg.steps < 0.75
                else "."
            )
        )
    rules = [m for m in ("hessian", "lsuv", "kaiming") if m in methods]
    same = [
        m
        for m in rules
        if all(
            abs(a - b) <= 1e-4 * b
            for task in task_names
            for ra, rb in zip(sel(task, "x1/4", m), sel(task, "x4", m), strict=True)
            for a, b in zip(ra["norms"], rb["norms"], strict=True)
        )
    ]
    if same:
        out.append(
            f"{', '.join(same)} set each layer's scale by a rule that ignores the starting scale: they end at the "
            "same weights (norms equal to 1e-4) from ×1/4 and from ×4, so their rows for the two factors match."
        )
    return out


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models and runs (seconds)")
    p.add_argument("--out", type=Path, default=RESULTS / "study_recovery.json")
    p.add_argument("--lr", type=float, default=0.03)
    p.add_argument("--steps", type=int, default=None, help="training steps (default 400)")
    p.add_argument("--metainit-steps", type=int, default=500, help="MetaInit iterations (paper: 500)")
    args = p.parse_args(argv)
    quick = args.quick
    steps = args.steps or (12 if quick else 400)
    train_kw = {"steps": steps, "lr": args.lr, "momentum": 0.9, "batch_size": 16 if quick else 64}
    available = initopt.methods()
    methods = [m for m in WANTED if m in available]
    missing = [m for m in WANTED if m not in available]

    def spec(m: str) -> tuple[str, Any]:
        if quick and m in ("metainit", "gradinit", "nio"):
            return (f"{m}:steps=3", (m, {"steps": 3}))
        if m == "metainit" and args.metainit_steps != 500:
            return (f"metainit:steps={args.metainit_steps}", ("metainit", {"steps": args.metainit_steps}))
        return (m, m)

    inits = [("default", "default"), *(spec(m) for m in methods)]
    labels = [lab for lab, _ in inits[1:]]
    metainit_label = spec("metainit")[0] if "metainit" in methods else None

    train, test = mnist1d(num_samples=400 if quick else 4000, seed=0)
    if quick:
        train = torch.utils.data.TensorDataset(*(t[:96] for t in train.tensors))
    builds = tasks(quick)
    seeds_of = {HEADLINE_TASK: [0, 1] if quick else [0, 1, 2, 3, 4]}
    t0, cpu0 = time.perf_counter(), time.process_time()
    runs: list[dict[str, Any]] = []
    for task, build in builds.items():
        seeds = seeds_of.get(task, [0, 1] if quick else [0, 1, 2])
        print(f"{task}: seeds {seeds}", flush=True)
        runs += run_start(task, build, None, [("default", "default")], seeds, 1, (train, test), train_kw)
        for factor in FACTORS:
            runs += run_start(task, build, factor, inits, seeds, 1, (train, test), train_kw)
    # the headline comparison again at 2 threads
    if metainit_label is not None:
        headline_inits = [("default", "default"), next(i for i in inits if i[0] == metainit_label)]
        runs += run_start(
            HEADLINE_TASK,
            builds[HEADLINE_TASK],
            HEADLINE_FACTOR,
            headline_inits,
            seeds_of[HEADLINE_TASK],
            2,
            (train, test),
            train_kw,
        )
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0

    verdicts, verdict_of = [], {}
    for task in builds:
        rs = [r for r in runs if r["task"] == task]
        for factor in FACTORS:
            for lab in labels:
                v = recovery_verdict(rs, task, factor, lab)
                verdicts.append(v)
                verdict_of[(task, start_name(factor), lab)] = v["verdict"]
    # the headline first
    if metainit_label is not None:
        verdicts.sort(
            key=lambda v: (
                not (v["task"] == HEADLINE_TASK and v["factor"] == HEADLINE_FACTOR and v["method"] == metainit_label)
            )
        )
    rows = [row for task in builds for row in table_rows(runs, task, labels, verdict_of)]

    notes = [
        f"Training: SGD, momentum 0.9, lr {args.lr}, {steps} steps, batch {train_kw['batch_size']}, from the "
        "weights each init leaves; seeds "
        + ", ".join(f"{t}: {len(seeds_of.get(t, [0, 1] if quick else [0, 1, 2]))}" for t in builds)
        + " (paired by seed: same draw, same batch order). Every method at its defaults"
        + (" (quick mode: 3 steps of each learned method)" if quick else "")
        + (
            f"; MetaInit at {args.metainit_steps} steps (paper: 500)"
            if args.metainit_steps != 500 and not quick
            else "; MetaInit at the paper's 500 steps, noise inputs"
            if not quick
            else ""
        )
        + ".",
        "Scale error: mean over weight layers of |log(norm / norm of the good Kaiming init of the same seed)|, "
        "norms read just before the first training step; the untouched bad init has exactly log 4 = 1.386. "
        "A negative mean log ratio means the weights end smaller than the good init's.",
        "A diverged run (non-finite training loss) counts with accuracy 0.",
    ]
    if missing:
        notes.append(f"Not in initopt.methods() at run time, so not run: {', '.join(missing)}.")
    # the thread check of the headline
    if metainit_label is not None:
        hl = [r for r in runs if r["task"] == HEADLINE_TASK and r["start"] == start_name(HEADLINE_FACTOR)]
        by = {(r["init"], r["seed"], r["threads"]): r for r in hl}
        acc_spread = [
            abs(r["final_test_acc"] - by[(r["init"], r["seed"], 2)]["final_test_acc"])
            for r in hl
            if r["threads"] == 1 and (r["init"], r["seed"], 2) in by
        ]
        err_spread = [
            abs(r["scale_error"] - by[(r["init"], r["seed"], 2)]["scale_error"])
            for r in hl
            if r["threads"] == 1 and (r["init"], r["seed"], 2) in by
        ]
        head = next(
            v
            for v in verdicts
            if v["method"] == metainit_label and v["task"] == HEADLINE_TASK and v["factor"] == HEADLINE_FACTOR
        )
        per_thread = "; ".join(f"{q['threads']} thr: {fmt(q)}" for q in head["pairs"])
        notes.append(
            f"Thread check (headline: {metainit_label} vs the untouched ×1/4 init on {HEADLINE_TASK}, "
            f"{len(acc_spread) // 2} seeds at 1 and 2 threads): paired accuracy difference {per_thread}; "
            f"|final acc at 1 thread − at 2 threads| per run: mean {statistics.fmean(acc_spread):.4f}, "
            f"max {max(acc_spread):.4f}; |scale error at 1 − at 2 threads|: max {max(err_spread):.2e}. "
            f"Headline verdict at both thread counts: {head['verdict']}."
        )
    # overshoots
    shoots = []
    for task in builds:
        for factor in FACTORS:
            for lab in labels:
                sel = [
                    r
                    for r in runs
                    if r["task"] == task and r["threads"] == 1 and r["start"] == start_name(factor) and r["init"] == lab
                ]
                n_layers = len(sel[0]["layers"])
                far = stat([r["overshoot_layers"] for r in sel])
                mlr = stat([r["mean_log_ratio"] for r in sel])
                crossed = mlr[0] * math.log(FACTORS[factor]) < 0 and abs(mlr[0]) > OVERSHOOT
                if far[0] > 0 or crossed:
                    shoots.append(
                        f"{lab} from {factor.replace('x', '×')} on {task}: {far[0]:.1f} of {n_layers} layers end more "
                        f"than 25 % past the good norm on the far side (mean log ratio {mlr[0]:+.2f}"
                        + (", the whole network crosses over" if crossed else "")
                        + ")"
                    )
    notes.append(
        "Overshoot (a weight layer ending more than 25 % beyond the good init's norm on the side opposite "
        "to where it started): " + ("; ".join(shoots) if shoots else "none") + "."
    )
    notes += findings(runs, list(builds), labels, methods)
    notes.append(
        f"Wall time of the study: {seconds:.0f} s ({cpu:.0f} s of CPU in this process; shared machine, "
        "so the init costs in training steps are ratios measured within each run)."
    )
    payload = {
        "claim": CLAIM,
        "config": {
            "tasks": list(builds),
            "factors": FACTORS,
            "methods": methods,
            "inits": labels,
            "metainit_steps": 3 if quick else args.metainit_steps,
            "quick": quick,
            "reduction_needed": REDUCTION,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            **train_kw,
        },
        "table": {
            "title": (
                "Recovery from every weight ×1/4 and ×4 (Kaiming-normal start): scale error to the good init, "
                "final test accuracy (mean ± std over seeds, 1 thread), paired accuracy differences, init cost"
                + (f"; MetaInit at {args.metainit_steps} steps" if not quick else "; quick mode")
            ),
            "columns": TABLE_COLUMNS,
            "rows": rows,
        },
        "verdicts": verdicts,
        "notes": notes,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "runs": runs,
    }
    path = write_study("recovery", payload, args.out)
    plot(runs, list(builds), labels, path.with_suffix(".png"))
    print("\n".join(notes))
    for v in verdicts:
        print(f"{v['verdict']:>14}: {v['claim']} ({v['evidence']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
