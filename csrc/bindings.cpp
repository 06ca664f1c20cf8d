// Python bindings: plain pybind11 functions (no torch.library registration, so nothing clashes
// with the saeuron::* custom ops of saeuron/ops.py, which call these from their bodies). Each
// function dispatches on the device of its first tensor; signatures mirror saeuron/reference.py.
// Arguments were validated once by saeuron/ops.py; the only errors raised here say that this build
// has no kernel for a device.
#include <torch/csrc/utils/pybind.h>  // tensor casters; much lighter than torch/extension.h

#include <string>
#include <vector>

#include "ext.h"

namespace saeuron_ext {
namespace {

#ifdef SAEURON_WITH_CUDA
#define SAEURON_ON_CUDA(op, call) \
  if (first.is_cuda()) return call
constexpr bool kCuda = true;
#else
#define SAEURON_ON_CUDA(op, call) \
  TORCH_CHECK(!first.is_cuda(), "saeuron extension: ", op, " got CUDA tensors but this build has no CUDA kernels")
constexpr bool kCuda = false;
#endif

void check_cpu(const Tensor& first, const char* op) {
  TORCH_CHECK(first.device().is_cpu(), "saeuron extension: ", op, " has no kernel for device ", first.device(),
              "; valid: cpu", kCuda ? ", cuda" : "");
}

std::tuple<Tensor, Tensor> topk_encode(const Tensor& x, const Tensor& W_enc, const Tensor& b_enc, const Tensor& b_dec,
                                       int64_t k) {
  const Tensor& first = x;
  SAEURON_ON_CUDA("topk_encode", topk_encode_cuda(x, W_enc, b_enc, b_dec, k));
  TORCH_CHECK(false, "saeuron extension: topk_encode has no CPU kernel (the PyTorch reference is the CPU path)");
  return {};
}

Tensor sparse_decode(const Tensor& values, const Tensor& indices, const Tensor& W_dec, const OptTensor& b_dec,
                     const OptTensor& residual) {
  const Tensor& first = values;
  SAEURON_ON_CUDA("sparse_decode", sparse_decode_cuda(values, indices, W_dec, b_dec, residual));
  check_cpu(first, "sparse_decode");
  return sparse_decode_cpu(values, indices, W_dec, b_dec, residual);
}

std::tuple<Tensor, Tensor, Tensor> sparse_decode_bwd(const Tensor& grad_out, const Tensor& values,
                                                     const Tensor& indices, const Tensor& W_dec) {
  const Tensor& first = grad_out;
  SAEURON_ON_CUDA("sparse_decode_bwd", sparse_decode_bwd_cuda(grad_out, values, indices, W_dec));
  check_cpu(first, "sparse_decode_bwd");
  return sparse_decode_bwd_cpu(grad_out, values, indices, W_dec);
}

Tensor gather_encode(const Tensor& x, const Tensor& W_enc, const Tensor& b_enc, const Tensor& b_dec,
                     const Tensor& indices) {
  const Tensor& first = x;
  SAEURON_ON_CUDA("gather_encode", gather_encode_cuda(x, W_enc, b_enc, b_dec, indices));
  check_cpu(first, "gather_encode");
  return gather_encode_cpu(x, W_enc, b_enc, b_dec, indices);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gather_encode_bwd(const Tensor& grad_values, const Tensor& x,
                                                             const Tensor& W_enc, const Tensor& b_dec,
                                                             const Tensor& indices, const Tensor& values) {
  const Tensor& first = x;
  SAEURON_ON_CUDA("gather_encode_bwd", gather_encode_bwd_cuda(grad_values, x, W_enc, b_dec, indices, values));
  check_cpu(first, "gather_encode_bwd");
  return gather_encode_bwd_cpu(grad_values, x, W_enc, b_dec, indices, values);
}

void edit_(Tensor x, const Tensor& W_enc, const Tensor& b_enc, const Tensor& b_dec, const Tensor& W_dec, int64_t k,
           const Tensor& feat_idx, const Tensor& tau, const Tensor& scale, int64_t rows_per_group) {
  const Tensor& first = x;
  SAEURON_ON_CUDA("edit_", edit_cuda(x, W_enc, b_enc, b_dec, W_dec, k, feat_idx, tau, scale, rows_per_group));
  check_cpu(first, "edit_");
  edit_cpu(x, W_enc, b_enc, b_dec, W_dec, k, feat_idx, tau, scale, rows_per_group);
}

}  // namespace
}  // namespace saeuron_ext

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace se = saeuron_ext;
  using py::arg;
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.doc() = "saeuron compiled ops (C++ for CPU tensors, CUDA kernels when built with CUDA)";
  m.def("cuda_enabled", [] { return se::kCuda; }, "Whether this build has the CUDA kernels.");
  // What this build instantiates, declared beside each binding: kernels()[op][device type] = dtype names.
  // saeuron.ops chooses backends by (op, device type, dtype) from it (extension.CompiledBackend.supports),
  // so no call reaches a binding for a device or dtype it has no kernel for.
  py::dict kernels;
  const std::vector<std::string> all = {"float32", "float16", "bfloat16", "float64"};
  const std::vector<std::string> fp32_fp16_bf16 = {"float32", "float16", "bfloat16"};  // fp32 ranking/GEMMs
  auto declare = [&](const char* op, const std::vector<std::string>& cpu, const std::vector<std::string>& cuda) {
    py::dict per;
    per["cpu"] = py::cast(cpu);
    if (se::kCuda) per["cuda"] = py::cast(cuda);
    kernels[op] = per;
  };
  m.def("topk_encode", &se::topk_encode, "Per-token top-k SAE codes (CUDA only).", arg("x"), arg("W_enc"),
        arg("b_enc"), arg("b_dec"), arg("k"), nogil);
  declare("topk_encode", {}, fp32_fp16_bf16);  // CPU: the reference (MKL GEMM + topk)
  m.def("sparse_decode", &se::sparse_decode, "Decode sparse codes.", arg("values"), arg("indices"), arg("W_dec"),
        arg("b_dec") = py::none(), arg("residual") = py::none(), nogil);
  declare("sparse_decode", all, all);
  m.def("sparse_decode_bwd", &se::sparse_decode_bwd, "Gradients of sparse_decode.", arg("grad_out"), arg("values"),
        arg("indices"), arg("W_dec"), nogil);
  declare("sparse_decode_bwd", all, all);
  m.def("gather_encode", &se::gather_encode, "Pre-activations at chosen latents.", arg("x"), arg("W_enc"),
        arg("b_enc"), arg("b_dec"), arg("indices"), nogil);
  declare("gather_encode", all, all);
  m.def("gather_encode_bwd", &se::gather_encode_bwd, "Gradients of gather_encode.", arg("grad_values"), arg("x"),
        arg("W_enc"), arg("b_dec"), arg("indices"), arg("values"), nogil);
  declare("gather_encode_bwd", all, all);
  m.def("edit_", &se::edit_, "In-place unlearning edit of tokens [N, d] or a [B, C, H, W] map.", arg("x"),
        arg("W_enc"), arg("b_enc"), arg("b_dec"), arg("W_dec"), arg("k"), arg("feat_idx"), arg("tau"), arg("scale"),
        arg("rows_per_group"), nogil);
  declare("edit_", all, fp32_fp16_bf16);
  m.def("kernels", [kernels] { return kernels; }, "{op: {device type: [dtype names]}} this build has kernels for.");
}
