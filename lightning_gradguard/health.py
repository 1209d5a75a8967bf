"""Health detectors: per-layer statistics and the training loss in, plain-language findings out.

Gradient detectors run on the per-layer rows of a logging step (:meth:`HealthDetector.update`); training-
progress detectors run on the mean training loss of each logging window, pooled to at least ``min_window_steps``
steps (:meth:`HealthDetector.update_loss`).
A condition must hold on ``patience`` consecutive logging steps before it fires (except where noted), and once
fired a detector stays quiet for that layer until the condition has been clear for ``patience`` logging steps.
Every finding names a cause and says what preceded it where that is known.

==============  ========================================================================  =================
kind            fires when                                                                default
==============  ========================================================================  =================
exploding       a layer's gradient norm > ``exploding_hard_norm``: at once, no patience   1e5
                a layer's norm > ``exploding_norm``, or the total norm grew               1e3, ×10
                ×``growth_factor`` on each of ``patience`` logging steps
nonfinite       NaN/Inf in a gradient, at once: names the layer nearest the loss          —
                (backward order) that has one, whether the loss itself was already
                non-finite (produced in forward: the first layer whose output was
                non-finite, when a logging step saw it) and the total norm's trend
                over the logging steps before it; under AMP: ``amp_overflow``
vanishing       the weighted compute layers (Linear/Conv/RNN/attention; not norm          1e-3, 1e-7
                layers, embeddings, position tables, nor gradients exactly 0) from the
                input up to some depth (at least a quarter of them, and 2) all have a
                norm < ``vanishing_ratio`` × the median norm of the output-side half of
                those layers (or every weighted layer < ``vanishing_norm``): names the
                depth where it collapses
dead_relu       > ``dead_fraction`` of a ReLU layer's units output 0 for the whole batch  0.5
saturation      > ``saturated_fraction`` of a sigmoid/tanh layer's outputs near a bound   0.5
not_converging  after ``progress_min_steps`` steps the loss is less than                  100, 10%
                ``min_loss_drop`` below the first window's
plateau         the loss fell, then improved less than ``min_loss_drop`` (relative) over   10%
                the last quarter of the windows (at least 4), and is still above half
                the first window's
oscillation     AUTOTRAINER's unstable-loss rule on window means: at least                0.25, 5%
                ``oscillation_rate`` of the windows are a peak followed by a trough more
                than ``oscillation_amplitude`` × the first window's loss below it
update_ratio    the median ‖Δw‖/‖w‖ of the weighted layers is > ``update_ratio_high``, or   0.1, 1e-5
                the largest is < ``update_ratio_low`` (around 1e-3 is the rule of thumb)
unnormalized_   the first compute layer's input has std > ``input_std_max`` (at once)     20
input
frozen          a weighted layer never updates: frozen (``requires_grad=False``) between  at fit start
                trained layers, or trainable but in no optimizer
==============  ========================================================================  =================

The progress rules follow AUTOTRAINER (Zhang et al., "AUTOTRAINER: An Automatic DNN Training Problem
Detection and Repair System", ICSE 2021): judge only after part of the run (``progress_min_steps``), slow
convergence as a small best improvement, unstable loss as many large peak-to-trough swings.

Example:
    >>> detector = HealthDetector(patience=3)
    >>> rows = [LayerRow("fc1", "layer `fc1`", "relu", 1e-9), LayerRow("fc2", "layer `fc2`", "relu", 1e-8),
    ...         LayerRow("fc3", "layer `fc3`", None, 1.0)]
    >>> [f.kind for f in detector.update(0, rows, 1.0)] + [f.kind for f in detector.update(1, rows, 1.0)]
    []
    >>> [f.kind for f in detector.update(2, rows, 1.0)]
    ['vanishing']
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

REMEDY = {
    "vanishing": "try he/glorot init matched to the activation (WeightInitialization('auto')), BatchNorm, "
    "or a non-saturating activation",
    "exploding": "try gradient clipping (GradientClipping('norm') or 'percentile'), a smaller learning rate, "
    "or an init matched to the activation",
    "nonfinite": "GradientClipping(on_nonfinite='skip') skips such steps",
    "amp_overflow": "the GradScaler skipped this step and lowers its scale; only a concern if it keeps happening",
    "dead_relu": "try LeakyReLU/ELU (ActivationReplacement), He init, a lower learning rate, or less negative biases",
    "saturation": "try Glorot init, BatchNorm before the activation, or a non-saturating activation",
    "not_converging": "check the learning rate (too low?), the input scaling, the loss/labels (e.g. softmax applied "
    "before a loss that expects logits) and the gradient findings above",
    "plateau": "try a learning-rate schedule or a larger learning rate, normalized inputs, or BatchNorm",
    "oscillation": "the learning rate is probably too high: lower it, or add a warm-up / gradient clipping",
    "update_ratio_high": "the learning rate is probably too high (updates of ~1e-3 of the weights are typical)",
    "update_ratio_low": "the learning rate is probably too low (updates of ~1e-3 of the weights are typical)",
    "unnormalized_input": "standardize the inputs (subtract the mean, divide by the std, or scale pixels to [0, 1]); "
    "large inputs make the first layer's gradients and the pre-activations huge",
    "frozen": "check requires_grad and that configure_optimizers passes every parameter you mean to train",
}

GRADIENT_KINDS = ("vanishing", "exploding", "nonfinite", "amp_overflow", "dead_relu", "saturation", "unnormalized_input")
PROGRESS_KINDS = ("not_converging", "plateau", "oscillation", "update_ratio", "frozen")


@dataclass
class Finding:
    """One diagnosis: what, where, when, the measured value, and the message shown to the user."""

    kind: str
    layer: str
    step: int
    value: float
    message: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LayerRow:
    """The statistics of one layer on one logging step (host values).

    ``weighted``: a weight-carrying compute layer (Linear, Conv, RNN, attention); norm layers, embeddings and
    other parameter owners are ``False`` and take no part in the vanishing / update-ratio rules.
    ``act_finite``: whether the observed activation output was finite (``None``: not observed).
    """

    name: str
    label: str
    activation: Optional[str]
    grad_norm: float
    grad_nonfinite: float = 0.0
    dead_frac: Optional[float] = None
    saturated_frac: Optional[float] = None
    weighted: bool = True
    update_ratio: Optional[float] = None
    act_finite: Optional[bool] = None


@dataclass
class _Track:
    streak: int = 0
    clear: int = 0
    fired: bool = False


def _fmt_trend(values: Sequence[float]) -> str:
    return " → ".join(f"{v:.3g}" for v in values)


@dataclass
class HealthDetector:
    """Stateful detectors with hysteresis; :meth:`update` once per logging step, :meth:`update_loss` once per
    logging window's mean loss."""

    vanishing_norm: float = 1e-7
    vanishing_ratio: float = 1e-3
    exploding_norm: float = 1e3
    growth_factor: float = 10.0
    dead_fraction: float = 0.5
    saturated_fraction: float = 0.5
    patience: int = 3
    exploding_hard_norm: float = 1e5
    progress_min_steps: int = 100
    min_loss_drop: float = 0.1
    oscillation_rate: float = 0.25
    oscillation_amplitude: float = 0.05
    update_ratio_high: float = 0.1
    update_ratio_low: float = 1e-5
    input_std_max: float = 20.0
    min_window_steps: int = 10
    tracks: dict[str, _Track] = field(default_factory=dict)
    last_total: Optional[float] = None
    growth_streak: int = 0
    totals: list[tuple[int, float]] = field(default_factory=list)
    losses: list[tuple[int, float]] = field(default_factory=list)
    loss_nonfinite_step: Optional[int] = None
    loss_buffer: list[float] = field(default_factory=lambda: [0.0, 0.0])  # [sum of losses, steps] not yet a window
    findings: list[Finding] = field(default_factory=list)

    def _hyst(self, key: str, condition: bool, patience: Optional[int] = None) -> bool:
        """True exactly when ``condition`` has held ``patience`` times in a row and has not fired yet."""
        need = self.patience if patience is None else patience
        t = self.tracks.setdefault(key, _Track())
        if condition:
            t.streak, t.clear = t.streak + 1, 0
            if not t.fired and t.streak >= need:
                t.fired = True
                return True
        else:
            t.streak, t.clear = 0, t.clear + 1
            if t.fired and t.clear >= need:
                t.fired = False  # re-armed
        return False

    # ------------------------------------------------------------------------------------------- gradients
    def _preceded(self) -> str:
        """What the logged total gradient norm did before now (the last few finite logging steps)."""
        if not self.totals:
            return "no finite gradient norm was logged before it"
        last = self.totals[-4:]
        trend = _fmt_trend([v for _, v in last])
        steps = f"steps {last[0][0]}–{last[-1][0]}" if len(last) > 1 else f"step {last[0][0]}"
        if len(last) > 1 and last[0][1] > 0 and last[-1][1] / last[0][1] >= self.growth_factor:
            return f"the total gradient norm grew ×{last[-1][1] / last[0][1]:.3g} before it ({trend} at {steps})"
        if last[-1][1] > self.exploding_norm:
            return f"the total gradient norm was already huge before it ({trend} at {steps})"
        return f"the total gradient norm looked ordinary before it ({trend} at {steps})"

    def update(self, step: int, rows: Sequence[LayerRow], total_norm: float, amp_overflow: bool = False) -> list[Finding]:
        """Gradient and activation findings of one logging step (``rows`` in forward order)."""
        new: list[Finding] = []
        bad = [r for r in rows if r.grad_nonfinite > 0 or not math.isfinite(r.grad_norm)]
        if self._hyst("nonfinite", bool(bad), patience=1) and bad:
            new.append(self._nonfinite(step, rows, bad, amp_overflow))
        finite_rows = [r for r in rows if math.isfinite(r.grad_norm)]
        if finite_rows and not bad:
            new += self._gradient_norms(step, finite_rows, total_norm)
            new += self._update_ratio(step, finite_rows)
        for r in rows:
            if r.dead_frac is not None and self._hyst(f"dead:{r.name}", r.dead_frac > self.dead_fraction):
                msg = (f"step {step}: {r.label}: {r.dead_frac:.0%} of its units are dead (output 0 for the whole "
                       f"batch) — dying ReLU; {REMEDY['dead_relu']}")
                new.append(Finding("dead_relu", r.name, step, r.dead_frac, msg))
            if r.saturated_frac is not None and self._hyst(f"sat:{r.name}", r.saturated_frac > self.saturated_fraction):
                msg = (f"step {step}: {r.label}: {r.saturated_frac:.0%} of its outputs are saturated — saturating "
                       f"activation; {REMEDY['saturation']}")
                new.append(Finding("saturation", r.name, step, r.saturated_frac, msg))
        if math.isfinite(total_norm) and not bad:
            self.totals = (self.totals + [(step, total_norm)])[-8:]
        self.findings.extend(new)
        return new

    def _nonfinite(self, step: int, rows: Sequence[LayerRow], bad: Sequence[LayerRow], amp: bool) -> Finding:
        first = bad[-1]  # the last layer in forward order with NaN/Inf is the first in backward order
        if amp:
            msg = (f"step {step}: {first.label}: inf/NaN gradients — AMP overflow, the GradScaler skips this "
                   f"step; {REMEDY['amp_overflow']}")
            return Finding("amp_overflow", first.name, step, first.grad_nonfinite, msg)
        origin = next((r for r in rows if r.act_finite is False), None)
        where = first
        if origin is not None:
            where = origin
            cause = (f"NaN/Inf produced in the forward pass: {origin.label} is the first layer whose output was "
                     f"non-finite (look for log of 0, division by 0, sqrt of a negative, exp overflow there)")
        elif self.loss_nonfinite_step is not None and self.loss_nonfinite_step <= step:
            cause = ("the loss itself was already non-finite: NaN/Inf produced in the forward pass "
                     "(log of 0, division by 0, overflow) or by weights already corrupted")
        else:
            cause = (f"the loss was finite, so NaN/Inf arose in the backward pass; {first.label} is where it first "
                     f"appears in backward order (nearest the loss)")
        n = f"{int(first.grad_nonfinite)} non-finite gradient values" if first.grad_nonfinite >= 1 else "non-finite gradients"
        msg = f"step {step}: {where.label}: {n} — {cause}; {self._preceded()}; {REMEDY['nonfinite']}"
        return Finding("nonfinite", where.name, step, first.grad_nonfinite, msg)

    def _gradient_norms(self, step: int, rows: Sequence[LayerRow], total_norm: float) -> list[Finding]:
        new: list[Finding] = []
        # vanishing: over weight-carrying compute layers with a non-zero gradient (exact 0 = unused by design)
        comp = [r for r in rows if r.weighted and r.grad_norm > 0]
        collapse: Optional[int] = None
        ref = 0.0
        if len(comp) >= 2:
            # reference: the median of the output-side half (a classifier head or pooler is not comparable with
            # the body's layers, and the median ignores it); the collapse must cover the input-side prefix of at
            # least a quarter of the layers (one small layer, e.g. an attention key projection at init, is not
            # vanishing by depth)
            tail = comp[-max(1, len(comp) // 2):]
            ref = statistics.median(r.grad_norm for r in tail)
            k = -1
            while k + 1 < len(comp) - len(tail) and comp[k + 1].grad_norm < self.vanishing_ratio * ref:
                k += 1
            collapse = k if k + 1 >= max(2, math.ceil(len(comp) / 4)) else None
        tiny = bool(comp) and all(r.grad_norm < self.vanishing_norm for r in comp)
        if self._hyst("vanishing", collapse is not None or tiny):
            if collapse is not None:
                r = comp[collapse]
                msg = (f"step {step}: {r.label}: gradient norm {r.grad_norm:.2g}, {r.grad_norm / ref:.2g} of the "
                       f"output-side half's median — vanishing gradients: the norm collapses at depth {collapse + 1} of "
                       f"{len(comp)} weighted layers and stays below {self.vanishing_ratio:g}× down to the input "
                       f"({_fmt_trend([c.grad_norm for c in comp])} from input to output); {REMEDY['vanishing']}")
            else:
                r = min(comp, key=lambda c: c.grad_norm)
                msg = (f"step {step}: {r.label}: every weighted layer's gradient norm is below "
                       f"{self.vanishing_norm:g} — vanishing gradients everywhere; {REMEDY['vanishing']}")
            new.append(Finding("vanishing", r.name, step, r.grad_norm, msg))
        biggest = max(rows, key=lambda r: r.grad_norm)
        growing = False
        if self.last_total is not None and self.last_total > 0 and math.isfinite(total_norm):
            self.growth_streak = self.growth_streak + 1 if total_norm / self.last_total >= self.growth_factor else 0
            growing = self.growth_streak >= self.patience
        self.last_total = total_norm if math.isfinite(total_norm) else self.last_total
        hard = biggest.grad_norm > self.exploding_hard_norm
        fire = self._hyst("exploding", biggest.grad_norm > self.exploding_norm or growing or hard)
        if hard and not self.tracks["exploding"].fired:  # above the hard bound: no patience
            fire = self.tracks["exploding"].fired = True
        if fire:
            if hard:
                why = (f"gradient norm {biggest.grad_norm:.3g} > {self.exploding_hard_norm:g} (fires at once)")
            elif biggest.grad_norm > self.exploding_norm:
                why = f"gradient norm {biggest.grad_norm:.3g} > {self.exploding_norm:g} on {self.patience} logging steps"
            else:
                why = f"total gradient norm grew ×{self.growth_factor:g} or more on {self.patience} logging steps in a row"
            trend = _fmt_trend([v for _, v in self.totals[-3:]] + [total_norm])
            msg = (f"step {step}: {biggest.label}: {why} — exploding gradients (total norm {trend} over the last "
                   f"logging steps); {REMEDY['exploding']}")
            new.append(Finding("exploding", biggest.name, step, biggest.grad_norm, msg))
        return new

    def _update_ratio(self, step: int, rows: Sequence[LayerRow]) -> list[Finding]:
        ratios = [r.update_ratio for r in rows if r.weighted and r.update_ratio is not None and r.update_ratio > 0
                  and math.isfinite(r.update_ratio)]
        if len(ratios) < 1:
            self._hyst("update_ratio", False)
            return []
        # too high: the typical layer moves too far; too low: even the layer that moves most barely moves (a
        # median would blame the learning rate for vanishing gradients in the lower layers)
        med, top = statistics.median(ratios), max(ratios)
        high, low = med > self.update_ratio_high, top < self.update_ratio_low
        if not self._hyst("update_ratio", high or low):
            return []
        side = "update_ratio_high" if high else "update_ratio_low"
        bound = self.update_ratio_high if high else self.update_ratio_low
        what = f"median update/weight ratio ‖Δw‖/‖w‖ = {med:.2g} > {bound:g}" if high else (
            f"largest update/weight ratio ‖Δw‖/‖w‖ of any layer = {top:.2g} < {bound:g}")
        msg = f"step {step}: all layers: {what} on {self.patience} logging steps; {REMEDY[side]}"
        return [Finding("update_ratio", "", step, med if high else top, msg)]

    def input_scale(self, step: int, name: str, label: str, std: float) -> list[Finding]:
        """The first compute layer's input has std > ``input_std_max``: unnormalized data (e.g. pixels 0–255)."""
        # a property of the data, not noisy: fires at once (no patience)
        if not self._hyst(f"input:{name}", math.isfinite(std) and std > self.input_std_max, patience=1):
            return []
        msg = (f"step {step}: {label}: its input has std {std:.3g} (> {self.input_std_max:g}) — unnormalized inputs; "
               f"{REMEDY['unnormalized_input']}")
        f = Finding("unnormalized_input", name, step, std, msg)
        self.findings.append(f)
        return [f]

    def exploding_at(self, step: int, name: str, label: str, norm: float) -> list[Finding]:
        """A gradient norm above ``exploding_hard_norm`` seen between logging steps (by the every-step check)."""
        t = self.tracks.setdefault("exploding", _Track())
        if t.fired:
            return []
        t.fired, t.streak = True, max(t.streak, 1)
        msg = (f"step {step}: {label}: gradient norm {norm:.3g} > {self.exploding_hard_norm:g} (seen by the every-step "
               f"check; fires at once) — exploding gradients; {REMEDY['exploding']}")
        f = Finding("exploding", name, step, norm, msg)
        self.findings.append(f)
        return [f]

    # ------------------------------------------------------------------------------------------- progress
    def update_loss(self, step: int, loss: float, nonfinite_step: Optional[int] = None,
                    steps: Optional[int] = None) -> list[Finding]:
        """Training-progress findings from the mean training loss of the logging window ending at ``step``.

        ``steps``: how many training steps that mean covers; windows shorter than ``min_window_steps`` are
        pooled with the next ones first (logging every step would otherwise judge single, noisy batches).
        ``None``: a full window. ``nonfinite_step``: the first step whose loss was NaN/Inf, if any (then the
        progress rules stop: the non-finite finding says what happened).
        """
        if nonfinite_step is not None and self.loss_nonfinite_step is None:
            self.loss_nonfinite_step = nonfinite_step
        if self.loss_nonfinite_step is not None or not math.isfinite(loss):
            return []
        if steps is not None:
            self.loss_buffer = [self.loss_buffer[0] + loss * steps, self.loss_buffer[1] + steps]
            if self.loss_buffer[1] < self.min_window_steps:
                return []
            loss = self.loss_buffer[0] / self.loss_buffer[1]
            self.loss_buffer = [0.0, 0.0]
        self.losses.append((step, loss))
        new: list[Finding] = []
        if step < self.progress_min_steps or len(self.losses) < 4:
            return new
        values = [v for _, v in self.losses]
        first = values[0]
        now = min(values[-2:])
        best = min(values)
        span = f"{self.losses[0][0]}–{step}"
        # not converging: even the best window is less than min_loss_drop below the first (then so are the last
        # two, ``now``); a loss that once fell that far never counts (``best`` only goes down); for a first loss
        # <= 0 the condition cannot hold (best <= first)
        if best > (1 - self.min_loss_drop) * first and self._hyst("not_converging", True, patience=1):
            msg = (f"step {step}: the training loss is not falling: {first:.4g} → {now:.4g} over steps {span} "
                   f"(less than {self.min_loss_drop:.0%} lower; best {best:.4g}) — not converging; "
                   f"{REMEDY['not_converging']}")
            new.append(Finding("not_converging", "", step, now, msg))
        q = max(4, len(values) // 4)
        if len(values) >= 2 * q:
            before, recent = min(values[:-q]), min(values[-q:])
            fell = first > 0 and best < (1 - self.min_loss_drop) * first  # else it is "not converging"
            stalled = recent > (1 - self.min_loss_drop) * before
            if fell and stalled and now > 0.5 * first and self._hyst("plateau", True, patience=1):
                msg = (f"step {step}: the training loss fell from {first:.4g} to {before:.4g}, then improved less than "
                       f"{self.min_loss_drop:.0%} over the last {q} logging windows (steps "
                       f"{self.losses[-q][0]}–{step}, now {now:.4g}, still above half the start) — plateau; "
                       f"{REMEDY['plateau']}")
                new.append(Finding("plateau", "", step, now, msg))
        swings = self._swings(values[-12:], first)
        if len(values) >= 6 and swings >= max(2, math.ceil(self.oscillation_rate * len(values[-12:]))):
            if self._hyst("oscillation", True, patience=1):
                msg = (f"step {step}: the training loss swings up and down: {swings} peak-to-trough falls of more than "
                       f"{self.oscillation_amplitude:.0%} of the starting loss in the last {len(values[-12:])} logging windows "
                       f"({_fmt_trend(values[-6:])}) — oscillating loss; {REMEDY['oscillation']}")
                new.append(Finding("oscillation", "", step, float(swings), msg))
        self.findings.extend(new)
        return new

    def _swings(self, values: Sequence[float], scale: float) -> int:
        """AUTOTRAINER's peak/trough count: local maxima followed by a local minimum more than
        ``oscillation_amplitude`` × ``scale`` (the first window's loss) below it. Relative to the start, not to
        the current loss: a converged loss of 0.01 wobbling to 0.02 is noise, not oscillation."""
        peaks, troughs = [], []
        for i in range(1, len(values) - 1):
            if values[i] >= values[i - 1] and values[i] >= values[i + 1]:
                peaks.append((i, values[i]))
            if values[i] <= values[i - 1] and values[i] <= values[i + 1]:
                troughs.append((i, values[i]))
        count = 0
        for i, p in peaks:
            after = [t for j, t in troughs if j > i]
            if after and scale > 0 and (p - after[0]) / scale > self.oscillation_amplitude:
                count += 1
        return count

    def frozen(self, step: int, layers: Sequence[tuple[str, str, bool, bool]]) -> list[Finding]:
        """Layers that never update. ``layers``: ``(name, label, weighted, trained)`` in forward order,
        ``trained`` is ``False`` for a layer whose parameters all have ``requires_grad=False``.

        A frozen prefix (a backbone) or a mostly frozen model (adapters, LoRA) is left alone: only a weighted
        layer frozen after a trained weighted layer, with most weighted layers trained, is reported.
        """
        new: list[Finding] = []
        weighted = [(n, lab, s) for n, lab, w, s in layers if w]
        trained = sum(1 for _, _, s in weighted if s)
        seen_trained = False
        for n, lab, s in weighted:
            if s:
                seen_trained = True
            elif seen_trained and trained > len(weighted) / 2 and self._hyst(f"frozen:{n}", True, patience=1):
                msg = (f"step {step}: {lab}: never updates — requires_grad=False on a layer between trained layers "
                       f"(frozen by mistake?); {REMEDY['frozen']}")
                new.append(Finding("frozen", n, step, 0.0, msg))
        self.findings.extend(new)
        return new

    def not_in_optimizer(self, step: int, layers: Sequence[tuple[str, str]]) -> list[Finding]:
        """Layers with trainable parameters that no optimizer holds: ``(name, label)``."""
        new = []
        for n, lab in layers:
            if self._hyst(f"frozen:{n}", True, patience=1):
                msg = (f"step {step}: {lab}: never updates — its parameters require grad but no optimizer holds "
                       f"them; {REMEDY['frozen']}")
                new.append(Finding("frozen", n, step, 0.0, msg))
        self.findings.extend(new)
        return new

    # ------------------------------------------------------------------------------------------- summary
    def summary(self) -> str:
        """One line per (kind, layer): how often and when first seen."""
        if not self.findings:
            if self.losses:
                first, last = self.losses[0][1], self.losses[-1][1]
                return (f"gradguard: no gradient problems found, and the training loss is falling "
                        f"({first:.4g} → {last:.4g})")
            return "gradguard: no gradient problems found (no training loss seen, progress not checked)"
        seen: dict[tuple[str, str], list[Finding]] = {}
        for f in self.findings:
            seen.setdefault((f.kind, f.layer), []).append(f)
        lines = [f"gradguard findings ({len(self.findings)}):"]
        for (kind, layer), fs in seen.items():
            where = f" at `{layer}`" if layer else ""
            lines.append(f"- {kind}{where}: {len(fs)}x, first at step {fs[0].step}: {fs[0].message}")
        return "\n".join(lines)

    def state_dict(self) -> dict[str, Any]:
        return {
            "tracks": {k: asdict(v) for k, v in self.tracks.items()}, "last_total": self.last_total,
            "growth_streak": self.growth_streak, "findings": [f.as_dict() for f in self.findings],
            "totals": [list(t) for t in self.totals], "losses": [list(t) for t in self.losses],
            "loss_nonfinite_step": self.loss_nonfinite_step, "loss_buffer": list(self.loss_buffer),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracks = {k: _Track(**v) for k, v in state.get("tracks", {}).items()}
        self.last_total = state.get("last_total")
        self.growth_streak = state.get("growth_streak", 0)
        self.findings = [Finding(**f) for f in state.get("findings", [])]
        self.totals = [(int(s), float(v)) for s, v in state.get("totals", [])]
        self.losses = [(int(s), float(v)) for s, v in state.get("losses", [])]
        self.loss_nonfinite_step = state.get("loss_nonfinite_step")
        self.loss_buffer = list(state.get("loss_buffer", [0.0, 0.0]))
