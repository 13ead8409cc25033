"""Cost of one MetaInit and one NIO iteration on the demo's small model, in training steps.

Claim (issue 13): on the model and batch of ``initopt demo`` -- the plain ReLU MLP with 10
hidden layers of 64 units on the 64 digits features (``TASKS["digits"]`` in
``initopt/cli.py``), batch 64 of the demo's data loader -- one MetaInit iteration costs at
most 6 SGD training steps and one NIO iteration at most 4, at 1 thread (2 threads reported
too). On a model this small fixed per-iteration overhead (Python, autograd nodes, small
kernels) weighs more than on VGG-11.

Result on the shared 2-core machine (``small_cost.json``, 21 interleaved rounds, default
OpenMP wait policy, 1 thread, medians in training steps): MetaInit 6.9 (wall; 7.0 CPU), NIO 3.7
(3.8 CPU); an earlier run of 21 rounds gave 7.2 and 3.9. The way there
(``results/small_before_after.json`` and the issue's notes): MetaInit 17.8 -> 10.1 -> 6.9-7.2,
NIO 22.1 -> 5.3 -> 3.7-3.9. NIO meets its target by the median, with single rounds up to 4.3;
MetaInit does not: on this chain-shaped model its step already takes g and Hg
written out (``initopt.core.chain``, 231 autograd nodes instead of 726) and is bound by its
~280 small matrix products (about 7.4 us each here, 2.5-3.3 training steps) plus the cost per
operation of about 1100 others. ``torch.compile`` of a ``torch.func`` version is faster per
step but compiles for 5-95 s (``--compile`` reports the break-even number of steps), so it is
not used.

Method: one process; per thread count, ``--repeats`` interleaved rounds of (a) ``3 * iters``
SGD training steps (zero_grad, forward, cross-entropy, backward, ``SGD.step``), (b)
``iters`` MetaInit iterations at the defaults (``MetaInitRun.step``: noise batch, GQ with
its gradient and Hessian-vector product, the backward through both, the norm update; as in
``bench_metainit.py``), (c) an ``initialize_(..., "nio", steps=iters, guard=False)`` run at
the defaults, whose per-iteration ``seconds`` records are read (as in ``bench_nio.py``;
sub-batch forwards, gradients, B-GC/B-GN, scale gradient, scale update; the one-time plan
excluded). Per round the ratio of medians; reported as median and range over rounds, for
wall-clock time; and, as a check robust to a busy shared machine, the same ratios in process
CPU time (NIO here timed on ``NIOStepper``, the same loop body; at 2 threads CPU time adds both
threads). A per-phase breakdown of both methods' iterations follows (MetaInit:
``MetaInitRun.step``'s clock; NIO: ``NIO.iteration``'s clock plus the update).

    python benchmarks/bench_small.py [--quick] [--threads 1 2] [--repeats 7] [--iters 10] [--compile] [--vgg11]
        [--out DIR]

``--compile`` adds ``torch.compile`` of a ``torch.func`` MetaInit step (compile time and the
break-even number of steps); ``--vgg11`` adds NIO's engines on VGG-11 (``bench_nio.py`` claim 2,
D = 2), fused or per sub-batch, plain autograd with or without Euler's identity.

Writes ``small_cost.json`` (``small_cost_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from bench_metainit import PHASES as METAINIT_PHASES
from bench_metainit import Stepper, TrainStep, environment
from common import spread
from torch import nn

import initopt
from initopt.cli import TASKS, load_model, load_task
from initopt.core import search_mode
from initopt.core.batches import Task
from initopt.core.cosine import GramPlan, build_plan
from initopt.core.functional import Evaluator
from initopt.core.optim import RescaleAdam
from initopt.data import loader
from initopt.methods.nio import NIO

HERE = os.path.dirname(os.path.abspath(__file__))
NIO_PHASES = ["forward", "gradients", "gram", "backward", "update"]


def build(seed: int = 0, batch_size: int = 64) -> tuple[nn.Module, Any, Any, dict[str, Any]]:
    """The demo's model, data loader and first batch, built as ``initopt demo`` builds them."""
    train, _ = load_task("digits", seed=seed)
    make = load_model(TASKS["digits"]["model"], "digits")
    torch.manual_seed(seed)
    model = make()
    dl = loader(train, batch_size, seed=seed)
    batch = next(iter(dl))
    info = {
        "model": f"zoo.mlp({', '.join(f'{k}={v}' for k, v in TASKS['digits']['model_args'].items())})",
        "data": "digits (initopt demo)",
        "batch_size": batch_size,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return model, dl, batch, info


def nio_seconds(model: nn.Module, data: Any, iters: int) -> list[float]:
    """Per-iteration seconds of an NIO run at the defaults (``initialize_`` history)."""
    res = initopt.initialize_(copy.deepcopy(model), data, "nio", steps=iters, guard=False, progress=False)
    return [h["seconds"] for h in res.history]


def _median_seconds(fn: Callable[[], Any], n: int, clock: Callable[[], float] = time.perf_counter) -> float:
    ts = []
    for _ in range(n):
        t0 = clock()
        fn()
        ts.append(clock() - t0)
    return statistics.median(ts)


def measure(model: nn.Module, data: Any, batch: Any, repeats: int, iters: int) -> dict[str, Any]:
    """Interleaved rounds of training steps, MetaInit and NIO iterations."""
    train = TrainStep(model, batch)
    meta = Stepper(copy.deepcopy(model), batch)
    nio = NIOStepper(model, batch)
    try:
        for _ in range(3):  # warm-up
            train.step()
            meta.step()
            nio.step()
        nio_seconds(model, data, 2)
        rounds: dict[str, list[float]] = {"train_step": [], "metainit": [], "nio": []}
        cpu: dict[str, list[float]] = {"train_step": [], "metainit": [], "nio": []}
        for _ in range(repeats):
            rounds["train_step"].append(_median_seconds(train.step, 3 * iters))
            rounds["metainit"].append(_median_seconds(meta.step, iters))
            rounds["nio"].append(statistics.median(nio_seconds(model, data, iters)))
            for k, fn in (("train_step", train.step), ("metainit", meta.step), ("nio", nio.step)):
                cpu[k].append(_median_seconds(fn, 3 * iters if k == "train_step" else iters, time.process_time))
    finally:
        meta.close()
        nio.close()
    out: dict[str, Any] = {
        "seconds": {k: spread(v) for k, v in rounds.items()},
        "per_round_seconds": rounds,
        "cpu_seconds": {k: spread(v) for k, v in cpu.items()},
        "per_round_cpu_seconds": cpu,
    }
    for k in ("metainit", "nio"):
        out[f"{k}_in_train_steps"] = spread([a / b for a, b in zip(rounds[k], rounds["train_step"], strict=True)])
        out[f"{k}_in_train_steps_cpu"] = spread([a / b for a, b in zip(cpu[k], cpu["train_step"], strict=True)])
    return out


def _phases(clocks: list[list[tuple[str, float]]], names: list[str]) -> dict[str, Any]:
    per: dict[str, list[float]] = {p: [] for p in names}
    for clock in clocks:
        clock = [c for c in clock if c[0] != "start"]
        for (_, a), (name, b) in itertools.pairwise(clock):
            per.setdefault(name, []).append(b - a)
    med = {p: statistics.median(v) for p, v in per.items() if v}
    total = sum(med.values())
    return {"seconds": med, "fraction": {p: v / total for p, v in med.items()}}


def _clocks(stepper: Any, steps: int) -> list[list[tuple[str, float]]]:
    """One warm-up step, then the phase clocks of ``steps`` steps."""
    stepper.step()
    clocks = []
    for _ in range(steps):
        clock: list[tuple[str, float]] = [("t0", time.perf_counter())]
        stepper.step(clock)
        clocks.append(clock)
    return clocks


def metainit_breakdown(model: nn.Module, batch: Any, steps: int) -> dict[str, Any]:
    st = Stepper(copy.deepcopy(model), batch)
    try:
        return _phases(_clocks(st, steps), METAINIT_PHASES)
    finally:
        st.close()


class NIOStepper:
    """NIO iterations at the defaults: the loop body of ``NIO.search`` (``NIO.iteration`` with
    the same plan and engine choice, then the scale update) on one batch, with a clock."""

    def __init__(self, model: nn.Module, batch: Any) -> None:
        self.net = copy.deepcopy(model)
        self.method = method = NIO()
        cfg = method.config
        self._mode = search_mode(self.net, cfg.mode)
        self._mode.__enter__()
        space = method.make_space(self.net)
        self.ev = ev = Evaluator(self.net, space, Task())
        self.alpha = space.ones()
        lo, hi = space.bounds()
        self.opt = RescaleAdam(lo, hi, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps, clip=cfg.clip)
        self.plan = build_plan(ev, batch, verify_scaling=True) if cfg.accelerate else GramPlan.plain(ev)
        self.fused = cfg.accelerate and method.fused_ok(ev, batch, self.plan)
        self.batch = batch

    def step(self, clock: list[tuple[str, float]] | None = None) -> None:
        tick = None if clock is None else (lambda p: clock.append((p, time.perf_counter())))
        grad, rec = self.method.iteration(self.ev, self.alpha, self.batch, self.plan, tick, fused=self.fused)
        self.opt.step(self.alpha, grad, kind=rec["branch"])
        if clock is not None:
            clock.append(("update", time.perf_counter()))

    def close(self) -> None:
        self._mode.__exit__(None, None, None)


def nio_breakdown(model: nn.Module, batch: Any, steps: int) -> dict[str, Any]:
    st = NIOStepper(model, batch)
    try:
        return {**_phases(_clocks(st, steps), NIO_PHASES), "engine": "fused" if st.fused else "per sub-batch"}
    finally:
        st.close()


def compiled_metainit(model: nn.Module, batch: Any, iters: int) -> dict[str, Any]:
    """``torch.compile`` of MetaInit's objective and scale gradient, written with ``torch.func``
    (the library's step differentiates twice with ``torch.autograd``, which compiled graphs do
    not support): compile time, step time against the training step, and the largest
    difference from the eager ``torch.func`` result. The GQ and the derivative are those of
    ``MetaInit.objective`` on all tensors (eval mode, the demo batch)."""
    import torch.nn.functional as F

    net = copy.deepcopy(model).eval()
    names = [n for n, _ in net.named_parameters()]
    w0 = [p.detach().clone() for p in net.parameters()]
    x, y = batch
    eps, total = 1e-5, sum(w.numel() for w in w0)

    def loss(theta: list[torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(torch.func.functional_call(net, dict(zip(names, theta, strict=True)), (x,)), y)

    def gq(alpha: torch.Tensor) -> torch.Tensor:
        theta = [w * alpha[i] for i, w in enumerate(w0)]
        g, vjp = torch.func.vjp(torch.func.grad(loss), theta)
        (hg,) = vjp(g)
        gf, hf = torch.cat([t.reshape(-1) for t in g]), torch.cat([t.reshape(-1) for t in hg])
        e = torch.where(gf.detach() >= 0, eps, -eps)
        return ((hf + e) / (gf + e)).abs().sum() / total

    step = torch.func.grad(gq)
    alpha = torch.ones(len(w0))
    ref = step(alpha)
    train = TrainStep(model, batch)
    eager = _median_seconds(lambda: step(alpha), iters)
    t0 = time.perf_counter()
    compiled = torch.compile(step)
    out = compiled(alpha)
    compile_s = time.perf_counter() - t0
    rounds = []
    for _ in range(3):
        t = _median_seconds(train.step, 3 * iters)
        rounds.append(_median_seconds(lambda: compiled(alpha), iters) / t)
    t = _median_seconds(train.step, 3 * iters)
    return {
        "compile_seconds": compile_s,
        "compiled_in_train_steps": spread(rounds),
        "eager_torch_func_in_train_steps": eager / t,
        "max_abs_diff_vs_eager": float((out - ref).abs().max()),
        "max_abs_eager": float(ref.abs().max()),
        "break_even_steps_vs_library_step": None,
    }


VGG_VARIANTS: dict[str, tuple[bool, dict[str, Any]]] = {
    # name: (fused engine allowed, NIO config)
    "accelerated_fused": (True, {}),
    "accelerated_per_sub_batch": (False, {}),
    "plain_euler": (True, {"accelerate": False}),
    "plain_euler_every_layer": (True, {"accelerate": False, "projected_min_macs": 0}),
    "plain_autograd": (True, {"accelerate": False, "projected_grads": False}),
}


def nio_vgg11(repeats: int, iters: int, batch_size: int = 64, d: int = 2) -> dict[str, Any]:
    """One NIO iteration on VGG-11 without BatchNorm (``bench_nio.py`` claim 2: batch 64 of
    3x32x32, D = 2) in training steps, per engine: the accelerated engine fused (one forward for
    both sub-batches) or per sub-batch, and plain autograd with the outer backward by Euler's
    identity (``projected_grads``, default size threshold or every layer) or without (the
    former plain path). Interleaved rounds; per round the median of ``iters`` iterations."""
    from common import make_batches, time_train_steps

    from initopt import zoo
    from initopt.methods import nio as nio_module

    torch.manual_seed(0)
    model = zoo.vgg11(batchnorm=False)
    batches = make_batches((3, 32, 32), batch_size)
    fused_ok = nio_module.NIO.fused_ok

    def run(fused: bool, cfg: dict[str, Any]) -> tuple[float, str]:
        nio_module.NIO.fused_ok = fused_ok if fused else (lambda *a, **k: False)  # type: ignore[method-assign]
        try:
            res = initopt.initialize_(
                copy.deepcopy(model), batches, "nio", steps=iters, num_splits=d, guard=False, progress=False, **cfg
            )
        finally:
            nio_module.NIO.fused_ok = fused_ok  # type: ignore[method-assign]
        return statistics.median(h["seconds"] for h in res.history), res.info.get("engine", "")

    time_train_steps(copy.deepcopy(model), batches, 2)
    ratios: dict[str, list[float]] = {k: [] for k in VGG_VARIANTS}
    engines: dict[str, str] = {}
    train: list[float] = []
    for _ in range(repeats):
        t = statistics.median(time_train_steps(copy.deepcopy(model), batches, 3))
        train.append(t)
        for k, (fused, cfg) in VGG_VARIANTS.items():
            sec, engines[k] = run(fused, cfg)
            ratios[k].append(sec / t)
    return {
        "config": {"model": "zoo.vgg11(batchnorm=False)", "batch_size": batch_size, "num_splits": d, "iters": iters},
        "train_step_seconds": spread(train),
        "in_train_steps": {k: spread(v) for k, v in ratios.items()},
        "engine": engines,
        "per_round_in_train_steps": ratios,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few rounds, seconds (used by the tests)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of MetaInit's step (minutes)")
    ap.add_argument("--vgg11", action="store_true", help="also NIO engines on VGG-11, D=2, at threads[0] (minutes)")
    args = ap.parse_args(argv)
    repeats, iters, phase_steps = (2, 2, 2) if args.quick else (args.repeats, args.iters, 20)
    model, data, batch, info = build()
    result: dict[str, Any] = {
        "claim": "on the demo's MLP (digits, batch 64) at 1 thread: one MetaInit iteration <= 6 SGD training "
        "steps, one NIO iteration <= 4 (issue 13); 2 threads reported too",
        "config": {
            **info,
            "repeats": repeats,
            "iters": iters,
            "threads": args.threads,
            "metainit": "defaults (noise inputs, eval mode, sign variant)",
            "nio": "defaults (num_splits=4, train mode), guard off",
        },
        "provenance": environment(args.threads[0]),
        "threads": {},
    }
    for threads in args.threads:
        torch.set_num_threads(threads)
        entry = measure(model, data, batch, repeats, iters)
        entry["breakdown"] = {
            "metainit": metainit_breakdown(model, batch, phase_steps),
            "nio": nio_breakdown(model, batch, phase_steps),
        }
        entry["loadavg_after"] = list(os.getloadavg())
        result["threads"][str(threads)] = entry
        m, n = entry["metainit_in_train_steps"], entry["nio_in_train_steps"]
        mc, nc = entry["metainit_in_train_steps_cpu"], entry["nio_in_train_steps_cpu"]
        print(
            f"{threads} thread(s): train step {1e3 * entry['seconds']['train_step']['median']:.3f} ms; "
            f"MetaInit {m['median']:.2f} ({m['min']:.2f}-{m['max']:.2f}) train steps; "
            f"NIO {n['median']:.2f} ({n['min']:.2f}-{n['max']:.2f}); CPU time: MetaInit {mc['median']:.2f} "
            f"({mc['min']:.2f}-{mc['max']:.2f}), NIO {nc['median']:.2f} ({nc['min']:.2f}-{nc['max']:.2f})",
            flush=True,
        )
    if args.compile:
        torch.set_num_threads(args.threads[0])
        c = compiled_metainit(model, batch, iters)
        lib = result["threads"][str(args.threads[0])]
        saved = (
            lib["seconds"]["metainit"]["median"]
            - c["compiled_in_train_steps"]["median"] * (lib["seconds"]["train_step"]["median"])
        )
        c["break_even_steps_vs_library_step"] = c["compile_seconds"] / saved if saved > 0 else None
        result["torch_compile_metainit"] = c
        print(
            f"torch.compile MetaInit step: {c['compiled_in_train_steps']['median']:.2f} train steps after "
            f"{c['compile_seconds']:.0f} s of compilation "
            f"(break-even after {c['break_even_steps_vs_library_step']} steps)"
        )
    if args.vgg11:
        torch.set_num_threads(args.threads[0])
        v = nio_vgg11(2 if args.quick else 3, 1 if args.quick else 2)
        result["nio_vgg11_d2"] = v
        print(
            "VGG-11 NIO (D=2) in train steps: "
            + ", ".join(f"{k} {r['median']:.2f}" for k, r in v["in_train_steps"].items())
        )
    os.makedirs(args.out, exist_ok=True)
    name = "small_cost_quick.json" if args.quick else "small_cost.json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {os.path.join(args.out, name)}")
    return result


if __name__ == "__main__":
    main()
