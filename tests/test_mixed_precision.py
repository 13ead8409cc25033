"""Half-precision (bfloat16, float16) models: every registered method runs on CPU, the model
keeps its dtype and parameter identity, and the search equals the float32 search of the same
rounded weights bit for bit (:mod:`initopt.core.precision`); kernels that fail in half
precision are a :class:`PrecisionError` naming the dtype."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo_cases import assert_same, snapshot

import initopt
from initopt import zoo

HALF = [torch.bfloat16, torch.float16]
STEPS = {"auto": {"steps": 2}, "metainit": {"steps": 5}, "gradinit": {"steps": 5}, "nio": {"steps": 5}}
# Measured max |log(scale / scale of the float32 run)| at these steps (the original float32 weights
# vs the same weights rounded to the half dtype; the search itself is exact, see below). The
# differences are each method's sensitivity to rounding-sized changes of the weights and inputs:
# the float32 runs with weights x (1 + 2e-3 N(0, 1)) differ as much (gradinit 0.019, metainit 0.34
# on the CNN). MetaInit's sign steps amplify them, so it is not compared.
TOL = {"kaiming": 2e-3, "hessian": 2e-3, "lsuv": 2e-3, "nio": 2e-3, "gradinit": 0.05, "auto": 0.3}


def _model(arch: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if arch == "mlp":
        return zoo.mlp(depth=3, width=16, in_features=8), torch.randn(16, 8)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 10),
    )
    return net, torch.randn(16, 3, 6, 6)


def _run(model: nn.Module, batch, method: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return initopt.initialize_(model, batch, method, progress=False, **STEPS.get(method, {}))


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("method", initopt.methods())
def test_every_method_runs_on_half_precision_models_as_on_their_float32_copy(method, arch, dtype):
    m32, x = _model(arch)
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(1))
    half = copy.deepcopy(m32).to(dtype)
    ref = copy.deepcopy(half).float()  # the same (rounded) weights in float32
    params = dict(half.named_parameters())
    buffers = {n: b.clone() for n, b in half.named_buffers()}
    r = _run(half, (x.to(dtype), y), method)
    # dtype and identity kept; buffers (BatchNorm statistics) untouched
    assert all(p.dtype == dtype and p is params[n] for n, p in half.named_parameters())
    assert all(torch.equal(b, buffers[n]) and b.dtype == buffers[n].dtype for n, b in half.named_buffers())
    assert r.scales and all(math.isfinite(s) and s > 0 for s in r.scales.values())
    # the search ran in float32: bit for bit the float32 search of the rounded weights and inputs
    rr = _run(ref, (x.to(dtype).float(), y), method)
    assert r.scales == rr.scales
    assert all(torch.equal(p, q.to(dtype)) for p, q in zip(half.parameters(), ref.parameters(), strict=True))
    # and close to the float32 run on the original weights (tolerance measured, see TOL)
    if method in TOL:
        r32 = _run(m32, (x, y), method)
        err = max(abs(math.log(r.scales[k] / r32.scales[k])) for k in r.scales if r32.scales[k] > 0)
        assert err < TOL[method], err


def test_half_model_with_frozen_half_tensors_and_float32_inputs():
    """Frozen half-precision parameters and float32 batches are cast like the rest."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).to(torch.bfloat16)
    net[2].weight.requires_grad_(False)
    frozen = net[2].weight.clone()
    batch = (torch.randn(12, 6), torch.randint(0, 3, (12,)))  # float32 inputs to a bfloat16 model
    r = initopt.initialize_(net, batch, "metainit", steps=3, progress=False)
    assert "2.weight" not in r.scales and torch.equal(net[2].weight, frozen)
    assert all(p.dtype == torch.bfloat16 for p in net.parameters())
    q = initopt.gradient_quotient(net, batch)  # the diagnostics run on float32 copies too
    assert math.isfinite(q.gq)


