"""Render the README's (and docs/studies.md's) benchmark tables from the committed JSON results.

Each table sits between ``<!-- key -->`` and ``<!-- /key -->`` in README.md and is rewritten
from ``benchmarks/results/*.json`` by ``python benchmarks/readme_tables.py``; ``--check``
exits 1 when the README is out of date (the test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _load(name: str) -> dict | None:
    p = RESULTS / name
    return json.loads(p.read_text()) if p.exists() else None


def _ms(x: dict) -> str:
    return f"{x['median']:.2f} (mean {x['mean']:.2f} ± {x['std']:.2f}, n={x['n']})"


def gradinit_cost() -> str:
    d = _load("gradinit_cost.json")
    if d is None:
        return "_no results yet: run `python benchmarks/bench_gradinit.py`_"
    prov = d["provenance"]
    lines = [
        f"GradInit iteration cost in SGD training steps of the same model and batch ({d['config']['batch']} "
        f"examples; torch {prov['torch']}, {prov['threads']} thread(s), revision {prov['git_revision'][:8]}). "
        "Median over interleaved rounds, then mean ± std over rounds. Against the paper's code: the next table.",
        "",
        "| model | objective iteration | constraint iteration | peak memory (objective / constraint) |",
        "| --- | --- | --- | --- |",
    ]
    for name, e in d["models"].items():
        mem = e.get("memory")
        mem_s = f"{mem['objective_in_train_steps']:.2f}× / {mem['constraint_in_train_steps']:.2f}×" if mem else "n/a"
        lines.append(
            f"| {name} | {_ms(e['objective_iteration_in_train_steps'])} | "
            f"{_ms(e['constraint_iteration_in_train_steps'])} | {mem_s} |"
        )
    return "\n".join(lines)


def _range(r: dict) -> str:
    return f"{r['median']:.2f} [{r['min']:.2f}, {r['max']:.2f}]"


def vs_reference() -> str:
    """Per-iteration time against the papers' own code (``benchmarks/vs_reference.py``)."""
    rows = []
    notes = []
    for method, label in (("gradinit", "GradInit, objective iterations"), ("metainit", "MetaInit steps")):
        d = _load(f"{method}_vs_reference.json")
        if d is None or "threads" not in d:
            rows.append(
                [label, "-", f"_not measured: run `python benchmarks/vs_reference.py {method}`_", "", "", "", ""]
            )
            continue
        target = float(d["claim"].split("<=")[1].split()[0])
        for t, e in d["threads"].items():
            wall, cpu = e["ratio"]["wall"], e["ratio"]["cpu"]
            if method == "gradinit":
                wall, cpu = wall["objective"], cpu["objective"]
                steps = e["in_train_steps"]
                ours, ref = steps["ours_objective"]["median"], steps["ref_objective"]["median"]
            else:
                ours, ref = e["in_train_steps"]["ours"]["median"], e["in_train_steps"]["ref"]["median"]
            met = "yes" if wall["median"] <= target else "**no**"
            rows.append([label, t, _range(wall), _range(cpu), f"{ours:.2f} / {ref:.2f}", f"≤ {target:g}", met])
        prov = next(iter(d["threads"].values()))["provenance"]
        notes.append(
            f"{label}: {d['reference']}; {d['config']['model']}, batch {d['config']['batch']}, "
            f"{d['config']['rounds']} rounds of {d['config']['iters']} timed iterations "
            f"(torch {prov['torch']}, revision {prov['git_revision'][:8]})."
        )
    head = (
        "Time of one iteration of initopt ÷ one iteration of the paper's code, in the same process, interleaved "
        "rounds (median [range] over rounds), wall clock and process CPU time; both also in SGD training steps of "
        "the same model and batch (`python benchmarks/vs_reference.py gradinit|metainit --reference PATH`, "
        "`benchmarks/results/*_vs_reference.json`)."
    )
    cols = [
        "iteration",
        "threads",
        "ours ÷ reference (wall)",
        "(CPU)",
        "training steps, ours / reference",
        "target",
        "met",
    ]
    return "\n".join([head, "", *_md_table(cols, rows), "", *notes])


