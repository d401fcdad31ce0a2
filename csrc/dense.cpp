// Dense (fully connected) layers: y = x W + bias, ReLU optional; softmax is applied after.
//
// Packed weights (weights_pack.cpp) are column panels, [cols/16][depth][16]: each panel is
// one contiguous stream, so at batch 1 (where fc1's 411 MB dominate) the weights are read
// exactly once, sequentially, by both threads, each on its own panels. For larger batches
// the depth is cut into blocks that stay in L2 while every row of x passes over them.
#include <algorithm>
#include <cmath>
#include <vector>

#include "gemm_microkernel.h"
#include "kernels.h"
#include "simd.h"

namespace fastvgg {
namespace FASTVGG_ISA {
namespace {

constexpr int kDepthBlock = 512;  // 4 panels x 512 x 64 B = 128 KiB: well inside L2.

struct DenseArgs {
  const float* x;
  std::ptrdiff_t x_stride;
  const float* weights;  // first panel of the tile
  std::ptrdiff_t panel_stride;
  const float* bias;  // first column of the tile
  float* y;           // first row and column of the tile
  std::ptrdiff_t y_stride;
  int k_begin, k_end;
  bool first, last, relu;
};

template <int kRows, int kPanels>
inline void dense_tile(const DenseArgs& a) {
  Vec16 acc[kRows][kPanels];
  for (int r = 0; r < kRows; ++r)
    for (int p = 0; p < kPanels; ++p)
      acc[r][p] = a.first ? load(a.bias + p * kChannelBlock) : load(a.y + r * a.y_stride + p * kChannelBlock);
  gemm_accumulate(acc, a.x + a.k_begin, a.x_stride, a.weights + std::ptrdiff_t(a.k_begin) * kChannelBlock,
                  a.panel_stride, a.k_end - a.k_begin);
  const bool apply_relu = a.last && a.relu;
  for (int r = 0; r < kRows; ++r)
    for (int p = 0; p < kPanels; ++p)
      store(a.y + r * a.y_stride + p * kChannelBlock, apply_relu ? relu(acc[r][p]) : acc[r][p]);
}

// Picks the tile instantiation for the rows and panels left at an edge.
template <int kRows, int kPanels>
inline void dense_edge_tile(int rows, int panels, const DenseArgs& a) {
  if constexpr (kRows > 1) {
    if (rows < kRows) return dense_edge_tile<kRows - 1, kPanels>(rows, panels, a);
  }
  if constexpr (kPanels > 1) {
    if (panels < kPanels) return dense_edge_tile<kRows, kPanels - 1>(rows, panels, a);
  }
  dense_tile<kRows, kPanels>(a);
}

}  // namespace

void dense(const float* x, int rows, int depth, std::ptrdiff_t x_stride, const void* packed, const float* bias,
           int cols, bool relu, float* y, std::ptrdiff_t y_stride, int threads) {
  const float* packed_weights = static_cast<const float*>(packed);
  const int panels = channel_blocks(cols);
  const std::ptrdiff_t panel_stride = std::ptrdiff_t(depth) * kChannelBlock;
  const int groups = (panels + kDensePanels - 1) / kDensePanels;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int g = 0; g < groups; ++g) {
    const int first_panel = g * kDensePanels;
    const int group_panels = std::min(kDensePanels, panels - first_panel);
    for (int k0 = 0; k0 < depth; k0 += kDepthBlock) {
      const int k1 = std::min(depth, k0 + kDepthBlock);
      for (int r0 = 0; r0 < rows; r0 += kDenseRows) {
        DenseArgs a;
        a.x = x + r0 * x_stride;
        a.x_stride = x_stride;
        a.weights = packed_weights + first_panel * panel_stride;
        a.panel_stride = panel_stride;
        a.bias = bias + first_panel * kChannelBlock;
        a.y = y + r0 * y_stride + first_panel * kChannelBlock;
        a.y_stride = y_stride;
        a.k_begin = k0;
        a.k_end = k1;
        a.first = k0 == 0;
        a.last = k1 == depth;
        a.relu = relu;
        dense_edge_tile<kDenseRows, kDensePanels>(std::min(kDenseRows, rows - r0), group_panels, a);
      }
    }
  }
}

}  // namespace FASTVGG_ISA

#if FASTVGG_ISA_IS_GENERIC
namespace reference {

void dense(const float* x, int rows, int depth, const float* kernel, const float* bias, int cols, bool relu,
           float* y) {
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) {
      float sum = bias[c];
      for (int k = 0; k < depth; ++k) sum += x[std::ptrdiff_t(r) * depth + k] * kernel[std::ptrdiff_t(k) * cols + c];
      y[std::ptrdiff_t(r) * cols + c] = relu ? std::max(sum, 0.0f) : sum;
    }
}

}  // namespace reference

void softmax_rows(float* y, int rows, int cols, std::ptrdiff_t row_stride) {
  for (int r = 0; r < rows; ++r) {
    float* row = y + r * row_stride;
    const float peak = *std::max_element(row, row + cols);
    double total = 0.0;
    for (int c = 0; c < cols; ++c) {
      row[c] = std::exp(row[c] - peak);
      total += row[c];
    }
    const float scale = float(1.0 / total);
    for (int c = 0; c < cols; ++c) row[c] *= scale;
  }
}

void softmax_pixels(const BlockedImage& image, int threads) {
  const int channels = image.channels;
#pragma omp parallel num_threads(threads)
  {
    // One pixel's channels, gathered from their blocks: a segmentation head's classes, a few
    // dozen floats, so the copy costs little next to the exponentials.
    std::vector<float> row(static_cast<std::size_t>(channels));
#pragma omp for schedule(static)
    for (int y = 0; y < image.height; ++y)
      for (int x = 0; x < image.width; ++x) {
        for (int c = 0; c < channels; ++c) row[std::size_t(c)] = image.at(c / kChannelBlock, y, x)[c % kChannelBlock];
        softmax_rows(row.data(), 1, channels, channels);
        for (int c = 0; c < channels; ++c) image.at(c / kChannelBlock, y, x)[c % kChannelBlock] = row[std::size_t(c)];
      }
  }
}
#endif

}  // namespace fastvgg
