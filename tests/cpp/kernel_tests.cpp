// The generic kernels, the weight packing and the reference kernels, tested from C++ alone.
//
// Built by tests/test_cross_aarch64.py twice: natively, and with Debian's aarch64 cross
// compiler to run under qemu-aarch64, so the plain C++ kernels are checked on an ISA with no
// AVX code at all (and with a compiler free to contract a*b+c into one fused instruction).
// No Python, no pybind11: only csrc/ and the standard library.
//
// Tolerances come from the arithmetic (Higham, Accuracy and Stability of Numerical Algorithms,
// 3.1): a float32 sum of K products, in any order, is within gamma_K * sum|x_i w_i| of the exact
// value, gamma_K = K u / (1 - K u), u = 2^-24. The Winograd bound follows the transforms as
// tests/test_winograd.py explains: gamma_{K+24} times the computation on absolute values.
// A layout or indexing bug gives errors of the size of the values, far above either bound.
//
// Prints one line per failure and "N passed, M failed"; the exit status is 1 if any failed.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels.h"
#include "tensor.h"
#include "workspace.h"

using namespace fastvgg;

namespace {

constexpr double kUnitRoundoff = 5.9604644775390625e-08;  // 2^-24
double gamma(int k) { return k * kUnitRoundoff / (1 - k * kUnitRoundoff); }

int g_passed = 0, g_failed = 0;

void record(bool ok, const std::string& what) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAILED: %s\n", what.c_str());
  }
}

std::mt19937_64 g_rng(20261129);

std::vector<float> random_values(std::size_t count, double scale = 1.0) {
  std::normal_distribution<double> normal(0.0, scale);
  std::vector<float> values(count);
  for (float& v : values) v = float(normal(g_rng));
  return values;
}

int random_int(int low, int high) { return std::uniform_int_distribution<int>(low, high)(g_rng); }

// Worst (error - bound) over the elements; the check passes when no element exceeds its bound.
struct Comparison {
  bool ok = true;
  std::size_t worst = 0;
  double error = 0, bound = 0;
};

Comparison compare(const std::vector<float>& actual, const std::vector<double>& exact, const std::vector<double>& bound) {
  Comparison c;
  double worst_excess = -std::numeric_limits<double>::infinity();
  for (std::size_t i = 0; i < actual.size(); ++i) {
    const double error = std::fabs(double(actual[i]) - exact[i]);
    const double excess = std::isnan(error) ? std::numeric_limits<double>::infinity() : error - bound[i];
    if (excess > worst_excess) {
      worst_excess = excess;
      c.worst = i;
      c.error = error;
      c.bound = bound[i];
    }
  }
  c.ok = worst_excess <= 0;
  return c;
}

std::string describe(const char* what, const std::string& shape, const Comparison& c) {
  char line[400];
  std::snprintf(line, sizeof line, "%s %s: error %.3g vs bound %.3g at element %zu", what, shape.c_str(), c.error,
                c.bound, c.worst);
  return line;
}

std::string shape_name(int n, int h, int w, int cin, int cout, bool relu) {
  char s[120];
  std::snprintf(s, sizeof s, "n=%d h=%d w=%d cin=%d cout=%d relu=%d", n, h, w, cin, cout, int(relu));
  return s;
}

// ---- The API of csrc/ this driver uses, in one place (a kernel-set refactor edits only this).

const KernelTable& generic_table() { return generic::kernel_table; }

std::size_t floats_for(std::size_t bytes) { return (bytes + sizeof(float) - 1) / sizeof(float); }

// Runs conv3x3 (direct or Winograd) of one table on NHWC images through the blocked layout,
// packed by the method's own packer.
std::vector<float> run_conv(const KernelTable& table, bool winograd, const std::vector<float>& x, int n, int h, int w,
                            int cin, const std::vector<float>& kernel, const std::vector<float>& bias, int cout,
                            bool relu, int threads) {
  const Conv3x3Method& method = winograd ? table.conv3x3_winograd : table.conv3x3_direct;
  AlignedBuffer packed(floats_for(method.packed_bytes(cin, cout)));
  method.pack(kernel.data(), cin, cout, packed.data(), threads);
  KernelScratch scratch;
  AlignedBuffer padded_bias(std::size_t(round_up_to_block(cout)));
  std::copy(bias.begin(), bias.end(), padded_bias.data());
  AlignedBuffer in_buffer(blocked_image_size(cin, h, w)), out_buffer(blocked_image_size(cout, h, w));
  const BlockedImage in{in_buffer.data(), cin, h, w}, out{out_buffer.data(), cout, h, w};
  std::vector<float> y(std::size_t(n) * h * w * cout);
  for (int i = 0; i < n; ++i) {
    table.nhwc_to_blocked(x.data() + std::size_t(i) * h * w * cin, in);
    method.run(in, packed.data(), padded_bias.data(), relu, out, threads, scratch);
    table.blocked_to_nhwc(out, y.data() + std::size_t(i) * h * w * cout);
  }
  return y;
}

