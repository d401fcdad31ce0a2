// What every CUDA kernel header shares: the compiler switch between nvcc and the CPU grid
// emulator (csrc/cuda/emulator.h), activations, a NaN-keeping max, and the launch geometry type.
//
// The kernel headers hold only __global__/__device__ code and each op's launch geometry; the
// host side (memory, streams, launches) lives in csrc/cuda/executor.cu.
#pragma once

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#else
#include "../emulator.h"
#endif

#include <cstddef>
#include <cstdint>

namespace fastvgg::cuda {

// Keras's activations, numbered as csrc/graph.h's Activation (and OpSpec::activation). The GEMM
// epilogues (conv3x3.cuh, dense.cuh) apply only kLinear and kRelu; softmax and l2_normalize run
// on flat rows (softmax.cuh) and the others as an element-wise pass (activation.cuh).
enum ActivationCode : int {
  kLinear = 0,
  kRelu = 1,
  kSoftmax = 2,
  kSigmoid = 3,
  kTanh = 4,
  kElu = 5,
  kSelu = 6,
  kGelu = 7,
  kSwish = 8,
  kSoftplus = 9,
  kLeakyRelu = 10,  // x < 0 ? negative_slope * x : x, the op's slope (activation.cuh)
  kL2Normalize = 11,  // UnitNormalization: row * min(1 / ||row||, the op's max_inverse_norm) (softmax.cuh)
  kClippedRelu = 12,  // Keras's ReLU with a max_value or threshold, the op's numbers (activation.cuh)
  kSoftsign = 13,
  kExponential = 14,
  kMish = 15,
  kHardSigmoid = 16,        // Keras 3's relu6(x + 3) / 6
  kHardSigmoidKeras2 = 17,  // tf.keras's clip(0.2 x + 0.5, 0, 1)
  kHardSilu = 18,           // Keras 3's x * hard_sigmoid(x)
};
constexpr int kActivationCount = 19;

// The epilogues' activation: ReLU that keeps NaN (x < 0 is false for NaN), as the CPU kernels
// do, or the identity.
__device__ __forceinline__ float activate(float v, int activation) {
  return activation == kRelu ? (v < 0.0f ? 0.0f : v) : v;
}

// max that returns NaN when either side is NaN (fmaxf would drop it), like the CPU pools.
__device__ __forceinline__ float max_keep_nan(float a, float b) { return (a > b || a != a) ? a : b; }

struct LaunchGeometry {
  dim3 grid;
  dim3 block;
};

__host__ __device__ inline unsigned blocks_for(long long count, int per_block) {
  return static_cast<unsigned>((count + per_block - 1) / per_block);
}

}  // namespace fastvgg::cuda
