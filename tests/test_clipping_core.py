"""Gradient clipping functions against direct computations, case by case (the property tests in
``tests/test_properties.py`` cover random gradient sets): defaults, the exact coefficient, per-group norms,
AGC's unit norms and eps floor, the percentile clipper's history, warm-up and state.

No Trainer: ``benchmarks/mutation.py clipping`` runs these against every mutant.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_gradguard.clipping import (
    PercentileClipper, adaptive_clip_, agc_exempt_params, clip_by_norm_, clip_by_norm_per_group_, clip_by_value_,
    global_norm, masked_slot_write_, unitwise_norm,
)

NAN, INF = float("nan"), float("inf")


def _params(*grads):
    out = []
    for g in grads:
        p = nn.Parameter(torch.zeros_like(torch.as_tensor(g, dtype=torch.float32)))
        p.grad = torch.as_tensor(g, dtype=torch.float32).clone()
        out.append(p)
    return out
