// A CPU emulator of CUDA's execution model, for running the device code of reid_kernels'
// kernel headers (csrc/<op>/<op>_kernels.cuh) on a machine without a GPU.  Test
// infrastructure only: never shipped, never included by the extension build.
//
// Include it through csrc/device/compat.cuh with REID_CUDA_EMULATION defined and this
// directory on the include path (tests/emu_util.py builds the harnesses that way).
//
// What it provides (exactly what the kernels use):
//   * dim3 / uint3, the built-ins threadIdx / blockIdx / blockDim / gridDim (thread-local),
//     warpSize, the qualifiers __global__ __device__ __host__ __forceinline__
//     __launch_bounds__(...) __align__(n);
//   * reid_emu::launch(kernel, grid, block, dynamic_smem_bytes, stream, args...): every CUDA
//     thread of a block is an OS thread (pooled), REID_EMU_CONCURRENT_BLOCKS blocks run at a
//     time (default 2), so ThreadSanitizer sees races inside a block and between blocks.
//     Launch limits are checked like a real launch (at most 1024 threads per block,
//     block.z <= 64, grid.y / grid.z <= 65535, dynamic shared memory <= 48 KiB unless the
//     kernel opted in with cudaFuncSetAttribute(kernel,
//     cudaFuncAttributeMaxDynamicSharedMemorySize, bytes), static + dynamic <= the device's
//     opt-in maximum, REID_EMU_MAX_SHARED_OPTIN bytes, default H100's 232448); a launch over
//     a limit throws reid_emu::launch_error (and cudaGetLastError() returns the error);
//   * __syncthreads, __syncthreads_or / _and / _count: a block barrier over the live
//     threads (a thread that returned drops out, as on sm_70+); a barrier some live thread
//     never reaches is reported after REID_EMU_TIMEOUT_S seconds (default 20), never a hang;
//   * 32-lane warps: __shfl_sync / __shfl_up_sync / __shfl_down_sync / __shfl_xor_sync with
//     the source lane of PTX shfl.sync for every mode and width, for 4- and 8-byte
//     arithmetic types; __syncwarp(mask).  A warp-collective call waits for exactly the
//     live lanes of its mask (no block-wide side effect); the calling lane must be in the
//     mask, and reading a lane outside the mask (or one that exited) is an error;
//   * CUDA's min / max overloads (float / double ones NaN-ignoring, as fminf / fmaxf) and
//     <cmath>'s expf / logf / sqrt / isnan ... unqualified;
//   * static shared memory (REID_EMU_SHARED_ARRAY, one instance per block) and dynamic
//     shared memory (REID_EMU_EXTERN_SHARED), filled with 0xFF bytes (NaN as float / double
//     / half / bfloat16) at block start; the dynamic region ends at a PROT_NONE page, so an
//     access past the size the launch asked for faults, and alignment slack on either side
//     is a canary checked at block end;
//   * reid_emu::half (IEEE binary16) and reid_emu::bfloat16 with round-to-nearest-even
//     conversions from float (explicit, both ways), __half / __nv_bfloat16,
//     __half2float / __float2half / __bfloat162float / __float2bfloat16;
//   * nvcuda::wmma, a STUB of the 16x16x16 fragment API (fill_fragment, load_matrix_sync,
//     mma_sync, store_matrix_sync): it checks that all 32 lanes call each collective with
//     the same pointer and ldm, that the pointer is 32-byte aligned and ldm a multiple of
//     16 bytes; every lane holds the whole tile, mma_sync sums in float in k order, and one
//     lane stores the tile between two warp synchronisations.  TENSOR-CORE NUMERICS ARE NOT
//     EMULATED (hardware summation order and internal precision differ);
//   * REID_EMU_DEVICE_ASSERT(cond, msg): prints file:line, block, thread and msg, aborts.
// Every error is printed to stderr as "reid_emu error: ..." and aborts the process (launch
// limit errors throw first; harnesses print them the same way), so the test harness sees a
// non-zero exit.
//
// What it cannot tell: timing; the hardware memory model (threads here are as ordered as
// the host's memory model makes them; TSan reports races as C++ defines them); tensor-core
// numerics; register, occupancy and other device limits beyond the ones above; anything of
// the ATen host code.  Known over-synchronisation: a warp-collective call orders memory
// among its lanes (CUDA promises that only for __syncwarp), and a thread's first use of a
// static shared array takes a block lock; so a race between lanes of one warp that only a
// shuffle separates is not reported.  Only the features listed above exist: anything else
// a kernel uses fails to compile here, on purpose.
#pragma once

#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---- Qualifiers and vector types ---------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
constexpr int warpSize = 32;

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

// ---- Runtime API subset -------------------------------------------------------------
struct reid_emu_stream;
using cudaStream_t = reid_emu_stream*;
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchOutOfResources = 701,
};
enum cudaFuncAttribute : int { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace reid_emu {

// ---- Errors ---------------------------------------------------------------------------
[[noreturn]] inline void fail(const char* format, ...) __attribute__((format(printf, 1, 2)));
[[noreturn]] inline void fail(const char* format, ...) {
  char message[2048];
  va_list args;
  va_start(args, format);
  std::vsnprintf(message, sizeof message, format, args);
  va_end(args);
  std::fprintf(stderr, "reid_emu error: %s\n", message);
  std::fflush(stderr);
  std::abort();
}

// A launch the device would refuse (the emulator's cudaErrorInvalidConfiguration & co.).
struct launch_error : std::runtime_error {
  cudaError_t code;
  launch_error(cudaError_t c, const std::string& what) : std::runtime_error("reid_emu error: " + what), code(c) {}
};

namespace detail {

inline double env_double(const char* name, double fallback) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0' ? std::atof(value) : fallback;
}

inline double timeout_seconds() {
  static const double seconds = env_double("REID_EMU_TIMEOUT_S", 20.0);
  return seconds;
}

inline std::chrono::steady_clock::time_point deadline() {
  return std::chrono::steady_clock::now() +
         std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(timeout_seconds()));
}

inline cudaError_t& last_error() {
  static thread_local cudaError_t error = cudaSuccess;
  return error;
}

}  // namespace detail

