"""TensorBoard's record checksum (masked CRC-32C) from ``google-crc32c``'s C implementation.

Every record TensorBoard writes carries a masked CRC-32C of its bytes. ``tensorboard`` computes it in pure Python,
one byte at a time, on its writer thread, holding the GIL: for the one event of a logging step of a 50-layer
model (~600 scalars, ~20 KB) that is ~1.7 ms of a CPU-bound training process. ``google-crc32c`` (Google's
maintained binding, hardware CRC instructions where the CPU has them) computes the same value in about a
microsecond. :func:`install` puts :func:`masked_crc32c` in place of
``tensorboard.summary.writer.record_writer.masked_crc32c`` (the name its ``RecordWriter.write`` looks up on every
record); checksums are bit for bit tensorboard's (``tests/test_reporting_crc.py`` compares them on random data of
many lengths). The replacement is process-wide and only changes how fast the same bytes are written.

Example:
    >>> from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as reference
    >>> data = bytes(range(256)) * 20
    >>> masked_crc32c(data) == reference(data)
    True
"""

from __future__ import annotations

import google_crc32c

_MASK_DELTA = 0xA282EAD8


def crc32c(data: bytes) -> int:
    """The CRC-32C of ``data`` (initial value and final XOR 0xFFFFFFFF, as tensorboard's ``crc32c``)."""
    return google_crc32c.value(bytes(data))


def masked_crc32c(data: bytes) -> int:
    """tensorboard's masked CRC-32C of a record (``masked_crc32c`` of ``tensorboard.compat``)."""
    x = google_crc32c.value(bytes(data))
    return (((x >> 15) | (x << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def install() -> None:
    """Make tensorboard's record writer use :func:`masked_crc32c` (idempotent; the same checksums)."""
    from tensorboard.summary.writer import record_writer

    if record_writer.masked_crc32c is not masked_crc32c:
        record_writer.masked_crc32c = masked_crc32c


__all__ = ["crc32c", "masked_crc32c", "install"]