std::vector<float> run_dense(const KernelTable& table, const std::vector<float>& x, int rows, int depth,
                             const std::vector<float>& kernel, const std::vector<float>& bias, int cols, bool relu,
                             int threads) {
  // Packed in uneven pieces, as a loader streaming rows from a file does.
  AlignedBuffer packed(floats_for(table.dense.packed_bytes(depth, cols)));
  for (int first = 0; first < depth;) {
    const int count = std::min(depth - first, random_int(1, 40));
    table.dense.pack_rows(kernel.data() + std::size_t(first) * cols, first, count, depth, cols, packed.data(), threads);
    first += count;
  }
  AlignedBuffer padded_bias(std::size_t(round_up_to_block(cols)));
  std::copy(bias.begin(), bias.end(), padded_bias.data());
  const int stride = round_up_to_block(cols);
  AlignedBuffer out(std::size_t(rows) * stride);
  table.dense.run(x.data(), rows, depth, depth, packed.data(), padded_bias.data(), cols, relu, out.data(), stride, threads);
  std::vector<float> y(std::size_t(rows) * cols);
  for (int r = 0; r < rows; ++r) std::copy_n(out.data() + std::size_t(r) * stride, cols, y.data() + std::size_t(r) * cols);
  // The padding columns must come out as exact zeros (zero weights, zero bias).
  bool padding_zero = true;
  for (int r = 0; r < rows; ++r)
    for (int c = cols; c < stride; ++c) padding_zero = padding_zero && out.data()[std::size_t(r) * stride + c] == 0.0f;
  record(padding_zero, "dense padding columns are zero, rows=" + std::to_string(rows) + " cols=" + std::to_string(cols));
  return y;
}

// ---- Exact (double) results and the magnitudes the bounds scale with.

void conv_exact(const std::vector<float>& x, int n, int h, int w, int cin, const std::vector<float>& kernel,
                const std::vector<float>& bias, int cout, bool relu, std::vector<double>& exact,
                std::vector<double>& magnitude) {
  exact.assign(std::size_t(n) * h * w * cout, 0.0);
  magnitude.assign(exact.size(), 0.0);
  for (int i = 0; i < n; ++i)
    for (int y = 0; y < h; ++y)
      for (int xx = 0; xx < w; ++xx)
        for (int oc = 0; oc < cout; ++oc) {
          double sum = bias[oc], abs_sum = std::fabs(bias[oc]);
          for (int kh = 0; kh < 3; ++kh)
            for (int kw = 0; kw < 3; ++kw) {
              const int iy = y + kh - 1, ix = xx + kw - 1;
              if (iy < 0 || iy >= h || ix < 0 || ix >= w) continue;
              for (int ic = 0; ic < cin; ++ic) {
                const double p = double(x[((std::size_t(i) * h + iy) * w + ix) * cin + ic]) *
                                 kernel[((std::size_t(kh) * 3 + kw) * cin + ic) * cout + oc];
                sum += p;
                abs_sum += std::fabs(p);
              }
            }
          const std::size_t at = ((std::size_t(i) * h + y) * w + xx) * cout + oc;
          exact[at] = relu ? std::max(sum, 0.0) : sum;  // ReLU is 1-Lipschitz: the bound still holds
          magnitude[at] = abs_sum;
        }
}

