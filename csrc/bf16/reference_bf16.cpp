// Plain twins of the bf16 kernels: NHWC arrays and Keras layouts, every input and weight
// rounded by round_to_bf16 (the rule vcvtneps2bf16 applies), products summed in double.
// The fast kernels sum the same exact products (a product of two bf16 values fits an fp32
// significand) in fp32, so the two differ only by the fp32 accumulation error.
#include <algorithm>
#include <vector>

#include "bf16/kernels_bf16.h"

namespace fastvgg {
namespace reference {

namespace {
std::vector<float> rounded_copy(const float* values, std::size_t count) {
  std::vector<float> out(count);
  for (std::size_t i = 0; i < count; ++i) out[i] = bf16_to_float(round_to_bf16(values[i]));
  return out;
}
}  // namespace

void conv3x3_bf16(const float* x, int images, int height, int width, int in_channels, const float* kernel_hwio,
                  const float* bias, int out_channels, bool relu, float* y) {
  const std::vector<float> xr = rounded_copy(x, std::size_t(images) * height * width * in_channels);
  const std::vector<float> kr = rounded_copy(kernel_hwio, std::size_t(9) * in_channels * out_channels);
  for (int n = 0; n < images; ++n) {
    const float* image = xr.data() + std::ptrdiff_t(n) * height * width * in_channels;
    float* result = y + std::ptrdiff_t(n) * height * width * out_channels;
    for (int oy = 0; oy < height; ++oy)
      for (int ox = 0; ox < width; ++ox)
        for (int oc = 0; oc < out_channels; ++oc) {
          double sum = bias[oc];
          for (int kh = 0; kh < 3; ++kh) {
            const int iy = oy + kh - 1;
            if (iy < 0 || iy >= height) continue;
            for (int kw = 0; kw < 3; ++kw) {
              const int ix = ox + kw - 1;
              if (ix < 0 || ix >= width) continue;
              const float* src = image + (std::ptrdiff_t(iy) * width + ix) * in_channels;
              const float* w = kr.data() + (std::ptrdiff_t(kh * 3 + kw) * in_channels) * out_channels + oc;
              for (int ic = 0; ic < in_channels; ++ic) sum += double(src[ic]) * double(w[std::ptrdiff_t(ic) * out_channels]);
            }
          }
          const float value = float(sum);
          result[(std::ptrdiff_t(oy) * width + ox) * out_channels + oc] = relu ? std::max(value, 0.0f) : value;
        }
  }
}

void dense_bf16(const float* x, int rows, int depth, const float* kernel, const float* bias, int cols, bool relu,
                float* y) {
  const std::vector<float> xr = rounded_copy(x, std::size_t(rows) * depth);
  const std::vector<float> kr = rounded_copy(kernel, std::size_t(depth) * cols);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) {
      double sum = bias[c];
      for (int k = 0; k < depth; ++k) sum += double(xr[std::size_t(r) * depth + k]) * double(kr[std::size_t(k) * cols + c]);
      const float value = float(sum);
      y[std::size_t(r) * cols + c] = relu ? std::max(value, 0.0f) : value;
    }
}

}  // namespace reference
}  // namespace fastvgg
