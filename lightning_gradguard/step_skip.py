"""Skipping whole optimizer steps, decided on the device: the spike detector and the skip mechanism.

- :class:`SpikeDetector`: is this step's value (loss or global gradient norm) more than ``sigma`` standard
  deviations above the mean of the previous ``window`` values? OLMo-core's ``SkipStepOptimizer`` rule
  (defaults 6 σ over 128 steps, active once ``window // 2`` values are recorded; a spike enters the window
  as the threshold it crossed, see the class), kept in a ring buffer on the device; the answer is a bool
  tensor, never read on the host.
- :class:`StepSkipper`: makes an optimizer step a no-op for the weights *and* the optimizer state (momentum
  buffers, Adam moments, step counts) when a bool tensor, requested before the step, is true. Works for any
  ``torch.optim.Optimizer`` by wrapping its ``step``; used by ``GradientClipping`` for spike skipping and for
  ``on_nonfinite="skip"``.

How a step is skipped, and what it costs (``mode``):

=========  ============================================================================================
mode       what happens
=========  ============================================================================================
``sync``   the flag is read on the host once (``bool(flag)``) after the closure, and a flagged step does
           not call the optimizer at all. Free on CPU (the flag already lives in host memory: no device
           to wait for); on a GPU that read waits for the queued work of the step (one sync per step).
``restore`` the optimizer always steps; before it, the parameters and every state tensor are copied;
           after it, ``torch.where(flag, copy, new)`` puts the old values back. No host read of the flag
           (sync-free) for state tensors on the flag's device; costs one extra copy of parameters and
           optimizer state in memory and bandwidth per step (≈ one optimizer step's worth of traffic).
           Exceptions that read the flag once (a sync on GPU): state tensors on another device (torch's
           Adam/AdamW/SGD keep ``step`` on the host unless ``capturable=True`` or ``fused=True``),
           non-tensor state values, and a step that creates state (the first step of a parameter).
``auto``   ``sync`` when the flag is on the CPU, else ``restore`` (the default).
=========  ============================================================================================

Bit-exactness: a skipped step leaves every parameter and every optimizer-state value bit-identical in
both modes (``torch.where`` selects, it does not compute, so NaN/Inf produced by the skipped step vanish).

OLMo-core avoids the copy with optimizers that multiply their update by a ``step_factor`` (its
``SkipStepAdamW``/``SkipStepLion``); that needs one re-written optimizer per algorithm, this works with all.

Example:
    >>> net = torch.nn.Linear(3, 1)
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    >>> skipper = StepSkipper()
    >>> skipper.attach(opt)
    >>> net(torch.randn(4, 3)).sum().backward()
    >>> skipper.request(torch.tensor(True))   # e.g. SpikeDetector(...).update(loss)
    >>> before = net.weight.detach().clone()
    >>> opt.step()
    >>> bool(torch.equal(before, net.weight)), int(skipper.skipped)
    (True, 1)
    >>> skipper.detach(opt)
"""

from __future__ import annotations

import copy
import types
from typing import Any, Callable, Optional

import torch

from lightning_gradguard.clipping import masked_slot_write_

SKIP_MODES = ("auto", "restore", "sync")


