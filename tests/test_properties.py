"""Property-based tests (Hypothesis) of the torch-only core against direct, independent computations.

Each property is checked on generated inputs, not on hand-picked ones: fans, shapes, modes and
distributions for the init; gradient sets with zeros, infinities, NaN, empty sets and mixed dtypes for
clipping; per-parameter references for the statistics; ``torch.histc`` for the histogram bins.
Derandomized, so CI sees the same examples every run.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_gradguard.clipping import (
    PercentileClipper, adaptive_clip_, clip_by_norm_, clip_by_norm_per_group_, clip_by_value_, global_norm,
)
from lightning_gradguard.init import TRUNCATED_NORMAL_STD, compute_fans, variance_scaling_
from lightning_gradguard.stats import GRAD_STATS, LayerGroup, grad_statistics, histogram

#: the number of examples comes from the Hypothesis profile loaded in conftest.py (40 in CI)
PROPS = settings(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------------- init
@PROPS
@given(
    fan_in=st.integers(16, 400), fan_out=st.integers(16, 400), scale=st.floats(0.05, 5.0),
    mode=st.sampled_from(["fan_in", "fan_out", "fan_avg"]),
    distribution=st.sampled_from(["truncated_normal", "untruncated_normal", "uniform"]), seed=st.integers(0, 2**31),
)
def test_variance_scaling_variance_and_bounds(fan_in, fan_out, scale, mode, distribution, seed):
    assume(fan_in * fan_out >= 4000)
    w = torch.empty(fan_out, fan_in, dtype=torch.float64)
    std = variance_scaling_(w, scale, mode, distribution, generator=torch.Generator().manual_seed(seed))
    n = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
    assert std == pytest.approx(math.sqrt(scale / n), rel=1e-12)
    # the sample variance's relative spread is sqrt(2/N) for a normal, less for the other two: 6 of them
    tol = 6 * math.sqrt(2.0 / w.numel())
    assert float(w.var()) == pytest.approx(scale / n, rel=tol)
    assert abs(float(w.mean())) < 6 * std / math.sqrt(w.numel())
    if distribution == "uniform":
        assert float(w.abs().max()) <= math.sqrt(3.0) * std * (1 + 1e-9)
    elif distribution == "truncated_normal":
        assert float(w.abs().max()) <= 2.0 * std / TRUNCATED_NORMAL_STD * (1 + 1e-9)
    else:  # untruncated: tails beyond 2 std exist in a sample this big
        assert float(w.abs().max()) > 2.0 * std


@PROPS
@given(
    dims=st.integers(1, 3), groups=st.integers(1, 4), per_in=st.integers(1, 5), per_out=st.integers(1, 5),
    k=st.lists(st.integers(1, 4), min_size=3, max_size=3),
)
def test_conv_fans_match_torch_and_the_transpose_swaps_roles(dims, groups, per_in, per_out, k):
    conv = getattr(nn, f"Conv{dims}d")(groups * per_in, groups * per_out, tuple(k[:dims]), groups=groups)
    assert compute_fans(conv) == nn.init._calculate_fan_in_and_fan_out(conv.weight)
    rf = math.prod(k[:dims])
    tconv = getattr(nn, f"ConvTranspose{dims}d")(groups * per_in, groups * per_out, tuple(k[:dims]), groups=groups)
    # data flow: each output sees in/groups·rf inputs... of its group; the weight is (in, out/groups, *k)
    assert compute_fans(tconv) == (groups * per_in * rf // groups, per_out * rf)
    assert compute_fans(tconv, convention="keras") == (per_out * rf, groups * per_in * rf // groups)


# ---------------------------------------------------------------------------------------- clipping
SPECIALS = st.sampled_from([0.0, float("inf"), float("-inf"), float("nan")])


@st.composite
def grad_sets(draw, allow_special=True, dtypes=(torch.float32, torch.float64)):
    """A list of parameters with gradients (some without), random shapes and dtypes, optional specials."""
    n = draw(st.integers(0, 5))
    params = []
    for i in range(n):
        shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
        dtype = draw(st.sampled_from(dtypes))
        gen = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
        p = nn.Parameter(torch.randn(shape, generator=gen, dtype=dtype))
        kind = draw(st.sampled_from(["random", "zeros", "none", "special"] if allow_special else ["random", "zeros", "none"]))
        if kind == "none":
            params.append(p)
            continue
        g = torch.randn(shape, generator=gen, dtype=dtype) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
        if kind == "zeros":
            g.zero_()
        elif kind == "special":
            g.view(-1)[0] = draw(SPECIALS)
        p.grad = g
        params.append(p)
    return params


def _reference_norm(params, p):
    grads = [q.grad.double().flatten() for q in params if q.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.cat(grads), p))


@PROPS
@given(params=grad_sets(), p=st.sampled_from([2.0, "inf"]))
def test_global_norm_equals_the_norm_of_all_gradients_concatenated(params, p):
    ref = _reference_norm(params, float("inf") if p == "inf" else 2.0)
    got = float(global_norm(params, p))
    if math.isnan(ref):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(ref, rel=1e-5, abs=1e-30)


@PROPS
@given(params=grad_sets(), t=st.floats(1e-3, 10.0))
def test_clip_by_value_equals_clamp(params, t):
    expected = [None if q.grad is None else q.grad.clamp(-t, t) for q in params]
    clip_by_value_(params, t)
    for q, e in zip(params, expected):
        if e is None:
            assert q.grad is None
        else:
            torch.testing.assert_close(q.grad, e, equal_nan=True, rtol=0, atol=0)


@PROPS
@given(params=grad_sets(allow_special=False), max_norm=st.floats(1e-3, 100.0))
def test_clip_by_norm_equals_torch_clip_grad_norm(params, max_norm):
    twins = []
    for q in params:
        t = nn.Parameter(q.detach().clone())
        t.grad = None if q.grad is None else q.grad.clone()
        twins.append(t)
    before = clip_by_norm_(params, max_norm)
    ref_before = torch.nn.utils.clip_grad_norm_(twins, max_norm) if any(t.grad is not None for t in twins) else 0.0
    assert float(before) == pytest.approx(float(ref_before), rel=1e-5, abs=1e-30)
    for q, t in zip(params, twins):
        if q.grad is not None:
            torch.testing.assert_close(q.grad, t.grad, rtol=1e-5, atol=1e-7)
    assert float(global_norm(params)) <= max_norm * (1 + 1e-4) + 1e-6


@PROPS
@given(groups=st.lists(grad_sets(allow_special=False), min_size=0, max_size=4), max_norm=st.floats(1e-3, 10.0))
def test_clip_by_norm_per_group_bounds_each_group_and_keeps_directions(groups, max_norm):
    before_dirs = [[None if q.grad is None else q.grad.clone() for q in g] for g in groups]
    norms = clip_by_norm_per_group_(groups, max_norm)
    with_grads = [g for g in groups if any(q.grad is not None for q in g)]
    assert norms.shape == (len(with_grads),)
    for g, dirs in zip(groups, before_dirs):
        assert float(global_norm(g)) <= max_norm * (1 + 1e-4) + 1e-6
        ref = _reference_norm([type("P", (), {"grad": d})() for d in dirs], 2.0)
        coef = min(1.0, max_norm / (ref + 1e-6))
        for q, d in zip(g, dirs):
            if d is not None:
                torch.testing.assert_close(q.grad, d * coef, rtol=1e-5, atol=1e-7)


@PROPS
@given(params=grad_sets(allow_special=False), clip=st.floats(1e-3, 1.0), eps=st.floats(1e-6, 1e-1))
def test_adaptive_clip_matches_a_per_unit_loop(params, clip, eps):
    expected = []
    for q in params:
        if q.grad is None:
            expected.append(None)
            continue
        g, w = q.grad.double(), q.detach().double()
        rows_g = g.reshape(g.shape[0], -1) if g.ndim > 1 else g.reshape(1, -1)
        rows_w = w.reshape(w.shape[0], -1) if w.ndim > 1 else w.reshape(1, -1)
        out = rows_g.clone()
        for i in range(rows_g.shape[0]):
            limit = clip * max(float(rows_w[i].norm()), eps)
            gn = float(rows_g[i].norm())
            if gn > limit:
                out[i] = rows_g[i] * (limit / max(gn, 1e-6))
        expected.append(out.reshape(g.shape).to(q.grad.dtype))
    adaptive_clip_(params, clip, eps)
    for q, e in zip(params, expected):
        if e is not None:
            torch.testing.assert_close(q.grad, e, rtol=1e-4, atol=1e-6)


@PROPS
@given(
    norms=st.lists(st.one_of(st.floats(1e-3, 1e3), st.just(float("nan")), st.just(float("inf"))), min_size=1, max_size=40),
    percentile=st.floats(1.0, 99.0), history=st.integers(1, 16), warmup=st.integers(0, 5),
)
def test_percentile_clipper_threshold_is_the_percentile_of_the_last_finite_norms(norms, percentile, history, warmup):
    clipper = PercentileClipper(percentile=percentile, history_size=history, warmup_steps=warmup, warmup_threshold=None)
    seen: list[float] = []
    for value in norms:
        p = nn.Parameter(torch.zeros(1, dtype=torch.float64))
        p.grad = torch.tensor([value], dtype=torch.float64)
        before, thr = clipper.clip_([p])
        if math.isfinite(value):
            seen.append(value)
        window = seen[-history:]
        if len(seen) < warmup:
            assert math.isinf(float(thr))
        elif window:
            assert float(thr) == pytest.approx(float(np.percentile(window, percentile)), rel=1e-5)
        if math.isfinite(value) and math.isfinite(float(thr)):
            assert float(p.grad.abs().max()) <= float(thr) * (1 + 1e-5) + 1e-6


def test_clipping_an_empty_or_gradless_set_is_a_no_op():
    p = nn.Parameter(torch.ones(3))
    assert float(global_norm([])) == 0.0 and float(global_norm([p])) == 0.0
    assert float(clip_by_norm_([p], 1.0)) == 0.0 and p.grad is None
    clip_by_value_([p], 1.0)
    adaptive_clip_([p])
    assert clip_by_norm_per_group_([[p], []], 1.0).numel() == 0


# -------------------------------------------------------------------------------------- statistics
@PROPS
@given(sets=st.lists(grad_sets(dtypes=(torch.float32,)), min_size=1, max_size=4))
def test_grad_statistics_equal_a_per_parameter_reference(sets):
    groups = [LayerGroup(f"l{i}", nn.Identity(), list(ps), "x") for i, ps in enumerate(sets)]
    got = grad_statistics(groups).double()
    assert got.shape == (len(groups), len(GRAD_STATS))
    for gi, ps in enumerate(sets):
        grads = [q.grad.double().flatten() for q in ps if q.grad is not None]
        if not grads:
            assert torch.all(got[gi] == 0)
            continue
        v = torch.cat(grads)
        n = v.numel()
        finite = torch.isfinite(v)
        nonfinite = int((~finite).sum())
        assert got[gi, 5] == nonfinite
        assert float(got[gi, 4]) == pytest.approx(float((v == 0).sum()) / n)
        if nonfinite:  # the norm carries the NaN/inf so a user sees it
            assert not math.isfinite(float(got[gi, 0]))
            continue
        assert float(got[gi, 0]) == pytest.approx(float(v.norm()), rel=1e-4, abs=1e-6)
        assert float(got[gi, 1]) == pytest.approx(float(v.mean()), rel=1e-3, abs=1e-5 * max(1.0, float(v.abs().max())))
        assert float(got[gi, 2]) == pytest.approx(float(v.std(unbiased=False)), rel=1e-3, abs=1e-4 * max(1.0, float(v.abs().max())))
        assert float(got[gi, 3]) == pytest.approx(float(v.abs().max()), rel=1e-6)


@PROPS
@given(
    values=st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=300),
    bins=st.integers(1, 64),
)
def test_histogram_counts_match_torch_histc(values, bins):
    x = torch.tensor(values, dtype=torch.float32)
    h = histogram(x, bins)
    lo, hi, n, s, ss = (float(v) for v in h[:5])
    counts = h[5:]
    assert (lo, hi) == (float(x.min()), float(x.max()))
    assert n == x.numel() and float(counts.sum()) == x.numel()
    assert s == pytest.approx(float(x.double().sum()), rel=1e-4, abs=1e-2)
    assert ss == pytest.approx(float((x.double() ** 2).sum()), rel=1e-4)
    if hi > lo:
        ref = torch.histc(x.double(), bins=bins, min=lo, max=hi)
        # the two bin a value lying exactly on an edge with different rounding: at most that many move
        on_edge = int(torch.isclose(((x.double() - lo) / (hi - lo) * bins), ((x.double() - lo) / (hi - lo) * bins).round(), atol=1e-4).sum())
        assert float((counts.double() - ref).abs().sum()) <= 2 * on_edge
    else:  # all equal: everything in the first bin
        assert float(counts[0]) == x.numel()


def test_histogram_ignores_nonfinite_values():
    h = histogram(torch.tensor([1.0, float("nan"), 3.0, float("inf")]), 2)
    assert h[:3].tolist() == [1.0, 3.0, 2.0] and h[5:].tolist() == [1.0, 1.0]


@PROPS
@given(sets=st.lists(grad_sets(dtypes=(torch.float32, torch.float64)), min_size=1, max_size=4),
       row_max=st.sampled_from([1, 8, 1 << 10]), chunk=st.sampled_from([128, 256, 1 << 16]))
def test_grad_stats_plan_chunks_and_row_widths_give_the_same_moments(sets, row_max, chunk):
    """Packed rows of any width (one or several chunks, gradients spanning chunks, padded rows) and mixed dtypes
    all equal the reference."""
    import lightning_gradguard.stats as stats

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stats, "ROW_MAX", row_max)
        mp.setattr(stats, "MIN_CHUNK", chunk)
        _check_plan(stats, sets)


def _check_plan(stats, sets):
    groups = [LayerGroup(f"l{i}", nn.Identity(), list(ps), "x") for i, ps in enumerate(sets)]
    plan = stats.GradStatsPlan(groups, memory_fraction=0.01)
    for _ in range(2):  # the second call reuses the buffers
        sums, maxes = plan.moments()
        got = stats.grad_statistics_from(sums, maxes).double()
        for gi, ps in enumerate(sets):
            grads = [q.grad.double().flatten() for q in ps if q.grad is not None]
            if not grads:
                assert torch.all(got[gi] == 0)
                continue
            v = torch.cat(grads)
            nonfinite = int((~torch.isfinite(v)).sum())
            assert got[gi, 5] == nonfinite
            assert float(got[gi, 4]) == pytest.approx(float((v == 0).sum()) / v.numel())
            if not nonfinite:
                assert float(got[gi, 0]) == pytest.approx(float(v.norm()), rel=1e-4, abs=1e-6)
                assert float(got[gi, 3]) == pytest.approx(float(v.abs().max()), rel=1e-6)
        if plan.tensor_sq is not None:
            with_grad = [q for ps in sets for q in ps]
            ref = [0.0 if q.grad is None else float(q.grad.double().pow(2).sum()) for q in with_grad]
            for a, b in zip(plan.tensor_sq.tolist(), ref):
                assert a == pytest.approx(b, rel=1e-4, abs=1e-6) or not math.isfinite(b)


def test_update_tracker_rotates_within_its_budget_and_is_exact(monkeypatch):
    import lightning_gradguard.stats as stats

    monkeypatch.setattr(stats, "MIN_CHUNK", 100)
    net = nn.Sequential(*[nn.Linear(6, 6) for _ in range(5)])  # 42 elements per layer: two layers per round
    tracker = stats.UpdateTracker(stats.layer_groups(net), memory_fraction=0.1)
    seen = []
    for _ in range(3):
        before = [p.detach().clone() for p in net.parameters()]
        tracker.begin()
        assert sum(t.numel() for t in tracker._copies) <= 100
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        sq, measured = tracker.finish()
        seen.append(measured.tolist())
        params = list(net.parameters())
        for gi in range(5):
            if measured[gi]:
                d = sum(float((params[2 * gi + k].detach() - before[2 * gi + k]).pow(2).sum()) for k in range(2))
                w = sum(float(before[2 * gi + k].pow(2).sum()) for k in range(2))
                assert float(sq[0, gi]) == pytest.approx(d, rel=1e-5)
                assert float(sq[1, gi]) == pytest.approx(w, rel=1e-5)
    assert seen == [[True, True, False, False, False], [False, False, True, True, False], [True, False, False, False, True]]


def test_plan_weight_norms_and_per_group_sums_match_the_direct_ones():
    import lightning_gradguard.stats as stats

    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    plan = stats.GradStatsPlan(stats.layer_groups(net))
    with torch.no_grad():
        expected = [float(net[0].weight.pow(2).sum() + net[0].bias.pow(2).sum()),
                    float(net[2].weight.pow(2).sum() + net[2].bias.pow(2).sum())]
    assert plan.weight_sq().tolist() == pytest.approx(expected, rel=1e-6)
    assert plan.per_group(torch.tensor([1.0, 2.0, 3.0, 4.0])).tolist() == [3.0, 7.0]
    assert plan.per_group(torch.tensor([1.0, 2.0, 5.0, 4.0]), "amax").tolist() == [2.0, 5.0]
    with pytest.raises(ValueError, match="reduce='mean'"):
        plan.per_group(torch.ones(4), "mean")
    with pytest.raises(ValueError, match="memory_fraction=0"):
        stats.GradStatsPlan(stats.layer_groups(net), memory_fraction=0)
