// Test and bench bindings of the batched Winograd convolution (winograd_batch.h), added to
// fastvgg._core.testing: an NHWC batch in, each image laid out in its own blocked buffer, one
// call over all of them.
#include "bindings_winograd_batch.h"

#include <omp.h>
#include <pybind11/numpy.h>

#include <algorithm>
#include <string>
#include <vector>

#include "cpu_features.h"
#include "kernels.h"
#include "timing.h"
#include "winograd_batch.h"

namespace py = pybind11;

namespace fastvgg {
namespace {

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using BatchFunction = void (*)(const BlockedImage*, const void*, const float*, bool, const BlockedImage*, int, int,
                               KernelScratch&);

// The batched function of the kernel table `isa` names (kernels_for rejects unknown ones).
BatchFunction batch_function(const std::string& isa) {
  const std::string name = kernels_for(isa).isa_name;
#if FASTVGG_HAVE_AVX512
  if (name == "avx512") return avx512::conv3x3_winograd_batch;
#endif
#if FASTVGG_HAVE_AVX2
  if (name == "avx2") return avx2::conv3x3_winograd_batch;
#endif
  return generic::conv3x3_winograd_batch;
}

struct Shape {
  int n, h, w, c, f;
};

Shape check(const FloatArray& x, const FloatArray& kernel, const FloatArray& bias) {
  if (x.ndim() != 4) throw py::value_error("x must be NHWC (4 dimensions), got " + std::to_string(x.ndim()));
  if (kernel.ndim() != 4 || kernel.shape(0) != 3 || kernel.shape(1) != 3 || kernel.shape(2) != x.shape(3))
    throw py::value_error("kernel must be HWIO (3, 3, channels of x, filters)");
  if (bias.ndim() != 1 || bias.shape(0) != kernel.shape(3)) throw py::value_error("bias must have one value per filter");
  for (int axis = 0; axis < 4; ++axis)
    if (x.shape(axis) < 1 || x.shape(axis) > (1 << 24)) throw py::value_error("x must have no empty or huge axis");
  if (kernel.shape(3) < 1 || kernel.shape(3) > (1 << 24)) throw py::value_error("filters out of range");
  return {int(x.shape(0)), int(x.shape(1)), int(x.shape(2)), int(x.shape(3)), int(kernel.shape(3))};
}

// Blocked buffers for every image of the batch, laid out from x, and the packed weights.
struct Batch {
  Batch(const KernelTable& layout, const float* x, const float* kernel, const float* bias, const Shape& s, int threads)
      : weights(packed_winograd_size(s.c, s.f)), padded_bias(std::size_t(round_up_to_block(s.f))) {
    pack_winograd_f4x4(kernel, s.c, s.f, weights.data(), threads);
    std::copy(bias, bias + s.f, padded_bias.data());
    const std::size_t in_size = blocked_image_size(s.c, s.h, s.w), out_size = blocked_image_size(s.f, s.h, s.w);
    in_storage.resize(in_size * s.n);
    out_storage.resize(out_size * s.n);  // zeroed: the output borders
    for (int n = 0; n < s.n; ++n) {
      in.push_back({in_storage.data() + n * in_size, s.c, s.h, s.w});
      out.push_back({out_storage.data() + n * out_size, s.f, s.h, s.w});
      layout.nhwc_to_blocked(x + std::size_t(n) * s.h * s.w * s.c, in.back());
    }
  }
  AlignedBuffer weights, padded_bias, in_storage, out_storage;
  std::vector<BlockedImage> in, out;
  KernelScratch scratch;
};

FloatArray conv3x3_winograd_batch(const FloatArray& x, const FloatArray& kernel, const FloatArray& bias, bool relu,
                                  const std::string& isa, int threads) {
  const Shape s = check(x, kernel, bias);
  const KernelTable& table = kernels_for(isa);
  const BatchFunction run = batch_function(isa);
  FloatArray y({s.n, s.h, s.w, s.f});
  const float *xp = x.data(), *kp = kernel.data(), *bp = bias.data();
  float* yp = y.mutable_data();
  py::gil_scoped_release release;
  Batch batch(table, xp, kp, bp, s, threads);
  run(batch.in.data(), batch.weights.data(), batch.padded_bias.data(), relu, batch.out.data(), s.n, threads,
      batch.scratch);
  for (int n = 0; n < s.n; ++n) table.blocked_to_nhwc(batch.out[std::size_t(n)], yp + std::size_t(n) * s.h * s.w * s.f);
  return y;
}

// Median seconds of one call over the whole batch, weights packed and images laid out once.
double time_conv3x3_winograd_batch(const FloatArray& x, const FloatArray& kernel, const FloatArray& bias,
                                   const std::string& isa, int repeats, int threads) {
  const Shape s = check(x, kernel, bias);
  if (repeats < 1) throw py::value_error("repeats must be at least 1");
  const KernelTable& table = kernels_for(isa);
  const BatchFunction run = batch_function(isa);
  const float *xp = x.data(), *kp = kernel.data(), *bp = bias.data();
  py::gil_scoped_release release;
  Batch batch(table, xp, kp, bp, s, threads);
  auto call = [&] {
    run(batch.in.data(), batch.weights.data(), batch.padded_bias.data(), true, batch.out.data(), s.n, threads,
        batch.scratch);
  };
  return median_seconds_after_warmup(repeats, call);
}

}  // namespace

void register_winograd_batch_testing(py::module_& testing, int (*thread_count)()) {
  testing.def("conv3x3_winograd_batch", [thread_count](const FloatArray& x, const FloatArray& k, const FloatArray& b,
                                                       bool relu, const std::string& isa) {
    return conv3x3_winograd_batch(x, k, b, relu, isa, thread_count());
  }, py::arg("x"), py::arg("kernel"), py::arg("bias"), py::arg("relu"), py::arg("isa"),
     "Winograd F(4x4, 3x3) over the whole NHWC batch in one call (U read once per block of tiles).");
  testing.def("time_conv3x3_winograd_batch", [thread_count](const FloatArray& x, const FloatArray& k,
                                                            const FloatArray& b, const std::string& isa, int repeats) {
    return time_conv3x3_winograd_batch(x, k, b, isa, repeats, thread_count());
  }, py::arg("x"), py::arg("kernel"), py::arg("bias"), py::arg("isa"), py::arg("repeats"),
     "Median seconds of one batched Winograd call over all of x, packing and layout excluded (for bench/).");
}

}  // namespace fastvgg
