"""Initialization methods, one file per paper, registered by name."""

from initopt.methods.base import Method, Outcome, Problem, get_method, methods, register
from initopt.methods.gradinit import GradInit, GradInitConfig

__all__ = [
    "GradInit",
    "GradInitConfig",
    "Method",
    "Outcome",
    "Problem",
    "get_method",
    "methods",
    "register",
]