// The device's limits (H100 by default).
struct DeviceLimits {
  size_t default_dynamic_smem = 48 * 1024;  // without the opt-in, static + dynamic
  size_t max_static_smem = 48 * 1024;
  size_t max_smem_optin = 232448;  // sharedMemPerBlockOptin
  unsigned max_threads = 1024, max_block_x = 1024, max_block_y = 1024, max_block_z = 64;
  unsigned long long max_grid_x = 2147483647ull;
  unsigned max_grid_yz = 65535;
};
inline const DeviceLimits& limits() {
  static const DeviceLimits value = [] {
    DeviceLimits l;
    l.max_smem_optin = static_cast<size_t>(detail::env_double("REID_EMU_MAX_SHARED_OPTIN", 232448));
    return l;
  }();
  return value;
}

}  // namespace reid_emu

inline cudaError_t cudaGetLastError() {
  const cudaError_t error = reid_emu::detail::last_error();
  reid_emu::detail::last_error() = cudaSuccess;
  return error;
}
inline cudaError_t cudaPeekAtLastError() { return reid_emu::detail::last_error(); }
inline const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
  }
  return "unknown error";
}

namespace reid_emu {
namespace detail {

// Dynamic shared memory opt-ins, per kernel.
inline std::mutex& optin_mutex() {
  static std::mutex m;
  return m;
}
inline std::map<const void*, size_t>& optins() {
  static std::map<const void*, size_t> m;
  return m;
}

}  // namespace detail
}  // namespace reid_emu

template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) > reid_emu::limits().max_smem_optin) {
    reid_emu::detail::last_error() = cudaErrorInvalidValue;
    return cudaErrorInvalidValue;
  }
  std::lock_guard<std::mutex> lock(reid_emu::detail::optin_mutex());
  reid_emu::detail::optins()[reinterpret_cast<const void*>(kernel)] = static_cast<size_t>(value);
  return cudaSuccess;
}

// ---- Device math ------------------------------------------------------------------------
// CUDA's overloads of min / max (crt/math_functions.hpp); the floating ones ignore NaN.
#define REID_EMU_MINMAX(T)                                 \
  inline T min(T a, T b) { return a < b ? a : b; }        \
  inline T max(T a, T b) { return a > b ? a : b; }
REID_EMU_MINMAX(int)
REID_EMU_MINMAX(unsigned int)
REID_EMU_MINMAX(long)
REID_EMU_MINMAX(unsigned long)
REID_EMU_MINMAX(long long)
REID_EMU_MINMAX(unsigned long long)
#undef REID_EMU_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(float a, double b) { return fmin(a, b); }
inline double max(float a, double b) { return fmax(a, b); }
inline double min(double a, float b) { return fmin(a, b); }
inline double max(double a, float b) { return fmax(a, b); }

