"""Built-in data sets: shapes, splits, normalization, and CIFAR-10 from a stand-in folder."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

import initopt
from initopt import data


def test_digits():
    train, test = data.digits()
    assert train.tensors[0].shape[1] == 64 and len(train) + len(test) == 1797
    assert abs(float(train.tensors[0].mean())) < 1e-4
    assert float(test.tensors[0].abs().max()) < 20  # the std floor keeps corner pixels bounded


def test_mnist1d_generated_offline():
    train, test = data.mnist1d(num_samples=200)
    assert train.tensors[0].shape == (160, 40) and test.tensors[0].shape == (40, 40)
    assert set(train.tensors[1].tolist()) <= set(range(10))


def test_synthetic_tasks():
    tr, te = data.synthetic_sequences(n=100)
    assert len(te) == 20
    assert tr.tensors[0].dtype == torch.long and tr.tensors[0].shape[1] == 16
    tr, _ = data.synthetic_classification(n=100)
    assert tr.tensors[0].shape == (80, 32)


def _fake_cifar(root, n=20):
    base = root / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}
        with open(base / name, "wb") as f:
            pickle.dump(d, f)


def test_cifar10_from_a_local_stand_in(tmp_path):
    _fake_cifar(tmp_path)
    train, test = data.cifar10(str(tmp_path))
    assert train.tensors[0].shape == (100, 3, 32, 32) and test.tensors[0].shape == (20, 3, 32, 32)
    torch.testing.assert_close(train.tensors[0].mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)


def test_cifar10_missing_folder_says_what_to_do(tmp_path):
    with pytest.raises(initopt.DataError, match="download it on a machine with a network"):
        data.cifar10(str(tmp_path))


def test_loader_rejects_tiny_batches():
    with pytest.raises(initopt.DataError):
        data.loader(data.synthetic_classification(n=50)[0], batch_size=1)