// |A^T| (sum_ic (|G| |g| |G^T|) (.) (|B^T| |d| |B|)) |A| + |bias|: the Winograd computation on
// absolute values, per output (tests/test_winograd.py derives the bound from it).
std::vector<double> winograd_magnitude(const std::vector<float>& x, int n, int h, int w, int cin,
                                       const std::vector<float>& kernel, const std::vector<float>& bias, int cout) {
  static const double BT[6][6] = {{4, 0, -5, 0, 1, 0},  {0, -4, -4, 1, 1, 0}, {0, 4, -4, -1, 1, 0},
                                  {0, -2, -1, 2, 1, 0}, {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1}};
  static const double G[6][3] = {{1.0 / 4, 0, 0},          {-1.0 / 6, -1.0 / 6, -1.0 / 6}, {-1.0 / 6, 1.0 / 6, -1.0 / 6},
                                 {1.0 / 24, 1.0 / 12, 1.0 / 6}, {1.0 / 24, -1.0 / 12, 1.0 / 6}, {0, 0, 1}};
  static const double AT[4][6] = {{1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -2, 0}, {0, 1, 1, 4, 4, 0}, {0, 1, -1, 8, -8, 1}};
  // |U| per (ic, oc): 36 values.
  std::vector<double> u(std::size_t(cin) * cout * 36);
  for (int ic = 0; ic < cin; ++ic)
    for (int oc = 0; oc < cout; ++oc)
      for (int a = 0; a < 6; ++a)
        for (int b = 0; b < 6; ++b) {
          double s = 0;
          for (int kh = 0; kh < 3; ++kh)
            for (int kw = 0; kw < 3; ++kw)
              s += std::fabs(G[a][kh]) * std::fabs(kernel[((std::size_t(kh) * 3 + kw) * cin + ic) * cout + oc]) *
                   std::fabs(G[b][kw]);
          u[(std::size_t(ic) * cout + oc) * 36 + a * 6 + b] = s;
        }
  std::vector<double> result(std::size_t(n) * h * w * cout);
  const int tiles_y = (h + 3) / 4, tiles_x = (w + 3) / 4;
  std::vector<double> v(std::size_t(cin) * 36), m(std::size_t(cout) * 36);
  for (int i = 0; i < n; ++i)
    for (int ty = 0; ty < tiles_y; ++ty)
      for (int tx = 0; tx < tiles_x; ++tx) {
        for (int ic = 0; ic < cin; ++ic) {
          double d[6][6];
          for (int r = 0; r < 6; ++r)
            for (int c = 0; c < 6; ++c) {
              const int iy = ty * 4 + r - 1, ix = tx * 4 + c - 1;
              d[r][c] = iy < 0 || iy >= h || ix < 0 || ix >= w ? 0.0 : std::fabs(x[((std::size_t(i) * h + iy) * w + ix) * cin + ic]);
            }
          for (int a = 0; a < 6; ++a)
            for (int b = 0; b < 6; ++b) {
              double s = 0;
              for (int r = 0; r < 6; ++r)
                for (int c = 0; c < 6; ++c) s += std::fabs(BT[a][r]) * d[r][c] * std::fabs(BT[b][c]);
              v[std::size_t(ic) * 36 + a * 6 + b] = s;
            }
        }
        std::fill(m.begin(), m.end(), 0.0);
        for (int ic = 0; ic < cin; ++ic)
          for (int oc = 0; oc < cout; ++oc)
            for (int xi = 0; xi < 36; ++xi) m[std::size_t(oc) * 36 + xi] += v[std::size_t(ic) * 36 + xi] * u[(std::size_t(ic) * cout + oc) * 36 + xi];
        for (int oc = 0; oc < cout; ++oc)
          for (int p = 0; p < 4; ++p)
            for (int q = 0; q < 4; ++q) {
              const int y = ty * 4 + p, xx = tx * 4 + q;
              if (y >= h || xx >= w) continue;
              double s = std::fabs(bias[oc]);
              for (int a = 0; a < 6; ++a)
                for (int b = 0; b < 6; ++b) s += std::fabs(AT[p][a]) * m[std::size_t(oc) * 36 + a * 6 + b] * std::fabs(AT[q][b]);
              result[((std::size_t(i) * h + y) * w + xx) * cout + oc] = s;
            }
      }
  return result;
}

std::vector<double> scaled(const std::vector<double>& values, double factor) {
  std::vector<double> r(values.size());
  for (std::size_t i = 0; i < values.size(); ++i) r[i] = values[i] * factor;
  return r;
}

std::vector<double> to_double(const std::vector<float>& values) { return std::vector<double>(values.begin(), values.end()); }

// ---- The checks.

