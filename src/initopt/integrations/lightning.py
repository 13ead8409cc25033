"""A Lightning callback that runs an initopt method at the start of ``Trainer.fit``.

Needs Lightning (``pip install 'initopt[lightning]'``): ``lightning.pytorch`` is used, or the
older ``pytorch_lightning`` package when only that one is installed.

What :class:`InitOptCallback` does at ``on_fit_start`` (after the trainer has moved the module
to its device and built its optimizers, before the sanity check and the first step):

* **data**: the first ``batches`` (8) batches of a fresh pass over the fit's train
  dataloader (the one given to ``fit``, the module's or the datamodule's
  ``train_dataloader()``), read by :func:`initopt.integrations.take_batches`, which leaves the
  global RNG as it was, so the training epochs are the same as without the callback; or the
  ``data`` you give. Batches reach the method as the loader yields them (initopt moves them to
  the module's device; Lightning's batch-transfer hooks are not called).
* **loss**: the module's own ``training_step(batch, 0)``: the tensor it returns or its
  ``"loss"`` entry (``self.log`` calls inside it are skipped during the search). Give
  ``forward_fn`` and/or ``loss_fn`` (as in :func:`initopt.initialize_`) to use them instead;
  ``training_step=False`` uses the module's ``forward`` and initopt's default loss.
* **optimizer**: for methods that model a training step (``"auto"``, ``"gradinit"``), the one
  optimizer from ``configure_optimizers`` (at its schedule's base learning rate; see
  :func:`initopt.integrations.loop.training_optimizer`); with several optimizers none is
  passed. ``optimizer=None`` never passes one; any other value is passed as given.
* **once**: the method runs once per callback. It is skipped on a fit resumed from a
  checkpoint (``fit(ckpt_path=...)``: the weights come from the checkpoint) and when the
  callback's own state, saved in the checkpoint, says it already ran.
* **report**: the :class:`~initopt.InitResult` is kept as ``callback.result``; on global rank
  zero the summary is logged (``verbose``), ``result.before``/``after`` measures go to the
  trainer's loggers as ``initopt/before/...``/``initopt/after/...``, and the scales are written
  to ``scales_path`` if given (:func:`initopt.save_scales`).

Under DDP every rank reads the same first batches of its train dataloader as given (before
Lightning adds its distributed sampler) and :func:`initopt.initialize_` leaves all ranks with
identical weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from initopt.errors import ConfigError, DataError, LossError
from initopt.integrations import require
from initopt.integrations.loop import DEFAULT_BATCHES, take_batches, training_optimizer, uses_optimizer
from initopt.result import InitResult

pl = require("lightning.pytorch", integration="lightning", extra="lightning", alternatives=("pytorch_lightning",))

__all__ = ["InitOptCallback"]

_FROM_TRAINER = "trainer"


def _rank_zero(fn_name: str) -> Callable[[str], None]:
    try:
        from lightning.pytorch.utilities import rank_zero as rz
    except ImportError:  # pragma: no cover - pytorch_lightning only
        from pytorch_lightning.utilities import rank_zero as rz  # type: ignore[no-redef]
    return getattr(rz, fn_name)


def _step_loss(output: Any, batch: Any) -> torch.Tensor:
    """The loss a ``training_step`` returned: a tensor, or the ``"loss"`` entry of a dict."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and "loss" in output:
        return output["loss"]
    raise LossError(
        f"training_step returned {type(output).__name__}; the callback needs the loss tensor or a dict with "
        "'loss' (give loss_fn=/forward_fn= to the callback, or training_step=False to use forward and the "
        "default loss)"
    )


def _training_step(module: nn.Module, batch: Any) -> Any:
    return module.training_step(batch, 0)  # type: ignore[operator]


@contextmanager
def _no_logging(module: nn.Module) -> Iterator[None]:
    """``self.log``/``self.log_dict`` do nothing inside (logging is not allowed at fit start)."""

    def skip(*args: Any, **kwargs: Any) -> None:
        return None

    had = {k: k in module.__dict__ for k in ("log", "log_dict")}
    object.__setattr__(module, "log", skip)
    object.__setattr__(module, "log_dict", skip)
    try:
        yield
    finally:
        for k, present in had.items():
            if not present:
                module.__dict__.pop(k, None)


