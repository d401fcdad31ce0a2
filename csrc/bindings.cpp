// pybind11 bindings: the private module fastvgg._core.
//
// Arrays are checked here, before any pointer reaches a kernel, and every call that computes
// releases the GIL. The `testing` submodule exposes each kernel of each instruction set on
// NHWC arrays so the tests can hold them against the reference kernels.
#include <omp.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "bf16/bindings_bf16.h"
#include "timing.h"
#include "bf16/kernels_bf16.h"
#include "bindings_winograd_batch.h"
#include "cpu_features.h"
#include "crc32c.h"
#include "cpu_executor.h"
#include "graph.h"
#include "preprocess.h"

namespace py = pybind11;

namespace fastvgg {
double fma_peak_gflops(int threads, long iterations, const std::string& isa);  // csrc/fma_peak.cpp
void register_ops(pybind11::module_& m, pybind11::module_& testing);  // csrc/bindings_ops.cpp

// An activation's numbers as Python passes them: max_value None is no cap.
ActivationParams activation_params(float negative_slope, std::optional<float> max_value, float threshold) {
  return {negative_slope, max_value ? *max_value : kNoCap, threshold};
}
}
using namespace fastvgg;

namespace {

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

int thread_count() { return default_threads(); }

void require_ndim(const py::array& a, int ndim, const char* what) {
  if (a.ndim() != ndim)
    throw py::value_error(std::string(what) + " must have " + std::to_string(ndim) + " dimensions, got " +
                          std::to_string(a.ndim()));
}

void require_dim(const py::array& a, int axis, py::ssize_t size, const char* what) {
  if (a.shape(axis) != size)
    throw py::value_error(std::string(what) + " has size " + std::to_string(a.shape(axis)) + " on axis " +
                          std::to_string(axis) + ", expected " + std::to_string(size));
}

int checked_int(py::ssize_t v, const char* what) {
  if (v < 0 || v > (1 << 30)) throw py::value_error(std::string(what) + " is out of range");
  return int(v);
}

// Exceptions from the core become Python's: std::invalid_argument -> ValueError and
// std::out_of_range -> IndexError (pybind11's translation), std::logic_error (weights not
// loaded, misuse) -> RuntimeError.

const KernelTable* table_or_reference(const std::string& isa) {
  return isa == "reference" ? nullptr : &kernels_for(isa);
}

// Runs `op` over each image of an NHWC batch in the blocked layout of the given kernel table.
template <typename Op>
void per_blocked_image(const KernelTable& k, const float* x, int images, int h, int w, int c, float* y, int out_h,
                       int out_w, int out_c, Op op) {
  AlignedBuffer in_buf(blocked_image_size(c, h, w)), out_buf(blocked_image_size(out_c, out_h, out_w));
  BlockedImage in{in_buf.data(), c, h, w}, out{out_buf.data(), out_c, out_h, out_w};
  for (int n = 0; n < images; ++n) {
    k.nhwc_to_blocked(x + std::size_t(n) * h * w * c, in);
    zero_border(out);
    op(in, out);
    k.blocked_to_nhwc(out, y + std::size_t(n) * out_h * out_w * out_c);
  }
}

enum class KernelAlgorithm { Direct, Winograd };

KernelAlgorithm parse_conv_algorithm(const std::string& name) {
  if (name == "direct") return KernelAlgorithm::Direct;
  if (name == "winograd") return KernelAlgorithm::Winograd;
  throw py::value_error("unknown convolution algorithm '" + name + "'; expected 'direct' or 'winograd'");
}

// A 3x3 kernel and bias packed once for one method of one kernel table.
struct PackedConv3x3 {
  PackedConv3x3(const KernelTable& k, KernelAlgorithm algorithm, const float* kernel_hwio, const float* bias, int in_c,
                int out_c)
      : method(algorithm == KernelAlgorithm::Winograd ? k.conv3x3_winograd : k.conv3x3_direct),
        padded_bias(std::size_t(round_up_to_block(out_c))) {
    weights.resize((method.packed_bytes(in_c, out_c) + sizeof(float) - 1) / sizeof(float));
    method.pack(kernel_hwio, in_c, out_c, weights.data(), thread_count());
    std::copy(bias, bias + out_c, padded_bias.data());
  }
  void operator()(const BlockedImage& in, bool relu, const BlockedImage& out, int threads) {
    method.run(in, weights.data(), padded_bias.data(), relu, out, threads, scratch);
  }

