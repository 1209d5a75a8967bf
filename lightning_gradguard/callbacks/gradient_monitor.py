"""``GradientMonitor``: per-layer gradient statistics, activation health and findings, cheap enough to leave on."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_gradguard._validation import check_bool, check_choice, check_number
from lightning_gradguard._text import markdown_table
from lightning_gradguard.callbacks._common import sample_batch_provider
from lightning_gradguard.health import REMEDY, Finding, HealthDetector, LayerRow
from lightning_gradguard.reporting import flush, log_histogram, log_image, log_layout, log_markdown, log_metrics
from lightning_gradguard.stats import (
    ACT_STATS, GRAD_STATS, GradStatsPlan, LayerGroup, UpdateTracker, activation_hook_target,
    grad_statistics_from, histogram, layer_groups, shared_activations, to_host, unit_dim_for, update_ratios_from,
)
from lightning_gradguard.distributed import any_dtensor, check_strategy, local, reduce_sum_max
from lightning_gradguard.act_stats import ActivationAccumulator, kept_by_autograd
from lightning_gradguard.host_transfer import BackgroundWriter, to_device
from lightning_gradguard.shared_norms import step_norms_for


@dataclass
class _StepContext:
    """What the writer thread needs to format one logging step's host values."""

    step: int
    idx: list[int]
    sub: list[LayerGroup]
    act_idx: list[int]
    measured: list[bool]
    nf_keys: list[tuple]
    n_nf: int
    hist_tags: list[str]
    loss_steps: list[int]


def _is_compute(group: LayerGroup) -> bool:
    """A weight-carrying compute layer (Linear, Conv, RNN, attention): not a norm layer, an embedding (a
    lookup table whose rows get gradient only when used) or a bare parameter owner (position tables, ...)."""
    return group.info is not None and not isinstance(group.module, torch.nn.Embedding)


HEATMAP_COLUMNS = 512


