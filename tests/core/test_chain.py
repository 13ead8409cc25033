"""Chains of linear layers: g and Hg written out, against the dense float64 Hessian and against
autograd's nested backward passes; what is and is not read as a chain."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from initopt.core import Evaluator, ScaleSpace, Task
from initopt.core.chain import ACTIVATIONS, Chain
from initopt.core.quotient import gradient_terms, quotient_sums
from initopt.methods.metainit import MetaInit

ACTS = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


def test_every_activation_of_the_table_is_tested():
    assert {type(make()) for make in ACTS.values()} == set(ACTIVATIONS)


def _net(act) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(6, 5),
        act(),
        nn.Linear(5, 4, bias=False),
        act(),
        nn.Linear(4, 3),
    ).double()


def _batch(seed: int = 1, n: int = 7, ignore: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    if ignore:
        y[2] = -100  # F.cross_entropy's ignore index: not counted in the mean
    return x, y


def _chain(model: nn.Module) -> tuple[Chain, ScaleSpace]:
    space = ScaleSpace(model)
    chain = Chain.of(model, space, Task())
    assert chain is not None
    return chain, space


@pytest.mark.parametrize("act", list(ACTS))
def test_gradient_and_hvp_equal_the_dense_hessian(act):
    """g and Hg against the dense Hessian of the loss as a function of the flat parameters."""
    model = _net(ACTS[act])
    if act == "relu":  # biases that keep some units dead on part of the batch
        with torch.no_grad():
            model[1].bias.copy_(torch.tensor([0.3, -0.4, 0.1, -0.2, 0.5]))
    chain, space = _chain(model)
    batch = _batch()
    assert chain.accepts(batch)
    theta = space.leaves(space.ones())
    loss, g, hg = chain.terms(theta, batch)

    shapes = [t.shape for t in theta]
    sizes = [t.numel() for t in theta]
    names = space.names

    def f(flat: torch.Tensor) -> torch.Tensor:
        parts = [t.reshape(s) for t, s in zip(torch.split(flat, sizes), shapes, strict=True)]
        out = torch.func.functional_call(model, dict(zip(names, parts, strict=True)), (batch[0],))
        return F.cross_entropy(out, batch[1])

    flat = torch.cat([t.detach().reshape(-1) for t in theta])
    grad = torch.func.grad(f)(flat)
    hess = torch.autograd.functional.hessian(f, flat)
    assert float(loss) == pytest.approx(float(f(flat)), rel=1e-14)
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in g]), grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in hg]), hess @ grad, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("act", list(ACTS))
def test_derivative_of_the_quotient_equals_nested_autograd(act):
    """The derivative of GQ through the written-out terms equals the one through autograd's
    nested backward passes (third derivatives included: tanh has phi'' != 0)."""
    model = _net(ACTS[act])
    chain, space = _chain(model)
    ev = Evaluator(model, space, Task())
    batch = _batch(seed=3)
    theta = space.leaves(torch.linspace(0.7, 1.3, len(space), dtype=torch.float64))
    _, g, hg = chain.terms(theta, batch)
    ours = torch.autograd.grad(quotient_sums(g, hg).sum(), theta)
    ref_terms = gradient_terms(ev.loss(theta, batch), theta, create_graph=True)
    ref = torch.autograd.grad(quotient_sums(ref_terms.g, ref_terms.hg).sum(), theta)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * float(b.abs().max()))


def test_metainit_objective_is_the_same_with_and_without_the_chain(monkeypatch):
    model = _net(nn.ReLU)
    space = ScaleSpace(model)
    ev = Evaluator(model, space, Task())
    batch = _batch(seed=5, ignore=False)
    alpha = torch.linspace(0.8, 1.2, len(space), dtype=torch.float64)
    mi = MetaInit()
    blocks = mi.tuned(space)
    assert mi._chain(ev, batch) is not None
    fast = mi.objective(ev, space, alpha, batch, blocks)
    monkeypatch.setattr(MetaInit, "_chain", lambda self, ev, batch: None)
    plain = mi.objective(ev, space, alpha, batch, blocks)
    for a, b in zip(fast, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=0)


def test_metainit_keeps_autograd_where_layers_reach_the_projection_threshold():
    model = _net(nn.ReLU)
    ev = Evaluator(model, ScaleSpace(model), Task())
    batch = _batch()
    assert MetaInit(projected_min_macs=1 << 23)._chain(ev, batch) is not None
    assert MetaInit(projected_min_macs=7 * 6 * 5)._chain(ev, batch) is None  # the first layer: 7 x 6 x 5
    assert MetaInit(projected_min_macs=0, projected_grads=False)._chain(ev, batch) is not None


class _Sub(nn.ReLU):
    pass


def _tied() -> nn.Module:
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    m[2].weight = m[0].weight
    return m.double()


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 3)),  # not in the table
        lambda: nn.Sequential(nn.Linear(4, 4), _Sub(), nn.Linear(4, 3)),  # subclasses may change forward
        lambda: nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)),
        lambda: nn.Sequential(nn.Linear(4, 4), nn.ReLU()),  # the logits are not a linear layer's
        lambda: nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(4, 3)),  # mismatched shapes
        lambda: nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(4, 3)),  # a Flatten that is not first
        _tied,
        lambda: nn.ModuleList([nn.Linear(4, 3)]),
    ],
)
def test_what_is_not_a_chain(make):
    model = make().double()
    assert Chain.of(model, ScaleSpace(model), Task()) is None


def test_frozen_tensors_hooks_and_user_losses_are_not_chains():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    assert Chain.of(model, ScaleSpace(model), Task()) is not None
    assert Chain.of(model, ScaleSpace(model), Task(loss_fn=lambda out, b: out.sum())) is None
    assert Chain.of(model, ScaleSpace(model), Task(forward_fn=lambda m, b: m(b[0]))) is None
    assert Chain.of(model, ScaleSpace(model, params=["0.weight", "2.weight", "2.bias"]), Task()) is None
    handle = model[1].register_forward_hook(lambda m, i, o: o * 2)
    assert Chain.of(model, ScaleSpace(model), Task()) is None
    handle.remove()
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        assert Chain.of(model, ScaleSpace(model), Task()) is None
    finally:
        handle.remove()


def test_batches_a_chain_does_not_run_on():
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    chain, _ = _chain(model)
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    assert chain.accepts((x, y))
    assert chain.accepts([x, y, "extra"])
    assert not chain.accepts({"x": x, "y": y})
    assert not chain.accepts((x,))
    assert not chain.accepts((x.float(), y))  # another dtype than the weights
    assert not chain.accepts((x, y.double()))  # regression targets
    assert not chain.accepts((x, y[:4]))
    assert not chain.accepts((x.reshape(5, 2, 3), y))  # no Flatten: the layer would act per row
    assert not chain.accepts((torch.randn(5, 7, dtype=torch.float64), y))
    assert not chain.accepts((x, torch.randint(0, 3, (5, 1))))
