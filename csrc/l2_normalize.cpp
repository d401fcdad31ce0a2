// Keras's UnitNormalization on flat rows: each row times min(1 / ||row||_2, max_inverse_norm).
// Rows are a few hundred to a few thousand features, once per image after the last dense
// layer: plain C++, compiled once, not per ISA.
#include <cmath>
#include <cstddef>

#include "kernels.h"

namespace fastvgg {

void l2_normalize_rows(float* y, int rows, int cols, std::ptrdiff_t row_stride, float max_inverse_norm) {
  for (int r = 0; r < rows; ++r) {
    float* row = y + r * row_stride;
    // The squares summed in float32, as Keras and the CUDA kernel do: a row whose squares overflow
    // (values past ~1e19) gives a sum of +inf and comes out zero in all three.
    float squares = 0.0f;
    for (int c = 0; c < cols; ++c) squares += row[c] * row[c];
    // 1/sqrt(0) is +inf, which the cap turns finite (a zero row stays zero); a NaN in the row
    // makes the sum NaN, and every value NaN, as in Keras.
    const float inverse = 1.0f / std::sqrt(squares);
    const float scale = inverse < max_inverse_norm || std::isnan(inverse) ? inverse : max_inverse_norm;
    for (int c = 0; c < cols; ++c) row[c] *= scale;
  }
}

}  // namespace fastvgg
