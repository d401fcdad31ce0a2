// Keras's PReLU: x < 0 ? alpha * x : x, with a learned alpha per channel (shared_axes over the
// image's rows and columns, or a flat row's one per feature) or per pixel and channel.
//
// Keras computes relu(x) - alpha * relu(-x) in float32: for x < 0 that is 0 + (-alpha) * (-x),
// one rounded product, the same float as alpha * x; for x >= 0 it adds a zero. So one select of
// one product gives Keras's bits. In place, like the affine maps; NaN stays NaN.
#include <algorithm>

#include "ops.h"
#include "simd.h"

namespace fastvgg {
namespace FASTVGG_ISA {
namespace {

// values[i] < 0 ? alphas[i] * values[i] : values[i] over `count` floats; the compiler turns the
// select into a vector blend.
inline void prelu_span(float* values, const float* alphas, std::size_t count) {
  for (std::size_t i = 0; i < count; ++i) {
    const float v = values[i];
    values[i] = v < 0.0f ? alphas[i] * v : v;
  }
}

}  // namespace

void prelu_blocked(const BlockedImage& image, const float* alphas, int alpha_height, int alpha_width, int threads) {
  const int items = image.blocks() * image.height;
  // alphas is blocked as [blocks][alpha_height][alpha_width][16]; an extent of 1 is shared.
  const std::ptrdiff_t pixel_step = alpha_width == 1 ? 0 : kChannelBlock;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int item = 0; item < items; ++item) {
    const int b = item / image.height, y = item % image.height;
    const float* alpha_row =
        alphas + ((std::ptrdiff_t(b) * alpha_height + (alpha_height == 1 ? 0 : y)) * alpha_width) * kChannelBlock;
    float* row = image.at(b, y, 0);
    // Padding channels have alpha 0 and value 0: they stay 0.
    for (int x = 0; x < image.width; ++x) prelu_span(row + x * kChannelBlock, alpha_row + x * pixel_step, kChannelBlock);
  }
}

void prelu_rows(float* rows, int count, int cols, std::ptrdiff_t stride, const float* alphas) {
  for (int r = 0; r < count; ++r) prelu_span(rows + r * stride, alphas, std::size_t(cols));
}

}  // namespace FASTVGG_ISA

#if FASTVGG_ISA_IS_GENERIC
std::size_t prelu_packed_floats(int alpha_height, int alpha_width, int channels) {
  return std::size_t(round_up_to_block(channels)) * std::size_t(alpha_height) * std::size_t(alpha_width);
}

namespace {
// Where alpha (y, x, c) lives in the packed layout.
std::size_t packed_index(int y, int x, int c, int alpha_height, int alpha_width) {
  return ((std::size_t(c / kChannelBlock) * alpha_height + y) * alpha_width + x) * kChannelBlock + c % kChannelBlock;
}
}  // namespace

void pack_prelu_alpha(const float* alpha, int alpha_height, int alpha_width, int channels, float* packed) {
  std::fill(packed, packed + prelu_packed_floats(alpha_height, alpha_width, channels), 0.0f);
  for (int y = 0; y < alpha_height; ++y)
    for (int x = 0; x < alpha_width; ++x)
      for (int c = 0; c < channels; ++c)
        packed[packed_index(y, x, c, alpha_height, alpha_width)] = alpha[(std::size_t(y) * alpha_width + x) * channels + c];
}

void unpack_prelu_alpha(const float* packed, int alpha_height, int alpha_width, int channels, float* alpha) {
  for (int y = 0; y < alpha_height; ++y)
    for (int x = 0; x < alpha_width; ++x)
      for (int c = 0; c < channels; ++c)
        alpha[(std::size_t(y) * alpha_width + x) * channels + c] = packed[packed_index(y, x, c, alpha_height, alpha_width)];
}

namespace reference {

void prelu(const float* x, int images, int height, int width, int channels, const float* alpha, int alpha_height,
           int alpha_width, float* y) {
  for (int n = 0; n < images; ++n)
    for (int i = 0; i < height; ++i)
      for (int j = 0; j < width; ++j)
        for (int c = 0; c < channels; ++c) {
          const std::size_t at = ((std::size_t(n) * height + i) * width + j) * channels + c;
          const int ai = alpha_height == 1 ? 0 : i, aj = alpha_width == 1 ? 0 : j;
          const double a = alpha[(std::size_t(ai) * alpha_width + aj) * channels + c], v = x[at];
          // Keras's relu(x) - alpha * relu(-x), in double, rounded once.
          y[at] = float(std::max(v, 0.0) - a * std::max(-v, 0.0));  // std::max(NaN, 0.0) is NaN
        }
}

}  // namespace reference
#endif

}  // namespace fastvgg
