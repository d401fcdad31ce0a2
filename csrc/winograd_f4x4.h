// Winograd F(4x4, 3x3)'s tile transforms on the blocked layout, shared by the fp32 kernel
// (winograd.cpp, once per ISA) and the int14 kernel (bf16/winograd_int14.cpp), which run the
// same input transform (then quantise V) and the same output transform of M (then bias, ReLU
// and the fused max pool).
//
// Transforms (Lavin & Gray 2015, interpolation points 0, +-1, +-2, infinity):
//   V = B^T d B      (a 6x6 input tile, overlapping its neighbours by 2 pixels)
//   Y = A^T M A      (M: the 36 products of a tile, one 16-channel vector per point)
// The functions live in the ISA's namespace, as simd.h's do: each ISA object has its own copy.
#pragma once

#include <algorithm>
#include <cstddef>
#include <utility>

#include "simd.h"
#include "tensor.h"

namespace fastvgg {
namespace winograd_f4x4 {

constexpr int kTileOut = 4;                      // output pixels per tile side
constexpr int kTileIn = kTileOut + 2;            // input pixels per tile side (3x3 taps)
constexpr int kPoints = kTileIn * kTileIn;       // 36 transformed values per tile

struct TileGrid {
  int height, width;      // output (= input) pixels
  int tiles_x, tiles;     // tiles per row, in the image
};

inline TileGrid tile_grid(int height, int width) {
  const int tiles_x = (width + kTileOut - 1) / kTileOut;
  return {height, width, tiles_x, tiles_x * ((height + kTileOut - 1) / kTileOut)};
}

// A tile with at most 2 output pixels along an axis (the last ones of an image whose size is 1
// or 2 past a multiple of 4, such as block5's 14x14) runs F(2, 3) along it, on 4 of the 6
// points (see the edge transforms below): a right-edge tile (narrow), a bottom-edge one
// (short), the corner (both), or a full one.
enum class TileKind { Corner, Right, Full, Bottom };
struct TilePlace {
  int image, tile;  // tile: the index in its image's grid, row by row
  TileKind kind;
};

// The tiles of a call over `images` images in the order the kernels visit them (rank): every
// image's corner tile, then the right-edge tiles, the full tiles row by row, the bottom-edge
// tiles. The tiles that use a point xi are then one run of ranks (block_tiles_using), so a GEMM skips
// the rest by its range. Without edge tiles (most VGG layers: 224, 112, 56 and 28 are multiples
// of 4), rank = image * tiles + tile.
class TileOrder {
 public:
  TileOrder(const TileGrid& grid, int images) : grid_(grid), images_(images) {
    const int tiles_y = grid.tiles / grid.tiles_x;
    const bool narrow = is_edge(grid.width), short_rows = is_edge(grid.height);
    full_x_ = grid.tiles_x - (narrow ? 1 : 0);
    corners_ = narrow && short_rows ? 1 : 0;
    rights_ = narrow ? tiles_y - (short_rows ? 1 : 0) : 0;
    fulls_ = full_x_ * (tiles_y - (short_rows ? 1 : 0));
    bottoms_ = short_rows ? full_x_ : 0;
  }

  const TileGrid& grid() const { return grid_; }  // of one image
  int tiles() const { return grid_.tiles * images_; }

  TilePlace place(int rank) const {
    if (rank < corners_ * images_) return {rank, grid_.tiles - 1, TileKind::Corner};
    rank -= corners_ * images_;
    if (rank < rights_ * images_) {
      return {rank / rights_, rank % rights_ * grid_.tiles_x + grid_.tiles_x - 1, TileKind::Right};
    }
    rank -= rights_ * images_;
    if (rank < fulls_ * images_) {
      const int full = rank % fulls_;
      return {rank / fulls_, full / full_x_ * grid_.tiles_x + full % full_x_, TileKind::Full};
    }
    rank -= fulls_ * images_;
    return {rank / bottoms_, grid_.tiles - grid_.tiles_x + rank % bottoms_, TileKind::Bottom};
  }

