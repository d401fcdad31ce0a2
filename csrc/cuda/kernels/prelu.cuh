// Keras's PReLU, x < 0 ? alpha * x : x, in place: one rounded product, the bits of Keras's
// relu(x) - alpha * relu(-x) and of the CPU kernels (csrc/prelu.cpp). Alpha has one value per
// channel, or per row or column of the image and channel (Keras's PReLU without shared_axes);
// flat rows are 1x1 images of `channels` features.
#pragma once

#include "activation.cuh"  // the element-wise launch geometry

namespace fastvgg::cuda {

struct PReluProblem {
  float* values;       // NHWC [count / (height * width * channels)][height][width][channels], overwritten
  const float* alpha;  // [alpha_height][alpha_width][channels]; an extent of 1 is shared
  long long count;     // values in all
  int height, width, channels;
  int alpha_height, alpha_width;  // 1 or height, 1 or width
};

// Grid-stride over the values (coalesced); each finds its pixel and channel by division: a
// PReLU runs on a head's tensors, small next to VGG's.
__global__ void __launch_bounds__(kElementwiseThreads) prelu_kernel(PReluProblem p) {
  const long long stride = static_cast<long long>(gridDim.x) * kElementwiseThreads;
  const long long pixels = static_cast<long long>(p.height) * p.width;
  for (long long i = static_cast<long long>(blockIdx.x) * kElementwiseThreads + threadIdx.x; i < p.count; i += stride) {
    const int c = int(i % p.channels);
    const long long pixel = (i / p.channels) % pixels;
    const int y = p.alpha_height == 1 ? 0 : int(pixel / p.width), x = p.alpha_width == 1 ? 0 : int(pixel % p.width);
    const float v = p.values[i];
    p.values[i] = v < 0.0f ? p.alpha[(static_cast<long long>(y) * p.alpha_width + x) * p.channels + c] * v : v;
  }
}

inline LaunchGeometry prelu_geometry(const PReluProblem& p, long long max_blocks = kMaxElementwiseBlocks) {
  return elementwise_geometry(p.count, max_blocks);
}

}  // namespace fastvgg::cuda
