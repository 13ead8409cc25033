"""Claims study 1: deep networks without normalization (GradInit Table 1; MetaInit).

Claim (GradInit, Zhu et al. 2021, Table 1; MetaInit, Dauphin & Schoenholz 2019): starting
from a standard initialization, the learned initializations make deep networks without
normalization or skip connections train faster in the first epoch and reach a better
accuracy than the standard initialization; with BatchNorm the gain is smaller.

Setting: deep plain networks (16 layers; no normalization, no skips) on MNIST-1D (generated
offline) and scikit-learn's digits: an MLP of width 96 on each, 1-D CNNs of width 24 with ReLU
and with SiLU (a smooth activation), and the ReLU CNN with BatchNorm as the second setting; a
12-layer 2-D CNN on digits is there with ``--tasks cnn12_relu_digits``, left out of the default
run for time. On the CNNs MetaInit runs 100 of its 500 steps (the full run costs about 3800
training steps there).
SGD with momentum 0.9 at a fixed lr (``--lr``), batch 64. Baselines:
PyTorch's default init, Kaiming-normal (fan-in, zero biases), LSUV and the Hessian-norm rule
(from the default init); GradInit, MetaInit and NIO at the spec's settings start from Kaiming,
as their papers do (the study of starting points, ``study_start.py``, tries the others).

Every comparison is paired by seed (same seed: same model draw, same batch order) against the
better of the two plain baselines (default, Kaiming) on that task, and the headline task is
run at 1 and at 2 threads; the verdict rule is in ``studies.py``. Writes
``results/study_deep.json`` and ``results/study_deep.png``.

    python benchmarks/study_deep.py            # default size: about 17 minutes on one idle core
    python benchmarks/study_deep.py --tasks cnn16_silu_mnist1d   # one task (a CNN: about 5 minutes)
    python benchmarks/study_deep.py --quick    # tiny, seconds (what CI runs)
"""

from __future__ import annotations

import sys
import time

import torch
from studies import (
    TABLE_COLUMNS,
    baseline_of,
    compute_seconds,
    deep_tasks,
    fmt,
    judge,
    plot_final_acc,
    print_report,
    rows_by_init,
    study_args,
    thread_note,
    train_grid,
    write_study,
)

import initopt

CLAIM = (
    "Learned initializations (GradInit, MetaInit, NIO, from Kaiming as in their papers) make deep plain "
    "networks train faster in the first epoch and end better than the better of PyTorch's default and "
    "Kaiming init; the Hessian-norm rule and LSUV are the analytic/data-driven baselines."
)
LEARNED = ["gradinit", "metainit", "nio"]
HEADLINE = "mlp16_relu_mnist1d"
DEFAULT_TASKS = [
    "mlp16_relu_mnist1d",
    "mlp16_relu_digits",
    "cnn16_relu_mnist1d",
    "cnn16_silu_mnist1d",
    "cnn16_relu_bn_mnist1d",
]
CNN_METAINIT_STEPS = 100  # MetaInit's 500 steps cost ~3800 training steps on the CNNs: 100 there, for time


def main(argv: list[str] | None = None) -> int:
    args = study_args(__doc__, "deep", argv, None)
    steps = args.steps or (12 if args.quick else 200)
    tasks = deep_tasks(quick=args.quick)
    names = args.tasks or DEFAULT_TASKS
    baselines = ["hessian"] + (["lsuv"] if "lsuv" in initopt.methods() else [])
    learned = [(m, (m, {"steps": 3})) if args.quick else m for m in LEARNED]
    if args.quick:
        baselines = [(m, (m, {"steps": 2})) for m in baselines]
    train_kw = {"steps": steps, "lr": args.lr, "momentum": 0.9, "batch_size": 64 if not args.quick else 16}
    t_start = time.perf_counter()
    runs: list[dict] = []
    for name in names:
        task = tasks[name]
        train, test = task["data"]()
        if args.quick:
            train = torch.utils.data.TensorDataset(*(t[:96] for t in train.tensors))
        print(f"{name}: {len(train)} training examples, {steps} steps of batch {train_kw['batch_size']}")
        seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2, 3, 4] if name.startswith("mlp") else [0, 1, 2])
        for threads in (1, 2) if name == HEADLINE or args.quick else (1,):
            kw = {"seeds": seeds, "threads": threads, "tags": {"task": name}, "cache": args.cache, **train_kw}
            runs += train_grid(lambda t=task: t["make"]("default"), train, test, ["default", *baselines], **kw)
            mine = [
                (f"metainit:steps={CNN_METAINIT_STEPS}", ("metainit", {"steps": CNN_METAINIT_STEPS}))
                if m == "metainit" and name.startswith("cnn")
                else m
                for m in learned
                if threads == 1 or m != "metainit"  # 2 threads: every init but MetaInit (~6000 steps)
            ]
            runs += train_grid(
                lambda t=task: t["make"]("kaiming"), train, test, ["default", *mine], start="kaiming", **kw
            )
    seconds = time.perf_counter() - t_start

    # paired comparisons against the better plain baseline, per task and metric
    labels = [b if isinstance(b, str) else b[0] for b in baselines]
    candidates = [("default", lab) for lab in labels] + [
        ("kaiming", m if isinstance(m, str) else m[0]) for m in learned
    ]
    verdicts, table_rows = [], []
    for name in names:
        rs = [r for r in runs if r["task"] == name]
        base = baseline_of(rs)
        row = [name, base[0]]
        for cand in candidates:
            if cand == ("kaiming", "metainit") and name.startswith("cnn") and not args.quick:
                cand = ("kaiming", f"metainit:steps={CNN_METAINIT_STEPS}")
            label = f"{cand[0]} → {cand[1]}"
            fin = judge(rs, cand, base, f"{label} beats {base[0]} at the end of training on {name}")
            e1 = judge(rs, cand, base, f"{label} beats {base[0]} after one epoch on {name}", "epoch1_test_acc")
            verdicts += [fin, e1]
            row.append(f"{fmt(fin['pairs'][0])}; epoch 1 {fmt(e1['pairs'][0])} — {fin['verdict']}")
        table_rows.append(row)
    notes = [
        f"Training: SGD, momentum 0.9, lr {args.lr}, {steps} steps, batch {train_kw['batch_size']}; "
        "seeds 0-4 for the MLPs, 0-2 for the CNNs (paired by seed).",
        thread_note(runs, HEADLINE),
        f"Wall time of this invocation: {seconds:.0f} s; computation in the runs (inits + training, summed): "
        f"{compute_seconds(runs):.0f} s.",
    ]
    per_task_tables = {name: rows_by_init([r for r in runs if r["task"] == name], threads=1) for name in names}
    payload = {
        "claim": CLAIM,
        "config": {"seeds": args.seeds or "5 for MLPs, 3 for CNNs", "tasks": names, "quick": args.quick, **train_kw},
        "table": {
            "title": "Paired difference in final test accuracy (and epoch 1) against the better plain baseline",
            "columns": ["task", "better baseline", *[f"{s} → {m}" for s, m in candidates]],
            "rows": table_rows,
        },
        "task_tables": {"columns": TABLE_COLUMNS, "tables": per_task_tables},
        "verdicts": verdicts,
        "notes": notes,
        "seconds": seconds,
        "runs": runs,
    }
    path = write_study("deep", payload, args.out)
    plot_final_acc(runs, names, path.with_suffix(".png"))
    print_report(notes, verdicts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
