// pybind11 bindings of the CUDA executor: fastvgg._cuda (linked with executor.cu built by
// nvcc and static cudart), or, built by the tests with FASTVGG_CUDA_EMULATE, the same bindings
// over the CPU grid emulator (_cuda_emulated). Host compiler only: no CUDA header here.
//
// The executor offers the CPU executor's methods and is built from _core.Graph.describe()'s
// list of dicts, so no pybind11 type crosses between the two modules. Every op kind and
// activation the graph has runs here; errors about an op start with "op <index>: ", which
// fastvgg/cuda.py turns into the name of the model's layer. Arrays are checked here
// before any pointer reaches C++, and every call that computes releases the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "executor.h"

#ifndef FASTVGG_CUDA_MODULE_NAME
#define FASTVGG_CUDA_MODULE_NAME _cuda
#endif

namespace py = pybind11;
using fastvgg::cuda::Executor;
using fastvgg::cuda::OpSpec;
using fastvgg::cuda::OutputRequest;

namespace {

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

int checked_int(py::ssize_t v, const char* what) {
  if (v < 0 || v > (1 << 30)) throw py::value_error(std::string(what) + " is out of range");
  return int(v);
}

void require_shape(const py::array& a, const std::vector<py::ssize_t>& shape, const char* what) {
  bool same = a.ndim() == py::ssize_t(shape.size());
  for (std::size_t i = 0; same && i < shape.size(); ++i) same = a.shape(py::ssize_t(i)) == shape[i];
  if (!same) {
    std::string want = "(", got = "(";
    for (auto d : shape) want += std::to_string(d) + ",";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) got += std::to_string(a.shape(i)) + ",";
    throw py::value_error(std::string(what) + " must have shape " + want + ") but has shape " + got + ")");
  }
}

// csrc/graph.h's Activation, in its order (OpSpec::activation).
const char* const kActivationNames[] = {"linear",       "relu",         "softmax",      "sigmoid",
                                         "tanh",         "elu",          "selu",         "gelu",
                                         "swish",        "softplus",     "leaky_relu",   "l2_normalize",
                                         "clipped_relu", "softsign",     "exponential",  "mish",
                                         "hard_sigmoid", "hard_sigmoid_keras2", "hard_silu"};

int parse_activation(const std::string& name) {
  for (int i = 0; i < int(sizeof(kActivationNames) / sizeof(kActivationNames[0])); ++i)
    if (name == kActivationNames[i]) return i;
  if (name == "silu") return 8;         // Keras 3's name for swish
  if (name == "hard_swish") return 18;  // and for hard_silu
  throw py::value_error("unknown activation '" + name +
                        "'; expected linear, relu, softmax, sigmoid, tanh, elu, selu, gelu, swish (silu), softplus, "
                        "leaky_relu, l2_normalize, clipped_relu, softsign, exponential, mish, hard_sigmoid, "
                        "hard_sigmoid_keras2 or hard_silu (hard_swish)");
}

bool is_convolution(const OpSpec& op) { return op.kind == OpSpec::Kind::Conv3x3 || op.kind == OpSpec::Kind::Conv; }

int parse_padding(const std::string& padding, const std::string& where) {
  if (padding != "same" && padding != "valid")
    throw py::value_error(where + "padding must be 'same' or 'valid', got '" + padding + "'");
  return padding == "same" ? 1 : 0;
}

int parse_pool_mode(const std::string& mode, const std::string& where) {
  if (mode != "avg" && mode != "max") throw py::value_error(where + "pool_mode must be 'avg' or 'max'");
  return mode == "max" ? 1 : 0;
}

