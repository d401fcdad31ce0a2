// 3x3 convolution with bf16 products on AMX tiles (TDPBF16PS), stride 1, 'same' zero padding,
// bias, optional fused ReLU, optional fused 2x2 max pool; fp32 blocked images in and out
// (tensor.h).
//
// One TDPBF16PS multiplies a 16 x 32 bf16 tile A by a 32 x 16 tile B (stored as 16 rows of 16
// column pairs) into a 16 x 16 fp32 tile C: 8192 multiply-adds. On the Xeon of bench/results-
// xeon-amx.md that peaks at 13.5x the fp32 FMA rate, where AVX512_BF16's vdpbf16ps runs at half
// of it.
//
// Precision: the weights are rounded to bf16 once, as in the AVX512_BF16 direct kernel, but each
// activation x is carried by two bf16 values, hi = bf16(x) and lo = bf16(x - hi), whose sum
// holds 16 significant bits of x; every product is made twice (hi * w and lo * w, both exact in
// fp32) and summed in fp32. Rounding the activations to bf16 as well (one product) ran VGG16's
// convolutions ~1.4x faster but flipped the top-1 class of a He-scaled VGG16 on an image
// whose fp32 top two were 0.57 against 0.43 (tests/test_bf16_executor.py): activation
// rounding, not weight rounding, moved it (block5_pool 4.4e-3 relative L2 from rounding the
// activations alone, 4.6e-3 from the weights alone, 6.1e-3 from both). The twin is
// reference::conv3x3_bf16_split.
//
// precision="bf16x3" (kSplitWeights) carries the weights as hi + lo too and adds hi * w_lo:
// three products per multiply-add, each value to 16 significant bits (~5e-6 relative per
// layer, ~4x fp32 Winograd's error). Twin: reference::conv3x3_bf16x3.
//
// The GEMM: rows (M) are output pixels, columns (N) output channels, depth (K) the 32 input
// channels of one bf16 block, repeated over the 9 taps and the input blocks. Each thread first
// converts the positions its band of work reads to bf16 blocks of 32 channels, in the order of
// the fp32 blocked layout's padded plane: [hi, lo][in/32][band's positions][32]. Counting
// output pixels along that padded plane's rows
// ("virtual" positions q = y * (W+2) + x, 0 <= x < W+2), the input pixel that tap (dy, dx)
// reads for q is at padded position q + dy * (W+2) + dx: 16 consecutive virtual positions read
// 16 consecutive 64-byte rows, one plain tile load, for every width. The virtual positions on
// the border columns (x = W, W+1) are computed and dropped: 2/(W+2) of the work.
//
// Register use: 4 accumulator tiles (2 M tiles x 2 N tiles: 32 positions x 32 output channels),
// 2 A and 2 B tiles; each B tile serves the hi and the lo parts of both M tiles (bf16x3: the A
// tiles are loaded with the hi parts again for the weights' lo parts).
//
// Fused 2x2 max pool: a work item is then two output rows (one pooled row) of one group of
// output channels; its tile pairs cover positions [2y (W+2), (2y+2)(W+2)) (up to 31 more, whose
// results are dropped), land in a per-thread bounce buffer and are pooled from there: only the
// pooled image is written, bit-identical to the unfused kernel followed by max_pool2x2.
//
// Up to 3 input channels (the first layer's RGB), the 9 taps x channels go into one 32-deep K
// instead (im2col: row q of the converted image holds the 27 values its taps read), one tile
// step instead of 9.
//
// Packed weights (pack_bf16.cpp): [out/16][3][3][in/32][16 pairs][16 out][2] bf16, one 1 KB B
// tile per (output block, tap, input block of 32); up to 3 input channels, [out/16][16 pairs]
// [16 out][2] with K = tap * channels + channel.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "bf16/kernels_bf16.h"

