// Device code of reid_kernels::soft_warp_fwd / soft_warp_bwd (LbA eqs. 1, 2, 4) and the
// ATen-free host code that launches it (csrc/device/compat.cuh): soft_warp_cuda.cu adds
// the ATen glue; tests/cuda_emu/soft_warp_harness.cpp runs the same launches on the CPU
// emulator of CUDA's execution model.
//
//   S[p, q]   = q_hat[:, p] . k_hat[:, q],  x_hat = x / max(||x||, 1e-12)      (eq. 1)
//   P[p, q]   = softmax_q(t S[p, q]),  lse[p] = logsumexp_q(t S[p, q])       (eq. 2)
//   out[:, p] = sum_q P[p, q] value[:, q]                                    (eq. 4)
//
// Memory stays O(N * L * C): the N x Lq x Lk probability volume never exists in
// global memory.  A block owns BM rows of P (query rows in the forward) and
// keeps that BM x Lk slab in shared memory, in the accumulation dtype:
//
//   1. logits: the slab is filled tile by tile (BN key columns at a time), the
//      dot products over C streamed through shared memory in chunks of BK
//      channels; the normalisation is folded in as t * (1/||q||) * (1/||k||);
//   2. softmax of each row in place (one warp per row), giving lse;
//   3. out[:, rows] = value P^T, streamed over value channels in chunks of BC.
//
// BM = 32 when the slab fits the device's opt-in shared memory, else 8, else 1
// (one query row per block), so an 18x9 map (Lk = 162, 41 KB) and a 72x36 map
// (Lk = 2592, 8 rows, 103 KB) both run; larger maps run row by row up to
// ~50k positions on an H100.  Beyond that the op raises a clear error.
// REID_KERNELS_SOFT_WARP_MAX_ROWS (1, 8 or 32) caps BM so tests reach every variant.
//
// Backward (recomputation, FlashAttention style; only lse-sized state is saved):
//   kernel A, per (n, query tile): recomputes the P rows exactly as the forward
//     did (so lse is bitwise the forward's for float32 accumulation, and exact
//     for float64), delta[p] = dO[:, p] . out[:, p] (precomputed),
//     dP = dO^T V, dS = t P (dP - delta), d q_hat = k_hat dS^T;
//   kernel B, per (n, key tile): recomputes P^T columns from lse,
//     dV = dO P, dP^T = V^T dO, dS^T, d k_hat = q_hat dS;
//   then the normalisation backward per column (normalize_backward_kernel).
// Every output element is written by exactly one thread after a fixed-order
// reduction: no atomics, results are deterministic.
//
// Arithmetic: fp32 accumulation for float16 / bfloat16 / float32 inputs, fp64
// for float64 (so gradcheck runs on CUDA too).  Scalar FMA register tiles
// (2x4 / 4x4 outputs per thread) by default.  Tensor cores (opt-in until verified
// on a GPU: REID_KERNELS_SOFT_WARP_TENSOR_CORES=1): the logits and dP GEMMs of
// half / bfloat16 inputs with 32-row tiles run as nvcuda::wmma 16x16x16 fragments
// with fp32 accumulators.  The products of 16-bit operands are exact in fp32, so
// this changes only the summation order.  The value / gradient projections keep
// the fp32 FMA path because their operand P is an fp32 probability (rounding it
// to 16 bits would cost accuracy).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cmalign_device.cuh"

namespace reid_kernels {
namespace cmalign_cuda {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;

// Tiling of a block that owns BM rows of the probability matrix.
//
// (a) gemm_rows_by_columns: out[r][col] = sum_k A[k][a0 + r] B[k][col] for all
//     columns of B, BN at a time.  Threads form a TR x TC grid; a thread owns
//     rows tr + TR i (i < RM) and columns tc + TC j (j < RN) of the tile.
// (b) gemm_channels_by_rows: out[c][r] = sum_j G[c][j] buf[r][j], BC channels
//     at a time.  Threads form a TRO x TCO grid; a thread owns channels
//     tro + TRO i (i < RCO) and rows tco + TCO j (j < RPO).
// Strided ownership keeps the shared-memory reads of a warp on distinct banks
// (or broadcasts) and its global stores contiguous.
template <int BM>
struct Tile {
  static_assert(BM == 1 || BM == 8 || BM == 32, "rows per block: 1, 8 or 32");
  // (a)
  static constexpr int TR = BM < 16 ? BM : 16;
  static constexpr int TC = kThreads / TR;
  static constexpr int RM = BM / TR;
  static constexpr int RN = 4;
  static constexpr int BN = TC * RN;
  static constexpr int BK = BM >= 8 ? 16 : 4;
  // (b)
  static constexpr int TCO = BM < 8 ? BM : 8;
  static constexpr int TRO = kThreads / TCO;
  static constexpr int RPO = BM / TCO;
  static constexpr int RCO = 4;
  static constexpr int BC = TRO * RCO;
  static constexpr int BKQ = BM >= 8 ? 32 : 8;
  static constexpr int GS_LD = BC + 1;  // odd stride: the transposed store is bank-conflict free
  static_assert(BN % BKQ == 0, "the slab padding must cover whole (b) chunks");
  // Staging area shared by (a) (A and B chunks) and (b) (G chunk).
  static constexpr int kStaging = BK * (BM + BN) > BKQ * GS_LD ? BK * (BM + BN) : BKQ * GS_LD;

