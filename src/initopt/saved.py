"""Save learned scales as JSON and apply them to a freshly built model.

The file is plain JSON (never a pickle): the scales by parameter name, the shape of each
scaled tensor when the model was given, the method, its config, the seed and the versions
of initopt and torch. :func:`load_scales` checks the format and its version;
:func:`initopt.apply_scales_` accepts what it returns and checks names and shapes before
writing anything.

Example:
    >>> import torch, initopt, tempfile, os
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> res = initopt.initialize_(net, (torch.randn(16, 4), torch.randint(0, 3, (16,))), "kaiming")
    >>> path = os.path.join(tempfile.mkdtemp(), "scales.json")
    >>> _ = initopt.save_scales(res, path, model=net)
    >>> sorted(initopt.load_scales(path)["scales"]) == sorted(res.scales)
    True
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from initopt.errors import DataError, ModelError
from initopt.result import InitResult, _jsonable

__all__ = ["FORMAT", "VERSION", "load_scales", "save_scales"]

FORMAT = "initopt-scales"
VERSION = 1


def save_scales(result: InitResult, path: str | os.PathLike, *, model: nn.Module | None = None) -> Path:
    """Write ``result``'s scales to ``path`` as JSON; returns the path.

    With ``model`` (the model the scales were found on), the shape of every scaled tensor is
    recorded, so that applying the file to a different architecture is caught even where the
    parameter names agree. The file is written to a temporary name and renamed, so an
    interrupted save never leaves a half-written file.
    """
    from initopt import __version__

    if not isinstance(result, InitResult):
        raise DataError(f"save_scales takes an InitResult, got {type(result).__name__}")
    shapes = None
    if model is not None:
        params = dict(model.named_parameters(remove_duplicate=False))
        missing = [n for n in result.scales if n not in params]
        if missing:
            raise ModelError(f"save_scales: the model has no parameter named {missing[0]!r}")
        shapes = {n: list(params[n].shape) for n in result.scales}
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "method": result.method,
        "config": _jsonable(result.config),
        "seed": result.seed,
        "scales": dict(result.scales),
        "shapes": shapes,
        "versions": {"initopt": __version__, "torch": torch.__version__},
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=False))
    os.replace(tmp, path)
    return path


def load_scales(path: str | os.PathLike) -> dict[str, Any]:
    """Read a file written by :func:`save_scales` (JSON only; nothing is unpickled).

    Returns the file's dict (``"scales"``, ``"shapes"``, ``"method"``, ``"config"``,
    ``"seed"``, ``"versions"``). Raises :class:`~initopt.DataError` for a missing, corrupted or
    foreign file and for a format version newer than this initopt reads.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read the scales file {str(path)!r}: {e}") from None
    except UnicodeDecodeError:
        raise DataError(f"{str(path)!r} is not a valid initopt scales file (not JSON text)") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{str(path)!r} is not a valid initopt scales file (corrupted JSON: {e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise DataError(f"{str(path)!r} is not an initopt scales file (no 'format': {FORMAT!r})")
    version = doc.get("version")
    if not isinstance(version, int):
        raise DataError(f"{str(path)!r}: the format version is missing or not an integer ({version!r})")
    if version > VERSION:
        raise DataError(
            f"{str(path)!r} was written in format version {version} by initopt "
            f"{doc.get('versions', {}).get('initopt', '?')}; this initopt reads up to version {VERSION}: upgrade it"
        )
    scales = doc.get("scales")
    if not isinstance(scales, dict) or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for k, v in scales.items()
    ):
        raise DataError(f"{str(path)!r}: 'scales' must map parameter names to finite numbers")
    shapes = doc.get("shapes")
    if shapes is not None and (
        not isinstance(shapes, dict)
        or set(shapes) != set(scales)
        or not all(isinstance(s, list) and all(isinstance(d, int) for d in s) for s in shapes.values())
    ):
        raise DataError(f"{str(path)!r}: 'shapes' must give an integer shape for every scaled parameter")
    return doc
