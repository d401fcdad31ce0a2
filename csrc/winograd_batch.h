// Winograd F(4x4, 3x3) over a batch of images in one call (winograd.cpp).
//
// The late layers of VGG (block4, block5) have few tiles per image and 19-38 MB of transformed
// weights U: run image by image, each image streams all of U from memory. Here the tiles of all
// images form one sequence, cut into the same blocks as for one image, so a block spans several
// images and U is read once per block instead of once per image (at 224x224: block5 holds ~7
// images a block, block4 ~2). Same contract as conv3x3_winograd, image by image; every image
// has the shape and channels of in[0] / out[0], and the results are bit-identical to calling
// conv3x3_winograd on each image (the same sums in the same order). The max-pool variant writes
// only the pooled image: the full-size output never goes through memory (VGG's last
// convolution of each block), bit-identical to conv3x3_winograd followed by max_pool2x2.
#pragma once

#include "tensor.h"
#include "workspace.h"

namespace fastvgg {

#define FASTVGG_DECLARE_WINOGRAD_BATCH(isa)                                                           \
  namespace isa {                                                                                     \
  void conv3x3_winograd_batch(const BlockedImage* in, const void* packed_weights, const float* bias,  \
                              bool relu, const BlockedImage* out, int images, int threads,            \
                              KernelScratch& scratch);                                                \
  /* The same followed by a 2x2 max pool: `pooled` images are floor(h/2) x floor(w/2). */           \
  void conv3x3_winograd_batch_max_pool(const BlockedImage* in, const void* packed_weights,            \
                                       const float* bias, bool relu, const BlockedImage* pooled,      \
                                       int images, int threads, KernelScratch& scratch);              \
  }

FASTVGG_DECLARE_WINOGRAD_BATCH(generic)
FASTVGG_DECLARE_WINOGRAD_BATCH(avx2)
FASTVGG_DECLARE_WINOGRAD_BATCH(avx512)

}  // namespace fastvgg
