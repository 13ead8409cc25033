"""Render the README's benchmark tables from the committed JSON results.

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
    ref = _load("gradinit_vs_reference.json") or {"models": {}}
    prov = d["provenance"]
    lines = [
        f"GradInit iteration cost in SGD training steps of the same model and batch ({d['config']['batch']} "
        f"examples; torch {prov['torch']}, {prov['threads']} thread(s), revision {prov['git_revision'][:8]}). "
        "Median over interleaved rounds, then mean ± std over rounds.",
        "",
        "| model | objective iteration | constraint iteration | peak memory (objective / constraint) "
        "| ours ÷ reference, objective iterations |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, e in d["models"].items():
        mem = e.get("memory")
        mem_s = f"{mem['objective_in_train_steps']:.2f}× / {mem['constraint_in_train_steps']:.2f}×" if mem else "n/a"
        r = ref["models"].get(name, {}).get("ours_objective_over_reference_objective")
        r_s = _ms(r) if r else "not measured"
        lines.append(
            f"| {name} | {_ms(e['objective_iteration_in_train_steps'])} | "
            f"{_ms(e['constraint_iteration_in_train_steps'])} | {mem_s} | {r_s} |"
        )
    if ref["models"]:
        lines += [
            "",
            "Reference: "
            + ref["reference"]
            + ". In the same runs the reference's objective iteration costs "
            + ", ".join(
                f"{_ms(v['reference_objective_in_train_steps'])} training steps on {k}"
                for k, v in ref["models"].items()
            )
            + f" (`benchmarks/results/gradinit_vs_reference.json`, {ref['provenance']['threads']} thread(s)).",
        ]
    return "\n".join(lines)


TABLES: dict[str, Callable[[], str]] = {"gradinit-cost": gradinit_cost}


def render(text: str) -> str:
    for key, fn in TABLES.items():
        pattern = re.compile(rf"(<!-- {re.escape(key)} -->\n)(.*?)(<!-- /{re.escape(key)} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md has no <!-- {key} --> ... <!-- /{key} --> block")
        text = pattern.sub(lambda m, fn=fn: m.group(1) + fn() + "\n" + m.group(3), text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if README.md is not up to date")
    args = p.parse_args(argv)
    readme = ROOT / "README.md"
    old = readme.read_text()
    new = render(old)
    if args.check:
        if new != old:
            print("README.md benchmark tables are out of date: run python benchmarks/readme_tables.py")
            return 1
        return 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
