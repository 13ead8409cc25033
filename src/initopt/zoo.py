"""Built-in models: small networks for tests, the demo and the benchmarks.

Every factory returns a fresh ``nn.Module`` with PyTorch's default initialization (draws
come from the global generator: seed it with ``torch.manual_seed`` for reproducibility).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MODELS",
    "TiedLM",
    "TransformerClassifier",
    "build",
    "cnn",
    "mlp",
    "plain_cnn",
    "post_ln_transformer",
    "resnet",
    "tied_lm",
    "vgg11",
]


def mlp(
    depth: int = 8,
    width: int = 64,
    in_features: int = 64,
    num_classes: int = 10,
    activation: Callable[[], nn.Module] = nn.ReLU,
    batchnorm: bool = False,
) -> nn.Sequential:
    """Plain multilayer perceptron: ``depth`` hidden layers of ``width`` units, no skips."""
    layers: list[nn.Module] = [nn.Flatten()]
    d = in_features
    for _ in range(depth):
        layers.append(nn.Linear(d, width))
        if batchnorm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(activation())
        d = width
    layers.append(nn.Linear(d, num_classes))
    return nn.Sequential(*layers)


def cnn(
    channels: tuple[int, ...] = (8, 16),
    in_channels: int = 3,
    num_classes: int = 10,
    batchnorm: bool = False,
    dropout: float = 0.0,
) -> nn.Sequential:
    """Plain convolutional network: 3x3 conv (+BN) + ReLU + 2x2 max-pool per stage."""
    layers: list[nn.Module] = []
    c = in_channels
    for width in channels:
        layers.append(nn.Conv2d(c, width, 3, padding=1, bias=not batchnorm))
        if batchnorm:
            layers.append(nn.BatchNorm2d(width))
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        c = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(c, num_classes))
    return nn.Sequential(*layers)


def vgg11(in_channels: int = 3, num_classes: int = 10, batchnorm: bool = False) -> nn.Sequential:
    """VGG-11 for 32x32 images (CIFAR variant: one linear classifier on 512 features)."""
    cfg: list[int | str] = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
    layers: list[nn.Module] = []
    c = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        assert isinstance(v, int)
        layers.append(nn.Conv2d(c, v, 3, padding=1))
        if batchnorm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        c = v
    layers += [nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


def plain_cnn(
    depth: int = 12,
    width: int = 32,
    in_channels: int = 1,
    num_classes: int = 10,
    activation: Callable[[], nn.Module] = nn.ReLU,
    batchnorm: bool = False,
    dim: int = 1,
    input_shape: tuple[int, ...] | None = None,
) -> nn.Sequential:
    """Deep plain CNN: ``depth`` 3-wide ``dim``-D convolutions of ``width`` channels (+BN) and
    activations, no pooling and no skips, then global average pooling and a linear head.

    ``input_shape`` (e.g. ``(40,)`` for MNIST-1D, ``(8, 8)`` for digits) reshapes flat inputs of
    ``in_channels * prod(input_shape)`` features into ``(in_channels, *input_shape)`` first.
    """
    if dim not in (1, 2):
        raise ValueError(f"dim must be 1 or 2, got {dim}")
    conv = nn.Conv1d if dim == 1 else nn.Conv2d
    norm = nn.BatchNorm1d if dim == 1 else nn.BatchNorm2d
    layers: list[nn.Module] = []
    if input_shape is not None:
        layers.append(nn.Unflatten(1, (in_channels, *input_shape)))
    c = in_channels
    for _ in range(depth):
        layers.append(conv(c, width, 3, padding=1, bias=not batchnorm))
        if batchnorm:
            layers.append(norm(width))
        layers.append(activation())
        c = width
    layers += [nn.AdaptiveAvgPool1d(1) if dim == 1 else nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    layers.append(nn.Linear(c, num_classes))
    return nn.Sequential(*layers)


class _Block(nn.Module):
    def __init__(self, width: int, batchnorm: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=not batchnorm)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=not batchnorm)
        self.bn1 = nn.BatchNorm2d(width) if batchnorm else nn.Identity()
        self.bn2 = nn.BatchNorm2d(width) if batchnorm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(h)))


class ResNet(nn.Module):
    """Small residual network: stem conv, ``blocks`` basic blocks, linear head."""

    def __init__(
        self,
        blocks: int = 2,
        width: int = 8,
        in_channels: int = 3,
        num_classes: int = 10,
        batchnorm: bool = True,
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.blocks = nn.Sequential(*[_Block(width, batchnorm) for _ in range(blocks)])
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(F.relu(self.stem(x)))
        return self.head(h.mean(dim=(2, 3)))


def resnet(**kw: Any) -> ResNet:
    """A :class:`ResNet` (keyword arguments as its constructor)."""
    return ResNet(**kw)


class TransformerClassifier(nn.Module):
    """Post-LN Transformer encoder over token ids, mean-pooled, with a linear head.

    Has a raw ``nn.Parameter`` position table and ``MultiheadAttention.in_proj_weight``s.
    With ``per_token=True`` there is no pooling: the head scores every position and the
    output is ``(batch, length, num_classes)`` (per-token classification, e.g. sorting).
    ``dim_feedforward`` defaults to ``2 * d_model``.
    """

    def __init__(
        self,
        vocab: int = 32,
        d_model: int = 16,
        nhead: int = 2,
        layers: int = 2,
        num_classes: int = 4,
        max_len: int = 16,
        dropout: float = 0.1,
        per_token: bool = False,
        dim_feedforward: int | None = None,
    ) -> None:
        super().__init__()
        self.per_token = per_token
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(max_len, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model,
            nhead,
            dim_feedforward=dim_feedforward or 2 * d_model,
            dropout=dropout,
            batch_first=True,
            norm_first=False,
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(tokens) + self.pos[: tokens.shape[1]])
        return self.head(h if self.per_token else h.mean(dim=1))


def post_ln_transformer(**kw: Any) -> TransformerClassifier:
    """A post-LN :class:`TransformerClassifier` (``per_token=True``: per-position logits)."""
    return TransformerClassifier(**kw)


class TiedLM(nn.Module):
    """Tiny language model whose output head shares the embedding matrix.

    Hugging Face style: ``model(input_ids=..., labels=...)`` returns ``{"logits", "loss"}``.
    """

    def __init__(self, vocab: int = 32, d_model: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.mix = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
        h = self.embed(input_ids)
        logits = self.head(self.norm(h + self.mix(h)))
        out: dict[str, Any] = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        return out


def tied_lm(**kw: Any) -> TiedLM:
    """A :class:`TiedLM`."""
    return TiedLM(**kw)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "cnn": cnn,
    "plain_cnn": plain_cnn,
    "vgg11": vgg11,
    "resnet": resnet,
    "post_ln_transformer": post_ln_transformer,
    "tied_lm": tied_lm,
}


def build(name: str, **kw: Any) -> nn.Module:
    """Build a zoo model by name."""
    from initopt.errors import ConfigError

    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; built-in models: {', '.join(sorted(MODELS))}")
    return MODELS[name](**kw)