namespace fastvgg {
namespace amxbf16 {
namespace {

constexpr int kTileRows = 16;                          // M: output positions per tile
constexpr int kPairBlock = 32;                         // K: input channels per tile (bf16)
constexpr int kTileElements = kTileRows * kPairBlock;  // bf16 values of one A or B tile
constexpr int kTileFloats = kTileRows * kChannelBlock;  // fp32 values of one C tile
constexpr int kPairPositions = 2 * kTileRows;           // positions of one pair of M tiles

// Palette 1, every tile 16 rows of 64 bytes.
struct alignas(64) TileConfig {
  std::uint8_t palette = 1;
  std::uint8_t start_row = 0;
  std::uint8_t reserved[14] = {};
  std::uint16_t bytes_per_row[16] = {};
  std::uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "the tile configuration is 64 bytes");

TileConfig all_tiles_16x64() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.bytes_per_row[t] = 64;
    config.rows[t] = kTileRows;
  }
  return config;
}

// Up to this many input channels, the 9 taps x channels fit one tile's 32-deep K (im2col): the
// first layer's 3 channels would otherwise fill 3 of each tap's 32 rows of K, 9 tiles a step.
constexpr int kIm2colMaxChannels = kPairBlock / 9;

// The shape of one call: every image has the same.
struct Geometry {
  int height, width, padded_width, pair_blocks, out_blocks;
  int in_channels;
  bool im2col;  // K is tap x channel in one tile (taps == 1), not 32 channels of one tap
  int taps;     // K steps per pair block: 9 taps, or 1 with im2col
  std::ptrdiff_t plane;            // positions of one padded plane
  std::ptrdiff_t positions;        // virtual positions up to the last real output pixel + 1
  std::ptrdiff_t weights_per_out_block;

  Geometry(const BlockedImage& in, int out_channels) {
    height = in.height;
    width = in.width;
    padded_width = in.width + 2;
    in_channels = in.channels;
    im2col = in.channels <= kIm2colMaxChannels;
    taps = im2col ? 1 : 9;
    pair_blocks = im2col ? 1 : (in.channels + kPairBlock - 1) / kPairBlock;
    out_blocks = channel_blocks(out_channels);
    plane = std::ptrdiff_t(height + 2) * padded_width;
    positions = std::ptrdiff_t(height - 1) * padded_width + width;
    weights_per_out_block = std::ptrdiff_t(taps) * pair_blocks * kTileElements;
  }
};

inline __m512 widen(__m256bh rounded) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)rounded), 16));
}

// x as hi + lo: hi = bf16(x), lo = bf16(x - hi) (x - hi is exact in fp32). Where hi is infinite
// or NaN, hi = 0 and lo = bf16(x) carries it instead: with the weights' lo parts (bf16x3) a
// non-finite hi would also meet them, and inf * 0 (a weight exact in bf16) is NaN where fp32
// gives inf.
inline void split(__m512 x, __m256bh& hi, __m256bh& lo) {
  hi = _mm512_cvtneps_pbh(x);
  const __m512 hi_value = widen(hi);
  const __mmask16 special = _mm512_fpclass_ps_mask(hi_value, 0x01 | 0x08 | 0x10 | 0x80);  // NaN, +-inf
  lo = _mm512_cvtneps_pbh(_mm512_mask_mov_ps(_mm512_sub_ps(x, hi_value), special, x));
  hi = (__m256bh)_mm256_maskz_mov_epi16(__mmask16(~special), (__m256i)hi);
}

// 32 fp32 values (two vectors) as one 64-byte row of hi parts and one of lo parts.
inline void store_split(__m512 a, __m512 b, std::uint16_t* hi_row, std::uint16_t* lo_row) {
  __m256bh a_hi, a_lo, b_hi, b_lo;
  split(a, a_hi, a_lo);
  split(b, b_hi, b_lo);
  // The first 16 values in the low 32 bytes of the row, the next 16 in the high.
  _mm512_storeu_si512(hi_row, _mm512_inserti64x4(_mm512_castsi256_si512((__m256i)a_hi), (__m256i)b_hi, 1));
  _mm512_storeu_si512(lo_row, _mm512_inserti64x4(_mm512_castsi256_si512((__m256i)a_lo), (__m256i)b_lo, 1));
}

