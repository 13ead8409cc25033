"""GradCosine engines against explicit per-example / per-sub-batch loops in float64."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import initopt
from initopt import zoo
from initopt.core import Evaluator, ScaleSpace, Task, evaluation, search_mode, split_batch
from initopt.core import cosine as C


def _cls(n, *shape, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


class _Convs(nn.Module):
    """Strided, dilated and grouped 2-D convolutions, a 1-D convolution, a linear layer applied
    to a sequence (positions), and a module called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=3)
        self.c3 = nn.Conv1d(6, 4, 3, padding="same", bias=False)
        self.seq = nn.Linear(4, 5)
        self.head = nn.Linear(5, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.c2(torch.tanh(self.c1(x))))
        h = torch.tanh(self.c3(h.flatten(2)))  # (B, 4, L)
        h = torch.tanh(self.seq(h.transpose(1, 2)))  # (B, L, 5)
        h = self.seq(h[..., :4]) + h  # the same layer a second time
        return self.head(h.mean(1))


MODELS = {
    "mlp": (lambda: zoo.mlp(depth=3, width=12, in_features=7), lambda s: _cls(6, 7, seed=s)),
    "convs": (_Convs, lambda s: _cls(5, 3, 8, 8, seed=s)),
    "cnn_bn": (lambda: zoo.cnn(channels=(4, 6), batchnorm=True), lambda s: _cls(6, 3, 8, 8, seed=s)),
    "transformer": (
        lambda: zoo.post_ln_transformer(d_model=8, layers=1, dropout=0.0),
        lambda s: (
            torch.randint(0, 32, (5, 6), generator=torch.Generator().manual_seed(s)),
            torch.randint(0, 4, (5,), generator=torch.Generator().manual_seed(s + 1)),
        ),
    ),
    "tied_lm": (
        lambda: zoo.tied_lm(d_model=8, hidden=12),
        lambda s: (lambda ids: {"input_ids": ids, "labels": torch.roll(ids, -1, dims=1)})(
            torch.randint(0, 32, (5, 6), generator=torch.Generator().manual_seed(s))
        ),
    ),
}


def _model(name):
    torch.manual_seed(0)
    m = MODELS[name][0]().double()
    with torch.no_grad():  # non-trivial norm-layer parameters
        for mod in m.modules():
            if isinstance(mod, (nn.BatchNorm2d, nn.LayerNorm)):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
    return m


def _loss(model, batch):
    if isinstance(batch, dict):
        return model(**batch)["loss"]
    return F.cross_entropy(model(batch[0]), batch[1])


