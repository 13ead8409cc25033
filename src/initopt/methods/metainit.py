"""MetaInit: Dauphin, Schoenholz, "MetaInit: Initializing learning by learning to initialize",
NeurIPS 2019.

Tune the norms of the initial tensors so that the gradient quotient is small, i.e. so that
the gradient changes little after one gradient step (:mod:`initopt.core.quotient`):

.. math::

    \\mathrm{GQ}(\\theta) = \\frac1N \\sum_i \\Big|\\frac{g_i - (Hg)_i}{g_i + \\epsilon s_i} - 1\\Big|,
    \\qquad g = \\nabla_\\theta L.

Paper variant (``variant="sign"``): only tensors with two or more dimensions are tuned, each
through its norm :math:`\\rho_j = \\|W_j\\|`, by sign-SGD with momentum on the sign,

.. math::

    m_j \\leftarrow \\beta m_j - \\mathrm{lr}\\;\\mathrm{sign}(\\partial\\mathrm{GQ}/\\partial\\rho_j), \\qquad
    \\rho_j \\leftarrow \\max(\\rho_j + m_j,\\; \\rho_{\\min,j}),

in absolute norm units, on fresh :math:`\\mathcal N(0, 1)` inputs and uniform random labels
at every step (token ids uniform over the vocabulary of the embedding that reads them, masks
kept: :class:`NoiseSource`), with the model in eval mode. The norm is kept as a scale
:math:`\\alpha_j = \\rho_j/\\rho_j^0` (so :math:`\\partial\\mathrm{GQ}/\\partial\\rho_j =
(\\partial\\mathrm{GQ}/\\partial\\alpha_j)/\\rho_j^0`) and folded in by
:func:`initopt.apply_scales_`; untuned tensors keep scale 1 but count in GQ. The floor
:math:`\\rho_{\\min,j} = \\min(\\texttt{min\\_norm}, \\rho_j^0)` keeps every norm positive, so a
tensor never reaches 0 or flips sign.

Deviation from the paper (``anneal``, default 0.25): over the last ``anneal`` fraction of the
``T`` steps the step size decays linearly to zero, :math:`\\mathrm{lr}_t = \\mathrm{lr}\\,
\\min(1, (T - t)/(\\texttt{anneal}\\,T))` for :math:`t = 0, \\dots, T-1`; before that it is the
paper's constant step. With a constant step sign-SGD with momentum never comes to rest: each
norm keeps moving by up to :math:`\\mathrm{lr}/(1-\\beta)` = 1 norm unit per step, and the
noise inputs make the signs random near the minimum, so the last iterate is a random point of
a band about as wide as the norms MetaInit settles at (a plain ReLU CNN from 4x He: layers at
0.1-0.6 of their He norm of 4.5-5.7, i.e. 0.5-3 units). Small layers hit the floor and the
overall scale ends anywhere in 0.08-0.67 of He depending on round-off (thread count, CPU;
docs/metainit.md). Annealing brings the iterate to rest near the minimum; ``anneal=0`` is the
paper's loop. The adam variant keeps its constant step.

Baseline variant of later papers (``variant="adam"``): every tensor of non-zero norm,
biases included, gets a scale tuned by the shared :class:`~initopt.core.RescaleAdam`
(:math:`\\beta_1` = ``momentum``) within the bounds of :class:`~initopt.core.ScaleSpace`.

Cost of one step: one forward, the gradient with its graph, :math:`Hg` as one more backward,
and the backward through all of it. With ``projected_grads=True`` (default) the last pass
runs no weight-gradient kernel for conv/linear weights (:mod:`initopt.core.bilinear`) of at
least ``projected_min_macs`` multiply-adds per call (smaller layers gain less than the Python-level
algebra costs, and keep plain autograd). A model that is a chain of linear layers and elementwise
activations (:class:`initopt.core.chain.Chain`, none of them reaching ``projected_min_macs``) gets
:math:`g` and :math:`Hg` as ordinary differentiable operations instead of the two nested backward
passes: the same values up to round-off, in one autograd graph of a third of the nodes (the demo's
10-layer MLP: 231 nodes evaluated per step instead of 726, the same 278 matrix products).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from initopt.core import dist
from initopt.core.batches import Batch, batch_size, describe
from initopt.core.bilinear import ProjectedWeightGrads
from initopt.core.blocks import ScaleSpace
from initopt.core.chain import Chain
from initopt.core.functional import Evaluator, check_finite_loss
from initopt.core.optim import RescaleAdam
from initopt.core.precision import HALF
from initopt.core.progress import Progress
from initopt.core.quotient import gradient_and_hvp, gradient_quotient, quotient_total
from initopt.errors import ConfigError, LossError
from initopt.methods.base import Method, Outcome, Problem, check_guard, register

__all__ = ["MetaInit", "MetaInitConfig", "MetaInitRun", "NoiseSource", "embedding_vocabularies"]


def _positive(name: str, v: Any) -> None:
    if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
        raise ConfigError(f"metainit: {name} must be a positive number, got {v!r}")


def _count(name: str, v: Any) -> None:
    if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        raise ConfigError(f"metainit: {name} must be a positive integer or None, got {v!r}")


@dataclass(frozen=True)
class MetaInitConfig:
    """MetaInit settings; defaults are the paper's (its Figure 2).

    Attributes:
        lr: step of the norm (sign variant, absolute norm units) or of the scale (adam).
        momentum: :math:`\\beta` of the sign momentum; :math:`\\beta_1` of the adam variant.
        steps: iterations.
        eps: :math:`\\epsilon` of the gradient quotient.
        mode: ``"eval"`` (the paper) or ``"train"`` (BatchNorm on batch statistics).
        source: ``"noise"``: a fresh random batch at every step, shaped after the first batch
            (N(0, 1) floats, uniform token ids and labels, masks kept; :class:`NoiseSource`);
            ``"batches"``: the user's batches. (Not named ``data``: that is
            :func:`initopt.initialize_`'s argument.)
        input_shape: noise mode, tuple batches: shape of one input example (``None``: as in
            the first batch).
        num_classes: noise mode: number of classes (``None``: last dimension of the model's
            output on the first batch).
        batch_size: noise mode: examples per step (``None``: as in the first batch).
        min_norm: sign variant: floor on each tuned norm, :math:`\\min(\\texttt{min\\_norm},
            \\rho^0_j)`.
        anneal: sign variant: fraction of the steps at the end over which the step size
            decays linearly to 0 (a deviation from the paper, whose constant step leaves the
            last iterate a round-off-dependent point of its oscillation); 0: constant step,
            the paper's loop.
        variant: ``"sign"`` (the paper) or ``"adam"`` (per-tensor scales, biases included,
            by the shared scale optimizer).
        min_scale: adam variant: lower bound of weight and gain scales (biases: 0).
        beta2, clip: adam variant: second-moment decay and per-scale gradient clip.
        projected_grads: compute scale gradients through conv/linear layers by Euler's
            identity (same values, less work); ``False``: plain autograd.
        projected_min_macs: layers with fewer multiply-adds per call keep plain autograd even
            with ``projected_grads`` (the default, 2**23, is the measured crossover: MetaInit
            steps on 6-layer MLPs at 1 thread took 1.4-1.6x the plain step with projection at
            0.26M and 1M multiply-adds per layer, 0.9-1.1x at 4M and 17M, 0.85x at 34M;
            VGG-11's convolutions at batch 32 have 30M-600M). 0: project every layer.
        guard: keep the scales only if copies trained from them for ``guard_steps`` real
            optimizer steps reach a lower held-out loss than copies trained from the start
            (:func:`initopt.core.guard.guard`); otherwise leave the model as it was. ``False``:
            the paper's algorithm, scales always applied.
        guard_steps: optimizer steps of each guard trial.
    """

    lr: float = 0.1
    momentum: float = 0.9
    steps: int = 500
    eps: float = 1e-5
    mode: str = "eval"
    source: str = "noise"
    input_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    batch_size: int | None = None
    min_norm: float = 1e-3
    anneal: float = 0.25
    variant: str = "sign"
    min_scale: float = 0.01
    beta2: float = 0.999
    clip: float | None = 1.0
    projected_grads: bool = True
    projected_min_macs: int = 1 << 23
    guard: bool = True
    guard_steps: int = 25

    def __post_init__(self) -> None:
        check_guard(self, "metainit")
        for k in ("lr", "eps", "min_norm", "min_scale"):
            _positive(k, getattr(self, k))
        if not (isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1):
            raise ConfigError(f"metainit: momentum must be in [0, 1), got {self.momentum!r}")
        if not (isinstance(self.anneal, (int, float)) and not isinstance(self.anneal, bool) and 0 <= self.anneal <= 1):
            raise ConfigError(f"metainit: anneal must be in [0, 1], got {self.anneal!r}")
        if not (isinstance(self.beta2, (int, float)) and 0 <= self.beta2 < 1):
            raise ConfigError(f"metainit: beta2 must be in [0, 1), got {self.beta2!r}")
        if self.clip is not None:
            _positive("clip", self.clip)
        if self.mode not in ("train", "eval"):
            raise ConfigError(f"metainit: mode must be 'eval' or 'train', got {self.mode!r}")
        if self.source not in ("noise", "batches"):
            raise ConfigError(f"metainit: source must be 'noise' or 'batches', got {self.source!r}")
        if self.variant not in ("sign", "adam"):
            raise ConfigError(f"metainit: variant must be 'sign' or 'adam', got {self.variant!r}")
        v = self.projected_min_macs
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            raise ConfigError(f"metainit: projected_min_macs must be an integer >= 0, got {v!r}")
        _count("num_classes", self.num_classes)
        _count("batch_size", self.batch_size)
        if self.input_shape is not None:
            shape = tuple(self.input_shape) if isinstance(self.input_shape, (tuple, list)) else None
            if shape is None or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
                raise ConfigError(
                    "metainit: input_shape must be a tuple of positive integers (one example), "
                    f"got {self.input_shape!r}"
                )
            object.__setattr__(self, "input_shape", shape)


def _logits(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits") and isinstance(out.logits, torch.Tensor):
        return out.logits
    if isinstance(out, dict) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    return None


def _noise_error(what: str) -> ConfigError:
    return ConfigError(
        "metainit: source='noise' draws random batches shaped after the first batch (N(0, 1) floats, uniform "
        f"token ids and class labels, masks kept), but {what}; pass source='batches' to run MetaInit on your "
        "own batches"
    )


def _noise_dtype(t: torch.Tensor) -> torch.dtype:
    """Dtype of drawn N(0, 1) noise for an entry like ``t``: half precision draws in float32
    (the search evaluates half-precision models in float32, :mod:`initopt.core.precision`)."""
    return torch.float32 if t.dtype in HALF else t.dtype


def _binary(t: torch.Tensor) -> bool:
    """Every entry is 0 or 1 (a mask)."""
    return t.dtype == torch.bool or bool(((t == 0) | (t == 1)).all())


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    if a.numel() != b.numel() or a.is_floating_point() or b.is_floating_point() or a.device != b.device:
        return False
    return bool(torch.equal(a.reshape(-1).long(), b.reshape(-1).long()))


def embedding_vocabularies(ev: Evaluator, sample: Batch, entries: dict[Any, torch.Tensor]) -> dict[Any, int]:
    """For each integer entry of ``sample``, the vocabulary of the embeddings that consume it.

    One forward pass on ``sample`` with forward pre-hooks on every ``nn.Embedding`` and
    ``nn.EmbeddingBag``: an entry is consumed by an embedding whose input is the entry itself,
    or holds the same values (a view or reshape of it). Its vocabulary is the smallest
    ``num_embeddings`` among them, so drawn ids are valid for each. Entries no embedding
    consumes are absent from the result. Nothing is read from names.
    """
    seen: list[tuple[int, torch.Tensor]] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        inp = args[0] if args else kwargs.get("input")
        if isinstance(inp, torch.Tensor) and not inp.is_floating_point():
            seen.append((int(module.num_embeddings), inp.detach()))

    handles = [
        m.register_forward_pre_hook(hook, with_kwargs=True)
        for m in ev.model.modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
    ]
    try:
        with torch.no_grad():
            ev.output(ev.space.initial, sample)
    finally:
        for h in handles:
            h.remove()
    out: dict[Any, int] = {}
    for key, t in entries.items():
        for n, inp in seen:
            if _same_values(inp, t):
                out[key] = min(out.get(key, n), n)
    return out


class NoiseSource:
    """MetaInit's data-free batches: fresh random entries shaped after the first batch.

    Each call draws a new batch from ``problem.generator``:

    * ``(inputs, targets, *extras)`` tuples: float inputs ~ N(0, 1) (``input_shape`` overrides
      the shape of one example); integer inputs (token ids) uniform over the vocabulary of the
      embedding that consumes them; integer targets uniform over the classes (``num_classes``,
      or the last dimension of the model's output on the first batch). Extras are kept.
    * ``dict`` batches (keyword inputs, the model's own loss), entry by entry:

      - integer entries consumed by an ``nn.Embedding`` (found by tracing one forward pass,
        :func:`embedding_vocabularies`): token ids, uniform over its vocabulary
        (``input_ids``, ``token_type_ids``, ``decoder_input_ids``, ...);
      - an integer entry equal to an earlier one in the first batch (GPT-2 style
        ``labels = input_ids``): the same draw;
      - masks, i.e. boolean entries and entries of two or more dimensions whose values are all
        0 or 1 (``attention_mask``): kept as in the first batch;
      - other integer entries (``labels``): uniform over the classes as for tuples;
      - other floating entries (``pixel_values``, regression targets): N(0, 1).

    Negative targets (the ignore index -100 of padded positions) stay where they were in the
    first batch. Entries without the batch dimension, 0-d tensors and non-tensors are kept.
    With ``batch_size`` differing from the first batch, kept rows (masks, ignored positions)
    repeat cyclically. Half-precision floats are drawn in float32.
    """

    def __init__(self, cfg: MetaInitConfig, problem: Problem) -> None:
        self.gen = problem.generator
        self.sample = sample = problem.batches.first
        self.ev = problem.evaluator
        self.cfg = cfg
        self._classes: int | None = cfg.num_classes
        self.n = batch_size(sample) if isinstance(sample, (dict, tuple, list)) else 0
        self.bs = cfg.batch_size or self.n
        if isinstance(sample, dict):
            self.kind: Any = dict
            self.plan = self._plan_dict(sample)
        else:
            self.kind = type(sample) if type(sample) in (tuple, list) else tuple
            self.plan = self._plan_tuple(sample)

    # -- plans: one (key, how, args) per entry ---------------------------------------------

    def classes(self, entry: str) -> int:
        """Number of classes of integer labels (``num_classes``, or read once from the logits);
        ``entry`` names the labels in the error when it cannot be read."""
        if self._classes is None:
            try:
                self._classes = MetaInit.infer_classes(self.ev, self.sample)
            except ConfigError:
                raise _noise_error(
                    f"{entry} holds integer labels and the number of classes cannot be read from the model "
                    "output on the first batch (no logits tensor; pass num_classes=...)"
                ) from None
        return self._classes

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` resized to the noise batch size by repeating its rows cyclically."""
        if self.bs == self.n:
            return t
        idx = torch.arange(self.bs, device=t.device) % self.n
        return t[idx]

    def _ignored(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Where ``t`` is negative (an ignore index such as -100) and its values there, resized."""
        neg = t < 0
        if not bool(neg.any()):
            return None
        return self._rows(neg), self._rows(t)

    def _labels(self, entry: str, t: torch.Tensor, high: int | None = None) -> tuple[str, tuple[Any, ...]]:
        high = self.classes(entry) if high is None else high
        return "uniform", ((self.bs, *t.shape[1:]), high, t, self._ignored(t))

    def _plan_tuple(self, sample: Batch) -> list[tuple[Any, str, tuple[Any, ...]]]:
        cfg = self.cfg
        if not isinstance(sample, (tuple, list)) or len(sample) < 2:
            raise _noise_error("the batches are not (inputs, targets) tuples or dicts")
        x, y = sample[0], sample[1]
        if not isinstance(x, torch.Tensor) or x.ndim == 0 or x.dtype == torch.bool or x.is_complex():
            raise _noise_error("the inputs (entry 0) are not a float or integer tensor with a batch dimension")
        if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.dtype == torch.bool or y.ndim == 0:
            raise _noise_error("the targets (entry 1) are not integer class labels with a batch dimension")
        extras = tuple(sample[2:])
        if extras and self.bs != self.n:
            raise _noise_error(f"the batches carry {len(extras)} extra entries that cannot be resized to batch_size")
        xshape = (self.bs, *(cfg.input_shape or tuple(x.shape[1:])))
        if x.is_floating_point():
            plan: list[tuple[Any, str, tuple[Any, ...]]] = [(0, "normal", (xshape, x))]
        else:
            vocab = embedding_vocabularies(self.ev, sample, {0: x}).get(0)
            if vocab is None:
                get = getattr(self.ev.model, "get_input_embeddings", None)
                emb = get() if callable(get) else None
                vocab = int(emb.num_embeddings) if isinstance(emb, nn.Embedding) else None
            if vocab is None:
                raise _noise_error(
                    "the inputs (entry 0) are integer (token ids?) but no nn.Embedding of the model consumes them, "
                    "so their vocabulary is unknown"
                )
            plan = [(0, "uniform", (xshape, vocab, x, None))]
        plan.append((1, *self._labels("the targets (entry 1)", y)))
        plan += [(2 + i, "keep", (e,)) for i, e in enumerate(extras)]
        return plan

    def _plan_dict(self, sample: dict[str, Any]) -> list[tuple[Any, str, tuple[Any, ...]]]:
        if self.cfg.input_shape is not None:
            raise ConfigError(
                "metainit: input_shape applies to (inputs, targets) batches; the entries of dict batches keep "
                "the shapes of the first batch"
            )
        n = self.n

        def batched(t: Any) -> bool:
            return isinstance(t, torch.Tensor) and t.ndim > 0 and t.shape[0] == n

        ints = {k: v for k, v in sample.items() if batched(v) and not v.is_floating_point() and v.dtype != torch.bool}
        vocab = embedding_vocabularies(self.ev, sample, ints) if ints else {}
        plan: list[tuple[Any, str, tuple[Any, ...]]] = []
        drawn: list[str] = []
        for key, t in sample.items():
            entry = f"entry {key!r} ({describe(t)})"
            if not batched(t):
                plan.append((key, "keep", (t,)))
            elif t.is_complex():
                raise _noise_error(f"{entry} is complex (only real floats, integers and masks can be drawn)")
            elif t.dtype == torch.bool:
                plan.append((key, "keep", (self._rows(t),)))
            elif t.is_floating_point():
                if t.ndim >= 2 and _binary(t):
                    plan.append((key, "keep", (self._rows(t),)))
                else:
                    plan.append((key, "normal", ((self.bs, *t.shape[1:]), t)))
            else:
                same = next((k for k in drawn if _same_values(sample[k], t)), None)
                if same is not None:
                    plan.append((key, "same", (same,)))
                elif key in vocab:
                    plan.append((key, *self._labels(entry, t, vocab[key])))
                    drawn.append(key)
                elif t.ndim >= 2 and _binary(t):
                    plan.append((key, "keep", (self._rows(t),)))
                else:
                    plan.append((key, *self._labels(entry, t)))
                    drawn.append(key)
        return plan

    # -- drawing ---------------------------------------------------------------------------

    def __call__(self) -> Batch:
        gen = self.gen
        out: dict[Any, Any] = {}
        for key, how, args in self.plan:
            if how == "normal":
                shape, like = args
                v = torch.randn(shape, generator=gen, device=gen.device, dtype=_noise_dtype(like)).to(like.device)
            elif how == "uniform":
                shape, high, like, ignore = args
                v = torch.randint(0, high, shape, generator=gen, device=gen.device, dtype=like.dtype).to(like.device)
                if ignore is not None:
                    v = torch.where(ignore[0], ignore[1], v)
            elif how == "same":
                v = out[args[0]]
            else:
                v = args[0]
            out[key] = v
        if self.kind is dict:
            return out
        return self.kind(out[k] for k, _, _ in self.plan)


@register
class MetaInit(Method):
    """MetaInit (Dauphin & Schoenholz 2019): tensor norms that minimize the gradient quotient."""

    name = "metainit"
    Config = MetaInitConfig
    summary = "norms that make the gradient quotient small (the gradient changes little after a step)"
    uses_optimizer = True

    @property
    def mode(self) -> str:
        return self.config.mode

    @functools.cached_property
    def _unprojected(self) -> weakref.WeakSet[Evaluator]:
        """Evaluators whose forward had no operation above ``projected_min_macs`` (the batch
        shape is fixed within a search, so the next forwards have none either)."""
        return weakref.WeakSet()

    @functools.cached_property
    def _chains(self) -> weakref.WeakKeyDictionary[Evaluator, Chain | None]:
        """Per evaluator, its model read as a chain of linear layers (:mod:`initopt.core.chain`)."""
        return weakref.WeakKeyDictionary()

    def _chain(self, ev: Evaluator, batch: Batch) -> Chain | None:
        """The chain that computes :math:`g` and :math:`Hg` on ``batch`` in place of nested
        backward passes, or ``None``: the model is not a chain, the batch does not fit, or a
        layer reaches ``projected_min_macs`` (the projected backward pays there)."""
        if ev not in self._chains:
            self._chains[ev] = Chain.of(ev.model, ev.space, ev.task)
        chain = self._chains[ev]
        if chain is None or not chain.accepts(batch):
            return None
        cfg = self.config
        if cfg.projected_grads and chain.max_macs(batch) >= cfg.projected_min_macs:
            return None
        return chain

    # -- pieces ---------------------------------------------------------------------------

    def tuned(self, space: ScaleSpace) -> list[int]:
        """Indices of the blocks whose scale is tuned (sign: tensors with >= 2 dims)."""
        if self.config.variant == "sign":
            return [i for i, b in enumerate(space.blocks) if b.role == "weight" and b.scalable]
        return [i for i, b in enumerate(space.blocks) if b.scalable]

    def noise_source(self, problem: Problem) -> Callable[[], Batch]:
        """Fresh random batches shaped after the first batch (see :class:`NoiseSource`)."""
        return NoiseSource(self.config, problem)

    @staticmethod
    def infer_classes(ev: Evaluator, sample: Batch) -> int:
        """Number of classes: the last dimension of the model's output on ``sample``."""
        with torch.no_grad():
            logits = _logits(ev.output(ev.space.initial, sample))
        if logits is None or logits.ndim == 0:
            raise ConfigError(
                "metainit: cannot read the number of classes from the model output on the first batch "
                "(expected a logits tensor); pass num_classes=..."
            )
        return int(logits.shape[-1])

    def objective(
        self,
        ev: Evaluator,
        space: ScaleSpace,
        alpha: torch.Tensor,
        batch: Batch,
        blocks: Sequence[int],
        clock: list[tuple[str, float]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """GQ at ``alpha`` on ``batch`` and its derivative with respect to the scales of ``blocks``.

        Returns ``(dGQ/dalpha[blocks], gq, loss)`` (0-d tensors for the last two).
        ``clock``, if given, receives ``(phase, perf_counter())`` after each phase.
        """

        def tick(phase: str) -> None:
            if clock is not None:
                clock.append((phase, time.perf_counter()))

        tick("start")
        theta = space.leaves(alpha)
        chain = self._chain(ev, batch)
        pwg = None
        if chain is not None:
            loss, g, hg = chain.terms(theta, batch, clock=tick if clock is not None else None)
            check_finite_loss(loss, "a MetaInit batch")
        else:
            # an evaluator on which no operation reached the size threshold skips the interception
            project = self.config.projected_grads and ev not in self._unprojected
            pwg = ProjectedWeightGrads(theta, min_macs=self.config.projected_min_macs) if project else None
            with pwg.intercept() if pwg is not None else contextlib.nullcontext():
                loss = ev.loss(theta, batch, where="a MetaInit batch")
            if pwg is not None and pwg.projected_calls == 0:
                self._unprojected.add(ev)
            tick("forward")
            g, hg = gradient_and_hvp(loss, theta, create_graph=True, clock=tick if clock is not None else None)
        n = sum(t.numel() for t in theta)
        gq = quotient_total(g, hg, self.config.eps) / n
        tick("quotient")
        d = torch.zeros(len(blocks), dtype=space.dtype, device=space.device)
        if blocks and gq.requires_grad:
            tensors, initial = [theta[i] for i in blocks], [space.initial[i] for i in blocks]
            if pwg is not None:
                d = pwg.scale_gradient(gq, tensors, initial, alpha[list(blocks)])
            else:
                grads = torch.autograd.grad(gq, tensors, allow_unused=True)
                d = ProjectedWeightGrads.contract(grads, initial)
            d = d.to(space.dtype)
        tick("backward")
        return d, gq.detach(), loss.detach()

    def measure(self, ev: Evaluator, space: ScaleSpace, alpha: torch.Tensor, batch: Batch) -> dict[str, float]:
        """GQ and loss at ``alpha`` on ``batch``."""
        theta = space.leaves(alpha)
        loss = ev.loss(theta, batch, where="a MetaInit batch")
        gq = gradient_quotient(loss, theta, eps=self.config.eps)
        v = dist.all_reduce_mean(torch.stack([gq, loss.detach()]).double()).tolist()
        return {"gq": v[0], "loss": v[1]}

    # -- the verb -------------------------------------------------------------------------

    def search(self, problem: Problem, steps: int, progress: Progress) -> Outcome:
        run = self.start(problem, steps)
        before = run.measure()
        history: list[dict[str, Any]] = []
        for _ in range(steps):
            rec = run.step()
            history.append(rec)
            progress.update(gq=f"{rec['gq']:.4g}")
        return Outcome(alpha=run.alpha, history=history, before=before, after=run.measure())

    def start(self, problem: Problem, steps: int | None = None) -> MetaInitRun:
        """The state of a search on ``problem``, advanced by :meth:`MetaInitRun.step`.

        ``steps``: the length of the run the step size is annealed over (default
        ``config.steps``)."""
        return MetaInitRun(self, problem, steps)

    def step_size(self, t: int, steps: int) -> float:
        """Sign variant: the step size of step ``t`` (from 0) of a run of ``steps`` steps: ``lr``,
        decaying linearly to 0 over the last ``anneal * steps`` steps (0 from step ``steps`` on)."""
        cfg = self.config
        ramp = cfg.anneal * steps
        if ramp <= 0:
            return cfg.lr
        return cfg.lr * min(1.0, max(0.0, (steps - t) / ramp))

    def _sign_stepper(
        self, space: ScaleSpace, blocks: list[int], steps: int
    ) -> Callable[[torch.Tensor, torch.Tensor], None]:
        """Sign-SGD with momentum on the norms of ``blocks`` (no host synchronization), the
        step size annealed by :meth:`step_size` over a run of ``steps`` steps."""
        cfg = self.config
        kw = {"dtype": space.dtype, "device": space.device}
        idx = torch.tensor(blocks, dtype=torch.long, device=space.device)
        rho0 = torch.tensor([space.blocks[i].init_norm for i in blocks], **kw)
        floor = torch.clamp(rho0, max=cfg.min_norm)
        mom = torch.zeros(len(blocks), **kw)
        t = [0]

        @torch.no_grad()
        def step(alpha: torch.Tensor, d_alpha: torch.Tensor) -> None:
            lr = self.step_size(t[0], steps)
            t[0] += 1
            if not blocks:
                return
            d_rho = d_alpha / rho0
            mom.mul_(cfg.momentum).sub_(lr * torch.sign(d_rho))
            rho = torch.maximum(alpha[idx] * rho0 + mom, floor)
            alpha[idx] = rho / rho0

        return step

    def _adam_stepper(
        self, space: ScaleSpace, blocks: list[int], steps: int
    ) -> Callable[[torch.Tensor, torch.Tensor], None]:
        """The shared scale optimizer on the scales of ``blocks`` (constant step; ``steps`` unused)."""
        cfg = self.config
        lo, hi = space.bounds()
        idx = torch.tensor(blocks, dtype=torch.long, device=space.device)
        opt = RescaleAdam(lo[idx], hi[idx], lr=cfg.lr, betas=(cfg.momentum, cfg.beta2), clip=cfg.clip)

        @torch.no_grad()
        def step(alpha: torch.Tensor, d_alpha: torch.Tensor) -> None:
            if not blocks:
                return
            a = alpha[idx]
            opt.step(a, d_alpha, kind="objective")
            alpha[idx] = a

        return step


class MetaInitRun:
    """One MetaInit search in progress: scales, optimizer state and the data source.

    :meth:`step` is one iteration of the loop (draw a batch, GQ and its scale gradient, update);
    :meth:`measure` evaluates GQ and loss on the fixed probe batch (drawn first in noise mode,
    the first batch otherwise).
    """

    def __init__(self, method: MetaInit, problem: Problem, steps: int | None = None) -> None:
        cfg = method.config
        self.steps = cfg.steps if steps is None else steps
        self.method, self.problem = method, problem
        self.space, self.ev = problem.space, problem.evaluator
        self.draw = method.noise_source(problem) if cfg.source == "noise" else problem.next_batch
        self.probe = self.draw() if cfg.source == "noise" else problem.batches.first
        self.blocks = method.tuned(self.space)
        self.alpha = self.space.ones()
        stepper = method._sign_stepper if cfg.variant == "sign" else method._adam_stepper
        self.update = stepper(self.space, self.blocks, self.steps)
        self.t = 0

    def measure(self) -> dict[str, float]:
        return self.method.measure(self.ev, self.space, self.alpha, self.probe)

    def step(self, clock: list[tuple[str, float]] | None = None) -> dict[str, Any]:
        """One iteration; returns its history record ``{"step", "gq", "loss"}``."""
        batch = self.draw()
        if clock is not None:
            clock.append(("draw", time.perf_counter()))
        d, gq, loss = self.method.objective(self.ev, self.space, self.alpha, batch, self.blocks, clock=clock)
        if dist.active():  # one all-reduce: the scale gradient and the two measures, averaged over ranks
            k = d.numel()
            both = dist.all_reduce_mean(torch.cat([d.double(), gq.double().reshape(1), loss.double().reshape(1)]))
            d, gq, loss = both[:k].to(d.dtype), both[k], both[k + 1]
        loss_v, gq_v, d_v = torch.stack([loss.double(), gq.double(), d.double().abs().sum()]).tolist()
        if not all(math.isfinite(v) for v in (loss_v, gq_v, d_v)):
            raise LossError(
                f"metainit: non-finite loss ({loss_v}), gradient quotient ({gq_v}) or scale gradient "
                f"at step {self.t}; check the model and data, or lower lr"
            )
        self.update(self.alpha, d)
        if clock is not None:
            clock.append(("update", time.perf_counter()))
        rec = {"step": self.t, "gq": gq_v, "loss": loss_v}
        self.t += 1
        return rec
