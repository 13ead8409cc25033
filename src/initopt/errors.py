"""Errors raised on purpose by initopt.

Every error the library raises deliberately derives from :class:`InitOptError`, so a caller
can catch them all with one ``except``. Each message says what failed, on which input, and
what was expected.
"""

from __future__ import annotations


class InitOptError(Exception):
    """Base class of every error initopt raises on purpose."""


class ConfigError(InitOptError, ValueError):
    """A method name, a config key or a config value is not valid."""


class DataError(InitOptError, ValueError):
    """The data cannot be used: empty, of an unknown batch form, or not accepted by the model."""


class LossError(InitOptError, ValueError):
    """The loss is not a finite scalar tensor."""


class ModelError(InitOptError, ValueError):
    """The model cannot be initialized (for example: it has no trainable parameters)."""


class DistributedError(InitOptError, RuntimeError):
    """The ranks of a distributed run disagree (different models, seeds or final scales)."""


class PrecisionError(InitOptError, RuntimeError):
    """A half-precision (bfloat16/float16) model cannot be searched: a kernel it needs fails in
    that dtype (no double backward), or the model casts to that dtype inside its forward."""