def _grads(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(_loss(model, batch), params, allow_unused=True)
    return torch.cat(
        [(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads, strict=True)]
    )


def _loop_gram(model, parts, train):
    """Explicit loop: one forward and backward per group on a copy of the model."""
    m = copy.deepcopy(model).train(train)
    g = torch.stack([_grads(m, p) for p in parts])
    return g @ g.T


def _loop_gc(gram, eps=1e-8):
    d = gram.shape[0]
    n = gram.diagonal().sqrt()
    total = sum(gram[k, l] / (n[k] * n[l] + eps) for k in range(d) for l in range(d) if k != l)
    return total / (d * (d - 1)), n


# ---- GC from the Gram matrix -------------------------------------------------------------


def test_cosine_from_gram_equals_pairwise_cosines():
    g = torch.randn(5, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    gc, norms = C.cosine_from_gram(g @ g.T, eps=0.0)
    cos = [F.cosine_similarity(g[k], g[l], dim=0) for k in range(5) for l in range(5) if k != l]
    torch.testing.assert_close(gc, torch.stack(cos).mean())
    torch.testing.assert_close(norms, g.norm(dim=1))


def test_zero_group_gradient_gives_finite_gc_and_gradient():
    g = torch.randn(3, 4, dtype=torch.float64)
    g[1] = 0
    g.requires_grad_(True)
    gc, norms = C.cosine_from_gram(C.gram_of([[r] for r in g]), eps=1e-8)
    assert torch.isfinite(gc) and norms[1] == 0
    (dg,) = torch.autograd.grad(-gc - norms.mean(), g)
    assert torch.isfinite(dg).all()
    with pytest.raises(ValueError):
        C.cosine_from_gram(torch.ones(1, 1))


def _cosine_by_autograd(gram, eps):
    """GC and norms written out elementwise; autograd differentiates them (0 where a norm is 0)."""
    d = gram.shape[0]
    diag = gram.diagonal()
    pos = diag > 0
    n = torch.where(pos, torch.where(pos, diag, torch.ones_like(diag)).sqrt(), torch.zeros_like(diag))
    total = sum(gram[k, l] / (n[k] * n[l] + eps) for k in range(d) for l in range(d) if k != l)
    return total / (d * (d - 1)), n


@pytest.mark.parametrize("zero_row", [None, 2])
@pytest.mark.parametrize("eps", [1e-8, 0.3])
def test_cosine_backward_equals_autograd_of_the_formula(zero_row, eps):
    """cosine_from_gram's hand-written backward against autograd of the elementwise formula, in
    float64, for a non-symmetric upstream and a Gram matrix with a zero group gradient."""
    g = torch.Generator().manual_seed(3)
    m = torch.randn(5, 7, generator=g, dtype=torch.float64)
    if zero_row is not None:
        m[zero_row] = 0
    gram0 = m @ m.T + 0.1 * torch.randn(5, 5, generator=g, dtype=torch.float64).triu(1)  # not symmetric
    u, v = torch.randn((), generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    grads = []
    for fn in (C.cosine_from_gram, _cosine_by_autograd):
        gram = gram0.clone().requires_grad_(True)
        gc, norms = fn(gram, eps)
        (dg,) = torch.autograd.grad(u * gc + (v * norms).sum(), gram)
        grads.append((gc.detach(), norms.detach(), dg))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert torch.isfinite(grads[0][2]).all()
    if zero_row is None:
        gram = gram0.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda t: C.cosine_from_gram(t, eps), (gram,))


def test_zero_subbatch_gradient_through_the_engine_is_finite():
    """A loss weight of 0 on the second sub-batch makes its gradient exactly 0."""
    torch.manual_seed(0)
    model = zoo.mlp(depth=2, width=8, in_features=5).double()
    x, y = _cls(8, 5)
    w = torch.cat([torch.ones(4), torch.zeros(4)]).double()

    def loss_fn(out, batch):
        return (F.cross_entropy(out, batch[1], reduction="none") * batch[2]).mean()

    space = ScaleSpace(model)
    ev = Evaluator(model, space, Task(loss_fn=loss_fn))
    with search_mode(model):
        plan = C.build_plan(ev, (x, y, w))
        alpha = space.ones().requires_grad_(True)
        gram, _ = C.subbatch_gram(ev, alpha, split_batch((x, y, w), 2), plan=plan, create_graph=True)
        gc, norms = C.cosine_from_gram(gram)
        (da,) = torch.autograd.grad(-gc - norms.mean(), alpha)
    assert norms[1] == 0 and torch.isfinite(gc) and torch.isfinite(da).all()
    res = initopt.initialize_(model, (x, y, w), "nio", loss_fn=loss_fn, num_splits=2, steps=2)
    assert all(torch.isfinite(torch.tensor(list(res.scales.values()))))


# ---- sample-wise GC: per-example gradients ----------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("accelerate", [True, False])
def test_sample_gram_equals_per_example_loop(name, accelerate):
    model = _model(name)
    batch = MODELS[name][1](1)
    n = initopt.core.batch_size(batch)
    ref = _loop_gram(model, split_batch(batch, n), train=False)
    with evaluation(model, mode="eval") as ev:
        plan = C.build_plan(ev, batch) if accelerate else C.GramPlan.plain(ev)
        gram, used = C.sample_gram(ev, ev.space.ones(), batch, plan=plan, chunk_size=2)
    torch.testing.assert_close(gram, ref, rtol=1e-10, atol=1e-12)
    if accelerate and name in ("mlp", "convs", "cnn_bn"):
        assert len(used.layers) == sum(isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) for m in model.modules())


class _Norms(nn.Module):
    """Every accelerated norm layer: GroupNorm, BatchNorm2d (running statistics), LayerNorm over
    positions, BatchNorm1d on vectors, and a LayerNorm without shift."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.gn = nn.GroupNorm(3, 6)
        self.bn = nn.BatchNorm2d(6)
        self.seq = nn.Linear(6, 5)
        self.ln = nn.LayerNorm(5)
        self.bn1 = nn.BatchNorm1d(5)
        self.ln2 = nn.LayerNorm(5, bias=False)
        self.head = nn.Linear(5, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.bn(self.gn(self.conv(x))))
        h = self.ln(torch.tanh(self.seq(h.flatten(2).transpose(1, 2))))  # (B, positions, 5)
        return self.head(self.ln2(torch.tanh(self.bn1(h.mean(1)))))


FORM_MODELS = {
    "mlp": MODELS["mlp"],
    "convs": MODELS["convs"],
    "cnn_bn": MODELS["cnn_bn"],
    "norms": (_Norms, lambda s: _cls(5, 3, 4, 4, seed=s)),
}


def _norm_model(name):
    if name in MODELS:
        return _model(name)
    torch.manual_seed(0)
    m = _Norms().double().eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
                mod.weight.uniform_(0.5, 1.5)
                if mod.bias is not None:
                    mod.bias.uniform_(-0.5, 0.5)
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
    return m


@pytest.mark.parametrize("name", list(FORM_MODELS))
@pytest.mark.parametrize("form", ["gram", "explicit", None])
@pytest.mark.parametrize("budget", [None, 200])
def test_each_exact_form_forced_on_every_layer_equals_the_loop(monkeypatch, name, form, budget):
    """Both forms, forced on every Linear/Conv layer (strided, dilated, grouped, 1-D 'same',
    linear on vectors and over positions, a layer called twice), and the norm layers, equal
    the explicit loop over examples in float64; a tiny memory budget forces the chunked paths
    (rows of the Gram over positions, output-channel slices of the explicit form)."""
    model = _norm_model(name)
    batch = FORM_MODELS[name][1](4)
    n = initopt.core.batch_size(batch)
    ref = _loop_gram(model, split_batch(batch, n), train=False)
    monkeypatch.setattr(C, "_FORM", form)
    if budget is not None:
        monkeypatch.setattr(C, "_BUDGET", budget)
    with evaluation(model, mode="eval") as ev:
        gram, used = C.sample_gram(ev, ev.space.ones(), batch)
        assert not used.fallback  # every tensor accelerated: nothing left to vmap
        gram2, _ = C.sample_gram(ev, ev.space.ones(), batch, plan=used)  # unchecked, same plan
    torch.testing.assert_close(gram, ref, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(gram2, ref, rtol=1e-10, atol=1e-13)
    gc, norms = C.cosine_from_gram(gram)
    ref_gc, ref_norms = _loop_gc(ref)
    assert abs(float(gc) - float(ref_gc)) < 1e-10
    torch.testing.assert_close(norms, ref_norms, rtol=1e-10, atol=0)
    res = initopt.grad_cosine(model, batch)
    assert abs(res.gc - float(ref_gc)) < 1e-10


def _per_example_layer_grads(layer, x, dz):
    """Reference: g_i = d<dz_i, layer(x_i)>/d(weight, bias), one example at a time."""
    rows = []
    for i in range(x.shape[0]):
        out = layer(x[i : i + 1])
        ps = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
        gs = torch.autograd.grad((out * dz[i : i + 1]).sum(), ps)
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)


LAYERS = {
    "conv2d_stride_pad": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (3, 7, 7)),
    "conv2d_dilation_groups": (lambda: nn.Conv2d(6, 4, 3, padding=2, dilation=2, groups=2), (6, 6, 5)),
    "conv2d_no_bias_rect": (lambda: nn.Conv2d(2, 3, (2, 3), stride=(1, 2), bias=False), (2, 5, 6)),
    "conv1d_same": (lambda: nn.Conv1d(3, 5, 3, padding="same", dilation=2), (3, 9)),
    "conv1d_stride_groups": (lambda: nn.Conv1d(4, 6, 2, stride=2, groups=2), (4, 8)),
    "linear_vectors": (lambda: nn.Linear(5, 3), (5,)),
    "linear_positions": (lambda: nn.Linear(5, 3), (4, 5)),
    "linear_positions_2d": (lambda: nn.Linear(5, 3, bias=False), (2, 3, 5)),
}


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("form", ["gram", "explicit"])
@pytest.mark.parametrize("calls", [1, 2])
def test_layer_forms_equal_per_example_gradients(kind, form, calls):
    """Each form on one layer (called ``calls`` times) against per-example autograd gradients."""
    torch.manual_seed(0)
    make, shape = LAYERS[kind]
    layer = make().double()
    n = 5
    xs = [torch.randn(n, *shape, dtype=torch.float64) for _ in range(calls)]
    dzs = [torch.randn_like(layer(x)) for x in xs]
    ref = sum(_per_example_layer_grads(layer, x, dz) for x, dz in zip(xs, dzs, strict=True))
    cands, _ = C._candidates(_evaluator(layer))
    (ly,) = cands
    gram, gw, gb = C._layer_sample_gram(ly, xs, dzs, form=form)
    torch.testing.assert_close(gram, ref @ ref.T, rtol=1e-10, atol=1e-12)
    k = layer.weight.numel()
    torch.testing.assert_close(gw.reshape(-1), ref[:, :k].sum(0), rtol=1e-10, atol=1e-12)
    if layer.bias is not None:
        torch.testing.assert_close(gb, ref[:, k:].sum(0), rtol=1e-10, atol=1e-12)
    gram2, gw2, gb2 = C._layer_sample_gram(ly, xs, dzs, form=form, sums=False)
    assert gw2 is None and gb2 is None
    torch.testing.assert_close(gram2, gram, rtol=0, atol=0)
    with pytest.raises(ValueError, match="form"):
        C._layer_sample_gram(ly, xs, dzs, form="vmap")


def _evaluator(model):
    space = ScaleSpace(model)
    return Evaluator(model, space, Task())


def test_per_layer_choice_takes_the_cheaper_form(monkeypatch):
    """A wide feature map with few channels costs less explicitly; a 2x2 map with many channels
    costs less as the Gram over positions; dense layers on vectors always take the Gram."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),  # 16x16: T = 256, o = 4, k = 27
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Conv2d(4, 64, 3, padding=1),  # 2x2: T = 4, o = 64, k = 36
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(256, 10),
    ).double()
    n = 8
    big = C._form_costs(n, 256, 4, 27, 1)
    small = C._form_costs(n, 4, 64, 36, 1)
    vec = C._form_costs(n, 1, 10, 256, 1)
    assert big["explicit"] < big["gram"] and small["gram"] < small["explicit"] and vec["gram"] < vec["explicit"]
    chosen = []
    real = C._choose_form

    def spy(costs, form):
        out = real(costs, form)
        chosen.append((out, costs))
        return out

    monkeypatch.setattr(C, "_choose_form", spy)
    batch = _cls(n, 3, 16, 16)
    ref = _loop_gram(model, split_batch(batch, n), train=False)
    with evaluation(model, mode="eval") as ev:
        gram, _ = C.sample_gram(ev, ev.space.ones(), batch)
    torch.testing.assert_close(gram, ref, rtol=1e-10, atol=1e-13)
    assert [c[0] for c in chosen] == ["explicit", "gram", "gram"]
    assert [c[1] for c in chosen] == [big, small, vec]
    for form, costs in chosen:
        assert costs[form] == min(costs.values())


