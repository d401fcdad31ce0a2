// Dense layers with bf16 weights and products (vdpbf16ps), fp32 accumulation and output.
//
// At batch 1 a dense layer is a stream of its weights (fc1: 411 MB in fp32), so bf16 weights
// halve its time as well as its memory. Packed weights (pack_bf16.cpp) are column panels
// [cols/16][depth/2 row pairs][16 cols][2]: one vector is 16 columns x 2 rows, matching one
// broadcast 32-bit word of x (two neighbouring x values in bf16). x is converted to bf16 pairs
// once per call; the tile and depth blocking follow the fp32 dense kernel (dense.cpp).
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "bf16/kernels_bf16.h"

namespace fastvgg {
namespace avx512bf16 {
namespace {

constexpr int kRows = 6;     // 6 rows x 4 panels = 24 accumulators + 4 weight vectors
constexpr int kPanels = 4;
constexpr int kPairBlock = 512;  // 4 panels x 512 pairs x 64 B = 128 KiB: inside the L2

struct DenseArgs {
  const std::uint32_t* x;  // first row of the tile, bf16 pairs
  std::ptrdiff_t x_stride; // pairs per row
  const std::uint16_t* weights;  // first panel of the tile
  std::ptrdiff_t panel_stride;   // bf16 values per panel
  const float* bias;
  float* y;
  std::ptrdiff_t y_stride;
  int pair_begin, pair_end;
  bool first, last, relu;
};

template <int kR, int kP>
inline void dense_tile(const DenseArgs& a) {
  __m512 acc[kR][kP];
  for (int r = 0; r < kR; ++r)
    for (int p = 0; p < kP; ++p)
      acc[r][p] = a.first ? _mm512_loadu_ps(a.bias + p * kChannelBlock)
                          : _mm512_loadu_ps(a.y + r * a.y_stride + p * kChannelBlock);
  for (int k = a.pair_begin; k < a.pair_end; ++k) {
    __m512i w[kP];
    for (int p = 0; p < kP; ++p)
      w[p] = _mm512_loadu_si512(a.weights + p * a.panel_stride + std::ptrdiff_t(k) * 2 * kChannelBlock);
    for (int r = 0; r < kR; ++r) {
      const __m512i xr = _mm512_set1_epi32(int(a.x[r * a.x_stride + k]));
      for (int p = 0; p < kP; ++p) acc[r][p] = _mm512_dpbf16_ps(acc[r][p], (__m512bh)xr, (__m512bh)w[p]);
    }
  }
  const bool apply_relu = a.last && a.relu;
  const __m512 zero = _mm512_setzero_ps();
  for (int r = 0; r < kR; ++r)
    for (int p = 0; p < kP; ++p)
      _mm512_storeu_ps(a.y + r * a.y_stride + p * kChannelBlock, apply_relu ? _mm512_max_ps(zero, acc[r][p]) : acc[r][p]);
}

template <int kR, int kP>
inline void dense_edge_tile(int rows, int panels, const DenseArgs& a) {
  if constexpr (kR > 1) {
    if (rows < kR) return dense_edge_tile<kR - 1, kP>(rows, panels, a);
  }
  if constexpr (kP > 1) {
    if (panels < kP) return dense_edge_tile<kR, kP - 1>(rows, panels, a);
  }
  dense_tile<kR, kP>(a);
}

}  // namespace

void dense(const float* x, int rows, int depth, std::ptrdiff_t x_stride, const void* packed, const float* bias,
           int cols, bool relu, float* y, std::ptrdiff_t y_stride, int threads) {
  const auto* packed_weights = static_cast<const std::uint16_t*>(packed);
  const int panels = channel_blocks(cols);
  const int pairs = (depth + 1) / 2;
  const std::ptrdiff_t panel_stride = std::ptrdiff_t(pairs) * 2 * kChannelBlock;
  // x in bf16, an odd depth padded with a zero (its weight row is zero too): rows x depth x 2
  // bytes (50 KB for fc1 at batch 1), allocated per call since kernels keep no memory.
  std::vector<std::uint16_t> x_bf16(std::size_t(rows) * pairs * 2, 0);
  for (int r = 0; r < rows; ++r)
    round_floats(x + std::ptrdiff_t(r) * x_stride, std::size_t(depth), x_bf16.data() + std::size_t(r) * pairs * 2);
  const auto* x_pairs = reinterpret_cast<const std::uint32_t*>(x_bf16.data());
  const int groups = (panels + kPanels - 1) / kPanels;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int g = 0; g < groups; ++g) {
    const int first_panel = g * kPanels;
    const int group_panels = std::min(kPanels, panels - first_panel);
    // k0 == 0 runs once even for depth 0, so y still gets the bias.
    for (int k0 = 0; k0 == 0 || k0 < pairs; k0 += kPairBlock) {
      const int k1 = std::min(pairs, k0 + kPairBlock);
      for (int r0 = 0; r0 < rows; r0 += kRows) {
        DenseArgs a;
        a.x = x_pairs + std::ptrdiff_t(r0) * pairs;
        a.x_stride = pairs;
        a.weights = packed_weights + first_panel * panel_stride;
        a.panel_stride = panel_stride;
        a.bias = bias + first_panel * kChannelBlock;
        a.y = y + r0 * y_stride + first_panel * kChannelBlock;
        a.y_stride = y_stride;
        a.pair_begin = k0;
        a.pair_end = k1;
        a.first = k0 == 0;
        a.last = k1 == pairs;
        a.relu = relu;
        dense_edge_tile<kRows, kPanels>(std::min(kRows, rows - r0), group_panels, a);
      }
    }
  }
}

}  // namespace avx512bf16
}  // namespace fastvgg