def small_cost() -> str:
    """MetaInit and NIO iterations on the demo's MLP (``benchmarks/bench_small.py``)."""
    d = _load("small_cost.json")
    if d is None:
        return "_no results yet: run `python benchmarks/bench_small.py`_"
    rows = []
    for t, e in d["threads"].items():
        ms = 1e3 * e["seconds"]["train_step"]["median"]
        rows.append(
            [
                t,
                f"{ms:.2f}",
                _range(e["metainit_in_train_steps"]),
                _range(e["metainit_in_train_steps_cpu"]),
                _range(e["nio_in_train_steps"]),
                _range(e["nio_in_train_steps_cpu"]),
            ]
        )
    prov = d["provenance"]
    head = (
        f"Claim: {d['claim']}. Iterations in SGD training steps of the same model and batch, median [range] over "
        f"{d['config']['repeats']} interleaved rounds, wall clock and process CPU time (torch {prov['torch']}, "
        f"revision {prov['git_revision'][:8]}, load average {prov['loadavg_at_start'][0]:.1f} at the start; "
        "`benchmarks/results/small_cost.json`)."
    )
    cols = ["threads", "training step (ms)", "MetaInit (wall)", "MetaInit (CPU)", "NIO (wall)", "NIO (CPU)"]
    lines = [head, "", *_md_table(cols, rows)]
    c = d.get("torch_compile_metainit")
    if c:
        be = c.get("break_even_steps_vs_library_step")
        lines += [
            "",
            f"`torch.compile` of a `torch.func` MetaInit step: {_range(c['compiled_in_train_steps'])} training steps "
            f"after {c['compile_seconds']:.0f} s of compilation (this run; 95 s cold), break-even after "
            + (f"{be:.0f} steps" if be else "never")
            + " against the library's step; not used (MetaInit's default is 500 steps).",
        ]
    return "\n".join(lines)


def _stat(x: dict, digits: int = 2) -> str:
    return f"{x['mean']:.{digits}f} ± {x['std']:.{digits}f}"


def hessian_cost() -> str:
    d = _load("hessian_cost.json")
    if d is None:
        return "_no results yet: run `python benchmarks/bench_hessian.py`_"
    lv, h = d["lanczos_vs_power"], d["hvp_cost"]
    prov = d["provenance"]
    return "\n".join(
        [
            f"Curvature cost (`benchmarks/bench_hessian.py`; torch {prov['torch']}, {prov['threads']} thread(s), "
            f"revision {prov['git_revision'][:8]}; mean ± std over seeds or rounds).",
            "",
            "| measure | value | target |",
            "| --- | --- | --- |",
            f"| Hessian-vector products to 1e-3 relative accuracy on the top eigenvalue, small CNN: Lanczos | "
            f"{_stat(lv['lanczos_products'], 1)} | |",
            f"| same, power iteration | {_stat(lv['power_products'], 1)} | |",
            f"| ratio Lanczos / power iteration (1e-3) | {_stat(lv['ratio_lanczos_over_power'])} | ≤ 0.33 |",
            f"| ratio Lanczos / power iteration (1e-6) | {_stat(lv['ratio_lanczos_over_power_at_1e-6'])} | |",
            f"| one HVP on {h['model']} (batch {h['batch']}), double backward, in gradients | "
            f"{_stat(h['double_backward_in_gradients'])} | ≤ {h['target']} |",
            f"| same, forward-over-reverse | {_stat(h['forward_over_reverse_in_gradients'])} | ≤ {h['target']} |",
            f"| same, per product with the gradient graph reused (estimators' default) | "
            f"{_stat(h['reuse_in_gradients'])} | ≤ {h['target']} |",
        ]
    )


