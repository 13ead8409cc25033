"""Cost of the Hessian toolkit: Lanczos against power iteration, and one HVP against one gradient.

Claims:
1. Lanczos (full reorthogonalization) needs at most a third of the Hessian-vector products that
   power iteration needs to reach 1e-3 relative accuracy on the largest-magnitude Hessian
   eigenvalue of a small CNN.
2. One Hessian-vector product costs at most 2.5 gradients (forward and backward) on VGG-11
   without BN at batch 64 (the issue's target; double backward measured 3.1 there).

Method:
1. ``zoo.cnn(channels=(8, 16), in_channels=1)`` on 256 scikit-learn digits (1x8x8 images),
   float64, cross-entropy. Reference eigenvalue: 200 Lanczos steps. From the same Rademacher
   start vector, Lanczos runs 80 steps and power iteration 2000; the count is the first number
   of products after which the estimate stays within 1e-3 of the reference (Lanczos: the Ritz
   value of largest magnitude of T_j for every j; power: the Rayleigh quotient). One seed = one
   model initialization and one start vector; mean ± std over seeds.
2. VGG-11 (no BN), batch 64 of 3x32x32 Gaussian images, float32, CPU. Interleaved over
   ``--repeats`` rounds we time: a gradient (``torch.autograd.grad`` of the loss: forward +
   backward), an HVP by double backward (forward, backward with ``create_graph``, second
   backward), an HVP by forward over reverse (``torch.func.jvp`` of ``torch.func.grad``), and
   the per-product cost of double backward when the gradient graph is reused across products
   (what ``HessianOperator(reuse_graph=True)`` does inside Lanczos, Hutchinson and the tracker:
   one backward of the backward per product). Ratios per round; median and mean ± std.

Run: ``python benchmarks/bench_hessian.py`` (full) or ``--quick`` (seconds; used by the tests).
Writes ``benchmarks/results/hessian_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from common import provenance, summary

from initopt import zoo
from initopt.core import Evaluator, ScaleSpace, Task, search_mode
from initopt.core.curvature import (
    hessian_operator,
    hvp_double_backward,
    hvp_forward_over_reverse,
    lanczos,
    power_iteration,
    rademacher,
    ritz,
    top_eigenvalues,
)

HERE = Path(__file__).resolve().parent


def _first_stable(values: list[float], ref: float, rel: float) -> int | None:
    """1-based index after which every value is within ``rel`` of ``ref`` (None: never)."""
    ok = [abs(v - ref) <= rel * abs(ref) for v in values]
    if not ok or not ok[-1]:
        return None
    k = len(ok)
    while k > 0 and ok[k - 1]:
        k -= 1
    return k + 1


def _gap(lan: list[float], res: Any) -> float:
    """|lambda_2| / |lambda_1| among the Ritz values of the longest run (what power iteration's rate depends on)."""
    theta, _ = ritz(res.alphas, res.betas)
    mags = theta.abs().sort(descending=True).values
    return float(mags[1] / mags[0]) if len(mags) > 1 else 0.0


def digits_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from initopt.data import digits

    train, _ = digits()
    x, y = train.tensors
    return x[:n].reshape(-1, 1, 8, 8).double(), y[:n]


def lanczos_vs_power(seeds: int, n: int, lanczos_steps: int, power_steps: int, ref_steps: int) -> dict[str, Any]:
    batch = digits_batch(n)
    runs = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        model = zoo.cnn(channels=(8, 16), in_channels=1).double()
        space = ScaleSpace(model)
        ev = Evaluator(model, space, Task())
        with search_mode(model):
            op = hessian_operator(ev, [batch])
            ref = float(
                top_eigenvalues(op, 1, iters=ref_steps, tol=None, generator=torch.Generator().manual_seed(99))[0]
            )
            v0 = rademacher(op.dim, torch.Generator().manual_seed(seed), op.dtype, op.device)
            res = lanczos(op, lanczos_steps, v0=v0)
            lan = []
            for j in range(1, len(res.alphas) + 1):
                theta, _ = ritz(res.alphas[:j], res.betas[: j - 1])
                lan.append(float(theta[theta.abs().argmax()]))
            pw = power_iteration(op, iters=power_steps, tol=None, v0=v0)
            power = pw.history.tolist()
        n_lan = _first_stable(lan, ref, 1e-3)
        n_pow = _first_stable(power, ref, 1e-3)
        tight_lan = _first_stable(lan, ref, 1e-6)
        tight_pow = _first_stable(power, ref, 1e-6)
        runs.append(
            {
                "seed": seed,
                "dim": op.dim,
                "reference_eigenvalue": ref,
                "lanczos_products": n_lan,
                "power_products": n_pow,
                "ratio": (n_lan / n_pow) if (n_lan and n_pow) else None,
                "lanczos_products_1e-6": tight_lan,
                "power_products_1e-6": tight_pow,
                "second_eigenvalue_ratio": _gap(lan, res),
            }
        )
        print(f"  seed {seed}: n={op.dim} lambda={ref:.5g} lanczos {n_lan} power {n_pow}", flush=True)
    ratios = [r["ratio"] for r in runs if r["ratio"] is not None]
    tight = [
        r["lanczos_products_1e-6"] / r["power_products_1e-6"]
        for r in runs
        if r["lanczos_products_1e-6"] and r["power_products_1e-6"]
    ]
    return {
        "ratio_lanczos_over_power_at_1e-6": summary(tight) if tight else None,
        "runs": runs,
        "lanczos_products": summary([r["lanczos_products"] for r in runs if r["lanczos_products"]]),
        "power_products": summary([r["power_products"] for r in runs if r["power_products"]]),
        "ratio_lanczos_over_power": summary(ratios) if ratios else None,
        "target_ratio": 1 / 3,
        "power_not_converged": sum(r["power_products"] is None for r in runs),
    }


def hvp_cost(model_name: str, batch: int, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    if model_name == "vgg11":
        model, shape = zoo.vgg11(batchnorm=False), (3, 32, 32)
    else:
        model, shape = zoo.cnn(channels=(8, 16)), (3, 16, 16)
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g))
    space = ScaleSpace(model)
    ev = Evaluator(model, space, Task())
    params = [p.detach() for p in space.initial]
    vec = [torch.randn(p.shape, generator=g) for p in params]

    def closure(ts: Any) -> torch.Tensor:
        return ev.loss(list(ts), data)

    def gradient() -> None:
        leaves = [p.detach().requires_grad_(True) for p in params]
        torch.autograd.grad(closure(leaves), leaves)

    def double_backward() -> None:
        hvp_double_backward(closure, params, vec)

    def forward_over_reverse() -> None:
        hvp_forward_over_reverse(closure, params, vec)

    times: dict[str, list[float]] = {k: [] for k in ("gradient", "double_backward", "forward_over_reverse", "reuse")}
    with search_mode(model):
        op = hessian_operator(ev, [data], method="double_backward", reuse_graph=True)
        flat = torch.cat([v.reshape(-1) for v in vec])
        op.matvec(flat)  # builds and keeps the gradient graph
        for fn in (gradient, double_backward, forward_over_reverse):
            fn()  # warm-up
        for r in range(repeats):
            for name, fn in (
                ("gradient", gradient),
                ("double_backward", double_backward),
                ("forward_over_reverse", forward_over_reverse),
                ("reuse", lambda: op.matvec(flat)),
            ):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
            print(f"  round {r}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()), flush=True)
    out: dict[str, Any] = {"seconds": {k: summary(v) for k, v in times.items()}}
    for k in ("double_backward", "forward_over_reverse", "reuse"):
        out[f"{k}_in_gradients"] = summary([a / b for a, b in zip(times[k], times["gradient"], strict=True)])
    out["target"] = 2.5
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny version (seconds)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--out", type=Path, default=HERE / "results" / "hessian_cost.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        cfg = {
            "seeds": 2,
            "n": 32,
            "lanczos_steps": 40,
            "power_steps": 300,
            "ref_steps": 60,
            "hvp_model": "small_cnn",
            "hvp_batch": 8,
            "repeats": 2,
        }
    else:
        cfg = {
            "seeds": args.seeds,
            "n": 256,
            "lanczos_steps": 80,
            "power_steps": 2000,
            "ref_steps": 200,
            "hvp_model": "vgg11",
            "hvp_batch": 64,
            "repeats": args.repeats,
        }
    result: dict[str, Any] = {"config": {**cfg, "quick": args.quick}, "provenance": provenance(args.threads)}
    print("Lanczos vs power iteration", flush=True)
    result["lanczos_vs_power"] = lanczos_vs_power(
        cfg["seeds"], cfg["n"], cfg["lanczos_steps"], cfg["power_steps"], cfg["ref_steps"]
    )
    print(f"HVP cost on {cfg['hvp_model']} batch {cfg['hvp_batch']}", flush=True)
    result["hvp_cost"] = {"model": cfg["hvp_model"], "batch": cfg["hvp_batch"]}
    result["hvp_cost"].update(hvp_cost(cfg["hvp_model"], cfg["hvp_batch"], cfg["repeats"]))
    result["memory"] = "not measured"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    lp = result["lanczos_vs_power"]
    hc = result["hvp_cost"]
    if lp["ratio_lanczos_over_power"]:
        print(f"Lanczos/power products at 1e-3: {lp['ratio_lanczos_over_power']['mean']:.3f}")
    if lp["ratio_lanczos_over_power_at_1e-6"]:
        print(f"Lanczos/power products at 1e-6: {lp['ratio_lanczos_over_power_at_1e-6']['mean']:.3f}")
    for k in ("double_backward", "forward_over_reverse", "reuse"):
        print(f"{k}: {hc[k + '_in_gradients']['median']:.2f} gradients")
    return result


if __name__ == "__main__":
    main()
