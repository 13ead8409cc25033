"""The benchmarks' peak-memory probe (benchmarks/common.py) against workloads whose peak is known
by construction: exact, repeatable, and the same at 1 and 2 threads."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import peak_bytes_above_start, peak_kib_above_start  # noqa: E402

MiB = 1 << 20
SLACK = 16 * 1024  # bytes of bookkeeping the probe may see besides the workload's tensors


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def hold_then_free() -> None:
    """4 MiB, then 8 MiB while the 4 MiB are held (the 8 MiB by a parallel copy), then both freed."""
    a = torch.ones(MiB)  # 4 MiB of float32
    b = torch.cat([a, a])  # 8 MiB
    del a, b


def free_then_allocate() -> None:
    """4 MiB freed before 8 MiB are allocated: the peak is 8 MiB, not 12."""
    a = torch.ones(MiB)
    del a
    b = torch.ones(2 * MiB)
    del b


def arithmetic() -> None:
    """x (2 MiB), x @ x.T (1 MiB), 2 * x (2 MiB) all live at once, then freed: 5 MiB."""
    x = torch.ones(512, 1024)
    y = x @ x.T
    z = x * 2
    del x, y, z


@pytest.mark.parametrize(
    ("workload", "peak"), [(hold_then_free, 12 * MiB), (free_then_allocate, 8 * MiB), (arithmetic, 5 * MiB)]
)
def test_probe_reports_the_peak_of_live_bytes(threads, workload, peak):
    peaks = [peak_bytes_above_start(workload) for _ in range(3)]
    assert len(set(peaks)) == 1, peaks  # deterministic: the same on every repetition
    assert peak <= peaks[0] <= peak + SLACK, (peaks, peak)


def test_kib_probe_rounds_up_and_counts_only_the_workload(threads):
    held = torch.ones(4 * MiB)  # live before the probe: not part of the peak above the start
    assert [peak_kib_above_start(hold_then_free) for _ in range(3)] == [12 * 1024] * 3
    assert peak_kib_above_start(lambda: torch.empty(1, dtype=torch.uint8)) == 1  # 1 byte -> 1 KiB
    assert peak_kib_above_start(lambda: None) == 0
    del held


def test_probe_is_blind_to_the_c_allocator_reusing_freed_memory(threads):
    """Freed memory the C allocator keeps and hands out again (what made an RSS high-water mark
    read 0) still counts: the probe sees PyTorch's allocations, not the process's pages."""
    for _ in range(3):
        x = torch.ones(3 * MiB)  # 12 MiB allocated and freed outside the probe
        del x
        assert peak_bytes_above_start(lambda: torch.ones(3 * MiB)) == 12 * MiB
