// Keras's VGG preprocessing ("caffe" mode) of RGB pixels into what the network takes.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fastvgg {

// out[p][c] = float(rgb[p][2 - c]) - bgr_mean[c] for `pixels` pixels of 3 channels: the
// channels reversed to BGR, then each minus its mean, one float subtraction per value, so the
// result is bit for bit numpy's flip(x, -1).astype(float32) - mean (what Keras computes). The
// means come from the caller (fastvgg.imagenet.CAFFE_BGR_MEAN as float32), so both paths
// subtract the same floats.
void caffe_preprocess(const std::uint8_t* rgb, std::size_t pixels, const float bgr_mean[3], float* out, int threads);
void caffe_preprocess(const float* rgb, std::size_t pixels, const float bgr_mean[3], float* out, int threads);

}  // namespace fastvgg
