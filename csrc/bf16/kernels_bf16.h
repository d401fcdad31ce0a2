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
#include <cstring>

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

// Winograd F(4x4, 3x3) with 14-bit integer products (winograd_int14.cpp): transformed values
// are quantised to integers of at most this magnitude.
constexpr int kWinogradInt14Max = 8191;

// Entry points and their weight packers, side by side: an executor that runs a layer with
// this set packs that layer's weights with this set's packer.
struct Bf16KernelSet {
  const char* name;
  // conv3x3 packed layout: [out/16][in/16][3][3][8 input-channel pairs][16 out][2] bf16;
  // padding channels are zero. packed_conv3x3_size counts uint16 elements.
  std::size_t (*packed_conv3x3_size)(int in_channels, int out_channels);
  void (*pack_conv3x3)(const float* kernel_hwio, int in_channels, int out_channels, std::uint16_t* packed);
  // out = ReLU?(conv3x3_same(bf16(in)) + bias), fp32 in and out, bias padded to the block.
  void (*conv3x3)(const BlockedImage& in, const std::uint16_t* packed_weights, const float* bias, bool relu,
                  const BlockedImage& out, int threads);
  // dense packed layout: column panels [cols/16][ceil(depth/2) row pairs][16 cols][2] bf16.
  // The buffer must start zeroed (padding columns and the odd row of an odd depth stay 0),
  // like the fp32 dense packing; rows may then be packed in any number of pieces.
  std::size_t (*packed_dense_size)(int depth, int cols);
  void (*pack_dense_rows)(const float* kernel_rows, int first_row, int row_count, int depth, int cols,
                          std::uint16_t* packed);
  // y[rows][round_up_to_block(cols)] = bf16(x)[rows][depth] * W + bias, ReLU optional.
  void (*dense)(const float* x, int rows, int depth, const std::uint16_t* packed_weights, const float* bias,
                int cols, bool relu, float* y, int threads);
  // Winograd F(4x4, 3x3), fp32 transforms, int14 products (vpdpwssd): same contract as conv3x3.
  // packed layout: int16 [36][out16/16][in16/2][16][2] then fp32 steps [36][out16] (in16, out16:
  // channels rounded up to 16); packed_winograd_size counts uint16 elements.
  std::size_t (*packed_winograd_size)(int in_channels, int out_channels);
  void (*pack_winograd)(const float* kernel_hwio, int in_channels, int out_channels, std::uint16_t* packed);
  void (*conv3x3_winograd)(const BlockedImage& in, const std::uint16_t* packed_weights, const float* bias, bool relu,
                           const BlockedImage& out, int threads);
  // The hardware's own conversion (vcvtneps2bf16), exposed so tests can hold round_to_bf16 to it.
  void (*round_to_bf16)(const float* values, std::size_t count, std::uint16_t* rounded);
};

// The set this CPU can run, or nullptr: this build has no AVX512_BF16 kernels, or the CPU (or
// the OS, for the AVX-512 register state) does not offer AVX512_BF16.
const Bf16KernelSet* bf16_kernel_set();
// Why bf16_kernel_set() is nullptr here, in words for an error message ("" when it is not).
const char* bf16_unavailable_reason();

// Packers (pack_bf16.cpp): plain C++, shared by every CPU that runs the set.
std::size_t packed_conv3x3_bf16_size(int in_channels, int out_channels);
void pack_conv3x3_bf16(const float* kernel_hwio, int in_channels, int out_channels, std::uint16_t* packed);
std::size_t packed_dense_bf16_size(int depth, int cols);
void pack_dense_rows_bf16(const float* kernel_rows, int first_row, int row_count, int depth, int cols,
                          std::uint16_t* packed);
std::size_t packed_winograd_int14_size(int in_channels, int out_channels);
void pack_winograd_int14(const float* kernel_hwio, int in_channels, int out_channels, std::uint16_t* packed);
// Lavin & Gray's G for F(4x4, 3x3) (points 0, -1, 1, -2, 2, infinity), in double.
extern const double kWinogradG[6][3];

// The AVX512_BF16 kernels (conv3x3_bf16.cpp, dense_bf16.cpp), compiled with -mavx512bf16.
namespace avx512bf16 {
void conv3x3(const BlockedImage& in, const std::uint16_t* packed_weights, const float* bias, bool relu,
             const BlockedImage& out, int threads);
void dense(const float* x, int rows, int depth, const std::uint16_t* packed_weights, const float* bias, int cols,
           bool relu, float* y, int threads);
void round_floats(const float* values, std::size_t count, std::uint16_t* rounded);
void conv3x3_winograd_int14(const BlockedImage& in, const std::uint16_t* packed_weights, const float* bias, bool relu,
                            const BlockedImage& out, int threads);
}  // namespace avx512bf16

// Plain twins on NHWC arrays and Keras layouts: inputs and weights rounded by round_to_bf16,
// products summed in double, the sum rounded to float once.
namespace reference {
void conv3x3_bf16(const float* x, int images, int height, int width, int in_channels, const float* kernel_hwio,
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
