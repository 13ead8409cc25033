"""Claims study 1b: why GradInit from Kaiming can lose against Kaiming alone.

Observed before this study: on a deep plain CNN with a smooth activation (16 SiLU layers),
trained by SGD with momentum from Kaiming init, GradInit at the spec's CIFAR settings lost
several points against Kaiming alone. Claim tested here: *GradInit's per-tensor scales carry
information that helps training* — if they do, replacing them by their geometric mean
(``uniform``) or permuting them across layers (``shuffled``) must hurt, and the look-ahead loss
GradInit minimizes must fall on held-out batches too.

Ablations, each from the same Kaiming draw (paired by seed): the spec's settings (η = 0.1 with a
normalized step, γ = 1, scale lr τ = 1e-2, T = 390); γ = 100 (the bound never binds); τ = 1e-3
(a tenth of the scale learning rate); T = 100; η = 0.01 (about the length of the real first SGD
step, lr 0.01 × ‖g‖ ≈ 0.9, instead of the paper's 0.1); the spec's run with its weight scales replaced by their
geometric mean, and randomly permuted across layers. For every GradInit run: the held-out look-ahead loss before and
after (8 batches not used by the search), the spread of the log weight scales, and the
product of the weight scales (the network's end-to-end gain change). Then, at Kaiming init,
the per-tensor scale gradient of the look-ahead objective and of NIO's B-GC over 16 batches
(computed here by plain autograd through ``torch.func.functional_call``, independently of
initopt): the share of its energy along the common direction (all tensors alike) and the
signal-to-noise ratio (|mean| / std over batches) of the rest.

Tasks: the 16-layer SiLU CNN (width 24) and the 16-layer ReLU MLP (width 96) on MNIST-1D;
SGD with momentum 0.9, lr 0.01, 200 steps, batch 64; 3 seeds on the CNN (headline, repeated at
2 threads for Kaiming and GradInit at the spec's settings), 5 on the MLP.
Writes ``results/study_gradinit.json`` and ``.png``.

    python benchmarks/study_gradinit.py            # default size (about 12 minutes on one thread)
    python benchmarks/study_gradinit.py --quick    # tiny, seconds (what CI runs)
"""

from __future__ import annotations

import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from studies import (
    TABLE_COLUMNS,
    compute_seconds,
    deep_tasks,
    judge,
    print_report,
    pyplot,
    rows_by_init,
    stat,
    study_args,
    thread_note,
    train_grid,
    write_study,
)
from torch import nn
from torch.func import functional_call

import initopt
from initopt.data import loader

CLAIM = (
    "GradInit's per-tensor scales carry information that helps training: replacing them by their "
    "geometric mean or permuting them across layers hurts, and they lower the look-ahead loss on held-out batches."
)
HEADLINE = "cnn16_silu_mnist1d"
VARIANTS = {
    "gradinit": {},
    "gradinit γ=100": {"gamma": 100.0},
    "gradinit τ=1e-3": {"lr": 1e-3},
    "gradinit T=100": {"steps": 100},
    "gradinit η=0.01": {"eta": 0.01},  # about the real first step's length, lr 0.01 x |g| ~ 0.9
}


def lookahead_loss(model: nn.Module, batches: list, eta: float = 0.1) -> float:
    """Mean over pairs of batches of L(S̃; θ − η g/‖g‖) with g = ∇L(S; θ) (GradInit's objective, sgd target)."""
    model.train()
    params = dict(model.named_parameters())
    total = 0.0
    for (x, y), (x2, y2) in zip(batches[::2], batches[1::2], strict=True):
        loss = F.cross_entropy(functional_call(model, params, (x,)), y)
        grads = torch.autograd.grad(loss, list(params.values()))
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        stepped = {n: p.detach() - eta * g / norm for (n, p), g in zip(params.items(), grads, strict=True)}
        with torch.no_grad():
            total += float(F.cross_entropy(functional_call(model, stepped, (x2,)), y2))
    return total / len(batches[::2])


