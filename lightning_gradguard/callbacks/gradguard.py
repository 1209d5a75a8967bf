"""``GradGuard``: one callback that probes the model, decides the remedies, applies them and explains."""

from __future__ import annotations

import functools
import gc
import itertools
import math
import os
import time
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from lightning_gradguard._text import markdown_table, text_table
from lightning_gradguard._validation import check_bool, check_choice, check_number
from lightning_gradguard.callbacks._common import run_when_model_exists, train_dataloader
from lightning_gradguard.callbacks._lightning_internals import checkpoint_path_in_setup, logging_muted
from lightning_gradguard.callbacks.activation_replacement import ActivationReplacement
from lightning_gradguard.callbacks.batchnorm_insertion import BatchNormInsertion
from lightning_gradguard.callbacks.gradient_clipping import GradientClipping
from lightning_gradguard.callbacks.gradient_monitor import GradientMonitor
from lightning_gradguard.callbacks.weight_init import WeightInitialization
from lightning_gradguard.distributed import any_dtensor, broadcast_object, is_multi_process
from lightning_gradguard.doctor import Decision, Diagnosis, DoctorOptions, decide, race_table
from lightning_gradguard.probe import probe
from lightning_gradguard.remedies import clip_options
from lightning_gradguard.graph import LayerInfo, is_weighted
from lightning_gradguard.init import kept_layers
from lightning_gradguard.reporting import log_markdown, print_table
from lightning_gradguard.trials import BatchCache, ModelTrials

MODES = ("auto", "force", "off")
TARGETS = ("elu", "leaky_relu", "selu", "prelu", "rrelu", "gelu", "silu")
#: the sub-callbacks, in the order they act (surgery before init, as the individual callbacks also do)
SUB_ORDER = ("activation", "batchnorm", "init", "clipping", "monitor")
#: where one hook needs another order: the monitor sees the gradients before clipping changes them
HOOK_ORDER = {"on_before_optimizer_step": ("monitor", "clipping")}
#: the fit length assumed for ``budget_fraction`` when neither ``max_steps`` nor ``max_epochs`` bounds the fit
UNKNOWN_FIT_STEPS = 1000


def fit_steps(trainer: "pl.Trainer", loader: Any) -> Optional[int]:
    """The fit's optimizer steps as configured: ``max_steps`` if set, else ``max_epochs`` × batches per epoch
    (``limit_train_batches`` applied) / ``accumulate_grad_batches``; ``None`` when unbounded or unknown."""
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return int(trainer.max_steps)
    epochs = trainer.max_epochs
    try:
        per_epoch = len(loader)
    except TypeError:
        return None
    if epochs is None or epochs < 0:
        return None
    limit = trainer.limit_train_batches
    if isinstance(limit, float):
        per_epoch = int(per_epoch * limit)
    elif isinstance(limit, int):
        per_epoch = min(per_epoch, limit)
    return max(1, math.ceil(epochs * per_epoch / max(1, trainer.accumulate_grad_batches)))


def _make_optimizer(model: "pl.LightningModule") -> torch.optim.Optimizer:
    return _first_optimizer(model.configure_optimizers())


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


def weighted_submodules(model: torch.nn.Module) -> list[LayerInfo]:
    """Every weighted submodule of ``model`` as a ``LayerInfo`` (activation unknown), without tracing it.

    ``kept_layers`` reads only each layer's name and weights, and ``find_layers`` lists every weighted submodule
    (those tracing misses are added after it), so these give the same answer without an fx trace (which costs
    more than a training step on a deep net)."""
    return [LayerInfo(n, m, "unknown") for n, m in model.named_modules() if n and is_weighted(m)]