def test_metainit_on_float16_does_not_overflow():
    """In float16 the gradient quotient's 1/(g + 1e-5) overflows at the first step; on the float32
    copies it does not, and MetaInit lowers GQ as in float32."""
    torch.manual_seed(0)
    net = zoo.mlp(depth=4, width=32, in_features=16)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim >= 2:
                p.mul_(0.25)
    net = net.half()
    batch = (torch.randn(32, 16).half(), torch.randint(0, 10, (32,)))
    r = initopt.initialize_(net, batch, "metainit", steps=60, progress=False)
    assert r.after["gq"] < r.before["gq"]
    assert all(p.dtype == torch.float16 for p in net.parameters())


class _CastsInside(nn.Module):
    """Casts its input to bfloat16 inside forward: cannot be evaluated on float32 copies."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x.to(torch.bfloat16))


class _NoHalfDoubleBackward(torch.autograd.Function):
    """tanh whose double backward is missing in half precision, with PyTorch's message for it."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return _Grad.apply(g, y)


class _Grad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, y):
        ctx.half = g.dtype == torch.float16
        ctx.save_for_backward(g, y)
        return g * (1 - y * y)

    @staticmethod
    def backward(ctx, gg):
        g, y = ctx.saved_tensors
        if ctx.half:
            raise RuntimeError("\"tanh_backward_backward\" not implemented for 'Half'")
        return gg * (1 - y * y), gg * g * (-2 * y)


class _HalfKernelNet(nn.Module):
    """Computes its activation in float16 (as an autocast region would) with that kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        return self.b(_NoHalfDoubleBackward.apply(h.half()).to(h.dtype))


@pytest.mark.parametrize("method", ["gradinit", "metainit", "nio"])
def test_half_kernels_that_fail_are_a_precision_error_naming_the_dtype(method):
    torch.manual_seed(0)
    net = _CastsInside().to(torch.bfloat16)
    before = snapshot(net)
    batch = (torch.randn(8, 4, dtype=torch.bfloat16), torch.randint(0, 3, (8,)))
    with pytest.raises(initopt.PrecisionError, match=r"bfloat16.*float32 copy"):
        initopt.initialize_(net, batch, method, steps=2, progress=False)
    assert_same(before, snapshot(net))
    if method == "gradinit":  # its double backward runs only in constraint steps
        return
    # a kernel with no float16 double backward, reached in the search (the forward works)
    torch.manual_seed(0)
    net = _HalfKernelNet()
    before = snapshot(net)
    kw = {"num_splits": 2} if method == "nio" else {}
    with pytest.raises(initopt.PrecisionError, match=r"float16.*tanh_backward_backward.*in float32"):
        initopt.initialize_(net, (torch.randn(8, 4), torch.randint(0, 3, (8,))), method, steps=2, progress=False, **kw)
    assert_same(before, snapshot(net))
    assert issubclass(initopt.PrecisionError, initopt.InitOptError)


def test_the_suggested_workaround_runs():
    """Search a float32 copy, fold its scales into the half-precision model."""
    torch.manual_seed(0)
    net = _CastsInside()
    half = copy.deepcopy(net).to(torch.bfloat16)
    ref = copy.deepcopy(half).float()
    ref.forward = lambda x: ref.lin(x)  # the float32 copy computes in float32
    batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    result = initopt.initialize_(ref, batch, "gradinit", steps=3, progress=False)
    initopt.apply_scales_(half, result.scales)
    assert half.lin.weight.dtype == torch.bfloat16
    assert torch.equal(half.lin.weight, ref.lin.weight.to(torch.bfloat16))
    assert F.mse_loss(half.lin.bias.float(), ref.lin.bias).item() < 1e-4


def test_a_float32_model_given_half_precision_data_is_a_data_error_as_before():
    net = nn.Linear(4, 3)
    with pytest.raises(initopt.DataError, match="could not take the first batch"):
        initopt.initialize_(net, (torch.randn(8, 4).half(), torch.randint(0, 3, (8,))), "gradinit", steps=1)
