// Weight packing for the bf16 kernel set: Keras layouts in, bf16 pairs out (layouts in
// kernels_bf16.h). Each weight is rounded once, here, by round_to_bf16.
#include <algorithm>

#include "bf16/kernels_bf16.h"

namespace fastvgg {

namespace {
constexpr int kPairs = kChannelBlock / 2;

// Index of weight (kh, kw, ic, oc) in [out/16][in/16][3][3][8 pairs][16 out][2].
std::size_t packed_conv3x3_bf16_index(int in_blocks, int kh, int kw, int ic, int oc) {
  const int ob = oc / kChannelBlock, ib = ic / kChannelBlock, lane_in = ic % kChannelBlock;
  const std::size_t tap = ((std::size_t(ob) * in_blocks + ib) * 3 + kh) * 3 + kw;
  return ((tap * kPairs + lane_in / 2) * kChannelBlock + oc % kChannelBlock) * 2 + lane_in % 2;
}
}  // namespace

std::size_t packed_conv3x3_bf16_size(int in_channels, int out_channels) {
  return std::size_t(channel_blocks(out_channels)) * channel_blocks(in_channels) * 9 * kChannelBlock * kChannelBlock;
}

void pack_conv3x3_bf16(const float* kernel_hwio, int in_channels, int out_channels, std::uint16_t* packed) {
  std::fill(packed, packed + packed_conv3x3_bf16_size(in_channels, out_channels), std::uint16_t(0));
  const int in_blocks = channel_blocks(in_channels);
#pragma omp parallel for collapse(2) schedule(static)
  for (int kh = 0; kh < 3; ++kh)
    for (int kw = 0; kw < 3; ++kw)
      for (int ic = 0; ic < in_channels; ++ic)
        for (int oc = 0; oc < out_channels; ++oc)
          packed[packed_conv3x3_bf16_index(in_blocks, kh, kw, ic, oc)] =
              round_to_bf16(kernel_hwio[((std::size_t(kh) * 3 + kw) * in_channels + ic) * out_channels + oc]);
}

std::size_t packed_dense_bf16_size(int depth, int cols) {
  return std::size_t(channel_blocks(cols)) * std::size_t((depth + 1) / 2) * 2 * kChannelBlock;
}

void pack_dense_rows_bf16(const float* kernel_rows, int first_row, int row_count, int depth, int cols,
                          std::uint16_t* packed) {
  const std::size_t panel_stride = std::size_t((depth + 1) / 2) * 2 * kChannelBlock;
  const int panels = channel_blocks(cols);
  // As in the fp32 packing: a group of rows is read once into cache and written panel by panel.
  constexpr int kRowsPerGroup = 32;
  const int groups = (row_count + kRowsPerGroup - 1) / kRowsPerGroup;
#pragma omp parallel for schedule(static)
  for (int g = 0; g < groups; ++g) {
    const int begin = g * kRowsPerGroup, end = std::min(row_count, begin + kRowsPerGroup);
    for (int p = 0; p < panels; ++p) {
      const int lanes = std::min(kChannelBlock, cols - p * kChannelBlock);
      std::uint16_t* panel = packed + std::size_t(p) * panel_stride;
      for (int r = begin; r < end; ++r) {
        const int row = first_row + r;
        const float* src = kernel_rows + std::size_t(r) * cols + std::size_t(p) * kChannelBlock;
        std::uint16_t* dst = panel + std::size_t(row / 2) * 2 * kChannelBlock + row % 2;
        for (int c = 0; c < lanes; ++c) dst[2 * c] = round_to_bf16(src[c]);
      }
    }
  }
}

}  // namespace fastvgg
