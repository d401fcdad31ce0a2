// 3x3 convolution by Winograd's minimal filtering F(4x4, 3x3), stride 1, 'same' zero padding,
// bias, optional fused ReLU. Same contract as conv3x3 (conv3x3.cpp), about 4x fewer
// multiplications: each 4x4 output tile costs 36 products per (input, output) channel pair
// instead of 144.
//
// Transforms (Lavin & Gray 2015, interpolation points 0, +-1, +-2, infinity):
//   U = G g G^T      (weights, 3x3 -> 6x6, once at packing, in double precision)
//   V = B^T d B      (a 6x6 input tile, overlapping its neighbours by 2 pixels)
//   Y = A^T M A      with M[xi] = sum_ic V[xi][ic] * U[xi][ic][oc] for each of the 36 xi
//
// The kernel works on blocks of tiles in three phases:
//   1. input transform, 16 channels at a time:   V[xi][tile][in channel]
//   2. 36 GEMMs, one per xi, register-blocked:    M[tile][out block][xi][16]
//   3. output transform + bias + ReLU, stored straight into the blocked output.
// U is read once per tile block, which decides how the threads share the work (Schedule,
// below): the early layers (thousands of tiles, a U of at most a few MB that stays in the
// L3) give each thread its own small blocks that stay in its L2, with no barrier; the late
// layers (few tiles, a U of up to 37.7 MB) take every tile in one block that both threads
// work on, so U is read exactly once, half by each thread.
//
// Packed weights (pack_winograd_f4x4): [36 xi][out/16][in][16 out] floats, xi = 6 * row + col
// of the 6x6 transformed tile. One (xi, output block) panel is contiguous: its rows are the
// output vectors the GEMM loads, one per input channel, in the order its depth loop visits
// them. Input channels are not padded (the GEMM depth is the real channel count, 3 for the
// first layer); output channels are padded to the block with zeros, so the padding lanes of
// the output come out as exactly 0 (with the zero-padded bias).
#include <omp.h>

#include <algorithm>
#include <cstddef>
#include <utility>

#include "gemm_microkernel.h"
#include "kernels.h"
#include "winograd_batch.h"
#include "winograd_f4x4.h"
#include "simd.h"

