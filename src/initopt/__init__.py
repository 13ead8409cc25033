"""initopt: better starting weights for any PyTorch network, found by optimizing
differentiable measures of the network at initialization.

>>> import initopt
>>> "gradinit" in initopt.methods()
True
"""

from initopt.api import initialize_
from initopt.core.blocks import apply_scales_
from initopt.diagnostics.cosine import GradCosine, grad_cosine
from initopt.diagnostics.hessian import (
    HessianTracker,
    hessian_eigenvalues,
    hessian_frobenius,
    hessian_spectral_density,
    hessian_trace,
)
from initopt.diagnostics.quotient import GradientQuotient, gradient_quotient
from initopt.diagnostics.report import Report, diagnose
from initopt.errors import (
    ConfigError,
    DataError,
    DistributedError,
    InitOptError,
    LossError,
    ModelError,
    PrecisionError,
)
from initopt.methods import (
    LSUV,
    NIO,
    GradInit,
    GradInitConfig,
    HessianInit,
    HessianInitConfig,
    Kaiming,
    KaimingConfig,
    LSUVConfig,
    MetaInit,
    MetaInitConfig,
    Method,
    NIOConfig,
    get_method,
    methods,
    register,
)
from initopt.result import InitResult
from initopt.saved import load_scales, save_scales

__version__ = "0.1.0"

__all__ = [
    "LSUV",
    "NIO",
    "ConfigError",
    "DataError",
    "DistributedError",
    "GradCosine",
    "GradInit",
    "GradInitConfig",
    "GradientQuotient",
    "HessianInit",
    "HessianInitConfig",
    "HessianTracker",
    "InitOptError",
    "InitResult",
    "Kaiming",
    "KaimingConfig",
    "LSUVConfig",
    "LossError",
    "MetaInit",
    "MetaInitConfig",
    "Method",
    "ModelError",
    "NIOConfig",
    "PrecisionError",
    "Report",
    "apply_scales_",
    "diagnose",
    "get_method",
    "grad_cosine",
    "gradient_quotient",
    "hessian_eigenvalues",
    "hessian_frobenius",
    "hessian_spectral_density",
    "hessian_trace",
    "initialize_",
    "load_scales",
    "methods",
    "register",
    "save_scales",
]
