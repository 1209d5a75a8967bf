"""The data the multi-process test scripts (``ddp_fit.py``, ``fsdp_fit.py``) share with their 1-process runs."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


def rank_split_loader(world_size: int, rank: int, classes: int, global_batch: int = 32, n: int = 256) -> DataLoader:
    """Fixed random data, unshuffled: rank r takes samples r, r + world_size, ..., so step k of all ranks
    together sees exactly the ``global_batch`` samples one process sees at step k (Lightning's own sampler
    would shuffle)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    data = TensorDataset(x, y)
    sampler = DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=False) if world_size > 1 else None
    return DataLoader(data, batch_size=global_batch // world_size, shuffle=False, sampler=sampler)
