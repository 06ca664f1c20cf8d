// Training ops on sparse codes: sparse_decode (+ backward) and gather_encode (+ backward).
// Same semantics as reference.py; fp32 accumulation (fp64 for fp64). Gradients of the weight
// matrices touch only the rows named in `indices` (atomic adds into an accumulator).
#include <type_traits>

#include "common.cuh"

namespace saeuron_cuda {
namespace {

constexpr int NT = 128;

size_t align256(size_t b) { return (b + 255) / 256 * 256; }
size_t acc_size(DType dt) { return dt == DType::f64 ? sizeof(double) : sizeof(float); }

// out[r, c] = sum_j values[r, j] W[idx[r, j], c] (+ b[c]) (+ residual[r, c]); one block per row.
template <typename T>
__global__ void __launch_bounds__(NT) sparse_decode_kernel(const T* __restrict__ values, const int64_t* __restrict__ idx,
                                                           const T* __restrict__ W, const T* __restrict__ b,
                                                           const T* __restrict__ residual, T* __restrict__ out, int k,
                                                           int64_t d, int64_t M) {
  using A = typename AccT<T>::type;
  const int64_t r = blockIdx.x;
  for (int64_t c = threadIdx.x; c < d; c += NT) {
    A acc = A(0);
    for (int j = 0; j < k; ++j) {
      const int64_t m = idx[r * k + j];
      if (m >= 0 && m < M) acc += A(Conv<T>::load(values[r * k + j])) * A(Conv<T>::load(W[m * d + c]));
    }
    if (b) acc += A(Conv<T>::load(b[c]));
    if (residual) acc += A(Conv<T>::load(residual[r * d + c]));
    out[r * d + c] = Conv<T>::store(acc);
  }
}

// out[r, j] = sum_c u[r, c] W[idx[r, j], c] with u = rows of `rows` (minus `shift` when given),
// then + bias[idx] and ReLU when `encode`. One warp per (r, j).
template <typename T, bool kEncode>
__global__ void __launch_bounds__(NT) row_dot_kernel(const T* __restrict__ rows, const T* __restrict__ shift,
                                                     const T* __restrict__ W, const T* __restrict__ bias,
                                                     const int64_t* __restrict__ idx, T* __restrict__ out, int64_t N,
                                                     int k, int64_t d, int64_t M) {
  using A = typename AccT<T>::type;
  const int lane = threadIdx.x % 32;
  const int64_t pair = int64_t(blockIdx.x) * (NT / 32) + threadIdx.x / 32;
  if (pair >= N * k) return;  // warp-uniform
  const int64_t r = pair / k;
  const int64_t m = idx[pair];
  const bool ok = m >= 0 && m < M;
  A s = A(0);
  if (ok) {
    for (int64_t c = lane; c < d; c += 32) {
      A u = A(Conv<T>::load(rows[r * d + c]));
      if (shift) u -= A(Conv<T>::load(shift[c]));
      s += u * A(Conv<T>::load(W[m * d + c]));
    }
  }
  s = warp_sum(s);
  if (lane == 0) {
    if (kEncode) {
      if (ok) s += A(Conv<T>::load(bias[m]));
      s = relu_keep_nan(s);
    }
    out[pair] = Conv<T>::store(s);
  }
}

// gW[idx[r, j], c] += coef[r, j] * u[r, c] (u = rows - shift); optional gb[idx[r, j]] += coef.
// coef = values (sparse_decode) or the ReLU-gated grad (gather_encode). One block per row.
template <typename T>
__global__ void __launch_bounds__(NT) scatter_rows_kernel(const T* __restrict__ coef_src, const T* __restrict__ gate,
                                                          const T* __restrict__ rows, const T* __restrict__ shift,
                                                          const int64_t* __restrict__ idx,
                                                          typename AccT<T>::type* gW, typename AccT<T>::type* gb,
                                                          int k, int64_t d, int64_t M) {
  using A = typename AccT<T>::type;
  const int64_t r = blockIdx.x;
  for (int j = 0; j < k; ++j) {
    const int64_t m = idx[r * k + j];
    if (m < 0 || m >= M) continue;
    A g = A(Conv<T>::load(coef_src[r * k + j]));
    if (gate) g *= A(Conv<T>::load(gate[r * k + j]) > 0 ? 1 : 0);
    if (gb && threadIdx.x == 0) atomicAdd(gb + m, g);
    for (int64_t c = threadIdx.x; c < d; c += NT) {
      A u = A(Conv<T>::load(rows[r * d + c]));
      if (shift) u -= A(Conv<T>::load(shift[c]));
      atomicAdd(gW + m * d + c, g * u);
    }
  }
}

// gx[r, c] = sum_j g[r, j] W[idx[r, j], c] in the accumulation type, g = grad * (values > 0).
template <typename T>
__global__ void __launch_bounds__(NT) gated_decode_kernel(const T* __restrict__ grad, const T* __restrict__ values,
                                                          const int64_t* __restrict__ idx, const T* __restrict__ W,
                                                          typename AccT<T>::type* __restrict__ gx, int k, int64_t d,
                                                          int64_t M) {
  using A = typename AccT<T>::type;
  const int64_t r = blockIdx.x;
  for (int64_t c = threadIdx.x; c < d; c += NT) {
    A acc = A(0);
    for (int j = 0; j < k; ++j) {
      const int64_t m = idx[r * k + j];
      if (m < 0 || m >= M) continue;
      const A g = A(Conv<T>::load(grad[r * k + j])) * A(Conv<T>::load(values[r * k + j]) > 0 ? 1 : 0);
      acc += g * A(Conv<T>::load(W[m * d + c]));
    }
    gx[r * d + c] = acc;
  }
}

// out[c] += sign * sum over a slice of rows of src[r, c] (src in T or the accumulation type).
template <typename S, typename A>
__global__ void __launch_bounds__(NT) column_sum_kernel(const S* __restrict__ src, A* out, int64_t N, int64_t d,
                                                        int64_t rows_per_block, A sign) {
  const int64_t c = int64_t(blockIdx.x) * NT + threadIdx.x;
  if (c >= d) return;
  const int64_t r0 = int64_t(blockIdx.y) * rows_per_block;
  const int64_t r1 = r0 + rows_per_block < N ? r0 + rows_per_block : N;
  A s = A(0);
  for (int64_t r = r0; r < r1; ++r) s += A(Conv<S>::load(src[r * d + c]));
  atomicAdd(out + c, sign * s);
}

template <typename A, typename T>
__global__ void convert_kernel(const A* __restrict__ src, T* __restrict__ dst, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = Conv<T>::store(src[i]);
}

template <typename A, typename T>
cudaError_t convert(const A* src, T* dst, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = (n + 255) / 256 < 65535 ? (n + 255) / 256 : 65535;
  convert_kernel<A, T><<<static_cast<unsigned int>(blocks), 256, 0, stream>>>(src, dst, n);
  return cudaGetLastError();
}

template <typename S, typename A>
cudaError_t column_sum(const S* src, A* out, int64_t N, int64_t d, A sign, cudaStream_t stream) {
  if (N == 0 || d == 0) return cudaSuccess;
  const int64_t rows_per_block = 256;
  const dim3 grid(ceil_div(d, NT), ceil_div(N, rows_per_block));
  column_sum_kernel<S, A><<<grid, NT, 0, stream>>>(src, out, N, d, rows_per_block, sign);
  return cudaGetLastError();
}

// Carves accumulators from the workspace unless T is already the accumulation type.
template <typename T> struct Acc {
  using A = typename AccT<T>::type;
  static constexpr bool kDirect = std::is_same<T, A>::value;
  char* p;
  A* take(void* out, int64_t n) {
    if (kDirect) return static_cast<A*>(out);
    A* a = reinterpret_cast<A*>(p);
    p += align256(size_t(n) * sizeof(A));
    return a;
  }
};

unsigned int pair_blocks(int64_t N, int k) { return ceil_div(N * k, NT / 32); }

template <typename T>
cudaError_t sparse_decode_bwd_impl(const T* grad_out, const T* values, const int64_t* idx, const T* W, T* grad_values,
                                   T* grad_W, T* grad_b, int64_t N, int k, int64_t d, int64_t M, void* workspace,
                                   cudaStream_t stream) {
  using A = typename AccT<T>::type;
  Acc<T> acc{static_cast<char*>(workspace)};
  A* gW = acc.take(grad_W, M * d);
  A* gb = acc.take(grad_b, d);
  SAEURON_RETURN_IF_ERROR(cudaMemsetAsync(gW, 0, size_t(M * d) * sizeof(A), stream));
  SAEURON_RETURN_IF_ERROR(cudaMemsetAsync(gb, 0, size_t(d) * sizeof(A), stream));
  if (N > 0 && k > 0) {
    row_dot_kernel<T, false><<<pair_blocks(N, k), NT, 0, stream>>>(grad_out, nullptr, W, nullptr, idx, grad_values,
                                                                    N, k, d, M);
    scatter_rows_kernel<T><<<static_cast<unsigned int>(N), NT, 0, stream>>>(values, nullptr, grad_out, nullptr, idx,
                                                                            gW, nullptr, k, d, M);
  }
  SAEURON_RETURN_IF_ERROR(cudaGetLastError());
  SAEURON_RETURN_IF_ERROR(column_sum<T, A>(grad_out, gb, N, d, A(1), stream));
  if (!Acc<T>::kDirect) {
    SAEURON_RETURN_IF_ERROR(convert(gW, grad_W, M * d, stream));
    SAEURON_RETURN_IF_ERROR(convert(gb, grad_b, d, stream));
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t gather_encode_bwd_impl(const T* grad, const T* x, const T* W, const T* b_dec, const int64_t* idx,
                                   const T* values, T* grad_x, T* grad_W, T* grad_b_enc, T* grad_b_dec, int64_t N,
                                   int k, int64_t d, int64_t M, void* workspace, cudaStream_t stream) {
  using A = typename AccT<T>::type;
  Acc<T> acc{static_cast<char*>(workspace)};
  A* gx = acc.take(grad_x, N * d);
  A* gW = acc.take(grad_W, M * d);
  A* gbe = acc.take(grad_b_enc, M);
  A* gbd = acc.take(grad_b_dec, d);
  SAEURON_RETURN_IF_ERROR(cudaMemsetAsync(gW, 0, size_t(M * d) * sizeof(A), stream));
  SAEURON_RETURN_IF_ERROR(cudaMemsetAsync(gbe, 0, size_t(M) * sizeof(A), stream));
  SAEURON_RETURN_IF_ERROR(cudaMemsetAsync(gbd, 0, size_t(d) * sizeof(A), stream));
  if (N > 0) {
    gated_decode_kernel<T><<<static_cast<unsigned int>(N), NT, 0, stream>>>(grad, values, idx, W, gx, k, d, M);
    if (k > 0)
      scatter_rows_kernel<T><<<static_cast<unsigned int>(N), NT, 0, stream>>>(grad, values, x, b_dec, idx, gW, gbe, k,
                                                                              d, M);
  }
  SAEURON_RETURN_IF_ERROR(cudaGetLastError());
  SAEURON_RETURN_IF_ERROR(column_sum<A, A>(gx, gbd, N, d, A(-1), stream));
  if (!Acc<T>::kDirect) {
    SAEURON_RETURN_IF_ERROR(convert(gx, grad_x, N * d, stream));
    SAEURON_RETURN_IF_ERROR(convert(gW, grad_W, M * d, stream));
    SAEURON_RETURN_IF_ERROR(convert(gbe, grad_b_enc, M, stream));
    SAEURON_RETURN_IF_ERROR(convert(gbd, grad_b_dec, d, stream));
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t sparse_decode(const void* values, const int64_t* indices, const void* W_dec, const void* b_dec,
                          const void* residual, void* out, int64_t N, int k, int64_t d, int64_t M, DType dt,
                          cudaStream_t stream) {
  if (N == 0 || d == 0) return cudaSuccess;
  if (N > int64_t(0x7FFFFFFF)) return cudaErrorInvalidValue;
  SAEURON_DISPATCH_FLOAT(dt, T, {
    sparse_decode_kernel<T><<<static_cast<unsigned int>(N), NT, 0, stream>>>(
        static_cast<const T*>(values), indices, static_cast<const T*>(W_dec), static_cast<const T*>(b_dec),
        static_cast<const T*>(residual), static_cast<T*>(out), k, d, M);
  });
  return cudaGetLastError();
}

cudaError_t gather_encode(const void* x, const void* W_enc, const void* b_enc, const void* b_dec,
                          const int64_t* indices, void* out, int64_t N, int k, int64_t d, int64_t M, DType dt,
                          cudaStream_t stream) {
  if (N == 0 || k == 0) return cudaSuccess;
  SAEURON_DISPATCH_FLOAT(dt, T, {
    row_dot_kernel<T, true><<<pair_blocks(N, k), NT, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(b_dec), static_cast<const T*>(W_enc),
        static_cast<const T*>(b_enc), indices, static_cast<T*>(out), N, k, d, M);
  });
  return cudaGetLastError();
}

size_t sparse_decode_bwd_workspace_bytes(int64_t N, int64_t d, int64_t M, DType dt) {
  if (dt == DType::f32 || dt == DType::f64) return 0;
  return align256(size_t(M * d) * acc_size(dt)) + align256(size_t(d) * acc_size(dt));
}

cudaError_t sparse_decode_bwd(const void* grad_out, const void* values, const int64_t* indices, const void* W_dec,
                              void* grad_values, void* grad_W, void* grad_b, int64_t N, int k, int64_t d, int64_t M,
                              DType dt, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (workspace_bytes < sparse_decode_bwd_workspace_bytes(N, d, M, dt)) return cudaErrorInvalidValue;
  if (N > int64_t(0x7FFFFFFF)) return cudaErrorInvalidValue;
  SAEURON_DISPATCH_FLOAT(dt, T, {
    return sparse_decode_bwd_impl<T>(static_cast<const T*>(grad_out), static_cast<const T*>(values), indices,
                                     static_cast<const T*>(W_dec), static_cast<T*>(grad_values),
                                     static_cast<T*>(grad_W), static_cast<T*>(grad_b), N, k, d, M, workspace,
                                     stream);
  });
  return cudaSuccess;
}

size_t gather_encode_bwd_workspace_bytes(int64_t N, int64_t d, int64_t M, DType dt) {
  if (dt == DType::f32 || dt == DType::f64) return 0;
  const size_t a = acc_size(dt);
  return align256(size_t(N * d) * a) + align256(size_t(M * d) * a) + align256(size_t(M) * a) + align256(size_t(d) * a);
}

cudaError_t gather_encode_bwd(const void* grad_values, const void* x, const void* W_enc, const void* b_dec,
                              const int64_t* indices, const void* values, void* grad_x, void* grad_W,
                              void* grad_b_enc, void* grad_b_dec, int64_t N, int k, int64_t d, int64_t M, DType dt,
                              void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (workspace_bytes < gather_encode_bwd_workspace_bytes(N, d, M, dt)) return cudaErrorInvalidValue;
  if (N > int64_t(0x7FFFFFFF)) return cudaErrorInvalidValue;
  SAEURON_DISPATCH_FLOAT(dt, T, {
    return gather_encode_bwd_impl<T>(static_cast<const T*>(grad_values), static_cast<const T*>(x),
                                     static_cast<const T*>(W_enc), static_cast<const T*>(b_dec), indices,
                                     static_cast<const T*>(values), static_cast<T*>(grad_x), static_cast<T*>(grad_W),
                                     static_cast<T*>(grad_b_enc), static_cast<T*>(grad_b_dec), N, k, d, M,
                                     workspace, stream);
  });
  return cudaSuccess;
}

}  // namespace saeuron_cuda
