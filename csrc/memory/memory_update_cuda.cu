// CUDA kernel of memory_update_ (see memory_update.h for the definition of the modes).
//
// Determinism without atomics: the host sorts the labels with a stable sort (ATen),
// so the samples of one label form a run, in batch order.  The grid has one block
// per sorted position; the block at the first position of a run owns that label's
// row and walks the run in order, every other block exits at once.  So each row is
// written by exactly one block, every reduction has a fixed shape, and the result
// is bit-identical from run to run.  No device->host sync is needed.
//
// The row being updated lives in shared memory in the math type (fp32 for
// fp32/fp16/bf16 banks, fp64 for fp64 banks); rows too wide for shared memory use a
// global scratch buffer instead.  It is rounded to the bank's dtype once, at the end.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "memory/memory_update.h"

namespace reid_kernels {
namespace memory {
namespace {

constexpr int kThreads = 256;                 // a multiple of the warp size (block_sum relies on it)
constexpr int kWarps = kThreads / 32;
constexpr size_t kSharedBudget = 48 * 1024;  // default dynamic shared memory limit

// Sum of one value per thread, in a fixed order; every thread gets the total.
// `scratch` holds kWarps entries.
template <typename acc_t>
__device__ acc_t block_sum(acc_t value, acc_t* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  __syncthreads();  // every thread has read the previous total
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  acc_t total = 0;
  for (int w = 0; w < kWarps; ++w) total += scratch[w];  // same order in every thread
  return total;
}

// row = row / max(||row||, eps) over the columns this thread owns, after a block-wide norm.
template <typename acc_t>
__device__ void normalize_row(acc_t* row, int64_t dim, acc_t partial_sum_sq, acc_t* scratch) {
  const acc_t sum_sq = block_sum(partial_sum_sq, scratch);
  const acc_t norm = max(sqrt(sum_sq), static_cast<acc_t>(kNormalizeEps));
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) row[d] = row[d] / norm;
}

template <typename scalar_t, typename acc_t>
__global__ void memory_update_kernel(scalar_t* __restrict__ memory, const acc_t* __restrict__ features,
                                     const int64_t* __restrict__ sorted_labels, const int64_t* __restrict__ order,
                                     int64_t batch, int64_t rows, int64_t dim, acc_t old_weight, acc_t new_weight,
                                     int mode, bool normalize, acc_t* __restrict__ global_rows) {
  const int64_t begin = blockIdx.x;
  const int64_t label = sorted_labels[begin];
  if (begin > 0 && sorted_labels[begin - 1] == label) return;  // not the first sample of its label
  if (label < 0 || label >= rows) {
    CUDA_KERNEL_ASSERT(false && "memory_update_: label out of range");
    return;  // unreachable: memory_update_cuda checks the range before launching
  }
  int64_t end = begin + 1;
  while (end < batch && sorted_labels[end] == label) ++end;

  extern __shared__ __align__(16) unsigned char shared_bytes[];
  acc_t* scratch = reinterpret_cast<acc_t*>(shared_bytes);  // kWarps entries for block_sum
  acc_t* row = global_rows != nullptr ? global_rows + static_cast<int64_t>(blockIdx.x) * dim : scratch + kWarps;
  scalar_t* bank_row = memory + label * dim;
  // Each thread owns columns threadIdx.x, threadIdx.x + blockDim.x, ...: only block_sum crosses threads.
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) row[d] = static_cast<acc_t>(bank_row[d]);

  if (mode == static_cast<int>(UpdateMode::kSequential)) {
    for (int64_t s = begin; s < end; ++s) {
      const acc_t* f = features + order[s] * dim;
      acc_t sum_sq = 0;
      for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
        const acc_t v = old_weight * row[d] + new_weight * f[d];
        row[d] = v;
        sum_sq += v * v;
      }
      if (normalize) normalize_row(row, dim, sum_sq, scratch);
    }
  } else {
    acc_t sum_sq = 0;
    if (mode == static_cast<int>(UpdateMode::kMean)) {
      const acc_t count = static_cast<acc_t>(end - begin);
      for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
        acc_t total = 0;
        for (int64_t s = begin; s < end; ++s) total += features[order[s] * dim + d];  // batch order
        const acc_t v = old_weight * row[d] + new_weight * (total / count);
        row[d] = v;
        sum_sq += v * v;
      }
    } else {  // hard: the sample least similar to the current row; the first one on ties
      int64_t hardest = order[begin];
      acc_t hardest_dot = 0;
      for (int64_t s = begin; s < end; ++s) {
        const acc_t* f = features + order[s] * dim;
        acc_t partial = 0;
        for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) partial += f[d] * row[d];
        const acc_t dot = block_sum(partial, scratch);  // identical in every thread
        if (s == begin || dot < hardest_dot) {
          hardest_dot = dot;
          hardest = order[s];
        }
      }
      const acc_t* f = features + hardest * dim;
      for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
        const acc_t v = old_weight * row[d] + new_weight * f[d];
        row[d] = v;
        sum_sq += v * v;
      }
    }
    if (normalize) normalize_row(row, dim, sum_sq, scratch);
  }
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) bank_row[d] = static_cast<scalar_t>(row[d]);
}

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
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    const auto feats = features.to(acc_dtype).contiguous();
    size_t shared = (kWarps + dim) * sizeof(acc_t);
    at::Tensor global_rows;  // only for rows too wide for shared memory
    if (shared > kSharedBudget) {
      shared = kWarps * sizeof(acc_t);
      global_rows = at::empty({batch, dim}, memory.options().dtype(acc_dtype));
    }
    memory_update_kernel<scalar_t, acc_t><<<static_cast<unsigned int>(batch), kThreads, shared, stream>>>(
        memory.data_ptr<scalar_t>(), feats.data_ptr<acc_t>(), sorted_labels.data_ptr<int64_t>(),
        order.data_ptr<int64_t>(), batch, rows, dim, static_cast<acc_t>(momentum), static_cast<acc_t>(1.0 - momentum),
        static_cast<int>(mode), normalize, global_rows.defined() ? global_rows.data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace memory

TORCH_LIBRARY_IMPL(reid_kernels, CUDA, m) {
  m.impl("memory_update_", &memory::memory_update_cuda);
}

}  // namespace reid_kernels
