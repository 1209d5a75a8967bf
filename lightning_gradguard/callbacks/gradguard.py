"""``GradGuard``: one callback that probes the model, decides the remedies, applies them and explains."""

from __future__ import annotations

import copy
import os
import time
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from lightning_gradguard._text import markdown_table, text_table
from lightning_gradguard._validation import check_bool, check_choice, check_number
from lightning_gradguard.activations import SATURATING_BOUNDS
from lightning_gradguard.callbacks._common import run_when_model_exists, train_dataloader
from lightning_gradguard.callbacks._lightning_internals import checkpoint_path_in_setup, logging_muted
from lightning_gradguard.callbacks.activation_replacement import ActivationReplacement
from lightning_gradguard.callbacks.batchnorm_insertion import BatchNormInsertion
from lightning_gradguard.callbacks.gradient_clipping import GradientClipping
from lightning_gradguard.callbacks.gradient_monitor import GradientMonitor
from lightning_gradguard.callbacks.weight_init import WeightInitialization
from lightning_gradguard.doctor import Decision, apply_remedies, clip_options, fmt, probe, trial
from lightning_gradguard.reporting import log_markdown, print_table, progress_bar

MODES = ("auto", "force", "off")
TARGETS = ("elu", "leaky_relu", "selu", "prelu", "rrelu", "gelu", "silu")
#: the sub-callbacks, in the order they act (surgery before init, as the individual callbacks also do)
SUB_ORDER = ("activation", "batchnorm", "init", "clipping", "monitor")
#: where one hook needs another order: the monitor sees the gradients before clipping changes them
HOOK_ORDER = {"on_before_optimizer_step": ("monitor", "clipping")}
#: adaptive clipping algorithms compared by trial when clipping is on and ``clip_algorithm="percentile"``
CLIP_CANDIDATES = ("percentile", "agc", "zscore")  # the adaptive clippings GradGuard compares by trial


def _forwarded(hook: str) -> Any:
    """A ``GradGuard`` hook that only forwards to the sub-callbacks (see ``GradGuard._forward``)."""

    def forward(self: "GradGuard", *args: Any, **kwargs: Any) -> None:
        self._forward(hook, *args, **kwargs)

    forward.__name__ = forward.__qualname__ = hook
    forward.__doc__ = f"Forward ``{hook}`` to the sub-callbacks."
    return forward


