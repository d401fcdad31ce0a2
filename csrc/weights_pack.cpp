// Weight packing: Keras's layouts in, the kernels' layouts out (and back, for get_weights).
//
// conv3x3: Keras HWIO [3][3][in][out] -> [out/16][in/16][3][3][in 16][out 16]. One (block
//          pair, tap) is a 16x16 tile whose rows are whole output vectors, in the order the
//          kernel's input-channel loop visits them. Padding channels are zero.
// dense:   Keras [depth][cols] -> column panels [cols/16][depth][16], zero-padded columns.
#include <algorithm>

#include "kernels.h"

namespace fastvgg {

std::size_t packed_conv3x3_size(int in_channels, int out_channels) {
  return std::size_t(channel_blocks(out_channels)) * channel_blocks(in_channels) * 9 * kChannelBlock * kChannelBlock;
}

namespace {
std::size_t packed_conv3x3_index(int in_blocks, int kh, int kw, int ic, int oc) {
  const int ob = oc / kChannelBlock, ib = ic / kChannelBlock;
  return ((((std::size_t(ob) * in_blocks + ib) * 3 + kh) * 3 + kw) * kChannelBlock + ic % kChannelBlock) * kChannelBlock +
         oc % kChannelBlock;
}
}  // namespace

void pack_conv3x3(const float* kernel_hwio, int in_channels, int out_channels, float* packed) {
  std::fill(packed, packed + packed_conv3x3_size(in_channels, out_channels), 0.0f);
  const int in_blocks = channel_blocks(in_channels);
  // Every (tap, channel pair) has its own slot, so the taps can be packed in parallel.
#pragma omp parallel for collapse(2) schedule(static)
  for (int kh = 0; kh < 3; ++kh)
    for (int kw = 0; kw < 3; ++kw)
      for (int ic = 0; ic < in_channels; ++ic)
        for (int oc = 0; oc < out_channels; ++oc)
          packed[packed_conv3x3_index(in_blocks, kh, kw, ic, oc)] =
              kernel_hwio[((std::size_t(kh) * 3 + kw) * in_channels + ic) * out_channels + oc];
}

void unpack_conv3x3(const float* packed, int in_channels, int out_channels, float* kernel_hwio) {
  const int in_blocks = channel_blocks(in_channels);
  for (int kh = 0; kh < 3; ++kh)
    for (int kw = 0; kw < 3; ++kw)
      for (int ic = 0; ic < in_channels; ++ic)
        for (int oc = 0; oc < out_channels; ++oc)
          kernel_hwio[((std::size_t(kh) * 3 + kw) * in_channels + ic) * out_channels + oc] =
              packed[packed_conv3x3_index(in_blocks, kh, kw, ic, oc)];
}

std::size_t packed_dense_size(int depth, int cols) {
  return std::size_t(channel_blocks(cols)) * depth * kChannelBlock;
}

void pack_dense_rows(const float* kernel_rows, int first_row, int row_count, int depth, int cols, float* packed) {
  const std::size_t panel_stride = std::size_t(depth) * kChannelBlock;
  // Rows land in disjoint slots of every panel: split them over threads.
#pragma omp parallel for schedule(static)
  for (int r = 0; r < row_count; ++r) {
    const float* src = kernel_rows + std::size_t(r) * cols;
    const std::size_t k = std::size_t(first_row + r);
    for (int c = 0; c < cols; ++c)
      packed[(c / kChannelBlock) * panel_stride + k * kChannelBlock + c % kChannelBlock] = src[c];
  }
}

void unpack_dense(const float* packed, int depth, int cols, float* kernel) {
  const std::size_t panel_stride = std::size_t(depth) * kChannelBlock;
  for (int k = 0; k < depth; ++k)
    for (int c = 0; c < cols; ++c)
      kernel[std::size_t(k) * cols + c] = packed[(c / kChannelBlock) * panel_stride + std::size_t(k) * kChannelBlock + c % kChannelBlock];
}

}  // namespace fastvgg
