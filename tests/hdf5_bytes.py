"""Byte-level helpers for building hostile HDF5 files from valid ones: find the structures a
patch aims at, and recompute the checksums libhdf5 verifies, so that a patch reaches the code
that parses the patched field instead of stopping at "incorrect metadata checksum".

Facts used (HDF5 file format specification, version 2 object headers and global heaps):
an object header chunk "OHDR" holds version, flags, optional times and attribute phase
change values, a chunk size of 1/2/4/8 bytes (flags bits 0-1), the messages, then a Jenkins
lookup3 checksum of everything before it; a global heap collection "GCOL" has a 16-byte
header (signature, version, 3 reserved, 8-byte size) and objects of 16-byte headers (index,
reference count, reserved, 8-byte size) padded to 8 bytes, the free space being index 0.
"""

from __future__ import annotations

import struct

_MASK = 0xFFFFFFFF

# An IEEE binary32 little-endian datatype message: version 1 / class 1 (float), bit field
# (implied normalisation, sign at bit 31), size 4, bit offset 0, precision 32, exponent at
# 23 of 8 bits, mantissa at 0 of 23 bits, exponent bias 127.
FLOAT32_MESSAGE = bytes.fromhex("11201f00" "04000000" "0000" "2000" "17" "08" "00" "17" "7f000000")
MANTISSA_SIZE_BYTE, EXPONENT_BIAS_BYTE = 15, 16


def _rotate(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _MASK


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' hashlittle, as HDF5's H5_checksum_lookup3 computes it."""
    length = len(data)
    a = b = c = (0xDEADBEEF + length + initval) & _MASK
    i = 0
    while length > 12:
        a = (a + int.from_bytes(data[i : i + 4], "little")) & _MASK
        b = (b + int.from_bytes(data[i + 4 : i + 8], "little")) & _MASK
        c = (c + int.from_bytes(data[i + 8 : i + 12], "little")) & _MASK
        a = (a - c) & _MASK; a ^= _rotate(c, 4); c = (c + b) & _MASK  # noqa: E702
        b = (b - a) & _MASK; b ^= _rotate(a, 6); a = (a + c) & _MASK  # noqa: E702
        c = (c - b) & _MASK; c ^= _rotate(b, 8); b = (b + a) & _MASK  # noqa: E702
        a = (a - c) & _MASK; a ^= _rotate(c, 16); c = (c + b) & _MASK  # noqa: E702
        b = (b - a) & _MASK; b ^= _rotate(a, 19); a = (a + c) & _MASK  # noqa: E702
        c = (c - b) & _MASK; c ^= _rotate(b, 4); b = (b + a) & _MASK  # noqa: E702
        length -= 12
        i += 12
    if length == 0:
        return c
    tail = data[i:] + bytes(12 - length)
    a = (a + int.from_bytes(tail[0:4], "little")) & _MASK
    b = (b + int.from_bytes(tail[4:8], "little")) & _MASK
    c = (c + int.from_bytes(tail[8:12], "little")) & _MASK
    c ^= b; c = (c - _rotate(b, 14)) & _MASK  # noqa: E702
    a ^= c; a = (a - _rotate(c, 11)) & _MASK  # noqa: E702
    b ^= a; b = (b - _rotate(a, 25)) & _MASK  # noqa: E702
    c ^= b; c = (c - _rotate(b, 16)) & _MASK  # noqa: E702
    a ^= c; a = (a - _rotate(c, 4)) & _MASK  # noqa: E702
    b ^= a; b = (b - _rotate(a, 14)) & _MASK  # noqa: E702
    c ^= b; c = (c - _rotate(b, 24)) & _MASK  # noqa: E702
    return c


def object_header_chunks(data: bytes):
    """(start, checksum offset) of every version 2 object header's first chunk."""
    position = data.find(b"OHDR\x02")
    while position != -1:
        flags = data[position + 5]
        cursor = position + 6 + (16 if flags & 0x20 else 0) + (4 if flags & 0x10 else 0)
        width = 1 << (flags & 3)
        if cursor + width <= len(data):
            end = cursor + width + int.from_bytes(data[cursor : cursor + width], "little")
            if end + 4 <= len(data):
                yield position, end
        position = data.find(b"OHDR\x02", position + 1)


def fix_checksums(data: bytearray) -> bytearray:
    """Recomputes the checksum of every version 2 object header chunk (after a patch)."""
    for start, end in object_header_chunks(bytes(data)):
        data[end : end + 4] = struct.pack("<I", lookup3(bytes(data[start:end])))
    return data


def global_heap(data: bytes) -> int:
    """Offset of the (only) global heap collection, where HDF5 keeps variable-length strings."""
    collection = data.index(b"GCOL\x01")
    assert data.find(b"GCOL\x01", collection + 1) == -1, "more than one global heap collection"
    return collection


def free_space_object(data: bytes, collection: int) -> int:
    """Offset of a collection's free-space object (heap object index 0)."""
    size = struct.unpack_from("<Q", data, collection + 8)[0]
    position = collection + 16
    while position < collection + size:
        index, _, _, object_size = struct.unpack_from("<HHIQ", data, position)
        if index == 0:
            return position
        position += 16 + (object_size + 7) // 8 * 8
    raise AssertionError("no free space in the global heap")
