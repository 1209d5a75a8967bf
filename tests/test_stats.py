"""Per-layer statistics against independent float64 references: every path of the batched gradient moments
(packed small gradients in one or several chunks, gradients spanning chunks, missing gradients, non-finite values,
mixed dtypes, a plan reused while the gradients change), update ratios with the bounded tracker, weight norms,
activation statistics, histograms, host transfer, and the layer grouping the monitor reports.

No Trainer: ``benchmarks/mutation.py stats`` runs these (with the property tests) against every mutant.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_gradguard.activations import ACTIVATION_FUNCTIONS
from lightning_gradguard.stats import (
    BLOCK, MIN_CHUNK, ROW_MIN, GradStatsPlan, LayerGroup, UpdateTracker, activation_hook_target, activation_statistics,
    activation_statistics_batch, grad_moments, grad_statistics, grad_statistics_from, histogram, layer_groups,
    shared_activations, snapshot, to_host, unit_dim_for, update_ratios, update_ratios_from, update_sq, weight_norms,
    weight_sq,
)

NAN, INF = float("nan"), float("inf")
#: a gradient larger than the packed buffer's floor (MIN_CHUNK): it spans several chunks
LARGE = 1 << 14


def _group(name, *shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = nn.Parameter(torch.randn(*shape, generator=g).to(dtype))
        p.grad = torch.randn(*shape, generator=g).to(dtype)
        params.append(p)
    return LayerGroup(name, nn.Identity(), params, name)


def _reference(groups):
    """(sums (layers, 5): sum sq, sum, zeros, non-finite, count; maxes (layers,)) in float64, per parameter."""
    sums, maxes = [], []
    for g in groups:
        xs = [p.grad.detach().double().flatten() for p in g.params if p.grad is not None]
        x = torch.cat(xs) if xs else torch.zeros(0, dtype=torch.float64)
        sums.append(torch.stack([(x * x).sum(), x.sum(), (x == 0).sum().double(), (~torch.isfinite(x)).sum().double(),
                                 torch.tensor(float(x.numel()), dtype=torch.float64)]))
        maxes.append(x.abs().max() if x.numel() else torch.zeros((), dtype=torch.float64))
    return torch.stack(sums), torch.stack(maxes)


def _check(groups, **plan_kw):
    plan = GradStatsPlan(groups, **plan_kw)
    sums, maxes = plan.moments()
    ref_sums, ref_maxes = _reference(groups)
    torch.testing.assert_close(sums.double(), ref_sums, rtol=2e-5, atol=1e-4, equal_nan=True)
    torch.testing.assert_close(maxes.double(), ref_maxes, rtol=1e-6, atol=0.0, equal_nan=True)
    return plan


def test_small_gradients_in_one_chunk():
    groups = [_group("a", (8, 8), (8,)), _group("b", (3, 8), (3,), seed=1), _group("c", (5,), seed=2)]
    groups[0].params[1].grad[2] = 0.0  # exact zeros are counted
    groups[1].params[0].grad[0, :4] = 0.0
    _check(groups)


def test_small_gradients_in_several_chunks_leave_no_stale_padding():
    # 60 gradients of 200 elements (not a multiple of a row): several chunks of different sizes reuse one buffer
    groups = [_group(f"g{i}", (200,), (1 + 37 * (i % 3),), seed=i) for i in range(60)]
    plan = _check(groups, memory_fraction=0.01)
    assert len(plan._buckets[0].chunks) > 2  # the case this test is about
    _check(groups, memory_fraction=1.0)


def test_gradients_larger_than_a_chunk_span_chunks_next_to_the_small_ones():
    side = int(LARGE**0.5) + 1  # gradients larger than a chunk, next to small ones in the same layer
    groups = [_group("big", (side, side), (side,)), _group("small", (4, 4), seed=3), _group("big2", (side + 1, side), seed=4)]
    groups[0].params[0].grad[0, :10] = 0.0
    _check(groups)
    # one large gradient missing this step: the others still land on their own layers
    groups[2].params[0].grad = None
    _check(groups)


def test_nonfinite_values_in_small_and_large_gradients_are_counted():
    side = int(LARGE**0.5) + 1
    groups = [_group("small", (6, 50), (6,)), _group("big", (side, side), seed=1), _group("clean", (7,), seed=2)]
    groups[0].params[0].grad[1, 3] = NAN
    groups[0].params[0].grad[4, 0] = INF
    groups[1].params[0].grad[5, 5] = -INF
    groups[1].params[0].grad[6, 6] = -INF
    sums, _ = _check(groups).moments()
    assert sums[:, 3].tolist() == [2.0, 2.0, 0.0]


def test_the_accelerator_counting_path_gives_the_same_moments():
    """Off the CPU, non-finite values and NaNs are counted on the device in every chunk (no host read); run here on
    CPU tensors by switching that path on, with NaN/Inf in padded rows, whole rows and a gradient spanning chunks."""
    side = int(LARGE**0.5) + 1
    groups = [_group("small", (6, 50), (6,)), _group("big", (side, side), seed=1), _group("rows", (4, 256), seed=2)]
    groups[0].params[0].grad[1, 3] = NAN
    groups[0].params[1].grad[2] = 0.0
    groups[1].params[0].grad[5, 5] = NAN
    groups[1].params[0].grad[100, 7] = -INF
    groups[2].params[0].grad[3, :9] = 0.0
    plan = GradStatsPlan(groups)
    plan.moments()
    for bucket in plan._buckets:
        bucket.count_on_device = True
    sums, maxes = plan.moments()
    ref_sums, ref_maxes = _reference(groups)
    torch.testing.assert_close(sums.double(), ref_sums, rtol=2e-5, atol=1e-4, equal_nan=True)
    torch.testing.assert_close(maxes.double(), ref_maxes, equal_nan=True)
    assert sums[:, 3].tolist() == [1.0, 2.0, 0.0] and sums[:, 2].tolist() == [1.0, 0.0, 9.0]


def test_mixed_dtypes_and_missing_gradients():
    groups = [_group("f64", (10, 10), dtype=torch.float64), _group("bf16", (9, 7), (9,), dtype=torch.bfloat16, seed=1),
              _group("f32", (33,), seed=2), _group("none", (4, 4), seed=3)]
    groups[3].params[0].grad = None
    groups[0].params[0].grad[0, 0] = 1e-30  # float64 precision kept in the sums
    plan = _check(groups)
    sums, _ = plan.moments()
    assert sums[3].tolist() == [0.0] * 5
    assert plan.tensor_sq.tolist() == pytest.approx([float(groups[0].params[0].grad.double().pow(2).sum()),
                                                     float(groups[1].params[0].grad.double().pow(2).sum()),
                                                     float(groups[1].params[1].grad.double().pow(2).sum()),
                                                     float(groups[2].params[0].grad.double().pow(2).sum()), 0.0], rel=1e-5)


def test_a_reused_plan_follows_the_gradients():
    groups = [_group("a", (20, 20), (20,)), _group("b", (300,), seed=1)]
    plan = GradStatsPlan(groups)
    for step in range(3):
        for g in groups:
            for p in g.params:
                p.grad = torch.randn_like(p) * (step + 1)
        if step == 1:
            groups[1].params[0].grad = None
        sums, maxes = plan.moments()
        ref_sums, ref_maxes = _reference(groups)
        torch.testing.assert_close(sums.double(), ref_sums, rtol=2e-5, atol=1e-4)
        torch.testing.assert_close(maxes.double(), ref_maxes)
    for g in groups:
        for p in g.params:
            p.grad = None
    sums, maxes = plan.moments()
    assert sums.shape == (2, 5) and not sums.any() and not maxes.any() and plan.tensor_sq is None


def test_a_reused_plan_follows_a_parameter_given_another_size_in_place():
    """Same dtypes, same gradients present, other sizes (a layer resized in place): the plan is built again, for
    a small gradient (whole-tensor copy) and for one spanning chunks (pieces)."""
    side = int(LARGE**0.5) + 1
    groups = [_group("a", (20, 20), (20,)), _group("big", (side, side), seed=1)]
    plan = GradStatsPlan(groups)
    _check_with(plan, groups)
    for g, shape in ((groups[0], (30, 20)), (groups[1], (side + 9, side))):
        p = g.params[0]
        p.data = torch.randn(*shape)
        p.grad = torch.randn(*shape)
        _check_with(plan, groups)


def _check_with(plan, groups):
    sums, maxes = plan.moments()
    ref_sums, ref_maxes = _reference(groups)
    torch.testing.assert_close(sums.double(), ref_sums, rtol=2e-5, atol=1e-4)
    torch.testing.assert_close(maxes.double(), ref_maxes)


def test_empty_gradients_and_a_layer_without_any():
    groups = [_group("e", (0,), (3,)), LayerGroup("frozen", nn.Identity(), [], "frozen", frozen=True), _group("x", (5,))]
    _check(groups)
    stats = grad_statistics(groups)
    assert stats[1].tolist() == [0.0] * 6


def test_grad_statistics_columns():
    groups = [_group("a", (4, 5), (4,)), _group("b", (7,), seed=1)]
    groups[0].params[0].grad[0] = 0.0
    groups[1].params[0].grad[3] = NAN
    stats = grad_statistics(groups)
    for row, g in zip(stats, groups):
        x = torch.cat([p.grad.double().flatten() for p in g.params])
        finite = torch.isfinite(x).all()
        want = [x.norm(), x.mean(), x.std(unbiased=False), x.abs().max(), (x == 0).double().mean(),
                (~torch.isfinite(x)).sum().double()]
        torch.testing.assert_close(row.double(), torch.stack(want), rtol=1e-5, atol=1e-6, equal_nan=not finite)
    assert stats.dtype == torch.float32 and stats.shape == (2, 6)
    # from moments: mean, population std, zero fraction; the variance never goes below 0 by rounding
    sums = torch.tensor([[12.0, 4.0, 1.0, 0.0, 4.0], [4.0, 4.0, 0.0, 0.0, 4.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    out = grad_statistics_from(sums, torch.tensor([3.0, 1.0, 0.0]))
    assert out[0].tolist() == pytest.approx([12**0.5, 1.0, 2**0.5, 3.0, 0.25, 0.0])
    assert out[1].tolist() == [2.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    assert out[2].tolist() == [0.0] * 6  # no gradient: zeros, not NaN
    moments = grad_moments(groups)
    torch.testing.assert_close(grad_statistics_from(*moments), stats, equal_nan=True)


def test_plan_arguments_and_per_group():
    groups = [_group("a", (3,), (2,)), _group("b", (4,), seed=1)]
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=rf"^GradStatsPlan: memory_fraction={bad!r} must be in \(0, 1\]$"):
            GradStatsPlan(groups, memory_fraction=bad)
    plan = GradStatsPlan(groups, memory_fraction=1.0)
    per_tensor = torch.tensor([1.0, 5.0, 2.0])
    assert plan.per_group(per_tensor).tolist() == [6.0, 2.0]
    assert plan.per_group(per_tensor, "amax").tolist() == [5.0, 2.0]
    assert plan.per_group(torch.tensor([-1.0, -5.0, -2.0]), "amax").tolist() == [0.0, 0.0]  # amax with 0
    with pytest.raises(ValueError, match=r"^GradStatsPlan.per_group: reduce='max' is not one of: sum, amax$"):
        plan.per_group(per_tensor, "max")
    ws = [float(sum(p.detach().double().pow(2).sum() for p in g.params)) for g in groups]
    assert plan.weight_sq().tolist() == pytest.approx(ws, rel=1e-6)
    assert weight_sq(groups).tolist() == pytest.approx(ws, rel=1e-6)
    assert weight_norms(groups).tolist() == pytest.approx([w**0.5 for w in ws], rel=1e-6)
    assert GradStatsPlan([]).weight_sq().tolist() == [] and weight_sq([LayerGroup("f", nn.Identity(), [], "f")]).tolist() == [0.0]
    # plain tensors count once whether or not the plan is told to weight replicas
    torch.testing.assert_close(GradStatsPlan(groups, sharded=True).moments()[0], GradStatsPlan(groups).moments()[0])


def _step(groups, scale=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for grp in groups:
            for p in grp.params:
                p.add_(scale * torch.randn(p.shape, generator=g))


def test_update_ratios_match_a_direct_computation():
    groups = [_group("a", (6, 6), (6,)), _group("b", (5,), seed=1), _group("zero", (3,), seed=2)]
    with torch.no_grad():
        groups[2].params[0].zero_()
    before = snapshot(groups)
    assert all(torch.equal(b, p.detach()) and b.data_ptr() != p.data_ptr() for b, p in
               zip(before, [p for g in groups for p in g.params]))
    old = [[p.detach().clone() for p in g.params] for g in groups]
    _step(groups)
    want_d = [sum(float((p.detach() - o).double().pow(2).sum()) for p, o in zip(g.params, olds)) for g, olds in zip(groups, old)]
    want_w = [sum(float(o.double().pow(2).sum()) for o in olds) for olds in old]
    sq = update_sq(groups, before)
    assert sq[0].tolist() == pytest.approx(want_d, rel=1e-5) and sq[1].tolist() == pytest.approx(want_w, rel=1e-5, abs=0)
    ratios = update_ratios(groups, before)
    assert ratios.tolist() == pytest.approx([(d / w) ** 0.5 for d, w in zip(want_d[:2], want_w[:2])] + [0.0], rel=1e-5)
    assert update_ratios_from(torch.tensor([[4.0, 1.0, 9.0], [16.0, 0.0, 1e-40]])).tolist() == pytest.approx(
        [0.5, 0.0, 3.0 / float(torch.tensor(1e-40).sqrt())], rel=1e-5)
    # a weight norm below 1e-30 is floored there (float64 moments from a caller)
    tiny = torch.tensor([[9.0], [1e-70]], dtype=torch.float64)
    assert update_ratios_from(tiny).tolist() == pytest.approx([3.0 / 1e-30], rel=1e-9)
    assert update_sq([], []).shape == (2, 0)


def _sizes_model():
    return [_group("a", (3000,)), _group("b", (3000,), seed=1), _group("c", (3000,), seed=2), _group("d", (100,), seed=3),
            LayerGroup("frozen", nn.Identity(), [], "frozen", frozen=True)]


def test_update_tracker_measures_a_rotating_subset_within_its_budget():
    groups = _sizes_model()
    tracker = UpdateTracker(groups)
    assert tracker.budget == MIN_CHUNK  # 10% of 9100 elements is below the floor
    seen = []
    for step in range(4):
        old = [p.detach().clone() for g in groups for p in g.params]
        tracker.begin()
        _step(groups, seed=step)
        sq, measured = tracker.finish()
        seen.append(measured.tolist())
        new = [p.detach() for g in groups for p in g.params]
        d = [float((n - o).double().pow(2).sum()) for n, o in zip(new, old)]
        w = [float(o.double().pow(2).sum()) for o in old]
        for gi, m in enumerate(measured.tolist()):
            want = (d[gi], w[gi]) if m else (0.0, 0.0)
            assert (sq[0, gi].item(), sq[1, gi].item()) == (pytest.approx(want[0], rel=1e-5), pytest.approx(want[1], rel=1e-5))
    # 3000 + 3000 > 4096: one layer at a time, then the last two together; the frozen layer has nothing to copy
    assert seen == [[True, False, False, False, False], [False, True, False, False, False],
                    [False, False, True, True, False], [True, False, False, False, False]]
    sq, measured = tracker.finish()  # nothing begun: nothing measured
    assert not measured.any() and not sq.any()


def test_update_tracker_takes_a_layer_larger_than_the_budget_alone_and_everything_at_fraction_one():
    groups = [_group("huge", (5000,)), _group("small", (10,), seed=1)]
    tracker = UpdateTracker(groups)
    tracker.begin()
    _step(groups)
    assert tracker.finish()[1].tolist() == [True, False]
    everything = UpdateTracker(_sizes_model(), memory_fraction=1.0)
    assert everything.budget == 9100
    everything.begin()
    assert everything.finish()[1].tolist() == [True, True, True, True, False]
    for bad in (0.0, 2.0):
        with pytest.raises(ValueError, match=rf"^UpdateTracker: memory_fraction={bad!r} must be in \(0, 1\]$"):
            UpdateTracker(groups, memory_fraction=bad)
    idle = UpdateTracker([LayerGroup("frozen", nn.Identity(), [], "frozen", frozen=True)])
    idle.begin()
    assert idle.finish()[1].tolist() == [False]


def test_update_tracker_keeps_its_copies_in_the_plans_buffer_and_stays_exact():
    """The copies go into the statistics' packed buffer (no new memory) when they fit, else into new tensors;
    either way the ratios are exact, and the next moments() call is not disturbed by what the copies left there."""
    groups = _sizes_model()
    plan = GradStatsPlan(groups)
    plan.moments()
    (buffer,) = plan.scratch_buffers()
    tracker = UpdateTracker(groups, budget=buffer.numel())
    for step in range(4):
        old = [p.detach().clone() for g in groups for p in g.params]
        plan.moments()
        tracker.begin(plan.scratch_buffers())
        assert all(c.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr() for c in tracker._copies)
        _step(groups, seed=step)
        sq, measured = tracker.finish()
        new = [p.detach() for g in groups for p in g.params]
        for gi, m in enumerate(measured.tolist()):
            if m:
                d = float((new[gi] - old[gi]).double().pow(2).sum())
                assert sq[0, gi].item() == pytest.approx(d, rel=1e-5)
                assert sq[1, gi].item() == pytest.approx(float(old[gi].double().pow(2).sum()), rel=1e-5)
        sums, maxes = plan.moments()  # the copies' leftovers in the buffer do not reach the statistics
        ref_sums, ref_maxes = _reference(groups)
        torch.testing.assert_close(sums.double(), ref_sums, rtol=2e-5, atol=1e-4)
        torch.testing.assert_close(maxes.double(), ref_maxes)
    small = torch.zeros(10)  # too small (and another size): new tensors
    tracker.begin([small])
    assert all(c.untyped_storage().data_ptr() != small.untyped_storage().data_ptr() for c in tracker._copies)
    tracker.finish()
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=r"^UpdateTracker: budget=.* must be a positive number of elements or None$"):
            UpdateTracker(groups, budget=bad)


# ----------------------------------------------------------------------------------------- activations
def test_activation_statistics_dead_units_saturation_and_moments():
    relu = torch.tensor([[0.0, 1.0, 0.0, 2.0, 0.0], [0.0, 3.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.0, 1.0, 4.0]])
    mean, std, dead, sat = activation_statistics(relu, "relu", -1).tolist()
    assert (mean, std) == (pytest.approx(relu.mean().item()), pytest.approx(relu.std().item()))
    assert dead == pytest.approx(2 / 5) and sat == 0.0  # units 0 and 2 are 0 for every sample
    conv = torch.rand(2, 3, 4, 4) + 0.1
    conv[:, 1] = 0.0
    assert activation_statistics(conv, "relu6", 1)[2].item() == pytest.approx(1 / 3)  # channel 1 is dead
    assert activation_statistics(conv, "gelu", 1)[2].item() == 0.0  # only the ReLU family has dead units
    assert activation_statistics(torch.zeros(6), "relu", -1)[2].item() == 0.0  # one dim: no units to judge
    sig = torch.tensor([[0.25, 0.5, 0.75, 0.9, 0.1, 0.3]])
    assert activation_statistics(sig, "sigmoid", -1, eps=0.25)[3].item() == pytest.approx(4 / 6)  # bounds ± eps count
    tanh = torch.tensor([[-0.995, 0.0, 0.995, 0.5]])
    assert activation_statistics(tanh, "tanh", -1)[3].item() == pytest.approx(0.5)
    assert activation_statistics(tanh, "relu", -1)[3].item() == 0.0
    one = activation_statistics(torch.tensor([[3.0]]), "relu", -1)
    assert one.tolist() == [3.0, 0.0, 0.0, 0.0]


def test_activation_statistics_batch_equals_one_by_one():
    torch.manual_seed(0)
    for shape, unit_dim, act in [((4, 6), -1, "relu"), ((2, 3, 4, 4), 1, "relu"), ((5, 8), -1, "tanh"),
                                 ((3, 7), -1, "sigmoid"), ((2, 3, 5), -1, "gelu"), ((1, 1), -1, "relu")]:
        outs = [torch.relu(torch.randn(shape)) if act == "relu" else ACTIVATION_FUNCTIONS[act](3 * torch.randn(shape))
                for _ in range(3)]
        outs[0].select(unit_dim if unit_dim >= 0 else len(shape) - 1, 0).zero_()  # a dead unit in the first
        batch = activation_statistics_batch(outs, act, unit_dim)
        one = torch.stack([activation_statistics(o, act, unit_dim) for o in outs])
        torch.testing.assert_close(batch, one, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------- histogram, host
def test_histogram_layout_and_edge_cases():
    h = histogram(torch.tensor([0.0, 1.0, 2.0, 3.0, NAN, INF]), bins=3)
    assert h.tolist() == [0.0, 3.0, 4.0, 6.0, 14.0, 1.0, 1.0, 2.0]
    assert histogram(torch.full((5,), 2.0), bins=4).tolist() == [2.0, 2.0, 5.0, 10.0, 20.0, 5.0, 0.0, 0.0, 0.0]
    assert histogram(torch.tensor([NAN, INF]), bins=2).tolist() == [0.0] * 7
    assert histogram(torch.randn(100)).shape == (35,)


def test_to_host_splits_one_transfer_back_into_its_tensors():
    out = to_host(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor(5, dtype=torch.int64), torch.tensor([0.5],
                  dtype=torch.bfloat16), torch.zeros(0))
    assert out == [[1.0, 2.0, 3.0, 4.0], [5.0], [0.5], []]
    assert to_host() == []


# ----------------------------------------------------------------------------------------- grouping
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.act = nn.ReLU()
        self.frozen = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10)
        self.frozen.requires_grad_(False)
        self.head.weight = self.emb.weight
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, ids):
        h = self.act(self.fc(self.emb(ids)))
        return self.head(self.norm(self.frozen(h))) * self.scale


def test_layer_groups_order_frozen_tied_and_labels():
    net = _Net()
    groups = layer_groups(net)
    # forward order for layers; the norm (no weighted layer) right after the layer registered before it; the
    # root's own parameter first; the frozen layer kept with no parameters
    assert [(g.name, g.frozen, len(g.params)) for g in groups] == [
        ("(root)", False, 1), ("emb", False, 1), ("fc", False, 2), ("norm", False, 2), ("frozen", True, 0),
        ("head", False, 1)]
    by = {g.name: g for g in groups}
    assert by["emb"].params == [net.emb.weight] and by["emb"].shared_with == ["head"]
    assert by["head"].params == [net.head.bias] and by["head"].shared_with == []  # the tied weight counts once
    assert by["fc"].label() == "layer `fc` (Linear 8→8, after relu)"
    assert by["emb"].label() == "layer `emb` (Embedding 10×8, tied with head)"
    assert by["norm"].label() == "layer `norm` (LayerNorm)"
    per = layer_groups(net, per_parameter=True)
    names = [g.name for g in per]
    assert "fc.weight" in names and "fc.bias" in names and "emb.weight" in names
    assert {g.name: g.shared_with for g in per}["emb.weight"] == ["head"]
    assert all(len(g.params) == 1 for g in per if not g.frozen)


def test_shared_activations_and_hook_targets():
    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
            self.act, self.tanh = nn.ReLU(), nn.Tanh()

        def forward(self, x):
            return self.tanh(self.c(self.act(self.b(self.act(self.a(x))))))

    net = Loop()
    groups = {g.name: g for g in layer_groups(net)}
    shared = shared_activations(list(groups.values()))
    assert shared == {"act"}
    modules = dict(net.named_modules())
    assert activation_hook_target(groups["c"], modules, shared) == (net.tanh, None)
    assert activation_hook_target(groups["a"], modules, shared) == (net.a, ACTIVATION_FUNCTIONS["relu"])
    assert activation_hook_target(groups["a"], modules) == (net.act, None)
    plain = LayerGroup("x", nn.Linear(2, 2), [], "x", activation="gelu")
    assert activation_hook_target(plain, modules) == (plain.module, ACTIVATION_FUNCTIONS["gelu"])
    assert activation_hook_target(LayerGroup("y", nn.Linear(2, 2), [], "y"), modules)[1] is None
    assert unit_dim_for(nn.Conv2d(1, 1, 1)) == 1 and unit_dim_for(nn.ConvTranspose1d(1, 1, 1)) == 1
    assert unit_dim_for(nn.Linear(1, 1)) == -1


# ----------------------------------------------------------------------------------------- more paths
def _uniform(n, numel, dtype=torch.float32):
    return [_group(f"g{i}", (numel,), dtype=dtype, seed=i) for i in range(n)]


def test_packed_buffer_respects_the_memory_bound_and_the_chunk_count():
    """The documented bound: the packed buffer holds at most max(memory_fraction × gradient elements, MIN_CHUNK)
    elements (whole rows of BLOCK, rounded down), and rows are packed greedily into as few chunks as fit (a gradient
    may span two chunks)."""
    assert (BLOCK, MIN_CHUNK, ROW_MIN) == (128, 4096, 1024)
    groups = _uniform(60, 200)  # 12000 elements; 200 = 8 × 25: two rows of BLOCK each, the second padded
    for fraction, rows_per_chunk in [(0.01, 32), (0.52, 48), (0.51, 47)]:  # 0.51: a gradient spans two chunks
        plan = _check(groups, memory_fraction=fraction)
        (bucket,) = plan._buckets
        bound = max(MIN_CHUNK, int(fraction * 12000))
        rows = [c.x.shape for c in bucket.chunks]
        full, rest = divmod(120, rows_per_chunk)
        assert rows == [(rows_per_chunk, BLOCK)] * full + ([(rest, BLOCK)] if rest else []), fraction
        # the chunks use whole rows; the buffer is the whole bound (the update ratio's copies share it)
        assert rows_per_chunk * BLOCK <= bucket.buffer.numel() == bound
    # a gradient of 2^14 elements: rows of ROW_MIN, in chunks of the floor's 4 rows; no padding, no zeroing
    plan = _check([_group("big", (LARGE,))])
    (bucket,) = plan._buckets
    assert [tuple(c.x.shape) for c in bucket.chunks] == [(4, ROW_MIN)] * 4 and not any(c.zero for c in bucket.chunks)
    assert bucket.buffer.numel() == MIN_CHUNK
    # sizes with a large power-of-two factor are not padded: 40 × 256 elements fill rows of 256 exactly
    plan = _check(_uniform(40, 256), memory_fraction=1.0)
    assert [tuple(c.x.shape) for c in plan._buckets[0].chunks] == [(40, 256)]
    # a large model's rows are a 16th of a chunk wide: 2^20 elements in chunks of 2^17, rows of 2^13
    plan = _check([_group("wide", (1 << 20,))], memory_fraction=0.125)
    assert {tuple(c.x.shape) for c in plan._buckets[0].chunks} == {(16, 1 << 13)}


def test_gradients_filling_whole_rows_stay_on_their_own_layers():
    for memory_fraction in (1.0, 0.01):  # one chunk, and several
        groups = _uniform(40, 256) + [_group("row", (128,), seed=99)]
        _check(groups, memory_fraction=memory_fraction)


def test_large_half_precision_gradients_are_summed_in_float32():
    side = int(LARGE**0.5) + 1
    groups = [_group("bf16", (side, side), dtype=torch.bfloat16), _group("small", (3,), dtype=torch.bfloat16, seed=1)]
    with torch.no_grad():
        groups[0].params[0].grad.add_(3.0)  # a large common offset: a bf16 running sum would lose it
    _check(groups)


def test_one_gradient_and_a_fresh_plan():
    groups = [_group("only", (5,))]
    plan = GradStatsPlan(groups)
    assert plan.tensor_sq is None  # nothing measured yet
    _check(groups)
    assert weight_sq(groups).tolist() == pytest.approx([float(groups[0].params[0].detach().pow(2).sum())])
    single = _group("one", (1,))
    stats = grad_statistics([single])  # one element: its mean is itself, its std 0
    g = single.params[0].grad.item()
    assert stats[0].tolist() == pytest.approx([abs(g), g, 0.0, abs(g), 0.0, 0.0])
    out = to_host(torch.tensor([1.5, 2.5]))
    assert out == [[1.5, 2.5]]


def test_everything_stays_on_the_gradients_device():
    """``meta`` tensors stand for an accelerator here: a result made on the CPU instead (a missing ``device=``)
    fails to combine with them or shows up as a CPU tensor."""
    dev = "meta"

    def grp(name, *shapes):
        params = []
        for s in shapes:
            p = nn.Parameter(torch.empty(*s, device=dev))
            p.grad = torch.empty(*s, device=dev)
            params.append(p)
        return LayerGroup(name, nn.Identity(), params, name)

    side = int(LARGE**0.5) + 1
    groups = [grp("a", (8, 8), (8,)), grp("b", (side, side)), grp("c", (3,))]
    plan = GradStatsPlan(groups)
    outs = {"moments": plan.moments(), "per_group": plan.per_group(torch.empty(4, device=dev)),
            "plan_weight_sq": plan.weight_sq(), "grad_statistics": grad_statistics(groups), "weight_sq": weight_sq(groups),
            "weight_norms": weight_norms(groups), "update_sq": update_sq(groups, snapshot(groups)),
            "update_ratios": update_ratios(groups, snapshot(groups)),
            "act": activation_statistics(torch.empty(4, 5, device=dev), "relu", -1),
            "act_one": activation_statistics(torch.empty(1, 1, device=dev), "sigmoid", -1),
            "act_batch": activation_statistics_batch([torch.empty(4, 5, device=dev)] * 2, "tanh", -1),
            "act_batch_one": activation_statistics_batch([torch.empty(1, 1, device=dev)] * 2, "relu", -1)}
    tracker = UpdateTracker(groups)
    tracker.begin()
    outs["tracker"] = tracker.finish()[0]
    shapes = {"moments": [(3, 5), (3,)], "per_group": [(3,)], "plan_weight_sq": [(3,)], "grad_statistics": [(3, 6)],
              "weight_sq": [(3,)], "weight_norms": [(3,)], "update_sq": [(2, 3)], "update_ratios": [(3,)], "act": [(4,)],
              "act_one": [(4,)], "act_batch": [(2, 4)], "act_batch_one": [(2, 4)], "tracker": [(2, 3)]}
    for name, out in outs.items():
        out = list(out) if isinstance(out, tuple) else [out]
        assert [(o.device.type, tuple(o.shape)) for o in out] == [("meta", s) for s in shapes[name]], name
    cpu_plan = GradStatsPlan([_group("x", (2,)), _group("y", (3,), seed=1)])
    assert cpu_plan.per_group(torch.tensor([1.0, 2.0])).device.type == "cpu"
    assert cpu_plan.per_group(torch.empty(2, device=dev)).device.type == "meta"  # the index follows the device
    assert cpu_plan.per_group(torch.tensor([1.0, 2.0], dtype=torch.float64)).dtype == torch.float64


def test_update_tracker_reports_bool_measured_and_a_two_row_result():
    tracker = UpdateTracker([_group("a", (3,)), _group("b", (2,), seed=1)])
    sq, measured = tracker.finish()
    assert sq.shape == (2, 2) and measured.dtype == torch.bool
    tracker.begin()
    sq, measured = tracker.finish()
    assert sq.shape == (2, 2) and measured.dtype == torch.bool and measured.tolist() == [True, True]


def test_activation_statistics_on_two_values_and_any_unit_dim():
    two = torch.tensor([[1.0, 4.0]])
    assert activation_statistics(two, "tanh", -1)[1].item() == pytest.approx(3.0 / 2**0.5)
    assert activation_statistics_batch([two, two], "tanh", -1)[:, 1].tolist() == pytest.approx([3.0 / 2**0.5] * 2)
    torch.manual_seed(1)
    outs = [torch.relu(torch.randn(3, 4, 5)) for _ in range(2)]
    outs[0][1] = 0.0  # along dim 0 a whole slice is dead
    for unit_dim in (0, 1, 2, -1):
        torch.testing.assert_close(activation_statistics_batch(outs, "relu", unit_dim),
                                   torch.stack([activation_statistics(o, "relu", unit_dim) for o in outs]))
    sig = torch.tensor([[0.25, 0.5, 0.75, 0.9, 0.1, 0.3]])  # values exactly at bound ± eps count
    assert activation_statistics_batch([sig], "sigmoid", -1, eps=0.25)[0, 3].item() == pytest.approx(4 / 6)


def test_histogram_of_a_narrow_range():
    assert histogram(torch.tensor([0.0, 0.1, 0.2, 0.3]), bins=2)[5:].tolist() == [2.0, 2.0]


def test_labels_tied_holders_and_grouping_details():
    assert LayerGroup("x", nn.Identity(), [], "Linear 2→2", activation="linear").label() == "layer `x` (Linear 2→2)"
    assert LayerGroup("x", nn.Identity(), [], "Linear 2→2", activation="unknown").label() == "layer `x` (Linear 2→2)"
    assert LayerGroup("x", nn.Identity(), [], "E", shared_with=["a", "b"]).label() == "layer `x` (E, tied with a, b)"

    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.z_proj, self.a_head, self.emb = nn.Linear(8, 8), nn.Linear(8, 20, bias=False), nn.Embedding(20, 8)
            self.a_head.weight = self.emb.weight
            self.z_in, self.a_out = nn.Linear(8, 8), nn.Linear(8, 8, bias=False)
            self.a_out.weight = self.z_in.weight
            self.after = nn.Linear(8, 8)

        def forward(self, x, ids):
            h = self.a_head(self.z_proj(x)).sum() + self.emb(ids).sum()
            return self.after(self.a_out(self.z_in(x))).sum() + h

    net = HeadFirst()
    groups = layer_groups(net, sample_input=(torch.randn(2, 8), torch.tensor([1, 2])))
    by = {g.name: g for g in groups}
    # an embedding owns its tied weight even when the projection runs first; otherwise the first in forward order
    assert by["emb"].shared_with == ["a_head"] and "a_head" not in by
    assert by["z_in"].shared_with == ["a_out"] and "a_out" not in by
    assert "after" in by  # modules after a fully tied one are still grouped

    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))
            self.fc = nn.Linear(2, 2)
            self.frozen = nn.Linear(2, 2)
            self.frozen.requires_grad_(False)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.frozen(self.act(self.fc(x))) * self.scale

    net = Root()
    per = {g.name: g for g in layer_groups(net, per_parameter=True)}
    assert set(per) == {"scale", "fc.weight", "fc.bias", "frozen"}
    w = per["fc.weight"]
    assert (w.module, w.params, w.description, w.activation, w.activation_at, w.frozen, w.info.name) == (
        net.fc, [net.fc.weight], "Linear 2→2", "relu", "act", False, "fc")
    f = per["frozen"]
    assert (f.module, f.params, f.description, f.activation, f.frozen, f.info.name, f.shared_with) == (
        net.frozen, [], "Linear 2→2", "linear", True, "frozen", [])
    net.scale.requires_grad_(False)
    root = layer_groups(net)[0]
    assert (root.name, root.frozen, root.params, root.info) == ("(root)", True, [], None)


def test_untraced_models_are_grouped_with_the_sample_input_and_odd_groups_are_tolerated():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                x = x * 1.0
            return self.b(torch.tanh(self.a(x)))

    groups = layer_groups(Untraceable(), sample_input=torch.randn(3, 4))
    assert [(g.name, g.activation) for g in groups] == [("a", "tanh"), ("b", "linear")]
    loose = [LayerGroup("x", nn.Identity(), [], "x", activation_at="act"), LayerGroup("y", nn.Identity(), [], "y")]
    assert shared_activations(loose) == set()  # a group without layer info is not counted


def test_empty_gradients_alone_and_before_a_chunk_break_and_a_plan_without_parameters():
    _check([_group("e", (0,))])
    _check([_group("e", (0,)), _group("s", (10000,), seed=1), _group("t", (7,), seed=2)], memory_fraction=0.01)
    plan = GradStatsPlan([LayerGroup("frozen", nn.Identity(), [], "frozen", frozen=True)])
    assert plan.per_group(torch.empty(0)).tolist() == [0.0]
    assert [t.tolist() for t in plan.moments()] == [[[0.0] * 5], [0.0]]
