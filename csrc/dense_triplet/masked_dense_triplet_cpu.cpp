// CPU kernels of the masked dense triplet (see masked_dense_triplet.h for the formulas).
//
// Work items are (anchor n, block of kBlock positions): for each channel the three maps
// are read once, contiguously along the positions, and the squared distances of the
// block are accumulated in double.  No difference tensor is materialised.  Each work item's loops
// run in the vector instruction set of ATen's kernels (cpu_isa.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>

#include "cpu_buffers.h"
#include "cpu_isa.h"
#include "dense_triplet/masked_dense_triplet.h"
#include "mutation.h"

namespace reid_kernels {
namespace dense_triplet {
namespace {

constexpr int64_t kBlock = 64;  // positions per work item

struct Geometry {
  int64_t batch, channels, positions, blocks;
  explicit Geometry(const at::Tensor& anchor)
      : batch(anchor.size(0)),
        channels(anchor.size(1)),
        positions(anchor.size(2)),
        blocks((anchor.size(2) + kBlock - 1) / kBlock) {}
};

// Squared distances d+^2 and d-^2 of positions [l0, l0 + width) of anchor n.
template <typename scalar_t>
void squared_distances(const scalar_t* a, const scalar_t* p, const scalar_t* ng, const Geometry& g, int64_t n,
                       int64_t l0, int64_t width, double* pos_sq, double* neg_sq) {
  std::fill(pos_sq, pos_sq + width, 0.0);
  std::fill(neg_sq, neg_sq + width, 0.0);
  for (int64_t c = 0; c < g.channels; ++c) {
    const int64_t base = (n * g.channels + c) * g.positions + l0;
    for (int64_t j = 0; j < width; ++j) {
      const double anchor_value = static_cast<double>(a[base + j]);
      const double dp = anchor_value - static_cast<double>(p[base + j]);
      const double dn = anchor_value - static_cast<double>(ng[base + j]);
      pos_sq[j] += dp * dp;
      neg_sq[j] += dn * dn;
    }
  }
}

// body(n, l0, width) for every work item (anchor n, positions [l0, l0 + width)), the items spread
// over ATen's threads, each task's loops in the vector instruction set of ATen's kernels.
template <typename Body>
void for_each_work_item(const Geometry& g, const Body& body) {
  at::parallel_for(0, g.batch * g.blocks, 1, [&](int64_t begin, int64_t end) {
    with_cpu_isa([&] {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t l0 = (item % g.blocks) * kBlock;
        body(item / g.blocks, l0, std::min(kBlock, g.positions - l0));
      }
    });
  });
}

template <typename scalar_t>
void forward_kernel(const scalar_t* a, const scalar_t* p, const scalar_t* ng, const scalar_t* w, scalar_t* out,
                    const Geometry& g, double margin) {
  for_each_work_item(g, [&](int64_t n, int64_t l0, int64_t width) {
    std::array<double, kBlock> pos_sq, neg_sq;
    squared_distances(a, p, ng, g, n, l0, width, pos_sq.data(), neg_sq.data());
    for (int64_t j = 0; j < width; ++j) {
      const double hinge = std::sqrt(pos_sq[j]) - std::sqrt(neg_sq[j]) + margin;
      const int64_t idx = n * g.positions + l0 + j;
      out[idx] = static_cast<scalar_t>(static_cast<double>(w[idx]) * std::max(hinge, 0.0));
    }
  });
}

// One channel's row of the three gradients over a block of positions.  The pointers are declared
// unaliased (they are distinct tensors): without it the compiler leaves the loop scalar.
template <typename T>
inline void row_gradients(const T* __restrict__ a, const T* __restrict__ p, const T* __restrict__ ng,
                          const T* __restrict__ pos_scale, const T* __restrict__ neg_scale, int64_t width,
                          T* __restrict__ grad_a, T* __restrict__ grad_p, T* __restrict__ grad_n) {
  for (int64_t j = 0; j < width; ++j) {
    const T gp = pos_scale[j] * (a[j] - p[j]);
    const T gn = neg_scale[j] * (a[j] - ng[j]);
    grad_a[j] = gp - gn;
    grad_p[j] = -gp;
    grad_n[j] = REID_MUTANT(11) ? -gn : gn;
  }
}

template <typename scalar_t>
void backward_kernel(const scalar_t* grad, const scalar_t* a, const scalar_t* p, const scalar_t* ng, const scalar_t* w,
                     scalar_t* grad_a, scalar_t* grad_p, scalar_t* grad_n, const Geometry& g, double margin) {
  for_each_work_item(g, [&](int64_t n, int64_t l0, int64_t width) {
    std::array<double, kBlock> pos_coef, neg_coef;  // squared distances first, then g/d+ and g/d-
    squared_distances(a, p, ng, g, n, l0, width, pos_coef.data(), neg_coef.data());
    for (int64_t j = 0; j < width; ++j) {
      const double d_pos = std::sqrt(pos_coef[j]);
      const double d_neg = std::sqrt(neg_coef[j]);
      const int64_t idx = n * g.positions + l0 + j;
      // An inactive hinge passes exactly 0 (not 0 * weight): a NaN or inf weight there gives a
      // zero gradient, as the reference's clamp backward (and the CUDA kernel) do.
      const bool active = d_pos - d_neg + margin >= 0.0;
      const double upstream = active ? static_cast<double>(grad[idx]) * static_cast<double>(w[idx]) : 0.0;
      // 0 where a distance is exactly 0 (vector_norm's subgradient); a NaN distance passes NaN
      // to every channel, as the reference's norm backward (x / ||x||) does.
      pos_coef[j] = distance_gradient_coefficient(upstream, d_pos);
      neg_coef[j] = distance_gradient_coefficient(upstream, d_neg);
    }
    // The per-element products in the maps' dtype (the reference's autograd rounds them there
    // too); the distances above stay accumulated in double.  Plain arrays of one dtype, so the
    // compiler vectorises the loop.
    std::array<scalar_t, kBlock> pos_scale, neg_scale;
    for (int64_t j = 0; j < width; ++j) {
      pos_scale[j] = static_cast<scalar_t>(pos_coef[j]);
      neg_scale[j] = static_cast<scalar_t>(neg_coef[j]);
    }
    for (int64_t c = 0; c < g.channels; ++c) {
      const int64_t base = (n * g.channels + c) * g.positions + l0;
      row_gradients(a + base, p + base, ng + base, pos_scale.data(), neg_scale.data(), width, grad_a + base,
                    grad_p + base, grad_n + base);
    }
  });
}

void check_cpu_dtype(const at::Tensor& anchor) {
  TORCH_CHECK(anchor.scalar_type() == at::kFloat || anchor.scalar_type() == at::kDouble,
              "anchor: expected dtype float32 or float64 on the CPU (float16/bfloat16 are CUDA-only), got ",
              anchor.scalar_type());
}

at::Tensor masked_dense_triplet_fwd_cpu(const at::Tensor& anchor, const at::Tensor& positive,
                                        const at::Tensor& negative, const at::Tensor& weight, double margin) {
  check_triplet_args(anchor, positive, negative, weight);
  check_cpu_dtype(anchor);
  auto out = at::empty({anchor.size(0), anchor.size(2)}, anchor.options());
  const Geometry g(anchor);
  AT_DISPATCH_FLOATING_TYPES(anchor.scalar_type(), "masked_dense_triplet_fwd_cpu", [&] {
    forward_kernel(anchor.data_ptr<scalar_t>(), positive.data_ptr<scalar_t>(), negative.data_ptr<scalar_t>(),
                   weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), g, margin);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_dense_triplet_bwd_cpu(const at::Tensor& grad_loss,
                                                                            const at::Tensor& anchor,
                                                                            const at::Tensor& positive,
                                                                            const at::Tensor& negative,
                                                                            const at::Tensor& weight, double margin) {
  check_triplet_args(anchor, positive, negative, weight);
  check_position_map("grad_loss", grad_loss, anchor);
  check_cpu_dtype(anchor);
  // Three fresh (N, C, L) maps: on huge pages where the OS allows (their page faults were 40% of
  // this backward's time on 4 KiB pages, cpu_buffers.h).
  auto grad_a = empty_large_like(anchor);
  auto grad_p = empty_large_like(anchor);
  auto grad_n = empty_large_like(anchor);
  const Geometry g(anchor);
  AT_DISPATCH_FLOATING_TYPES(anchor.scalar_type(), "masked_dense_triplet_bwd_cpu", [&] {
    backward_kernel(grad_loss.data_ptr<scalar_t>(), anchor.data_ptr<scalar_t>(), positive.data_ptr<scalar_t>(),
                    negative.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), grad_a.data_ptr<scalar_t>(),
                    grad_p.data_ptr<scalar_t>(), grad_n.data_ptr<scalar_t>(), g, margin);
  });
  return {grad_a, grad_p, grad_n};
}

}  // namespace
}  // namespace dense_triplet

TORCH_LIBRARY_IMPL(reid_kernels, CPU, m) {
  m.impl("masked_dense_triplet_fwd", &dense_triplet::masked_dense_triplet_fwd_cpu);
  m.impl("masked_dense_triplet_bwd", &dense_triplet::masked_dense_triplet_bwd_cpu);
}

}  // namespace reid_kernels
