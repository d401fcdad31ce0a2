// Plain twins of the bf16 kernels: NHWC arrays and Keras layouts, every input and weight
// rounded by round_to_bf16 (the rule vcvtneps2bf16 applies), products summed in double.
// The fast kernels sum the same exact products (a product of two bf16 values fits an fp32
// significand) in fp32, so the two differ only by the fp32 accumulation error.
#include <algorithm>
#include <cmath>
#include <cstdint>
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

// Each value's hi and lo parts (split_to_bf16), as floats.
struct SplitValues {
  std::vector<float> hi, lo;
  SplitValues(const float* values, std::size_t count) : hi(count), lo(count) {
    for (std::size_t i = 0; i < count; ++i) {
      const Bf16Pair parts = split_to_bf16(values[i]);
      hi[i] = bf16_to_float(parts.hi);
      lo[i] = bf16_to_float(parts.lo);
    }
  }
};

// x as hi + lo (two bf16 values), summed in double: exact.
std::vector<double> split_copy(const float* values, std::size_t count) {
  const SplitValues split(values, count);
  std::vector<double> out(count);
  for (std::size_t i = 0; i < count; ++i) out[i] = double(split.hi[i]) + double(split.lo[i]);
  return out;
}

// bias + sum over taps and channels of product(x index, kernel index), in double, rounded to
// float once (then ReLU): the shared walk of every twin below.
template <typename Product>
void conv3x3_sum(int images, int height, int width, int in_channels, const float* bias, int out_channels, bool relu,
                 float* y, Product product) {
  for (int n = 0; n < images; ++n) {
    const std::ptrdiff_t image = std::ptrdiff_t(n) * height * width * in_channels;
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
              const std::ptrdiff_t src = image + (std::ptrdiff_t(iy) * width + ix) * in_channels;
              const std::ptrdiff_t w = (std::ptrdiff_t(kh * 3 + kw) * in_channels) * out_channels + oc;
              for (int ic = 0; ic < in_channels; ++ic) sum += product(src + ic, w + std::ptrdiff_t(ic) * out_channels);
            }
          }
          const float value = float(sum);
          result[(std::ptrdiff_t(oy) * width + ox) * out_channels + oc] = relu ? std::max(value, 0.0f) : value;
        }
  }
}

template <typename Input>
void conv3x3_rounded(const std::vector<Input>& xr, int images, int height, int width, int in_channels,
                     const std::vector<float>& kr, const float* bias, int out_channels, bool relu, float* y) {
  conv3x3_sum(images, height, width, in_channels, bias, out_channels, relu, y,
              [&](std::ptrdiff_t i, std::ptrdiff_t k) { return double(xr[std::size_t(i)]) * double(kr[std::size_t(k)]); });
}

}  // namespace

void conv3x3_bf16(const float* x, int images, int height, int width, int in_channels, const float* kernel_hwio,
                  const float* bias, int out_channels, bool relu, float* y) {
  conv3x3_rounded(rounded_copy(x, std::size_t(images) * height * width * in_channels), images, height, width,
                  in_channels, rounded_copy(kernel_hwio, std::size_t(9) * in_channels * out_channels), bias,
                  out_channels, relu, y);
}

void conv3x3_bf16_split(const float* x, int images, int height, int width, int in_channels,
                        const float* kernel_hwio, const float* bias, int out_channels, bool relu, float* y) {
  conv3x3_rounded(split_copy(x, std::size_t(images) * height * width * in_channels), images, height, width,
                  in_channels, rounded_copy(kernel_hwio, std::size_t(9) * in_channels * out_channels), bias,
                  out_channels, relu, y);
}

