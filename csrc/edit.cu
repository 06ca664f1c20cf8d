// The unlearning edit applied in place, given each token's top-k code (see reference.edit_):
// x += sum over selected features i that are in the token's top-k with f_i > tau of (scale - 1) f_i W_dec[i].
// One block per token. Non-finite tokens, and tokens whose delta is exactly zero, are never written,
// so they stay bit-for-bit unchanged.
#include "common.cuh"

namespace saeuron_cuda {
namespace {

constexpr int NT = 128;

template <typename T> struct EditArgs {
  T* x;
  TokenView xv;
  const T* W_dec;
  int64_t N, d, M;
  const T* values;
  const int64_t* indices;
  int k;
  const int64_t* feat_idx;
  const float* tau;
  const float* scale;
  int64_t G, F, rows_per_group;
};

// (scale - 1) * f for table entry j of this token, 0 when the feature does not fire.
template <typename T>
__device__ typename AccT<T>::type coef(const EditArgs<T>& a, int64_t r, int64_t g, int64_t j) {
  using A = typename AccT<T>::type;
  const int64_t m = a.feat_idx[g * a.F + j];
  if (m < 0 || m >= a.M) return A(0);
  const int64_t* idx = a.indices + r * a.k;
  for (int s = 0; s < a.k; ++s) {
    if (idx[s] == m) {
      const A f = Conv<T>::load(a.values[r * a.k + s]);
      if (!(f > A(a.tau[g * a.F + j]))) return A(0);
      return A(a.scale[g * a.F + j] - 1.0f) * f;  // (scale - 1) in fp32, as the reference
    }
  }
  return A(0);
}

// Delta of column c (c may be >= d: then only helps with the shared loads). All threads call it.
template <typename T>
__device__ typename AccT<T>::type column_delta(const EditArgs<T>& a, int64_t r, int64_t g, int64_t c,
                                               typename AccT<T>::type* s_coef, int64_t* s_m) {
  using A = typename AccT<T>::type;
  A acc = A(0);
  for (int64_t j0 = 0; j0 < a.F; j0 += NT) {
    const int64_t j = j0 + threadIdx.x;
    s_coef[threadIdx.x] = j < a.F ? coef(a, r, g, j) : A(0);
    s_m[threadIdx.x] = j < a.F ? a.feat_idx[g * a.F + j] : 0;
    __syncthreads();
    const int n = static_cast<int>(a.F - j0 < NT ? a.F - j0 : NT);
    if (c < a.d) {
      for (int jj = 0; jj < n; ++jj) {
        const A cf = s_coef[jj];
        if (cf != A(0)) acc += cf * A(Conv<T>::load(a.W_dec[s_m[jj] * a.d + c]));
      }
    }
    __syncthreads();
  }
  return acc;
}

template <typename T>
__global__ void __launch_bounds__(NT) edit_apply_kernel(EditArgs<T> a) {
  using A = typename AccT<T>::type;
  __shared__ A s_coef[NT];
  __shared__ int64_t s_m[NT];
  const int64_t r = blockIdx.x;
  const int64_t off = token_offset(a.xv, r);
  const int tid = threadIdx.x;

  bool bad = false;
  for (int64_t c = tid; c < a.d; c += NT) bad |= !isfinite(A(Conv<T>::load(a.x[off + c * a.xv.sc])));
  if (__syncthreads_or(bad)) return;

  const int64_t rpg = a.rows_per_group > 0 ? a.rows_per_group : 1;
  const int64_t g = r / rpg < a.G - 1 ? r / rpg : a.G - 1;
  bool any = false;
  for (int64_t j = tid; j < a.F; j += NT) any |= coef(a, r, g, j) != A(0);
  if (!__syncthreads_or(any)) return;

  bool changed = false;
  for (int64_t c0 = 0; c0 < a.d; c0 += NT) {
    const A delta = column_delta(a, r, g, c0 + tid, s_coef, s_m);
    if (__syncthreads_or(c0 + tid < a.d && delta != A(0))) {
      changed = true;
      break;
    }
  }
  if (!changed) return;
  for (int64_t c0 = 0; c0 < a.d; c0 += NT) {
    const int64_t c = c0 + tid;
    const A delta = column_delta(a, r, g, c, s_coef, s_m);
    if (c < a.d) {
      T* p = a.x + off + c * a.xv.sc;
      *p = Conv<T>::store(A(Conv<T>::load(*p)) + delta);
    }
  }
}

}  // namespace

cudaError_t edit_apply(void* x, TokenView xv, DType dt, const void* W_dec, int64_t N, int64_t d, int64_t M,
                       const void* values, const int64_t* indices, int k, const int64_t* feat_idx,
                       const float* tau, const float* scale, int64_t G, int64_t F, int64_t rows_per_group,
                       cudaStream_t stream) {
  if (N == 0 || F == 0 || G == 0 || d == 0) return cudaSuccess;
  if (N > int64_t(0x7FFFFFFF)) return cudaErrorInvalidValue;
  SAEURON_DISPATCH_FLOAT(dt, T, {
    EditArgs<T> a{static_cast<T*>(x), xv, static_cast<const T*>(W_dec), N, d, M, static_cast<const T*>(values),
                  indices, k, feat_idx, tau, scale, G, F, rows_per_group};
    edit_apply_kernel<T><<<static_cast<unsigned int>(N), NT, 0, stream>>>(a);
  });
  return cudaGetLastError();
}

}  // namespace saeuron_cuda
