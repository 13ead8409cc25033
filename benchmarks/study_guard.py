"""Claims study: the learned methods' guard on the deep plain networks of ``study_deep.py``.

Claim: at the library's defaults, with their guard on (``initopt.core.guard``: the scales are
kept only if copies trained from them for 25 real optimizer steps reach a lower held-out loss
than copies trained from the start), GradInit, MetaInit and NIO train at least as well as their
start; and where the papers' algorithms help, the guard keeps their scales.

Setting: the tasks, models, training and seeds of ``study_deep.py`` (16-layer plain MLPs and
1-D CNNs on MNIST-1D and digits, SGD with momentum 0.9 at lr 0.01 for 200 steps, 5 seeds for the
MLPs and 3 for the CNNs; MetaInit 100 steps on the CNNs), every learned method from Kaiming as
there. Each method runs twice per seed: as its paper's algorithm (guard off; the runs of
``study_deep.py``, read from the run cache when present) and at the library's defaults (guard
on). No training optimizer is given to the inits, so the guard tries SGD and Adam (a user who
passes ``optimizer=`` gets a trial of that optimizer alone). Paired by seed, at 1 thread.
Writes ``results/study_guard.json``.

    python benchmarks/study_guard.py            # default size (the guarded half: ~15 minutes)
    python benchmarks/study_guard.py --quick    # tiny, seconds (what CI runs)
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import torch
from studies import (
    compute_seconds,
    deep_tasks,
    fmt,
    paired,
    plot_final_acc,
    print_report,
    study_args,
    train_grid,
    verdict,
    write_study,
)
from study_deep import CNN_METAINIT_STEPS, DEFAULT_TASKS

CLAIM = (
    "With their guard on (the library's default), GradInit, MetaInit and NIO train at least as well as their "
    "start on the deep plain networks of study_deep, and the guard keeps their scales where the papers' "
    "algorithms help."
)
LEARNED = ["gradinit", "metainit", "nio"]


def spec_of(method: str, task: str, quick: bool) -> tuple[str, Any]:
    if quick:
        return method, (method, {"steps": 3})
    if method == "metainit" and task.startswith("cnn"):
        return f"metainit:steps={CNN_METAINIT_STEPS}", ("metainit", {"steps": CNN_METAINIT_STEPS})
    return method, method


def main(argv: list[str] | None = None) -> int:
    args = study_args(__doc__, "guard", argv, None)
    steps = args.steps or (12 if args.quick else 200)
    tasks = deep_tasks(quick=args.quick)
    names = args.tasks or DEFAULT_TASKS
    train_kw = {"steps": steps, "lr": args.lr, "momentum": 0.9, "batch_size": 64 if not args.quick else 16}
    t_start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    for name in names:
        task = tasks[name]
        train, test = task["data"]()
        if args.quick:
            train = torch.utils.data.TensorDataset(*(t[:96] for t in train.tensors))
        seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2, 3, 4] if name.startswith("mlp") else [0, 1, 2])
        print(f"{name}: {len(train)} training examples, {steps} steps of batch {train_kw['batch_size']}")
        kw = {"seeds": seeds, "threads": 1, "tags": {"task": name}, "cache": args.cache, **train_kw}
        specs = [spec_of(m, name, args.quick) for m in LEARNED]
        make = lambda t=task: t["make"]("kaiming")  # noqa: E731
        runs += train_grid(make, train, test, ["default", *specs], start="kaiming", **kw)
        guarded = [(f"{label} (guarded)", spec) for label, spec in specs]
        runs += train_grid(make, train, test, guarded, start="kaiming", paper=False, **kw)
    seconds = time.perf_counter() - t_start

    rows, verdicts = [], []
    for name in names:
        rs = [r for r in runs if r["task"] == name]
        row = [name]
        for m in LEARNED:
            label = spec_of(m, name, args.quick)[0]
            paper = paired(rs, ("kaiming", label), ("kaiming", "default"), threads=1)
            guard = paired(rs, ("kaiming", f"{label} (guarded)"), ("kaiming", "default"), threads=1)
            kept = [r.get("guard_kept") for r in rs if r["init"] == f"{label} (guarded)"]
            n_kept = sum(k is True for k in kept)
            harm = verdict([guard]) == "not supported"
            paper_helps = verdict([paper]) == "supported"
            guard_helps = verdict([guard]) == "supported"
            verdicts.append(
                {
                    "task": name,
                    "claim": f"guarded {m} trains at least as well as its start (Kaiming) on {name}",
                    "verdict": "not supported" if harm else "supported",
                    "evidence": f"guarded − Kaiming {fmt(guard)}; paper's algorithm − Kaiming {fmt(paper)}; "
                    f"scales kept on {n_kept}/{len(kept)} seeds",
                    "pairs": [guard],
                }
            )
            if paper_helps:
                verdicts.append(
                    {
                        "task": name,
                        "claim": f"where the paper's {m} helps on {name}, the guard keeps that gain",
                        "verdict": "supported" if guard_helps else "not supported",
                        "evidence": f"guarded − Kaiming {fmt(guard)} vs paper's algorithm − Kaiming {fmt(paper)}; "
                        f"kept on {n_kept}/{len(kept)} seeds",
                        "pairs": [guard, paper],
                    }
                )
            row.append(f"paper {fmt(paper)}; guarded {fmt(guard)}; kept {n_kept}/{len(kept)}")
        rows.append(row)
    decisions = []  # (kept, paper's algorithm minus Kaiming) per guarded run
    for g in (r for r in runs if r["init"].endswith(" (guarded)") and r.get("guard_kept") is not None):
        key = (g["task"], g["seed"])
        paper_run = next(
            r for r in runs if (r["task"], r["seed"], r["init"]) == (*key, g["init"][: -len(" (guarded)")])
        )
        start_run = next(r for r in runs if (r["task"], r["seed"], r["init"]) == (*key, "default"))
        decisions.append((g["guard_kept"], (paper_run["final_test_acc"] or 0.0) - (start_run["final_test_acc"] or 0.0)))
    agree = sum(k == (d > 0) for k, d in decisions)
    big_loss = [k for k, d in decisions if d < -0.10]
    big_gain = [k for k, d in decisions if d > 0.10]
    guard_cost = [
        r["init_in_train_steps"]
        for r in runs
        if r["init"].endswith("(guarded)") and r.get("init_in_train_steps") is not None
    ]
    notes = [
        f"Training: SGD, momentum 0.9, lr {args.lr}, {steps} steps, batch {train_kw['batch_size']}, from Kaiming "
        "(the settings of study_deep); 1 thread; the inits get no optimizer, so the guard tries SGD and Adam.",
        f"Init cost of the guarded runs (search + guard), median {statistics.median(guard_cost):.0f} training steps."
        if guard_cost
        else "",
        f"The guard's decision agreed with the 200-step outcome (kept exactly when the paper's algorithm ended above "
        f"Kaiming) on {agree} of {len(decisions)} runs; it rejected {len(big_loss) - sum(big_loss)} of the "
        f"{len(big_loss)} runs where the paper's algorithm lost more than 10 points and kept {sum(big_gain)} of the "
        f"{len(big_gain)} where it gained more than 10.",
        f"Wall time of this invocation: {seconds:.0f} s; computation in the runs: {compute_seconds(runs):.0f} s.",
    ]
    payload = {
        "claim": CLAIM,
        "config": {"seeds": args.seeds or "5 for MLPs, 3 for CNNs", "tasks": names, "quick": args.quick, **train_kw},
        "table": {
            "title": "Paired difference in final test accuracy against the Kaiming start, and the guard's decisions",
            "columns": ["task", *LEARNED],
            "rows": rows,
        },
        "verdicts": verdicts,
        "notes": [n for n in notes if n],
        "seconds": seconds,
        "runs": runs,
    }
    path = write_study("guard", payload, args.out)
    plot_final_acc(runs, names, path.with_suffix(".png"))
    print_report(payload["notes"], verdicts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