// One thread's converted copy of the positions a band of work reads: [hi, lo][pair block]
// [span][32] bf16, position p of the padded plane at row p - first (positions past the plane
// are 0: the last tiles read up to 32 of them, whose results are dropped).
struct Band {
  std::uint16_t* data = nullptr;
  std::ptrdiff_t first = 0, span = 0;  // positions [first, first + span)
  std::ptrdiff_t block_stride = 0;     // elements from one pair block to the next
  std::ptrdiff_t lo_offset = 0;        // elements from the hi parts to the lo parts
  const std::uint16_t* at(int pair_block, std::ptrdiff_t position) const {
    return data + pair_block * block_stride + (position - first) * kPairBlock;
  }
};

// im2col: row q holds, at k = tap * channels + c, channel c of padded position q + tap's shift
// (0 past the plane), for the band's rows; the rest of the row is 0. The row is assembled in
// two registers by masked permutes (a masked store to a stack row and a reload cost a store-
// forwarding stall per tap: the layer took 2.9 ms instead of ~1).
void convert_im2col(const BlockedImage& in, const Geometry& g, const Band& band) {
  __m512i index[9][2];
  __mmask16 lanes[9][2];
  for (int tap = 0; tap < 9; ++tap)
    for (int half = 0; half < 2; ++half) {
      alignas(64) std::int32_t idx[kChannelBlock];
      unsigned mask = 0;
      for (int lane = 0; lane < kChannelBlock; ++lane) {
        const int c = half * kChannelBlock + lane - tap * g.in_channels;  // the channel this lane takes
        idx[lane] = c >= 0 && c < g.in_channels ? c : 0;
        if (c >= 0 && c < g.in_channels) mask |= 1u << lane;
      }
      index[tap][half] = _mm512_load_si512(idx);
      lanes[tap][half] = __mmask16(mask);
    }
  for (std::ptrdiff_t q = band.first; q < band.first + band.span; ++q) {
    __m512 low = _mm512_setzero_ps(), high = _mm512_setzero_ps();
    for (int tap = 0; tap < 9; ++tap) {
      const std::ptrdiff_t p = q + std::ptrdiff_t(tap / 3) * g.padded_width + tap % 3;
      if (p >= g.plane) continue;
      const __m512 pixel = _mm512_loadu_ps(in.data + p * kChannelBlock);
      low = _mm512_mask_permutexvar_ps(low, lanes[tap][0], index[tap][0], pixel);
      high = _mm512_mask_permutexvar_ps(high, lanes[tap][1], index[tap][1], pixel);
    }
    std::uint16_t* row = band.data + (q - band.first) * kPairBlock;
    store_split(low, high, row, row + band.lo_offset);
  }
}

// Input blocks 2c and 2c+1 of `in` (fp32, 16 channels each) into bf16 block c of 32 channels of
// the band, hi and lo parts; channels past the image's are zero.
void convert_positions(const BlockedImage& in, const Geometry& g, int pair_block, const Band& band) {
  const float* block_lo = in.data + std::ptrdiff_t(2 * pair_block) * g.plane * kChannelBlock;
  const bool has_high = 2 * pair_block + 1 < in.blocks();
  const float* block_hi = block_lo + g.plane * kChannelBlock;
  std::uint16_t* dst = band.data + pair_block * band.block_stride;
  const __m512 zero = _mm512_setzero_ps();
  const std::ptrdiff_t inside = std::min(band.first + band.span, g.plane);
  for (std::ptrdiff_t p = band.first; p < inside; ++p) {
    const __m512 a = _mm512_loadu_ps(block_lo + p * kChannelBlock);
    const __m512 b = has_high ? _mm512_loadu_ps(block_hi + p * kChannelBlock) : zero;
    std::uint16_t* row = dst + (p - band.first) * kPairBlock;
    store_split(a, b, row, row + band.lo_offset);
  }
  for (std::ptrdiff_t p = std::max(inside, band.first); p < band.first + band.span; ++p) {
    std::uint16_t* row = dst + (p - band.first) * kPairBlock;
    std::memset(row, 0, kPairBlock * sizeof(std::uint16_t));
    std::memset(row + band.lo_offset, 0, kPairBlock * sizeof(std::uint16_t));
  }
}