def scale_gradients(model: nn.Module, batches: list, objective: str, eta: float = 0.1) -> torch.Tensor:
    """Per weight tensor ∂J/∂α at α = 1, one row per batch: J = look-ahead loss / η or −B-GC (D = 4)."""
    names = [n for n, p in model.named_parameters() if p.ndim >= 2]
    base = {n: p.detach().requires_grad_() for n, p in model.named_parameters()}
    rows = []
    for x, y in batches:
        alpha = torch.ones(len(names), requires_grad=True)
        params = dict(base)
        for i, n in enumerate(names):
            params[n] = alpha[i] * base[n]
        if objective == "lookahead":
            half = len(x) // 2
            loss = F.cross_entropy(functional_call(model, params, (x[:half],)), y[:half])
            g = torch.autograd.grad(loss, list(params.values()))
            norm = torch.sqrt(sum((t.detach() ** 2).sum() for t in g))
            stepped = {n: p - eta * t.detach() / norm for (n, p), t in zip(params.items(), g, strict=True)}
            j = F.cross_entropy(functional_call(model, stepped, (x[half:],)), y[half:]) / eta
        else:
            flats = []
            for xs, ys in zip(x.chunk(4), y.chunk(4), strict=True):
                loss = F.cross_entropy(functional_call(model, params, (xs,)), ys)
                g = torch.autograd.grad(loss, list(params.values()), create_graph=True)
                flats.append(torch.cat([t.reshape(-1) for t in g]))
            cos = [
                (flats[k] @ flats[m]) / (flats[k].norm() * flats[m].norm() + 1e-8)
                for k in range(4)
                for m in range(4)
                if k != m
            ]
            j = -torch.stack(cos).mean()
        rows.append(torch.autograd.grad(j, alpha)[0])
    return torch.stack(rows)


def gradient_information(grads: torch.Tensor) -> dict[str, float]:
    """Common-direction share and the signal-to-noise of the rest, for rows = batches, cols = tensors."""
    mean = grads.mean(0)
    n = grads.shape[1]
    common = float(mean.sum() ** 2 / (n * (mean**2).sum()))
    resid = grads - grads.mean(1, keepdim=True)
    snr = resid.mean(0).abs() / resid.std(0).clamp_min(1e-30)
    return {
        "common_share_of_mean_gradient": common,
        "share_of_batches_with_common_sign": float((grads.sum(1).sign() == mean.sum().sign()).float().mean()),
        "residual_snr_median": float(snr.median()),
        "residual_snr_max": float(snr.max()),
        "snr_if_pure_noise": 1 / math.sqrt(grads.shape[0]),
    }


