// CRC-32C (Castagnoli), the checksum TensorFlow's checkpoints carry on every table block and
// every tensor: fastvgg checks it when it reads a SavedModel's variables.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fastvgg {

// The CRC-32C of `size` bytes continuing from `crc` (0 to start), as crc32c libraries compute
// it (pre- and post-inverted): crc32c("123456789") == 0xE3069283. Uses SSE4.2's crc32
// instruction where the CPU has it, else a table; both give the same value.
std::uint32_t crc32c_extend(std::uint32_t crc, const void* data, std::size_t size);
// The table path alone (the plain twin the tests compare the instruction path with).
std::uint32_t crc32c_extend_table(std::uint32_t crc, const void* data, std::size_t size);

}  // namespace fastvgg
