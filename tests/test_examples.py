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
    proc = _run([sys.executable, str(ROOT / "benchmarks" / "monitor_overhead.py"), "--steps", "25", "--repeats", "1",
                 "--models", "mlp-50x32,transformer"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [l.split() for l in proc.stdout.splitlines() if l.startswith(("mlp-50x32 ", "transformer "))]
    assert len(rows) == 10
    table = {(r[0], r[1]): (float(r[2]), float(r[3])) for r in rows}
    for (model, variant), (ms, ratio) in table.items():
        none_ms = table[(model, "none")][0]
        assert ratio == pytest.approx(ms / none_ms, rel=5e-4, abs=2e-3), (model, variant)  # a ratio of the times it printed
    assert table[("mlp-50x32", "none")][1] == 1.0
    # statistics of 50 layers at every step cost more than none at all, even on 25 noisy steps
    assert table[("mlp-50x32", "monitor_every_step")][1] > 1.0
    # per model: the physical reference, the statistics kernels against it, the extra memory of a logging step
    notes = [l for l in proc.stdout.splitlines() if l.startswith(("mlp-50x32: ", "transformer: "))]
    assert len(notes) == 2 and all("× that pass" in l and "extra peak memory" in l for l in notes), notes
    # the targets, judged from the same numbers
    every = next(l for l in proc.stdout.splitlines() if l.startswith("- every step, all statistics: "))
    for model, target in (("mlp-50x32", 1.5), ("transformer", 1.2)):
        ratio = table[(model, "monitor_every_step")][1]
        verdict = "met" if ratio <= target else "not met"
        assert f"{model} {ratio:.3f}× ≤ {target}× ({verdict})" in every, every


def test_init_sweep_script_reports_the_sweep(tmp_path):
    proc = _run(["bash", str(ROOT / "examples" / "init_sweep.sh"), str(tmp_path / "sweep")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("test accuracy:") == 3
    assert "comparison" in proc.stdout and "gradguard/init=lecun_normal" in proc.stdout
    # README's report example is this sweep's output, digit for digit (examples/report_numbers.py writes it)
    sys.path.insert(0, str(ROOT))
    from benchmarks._readme import read_block
    from examples.report_numbers import excerpt

    assert excerpt(proc.stdout).strip() == read_block("init-sweep-report").strip()


def test_screenshot_script_skips_without_chromium(tmp_path, monkeypatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("screenshots", ROOT / "examples" / "screenshots.py")
    screenshots = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(screenshots)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no browser on PATH
    assert screenshots.main(["--out", str(tmp_path / "docs")]) == 0
    out = capsys.readouterr().out
    assert "screenshots skipped: no Chromium/Chrome found" in out and "apt-get install chromium" in out
    assert not (tmp_path / "docs").exists() or not any((tmp_path / "docs").iterdir())


def test_readme_blocks_are_the_scripts_output():
    """Every measured table in README sits between markers that a script owns; the fast one is re-run."""
    sys.path.insert(0, str(ROOT))
    from benchmarks._readme import read_block

    for name in ("zoo", "monitor-overhead", "clipping_spikes", "demo-quickstart", "demo-overrides", "demo-init", "demo-surgery",
                 "demo-clipping", "fault_zoo", "init-sweep-report", "compat", "gpu-checks", "monitor-overhead-gpu"):
        assert read_block(name).strip(), name


def test_readme_quickstart_numbers_are_current(tmp_path):
    """Re-runs the default demo (the one quick command) and compares with README's block, digit for digit."""
    proc = _run([sys.executable, str(ROOT / "examples" / "demo_numbers.py"), "--only", "demo-quickstart"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sys.path.insert(0, str(ROOT))
    from benchmarks._readme import read_block

    printed = proc.stdout.split("<!-- demo-quickstart -->\n", 1)[1].strip()
    assert printed == read_block("demo-quickstart").strip()
