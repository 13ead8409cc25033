"""initopt.core.dist outside a distributed run: every helper is a no-op (the two-process
behaviour is tested under torchrun in tests/test_distributed.py)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as td

from initopt.core import dist
from initopt.core.affine import AffineUse


def _use(values: list[float]) -> AffineUse:
    u = AffineUse(0)
    u.add(torch.tensor(values, dtype=torch.float64))
    return u


def _check_noop() -> None:
    assert not dist.active()
    t = torch.tensor([1.0, float("nan"), 3.0])
    assert dist.all_reduce_mean(t) is t
    assert dist.mean_floats([1.5, 2.5]) == [1.5, 2.5]
    u = _use([1.0, 2.0, 4.0])
    mean, m2, count = u.mean, u.m2, u.count
    extra = torch.tensor(0.25)
    assert dist.pool_moments_([u], extra) is extra
    assert (u.mean, u.m2, u.count) == (mean, m2, count)
    dist.check_same(torch.tensor([1.0, 2.0]), "anything")
    dist.fail_together(None, "anything")
    dist.fail_together(ValueError("mine"), "anything")  # the caller raises its own error
    alpha = torch.tensor([0.5, 2.0])
    assert dist.agree_(alpha, "x") is alpha


def test_not_initialized_is_a_no_op():
    if td.is_available() and td.is_initialized():  # pragma: no cover - tests run single-process
        pytest.skip("a process group is already initialized")
    assert dist.world_size() == 1 and dist.rank() == 0
    _check_noop()


@pytest.mark.skipif(not (td.is_available() and td.is_gloo_available()), reason="no gloo")
def test_world_of_one_is_a_no_op():
    if td.is_initialized():  # pragma: no cover
        pytest.skip("a process group is already initialized")
    td.init_process_group("gloo", store=td.HashStore(), rank=0, world_size=1)
    try:
        assert dist.world_size() == 1 and dist.rank() == 0
        _check_noop()
    finally:
        td.destroy_process_group()


def test_local_context_nests_and_restores():
    assert not dist._LOCAL.get()
    with dist.local():
        assert dist._LOCAL.get() and not dist.active()
        with dist.local():
            assert not dist.active()
        assert dist._LOCAL.get()
    assert not dist._LOCAL.get()


def test_distributed_error_is_an_initopt_error():
    import initopt

    assert issubclass(initopt.DistributedError, initopt.InitOptError)
    assert dist.DistributedError is initopt.DistributedError
