// Fused top-k encoder: ReLU(W_enc (x - b_dec) + b_enc) -> per-token top-k, no [N, M] buffer.
//
// Pass 1 (tile_topk_kernel): a tiled fp32 GEMM computes a BM x BN tile of pre-activations; its
//   epilogue keeps each row's top-T (T << BN) as 64-bit keys (value bits, ~latent id) in a small
//   candidate buffer [rows, tiles, T]. Blocks are ordered so the ones sharing a weight tile run
//   together (L2 reuse).
// Pass 2 (merge_kernel): one block per row radix-selects the k largest candidate keys. The result
//   is exact unless some tile dropped an entry that belongs to the top-k, i.e. the tile's T-th kept
//   value is above the final k-th value; such rows (rare: T is about twice the expected number of
//   top-k entries per tile) are appended to an overflow list.
// Pass 3 (recompute_kernel): a fixed grid of blocks recomputes the overflowed rows' full
//   pre-activations into per-block scratch and selects from all M, so the result is always exact.
// Rows are processed in chunks so the candidate buffer stays bounded. No host synchronisation, so
// the launcher can be captured in a CUDA graph.
#include "common.cuh"

namespace saeuron_cuda {
namespace {

constexpr int BM = 64, BN = 64, BK = 16, NT = 256;
constexpr int kRecomputeBlocks = 128;
constexpr int64_t kCandidateBudget = int64_t(64) << 20;  // bytes of candidates per chunk

int num_tiles(int64_t M) { return static_cast<int>((M + BN - 1) / BN); }

// Candidates kept per row and tile: about twice the expected number of top-k entries per tile
// plus slack, at least enough for k in total, at most the whole tile.
int tile_keep(int64_t M, int k) {
  const int64_t tiles = num_tiles(M);
  int64_t t = (2 * int64_t(k) * BN + M - 1) / M + 2;
  if (t < 4) t = 4;
  if (t < (k + tiles - 1) / tiles) t = (k + tiles - 1) / tiles;
  if (t > BN) t = BN;
  return static_cast<int>(t);
}

size_t align256(size_t b) { return (b + 255) / 256 * 256; }

struct Workspace {
  Key* cand;
  int* overflow_rows;
  int* overflow_count;
  float* scratch;
};

Workspace carve(void* ws, int64_t rows, int64_t M, int k) {
  char* p = static_cast<char*>(ws);
  Workspace w;
  w.cand = reinterpret_cast<Key*>(p);
  p += align256(size_t(rows) * num_tiles(M) * tile_keep(M, k) * sizeof(Key));
  w.overflow_rows = reinterpret_cast<int*>(p);
  p += align256(size_t(rows) * sizeof(int));
  w.overflow_count = reinterpret_cast<int*>(p);
  p += 256;
  w.scratch = reinterpret_cast<float*>(p);
  return w;
}

template <typename T>
__global__ void __launch_bounds__(NT) tile_topk_kernel(const T* __restrict__ x, TokenView xv,
                                                       const T* __restrict__ W, const T* __restrict__ b_enc,
                                                       const T* __restrict__ b_dec, int64_t row0, int64_t rows,
                                                       int64_t d, int64_t M, int keep, int tiles,
                                                       Key* __restrict__ cand) {
  __shared__ float As[BK][BM + 4];
  __shared__ float Bs[BK][BN + 4];
  __shared__ float Cs[BM][BN + 1];
  __shared__ int64_t row_off[BM];
  const int tid = threadIdx.x;
  const int64_t r_base = int64_t(blockIdx.x) * BM;  // relative to the chunk
  const int tile = blockIdx.y;
  const int64_t m0 = int64_t(tile) * BN;
  if (tid < BM) {
    const int64_t r = r_base + tid;
    row_off[tid] = r < rows ? token_offset(xv, row0 + r) : -1;
  }
  __syncthreads();

  const int ty = tid / 16, tx = tid % 16;  // this thread owns rows ty*4.. and columns tx*4..
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  for (int64_t k0 = 0; k0 < d; k0 += BK) {
    for (int e = tid; e < BM * BK; e += NT) {
      const int r = e / BK, kk = e % BK;
      const int64_t c = k0 + kk;
      float v = 0.f;
      if (row_off[r] >= 0 && c < d) v = Conv<T>::load(x[row_off[r] + c * xv.sc]) - Conv<T>::load(b_dec[c]);
      As[kk][r] = v;
    }
    for (int e = tid; e < BN * BK; e += NT) {
      const int n = e / BK, kk = e % BK;
      const int64_t c = k0 + kk, m = m0 + n;
      Bs[kk][n] = (m < M && c < d) ? Conv<T>::load(W[m * d + c]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[kk][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }

#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int n = tx * 4 + j;
    const int64_t m = m0 + n;
    const float be = m < M ? Conv<T>::load(b_enc[m]) : 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) Cs[ty * 4 + i][n] = clean_preact(acc[i][j] + be);
  }
  __syncthreads();

  // Each warp extracts the top-`keep` keys of its rows by repeated warp-wide arg-max.
  const int warp = tid / 32, lane = tid % 32;
  const int valid = static_cast<int>(M - m0 < BN ? M - m0 : BN);
  for (int r = warp; r < BM; r += NT / 32) {
    const int64_t rr = r_base + r;
    if (rr >= rows) break;  // warp-uniform
    Key k0 = lane < valid ? make_key(Cs[r][lane], m0 + lane) : 0ull;
    Key k1 = lane + 32 < valid ? make_key(Cs[r][lane + 32], m0 + lane + 32) : 0ull;
    Key* dst = cand + (rr * tiles + tile) * keep;
    for (int t = 0; t < keep; ++t) {
      Key best = k0 > k1 ? k0 : k1;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const Key other = __shfl_xor_sync(0xffffffffu, best, o);
        best = other > best ? other : best;
      }
      if (lane == 0) dst[t] = best;
      if (best != 0ull) {
        if (k0 == best) k0 = 0ull;
        else if (k1 == best) k1 = 0ull;
      }
    }
  }
}

template <typename T>
__device__ void write_row(const TopkSmem& sm, int k, int64_t row, T* values, int64_t* indices) {
  for (int j = threadIdx.x; j < k; j += NT) {
    values[row * k + j] = Conv<T>::store(key_value(sm.keys[j]));
    indices[row * k + j] = key_index(sm.keys[j]);
  }
}

template <typename T>
__global__ void __launch_bounds__(NT) merge_kernel(const Key* __restrict__ cand, int tiles, int keep, int64_t M,
                                                   int k, int64_t row0, T* __restrict__ values,
                                                   int64_t* __restrict__ indices, int* overflow_count,
                                                   int* overflow_rows) {
  __shared__ TopkSmem sm;
  __shared__ int over;
  const int64_t r = blockIdx.x;
  const Key* c = cand + r * tiles * keep;
  const int found = block_topk<NT>([&](int64_t i) { return c[i]; }, int64_t(tiles) * keep, k, sm);
  if (threadIdx.x == 0) over = found < k;
  __syncthreads();
  if (found == k) {
    const float kth = key_value(sm.keys[k - 1]);
    for (int t = threadIdx.x; t < tiles; t += NT) {
      const int64_t valid = M - int64_t(t) * BN < BN ? M - int64_t(t) * BN : BN;
      if (valid > keep && key_value(c[int64_t(t) * keep + keep - 1]) > kth) over = 1;
    }
  }
  __syncthreads();
  if (over) {
    if (threadIdx.x == 0) overflow_rows[atomicAdd(overflow_count, 1)] = static_cast<int>(r);
    return;
  }
  write_row<T>(sm, k, row0 + r, values, indices);
}

template <typename T>
__global__ void __launch_bounds__(NT) recompute_kernel(const T* __restrict__ x, TokenView xv, const T* __restrict__ W,
                                                       const T* __restrict__ b_enc, const T* __restrict__ b_dec,
                                                       int64_t row0, int64_t d, int64_t M, int k,
                                                       const int* overflow_count, const int* overflow_rows,
                                                       float* scratch, T* __restrict__ values,
                                                       int64_t* __restrict__ indices) {
  __shared__ TopkSmem sm;
  const int count = *overflow_count;
  float* pre = scratch + int64_t(blockIdx.x) * M;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int i = blockIdx.x; i < count; i += gridDim.x) {
    const int64_t row = row0 + overflow_rows[i];
    const int64_t off = token_offset(xv, row);
    __syncthreads();  // the previous row's selection is done with `pre`
    for (int64_t m = warp; m < M; m += NT / 32) {
      float s = 0.f;
      for (int64_t c = lane; c < d; c += 32)
        s = fmaf(Conv<T>::load(x[off + c * xv.sc]) - Conv<T>::load(b_dec[c]), Conv<T>::load(W[m * d + c]), s);
      s = warp_sum(s);
      if (lane == 0) pre[m] = clean_preact(s + Conv<T>::load(b_enc[m]));
    }
    __syncthreads();
    block_topk<NT>([&](int64_t m) { return make_key(pre[m], m); }, M, k, sm);
    write_row<T>(sm, k, row, values, indices);
  }
}

template <typename T>
cudaError_t launch_topk(const T* x, TokenView xv, const T* W, const T* b_enc, const T* b_dec, int64_t N, int64_t d,
                        int64_t M, int k, T* values, int64_t* indices, void* workspace, size_t workspace_bytes,
                        cudaStream_t stream) {
  const int64_t chunk = topk_chunk_rows(N, M, k);
  if (workspace_bytes < topk_workspace_bytes(chunk, M, k)) return cudaErrorInvalidValue;
  const Workspace ws = carve(workspace, chunk, M, k);
  const int tiles = num_tiles(M), keep = tile_keep(M, k);
  for (int64_t row0 = 0; row0 < N; row0 += chunk) {
    const int64_t rows = N - row0 < chunk ? N - row0 : chunk;
    SAEURON_RETURN_IF_ERROR(cudaMemsetAsync(ws.overflow_count, 0, sizeof(int), stream));
    const dim3 grid(ceil_div(rows, BM), tiles);  // x fastest: blocks sharing a weight tile run together
    tile_topk_kernel<T><<<grid, NT, 0, stream>>>(x, xv, W, b_enc, b_dec, row0, rows, d, M, keep, tiles, ws.cand);
    merge_kernel<T><<<static_cast<unsigned int>(rows), NT, 0, stream>>>(ws.cand, tiles, keep, M, k, row0, values,
                                                                      indices, ws.overflow_count, ws.overflow_rows);
    const unsigned int rb = static_cast<unsigned int>(rows < kRecomputeBlocks ? rows : kRecomputeBlocks);
    recompute_kernel<T><<<rb, NT, 0, stream>>>(x, xv, W, b_enc, b_dec, row0, d, M, k, ws.overflow_count,
                                               ws.overflow_rows, ws.scratch, values, indices);
    SAEURON_RETURN_IF_ERROR(cudaGetLastError());
  }
  return cudaSuccess;
}

}  // namespace