  const Conv3x3Method& method;
  AlignedBuffer weights, padded_bias;
  KernelScratch scratch;
};

struct ConvShape {
  int n, h, w, c, f;
};

ConvShape check_conv3x3_args(const FloatArray& x, const FloatArray& kernel, const FloatArray& bias) {
  require_ndim(x, 4, "x");
  require_ndim(kernel, 4, "kernel");
  require_ndim(bias, 1, "bias");
  ConvShape s{checked_int(x.shape(0), "batch"), checked_int(x.shape(1), "height"), checked_int(x.shape(2), "width"),
              checked_int(x.shape(3), "channels"), checked_int(kernel.shape(3), "filters")};
  require_dim(kernel, 0, 3, "kernel");
  require_dim(kernel, 1, 3, "kernel");
  require_dim(kernel, 2, s.c, "kernel");
  require_dim(bias, 0, s.f, "bias");
  return s;
}

FloatArray run_conv3x3(const FloatArray& x, const FloatArray& kernel, const FloatArray& bias, bool relu,
                       const std::string& isa, KernelAlgorithm algorithm) {
  const ConvShape s = check_conv3x3_args(x, kernel, bias);
  FloatArray y({s.n, s.h, s.w, s.f});
  const KernelTable* k = table_or_reference(isa);
  const float *xp = x.data(), *kp = kernel.data(), *bp = bias.data();
  float* yp = y.mutable_data();
  {
    py::gil_scoped_release release;
    if (!k) {
      reference::conv3x3(xp, s.n, s.h, s.w, s.c, kp, bp, s.f, relu, yp);
    } else {
      PackedConv3x3 conv(*k, algorithm, kp, bp, s.c, s.f);
      per_blocked_image(*k, xp, s.n, s.h, s.w, s.c, yp, s.h, s.w, s.f,
                        [&](const BlockedImage& in, const BlockedImage& out) { conv(in, relu, out, thread_count()); });
    }
  }
  return y;
}

FloatArray test_conv3x3(const FloatArray& x, const FloatArray& kernel, const FloatArray& bias, bool relu,
                        const std::string& isa) {
  return run_conv3x3(x, kernel, bias, relu, isa, KernelAlgorithm::Direct);
}

FloatArray test_conv3x3_winograd(const FloatArray& x, const FloatArray& kernel, const FloatArray& bias, bool relu,
                                 const std::string& isa) {
  return run_conv3x3(x, kernel, bias, relu, isa, KernelAlgorithm::Winograd);
}

// Median seconds of one kernel call on the first image of x, weights packed and the image
// laid out once beforehand (so only the kernel is timed), after one untimed warm-up call.
double time_conv3x3(const FloatArray& x, const FloatArray& kernel, const FloatArray& bias,
                    const std::string& algorithm, const std::string& isa, int repeats) {
  const ConvShape s = check_conv3x3_args(x, kernel, bias);
  if (s.n < 1) throw py::value_error("x needs at least one image");
  if (repeats < 1) throw py::value_error("repeats must be at least 1");
  const KernelAlgorithm a = parse_conv_algorithm(algorithm);
  const KernelTable& k = kernels_for(isa);
  const float *xp = x.data(), *kp = kernel.data(), *bp = bias.data();
  py::gil_scoped_release release;
  PackedConv3x3 conv(k, a, kp, bp, s.c, s.f);
  AlignedBuffer in_buf(blocked_image_size(s.c, s.h, s.w)), out_buf(blocked_image_size(s.f, s.h, s.w));
  const BlockedImage in{in_buf.data(), s.c, s.h, s.w}, out{out_buf.data(), s.f, s.h, s.w};
  k.nhwc_to_blocked(xp, in);
  const int threads = thread_count();
  return median_seconds_after_warmup(repeats, [&] { conv(in, true, out, threads); });
}

FloatArray test_max_pool2x2(const FloatArray& x, const std::string& isa) {
  require_ndim(x, 4, "x");
  const int n = checked_int(x.shape(0), "batch"), h = checked_int(x.shape(1), "height"),
            w = checked_int(x.shape(2), "width"), c = checked_int(x.shape(3), "channels");
  if (h < 2 || w < 2) throw py::value_error("max_pool2x2 needs at least 2x2 pixels");
  FloatArray y({n, h / 2, w / 2, c});
  const KernelTable* k = table_or_reference(isa);
  const float* xp = x.data();
  float* yp = y.mutable_data();
  {
    py::gil_scoped_release release;
    if (!k) {
      reference::max_pool2x2(xp, n, h, w, c, yp);
    } else {
      per_blocked_image(*k, xp, n, h, w, c, yp, h / 2, w / 2, c, [&](const BlockedImage& in, const BlockedImage& out) {
        k->max_pool2x2(in, out, thread_count());
      });
    }
  }
  return y;
}

FloatArray test_global_pool(const FloatArray& x, const std::string& mode, const std::string& isa) {
  require_ndim(x, 4, "x");
  const int n = checked_int(x.shape(0), "batch"), h = checked_int(x.shape(1), "height"),
            w = checked_int(x.shape(2), "width"), c = checked_int(x.shape(3), "channels");
  const GlobalPoolMode m = parse_pool_mode(mode);
  FloatArray y({n, c});
  const KernelTable* k = table_or_reference(isa);
  const float* xp = x.data();
  float* yp = y.mutable_data();
  {
    py::gil_scoped_release release;
    if (!k) {
      reference::global_pool(xp, n, h, w, c, m, yp);
    } else {
      AlignedBuffer buf(blocked_image_size(c, h, w));
      BlockedImage img{buf.data(), c, h, w};
      for (int i = 0; i < n; ++i) {
        k->nhwc_to_blocked(xp + std::size_t(i) * h * w * c, img);
        k->global_pool(img, m, yp + std::size_t(i) * c);
      }
    }
  }
  return y;
}

FloatArray test_dense(const FloatArray& x, const FloatArray& kernel, const FloatArray& bias, bool relu,
                      const std::string& isa) {
  require_ndim(x, 2, "x");
  require_ndim(kernel, 2, "kernel");
  require_ndim(bias, 1, "bias");
  const int rows = checked_int(x.shape(0), "rows"), depth = checked_int(x.shape(1), "depth");
  const int cols = checked_int(kernel.shape(1), "units");
  require_dim(kernel, 0, depth, "kernel");
  require_dim(bias, 0, cols, "bias");
  FloatArray y({rows, cols});
  const KernelTable* k = table_or_reference(isa);
  const float *xp = x.data(), *kp = kernel.data(), *bp = bias.data();
  float* yp = y.mutable_data();
  {
    py::gil_scoped_release release;
    if (!k) {
      reference::dense(xp, rows, depth, kp, bp, cols, relu, yp);
    } else {
      const int padded = round_up_to_block(cols);
      AlignedBuffer packed((k->dense.packed_bytes(depth, cols) + sizeof(float) - 1) / sizeof(float));
      AlignedBuffer padded_bias{std::size_t(padded)};
      AlignedBuffer out(std::size_t(rows) * padded);
      k->dense.pack_rows(kp, 0, depth, depth, cols, packed.data(), thread_count());
      std::copy(bp, bp + cols, padded_bias.data());
      k->dense.run(xp, rows, depth, depth, packed.data(), padded_bias.data(), cols, relu, out.data(), padded,
                   thread_count());
      for (int r = 0; r < rows; ++r)
        std::copy(out.data() + std::size_t(r) * padded, out.data() + std::size_t(r) * padded + cols,
                  yp + std::size_t(r) * cols);
    }
  }
  return y;
}

FloatArray test_layout_roundtrip(const FloatArray& x, const std::string& isa) {
  require_ndim(x, 4, "x");
  const int n = checked_int(x.shape(0), "batch"), h = checked_int(x.shape(1), "height"),
            w = checked_int(x.shape(2), "width"), c = checked_int(x.shape(3), "channels");
  FloatArray y({n, h, w, c});
  const KernelTable& k = kernels_for(isa);
  const float* xp = x.data();
  float* yp = y.mutable_data();
  {
    py::gil_scoped_release release;
    per_blocked_image(k, xp, n, h, w, c, yp, h, w, c, [&](const BlockedImage& in, const BlockedImage& out) {
      std::copy(in.data, in.data + in.size(), out.data);
    });
  }
  return y;
}

// Batch, height and width of an NHWC input for a graph, checked.
struct InputSize {
  int count, height, width;
};

InputSize check_input(const Graph& graph, const py::array& x) {
  require_ndim(x, 4, "input");
  const InputSize size{checked_int(x.shape(0), "batch"), checked_int(x.shape(1), "height"),
                       checked_int(x.shape(2), "width")};
  require_dim(x, 3, graph.input_channels(), "input");
  graph.shapes(size.height, size.width);  // throws ValueError for sizes the graph cannot take
  return size;
}

std::vector<py::ssize_t> output_dims(int count, const OpShape& shape) {
  std::vector<py::ssize_t> dims{count};
  dims.insert(dims.end(), shape.begin(), shape.end());
  return dims;
}

int checked_op_index(const Graph& graph, py::ssize_t index) {
  if (index < 0 || index >= graph.op_count())
    throw py::index_error("layer index " + std::to_string(index) + " is out of range: the graph has " +
                          std::to_string(graph.op_count()) + " layers");
  return int(index);
}

// Runs x and writes into caller-owned arrays: each must be a writable, C-contiguous float32
// array of exactly (batch,) + the layer's shape, not overlapping the input or each other.
void forward_into(CpuExecutor& executor, const FloatArray& x, const py::list& requests) {
  const Graph& graph = executor.graph();
  const InputSize size = check_input(graph, x);
  const std::vector<OpShape> shapes = graph.shapes(size.height, size.width);
  std::vector<OutputRequest> outputs;
  std::vector<py::array> keep;  // holds the arrays for the duration of the call
  for (const py::handle item : requests) {
    const py::tuple request = py::reinterpret_borrow<py::object>(item).cast<py::tuple>();
    if (request.size() != 3)
      throw py::value_error("each output request is (layer_index, before_activation, out_array)");
    const int index = checked_op_index(graph, request[0].cast<py::ssize_t>());
    const bool before = request[1].cast<bool>();
    if (!py::isinstance<py::array>(request[2])) throw py::type_error("out_array must be a numpy array");
    py::array out = request[2].cast<py::array>();
    const std::vector<py::ssize_t> dims = output_dims(size.count, shapes[std::size_t(index)]);
    if (!out.dtype().is(py::dtype::of<float>()) || !(out.flags() & py::array::c_style) || !out.writeable())
      throw py::value_error("out_array for layer " + std::to_string(index) +
                            " must be a writable, C-contiguous float32 array");
    if (out.ndim() != py::ssize_t(dims.size()) || !std::equal(dims.begin(), dims.end(), out.shape()))
      throw py::value_error("out_array for layer " + std::to_string(index) + " has the wrong shape");
    const char* begin = static_cast<const char*>(out.data());
    const char* end = begin + out.nbytes();
    auto overlaps = [&](const py::array& other) {
      const char* b = static_cast<const char*>(other.data());
      return begin < b + other.nbytes() && b < end;
    };
    if (overlaps(x)) throw py::value_error("out_array for layer " + std::to_string(index) + " overlaps the input");
    for (const py::array& other : keep)
      if (overlaps(other)) throw py::value_error("two out_arrays overlap");
    outputs.push_back({index, before, static_cast<float*>(out.mutable_data())});
    keep.push_back(out);
  }
  const float* input = x.data();
  py::gil_scoped_release release;
  executor.forward(input, size.count, size.height, size.width, outputs);
}

py::list forward(CpuExecutor& executor, const FloatArray& x, const std::vector<py::ssize_t>& output_layers,
                 std::vector<bool> before_activation) {
  const Graph& graph = executor.graph();
  const InputSize size = check_input(graph, x);
  if (before_activation.empty()) before_activation.assign(output_layers.size(), false);
  if (before_activation.size() != output_layers.size())
    throw py::value_error("before_activation needs one flag per output layer");
  const std::vector<OpShape> shapes = graph.shapes(size.height, size.width);
  py::list results, requests;
  for (std::size_t k = 0; k < output_layers.size(); ++k) {
    const int index = checked_op_index(graph, output_layers[k]);
    FloatArray out(output_dims(size.count, shapes[std::size_t(index)]));
    requests.append(py::make_tuple(index, bool(before_activation[k]), out));
    results.append(out);
  }
  forward_into(executor, x, requests);
  return results;
}

py::dict describe_op(const Op& op) {
  py::dict d;
  d["kind"] = op_kind_name(op.kind);
  d["in_channels"] = op.in_channels;
  d["out_channels"] = op.out_channels;
  d["activation"] = activation_name(op.activation);
  d["pool_mode"] = pool_mode_name(op.pool_mode);
  d["kernel_size"] = op.kernel_size;
  d["padding"] = op.same_padding ? "same" : "valid";
  d["on_image"] = op.on_image;
  d["negative_slope"] = op.negative_slope;
  d["max_inverse_norm"] = op.max_inverse_norm;
  if (std::isfinite(op.max_value)) d["max_value"] = op.max_value;  // absent: no cap
  d["threshold"] = op.threshold;
  d["alpha_height"] = op.alpha_height;
  d["alpha_width"] = op.alpha_width;
  d["size_height"] = op.size_height;
  d["size_width"] = op.size_width;
  return d;
}

// `with executor.updating():` holds the weights for a sequence of set_* calls.
class WeightsUpdate {
 public:
  explicit WeightsUpdate(CpuExecutor& executor) : executor_(executor) {}
  void enter() {
    if (entered_) throw py::value_error("this update is already in progress");
    py::gil_scoped_release release;  // forwards in flight finish without needing the GIL
    executor_.begin_update();
    entered_ = true;
  }
  void exit() {
    if (!entered_) return;
    entered_ = false;
    executor_.end_update();
  }

