"""The health detectors' rules, one by one, on hand-made statistics: thresholds at their boundaries, patience and
re-arming, the exact message a user reads, and the state that survives a checkpoint.

Each expected message is written out from the rule it states (the numbers in it computed here by hand), so a
changed threshold, comparison, count or wording fails a test. ``benchmarks/mutation.py health`` runs these.
"""

from __future__ import annotations

import math

import pytest

from lightning_gradguard.health import REMEDY, Finding, HealthDetector, LayerRow

NAN, INF = float("nan"), float("inf")


def _row(name, norm, weighted=True, **kw):
    return LayerRow(name, f"layer `{name}`", None, norm, weighted=weighted, **kw)


def _kinds(findings):
    return [f.kind for f in findings]


# ----------------------------------------------------------------------------------------- patience
def test_patience_then_quiet_until_clear_for_patience_steps_then_rearmed():
    d = HealthDetector(patience=2)
    seq = [0.6, 0.6, 0.6, 0.4, 0.6, 0.4, 0.4, 0.6, 0.6]
    fired = [bool(d.update(s, [_row("r", 1.0, dead_frac=v)], 1.0)) for s, v in enumerate(seq)]
    # fires on the 2nd in a row; quiet while it persists; one clear step is not enough to re-arm (step 4 stays
    # quiet); two clear steps re-arm it; then it needs 2 in a row again
    assert fired == [False, True, False, False, False, False, False, False, True]


def test_one_clear_step_does_not_rearm_a_patience_of_two():
    d = HealthDetector(patience=2)
    seq = [0.6, 0.6, 0.4, 0.6, 0.6]
    assert [bool(d.update(s, [_row("r", 1.0, dead_frac=v)], 1.0)) for s, v in enumerate(seq)] == [False, True] + [False] * 3
    d.update(5, [_row("r", 1.0, dead_frac=0.1)], 1.0)
    d.update(6, [_row("r", 1.0, dead_frac=0.1)], 1.0)
    assert d.state_dict()["tracks"]["dead:r"] == {"streak": 0, "clear": 2, "fired": False}  # re-armed


def test_patience_one_fires_on_the_first_step():
    d = HealthDetector(patience=1)
    assert _kinds(d.update(0, [_row("r", 1.0, dead_frac=0.9)], 1.0)) == ["dead_relu"]


# ----------------------------------------------------------------------------------------- activations
def test_dead_relu_threshold_is_strict_and_the_message_is_exact():
    d = HealthDetector(patience=1, dead_fraction=0.5)
    assert d.update(0, [_row("r", 1.0, dead_frac=0.5)], 1.0) == []
    (f,) = d.update(7, [_row("r", 1.0, dead_frac=0.75)], 1.0)
    assert (f.kind, f.layer, f.step, f.value) == ("dead_relu", "r", 7, 0.75)
    assert f.message == ("step 7: layer `r`: 75% of its units are dead (output 0 for the whole batch) — dying ReLU; "
                         + REMEDY["dead_relu"])
    assert d.findings == [f]


def test_saturation_threshold_is_strict_and_the_message_is_exact():
    d = HealthDetector(patience=1, saturated_fraction=0.5)
    assert d.update(0, [_row("s", 1.0, saturated_frac=0.5)], 1.0) == []
    (f,) = d.update(3, [_row("s", 1.0, saturated_frac=0.625)], 1.0)
    assert (f.kind, f.layer, f.step, f.value) == ("saturation", "s", 3, 0.625)
    assert f.message == ("step 3: layer `s`: 62% of its outputs are saturated — saturating activation; "
                         + REMEDY["saturation"])


def test_activation_rules_are_per_layer():
    d = HealthDetector(patience=1)
    rows = [_row("a", 1.0, dead_frac=0.9), _row("b", 1.0, dead_frac=0.1, saturated_frac=0.9)]
    out = d.update(0, rows, 1.0)
    assert [(f.kind, f.layer) for f in out] == [("dead_relu", "a"), ("saturation", "b")]
    # still dead and saturated: already reported; layer c is new and reported on its own
    out = d.update(1, rows + [_row("c", 1.0, dead_frac=0.9, saturated_frac=0.9)], 1.0)
    assert [(f.kind, f.layer) for f in out] == [("dead_relu", "c"), ("saturation", "c")]


# ----------------------------------------------------------------------------------------- non-finite
def test_nonfinite_without_history_in_the_backward_pass_message():
    d = HealthDetector()
    rows = [_row("a", 1.0), _row("b", NAN, grad_nonfinite=3.0), _row("c", 2.0)]
    (f,) = d.update(4, rows, NAN)
    assert (f.kind, f.layer, f.step, f.value) == ("nonfinite", "b", 4, 3.0)
    assert f.message == (
        "step 4: layer `b`: 3 non-finite gradient values — the loss was finite, so NaN/Inf arose in the backward "
        "pass; layer `b` is where it first appears in backward order (nearest the loss); no finite gradient norm "
        "was logged before it; " + REMEDY["nonfinite"])
    # a layer with a NaN count but a finite norm (NaN elsewhere in the norm's reduction) is also non-finite
    d = HealthDetector()
    (f,) = d.update(0, [_row("a", 1.0, grad_nonfinite=1.0), _row("b", 1.0)], 1.0)
    assert f.layer == "a" and "1 non-finite gradient values" in f.message


def test_nonfinite_without_a_count_says_non_finite_gradients():
    d = HealthDetector()
    (f,) = d.update(0, [_row("a", INF, grad_nonfinite=0.5)], INF)
    assert f.message.startswith("step 0: layer `a`: non-finite gradients — the loss was finite")
    d = HealthDetector()
    (f,) = d.update(0, [_row("a", INF)], INF)  # an infinite norm with no count is non-finite too
    assert f.kind == "nonfinite" and f.value == 0.0 and "non-finite gradients —" in f.message