// The band's positions of image `in`, every pair block.
void convert_band(const BlockedImage& in, const Geometry& g, const Band& band) {
  if (g.im2col) {
    convert_im2col(in, g, band);
    return;
  }
  for (int c = 0; c < g.pair_blocks; ++c) convert_positions(in, g, c, band);
}

// C for positions [q0, q0 + 32) x output blocks (w0, w1) of a converted band: 4 tiles into
// `bounce` as [block j][M tile m][16 positions][16 channels]. With kSplitWeights the weights'
// lo parts follow their hi parts at `weight_lo_offset` elements, and each step adds hi * w_lo
// to hi * w_hi + lo * w_hi (lo * w_lo, below 2^-16 of the product, is left out).
template <bool kSplitWeights>
inline void tile_pair(const Band& band, const Geometry& g, std::ptrdiff_t q0, const std::uint16_t* w0,
                      const std::uint16_t* w1, std::ptrdiff_t weight_lo_offset, float* bounce) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  // Steps (input block c, tap) in order c-major, so one block's rows serve its 9 taps from the
  // L1. Tiles have no renaming: a load into a tile waits until the products reading it are
  // done. So each load is issued as soon as the last product reading that tile has gone in,
  // with other products between it and the first product that needs it: the A tile of M tile
  // 0 (tile 4) is free after two products, tile 5 after four, and the next step's tiles are
  // loaded in the same way behind this step's last products.
  const int steps = g.pair_blocks * g.taps;
  auto b_offset = [&](int step) {
    const int c = step / g.taps, tap = step % g.taps;
    return (std::ptrdiff_t(tap) * g.pair_blocks + c) * kTileElements;
  };
  auto a_rows = [&](int step) {
    const int c = step / g.taps, tap = step % g.taps;
    // With im2col the taps are inside K: one step per block, no shift.
    return band.at(c, q0 + std::ptrdiff_t(tap / 3) * g.padded_width + tap % 3);
  };
  _tile_loadd(4, a_rows(0), 64);
  _tile_loadd(5, a_rows(0) + kTileElements, 64);
  _tile_loadd(6, w0 + b_offset(0), 64);
  _tile_loadd(7, w1 + b_offset(0), 64);
  for (int step = 0; step < steps; ++step) {
    const std::uint16_t* a = a_rows(step);
    const std::ptrdiff_t here = b_offset(step);
    const bool more = step + 1 < steps;
    const std::uint16_t* a_next = more ? a_rows(step + 1) : a;
    const std::ptrdiff_t next = more ? b_offset(step + 1) : here;
    // hi parts (in 4, 5) against the weights (6, 7).
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 4, 7);
    _tile_loadd(4, a + band.lo_offset, 64);
    _tile_dpbf16ps(1, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
    _tile_loadd(5, a + band.lo_offset + kTileElements, 64);
    // 4, 5 now hold the lo parts. Without kSplitWeights the four products below take them
    // against the same weights. With it they are taken here, and the four below take the hi
    // parts (loaded again) against the weights' lo parts.
    if constexpr (kSplitWeights) {
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 5, 6);
      _tile_loadd(6, w0 + weight_lo_offset + here, 64);
      _tile_dpbf16ps(2, 4, 7);
      _tile_loadd(4, a, 64);
      _tile_dpbf16ps(3, 5, 7);
      _tile_loadd(7, w1 + weight_lo_offset + here, 64);
      _tile_loadd(5, a + kTileElements, 64);
    }
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 4, 7);
    if (more) _tile_loadd(4, a_next, 64);
    _tile_dpbf16ps(1, 5, 6);
    if (more) _tile_loadd(6, w0 + next, 64);
    _tile_dpbf16ps(3, 5, 7);
    if (more) {
      _tile_loadd(5, a_next + kTileElements, 64);
      _tile_loadd(7, w1 + next, 64);
    }
  }
  _tile_stored(0, bounce, 64);
  _tile_stored(1, bounce + kTileFloats, 64);
  _tile_stored(2, bounce + 2 * kTileFloats, 64);
  _tile_stored(3, bounce + 3 * kTileFloats, 64);
}

