"""CRC-32C in the core (the checksum of TensorFlow's checkpoints): the SSE4.2 instruction path
and the table path against the definition, bit by bit."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from fastvgg import _core


def _crc32c_bitwise(data: bytes, crc: int = 0) -> int:
    """The definition, one bit at a time (reflected Castagnoli polynomial)."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


@pytest.mark.parametrize("size", [0, 1, 3, 7, 8, 9, 15, 16, 17, 63, 64, 65, 1000, 4099])
def test_crc32c_matches_its_definition_on_awkward_lengths(size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    expected = _crc32c_bitwise(data)
    assert _core.crc32c(data) == expected
    assert _core.testing.crc32c_table(data) == expected
    # Unaligned starts and continuation: crc(a + b) == crc(b) continued from crc(a).
    view = memoryview(b"x" + data)[1:]
    assert _core.crc32c(view) == expected
    cut = size // 3
    assert _core.crc32c(data[cut:], _core.crc32c(data[:cut])) == expected
    assert _core.testing.crc32c_table(data[cut:], _core.testing.crc32c_table(data[:cut])) == expected


def test_crc32c_known_values_and_bad_buffers():
    # The check value of CRC-32C (RFC 3720's iSCSI CRC) and 32 zero bytes (RFC 3720 B.4).
    assert _core.crc32c(b"123456789") == 0xE3069283
    assert _core.crc32c(bytes(32)) == 0x8A9136AA
    assert _core.crc32c(b"123456789") != zlib.crc32(b"123456789")  # not the zip CRC
    array = np.arange(1000, dtype=np.float32)
    assert _core.crc32c(array) == _crc32c_bitwise(array.tobytes())
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.crc32c(array[::2])
    with pytest.raises(TypeError):
        _core.crc32c("text")  # type: ignore[arg-type]
