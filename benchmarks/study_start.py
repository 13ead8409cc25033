"""Claims study 5: starting point and composition of the learned initializations.

Claim: GradInit and NIO start from Kaiming init in their papers, MetaInit from whatever it is
given. Measured beforehand with an independent implementation: on a 16-layer plain ReLU MLP
(width 96) on MNIST-1D, from PyTorch's default init (about 0.41x the He scale) GradInit,
MetaInit and NIO at the spec's settings leave the network at chance after SGD, because their
objectives carry almost no gradient towards larger scales once the signal has vanished;
the analytic Hessian rule trains, and GradInit or NIO started from it train about as well.
This study asks, per task: does the starting point (PyTorch's default, Kaiming-normal, the
Hessian-norm rule) decide the outcome, and does a learned stage on top of a good start
(``initialize_(model, data, ["hessian", "gradinit"])``) add anything?

Setting: the 16-layer plain ReLU MLP (width 96) and the 16-layer plain SiLU 1-D CNN (width 24)
of ``studies.deep_tasks`` on MNIST-1D; SGD with momentum 0.9, lr 0.01, 200 steps (4 epochs)
at batch 64; each start alone and followed by GradInit, MetaInit or NIO at the spec's
settings (MetaInit on the MLP only: its 500 steps cost ~3800 training steps on the CNN); 5 seeds
on the MLP (headline; each start alone and followed by GradInit also at 2 threads), 3 on the CNN;
paired by seed.
Writes ``results/study_start.json`` and ``results/study_start.png``.

    python benchmarks/study_start.py            # default size (about 12 minutes on one thread)
    python benchmarks/study_start.py --quick    # tiny, seconds (what CI runs)
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from studies import (
    TABLE_COLUMNS,
    compute_seconds,
    deep_tasks,
    judge,
    plot_final_acc,
    print_report,
    rows_by_init,
    stat,
    study_args,
    thread_note,
    train_grid,
    write_study,
)

from initopt import initialize_

CLAIM = (
    "The starting point decides whether a deep plain network trains: from PyTorch's default init the "
    "learned methods stay where they start, from Kaiming or the Hessian-norm rule the network trains; "
    "a learned stage on top of a good start adds little."
)
METHODS = ["gradinit", "metainit", "nio"]
STARTS = ["default", "kaiming", "hessian"]
HEADLINE = "mlp16_relu_mnist1d"


def methods_for(task: str, threads: int) -> list[str]:
    """MetaInit on the MLP only (its 500 steps cost ~3800 training steps on the CNN); at 2 threads
    the headline pair only (each start alone and followed by GradInit)."""
    if threads == 2:
        return ["gradinit"]
    return METHODS if task.startswith("mlp") else ["gradinit", "nio"]


def inits_for(start: str, quick: bool, methods: list[str] = METHODS) -> list[tuple[str, object]]:
    """(label, initialize_ spec) of every init run from ``start``; the label "default" is the start alone."""

    def stage(m: str) -> object:
        return (m, {"steps": 3}) if quick else m

    first = [] if start != "hessian" else [stage("hessian")]
    out: list[tuple[str, object]] = [("default", first[0] if first else "default")]
    for m in methods:
        out.append((m, [*first, stage(m)] if first else stage(m)))
    return out


def hessian_over_he(task: dict, quick: bool) -> list[float]:
    """Per weight tensor: its std after the Hessian rule over the He std sqrt(2 / fan_in) (seed 0)."""
    from initopt.data import loader

    train, _ = task["data"]()
    torch.manual_seed(0)
    model = task["make"]()
    initialize_(model, loader(train, 16 if quick else 64), "hessian", progress=False)
    with torch.no_grad():
        return [float(p.std() / (2 / p[0].numel()) ** 0.5) for p in model.parameters() if p.ndim >= 2]


def main(argv: list[str] | None = None) -> int:
    args = study_args(__doc__, "start", argv, ["mlp16_relu_mnist1d", "cnn16_silu_mnist1d"])
    steps = args.steps or (12 if args.quick else 200)
    tasks = deep_tasks(quick=args.quick)
    train_kw = {"steps": steps, "lr": args.lr, "momentum": 0.9, "batch_size": 16 if args.quick else 64}
    t0 = time.perf_counter()
    runs: list[dict] = []
    for name in args.tasks:
        task = tasks[name]
        train, test = task["data"]()
        if args.quick:
            train = torch.utils.data.TensorDataset(*(t[:96] for t in train.tensors))
        seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2, 3, 4] if name.startswith("mlp") else [0, 1, 2])
        print(f"{name}: seeds {seeds}")
        for threads in (1, 2) if name == HEADLINE else (1,):
            for start in STARTS:
                make = (lambda t=task: t["make"]("kaiming")) if start == "kaiming" else (lambda t=task: t["make"]())
                runs += train_grid(
                    make,
                    train,
                    test,
                    inits_for(start, args.quick, methods_for(name, threads)),
                    seeds=seeds,
                    threads=threads,
                    start=start,
                    tags={"task": name},
                    cache=args.cache,
                    **train_kw,
                )
    seconds = time.perf_counter() - t0

    verdicts, rows = [], []
    for name in args.tasks:
        rs = [r for r in runs if r["task"] == name]

        def compare_pair(a: tuple[str, str], b: tuple[str, str], claim: str, rs: list[dict] = rs) -> None:
            verdicts.append(judge(rs, a, b, f"{claim} on {rs[0]['task']}"))

        for m in methods_for(name, 1):
            compare_pair(("kaiming", m), ("default", m), f"{m} from Kaiming beats {m} from the default init")
            compare_pair(("hessian", m), ("default", m), f"{m} from the Hessian rule beats {m} from the default init")
            for start in STARTS:
                compare_pair((start, m), (start, "default"), f"{m} improves on its start ({start})")
        compare_pair(("hessian", "default"), ("kaiming", "default"), "the Hessian rule beats Kaiming init")
        for start in STARTS:
            row = [name, start]
            for label in ["default", *METHODS]:
                sel = [r for r in rs if r["threads"] == 1 and r["start"] == start and r["init"] == label]
                if not sel:
                    row.append("not run")
                    continue
                fin = stat([r["final_test_acc"] for r in sel])
                e1 = stat([r["epoch1_test_acc"] for r in sel])
                div = sum(r["diverged"] for r in sel)
                row.append(f"{fin[0]:.3f} ± {fin[1]:.3f} (ep. 1: {e1[0]:.3f})" + (f", {div} diverged" if div else ""))
            rows.append(row)
    best = {}
    for name in args.tasks:
        means = {}
        for r in runs:
            if r["task"] == name and r["threads"] == 1:
                means.setdefault((r["start"], r["init"]), []).append(r["final_test_acc"])
        (bs, bi), vals = max(means.items(), key=lambda kv: statistics.fmean(kv[1]))
        best[name] = {"start": bs, "init": bi, "final_test_acc": statistics.fmean(vals)}
    fixed_points = {name: hessian_over_he(tasks[name], args.quick) for name in args.tasks}
    notes = [
        f"Training: SGD, momentum 0.9, lr {args.lr}, {steps} steps, batch {train_kw['batch_size']}; "
        "seeds 0-4 on the MLP, 0-2 on the CNN (paired by seed).",
        "Best (start, init) by mean final accuracy: "
        + "; ".join(f"{n}: {b['start']} → {b['init']} ({b['final_test_acc']:.3f})" for n, b in best.items()),
        thread_note(runs, HEADLINE, "start, init, seed"),
        "The Hessian rule's weight std over the He std sqrt(2/fan_in), per layer (seed 0): "
        + "; ".join(
            f"{n}: hidden {min(v[:-1]):.2f}-{max(v[:-1]):.2f}, head {v[-1]:.2f}" for n, v in fixed_points.items()
        )
        + " (for ReLU the rule is He init; for SiLU its mean-field fixed point sits a little above it).",
        f"Wall time of this invocation: {seconds:.0f} s; computation in the runs (inits + training, summed): "
        f"{compute_seconds(runs):.0f} s.",
    ]
    payload = {
        "claim": CLAIM,
        "config": {"tasks": args.tasks, "starts": STARTS, "methods": METHODS, "quick": args.quick, **train_kw},
        "table": {
            "title": "Final test accuracy (mean ± std over seeds, 1 thread; epoch-1 accuracy in brackets) "
            "by starting point (rows) and learned stage (columns)",
            "columns": ["task", "start", "start alone", *[f"then {m}" for m in METHODS]],
            "rows": rows,
        },
        "task_tables": {
            "columns": TABLE_COLUMNS,
            "tables": {n: rows_by_init([r for r in runs if r["task"] == n], threads=1) for n in args.tasks},
        },
        "best": best,
        "verdicts": verdicts,
        "notes": notes,
        "seconds": seconds,
        "runs": runs,
    }
    path = write_study("start", payload, args.out)
    plot_final_acc(runs, args.tasks, path.with_suffix(".png"))
    print_report(notes, verdicts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
