// ATen side of the CMAlign CUDA entry points (person_mask_cuda.cu, soft_warp_cuda.cu):
// argument checks and dtype helpers.  The device code and its launches are ATen-free,
// in cmalign_device.cuh and the <op>_kernels.cuh headers.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <limits>

#include "cmalign_device.cuh"

namespace reid_kernels {
namespace cmalign_cuda {

// Accumulation dtype of a kernel on `dtype` inputs, as a tensor dtype (device::acc_type_t's).
inline at::ScalarType acc_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// Checks shared by the CUDA entry points; messages name the argument.
inline void check_cuda_feature_map(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 3, name, ": expected a 3-D (N, C, L) tensor, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor (N, C, L), got strides ", t.strides());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, name,
              ": expected dtype float32, float16, bfloat16 or float64, got ", dt);
  TORCH_CHECK(t.size(0) <= 65535, name, ": expected at most 65535 samples (CUDA grid limit), got ", t.size(0));
  TORCH_CHECK(t.size(1) * t.size(2) <= std::numeric_limits<int32_t>::max(), name,
              ": expected C * L < 2^31 per sample, got shape ", t.sizes());
}

}  // namespace cmalign_cuda
}  // namespace reid_kernels
