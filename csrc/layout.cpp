// Conversions between NHWC images (what users and Keras hold) and the blocked layout.
#include <algorithm>

#include "kernels.h"
#include "simd.h"

namespace fastvgg {
namespace FASTVGG_ISA {

void nhwc_to_blocked(const float* nhwc, const BlockedImage& out) {
  zero_border(out);
  for (int b = 0; b < out.blocks(); ++b) {
    const int first = b * kChannelBlock;
    const int count = std::min(kChannelBlock, out.channels - first);
    for (int y = 0; y < out.height; ++y) {
      float* dst = out.at(b, y, 0);
      const float* src = nhwc + (std::ptrdiff_t(y) * out.width) * out.channels + first;
      for (int x = 0; x < out.width; ++x) {
        if (count == kChannelBlock) {
          store(dst + x * kChannelBlock, load(src + std::ptrdiff_t(x) * out.channels));
        } else {
          // Channels past the real ones must read as zero to every later kernel. Zeros first, then
          // the real channels one by one: assembling the vector in a stack array and loading it
          // back stalls on store forwarding at every pixel (0.5 ms of a 224x224 RGB image).
          float* pixel = dst + x * kChannelBlock;
          store(pixel, zero());
          for (int i = 0; i < count; ++i) pixel[i] = src[std::ptrdiff_t(x) * out.channels + i];
        }
      }
    }
  }
}

void blocked_to_nhwc(const BlockedImage& in, float* nhwc) {
  for (int b = 0; b < in.blocks(); ++b) {
    const int first = b * kChannelBlock;
    const int count = std::min(kChannelBlock, in.channels - first);
    for (int y = 0; y < in.height; ++y) {
      const float* src = in.at(b, y, 0);
      float* dst = nhwc + (std::ptrdiff_t(y) * in.width) * in.channels + first;
      for (int x = 0; x < in.width; ++x) {
        if (count == kChannelBlock) {
          store(dst + std::ptrdiff_t(x) * in.channels, load(src + x * kChannelBlock));
        } else {
          for (int i = 0; i < count; ++i) dst[std::ptrdiff_t(x) * in.channels + i] = src[x * kChannelBlock + i];
        }
      }
    }
  }
}

}  // namespace FASTVGG_ISA
}  // namespace fastvgg