  // The slab has cols_padded(cols) columns (zero beyond `cols`) and an odd row stride.
  __host__ __device__ static constexpr int64_t cols_padded(int64_t cols) { return round_up(cols, BN); }
  __host__ __device__ static constexpr int64_t ld(int64_t cols) { return cols_padded(cols) + 1; }
  static constexpr size_t smem_bytes(int64_t cols, size_t elem) {
    return static_cast<size_t>(BM * ld(cols) + kStaging) * elem;
  }
};

// eq. 1 times the inverse temperature.  One expression for forward and both
// backward kernels, so every recomputation yields the same float.
template <typename acc_t>
__device__ __forceinline__ acc_t scaled_logit(acc_t dot, acc_t inv_norm_query, acc_t inv_norm_key, acc_t t) {
  return dot * (t * (inv_norm_query * inv_norm_key));
}

// (a): for every column tile of B, acc = A[:, a0 : a0 + BM]^T B[:, tile] over the
// K contraction rows, then epilogue(r, col, acc) for r < BM, col < cols_padded(LB).
// A is (K, LA) and B is (K, LB), row-major; reads out of range are zero.
template <int BM, typename scalar_t, typename acc_t, typename Epilogue>
__device__ __forceinline__ void gemm_rows_by_columns_fma(const scalar_t* __restrict__ A, int64_t LA, int64_t a0,
                                                         const scalar_t* __restrict__ B, int64_t LB, int64_t K,
                                                         acc_t* staging, Epilogue&& epilogue) {
  using T = Tile<BM>;
  acc_t* As = staging;               // [BK][BM]
  acc_t* Bs = staging + T::BK * BM;  // [BK][BN]
  const int tid = threadIdx.x;
  const int tc = tid % T::TC;
  const int tr = tid / T::TC;
  const int64_t cols = T::cols_padded(LB);
  for (int64_t b0 = 0; b0 < cols; b0 += T::BN) {
    acc_t acc[T::RM][T::RN];
#pragma unroll
    for (int i = 0; i < T::RM; ++i)
#pragma unroll
      for (int j = 0; j < T::RN; ++j) acc[i][j] = acc_t(0);

    for (int64_t k0 = 0; k0 < K; k0 += T::BK) {
      __syncthreads();  // the previous chunk has been consumed
      for (int e = tid; e < T::BK * BM; e += kThreads) {
        const int k = e / BM, r = e % BM;
        const bool inside = k0 + k < K && a0 + r < LA;
        As[e] = inside ? static_cast<acc_t>(A[(k0 + k) * LA + a0 + r]) : acc_t(0);
      }
      for (int e = tid; e < T::BK * T::BN; e += kThreads) {
        const int k = e / T::BN, c = e % T::BN;
        const bool inside = k0 + k < K && b0 + c < LB;
        Bs[e] = inside ? static_cast<acc_t>(B[(k0 + k) * LB + b0 + c]) : acc_t(0);
      }
      if (!REID_MUTANT(228)) __syncthreads();  // 228: chunk read before it is complete
#pragma unroll
      for (int k = 0; k < T::BK; ++k) {
        acc_t a[T::RM], b[T::RN];
#pragma unroll
        for (int i = 0; i < T::RM; ++i) a[i] = As[k * BM + tr + T::TR * i];
#pragma unroll
        for (int j = 0; j < T::RN; ++j) b[j] = Bs[k * T::BN + tc + T::TC * j];
#pragma unroll
        for (int i = 0; i < T::RM; ++i)
#pragma unroll
          for (int j = 0; j < T::RN; ++j) acc[i][j] += a[i] * b[j];
      }
    }
#pragma unroll
    for (int i = 0; i < T::RM; ++i)
#pragma unroll
      for (int j = 0; j < T::RN; ++j) epilogue(tr + T::TR * i, b0 + tc + T::TC * j, acc[i][j]);
  }
  __syncthreads();  // the slab written by the epilogues is complete
}

// Whether scalar_t has a tensor-core fragment type (device::wmma_element: half / bfloat16).
template <typename scalar_t, typename = void>
struct has_wmma_element : std::false_type {};
template <typename scalar_t>
struct has_wmma_element<scalar_t, std::void_t<typename device::wmma_element<scalar_t>::type>> : std::true_type {};

// wmma on bfloat16 needs sm_80, on half sm_70: older targets compile only the FMA path.
// (nvcc's host pass, REID_DEVICE_ARCH 0, compiles no device code: true there.)
template <typename scalar_t>
__host__ __device__ constexpr bool wmma_on_this_arch() {
  if constexpr (REID_DEVICE_ARCH == 0) {
    return true;
  } else {
    return std::is_same_v<scalar_t, device::bfloat16_t> ? REID_DEVICE_ARCH >= 800 : REID_DEVICE_ARCH >= 700;
  }
}

template <int BM, typename scalar_t>
constexpr bool kHasTensorCorePath = BM == 32 && has_wmma_element<scalar_t>::value;

// (a) on tensor cores, BM = 32 and half / bfloat16 only: the same contract as
// gemm_rows_by_columns_fma.  The 32 x 64 output tile is 2 x 4 wmma 16x16x16
// fragments, one per warp, fp32 accumulators; operands are staged as raw 16-bit
// values (the products of two 16-bit floats are exact in fp32, so this is as
// accurate as the FMA path; only the summation order differs).  The accumulators
// go through an fp32 tile in shared memory, from which every thread runs the
// epilogue on its elements.
template <int BM, typename scalar_t, typename acc_t, typename Epilogue>
__device__ __forceinline__ void gemm_rows_by_columns_wmma(const scalar_t* __restrict__ A, int64_t LA, int64_t a0,
                                                          const scalar_t* __restrict__ B, int64_t LB, int64_t K,
                                                          acc_t* staging, Epilogue&& epilogue) {
  static_assert(kHasTensorCorePath<BM, scalar_t>, "tensor-core path: BM == 32, half / bfloat16");
  using element_t = typename device::wmma_element<scalar_t>::type;
  namespace wmma = nvcuda::wmma;
  constexpr int F = 16;         // fragment edge
  constexpr int TBN = 64;       // columns per tile: 4 fragments
  constexpr int TBK = F;        // contraction chunk: one fragment deep
  static_assert((BM / F) * (TBN / F) == kWarps, "one fragment per warp");
  static_assert(Tile<BM>::BN % TBN == 0, "tiles must cover cols_padded");
  // Staging (byte offsets are multiples of 32, as wmma requires): A chunk
  // column-major [TBK][BM], B chunk row-major [TBK][TBN], fp32 result [BM][TBN].
  uint16_t* As = reinterpret_cast<uint16_t*>(staging);
  uint16_t* Bs = As + TBK * BM;
  float* Cs = reinterpret_cast<float*>(Bs + TBK * TBN);
  static_assert((TBK * BM + TBK * TBN) * 2 + BM * TBN * 4 <= Tile<BM>::kStaging * sizeof(float),
                "wmma staging fits the staging area");
  const uint16_t* A16 = reinterpret_cast<const uint16_t*>(A);  // raw bits: half_t / bfloat16_t are 16-bit PODs
  const uint16_t* B16 = reinterpret_cast<const uint16_t*>(B);
  const int tid = threadIdx.x;
  const int warp = tid / kWarp;
  const int frag_r = warp / (TBN / F);  // fragment row 0..1
  const int frag_c = warp % (TBN / F);  // fragment column 0..3
  const int64_t cols = Tile<BM>::cols_padded(LB);
  for (int64_t b0 = 0; b0 < cols; b0 += TBN) {
    wmma::fragment<wmma::accumulator, F, F, F, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int64_t k0 = 0; k0 < K; k0 += TBK) {
      __syncthreads();  // the previous chunk has been consumed
      for (int e = tid; e < TBK * BM; e += kThreads) {
        const int k = e / BM, r = e % BM;
        const bool inside = k0 + k < K && a0 + r < LA;
        As[e] = inside ? A16[(k0 + k) * LA + a0 + r] : uint16_t(0);  // 0 bits = +0.0 in both formats
      }
      for (int e = tid; e < TBK * TBN; e += kThreads) {
        const int k = e / TBN, c = e % TBN;
        const bool inside = k0 + k < K && b0 + c < LB;
        Bs[e] = inside ? B16[(k0 + k) * LB + b0 + c] : uint16_t(0);
      }
      __syncthreads();
      wmma::fragment<wmma::matrix_a, F, F, F, element_t, wmma::col_major> a;  // a(r, k) = As[k * BM + r]
      wmma::fragment<wmma::matrix_b, F, F, F, element_t, wmma::row_major> b;  // b(k, c) = Bs[k * TBN + c]
      wmma::load_matrix_sync(a, reinterpret_cast<const element_t*>(As + frag_r * F), BM);
      wmma::load_matrix_sync(b, reinterpret_cast<const element_t*>(Bs + frag_c * F), TBN);
      wmma::mma_sync(acc, a, b, acc);
    }
    __syncthreads();  // every thread is done with the previous tile's Cs (also when K == 0)
    wmma::store_matrix_sync(Cs + frag_r * F * TBN + frag_c * F, acc, TBN, wmma::mem_row_major);
    if (!REID_MUTANT(234)) __syncthreads();  // 234: the epilogue reads other warps' fragments too early
    for (int e = tid; e < BM * TBN; e += kThreads) {
      epilogue(e / TBN, b0 + e % TBN, static_cast<acc_t>(Cs[e]));
    }
  }
  __syncthreads();  // the slab written by the epilogues is complete
}

// (a), on tensor cores when asked and available (BM = 32, half / bfloat16), else FMA tiles.
template <int BM, typename scalar_t, typename acc_t, typename Epilogue>
__device__ __forceinline__ void gemm_rows_by_columns(bool tensor_cores, const scalar_t* __restrict__ A, int64_t LA,
                                                     int64_t a0, const scalar_t* __restrict__ B, int64_t LB,
                                                     int64_t K, acc_t* staging, Epilogue&& epilogue) {
  if constexpr (kHasTensorCorePath<BM, scalar_t> && wmma_on_this_arch<scalar_t>()) {
    if (tensor_cores) {
      gemm_rows_by_columns_wmma<BM>(A, LA, a0, B, LB, K, staging, epilogue);
      return;
    }
  }
  gemm_rows_by_columns_fma<BM>(A, LA, a0, B, LB, K, staging, epilogue);
}

// Mutant 231: (b) accumulates in the 16-bit input type instead of float32.
template <typename scalar_t>
constexpr bool kMutantAccumulateIn16Bits = REID_MUTANT(231) && sizeof(scalar_t) == 2;
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t round_to(acc_t v) {
  return static_cast<acc_t>(static_cast<scalar_t>(v));
}

// (b): out[c][r] = sum_j G[c][j] buf[r][j] for c < Cout (BC at a time), r < BM,
// j < LG; then store(c, r, out) -- store must ignore c >= Cout and invalid r.
// G is (Cout, LG) row-major; buf is the BM x ld slab, zero in columns [LG, cols_padded).
template <int BM, typename scalar_t, typename acc_t, typename Store>
__device__ __forceinline__ void gemm_channels_by_rows(const scalar_t* __restrict__ G, int64_t Cout, int64_t LG,
                                                      const acc_t* buf, int64_t lds, acc_t* staging,
                                                      Store&& store) {
  using T = Tile<BM>;
  acc_t* Gs = staging;  // [BKQ][GS_LD], G chunk transposed
  const int tid = threadIdx.x;
  const int tco = tid % T::TCO;
  const int tro = tid / T::TCO;
  // <= cols_padded(LG): the slab padding is zero.  (Mutant 230: the remainder chunk is dropped.)
  const int64_t j_end = REID_MUTANT(230) ? LG / T::BKQ * T::BKQ : round_up(LG, T::BKQ);
  for (int64_t c0 = 0; c0 < Cout; c0 += T::BC) {
    acc_t acc[T::RCO][T::RPO];
#pragma unroll
    for (int i = 0; i < T::RCO; ++i)
#pragma unroll
      for (int j = 0; j < T::RPO; ++j) acc[i][j] = acc_t(0);

    for (int64_t j0 = 0; j0 < j_end; j0 += T::BKQ) {
      if (!REID_MUTANT(229)) __syncthreads();  // the previous chunk has been consumed
      for (int e = tid; e < T::BC * T::BKQ; e += kThreads) {
        const int c = e / T::BKQ, j = e % T::BKQ;  // consecutive threads read consecutive j: coalesced
        const bool inside = c0 + c < Cout && j0 + j < LG;
        Gs[j * T::GS_LD + c] = inside ? static_cast<acc_t>(G[(c0 + c) * LG + j0 + j]) : acc_t(0);
      }
      __syncthreads();
#pragma unroll 8
      for (int j = 0; j < T::BKQ; ++j) {
        acc_t g[T::RCO], p[T::RPO];
#pragma unroll
        for (int i = 0; i < T::RCO; ++i) g[i] = Gs[j * T::GS_LD + tro + T::TRO * i];
#pragma unroll
        for (int jj = 0; jj < T::RPO; ++jj) p[jj] = buf[(tco + T::TCO * jj) * lds + j0 + j];
#pragma unroll
        for (int i = 0; i < T::RCO; ++i)
#pragma unroll
          for (int jj = 0; jj < T::RPO; ++jj) {
            acc[i][jj] += g[i] * p[jj];
            if constexpr (kMutantAccumulateIn16Bits<scalar_t>) acc[i][jj] = round_to<scalar_t>(acc[i][jj]);
          }
      }
    }
#pragma unroll
    for (int i = 0; i < T::RCO; ++i)
#pragma unroll
      for (int jj = 0; jj < T::RPO; ++jj) store(c0 + tro + T::TRO * i, tco + T::TCO * jj, acc[i][jj]);
  }
  __syncthreads();
}

// eq. 2 in place: row r of the slab (logits in columns < L) becomes
// exp(logit - lse), zero in the padding; lse_out[row0 + r] = lse for valid rows.
template <int BM, typename acc_t, typename lse_t>
__device__ __forceinline__ void softmax_rows_in_place(acc_t* buf, int64_t lds, int64_t L, int64_t row0,
                                                      int64_t rows_valid, lse_t* lse_out) {
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t cols = Tile<BM>::cols_padded(L);
  // Mutant 233: with one row per block, all 8 warps split the row, each reducing its part.
  constexpr bool kMutantSplitRow = REID_MUTANT(233) && BM == 1;
  const int first_row = kMutantSplitRow ? 0 : warp;
  const int first_col = kMutantSplitRow ? static_cast<int>(threadIdx.x) : lane;
  const int col_step = kMutantSplitRow ? kThreads : kWarp;
  for (int r = first_row; r < BM; r += kWarps) {
    acc_t* row = buf + r * lds;
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    for (int64_t q = first_col; q < L; q += col_step) m = max(m, row[q]);
    m = warp_max(m);
    acc_t s = 0;
    for (int64_t q = first_col; q < L; q += col_step) s += acc_exp(row[q] - m);
    s = warp_sum(s);
    const acc_t lse = m + acc_log(s);
    for (int64_t q = first_col; q < cols; q += col_step) row[q] = q < L ? acc_exp(row[q] - lse) : acc_t(0);
    // Mutant 236: the saved lse misses the max shift m (the forward's P stays right).
    const acc_t saved = REID_MUTANT(236) ? acc_log(s) : lse;
    if (lane == 0 && row0 + r < rows_valid) lse_out[row0 + r] = static_cast<lse_t>(saved);
  }
  __syncthreads();
}

// Dynamic shared memory: the BM x ld slab followed by the staging area.
template <typename acc_t>
__device__ __forceinline__ acc_t* dynamic_smem() {
  REID_EXTERN_SHARED(unsigned char, smem_raw, 128);  // wmma needs 32-byte alignment
  return reinterpret_cast<acc_t*>(smem_raw);
}

// ---- Forward: eqs. 1, 2, 4. Grid (ceil(Lq / BM), N). ------------------------
template <typename scalar_t, int BM>
__global__ void __launch_bounds__(kThreads)
    soft_warp_fwd_kernel(const scalar_t* __restrict__ query, const scalar_t* __restrict__ key,
                         const scalar_t* __restrict__ value, const acc_type_t<scalar_t>* __restrict__ inv_norm_q,
                         const acc_type_t<scalar_t>* __restrict__ inv_norm_k, acc_type_t<scalar_t> t,
                         bool tensor_cores, int64_t C, int64_t Cv, int64_t Lq, int64_t Lk, scalar_t* __restrict__ out,
                         float* __restrict__ lse) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t lds = Tile<BM>::ld(Lk);
  acc_t* buf = dynamic_smem<acc_t>();  // P rows p0 .. p0 + BM - 1
  acc_t* staging = buf + BM * lds;
  const int64_t n = blockIdx.y;
  const int64_t p0 = block_first_row(blockIdx.x, BM);
  const scalar_t* qn = query + sample_offset(n, C, Lq);
  const scalar_t* kn = key + sample_offset(n, C, Lk);
  const scalar_t* vn = value + sample_offset(n, Cv, Lk);
  const acc_t* rq = inv_norm_q + n * Lq;
  const acc_t* rk = inv_norm_k + n * Lk;

