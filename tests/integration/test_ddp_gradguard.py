"""GradGuard under DDP (2 CPU processes, gloo) with a DistributedSampler giving the ranks different data: rank 0
decides, broadcasts, and every rank applies the same remedies, so the decisions, the architecture and the final
weights are identical on both ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("ddp_gradguard_fit.py")
ROOT = Path(__file__).resolve().parents[2]


def test_gradguard_decides_once_and_every_rank_applies_it(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json")))
    assert (r0["rank"], r1["rank"]) == (0, 1)
    assert r0["first_batch"] != r1["first_batch"]  # the ranks really read different data
    assert r0["decided_here"] and not r1["decided_here"]  # only rank 0 probed and raced
    assert r0["decisions"] == r1["decisions"] and r0["remedies"] == r1["remedies"]
    assert {"batchnorm", "activation"} <= set(r0["remedies"])
    assert r0["keys"] == r1["keys"]  # the same architecture (BatchNorm / activation surgery)
    assert r0["final"] == r1["final"]  # and the same weights after training
