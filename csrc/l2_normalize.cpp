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
    // The squares summed in double: no overflow for rows of float32's largest values, and no
    // order-dependent rounding worth the name; Keras sums in float32, within an ulp or so of this.
    double squares = 0.0;
    for (int c = 0; c < cols; ++c) squares += double(row[c]) * double(row[c]);
    // 1/sqrt(0) is +inf, which the cap turns finite (a zero row stays zero); a NaN in the row
    // makes the sum NaN, and every value NaN, as in Keras.
    const double inverse = 1.0 / std::sqrt(squares);
    const float scale = float(inverse < double(max_inverse_norm) || std::isnan(inverse) ? inverse : double(max_inverse_norm));
    for (int c = 0; c < cols; ++c) row[c] *= scale;
  }
}

}  // namespace fastvgg
