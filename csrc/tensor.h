// Memory and layout primitives shared by every op family.
//
// Activations between layers live in a blocked channel layout, "nChw16c" with a one-pixel
// zero border: one image is [C/16][H+2][W+2][16] floats. Sixteen channels fill one AVX-512
// register, so every inner loop loads whole vectors; the zero border makes 'same' padding
// free (the 3x3 kernel never tests for edges). Channels past C inside the last block and the
// border are kept at zero, which every kernel relies on.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>

#include "per_isa.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastvgg {

// Every function defined in this header carries FASTVGG_PER_ISA (per_isa.h says why): the
// per-ISA kernel objects include it, and none of them may lend its compiled copy to another.

constexpr int kChannelBlock = 16;
constexpr std::size_t kAlignment = 64;
// Buffers from this size on (packed weights, large activations) are aligned to 2 MB and
// offered to the kernel as transparent huge pages: streaming fc1 then crosses a page boundary
// every 2 MB instead of every 4 KB, and loading a model takes 512x fewer page faults.
constexpr std::size_t kHugePageBytes = std::size_t(2) << 20;

FASTVGG_PER_ISA inline int channel_blocks(int channels) { return (channels + kChannelBlock - 1) / kChannelBlock; }
FASTVGG_PER_ISA inline int round_up_to_block(int channels) { return channel_blocks(channels) * kChannelBlock; }

// A 64-byte aligned, zero-initialised float buffer that owns its memory.
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  FASTVGG_PER_ISA explicit AlignedBuffer(std::size_t count, bool zeroed = true) { resize(count, zeroed); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  FASTVGG_PER_ISA AlignedBuffer(AlignedBuffer&& other) noexcept { swap(other); }
  FASTVGG_PER_ISA AlignedBuffer& operator=(AlignedBuffer&& other) noexcept {
    AlignedBuffer tmp(std::move(other));
    swap(tmp);
    return *this;
  }
  FASTVGG_PER_ISA ~AlignedBuffer() { std::free(data_); }

  // Grows to at least `count` floats without zeroing; contents are undefined after a growth.
  FASTVGG_PER_ISA void ensure_capacity(std::size_t count) {
    if (count > size_) resize(count, /*zeroed=*/false);
  }
  // Scratch that every kernel overwrites in full may skip the zeroing.
  FASTVGG_PER_ISA void resize(std::size_t count, bool zeroed = true) {
    std::free(data_);
    data_ = nullptr;
    size_ = 0;
    if (count == 0) return;
    const std::size_t wanted = count * sizeof(float);
    const std::size_t alignment = wanted >= 2 * kHugePageBytes ? kHugePageBytes : kAlignment;
    std::size_t bytes = (wanted + alignment - 1) / alignment * alignment;
    data_ = static_cast<float*>(std::aligned_alloc(alignment, bytes));
    if (!data_) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (alignment == kHugePageBytes) madvise(data_, bytes, MADV_HUGEPAGE);  // advice only: failure is harmless
#endif
    if (zeroed) std::memset(data_, 0, bytes);
    size_ = count;
  }
  FASTVGG_PER_ISA float* data() { return data_; }
  FASTVGG_PER_ISA const float* data() const { return data_; }
  FASTVGG_PER_ISA std::size_t size() const { return size_; }
  FASTVGG_PER_ISA void swap(AlignedBuffer& other) noexcept {
    std::swap(data_, other.data_);
    std::swap(size_, other.size_);
  }

 private:
  float* data_ = nullptr;
  std::size_t size_ = 0;
};

// One image in the blocked layout with its zero border. Does not own memory.
struct BlockedImage {
  float* data = nullptr;
  int channels = 0;
  int height = 0;
  int width = 0;

  FASTVGG_PER_ISA int blocks() const { return channel_blocks(channels); }
  FASTVGG_PER_ISA std::ptrdiff_t row_stride() const { return std::ptrdiff_t(width + 2) * kChannelBlock; }
  FASTVGG_PER_ISA std::ptrdiff_t block_stride() const { return std::ptrdiff_t(height + 2) * row_stride(); }
  FASTVGG_PER_ISA std::size_t size() const { return std::size_t(blocks()) * std::size_t(block_stride()); }
  // Address of pixel (y, x) of channel block b; y and x may be -1 or height/width (the border).
  FASTVGG_PER_ISA float* at(int b, int y, int x) const {
    return data + b * block_stride() + (y + 1) * row_stride() + std::ptrdiff_t(x + 1) * kChannelBlock;
  }
};

FASTVGG_PER_ISA inline std::size_t blocked_image_size(int channels, int height, int width) {
  return std::size_t(channel_blocks(channels)) * std::size_t(height + 2) * std::size_t(width + 2) * kChannelBlock;
}

// Zeroes the one-pixel border of every channel block. A buffer is reused for layers of
// different shapes, so whatever a larger layer left there must be cleared before a 3x3 reads it.
FASTVGG_PER_ISA inline void zero_border(const BlockedImage& img) {
  const std::size_t row_bytes = std::size_t(img.row_stride()) * sizeof(float);
  for (int b = 0; b < img.blocks(); ++b) {
    std::memset(img.at(b, -1, -1), 0, row_bytes);
    std::memset(img.at(b, img.height, -1), 0, row_bytes);
    for (int y = 0; y < img.height; ++y) {
      std::memset(img.at(b, y, -1), 0, kChannelBlock * sizeof(float));
      std::memset(img.at(b, y, img.width), 0, kChannelBlock * sizeof(float));
    }
  }
}

}  // namespace fastvgg
