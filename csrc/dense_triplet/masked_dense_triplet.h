// Shared argument checks of masked_dense_triplet_fwd/bwd (CPU and CUDA backends).
//
// LbA eqs. 10-11, per anchor n and position l (distances over the channel axis):
//   d+ = ||a[n,:,l] - p[n,:,l]||_2,  d- = ||a[n,:,l] - n[n,:,l]||_2
//   loss[n,l] = weight[n,l] * [d+ - d- + margin]_+
// Backward, with h = d+ - d- + margin and g = grad[n,l] * weight[n,l] * (h >= 0)
// (clamp's convention: the gradient passes at h == 0):
//   grad_p = -g (a-p)/d+,  grad_n = g (a-n)/d-,  grad_a = -(grad_p + grad_n)
// where a term whose distance is exactly 0 contributes 0 (torch.linalg.vector_norm's
// subgradient).  NaN follows the reference: a NaN distance gives NaN gradients on all its
// channels; an inactive hinge passes exactly 0, even times a NaN weight (clamp's backward).  The weight is a constant (LbA's detached co-attention): no gradient.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "mutation.h"

namespace reid_kernels {
namespace dense_triplet {

inline void check_map(const char* name, const at::Tensor& t, const at::Tensor& anchor) {
  TORCH_CHECK(t.dim() == 3, name, ": expected a 3-D (N, C, L) tensor, got shape ", t.sizes());
  TORCH_CHECK(t.sizes() == anchor.sizes(), name, ": expected shape ", anchor.sizes(), " (like anchor), got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == anchor.scalar_type(), name, ": expected dtype ", anchor.scalar_type(),
              " (like anchor), got ", t.scalar_type());
  TORCH_CHECK(t.device() == anchor.device(), name, ": expected a tensor on ", anchor.device(), " (like anchor), got ",
              t.device());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor, got strides ", t.strides());
}

inline void check_position_map(const char* name, const at::Tensor& t, const at::Tensor& anchor) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == anchor.size(0) && t.size(1) == anchor.size(2), name,
              ": expected shape (", anchor.size(0), ", ", anchor.size(2), ") (N, L of anchor), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == anchor.scalar_type(), name, ": expected dtype ", anchor.scalar_type(),
              " (like anchor), got ", t.scalar_type());
  TORCH_CHECK(t.device() == anchor.device(), name, ": expected a tensor on ", anchor.device(), " (like anchor), got ",
              t.device());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor, got strides ", t.strides());
}

inline void check_triplet_args(const at::Tensor& anchor, const at::Tensor& positive, const at::Tensor& negative,
                               const at::Tensor& weight) {
  TORCH_CHECK(anchor.dim() == 3, "anchor: expected a 3-D (N, C, L) tensor, got shape ", anchor.sizes());
  TORCH_CHECK(at::isFloatingType(anchor.scalar_type()), "anchor: expected a floating-point tensor, got dtype ",
              anchor.scalar_type());
  check_map("anchor", anchor, anchor);
  check_map("positive", positive, anchor);
  check_map("negative", negative, anchor);
  check_position_map("weight", weight, anchor);
}

// upstream / d, a distance's backward coefficient, with the conventions above: 0 where d is exactly
// 0 (the norm's subgradient), NaN passed on where d is NaN.  Used by the CPU triplet kernel and by
// cmalign's fused CPU backward (csrc/cmalign/soft_warp_cpu.cpp), whose distances follow eq. 10 too.
template <typename T>
inline T distance_gradient_coefficient(T upstream, T d) {
  return d > T(0) || std::isnan(d) || REID_MUTANT(8) ? upstream / d : T(0);
}

}  // namespace dense_triplet
}  // namespace reid_kernels
