"""Trials for the doctor: candidate remedy sets trained side by side on copies of a model, within one budget.

Torch only. :class:`ModelTrials` is the trial runner :func:`lightning_gradguard.doctor.decide` races
candidates with; any object with the same ``start`` / ``charge`` / ``units_left`` methods works (a test can
pass a scripted one).

The budget is counted in *passes*: a training step of a trial (forward, backward, optimizer step) costs 1,
a forward pass on one held-out batch costs 1/3 (no backward), a probe batch (forward and backward) costs 1.
Everything else the doctor does (copying the model, the surgery of each candidate, finding its layers,
initializing it) can be counted too (``count_overhead=True``, as GradGuard does by default), converted into
passes at the measured rate of the trials' training steps: its seconds over the median seconds of a training
step so far. So the budget bounds the doctor's whole cost, not only its passes, and a machine that is
uniformly slower or more loaded gives about the same budget (both sides of the ratio slow down together); the
decision can still differ slightly from run to run, as the ratio is measured. That overhead is sampled
(:meth:`ModelTrials.note_overhead`) between rungs, never during one, so a rung planned to fit is not cut
short by the bookkeeping between its steps. With ``count_overhead=False`` only passes count and the decision
is deterministic (GradGuard does this when ``budget_steps`` sets the passes). ``budget_seconds`` is a wall-clock
upper bound on top, for a model much slower than expected.

Example:
    >>> import torch, torch.nn.functional as F
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    >>> x = torch.randn(192, 16); data = [(x[i:i + 32], x[i:i + 32, :4].argmax(1)) for i in range(0, 192, 32)]
    >>> heldout, train_batches = data[:2], data[2:]
    >>> loss_fn = lambda m, batch, i: F.cross_entropy(m(batch[0]), batch[1])
    >>> make_optimizer = lambda m: torch.optim.SGD(m.parameters(), lr=0.05)
    >>> trials = ModelTrials(model, iter(train_batches * 10), heldout, loss_fn, make_optimizer, budget_units=60)
    >>> run = trials.start({"init": {"scheme": "auto"}})
    >>> run.train(8)
    >>> len(run.evaluate())   # one loss per held-out batch
    2
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from lightning_gradguard.graph import LayerInfo, find_layers

#: the cost of a forward pass without backward relative to a training step (forward + backward + step)
EVAL_COST = 1.0 / 3.0

LossFn = Callable[[nn.Module, Any, int], torch.Tensor]
OptFn = Callable[[nn.Module], torch.optim.Optimizer]


class BudgetSpent(RuntimeError):
    """Raised by :meth:`ModelTrials.charge` when a pass would exceed the budget (passes or seconds)."""


class BatchCache:
    """The training batches every trial sees, in the same order: drawn once from ``batches`` (an iterator over
    one pass of the training data, after the held-out batches), then reused from the start when that pass
    ends, so no trial ever trains on a held-out batch."""

    def __init__(self, batches: Iterator[Any]) -> None:
        self._source: Optional[Iterator[Any]] = batches
        self._cache: list[Any] = []

    def __getitem__(self, step: int) -> Any:
        while self._source is not None and step >= len(self._cache):
            try:
                self._cache.append(next(self._source))
            except StopIteration:
                self._source = None
        if not self._cache:
            raise RuntimeError("GradGuard: no training batch left for the trials after the held-out batches; "
                               "lower probe_batches or use more training data")
        return self._cache[step % len(self._cache)]


class TrialRun:
    """One candidate remedy set: a copy of the model with the remedies applied, its optimizer, its clipper, its
    own random stream (so trials can be interleaved and still differ only by their remedies)."""

    def __init__(self, trials: "ModelTrials", remedies: dict[str, dict[str, Any]]) -> None:
        from lightning_gradguard.remedies import apply_remedies, make_clipper

        self.trials, self.remedies = trials, remedies
        self.steps = 0
        self.diverged = False
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(trials.seed)
            template, owned = trials.take_structure(remedies)
            self.model = template if owned else copy.deepcopy(template, dict(trials.memo))
            if "init" in remedies:  # force=True skips the loaded-weights check when it is known to keep nothing
                init = {**remedies["init"], "force": remedies["init"].get("force") or trials.init_keeps_nothing}
                apply_remedies(self.model, {"init": init}, seed=trials.seed, layers=trials.layers_of(remedies, self.model))
            self.optimizer = trials.make_optimizer(self.model)
            self.clip = make_clipper(self.model, remedies["clipping"]) if "clipping" in remedies else None
            self._rng = torch.get_rng_state()

    def train(self, steps: int) -> None:
        """``steps`` more optimizer steps on the shared batch sequence; stops early once the loss is not finite.
        Raises :class:`BudgetSpent` before a step the budget does not cover."""
        self.model.train()
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._rng)
            try:
                for _ in range(steps):
                    if self.diverged:
                        return
                    self.trials.charge(1.0)
                    start = time.perf_counter()
                    try:
                        batch = self.trials.train_batches[self.steps]
                        self.optimizer.zero_grad(set_to_none=True)
                        loss = self.trials.loss_fn(self.model, batch, self.steps)
                        self.steps += 1
                        if not torch.isfinite(loss.detach()):
                            self.diverged = True
                            return
                        loss.backward()
                        if self.clip is not None:
                            self.clip()
                        self.optimizer.step()
                    finally:
                        self.trials.timed(1.0, time.perf_counter() - start, rate=True)
            finally:
                self._rng = torch.get_rng_state()

    def evaluate(self) -> list[float]:
        """The loss on each held-out batch (training mode, so BatchNorm uses batch statistics as in training;
        no gradient); ``inf`` for every batch once the trial diverged."""
        n = len(self.trials.heldout)
        if self.diverged:
            return [math.inf] * n
        self.trials.charge(EVAL_COST * n)
        self.model.train()
        out = []
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.set_rng_state(self._rng)
            for i, batch in enumerate(self.trials.heldout):
                value = float(self.trials.loss_fn(self.model, batch, i).detach())
                out.append(value if math.isfinite(value) else math.inf)
        self.trials.timed(EVAL_COST * n, time.perf_counter() - start, rate=False)
        if not all(math.isfinite(v) for v in out):
            self.diverged = True
        return out

    def close(self) -> None:
        """Free the copy."""
        del self.model, self.optimizer, self.clip


class ModelTrials:
    """The trial runner: starts :class:`TrialRun` s of ``model`` and counts every pass against the budget.

    Args:
        model: the model as it is before any remedy (it is copied, never changed).
        train_batches: the training batches, as a :class:`BatchCache` or a plain iterator.
        heldout: the held-out batches the trials are scored on (never trained on).
        loss_fn: ``loss_fn(model, batch, index) -> loss``.
        make_optimizer: ``make_optimizer(model) -> optimizer`` (the user's optimizer for a copy).
        budget_units: passes allowed, counted as described in the module docstring.
        budget_seconds: wall-clock upper bound, from ``started``.
        seed: the seed every trial starts from.
        memo: a ``copy.deepcopy`` memo (objects shared, not copied: e.g. the Trainer a module points to).
        spent_units: passes already spent (the probe).
        started: ``time.perf_counter()`` when the doctor's work began (default: now); the time since then that
            no pass took is the overhead.
        spent_seconds: the seconds the ``spent_units`` passes took (not overhead; the rate overhead is
            converted at comes from the trials' own passes).
        count_overhead: count copies, surgery and bookkeeping against the budget (module docstring); off by
            default (only passes count, deterministic); GradGuard turns it on unless ``budget_steps`` is set.
    """

    def __init__(self, model: nn.Module, train_batches: Any, heldout: Sequence[Any], loss_fn: LossFn,
                 make_optimizer: OptFn, budget_units: float, budget_seconds: float = math.inf, seed: int = 0,
                 memo: Optional[dict] = None, spent_units: float = 0.0, started: Optional[float] = None,
                 spent_seconds: float = 0.0, count_overhead: bool = False) -> None:
        self.model, self.heldout, self.loss_fn, self.make_optimizer = model, list(heldout), loss_fn, make_optimizer
        self.train_batches = train_batches if isinstance(train_batches, BatchCache) else BatchCache(iter(train_batches))
        self.budget_units, self.budget_seconds, self.seed = float(budget_units), float(budget_seconds), seed
        self.memo = memo or {}
        self.spent_units = float(spent_units)
        self.started = time.perf_counter() if started is None else float(started)
        self.count_overhead = bool(count_overhead)
        #: seconds of the passes (the probe's and the trials'), which are not overhead
        self.pass_seconds = max(0.0, float(spent_seconds))
        #: the seconds of each of the trials' training steps: their median is the rate overhead is converted at (the
        #: median, so the first steps of a fresh copy, which allocate, do not set it; the probe's passes, slower
        #: for their hooks, are not used: they would make the overhead look cheaper than it is)
        self.step_seconds: list[float] = []
        #: the overhead in passes and in seconds, as last sampled by :meth:`note_overhead`
        self.overhead_units = 0.0
        self.overhead_seconds = 0.0
        self._structures: dict[str, nn.Module] = {}
        self._layers: dict[str, list[LayerInfo]] = {}
        self._uses: dict[str, int] = {}
        #: the caller checked that init keeps no layer as loaded/trained (so trials may skip that check)
        self.init_keeps_nothing = False

    def units_left(self) -> float:
        return self.budget_units - self.spent_units - self.overhead_units

    def eval_cost(self) -> float:
        return EVAL_COST * len(self.heldout)

    def timed(self, units: float, seconds: float, rate: bool) -> None:
        """Record that trial passes worth ``units`` took ``seconds`` (not overhead); ``rate``: they are training
        steps, whose seconds per step are the rate overhead is converted at (a pass is a training step; the 1/3
        of a held-out forward pass is a convention, not a measurement)."""
        self.pass_seconds += seconds
        if rate:
            self.step_seconds.append(seconds / units)

    def note_overhead(self) -> float:
        """Sample the overhead: the seconds since ``started`` that no timed pass took, and those seconds in passes
        (:meth:`units_of`); returns the passes."""
        self.overhead_seconds = max(0.0, time.perf_counter() - self.started - self.pass_seconds)
        self.overhead_units = self.units_of(self.overhead_seconds)
        return self.overhead_units

    def units_of(self, seconds: float) -> float:
        """``seconds`` of overhead in passes: over the median seconds of a trial's training step (0 while no step
        was timed, or with ``count_overhead=False``)."""
        if not self.count_overhead or not self.step_seconds:
            return 0.0
        step = statistics.median(self.step_seconds)
        return seconds / step if step > 0 else 0.0

    def charge(self, units: float) -> None:
        """Count ``units`` passes; :class:`BudgetSpent` if they and the overhead exceed the budget, or the seconds
        are spent."""
        if self.spent_units + self.overhead_units + units > self.budget_units + 1e-9:
            over = f" + {self.overhead_units:.1f} of copies, surgery and setup" if self.overhead_units else ""
            raise BudgetSpent(f"{self.spent_units + units:.1f} passes{over} > budget {self.budget_units:.1f}")
        if time.perf_counter() - self.started > self.budget_seconds:
            raise BudgetSpent(f"budget_seconds={self.budget_seconds:g} spent")
        self.spent_units += units

    @staticmethod
    def _key(remedies: dict[str, dict[str, Any]]) -> str:
        return repr(sorted((k, v) for k, v in remedies.items() if k in ("activation", "batchnorm")))

    def structure(self, remedies: dict[str, dict[str, Any]]) -> nn.Module:
        """The model with the structural remedies (activation replacement, BatchNorm) of ``remedies`` applied,
        built once per structure and cached (the surgery traces the model, which costs more than a few steps)."""
        from lightning_gradguard.remedies import apply_remedies

        structural = {k: v for k, v in remedies.items() if k in ("activation", "batchnorm")}
        key = self._key(remedies)
        if key not in self._structures:
            if not structural:
                self._structures[key] = self.model
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self.seed)
                    built = copy.deepcopy(self.model, dict(self.memo))
                    apply_remedies(built, structural, seed=self.seed)
                self._structures[key] = built
        return self._structures[key]

    def expect(self, sets: Sequence[dict[str, dict[str, Any]]]) -> None:
        """The candidate sets about to start: a structure that only one of them uses is handed to that trial
        instead of being copied once more (see :meth:`take_structure`)."""
        self._uses = {}
        for remedies in sets:
            key = self._key(remedies)
            self._uses[key] = self._uses.get(key, 0) + 1

    def take_structure(self, remedies: dict[str, dict[str, Any]]) -> tuple[nn.Module, bool]:
        """The structure of ``remedies`` and whether the trial owns it (its last expected user, and not the
        model itself: no copy needed) or must copy it."""
        key = self._key(remedies)
        structure = self.structure(remedies)
        self._uses[key] = self._uses.get(key, 0) - 1
        if structure is self.model or self._uses[key] != 0:
            return structure, False
        if "init" in remedies:
            self.layers_of(remedies, structure)  # found on the structure before it changes hands
        del self._structures[key]
        return structure, True

    def layers_of(self, remedies: dict[str, dict[str, Any]], model: nn.Module) -> Optional[list[LayerInfo]]:
        """``find_layers`` of a copy of the structure of ``remedies``: found once on the structure (a trace), then
        pointed at the copy's modules by name (``None``, so init finds them itself, if a name is not a module)."""
        key = self._key(remedies)
        if key not in self._layers:
            self._layers[key] = find_layers(self.structure(remedies))
        try:
            return [dataclasses.replace(info, module=model.get_submodule(info.name)) for info in self._layers[key]]
        except AttributeError:
            return None

    def close(self) -> None:
        """Free the cached structures."""
        self._structures.clear()
        self._layers.clear()

    def start(self, remedies: dict[str, dict[str, Any]]) -> TrialRun:
        return TrialRun(self, remedies)