int topk_max_k() { return kMaxK; }

int64_t topk_chunk_rows(int64_t N, int64_t M, int k) {
  const int64_t per_row = int64_t(num_tiles(M)) * tile_keep(M, k) * int64_t(sizeof(Key)) + int64_t(sizeof(int));
  int64_t rows = kCandidateBudget / per_row / BM * BM;
  if (rows < BM) rows = BM;
  if (N < rows) rows = N < 1 ? 1 : N;
  return rows;
}

size_t topk_workspace_bytes(int64_t chunk_rows, int64_t M, int k) {
  const int64_t rb = chunk_rows < kRecomputeBlocks ? chunk_rows : kRecomputeBlocks;
  return align256(size_t(chunk_rows) * num_tiles(M) * tile_keep(M, k) * sizeof(Key)) +
         align256(size_t(chunk_rows) * sizeof(int)) + 256 + size_t(rb) * size_t(M) * sizeof(float);
}

cudaError_t topk_encode(const void* x, TokenView xv, DType dt, const void* W_enc, const void* b_enc,
                        const void* b_dec, int64_t N, int64_t d, int64_t M, int k, void* values,
                        int64_t* indices, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (k < 1 || k > kMaxK || k > M || M >= int64_t(0xFFFFFFFFu) || num_tiles(M) > 65535 || d < 1)
    return cudaErrorInvalidValue;
  if (N == 0) return cudaSuccess;
#define SAEURON_TOPK(T)                                                                                       \
  return launch_topk<T>(static_cast<const T*>(x), xv, static_cast<const T*>(W_enc),                           \
                        static_cast<const T*>(b_enc), static_cast<const T*>(b_dec), N, d, M, k,               \
                        static_cast<T*>(values), indices, workspace, workspace_bytes, stream)
  switch (dt) {
    case DType::f32: SAEURON_TOPK(float);
    case DType::f16: SAEURON_TOPK(__half);
    case DType::bf16: SAEURON_TOPK(__nv_bfloat16);
    default: return cudaErrorInvalidValue;  // fp64: no kernel (saeuron.ops runs the reference)
  }
#undef SAEURON_TOPK
}

}  // namespace saeuron_cuda
