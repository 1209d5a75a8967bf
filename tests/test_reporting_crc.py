"""The fast paths of TensorBoard writing: the record checksum from google-crc32c and the packed scalar ``Summary`` give the
bytes tensorboard's own code gives, and event files written with them read back."""

from __future__ import annotations

import math
import random

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import crc32c as reference_crc
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as reference_masked
from torch.utils.tensorboard import SummaryWriter

from lightning_gradguard import _event_crc
from lightning_gradguard.reporting import install_fast_crc, scalar_summary


def test_crc_equals_tensorboards_on_every_length_and_content():
    rng = random.Random(0)
    lengths = list(range(4, 70)) + [1023, 1024, 1025, 4096, 16 * 1024 + 1] + [rng.randrange(70, 60_000) for _ in range(25)]
    for n in lengths:
        data = bytes(rng.getrandbits(8) for _ in range(n))
        assert _event_crc.crc32c(data) == reference_crc(data), n
        assert _event_crc.masked_crc32c(data) == reference_masked(data), n
    for data in (b"\x00" * 5000, b"\xff" * 5000, b"a" * 3, b""):  # zeros, ones, and short records
        assert _event_crc.masked_crc32c(data) == reference_masked(data)


def test_scalar_summary_is_the_message_tensorboard_builds():
    metrics = {f"grad_norm/layer.{i}": 0.1 * i for i in range(40)}
    metrics.update({"a/é": math.nan, "b" * 300: -0.0, "inf": -math.inf, "int": 3, "tiny": 1e-45, "big": 1e300})
    expected = Summary(value=[Summary.Value(tag=k, simple_value=float(v)) for k, v in metrics.items()])
    assert scalar_summary(metrics).SerializeToString() == expected.SerializeToString()
    assert scalar_summary(metrics).value[-1].simple_value == math.inf  # beyond float32: inf, as protobuf stores it
    metrics["int"] = 4  # the same tags again (cached format), other values
    expected.value[-3].simple_value = 4.0
    assert scalar_summary(metrics).SerializeToString() == expected.SerializeToString()
    assert scalar_summary({}).SerializeToString() == b""
    for split in (1, 20, 45, len(metrics)):  # two formats joined: the same message
        assert scalar_summary(metrics, split).SerializeToString() == expected.SerializeToString()


def test_event_files_written_with_the_fast_checksum_read_back(tmp_path):
    install_fast_crc()
    from tensorboard.summary.writer import record_writer

    assert record_writer.masked_crc32c is _event_crc.masked_crc32c
    writer = SummaryWriter(str(tmp_path))
    metrics = {f"stat/layer.{i}": float(i) / 7 for i in range(600)}  # one ~20 KB record
    for step in range(3):
        writer._get_file_writer().add_summary(scalar_summary({k: v + step for k, v in metrics.items()}), step)
    writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    assert len(acc.Tags()["scalars"]) == 600
    assert [e.value for e in acc.Scalars("stat/layer.599")] == pytest.approx([599 / 7 + s for s in range(3)], rel=1e-6)