def test_gram_identity_for_a_linear_layer_by_hand():
    """<g_i, g_j> = (d_i . d_j)(a_i . a_j) (+ d_i . d_j for the bias) for z = W a + b."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).double()
    a = torch.randn(6, 4, dtype=torch.float64)
    d = torch.randn(6, 3, dtype=torch.float64)
    ly = C._Layer(lin, "lin", 0, 1, 0)
    got, gw, gb = C._layer_sample_gram(ly, [a], [d])
    per = torch.stack([torch.cat([torch.outer(d[i], a[i]).reshape(-1), d[i]]) for i in range(6)])
    torch.testing.assert_close(got, per @ per.T)
    torch.testing.assert_close(got, (d @ d.T) * (a @ a.T) + d @ d.T)
    torch.testing.assert_close(gw, d.T @ a)
    torch.testing.assert_close(gb, d.sum(0))


# ---- batch-wise GC: sub-batch gradients -------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("accelerate", [True, False])
def test_subbatch_gram_equals_explicit_subbatch_gradients(name, accelerate):
    """BatchNorm in training mode uses each sub-batch's own statistics."""
    model = _model(name)
    batch = MODELS[name][1](3)
    parts = split_batch(batch, 2)
    ref = _loop_gram(model, parts, train=True)
    with evaluation(model, mode="train") as ev:
        plan = C.build_plan(ev, batch, verify_scaling=True) if accelerate else None
        gram, losses = C.subbatch_gram(ev, ev.space.ones(), parts, plan=plan)
    torch.testing.assert_close(gram, ref, rtol=1e-10, atol=1e-12)
    m = copy.deepcopy(model).train()
    torch.testing.assert_close(losses, torch.stack([_loss(m, p) for p in parts]).detach())


