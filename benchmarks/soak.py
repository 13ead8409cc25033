"""Soak: every registered method on every model of the test zoo, three seeds, in ONE process.

Claim: running every method of ``METHOD_CASES`` on every model of ``MODEL_CASES``
(``tests/zoo_cases.py``) for seeds 0, 1 and 2 in one Python process leaves nothing behind
and does not leak:

1. Nothing is left behind by any call (checked before and after every ``initialize_`` call,
   whether it returned or raised): no module hook of any kind on any module of the model
   (forward, forward-pre, backward, backward-pre, state-dict and load-state-dict hooks and
   their kwargs / always-called variants), no tensor hook on any parameter, no global module
   hook (``torch.nn.modules.module._global_*``); the torch function-mode stack, the
   dispatch-mode stack and the functorch interpreter stack are as before (empty); grad mode
   on, inference mode off, anomaly mode, autocast and deterministic-algorithm settings as
   before; ``torch.get_default_dtype()``, ``torch.get_num_threads()`` and the interop
   thread count unchanged; the global CPU RNG state (``torch.get_rng_state()``) unchanged;
   ``warnings.filters`` unchanged (except a filter added by the import of a package that the
   call imported for the first time in the process, e.g. torch's lazy ``import sympy``:
   recorded under ``import_side_effects``, not a violation); every module's ``training``
   flag unchanged; every parameter's ``.grad`` unchanged (``None`` stays ``None``; a tensor
   stays the same object with the same values) and ``requires_grad`` unchanged.
2. Peak memory is stable after the first round: see the verdict rule below.

Method: rounds = seeds 0, 1, 2. In each round, for every entry ``(method, config, steps)`` of
``METHOD_CASES`` -- run at its own ``steps`` and again at ``--long-factor`` times as many
("long") -- and every ``ModelCase``: ``torch.manual_seed(seed)``, build the model, then
``initialize_(model, data_for(case, seed=seed), method, steps=..., seed=seed, **config)``.
So the checks see more than fresh models, the rounds differ in the state the model starts
in: round 1 (seed 0) takes the model as built (train mode, every ``.grad`` None); round 2
(seed 1) first fills every parameter's ``.grad`` with a marker tensor; round 3 (seed 2)
first puts every other module (in ``model.modules()`` order) in eval mode. A call that
raises an ``InitOptError`` (a documented refusal, e.g. a model a method cannot handle) is
recorded with its message and is not a failure; any other exception is a failure.

Memory: after each round, ``gc.collect()``, then the process's resident set (``VmRSS``) and
its high-water mark (``VmHWM``) from ``/proc/self/status``, the number of live
``torch.Tensor`` and ``nn.Module`` objects among ``gc.get_objects()``, and the object types
whose counts grew most since the previous round. The same is recorded once before round 1.

Verdict rule (with 3 rounds): memory is stable iff, for rounds 2 and 3, VmRSS and VmHWM
after the round exceed their values after round 1 by at most max(5 % of the round-1
value, 8 MiB), and the live tensor and live module counts after each round are at most
those after the round before. The soak passes iff memory is stable, no call failed and no
violation was found. With one round (``--quick``) memory stability is "not applicable".

Run: ``OMP_WAIT_POLICY=PASSIVE python benchmarks/soak.py`` (full; a few minutes at one
thread) or ``--quick`` (one round, two methods, two models; seconds; used by the tests).
Writes ``benchmarks/results/soak.json``.
"""

from __future__ import annotations

import argparse
import collections
import gc
import itertools
import json
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import provenance
from zoo_cases import METHOD_CASES, MODEL_CASES, data_for

import initopt
from initopt import InitOptError

HERE = Path(__file__).resolve().parent

MiB = 1 << 20
RSS_REL_TOL = 0.05
RSS_ABS_TOL_MIB = 8.0
QUICK_METHODS = (0, 6)  # METHOD_CASES indices: gradinit (first case) and kaiming
QUICK_MODELS = ("mlp", "cnn_bn")