inline __m512 bias_relu(__m512 sum, __m512 bias, bool relu) {
  const __m512 v = _mm512_add_ps(sum, bias);
  // Zero first: max returns its second operand when either is NaN, so NaN stays NaN.
  return relu ? _mm512_max_ps(_mm512_setzero_ps(), v) : v;
}

// max_keep_nan of simd.h: NaN when either operand is.
inline __m512 max_keep_nan(__m512 a, __m512 b) {
  const __mmask16 a_is_nan = _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
  return _mm512_mask_mov_ps(_mm512_max_ps(a, b), a_is_nan, a);
}

// The output blocks (w0, w1) of group `group`: w1 repeats w0 when the group has one block.
struct GroupWeights {
  const std::uint16_t* w0;
  const std::uint16_t* w1;
  int blocks;
};
inline GroupWeights group_weights(const std::uint16_t* weights, const Geometry& g, int group) {
  const int ob0 = 2 * group;
  const std::uint16_t* w0 = weights + ob0 * g.weights_per_out_block;
  const bool two = ob0 + 1 < g.out_blocks;
  return {w0, two ? w0 + g.weights_per_out_block : w0, two ? 2 : 1};
}

template <bool kSplitWeights>
void run_images(const BlockedImage* in, const void* packed, const float* bias, bool relu, const BlockedImage* out,
                int images, bool pool, int threads, KernelScratch& scratch) {
  if (images < 1) return;
  const auto* weights = static_cast<const std::uint16_t*>(packed);
  const Geometry g(in[0], out[0].channels);
  const int groups = (g.out_blocks + 1) / 2;
  const std::ptrdiff_t weight_lo_offset = kSplitWeights ? g.out_blocks * g.weights_per_out_block : 0;
  const std::ptrdiff_t tile_pairs = (g.positions + kPairPositions - 1) / kPairPositions;
  // Pooled: one item per pooled row, its tile pairs covering the two rows.
  const int pooled_rows = g.height / 2, pooled_width = g.width / 2;
  const std::ptrdiff_t slab_pairs = (2 * std::ptrdiff_t(g.padded_width) + kPairPositions - 1) / kPairPositions;
  const std::ptrdiff_t per_image = pool ? pooled_rows : tile_pairs;
  // Parts per band: a band reads about kBandBytes of converted input (hi and lo, the taps' rows
  // beyond it included), half a Sapphire Rapids L2. Measured on VGG16's layers (2 threads, min
  // of 3): 20.1 ms for the 13 convolutions with 1 MB bands, 21.1 with 384 KB, 22.2-23.0 with
  // whole images group by group (block1-block3 read their converted input once per group).
  constexpr std::ptrdiff_t kBandBytes = std::ptrdiff_t(1) << 20;
  const std::ptrdiff_t part_positions = pool ? 2 * std::ptrdiff_t(g.padded_width) : kPairPositions;
  const std::ptrdiff_t position_bytes = std::ptrdiff_t(g.pair_blocks) * 2 * kPairBlock * 2;
  const std::ptrdiff_t band_parts = std::max<std::ptrdiff_t>(
      1, std::min(per_image, (kBandBytes / position_bytes - 2 * g.padded_width) / part_positions));

  // The positions a band of parts [p0, p1) reads: its tile pairs (or slabs' tile pairs) and the
  // taps' 2 rows + 2 positions beyond them.
  const std::ptrdiff_t reach = 2 * std::ptrdiff_t(g.padded_width) + 2;
  auto band_range = [&](std::ptrdiff_t p0, std::ptrdiff_t p1) {
    if (!pool) return std::make_pair(p0 * kPairPositions, (p1 - p0) * kPairPositions + reach);
    const std::ptrdiff_t first = 2 * p0 * g.padded_width;
    return std::make_pair(first, 2 * (p1 - 1) * g.padded_width + slab_pairs * kPairPositions + reach - first);
  };
  const std::ptrdiff_t span_max = band_range(0, band_parts).second;

  // Each thread's converted band and bounce buffer live in the caller's scratch: each thread
  // converts the bands it works on just before, so they come from its L2, not from memory.
  const std::ptrdiff_t band_elements = 2 * std::ptrdiff_t(g.pair_blocks) * span_max * kPairBlock;
  const std::size_t band_floats = std::size_t(band_elements / 2 + 15) / 16 * 16;
  const std::size_t bounce_floats = std::size_t(pool ? slab_pairs : 1) * 4 * kTileFloats;
  scratch.products.ensure_capacity((band_floats + bounce_floats) * std::size_t(threads));
  const TileConfig config = all_tiles_16x64();

#pragma omp parallel num_threads(threads)
  {
    // The tile registers are per thread: each thread configures its own and releases them.
    _tile_loadconfig(&config);
    float* own = scratch.products.data() + (band_floats + bounce_floats) * std::size_t(omp_get_thread_num());
    float* bounce = own + band_floats;
    Band converted;
    converted.data = reinterpret_cast<std::uint16_t*>(own);
    converted.block_stride = span_max * kPairBlock;
    converted.lo_offset = std::ptrdiff_t(g.pair_blocks) * converted.block_stride;
    std::ptrdiff_t converted_band = -1;  // image * bands + band held in `converted`
    const std::ptrdiff_t bands = (per_image + band_parts - 1) / band_parts;
    // Image, band, group, then the band's parts: a band's converted input (about kBandBytes)
    // stays in the L2 while every group's weights pass over it.
#pragma omp for schedule(static)
    for (std::ptrdiff_t item = 0; item < groups * images * per_image; ++item) {
      const int n = int(item / (groups * per_image));
      const std::ptrdiff_t in_image = item % (groups * per_image);
      const std::ptrdiff_t band = in_image / (groups * band_parts);
      const std::ptrdiff_t in_band = in_image - band * groups * band_parts;
      const std::ptrdiff_t parts_here = std::min(band_parts, per_image - band * band_parts);
      const int group = int(in_band / parts_here);
      const std::ptrdiff_t part = band * band_parts + in_band % parts_here;
      const GroupWeights w = group_weights(weights, g, group);
      if (n * bands + band != converted_band) {
        const auto range = band_range(band * band_parts, band * band_parts + parts_here);
        converted.first = range.first;
        converted.span = range.second;
        convert_band(in[n], g, converted);
        converted_band = n * bands + band;
      }
      if (!pool) {
        const std::ptrdiff_t q0 = part * kPairPositions;
        tile_pair<kSplitWeights>(converted, g, q0, w.w0, w.w1, weight_lo_offset, bounce);
        for (int j = 0; j < w.blocks; ++j) {
          const int ob = 2 * group + j;
          const __m512 b = _mm512_loadu_ps(bias + ob * kChannelBlock);
          float* origin = out[n].data + std::ptrdiff_t(ob) * out[n].block_stride();
          // x of each position, stepped (a division per position cost more than the tiles at 224x224).
          int x = int(q0 % g.padded_width);
          for (int r = 0; r < kPairPositions; ++r, x = x + 1 == g.padded_width ? 0 : x + 1) {
            const std::ptrdiff_t q = q0 + r;
            if (q >= g.positions) break;
            if (x >= g.width) continue;
            const float* sum = bounce + (2 * j + r / kTileRows) * kTileFloats + (r % kTileRows) * kChannelBlock;
            _mm512_storeu_ps(origin + (q + g.padded_width + 1) * kChannelBlock, bias_relu(_mm512_load_ps(sum), b, relu));
          }
        }
        continue;
      }
      // Pooled row `part`: conv rows 2 part and 2 part + 1.
      const std::ptrdiff_t slab = 2 * part * g.padded_width;
      for (std::ptrdiff_t s = 0; s < slab_pairs; ++s)
        tile_pair<kSplitWeights>(converted, g, slab + s * kPairPositions, w.w0, w.w1, weight_lo_offset,
                                bounce + s * 4 * kTileFloats);
      // Position r of the slab for block j, as the unfused kernel writes it (bias, ReLU).
      auto value = [&](int j, std::ptrdiff_t r, __m512 b) {
        const std::ptrdiff_t pair = r / kPairPositions, in_pair = r % kPairPositions;
        const float* sum = bounce + (pair * 4 + 2 * j + in_pair / kTileRows) * kTileFloats +
                           (in_pair % kTileRows) * kChannelBlock;
        return bias_relu(_mm512_load_ps(sum), b, relu);
      };
      for (int j = 0; j < w.blocks; ++j) {
        const int ob = 2 * group + j;
        const __m512 b = _mm512_loadu_ps(bias + ob * kChannelBlock);
        float* dst = out[n].at(ob, int(part), 0);
        for (int x = 0; x < pooled_width; ++x) {
          const std::ptrdiff_t top = 2 * x, bottom = g.padded_width + 2 * x;
          // max_pool2x2's order: (top pair), (bottom pair), then the two.
          const __m512 m = max_keep_nan(max_keep_nan(value(j, top, b), value(j, top + 1, b)),
                                        max_keep_nan(value(j, bottom, b), value(j, bottom + 1, b)));
          _mm512_storeu_ps(dst + x * kChannelBlock, m);
        }
      }
    }
    _tile_release();
  }
}

}  // namespace