// ---- 16-bit floating types -------------------------------------------------------------
namespace reid_emu {
namespace detail {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// float -> IEEE binary16, round to nearest even; NaN stays NaN (quiet, payload's top bits
// kept, as x86's F16C), overflow gives Inf, results below 2^-14 are subnormal.
inline uint16_t float_to_half_bits(float value) {
  uint32_t f = float_bits(value);
  const uint16_t sign = static_cast<uint16_t>((f >> 16) & 0x8000u);
  f &= 0x7fffffffu;
  if (f > 0x7f800000u) return sign | 0x7e00u | static_cast<uint16_t>((f >> 13) & 0x3ffu);  // NaN
  if (f >= 0x47800000u) return sign | 0x7c00u;  // >= 2^16: Inf (65520 <= |x| < 2^16 rounds below)
  if (f < 0x38800000u) {  // below 2^-14: subnormal or zero; let the FPU round |x| + 0.5 in the
    // binade where one unit in the last place is 2^-24 (the half subnormal step)
    const float magic = bits_float(0x3f000000u);  // 0.5: its ulp is 2^-24
    const uint32_t sum = float_bits(bits_float(f) + magic);
    return sign | static_cast<uint16_t>(sum - 0x3f000000u);
  }
  // Normal: rebias the exponent (127 -> 15), round the 13 dropped mantissa bits to even.
  const uint32_t odd = (f >> 13) & 1u;
  f += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + odd;
  return sign | static_cast<uint16_t>(f >> 13);  // a carry into the exponent gives Inf right
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return bits_float(sign | 0x7f800000u | (mantissa << 13) | (mantissa ? 0x400000u : 0u));
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float magnitude = static_cast<float>(mantissa) * bits_float(0x33800000u);
    return bits_float(sign | float_bits(magnitude));
  }
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// float -> bfloat16, round to nearest even on the 16 dropped bits; NaN stays a quiet NaN.
inline uint16_t float_to_bfloat16_bits(float value) {
  const uint32_t f = float_bits(value);
  if ((f & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((f >> 16) | 0x40u);
  return static_cast<uint16_t>((f + 0x7fffu + ((f >> 16) & 1u)) >> 16);
}
inline float bfloat16_bits_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

}  // namespace detail

// IEEE binary16 storage; arithmetic happens in float after an explicit conversion.
struct half {
  uint16_t bits = 0;
  half() = default;
  explicit half(float f) : bits(detail::float_to_half_bits(f)) {}
  explicit half(double d) : half(static_cast<float>(d)) {}  // via float, as c10::Half
  explicit operator float() const { return detail::half_bits_to_float(bits); }
  explicit operator double() const { return static_cast<double>(static_cast<float>(*this)); }
  static half from_bits(uint16_t b) {
    half h;
    h.bits = b;
    return h;
  }
};

struct bfloat16 {
  uint16_t bits = 0;
  bfloat16() = default;
  explicit bfloat16(float f) : bits(detail::float_to_bfloat16_bits(f)) {}
  explicit bfloat16(double d) : bfloat16(static_cast<float>(d)) {}
  explicit operator float() const { return detail::bfloat16_bits_to_float(bits); }
  explicit operator double() const { return static_cast<double>(static_cast<float>(*this)); }
  static bfloat16 from_bits(uint16_t b) {
    bfloat16 h;
    h.bits = b;
    return h;
  }
};
static_assert(sizeof(half) == 2 && sizeof(bfloat16) == 2, "16-bit storage");

}  // namespace reid_emu

using __half = reid_emu::half;
using __nv_bfloat16 = reid_emu::bfloat16;
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __float2half(float f) { return __half(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return static_cast<float>(b); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }

// ---- Blocks, warps, barriers ----------------------------------------------------------
namespace reid_emu {
namespace detail {

enum class Collective : int { kShuffle, kSyncwarp, kWmma };

// One warp-collective call in progress, for one mask.  Lanes deposit their value; when every
// live lane of the mask has, each reads the slot of its source lane; the last reader resets.
struct WarpGroup {
  uint32_t mask = 0;
  uint32_t arrived = 0;
  bool distributing = false;
  int readers = 0;
  Collective kind = Collective::kShuffle;
  size_t size = 0;
  const char* what = "";
  unsigned char values[32][16];
};

struct Warp {
  std::mutex m;
  std::condition_variable cv;
  uint32_t live = 0;  // lanes that exist and have not returned
  std::vector<std::unique_ptr<WarpGroup>> groups;
};

struct StaticShared {
  const void* key;
  void* data;
};

struct Block {
  uint3 index;
  dim3 dim, grid;
  int threads = 0;
  // __syncthreads*
  std::mutex barrier_m;
  std::condition_variable barrier_cv;
  int live = 0, arrived = 0;
  uint64_t generation = 0;
  const char* barrier_kind = "";
  int count = 0, result = 0, participants = 0;  // of the last completed barrier
  // warps
  std::vector<std::unique_ptr<Warp>> warps;
  // shared memory
  std::mutex shared_m;
  std::vector<StaticShared> statics;
  size_t static_bytes = 0;
  size_t dynamic_bytes = 0, smem_limit = 0;
  unsigned char* dynamic = nullptr;  // 256-byte aligned, ends at (or just before) a guard page
  uint64_t run = 0;                  // distinguishes the blocks a team runs one after the other
};

inline thread_local Block* current_block = nullptr;
inline thread_local int current_thread = 0;  // linear thread index in the block

inline Block& block() {
  if (current_block == nullptr) fail("a device function was called outside a kernel launch");
  return *current_block;
}

inline const char* where() {  // "block (x,y,z) thread (x,y,z)", for messages
  static thread_local char text[96];
  std::snprintf(text, sizeof text, "block (%u,%u,%u) thread (%u,%u,%u)", blockIdx.x, blockIdx.y, blockIdx.z,
                threadIdx.x, threadIdx.y, threadIdx.z);
  return text;
}

// __syncthreads and its reductions.  kind names the call, for mismatch and timeout messages.
inline int block_barrier(const char* kind, int predicate, int reduce) {
  Block& b = block();
  std::unique_lock<std::mutex> lock(b.barrier_m);
  if (b.arrived == 0) {
    b.barrier_kind = kind;
    b.count = 0;
  } else if (std::strcmp(b.barrier_kind, kind) != 0) {
    fail("%s: reached %s while other threads of the block wait in %s", where(), kind, b.barrier_kind);
  }
  b.count += predicate != 0;
  const uint64_t generation = b.generation;
  if (++b.arrived == b.live) {
    b.result = b.count;
    b.participants = b.arrived;
    b.arrived = 0;
    ++b.generation;
    b.barrier_cv.notify_all();
  } else if (!b.barrier_cv.wait_until(lock, deadline(), [&] { return b.generation != generation; })) {
    fail("block (%u,%u,%u): %s timed out after %g s: %d of the block's %d live threads arrived (a live thread "
         "never reached it: a barrier inside a branch some threads skip, or threads waiting at different "
         "barriers)",
         blockIdx.x, blockIdx.y, blockIdx.z, kind, timeout_seconds(), b.arrived, b.live);
  }
  const int count = b.result;
  switch (reduce) {
    case 1: return count > 0;                         // or
    case 2: return count == b.participants ? 1 : 0;  // and
    case 3: return count;                     // count
    default: return 0;
  }
}

inline bool group_complete(const WarpGroup& g, uint32_t live) { return ((g.arrived | ~live) & g.mask) == g.mask; }

// The warp-collective exchange behind every shuffle, __syncwarp and wmma call: deposits
// `size` bytes of `mine`, waits for every live lane of `mask`, then calls
// read(values, arrived) under the warp's lock.
template <typename Read>
void warp_collective(uint32_t mask, Collective kind, const char* what, const void* mine, size_t size, Read&& read) {
  Block& b = block();
  const int lane = current_thread & 31;
  Warp& w = *b.warps[current_thread >> 5];
  if (((mask >> lane) & 1u) == 0) {
    fail("%s: %s with mask 0x%08x called from lane %d, which is not in the mask", where(), what, mask, lane);
  }
  std::unique_lock<std::mutex> lock(w.m);
  WarpGroup* group = nullptr;
  for (auto& g : w.groups) {
    if (g->mask == mask) group = g.get();
  }
  if (group == nullptr) {
    w.groups.push_back(std::make_unique<WarpGroup>());
    group = w.groups.back().get();
    group->mask = mask;
  }
  WarpGroup& g = *group;
  const auto until = deadline();
  if (!w.cv.wait_until(lock, until, [&] { return !g.distributing; })) {
    fail("%s: %s with mask 0x%08x timed out after %g s waiting for the previous call to finish", where(), what, mask,
         timeout_seconds());
  }
  if (g.arrived == 0) {
    g.kind = kind;
    g.size = size;
    g.what = what;
  } else if (g.kind != kind || g.size != size || std::strcmp(g.what, what) != 0) {
    fail("%s: lanes of mask 0x%08x met in different warp-collective calls: %s and %s", where(), mask, g.what, what);
  }
  if (size > 0) std::memcpy(g.values[lane], mine, size);
  g.arrived |= 1u << lane;
  auto ready = [&] {
    if (!g.distributing && group_complete(g, w.live)) {
      g.distributing = true;
      g.readers = __builtin_popcount(g.arrived);
      w.cv.notify_all();
    }
    return g.distributing;
  };
  if (!w.cv.wait_until(lock, until, ready)) {
    fail("%s: %s with mask 0x%08x timed out after %g s: lanes 0x%08x arrived, live lanes 0x%08x (a live lane of "
         "the mask never reached it)",
         where(), what, mask, timeout_seconds(), g.arrived, w.live);
  }
  read(g.values, g.arrived);
  if (--g.readers == 0) {
    g.distributing = false;
    g.arrived = 0;
    w.cv.notify_all();
  }
}

// The thread's kernel function returned: it leaves the block barrier and its warp.
inline void thread_exit() {
  Block& b = block();
  {
    std::lock_guard<std::mutex> lock(b.barrier_m);
    --b.live;
    if (b.arrived > 0 && b.arrived == b.live) {
      b.result = b.count;
      b.participants = b.arrived;
      b.arrived = 0;
      ++b.generation;
      b.barrier_cv.notify_all();
    }
  }
  Warp& w = *b.warps[current_thread >> 5];
  std::lock_guard<std::mutex> lock(w.m);
  w.live &= ~(1u << (current_thread & 31));
  w.cv.notify_all();  // a collective may now be complete without this lane
}

// Source lane of shfl.sync (PTX ISA, "shfl.sync"): c = ((32 - width) << 8) | clamp, where
// clamp is 31 for idx / down / bfly and 0 for up; returns -1 where the source is out of
// the segment (the lane keeps its own value).
enum class ShuffleMode : int { kIdx, kUp, kDown, kXor };
inline int shuffle_source(ShuffleMode mode, int lane, unsigned b, int width) {
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    fail("%s: shuffle width %d is not a power of two in [1, 32]", where(), width);
  }
  const unsigned segmask = static_cast<unsigned>(32 - width) & 31u;
  const unsigned clamp = mode == ShuffleMode::kUp ? 0u : 31u;
  const unsigned bval = b & 31u;
  const int max_lane = static_cast<int>((static_cast<unsigned>(lane) & segmask) | (clamp & ~segmask));
  const int min_lane = static_cast<int>(static_cast<unsigned>(lane) & segmask);
  int j = 0;
  bool in_range = false;
  switch (mode) {
    case ShuffleMode::kUp: j = lane - static_cast<int>(bval); in_range = j >= max_lane; break;
    case ShuffleMode::kDown: j = lane + static_cast<int>(bval); in_range = j <= max_lane; break;
    case ShuffleMode::kXor: j = lane ^ static_cast<int>(bval); in_range = j <= max_lane; break;
    case ShuffleMode::kIdx: j = min_lane | static_cast<int>(bval & ~segmask); in_range = j <= max_lane; break;
  }
  return in_range ? j : -1;
}

template <typename T>
T shuffle(ShuffleMode mode, const char* what, uint32_t mask, T value, unsigned b, int width) {
  static_assert(std::is_arithmetic_v<T> && (sizeof(T) == 4 || sizeof(T) == 8),
                "the emulator shuffles 4- and 8-byte arithmetic types");
  const int lane = current_thread & 31;
  const int source = shuffle_source(mode, lane, b, width);
  T result = value;
  warp_collective(mask, Collective::kShuffle, what, &value, sizeof(T), [&](auto& values, uint32_t arrived) {
    if (source < 0 || source == lane) return;
    if (((mask >> source) & 1u) == 0) {
      fail("%s: %s with mask 0x%08x reads lane %d, which is not in the mask (undefined in CUDA)", where(), what,
           mask, source);
    }
    if (((arrived >> source) & 1u) == 0) {
      fail("%s: %s with mask 0x%08x reads lane %d, which has exited (undefined in CUDA)", where(), what, mask,
           source);
    }
    std::memcpy(&result, values[source], sizeof(T));
  });
  return result;
}

}  // namespace detail
}  // namespace reid_emu

inline void __syncthreads() { reid_emu::detail::block_barrier("__syncthreads", 0, 0); }
inline int __syncthreads_or(int predicate) { return reid_emu::detail::block_barrier("__syncthreads_or", predicate, 1); }
inline int __syncthreads_and(int predicate) {
  return reid_emu::detail::block_barrier("__syncthreads_and", predicate, 2);
}
inline int __syncthreads_count(int predicate) {
  return reid_emu::detail::block_barrier("__syncthreads_count", predicate, 3);
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  reid_emu::detail::warp_collective(mask, reid_emu::detail::Collective::kSyncwarp, "__syncwarp", nullptr, 0,
                                    [](auto&, uint32_t) {});
}
template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  return reid_emu::detail::shuffle(reid_emu::detail::ShuffleMode::kIdx, "__shfl_sync", mask, var,
                                   static_cast<unsigned>(src_lane), width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return reid_emu::detail::shuffle(reid_emu::detail::ShuffleMode::kUp, "__shfl_up_sync", mask, var, delta, width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return reid_emu::detail::shuffle(reid_emu::detail::ShuffleMode::kDown, "__shfl_down_sync", mask, var, delta,
                                   width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  return reid_emu::detail::shuffle(reid_emu::detail::ShuffleMode::kXor, "__shfl_xor_sync", mask, var,
                                   static_cast<unsigned>(lane_mask), width);
}

// ---- Shared memory ---------------------------------------------------------------------
namespace reid_emu {
namespace detail {

inline void check_shared_total(Block& b) {
  const DeviceLimits& l = limits();
  if (b.static_bytes > l.max_static_smem) {
    fail("block (%u,%u,%u): %zu bytes of static shared memory, more than the %zu a kernel may declare", b.index.x,
         b.index.y, b.index.z, b.static_bytes, l.max_static_smem);
  }
  if (b.static_bytes + b.dynamic_bytes > b.smem_limit) {
    fail("launch failure: %zu bytes of static plus %zu of dynamic shared memory exceed the block's limit of %zu "
         "bytes (48 KiB without cudaFuncSetAttribute's opt-in, else the device's opt-in maximum)",
         b.static_bytes, b.dynamic_bytes, b.smem_limit);
  }
}

struct StaticCacheEntry {
  uint64_t run;
  const void* key;
  void* data;
};
inline thread_local std::vector<StaticCacheEntry> static_cache;

// The block's instance of the static shared array identified by `key` (a function-local
// static of the declaring function: one per declaration and template instantiation).
template <typename Array>
Array& static_shared(const void* key) {
  Block& b = block();
  for (const auto& e : static_cache) {
    if (e.run == b.run && e.key == key) return *static_cast<Array*>(e.data);
  }
  void* data = nullptr;
  {
    std::lock_guard<std::mutex> lock(b.shared_m);
    for (const auto& s : b.statics) {
      if (s.key == key) data = s.data;
    }
    if (data == nullptr) {
      const size_t align = std::max<size_t>(alignof(Array), 16);
      data = std::aligned_alloc(align, (sizeof(Array) + align - 1) / align * align);
      std::memset(data, 0xff, sizeof(Array));
      b.statics.push_back({key, data});
      b.static_bytes += sizeof(Array);
      check_shared_total(b);
    }
  }
  static_cache.push_back({b.run, key, data});
  return *static_cast<Array*>(data);
}

inline unsigned char* dynamic_shared(size_t align) {
  Block& b = block();
  if (align > 256 || (reinterpret_cast<uintptr_t>(b.dynamic) % align) != 0) {
    fail("%s: dynamic shared memory aligned to %zu bytes: the emulator aligns it to 256", where(), align);
  }
  return b.dynamic;
}

}  // namespace detail
}  // namespace reid_emu

#define REID_EMU_SHARED_ARRAY(type, name, extents)                         \
  static constexpr char reid_emu_shared_key_##name = 0;                    \
  using reid_emu_shared_type_##name = type extents;                        \
  reid_emu_shared_type_##name& name =                                      \
      ::reid_emu::detail::static_shared<reid_emu_shared_type_##name>(&reid_emu_shared_key_##name)

#define REID_EMU_EXTERN_SHARED(type, name, align) \
  type* const name = reinterpret_cast<type*>(::reid_emu::detail::dynamic_shared(align))

// ---- Device assertion -------------------------------------------------------------------
namespace reid_emu {
namespace detail {
[[noreturn]] inline void device_assert_failed(const char* condition, const char* message, const char* file, int line) {
  fail("%s:%d: %s: device assertion `%s` failed: %s", file, line, where(), condition, message);
}
}  // namespace detail
}  // namespace reid_emu
#define REID_EMU_DEVICE_ASSERT(cond, msg) \
  ((cond) ? (void)0 : ::reid_emu::detail::device_assert_failed(#cond, (msg), __FILE__, __LINE__))

// ---- Launch -------------------------------------------------------------------------------
namespace reid_emu {
namespace detail {

constexpr size_t kDynamicAlign = 256;
constexpr unsigned char kCanary = 0xa5;

inline size_t page_size() {
  static const size_t size = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return size;
}

// Guard pages of the teams' dynamic shared memory, for the SIGSEGV message.
constexpr int kMaxTeams = 64;
inline std::atomic<uintptr_t> guard_pages[kMaxTeams][2];

inline void on_segv(int signal, siginfo_t* info, void*) {
  const uintptr_t address = reinterpret_cast<uintptr_t>(info->si_addr);
  bool in_guard = false;
  for (auto& pair : guard_pages) {
    for (auto& g : pair) {
      const uintptr_t page = g.load(std::memory_order_relaxed);
      if (page != 0 && address >= page && address < page + page_size()) in_guard = true;
    }
  }
  const char* text = in_guard ? "reid_emu error: an access past the dynamic shared memory the launch asked for "
                                "(it hit the guard page after the block's region)\n"
                              : "reid_emu error: segmentation fault (not in a shared-memory guard page)\n";
  ssize_t ignored = write(2, text, std::strlen(text));
  (void)ignored;
  ::signal(signal, SIG_DFL);  // return re-executes the access: the default action ends the process
}

inline void install_segv_handler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction action {};
    action.sa_sigaction = on_segv;
    action.sa_flags = SA_SIGINFO;
    sigemptyset(&action.sa_mask);
    sigaction(SIGSEGV, &action, nullptr);
  });
}

// A region of `bytes` bytes whose end touches a PROT_NONE page (and whose start is preceded
// by one); the slack that 256-byte alignment leaves is filled with a canary.
struct DynamicRegion {
  unsigned char* map = nullptr;
  size_t map_bytes = 0, bytes = 0;
  unsigned char* start = nullptr;
  int team = 0;

  void prepare(size_t wanted) {
    if (map == nullptr || wanted != bytes) {
      release();
      const size_t page = page_size();
      const size_t inner = (wanted + kDynamicAlign + page - 1) / page * page;
      map_bytes = inner + 2 * page;
      void* p = mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) fail("mmap of %zu bytes for dynamic shared memory failed", map_bytes);
      map = static_cast<unsigned char*>(p);
      unsigned char* high_guard = map + page + inner;
      if (mprotect(map, page, PROT_NONE) != 0 || mprotect(high_guard, page, PROT_NONE) != 0) fail("mprotect failed");
      bytes = wanted;
      start = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(high_guard) - wanted) / kDynamicAlign *
                                               kDynamicAlign);
      guard_pages[team][0].store(reinterpret_cast<uintptr_t>(map), std::memory_order_relaxed);
      guard_pages[team][1].store(reinterpret_cast<uintptr_t>(high_guard), std::memory_order_relaxed);
    }
    const size_t page = page_size();
    std::memset(map + page, kCanary, static_cast<size_t>(start - (map + page)));
    std::memset(start, 0xff, bytes);
    std::memset(start + bytes, kCanary, static_cast<size_t>(map + map_bytes - page - (start + bytes)));
  }

  void check(const Block& b) const {
    const size_t page = page_size();
    for (const unsigned char* p = map + page; p < start; ++p) {
      if (*p != kCanary) fail("block (%u,%u,%u) wrote before the start of its dynamic shared memory", b.index.x,
                              b.index.y, b.index.z);
    }
    for (const unsigned char* p = start + bytes; p < map + map_bytes - page; ++p) {
      if (*p != kCanary) {
        fail("block (%u,%u,%u) wrote past the end of its %zu bytes of dynamic shared memory", b.index.x, b.index.y,
             b.index.z, bytes);
      }
    }
  }

  void release() {
    if (map != nullptr) munmap(map, map_bytes);
    map = nullptr;
  }
};

// A pooled OS thread that runs one CUDA thread of a block at a time.
struct Worker {
  std::mutex m;
  std::condition_variable cv;
  uint64_t posted = 0, taken = 0;
  std::function<void()> job;
};

// The threads and state of one block slot; REID_EMU_CONCURRENT_BLOCKS teams run at a time.
struct Team {
  int index = 0;
  Block block;
  DynamicRegion region;
  std::vector<std::unique_ptr<Worker>> workers;
  std::mutex m;
  std::condition_variable cv;
  int remaining = 0;

