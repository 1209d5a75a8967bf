"""The example scripts and the benchmark run as documented (shortened), so they cannot rot unnoticed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_zoo_script(tmp_path):
    proc = _run([sys.executable, str(ROOT / "examples" / "zoo.py"), "--only", "healthy_mlp", "--epochs", "1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "healthy: 2-layer ReLU MLP" in proc.stdout and "GradGuard" in proc.stdout


def test_benchmark_script_prints_ratios(tmp_path):
    proc = _run([sys.executable, str(ROOT / "benchmarks" / "monitor_overhead.py"), "--steps", "25", "--repeats", "1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [l.split() for l in proc.stdout.splitlines() if l.startswith(("mlp-50x32", "transformer"))]
    assert len(rows) == 12
    table = {(r[0], r[1]): (float(r[2]), float(r[3])) for r in rows}
    for (model, variant), (ms, ratio) in table.items():
        none_ms = table[(model, "none")][0]
        assert ratio == pytest.approx(ms / none_ms, abs=2e-3), (model, variant)  # a ratio of the times it printed
    assert table[("mlp-50x32", "none")][1] == 1.0
    # statistics of 50 layers at every step cost more than none at all, even on 25 noisy steps
    assert table[("mlp-50x32", "monitor_every_step")][1] > 1.0


def test_init_sweep_script_reports_the_sweep(tmp_path):
    proc = _run(["bash", str(ROOT / "examples" / "init_sweep.sh"), str(tmp_path / "sweep")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("test accuracy:") == 3
    assert "comparison" in proc.stdout and "gradguard/init=lecun_normal" in proc.stdout
