// Adds the batched Winograd convolution to fastvgg._core.testing (bindings_winograd_batch.cpp).
#pragma once

#include <pybind11/pybind11.h>

namespace fastvgg {
void register_winograd_batch_testing(pybind11::module_& testing, int (*thread_count)());
}
