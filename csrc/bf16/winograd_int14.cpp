// 3x3 convolution by Winograd F(4x4, 3x3) with 14-bit integer products (AVX512_VNNI
// vpdpwssd), fp32 transforms; fp32 blocked images in and out, same contract as conv3x3.
//
// Why integers: the accuracy bar (block5_pool within 1e-2 after 13 layers) leaves a
// layer ~2.5e-3 of relative error. bf16 products inside F(4x4) cost ~2e-2 a layer (the
// transforms' coefficients, up to 5 and 8, amplify bf16's 8-bit rounding), so bf16 can only
// run direct, 4x the multiplications. Quantising the transformed values to 14-bit integers
// (one scale per tile and point for V, per point and output channel for U) costs ~1.4e-3 a
// layer (bench/winograd_rounding_study.py), and vpdpwssd does 32 int16 multiply-adds per
// instruction: twice fp32 FMA's lanes at the same rate on Zen 4.
//
// Exactness of the integer sums: |q| <= 8191, so one pair of products is at most
// 2 * 8191^2 = 134,184,962 and 16 pairs (32 channels) at most 2,146,959,392 < 2^31 - 1: the
// int32 accumulators are converted to fp32 and cleared every 16 pairs, and can never
// overflow, whatever the input.
//
// Phases per block of tiles, as in the fp32 kernel (winograd.cpp):
//   1. input transform of one tile, all channel blocks, to fp32; per point xi, the largest
//      |V| over the channels gives the scale; V quantised to int16 pairs: Vq[xi][tile][ch].
//   2. per xi, a GEMM on int16 pairs: M[tile][out block][xi][16] = fp32 sums x scales.
//   3. output transform, bias, ReLU, straight into the blocked output.
// Edge tiles with at most 2 output pixels along an axis run F(2, 3) along it, as in the fp32
// kernel (winograd_f4x4.h's TileOrder and edge transforms): only their points are quantised
// and multiplied.
//
// Packed weights (pack_winograd_int14): int16 [36 xi][out/16][in16/2 pairs][16 out][2], then
// the fp32 dequantisation steps [36 xi][out16]; in16 and out16 are the channels rounded up to 16.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstring>

#include "bf16/kernels_bf16.h"
#include "winograd_f4x4.h"

