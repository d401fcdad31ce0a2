// Pooling: 2x2 max-pool with stride 2 (odd sizes floor, as Keras's 'valid' pooling does) and
// global average / max pooling down to one value per channel.
//
// A NaN anywhere in a window makes that window's maximum NaN, in every kernel: a NaN input
// must come out as NaN, never as a plausible finite number (TensorFlow's MaxPool drops NaN).
#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels.h"
#include "simd.h"

namespace fastvgg {
namespace FASTVGG_ISA {
namespace {
// A constant, not a call: an unoptimised build emits std::numeric_limits<float>::infinity()
// as a weak function, which this object would compile with its -m flags and share by name
// with every other object (see per_isa.h and tests/test_isa_symbols.py).
constexpr float kMinusInfinity = -std::numeric_limits<float>::infinity();
}  // namespace

void max_pool2x2(const BlockedImage& in, const BlockedImage& out, int threads) {
  const int items = out.blocks() * out.height;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int item = 0; item < items; ++item) {
    const int b = item / out.height;
    const int y = item % out.height;
    const float* top = in.at(b, 2 * y, 0);
    const float* bottom = in.at(b, 2 * y + 1, 0);
    float* dst = out.at(b, y, 0);
    for (int x = 0; x < out.width; ++x) {
      const float* t = top + 2 * x * kChannelBlock;
      const float* u = bottom + 2 * x * kChannelBlock;
      const Vec16 m = max_keep_nan(max_keep_nan(load(t), load(t + kChannelBlock)),
                                    max_keep_nan(load(u), load(u + kChannelBlock)));
      store(dst + x * kChannelBlock, m);
    }
  }
}

void global_pool(const BlockedImage& in, GlobalPoolMode mode, float* out) {
  alignas(64) float lanes[kChannelBlock];
  for (int b = 0; b < in.blocks(); ++b) {
    Vec16 acc = mode == GlobalPoolMode::Max ? broadcast(kMinusInfinity) : zero();
    for (int y = 0; y < in.height; ++y) {
      const float* row = in.at(b, y, 0);
      for (int x = 0; x < in.width; ++x) {
        const Vec16 v = load(row + x * kChannelBlock);
        acc = mode == GlobalPoolMode::Max ? max_keep_nan(v, acc) : add(acc, v);
      }
    }
    store(lanes, acc);
    const int count = std::min(kChannelBlock, in.channels - b * kChannelBlock);
    const float scale = 1.0f / float(in.height * in.width);
    for (int i = 0; i < count; ++i) out[b * kChannelBlock + i] = mode == GlobalPoolMode::Max ? lanes[i] : lanes[i] * scale;
  }
}

}  // namespace FASTVGG_ISA

#if FASTVGG_ISA_IS_GENERIC
namespace reference {

// std::max(m, v) keeps m when v is NaN; this keeps the NaN, whichever argument holds it.
inline float max_keep_nan(float m, float v) { return v > m || std::isnan(v) ? v : m; }

void max_pool2x2(const float* x, int images, int height, int width, int channels, float* y) {
  const int out_h = height / 2, out_w = width / 2;
  for (int n = 0; n < images; ++n)
    for (int oy = 0; oy < out_h; ++oy)
      for (int ox = 0; ox < out_w; ++ox)
        for (int c = 0; c < channels; ++c) {
          float m = -std::numeric_limits<float>::infinity();
          for (int dy = 0; dy < 2; ++dy)
            for (int dx = 0; dx < 2; ++dx)
              m = max_keep_nan(m, x[((std::ptrdiff_t(n) * height + 2 * oy + dy) * width + 2 * ox + dx) * channels + c]);
          y[((std::ptrdiff_t(n) * out_h + oy) * out_w + ox) * channels + c] = m;
        }
}

void global_pool(const float* x, int images, int height, int width, int channels, GlobalPoolMode mode,
                 float* y) {
  for (int n = 0; n < images; ++n)
    for (int c = 0; c < channels; ++c) {
      double sum = 0.0;
      float m = -std::numeric_limits<float>::infinity();
      for (int p = 0; p < height * width; ++p) {
        const float v = x[(std::ptrdiff_t(n) * height * width + p) * channels + c];
        sum += v;
        m = max_keep_nan(m, v);
      }
      y[std::ptrdiff_t(n) * channels + c] = mode == GlobalPoolMode::Max ? m : float(sum / (height * width));
    }
}

}  // namespace reference
#endif

}  // namespace fastvgg