def _objective(model, alpha, parts, mu, train=True):
    """-GC - mu * GN at theta = alpha * W0, explicit (no engine), for finite differences."""
    m = copy.deepcopy(model).train(train)
    params = [p for p in m.parameters() if p.requires_grad]
    with torch.no_grad():
        for p, a in zip(params, alpha, strict=True):
            p.mul_(a)
    gc, n = _loop_gc(_loop_gram(m, parts, train))
    return float(-gc - mu * n.mean())


@pytest.mark.parametrize("name", ["mlp", "convs", "cnn_bn"])
def test_scale_gradient_equals_finite_differences(name):
    model = _model(name)
    batch = MODELS[name][1](4)
    parts = split_batch(batch, 3 if name != "convs" else 2)
    space = ScaleSpace(model)
    ev = Evaluator(model, space, Task())
    g = torch.Generator().manual_seed(5)
    alpha0 = 0.8 + 0.4 * torch.rand(len(space), generator=g, dtype=torch.float64)
    grads = {}
    with search_mode(model):
        for accel in (True, False):
            plan = C.build_plan(ev, batch, verify_scaling=True) if accel else None
            a = alpha0.clone().requires_grad_(True)
            gram, _ = C.subbatch_gram(ev, a, parts, plan=plan, create_graph=True)
            gc, norms = C.cosine_from_gram(gram)
            (grads[accel],) = torch.autograd.grad(-gc - 0.5 * norms.mean(), a)
    h = 1e-6
    fd = torch.zeros_like(alpha0)
    for i in range(len(alpha0)):
        e = torch.zeros_like(alpha0)
        e[i] = h
        fd[i] = (_objective(model, alpha0 + e, parts, 0.5) - _objective(model, alpha0 - e, parts, 0.5)) / (2 * h)
    torch.testing.assert_close(grads[True], fd, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("form", ["gram", "explicit", "mixed", None])
def test_fused_dense_forms_equal_explicit_subbatch_gradients(monkeypatch, form):
    """The fused engine's two forms for dense layers (Gram over rows, explicit group
    gradients), forced on every layer or mixed in one node, against per-sub-batch autograd
    gradients at scales away from 1 (two same-shaped layers, one without bias, stacked by the Gram
    form); the scale gradient against plain autograd."""
    if form == "mixed":
        monkeypatch.setattr(C, "_dense_form", lambda n, d, o, k, form=None: "gram" if o == k else "explicit")
    else:
        monkeypatch.setattr(C, "_DENSE_FORM", form)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(7, 9),
        nn.Tanh(),
        nn.Linear(9, 9, bias=False),
        nn.Tanh(),
        nn.Linear(9, 9),
        nn.Tanh(),
        nn.Linear(9, 10),
    ).double()
    batch = _cls(12, 7, seed=2)
    parts = split_batch(batch, 3)
    space = ScaleSpace(model)
    ev = Evaluator(model, space, Task())
    alpha0 = 0.7 + 0.6 * torch.rand(len(space), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        for p, a in zip(scaled.parameters(), alpha0, strict=True):
            p.mul_(a)
    ref = _loop_gram(scaled, parts, train=True)
    grads = {}
    with search_mode(model):
        plan = C.build_plan(ev, batch, verify_scaling=True)
        assert not plan.fallback
        for fused in (True, False):
            a = alpha0.clone().requires_grad_(True)
            gram, _ = C.subbatch_gram(ev, a, parts, plan=plan if fused else None, create_graph=True, fused=fused)
            if fused:
                torch.testing.assert_close(gram, ref, rtol=1e-10, atol=1e-12)
            gc, norms = C.cosine_from_gram(gram)
            (grads[fused],) = torch.autograd.grad(-gc - 0.5 * norms.mean(), a)
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-9, atol=1e-12)


