"""Cost of one MetaInit step, in training steps of the same model and batch.

Claim: on VGG-11 without BatchNorm (``initopt.zoo.vgg11()``, batch 32 of 3x32x32, CPU, one
thread) one MetaInit step -- fresh noise batch, GQ with its gradient and Hessian-vector
product, the backward through both, the norm update -- costs about 7.5 plain SGD training
steps; against the paper's own code (its Figure 2), see ``benchmarks/vs_reference.py``
and ``results/metainit_vs_reference.json``. Peak memory is reported as a multiple of a
training step's, and the time is broken down into forward, gradient, Hessian-vector
product, quotient and the backward through all of them.

Why it is cheaper than plain autograd: the last backward pass needs only
:math:`\\langle\\nabla_W \\mathrm{GQ}, W\\rangle` per weight, which Euler's identity gives for
conv/linear weights without weight-gradient kernels (:mod:`initopt.core.bilinear`), and
:math:`Hg` is one vector-Jacobian product of :math:`g` with itself (no
:math:`\\tfrac12\\|g\\|^2` graph). Convolution FLOPs of each variant are counted with
``torch.utils.flop_counter`` (in units of one forward pass).

Method: the MetaInit step and the SGD step (zero_grad, forward, cross-entropy, backward,
``SGD.step``) alternate, ``--repeats`` rounds of ``--iters`` steps each after a warm-up;
per round the ratio of medians; reported as mean +- std over rounds, for wall-clock time and
for process CPU time (one thread: the compute cost, robust to a busy shared machine). Memory:
each kind of step runs in a fresh subprocess (large allocations forced to mmap, libraries
warmed up on a tiny CNN); peak RSS (VmHWM, reset just before the step) minus the RSS just
before the step (model, batch and optimizer already built). Writes ``metainit_cost.json``
(+ ``.png``).

    python benchmarks/bench_metainit.py [--quick] [--threads 1] [--repeats 5] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import initopt
from initopt import zoo
from initopt.core import BatchSource, Evaluator, Task, search_mode
from initopt.methods.base import Problem
from initopt.methods.metainit import MetaInit, MetaInitRun

HERE = os.path.dirname(os.path.abspath(__file__))
PHASES = ["draw", "forward", "gradient", "hvp", "quotient", "backward", "update"]


def build(quick: bool, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], dict[str, Any]]:
    """The model and one batch: VGG-11 without BN at batch 32 (quick: a small CNN)."""
    torch.manual_seed(seed)
    if quick:
        model, shape, n = zoo.cnn(channels=(8, 16)), (3, 16, 16), 8
    else:
        model, shape, n = zoo.vgg11(), (3, 32, 32), 32
    g = torch.Generator().manual_seed(seed)
    batch = (torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g))
    info = {"model": "cnn(8,16)" if quick else "vgg11 (no BN)", "batch_size": n, "input_shape": list(shape)}
    return model, batch, info


class Stepper:
    """MetaInit steps on a model, exactly the loop body of ``initialize_(..., "metainit")``."""

    def __init__(self, model: nn.Module, batch: Any, seed: int = 0, **config: Any) -> None:
        self.method = MetaInit(**config)
        self.model = model
        self._mode = search_mode(model, self.method.mode)
        self._mode.__enter__()
        space = self.method.make_space(model)
        ev = Evaluator(model, space, Task())
        gen = torch.Generator(device=space.device).manual_seed(seed)
        problem = Problem(model, space, ev, BatchSource(batch, space.device), gen, seed)
        self.run: MetaInitRun = self.method.start(problem)

    def step(self, clock: list[tuple[str, float]] | None = None) -> dict[str, Any]:
        return self.run.step(clock)

    def close(self) -> None:
        self._mode.__exit__(None, None, None)


class TrainStep:
    """One plain SGD training step on a copy of the model (train mode)."""

    def __init__(self, model: nn.Module, batch: Any) -> None:
        self.net = copy.deepcopy(model).train()
        self.opt = torch.optim.SGD(self.net.parameters(), lr=0.01)
        self.batch = batch

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.net(self.batch[0]), self.batch[1]).backward()
        self.opt.step()


def _timed(fn: Callable[[], Any], iters: int) -> tuple[list[float], list[float]]:
    """Wall-clock and process-CPU seconds of ``iters`` calls (with one thread, CPU time is the
    compute cost and ignores time the process spent descheduled on a busy machine)."""
    wall, cpu = [], []
    for _ in range(iters):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def _stats(xs: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(xs),
        "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "median": statistics.median(xs),
        "min": min(xs),
        "n": len(xs),
    }


def measure(
    model: nn.Module,
    batch: Any,
    *,
    repeats: int = 5,
    iters: int = 3,
    warmup: int = 1,
    others: dict[str, Callable[[], Callable[[], Any]]] | None = None,
) -> dict[str, Any]:
    """Interleaved timings: the SGD step, MetaInit steps (projected and plain autograd) and any
    ``others`` (name -> factory of a step function, e.g. the reference code). Per round, the
    median of ``iters`` steps of each; ratios to the SGD step per round."""
    train = TrainStep(model, batch)
    ours = Stepper(copy.deepcopy(model), batch)
    plain = Stepper(copy.deepcopy(model), batch, projected_grads=False)
    try:
        makers: dict[str, Callable[[], Any]] = {
            "train_step": train.step,
            "metainit": ours.step,
            "metainit_plain": plain.step,
        }
        for name, factory in (others or {}).items():
            makers[name] = factory()
        for fn in makers.values():
            _timed(fn, warmup)
        rounds: dict[str, dict[str, list[float]]] = {"wall": {k: [] for k in makers}, "cpu": {k: [] for k in makers}}
        for _ in range(repeats):
            for name, fn in makers.items():
                wall, cpu = _timed(fn, iters if name != "train_step" else 3 * iters)
                rounds["wall"][name].append(statistics.median(wall))
                rounds["cpu"][name].append(statistics.median(cpu))
        return summarize(rounds)
    finally:
        ours.close()
        plain.close()


def summarize(rounds: dict[str, dict[str, list[float]]], base: str = "train_step") -> dict[str, Any]:
    """Per clock: seconds per kind, and per-round ratios to ``base`` (mean, std, median)."""
    out: dict[str, Any] = {}
    for clock, per in rounds.items():
        out[clock] = {
            "seconds": {k: _stats(v) for k, v in per.items()},
            "x_" + base: {k: _stats([a / b for a, b in zip(v, per[base], strict=True)]) for k, v in per.items()},
            "per_round_seconds": per,
        }
    return out


def breakdown(model: nn.Module, batch: Any, steps: int = 3, **config: Any) -> dict[str, Any]:
    """Median seconds of each phase of a MetaInit step (after one warm-up step)."""
    st = Stepper(copy.deepcopy(model), batch, **config)
    try:
        st.step()
        per: dict[str, list[float]] = {p: [] for p in PHASES}
        for _ in range(steps):
            clock: list[tuple[str, float]] = [("t0", time.perf_counter())]
            st.step(clock)
            clock = [c for c in clock if c[0] != "start"]
            for (_, a), (name, b) in itertools.pairwise(clock):
                per[name].append(b - a)
        med = {p: statistics.median(v) for p, v in per.items() if v}
        total = sum(med.values())
        return {"seconds": med, "fraction": {p: v / total for p, v in med.items()}}
    finally:
        st.close()


def conv_flops(model: nn.Module, batch: Any) -> dict[str, float]:
    """FLOPs of one step of each kind, in units of one forward pass of the model."""
    from torch.utils.flop_counter import FlopCounterMode

    def count(fn: Callable[[], Any]) -> float:
        fc = FlopCounterMode(display=False)
        with fc:
            fn()
        return float(fc.get_total_flops())

    net = copy.deepcopy(model).eval()
    with torch.no_grad():
        fwd = count(lambda: net(batch[0]))
    train = TrainStep(model, batch)
    out = {"train_step": count(train.step) / fwd}
    # every layer projected (also below the default size threshold): what Euler's identity removes
    for name, cfg in (("metainit", {"projected_min_macs": 0}), ("metainit_plain", {"projected_grads": False})):
        st = Stepper(copy.deepcopy(model), batch, **cfg)
        try:
            out[name] = count(st.step) / fwd
        finally:
            st.close()
    return out


def hvp_variants(model: nn.Module, batch: Any, repeats: int = 3) -> dict[str, float]:
    """Seconds for Hg alone: reverse-over-reverse (vjp of g with itself, as used) against
    forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``, which recomputes g)."""
    net = copy.deepcopy(model).eval()
    names = [n for n, _ in net.named_parameters()]
    w0 = [p.detach().clone() for p in net.parameters()]

    def loss_of(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(torch.func.functional_call(net, params, (batch[0],)), batch[1])

    def rev_rev() -> float:
        theta = [w.clone().requires_grad_(True) for w in w0]
        g = torch.autograd.grad(loss_of(dict(zip(names, theta, strict=True))), theta, create_graph=True)
        t0 = time.perf_counter()
        torch.autograd.grad(g, theta, grad_outputs=g)
        return time.perf_counter() - t0

    def fwd_rev() -> float:
        p = dict(zip(names, [w.clone() for w in w0], strict=True))
        g = torch.func.grad(loss_of)(p)
        t0 = time.perf_counter()
        torch.func.jvp(torch.func.grad(loss_of), (p,), (g,))
        return time.perf_counter() - t0

    rr, fr = [], []
    fwd_rev()  # functorch warm-up
    for _ in range(repeats):
        rr.append(rev_rev())
        fr.append(fwd_rev())
    return {"reverse_over_reverse_s": statistics.median(rr), "forward_over_reverse_s": statistics.median(fr)}


# ---- memory, each in a fresh process ------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_bytes() -> int:
    """Peak RSS of this process image (VmHWM; unlike ru_maxrss it does not carry the forking
    parent's RSS across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_child(kind: str, quick: bool, threads: int) -> dict[str, float]:
    """Peak RSS growth of one step of ``kind`` ("train_step", "metainit", "metainit_plain").

    A warm-up step of the same kind on a tiny CNN first loads libraries and kernels; the
    parent starts this process with ``MALLOC_MMAP_THRESHOLD_`` fixed, so large tensors are
    mapped and unmapped and the RSS follows the live tensors."""
    torch.set_num_threads(threads)
    torch.manual_seed(1)
    tiny, tiny_batch = zoo.cnn(channels=(4,)), (torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,)))
    model, batch, _ = build(quick)
    if kind == "train_step":
        TrainStep(tiny, tiny_batch).step()
        fn = TrainStep(model, batch).step
    else:
        Stepper(tiny, tiny_batch, projected_grads=(kind == "metainit")).step()
        fn = Stepper(model, batch, projected_grads=(kind == "metainit")).step
    _reset_peak()
    base = _rss_bytes()
    fn()
    return {"peak_minus_before_bytes": float(_peak_bytes() - base)}


