// Per-phase timers of the CPU CMAlign kernels (soft_warp_cpu.cpp, cmalign_pairs_cpu.cpp), for
// benchmarks/profile_cmalign.py.
//
// Off unless REID_KERNELS_CMALIGN_PROFILE=1 (read once per operator call by
// PhaseTimers::begin_call); when off, a ScopedPhase costs one predictable branch and no
// clock read.  When on, each phase adds the thread's steady-clock nanoseconds to a global
// atomic counter: with samples spread over threads the counters are thread-seconds, not
// wall seconds (profile_cmalign.py divides by the thread count it ran with).
// reid_kernels::_cmalign_cpu_profile(bool reset) returns the counters (and the matrix-product
// FLOPs credited to each phase) and optionally zeroes them.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

namespace reid_kernels {
namespace phase {

enum Phase : int {
  kNorms = 0,         // inverse column norms (and radial coefficients)
  kCorrelation,       // S = q^T k (matrix product)
  kSoftmax,           // cosine scaling, softmax rows (element-wise over the (Lq, Lk) tile)
  kWarp,              // out = v P^T (matrix product), and the blend of eq. 3 when fused
  kBwdValueGrad,      // grad_value = grad_out P (matrix product)
  kBwdProbGrad,       // dP = grad_out^T v (matrix product)
  kBwdSoftmax,        // dS / G from P and dP (element-wise over the tile)
  kBwdQueryGrad,      // grad_query = key G^T (matrix product)
  kBwdKeyGrad,        // grad_key = query G (matrix product)
  kBwdNormalize,      // radial terms of the normalisation backward, blends' gradients (element-wise over C x L)
  kBwdRecompute,      // uncached backward: S = q^T k again and its softmax
  kOther,             // allocations, gathers, scatter bookkeeping inside the kernels
  kDistances,         // fused cmalign: the dense triplet's distances ||x - recon + eps|| (eq. 10)
  kBwdDirect,         // fused cmalign: the blend's direct term, the distances' gradients and each recon's total gradient (C x L passes)
  kCount
};

inline const char* name(int p) {
  static const char* const names[kCount] = {"norms",         "correlation",   "softmax",       "warp",
                                            "bwd_value_grad", "bwd_prob_grad", "bwd_softmax",   "bwd_query_grad",
                                            "bwd_key_grad",  "bwd_normalize", "bwd_recompute", "other",
                                            "distances",     "bwd_direct"};
  return names[p];
}

struct Counters {
  std::atomic<int64_t> ns[kCount];
  std::atomic<int64_t> flops[kCount];
  std::atomic<bool> enabled{false};
};

Counters& counters();  // defined in cmalign_pairs_cpu.cpp

// Reads the environment variable once per operator call.
void begin_call();

inline bool on() { return counters().enabled.load(std::memory_order_relaxed); }

inline void add_flops(Phase p, int64_t flops) {
  if (on()) counters().flops[p].fetch_add(flops, std::memory_order_relaxed);
}

class ScopedPhase {
 public:
  explicit ScopedPhase(Phase p) : phase_(p), active_(on()) {
    if (active_) start_ = std::chrono::steady_clock::now();
  }
  ~ScopedPhase() {
    if (!active_) return;
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start_);
    counters().ns[phase_].fetch_add(ns.count(), std::memory_order_relaxed);
  }
  ScopedPhase(const ScopedPhase&) = delete;
  ScopedPhase& operator=(const ScopedPhase&) = delete;

 private:
  Phase phase_;
  bool active_;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace phase
}  // namespace reid_kernels
