// Pooling on NHWC tensors: 2x2 max-pool (stride 2, a trailing odd row/column dropped, as
// Keras does) where it cannot be fused into the convolution; the 2x2 pools fine-tuned heads
// add (average 'valid' and 'same', max 'same'); global average/max pooling. All keep NaN
// (max_keep_nan; a sum with a NaN is NaN), as the CPU kernels do.
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

// 2x2, stride-2 pooling as Keras's AveragePooling2D ('valid', 'same') and MaxPooling2D ('same')
// compute it (VGG's own 'valid' max pool is max_pool2x2_kernel above). 'same' pooling of an
// odd size adds one output whose window hangs over the far edge: TensorFlow pads only there,
// and max ignores the padding while average divides by the pixels that exist. So a window
// reads only the pixels it has: with one row (column), the same row (column) stands in for
// the missing one, which max does not notice and average does not count.
struct Pool2x2Problem {
  const float* input;  // [images][height][width][channels]
  float* output;       // [images][out_height][out_width][channels]
  int images, height, width, channels;
  int out_height, out_width;  // height / 2 ('valid') or (height + 1) / 2 ('same'); likewise the width
  int mode;                   // GlobalPoolCode
};

__host__ __device__ inline long long window_pool_outputs(const Pool2x2Problem& p) {
  return static_cast<long long>(p.images) * p.out_height * p.out_width * p.channels;
}

// One thread per output element; consecutive threads take consecutive channels (coalesced).
// The average adds in csrc/pool2x2.cpp's order (top left, top right, bottom left, bottom
// right) and multiplies by 1, 1/2 or 1/4, which is exact: the CPU kernels' bits, and Keras's
// division. The max of the window is exact.
__global__ void __launch_bounds__(kPoolThreads) window_pool_kernel(Pool2x2Problem p) {
  const long long index = static_cast<long long>(blockIdx.x) * kPoolThreads + threadIdx.x;
  if (index >= window_pool_outputs(p)) return;
  const int c = int(index % p.channels);
  long long rest = index / p.channels;
  const int x = int(rest % p.out_width);
  rest /= p.out_width;
  const int y = int(rest % p.out_height);
  const long long n = rest / p.out_height;
  const int rows = p.height - 2 * y < 2 ? 1 : 2, cols = p.width - 2 * x < 2 ? 1 : 2;
  const float* top = p.input + ((n * p.height + 2 * y) * p.width + 2 * x) * p.channels + c;
  const float* bottom = top + static_cast<long long>(rows - 1) * p.width * p.channels;  // top again with one row
  const int right = (cols - 1) * p.channels;  // the same pixel with one column
  float result;
  if (p.mode == kGlobalAverage) {
    float sum = top[0];
    if (cols == 2) sum += top[right];
    if (rows == 2) {
      sum += bottom[0];
      if (cols == 2) sum += bottom[right];
    }
    result = sum * (1.0f / float(rows * cols));
  } else {
    result = max_keep_nan(max_keep_nan(top[0], top[right]), max_keep_nan(bottom[0], bottom[right]));
  }
  p.output[index] = result;
}

inline LaunchGeometry window_pool_geometry(const Pool2x2Problem& p) {
  return {dim3(blocks_for(window_pool_outputs(p), kPoolThreads), 1, 1), dim3(kPoolThreads, 1, 1)};
}

}  // namespace fastvgg::cuda
