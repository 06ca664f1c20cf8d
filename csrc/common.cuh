// Device helpers shared by the kernels: dtype conversion, token addressing, sort keys, block top-k.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "saeuron_cuda.h"

namespace saeuron_cuda {

// Accumulation type: fp32 for fp32/fp16/bf16 (as reference.py), fp64 for fp64.
template <typename T> struct AccT { using type = float; };
template <> struct AccT<double> { using type = double; };

// Load to / store from the accumulation type (stores round to nearest even, like torch casts).
template <typename T> struct Conv;
template <> struct Conv<float> {
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};
template <> struct Conv<double> {
  static __device__ __forceinline__ double load(double v) { return v; }
  static __device__ __forceinline__ double store(double v) { return v; }
};
template <> struct Conv<__half> {
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};
template <> struct Conv<__nv_bfloat16> {
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

// Instantiates __VA_ARGS__ for the launcher dtype dt: every float dtype (the training ops) ...
#define SAEURON_DISPATCH_FLOAT(dt, T, ...)                             \
  switch (dt) {                                                        \
    case DType::f32: { using T = float; __VA_ARGS__; } break;          \
    case DType::f16: { using T = __half; __VA_ARGS__; } break;         \
    case DType::bf16: { using T = __nv_bfloat16; __VA_ARGS__; } break; \
    case DType::f64: { using T = double; __VA_ARGS__; } break;         \
    default: return cudaErrorInvalidValue;                             \
  }

// ... or fp32, fp16 and bf16 only (the edit: it ranks fp32 pre-activations; bindings.cpp declares no float64).
#define SAEURON_DISPATCH_FP32_FP16_BF16(dt, T, ...)                    \
  switch (dt) {                                                        \
    case DType::f32: { using T = float; __VA_ARGS__; } break;          \
    case DType::f16: { using T = __half; __VA_ARGS__; } break;         \
    case DType::bf16: { using T = __nv_bfloat16; __VA_ARGS__; } break; \
    default: return cudaErrorInvalidValue;                             \
  }

#define SAEURON_RETURN_IF_ERROR(...)           \
  do {                                         \
    cudaError_t err_ = (__VA_ARGS__);          \
    if (err_ != cudaSuccess) return err_;      \
  } while (0)

inline unsigned int ceil_div(int64_t a, int64_t b) { return static_cast<unsigned int>((a + b - 1) / b); }

__device__ __forceinline__ int64_t token_offset(const TokenView& v, int64_t t) {
  const int64_t b = t / v.hw, r = t - b * v.hw;
  const int64_t h = r / v.w, w = r - h * v.w;
  return b * v.sb + h * v.sh + w * v.sw;
}

// ReLU followed by nan_to_num(nan=0, posinf=0): what reference.topk_encode ranks.
__device__ __forceinline__ float clean_preact(float p) { return (p > 0.f && p <= FLT_MAX) ? p : 0.f; }

// ReLU that keeps NaN (torch.relu semantics), for gather_encode.
template <typename A> __device__ __forceinline__ A relu_keep_nan(A p) { return p < A(0) ? A(0) : p; }

// Monotone 64-bit sort key of a non-negative float and its latent id: value bits high, then
// ~id low so equal values order by smaller id first. 0 never occurs for a real entry (id < 2^32-1),
// so it marks an empty slot.
using Key = unsigned long long;
__device__ __forceinline__ Key make_key(float v, int64_t idx) {
  return (static_cast<Key>(__float_as_uint(v)) << 32) | static_cast<Key>(0xFFFFFFFFu - static_cast<uint32_t>(idx));
}
__device__ __forceinline__ float key_value(Key k) { return __uint_as_float(static_cast<uint32_t>(k >> 32)); }
__device__ __forceinline__ int64_t key_index(Key k) {
  return static_cast<int64_t>(0xFFFFFFFFu - static_cast<uint32_t>(k & 0xFFFFFFFFull));
}

template <typename A> __device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

constexpr int kMaxK = 256;  // largest k of the fused top-k (sorted in shared memory)

// Shared scratch of block_topk.
struct TopkSmem {
  unsigned int hist[256];
  Key prefix;
  int remaining;
  int count;
  int total;
  Key keys[kMaxK];
};

// The k largest non-zero keys among load(0..n) (keys distinct), sorted descending into sm.keys.
// Returns how many were found (< k only when fewer than k non-zero keys exist). Radix select on
// the 64-bit keys (8 passes of 8 bits) finds the k-th key exactly, then the winners are gathered
// and bitonic-sorted. k <= kMaxK. Every thread of the block must call it.
template <int NT, typename Load>
__device__ int block_topk(Load load, int64_t n, int k, TopkSmem& sm) {
  const int tid = threadIdx.x;
  __syncthreads();  // the caller may still be reading sm from a previous call
  if (tid == 0) sm.total = 0;
  __syncthreads();
  int cnt = 0;
  for (int64_t i = tid; i < n; i += NT) cnt += load(i) != 0ull;
  if (cnt) atomicAdd(&sm.total, cnt);
  __syncthreads();
  const int kk = sm.total < k ? sm.total : k;
  Key prefix = 0ull, mask = 0ull;
  int remaining = kk;
  if (kk > 0) {
    for (int shift = 56; shift >= 0; shift -= 8) {
      for (int b = tid; b < 256; b += NT) sm.hist[b] = 0u;
      __syncthreads();
      for (int64_t i = tid; i < n; i += NT) {
        const Key key = load(i);
        if (key != 0ull && (key & mask) == prefix) atomicAdd(&sm.hist[(key >> shift) & 0xFFull], 1u);
      }
      __syncthreads();
      if (tid == 0) {
        int cum = 0;
        for (int b = 255; b >= 0; --b) {
          const int h = static_cast<int>(sm.hist[b]);
          if (cum + h >= remaining) {
            sm.prefix = prefix | (static_cast<Key>(b) << shift);
            sm.remaining = remaining - cum;
            break;
          }
          cum += h;
        }
      }
      __syncthreads();
      prefix = sm.prefix;
      remaining = sm.remaining;
      mask |= 0xFFull << shift;
      __syncthreads();
    }
  }
  // prefix is now the kk-th largest key: gather every key >= it (exactly kk of them).
  if (tid == 0) sm.count = 0;
  __syncthreads();
  if (kk > 0) {
    for (int64_t i = tid; i < n; i += NT) {
      const Key key = load(i);
      if (key != 0ull && key >= prefix) {
        const int pos = atomicAdd(&sm.count, 1);
        if (pos < kMaxK) sm.keys[pos] = key;
      }
    }
  }
  __syncthreads();
  int kpad = 1;
  while (kpad < kk) kpad <<= 1;
  for (int i = kk + tid; i < kpad; i += NT) sm.keys[i] = 0ull;
  __syncthreads();
  for (int size = 2; size <= kpad; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = tid; i < kpad; i += NT) {
        const int j = i ^ stride;
        if (j > i) {
          const Key a = sm.keys[i], b = sm.keys[j];
          const bool desc = (i & size) == 0;
          if (desc ? (a < b) : (a > b)) {
            sm.keys[i] = b;
            sm.keys[j] = a;
          }
        }
      }
      __syncthreads();
    }
  }
  return kk;
}

}  // namespace saeuron_cuda
