"""The bilinear conv/linear algebra against plain autograd in float64, to third order."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from initopt.core import bilinear
from initopt.core.bilinear import ProjectedWeightGrads
from initopt.core.quotient import gradient_and_hvp, quotient_sums

LAYERS = [
    ("linear", lambda: nn.Linear(5, 4), (3, 5)),
    ("linear_3d_input", lambda: nn.Linear(5, 4), (2, 3, 5)),
    ("conv1d", lambda: nn.Conv1d(2, 3, 3, padding=1), (2, 2, 7)),
    ("conv2d_stride_dilation", lambda: nn.Conv2d(2, 4, 3, stride=2, padding=2, dilation=2), (2, 2, 7, 6)),
    ("conv2d_groups_nobias", lambda: nn.Conv2d(4, 6, 3, groups=2, bias=False), (2, 4, 5, 5)),
    ("conv2d_circular", lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"), (2, 2, 5, 5)),
    ("conv3d", lambda: nn.Conv3d(2, 2, 2, stride=(1, 2, 1)), (1, 2, 4, 5, 3)),
    # fan-in 3 x 3 x 3 < DIRECTION_MIN_FAN_IN: the unfold-and-multiply forward kernel
    ("conv2d_small_fan_in", lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (2, 3, 6, 6)),
    ("conv2d_wide_fan_in", lambda: nn.Conv2d(8, 3, 3, padding=1), (2, 8, 5, 5)),
]


def _call(layer, w, b, x):
    params = {"weight": w} if b is None else {"weight": w, "bias": b}
    return torch.func.functional_call(layer, params, (x,), strict=False)


@pytest.mark.parametrize("name,make,shape", LAYERS, ids=[c[0] for c in LAYERS])
def test_forward_and_three_orders_of_derivatives_equal_autograd(name, make, shape):
    torch.manual_seed(0)
    layer = make().double()
    x0 = torch.randn(*shape, dtype=torch.float64)
    has_bias = layer.bias is not None

    def run(fast: bool):
        w = layer.weight.detach().clone().requires_grad_(True)
        b = layer.bias.detach().clone().requires_grad_(True) if has_bias else None
        x = x0.clone().requires_grad_(True)
        leaves = [t for t in (x, w, b) if t is not None]
        pwg = ProjectedWeightGrads([w])
        if fast:
            with pwg.intercept():
                y = _call(layer, w, b, x)
        else:
            y = _call(layer, w, b, x)
        loss = torch.tanh(y).pow(2).sum()
        g = torch.autograd.grad(loss, leaves, create_graph=True)
        hg = torch.autograd.grad(g, leaves, grad_outputs=g, create_graph=True)
        third = torch.autograd.grad(sum((h * h).sum() for h in hg) + sum((a**3).sum() for a in g), leaves)
        return [y.detach()] + [t.detach() for t in (*g, *hg, *third)]

    for a, b in zip(run(False), run(True), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_gradcheck_and_gradgradcheck_of_the_algebra():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1).double()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    w = conv.weight.detach().clone().requires_grad_(True)
    pwg = ProjectedWeightGrads([w])

    def f(x, w):
        with pwg.intercept():
            return _call(conv, w, conv.bias.detach(), x)

    assert torch.autograd.gradcheck(f, (x, w))
    assert torch.autograd.gradgradcheck(f, (x, w))


def _gq_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(inplace=True),  # the first conv's output is overwritten in place
        nn.Conv2d(3, 4, 3, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(16, 3),
    ).double()


def _scale_grads(model, x, y, alpha, project: bool):
    """dGQ/dalpha_j for theta_j = alpha_j W0_j: Euler scalars, or plain autograd contracted with W0."""
    names = [n for n, _ in model.named_parameters()]
    w0 = [p.detach().clone() for p in model.parameters()]
    theta = [(w * a).requires_grad_(True) for w, a in zip(w0, alpha, strict=True)]
    pwg = ProjectedWeightGrads(theta)
    with pwg.intercept():
        out = torch.func.functional_call(model, dict(zip(names, theta, strict=True)), (x,))
    g, hg = gradient_and_hvp(F.cross_entropy(out, y), theta, create_graph=True)
    gq = quotient_sums(g, hg).sum() / sum(t.numel() for t in theta)
    if project:
        return pwg.scale_gradient(gq, theta, w0, alpha)
    return ProjectedWeightGrads.contract(torch.autograd.grad(gq, theta), w0)


def test_euler_scale_gradients_equal_plain_autograd():
    model = _gq_model()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 2, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g)
    alpha = torch.tensor([1.3, 0.7, 0.9, 1.1, 0.8, 0.0], dtype=torch.float64)  # a bias at scale 0
    exact = _scale_grads(model, x, y, alpha, project=False)
    euler = _scale_grads(model, x, y, alpha, project=True)
    torch.testing.assert_close(euler, exact, rtol=1e-10, atol=1e-14)
    assert torch.all(exact != 0)


def test_inside_projecting_registered_weights_get_no_gradient_from_the_algebra():
    torch.manual_seed(0)
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    pwg = ProjectedWeightGrads([w])
    x = torch.randn(5, 4, dtype=torch.float64)
    with pwg.intercept():
        y = F.linear(x, w, b)
    loss = y.pow(2).sum() + (w**2).sum()  # the second term is outside the algebra
    with pwg.projecting():
        gw, gb, ge = torch.autograd.grad(loss, [w, b, pwg._euler[id(w)]])
    torch.testing.assert_close(gw, 2 * w.detach())
    torch.testing.assert_close(gb, 2 * y.detach().sum(0))
    torch.testing.assert_close(ge, 2 * (y * (y - b)).sum().detach())


def test_tied_weight_used_by_linear_and_embedding():
    torch.manual_seed(0)
    emb = torch.randn(6, 4, dtype=torch.float64)
    ids = torch.tensor([[0, 2, 5], [1, 1, 3]])

    def scale_grad(project: bool) -> torch.Tensor:
        w = (emb * 0.7).requires_grad_(True)
        pwg = ProjectedWeightGrads([w])
        with pwg.intercept():
            logits = F.linear(torch.tanh(F.embedding(ids, w)), w)
        loss = F.cross_entropy(logits.reshape(-1, 6), ids.roll(1).reshape(-1))
        g, hg = gradient_and_hvp(loss, [w], create_graph=True)
        gq = quotient_sums(g, hg).sum()
        if project:
            return pwg.scale_gradient(gq, [w], [emb], torch.tensor([0.7], dtype=torch.float64))
        return ProjectedWeightGrads.contract(torch.autograd.grad(gq, [w]), [emb])

    torch.testing.assert_close(scale_grad(True), scale_grad(False), rtol=1e-10, atol=1e-14)


def test_only_registered_weights_and_numeric_padding_are_intercepted():
    torch.manual_seed(0)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    other = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    pwg = ProjectedWeightGrads([w])
    with pwg.intercept():
        y_reg = F.conv2d(x, w, padding=1)
        y_other = F.conv2d(x, other, padding=1)
        y_same = F.conv2d(x, w, padding="same")
        y_view = F.conv2d(x, w[:, :, :, :], padding=1)
    assert type(y_reg.grad_fn).__name__ == "_FwdBackward"
    assert type(y_other.grad_fn).__name__ != "_FwdBackward"
    assert type(y_same.grad_fn).__name__ != "_FwdBackward"
    assert type(y_view.grad_fn).__name__ != "_FwdBackward"
    torch.testing.assert_close(y_reg, y_same)
    assert pwg.projecting_now is False
    with pwg.projecting():
        assert pwg.projecting_now is True
    assert pwg.projecting_now is False


def test_zero_weight_gives_zero_not_nan():
    w = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    pwg = ProjectedWeightGrads([w])
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    with pwg.intercept():
        y = F.linear(x, w)
    d = pwg.scale_gradient((y + 1).pow(2).sum(), [w], [w.detach()], torch.zeros(1, dtype=torch.float64))
    assert d.tolist() == [0.0]


@pytest.mark.parametrize("name,make,shape", LAYERS, ids=[c[0] for c in LAYERS])
def test_first_order_backward_equals_autograd(name, make, shape):
    """Without a graph to build, the backward takes both gradients in one kernel call."""
    torch.manual_seed(0)
    layer = make().double()
    x0 = torch.randn(*shape, dtype=torch.float64)
    outs = []
    for fast in (False, True):
        w = layer.weight.detach().clone().requires_grad_(True)
        x = x0.clone().requires_grad_(True)
        pwg = ProjectedWeightGrads([w])
        with pwg.intercept() if fast else contextlib.nullcontext():
            y = _call(layer, w, layer.bias, x)
        outs.append(torch.autograd.grad(torch.tanh(y).pow(2).sum(), [x, w]))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("im2col", [True, False])
def test_small_fan_in_forward_kernel_either_way(monkeypatch, im2col):
    """The small-fan-in forward takes the kernel timed faster (either one gives the same)."""
    monkeypatch.setattr(bilinear._Conv, "_time_im2col", lambda self, x, w: im2col)
    monkeypatch.setattr(bilinear, "_IM2COL_FASTER", {})
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    w = conv.weight.detach().clone()
    pwg = ProjectedWeightGrads([w])
    with pwg.intercept():
        y = _call(conv, w, None, x)
    torch.testing.assert_close(y, F.conv2d(x, w, conv.bias, padding=1), rtol=1e-12, atol=1e-13)
    k = bilinear._Conv(2, 1, 1, 1, 1)
    assert k._im2col(x, w) is im2col and len(bilinear._IM2COL_FASTER) == 1  # timed once per shape
    assert not k._im2col(x, torch.zeros(5, 8, 3, 3, dtype=torch.float64))  # fan-in 72: never


@pytest.mark.parametrize("slow", ["im2col", "onednn"])
def test_small_fan_in_timing_picks_the_faster_kernel(monkeypatch, slow):
    """The timing decides: whichever kernel is made 20 ms slower loses."""
    import time
    import types

    def slowed(f):
        def g(*a, **k):
            time.sleep(0.02)
            return f(*a, **k)

        return g

    if slow == "im2col":
        monkeypatch.setattr(torch._C._nn, "thnn_conv2d", slowed(torch._C._nn.thnn_conv2d))
    else:
        monkeypatch.setattr(bilinear, "_aten", types.SimpleNamespace(convolution=slowed(torch.ops.aten.convolution)))
    k = bilinear._Conv(2, 1, 1, 1, 1)
    assert k._time_im2col(torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)) is (slow == "onednn")


def _direction_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # fan-in 27: keeps the weight-gradient kernel
        nn.Tanh(),
        nn.Conv2d(8, 4, 3, stride=2),  # fan-in 72: one forward kernel with the direction
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(16, 3),
    ).double()


@pytest.mark.parametrize("order", [1, 2])
def test_direction_scale_gradients_equal_plain_autograd(order):
    """<dJ/dtheta', W0> at theta' = alpha W0 - delta (GradInit's look-ahead; order 2: a
    gradient-norm objective through the same point)."""
    model = _direction_model()
    names = [n for n, _ in model.named_parameters()]
    w0 = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g)
    alpha = torch.tensor([1.3, 0.7, 0.9, 1.1, 0.8, 1.2], dtype=torch.float64)
    delta = [0.05 * torch.randn(w.shape, generator=g, dtype=torch.float64) for w in w0]

    def objective(fast: bool) -> torch.Tensor:
        moved = [(w * a - d).requires_grad_(True) for w, a, d in zip(w0, alpha, delta, strict=True)]
        pwg = ProjectedWeightGrads(moved, directions=w0)
        with pwg.intercept() if fast else contextlib.nullcontext():
            out = torch.func.functional_call(model, dict(zip(names, moved, strict=True)), (x,))
        loss = F.cross_entropy(out, y)
        if order == 2:
            gr = torch.autograd.grad(loss, moved, create_graph=True)
            loss = sum((t**2).sum() for t in gr)
        if fast:
            return pwg.scale_gradient(loss, moved, w0, alpha)
        return ProjectedWeightGrads.contract(torch.autograd.grad(loss, moved), w0)

    exact, fast = objective(False), objective(True)
    torch.testing.assert_close(fast, exact, rtol=1e-10, atol=1e-14)
    assert torch.all(exact != 0)


def test_direction_shape_must_match():
    w = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="direction of shape"):
        ProjectedWeightGrads([w], directions=[torch.zeros(4, 3)])


def test_flop_counting_sees_the_canonical_convolution():
    """Under a dispatch mode the small-fan-in forward is aten's convolution, which
    torch.utils.flop_counter can count (it cannot count thnn_conv2d's kernel)."""
    from torch.utils.flop_counter import FlopCounterMode

    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    w = conv.weight.detach().clone().requires_grad_(True)
    pwg = ProjectedWeightGrads([w])
    fc = FlopCounterMode(display=False)
    with fc, pwg.intercept():
        y = _call(conv, w, None, x)
    assert fc.get_total_flops() == 2 * y.numel() * 27