class GradientMonitor(Callback):
    """Stream per-layer gradient statistics to TensorBoard (and every other logger) and name the layer at fault.

    On each logging step (every ``log_every_n_steps`` optimizer steps; default: the Trainer's), per layer
    (the module owning the parameters; ``per_parameter=True`` for one row per parameter):
    ``grad_norm``, ``grad_mean``, ``grad_std``, ``grad_max`` (max |g|), ``grad_zero_frac``,
    ``grad_nonfinite``, ``weight_norm`` (after the step), ``update_ratio`` (‖Δw‖/‖w‖ of that optimizer step,
    ‖w‖ before it; measured for a rotating subset of layers per logging step, see Memory) and, from
    forward hooks attached for that step's forward only, ``act_mean``, ``act_std``, ``act_dead_frac``
    (ReLU units at 0 for the whole batch), ``act_saturated_frac`` (sigmoid/tanh within ``saturation_eps``
    of a bound). Tags are ``<statistic>/<layer>`` (one TensorBoard section per statistic, one chart per
    layer), plus ``log10_grad_norm/<layer>`` (the same norm in decades, so the custom-scalars overlay of all
    layers stays readable when norms span 1 to 1e-16), ``gradguard/grad_norm_total``, ``gradguard/flow_ratio``
    (first / last weighted layer's gradient norm) and ``gradguard/nonfinite_total``, and a custom-scalars
    layout overlaying all layers. Histograms (``hist_grad/<layer>/<weight|bias>``, ``hist_weight/...``,
    ``hist_act/<layer>``) every ``histogram_every_n_steps`` (binned on the device). Pictures, every
    ``figure_every_n_steps`` and at the end of fit: ``gradguard/heatmap`` (layer × step, log10 gradient norm
    and log10 update ratio, the weighted layers in forward order; up to 512 step columns, older ones thinned
    by halving) and ``gradguard/gradient_flow`` (norms of the last logging step, earlier ones in grey).
    Text (markdown tables): ``gradguard/layers`` (name, type, activation, init scheme applied, frozen),
    ``gradguard/findings`` (step, layer, kind, finding, what to do; see :mod:`lightning_gradguard.health`;
    one table per step with findings, one row per finding; each also a warning) and ``gradguard/summary`` at the end of fit (also printed).

    Memory (``memory_fraction``, default 0.1): a logging step allocates at most about ``memory_fraction`` of
    the parameters' memory (at least 16 KiB) plus a few values per layer: one buffer of that size serves twice.
    The gradient statistics copy the gradients into it a chunk at a time and reduce them there
    (:class:`~lightning_gradguard.stats.GradStatsPlan`); then, before the optimizer step, the update ratio
    copies into it the parameters of the next layers in forward order that fit
    (:class:`~lightning_gradguard.stats.UpdateTracker`), so each layer's ``update_ratio`` is logged every
    ``≈ 1/memory_fraction`` logging steps (every logging step with ``memory_fraction=1.0``, or for a model
    under 4096 parameters), exactly, never estimated; between its measurements the detectors use a layer's last
    measured ratio. Activation outputs are reduced many layers at a time
    (:class:`~lightning_gradguard.act_stats.ActivationAccumulator`): small outputs that autograd keeps until
    backward anyway (ReLU, sigmoid, tanh) wait, by reference, until ``on_before_backward`` and are stacked in the
    packed buffer; other outputs are reduced at once; a few numbers per layer are kept, no output past the start
    of backward.

    Cost: a step that logs nothing compares a counter and keeps a reference to the loss (plus the
    non-finite check, see ``nonfinite_check``). A logging step computes every statistic in a number of
    kernels that does not grow with the number of layers (per chunk, not per parameter), gathers all
    values into one vector and starts its copy to the host without waiting (pinned memory and a CUDA
    event on a GPU); a background thread waits for the copy, formats the scalars and writes the
    TensorBoard event, so the training thread never waits for the device. Other loggers, the detectors
    and the heatmap take the values on the training thread at a later step. The writer is flushed (nothing
    lost) at the end of fit, on an exception and at teardown. Gradients are read in
    ``on_before_optimizer_step`` — final, unscaled by AMP, reduced by DDP, once per optimizer step under
    accumulation. Put ``GradientMonitor`` before ``GradientClipping`` in the callback list to see the
    gradients before clipping; on the same Trainer the two share one read of the gradients per step
    (:mod:`lightning_gradguard.shared_norms`): on a logging step clipping uses the monitor's statistics,
    and the monitor's every-step check uses the norms clipping computes (or publishes its own for it).

    Several processes: scalars are written once, by global rank 0. Under FSDP2 (``ModelParallelStrategy``,
    ``DTensor`` shards) the gradient, weight and update statistics are those of the full (unsharded)
    tensors: each rank reduces its shards and one collective per logging step combines them (sums of
    squares, sums, counts, maxima). Under DDP the gradients are already identical on all ranks. Activation
    statistics and histograms are rank 0's own: its micro-batch (1/world_size of the global batch) and,
    under FSDP2, its shard of each tensor.

    Args:
        log_every_n_steps: logging cadence in optimizer steps; ``None`` = ``Trainer(log_every_n_steps)``.
        per_parameter: one row per parameter instead of per layer.
        activation_stats: attach forward hooks on logging steps.
        histogram_every_n_steps: 0 turns histograms off.
        figure_every_n_steps: 0 draws the gradient-flow figure only at the end of fit.
        nonfinite_check: which steps are checked for NaN/Inf gradients between logging steps (logging steps
            always are). ``every_step``: every step, from each gradient's norm (one ``_foreach_norm`` pass,
            free when ``GradientClipping`` on the same Trainer computed them); the finding names the first
            step with a non-finite gradient and every layer with one at that step. ``auto`` (default): the
            norms clipping computed when it runs before the monitor or on a logging step (then exactly as
            ``every_step``); otherwise, on the CPU, the loss passed to backward is tested every step
            (reading it waits for no device) and the gradients are looked at only when it is non-finite:
            the finding names the first step whose loss was non-finite and the layers with non-finite
            gradients at that step, except when some weights are already non-finite then: they got it from
            the previous step's update, so that previous step and the layers with non-finite weights are
            named (a NaN born in backward under a finite loss, carried into the weights by the optimizer); a
            NaN that never reaches the loss or the weights (the step skipped, the gradients repaired) is only
            seen on a logging step; on an accelerator, each gradient's norm in one
            fused pass, kept on the device (as ``every_step``). ``logging_steps``: only logging steps. The
            record stays on the device and crosses to the host with the next logging step (or at the end of
            fit).
        memory_fraction: the most extra memory of a logging step, as a fraction of the parameters' memory
            (see Memory); 1.0 measures every layer's update ratio at every logging step.
        detect: run the health detectors (:mod:`lightning_gradguard.health`); their thresholds are the
            remaining arguments: ``exploding_hard_norm`` fires at once (also between logging steps, from the
            every-step check); ``progress_min_steps``, ``min_loss_drop``, ``oscillation_rate``,
            ``oscillation_amplitude`` drive the training-progress findings, read from the loss that
            ``training_step`` returns (kept as detached scalars each step, reduced and read on logging steps);
            ``update_ratio_high``/``update_ratio_low`` bound the median / largest ‖Δw‖/‖w‖;
            ``input_std_max`` flags unnormalized inputs. What happened after the last logging step is
            reported at the end of fit.
        warn: issue a Python warning per finding (they are always logged as text).

    Raises:
        ValueError / TypeError: bad arguments, at construction.
        MisconfigurationException: a Trainer without a logger.

    Example::

        from lightning_gradguard import GradientMonitor
        trainer = Trainer(callbacks=[GradientMonitor()], log_every_n_steps=50)
    """

    def __init__(
        self,
        log_every_n_steps: Optional[int] = None,
        per_parameter: bool = False,
        activation_stats: bool = True,
        histogram_every_n_steps: int = 500,
        histogram_bins: int = 30,
        figure_every_n_steps: int = 0,
        nonfinite_check: Literal["auto", "every_step", "logging_steps"] = "auto",
        memory_fraction: float = 0.1,
        detect: bool = True,
        vanishing_norm: float = 1e-7,
        vanishing_ratio: float = 1e-3,
        exploding_norm: float = 1e3,
        growth_factor: float = 10.0,
        dead_fraction: float = 0.5,
        saturated_fraction: float = 0.5,
        saturation_eps: float = 0.01,
        patience: int = 3,
        exploding_hard_norm: float = 1e5,
        progress_min_steps: int = 100,
        min_loss_drop: float = 0.1,
        oscillation_rate: float = 0.25,
        oscillation_amplitude: float = 0.05,
        update_ratio_high: float = 0.1,
        update_ratio_low: float = 1e-5,
        input_std_max: float = 20.0,
        warn: bool = True,
    ) -> None:
        owner = type(self).__name__
        self.log_every_n_steps = check_number(owner, "log_every_n_steps", log_every_n_steps, min_value=1, integer=True, allow_none=True)
        self.per_parameter = check_bool(owner, "per_parameter", per_parameter)
        self.activation_stats = check_bool(owner, "activation_stats", activation_stats)
        self.histogram_every_n_steps = check_number(owner, "histogram_every_n_steps", histogram_every_n_steps, min_value=0, integer=True)
        self.histogram_bins = check_number(owner, "histogram_bins", histogram_bins, min_value=2, integer=True)
        self.figure_every_n_steps = check_number(owner, "figure_every_n_steps", figure_every_n_steps, min_value=0, integer=True)
        self.nonfinite_check = check_choice(owner, "nonfinite_check", nonfinite_check, ("auto", "every_step", "logging_steps"))
        self.memory_fraction = check_number(owner, "memory_fraction", memory_fraction, min_value=0.0, max_value=1.0,
                                            min_inclusive=False)
        self.detect = check_bool(owner, "detect", detect)
        for name, value, lo, hi in (
            ("vanishing_norm", vanishing_norm, 0.0, None), ("vanishing_ratio", vanishing_ratio, 0.0, 1.0),
            ("exploding_norm", exploding_norm, 0.0, None), ("growth_factor", growth_factor, 1.0, None),
            ("dead_fraction", dead_fraction, 0.0, 1.0), ("saturated_fraction", saturated_fraction, 0.0, 1.0),
            ("saturation_eps", saturation_eps, 0.0, 0.5), ("exploding_hard_norm", exploding_hard_norm, 0.0, None),
            ("min_loss_drop", min_loss_drop, 0.0, 1.0), ("oscillation_rate", oscillation_rate, 0.0, 1.0),
            ("oscillation_amplitude", oscillation_amplitude, 0.0, 1.0), ("update_ratio_high", update_ratio_high, 0.0, None),
            ("update_ratio_low", update_ratio_low, 0.0, None),
        ):
            check_number(owner, name, value, min_value=lo, max_value=hi, min_inclusive=False)
        self.saturation_eps = saturation_eps
        self.patience = check_number(owner, "patience", patience, min_value=1, integer=True)
        check_number(owner, "progress_min_steps", progress_min_steps, min_value=0, integer=True)
        if exploding_hard_norm < exploding_norm:
            raise ValueError(f"{owner}: exploding_hard_norm={exploding_hard_norm!r} must be >= exploding_norm={exploding_norm!r}")
        if update_ratio_low >= update_ratio_high:
            raise ValueError(f"{owner}: update_ratio_low={update_ratio_low!r} must be < update_ratio_high={update_ratio_high!r}")
        self.warn = check_bool(owner, "warn", warn)
        self.exploding_hard_norm = float(exploding_hard_norm)
        check_number(owner, "input_std_max", input_std_max, min_value=0.0, min_inclusive=False)
        self.detector = HealthDetector(
            vanishing_norm, vanishing_ratio, exploding_norm, growth_factor, dead_fraction, saturated_fraction, patience,
            exploding_hard_norm, progress_min_steps, min_loss_drop, oscillation_rate, oscillation_amplitude,
            update_ratio_high, update_ratio_low, input_std_max,
        )
        self.groups: list[LayerGroup] = []
        self._state_key: Optional[tuple[tuple, str]] = None
        self._every = 1
        self._log_step: Optional[int] = None
        self._logging = False
        self._grad: dict[int, torch.Tensor] = {}
        self._plans: dict[tuple[int, ...], GradStatsPlan] = {}
        self._trackers: dict[tuple[int, ...], UpdateTracker] = {}
        self._step_stats: list[tuple[tuple[int, ...], torch.Tensor, torch.Tensor, GradStatsPlan]] = []
        self._trackers_used: list[tuple[tuple[int, ...], UpdateTracker, GradStatsPlan]] = []
        self._pos_cache: dict[tuple, torch.Tensor] = {}  # index tensors by (positions, device): _index_on
        self._ratios: dict[int, float] = {}  # each layer's last measured update ratio
        self._tag_cache: dict[int, tuple] = {}
        self._label_cache: dict[int, str] = {}
        self._layout_cache: dict[tuple, tuple[list[str], list[int]]] = {}
        self._hook_targets: Optional[list[tuple]] = None
        self._writer: Optional[BackgroundWriter] = None
        self._done: deque = deque()  # logging steps the writer thread finished, for the training thread
        self._loss_nonfinite: Optional[bool] = None
        self._mine: dict[int, tuple[int, tuple[int, ...]]] = {}
        self._act_acc = ActivationAccumulator(saturation_eps)
        self._act_hists: dict[int, torch.Tensor] = {}
        self._hooks: list[Any] = []
        self._hooks_hist: Optional[bool] = None  # the hooks attached are for a histogram step (None: none attached)
        self._failed_hooks: set[str] = set()
        # non-finite / huge-norm tracking on the device, one flag vector per optimizer's parameter set (several
        # optimizers and manual optimization keep their own), one "first step" for the whole run
        self._nf_seen: Optional[torch.Tensor] = None
        self._nf_flags: dict[tuple, torch.Tensor] = {}
        self._nf_index: dict[tuple, torch.Tensor] = {}
        self._nf_step: Optional[torch.Tensor] = None
        self._nf_reported = False
        self._hard: Optional[torch.Tensor] = None  # [seen, step, norm, group index] of the first norm > hard bound
        self._hard_reported = False
        # the training loss: summed on the device over the logging window, read on logging steps
        self._losses: list[torch.Tensor] = []  # this window's training losses (detached scalars, read on logging steps)
        self._loss_steps: list[int] = []
        self._window_steps: list[int] = []
        self._batch_step = 0
        self._input_std: Optional[torch.Tensor] = None
        self._input_layer: Optional[LayerGroup] = None
        self._history: list[list[float]] = []
        self._last_norms: Optional[list[float]] = None
        self._sharded = False
        # the heatmap's columns: (step, {layer: grad norm}, {layer: update ratio}), at most HEATMAP_COLUMNS
        self._columns: list[tuple[int, dict[str, float], dict[str, float]]] = []
        self._thin = 1  # keep every _thin-th logging step once the columns were halved
        self._seen_log_steps = 0

    @property
    def state_key(self) -> str:
        # two monitors at different cadences (or granularities) can watch one run, each with its own state. Lightning
        # reads it on every hook call (profiler names): made once per setting, not per call
        key = (self.per_parameter, self.log_every_n_steps)
        if self._state_key is None or self._state_key[0] != key:
            self._state_key = (key, self._generate_state_key(per_parameter=key[0], log_every_n_steps=key[1]))
        return self._state_key[1]

    # ------------------------------------------------------------------------------- lifecycle
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not trainer.loggers:
            raise MisconfigurationException(
                "Cannot use GradientMonitor with a Trainer that has no logger: pass logger=TensorBoardLogger(...)"
            )
        check_strategy(trainer.strategy, type(self).__name__)
        self._every = self.log_every_n_steps or trainer.log_every_n_steps
        # the sample batch is read only if torch.fx cannot trace the model (Hugging Face models, ...)
        self.groups = layer_groups(pl_module, self.per_parameter, sample_input=sample_batch_provider(trainer, pl_module))
        self._sharded = any_dtensor(list(pl_module.parameters()))
        self._plans, self._trackers, self._pos_cache, self._ratios, self._tag_cache = {}, {}, {}, {}, {}
        self._label_cache, self._layout_cache = {}, {}
        self._hook_targets = None
        self._writer = BackgroundWriter()
        self._index = {id(p): i for i, g in enumerate(self.groups) for p in g.params}
        layout = {
            "gradguard": {
                "log10 gradient norm, all layers": ["Multiline", ["log10_grad_norm/.*"]],
                "gradient norm, all layers": ["Multiline", ["grad_norm/.*"]],
                "update/weight ratio, all layers": ["Multiline", ["update_ratio/.*"]],
                "dead units, all layers": ["Multiline", ["act_dead_frac/.*"]],
                "saturated outputs, all layers": ["Multiline", ["act_saturated_frac/.*"]],
                "global": ["Multiline", ["gradguard/grad_norm_total", "gradguard/flow_ratio", "gradguard/nonfinite_total"]],
            }
        }
        log_layout(trainer, layout)
        self._param_names = [_param_names(g) for g in self.groups]
        schemes = _init_schemes(trainer)
        rows = [(g.name, g.description, g.activation or "-", schemes.get(g.name, "-"), "yes" if g.frozen else "no")
                for g in self.groups]
        # forward order; `gradguard report` reads this table back
        log_markdown(trainer, "gradguard/layers", markdown_table(LAYER_COLUMNS, rows), step=0)
        if self.detect:
            self._check_frozen(trainer)

    def _check_frozen(self, trainer: "pl.Trainer") -> None:
        """Layers that can never update: frozen between trained layers, or trainable but in no optimizer."""
        rows = [(g.name, g.label(), _is_compute(g), not g.frozen) for g in self.groups]
        found = self.detector.frozen(trainer.global_step, rows)
        held = {id(p) for opt in trainer.optimizers for grp in opt.param_groups for p in grp["params"]}
        if held:
            orphans = [(g.name, g.label()) for g in self.groups
                       if g.params and _is_compute(g) and not any(id(p) in held for p in g.params)]
            found += self.detector.not_in_optimizer(trainer.global_step, orphans)
        self._report(trainer, found)

    def _is_log_step(self, step: int) -> bool:
        return step % self._every == 0

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        step = self._batch_step = trainer.global_step
        if self._logging or not self._is_log_step(step) or self._log_step == step:
            return
        self._log_step, self._logging = step, True
        want_hist = self._is_hist_step(step)
        if self._hooks_hist is not None and self._hooks_hist != want_hist:
            self._remove_hooks()
        if self._hooks_hist is None:  # else: kept from the previous step, a logging step too
            if self.activation_stats:
                self._attach_hooks(pl_module, want_hist)
            if self.detect:
                self._attach_input_hook()
            self._hooks_hist = want_hist

    def _attach_input_hook(self) -> None:
        """The std of the first compute layer's (floating-point) input on this logging step: unnormalized data."""
        first = next((g for g in self.groups if _is_compute(g) and not g.frozen), None)
        if first is None:
            return

        def pre_hook(mod, args):
            x = args[0] if args else None
            if self._logging and self._input_std is None and isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel() > 1:
                self._input_std = x.detach().float().std()
                self._input_layer = first

        self._hooks.append(first.module.register_forward_pre_hook(pre_hook))

    # ------------------------------------------------------------------------------- hooks
    def _targets(self, pl_module: "pl.LightningModule") -> list[tuple]:
        """(layer index, module to hook, function to apply, unit dim) of every observed layer, found once."""
        if self._hook_targets is None:
            modules = dict(pl_module.named_modules())
            shared = shared_activations(self.groups)  # one activation module after several layers: hook the layers
            self._hook_targets = [
                (gi, *activation_hook_target(g, modules, shared), unit_dim_for(g.module))
                for gi, g in enumerate(self.groups) if g.info is not None and not g.frozen
            ]
        return self._hook_targets

    def _attach_hooks(self, pl_module: "pl.LightningModule", want_hist: bool) -> None:
        acc = self._act_acc
        for gi, target, fn, unit_dim in self._targets(pl_module):
            g = self.groups[gi]
            act = g.activation

            def hook(mod, inp, out, gi=gi, g=g, fn=fn, act=act, unit_dim=unit_dim, want_hist=want_hist):
                if not self._logging or gi in acc:  # between logging steps (hooks kept), or a second call
                    return
                try:
                    y = out[0] if isinstance(out, (tuple, list)) else out
                    if not isinstance(y, torch.Tensor):
                        raise TypeError(f"output of type {type(y).__name__}")
                    # an output autograd keeps until backward anyway (ReLU, sigmoid, tanh) waits to be reduced with
                    # the others in on_before_backward; any other (or one the hook computes) is reduced at once
                    held = fn is None and kept_by_autograd(y)
                    y = y.detach()
                    if fn is not None:
                        y = fn(y)
                    acc.add(gi, y, act, unit_dim, held=held)
                    if want_hist:
                        self._act_hists[gi] = histogram(y, self.histogram_bins)
                except Exception as err:  # noqa: BLE001 - diagnostics never break training
                    self._warn_layer(g.name, err)

            self._hooks.append(target.register_forward_hook(hook))

    def _warn_layer(self, name: str, err: Exception) -> None:
        if name not in self._failed_hooks:
            self._failed_hooks.add(name)
            rank_zero_warn(f"GradientMonitor: no activation statistics for layer `{name}` ({err}); skipped")

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._hooks_hist = None

    def _warn_layer_index(self, gi: int, err: Exception) -> None:
        self._warn_layer(self.groups[gi].name, err)

    def _is_hist_step(self, step: int) -> bool:
        return self.histogram_every_n_steps > 0 and step % self.histogram_every_n_steps == 0

    # ------------------------------------------------------------------------------- the step
    def _plan_for(self, key: tuple[int, ...]) -> GradStatsPlan:
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = GradStatsPlan([self.groups[i] for i in key], self.memory_fraction, self._sharded)
        return plan

    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: torch.Tensor) -> None:
        if self._logging:
            # before backward frees the outputs; stacked in the packed gradient buffer, free until the optimizer
            # step (unless an update-ratio copy is in it: manual optimization, a second backward after a step)
            scratch = [] if self._trackers_used else [b for plan in self._plans.values() for b in plan.scratch_buffers()]
            self._act_acc.reduce_pending(self._warn_layer_index, scratch)
        if self.nonfinite_check == "auto" and isinstance(loss, torch.Tensor) and loss.device.type == "cpu" \
                and loss.numel() == 1:
            # the loss passed to backward (micro-batches OR together); on the CPU reading it waits for nothing
            bad = not math.isfinite(loss.item())
            self._loss_nonfinite = bad or bool(self._loss_nonfinite)

    def on_before_optimizer_step(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        loss_bad, self._loss_nonfinite = self._loss_nonfinite, None
        mine = self._mine_of(optimizer)
        if not mine or (not self._logging and self.nonfinite_check == "logging_steps"):
            return
        key = (step, id(optimizer))
        norms = step_norms_for(trainer)
        sq: Optional[torch.Tensor] = None
        plan = self._plan_for(mine)
        # manual optimization: each optimizer once per batch
        todo = tuple(i for i in mine if i not in self._grad) if self._logging else ()
        if todo:
            tplan = self._plan_for(todo)
            sums, maxes = tplan.moments()  # this rank's parts; ranks are combined at the end of the step
            self._step_stats.append((todo, sums, maxes, tplan))
            for gi in todo:
                self._grad[gi] = sums  # marks the layer as done this step
            if tplan is plan and tplan.tensor_sq is not None:
                sq = tplan.tensor_sq
                norms.publish(key, plan.params, sq)  # GradientClipping after us reads no gradient again
            tracker = self._trackers.get(todo)
            if tracker is None:
                tracker = self._trackers[todo] = UpdateTracker([self.groups[i] for i in todo], self.memory_fraction,
                                                                self._sharded)
            # the copies go into the statistics' packed buffer (free once the moments are taken): one allocation of
            # at most memory_fraction of the parameters serves both
            tracker.begin(tplan.scratch_buffers())
            self._trackers_used.append((todo, tracker, tplan))
        if self.nonfinite_check == "logging_steps":
            return
        if sq is None:
            sq = norms.lookup(key, plan.params)  # GradientClipping before us: its norms of these gradients
        if sq is None:
            cheap = self.nonfinite_check == "auto" and loss_bad is not None  # CPU: a host read waits for nothing
            if cheap and not loss_bad:
                return  # the loss is finite: gradients are looked at on logging steps
            if cheap and step > 0 and not (self._nf_seen is not None and bool(self._nf_seen)):
                # the loss just turned non-finite. Weights that are non-finite now got it from the previous
                # step's update, i.e. from that step's gradients (a NaN born in backward under a finite loss):
                # name that step and those layers
                wsq = self._tensor_sq(plan, weights=True)
                if wsq is not None and not bool(torch.isfinite(wsq).all()):
                    self._track_nonfinite(mine, plan, wsq, step - 1, hard=False)
                    return
            sq = self._tensor_sq(plan)
            if sq is None:
                return
            norms.publish(key, plan.params, sq)
        self._track_nonfinite(mine, plan, sq, step)

    def _mine_of(self, optimizer: torch.optim.Optimizer) -> tuple[int, ...]:
        """The layers of ``optimizer``'s parameters (found once per optimizer and parameter count)."""
        count = sum(len(grp["params"]) for grp in optimizer.param_groups)
        cached = self._mine.get(id(optimizer))
        if cached is None or cached[0] != count:
            mine = tuple(sorted({self._index[id(p)] for grp in optimizer.param_groups for p in grp["params"]
                                 if id(p) in self._index}))
            cached = self._mine[id(optimizer)] = (count, mine)
        return cached[1]

    def _tensor_sq(self, plan: GradStatsPlan, weights: bool = False) -> Optional[torch.Tensor]:
        """Squared norm of each of ``plan``'s gradients (0 where there is none), or of its parameters with
        ``weights=True``: one ``_foreach_norm`` pass."""
        if weights:
            have = [(k, local(p.detach())) for k, p in enumerate(plan.params)]
        else:
            have = [(k, local(p.grad)) for k, p in enumerate(plan.params) if p.grad is not None]
        if not have:
            return None
        sq = torch.stack(torch._foreach_norm([g for _, g in have], 2)).float() ** 2
        if len(have) == len(plan.params):
            return sq
        index = self._index_on(tuple(k for k, _ in have), sq.device)
        return torch.zeros(len(plan.params), device=sq.device).index_copy_(0, index, sq)

    def _track_nonfinite(self, mine: tuple[int, ...], plan: GradStatsPlan, sq: torch.Tensor, step: int,
                         hard: bool = True) -> None:
        """Remember, on the device, the first step with a NaN/Inf gradient and which layers had one, and the first
        step with a gradient norm above ``exploding_hard_norm``, from each gradient's squared norm ``sq`` (a
        handful of small ops; nothing crosses to the host until the next logging step). Each optimizer's
        parameter set keeps its own flags, so several optimizers do not reset each other's record."""
        dev = sq.device
        if hard and dev.type == "cpu" and sq.numel() and not self._sharded:
            # on the CPU a host read waits for nothing: one read says whether there is anything to record (a
            # NaN/Inf makes the maximum NaN/Inf); the device bookkeeping below runs only then. Not under FSDP2:
            # there the records' layout must be the same on every rank (one collective combines them)
            top_sq = float(sq.max())
            if math.isfinite(top_sq) and math.sqrt(top_sq) <= self.exploding_hard_norm:
                return
        if self._nf_seen is None or self._nf_seen.device != dev:
            self._nf_seen = torch.zeros((), dtype=torch.bool, device=dev)
            self._nf_step = torch.full((), -1, dtype=torch.long, device=dev)
            self._hard = to_device([0.0, -1.0, 0.0, -1.0], dev)
            self._nf_flags, self._nf_index = {}, {}
        norms = sq.float().sqrt()
        bad = ~torch.isfinite(norms)
        layer_bad = plan.per_group(bad.float(), "amax") > 0
        flags = self._nf_flags.get(mine)
        if flags is None:
            flags = torch.zeros(len(mine), dtype=torch.bool, device=dev)
        first = bad.any() & ~self._nf_seen
        self._nf_flags[mine] = torch.where(first, layer_bad, flags)
        self._nf_step = torch.where(first, step, self._nf_step)
        self._nf_seen = self._nf_seen | first
        if not hard:  # ``sq`` holds weight norms: no exploding-gradient check
            return
        # a huge but finite gradient norm fires the exploding detector at once, even between logging steps
        big = torch.where(bad, torch.zeros_like(norms), norms)
        top, at = big.max(dim=0)
        new_hard = (top > self.exploding_hard_norm) & (self._hard[0] == 0)
        if mine not in self._nf_index:  # parameter -> layer (global index), built once
            self._nf_index[mine] = to_device([float(mine[k]) for k in plan._group_index], dev)
        group = self._nf_index[mine].index_select(0, at.reshape(1)).squeeze(0)  # no host read of `at`
        cand = torch.stack([torch.ones((), device=dev), torch.full((), float(step), device=dev), top, group])
        self._hard = torch.where(new_hard, cand, self._hard)

    def _track_loss(self, outputs: Any, step: int) -> None:
        """Keep this batch's training loss for the window (a detached scalar: no kernel, no host transfer)."""
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            return
        loss = loss.detach()
        self._losses.append(loss if loss.dim() == 0 else loss.reshape(()))
        self._loss_steps.append(step)

    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._done:
            self._drain(trainer)  # what the writer thread finished since: other loggers, detectors, heatmap
        if self.detect:
            self._track_loss(outputs, self._batch_step)
        if not self._grad:
            return  # not a logging step, or (accumulation) the optimizer step is still to come
        step = self._log_step if self._log_step is not None else trainer.global_step
        nxt = trainer.global_step
        try:
            self._finish_step(trainer, step)
        finally:
            # the next step logs too (e.g. ``log_every_n_steps=1``): its hooks are these, kept (no removal and
            # re-registration of a hook per layer every step); they do nothing until it starts
            self._end_step(keep_hooks=self._is_log_step(nxt) and nxt != step)

    def _end_step(self, keep_hooks: bool = False) -> None:
        """Drop this step's records and remove the forward hooks (after the step, a crash, or teardown), unless
        ``keep_hooks``."""
        self._logging = False
        self._grad.clear()
        self._step_stats.clear()
        self._trackers_used.clear()
        self._act_acc.clear()
        self._act_hists.clear()
        if not keep_hooks:
            self._remove_hooks()

    def _flush_writer(self, trainer: "pl.Trainer") -> None:
        """Wait for the writer thread and take in what it finished: nothing submitted is lost."""
        if self._writer is not None:
            self._writer.flush()
        self._drain(trainer)

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._end_step()
        try:
            self._flush_writer(trainer)
        finally:
            flush(trainer)

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._end_step()
        if self._writer is not None:
            try:
                self._flush_writer(trainer)
            finally:
                self._writer.close()
                flush(trainer)

    def _finish_step(self, trainer: "pl.Trainer", step: int) -> None:
        """Gather this logging step's device values (combining ranks under FSDP2), start their one copy to the
        host and hand them to the writer thread. Nothing here waits for the device."""
        idx = sorted(self._grad)
        sub = [self.groups[i] for i in idx]
        pos = {gi: k for k, gi in enumerate(idx)}
        dev = self._step_stats[0][1].device
        n = len(idx)
        raw = torch.zeros(n, 6, device=dev)
        wsq = torch.zeros(n, device=dev)
        usq = torch.zeros(2, n, device=dev)
        measured = [False] * n
        for todo, sums, maxes, tplan in self._step_stats:
            at = self._positions(todo, pos, dev)
            raw.index_copy_(0, at, torch.cat([sums, maxes[:, None]], dim=1).to(dev))
            wsq.index_copy_(0, at, tplan.weight_sq().to(dev))  # after the optimizer step
        for todo, tracker, _ in self._trackers_used:
            at = self._positions(todo, pos, dev)
            upd, was = tracker.finish()
            usq.index_copy_(1, at, upd.to(dev))
            for k, flag in enumerate(was.tolist()):  # a mask built on the host: no device read
                measured[pos[todo[k]]] = measured[pos[todo[k]]] or flag
        nf_keys = list(self._nf_flags)  # one flag vector per optimizer's parameter set, in _pending's order
        nf_layers = (torch.cat([self._nf_flags[k].float().to(dev) for k in nf_keys]) if nf_keys
                     else torch.zeros(0, device=dev))
        nf_max: list[torch.Tensor] = []
        if self._nf_seen is not None and self._nf_step is not None:  # first NaN step over ranks: max of -step
            nf_max = [self._nf_seen.float().reshape(1),
                      torch.where(self._nf_seen, -self._nf_step.float(), torch.full((), -1e18, device=dev)).reshape(1)]
        # under FSDP2 every rank holds shards: one collective combines sums and maxima of all of them
        sums, maxes = reduce_sum_max(
            torch.cat([raw[:, :5].flatten(), wsq, usq.flatten()]),
            torch.cat([raw[:, 5], *[t.to(dev) for t in nf_max], nf_layers.to(dev)]), enabled=self._sharded,
        )
        grad = grad_statistics_from(sums[: 5 * n].view(n, 5), maxes[:n])
        wnorm = sums[5 * n : 6 * n].sqrt()
        ratio = update_ratios_from(sums[6 * n :].view(2, n))
        act_idx, acts = self._act_acc.finish(dev, only=set(idx), on_error=self._warn_layer_index)
        hard, loss, _, _, _ = self._pending(dev)
        nf = [maxes[n : n + 1], torch.where(maxes[n] > 0, -maxes[n + 1], -1.0).reshape(1)] if nf_max else []
        nf_layers = maxes[n + len(nf_max) :]
        hist_tags, hists = self._histograms(idx, sub) if self._is_hist_step(step) else ([], [])
        tensors = [grad, wnorm, ratio, acts, hard, loss, *nf, nf_layers, *hists]
        ctx = _StepContext(step, idx, sub, act_idx, measured, nf_keys, len(nf), hist_tags, self._window_steps)
        if self._writer is None:
            self._writer = BackgroundWriter()
        self._writer.submit(tensors, lambda host: self._write(trainer, ctx, host))  # one device → host transfer

    def _positions(self, todo: tuple[int, ...], pos: dict[int, int], dev: torch.device) -> torch.Tensor:
        return self._index_on(tuple(pos[gi] for gi in todo), dev)

    def _index_on(self, values: tuple[int, ...], dev: torch.device) -> torch.Tensor:
        """``values`` as a long tensor on ``dev``, made once per (values, device): not a copy to the device on
        every step that needs it."""
        key = (values, str(dev))
        at = self._pos_cache.get(key)
        if at is None:
            at = self._pos_cache[key] = to_device(values, dev, torch.long)
        return at

    def _tags(self, i: int) -> tuple[list[str], str, str, str, list[str]]:
        """Layer ``i``'s scalar tags, made once."""
        tags = self._tag_cache.get(i)
        if tags is None:
            name = self.groups[i].name
            tags = self._tag_cache[i] = ([f"{s}/{name}" for s in GRAD_STATS], f"log10_grad_norm/{name}",
                                         f"weight_norm/{name}", f"update_ratio/{name}", [f"{s}/{name}" for s in ACT_STATS])
        return tags

    def _label(self, i: int) -> str:
        """Layer ``i``'s label (made once)."""
        label = self._label_cache.get(i)
        if label is None:
            label = self._label_cache[i] = self.groups[i].label()
        return label

    def _layout(self, ctx: "_StepContext") -> tuple[list[str], list[int]]:
        """The scalar tags of a logging step and, for each, its position in the host values laid out as
        ``grad (n × 6) | log10 norm (n) | weight norm (n) | update ratio (n) | activations (n_act × 4)``; made once
        per set of layers and activation rows. The update ratios measured this step (a rotating subset) are not
        in it: they go after it (see :meth:`_write`), so that the large part repeats from step to step."""
        key = (tuple(ctx.idx), tuple(ctx.act_idx))
        cached = self._layout_cache.get(key)
        if cached is not None:
            return cached
        if len(self._layout_cache) > 64:
            self._layout_cache.clear()
        k, ka, n = len(GRAD_STATS), len(ACT_STATS), len(ctx.idx)
        act_at = {i: j for j, i in enumerate(ctx.act_idx)}
        tags: list[str] = []
        order: list[int] = []
        for j, i in enumerate(ctx.idx):
            grad_tags, log_tag, w_tag, _, act_tags = self._tags(i)
            tags += grad_tags + [log_tag, w_tag]
            order += [j * k + c for c in range(k)] + [n * k + j, n * k + n + j]
            ja = act_at.get(i)
            if ja is not None:
                tags += act_tags
                order += [n * k + 3 * n + ja * ka + c for c in range(ka)]
        self._layout_cache[key] = (tags, order)
        return tags, order

    def _write(self, trainer: "pl.Trainer", ctx: "_StepContext", host: list[list[float]]) -> None:
        """On the writer thread: format this logging step's values and write them to TensorBoard; queue the
        rest (other loggers, detectors, heatmap) for the training thread."""
        grad_h, wnorm_h, ratio_h, acts_h, hard_h, loss_h = host[:6]
        nf_h = host[6 : 6 + ctx.n_nf]
        nf_layers_h = host[6 + ctx.n_nf]
        hist_h = host[7 + ctx.n_nf :]
        k, ka = len(GRAD_STATS), len(ACT_STATS)
        tags, order = self._layout(ctx)
        log10 = math.log10
        norms = grad_h[0::k]
        logs = [log10(v) if 0 < v < math.inf else (-30.0 if v == 0 else math.nan) for v in norms]
        flat = grad_h + logs + wnorm_h + ratio_h + acts_h  # the values in the order ``order`` indexes
        values = list(itemgetter(*order)(flat)) if len(order) > 1 else [flat[p] for p in order]
        rows: list[LayerRow] = []
        act_at = {i: j for j, i in enumerate(ctx.act_idx)}
        for j, (i, g) in enumerate(zip(ctx.idx, ctx.sub)):
            if ctx.measured[j]:
                self._ratios[i] = ratio_h[j]
            ja = act_at.get(i)
            a = None if ja is None else acts_h[ja * ka : (ja + 1) * ka]
            dead = a[2] if a is not None and g.activation in ("relu", "relu6") else None
            sat = a[3] if a is not None and g.activation in ("sigmoid", "tanh") else None
            act_ok = None if a is None else (math.isfinite(a[0]) and math.isfinite(a[1]))
            rows.append(LayerRow(g.name, self._label(i), g.activation, norms[j], grad_h[j * k + 5], dead, sat,
                                 _is_compute(g), self._ratios.get(i), act_ok))
        total = math.sqrt(sum(n * n for n in norms)) if all(math.isfinite(n) for n in norms) else float("nan")
        weighted = [r.grad_norm for r, g in zip(rows, ctx.sub) if g.info is not None]
        flow = weighted[0] / weighted[-1] if len(weighted) > 1 and weighted[-1] > 0 else float("nan")
        metrics = dict(zip(tags, values))
        metrics.update({"gradguard/grad_norm_total": total, "gradguard/flow_ratio": flow,
                        "gradguard/nonfinite_total": sum(r.grad_nonfinite for r in rows)})
        stable = len(metrics)  # the same tags at every logging step; then this step's measured update ratios
        metrics.update({self._tags(i)[3]: ratio_h[j] for j, i in enumerate(ctx.idx) if ctx.measured[j]})
        log_metrics(trainer, metrics, ctx.step, loggers="tensorboard", split=stable)
        for tag, hv in zip(ctx.hist_tags, hist_h):
            log_histogram(trainer, tag, hv, ctx.step)
        self._done.append((ctx, metrics, rows, total, norms, hard_h, loss_h, nf_h, nf_layers_h))

    def _drain(self, trainer: "pl.Trainer") -> None:
        """On the training thread: what the writer thread finished (in order): the scalars for loggers other than
        TensorBoard, the heatmap column and picture, and the health detectors."""
        while self._done:
            ctx, metrics, rows, total, norms, hard_h, loss_h, nf_h, nf_layers_h = self._done.popleft()
            log_metrics(trainer, metrics, ctx.step, loggers="others")
            sub = ctx.sub
            pic = [j for j, g in enumerate(sub) if g.info is not None] or list(range(len(sub)))  # weighted layers
            self._last_norms, self._last_names = [norms[j] for j in pic], [sub[j].name for j in pic]
            self._history = (self._history + [self._last_norms])[-10:]
            ratios = {sub[j].name: rows[j].update_ratio for j in pic if rows[j].update_ratio is not None}
            self._add_column(ctx.step, {sub[j].name: norms[j] for j in pic}, ratios)
            if self.figure_every_n_steps and ctx.step % self.figure_every_n_steps == 0:
                self._draw(trainer, ctx.step)
            if self.detect:
                loss_h = _loss_on_host(loss_h, ctx.loss_steps)
                self._detect(trainer, ctx.step, rows, total, hard_h, loss_h, nf_h, ctx.nf_keys, nf_layers_h)

    def _pending(self, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[tuple], torch.Tensor]:
        """The device-side records the every-step checks kept since the last logging step (not yet on the host)."""
        nf = [t.float() for t in (self._nf_seen, self._nf_step) if t is not None]
        nf_keys = list(self._nf_flags)
        nf_layers = (torch.cat([self._nf_flags[k].float().to(dev) for k in nf_keys]) if nf_keys
                     else torch.zeros(0, device=dev))
        hard = self._hard.to(dev) if self._hard is not None else torch.zeros(4, device=dev)
        if self._input_std is not None:
            hard = torch.cat([hard, self._input_std.to(dev).reshape(1)])
            self._input_std = None
        if self._losses:
            v = torch.stack([t.to(dev) for t in self._losses]).float()
            bad = ~torch.isfinite(v)
            first = bad.int().argmax().float()  # position of the first non-finite loss; its step on the host
            loss = torch.stack([v.mean(), torch.where(bad.any(), first, torch.full_like(first, -1.0)),
                                torch.full((), float(len(self._losses)), device=dev)])
        else:
            loss = torch.zeros(0, device=dev)
        self._window_steps = self._loss_steps
        self._losses, self._loss_steps = [], []  # next window
        return hard, loss, nf, nf_keys, nf_layers

    def _flush_pending(self, trainer: "pl.Trainer") -> None:
        """At the end of fit: report what happened after the last logging step (a NaN at step 1 of a run logged
        every 50 steps, the last loss window), in one transfer."""
        dev = next((t.device for t in (self._nf_seen, *self._losses[:1]) if t is not None), None)
        if dev is None:
            return
        hard, loss, nf, nf_keys, nf_layers = self._pending(dev)
        host = to_host(hard, loss, *nf, nf_layers)
        step = max(trainer.global_step - 1, 0)  # the last optimizer step taken
        loss_h = _loss_on_host(host[1], self._window_steps)
        self._detect(trainer, step, [], float("nan"), host[0], loss_h, host[2 : 2 + len(nf)], nf_keys, host[2 + len(nf)])

    def _detect(self, trainer: "pl.Trainer", step: int, rows: list[LayerRow], total: float, hard_h: list[float],
                loss_h: list[float], nf_h: list[list[float]], nf_keys: list[tuple], nf_layers_h: list[float]) -> None:
        amp = getattr(trainer.precision_plugin, "scaler", None) is not None
        if loss_h:  # the loss first, so a non-finite finding knows whether the loss was already non-finite
            bad_loss = int(loss_h[1]) if loss_h[1] >= 0 else None
            self._report(trainer, self.detector.update_loss(step, loss_h[0], bad_loss, steps=int(loss_h[2])))
        nf_step = int(nf_h[1][0]) if nf_h and nf_h[0][0] > 0 else None
        if len(hard_h) > 4 and self._input_layer is not None:
            g = self._input_layer
            self._report(trainer, self.detector.input_scale(step, g.name, g.label(), hard_h[4]))
        if hard_h[0] > 0 and not self._hard_reported and (nf_step is None or hard_h[1] <= nf_step):
            g = self.groups[int(hard_h[3])]
            self._report(trainer, self.detector.exploding_at(int(hard_h[1]), g.name, g.label(), hard_h[2]))
        self._hard_reported = self._hard_reported or hard_h[0] > 0
        if nf_step is not None and not self._nf_reported and (nf_step != step or not rows):
            # the first step with NaN/Inf was between logging steps: report the layers recorded then
            flags, k = {}, 0
            for key in nf_keys:
                for gi in key:
                    flags[gi] = flags.get(gi, False) or nf_layers_h[k] > 0
                    k += 1
            bad_rows = [LayerRow(self.groups[i].name, self.groups[i].label(), None, float("nan"), 1.0,
                                 weighted=_is_compute(self.groups[i])) for i in sorted(i for i, f in flags.items() if f)]
            self._report(trainer, self.detector.update(nf_step, bad_rows, float("nan"), amp))
        self._nf_reported = nf_step is not None or self._nf_reported
        if rows:
            self._report(trainer, self.detector.update(step, rows, total, amp))

    def _histograms(self, idx: list[int], sub: list) -> tuple[list[str], list[torch.Tensor]]:
        """Tags (``<layer>/<weight|bias|...>``) and on-device bin counts of every gradient, weight and recorded
        activation of ``sub`` (the groups at indices ``idx``; under FSDP2: this rank's shards)."""
        hist_tags: list[str] = []
        hists: list[torch.Tensor] = []
        for i, g in zip(idx, sub):
            for pname, p in zip(self._param_names[i], g.params):
                suffix = f"{g.name}/{pname}" if pname else g.name
                if p.grad is not None:
                    hist_tags.append(f"hist_grad/{suffix}")
                    hists.append(histogram(local(p.grad), self.histogram_bins))
                hist_tags.append(f"hist_weight/{suffix}")
                hists.append(histogram(local(p), self.histogram_bins))
        for i, h in self._act_hists.items():
            hist_tags.append(f"hist_act/{self.groups[i].name}")
            hists.append(h)
        return hist_tags, hists

    def _report(self, trainer: "pl.Trainer", findings: list) -> None:
        by_step: dict[int, list[Finding]] = {}
        for f in findings:
            if self.warn:
                rank_zero_warn(f"gradguard: {f.message}")
            by_step.setdefault(f.step, []).append(f)
        for step, found in by_step.items():  # one table (one text event, one flush) per step, however many rows
            log_markdown(trainer, "gradguard/findings", findings_markdown(found), step=step)

    def _add_column(self, step: int, norms: dict[str, float], ratios: dict[str, float]) -> None:
        """One heatmap column per logging step; past HEATMAP_COLUMNS every other column is dropped and from
        then on only every other logging step is kept (memory stays bounded on long runs)."""
        self._seen_log_steps += 1
        if (self._seen_log_steps - 1) % self._thin:
            return
        self._columns.append((step, norms, ratios))
        if len(self._columns) > HEATMAP_COLUMNS:
            self._columns = self._columns[::2]
            self._thin *= 2

    def _draw(self, trainer: "pl.Trainer", step: int) -> None:
        if not self._last_norms or not trainer.is_global_zero:
            return
        from lightning_gradguard.figures import gradient_flow_image, gradient_heatmap_image

        img = gradient_flow_image(self._last_names, self._last_norms, f"gradient flow, step {step}", self._history[:-1])
        log_image(trainer, "gradguard/gradient_flow", img, step)
        names = self._last_names
        steps = [c[0] for c in self._columns]
        heat = gradient_heatmap_image(
            names, steps, [[c[1].get(n) for c in self._columns] for n in names],
            [[c[2].get(n) for c in self._columns] for n in names], f"gradients by layer and step, up to step {step}")
        log_image(trainer, "gradguard/heatmap", heat, step)

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._remove_hooks()
        self._flush_writer(trainer)  # every logging step written and taken in before the summary
        self._draw(trainer, trainer.global_step)
        if self.detect:
            self._flush_pending(trainer)
            summary = self.detector.summary()
            rank_zero_info(summary)
            md = summary_markdown(self.detector.findings) if self.detector.findings else summary
            log_markdown(trainer, "gradguard/summary", md, step=trainer.global_step)
        flush(trainer)

    # ------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"detector": self.detector.state_dict(), "nonfinite_reported": self._nf_reported,
                "exploding_reported": self._hard_reported}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.detector.load_state_dict(state_dict.get("detector", {}))
        self._nf_reported = bool(state_dict.get("nonfinite_reported", False))
        self._hard_reported = bool(state_dict.get("exploding_reported", False))


