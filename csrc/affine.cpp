// Per-channel affine maps, y = x * scale[c] + shift[c]: BatchNormalization at inference (that
// is not folded into the layer before it), Rescaling and Normalization.
//
// One fused multiply-add per value; in place, because the map is the last thing done to an
// activation before the next layer reads it.
#include <cmath>  // the per-ISA code calls the C library's float functions (expf, fmaf, ...), not
                  // <cmath>'s inline std:: overloads: those are weak symbols that an AVX object
                  // would share by name with every ISA (tests/test_isa_symbols.py)

#include "ops.h"
#include "simd.h"

namespace fastvgg {
namespace FASTVGG_ISA {

void affine_blocked(const BlockedImage& image, const float* scale, const float* shift, int threads) {
  const int items = image.blocks() * image.height;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int item = 0; item < items; ++item) {
    const int b = item / image.height, y = item % image.height;
    // Padding channels have scale 0 and shift 0, so they stay 0.
    const Vec16 s = load(scale + b * kChannelBlock), t = load(shift + b * kChannelBlock);
    float* row = image.at(b, y, 0);
    for (int x = 0; x < image.width; ++x) store(row + x * kChannelBlock, fmadd(load(row + x * kChannelBlock), s, t));
  }
}

void affine_rows(float* rows, int count, int cols, const float* scale, const float* shift) {
  for (int r = 0; r < count; ++r) {
    float* row = rows + std::ptrdiff_t(r) * cols;
    int c = 0;
    for (; c + kChannelBlock <= cols; c += kChannelBlock)
      store(row + c, fmadd(load(row + c), load(scale + c), load(shift + c)));
    for (; c < cols; ++c) row[c] = fmaf(row[c], scale[c], shift[c]);
  }
}

}  // namespace FASTVGG_ISA

#if FASTVGG_ISA_IS_GENERIC
namespace reference {

void affine(const float* x, std::size_t pixels, int channels, const float* scale, const float* shift, float* y) {
  for (std::size_t p = 0; p < pixels; ++p)
    for (int c = 0; c < channels; ++c)
      y[p * std::size_t(channels) + std::size_t(c)] =
          float(double(x[p * std::size_t(channels) + std::size_t(c)]) * double(scale[c]) + double(shift[c]));
}

}  // namespace reference
#endif

}  // namespace fastvgg
