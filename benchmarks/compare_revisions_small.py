"""Before/after: ``bench_small.py``'s wall-clock ratios on two source trees, alternated.

Claim: the changes of issue 13 lower one MetaInit and one NIO iteration on the demo's MLP, in
SGD training steps, measured on two checkouts of initopt (e.g. the commit before and after)
by the same method in alternating processes, so that both see the same machine load.

Method: for each of ``--pairs`` pairs, one fresh process per tree (first ``--before``, then
``--after``) builds the demo model and batch (as ``bench_small.build``, but with the tree's own
``initopt``), then runs ``--rounds`` interleaved rounds of 30 SGD steps, 10 MetaInit
iterations (``MetaInitRun.step`` through the tree's ``benchmarks/bench_metainit.Stepper``)
and an ``initialize_(..., "nio", steps=10, guard=False)`` run (median of its per-iteration
``seconds``); per round the ratios of medians; per process the median and range over rounds.
MetaInit is also timed in process CPU time. Needs only what both trees have, so it runs on
the code from before ``bench_small.py`` existed.

    python benchmarks/compare_revisions_small.py --before OLD_TREE --after NEW_TREE [--threads 1 2]
        [--pairs 3] [--rounds 7] [--out FILE]

A tree is a directory with ``src/initopt`` and ``benchmarks/bench_metainit.py`` (e.g.
``git archive <commit> src benchmarks | tar -x -C OLD_TREE``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


def child(root: str, threads: int, rounds: int) -> dict[str, list[float]]:
    """Runs inside the subprocess, with ``root``'s initopt on the path."""
    sys.path[:0] = [os.path.join(root, "benchmarks"), os.path.join(root, "src")]
    import copy
    import time

    import torch
    from bench_metainit import Stepper, TrainStep

    import initopt
    from initopt.cli import TASKS, load_model, load_task
    from initopt.data import loader

    torch.set_num_threads(threads)
    train, _ = load_task("digits", seed=0)
    make = load_model(TASKS["digits"]["model"], "digits")
    torch.manual_seed(0)
    model = make()
    dl = loader(train, 64, seed=0)
    batch = next(iter(dl))
    ts, mi = TrainStep(model, batch), Stepper(copy.deepcopy(model), batch)

    def nio(n: int) -> float:
        r = initopt.initialize_(copy.deepcopy(model), dl, "nio", steps=n, guard=False, progress=False)
        return statistics.median(h["seconds"] for h in r.history)

    def med(fn: Any, n: int, clock: Any = time.perf_counter) -> float:
        out = []
        for _ in range(n):
            t0 = clock()
            fn()
            out.append(clock() - t0)
        return statistics.median(out)

    for _ in range(3):
        ts.step()
        mi.step()
    nio(2)
    r: dict[str, list[float]] = {"metainit": [], "nio": [], "metainit_cpu": []}
    for _ in range(rounds):
        t, m, n = med(ts.step, 30), med(mi.step, 10), nio(10)
        tc, mc = med(ts.step, 30, time.process_time), med(mi.step, 10, time.process_time)
        r["metainit"].append(m / t)
        r["nio"].append(n / t)
        r["metainit_cpu"].append(mc / tc)
    return r


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from common import spread  # here, not at the top: common imports initopt, the child picks its own

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True)
    ap.add_argument("--after", required=True)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "small_before_after.json"))
    ap.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        root, threads, rounds = args._child
        print(json.dumps(child(root, int(threads), int(rounds))))
        return {}
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    env.pop("PYTHONPATH", None)
    result: dict[str, Any] = {
        "claim": __doc__.split("\n\n")[1].replace("\n", " "),
        "config": {k: getattr(args, k) for k in ("before", "after", "threads", "pairs", "rounds")},
        "threads": {},
    }
    for threads in args.threads:
        runs: dict[str, list[dict[str, list[float]]]] = {"before": [], "after": []}
        for _ in range(args.pairs):
            for which in ("before", "after"):
                root = os.path.abspath(getattr(args, which))
                cmd = [sys.executable, os.path.abspath(__file__), "--before", ".", "--after", "."]
                cmd += ["--_child", root, str(threads), str(args.rounds)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
                runs[which].append(json.loads(out.stdout.strip().splitlines()[-1]))
        entry: dict[str, Any] = {"per_process": runs}
        for which, procs in runs.items():
            entry[which] = {k: spread([statistics.median(p[k]) for p in procs]) for k in procs[0]}
            entry[which + "_all_rounds"] = {k: spread([x for p in procs for x in p[k]]) for k in procs[0]}
        result["threads"][str(threads)] = entry
        b, a = entry["before_all_rounds"], entry["after_all_rounds"]
        print(
            f"{threads} thread(s), all rounds: MetaInit {b['metainit']['median']:.2f} -> {a['metainit']['median']:.2f} "
            f"train steps (CPU {b['metainit_cpu']['median']:.2f} -> {a['metainit_cpu']['median']:.2f}); "
            f"NIO {b['nio']['median']:.2f} -> {a['nio']['median']:.2f}",
            flush=True,
        )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
