"""Spike skipping under DDP (2 CPU processes, gloo): a loss spike on one rank is averaged over the ranks on
the device, so both ranks skip the same step and their weights stay identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("ddp_skip_fit.py")
ROOT = Path(__file__).resolve().parents[2]


def test_loss_spike_on_one_rank_is_skipped_by_both(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert r0["skipped_at"] == r1["skipped_at"] == [12]
    assert r0["final"] == r1["final"]