  // eq. 1 (times t): buf[r][q] = t cos(query[:, p0 + r], key[:, q]).
  gemm_rows_by_columns<BM>(tensor_cores, qn, Lq, p0, kn, Lk, C, staging, [=](int r, int64_t q, acc_t dot) {
    const int64_t p = p0 + r;
    buf[r * lds + q] = scaled_logit(dot, p < Lq ? rq[p] : acc_t(0), q < Lk ? rk[q] : acc_t(0), t);
  });
  // eq. 2: buf[r][q] = P[p0 + r][q]; lse saved for the backward.
  softmax_rows_in_place<BM>(buf, lds, Lk, p0, Lq, lse + n * Lq);
  // eq. 4: out[:, p] = value P[p, :]^T.
  scalar_t* on = out + sample_offset(n, Cv, Lq);
  gemm_channels_by_rows<BM>(vn, Cv, Lk, buf, lds, staging, [=](int64_t c, int r, acc_t v) {
    if (c < Cv && p0 + r < Lq) on[c * Lq + p0 + r] = static_cast<scalar_t>(v);
  });
}

// ---- Backward kernel A: d q_hat. Grid (ceil(Lq / BM), N). --------------------
// dS[p, q] = t P[p, q] (dP[p, q] - delta[p]) is the gradient w.r.t. the cosine S;
// d q_hat[:, p] = sum_q dS[p, q] k_hat[:, q] = key (dS[p, :] * inv_norm_k)^T.
template <typename scalar_t, int BM>
__global__ void __launch_bounds__(kThreads)
    soft_warp_bwd_query_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ query,
                               const scalar_t* __restrict__ key, const scalar_t* __restrict__ value,
                               const acc_type_t<scalar_t>* __restrict__ inv_norm_q,
                               const acc_type_t<scalar_t>* __restrict__ inv_norm_k,
                               const acc_type_t<scalar_t>* __restrict__ delta, acc_type_t<scalar_t> t,
                               bool tensor_cores, int64_t C, int64_t Cv, int64_t Lq, int64_t Lk,
                               acc_type_t<scalar_t>* __restrict__ lse_recomputed,
                               acc_type_t<scalar_t>* __restrict__ grad_query_hat) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t lds = Tile<BM>::ld(Lk);
  acc_t* buf = dynamic_smem<acc_t>();
  acc_t* staging = buf + BM * lds;
  const int64_t n = blockIdx.y;
  const int64_t p0 = block_first_row(blockIdx.x, BM);
  const scalar_t* don = grad_out + sample_offset(n, Cv, Lq);
  const scalar_t* qn = query + sample_offset(n, C, Lq);
  const scalar_t* kn = key + sample_offset(n, C, Lk);
  const scalar_t* vn = value + sample_offset(n, Cv, Lk);
  const acc_t* rq = inv_norm_q + n * Lq;
  const acc_t* rk = inv_norm_k + n * Lk;
  const acc_t* dn = delta + n * Lq;

  // eqs. 1-2 recomputed with the forward's exact code path: buf = P rows.
  gemm_rows_by_columns<BM>(tensor_cores, qn, Lq, p0, kn, Lk, C, staging, [=](int r, int64_t q, acc_t dot) {
    const int64_t p = p0 + r;
    buf[r * lds + q] = scaled_logit(dot, p < Lq ? rq[p] : acc_t(0), q < Lk ? rk[q] : acc_t(0), t);
  });
  softmax_rows_in_place<BM>(buf, lds, Lk, p0, Lq, lse_recomputed + n * Lq);
  // dP[p, q] = grad_out[:, p] . value[:, q]; buf <- dS[p, q] * inv_norm_k[q].
  gemm_rows_by_columns<BM>(tensor_cores, don, Lq, p0, vn, Lk, Cv, staging, [=](int r, int64_t q, acc_t dp) {
    const int64_t p = p0 + r;
    acc_t& cell = buf[r * lds + q];
    cell = (p < Lq && q < Lk) ? t * cell * (dp - (REID_MUTANT(232) ? acc_t(0) : dn[p])) * rk[q] : acc_t(0);
  });
  // d q_hat[:, p] = key (dS * inv_norm_k)[p, :]^T.
  acc_t* gn = grad_query_hat + sample_offset(n, C, Lq);
  gemm_channels_by_rows<BM>(kn, C, Lk, buf, lds, staging, [=](int64_t c, int r, acc_t v) {
    if (c < C && p0 + r < Lq) gn[c * Lq + p0 + r] = v;
  });
}

