// CUDA entry points of the masked dense triplet (see masked_dense_triplet.h for the
// formulas): argument checks, allocation, dtype dispatch and the stream.  The device code
// and its launch are in masked_dense_triplet_kernels.cuh.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "dense_triplet/masked_dense_triplet.h"
#include "dense_triplet/masked_dense_triplet_kernels.cuh"

namespace reid_kernels {
namespace dense_triplet {
namespace {

// The launch grid of `anchor` (N, C, L), checked to fit one launch.
TripletGrid checked_grid(const at::Tensor& anchor) {
  const TripletGrid grid(anchor.size(0), anchor.size(2));
  TORCH_CHECK(grid.blocks <= std::numeric_limits<int32_t>::max(), "anchor: too many (N, L) tiles for one launch: ",
              grid.blocks);
  return grid;
}

at::Tensor masked_dense_triplet_fwd_cuda(const at::Tensor& anchor, const at::Tensor& positive,
                                         const at::Tensor& negative, const at::Tensor& weight, double margin) {
  check_triplet_args(anchor, positive, negative, weight);
  const c10::cuda::CUDAGuard device_guard(anchor.device());
  auto out = at::empty({anchor.size(0), anchor.size(2)}, anchor.options());
  if (checked_grid(anchor).blocks == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, anchor.scalar_type(), "masked_dense_triplet_fwd_cuda",
                                  [&] {
                                    launch_masked_dense_triplet_fwd<scalar_t>(
                                        anchor.data_ptr<scalar_t>(), positive.data_ptr<scalar_t>(),
                                        negative.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                        out.data_ptr<scalar_t>(), anchor.size(0), anchor.size(1), anchor.size(2),
                                        margin, stream);
                                    C10_CUDA_KERNEL_LAUNCH_CHECK();
                                  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_dense_triplet_bwd_cuda(const at::Tensor& grad_loss,
                                                                             const at::Tensor& anchor,
                                                                             const at::Tensor& positive,
                                                                             const at::Tensor& negative,
                                                                             const at::Tensor& weight, double margin) {
  check_triplet_args(anchor, positive, negative, weight);
  check_position_map("grad_loss", grad_loss, anchor);
  const c10::cuda::CUDAGuard device_guard(anchor.device());
  auto grad_a = at::empty_like(anchor);
  auto grad_p = at::empty_like(anchor);
  auto grad_n = at::empty_like(anchor);
  if (checked_grid(anchor).blocks == 0) return {grad_a, grad_p, grad_n};
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, anchor.scalar_type(), "masked_dense_triplet_bwd_cuda", [&] {
        launch_masked_dense_triplet_bwd<scalar_t>(
            grad_loss.data_ptr<scalar_t>(), anchor.data_ptr<scalar_t>(), positive.data_ptr<scalar_t>(),
            negative.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), grad_a.data_ptr<scalar_t>(),
            grad_p.data_ptr<scalar_t>(), grad_n.data_ptr<scalar_t>(), anchor.size(0), anchor.size(1), anchor.size(2),
            margin, stream);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {grad_a, grad_p, grad_n};
}

}  // namespace
}  // namespace dense_triplet

TORCH_LIBRARY_IMPL(reid_kernels, CUDA, m) {
  m.impl("masked_dense_triplet_fwd", &dense_triplet::masked_dense_triplet_fwd_cuda);
  m.impl("masked_dense_triplet_bwd", &dense_triplet::masked_dense_triplet_bwd_cuda);
}

}  // namespace reid_kernels