OpSpec parse_op(const py::dict& d, std::size_t index) {
  const std::string where = "op " + std::to_string(index) + ": ";
  if (!d.contains("kind")) throw py::value_error(where + "missing 'kind'");
  const std::string kind = py::str(d["kind"]);
  auto get_int = [&](const char* key) {
    if (!d.contains(key)) throw py::value_error(where + "missing '" + key + "'");
    return py::cast<int>(d[key]);
  };
  auto get_str = [&](const char* key, const char* fallback) {
    return d.contains(key) ? std::string(py::str(d[key])) : std::string(fallback);
  };
  OpSpec op{};
  auto activation = [&]() {
    try {
      return parse_activation(get_str("activation", "linear"));
    } catch (const py::value_error& e) {
      throw py::value_error(where + e.what());
    }
  };
  if (kind == "conv3x3" || kind == "conv") {
    op.kind = kind == "conv3x3" ? OpSpec::Kind::Conv3x3 : OpSpec::Kind::Conv;
    op.out_channels = get_int("out_channels");
    op.activation = activation();
    op.padding = parse_padding(get_str("padding", kind == "conv3x3" ? "same" : "valid"), where);
    op.kernel_size = kind == "conv3x3" ? 3 : get_int("kernel_size");
  } else if (kind == "max_pool2x2") {
    op.kind = OpSpec::Kind::MaxPool2x2;
  } else if (kind == "pool2x2") {
    op.kind = OpSpec::Kind::Pool2x2;
    op.pool_mode = parse_pool_mode(get_str("pool_mode", "avg"), where);
    op.padding = parse_padding(get_str("padding", "valid"), where);
  } else if (kind == "flatten") {
    op.kind = OpSpec::Kind::Flatten;
  } else if (kind == "global_pool") {
    op.kind = OpSpec::Kind::GlobalPool;
    op.pool_mode = parse_pool_mode(get_str("pool_mode", "avg"), where);
  } else if (kind == "dense") {
    op.kind = OpSpec::Kind::Dense;
    op.in_channels = get_int("in_channels");
    op.out_channels = get_int("out_channels");
    op.activation = activation();
  } else if (kind == "affine") {
    op.kind = OpSpec::Kind::Affine;
    op.out_channels = get_int("out_channels");
  } else if (kind == "activation") {
    op.kind = OpSpec::Kind::Elementwise;
    op.activation = activation();
  } else if (kind == "upsample") {
    op.kind = OpSpec::Kind::Upsample;
    op.size_height = get_int("size_height");
    op.size_width = get_int("size_width");
  } else if (kind == "prelu") {
    op.kind = OpSpec::Kind::PRelu;
    op.out_channels = get_int("out_channels");
    op.alpha_height = d.contains("alpha_height") ? get_int("alpha_height") : 1;
    op.alpha_width = d.contains("alpha_width") ? get_int("alpha_width") : 1;
  } else {
    throw py::value_error(where + "unsupported kind '" + kind +
                          "'; expected conv3x3, max_pool2x2, flatten, global_pool, dense, conv, pool2x2, affine, "
                          "activation, prelu or upsample");
  }
  // leaky_relu's slope (describe() lists it for every op: 0 for the others); executor.cu checks it.
  if (d.contains("negative_slope")) {
    try {
      op.negative_slope = py::cast<float>(d["negative_slope"]);
    } catch (const py::cast_error&) {
      throw py::value_error(where + "negative_slope must be a number");
    }
  }
  // clipped_relu's numbers (describe() lists the threshold for every op, the cap where there is
  // one); executor.cu checks them.
  if (d.contains("max_value")) {
    try {
      op.max_value = py::cast<float>(d["max_value"]);
    } catch (const py::cast_error&) {
      throw py::value_error(where + "max_value must be a number");
    }
  }
  if (d.contains("threshold")) {
    try {
      op.threshold = py::cast<float>(d["threshold"]);
    } catch (const py::cast_error&) {
      throw py::value_error(where + "threshold must be a number");
    }
  }
  // l2_normalize's cap (describe() lists it for every op: 0 for the others); executor.cu checks it.
  if (d.contains("max_inverse_norm")) {
    try {
      op.max_inverse_norm = py::cast<float>(d["max_inverse_norm"]);
    } catch (const py::cast_error&) {
      throw py::value_error(where + "max_inverse_norm must be a number");
    }
  }
  return op;
}

