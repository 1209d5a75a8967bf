"""Where results go: the one place that writes to TensorBoard and prints tables.

Scalars: the per-layer statistics of a logging step go through :func:`log_metrics`, straight to every
logger of the Trainer from global rank 0 (as ``LearningRateMonitor`` does, not through ``pl_module.log``):
a ``TensorBoardLogger`` gets them as one event written to its ``SummaryWriter``'s file writer (torch's
``_get_file_writer``, checked on torch 2.13), any other logger through its ``log_metrics``. Only
``GradientClipping``'s few per-step counters use ``pl_module.log`` (device tensors, no host sync).
Text, histograms, images and the custom-scalar layout go to the ``SummaryWriter`` of every
``TensorBoardLogger`` on the Trainer, from global rank 0 only, and are skipped (no error) when there is none.
"""

from __future__ import annotations

import struct
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info


def tensorboard_writers(trainer: "pl.Trainer") -> list[Any]:
    """The ``SummaryWriter`` of every TensorBoard logger attached to ``trainer`` (rank 0 only)."""
    if not trainer.is_global_zero:
        return []
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def log_text(trainer: "pl.Trainer", tag: str, text: str, step: int | None = None) -> None:
    """Write ``text`` (shown verbatim, as a code block) to every TensorBoard logger."""
    block = "    " + text.replace("\n", "\n    ")  # markdown code block keeps the columns aligned
    for writer in tensorboard_writers(trainer):
        writer.add_text(tag, block, global_step=trainer.global_step if step is None else step)
        writer.flush()


def log_markdown(trainer: "pl.Trainer", tag: str, markdown: str, step: int | None = None) -> None:
    """Write ``markdown`` as is (TensorBoard's Text tab renders tables, lists, ``code``) to every TensorBoard logger."""
    for writer in tensorboard_writers(trainer):
        writer.add_text(tag, markdown, global_step=trainer.global_step if step is None else step)
        writer.flush()


def log_hparams(trainer: "pl.Trainer", params: dict[str, Any], metrics: dict[str, float]) -> None:
    """Hyperparameters and final metrics for TensorBoard's HParams tab, written into the run's own event file.

    ``SummaryWriter.add_hparams`` would start a new sub-run (a second folder); here the three HParams
    summaries (experiment, session start, session end) go to the run's writer, and each metric is also
    written as a scalar ``hparams/<name>`` at the current step (the HParams tab reads metric values from
    scalars of the same run). Values that are not bool/int/float/str are written as their ``str``.
    Other loggers get ``log_hyperparams(params)`` and the metrics through ``log_metrics``.
    """
    from torch.utils.tensorboard.summary import hparams as hparams_summaries

    if not trainer.is_global_zero:
        return
    clean = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in params.items()}
    tagged = {f"hparams/{k}": float(v) for k, v in metrics.items()}
    for lg in trainer.loggers:
        if isinstance(lg, TensorBoardLogger):
            writer = lg.experiment
            exp, ssi, sei = hparams_summaries(clean, tagged)
            file_writer = writer._get_file_writer()
            for summary in (exp, ssi, sei):
                file_writer.add_summary(summary)
            for tag, value in tagged.items():
                writer.add_scalar(tag, value, global_step=trainer.global_step)
            writer.flush()
        else:
            lg.log_hyperparams(clean)
            lg.log_metrics(tagged, step=trainer.global_step)


def print_table(title: str, table: str) -> None:
    """Print a table on rank 0 (through Lightning's rank-zero logger, visible on the console)."""
    rank_zero_info(f"{title}\n{table}")


def log_metrics(trainer: "pl.Trainer", metrics: dict[str, float], step: int,
                loggers: Literal["all", "tensorboard", "others"] = "all", split: int = 0) -> None:
    """Scalars to every Lightning logger of the Trainer (TensorBoard, CSV, ...), rank 0 only, like
    ``LearningRateMonitor`` does; one call per logging step.

    For a TensorBoard logger all values go into *one* event (one ``Summary`` with many values, built by
    :func:`scalar_summary`) instead of one ``add_scalar`` event each: the writer's queue holds 10 events, so
    hundreds of per-layer scalars written one by one wait on the writer thread (measured ~45 ms per step for 600
    scalars); its checksum is computed by :func:`install_fast_crc`'s CRC (``google-crc32c``).

    ``loggers``: ``tensorboard`` writes only to the TensorBoard loggers (safe from ``GradientMonitor``'s
    writer thread: the event file writer has its own locked queue), ``others`` only to the rest (called on
    the training thread: other loggers are not made for concurrent calls). ``split``: see :func:`scalar_summary`.
    """
    if not trainer.is_global_zero:
        return
    for lg in trainer.loggers:
        is_tb = isinstance(lg, TensorBoardLogger)
        if (loggers == "tensorboard" and not is_tb) or (loggers == "others" and is_tb):
            continue
        if is_tb:
            install_fast_crc()
            lg.experiment._get_file_writer().add_summary(scalar_summary(metrics, split), step)
        else:
            lg.log_metrics(metrics, step=step)


