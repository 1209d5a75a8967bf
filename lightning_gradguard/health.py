"""Health detectors: per-layer statistics in, plain-language findings out.

Each detector has a threshold and a hysteresis: a condition must hold on ``patience`` consecutive
logging steps before it fires, and once fired it stays quiet for that layer until the condition has been
clear for ``patience`` logging steps again. Non-finite gradients fire at once.

=============  ==================================================================  =====================
detector       fires when                                                          default threshold
=============  ==================================================================  =====================
vanishing      a layer's gradient norm < ``vanishing_norm``, or < ``vanishing_ratio``  1e-7, 1e-3
               × the output layer's (the worst such layer is named)
exploding      a layer's gradient norm > ``exploding_norm``, or the total norm grew     1e3, ×10
               by ≥ ``growth_factor`` on each of ``patience`` logging steps
nonfinite      NaN/Inf in a gradient: names the first layer in backward order (the    —
               last in forward order) that has one; under AMP: an overflow step
dead_relu      > ``dead_fraction`` of a ReLU layer's units output 0 for the whole batch  0.5
saturation     > ``saturated_fraction`` of a sigmoid/tanh layer's outputs within         0.5
               ``saturation_eps`` of a bound
=============  ==================================================================  =====================

Example:
    >>> detector = HealthDetector(patience=3)
    >>> findings = detector.update(step, layer_rows, total_norm, amp_overflow=False)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

REMEDY = {
    "vanishing": "try he/glorot init matched to the activation (WeightInitialization('auto')), BatchNorm, "
    "or a non-saturating activation",
    "exploding": "try gradient clipping (GradientClipping('norm') or 'percentile'), a smaller learning rate, "
    "or an init matched to the activation",
    "nonfinite": "look for a division by zero / log of 0 / overflow there; GradientClipping(on_nonfinite='skip') "
    "skips such steps",
    "amp_overflow": "the GradScaler skipped this step and lowers its scale; only a concern if it keeps happening",
    "dead_relu": "try LeakyReLU/ELU (ActivationReplacement), He init, a lower learning rate, or less negative biases",
    "saturation": "try Glorot init, BatchNorm before the activation, or a non-saturating activation",
}


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
    """The statistics of one layer on one logging step (host values)."""

    name: str
    label: str
    activation: Optional[str]
    grad_norm: float
    grad_nonfinite: float = 0.0
    dead_frac: Optional[float] = None
    saturated_frac: Optional[float] = None


@dataclass
class _Track:
    streak: int = 0
    clear: int = 0
    fired: bool = False


@dataclass
class HealthDetector:
    """Stateful detectors with hysteresis; :meth:`update` once per logging step."""

    vanishing_norm: float = 1e-7
    vanishing_ratio: float = 1e-3
    exploding_norm: float = 1e3
    growth_factor: float = 10.0
    dead_fraction: float = 0.5
    saturated_fraction: float = 0.5
    patience: int = 3
    tracks: dict[str, _Track] = field(default_factory=dict)
    last_total: Optional[float] = None
    growth_streak: int = 0
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

    def update(self, step: int, rows: Sequence[LayerRow], total_norm: float, amp_overflow: bool = False) -> list[Finding]:
        new: list[Finding] = []
        live = [r for r in rows if r.grad_norm == r.grad_norm]  # not NaN
        # non-finite: the last layer in forward order with a non-finite gradient is the first in backward order
        bad = [r for r in rows if r.grad_nonfinite > 0 or not math.isfinite(r.grad_norm)]
        if self._hyst("nonfinite", bool(bad), patience=1) and bad:
            first = bad[-1]
            if amp_overflow:
                msg = (f"step {step}: {first.label}: inf/NaN gradients — AMP overflow, the GradScaler skips this "
                       f"step; {REMEDY['amp_overflow']}")
                new.append(Finding("amp_overflow", first.name, step, first.grad_nonfinite, msg))
            else:
                msg = (f"step {step}: {first.label}: {int(first.grad_nonfinite)} non-finite gradient values — the "
                       f"first layer in backward order with NaN/Inf; {REMEDY['nonfinite']}")
                new.append(Finding("nonfinite", first.name, step, first.grad_nonfinite, msg))
        finite_rows = [r for r in live if math.isfinite(r.grad_norm)]
        if finite_rows and not bad:
            out_norm = finite_rows[-1].grad_norm
            # vanishing: the worst layer relative to the output layer
            worst = min(finite_rows[:-1] or finite_rows, key=lambda r: r.grad_norm)
            ratio = worst.grad_norm / out_norm if out_norm > 0 else 0.0
            vanishing = worst.grad_norm < self.vanishing_norm or (len(finite_rows) > 1 and ratio < self.vanishing_ratio)
            if self._hyst("vanishing", vanishing):
                msg = (f"step {step}: {worst.label}: gradient norm {worst.grad_norm:.2g}, {ratio:.2g} of the output "
                       f"layer's — vanishing gradients; {REMEDY['vanishing']}")
                new.append(Finding("vanishing", worst.name, step, worst.grad_norm, msg))
            biggest = max(finite_rows, key=lambda r: r.grad_norm)
            growing = False
            if self.last_total is not None and self.last_total > 0 and math.isfinite(total_norm):
                self.growth_streak = self.growth_streak + 1 if total_norm / self.last_total >= self.growth_factor else 0
                growing = self.growth_streak >= self.patience
            self.last_total = total_norm if math.isfinite(total_norm) else self.last_total
            if self._hyst("exploding", biggest.grad_norm > self.exploding_norm or growing):
                why = (f"gradient norm {biggest.grad_norm:.2g} > {self.exploding_norm:g}" if biggest.grad_norm > self.exploding_norm
                       else f"total gradient norm grew ×{self.growth_factor:g} or more on {self.patience} logging steps in a row")
                msg = f"step {step}: {biggest.label}: {why} — exploding gradients; {REMEDY['exploding']}"
                new.append(Finding("exploding", biggest.name, step, biggest.grad_norm, msg))
        for r in rows:
            if r.dead_frac is not None and self._hyst(f"dead:{r.name}", r.dead_frac > self.dead_fraction):
                msg = (f"step {step}: {r.label}: {r.dead_frac:.0%} of its units are dead (output 0 for the whole "
                       f"batch) — dying ReLU; {REMEDY['dead_relu']}")
                new.append(Finding("dead_relu", r.name, step, r.dead_frac, msg))
            if r.saturated_frac is not None and self._hyst(f"sat:{r.name}", r.saturated_frac > self.saturated_fraction):
                msg = (f"step {step}: {r.label}: {r.saturated_frac:.0%} of its outputs are saturated — saturating "
                       f"activation; {REMEDY['saturation']}")
                new.append(Finding("saturation", r.name, step, r.saturated_frac, msg))
        self.findings.extend(new)
        return new

    def summary(self) -> str:
        """One line per (kind, layer): how often and when first seen."""
        if not self.findings:
            return "gradguard: no gradient problems found"
        seen: dict[tuple[str, str], list[Finding]] = {}
        for f in self.findings:
            seen.setdefault((f.kind, f.layer), []).append(f)
        lines = [f"gradguard findings ({len(self.findings)}):"]
        for (kind, layer), fs in seen.items():
            lines.append(f"- {kind} at `{layer}`: {len(fs)}x, first at step {fs[0].step}: {fs[0].message}")
        return "\n".join(lines)

    def state_dict(self) -> dict[str, Any]:
        return {
            "tracks": {k: asdict(v) for k, v in self.tracks.items()}, "last_total": self.last_total,
            "growth_streak": self.growth_streak, "findings": [f.as_dict() for f in self.findings],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracks = {k: _Track(**v) for k, v in state.get("tracks", {}).items()}
        self.last_total = state.get("last_total")
        self.growth_streak = state.get("growth_streak", 0)
        self.findings = [Finding(**f) for f in state.get("findings", [])]
