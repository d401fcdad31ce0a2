// Keras's VGG preprocessing in one pass over the pixels, spread over the threads. numpy does it
// in two single-threaded passes and two new arrays (53 ms for 64 images of 224x224, about 1.4%
// of a batch's features); this is memory-bound, so it is compiled once, not per ISA.
#include "preprocess.h"

#include <omp.h>

#include <algorithm>

namespace fastvgg {
namespace {

template <typename T>
void caffe_preprocess_any(const T* rgb, std::size_t pixels, const float bgr_mean[3], float* out, int threads) {
  // Chunks of whole pixels, large enough that a thread's start-up is nothing beside them.
  constexpr std::ptrdiff_t kChunkPixels = 1 << 14;
  const std::ptrdiff_t chunks = (std::ptrdiff_t(pixels) + kChunkPixels - 1) / kChunkPixels;
  const int used = int(std::max<std::ptrdiff_t>(1, std::min<std::ptrdiff_t>(threads, chunks)));
#pragma omp parallel for schedule(static) num_threads(used)
  for (std::ptrdiff_t chunk = 0; chunk < chunks; ++chunk) {
    const std::size_t first = std::size_t(chunk) * kChunkPixels;
    const std::size_t last = std::min(pixels, first + kChunkPixels);
    for (std::size_t p = first; p < last; ++p) {
      const T* in = rgb + 3 * p;
      float* o = out + 3 * p;
      o[0] = float(in[2]) - bgr_mean[0];
      o[1] = float(in[1]) - bgr_mean[1];
      o[2] = float(in[0]) - bgr_mean[2];
    }
  }
}

}  // namespace

void caffe_preprocess(const std::uint8_t* rgb, std::size_t pixels, const float bgr_mean[3], float* out, int threads) {
  caffe_preprocess_any(rgb, pixels, bgr_mean, out, threads);
}

void caffe_preprocess(const float* rgb, std::size_t pixels, const float bgr_mean[3], float* out, int threads) {
  caffe_preprocess_any(rgb, pixels, bgr_mean, out, threads);
}

}  // namespace fastvgg
