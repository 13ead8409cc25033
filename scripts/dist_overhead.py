"""Latency of initopt's collectives under torchrun (gloo on CPU), for docs/distributed.md.

Claim checked: the distributed overhead of a search is a fixed latency per iteration (one
small all-reduce for the scale gradient, one for GradInit's bound check), independent of the
model. Prints the time of one all-reduce of 14 float64 numbers and of one GradInit iteration on
the tests' 6-10-10-3 MLP, distributed and inside ``dist.local()`` (same per-rank work).

    OMP_NUM_THREADS=1 PYTHONPATH=src python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        scripts/dist_overhead.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.distributed as td

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import dist_worker as W

import initopt
from initopt.core import dist


def gradinit_seconds(rank: int, steps: int) -> float:
    t0 = time.perf_counter()
    initopt.initialize_(W.model(), W.shard(rank), "gradinit", steps=steps, progress=False)
    return time.perf_counter() - t0


def main() -> None:
    td.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = td.get_rank()
    t = torch.randn(14, dtype=torch.float64)
    for _ in range(50):
        dist.all_reduce_mean(t)
    td.barrier()
    t0 = time.perf_counter()
    for _ in range(2000):
        dist.all_reduce_mean(t)
    reduce_s = (time.perf_counter() - t0) / 2000
    gradinit_seconds(rank, 5)
    td.barrier()
    distributed = (gradinit_seconds(rank, 200) - gradinit_seconds(rank, 20)) / 180
    with dist.local():
        gradinit_seconds(rank, 5)
        alone = (gradinit_seconds(rank, 200) - gradinit_seconds(rank, 20)) / 180
    if rank == 0:
        print(
            f"all_reduce of 14 float64: {reduce_s * 1e6:.0f} us; one gradinit iteration: "
            f"{distributed * 1e3:.2f} ms distributed vs {alone * 1e3:.2f} ms alone"
        )
    td.destroy_process_group()


if __name__ == "__main__":
    main()
