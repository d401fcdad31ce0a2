// Weight packing for the bf16 kernel set: Keras layouts in, bf16 pairs out (layouts in
// kernels_bf16.h). Each weight is rounded once, here, by round_to_bf16.
#include <algorithm>
#include <cmath>
#include <vector>

#include "bf16/kernels_bf16.h"
#include "hwio_weights.h"

namespace fastvgg {

namespace {
constexpr int kPairs = kChannelBlock / 2;

// Index of weight (kh, kw, ic, oc) in [out/16][in/16][3][3][8 pairs][16 out][2].
std::size_t packed_conv3x3_bf16_index(int in_blocks, int kh, int kw, int ic, int oc) {
  const int ob = oc / kChannelBlock, ib = ic / kChannelBlock, lane_in = ic % kChannelBlock;
  const std::size_t tap = ((std::size_t(ob) * in_blocks + ib) * 3 + kh) * 3 + kw;
  return ((tap * kPairs + lane_in / 2) * kChannelBlock + oc % kChannelBlock) * 2 + lane_in % 2;
}
}  // namespace

std::size_t packed_conv3x3_bf16_size(int in_channels, int out_channels) {
  return std::size_t(channel_blocks(out_channels)) * channel_blocks(in_channels) * 9 * kChannelBlock * kChannelBlock;
}

void pack_conv3x3_bf16(const float* kernel_hwio, int in_channels, int out_channels, std::uint16_t* packed,
                       int threads) {
  std::fill(packed, packed + packed_conv3x3_bf16_size(in_channels, out_channels), std::uint16_t(0));
  const int in_blocks = channel_blocks(in_channels);
  for_each_hwio_weight(in_channels, out_channels, threads, [&](std::size_t i, int kh, int kw, int ic, int oc) {
    packed[packed_conv3x3_bf16_index(in_blocks, kh, kw, ic, oc)] = round_to_bf16(kernel_hwio[i]);
  });
}

void unpack_conv3x3_bf16(const std::uint16_t* packed, int in_channels, int out_channels, float* kernel_hwio,
                         int threads) {
  const int in_blocks = channel_blocks(in_channels);
  for_each_hwio_weight(in_channels, out_channels, threads, [&](std::size_t i, int kh, int kw, int ic, int oc) {
    kernel_hwio[i] = bf16_to_float(packed[packed_conv3x3_bf16_index(in_blocks, kh, kw, ic, oc)]);
  });
}

namespace {
constexpr int kAmxPairBlock = 32;  // input channels of one AMX B tile (16 rows of pairs)

// Up to this many input channels the AMX kernel runs im2col: 9 taps x channels in one K of 32.
constexpr int kAmxIm2colMaxChannels = kAmxPairBlock / 9;

// Index of weight (kh, kw, ic, oc) in [out/16][3][3][in/32][16 pairs][16 out][2], or with
// im2col in [out/16][16 pairs][16 out][2] at k = tap * in_channels + ic.
std::size_t packed_conv3x3_amx_index(int in_channels, int kh, int kw, int ic, int oc) {
  const int ob = oc / kChannelBlock, tap = kh * 3 + kw;
  std::size_t tile;
  int k;
  if (in_channels <= kAmxIm2colMaxChannels) {
    tile = std::size_t(ob);
    k = tap * in_channels + ic;
  } else {
    const int pair_blocks = (in_channels + kAmxPairBlock - 1) / kAmxPairBlock;
    tile = (std::size_t(ob) * 9 + tap) * pair_blocks + ic / kAmxPairBlock;
    k = ic % kAmxPairBlock;
  }
  return ((tile * (kAmxPairBlock / 2) + k / 2) * kChannelBlock + oc % kChannelBlock) * 2 + k % 2;
}
}  // namespace

std::size_t packed_conv3x3_amx_size(int in_channels, int out_channels) {
  const std::size_t tiles_per_out_block =
      in_channels <= kAmxIm2colMaxChannels ? 1 : 9 * std::size_t((in_channels + kAmxPairBlock - 1) / kAmxPairBlock);
  return std::size_t(channel_blocks(out_channels)) * tiles_per_out_block * kAmxPairBlock * kChannelBlock;
}

void pack_conv3x3_amx(const float* kernel_hwio, int in_channels, int out_channels, std::uint16_t* packed,
                      int threads) {
  std::fill(packed, packed + packed_conv3x3_amx_size(in_channels, out_channels), std::uint16_t(0));
  for_each_hwio_weight(in_channels, out_channels, threads, [&](std::size_t i, int kh, int kw, int ic, int oc) {
    packed[packed_conv3x3_amx_index(in_channels, kh, kw, ic, oc)] = round_to_bf16(kernel_hwio[i]);
  });
}

void unpack_conv3x3_amx(const std::uint16_t* packed, int in_channels, int out_channels, float* kernel_hwio,
                        int threads) {
  for_each_hwio_weight(in_channels, out_channels, threads, [&](std::size_t i, int kh, int kw, int ic, int oc) {
    kernel_hwio[i] = bf16_to_float(packed[packed_conv3x3_amx_index(in_channels, kh, kw, ic, oc)]);
  });
}

// The weights as two bf16 values each (split_to_bf16, the rule the AMX kernel splits
// activations by): every hi in the layout above, then every lo in the same layout.
std::size_t packed_conv3x3_amx_x3_size(int in_channels, int out_channels) {
  return 2 * packed_conv3x3_amx_size(in_channels, out_channels);
}

void pack_conv3x3_amx_x3(const float* kernel_hwio, int in_channels, int out_channels, std::uint16_t* packed,
                         int threads) {
  const std::size_t lo_offset = packed_conv3x3_amx_size(in_channels, out_channels);
  std::fill(packed, packed + 2 * lo_offset, std::uint16_t(0));
  for_each_hwio_weight(in_channels, out_channels, threads, [&](std::size_t i, int kh, int kw, int ic, int oc) {
    const std::size_t at = packed_conv3x3_amx_index(in_channels, kh, kw, ic, oc);
    const Bf16Pair parts = split_to_bf16(kernel_hwio[i]);
    packed[at] = parts.hi;
    packed[lo_offset + at] = parts.lo;
  });
}

// hi + lo in fp32: w to within 2^-16 of |w| (and within 2^-24 where the lo part is exact).
void unpack_conv3x3_amx_x3(const std::uint16_t* packed, int in_channels, int out_channels, float* kernel_hwio,
                           int threads) {
  const std::size_t lo_offset = packed_conv3x3_amx_size(in_channels, out_channels);
  for_each_hwio_weight(in_channels, out_channels, threads, [&](std::size_t i, int kh, int kw, int ic, int oc) {
    const std::size_t at = packed_conv3x3_amx_index(in_channels, kh, kw, ic, oc);
    kernel_hwio[i] = bf16_to_float(packed[at]) + bf16_to_float(packed[lo_offset + at]);
  });
}

std::size_t packed_dense_bf16_size(int depth, int cols) {
  return std::size_t(channel_blocks(cols)) * std::size_t((depth + 1) / 2) * 2 * kChannelBlock;
}

void pack_dense_rows_bf16(const float* kernel_rows, int first_row, int row_count, int depth, int cols,
                          std::uint16_t* packed, int threads) {
  const std::size_t panel_stride = std::size_t((depth + 1) / 2) * 2 * kChannelBlock;
  const int panels = channel_blocks(cols);
  // As in the fp32 packing: a group of rows is read once into cache and written panel by panel.
  constexpr int kRowsPerGroup = 32;
  const int groups = (row_count + kRowsPerGroup - 1) / kRowsPerGroup;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int g = 0; g < groups; ++g) {
    const int begin = g * kRowsPerGroup, end = std::min(row_count, begin + kRowsPerGroup);
    for (int p = 0; p < panels; ++p) {
      const int lanes = std::min(kChannelBlock, cols - p * kChannelBlock);
      std::uint16_t* panel = packed + std::size_t(p) * panel_stride;
      for (int r = begin; r < end; ++r) {
        const int row = first_row + r;
        const float* src = kernel_rows + std::size_t(r) * cols + std::size_t(p) * kChannelBlock;
        std::uint16_t* dst = panel + std::size_t(row / 2) * 2 * kChannelBlock + row % 2;
        for (int c = 0; c < lanes; ++c) dst[2 * c] = round_to_bf16(src[c]);
      }
    }
  }
}