def _loss_on_host(loss_h: list[float], steps: list[int]) -> list[float]:
    """[mean, position of the first non-finite loss (-1: none), count] with the position turned into its step."""
    if not loss_h or loss_h[1] < 0:
        return loss_h
    return [loss_h[0], float(steps[int(loss_h[1])]), loss_h[2]]


LAYER_COLUMNS = ("layer", "type", "activation", "init", "frozen")
FINDING_COLUMNS = ("step", "layer", "kind", "finding", "what to do")


def _param_names(group: Any) -> list[str]:
    """Each parameter's own name (``weight``, ``bias``, ``weight_ih_l0``, ...) in the group's order."""
    own = {id(p): n for n, p in group.module.named_parameters(recurse=False)}
    names = [own.get(id(p), str(k)) for k, p in enumerate(group.params)]
    if len(names) == 1 and group.name.endswith("." + names[0]):
        return [""]  # per_parameter=True: the group is already named after its parameter
    return names


def _init_schemes(trainer: "pl.Trainer") -> dict[str, str]:
    """Layer name -> init scheme applied, from the WeightInitialization callbacks on the Trainer (GradGuard's too)."""
    from lightning_gradguard.callbacks.weight_init import WeightInitialization

    found: dict[str, str] = {}
    for cb in trainer.callbacks:
        for c in (cb, *getattr(cb, "subs", {}).values()):
            if isinstance(c, WeightInitialization):
                for r in c.records:
                    found[r.layer] = r.scheme
    # after BatchNormInsertion a layer lives on as `<name>.layer` inside its wrapper
    return {**found, **{f"{k}.layer": v for k, v in found.items()}}


