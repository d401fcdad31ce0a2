// Dense layers: y[rows][units] = activation(x[rows][depth] * W[depth][units] + bias).
//
// Two paths. A batch runs the tiled GEMM of gemm.cuh (each weight read once per 64 rows).
// A batch of at most kGemvMaxRows rows is bandwidth-bound (fc1 is 411 MB for 25088 x 4096
// multiply-adds a row), so it streams W once with every thread on its own column (coalesced:
// W is row-major, units contiguous) over one slice of the depth; the slices' partial sums go to
// a workspace and a second kernel adds them in a fixed order, so the result is deterministic
// (no atomics) and independent of the GPU's block scheduling.
#pragma once

#include "gemm.cuh"

namespace fastvgg::cuda {

struct DenseProblem {
  const float* input;    // [rows][depth]
  const float* weights;  // [depth][units]
  const float* bias;     // [units]
  float* output;         // [rows][units]
  float* preactivation;  // optional: x*W + bias before the activation
  int rows, depth, units;
  int activation;        // ActivationCode (softmax runs after, in softmax.cuh, as linear here)
};

struct DenseRows {
  const float* input;
  int depth;
  struct Row {
    const float* values;
  };
  __device__ __forceinline__ Row row(long long m) const { return {input + m * depth}; }
  __device__ __forceinline__ float load(const Row& r, int k) const { return r.values[k]; }
};

__global__ void __launch_bounds__(kGemmThreads) dense_gemm_kernel(DenseProblem p) {
  const long long row0 = static_cast<long long>(blockIdx.x) * kGemmTileRows;
  const int col0 = int(blockIdx.y) * kGemmTileCols;
  float acc[4][4];
  gemm_tile(DenseRows{p.input, p.depth}, p.weights, p.rows, p.units, p.depth, row0, col0, acc);
  for (int i = 0; i < 4; ++i) {
    const long long m = row0 + gemm_row_group() * 4 + i;
    if (m >= p.rows) break;
    for (int j = 0; j < 4; ++j) {
      const int c = col0 + gemm_col_lane() + 16 * j;
      if (c >= p.units) continue;
      const float v = acc[i][j] + p.bias[c];
      if (p.preactivation) p.preactivation[m * p.units + c] = v;
      p.output[m * p.units + c] = activate(v, p.activation);
    }
  }
}

inline LaunchGeometry dense_gemm_geometry(const DenseProblem& p) { return gemm_geometry(p.rows, p.units); }

// The bandwidth-bound path.
constexpr int kGemvMaxRows = 4;
constexpr int kGemvThreads = 256;
constexpr int kGemvSlice = 256;  // depth per block: fc1 gives 98 slices x 16 column blocks

__host__ __device__ inline int gemv_slices(const DenseProblem& p) { return int(blocks_for(p.depth, kGemvSlice)); }
inline std::size_t gemv_workspace_floats(const DenseProblem& p) {
  return std::size_t(gemv_slices(p)) * p.rows * p.units;
}

// partial[slice][row][unit] = sum over the slice's depth of x[row][d] * W[d][unit].
__global__ void __launch_bounds__(kGemvThreads) dense_gemv_partial_kernel(DenseProblem p, float* partial) {
  __shared__ float x_slice[kGemvMaxRows][kGemvSlice];
  const int tid = int(threadIdx.x);
  const int slice = int(blockIdx.y);
  const int d0 = slice * kGemvSlice;
  const int length = p.depth - d0 < kGemvSlice ? p.depth - d0 : kGemvSlice;
  for (int r = 0; r < p.rows; ++r)
    for (int d = tid; d < kGemvSlice; d += kGemvThreads)
      x_slice[r][d] = d < length ? p.input[static_cast<long long>(r) * p.depth + d0 + d] : 0.0f;
  __syncthreads();  // the slice of x is shared by all columns
  const int unit = int(blockIdx.x) * kGemvThreads + tid;
  if (unit >= p.units) return;
  float acc[kGemvMaxRows] = {0.0f, 0.0f, 0.0f, 0.0f};
  const float* w = p.weights + static_cast<long long>(d0) * p.units + unit;
  for (int d = 0; d < length; ++d) {
    const float weight = __ldg(w + static_cast<long long>(d) * p.units);
    for (int r = 0; r < kGemvMaxRows; ++r)
      if (r < p.rows) acc[r] = fmaf(x_slice[r][d], weight, acc[r]);
  }
  for (int r = 0; r < p.rows; ++r)
    partial[(static_cast<long long>(slice) * p.rows + r) * p.units + unit] = acc[r];
}

// y = activation(bias + the slices' partial sums, added in slice order).
__global__ void __launch_bounds__(kGemvThreads) dense_gemv_finish_kernel(DenseProblem p, const float* partial) {
  const long long index = static_cast<long long>(blockIdx.x) * kGemvThreads + threadIdx.x;
  const long long total = static_cast<long long>(p.rows) * p.units;
  if (index >= total) return;
  const int slices = gemv_slices(p);
  float sum = 0.0f;
  for (int s = 0; s < slices; ++s) sum += partial[static_cast<long long>(s) * total + index];
  const float v = sum + p.bias[index % p.units];
  if (p.preactivation) p.preactivation[index] = v;
  p.output[index] = activate(v, p.activation);
}

inline LaunchGeometry dense_gemv_partial_geometry(const DenseProblem& p) {
  return {dim3(blocks_for(p.units, kGemvThreads), unsigned(gemv_slices(p)), 1), dim3(kGemvThreads, 1, 1)};
}
inline LaunchGeometry dense_gemv_finish_geometry(const DenseProblem& p) {
  return {dim3(blocks_for(static_cast<long long>(p.rows) * p.units, kGemvThreads), 1, 1), dim3(kGemvThreads, 1, 1)};
}

}  // namespace fastvgg::cuda