  void grow(int threads) {
    while (static_cast<int>(workers.size()) < threads) {
      workers.push_back(std::make_unique<Worker>());
      start_worker(workers.back().get());
    }
  }

  // A detached pthread with a 1 MiB stack (std::thread's 8 MiB times 2 x 1024 threads is a lot
  // of address space), pooled for the life of the process.
  static void start_worker(Worker* w) {
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 1u << 20);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t thread;
    if (pthread_create(&thread, &attr, &worker_loop, w) != 0) fail("could not start a worker thread");
    pthread_attr_destroy(&attr);
  }

  static void* worker_loop(void* arg) {
    Worker* w = static_cast<Worker*>(arg);
    for (;;) {
      std::function<void()> job;
      {
        std::unique_lock<std::mutex> lock(w->m);
        w->cv.wait(lock, [&] { return w->posted != w->taken; });
        ++w->taken;
        job = std::move(w->job);
      }
      job();
    }
    return nullptr;
  }

  // Runs one block: every thread a worker, concurrently; returns when all have returned.
  void run_block(uint3 index, dim3 grid, dim3 dim, size_t dynamic_bytes, size_t smem_limit,
                 const std::function<void()>& body) {
    static std::atomic<uint64_t> runs{0};
    const int threads = static_cast<int>(dim.x * dim.y * dim.z);
    Block& b = block;
    b.index = index;
    b.grid = grid;
    b.dim = dim;
    b.threads = threads;
    b.live = threads;
    b.arrived = 0;
    b.run = ++runs;
    b.static_bytes = 0;
    b.dynamic_bytes = dynamic_bytes;
    b.smem_limit = smem_limit;
    const int warps = (threads + 31) / 32;
    while (static_cast<int>(b.warps.size()) < warps) b.warps.push_back(std::make_unique<Warp>());
    for (int w = 0; w < warps; ++w) {
      const int lanes = std::min(32, threads - 32 * w);
      b.warps[w]->live = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
      b.warps[w]->groups.clear();
    }
    region.team = index_in_pool();
    region.prepare(dynamic_bytes);
    b.dynamic = region.start;
    grow(threads);
    remaining = threads;
    for (int t = 0; t < threads; ++t) {
      Worker& w = *workers[t];
      std::lock_guard<std::mutex> lock(w.m);
      w.job = [this, t, index, grid, dim, &body] {
        current_block = &block;
        current_thread = t;
        threadIdx = uint3{t % dim.x, (t / dim.x) % dim.y, t / (dim.x * dim.y)};
        blockIdx = index;
        blockDim = dim;
        gridDim = grid;
        static_cache.clear();
        body();
        thread_exit();
        current_block = nullptr;
        std::lock_guard<std::mutex> done(m);
        if (--remaining == 0) cv.notify_all();
      };
      ++w.posted;
      w.cv.notify_one();
    }
    {
      std::unique_lock<std::mutex> lock(m);
      cv.wait(lock, [&] { return remaining == 0; });
    }
    region.check(b);
    for (auto& s : b.statics) std::free(s.data);
    b.statics.clear();
  }