void unpack_dense_bf16(const std::uint16_t* packed, int depth, int cols, float* kernel, int threads) {
  const std::size_t panel_stride = std::size_t((depth + 1) / 2) * 2 * kChannelBlock;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int row = 0; row < depth; ++row)
    for (int c = 0; c < cols; ++c)
      kernel[std::size_t(row) * cols + c] =
          bf16_to_float(packed[std::size_t(c / kChannelBlock) * panel_stride + std::size_t(row / 2) * 2 * kChannelBlock +
                               std::size_t(c % kChannelBlock) * 2 + row % 2]);
}

const double kWinogradG[6][3] = {
    {1.0 / 4, 0.0, 0.0},           {-1.0 / 6, -1.0 / 6, -1.0 / 6}, {-1.0 / 6, 1.0 / 6, -1.0 / 6},
    {1.0 / 24, 1.0 / 12, 1.0 / 6}, {1.0 / 24, -1.0 / 12, 1.0 / 6}, {0.0, 0.0, 1.0},
};

std::size_t packed_winograd_int14_size(int in_channels, int out_channels) {
  const std::size_t in16 = std::size_t(round_up_to_block(in_channels)), out16 = std::size_t(round_up_to_block(out_channels));
  return 36 * in16 * out16 + 36 * out16 * (sizeof(float) / sizeof(std::uint16_t));
}

