"""Integrations with training frameworks: run a method right before training starts.

* :mod:`initopt.integrations.loop` (PyTorch only, re-exported here): :func:`take_batches`
  reads a few batches from a training DataLoader without disturbing the epochs that follow,
  and :func:`initialize_from_loader_` runs a method on them before a hand-written loop.
* :mod:`initopt.integrations.lightning` (``pip install 'initopt[lightning]'``):
  :class:`~initopt.integrations.lightning.InitOptCallback`, a Lightning callback that runs a
  method at fit start.
* :mod:`initopt.integrations.huggingface` (``pip install 'initopt[hf]'``): dict batches from
  tokenized examples or a collator's output, a tie-checked ``initialize_hf_`` and a
  ``transformers.TrainerCallback``.

Importing :mod:`initopt` or this package never imports Lightning or transformers; importing
one of their submodules without the package installed raises
:class:`MissingDependencyError` naming the pip extra.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from initopt.errors import InitOptError
from initopt.integrations.loop import initialize_from_loader_, take_batches

__all__ = ["MissingDependencyError", "initialize_from_loader_", "take_batches"]


class MissingDependencyError(InitOptError, ImportError):
    """An optional integration was imported without the package it integrates with."""


def require(module: str, *, integration: str, extra: str, alternatives: tuple[str, ...] = ()) -> ModuleType:
    """Import ``module`` (or the first importable of ``alternatives``) or raise :class:`MissingDependencyError`.

    The message names the integration and the pip extra that installs what it needs.
    """
    errors = []
    for name in (module, *alternatives):
        try:
            return importlib.import_module(name)
        except ImportError as e:
            errors.append(f"{name}: {e}")
    raise MissingDependencyError(
        f"initopt.integrations.{integration} needs the package {module!r}, which could not be imported "
        f"({'; '.join(errors)}); install it with: pip install 'initopt[{extra}]'"
    )
