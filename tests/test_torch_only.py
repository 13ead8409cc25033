"""The hard dependency is torch only: every method runs with the optional extras absent."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
for name in ("numpy", "matplotlib", "sklearn", "tqdm", "safetensors", "yaml", "mnist1d", "scipy"):
    sys.modules[name] = None
import torch, initopt
m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
b = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
for meth in initopt.methods():
    initopt.initialize_(m, b, meth, steps=2)
print("ok", len(initopt.methods()))
"""


def test_every_method_runs_without_optional_packages():
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok")
