// Software prefetch of the next weight panel of a Winograd GEMM, spread over the current one.
//
// In the shared-weight schedule (block4/block5 of VGG at batch 1) every (output group, xi)
// panel of U comes from memory once: the first register-tile pass over the tiles waits on
// DRAM while the later passes (same panel, now in L1/L2) leave the memory idle: block5's
// layers (16 tiles = 3 passes) took 1.66-1.77 ms against the 1.31 ms their GEMMs need at the
// measured FMA peak (bench/results.md, 2026-11-29 18:20). Here the passes after
// the first one fetch the group's panel for the next xi into L2, one row of every output
// block's region at a time, so memory and arithmetic overlap.
//
// A panel is `regions` contiguous regions (one per output block, `region_stride` bytes
// apart) of `rows` rows of `row_bytes` bytes each; a GEMM's depth loop visits row k of the
// current panel at step k. Of `passes` prefetching passes, pass q fetches the rows k with
// k % passes == q, so together they fetch each row once.
#pragma once

#include <cstddef>

namespace fastvgg {

struct NoPrefetch {
  __attribute__((always_inline)) void operator()(int) {}
};

class PanelPrefetch {
 public:
  PanelPrefetch(const void* next_panel, std::ptrdiff_t region_stride, int regions, std::ptrdiff_t row_bytes,
                int pass, int passes)
      : base_(static_cast<const char*>(next_panel)),
        region_stride_(region_stride),
        regions_(regions),
        row_bytes_(row_bytes),
        next_row_(pass),
        passes_(passes) {}

  // Called at each step k of the depth loop (k increasing from 0). Always inlined: a call in
  // the GEMM's inner loop would spill its register tile around it (every zmm is caller-saved).
  __attribute__((always_inline)) void operator()(int k) {
    if (k != next_row_) return;
    next_row_ += passes_;
    const char* row = base_ + std::ptrdiff_t(k) * row_bytes_;
    for (int r = 0; r < regions_; ++r)
      for (std::ptrdiff_t byte = 0; byte < row_bytes_; byte += kCacheLine)
        __builtin_prefetch(row + r * region_stride_ + byte, 0, 2);  // to L2: the current panel holds L1
  }

 private:
  static constexpr std::ptrdiff_t kCacheLine = 64;
  const char* base_;
  std::ptrdiff_t region_stride_;
  int regions_;
  std::ptrdiff_t row_bytes_;
  int next_row_, passes_;
};

}  // namespace fastvgg
