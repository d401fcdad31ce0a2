// Test and bench bindings of the bf16 kernel set, added to fastvgg._core.testing.
//
// Arrays are checked here before any pointer reaches a kernel; every call that computes
// releases the GIL. The kernels take blocked images, so the NHWC arrays go through the
// layout functions of the fastest fp32 kernel table (every table writes the same layout).
#include "bf16/bindings_bf16.h"

#include <omp.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>  // bf16_kernel_sets returns a std::vector<std::string>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "bf16/kernels_bf16.h"
#include "cpu_features.h"
#include "kernels.h"
#include "timing.h"

namespace py = pybind11;

namespace fastvgg {
double bf16_dot_peak_gflops(int threads, long iterations);  // dot_peak_bf16.cpp
double amx_bf16_peak_gflops(int threads, long iterations);  // dot_peak_bf16.cpp

namespace {

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

const Bf16KernelSet& require_bf16() {
  const Bf16KernelSet* set = bf16_kernel_set();
  if (!set) throw std::runtime_error(std::string("bf16 kernels unavailable: ") + bf16_unavailable_reason());
  return *set;
}

void require_shape(const py::array& a, std::vector<py::ssize_t> expected, const char* what) {
  bool ok = a.ndim() == py::ssize_t(expected.size());
  for (std::size_t i = 0; ok && i < expected.size(); ++i) ok = expected[i] < 0 || a.shape(py::ssize_t(i)) == expected[i];
  if (ok) return;
  std::string got = "(", want = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) got += std::to_string(a.shape(i)) + (i + 1 < a.ndim() ? ", " : "");
  for (std::size_t i = 0; i < expected.size(); ++i)
    want += (expected[i] < 0 ? std::string("any") : std::to_string(expected[i])) + (i + 1 < expected.size() ? ", " : "");
  throw py::value_error(std::string(what) + " has shape " + got + "), expected " + want + ")");
}

int positive_int(py::ssize_t v, const char* what) {
  if (v < 1 || v > (1 << 30)) throw py::value_error(std::string(what) + " must be between 1 and 2**30, got " + std::to_string(v));
  return int(v);
}

struct ConvShape {
  int n, h, w, c, f;
};

ConvShape check_conv(const FloatArray& x, const FloatArray& kernel, const FloatArray& bias) {
  require_shape(x, {-1, -1, -1, -1}, "x (NHWC)");
  const ConvShape s{positive_int(x.shape(0), "batch"), positive_int(x.shape(1), "height"),
                    positive_int(x.shape(2), "width"), positive_int(x.shape(3), "channels"),
                    kernel.ndim() == 4 ? positive_int(kernel.shape(3), "filters") : 0};
  require_shape(kernel, {3, 3, s.c, -1}, "kernel (HWIO)");
  require_shape(bias, {s.f}, "bias");
  return s;
}

// A convolution algorithm of the testing API names one method of one of the runnable sets.
struct Bf16ConvAlgorithm {
  const char* algorithm;  // the testing API's name
  const char* method;     // the method's (and layout's) name in its set
  bool amx;               // runs on AMX tiles: amx_unavailable_reason says why it cannot
};
constexpr Bf16ConvAlgorithm kConvAlgorithms[] = {
    {"direct", "direct_bf16", false},
    {"winograd_int14", "winograd_f4x4_int14", false},
    {"amx", "direct_bf16_amx", true},
    {"amx_x3", "direct_bf16x3_amx", true}};

// Why the method of `a` cannot run here.
std::string unavailable_reason(const Bf16ConvAlgorithm& a) {
  return a.amx ? amx_unavailable_reason() : bf16_unavailable_reason();
}

// The runnable set's method of that name, or nullptr.
const Conv3x3Method* find_conv_method(const std::string& method_name) {
  for (const Bf16KernelSet* set : bf16_kernel_sets())
    for (const Conv3x3Method* method : {&set->conv3x3_direct, &set->conv3x3_winograd})
      if (method->run != nullptr && method_name == method->name) return method;
  const Conv3x3Method* x3 = amx_x3_conv_method();
  return x3 && method_name == x3->name ? x3 : nullptr;
}

const Conv3x3Method& conv_method_for(const std::string& algorithm) {
  for (const Bf16ConvAlgorithm& a : kConvAlgorithms) {
    if (algorithm != a.algorithm) continue;
    require_bf16();
    if (const Conv3x3Method* method = find_conv_method(a.method)) return *method;
    throw std::runtime_error(std::string("the bf16 convolution '") + algorithm + "' cannot run here: " +
                             unavailable_reason(a));
  }
  throw py::value_error("unknown algorithm '" + algorithm +
                        "'; expected 'direct' (bf16), 'winograd_int14', 'amx' (bf16 on AMX tiles) or 'amx_x3' "
                        "(bf16x3 on AMX tiles)");
}

// The packed weights and block-padded bias of one conv layer for one method.
struct PackedConv {
  PackedConv(const Conv3x3Method& conv_method, const float* kernel, const float* bias, int in_c, int out_c, int threads)
      : method(conv_method),
        weights((method.packed_bytes(in_c, out_c) + sizeof(float) - 1) / sizeof(float), /*zeroed=*/false),
        padded_bias(std::size_t(round_up_to_block(out_c)), 0.0f) {
    method.pack(kernel, in_c, out_c, weights.data(), threads);
    std::copy(bias, bias + out_c, padded_bias.begin());
  }
  void operator()(const BlockedImage& in, bool relu, const BlockedImage& out, int threads) const {
    method.run(in, weights.data(), padded_bias.data(), relu, out, threads, scratch);
  }
  const Conv3x3Method& method;
  AlignedBuffer weights;
  std::vector<float> padded_bias;
  mutable KernelScratch scratch;
};

// How the testing binding calls a method: image by image (run), the whole batch in one call
// (run_batch), or that with the 2x2 max pool (run_batch_max_pool; the result is then
// floor(h/2) x floor(w/2)).
enum class ConvForm { Image, Batch, MaxPool };

ConvForm conv_form(const std::string& form) {
  if (form == "image") return ConvForm::Image;
  if (form == "batch") return ConvForm::Batch;
  if (form == "max_pool") return ConvForm::MaxPool;
  throw py::value_error("unknown form '" + form + "'; expected 'image', 'batch' or 'max_pool'");
}

FloatArray run_conv(const FloatArray& x, const FloatArray& kernel, const FloatArray& bias, bool relu,
                    const std::string& algorithm, ConvForm form, int (*thread_count)()) {
  const ConvShape s = check_conv(x, kernel, bias);
  const Conv3x3Method& method = conv_method_for(algorithm);
  const bool pool = form == ConvForm::MaxPool;
  const auto batch_run = pool ? method.run_batch_max_pool : method.run_batch;
  if (form != ConvForm::Image && !batch_run)
    throw py::value_error("the bf16 convolution '" + algorithm + "' has no " + (pool ? "max-pool" : "batch") + " form");
  const int out_h = pool ? s.h / 2 : s.h, out_w = pool ? s.w / 2 : s.w;
  FloatArray y({s.n, out_h, out_w, s.f});
  const float *xp = x.data(), *kp = kernel.data(), *bp = bias.data();
  float* yp = y.mutable_data();
  const int threads = thread_count();
  py::gil_scoped_release release;
  const KernelTable& layout = *supported_kernel_tables().front();
  const PackedConv conv(method, kp, bp, s.c, s.f, threads);
  const std::size_t in_size = blocked_image_size(s.c, s.h, s.w), out_size = blocked_image_size(s.f, out_h, out_w);
  AlignedBuffer in_buf(in_size * std::size_t(s.n)), out_buf(out_size * std::size_t(s.n));
  std::vector<BlockedImage> ins, outs;
  for (int n = 0; n < s.n; ++n) {
    ins.push_back({in_buf.data() + in_size * std::size_t(n), s.c, s.h, s.w});
    outs.push_back({out_buf.data() + out_size * std::size_t(n), s.f, out_h, out_w});
    layout.nhwc_to_blocked(xp + std::size_t(n) * s.h * s.w * s.c, ins.back());
  }
  if (form == ConvForm::Image) {
    for (int n = 0; n < s.n; ++n) conv(ins[std::size_t(n)], relu, outs[std::size_t(n)], threads);
  } else {
    batch_run(ins.data(), conv.weights.data(), conv.padded_bias.data(), relu, outs.data(), s.n, threads, conv.scratch);
  }
  for (int n = 0; n < s.n; ++n)
    layout.blocked_to_nhwc(outs[std::size_t(n)], yp + std::size_t(n) * out_h * out_w * s.f);
  return y;
}

using ReferenceConv = void (*)(const float*, int, int, int, int, const float*, const float*, int, bool, float*);

FloatArray run_reference_conv(const FloatArray& x, const FloatArray& kernel, const FloatArray& bias, bool relu,
                              ReferenceConv reference_conv) {
  const ConvShape s = check_conv(x, kernel, bias);
  FloatArray y({s.n, s.h, s.w, s.f});
  const float *xp = x.data(), *kp = kernel.data(), *bp = bias.data();
  float* yp = y.mutable_data();
  py::gil_scoped_release release;
  reference_conv(xp, s.n, s.h, s.w, s.c, kp, bp, s.f, relu, yp);
  return y;
}

double time_conv(const FloatArray& x, const FloatArray& kernel, const FloatArray& bias, const std::string& algorithm,
                 int repeats, int (*thread_count)()) {
  const ConvShape s = check_conv(x, kernel, bias);
  if (repeats < 1) throw py::value_error("repeats must be at least 1");
  const Conv3x3Method& method = conv_method_for(algorithm);
  const float *xp = x.data(), *kp = kernel.data(), *bp = bias.data();
  const int threads = thread_count();
  py::gil_scoped_release release;
  const PackedConv conv(method, kp, bp, s.c, s.f, threads);
  AlignedBuffer in_buf(blocked_image_size(s.c, s.h, s.w)), out_buf(blocked_image_size(s.f, s.h, s.w));
  const BlockedImage in{in_buf.data(), s.c, s.h, s.w}, out{out_buf.data(), s.f, s.h, s.w};
  supported_kernel_tables().front()->nhwc_to_blocked(xp, in);
  return median_seconds_after_warmup(repeats, [&] { conv(in, true, out, threads); });
}

struct DenseShape {
  int rows, depth, cols;
};

DenseShape check_dense(const FloatArray& x, const FloatArray& kernel, const FloatArray& bias) {
  require_shape(x, {-1, -1}, "x (rows, depth)");
  const DenseShape s{positive_int(x.shape(0), "rows"), positive_int(x.shape(1), "depth"),
                     kernel.ndim() == 2 ? positive_int(kernel.shape(1), "units") : 0};
  require_shape(kernel, {s.depth, -1}, "kernel (depth, units)");
  require_shape(bias, {s.cols}, "bias");
  return s;
}

FloatArray dense_bf16(const FloatArray& x, const FloatArray& kernel, const FloatArray& bias, bool relu,
                      int (*thread_count)()) {
  const DenseShape s = check_dense(x, kernel, bias);
  const Bf16KernelSet& set = require_bf16();
  FloatArray y({s.rows, s.cols});
  const float *xp = x.data(), *kp = kernel.data(), *bp = bias.data();
  float* yp = y.mutable_data();
  const int threads = thread_count();
  py::gil_scoped_release release;
  const int padded = round_up_to_block(s.cols);
  const DenseMethod& method = set.dense;
  AlignedBuffer packed((method.packed_bytes(s.depth, s.cols) + sizeof(float) - 1) / sizeof(float));  // zeroed
  // Packed in two pieces, as a loader streaming rows from a file would (the split is odd on
  // purpose: a piece may start on the second row of a pair).
  const int split = s.depth / 2 | 1;
  const int first_piece = std::min(split, s.depth);
  method.pack_rows(kp, 0, first_piece, s.depth, s.cols, packed.data(), threads);
  if (first_piece < s.depth)
    method.pack_rows(kp + std::size_t(first_piece) * s.cols, first_piece, s.depth - first_piece, s.depth, s.cols,
                     packed.data(), threads);
  std::vector<float> padded_bias(std::size_t(padded), 0.0f), out(std::size_t(s.rows) * padded);
  std::copy(bp, bp + s.cols, padded_bias.begin());
  method.run(xp, s.rows, s.depth, s.depth, packed.data(), padded_bias.data(), s.cols, relu, out.data(), padded, threads);
  for (int r = 0; r < s.rows; ++r)
    std::copy_n(out.data() + std::size_t(r) * padded, s.cols, yp + std::size_t(r) * s.cols);
  return y;
}

// Median seconds of one bf16 dense call on x, weights packed once beforehand (for bench/).
double time_dense_bf16(const FloatArray& x, const FloatArray& kernel, const FloatArray& bias, int repeats,
                       int (*thread_count)()) {
  const DenseShape s = check_dense(x, kernel, bias);
  if (repeats < 1) throw py::value_error("repeats must be at least 1");
  const Bf16KernelSet& set = require_bf16();
  const float *xp = x.data(), *kp = kernel.data(), *bp = bias.data();
  const int threads = thread_count();
  py::gil_scoped_release release;
  const int padded = round_up_to_block(s.cols);
  const DenseMethod& method = set.dense;
  AlignedBuffer packed((method.packed_bytes(s.depth, s.cols) + sizeof(float) - 1) / sizeof(float));  // zeroed
  method.pack_rows(kp, 0, s.depth, s.depth, s.cols, packed.data(), threads);
  std::vector<float> padded_bias(std::size_t(padded), 0.0f), out(std::size_t(s.rows) * padded);
  std::copy(bp, bp + s.cols, padded_bias.begin());
  auto call = [&] {
    method.run(xp, s.rows, s.depth, s.depth, packed.data(), padded_bias.data(), s.cols, true, out.data(), padded, threads);
  };
  return median_seconds_after_warmup(repeats, call);
}

FloatArray dense_bf16_reference(const FloatArray& x, const FloatArray& kernel, const FloatArray& bias, bool relu) {
  const DenseShape s = check_dense(x, kernel, bias);
  FloatArray y({s.rows, s.cols});
  const float *xp = x.data(), *kp = kernel.data(), *bp = bias.data();
  float* yp = y.mutable_data();
  py::gil_scoped_release release;
  reference::dense_bf16(xp, s.rows, s.depth, kp, bp, s.cols, relu, yp);
  return y;
}

// Each value rounded to bf16 and widened back to float32, by the hardware or by round_to_bf16.
FloatArray round_to_bf16_array(const FloatArray& x, const std::string& how) {
  if (how != "hardware" && how != "reference")
    throw py::value_error("unknown rounding '" + how + "'; expected 'hardware' or 'reference'");
  const Bf16KernelSet* set = how == "hardware" ? &require_bf16() : nullptr;
  std::vector<py::ssize_t> dims(x.shape(), x.shape() + x.ndim());
  FloatArray y(dims);
  const std::size_t count = std::size_t(x.size());
  const float* xp = x.data();
  float* yp = y.mutable_data();
  py::gil_scoped_release release;
  std::vector<std::uint16_t> rounded(count);
  if (set) {
    set->round_to_bf16(xp, count, rounded.data());
  } else {
    for (std::size_t i = 0; i < count; ++i) rounded[i] = round_to_bf16(xp[i]);
  }
  for (std::size_t i = 0; i < count; ++i) yp[i] = bf16_to_float(rounded[i]);
  return y;
}

// Pack then unpack with one of the set's methods: the weights as the kernels see them.
FloatArray unpack_roundtrip(const FloatArray& kernel, const std::string& method_name, int threads) {
  const Bf16KernelSet& set = require_bf16();
  if (method_name == "dense_bf16") {
    require_shape(kernel, {-1, -1}, "kernel (depth, units)");
    const int depth = positive_int(kernel.shape(0), "depth"), cols = positive_int(kernel.shape(1), "units");
    FloatArray result({depth, cols});
    const float* kp = kernel.data();
    float* rp = result.mutable_data();
    py::gil_scoped_release release;
    AlignedBuffer packed((set.dense.packed_bytes(depth, cols) + sizeof(float) - 1) / sizeof(float));
    set.dense.pack_rows(kp, 0, depth, depth, cols, packed.data(), threads);
    set.dense.unpack(packed.data(), depth, cols, rp, threads);
    return result;
  }
  const Bf16ConvAlgorithm* known = nullptr;
  for (const Bf16ConvAlgorithm& a : kConvAlgorithms)
    if (method_name == a.method) known = &a;
  if (!known)
    throw py::value_error("unknown method '" + method_name +
                          "'; expected 'direct_bf16', 'winograd_f4x4_int14', 'direct_bf16_amx', 'direct_bf16x3_amx' or "
                          "'dense_bf16'");
  const Conv3x3Method* method = find_conv_method(method_name);
  if (!method)
    throw std::runtime_error("the bf16 method '" + method_name + "' cannot run here: " + unavailable_reason(*known));
  require_shape(kernel, {3, 3, -1, -1}, "kernel (HWIO)");
  const int in_c = positive_int(kernel.shape(2), "channels"), out_c = positive_int(kernel.shape(3), "filters");
  FloatArray result({3, 3, in_c, out_c});
  const float* kp = kernel.data();
  float* rp = result.mutable_data();
  py::gil_scoped_release release;
  AlignedBuffer packed((method->packed_bytes(in_c, out_c) + sizeof(float) - 1) / sizeof(float));
  method->pack(kp, in_c, out_c, packed.data(), threads);
  method->unpack(packed.data(), in_c, out_c, rp, threads);
  return result;
}

}  // namespace

