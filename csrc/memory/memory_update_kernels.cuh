// Device code of memory_update_ on CUDA (see memory_update.h for the definition of the
// modes), and its ATen-free launch.  memory_update_cuda.cu adds the ATen glue; the CUDA
// emulator (tests/cuda_emu/) compiles this header without ATen.
//
// Determinism without atomics: the host sorts the labels with a stable sort, so the
// samples of one label form a run, in batch order.  The grid has one block per sorted
// position; the block at the first position of a run owns that label's row and walks the
// run in order, every other block exits at once.  So each row is written by exactly one
// block, every reduction has a fixed shape, and the result is bit-identical from run to
// run.  No device->host sync is needed.
//
// The row being updated lives in shared memory in the math type (fp32 for fp32/fp16/bf16
// banks, fp64 for fp64 banks); rows too wide for shared memory use a global scratch
// buffer instead.  It is rounded to the bank's dtype once, at the end.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>

#include "device/compat.cuh"
#include "memory/memory_update_mode.h"
#include "mutation.h"

namespace reid_kernels {
namespace memory {

constexpr int kThreads = 256;  // a multiple of the warp size (block_sum relies on it)
constexpr int kWarps = kThreads / 32;
// The default dynamic shared memory limit (no cudaFuncSetAttribute opt-in).
constexpr size_t kSharedBudget = REID_MUTANT(206) ? 64 * 1024 : 48 * 1024;

// Sum of one value per thread, in a fixed order; every thread gets the total.
// `scratch` holds kWarps entries.
template <typename acc_t>
__device__ acc_t block_sum(acc_t value, acc_t* scratch) {
  for (int offset = REID_MUTANT(203) ? 8 : 16; offset > 0; offset >>= 1) {
    value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (!REID_MUTANT(202)) __syncthreads();  // every thread has read the previous total
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
    REID_DEVICE_ASSERT(false, "memory_update_: label out of range");
    return;  // unreachable: memory_update_cuda checks the range before launching
  }
  int64_t end = begin + 1;
  while (end < (REID_MUTANT(205) ? batch - 1 : batch) && sorted_labels[end] == label) ++end;

  REID_EXTERN_SHARED(unsigned char, shared_bytes, 16);
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
        if (s == begin || (REID_MUTANT(204) ? dot <= hardest_dot : dot < hardest_dot)) {
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

// Dynamic shared memory of a block when the row lives there: block_sum's scratch + the row.
template <typename acc_t>
constexpr size_t memory_update_shared_bytes(int64_t dim) {
  return (kWarps + static_cast<size_t>(dim)) * sizeof(acc_t);
}

// Whether a row of `dim` columns is too wide for the default shared memory, so the launch
// needs a (batch, dim) global scratch buffer of acc_t.
template <typename acc_t>
constexpr bool memory_update_needs_global_rows(int64_t dim) {
  return memory_update_shared_bytes<acc_t>(dim) > kSharedBudget;
}

// Launches the update on sorted labels (a stable sort of `labels`: sorted_labels[i] =
// labels[order[i]]), 1 <= batch < 2^31, features in acc_t (batch, dim), `momentum` the
// weight of the old row (MCE, AAAI 2023, eq. 3).  global_rows: batch * dim acc_t when
// memory_update_needs_global_rows<acc_t>(dim), else nullptr.
template <typename scalar_t, typename acc_t>
void launch_memory_update(scalar_t* memory, const acc_t* features, const int64_t* sorted_labels,
                          const int64_t* order, int64_t batch, int64_t rows, int64_t dim, double momentum,
                          UpdateMode mode, bool normalize, acc_t* global_rows, cudaStream_t stream) {
  static_assert(std::is_same_v<acc_t, device::acc_type_t<scalar_t>>, "acc_t is the accumulation type of scalar_t");
  const bool global = memory_update_needs_global_rows<acc_t>(dim);
  if (global != (global_rows != nullptr)) {
    throw std::invalid_argument(global ? "memory_update_: a row this wide needs the global scratch buffer"
                                       : "memory_update_: global scratch given for a row that fits shared memory");
  }
  const size_t shared = global ? kWarps * sizeof(acc_t) : memory_update_shared_bytes<acc_t>(dim);
  const auto old_weight = static_cast<acc_t>(REID_MUTANT(201) ? 1.0 - momentum : momentum);
  const auto new_weight = static_cast<acc_t>(REID_MUTANT(201) ? momentum : 1.0 - momentum);
  const auto kernel = &memory_update_kernel<scalar_t, acc_t>;
  REID_LAUNCH(kernel, static_cast<unsigned int>(batch), kThreads, shared, stream, memory, features, sorted_labels,
              order, batch, rows, dim, old_weight, new_weight, static_cast<int>(mode), normalize, global_rows);
}

}  // namespace memory
}  // namespace reid_kernels
