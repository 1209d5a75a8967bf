"""Model surgery, torch only: insert BatchNorm around hidden layers, replace saturating activations.

One module per concern:

- :mod:`.batchnorm`: :func:`insert_batchnorm` and the :class:`Normalized` wrapper.
- :mod:`.activations`: :func:`replace_activations` (activation modules) and the target vocabulary.
- :mod:`.fx_rewrite`: functional activations inside a submodule's ``forward``, rewritten with ``torch.fx``.
- :mod:`.spec`: the record of what was applied (:func:`surgery_spec`) and :func:`restore` from a checkpoint.

Every surgery changes a model in place, deterministically (the same model and arguments give the same
structure), is idempotent (a second call changes nothing), and returns the list of :class:`Change` rows.
What was applied is recorded on the model (``model._gradguard_surgery``) as plain dicts, so a fresh copy
of the model can be given the same structure before loading a checkpoint: :func:`restore`.

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(8, 16), nn.Sigmoid(), nn.Linear(16, 16), nn.Sigmoid(), nn.Linear(16, 2))
    >>> changes = insert_batchnorm(net)
    >>> [c.path for c in changes]
    ['0', '2']
    >>> changes = replace_activations(net, {"sigmoid": "elu"})
"""

from lightning_gradguard.activations import ACTIVATION_NAMES
from lightning_gradguard.surgery._common import SURGERY_ATTR, Change, format_changes
from lightning_gradguard.surgery.activations import (
    SOURCE_NAMES, TARGET_PARAMS, normalize_mapping, normalize_target, replace_activations,
)
from lightning_gradguard.surgery.batchnorm import BN_LAYER_TYPES, POSITIONS, Normalized, insert_batchnorm
from lightning_gradguard.surgery.spec import CHECKPOINT_KEY, apply_spec, restore, surgery_spec

__all__ = [
    "insert_batchnorm", "replace_activations", "restore", "surgery_spec", "apply_spec", "Normalized", "Change",
    "format_changes", "normalize_target", "normalize_mapping", "POSITIONS", "SOURCE_NAMES", "TARGET_PARAMS", "ACTIVATION_NAMES",
    "BN_LAYER_TYPES", "CHECKPOINT_KEY", "SURGERY_ATTR",
]