void check_conv(int n, int h, int w, int cin, int cout, bool relu, int threads) {
  const auto x = random_values(std::size_t(n) * h * w * cin);
  const auto kernel = random_values(std::size_t(9) * cin * cout);
  const auto bias = random_values(std::size_t(cout));
  std::vector<double> exact, magnitude;
  conv_exact(x, n, h, w, cin, kernel, bias, cout, relu, exact, magnitude);
  const auto bound = scaled(magnitude, gamma(9 * cin + 1));
  const std::string shape = shape_name(n, h, w, cin, cout, relu) + " threads=" + std::to_string(threads);

  std::vector<float> reference(exact.size());
  reference::conv3x3(x.data(), n, h, w, cin, kernel.data(), bias.data(), cout, relu, reference.data());
  const Comparison r = compare(reference, exact, bound);
  record(r.ok, describe("reference conv3x3 vs exact", shape, r));

  const auto direct = run_conv(generic_table(), false, x, n, h, w, cin, kernel, bias, cout, relu, threads);
  const Comparison d = compare(direct, exact, bound);
  record(d.ok, describe("generic conv3x3 vs exact", shape, d));
  const Comparison dr = compare(direct, to_double(reference), scaled(bound, 2.0));
  record(dr.ok, describe("generic conv3x3 vs reference", shape, dr));

  const auto winograd = run_conv(generic_table(), true, x, n, h, w, cin, kernel, bias, cout, relu, threads);
  const auto winograd_bound = scaled(winograd_magnitude(x, n, h, w, cin, kernel, bias, cout), gamma(cin + 24));
  const Comparison wg = compare(winograd, exact, winograd_bound);
  record(wg.ok, describe("generic conv3x3_winograd vs exact", shape, wg));
}

void check_pool(int n, int h, int w, int c, bool with_nan) {
  auto x = random_values(std::size_t(n) * h * w * c);
  if (with_nan) x[std::size_t(random_int(0, int(x.size()) - 1))] = std::numeric_limits<float>::quiet_NaN();
  const std::string shape = shape_name(n, h, w, c, c, false) + (with_nan ? " with NaN" : "");
  const int oh = h / 2, ow = w / 2;
  std::vector<float> reference(std::size_t(n) * oh * ow * c), fast(reference.size());
  reference::max_pool2x2(x.data(), n, h, w, c, reference.data());
  AlignedBuffer in_buffer(blocked_image_size(c, h, w)), out_buffer(blocked_image_size(c, oh, ow));
  const BlockedImage in{in_buffer.data(), c, h, w}, out{out_buffer.data(), c, oh, ow};
  std::vector<float> global_max(std::size_t(n) * c), global_avg(global_max.size());
  for (int i = 0; i < n; ++i) {
    generic_table().nhwc_to_blocked(x.data() + std::size_t(i) * h * w * c, in);
    generic_table().max_pool2x2(in, out, 3);
    generic_table().blocked_to_nhwc(out, fast.data() + std::size_t(i) * oh * ow * c);
    generic_table().global_pool(in, GlobalPoolMode::Max, global_max.data() + std::size_t(i) * c);
    generic_table().global_pool(in, GlobalPoolMode::Average, global_avg.data() + std::size_t(i) * c);
  }
  // A max is exact: bit-equal to the reference, NaN where the window holds one.
  bool same = true;
  for (std::size_t i = 0; i < fast.size(); ++i)
    same = same && (std::memcmp(&fast[i], &reference[i], sizeof(float)) == 0 || (std::isnan(fast[i]) && std::isnan(reference[i])));
  record(same, "generic max_pool2x2 equals reference, " + shape);

  std::vector<float> reference_max(global_max.size()), reference_avg(global_max.size());
  reference::global_pool(x.data(), n, h, w, c, GlobalPoolMode::Max, reference_max.data());
  reference::global_pool(x.data(), n, h, w, c, GlobalPoolMode::Average, reference_avg.data());
  same = true;
  for (std::size_t i = 0; i < global_max.size(); ++i)
    same = same && (global_max[i] == reference_max[i] || (std::isnan(global_max[i]) && std::isnan(reference_max[i])));
  record(same, "generic global max pool equals reference, " + shape);
  if (with_nan) return;
  // Average: a float sum of H*W values (H*W - 1 roundings), times 1/(H*W) rounded, one more
  // rounding: gamma_{HW+1} * mean|x| from the exact mean. The reference sums in double.
  std::vector<double> exact(global_avg.size()), bound(global_avg.size());
  for (int i = 0; i < n; ++i)
    for (int ch = 0; ch < c; ++ch) {
      double sum = 0, abs_sum = 0;
      for (int p = 0; p < h * w; ++p) {
        sum += x[(std::size_t(i) * h * w + p) * c + ch];
        abs_sum += std::fabs(x[(std::size_t(i) * h * w + p) * c + ch]);
      }
      exact[std::size_t(i) * c + ch] = sum / (h * w);
      bound[std::size_t(i) * c + ch] = gamma(h * w + 1) * abs_sum / (h * w);
    }
  const Comparison avg = compare(global_avg, exact, bound);
  record(avg.ok, describe("generic global average pool vs exact", shape, avg));
  std::vector<double> reference_bound(bound.size());
  for (std::size_t i = 0; i < bound.size(); ++i) reference_bound[i] = kUnitRoundoff * std::fabs(exact[i]) + 1e-300;
  const Comparison ravg = compare(reference_avg, exact, reference_bound);
  record(ravg.ok, describe("reference global average pool vs exact", shape, ravg));
}