  int index_in_pool() const { return index; }
};

inline std::vector<std::unique_ptr<Team>>& teams() {
  static auto* pool = new std::vector<std::unique_ptr<Team>>();  // never destroyed: workers are detached
  return *pool;
}

inline int concurrent_blocks() {
  static const int n = std::clamp(static_cast<int>(env_double("REID_EMU_CONCURRENT_BLOCKS", 2)), 1, kMaxTeams);
  return n;
}

[[noreturn]] inline void launch_failure(cudaError_t code, const std::string& what) {
  last_error() = code;
  throw launch_error(code, what);
}

inline void check_launch(const void* kernel, dim3 grid, dim3 block, size_t dynamic_bytes, size_t* smem_limit) {
  const DeviceLimits& l = limits();
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  char text[512];
  if (block.x == 0 || block.y == 0 || block.z == 0 || grid.x == 0 || grid.y == 0 || grid.z == 0) {
    std::snprintf(text, sizeof text, "launch with an empty grid (%u,%u,%u) or block (%u,%u,%u)", grid.x, grid.y,
                  grid.z, block.x, block.y, block.z);
    launch_failure(cudaErrorInvalidConfiguration, text);
  }
  if (threads > l.max_threads || block.x > l.max_block_x || block.y > l.max_block_y || block.z > l.max_block_z) {
    std::snprintf(text, sizeof text, "block (%u,%u,%u) exceeds the limits (%u threads; x, y <= %u, z <= %u)", block.x,
                  block.y, block.z, l.max_threads, l.max_block_x, l.max_block_z);
    launch_failure(cudaErrorInvalidConfiguration, text);
  }
  if (grid.x > l.max_grid_x || grid.y > l.max_grid_yz || grid.z > l.max_grid_yz) {
    std::snprintf(text, sizeof text, "grid (%u,%u,%u) exceeds the limits (x < 2^31, y and z <= %u)", grid.x, grid.y,
                  grid.z, l.max_grid_yz);
    launch_failure(cudaErrorInvalidConfiguration, text);
  }
  // The kernel's cudaFuncAttributeMaxDynamicSharedMemorySize: 48 KiB, or the opt-in value;
  // static + dynamic may then reach the device's opt-in maximum (checked at block start).
  size_t limit = l.default_dynamic_smem, total_limit = l.default_dynamic_smem;
  {
    std::lock_guard<std::mutex> lock(optin_mutex());
    const auto it = optins().find(kernel);
    if (it != optins().end()) {
      limit = it->second;
      total_limit = l.max_smem_optin;
    }
  }
  if (dynamic_bytes > limit) {
    std::snprintf(text, sizeof text,
                  "launch asks for %zu bytes of dynamic shared memory, more than the kernel's limit of %zu (48 KiB "
                  "unless raised with cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, "
                  "bytes), at most %zu)",
                  dynamic_bytes, limit, l.max_smem_optin);
    launch_failure(cudaErrorInvalidValue, text);
  }
  *smem_limit = total_limit;
}

inline void run_grid(const void* kernel, dim3 grid, dim3 block, size_t dynamic_bytes,
                     const std::function<void()>& body) {
  size_t smem_limit = 0;
  check_launch(kernel, grid, block, dynamic_bytes, &smem_limit);
  install_segv_handler();
  static std::mutex launch_mutex;  // one launch at a time (one default stream)
  std::lock_guard<std::mutex> launch_lock(launch_mutex);
  const unsigned long long blocks = 1ull * grid.x * grid.y * grid.z;
  const int slots = static_cast<int>(std::min<unsigned long long>(blocks, concurrent_blocks()));
  auto& pool = teams();
  while (static_cast<int>(pool.size()) < slots) {
    pool.push_back(std::make_unique<Team>());
    pool.back()->index = static_cast<int>(pool.size()) - 1;
  }
  std::atomic<unsigned long long> next{0};
  std::vector<std::thread> coordinators;
  for (int s = 0; s < slots; ++s) {
    coordinators.emplace_back([&, s] {
      for (unsigned long long i = next++; i < blocks; i = next++) {
        const uint3 index{static_cast<unsigned>(i % grid.x), static_cast<unsigned>((i / grid.x) % grid.y),
                          static_cast<unsigned>(i / (1ull * grid.x * grid.y))};
        pool[s]->run_block(index, grid, block, dynamic_bytes, smem_limit, body);
      }
    });
  }
  for (auto& c : coordinators) c.join();
}

}  // namespace detail

