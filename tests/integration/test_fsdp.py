"""FSDP2 on CPU (Lightning's ModelParallelStrategy, 2 processes, gloo): every clipping algorithm, the
monitor's per-layer statistics and the weight init on DTensor shards equal one process on the same global
batch; TensorBoard is written once; unsupported strategies are refused by name.

The 2-process job is launched once (one fit per clipping algorithm inside it), and so is the 1-process one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy

from lightning_gradguard import GradientClipping, GradientMonitor, WeightInitialization, initialize
from lightning_gradguard.distributed import check_strategy
from tests.helpers import load_events
from tests.integration.fsdp_fit import CLIPPING

SCRIPT = Path(__file__).with_name("fsdp_fit.py")
ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5


def _run(out: Path, mode: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), mode], env=env, capture_output=True, text=True,
                          timeout=400, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def _max_diff(a, b) -> float:
    """Largest |a - b| / max(1, |a|, |b|) over nested dicts/lists (inf on a key or shape mismatch)."""
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return float("inf")
        return max((_max_diff(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, list):
        if not isinstance(b, list) or len(a) != len(b):
            return float("inf")
        return max((_max_diff(x, y) for x, y in zip(a, b)), default=0.0)
    if a != a and b != b:
        return 0.0  # NaN in both (the step with an injected NaN gradient)
    return abs(a - b) / max(1.0, abs(a), abs(b))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    fsdp_dir = tmp_path_factory.mktemp("fsdp")
    return fsdp_dir, _run(fsdp_dir, "fsdp"), _run(tmp_path_factory.mktemp("single"), "single")[0]


def test_ranks_and_shared_collectives(runs):
    _, ranks, single = runs
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["multi"] for r in ranks) and not single["multi"]
    assert all(run["dtensor"] for r in ranks for run in r["runs"].values())  # really sharded (GradGuard's run too)
    assert not any(run["dtensor"] for run in single["runs"].values())
    # GradGuard probed on rank 0 and every rank applied its decisions: same remedies, same structure
    g0, g1 = ranks[0]["runs"]["gradguard"], ranks[1]["runs"]["gradguard"]
    assert g0 == g1 and g0["decisions"] and {"init", "activation", "monitor"} <= set(g0["subs"]), g0
    # rank 0's decision reached rank 1; sums and maxima over both ranks from one gather
    assert [r["decision"] for r in ranks] == [{"remedies": ["init", "clip"], "from": 0}] * 2
    assert all(r["sums"] == [2.0, 1.0] and r["maxes"] == [1.0] for r in ranks)


@pytest.mark.parametrize("algorithm", CLIPPING)
def test_weights_after_five_steps_match_one_process(runs, algorithm):
    _, (r0, r1), single = runs
    one, a, b = single["runs"][algorithm], r0["runs"][algorithm], r1["runs"][algorithm]
    assert a["final"].keys() == one["final"].keys()
    assert _max_diff(a["after_setup"], one["after_setup"]) <= 1e-7  # init identical (before or after sharding)
    assert _max_diff(a["final"], one["final"]) <= TOL, _max_diff(a["final"], one["final"])
    assert a["final"] == b["final"]  # both ranks gathered the same full weights
    ev = load_events(a["log_dir"])
    before = [e.value for e in ev.Scalars("gradguard/clip/norm_before")]
    after = [e.value for e in ev.Scalars("gradguard/clip/norm_after")]
    assert len(before) == 5 and any(y < x * 0.99 for x, y in zip(before, after)), (before, after)  # it clipped
    skipped = [e.value for e in ev.Scalars("gradguard/clip/nonfinite_steps")][-1]
    assert skipped == (1.0 if algorithm == CLIPPING[2] else 0.0)  # the NaN on rank 1's shard: skipped by all


def test_nonfinite_gradient_on_one_shard_is_skipped_on_every_rank(runs):
    """A NaN in one element of rank 1's shard: the global norm is NaN on both ranks, both skip the step, and the
    weights still equal one process's, which skipped the same step."""
    _, (r0, r1), single = runs
    run = CLIPPING[2]
    assert r0["runs"][run]["final"] == r1["runs"][run]["final"]
    assert _max_diff(r0["runs"][run]["final"], single["runs"][run]["final"]) <= TOL
    ev = load_events(r0["runs"][run]["log_dir"])
    assert [e.value != e.value for e in ev.Scalars("grad_norm/net.4")] == [False, False, True, False, False]
    assert [e.value for e in ev.Scalars("grad_nonfinite/net.4")] == [0.0, 0.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("algorithm", CLIPPING)
def test_logged_per_layer_statistics_match_one_process(runs, algorithm):
    fsdp_dir, (r0, r1), single = runs
    assert r1["runs"][algorithm]["log_dir"] is None
    events = list((fsdp_dir / algorithm).rglob("events.out.tfevents.*"))
    assert len(events) == 1, events  # one event file, written by rank 0
    ev, one = load_events(r0["runs"][algorithm]["log_dir"]), load_events(single["runs"][algorithm]["log_dir"])
    tags = [t for t in one.Tags()["scalars"] if t.split("/")[0] in ("grad_norm", "weight_norm", "update_ratio",
                                                                      "grad_max", "grad_mean", "grad_zero_frac")]
    assert {t.split("/")[0] for t in tags} >= {"grad_norm", "weight_norm"} and len(tags) >= 18
    assert sorted(tags) == sorted(t for t in ev.Tags()["scalars"] if t in tags)
    for tag in tags + ["gradguard/grad_norm_total", "gradguard/clip/norm_before", "gradguard/clip/norm_after"]:
        got, want = [e.value for e in ev.Scalars(tag)], [e.value for e in one.Scalars(tag)]
        assert len(got) == len(want) == 5 and _max_diff(got, want) <= TOL, (tag, got, want)


def test_init_on_shards_equals_init_of_unsharded_model(runs):
    """The first run builds its layers in configure_model and shards them there: WeightInitialization then
    fills DTensor shards. The gathered result equals initialize() on a plain, unsharded model."""
    _, (r0, _), _ = runs
    from tests.integration.fsdp_fit import make_net

    net = make_net()
    initialize(net, "auto", seed=0)
    want = {f"net.{k}": v.tolist() for k, v in net.state_dict().items()}
    got = r0["runs"][CLIPPING[0]]["after_setup"]
    assert got.keys() == want.keys()
    assert _max_diff(got, want) == 0.0


def test_lsuv_under_fsdp_rescales_every_shard_on_rank_zeros_batch(runs):
    """LSUV runs before sharding on each rank; with rank 0's batch on every rank the gathered weights equal
    LSUV on the unsharded model with that batch (rank-own batches would give each shard another scale)."""
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from tests.integration.fsdp_fit import GLOBAL_BATCH, make_net

    _, (r0, r1), _ = runs
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(256, 16, generator=g), torch.randint(0, 6, (256,), generator=g))
    sampler = DistributedSampler(data, num_replicas=2, rank=0, shuffle=False)
    x0 = next(iter(DataLoader(data, batch_size=GLOBAL_BATCH // 2, sampler=sampler)))[0]  # rank 0's first batch
    net = make_net()
    initialize(net, "lsuv", seed=0, sample_input=x0)
    want = {f"net.{k}": v.tolist() for k, v in net.state_dict().items()}
    assert r0["runs"]["lsuv"]["after_setup"] == r1["runs"]["lsuv"]["after_setup"]
    assert _max_diff(r0["runs"]["lsuv"]["after_setup"], want) <= 1e-6


# ------------------------------------------------------------------------------ unsupported strategies
def test_deepspeed_strategy_is_refused_by_name_without_deepspeed():
    from lightning.pytorch.strategies import DeepSpeedStrategy  # the class imports without deepspeed

    with pytest.raises(RuntimeError, match="does not support strategy DeepSpeedStrategy.*p.grad is None"):
        check_strategy(object.__new__(DeepSpeedStrategy), "GradientClipping")
    check_strategy(SingleDeviceStrategy(torch.device("cpu")), "GradientClipping")  # supported: no error


class FSDPStrategy(SingleDeviceStrategy):
    """Stands in for Lightning's FSDP1 strategy (which refuses CPU): the check reads the class name."""


@pytest.mark.parametrize("callback", [GradientClipping("norm"), GradientMonitor(), WeightInitialization(verbose=False)])
def test_callbacks_refuse_an_unsupported_strategy_at_fit(tmp_path, callback):
    from tests.integration.fsdp_fit import Model

    trainer = pl.Trainer(accelerator="cpu", strategy=FSDPStrategy(torch.device("cpu")), max_steps=1,
                         callbacks=[callback], default_root_dir=tmp_path, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    with pytest.raises(RuntimeError, match=f"{type(callback).__name__} does not support strategy FSDPStrategy"):
        trainer.fit(Model())


def test_surgery_refuses_a_model_built_and_sharded_in_configure_model(tmp_path, monkeypatch):
    """One-process FSDP2 (a 1-rank gloo group, in this process): the layers built and sharded in
    configure_model already hold DTensors when the surgery would run, and the error says how to order it."""
    import torch.distributed as dist
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_gradguard import BatchNormInsertion
    from tests.integration.fsdp_fit import Model

    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "RANK"):
        monkeypatch.setenv(key, os.environ.get(key, ""))  # restored after the test
        monkeypatch.delenv(key)
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=ModelParallelStrategy(1, 1), max_steps=1,
                         callbacks=[BatchNormInsertion(verbose=False)], default_root_dir=tmp_path, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    try:
        with pytest.raises(RuntimeError, match="BatchNormInsertion: the model is already sharded.*Build the layers in __init__"):
            trainer.fit(Model(build_late=True))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
