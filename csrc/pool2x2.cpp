// 2x2, stride-2 pooling as fine-tuned heads use it: average ('valid' and 'same') and max
// 'same' (VGG's own 'valid' max pooling is pool.cpp's max_pool2x2).
//
// 'same' pooling of an odd size adds one output whose window hangs over the far edge: Keras
// (TensorFlow) pads only there, and max ignores the padding while average divides by the
// pixels that exist. The zero border of the blocked layout must therefore never enter a
// window: windows at the edge read only the pixels they have.
//
// NaN in a window gives NaN, for max as for average (see pool.cpp).
#include <algorithm>

#include "ops.h"
#include "simd.h"

namespace fastvgg {
namespace FASTVGG_ISA {

void pool2x2(const BlockedImage& in, GlobalPoolMode mode, const BlockedImage& out, int threads) {
  const int items = out.blocks() * out.height;
  const bool average = mode == GlobalPoolMode::Average;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int item = 0; item < items; ++item) {
    const int b = item / out.height, y = item % out.height;
    const int rows = std::min(2, in.height - 2 * y);
    const float* top = in.at(b, 2 * y, 0);
    const float* bottom = in.at(b, 2 * y + rows - 1, 0);  // the top row again when the window has one
    float* dst = out.at(b, y, 0);
    for (int x = 0; x < out.width; ++x) {
      const int cols = std::min(2, in.width - 2 * x);
      const float* t = top + 2 * x * kChannelBlock;
      const float* u = bottom + 2 * x * kChannelBlock;
      const int right = (cols - 1) * kChannelBlock;  // the same pixel when the window has one column
      Vec16 result;
      if (average) {
        Vec16 sum = load(t);
        if (cols == 2) sum = add(sum, load(t + right));
        if (rows == 2) {
          sum = add(sum, load(u));
          if (cols == 2) sum = add(sum, load(u + right));
        }
        // 1, 2 or 4 pixels: the reciprocal is exact, so this is the division Keras does.
        result = fmadd(sum, broadcast(1.0f / float(rows * cols)), zero());
      } else {
        result = max_keep_nan(max_keep_nan(load(t), load(t + right)), max_keep_nan(load(u), load(u + right)));
      }
      store(dst + x * kChannelBlock, result);
    }
  }
}

}  // namespace FASTVGG_ISA

#if FASTVGG_ISA_IS_GENERIC
namespace reference {

void pool2x2(const float* x, int images, int height, int width, int channels, GlobalPoolMode mode, bool same,
             float* y) {
  const int out_h = same ? (height + 1) / 2 : height / 2, out_w = same ? (width + 1) / 2 : width / 2;
  for (int n = 0; n < images; ++n)
    for (int oy = 0; oy < out_h; ++oy)
      for (int ox = 0; ox < out_w; ++ox)
        for (int c = 0; c < channels; ++c) {
          float sum = 0.0f, peak = 0.0f;
          int count = 0;
          for (int dy = 0; dy < 2; ++dy)
            for (int dx = 0; dx < 2; ++dx) {
              const int iy = 2 * oy + dy, ix = 2 * ox + dx;
              if (iy >= height || ix >= width) continue;
              const float v = x[((std::ptrdiff_t(n) * height + iy) * width + ix) * channels + c];
              // The first value, then any larger one or a NaN; a NaN once taken stays.
              if (count == 0 || v != v || (peak == peak && v > peak)) peak = v;
              sum += v;
              ++count;
            }
          y[((std::ptrdiff_t(n) * out_h + oy) * out_w + ox) * channels + c] =
              mode == GlobalPoolMode::Average ? sum / float(count) : peak;
        }
}

}  // namespace reference
#endif

}  // namespace fastvgg
