// CPU kernel of memory_update_ (see memory_update.h for the definition of the modes).
//
// Samples are grouped by label with a stable sort, so every distinct label is one
// independent task that walks its own samples in batch order: the tasks run in
// parallel (at::parallel_for) and the result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "memory/memory_update.h"

namespace reid_kernels {
namespace memory {
namespace {

// A run of samples sharing one label: sorted positions [begin, end).
struct LabelRun {
  int64_t label;
  int64_t begin;
  int64_t end;
};

std::vector<LabelRun> label_runs(const at::Tensor& sorted_labels) {
  const int64_t* y = sorted_labels.data_ptr<int64_t>();
  const int64_t n = sorted_labels.numel();
  std::vector<LabelRun> runs;
  for (int64_t i = 0; i < n; ++i) {
    if (i == 0 || y[i] != y[i - 1]) runs.push_back({y[i], i, i + 1});
    else runs.back().end = i + 1;
  }
  return runs;
}

// Sum over d of x[d] * y[d] in double, with kLanes independent partial sums so that the
// loop vectorises (one accumulator would serialise on the add latency).  Double because a
// float sum over 2048 terms would already cost ~1e-6 relative.
constexpr int kLanes = 8;

template <typename scalar_t>
double dot(const scalar_t* x, const scalar_t* y, int64_t dim) {
  double lanes[kLanes] = {0.0};
  int64_t d = 0;
  for (; d + kLanes <= dim; d += kLanes) {
    for (int k = 0; k < kLanes; ++k) lanes[k] += static_cast<double>(x[d + k]) * static_cast<double>(y[d + k]);
  }
  for (; d < dim; ++d) lanes[0] += static_cast<double>(x[d]) * static_cast<double>(y[d]);
  double total = 0.0;
  for (int k = 0; k < kLanes; ++k) total += lanes[k];
  return total;
}

// row = row / max(sqrt(sum_sq), eps), as torch.nn.functional.normalize.
template <typename scalar_t>
void scale_to_unit(scalar_t* row, double sum_sq, int64_t dim) {
  const scalar_t norm = static_cast<scalar_t>(std::max(std::sqrt(sum_sq), kNormalizeEps));
  for (int64_t d = 0; d < dim; ++d) row[d] = row[d] / norm;
}

// row = old_weight * row + new_weight * sample; returns the new row's sum of squares (as dot()).
template <typename scalar_t>
double blend_row(scalar_t* row, const scalar_t* sample, scalar_t old_weight, scalar_t new_weight, int64_t dim) {
  double lanes[kLanes] = {0.0};
  int64_t d = 0;
  for (; d + kLanes <= dim; d += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const scalar_t v = old_weight * row[d + k] + new_weight * sample[d + k];
      row[d + k] = v;
      lanes[k] += static_cast<double>(v) * static_cast<double>(v);
    }
  }
  for (; d < dim; ++d) {
    const scalar_t v = old_weight * row[d] + new_weight * sample[d];
    row[d] = v;
    lanes[0] += static_cast<double>(v) * static_cast<double>(v);
  }
  double total = 0.0;
  for (int k = 0; k < kLanes; ++k) total += lanes[k];
  return total;
}

// The sample of the run with the lowest dot product with the row; the first one on ties.
template <typename scalar_t>
int64_t hardest_sample(const scalar_t* row, const scalar_t* features, const int64_t* order, const LabelRun& run,
                       int64_t dim) {
  int64_t best = order[run.begin];
  double best_dot = std::numeric_limits<double>::infinity();
  for (int64_t s = run.begin; s < run.end; ++s) {
    const double similarity = dot(features + order[s] * dim, row, dim);
    if (similarity < best_dot) {
      best_dot = similarity;
      best = order[s];
    }
  }
  return best;
}

template <typename scalar_t>
void update_run(scalar_t* memory, const scalar_t* features, const int64_t* order, const LabelRun& run, int64_t dim,
                scalar_t old_weight, scalar_t new_weight, UpdateMode mode, bool normalize,
                std::vector<scalar_t>& scratch) {
  scalar_t* row = memory + run.label * dim;
  if (mode == UpdateMode::kSequential) {
    for (int64_t s = run.begin; s < run.end; ++s) {
      const double sum_sq = blend_row(row, features + order[s] * dim, old_weight, new_weight, dim);
      if (normalize) scale_to_unit(row, sum_sq, dim);
    }
    return;
  }
  const scalar_t* target = nullptr;
  if (mode == UpdateMode::kMean) {
    // Batch-order sum, then divide: what features[labels == y].mean(0) computes.
    scratch.assign(dim, scalar_t(0));
    for (int64_t s = run.begin; s < run.end; ++s) {
      const scalar_t* f = features + order[s] * dim;
      for (int64_t d = 0; d < dim; ++d) scratch[d] += f[d];
    }
    const scalar_t count = static_cast<scalar_t>(run.end - run.begin);
    for (int64_t d = 0; d < dim; ++d) scratch[d] = scratch[d] / count;
    target = scratch.data();
  } else {  // hard
    target = features + hardest_sample(row, features, order, run, dim) * dim;
  }
  const double sum_sq = blend_row(row, target, old_weight, new_weight, dim);
  if (normalize) scale_to_unit(row, sum_sq, dim);
}

void memory_update_cpu(at::Tensor memory, const at::Tensor& features, const at::Tensor& labels, double momentum,
                       c10::string_view mode_name, bool normalize) {
  check_update_args(memory, features, labels, momentum);
  const UpdateMode mode = parse_mode(std::string(mode_name));
  TORCH_CHECK(memory.scalar_type() == at::kFloat || memory.scalar_type() == at::kDouble,
              "memory: expected dtype float32 or float64 on the CPU, got ", memory.scalar_type());
  const auto labels_c = labels.contiguous();
  check_label_range(labels_c, memory.size(0));
  if (features.size(0) == 0) return;

  const auto feats = features.to(memory.scalar_type()).contiguous();
  const auto sorted = at::sort(labels_c, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const auto sorted_labels = std::get<0>(sorted).contiguous();
  const auto order = std::get<1>(sorted).contiguous();
  const std::vector<LabelRun> runs = label_runs(sorted_labels);
  const int64_t dim = memory.size(1);
  // About kWorkPerTask feature elements per task: a typical update (64-256 samples x 2048)
  // stays on one thread, where waking a thread pool costs more than the whole update.
  constexpr int64_t kWorkPerTask = int64_t(1) << 22;
  const int64_t num_runs = static_cast<int64_t>(runs.size());
  const int64_t grain = std::max<int64_t>(1, (num_runs * kWorkPerTask) / std::max<int64_t>(1, features.size(0) * dim));

  AT_DISPATCH_FLOATING_TYPES(memory.scalar_type(), "memory_update_cpu", [&] {
    scalar_t* mem = memory.data_ptr<scalar_t>();
    const scalar_t* f = feats.data_ptr<scalar_t>();
    const int64_t* ord = order.data_ptr<int64_t>();
    // Weights rounded as the reference rounds the Python floats momentum and 1 - momentum.
    const scalar_t old_weight = static_cast<scalar_t>(momentum);
    const scalar_t new_weight = static_cast<scalar_t>(1.0 - momentum);
    at::parallel_for(0, num_runs, grain, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch;
      for (int64_t r = begin; r < end; ++r) {
        update_run(mem, f, ord, runs[r], dim, old_weight, new_weight, mode, normalize, scratch);
      }
    });
  });
}

}  // namespace
}  // namespace memory

TORCH_LIBRARY_IMPL(reid_kernels, CPU, m) {
  m.impl("memory_update_", &memory::memory_update_cpu);
}

}  // namespace reid_kernels
