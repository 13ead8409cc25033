"""initopt: better starting weights for any PyTorch network, found by optimizing
differentiable measures of the network at initialization.

>>> import initopt
>>> "gradinit" in initopt.methods()
True
"""

from initopt.api import initialize_
from initopt.core.blocks import apply_scales_
from initopt.errors import ConfigError, DataError, InitOptError, LossError, ModelError
from initopt.methods import GradInit, GradInitConfig, Method, get_method, methods, register
from initopt.result import InitResult

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "GradInit",
    "GradInitConfig",
    "InitOptError",
    "InitResult",
    "LossError",
    "Method",
    "ModelError",
    "apply_scales_",
    "get_method",
    "initialize_",
    "methods",
    "register",
]
