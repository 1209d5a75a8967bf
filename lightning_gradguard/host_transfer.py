"""Device values to the host without waiting for the device, and the work on them off the training thread.

- :class:`BackgroundWriter`: one daemon thread. :meth:`~BackgroundWriter.submit` joins a few device tensors
  into one float32 vector (one ``torch.cat``), starts its copy into pinned host memory with
  ``non_blocking=True`` and records a CUDA event: the training thread goes on at once. The thread waits for
  the event, turns the values into Python lists and calls the given function (formatting, writing an event
  file). On the CPU the copy is the vector itself and the lists, the formatting and the writing also happen
  on the thread. :meth:`~BackgroundWriter.flush` waits until everything submitted is done (and re-raises the
  first error a function raised); :meth:`~BackgroundWriter.close` flushes and ends the thread.
- :func:`to_device`: a small list of numbers (indices, initial values) put on the device without waiting for
  it, where ``torch.tensor(values, device=...)`` waits for everything queued on the device (a host sync).
- :class:`AsyncReader`: a small device tensor read without waiting: :meth:`~AsyncReader.poll` returns the
  values of the last copy once it has landed (``event.query()``, never ``synchronize``), and starts the next
  copy. On the CPU every poll returns the current values (there is no device to wait for).

Example:
    >>> writer = BackgroundWriter()
    >>> seen = []
    >>> writer.submit([torch.tensor([1.0, 2.0]), torch.tensor(3.0)], seen.append)
    >>> writer.flush()
    >>> seen
    [[[1.0, 2.0], [3.0]]]
    >>> writer.close()
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, Optional, Sequence, Union

import torch


def to_device(values: Any, device: Union[str, torch.device], dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype, device=device)`` without waiting for the device's stream: on a CUDA
    device the tensor is made on the host and copied with ``non_blocking=True``. CUDA stages a copy from ordinary
    (pageable) host memory before the call returns, so the host tensor may be freed at once; the copy does not
    wait for the kernels queued before it (the driver may still hold the host briefly while it stages), where the
    plain form synchronizes the stream after its copy (a host sync, which ``set_sync_debug_mode`` reports). Other
    devices get the plain blocking copy: a non-blocking copy from a pageable host tensor freed at once is not safe
    on every backend (MPS).

    Example:
        >>> to_device([2, 0, 1], "cpu", torch.long)
        tensor([2, 0, 1])
    """
    host = torch.tensor(values, dtype=dtype) if not isinstance(values, torch.Tensor) else values.to(dtype or values.dtype)
    device = torch.device(device)
    if host.device == device:
        return host
    return host.to(device, non_blocking=host.device.type == "cpu" and device.type == "cuda")


def _start_copy(joined: torch.Tensor, pool: dict[int, list[torch.Tensor]],
                lock: Optional[threading.Lock] = None) -> tuple[torch.Tensor, Any]:
    """Start the copy of ``joined`` to the host; return (host tensor, event or None)."""
    if joined.device.type != "cuda":
        return joined.cpu(), None  # CPU: no device to wait for (other accelerators: a plain copy)
    if lock is not None:
        with lock:
            free = pool.get(joined.numel())
            host = free.pop() if free else None
    else:
        free = pool.get(joined.numel())
        host = free.pop() if free else None
    if host is None:
        host = torch.empty(joined.numel(), dtype=joined.dtype, pin_memory=True)
    host.copy_(joined, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


class BackgroundWriter:
    """A daemon thread that receives device tensors, waits for them without blocking training, and hands their
    values to a function (see the module docstring). Functions run in submission order."""

    def __init__(self, name: str = "gradguard-writer") -> None:
        self.name = name
        self._queue: "queue.Queue[Optional[tuple]]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._errors: list[BaseException] = []
        self._pool: dict[int, list[torch.Tensor]] = {}  # pinned buffers by size, reused
        self._lock = threading.Lock()

    def submit(self, tensors: Sequence[torch.Tensor], fn: Callable[[list[list[float]]], None]) -> None:
        """Copy ``tensors`` (any shapes, one device) to the host without waiting and call ``fn`` with each one's
        flattened values (a list of lists, in order) on the writer thread."""
        flat = [t.detach().reshape(-1).float() for t in tensors]
        sizes = [t.numel() for t in flat]
        if flat:
            dev = flat[0].device
            joined = torch.cat([t.to(dev, non_blocking=True) for t in flat])
            host, event = _start_copy(joined, self._pool, self._lock)
        else:
            host, event = torch.zeros(0), None
        self._ensure_thread()
        self._queue.put((host, event, sizes, fn))

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                host, event, sizes, fn = item
                while event is not None and not event.query():  # this thread waits; training does not. Polled:
                    time.sleep(0.0002)  # a query is no synchronizing call (set_sync_debug_mode stays silent)
                values = host.tolist()
                if event is not None:
                    with self._lock:
                        self._pool.setdefault(host.numel(), []).append(host)
                parts, k = [], 0
                for n in sizes:
                    parts.append(values[k : k + n])
                    k += n
                fn(parts)
            except BaseException as err:  # noqa: BLE001 - re-raised on the training thread by flush()
                self._errors.append(err)
            finally:
                self._queue.task_done()

    def flush(self) -> None:
        """Wait until every submitted function has run; re-raise the first error one of them raised."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.join()
        if self._errors:
            err, self._errors = self._errors[0], []
            raise err

    def close(self) -> None:
        """Flush, then end the thread (a later :meth:`submit` starts a new one)."""
        try:
            self.flush()
        finally:
            if self._thread is not None and self._thread.is_alive():
                self._queue.put(None)
                self._thread.join()
            self._thread = None


class AsyncReader:
    """Read a small device tensor on the host without ever waiting for the device.

    Example:
        >>> count = torch.zeros(2)
        >>> reader = AsyncReader()
        >>> reader.poll(count)           # CPU: the values at once
        [0.0, 0.0]
    """

    def __init__(self) -> None:
        self._host: Optional[torch.Tensor] = None
        self._event: Any = None
        self._pool: dict[int, list[torch.Tensor]] = {}

    def poll(self, value: torch.Tensor) -> Optional[list[float]]:
        """The values of the copy started by an earlier call if it has landed (``None`` if not yet), then a new
        copy of ``value`` is started (unless the previous one is still under way)."""
        out: Optional[list[float]] = None
        if self._host is not None:
            if self._event is not None and not self._event.query():
                return None
            out = self._host.tolist()
            if self._event is not None:
                self._pool.setdefault(self._host.numel(), []).append(self._host)
            self._host, self._event = None, None
        host, event = _start_copy(value.detach().reshape(-1).float(), self._pool)
        if event is None:
            return host.tolist()
        self._host, self._event = host, event
        return out

    def wait(self, value: torch.Tensor) -> list[float]:
        """The current values, waiting for the device (for the end of fit)."""
        self._host, self._event = None, None
        return value.detach().reshape(-1).float().cpu().tolist()


__all__ = ["BackgroundWriter", "AsyncReader", "to_device"]