MODULE_HOOK_ATTRS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
GLOBAL_HOOK_ATTRS = (
    "_global_forward_hooks",
    "_global_forward_hooks_with_kwargs",
    "_global_forward_hooks_always_called",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
    "_global_module_registration_hooks",
    "_global_parameter_registration_hooks",
    "_global_buffer_registration_hooks",
)


# ---------------------------------------------------------------------------------------
# state snapshots


def _len(x: Any) -> int:
    return 0 if x is None else len(x)


def global_state() -> dict[str, Any]:
    """Process-wide torch / Python state a call must leave as it found it (comparable values)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    mm = torch.nn.modules.module
    state: dict[str, Any] = {f"module.{a}": _len(getattr(mm, a, None)) for a in GLOBAL_HOOK_ATTRS}
    state.update(
        {
            "function_mode_stack": [type(m).__qualname__ for m in torch.overrides._get_current_function_mode_stack()],
            "dispatch_mode_stack": [type(m).__qualname__ for m in _get_current_dispatch_mode_stack()],
            "functorch_interpreter_stack": repr(torch._C._functorch.peek_interpreter_stack()),
            "grad_enabled": torch.is_grad_enabled(),
            "inference_mode": torch.is_inference_mode_enabled(),
            "anomaly_enabled": torch.is_anomaly_enabled(),
            "autocast_cpu": torch.is_autocast_enabled("cpu"),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "default_dtype": str(torch.get_default_dtype()),
            "num_threads": torch.get_num_threads(),
            "num_interop_threads": torch.get_num_interop_threads(),
            "warnings_filters": len(warnings.filters),
            "warnings_filters_head": repr(warnings.filters[:3]),
        }
    )
    return state


def model_state(model: nn.Module) -> dict[str, Any]:
    """Hooks, modes, grads and requires_grad of every module and parameter of ``model``."""
    modules = list(model.named_modules(remove_duplicate=False))
    params = list(model.named_parameters(remove_duplicate=False))
    return {
        "hooks": {
            f"{name or '<root>'}.{a}": _len(getattr(m, a, None))
            for name, m in modules
            for a in MODULE_HOOK_ATTRS
            if _len(getattr(m, a, None))
        },
        "hook_total": sum(_len(getattr(m, a, None)) for _, m in modules for a in MODULE_HOOK_ATTRS),
        "tensor_hooks": {
            n: (_len(p._backward_hooks), _len(getattr(p, "_post_accumulate_grad_hooks", None))) for n, p in params
        },
        "training": [(name or "<root>", m.training) for name, m in modules],
        "requires_grad": {n: p.requires_grad for n, p in params},
        "grads": {n: (None if p.grad is None else (id(p.grad), p.grad.detach().clone())) for n, p in params},
    }


def _diff_model(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    out = []
    if before["hooks"] != after["hooks"] or before["hook_total"] != after["hook_total"]:
        added = {k: v for k, v in after["hooks"].items() if before["hooks"].get(k) != v}
        out.append(f"module hooks changed: {before['hook_total']} -> {after['hook_total']} ({added})")
    if before["tensor_hooks"] != after["tensor_hooks"]:
        ch = {k: v for k, v in after["tensor_hooks"].items() if before["tensor_hooks"].get(k) != v}
        out.append(f"parameter tensor hooks changed: {ch}")
    if before["training"] != after["training"]:
        ch = [f"{a[0]}: {a[1]}->{b[1]}" for a, b in zip(before["training"], after["training"], strict=False) if a != b]
        out.append(f"training flags changed: {ch}")
    if before["requires_grad"] != after["requires_grad"]:
        out.append("requires_grad changed")
    for n, g0 in before["grads"].items():
        g1 = after["grads"].get(n)
        if g0 is None and g1 is None:
            continue
        if g0 is None or g1 is None:
            out.append(f".grad of {n}: {'None' if g0 is None else 'tensor'} -> {'None' if g1 is None else 'tensor'}")
        elif g0[0] != g1[0]:
            out.append(f".grad of {n} replaced by another tensor")
        elif not torch.equal(g0[1], g1[1]):
            out.append(f".grad of {n} values changed")
    return out


def _diff_global(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    return [f"{k}: {before[k]!r} -> {after[k]!r}" for k in before if before[k] != after[k]]


def _restore(before: dict[str, Any]) -> None:
    """Put back the simple global settings a faulty call changed, so later calls are judged alone."""
    torch.set_grad_enabled(before["grad_enabled"])
    torch.set_default_dtype(getattr(torch, before["default_dtype"].removeprefix("torch.")))
    torch.set_num_threads(before["num_threads"])
    torch.autograd.set_detect_anomaly(before["anomaly_enabled"])


def _import_side_effects(filters0: list[Any], new_modules: list[str]) -> list[str]:
    """Warnings filters added during the call by the import of a package first imported in it.

    (E.g. ``import sympy``, which torch performs lazily, adds a ``once`` filter for
    ``SymPyDeprecationWarning``: a one-time effect of the first import in the process, not
    state a method leaves behind.) Returns the descriptions of such filters if every filter
    added or removed is of that kind, else an empty list (then the change is a violation).
    """
    before = {repr(f) for f in filters0}
    added = [f for f in warnings.filters if repr(f) not in before]
    removed = len(filters0) + len(added) - len(warnings.filters)
    new_pkgs = {m.split(".")[0] for m in new_modules}
    if not added or removed:
        return []
    notes = []
    for f in added:
        category = f[2]
        pkg = getattr(category, "__module__", "").split(".")[0]
        if pkg not in new_pkgs:
            return []
        notes.append(
            f"warnings filter ({f[0]!r}, {category.__module__}.{category.__qualname__}) "
            f"added by the first import of {pkg}"
        )
    return notes


# ---------------------------------------------------------------------------------------
# memory


def proc_status() -> dict[str, float]:
    """VmRSS and VmHWM of this process in MiB (from /proc/self/status)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0]) / 1024  # kB -> MiB
    return out


