"""Read-only diagnostics: they never change the model, its modes, buffers or ``.grad``.

One module per measure; each adds its public names here.
"""

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

__all__: list[str] = [
    "GradCosine",
    "GradientQuotient",
    "HessianTracker",
    "Report",
    "diagnose",
    "grad_cosine",
    "gradient_quotient",
    "hessian_eigenvalues",
    "hessian_frobenius",
    "hessian_spectral_density",
    "hessian_trace",
]
