"""One rank of the distributed test (``tests/test_distributed.py`` launches it under torchrun).

Every rank builds the same small float64 MLP, takes its own data shard, runs each case of
``CASES`` through :func:`initopt.initialize_` and saves what it got (scales, weights, measures)
to ``<out>/rank<r>.pt``. The test process compares the ranks with each other and with
single-process references.
"""

from __future__ import annotations

import math
import sys
import traceback
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as td
from torch import nn

import initopt
from initopt import zoo
from initopt.core import dist
from initopt.methods.base import Method, Outcome

IN, HIDDEN, CLASSES, BATCH = 6, 10, 3, 16

# name: (method, config, data kind)
CASES: dict[str, tuple[Any, dict[str, Any], str]] = {
    "kaiming": ("kaiming", {}, "one"),
    "lsuv": ("lsuv", {}, "one"),
    "hessian": ("hessian", {}, "one"),
    "hessian_data": ("hessian", {"mode": "data", "steps": 4, "iterations": 8}, "one"),
    "gradinit": ("gradinit", {"steps": 12, "gamma": 0.25, "lr": 0.05, "guard": False}, "one"),
    # the guard on: its trials average gradients and losses over ranks, so the ranks decide alike
    "gradinit_guarded": ("gradinit", {"steps": 12, "gamma": 0.25, "lr": 0.05, "guard_steps": 4}, "one"),
    "nio": ("nio", {"steps": 8, "num_splits": 2, "gamma": 0.4, "lr": 0.05, "guard": False}, "one"),
    "metainit": ("metainit", {"steps": 8, "source": "batches", "lr": 0.05, "guard": False}, "one"),
    "metainit_noise": ("metainit", {"steps": 4, "lr": 0.05, "guard": False}, "one"),
    "auto": (
        "auto",
        {"starts": ("kaiming", "lsuv", "hessian"), "learned": (), "trial_steps": 4, "max_trial_steps": 8, "holdout": 1},
        "many",
    ),
    "auto_learned": (
        "auto",
        {"starts": ("model", "kaiming"), "learned": ("gradinit", "nio"), "trial_steps": 3, "holdout": 1, "steps": 8},
        "many",
    ),
    "pipeline": (["hessian", ("gradinit", {"steps": 4, "guard": False})], {}, "one"),
    "float32_nio": ("nio", {"steps": 4, "num_splits": 2, "guard": False}, "float32"),
    # a BatchNorm CNN (batch statistics per rank; the NIO Gram engine on convolutions): ranks agree
    "cnn_nio": ("nio", {"steps": 4, "num_splits": 2, "guard": False}, "cnn"),
    "cnn_gradinit": ("gradinit", {"steps": 4, "guard": False}, "cnn"),
    "cnn_lsuv": ("lsuv", {}, "cnn"),
}


@dataclass(frozen=True)
class RankScalesConfig:
    steps: int = 1
    offset: float = 0.0


class RankScales(Method):
    """A faulty method whose scales depend on the rank: 1 on rank 0, 1 + offset on the others."""

    name = "rank_scales"
    Config = RankScalesConfig

    def search(self, problem: Any, steps: int, progress: Any) -> Outcome:
        alpha = problem.space.ones()
        return Outcome(alpha=alpha if dist.rank() == 0 else alpha * (1 + self.config.offset))


def model() -> nn.Module:
    """The same network on every rank (seeded)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES)
    ).double()


def shard(rank: int, t: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``t`` of rank ``rank``'s shard."""
    g = torch.Generator().manual_seed(1000 + 97 * rank + t)
    x = torch.randn(BATCH, IN, generator=g, dtype=torch.float64) * (1.0 + 0.5 * rank)
    y = torch.randint(0, CLASSES, (BATCH,), generator=g)
    return x, y


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return zoo.cnn(channels=(4, 8), in_channels=1, num_classes=CLASSES, batchnorm=True).double()


def data(rank: int, kind: str) -> Any:
    if kind == "float32":
        x, y = shard(rank)
        return x.float(), y
    if kind == "cnn":
        x, y = shard(rank)
        return x[:, :4].repeat(1, 16).reshape(BATCH, 1, 8, 8), y
    return shard(rank) if kind == "one" else [shard(rank, t) for t in range(12)]


def run_case(rank: int, name: str) -> dict[str, Any]:
    method, config, kind = CASES[name]
    net = cnn() if kind == "cnn" else model().float() if kind == "float32" else model()
    res = initopt.initialize_(net, data(rank, kind), method, seed=3, progress=False, **config)
    return {
        "scales": dict(res.scales),
        "state": {k: v.detach().clone() for k, v in net.state_dict().items()},
        "before": dict(res.before),
        "after": dict(res.after),
        "branches": [h.get("branch") for h in res.history],
        "history": [{k: v for k, v in h.items() if "second" not in k} for h in res.history],
        "choice": res.info.get("choice"),
        "guard": res.info.get("guard"),
    }


def main(out: str) -> None:
    td.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = td.get_rank()
    results: dict[str, Any] = {"world": td.get_world_size(), "active": dist.active()}
    for name in sys.argv[2:] or list(CASES):
        try:
            results[name] = run_case(rank, name)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
    # the models differ across ranks: every rank must raise DistributedError (none may hang)
    net = model()
    if rank == 1:
        with torch.no_grad():
            net[0].weight.mul_(1.5)
    try:
        initopt.initialize_(net, shard(rank), "kaiming", progress=False)
        results["mismatch"] = "no error"
    except initopt.DistributedError as e:
        results["mismatch"] = str(e)
    # the final check: ranks that end apart fail together; round-off is replaced by rank 0's scales
    for label, offset in (("apart", 0.5), ("roundoff", 1e-12), ("nonfinite", math.nan)):
        try:
            net = model()
            res = initopt.initialize_(net, shard(rank), RankScales(offset=offset), progress=False)
            results[label] = dict(res.scales)
        except initopt.InitOptError as e:
            results[label] = f"{type(e).__name__}: {e}"
    # a bad first batch on rank 1 only: its own error there, DistributedError on the others (no hang)
    x, y = shard(rank)
    if rank == 1:
        x = x.clone()
        x[0, 0] = math.nan
    try:
        initopt.initialize_(model(), (x, y), "gradinit", steps=2, progress=False)
        results["bad_shard"] = "no error"
    except initopt.InitOptError as e:
        results["bad_shard"] = f"{type(e).__name__}: {e}"
    # dist.local(): no collective, each rank on its own shard
    with dist.local():
        net = model()
        results["local"] = dict(initopt.initialize_(net, shard(rank), "lsuv", progress=False).scales)
    torch.save(results, f"{out}/rank{rank}.pt")
    td.barrier()
    td.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
