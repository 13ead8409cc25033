"""Cost of one GradInit iteration, in SGD training steps of the same model and batch.

Claim: a GradInit iteration whose constraint does not fire is first order and costs about two
training steps (two forward-backward passes at the user's batch size, S and S~); a
constraint iteration (double backward) costs more. Peak memory stays within a small multiple
of a training step's.

Method: in one process, interleaved over ``--repeats`` rounds, we time (a) ``--iters`` plain
SGD steps (forward, backward, ``optimizer.step``, ``zero_grad``) at batch B and (b) the
per-iteration wall time GradInit records in ``result.history`` at batch B (S = one batch of
B, S~ = its first half plus half of the next batch), once with the bound inactive (objective
steps) and once with it always active (constraint steps). Ratios are per round, reported as
median and mean ± std over rounds. Peak memory: each workload runs alone in a fresh
subprocess; peak of the bytes live in PyTorch's CPU allocator above those live before the
workload (``common.peak_kib_above_start``, from the profiler's allocation records).

Run: ``python benchmarks/bench_gradinit.py`` (full) or ``--quick`` (seconds; used by the tests).
Writes ``benchmarks/results/gradinit_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import make_batches, peak_kib_above_start, provenance, summary, time_train_steps
from torch import nn

import initopt
from initopt import zoo

HERE = Path(__file__).resolve().parent

MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "vgg11_nobn": (lambda: zoo.vgg11(batchnorm=False), (3, 32, 32)),
    "deep_mlp": (lambda: zoo.mlp(depth=10, width=256, in_features=64), (64,)),
    "tiny_mlp": (lambda: zoo.mlp(depth=3, width=32, in_features=16), (16,)),
}


def time_gradinit(model: nn.Module, batches: list, iters: int, branch: str) -> list[float]:
    """Per-iteration seconds that GradInit records, with the bound forced off or on."""
    gamma = 1e12 if branch == "objective" else 1e-12
    res = initopt.initialize_(model, batches, "gradinit", steps=iters, gamma=gamma, guard=False, progress=False)
    assert all(h["branch"] == branch for h in res.history)
    return [h["seconds"] for h in res.history]


def measure_time(name: str, batch: int, iters: int, repeats: int, warmup: int = 2) -> dict[str, Any]:
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make()
    batches = make_batches(shape, batch)
    time_train_steps(model, batches, warmup)
    time_gradinit(model, batches, warmup, "objective")
    rounds: dict[str, list[float]] = {"train_step": [], "objective": [], "constraint": []}
    for _ in range(repeats):
        rounds["train_step"].append(statistics.median(time_train_steps(model, batches, iters)))
        for br in ("objective", "constraint"):
            rounds[br].append(statistics.median(time_gradinit(model, batches, iters, br)))
    out: dict[str, Any] = {"seconds_median": {k: statistics.median(v) for k, v in rounds.items()}, "rounds": rounds}
    for br in ("objective", "constraint"):
        ratios = [a / b for a, b in zip(rounds[br], rounds["train_step"], strict=True)]
        out[f"{br}_iteration_in_train_steps"] = summary(ratios)
    return out


def memory_probe(name: str, batch: int, workload: str) -> int:
    """Peak live bytes (KiB) of PyTorch's CPU allocator during the workload above the start,
    in this (fresh) process; see ``common.peak_kib_above_start``."""
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make()
    batches = make_batches(shape, batch)
    # one-time imports (optimizer.step pulls in torch._dynamo: tens of MB) outside the measure
    tiny, tiny_shape = MODELS["tiny_mlp"]
    tiny_batches = make_batches(tiny_shape, 4, n=2)
    time_train_steps(tiny(), tiny_batches, 1)
    time_gradinit(tiny(), tiny_batches, 1, "objective")
    time_gradinit(tiny(), tiny_batches, 1, "constraint")
    if workload == "train_step":
        return peak_kib_above_start(lambda: time_train_steps(model, batches, 3))
    return peak_kib_above_start(lambda: time_gradinit(model, batches, 3, workload))


def measure_memory(name: str, batch: int, threads: int, probes: int = 3) -> dict[str, Any]:
    """Median over ``probes`` fresh subprocesses of each workload's peak live bytes above its start."""
    peaks: dict[str, list[int]] = {"train_step": [], "objective": [], "constraint": []}
    for _ in range(probes):
        for workload in peaks:
            cmd = [sys.executable, __file__, "--_probe", name, str(batch), workload, "--threads", str(threads)]
            r = subprocess.run(cmd, capture_output=True, text=True, check=True)
            peaks[workload].append(int(r.stdout.strip().splitlines()[-1]))
    med = {k: statistics.median(v) for k, v in peaks.items()}
    base = max(med["train_step"], 1)
    return {
        "peak_kib_median": med,
        "peak_kib_probes": peaks,
        "objective_in_train_steps": med["objective"] / base,
        "constraint_in_train_steps": med["constraint"] / base,
        "method": "fresh subprocess per workload and probe, after one-time imports; peak of the bytes live in "
        "PyTorch's CPU allocator (torch.profiler allocation records, profile_memory=True) above those live "
        "before the workload (3 iterations); median of probes",
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, few iterations (seconds)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--models", nargs="*", default=["vgg11_nobn", "deep_mlp"])
    p.add_argument("--out", default=str(HERE / "results" / "gradinit_cost.json"))
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--_probe", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args._probe:
        name, batch, workload = args._probe
        print(memory_probe(name, int(batch), workload))
        return {}
    if args.quick:
        args.models, args.repeats, args.iters, args.batch = ["tiny_mlp"], 2, 3, 16
    result: dict[str, Any] = {
        "claim": "one GradInit iteration costs about two SGD training steps when the constraint does not fire",
        "config": {"batch": args.batch, "iters": args.iters, "repeats": args.repeats, "models": args.models},
        "provenance": provenance(args.threads),
        "models": {},
    }
    for name in args.models:
        print(f"[gradinit cost] {name} batch {args.batch} ...", flush=True)
        entry = measure_time(name, args.batch, args.iters, args.repeats)
        if not args.no_memory:
            entry["memory"] = measure_memory(name, args.batch, args.threads, probes=1 if args.quick else 3)
        result["models"][name] = entry
        o, c = entry["objective_iteration_in_train_steps"], entry["constraint_iteration_in_train_steps"]
        print(f"  objective iteration  {o['median']:.2f} train steps (mean {o['mean']:.2f} ± {o['std']:.2f})")
        print(f"  constraint iteration {c['median']:.2f} train steps (mean {c['mean']:.2f} ± {c['std']:.2f})")
        if "memory" in entry:
            m = entry["memory"]
            print(
                f"  peak memory: objective {m['objective_in_train_steps']:.2f}x, "
                f"constraint {m['constraint_in_train_steps']:.2f}x a training step's"
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
