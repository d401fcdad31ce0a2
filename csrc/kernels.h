// Kernel sets: every op family's entry points for one instruction set and precision, each
// weighted op together with the packing functions of the weight layout it reads.
//
// Whoever picks a kernel also picks its weight layout, as XNNPACK's gemm configs carry their
// packers: an executor asks the set for `packed_bytes`, `pack` and `run` of one method and
// never needs to know the layout. A set with another layout (bf16 pairs, a GPU) brings its own
// packers and nothing else changes. The plain reference kernels work on NHWC arrays instead
// and share nothing with the fast ones.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "tensor.h"
#include "workspace.h"

namespace fastvgg {

enum class GlobalPoolMode { Average, Max };

// ClippedRelu's cap when it has none. A constant, not a call: an unoptimised build would emit
// std::numeric_limits<float>::infinity() as a weak function that a per-ISA object compiles with
// its -m flags and shares by name (see per_isa.h and tests/test_isa_symbols.py).
constexpr float kNoCap = std::numeric_limits<float>::infinity();

// The numbers of the activations that take some: Keras's ReLU(negative_slope, max_value,
// threshold), as graph.h's LeakyRelu and ClippedRelu. The other activations take none.
struct ActivationParams {
  float negative_slope = 0.0f;  // the slope below the threshold (LeakyRelu: below 0)
  float max_value = kNoCap;     // ClippedRelu's cap; infinity: none
  float threshold = 0.0f;       // ClippedRelu's: x passes above it
};

// One way of running a 3x3 'same' convolution (+ bias, optional fused ReLU), with its layout.
struct Conv3x3Method {
  const char* name;  // e.g. "direct_f32", "winograd_f4x4_f32"
  // Bytes of packed weights for a kernel of in x out channels.
  std::size_t (*packed_bytes)(int in_channels, int out_channels);
  // Keras HWIO [3][3][in][out] into the method's layout; every byte of `packed` is written.
  void (*pack)(const float* kernel_hwio, int in_channels, int out_channels, void* packed, int threads);
  // Back to HWIO. Exact for a method whose layout only moves floats; for one that transforms
  // them (Winograd) it is the kernel up to rounding, which the executor corrects.
  void (*unpack)(const void* packed, int in_channels, int out_channels, float* kernel_hwio, int threads);
  bool unpack_is_exact;
  // out = ReLU?(conv3x3_same(in) + bias); bias padded to the block. Scratch is the caller's.
  void (*run)(const BlockedImage& in, const void* packed, const float* bias, bool relu, const BlockedImage& out,
              int threads, KernelScratch& scratch);
  // The same over `images` images of one shape in one call, bit-identical to `run` on each, so
  // that weights too large for the caches are read once per block of tiles instead of once per
  // image; nullptr for a method without it.
  void (*run_batch)(const BlockedImage* in, const void* packed, const float* bias, bool relu, const BlockedImage* out,
                    int images, int threads, KernelScratch& scratch) = nullptr;
  // run_batch followed by a 2x2 max pool (stride 2, 'valid'), writing only the pooled images
  // (floor(h/2) x floor(w/2)), bit-identical to run and then max_pool2x2; nullptr where the
  // method has none. One image is a batch of one.
  void (*run_batch_max_pool)(const BlockedImage* in, const void* packed, const float* bias, bool relu,
                             const BlockedImage* pooled, int images, int threads, KernelScratch& scratch) = nullptr;
};

// A dense layer y = x W + bias, ReLU optional, with its layout.
struct DenseMethod {
  const char* name;
  std::size_t (*packed_bytes)(int depth, int cols);
  // Rows [first_row, first_row + row_count) of a Keras [depth][cols] kernel. Padding of the
  // layout must be zero before the first call (the executor allocates it zeroed).
  void (*pack_rows)(const float* kernel_rows, int first_row, int row_count, int depth, int cols, void* packed,
                    int threads);
  void (*unpack)(const void* packed, int depth, int cols, float* kernel, int threads);
  // x: rows x depth with x_stride floats between rows; y: rows x round_up_to_block(cols)
  // (the padding columns are written too) with y_stride between rows.
  void (*run)(const float* x, int rows, int depth, std::ptrdiff_t x_stride, const void* packed, const float* bias,
              int cols, bool relu, float* y, std::ptrdiff_t y_stride, int threads);
};

struct KernelTable {
  const char* isa_name;
  Conv3x3Method conv3x3_direct;
  Conv3x3Method conv3x3_winograd;
  DenseMethod dense;
  // 2x2 window, stride 2; out has floor(h/2) x floor(w/2) pixels.
  void (*max_pool2x2)(const BlockedImage& in, const BlockedImage& out, int threads);
  // out[c] for c < in.channels.
  void (*global_pool)(const BlockedImage& in, GlobalPoolMode mode, float* out);
  // NHWC image (height x width x channels floats) into the blocked layout, border zeroed.
  void (*nhwc_to_blocked)(const float* nhwc, const BlockedImage& out);
  // Blocked image back to NHWC: height x width x channels floats.
  void (*blocked_to_nhwc)(const BlockedImage& in, float* nhwc);
};

// The run functions each ISA object defines. Everything else an ISA object compiles lives in
// its own namespace or has internal linkage, so no copy built with one ISA's instructions can
// be picked by the linker for another ISA's callers.
#define FASTVGG_DECLARE_KERNELS(isa)                                                                        \
  namespace isa {                                                                                           \
  void conv3x3(const BlockedImage& in, const void* packed_weights, const float* bias, bool relu,            \
               const BlockedImage& out, int threads, KernelScratch& scratch);                               \
  void conv3x3_winograd(const BlockedImage& in, const void* packed_weights, const float* bias, bool relu,   \
                        const BlockedImage& out, int threads, KernelScratch& scratch);                      \
  void max_pool2x2(const BlockedImage& in, const BlockedImage& out, int threads);                           \
  void global_pool(const BlockedImage& in, GlobalPoolMode mode, float* out);                                \
  void dense(const float* x, int rows, int depth, std::ptrdiff_t x_stride, const void* packed_weights,     \
             const float* bias, int cols, bool relu, float* y, std::ptrdiff_t y_stride, int threads);       \
  void nhwc_to_blocked(const float* nhwc, const BlockedImage& out);                                         \
  void blocked_to_nhwc(const BlockedImage& in, float* nhwc);                                                \
  extern const KernelTable kernel_table;                                                                    \
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
// Softmax over the channels of every pixel of a blocked image, in place (Keras's softmax on an
// image: its last axis), each pixel as softmax_rows computes a row. The border and padding
// channels are not touched.
void softmax_pixels(const BlockedImage& image, int threads);
// Row-wise L2 normalization (Keras's UnitNormalization): row * min(1 / ||row||, max_inverse_norm).
void l2_normalize_rows(float* y, int rows, int cols, std::ptrdiff_t row_stride, float max_inverse_norm);

// The fp32 layouts, shared by the fp32 kernel sets of every ISA (weights_pack.cpp, the end of
// winograd.cpp). Sizes are in floats.
std::size_t packed_conv3x3_size(int in_channels, int out_channels);
void pack_conv3x3(const float* kernel_hwio, int in_channels, int out_channels, float* packed, int threads);
void unpack_conv3x3(const float* packed, int in_channels, int out_channels, float* kernel_hwio, int threads);
// Winograd F(4x4, 3x3): U = G g G^T per channel pair (winograd.cpp has the layout).
std::size_t packed_winograd_size(int in_channels, int out_channels);
void pack_winograd_f4x4(const float* kernel_hwio, int in_channels, int out_channels, float* packed, int threads);
// The inverse transform: the kernel up to U's rounding (~1e-7 relative; see KernelCorrection).
void unpack_winograd_f4x4(const float* packed, int in_channels, int out_channels, float* kernel_hwio, int threads);
std::size_t packed_dense_size(int depth, int cols);
void pack_dense_rows(const float* kernel_rows, int first_row, int row_count, int depth, int cols, float* packed,
                     int threads);
void unpack_dense(const float* packed, int depth, int cols, float* kernel, int threads);

// The fp32 methods every fp32 kernel set shares, but for the run function.
Conv3x3Method fp32_direct_method(decltype(Conv3x3Method::run) run);
Conv3x3Method fp32_winograd_method(decltype(Conv3x3Method::run) run, decltype(Conv3x3Method::run_batch) run_batch,
                                   decltype(Conv3x3Method::run_batch_max_pool) run_batch_max_pool);
DenseMethod fp32_dense_method(decltype(DenseMethod::run) run);

// What turns an approximate copy of a kernel into the exact one: per weight, how many float
// steps (ulps) to move, and the exact value where that does not fit in a byte. For a layer
// that runs by Winograd this (one byte a weight) replaces a second float copy of the kernel,
// and get_weights still returns the loaded weights bit for bit.
struct KernelCorrection {
  std::vector<std::int8_t> ulps;
  std::vector<std::uint32_t> exact_index;
  std::vector<float> exact_value;
  FASTVGG_PER_ISA std::size_t bytes() const {  // per_isa.h: kept apart per ISA object
    return ulps.size() + exact_index.size() * sizeof(std::uint32_t) + exact_value.size() * sizeof(float);
  }
};
KernelCorrection correction_to(const float* exact, const float* approximate, std::size_t count, int threads);
void apply_correction(const KernelCorrection& correction, float* approximate, std::size_t count, int threads);

}  // namespace fastvgg