void register_bf16_testing(py::module_& testing, int (*thread_count)()) {
  testing.def("bf16_unavailable_reason", []() { return bf16_unavailable_reason(); },
              "Why the bf16 kernels cannot run here, or '' when they can.");
  testing.def("conv3x3_bf16", [thread_count](const FloatArray& x, const FloatArray& k, const FloatArray& b, bool relu) {
    return run_conv(x, k, b, relu, "direct", ConvForm::Image, thread_count);
  }, py::arg("x"), py::arg("kernel"), py::arg("bias"), py::arg("relu"),
     "The bf16 3x3 convolution (vdpbf16ps) on an NHWC batch; raises RuntimeError where the CPU lacks AVX512_BF16.");
  testing.def("conv3x3_bf16_amx", [thread_count](const FloatArray& x, const FloatArray& k, const FloatArray& b, bool relu,
                                                 const std::string& form) {
    return run_conv(x, k, b, relu, "amx", conv_form(form), thread_count);
  }, py::arg("x"), py::arg("kernel"), py::arg("bias"), py::arg("relu"), py::arg("form") = "image",
     "The bf16 3x3 convolution on AMX tiles (TDPBF16PS) on an NHWC batch, image by image ('image'), in one batch call "
     "('batch') or with the fused 2x2 max pool ('max_pool'); raises RuntimeError without AMX-BF16.");
  testing.def("conv3x3_bf16x3_amx", [thread_count](const FloatArray& x, const FloatArray& k, const FloatArray& b,
                                                   bool relu, const std::string& form) {
    return run_conv(x, k, b, relu, "amx_x3", conv_form(form), thread_count);
  }, py::arg("x"), py::arg("kernel"), py::arg("bias"), py::arg("relu"), py::arg("form") = "image",
     "The 3x3 convolution of precision='bf16x3' on AMX tiles: inputs and weights as bf16 hi + lo, three products; forms as "
     "conv3x3_bf16_amx's. RuntimeError without AMX-BF16.");
  testing.def("conv3x3_bf16x3_reference", [](const FloatArray& x, const FloatArray& k, const FloatArray& b, bool relu) {
    return run_reference_conv(x, k, b, relu, &reference::conv3x3_bf16x3);
  }, py::arg("x"), py::arg("kernel"), py::arg("bias"), py::arg("relu"),
     "Plain twin of the bf16x3 AMX convolution: hi*hi + lo*hi + hi*lo of the split inputs and weights, in double.");
  testing.def("conv3x3_bf16_split_reference", [](const FloatArray& x, const FloatArray& k, const FloatArray& b, bool relu) {
    return run_reference_conv(x, k, b, relu, &reference::conv3x3_bf16_split);
  }, py::arg("x"), py::arg("kernel"), py::arg("bias"), py::arg("relu"),
     "Plain twin of the AMX convolution: weights rounded to bf16, inputs as bf16 hi + lo, products summed in double.");
  testing.def("amx_unavailable_reason", []() { return amx_unavailable_reason(); },
              "Why the AMX kernels cannot run here, or '' when they can.");
  testing.def("bf16_kernel_sets", []() {
    std::vector<std::string> names;
    for (const Bf16KernelSet* set : bf16_kernel_sets()) names.push_back(set->name);
    return names;
  }, "Names of the bf16 kernel sets this build and CPU run, the default first.");
  testing.def("conv3x3_bf16_reference", [](const FloatArray& x, const FloatArray& k, const FloatArray& b, bool relu) {
    return run_reference_conv(x, k, b, relu, &reference::conv3x3_bf16);
  }, py::arg("x"), py::arg("kernel"), py::arg("bias"), py::arg("relu"),
     "Plain twin: inputs and weights rounded to bf16, products summed in double.");
  testing.def("conv3x3_winograd_int14", [thread_count](const FloatArray& x, const FloatArray& k, const FloatArray& b,
                                                       bool relu) {
    return run_conv(x, k, b, relu, "winograd_int14", ConvForm::Image, thread_count);
  }, py::arg("x"), py::arg("kernel"), py::arg("bias"), py::arg("relu"),
     "Winograd F(4x4, 3x3) with int14 products (vpdpwssd) on an NHWC batch.");
  testing.def("conv3x3_winograd_int14_reference", [](const FloatArray& x, const FloatArray& k, const FloatArray& b,
                                                     bool relu) {
    return run_reference_conv(x, k, b, relu, &reference::conv3x3_winograd_int14);
  }, py::arg("x"), py::arg("kernel"), py::arg("bias"), py::arg("relu"),
     "Plain twin in double with the same int14 quantisation.");
  testing.def("dense_bf16", [thread_count](const FloatArray& x, const FloatArray& k, const FloatArray& b, bool relu) {
    return dense_bf16(x, k, b, relu, thread_count);
  }, py::arg("x"), py::arg("kernel"), py::arg("bias"), py::arg("relu"));
  testing.def("dense_bf16_reference", &dense_bf16_reference, py::arg("x"), py::arg("kernel"), py::arg("bias"),
              py::arg("relu"));
  testing.def("round_to_bf16", &round_to_bf16_array, py::arg("x"), py::arg("how"),
              "x rounded to bf16 and back to float32 by 'hardware' (vcvtneps2bf16) or 'reference' (plain C++).");
  testing.def("time_conv3x3_bf16", [thread_count](const FloatArray& x, const FloatArray& k, const FloatArray& b, int repeats,
                                                  const std::string& algorithm) {
    return time_conv(x, k, b, algorithm, repeats, thread_count);
  }, py::arg("x"), py::arg("kernel"), py::arg("bias"), py::arg("repeats"), py::arg("algorithm") = "direct",
     "Median seconds of one call of the bf16 convolution 'direct', 'winograd_int14' or 'amx' on x[0], packing and "
     "layout excluded (for bench/).");
  testing.def("time_dense_bf16", [thread_count](const FloatArray& x, const FloatArray& k, const FloatArray& b, int repeats) {
    return time_dense_bf16(x, k, b, repeats, thread_count);
  }, py::arg("x"), py::arg("kernel"), py::arg("bias"), py::arg("repeats"),
     "Median seconds of one bf16 dense call on x, packing excluded (for bench/).");
  testing.def("bf16_unpack_roundtrip", [thread_count](const FloatArray& kernel, const std::string& method) {
    return unpack_roundtrip(kernel, method, thread_count());
  }, py::arg("kernel"), py::arg("method"),
     "A kernel packed and unpacked by a bf16 method ('direct_bf16', 'winograd_f4x4_int14', 'direct_bf16_amx', "
     "'dense_bf16').");
  testing.def("amx_bf16_peak_gflops", [](int threads, long iterations) {
    py::gil_scoped_release release;
    return amx_bf16_peak_gflops(threads, iterations);
  }, py::arg("threads"), py::arg("iterations") = 2000000L,
     "Measured TDPBF16PS GFLOP/s of `threads` threads (csrc/bf16/dot_peak_bf16.cpp), for bench/; ValueError without AMX.");
  testing.def("bf16_dot_peak_gflops", [](int threads, long iterations) {
    py::gil_scoped_release release;
    return bf16_dot_peak_gflops(threads, iterations);
  }, py::arg("threads"), py::arg("iterations") = 20000000L,
     "Measured vdpbf16ps GFLOP/s of `threads` threads (csrc/bf16/dot_peak_bf16.cpp), for bench/.");
}

}  // namespace fastvgg
