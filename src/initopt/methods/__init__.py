"""Initialization methods, one file per paper, registered by name."""

from initopt.methods.base import Method, Outcome, Problem, get_method, methods, register
from initopt.methods.gradinit import GradInit, GradInitConfig
from initopt.methods.hessian import HessianInit, HessianInitConfig
from initopt.methods.metainit import MetaInit, MetaInitConfig
from initopt.methods.nio import NIO, NIOConfig

__all__ = [
    "NIO",
    "GradInit",
    "GradInitConfig",
    "HessianInit",
    "HessianInitConfig",
    "MetaInit",
    "MetaInitConfig",
    "Method",
    "NIOConfig",
    "Outcome",
    "Problem",
    "get_method",
    "methods",
    "register",
]