namespace fastvgg {

// The packing code below (compiled once, outside the ISA namespaces) needs the tile sizes too.
using winograd_f4x4::kPoints;
using winograd_f4x4::kTileIn;
using winograd_f4x4::kTileOut;

namespace FASTVGG_ISA {
namespace {

// GEMM register tile: kGemmTiles tiles (rows of V, broadcast) x kGemmBlocks output blocks
// (vectors of U). AVX-512: 6 x 4 = 24 accumulators + 4 weight vectors of the 32 zmm (the
// V scalars are broadcast straight from memory into the FMA). AVX2: each Vec16 is two of the
// 16 ymm: 6 x 1 x 2 = 12 accumulators + 2 weight halves + 1 broadcast.
#if defined(__AVX512F__)
constexpr int kGemmTiles = 6;
constexpr int kGemmBlocks = 4;
#elif defined(__AVX2__)
constexpr int kGemmTiles = 6;
constexpr int kGemmBlocks = 1;
#else
constexpr int kGemmTiles = 4;
constexpr int kGemmBlocks = 1;
#endif

struct GemmArgs {
  const float* v;                  // first tile's row of V[xi]
  std::ptrdiff_t v_tile_stride;    // floats between tiles in V (the padded channel count)
  const float* u;                  // first output block's panel of U[xi]
  std::ptrdiff_t u_block_stride;   // floats between output-block panels of U (in * 16)
  int depth;                       // input channels
  float* m;                        // M[first tile][first block][xi]
  std::ptrdiff_t m_tile_stride, m_block_stride;
};

// M[tiles][blocks] = V[tiles][depth] * U[depth][blocks x 16] for one xi.
template <int kTiles, int kBlocks, typename AtStep>
inline void gemm_tile(const GemmArgs& a, AtStep& at_step) {
  Vec16 acc[kTiles][kBlocks];
  for (int t = 0; t < kTiles; ++t)
    for (int j = 0; j < kBlocks; ++j) acc[t][j] = zero();
  gemm_accumulate(acc, a.v, a.v_tile_stride, a.u, a.u_block_stride, a.depth, at_step);
  for (int t = 0; t < kTiles; ++t)
    for (int j = 0; j < kBlocks; ++j) store(a.m + t * a.m_tile_stride + j * a.m_block_stride, acc[t][j]);
}

// Picks the register tile for the tiles and output blocks left at an edge.
template <int kTiles, int kBlocks, typename AtStep>
inline void gemm_edge_tile(int tiles, int blocks, const GemmArgs& a, AtStep& at_step) {
  if constexpr (kTiles > 1) {
    if (tiles < kTiles) return gemm_edge_tile<kTiles - 1, kBlocks>(tiles, blocks, a, at_step);
  }
  if constexpr (kBlocks > 1) {
    if (blocks < kBlocks) return gemm_edge_tile<kTiles, kBlocks - 1>(tiles, blocks, a, at_step);
  }
  gemm_tile<kTiles, kBlocks>(a, at_step);
}

// How the tiles of a layer are shared between the threads.
enum class Schedule {
  // Each thread takes whole tile blocks and runs all three phases on them alone, with its
  // own V and M: no barrier at all (a barrier costs a whole time slice when the OS preempts
  // one thread), the blocks stay in the thread's caches, but every block reads all of U.
  // For block1 to block3 of VGG: many tiles, U of at most 9.4 MB, in the L3.
  PrivateBlocks,
  // Blocks of many tiles: the threads share each block's input transform, then after a
  // barrier each takes whole groups of output blocks (GEMM + output transform: a group's M
  // is its thread's own), so U is read once per block, half by each thread. For the late
  // layers: few tiles, U of 19-38 MB from memory.
  SharedBlocks,
};

// Measured with bench/conv_layers.py (VGG16 at 224x224, AVX-512, 2 threads, quiet machine):
// private blocks win on block1 to block3 (U 0.6-9.4 MB: block3_conv2 ~5.8-7.7 ms private vs
// 7.6-9.3 ms shared); from block4 on U (19-38 MB) no longer fits the L3 and must be read once.
constexpr std::size_t kSharedWeightBytes = std::size_t(12) << 20;

Schedule winograd_schedule(int in_channels, int out_channels) {
  const std::size_t weight_bytes = std::size_t(kPoints) * in_channels * round_up_to_block(out_channels) * sizeof(float);
  return weight_bytes >= kSharedWeightBytes ? Schedule::SharedBlocks : Schedule::PrivateBlocks;
}

std::size_t transformed_bytes_per_tile(int in_channels, int out_channels) {
  return std::size_t(kPoints) * sizeof(float) * std::size_t(round_up_to_block(in_channels) + round_up_to_block(out_channels));
}

// PrivateBlocks: V and M of a block within a quarter of the 1 MB L2, but at least two
// register tiles. Measured on block1_conv2 to block3_conv2: 12 tiles beat 24 by 0-25% and 96
// by 2-3x (V and M spill from the L2); U panels are re-read from the L3 cheaply enough.
int private_block_tiles(int tiles, int in_channels, int out_channels) {
  constexpr std::size_t kBlockBytes = std::size_t(256) << 10;
  constexpr int kMinTiles = 2 * kGemmTiles;
  const int fitting = int(kBlockBytes / transformed_bytes_per_tile(in_channels, out_channels)) / kGemmTiles * kGemmTiles;
  return std::min(tiles, std::max(kMinTiles, fitting));
}

// SharedBlocks: every tile at once (U read once) unless V and M would pass 16 MB, half the
// L3; at 224x224 the largest is block3_conv2, 196 tiles, 14.5 MB. Larger images get blocks.
int shared_block_tiles(int tiles, int in_channels, int out_channels) {
  constexpr std::size_t kBlockBytes = std::size_t(16) << 20;
  const int fitting = int(kBlockBytes / transformed_bytes_per_tile(in_channels, out_channels)) / kGemmTiles * kGemmTiles;
  return std::min(tiles, std::max(kGemmTiles, fitting));
}

// Everything about one call that the three phases share.
// A batch is one long row of tiles: image i's tiles are numbered from i * tiles_per_image, so
// a block of tiles may span images and a panel of U then feeds several images at once.
class WinogradLayer {
 public:
  // `pool`: out holds the 2x2 max-pooled result (transform_output_tile<..., true>).
  WinogradLayer(const BlockedImage* in, const float* packed_weights, const float* bias, bool relu,
                const BlockedImage* out, int images, int block_tiles, bool pool)
      : in_(in),
        out_(out),
        weights_(packed_weights),
        bias_(bias),
        relu_(relu),
        pool_(pool),
        // 'same': the convolution's output has the input's size, whatever `out` holds.
        order_(tile_grid(in[0].height, in[0].width), images) {
    const BlockedImage& first_in = in[0];
    const BlockedImage& first_out = out[0];
    in_blocks_ = first_in.blocks();
    out_blocks_ = first_out.blocks();
    groups_ = (out_blocks_ + kGemmBlocks - 1) / kGemmBlocks;
    padded_in_ = std::ptrdiff_t(in_blocks_) * kChannelBlock;
    // One cache line more than the rows need: the input transform stores a tile's 36 points
    // v_point_stride_ apart, and M's tiles are m_tile_stride_ apart. Unpadded, those strides are
    // multiples of 2-12 KB (12 tiles x 64-256 channels), and the 36 lines fall in 1-4 of the
    // L1's 64 sets (8 ways each): every store evicts another. One line more spreads them.
    v_point_stride_ = std::ptrdiff_t(block_tiles) * padded_in_ + kCacheLineFloats;
    m_tile_stride_ = std::ptrdiff_t(out_blocks_) * kMBlockStride + kCacheLineFloats;
    u_block_stride_ = std::ptrdiff_t(first_in.channels) * kChannelBlock;
    u_point_stride_ = std::ptrdiff_t(out_blocks_) * u_block_stride_;
    block_tiles_ = block_tiles;
  }