// ---- Backward kernel B: dV and d k_hat. Grid (ceil(Lk / BM), N). -------------
// The slab holds P^T: rows are key positions q0 + r, columns query positions p.
template <typename scalar_t, int BM>
__global__ void __launch_bounds__(kThreads)
    soft_warp_bwd_key_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ query,
                             const scalar_t* __restrict__ key, const scalar_t* __restrict__ value,
                             const acc_type_t<scalar_t>* __restrict__ inv_norm_q,
                             const acc_type_t<scalar_t>* __restrict__ inv_norm_k,
                             const acc_type_t<scalar_t>* __restrict__ delta,
                             const acc_type_t<scalar_t>* __restrict__ lse, acc_type_t<scalar_t> t,
                             bool tensor_cores, int64_t C, int64_t Cv, int64_t Lq, int64_t Lk, scalar_t* __restrict__ grad_value,
                             acc_type_t<scalar_t>* __restrict__ grad_key_hat) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t lds = Tile<BM>::ld(Lq);
  acc_t* buf = dynamic_smem<acc_t>();
  acc_t* staging = buf + BM * lds;
  const int64_t n = blockIdx.y;
  const int64_t q0 = block_first_row(blockIdx.x, BM);
  const scalar_t* don = grad_out + sample_offset(n, Cv, Lq);
  const scalar_t* qn = query + sample_offset(n, C, Lq);
  const scalar_t* kn = key + sample_offset(n, C, Lk);
  const scalar_t* vn = value + sample_offset(n, Cv, Lk);
  const acc_t* rq = inv_norm_q + n * Lq;
  const acc_t* rk = inv_norm_k + n * Lk;
  const acc_t* dn = delta + n * Lq;
  const acc_t* ln = lse + n * Lq;

  // P^T[q, p] = exp(t S[p, q] - lse[p])  (eqs. 1-2; same logit expression as the forward).
  gemm_rows_by_columns<BM>(tensor_cores, kn, Lk, q0, qn, Lq, C, staging, [=](int r, int64_t p, acc_t dot) {
    const int64_t q = q0 + r;
    buf[r * lds + p] = (q < Lk && p < Lq) ? acc_exp(scaled_logit(dot, rq[p], rk[q], t) - ln[p]) : acc_t(0);
  });
  // dV[:, q] = sum_p grad_out[:, p] P[p, q]   (backward of eq. 4).
  scalar_t* gvn = grad_value + sample_offset(n, Cv, Lk);
  gemm_channels_by_rows<BM>(don, Cv, Lq, buf, lds, staging, [=](int64_t c, int r, acc_t v) {
    if (c < Cv && q0 + r < Lk) gvn[c * Lk + q0 + r] = static_cast<scalar_t>(v);
  });
  // dP^T[q, p] = value[:, q] . grad_out[:, p]; buf <- dS^T[q, p] * inv_norm_q[p].
  gemm_rows_by_columns<BM>(tensor_cores, vn, Lk, q0, don, Lq, Cv, staging, [=](int r, int64_t p, acc_t dp) {
    const int64_t q = q0 + r;
    acc_t& cell = buf[r * lds + p];
    cell = (q < Lk && p < Lq) ? t * cell * (dp - dn[p]) * rq[p] : acc_t(0);
  });
  // d k_hat[:, q] = sum_p dS[p, q] q_hat[:, p] = query (dS^T * inv_norm_q)[q, :]^T.
  acc_t* gkn = grad_key_hat + sample_offset(n, C, Lk);
  gemm_channels_by_rows<BM>(qn, C, Lq, buf, lds, staging, [=](int64_t c, int r, acc_t v) {
    if (c < C && q0 + r < Lk) gkn[c * Lk + q0 + r] = v;
  });
}