def test_nonfinite_fires_once_per_episode_and_rearms_after_one_clean_step():
    d = HealthDetector(patience=5)
    bad = [_row("a", NAN, grad_nonfinite=1.0)]
    good = [_row("a", 1.0)]
    assert [bool(d.update(s, rows, 1.0)) for s, rows in enumerate([bad, bad, good, bad])] == [True, False, False, True]


def test_nonfinite_blocks_the_norm_rules_on_that_step():
    d = HealthDetector(patience=1)
    rows = [_row("a", 1e9), _row("b", NAN, grad_nonfinite=1.0)]
    assert _kinds(d.update(0, rows, NAN)) == ["nonfinite"]  # no "exploding" from a's finite 1e9 alongside
    assert d.state_dict()["totals"] == []


def test_amp_overflow_is_its_own_kind():
    d = HealthDetector()
    (f,) = d.update(2, [_row("a", NAN, grad_nonfinite=4.0), _row("b", 1.0)], NAN, amp_overflow=True)
    assert (f.kind, f.layer, f.step, f.value) == ("amp_overflow", "a", 2, 4.0)
    assert f.message == ("step 2: layer `a`: inf/NaN gradients — AMP overflow, the GradScaler skips this step; "
                         + REMEDY["amp_overflow"])


def test_nonfinite_loss_step_decides_forward_or_backward():
    rows = [_row("a", NAN, grad_nonfinite=2.0)]
    d = HealthDetector()
    d.update_loss(5, NAN, nonfinite_step=5)
    (f,) = d.update(5, rows, NAN)  # the loss went non-finite at this very step: forward
    assert "— the loss itself was already non-finite: NaN/Inf produced in the forward pass (log of 0, division by 0, " \
           "overflow) or by weights already corrupted; no finite" in f.message
    d = HealthDetector()
    d.update_loss(9, NAN, nonfinite_step=9)
    (f,) = d.update(5, rows, NAN)  # a later loss does not explain an earlier gradient
    assert "the loss was finite, so NaN/Inf arose in the backward pass" in f.message


def test_nonfinite_forward_origin_is_the_first_non_finite_output():
    d = HealthDetector()
    rows = [_row("a", 1.0, act_finite=True), _row("b", 1.0, act_finite=None), _row("c", NAN, grad_nonfinite=1.0,
            act_finite=False), _row("d", NAN, grad_nonfinite=2.0, act_finite=False)]
    (f,) = d.update(0, rows, NAN)
    # named where it was produced (c); counted where backward first meets it (d, nearest the loss)
    assert (f.layer, f.value) == ("c", 2.0)
    assert f.message == (
        "step 0: layer `c`: 2 non-finite gradient values — NaN/Inf produced in the forward pass: layer `c` is the "
        "first layer whose output was non-finite (look for log of 0, division by 0, sqrt of a negative, exp overflow "
        "there); no finite gradient norm was logged before it; " + REMEDY["nonfinite"])


def _preceded(totals, **kw):
    d = HealthDetector(patience=100, **kw)
    for s, t in totals:
        d.update(s, [_row("a", 1.0)], t)
    (f,) = d.update(99, [_row("a", NAN, grad_nonfinite=1.0)], NAN)
    return f.message.split("; ")[-2]


