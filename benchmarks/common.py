"""Pieces every benchmark script shares: statistics, provenance, synthetic batches, the
training-step baseline and the peak-memory probe (PyTorch's CPU allocator)."""

from __future__ import annotations

import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import initopt

HERE = Path(__file__).resolve().parent


def summary(xs: list[float]) -> dict[str, float]:
    """Median, mean, sample standard deviation and count."""
    return {
        "median": statistics.median(xs),
        "mean": statistics.fmean(xs),
        "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "n": len(xs),
    }


def spread(xs: list[float]) -> dict[str, float]:
    """Median, smallest, largest and count."""
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def provenance(threads: int) -> dict[str, Any]:
    """Versions, thread count, code revision (and whether the tree had changes), date."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
        dirty = bool(
            subprocess.run(["git", "status", "--porcelain"], cwd=HERE, capture_output=True, text=True).stdout.strip()
        )
    except OSError:  # pragma: no cover
        rev, dirty = "unknown", True
    return {
        "torch": torch.__version__,
        "initopt": initopt.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": threads,
        "git_revision": rev,
        "git_dirty": dirty,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def make_batches(shape: tuple[int, ...], batch: int, n: int = 4, seed: int = 0, dtype=torch.float32) -> list:
    """``n`` batches of Gaussian inputs of ``shape`` with labels in 0..9."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, *shape, generator=g, dtype=dtype), torch.randint(0, 10, (batch,), generator=g))
        for _ in range(n)
    ]


def time_train_steps(model: nn.Module, batches: list, iters: int) -> list[float]:
    """Seconds of each of ``iters`` SGD steps (forward, backward, step, zero_grad)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    out = []
    for i in range(iters):
        x, y = batches[i % len(batches)]
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(time.perf_counter() - t0)
    return out


def peak_bytes_above_start(workload: Callable[[], Any]) -> int:
    """Peak of the bytes live in PyTorch's CPU allocator during ``workload()``, above the start.

    Runs ``workload()`` under ``torch.profiler.profile(profile_memory=True)``, which records
    every CPU allocation and free with its size and the allocator's running total of live
    bytes (``total_allocated``, updated under the allocator reporter's lock, so exact whatever
    the threads). A small marker tensor is allocated on this thread just before the workload
    and freed after it; the running total right after the marker is the start. The peak is
    the largest running total recorded from then on minus that start. Blocks allocated before
    the call and freed during it are not recorded (PyTorch does not know their size), so they
    never lower the count. Deterministic and independent of the C allocator's reuse of freed
    memory (which made the former RSS high-water-mark probe read 0); memory outside PyTorch's
    CPU allocator (Python objects, library workspaces, thread stacks) is not counted.
    """
    marker_bytes = 64
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        marker = torch.empty(marker_bytes, dtype=torch.uint8)
        marker_ptr = marker.data_ptr()
        workload()
        del marker
    records, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        ef = node.extra_fields
        if isinstance(ef, torch._C._profiler._ExtraFields_Allocation) and ef.device.type == "cpu":
            records.append((node.start_time_ns, ef.ptr, ef.alloc_size, ef.total_allocated))
    records.sort()
    # the marker's allocation: the last allocation of its size at its address (the address is
    # not reused while the marker lives, i.e. until after the workload)
    i = max(k for k, (_, ptr, size, _) in enumerate(records) if ptr == marker_ptr and size == marker_bytes)
    start = records[i][3]
    return max(0, max(t for *_, t in records[i:]) - start)


def peak_kib_above_start(workload: Callable[[], Any]) -> int:
    """Peak live bytes (KiB, rounded up) of PyTorch's CPU allocator during ``workload()`` above
    the start; see :func:`peak_bytes_above_start`.

    Committed results in ``benchmarks/results`` from before this probe used an RSS probe
    (kernel high-water mark ``VmHWM`` minus ``VmRSS`` before the workload), not this one.
    """
    return -(-peak_bytes_above_start(workload) // 1024)
