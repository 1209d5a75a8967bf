"""What each callback does on real architectures: timm and Hugging Face models (tiny configs, random weights).

Prints the markdown table of README "Compatibility" (run from the repository root, timm and transformers
installed as in .ci/run):

    python benchmarks/architectures.py [--write-readme]

``--write-readme`` puts the table into README.md (block ``compat``).

Per model: weighted layers found / Linear+Conv+Embedding+Conv1D modules; the activations found (family:
count); WeightInitialization (layers initialized, embeddings kept, tied parameters left to their owner);
BatchNormInsertion (BNs inserted, layers skipped because a norm already follows); ActivationReplacement
with {relu: leaky_relu, gelu: elu, silu: elu, hardswish: elu, sigmoid: elu, tanh: elu} (modules swapped); GradientMonitor
rows; GradGuard's decisions after a 3-step fit (trial_steps=8, probe_batches=2, as in tests/test_compat.py).
"""

from __future__ import annotations

import argparse
import collections
import copy
import os
import sys
import tempfile
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from benchmarks._readme import write_block  # noqa: E402
from lightning_gradguard import GradGuard, find_layers, initialize, insert_batchnorm, layer_groups, replace_activations  # noqa: E402
from tests import zoo  # noqa: E402
from tests.test_compat import _is_layer  # noqa: E402

MAPPING = {"relu": "leaky_relu", "gelu": "elu", "silu": "elu", "hardswish": "elu", "sigmoid": "elu", "tanh": "elu"}


def row(kind: str, name: str) -> str:
    build = (lambda: zoo.ImageClassifier(zoo.make_timm(name))) if kind == "timm" else (lambda: zoo.LanguageModel(zoo.make_hf(name)))
    sample = zoo.image_batch()[0] if kind == "timm" else zoo.text_batch()
    module = build()
    layers = find_layers(module, sample)
    expected = sum(1 for m in module.modules() if _is_layer(m))
    acts = collections.Counter(i.activation for i in layers if i.activation not in ("linear", "unknown"))
    acts_text = ", ".join(f"{a} {n}" for a, n in sorted(acts.items())) or "-"
    records = initialize(copy.deepcopy(module), "auto", sample_input=sample, seed=0)
    inited = sum(r.scheme != "-" for r in records)
    emb = sum("embedding kept" in r.note for r in records)
    tied = sum("tied to" in r.note for r in records)
    bn_model = copy.deepcopy(module)
    bn = insert_batchnorm(bn_model, sample_input=sample)
    from lightning_gradguard.surgery.batchnorm import _followed_by_norm

    normed = len({i.name for i in layers} & _followed_by_norm(module))
    swapped = sum(c.after != "-" for c in replace_activations(copy.deepcopy(module), MAPPING, sample_input=sample))
    groups = layer_groups(module, sample_input=sample)
    ties = sum(1 for g in groups if g.shared_with)
    batches = [zoo.image_batch() if kind == "timm" else zoo.text_batch() for _ in range(3)]
    guard = GradGuard(verbose=False, trial_steps=8, probe_batches=2)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(max_steps=3, callbacks=[guard], logger=TensorBoardLogger(tmp), accelerator="cpu",
                             enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
        trainer.fit(build(), DataLoader(batches, batch_size=None))
    decisions = "; ".join(f"{d.remedy} {d.status}" for d in guard.decisions if d.remedy != "monitor")
    return (f"| {kind} {name} | {len(layers)}/{expected} | {acts_text} | {inited} initialized, {emb} embeddings kept"
            f"{f', {tied} tied left to the embedding' if tied else ''} | {len(bn)} inserted, {normed} already normalized |"
            f" {swapped} swapped | {len(groups)} rows{f', {ties} tied' if ties else ''} | {decisions} |")


def main(argv: "list[str] | None" = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-readme", action="store_true", help="write the table into README.md (block 'compat')")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lines = ["| model | layers found | activations found | WeightInitialization | BatchNormInsertion | ActivationReplacement | GradientMonitor | GradGuard (3-step fit) |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for kind, names in (("timm", zoo.TIMM_MODELS), ("hf", zoo.HF_MODELS)):
        for name in names:
            lines.append(row(kind, name))
            print(lines[-1], flush=True)
    if args.write_readme:
        write_block("compat", "\n".join(lines))


if __name__ == "__main__":
    main()
