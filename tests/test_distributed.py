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


@pytest.fixture
def one_rank_mesh(tmp_path):
    """A 1-rank gloo process group in this process and its device mesh (destroyed after the test)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_dtensor_placements_give_the_unsharded_results(one_rank_mesh):
    """Every placement path (rows, columns, 1-d, replicated) of AGC, norms, statistics and init on DTensors
    equals the plain-tensor result."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from lightning_gradguard.clipping import adaptive_clip_, clip_by_norm_per_group_
    from lightning_gradguard.init import initialize
    from lightning_gradguard.stats import grad_statistics, layer_groups

    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    plain(torch.randn(4, 6)).pow(2).sum().mul(50).backward()
    sharded = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    # columns (gathered), rows (whole units), and two 1-d shards (norms from the shards' squares, in one go)
    placements = {"0.weight": Shard(1), "0.bias": Shard(0), "2.weight": Shard(0), "2.bias": Shard(0)}
    for name, p in sharded.named_parameters():
        src = dict(plain.named_parameters())[name]
        d = torch.nn.Parameter(distribute_tensor(src.detach().clone(), one_rank_mesh, [placements[name]]))
        d.grad = distribute_tensor(src.grad.clone(), one_rank_mesh, [placements[name]])
        module, attr = sharded[int(name[0])], name.split(".")[1]
        setattr(module, attr, d)
    params = list(sharded.parameters())
    assert all(distributed.is_dtensor(p) for p in params) and distributed.count_weights(params).tolist() == [1.0] * 4
    assert torch.allclose(global_norm(params), global_norm(list(plain.parameters())))
    assert torch.allclose(grad_statistics(layer_groups(sharded)), grad_statistics(layer_groups(plain)))
    shared_sq = torch.stack([distributed.local(p.grad).pow(2).sum() for p in params])  # as the monitor shares them
    assert torch.allclose(global_norm(params, tensor_sq=shared_sq), global_norm(list(plain.parameters())))
    inf_groups = lambda m: [list(m[0].parameters()), list(m[2].parameters())]  # noqa: E731
    assert torch.equal(clip_by_norm_per_group_(inf_groups(sharded), 1e9, "inf"), clip_by_norm_per_group_(inf_groups(plain), 1e9, "inf"))
    groups = lambda m: [list(m[0].parameters()), list(m[2].parameters())]  # noqa: E731
    norms_sharded = clip_by_norm_per_group_(groups(sharded), 0.5)
    assert torch.allclose(norms_sharded, clip_by_norm_per_group_(groups(plain), 0.5)) and (norms_sharded > 0.5).all()
    assert torch.allclose(global_norm(params), global_norm(list(plain.parameters())))
    original = [q.grad.clone() for q in plain.parameters()]
    adaptive_clip_(params, 0.01)
    adaptive_clip_(list(plain.parameters()), 0.01)
    for p, q, g in zip(params, plain.parameters(), original):
        assert torch.allclose(p.grad.full_tensor(), q.grad), "AGC on the shards differs"
        assert not torch.allclose(q.grad, g)  # every parameter was really clipped
    initialize(sharded, "auto", seed=3)
    initialize(plain, "auto", seed=3)
    for p, q in zip(sharded.parameters(), plain.parameters()):
        assert torch.equal(p.full_tensor(), q.detach())
    with pytest.raises(ValueError, match=r"^initialize: scheme='lsuv' needs the unsharded model \(its forward passes stop "
                       r"inside layers\): run it before fully_shard, e\.g\. build the layers in __init__ and shard them in "
                       r"configure_model$"):
        initialize(sharded, "lsuv", sample_input=torch.randn(4, 6))