// kernel<<<grid, block, dynamic_smem_bytes, stream>>>(args...): runs the whole grid and
// returns when it is done (a stream is one queue; kernels never overlap here).
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t dynamic_smem_bytes, cudaStream_t, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);  // the kernel's parameters, by value
  const std::function<void()> body = [&] { std::apply(kernel, params); };
  detail::run_grid(reinterpret_cast<const void*>(kernel), grid, block, dynamic_smem_bytes, body);
}

}  // namespace reid_emu

// ---- nvcuda::wmma stub ----------------------------------------------------------------------
// Checks how the fragment API is used; computes in float in a fixed order.  NOT tensor-core
// numerics: real hardware sums in another order and precision.
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K>
struct fragment_shape;
template <int M, int N, int K>
struct fragment_shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct fragment_shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct fragment_shape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

// Every lane holds the whole tile (CUDA spreads it over the lanes in an unspecified way,
// so element-wise code over x[0 .. num_elements) means the same here).
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the wmma stub has 16x16x16 fragments only");
  static constexpr int rows = fragment_shape<Use, M, N, K>::rows, cols = fragment_shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  T x[num_elements];
  float get(int r, int c) const { return static_cast<float>(x[r * cols + c]); }
};

namespace stub {
struct Call {
  const void* ptr;
  unsigned ldm;
  int layout;
};

// A warp-collective fragment call: all 32 lanes, the same pointer / ldm / layout; ptr
// 32-byte aligned and ldm a multiple of 16 bytes, as the WMMA API requires.
inline void check_collective(const char* what, const void* ptr, unsigned ldm, size_t element_bytes, int layout) {
  using reid_emu::fail;
  if (ptr != nullptr && (reinterpret_cast<uintptr_t>(ptr) % 32) != 0) {
    fail("%s: %s: pointer %p is not 32-byte aligned", reid_emu::detail::where(), what, ptr);
  }
  if (ptr != nullptr && (ldm * element_bytes) % 16 != 0) {
    fail("%s: %s: ldm %u is not a multiple of %zu elements", reid_emu::detail::where(), what, ldm,
         16 / element_bytes);
  }
  const Call mine{ptr, ldm, layout};
  reid_emu::detail::warp_collective(
      0xffffffffu, reid_emu::detail::Collective::kWmma, what, &mine, sizeof mine, [&](auto& values, uint32_t arrived) {
        if (arrived != 0xffffffffu) fail("%s: %s needs all 32 lanes of the warp, got lanes 0x%08x",
                                         reid_emu::detail::where(), what, arrived);
        for (int lane = 0; lane < 32; ++lane) {
          Call other;
          std::memcpy(&other, values[lane], sizeof other);
          if (other.ptr != mine.ptr || other.ldm != mine.ldm || other.layout != mine.layout) {
            fail("%s: %s: lanes disagree on the pointer / ldm / layout (lane %d: %p, %u)", reid_emu::detail::where(),
                 what, lane, other.ptr, other.ldm);
          }
        }
      });
}
}  // namespace stub

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const T& value) {
  for (auto& v : f.x) v = value;
}
template <typename Use, int M, int N, int K, typename T, typename Layout, typename V,
          typename = std::enable_if_t<!std::is_same_v<T, V>>>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const V& value) {
  for (auto& v : f.x) v = static_cast<T>(value);
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* ptr, unsigned ldm) {
  static_assert(std::is_same_v<Layout, row_major> || std::is_same_v<Layout, col_major>,
                "matrix_a / matrix_b fragments have a layout");
  constexpr bool row = std::is_same_v<Layout, row_major>;
  stub::check_collective("wmma::load_matrix_sync", ptr, ldm, sizeof(T), row ? 0 : 1);
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < F::rows; ++r) {
    for (int c = 0; c < F::cols; ++c) f.x[r * F::cols + c] = row ? ptr[r * ldm + c] : ptr[c * ldm + r];
  }
}
template <int M, int N, int K>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* ptr, unsigned ldm, layout_t layout) {
  stub::check_collective("wmma::load_matrix_sync", ptr, ldm, sizeof(float), layout);
  for (int r = 0; r < M; ++r) {
    for (int c = 0; c < N; ++c) f.x[r * N + c] = layout == mem_row_major ? ptr[r * ldm + c] : ptr[c * ldm + r];
  }
}

