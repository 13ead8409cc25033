"""Shared core: parameter blocks and scales, functional evaluation, batch adapters, the scale
optimizer. Imports nothing from :mod:`initopt.methods`."""

from initopt.core.batches import BatchSource, Task, batch_size, concat_batches, split_batch
from initopt.core.blocks import Block, ScaleSpace, apply_scales_, infer_role
from initopt.core.functional import Evaluator, evaluation, search_mode
from initopt.core.optim import RescaleAdam
from initopt.core.progress import Progress

__all__ = [
    "BatchSource",
    "Block",
    "Evaluator",
    "Progress",
    "RescaleAdam",
    "ScaleSpace",
    "Task",
    "apply_scales_",
    "batch_size",
    "concat_batches",
    "evaluation",
    "infer_role",
    "search_mode",
    "split_batch",
]
