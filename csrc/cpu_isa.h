// Element-wise CPU loops compiled for the widest vector instructions ATen uses.
//
// The extension is built without -march flags (one binary for every x86-64 CPU), so a plain loop
// vectorises to SSE2 only: 4 floats, 2 doubles, no FMA.  with_cpu_isa(body) runs `body` (a lambda
// holding such a loop) inlined into a copy compiled for AVX-512, or AVX2 + FMA, or the generic
// target: the copy of the instruction set ATen's own kernels run on (torch.backends.cpu.
// get_cpu_capability(), which follows ATEN_CPU_CAPABILITY), so that capping ATen to AVX2 (the
// reproducible setting, training/reproducible.py) caps these loops too.  The three copies give
// bit-identical results: the extension is compiled with -ffp-contract=off (setup.py), so no copy
// fuses a * b + c into an FMA, and without -ffast-math none reorders a sum (reductions that should
// vectorise spell out their lanes, soft_warp_cpu.cpp's row_sum).
//
// `flatten` inlines the lambda (and what it calls) into the target-specific copy, so its loops are
// vectorised for that target.  Keep the bodies to plain loops over raw pointers: an at:: call or a
// parallel_for inside would be inlined or compiled for the target too.  Call with_cpu_isa inside
// each parallel task, not around a parallel_for (the task runs outside the inlined copy).
#pragma once

#include <ATen/Version.h>

#include <string>

namespace reid_kernels {

enum class CpuIsa { kGeneric, kAvx2, kAvx512 };

// The instruction set ATen's kernels run on in this process (read once).
inline CpuIsa aten_cpu_isa() {
#if defined(__x86_64__) || defined(_M_X64)
  static const CpuIsa isa = [] {
    const std::string cap = at::get_cpu_capability();
    if (cap.rfind("AVX512", 0) == 0 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl"))
      return CpuIsa::kAvx512;
    if (cap.rfind("AVX2", 0) == 0 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return CpuIsa::kAvx2;
    return CpuIsa::kGeneric;
  }();
  return isa;
#else
  return CpuIsa::kGeneric;
#endif
}

#if defined(__x86_64__) && defined(__GNUC__)
template <typename Body>
__attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma"), flatten)) void run_avx512(const Body& body) {
  body();
}
template <typename Body>
__attribute__((target("avx2,fma"), flatten)) void run_avx2(const Body& body) {
  body();
}
#endif

template <typename Body>
void with_cpu_isa(const Body& body) {
#if defined(__x86_64__) && defined(__GNUC__)
  switch (aten_cpu_isa()) {
    case CpuIsa::kAvx512:
      return run_avx512(body);
    case CpuIsa::kAvx2:
      return run_avx2(body);
    case CpuIsa::kGeneric:
      break;
  }
#endif
  body();
}

}  // namespace reid_kernels
