// Device code shared by the CMAlign CUDA kernels (person_mask_kernels.cuh,
// soft_warp_kernels.cuh), and the host code that launches its column kernels.
// ATen-free (see csrc/device/compat.cuh): compiled by nvcc from the .cu files and, under
// REID_CUDA_EMULATION, by g++ against the CPU emulator in tests/cuda_emu/.
//
// Feature maps are contiguous (N, C, L) arrays: for one sample, channel c of
// position l sits at c * L + l, so a warp reading 32 consecutive positions of
// one channel reads one contiguous 128-byte line.  The column kernels below
// give each (sample, position) column a reduction over channels.
//
// Arithmetic: half / bfloat16 / float inputs accumulate in float32, double in
// double (acc_t = device::acc_type_t<scalar_t>).  Every reduction runs in a fixed
// order (no atomics), so results are deterministic run to run.
#pragma once

#include <cstdint>
#include <limits>

#include "../device/compat.cuh"
#include "../mutation.h"

namespace reid_kernels {
namespace cmalign_cuda {

using device::acc_type_t;

// eps of x / max(||x||_2, eps), as torch.nn.functional.normalize.
constexpr double kNormalizeEps = 1e-12;

constexpr int kWarp = 32;

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// ---- 64-bit offsets ------------------------------------------------------------
// A sample of an (N, rows, cols) array starts at n * rows * cols, which passes 2^31
// long before one sample does (the host checks rows * cols < 2^31): the product is
// taken in int64 from the first factor on.  Tested at the index level by the emulated
// harness with sizes beyond 2^31 (tests/cuda_emu/soft_warp_harness.cpp).
__host__ __device__ constexpr int64_t sample_offset(int64_t n, int64_t rows, int64_t cols) {
  if (REID_MUTANT(221)) return static_cast<int32_t>(n * rows * cols);  // a 32-bit offset
  return n * rows * cols;
}
// First row (position) of block `block` when each block owns `rows` of them.
__host__ __device__ constexpr int64_t block_first_row(unsigned block, int64_t rows) {
  return int64_t(block) * rows;
}

// Overloads so templated code calls the right-precision math function.
__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }
__device__ __forceinline__ float acc_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double acc_sqrt(double x) { return sqrt(x); }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  // Butterfly reduction: fixed order, every lane ends with the same total.
  for (int offset = REID_MUTANT(222) ? kWarp / 4 : kWarp / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_min(T v) {
  // Mutant 223: a half-warp mask, so lanes 16..31 never take part.
  const unsigned mask = REID_MUTANT(223) ? 0x0000ffffu : 0xffffffffu;
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = min(v, __shfl_xor_sync(mask, v, offset));
  return v;
}

// 1 / max(||x||, eps) from the sum of squares, the one formula every kernel uses.
template <typename acc_t>
__device__ __forceinline__ acc_t inv_norm_from_sumsq(acc_t sumsq) {
  return acc_t(1) / max(acc_sqrt(sumsq), acc_t(kNormalizeEps));
}

// ---- Column reductions over channels --------------------------------------
// Block (32, 8): threadIdx.x picks a position of a 32-wide column tile,
// threadIdx.y a channel residue class c = y, y + 8, ...  The 8 partial sums of
// a column are added in a fixed order by the y == 0 thread.
constexpr int kColTile = 32;
constexpr int kColSplit = 8;

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t column_dot_in_block(const scalar_t* a, const scalar_t* b, int64_t C, int64_t L,
                                                      int64_t l, acc_t (*partial)[kColTile + 1]) {
  acc_t sum = 0;
  if (l < L) {
    for (int64_t c = threadIdx.y; c < C; c += kColSplit) {
      sum += static_cast<acc_t>(a[c * L + l]) * static_cast<acc_t>(b[c * L + l]);
    }
  }
  partial[threadIdx.y][threadIdx.x] = sum;
  if (!REID_MUTANT(224)) __syncthreads();
  acc_t total = 0;
  for (int y = 0; y < kColSplit; ++y) total += partial[y][threadIdx.x];
  return total;  // every thread of the column gets the same total
}

// out[n, l] = sum_c a[n, c, l] * b[n, c, l]   (grid: (ceil(L / 32), N), block (32, 8)).
template <typename scalar_t, typename acc_t>
__global__ void column_dot_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t C,
                                  int64_t L, acc_t* __restrict__ out) {
  REID_SHARED_ARRAY(acc_t, partial, [kColSplit][kColTile + 1]);
  const int64_t n = blockIdx.y;
  const int64_t l = block_first_row(blockIdx.x, kColTile) + threadIdx.x;
  const acc_t total =
      column_dot_in_block<scalar_t, acc_t>(a + sample_offset(n, C, L), b + sample_offset(n, C, L), C, L, l, partial);
  if (threadIdx.y == 0 && l < L) out[n * L + l] = total;
}

// out[n, l] = 1 / max(||x[n, :, l]||_2, eps)  (eq. 1's normaliser) -- or the norm itself.
template <typename scalar_t, typename acc_t, bool kInverse>
__global__ void column_norm_kernel(const scalar_t* __restrict__ x, int64_t C, int64_t L, acc_t* __restrict__ out) {
  REID_SHARED_ARRAY(acc_t, partial, [kColSplit][kColTile + 1]);
  const int64_t n = blockIdx.y;
  const int64_t l = block_first_row(blockIdx.x, kColTile) + threadIdx.x;
  const scalar_t* xn = x + sample_offset(n, C, L);
  const acc_t sumsq = column_dot_in_block<scalar_t, acc_t>(xn, xn, C, L, l, partial);
  if (threadIdx.y == 0 && l < L) out[n * L + l] = kInverse ? inv_norm_from_sumsq(sumsq) : acc_sqrt(sumsq);
}

inline dim3 column_grid(int64_t N, int64_t L) { return dim3(static_cast<unsigned>(ceil_div(L, kColTile)), static_cast<unsigned>(N)); }
inline dim3 column_block() { return dim3(kColTile, kColSplit); }

// ---- Host: launches -------------------------------------------------------------
// Each launch function enqueues one kernel on `stream`; the caller checks the launch
// (C10_CUDA_KERNEL_LAUNCH_CHECK in the .cu files, cudaGetLastError under emulation).

// out (N, L) in acc_t = 1 / max(||x[n, :, l]||, eps) (kInverse) or ||x[n, :, l]||, for x (N, C, L).
template <bool kInverse, typename scalar_t>
void launch_column_norms(const scalar_t* x, int64_t N, int64_t C, int64_t L, acc_type_t<scalar_t>* out,
                         cudaStream_t stream) {
  const auto kernel = &column_norm_kernel<scalar_t, acc_type_t<scalar_t>, kInverse>;
  REID_LAUNCH(kernel, column_grid(N, L), column_block(), 0, stream, x, C, L, out);
}

// out (N, L) in acc_t = sum_c a[n, c, l] b[n, c, l], for a, b (N, C, L).
template <typename scalar_t>
void launch_column_dots(const scalar_t* a, const scalar_t* b, int64_t N, int64_t C, int64_t L,
                        acc_type_t<scalar_t>* out, cudaStream_t stream) {
  const auto kernel = &column_dot_kernel<scalar_t, acc_type_t<scalar_t>>;
  REID_LAUNCH(kernel, column_grid(N, L), column_block(), 0, stream, a, b, C, L, out);
}

}  // namespace cmalign_cuda
}  // namespace reid_kernels
