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
from urllib.parse import quote
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_gradguard import GradientClipping, GradientMonitor, WeightInitialization
from lightning_gradguard.demo import DeepMLP, SyntheticDataModule
from lightning_gradguard.report import main

LAYERS = ["net.1", "net.3", "net.5"]
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def _run(root: Path, name: str, callbacks=(), activation="relu", depth=2, monitor=True, steps=6, extras=True,
         lightning_hparams=True) -> Path:
    pl.seed_everything(0, verbose=False)
    logger = TensorBoardLogger(root, name=name)
    every = 2 if extras else 0  # histograms and pictures during training (the end-of-fit pictures always)
    mon = [GradientMonitor(histogram_every_n_steps=every, figure_every_n_steps=2 * every, warn=False)] if monitor else []
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", logger=logger, log_every_n_steps=2, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, callbacks=[*mon, *callbacks],
    )
    model = DeepMLP(input_shape=[16], num_classes=4, depth=depth, width=8, activation=activation)
    model._log_hyperparams = lightning_hparams
    trainer.fit(model, datamodule=SyntheticDataModule(num_samples=256, input_shape=[16]))
    return Path(logger.log_dir)


def _demo_run(root: Path) -> None:
    """The demo app (Hydra config composed as ``examples/train.py`` would), which also writes HParams."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lightning_gradguard.demo.app import run

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            f"logger.save_dir={root}", "logger.name=demo", "data=synthetic", "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=2", "trainer.enable_checkpointing=false",
            "model.depth=3", "gradguard/init=auto"])
    GlobalHydra.instance().clear()
    run(cfg)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    _run(root, "plain")
    _run(root, "remedied", [WeightInitialization("auto", verbose=False), GradientClipping("norm", 1.0)], "tanh")
    return root


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Path:
    """What the TensorBoard server test opens: a monitored run and a demo-app run."""
    root = tmp_path_factory.mktemp("served")
    # HParams shows one experiment per logdir: here the demo app's, not Lightning's hparams of the plain run
    _run(root, "plain", lightning_hparams=False)
    _demo_run(root)
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


def test_png_is_a_heatmap_with_one_row_per_layer(sweep, tmp_path, capsys):
    png = tmp_path / "flow.png"
    assert main(["report", str(sweep), "--png", str(png)]) == 0
    assert "heatmap of 6 layers" in capsys.readouterr().out  # 3 layers in each of 2 runs
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.shape[0] > 500 and img.shape[1] > 500  # two panels stacked


@pytest.mark.parametrize("depth", [20, 200])
def test_heatmap_of_a_deep_run_has_a_named_row_per_layer(tmp_path, depth):
    from lightning_gradguard.figures import figure_to_image, gradient_heatmap_figure
    from lightning_gradguard.report import summarize_run

    run_dir = _run(tmp_path, f"deep{depth}", activation="sigmoid", depth=depth, steps=4, extras=False)
    run = summarize_run(run_dir)
    names = [l.name for l in run.layers]
    assert len(names) == depth + 1 and names[:2] == ["net.1", "net.3"]  # forward order
    steps = [int(p[0]) for p in run.series["net.1"]]
    table = [[v for _, v in run.series[n]] for n in names]
    # update ratios of a big model come for a rotating subset of layers per logging step (memory_fraction):
    # aligned by step, missing ones empty
    ratios = [[dict((int(s), v) for s, v in run.ratio_series.get(n, [])).get(st) for st in steps] for n in names]
    fig = gradient_heatmap_figure(names, steps, table, ratios)
    norm_ax, ratio_ax = fig.axes[0], fig.axes[1]  # the two panels; colour bars come after them
    assert norm_ax.images[0].get_array().shape == (depth + 1, len(steps)) == ratio_ax.images[0].get_array().shape
    assert [t.get_text() for t in norm_ax.get_yticklabels()] == names  # every layer labelled, top = first
    img = figure_to_image(fig)
    assert img.shape[0] >= 9 * (depth + 1)  # rows of at least ~9 px: names stay readable
    assert any(a.get_ylabel().startswith("log10 gradient L2 norm") for a in fig.axes)  # the colour bar says what
    # the same picture went to TensorBoard at the end of fit
    from tests.helpers import load_events

    events = load_events(str(run_dir))
    tb_img = events.Images("gradguard/heatmap")[-1]
    assert tb_img.height >= 9 * (depth + 1)


def test_folder_without_gradguard_data_is_a_clear_error(tmp_path, capsys):
    logger = TensorBoardLogger(tmp_path, name="other")
    logger.log_metrics({"loss": 1.0}, step=0)
    logger.finalize("success")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no gradguard data" in err and "GradientMonitor" in err and "Traceback" not in err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_run_without_monitor_is_skipped_and_a_file_is_refused(sweep, tmp_path, capsys):
    import shutil as sh

    root = tmp_path / "mixed"
    sh.copytree(sweep / "plain", root / "plain")
    _run(root, "monitor_off", monitor=False, steps=2)
    assert main(["report", str(root)]) == 0
    captured = capsys.readouterr()
    assert "skipped monitor_off/version_0" in captured.err and "no gradguard data" in captured.err
    assert "net.1" in captured.out
    readme = tmp_path / "README.md"
    readme.write_text("hello")
    assert main(["report", str(readme)]) == 2
    assert "is a file, not a run folder" in capsys.readouterr().err
    event_file = next((sweep / "plain").rglob("events.out.tfevents.*"))
    assert main(["report", str(event_file)]) == 0  # an event file stands for its run
    assert "net.1" in capsys.readouterr().out


def test_step_outside_the_logged_steps_is_an_error(sweep, capsys):
    assert main(["report", str(sweep / "plain"), "--step", "99999"]) == 2
    assert "--step 99999 is outside the logged steps 0..4" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["report", str(sweep / "plain"), "--step", "-5"])
    assert exc.value.code == 2
    assert "--step -5 must be >= 0" in capsys.readouterr().err


def test_every_vanishing_layer_is_flagged(tmp_path, capsys):
    run_dir = _run(tmp_path, "sigmoid", activation="sigmoid", depth=12, steps=4, extras=False)
    from lightning_gradguard.report import summarize_run

    run = summarize_run(run_dir)
    out_norm = run.layers[-1].grad_norm_last
    expected = [l.name for l in run.layers[:-1] if l.grad_norm_last < 1e-7 or l.grad_norm_last / out_norm < 1e-3]
    assert len(expected) >= 3, [l.grad_norm_last for l in run.layers]  # a 12-layer sigmoid stack vanishes
    assert [l.name for l in run.layers if "vanishing" in l.flags] == expected
    assert main(["report", str(run_dir)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[3:16]}
    assert all("vanishing" in rows[name] for name in expected)


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


def _post(url: str, body: dict):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def test_tensorboard_server_shows_gradguard_sections(served):
    exe = shutil.which("tensorboard") or str(Path(sys.executable).parent / "tensorboard")
    if not os.path.exists(exe):
        pytest.skip("the tensorboard binary is not installed")
    port = _free_port()
    proc = subprocess.Popen([exe, "--logdir", str(served), "--host", "127.0.0.1", "--port", str(port)],
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
        assert {"grad_norm", "log10_grad_norm", "grad_std", "update_ratio", "weight_norm", "act_dead_frac",
                "gradguard"} <= sections
        hist = _get(f"{base}/plugin/histograms/tags")[run]
        assert {"hist_grad/net.1/weight", "hist_grad/net.1/bias", "hist_weight/net.1/weight", "hist_act/net.1"} <= set(hist)
        images = _get(f"{base}/plugin/images/tags")[run]
        assert {"gradguard/gradient_flow", "gradguard/heatmap"} <= set(images)
        heat = _get(f"{base}/plugin/images/images?run={quote(run)}&tag=gradguard/heatmap")
        with urllib.request.urlopen(f"{base}/plugin/images/individualImage?{heat[-1]['query']}", timeout=10) as r:
            png = r.read()
        width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")  # PNG IHDR
        assert png[:4] == b"\x89PNG" and width > 400 and height > 200
        layout = json.dumps(_get(f"{base}/plugin/custom_scalars/layout"))
        assert "log10_grad_norm/.*" in layout
        # markdown text, rendered to HTML tables by the server
        demo = next(r for r in scalars if r.startswith("demo"))
        texts = _get(f"{base}/plugin/text/tags")
        tag = "{}/text_summary".format  # SummaryWriter.add_text's tag suffix
        assert {tag("gradguard/layers"), tag("gradguard/run"), tag("gradguard/init")} <= set(texts[demo])
        layers = _get(f"{base}/plugin/text/text?run={quote(demo)}&tag={tag('gradguard/layers')}")[0]["text"]
        assert "<table>" in layers and "<th>init</th>" in layers
        assert "<td>net.1</td>" in layers and "<td>he_normal</td>" in layers  # gradguard/init=auto on a ReLU MLP
        run_text = _get(f"{base}/plugin/text/text?run={quote(demo)}&tag={tag('gradguard/run')}")[0]["text"]
        assert "<table>" in run_text and "<td>model.depth</td>" in run_text  # the run's settings
        # HParams: the demo run's settings and final metrics
        exp = _post(f"{base}/plugin/hparams/experiment", {"experimentName": ""})
        hp_names = {h["name"] for h in exp["hparamInfos"]}
        assert {"model", "model.depth", "model.activation", "callbacks", "trainer.max_epochs"} <= hp_names
        metric_tags = {m["name"]["tag"] for m in exp["metricInfos"]}
        assert {"hparams/test_acc", "hparams/final_train_loss", "hparams/findings"} <= metric_tags
        groups = _post(f"{base}/plugin/hparams/session_groups", {
            "experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
            "colParams": [{"hparam": "model.depth"}, {"metric": {"tag": "hparams/test_acc", "group": ""}},
                          {"metric": {"tag": "hparams/final_train_loss", "group": ""}}],
            "startIndex": 0, "sliceSize": 10})
        session = groups["sessionGroups"][0]
        assert session["hparams"]["model.depth"] == 3
        values = {m["name"]["tag"]: m["value"] for m in session["metricValues"]}
        assert 0.0 <= values["hparams/test_acc"] <= 1.0
        assert 0.0 < values["hparams/final_train_loss"] < 10.0  # read after fit, before test replaces the metrics
    finally:
        proc.terminate()
        proc.wait(timeout=30)
