"""No false alarm on real architectures: the timm and Hugging Face models of the compatibility zoo
(``tests/zoo.py``, tiny configs, random weights), unmodified, trained 200 steps on learnable data with AdamW,
watched by two monitors in the same fit (the Trainer's default cadence of 50 steps, and every step).

None of these models was used to set the detectors' thresholds. One finding is expected and checked to be
true: MobileNetV3-small at width 0.25 has an 8-unit squeeze-excitation bottleneck in its first block whose
ReLU units die (3 of 8 output 0 for all 512 training images already at init, 4 of 8 after training, and more
than half on single batches, the detector's criterion), and the monitor says so; the test verifies that
independently over the whole data set.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_gradguard import GradientMonitor

from tests.zoo import HF_MODELS, TIMM_MODELS, ImageClassifier, LanguageModel, make_hf, make_timm

#: findings that are true on an unmodified model: model -> (kind, layer)
TRUE_FINDINGS = {"mobilenetv3_small_100": {("dead_relu", "net.blocks.0.0.se.conv_reduce")}}


def _images(n: int = 512, classes: int = 10) -> DataLoader:
    """Learnable images: a fixed random pattern per class plus noise."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, classes, (n,), generator=g)
    centers = torch.randn(classes, 3, 32, 32, generator=g)
    x = centers[y] + 0.5 * torch.randn(n, 3, 32, 32, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=g)


class _Counting(Dataset):
    """Learnable token sequences: each one counts up from a random start (mod the vocabulary)."""

    def __init__(self, n: int = 512, length: int = 12, vocab: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        start = torch.randint(1, vocab, (n, 1), generator=g)
        self.ids = (start + torch.arange(length)) % (vocab - 1) + 1

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _adamw(module):
    module.configure_optimizers = lambda: torch.optim.AdamW(module.parameters(), lr=1e-3)
    return module


@pytest.mark.parametrize("name", [*TIMM_MODELS, *HF_MODELS])
def test_no_false_alarm_in_200_steps_of_a_real_architecture(tmp_path, name):
    if name in HF_MODELS:
        pytest.importorskip("transformers")
        module, data = _adamw(LanguageModel(make_hf(name))), DataLoader(_Counting(), batch_size=16, shuffle=True)
    else:
        module, data = _adamw(ImageClassifier(make_timm(name))), _images()
    seed_everything(0, verbose=False)
    default = GradientMonitor(histogram_every_n_steps=0, warn=False)
    every = GradientMonitor(log_every_n_steps=1, histogram_every_n_steps=0, warn=False)
    trainer = Trainer(accelerator="cpu", max_steps=200, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, callbacks=[default, every], limit_val_batches=0,
                      logger=TensorBoardLogger(tmp_path, name="tb"))
    trainer.fit(module, train_dataloaders=data)
    expected = TRUE_FINDINGS.get(name, set())
    for monitor in (default, every):
        found = {(f.kind, f.layer) for f in monitor.detector.findings}
        assert found == expected, f"{name}: {monitor.detector.summary()}"
        if not expected:
            assert "training loss is falling" in monitor.detector.summary()
    if expected:  # the one expected finding is true: half of those units are dead on the whole data set
        kind, layer = next(iter(expected))
        target = dict(module.named_modules())[layer]
        act = dict(module.named_modules())[layer.rsplit(".", 1)[0] + ".act1"]
        outs: list[torch.Tensor] = []
        hook = act.register_forward_hook(lambda m, i, o: outs.append(o.detach().flatten(1)))
        module.eval()
        with torch.no_grad():
            for x, _ in data:
                module(x)
        hook.remove()
        units = torch.cat(outs)
        assert units.shape[1] == target.out_channels
        assert (units.max(0).values <= 0).float().mean() >= 0.5  # 4 of 8 never fire on any of the 512 images
