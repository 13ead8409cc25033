"""Probe behind docs/huggingface.md: which of the two layers the variance rules still rescaled on
ViT (before they left the stream's first layer alone) made it train worse.

ViT of ``study_hf.py`` (4 layers, width 64, digits), seeds 0 and 1: Kaiming's or LSUV's scale for
one layer (the classifier, or the patch embedding) is computed on a copy of the model and applied to
that layer alone, then the study's AdamW run (300 steps). Output, committed:
``results/study_hf_vit_layers.txt``.

    python benchmarks/study_hf_vit_layers.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import study_hf

import initopt

LAYERS = ["classifier.weight", "vit.embeddings.patch_embeddings.projection.weight"]


def main() -> None:
    study_hf._quiet()
    task = study_hf.make_task("vit", False)
    for seed in (0, 1):
        for layer in LAYERS:
            for method in ("kaiming", "lsuv"):
                torch.manual_seed(seed)
                model = task["make"]()
                model.train()
                train = study_hf.batches(task["train"], task["to_batch"], 32, seed)
                test = study_hf.batches(task["test"], task["to_batch"], 64, 0, shuffle=False)
                copy = task["make"]()
                copy.load_state_dict(model.state_dict())
                res = initopt.initialize_(copy, train[:8], method, progress=False)
                initopt.apply_scales_(model, {layer: res.scales[layer]})
                opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
                for t in range(300):
                    loss = model(**train[t % len(train)]).loss
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                tl, ta = study_hf.evaluate(model, test, False)
                print(
                    f"seed {seed} {method} only {layer} ({res.scales[layer]:.3g}): test loss {tl:.4f} acc {ta:.3f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
