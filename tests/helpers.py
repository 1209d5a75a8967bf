"""Test helpers: read back real TensorBoard event files."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def load_events(log_dir: str | Path) -> EventAccumulator:
    """All scalars, histograms, images and text of the event files under ``log_dir``."""
    files = list(Path(log_dir).rglob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event file under {log_dir}"
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def read_texts(events: EventAccumulator, prefix: str) -> list[str]:
    """Text entries (``add_text``) whose tag starts with ``prefix``, in step order."""
    out = []
    for tag in events.Tags()["tensors"]:
        if tag.startswith(prefix):
            out += [e.tensor_proto.string_val[0].decode() for e in events.Tensors(tag)]
    return out
