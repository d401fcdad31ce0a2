// 3x3 convolution with bf16 products (vdpbf16ps), stride 1, 'same' zero padding, bias,
// optional fused ReLU; fp32 blocked images in and out (tensor.h).
//
// vdpbf16ps multiplies 16 pairs of bf16 values by 16 other pairs and adds each lane's two
// products to an fp32 accumulator: one instruction is 32 multiply-adds, twice the lanes of an
// fp32 FMA at the same issue rate on Zen 4. The pairs run along the input channels: a weight
// vector holds 16 output channels x 2 input channels, and the input is one broadcast 32-bit
// word, the bf16 values of two neighbouring channels of one pixel.
//
// The activations arrive in fp32. Each work item (one output row for one group of output
// blocks) first converts the three input rows it reads, all input blocks, to bf16 in a
// per-thread buffer (in the caller's scratch); the register tile then broadcasts from it. The conversion is
// ~2% of the work (each input value feeds 9 taps x 32 output channels of a group), and no
// bf16 copy of the whole image is needed.
//
// Register tile as in the fp32 kernel: kTileWidth output pixels of one row x kOutBlocks
// blocks of 16 output channels = 28 accumulators, 2 weight vectors, 1 broadcast.
//
// Packed weights (pack_bf16.cpp): [out/16][in/16][3][3][8 pairs][16 out][2] bf16.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstring>

#include "bf16/kernels_bf16.h"

namespace fastvgg {
namespace avx512bf16 {
namespace {

constexpr int kTileWidth = 14;  // divides every VGG row width at 224x224
constexpr int kOutBlocks = 2;
constexpr int kPairs = kChannelBlock / 2;
constexpr int kTapElements = kChannelBlock * kChannelBlock;  // bf16 values of one tap of one block pair

// The bf16 copy of the three input rows one output row reads: [in block][3 rows][width + 2][16].
struct RowWindow {
  const std::uint16_t* data;
  std::ptrdiff_t pixel_stride = kChannelBlock;
  std::ptrdiff_t row_stride;    // (width + 2) * 16
  std::ptrdiff_t block_stride;  // 3 * row_stride
};

inline __m512i broadcast_pair(const std::uint16_t* p) {
  std::int32_t word;
  std::memcpy(&word, p, sizeof word);
  return _mm512_set1_epi32(word);
}

template <int kTile, int kBlocks>
inline void conv_tile(const RowWindow& window, int in_blocks, int pairs_in_last_block, int x,
                      const std::uint16_t* weights, std::ptrdiff_t weights_out_stride, const float* bias, bool relu,
                      float* out_origin, std::ptrdiff_t out_block_stride) {
  __m512 acc[kBlocks][kTile];
  for (int j = 0; j < kBlocks; ++j) {
    const __m512 b = _mm512_loadu_ps(bias + j * kChannelBlock);
    for (int t = 0; t < kTile; ++t) acc[j][t] = b;
  }
  for (int ib = 0; ib < in_blocks; ++ib) {
    // The first layer has 3 input channels: 2 pairs, not 8 (its padding channel is zero).
    const int pairs = ib == in_blocks - 1 ? pairs_in_last_block : kPairs;
    const std::uint16_t* in_block = window.data + ib * window.block_stride + std::ptrdiff_t(x) * kChannelBlock;
    const std::uint16_t* w_block = weights + std::ptrdiff_t(ib) * 9 * kTapElements;
    for (int kh = 0; kh < 3; ++kh) {
      for (int kw = 0; kw < 3; ++kw) {
        const std::uint16_t* src = in_block + kh * window.row_stride + kw * kChannelBlock;
        const std::uint16_t* w_tap = w_block + (kh * 3 + kw) * kTapElements;
        for (int p = 0; p < pairs; ++p) {
          __m512i w[kBlocks];
          for (int j = 0; j < kBlocks; ++j) w[j] = _mm512_loadu_si512(w_tap + j * weights_out_stride + p * 2 * kChannelBlock);
#pragma GCC unroll 16
          for (int t = 0; t < kTile; ++t) {
            const __m512i xv = broadcast_pair(src + t * kChannelBlock + 2 * p);
            for (int j = 0; j < kBlocks; ++j)
              acc[j][t] = _mm512_dpbf16_ps(acc[j][t], (__m512bh)xv, (__m512bh)w[j]);
          }
        }
      }
    }
  }
  const __m512 zero = _mm512_setzero_ps();
  for (int j = 0; j < kBlocks; ++j) {
    float* dst = out_origin + j * out_block_stride;
    // Zero first: max returns its second operand when either is NaN, so NaN stays NaN.
    for (int t = 0; t < kTile; ++t)
      _mm512_storeu_ps(dst + t * kChannelBlock, relu ? _mm512_max_ps(zero, acc[j][t]) : acc[j][t]);
  }
}

// Tile widths kTile, kTile-1, ..., 1, so a row of any width is covered exactly.
template <int kTile, int kBlocks>
inline void conv_row(const RowWindow& window, int in_blocks, int pairs_in_last_block, const std::uint16_t* weights,
                     std::ptrdiff_t weights_out_stride, const float* bias, bool relu, const BlockedImage& out, int y,
                     int out_block, int x_begin) {
  int x = x_begin;
  for (; x + kTile <= out.width; x += kTile)
    conv_tile<kTile, kBlocks>(window, in_blocks, pairs_in_last_block, x, weights, weights_out_stride, bias, relu,
                              out.at(out_block, y, x), out.block_stride());
  if constexpr (kTile > 1) {
    if (x < out.width)
      conv_row<kTile - 1, kBlocks>(window, in_blocks, pairs_in_last_block, weights, weights_out_stride, bias, relu,
                                   out, y, out_block, x);
  }
}

// Rows y-1, y, y+1 of every input block (border pixels included) into the bf16 window.
void convert_rows(const BlockedImage& in, int y, std::uint16_t* window, std::ptrdiff_t row_stride) {
  const int pixels = in.width + 2;
  for (int ib = 0; ib < in.blocks(); ++ib)
    for (int r = 0; r < 3; ++r) {
      const float* src = in.at(ib, y - 1 + r, -1);
      std::uint16_t* dst = window + (ib * 3 + r) * row_stride;
      for (int i = 0; i < pixels; ++i) {
        const __m256bh rounded = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i * kChannelBlock));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i * kChannelBlock), (__m256i)rounded);
      }
    }
}

}  // namespace

