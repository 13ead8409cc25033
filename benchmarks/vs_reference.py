"""Side by side with the papers' own code, on VGG-11 without BatchNorm (3x32x32, CPU).

Claims (issue 13), each a ratio of per-iteration wall time measured in the same process,
in interleaved rounds, at 1 and at 2 threads:

- ``gradinit``: one GradInit objective iteration of initopt (the bound never active, so both
  codes run the same first-order branch) costs <= 0.85 of one iteration of
  ``gradinit_utils.gradinit`` from zhuchen03/gradinit (published CIFAR settings, SGD
  target, normalized gradient, eta 0.1; S = 64 examples from two loader batches of 32, S~ =
  the first half of S and one more half-batch, as in ``train_cifar.py``). The natural run
  (gamma = 1, both branches) is reported beside it with each code's branch counts.
- ``metainit``: one MetaInit step of initopt (fresh noise batch, gradient quotient with its
  gradient and Hessian-vector product, the backward through both, the norm update) costs
  <= 0.7 of one step of ``meta_init.metainit`` from diggerdu/MetaInit (the paper's Figure 2
  code), batch 32.

Both are also given in SGD training steps of the same model and batch (forward,
cross-entropy, backward, ``SGD.step``, ``zero_grad``), timed in the same rounds.

The reference is imported unchanged from ``--reference PATH`` (a checkout of the upstream
repository; never committed here). Two things are patched around the call, not in it:
``Tensor.cuda`` is the identity (the upstream code moves every batch to the GPU), and
``torch.save`` of GradInit's final checkpoint is skipped. Per-iteration times of the
reference are the intervals between the ends of its iterations (the end of
``RescaleAdam.step`` for GradInit; the per-step ``print`` for MetaInit), the first
iteration dropped; initopt's are the ``seconds`` that ``initialize_`` records per iteration
(GradInit) and the time of ``MetaInitRun.step`` (MetaInit), first dropped likewise. Each
round times ``--iters`` iterations of every workload; the ratio of the round's medians is
one sample; the JSON holds every round, the median and the range.

    python benchmarks/vs_reference.py gradinit --reference /path/to/gradinit
    python benchmarks/vs_reference.py metainit --reference /path/to/MetaInit

Writes ``results/<method>_vs_reference.json`` (one entry per thread count; each thread count
runs in its own subprocess).
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import copy
import importlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from common import make_batches, provenance, summary, time_train_steps
from torch import nn

import initopt
from initopt import zoo

HERE = Path(__file__).resolve().parent

# zhuchen03/gradinit launch/run_gradinit.sh, VGG without BN: sgd, glr 1e-2, eta 0.1,
# gamma 1, normalized gradient, min scale 0.01, grad clip 1.
REF_GRADINIT_ARGS = {
    "gradinit_resume": "",
    "gradinit_alg": "sgd",
    "gradinit_lr": 1e-2,
    "gradinit_eta": 0.1,
    "gradinit_gamma": 1.0,
    "gradinit_normalize_grad": True,
    "gradinit_min_scale": 0.01,
    "gradinit_grad_clip": 1.0,
    "batch_no_overlap": False,
    "expname": "vs_reference",
}
OBJECTIVE_GAMMA = 1e12  # the bound never fires: every iteration is an objective iteration


@contextlib.contextmanager
def on_cpu() -> Iterator[None]:
    """``Tensor.cuda`` as the identity and ``torch.save`` skipped, for the duration."""
    cuda, save = torch.Tensor.cuda, torch.save
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    torch.save = lambda *a, **k: None  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.Tensor.cuda = cuda  # type: ignore[method-assign]
        torch.save = save


def import_reference(path: str, module: str) -> Any:
    """Import ``module`` from the upstream checkout at ``path``."""
    root = Path(path).resolve()
    if not (root / f"{module}.py").is_file():
        raise SystemExit(f"vs_reference: {root} has no {module}.py; pass a checkout of the upstream repository")
    sys.path.insert(0, str(root))
    return importlib.import_module(module)


def mark() -> tuple[float, float]:
    """(wall, process CPU) seconds now."""
    return time.perf_counter(), time.process_time()


def intervals(ends: list[tuple[float, float]]) -> dict[str, list[float]]:
    """Wall and CPU seconds between consecutive iteration ends (the first iteration dropped)."""
    return {
        "wall": [b[0] - a[0] for a, b in itertools.pairwise(ends)],
        "cpu": [b[1] - a[1] for a, b in itertools.pairwise(ends)],
    }


class EndMarks:
    """Wraps an optimizer class so that every ``step`` marks the end of an iteration."""

    def __init__(self, owner: Any, attr: str) -> None:
        base = getattr(owner, attr)
        self.ends: list[tuple[float, float]] = []
        self.constraint = 0
        ends, me = self.ends, self

        class Timed(base):  # type: ignore[misc, valid-type]
            def step(self, *a: Any, **k: Any) -> Any:
                out = base.step(self, *a, **k)
                me.constraint += int(bool(k.get("is_constraint")) or k.get("kind") == "constraint")
                ends.append(mark())
                return out

        setattr(owner, attr, Timed)

    def reset(self) -> None:
        self.ends.clear()
        self.constraint = 0


# -- GradInit ------------------------------------------------------------------------------


class RefGradInit:
    """zhuchen03/gradinit's ``gradinit(net, dataloader, args)``, timed per iteration."""

    def __init__(self, path: str) -> None:
        self.mod = import_reference(path, "gradinit_utils")
        self.marks = EndMarks(self.mod, "RescaleAdam")

    def run(self, model: nn.Module, halves: list, iters: int, gamma: float) -> tuple[dict[str, list[float]], int]:
        args = SimpleNamespace(**{**REF_GRADINIT_ARGS, "gradinit_gamma": gamma, "gradinit_iters": iters + 1})
        self.marks.reset()
        with on_cpu(), tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp), _quiet():
            self.mod.gradinit(model, halves, args)
        return intervals(self.marks.ends), self.marks.constraint


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        yield