def memory_probe(previous_types: collections.Counter | None) -> tuple[dict[str, Any], collections.Counter]:
    gc.collect()
    gc.collect()
    objs = gc.get_objects()
    types: collections.Counter = collections.Counter(type(o).__qualname__ for o in objs)
    tensors = modules = 0
    for o in objs:  # type(), not isinstance(): no __class__ properties (deprecation shims) are run
        if issubclass(type(o), torch.Tensor):
            tensors += 1
        elif issubclass(type(o), nn.Module):
            modules += 1
    del objs
    st = proc_status()
    probe = {
        "rss_mib": round(st["VmRSS"], 2),
        "hwm_mib": round(st["VmHWM"], 2),
        "live_tensors": tensors,
        "live_modules": modules,
        "gc_objects": sum(types.values()),
    }
    if previous_types is not None:
        grown = (types - previous_types).most_common(10)
        probe["types_grown_since_previous"] = dict(grown)
    return probe, types


# ---------------------------------------------------------------------------------------
# one call


def _prepare(model: nn.Module, round_index: int) -> None:
    if round_index % 3 == 1:  # round 2: every .grad filled with a marker
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.125)
    elif round_index % 3 == 2:  # round 3: every other module in eval mode
        for i, m in enumerate(model.modules()):
            m.training = i % 2 == 0


