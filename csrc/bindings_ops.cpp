// Bindings of the ops fine-tuned models add (ops.h): the Graph and CpuExecutor methods that
// build and load them, and, for tests/test_ops_kernels.py, each fast kernel of each instruction
// set and its reference twin ("reference") on NHWC arrays or flat rows.
//
// Arrays are checked here before any pointer reaches a kernel; every call releases the GIL.
#include <omp.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_executor.h"
#include "cpu_features.h"
#include "graph.h"
#include "ops.h"

namespace py = pybind11;

namespace fastvgg {
ActivationParams activation_params(float negative_slope, std::optional<float> max_value, float threshold);  // bindings.cpp

namespace {

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

int to_int(py::ssize_t v, const char* what) {
  if (v < 0 || v > (1 << 30)) throw py::value_error(std::string(what) + " is out of range");
  return int(v);
}

struct Nhwc {
  int n, h, w, c;
};

Nhwc nhwc_of(const py::array& x) {
  if (x.ndim() != 4) throw py::value_error("x must be a 4-D NHWC array, got " + std::to_string(x.ndim()) + " dimensions");
  return {to_int(x.shape(0), "batch"), to_int(x.shape(1), "height"), to_int(x.shape(2), "width"),
          to_int(x.shape(3), "channels")};
}

void require_vector(const FloatArray& a, py::ssize_t size, const char* what) {
  if (a.ndim() != 1 || a.shape(0) != size)
    throw py::value_error(std::string(what) + " must be a vector of " + std::to_string(size) + " values");
}

const KernelTable* table_or_null(const std::string& isa) { return isa == "reference" ? nullptr : &kernels_for(isa); }

int threads() { return std::max(1, omp_get_max_threads()); }

// Runs `op(in, out)` on every image of x in the blocked layout of `k` and returns NHWC.
template <typename Op>
FloatArray per_image(const KernelTable& k, const FloatArray& x, const Nhwc& s, int out_h, int out_w, int out_c, Op op) {
  FloatArray y(std::vector<py::ssize_t>{s.n, out_h, out_w, out_c});
  const float* xp = x.data();
  float* yp = y.mutable_data();
  py::gil_scoped_release release;
  AlignedBuffer in_buf(blocked_image_size(s.c, s.h, s.w)), out_buf(blocked_image_size(out_c, out_h, out_w));
  const BlockedImage in{in_buf.data(), s.c, s.h, s.w}, out{out_buf.data(), out_c, out_h, out_w};
  for (int i = 0; i < s.n; ++i) {
    k.nhwc_to_blocked(xp + std::size_t(i) * s.h * s.w * s.c, in);
    zero_border(out);
    op(in, out);
    k.blocked_to_nhwc(out, yp + std::size_t(i) * out_h * out_w * out_c);
  }
  return y;
}

// A shape-changing op that keeps the channels: its reference twin on NHWC arrays (isa
// "reference"), or `fast` on every image in the blocked layout of that ISA; NHWC out_h x out_w.
template <typename Reference, typename Fast>
FloatArray reference_or_blocked(const FloatArray& x, const Nhwc& s, int out_h, int out_w, const std::string& isa,
                                Reference reference, Fast fast) {
  const KernelTable* k = table_or_null(isa);
  if (!k) {
    FloatArray y(std::vector<py::ssize_t>{s.n, out_h, out_w, s.c});
    const float* xp = x.data();
    float* yp = y.mutable_data();
    py::gil_scoped_release release;
    reference(xp, yp);
    return y;
  }
  const OpsTable& ops = ops_for(*k);
  return per_image(*k, x, s, out_h, out_w, s.c,
                   [&](const BlockedImage& in, const BlockedImage& out) { fast(ops, in, out); });
}

FloatArray test_conv(const FloatArray& x, const FloatArray& kernel, std::optional<FloatArray> bias,
                     const std::string& padding, bool relu, const std::string& isa, const std::string& algorithm) {
  const Nhwc s = nhwc_of(x);
  if (kernel.ndim() != 4) throw py::value_error("kernel must be 4-D (kh, kw, in, out)");
  const int size = to_int(kernel.shape(0), "kernel height");
  if ((size != 1 && size != 3) || kernel.shape(1) != size)
    throw py::value_error("kernel must be 1x1 or 3x3");
  if (kernel.shape(2) != s.c) throw py::value_error("kernel input channels do not match x");
  if (padding != "same" && padding != "valid") throw py::value_error("padding must be 'same' or 'valid'");
  if (algorithm != "direct" && algorithm != "winograd") throw py::value_error("algorithm must be 'direct' or 'winograd'");
  const int f = to_int(kernel.shape(3), "filters");
  if (bias) require_vector(*bias, f, "bias");
  const bool same = padding == "same" || size == 1;
  const int out_h = same ? s.h : s.h - 2, out_w = same ? s.w : s.w - 2;
  if (out_h < 1 || out_w < 1) throw py::value_error("a 'valid' 3x3 convolution needs at least 3x3 pixels");
  std::vector<float> padded_bias(std::size_t(round_up_to_block(f)), 0.0f);
  if (bias) std::copy(bias->data(), bias->data() + f, padded_bias.begin());
  const KernelTable* k = table_or_null(isa);
  if (!k) {
    FloatArray y(std::vector<py::ssize_t>{s.n, out_h, out_w, f});
    const float *xp = x.data(), *kp = kernel.data(), *bp = bias ? bias->data() : nullptr;
    float* yp = y.mutable_data();
    py::gil_scoped_release release;
    reference::conv(xp, s.n, s.h, s.w, s.c, kp, size, same, bp, f, yp);
    if (relu)
      for (std::size_t i = 0; i < std::size_t(y.size()); ++i) yp[i] = yp[i] < 0.0f ? 0.0f : yp[i];
    return y;
  }
  const OpsTable& ops = ops_for(*k);
  const float* kp = kernel.data();
  if (size == 1) {
    AlignedBuffer packed(packed_dense_size(s.c, f));
    pack_dense_rows(kp, 0, s.c, s.c, f, packed.data(), threads());
    return per_image(*k, x, s, out_h, out_w, f, [&](const BlockedImage& in, const BlockedImage& out) {
      ops.conv1x1(in, packed.data(), padded_bias.data(), relu, out, threads());
    });
  }
  const Conv3x3Method& method = algorithm == "winograd" ? k->conv3x3_winograd : k->conv3x3_direct;
  AlignedBuffer packed((method.packed_bytes(s.c, f) + sizeof(float) - 1) / sizeof(float));
  method.pack(kp, s.c, f, packed.data(), threads());
  KernelScratch scratch;
  if (same)
    return per_image(*k, x, s, out_h, out_w, f, [&](const BlockedImage& in, const BlockedImage& out) {
      method.run(in, packed.data(), padded_bias.data(), relu, out, threads(), scratch);
    });
  AlignedBuffer full_buf(blocked_image_size(f, s.h, s.w));
  return per_image(*k, x, s, out_h, out_w, f, [&](const BlockedImage& in, const BlockedImage& out) {
    const BlockedImage full{full_buf.data(), f, s.h, s.w};
    zero_border(full);
    method.run(in, packed.data(), padded_bias.data(), relu, full, threads(), scratch);
    ops.crop_border(full, out, threads());
  });
}

FloatArray test_pool2x2(const FloatArray& x, const std::string& mode, const std::string& padding, const std::string& isa) {
  const Nhwc s = nhwc_of(x);
  if (mode != "avg" && mode != "max") throw py::value_error("mode must be 'avg' or 'max'");
  if (padding != "same" && padding != "valid") throw py::value_error("padding must be 'same' or 'valid'");
  const bool same = padding == "same";
  const int out_h = same ? (s.h + 1) / 2 : s.h / 2, out_w = same ? (s.w + 1) / 2 : s.w / 2;
  if (out_h < 1 || out_w < 1) throw py::value_error("'valid' 2x2 pooling needs at least 2x2 pixels");
  const GlobalPoolMode m = mode == "avg" ? GlobalPoolMode::Average : GlobalPoolMode::Max;
  return reference_or_blocked(
      x, s, out_h, out_w, isa, [&](const float* xp, float* yp) { reference::pool2x2(xp, s.n, s.h, s.w, s.c, m, same, yp); },
      [&](const OpsTable& ops, const BlockedImage& in, const BlockedImage& out) { ops.pool2x2(in, m, out, threads()); });
}

FloatArray test_affine(const FloatArray& x, const FloatArray& scale, const FloatArray& shift, const std::string& isa) {
  if (x.ndim() != 2 && x.ndim() != 4) throw py::value_error("x must be 2-D rows or a 4-D NHWC batch");
  const int channels = to_int(x.shape(x.ndim() - 1), "channels");
  require_vector(scale, channels, "scale");
  require_vector(shift, channels, "shift");
  std::vector<float> s(std::size_t(round_up_to_block(channels)), 0.0f), t(s.size(), 0.0f);
  std::copy(scale.data(), scale.data() + channels, s.begin());
  std::copy(shift.data(), shift.data() + channels, t.begin());
  const KernelTable* k = table_or_null(isa);
  if (!k || x.ndim() == 2) {
    FloatArray y(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
    const float* xp = x.data();
    float* yp = y.mutable_data();
    const std::size_t pixels = std::size_t(x.size()) / std::size_t(std::max(channels, 1));
    py::gil_scoped_release release;
    if (!k) {
      reference::affine(xp, pixels, channels, s.data(), t.data(), yp);
    } else {
      std::copy(xp, xp + x.size(), yp);
      ops_for(*k).affine_rows(yp, int(pixels), channels, s.data(), t.data());
    }
    return y;
  }
  const Nhwc n = nhwc_of(x);
  const OpsTable& ops = ops_for(*k);
  return per_image(*k, x, n, n.h, n.w, n.c, [&](const BlockedImage& in, const BlockedImage& out) {
    std::copy(in.data, in.data + in.size(), out.data);
    ops.affine_blocked(out, s.data(), t.data(), threads());
  });
}

// Keras's PReLU on flat rows (2-D) or NHWC images (4-D, blocked layout), alpha of shape
// (alpha_height, alpha_width, channels) with extents of 1 or the image's; "reference" for the twin.
FloatArray test_prelu(const FloatArray& x, const FloatArray& alpha, const std::string& isa) {
  const bool image = x.ndim() == 4;
  if (!image && x.ndim() != 2) throw py::value_error("x must be 2-D rows or a 4-D NHWC array");
  const int n = to_int(x.shape(0), "batch"), h = image ? to_int(x.shape(1), "height") : 1,
            w = image ? to_int(x.shape(2), "width") : 1, c = to_int(x.shape(x.ndim() - 1), "channels");
  if (alpha.ndim() != 3 || alpha.shape(2) != c || (alpha.shape(0) != 1 && alpha.shape(0) != h) ||
      (alpha.shape(1) != 1 && alpha.shape(1) != w))
    throw py::value_error("alpha must have shape (1 or height, 1 or width, channels)");
  const int ah = int(alpha.shape(0)), aw = int(alpha.shape(1));
  const KernelTable* k = table_or_null(isa);
  if (!k || !image) {
    FloatArray y(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
    const float *xp = x.data(), *ap = alpha.data();
    float* yp = y.mutable_data();
    py::gil_scoped_release release;
    if (!k) {
      reference::prelu(xp, n, h, w, c, ap, ah, aw, yp);
    } else {
      std::copy(xp, xp + std::size_t(n) * std::size_t(c), yp);
      ops_for(*k).prelu_rows(yp, n, c, c, ap);
    }
    return y;
  }
  // The alpha packed as the executor packs it.
  std::vector<float> blocked(prelu_packed_floats(ah, aw, c));
  pack_prelu_alpha(alpha.data(), ah, aw, c, blocked.data());
  const Nhwc s = nhwc_of(x);
  const OpsTable& ops = ops_for(*k);
  return per_image(*k, x, s, s.h, s.w, s.c, [&](const BlockedImage& in, const BlockedImage& out) {
    std::copy(in.data, in.data + in.size(), out.data);
    ops.prelu_blocked(out, blocked.data(), ah, aw, threads());
  });
}

FloatArray test_upsample(const FloatArray& x, int size_height, int size_width, const std::string& isa) {
  const Nhwc s = nhwc_of(x);
  if (size_height < 1 || size_width < 1 || size_height > (1 << 10) || size_width > (1 << 10))
    throw py::value_error("size_height and size_width must be in [1, 1024]");
  return reference_or_blocked(
      x, s, s.h * size_height, s.w * size_width, isa,
      [&](const float* xp, float* yp) { reference::upsample_nearest(xp, s.n, s.h, s.w, s.c, size_height, size_width, yp); },
      [&](const OpsTable& ops, const BlockedImage& in, const BlockedImage& out) {
        ops.upsample_nearest(in, size_height, size_width, out, threads());
      });
}

FloatArray test_activation(const FloatArray& x, const std::string& name, const std::string& isa, float negative_slope,
                           std::optional<float> max_value, float threshold) {
  const Elementwise f = parse_elementwise(name);
  const ActivationParams params = activation_params(negative_slope, max_value, threshold);
  const KernelTable* k = table_or_null(isa);
  if (!k || x.ndim() != 4) {
    FloatArray y(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
    const float* xp = x.data();
    float* yp = y.mutable_data();
    const std::size_t count = std::size_t(x.size());
    py::gil_scoped_release release;
    if (!k) {
      reference::activation(xp, count, f, params, yp);
    } else {
      std::copy(xp, xp + count, yp);
      ops_for(*k).activation_rows(yp, count, f, params);
    }
    return y;
  }
  const Nhwc n = nhwc_of(x);
  const OpsTable& ops = ops_for(*k);
  return per_image(*k, x, n, n.h, n.w, n.c, [&](const BlockedImage& in, const BlockedImage& out) {
    std::copy(in.data, in.data + in.size(), out.data);
    ops.activation_blocked(out, f, params, threads());
  });
}

// The whole blocked buffer of x[0] after an activation, (blocks, h + 2, w + 2, 16): the tests
// check that the border and the padding channels are still zero.
FloatArray test_activation_blocked_buffer(const FloatArray& x, const std::string& name, const std::string& isa,
                                          float negative_slope, std::optional<float> max_value, float threshold) {
  const ActivationParams params = activation_params(negative_slope, max_value, threshold);
  const Nhwc s = nhwc_of(x);
  if (s.n < 1) throw py::value_error("x needs at least one image");
  const Elementwise f = parse_elementwise(name);
  const KernelTable& k = kernels_for(isa);
  FloatArray buffer(std::vector<py::ssize_t>{channel_blocks(s.c), s.h + 2, s.w + 2, kChannelBlock});
  const float* xp = x.data();
  float* bp = buffer.mutable_data();
  py::gil_scoped_release release;
  const BlockedImage image{bp, s.c, s.h, s.w};
  k.nhwc_to_blocked(xp, image);
  ops_for(k).activation_blocked(image, f, params, threads());
  return buffer;
}

int op_index(const Graph& graph, py::ssize_t index) {
  if (index < 0 || index >= graph.op_count())
    throw py::index_error("layer index " + std::to_string(index) + " is out of range: the graph has " +
                          std::to_string(graph.op_count()) + " ops");
  return int(index);
}

void require_padding(const std::string& padding) {
  if (padding != "same" && padding != "valid")
    throw py::value_error("padding must be 'same' or 'valid', got '" + padding + "'");
}

}  // namespace

void register_ops(py::module_& m, py::module_& testing) {
  auto graph = py::reinterpret_borrow<py::class_<Graph>>(m.attr("Graph"));
  graph
      .def("add_conv", [](Graph& g, int kernel_size, int filters, const std::string& padding, const std::string& activation,
                          float negative_slope, std::optional<float> max_value, float threshold) {
        require_padding(padding);
        return g.add_conv(kernel_size, filters, padding == "same", parse_activation(activation),
                          activation_params(negative_slope, max_value, threshold));
      }, py::arg("kernel_size"), py::arg("filters"), py::arg("padding"), py::arg("activation"), py::arg("negative_slope") = 0.0f,
         py::arg("max_value") = py::none(), py::arg("threshold") = 0.0f,
         "A 1x1 convolution, or a 3x3 one with 'valid' or 'same' padding; stride 1.")
      .def("add_pool2x2", [](Graph& g, const std::string& mode, const std::string& padding) {
        require_padding(padding);
        return g.add_pool2x2(parse_pool_mode(mode), padding == "same");
      }, py::arg("mode"), py::arg("padding"), "2x2 stride-2 pooling, 'avg' or 'max', Keras's 'valid' or 'same'.")
      .def("add_affine", &Graph::add_affine, py::arg("channels"), "x * scale + shift per channel (or feature).")
      .def("add_activation", [](Graph& g, const std::string& activation, float negative_slope,
                                std::optional<float> max_value, float threshold) {
        return g.add_activation(parse_activation(activation), activation_params(negative_slope, max_value, threshold));
      }, py::arg("activation"), py::arg("negative_slope") = 0.0f, py::arg("max_value") = py::none(),
         py::arg("threshold") = 0.0f,
         "An activation on its own ('linear' is the identity); negative_slope is leaky_relu's and clipped_relu's, "
         "max_value (None: no cap) and threshold clipped_relu's.")
      .def("add_prelu", &Graph::add_prelu, py::arg("channels"), py::arg("alpha_height") = 1, py::arg("alpha_width") = 1,
           "Keras's PReLU, x < 0 ? alpha * x : x, with an alpha of alpha_height x alpha_width x channels: 1 x 1 (one "
           "per channel, or per feature of flat rows), or the image's height or width (one per row or column).")
      .def("add_upsample", &Graph::add_upsample, py::arg("size_height"), py::arg("size_width"),
           "Keras's UpSampling2D with interpolation='nearest': each pixel repeated size_height x size_width times.")
      .def("add_l2_normalize", &Graph::add_l2_normalize, py::arg("max_inverse_norm"),
           "Keras's UnitNormalization on flat rows: each row times min(1 / ||row||, max_inverse_norm).");

  auto executor = py::reinterpret_borrow<py::class_<CpuExecutor>>(m.attr("CpuExecutor"));
  executor
      .def("set_conv_weights", [](CpuExecutor& e, py::ssize_t index, const FloatArray& kernel, const FloatArray& bias) {
        const int i = op_index(e.graph(), index);
        const Op& op = e.graph().op(i);
        if (!op.is_convolution()) throw py::value_error("layer " + std::to_string(i) + " is not a convolution");
        if (kernel.ndim() != 4 || kernel.shape(0) != op.kernel_size || kernel.shape(1) != op.kernel_size ||
            kernel.shape(2) != op.in_channels || kernel.shape(3) != op.out_channels)
          throw py::value_error("layer " + std::to_string(i) + " needs a kernel of shape (" + std::to_string(op.kernel_size) +
                                ", " + std::to_string(op.kernel_size) + ", " + std::to_string(op.in_channels) + ", " +
                                std::to_string(op.out_channels) + ")");
        require_vector(bias, op.out_channels, "bias");
        const float *kp = kernel.data(), *bp = bias.data();
        py::gil_scoped_release release;
        e.set_conv_weights(i, kp, bp);
      }, py::arg("index"), py::arg("kernel"), py::arg("bias"))
      .def("set_affine", [](CpuExecutor& e, py::ssize_t index, const FloatArray& scale, const FloatArray& shift) {
        const int i = op_index(e.graph(), index);
        const Op& op = e.graph().op(i);
        if (op.kind != OpKind::Affine) throw py::value_error("layer " + std::to_string(i) + " is not an affine map");
        require_vector(scale, op.out_channels, "scale");
        require_vector(shift, op.out_channels, "shift");
        const float *sp = scale.data(), *tp = shift.data();
        py::gil_scoped_release release;
        e.set_affine(i, sp, tp);
      }, py::arg("index"), py::arg("scale"), py::arg("shift"))
      .def("set_prelu", [](CpuExecutor& e, py::ssize_t index, const FloatArray& alpha) {
        const int i = op_index(e.graph(), index);
        const Op& op = e.graph().op(i);
        if (op.kind != OpKind::PRelu) throw py::value_error("layer " + std::to_string(i) + " is not a prelu");
        if (alpha.ndim() != 3 || alpha.shape(0) != op.alpha_height || alpha.shape(1) != op.alpha_width ||
            alpha.shape(2) != op.out_channels)
          throw py::value_error("layer " + std::to_string(i) + " needs an alpha of shape (" +
                                std::to_string(op.alpha_height) + ", " + std::to_string(op.alpha_width) + ", " +
                                std::to_string(op.out_channels) + ")");
        const float* ap = alpha.data();
        py::gil_scoped_release release;
        e.set_prelu(i, ap);
      }, py::arg("index"), py::arg("alpha"), "A prelu op's alpha, (alpha_height, alpha_width, channels).");

  testing.def("conv", &test_conv, py::arg("x"), py::arg("kernel"), py::arg("bias"), py::arg("padding"), py::arg("relu"),
              py::arg("isa"), py::arg("algorithm") = "direct",
              "1x1 or 3x3 convolution, 'same' or 'valid', stride 1; bias may be None.");
  testing.def("pool2x2", &test_pool2x2, py::arg("x"), py::arg("mode"), py::arg("padding"), py::arg("isa"),
              "2x2 stride-2 pooling, mode 'avg' or 'max', padding 'valid' or 'same' (Keras's).");
  testing.def("affine", &test_affine, py::arg("x"), py::arg("scale"), py::arg("shift"), py::arg("isa"),
              "x * scale + shift per channel, on rows (2-D) or NHWC images (4-D, blocked layout).");
  testing.def("activation", &test_activation, py::arg("x"), py::arg("name"), py::arg("isa"), py::arg("negative_slope") = 0.0f,
              py::arg("max_value") = py::none(), py::arg("threshold") = 0.0f,
              "An element-wise activation on flat values, or on NHWC images (4-D, blocked layout); negative_slope "
              "is leaky_relu's and clipped_relu's, max_value (None: no cap) and threshold clipped_relu's.");
  testing.def("upsample", &test_upsample, py::arg("x"), py::arg("size_height"), py::arg("size_width"), py::arg("isa"),
              "Keras's nearest-neighbour UpSampling2D of NHWC images (blocked layout; 'reference' for the twin).");
  testing.def("prelu", &test_prelu, py::arg("x"), py::arg("alpha"), py::arg("isa"),
              "Keras's PReLU on rows (2-D) or NHWC images (4-D, blocked layout); alpha (1 or height, 1 or width, "
              "channels).");
  testing.def("activation_blocked_buffer", &test_activation_blocked_buffer, py::arg("x"), py::arg("name"),
              py::arg("isa"), py::arg("negative_slope") = 0.0f, py::arg("max_value") = py::none(),
              py::arg("threshold") = 0.0f,
              "x[0]'s whole blocked buffer, border included, after an activation.");
}

}  // namespace fastvgg
