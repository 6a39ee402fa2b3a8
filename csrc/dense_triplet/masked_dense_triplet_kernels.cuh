// Device code of the masked dense triplet on CUDA (see masked_dense_triplet.h for the
// formulas, LbA eqs. 10-11), and its ATen-free launch.  masked_dense_triplet_cuda.cu adds
// the ATen glue; the CUDA emulator (tests/cuda_emu/) compiles this header without ATen.
//
// A block covers kTileL = 32 positions of one anchor with kSplitC = 8 rows of threads
// that split the channels (c = threadIdx.y, threadIdx.y + 8, ...): a warp reads 32
// consecutive positions of one channel (coalesced), the eight partial sums are then
// added in a fixed order in shared memory (deterministic, no atomics).  Math in
// acc_type_t (fp32 for fp16/bf16/fp32, fp64 for fp64).  The backward recomputes the
// distances (one read of the three maps), then writes the three gradients in a second
// read; no difference tensor is materialised.
#pragma once

#include <cstdint>

#include "device/compat.cuh"
#include "mutation.h"

namespace reid_kernels {
namespace dense_triplet {

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
  // (the last tile of an anchor has padding; the mutant's off-by-one is written out inline,
  // like the test below in forward_kernel: an inline helper changed nvcc's register allocation)
  if (REID_MUTANT(215) ? t.l <= positions : t.l < positions) {
    for (int64_t c = threadIdx.y; c < channels; c += kSplitC) {
      const int64_t i = (t.n * channels + c) * positions + t.l;
      const acc_t av = static_cast<acc_t>(a[i]);
      const acc_t dp = av - static_cast<acc_t>(p[i]);
      const acc_t dn = av - static_cast<acc_t>(ng[i]);
      pos += dp * dp;
      neg += dn * dn;
      if (REID_MUTANT(216)) {  // accumulate in the element type (float16) instead of float32
        pos = static_cast<acc_t>(static_cast<scalar_t>(pos));
        neg = static_cast<acc_t>(static_cast<scalar_t>(neg));
      }
    }
  }
  pos_part[threadIdx.y][threadIdx.x] = pos;
  neg_part[threadIdx.y][threadIdx.x] = neg;
  if (!REID_MUTANT(211)) __syncthreads();
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
  REID_SHARED_ARRAY(acc_t, pos_part, [kSplitC][kTileL]);
  REID_SHARED_ARRAY(acc_t, neg_part, [kSplitC][kTileL]);
  const Tile t = tile_of_block(tiles_per_anchor);
  acc_t pos_sq, neg_sq;
  squared_distances(a, p, ng, t, channels, positions, pos_part, neg_part, pos_sq, neg_sq);
  if (threadIdx.y == 0 && (REID_MUTANT(215) ? t.l <= positions : t.l < positions)) {
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
  REID_SHARED_ARRAY(acc_t, pos_part, [kSplitC][kTileL]);
  REID_SHARED_ARRAY(acc_t, neg_part, [kSplitC][kTileL]);
  REID_SHARED_ARRAY(acc_t, pos_coef, [kTileL]);  // upstream / d+ (0 where d+ == 0)
  REID_SHARED_ARRAY(acc_t, neg_coef, [kTileL]);  // upstream / d- (0 where d- == 0)
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
      if (REID_MUTANT(214)) {
        cp = upstream / d_pos;
        cn = upstream / d_neg;
      } else {
        cp = d_pos > acc_t(0) || isnan(d_pos) ? upstream / d_pos : acc_t(0);
        cn = d_neg > acc_t(0) || isnan(d_neg) ? upstream / d_neg : acc_t(0);
      }
    }
    pos_coef[threadIdx.x] = cp;
    neg_coef[threadIdx.x] = cn;
  }
  if (!REID_MUTANT(213)) __syncthreads();
  if (t.l >= positions) return;
  const acc_t cp = pos_coef[threadIdx.x];
  const acc_t cn = neg_coef[threadIdx.x];
  for (int64_t c = threadIdx.y; c < channels; c += kSplitC) {
    const int64_t i = (t.n * channels + c) * positions + t.l;
    const acc_t av = static_cast<acc_t>(a[i]);
    const acc_t gp = cp * (av - static_cast<acc_t>(p[i]));
    const acc_t gn = cn * (av - static_cast<acc_t>(ng[i]));
    grad_a[i] = static_cast<scalar_t>(REID_MUTANT(212) ? gp : gp - gn);
    grad_p[i] = static_cast<scalar_t>(-gp);
    grad_n[i] = static_cast<scalar_t>(gn);
  }
}

// Grid of both kernels: one block per (anchor, 32-position tile); the host checks that
// `blocks` fits a launch (< 2^31) before launching.
struct TripletGrid {
  int64_t tiles_per_anchor;
  int64_t blocks;
  TripletGrid(int64_t anchors, int64_t positions)
      : tiles_per_anchor((positions + kTileL - 1) / kTileL), blocks(anchors * tiles_per_anchor) {}
  static dim3 threads() { return dim3(kTileL, kSplitC); }
};

// loss (N, L) of maps (N, C, L); every pointer a contiguous tensor of that shape.
template <typename scalar_t>
void launch_masked_dense_triplet_fwd(const scalar_t* anchor, const scalar_t* positive, const scalar_t* negative,
                                     const scalar_t* weight, scalar_t* out, int64_t anchors, int64_t channels,
                                     int64_t positions, double margin, cudaStream_t stream) {
  using acc_t = device::acc_type_t<scalar_t>;
  const TripletGrid grid(anchors, positions);
  if (grid.blocks == 0) return;
  const auto kernel = &forward_kernel<scalar_t, acc_t>;
  REID_LAUNCH(kernel, static_cast<unsigned int>(grid.blocks), TripletGrid::threads(), 0, stream, anchor, positive,
              negative, weight, out, channels, positions, grid.tiles_per_anchor, static_cast<acc_t>(margin));
}

// grad_anchor / grad_positive / grad_negative (N, C, L) from grad_loss (N, L).
template <typename scalar_t>
void launch_masked_dense_triplet_bwd(const scalar_t* grad_loss, const scalar_t* anchor, const scalar_t* positive,
                                     const scalar_t* negative, const scalar_t* weight, scalar_t* grad_anchor,
                                     scalar_t* grad_positive, scalar_t* grad_negative, int64_t anchors,
                                     int64_t channels, int64_t positions, double margin, cudaStream_t stream) {
  using acc_t = device::acc_type_t<scalar_t>;
  const TripletGrid grid(anchors, positions);
  if (grid.blocks == 0) return;
  const auto kernel = &backward_kernel<scalar_t, acc_t>;
  REID_LAUNCH(kernel, static_cast<unsigned int>(grid.blocks), TripletGrid::threads(), 0, stream, grad_loss, anchor,
              positive, negative, weight, grad_anchor, grad_positive, grad_negative, channels, positions,
              grid.tiles_per_anchor, static_cast<acc_t>(margin));
}

}  // namespace dense_triplet
}  // namespace reid_kernels
