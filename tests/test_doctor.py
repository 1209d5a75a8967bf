"""The doctor as a plain torch function: ``probe`` + ``ModelTrials`` + ``decide``, no Lightning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_gradguard.doctor import DoctorOptions, RaceRow, beats, candidates, decide, learning, pick, plan, probe, survivors
from lightning_gradguard.trials import BudgetSpent, ModelTrials


def _data(n=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = (x[:, :4].argmax(1))  # a learnable rule
    return [(x[i:i + 32], y[i:i + 32]) for i in range(0, n, 32)]


def _loss(model, batch, index):
    return F.cross_entropy(model(batch[0]), batch[1])


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def _mlp(depth, act, std=None):
    torch.manual_seed(0)
    layers = []
    for i in range(depth):
        layers += [nn.Linear(16 if i == 0 else 32, 32), act()]
    model = nn.Sequential(*layers, nn.Linear(32, 4))
    if std is not None:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Linear):
                    m.weight.normal_(0, std)
                    m.bias.zero_()
    return model


def _decide(model, budget, **options):
    batches = _data()
    heldout, train = batches[:2], batches[2:]
    p = probe(model, heldout, _loss)
    trials = ModelTrials(model, iter(train), heldout, _loss, _sgd, budget_units=budget, spent_units=len(heldout))
    return p, trials, decide(p, trials, DoctorOptions(**options))


def test_beats_needs_more_than_the_noise_of_the_paired_differences():
    a = [2.0, 2.2, 1.8, 2.0]
    assert beats([1.0, 1.2, 0.8, 1.0], a, z=2.0, margin=0.02)
    assert not beats([1.9, 2.3, 1.7, 2.0], a, z=2.0, margin=0.02)  # lower on average, within noise
    assert not beats([1.99, 2.19, 1.79, 1.99], a, z=2.0, margin=0.02)  # consistent but under the 2% margin
    assert beats([2.5, 2.5], [math.inf, math.inf], 2.0, 0.02) and not beats([math.inf], [1.0], 2.0, 0.02)


def test_batchnorm_is_a_candidate_even_when_the_flow_looks_balanced():
    model = _mlp(2, nn.Tanh)
    p = probe(model, _data()[:2], _loss)
    assert 1e-3 < p.flow_ratio < 1e3
    sets = candidates(p, DoctorOptions())
    assert any("batchnorm" in s for s in sets) and sets[0] == {}
    assert any(s.get("activation", {}).get("mapping") == {"tanh": "elu"} for s in sets)


def _row(name, remedies, steps, means, spread=0.01):
    """A race row with two held-out batches per score, ``mean ± spread``."""
    return RaceRow(name, {r: {} for r in remedies}, list(steps), [[m - spread, m + spread] for m in means])


def test_a_fall_from_a_high_start_that_then_stalls_or_rises_is_not_learning():
    opts = DoctorOptions()
    z, m = opts.noise_z, opts.margin
    assert learning(_row("init", ["init"], [0, 6], [16.1, 2.84]), z, m)  # one rung: the fall from the start counts
    assert not learning(_row("init", ["init"], [0, 6, 13], [16.1, 2.84, 4.53]), z, m)  # rises after the first rung
    assert not learning(_row("ref", [], [0, 6, 13], [15.6, 2.41, 2.40]), z, m)  # collapsed to chance, then stalls
    assert learning(_row("bn", ["batchnorm"], [0, 6, 13], [2.9, 2.2, 1.6]), z, m)


def test_the_last_survivor_place_goes_to_the_best_loss_that_falls_not_to_the_biggest_fall():
    ref = _row("no remedy", [], [0, 6], [2.30, 2.30])
    bn = _row("init+batchnorm", ["init", "batchnorm"], [0, 6], [2.75, 2.37])
    init = _row("init", ["init"], [0, 6], [16.1, 2.84])  # the biggest fall, from the worst start
    assert [r.name for r in survivors([ref, bn, init], DoctorOptions())] == ["no remedy", "init+batchnorm"]


def test_pick_when_no_remedy_does_not_learn():
    opts = DoctorOptions()
    ref = _row("no remedy", [], [0, 6, 13], [2.30, 2.30, 2.30])
    rising = _row("init", ["init"], [0, 6, 13], [16.1, 2.84, 4.53])
    chosen, _, why = pick([ref, rising], opts)
    assert chosen is rising and "fullest raced recipe" in why  # nothing learns: a net at chance cannot be harmed
    # a finalist that learns is kept even from a higher start
    slow = _row("init+batchnorm", ["init", "batchnorm"], [0, 6, 13], [2.75, 2.40, 2.28])  # not 2% under no remedy yet
    chosen, _, why = pick([ref, slow], opts)
    assert chosen is slow and "does not learn" in why
    # one that has already reached a low loss and stalls there is kept over a worse one still falling
    done = _row("init+batchnorm+activation", ["init", "batchnorm", "activation"], [0, 6, 13], [2.9, 0.50, 0.49])
    chosen, _, why = pick([ref, done, slow], opts)
    assert chosen is done and "without remedy" in why
    # nothing learns, no remedy neither: the fullest raced recipe (first in race order) is applied
    flat = _row("init+batchnorm+activation", ["init", "batchnorm", "activation"], [0, 6, 13], [2.30, 2.39, 2.38])
    chosen, _, why = pick([_row("no remedy", [], [0, 6, 13], [15.6, 2.41, 2.40]), flat], opts)
    assert chosen is flat and "fullest raced recipe" in why


def test_a_lower_loss_that_never_fell_does_not_beat_a_reference_that_learns():
    # the vanilla ReLU RNN of the zoo: after init the outputs are near uniform (loss ~ln 4) and stay there, while
    # clipping alone starts confidently wrong and learns
    ref = _row("clipping", [], [0, 6, 12], [2.66, 1.91, 1.66])
    flat = _row("init+batchnorm+clipping", ["init", "batchnorm"], [0, 6, 12], [1.42, 1.41, 1.41])
    chosen, _, why = pick([ref, flat], DoctorOptions())
    assert chosen is ref and "did not learn" in why
    learns = _row("init+batchnorm+clipping", ["init", "batchnorm"], [0, 6, 12], [1.42, 1.30, 1.10])
    assert pick([ref, learns], DoctorOptions())[0] is learns  # the same start, but it learns: kept


def test_plan_fits_the_budget():
    assert plan(8, 6, 2 / 3, 10) == 0  # not even two candidates
    n = plan(8, 6, 2 / 3, 40)
    assert n >= 2 and plan(8, 6, 2 / 3, 400) == 8


def test_deep_sigmoid_gets_a_remedy_and_the_budget_holds():
    model = _mlp(12, nn.Sigmoid)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p, trials, diagnosis = _decide(model, budget=60)
    assert diagnosis.remedies, diagnosis.decisions  # a 12-layer sigmoid net at chance gets something
    assert diagnosis.units <= 60 and trials.spent_units == diagnosis.units
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # trials train copies only
    rows = {r.name: r for r in diagnosis.race}
    assert len(rows["no remedy"].scores) >= 2  # the reference is raced (do no harm)


def test_healthy_net_keeps_no_remedy_or_a_gain_beyond_noise():
    model = _mlp(1, nn.ReLU)
    _, _, diagnosis = _decide(model, budget=60)
    winner = next(r for r in diagnosis.race if r.name == diagnosis.winner)
    if diagnosis.winner != "no remedy":  # only for a held-out gain beyond noise at the same step count
        ref = diagnosis.race[0]
        steps = max(s for s in winner.steps if s in ref.steps and s > 0)
        assert beats(winner.scores[winner.steps.index(steps)], ref.scores[ref.steps.index(steps)], 2.0, 0.02)


def test_too_small_a_budget_races_nothing_and_says_so():
    _, _, diagnosis = _decide(_mlp(6, nn.Tanh), budget=6)
    assert diagnosis.remedies == {}
    assert all(d.status in ("untried", "not applied") for d in diagnosis.decisions)
    assert any("budget" in d.measurement for d in diagnosis.decisions)


def test_every_pass_is_charged():
    model = _mlp(2, nn.ReLU)
    batches = _data()
    trials = ModelTrials(model, iter(batches[2:]), batches[:2], _loss, _sgd, budget_units=5)
    run = trials.start({})
    run.train(4)
    assert trials.spent_units == 4
    with pytest.raises(BudgetSpent):
        run.train(2)  # the 6th pass would exceed 5
    assert run.steps == 5


# ---------------------------------------------------------------- overhead (copies, surgery) in the budget
def test_copies_and_surgery_count_against_the_budget_when_asked(monkeypatch):
    """``count_overhead=True``: time outside the passes (here an optimizer factory that takes as long as 15
    training steps, as a slow surgery would) is charged at the trials' measured seconds per step. The race then
    admits fewer candidates than when only passes count, every candidate it admits runs its first rung, and
    passes plus overhead stay within the budget. A fake clock (each loss computation 1 s, the factory 15 s)
    makes the arithmetic exact: the trials read the clock, nothing else is faked."""
    from lightning_gradguard import trials as trials_module

    model = _mlp(12, nn.Sigmoid)
    batches = _data()
    heldout, train = batches[:2], batches[2:]
    p = probe(model, heldout, _loss)
    now = [0.0]
    monkeypatch.setattr(trials_module.time, "perf_counter", lambda: now[0])

    def timed_loss(m, batch, index):
        now[0] += 1.0
        return _loss(m, batch, index)

    def slow_sgd(m):
        now[0] += 15.0
        return _sgd(m)

    out = {}
    for count in (False, True):
        trials = ModelTrials(model, iter(train), heldout, timed_loss, slow_sgd, budget_units=120, spent_units=2,
                             count_overhead=count)
        out[count] = decide(p, trials, DoctorOptions())
    raced = {k: [r for r in d.race if r.scores] for k, d in out.items()}
    assert out[False].overhead_units == 0 and len(raced[False]) == 8 and out[False].units <= 120
    # 118 passes left: each start costs 15 + its first score, its first rung 6 + a score; a fifth start and the
    # later rungs of five (45 passes) would not fit in the 29 left after four
    assert out[True].overhead_units == pytest.approx(4 * 15.0)
    assert len(raced[True]) == 4 and all(len(r.scores) >= 2 for r in raced[True])
    assert out[True].units + out[True].overhead_units <= 120


class _ScriptedTrials:
    """A trial runner whose starts cost fixed overhead (no clock): the race's start rule, deterministically."""

    def __init__(self, budget, start_costs):
        self.budget, self.spent, self.overhead, self.costs = budget, 0.0, 0.0, list(start_costs)
        self.started = []

    @property
    def spent_units(self):
        return self.spent

    @property
    def budget_units(self):
        return self.budget

    def eval_cost(self):
        return 2 / 3

    def units_left(self):
        return self.budget - self.spent - self.overhead

    def note_overhead(self):
        return self.overhead

    def charge(self, units):
        if self.spent + self.overhead + units > self.budget + 1e-9:
            raise BudgetSpent("spent")
        self.spent += units

    def start(self, remedies):
        self.overhead += self.costs[len(self.started)]
        self.started.append(remedies)
        trials, quality = self, 1.0 + 0.1 * len(self.started)

        class _Run:
            steps = 0

            def train(self, n):
                for _ in range(n):
                    trials.charge(1.0)
                    self.steps += 1

            def evaluate(self):
                trials.charge(2 / 3)
                return [quality + 2.0 / (1 + self.steps), quality + 2.1 / (1 + self.steps)]

            def close(self):
                pass

        return _Run()

    def close(self):
        pass


