// Fire-first unlearning edit (see saeuron/reference.py edit_delta): the kernels around the cuBLAS GEMMs
// that cuda_ops.cpp launches. No host synchronisation anywhere, so the whole edit is graph-capturable.
//   edit_select: from the gathered pre-activations S [N, G*F] (x W_sel^T, fp32, cuBLAS) decides which
//                selected features pass (value in x.dtype > tau, non-zero (scale - 1) f); passing values go
//                to pv [N, F] (-1 elsewhere) and flag[r] says whether token r is a candidate.
//   edit_count:  one block per token of a chunk of dense pre-activation rows P [rows, M] (fp32, cuBLAS);
//                a non-candidate token's block exits at once; otherwise, per passing entry, re-reads its
//                value from the dense row and counts the latents that beat it (larger value, or equal
//                value at a lower index; never itself).
//   edit_apply:  one block per candidate token: the entries with fewer than k latents beating them are
//                edited, x += sum_j (scale_j - 1) f_j W_dec[feat_j] in table order (fp32), written in place.
// Tokens with nothing passing are never written: bit for bit unchanged. Instantiated for fp32, fp16 and bf16
// (no float64 CUDA edit: saeuron.ops runs float64 edits on GPUs on the reference).
#include "common.cuh"

namespace saeuron_cuda {
namespace {

constexpr int NT = 256;
constexpr int MAXF = 256;  // table width handled per block (the bridge splits wider tables)

template <typename T>
__global__ void __launch_bounds__(NT) edit_select_kernel(const float* S, const float* c, const int64_t* feat,
                                                         const float* tau, const float* scale, float* pv, int* flag,
                                                         int64_t N, int64_t M, int64_t G, int64_t F, int64_t rpg) {
  const int64_t i = blockIdx.x * int64_t(NT) + threadIdx.x;
  if (i >= N) return;
  const int64_t g = i / rpg < G - 1 ? i / rpg : G - 1;
  int any = 0;
  for (int64_t j = 0; j < F; ++j) {
    const int64_t m = feat[g * F + j];
    float out = -1.f;
    if (m >= 0 && m < M) {
      const float v = clean_preact(S[i * G * F + g * F + j] + c[m]);
      const float vr = Conv<T>::load(Conv<T>::store(v));  // codes are rounded to x.dtype, as the reference
      if (vr > tau[g * F + j] && (scale[g * F + j] - 1.f) * vr != 0.f) {
        out = v;
        any = 1;
      }
    }
    pv[i * F + j] = out;
  }
  flag[i] = any;
}

// The value of a passing entry is re-read from the dense row (cuBLAS may round the gathered and the dense
// GEMM differently), re-checked against tau, and written back to pv: ranking, threshold and coefficient
// then all use the dense value, as the reference does.
template <typename T>
__global__ void __launch_bounds__(NT) edit_count_kernel(const float* P, const float* c, int64_t r0, int64_t M,
                                                        const int64_t* feat, const float* tau, const float* scale,
                                                        float* pv, const int* flag, int* cnt, int64_t G, int64_t F,
                                                        int64_t rpg) {
  const int64_t r = r0 + blockIdx.x;
  if (!flag[r]) return;  // not a candidate: nothing to count
  __shared__ int s_cnt[MAXF];
  const int64_t g = r / rpg < G - 1 ? r / rpg : G - 1;
  const float* p = P + int64_t(blockIdx.x) * M;
  for (int64_t j0 = 0; j0 < F; j0 += MAXF) {
    const int64_t nj = F - j0 < MAXF ? F - j0 : MAXF;
    for (int64_t j = threadIdx.x; j < nj; j += NT) s_cnt[j] = 0;
    __syncthreads();
    for (int64_t j = 0; j < nj; ++j) {
      if (pv[r * F + j0 + j] < 0.f) continue;  // uniform across the block
      const int64_t t = g * F + j0 + j, mj = feat[t];
      const float v = clean_preact(p[mj] + c[mj]);
      const float vr = Conv<T>::load(Conv<T>::store(v));
      __syncthreads();  // every thread has read pv before thread 0 may rewrite it
      if (!(vr > tau[t] && (scale[t] - 1.f) * vr != 0.f)) {
        if (threadIdx.x == 0) pv[r * F + j0 + j] = -1.f;
        continue;  // uniform: every thread computed the same v
      }
      if (threadIdx.x == 0) pv[r * F + j0 + j] = v;
      int local = 0;
      for (int64_t m = threadIdx.x; m < M; m += NT) {
        const float q = clean_preact(p[m] + c[m]);
        local += (q > v || (q == v && m < mj)) && m != mj;
      }
      local = warp_sum(local);
      if ((threadIdx.x & 31) == 0) atomicAdd(&s_cnt[j], local);
    }
    __syncthreads();
    for (int64_t j = threadIdx.x; j < nj; j += NT) cnt[r * F + j0 + j] = s_cnt[j];
    __syncthreads();
  }
}

template <typename T>
__global__ void __launch_bounds__(NT) edit_apply_kernel(T* x, TokenView xv, const T* W_dec, int64_t d,
                                                        const int64_t* feat, const float* scale, const float* pv,
                                                        const int* cnt, const int* flag, int64_t k, int64_t G,
                                                        int64_t F, int64_t rpg) {
  using A = float;  // fp32 accumulation (T is fp32, fp16 or bf16)
  const int64_t r = blockIdx.x;
  if (!flag[r]) return;
  const int64_t g = r / rpg < G - 1 ? r / rpg : G - 1;
  bool any = false;
  for (int64_t j = 0; j < F; ++j) any |= pv[r * F + j] >= 0.f && cnt[r * F + j] < k;
  if (!any) return;  // uniform across the block
  const int64_t off = token_offset(xv, r);
  for (int64_t col = threadIdx.x; col < d; col += NT) {
    A delta = A(0);
    for (int64_t j = 0; j < F; ++j) {  // table order, as the reference sums
      const float v = pv[r * F + j];
      if (v < 0.f || cnt[r * F + j] >= k) continue;
      const A f = A(Conv<T>::load(Conv<T>::store(A(v))));
      const A coef = A(scale[g * F + j] - 1.0f) * f;
      delta += coef * A(Conv<T>::load(W_dec[feat[g * F + j] * d + col]));
    }
    T* px = x + off + col * xv.sc;
    *px = Conv<T>::store(A(Conv<T>::load(*px)) + delta);
  }
}

}  // namespace

cudaError_t edit_select(const float* S, const float* c, const int64_t* feat_idx, const float* tau, const float* scale,
                        float* pv, int* flag, int64_t N, int64_t M, int64_t G, int64_t F, int64_t rows_per_group,
                        DType dt, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  const int64_t rpg = rows_per_group > 0 ? rows_per_group : 1;
  SAEURON_DISPATCH_FP32_FP16_BF16(dt, T, {
    edit_select_kernel<T><<<ceil_div(N, NT), NT, 0, stream>>>(S, c, feat_idx, tau, scale, pv, flag, N, M, G, F, rpg);
  });
  return cudaGetLastError();
}

cudaError_t edit_count(const float* P, const float* c, int64_t r0, int64_t rows, int64_t M, const int64_t* feat_idx,
                       const float* tau, const float* scale, float* pv, const int* flag, int* cnt, int64_t G,
                       int64_t F, int64_t rows_per_group, DType dt, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (rows > int64_t(0x7FFFFFFF)) return cudaErrorInvalidValue;
  const int64_t rpg = rows_per_group > 0 ? rows_per_group : 1;
  SAEURON_DISPATCH_FP32_FP16_BF16(dt, T, {
    edit_count_kernel<T><<<static_cast<unsigned int>(rows), NT, 0, stream>>>(P, c, r0, M, feat_idx, tau, scale, pv,
                                                                              flag, cnt, G, F, rpg);
  });
  return cudaGetLastError();
}

cudaError_t edit_apply(void* x, TokenView xv, DType dt, const void* W_dec, int64_t N, int64_t d,
                       const int64_t* feat_idx, const float* scale, const float* pv, const int* cnt, const int* flag,
                       int64_t k, int64_t G, int64_t F, int64_t rows_per_group, cudaStream_t stream) {
  if (N == 0 || F == 0 || G == 0 || d == 0) return cudaSuccess;
  if (N > int64_t(0x7FFFFFFF)) return cudaErrorInvalidValue;
  const int64_t rpg = rows_per_group > 0 ? rows_per_group : 1;
  SAEURON_DISPATCH_FP32_FP16_BF16(dt, T, {
    edit_apply_kernel<T><<<static_cast<unsigned int>(N), NT, 0, stream>>>(
        static_cast<T*>(x), xv, static_cast<const T*>(W_dec), d, feat_idx, scale, pv, cnt, flag, k, G, F, rpg);
  });
  return cudaGetLastError();
}

}  // namespace saeuron_cuda
