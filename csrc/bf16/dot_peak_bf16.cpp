// The machine's bf16 dot-product throughput (vdpbf16ps), measured like the fp32 FMA peak in
// fma_peak.cpp, so bench/ can say what fraction of it the bf16 kernels reach.
//
// Independent accumulator chains hide the instruction's latency (~6 cycles on Zen 4) on
// both vector pipes; each instruction is 16 lanes x 2 products x 2 FLOPs. The function
// carries a target attribute, so this file needs no special flags, and is only called when
// the CPU reports AVX512_BF16.
#include <immintrin.h>
#include <omp.h>

#include <stdexcept>

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

}  // namespace

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
