// Weight packing: Keras's layouts in, the kernels' layouts out (and back, for get_weights).
//
// conv3x3: Keras HWIO [3][3][in][out] -> [out/16][in/16][3][3][in 16][out 16]. One (block
//          pair, tap) is a 16x16 tile whose rows are whole output vectors, in the order the
//          kernel's input-channel loop visits them. Padding channels are zero.
// dense:   Keras [depth][cols] -> column panels [cols/16][depth][16], zero-padded columns.
#include <algorithm>
#include <cstring>

#include "hwio_weights.h"
#include "kernels.h"

namespace fastvgg {

std::size_t packed_conv3x3_size(int in_channels, int out_channels) {
  return std::size_t(channel_blocks(out_channels)) * channel_blocks(in_channels) * 9 * kChannelBlock * kChannelBlock;
}

namespace {
std::size_t packed_conv3x3_index(int in_blocks, int kh, int kw, int ic, int oc) {
  const int ob = oc / kChannelBlock, ib = ic / kChannelBlock;
  return ((((std::size_t(ob) * in_blocks + ib) * 3 + kh) * 3 + kw) * kChannelBlock + ic % kChannelBlock) * kChannelBlock +
         oc % kChannelBlock;
}
}  // namespace

void pack_conv3x3(const float* kernel_hwio, int in_channels, int out_channels, float* packed, int threads) {
  std::fill(packed, packed + packed_conv3x3_size(in_channels, out_channels), 0.0f);
  const int in_blocks = channel_blocks(in_channels);
  for_each_hwio_weight(in_channels, out_channels, threads, [&](std::size_t i, int kh, int kw, int ic, int oc) {
    packed[packed_conv3x3_index(in_blocks, kh, kw, ic, oc)] = kernel_hwio[i];
  });
}

void unpack_conv3x3(const float* packed, int in_channels, int out_channels, float* kernel_hwio, int threads) {
  const int in_blocks = channel_blocks(in_channels);
  for_each_hwio_weight(in_channels, out_channels, threads, [&](std::size_t i, int kh, int kw, int ic, int oc) {
    kernel_hwio[i] = packed[packed_conv3x3_index(in_blocks, kh, kw, ic, oc)];
  });
}

std::size_t packed_dense_size(int depth, int cols) {
  return std::size_t(channel_blocks(cols)) * depth * kChannelBlock;
}

void pack_dense_rows(const float* kernel_rows, int first_row, int row_count, int depth, int cols, float* packed,
                     int threads) {
  const std::size_t panel_stride = std::size_t(depth) * kChannelBlock;
  const int full_panels = cols / kChannelBlock, tail = cols % kChannelBlock;
  // A group of rows is read once into cache (32 rows of fc1 are 512 KB) and written panel by
  // panel as contiguous 2 KB runs; row by row, each row would scatter 64-byte pieces over
  // every panel, and loading fc1 took twice as long.
  constexpr int kRowsPerGroup = 32;
  const int groups = (row_count + kRowsPerGroup - 1) / kRowsPerGroup;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int g = 0; g < groups; ++g) {
    const int begin = g * kRowsPerGroup, end = std::min(row_count, begin + kRowsPerGroup);
    for (int p = 0; p < full_panels; ++p) {
      float* panel = packed + std::size_t(p) * panel_stride + std::size_t(first_row) * kChannelBlock;
      for (int r = begin; r < end; ++r)
        std::copy_n(kernel_rows + std::size_t(r) * cols + std::size_t(p) * kChannelBlock, kChannelBlock,
                    panel + std::size_t(r) * kChannelBlock);
    }
    if (tail != 0) {  // the last panel's padding columns stay as zeroed at allocation
      float* panel = packed + std::size_t(full_panels) * panel_stride + std::size_t(first_row) * kChannelBlock;
      for (int r = begin; r < end; ++r)
        std::copy_n(kernel_rows + std::size_t(r) * cols + std::size_t(full_panels) * kChannelBlock, tail,
                    panel + std::size_t(r) * kChannelBlock);
    }
  }
}

void unpack_dense(const float* packed, int depth, int cols, float* kernel, int threads) {
  const std::size_t panel_stride = std::size_t(depth) * kChannelBlock;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int k = 0; k < depth; ++k)
    for (int c = 0; c < cols; ++c)
      kernel[std::size_t(k) * cols + c] = packed[(c / kChannelBlock) * panel_stride + std::size_t(k) * kChannelBlock + c % kChannelBlock];
}

namespace {
// Floats as integers that count ulps: consecutive floats get consecutive keys, across zero too.
std::int64_t ulp_key(float value) {
  std::int32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits >= 0 ? std::int64_t(bits) : std::int64_t(INT32_MIN) - bits;
}

float from_ulp_key(std::int64_t key) {
  const std::int32_t bits = std::int32_t(key >= 0 ? key : std::int64_t(INT32_MIN) - key);
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }
}  // namespace