  int tiles() const { return order_.tiles(); }
  int in_blocks() const { return in_blocks_; }
  int groups() const { return groups_; }
  // Floats of V and of M for one block of tiles.
  std::size_t v_size() const { return std::size_t(kPoints) * std::size_t(v_point_stride_); }
  std::size_t m_size() const { return std::size_t(block_tiles_) * std::size_t(m_tile_stride_); }

  // V[xi][t][16 channels of in_block] for tile first_tile + t of the image.
  void transform_input(float* v, int first_tile, int t, int in_block) const {
    const TilePlace place = order_.place(first_tile + t);
    const BlockedImage& in = in_[place.image];
    float* tile_v = v + t * padded_in_ + in_block * kChannelBlock;
    transform_input_placed(place, in, order_.grid(), in_block, tile_v, v_point_stride_);
  }

  // M[t][group's output blocks][xi] for all `tiles` tiles of the block. `prefetch_next`: the
  // passes over the tiles also fetch the group's U panel of xi + 1 (panel_prefetch.h), for
  // the shared schedule, where U streams from memory.
  void multiply(const float* v, float* m, int first_tile, int tiles, int xi, int group,
                bool prefetch_next = false) const {
    const int first_block = group * kGemmBlocks;
    const int blocks = std::min(kGemmBlocks, out_blocks_ - first_block);
    GemmArgs a;
    a.v_tile_stride = padded_in_;
    a.u = weights_ + xi * u_point_stride_ + first_block * u_block_stride_;
    a.u_block_stride = u_block_stride_;
    a.depth = in_[0].channels;
    a.m_tile_stride = m_tile_stride_;
    a.m_block_stride = kMBlockStride;
    // Only the tiles that use point xi (edge tiles use 16 or 24 of the 36).
    const auto [begin, end] = order_.block_tiles_using(xi, first_tile, tiles);
    if (begin >= end) return;
    const int passes = (end - begin + kGemmTiles - 1) / kGemmTiles;
    // With one pass it fetches alongside its own demand loads; with more, the first pass loads
    // the current panel and the others (reading it from cache) fetch the next.
    const int prefetching_passes = std::max(1, passes - 1), first_prefetching = passes > 1 ? 1 : 0;
    for (int pass = 0; pass < passes; ++pass) {
      const int t = begin + pass * kGemmTiles;
      a.v = v + xi * v_point_stride_ + t * padded_in_;
      a.m = m + t * m_tile_stride_ + first_block * kMBlockStride + xi * kChannelBlock;
      const int tile_count = std::min(kGemmTiles, end - t);
      if (prefetch_next && xi + 1 < kPoints && pass >= first_prefetching) {
        PanelPrefetch next(a.u + u_point_stride_, u_block_stride_ * std::ptrdiff_t(sizeof(float)), blocks,
                           kChannelBlock * sizeof(float), pass - first_prefetching, prefetching_passes);
        gemm_edge_tile<kGemmTiles, kGemmBlocks>(tile_count, blocks, a, next);
      } else {
        NoPrefetch none;
        gemm_edge_tile<kGemmTiles, kGemmBlocks>(tile_count, blocks, a, none);
      }
    }
  }