void pack_winograd_int14(const float* kernel_hwio, int in_channels, int out_channels, std::uint16_t* packed,
                         int threads) {
  const int in16 = round_up_to_block(in_channels), out16 = round_up_to_block(out_channels);
  const int out_blocks = out16 / kChannelBlock;
  auto* q = reinterpret_cast<std::int16_t*>(packed);
  auto* steps = reinterpret_cast<float*>(packed + std::size_t(36) * in16 * out16);
  std::fill(q, q + std::size_t(36) * in16 * out16, std::int16_t(0));
  std::fill(steps, steps + std::size_t(36) * out16, 0.0f);
  // One output channel at a time: its 36 x in_channels values of U, their largest magnitude per
  // point, then the integers. Each channel writes its own slots, so channels run in parallel.
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int oc = 0; oc < out_channels; ++oc) {
    std::vector<double> u(std::size_t(36) * in_channels);
    for (int ic = 0; ic < in_channels; ++ic) {
      double g[3][3];
      for (int kh = 0; kh < 3; ++kh)
        for (int kw = 0; kw < 3; ++kw) g[kh][kw] = kernel_hwio[((std::size_t(kh) * 3 + kw) * in_channels + ic) * out_channels + oc];
      for (int a = 0; a < 6; ++a)
        for (int b = 0; b < 6; ++b) {
          double sum = 0.0;
          for (int kh = 0; kh < 3; ++kh)
            for (int kw = 0; kw < 3; ++kw) sum += kWinogradG[a][kh] * g[kh][kw] * kWinogradG[b][kw];
          u[std::size_t(a * 6 + b) * in_channels + ic] = sum;
        }
    }
    for (int xi = 0; xi < 36; ++xi) {
      const double* row = u.data() + std::size_t(xi) * in_channels;
      double largest = 0.0;
      bool finite = true;
      for (int ic = 0; ic < in_channels; ++ic) {
        finite = finite && std::isfinite(row[ic]);
        largest = std::max(largest, std::fabs(row[ic]));
      }
      if (!finite) {  // a NaN or infinite weight: the channel's outputs become NaN, as in fp32
        steps[std::size_t(xi) * out16 + oc] = std::nanf("");
        continue;
      }
      if (largest == 0.0) continue;  // all zero: integers and step stay 0
      steps[std::size_t(xi) * out16 + oc] = float(largest / kWinogradInt14Max);
      const double scale = kWinogradInt14Max / largest;
      const std::size_t panel = (std::size_t(xi) * out_blocks + oc / kChannelBlock) * std::size_t(in16) * kChannelBlock;
      for (int ic = 0; ic < in_channels; ++ic)
        q[panel + (std::size_t(ic / 2) * kChannelBlock + oc % kChannelBlock) * 2 + ic % 2] =
            std::int16_t(std::nearbyint(row[ic] * scale));
    }
  }
}

void unpack_winograd_int14(const std::uint16_t* packed, int in_channels, int out_channels, float* kernel_hwio,
                           int threads) {
  // U dequantised, then Q U Q^T with Q a left inverse of G (Q G = I) that reads the points 0,
  // -1, 1 and infinity: g0 = 4 G0.g, g1 = 3 (G2.g - G1.g), g2 = G5.g.
  const int in16 = round_up_to_block(in_channels), out16 = round_up_to_block(out_channels);
  const int out_blocks = out16 / kChannelBlock;
  const auto* q = reinterpret_cast<const std::int16_t*>(packed);
  const auto* steps = reinterpret_cast<const float*>(packed + std::size_t(36) * in16 * out16);
  auto combine = [](double at0, double at1, double at2, double at5, int row) {
    return row == 0 ? 4.0 * at0 : row == 1 ? 3.0 * (at2 - at1) : at5;
  };
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int oc = 0; oc < out_channels; ++oc)
    for (int ic = 0; ic < in_channels; ++ic) {
      auto u = [&](int a, int b) {
        const int xi = a * 6 + b;
        const std::size_t panel = (std::size_t(xi) * out_blocks + oc / kChannelBlock) * std::size_t(in16) * kChannelBlock;
        return double(q[panel + (std::size_t(ic / 2) * kChannelBlock + oc % kChannelBlock) * 2 + ic % 2]) *
               double(steps[std::size_t(xi) * out16 + oc]);
      };
      const int points[4] = {0, 1, 2, 5};
      for (int kh = 0; kh < 3; ++kh)
        for (int kw = 0; kw < 3; ++kw) {
          double row[4];
          for (int c = 0; c < 4; ++c) row[c] = combine(u(0, points[c]), u(1, points[c]), u(2, points[c]), u(5, points[c]), kh);
          kernel_hwio[((std::size_t(kh) * 3 + kw) * in_channels + ic) * out_channels + oc] =
              float(combine(row[0], row[1], row[2], row[3], kw));
        }
    }
}

}  // namespace fastvgg
