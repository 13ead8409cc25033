"""Run ``initopt demo`` at 1 and at 2 threads and keep both results.

Claim: the demo's verdicts (``auto`` against PyTorch's default init and against Kaiming, paired
by seed: better / worse / tie at two standard errors) are the same at 1 and at 2 threads. The
README's demo table is rendered from ``results/demo/threads1`` with the final accuracy at 2
threads, the largest per-seed difference and both threads' verdicts beside it
(``python benchmarks/readme_tables.py``).

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
