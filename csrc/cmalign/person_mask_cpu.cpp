// CPU kernel of reid_kernels::person_mask (LbA eqs. 5-7).
//
// mask[n, l] = (g[n, l] - min_l g[n]) / ((max_l g[n] - min_l g[n]) + 1e-12),
// g[n, l] = ||feat[n, :, l]||_2.  Min-max is done in the input dtype (float32 for
// float16 / bfloat16), as reference.person_mask and the LbA code (which works in the
// maps' dtype) do; the 1e-12 guard makes a map whose norms are all equal give an
// all-zero mask instead of 0/0.  A NaN norm makes the whole sample's mask NaN (its
// min and max are NaN), as in the reference.  No gradient: the mask is detached.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace reid_kernels {
namespace {

constexpr double kMinMaxEps = 1e-12;  // reference.MINMAX_EPS

// The dtype of the min-max: float64 for float64 maps, float32 otherwise.
template <typename scalar_t>
using minmax_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

void check_feat(const at::Tensor& feat) {
  TORCH_CHECK(feat.dim() == 3, "feat: expected a 3-D (N, C, L) tensor, got shape ", feat.sizes());
  TORCH_CHECK(feat.device().is_cpu(), "feat: expected a CPU tensor, got one on ", feat.device());
  TORCH_CHECK(at::isFloatingType(feat.scalar_type()), "feat: expected a floating-point tensor, got dtype ",
              feat.scalar_type());
  TORCH_CHECK(feat.is_contiguous(), "feat: expected a contiguous tensor, got strides ", feat.strides());
}

// One sample: channel norms (accumulated in double, so every position with the
// same vector gets bit-identical norms), then min-max in minmax_t.
template <typename scalar_t, typename T = minmax_t<scalar_t>>
void mask_of_sample(const scalar_t* x, int64_t C, int64_t L, scalar_t* out, std::vector<double>& acc,
                    std::vector<T>& norms) {
  std::fill(acc.begin(), acc.end(), 0.0);
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* row = x + c * L;
    for (int64_t l = 0; l < L; ++l) {
      const double v = static_cast<double>(row[l]);
      acc[l] += v * v;
    }
  }
  T lo = std::numeric_limits<T>::infinity(), hi = -lo;
  bool any_nan = false;
  for (int64_t l = 0; l < L; ++l) {
    norms[l] = static_cast<T>(std::sqrt(acc[l]));  // eq. 5
    any_nan = any_nan || std::isnan(norms[l]);
    lo = std::min(lo, norms[l]);
    hi = std::max(hi, norms[l]);
  }
  if (any_nan) lo = std::numeric_limits<T>::quiet_NaN();  // torch's min propagates NaN
  const T denom = (hi - lo) + static_cast<T>(kMinMaxEps);  // eqs. 6-7
  for (int64_t l = 0; l < L; ++l) out[l] = static_cast<scalar_t>((norms[l] - lo) / denom);
}

at::Tensor person_mask_cpu(const at::Tensor& feat) {
  check_feat(feat);
  const int64_t N = feat.size(0), C = feat.size(1), L = feat.size(2);
  at::Tensor out = at::empty({N, L}, feat.options());
  if (N == 0 || L == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feat.scalar_type(), "person_mask_cpu", [&] {
    const scalar_t* x = feat.const_data_ptr<scalar_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> acc(L);
      std::vector<minmax_t<scalar_t>> norms(L);
      for (int64_t n = begin; n < end; ++n) mask_of_sample(x + n * C * L, C, L, y + n * L, acc, norms);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(reid_kernels, CPU, m) { m.impl("person_mask", &person_mask_cpu); }

}  // namespace reid_kernels
