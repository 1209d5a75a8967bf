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

from lightning_gradguard._text import text_table
from lightning_gradguard._validation import check_bool, check_choice, check_number
from lightning_gradguard.activations import SATURATING_BOUNDS
from lightning_gradguard.callbacks._common import resume_checkpoint_path, run_when_model_exists, train_dataloader
from lightning_gradguard.callbacks.activation_replacement import ActivationReplacement
from lightning_gradguard.callbacks.batchnorm_insertion import BatchNormInsertion
from lightning_gradguard.callbacks.gradient_clipping import GradientClipping
from lightning_gradguard.callbacks.gradient_monitor import GradientMonitor
from lightning_gradguard.callbacks.weight_init import WeightInitialization
from lightning_gradguard.doctor import Decision, apply_remedies, fmt, probe, trial
from lightning_gradguard.graph import find_layers, model_input
from lightning_gradguard.init import kept_layers
from lightning_gradguard.reporting import log_text, print_table

MODES = ("auto", "force", "off")
TARGETS = ("elu", "leaky_relu", "selu", "prelu", "rrelu", "gelu", "silu")
_FORWARD = ("on_fit_start", "on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end", "on_fit_end",
            "on_save_checkpoint")


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
        init, batchnorm, activation, clipping: ``auto`` / ``force`` / ``off`` for each remedy. The init
            trial (and the applied init) keeps loaded, trained and adapter weights as ``WeightInitialization``
            does (:mod:`lightning_gradguard.pretrained`), and is not tried when every layer is such;
            ``init="force"`` re-initializes them too (``WeightInitialization(force=True)``).
        monitor: add a ``GradientMonitor`` (skipped when the Trainer already has one).
        architecture_changes: allow inserting layers and swapping activations.
        saturating_target, dead_target: replacements for sigmoid/tanh and for dying ReLUs.
        clip_algorithm: ``percentile`` (AutoClip, default), ``norm``, ``value`` or ``agc``.
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
        clip_algorithm: Literal["percentile", "norm", "value", "agc"] = "percentile",
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
        self.clip_algorithm = check_choice(owner, "clip_algorithm", clip_algorithm, ("percentile", "norm", "value", "agc"))
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
        self._fit_started: Optional[float] = None
        self._loaded_sub_states: dict[str, Any] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(modes=sorted(self.modes.items()))

    # ---------------------------------------------------------------------------------- deciding
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit" or self.subs:
            return
        self._fit_started = time.perf_counter()
        resume = resume_checkpoint_path(trainer)

        def act() -> None:
            if resume:
                self._from_checkpoint(resume)
            else:
                self._decide(trainer, pl_module)
            self._build_subs(trainer)
            for name in ("activation", "batchnorm", "init", "clipping", "monitor"):
                if name in self.subs:
                    self.subs[name].setup(trainer, pl_module, stage)

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
        decisions: list[Decision] = []
        remedies: dict[str, dict[str, Any]] = {}
        loader = train_dataloader(trainer)
        frozen = all(not p.requires_grad for p in pl_module.parameters())
        manual = not pl_module.automatic_optimization
        if loader is None or manual:
            why = "manual optimization" if manual else "no training data to probe"
            if self.modes["init"] != "off" and not frozen:
                remedies["init"] = {"scheme": "auto"}
            decisions.append(Decision("init", "applied" if "init" in remedies else "off", f"by rule ({why}: no probe)"))
            for name in ("batchnorm", "activation"):
                decisions.append(Decision(name, "not probed", why))
            if self.modes["clipping"] == "force":
                remedies["clipping"] = {}
            decisions.append(Decision("clipping", "applied" if "clipping" in remedies else "not probed", why))
            self._finish_decisions(trainer, decisions, remedies, start)
            return
        batches = []
        for i, b in enumerate(loader):
            if i >= self.probe_batches:
                break
            batches.append(b)
        stream = _Cycle(loader)
        memo = {id(trainer): trainer}
        # trials share one seed (so they differ only by their remedies): ours, else Lightning's, else 0
        trial_seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        patched = {"log": lambda *a, **k: None, "log_dict": lambda *a, **k: None}
        pl_module.__dict__.update(patched)  # training_step's self.log is a no-op while probing
        try:
            base = probe(pl_module, batches, _loss_of)
            weighted = find_layers(pl_module, model_input(batches[0]) if batches else None)
            kept = kept_layers(pl_module, weighted)  # loaded/trained/adapter weights the init trial leaves alone
            self.cost_steps += len(batches)
            spent = lambda: time.perf_counter() - start  # noqa: E731
            # clipping first: by rule, and part of every trial when chosen
            clip_reasons = []
            if base.recurrent:
                clip_reasons.append("recurrent layer")
            if base.nonfinite:
                clip_reasons.append("non-finite gradients")
            big = max((n for n in base.total_norms if n == n), default=0.0)
            if big > self.exploding_norm:
                clip_reasons.append(f"grad norm {big:.3g} > {self.exploding_norm:g}")
            if base.spike > self.spike_factor:
                clip_reasons.append(f"norm spike ×{base.spike:.3g}")
            clip_on = self.modes["clipping"] == "force" or (self.modes["clipping"] == "auto" and bool(clip_reasons))
            common: dict[str, dict[str, Any]] = {"clipping": {"algorithm": self.clip_algorithm}} if clip_on else {}
            clip_scores: dict[str, float] = {}

            def raw_trial(rem: dict[str, dict[str, Any]], steps: int = self.trial_steps) -> float:
                self.cost_steps += steps
                return trial(pl_module, rem, stream, _loss_of, lambda m: _first_optimizer(m.configure_optimizers()),
                             steps, trial_seed, dict(memo))

            def run_trial(rem: dict[str, dict[str, Any]], label: str) -> float:
                nonlocal clip_on
                loss = raw_trial({**common, **rem})
                if loss == float("inf") and not common and self.modes["clipping"] == "auto":
                    clipped = raw_trial({"clipping": {"algorithm": self.clip_algorithm}, **rem})
                    if clipped < float("inf"):  # diverges without clipping, trains with it: clipping from now on
                        clip_reasons.append(f"trial '{label}' diverged without clipping, loss {fmt(clipped)} with it")
                        common["clipping"] = {"algorithm": self.clip_algorithm}
                        clip_on = True
                        return clipped
                return loss

            base_loss = run_trial({}, "no remedy")
            best, best_loss = {}, base_loss
            # init
            init_mode = self.modes["init"]
            if init_mode == "off":
                decisions.append(Decision("init", "off", "turned off"))
            elif frozen:
                decisions.append(Decision("init", "not applied", "every weight is frozen (pretrained)"))
            elif init_mode == "auto" and kept and len(kept) == len(weighted):
                decisions.append(Decision("init", "not applied", f"all {len(kept)} layers hold loaded, trained or adapter "
                                          "weights (init='force' re-initializes them)"))
            else:
                init_remedy: dict[str, Any] = {"scheme": "auto", **({"force": True} if init_mode == "force" else {})}
                init_loss = run_trial({"init": init_remedy}, "init")
                keep = init_mode == "force" or init_loss <= base_loss * (1 + self.margin)
                if keep:
                    best, best_loss = {"init": init_remedy}, init_loss
                kept_note = f"; {len(kept)} layer(s) kept as loaded/trained/adapter" if kept and init_mode != "force" else ""
                decisions.append(Decision("init", "forced" if init_mode == "force" else ("applied" if keep else "not applied"),
                                          f"trial loss {fmt(base_loss)} → {fmt(init_loss)} ({self.trial_steps} steps){kept_note}"))
            # measurements after init
            after = base
            if best:
                copy_ = copy.deepcopy(pl_module, dict(memo))
                apply_remedies(copy_, best, seed=trial_seed)
                after = probe(copy_, batches, _loss_of)
                self.cost_steps += len(batches)
                del copy_
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
            bn_opts = {"position": "before_activation"}
            candidates = []
            if act_candidate and bn_candidate:
                candidates.append({"activation": {"mapping": mapping}, "batchnorm": bn_opts})
            if bn_candidate:
                candidates.append({"batchnorm": bn_opts})
            if act_candidate:
                candidates.append({"activation": {"mapping": mapping}})
            ref_loss = best_loss  # with init (when kept): what an architecture change must beat
            scores: dict[str, float] = {}
            chosen: dict[str, dict[str, Any]] = {}
            for cand in candidates:
                if spent() > self.budget_seconds:
                    break
                loss = run_trial({**best, **cand}, "+".join(sorted(cand)))
                scores["+".join(sorted(cand))] = loss
                if loss < best_loss * (1 - self.margin):
                    chosen, best_loss = cand, loss
            for name, cand_on, reason in (("batchnorm", bn_candidate, bn_reason),
                                          ("activation", act_candidate, "; ".join(act_reasons) or "nothing saturated or dead")):
                tried = {k: v for k, v in scores.items() if name in k.split("+")}
                if self.modes[name] == "off":
                    decisions.append(Decision(name, "off", "turned off"))
                    continue
                if not cand_on:
                    decisions.append(Decision(name, "not applied", f"{reason}: not needed"))
                    continue
                if not tried:
                    decisions.append(Decision(name, "untried", f"{reason}; trial budget of {self.budget_seconds:g}s spent"))
                    continue
                picked = name in chosen or self.modes[name] == "force"
                status = ("forced" if self.modes[name] == "force" else "applied") if picked else "not applied"
                if picked and not self.architecture_changes:
                    status = "suggested (architecture_changes=False)"
                detail = ", ".join(f"{k} {fmt(v)}" for k, v in tried.items())
                decisions.append(Decision(name, status, f"{reason}; trial loss {fmt(ref_loss)} → {detail}"))
                if picked and self.architecture_changes:
                    best[name] = chosen.get(name) or (bn_opts if name == "batchnorm" else {"mapping": mapping})
            if clip_on and self.modes["clipping"] == "auto" and self.clip_algorithm == "percentile" and spent() <= self.budget_seconds:
                # which adaptive clipping suits this model, AutoClip or unit-wise AGC, by trial; these trials
                # run twice as long, since AutoClip spends its first 10 steps warming up its history
                for algo in ("percentile", "agc"):
                    clip_scores[algo] = raw_trial({**best, "clipping": {"algorithm": algo}}, 2 * self.trial_steps)
                pick = min(clip_scores, key=lambda k: clip_scores[k])
                common["clipping"] = {"algorithm": pick}
                clip_reasons.append("trial loss " + ", ".join(f"{k} {fmt(v)}" for k, v in clip_scores.items()))
            decisions.append(Decision(
                "clipping", "forced" if self.modes["clipping"] == "force" else ("applied" if clip_on else ("off" if self.modes["clipping"] == "off" else "not applied")),
                ", ".join(clip_reasons) or f"no spike (max/median {base.spike:.3g}), max norm {big:.3g}, not recurrent",
                dict(common.get("clipping", {}))))
            remedies = dict(best)
            if clip_on:
                remedies["clipping"] = dict(common["clipping"])
        finally:
            for k in patched:
                pl_module.__dict__.pop(k, None)
        self._finish_decisions(trainer, decisions, remedies, start)

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
            self.subs["init"] = WeightInitialization(r["init"].get("scheme", "auto"), seed=self.seed, verbose=False,
                                                     force=bool(r["init"].get("force", False)))
        if "clipping" in r:
            algorithm = r["clipping"].get("algorithm", self.clip_algorithm)
            opts: dict[str, Any] = {"algorithm": algorithm}
            if algorithm == "percentile":
                opts["warmup_threshold"] = 1.0
            elif algorithm in ("agc", "value"):
                opts["threshold"] = 0.01
            self.subs["clipping"] = GradientClipping(**opts, on_nonfinite="skip")
        if self.monitor and not any(isinstance(cb, GradientMonitor) for cb in trainer.callbacks):
            self.subs["monitor"] = GradientMonitor()
        for name, state in self._loaded_sub_states.items():
            if name in self.subs:
                self.subs[name].load_state_dict(state)

    def table(self) -> str:
        head = ("remedy", "decision", "measurement")
        return text_table(head, [(d.remedy, d.status, d.measurement) for d in self.decisions])

    # ---------------------------------------------------------------------------------- forwarding
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        text = self.table() + f"\nprobe and trials: {self.cost_seconds:.2f}s, {self.cost_steps} forward/backward passes"
        if self.verbose:
            print_table("GradGuard decisions", text)
        log_text(trainer, "gradguard/decisions", text, step=0)
        for sub in self.subs.values():
            sub.on_fit_start(trainer, pl_module)

    def on_train_batch_start(self, *args: Any) -> None:
        for sub in self.subs.values():
            sub.on_train_batch_start(*args)

    def on_before_optimizer_step(self, *args: Any) -> None:
        for name in ("monitor", "clipping"):  # the monitor sees the gradients before clipping
            if name in self.subs:
                self.subs[name].on_before_optimizer_step(*args)

    def on_train_batch_end(self, *args: Any) -> None:
        for sub in self.subs.values():
            sub.on_train_batch_end(*args)

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        for sub in self.subs.values():
            sub.on_fit_end(trainer, pl_module)
        if self._fit_started is not None:
            total = time.perf_counter() - self._fit_started
            share = self.cost_seconds / total if total > 0 else 0.0
            rank_zero_info(f"GradGuard: probe and trials took {self.cost_seconds:.2f}s of {total:.2f}s fit time "
                           f"({share:.0%}), {self.cost_steps} forward/backward passes")
            self.fit_seconds, self.cost_share = total, share

    def on_save_checkpoint(self, *args: Any) -> None:
        for sub in self.subs.values():
            sub.on_save_checkpoint(*args)

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