def test_dear_starts_admit_fewer_candidates_and_stop_the_last_entered_after_its_first_rung():
    from lightning_gradguard.doctor import race

    sets = [{}, {"init": {}}, {"init": {}, "batchnorm": {}}, {"batchnorm": {}}, {"activation": {}}]
    # 66 passes, a first rung of 6 steps: the plan (cheap starts) covers four candidates. The second start costs
    # 25: a third, as dear, would not leave the later rungs, so only two enter, and they share the rest
    trials = _ScriptedTrials(budget=66, start_costs=[1, 25, 1, 1, 1])
    rows, stop = race(trials, sets, DoctorOptions())
    assert len(trials.started) == 2 and [bool(r.scores) for r in rows] == [True, True, False, False, False]
    assert rows[0].steps == rows[1].steps and rows[0].steps[:2] == [0, 6] and rows[0].steps[-1] > 6 and stop is None
    assert trials.spent + trials.overhead <= 66
    # the fourth start costs 25 (the first three cost 1, so it was admitted): after its first rung too little is
    # left for four (or three) candidates' later rungs, so the last entered stop at their first rung
    trials = _ScriptedTrials(budget=66, start_costs=[1, 1, 1, 25, 1])
    rows, stop = race(trials, sets, DoctorOptions())
    assert len(trials.started) == 4 and [len(r.scores) for r in rows] == [3, 3, 2, 2, 0] and stop is None
    assert trials.spent + trials.overhead <= 66
    # with cheap starts and 100 passes all five race through their first rung and the three best on
    cheap = _ScriptedTrials(budget=100, start_costs=[1] * 5)
    rows, _ = race(cheap, sets, DoctorOptions())
    assert all(len(r.scores) >= 2 for r in rows) and sum(len(r.scores) > 2 for r in rows) == 3


def test_a_clipping_re_race_the_budget_cannot_cover_keeps_the_diverged_race_and_says_so():
    class _Diverging(_ScriptedTrials):
        def start(self, remedies):
            run = super().start(remedies)
            score = run.evaluate

            def evaluate():
                out = score()
                return [math.inf, math.inf] if run.steps else out

            run.evaluate = evaluate
            return run

    p = probe(_mlp(4, nn.Sigmoid), _data()[:2], _loss)
    trials = _Diverging(budget=2 * (2 / 3) + 2 * (6 + 2 / 3) + 0.3, start_costs=[0.0] * 16)  # one two-way race
    diagnosis = decide(p, trials, DoctorOptions())
    raced = [r for r in diagnosis.race if r.scores]
    assert len(raced) == 2 and all(not math.isfinite(r.scores[1][0]) for r in raced)  # the diverged race, kept
    assert "clipping" not in raced[1].remedies  # the first race's rows, not the re-race's
    texts = " ".join(d.measurement for d in diagnosis.decisions)
    assert "budget left covers no race with clipping" in texts and "not raced" not in texts
    assert "clipping" in diagnosis.remedies  # every candidate diverged: clipping by rule