void conv3x3_bf16x3(const float* x, int images, int height, int width, int in_channels, const float* kernel_hwio,
                    const float* bias, int out_channels, bool relu, float* y) {
  const SplitValues xs(x, std::size_t(images) * height * width * in_channels);
  const SplitValues ks(kernel_hwio, std::size_t(9) * in_channels * out_channels);
  conv3x3_sum(images, height, width, in_channels, bias, out_channels, relu, y, [&](std::ptrdiff_t i, std::ptrdiff_t k) {
    const std::size_t xi = std::size_t(i), ki = std::size_t(k);
    return double(xs.hi[xi]) * ks.hi[ki] + double(xs.lo[xi]) * ks.hi[ki] + double(xs.hi[xi]) * ks.lo[ki];
  });
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

namespace {
// B^T and A^T of F(4x4, 3x3) for the points 0, -1, 1, -2, 2, infinity.
const double kBT[6][6] = {{4, 0, -5, 0, 1, 0},  {0, -4, -4, 1, 1, 0}, {0, 4, -4, -1, 1, 0},
                          {0, -2, -1, 2, 1, 0}, {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1}};
const double kAT[4][6] = {{1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -2, 0}, {0, 1, 1, 4, 4, 0}, {0, 1, -1, 8, -8, 1}};
// Along an axis where an image's last tile has at most 2 output pixels, that tile runs F(2, 3)
// on F(4)'s points 0, -1, 1, infinity (winograd_f4x4.h): diag(4, -3, -3, 1) B2^T into those
// points' places, A2^T from them; the other rows are zero.
const double kBTEdge[6][6] = {{4, 0, -4, 0, 0, 0}, {0, -3, -3, 0, 0, 0}, {0, 3, -3, 0, 0, 0},
                              {0, 0, 0, 0, 0, 0},  {0, 0, 0, 0, 0, 0},   {0, 1, 0, -1, 0, 0}};
const double kATEdge[4][6] = {{1, 1, 1, 0, 0, 0}, {0, 1, -1, 0, 0, -1}, {0, 0, 0, 0, 0, 0}, {0, 0, 0, 0, 0, 0}};
bool last_tile_is_edge(int size) { return size % 4 == 1 || size % 4 == 2; }

// q = round_half_even(value * max / largest) and the step largest / max, for one row.
void quantise_row(const double* row, int count, std::int64_t* q, double* step) {
  double largest = 0.0;
  bool finite = true;
  for (int i = 0; i < count; ++i) {
    finite = finite && std::isfinite(row[i]);
    largest = std::max(largest, std::fabs(row[i]));
  }
  if (!finite) {
    std::fill(q, q + count, 0);
    *step = std::nan("");
    return;
  }
  const double scale = largest > 0.0 ? kWinogradInt14Max / largest : 0.0;
  for (int i = 0; i < count; ++i) q[i] = std::int64_t(std::nearbyint(row[i] * scale));
  *step = largest / kWinogradInt14Max;
}
}  // namespace

void conv3x3_winograd_int14(const float* x, int images, int height, int width, int in_channels,
                            const float* kernel_hwio, const float* bias, int out_channels, bool relu, float* y) {
  const int padded_in = round_up_to_block(in_channels);
  // U[xi][oc][ic] quantised per (xi, oc).
  std::vector<std::int64_t> uq(std::size_t(36) * out_channels * in_channels);
  std::vector<double> u_step(std::size_t(36) * out_channels), u_row(static_cast<std::size_t>(in_channels));
  for (int xi = 0; xi < 36; ++xi)
    for (int oc = 0; oc < out_channels; ++oc) {
      const int a = xi / 6, b = xi % 6;
      for (int ic = 0; ic < in_channels; ++ic) {
        double sum = 0.0;
        for (int kh = 0; kh < 3; ++kh)
          for (int kw = 0; kw < 3; ++kw)
            sum += kWinogradG[a][kh] * double(kernel_hwio[((std::size_t(kh) * 3 + kw) * in_channels + ic) * out_channels + oc]) *
                   kWinogradG[b][kw];
        u_row[std::size_t(ic)] = sum;
      }
      quantise_row(u_row.data(), in_channels, uq.data() + (std::size_t(xi) * out_channels + oc) * in_channels,
                   &u_step[std::size_t(xi) * out_channels + oc]);
    }
  const int tiles_y = (height + 3) / 4, tiles_x = (width + 3) / 4;
  std::vector<double> d(std::size_t(36) * padded_in), v(std::size_t(36) * padded_in), m(std::size_t(36));
  std::vector<std::int64_t> vq(std::size_t(36) * padded_in);
  std::vector<double> v_step(36);
  for (int n = 0; n < images; ++n) {
    const float* image = x + std::size_t(n) * height * width * in_channels;
    float* result = y + std::size_t(n) * height * width * out_channels;
    for (int ty = 0; ty < tiles_y; ++ty)
      for (int tx = 0; tx < tiles_x; ++tx) {
        const bool short_rows = ty == tiles_y - 1 && last_tile_is_edge(height);
        const bool narrow = tx == tiles_x - 1 && last_tile_is_edge(width);
        const auto& bt_rows = short_rows ? kBTEdge : kBT;
        const auto& bt_columns = narrow ? kBTEdge : kBT;
        const auto& at_rows = short_rows ? kATEdge : kAT;
        const auto& at_columns = narrow ? kATEdge : kAT;
        // d: the 6x6 input tile (zero outside the image and in the padding channels).
        std::fill(d.begin(), d.end(), 0.0);
        for (int i = 0; i < 6; ++i)
          for (int j = 0; j < 6; ++j) {
            const int iy = ty * 4 - 1 + i, ix = tx * 4 - 1 + j;
            if (iy < 0 || iy >= height || ix < 0 || ix >= width) continue;
            for (int c = 0; c < in_channels; ++c)
              d[std::size_t(i * 6 + j) * padded_in + c] = image[(std::size_t(iy) * width + ix) * in_channels + c];
          }
        for (int p = 0; p < 6; ++p)
          for (int q = 0; q < 6; ++q)
            for (int c = 0; c < padded_in; ++c) {
              double sum = 0.0;
              for (int i = 0; i < 6; ++i)
                for (int j = 0; j < 6; ++j) sum += bt_rows[p][i] * d[std::size_t(i * 6 + j) * padded_in + c] * bt_columns[q][j];
              v[std::size_t(p * 6 + q) * padded_in + c] = sum;
            }
        for (int xi = 0; xi < 36; ++xi)
          quantise_row(v.data() + std::size_t(xi) * padded_in, padded_in, vq.data() + std::size_t(xi) * padded_in,
                       &v_step[std::size_t(xi)]);
        for (int oc = 0; oc < out_channels; ++oc) {
          for (int xi = 0; xi < 36; ++xi) {
            std::int64_t sum = 0;
            const std::int64_t* uqr = uq.data() + (std::size_t(xi) * out_channels + oc) * in_channels;
            for (int c = 0; c < in_channels; ++c) sum += vq[std::size_t(xi) * padded_in + c] * uqr[c];
            m[std::size_t(xi)] = double(sum) * v_step[std::size_t(xi)] * u_step[std::size_t(xi) * out_channels + oc];
          }
          for (int r = 0; r < 4; ++r)
            for (int s = 0; s < 4; ++s) {
              const int oy = ty * 4 + r, ox = tx * 4 + s;
              if (oy >= height || ox >= width) continue;
              double sum = bias[oc];
              for (int p = 0; p < 6; ++p)
                for (int q = 0; q < 6; ++q) sum += at_rows[r][p] * m[std::size_t(p * 6 + q)] * at_columns[s][q];
              const float value = float(sum);
              result[(std::size_t(oy) * width + ox) * out_channels + oc] = relu ? std::max(value, 0.0f) : value;
            }
        }
      }
  }
}

}  // namespace reference
}  // namespace fastvgg
