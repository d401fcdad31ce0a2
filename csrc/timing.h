// Timing for the _core.testing time_* functions (bench/ reads them).
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstddef>
#include <vector>

namespace fastvgg {

// One untimed call (caches, pages, thread pool), then the median wall time of `repeats` calls.
// repeats must be at least 1 (the bindings check it).
template <typename Call>
double median_seconds_after_warmup(int repeats, Call&& call) {
  call();
  std::vector<double> seconds;
  for (int r = 0; r < repeats; ++r) {
    const double start = omp_get_wtime();
    call();
    seconds.push_back(omp_get_wtime() - start);
  }
  std::nth_element(seconds.begin(), seconds.begin() + repeats / 2, seconds.end());
  return seconds[std::size_t(repeats / 2)];
}

}  // namespace fastvgg
