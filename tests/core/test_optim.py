"""The scale optimizer against a plain per-scalar re-computation."""

from __future__ import annotations

import math

import torch

from initopt.core import RescaleAdam


def test_rescale_adam_matches_scalar_loop():
    g = torch.Generator().manual_seed(0)
    n = 5
    lo = torch.tensor([0.01, 0.01, 0.0, 0.0, 0.01], dtype=torch.float64)
    hi = torch.tensor([math.inf, 1.3, math.inf, math.inf, math.inf], dtype=torch.float64)
    alpha = torch.ones(n, dtype=torch.float64)
    opt = RescaleAdam(lo, hi, lr=0.3, betas=(0.8, 0.95), eps=1e-8, clip=1.0)
    ref = [1.0] * n
    m = {"constraint": [0.0] * n, "objective": [0.0] * n}
    t = {"constraint": 0, "objective": 0}
    v = [0.0] * n
    kinds = ["objective", "constraint", "constraint", "objective", "objective", "constraint"]
    for step, kind in enumerate(kinds, start=1):
        grad = torch.randn(n, generator=g, dtype=torch.float64) * 3
        opt.step(alpha, grad, kind=kind)
        t[kind] += 1
        for i in range(n):
            gi = max(-1.0, min(1.0, float(grad[i])))
            m[kind][i] = 0.8 * m[kind][i] + 0.2 * gi
            v[i] = 0.95 * v[i] + 0.05 * gi * gi
            upd = 0.3 * (m[kind][i] / (1 - 0.8 ** t[kind])) / (math.sqrt(v[i] / (1 - 0.95**step)) + 1e-8)
            ref[i] = min(max(ref[i] - upd, float(lo[i])), float(hi[i]))
        torch.testing.assert_close(alpha, torch.tensor(ref, dtype=torch.float64), rtol=1e-13, atol=1e-13)
    assert float(alpha[1]) <= 1.3