// ---- Normalisation backward, per column. Grid (ceil(L / 32), N), block (32, 8). --
// x_hat = x / max(||x||, eps):
//   ||x|| >= eps: dx = (dx_hat - x_hat (x_hat . dx_hat)) / ||x||
//   ||x|| <  eps: dx = dx_hat / eps   (the normaliser is the constant eps)
// The sum of squares is accumulated in the same order as column_dot_in_block,
// so the branch agrees with the forward's inverse norm.
template <typename scalar_t>
__global__ void normalize_backward_kernel(const scalar_t* __restrict__ x,
                                          const acc_type_t<scalar_t>* __restrict__ grad_x_hat, int64_t C,
                                          int64_t L, scalar_t* __restrict__ grad_x) {
  using acc_t = acc_type_t<scalar_t>;
  REID_SHARED_ARRAY(acc_t, partial_sumsq, [kColSplit][kColTile + 1]);
  REID_SHARED_ARRAY(acc_t, partial_dot, [kColSplit][kColTile + 1]);
  const int64_t n = blockIdx.y;
  const int64_t l = block_first_row(blockIdx.x, kColTile) + threadIdx.x;
  const scalar_t* xn = x + sample_offset(n, C, L);
  const acc_t* gn = grad_x_hat + sample_offset(n, C, L);
  scalar_t* dn = grad_x + sample_offset(n, C, L);

  acc_t sumsq = 0, dot = 0;
  if (l < L) {
    for (int64_t c = threadIdx.y; c < C; c += kColSplit) {
      const acc_t xv = static_cast<acc_t>(xn[c * L + l]);
      sumsq += xv * xv;
      dot += xv * gn[c * L + l];
    }
  }
  partial_sumsq[threadIdx.y][threadIdx.x] = sumsq;
  partial_dot[threadIdx.y][threadIdx.x] = dot;
  __syncthreads();
  sumsq = 0;
  dot = 0;
  for (int y = 0; y < kColSplit; ++y) {
    sumsq += partial_sumsq[y][threadIdx.x];
    dot += partial_dot[y][threadIdx.x];
  }
  if (l >= L) return;
  const acc_t r = inv_norm_from_sumsq(sumsq);
  // r^2 (x . dx_hat) = (x_hat . dx_hat) / ||x||; zero in the clamped branch.
  const acc_t projection = acc_sqrt(sumsq) >= acc_t(kNormalizeEps) ? r * r * dot : acc_t(0);
  for (int64_t c = threadIdx.y; c < C; c += kColSplit) {
    const acc_t xv = static_cast<acc_t>(xn[c * L + l]);
    dn[c * L + l] = static_cast<scalar_t>(r * (gn[c * L + l] - (REID_MUTANT(235) ? acc_t(0) : xv * projection)));
  }
}


