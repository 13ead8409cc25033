"""Distributed runs: every method under ``torchrun --nproc_per_node 2`` (gloo, CPU).

``tests/dist_worker.py`` runs every case on both ranks, each rank on its own shard. Checked:

* both ranks end with bit-identical scales, weights, measures and branches;
* the result is the single-process run whose objective is the mean of the shards' objectives,
  computed here independently of the library's distributed path: for the rules and ``auto``
  (whose reduced measures are pooled moments, mean losses and DDP-averaged gradients) that is
  the single-process run on the concatenated shards; for GradInit, NIO and MetaInit a
  reference loop in this file that evaluates each shard's objective by plain autograd at
  :math:`\\theta = \\alpha W^0` and averages; for the Hessian rule's data mode, the
  single-process search with its norm measurement replaced by the mean of the per-shard ones;
* models that differ across ranks raise :class:`initopt.DistributedError` on every rank, and
  :func:`initopt.core.dist.local` runs each rank alone.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import dist_worker as W
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import initopt
from initopt.core import ScaleSpace
from initopt.core.optim import RescaleAdam
from initopt.methods.hessian import HessianInit

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)

ROOT = Path(__file__).resolve().parents[1]
K = 2  # ranks


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("dist")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={K}",
        str(ROOT / "tests" / "dist_worker.py"),
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    res = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(K)]
    for r in res:
        for name in W.CASES:
            assert "error" not in r[name], f"{name} failed on a rank:\n{r[name]['error']}"
    return res


def shards() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [W.shard(r) for r in range(K)]


def concat(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def assert_scales(got: dict[str, float], want: dict[str, float], tol: float) -> None:
    assert got.keys() == want.keys()
    err = max(abs(got[k] - want[k]) / max(1.0, abs(want[k])) for k in got)
    assert err <= tol, f"scales differ by {err:.3g}: {got} vs {want}"


# ---- the ranks agree ---------------------------------------------------------------------


def test_torchrun_world(ranks):
    assert [r["world"] for r in ranks] == [K, K]
    assert all(r["active"] for r in ranks)


@pytest.mark.parametrize("name", list(W.CASES))
def test_ranks_bit_identical(ranks, name):
    a, b = ranks[0][name], ranks[1][name]
    assert a["scales"] == b["scales"]  # floats compared exactly
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    assert a["before"] == b["before"] and a["after"] == b["after"]
    assert a["branches"] == b["branches"] and a["choice"] == b["choice"]
    assert a["history"] == b["history"]  # every recorded measure, except wall times
    assert a["guard"] == b["guard"]  # the guard's trials and decision
    if a["guard"] is not None and not a["guard"]["kept"]:
        assert all(s == 1.0 for s in a["scales"].values())  # rejected on every rank alike
        assert any(h["branch"] for h in a["history"])  # the search itself ran
    else:
        assert any(abs(s - 1.0) > 1e-3 for s in a["scales"].values()), "the case changed nothing"


def test_different_models_raise_on_every_rank(ranks):
    for r in ranks:
        assert "differ across the 2 ranks" in r["mismatch"] and "the norm of 0.weight" in r["mismatch"]


def test_final_check_of_the_scales(ranks):
    """A method whose scales depend on the rank: far apart raises on every rank, round-off is
    replaced by rank 0's scales, a non-finite scale on one rank fails every rank."""
    for r in ranks:
        assert r["apart"].startswith("DistributedError") and "different scales" in r["apart"]
        assert r["roundoff"] == ranks[0]["roundoff"] and set(r["roundoff"].values()) == {1.0}
        assert r["nonfinite"].startswith("LossError") and "non-finite scales" in r["nonfinite"]


def test_a_bad_shard_stops_every_rank(ranks):
    assert ranks[1]["bad_shard"].startswith("LossError")
    assert ranks[0]["bad_shard"].startswith("DistributedError") and "failed on rank 1" in ranks[0]["bad_shard"]


def test_local_runs_each_rank_alone(ranks):
    assert ranks[0]["local"] != ranks[1]["local"]
    for r in range(K):
        want = initopt.initialize_(W.model(), W.shard(r), "lsuv", progress=False).scales
        assert ranks[r]["local"] == want


# ---- equal to single-process references --------------------------------------------------


