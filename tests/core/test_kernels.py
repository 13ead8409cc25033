"""The fast 2x2 max pooling against F.max_pool2d: identical values, indices and gradients."""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from initopt.core import kernels
from initopt.core.bilinear import ProjectedWeightGrads
from initopt.core.kernels import _pool, max_pool2d_2x2, pool_call


def _inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 6, 8, generator=g, dtype=torch.float64)
    relu = x.clamp_min(0)  # windows of zeros: ties everywhere
    diag = x.clone()
    diag[:, :, 0::2, 1::2] = diag[:, :, 1::2, 0::2]  # (0,1) ties (1,0): raster order picks (0,1)
    rows = x.clone()
    rows[:, :, 1::2, :] = rows[:, :, 0::2, :]  # every column tied across the two rows
    const = torch.full((2, 2, 4, 4), 1.5, dtype=torch.float64)
    ints = torch.randint(0, 3, (2, 3, 6, 6), generator=g).double()  # many ties of every kind
    return [x, relu, diag, rows, const, ints, x.float()]


@pytest.mark.parametrize("i", range(7))
def test_values_indices_and_gradients_equal_pytorch(i):
    x = _inputs()[i]
    y0, idx0 = F.max_pool2d(x, 2, return_indices=True)
    y, idx = _pool(x, with_index=True)
    assert torch.equal(y, y0) and torch.equal(idx, idx0)
    assert torch.equal(max_pool2d_2x2(x), y0)  # no grad: values only

    g = torch.randn(y0.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(1))
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    ga = torch.autograd.grad(F.max_pool2d(a, 2), a, g, create_graph=True)[0]
    gb = torch.autograd.grad(max_pool2d_2x2(b), b, g, create_graph=True)[0]
    assert torch.equal(ga, gb)
    # double backward through the gradient (PyTorch's own kernels on both sides)
    w = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(2))
    gga = torch.autograd.grad((ga * w).sum() + F.max_pool2d(a, 2).pow(3).sum(), a)[0]
    ggb = torch.autograd.grad((gb * w).sum() + max_pool2d_2x2(b).pow(3).sum(), b)[0]
    assert torch.equal(gga, ggb)


def test_gradcheck_and_gradgradcheck():
    x = torch.randn(2, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(max_pool2d_2x2, (x,))
    assert torch.autograd.gradgradcheck(max_pool2d_2x2, (x,))


def test_nan_propagates():
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    x[0, 0, 1, 0] = float("nan")
    assert torch.isnan(max_pool2d_2x2(x)[0, 0, 0, 0])
    assert not torch.isnan(max_pool2d_2x2(x)[0, 0, 1, 1])


@pytest.mark.parametrize(
    "args,kwargs",
    [
        ((3,), {}),
        ((2,), {"stride": 1}),
        ((2,), {"padding": 1}),
        ((2,), {"dilation": 2}),
        ((2,), {"ceil_mode": True}),
        ((2,), {"return_indices": True}),
        (((2, 3),), {}),
    ],
)
def test_other_pools_are_not_covered(args, kwargs):
    x = torch.randn(1, 2, 6, 6)
    assert pool_call(F.max_pool2d, (x, *args), kwargs) is NotImplemented


@pytest.mark.parametrize(
    "x",
    [
        torch.randn(1, 2, 5, 6),  # odd height
        torch.randn(1, 2, 6, 6).contiguous(memory_format=torch.channels_last),
        torch.randn(2, 6, 6),  # unbatched
        torch.randn(1, 2, 6, 6).half(),
    ],
    ids=["odd", "channels_last", "unbatched", "half"],
)
def test_other_inputs_are_not_covered(x):
    assert pool_call(F.max_pool2d, (x, 2), {}) is NotImplemented
    assert pool_call(F.avg_pool2d, (torch.randn(1, 2, 6, 6), 2), {}) is NotImplemented
    with pytest.raises(ValueError, match="contiguous 4-d float CPU tensor"):
        max_pool2d_2x2(x)


def test_the_algebra_pools_through_it_with_the_same_result():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.MaxPool2d(3, 1), nn.Flatten()
    ).double()
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    outs = []
    for fast in (False, True):
        leaves = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
        pwg = ProjectedWeightGrads(leaves[:1])
        with (
            mock.patch.object(kernels, "_pool", wraps=kernels._pool) as spy,
            pwg.intercept() if fast else contextlib.nullcontext(),
        ):
            y = torch.func.functional_call(model, dict(zip(names, leaves, strict=True)), (x,))
        assert spy.call_count == int(fast)  # the 2x2 pool only; the 3x3 one is PyTorch's
        g = torch.autograd.grad(y.pow(2).sum(), leaves)
        outs.append([y.detach(), *g])
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
