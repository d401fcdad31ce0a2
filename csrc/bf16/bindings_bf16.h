// Adds the bf16 kernel set's functions to fastvgg._core.testing (bindings_bf16.cpp).
#pragma once

#include <pybind11/pybind11.h>

namespace fastvgg {
// thread_count: the module's current thread setting (set_num_threads), read at each call.
void register_bf16_testing(pybind11::module_& testing, int (*thread_count)());
}
