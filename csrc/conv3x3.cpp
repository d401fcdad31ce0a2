// 3x3 convolution, stride 1, 'same' zero padding, bias, optional fused ReLU.
//
// Fast kernel: direct convolution on the blocked layout. A register tile holds
// kConvTileWidth output pixels of one row for kConvOutBlocks blocks of 16 output channels;
// each input value is broadcast once and feeds every output block of the tile, and each
// weight vector is loaded once per tile and feeds every pixel. The zero border of the input
// supplies the padding, so the tile loop has no edge tests.
//
// Packed weights (weights_pack.cpp): [out_block][in_block][kh][kw][in 16][out 16].
#include <algorithm>

#include "gemm_microkernel.h"
#include "kernels.h"
#include "simd.h"

namespace fastvgg {
namespace FASTVGG_ISA {
namespace {

constexpr int kTapWeights = kChannelBlock * kChannelBlock;  // one (kh, kw) tap of one block pair

template <int kTile, int kOutBlocks>
inline void conv_tile(const BlockedImage& in, const float* in_origin, const float* weights,
                      std::ptrdiff_t weights_out_stride, const float* bias, bool relu,
                      float* out_origin, std::ptrdiff_t out_block_stride) {
  Vec16 acc[kTile][kOutBlocks];  // [output pixel][output block]
  for (int j = 0; j < kOutBlocks; ++j) {
    const Vec16 b = load(bias + j * kChannelBlock);
    for (int t = 0; t < kTile; ++t) acc[t][j] = b;
  }
  const int in_blocks = in.blocks();
  const int last_block_channels = in.channels - (in_blocks - 1) * kChannelBlock;
  const std::ptrdiff_t row_stride = in.row_stride();
  for (int ib = 0; ib < in_blocks; ++ib) {
    // The first layer has 3 input channels: loop over the real ones, not the padded 16.
    const int channels = ib == in_blocks - 1 ? last_block_channels : kChannelBlock;
    const float* in_block = in_origin + ib * in.block_stride();
    const float* w_block = weights + std::ptrdiff_t(ib) * 9 * kTapWeights;
    for (int kh = 0; kh < 3; ++kh)
      for (int kw = 0; kw < 3; ++kw)
        // One tap: the tile's pixels (16 floats apart in the blocked row) times a 16 x 16
        // weight tile per output block.
        gemm_accumulate(acc, in_block + kh * row_stride + kw * kChannelBlock, kChannelBlock,
                        w_block + (kh * 3 + kw) * kTapWeights, weights_out_stride, channels);
  }
  for (int j = 0; j < kOutBlocks; ++j) {
    float* dst = out_origin + j * out_block_stride;
    for (int t = 0; t < kTile; ++t) store(dst + t * kChannelBlock, relu ? FASTVGG_ISA::relu(acc[t][j]) : acc[t][j]);
  }
}

// Runs tile widths kTile, kTile-1, ..., 1 so that a row of any width is covered exactly.
template <int kTile, int kOutBlocks>
inline void conv_row(const BlockedImage& in, int y, const float* weights, std::ptrdiff_t weights_out_stride,
                     const float* bias, bool relu, const BlockedImage& out, int out_block, int x_begin) {
  int x = x_begin;
  for (; x + kTile <= out.width; x += kTile) {
    // in.at(0, y - 1, x - 1) is the top-left tap of output pixel (y, x).
    conv_tile<kTile, kOutBlocks>(in, in.at(0, y - 1, x - 1), weights, weights_out_stride, bias, relu,
                                 out.at(out_block, y, x), out.block_stride());
  }
  if constexpr (kTile > 1) {
    if (x < out.width) conv_row<kTile - 1, kOutBlocks>(in, y, weights, weights_out_stride, bias, relu, out, out_block, x);
  }
}

}  // namespace

void conv3x3(const BlockedImage& in, const void* packed, const float* bias, bool relu, const BlockedImage& out,
             int threads, KernelScratch& /*scratch: the direct kernel needs none*/) {
  const float* packed_weights = static_cast<const float*>(packed);
  const int out_blocks = out.blocks();
  const int groups = (out_blocks + kConvOutBlocks - 1) / kConvOutBlocks;
  const std::ptrdiff_t weights_out_stride = std::ptrdiff_t(in.blocks()) * 9 * kTapWeights;
  const int items = groups * out.height;
  // Rows of one output-block group are contiguous in the static schedule, so a thread keeps
  // that group's weights in its L2 while it walks down the image.
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int item = 0; item < items; ++item) {
    const int group = item / out.height;
    const int y = item % out.height;
    const int first_block = group * kConvOutBlocks;
    const float* weights = packed_weights + first_block * weights_out_stride;
    const float* group_bias = bias + first_block * kChannelBlock;
    if (first_block + kConvOutBlocks <= out_blocks) {
      conv_row<kConvTileWidth, kConvOutBlocks>(in, y, weights, weights_out_stride, group_bias, relu, out,
                                               first_block, 0);
    } else {
      for (int b = first_block; b < out_blocks; ++b) {
        conv_row<kConvTileWidth, 1>(in, y, packed_weights + b * weights_out_stride, weights_out_stride,
                                    bias + b * kChannelBlock, relu, out, b, 0);
      }
    }
  }
}

}  // namespace FASTVGG_ISA

#if FASTVGG_ISA_IS_GENERIC
namespace reference {

void conv3x3(const float* x, int images, int height, int width, int in_channels, const float* kernel_hwio,
             const float* bias, int out_channels, bool relu, float* y) {
  for (int n = 0; n < images; ++n) {
    const float* image = x + std::ptrdiff_t(n) * height * width * in_channels;
    float* result = y + std::ptrdiff_t(n) * height * width * out_channels;
    for (int oy = 0; oy < height; ++oy) {
      for (int ox = 0; ox < width; ++ox) {
        float* pixel = result + (std::ptrdiff_t(oy) * width + ox) * out_channels;
        for (int oc = 0; oc < out_channels; ++oc) {
          float sum = bias[oc];
          for (int kh = 0; kh < 3; ++kh) {
            const int iy = oy + kh - 1;
            if (iy < 0 || iy >= height) continue;
            for (int kw = 0; kw < 3; ++kw) {
              const int ix = ox + kw - 1;
              if (ix < 0 || ix >= width) continue;
              const float* src = image + (std::ptrdiff_t(iy) * width + ix) * in_channels;
              const float* w = kernel_hwio + (std::ptrdiff_t(kh * 3 + kw) * in_channels) * out_channels + oc;
              for (int ic = 0; ic < in_channels; ++ic) sum += src[ic] * w[std::ptrdiff_t(ic) * out_channels];
            }
          }
          pixel[oc] = relu ? std::max(sum, 0.0f) : sum;
        }
      }
    }
  }
}

}  // namespace reference
#endif

}  // namespace fastvgg