  // Whether a tile of this kind uses point xi = 6 * row point + column point: points 3 and 4
  // (-2 and 2) are F(4)'s alone.
  static bool uses_point(TileKind kind, int xi) {
    const bool f4_row = xi / kTileIn == 3 || xi / kTileIn == 4, f4_column = xi % kTileIn == 3 || xi % kTileIn == 4;
    const bool short_rows = kind == TileKind::Corner || kind == TileKind::Bottom;
    const bool narrow = kind == TileKind::Corner || kind == TileKind::Right;
    return !(f4_row && short_rows) && !(f4_column && narrow);
  }

  // [begin, end), counted from first_tile, of the tiles among ranks [first_tile, first_tile +
  // tiles) that use point xi (empty: begin >= end). An F(4)-only column point leaves out the
  // corner and right-edge tiles, an F(4)-only row point the corner and bottom-edge ones.
  std::pair<int, int> block_tiles_using(int xi, int first_tile, int tiles) const {
    int first = 0, end = this->tiles();
    if (xi % kTileIn == 3 || xi % kTileIn == 4) first = (corners_ + rights_) * images_;
    if (xi / kTileIn == 3 || xi / kTileIn == 4) {
      first = std::max(first, corners_ * images_);
      end = (corners_ + rights_ + fulls_) * images_;
    }
    return {std::max(0, first - first_tile), std::min(tiles, end - first_tile)};
  }

 private:
  static bool is_edge(int size) { return size % kTileOut == 1 || size % kTileOut == 2; }