def run_one(method: str, cfg: dict[str, Any], steps: int, case: Any, seed: int, round_index: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = case.make()
    _prepare(model, round_index)
    data = data_for(case, seed=seed)
    g0, m0 = global_state(), model_state(model)
    rng0 = torch.get_rng_state()
    modules0, filters0 = set(sys.modules), list(warnings.filters)
    rec: dict[str, Any] = {"method": method, "model": case.name, "seed": seed, "steps": steps}
    t0 = time.perf_counter()
    try:
        res = initopt.initialize_(model, data, method, steps=steps, seed=seed, **cfg)
        rec["outcome"] = "ok"
        del res
    except InitOptError as e:
        rec["outcome"] = "InitOptError"
        rec["message"] = f"{type(e).__name__}: {e}"
    except Exception as e:
        rec["outcome"] = "failure"
        rec["message"] = f"{type(e).__name__}: {e}"
        rec["traceback"] = traceback.format_exc(limit=-6)
    rec["seconds"] = round(time.perf_counter() - t0, 4)
    g1, m1 = global_state(), model_state(model)
    new_modules = sorted(set(sys.modules) - modules0)
    if new_modules:
        rec["new_imports"] = {"count": len(new_modules), "packages": sorted({m.split(".")[0] for m in new_modules})}
    problems = _diff_global(g0, g1) + _diff_model(m0, m1)
    notes = _import_side_effects(filters0, new_modules)
    if notes:
        rec["import_side_effects"] = notes
        problems = [x for x in problems if not x.startswith("warnings_filters")]
    if not torch.equal(rng0, torch.get_rng_state()):
        problems.append("global CPU RNG state changed by the call")
    if problems:
        rec["violations"] = problems
        _restore(g0)
    return rec


# ---------------------------------------------------------------------------------------
# verdict


def memory_verdict(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    rule = (
        f"for rounds 2..n: VmRSS and VmHWM after the round <= their round-1 values + max({RSS_REL_TOL:.0%} of the "
        f"round-1 value, {RSS_ABS_TOL_MIB:g} MiB); live torch.Tensor and nn.Module counts after each round <= "
        "those after the previous round (all measured after gc.collect())"
    )
    if len(rounds) < 2:
        return {"rule": rule, "stable": None, "reason": "not applicable: fewer than 2 rounds"}
    first = rounds[0]["memory"]
    reasons = []
    for key in ("rss_mib", "hwm_mib"):
        tol = max(RSS_REL_TOL * first[key], RSS_ABS_TOL_MIB)
        for r in rounds[1:]:
            growth = r["memory"][key] - first[key]
            if growth > tol:
                reasons.append(f"round {r['round']} {key} grew {growth:.1f} MiB over round 1 (tolerance {tol:.1f})")
    for key in ("live_tensors", "live_modules"):
        for prev, r in itertools.pairwise(rounds):
            if r["memory"][key] > prev["memory"][key]:
                reasons.append(f"round {r['round']} {key} {prev['memory'][key]} -> {r['memory'][key]}")
    growth = {
        key: [round(r["memory"][key] - first[key], 2) for r in rounds[1:]]
        for key in ("rss_mib", "hwm_mib", "live_tensors", "live_modules")
    }
    return {"rule": rule, "stable": not reasons, "reasons": reasons, "growth_over_round_1": growth}


# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one round, two methods, two models (seconds)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--long-factor", type=int, default=10, help="the long variant runs this many times the steps")
    p.add_argument("--out", type=Path, default=HERE / "results" / "soak.json")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. which library source was run)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    method_cases = list(enumerate(METHOD_CASES))
    model_cases = list(MODEL_CASES)
    seeds = list(args.seeds)
    if args.quick:
        method_cases = [method_cases[i] for i in QUICK_METHODS]
        model_cases = [m for m in model_cases if m.name in QUICK_MODELS]
        seeds = seeds[:1]
    variants = [("own", 1)] + ([("long", args.long_factor)] if args.long_factor > 1 else [])
    config = {
        "quick": args.quick,
        "seeds": seeds,
        "method_cases": [{"index": i, "method": m, "config": c, "steps": s} for i, (m, c, s) in method_cases],
        "models": [m.name for m in model_cases],
        "variants": {name: f"steps x {f}" for name, f in variants},
        "long_factor": args.long_factor,
        "registered_methods": initopt.methods(),
        "initopt_file": initopt.__file__,
        "note": args.note,
        "round_states": {
            "1": "models as built",
            "2": "every .grad prefilled with a marker",
            "3": "every other module in eval mode",
        },
    }
    missing = set(initopt.methods()) - {m for _, (m, _, _) in method_cases}
    if missing and not args.quick:
        print(f"warning: registered methods without a case: {sorted(missing)}", flush=True)
    result: dict[str, Any] = {"config": config, "provenance": provenance(args.threads)}

    start_probe, types = memory_probe(None)
    rounds, calls = [], []
    t_start = time.perf_counter()
    for ri, seed in enumerate(seeds):
        t_round = time.perf_counter()
        n_before = len(calls)
        for ci, (method, cfg, steps) in method_cases:
            for variant, factor in variants:
                for case in model_cases:
                    rec = run_one(method, cfg, steps * factor, case, seed, ri)
                    rec = {"round": ri + 1, "case": ci, "variant": variant, **rec}
                    calls.append(rec)
                    flag = "" if rec["outcome"] == "ok" else f" [{rec['outcome']}]"
                    if "violations" in rec:
                        flag += f" VIOLATIONS: {rec['violations']}"
                    print(
                        f"  r{ri + 1} {method}#{ci} {variant:4s} {case.name:20s} {rec['seconds']:7.3f}s{flag}",
                        flush=True,
                    )
        probe, types = memory_probe(types)
        rnd = {
            "round": ri + 1,
            "seed": seed,
            "calls": len(calls) - n_before,
            "seconds": round(time.perf_counter() - t_round, 2),
            "memory": probe,
        }
        rounds.append(rnd)
        print(
            f"round {ri + 1} (seed {seed}): {rnd['calls']} calls in {rnd['seconds']:.1f}s; RSS {probe['rss_mib']:.1f} "
            f"MiB, HWM {probe['hwm_mib']:.1f} MiB, {probe['live_tensors']} tensors, {probe['live_modules']} modules",
            flush=True,
        )

    violations = [
        {k: c[k] for k in ("round", "method", "case", "variant", "model", "seed", "violations")}
        for c in calls
        if "violations" in c
    ]
    failures = [c for c in calls if c["outcome"] == "failure"]
    refusals = collections.Counter(
        (c["method"], c["case"], c["model"], c["message"]) for c in calls if c["outcome"] == "InitOptError"
    )
    mem = memory_verdict(rounds)
    result.update(
        {
            "memory_before_round_1": start_probe,
            "rounds": rounds,
            "memory_verdict": mem,
            "violations": violations,
            "failures": [
                {k: c.get(k) for k in ("round", "method", "case", "model", "message", "traceback")} for c in failures
            ],
            "import_side_effects": [
                {k: c[k] for k in ("round", "method", "case", "variant", "model", "import_side_effects", "new_imports")}
                for c in calls
                if "import_side_effects" in c
            ],
            "expected_errors": [
                {"method": m, "case": i, "model": mo, "message": msg, "calls": n}
                for (m, i, mo, msg), n in refusals.items()
            ],
            "counts": {
                "calls": len(calls),
                "ok": sum(c["outcome"] == "ok" for c in calls),
                "InitOptError": sum(c["outcome"] == "InitOptError" for c in calls),
                "failure": len(failures),
                "calls_with_violations": len(violations),
            },
            "total_seconds": round(time.perf_counter() - t_start, 2),
            "calls": calls,
        }
    )
    result["verdict"] = {
        "no_violations": not violations,
        "no_failures": not failures,
        "memory_stable": mem["stable"],
        "passed": not violations and not failures and mem["stable"] is not False,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"counts: {result['counts']}; {result['total_seconds']:.1f}s", flush=True)
    print(f"memory: {mem}", flush=True)
    print(f"verdict: {result['verdict']}", flush=True)
    return result


if __name__ == "__main__":
    main()