def hessian_tracking() -> str:
    d = _load("hessian_tracking.json")
    if d is None:
        return "_no results yet: run `python benchmarks/hessian_tracking.py`_"
    c = d["config"]
    lines = [
        f"{c['model']}; SGD lr {c['lr']}, batch {c['batch']}, {c['epochs']} epochs, {c['seeds']} seeds "
        f"(`benchmarks/hessian_tracking.py`, plot `benchmarks/results/hessian_tracking.png`).",
        "",
        "| first-layer std | ‖H₁‖₂ at start | ‖H₁‖₂ median over training | ‖H₁‖₂ max | step-to-step change "
        "(decades) | ‖H₂‖₂ median | test accuracy at the end |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for std, row in d["summary"].items():
        lines.append(
            f"| {std} | {_stat(row['layer1_spectral_at_start'], 3)} | "
            f"{_stat(row['layer1_spectral_median_over_training'], 3)} | "
            f"{_stat(row['layer1_spectral_max_over_training'], 3)} | "
            f"{_stat(row['layer1_spectral_oscillation_decades'], 3)} | "
            f"{_stat(row['layer2_spectral_median_over_training'], 3)} | {_stat(row['final_test_accuracy'], 3)} |"
        )
    lines += ["", f"Finding: {d['finding']}"]
    return "\n".join(lines)


def demo() -> str:
    """The demo's table at 1 thread, with the final accuracy at 2 threads and the per-seed spread."""
    d, d2 = _load("demo/threads1/compare.json"), _load("demo/threads2/compare.json")
    if d is None or d2 is None:
        return "_no results yet: run `python benchmarks/run_demo.py`_"
    c = d["config"]
    cols = [
        ("epoch1_test_acc", "test acc, epoch 1", 3),
        ("final_test_loss", "test loss, end", 3),
        ("final_test_acc", "test acc, end", 3),
        ("init_in_train_steps", "init cost (train steps)", 0),
    ]
    two = {(r["init"], r["seed"]): r["final_test_acc"] for r in d2["runs"]}
    lines = [
        f"{c.get('model', '?')} on {c.get('data', '?')}; {c['optimizer']} lr {c['lr']} (momentum {c['momentum']}), "
        f"{c['steps']} steps (one epoch = {c['steps_per_epoch']}), batch {c['batch_size']}, seeds {c['seeds']}; "
        "mean ± std over seeds at 1 thread, then the final accuracy at 2 threads and the largest per-seed "
        "difference between the two (`python benchmarks/run_demo.py`; `benchmarks/results/demo/threads1|2/`: "
        "compare.json, curves.csv, curves.png).",
        "",
        "| init | "
        + " | ".join(x[1] for x in cols)
        + " | diverged | test acc, end, 2 threads | max per-seed difference, 1 vs 2 threads |",
        "|" + " --- |" * (len(cols) + 4),
    ]
    summary2 = {row["init"]: row for row in d2["summary"]}
    for row in d["summary"]:
        cells = ["n/a" if row[k] is None else f"{row[k][0]:.{n}f} ± {row[k][1]:.{n}f}" for k, _, n in cols]
        fin2 = summary2[row["init"]]["final_test_acc"]
        diffs = [abs(r["final_test_acc"] - two[(r["init"], r["seed"])]) for r in d["runs"] if r["init"] == row["init"]]
        lines.append(
            f"| {row['init']} | "
            + " | ".join(cells)
            + f" | {row['diverged']}/{row['seeds']} | {fin2[0]:.3f} ± {fin2[1]:.3f} | {max(diffs):.3f} |"
        )
    verdicts = {t: x["config"].get("verdicts", []) for t, x in ((1, d), (2, d2))}
    if verdicts[1]:
        lines += [
            "",
            "The demo's verdict (final test accuracy, paired by seed; 'tie' = within two standard errors):",
            "",
        ]
        for v1, v2 in zip(verdicts[1], verdicts[2], strict=True):
            lines.append(
                f"- {v1['a']} vs {v1['b']}: 1 thread {100 * v1['mean']:+.1f} ± {100 * v1['se']:.1f} points "
                f"({v1['wins']}/{v1['n']} seeds) → **{v1['verdict']}**; 2 threads {100 * v2['mean']:+.1f} ± "
                f"{100 * v2['se']:.1f} ({v2['wins']}/{v2['n']}) → **{v2['verdict']}**"
            )
    return "\n".join(lines)


def _generic(name: str, script: str) -> Callable[[], str]:
    """A table of every ``{"median", "mean", "std", "n"}`` entry of a result file."""

    def render() -> str:
        d = _load(name)
        if d is None:
            return f"_no results yet: run `python benchmarks/{script}`_"
        rows: list[str] = []

        def walk(x: object, path: str) -> None:
            if isinstance(x, dict):
                if {"median", "mean", "std"} <= set(x):
                    rows.append(f"| {path} | {x['median']:.3g} | {x['mean']:.3g} ± {x['std']:.3g} |")
                    return
                for k, v in x.items():
                    if k not in ("provenance", "config", "runs", "rounds"):
                        walk(v, f"{path}.{k}" if path else str(k))

        walk(d, "")
        prov = d.get("provenance", {})
        head = [
            f"From `benchmarks/results/{name}` (torch {prov.get('torch', '?')}, {prov.get('threads', '?')} thread(s), "
            f"revision {str(prov.get('git_revision', '?'))[:8]}).",
            "",
            "| measure | median | mean ± std |",
            "| --- | --- | --- |",
        ]
        claim = str(d.get("claim", "")).removeprefix("Claim:").strip()
        return "\n".join(([f"Claim: {claim}", ""] if claim else []) + head + rows)

    return render


def nio_cost(name: str = "nio_cost.json") -> str:
    """Claim 1 of ``bench_nio.py`` (sample-wise GradCosine against a loop, per model and thread
    count: median and range of the speedup) and its NIO claims (generic rows)."""
    d = _load(name)
    if d is None:
        return "_no results yet: run `python benchmarks/bench_nio.py`_"
    prov, cfg = d["provenance"], d["config"]
    threads = cfg.get("threads", [prov.get("threads", 1)])
    sections = [("sample_wise" if i == 0 else f"sample_wise_{t}threads", t) for i, t in enumerate(threads)]
    claim = str(d.get("claim", "")).strip()
    lines = [
        f"Claim: {claim}",
        "",
        f"From `benchmarks/results/{name}` (torch {prov['torch']}, revision {str(prov['git_revision'])[:8]}, "
        f"{prov['date'][:10]}). Sample-wise GradCosine at batch {cfg['sample_batch']}: speedup of "
        "`initopt.grad_cosine` over a loop over examples, median (range) over "
        f"{cfg['repeats']} interleaved rounds; |dGC| against the loop. *Floor pass*: the speedup of one "
        "batched forward and backward to every layer output (no weight-gradient or Gram work), at the first "
        "thread count; no exact method built on batched activations can beat it.",
        "",
        "| model | "
        + " | ".join(f"{t} thread(s)" for _, t in sections)
        + " | floor pass (bound) | vmap only | tensors by vmap | abs dGC f32 | abs dGC f64 |",
        "| --- | " + " | ".join("---" for _ in sections) + " | --- | --- | --- | --- | --- |",
    ]
    for model, e in d["sample_wise"].items():
        cells = []
        for key, _ in sections:
            s = d.get(key, {}).get(model, {}).get("speedup_initopt_vs_loop")
            if s is None:
                cells.append("")
                continue
            mark = "" if s["median"] >= 10 else " (below 10x)"
            cells.append(f"{s['median']:.1f}x ({s['min']:.1f}-{s['max']:.1f}){mark}")
        v = e["speedup_vmap_vs_loop"]
        fl = e.get("speedup_floor_vs_loop")
        eq = e.get("equality", {})
        f32 = eq.get("float32", {}).get("abs_diff_gc_initopt")
        f64 = eq.get("float64", {}).get("abs_diff_gc_initopt")
        lines.append(
            f"| {model} | "
            + " | ".join(cells)
            + (" | " if fl is None else f" | {fl['median']:.1f}x")
            + f" | {v['median']:.1f}x | {e.get('vmap_tensors', '?')} | "
            + ("" if f32 is None else f"{f32:.1e}")
            + " | "
            + ("" if f64 is None else f"{f64:.1e}")
            + " |"
        )
    rows = []
    for model, e in d.get("nio", {}).items():
        for k, x in e.items():
            if isinstance(x, dict) and {"median", "mean", "std"} <= set(x):
                rows.append(f"| nio.{model}.{k} | {x['median']:.3g} | {x['mean']:.3g} ± {x['std']:.3g} |")
    if rows:
        lines += [
            "",
            f"NIO iteration ({prov['threads']} thread(s)):",
            "",
            "| measure | median | mean ± std |",
            "| --- | --- | --- |",
            *rows,
        ]
    return "\n".join(lines)


STUDIES = {
    "deep": ("study_deep.py", "Deep plain networks (GradInit Table 1, MetaInit)"),
    "recovery": ("study_recovery.py", "Recovery from bad initialization (MetaInit)"),
    "transformer": ("study_transformer.py", "Post-LN Transformer without warmup (GradInit, NIO)"),
    "predictors": ("study_predictors.py", "GradCosine predicts trainability (NIO's theory)"),
    "start": ("study_start.py", "Starting point and pipelines"),
    "gradinit": ("study_gradinit.py", "Why GradInit from Kaiming can lose (ablations)"),
    "auto": ("study_auto.py", 'method="auto" and GradInit with the training optimizer'),
    "guard": ("study_guard.py", "The learned methods' guard on the deep plain networks"),
}


def _cell(x: object) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def _md_table(columns: list[str], rows: list[list[object]]) -> list[str]:
    return [
        "| " + " | ".join(_cell(c) for c in columns) + " |",
        "|" + " --- |" * len(columns),
        *("| " + " | ".join(_cell(c) for c in row) + " |" for row in rows),
    ]


def _counts(verdicts: list[dict]) -> str:
    kinds = ("supported", "not supported", "inconclusive", "met", "not met")
    n = {k: sum(v["verdict"] == k for v in verdicts) for k in kinds}
    return ", ".join(f"{n[k]} {k}" for k in kinds if n[k] or k in kinds[:3])


def claims() -> str:
    """One row per study: the claim, the verdict counts, the script and its result files."""
    rows = []
    for key, (script, title) in STUDIES.items():
        d = _load(f"study_{key}.json")
        if d is None:
            rows.append([title, "_not run yet_", f"`benchmarks/{script}`"])
            continue
        rows.append([f"{title}: {d['claim']}", _counts(d["verdicts"]), f"`benchmarks/{script}`"])
    return "\n".join(_md_table(["study and claim", "verdicts (paired by seed, 1 and 2 threads)", "script"], rows))


def study(key: str, verdicts: bool = False) -> Callable[[], str]:
    """A study's table and notes (README), or every verdict with its evidence (docs/studies.md)."""
    script, _ = STUDIES[key]

    def render() -> str:
        d = _load(f"study_{key}.json")
        if d is None:
            return f"_no results yet: run `python benchmarks/{script}`_"
        prov = d["provenance"]
        head = (
            f"From `benchmarks/results/study_{key}.json` (torch {prov['torch']}, revision "
            f"{prov['git_revision'][:8]}, {prov['date'][:10]}); plot `benchmarks/results/study_{key}.png`."
        )
        if verdicts:
            lines = [head, "", *(f"- **{v['verdict']}**: {v['claim']} — {v['evidence']}" for v in d["verdicts"])]
            return "\n".join(lines)
        t = d["table"]
        lines = [f"{t['title']}. {head}", "", *_md_table(t["columns"], t["rows"]), ""]
        for extra in (k for k in d if k.endswith("_table")):
            lines += [f"{d[extra]['title']}:", "", *_md_table(d[extra]["columns"], d[extra]["rows"]), ""]
        lines += [f"- {n}" for n in d.get("notes", [])]
        lines.append(
            f"- Verdicts: {_counts(d['verdicts'])} (each with its evidence in [docs/studies.md](docs/studies.md))."
        )
        return "\n".join(lines)

    return render


def cost() -> str:
    """Claims study 6: each method's init time in training steps of the same run (median over
    seeds, 1 thread) and as a share of the study's training run, from the deep-network study."""
    d = _load("study_deep.json")
    if d is None:
        return "_no results yet: run `python benchmarks/study_deep.py`_"
    runs = [r for r in d["runs"] if r["threads"] == 1 and r["init"] != "default"]
    tasks = list(dict.fromkeys(r["task"] for r in runs))
    inits = list(dict.fromkeys(r["init"] for r in runs))
    rows = []
    for init in inits:
        row = [init]
        for task in tasks:
            xs = sorted(r["init_in_train_steps"] or 0.0 for r in runs if r["task"] == task and r["init"] == init)
            if not xs:
                row.append("not run")
                continue
            med = xs[len(xs) // 2]
            steps = next(r["train_steps"] for r in runs if r["task"] == task)
            row.append(f"{med:.0f} ({100 * med / steps:.0f} % of {steps})")
        rows.append(row)
    head = (
        "Init cost in training steps of the same model and batch (median over seeds, 1 thread), and as a share "
        f"of the study's {d['config']['steps']}-step training run (`benchmarks/results/study_deep.json`). "
        "Small models make the fixed per-iteration overhead of the learned methods large in training steps."
    )
    return "\n".join([head, "", *_md_table(["init", *tasks], rows)])


TABLES: dict[str, Callable[[], str]] = {
    "claims": claims,
    "study-cost": cost,
    **{f"study-{k}": study(k) for k in STUDIES},
    "demo": demo,
    "metainit-cost": _generic("metainit_cost.json", "bench_metainit.py"),
    "vs-reference": vs_reference,
    "nio-cost": nio_cost,
    "small-cost": small_cost,
    "gradinit-cost": gradinit_cost,
    "hessian-cost": hessian_cost,
    "hessian-tracking": hessian_tracking,
}


DOC_TABLES: dict[str, Callable[[], str]] = {f"study-{k}-verdicts": study(k, verdicts=True) for k in STUDIES}


def hf(name: str = "study_hf.json") -> str:
    """Every method at its defaults on the Hugging Face models of ``study_hf.py``."""
    d = _load(name)
    if d is None:
        return "_no results yet: run `python benchmarks/study_hf.py`_"
    prov, cfg = d["provenance"], d["config"]
    given = cfg.get("init_optimizer", "auto only")
    head = (
        f"Held-out loss after {cfg['steps']} steps of {cfg['optimizer']} (batch {cfg['batch_size']}), mean ± std over "
        f"{len(cfg['seeds'])} seeds, and the paired difference to the model's own init (same draw, same batches); "
        "verdict on the loss: worse/better when the mean difference clears 0 by two standard errors, else tie. "
        f"Optimizer given to the inits: {given}. Guard: on how many seeds the learned method's guard kept its "
        f"scales. Init cost in training steps of the same run. From `benchmarks/results/{name}` (torch "
        f"{prov['torch']}, transformers {prov['transformers']}, {prov['threads']} thread(s), revision "
        f"{prov['git_revision'][:8]}, {prov['date'][:10]})."
    )
    if prov.get("merged_into"):
        older = prov["merged_into"]
        names = [f"{r['task']}/{r['init']}" for r in d["table"]]
        redone = [n for n in names if n not in older["runs_kept"]]
        head += (
            f" The runs of {', '.join(redone)} were rerun at that revision; all others are from revision "
            f"{older['git_revision'][:8]} ({older['date'][:10]})."
        )
    rows = []
    for r in d["table"]:
        if r["test_loss"] is None:
            rows.append([r["task"], r["init"], f"error ({r['errors']} runs)", "", "", "", ""])
            continue
        p = r.get("loss_vs_default") or {}
        diff = f"{p['mean']:+.4f} ± {p['std']:.4f}" if p.get("n") else "—"
        rows.append(
            [
                r["task"],
                r["init"],
                f"{r['test_loss'][0]:.4f} ± {r['test_loss'][1]:.4f}",
                f"{r['test_acc'][0]:.3f} ± {r['test_acc'][1]:.3f}",
                diff,
                r.get("verdict", "—"),
                _guard_kept(d["runs"], r["task"], r["init"]),
                f"{r['init_in_train_steps']:.0f}",
            ]
        )
    cols = ["model", "init", "held-out loss", "accuracy", "loss − own init (paired)", "verdict", "guard", "init cost"]
    return "\n".join([head, "", *_md_table(cols, rows)])


def _guard_kept(runs: list[dict[str, Any]], task: str, init: str) -> str:
    kept = [r["guard"]["kept"] for r in runs if r["task"] == task and r["init"] == init and "guard" in r]
    return f"kept {sum(kept)}/{len(kept)}" if kept else ""


HF_TABLES: dict[str, Callable[[], str]] = {
    "study-hf": hf,
    "study-hf-no-optimizer": lambda: hf("study_hf_no_optimizer.json"),
}


def render(text: str, tables: dict[str, Callable[[], str]] = TABLES) -> str:
    for key, fn in tables.items():
        pattern = re.compile(rf"(<!-- {re.escape(key)} -->\n)(.*?)(<!-- /{re.escape(key)} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"the file has no <!-- {key} --> ... <!-- /{key} --> block")
        text = pattern.sub(lambda m, fn=fn: m.group(1) + fn() + "\n" + m.group(3), text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if README.md is not up to date")
    args = p.parse_args(argv)
    stale = []
    for path, tables in (
        (ROOT / "README.md", TABLES),
        (ROOT / "docs" / "studies.md", DOC_TABLES),
        (ROOT / "docs" / "huggingface.md", HF_TABLES),
    ):
        old = path.read_text()
        new = render(old, tables)
        if new != old:
            stale.append(path.name)
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(f"{', '.join(stale)}: benchmark tables are out of date: run python benchmarks/readme_tables.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
