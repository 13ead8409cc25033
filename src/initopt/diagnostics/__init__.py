"""Read-only diagnostics: they never change the model, its modes, buffers or ``.grad``.

One module per measure; each adds its public names here.
"""

__all__: list[str] = []