void check_dense(int rows, int depth, int cols, bool relu, int threads) {
  const auto x = random_values(std::size_t(rows) * depth);
  const auto kernel = random_values(std::size_t(depth) * cols);
  const auto bias = random_values(std::size_t(cols));
  const std::string shape = "rows=" + std::to_string(rows) + " depth=" + std::to_string(depth) +
                            " cols=" + std::to_string(cols) + " relu=" + std::to_string(int(relu));
  std::vector<double> exact(std::size_t(rows) * cols), bound(exact.size());
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) {
      double sum = bias[c], abs_sum = std::fabs(bias[c]);
      for (int k = 0; k < depth; ++k) {
        const double p = double(x[std::size_t(r) * depth + k]) * kernel[std::size_t(k) * cols + c];
        sum += p;
        abs_sum += std::fabs(p);
      }
      exact[std::size_t(r) * cols + c] = relu ? std::max(sum, 0.0) : sum;
      bound[std::size_t(r) * cols + c] = gamma(depth + 1) * abs_sum;
    }
  std::vector<float> reference(exact.size());
  reference::dense(x.data(), rows, depth, kernel.data(), bias.data(), cols, relu, reference.data());
  const Comparison r = compare(reference, exact, bound);
  record(r.ok, describe("reference dense vs exact", shape, r));
  const auto fast = run_dense(generic_table(), x, rows, depth, kernel, bias, cols, relu, threads);
  const Comparison f = compare(fast, exact, bound);
  record(f.ok, describe("generic dense vs exact", shape, f));
}

// Packing round trips: direct and dense layouts are permutations (bit-exact back); Winograd's
// inverse is exact up to U's rounding, and the correction bytes make it bit-exact.
void check_packing(int cin, int cout) {
  const std::string shape = "cin=" + std::to_string(cin) + " cout=" + std::to_string(cout);
  const auto kernel = random_values(std::size_t(9) * cin * cout, 0.05);
  std::vector<float> back(kernel.size());

  AlignedBuffer direct(packed_conv3x3_size(cin, cout));
  pack_conv3x3(kernel.data(), cin, cout, direct.data(), 2);
  unpack_conv3x3(direct.data(), cin, cout, back.data(), 2);
  record(std::memcmp(back.data(), kernel.data(), kernel.size() * sizeof(float)) == 0, "conv3x3 pack/unpack is exact, " + shape);

  AlignedBuffer winograd(packed_winograd_size(cin, cout));
  pack_winograd_f4x4(kernel.data(), cin, cout, winograd.data(), 2);
  unpack_winograd_f4x4(winograd.data(), cin, cout, back.data(), 2);
  // Each of the 36 U values is rounded once (relative error <= u); the inverse combines at
  // most 4 x 4 of them with |coefficients| <= 4 * 3 in double and rounds once: the recovered
  // weight is within 144 u max|U| + u |g| of the original.
  bool close = true;
  for (int ic = 0; ic < cin; ++ic)
    for (int oc = 0; oc < cout; ++oc) {
      // |U| <= max|g| (sum of a row of |G|)^2 <= max|g|: every row of |G| sums to at most 1.
      double largest_u = 0;
      for (int kh = 0; kh < 3; ++kh)
        for (int kw = 0; kw < 3; ++kw) largest_u = std::max(largest_u, double(std::fabs(kernel[((std::size_t(kh) * 3 + kw) * cin + ic) * cout + oc])));
      for (int t = 0; t < 9; ++t) {
        const std::size_t at = (std::size_t(t) * cin + ic) * cout + oc;
        close = close && std::fabs(double(back[at]) - kernel[at]) <= 144 * kUnitRoundoff * largest_u + kUnitRoundoff * std::fabs(kernel[at]);
      }
    }
  record(close, "winograd unpack recovers the kernel within the rounding of U, " + shape);
  const KernelCorrection correction = correction_to(kernel.data(), back.data(), back.size(), 2);
  apply_correction(correction, back.data(), back.size(), 2);
  record(std::memcmp(back.data(), kernel.data(), kernel.size() * sizeof(float)) == 0, "correction restores the kernel bit for bit, " + shape);

  const int depth = 9 * cin, cols = cout;
  AlignedBuffer dense(packed_dense_size(depth, cols));
  pack_dense_rows(kernel.data(), 0, depth, depth, cols, dense.data(), 2);
  unpack_dense(dense.data(), depth, cols, back.data(), 2);
  record(std::memcmp(back.data(), kernel.data(), kernel.size() * sizeof(float)) == 0, "dense pack/unpack is exact, " + shape);
}

