"""Built-in data sets that need no network: scikit-learn's digits and synthetic tasks.

Each loader returns ``(train, test)`` as :class:`torch.utils.data.TensorDataset`; use
:func:`loader` for a seeded DataLoader.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from initopt.errors import DataError

__all__ = [
    "cifar10",
    "digits",
    "loader",
    "mnist1d",
    "synthetic_classification",
    "synthetic_sequences",
    "synthetic_sort",
]


def digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 8x8 digits (1797 images, 10 classes) as 64 standardized features.

    Needs scikit-learn (``pip install initopt[data]``); the data ships inside it.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - optional extra
        raise DataError("the digits data set needs scikit-learn: pip install 'initopt[data]'") from e
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    n_test = int(len(x) * test_fraction)
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    # pixels are 0..16; a floor of 1 on the std keeps pixels that are constant in the training
    # split (image corners) from blowing up where the test split has ink
    mean, std = x[train_idx].mean(0), x[train_idx].std(0).clamp_min(1.0)
    x = (x - mean) / std
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[test_idx], y[test_idx])


def mnist1d(num_samples: int = 4000, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """MNIST-1D (Greydanus 2020): 40-point 1-D signals, 10 classes, generated offline.

    Needs the ``mnist1d`` package, whose generator rebuilds the data set from its built-in
    templates (no download). 80 % / 20 % train/test split, as the generator makes it.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:  # pragma: no cover - optional extra
        raise DataError("the MNIST-1D data set needs the mnist1d package: pip install mnist1d") from e
    args = get_dataset_args()
    args.num_samples = int(num_samples)
    args.seed = int(seed)
    d = make_dataset(args)
    x, xt = torch.tensor(d["x"], dtype=torch.float32), torch.tensor(d["x_test"], dtype=torch.float32)
    mean, std = x.mean(), x.std()
    return (
        TensorDataset((x - mean) / std, torch.tensor(d["y"], dtype=torch.long)),
        TensorDataset((xt - mean) / std, torch.tensor(d["y_test"], dtype=torch.long)),
    )


def cifar10(root: str) -> tuple[TensorDataset, TensorDataset]:
    """CIFAR-10 from a local folder in torchvision's layout (``root/cifar-10-batches-py``).

    Nothing is downloaded: the folder must already hold the data. Reads the pickled batches
    directly (no torchvision needed) and normalizes with the training set's channel statistics.
    """
    import os
    import pickle

    base = os.path.join(root, "cifar-10-batches-py")
    if not os.path.isdir(base):
        raise DataError(
            f"no CIFAR-10 data under {root!r}: expected the folder {base!r} (torchvision's layout); "
            "download it on a machine with a network, e.g. torchvision.datasets.CIFAR10(root, download=True)"
        )

    def read(names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for n in names:
            path = os.path.join(base, n)
            if not os.path.exists(path):
                raise DataError(f"CIFAR-10 file missing: {path}")
            with open(path, "rb") as f:
                d = pickle.load(f, encoding="latin1")
            xs.append(torch.as_tensor(d["data"], dtype=torch.uint8).reshape(-1, 3, 32, 32))
            ys.append(torch.as_tensor(d["labels"], dtype=torch.long))
        return torch.cat(xs).float() / 255.0, torch.cat(ys)

    x, y = read([f"data_batch_{i}" for i in range(1, 6)])
    xt, yt = read(["test_batch"])
    mean, std = x.mean(dim=(0, 2, 3), keepdim=True), x.std(dim=(0, 2, 3), keepdim=True)
    return TensorDataset((x - mean) / std, y), TensorDataset((xt - mean) / std, yt)


def synthetic_classification(
    n: int = 2048, features: int = 32, classes: int = 10, seed: int = 0, test_fraction: float = 0.2
) -> tuple[TensorDataset, TensorDataset]:
    """Gaussian inputs labelled by a random two-layer teacher network."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    w1 = torch.randn(features, 64, generator=g) / features**0.5
    w2 = torch.randn(64, classes, generator=g) / 8.0
    y = (torch.tanh(x @ w1) @ w2).argmax(1)
    k = int(n * (1 - test_fraction))
    return TensorDataset(x[:k], y[:k]), TensorDataset(x[k:], y[k:])


def synthetic_sequences(
    n: int = 2048,
    length: int = 16,
    vocab: int = 32,
    classes: int = 4,
    seed: int = 0,
    test_fraction: float = 0.2,
) -> tuple[TensorDataset, TensorDataset]:
    """Token sequences labelled by which of ``classes`` marker tokens occurs most often."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(classes, vocab, (n, length), generator=g)
    counts = torch.randint(0, 4, (n, classes), generator=g)
    for c in range(classes):
        for j in range(length):
            mask = (counts[:, c] > j % 4) & (torch.rand(n, generator=g) < 0.3)
            x[mask, j] = c
    y = torch.stack([(x == c).sum(1) for c in range(classes)], 1).argmax(1)
    k = int(n * (1 - test_fraction))
    return TensorDataset(x[:k], y[:k]), TensorDataset(x[k:], y[k:])


def synthetic_sort(
    n: int = 4096,
    length: int = 12,
    vocab: int = 10,
    seed: int = 0,
    test_fraction: float = 0.2,
) -> tuple[TensorDataset, TensorDataset]:
    """Sorting as per-token classification: uniform random strings of ``length`` symbols in
    ``0..vocab-1``; the target at position ``i`` is the ``i``-th smallest symbol.

    Inputs and targets are both ``(examples, length)`` long tensors; a model must return
    per-position logits ``(examples, length, vocab)`` (e.g. ``zoo.post_ln_transformer(
    per_token=True, num_classes=vocab)``). The same ``seed`` gives the same data.
    """
    if n < 2 or length < 1 or vocab < 2:
        raise DataError(f"synthetic_sort needs n >= 2, length >= 1, vocab >= 2; got {n}, {length}, {vocab}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, length), generator=g)
    y = x.sort(dim=1).values
    k = int(n * (1 - test_fraction))
    return TensorDataset(x[:k], y[:k]), TensorDataset(x[k:], y[k:])


def loader(dataset: TensorDataset, batch_size: int = 64, *, shuffle: bool = True, seed: int = 0) -> DataLoader:
    """A DataLoader with its own seeded generator and ``drop_last`` (equal batch sizes)."""
    if batch_size < 2:
        raise DataError(f"batch_size must be at least 2, got {batch_size}")
    g = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=True, generator=g)
