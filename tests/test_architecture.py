"""The house rules that tests can check: the torch-only core imports without Lightning."""

from __future__ import annotations

import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('MODULES', *sorted(sys.modules))"],
                         capture_output=True, text=True, check=True)
    return set(out.stdout.rpartition("MODULES")[2].split())


def test_core_modules_import_without_lightning():
    loaded = _modules_after(
        "import lightning_gradguard.init, lightning_gradguard.clipping, lightning_gradguard.stats, "
        "lightning_gradguard.surgery, lightning_gradguard.graph, lightning_gradguard.health, lightning_gradguard.doctor, "
        "lightning_gradguard.distributed"
    )
    assert "lightning_gradguard.init" in loaded and "lightning_gradguard.surgery.batchnorm" in loaded
    assert "lightning" not in loaded and "lightning.pytorch" not in loaded


def test_report_command_runs_without_lightning(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path)) as writer:  # a run's event file, written without Lightning
        for step in range(3):
            writer.add_scalar("grad_norm/fc1", 1.0 + step, step)
    loaded = _modules_after(f"from lightning_gradguard.report import main\nassert main(['report', {str(tmp_path)!r}]) == 0")
    assert "lightning_gradguard.report" in loaded and "lightning" not in loaded


def test_package_root_loads_callbacks_lazily():
    loaded = _modules_after("import lightning_gradguard as g; assert 'GradGuard' in dir(g); g.insert_batchnorm")
    assert "lightning" not in loaded
    loaded = _modules_after("from lightning_gradguard import GradGuard")
    assert "lightning" in loaded and "lightning_gradguard.callbacks.gradguard" in loaded


def test_unknown_root_attribute_is_an_attribute_error():
    import lightning_gradguard

    try:
        lightning_gradguard.NoSuchThing  # noqa: B018
    except AttributeError as err:
        assert "NoSuchThing" in str(err)
    else:
        raise AssertionError("lightning_gradguard.NoSuchThing did not raise AttributeError")


def test_every_source_file_compiles_without_a_syntax_warning():
    """An invalid escape like ``\\ `` in a docstring is a SyntaxWarning that users of Python 3.12+ see on import."""
    import warnings
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = [p for d in ("lightning_gradguard", "tests", "benchmarks", "examples") for p in (root / d).rglob("*.py")]
    assert len(files) > 50
    for path in files:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            compile(path.read_text(encoding="utf-8"), str(path), "exec")
