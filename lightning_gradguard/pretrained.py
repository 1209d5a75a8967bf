"""Which layers hold weights that must not be re-initialized: loaded, trained, adapters, tied.

Initialization is for weights fresh from construction. A layer is kept (``WeightInitialization`` and
GradGuard's init trial skip it, saying why, unless ``force=True``) when one of these holds:

===============================  ===========================================================================
signal                           what it means
===============================  ===========================================================================
``adapter``                      a parameter path with ``lora_`` (PEFT's LoRA ``lora_A``/``lora_B``: ``lora_B``
                                 must start at zero), or ``ia3_``/``adapter_``: the adapter's own init
``loaded``                       inside a Hugging Face model built by ``from_pretrained``
                                 (``config._name_or_path`` is set; a model built from a config has it empty)
``trained``                      the weight matrix's top singular value is more than ``TRAINED_RATIO`` (1.3)
                                 times the edge of the random-matrix spectrum, std·(√rows + √cols)
===============================  ===========================================================================

Why the spectrum: every construction-time init (PyTorch's uniform, Hugging Face's N(0, 0.02), timm's
truncated normal or Kaiming, orthogonal) draws entries independently, and the largest singular value of
such a matrix stays at or below std·(√m + √n) (Marchenko–Pastur edge; measured ≤ 1.07 on random matrices
from 3×27 to 256×64, orthogonal 0.5). Training adds low-rank structure whose singular values stand out
(Martin & Mahoney 2021, heavy-tailed self-regularization): a 64-64-10 MLP trained 100 Adam steps on digits
reads 1.5 on its hidden layers. The top singular value comes from 30 power iterations (a lower bound, so a
random matrix is never flagged). Matrices with a side below 4 are not judged. An output layer trained only
a few steps may still read as fresh: pass ``exclude`` for it.

Example:
    >>> net = nn.Linear(64, 64)
    >>> keep_reason(net.weight, "0.weight") is None     # fresh from construction
    True
    >>> with torch.no_grad():
    ...     net.weight += 0.5 * torch.outer(torch.ones(64), torch.ones(64))  # a learned rank-one direction
    >>> keep_reason(net.weight, "0.weight")[:7]
    'trained'
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lightning_gradguard.distributed import full_tensor

#: top singular value / random-matrix edge above which a weight counts as trained
TRAINED_RATIO = 1.3
#: parameter-path fragments of adapters that carry their own init
ADAPTER_MARKERS = ("lora_", "ia3_", "adapter_")


def spectral_ratio(weight: torch.Tensor, iterations: int = 30) -> Optional[float]:
    """Largest singular value of ``weight`` (flattened to ``(rows, rest)``) over std·(√rows + √cols);
    ``None`` when a side is below 4 or the weight is constant."""
    w = full_tensor(weight.detach()).float().flatten(1) if weight.dim() > 1 else None  # an FSDP2 shard: whole
    if w is None or min(w.shape) < 4:
        return None
    std = w.std()
    if not torch.isfinite(std) or float(std) == 0.0:
        return None
    g = torch.Generator(device=w.device).manual_seed(0)
    v = torch.randn(w.shape[1], 1, generator=g, device=w.device)
    for _ in range(iterations):
        v = w.T @ (w @ v)
        v = v / v.norm().clamp(min=1e-30)
    sigma = (w @ v).norm()
    edge = std * (w.shape[0] ** 0.5 + w.shape[1] ** 0.5)
    return float(sigma / edge)


def keep_reason(weight: torch.Tensor, path: str) -> Optional[str]:
    """Why ``weight`` (at parameter path ``path``) should be kept, or ``None`` if it looks fresh."""
    leaf_path = path.lower()
    marker = next((m for m in ADAPTER_MARKERS if m in leaf_path), None)
    if marker is not None:
        return f"adapter ({marker}*) keeps its own init"
    ratio = spectral_ratio(weight)
    if ratio is not None and ratio > TRAINED_RATIO:
        return f"trained: top singular value {ratio:.2f}× the random edge"
    return None


def loaded_prefixes(model: nn.Module) -> list[str]:
    """Module paths of Hugging Face models inside ``model`` that ``from_pretrained`` built."""
    out = []
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "_name_or_path", "") and hasattr(module, "base_model_prefix"):
            out.append(name)
    return out


__all__ = ["keep_reason", "spectral_ratio", "loaded_prefixes", "TRAINED_RATIO", "ADAPTER_MARKERS"]