  // Output pixels of tile first_tile + t, output block out_block.
  void transform_output(const float* m, int first_tile, int t, int out_block) const {
    const float* tile_m = m + t * m_tile_stride_ + out_block * kMBlockStride;
    const TilePlace place = order_.place(first_tile + t);
    const BlockedImage& out = out_[place.image];
    const float* bias = bias_ + out_block * kChannelBlock;
    if (pool_)
      transform_output_placed<true>(place, tile_m, bias, relu_, out, order_.grid(), out_block);
    else
      transform_output_placed<false>(place, tile_m, bias, relu_, out, order_.grid(), out_block);
  }

  // All output blocks of one GEMM group, for every tile of the block.
  void transform_group_outputs(const float* m, int first_tile, int tiles, int group) const {
    const int first_block = group * kGemmBlocks, last_block = std::min(out_blocks_, first_block + kGemmBlocks);
    for (int t = 0; t < tiles; ++t)
      for (int ob = first_block; ob < last_block; ++ob) transform_output(m, first_tile, t, ob);
  }

 private:
  static constexpr std::ptrdiff_t kMBlockStride = std::ptrdiff_t(kPoints) * kChannelBlock;

  static constexpr std::ptrdiff_t kCacheLineFloats = 16;

  const BlockedImage* in_;
  const BlockedImage* out_;
  const float* weights_;
  const float* bias_;
  bool relu_;
  bool pool_;
  TileOrder order_;  // the tiles of all images and their grid (edge tiles: winograd_f4x4.h)
  int in_blocks_, out_blocks_, groups_, block_tiles_;
  // V[xi][tile][channel] and M[tile][out block][xi][16], tiles counted within the block.
  std::ptrdiff_t padded_in_, v_point_stride_, m_tile_stride_, u_block_stride_, u_point_stride_;
};

void run_private_blocks(const WinogradLayer& layer, int block_tiles, float* v_all, float* m_all, int threads) {
  const int blocks = (layer.tiles() + block_tiles - 1) / block_tiles;
#pragma omp parallel num_threads(threads)
  {
    const int thread = omp_get_thread_num();
    float* v = v_all + std::size_t(thread) * layer.v_size();
    float* m = m_all + std::size_t(thread) * layer.m_size();
    // Dynamic: a thread that the OS preempts (the machine is shared) hands its blocks over.
#pragma omp for schedule(dynamic, 1)
    for (int block = 0; block < blocks; ++block) {
      const int first_tile = block * block_tiles;
      const int tiles = std::min(block_tiles, layer.tiles() - first_tile);
      // One channel block at a time: its rows are few streams for the prefetchers.
      for (int ib = 0; ib < layer.in_blocks(); ++ib)
        for (int t = 0; t < tiles; ++t) layer.transform_input(v, first_tile, t, ib);
      // xi outer: one panel of U feeds every tile of the block while it is in L1/L2.
      for (int xi = 0; xi < kPoints; ++xi)
        for (int g = 0; g < layer.groups(); ++g) layer.multiply(v, m, first_tile, tiles, xi, g);
      for (int g = 0; g < layer.groups(); ++g) layer.transform_group_outputs(m, first_tile, tiles, g);
    }
  }
}

void run_shared_blocks(const WinogradLayer& layer, int block_tiles, float* v, float* m, int threads) {
#pragma omp parallel num_threads(threads)
  for (int first_tile = 0; first_tile < layer.tiles(); first_tile += block_tiles) {
    const int tiles = std::min(block_tiles, layer.tiles() - first_tile);
#pragma omp for schedule(dynamic, 16)
    for (int item = 0; item < tiles * layer.in_blocks(); ++item)
      layer.transform_input(v, first_tile, item % tiles, item / tiles);
    // Every group needs every V: the barrier above. The barrier below keeps the next
    // block's input transform from overwriting V while a group still reads it.
#pragma omp for schedule(dynamic, 1)
    for (int g = 0; g < layer.groups(); ++g) {
      for (int xi = 0; xi < kPoints; ++xi) layer.multiply(v, m, first_tile, tiles, xi, g, /*prefetch_next=*/true);
      layer.transform_group_outputs(m, first_tile, tiles, g);
    }
  }
}

}  // namespace

namespace {

void run_winograd(const BlockedImage* in, const float* packed_weights, const float* bias, bool relu,
                  const BlockedImage* out, int images, int threads, KernelScratch& scratch, bool pool) {
  const int tiles =
      images * ((in[0].height + kTileOut - 1) / kTileOut) * ((in[0].width + kTileOut - 1) / kTileOut);
  const Schedule schedule = winograd_schedule(in[0].channels, out[0].channels);
  const int block_tiles = schedule == Schedule::SharedBlocks ? shared_block_tiles(tiles, in[0].channels, out[0].channels)
                                                             : private_block_tiles(tiles, in[0].channels, out[0].channels);
  const WinogradLayer layer(in, packed_weights, bias, relu, out, images, block_tiles, pool);
  const int copies = schedule == Schedule::SharedBlocks ? 1 : threads;

  // The caller's scratch, kept between its calls: reallocating MBs on every call costs page faults.
  scratch.transformed_input.ensure_capacity(copies * layer.v_size());
  scratch.products.ensure_capacity(copies * layer.m_size());
  if (schedule == Schedule::SharedBlocks)
    run_shared_blocks(layer, block_tiles, scratch.transformed_input.data(), scratch.products.data(), threads);
  else
    run_private_blocks(layer, block_tiles, scratch.transformed_input.data(), scratch.products.data(), threads);
}

}  // namespace

void conv3x3_winograd(const BlockedImage& in, const void* packed_weights, const float* bias, bool relu,
                      const BlockedImage& out, int threads, KernelScratch& scratch) {
  run_winograd(&in, static_cast<const float*>(packed_weights), bias, relu, &out, 1, threads, scratch, /*pool=*/false);
}

void conv3x3_winograd_batch(const BlockedImage* in, const void* packed_weights, const float* bias, bool relu,
                            const BlockedImage* out, int images, int threads, KernelScratch& scratch) {
  if (images < 1) return;
  run_winograd(in, static_cast<const float*>(packed_weights), bias, relu, out, images, threads, scratch, /*pool=*/false);
}

void conv3x3_winograd_batch_max_pool(const BlockedImage* in, const void* packed_weights, const float* bias, bool relu,
                                     const BlockedImage* pooled, int images, int threads, KernelScratch& scratch) {
  if (images < 1) return;
  run_winograd(in, static_cast<const float*>(packed_weights), bias, relu, pooled, images, threads, scratch, /*pool=*/true);
}

}  // namespace FASTVGG_ISA

#if FASTVGG_ISA_IS_GENERIC
// Weight transform and packing: compiled once, shared by every ISA.

namespace {
// G of Lavin & Gray's F(4x4, 3x3) for the points 0, -1, 1, -2, 2, infinity (B^T and A^T
// are in the kernel).
const double kG[kTileIn][3] = {
    {1.0 / 4, 0.0, 0.0},
    {-1.0 / 6, -1.0 / 6, -1.0 / 6},
    {-1.0 / 6, 1.0 / 6, -1.0 / 6},
    {1.0 / 24, 1.0 / 12, 1.0 / 6},
    {1.0 / 24, -1.0 / 12, 1.0 / 6},
    {0.0, 0.0, 1.0},
};

std::size_t packed_winograd_index(int xi, int out_blocks, int in_channels, int ic, int oc) {
  return ((std::size_t(xi) * out_blocks + oc / kChannelBlock) * in_channels + ic) * kChannelBlock + oc % kChannelBlock;
}

}  // namespace

std::size_t packed_winograd_size(int in_channels, int out_channels) {
  return std::size_t(kPoints) * channel_blocks(out_channels) * in_channels * kChannelBlock;
}

void pack_winograd_f4x4(const float* kernel_hwio, int in_channels, int out_channels, float* packed, int threads) {
  // Double precision: U is rounded to float once, at the end. Every slot is written, the
  // padding lanes of a partial last block as zeros (their g is zero), so nothing is cleared first.
  const int out_blocks = channel_blocks(out_channels);
  // Sixteen output channels at a time: their weights are contiguous in HWIO and their U
  // values in the packed layout, so the transform reads and writes whole runs. Each input
  // channel fills its own slots, so the channels are spread over threads.
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int ic = 0; ic < in_channels; ++ic) {
    for (int ob = 0; ob < out_blocks; ++ob) {
      const int lanes = std::min(kChannelBlock, out_channels - ob * kChannelBlock);
      double g[3][3][kChannelBlock] = {};
      for (int kh = 0; kh < 3; ++kh)
        for (int kw = 0; kw < 3; ++kw) {
          const float* src = kernel_hwio + ((std::size_t(kh) * 3 + kw) * in_channels + ic) * out_channels + ob * kChannelBlock;
          for (int o = 0; o < lanes; ++o) g[kh][kw][o] = src[o];
        }
      double gg[kTileIn][3][kChannelBlock];  // G g
      for (int a = 0; a < kTileIn; ++a)
        for (int kw = 0; kw < 3; ++kw)
          for (int o = 0; o < kChannelBlock; ++o)
            gg[a][kw][o] = kG[a][0] * g[0][kw][o] + kG[a][1] * g[1][kw][o] + kG[a][2] * g[2][kw][o];
      for (int a = 0; a < kTileIn; ++a)
        for (int b = 0; b < kTileIn; ++b) {
          float* dst = packed + packed_winograd_index(a * kTileIn + b, out_blocks, in_channels, ic, ob * kChannelBlock);
          for (int o = 0; o < kChannelBlock; ++o)
            dst[o] = float(gg[a][0][o] * kG[b][0] + gg[a][1][o] * kG[b][1] + gg[a][2][o] * kG[b][2]);
        }
    }
  }
}

