"""A vectorized CRC-32C for TensorBoard's event records: the same checksums, computed with NumPy.

Every record TensorBoard writes carries a masked CRC-32C of its bytes. ``tensorboard`` computes it in pure Python,
one byte at a time, on its writer thread, holding the GIL: for the one event of a logging step of a 50-layer
model (~600 scalars, ~20 KB) a Python loop of 20,000 iterations inside a CPU-bound training process.
:func:`masked_crc32c` computes the same value with NumPy: the bytes are cut into blocks of ``_BLOCK`` bytes whose CRCs are advanced together, one
byte position at a time (a table look-up over all blocks at once), and the blocks' CRCs are then combined pairwise
in ``log2(blocks)`` vectorized steps (the CRC is linear over GF(2): moving a register past ``n`` zero bytes is a
fixed linear map, applied as four 256-entry tables). Short records go to tensorboard's own function.

:func:`install` puts it in place of ``tensorboard.summary.writer.record_writer.masked_crc32c`` (the name its
``RecordWriter.write`` looks up on every record); checksums are bit-for-bit those of tensorboard's function
(``tests/test_reporting_crc.py`` compares them on random data of many lengths).

Example:
    >>> from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as reference
    >>> data = bytes(range(256)) * 20
    >>> masked_crc32c(data) == reference(data)
    True
"""

from __future__ import annotations

from typing import Callable

import numpy as np

_POLY = 0x82F63B78  # CRC-32C (Castagnoli), reflected
_BLOCK = 16  # bytes per block advanced together
_SHORT = 1024  # records shorter than this go to tensorboard's own function
_MASK_DELTA = 0xA282EAD8


def _byte_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(_POLY), table >> 1).astype(np.uint32)
    return table


_TABLE = _byte_table()


def _zeros_map(tables: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Registers ``x`` moved past the zero bytes that ``tables`` (4 × 256) stand for."""
    return (tables[0][x & 0xFF] ^ tables[1][(x >> 8) & 0xFF] ^ tables[2][(x >> 16) & 0xFF]
            ^ tables[3][x >> 24]).astype(np.uint32)


def _single_byte_tables() -> np.ndarray:
    """The map "one zero byte" as 4 tables: register ``v << 8j`` after one byte."""
    v = np.arange(256, dtype=np.uint32)
    out = np.empty((4, 256), dtype=np.uint32)
    for j in range(4):
        reg = v << np.uint32(8 * j)
        out[j] = _TABLE[reg & 0xFF] ^ (reg >> 8)
    return out


def _compose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Tables of "first ``a``'s zero bytes, then ``b``'s"."""
    return np.stack([_zeros_map(b, a[j]) for j in range(4)])


def _block_levels(count: int) -> list[np.ndarray]:
    """Tables of zero runs of ``_BLOCK``, ``2·_BLOCK``, ``4·_BLOCK``, ... bytes (``count`` of them)."""
    one = _single_byte_tables()
    run = one
    for _ in range(_BLOCK - 1):
        run = _compose(run, one)
    levels = [run]
    while len(levels) < count:
        levels.append(_compose(levels[-1], levels[-1]))
    return levels


_LEVELS: list[np.ndarray] = _block_levels(24)  # up to 16 × 2^23 bytes = 128 MiB records


def crc32c(data: bytes) -> int:
    """The CRC-32C of ``data`` (initial value and final XOR 0xFFFFFFFF, as tensorboard's ``crc32c``)."""
    n = len(data)
    blocks = 1 << max(0, (-(-n // _BLOCK) - 1).bit_length())
    if blocks > 1 << (len(_LEVELS) - 1) or n < 4:
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import crc32c as slow

        return int(slow(data))
    buf = np.zeros(blocks * _BLOCK, dtype=np.uint8)
    buf[blocks * _BLOCK - n :] = np.frombuffer(data, dtype=np.uint8)  # leading zeros leave a zero register at 0
    start = blocks * _BLOCK - n
    buf[start : start + 4] ^= 0xFF  # the initial value 0xFFFFFFFF enters as the first 4 bytes XOR 0xFF
    rows = buf.reshape(blocks, _BLOCK)
    reg = np.zeros(blocks, dtype=np.uint32)
    for i in range(_BLOCK):  # every block's register, one byte position at a time
        reg = _TABLE[(reg ^ rows[:, i]) & 0xFF] ^ (reg >> 8)
    level = 0
    while reg.size > 1:  # pairwise: crc(a ‖ b) = zeros_map_{len(b)}(crc(a)) ^ crc(b), registers starting at 0
        reg = _zeros_map(_LEVELS[level], reg[0::2]) ^ reg[1::2]
        level += 1
    return int(reg[0]) ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """tensorboard's masked CRC-32C of a record (``masked_crc32c`` of ``tensorboard.compat``), vectorized for large
    records."""
    if len(data) < _SHORT:
        return _reference()(data)
    x = crc32c(data)
    return (((x >> 15) | (x << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def _reference() -> Callable[[bytes], int]:
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as reference

    return reference


def install() -> None:
    """Make tensorboard's record writer use :func:`masked_crc32c` (idempotent; the same checksums)."""
    from tensorboard.summary.writer import record_writer

    if record_writer.masked_crc32c is not masked_crc32c:
        record_writer.masked_crc32c = masked_crc32c


__all__ = ["crc32c", "masked_crc32c", "install"]
