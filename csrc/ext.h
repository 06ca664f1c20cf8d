// ATen-level entry points of the extension: CPU implementations (cpu_ops.cpp) and, in CUDA builds,
// the bridge to the CUDA launchers (cuda_ops.cpp). Signatures mirror saeuron/reference.py; outputs
// are always freshly allocated, except edit_ which updates x in place.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace saeuron_ext {

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;

// Arguments are validated once, in saeuron/ops.py; these functions trust them (see cpu_ops.cpp for the
// memory-safety guards that stay).
// Dense top-k (ATen matmul + topk), exactly reference.topk_encode; any device (the CUDA bridge's path for
// k above the fused kernel's limit).
std::tuple<Tensor, Tensor> topk_dense(const Tensor& x, const Tensor& W_enc, const Tensor& b_enc,
                                      const Tensor& b_dec, int64_t k);

Tensor sparse_decode_cpu(const Tensor& values, const Tensor& indices, const Tensor& W_dec, const OptTensor& b_dec,
                         const OptTensor& residual);
std::tuple<Tensor, Tensor, Tensor> sparse_decode_bwd_cpu(const Tensor& grad_out, const Tensor& values,
                                                         const Tensor& indices, const Tensor& W_dec);
Tensor gather_encode_cpu(const Tensor& x, const Tensor& W_enc, const Tensor& b_enc, const Tensor& b_dec,
                         const Tensor& indices);
std::tuple<Tensor, Tensor, Tensor, Tensor> gather_encode_bwd_cpu(const Tensor& grad_values, const Tensor& x,
                                                                 const Tensor& W_enc, const Tensor& b_dec,
                                                                 const Tensor& indices, const Tensor& values);
void edit_cpu(Tensor& x, const Tensor& W_enc, const Tensor& b_enc, const Tensor& b_dec, const Tensor& W_dec, int64_t k,
              const Tensor& feat_idx, const Tensor& tau, const Tensor& scale, int64_t rows_per_group);

#ifdef SAEURON_WITH_CUDA
std::tuple<Tensor, Tensor> topk_encode_cuda(const Tensor& x, const Tensor& W_enc, const Tensor& b_enc,
                                            const Tensor& b_dec, int64_t k);
Tensor sparse_decode_cuda(const Tensor& values, const Tensor& indices, const Tensor& W_dec, const OptTensor& b_dec,
                          const OptTensor& residual);
std::tuple<Tensor, Tensor, Tensor> sparse_decode_bwd_cuda(const Tensor& grad_out, const Tensor& values,
                                                          const Tensor& indices, const Tensor& W_dec);
Tensor gather_encode_cuda(const Tensor& x, const Tensor& W_enc, const Tensor& b_enc, const Tensor& b_dec,
                          const Tensor& indices);
std::tuple<Tensor, Tensor, Tensor, Tensor> gather_encode_bwd_cuda(const Tensor& grad_values, const Tensor& x,
                                                                  const Tensor& W_enc, const Tensor& b_dec,
                                                                  const Tensor& indices, const Tensor& values);
void edit_cuda(Tensor& x, const Tensor& W_enc, const Tensor& b_enc, const Tensor& b_dec, const Tensor& W_dec,
               int64_t k, const Tensor& feat_idx, const Tensor& tau, const Tensor& scale, int64_t rows_per_group);
#endif

}  // namespace saeuron_ext
