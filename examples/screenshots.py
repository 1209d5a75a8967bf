"""Make the pictures README shows: screenshots of TensorBoard's tabs on real demo runs, and the report figure.

    python examples/screenshots.py [--out docs] [--epochs 3]

It trains two demo runs (a 20-layer sigmoid MLP without remedies, and the same with ``gradguard=auto``) into a
temporary folder, writes ``gradguard report --png`` of the first, starts ``tensorboard --logdir`` on
127.0.0.1 only, and photographs the Images, Text, HParams and Custom Scalars tabs with headless Chromium.
Without a Chromium/Chrome binary it trains nothing, says so, and exits 0 (install one, e.g.
``apt-get install chromium``). PNGs are reduced to 256 colours to stay small.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome", "headless_shell")
# (file, TensorBoard route, window size): what README shows
TABS = [
    ("tensorboard_heatmap.png", "#images&tagFilter=heatmap", (1400, 1000)),
    ("tensorboard_text.png", "#text&tagFilter=layers%7Cdecisions", (1400, 1000)),
    ("tensorboard_hparams.png", "#hparams", (1900, 420)),
    ("tensorboard_log10_norms.png", "#custom_scalars", (1400, 900)),
]


def find_browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(logdir: Path, name: str, overrides: list[str]) -> None:
    cmd = [sys.executable, str(ROOT / "examples" / "train.py"), *overrides, f"hydra.run.dir={logdir / name}",
           "trainer.enable_progress_bar=false"]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=logdir, env={**os.environ, "PYTHONWARNINGS": "ignore"}, stdout=subprocess.DEVNULL)


def _shrink(path: Path) -> None:
    from PIL import Image

    Image.open(path).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs"))
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    browser = find_browser()
    if browser is None:
        print(f"screenshots skipped: no Chromium/Chrome found (looked for {', '.join(BROWSERS)} on PATH); "
              "install one, e.g. `apt-get install chromium`, and run again. Nothing was written.")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        logdir = Path(tmp)
        common = ["model.depth=20", "model.activation=sigmoid", f"trainer.max_epochs={args.epochs}",
                  "trainer.log_every_n_steps=2", "callbacks.grad_monitor.figure_every_n_steps=20"]
        _train(logdir, "sigmoid20", common)
        _train(logdir, "sigmoid20_gradguard", [*common, "gradguard=auto"])
        report = [sys.executable, "-m", "lightning_gradguard.report", "report", "sigmoid20",
                  "--png", str((out / "report_heatmap.png").resolve())]
        subprocess.run(report, check=True, stdout=subprocess.DEVNULL, cwd=logdir)  # relative: a short title
        _shrink(out / "report_heatmap.png")
        port = _free_port()
        tb = shutil.which("tensorboard") or str(Path(sys.executable).parent / "tensorboard")
        server = subprocess.Popen([tb, "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            base = f"http://127.0.0.1:{port}/"
            deadline = time.time() + 90
            while time.time() < deadline:
                try:
                    with urllib.request.urlopen(base + "data/plugin/images/tags", timeout=5) as r:
                        if b"heatmap" in r.read():
                            break
                except OSError:
                    pass
                time.sleep(1)
            for file, route, (w, h) in TABS:
                target = out / file
                subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                "--no-first-run", f"--window-size={w},{h}", "--virtual-time-budget=20000",
                                f"--screenshot={target}", base + route],
                               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180)
                _shrink(target)
                print(f"wrote {target} ({target.stat().st_size // 1024} KiB)")
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"wrote {out / 'report_heatmap.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