#: per tuple of tags: the wire format of their ``Summary`` (each value's bytes up to its float, then the float)
_SUMMARY_FORMATS: dict[tuple[str, ...], tuple[struct.Struct, list[Any]]] = {}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _value_prefix(tag: str) -> bytes:
    name = tag.encode("utf-8")
    inner = b"\x0a" + _varint(len(name)) + name + b"\x15"  # Value: field 1 tag (bytes), field 2 simple_value (float)
    return b"\x0a" + _varint(len(inner) + 4) + inner  # Summary: field 1 value (message)


def scalar_summary(metrics: dict[str, float], split: int = 0) -> Any:
    """One TensorBoard ``Summary`` holding every value of ``metrics`` as a ``simple_value``: the message
    ``Summary(value=[Summary.Value(tag=k, simple_value=v) ...])``, packed from its wire format (made once per set of
    tags) in one ``struct`` call and parsed in one call, instead of building hundreds of ``Summary.Value``
    objects. Values are stored as float32, as TensorBoard does (a finite value beyond float32's range as ±inf, as
    protobuf does).

    ``split`` (> 0): the first ``split`` tags and the rest are packed by two formats, each made once per set of
    tags, and joined (two messages' bytes one after the other are the message with both lists of values): a
    large set of tags that repeats at every step followed by a small one that changes (``GradientMonitor``'s
    rotating update ratios) makes a small format, not a large one, when the small set is new."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    tags = tuple(metrics)
    values = [float(v) for v in metrics.values()]
    cut = split if 0 < split < len(tags) else len(tags)
    data = _pack(tags[:cut], values[:cut])
    if cut < len(tags):
        data += _pack(tags[cut:], values[cut:])
    return Summary.FromString(data)


def _pack(tags: tuple[str, ...], values: list[float]) -> bytes:
    """The wire format of ``Summary`` values (see :func:`scalar_summary`), with the format made once per ``tags``."""
    cached = _SUMMARY_FORMATS.get(tags)
    if cached is None:
        if len(_SUMMARY_FORMATS) > 64:
            _SUMMARY_FORMATS.clear()
        prefixes = [_value_prefix(t) for t in tags]
        template: list[Any] = [0.0] * (2 * len(tags))
        template[0::2] = prefixes
        cached = _SUMMARY_FORMATS[tags] = (struct.Struct("<" + "".join(f"{len(p)}sf" for p in prefixes)), template)
    layout, template = cached
    args = template.copy()
    args[1::2] = values
    try:
        return layout.pack(*args)
    except OverflowError:  # a finite value beyond float32's range: ±inf
        import numpy as np

        with np.errstate(over="ignore"):
            args[1::2] = np.asarray(values, dtype=np.float64).astype(np.float32).tolist()
        return layout.pack(*args)


def install_fast_crc() -> None:
    """TensorBoard checksums every record in pure Python, byte by byte, on its writer thread (GIL held): use the
    bit-identical :func:`lightning_gradguard._event_crc.masked_crc32c` (``google-crc32c``, in C) instead."""
    from lightning_gradguard import _event_crc

    _event_crc.install()


def log_histogram(trainer: "pl.Trainer", tag: str, values: list[float], step: int) -> None:
    """A histogram computed on the device by :func:`lightning_gradguard.stats.histogram` (host values)."""
    lo, hi, n, total, total_sq, *counts = values
    if n <= 0:
        return
    bins = len(counts)
    width = (hi - lo) / bins if hi > lo else 1.0
    limits = [lo + width * (i + 1) for i in range(bins)]
    for writer in tensorboard_writers(trainer):
        writer.add_histogram_raw(tag, lo, hi, int(n), total, total_sq, limits, counts, global_step=step)


def log_image(trainer: "pl.Trainer", tag: str, image_hwc: Any, step: int) -> None:
    """An ``(H, W, 3)`` uint8 image to every TensorBoard logger."""
    for writer in tensorboard_writers(trainer):
        writer.add_image(tag, image_hwc, global_step=step, dataformats="HWC")


def log_layout(trainer: "pl.Trainer", layout: dict[str, Any]) -> None:
    """The custom-scalars layout (written once per run)."""
    for writer in tensorboard_writers(trainer):
        writer.add_custom_scalars(layout)


def progress_bar(trainer: "pl.Trainer", desc: str, enabled: bool = True) -> Any:
    """A console progress bar (tqdm, on stderr) for work a user waits on outside Lightning's own bars (GradGuard's
    probe and trials): only on global rank 0, only when ``enabled`` and stderr is a terminal, and a no-op
    object otherwise. Counts forward/backward passes."""
    import sys

    from tqdm.auto import tqdm

    show = enabled and trainer.is_global_zero and sys.stderr.isatty()
    return tqdm(desc=desc, unit="pass", file=sys.stderr, disable=not show, leave=False, dynamic_ncols=True)


def flush(trainer: "pl.Trainer") -> None:
    for writer in tensorboard_writers(trainer):
        writer.flush()
