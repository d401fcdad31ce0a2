// The one GEMM micro-kernel of the fp32 kernels:
//   acc[r][p] += sum_k a[r * a_row_stride + k] * b[p * b_panel_stride + k * 16 .. + 16]
// for kRows rows of A broadcast one value at a time and kPanels 16-wide column panels of B,
// all kRows x kPanels accumulators in registers.
//
// Each fp32 op reduces to it, with only the addressing around it differing:
//   - direct 3x3 convolution (conv3x3.cpp): rows = output pixels of a row (A = the input
//     pixels under one tap, 16 floats apart), panels = output-channel blocks, depth = the
//     input channels of one block, called once per (input block, tap);
//   - Winograd (winograd.cpp): rows = tiles (A = V[xi]), panels = output blocks (B = U[xi]),
//     depth = all input channels, once per transformed point xi;
//   - dense (dense.cpp): rows = images, panels = column panels, depth = a block of inputs.
// The callers initialise the accumulators (bias, zero, or the partial sums so far) and store
// them; the register tile sizes per ISA are in simd.h.
#pragma once

#include <cstddef>

#include "panel_prefetch.h"
#include "simd.h"
#include "tensor.h"

namespace fastvgg {
namespace FASTVGG_ISA {
namespace {

// `at_step(k)` runs at the start of each depth step (Winograd's next-panel prefetch,
// panel_prefetch.h); the default does nothing and compiles away.
template <int kRows, int kPanels, typename AtStep = NoPrefetch>
inline void gemm_accumulate(Vec16 (&acc)[kRows][kPanels], const float* a, std::ptrdiff_t a_row_stride, const float* b,
                            std::ptrdiff_t b_panel_stride, int depth, AtStep&& at_step = AtStep{}) {
  for (int k = 0; k < depth; ++k) {
    at_step(k);
    Vec16 w[kPanels];
    for (int p = 0; p < kPanels; ++p) w[p] = load(b + p * b_panel_stride + std::ptrdiff_t(k) * kChannelBlock);
#pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r) {
      const Vec16 x = broadcast(a[r * a_row_stride + k]);
      for (int p = 0; p < kPanels; ++p) acc[r][p] = fmadd(x, w[p], acc[r][p]);
    }
  }
}

}  // namespace
}  // namespace FASTVGG_ISA
}  // namespace fastvgg
