// The machine's bf16 dot-product throughput (vdpbf16ps; AMX's TDPBF16PS), measured like the fp32
// FMA peak in fma_peak.cpp, so bench/ can say what fraction of it the bf16 kernels reach.
//
// Independent accumulator chains hide the instruction's latency (~6 cycles on Zen 4) on
// both vector pipes; each instruction is 16 lanes x 2 products x 2 FLOPs. The function
// carries a target attribute, so this file needs no special flags, and is only called when
// the CPU reports AVX512_BF16.
#include <immintrin.h>
#include <omp.h>

#include <stdexcept>

#include "bf16/kernels_bf16.h"
#include "cpu_features.h"

namespace fastvgg {
namespace {

constexpr int kChains = 16;

#if defined(__x86_64__) || defined(_M_X64)
__attribute__((target("avx512f,avx512bf16"))) float dot_chains_avx512bf16(long iterations) {
  __m512 acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_ps(float(c));
  // Products of 1e-3 and 1e-3 keep the sums finite and normal however long the loop runs.
  const __m512bh a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(1e-3f));
  const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(-1e-3f), _mm512_set1_ps(1e-3f));
  for (long i = 0; i < iterations; ++i)
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_dpbf16_ps(acc[c], a, b);
  __m512 sum = acc[0];
  for (int c = 1; c < kChains; ++c) sum = _mm512_add_ps(sum, acc[c]);
  return _mm512_reduce_add_ps(sum);
}
#endif

#if FASTVGG_HAVE_AMXBF16
// Four accumulator tiles against two A and two B tiles held in registers (the AMX kernel's 2x2
// shape without its loads): each TDPBF16PS is 16 x 16 x 32 products x 2 FLOPs.
struct alignas(64) PeakTileConfig {
  std::uint8_t palette = 1, start_row = 0, reserved[14] = {};
  std::uint16_t bytes_per_row[16] = {};
  std::uint8_t rows[16] = {};
};

PeakTileConfig all_tiles_16x64() {
  PeakTileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.bytes_per_row[t] = 64;
    config.rows[t] = 16;
  }
  return config;
}
// At namespace scope: built on the stack of the target("amx-tile") function below (GCC 12, -O2:
// in the red zone, -0x40(%rsp)), ldtilecfg faulted; the cause was not pinned down further.
const PeakTileConfig kAllTiles16x64 = all_tiles_16x64();

__attribute__((target("amx-tile,amx-bf16"))) void tile_chains(long iterations) {
  _tile_loadconfig(&kAllTiles16x64);
  // Zero operands: the sums stay 0, finite and normal however long the loop runs.
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_zero(4);
  _tile_zero(5);
  _tile_zero(6);
  _tile_zero(7);
  for (long i = 0; i < iterations; ++i) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 5, 6);
    _tile_dpbf16ps(2, 4, 7);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_release();
}
#endif

}  // namespace

// GFLOP/s of `threads` threads each running `iterations` steps of four TDPBF16PS.
double amx_bf16_peak_gflops(int threads, long iterations) {
  if (threads < 1) throw std::invalid_argument("threads must be at least 1");
  if (iterations < 1) throw std::invalid_argument("iterations must be at least 1");
#if FASTVGG_HAVE_AMXBF16
  if (!amx_unavailable_reason().empty())
    throw std::invalid_argument("amx_bf16_peak: " + amx_unavailable_reason());
  double seconds = 0;
#pragma omp parallel num_threads(threads)
  {
    tile_chains(100);  // wake the tile unit first
#pragma omp barrier
    const double start = omp_get_wtime();
    tile_chains(iterations);
#pragma omp barrier
    const double elapsed = omp_get_wtime() - start;
#pragma omp critical
    if (elapsed > seconds) seconds = elapsed;
  }
  return 2.0 * 16 * 16 * 32 * 4 * double(iterations) * threads / seconds / 1e9;
#else
  throw std::invalid_argument("amx_bf16_peak: " + amx_unavailable_reason());
#endif
}

// GFLOP/s of `threads` threads each running `iterations` steps of the chains.
double bf16_dot_peak_gflops(int threads, long iterations) {
  if (threads < 1) throw std::invalid_argument("threads must be at least 1");
  if (iterations < 1) throw std::invalid_argument("iterations must be at least 1");
#if defined(__x86_64__) || defined(_M_X64)
  if (!cpu_has_avx512_bf16())
    throw std::invalid_argument("bf16_dot_peak: this CPU does not report AVX512_BF16 (vdpbf16ps)");
  dot_chains_avx512bf16(1000);  // wake the 512-bit units first
  volatile float sink = 0;
  double seconds = 0;
#pragma omp parallel num_threads(threads)
  {
#pragma omp barrier
    const double start = omp_get_wtime();
    const float r = dot_chains_avx512bf16(iterations);
#pragma omp barrier
    const double elapsed = omp_get_wtime() - start;
#pragma omp critical
    {
      sink = sink + r;
      if (elapsed > seconds) seconds = elapsed;
    }
  }
  (void)sink;
  return 2.0 * 32 * kChains * double(iterations) * threads / seconds / 1e9;
#else
  throw std::invalid_argument("bf16_dot_peak needs an x86-64 CPU with AVX512_BF16");
#endif
}

}  // namespace fastvgg
