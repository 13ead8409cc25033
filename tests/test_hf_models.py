"""Every method on Hugging Face models built from configs (nothing downloaded): dict batches, the
model's own loss, tied embeddings, ``save_pretrained``. Skipped when transformers is missing."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import initopt

tf = pytest.importorskip("transformers")

from hf_cases import MODELS, Batch  # noqa: E402

# small versions of every method (the defaults' run on all four models is benchmarks/study_hf.py)
SMALL: dict[str, dict[str, Any]] = {
    "gradinit": {"steps": 3},
    "metainit": {"steps": 3},
    "nio": {"steps": 2},
    "hessian": {},
    "lsuv": {},
    "kaiming": {},
    "auto": {"steps": 2, "trial_steps": 3, "max_trial_steps": 3, "holdout": 1},
}


def _build(name: str, seed: int = 0) -> tuple[torch.nn.Module, list[Batch]]:
    torch.manual_seed(seed)
    model, batch = MODELS[name]()
    g = torch.Generator().manual_seed(seed + 1)
    return model, [batch(g) for _ in range(4)]


def _ties(model: torch.nn.Module) -> list[tuple[str, str]]:
    seen: dict[int, str] = {}
    out = []
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            out.append((seen[id(p)], n))
        else:
            seen[id(p)] = n
    return out


def _check_scaled(model: torch.nn.Module, before: dict[str, torch.Tensor], res: initopt.InitResult) -> None:
    """Every tensor is its old value times its scale (directions kept; a tied tensor scaled once)."""
    for n, p in model.named_parameters():
        s = res.scales.get(n, 1.0)
        assert math.isfinite(s) and s > 0, (n, s)
        torch.testing.assert_close(p.detach(), before[n] * s, rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.parametrize("method", list(SMALL))
@pytest.mark.parametrize("name", list(MODELS))
def test_every_method_runs_on_hf_models(name, method):
    model, batches = _build(name)
    ties = _ties(model)
    params = {n: id(p) for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    kw = {"optimizer": torch.optim.AdamW(model.parameters(), lr=1e-3)} if method == "auto" else {}
    res = initopt.initialize_(model, batches, method, progress=False, **kw, **SMALL[method])
    _check_scaled(model, before, res)
    assert {n: id(p) for n, p in model.named_parameters()} == params  # Parameter identity
    assert _ties(model) == ties  # tied input/output embeddings stay tied
    with torch.no_grad():
        assert math.isfinite(float(model(**batches[0]).loss))


def test_tied_embedding_is_one_scale():
    model, batches = _build("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    before = model.transformer.wte.weight.detach().clone()
    res = initopt.initialize_(model, batches, "gradinit", steps=5, guard=False, progress=False)
    assert "lm_head.weight" not in res.scales  # one entry for the tied pair, under its first name
    s = res.scales["transformer.wte.weight"]
    assert s != 1.0
    torch.testing.assert_close(model.lm_head.weight.detach(), before * s)
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize("method", ["kaiming", "lsuv", "hessian"])
@pytest.mark.parametrize("name", ["bert", "vit", "t5"])
def test_rules_leave_residual_branches_alone(name, method):
    """The variance rules are for chains of layers: every layer of a residual branch, and the layer
    that starts the residual stream, keeps its scale, with a note; only the chains around them
    (BERT's pooler and classifier, ViT's classifier) may move."""
    model, batches = _build(name)
    res = initopt.initialize_(model, batches, method, progress=False)
    blocks = ("bert.encoder.", "vit.encoder.", "vit.layers.", "encoder.block.", "decoder.block.")
    inside = [
        n
        for n, p in model.named_parameters()
        if n.startswith(blocks) and p.ndim == 2 and "relative_attention_bias" not in n  # T5's bias table
    ]
    assert inside
    notes = {h["param"]: h["skipped"] for h in res.history if "skipped" in h}
    for n in inside:
        assert res.scales.get(n, 1.0) == 1.0, n
        assert "summed" in notes.get(n, "") or "add" in notes.get(n, ""), (n, notes.get(n))
    moved = {n for n, s in res.scales.items() if s != 1.0}
    assert moved <= {"bert.pooler.dense.weight", "classifier.weight"}
    if name == "vit":  # the patch embedding starts the residual stream: left alone too
        assert "feeds a residual stream" in notes["vit.embeddings.patch_embeddings.projection.weight"]


@pytest.mark.parametrize("name", list(MODELS))
def test_save_pretrained_round_trip(name, tmp_path):
    model, batches = _build(name)
    res = initopt.initialize_(model, batches, "gradinit", steps=3, progress=False)
    model.save_pretrained(tmp_path / "m")
    back = type(model).from_pretrained(tmp_path / "m")
    for (n, p), (n2, q) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        assert n == n2 and torch.equal(p, q), n
    assert _ties(back) == _ties(model)
    # the saved scales rebuild the same weights on a fresh model of the same seed
    initopt.save_scales(res, tmp_path / "s.json")
    fresh, _ = _build(name)
    initopt.apply_scales_(fresh, initopt.load_scales(tmp_path / "s.json"))
    for (n, p), (_, q) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(p, q), n


@pytest.mark.slow
@pytest.mark.parametrize("method", ["metainit", "auto", "hessian", "lsuv", "kaiming"])
def test_every_method_at_its_defaults_on_gpt2(method):
    """At their defaults (GradInit's and NIO's defaults run on all four models in
    benchmarks/study_hf.py, whose small version is in test_studies.py)."""
    model, batches = _build("gpt2")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    kw = {"optimizer": torch.optim.AdamW(model.parameters(), lr=1e-3)} if method == "auto" else {}
    res = initopt.initialize_(model, batches, method, progress=False, **kw)
    _check_scaled(model, before, res)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_a_collators_batch_encoding_is_a_dict_batch():
    """A ``BatchEncoding`` (a mapping, not a dict) is taken as one dict batch, as it is."""
    model, batches = _build("bert")
    enc = tf.BatchEncoding(batches[0])
    assert not isinstance(enc, dict)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = initopt.initialize_(model, enc, "gradinit", steps=2, progress=False)
    _check_scaled(model, before, res)
    assert initopt.grad_cosine(model, enc, num_splits=2) == initopt.grad_cosine(model, dict(enc), num_splits=2)