 private:
  CpuExecutor& executor_;
  bool entered_ = false;
};

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "fastvgg's compiled core: a graph of VGG layers and the CPU executor that runs it";
  m.attr("__version__") = FASTVGG_VERSION;

  m.def("set_num_threads", [](int n) {
    if (n < 1) throw py::value_error("the number of threads must be at least 1, got " + std::to_string(n));
    set_default_threads(n);
  }, py::arg("n"), "Threads of every executor that has no thread count of its own.");
  m.def("get_num_threads", &thread_count);
  m.def("caffe_preprocess", [](const py::array& x, const py::array_t<float, py::array::c_style | py::array::forcecast>& bgr_mean) {
    // The caller (fastvgg.preprocess_input) passes C-contiguous uint8 or float32 with 3 channels
    // last; anything else is refused here rather than read wrongly.
    if (!(x.flags() & py::array::c_style)) throw py::value_error("caffe_preprocess needs a C-contiguous array");
    if (x.ndim() < 1 || x.shape(x.ndim() - 1) != 3)
      throw py::value_error("caffe_preprocess needs 3 channels on the last axis");
    if (bgr_mean.ndim() != 1 || bgr_mean.shape(0) != 3) throw py::value_error("bgr_mean must hold 3 values");
    const bool bytes = py::isinstance<py::array_t<std::uint8_t>>(x), floats = py::isinstance<py::array_t<float>>(x);
    if (!bytes && !floats) throw py::type_error("caffe_preprocess takes uint8 or float32 arrays");
    py::array_t<float> y(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
    const std::size_t pixels = std::size_t(x.size()) / 3;
    const float mean[3] = {bgr_mean.at(0), bgr_mean.at(1), bgr_mean.at(2)};
    const void* in = x.data();
    float* out = y.mutable_data();
    const int threads = thread_count();
    py::gil_scoped_release release;
    if (bytes)
      caffe_preprocess(static_cast<const std::uint8_t*>(in), pixels, mean, out, threads);
    else
      caffe_preprocess(static_cast<const float*>(in), pixels, mean, out, threads);
    return y;
  }, py::arg("x"), py::arg("bgr_mean"),
     "Keras's VGG preprocessing (RGB to BGR, minus bgr_mean) of C-contiguous uint8 or float32 images, 3 channels "
     "last, as float32: fastvgg.preprocess_input's fast path.");
  m.def("crc32c", [](const py::buffer& data, std::uint32_t crc) {
    // Any buffer (bytes, memoryview, a numpy view of a mapped file): C-contiguous bytes only,
    // so that what is summed is what the file holds, in its order.
    const py::buffer_info info = data.request();
    if (!PyBuffer_IsContiguous(info.view(), 'C'))
      throw py::value_error("crc32c needs a C-contiguous buffer; pass bytes or a contiguous array");
    const std::size_t size = std::size_t(info.size) * std::size_t(info.itemsize);
    py::gil_scoped_release release;
    return crc32c_extend(crc, info.ptr, size);
  }, py::arg("data"), py::arg("crc") = 0u,
     "CRC-32C (Castagnoli) of a C-contiguous buffer's bytes, continuing from `crc`: the checksum of TensorFlow's "
     "checkpoints. crc32c(b'123456789') == 0xE3069283.");
  m.def("available_isas", []() {
    std::vector<std::string> names;
    for (const KernelTable* t : supported_kernel_tables()) names.push_back(t->isa_name);
    return names;
  }, "Instruction sets with kernels in this build that this CPU runs, fastest first.");
  m.def("active_isa", []() { return std::string(active_kernels().isa_name); });
  m.def("set_isa", [](const std::string& isa) { set_active_kernels(isa); }, py::arg("isa"),
        "Use the kernels of another supported instruction set (for testing and benchmarking).");

  py::class_<Graph>(m, "Graph", "A chain of ops and their sizes; no weights (an executor holds those).")
      .def(py::init<int>(), py::arg("input_channels"))
      .def("add_conv3x3", [](Graph& g, int filters, const std::string& activation, float negative_slope,
                             std::optional<float> max_value, float threshold) {
        return g.add_conv3x3(filters, parse_activation(activation), activation_params(negative_slope, max_value, threshold));
      }, py::arg("filters"), py::arg("activation"), py::arg("negative_slope") = 0.0f, py::arg("max_value") = py::none(),
         py::arg("threshold") = 0.0f,
         "negative_slope: leaky_relu's slope for x < 0, or clipped_relu's below its threshold; max_value (None: no "
         "cap) and threshold: clipped_relu's. Other activations take none of them.")
      .def("add_max_pool2x2", &Graph::add_max_pool2x2)
      .def("add_flatten", &Graph::add_flatten)
      .def("add_global_pool", [](Graph& g, const std::string& mode) { return g.add_global_pool(parse_pool_mode(mode)); },
           py::arg("mode"))
      .def("add_dense", [](Graph& g, int in_features, int units, const std::string& activation, float negative_slope,
                           std::optional<float> max_value, float threshold) {
        return g.add_dense(in_features, units, parse_activation(activation),
                           activation_params(negative_slope, max_value, threshold));
      }, py::arg("in_features"), py::arg("units"), py::arg("activation"), py::arg("negative_slope") = 0.0f,
         py::arg("max_value") = py::none(), py::arg("threshold") = 0.0f)
      .def_property_readonly("layer_count", &Graph::op_count)
      .def_property_readonly("input_channels", &Graph::input_channels)
      .def("output_shapes", [](const Graph& g, int height, int width) {
        std::vector<py::tuple> out;
        for (const OpShape& s : g.shapes(height, width)) out.push_back(py::tuple(py::cast(s)));
        return out;
      }, py::arg("height"), py::arg("width"))
      .def("describe", [](const Graph& g) {
        py::list ops;
        for (const Op& op : g.ops()) ops.append(describe_op(op));
        return ops;
      }, "One dict per op: kind, in_channels, out_channels, activation, pool_mode, kernel_size, padding, on_image, "
         "negative_slope, max_inverse_norm, threshold, alpha_height, alpha_width, size_height, size_width, and "
         "max_value where clipped_relu has a cap.");

  py::class_<WeightsUpdate>(m, "WeightsUpdate", "Context manager from CpuExecutor.updating().")
      .def("__enter__", [](WeightsUpdate& u) { u.enter(); return &u; }, py::return_value_policy::reference)
      .def("__exit__", [](WeightsUpdate& u, py::args) { u.exit(); return false; });

  py::class_<CpuExecutor>(m, "CpuExecutor", "A graph's weights packed for this CPU's kernels, and the loop that runs it.")
      .def(py::init([](const Graph& graph, const std::string& precision) {
             const Precision p = parse_precision(precision);
             if (p == Precision::Bf16) {
               if (!bf16_kernel_set())
                 throw std::runtime_error(std::string("precision='bf16' is not available here: ") +
                                          bf16_unavailable_reason() + ". Use precision='fast'.");
               // The bf16 set's methods in place of the fp32 ones; pooling and layout stay fp32's.
               return std::make_unique<CpuExecutor>(graph, p, bf16_kernel_table(active_kernels()));
             }
             if (p == Precision::Bf16x3) {
               const KernelTable* amx = amx_bf16x3_kernel_table(active_kernels());
               if (!amx)
                 throw std::runtime_error("precision='bf16x3' is not available here: " + amx_unavailable_reason() +
                                          ". Use precision='fast' (float32, about 4x more accurate).");
               return std::make_unique<CpuExecutor>(graph, p, *amx);
             }
             return std::make_unique<CpuExecutor>(graph, p, active_kernels());
           }),
           py::arg("graph"), py::arg("precision") = "fast")
      .def_property_readonly("graph", &CpuExecutor::graph, py::return_value_policy::reference_internal)
      .def_property_readonly("precision", [](const CpuExecutor& e) { return std::string(precision_name(e.precision())); })
      .def_property_readonly("kernel_set", [](const CpuExecutor& e) { return std::string(e.kernels().isa_name); })
      .def("method", [](const CpuExecutor& e, py::ssize_t index) {
        return std::string(e.method_name(checked_op_index(e.graph(), index)));
      }, py::arg("index"), "The kernel method a layer runs by, e.g. 'winograd_f4x4_f32' ('' without weights; 'folded' for an affine map folded into the convolution before it).")
      .def_property("num_threads", &CpuExecutor::threads, [](CpuExecutor& e, int n) {
        if (n < 0) throw py::value_error("num_threads must be at least 1 (or 0 for the process default)");
        e.set_threads(n);
      }, "Threads this executor uses; setting 0 follows fastvgg.set_num_threads.")
      .def("weights_nbytes", &CpuExecutor::weights_bytes, py::call_guard<py::gil_scoped_release>(),
           "Bytes held by the packed weights.")
      .def("workspace_nbytes", &CpuExecutor::idle_workspace_bytes, "Bytes of workspace kept between calls.")
      .def("updating", [](CpuExecutor& e) { return WeightsUpdate(e); }, py::keep_alive<0, 1>(),
           "Context manager: forwards on other threads wait until the block's set_* calls are done.")
      .def("set_conv3x3_weights", [](CpuExecutor& e, py::ssize_t index, const FloatArray& kernel, const FloatArray& bias) {
        const int i = checked_op_index(e.graph(), index);
        const Op& op = e.graph().op(i);
        if (op.kind != OpKind::Conv3x3) throw py::value_error("layer " + std::to_string(i) + " is not a 3x3 convolution");
        require_ndim(kernel, 4, "kernel");
        require_dim(kernel, 0, 3, "kernel");
        require_dim(kernel, 1, 3, "kernel");
        require_dim(kernel, 2, op.in_channels, "kernel");
        require_dim(kernel, 3, op.out_channels, "kernel");
        require_ndim(bias, 1, "bias");
        require_dim(bias, 0, op.out_channels, "bias");
        const float *kp = kernel.data(), *bp = bias.data();
        py::gil_scoped_release release;
        e.set_conv3x3_weights(i, kp, bp);
      }, py::arg("index"), py::arg("kernel"), py::arg("bias"))
      .def("set_dense_kernel_rows", [](CpuExecutor& e, py::ssize_t index, py::ssize_t first_row, const FloatArray& rows) {
        const int i = checked_op_index(e.graph(), index);
        const Op& op = e.graph().op(i);
        if (op.kind != OpKind::Dense) throw py::value_error("layer " + std::to_string(i) + " is not dense");
        require_ndim(rows, 2, "kernel rows");
        require_dim(rows, 1, op.out_channels, "kernel rows");
        const py::ssize_t count = rows.shape(0);
        // Checked here in 64 bits, before any narrowing: first_row + count must stay inside the kernel.
        if (first_row < 0 || first_row > op.in_channels || count > op.in_channels - first_row)
          throw py::value_error("kernel rows [" + std::to_string(first_row) + ", " + std::to_string(first_row + count) +
                                ") are outside the " + std::to_string(op.in_channels) + " rows of layer " +
                                std::to_string(i));
        const float* rp = rows.data();
        py::gil_scoped_release release;
        e.set_dense_kernel_rows(i, int(first_row), int(count), rp);
      }, py::arg("index"), py::arg("first_row"), py::arg("rows"))
      .def("set_dense_bias", [](CpuExecutor& e, py::ssize_t index, const FloatArray& bias) {
        const int i = checked_op_index(e.graph(), index);
        const Op& op = e.graph().op(i);
        if (op.kind != OpKind::Dense) throw py::value_error("layer " + std::to_string(i) + " is not dense");
        require_ndim(bias, 1, "bias");
        require_dim(bias, 0, op.out_channels, "bias");
        const float* bp = bias.data();
        py::gil_scoped_release release;
        e.set_dense_bias(i, bp);
      }, py::arg("index"), py::arg("bias"))
      .def("weights_loaded", [](const CpuExecutor& e, py::ssize_t index) {
        return e.weights_loaded(checked_op_index(e.graph(), index));
      }, py::arg("index"))
      .def("get_weights", [](const CpuExecutor& e, py::ssize_t index) {
        const int i = checked_op_index(e.graph(), index);
        const Op& op = e.graph().op(i);
        if (!op.has_weights()) throw py::value_error("layer " + std::to_string(i) + " has no weights");
        const py::ssize_t k = op.kernel_size;
        FloatArray kernel(op.is_convolution()         ? std::vector<py::ssize_t>{k, k, op.in_channels, op.out_channels}
                          : op.kind == OpKind::Affine ? std::vector<py::ssize_t>{op.out_channels}
                          : op.kind == OpKind::PRelu
                              ? std::vector<py::ssize_t>{op.alpha_height, op.alpha_width, op.out_channels}
                              : std::vector<py::ssize_t>{op.in_channels, op.out_channels});
        FloatArray bias(std::vector<py::ssize_t>{op.out_channels});
        float *kp = kernel.mutable_data(), *bp = bias.mutable_data();
        {
          py::gil_scoped_release release;
          e.get_weights(i, kp, bp);
        }
        return py::make_tuple(kernel, bias);
      }, py::arg("index"))
      .def("forward", &forward, py::arg("x"), py::arg("output_layers"), py::arg("before_activation") = std::vector<bool>{},
           "Runs a float32 NHWC batch; returns the outputs of the given layers, in that order. "
           "before_activation[k] asks for convolution output_layers[k]'s sums before its ReLU.")
      .def("forward_into", &forward_into, py::arg("x"), py::arg("requests"),
           "Runs a float32 NHWC batch, writing each (layer_index, before_activation, out_array) request's output "
           "straight into out_array (C-contiguous float32 of shape (batch,) + the layer's shape).")
      .def("packed_sections", [](py::object self) {
        CpuExecutor& e = self.cast<CpuExecutor&>();  // non-const: settles pending folds first
        // Read-only views, not copies; each keeps the executor alive. Replacing a layer's
        // weights (set_*) frees what an older view shows: take views, write them, drop them.
        py::list sections;
        for (const CpuExecutor::Section& s : e.packed_sections()) {
          py::array view(py::dtype("uint8"), {py::ssize_t(s.bytes)}, {py::ssize_t(1)},
                         static_cast<const std::uint8_t*>(s.data), self);
          view.attr("flags").attr("writeable") = false;
          sections.append(py::make_tuple(s.name, view));
        }
        return sections;
      }, "The packed weights as the kernels read them: [(name, read-only uint8 view)], for a cache file.")
      .def("adopt_section", [](CpuExecutor& e, const std::string& name, const py::buffer& buffer) {
        py::buffer_info info = buffer.request();
        if (info.ndim != 1 || info.itemsize != 1 || info.strides[0] != 1)
          throw py::value_error("a packed section must be a contiguous 1-D byte buffer");
        // The buffer object stays alive as long as the executor uses its memory.
        auto* owner = new py::object(py::reinterpret_borrow<py::object>(buffer));
        std::shared_ptr<const void> keepalive(owner, [](const py::object* o) {
          py::gil_scoped_acquire gil;
          delete o;
        });
        const void* data = info.ptr;
        const std::size_t bytes = std::size_t(info.size);
        py::gil_scoped_release release;
        e.adopt_section(name, data, bytes, std::move(keepalive));
      }, py::arg("name"), py::arg("buffer"),
         "Uses `buffer` (e.g. a numpy view of a mapped cache file) as the packed section `name`, without copying.");

  py::module_ testing = m.def_submodule("testing", "Single kernels on NHWC arrays, for comparing ISAs with the reference.");
  testing.def("conv3x3", &test_conv3x3, py::arg("x"), py::arg("kernel"), py::arg("bias"), py::arg("relu"), py::arg("isa"));
  testing.def("conv3x3_winograd", &test_conv3x3_winograd, py::arg("x"), py::arg("kernel"), py::arg("bias"),
              py::arg("relu"), py::arg("isa"));
  testing.def("time_conv3x3", &time_conv3x3, py::arg("x"), py::arg("kernel"), py::arg("bias"), py::arg("algorithm"),
              py::arg("isa"), py::arg("repeats"),
              "Median seconds of one call of a 3x3 kernel ('direct' or 'winograd') on x[0], packing excluded.");
  testing.def("max_pool2x2", &test_max_pool2x2, py::arg("x"), py::arg("isa"));
  testing.def("global_pool", &test_global_pool, py::arg("x"), py::arg("mode"), py::arg("isa"));
  testing.def("dense", &test_dense, py::arg("x"), py::arg("kernel"), py::arg("bias"), py::arg("relu"), py::arg("isa"));
  testing.def("softmax", [](const FloatArray& x) {
    require_ndim(x, 2, "x");
    FloatArray y(std::vector<py::ssize_t>{x.shape(0), x.shape(1)});
    std::copy(x.data(), x.data() + x.size(), y.mutable_data());
    softmax_rows(y.mutable_data(), int(x.shape(0)), int(x.shape(1)), x.shape(1));
    return y;
  }, py::arg("x"));
  testing.def("crc32c_table", [](const py::bytes& data, std::uint32_t crc) {
    const std::string bytes = data;
    return crc32c_extend_table(crc, bytes.data(), bytes.size());
  }, py::arg("data"), py::arg("crc") = 0u, "crc32c's table path, whatever the CPU has (its plain twin).");
  register_ops(m, testing);
  testing.def("layout_roundtrip", &test_layout_roundtrip, py::arg("x"), py::arg("isa"));
  testing.def("fma_peak_gflops", [](int threads, long iterations, const std::string& isa) {
    py::gil_scoped_release release;
    return fma_peak_gflops(threads, iterations, isa);
  }, py::arg("threads"), py::arg("iterations") = 20000000L, py::arg("isa") = "auto",
     "Measured fp32 FMA GFLOP/s of `threads` threads (csrc/fma_peak.cpp), for bench/.");
  register_bf16_testing(testing, &thread_count);
  register_winograd_batch_testing(testing, &thread_count);
}