// ---- Host: launch configuration ------------------------------------------------

// Rows per block (32, 8 or 1, at most max_rows) whose slab over `cols` columns
// fits in `max_smem` bytes; 0 when not even one row fits.
inline int rows_per_block(int64_t cols, size_t elem, size_t max_smem, int max_rows) {
  if (max_rows >= 32 && Tile<32>::smem_bytes(cols, elem) <= max_smem) return 32;
  if (max_rows >= 8 && Tile<8>::smem_bytes(cols, elem) <= max_smem) return 8;
  if (Tile<1>::smem_bytes(cols, elem) <= max_smem) return 1;
  return 0;
}

// Dynamic shared memory of a block with bm rows over `cols` columns.
inline size_t slab_smem_bytes(int bm, int64_t cols, size_t elem) {
  switch (bm) {
    case 32: return Tile<32>::smem_bytes(cols, elem);
    case 8: return Tile<8>::smem_bytes(cols, elem);
    default: return Tile<1>::smem_bytes(cols, elem);
  }
}

// REID_KERNELS_SOFT_WARP_MAX_ROWS=8 or =1 caps the rows per block, so tests can
// exercise the 8-row and 1-row variants on small maps (default: no cap).
constexpr const char* kMaxRowsEnv = "REID_KERNELS_SOFT_WARP_MAX_ROWS";
// The cap an env value asks for: 32 when unset or empty, else 1, 8 or 32 (as atoi
// reads the value); 0 for anything else (the caller reports it).
inline int max_rows_from_env_value(const char* value) {
  if (value == nullptr || *value == '\0') return 32;
  const int rows = std::atoi(value);
  return rows == 1 || rows == 8 || rows == 32 ? rows : 0;
}

