// Schemas of the CPU-only CMAlign operators, the kernels' phase timers and the FMA-peak
// micro-benchmark the CMAlign benchmarks divide by.
//
// These operators exist on the CPU only (the CUDA path of reid_kernels.cmalign keeps the two
// soft_warp calls), so their schemas live beside their kernels, in a fragment of the
// reid_kernels library, rather than with the shared schemas in csrc/ops.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <chrono>
#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define REID_X86 1
#endif

#include "cmalign/cpu_phase_timer.h"

namespace reid_kernels {
namespace phase {

Counters& counters() {
  static Counters c;
  return c;
}

void begin_call() {
  const char* value = std::getenv("REID_KERNELS_CMALIGN_PROFILE");
  counters().enabled.store(value != nullptr && std::string(value) == "1", std::memory_order_relaxed);
}

}  // namespace phase

namespace {

// (nanoseconds, matrix-product FLOPs) per phase since the last reset, in phase::name order.
std::tuple<at::Tensor, at::Tensor> cmalign_cpu_profile(bool reset) {
  at::Tensor ns = at::empty({phase::kCount}, at::kLong), flops = at::empty({phase::kCount}, at::kLong);
  auto& c = phase::counters();
  for (int p = 0; p < phase::kCount; ++p) {
    ns.data_ptr<int64_t>()[p] = reset ? c.ns[p].exchange(0) : c.ns[p].load();
    flops.data_ptr<int64_t>()[p] = reset ? c.flops[p].exchange(0) : c.flops[p].load();
  }
  return {ns, flops};
}

std::vector<std::string> cmalign_cpu_phase_names() {
  std::vector<std::string> names;
  for (int p = 0; p < phase::kCount; ++p) names.emplace_back(phase::name(p));
  return names;
}

// ---------------------------------------------------------------------------
// FMA peak: a register-resident loop of independent fused multiply-adds (12 chains, more than
// latency x throughput of current cores, so the FMA units never wait), float32, on every thread
// of ATen's pool at once, in the widest instruction set the CPU has: AVX-512F (16 lanes, 2 FLOPs
// per lane; what MKL's sgemm runs on such a CPU, so an AVX2 loop would understate the peak by
// about half there), else AVX2+FMA (8 lanes), else SSE2 multiply + add (4 lanes).  The benchmarks
// report achieved GFLOP/s as a fraction of this.

constexpr int kChains = 12;

#ifdef REID_X86
__attribute__((target("avx512f"))) float fma_loop_avx512(int64_t iterations) {
  __m512 acc[kChains];
  const __m512 a = _mm512_set1_ps(0.999f), b = _mm512_set1_ps(1e-3f);
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(static_cast<float>(i));
  for (int64_t it = 0; it < iterations; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  }
  __m512 sum = acc[0];
  for (int i = 1; i < kChains; ++i) sum = _mm512_add_ps(sum, acc[i]);
  return _mm512_reduce_add_ps(sum);
}

__attribute__((target("avx2,fma"))) float fma_loop_avx2(int64_t iterations) {
  __m256 acc[kChains];
  const __m256 a = _mm256_set1_ps(0.999f), b = _mm256_set1_ps(1e-3f);
  for (int i = 0; i < kChains; ++i) acc[i] = _mm256_set1_ps(static_cast<float>(i));
  for (int64_t it = 0; it < iterations; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  }
  __m256 sum = acc[0];
  for (int i = 1; i < kChains; ++i) sum = _mm256_add_ps(sum, acc[i]);
  alignas(32) float out[8];
  _mm256_store_ps(out, sum);
  return out[0];
}

float fma_loop_sse2(int64_t iterations) {
  __m128 acc[kChains];
  const __m128 a = _mm_set1_ps(0.999f), b = _mm_set1_ps(1e-3f);
  for (int i = 0; i < kChains; ++i) acc[i] = _mm_set1_ps(static_cast<float>(i));
  for (int64_t it = 0; it < iterations; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) acc[i] = _mm_add_ps(_mm_mul_ps(acc[i], a), b);
  }
  __m128 sum = acc[0];
  for (int i = 1; i < kChains; ++i) sum = _mm_add_ps(sum, acc[i]);
  alignas(16) float out[4];
  _mm_store_ps(out, sum);
  return out[0];
}
#endif

// Returns (GFLOP/s over all threads, the instruction set used, threads).
std::tuple<double, std::string, int64_t> cpu_fma_peak(int64_t iterations) {
  TORCH_CHECK(iterations > 0, "iterations: expected a number > 0, got ", iterations);
#ifdef REID_X86
  enum class Isa { kAvx512, kAvx2, kSse2 };
  const Isa isa = __builtin_cpu_supports("avx512f")                               ? Isa::kAvx512
                  : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? Isa::kAvx2
                                                                                    : Isa::kSse2;
  const double flops_per_iteration = kChains * (isa == Isa::kAvx512 ? 32.0 : isa == Isa::kAvx2 ? 16.0 : 8.0);
  const int64_t threads = at::get_num_threads();
  std::vector<float> sink(threads);
  const auto loop = [&](int64_t n) {
    return isa == Isa::kAvx512 ? fma_loop_avx512(n) : isa == Isa::kAvx2 ? fma_loop_avx2(n) : fma_loop_sse2(n);
  };
  const auto start = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) sink[t] = loop(iterations);
  });
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  float keep = 0;
  for (float s : sink) keep += s;
  TORCH_CHECK(keep == keep, "cpu_fma_peak: the loop produced NaN");  // uses the results
  const char* name = isa == Isa::kAvx512 ? "avx512f-fma" : isa == Isa::kAvx2 ? "avx2-fma" : "sse2";
  return {threads * iterations * flops_per_iteration / seconds / 1e9, name, threads};
