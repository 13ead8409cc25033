"""Peak memory of each method's search in units of the parameter memory P (CPU, RSS).

Claim checked: the per-method multiples of P quoted in docs/distributed.md. Each method runs in
its own process on a wide float32 MLP (parameters dominate; activations are small), and the
peak resident set size of the search, minus the resident size after building the model and
one forward pass, is divided by the bytes of the parameters. CPU RSS also counts allocator
slack, so read the multiples as estimates to about +-0.5 P.

    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/memory_probe.py ["case name" ...]
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import torch
from torch import nn

WIDTH, DEPTH, BATCH = 2048, 4, 8
CASES = {
    "kaiming": ("kaiming", {}),
    "lsuv": ("lsuv", {}),
    "hessian": ("hessian", {}),
    "gradinit": ("gradinit", {"steps": 3}),
    "gradinit (constraint step)": ("gradinit", {"steps": 3, "gamma": 1e-9}),
    "metainit": ("metainit", {"steps": 3, "source": "batches"}),
    "nio (num_splits=2)": ("nio", {"steps": 3, "num_splits": 2}),
    "nio (num_splits=4)": ("nio", {"steps": 3, "num_splits": 4}),
    "hessian (data)": ("hessian", {"mode": "data", "steps": 1}),
    "auto (starts only)": ("auto", {"learned": (), "trial_steps": 2, "max_trial_steps": 2, "holdout": 1}),
}


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def one(name: str) -> dict[str, float]:
    import initopt

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    net = nn.Sequential(*layers, nn.Linear(WIDTH, 10))
    batch = (torch.randn(BATCH, WIDTH), torch.randint(0, 10, (BATCH,)))
    with torch.no_grad():
        net(batch[0])
    p_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    base = _rss_bytes()
    method, config = CASES[name]
    initopt.initialize_(net, batch, method, progress=False, **config)
    extra = max(0, _peak_bytes() - base)
    return {"P (millions)": sum(p.numel() for p in net.parameters()) / 1e6, "extra peak / P": extra / p_bytes}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(one(sys.argv[2])))
        return
    for name in sys.argv[1:] or CASES:
        out = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name:28s} P = {r['P (millions)']:.1f}M  extra peak = {r['extra peak / P']:.2f} P")


if __name__ == "__main__":
    main()
