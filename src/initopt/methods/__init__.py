"""Initialization methods, one file per paper, registered by name."""

from initopt.methods.auto import Auto, AutoConfig
from initopt.methods.base import Method, Outcome, Problem, get_method, methods, register
from initopt.methods.gradinit import GradInit, GradInitConfig
from initopt.methods.hessian import HessianInit, HessianInitConfig
from initopt.methods.kaiming import Kaiming, KaimingConfig
from initopt.methods.lsuv import LSUV, LSUVConfig
from initopt.methods.metainit import MetaInit, MetaInitConfig
from initopt.methods.nio import NIO, NIOConfig

__all__ = [
    "LSUV",
    "NIO",
    "Auto",
    "AutoConfig",
    "GradInit",
    "GradInitConfig",
    "HessianInit",
    "HessianInitConfig",
    "Kaiming",
    "KaimingConfig",
    "LSUVConfig",
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