#else
  TORCH_CHECK(false, "_cpu_fma_peak: only implemented on x86-64");
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(reid_kernels, m) {
  // LbA's CMAlign partner warps, fused (csrc/cmalign/soft_warp_cpu.cpp), CPU only.
  // x (N, C, L), mask (N, L) in x's dtype, pos_idx / neg_idx (N,) int64, eps >= 0 ->
  // recon_pos, recon_neg (N, C, L): x + mask * (W(partner) - x) (eqs. 1-4);
  // warped_mask (N, L): the positive partner's mask warped onto the anchor (eq. 9's W(M));
  // probs (2, N, L, L) in the accumulation dtype (float64 for float64, else float32): the
  // softmax probabilities towards the positive [0] and negative [1] partners, for the backward;
  // dist (2, N, L) in the accumulation dtype: ||x - recon_pos + eps||_2 [0] and ||x - recon_neg + eps||_2 [1]
  // over the channels at each position, the dense triplet's distances (eq. 10).
  m.def("cmalign_pairs_fwd(Tensor x, Tensor mask, Tensor pos_idx, Tensor neg_idx, float temperature, float eps) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // grad_pos, grad_neg (N, C, L): gradients of recon_pos, recon_neg; grad_dist (2, N, L) of dist; each may be
  // None (no gradient: zeros)
  // -> grad_x (N, C, L), through the anchor, both partners (cosines and values), the blend and the
  // distances; the mask gets none (detached).  recon_pos, recon_neg, dist: the forward's outputs.
  m.def("cmalign_pairs_bwd(Tensor? grad_pos, Tensor? grad_neg, Tensor? grad_dist, Tensor x, Tensor mask, "
        "Tensor pos_idx, Tensor neg_idx, Tensor probs, Tensor recon_pos, Tensor recon_neg, Tensor dist, "
        "float temperature, float eps) -> Tensor");
  // Phase timers of the CPU kernels (REID_KERNELS_CMALIGN_PROFILE=1; cpu_phase_timer.h).
  m.def("_cmalign_cpu_profile(bool reset) -> (Tensor, Tensor)", &cmalign_cpu_profile);
  m.def("_cmalign_cpu_phase_names() -> str[]", &cmalign_cpu_phase_names);
  // Register-resident FMA loop on every ATen thread: (GFLOP/s, instruction set, threads).
  m.def("_cpu_fma_peak(int iterations) -> (float, str, int)", &cpu_fma_peak);
}

}  // namespace reid_kernels