void conv3x3(const BlockedImage& in, const void* packed, const float* bias, bool relu, const BlockedImage& out,
             int threads, KernelScratch& scratch) {
  run_images<false>(&in, packed, bias, relu, &out, 1, /*pool=*/false, threads, scratch);
}

void conv3x3_batch(const BlockedImage* in, const void* packed, const float* bias, bool relu, const BlockedImage* out,
                   int images, int threads, KernelScratch& scratch) {
  run_images<false>(in, packed, bias, relu, out, images, /*pool=*/false, threads, scratch);
}

void conv3x3_batch_max_pool(const BlockedImage* in, const void* packed, const float* bias, bool relu,
                            const BlockedImage* pooled, int images, int threads, KernelScratch& scratch) {
  run_images<false>(in, packed, bias, relu, pooled, images, /*pool=*/true, threads, scratch);
}

void conv3x3_x3(const BlockedImage& in, const void* packed, const float* bias, bool relu, const BlockedImage& out,
                int threads, KernelScratch& scratch) {
  run_images<true>(&in, packed, bias, relu, &out, 1, /*pool=*/false, threads, scratch);
}

void conv3x3_x3_batch(const BlockedImage* in, const void* packed, const float* bias, bool relu,
                      const BlockedImage* out, int images, int threads, KernelScratch& scratch) {
  run_images<true>(in, packed, bias, relu, out, images, /*pool=*/false, threads, scratch);
}

void conv3x3_x3_batch_max_pool(const BlockedImage* in, const void* packed, const float* bias, bool relu,
                               const BlockedImage* pooled, int images, int threads, KernelScratch& scratch) {
  run_images<true>(in, packed, bias, relu, pooled, images, /*pool=*/true, threads, scratch);
}

}  // namespace amxbf16
}  // namespace fastvgg