def test_dense_form_choice():
    """Small batches take the Gram over rows, large ones the explicit group gradients."""
    assert C._dense_form(64, 4, 64, 64) == "gram"
    assert C._dense_form(512, 4, 64, 64) == "explicit"
    assert C._dense_form(512, 4, 64, 64, "gram") == "gram"
    with pytest.raises(ValueError):
        C._dense_form(8, 2, 3, 3, "bogus")


# ---- the plan: which layers are accelerated ---------------------------------------------


class _Sneaky(nn.Module):
    """``lin.weight`` is also used outside ``lin``'s own call; ``never`` is only used
    functionally; ``frozen`` runs under ``no_grad``; ``post`` is an ordinary layer."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 5)
        self.post = nn.Linear(5, 5)
        self.never = nn.Linear(5, 5)
        self.frozen = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(x)) + 0.3 * F.linear(x, self.lin.weight)
        h = torch.tanh(F.linear(h, self.never.weight, self.never.bias))
        with torch.no_grad():
            f = self.frozen(x)
        return self.head(torch.tanh(self.post(h)) + h * f)


def test_plan_rejects_layers_it_cannot_reproduce_and_stays_exact():
    torch.manual_seed(0)
    model = _Sneaky().double()
    batch = _cls(6, 5, classes=3)
    with evaluation(model, mode="train") as ev:
        plan = C.build_plan(ev, batch, verify_scaling=True)
        assert set(plan.skipped) == {"lin", "never", "frozen"}
        assert "outside" in plan.skipped["lin"] and "functionally" in plan.skipped["never"]
        assert "without gradient tracking" in plan.skipped["frozen"]
        assert [ly.name for ly in plan.layers] == ["post", "head"]
        gram, _ = C.subbatch_gram(ev, ev.space.ones(), split_batch(batch, 3), plan=plan)
    torch.testing.assert_close(gram, _loop_gram(model, split_batch(batch, 3), train=True))
    with evaluation(model, mode="eval") as ev:
        gram, used = C.sample_gram(ev, ev.space.ones(), batch)
        assert set(used.skipped) == {"lin", "never", "frozen"}
    torch.testing.assert_close(gram, _loop_gram(model, split_batch(batch, 6), train=False))


# ---- the public read-only diagnostic ----------------------------------------------------


def _snapshot(model):
    return (
        {n: p.detach().clone() for n, p in model.named_parameters()},
        {n: b.detach().clone() for n, b in model.named_buffers()},
        [m.training for m in model.modules()],
    )


@pytest.mark.parametrize("num_splits", [None, 3])
def test_grad_cosine_is_read_only_and_uses_documented_batchnorm_statistics(num_splits):
    model = _model("cnn_bn").train()
    model[3].eval()  # a mixed-mode model keeps its mixed modes
    batch = MODELS["cnn_bn"][1](6)
    before = _snapshot(model)
    r = initopt.grad_cosine(model, batch, num_splits=num_splits)
    after = _snapshot(model)
    for a, b in zip(before[:2], after[:2], strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert before[2] == after[2]
    assert all(p.grad is None for p in model.parameters())
    # sample-wise: eval mode (running statistics); batch-wise: each sub-batch's own statistics
    parts = split_batch(batch, 6 if num_splits is None else 3)
    gc, n = _loop_gc(_loop_gram(model, parts, train=num_splits is not None))
    assert r.gc == pytest.approx(float(gc), rel=1e-10)
    assert r.norms == pytest.approx(n.tolist(), rel=1e-10)
    assert r.gn == pytest.approx(float(n.mean()), rel=1e-10)
    assert r.mode == ("eval" if num_splits is None else "train")
    assert r.sample_wise is (num_splits is None) and r.num_groups == len(parts)
    assert "0.weight" in r.accelerated
    with pytest.raises(AttributeError):
        r.gc = 0.0  # frozen


def test_grad_cosine_accelerated_equals_vmap_in_float32():
    torch.manual_seed(0)
    model = zoo.cnn(channels=(8, 16))
    batch = (torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,)))
    fast = initopt.grad_cosine(model, batch)
    slow = initopt.grad_cosine(model, batch, accelerate=False)
    assert fast.gc == pytest.approx(slow.gc, abs=1e-5)
    assert fast.norms == pytest.approx(slow.norms, rel=1e-4)
    assert slow.accelerated == ()


def test_grad_cosine_errors():
    model = _model("mlp")
    batch = _cls(6, 7)
    for bad in (1, 7, 2.5, True):
        with pytest.raises(initopt.ConfigError, match="num_splits"):
            initopt.grad_cosine(model, batch, num_splits=bad)
    with pytest.raises(initopt.DataError):
        initopt.grad_cosine(model, _cls(1, 7))
    with pytest.raises(initopt.DataError):
        initopt.grad_cosine(model, [batch, batch])


class _Outside(nn.Module):
    """Weights, biases and gains also used outside their layers' calls, in ways the per-layer
    forms would miss; a layer whose output never reaches the loss; ordinary layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.ln = nn.LayerNorm(3)
        self.lin = nn.Linear(3, 3)
        self.dead = nn.Linear(3, 3)
        self.ok = nn.Linear(3, 3)
        self.bn = nn.BatchNorm1d(3)
        self.head = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)) * (1 + self.conv.weight.mean())  # weight used outside
        h = h.mean((2, 3))
        h = self.ln(h) * self.ln.weight  # gain used outside
        h = torch.tanh(self.lin(h)) + self.lin.bias  # bias used outside
        self.dead(h)  # output unused
        h = self.bn(torch.tanh(self.ok(h)))
        return self.head(h)


def test_sample_check_rejects_tensors_used_outside_their_layer_and_stays_exact():
    torch.manual_seed(0)
    model = _Outside().double().eval()
    batch = _cls(6, 2, 4, 4, classes=4)
    ref = _loop_gram(model, split_batch(batch, 6), train=False)
    with evaluation(model, mode="eval") as ev:
        gram, used = C.sample_gram(ev, ev.space.ones(), batch)
    assert {k for k, v in used.skipped.items() if "outside" in v} == {"conv", "ln", "lin"}
    assert {ly.name for ly in used.layers} == {"dead", "ok", "bn", "head"}
    torch.testing.assert_close(gram, ref, rtol=1e-10, atol=1e-13)
