// Launchers of the CUDA kernels: plain C++ (raw pointers, sizes, a stream), no ATen, no torch.
//
// The kernels in the .cu files include only CUDA headers and this file, so they compile with nvcc
// alone (the tests build them on machines whose torch has no CUDA). The ATen binding layer
// (cuda_ops.cpp) allocates outputs and workspaces with torch's allocator and calls these.
//
// Every launcher returns the cudaError_t of its launches (cudaSuccess when nothing went wrong).
#pragma once
#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace saeuron_cuda {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2, f64 = 3 };

// Where channel c of token t lives: offset(t) + c * sc, with tokens numbered (b, h, w) row-major:
// offset(t) = (t / hw) * sb + ((t % hw) / w) * sh + (t % w) * sw.
// [N, d] tokens: hw = w = 1, sb = stride(0), sh = sw = 0, sc = stride(1).
// [B, C, H, W]:  hw = H*W, w = W, sb = stride(0), sh = stride(2), sw = stride(3), sc = stride(1).
struct TokenView {
  int64_t hw, w, sb, sh, sw, sc;
};

// ---------------------------------------------------------------- fused top-k encoder
// Largest k the fused kernels handle (larger k: the binding layer uses a dense path).
int topk_max_k();
// Rows processed per pass (bounds the candidate buffer); the workspace must hold one pass.
int64_t topk_chunk_rows(int64_t N, int64_t M, int k);
size_t topk_workspace_bytes(int64_t chunk_rows, int64_t M, int k);
// values/indices: [N, k] contiguous, sorted by descending value. dt in {f32, f16, bf16}.
// W_enc [M, d], b_enc [M], b_dec [d] contiguous, all of type dt. Accumulates in fp32.
cudaError_t topk_encode(const void* x, TokenView xv, DType dt, const void* W_enc, const void* b_enc,
                        const void* b_dec, int64_t N, int64_t d, int64_t M, int k, void* values,
                        int64_t* indices, void* workspace, size_t workspace_bytes, cudaStream_t stream);

// ---------------------------------------------------------------- fire-first edit
// Around the cuBLAS GEMMs of the bridge (cuda_ops.cpp). Tables feat_idx/tau/scale are [G, F] contiguous;
// token r uses row min(r / rows_per_group, G - 1); ids outside [0, M) never fire. c [M] is the folded
// bias b_enc - W_enc b_dec (fp32). All buffers are fp32/int32 [N, F] or [N] and contiguous. dt (the type of x
// and W_dec) in {f32, f16, bf16}: other values return cudaErrorInvalidValue.
// S [N, G*F]: x W_enc[feat]^T (fp32). Writes pv (passing values, -1 elsewhere) and flag (candidates).
cudaError_t edit_select(const float* S, const float* c, const int64_t* feat_idx, const float* tau,
                        const float* scale, float* pv, int* flag, int64_t N, int64_t M, int64_t G, int64_t F,
                        int64_t rows_per_group, DType dt, cudaStream_t stream);
// P [rows, M]: x W_enc^T (fp32) of tokens r0 .. r0 + rows - 1. For candidate tokens, each passing entry's
// value is replaced by the dense one (pv = -1 if it no longer passes) and cnt[r, j] = number of latents
// beating it (larger value, or equal value at a lower index).
cudaError_t edit_count(const float* P, const float* c, int64_t r0, int64_t rows, int64_t M,
                       const int64_t* feat_idx, const float* tau, const float* scale, float* pv, const int* flag,
                       int* cnt, int64_t G, int64_t F, int64_t rows_per_group, DType dt, cudaStream_t stream);
// In place on x (layout xv, type dt): x += sum over j with pv >= 0 and cnt < k of (scale - 1) f W_dec[feat].
cudaError_t edit_apply(void* x, TokenView xv, DType dt, const void* W_dec, int64_t N, int64_t d,
                       const int64_t* feat_idx, const float* scale, const float* pv, const int* cnt,
                       const int* flag, int64_t k, int64_t G, int64_t F, int64_t rows_per_group,
                       cudaStream_t stream);

// ---------------------------------------------------------------- training ops
// All tensors contiguous, dt any DType. Latent ids outside [0, M) contribute nothing (masked before any read).
// b_dec and residual may be null.
cudaError_t sparse_decode(const void* values, const int64_t* indices, const void* W_dec, const void* b_dec,
                          const void* residual, void* out, int64_t N, int k, int64_t d, int64_t M, DType dt,
                          cudaStream_t stream);

size_t sparse_decode_bwd_workspace_bytes(int64_t N, int64_t d, int64_t M, DType dt);
// grad_values [N, k], grad_W [M, d], grad_b [d].
cudaError_t sparse_decode_bwd(const void* grad_out, const void* values, const int64_t* indices, const void* W_dec,
                              void* grad_values, void* grad_W, void* grad_b, int64_t N, int k, int64_t d, int64_t M,
                              DType dt, void* workspace, size_t workspace_bytes, cudaStream_t stream);

// out [N, k] = ReLU((x - b_dec) . W_enc[indices] + b_enc[indices]).
cudaError_t gather_encode(const void* x, const void* W_enc, const void* b_enc, const void* b_dec,
                          const int64_t* indices, void* out, int64_t N, int k, int64_t d, int64_t M, DType dt,
                          cudaStream_t stream);

size_t gather_encode_bwd_workspace_bytes(int64_t N, int64_t d, int64_t M, DType dt);
// grad_x [N, d], grad_W [M, d], grad_b_enc [M], grad_b_dec [d].
cudaError_t gather_encode_bwd(const void* grad_values, const void* x, const void* W_enc, const void* b_dec,
                              const int64_t* indices, const void* values, void* grad_x, void* grad_W,
                              void* grad_b_enc, void* grad_b_dec, int64_t N, int k, int64_t d, int64_t M, DType dt,
                              void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace saeuron_cuda
