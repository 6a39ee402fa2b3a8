// CUDA kernel of reid_kernels::person_mask (LbA eqs. 5-7).
//
//   g[n, l] = ||feat[n, :, l]||_2                              (eq. 5)
//   mask[n, l] = (g - min_l g) / ((max_l g - min_l g) + 1e-12)   (eqs. 6-7)
//
// Two launches: column_norm_kernel (cuda_utils.cuh) writes g in the
// accumulation dtype, then one block per sample reduces min / max over the L
// positions and writes the normalised mask in feat's dtype.  The min-max runs in
// the accumulation dtype (float64 for float64 maps, float32 otherwise), as the
// CPU kernel and reference.person_mask; a NaN norm makes the sample's mask NaN
// (torch's min / max propagate NaN).  No gradient: the mask is detached in LbA.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda_utils.cuh"

namespace reid_kernels {
namespace cmalign_cuda {
namespace {

constexpr int kMinMaxThreads = 256;
// The LbA code's min-max guard (reference.py MINMAX_EPS).
constexpr double kMinMaxEps = 1e-12;

// Eqs. 6-7 for one sample per block: min / max of g over the L positions, then
// (g - min) / ((max - min) + eps) in acc_t like the reference.
template <typename scalar_t, typename acc_t>
__global__ void minmax_normalize_kernel(const acc_t* __restrict__ g, int64_t L, scalar_t* __restrict__ mask) {
  __shared__ acc_t warp_lo[kMinMaxThreads / kWarp];
  __shared__ acc_t warp_hi[kMinMaxThreads / kWarp];
  const acc_t* gn = g + int64_t(blockIdx.x) * L;
  scalar_t* mn = mask + int64_t(blockIdx.x) * L;

  acc_t lo = std::numeric_limits<acc_t>::infinity();
  acc_t hi = -std::numeric_limits<acc_t>::infinity();
  int any_nan = 0;
  for (int64_t l = threadIdx.x; l < L; l += blockDim.x) {
    const acc_t v = gn[l];
    any_nan |= isnan(v);
    lo = min(lo, v);
    hi = max(hi, v);
  }
  any_nan = __syncthreads_or(any_nan);
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
  for (int w = 1; w < kMinMaxThreads / kWarp; ++w) {
    lo = min(lo, warp_lo[w]);
    hi = max(hi, warp_hi[w]);
  }
  if (any_nan) lo = std::numeric_limits<acc_t>::quiet_NaN();  // as torch's min
  const acc_t denom = (hi - lo) + static_cast<acc_t>(kMinMaxEps);  // a constant map normalises to 0
  for (int64_t l = threadIdx.x; l < L; l += blockDim.x) {
    mn[l] = static_cast<scalar_t>((gn[l] - lo) / denom);
  }
}

at::Tensor person_mask_cuda(const at::Tensor& feat) {
  check_cuda_feature_map(feat, "feat");
  const c10::cuda::CUDAGuard guard(feat.device());
  const int64_t N = feat.size(0), C = feat.size(1), L = feat.size(2);
  at::Tensor mask = at::empty({N, L}, feat.options());
  if (N == 0 || L == 0) return mask;
  at::Tensor g = at::empty({N, L}, feat.options().dtype(acc_dtype(feat.scalar_type())));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feat.scalar_type(), "person_mask_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // eq. 5: g = ||feat[:, l]||_2
    column_norm_kernel<scalar_t, acc_t, /*kInverse=*/false><<<column_grid(N, L), column_block(), 0, stream>>>(
        feat.data_ptr<scalar_t>(), C, L, g.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // eqs. 6-7: per-sample min-max normalisation
    minmax_normalize_kernel<scalar_t, acc_t><<<static_cast<unsigned>(N), kMinMaxThreads, 0, stream>>>(
        g.data_ptr<acc_t>(), L, mask.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return mask;
}

}  // namespace
}  // namespace cmalign_cuda

TORCH_LIBRARY_IMPL(reid_kernels, CUDA, m) { m.impl("person_mask", &cmalign_cuda::person_mask_cuda); }

}  // namespace reid_kernels