@pytest.mark.parametrize("name", ["kaiming", "lsuv", "hessian"])
def test_rules_equal_the_concatenated_shards(ranks, name):
    """Pooled moments and mean losses: the rule on the union of the shards."""
    method, config, _ = W.CASES[name]
    res = initopt.initialize_(W.model(), concat(shards()), method, seed=3, progress=False, **config)
    got = ranks[0][name]
    assert_scales(got["scales"], res.scales, 1e-10)
    for when in ("before", "after"):
        for k, v in getattr(res, when).items():
            assert got[when][k] == pytest.approx(v, rel=1e-10, abs=1e-12), (when, k)


def test_auto_equals_the_concatenated_shards(ranks):
    """Trial gradients averaged like DDP and held-out losses averaged: the single-process trials on
    batches that concatenate the shards' batches (equal sizes, mean losses)."""
    method, config, _ = W.CASES["auto"]
    data = [concat([W.shard(r, t) for r in range(K)]) for t in range(12)]
    res = initopt.initialize_(W.model(), data, method, seed=3, progress=False, **config)
    got = ranks[0]["auto"]
    assert got["choice"] == res.info["choice"]
    assert_scales(got["scales"], res.scales, 1e-9)
    for k, v in res.after.items():
        assert got["after"][k] == pytest.approx(v, rel=1e-9)


def _setup(min_scale: float = 0.01) -> tuple[torch.nn.Module, ScaleSpace, list[str], list[torch.Tensor]]:
    net = W.model()
    space = ScaleSpace(net, min_scale=min_scale)
    return net, space, space.names, [b.param.detach().clone() for b in space.blocks]


def _loss(net: torch.nn.Module, names: list[str], theta: list[torch.Tensor], batch: Any) -> torch.Tensor:
    return F.cross_entropy(functional_call(net, dict(zip(names, theta, strict=True)), (batch[0],)), batch[1])


def test_gradinit_equals_the_mean_of_shard_objectives(ranks):
    """GradInit's objective per shard (constraint: the shard's gradient norm; objective: the loss
    after the shard's normalized step of length eta, step held constant), averaged over shards;
    the bound is on the mean norm."""
    cfg = initopt.GradInitConfig(**W.CASES["gradinit"][1])
    net, space, names, w0 = _setup(cfg.min_scale)
    lo, hi = space.bounds()
    alpha = space.ones()
    opt = RescaleAdam(lo, hi, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, clip=cfg.clip)
    branches = []
    for _ in range(cfg.steps):
        a = alpha.detach().clone().requires_grad_(True)
        terms = []
        for batch in shards():
            theta = [a[i] * w for i, w in enumerate(w0)]
            g = torch.autograd.grad(_loss(net, names, theta, batch), theta, create_graph=True)
            norm = torch.sqrt(sum((x**2).sum() for x in g))
            terms.append((theta, g, norm, batch))
        branch = "constraint" if float(sum(t[2].detach() for t in terms)) / K > cfg.gamma else "objective"
        if branch == "constraint":
            j = sum(t[2] for t in terms) / K
        else:
            j = 0.0
            for theta, g, norm, batch in terms:
                moved = [t - cfg.eta * (x / norm).detach() for t, x in zip(theta, g, strict=True)]
                j = j + _loss(net, names, moved, batch) / cfg.eta / K
        (grad,) = torch.autograd.grad(j, a)
        opt.step(alpha, grad, kind=branch)
        branches.append(branch)
    got = ranks[0]["gradinit"]
    assert got["branches"] == branches
    assert {"constraint", "objective"} <= set(branches), "the case should exercise both branches"
    assert_scales(got["scales"], dict(zip(names, alpha.tolist(), strict=True)), 1e-10)