namespace fastvgg {
namespace avx512bf16 {
namespace {

constexpr float kQuantMax = float(kWinogradInt14Max);
constexpr float kLargestFloat = 3.4028234663852886e38f;
constexpr float kSmallestQuantised = 1e-30f;  // 8191 / 1e-30 is still a finite scale
constexpr int kChunkPairs = 16;  // see the overflow bound above
constexpr std::ptrdiff_t kCacheLineBytes = 64, kCacheLineFloats = kCacheLineBytes / 4;
// GEMM register tile: 6 tiles x 2 output blocks = 12 int32 + 12 fp32 accumulators + 2 weights.
// Measured (CPU time, 1 thread, VGG16's block1_conv2 to block4_conv2): 6 x 2 is 1.3-1.9x
// faster than 3 x 4 and than fp32 Winograd; it reads half as many bytes of U per product.
constexpr int kGemmTiles = 6, kGemmBlocks = 2;
// Tiles whose input transforms run channel block by channel block (transform_inputs): their fp32
// scratch, 6 x 36 x 256 floats = 221 KB at most for the private schedule's layers, stays in L2.
constexpr int kInputChunk = 6;

// acc += the int16 pair products of x and w (vpdpwssd), as inline assembly with the accumulator
// tied to the destination. Through the intrinsic, GCC 12 kept two copies of every accumulator of
// the register tile and moved one into the other after each product: 24 register moves per 12
// products in the inner loop (perf annotate), twice its instructions.
inline __m512i dot_pairs_accumulate(__m512i acc, __m512i x, __m512i w) {
  asm("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w));
  return acc;
}

struct Geometry {
  int in_blocks, out_blocks, groups;
  int padded_in;  // channels of V rows: in_blocks * 16
};

class Int14Layer {
 public:
  // `pool`: out holds the convolution's output after a 2x2 max pool ('valid', stride 2).
  Int14Layer(const BlockedImage& in, const std::uint16_t* packed, const float* bias, bool relu,
             const BlockedImage& out, int block_tiles, bool pool)
      : in_(in),
        out_(out),
        bias_(bias),
        relu_(relu),
        pool_(pool),
        block_tiles_(block_tiles),
        // 'same': the convolution's output has the input's size, whatever `out` holds.
        order_(tile_grid(in.height, in.width), 1) {
    g_.in_blocks = in.blocks();
    g_.out_blocks = out.blocks();
    g_.groups = (g_.out_blocks + kGemmBlocks - 1) / kGemmBlocks;
    g_.padded_in = g_.in_blocks * kChannelBlock;
    u_ = reinterpret_cast<const std::int16_t*>(packed);
    u_block_stride_ = std::ptrdiff_t(g_.padded_in) * kChannelBlock;  // int16 values per (xi, out block)
    u_point_stride_ = std::ptrdiff_t(g_.out_blocks) * u_block_stride_;
    u_steps_ = reinterpret_cast<const float*>(packed + std::size_t(kPoints) * std::size_t(u_point_stride_));
    // One cache line more than the rows need (V's points, M's tiles, the fp32 scratch's
    // points): unpadded, these strides are multiples of 2-12 KB, and the 36 lines a tile
    // stores fall in 1-4 of the L1's 64 sets (8 ways each). One line more spreads them.
    v_point_stride_ = std::ptrdiff_t(block_tiles) * g_.padded_in + kCacheLineBytes / std::ptrdiff_t(sizeof(std::int16_t));
    m_tile_stride_ = std::ptrdiff_t(g_.out_blocks) * kPoints * kChannelBlock + kCacheLineFloats;
    scratch_point_stride_ = std::ptrdiff_t(g_.padded_in) + kCacheLineFloats;
  }

  int tiles() const { return order_.tiles(); }
  int groups() const { return g_.groups; }
  std::size_t v_size() const { return std::size_t(kPoints) * std::size_t(v_point_stride_); }      // int16
  std::size_t steps_size() const { return std::size_t(kPoints) * std::size_t(block_tiles_); }      // floats
  std::size_t m_size() const { return std::size_t(block_tiles_) * std::size_t(m_tile_stride_); }   // floats
  std::size_t tile_scratch_size() const { return std::size_t(kPoints) * scratch_point_stride_; }    // floats

  // Transforms tile first_tile + t (all channel blocks) into fp32 scratch, then quantises each
  // point's row of channels into v[xi][t][...] and its step into steps[xi][t].
  void transform_input(std::int16_t* v, float* steps, float* scratch, int first_tile, int t) const {
    const TilePlace place = order_.place(first_tile + t);
    for (int ib = 0; ib < g_.in_blocks; ++ib) transform_input_block(scratch, place, ib);
    quantise_tile(v, steps, scratch, t, place.kind);
  }

  // The same for `count` (at most kInputChunk) consecutive tiles, channel block by channel block:
  // tile by tile, every block of the input is a separate set of six row streams (24 for block1's
  // 64 channels), more than the hardware prefetchers follow; block by block it is six, as in the
  // fp32 kernel. `scratch` holds count tiles (tile_scratch_size() floats each).
  void transform_inputs(std::int16_t* v, float* steps, float* scratch, int first_tile, int t0, int count) const {
    TilePlace places[kInputChunk];
    for (int c = 0; c < count; ++c) places[c] = order_.place(first_tile + t0 + c);
    for (int ib = 0; ib < g_.in_blocks; ++ib)
      for (int c = 0; c < count; ++c) transform_input_block(scratch + std::size_t(c) * tile_scratch_size(), places[c], ib);
    for (int c = 0; c < count; ++c)
      quantise_tile(v, steps, scratch + std::size_t(c) * tile_scratch_size(), t0 + c, places[c].kind);
  }

 private:
  // B^T d B of one tile's channel block ib, fp32, into scratch[xi][ib's 16 channels] (an edge
  // tile's points only).
  void transform_input_block(float* scratch, const TilePlace& place, int ib) const {
    transform_input_placed(place, in_, order_.grid(), ib, scratch + ib * kChannelBlock, scratch_point_stride_);
  }

  // Per point xi, the largest |V| over the channels gives the scale; V quantised to int16 pairs.
  void quantise_tile(std::int16_t* v, float* steps, const float* scratch, int t, TileKind kind) const {
    for (int xi = 0; xi < kPoints; ++xi) {
      if (!TileOrder::uses_point(kind, xi)) continue;  // never written, never multiplied
      const float* row = scratch + xi * scratch_point_stride_;
      __m512 peak = _mm512_setzero_ps();
      __mmask16 nan_lanes = 0;
      for (int c = 0; c < g_.padded_in; c += kChannelBlock) {
        const __m512 x = _mm512_loadu_ps(row + c);
        nan_lanes |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);  // max would drop NaNs
        peak = _mm512_max_ps(peak, _mm512_abs_ps(x));
      }
      const float largest = _mm512_reduce_max_ps(peak);
      float scale = 0.0f, step = 0.0f;
      if (nan_lanes != 0 || !(largest <= kLargestFloat)) {
        // NaN or infinity in the tile: fp32 Winograd spreads it over the whole tile, and so does a NaN step.
        step = __builtin_nanf("");
      } else if (largest >= kSmallestQuantised) {
        scale = kQuantMax / largest;
        step = largest / kQuantMax;
      }  // else: every |V| < 1e-30, quantised to zero (scale 0), an error below 1e-30 per value
      steps[xi * block_tiles_ + t] = step;
      const __m512 scale_v = _mm512_set1_ps(scale);
      std::int16_t* dst = v + xi * v_point_stride_ + std::ptrdiff_t(t) * g_.padded_in;
      for (int c = 0; c < g_.padded_in; c += kChannelBlock) {
        // Round to nearest even (the MXCSR default); |V| * scale <= 8191 by construction.
        const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(row + c), scale_v));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c), _mm512_cvtsepi32_epi16(q));
      }
    }
  }

 public:
  // M[t][group's blocks][xi] for the tiles [0, tiles) of the block that use point xi.
  void multiply(const std::int16_t* v, const float* steps, float* m, int first_tile, int tiles, int xi,
                int group) const {
    const int first_block = group * kGemmBlocks;
    const int blocks = std::min(kGemmBlocks, g_.out_blocks - first_block);
    const auto [begin, end] = order_.block_tiles_using(xi, first_tile, tiles);
    for (int t = begin; t < end; t += kGemmTiles) {
      gemm_edge<kGemmTiles, kGemmBlocks>(std::min(kGemmTiles, end - t), blocks, v, steps, m, t, xi, first_block);
    }
  }

  void transform_outputs(const float* m, int first_tile, int tiles, int group) const {
    const int first_block = group * kGemmBlocks, last_block = std::min(g_.out_blocks, first_block + kGemmBlocks);
    for (int t = 0; t < tiles; ++t)
      for (int ob = first_block; ob < last_block; ++ob) transform_output(m, first_tile, t, ob);
  }

 private:
  template <int kT, int kB>
  void gemm_tile(const std::int16_t* v, const float* steps, float* m, int t0, int xi, int first_block) const {
    const std::int16_t* u = u_ + xi * u_point_stride_ + first_block * u_block_stride_;
    const std::int16_t* vrow = v + xi * v_point_stride_ + std::ptrdiff_t(t0) * g_.padded_in;
    __m512 sum[kT][kB];
    for (int t = 0; t < kT; ++t)
      for (int j = 0; j < kB; ++j) sum[t][j] = _mm512_setzero_ps();
    const int pairs = g_.padded_in / 2;
    for (int p0 = 0; p0 < pairs; p0 += kChunkPairs) {
      __m512i acc[kT][kB];
      for (int t = 0; t < kT; ++t)
        for (int j = 0; j < kB; ++j) acc[t][j] = _mm512_setzero_si512();
      const int p1 = std::min(pairs, p0 + kChunkPairs);
      for (int p = p0; p < p1; ++p) {
        __m512i w[kB];
        for (int j = 0; j < kB; ++j) w[j] = _mm512_loadu_si512(u + j * u_block_stride_ + std::ptrdiff_t(p) * 2 * kChannelBlock);
        for (int t = 0; t < kT; ++t) {
          std::int32_t pair;
          std::memcpy(&pair, vrow + std::ptrdiff_t(t) * g_.padded_in + 2 * p, sizeof pair);
          const __m512i x = _mm512_set1_epi32(pair);
          for (int j = 0; j < kB; ++j) acc[t][j] = dot_pairs_accumulate(acc[t][j], x, w[j]);
        }
      }
      for (int t = 0; t < kT; ++t)
        for (int j = 0; j < kB; ++j) sum[t][j] = _mm512_add_ps(sum[t][j], _mm512_cvtepi32_ps(acc[t][j]));
    }
    for (int j = 0; j < kB; ++j) {
      const __m512 u_step = _mm512_loadu_ps(u_steps_ + xi * g_.out_blocks * kChannelBlock + (first_block + j) * kChannelBlock);
      for (int t = 0; t < kT; ++t) {
        const __m512 step = _mm512_mul_ps(u_step, _mm512_set1_ps(steps[xi * block_tiles_ + t0 + t]));
        _mm512_storeu_ps(m + (t0 + t) * m_tile_stride_ + (first_block + j) * kPoints * kChannelBlock + xi * kChannelBlock,
                         _mm512_mul_ps(sum[t][j], step));
      }
    }
  }

  // The register tile for the tiles and blocks left at an edge (block5: 16 tiles = 6 + 6 + 4).
  template <int kT, int kB>
  void gemm_edge(int tiles, int blocks, const std::int16_t* v, const float* steps, float* m, int t0, int xi,
                 int first_block) const {
    if constexpr (kT > 1) {
      if (tiles < kT) return gemm_edge<kT - 1, kB>(tiles, blocks, v, steps, m, t0, xi, first_block);
    }
    if constexpr (kB > 1) {
      if (blocks < kB) return gemm_edge<kT, kB - 1>(tiles, blocks, v, steps, m, t0, xi, first_block);
    }
    gemm_tile<kT, kB>(v, steps, m, t0, xi, first_block);
  }

  // Y = A^T M A + bias (ReLU, the fused max pool) of tile first_tile + t, block out_block.
  void transform_output(const float* m, int first_tile, int t, int out_block) const {
    const float* tile_m = m + t * m_tile_stride_ + out_block * kPoints * kChannelBlock;
    const float* bias = bias_ + out_block * kChannelBlock;
    const TilePlace place = order_.place(first_tile + t);
    if (pool_)
      transform_output_placed<true>(place, tile_m, bias, relu_, out_, order_.grid(), out_block);
    else
      transform_output_placed<false>(place, tile_m, bias, relu_, out_, order_.grid(), out_block);
  }

  const BlockedImage& in_;
  const BlockedImage& out_;
  const float* bias_;
  bool relu_;
  bool pool_;
  int block_tiles_;
  TileOrder order_;  // the tiles of one image and their grid (edge tiles: winograd_f4x4.h)
  Geometry g_;
  const std::int16_t* u_;
  const float* u_steps_;
  std::ptrdiff_t u_block_stride_, u_point_stride_, v_point_stride_, m_tile_stride_, scratch_point_stride_;
};

