// Bridge from ATen tensors to the CUDA launchers (saeuron_cuda.h): output and workspace allocation (torch's
// caching allocator), the current stream. Compiled only in CUDA builds. Arguments were validated once by
// saeuron/ops.py; the kernels mask latent ids outside [0, M) before any read, and the only errors raised
// here say that no kernel exists for a dtype or that a launch failed.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "ext.h"
#include "saeuron_cuda.h"

namespace saeuron_ext {
namespace {

namespace sc = saeuron_cuda;

// The launcher dtype of a tensor; `f64` false for the ops with fp32/fp16/bf16 kernels only (top-k, edit: they
// rank fp32 pre-activations; bindings.cpp declares no float64 for them, so saeuron.ops never sends it).
sc::DType dtype_of(const Tensor& t, const char* op, bool f64 = true) {
  switch (t.scalar_type()) {
    case at::kFloat: return sc::DType::f32;
    case at::kHalf: return sc::DType::f16;
    case at::kBFloat16: return sc::DType::bf16;
    case at::kDouble:
      if (f64) return sc::DType::f64;
      [[fallthrough]];
    default:
      TORCH_CHECK(false, "saeuron extension: ", op, " has no CUDA kernel for dtype ", t.scalar_type());
  }
  return sc::DType::f32;
}

void check(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, "saeuron CUDA ", what, " failed: ", cudaGetErrorString(e));
}

sc::TokenView token_view(const Tensor& x) {
  if (x.dim() == 4) return {x.size(2) * x.size(3), x.size(3), x.stride(0), x.stride(2), x.stride(3), x.stride(1)};
  return {1, 1, x.stride(0), 0, 0, x.stride(1)};
}

Tensor workspace(size_t bytes, const Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

void* ptr_or_null(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// Whether the fused top-k handles this problem size (else the dense ATen path is used).
bool fused_topk_ok(int64_t M, int64_t k) { return k <= sc::topk_max_k() && M <= int64_t(65535) * 64; }

// Top-k of the tokens x [N, d] (any strides) into fresh [N, k] tensors.
std::tuple<Tensor, Tensor> topk_tokens(const Tensor& x, const Tensor& W, const Tensor& be, const Tensor& bd, int64_t k) {
  const int64_t d = x.size(1), N = x.size(0), M = W.size(0);
  const sc::DType dt = dtype_of(x, "topk_encode", false);
  if (!fused_topk_ok(M, k)) return topk_dense(x, W, be, bd, k);
  Tensor values = at::empty({N, k}, x.options()), indices = at::empty({N, k}, x.options().dtype(at::kLong));
  if (N == 0) return {values, indices};
  const int64_t chunk = sc::topk_chunk_rows(N, M, static_cast<int>(k));
  const size_t bytes = sc::topk_workspace_bytes(chunk, M, static_cast<int>(k));
  Tensor ws = workspace(bytes, x);
  check(sc::topk_encode(x.data_ptr(), token_view(x), dt, W.data_ptr(), be.data_ptr(), bd.data_ptr(), N, d, M,
                        static_cast<int>(k), values.data_ptr(), indices.data_ptr<int64_t>(), ws.data_ptr(), bytes,
                        c10::cuda::getCurrentCUDAStream()),
        "topk_encode");
  return {values, indices};
}

}  // namespace

std::tuple<Tensor, Tensor> topk_encode_cuda(const Tensor& x, const Tensor& W_enc, const Tensor& b_enc,
                                            const Tensor& b_dec, int64_t k) {
  const c10::cuda::CUDAGuard guard(x.device());
  return topk_tokens(x, W_enc.contiguous(), b_enc.contiguous(), b_dec.contiguous(), k);
}

// Fire-first edit (arguments validated once by saeuron/ops.py): cuBLAS for the gathered GEMM [N, G*F] and
// for the dense rows, small kernels for the decisions (edit.cu). Nothing reads device memory on the host,
// so the edit is graph-capturable. The dense GEMM covers every token in row chunks (cuBLAS takes host
// sizes, and compacting the candidates would need a host sync); non-candidate rows' count blocks exit at
// once. Takes fp32, fp16 and bf16 (bindings.cpp declares no float64 CUDA edit: saeuron.ops runs the reference).
void edit_cuda(Tensor& x, const Tensor& W_enc, const Tensor& b_enc, const Tensor& b_dec, const Tensor& W_dec,
               int64_t k, const Tensor& feat_idx, const Tensor& tau, const Tensor& scale, int64_t rows_per_group) {
  const sc::DType dt = dtype_of(x, "edit_", false);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t d = x.size(1), N = d ? x.numel() / d : 0, M = W_enc.size(0), G = feat_idx.size(0),
                F = feat_idx.size(1);
  if (N == 0 || F == 0 || G == 0) return;
  const auto st = x.scalar_type();
  auto stream = c10::cuda::getCurrentCUDAStream();
  // a [n, d] times b [m, d]^T in fp32 (tensor cores with fp32 accumulation for fp16/bf16)
  auto gemm = [&](const Tensor& a, const Tensor& b) -> Tensor {
    return st == at::kFloat ? at::mm(a, b.t()) : at::mm(a, b.t(), at::kFloat);
  };
  const Tensor xt = x.dim() == 4 ? x.permute({0, 2, 3, 1}).reshape({-1, d}) : x;  // a view when it can be
  const Tensor c = (b_enc.to(at::kFloat) - gemm(b_dec.unsqueeze(0), W_enc).squeeze(0)).contiguous();
  const Tensor S = gemm(xt, W_enc.index_select(0, feat_idx.clamp(0, M - 1).reshape({-1}))).contiguous();
  const auto f32 = x.options().dtype(at::kFloat), i32 = x.options().dtype(at::kInt);
  Tensor pv = at::empty({N, F}, f32), flag = at::empty({N}, i32), cnt = at::empty({N, F}, i32);
  const int64_t* fi = feat_idx.data_ptr<int64_t>();
  check(sc::edit_select(S.data_ptr<float>(), c.data_ptr<float>(), fi, tau.data_ptr<float>(), scale.data_ptr<float>(),
                        pv.data_ptr<float>(), flag.data_ptr<int>(), N, M, G, F, rows_per_group, dt, stream),
        "edit_ (select)");
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(N, (int64_t(1) << 25) / std::max<int64_t>(M, 1)));
  for (int64_t r0 = 0; r0 < N; r0 += chunk) {
    const int64_t rows = std::min(chunk, N - r0);
    const Tensor P = gemm(xt.narrow(0, r0, rows), W_enc).contiguous();
    check(sc::edit_count(P.data_ptr<float>(), c.data_ptr<float>(), r0, rows, M, fi, tau.data_ptr<float>(),
                         scale.data_ptr<float>(), pv.data_ptr<float>(), flag.data_ptr<int>(), cnt.data_ptr<int>(), G,
                         F, rows_per_group, dt, stream),
          "edit_ (count)");
  }
  check(sc::edit_apply(x.data_ptr(), token_view(x), dt, W_dec.data_ptr(), N, d, fi, scale.data_ptr<float>(),
                       pv.data_ptr<float>(), cnt.data_ptr<int>(), flag.data_ptr<int>(), k, G, F, rows_per_group,
                       stream),
        "edit_ (apply)");
}

Tensor sparse_decode_cuda(const Tensor& values, const Tensor& indices, const Tensor& W_dec, const OptTensor& b_dec,
                          const OptTensor& residual) {
  const int64_t N = values.size(0), k = values.size(1), M = W_dec.size(0), d = W_dec.size(1);
  Tensor b, res;
  if (b_dec.has_value() && b_dec->defined()) b = b_dec->contiguous();
  if (residual.has_value() && residual->defined()) res = residual->contiguous();
  const c10::cuda::CUDAGuard guard(values.device());
  const Tensor v = values.contiguous(), idx = indices.contiguous(), W = W_dec.contiguous();
  Tensor out = at::empty({N, d}, W.options());
  check(sc::sparse_decode(v.data_ptr(), idx.data_ptr<int64_t>(), W.data_ptr(), ptr_or_null(b), ptr_or_null(res),
                          out.data_ptr(), N, static_cast<int>(k), d, M, dtype_of(W, "sparse_decode"),
                          c10::cuda::getCurrentCUDAStream()),
        "sparse_decode");
  return out;
}

std::tuple<Tensor, Tensor, Tensor> sparse_decode_bwd_cuda(const Tensor& grad_out, const Tensor& values,
                                                          const Tensor& indices, const Tensor& W_dec) {
  const int64_t N = values.size(0), k = values.size(1), M = W_dec.size(0), d = W_dec.size(1);
  const sc::DType dt = dtype_of(W_dec, "sparse_decode_bwd");
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const Tensor g = grad_out.contiguous(), v = values.contiguous(), idx = indices.contiguous(), W = W_dec.contiguous();
  Tensor gv = at::empty({N, k}, v.options()), gW = at::empty({M, d}, W.options()), gb = at::empty({d}, W.options());
  const size_t bytes = sc::sparse_decode_bwd_workspace_bytes(N, d, M, dt);
  Tensor ws = workspace(bytes, W);
  check(sc::sparse_decode_bwd(g.data_ptr(), v.data_ptr(), idx.data_ptr<int64_t>(), W.data_ptr(), gv.data_ptr(),
                              gW.data_ptr(), gb.data_ptr(), N, static_cast<int>(k), d, M, dt, ws.data_ptr(),
                              bytes, c10::cuda::getCurrentCUDAStream()),
        "sparse_decode_bwd");
  return {gv, gW, gb};
}

Tensor gather_encode_cuda(const Tensor& x, const Tensor& W_enc, const Tensor& b_enc, const Tensor& b_dec,
                          const Tensor& indices) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor xx = x.contiguous(), W = W_enc.contiguous(), be = b_enc.contiguous(), bd = b_dec.contiguous(),
               idx = indices.contiguous();
  const int64_t N = x.size(0), d = x.size(1), k = indices.size(1), M = W.size(0);
  Tensor out = at::empty({N, k}, x.options());
  check(sc::gather_encode(xx.data_ptr(), W.data_ptr(), be.data_ptr(), bd.data_ptr(), idx.data_ptr<int64_t>(),
                          out.data_ptr(), N, static_cast<int>(k), d, M, dtype_of(x, "gather_encode"),
                          c10::cuda::getCurrentCUDAStream()),
        "gather_encode");
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gather_encode_bwd_cuda(const Tensor& grad_values, const Tensor& x,
                                                                  const Tensor& W_enc, const Tensor& b_dec,
                                                                  const Tensor& indices, const Tensor& values) {
  const sc::DType dt = dtype_of(x, "gather_encode_bwd");
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor gvals = grad_values.contiguous(), xx = x.contiguous(), W = W_enc.contiguous(), bd = b_dec.contiguous(),
               idx = indices.contiguous(), vals = values.contiguous();
  const int64_t N = x.size(0), d = x.size(1), k = indices.size(1), M = W.size(0);
  Tensor gx = at::empty({N, d}, x.options()), gW = at::empty({M, d}, W.options()), gbe = at::empty({M}, W.options()),
         gbd = at::empty({d}, bd.options());
  const size_t bytes = sc::gather_encode_bwd_workspace_bytes(N, d, M, dt);
  Tensor ws = workspace(bytes, x);
  check(sc::gather_encode_bwd(gvals.data_ptr(), xx.data_ptr(), W.data_ptr(), bd.data_ptr(), idx.data_ptr<int64_t>(),
                              vals.data_ptr(), gx.data_ptr(), gW.data_ptr(), gbe.data_ptr(), gbd.data_ptr(), N,
                              static_cast<int>(k), d, M, dt, ws.data_ptr(), bytes,
                              c10::cuda::getCurrentCUDAStream()),
        "gather_encode_bwd");
  return {gx, gW, gbe, gbd};
}

}  // namespace saeuron_ext
