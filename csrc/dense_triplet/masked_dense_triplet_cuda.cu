// CUDA kernels of the masked dense triplet (see masked_dense_triplet.h for the formulas).
//
// A block covers kTileL = 32 positions of one anchor with kSplitC = 8 rows of threads
// that split the channels (c = threadIdx.y, threadIdx.y + 8, ...): a warp reads 32
// consecutive positions of one channel (coalesced), the eight partial sums are then
// added in a fixed order in shared memory (deterministic, no atomics).  Math in
// at::opmath_type (fp32 for fp16/bf16/fp32, fp64 for fp64).  The backward recomputes
// the distances (one read of the three maps), then writes the three gradients in a
// second read; no difference tensor is materialised.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "dense_triplet/masked_dense_triplet.h"

namespace reid_kernels {
namespace dense_triplet {
namespace {

constexpr int kTileL = 32;
constexpr int kSplitC = 8;

struct Tile {
  int64_t n;  // anchor
  int64_t l;  // this thread's position (may be >= positions on the last tile)
};

__device__ inline Tile tile_of_block(int64_t tiles_per_anchor) {
  const int64_t n = blockIdx.x / tiles_per_anchor;
  const int64_t l = (blockIdx.x % tiles_per_anchor) * kTileL + threadIdx.x;
  return {n, l};
}

// Squared distances of this thread's position, reduced over the block's channel split.
// Valid in the threadIdx.y == 0 row on return.
template <typename scalar_t, typename acc_t>
__device__ void squared_distances(const scalar_t* __restrict__ a, const scalar_t* __restrict__ p,
                                  const scalar_t* __restrict__ ng, Tile t, int64_t channels, int64_t positions,
                                  acc_t (&pos_part)[kSplitC][kTileL], acc_t (&neg_part)[kSplitC][kTileL],
                                  acc_t& pos_sq, acc_t& neg_sq) {
  acc_t pos = 0, neg = 0;
  if (t.l < positions) {
    for (int64_t c = threadIdx.y; c < channels; c += kSplitC) {
      const int64_t i = (t.n * channels + c) * positions + t.l;
      const acc_t av = static_cast<acc_t>(a[i]);
      const acc_t dp = av - static_cast<acc_t>(p[i]);
      const acc_t dn = av - static_cast<acc_t>(ng[i]);
      pos += dp * dp;
      neg += dn * dn;
    }
  }
  pos_part[threadIdx.y][threadIdx.x] = pos;
  neg_part[threadIdx.y][threadIdx.x] = neg;
  __syncthreads();
  pos_sq = 0;
  neg_sq = 0;
  if (threadIdx.y == 0) {
    for (int y = 0; y < kSplitC; ++y) {  // fixed order: deterministic
      pos_sq += pos_part[y][threadIdx.x];
      neg_sq += neg_part[y][threadIdx.x];
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ p,
                               const scalar_t* __restrict__ ng, const scalar_t* __restrict__ w,
                               scalar_t* __restrict__ out, int64_t channels, int64_t positions,
                               int64_t tiles_per_anchor, acc_t margin) {
  __shared__ acc_t pos_part[kSplitC][kTileL];
  __shared__ acc_t neg_part[kSplitC][kTileL];
  const Tile t = tile_of_block(tiles_per_anchor);
  acc_t pos_sq, neg_sq;
  squared_distances(a, p, ng, t, channels, positions, pos_part, neg_part, pos_sq, neg_sq);
  if (threadIdx.y == 0 && t.l < positions) {
    const acc_t hinge = sqrt(pos_sq) - sqrt(neg_sq) + margin;
    const int64_t i = t.n * positions + t.l;
    out[i] = static_cast<scalar_t>(static_cast<acc_t>(w[i]) * (hinge > acc_t(0) ? hinge : acc_t(0)));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ a,
                                const scalar_t* __restrict__ p, const scalar_t* __restrict__ ng,
                                const scalar_t* __restrict__ w, scalar_t* __restrict__ grad_a,
                                scalar_t* __restrict__ grad_p, scalar_t* __restrict__ grad_n, int64_t channels,
                                int64_t positions, int64_t tiles_per_anchor, acc_t margin) {
  __shared__ acc_t pos_part[kSplitC][kTileL];
  __shared__ acc_t neg_part[kSplitC][kTileL];
  __shared__ acc_t pos_coef[kTileL];  // upstream / d+ (0 where d+ == 0)
  __shared__ acc_t neg_coef[kTileL];  // upstream / d- (0 where d- == 0)
  const Tile t = tile_of_block(tiles_per_anchor);
  acc_t pos_sq, neg_sq;
  squared_distances(a, p, ng, t, channels, positions, pos_part, neg_part, pos_sq, neg_sq);
  if (threadIdx.y == 0) {
    acc_t cp = 0, cn = 0;
    if (t.l < positions) {
      const acc_t d_pos = sqrt(pos_sq);
      const acc_t d_neg = sqrt(neg_sq);
      const int64_t i = t.n * positions + t.l;
      // clamp's convention: the gradient passes where the hinge is exactly 0.
      const bool active = d_pos - d_neg + margin >= acc_t(0);
      const acc_t upstream = active ? static_cast<acc_t>(grad[i]) * static_cast<acc_t>(w[i]) : acc_t(0);
      // 0 where a distance is exactly 0; NaN where it is NaN (the reference's norm backward).
      cp = d_pos > acc_t(0) || isnan(d_pos) ? upstream / d_pos : acc_t(0);
      cn = d_neg > acc_t(0) || isnan(d_neg) ? upstream / d_neg : acc_t(0);
    }
    pos_coef[threadIdx.x] = cp;
    neg_coef[threadIdx.x] = cn;
  }
  __syncthreads();
  if (t.l >= positions) return;
  const acc_t cp = pos_coef[threadIdx.x];
  const acc_t cn = neg_coef[threadIdx.x];
  for (int64_t c = threadIdx.y; c < channels; c += kSplitC) {
    const int64_t i = (t.n * channels + c) * positions + t.l;
    const acc_t av = static_cast<acc_t>(a[i]);
    const acc_t gp = cp * (av - static_cast<acc_t>(p[i]));
    const acc_t gn = cn * (av - static_cast<acc_t>(ng[i]));
    grad_a[i] = static_cast<scalar_t>(gp - gn);
    grad_p[i] = static_cast<scalar_t>(-gp);
    grad_n[i] = static_cast<scalar_t>(gn);
  }
}

struct Launch {
  int64_t tiles_per_anchor;
  int64_t blocks;
  dim3 threads{kTileL, kSplitC};
  explicit Launch(const at::Tensor& anchor)
      : tiles_per_anchor((anchor.size(2) + kTileL - 1) / kTileL), blocks(anchor.size(0) * tiles_per_anchor) {
    TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "anchor: too many (N, L) tiles for one launch: ",
                blocks);
  }
};

at::Tensor masked_dense_triplet_fwd_cuda(const at::Tensor& anchor, const at::Tensor& positive,
                                         const at::Tensor& negative, const at::Tensor& weight, double margin) {
  check_triplet_args(anchor, positive, negative, weight);
  const c10::cuda::CUDAGuard device_guard(anchor.device());
  auto out = at::empty({anchor.size(0), anchor.size(2)}, anchor.options());
  const Launch launch(anchor);
  if (launch.blocks == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, anchor.scalar_type(), "masked_dense_triplet_fwd_cuda",
                                  [&] {
                                    using acc_t = at::opmath_type<scalar_t>;
                                    forward_kernel<scalar_t, acc_t>
                                        <<<static_cast<unsigned int>(launch.blocks), launch.threads, 0, stream>>>(
                                            anchor.data_ptr<scalar_t>(), positive.data_ptr<scalar_t>(),
                                            negative.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                            out.data_ptr<scalar_t>(), anchor.size(1), anchor.size(2),
                                            launch.tiles_per_anchor, static_cast<acc_t>(margin));
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
  const Launch launch(anchor);
  if (launch.blocks == 0) return {grad_a, grad_p, grad_n};
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, anchor.scalar_type(), "masked_dense_triplet_bwd_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        backward_kernel<scalar_t, acc_t><<<static_cast<unsigned int>(launch.blocks), launch.threads, 0, stream>>>(
            grad_loss.data_ptr<scalar_t>(), anchor.data_ptr<scalar_t>(), positive.data_ptr<scalar_t>(),
            negative.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), grad_a.data_ptr<scalar_t>(),
            grad_p.data_ptr<scalar_t>(), grad_n.data_ptr<scalar_t>(), anchor.size(1), anchor.size(2),
            launch.tiles_per_anchor, static_cast<acc_t>(margin));
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
