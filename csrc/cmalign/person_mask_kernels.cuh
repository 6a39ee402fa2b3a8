// Device code of reid_kernels::person_mask (LbA eqs. 5-7) and its launches; ATen-free
// (csrc/device/compat.cuh), so the CPU emulator of tests/cuda_emu/ runs it too.
//
//   g[n, l] = ||feat[n, :, l]||_2                              (eq. 5)
//   mask[n, l] = (g - min_l g) / ((max_l g - min_l g) + 1e-12)   (eqs. 6-7)
//
// Two launches: column_norm_kernel (cmalign_device.cuh) writes g in the
// accumulation dtype, then one block per sample reduces min / max over the L
// positions and writes the normalised mask in feat's dtype.  The min-max runs in
// the accumulation dtype (float64 for float64 maps, float32 otherwise), as the
// CPU kernel and reference.person_mask; a NaN norm makes the sample's mask NaN
// (torch's min / max propagate NaN).  No gradient: the mask is detached in LbA.
#pragma once

#include <cstdint>
#include <limits>

#include "cmalign_device.cuh"

namespace reid_kernels {
namespace cmalign_cuda {

constexpr int kMinMaxThreads = 256;
// The LbA code's min-max guard (reference.py MINMAX_EPS).
constexpr double kMinMaxEps = 1e-12;

// Eqs. 6-7 for one sample per block: min / max of g over the L positions, then
// (g - min) / ((max - min) + eps) in acc_t like the reference.
template <typename scalar_t, typename acc_t>
__global__ void minmax_normalize_kernel(const acc_t* __restrict__ g, int64_t L, scalar_t* __restrict__ mask) {
  REID_SHARED_ARRAY(acc_t, warp_lo, [kMinMaxThreads / kWarp]);
  REID_SHARED_ARRAY(acc_t, warp_hi, [kMinMaxThreads / kWarp]);
  const acc_t* gn = g + block_first_row(blockIdx.x, L);
  scalar_t* mn = mask + block_first_row(blockIdx.x, L);

  acc_t lo = std::numeric_limits<acc_t>::infinity();
  acc_t hi = -std::numeric_limits<acc_t>::infinity();
  int any_nan = 0;
  for (int64_t l = threadIdx.x; l < L; l += blockDim.x) {
    const acc_t v = gn[l];
    any_nan |= isnan(v);
    lo = min(lo, v);
    hi = max(hi, v);
  }
  // Mutant 225: NaN seen by this thread only, not by the block.
  if (!REID_MUTANT(225)) any_nan = __syncthreads_or(any_nan);
  lo = warp_min(lo);
  hi = warp_max(hi);
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (lane == 0) {
    warp_lo[warp] = lo;
    warp_hi[warp] = hi;
  }
  __syncthreads();
  lo = warp_lo[0];
  hi = warp_hi[0];
  for (int w = REID_MUTANT(226) ? 2 : 1; w < kMinMaxThreads / kWarp; ++w) {  // 226: warp 1's partials dropped
    lo = min(lo, warp_lo[w]);
    hi = max(hi, warp_hi[w]);
  }
  if (any_nan) lo = std::numeric_limits<acc_t>::quiet_NaN();  // as torch's min
  const acc_t denom = (hi - lo) + static_cast<acc_t>(kMinMaxEps);  // a constant map normalises to 0
  for (int64_t l = threadIdx.x; l < L; l += blockDim.x) {
    mn[l] = static_cast<scalar_t>((gn[l] - lo) / denom);
  }
}

// ---- Host: launches -------------------------------------------------------------

// Eqs. 5-7 for feat (N, C, L), N, L > 0: g (N, L) in acc_t is the caller's workspace,
// mask (N, L) in feat's dtype the result.  check() runs after each launch (the .cu's
// C10_CUDA_KERNEL_LAUNCH_CHECK, the emulated harness's cudaGetLastError).
template <typename scalar_t, typename LaunchCheck>
void launch_person_mask(const scalar_t* feat, int64_t N, int64_t C, int64_t L, acc_type_t<scalar_t>* g,
                        scalar_t* mask, cudaStream_t stream, LaunchCheck&& check) {
  using acc_t = acc_type_t<scalar_t>;
  // eq. 5: g = ||feat[:, l]||_2
  launch_column_norms</*kInverse=*/false>(feat, N, C, L, g, stream);
  check();
  // eqs. 6-7: per-sample min-max normalisation
  const auto kernel = &minmax_normalize_kernel<scalar_t, acc_t>;
  REID_LAUNCH(kernel, static_cast<unsigned>(N), kMinMaxThreads, 0, stream, static_cast<const acc_t*>(g), L, mask);
  check();
}

}  // namespace cmalign_cuda
}  // namespace reid_kernels
