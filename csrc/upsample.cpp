// Keras's UpSampling2D with interpolation="nearest": each pixel repeated size_height times
// down and size_width times across. Keras 3 repeats along each axis (ops.repeat); tf.keras's
// nearest-neighbour resize by an integer factor picks the same source pixel, floor(i / size).
// Copies only: the output holds the input's floats, bit for bit.
#include "ops.h"
#include "simd.h"

namespace fastvgg {
namespace FASTVGG_ISA {

void upsample_nearest(const BlockedImage& in, int size_height, int size_width, const BlockedImage& out, int threads) {
  const int items = out.blocks() * out.height;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int item = 0; item < items; ++item) {
    const int b = item / out.height, y = item % out.height;
    const float* source = in.at(b, y / size_height, 0);
    float* row = out.at(b, y, 0);
    for (int x = 0; x < out.width; ++x) store(row + x * kChannelBlock, load(source + (x / size_width) * kChannelBlock));
  }
}

}  // namespace FASTVGG_ISA

#if FASTVGG_ISA_IS_GENERIC
namespace reference {

void upsample_nearest(const float* x, int images, int height, int width, int channels, int size_height, int size_width,
                      float* y) {
  const int out_height = height * size_height, out_width = width * size_width;
  for (int n = 0; n < images; ++n)
    for (int i = 0; i < out_height; ++i)
      for (int j = 0; j < out_width; ++j)
        for (int c = 0; c < channels; ++c)
          y[((std::size_t(n) * out_height + i) * out_width + j) * channels + c] =
              x[((std::size_t(n) * height + i / size_height) * width + j / size_width) * channels + c];
}

}  // namespace reference
#endif

}  // namespace fastvgg
