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
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_features.h"
#include "network.h"

namespace py = pybind11;

namespace fastvgg {
double fma_peak_gflops(int threads, long iterations, const std::string& isa);  // csrc/fma_peak.cpp
void register_ops_testing(pybind11::module_& testing);  // csrc/bindings_ops.cpp
}
using namespace fastvgg;

namespace {

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

std::atomic<int> g_threads{0};

int thread_count() {
  int n = g_threads.load();
  return n > 0 ? n : omp_get_max_threads();
}

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

Activation parse_activation(const std::string& name) {
  if (name == "linear") return Activation::Linear;
  if (name == "relu") return Activation::Relu;
  if (name == "softmax") return Activation::Softmax;
  throw py::value_error("unknown activation '" + name + "'; expected 'linear', 'relu' or 'softmax'");
}

GlobalPoolMode parse_pool_mode(const std::string& mode) {
  if (mode == "avg") return GlobalPoolMode::Average;
  if (mode == "max") return GlobalPoolMode::Max;
  throw py::value_error("unknown pooling mode '" + mode + "'; expected 'avg' or 'max'");
}

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

// A 3x3 kernel and bias packed once for one algorithm of one kernel table.
struct PackedConv3x3 {
  PackedConv3x3(const KernelTable& k, KernelAlgorithm algorithm, const float* kernel_hwio, const float* bias, int in_c,
                int out_c)
      : padded_bias(std::size_t(round_up_to_block(out_c))) {
    if (algorithm == KernelAlgorithm::Winograd) {
      weights.resize(packed_winograd_size(in_c, out_c));
      pack_winograd_f4x4(kernel_hwio, in_c, out_c, weights.data());
      run = k.conv3x3_winograd;
    } else {
      weights.resize(packed_conv3x3_size(in_c, out_c));
      pack_conv3x3(kernel_hwio, in_c, out_c, weights.data());
      run = k.conv3x3;
    }
    std::copy(bias, bias + out_c, padded_bias.data());
  }
  void operator()(const BlockedImage& in, bool relu, const BlockedImage& out, int threads) const {
    run(in, weights.data(), padded_bias.data(), relu, out, threads);
  }

