"""initopt.diagnose against independent computations; read-only; report formats."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from zoo_cases import assert_same, snapshot

import initopt
from initopt import zoo


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _batch(n=12):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def test_per_layer_values_match_plain_autograd_and_dense_hessian():
    model, batch = _net(), _batch()
    report = initopt.diagnose(model, batch, probes=40)
    ref = copy.deepcopy(model)
    acts = {}
    hooks = [ref[i].register_forward_hook(lambda m, i_, o, i=i: acts.__setitem__(i, o.detach())) for i in (0, 2)]
    loss = F.cross_entropy(ref(batch[0]), batch[1])
    for h in hooks:
        h.remove()
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    for row, idx, (gw, gb) in zip(report.layers, (0, 2), [grads[:2], grads[2:]], strict=True):
        layer = ref[idx]
        pn = torch.sqrt(layer.weight.detach().norm() ** 2 + layer.bias.detach().norm() ** 2)
        gn = torch.sqrt(gw.norm() ** 2 + gb.norm() ** 2)
        assert row["layer"] == str(idx) and row["type"] == "Linear"
        torch.testing.assert_close(row["param_norm"], float(pn))
        torch.testing.assert_close(row["grad_norm"], float(gn))
        torch.testing.assert_close(row["grad_to_weight"], float(gn / pn))
        torch.testing.assert_close(row["act_mean"], float(acts[idx].mean()))
        torch.testing.assert_close(row["act_std"], float(acts[idx].std()))
        # the layer's Hessian block, dense
        w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
        n_w = w.numel()

        def f(flat, idx=idx, n_w=n_w, w=w, b=b):
            params = {f"{idx}.weight": flat[:n_w].view_as(w), f"{idx}.bias": flat[n_w:].view_as(b)}
            out = torch.func.functional_call(ref, params, (batch[0],))
            return F.cross_entropy(out, batch[1])

        H = torch.autograd.functional.hessian(f, torch.cat([w.flatten(), b.flatten()]))
        ev = torch.linalg.eigvalsh(H)
        torch.testing.assert_close(row["hessian_spectral"], float(ev.abs().max()), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(row["hessian_frobenius"], float(H.norm()), rtol=0.25, atol=0)
    torch.testing.assert_close(report.model["loss"], float(loss.detach()))


def test_diagnose_is_read_only_and_reports_every_measure():
    torch.manual_seed(0)
    model = zoo.cnn(batchnorm=True, dropout=0.2).eval()
    batch = (torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,)))
    before = snapshot(model)
    report = initopt.diagnose(model, batch, probes=5)
    assert_same(before, snapshot(model))
    for key in ("loss", "grad_cosine_batch", "grad_cosine_sample", "hessian_top_eigenvalue", "hessian_trace"):
        assert key in report.model
    assert report.model["grad_cosine_batch"] is not None
    d = report.to_dict()
    assert {"layers", "model", "notes"} <= set(d)
    md = report.to_markdown()
    assert md.count("\n|") >= len(report.layers) + 3
    side = report.compare(initopt.diagnose(model, batch, hessian=False))
    assert "before" in side and "after" in side


def test_diagnose_before_and_after_an_initialization():
    torch.manual_seed(0)
    model = zoo.mlp(depth=4, width=16, in_features=12)
    data = [(torch.randn(16, 12), torch.randint(0, 10, (16,))) for _ in range(3)]
    before = initopt.diagnose(model, data, hessian=False)
    res = initopt.initialize_(model, data, "gradinit", steps=5, lr=0.2, guard=False)
    after = initopt.diagnose(model, data, hessian=False)
    name = "1.weight"
    layer = next(r for r in after.layers if r["layer"] == "1")
    layer0 = next(r for r in before.layers if r["layer"] == "1")
    w = dict(model.named_parameters())
    expected = torch.sqrt(w[name].detach().norm() ** 2 + w["1.bias"].detach().norm() ** 2)
    torch.testing.assert_close(layer["param_norm"], float(expected))
    assert layer["param_norm"] != layer0["param_norm"] and res.scales[name] != 1.0
