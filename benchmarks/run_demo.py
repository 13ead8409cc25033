"""Run ``initopt demo`` at 1 and at 2 threads and keep both results.

Claim: the demo's verdict (PyTorch's default init does not train the 10-layer plain MLP;
Kaiming, LSUV, the Hessian rule and the pipelines built on it do; the learned methods from the
default init do not) is the same at 1 and at 2 threads. The README's demo table is rendered from
``results/demo/threads1`` with the final accuracy at 2 threads and the largest per-seed
difference beside it (``python benchmarks/readme_tables.py``).

    python benchmarks/run_demo.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    for threads in (1, 2):
        out = HERE / "results" / "demo" / f"threads{threads}"
        cmd = [sys.executable, "-m", "initopt", "demo", "--quiet", "--threads", str(threads), "--out-dir", str(out)]
        print(" ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
