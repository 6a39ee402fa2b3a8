// Shared helpers of the CMAlign CUDA kernels (person_mask_cuda.cu, soft_warp_cuda.cu).
//
// Feature maps are contiguous (N, C, L) tensors: for one sample, channel c of
// position l sits at c * L + l, so a warp reading 32 consecutive positions of
// one channel reads one contiguous 128-byte line.  The column kernels below
// give each (sample, position) column a reduction over channels.
//
// Arithmetic: half / bfloat16 / float inputs accumulate in float32, double in
// double (acc_t = at::opmath_type<scalar_t>).  Every reduction runs in a fixed
// order (no atomics), so results are deterministic run to run.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <limits>

namespace reid_kernels {
namespace cmalign_cuda {

// eps of x / max(||x||_2, eps), as torch.nn.functional.normalize.
constexpr double kNormalizeEps = 1e-12;

constexpr int kWarp = 32;

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

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
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_min(T v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = min(v, __shfl_xor_sync(0xffffffffu, v, offset));
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
  __syncthreads();
  acc_t total = 0;
  for (int y = 0; y < kColSplit; ++y) total += partial[y][threadIdx.x];
  return total;  // every thread of the column gets the same total
}

// out[n, l] = sum_c a[n, c, l] * b[n, c, l]   (grid: (ceil(L / 32), N), block (32, 8)).
template <typename scalar_t, typename acc_t>
__global__ void column_dot_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t C,
                                  int64_t L, acc_t* __restrict__ out) {
  __shared__ acc_t partial[kColSplit][kColTile + 1];
  const int64_t n = blockIdx.y;
  const int64_t l = int64_t(blockIdx.x) * kColTile + threadIdx.x;
  const acc_t total = column_dot_in_block<scalar_t, acc_t>(a + n * C * L, b + n * C * L, C, L, l, partial);
  if (threadIdx.y == 0 && l < L) out[n * L + l] = total;
}

// out[n, l] = 1 / max(||x[n, :, l]||_2, eps)  (eq. 1's normaliser) -- or the norm itself.
template <typename scalar_t, typename acc_t, bool kInverse>
__global__ void column_norm_kernel(const scalar_t* __restrict__ x, int64_t C, int64_t L, acc_t* __restrict__ out) {
  __shared__ acc_t partial[kColSplit][kColTile + 1];
  const int64_t n = blockIdx.y;
  const int64_t l = int64_t(blockIdx.x) * kColTile + threadIdx.x;
  const acc_t sumsq = column_dot_in_block<scalar_t, acc_t>(x + n * C * L, x + n * C * L, C, L, l, partial);
  if (threadIdx.y == 0 && l < L) out[n * L + l] = kInverse ? inv_norm_from_sumsq(sumsq) : acc_sqrt(sumsq);
}

inline dim3 column_grid(int64_t N, int64_t L) { return dim3(static_cast<unsigned>(ceil_div(L, kColTile)), static_cast<unsigned>(N)); }
inline dim3 column_block() { return dim3(kColTile, kColSplit); }

// Accumulation dtype of a kernel on `dtype` inputs, as a tensor dtype.
inline at::ScalarType acc_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// Checks shared by the CUDA entry points; messages name the argument.
inline void check_cuda_feature_map(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 3, name, ": expected a 3-D (N, C, L) tensor, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor (N, C, L), got strides ", t.strides());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, name,
              ": expected dtype float32, float16, bfloat16 or float64, got ", dt);
  TORCH_CHECK(t.size(0) <= 65535, name, ": expected at most 65535 samples (CUDA grid limit), got ", t.size(0));
  TORCH_CHECK(t.size(1) * t.size(2) <= std::numeric_limits<int32_t>::max(), name,
              ": expected C * L < 2^31 per sample, got shape ", t.sizes());
}

}  // namespace cmalign_cuda
}  // namespace reid_kernels
