"""The doctor: probe a model on real batches, race candidate remedy sets, keep what measurably helps.

Torch only. :func:`decide` is the whole decision: probe results and a trial runner in
(:class:`lightning_gradguard.trials.ModelTrials`), a :class:`Diagnosis` out (the decision table, the remedies
to apply, the race). :class:`lightning_gradguard.GradGuard` gathers the batches and calls it; a user
without Lightning calls :func:`probe` and :func:`decide` directly.

How it decides:

1. **Candidates.** Every combination of the remedies that are ``auto`` (init ``auto``; BatchNorm before each
   activation; activation replacement, sigmoid/tanh to ``saturating_target`` and the ReLU family (ReLU,
   ReLU6, LeakyReLU and the smooth GELU, SiLU, Mish, Hardswish) to ``dead_target``,
   when the model has such activations), the ``force`` ones in every set, the ``off`` ones in none. No
   statistic removes a candidate: BatchNorm is a candidate even when the gradient flow looks balanced.
2. **Order.** The budget may not cover every set. They are raced in this order: no remedy (the reference),
   then the standard recipe from the top (init + BatchNorm + activation; init + BatchNorm; init), then the
   other combinations, those whose remedies the probe flags (flow ratio off by more than ``flow_threshold``,
   saturated or dead units above their thresholds) first. The statistics only order; the loss decides.
3. **Race** (successive halving, Jamieson & Talwalkar 2016; Li et al. 2017, Hyperband). Every candidate
   trains ``trial_steps`` steps on the same batches from the same seed, then is scored on the *held-out*
   probe batches (never trained on); the better half goes on, training twice as long in total, until two
   are left, which share what remains of the budget. As many candidates enter as the budget covers at
   this schedule.
4. **Noise.** Two scores are compared batch by batch: B beats A when its mean held-out loss is lower by more
   than ``noise_z`` standard errors of the per-batch differences, and by at least ``margin`` (relative).
   Between the two finalists the smaller set wins unless the larger one beats it.
5. **Do no harm.** The winner is kept only when it beats no remedy (at the last rung where both were
   scored) beyond that noise, or when no remedy does not learn at all and the winner does; otherwise nothing
   is applied. *Learning* means the held-out loss falls beyond noise since the first rung (since the start
   for a candidate that ran one rung): a fall from a high start (large logits collapsing to chance in the
   first steps) that then stalls or rises again is not learning. While the reference learns, a set whose loss
   never fell since its own start is not kept for a lower loss (it starts lower, e.g. near-uniform outputs
   after init, and learns nothing). When nothing learns within the budget while no
   remedy does not learn either, the fullest raced set of the recipe is applied (a net that does not learn
   cannot be harmed).
6. **Clipping** is by rule, as part of every candidate: a recurrent layer, non-finite gradients, a
   gradient norm > ``exploding_norm``, a spike max/median > ``spike_factor`` over the probe batches. When
   every candidate diverges in the first rung, clipping joins all of them and the race starts again with the
   budget that is left.

The budget (passes, see :mod:`lightning_gradguard.trials`) is checked before every pass of every trial,
the no-remedy and init trials included; a candidate the budget did not cover is reported as not raced. When
the runner counts its copies and surgery as passes, the candidates enter one by one, each through its first
rung: the first two always (the least a decision needs; their copies and surgery count, but only once both
ran their first rung), a later one while its start (as dear as the dearest so far; for the first two, both
starts together), its first rung and the later rungs of all who entered still fit; when a start turned out
dearer than that, the last entrants stop at their first rung. The overhead is sampled between rungs, never
during one, so what the bookkeeping after the last sample costs can take the total a little past the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from lightning_gradguard.activations import RELU_FAMILY, SATURATING_BOUNDS
from lightning_gradguard.probe import Probe, probe  # noqa: F401  (probe: re-exported, the doctor's first step)

LossFn = Callable[[nn.Module, Any, int], torch.Tensor]
OptFn = Callable[[nn.Module], torch.optim.Optimizer]


@dataclass
class Decision:
    """One row of the decision table."""

    remedy: str
    status: str  # applied / not applied / suggested / forced / off / untried
    measurement: str
    options: dict[str, Any] = field(default_factory=dict)


def fmt(x: float) -> str:
    return "diverged" if not math.isfinite(x) else f"{x:.3g}"


# ------------------------------------------------------------------------------------------- deciding
REMEDIES = ("init", "batchnorm", "activation")  # raced; clipping is by rule (module docstring, step 6)


@dataclass
class DoctorOptions:
    """What :func:`decide` may do and its thresholds (``GradGuard``'s arguments of the same names)."""

    modes: dict[str, str] = field(default_factory=lambda: {r: "auto" for r in (*REMEDIES, "clipping")})
    architecture_changes: bool = True
    saturating_target: str = "elu"
    dead_target: str = "elu"
    clip_algorithm: str = "percentile"
    flow_threshold: float = 1e-3
    saturation_threshold: float = 0.3
    dead_threshold: float = 0.3
    spike_factor: float = 10.0
    exploding_norm: float = 1e3
    margin: float = 0.02
    noise_z: float = 2.0
    trial_steps: int = 6
    init_blocked: Optional[str] = None  # why init cannot be tried (every weight frozen or loaded), else None


@dataclass
class RaceRow:
    """One candidate's race: its held-out losses after each rung it ran (``steps`` optimizer steps each)."""

    name: str
    remedies: dict[str, dict[str, Any]]
    steps: list[int] = field(default_factory=list)
    scores: list[list[float]] = field(default_factory=list)

    @property
    def score(self) -> float:
        return _mean(self.scores[-1]) if self.scores else math.inf


@dataclass
class Diagnosis:
    """What :func:`decide` returns: the decision table, the remedies to apply and the race behind them."""

    decisions: list[Decision]
    remedies: dict[str, dict[str, Any]]
    race: list[RaceRow]
    units: float  # passes spent (probe + trials)
    budget_units: float
    winner: str = "no remedy"
    overhead_units: float = 0.0  # copies, surgery and bookkeeping, in passes (lightning_gradguard.trials)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.inf


def beats(b: Sequence[float], a: Sequence[float], z: float, margin: float) -> bool:
    """Held-out losses ``b`` are lower than ``a`` (same batches) beyond noise: the mean paired difference is below
    ``-z`` standard errors and below ``-margin`` × mean(``a``). A finite ``b`` beats a diverged ``a``."""
    if not all(math.isfinite(x) for x in b):
        return False
    if not all(math.isfinite(x) for x in a):
        return True
    diffs = [y - x for x, y in zip(a, b)]
    n = len(diffs)
    mean = sum(diffs) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else 0.0
    return mean < -z * se and mean < -margin * abs(_mean(a))


#: ReLU relatives that activation replacement maps to ``dead_target`` along with :data:`RELU_FAMILY`
SMOOTH_RELUS = ("leaky_relu", "gelu", "silu", "mish", "hardswish")


def activation_mapping(probe_: Probe, options: DoctorOptions) -> dict[str, str]:
    """The replacement for each activation of the model that activation replacement can improve."""
    present = {a for a in probe_.activations.values() if a}
    mapping = {a: options.saturating_target for a in SATURATING_BOUNDS if a in present}
    # the ReLU family and its smooth relatives (GELU, SiLU, Mish, Hardswish) pass almost nothing for negative
    # inputs, so a deep stack of them can die like ReLU; ELU keeps a negative branch with gradient
    mapping.update({a: options.dead_target for a in (*RELU_FAMILY, *SMOOTH_RELUS) if a in present})
    return {k: v for k, v in mapping.items() if k != v}


def clip_reasons(probe_: Probe, options: DoctorOptions) -> list[str]:
    """Why clipping is needed by rule (empty: it is not)."""
    reasons = []
    if probe_.recurrent:
        reasons.append("recurrent layer")
    if probe_.nonfinite:
        reasons.append("non-finite gradients")
    big = max((n for n in probe_.total_norms if math.isfinite(n)), default=0.0)
    if big > options.exploding_norm:
        reasons.append(f"grad norm {big:.3g} > {options.exploding_norm:g}")
    if probe_.spike > options.spike_factor:
        reasons.append(f"norm spike ×{probe_.spike:.3g}")
    return reasons


def flags(probe_: Probe, options: DoctorOptions) -> dict[str, str]:
    """The remedies the probe statistics point to, with the measurement (used to order candidates only)."""
    out = {"init": "always tried first"}
    flow = probe_.flow_ratio
    if not probe_.normalized and (flow < options.flow_threshold or flow > 1 / options.flow_threshold):
        out["batchnorm"] = f"flow ratio {flow:.2g}"
    act = []
    if probe_.max_saturated > options.saturation_threshold:
        act.append(f"saturated {probe_.max_saturated:.0%}")
    if probe_.max_dead > options.dead_threshold:
        act.append(f"dead units {probe_.max_dead:.0%}")
    if act:
        out["activation"] = ", ".join(act)
    return out


def candidates(probe_: Probe, options: DoctorOptions) -> list[dict[str, dict[str, Any]]]:
    """The candidate remedy sets in race order (module docstring, steps 1-2); the first is the reference."""
    mapping = activation_mapping(probe_, options)
    choices: dict[str, list[bool]] = {}
    for r in REMEDIES:
        mode = options.modes[r]
        possible = {"init": options.init_blocked is None, "batchnorm": not probe_.normalized, "activation": bool(mapping)}[r]
        choices[r] = [True] if mode == "force" and possible else ([False, True] if mode == "auto" and possible else [False])
    options_of = {"init": {"scheme": "auto", **({"force": True} if options.modes["init"] == "force" else {})},
                  "batchnorm": {"position": "before_activation"}, "activation": {"mapping": mapping}}
    flagged = flags(probe_, options)
    # the recipe ladder from the top: the full recipe first, then with one remedy less at a time; the race's
    # subset preference (step 4) drops what does not measurably help
    ladder = [(), ("init", "batchnorm", "activation"), ("init", "batchnorm"), ("init",)]
    sets = []
    for i in range(8):
        chosen = tuple(r for j, r in enumerate(REMEDIES) if i >> j & 1)
        if all(choices[r] == [True] or (r in chosen) in choices[r] for r in REMEDIES):
            chosen = tuple(r for r in REMEDIES if r in chosen or choices[r] == [True])
            if chosen not in sets:
                sets.append(chosen)

    def order(s: tuple[str, ...]) -> tuple:
        # the reference first; then the recipe ladder; then the others, those covering flagged remedies first
        base = tuple(r for r in REMEDIES if choices[r] == [True])
        return (s != base, s not in ladder, ladder.index(s) if s in ladder else 0,
                -sum(r in flagged for r in s if r != "init"), len(s), s)

    return [{r: dict(options_of[r]) for r in s} for s in sorted(sets, key=order)]


def rungs_cost(k: int, trial_steps: int, eval_cost: float) -> float:
    """The passes of the schedule's rungs for ``k`` candidates (after each was scored once before training): the
    first rung is ``trial_steps`` long, each next one doubles the steps of the better half, down to two
    finalists; each rung ends with a score."""
    cost, alive, done, steps = 0.0, k, 0, trial_steps
    while True:
        cost += alive * (steps - done) + alive * eval_cost
        if alive <= 2:
            return cost
        alive, done, steps = (alive + 1) // 2, steps, steps * 2


def plan(n: int, trial_steps: int, eval_cost: float, units: float) -> int:
    """How many candidates the schedule can race within ``units`` passes (0 or 1: no race): each is scored once
    before training, then the rungs (:func:`rungs_cost`)."""
    for k in range(n, 1, -1):
        if k * eval_cost + rungs_cost(k, trial_steps, eval_cost) <= units:
            return k
    return 0


def learning(row: "RaceRow", z: float, margin: float) -> bool:
    """The candidate's held-out loss is falling beyond noise: since its first rung when it ran two rungs or more,
    else since its start. A fall from a high start alone is not learning: huge logits (a large init) collapse
    to chance in the first steps, and a loss that then stalls, or rises again, is not learning."""
    if len(row.scores) > 2:
        return beats(row.scores[-1], row.scores[1], z, margin)
    return len(row.scores) > 1 and beats(row.scores[-1], row.scores[0], z, margin)


def survivors(alive: list["RaceRow"], options: DoctorOptions) -> list["RaceRow"]:
    """The better half by held-out loss; the last place goes to the best-scoring candidate whose loss is
    falling, when the one ranked there is not (a set that starts high, e.g. larger logits after BatchNorm, but
    learns is not dropped for its start). Ranked by the loss reached, not by the size of the fall: a fall is
    largest from the worst start."""
    keep = (len(alive) + 1) // 2
    ranked = sorted(alive, key=lambda r: r.score)
    chosen, rest = ranked[: keep - 1], ranked[keep - 1 :]
    fallers = [r for r in rest if learning(r, options.noise_z, options.margin)]
    return chosen + [fallers[0] if fallers else rest[0]]


def name_of(remedies: dict[str, Any]) -> str:
    return "+".join(r for r in (*REMEDIES, "clipping") if r in remedies) or "no remedy"


def race(trials: Any, sets: list[dict[str, dict[str, Any]]], options: DoctorOptions) -> tuple[list[RaceRow], Optional[str]]:
    """Successive halving over ``sets`` (module docstring, step 3); returns every row and why it stopped early
    (``None``: it ran to the end). Rows of sets the budget did not cover have no scores."""
    from lightning_gradguard.trials import BudgetSpent

    rows = [RaceRow(name_of(s), s) for s in sets]
    note = getattr(trials, "note_overhead", lambda: 0.0)  # copies and surgery, counted when the runner counts them
    before = note()  # what came before the race (e.g. fetching the held-out batches) is not a start's cost
    before_seconds = getattr(trials, "overhead_seconds", None)
    steps, eval_cost = options.trial_steps, trials.eval_cost()
    n = plan(len(rows), steps, eval_cost, trials.units_left())
    entrants, runs, stop = rows[:n], {}, None
    if hasattr(trials, "expect"):
        trials.expect([row.remedies for row in entrants])

    def later(k: int) -> float:  # the rungs after the first, for k candidates
        return rungs_cost(k, steps, eval_cost) - k * (steps + eval_cost)

    alive: list[RaceRow] = []
    try:
        # one by one, each through its first rung. The first two (no remedy and the first recipe) are the least a
        # decision needs: their copies and surgery are counted only after both ran their first rung, so they
        # cannot stop it (passes and the wall-clock cap still can). A later one enters only while its start, as
        # dear as the dearest so far (for the first two: both starts together), its first rung and the later
        # rungs of all who entered fit in what is left.
        starts: list[float] = []  # what starting a candidate cost (copy, surgery, first score), in passes
        for row in entrants:
            left = trials.units_left()
            if len(alive) >= 2 and max(starts) + steps + eval_cost + later(len(alive) + 1) > left + 1e-9:
                break
            trials.charge(0.0)  # the wall-clock cap, before the copy and surgery
            run = runs[row.name] = trials.start(row.remedies)
            row.steps.append(0)
            row.scores.append(run.evaluate())
            if len(alive) >= 2:
                note()
                starts.append(left - trials.units_left())
            alive.append(row)
            run.train(steps)
            row.steps.append(steps)
            row.scores.append(run.evaluate())
            if len(alive) == 2:  # both starts together, as the estimate of one more (the dearer one is unknown)
                after = note()
                pair = (trials.units_of(trials.overhead_seconds - before_seconds) if before_seconds is not None
                        else after - before)
                starts.append(pair + eval_cost)
            elif len(alive) > 2:
                note()
        while len(alive) > 2 and later(len(alive)) > trials.units_left():
            alive.pop()  # the starts cost more than planned: the last entered goes no further than its first rung

        def rung(target: int) -> None:
            for row in alive:
                run = runs[row.name]
                run.train(target - run.steps)
                row.steps.append(target)
                row.scores.append(run.evaluate())

        target = steps
        while len(alive) > 2:  # the better half trains twice as long in total
            alive, target = survivors(alive, options), target * 2
            if len(alive) > 2:
                note()  # the bookkeeping since the last sample, before the rung (never during one)
                rung(target)
        note()
        share = int(trials.units_left() / 2 - eval_cost)
        if len(alive) == 2 and share >= 1:  # the finalists share what is left (the plan leaves at least ``target``)
            rung(alive[0].steps[-1] + share)
    except BudgetSpent as spent:
        stop = str(spent)
    finally:
        for run in runs.values():
            run.close()
        trials.close()
    for row in rows:  # a rung cut short by the budget does not count
        del row.steps[len(row.scores):]
    return rows, stop


def _compare_at(a: RaceRow, b: RaceRow) -> Optional[int]:
    """The most steps after which both ``a`` and ``b`` were scored (``None``: only before training)."""
    common = [s for s in a.steps if s in b.steps and s > 0]
    return None if not common else common[-1]


def _fell(row: RaceRow, z: float, m: float) -> bool:
    """The held-out loss fell beyond noise since the row's start (before any training)."""
    return len(row.scores) > 1 and beats(row.scores[-1], row.scores[0], z, m)


def _smallest_unbeaten(rows: list[RaceRow], z: float, m: float) -> RaceRow:
    """The lowest held-out loss of ``rows`` (sorted by it), or a smaller set of remedies that it does not beat."""
    best = rows[0]
    for other in rows[1:]:
        if set(other.remedies) < set(best.remedies) and not beats(best.scores[-1], other.scores[-1], z, m):
            best = other
    return best


def pick(rows: list[RaceRow], options: DoctorOptions) -> tuple[RaceRow, RaceRow, str]:
    """The winner of a finished race (module docstring, steps 4-5): ``(chosen, reference, why)``."""
    ref = rows[0]
    z, m = options.noise_z, options.margin
    scored = [r for r in rows if len(r.scores) > 1]
    if not scored:
        return ref, ref, "no candidate trained within the budget"
    last = max(r.steps[-1] for r in scored)
    finalists = sorted([r for r in scored if r.steps[-1] == last], key=lambda r: r.score)
    # while the reference (no remedy) learns, a set whose held-out loss never fell since its own start is not kept
    # for a lower loss: the lower loss is where it started (e.g. near-uniform outputs after init), not learning
    still = [r for r in finalists if r is not ref and learning(ref, z, m) and not _fell(r, z, m)]
    best = _smallest_unbeaten([r for r in finalists if r not in still], z, m)
    steps = _compare_at(best, ref) if best is not ref else None
    if steps is not None:
        b, a = best.scores[best.steps.index(steps)], ref.scores[ref.steps.index(steps)]
        if beats(b, a, z, m):
            return best, ref, f"held-out loss {fmt(_mean(b))} vs {fmt(_mean(a))} without remedy after {steps} steps"
    if not learning(ref, z, m):  # no remedy does not learn: a finalist that does is kept, even from a higher start
        ref_text = f"held-out loss {fmt(_mean(ref.scores[0]))} at start, " + ", ".join(
            f"{fmt(_mean(v))} after {s}" for s, v in zip(ref.steps[1:], ref.scores[1:]))
        learners = [r for r in finalists if r is not ref and learning(r, z, m)]
        if learners:
            best = _smallest_unbeaten(learners, z, m)
            return best, ref, (f"no remedy does not learn ({ref_text}), '{best.name}' does (" + ", ".join(
                f"{fmt(_mean(v))} after {s}" for s, v in zip(best.steps, best.scores)) + ")")
        # nothing learned within the budget: a net that does not learn cannot be harmed, so the fullest raced
        # set of the recipe ladder (the candidates' order) is applied
        full = next((r for r in scored if r is not ref and "init" in r.remedies), None)
        if full is not None:
            return full, ref, (f"no remedy does not learn ({ref_text}) and no candidate learned within the "
                               "budget: the fullest raced recipe")
    if best is ref and still and still[0].score < ref.score:
        r = still[0]
        return ref, ref, (f"'{r.name}' has a lower held-out loss ({fmt(r.score)} vs {fmt(ref.score)}) but did not learn "
                          f"({fmt(_mean(r.scores[0]))} at start), while no remedy does ({fmt(_mean(ref.scores[0]))} → "
                          f"{fmt(ref.score)})")
    if best is ref:
        return ref, ref, "no candidate beat no remedy beyond noise"
    if steps is None:
        return ref, ref, f"'{best.name}' and no remedy were not scored after the same steps"
    b, a = best.scores[best.steps.index(steps)], ref.scores[ref.steps.index(steps)]
    return ref, ref, f"best '{best.name}' {fmt(_mean(b))} vs {fmt(_mean(a))} without remedy after {steps} steps: within noise"


def decide(probe_: Probe, trials: Any, options: DoctorOptions) -> Diagnosis:
    """Race the candidate remedy sets of a probed model and decide (module docstring).

    Args:
        probe_: :func:`probe` of the model, on the held-out batches the trials are scored on.
        trials: the trial runner (:class:`lightning_gradguard.trials.ModelTrials`) over the same model.
        options: modes, targets, thresholds, ``trial_steps``.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from torch import nn
        >>> from lightning_gradguard.trials import ModelTrials
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(*[m for i in range(8) for m in (nn.Linear(32 if i else 16, 32), nn.Sigmoid())], nn.Linear(32, 4))
        >>> x = torch.randn(256, 16); data = [(x[i:i + 32], x[i:i + 32, :4].argmax(1)) for i in range(0, 256, 32)]
        >>> heldout, batches = data[:2], data[2:]
        >>> loss_fn = lambda m, batch, i: F.cross_entropy(m(batch[0]), batch[1])
        >>> make_optimizer = lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        >>> p = probe(model, heldout, loss_fn)
        >>> trials = ModelTrials(model, iter(batches * 20), heldout, loss_fn, make_optimizer, budget_units=60)
        >>> diagnosis = decide(p, trials, DoctorOptions())
        >>> sorted(diagnosis.remedies) == sorted(set(diagnosis.remedies))  # e.g. ['batchnorm', 'init']
        True
    """
    clip_mode = options.modes["clipping"]
    reasons = clip_reasons(probe_, options) if clip_mode == "auto" else []
    clip = clip_mode == "force" or bool(reasons)
    # the probe measured the weights as they are: a set that re-initializes them gets clipping by rule only for a
    # recurrent layer (or when forced); the norms measured say nothing about the new weights
    every_set = clip_mode == "force" or probe_.recurrent
    clip_opts = {"algorithm": options.clip_algorithm}
    sets = candidates(probe_, options)

    def with_clip(ss: list[dict], all_sets: bool) -> list[dict]:
        return [{**s, "clipping": dict(clip_opts)} if all_sets or "init" not in s else s for s in ss]

    rows, stop = race(trials, with_clip(sets, every_set) if clip else sets, options)
    scored = [r for r in rows if len(r.scores) > 1]
    no_rerace = False
    if scored and not clip and clip_mode == "auto" and all(not math.isfinite(r.scores[1][0]) for r in scored):
        reasons.append(f"every candidate diverged in {options.trial_steps} steps without clipping")
        clip = True
        first = rows
        rows, stop = race(trials, with_clip(sets, True), options)
        scored = [r for r in rows if len(r.scores) > 1]
        if len(scored) < 2:  # the budget left covers no race with clipping: the diverged race is the record
            rows, no_rerace = first, True
    if len(scored) >= 2:
        chosen, _, why = pick(rows, options)
    else:
        chosen = rows[0]
        why = ("every candidate diverged without clipping, and the budget left covers no race with clipping"
               if no_rerace else f"not raced: the budget ({trials.budget_units:.0f} passes) covers fewer than 2 candidates")
    if stop and len(scored) >= 2:
        why += f" (race stopped early: {stop})"
    decisions = _decisions(rows, chosen, why, probe_, options)
    clip_status = "forced" if clip_mode == "force" else ("applied" if clip else ("off" if clip_mode == "off" else "not applied"))
    clip_text = ", ".join(reasons) or ("forced" if clip_mode == "force" else
                                      f"no rule fired (max/median norm {probe_.spike:.3g}, not recurrent, finite)")
    decisions.append(Decision("clipping", clip_status, clip_text, dict(clip_opts) if clip else {}))
    clip = "clipping" in chosen.remedies or (clip and chosen is rows[0] and "init" not in chosen.remedies)
    if not clip and clip_mode == "auto" and reasons:
        decisions[-1] = Decision("clipping", "not applied", ", ".join(reasons) + f" before init; the chosen set "
                                 f"'{chosen.name}' re-initializes the weights")
    elif clip and decisions[-1].status == "not applied":
        decisions[-1] = Decision("clipping", "applied", ", ".join(reasons), dict(clip_opts))
    remedies = {k: v for k, v in chosen.remedies.items() if k != "clipping"}
    if not options.architecture_changes:
        remedies = {k: v for k, v in remedies.items() if k == "init"}
    if clip:
        remedies["clipping"] = dict(clip_opts)
    return Diagnosis(decisions, remedies, rows, trials.spent_units, trials.budget_units, chosen.name,
                     getattr(trials, "note_overhead", lambda: 0.0)())


def _decisions(rows: list[RaceRow], chosen: RaceRow, why: str, probe_: Probe, options: DoctorOptions) -> list[Decision]:
    flagged = flags(probe_, options)
    out = []
    raced = [r for r in rows if len(r.scores) > 1]
    for remedy in REMEDIES:
        mode = options.modes[remedy]
        with_it = [r for r in rows if remedy in r.remedies]
        stat = flagged.get(remedy, "")
        stat = f"{stat}; " if stat and remedy != "init" else ""
        if mode == "off":
            out.append(Decision(remedy, "off", "turned off"))
            continue
        if not with_it:
            reason = {"init": options.init_blocked or "", "batchnorm": "the model already has normalization layers",
                      "activation": "no sigmoid, tanh or ReLU to replace"}[remedy]
            out.append(Decision(remedy, "not applied", reason))
            continue
        if remedy in chosen.remedies:
            status = "forced" if mode == "force" else "applied"
            if remedy != "init" and not options.architecture_changes:
                status = "suggested (architecture_changes=False)"
            out.append(Decision(remedy, status, f"{stat}winner '{chosen.name}': {why}", dict(chosen.remedies[remedy])))
            continue
        tried = [r for r in with_it if len(r.scores) > 1]
        if not tried:
            out.append(Decision(remedy, "untried", f"{stat}not raced: the budget covered {len(raced)} of {len(rows)} "
                                "candidate sets"))
            continue
        best = min(tried, key=lambda r: (-len(r.scores), r.score))
        out.append(Decision(remedy, "not applied", f"{stat}best set with it '{best.name}' {fmt(best.score)} after "
                            f"{best.steps[-1]} steps; chosen '{chosen.name}': {why}"))
    return out


def race_table(diagnosis: Diagnosis) -> list[tuple[str, str]]:
    """``(candidate, held-out loss after each rung)`` rows for printing."""
    return [(r.name, "  ".join(f"{s}:{fmt(_mean(v))}" for s, v in zip(r.steps, r.scores)) or "not raced (budget)")
            for r in diagnosis.race]