  TileGrid grid_;
  int images_;
  int full_x_, corners_, rights_, fulls_, bottoms_;  // tiles of each kind per image
};

}  // namespace winograd_f4x4

namespace FASTVGG_ISA {
using winograd_f4x4::kPoints;
using winograd_f4x4::kTileIn;
using winograd_f4x4::kTileOut;
using winograd_f4x4::tile_grid;
using winograd_f4x4::TileGrid;
using winograd_f4x4::TileKind;
using winograd_f4x4::TileOrder;
using winograd_f4x4::TilePlace;

// Every transform step is an exact constant times a vector plus another: a +-1 is a sub or an
// add (the FP add pipes), the rest one FMA each (the FMA pipes), so on CPUs with separate add
// and FMA pipes (Zen 4) the two kinds issue side by side. a - b and b + (-1) * a round alike.
inline Vec16 fma_const(float c, Vec16 a, Vec16 b) { return fmadd(broadcast(c), a, b); }

// One 6-point B^T product: r = B^T d.
inline void input_transform_6(const Vec16 d[6], Vec16 r[6]) {
  const Vec16 t0 = fma_const(-4.0f, d[2], d[4]);  // d4 - 4 d2
  const Vec16 t1 = fma_const(-4.0f, d[1], d[3]);  // d3 - 4 d1
  const Vec16 t2 = sub(d[4], d[2]);
  const Vec16 t3 = sub(d[3], d[1]);
  r[0] = fma_const(4.0f, d[0], fma_const(-5.0f, d[2], d[4]));
  r[1] = add(t0, t1);
  r[2] = sub(t0, t1);
  r[3] = fma_const(2.0f, t3, t2);
  r[4] = fma_const(-2.0f, t3, t2);
  r[5] = fma_const(4.0f, d[1], fma_const(-5.0f, d[3], d[5]));
}

// One 6-point A^T product: r = A^T m (4 values).
inline void output_transform_6(const Vec16 m[6], Vec16 r[4]) {
  const Vec16 s12 = add(m[1], m[2]);
  const Vec16 d12 = sub(m[1], m[2]);
  const Vec16 s34 = add(m[3], m[4]);
  const Vec16 d34 = sub(m[3], m[4]);
  r[0] = add(add(m[0], s12), s34);
  r[1] = fma_const(2.0f, d34, d12);
  r[2] = fma_const(4.0f, s34, s12);
  r[3] = add(fma_const(8.0f, d34, d12), m[5]);
}


// Where a tile's input pixels start (one above and left of its first output pixel), and how
// many of its kRowsIn x kColsIn rows and columns are readable: up to the image's height/width
// (the zero border); beyond them, the transforms read zeros.
struct InputWindow {
  const float* origin;
  std::ptrdiff_t row_stride;
  int rows, cols;
};
template <int kRowsIn, int kColsIn>
inline InputWindow input_window(const BlockedImage& in, const TileGrid& grid, int tile, int in_block) {
  const int y0 = tile / grid.tiles_x * kTileOut - 1, x0 = tile % grid.tiles_x * kTileOut - 1;
  return {in.at(in_block, y0, x0), in.row_stride(), std::min(kRowsIn, grid.height + 1 - y0),
          std::min(kColsIn, grid.width + 1 - x0)};
}

// Tiles with at most 2 output pixels along an axis (at the right or bottom edge of an image
// whose size is 1 or 2 past a multiple of 4, such as block5's 14x14) run F(2, 3) along it: Lavin
// & Gray's on the points 0, -1, 1 and infinity, which are 4 of F(4, 3)'s 6. It pairs with F(4)'s
// U at those 4 points (kEdgePoint), so it needs 4 x 6, 6 x 4 or 4 x 4 of the 36 products. Those
// U are F(2)'s times 1/4, -1/3, -1/3 and 1 (the ratio of the G rows); its input transform is
// divided by the same, so the products are F(2)'s: r = diag(4, -3, -3, 1) B2^T d.
inline constexpr int kEdgeIn = 4;  // input pixels along an edge tile's narrow axis
inline constexpr int kEdgePoint[kEdgeIn] = {0, 1, 2, 5};
inline constexpr int kFullPoint[kTileIn] = {0, 1, 2, 3, 4, 5};

// One 4-point product r = diag(4, -3, -3, 1) B2^T d, into r's places kEdgePoint.
inline void input_transform_4(const Vec16 d[kEdgeIn], Vec16 r[kTileIn]) {
  r[0] = fma_const(4.0f, sub(d[0], d[2]), zero());
  r[1] = fma_const(-3.0f, add(d[1], d[2]), zero());
  r[2] = fma_const(3.0f, sub(d[1], d[2]), zero());
  r[5] = sub(d[1], d[3]);
}

// One 4-point A2^T product from m's places kEdgePoint: 2 values.
inline void output_transform_4(const Vec16 m[kTileIn], Vec16 r[2]) {
  r[0] = add(add(m[0], m[1]), m[2]);
  r[1] = sub(sub(m[1], m[2]), m[5]);
}

// The transform along an axis of kIn input pixels (6: F(4), 4: F(2)) and the points it uses.
template <int kIn>
inline void input_transform_axis(const Vec16 d[kIn], Vec16 r[kTileIn]) {
  if constexpr (kIn == kTileIn) input_transform_6(d, r); else input_transform_4(d, r);
}
template <int kIn>
inline void output_transform_axis(const Vec16 m[kTileIn], Vec16 r[kTileOut]) {
  if constexpr (kIn == kTileIn) output_transform_6(m, r); else output_transform_4(m, r);
}
template <int kIn>
constexpr const int (&axis_points())[kIn] {
  if constexpr (kIn == kTileIn) return kFullPoint; else return kEdgePoint;
}

// V at the tile's points for a tile of kRowsIn x kColsIn input pixels (6 or 4 each; 6 x 6 is
// transform_input_tile's); V at the other points is neither written nor read.
template <int kRowsIn, int kColsIn>
inline void transform_input_edge_tile(const BlockedImage& in, const TileGrid& grid, int tile, int in_block,
                                      float* v, std::ptrdiff_t v_point_stride) {
  const auto [origin, row_stride, rows, cols] = input_window<kRowsIn, kColsIn>(in, grid, tile, in_block);
  Vec16 half[kTileIn][kColsIn];  // [row point][input column]
  for (int j = 0; j < kColsIn; ++j) {
    Vec16 column[kRowsIn], transformed[kTileIn];
    for (int i = 0; i < kRowsIn; ++i)
      column[i] = i < rows && j < cols ? load(origin + i * row_stride + j * kChannelBlock) : zero();
    input_transform_axis<kRowsIn>(column, transformed);
    for (int p : axis_points<kRowsIn>()) half[p][j] = transformed[p];
  }
  for (int p : axis_points<kRowsIn>()) {
    Vec16 transformed[kTileIn];
    input_transform_axis<kColsIn>(half[p], transformed);
    for (int q : axis_points<kColsIn>()) store(v + (p * kTileIn + q) * v_point_stride, transformed[q]);
  }
}

// Y = A^T M A + bias (and ReLU) of a tile of kRowsIn x kColsIn input pixels (6 x 6 full, 4 along
// an edge tile's narrow axis) from M at its points, for one output block; stores only the pixels
// inside the image. With kPool, Keras's 2x2 max pool ('valid', stride 2) follows, written to
// `out` (floor(h/2) x floor(w/2)): tiles start at even pixels, so every window lies in one tile,
// and a window that the image's last odd row or column would cut is dropped, as Keras does. The
// maxima are taken in max_pool2x2's order on the same values, so the result is bit-identical to
// the convolution followed by that kernel.
template <int kRowsIn, int kColsIn, bool kPool>
inline void transform_output_tile(const float* m, const float* bias, bool relu, const BlockedImage& out,
                                  const TileGrid& grid, int tile, int out_block) {
  static_assert(kTileOut % 2 == 0, "pooling windows must not straddle tiles");
  constexpr int kRowsOut = kRowsIn - 2, kColsOut = kColsIn - 2;
  const int y0 = tile / grid.tiles_x * kTileOut, x0 = tile % grid.tiles_x * kTileOut;
  int rows = std::min(kRowsOut, grid.height - y0), cols = std::min(kColsOut, grid.width - x0);
  if constexpr (kPool) {  // whole windows only
    rows -= rows % 2;
    cols -= cols % 2;
    if (rows == 0 || cols == 0) return;
  }
  Vec16 half[kTileOut][kTileIn];  // [output row][column point]
  for (int q : axis_points<kColsIn>()) {
    Vec16 column[kTileIn], transformed[kTileOut];
    for (int p : axis_points<kRowsIn>()) column[p] = load(m + (p * kTileIn + q) * kChannelBlock);
    output_transform_axis<kRowsIn>(column, transformed);
    for (int i = 0; i < kRowsOut; ++i) half[i][q] = transformed[i];
  }
  const Vec16 b = load(bias);
  if constexpr (!kPool) {
    float* origin = out.at(out_block, y0, x0);
    for (int i = 0; i < rows; ++i) {
      Vec16 transformed[kTileOut];
      output_transform_axis<kColsIn>(half[i], transformed);
      for (int j = 0; j < cols; ++j) {
        const Vec16 y = add(transformed[j], b);
        store(origin + i * out.row_stride() + j * kChannelBlock, relu ? FASTVGG_ISA::relu(y) : y);
      }
    }
  } else {
    Vec16 y[kTileOut][kTileOut];
    for (int i = 0; i < rows; ++i) {
      Vec16 transformed[kTileOut];
      output_transform_axis<kColsIn>(half[i], transformed);
      for (int j = 0; j < cols; ++j) {
        const Vec16 sum = add(transformed[j], b);
        y[i][j] = relu ? FASTVGG_ISA::relu(sum) : sum;
      }
    }
    float* origin = out.at(out_block, y0 / 2, x0 / 2);
    for (int i = 0; i < rows / 2; ++i)
      for (int j = 0; j < cols / 2; ++j)
        store(origin + i * out.row_stride() + j * kChannelBlock,
              max_keep_nan(max_keep_nan(y[2 * i][2 * j], y[2 * i][2 * j + 1]),
                           max_keep_nan(y[2 * i + 1][2 * j], y[2 * i + 1][2 * j + 1])));
  }
}

// V[xi][tile][channel] for one tile and one block of 16 input channels. Pixels past the
// image's bottom/right border row (which is zero) read as zero.
inline void transform_input_tile(const BlockedImage& in, const TileGrid& grid, int tile, int in_block,
                                 float* v, std::ptrdiff_t v_point_stride) {
  const auto [origin, row_stride, rows, cols] = input_window<kTileIn, kTileIn>(in, grid, tile, in_block);
  Vec16 d[kTileIn][kTileIn];
  if (rows == kTileIn && cols == kTileIn) {
    for (int i = 0; i < kTileIn; ++i)
      for (int j = 0; j < kTileIn; ++j) d[i][j] = load(origin + i * row_stride + j * kChannelBlock);
  } else {
    for (int i = 0; i < kTileIn; ++i)
      for (int j = 0; j < kTileIn; ++j)
        d[i][j] = i < rows && j < cols ? load(origin + i * row_stride + j * kChannelBlock) : zero();
  }
  // The next tile along the row starts 4 pixels on: fetch its 4 new columns now, so the
  // loads of the next call do not wait for the L3 or memory.
  for (int i = 0; i < kTileIn; ++i)
    for (int j = kTileIn; j < kTileIn + kTileOut; ++j) __builtin_prefetch(origin + i * row_stride + j * kChannelBlock);
  // Columns first (B^T d), then rows ((B^T d) B), all in registers/L1.
  Vec16 column[kTileIn], transformed[kTileIn], half[kTileIn][kTileIn];
  for (int j = 0; j < kTileIn; ++j) {
    for (int i = 0; i < kTileIn; ++i) column[i] = d[i][j];
    input_transform_6(column, transformed);
    for (int i = 0; i < kTileIn; ++i) half[i][j] = transformed[i];
  }
  for (int i = 0; i < kTileIn; ++i) {
    input_transform_6(half[i], transformed);
    for (int j = 0; j < kTileIn; ++j) store(v + (i * kTileIn + j) * v_point_stride, transformed[j]);
  }
}

// The input transform of the tile at `place` (TileOrder), full or edge.
inline void transform_input_placed(const TilePlace& place, const BlockedImage& in, const TileGrid& grid,
                                   int in_block, float* v, std::ptrdiff_t v_point_stride) {
  switch (place.kind) {
    case TileKind::Full:
      return transform_input_tile(in, grid, place.tile, in_block, v, v_point_stride);
    case TileKind::Right:
      return transform_input_edge_tile<kTileIn, kEdgeIn>(in, grid, place.tile, in_block, v, v_point_stride);
    case TileKind::Bottom:
      return transform_input_edge_tile<kEdgeIn, kTileIn>(in, grid, place.tile, in_block, v, v_point_stride);
    case TileKind::Corner:
      return transform_input_edge_tile<kEdgeIn, kEdgeIn>(in, grid, place.tile, in_block, v, v_point_stride);
  }
}

// The output transform (bias, ReLU, with kPool the 2x2 max pool) of the tile at `place`.
template <bool kPool>
inline void transform_output_placed(const TilePlace& place, const float* m, const float* bias, bool relu,
                                    const BlockedImage& out, const TileGrid& grid, int out_block) {
  switch (place.kind) {
    case TileKind::Full:
      return transform_output_tile<kTileIn, kTileIn, kPool>(m, bias, relu, out, grid, place.tile, out_block);
    case TileKind::Right:
      return transform_output_tile<kTileIn, kEdgeIn, kPool>(m, bias, relu, out, grid, place.tile, out_block);
    case TileKind::Bottom:
      return transform_output_tile<kEdgeIn, kTileIn, kPool>(m, bias, relu, out, grid, place.tile, out_block);
    case TileKind::Corner:
      return transform_output_tile<kEdgeIn, kEdgeIn, kPool>(m, bias, relu, out, grid, place.tile, out_block);
  }
}

}  // namespace FASTVGG_ISA
}  // namespace fastvgg
