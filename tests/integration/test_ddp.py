"""DDP on CPU with 2 processes (gloo): identical init and surgery on both ranks, clipping and statistics on
the synchronized gradients equal to one process on the same global batch, TensorBoard written once, and a
non-finite gradient on one rank does not hang the job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import load_events

SCRIPT = Path(__file__).with_name("ddp_fit.py")
ROOT = Path(__file__).resolve().parents[2]


def _run(out: Path, mode: str, *extra: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), mode, *extra], env=env, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def _close(a, b, tol=1e-4):
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("single"), "single")[0]


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_ddp_matches_single_process(tmp_path, single, strategy):
    ranks = _run(tmp_path, strategy)
    assert [r["rank"] for r in ranks] == [0, 1]
    r0, r1 = ranks
    assert r0["after_setup"] == r1["after_setup"]  # init and surgery identical on both ranks
    assert r0["keys"] == single["keys"]
    assert r0["after_setup"] == single["after_setup"]
    assert _close(r0["norm_before"], single["norm_before"]) and _close(r1["norm_before"], single["norm_before"])
    for k in single["final"]:
        assert _close(r0["final"][k], single["final"][k], 1e-3), k
    # TensorBoard written once, by rank 0, with the same statistics as one process
    assert r1["log_dir"] is None
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert len({e.parent for e in events}) == 1
    ddp_ev = load_events(r0["log_dir"])
    one_ev = load_events(single["log_dir"])
    # (activation statistics are rank 0's own half of the batch under DDP, so they are not compared)
    for tag in ("gradguard/clip/norm_before", "grad_norm/net.0", "gradguard/grad_norm_total", "update_ratio/net.2"):
        assert _close([e.value for e in ddp_ev.Scalars(tag)], [e.value for e in one_ev.Scalars(tag)], 1e-3), tag


def test_nonfinite_gradient_on_one_rank_does_not_hang(tmp_path):
    ranks = _run(tmp_path, "ddp", "nan")  # finishes (timeout 300 s otherwise)
    assert len(ranks) == 2
    assert ranks[0]["final"] == ranks[1]["final"]  # the skipped step kept the ranks in sync
    assert all(v == v for r in ranks for vals in r["final"].values() for v in _flatten(vals))  # no NaN weights


def _flatten(x):
    if isinstance(x, list):
        for y in x:
            yield from _flatten(y)
    else:
        yield x
