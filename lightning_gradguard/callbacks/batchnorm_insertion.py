"""``BatchNormInsertion``: BatchNorm before or after each hidden layer's activation, before training."""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence

import lightning.pytorch as pl

from lightning_gradguard._validation import check_bool, check_choice, check_number, check_patterns
from lightning_gradguard.callbacks._surgery_base import SurgeryCallback
from lightning_gradguard.surgery import POSITIONS, Change, insert_batchnorm


class BatchNormInsertion(SurgeryCallback):
    """Insert BatchNorm around every hidden Linear/Conv layer (Ioffe & Szegedy 2015).

    The output layer (last weighted layer in forward order) is left alone, layers already followed by a
    normalization layer are skipped, a layer's bias is dropped when it feeds a BN directly
    (``remove_bias``), and ``input_batchnorm`` adds a BN on the model input. Details and the wrapping
    scheme: :func:`lightning_gradguard.surgery.insert_batchnorm`. To load such a checkpoint into a fresh
    module with ``Model.load_from_checkpoint``, add to the module::

        def on_load_checkpoint(self, checkpoint):
            lightning_gradguard.restore(self, checkpoint)

    Args:
        position: ``before_activation`` (default) or ``after_activation``.
        remove_bias: drop the bias of a layer feeding a BN.
        input_batchnorm: a BN on the model input too.
        momentum, eps: the BatchNorm's.
        include, exclude: module-name patterns.
        verbose: print the table of changes (always logged to TensorBoard text).

    Raises:
        ValueError / TypeError: at construction, naming the field, the value and what is allowed.

    Example::

        from lightning_gradguard import BatchNormInsertion
        trainer = Trainer(callbacks=[BatchNormInsertion(position="before_activation")])
    """

    title = "gradguard BatchNorm insertion"

    def __init__(
        self,
        position: Literal["before_activation", "after_activation"] = "before_activation",
        remove_bias: bool = True,
        input_batchnorm: bool = False,
        momentum: float = 0.1,
        eps: float = 1e-5,
        include: Optional[Sequence[str]] = None,
        exclude: Optional[Sequence[str]] = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.position = check_choice(owner, "position", position, POSITIONS)
        self.remove_bias = check_bool(owner, "remove_bias", remove_bias)
        self.input_batchnorm = check_bool(owner, "input_batchnorm", input_batchnorm)
        self.momentum = check_number(owner, "momentum", momentum, min_value=0.0, max_value=1.0)
        self.eps = check_number(owner, "eps", eps, min_value=0.0, min_inclusive=False)
        self.include = check_patterns(owner, "include", include)
        self.exclude = check_patterns(owner, "exclude", exclude)
        self.verbose = check_bool(owner, "verbose", verbose)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(position=self.position, input_batchnorm=self.input_batchnorm)

    def operate(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", sample: Any) -> list[Change]:
        return insert_batchnorm(
            pl_module, self.position, self.remove_bias, self.input_batchnorm, self.momentum, self.eps,
            self.include, self.exclude, sample_input=sample,
        )