void check_layout(int h, int w, int c) {
  const auto x = random_values(std::size_t(h) * w * c);
  AlignedBuffer buffer(blocked_image_size(c, h, w));
  const BlockedImage image{buffer.data(), c, h, w};
  // Garbage first: the conversion must clear the border and the padding channels itself.
  std::fill(buffer.data(), buffer.data() + buffer.size(), 7.0f);
  generic_table().nhwc_to_blocked(x.data(), image);
  std::vector<float> back(x.size());
  generic_table().blocked_to_nhwc(image, back.data());
  record(back == x, "layout round trip, h=" + std::to_string(h) + " w=" + std::to_string(w) + " c=" + std::to_string(c));
  bool border_zero = true;
  for (int b = 0; b < image.blocks(); ++b)
    for (int y = -1; y <= h; ++y)
      for (int xx = -1; xx <= w; ++xx) {
        const bool border = y < 0 || y >= h || xx < 0 || xx >= w;
        for (int lane = 0; lane < kChannelBlock; ++lane)
          if (border || b * kChannelBlock + lane >= c) border_zero = border_zero && image.at(b, y, xx)[lane] == 0.0f;
      }
  record(border_zero, "layout border and padding channels are zero, c=" + std::to_string(c));
}

}  // namespace

int main() {
  // Register tiles are 4 pixels and 1 block in the generic build (14/2 on AVX-512, 6/1 on
  // AVX2); Winograd tiles are 4x4. The shapes straddle every one of those and the 16-channel block.
  const int conv_shapes[][5] = {
      {1, 7, 13, 3, 5}, {2, 13, 7, 17, 33}, {1, 1, 1, 16, 16}, {1, 2, 15, 15, 31}, {1, 6, 9, 32, 48},
      {1, 5, 28, 1, 1}, {3, 4, 14, 16, 32}, {1, 5, 3, 64, 17}, {1, 9, 6, 33, 65},
  };
  for (const auto& s : conv_shapes)
    for (bool relu : {false, true}) check_conv(s[0], s[1], s[2], s[3], s[4], relu, relu ? 3 : 1);
  for (int i = 0; i < 6; ++i)
    check_conv(random_int(1, 2), random_int(1, 11), random_int(1, 17), random_int(1, 40), random_int(1, 40),
               random_int(0, 1) == 1, random_int(1, 3));

  const int pool_shapes[][4] = {{1, 7, 13, 3}, {3, 13, 7, 17}, {2, 2, 2, 16}, {1, 3, 2, 5}, {1, 1, 5, 4}, {1, 17, 9, 33}};
  for (const auto& s : pool_shapes)
    for (bool with_nan : {false, true}) check_pool(s[0], s[1], s[2], s[3], with_nan);

  const int dense_shapes[][3] = {{1, 1, 1}, {1, 37, 10}, {5, 64, 33}, {7, 513, 17}, {2, 1100, 48}, {13, 20, 100}};
  for (const auto& s : dense_shapes)
    for (bool relu : {false, true}) check_dense(s[0], s[1], s[2], relu, relu ? 3 : 1);

  for (const auto& pair : {std::pair<int, int>{3, 64}, {17, 5}, {16, 16}, {40, 33}}) check_packing(pair.first, pair.second);
  const int layout_shapes[][3] = {{1, 1, 1}, {5, 7, 3}, {4, 4, 16}, {3, 9, 37}};
  for (const auto& s : layout_shapes) check_layout(s[0], s[1], s[2]);

  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
