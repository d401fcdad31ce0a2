// Keras's UpSampling2D with interpolation="nearest" on NHWC images: output pixel (y, x) is
// input pixel (y / size_height, x / size_width). Copies only, so the CPU kernels' bits
// (csrc/upsample.cpp).
#pragma once

#include "activation.cuh"  // the element-wise launch geometry

namespace fastvgg::cuda {

struct UpsampleProblem {
  const float* input;  // [images][height][width][channels]
  float* output;       // [images][height * size_height][width * size_width][channels]
  int images, height, width, channels;
  int size_height, size_width;
};

__host__ __device__ inline long long upsample_outputs(const UpsampleProblem& p) {
  return static_cast<long long>(p.images) * p.height * p.size_height * p.width * p.size_width * p.channels;
}

// Grid-stride over the outputs (coalesced writes; each thread finds its source by division).
__global__ void __launch_bounds__(kElementwiseThreads) upsample_kernel(UpsampleProblem p) {
  const long long count = upsample_outputs(p), stride = static_cast<long long>(gridDim.x) * kElementwiseThreads;
  const int out_width = p.width * p.size_width, out_height = p.height * p.size_height;
  for (long long i = static_cast<long long>(blockIdx.x) * kElementwiseThreads + threadIdx.x; i < count; i += stride) {
    const int c = int(i % p.channels);
    const long long pixel = i / p.channels;
    const int x = int(pixel % out_width);
    const long long rows = pixel / out_width;
    const int y = int(rows % out_height);
    const long long n = rows / out_height;
    p.output[i] = p.input[((n * p.height + y / p.size_height) * p.width + x / p.size_width) * p.channels + c];
  }
}

inline LaunchGeometry upsample_geometry(const UpsampleProblem& p, long long max_blocks = kMaxElementwiseBlocks) {
  return elementwise_geometry(upsample_outputs(p), max_blocks);
}

}  // namespace fastvgg::cuda