class OursGradInit:
    """``initopt.initialize_(model, batches, "gradinit")``, timed per iteration the same way."""

    def __init__(self) -> None:
        from initopt.methods import gradinit

        self.marks = EndMarks(gradinit, "RescaleAdam")

    def run(self, model: nn.Module, batches: list, iters: int, gamma: float) -> tuple[dict[str, list[float]], int]:
        self.marks.reset()
        initopt.initialize_(model, batches, "gradinit", steps=iters + 1, gamma=gamma, guard=False, progress=False)
        return intervals(self.marks.ends), self.marks.constraint


def build(quick: bool) -> tuple[nn.Module, tuple[int, ...]]:
    """VGG-11 without BN on 3x32x32 (quick: a small CNN on 3x16x16, for the tests)."""
    torch.manual_seed(0)
    if quick:
        return zoo.cnn(channels=(8, 16)), (3, 16, 16)
    return zoo.vgg11(batchnorm=False), (3, 32, 32)


def gradinit_rounds(ref_path: str, rounds: int, iters: int, batch: int, quick: bool = False) -> dict[str, Any]:
    model, shape = build(quick)
    batches = make_batches(shape, batch, n=2 * iters + 6)
    halves = [(x[i : i + batch // 2], y[i : i + batch // 2]) for x, y in batches for i in (0, batch // 2)]
    codes = {"ours": (OursGradInit(), batches), "ref": (RefGradInit(ref_path), halves)}
    time_train_steps(copy.deepcopy(model), batches, 2)  # warm-up: every code path once
    for runner, data in codes.values():
        runner.run(copy.deepcopy(model), data, 1, OBJECTIVE_GAMMA)
    names = ["ours_objective", "ref_objective", "ours_natural", "ref_natural"]
    rec: dict[str, dict[str, list[float]]] = {"wall": {k: [] for k in ["train", *names]}, "cpu": {k: [] for k in names}}
    constraint: dict[str, list[int]] = {"ours": [], "ref": []}
    for r in range(rounds):
        # alternate which code goes first, so that neither always follows the other
        order = ["ours", "ref"] if r % 2 == 0 else ["ref", "ours"]
        rec["wall"]["train"].append(statistics.median(time_train_steps(copy.deepcopy(model), batches, iters)))
        for gamma, kind in ((OBJECTIVE_GAMMA, "objective"), (REF_GRADINIT_ARGS["gradinit_gamma"], "natural")):
            for who in order:
                runner, data = codes[who]
                secs, n_con = runner.run(copy.deepcopy(model), data, iters, gamma)
                if kind == "natural":
                    constraint[who].append(n_con)
                for clock in ("wall", "cpu"):
                    rec[clock][f"{who}_{kind}"].append(statistics.median(secs[clock]))
        w, c = rec["wall"], rec["cpu"]
        print(
            f"  round {r + 1}/{rounds}: objective ours/ref wall "
            f"{w['ours_objective'][-1] / w['ref_objective'][-1]:.3f}, cpu "
            f"{c['ours_objective'][-1] / c['ref_objective'][-1]:.3f}",
            flush=True,
        )
    out: dict[str, Any] = {"seconds_per_round": rec, "constraint_iterations_in_natural_runs": constraint}
    out["ratio"] = {
        clock: {k: _ratio(rec[clock][f"ours_{k}"], rec[clock][f"ref_{k}"]) for k in ("objective", "natural")}
        for clock in ("wall", "cpu")
    }
    out["in_train_steps"] = {k: _ratio(rec["wall"][k], rec["wall"]["train"]) for k in names}
    out["iterations_per_round"] = iters + 1
    return out


# -- MetaInit ------------------------------------------------------------------------------


class RefMetaInit:
    """diggerdu/MetaInit's ``metainit(model, criterion, x_size, y_size, ...)``, timed per step."""

    def __init__(self, path: str) -> None:
        self.mod = import_reference(path, "meta_init")

    def run(self, model: nn.Module, batch: int, iters: int, shape: tuple[int, ...]) -> dict[str, list[float]]:
        ends: list[tuple[float, float]] = []
        # the reference prints once, at the end of each step
        self.mod.print = lambda *a, **k: ends.append(mark())
        try:
            with on_cpu():
                self.mod.metainit(model, nn.CrossEntropyLoss(), (batch, *shape), 10, steps=iters + 1)
        finally:
            self.mod.print = builtins.print
        return intervals(ends)


def ours_metainit(model: nn.Module, batch: tuple, iters: int) -> dict[str, list[float]]:
    from bench_metainit import Stepper  # initopt's loop body, exactly as initialize_ runs it

    s = Stepper(model, batch)
    try:
        ends = []
        for _ in range(iters + 1):
            s.step()
            ends.append(mark())
        return intervals(ends)
    finally:
        s.close()


def metainit_rounds(ref_path: str, rounds: int, iters: int, batch: int, quick: bool = False) -> dict[str, Any]:
    model, shape = build(quick)
    batches = make_batches(shape, batch, n=2)
    ref = RefMetaInit(ref_path)
    time_train_steps(copy.deepcopy(model), batches, 2)
    ours_metainit(copy.deepcopy(model), batches[0], 1)
    ref.run(copy.deepcopy(model), batch, 1, shape)
    rec: dict[str, dict[str, list[float]]] = {
        "wall": {"train": [], "ours": [], "ref": []},
        "cpu": {"ours": [], "ref": []},
    }
    for r in range(rounds):
        order = ["ours", "ref"] if r % 2 == 0 else ["ref", "ours"]
        rec["wall"]["train"].append(statistics.median(time_train_steps(copy.deepcopy(model), batches, iters)))
        for who in order:
            if who == "ours":
                secs = ours_metainit(copy.deepcopy(model), batches[0], iters)
            else:
                secs = ref.run(copy.deepcopy(model), batch, iters, shape)
            for clock in ("wall", "cpu"):
                rec[clock][who].append(statistics.median(secs[clock]))
        w, c = rec["wall"], rec["cpu"]
        print(
            f"  round {r + 1}/{rounds}: ours/ref wall {w['ours'][-1] / w['ref'][-1]:.3f}, "
            f"cpu {c['ours'][-1] / c['ref'][-1]:.3f}",
            flush=True,
        )
    return {
        "seconds_per_round": rec,
        "ratio": {clock: _ratio(rec[clock]["ours"], rec[clock]["ref"]) for clock in ("wall", "cpu")},
        "in_train_steps": {k: _ratio(rec["wall"][k], rec["wall"]["train"]) for k in ("ours", "ref")},
        "iterations_per_round": iters + 1,
    }


# -- driver --------------------------------------------------------------------------------


def _ratio(a: list[float], b: list[float]) -> dict[str, Any]:
    rs = [x / y for x, y in zip(a, b, strict=True)]
    return {**summary(rs), "min": min(rs), "max": max(rs), "per_round": rs}


TARGETS = {"gradinit": 0.85, "metainit": 0.7}
UPSTREAM = {
    "gradinit": "github zhuchen03/gradinit (gradinit_utils.gradinit)",
    "metainit": "github diggerdu/MetaInit (meta_init.metainit)",
}


def child(method: str, ref_path: str, threads: int, rounds: int, iters: int, batch: int, quick: bool) -> dict[str, Any]:
    torch.set_num_threads(threads)
    fn = gradinit_rounds if method == "gradinit" else metainit_rounds
    res = fn(ref_path, rounds, iters, batch, quick)
    res["provenance"] = provenance(threads)
    # PASSIVE makes idle OpenMP threads sleep: fair to other jobs, but every parallel region
    # then pays a wake-up, which weighs on the code with more (small) operations
    res["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "default")
    return res


def reference_revision(path: str) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True)
        return out.stdout.strip() or "unknown (not a git checkout)"
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("method", choices=sorted(TARGETS))
    ap.add_argument("--reference", required=True, help="path of a checkout of the upstream repository")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=4, help="timed iterations of each workload per round")
    ap.add_argument("--batch", type=int, default=None, help="default: 64 (gradinit), 32 (metainit)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="a small CNN instead of VGG-11 (for the tests)")
    ap.add_argument("--_child", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    batch = a.batch or (64 if a.method == "gradinit" else 32)
    if a._child is not None:
        res = child(a.method, a.reference, a._child, a.rounds, a.iters, batch, a.quick)
        print("JSON " + json.dumps(res), flush=True)
        return res
    out_path = Path(a.out or HERE / "results" / f"{a.method}_vs_reference.json")
    result: dict[str, Any] = {
        "claim": f"initopt {a.method} iteration time / the reference's <= {TARGETS[a.method]} "
        "(same process, interleaved rounds), at each thread count",
        "reference": f"{UPSTREAM[a.method]} @ {reference_revision(a.reference)}",
        "config": {
            "model": "cnn(8, 16)" if a.quick else "vgg11 without BN",
            "input_shape": list(build(a.quick)[1]),
            "batch": batch,
            "rounds": a.rounds,
            "iters": a.iters,
        },
        "threads": {},
    }
    for t in a.threads:
        print(f"{a.method} vs reference, {t} thread(s):", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(t)}
        cmd = [
            sys.executable,
            "-u",
            __file__,
            a.method,
            "--reference",
            a.reference,
            "--rounds",
            str(a.rounds),
            "--iters",
            str(a.iters),
            "--batch",
            str(batch),
            "--_child",
            str(t),
            *(["--quick"] if a.quick else []),
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=HERE)
        sys.stdout.write("".join(line + "\n" for line in proc.stdout.splitlines() if not line.startswith("JSON ")))
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"vs_reference: the {t}-thread run failed")
        res = json.loads(next(line[5:] for line in proc.stdout.splitlines() if line.startswith("JSON ")))
        ratio = res["ratio"]["wall"]
        ratio = ratio["objective"] if a.method == "gradinit" else ratio
        res["meets_target"] = ratio["median"] <= TARGETS[a.method]
        result["threads"][str(t)] = res
        lo, hi = ratio["min"], ratio["max"]
        print(f"  median ours/ref (wall) {ratio['median']:.3f} (range {lo:.3f}-{hi:.3f})", flush=True)
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out_path}")
    return result


if __name__ == "__main__":
    main()
