// CUDA entry point of memory_update_ (see memory_update.h for the definition of the modes):
// argument checks, the stable sort of the labels, dtype dispatch, allocation and the
// stream.  The device code and its launch are in memory_update_kernels.cuh.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "memory/memory_update.h"
#include "memory/memory_update_kernels.cuh"

namespace reid_kernels {
namespace memory {
namespace {

void memory_update_cuda(at::Tensor memory, const at::Tensor& features, const at::Tensor& labels, double momentum,
                        c10::string_view mode_name, bool normalize) {
  check_update_args(memory, features, labels, momentum);
  const UpdateMode mode = parse_mode(std::string(mode_name));
  check_label_range(labels, memory.size(0));  // before the launch: the kernel's assert is a last resort
  const int64_t batch = features.size(0);
  if (batch == 0) return;
  TORCH_CHECK(batch <= std::numeric_limits<int32_t>::max(), "features: expected at most 2^31-1 rows, got ", batch);
  const c10::cuda::CUDAGuard device_guard(memory.device());
  // Group the samples by label, keeping batch order inside a label (stable sort).
  const auto sorted = at::sort(labels.contiguous(), /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const auto sorted_labels = std::get<0>(sorted).contiguous();
  const auto order = std::get<1>(sorted).contiguous();
  const int64_t rows = memory.size(0);
  const int64_t dim = memory.size(1);
  const auto stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "memory_update_cuda", [&] {
    using acc_t = device::acc_type_t<scalar_t>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    const auto feats = features.to(acc_dtype).contiguous();
    at::Tensor global_rows;  // only for rows too wide for shared memory
    if (memory_update_needs_global_rows<acc_t>(dim)) {
      global_rows = at::empty({batch, dim}, memory.options().dtype(acc_dtype));
    }
    launch_memory_update<scalar_t, acc_t>(memory.data_ptr<scalar_t>(), feats.data_ptr<acc_t>(),
                                          sorted_labels.data_ptr<int64_t>(), order.data_ptr<int64_t>(), batch, rows,
                                          dim, momentum, mode, normalize,
                                          global_rows.defined() ? global_rows.data_ptr<acc_t>() : nullptr, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace memory

TORCH_LIBRARY_IMPL(reid_kernels, CUDA, m) {
  m.impl("memory_update_", &memory::memory_update_cuda);
}

}  // namespace reid_kernels
