// Layout conversion: a batched 2-D transpose, [batch][rows][cols] -> [batch][cols][rows].
// NCHW -> NHWC is rows = C, cols = H*W; NHWC -> NCHW is rows = H*W, cols = C. A 32x32 tile
// goes through shared memory so that both the reads and the writes are coalesced; the +1
// column keeps the column reads free of bank conflicts.
#pragma once

#include "common.cuh"

namespace fastvgg::cuda {

constexpr int kTransposeTile = 32;
constexpr int kTransposeRowsPerPass = 8;

struct TransposeProblem {
  const float* input;
  float* output;
  int batch, rows, cols;
};

__global__ void __launch_bounds__(kTransposeTile* kTransposeRowsPerPass) transpose_kernel(TransposeProblem p) {
  __shared__ float tile[kTransposeTile][kTransposeTile + 1];
  const long long plane = static_cast<long long>(p.rows) * p.cols;
  const float* in = p.input + blockIdx.z * plane;
  float* out = p.output + blockIdx.z * plane;
  const int col0 = int(blockIdx.x) * kTransposeTile, row0 = int(blockIdx.y) * kTransposeTile;
  const int tx = int(threadIdx.x), ty = int(threadIdx.y);
  for (int r = ty; r < kTransposeTile; r += kTransposeRowsPerPass) {
    const int row = row0 + r, col = col0 + tx;
    if (row < p.rows && col < p.cols) tile[r][tx] = in[static_cast<long long>(row) * p.cols + col];
  }
  __syncthreads();  // the tile is read transposed, by other threads than wrote it
  for (int c = ty; c < kTransposeTile; c += kTransposeRowsPerPass) {
    const int col = col0 + c, row = row0 + tx;
    if (row < p.rows && col < p.cols) out[static_cast<long long>(col) * p.rows + row] = tile[tx][c];
  }
}

inline LaunchGeometry transpose_geometry(const TransposeProblem& p) {
  return {dim3(blocks_for(p.cols, kTransposeTile), blocks_for(p.rows, kTransposeTile), unsigned(p.batch)),
          dim3(kTransposeTile, kTransposeRowsPerPass, 1)};
}

}  // namespace fastvgg::cuda