// Private blocks for small U (each thread transforms, multiplies and writes out its own blocks
// of tiles, no barrier); shared blocks for U of 8 MB and more (block4/5 of VGG: every tile in one
// block, the threads split its output groups, so U is read once). The thresholds follow the fp32
// kernel's measurements, halved with U's element size.
constexpr std::size_t kSharedWeightBytes = std::size_t(6) << 20;

}  // namespace

namespace {
void run_int14(const BlockedImage& in, const void* packed, const float* bias, bool relu, const BlockedImage& out,
               int threads, KernelScratch& scratch, bool pool) {
  const auto* packed_weights = static_cast<const std::uint16_t*>(packed);
  const int tiles = ((in.height + kTileOut - 1) / kTileOut) * ((in.width + kTileOut - 1) / kTileOut);
  const int padded_in = in.blocks() * kChannelBlock, padded_out = out.blocks() * kChannelBlock;
  const std::size_t u_bytes = std::size_t(kPoints) * padded_in * padded_out * sizeof(std::int16_t);
  const std::size_t bytes_per_tile = std::size_t(kPoints) * (padded_in * sizeof(std::int16_t) + padded_out * sizeof(float));
  const bool shared = u_bytes >= kSharedWeightBytes;
  const std::size_t block_bytes = shared ? (std::size_t(16) << 20) : (std::size_t(256) << 10);
  const int fitting = int(block_bytes / bytes_per_tile) / kGemmTiles * kGemmTiles;
  const int block_tiles = std::min(tiles, std::max(shared ? kGemmTiles : 2 * kGemmTiles, fitting));
  const Int14Layer layer(in, packed_weights, bias, relu, out, block_tiles, pool);
  const std::size_t copies = shared ? 1 : std::size_t(threads);

  // The caller's scratch, kept between its calls: V (int16, two a float) in transformed_input;
  // the steps of V, M and each thread's fp32 tile in products. Every piece starts on a cache line.
  auto lines = [](std::size_t floats) { return (floats + 15) / 16 * 16; };
  const std::size_t v_floats = lines((layer.v_size() + 1) / 2), steps_floats = lines(layer.steps_size()),
                    m_floats = lines(layer.m_size()), tile_floats = lines(layer.tile_scratch_size());
  scratch.transformed_input.ensure_capacity(copies * v_floats);
  const std::size_t thread_scratch_floats = (shared ? 1 : kInputChunk) * tile_floats;
  scratch.products.ensure_capacity(copies * (steps_floats + m_floats) + std::size_t(threads) * thread_scratch_floats);
  auto* v_all = reinterpret_cast<std::int16_t*>(scratch.transformed_input.data());
  float* steps_all = scratch.products.data();
  float* m_all = steps_all + copies * steps_floats;
  float* tile_all = m_all + copies * m_floats;
  const int blocks = (tiles + block_tiles - 1) / block_tiles;
#pragma omp parallel num_threads(threads)
  {
    const int thread = omp_get_thread_num();
    float* tile_scratch = tile_all + std::size_t(thread) * thread_scratch_floats;
    if (!shared) {
      std::int16_t* v = v_all + std::size_t(thread) * v_floats * 2;
      float* steps = steps_all + std::size_t(thread) * steps_floats;
      float* m = m_all + std::size_t(thread) * m_floats;
#pragma omp for schedule(dynamic, 1)
      for (int block = 0; block < blocks; ++block) {
        const int first_tile = block * block_tiles, count = std::min(block_tiles, tiles - first_tile);
        for (int t = 0; t < count; t += kInputChunk)
          layer.transform_inputs(v, steps, tile_scratch, first_tile, t, std::min(kInputChunk, count - t));
        for (int xi = 0; xi < kPoints; ++xi)
          for (int g = 0; g < layer.groups(); ++g) layer.multiply(v, steps, m, first_tile, count, xi, g);
        for (int g = 0; g < layer.groups(); ++g) layer.transform_outputs(m, first_tile, count, g);
      }
    } else {
      for (int block = 0; block < blocks; ++block) {
        const int first_tile = block * block_tiles, count = std::min(block_tiles, tiles - first_tile);
#pragma omp for schedule(dynamic, 4)
        for (int t = 0; t < count; ++t) layer.transform_input(v_all, steps_all, tile_scratch, first_tile, t);
#pragma omp for schedule(dynamic, 1)
        for (int g = 0; g < layer.groups(); ++g) {
          for (int xi = 0; xi < kPoints; ++xi) layer.multiply(v_all, steps_all, m_all, first_tile, count, xi, g);
          layer.transform_outputs(m_all, first_tile, count, g);
        }
      }
    }
  }
}
}  // namespace

void conv3x3_winograd_int14(const BlockedImage& in, const void* packed, const float* bias, bool relu,
                            const BlockedImage& out, int threads, KernelScratch& scratch) {
  run_int14(in, packed, bias, relu, out, threads, scratch, /*pool=*/false);
}

void conv3x3_winograd_int14_max_pool(const BlockedImage* in, const void* packed, const float* bias, bool relu,
                                     const BlockedImage* pooled, int images, int threads, KernelScratch& scratch) {
  for (int n = 0; n < images; ++n) run_int14(in[n], packed, bias, relu, pooled[n], threads, scratch, /*pool=*/true);
}

}  // namespace avx512bf16
}  // namespace fastvgg
