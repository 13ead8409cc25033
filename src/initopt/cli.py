"""Command line: ``initopt list | init | demo`` (also ``python -m initopt``).

Exit codes: 0 success, 1 failure of the run (an :class:`~initopt.InitOptError`), 2 usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

import torch

import initopt
from initopt.errors import InitOptError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # exit code 2 with a hint, as argparse does
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n(run '{self.prog} --help' for the options)\n")


def _config_rows(name: str) -> list[tuple[str, str, Any]]:
    cls = initopt.get_method(name).Config
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((f.name, getattr(f.type, "__name__", str(f.type)), default))
    return rows


def cmd_list(args: argparse.Namespace) -> int:
    """Print every registered method with its config fields and defaults."""
    for name in initopt.methods():
        cls = initopt.get_method(name)
        print(f"{name}: {cls.summary}")
        for field, typ, default in _config_rows(name):
            print(f"    {field:<16} {typ:<24} default {default!r}")
    return 0


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_set(pairs: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in pairs:
        if "=" not in item:
            raise InitOptError(f"--set takes key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = _parse_value(v)
    return out


def cmd_demo(args: argparse.Namespace) -> int:
    """GradInit on a deep plain MLP (10 hidden ReLU layers, no normalization) on digits."""
    from initopt import zoo
    from initopt.data import digits, loader

    torch.manual_seed(args.seed)
    train, _ = digits(seed=args.seed)
    model = zoo.mlp(depth=10, width=64, in_features=64, num_classes=10)
    print(
        "initopt demo: GradInit on a 10-hidden-layer plain ReLU MLP (PyTorch default init, no normalization)\n"
        f"on scikit-learn's digits, batch 64, {args.steps} iterations, scale lr {args.lr}\n"
    )
    res = initopt.initialize_(
        model,
        loader(train, 64, seed=args.seed),
        "gradinit",
        steps=args.steps,
        lr=args.lr,
        seed=args.seed,
        progress=None if not args.quiet else False,
    )
    _print_result(res)
    return 0


def _print_result(res: initopt.InitResult) -> None:
    n_con = sum(h.get("branch") == "constraint" for h in res.history)
    print(f"{res.method}: {len(res.history)} iterations ({n_con} constraint steps) in {res.seconds:.2f} s\n")
    keys = sorted(set(res.before) | set(res.after))
    if keys:
        print(f"{'measure':<18}{'before':>12}{'after':>12}")
        for k in keys:
            print(f"{k:<18}{res.before.get(k, float('nan')):>12.5f}{res.after.get(k, float('nan')):>12.5f}")
        print()
    if res.scales:
        width = max(len(n) for n in res.scales)
        print(f"{'parameter':<{width}}  scale")
        for n, s in res.scales.items():
            print(f"{n:<{width}}  {s:.4f}")
    if res.unscalable:
        print(f"\nunscalable (norm 0, stay 0): {', '.join(res.unscalable)}")


def cmd_init(args: argparse.Namespace) -> int:
    """Run a method on a zoo model and built-in data; write weights and the result JSON."""
    from initopt import zoo
    from initopt.data import digits, loader

    torch.manual_seed(args.seed)
    model = zoo.build(args.model, **_parse_set(args.model_arg))
    train, _ = digits(seed=args.seed)
    config = _parse_set(args.set)
    res = initopt.initialize_(
        model,
        loader(train, args.batch_size, seed=args.seed),
        args.method,
        steps=args.steps,
        seed=args.seed,
        progress=None if not args.quiet else False,
        **config,
    )
    _print_result(res)
    if args.out:
        torch.save(model.state_dict(), args.out)
        print(f"\nweights written to {args.out}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res.to_dict(), f, indent=2)
        print(f"result written to {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="initopt", description="Find better starting weights for PyTorch networks.")
    p.add_argument("--version", action="version", version=f"initopt {initopt.__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("list", help="registered methods with their config fields and defaults")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("demo", help="GradInit on a deep plain MLP on digits (about 10 s on 2 CPU cores)")
    s.add_argument("--steps", type=int, default=150)
    s.add_argument("--lr", type=float, default=0.05)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("init", help="run a method on a built-in model and the digits data")
    s.add_argument("--method", default="gradinit")
    s.add_argument("--model", default="mlp", help="built-in model name (see initopt.zoo.MODELS)")
    s.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="method config field")
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", help="write the initialized state_dict here (torch.save; weights_only loadable)")
    s.add_argument("--json", help="write the result JSON here")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_init)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``initopt`` command."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except InitOptError as e:
        print(f"initopt: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("initopt: interrupted; the model was left unchanged", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