// REID_KERNELS_SOFT_WARP_TENSOR_CORES=1 runs the logits / dP GEMMs of half and
// bfloat16 inputs on tensor cores (wmma).  Off by default until verified on a GPU.
constexpr const char* kTensorCoresEnv = "REID_KERNELS_SOFT_WARP_TENSOR_CORES";
inline bool tensor_cores_from_env_value(const char* value) {
  return value != nullptr && std::strcmp(value, "1") == 0;
}

// What a launch depends on beyond the problem: the device's opt-in shared memory per
// block (cudaDeviceProp::sharedMemPerBlockOptin), the env cap on the rows per block
// and the tensor-core switch.
struct LaunchOptions {
  size_t max_smem_optin = 0;
  int max_rows = 32;
  bool tensor_cores = false;
};

// The rows per block each soft_warp kernel runs with (for error messages and tests);
// 0 where not even one row fits: the op must refuse the call before launching.
struct RowsPerBlock {
  int forward = 0;    // soft_warp_fwd_kernel, slab over Lk
  int query_bwd = 0;  // backward kernel A, slab over Lk
  int key_bwd = 0;    // backward kernel B, slab over Lq
};
template <typename scalar_t>
RowsPerBlock soft_warp_rows_per_block(const LaunchOptions& options, int64_t Lq, int64_t Lk) {
  const size_t elem = sizeof(acc_type_t<scalar_t>);
  const int over_keys = rows_per_block(Lk, elem, options.max_smem_optin, options.max_rows);
  return {over_keys, over_keys, rows_per_block(Lq, elem, options.max_smem_optin, options.max_rows)};
}

// Calls f(std::integral_constant<int, BM>{}) for the runtime rows-per-block value.
template <typename F>
void with_rows_per_block(int bm, F&& f) {
  switch (bm) {
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
}

// Raises `kernel`'s dynamic shared-memory limit to `bytes` (needed above 48 KiB),
// then launches it on a (ceil(rows / BM), N) grid of kThreads threads.
// check(error) is handed cudaFuncSetAttribute's result; check() runs after the launch.
template <int BM, typename LaunchCheck, typename Kernel, typename... Args>
void launch_slab_kernel(Kernel kernel, int64_t N, int64_t rows, size_t smem, cudaStream_t stream,
                        LaunchCheck&& check, Args... args) {
  if (!REID_MUTANT(227)) {  // 227: the opt-in is skipped
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(rows, BM)), static_cast<unsigned>(N));
  REID_LAUNCH(kernel, grid, kThreads, smem, stream, args...);
  check();
}

// ---- Host: launches -----------------------------------------------------------------
// Contiguous maps query (N, C, Lq), key (N, C, Lk), value (N, Cv, Lk); N, Lq, Lk > 0 and
// every slab fits (soft_warp_rows_per_block's values nonzero: the caller checks first).
// Workspaces are the caller's, in acc_t.  check() runs after each launch, check(error)
// on each cudaFuncSetAttribute result (C10_CUDA_KERNEL_LAUNCH_CHECK / C10_CUDA_CHECK in
// soft_warp_cuda.cu, cudaGetLastError in the emulated harness).
template <typename scalar_t>
struct SoftWarpMaps {
  const scalar_t* query;
  const scalar_t* key;
  const scalar_t* value;
  int64_t N, C, Cv, Lq, Lk;
};

