// The row-wise ops of the flat part, in place, one block a row: softmax, max-subtracted so large
// logits do not overflow, and L2 normalization (Keras's UnitNormalization). Their maxima and sums
// are tree reductions in shared memory (no warp intrinsics, so the CPU emulator runs the same
// text).
#pragma once

#include "common.cuh"

namespace fastvgg::cuda {

constexpr int kSoftmaxThreads = 256;

struct SoftmaxProblem {
  float* values;  // [rows][cols], overwritten
  int rows, cols;
};

__device__ __forceinline__ float block_reduce(float* scratch, float value, bool take_max) {
  const int tid = int(threadIdx.x);
  scratch[tid] = value;
  __syncthreads();
  for (int stride = kSoftmaxThreads / 2; stride > 0; stride /= 2) {
    if (tid < stride)
      scratch[tid] = take_max ? max_keep_nan(scratch[tid], scratch[tid + stride]) : scratch[tid] + scratch[tid + stride];
    __syncthreads();
  }
  const float result = scratch[0];
  __syncthreads();  // everyone has read scratch[0] before it is reused
  return result;
}

__global__ void __launch_bounds__(kSoftmaxThreads) softmax_kernel(SoftmaxProblem p) {
  __shared__ float scratch[kSoftmaxThreads];
  float* row = p.values + static_cast<long long>(blockIdx.x) * p.cols;
  float local_max = -INFINITY;
  for (int i = int(threadIdx.x); i < p.cols; i += kSoftmaxThreads) local_max = max_keep_nan(local_max, row[i]);
  const float row_max = block_reduce(scratch, local_max, true);
  float local_sum = 0.0f;
  for (int i = int(threadIdx.x); i < p.cols; i += kSoftmaxThreads) {
    const float e = expf(row[i] - row_max);
    row[i] = e;
    local_sum += e;
  }
  const float scale = 1.0f / block_reduce(scratch, local_sum, false);
  for (int i = int(threadIdx.x); i < p.cols; i += kSoftmaxThreads) row[i] *= scale;
}

inline LaunchGeometry softmax_geometry(const SoftmaxProblem& p) {
  return {dim3(unsigned(p.rows), 1, 1), dim3(kSoftmaxThreads, 1, 1)};
}

struct L2NormalizeProblem {
  float* values;  // [rows][cols], overwritten
  int rows, cols;
  float max_inverse_norm;  // the cap on 1 / ||row|| that keeps a zero row zero
};

__global__ void __launch_bounds__(kSoftmaxThreads) l2_normalize_kernel(L2NormalizeProblem p) {
  __shared__ float scratch[kSoftmaxThreads];
  float* row = p.values + static_cast<long long>(blockIdx.x) * p.cols;
  float local = 0.0f;
  for (int i = int(threadIdx.x); i < p.cols; i += kSoftmaxThreads) local += row[i] * row[i];
  const float squares = block_reduce(scratch, local, false);
  // 1/sqrt(0) is +inf, which the cap makes finite; NaN (a NaN in the row) stays NaN, as in Keras.
  const float inverse = 1.0f / sqrtf(squares);
  const float scale = inverse < p.max_inverse_norm || inverse != inverse ? inverse : p.max_inverse_norm;
  for (int i = int(threadIdx.x); i < p.cols; i += kSoftmaxThreads) row[i] *= scale;
}

inline LaunchGeometry l2_normalize_geometry(const L2NormalizeProblem& p) {
  return {dim3(unsigned(p.rows), 1, 1), dim3(kSoftmaxThreads, 1, 1)};
}

}  // namespace fastvgg::cuda