def test_nio_equals_the_mean_of_shard_objectives(ranks):
    """Each shard's B-GC and B-GN from its own sub-batch gradients (plain autograd, no Gram
    engine), averaged over shards; the bound is on the mean B-GN."""
    cfg = initopt.NIOConfig(**W.CASES["nio"][1])
    net, space, names, w0 = _setup(cfg.min_scale)
    lo, hi = space.bounds()
    alpha = space.ones()
    opt = RescaleAdam(lo, hi, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps, clip=cfg.clip)
    d = cfg.num_splits
    branches = []
    for _ in range(cfg.steps):
        a = alpha.detach().clone().requires_grad_(True)
        gcs, gns = [], []
        for x, y in shards():
            theta = [a[i] * w for i, w in enumerate(w0)]
            grads = [
                torch.autograd.grad(_loss(net, names, theta, (xs, ys)), theta, create_graph=True)
                for xs, ys in zip(torch.tensor_split(x, d), torch.tensor_split(y, d), strict=True)
            ]
            gram = torch.stack(
                [torch.stack([sum((u * v).sum() for u, v in zip(gk, gl, strict=True)) for gl in grads]) for gk in grads]
            )
            norms = gram.diagonal().sqrt()
            cos = gram / (norms[:, None] * norms[None, :] + cfg.eps)
            gcs.append((cos.sum() - cos.diagonal().sum()) / (d * (d - 1)))
            gns.append(norms.mean())
        gc, gn = sum(gcs) / K, sum(gns) / K
        branch = "constraint" if float(gn.detach()) > cfg.gamma else "objective"
        j = gn if branch == "constraint" else -gc - cfg.mu * gn
        (grad,) = torch.autograd.grad(j, a)
        opt.step(alpha, grad, kind=branch)
        branches.append(branch)
    got = ranks[0]["nio"]
    assert got["branches"] == branches
    assert {"constraint", "objective"} <= set(branches), "the case should exercise both branches"
    assert_scales(got["scales"], dict(zip(names, alpha.tolist(), strict=True)), 1e-10)


def test_metainit_equals_the_mean_of_shard_objectives(ranks):
    """The gradient quotient of each shard (g and Hg by plain double backward), averaged; the
    paper's sign-SGD with momentum on the weight norms, with the annealed step."""
    cfg = initopt.MetaInitConfig(**W.CASES["metainit"][1])
    net, space, names, w0 = _setup()
    tuned = [i for i, w in enumerate(w0) if w.ndim >= 2]
    rho0 = torch.tensor([float(w0[i].norm()) for i in tuned], dtype=torch.float64)
    floor = rho0.clamp(max=cfg.min_norm)
    mom = torch.zeros(len(tuned), dtype=torch.float64)
    alpha = space.ones()
    n = sum(w.numel() for w in w0)
    for t in range(cfg.steps):
        a = alpha.detach().clone().requires_grad_(True)
        gq = 0.0
        for batch in shards():
            theta = [a[i] * w for i, w in enumerate(w0)]
            g = torch.autograd.grad(_loss(net, names, theta, batch), theta, create_graph=True)
            hg = torch.autograd.grad(g, theta, grad_outputs=g, create_graph=True)
            total = 0.0
            for gi, hi in zip(g, hg, strict=True):
                e = torch.where(gi.detach() >= 0, cfg.eps, -cfg.eps)
                total = total + ((hi + e) / (gi + e)).abs().sum()
            gq = gq + total / n / K
        (d,) = torch.autograd.grad(gq, a)
        lr = cfg.lr * min(1.0, max(0.0, (cfg.steps - t) / (cfg.anneal * cfg.steps)))
        mom = cfg.momentum * mom - lr * torch.sign(d[tuned] / rho0)
        rho = torch.maximum(alpha[tuned] * rho0 + mom, floor)
        alpha[tuned] = rho / rho0
    assert_scales(ranks[0]["metainit"]["scales"], dict(zip(names, alpha.tolist(), strict=True)), 1e-10)


def test_metainit_noise_is_the_same_on_every_rank(ranks):
    """Noise inputs come from the seed, not the shard: the run equals a single-process one, bit for bit."""
    method, config, _ = W.CASES["metainit_noise"]
    res = initopt.initialize_(W.model(), W.shard(0), method, seed=3, progress=False, **config)
    assert ranks[0]["metainit_noise"]["scales"] == res.scales


def test_hessian_data_equals_the_mean_of_shard_norms(ranks, monkeypatch):
    """Data mode: the Hessian-block norms of each shard, averaged, drive the same search."""
    measure = HessianInit._norms

    def mean_of_shards(self, problem, alpha, idx, batches):
        return sum(measure(self, problem, alpha, idx, [b]) for b in shards()) / K

    monkeypatch.setattr(HessianInit, "_norms", mean_of_shards)
    method, config, _ = W.CASES["hessian_data"]
    res = initopt.initialize_(W.model(), W.shard(0), method, seed=3, progress=False, **config)
    got = ranks[0]["hessian_data"]
    assert_scales(got["scales"], res.scales, 1e-10)
    for k, v in res.after.items():
        assert got["after"][k] == pytest.approx(v, rel=1e-9)
    assert math.isfinite(got["after"]["max_rel_error"])
