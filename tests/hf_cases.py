"""Tiny Hugging Face models built from configs (nothing downloaded) and their dict batches,
shared by the tests that need them. Import it after ``pytest.importorskip("transformers")``."""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers as tf

tf.logging.set_verbosity_error()

Batch = dict[str, torch.Tensor]


def gpt2() -> tuple[torch.nn.Module, Callable[[torch.Generator], Batch]]:
    cfg = tf.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=24, n_positions=16, bos_token_id=0, eos_token_id=0)

    def batch(g: torch.Generator) -> Batch:
        ids = torch.randint(0, 24, (6, 10), generator=g)
        return {"input_ids": ids, "labels": ids}

    return tf.GPT2LMHeadModel(cfg), batch


def bert() -> tuple[torch.nn.Module, Callable[[torch.Generator], Batch]]:
    cfg = tf.BertConfig(
        num_hidden_layers=2,
        hidden_size=16,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=24,
        max_position_embeddings=16,
        num_labels=3,
    )

    def batch(g: torch.Generator) -> Batch:
        return {
            "input_ids": torch.randint(0, 24, (6, 10), generator=g),
            "labels": torch.randint(0, 3, (6,), generator=g),
        }

    return tf.BertForSequenceClassification(cfg), batch


def vit() -> tuple[torch.nn.Module, Callable[[torch.Generator], Batch]]:
    cfg = tf.ViTConfig(
        num_hidden_layers=2,
        hidden_size=16,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=8,
        patch_size=4,
        num_channels=1,
        num_labels=3,
    )

    def batch(g: torch.Generator) -> Batch:
        return {"pixel_values": torch.randn(6, 1, 8, 8, generator=g), "labels": torch.randint(0, 3, (6,), generator=g)}

    return tf.ViTForImageClassification(cfg), batch


def t5() -> tuple[torch.nn.Module, Callable[[torch.Generator], Batch]]:
    cfg = tf.T5Config(
        num_layers=1,
        num_decoder_layers=1,
        d_model=16,
        d_ff=32,
        d_kv=8,
        num_heads=2,
        vocab_size=24,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )

    def batch(g: torch.Generator) -> Batch:
        return {
            "input_ids": torch.randint(2, 24, (6, 8), generator=g),
            "labels": torch.randint(2, 24, (6, 5), generator=g),
        }

    return tf.T5ForConditionalGeneration(cfg), batch


MODELS = {"gpt2": gpt2, "bert": bert, "vit": vit, "t5": t5}
