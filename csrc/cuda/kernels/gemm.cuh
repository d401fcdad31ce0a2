// The tiled fp32 GEMM core shared by the 3x3 convolution (an implicit GEMM: rows are output
// pixels, depth is 3x3xC_in read straight from the NHWC input) and the batched dense layer.
//
// A block of 256 threads computes a 64 x 64 tile of C = A * B, stepping through the depth
// 16 at a time: each step stages a 64 x 16 slice of A and a 16 x 64 slice of B in shared
// memory, then every thread accumulates a 4 x 4 sub-tile with fmaf (explicit, so nvcc and the
// emulator round identically). A thread's 4 rows are 4 consecutive rows of the tile, which
// lets the convolution put one 2x2 pooling window into one thread's registers.
#pragma once

#include "common.cuh"

namespace fastvgg::cuda {

constexpr int kGemmTileRows = 64;
constexpr int kGemmTileCols = 64;
constexpr int kGemmTileDepth = 16;
constexpr int kGemmThreads = 256;
// Each thread loads this many A and B elements per depth step (64*16 / 256).
constexpr int kGemmLoadsPerThread = kGemmTileRows * kGemmTileDepth / kGemmThreads;
static_assert(kGemmTileCols * kGemmTileDepth / kGemmThreads == kGemmLoadsPerThread, "A and B tiles differ");

// Threads are (16 row groups) x (16 column lanes); a lane's 4 columns are 16 apart so that a
// warp's stores of one row are contiguous in memory.
__device__ __forceinline__ int gemm_row_group() { return int(threadIdx.x) / 16; }
__device__ __forceinline__ int gemm_col_lane() { return int(threadIdx.x) % 16; }

// Operand A provides: `struct Row`, `Row row(long long m) const` (decoded once per block) and
// `float load(const Row&, int k) const` (0 outside the matrix). B is row-major depth x cols.
template <class OperandA>
__device__ __forceinline__ void gemm_tile(const OperandA& a, const float* __restrict__ b, long long rows, int cols,
                                          int depth, long long row0, int col0, float (&acc)[4][4]) {
  // +4 keeps the rows of the A tile 16-byte aligned and spreads the stores over the banks.
  __shared__ float a_tile[kGemmTileDepth][kGemmTileRows + 4];
  __shared__ float b_tile[kGemmTileDepth][kGemmTileCols];

  const int tid = int(threadIdx.x);
  // A loads: this thread always fills depth slot tid % 16 of rows tid/16 + 16*i.
  const int a_depth = tid % kGemmTileDepth;
  typename OperandA::Row a_rows[kGemmLoadsPerThread];
  bool a_row_valid[kGemmLoadsPerThread];
  for (int i = 0; i < kGemmLoadsPerThread; ++i) {
    const long long m = row0 + tid / kGemmTileDepth + 16 * i;
    a_row_valid[i] = m < rows;
    a_rows[i] = a.row(a_row_valid[i] ? m : 0);
  }
  // B loads: column tid % 64 of depth slots tid/64 + 4*i.
  const int b_col = tid % kGemmTileCols;
  const bool b_col_valid = col0 + b_col < cols;

  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

  const int row_group = gemm_row_group(), col_lane = gemm_col_lane();
  for (int k0 = 0; k0 < depth; k0 += kGemmTileDepth) {
    const int k = k0 + a_depth;
    for (int i = 0; i < kGemmLoadsPerThread; ++i)
      a_tile[a_depth][tid / kGemmTileDepth + 16 * i] = (a_row_valid[i] && k < depth) ? a.load(a_rows[i], k) : 0.0f;
    for (int i = 0; i < kGemmLoadsPerThread; ++i) {
      const int kb = k0 + tid / kGemmTileCols + 4 * i;
      b_tile[tid / kGemmTileCols + 4 * i][b_col] =
          (b_col_valid && kb < depth) ? b[static_cast<long long>(kb) * cols + col0 + b_col] : 0.0f;
    }
    __syncthreads();  // tiles staged: every thread reads what others wrote
    for (int kk = 0; kk < kGemmTileDepth; ++kk) {
      float a_values[4], b_values[4];
      for (int i = 0; i < 4; ++i) a_values[i] = a_tile[kk][row_group * 4 + i];
      for (int j = 0; j < 4; ++j) b_values[j] = b_tile[kk][col_lane + 16 * j];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a_values[i], b_values[j], acc[i][j]);
    }
    __syncthreads();  // tiles consumed: the next step may overwrite them
  }
}

inline LaunchGeometry gemm_geometry(long long rows, int cols) {
  // Row tiles on x (up to 2^31-1 blocks), column tiles on y (at most 65535: 4M columns).
  return {dim3(blocks_for(rows, kGemmTileRows), blocks_for(cols, kGemmTileCols), 1), dim3(kGemmThreads, 1, 1)};
}

}  // namespace fastvgg::cuda
