"""LSUV: layer-sequential unit-variance initialization (Mishkin & Matas 2015, "All you need is a good init").

After an orthogonal init, each weighted layer in forward order is rescaled on a real batch until the
variance of its output is 1 ± ``tol`` (at most ``max_iters`` forward passes per layer). The forward pass
stops at the layer being measured, so early layers cost little.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from lightning_gradguard.graph import LayerInfo, call_with_batch


class _Stop(Exception):
    pass


def _output_variance(model: nn.Module, layer: nn.Module, batch: Any) -> float:
    seen: list[torch.Tensor] = []

    def hook(mod, inp, out):
        seen.append(out[0] if isinstance(out, tuple) else out)
        raise _Stop

    handle = layer.register_forward_hook(hook)
    try:
        call_with_batch(model, batch)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError("LSUV: the layer was not called by the forward pass")
    return float(seen[0].detach().float().var())


def lsuv_rescale_(
    model: nn.Module, layers: Sequence[LayerInfo], records: Sequence[Any], sample_input: Any,
    tol: float = 0.1, max_iters: int = 10,
) -> None:
    """Rescale each layer's weight in forward order so its output variance is 1 ± ``tol``.

    ``records`` (the init table's rows, same order as ``layers``) get the achieved variance in ``note``.
    Model mode, BN running statistics and dropout are left alone: the passes run in eval mode, no grad.

    Example:
        >>> net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> from lightning_gradguard.init import initialize
        >>> rows = initialize(net, "lsuv", sample_input=torch.randn(64, 16), seed=0)
    """
    args = sample_input
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for info, rec in zip(layers, records):
                weight = getattr(info.module, "weight", None)
                if rec.scheme in ("-",) or weight is None or not weight.requires_grad or isinstance(info.module, nn.Embedding):
                    continue
                var, it = _output_variance(model, info.module, args), 0
                while abs(var - 1.0) > tol and it < max_iters and var > 1e-12:
                    weight.div_(var**0.5)
                    var, it = _output_variance(model, info.module, args), it + 1
                rec.scheme = "lsuv"
                rec.achieved_std = float(weight.float().std())
                rec.note = f"output var {var:.3f} after {it} rescale(s)"
    finally:
        model.train(was_training)
