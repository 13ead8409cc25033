"""The Hessian-norm paper's tracking experiment (Skorski et al., ACML 2021), on digits.

Claim (the paper's, on MNIST with a 784-30-30-10 ReLU MLP): the scale of the first layer
decides how its loss-Hessian block behaves in training. Drawn with a large std, the first
layer's Hessian norm is large and oscillates; with a tiny std it is tiny and gradients vanish
(training stalls).

Setup here: a 64-30-30-10 ReLU MLP on scikit-learn's digits (``initopt.data.digits()``: 1437
training images, 64 standardized features) in place of MNIST. The first layer's weight is
drawn from N(0, std^2) for std in {1e-5, 1e-2, 1}; every other tensor keeps PyTorch's default
initialization (the same draw for all stds of one seed). SGD, lr 0.01, batch 32, ``--epochs``
epochs. Every ``--every`` steps an :class:`initopt.HessianTracker` measures each layer's
weight-Hessian block on a fixed batch of 256 training examples: spectral norm (20 Lanczos
steps) and Frobenius norm (Hutchinson, 30 probes). Several seeds; the plot shows the median
over seeds with the min-max band; the JSON holds every series.

Run: ``python benchmarks/hessian_tracking.py`` (full) or ``--quick`` (seconds; used by the
tests). Writes ``benchmarks/results/hessian_tracking.json`` and ``hessian_tracking.png``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import provenance
from torch import nn

import initopt
from initopt.data import digits, loader

HERE = Path(__file__).resolve().parent
STDS = (1e-5, 1e-2, 1.0)
LAYERS = {"layer1": ["0.weight"], "layer2": ["2.weight"], "layer3": ["4.weight"]}


def make_model(seed: int, std: float) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 30), nn.ReLU(), nn.Linear(30, 30), nn.ReLU(), nn.Linear(30, 10))
    g = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(model[0].weight.shape, generator=g) * std)
    return model


def accuracy(model: nn.Module, data: Any) -> float:
    x, y = data.tensors
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).double().mean())
    model.train()
    return acc


def run(seed: int, std: float, epochs: int, every: int, iters: int, probes: int) -> dict[str, Any]:
    train, test = digits()
    model = make_model(seed, std)
    probe_batch = tuple(t[:256] for t in train.tensors)
    tracker = initopt.HessianTracker(
        model, probe_batch, every=every, layers=LAYERS, iters=iters, probes=probes, seed=seed
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    losses: list[float] = []
    epoch_acc = []
    t0 = time.perf_counter()
    for _ in range(epochs):
        for x, y in loader(train, 32, seed=seed + 1000 * len(epoch_acc)):
            tracker.step()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        epoch_acc.append(accuracy(model, test))
    loss_values = torch.stack(losses).double().tolist()
    series = {}
    for norm in ("spectral", "frobenius"):
        for layer, s in tracker.series(norm).items():
            series.setdefault(layer, {"step": s["step"]})[norm] = s["value"]
    return {
        "seed": seed,
        "std": std,
        "series": series,
        "loss": loss_values,
        "test_accuracy_per_epoch": epoch_acc,
        "seconds": time.perf_counter() - t0,
        "tracking_products": sum(r["products"] for r in tracker.records),
    }


def _oscillation(values: list[float]) -> float:
    """Median absolute change of log10 norm between consecutive measurements (decades per measurement)."""
    logs = [math.log10(max(v, 1e-300)) for v in values]
    diffs = [abs(b - a) for a, b in itertools.pairwise(logs)]
    return statistics.median(diffs) if diffs else 0.0


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for std in sorted({r["std"] for r in runs}):
        rs = [r for r in runs if r["std"] == std]
        spec = [r["series"]["layer1"]["spectral"] for r in rs]
        fro = [r["series"]["layer1"]["frobenius"] for r in rs]

        def stat(xs: list[float]) -> dict[str, float]:
            return {
                "mean": statistics.fmean(xs),
                "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
                "n": len(xs),
            }

        out[f"{std:g}"] = {
            "layer1_spectral_at_start": stat([s[0] for s in spec]),
            "layer1_spectral_median_over_training": stat([statistics.median(s) for s in spec]),
            "layer1_spectral_max_over_training": stat([max(s) for s in spec]),
            "layer1_frobenius_median_over_training": stat([statistics.median(s) for s in fro]),
            "layer1_spectral_oscillation_decades": stat([_oscillation(s) for s in spec]),
            "layer2_spectral_median_over_training": stat(
                [statistics.median(r["series"]["layer2"]["spectral"]) for r in rs]
            ),
            "final_train_loss_last_epoch": stat([statistics.fmean(r["loss"][-44:]) for r in rs]),
            "final_test_accuracy": stat([r["test_accuracy_per_epoch"][-1] for r in rs]),
        }
    return out


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    colors = {1e-5: "tab:blue", 1e-2: "tab:green", 1.0: "tab:red"}
    for std in STDS:
        rs = [r for r in runs if r["std"] == std]
        if not rs:
            continue
        c = colors[std]
        for ax, key in zip(axes[:2], ("spectral", "frobenius"), strict=True):
            steps = rs[0]["series"]["layer1"]["step"]
            vals = torch.tensor([r["series"]["layer1"][key] for r in rs], dtype=torch.float64)
            ax.plot(steps, vals.median(0).values, color=c, label=f"std {std:g}", lw=1.3)
            if len(rs) > 1:
                ax.fill_between(steps, vals.min(0).values, vals.max(0).values, color=c, alpha=0.2, lw=0)
        loss = torch.tensor([r["loss"] for r in rs], dtype=torch.float64)
        k = 20
        smooth = loss.unfold(1, k, k).mean(2) if loss.shape[1] >= k else loss
        x = [k * (i + 0.5) for i in range(smooth.shape[1])] if loss.shape[1] >= k else list(range(loss.shape[1]))
        axes[2].plot(x, smooth.median(0).values, color=c, label=f"std {std:g}", lw=1.3)
    axes[0].set_ylabel("‖H‖₂ of layer 1's weight block")
    axes[1].set_ylabel("‖H‖_F of layer 1's weight block")
    axes[2].set_ylabel("training loss (mean of 20 steps)")
    for ax in axes[:2]:
        ax.set_yscale("log")
    for ax in axes:
        ax.set_xlabel("SGD step (lr 0.01, batch 32)")
    axes[0].legend(fontsize=8)
    n = len({r["seed"] for r in runs})
    fig.suptitle(f"64-30-30-10 ReLU MLP on digits, first layer ~ N(0, std²): median over {n} seeds, min-max band")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finding(summary: dict[str, Any]) -> str:
    def med(std: str) -> float:
        return summary[std]["layer1_spectral_median_over_training"]["mean"]

    def osc(std: str) -> float:
        return summary[std]["layer1_spectral_oscillation_decades"]["mean"]

    def acc(std: str) -> float:
        return summary[std]["final_test_accuracy"]["mean"]

    def loss(std: str) -> float:
        return summary[std]["final_train_loss_last_epoch"]["mean"]

    return (
        f"First-layer Hessian spectral norm, median over training: std 1e-5 -> {med('1e-05'):.3g}, "
        f"std 1e-2 -> {med('0.01'):.3g}, std 1 -> {med('1'):.3g}; step-to-step change "
        f"{osc('1e-05'):.2f} / {osc('0.01'):.2f} / {osc('1'):.2f} decades. Final training loss "
        f"{loss('1e-05'):.3f} / {loss('0.01'):.3f} / {loss('1'):.3f}, test accuracy "
        f"{acc('1e-05'):.3f} / {acc('0.01'):.3f} / {acc('1'):.3f}."
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny version (seconds)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--out", type=Path, default=HERE / "results" / "hessian_tracking.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = {
        "seeds": 1 if args.quick else args.seeds,
        "epochs": 1 if args.quick else args.epochs,
        "every": 10 if args.quick else args.every,
        "iters": 5 if args.quick else 20,
        "probes": 3 if args.quick else 30,
        "stds": list(STDS),
        "lr": 0.01,
        "batch": 32,
        "probe_batch": 256,
        "model": "64-30-30-10 ReLU MLP, first layer weight ~ N(0, std^2), others PyTorch default",
        "quick": args.quick,
    }
    runs = []
    for seed in range(cfg["seeds"]):
        for std in STDS:
            r = run(seed, std, cfg["epochs"], cfg["every"], cfg["iters"], cfg["probes"])
            runs.append(r)
            s = r["series"]["layer1"]["spectral"]
            print(
                f"seed {seed} std {std:g}: layer1 ‖H‖₂ start {s[0]:.3g} median {statistics.median(s):.3g} "
                f"max {max(s):.3g}; test acc {r['test_accuracy_per_epoch'][-1]:.3f} ({r['seconds']:.1f}s)",
                flush=True,
            )
    summ = summarize(runs)
    result = {
        "config": cfg,
        "provenance": provenance(args.threads),
        "summary": summ,
        "finding": finding(summ),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result))
    plot(runs, args.out.with_suffix(".png"))
    print(result["finding"])
    return result


if __name__ == "__main__":
    main()
