"""Pieces every benchmark script shares: statistics, provenance, synthetic batches, the
training-step baseline and the kernel's memory counters (Linux)."""

from __future__ import annotations

import platform
import resource
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


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_kib_above_start(workload: Callable[[], Any]) -> int:
    """Peak RSS (KiB) of ``workload()`` above the RSS before it, in this process.

    The kernel's high-water mark is reset first (``/proc/self/clear_refs`` ``5``), so earlier
    peaks (importing torch, warm-ups) do not count; without that, ``ru_maxrss`` is the fallback.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        peak = lambda: status_kib("VmHWM")  # noqa: E731
    except OSError:  # pragma: no cover - not Linux
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # noqa: E731
    before = status_kib("VmRSS")
    workload()
    return peak() - before