def memory(quick: bool, threads: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    for kind in ("train_step", "metainit", "metainit_plain"):
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", kind, "--threads", str(threads)]
        if quick:
            cmd.append("--quick")
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        out[kind] = json.loads(res.stdout.strip().splitlines()[-1])["peak_minus_before_bytes"]
    out["x_train_step"] = {k: out[k] / out["train_step"] for k in ("metainit", "metainit_plain")}
    out["method"] = (
        "fresh subprocess per kind (MALLOC_MMAP_THRESHOLD_=131072), after a warm-up step of the same kind "
        "on a tiny CNN, peak RSS reset (/proc/self/clear_refs): VmHWM after one step minus RSS just before it"
    )
    return out


def git_revision() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(threads: int) -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "initopt": initopt.__version__,
        "python": platform.python_version(),
        "threads": threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "git_revision": git_revision(),
        "loadavg_at_start": list(os.getloadavg()),
    }


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    ratios = result["timing"]["cpu"]["x_train_step"]
    names = [k for k in ratios if k != "train_step"]
    a.bar(names, [ratios[k]["mean"] for k in names], yerr=[ratios[k]["std"] for k in names], color="tab:blue")
    a.set_ylabel("CPU time / SGD training step")
    a.set_title(f"{result['config']['model']}, batch {result['config']['batch_size']}")
    frac = result["breakdown"]["fraction"]
    b.bar(list(frac), [100 * v for v in frac.values()], color="tab:orange")
    b.set_ylabel("% of a MetaInit step")
    b.set_title("where the time goes")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, a few seconds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.quick, args.threads)))
        return {}
    repeats, iters = (2, 1) if args.quick else (args.repeats, args.iters)
    model, batch, info = build(args.quick)
    result: dict[str, Any] = {
        "claim": __doc__.split("\n\n")[1].replace("\n", " "),
        "config": {**info, "repeats": repeats, "iters": iters, "metainit": "paper defaults (noise inputs, eval mode)"},
        "provenance": environment(args.threads),
    }
    result["timing"] = measure(model, batch, repeats=repeats, iters=iters)
    result["breakdown"] = breakdown(model, batch, steps=1 if args.quick else 3)
    result["breakdown_plain_autograd"] = breakdown(model, batch, steps=1 if args.quick else 3, projected_grads=False)
    result["flops_in_forward_passes"] = conv_flops(model, batch)
    result["hvp"] = hvp_variants(model, batch, repeats=1 if args.quick else 3)
    result["memory"] = memory(args.quick, args.threads)
    os.makedirs(args.out, exist_ok=True)
    name = "metainit_cost_quick" if args.quick else "metainit_cost"
    with open(os.path.join(args.out, name + ".json"), "w") as f:
        json.dump(result, f, indent=2)
    try:
        plot(result, os.path.join(args.out, name + ".png"))
    except ImportError:  # pragma: no cover - matplotlib is optional
        pass
    r = result["timing"]["cpu"]["x_train_step"]
    mem = result["memory"]["x_train_step"]["metainit"]
    print(
        f"MetaInit step = {r['metainit']['mean']:.2f} +- {r['metainit']['std']:.2f} training steps "
        f"(plain autograd {r['metainit_plain']['mean']:.2f}); memory x{mem:.2f}"
    )
    return result


if __name__ == "__main__":
    main()