KernelCorrection correction_to(const float* exact, const float* approximate, std::size_t count, int threads) {
  // INT8_MIN marks a weight kept whole (-0.0 and NaN payloads have no ulp distance that
  // restores their bits, and some weights are too many ulps away).
  constexpr std::int8_t kKeptWhole = INT8_MIN;
  KernelCorrection correction;
  correction.ulps.resize(count);
  std::int8_t* ulps = correction.ulps.data();
#pragma omp parallel for schedule(static) num_threads(threads)
  for (std::int64_t i = 0; i < std::int64_t(count); ++i) {
    const std::int64_t steps = ulp_key(exact[i]) - ulp_key(approximate[i]);
    const bool fits = steps > INT8_MIN && steps <= INT8_MAX &&
                      same_bits(from_ulp_key(ulp_key(approximate[i]) + steps), exact[i]);
    ulps[i] = fits ? std::int8_t(steps) : kKeptWhole;
  }
  for (std::size_t i = 0; i < count; ++i)
    if (ulps[i] == kKeptWhole) {
      ulps[i] = 0;
      correction.exact_index.push_back(std::uint32_t(i));
      correction.exact_value.push_back(exact[i]);
    }
  return correction;
}

void apply_correction(const KernelCorrection& correction, float* approximate, std::size_t count, int threads) {
  const std::int8_t* ulps = correction.ulps.data();
#pragma omp parallel for schedule(static) num_threads(threads)
  for (std::int64_t i = 0; i < std::int64_t(count); ++i)
    if (ulps[i] != 0) approximate[i] = from_ulp_key(ulp_key(approximate[i]) + ulps[i]);
  for (std::size_t k = 0; k < correction.exact_index.size(); ++k)
    approximate[correction.exact_index[k]] = correction.exact_value[k];
}

// The fp32 methods: one layout per method, whichever ISA runs it.
namespace {
std::size_t direct_bytes(int in_channels, int out_channels) {
  return packed_conv3x3_size(in_channels, out_channels) * sizeof(float);
}
void direct_pack(const float* kernel_hwio, int in_channels, int out_channels, void* packed, int threads) {
  pack_conv3x3(kernel_hwio, in_channels, out_channels, static_cast<float*>(packed), threads);
}
void direct_unpack(const void* packed, int in_channels, int out_channels, float* kernel_hwio, int threads) {
  unpack_conv3x3(static_cast<const float*>(packed), in_channels, out_channels, kernel_hwio, threads);
}
std::size_t winograd_bytes(int in_channels, int out_channels) {
  return packed_winograd_size(in_channels, out_channels) * sizeof(float);
}
void winograd_pack(const float* kernel_hwio, int in_channels, int out_channels, void* packed, int threads) {
  pack_winograd_f4x4(kernel_hwio, in_channels, out_channels, static_cast<float*>(packed), threads);
}
void winograd_unpack(const void* packed, int in_channels, int out_channels, float* kernel_hwio, int threads) {
  unpack_winograd_f4x4(static_cast<const float*>(packed), in_channels, out_channels, kernel_hwio, threads);
}
std::size_t dense_bytes(int depth, int cols) { return packed_dense_size(depth, cols) * sizeof(float); }
void dense_pack_rows(const float* kernel_rows, int first_row, int row_count, int depth, int cols, void* packed,
                     int threads) {
  pack_dense_rows(kernel_rows, first_row, row_count, depth, cols, static_cast<float*>(packed), threads);
}
void dense_unpack(const void* packed, int depth, int cols, float* kernel, int threads) {
  unpack_dense(static_cast<const float*>(packed), depth, cols, kernel, threads);
}
}  // namespace

Conv3x3Method fp32_direct_method(decltype(Conv3x3Method::run) run) {
  return {"direct_f32", direct_bytes, direct_pack, direct_unpack, /*unpack_is_exact=*/true, run};
}
Conv3x3Method fp32_winograd_method(decltype(Conv3x3Method::run) run, decltype(Conv3x3Method::run_batch) run_batch,
                                   decltype(Conv3x3Method::run_batch_max_pool) run_batch_max_pool) {
  return {"winograd_f4x4_f32", winograd_bytes, winograd_pack, winograd_unpack, /*unpack_is_exact=*/false,
          run,                 run_batch,      run_batch_max_pool};
}
DenseMethod fp32_dense_method(decltype(DenseMethod::run) run) {
  return {"dense_f32", dense_bytes, dense_pack_rows, dense_unpack, run};
}

}  // namespace fastvgg