def _split_message(f: Finding) -> tuple[str, str]:
    """A finding's message without its ``step N:`` prefix and without the remedy (its own column)."""
    msg = f.message
    prefix = f"step {f.step}: "
    if msg.startswith(prefix):
        msg = msg[len(prefix):]
    remedy = REMEDY.get(f.kind, "")
    if remedy and msg.endswith("; " + remedy):
        msg = msg[: -len(remedy) - 2]
    return msg, remedy or "-"


def findings_markdown(findings: list[Finding]) -> str:
    """Findings as a markdown table: step, layer, kind, finding, what to do (``gradguard report`` reads it back)."""
    rows = []
    for f in findings:
        msg, remedy = _split_message(f)
        rows.append((str(f.step), f"`{f.layer}`", f.kind, msg, remedy))
    return markdown_table(FINDING_COLUMNS, rows)


def summary_markdown(findings: list[Finding]) -> str:
    """The end-of-fit summary: one row per (kind, layer) with how often and when first seen."""
    seen: dict[tuple[str, str], list[Finding]] = {}
    for f in findings:
        seen.setdefault((f.kind, f.layer), []).append(f)
    rows = []
    for (kind, layer), fs in seen.items():
        msg, remedy = _split_message(fs[0])
        rows.append((kind, f"`{layer}`", str(len(fs)), str(fs[0].step), msg, remedy))
    head = ("kind", "layer", "times", "first step", "finding", "what to do")
    return f"**{len(findings)} findings**\n\n" + markdown_table(head, rows)
