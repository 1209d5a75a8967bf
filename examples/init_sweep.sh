#!/usr/bin/env bash
# A Hydra multirun over init schemes on a deep tanh MLP, then the gradguard report of the whole sweep.
#   bash examples/init_sweep.sh [SWEEP_DIR]
set -euo pipefail
sweep="${1:-multirun/init_sweep}"
python "$(dirname "$0")/train.py" -m 'gradguard/init=he_normal,glorot_uniform,lecun_normal' \
  model.depth=8 model.activation=tanh trainer.max_epochs=10 trainer.enable_progress_bar=false \
  hydra.sweep.dir="$sweep"
echo "view the sweep with: tensorboard --logdir $sweep"
gradguard report "$sweep"
