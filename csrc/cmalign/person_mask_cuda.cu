// CUDA entry point of reid_kernels::person_mask (LbA eqs. 5-7): the ATen glue --
// checks, allocation, dtype dispatch, the current stream, launch checks.  The kernels
// and their launches are in person_mask_kernels.cuh (ATen-free, so the CPU emulator of
// tests/cuda_emu/ runs the same code).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda_utils.cuh"
#include "person_mask_kernels.cuh"

namespace reid_kernels {
namespace cmalign_cuda {
namespace {

at::Tensor person_mask_cuda(const at::Tensor& feat) {
  check_cuda_feature_map(feat, "feat");
  const c10::cuda::CUDAGuard guard(feat.device());
  const int64_t N = feat.size(0), C = feat.size(1), L = feat.size(2);
  at::Tensor mask = at::empty({N, L}, feat.options());
  if (N == 0 || L == 0) return mask;
  at::Tensor g = at::empty({N, L}, feat.options().dtype(acc_dtype(feat.scalar_type())));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feat.scalar_type(), "person_mask_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    launch_person_mask(feat.data_ptr<scalar_t>(), N, C, L, g.data_ptr<acc_t>(), mask.data_ptr<scalar_t>(), stream,
                       [] { C10_CUDA_KERNEL_LAUNCH_CHECK(); });
  });
  return mask;
}

}  // namespace
}  // namespace cmalign_cuda

TORCH_LIBRARY_IMPL(reid_kernels, CUDA, m) { m.impl("person_mask", &cmalign_cuda::person_mask_cuda); }

}  // namespace reid_kernels
