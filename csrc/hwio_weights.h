// Keras's 3x3 kernels are HWIO [3][3][in][out]; every packer walks all of their weights the same
// way and differs only in where a weight goes in its own layout (and how it is rounded there).
#pragma once

#include <cstddef>

namespace fastvgg {

// fn(hwio_index, kh, kw, ic, oc) for every weight of a [3][3][in][out] kernel. Each weight has
// its own slot in every packed layout, so the taps run in parallel.
template <typename Fn>
void for_each_hwio_weight(int in_channels, int out_channels, int threads, Fn fn) {
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
  for (int kh = 0; kh < 3; ++kh)
    for (int kw = 0; kw < 3; ++kw)
      for (int ic = 0; ic < in_channels; ++ic)
        for (int oc = 0; oc < out_channels; ++oc)
          fn(((std::size_t(kh) * 3 + kw) * in_channels + ic) * out_channels + oc, kh, kw, ic, oc);
}

}  // namespace fastvgg
