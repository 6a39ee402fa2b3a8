// The one header every kernel header (csrc/<op>/<op>_kernels.cuh) includes first.
//
// Kernel headers hold the device code (__global__ / __device__ functions) and the
// ATen-free host code that picks a launch configuration and launches it.  They are
// compiled in two ways:
//
//   * by nvcc, from the op's .cu file (which adds the ATen glue: argument checks,
//     allocation, dtype dispatch, the current stream);
//   * by a plain C++ compiler with REID_CUDA_EMULATION defined, against the CPU
//     emulator of CUDA's execution model in tests/cuda_emu/cuda_emu.h (test
//     infrastructure, never shipped), so the device code runs in every CI run.
//
// So a kernel header uses only what this file provides, or what both CUDA and the
// emulator provide (threadIdx & co., __syncthreads*, __shfl_*_sync, __syncwarp,
// min / max / expf / ..., __half / __nv_bfloat16, nvcuda::wmma), never ATen or c10.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#if defined(REID_CUDA_EMULATION)
#include "cuda_emu.h"  // tests/cuda_emu/: defines the REID_EMU_* macros used below
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#endif

// ---- Shared memory -----------------------------------------------------------
// REID_SHARED_ARRAY(float, partial, [8][33]);   a static __shared__ array of the block
// REID_EXTERN_SHARED(unsigned char, smem, 128);  the block's dynamic shared memory,
//                                                aligned to 128 bytes
// The emulator gives each block its own copy, filled with bytes that read as NaN,
// and faults on an access past the dynamic size the launch asked for.
#if defined(REID_CUDA_EMULATION)
#define REID_SHARED_ARRAY(type, name, extents) REID_EMU_SHARED_ARRAY(type, name, extents)
#define REID_EXTERN_SHARED(type, name, align) REID_EMU_EXTERN_SHARED(type, name, align)
#else
#define REID_SHARED_ARRAY(type, name, extents) __shared__ type name extents
#define REID_EXTERN_SHARED(type, name, align) extern __shared__ __align__(align) type name[]
#endif

// ---- Device-side assertion ---------------------------------------------------
// A last resort for what the host checks before launching; the emulator reports the
// message and the failing thread, then aborts.  Under nvcc it is c10's CUDA_KERNEL_ASSERT
// (from c10/macros/Macros.h, included by c10/util/Half.h above), which unlike assert()
// stays in a build with -DNDEBUG.
#if defined(REID_CUDA_EMULATION)
#define REID_DEVICE_ASSERT(cond, msg) REID_EMU_DEVICE_ASSERT(cond, msg)
#else
#define REID_DEVICE_ASSERT(cond, msg) CUDA_KERNEL_ASSERT((cond) && (msg))
#endif

// ---- Kernel launch -----------------------------------------------------------
// REID_LAUNCH(kernel, grid, block, dynamic_smem_bytes, stream, args...)
// `kernel` is a plain name or a pointer to a __global__ function (take
// `const auto kernel = &my_kernel<T, U>;` first: a template-id's commas would split
// the macro argument).  Launch errors are checked by the caller (cudaGetLastError /
// C10_CUDA_KERNEL_LAUNCH_CHECK under nvcc; the emulator throws).
#if defined(REID_CUDA_EMULATION)
#define REID_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::reid_emu::launch((kernel), (grid), (block), (smem), (stream), __VA_ARGS__)
#else
#define REID_LAUNCH(kernel, grid, block, smem, stream, ...) (kernel)<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#endif

// ---- Target architecture -------------------------------------------------------
// REID_DEVICE_ARCH: __CUDA_ARCH__ in device compilation passes, 0 in nvcc's host pass,
// and sm_90's 900 under emulation (so every architecture-gated path is compiled).
#if defined(REID_CUDA_EMULATION)
#define REID_DEVICE_ARCH 900
#elif defined(__CUDA_ARCH__)
#define REID_DEVICE_ARCH __CUDA_ARCH__
#else
#define REID_DEVICE_ARCH 0
#endif

namespace reid_kernels {
namespace device {

// The element types the kernels are instantiated with for float16 / bfloat16
// tensors: c10's under nvcc (what AT_DISPATCH hands out), the emulator's otherwise.
// Both are 16-bit IEEE binary16 / bfloat16 with round-to-nearest-even conversions.
#if defined(REID_CUDA_EMULATION)
using half_t = ::reid_emu::half;
using bfloat16_t = ::reid_emu::bfloat16;
#else
using half_t = c10::Half;
using bfloat16_t = c10::BFloat16;
#endif

// Accumulation ("math") type of a kernel on T inputs: float64 for float64, float32
// for float32 / float16 / bfloat16 (the role of at::opmath_type).
template <typename T>
struct acc_type {
  using type = float;
};
template <>
struct acc_type<double> {
  using type = double;
};
template <typename T>
using acc_type_t = typename acc_type<T>::type;

// The nvcuda::wmma element type of a 16-bit kernel element type (none for others).
template <typename T>
struct wmma_element {};
template <>
struct wmma_element<half_t> {
  using type = __half;
};
template <>
struct wmma_element<bfloat16_t> {
  using type = __nv_bfloat16;
};

}  // namespace device
}  // namespace reid_kernels
