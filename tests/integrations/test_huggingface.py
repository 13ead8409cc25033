"""Hugging Face helpers on tiny models built in the test (nothing downloaded)."""

from __future__ import annotations

import copy

import pytest
import torch

import initopt

transformers = pytest.importorskip("transformers")
from initopt.integrations.huggingface import (  # noqa: E402
    InitOptTrainerCallback,
    initialize_hf_,
    tied_parameters,
    to_batch,
    to_batches,
)

CONFIG = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)


def _gpt2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG))


def _examples(n: int = 16, length: int = 12, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, length), generator=g)
    return [{"input_ids": row.tolist(), "attention_mask": [1] * length, "text": "skipped"} for row in ids]


def _tied(model) -> bool:
    return model.get_input_embeddings().weight is model.get_output_embeddings().weight


def test_to_batches_forms():
    ex = _examples(10)
    b = to_batches(ex, batch_size=4, labels="input_ids")
    assert [x["input_ids"].shape for x in b] == [(4, 12), (4, 12), (2, 12)]
    assert set(b[0]) == {"input_ids", "attention_mask", "labels"} and all(type(x) is dict for x in b)
    assert torch.equal(b[0]["labels"], b[0]["input_ids"])
    assert len(to_batches(ex, batch_size=4, max_batches=2)) == 2
    # a collator's output (BatchEncoding, a Mapping that is not a dict) and a list of them
    enc = transformers.BatchEncoding({"input_ids": torch.ones(2, 5, dtype=torch.long)})
    assert type(to_batch(enc)) is dict and to_batches(enc)[0]["input_ids"].shape == (2, 5)
    assert len(to_batches([enc, enc])) == 2
    # padding is masked out of the labels
    pad = to_batch({"input_ids": [[5, 6, 0]], "attention_mask": [[1, 1, 0]]}, labels="input_ids")
    assert pad["labels"].tolist() == [[5, 6, -100]]
    # a DataLoader of collated batches
    loader = torch.utils.data.DataLoader(ex, batch_size=5, collate_fn=transformers.default_data_collator)
    assert [x["input_ids"].shape[0] for x in to_batches(loader, max_batches=3)] == [5, 5]


def test_to_batches_errors():
    with pytest.raises(initopt.DataError, match="DataCollatorWithPadding"):
        to_batches([{"input_ids": [1, 2, 3]}, {"input_ids": [1, 2]}], batch_size=2)
    with pytest.raises(initopt.DataError, match="empty"):
        to_batches([])
    with pytest.raises(initopt.DataError, match="mappings"):
        to_batches([torch.zeros(2, 3)])
    with pytest.raises(initopt.DataError, match="no 'input_ids'"):
        to_batch({"x": [[1.0]]}, labels="input_ids")


@pytest.mark.parametrize("method", ["gradinit", "nio", "kaiming"])
def test_initialize_keeps_ties_and_scales_them_once(method, tmp_path):
    model = _gpt2()
    assert _tied(model) and ("transformer.wte.weight", "lm_head.weight") in tied_parameters(model)
    w0 = model.get_input_embeddings().weight.detach().clone()
    guard = {} if method == "kaiming" else {"guard": False}  # the scaling itself is tested here
    res = initialize_hf_(model, _examples(), method, batch_size=4, labels="input_ids", steps=3, progress=False, **guard)
    assert _tied(model)
    scale = [res.scales[n] for n in ("transformer.wte.weight", "lm_head.weight") if n in res.scales]
    assert len(scale) == 1  # one entry for the tied tensor, whatever its names
    if method != "kaiming":  # the rule leaves embeddings alone; the learned methods move them
        assert scale[0] != 1.0
    assert torch.allclose(model.get_input_embeddings().weight, w0 * scale[0])

    # save_pretrained / from_pretrained reloads identical weights, ties included
    model.save_pretrained(tmp_path / "m")
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "m")
    assert _tied(again)
    sd, sd2 = model.state_dict(), again.state_dict()
    assert set(sd) == set(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)

    # the scales file applied to a freshly built model gives the same weights
    path = initopt.save_scales(res, tmp_path / "scales.json", model=model)
    fresh = _gpt2()
    initopt.apply_scales_(fresh, initopt.load_scales(path))
    assert _tied(fresh)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), sd.values(), strict=True))


def test_same_as_initialize_on_dict_batches():
    a, b = _gpt2(), _gpt2()
    batches = to_batches(_examples(8), batch_size=4, labels="input_ids")
    initialize_hf_(a, batches, "gradinit", steps=2, progress=False)
    initopt.initialize_(b, batches, "gradinit", steps=2, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_trainer_callback(tmp_path):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (initopt[hf] installs it)")
    model = _gpt2()
    by_hand = copy.deepcopy(model)
    ds = to_batches(_examples(32), batch_size=1, labels="input_ids")
    ds = [{k: v[0] for k, v in x.items()} for x in ds]  # a list of single examples as tensors
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        warmup_steps=2,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    cb = InitOptTrainerCallback("gradinit", batches=2, steps=3, verbose=False, scales_path=tmp_path / "s.json")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    first = [b for b in trainer.get_train_dataloader().base_dataloader][:2]
    snap = {}

    class Snap(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            snap.update({k: v.detach().clone() for k, v in model.state_dict().items()})

    trainer.add_callback(Snap())
    trainer.train()
    assert cb.result is not None and cb.result.info["lookahead"]["optimizer"] == "AdamW"
    assert cb.result.info["lookahead"]["groups"][0]["lr"] == 1e-3  # the base lr, not warmup's 0
    opt = torch.optim.AdamW(by_hand.parameters(), lr=1e-3, weight_decay=0.0)
    expected = initialize_hf_(by_hand, first, "gradinit", steps=3, progress=False, optimizer=opt)
    assert cb.result.scales.keys() == expected.scales.keys()
    for k, v in by_hand.state_dict().items():
        assert torch.allclose(snap[k], v, rtol=1e-5, atol=1e-7), k
    assert _tied(model) and trainer.state.global_step == 3
    assert initopt.load_scales(tmp_path / "s.json")["scales"] == cb.result.scales


def test_trainer_callback_hook_directly():
    """on_train_begin as the Trainer calls it (no accelerate needed): runs once, skips resumed runs."""
    model = _gpt2()
    ex = to_batches(_examples(16), batch_size=1, labels="input_ids")
    loader = torch.utils.data.DataLoader(
        [{k: v[0] for k, v in x.items()} for x in ex], batch_size=4, collate_fn=transformers.default_data_collator
    )
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: s / 10)  # warmup: lr is 0 now
    cb = InitOptTrainerCallback("gradinit", batches=2, steps=2, verbose=False)
    state = transformers.TrainerState()
    cb.on_train_begin(None, state, None, model=model, train_dataloader=loader, optimizer=opt)
    assert cb.result.info["lookahead"]["groups"][0]["lr"] == 2e-3 and not opt.state
    first = cb.result
    cb.on_train_begin(None, state, None, model=model, train_dataloader=loader, optimizer=opt)
    assert cb.result is first and "already ran" in cb.skipped

    resumed = InitOptTrainerCallback("kaiming", verbose=False)
    w = copy.deepcopy(model.state_dict())
    resumed.on_train_begin(None, transformers.TrainerState(global_step=5), None, model=model, train_dataloader=loader)
    assert resumed.result is None and "resumes at step 5" in resumed.skipped
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in w.items())