class SpikeDetector:
    """OLMo-core's rolling z-score rule: ``x`` is a spike when ``x - mean > sigma · std`` over the previous
    ``window`` recorded values (unbiased std, as ``torch.std_mean``), once ``min_samples`` values (this one
    included) have been recorded; OLMo-core's ``max(2, window // 2)`` becomes ``max(3, window // 2)`` here so
    the standard deviation always has two values.

    Every finite value is recorded; a spike is recorded as the threshold it crossed (``mean + sigma·std``),
    where OLMo-core records it as it is. On purpose: a raw ×1000 spike in the window makes the standard
    deviation tens of times the mean for the next ``window`` steps, and the next spike passes unseen
    (``benchmarks/clipping_spikes.py`` showed exactly that); recording the threshold still lets a genuine
    level shift raise the baseline step by step, so training is never locked out. A non-finite value is
    never recorded and never called a spike (the caller's non-finite policy handles it).

    Example:
        >>> det = SpikeDetector(sigma=3.0, window=8, min_samples=4)
        >>> [bool(det.update(torch.tensor(v))) for v in (1.0, 1.1, 0.9, 1.0, 9.0)]
        [False, False, False, False, True]
    """

    def __init__(self, sigma: float = 6.0, window: int = 128, min_samples: Optional[int] = None) -> None:
        if window < 2:
            raise ValueError(f"SpikeDetector: window={window!r} must be an integer >= 2")
        self.sigma = float(sigma)
        self.window = int(window)
        self.min_samples = max(3, self.window // 2) if min_samples is None else int(min_samples)
        if not 3 <= self.min_samples <= self.window + 1:
            raise ValueError(
                f"SpikeDetector: min_samples={min_samples!r} must be an integer >= 3 and <= window + 1 = {self.window + 1}"
            )
        self.history = torch.zeros(self.window, dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.long)

    def _to(self, device: torch.device) -> None:
        if self.history.device != device:
            dtype = torch.float32 if device.type == "mps" else torch.float64
            self.history, self.count = self.history.to(device, dtype), self.count.to(device)

    def update(self, value: torch.Tensor) -> torch.Tensor:
        """Test ``value`` (a 0-dim tensor) against the previous values, then record it; a bool tensor."""
        self._to(value.device)
        x = value.detach().to(self.history.dtype)
        finite = torch.isfinite(x)
        n = torch.clamp(self.count, max=self.window)
        valid = torch.arange(self.window, device=x.device) < n
        nf = n.to(x.dtype)
        mean = torch.where(valid, self.history, 0.0).sum() / nf.clamp(min=1)
        var = torch.where(valid, (self.history - mean) ** 2, 0.0).sum() / (nf - 1).clamp(min=1)
        active = (self.count + 1 >= self.min_samples) & finite
        limit = mean + self.sigma * var.sqrt()
        spike = active & (x > limit)
        slot = self.count % self.window
        masked_slot_write_(self.history, slot, finite, torch.where(spike, limit, x))
        self.count = self.count + finite.long()
        return spike

    def state_dict(self) -> dict:
        return {"history": self.history.cpu().clone(), "count": int(self.count)}

    def load_state_dict(self, state: dict) -> None:
        if state["history"].numel() != self.window:
            raise ValueError(
                f"SpikeDetector: the checkpoint's window holds {state['history'].numel()} values, this detector "
                f"has window={self.window}; resume with the same window"
            )
        self.history = state["history"].to(self.history.device, self.history.dtype)
        self.count = torch.tensor(int(state["count"]), device=self.history.device)


class StepSkipper:
    """Skip whole optimizer steps on a device-side flag (see the module docstring for the modes' costs).

    :meth:`attach` wraps ``optimizer.step`` (an instance attribute, removed by :meth:`detach`). The wrapper
    runs the closure first (forward, backward and everything that decides, e.g. Lightning's
    ``on_before_optimizer_step``), then takes the flag set by :meth:`request` since the last step, and
    steps, skips, or steps and restores. Optimizers that re-evaluate the closure (LBFGS) are refused.

    ``skipped`` counts skipped steps (a long tensor on the flag's device).
    """

    def __init__(self, mode: str = "auto") -> None:
        if mode not in SKIP_MODES:
            raise ValueError(f"StepSkipper: mode={mode!r} is not one of: {', '.join(SKIP_MODES)}")
        self.mode = mode
        self.skipped = torch.zeros((), dtype=torch.long)
        self._pending: Optional[torch.Tensor] = None
        self._originals: dict[int, tuple[torch.optim.Optimizer, Any]] = {}

    # ------------------------------------------------------------------------------ wiring
    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Wrap ``optimizer.step`` so that it honours :meth:`request`."""
        if isinstance(optimizer, torch.optim.LBFGS):
            raise ValueError("StepSkipper: LBFGS evaluates its closure several times per step and cannot be skipped")
        if id(optimizer) in self._originals:
            return
        had_own = "step" in optimizer.__dict__
        self._originals[id(optimizer)] = (optimizer, optimizer.__dict__["step"] if had_own else None)
        inner = optimizer.step  # bound method (or an LR scheduler's wrapper of it)
        skipper = self

        def step(opt: torch.optim.Optimizer, closure: Optional[Callable[[], Any]] = None, **kwargs: Any) -> Any:
            return skipper._step(opt, inner, closure, kwargs)

        if getattr(inner, "_wrapped_by_lr_sched", False):
            step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]  # LR schedulers check for it
        optimizer.step = types.MethodType(step, optimizer)  # type: ignore[method-assign]

    def detach(self, optimizer: torch.optim.Optimizer) -> None:
        """Put ``optimizer.step`` back as it was before :meth:`attach`."""
        entry = self._originals.pop(id(optimizer), None)
        if entry is None:
            return
        if entry[1] is None:
            optimizer.__dict__.pop("step", None)
        else:
            optimizer.step = entry[1]  # type: ignore[method-assign]

    def detach_all(self) -> None:
        for optimizer, _ in list(self._originals.values()):
            self.detach(optimizer)

    def request(self, flag: torch.Tensor) -> None:
        """Ask to skip the next optimizer step when ``flag`` (a bool tensor) is true; requests OR together."""
        flag = flag.detach().bool()
        self._pending = flag if self._pending is None else (self._pending | flag.to(self._pending.device))

    def discard(self) -> None:
        """Drop a request that no step consumed (e.g. a step that AMP's gradient scaler did not take)."""
        self._pending = None

    # ------------------------------------------------------------------------------ the step
    def _step(self, optimizer: torch.optim.Optimizer, inner: Callable[..., Any], closure: Optional[Callable[[], Any]],
              kwargs: dict[str, Any]) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        flag, self._pending = self._pending, None
        if flag is None:
            out = inner(**kwargs)
            return loss if closure is not None else out
        if self.skipped.device != flag.device:
            self.skipped = self.skipped.to(flag.device)
        self.skipped += flag.long()
        mode = self.mode if self.mode != "auto" else ("sync" if flag.device.type == "cpu" else "restore")
        if mode == "sync":
            if bool(flag):  # free on CPU; one device-to-host read on an accelerator
                optimizer._opt_called = True  # type: ignore[attr-defined]  # as an LR scheduler's wrapper would
                return loss
            out = inner(**kwargs)
            return loss if closure is not None else out
        saved = _Snapshot(optimizer)
        out = inner(**kwargs)
        saved.restore_where(flag)
        return loss if closure is not None else out

    def state_dict(self) -> dict:
        return {"skipped": int(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = torch.tensor(int(state.get("skipped", 0)), device=self.skipped.device)


class _Snapshot:
    """Copies of the parameters that have gradients and of their optimizer state, taken before a step."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        with torch.no_grad():
            self.param_copies = [p.detach().clone() for p in self.params]
            self.states = {p: _copy_state(optimizer.state[p]) if p in optimizer.state else None for p in self.params}

    @torch.no_grad()
    def restore_where(self, flag: torch.Tensor) -> None:
        for p, old in zip(self.params, self.param_copies):
            torch.where(flag.to(p.device) if p.device != flag.device else flag, old, p, out=p)  # in place
        host_flag: Optional[bool] = None
        for p in self.params:
            old_state, new_state = self.states[p], self.optimizer.state.get(p)
            same_keys = old_state is not None and new_state is not None and old_state.keys() == new_state.keys()
            if same_keys and all(_on_device(new_state[k], flag.device) and _on_device(v, flag.device)
                                 for k, v in old_state.items()):
                for k, v in old_state.items():
                    torch.where(flag, v, new_state[k], out=new_state[k])
                continue
            if host_flag is None:
                host_flag = bool(flag)  # one read: state on another device, non-tensor state, or new state
            if host_flag:
                if old_state is None:
                    self.optimizer.state.pop(p, None)
                else:
                    self.optimizer.state[p] = old_state


def _on_device(value: Any, device: torch.device) -> bool:
    return isinstance(value, torch.Tensor) and value.device == device


def _copy_state(state: dict) -> dict:
    return {k: (v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in state.items()}
