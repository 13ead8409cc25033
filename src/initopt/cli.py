"""Command line: ``initopt list | diagnose | init | compare | demo`` (also ``python -m initopt``).

Exit codes: 0 success, 1 failure of the run (an :class:`~initopt.InitOptError` or a file
that cannot be written), 2 usage error (bad arguments). Method config flags are generated
from the method's config dataclass, so ``initopt init --method gradinit --help`` lists them.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import initopt
from initopt.core.step import parse_optimizer
from initopt.errors import ConfigError, InitOptError

__all__ = ["TASKS", "build_parser", "load_model", "load_task", "main"]


class UsageError(InitOptError):
    """Bad command-line arguments (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n(run '{self.prog} --help' for the options)\n")


# ---- tasks and models ------------------------------------------------------------------

TASKS: dict[str, dict[str, Any]] = {
    "digits": {
        "help": "scikit-learn 8x8 digits, 64 features, 10 classes",
        "model": "mlp",
        "model_args": {"in_features": 64, "depth": 10, "width": 64},
    },
    "mnist1d": {
        "help": "MNIST-1D generated offline, 40 features, 10 classes",
        "model": "mlp",
        "model_args": {"in_features": 40, "depth": 10, "width": 64},
    },
    "synthetic": {
        "help": "Gaussian inputs labelled by a random teacher, 32 features, 10 classes",
        "model": "mlp",
        "model_args": {"in_features": 32, "depth": 6, "width": 64},
    },
    "sequences": {
        "help": "token sequences (length 16, vocabulary 32), 4 classes",
        "model": "post_ln_transformer",
        "model_args": {},
    },
    "cifar10": {
        "help": "CIFAR-10 from a local folder (--data-root; torchvision layout, never downloaded)",
        "model": "vgg11",
        "model_args": {},
    },
}


def load_task(name: str, *, data_root: str | None = None, seed: int = 0) -> tuple[Any, Any]:
    """``(train, test)`` data sets of a built-in task."""
    from initopt import data

    if name == "digits":
        return data.digits(seed=seed)
    if name == "mnist1d":
        return data.mnist1d(seed=seed)
    if name == "synthetic":
        return data.synthetic_classification(seed=seed)
    if name == "sequences":
        return data.synthetic_sequences(seed=seed)
    if name == "cifar10":
        if not data_root:
            raise UsageError("the cifar10 task needs --data-root pointing at a local copy of CIFAR-10")
        return data.cifar10(data_root)
    raise UsageError(f"unknown data {name!r}; built-in: {', '.join(TASKS)}")


def load_model(spec: str, task: str | None = None, model_args: dict[str, Any] | None = None) -> Callable[[], nn.Module]:
    """A factory from a zoo name, ``path/to/file.py:factory`` or ``package.module:factory``."""
    from initopt import zoo

    kwargs = dict(model_args or {})
    if spec in zoo.MODELS:
        fn = zoo.MODELS[spec]
        if task and TASKS.get(task, {}).get("model") == spec:
            kwargs = {**TASKS[task]["model_args"], **kwargs}
        elif task in ("digits", "mnist1d", "synthetic") and "in_features" in inspect.signature(fn).parameters:
            kwargs.setdefault("in_features", TASKS[task]["model_args"]["in_features"])
    elif ":" in spec:
        where, _, attr = spec.rpartition(":")
        if where.endswith(".py"):
            if not os.path.exists(where):
                raise UsageError(f"model file not found: {where}")
            mod_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
            assert mod_spec and mod_spec.loader
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            try:
                module = importlib.import_module(where)
            except ImportError as e:
                raise UsageError(f"cannot import {where!r} for --model {spec!r}: {e}") from None
        fn = getattr(module, attr, None)
        if not callable(fn):
            raise UsageError(f"{where} has no callable {attr!r}")
    else:
        raise UsageError(
            f"unknown model {spec!r}: give a built-in name ({', '.join(zoo.MODELS)}), "
            "path/to/file.py:factory or package.module:factory"
        )

    def make() -> nn.Module:
        m = fn(**kwargs)
        if not isinstance(m, nn.Module):
            raise UsageError(f"the model factory {spec!r} returned {type(m).__name__}, not an nn.Module")
        return m

    return make


# ---- config flags from the dataclasses ----------------------------------------------------


def _field_parser(tp: Any) -> Callable[[str], Any]:
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        inner = _field_parser(args[0])
        return lambda s: None if s.lower() == "none" else inner(s)
    if tp is bool:
        return lambda s: {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[s.lower()]
    if tp in (int, float, str):
        return tp
    return json.loads


def _attribute_docs(cls: type) -> dict[str, str]:
    """``Attributes:`` entries of a class docstring, continuation lines joined, roles removed."""
    out: dict[str, str] = {}
    current = None
    for line in (inspect.getdoc(cls) or "").splitlines():
        m = re.match(r"^\s{4}(\w+(?:, \w+)*):\s*(.*)$", line)
        if m:
            names = [n.strip() for n in m.group(1).split(",")]
            current = names
            for n in names:
                out[n] = m.group(2)
        elif current and line.startswith(" " * 8):
            for n in current:
                out[n] += " " + line.strip()
        else:
            current = None
    return {k: re.sub(r":\w+:`([^`]*)`", r"\1", v).replace("``", "").replace("\\", "\\") for k, v in out.items()}


def config_fields(method: str) -> list[tuple[str, Any, Any, str]]:
    """(name, type, default, help) for every config field of a method."""
    cls = initopt.get_method(method).Config
    hints = typing.get_type_hints(cls)
    docs = _attribute_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append((f.name, hints.get(f.name, str), default, docs.get(f.name, "")))
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _add_config_flags(p: argparse.ArgumentParser, method: str) -> None:
    g = p.add_argument_group(f"{method} config (from {initopt.get_method(method).Config.__name__})")
    for name, tp, default, help_ in config_fields(method):
        if name == "steps":
            continue
        g.add_argument(
            f"--{name.replace('_', '-')}",
            dest=f"cfg_{name}",
            type=_field_parser(tp),
            default=None,
            metavar=_type_name(tp).upper().replace(" ", ""),
            help=f"{help_} (default {default!r})",
        )


def _read_config_file(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    if not os.path.exists(path):
        raise UsageError(f"config file not found: {path}")
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as e:  # pragma: no cover
            raise UsageError("YAML config files need pyyaml: pip install pyyaml") from e
        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of config fields")
    return data


def _method_config(args: argparse.Namespace) -> dict[str, Any]:
    cfg = _read_config_file(getattr(args, "config", None))
    cfg.update({k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None})
    return cfg


# ---- commands --------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    """Every registered method with its config fields, defaults and a description."""
    for name in initopt.methods():
        cls = initopt.get_method(name)
        print(f"{name}: {cls.summary}")
        for field, tp, default, help_ in config_fields(name):
            print(f"    --{field.replace('_', '-'):<18} {_type_name(tp):<22} {default!r:<14} {help_}")
        print()
    return 0


def _data_and_model(args: argparse.Namespace) -> tuple[Callable[[], nn.Module], Any, Any]:
    train, test = load_task(args.data, data_root=args.data_root, seed=args.seed)
    model_name = args.model or TASKS[args.data]["model"]
    make = load_model(model_name, args.data, _parse_pairs(args.model_arg, "--model-arg"))
    return make, train, test


def _parse_pairs(pairs: Sequence[str], flag: str) -> dict[str, Any]:
    out = {}
    for item in pairs:
        if "=" not in item:
            raise UsageError(f"{flag} takes KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def _say(args: argparse.Namespace, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(text)


def _write_json(path: str, obj: Any) -> str:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    return path


def save_weights(model: nn.Module, path: str) -> str:
    """``.safetensors`` (ties stored once) or a plain ``state_dict`` for ``torch.load(weights_only=True)``."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import save_model
        except ImportError as e:  # pragma: no cover
            raise InitOptError("safetensors output needs the safetensors package") from e
        save_model(model, path)
    else:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    return path


def cmd_init(args: argparse.Namespace) -> int:
    """Run a method; write the initialized weights and the result JSON."""
    from initopt.data import loader

    make, train, _ = _data_and_model(args)
    torch.manual_seed(args.seed)
    model = make()
    res = initopt.initialize_(
        model,
        loader(train, args.batch_size, seed=args.seed),
        args.method,
        steps=args.steps,
        seed=args.seed,
        progress=False if args.quiet else None,
        optimizer=parse_optimizer(args.optimizer) if args.optimizer else None,
        **_method_config(args),
    )
    if not args.quiet:
        print(res.summary())
    out = Path(args.out_dir)
    _say(args, f"weights: {save_weights(model, str(out / args.weights))}")
    _say(args, f"result:  {_write_json(str(out / 'result.json'), res.to_dict())}")
    if args.plot:
        from initopt.plots import plot_history, plot_scales

        _say(args, f"plot:    {plot_scales(res, str(out / 'scales.png'))}")
        if res.history:
            _say(args, f"plot:    {plot_history(res, str(out / 'history.png'))}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Train from several initializations over several seeds; table, curves and plot."""
    from initopt.compare import parse_init

    make, train, test = _data_and_model(args)
    inits = [parse_init(s) for s in args.inits]
    for _, spec in inits:
        for part in spec if isinstance(spec, list) else [spec]:
            name = part if isinstance(part, str) else part[0]
            if name != "default":
                initopt.get_method(name)
    report = _run_compare(args, make, train, test, inits)
    _report_compare(args, report)
    return 0


def _run_compare(args: argparse.Namespace, make: Callable[[], nn.Module], train: Any, test: Any, inits: list) -> Any:
    """:func:`initopt.compare.compare` with the training settings of the command line."""
    from initopt.compare import compare

    return compare(
        make,
        train,
        test,
        inits,
        seeds=args.seeds,
        steps=args.train_steps,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        init_steps=args.init_steps,
        progress=False if args.quiet else None,
        log=None if args.quiet else print,
        pass_optimizer=INIT_OPTIMIZER[args.init_optimizer],
    )


def _report_compare(args: argparse.Namespace, report: Any) -> None:
    """Print the table; write compare.json, curves.csv and the plot to ``--out-dir``."""
    report.config.update(data=args.data, model=args.model or TASKS[args.data]["model"])
    print(report.to_markdown())
    out = Path(args.out_dir)
    _say(args, f"\nresults: {_write_json(str(out / 'compare.json'), report.to_dict())}")
    (out / "curves.csv").write_text(report.to_csv())
    _say(args, f"curves:  {out / 'curves.csv'}")
    if not args.no_plot:
        _say(args, f"plot:    {report.plot(str(out / 'curves.png'))}")


def cmd_diagnose(args: argparse.Namespace) -> int:
    """The diagnostic report of a model at initialization."""
    from initopt.data import loader

    make, train, _ = _data_and_model(args)
    torch.manual_seed(args.seed)
    model = make()
    report = initopt.diagnose(model, loader(train, args.batch_size, seed=args.seed), probes=args.probes)
    print(report.to_markdown())
    if args.json:
        _say(args, f"\nreport: {_write_json(args.json, report.to_dict())}")
    return 0


DEMO_INITS = ["default", "kaiming", "lsuv", "hessian", "gradinit", "nio", "metainit:steps=50", "auto"]
RECOMMENDATION = """What the claims studies found (README, docs/which-init.md):
  - Use "auto" and give it your training optimizer:
      initopt.initialize_(model, data, "auto", optimizer=opt)
    It tries the model's own init, Kaiming, LSUV and the Hessian rule with a short real training
    run each, keeps the best, tries GradInit and NIO on top and keeps one only if it trains
    clearly better; result.info says what it measured and why it chose.
  - The starting point decides whether a deep plain network trains: from PyTorch's default init
    GradInit and NIO at their papers' settings stay at chance on 16-layer nets, from Kaiming or
    the Hessian rule they train. MetaInit at its paper's settings (noise inputs) shrank every
    layer and hurt; do not apply the Hessian rule or LSUV to a post-LN Transformer."""


def demo_verdicts(report: Any, headline: str = "auto") -> list[str]:
    """One line per baseline: ``headline`` minus it, paired by seed, and the verdict."""
    lines = []
    for base in ("default", "kaiming"):
        p = report.paired(headline, base)
        if p["n"]:
            lines.append(
                f"  {headline} vs {base}: {100 * p['mean']:+.1f} ± {100 * p['se']:.1f} points of final test accuracy "
                f"(mean ± standard error over {p['n']} seeds; {headline} ahead on {p['wins']}): {p['verdict']}"
            )
    return lines


def cmd_demo(args: argparse.Namespace) -> int:
    """``auto`` on a deep plain MLP, then ``compare`` of it and every method (about two minutes)."""
    from initopt.compare import make_optimizer, parse_init
    from initopt.data import loader

    if args.threads:
        torch.set_num_threads(args.threads)
    inits = [i for i in DEMO_INITS if all(p.split(":")[0] in ("default", *initopt.methods()) for p in i.split("+"))]
    make, train, test = _data_and_model(args)
    print(
        f"initopt demo: model {args.model or TASKS[args.data]['model']} (PyTorch default init) on "
        f"{TASKS[args.data]['help']}; {torch.get_num_threads()} thread(s).\n\n"
        f"1. auto, given the training optimizer (SGD, lr {args.lr}, momentum 0.9): what it tried and chose\n"
    )
    torch.manual_seed(args.seed)
    model = make()
    opt, _ = make_optimizer(model, args.optimizer, args.lr)
    res = initopt.initialize_(
        model,
        loader(train, args.batch_size, seed=args.seed),
        "auto",
        steps=args.init_steps,
        seed=args.seed,
        progress=False if args.quiet else None,
        optimizer=None if args.init_optimizer == "none" else opt,
    )
    print(res.summary() + "\n")
    print(
        f"2. Training by {args.optimizer.upper()} from {len(inits)} initializations, {len(args.seeds)} seeds each "
        f"({args.train_steps} steps, lr {args.lr})\n"
    )
    report = _run_compare(args, make, train, test, [parse_init(s) for s in inits])
    report.config["verdicts"] = [report.paired("auto", b) for b in ("default", "kaiming")]
    _report_compare(args, report)
    print("\nVERDICT (paired by seed; 'tie' = within two standard errors):")
    print("\n".join(demo_verdicts(report)))
    print("\n" + RECOMMENDATION)
    return 0


def _common(p: argparse.ArgumentParser, *, batch: int = 64) -> None:
    p.add_argument("--data", default="digits", choices=list(TASKS), help="built-in data set (default digits)")
    p.add_argument("--data-root", help="folder with local data (cifar10)")
    p.add_argument(
        "--model", help="zoo name, path/to/file.py:factory or package.module:factory (default: the data set's model)"
    )
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE", help="argument of the factory")
    p.add_argument("--batch-size", type=int, default=batch)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars, only the final summary")


INIT_OPTIMIZER: dict[str, bool | list[str]] = {"auto": ["auto"], "all": True, "none": False}


def _compare_flags(p: argparse.ArgumentParser, *, steps: int, seeds: list[int], out: str, lr: float = 0.05) -> None:
    p.add_argument("--seeds", type=int, nargs="+", default=seeds)
    p.add_argument("--train-steps", type=int, default=steps, help="SGD/Adam steps per run")
    p.add_argument("--init-steps", type=int, default=None, help="iterations of each method (default: its own)")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    p.add_argument("--lr", type=float, default=lr, help=f"training learning rate (default {lr})")
    p.add_argument("--out-dir", default=out)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument(
        "--init-optimizer",
        choices=list(INIT_OPTIMIZER),
        default="auto",
        help="which inits get the training optimizer: 'auto' (default: only method auto), 'all' (also "
        "gradinit, whose look-ahead then takes the real first step instead of the paper's eta), 'none' "
        "(auto then assumes SGD lr 0.01, momentum 0.9)",
    )


def build_parser(method: str | None = None) -> argparse.ArgumentParser:
    p = _Parser(prog="initopt", description="Find better starting weights for PyTorch networks.")
    p.add_argument("--version", action="version", version=f"initopt {initopt.__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("list", help="methods with their config fields and defaults")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("diagnose", help="per-layer and whole-model diagnostics at initialization")
    _common(s)
    s.add_argument("--probes", type=int, default=20, help="Hutchinson probes / Lanczos steps")
    s.add_argument("--json", help="write the report JSON here")
    s.set_defaults(func=cmd_diagnose)

    s = sub.add_parser("init", help="run a method; write weights and the result JSON")
    s.add_argument("--method", default=method or "gradinit", help=f"one of {', '.join(initopt.methods())}")
    _common(s)
    s.add_argument("--steps", type=int, default=None, help="iterations (default: the method's)")
    s.add_argument("--config", help="JSON or YAML file of config fields (flags override it)")
    s.add_argument("--out-dir", default="initopt-out")
    s.add_argument("--weights", default="weights.pt", help="file name: .pt (state_dict) or .safetensors")
    s.add_argument("--plot", action="store_true", help="also write scales.png and history.png")
    s.add_argument(
        "--optimizer",
        default=None,
        metavar="SPEC",
        help="the training optimizer, for methods that model a training step (gradinit, auto): "
        "'sgd:lr=0.01,momentum=0.9', 'adamw:lr=1e-3,betas=[0.9,0.98]' (default: none; auto then "
        "assumes SGD lr 0.01, momentum 0.9)",
    )
    if method is not None:
        _add_config_flags(s, method)
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("compare", help="train from several initializations over several seeds")
    _common(s)
    s.add_argument(
        "--inits",
        nargs="+",
        default=["default", "gradinit"],
        help="'default', a method, 'name:key=value,...' or 'a+b' pipelines",
    )
    _compare_flags(s, steps=200, seeds=[0, 1, 2], out="initopt-compare")
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("demo", help="auto against every init of a deep plain MLP on digits (about two minutes)")
    _common(s)
    _compare_flags(s, steps=150, seeds=[0, 1, 2], out="initopt-demo", lr=0.01)
    s.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``initopt`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    method = None
    if argv and argv[0] == "init":
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--method", default="gradinit")
        known, _ = pre.parse_known_args(argv[1:])
        method = known.method if known.method in initopt.methods() else None
        if method is None:
            print(
                f"initopt init: error: unknown method {known.method!r}; one of {', '.join(initopt.methods())}",
                file=sys.stderr,
            )
            return 2
    args = build_parser(method).parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as e:
        print(f"initopt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(
            f"initopt {args.command}: error: {e}\n(see 'initopt list' for the methods and their fields)",
            file=sys.stderr,
        )
        return 2
    except (InitOptError, OSError) as e:
        print(f"initopt {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("initopt: interrupted; nothing was written for the unfinished run", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