void conv3x3(const BlockedImage& in, const void* packed, const float* bias, bool relu, const BlockedImage& out,
             int threads, KernelScratch& scratch) {
  const auto* packed_weights = static_cast<const std::uint16_t*>(packed);
  const int in_blocks = in.blocks(), out_blocks = out.blocks();
  const int last_block_channels = in.channels - (in_blocks - 1) * kChannelBlock;
  const int pairs_in_last_block = (last_block_channels + 1) / 2;
  const int groups = (out_blocks + kOutBlocks - 1) / kOutBlocks;
  const std::ptrdiff_t weights_out_stride = std::ptrdiff_t(in_blocks) * 9 * kTapElements;
  const std::ptrdiff_t window_row_stride = std::ptrdiff_t(in.width + 2) * kChannelBlock;
  const int items = groups * out.height;
  // Each thread's bf16 row window lives in the caller's scratch (two bf16 values a float).
  const std::size_t window_elements = std::size_t(in_blocks) * 3 * std::size_t(window_row_stride);
  const std::size_t window_floats = (window_elements + 31) / 32 * 16;  // whole cache lines per thread
  scratch.products.ensure_capacity(window_floats * std::size_t(threads));
  float* windows = scratch.products.data();
#pragma omp parallel num_threads(threads)
  {
    auto* window_buffer = reinterpret_cast<std::uint16_t*>(windows + window_floats * std::size_t(omp_get_thread_num()));
    const RowWindow window{window_buffer, kChannelBlock, window_row_stride, 3 * window_row_stride};
    // Rows of one group are contiguous in the static schedule, so a thread keeps that group's
    // weights in its L2 while it walks down the image.
#pragma omp for schedule(static)
    for (int item = 0; item < items; ++item) {
      const int group = item / out.height, y = item % out.height;
      convert_rows(in, y, window_buffer, window_row_stride);
      const int first_block = group * kOutBlocks;
      if (first_block + kOutBlocks <= out_blocks) {
        conv_row<kTileWidth, kOutBlocks>(window, in_blocks, pairs_in_last_block,
                                         packed_weights + first_block * weights_out_stride, weights_out_stride,
                                         bias + first_block * kChannelBlock, relu, out, y, first_block, 0);
      } else {
        for (int b = first_block; b < out_blocks; ++b)
          conv_row<kTileWidth, 1>(window, in_blocks, pairs_in_last_block, packed_weights + b * weights_out_stride,
                                  weights_out_stride, bias + b * kChannelBlock, relu, out, y, b, 0);
      }
    }
  }
}

void round_floats(const float* values, std::size_t count, std::uint16_t* rounded) {
  std::size_t i = 0;
  for (; i + kChannelBlock <= count; i += kChannelBlock) {
    const __m256bh r = _mm512_cvtneps_pbh(_mm512_loadu_ps(values + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(rounded + i), (__m256i)r);
  }
  if (i < count) {
    const __mmask16 tail = __mmask16((1u << (count - i)) - 1);
    const __m256bh r = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(tail, values + i));
    _mm256_mask_storeu_epi16(rounded + i, tail, (__m256i)r);
  }
}

}  // namespace avx512bf16
}  // namespace fastvgg
