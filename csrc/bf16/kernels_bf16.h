// The bf16 kernel set: 3x3 convolution and dense layers whose products take bfloat16 inputs
// (8-bit significands) and accumulate in fp32, for CPUs with AVX512_BF16 (vdpbf16ps).
//
// Activations stay fp32 in the blocked nChw16c layout of tensor.h; the kernels round them to
// bf16 as they read them, and the weights are rounded once, when packed. Each kernel has a
// plain twin (reference::*_bf16) that rounds its inputs exactly the same way and accumulates
// in double, so a test can hold the two to fp32 accumulation-order differences.
//
// Rounding is the one vcvtneps2bf16 performs (Intel SDM, "convert_fp32_to_bfloat16"):
// round to nearest, ties to even; denormal inputs become a zero of the same sign; NaN stays
// NaN (made quiet); infinities stay infinite. round_to_bf16 below is that rule in plain C++,
// shared by the packers and the references.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "kernels.h"
#include "tensor.h"

namespace fastvgg {

inline std::uint16_t round_to_bf16(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  const std::uint32_t exponent = bits & 0x7f800000u, mantissa = bits & 0x007fffffu;
  if (exponent == 0) return std::uint16_t((bits >> 16) & 0x8000u);  // zero or denormal: signed zero
  if (exponent == 0x7f800000u) {
    if (mantissa == 0) return std::uint16_t(bits >> 16);  // infinity
    return std::uint16_t((bits >> 16) | 0x0040u);          // NaN, made quiet
  }
  const std::uint32_t lowest_kept_bit = (bits >> 16) & 1u;
  return std::uint16_t((bits + 0x7fffu + lowest_kept_bit) >> 16);
}

inline float bf16_to_float(std::uint16_t value) {
  const std::uint32_t bits = std::uint32_t(value) << 16;
  float result;
  std::memcpy(&result, &bits, sizeof result);
  return result;
}

// value as two bf16 values, hi = bf16(value) and lo = bf16(value - hi) (value - hi is exact in
// fp32). Where bf16(value) is infinite or NaN, hi = 0 and lo carries it, so that no product of
// a hi part is inf * 0 (bf16x3 multiplies hi parts by the other side's lo parts, often 0). The
// AMX kernel's vector conversion (conv3x3_amx.cpp) follows the same rule.
struct Bf16Pair {
  std::uint16_t hi, lo;
};
inline Bf16Pair split_to_bf16(float value) {
  const std::uint16_t rounded = round_to_bf16(value);
  const float rounded_value = bf16_to_float(rounded);
  if (!std::isfinite(rounded_value)) return {0, rounded};
  return {rounded, round_to_bf16(value - rounded_value)};
}

// Winograd F(4x4, 3x3) with 14-bit integer products (winograd_int14.cpp): transformed values
// are quantised to integers of at most this magnitude.
constexpr int kWinogradInt14Max = 8191;

// The bf16 kernel set: three methods in the shape of kernels.h's (packers beside run functions),
// so an executor runs them as it runs the fp32 ones.
//   conv3x3_direct    "direct_bf16": vdpbf16ps on bf16-rounded inputs and weights.
//                     Layout: [out/16][in/16][3][3][8 input-channel pairs][16 out][2] bf16.
//   conv3x3_winograd  "winograd_f4x4_int14": Winograd F(4x4, 3x3), fp32 transforms, 14-bit integer
//                     products (vpdpwssd). Layout: int16 [36][out16/16][in16/2][16][2], then fp32
//                     steps [36][out16] (in16, out16: the channel counts rounded up to 16).
//   dense             "dense_bf16": bf16 weights and inputs, fp32 sums.
//                     Layout: column panels [cols/16][ceil(depth/2) row pairs][16 cols][2] bf16.
// None of the three unpacks exactly (rounded or quantised weights): unpack_is_exact is false.
//
// The AMX set ("amx_bf16", CPUs with AMX-BF16: Sapphire Rapids on) runs every 3x3 convolution
// directly on AMX tiles (its Winograd slot is empty: run == nullptr, and the executor then
// picks direct for every layer), bf16 weights against activations carried by two bf16 values:
//   conv3x3_direct    "direct_bf16_amx": TDPBF16PS. Layout: [out/16][3][3][in/32][16 pairs][16 out][2].
struct Bf16KernelSet {
  const char* name;
  Conv3x3Method conv3x3_direct;
  Conv3x3Method conv3x3_winograd;
  DenseMethod dense;
  // The hardware's own conversion (vcvtneps2bf16), exposed so tests can hold round_to_bf16 to it.
  void (*round_to_bf16)(const float* values, std::size_t count, std::uint16_t* rounded);
};

// The set precision="bf16" runs here, or nullptr: this build has no AVX512_BF16 kernels, or the
// CPU (or the OS, for the AVX-512 register state) does not offer AVX512_BF16 and AVX512_VNNI.
// The AMX set where it runs, else the AVX512_BF16 one; FASTVGG_BF16_KERNELS=avx512_bf16 (or
// amx_bf16) names one instead, and nullptr follows when the named one cannot run here.
const Bf16KernelSet* bf16_kernel_set();
// Every set this build and CPU can run, the default first (for tests and bench/).
std::vector<const Bf16KernelSet*> bf16_kernel_sets();
// Why bf16_kernel_set() is nullptr here, in words for an error message ("" when it is not).
std::string bf16_unavailable_reason();
// Why the AMX set cannot run here ("" when it can): no AMX in this build or CPU, or Linux
// refused the tile data permission (arch_prctl ARCH_REQ_XCOMP_PERM).
std::string amx_unavailable_reason();
// A whole kernel table for an executor: `fp32`'s pooling and layout functions with the bf16
// set's convolution and dense methods; built once per fp32 table and kept for the process (an
// executor holds a pointer to its table). Throws std::runtime_error (with the reason) where
// the set is unavailable.
const KernelTable& bf16_kernel_table(const KernelTable& fp32);
// The same with a named set's methods.
const KernelTable& bf16_kernel_table(const KernelTable& fp32, const Bf16KernelSet& set);

// precision="bf16x3" (CPUs with AMX-BF16): `fp32`'s table whose Winograd slot (the method
// picked from 16 input channels on) holds the AMX kernel with bf16x3 products
// ("direct_bf16x3_amx"; isa_name "amx_bf16x3"); the first layer keeps fp32's direct kernel.
// nullptr where AMX cannot run (amx_unavailable_reason says why).
const KernelTable* amx_bf16x3_kernel_table(const KernelTable& fp32);
// Its convolution method, or nullptr where AMX cannot run.
const Conv3x3Method* amx_x3_conv_method();

// Packers (pack_bf16.cpp): plain C++, shared by every CPU that runs the set. Sizes count
// uint16 elements.
std::size_t packed_conv3x3_bf16_size(int in_channels, int out_channels);
void pack_conv3x3_bf16(const float* kernel_hwio, int in_channels, int out_channels, std::uint16_t* packed,
                       int threads);
void unpack_conv3x3_bf16(const std::uint16_t* packed, int in_channels, int out_channels, float* kernel_hwio,
                         int threads);
std::size_t packed_conv3x3_amx_size(int in_channels, int out_channels);
void pack_conv3x3_amx(const float* kernel_hwio, int in_channels, int out_channels, std::uint16_t* packed,
                      int threads);
void unpack_conv3x3_amx(const std::uint16_t* packed, int in_channels, int out_channels, float* kernel_hwio,
                        int threads);
// The weights as hi + lo bf16 pairs (precision="bf16x3"): the layout above twice, every hi part
// then every lo part. The unpacked kernel is hi + lo, within 2^-16 of each weight.
std::size_t packed_conv3x3_amx_x3_size(int in_channels, int out_channels);
void pack_conv3x3_amx_x3(const float* kernel_hwio, int in_channels, int out_channels, std::uint16_t* packed,
                         int threads);
void unpack_conv3x3_amx_x3(const std::uint16_t* packed, int in_channels, int out_channels, float* kernel_hwio,
                           int threads);
std::size_t packed_dense_bf16_size(int depth, int cols);
// Rows [first_row, first_row + row_count); the buffer must start zeroed (padding columns and the
// odd row of an odd depth stay 0), rows may come in any number of pieces.
void pack_dense_rows_bf16(const float* kernel_rows, int first_row, int row_count, int depth, int cols,
                          std::uint16_t* packed, int threads);
void unpack_dense_bf16(const std::uint16_t* packed, int depth, int cols, float* kernel, int threads);
std::size_t packed_winograd_int14_size(int in_channels, int out_channels);
void pack_winograd_int14(const float* kernel_hwio, int in_channels, int out_channels, std::uint16_t* packed,
                         int threads);
// The kernel back from the dequantised U by a left inverse of G: within ~1e-4 of it, not exact.
void unpack_winograd_int14(const std::uint16_t* packed, int in_channels, int out_channels, float* kernel_hwio,
                           int threads);
// Lavin & Gray's G for F(4x4, 3x3) (points 0, -1, 1, -2, 2, infinity), in double.
extern const double kWinogradG[6][3];

// The AVX512_BF16 / AVX512_VNNI kernels (conv3x3_bf16.cpp, dense_bf16.cpp, winograd_int14.cpp).
namespace avx512bf16 {
void conv3x3(const BlockedImage& in, const void* packed_weights, const float* bias, bool relu, const BlockedImage& out,
             int threads, KernelScratch& scratch);
void conv3x3_winograd_int14(const BlockedImage& in, const void* packed_weights, const float* bias, bool relu,
                            const BlockedImage& out, int threads, KernelScratch& scratch);
// The same followed by a 2x2 max pool ('valid'), image by image, writing only the pooled images;
// bit-identical to conv3x3_winograd_int14 and then the fp32 max_pool2x2.
void conv3x3_winograd_int14_max_pool(const BlockedImage* in, const void* packed_weights, const float* bias, bool relu,
                                     const BlockedImage* pooled, int images, int threads, KernelScratch& scratch);
void dense(const float* x, int rows, int depth, std::ptrdiff_t x_stride, const void* packed_weights, const float* bias,
           int cols, bool relu, float* y, std::ptrdiff_t y_stride, int threads);
void round_floats(const float* values, std::size_t count, std::uint16_t* rounded);
}  // namespace avx512bf16

// The AMX-BF16 kernel (conv3x3_amx.cpp). The caller has made sure the CPU has AMX and the
// process holds the tile data permission (bf16_kernel_set does both).
// Activations carried as two bf16 values (hi + lo), weights rounded once: conv3x3_bf16_split's
// products. The batch form runs the images one after another in one parallel region (the same
// sums as conv3x3 on each); the max-pool form writes only the pooled images, bit-identical to
// conv3x3 then max_pool2x2.
namespace amxbf16 {
void conv3x3(const BlockedImage& in, const void* packed_weights, const float* bias, bool relu, const BlockedImage& out,
             int threads, KernelScratch& scratch);
void conv3x3_batch(const BlockedImage* in, const void* packed_weights, const float* bias, bool relu,
                   const BlockedImage* out, int images, int threads, KernelScratch& scratch);
void conv3x3_batch_max_pool(const BlockedImage* in, const void* packed_weights, const float* bias, bool relu,
                            const BlockedImage* pooled, int images, int threads, KernelScratch& scratch);
// "bf16x3": activations and weights both carried as hi + lo, three products per multiply-add
// (hi*hi + lo*hi + hi*lo; lo*lo, under 2^-16 of the product, is left out): fp32-class sums,
// conv3x3_bf16x3's products. Weights packed by pack_conv3x3_amx_x3.
void conv3x3_x3(const BlockedImage& in, const void* packed_weights, const float* bias, bool relu,
                const BlockedImage& out, int threads, KernelScratch& scratch);
void conv3x3_x3_batch(const BlockedImage* in, const void* packed_weights, const float* bias, bool relu,
                      const BlockedImage* out, int images, int threads, KernelScratch& scratch);
void conv3x3_x3_batch_max_pool(const BlockedImage* in, const void* packed_weights, const float* bias, bool relu,
                               const BlockedImage* pooled, int images, int threads, KernelScratch& scratch);
}  // namespace amxbf16

// Plain twins on NHWC arrays and Keras layouts: inputs and weights rounded by round_to_bf16,
// products summed in double, the sum rounded to float once.
namespace reference {
void conv3x3_bf16(const float* x, int images, int height, int width, int in_channels, const float* kernel_hwio,
                  const float* bias, int out_channels, bool relu, float* y);
// The AMX kernel's twin: weights rounded to bf16, each input x replaced by hi + lo with
// hi = bf16(x), lo = bf16(x - hi) (hi = 0, lo = bf16(x) where bf16(x) is infinite or NaN), products
// in double.
void conv3x3_bf16_split(const float* x, int images, int height, int width, int in_channels,
                        const float* kernel_hwio, const float* bias, int out_channels, bool relu, float* y);
// The bf16x3 kernel's twin: inputs and weights each replaced by hi + lo, the products
// hi*hi + lo*hi + hi*lo summed in double.
void conv3x3_bf16x3(const float* x, int images, int height, int width, int in_channels, const float* kernel_hwio,
                    const float* bias, int out_channels, bool relu, float* y);
void dense_bf16(const float* x, int rows, int depth, const float* kernel, const float* bias, int cols, bool relu,
                float* y);
// Winograd F(4x4) with the int14 quantisation of the kernel, all in double: U = G g G^T and
// V = B^T d B exact, each quantised by the kernel's rule (one step per point and output channel
// for U, per tile and point over all input channels, padded to 16, for V; round half to even),
// integer sums, Y = A^T M A + bias. It differs from the kernel only where the kernel's fp32 V
// lands on the other side of a rounding boundary, and by fp32 rounding.
void conv3x3_winograd_int14(const float* x, int images, int height, int width, int in_channels,
                            const float* kernel_hwio, const float* bias, int out_channels, bool relu, float* y);
}  // namespace reference

}  // namespace fastvgg
