// 3x3 convolution (stride 1, 'same' or 'valid') + bias + activation, with an optional 2x2
// max-pool fused into the epilogue, as an implicit GEMM over the NHWC input (gemm.cuh).
//
// Unpooled, GEMM row m is output pixel m (image-major, then y, then x). Pooled, rows come in
// fours, one 2x2 window each (row 4g+q is pixel (2py + q/2, 2px + q%2) of pooled pixel g), and
// a thread's 4 rows are one window: the max is taken in registers and only the pooled tensor
// is written. Bias and ReLU are monotone, so max-then-activate equals Keras's
// activate-then-max bit for bit; a trailing odd row or column is dropped as Keras's pool does.
#pragma once

#include "gemm.cuh"

namespace fastvgg::cuda {

struct Conv3x3Problem {
  const float* input;     // [images][in_height][in_width][in_channels]
  const float* kernel;    // [3][3][in_channels][out_channels] (HWIO, as Keras stores it)
  const float* bias;      // [out_channels]
  float* output;          // [images][out_height][out_width][out_channels], or the pooled size
  float* preactivation;   // optional (unpooled only): conv + bias before the activation
  int images, in_height, in_width, in_channels, out_channels;
  int padding;            // 1: 'same', 0: 'valid'
  int out_height, out_width;  // of the convolution, before any pooling
  int activation;         // ActivationCode
  int pool;               // 1: 2x2 max-pool fused; output is floor(out/2) per side
};

__host__ __device__ inline long long conv3x3_gemm_rows(const Conv3x3Problem& p) {
  if (p.pool) return 4LL * p.images * (p.out_height / 2) * (p.out_width / 2);
  return static_cast<long long>(p.images) * p.out_height * p.out_width;
}

// Operand A of the implicit GEMM: im2col done on the fly, zero outside the image.
struct Conv3x3Rows {
  Conv3x3Problem p;
  struct Row {
    long long image_offset;  // element offset of the image in the input
    int y, x;                // top-left input pixel of the 3x3 window (may be -1)
  };
  __device__ __forceinline__ Row row(long long m) const {
    int n, y, x;
    if (p.pool) {
      const int pooled_w = p.out_width / 2, pooled_h = p.out_height / 2;
      const long long window = m / 4;
      const int q = int(m % 4);
      const int px = int(window % pooled_w);
      const long long rest = window / pooled_w;
      y = int(rest % pooled_h) * 2 + q / 2;
      x = px * 2 + q % 2;
      n = int(rest / pooled_h);
    } else {
      x = int(m % p.out_width);
      const long long rest = m / p.out_width;
      y = int(rest % p.out_height);
      n = int(rest / p.out_height);
    }
    return {static_cast<long long>(n) * p.in_height * p.in_width * p.in_channels, y - p.padding, x - p.padding};
  }
  __device__ __forceinline__ float load(const Row& r, int k) const {
    const int tap = k / p.in_channels, channel = k % p.in_channels;
    const int iy = r.y + tap / 3, ix = r.x + tap % 3;
    if (iy < 0 || iy >= p.in_height || ix < 0 || ix >= p.in_width) return 0.0f;
    return p.input[r.image_offset + (static_cast<long long>(iy) * p.in_width + ix) * p.in_channels + channel];
  }
};

__global__ void __launch_bounds__(kGemmThreads) conv3x3_kernel(Conv3x3Problem p) {
  const long long rows = conv3x3_gemm_rows(p);
  const long long row0 = static_cast<long long>(blockIdx.x) * kGemmTileRows;
  const int col0 = int(blockIdx.y) * kGemmTileCols;
  float acc[4][4];
  gemm_tile(Conv3x3Rows{p}, p.kernel, rows, p.out_channels, 9 * p.in_channels, row0, col0, acc);

  const long long first_row = row0 + gemm_row_group() * 4;
  for (int j = 0; j < 4; ++j) {
    const int c = col0 + gemm_col_lane() + 16 * j;
    if (c >= p.out_channels) continue;
    const float bias = p.bias[c];
    if (p.pool) {
      if (first_row >= rows) continue;  // rows come in whole windows
      const float window_max = max_keep_nan(max_keep_nan(acc[0][j], acc[1][j]), max_keep_nan(acc[2][j], acc[3][j]));
      p.output[(first_row / 4) * p.out_channels + c] = activate(window_max + bias, p.activation);
    } else {
      for (int i = 0; i < 4; ++i) {
        const long long m = first_row + i;
        if (m >= rows) break;
        const float v = acc[i][j] + bias;
        if (p.preactivation) p.preactivation[m * p.out_channels + c] = v;
        p.output[m * p.out_channels + c] = activate(v, p.activation);
      }
    }
  }
}

inline LaunchGeometry conv3x3_geometry(const Conv3x3Problem& p) {
  return gemm_geometry(conv3x3_gemm_rows(p), p.out_channels);
}

}  // namespace fastvgg::cuda
