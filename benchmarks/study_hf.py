"""Claims study: every method at its defaults on Hugging Face models built from configs.

Claim (issue 11): on Hugging Face Transformers models, each initopt method at its defaults leaves a
model that trains at least as well as the model's own initialization (``_init_weights``: normal
with std ``initializer_range`` = 0.02, zero biases, unit LayerNorm gains) in a short run.

Setting: four tiny models built from configs (nothing downloaded), each on an offline task, with
dict batches and the model's own loss:

* ``gpt2``: ``GPT2LMHeadModel`` (4 layers, width 64, 4 heads, tied embeddings), causal LM on
  sequences of 8 random digits followed by the same digits sorted (``initopt.data.synthetic_sort``);
* ``bert``: ``BertForSequenceClassification`` (4 layers, width 64), which of 4 marker tokens
  occurs most often (``initopt.data.synthetic_sequences``);
* ``vit``: ``ViTForImageClassification`` (4 layers, width 64, 2×2 patches of 8×8 images) on
  scikit-learn's digits;
* ``t5``: ``T5ForConditionalGeneration`` (2 + 2 layers, width 64), sorting 8 digits as
  sequence-to-sequence.

Every init runs through ``initopt.initialize_`` at its defaults on 8 training batches; the inits
that take the training optimizer (``auto``'s trials; the guard of GradInit, MetaInit and NIO,
which keeps their scales only if a 25-step trial from them beats one from the start, see
``initopt.core.guard``) get it as ``optimizer=`` (``--no-optimizer``: they do not, and assume
one). Then AdamW (lr 1e-3, weight decay 0.01, batch 32) trains for
``--steps`` steps; the held-out loss (the model's own loss, averaged over the test set) and
accuracy are compared with the model's own init, paired by seed (same draw, same batches). An
init is "worse" when its held-out loss is higher by more than two standard errors of the paired
difference, "better" when lower by more than two, else a tie. Writes ``results/study_hf.json``.

    python benchmarks/study_hf.py            # default size (4 models x 7 inits x 3 seeds)
    python benchmarks/study_hf.py --quick    # tiny, seconds (what the tests run)
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import initopt
from initopt import data as idata

RESULTS = Path(__file__).resolve().parent / "results"
CLAIM = (
    "On Hugging Face models built from configs, every initopt method at its defaults leaves a model that "
    "trains at least as well as the model's own init (held-out loss after a short AdamW run, paired by seed)."
)
INITS = ["default", "gradinit", "metainit", "nio", "hessian", "lsuv", "kaiming", "auto"]
TASKS = ["gpt2", "bert", "vit", "t5"]
WITH_OPTIMIZER = "the training optimizer, to every init that takes one"


def _quiet() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module="transformers")


def make_task(name: str, quick: bool) -> dict[str, Any]:
    """Model factory, train and test batches (lists of dicts) of one task."""
    import transformers as tf

    width, layers = (32, 2) if quick else (64, 4)
    n = 512 if quick else 4096
    if name in ("gpt2", "t5"):
        train, test = idata.synthetic_sort(n=n, length=8, vocab=10, seed=0)
    elif name == "bert":
        train, test = idata.synthetic_sequences(n=n, length=16, vocab=32, classes=4, seed=0)
    elif name == "vit":
        train, test = idata.digits(seed=0)
    else:
        raise SystemExit(f"unknown task {name!r}; choose from {TASKS}")

    if name == "gpt2":
        cfg = tf.GPT2Config(
            n_layer=layers, n_embd=width, n_head=4, vocab_size=11, n_positions=32, bos_token_id=10, eos_token_id=10
        )

        def make() -> torch.nn.Module:
            return tf.GPT2LMHeadModel(cfg)

        def to_batch(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
            ids = torch.cat([x, torch.full_like(x[:, :1], 10), y], 1)
            labels = ids.clone()
            labels[:, : x.shape[1] + 1] = -100  # the loss (and the accuracy) on the sorted half only
            return {"input_ids": ids, "labels": labels}

    elif name == "bert":
        cfg = tf.BertConfig(
            num_hidden_layers=layers,
            hidden_size=width,
            num_attention_heads=4,
            intermediate_size=2 * width,
            vocab_size=32,
            max_position_embeddings=32,
            num_labels=4,
        )

        def make() -> torch.nn.Module:
            return tf.BertForSequenceClassification(cfg)

        def to_batch(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"input_ids": x, "labels": y}

    elif name == "vit":
        cfg = tf.ViTConfig(
            num_hidden_layers=layers,
            hidden_size=width,
            num_attention_heads=4,
            intermediate_size=2 * width,
            image_size=8,
            patch_size=2,
            num_channels=1,
            num_labels=10,
        )

        def make() -> torch.nn.Module:
            return tf.ViTForImageClassification(cfg)

        def to_batch(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"pixel_values": x.reshape(-1, 1, 8, 8), "labels": y}

    else:
        cfg = tf.T5Config(
            num_layers=layers // 2,
            num_decoder_layers=layers // 2,
            d_model=width,
            d_ff=2 * width,
            d_kv=width // 4,
            num_heads=4,
            vocab_size=12,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=11,
        )

        def make() -> torch.nn.Module:
            return tf.T5ForConditionalGeneration(cfg)

        def to_batch(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"input_ids": x + 1, "labels": y + 1}

    return {
        "make": make,
        "train": train,
        "test": test,
        "to_batch": to_batch,
        "config": cfg.to_dict(),
        "causal": name == "gpt2",
    }


def batches(ds: Any, to_batch: Callable, batch_size: int, seed: int, shuffle: bool = True) -> list[dict]:
    x, y = ds.tensors
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(x))
    out = []
    for i in range(0, len(x) - batch_size + 1, batch_size):
        j = idx[i : i + batch_size]
        out.append(to_batch(x[j], y[j]))
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, test: list[dict], causal: bool) -> tuple[float, float]:
    """Held-out loss (the model's own, weighted by predicted entries) and accuracy."""
    model.eval()
    total, correct, n = 0.0, 0, 0
    for b in test:
        out = model(**b)
        logits, labels = out.logits, b["labels"]
        if causal:  # position t predicts token t + 1 (the model's loss shifts the same way)
            logits, labels = logits[:, :-1], labels[:, 1:]
        mask = labels != -100
        k = int(mask.sum())
        correct += int((logits.argmax(-1)[mask] == labels[mask]).sum())
        total += float(out.loss) * k
        n += k
    model.train()
    return total / n, correct / n


QUICK_INIT: dict[str, dict[str, Any]] = {
    "gradinit": {"steps": 2},
    "metainit": {"steps": 2},
    "nio": {"steps": 2},
    "auto": {"steps": 2, "trial_steps": 3, "max_trial_steps": 3, "holdout": 1},
}


def run_one(
    task: dict[str, Any],
    init: str,
    seed: int,
    steps: int,
    init_batches: int,
    quick: bool = False,
    pass_optimizer: bool = True,
) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = task["make"]()
    model.train()
    train = batches(task["train"], task["to_batch"], 32, seed)
    test = batches(task["test"], task["to_batch"], 64, 0, shuffle=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    rec: dict[str, Any] = {"init": init, "seed": seed}
    t0 = time.perf_counter()
    if init != "default":
        kw: dict[str, Any] = {"seed": seed, "progress": False}
        if quick:
            kw.update(QUICK_INIT.get(init, {}))
        if pass_optimizer and initopt.get_method(init).uses_optimizer:
            kw["optimizer"] = opt  # the training optimizer: auto's trials, the learned methods' guard
        try:
            res = initopt.initialize_(model, train[:init_batches], init, **kw)
            scales = list(res.scales.values())
            rec["scale_range"] = [min(scales), max(scales)] if scales else [1.0, 1.0]
            rec["moved"] = {k: v for k, v in res.scales.items() if abs(math.log(v)) > math.log(1.5)} if scales else {}
            if init == "auto":
                rec["auto_choice"] = res.info.get("choice")
            if "guard" in res.info:
                g = res.info["guard"]
                rec["guard"] = {
                    "kept": g["kept"],
                    "trials": [{k: t[k] for k in ("optimizer", "start", "scaled")} for t in g["trials"]],
                }
        except initopt.InitOptError as e:
            rec["error"] = f"{type(e).__name__}: {e}"
            return rec
    rec["init_seconds"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    losses = []
    for t in range(steps):
        b = train[t % len(train)]
        loss = model(**b).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            break
    rec["step_seconds"] = (time.perf_counter() - t1) / max(len(losses), 1)
    rec["init_in_train_steps"] = rec["init_seconds"] / rec["step_seconds"]
    rec["diverged"] = not math.isfinite(losses[-1])
    rec["test_loss"], rec["test_acc"] = (
        evaluate(model, test, task["causal"]) if not rec["diverged"] else (math.inf, 0.0)
    )
    rec["train_loss_every_10"] = losses[::10]
    return rec


def paired(runs: list[dict[str, Any]], task: str, init: str, key: str) -> dict[str, Any]:
    base = {r["seed"]: r[key] for r in runs if r["task"] == task and r["init"] == "default" and key in r}
    d = [r[key] - base[r["seed"]] for r in runs if r["task"] == task and r["init"] == init and key in r]
    if not d:
        return {"n": 0}
    mean = statistics.fmean(d)
    sd = statistics.stdev(d) if len(d) > 1 else 0.0
    se = sd / math.sqrt(len(d))
    return {"n": len(d), "mean": mean, "std": sd, "se": se, "diffs": d}


def verdict(p: dict[str, Any]) -> str:
    """On the held-out loss: worse when higher by more than two standard errors."""
    if p.get("n", 0) < 2:
        return "n/a"
    if p["mean"] - 2 * p["se"] > 0:
        return "worse"
    if p["mean"] + 2 * p["se"] < 0:
        return "better"
    return "tie"


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--inits", default=",".join(INITS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", type=Path, default=RESULTS / "study_hf.json")
    ap.add_argument(
        "--no-optimizer",
        action="store_true",
        help="do not give the training optimizer to the inits (auto then assumes SGD; the guard tries SGD and Adam)",
    )
    ap.add_argument(
        "--merge",
        action="store_true",
        help="rerun only --tasks x --inits (and their default runs) and keep every other run of --out",
    )
    args = ap.parse_args(argv)
    _quiet()
    tasks = args.tasks.split(",")
    inits = args.inits.split(",")
    if "default" not in inits:
        inits = ["default", *inits]
    seeds = list(range(1 if args.quick else args.seeds))
    init_optimizer = "none" if args.no_optimizer else WITH_OPTIMIZER
    steps = 5 if args.quick else args.steps
    t0, c0 = time.perf_counter(), time.process_time()
    runs: list[dict[str, Any]] = []
    configs = {}
    for name in tasks:
        task = make_task(name, args.quick)
        configs[name] = task["config"]
        for init in inits:
            for seed in seeds:
                r = run_one(task, init, seed, steps, 3 if args.quick else 8, args.quick, not args.no_optimizer)
                r["task"] = name
                runs.append(r)
                shown = r.get("error") or (
                    f"test loss {r['test_loss']:.4f} acc {r['test_acc']:.3f}, init {r['init_in_train_steps']:.0f} "
                    f"train steps{', choice ' + str(r.get('auto_choice')) if 'auto_choice' in r else ''}"
                )
                print(f"{name:5} {init:9} seed {seed}: {shown}", flush=True)
    earlier = None
    if args.merge and args.out.exists():
        old = json.loads(args.out.read_text())
        same = old["config"].get("init_optimizer", WITH_OPTIMIZER) == init_optimizer  # before: auto only, the same
        if (
            not same
            or old["config"]["seeds"] != seeds
            or old["config"]["steps"] != steps
            or old["config"]["quick"] != args.quick
        ):
            raise SystemExit(
                "--merge needs the same seeds, steps, size and init optimizer as the results it merges into"
            )
        redone = {(r["task"], r["init"]) for r in runs}
        kept = [r for r in old["runs"] if (r["task"], r["init"]) not in redone]
        earlier = {**old["provenance"], "runs_kept": sorted({f"{r['task']}/{r['init']}" for r in kept})}
        runs = kept + runs
        configs = {**old["config"]["models"], **configs}
        tasks = [t for t in TASKS if t in {r["task"] for r in runs}]
        inits = [i for i in INITS if i in {r["init"] for r in runs}]
    table = []
    for name in tasks:
        for init in inits:
            rs = [r for r in runs if r["task"] == name and r["init"] == init and "test_loss" in r]
            row: dict[str, Any] = {
                "task": name,
                "init": init,
                "errors": sum("error" in r for r in runs if r["task"] == name and r["init"] == init),
                "test_loss": [
                    statistics.fmean(r["test_loss"] for r in rs),
                    statistics.pstdev(r["test_loss"] for r in rs),
                ]
                if rs
                else None,
                "test_acc": [statistics.fmean(r["test_acc"] for r in rs), statistics.pstdev(r["test_acc"] for r in rs)]
                if rs
                else None,
                "init_in_train_steps": statistics.fmean(r["init_in_train_steps"] for r in rs) if rs else None,
            }
            if init != "default":
                p = paired(runs, name, init, "test_loss")
                row["loss_vs_default"] = p
                row["acc_vs_default"] = paired(runs, name, init, "test_acc")
                row["verdict"] = verdict(p)
            table.append(row)
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "src"], capture_output=True, text=True).stdout)
    except OSError:
        rev, dirty = "", None
    import transformers

    out = {
        "study": "hf",
        "claim": CLAIM,
        "config": {
            "tasks": tasks,
            "inits": inits,
            "seeds": seeds,
            "steps": steps,
            "optimizer": "AdamW(lr=1e-3, weight_decay=0.01)",
            "batch_size": 32,
            "init_batches": 3 if args.quick else 8,
            "init_optimizer": init_optimizer,
            "quick": args.quick,
            "models": configs,
        },
        "table": table,
        "runs": runs,
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "provenance": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "initopt": initopt.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "git_revision": rev,
            "git_dirty": dirty,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            **({"merged_into": earlier} if earlier else {}),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=str))
    print()
    print("| task | init | held-out loss | accuracy | loss − own init (paired) | verdict | init cost (train steps) |")
    print("|---|---|---|---|---|---|---|")
    for row in table:
        if row["test_loss"] is None:
            print(f"| {row['task']} | {row['init']} | error | | | | |")
            continue
        p = row.get("loss_vs_default") or {}
        diff = f"{p['mean']:+.4f} ± {p['std']:.4f}" if p.get("n") else "—"
        print(
            f"| {row['task']} | {row['init']} | {row['test_loss'][0]:.4f} ± {row['test_loss'][1]:.4f} | "
            f"{row['test_acc'][0]:.3f} | {diff} | {row.get('verdict', '—')} | {row['init_in_train_steps']:.0f} |"
        )
    print(f"\nwrote {args.out} ({out['seconds']:.0f} s)")
    return args.out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
