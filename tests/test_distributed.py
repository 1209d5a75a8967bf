"""The sharding helpers in one process: plain tensors pass through unchanged, no collective is needed, and
unsupported strategies are named. (Their multi-process behaviour is tested in tests/integration/test_fsdp.py.)"""

from __future__ import annotations

import pytest
import torch

from lightning_gradguard import distributed
from lightning_gradguard.clipping import global_norm


def test_plain_tensors_pass_through_in_one_process():
    t = torch.randn(4, 3)
    assert distributed.local(t) is t and not distributed.is_dtensor(t) and not distributed.is_multi_process()
    assert distributed.count_weight(t) == 1.0  # rank 0 counts a replicated tensor
    sums, maxes = distributed.reduce_sum_max(torch.tensor([1.0, 2.0]), torch.tensor([3.0]))
    assert sums.tolist() == [1.0, 2.0] and maxes.tolist() == [3.0]
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    with distributed.materialized(t) as full:
        assert full is t


def test_global_norm_matches_torch_clip_grad_norm():
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 2))
    net(torch.randn(3, 5)).pow(2).sum().backward()
    params = list(net.parameters())
    ours, ours_inf = global_norm(params), global_norm(params, "inf")
    assert torch.allclose(ours, torch.nn.utils.get_total_norm([p.grad for p in params]))
    assert torch.allclose(ours_inf, torch.nn.utils.get_total_norm([p.grad for p in params], float("inf")))
    with pytest.raises(ValueError, match="norm_type=3"):
        distributed.global_norm([p.grad for p in params], 3)


def test_unsupported_strategy_names_it_and_the_supported_ones():
    class XLAFSDPStrategy:  # the check reads class names of the type and its bases
        pass

    class MyStrategy(XLAFSDPStrategy):
        pass

    with pytest.raises(RuntimeError, match=r"GradientMonitor does not support strategy MyStrategy: XLA.*ModelParallelStrategy"):
        distributed.check_strategy(MyStrategy(), "GradientMonitor")
    distributed.check_strategy(object(), "GradientMonitor")