std::unique_ptr<Executor> make_executor(const py::list& ops, int input_channels) {
  std::vector<OpSpec> specs;
  for (std::size_t i = 0; i < ops.size(); ++i) {
    if (!py::isinstance<py::dict>(ops[i])) throw py::type_error("each op must be a dict, as Graph.describe() gives");
    specs.push_back(parse_op(ops[i].cast<py::dict>(), i));
  }
  try {
    return std::make_unique<Executor>(input_channels, std::move(specs));
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
}


FloatArray checked_images(const py::array& x_any, const Executor& e) {
  FloatArray x = FloatArray::ensure(x_any);
  if (!x) throw py::type_error("x must be convertible to a float32 array");
  if (x.ndim() != 4) throw py::value_error("x must be a 4-D NHWC batch");
  if (x.shape(3) != e.input_channels())
    throw py::value_error("x has " + std::to_string(x.shape(3)) + " channels; the graph expects " +
                          std::to_string(e.input_channels()));
  if (x.shape(0) < 1) throw py::value_error("x is an empty batch");
  return x;
}

void run_forward(Executor& e, const FloatArray& x, std::vector<OutputRequest>& requests) {
  const int n = checked_int(x.shape(0), "batch"), h = checked_int(x.shape(1), "height"), w = checked_int(x.shape(2), "width");
  const float* data = x.data();
  py::gil_scoped_release release;
  e.forward(data, n, h, w, requests);
}

py::list forward(Executor& e, const py::array& x_any, const std::vector<int>& layers, std::vector<bool> before) {
  const FloatArray x = checked_images(x_any, e);
  if (before.empty()) before.assign(layers.size(), false);
  if (before.size() != layers.size()) throw py::value_error("before_activation must have one flag per output layer");
  const auto shapes = e.output_shapes(checked_int(x.shape(1), "height"), checked_int(x.shape(2), "width"));
  std::vector<FloatArray> results;
  std::vector<OutputRequest> requests;
  for (std::size_t i = 0; i < layers.size(); ++i) {
    if (layers[i] < 0 || layers[i] >= e.layer_count()) throw py::index_error("output layer index out of range");
    std::vector<py::ssize_t> shape{x.shape(0)};
    for (int d : shapes[std::size_t(layers[i])]) shape.push_back(d);
    results.emplace_back(shape);
    requests.push_back({layers[i], bool(before[i]), results.back().mutable_data()});
  }
  run_forward(e, x, requests);
  py::list out;
  for (auto& r : results) out.append(r);
  return out;
}

// Same contract as the CPU executor's forward_into: each request is (layer_index,
// before_activation, out_array), out_array a writable C-contiguous float32 array of exactly
// (batch,) + the layer's shape, overlapping neither the input nor another out_array.
void forward_into(Executor& e, const py::array& x_any, const py::list& requests) {
  const FloatArray x = checked_images(x_any, e);
  const auto shapes = e.output_shapes(checked_int(x.shape(1), "height"), checked_int(x.shape(2), "width"));
  std::vector<OutputRequest> outputs;
  std::vector<py::array> keep;  // holds the arrays for the duration of the call
  for (const py::handle item : requests) {
    if (!py::isinstance<py::tuple>(item) || py::len(item) != 3)
      throw py::value_error("each output request is (layer_index, before_activation, out_array)");
    const py::tuple request = py::reinterpret_borrow<py::tuple>(item);
    const int layer = request[0].cast<int>();
    if (layer < 0 || layer >= e.layer_count()) throw py::index_error("output layer index out of range");
    if (!py::isinstance<py::array>(request[2])) throw py::type_error("out_array must be a numpy array");
    py::array out = request[2].cast<py::array>();
    if (!out.dtype().is(py::dtype::of<float>()) || !(out.flags() & py::array::c_style) || !out.writeable())
      throw py::value_error("out_array for layer " + std::to_string(layer) + " must be a writable, C-contiguous float32 array");
    std::vector<py::ssize_t> shape{x.shape(0)};
    for (int d : shapes[std::size_t(layer)]) shape.push_back(d);
    require_shape(out, shape, "output array");
    const char* begin = static_cast<const char*>(out.data());
    const char* end = begin + out.nbytes();
    auto overlaps = [&](const py::array& other) {
      const char* b = static_cast<const char*>(other.data());
      return begin < b + other.nbytes() && b < end;
    };
    if (overlaps(x)) throw py::value_error("out_array for layer " + std::to_string(layer) + " overlaps the input");
    for (const py::array& other : keep)
      if (overlaps(other)) throw py::value_error("two out_arrays overlap");
    outputs.push_back({layer, request[1].cast<bool>(), static_cast<float*>(out.mutable_data())});
    keep.push_back(out);
  }
  run_forward(e, x, outputs);
}

// `with executor.updating():` holds every other thread's calls for a sequence of set_* calls.
class WeightsUpdate {
 public:
  explicit WeightsUpdate(Executor& executor) : executor_(executor) {}
  void enter() {
    py::gil_scoped_release release;  // a forward running in another thread must be able to finish
    executor_.begin_update();
    held_ = true;
  }
  void exit() {
    if (held_) executor_.end_update();
    held_ = false;
  }

 private:
  Executor& executor_;
  bool held_ = false;
};

// testing: single ops on NHWC arrays.

// A convolution (kernel_size 1 or 3) with any activation but softmax; with `preactivation`,
// (output, pre-activation output).
py::object test_conv(const FloatArray& x, const FloatArray& kernel, const FloatArray& bias, const std::string& activation,
                     const std::string& padding, bool pool, bool preactivation) {
  if (x.ndim() != 4 || kernel.ndim() != 4) throw py::value_error("x must be NHWC and kernel HWIO");
  const int n = checked_int(x.shape(0), "batch"), h = checked_int(x.shape(1), "height"), w = checked_int(x.shape(2), "width"),
            c = checked_int(x.shape(3), "channels"), f = checked_int(kernel.shape(3), "filters");
  const int size = checked_int(kernel.shape(0), "kernel size");
  if (size != 1 && size != 3) throw py::value_error("kernel must be 1x1 or 3x3");
  require_shape(kernel, {size, size, c, f}, "kernel");
  require_shape(bias, {f}, "bias");
  const int pad = size == 1 ? 1 : parse_padding(padding, "");
  int oh = pad ? h : h - 2, ow = pad ? w : w - 2;
  if (oh < 1 || ow < 1 || n < 1 || c < 1 || f < 1) throw py::value_error("empty convolution");
  const int act = parse_activation(activation);
  if (act == 2 || act == 11) throw py::value_error("softmax and l2_normalize on a convolution are not supported");
  if (pool && (size != 3 || act > 1)) throw py::value_error("a fused pool follows a 3x3 convolution with linear or relu only");
  if (pool && preactivation) throw py::value_error("a fused pool has no pre-activation output");
  if (pool) oh /= 2, ow /= 2;
  FloatArray y({n, oh, ow, f}), pre(preactivation ? std::vector<py::ssize_t>{n, oh, ow, f} : std::vector<py::ssize_t>{0});
  const float *xp = x.data(), *kp = kernel.data(), *bp = bias.data();
  float* yp = y.mutable_data();
  float* pp = preactivation ? pre.mutable_data() : nullptr;
  {
    py::gil_scoped_release release;
    if (pool)
      fastvgg::cuda::testing::conv3x3(xp, n, h, w, c, kp, bp, f, pad, act, true, yp, nullptr);
    else
      fastvgg::cuda::testing::conv(xp, n, h, w, c, kp, size, bp, f, pad, act, yp, pp);
  }
  if (preactivation) return py::make_tuple(y, pre);
  return py::object(y);
}

FloatArray test_conv3x3(const FloatArray& x, const FloatArray& kernel, const FloatArray& bias, const std::string& activation,
                        const std::string& padding, bool pool) {
  if (kernel.ndim() == 4 && kernel.shape(0) != 3) throw py::value_error("kernel must have shape (3, 3, in, out)");
  return test_conv(x, kernel, bias, activation, padding, pool, false).cast<FloatArray>();
}

FloatArray test_pool2x2(const FloatArray& x, const std::string& mode, const std::string& padding) {
  if (x.ndim() != 4) throw py::value_error("x must be NHWC");
  const int n = checked_int(x.shape(0), "batch"), h = checked_int(x.shape(1), "height"), w = checked_int(x.shape(2), "width"),
            c = checked_int(x.shape(3), "channels");
  const int m = parse_pool_mode(mode, ""), pad = parse_padding(padding, "");
  const int oh = pad ? (h + 1) / 2 : h / 2, ow = pad ? (w + 1) / 2 : w / 2;
  if (n < 1 || c < 1 || oh < 1 || ow < 1) throw py::value_error("empty pooling: 'valid' 2x2 pooling needs 2x2 pixels");
  FloatArray y({n, oh, ow, c});
  const float* xp = x.data();
  float* yp = y.mutable_data();
  py::gil_scoped_release release;
  fastvgg::cuda::testing::pool2x2(xp, n, h, w, c, m, pad, yp);
  return y;
}

// x * scale + shift along the last axis (rows of features, or NHWC pixels).
FloatArray test_upsample(const FloatArray& x, int size_height, int size_width, int max_blocks) {
  if (x.ndim() != 4) throw py::value_error("x must be NHWC");
  if (size_height < 1 || size_width < 1 || size_height > 1024 || size_width > 1024)
    throw py::value_error("size_height and size_width must be in [1, 1024]");
  const int n = checked_int(x.shape(0), "batch"), h = checked_int(x.shape(1), "height"),
            w = checked_int(x.shape(2), "width"), c = checked_int(x.shape(3), "channels");
  FloatArray y({py::ssize_t(n), py::ssize_t(h) * size_height, py::ssize_t(w) * size_width, py::ssize_t(c)});
  const float* xp = x.data();
  float* yp = y.mutable_data();
  py::gil_scoped_release release;
  if (y.size() > 0) fastvgg::cuda::testing::upsample(xp, n, h, w, c, size_height, size_width, yp, max_blocks);
  return y;
}

// PReLU on NHWC images (4-D) or rows (2-D); alpha (1 or height, 1 or width, channels).
FloatArray test_prelu(const FloatArray& x, const FloatArray& alpha, int max_blocks) {
  const bool image = x.ndim() == 4;
  if (!image && x.ndim() != 2) throw py::value_error("x must be 2-D rows or a 4-D NHWC array");
  const int h = image ? checked_int(x.shape(1), "height") : 1, w = image ? checked_int(x.shape(2), "width") : 1;
  const int channels = checked_int(x.shape(x.ndim() - 1), "channels");
  if (alpha.ndim() != 3 || alpha.shape(2) != channels || (alpha.shape(0) != 1 && alpha.shape(0) != h) ||
      (alpha.shape(1) != 1 && alpha.shape(1) != w))
    throw py::value_error("alpha must have shape (1 or height, 1 or width, channels)");
  FloatArray y(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
  std::copy(x.data(), x.data() + x.size(), y.mutable_data());
  float* yp = y.mutable_data();
  const float* ap = alpha.data();
  const int ah = int(alpha.shape(0)), aw = int(alpha.shape(1));
  const long long count = static_cast<long long>(x.size());
  py::gil_scoped_release release;
  if (count > 0) fastvgg::cuda::testing::prelu(yp, count, h, w, channels, ap, ah, aw, max_blocks);
  return y;
}

FloatArray test_affine(const FloatArray& x, const FloatArray& scale, const FloatArray& shift, int max_blocks) {
  if (x.ndim() < 1 || x.size() == 0) throw py::value_error("x must be a non-empty array");
  const int channels = checked_int(x.shape(x.ndim() - 1), "channels");
  require_shape(scale, {channels}, "scale");
  require_shape(shift, {channels}, "shift");
  FloatArray y(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
  std::copy(x.data(), x.data() + x.size(), y.mutable_data());
  float* yp = y.mutable_data();
  const float *sp = scale.data(), *tp = shift.data();
  const long long rows = static_cast<long long>(x.size()) / channels;
  py::gil_scoped_release release;
  fastvgg::cuda::testing::affine(yp, rows, channels, sp, tp, max_blocks);
  return y;
}

FloatArray test_activation(const FloatArray& x, const std::string& name, int max_blocks, float negative_slope,
                           std::optional<float> max_value, float threshold) {
  const int act = parse_activation(name);
  if (act == 2 || act == 11) throw py::value_error("softmax and l2_normalize are not element-wise");
  FloatArray y(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
  const float* xp = x.data();
  float* yp = y.mutable_data();
  const long long count = static_cast<long long>(x.size());
  py::gil_scoped_release release;
  const float cap = max_value ? *max_value : INFINITY;
  if (count > 0) fastvgg::cuda::testing::activation(xp, count, act, yp, max_blocks, negative_slope, cap, threshold);
  return y;
}

}  // namespace

PYBIND11_MODULE(FASTVGG_CUDA_MODULE_NAME, m) {
  m.doc() = "fastvgg's CUDA backend: VGG and fine-tuned graphs on the GPU (or, in the test build, on a CPU grid emulator)";
  m.attr("backend") = fastvgg::cuda::backend_name();
  m.def("status", &fastvgg::cuda::device_status,
        "(usable, reason): whether a GPU can run this module's kernels, and what it is or why not");

  // module_local: the emulated test build binds the same C++ type in the same process.
  py::class_<Executor>(m, "CudaExecutor", py::module_local())
      .def(py::init(&make_executor), py::arg("ops"), py::arg("input_channels"),
           "Build from _core.Graph.describe()'s list of op dicts; weights are allocated on the GPU, unset.")
      .def_property_readonly("layer_count", &Executor::layer_count)
      .def_property_readonly("input_channels", &Executor::input_channels)
      .def_property_readonly("device", &Executor::device_name)
      .def("output_shapes",
           [](const Executor& e, int h, int w) {
             py::list out;
             for (auto& s : e.output_shapes(h, w)) out.append(py::tuple(py::cast(s)));
             return out;
           })
      .def("weights_nbytes", &Executor::weights_nbytes)
      .def("set_conv3x3_weights",
           [](Executor& e, int index, const FloatArray& kernel, const FloatArray& bias) {
             const OpSpec& op = e.op(index);
             if (!is_convolution(op) || op.kernel_size != 3)
               throw py::value_error("layer " + std::to_string(index) + " is not a 3x3 convolution");
             require_shape(kernel, {3, 3, op.in_channels, op.out_channels}, "kernel");
             require_shape(bias, {op.out_channels}, "bias");
             const float *k = kernel.data(), *b = bias.data();
             py::gil_scoped_release release;
             e.set_conv3x3_weights(index, k, b);
           })
      .def("set_conv_weights",
           [](Executor& e, int index, const FloatArray& kernel, const FloatArray& bias) {
             const OpSpec& op = e.op(index);
             if (!is_convolution(op)) throw py::value_error("layer " + std::to_string(index) + " is not a convolution");
             require_shape(kernel, {op.kernel_size, op.kernel_size, op.in_channels, op.out_channels}, "kernel");
             require_shape(bias, {op.out_channels}, "bias");
             const float *k = kernel.data(), *b = bias.data();
             py::gil_scoped_release release;
             e.set_conv_weights(index, k, b);
           }, py::arg("index"), py::arg("kernel"), py::arg("bias"), "Any convolution's HWIO kernel (1x1 or 3x3) and bias.")
      .def("set_affine",
           [](Executor& e, int index, const FloatArray& scale, const FloatArray& shift) {
             const OpSpec& op = e.op(index);
             if (op.kind != OpSpec::Kind::Affine) throw py::value_error("layer " + std::to_string(index) + " is not an affine map");
             require_shape(scale, {op.out_channels}, "scale");
             require_shape(shift, {op.out_channels}, "shift");
             const float *sp = scale.data(), *tp = shift.data();
             py::gil_scoped_release release;
             e.set_affine(index, sp, tp);
           }, py::arg("index"), py::arg("scale"), py::arg("shift"), "An affine map's per-channel scale and shift.")
      .def("set_prelu",
           [](Executor& e, int index, const FloatArray& alpha) {
             const OpSpec& op = e.op(index);
             if (op.kind != OpSpec::Kind::PRelu) throw py::value_error("layer " + std::to_string(index) + " is not a prelu");
             require_shape(alpha, {op.alpha_height, op.alpha_width, op.out_channels}, "alpha");
             const float* ap = alpha.data();
             py::gil_scoped_release release;
             e.set_prelu(index, ap);
           }, py::arg("index"), py::arg("alpha"), "A prelu's alpha, (alpha_height, alpha_width, channels).")
      .def("set_dense_kernel_rows",
           [](Executor& e, int index, int first_row, const FloatArray& rows) {
             const OpSpec& op = e.op(index);
             if (op.kind != OpSpec::Kind::Dense) throw py::value_error("layer " + std::to_string(index) + " is not a dense layer");
             if (rows.ndim() != 2 || rows.shape(1) != op.out_channels)
               throw py::value_error("rows must be 2-D with " + std::to_string(op.out_channels) + " columns");
             const int count = checked_int(rows.shape(0), "row count");
             if (first_row < 0 || first_row + count > op.in_channels) throw py::value_error("dense kernel rows out of range");
             const float* r = rows.data();
             py::gil_scoped_release release;
             e.set_dense_kernel_rows(index, first_row, count, r);
           })
      .def("set_dense_bias",
           [](Executor& e, int index, const FloatArray& bias) {
             const OpSpec& op = e.op(index);
             if (op.kind != OpSpec::Kind::Dense) throw py::value_error("layer " + std::to_string(index) + " is not a dense layer");
             require_shape(bias, {op.out_channels}, "bias");
             const float* b = bias.data();
             py::gil_scoped_release release;
             e.set_dense_bias(index, b);
           })
      .def("get_weights",
           [](const Executor& e, int index) {
             const OpSpec& op = e.op(index);
             std::vector<py::ssize_t> shape;
             if (is_convolution(op)) shape = {op.kernel_size, op.kernel_size, op.in_channels, op.out_channels};
             else if (op.kind == OpSpec::Kind::Dense) shape = {op.in_channels, op.out_channels};
             else if (op.kind == OpSpec::Kind::Affine) shape = {op.out_channels};  // the scale; the shift as bias
             else if (op.kind == OpSpec::Kind::PRelu) shape = {op.alpha_height, op.alpha_width, op.out_channels};
             else throw py::value_error("layer " + std::to_string(index) + " has no weights");
             FloatArray kernel(shape), bias(std::vector<py::ssize_t>{op.out_channels});
             float *k = kernel.mutable_data(), *b = bias.mutable_data();
             {
               py::gil_scoped_release release;
               e.get_weights(index, k, b);
             }
             return py::make_tuple(kernel, bias);
           })
      .def("forward", &forward, py::arg("x"), py::arg("output_layers"), py::arg("before_activation") = std::vector<bool>{})
      .def("forward_into", &forward_into, py::arg("x"), py::arg("requests"))
      .def("weights_loaded", [](const Executor& e, int index) { return e.weights_loaded(index); }, py::arg("index"))
      .def("updating", [](Executor& e) { return WeightsUpdate(e); }, py::keep_alive<0, 1>(),
           "A context manager: other threads' calls wait while this thread replaces weights.");

  py::class_<WeightsUpdate>(m, "WeightsUpdate", py::module_local())
      .def("__enter__", [](WeightsUpdate& u) { u.enter(); return &u; }, py::return_value_policy::reference)
      .def("__exit__", [](WeightsUpdate& u, py::args) { u.exit(); return false; });

  py::module_ t = m.def_submodule("testing", "Single kernels on NHWC arrays, for the emulator and GPU tests.");
  t.def("conv3x3", &test_conv3x3, py::arg("x"), py::arg("kernel"), py::arg("bias"), py::arg("activation") = "relu",
        py::arg("padding") = "same", py::arg("pool") = false);
  t.def("conv", &test_conv, py::arg("x"), py::arg("kernel"), py::arg("bias"), py::arg("activation") = "linear",
        py::arg("padding") = "valid", py::arg("pool") = false, py::arg("preactivation") = false,
        "A 1x1 or 3x3 convolution as the executor runs it (GEMM, then any activation but softmax); with "
        "preactivation=True, (output, output before the activation).");
  t.def("pool2x2", &test_pool2x2, py::arg("x"), py::arg("mode"), py::arg("padding"),
        "2x2 stride-2 pooling, 'avg' or 'max', Keras's 'valid' or 'same'.");
  t.def("upsample", &test_upsample, py::arg("x"), py::arg("size_height"), py::arg("size_width"),
        py::arg("max_blocks") = 0, "Nearest-neighbour upsampling of NHWC images; max_blocks as for affine().");
  t.def("prelu", &test_prelu, py::arg("x"), py::arg("alpha"), py::arg("max_blocks") = 0,
        "PReLU on NHWC images (4-D) or rows (2-D); alpha (1 or height, 1 or width, channels); max_blocks as for affine().");
  t.def("affine", &test_affine, py::arg("x"), py::arg("scale"), py::arg("shift"), py::arg("max_blocks") = 0,
        "x * scale + shift along the last axis; max_blocks > 0 caps the grid (the grid-stride loop then runs).");
  t.def("activation", &test_activation, py::arg("x"), py::arg("name"), py::arg("max_blocks") = 0,
        py::arg("negative_slope") = 0.0f, py::arg("max_value") = py::none(), py::arg("threshold") = 0.0f,
        "An element-wise activation (not softmax); max_blocks as for affine(); negative_slope is leaky_relu's and "
        "clipped_relu's, max_value (None: no cap) and threshold clipped_relu's.");
  t.def("max_pool2x2", [](const FloatArray& x) {
    if (x.ndim() != 4) throw py::value_error("x must be NHWC");
    const int n = checked_int(x.shape(0), "batch"), h = checked_int(x.shape(1), "height"),
              w = checked_int(x.shape(2), "width"), c = checked_int(x.shape(3), "channels");
    FloatArray y({n, h / 2, w / 2, c});
    const float* xp = x.data();
    float* yp = y.mutable_data();
    py::gil_scoped_release release;
    fastvgg::cuda::testing::max_pool2x2(xp, n, h, w, c, yp);
    return y;
  });
  t.def("global_pool", [](const FloatArray& x, const std::string& mode) {
    if (x.ndim() != 4) throw py::value_error("x must be NHWC");
    if (mode != "avg" && mode != "max") throw py::value_error("mode must be 'avg' or 'max'");
    const int n = checked_int(x.shape(0), "batch"), h = checked_int(x.shape(1), "height"),
              w = checked_int(x.shape(2), "width"), c = checked_int(x.shape(3), "channels");
    if (n < 1 || h < 1 || w < 1 || c < 1) throw py::value_error("empty input");
    FloatArray y({n, c});
    const float* xp = x.data();
    float* yp = y.mutable_data();
    py::gil_scoped_release release;
    fastvgg::cuda::testing::global_pool(xp, n, h, w, c, mode == "max" ? 1 : 0, yp);
    return y;
  });
  t.def("dense", [](const FloatArray& x, const FloatArray& kernel, const FloatArray& bias, const std::string& activation,
                    const std::string& path) {
    if (x.ndim() != 2 || kernel.ndim() != 2) throw py::value_error("x and kernel must be 2-D");
    const int rows = checked_int(x.shape(0), "rows"), depth = checked_int(x.shape(1), "depth"),
              units = checked_int(kernel.shape(1), "units");
    require_shape(kernel, {depth, units}, "kernel");
    require_shape(bias, {units}, "bias");
    const int code = path == "auto" ? 0 : path == "gemm" ? 1 : path == "gemv" ? 2 : -1;
    if (code < 0) throw py::value_error("path must be 'auto', 'gemm' or 'gemv'");
    if (code == 2 && rows > 4) throw py::value_error("the 'gemv' path takes at most 4 rows");
    if (rows < 1 || depth < 1 || units < 1) throw py::value_error("empty dense layer");
    const int act = parse_activation(activation);
    if (act == 11) throw py::value_error("l2_normalize is an op of its own, not a dense layer's activation");
    FloatArray y({rows, units});
    const float *xp = x.data(), *kp = kernel.data(), *bp = bias.data();
    float* yp = y.mutable_data();
    py::gil_scoped_release release;
    fastvgg::cuda::testing::dense(xp, rows, depth, kp, bp, units, act, code, yp);
    return y;
  }, py::arg("x"), py::arg("kernel"), py::arg("bias"), py::arg("activation") = "linear", py::arg("path") = "auto");
  t.def("softmax", [](const FloatArray& x) {
    if (x.ndim() != 2 || x.shape(0) < 1 || x.shape(1) < 1) throw py::value_error("x must be a non-empty 2-D array");
    FloatArray y({x.shape(0), x.shape(1)});
    std::copy(x.data(), x.data() + x.size(), y.mutable_data());
    float* yp = y.mutable_data();
    const int rows = checked_int(x.shape(0), "rows"), cols = checked_int(x.shape(1), "cols");
    py::gil_scoped_release release;
    fastvgg::cuda::testing::softmax(yp, rows, cols);
    return y;
  });
  t.def("transpose", [](const FloatArray& x) {
    if (x.ndim() != 3 || x.size() == 0) throw py::value_error("x must be a non-empty 3-D array (batch, rows, cols)");
    const int b = checked_int(x.shape(0), "batch"), r = checked_int(x.shape(1), "rows"), c = checked_int(x.shape(2), "cols");
    if (b > 65535 || r > 65535 * 32) throw py::value_error("at most 65535 planes of at most 2097120 rows");
    FloatArray y({b, c, r});
    const float* xp = x.data();
    float* yp = y.mutable_data();
    py::gil_scoped_release release;
    fastvgg::cuda::testing::transpose(xp, b, r, c, yp);
    return y;
  });
  t.def("set_block_order_seed", &fastvgg::cuda::testing::set_block_order_seed, py::arg("seed"),
        "The emulator's block order shuffle seed (no effect on a GPU).");
}