def test_what_preceded_a_nonfinite_step():
    assert _preceded([(3, 2.0)]) == "the total gradient norm looked ordinary before it (2 at step 3)"
    assert _preceded([(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (4, 4.0), (5, 2.0)]) == (
        "the total gradient norm looked ordinary before it (4 → 8 → 4 → 2 at steps 2–5)")  # the last 4
    assert _preceded([(0, 1.0), (1, 3.0), (2, 10.0)]) == (
        "the total gradient norm grew ×10 before it (1 → 3 → 10 at steps 0–2)")  # ×growth_factor exactly counts
    assert _preceded([(0, 1.0), (1, 9.99)]) == "the total gradient norm looked ordinary before it (1 → 9.99 at steps 0–1)"
    assert _preceded([(0, 2.0), (1, 40.0)]) == "the total gradient norm grew ×20 before it (2 → 40 at steps 0–1)"
    # one logged step shows no growth, whatever the factor
    assert _preceded([(4, 3.0)], growth_factor=1.0) == "the total gradient norm looked ordinary before it (3 at step 4)"
    assert _preceded([(0, 500.0), (1, 1001.0)]) == (
        "the total gradient norm was already huge before it (500 → 1e+03 at steps 0–1)")
    assert _preceded([(0, 1000.0)]) == "the total gradient norm looked ordinary before it (1e+03 at step 0)"
    assert _preceded([(0, 2000.0)]) == "the total gradient norm was already huge before it (2e+03 at step 0)"
    # a zero first total: no ratio (and no division by zero)
    assert _preceded([(0, 0.0), (1, 5.0)]) == "the total gradient norm looked ordinary before it (0 → 5 at steps 0–1)"
    assert _preceded([(0, 2.0), (1, 20.0)], growth_factor=100.0) == (
        "the total gradient norm looked ordinary before it (2 → 20 at steps 0–1)")


def test_totals_keep_the_last_eight_finite_ones():
    d = HealthDetector(patience=100)
    for s in range(10):
        d.update(s, [_row("a", 1.0)], float(s + 1))
    d.update(10, [_row("a", 1.0)], INF)  # a non-finite total is not recorded
    assert d.state_dict()["totals"] == [[s, float(s + 1)] for s in range(2, 10)]


# ----------------------------------------------------------------------------------------- vanishing
def test_vanishing_collapse_message_and_depth():
    d = HealthDetector(patience=1)
    norms = [1e-8, 1e-7, 1e-6, 1e-5, 1.0, 2.0, 3.0, 4.0]  # output-side half's median: 2.5
    (f,) = d.update(6, [_row(f"l{i}", n) for i, n in enumerate(norms)], 5.0)
    assert (f.kind, f.layer, f.step, f.value) == ("vanishing", "l3", 6, 1e-5)
    assert f.message == (
        "step 6: layer `l3`: gradient norm 1e-05, 4e-06 of the output-side half's median — vanishing gradients: the "
        "norm collapses at depth 4 of 8 weighted layers and stays below 0.001× down to the input (1e-08 → 1e-07 → "
        "1e-06 → 1e-05 → 1 → 2 → 3 → 4 from input to output); " + REMEDY["vanishing"])


def test_vanishing_collapse_stops_at_the_first_layer_above_the_ratio():
    d = HealthDetector(patience=1)
    norms = [1e-6, 1e-6, 0.5, 1e-6, 1.0, 1.0, 1.0, 1.0]  # the collapse is the prefix before layer 2
    (f,) = d.update(0, [_row(f"l{i}", n) for i, n in enumerate(norms)], 1.0)
    assert f.layer == "l1" and "collapses at depth 2 of 8" in f.message


def test_vanishing_needs_a_quarter_of_the_layers_and_at_least_two():
    one = [1e-6] + [1.0] * 7  # 1 of 8 below: not by depth
    assert HealthDetector(patience=1).update(0, [_row(f"l{i}", n) for i, n in enumerate(one)], 1.0) == []
    two_of_twelve = [1e-6] * 2 + [1.0] * 10  # a quarter of 12 is 3
    assert HealthDetector(patience=1).update(0, [_row(f"l{i}", n) for i, n in enumerate(two_of_twelve)], 1.0) == []
    three_of_twelve = [1e-6] * 3 + [1.0] * 9
    (f,) = HealthDetector(patience=1).update(0, [_row(f"l{i}", n) for i, n in enumerate(three_of_twelve)], 1.0)
    assert f.layer == "l2" and "depth 3 of 12" in f.message
    two_of_four = [1e-6, 1e-6, 1.0, 1.0]
    (f,) = HealthDetector(patience=1).update(0, [_row(f"l{i}", n) for i, n in enumerate(two_of_four)], 1.0)
    assert "depth 2 of 4" in f.message


def test_vanishing_ratio_is_strict_and_relative_to_the_output_half_median():
    at = [1e-3, 1e-3, 1.0, 1.0]  # exactly ratio × median: not below it
    assert HealthDetector(patience=1).update(0, [_row(f"l{i}", n) for i, n in enumerate(at)], 1.0) == []
    # odd count: the output side is the last 2 of 5, median (1 + 3) / 2 = 2; 1.9e-3 < 0.001 × 2
    odd = [1.9e-3, 1.9e-3, 1.0, 1.0, 3.0]
    (f,) = HealthDetector(patience=1).update(0, [_row(f"l{i}", n) for i, n in enumerate(odd)], 1.0)
    assert "0.00095 of the output-side half's median" in f.message
    odd_above = [2.1e-3, 2.1e-3, 1.0, 1.0, 3.0]
    assert HealthDetector(patience=1).update(0, [_row(f"l{i}", n) for i, n in enumerate(odd_above)], 1.0) == []
    # the output-side half's layers themselves never count as collapsed, however small
    tail_small = [1.0, 1.0, 1e-9, 1e-9]
    assert HealthDetector(patience=1).update(0, [_row(f"l{i}", n) for i, n in enumerate(tail_small)], 1.0) == []


def test_vanishing_depth_on_small_and_odd_stacks():
    (f,) = HealthDetector(patience=1).update(0, [_row(f"l{i}", n) for i, n in enumerate([1e-6, 1e-6, 1.0])], 1.0)
    assert "collapses at depth 2 of 3" in f.message  # the output-side half of 3 layers is the last one
    # the collapse stops where the output-side half starts, even if a layer there is tiny too
    norms = [1e-6] * 4 + [1e-9, 1.0, 1.0, 1.0]
    (f,) = HealthDetector(patience=1).update(0, [_row(f"l{i}", n) for i, n in enumerate(norms)], 1.0)
    assert f.layer == "l3" and "collapses at depth 4 of 8" in f.message
    # 13 layers: a quarter is 4 (rounded up), so 3 collapsed input layers are not enough
    norms = [1e-6] * 3 + [1.0] * 10
    assert HealthDetector(patience=1).update(0, [_row(f"l{i}", n) for i, n in enumerate(norms)], 1.0) == []
    norms = [1e-6] * 4 + [1.0] * 9
    assert _kinds(HealthDetector(patience=1).update(0, [_row(f"l{i}", n) for i, n in enumerate(norms)], 1.0)) == \
        ["vanishing"]


def test_vanishing_everywhere_below_the_absolute_norm():
    d = HealthDetector(patience=1)
    (f,) = d.update(2, [_row("a", 5e-8), _row("n", 1.0, weighted=False), _row("b", 2e-8)], 1.0)
    assert (f.kind, f.layer, f.value) == ("vanishing", "b", 2e-8)  # the smallest
    assert f.message == ("step 2: layer `b`: every weighted layer's gradient norm is below 1e-07 — vanishing "
                         "gradients everywhere; " + REMEDY["vanishing"])
    single = HealthDetector(patience=1)
    assert _kinds(single.update(0, [_row("a", 5e-8)], 5e-8)) == ["vanishing"]
    assert HealthDetector(patience=1).update(0, [_row("a", 1e-7)], 1e-7) == []  # strict
    assert HealthDetector(patience=1).update(0, [_row("a", 5e-8), _row("b", 2e-7)], 1.0) == []
    # only exact zeros: nothing to judge
    assert HealthDetector(patience=1).update(0, [_row("a", 0.0), _row("b", 0.0)], 0.0) == []


# ----------------------------------------------------------------------------------------- exploding
def test_exploding_by_norm_message_and_strict_bound():
    d = HealthDetector(patience=2, exploding_norm=1e3)
    rows = [_row("a", 1000.0), _row("b", 1.0)]
    assert d.update(0, rows, 1000.0) == [] and d.update(1, rows, 1000.0) == []  # not above
    rows = [_row("a", 2000.0), _row("b", 1.0)]
    assert d.update(2, rows, 2000.0) == []
    (f,) = d.update(3, rows, 2000.0)
    assert (f.kind, f.layer, f.step, f.value) == ("exploding", "a", 3, 2000.0)
    assert f.message == (
        "step 3: layer `a`: gradient norm 2e+03 > 1000 on 2 logging steps — exploding gradients (total norm 1e+03 → "
        "1e+03 → 2e+03 → 2e+03 over the last logging steps); " + REMEDY["exploding"])


def test_exploding_hard_bound_message_and_no_repeat():
    d = HealthDetector(patience=3, exploding_hard_norm=1e5)
    assert d.update(0, [_row("a", 1e5)], 1e5) == []  # strict
    (f,) = d.update(1, [_row("a", 1.0), _row("b", 2e5)], 2e5)
    assert (f.layer, f.value) == ("b", 2e5)
    assert f.message == ("step 1: layer `b`: gradient norm 2e+05 > 100000 (fires at once) — exploding gradients "
                         "(total norm 1e+05 → 2e+05 over the last logging steps); " + REMEDY["exploding"])
    assert d.update(2, [_row("b", 3e5)], 3e5) == []  # the same episode


def test_exploding_by_growth_of_the_total_norm():
    d = HealthDetector(patience=2, growth_factor=10.0)
    rows = [_row("a", 1.0)]
    got = [_kinds(d.update(s, rows, t)) for s, t in enumerate([1.0, 10.0, 100.0, 1000.0])]
    # growth ×10 on steps 1 and 2 (a streak of 2 = patience), so the condition holds from step 2 on and has held
    # twice in a row at step 3
    assert got == [[], [], [], ["exploding"]]
    f = d.findings[-1]
    assert f.message == (
        "step 3: layer `a`: total gradient norm grew ×10 or more on 2 logging steps in a row — exploding gradients "
        "(total norm 1 → 10 → 100 → 1e+03 over the last logging steps); " + REMEDY["exploding"])
    slow = HealthDetector(patience=2, growth_factor=10.0)
    assert [_kinds(slow.update(s, rows, t)) for s, t in enumerate([1.0, 9.9, 98.0, 970.0, 9600.0])] == [[]] * 5
    broken = HealthDetector(patience=2, growth_factor=10.0)  # a step without growth restarts the streak
    assert [_kinds(broken.update(s, rows, t)) for s, t in enumerate([1.0, 10.0, 10.0, 100.0, 1000.0, 1e4])] == \
        [[], [], [], [], [], ["exploding"]]
    assert broken.state_dict()["growth_streak"] == 3 and broken.state_dict()["last_total"] == 1e4


def test_growth_streak_survives_a_nonfinite_total_and_names_its_cause():
    d = HealthDetector(patience=2, growth_factor=10.0)
    rows = [_row("a", 1.0)]
    got = [_kinds(d.update(s, rows, t)) for s, t in enumerate([1.0, 10.0, INF, 100.0, 1000.0])]
    # the infinite total is skipped: 100 still counts as ×10 over 10
    assert got == [[], [], [], [], ["exploding"]] and d.state_dict()["last_total"] == 1000.0
    # a layer exactly at exploding_norm is not above it: the growth is named as the cause
    d = HealthDetector(patience=2, growth_factor=10.0)
    for s, t in enumerate([1.0, 10.0, 100.0, 1000.0]):
        d.update(s, [_row("a", 1000.0)], t)
    (f,) = d.findings
    assert "total gradient norm grew ×10 or more on 2 logging steps in a row" in f.message


def test_exploding_message_shows_the_last_three_totals_and_this_one():
    d = HealthDetector(patience=2)
    for s, (norm, total) in enumerate([(1.0, 1.0), (1.0, 2.0), (1.0, 3.0), (1.0, 4.0), (2000.0, 2000.0), (2000.0, 2000.0)]):
        d.update(s, [_row("a", norm)], total)
    (f,) = d.findings
    assert "(total norm 3 → 4 → 2e+03 → 2e+03 over the last logging steps)" in f.message


def test_growth_needs_a_positive_finite_previous_total():
    d = HealthDetector(patience=1, growth_factor=10.0)
    assert d.update(0, [_row("a", 0.0)], 0.0) == []
    assert d.update(1, [_row("a", 1.0)], 1.0) == []  # from 0: no ratio
    assert d.state_dict()["growth_streak"] == 0


def test_exploding_at_between_logging_steps():
    d = HealthDetector(patience=3)
    (f,) = d.exploding_at(12, "fc", "layer `fc`", 3e6)
    assert (f.kind, f.layer, f.step, f.value) == ("exploding", "fc", 12, 3e6)
    assert f.message == ("step 12: layer `fc`: gradient norm 3e+06 > 100000 (seen by the every-step check; fires at "
                         "once) — exploding gradients; " + REMEDY["exploding"])
    assert d.findings == [f]
    assert d.exploding_at(13, "fc", "layer `fc`", 4e6) == []
    assert d.state_dict()["tracks"]["exploding"] == {"streak": 1, "clear": 0, "fired": True}
    assert d.update(14, [_row("fc", 5e6)], 5e6) == []  # the same episode as the logging step sees it
    assert d.state_dict()["tracks"]["exploding"] == {"streak": 2, "clear": 0, "fired": True}


# ----------------------------------------------------------------------------------------- update ratio
def test_update_ratio_high_uses_the_median_and_low_the_largest():
    d = HealthDetector(patience=1)
    rows = [_row("a", 1.0, update_ratio=0.05), _row("b", 1.0, update_ratio=0.2), _row("c", 1.0, update_ratio=0.3)]
    (f,) = d.update(4, rows, 1.0)
    assert (f.kind, f.layer, f.step, f.value) == ("update_ratio", "", 4, 0.2)
    assert f.message == ("step 4: all layers: median update/weight ratio ‖Δw‖/‖w‖ = 0.2 > 0.1 on 1 logging steps; "
                         + REMEDY["update_ratio_high"])
    d = HealthDetector(patience=1)
    rows = [_row("a", 1.0, update_ratio=1e-7), _row("b", 1.0, update_ratio=4e-6)]
    (f,) = d.update(0, rows, 1.0)
    assert f.value == 4e-6
    assert f.message == ("step 0: all layers: largest update/weight ratio ‖Δw‖/‖w‖ of any layer = 4e-06 < 1e-05 on 1 "
                         "logging steps; " + REMEDY["update_ratio_low"])
    # one layer moving enough is enough; a single high layer does not move the median
    assert HealthDetector(patience=1).update(0, [_row("a", 1.0, update_ratio=1e-7),
                                                 _row("b", 1.0, update_ratio=1e-3)], 1.0) == []
    assert HealthDetector(patience=1).update(0, [_row("a", 1.0, update_ratio=1e-3), _row("b", 1.0, update_ratio=1e-3),
                                                 _row("c", 1.0, update_ratio=0.9)], 1.0) == []


def test_update_ratio_bounds_are_strict_and_odd_rows_are_ignored():
    at_high = [_row("a", 1.0, update_ratio=0.1)]
    assert HealthDetector(patience=1).update(0, at_high, 1.0) == []
    at_low = [_row("a", 1.0, update_ratio=1e-5)]
    assert HealthDetector(patience=1).update(0, at_low, 1.0) == []
    ignored = [_row("n", 1.0, weighted=False, update_ratio=5.0), _row("z", 1.0, update_ratio=0.0),
               _row("i", 1.0, update_ratio=INF), _row("m", 1.0, update_ratio=None), _row("a", 1.0, update_ratio=1e-3)]
    assert HealthDetector(patience=1).update(0, ignored, 1.0) == []
    zeros_ignored = [_row("z", 1.0, update_ratio=0.0), _row("y", 1.0, update_ratio=0.0), _row("a", 1.0, update_ratio=0.5)]
    assert _kinds(HealthDetector(patience=1).update(0, zeros_ignored, 1.0)) == ["update_ratio"]  # median of [0.5]
    only_ignored = ignored[:4]  # no usable ratio at all: nothing to say
    assert HealthDetector(patience=1).update(0, only_ignored, 1.0) == []


def test_update_ratio_streak_is_broken_by_a_step_without_ratios():
    d = HealthDetector(patience=2)
    high = [_row("a", 1.0, update_ratio=0.5)]
    none = [_row("a", 1.0)]
    got = [bool(d.update(s, rows, 1.0)) for s, rows in enumerate([high, none, high, high])]
    assert got == [False, False, False, True]


# ----------------------------------------------------------------------------------------- input scale
def test_unnormalized_input_fires_at_once_above_the_bound():
    d = HealthDetector(patience=5)
    assert d.input_scale(0, "fc", "layer `fc`", 20.0) == []  # strict
    assert d.input_scale(1, "fc", "layer `fc`", INF) == []  # not finite: not a scale
    (f,) = d.input_scale(2, "fc", "layer `fc`", 127.5)
    assert (f.kind, f.layer, f.step, f.value) == ("unnormalized_input", "fc", 2, 127.5)
    assert f.message == ("step 2: layer `fc`: its input has std 128 (> 20) — unnormalized inputs; "
                         + REMEDY["unnormalized_input"])
    assert d.findings == [f]
    assert d.input_scale(3, "fc", "layer `fc`", 127.5) == []
    assert d.input_scale(4, "fc", "layer `fc`", 1.0) == []
    assert len(d.input_scale(5, "fc", "layer `fc`", 127.5)) == 1  # re-armed after one clear step
    assert len(d.input_scale(6, "conv", "layer `conv`", 127.5)) == 1  # each layer on its own


# ----------------------------------------------------------------------------------------- training progress
def _curve(d, values, every=10, steps=None):
    out = []
    for i, v in enumerate(values):
        out += d.update_loss(i * every, v, steps=steps)
    return out


def test_not_converging_message():
    d = HealthDetector()
    values = [2.0, 2.0, 1.95, 1.9] + [1.85] * 8
    (f,) = _curve(d, values)
    # judged from step 100 (progress_min_steps) on: the 11th window
    assert (f.kind, f.layer, f.step, f.value) == ("not_converging", "", 100, 1.85)
    assert f.message == ("step 100: the training loss is not falling: 2 → 1.85 over steps 0–100 (less than 10% lower; "
                         "best 1.85) — not converging; " + REMEDY["not_converging"])


def test_not_converging_bounds():
    # exactly 10% lower is not "less than 10% lower"
    assert _kinds(_curve(HealthDetector(), [2.0] * 10 + [1.8, 1.8])) == []
    assert _kinds(_curve(HealthDetector(), [2.0] * 10 + [1.81, 1.81])) == ["not_converging"]
    # the best of the last two windows counts, not the last one
    assert _kinds(_curve(HealthDetector(), [2.0] * 10 + [1.7, 1.9])) == []
    (f,) = _curve(HealthDetector(), [2.0] * 8 + [1.81, 1.9, 1.9])
    assert (f.kind, f.value) == ("not_converging", 1.9)  # "now": the last two windows, not the three before
    # the best window exactly 10% lower is not "less than 10% lower", even when the last two are higher
    assert _kinds(_curve(HealthDetector(), [2.0] * 8 + [1.8, 1.9, 1.9])) == []
    # small losses too (a first window below 1)
    assert _kinds(_curve(HealthDetector(), [0.5] * 12)) == ["not_converging"]
    # once the loss was ever 10% lower, a rise back is not "not converging" (it is a plateau)
    assert "not_converging" not in _kinds(_curve(HealthDetector(), [2.0, 1.5] + [2.0] * 10))
    # not before progress_min_steps, nor before 4 windows
    assert _curve(HealthDetector(), [2.0] * 10) == []
    assert _curve(HealthDetector(progress_min_steps=0), [2.0] * 3) == []
    assert _kinds(_curve(HealthDetector(progress_min_steps=0), [2.0] * 4)) == ["not_converging"]
    assert _kinds(_curve(HealthDetector(progress_min_steps=30), [2.0] * 4)) == ["not_converging"]  # step 30 counts


def test_plateau_message():
    d = HealthDetector()
    values = [2.0, 1.6, 1.4, 1.3, 1.25, 1.2] + [1.19] * 6
    (f,) = _curve(d, values)
    # judged from step 100 (11 windows): the last q = 4; before them the best was 1.19 (window 6), the last 4
    # best 1.19: less than 10% better
    assert (f.kind, f.layer, f.step, f.value) == ("plateau", "", 100, 1.19)
    assert f.message == (
        "step 100: the training loss fell from 2 to 1.19, then improved less than 10% over the last 4 logging windows "
        "(steps 70–100, now 1.19, still above half the start) — plateau; " + REMEDY["plateau"])


def test_plateau_bounds():
    # below half the start: converged far enough, not a plateau
    assert _kinds(_curve(HealthDetector(), [2.0, 1.5, 1.2, 1.0] + [0.99] * 8)) == []
    assert _kinds(_curve(HealthDetector(), [2.0, 1.5, 1.2, 1.01] + [1.005] * 8)) == ["plateau"]
    # still improving by more than 10% over the last quarter
    assert _kinds(_curve(HealthDetector(), [2.0, 1.9, 1.8, 1.7, 1.6, 1.55, 1.5, 1.45, 1.4, 1.3, 1.25, 1.2])) == []
    # q = max(4, n // 4): a loss falling 3% a window (11.5% over 4) until window 15, which drops 12%, then flat.
    # With 20 windows the last 5 still hold that drop (not stalled); with 21 the last 5 are flat: plateau
    values = [2.0 * 0.97**i for i in range(15)] + [2.0 * 0.97**14 * 0.88] * 6
    assert [(f.kind, f.step) for f in _curve(HealthDetector(), values[:20])] == []
    assert [(f.kind, f.step) for f in _curve(HealthDetector(), values)] == [("plateau", 200)]
    # judged as soon as there are 2·q windows
    values = [2.0, 1.5, 1.4, 1.3, 1.3, 1.3, 1.3, 1.3, 1.3]
    assert [(f.kind, f.step) for f in _curve(HealthDetector(progress_min_steps=0), values)] == [("plateau", 70)]
    # the recent best is the last q windows' (a negative log-likelihood can go below 0 before them)
    values = [2.0, 1.9, 1.8, 1.7, -1.0, 1.5, 1.5, 1.5, 1.5]
    assert [(f.kind, f.step) for f in _curve(HealthDetector(progress_min_steps=0), values)] == [("plateau", 80)]
    # a first window at or below 0 gives no relative scale: no plateau
    assert _curve(HealthDetector(progress_min_steps=0), [0.0, -1.0] + [0.5] * 9) == []
    # small losses too
    assert _kinds(_curve(HealthDetector(), [0.25 * v for v in [2.0, 1.6, 1.4, 1.3, 1.25, 1.2] + [1.19] * 6])) == ["plateau"]
    # a best window exactly 10% below the first is not "fell"
    assert _curve(HealthDetector(), [2.0, 1.8] + [1.9] * 10) == []
    # exactly 10% better than before is enough
    values = [2.0, 1.5] + [1.25] * 6 + [1.125] * 4
    assert _kinds(_curve(HealthDetector(), values)) == []
    values = [2.0, 1.5] + [1.25] * 6 + [1.126] * 4
    assert _kinds(_curve(HealthDetector(), values)) == ["plateau"]


def test_oscillation_message_and_count():
    d = HealthDetector()
    values = [2.0] + [1.0, 1.4] * 5 + [1.0]
    (f,) = _curve(d, values)
    # judged from step 100 (11 windows): peaks at windows 2, 4, 6, 8, each followed by a trough 0.4 lower = 20% of
    # the start; 4 >= 25% of 11 windows; said once
    assert (f.kind, f.layer, f.step, f.value) == ("oscillation", "", 100, 4.0)
    assert f.message == ("step 100: the training loss swings up and down: 4 peak-to-trough falls of more than 5% of "
                         "the starting loss in the last 11 logging windows (1 → 1.4 → 1 → 1.4 → 1 → 1.4) — oscillating "
                         "loss; " + REMEDY["oscillation"])


def test_swings_count_peak_to_trough_falls_relative_to_the_start():
    d = HealthDetector(oscillation_amplitude=0.05)
    assert d._swings([1.0, 2.0, 1.0, 2.0, 1.0, 2.0], 10.0) == 2  # falls of 1 = 10% of 10
    assert d._swings([1.0, 2.0, 1.0, 2.0, 1.0], 10.0) == 1  # the last value is no trough (nothing after it)
    assert d._swings([1.0, 2.0, 1.0, 2.0, 1.0, 2.0], 20.0) == 0  # falls of 1 = exactly 5% of 20: not more
    assert d._swings([1.0, 2.0, 1.0, 2.0, 1.0, 2.0], 0.0) == 0  # no scale: nothing counts
    assert d._swings([3.0, 2.0, 1.0, 0.5], 1.0) == 0  # monotone: no peak inside
    assert d._swings([1.0, 3.0, 2.5, 2.0, 0.0], 1.0) == 0  # a peak with no trough after it
    # the first trough after a peak counts, not the deepest
    assert d._swings([0.0, 1.0, 0.99, 1.0, 0.0, 0.5], 1.0) == 1
    assert d._swings([2.0, 1.0, 1.0, 1.0], 1.0) == 0  # ties are peaks and troughs, but fall by 0
    assert d._swings([0.0, 1.0, 1.0, 0.0, 0.5], 1.0) == 2  # both ends of a flat top are peaks
    assert d._swings([0.0, 1.0, 2.0, 0.0, 0.5], 1.0) == 1  # a rising point is no peak
    assert d._swings([0.0, 1.0, 1.0, 1.0, 0.0, 0.5], 1.0) == 2  # a flat point is no trough of itself


def test_oscillation_needs_six_windows_and_the_rate():
    six = [2.0, 2.5, 1.0, 2.5, 1.0, 1.5]  # 2 swings (peaks at 1 and 3) only once the 6th window is there
    assert "oscillation" not in _kinds(_curve(HealthDetector(progress_min_steps=0), six[:5]))
    (f,) = [f for f in _curve(HealthDetector(progress_min_steps=0), six) if f.kind == "oscillation"]
    assert (f.step, f.value) == (50, 2.0)
    # 2 swings in 12 windows is below a rate of 0.25 (3 needed), enough for 0.125 (2 needed)
    few = [2.0, 1.8, 1.9, 1.6, 1.5, 1.4, 1.3, 1.4, 1.1, 1.0, 0.9, 0.95]
    assert HealthDetector()._swings(few, 2.0) == 2
    assert "oscillation" not in _kinds(_curve(HealthDetector(progress_min_steps=0), few))
    got = [f for f in _curve(HealthDetector(progress_min_steps=0, oscillation_rate=0.125), few) if f.kind == "oscillation"]
    assert [(f.step, f.value) for f in got] == [(110, 2.0)]


def test_oscillation_counts_the_last_twelve_windows():
    # 13 windows judged once (at step 120): the swing from window 1 to 2 is outside the last 12; the two after it
    # are below the 3 that 12 windows need
    values = [2.0, 2.0, 1.0, 1.5, 1.0, 1.5] + [1.0] * 7
    assert HealthDetector()._swings(values, 2.0) == 3 and HealthDetector()._swings(values[-12:], 2.0) == 2
    assert _curve(HealthDetector(progress_min_steps=120), values) == []


def test_loss_windows_are_pooled_to_min_window_steps():
    d = HealthDetector(min_window_steps=10)
    assert d.update_loss(1, 4.0, steps=4) == [] and d.state_dict()["losses"] == []
    assert d.update_loss(2, 1.0, steps=4) == [] and d.state_dict()["loss_buffer"] == [20.0, 8.0]
    d.update_loss(3, 2.0, steps=2)  # 10 steps: one window, the step-weighted mean (16 + 4 + 4) / 10
    assert d.state_dict()["losses"] == [[3, 2.4]] and d.state_dict()["loss_buffer"] == [0.0, 0.0]
    d.update_loss(4, 7.0, steps=10)
    d.update_loss(5, 3.0)  # a full window
    assert d.state_dict()["losses"] == [[3, 2.4], [4, 7.0], [5, 3.0]]


def test_a_nonfinite_loss_stops_the_progress_rules():
    d = HealthDetector(progress_min_steps=0)
    assert d.update_loss(0, NAN) == [] and d.state_dict()["losses"] == []
    d.update_loss(1, 2.0, nonfinite_step=1)
    assert d.loss_nonfinite_step == 1 and d.state_dict()["losses"] == []
    d.update_loss(2, 2.0, nonfinite_step=2)
    assert d.loss_nonfinite_step == 1  # the first one is kept
    assert _curve(d, [2.0] * 6) == []


# ----------------------------------------------------------------------------------------- frozen layers
def test_frozen_between_trained_layers_message_and_majority():
    d = HealthDetector()
    layers = [("a", "layer `a`", True, True), ("n", "norm `n`", False, False), ("b", "layer `b`", True, False),
              ("c", "layer `c`", True, True)]
    (f,) = d.frozen(5, layers)
    assert (f.kind, f.layer, f.step, f.value) == ("frozen", "b", 5, 0.0)
    assert f.message == ("step 5: layer `b`: never updates — requires_grad=False on a layer between trained layers "
                         "(frozen by mistake?); " + REMEDY["frozen"])
    assert d.findings == [f]
    assert d.frozen(6, layers) == []  # said once
    half = [("a", "a", True, True), ("b", "b", True, False), ("c", "c", True, False), ("d", "d", True, True)]
    assert HealthDetector().frozen(0, half) == []  # half trained: adapters, not a mistake
    three = [("a", "a", True, True), ("b", "b", True, False), ("c", "c", True, True), ("d", "d", True, True)]
    assert [f.layer for f in HealthDetector().frozen(0, three)] == ["b"]
    two = [("a", "a", True, True), ("b", "b", True, False), ("c", "c", True, False), ("d", "d", True, True),
           ("e", "e", True, True), ("f", "f", True, True)]
    assert [f.layer for f in HealthDetector().frozen(0, two)] == ["b", "c"]  # each layer on its own


def test_not_in_optimizer_message():
    d = HealthDetector()
    out = d.not_in_optimizer(0, [("x", "layer `x`"), ("y", "layer `y`")])
    assert [(f.kind, f.layer, f.step, f.value) for f in out] == [("frozen", "x", 0, 0.0), ("frozen", "y", 0, 0.0)]
    assert out[0].message == ("step 0: layer `x`: never updates — its parameters require grad but no optimizer holds "
                              "them; " + REMEDY["frozen"])
    assert d.findings == out
    assert d.not_in_optimizer(1, [("x", "layer `x`")]) == []


# ----------------------------------------------------------------------------------------- summary and state
def test_summary_lines():
    assert HealthDetector().summary() == ("gradguard: no gradient problems found (no training loss seen, progress not "
                                          "checked)")
    d = HealthDetector()
    d.update_loss(0, 2.5)
    d.update_loss(10, 1.5)
    d.update_loss(20, 0.75)
    assert d.summary() == "gradguard: no gradient problems found, and the training loss is falling (2.5 → 0.75)"
    d = HealthDetector(patience=1)
    for s in range(3):
        d.update(s, [_row("r", 1.0, dead_frac=0.9 if s != 1 else 0.1)], 1.0)
    d.input_scale(4, "fc", "layer `fc`", 50.0)
    d.update_loss(0, 1.0)
    lines = d.summary().splitlines()
    assert lines[0] == "gradguard findings (3):"
    assert lines[1] == f"- dead_relu at `r`: 2x, first at step 0: {d.findings[0].message}"
    assert lines[2] == f"- unnormalized_input at `fc`: 1x, first at step 4: {d.findings[2].message}"
    d2 = HealthDetector()
    d2.findings.append(Finding("plateau", "", 9, 1.0, "m"))
    assert d2.summary() == "gradguard findings (1):\n- plateau: 1x, first at step 9: m"


def test_state_dict_round_trip_continues_exactly():
    d = HealthDetector(patience=2, min_window_steps=10)
    for s, t in enumerate([1.0, 10.0, 100.0]):
        d.update(s, [_row("a", 1.0, dead_frac=0.9)], t)
    d.update_loss(3, 2.0, steps=4)
    d.update_loss(4, 2.0, steps=10)
    d.update_loss(5, 3.0, nonfinite_step=5)
    state = d.state_dict()
    assert state["tracks"]["dead:a"] == {"streak": 3, "clear": 0, "fired": True}
    assert state["last_total"] == 100.0 and state["growth_streak"] == 2
    assert state["loss_nonfinite_step"] == 5
    # the checkpoint format: one track per rule and layer, under these names
    assert sorted(state["tracks"]) == ["dead:a", "exploding", "nonfinite", "update_ratio", "vanishing"]
    nc = HealthDetector(progress_min_steps=0)
    _curve(nc, [2.0] * 4)
    assert list(nc.state_dict()["tracks"]) == ["not_converging"]
    pl = HealthDetector()
    _curve(pl, [2.0, 1.6, 1.4, 1.3, 1.25, 1.2] + [1.19] * 6)
    assert list(pl.state_dict()["tracks"]) == ["plateau"]
    osc = HealthDetector()
    _curve(osc, [2.0] + [1.0, 1.4] * 5 + [1.0])
    assert list(osc.state_dict()["tracks"]) == ["oscillation"]
    assert state["findings"] == [f.as_dict() for f in d.findings] and state["findings"][0]["kind"] == "dead_relu"
    e = HealthDetector(patience=2, min_window_steps=10)
    e.load_state_dict(state)
    assert e.state_dict() == state
    assert e.tracks == d.tracks and e.findings == d.findings and e.totals == d.totals and e.losses == d.losses
    assert isinstance(e.totals[0], tuple) and isinstance(e.losses[0], tuple)
    # the restored one continues as the original would: dead:a is not reported again; a third ×10 growth of the
    # total norm completes the exploding rule's patience (streaks and the last total restored)
    assert [(f.kind, f.layer) for f in e.update(3, [_row("a", 1.0, dead_frac=0.9)], 1000.0)] == \
        [(f.kind, f.layer) for f in d.update(3, [_row("a", 1.0, dead_frac=0.9)], 1000.0)] == [("exploding", "a")]
    # an old checkpoint without these keys gives a fresh detector
    f = HealthDetector()
    f.load_state_dict({})
    assert f.state_dict() == HealthDetector().state_dict()


def test_state_dict_restores_the_loss_buffer():
    d = HealthDetector(min_window_steps=10)
    d.update_loss(0, 1.0, steps=5)
    e = HealthDetector(min_window_steps=10)
    e.load_state_dict(d.state_dict())
    e.update_loss(1, 3.0, steps=5)
    assert e.state_dict()["losses"] == [[1, 2.0]]


def test_finding_as_dict():
    assert Finding("k", "l", 3, 1.5, "m").as_dict() == {"kind": "k", "layer": "l", "step": 3, "value": 1.5,
                                                        "message": "m"}
    assert math.isnan(Finding("k", "l", 3, NAN, "m").as_dict()["value"])


@pytest.mark.parametrize("patience", [1, 3])
def test_update_records_findings_in_order(patience):
    d = HealthDetector(patience=patience)
    out = []
    for s in range(patience):
        out += d.update(s, [_row("r", 1.0, dead_frac=0.9, saturated_frac=0.9)], 1.0)
    assert d.findings == out and _kinds(out) == ["dead_relu", "saturation"]