// d = a b + c, each product in float, summed in k order (not the tensor cores' order).
template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  stub::check_collective("wmma::mma_sync", nullptr, 0, 1, 0);
  float out[M * N];
  for (int r = 0; r < M; ++r) {
    for (int col = 0; col < N; ++col) {
      float sum = c.x[r * N + col];
      for (int k = 0; k < K; ++k) sum += a.get(r, k) * b.get(k, col);
      out[r * N + col] = sum;
    }
  }
  std::memcpy(d.x, out, sizeof out);
}

// One lane (lane 0) writes the tile, between two synchronisations of the warp: 32 lanes
// writing the same values would be a race, and lanes reading the tile right after a
// store_matrix_sync see it as on hardware after the store's own synchronisation.
template <int M, int N, int K>
void store_matrix_sync(float* ptr, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  stub::check_collective("wmma::store_matrix_sync", ptr, ldm, sizeof(float), layout);
  if ((reid_emu::detail::current_thread & 31) == 0) {
    for (int r = 0; r < M; ++r) {
      for (int c = 0; c < N; ++c) (layout == mem_row_major ? ptr[r * ldm + c] : ptr[c * ldm + r]) = f.x[r * N + c];
    }
  }
  __syncwarp();
}

}  // namespace wmma
}  // namespace nvcuda
