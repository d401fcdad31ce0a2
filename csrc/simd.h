// A 16-float vector for the kernels, one implementation per instruction set.
//
// Every kernel source is compiled once per ISA (see CMakeLists.txt); the compiler's own
// feature macros pick the implementation here and FASTVGG_ISA names the namespace, so the
// three builds of one kernel never collide at link time. That goes for the inline functions
// below too: an out-of-line copy of load() or fmadd() is a weak symbol, and under one shared
// name the linker would keep a single (maybe AVX-512) copy for every ISA. Anything added to
// this file stays inside the namespace; tensor.h's helpers get the same effect from
// FASTVGG_PER_ISA (per_isa.h). Tile sizes live here too because
// they follow from the register file: 32 zmm registers on AVX-512, 16 ymm on AVX2.
#pragma once

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#ifndef FASTVGG_ISA
#error "FASTVGG_ISA must name the instruction set this file is compiled for"
#endif

namespace fastvgg {
namespace FASTVGG_ISA {

#if defined(__AVX512F__)

struct Vec16 {
  __m512 v;
};
inline Vec16 load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void store(float* p, Vec16 a) { _mm512_storeu_ps(p, a.v); }
inline Vec16 broadcast(float x) { return {_mm512_set1_ps(x)}; }
inline Vec16 zero() { return {_mm512_setzero_ps()}; }
inline Vec16 fmadd(Vec16 a, Vec16 b, Vec16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline Vec16 add(Vec16 a, Vec16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline Vec16 sub(Vec16 a, Vec16 b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline Vec16 max(Vec16 a, Vec16 b) { return {_mm512_max_ps(a.v, b.v)}; }
// max_keep_nan(a, b) is NaN when a or b is (pooling must not hide a NaN). max_ps returns its
// second operand when either is NaN, so only a NaN in `a` needs restoring.
inline Vec16 max_keep_nan(Vec16 a, Vec16 b) {
  const __mmask16 a_is_nan = _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q);
  return {_mm512_mask_mov_ps(_mm512_max_ps(a.v, b.v), a_is_nan, a.v)};
}

// Conv: 2 output-channel blocks x 14 pixels = 28 accumulators + 2 weights + 1 input.
// 14 divides every VGG row width at 224x224 input (224, 112, 56, 28, 14).
constexpr int kConvTileWidth = 14;
constexpr int kConvOutBlocks = 2;
// Dense: 6 rows x 4 column panels = 24 accumulators.
constexpr int kDenseRows = 6;
constexpr int kDensePanels = 4;

#elif defined(__AVX2__)

struct Vec16 {
  __m256 lo, hi;
};
inline Vec16 load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void store(float* p, Vec16 a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
inline Vec16 broadcast(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline Vec16 zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline Vec16 fmadd(Vec16 a, Vec16 b, Vec16 c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline Vec16 add(Vec16 a, Vec16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline Vec16 sub(Vec16 a, Vec16 b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline Vec16 max(Vec16 a, Vec16 b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline Vec16 max_keep_nan(Vec16 a, Vec16 b) {
  const __m256 lo = _mm256_max_ps(a.lo, b.lo), hi = _mm256_max_ps(a.hi, b.hi);
  return {_mm256_blendv_ps(lo, a.lo, _mm256_cmp_ps(a.lo, a.lo, _CMP_UNORD_Q)),
          _mm256_blendv_ps(hi, a.hi, _mm256_cmp_ps(a.hi, a.hi, _CMP_UNORD_Q))};
}

// Each Vec16 takes two of the 16 ymm registers: 6 pixels x 2 halves = 12 accumulators.
constexpr int kConvTileWidth = 6;
constexpr int kConvOutBlocks = 1;
constexpr int kDenseRows = 3;
constexpr int kDensePanels = 2;

#else

// Portable fallback: plain arrays that the compiler vectorises with whatever the target has.
struct Vec16 {
  float v[16];
};
inline Vec16 load(const float* p) {
  Vec16 r;
  for (int i = 0; i < 16; ++i) r.v[i] = p[i];
  return r;
}
inline void store(float* p, const Vec16& a) {
  for (int i = 0; i < 16; ++i) p[i] = a.v[i];
}
inline Vec16 broadcast(float x) {
  Vec16 r;
  for (int i = 0; i < 16; ++i) r.v[i] = x;
  return r;
}
inline Vec16 zero() { return broadcast(0.0f); }
inline Vec16 fmadd(const Vec16& a, const Vec16& b, const Vec16& c) {
  Vec16 r;
  for (int i = 0; i < 16; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i];
  return r;
}
inline Vec16 add(const Vec16& a, const Vec16& b) {
  Vec16 r;
  for (int i = 0; i < 16; ++i) r.v[i] = a.v[i] + b.v[i];
  return r;
}
inline Vec16 sub(const Vec16& a, const Vec16& b) {
  Vec16 r;
  for (int i = 0; i < 16; ++i) r.v[i] = a.v[i] - b.v[i];
  return r;
}
inline Vec16 max(const Vec16& a, const Vec16& b) {
  Vec16 r;
  for (int i = 0; i < 16; ++i) r.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i];
  return r;
}
inline Vec16 max_keep_nan(const Vec16& a, const Vec16& b) {
  Vec16 r;
  // a != a only for NaN; b's NaN falls through to the else branch.
  for (int i = 0; i < 16; ++i) r.v[i] = a.v[i] > b.v[i] || a.v[i] != a.v[i] ? a.v[i] : b.v[i];
  return r;
}

constexpr int kConvTileWidth = 4;
constexpr int kConvOutBlocks = 1;
constexpr int kDenseRows = 2;
constexpr int kDensePanels = 2;

#endif

// Zero goes first: the max instructions return their second operand when either is NaN, so a
// NaN activation stays NaN, as in TensorFlow, instead of being hidden as 0.
inline Vec16 relu(Vec16 a) { return max(zero(), a); }

}  // namespace FASTVGG_ISA
}  // namespace fastvgg
