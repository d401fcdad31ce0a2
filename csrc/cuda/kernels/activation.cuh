// Keras's element-wise activations (sigmoid, tanh, elu, selu, gelu, swish, softplus, leaky
// relu, clipped relu, softsign, exponential, mish, the hard sigmoids and hard silu, and relu on
// its own) as one pass over a tensor: an `Activation` layer, or a convolution's or dense
// layer's activation that its GEMM epilogue does not apply.
//
// Why a pass of its own rather than the epilogue: these activations occur in fine-tuned heads,
// on tensors a thousand times smaller than VGG's, where one more read and write costs little;
// in the epilogue, each would add its libm code to the unrolled 4x4 loop that keeps the GEMM's
// accumulators in registers (tests/test_cuda_build.py holds every kernel to no spills and no
// stack). A pass also gives a requested pre-activation output for free: the executor copies
// the linear result out before the pass runs in place. The values are the same either way:
// the epilogue would apply the same function to the same rounded float.
//
// The formulas are csrc/activation.cpp's, operation for operation (so the emulator, which
// calls the same C library functions, gives the CPU kernels' bits): expm1f for elu and selu,
// erfcf for gelu (Keras's exact form, without 1 + erf's cancellation for negative x) and a
// max-split softplus that never overflows. On a GPU the CUDA math library's functions are
// within 1 to 4 ulp of exact (CUDA C Programming Guide, "Mathematical Functions"); nothing
// here is compiled with fast-math. NaN stays NaN.
#pragma once

#include <cmath>  // INFINITY

#include "common.cuh"

namespace fastvgg::cuda {

// Keras's selu constants (Klambauer et al. 2017), products rounded once as csrc/activation.cpp does.
constexpr float kSeluScale = float(1.0507009873554804934193349852946);
constexpr float kSeluScaleAlpha = float(1.0507009873554804934193349852946 * 1.6732632423543772848170429916717);
constexpr float kSqrtHalf = float(0.70710678118654752440084436210485);

// The numbers of the activations that take some (csrc/kernels.h's ActivationParams).
struct ActivationNumbers {
  float negative_slope = 0.0f;  // kLeakyRelu's and kClippedRelu's
  float max_value = INFINITY;   // kClippedRelu's cap; infinity: none
  float threshold = 0.0f;       // kClippedRelu's
};

// Keras's ReLU(negative_slope, max_value, threshold), step by step as csrc/activation.cpp's
// clipped_relu: x above the threshold (clipped to [0, max_value] if capped), at or below it
// 0 - negative_slope * (threshold - x), the product rounded once.
__device__ __forceinline__ float clipped_relu(float x, const ActivationNumbers& p) {
  if (x != x) return x;  // NaN stays NaN
  float passed = x > p.threshold ? x : 0.0f;
  if (p.max_value < INFINITY) passed = passed < 0.0f ? 0.0f : (passed > p.max_value ? p.max_value : passed);
  if (p.negative_slope == 0.0f || x > p.threshold) return passed;
  return passed - p.negative_slope * (p.threshold - x);
}

__device__ __forceinline__ float softplus(float x) { return (x < 0.0f ? 0.0f : x) + log1pf(expf(-fabsf(x))); }

// Keras 3's relu6(x + 3) / 6 in its float32 steps (NaN stays NaN).
__device__ __forceinline__ float hard_sigmoid(float x) {
  const float shifted = x + 3.0f;
  return (shifted < 0.0f ? 0.0f : shifted > 6.0f ? 6.0f : shifted) / 6.0f;
}

// tf.keras's clip(x * 0.2 + 0.5, 0, 1): __fmul_rn keeps the product from being fused with the
// sum (nvcc contracts a * b + c into one fma by default; TensorFlow rounds twice).
__device__ __forceinline__ float hard_sigmoid_keras2(float x) {
  const float y = __fmul_rn(x, 0.2f) + 0.5f;
  return y < 0.0f ? 0.0f : y > 1.0f ? 1.0f : y;
}

// numbers: kLeakyRelu's and kClippedRelu's; the other activations ignore them.
__device__ __forceinline__ float keras_activation(float x, int activation, const ActivationNumbers& numbers) {
  switch (activation) {
    case kRelu: return x < 0.0f ? 0.0f : x;  // keeps NaN
    case kSigmoid: return 1.0f / (1.0f + expf(-x));
    case kTanh: return tanhf(x);
    case kElu: return x > 0.0f ? x : expm1f(x);
    case kSelu: return x > 0.0f ? kSeluScale * x : kSeluScaleAlpha * expm1f(x);
    case kGelu: return 0.5f * x * erfcf(-x * kSqrtHalf);
    case kSwish: return x / (1.0f + expf(-x));
    case kSoftplus: return softplus(x);
    case kLeakyRelu: return x < 0.0f ? numbers.negative_slope * x : x;  // one rounded product; keeps NaN
    case kClippedRelu: return clipped_relu(x, numbers);
    case kSoftsign: return x / (1.0f + fabsf(x));
    case kExponential: return expf(x);
    case kMish: return x * tanhf(softplus(x));
    case kHardSigmoid: return hard_sigmoid(x);
    case kHardSigmoidKeras2: return hard_sigmoid_keras2(x);
    case kHardSilu: return x * hard_sigmoid(x);
    default: return x;  // kLinear; softmax is not element-wise (softmax.cuh)
  }
}

constexpr int kElementwiseThreads = 256;
// Enough blocks to fill any GPU several times over; larger tensors loop (grid-stride), so the
// grid never nears CUDA's 2^31 - 1 limit on gridDim.x.
constexpr long long kMaxElementwiseBlocks = 1 << 16;

// max_blocks: the tests lower it so that the grid-stride loops run on small tensors too.
inline LaunchGeometry elementwise_geometry(long long count, long long max_blocks = kMaxElementwiseBlocks) {
  const long long blocks = (count + kElementwiseThreads - 1) / kElementwiseThreads;
  const long long limit = max_blocks > 0 && max_blocks < kMaxElementwiseBlocks ? max_blocks : kMaxElementwiseBlocks;
  return {dim3(unsigned(blocks < limit ? (blocks > 0 ? blocks : 1) : limit), 1, 1), dim3(kElementwiseThreads, 1, 1)};
}

struct ActivationProblem {
  const float* input;  // [count]; may be `output` itself (in place)
  float* output;       // [count]
  long long count;
  int activation;      // ActivationCode other than kSoftmax
  ActivationNumbers numbers = {};  // kLeakyRelu's and kClippedRelu's
};

// Consecutive threads take consecutive elements (coalesced).
__global__ void __launch_bounds__(kElementwiseThreads) activation_kernel(ActivationProblem p) {
  const long long stride = static_cast<long long>(gridDim.x) * kElementwiseThreads;
  for (long long i = static_cast<long long>(blockIdx.x) * kElementwiseThreads + threadIdx.x; i < p.count; i += stride)
    p.output[i] = keras_activation(p.input[i], p.activation, p.numbers);
}

inline LaunchGeometry activation_geometry(const ActivationProblem& p, long long max_blocks = kMaxElementwiseBlocks) {
  return elementwise_geometry(p.count, max_blocks);
}

}  // namespace fastvgg::cuda
