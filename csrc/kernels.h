// The kernel table: every op family's entry points, one table per instruction set.
//
// The network and the test bindings only call kernels through a KernelTable, so adding an
// ISA (or checking one against the reference) means filling one more table. The plain
// reference kernels work on NHWC arrays instead and share nothing with the fast ones.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "tensor.h"

namespace fastvgg {

enum class GlobalPoolMode { Average, Max };

struct KernelTable {
  const char* isa_name;
  // out = ReLU?(conv3x3_same(in) + bias). Weights from pack_conv3x3; bias padded to the block.
  void (*conv3x3)(const BlockedImage& in, const float* packed_weights, const float* bias, bool relu,
                  const BlockedImage& out, int threads);
  // Same contract as conv3x3, by Winograd F(4x4, 3x3). Weights from pack_winograd_f4x4.
  void (*conv3x3_winograd)(const BlockedImage& in, const float* packed_weights, const float* bias, bool relu,
                           const BlockedImage& out, int threads);
  // 2x2 window, stride 2; out has floor(h/2) x floor(w/2) pixels.
  void (*max_pool2x2)(const BlockedImage& in, const BlockedImage& out, int threads);
  // out[c] for c < in.channels.
  void (*global_pool)(const BlockedImage& in, GlobalPoolMode mode, float* out);
  // y[rows][padded_cols] = x[rows][depth] * W + bias, ReLU optional. W from pack_dense.
  void (*dense)(const float* x, int rows, int depth, const float* packed_weights, const float* bias,
                int cols, bool relu, float* y, int threads);
  // NHWC image (height x width x channels floats) into the blocked layout, border zeroed.
  void (*nhwc_to_blocked)(const float* nhwc, const BlockedImage& out);
  // Blocked image back to NHWC: height x width x channels floats.
  void (*blocked_to_nhwc)(const BlockedImage& in, float* nhwc);
};

#define FASTVGG_DECLARE_KERNELS(isa)                                                          \
  namespace isa {                                                                             \
  void conv3x3(const BlockedImage& in, const float* packed_weights, const float* bias,        \
               bool relu, const BlockedImage& out, int threads);                              \
  void conv3x3_winograd(const BlockedImage& in, const float* packed_weights,                  \
                        const float* bias, bool relu, const BlockedImage& out, int threads);  \
  void max_pool2x2(const BlockedImage& in, const BlockedImage& out, int threads);             \
  void global_pool(const BlockedImage& in, GlobalPoolMode mode, float* out);                  \
  void dense(const float* x, int rows, int depth, const float* packed_weights,                \
             const float* bias, int cols, bool relu, float* y, int threads);                  \
  void nhwc_to_blocked(const float* nhwc, const BlockedImage& out);                           \
  void blocked_to_nhwc(const BlockedImage& in, float* nhwc);                                  \
  extern const KernelTable kernel_table;                                                      \
  }

// Declared for every ISA; only those CMake built are defined (FASTVGG_HAVE_<ISA>).
FASTVGG_DECLARE_KERNELS(generic)
FASTVGG_DECLARE_KERNELS(avx2)
FASTVGG_DECLARE_KERNELS(avx512)

// Plain loops over NHWC arrays: the independent yardstick for every fast kernel.
namespace reference {
void conv3x3(const float* x, int images, int height, int width, int in_channels,
             const float* kernel_hwio, const float* bias, int out_channels, bool relu, float* y);
void max_pool2x2(const float* x, int images, int height, int width, int channels, float* y);
void global_pool(const float* x, int images, int height, int width, int channels,
                 GlobalPoolMode mode, float* y);
void dense(const float* x, int rows, int depth, const float* kernel, const float* bias, int cols,
           bool relu, float* y);
}  // namespace reference

// Row-wise softmax, max-subtracted so large logits do not overflow.
void softmax_rows(float* y, int rows, int cols, std::ptrdiff_t row_stride);

// Weight packing, shared by every ISA (see weights_pack.cpp for the layouts).
std::size_t packed_conv3x3_size(int in_channels, int out_channels);
void pack_conv3x3(const float* kernel_hwio, int in_channels, int out_channels, float* packed);
void unpack_conv3x3(const float* packed, int in_channels, int out_channels, float* kernel_hwio);
// Winograd F(4x4, 3x3): U = G g G^T per channel pair (winograd.cpp has the layout).
std::size_t packed_winograd_size(int in_channels, int out_channels);
void pack_winograd_f4x4(const float* kernel_hwio, int in_channels, int out_channels, float* packed);
// The inverse transform: the kernel up to U's rounding (~1e-7 relative; see KernelCorrection).
void unpack_winograd_f4x4(const float* packed, int in_channels, int out_channels, float* kernel_hwio);

// What turns an approximate copy of a kernel into the exact one: per weight, how many float
// steps (ulps) to move, and the exact value where that does not fit in a byte. For a layer
// that runs by Winograd this (one byte a weight) replaces a second float copy of the kernel,
// and get_weights still returns the loaded weights bit for bit.
struct KernelCorrection {
  std::vector<std::int8_t> ulps;
  std::vector<std::uint32_t> exact_index;
  std::vector<float> exact_value;
};
KernelCorrection correction_to(const float* exact, const float* approximate, std::size_t count);
void apply_correction(const KernelCorrection& correction, float* approximate, std::size_t count);
std::size_t packed_dense_size(int depth, int cols);
void pack_dense_rows(const float* kernel_rows, int first_row, int row_count, int depth, int cols,
                     float* packed);
void unpack_dense(const float* packed, int depth, int cols, float* kernel);

}  // namespace fastvgg
