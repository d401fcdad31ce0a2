// The machine's fp32 FMA throughput, measured rather than looked up, so bench/ can say what
// fraction of the peak a convolution reaches on this CPU (turbo, SMT sharing and AMD's
// double-pumped AVX-512 all change the real number).
//
// Each thread runs independent accumulator chains: one chain would wait on the FMA latency
// (4 cycles) every step, so enough chains are in flight to keep both FMA ports busy. The
// functions carry target attributes instead of living in the per-ISA object libraries, and the
// ISA is chosen from what the CPU reports at run time.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>  // x86 only: elsewhere (aarch64) fma_peak_gflops just raises
#endif
#include <omp.h>

#include <stdexcept>
#include <string>

namespace fastvgg {
namespace {

// 12 chains: latency 4 x 2 ports = 8 needed, plus slack; 12 + 2 constants fit in 16 registers.
constexpr int kChains = 12;

#if defined(__x86_64__) || defined(_M_X64)
__attribute__((target("avx512f"))) float fma_chains_avx512(long iterations) {
  __m512 acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_ps(float(c));
  // acc * 0.999999 + 1e-7 stays finite and away from denormals however long it runs.
  const __m512 scale = _mm512_set1_ps(0.999999f), shift = _mm512_set1_ps(1e-7f);
  for (long i = 0; i < iterations; ++i)
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_fmadd_ps(acc[c], scale, shift);
  __m512 sum = acc[0];
  for (int c = 1; c < kChains; ++c) sum = _mm512_add_ps(sum, acc[c]);
  return _mm512_reduce_add_ps(sum);
}

__attribute__((target("avx2,fma"))) float fma_chains_avx2(long iterations) {
  __m256 acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = _mm256_set1_ps(float(c));
  const __m256 scale = _mm256_set1_ps(0.999999f), shift = _mm256_set1_ps(1e-7f);
  for (long i = 0; i < iterations; ++i)
    for (int c = 0; c < kChains; ++c) acc[c] = _mm256_fmadd_ps(acc[c], scale, shift);
  __m256 sum = acc[0];
  for (int c = 1; c < kChains; ++c) sum = _mm256_add_ps(sum, acc[c]);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, sum);
  float total = 0;
  for (float v : lanes) total += v;
  return total;
}
#endif

}  // namespace

// GFLOP/s of `threads` threads each running `iterations` steps of the chains (2 FLOPs per lane
// per FMA). isa: "avx512", "avx2" or "auto" (the widest the CPU has).
double fma_peak_gflops(int threads, long iterations, const std::string& isa) {
  if (threads < 1) throw std::invalid_argument("threads must be at least 1");
  if (iterations < 1) throw std::invalid_argument("iterations must be at least 1");
#if defined(__x86_64__) || defined(_M_X64)
  const bool has_avx512 = __builtin_cpu_supports("avx512f");
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  std::string chosen = isa;
  if (chosen == "auto") chosen = has_avx512 ? "avx512" : has_avx2 ? "avx2" : "";
  int lanes = 0;
  if (chosen == "avx512" && has_avx512) lanes = 16;
  if (chosen == "avx2" && has_avx2) lanes = 8;
  if (lanes == 0)
    throw std::invalid_argument("fma_peak: instruction set '" + isa +
                                "' is not available on this CPU; use 'auto', or one the CPU supports");
  fma_chains_avx2(1000);  // wake the vector units (and, with AVX-512, the licence switch) first
  if (lanes == 16) fma_chains_avx512(1000);
  volatile float sink = 0;
  double seconds = 0;
#pragma omp parallel num_threads(threads)
  {
#pragma omp barrier
    const double start = omp_get_wtime();
    const float r = lanes == 16 ? fma_chains_avx512(iterations) : fma_chains_avx2(iterations);
#pragma omp barrier
    const double elapsed = omp_get_wtime() - start;
#pragma omp critical
    {
      sink = sink + r;
      if (elapsed > seconds) seconds = elapsed;
    }
  }
  (void)sink;
  return 2.0 * lanes * kChains * double(iterations) * threads / seconds / 1e9;
#else
  (void)isa;
  throw std::invalid_argument("fma_peak needs an x86-64 CPU with AVX2 or AVX-512");
#endif
}

}  // namespace fastvgg
