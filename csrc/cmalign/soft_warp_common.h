// What the CPU and CUDA kernels of soft_warp share: the temperature check and the
// CPU probability-cache cap (one source: the Python fake kernel reads the cap
// through the reid_kernels::_soft_warp_prob_cache_bytes operator).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace reid_kernels {

// The logits are t * cos with |cos| <= 1, computed in the accumulation dtype (float64 for
// float64 maps, float32 otherwise), so t must be finite, > 0 and representable there.
inline void check_soft_warp_temperature(double temperature, at::ScalarType dtype) {
  const double bound = dtype == at::kDouble ? std::numeric_limits<double>::max()
                                            : static_cast<double>(std::numeric_limits<float>::max());
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0 && temperature <= bound,
              "temperature: expected a finite value > 0 and at most ", bound, " (the largest ",
              dtype == at::kDouble ? "float64" : "float32", " value: logits are computed in that dtype), got ",
              temperature);
}

// Largest (N, Lq, Lk) probability volume, in bytes of the accumulation dtype, that the CPU
// forward caches for its backward: 256 MiB, or REID_KERNELS_SOFT_WARP_CACHE_BYTES when set
// (read per call, so tests can reach the uncached path on small maps).
int64_t soft_warp_prob_cache_bytes();

}  // namespace reid_kernels