def main(argv: list[str] | None = None) -> int:
    args = study_args(__doc__, "gradinit", argv, ["cnn16_silu_mnist1d", "mlp16_relu_mnist1d"], training=False)
    tasks = deep_tasks(quick=args.quick)
    steps = 12 if args.quick else 200
    train_kw = {"steps": steps, "lr": 0.01, "momentum": 0.9, "batch_size": 16 if args.quick else 64}
    t0 = time.perf_counter()
    runs: list[dict] = []
    searches: list[dict] = []
    cache: dict[tuple, dict] = {}
    information: dict[str, dict] = {}
    for name in args.tasks:
        task = tasks[name]
        train, test = task["data"]()
        if args.quick:
            train = torch.utils.data.TensorDataset(*(t[:96] for t in train.tensors))
        held = list(loader(test, train_kw["batch_size"], seed=123))[:8]
        seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2] if name == HEADLINE else [0, 1, 2, 3, 4])

        def searched(seed: int, fields: dict, task: dict = task, train=train, name=name) -> tuple[nn.Module, dict]:
            """A fresh Kaiming draw of ``seed`` and GradInit run on a copy (cached per seed and fields)."""
            torch.manual_seed(seed)
            model = task["make"]("kaiming")
            key = (name, seed, tuple(sorted(fields.items())))
            if key not in cache:
                trial = copy.deepcopy(model)
                fields = {**fields, "steps": 3} if args.quick else fields
                res = initopt.initialize_(
                    trial,
                    loader(train, train_kw["batch_size"], seed=seed + 10_000),
                    "gradinit",
                    seed=seed,
                    **{**fields, "guard": False},  # the paper's algorithm (studies.paper_algorithm)
                )
                cache[key] = {"scales": res.scales, "seconds": res.seconds}
            return model, cache[key]["scales"]

        def ablated(kind: str, fields: dict) -> nn.Module:
            """The Kaiming draw of the current seed with GradInit's scales as found, or ablated."""
            seed = torch.initial_seed()
            model, scales = searched(seed, fields)
            weights = [n for n in scales if dict(model.named_parameters())[n].ndim >= 2]
            logs = [math.log(scales[n]) for n in weights]
            if kind == "uniform":
                new = dict.fromkeys(weights, math.exp(statistics.fmean(logs)))
            elif kind == "shuffled":
                g = torch.Generator().manual_seed(seed)
                perm = torch.randperm(len(weights), generator=g).tolist()
                new = {n: math.exp(logs[perm[i]]) for i, n in enumerate(weights)}
            else:
                new = {}
            initopt.apply_scales_(model, {**scales, **new})
            return model

        for label, fields in VARIANTS.items():
            for seed in seeds:
                model, scales = searched(seed, fields)
                weights = [s for n, s in scales.items() if dict(model.named_parameters())[n].ndim >= 2]
                before = lookahead_loss(model, held)
                initopt.apply_scales_(model, scales)
                after = lookahead_loss(model, held)
                searches.append(
                    {
                        "task": name,
                        "variant": label,
                        "seed": seed,
                        "heldout_lookahead_before": before,
                        "heldout_lookahead_after": after,
                        "log_scale_std": statistics.pstdev([math.log(s) for s in weights]),
                        "log_scale_product": sum(math.log(s) for s in weights),
                        "scales": scales,
                    }
                )
        # every GradInit variant is searched once per seed (above) and its scales applied in the
        # model factory, so the trained runs and the look-ahead measures share one search
        for threads in (1, 2) if name == HEADLINE else (1,):
            kw = {"seeds": seeds, "threads": threads, "tags": {"task": name}, "cache": args.cache, **train_kw}
            runs += train_grid(lambda t=task: t["make"]("kaiming"), train, test, ["default"], start="kaiming", **kw)
            grid = [(lab, f, "as found") for lab, f in VARIANTS.items()]
            grid += [(f"gradinit, {k}", {}, k) for k in ("uniform", "shuffled")]
            for label, fields, kind in grid if threads == 1 else grid[:1]:
                new = train_grid(
                    lambda k=kind, f=fields: ablated(k, f),
                    train,
                    test,
                    [(label, "default")],
                    start="kaiming",
                    **{**kw, "cache": None},
                )
                for r in new:  # the search's own cost, in training steps of this run
                    r["init_seconds"] = cache[(name, r["seed"], tuple(sorted(fields.items())))]["seconds"]
                    r["init_in_train_steps"] = r["init_seconds"] / r["step_seconds"] if r["step_seconds"] else None
                runs += new
        torch.manual_seed(0)
        model = task["make"]("kaiming")
        gb = list(loader(train, train_kw["batch_size"], seed=7))[: 4 if args.quick else 16]
        information[name] = {obj: gradient_information(scale_gradients(model, gb, obj)) for obj in ("lookahead", "bgc")}
    seconds = time.perf_counter() - t0

    verdicts, rows = [], []
    for name in args.tasks:
        rs = [r for r in runs if r["task"] == name]
        for label in [*VARIANTS, "gradinit, uniform", "gradinit, shuffled"]:
            verdicts.append(judge(rs, ("kaiming", label), ("kaiming", "default"), f"{label} beats Kaiming on {name}"))
        for kind in ("uniform", "shuffled"):
            verdicts.append(
                judge(
                    rs,
                    ("kaiming", "gradinit"),
                    ("kaiming", f"gradinit, {kind}"),
                    f"GradInit's per-tensor scales beat the same scales {kind} on {name}",
                )
            )
        for label in VARIANTS:
            ss = [s for s in searches if s["task"] == name and s["variant"] == label]
            fin = stat([r["final_test_acc"] for r in rs if r["init"] == label and r["threads"] == 1])
            b = stat([s["heldout_lookahead_before"] for s in ss])
            lower = sum(s["heldout_lookahead_after"] < s["heldout_lookahead_before"] for s in ss)
            a = stat([s["heldout_lookahead_after"] for s in ss])
            rows.append(
                [
                    name,
                    label,
                    f"{fin[0]:.3f} ± {fin[1]:.3f}",
                    f"{b[0]:.4f} → {a[0]:.4f} (lower in {lower}/{len(ss)})",
                    f"{statistics.fmean(s['log_scale_std'] for s in ss):.3f}",
                    f"{math.exp(statistics.fmean(s['log_scale_product'] for s in ss)):.3g}",
                ]
            )
        base = stat([r["final_test_acc"] for r in rs if r["init"] == "default" and r["threads"] == 1])
        rows.append([name, "Kaiming alone", f"{base[0]:.3f} ± {base[1]:.3f}", "", "0", "1"])
    notes = [
        f"Training: SGD, momentum 0.9, lr 0.01, {steps} steps, batch {train_kw['batch_size']}; "
        "seeds 0-2 on the CNN, 0-4 on the MLP, paired by seed (all from the same Kaiming draw).",
        "Scale-gradient information at Kaiming init (16 batches): "
        + "; ".join(
            f"{n} {obj}: common-direction share {v['common_share_of_mean_gradient']:.2f}, residual SNR median "
            f"{v['residual_snr_median']:.2f} (pure noise ~{v['snr_if_pure_noise']:.2f})"
            for n, d in information.items()
            for obj, v in d.items()
        ),
        thread_note(runs, HEADLINE),
        f"Wall time of this invocation: {seconds:.0f} s; computation in the runs (inits + training, summed): "
        f"{compute_seconds(runs):.0f} s.",
    ]
    payload = {
        "claim": CLAIM,
        "config": {"tasks": args.tasks, "variants": VARIANTS, "quick": args.quick, **train_kw},
        "table": {
            "title": "GradInit ablations from Kaiming init (1 thread)",
            "columns": [
                "task",
                "variant",
                "final test acc",
                "held-out look-ahead loss before → after",
                "std of log weight scales",
                "product of weight scales",
            ],
            "rows": rows,
        },
        "task_tables": {
            "columns": TABLE_COLUMNS,
            "tables": {n: rows_by_init([r for r in runs if r["task"] == n], threads=1) for n in args.tasks},
        },
        "gradient_information": information,
        "searches": searches,
        "verdicts": verdicts,
        "notes": notes,
        "seconds": seconds,
        "runs": runs,
    }
    path = write_study("gradinit", payload, args.out)
    plot(searches, runs, args.tasks, path.with_suffix(".png"))
    print_report(notes, verdicts)
    return 0


def plot(searches: list[dict], runs: list[dict], names: list[str], path: Path) -> None:
    """Per-layer log scales of every GradInit variant (seed 0), one panel per task."""
    plt = pyplot()
    if plt is None:  # pragma: no cover
        return
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for s in searches:
            if s["task"] == name and s["seed"] == 0:
                ws = [v for k, v in s["scales"].items() if k.endswith("weight")]
                ax.plot(range(len(ws)), ws, marker="o", ms=3, label=s["variant"])
        ax.axhline(1, color="k", lw=0.7, ls="--")
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel("weight scale (seed 0)")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
