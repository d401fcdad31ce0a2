// Convolutions a fine-tuned head adds to VGG's: 1x1 (a dense layer at every pixel) and 3x3
// 'valid'. The 'valid' 3x3 reuses the 'same' kernels (direct or Winograd) and crops one pixel
// ring: the ring's outputs are the only ones that read the zero padding, so the interior is
// exactly the 'valid' result.
//
// The 1x1 kernel keeps a row of pixels' output vectors in registers (the 3x3 kernel's tile
// width) and streams the packed weights, one 16-wide output vector per input channel.
#include <algorithm>
#include <cstring>

#include "ops.h"
#include "simd.h"

namespace fastvgg {
namespace FASTVGG_ISA {
namespace {

template <int kPixels>
inline void conv1x1_tile(const BlockedImage& in, const float* panel, const float* bias, bool relu, float* dst, int y,
                         int x0) {
  Vec16 acc[kPixels];
  for (int t = 0; t < kPixels; ++t) acc[t] = load(bias);
  for (int ib = 0; ib < in.blocks(); ++ib) {
    const float* src = in.at(ib, y, x0);
    const int lanes = std::min(kChannelBlock, in.channels - ib * kChannelBlock);
    for (int i = 0; i < lanes; ++i) {
      const Vec16 w = load(panel + std::ptrdiff_t(ib * kChannelBlock + i) * kChannelBlock);
      for (int t = 0; t < kPixels; ++t) acc[t] = fmadd(broadcast(src[t * kChannelBlock + i]), w, acc[t]);
    }
  }
  for (int t = 0; t < kPixels; ++t) store(dst + t * kChannelBlock, relu ? fastvgg::FASTVGG_ISA::relu(acc[t]) : acc[t]);
}

}  // namespace

void conv1x1(const BlockedImage& in, const float* packed_weights, const float* bias, bool relu, const BlockedImage& out,
             int threads) {
  const int items = out.blocks() * out.height;
  const std::ptrdiff_t panel_stride = std::ptrdiff_t(in.channels) * kChannelBlock;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int item = 0; item < items; ++item) {
    const int ob = item / out.height, y = item % out.height;
    const float* panel = packed_weights + ob * panel_stride;
    const float* block_bias = bias + ob * kChannelBlock;
    int x = 0;
    for (; x + kConvTileWidth <= out.width; x += kConvTileWidth)
      conv1x1_tile<kConvTileWidth>(in, panel, block_bias, relu, out.at(ob, y, x), y, x);
    for (; x < out.width; ++x) conv1x1_tile<1>(in, panel, block_bias, relu, out.at(ob, y, x), y, x);
  }
}

void crop_border(const BlockedImage& in, const BlockedImage& out, int threads) {
  const int items = out.blocks() * out.height;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int item = 0; item < items; ++item) {
    const int b = item / out.height, y = item % out.height;
    std::memcpy(out.at(b, y, 0), in.at(b, y + 1, 1), sizeof(float) * std::size_t(out.width) * kChannelBlock);
  }
}

}  // namespace FASTVGG_ISA

#if FASTVGG_ISA_IS_GENERIC
namespace reference {

void conv(const float* x, int images, int height, int width, int in_channels, const float* kernel_hwio,
          int kernel_size, bool same, const float* bias, int out_channels, float* y) {
  const int pad = same ? kernel_size / 2 : 0;
  const int out_h = same ? height : height - kernel_size + 1, out_w = same ? width : width - kernel_size + 1;
  for (int n = 0; n < images; ++n)
    for (int oy = 0; oy < out_h; ++oy)
      for (int ox = 0; ox < out_w; ++ox)
        for (int oc = 0; oc < out_channels; ++oc) {
          float sum = bias ? bias[oc] : 0.0f;
          for (int ky = 0; ky < kernel_size; ++ky)
            for (int kx = 0; kx < kernel_size; ++kx) {
              const int iy = oy + ky - pad, ix = ox + kx - pad;
              if (iy < 0 || iy >= height || ix < 0 || ix >= width) continue;
              const float* pixel = x + ((std::ptrdiff_t(n) * height + iy) * width + ix) * in_channels;
              for (int ic = 0; ic < in_channels; ++ic)
                sum += pixel[ic] * kernel_hwio[((std::ptrdiff_t(ky) * kernel_size + kx) * in_channels + ic) * out_channels + oc];
            }
          y[((std::ptrdiff_t(n) * out_h + oy) * out_w + ox) * out_channels + oc] = sum;
        }
}

}  // namespace reference
#endif

}  // namespace fastvgg