class GradGuard(Callback):
    """Make a deep network trainable in one line: probe, decide, apply, explain.

    At the start of fit, before the optimizer exists: the first ``probe_batches`` training batches are held
    out; forward/backward passes on them (no optimizer step; weights, gradients, BN statistics and RNG put
    back) measure per-layer gradient norms, the flow ratio and activation saturation/dead units; then
    candidate remedy sets race on copies of the model (successive halving, scored by the loss on the held-out
    batches, with a noise margin; :func:`lightning_gradguard.doctor.decide`), and the winner is kept only if
    it beats no remedy beyond noise; the chosen remedies are applied through
    the individual callbacks (``WeightInitialization``, ``BatchNormInsertion``, ``ActivationReplacement``,
    ``GradientClipping``, ``GradientMonitor``), and a decision table is printed and logged
    (``gradguard/decisions``). The rules are in :mod:`lightning_gradguard.doctor`.

    Each remedy is ``"auto"`` (decided by measurement), ``"force"`` or ``"off"``. With
    ``architecture_changes=False`` BatchNorm and activation replacement are only suggested, never applied.
    When fit resumes from a checkpoint, the decisions stored in it are re-applied (no new probe), so the
    structure matches. Under several processes global rank 0 decides and broadcasts; every rank applies the
    same remedies.

    Budget: probe and trials together spend at most ``budget_fraction`` × the fit's optimizer steps (from
    ``max_steps``, else ``max_epochs`` × batches per epoch), counted in passes (a trial's training step 1, a
    held-out forward pass 1/3, a probe batch 1; :mod:`lightning_gradguard.trials`). Copying the model, the
    surgery of each candidate and the rest of the doctor's bookkeeping count too, converted into passes at the
    median measured seconds of a trial's training step, so the budget bounds the whole cost and a uniformly slower machine gets about
    the same race. ``budget_steps`` sets the passes directly, and then only passes count (the decision is
    deterministic); ``budget_seconds`` is a wall-clock upper bound. Every pass of every trial is checked
    against the budget; the measured seconds, passes and overhead are printed.
    With ``Trainer(logger=False)`` no monitor is added and the decision table on the console is the report.
    They run where the module is at ``setup``
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
        saturating_target, dead_target: replacements for sigmoid/tanh and for the ReLU family (ReLU, ReLU6,
            LeakyReLU and the smooth GELU, SiLU, Mish, Hardswish; ELU for both by
            default: on the zoo, ELU trained the deep ReLU nets that LeakyReLU did not).
        clip_algorithm: the clipping applied when clipping is on: ``percentile`` (AutoClip), ``norm``,
            ``value``, ``agc`` or ``zscore`` (ZClip), with :data:`lightning_gradguard.remedies.CLIP_DEFAULTS`.
        flow_threshold, saturation_threshold, dead_threshold: probe statistics that move candidates up the race
            order (they never remove one). spike_factor, exploding_norm: the clipping rule.
        margin: the least relative held-out loss improvement that counts (on top of the noise margin).
        probe_batches: held-out batches (probed, and scored on by every trial).
        trial_steps: steps of the race's first rung (then doubled each rung).
        budget_fraction, budget_steps, budget_seconds: the budget (above).
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
        dead_target: Literal["elu", "leaky_relu", "selu", "prelu", "rrelu", "gelu", "silu"] = "elu",
        clip_algorithm: Literal["percentile", "norm", "value", "agc", "zscore"] = "percentile",
        flow_threshold: float = 1e-3,
        saturation_threshold: float = 0.3,
        dead_threshold: float = 0.3,
        spike_factor: float = 10.0,
        exploding_norm: float = 1e3,
        margin: float = 0.02,
        probe_batches: int = 2,
        trial_steps: int = 6,
        budget_fraction: float = 0.1,
        budget_steps: Optional[int] = None,
        budget_seconds: float = 120.0,
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
        self.budget_fraction = check_number(owner, "budget_fraction", budget_fraction, min_value=0.0, max_value=1.0)
        self.budget_steps = check_number(owner, "budget_steps", budget_steps, min_value=0, integer=True, allow_none=True)
        self.budget_seconds = check_number(owner, "budget_seconds", budget_seconds, min_value=0.0)
        self.seed = check_number(owner, "seed", seed, integer=True, allow_none=True)
        self.verbose = check_bool(owner, "verbose", verbose)
        self.decisions: list[Decision] = []
        self.remedies: dict[str, dict[str, Any]] = {}
        self.subs: dict[str, Callback] = {}
        self.cost_seconds = 0.0
        self.cost_steps = 0.0  # passes spent by probe and trials (trials.py: a training step 1, a held-out forward 1/3)
        self.cost_overhead = 0.0  # copies, surgery and bookkeeping, in passes at the measured rate (trials.py)
        self.budget_rule = ""
        self.diagnosis: Optional[Diagnosis] = None  # the race (rank 0 only under several processes)
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
        run_when_model_exists(pl_module, functools.partial(self._act, trainer, pl_module, stage, resume))

    def _act(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str, resume: Optional[str]) -> None:
        """Decide (or re-apply a checkpoint's decisions), then apply through the sub-callbacks."""
        if resume:
            self._from_checkpoint(resume)
        else:
            self._decide_on_rank_zero(trainer, pl_module)
        self._build_subs(trainer)
        self._forward("setup", trainer, pl_module, stage)

    def _decide_on_rank_zero(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Several processes: global rank 0 probes and decides, every rank applies its decisions (broadcast),
        so all ranks build, initialize and shard the same model. The probe runs on the unsharded module."""
        if not is_multi_process():
            self._decide(trainer, pl_module)
            return
        if any_dtensor(list(pl_module.parameters())):
            raise RuntimeError(
                "GradGuard: the model is already sharded (FSDP2 DTensor parameters) when it would be probed, "
                "because configure_model built and sharded its layers. Build the layers in __init__ and only "
                "call fully_shard in configure_model: GradGuard then decides and applies before sharding."
            )
        result: Any = None
        if trainer.is_global_zero:
            try:
                self._decide(trainer, pl_module)
                result = (self.decisions, self.remedies, self.cost_seconds, self.cost_steps, self.cost_overhead,
                          self.budget_rule)
            except Exception as err:  # noqa: BLE001 - every rank must leave the broadcast, then raise
                result = err
        result = broadcast_object(result)
        if isinstance(result, Exception):
            raise RuntimeError(f"GradGuard: deciding on global rank 0 failed: {result}") from result
        self.decisions, self.remedies, self.cost_seconds, self.cost_steps, self.cost_overhead, self.budget_rule = result

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
        # the probe and trials allocate many short-lived objects (model copies, fx graphs); a full garbage
        # collection among them would traverse the whole process heap (~0.3 s measured on the zoo): the objects
        # that exist before are frozen, so collections during the race look at the race's objects only. Left
        # alone when the process already froze objects (e.g. before forking workers).
        frozen_gc = gc.get_freeze_count() == 0
        if frozen_gc:
            gc.freeze()
        try:
            self._decide_unfrozen(trainer, pl_module, start)
        finally:
            if frozen_gc:
                gc.unfreeze()

    def _decide_unfrozen(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", start: float) -> None:
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

    def budget_units(self, trainer: "pl.Trainer", loader: Any) -> tuple[float, str]:
        """The budget in passes and the rule that gave it: ``budget_steps`` if set, else ``budget_fraction`` ×
        the fit's optimizer steps (``max_steps``, else ``max_epochs`` × batches per epoch / accumulation)."""
        if self.budget_steps is not None:
            return float(self.budget_steps), f"budget_steps={self.budget_steps}"
        steps = fit_steps(trainer, loader)
        if steps is None:
            steps = UNKNOWN_FIT_STEPS
            return self.budget_fraction * steps, (f"{self.budget_fraction:g} × {steps} steps (the fit's length is "
                                                  "unknown: set max_steps, max_epochs or budget_steps)")
        return self.budget_fraction * steps, f"{self.budget_fraction:g} × {steps} fit steps"

    def _probe_and_decide(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loader: Any,
                          frozen: bool, start: float) -> tuple[list[Decision], dict[str, dict[str, Any]]]:
        budget, self.budget_rule = self.budget_units(trainer, loader)
        stream = iter(loader)
        heldout = list(itertools.islice(stream, self.probe_batches))  # scored on, never trained on
        # trials share one seed (so they differ only by their remedies): ours, else Lightning's, else 0
        seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        options, keeps_nothing = self._options(pl_module, frozen)
        probe_start = time.perf_counter()
        probed = probe(pl_module, heldout, _loss_of)
        probe_seconds = time.perf_counter() - probe_start
        # the probe's passes are timed; everything else since ``start`` is overhead, charged at their rate, unless
        # budget_steps fixed the passes (then only passes count, and the decision is deterministic)
        trials = ModelTrials(pl_module, BatchCache(stream), heldout, _loss_of, _make_optimizer, budget,
                             self.budget_seconds, seed, memo={id(trainer): trainer}, spent_units=len(heldout),
                             started=start, spent_seconds=probe_seconds, count_overhead=self.budget_steps is None)
        trials.init_keeps_nothing = keeps_nothing
        self.diagnosis = decide(probed, trials, options)
        return self.diagnosis.decisions, self.diagnosis.remedies

    def _options(self, pl_module: "pl.LightningModule", frozen: bool) -> tuple[DoctorOptions, bool]:
        """The doctor's options, and whether init would keep no layer as loaded/trained/adapter."""
        blocked, kept = None, {}
        if frozen:
            blocked = "every weight is frozen (pretrained)"
        elif self.modes["init"] == "auto":
            weighted = weighted_submodules(pl_module)
            kept = kept_layers(pl_module, weighted)  # loaded/trained/adapter weights init leaves alone
            if kept and len(kept) == len(weighted):
                blocked = (f"all {len(kept)} layers hold loaded, trained or adapter weights "
                           "(init='force' re-initializes them)")
        return DoctorOptions(
            modes=dict(self.modes), architecture_changes=self.architecture_changes,
            saturating_target=self.saturating_target, dead_target=self.dead_target, clip_algorithm=self.clip_algorithm,
            flow_threshold=self.flow_threshold, saturation_threshold=self.saturation_threshold,
            dead_threshold=self.dead_threshold, spike_factor=self.spike_factor, exploding_norm=self.exploding_norm,
            margin=self.margin, trial_steps=self.trial_steps, init_blocked=blocked,
        ), (not frozen and not kept)

    def _finish_decisions(self, trainer: "pl.Trainer", decisions: list[Decision], remedies: dict, start: float) -> None:
        has_monitor = any(isinstance(cb, GradientMonitor) for cb in trainer.callbacks)
        if self.monitor:
            if has_monitor:
                decisions.append(Decision("monitor", "already on the Trainer", "always"))
            elif not trainer.loggers:
                decisions.append(Decision("monitor", "not applied", "the Trainer has no logger (logger=False): "
                                          "the decision table above is the report, on the console"))
            else:
                decisions.append(Decision("monitor", "applied", "always"))
        self.decisions, self.remedies = decisions, remedies
        self.cost_seconds = time.perf_counter() - start
        self.cost_steps = self.diagnosis.units if self.diagnosis is not None else 0.0
        self.cost_overhead = self.diagnosis.overhead_units if self.diagnosis is not None else 0.0

    def _passes_text(self) -> str:
        """``N passes`` and, when counted, ``+ M for copies, surgery and setup``."""
        over = f" + {self.cost_overhead:.0f} for copies, surgery and setup" if self.cost_overhead >= 0.5 else ""
        return f"{self.cost_steps:.0f} passes{over}"

    def cost_line(self) -> str:
        """Probe and trials' measured cost and the budget rule."""
        return (f"probe and trials: {self.cost_seconds:.2f}s, {self._passes_text()}"
                + (f" (budget {self.budget_rule})" if self.budget_rule else ""))

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
            self.subs["clipping"] = GradientClipping(**clip_options(r["clipping"], self.clip_algorithm), on_nonfinite="skip")
        if self.monitor and trainer.loggers and not any(isinstance(cb, GradientMonitor) for cb in trainer.callbacks):
            self.subs["monitor"] = GradientMonitor()
        for name, state in self._loaded_sub_states.items():
            if name in self.subs:
                self.subs[name].load_state_dict(state)

    def table(self) -> str:
        """The decision table as text, then the race (held-out loss after each rung) when there was one."""
        head = ("remedy", "decision", "measurement")
        text = text_table(head, [(d.remedy, d.status, d.measurement) for d in self.decisions])
        if self.diagnosis is not None and self.diagnosis.race:
            text += "\n" + text_table(("candidate", "held-out loss after steps"), race_table(self.diagnosis))
        return text

    def markdown(self) -> str:
        """The decision table as markdown (TensorBoard text ``gradguard/decisions``)."""
        head = ("remedy", "decision", "measurement")
        rows = [(d.remedy, f"**{d.status}**" if d.status in ("applied", "forced") else d.status, d.measurement)
                for d in self.decisions]
        race = ""
        if self.diagnosis is not None and self.diagnosis.race:
            race = "\n\n" + markdown_table(("candidate", "held-out loss after steps"), race_table(self.diagnosis))
        return markdown_table(head, rows) + race + f"\n\n{self.cost_line()}; rules: `lightning_gradguard.doctor`"

    # ---------------------------------------------------------------------------------- forwarding
    def _forward(self, hook: str, *args: Any, **kwargs: Any) -> None:
        """Call ``hook`` on every sub-callback, in :data:`SUB_ORDER` (or the hook's :data:`HOOK_ORDER`)."""
        for name in HOOK_ORDER.get(hook, SUB_ORDER):
            sub = self.subs.get(name)
            if sub is not None:
                getattr(sub, hook)(*args, **kwargs)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: Any) -> None:
        """Forwarded to the sub-callbacks."""
        self._forward("on_train_batch_start", trainer, pl_module, batch, batch_idx)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:  # clipping's loss-spike detector reads the loss
        """Forwarded to the sub-callbacks."""
        self._forward("on_before_backward", trainer, pl_module, loss)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """Forwarded to the sub-callbacks."""
        self._forward("on_before_optimizer_step", trainer, pl_module, optimizer)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: Any) -> None:
        """Forwarded to the sub-callbacks."""
        self._forward("on_train_batch_end", trainer, pl_module, outputs, batch, batch_idx)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: Any) -> None:
        """Forwarded to the sub-callbacks."""
        self._forward("on_save_checkpoint", trainer, pl_module, checkpoint)

    def on_exception(self, trainer: Any, pl_module: Any, exception: Any) -> None:  # the monitor removes its forward hooks after a crash
        """Forwarded to the sub-callbacks."""
        self._forward("on_exception", trainer, pl_module, exception)

    def teardown(self, trainer: Any, pl_module: Any, stage: Any) -> None:
        """Forwarded to the sub-callbacks."""
        self._forward("teardown", trainer, pl_module, stage)


    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        text = self.table() + "\n" + self.cost_line()
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
                           f"({share:.0%}), {self._passes_text()}")

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
