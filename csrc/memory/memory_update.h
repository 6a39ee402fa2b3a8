// Shared argument checks and helpers of memory_update_ (CPU and CUDA backends).
//
// memory_update_(memory (R, D), features (B, D), labels (B,) int64, momentum, mode, normalize)
// updates the rows memory[labels[i]] in place; momentum weights the OLD row
// (MCE, AAAI 2023, eq. 3).  Modes (reference: reid_kernels/reference.py, "Memory banks"):
//   sequential  for i in batch order: m[y_i] = mom*m[y_i] + (1-mom)*f_i, re-normalised after each sample;
//   mean        per distinct label y: m[y] = mom*m[y] + (1-mom)*mean_{i: y_i=y} f_i, then re-normalised;
//   hard        per distinct label y: the sample with the lowest dot product with the current row
//               (first in batch order on ties) replaces the mean.
// The arithmetic is done in at::opmath_type of the bank's dtype (fp32 for fp32/fp16/bf16 banks);
// a bank row is rounded back to the bank's dtype once, at the end of the call.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <string>

#include "memory/memory_update_mode.h"

namespace reid_kernels {
namespace memory {

inline UpdateMode parse_mode(const std::string& mode) {
  if (mode == "sequential") return UpdateMode::kSequential;
  if (mode == "mean") return UpdateMode::kMean;
  if (mode == "hard") return UpdateMode::kHard;
  TORCH_CHECK(false, "mode: expected 'sequential', 'mean' or 'hard', got '", mode, "'");
}

// Checks shared by both backends (check_label_range below too).
inline void check_update_args(const at::Tensor& memory, const at::Tensor& features, const at::Tensor& labels,
                              double momentum) {
  TORCH_CHECK(memory.dim() == 2, "memory: expected a 2-D (rows, dim) tensor, got shape ", memory.sizes());
  TORCH_CHECK(at::isFloatingType(memory.scalar_type()), "memory: expected a floating-point tensor, got dtype ",
              memory.scalar_type());
  TORCH_CHECK(memory.is_contiguous(), "memory: expected a contiguous tensor (it is updated in place), got strides ",
              memory.strides());
  TORCH_CHECK(memory.size(0) > 0 && memory.size(1) > 0, "memory: expected a non-empty bank, got shape ",
              memory.sizes());
  TORCH_CHECK(features.dim() == 2, "features: expected a 2-D (batch, dim) tensor, got shape ", features.sizes());
  TORCH_CHECK(at::isFloatingType(features.scalar_type()), "features: expected a floating-point tensor, got dtype ",
              features.scalar_type());
  TORCH_CHECK(features.size(1) == memory.size(1), "features: expected dim ", memory.size(1),
              " (like memory), got shape ", features.sizes());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == features.size(0), "labels: expected shape (", features.size(0),
              ",) (one label per feature row), got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "labels: expected dtype int64, got ", labels.scalar_type());
  TORCH_CHECK(features.device() == memory.device(), "features: expected a tensor on ", memory.device(),
              " (like memory), got ", features.device());
  TORCH_CHECK(labels.device() == memory.device(), "labels: expected a tensor on ", memory.device(),
              " (like memory), got ", labels.device());
  // features must not be a view into the bank: the update would read rows it has already written.
  at::assert_no_overlap(memory, features);
  TORCH_CHECK(momentum >= 0.0 && momentum <= 1.0, "momentum: expected a value in [0, 1], got ", momentum);
}

// labels[i] in [0, rows), checked in the operator on both devices with the same message, so a
// direct torch.ops.reid_kernels.memory_update_ call on CUDA raises instead of tripping a
// device-side assert (which would break the CUDA context).  On CUDA this costs one
// device->host copy of the labels (one int64 per sample, small next to the features) and a sync.
inline void check_label_range(const at::Tensor& labels, int64_t rows) {
  if (labels.numel() == 0) return;
  const at::Tensor y = labels.contiguous().cpu();
  const int64_t* v = y.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < y.numel(); ++i) {
    TORCH_CHECK(v[i] >= 0 && v[i] < rows, "labels: expected values in [0, ", rows, ") (memory rows), got ", v[i],
                " at position ", i);
  }
}

}  // namespace memory
}  // namespace reid_kernels