  AlignedBuffer weights, padded_bias;
  decltype(KernelTable::conv3x3) run;
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
      const PackedConv3x3 conv(*k, algorithm, kp, bp, s.c, s.f);
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
  const PackedConv3x3 conv(k, a, kp, bp, s.c, s.f);
  AlignedBuffer in_buf(blocked_image_size(s.c, s.h, s.w)), out_buf(blocked_image_size(s.f, s.h, s.w));
  const BlockedImage in{in_buf.data(), s.c, s.h, s.w}, out{out_buf.data(), s.f, s.h, s.w};
  k.nhwc_to_blocked(xp, in);
  const int threads = thread_count();
  conv(in, true, out, threads);
  std::vector<double> seconds;
  for (int r = 0; r < repeats; ++r) {
    const double start = omp_get_wtime();
    conv(in, true, out, threads);
    seconds.push_back(omp_get_wtime() - start);
  }
  std::nth_element(seconds.begin(), seconds.begin() + repeats / 2, seconds.end());
  return seconds[std::size_t(repeats / 2)];
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
      AlignedBuffer packed(packed_dense_size(depth, cols)), padded_bias{std::size_t(padded)};
      AlignedBuffer out(std::size_t(rows) * padded);
      pack_dense_rows(kp, 0, depth, depth, cols, packed.data());
      std::copy(bp, bp + cols, padded_bias.data());
      k->dense(xp, rows, depth, packed.data(), padded_bias.data(), cols, relu, out.data(), thread_count());
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

py::list forward(const Network& net, const FloatArray& x, const std::vector<int>& output_layers,
                 std::vector<bool> before_activation) {
  require_ndim(x, 4, "input");
  const int count = checked_int(x.shape(0), "batch"), height = checked_int(x.shape(1), "height"),
            width = checked_int(x.shape(2), "width");
  require_dim(x, 3, net.input_channels(), "input");
  if (before_activation.empty()) before_activation.assign(output_layers.size(), false);
  if (before_activation.size() != output_layers.size())
    throw py::value_error("before_activation needs one flag per output layer");
  const std::vector<LayerShape> shapes = net.shapes(height, width);
  py::list results;
  std::vector<OutputRequest> requests;
  for (std::size_t k = 0; k < output_layers.size(); ++k) {
    const int index = output_layers[k];
    if (index < 0 || index >= net.layer_count()) throw py::index_error("output layer index out of range");
    std::vector<py::ssize_t> dims{count};
    dims.insert(dims.end(), shapes[std::size_t(index)].begin(), shapes[std::size_t(index)].end());
    FloatArray out(dims);
    requests.push_back({index, bool(before_activation[k]), out.mutable_data()});
    results.append(out);
  }
  const float* input = x.data();
  const KernelTable& kernels = active_kernels();
  const int threads = thread_count();
  {
    py::gil_scoped_release release;
    net.forward(input, count, height, width, requests, threads, kernels);
  }
  return results;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "fastvgg's compiled core: VGG layers on blocked activations, one kernel table per instruction set";
  m.attr("__version__") = FASTVGG_VERSION;

  m.def("set_num_threads", [](int n) {
    if (n < 1) throw py::value_error("the number of threads must be at least 1, got " + std::to_string(n));
    g_threads.store(n);
  }, py::arg("n"), "Threads every later computation uses.");
  m.def("get_num_threads", &thread_count);
  m.def("available_isas", []() {
    std::vector<std::string> names;
    for (const KernelTable* t : supported_kernel_tables()) names.push_back(t->isa_name);
    return names;
  }, "Instruction sets with kernels in this build that this CPU runs, fastest first.");
  m.def("active_isa", []() { return std::string(active_kernels().isa_name); });
  m.def("set_isa", [](const std::string& isa) { set_active_kernels(isa); }, py::arg("isa"),
        "Use the kernels of another supported instruction set (for testing and benchmarking).");

  py::class_<Network>(m, "Network")
      .def(py::init([](int input_channels, const std::string& precision) {
             if (precision != "fast" && precision != "highest")
               throw py::value_error("unknown precision '" + precision + "'; expected 'fast' or 'highest'");
             return Network(input_channels, precision == "fast" ? ConvAlgorithm::Fast : ConvAlgorithm::Highest);
           }),
           py::arg("input_channels"), py::arg("precision") = "fast")
      .def_property_readonly("precision", [](const Network& n) {
        return std::string(n.algorithm() == ConvAlgorithm::Fast ? "fast" : "highest");
      })
      .def("add_conv3x3", [](Network& n, int filters, const std::string& act) {
        return n.add_conv3x3(filters, parse_activation(act));
      }, py::arg("filters"), py::arg("activation"))
      .def("add_max_pool2x2", &Network::add_max_pool2x2)
      .def("add_flatten", &Network::add_flatten)
      .def("add_global_pool", [](Network& n, const std::string& mode) { return n.add_global_pool(parse_pool_mode(mode)); },
           py::arg("mode"))
      .def("add_dense", [](Network& n, int in_features, int units, const std::string& act) {
        return n.add_dense(in_features, units, parse_activation(act));
      }, py::arg("in_features"), py::arg("units"), py::arg("activation"))
      .def_property_readonly("layer_count", &Network::layer_count)
      .def_property_readonly("input_channels", &Network::input_channels)
      .def("output_shapes", [](const Network& n, int height, int width) {
        std::vector<py::tuple> out;
        for (const LayerShape& s : n.shapes(height, width)) out.push_back(py::tuple(py::cast(s)));
        return out;
      }, py::arg("height"), py::arg("width"))
      .def("weights_nbytes", [](const Network& n) {
        std::size_t total = 0;
        for (int i = 0; i < n.layer_count(); ++i) {
          const Layer& l = n.layer(i);
          total += (l.weights.size() + l.winograd_weights.size() + l.bias.size()) * sizeof(float);
          total += l.winograd_correction.ulps.size() +
                   l.winograd_correction.exact_index.size() * (sizeof(std::uint32_t) + sizeof(float));
        }
        return total;
      }, "Bytes held by the packed weights.")
      .def("set_conv3x3_weights", [](Network& n, int index, const FloatArray& kernel, const FloatArray& bias) {
        const Layer& l = n.layer(index);
        if (l.kind != LayerKind::Conv3x3) throw py::value_error("layer is not a 3x3 convolution");
        require_ndim(kernel, 4, "kernel");
        require_dim(kernel, 0, 3, "kernel");
        require_dim(kernel, 1, 3, "kernel");
        require_dim(kernel, 2, l.in_channels, "kernel");
        require_dim(kernel, 3, l.out_channels, "kernel");
        require_ndim(bias, 1, "bias");
        require_dim(bias, 0, l.out_channels, "bias");
        const float *kp = kernel.data(), *bp = bias.data();
        py::gil_scoped_release release;
        n.set_conv3x3_weights(index, kp, bp);
      }, py::arg("index"), py::arg("kernel"), py::arg("bias"))
      .def("set_dense_kernel_rows", [](Network& n, int index, int first_row, const FloatArray& rows) {
        const Layer& l = n.layer(index);
        if (l.kind != LayerKind::Dense) throw py::value_error("layer is not dense");
        require_ndim(rows, 2, "kernel rows");
        require_dim(rows, 1, l.out_channels, "kernel rows");
        const int count = checked_int(rows.shape(0), "row count");
        const float* rp = rows.data();
        py::gil_scoped_release release;
        n.set_dense_kernel_rows(index, first_row, count, rp);
      }, py::arg("index"), py::arg("first_row"), py::arg("rows"))
      .def("set_dense_bias", [](Network& n, int index, const FloatArray& bias) {
        const Layer& l = n.layer(index);
        if (l.kind != LayerKind::Dense) throw py::value_error("layer is not dense");
        require_ndim(bias, 1, "bias");
        require_dim(bias, 0, l.out_channels, "bias");
        n.set_dense_bias(index, bias.data());
      }, py::arg("index"), py::arg("bias"))
      .def("get_weights", [](const Network& n, int index) {
        const Layer& l = n.layer(index);
        if (!l.has_weights()) throw py::value_error("layer has no weights");
        FloatArray kernel(l.kind == LayerKind::Conv3x3 ? std::vector<py::ssize_t>{3, 3, l.in_channels, l.out_channels}
                                                       : std::vector<py::ssize_t>{l.in_channels, l.out_channels});
        FloatArray bias(std::vector<py::ssize_t>{l.out_channels});
        float *kp = kernel.mutable_data(), *bp = bias.mutable_data();
        {
          py::gil_scoped_release release;
          n.get_weights(index, kp, bp);
        }
        return py::make_tuple(kernel, bias);
      }, py::arg("index"))
      .def("forward", &forward, py::arg("x"), py::arg("output_layers"), py::arg("before_activation") = std::vector<bool>{},
           "Runs a float32 NHWC batch; returns the outputs of the given layers, in that order. "
           "before_activation[k] asks for convolution output_layers[k]'s sums before its ReLU.");

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
  register_ops_testing(testing);
  testing.def("layout_roundtrip", &test_layout_roundtrip, py::arg("x"), py::arg("isa"));
  testing.def("fma_peak_gflops", [](int threads, long iterations, const std::string& isa) {
    py::gil_scoped_release release;
    return fma_peak_gflops(threads, iterations, isa);
  }, py::arg("threads"), py::arg("iterations") = 20000000L, py::arg("isa") = "auto",
     "Measured fp32 FMA GFLOP/s of `threads` threads (csrc/fma_peak.cpp), for bench/.");
}
