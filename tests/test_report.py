"""`gradguard report` on real runs (single and a sweep), --json round trip, --png, clear errors, and a real
TensorBoard server answering for the sections gradguard wrote."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_gradguard import GradientClipping, GradientMonitor, WeightInitialization
from lightning_gradguard.demo import DeepMLP, SyntheticDataModule
from lightning_gradguard.report import main

LAYERS = ["net.1", "net.3", "net.5"]


def _run(root: Path, name: str, callbacks=(), activation="relu") -> Path:
    pl.seed_everything(0, verbose=False)
    logger = TensorBoardLogger(root, name=name)
    trainer = pl.Trainer(
        max_steps=6, accelerator="cpu", logger=logger, log_every_n_steps=2, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
        callbacks=[GradientMonitor(histogram_every_n_steps=2, figure_every_n_steps=4, warn=False), *callbacks],
    )
    trainer.fit(DeepMLP(input_shape=[16], num_classes=4, depth=2, width=8, activation=activation),
                datamodule=SyntheticDataModule(num_samples=256, input_shape=[16]))
    return Path(logger.log_dir)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    _run(root, "plain")
    _run(root, "remedied", [WeightInitialization("auto", verbose=False), GradientClipping("norm", 1.0)], "tanh")
    return root


def test_report_one_run_prints_layers_in_forward_order(sweep, capsys):
    run = next((sweep / "plain").iterdir())
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"run: {run}"
    rows = [l.split()[0] for l in lines[3:6]]
    assert rows == LAYERS  # forward order, not alphabetical
    assert "Linear 16→8" in out and "relu" in out and "remedies applied: none" in out
    assert "\033[" not in out  # no colours when not a TTY


def test_report_sweep_compares_runs(sweep, capsys):
    assert main(["report", str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "comparison" in out
    table = out.split("comparison\n", 1)[1]
    assert "plain/version_0" in table and "remedied/version_0" in table
    assert "GradientClipping, WeightInitialization" in table


def test_json_round_trips_and_matches_event_values(sweep, capsys):
    assert main(["report", str(sweep), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert json.loads(json.dumps(data)) == data and len(data) == 2
    plain = next(r for r in data if r["run"].startswith("plain"))
    assert [l["name"] for l in plain["layers"]] == LAYERS
    first = plain["layers"][0]
    assert first["grad_norm_last"] == plain["series"]["net.1"][-1][1]
    assert first["grad_norm_first"] == plain["series"]["net.1"][0][1]
    assert [p[0] for p in plain["series"]["net.1"]] == [0, 2, 4]


def test_step_option(sweep, capsys):
    assert main(["report", str(sweep / "plain"), "--json", "--step", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data[0]["step"] == 2 and [p[0] for p in data[0]["series"]["net.1"]] == [0, 2]


def test_png_has_one_line_per_layer(sweep, tmp_path, capsys):
    png = tmp_path / "flow.png"
    assert main(["report", str(sweep / "plain"), "--png", str(png)]) == 0
    assert "3 lines" in capsys.readouterr().out
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.shape[0] > 100 and img.shape[1] > 100


def test_folder_without_gradguard_data_is_a_clear_error(tmp_path, capsys):
    logger = TensorBoardLogger(tmp_path, name="other")
    logger.log_metrics({"loss": 1.0}, step=0)
    logger.finalize("success")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no gradguard data" in err and "GradientMonitor" in err and "Traceback" not in err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_console_script_is_installed(sweep):
    exe = shutil.which("gradguard") or str(Path(sys.executable).parent / "gradguard")
    proc = subprocess.run([exe, "report", str(sweep / "plain")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "net.1" in proc.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_tensorboard_server_shows_gradguard_sections(sweep):
    exe = shutil.which("tensorboard") or str(Path(sys.executable).parent / "tensorboard")
    if not os.path.exists(exe):
        pytest.skip("the tensorboard binary is not installed")
    port = _free_port()
    proc = subprocess.Popen([exe, "--logdir", str(sweep), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}/data"
    try:
        deadline = time.time() + 90
        scalars = {}
        while time.time() < deadline:
            try:
                scalars = _get(f"{base}/plugin/scalars/tags")
                if any("grad_norm/net.1" in tags for tags in scalars.values()):
                    break
            except OSError:
                pass
            time.sleep(1)
        run = next(r for r in scalars if r.startswith("plain"))
        sections = {t.split("/")[0] for t in scalars[run]}
        assert {"grad_norm", "grad_std", "update_ratio", "weight_norm", "act_dead_frac", "gradguard"} <= sections
        hist = _get(f"{base}/plugin/histograms/tags")[run]
        assert {"hist_grad/net.1/0", "hist_weight/net.1/0", "hist_act/net.1"} <= set(hist)
        images = _get(f"{base}/plugin/images/tags")[run]
        assert "gradguard/gradient_flow" in images
        layout = _get(f"{base}/plugin/custom_scalars/layout")
        assert "gradguard" in json.dumps(layout)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