void unpack_winograd_f4x4(const float* packed, int in_channels, int out_channels, float* kernel_hwio, int threads) {
  // Q U Q^T with Q a left inverse of G (Q G = I) that reads only the points 0, -1, 1 and
  // infinity: g0 = 4 G0.g, g1 = 3 (G2.g - G1.g), g2 = G5.g. Cheaper than least squares and,
  // measured on Glorot-uniform kernels, as close: 83% of weights come back bit-exact and
  // 99.9% within 127 ulps, which KernelCorrection then fixes.
  auto combine = [](double at0, double at1, double at2, double at5, int row) {
    return row == 0 ? 4.0 * at0 : row == 1 ? 3.0 * (at2 - at1) : at5;
  };
  const int out_blocks = channel_blocks(out_channels);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int ic = 0; ic < in_channels; ++ic) {
    for (int ob = 0; ob < out_blocks; ++ob) {
      const int lanes = std::min(kChannelBlock, out_channels - ob * kChannelBlock);
      auto u = [&](int a, int b, int o) {
        return double(packed[packed_winograd_index(a * kTileIn + b, out_blocks, in_channels, ic, ob * kChannelBlock) + o]);
      };
      for (int kh = 0; kh < 3; ++kh)
        for (int kw = 0; kw < 3; ++kw) {
          float* dst = kernel_hwio + ((std::size_t(kh) * 3 + kw) * in_channels + ic) * out_channels + ob * kChannelBlock;
          for (int o = 0; o < lanes; ++o) {
            double row[4];  // (Q U) at the columns 0, 1, 2, 5
            const int columns[4] = {0, 1, 2, 5};
            for (int c = 0; c < 4; ++c)
              row[c] = combine(u(0, columns[c], o), u(1, columns[c], o), u(2, columns[c], o), u(5, columns[c], o), kh);
            dst[o] = float(combine(row[0], row[1], row[2], row[3], kw));
          }
        }
    }
  }
}
#endif

}  // namespace fastvgg
