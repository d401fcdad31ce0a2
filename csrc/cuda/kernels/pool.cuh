// Pooling on NHWC tensors: 2x2 max-pool (stride 2, a trailing odd row/column dropped, as
// Keras does) where it cannot be fused into the convolution, and global average/max pooling.
// Both keep NaN (max_keep_nan), as the CPU kernels do.
#pragma once

#include "common.cuh"

namespace fastvgg::cuda {

constexpr int kPoolThreads = 256;

struct MaxPool2x2Problem {
  const float* input;  // [images][height][width][channels]
  float* output;       // [images][height/2][width/2][channels]
  int images, height, width, channels;
};

__host__ __device__ inline long long max_pool2x2_outputs(const MaxPool2x2Problem& p) {
  return static_cast<long long>(p.images) * (p.height / 2) * (p.width / 2) * p.channels;
}

// One thread per output element; consecutive threads take consecutive channels (coalesced).
__global__ void __launch_bounds__(kPoolThreads) max_pool2x2_kernel(MaxPool2x2Problem p) {
  const long long index = static_cast<long long>(blockIdx.x) * kPoolThreads + threadIdx.x;
  if (index >= max_pool2x2_outputs(p)) return;
  const int out_w = p.width / 2, out_h = p.height / 2;
  const int c = int(index % p.channels);
  long long rest = index / p.channels;
  const int x = int(rest % out_w);
  rest /= out_w;
  const int y = int(rest % out_h);
  const long long n = rest / out_h;
  const long long row = static_cast<long long>(p.width) * p.channels;
  const float* top = p.input + ((n * p.height + 2 * y) * p.width + 2 * x) * p.channels + c;
  p.output[index] = max_keep_nan(max_keep_nan(top[0], top[p.channels]), max_keep_nan(top[row], top[row + p.channels]));
}

inline LaunchGeometry max_pool2x2_geometry(const MaxPool2x2Problem& p) {
  return {dim3(blocks_for(max_pool2x2_outputs(p), kPoolThreads), 1, 1), dim3(kPoolThreads, 1, 1)};
}

enum GlobalPoolCode : int { kGlobalAverage = 0, kGlobalMax = 1 };

struct GlobalPoolProblem {
  const float* input;  // [images][height][width][channels]
  float* output;       // [images][channels]
  int images, height, width, channels;
  int mode;            // GlobalPoolCode
};

// A block covers 64 channels of one image; its 4 thread rows take every 4th pixel, and row 0
// combines the 4 partial results in a fixed order.
constexpr int kGlobalPoolChannels = 64;
constexpr int kGlobalPoolParts = 4;

__global__ void __launch_bounds__(kGlobalPoolChannels* kGlobalPoolParts) global_pool_kernel(GlobalPoolProblem p) {
  __shared__ float partial[kGlobalPoolParts][kGlobalPoolChannels];
  const int lane = int(threadIdx.x), part = int(threadIdx.y);
  const int c = int(blockIdx.x) * kGlobalPoolChannels + lane;
  const long long pixels = static_cast<long long>(p.height) * p.width;
  const bool average = p.mode == kGlobalAverage;
  float value = average ? 0.0f : -INFINITY;
  if (c < p.channels) {
    const float* image = p.input + static_cast<long long>(blockIdx.y) * pixels * p.channels + c;
    for (long long i = part; i < pixels; i += kGlobalPoolParts) {
      const float v = image[i * p.channels];
      value = average ? value + v : max_keep_nan(value, v);
    }
  }
  partial[part][lane] = value;
  __syncthreads();  // all four parts written
  if (part != 0 || c >= p.channels) return;
  float result = partial[0][lane];
  for (int i = 1; i < kGlobalPoolParts; ++i)
    result = average ? result + partial[i][lane] : max_keep_nan(result, partial[i][lane]);
  p.output[static_cast<long long>(blockIdx.y) * p.channels + c] = average ? result / float(pixels) : result;
}

inline LaunchGeometry global_pool_geometry(const GlobalPoolProblem& p) {
  return {dim3(blocks_for(p.channels, kGlobalPoolChannels), unsigned(p.images), 1),
          dim3(kGlobalPoolChannels, kGlobalPoolParts, 1)};
}

}  // namespace fastvgg::cuda