class _Cycle:
    """Re-iterable endless stream of training batches (a new shuffled pass when one ends)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __iter__(self):
        while True:
            n = 0
            for batch in self.loader:
                n += 1
                yield batch
            if n == 0:
                return


def _first_optimizer(out: Any) -> torch.optim.Optimizer:
    """The first optimizer of whatever ``configure_optimizers`` returned."""
    if isinstance(out, torch.optim.Optimizer):
        return out
    if isinstance(out, dict):
        return _first_optimizer(out["optimizer"])
    if isinstance(out, (list, tuple)) and out:
        return _first_optimizer(out[0])
    raise TypeError(f"GradGuard: cannot find an optimizer in configure_optimizers()'s {type(out).__name__}")


def _loss_of(model: "pl.LightningModule", batch: Any, index: int) -> torch.Tensor:
    out = model.training_step(batch, index)
    if isinstance(out, dict):
        out = out["loss"]
    if not isinstance(out, torch.Tensor):
        raise TypeError("GradGuard: training_step must return the loss (a tensor or a dict with 'loss')")
    return out


class _Trials:
    """Short training runs of remedy sets on copies of the module, all from one seed (so they differ only by
    their remedies). Clipping joins every later trial once a trial diverged without it and trained with it."""

    def __init__(self, guard: "GradGuard", pl_module: "pl.LightningModule", stream: _Cycle, memo: dict,
                 seed: int, clip_on: bool, clip_reasons: list[str], bar: Any = None) -> None:
        self.guard, self.pl_module, self.stream, self.memo, self.seed = guard, pl_module, stream, memo, seed
        self.bar = bar  # a progress bar (reporting.progress_bar) counting forward/backward passes, or None
        self.clip_on, self.clip_reasons = clip_on, clip_reasons
        self.common: dict[str, dict[str, Any]] = {"clipping": {"algorithm": guard.clip_algorithm}} if clip_on else {}

    def raw(self, rem: dict[str, dict[str, Any]], steps: Optional[int] = None) -> float:
        steps = self.guard.trial_steps if steps is None else steps
        self.guard.cost_steps += steps
        if self.bar is not None:
            self.bar.set_description(f"GradGuard trial: {'+'.join(sorted(rem)) or 'no remedy'}")
        loss = trial(self.pl_module, rem, self.stream, _loss_of, lambda m: _first_optimizer(m.configure_optimizers()),
                     steps, self.seed, dict(self.memo))
        if self.bar is not None:
            self.bar.update(steps)
        return loss

    def run(self, rem: dict[str, dict[str, Any]], label: str) -> float:
        loss = self.raw({**self.common, **rem})
        algorithm = self.guard.clip_algorithm
        if loss == float("inf") and not self.common and self.guard.modes["clipping"] == "auto":
            clipped = self.raw({"clipping": {"algorithm": algorithm}, **rem})
            if clipped < float("inf"):  # diverges without clipping, trains with it: clipping from now on
                self.clip_reasons.append(f"trial '{label}' diverged without clipping, loss {fmt(clipped)} with it")
                self.common["clipping"] = {"algorithm": algorithm}
                self.clip_on = True
                return clipped
        return loss


class GradGuard(Callback):
    """Make a deep network trainable in one line: probe, decide, apply, explain.

    At the start of fit, before the optimizer exists: a few forward/backward passes on real training batches
    (no optimizer step; weights, gradients, BN statistics and RNG put back) measure per-layer gradient norms,
    the flow ratio and activation saturation/dead units; short trials of candidate remedy sets on a copy of
    the model, compared by training loss, decide which remedies to keep; the chosen ones are applied through
    the individual callbacks (``WeightInitialization``, ``BatchNormInsertion``, ``ActivationReplacement``,
    ``GradientClipping``, ``GradientMonitor``), and a decision table is printed and logged
    (``gradguard/decisions``). The rules are in :mod:`lightning_gradguard.doctor`.

    Each remedy is ``"auto"`` (decided by measurement), ``"force"`` or ``"off"``. With
    ``architecture_changes=False`` BatchNorm and activation replacement are only suggested, never applied.
    When fit resumes from a checkpoint, the decisions stored in it are re-applied (no new probe), so the
    structure matches. Probe and trials stay within ``probe_batches``, ``trial_steps`` per trial and
    ``budget_seconds``; their cost is printed at the end of fit. They run where the module is at ``setup``
    (the CPU, before Lightning moves it), calling its ``training_step`` (``self.log`` is a no-op then) and
    ``configure_optimizers`` (the first optimizer) on a deep copy: one more copy of the model in memory.
    Manual optimization is not probed (init only, by rule).

    Args:
        init, batchnorm, activation, clipping: ``auto`` / ``force`` / ``off`` for each remedy.
        monitor: add a ``GradientMonitor`` (skipped when the Trainer already has one).
        architecture_changes: allow inserting layers and swapping activations.
        saturating_target, dead_target: replacements for sigmoid/tanh and for dying ReLUs.
        clip_algorithm: ``percentile`` (AutoClip, default: then AutoClip, AGC and z-score clipping are tried
            and the best kept), ``norm``, ``value``, ``agc`` or ``zscore`` (ZClip).
        flow_threshold, saturation_threshold, dead_threshold, spike_factor, exploding_norm, margin: rule thresholds.
        probe_batches, trial_steps, budget_seconds: the budget.
        seed: seed of the trials and of the applied init; default: Lightning's ``seed_everything`` seed
            (the init then follows it as ``WeightInitialization`` does).
        verbose: print the decision table.

    Example::

        from lightning_gradguard import GradGuard
        trainer = Trainer(callbacks=[GradGuard()])
    """

    def __init__(
        self,
        init: Literal["auto", "force", "off"] = "auto",
        batchnorm: Literal["auto", "force", "off"] = "auto",
        activation: Literal["auto", "force", "off"] = "auto",
        clipping: Literal["auto", "force", "off"] = "auto",
        monitor: bool = True,
        architecture_changes: bool = True,
        saturating_target: Literal["elu", "leaky_relu", "selu", "prelu", "rrelu", "gelu", "silu"] = "elu",
        dead_target: Literal["elu", "leaky_relu", "selu", "prelu", "rrelu", "gelu", "silu"] = "leaky_relu",
        clip_algorithm: Literal["percentile", "norm", "value", "agc", "zscore"] = "percentile",
        flow_threshold: float = 1e-3,
        saturation_threshold: float = 0.3,
        dead_threshold: float = 0.3,
        spike_factor: float = 10.0,
        exploding_norm: float = 1e3,
        margin: float = 0.02,
        probe_batches: int = 4,
        trial_steps: int = 20,
        budget_seconds: float = 60.0,
        seed: Optional[int] = None,
        verbose: bool = True,
    ) -> None:
        owner = type(self).__name__
        self.modes = {k: check_choice(owner, k, v, MODES) for k, v in
                      (("init", init), ("batchnorm", batchnorm), ("activation", activation), ("clipping", clipping))}
        self.monitor = check_bool(owner, "monitor", monitor)
        self.architecture_changes = check_bool(owner, "architecture_changes", architecture_changes)
        self.saturating_target = check_choice(owner, "saturating_target", saturating_target, TARGETS)
        self.dead_target = check_choice(owner, "dead_target", dead_target, TARGETS)
        self.clip_algorithm = check_choice(owner, "clip_algorithm", clip_algorithm, ("percentile", "norm", "value", "agc", "zscore"))
        self.flow_threshold = check_number(owner, "flow_threshold", flow_threshold, min_value=0.0, max_value=1.0, min_inclusive=False)
        self.saturation_threshold = check_number(owner, "saturation_threshold", saturation_threshold, min_value=0.0, max_value=1.0)
        self.dead_threshold = check_number(owner, "dead_threshold", dead_threshold, min_value=0.0, max_value=1.0)
        self.spike_factor = check_number(owner, "spike_factor", spike_factor, min_value=1.0, min_inclusive=False)
        self.exploding_norm = check_number(owner, "exploding_norm", exploding_norm, min_value=0.0, min_inclusive=False)
        self.margin = check_number(owner, "margin", margin, min_value=0.0, max_value=1.0, max_inclusive=False)
        self.probe_batches = check_number(owner, "probe_batches", probe_batches, min_value=1, integer=True)
        self.trial_steps = check_number(owner, "trial_steps", trial_steps, min_value=4, integer=True)
        self.budget_seconds = check_number(owner, "budget_seconds", budget_seconds, min_value=0.0)
        self.seed = check_number(owner, "seed", seed, integer=True, allow_none=True)
        self.verbose = check_bool(owner, "verbose", verbose)
        self.decisions: list[Decision] = []
        self.remedies: dict[str, dict[str, Any]] = {}
        self.subs: dict[str, Callback] = {}
        self.cost_seconds = 0.0
        self.cost_steps = 0
        self._fit_started: Optional[float] = None  # for the cost share printed at the end of fit
        self._loaded_sub_states: dict[str, Any] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(modes=sorted(self.modes.items()))

    # ---------------------------------------------------------------------------------- deciding
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit" or self.subs:
            return
        self._fit_started = time.perf_counter()
        resume = checkpoint_path_in_setup(trainer)

        def act() -> None:
            if resume:
                self._from_checkpoint(resume)
            else:
                self._decide(trainer, pl_module)
            self._build_subs(trainer)
            self._forward("setup", trainer, pl_module, stage)

        run_when_model_exists(pl_module, act)

    def _from_checkpoint(self, path: str) -> None:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        state = ckpt.get("callbacks", {}).get(self.state_key)
        if state is None:
            raise RuntimeError(f"GradGuard: resuming from {path}, which holds no GradGuard state ({self.state_key}); "
                               "resume with the same GradGuard arguments it was trained with")
        self.remedies = state["remedies"]
        self.decisions = [Decision(**d) for d in state["decisions"]]

    def _decide(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        start = time.perf_counter()
        loader = train_dataloader(trainer)
        frozen = all(not p.requires_grad for p in pl_module.parameters())
        manual = not pl_module.automatic_optimization
        if loader is None or manual:
            decisions, remedies = self._decide_without_probe("manual optimization" if manual else "no training data to probe", frozen)
        else:
            with logging_muted(pl_module):  # training_step's self.log is a no-op while probing
                decisions, remedies = self._probe_and_decide(trainer, pl_module, loader, frozen, start)
        self._finish_decisions(trainer, decisions, remedies, start)

    def _decide_without_probe(self, why: str, frozen: bool) -> tuple[list[Decision], dict[str, dict[str, Any]]]:
        remedies: dict[str, dict[str, Any]] = {}
        if self.modes["init"] != "off" and not frozen:
            remedies["init"] = {"scheme": "auto"}
        decisions = [Decision("init", "applied" if "init" in remedies else "off", f"by rule ({why}: no probe)")]
        decisions += [Decision(name, "not probed", why) for name in ("batchnorm", "activation")]
        if self.modes["clipping"] == "force":
            remedies["clipping"] = {}
        decisions.append(Decision("clipping", "applied" if "clipping" in remedies else "not probed", why))
        return decisions, remedies

    def _probe_and_decide(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loader: Any, frozen: bool,
                          start: float) -> tuple[list[Decision], dict[str, dict[str, Any]]]:
        batches = []
        for i, b in enumerate(loader):
            if i >= self.probe_batches:
                break
            batches.append(b)
        memo = {id(trainer): trainer}
        # trials share one seed (so they differ only by their remedies): ours, else Lightning's, else 0
        trial_seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        spent = lambda: time.perf_counter() - start  # noqa: E731
        bar = progress_bar(trainer, "GradGuard probe", enabled=self.verbose)  # on a terminal only
        try:
            base = probe(pl_module, batches, _loss_of)
            self.cost_steps += len(batches)
            bar.update(len(batches))
            # clipping first: by rule, and part of every trial when chosen
            clip_reasons, big = self._clip_rule(base)
            clip_on = self.modes["clipping"] == "force" or (self.modes["clipping"] == "auto" and bool(clip_reasons))
            trials = _Trials(self, pl_module, _Cycle(loader), memo, trial_seed, clip_on, clip_reasons, bar)
            base_loss = trials.run({}, "no remedy")
            init_decision, best, best_loss = self._decide_init(trials, base_loss, frozen)
            after = self._probe_after(pl_module, batches, best, memo, trial_seed) if best else base  # measured after init
            decisions = [init_decision, *self._decide_architecture(trials, after, best, best_loss, spent)]
            decisions.append(self._decide_clipping(trials, best, base, big, spent))
        finally:
            bar.close()
        remedies = dict(best)
        if trials.clip_on:
            remedies["clipping"] = dict(trials.common["clipping"])
        return decisions, remedies

    def _clip_rule(self, base: Any) -> tuple[list[str], float]:
        """Why clipping is needed by rule (empty: it is not), and the largest finite probe norm."""
        reasons = []
        if base.recurrent:
            reasons.append("recurrent layer")
        if base.nonfinite:
            reasons.append("non-finite gradients")
        big = max((n for n in base.total_norms if n == n), default=0.0)
        if big > self.exploding_norm:
            reasons.append(f"grad norm {big:.3g} > {self.exploding_norm:g}")
        if base.spike > self.spike_factor:
            reasons.append(f"norm spike ×{base.spike:.3g}")
        return reasons, big

    def _decide_init(self, trials: _Trials, base_loss: float, frozen: bool) -> tuple[Decision, dict, float]:
        init_mode = self.modes["init"]
        if init_mode == "off":
            return Decision("init", "off", "turned off"), {}, base_loss
        if frozen:
            return Decision("init", "not applied", "every weight is frozen (pretrained)"), {}, base_loss
        init_loss = trials.run({"init": {"scheme": "auto"}}, "init")
        keep = init_mode == "force" or init_loss <= base_loss * (1 + self.margin)
        status = "forced" if init_mode == "force" else ("applied" if keep else "not applied")
        if init_mode == "force":
            verdict = ""
        elif keep:
            verdict = "; kept: lower" if init_loss <= base_loss else f"; kept: within the {self.margin:.0%} tolerance (margin), so not worse"
        else:
            verdict = f"; dropped: worse by more than the {self.margin:.0%} tolerance (margin)"
        decision = Decision("init", status, f"trial loss {fmt(base_loss)} → {fmt(init_loss)} ({self.trial_steps} steps){verdict}")
        return (decision, {"init": {"scheme": "auto"}}, init_loss) if keep else (decision, {}, base_loss)

    def _probe_after(self, pl_module: "pl.LightningModule", batches: list, best: dict, memo: dict, seed: int) -> Any:
        copy_ = copy.deepcopy(pl_module, dict(memo))
        apply_remedies(copy_, best, seed=seed)
        after = probe(copy_, batches, _loss_of)
        self.cost_steps += len(batches)
        del copy_
        return after

    def _architecture_candidates(self, after: Any) -> tuple[bool, str, bool, str, dict[str, str]]:
        """Whether BatchNorm and activation replacement are worth a trial, why, and the activation mapping."""
        has_saturating = any(a in SATURATING_BOUNDS for a in after.activations.values())
        bn_reason = f"flow ratio {after.flow_ratio:.2g} (threshold {self.flow_threshold:g})"
        bn_candidate = self.modes["batchnorm"] == "force" or (
            self.modes["batchnorm"] == "auto" and after.flow_ratio < self.flow_threshold)
        mapping: dict[str, str] = {}
        act_reasons = []
        if after.max_saturated > self.saturation_threshold or (has_saturating and after.flow_ratio < self.flow_threshold):
            mapping.update({"sigmoid": self.saturating_target, "tanh": self.saturating_target})
            act_reasons.append(f"saturated {after.max_saturated:.0%}, flow ratio {after.flow_ratio:.2g}")
        if after.max_dead > self.dead_threshold:
            mapping["relu"] = self.dead_target
            act_reasons.append(f"dead units {after.max_dead:.0%}")
        act_candidate = self.modes["activation"] == "force" or (self.modes["activation"] == "auto" and bool(mapping))
        if self.modes["activation"] == "force" and not mapping:
            mapping = {"sigmoid": self.saturating_target, "tanh": self.saturating_target, "relu": self.dead_target}
        return bn_candidate, bn_reason, act_candidate, "; ".join(act_reasons) or "nothing saturated or dead", mapping

    def _decide_architecture(self, trials: _Trials, after: Any, best: dict, best_loss: float,
                             spent: Any) -> list[Decision]:
        """Trial BatchNorm / activation replacement (together and alone); ``best`` gets what is kept."""
        bn_on, bn_reason, act_on, act_reason, mapping = self._architecture_candidates(after)
        bn_opts = {"position": "before_activation"}
        candidates = []
        if act_on and bn_on:
            candidates.append({"activation": {"mapping": mapping}, "batchnorm": bn_opts})
        if bn_on:
            candidates.append({"batchnorm": bn_opts})
        if act_on:
            candidates.append({"activation": {"mapping": mapping}})
        ref_loss = best_loss  # with init (when kept): what an architecture change must beat
        scores: dict[str, float] = {}
        chosen: dict[str, dict[str, Any]] = {}
        for cand in candidates:
            if spent() > self.budget_seconds:
                break
            loss = trials.run({**best, **cand}, "+".join(sorted(cand)))
            scores["+".join(sorted(cand))] = loss
            if loss < best_loss * (1 - self.margin):
                chosen, best_loss = cand, loss
        decisions = []
        for name, cand_on, reason, options in (("batchnorm", bn_on, bn_reason, bn_opts),
                                               ("activation", act_on, act_reason, {"mapping": mapping})):
            decision, picked = self._architecture_decision(name, cand_on, reason, scores, chosen, ref_loss)
            decisions.append(decision)
            if picked and self.architecture_changes:
                best[name] = chosen.get(name) or options
        return decisions

    def _architecture_decision(self, name: str, cand_on: bool, reason: str, scores: dict[str, float],
                               chosen: dict, ref_loss: float) -> tuple[Decision, bool]:
        tried = {k: v for k, v in scores.items() if name in k.split("+")}
        if self.modes[name] == "off":
            return Decision(name, "off", "turned off"), False
        if not cand_on:
            return Decision(name, "not applied", f"{reason}: not needed"), False
        if not tried:
            return Decision(name, "untried", f"{reason}; trial budget of {self.budget_seconds:g}s spent"), False
        picked = name in chosen or self.modes[name] == "force"
        status = ("forced" if self.modes[name] == "force" else "applied") if picked else "not applied"
        if picked and not self.architecture_changes:
            status = "suggested (architecture_changes=False)"
        detail = ", ".join(f"{k} {fmt(v)}" for k, v in tried.items())
        verdict = "" if self.modes[name] == "force" else (
            f"; {'' if picked else 'not '}better than {fmt(ref_loss)} by the {self.margin:.0%} margin")
        return Decision(name, status, f"{reason}; trial loss {fmt(ref_loss)} → {detail}{verdict}"), picked

    def _decide_clipping(self, trials: _Trials, best: dict, base: Any, big: float, spent: Any) -> Decision:
        mode = self.modes["clipping"]
        if trials.clip_on and mode == "auto" and self.clip_algorithm == "percentile" and spent() <= self.budget_seconds:
            # which adaptive clipping suits this model, by trial; these trials run twice as long, since
            # AutoClip and ZClip warm up first (10 and 25 steps, ZClip clipping at norm 1 meanwhile)
            clip_scores = {}
            for algo in CLIP_CANDIDATES:
                clip_scores[algo] = trials.raw({**best, "clipping": {"algorithm": algo}}, 2 * self.trial_steps)
            pick = min(clip_scores, key=lambda k: clip_scores[k])
            trials.common["clipping"] = {"algorithm": pick}
            trials.clip_reasons.append("trial loss " + ", ".join(f"{k} {fmt(v)}" for k, v in clip_scores.items()))
        status = "forced" if mode == "force" else ("applied" if trials.clip_on else ("off" if mode == "off" else "not applied"))
        return Decision("clipping", status,
                        ", ".join(trials.clip_reasons) or f"no spike (max/median {base.spike:.3g}), max norm {big:.3g}, not recurrent",
                        dict(trials.common.get("clipping", {})))

    def _finish_decisions(self, trainer: "pl.Trainer", decisions: list[Decision], remedies: dict, start: float) -> None:
        has_monitor = any(isinstance(cb, GradientMonitor) for cb in trainer.callbacks)
        if self.monitor:
            decisions.append(Decision("monitor", "applied" if not has_monitor else "already on the Trainer", "always"))
        self.decisions, self.remedies = decisions, remedies
        self.cost_seconds = time.perf_counter() - start

    def _build_subs(self, trainer: "pl.Trainer") -> None:
        r = self.remedies
        if "activation" in r:
            self.subs["activation"] = ActivationReplacement(r["activation"]["mapping"], verbose=False)
        if "batchnorm" in r:
            self.subs["batchnorm"] = BatchNormInsertion(**r["batchnorm"], verbose=False)
        if "init" in r:
            self.subs["init"] = WeightInitialization(r["init"].get("scheme", "auto"), seed=self.seed, verbose=False)
        if "clipping" in r:
            self.subs["clipping"] = GradientClipping(**clip_options(r["clipping"], self.clip_algorithm), on_nonfinite="skip")
        if self.monitor and not any(isinstance(cb, GradientMonitor) for cb in trainer.callbacks):
            self.subs["monitor"] = GradientMonitor()
        for name, state in self._loaded_sub_states.items():
            if name in self.subs:
                self.subs[name].load_state_dict(state)

    def table(self) -> str:
        head = ("remedy", "decision", "measurement")
        return text_table(head, [(d.remedy, d.status, d.measurement) for d in self.decisions])

    def markdown(self) -> str:
        """The decision table as markdown (TensorBoard text ``gradguard/decisions``)."""
        head = ("remedy", "decision", "measurement")
        rows = [(d.remedy, f"**{d.status}**" if d.status in ("applied", "forced") else d.status, d.measurement)
                for d in self.decisions]
        return (markdown_table(head, rows) + f"\n\nprobe and trials: {self.cost_seconds:.2f}s, "
                f"{self.cost_steps} forward/backward passes; rules: `lightning_gradguard.doctor`")

    # ---------------------------------------------------------------------------------- forwarding
    def _forward(self, hook: str, *args: Any, **kwargs: Any) -> None:
        """Call ``hook`` on every sub-callback, in :data:`SUB_ORDER` (or the hook's :data:`HOOK_ORDER`)."""
        for name in HOOK_ORDER.get(hook, SUB_ORDER):
            sub = self.subs.get(name)
            if sub is not None:
                getattr(sub, hook)(*args, **kwargs)

    on_train_batch_start = _forwarded("on_train_batch_start")
    on_before_backward = _forwarded("on_before_backward")  # clipping's loss-spike detector reads the loss
    on_before_optimizer_step = _forwarded("on_before_optimizer_step")
    on_train_batch_end = _forwarded("on_train_batch_end")
    on_save_checkpoint = _forwarded("on_save_checkpoint")
    on_exception = _forwarded("on_exception")  # the monitor removes its forward hooks after a crash
    teardown = _forwarded("teardown")

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        text = self.table() + f"\nprobe and trials: {self.cost_seconds:.2f}s, {self.cost_steps} forward/backward passes"
        if self.verbose:
            print_table("GradGuard decisions", text)
        log_markdown(trainer, "gradguard/decisions", self.markdown(), step=0)
        self._forward("on_fit_start", trainer, pl_module)

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._forward("on_fit_end", trainer, pl_module)
        if self._fit_started is not None:
            total = time.perf_counter() - self._fit_started
            share = self.cost_seconds / total if total > 0 else 0.0
            rank_zero_info(f"GradGuard: probe and trials took {self.cost_seconds:.2f}s of {total:.2f}s fit time "
                           f"({share:.0%}), {self.cost_steps} forward/backward passes")

    def state_dict(self) -> dict[str, Any]:
        return {
            "remedies": self.remedies,
            "decisions": [vars(d) for d in self.decisions],
            "subs": {name: sub.state_dict() for name, sub in self.subs.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.remedies = state_dict.get("remedies", self.remedies)
        self._loaded_sub_states = state_dict.get("subs", {})
        for name, state in self._loaded_sub_states.items():
            if name in self.subs:
                self.subs[name].load_state_dict(state)