class InitOptCallback(pl.Callback):
    """Run an initopt method on the LightningModule at the start of ``fit``.

    Args:
        method: a registered name or a pipeline, as in :func:`initopt.initialize_`
            (default ``"auto"``).
        batches: how many batches of the train dataloader to use (default 8; ``"auto"`` holds
            out 2 of them). Ignored when ``data`` is given.
        data: batches to use instead (a DataLoader, an iterable of batches, or one batch).
        loss_fn, forward_fn: as in :func:`initopt.initialize_`. When both are ``None`` and
            ``training_step`` is true, the loss is the module's ``training_step``.
        training_step: use ``training_step`` for the loss (default: when neither ``loss_fn``
            nor ``forward_fn`` is given).
        optimizer: ``"trainer"`` (default): the fit's optimizer, for methods that use one;
            ``None``: none; or an optimizer spec passed as given.
        steps, seed, progress, **config: as in :func:`initopt.initialize_` (``progress``
            defaults to off: Lightning draws its own bars).
        verbose: log the result's summary on rank zero.
        scales_path: if given, rank zero writes the scales there (:func:`initopt.save_scales`).

    Attributes:
        result: the :class:`~initopt.InitResult`, or ``None`` before the method ran or when it
            was skipped.
        skipped: why it was skipped, or ``None``.

    Example:
        >>> cb = InitOptCallback("kaiming", batches=2)
        >>> cb.result is None
        True
    """

    def __init__(
        self,
        method: Any = "auto",
        *,
        batches: int = DEFAULT_BATCHES,
        data: Any = None,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        training_step: bool | None = None,
        optimizer: Any = _FROM_TRAINER,
        steps: int | None = None,
        seed: int = 0,
        progress: bool | None = False,
        verbose: bool = True,
        scales_path: str | os.PathLike | None = None,
        **config: Any,
    ) -> None:
        super().__init__()
        if not isinstance(batches, int) or isinstance(batches, bool) or batches < 1:
            raise ConfigError(f"InitOptCallback: batches must be a positive integer, got {batches!r}")
        if training_step and (loss_fn is not None or forward_fn is not None):
            raise ConfigError("InitOptCallback: training_step=True cannot be combined with loss_fn/forward_fn")
        self.method = method
        self.batches = batches
        self.data = data
        self.loss_fn = loss_fn
        self.forward_fn = forward_fn
        self.training_step = (loss_fn is None and forward_fn is None) if training_step is None else training_step
        self.optimizer = optimizer
        self.steps = steps
        self.seed = seed
        self.progress = progress
        self.verbose = verbose
        self.scales_path = scales_path
        self.config = config
        self.result: InitResult | None = None
        self.skipped: str | None = None
        self._done = False

    # -- checkpointed state: a resumed fit knows the method already ran ---------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"done": bool, "method": str | None}``, saved in Lightning checkpoints."""
        return {"done": self._done, "method": None if self.result is None else self.result.method}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state saved in a checkpoint."""
        self._done = bool(state_dict.get("done", False))

    # -- the hook ---------------------------------------------------------------------------

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Run the method once (skipped on a resumed fit)."""
        info = _rank_zero("rank_zero_info")
        if self._done:
            self.skipped = "the method already ran for this callback (or the checkpoint's state says so)"
        elif getattr(trainer, "ckpt_path", None) is not None:
            self.skipped = f"the fit resumes from the checkpoint {trainer.ckpt_path!s}: its weights are kept"
        if self.skipped is not None:
            if self.verbose:
                info(f"initopt: skipped ({self.skipped})")
            return
        from initopt.api import initialize_

        if self.training_step and not getattr(pl_module, "automatic_optimization", True):
            raise ConfigError(
                "InitOptCallback: the module uses manual optimization, so its training_step steps the optimizers and "
                "cannot serve as the loss; give loss_fn=/forward_fn= to the callback, or training_step=False"
            )
        data = self.data if self.data is not None else self._train_batches(trainer)
        if self.training_step:
            loss_fn, forward_fn = _step_loss, _training_step
        else:
            loss_fn, forward_fn = self.loss_fn, self.forward_fn
        with _no_logging(pl_module):
            self.result = initialize_(
                pl_module,
                data,
                self.method,
                loss_fn=loss_fn,
                forward_fn=forward_fn,
                steps=self.steps,
                seed=self.seed,
                progress=self.progress,
                optimizer=self._optimizer(trainer),
                **self.config,
            )
        self._done = True
        if trainer.is_global_zero:
            self._report(trainer, self.result)

    # -- helpers ----------------------------------------------------------------------------

    def _train_batches(self, trainer: Any) -> list[Any]:
        source = getattr(trainer.fit_loop, "_data_source", None)
        if source is None or not source.is_defined():
            raise DataError(
                "InitOptCallback: the fit has no train dataloader to read batches from; give data=... to the callback"
            )
        loader = source.dataloader()
        several = isinstance(loader, dict) or type(loader).__name__ == "CombinedLoader"
        if isinstance(loader, (list, tuple)) and loader and isinstance(loader[0], torch.utils.data.DataLoader):
            several = True
        if several:
            raise DataError(
                f"InitOptCallback: the train dataloader is a collection ({type(loader).__name__}) of loaders; "
                "give data=... (one loader, or a list of batches) to the callback"
            )
        return take_batches(loader, self.batches)

    def _optimizer(self, trainer: Any) -> Any:
        if self.optimizer is not _FROM_TRAINER:
            return self.optimizer
        if not uses_optimizer(self.method):
            return None
        optimizers = list(getattr(trainer, "optimizers", []) or [])
        if len(optimizers) != 1:
            if optimizers:
                _rank_zero("rank_zero_warn")(
                    f"initopt: the fit has {len(optimizers)} optimizers; {self.method!r} runs with its default "
                    "(give optimizer=... to the callback)"
                )
            return None
        return training_optimizer(optimizers[0])

    def _report(self, trainer: Any, result: InitResult) -> None:
        if self.verbose:
            _rank_zero("rank_zero_info")(f"initopt: {result.summary()}")
        metrics = {f"initopt/before/{k}": v for k, v in result.before.items() if isinstance(v, (int, float))}
        metrics.update({f"initopt/after/{k}": v for k, v in result.after.items() if isinstance(v, (int, float))})
        metrics["initopt/seconds"] = result.seconds
        for logger in getattr(trainer, "loggers", []) or []:
            logger.log_metrics(metrics, step=0)
        if self.scales_path is not None:
            from initopt.saved import save_scales

            save_scales(result, self.scales_path, model=trainer.lightning_module)