// Forward: out (N, Cv, Lq), lse (N, Lq) float32; workspaces inv_norm_q (N, Lq), inv_norm_k (N, Lk).
template <typename scalar_t, typename LaunchCheck>
void launch_soft_warp_fwd(const LaunchOptions& options, const SoftWarpMaps<scalar_t>& m, double temperature,
                          acc_type_t<scalar_t>* inv_norm_q, acc_type_t<scalar_t>* inv_norm_k, scalar_t* out,
                          float* lse, cudaStream_t stream, LaunchCheck&& check) {
  using acc_t = acc_type_t<scalar_t>;
  launch_column_norms</*kInverse=*/true>(m.query, m.N, m.C, m.Lq, inv_norm_q, stream);
  check();
  launch_column_norms</*kInverse=*/true>(m.key, m.N, m.C, m.Lk, inv_norm_k, stream);
  check();
  const int bm = soft_warp_rows_per_block<scalar_t>(options, m.Lq, m.Lk).forward;
  with_rows_per_block(bm, [&](auto bm_constant) {
    constexpr int BM = decltype(bm_constant)::value;
    const size_t smem = Tile<BM>::smem_bytes(m.Lk, sizeof(acc_t));
    const auto kernel = &soft_warp_fwd_kernel<scalar_t, BM>;
    launch_slab_kernel<BM>(kernel, m.N, m.Lq, smem, stream, check, m.query, m.key, m.value,
                           static_cast<const acc_t*>(inv_norm_q), static_cast<const acc_t*>(inv_norm_k),
                           static_cast<acc_t>(temperature), options.tensor_cores, m.C, m.Cv, m.Lq, m.Lk, out, lse);
  });
}

// The backward's workspaces, all in acc_t: inv_norm_q (N, Lq), inv_norm_k (N, Lk),
// delta (N, Lq), lse (N, Lq: the forward's lse, recomputed in acc_t), grad_query_hat
// (N, C, Lq), grad_key_hat (N, C, Lk).
template <typename acc_t>
struct SoftWarpBwdWorkspace {
  acc_t* inv_norm_q;
  acc_t* inv_norm_k;
  acc_t* delta;
  acc_t* lse;
  acc_t* grad_query_hat;
  acc_t* grad_key_hat;
};

// Backward: grad_out and out (N, Cv, Lq) contiguous; writes grad_query, grad_key, grad_value.
template <typename scalar_t, typename LaunchCheck>
void launch_soft_warp_bwd(const LaunchOptions& options, const SoftWarpMaps<scalar_t>& m, double temperature,
                          const scalar_t* grad_out, const scalar_t* out,
                          const SoftWarpBwdWorkspace<acc_type_t<scalar_t>>& w, scalar_t* grad_query,
                          scalar_t* grad_key, scalar_t* grad_value, cudaStream_t stream, LaunchCheck&& check) {
  using acc_t = acc_type_t<scalar_t>;
  launch_column_norms</*kInverse=*/true>(m.query, m.N, m.C, m.Lq, w.inv_norm_q, stream);
  check();
  launch_column_norms</*kInverse=*/true>(m.key, m.N, m.C, m.Lk, w.inv_norm_k, stream);
  check();
  launch_column_dots(grad_out, out, m.N, m.Cv, m.Lq, w.delta, stream);  // delta[p] = dO[:, p] . out[:, p]
  check();
  const acc_t t = static_cast<acc_t>(temperature);
  const RowsPerBlock bm = soft_warp_rows_per_block<scalar_t>(options, m.Lq, m.Lk);
  const acc_t* inv_norm_q = w.inv_norm_q;
  const acc_t* inv_norm_k = w.inv_norm_k;
  const acc_t* delta = w.delta;
  // Kernel A: query tiles, slab over the Lk key positions.
  with_rows_per_block(bm.query_bwd, [&](auto bm_constant) {
    constexpr int BM = decltype(bm_constant)::value;
    const size_t smem = Tile<BM>::smem_bytes(m.Lk, sizeof(acc_t));
    const auto kernel = &soft_warp_bwd_query_kernel<scalar_t, BM>;
    launch_slab_kernel<BM>(kernel, m.N, m.Lq, smem, stream, check, grad_out, m.query, m.key, m.value, inv_norm_q,
                           inv_norm_k, delta, t, options.tensor_cores, m.C, m.Cv, m.Lq, m.Lk, w.lse,
                           w.grad_query_hat);
  });
  // Kernel B: key tiles, slab over the Lq query positions (runs after A on the stream).
  with_rows_per_block(bm.key_bwd, [&](auto bm_constant) {
    constexpr int BM = decltype(bm_constant)::value;
    const size_t smem = Tile<BM>::smem_bytes(m.Lq, sizeof(acc_t));
    const auto kernel = &soft_warp_bwd_key_kernel<scalar_t, BM>;
    launch_slab_kernel<BM>(kernel, m.N, m.Lk, smem, stream, check, grad_out, m.query, m.key, m.value, inv_norm_q,
                           inv_norm_k, delta, static_cast<const acc_t*>(w.lse), t, options.tensor_cores, m.C,
                           m.Cv, m.Lq, m.Lk, grad_value, w.grad_key_hat);
  });
  // Normalisation backward of q_hat and k_hat (eq. 1's x / max(||x||, eps)).
  const auto normalize = &normalize_backward_kernel<scalar_t>;
  REID_LAUNCH(normalize, column_grid(m.N, m.Lq), column_block(), 0, stream, m.query,
              static_cast<const acc_t*>(w.grad_query_hat), m.C, m.Lq, grad_query);
  check();
  REID_LAUNCH(normalize, column_grid(m.N, m.Lk), column_block(), 0, stream, m.key,
              static_cast<const acc_t*>(w.grad_key_hat), m.C, m.Lk, grad_key);
  check();
}

}  // namespace cmalign_cuda
}  // namespace reid_kernels
