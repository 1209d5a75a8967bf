"""Gradient clipping functions against direct computations, case by case (the property tests in
``tests/test_properties.py`` cover random gradient sets): defaults, the exact coefficient, per-group norms,
AGC's unit norms and eps floor, the percentile clipper's history, warm-up and state.

No Trainer: ``benchmarks/mutation.py clipping`` runs these against every mutant.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_gradguard.clipping import (
    PercentileClipper, ZScoreClipper, adaptive_clip_, agc_exempt_params, clip_by_norm_, clip_by_norm_per_group_, clip_by_value_,
    global_norm, masked_slot_write_, unitwise_norm,
)

NAN, INF = float("nan"), float("inf")


def _params(*grads):
    out = []
    for g in grads:
        p = nn.Parameter(torch.zeros_like(torch.as_tensor(g, dtype=torch.float32)))
        p.grad = torch.as_tensor(g, dtype=torch.float32).clone()
        out.append(p)
    return out


def test_global_norm_types_and_shared_squares():
    params = _params([3.0, -4.0], [[12.0]]) + [nn.Parameter(torch.ones(2))]  # the last has no gradient
    assert global_norm(params).item() == pytest.approx(13.0)
    assert global_norm(params, "inf").item() == 12.0 and global_norm(params, float("inf")).item() == 12.0
    sq = torch.tensor([25.0, 144.0])
    assert global_norm(params, tensor_sq=sq).item() == pytest.approx(13.0)
    assert global_norm(params, 2, tensor_sq=sq).item() == pytest.approx(13.0)
    for bad in ("inf", 3.0):
        with pytest.raises(ValueError, match=rf"^global_norm: tensor_sq is only for norm_type=2, not norm_type={bad!r}$"):
            global_norm(params, bad, tensor_sq=sq)
    assert global_norm([]).item() == 0.0


def test_clip_by_value_clamps_both_sides_and_skips_missing_gradients():
    params = _params([-3.0, -0.5, 0.5, 3.0], [[2.0, -2.0]])
    bare = nn.Parameter(torch.ones(2))
    clip_by_value_(params + [bare], 1.0)
    assert params[0].grad.tolist() == [-1.0, -0.5, 0.5, 1.0] and params[1].grad.tolist() == [[1.0, -1.0]]
    assert bare.grad is None
    clip_by_value_([], 1.0)


def test_clip_by_norm_coefficient_is_exactly_torchs():
    params = _params([3.0], [4.0])
    before = clip_by_norm_(params, 1.0)
    assert before.item() == pytest.approx(5.0)
    coef = torch.tensor(1.0) / (torch.tensor(5.0) + 1e-6)
    assert params[0].grad.item() == (3.0 * coef).item() and params[1].grad.item() == (4.0 * coef).item()
    small = _params([0.3], [0.4])
    kept = [p.grad.clone() for p in small]
    clip_by_norm_(small, 1.0)
    assert all(torch.equal(p.grad, k) for p, k in zip(small, kept))  # below the bound: coefficient exactly 1
    given = _params([3.0], [4.0])
    assert clip_by_norm_(given, torch.tensor(2.0), total_norm=torch.tensor(10.0)).item() == 10.0
    assert given[0].grad.item() == pytest.approx(3.0 * 2.0 / (10.0 + 1e-6))
    inf = _params([3.0, -4.0])
    assert clip_by_norm_(inf, 2.0, "inf").item() == 4.0
    assert inf[0].grad.tolist() == pytest.approx([3.0 * 2.0 / (4.0 + 1e-6), -4.0 * 2.0 / (4.0 + 1e-6)])
    assert clip_by_norm_([], 1.0).item() == 0.0


def test_clip_by_norm_nonfinite_norm_default_and_kept():
    a = _params([INF, 1.0])
    clip_by_norm_(a, 1.0)
    assert torch.isnan(a[0].grad[0]) and a[0].grad[1].item() == 0.0
    b = _params([INF, 1.0])
    assert clip_by_norm_(b, 1.0, keep_nonfinite=True).item() == INF
    assert b[0].grad.tolist() == [INF, 1.0]
    c = _params([3.0], [4.0])
    clip_by_norm_(c, 1.0, keep_nonfinite=True)  # a finite norm is still clipped
    assert c[0].grad.item() == pytest.approx(0.6)


def test_clip_by_norm_per_group_norms_and_coefficients():
    a, b, c = _params([3.0], [4.0]), _params([0.3, 0.4]), [nn.Parameter(torch.ones(1))]
    b_before = b[0].grad.clone()
    norms = clip_by_norm_per_group_([a, c, b], 1.0)  # the group without gradients is left out
    assert norms.tolist() == pytest.approx([5.0, 0.5])
    assert a[0].grad.item() == pytest.approx(3.0 / (5.0 + 1e-6)) and a[1].grad.item() == pytest.approx(4.0 / (5.0 + 1e-6))
    assert torch.equal(b[0].grad, b_before)
    d, e = _params([3.0, -6.0]), _params([0.5], [-0.25])
    norms = clip_by_norm_per_group_([d, e], 2.0, "inf")
    assert norms.tolist() == [6.0, 0.5]
    assert d[0].grad.tolist() == pytest.approx([3.0 * 2 / (6 + 1e-6), -6.0 * 2 / (6 + 1e-6)]) and e[0].grad.tolist() == [0.5]
    assert clip_by_norm_per_group_([c], 1.0).shape == (0,) and clip_by_norm_per_group_([], 1.0).shape == (0,)


def test_unitwise_norm_per_output_unit():
    assert unitwise_norm(torch.tensor([3.0, 4.0])).item() == 5.0
    assert unitwise_norm(torch.tensor(2.0)).item() == 2.0
    w = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    assert unitwise_norm(w).tolist() == [[5.0], [1.0]]
    conv = torch.ones(3, 2, 2, 2)
    assert unitwise_norm(conv).shape == (3, 1, 1, 1) and unitwise_norm(conv).flatten().tolist() == pytest.approx([8**0.5] * 3)


def test_adaptive_clip_per_unit_with_the_eps_floor():
    w = nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]]))
    w.grad = torch.tensor([[30.0, 40.0], [1.0, 0.0], [0.1, 0.0]])
    b = nn.Parameter(torch.tensor([0.0, 0.0]))
    b.grad = torch.tensor([0.3, 0.4])
    bare = nn.Parameter(torch.ones(2))
    adaptive_clip_([w, b, bare], clip_factor=0.1, eps=1e-3)
    # unit 0: ‖g‖ 50 > 0.1·5 → scaled to 0.5; unit 1: zero weight, floor 1e-3 → 1e-4; unit 2: 0.1 = 0.1·1, not above
    torch.testing.assert_close(w.grad, torch.tensor([[0.3, 0.4], [1e-4, 0.0], [0.1, 0.0]]), rtol=1e-5, atol=0)
    assert b.grad.tolist() == pytest.approx([0.3 * 1e-4 / 0.5, 0.4 * 1e-4 / 0.5], rel=1e-5)  # a bias is one unit
    assert bare.grad is None
    # defaults: λ = 0.01, eps = 1e-3
    w2 = nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    w2.grad = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    adaptive_clip_([w2])
    torch.testing.assert_close(w2.grad, torch.tensor([[0.03, 0.04], [1e-5, 0.0]]), rtol=1e-5, atol=0)
    # a gradient norm below 1e-6 is divided by 1e-6 (as timm and the paper's code do)
    w3 = nn.Parameter(torch.tensor([[0.0]]))
    w3.grad = torch.tensor([[5e-7]])
    adaptive_clip_([w3], clip_factor=1e-4, eps=1e-3)  # bound 1e-7 < ‖g‖ = 5e-7
    assert w3.grad.item() == pytest.approx(5e-7 * 1e-7 / 1e-6, rel=1e-5)


def test_agc_exempts_the_output_layer():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    assert agc_exempt_params(net) == {id(net[2].weight), id(net[2].bias)}
    assert agc_exempt_params(nn.Sequential(nn.ReLU())) == set()
    from lightning_gradguard.graph import find_layers

    assert agc_exempt_params(net, find_layers(net)[:1]) == {id(net[0].weight), id(net[0].bias)}


def test_masked_slot_write():
    buf = torch.zeros(3)
    masked_slot_write_(buf, torch.tensor(1), torch.tensor(True), torch.tensor(5.0, dtype=torch.float64))
    assert buf.tolist() == [0.0, 5.0, 0.0] and buf.dtype == torch.float32
    masked_slot_write_(buf, torch.tensor(2), torch.tensor(False), torch.tensor(7.0))
    assert buf.tolist() == [0.0, 5.0, 0.0]


def _norm_step(clipper, value, **kw):
    (p,) = _params([value])
    before, thr = clipper.clip_([p], **kw)
    return before.item(), thr.item(), p.grad.item()


def test_percentile_clipper_history_warmup_and_ring():
    c = PercentileClipper(percentile=50.0, history_size=4, warmup_steps=2)
    b, thr, g = _norm_step(c, 1.0)
    assert (b, thr, g) == (1.0, INF, 1.0)  # warm-up without a threshold: no clipping
    b, thr, g = _norm_step(c, 2.0)
    assert thr == 1.5 and g == pytest.approx(2.0 * 1.5 / (2.0 + 1e-6))  # median of 1, 2 (this step's included)
    assert _norm_step(c, 3.0)[1] == 2.0
    assert _norm_step(c, 4.0)[1] == 2.5
    assert _norm_step(c, 5.0)[1] == 3.5  # the ring replaced the oldest: 5, 2, 3, 4
    assert c.history.tolist() == [5.0, 2.0, 3.0, 4.0] and int(c.count) == 5
    b, thr, g = _norm_step(c, NAN)  # not recorded; the threshold stands
    assert thr == 3.5 and int(c.count) == 5 and c.history.tolist() == [5.0, 2.0, 3.0, 4.0]
    assert c.threshold().item() == 3.5
    warm = PercentileClipper(percentile=50.0, history_size=4, warmup_steps=3, warmup_threshold=0.5)
    assert _norm_step(warm, 2.0)[1:] == (0.5, pytest.approx(2.0 * 0.5 / (2.0 + 1e-6)))
    assert _norm_step(warm, 2.0)[1] == 0.5
    assert _norm_step(warm, 2.0)[1] == 2.0  # the third recorded norm ends the warm-up
    assert PercentileClipper(history_size=3).threshold().item() == INF  # nothing recorded


def test_percentile_clipper_defaults_arguments_and_state():
    c = PercentileClipper()
    assert (c.percentile, c.history_size, c.warmup_steps, c.warmup_threshold, c.norm_type) == (10.0, 1000, 10, None, 2.0)
    thresholds = [_norm_step(c, float(v))[1] for v in range(1, 12)]
    assert thresholds[:9] == [INF] * 9
    assert thresholds[9] == pytest.approx(float(torch.quantile(torch.arange(1.0, 11.0), 0.1)))
    assert thresholds[10] == pytest.approx(float(torch.quantile(torch.arange(1.0, 12.0), 0.1)))
    for kwargs, message in [({"percentile": 101.0}, r"percentile=101\.0 must be in \[0, 100\]"),
                            ({"percentile": -1.0}, r"percentile=-1\.0 must be in \[0, 100\]"),
                            ({"history_size": 0}, r"history_size=0 must be an integer >= 1"),
                            ({"warmup_steps": -1}, r"warmup_steps=-1 must be an integer >= 0")]:
        with pytest.raises(ValueError, match=rf"^PercentileClipper: {message}$"):
            PercentileClipper(**kwargs)
    for ok in ({"percentile": 0.0}, {"percentile": 100.0}, {"history_size": 1}, {"warmup_steps": 0}):
        PercentileClipper(**ok)
    state = c.state_dict()
    assert state["count"] == 11 and isinstance(state["count"], int) and state["history"][:3].tolist() == [1.0, 2.0, 3.0]
    d = PercentileClipper()
    d.load_state_dict(state)
    assert _norm_step(d, 50.0) == _norm_step(c, 50.0)
    assert d.state_dict()["count"] == 12 and torch.equal(d.history, c.history)
    state["history"][0] = -1.0  # the loaded history is a copy
    assert d.history[0].item() == 1.0


def test_percentile_clipper_given_norm_inf_norm_and_kept_nonfinite():
    c = PercentileClipper(percentile=50.0, history_size=4, warmup_steps=0)
    b, thr, g = _norm_step(c, 3.0, total_norm=torch.tensor(6.0))  # the given norm is recorded and used
    assert (b, thr) == (6.0, 6.0) and g == pytest.approx(3.0 * 6.0 / (6.0 + 1e-6))
    inf = PercentileClipper(percentile=50.0, history_size=4, warmup_steps=0, norm_type="inf")
    p = _params([1.0, -3.0])
    assert inf.clip_(p)[0].item() == 3.0
    kept = PercentileClipper(percentile=50.0, history_size=4, warmup_steps=0)
    _norm_step(kept, 1.0)
    assert _norm_step(kept, INF, keep_nonfinite=True)[2] == INF
    assert torch.isnan(torch.tensor(_norm_step(kept, INF)[2]))


def test_zscore_clipper_arguments_defaults_and_state():
    z = ZScoreClipper()
    assert (z.ema_decay, z.z_thresh, z.max_grad_norm, z.eps, z.warmup_steps, z.clip_option, z.clip_factor,
            z.skip_update_on_spike) == (0.97, 2.5, 1.0, 1e-6, 25, "adaptive_scaling", 1.0, False)
    with pytest.raises(ValueError, match=r"^ZScoreClipper: clip_option='median' is not one of: adaptive_scaling, mean$"):
        ZScoreClipper(clip_option="median")
    with pytest.raises(ValueError, match=r"^ZScoreClipper: warmup_steps=0 must be an integer >= 1$"):
        ZScoreClipper(warmup_steps=0)
    ZScoreClipper(warmup_steps=1, clip_option="mean")
    c = ZScoreClipper(warmup_steps=3, max_grad_norm=None)
    outs = [_norm_step(c, v) for v in (1.0, 2.0, 3.0)]
    assert [o[1] for o in outs] == [INF, INF, INF] and [o[2] for o in outs] == [1.0, 2.0, 3.0]  # no cap: untouched
    assert bool(c.initialized) and c.mean.item() == pytest.approx(2.0) and c.var.item() == pytest.approx(2 / 3)
    state = c.state_dict()
    assert state["count"] == 3 and isinstance(state["count"], int) and state["buffer"].tolist() == [1.0, 2.0, 3.0]
    d = ZScoreClipper(warmup_steps=3, max_grad_norm=None)
    d.load_state_dict(state)
    assert _norm_step(d, 10.0) == _norm_step(c, 10.0)  # a spike, clipped alike after the restore
    assert torch.equal(d.mean, c.mean) and torch.equal(d.var, c.var) and int(d.count) == int(c.count) == 3
    with pytest.raises(ValueError, match=r"^ZScoreClipper: the checkpoint's warm-up buffer holds 3 norms, this clipper "
                                         r"has warmup_steps=4; resume with the same warmup_steps$"):
        ZScoreClipper(warmup_steps=4).load_state_dict(state)


def test_zscore_clipper_warmup_cap_nonfinite_and_given_norm():
    z = ZScoreClipper(warmup_steps=2, max_grad_norm=1.5)
    b, thr, g = _norm_step(z, 3.0)  # warm-up: clipped at the cap like clip_grad_norm_
    assert (b, thr) == (3.0, 1.5) and g == pytest.approx(3.0 * 1.5 / (3.0 + 1e-6))
    b, thr, g = _norm_step(z, NAN)  # not recorded, gradients left to the caller's policy
    assert thr == INF and int(z.count) == 1 and torch.isnan(torch.tensor(g))
    _norm_step(z, 1.0)
    assert bool(z.initialized) and z.mean.item() == pytest.approx(2.0)
    b, thr, g = _norm_step(z, 0.5, total_norm=torch.tensor(0.25))  # the given norm is the one judged
    assert b == 0.25 and thr == 0.25 and g == 0.5


def _meta_params(*shapes):
    out = []
    for s in shapes:
        p = nn.Parameter(torch.empty(*s, device="meta"))
        p.grad = torch.empty(*s, device="meta")
        out.append(p)
    return out


def test_clipping_stays_on_the_gradients_device():
    """``meta`` tensors stand for an accelerator: a tensor made on the CPU instead (a missing ``device=``) fails
    to combine with them or shows up as a CPU tensor; the clippers' state moves to the gradients' device."""
    params = _meta_params((4, 3), (4,))
    assert global_norm(params).device.type == "meta" and global_norm(params, "inf").device.type == "meta"
    assert global_norm(params, tensor_sq=torch.empty(2, device="meta")).device.type == "meta"
    assert clip_by_norm_(params, 1.0).device.type == "meta" and clip_by_norm_(params, 1.0, keep_nonfinite=True).device.type == "meta"
    cpu_groups = [_params([1.0], [2.0]), _params([3.0])]
    clip_by_norm_per_group_(cpu_groups, 1.0)  # the same group sizes on the CPU first: the cached index is per device
    for norm in (2.0, "inf"):
        assert clip_by_norm_per_group_([_meta_params((3,), (2,)), _meta_params((5,))], 1.0, norm).device.type == "meta"
    assert clip_by_norm_per_group_([_meta_params((3,))], 1.0).shape == (1,)
    clip_by_value_(params, 1.0)
    adaptive_clip_(params, 0.01)
    pct = PercentileClipper(percentile=50.0, history_size=4, warmup_steps=1)
    pct.clip_(_params([3.0]))  # first on the CPU, then the gradients move to the device
    before, thr = pct.clip_(_meta_params((4,)))
    assert {t.device.type for t in (before, thr, pct.history, pct.count, pct._arange, pct._fallback)} == {"meta"}
    assert pct.threshold().device.type == "meta"
    pct.load_state_dict(PercentileClipper(percentile=50.0, history_size=4, warmup_steps=1).state_dict())
    assert pct.history.device.type == "meta" and pct.count.device.type == "meta"
    pct.clip_(_meta_params((4,)))
    z = ZScoreClipper(warmup_steps=2)
    z.clip_(_params([3.0]))
    before, target = z.clip_(_meta_params((4,)))
    assert {t.device.type for t in (before, target, z.mean, z.var, z.buffer, z.count)} == {"meta"}
    assert (z.mean.dtype, z.var.dtype, z.buffer.dtype) == (torch.float64,) * 3
    z.load_state_dict(ZScoreClipper(warmup_steps=2).state_dict())
    assert {t.device.type for t in (z.mean, z.var, z.buffer, z.count)} == {"meta"}
    z.clip_(_meta_params((4,)))


def test_agc_bound_below_the_norm_floor_and_vector_norm_shape():
    # bound λ·eps = 2^-24 below the 1e-6 floor of the divisor: a gradient norm exactly at the bound is not clipped
    w = nn.Parameter(torch.zeros(1, 1))
    w.grad = torch.full((1, 1), 2.0**-24)
    adaptive_clip_([w], clip_factor=2.0**-14, eps=2.0**-10)
    assert w.grad.item() == 2.0**-24
    assert unitwise_norm(torch.tensor([3.0, 4.0])).shape == ()  # one value for a vector


def test_per_group_coefficient_is_exactly_torchs_and_a_given_norm_drives_the_percentile_clip():
    a = _params([3.0], [4.0])
    clip_by_norm_per_group_([a], 1.0)
    coef = torch.clamp(torch.tensor(1.0) / (torch.tensor(5.0) + 1e-6), max=1.0)
    assert a[0].grad.item() == (3.0 * coef).item() and a[1].grad.item() == (4.0 * coef).item()
    c = PercentileClipper(percentile=50.0, history_size=4, warmup_steps=0)
    _norm_step(c, 6.0)
    b, thr, g = _norm_step(c, 3.0, total_norm=torch.tensor(10.0))  # median of 6 and 10; the given 10 is scaled to 8
    assert (b, thr) == (10.0, 8.0) and g == pytest.approx(3.0 * 8.0 / (10.0 + 1e-6))
