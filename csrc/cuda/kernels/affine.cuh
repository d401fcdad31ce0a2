// Per-channel affine maps, y = x * scale[c] + shift[c], in place: BatchNormalization at
// inference, Rescaling and Normalization (fastvgg/keras_model.py turns each into a scale and a
// shift). On images and on flat rows alike: an NHWC image is rows of `channels` values, one a
// pixel, exactly as a batch of flat rows is rows of `features` values.
//
// One fmaf per value, as the CPU kernels (csrc/affine.cpp) do, so both give the same bits.
// BatchNormalization after a convolution is not folded into it here (the CPU executor folds
// it): the map is a pass of its own, over tensors of heads that are small next to VGG's.
#pragma once

#include "activation.cuh"  // the element-wise launch geometry

namespace fastvgg::cuda {

struct AffineProblem {
  float* values;       // [rows][channels], overwritten
  const float* scale;  // [channels]
  const float* shift;  // [channels]
  long long rows;      // pixels of every image, or images of flat rows
  int channels;
};

__host__ __device__ inline long long affine_count(const AffineProblem& p) { return p.rows * p.channels; }

// Grid-stride over the values (coalesced). The channel of value i is i % channels; a thread
// steps by the grid's size, so its channel steps by a constant modulo `channels`: one 64-bit
// division per thread instead of one per value.
__global__ void __launch_bounds__(kElementwiseThreads) affine_kernel(AffineProblem p) {
  const long long count = affine_count(p);
  const long long stride = static_cast<long long>(gridDim.x) * kElementwiseThreads;
  long long i = static_cast<long long>(blockIdx.x) * kElementwiseThreads + threadIdx.x;
  if (i >= count) return;
  int c = int(i % p.channels);
  const int step = int(stride % p.channels);
  for (; i < count; i += stride) {
    p.values[i] = fmaf(p.values[i], p.scale[c], p.shift[c]);
    c += step;  // both below `channels`: one subtraction brings the sum back
    if (c >= p.channels) c -= p.channels;
  }
}

inline LaunchGeometry affine_geometry(const AffineProblem& p, long long max_blocks = kMaxElementwiseBlocks) {
  return elementwise_geometry(affine_count(p), max_blocks);
}

}  // namespace fastvgg::cuda
