// Self-test of the CUDA emulator (cuda_emu.h), driven by tests/test_emu_selftest.py.
// `emu_selftest IN OUT`: IN holds "case" (the case name as uint8 bytes) and its inputs.
// Cases that must fail (an error the emulator reports) abort the process; the driver
// checks the message.
#include <atomic>
#include <chrono>
#include <string>
#include <thread>

#include "cuda_emu.h"
#include "tensor_io.h"

using reid_emu::io::Archive;

namespace {

constexpr int kWidths[] = {1, 2, 4, 8, 16, 32};
constexpr int kModes = 4;  // idx, up, down, xor

template <typename T>
__device__ T shuffle_mode(int mode, T v, unsigned b, int width) {
  switch (mode) {
    case 0: return __shfl_sync(0xffffffffu, v, static_cast<int>(b), width);
    case 1: return __shfl_up_sync(0xffffffffu, v, b, width);
    case 2: return __shfl_down_sync(0xffffffffu, v, b, width);
    default: return __shfl_xor_sync(0xffffffffu, v, static_cast<int>(b), width);
  }
}

// table[mode][width][b][lane] = the lane whose value lane `lane` received.
template <typename T>
__global__ void shuffle_table_kernel(const unsigned* bs, int nb, int32_t* table) {
  const int lane = threadIdx.x;
  for (int mode = 0; mode < kModes; ++mode) {
    for (int w = 0; w < 6; ++w) {
      for (int i = 0; i < nb; ++i) {
        const T got = shuffle_mode<T>(mode, static_cast<T>(lane + 100), bs[i], kWidths[w]);
        table[((mode * 6 + w) * nb + i) * 32 + lane] = static_cast<int32_t>(got) - 100;
      }
    }
  }
}

template <typename T>
void shuffle_table(const Archive& in, Archive& out, const std::string& name) {
  const auto& b = in.get("b_" + name);
  const int nb = static_cast<int>(b.numel());
  std::vector<unsigned> bs(b.data<int64_t>(), b.data<int64_t>() + nb);
  std::vector<int32_t> table(kModes * 6 * nb * 32, -1);
  reid_emu::launch(&shuffle_table_kernel<T>, dim3(1), dim3(32), 0, nullptr, bs.data(), nb, table.data());
  out.add<int32_t>("table_" + name, {kModes, 6, nb, 32}, table.data());
}

// Warp 0 reduces in two 16-lane halves with partial masks; warp 1 only waits at the
// barrier (the 1-row soft_warp shape: shuffles in one warp, nothing in the others).
__global__ void partial_mask_kernel(int32_t* out) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (warp == 0) {
    const unsigned mask = lane < 16 ? 0x0000ffffu : 0xffff0000u;
    int v = lane;
    for (int offset = 8; offset > 0; offset >>= 1) v += __shfl_xor_sync(mask, v, offset, 16);
    out[lane] = v;
    if (lane < 8) {  // a third, smaller group in the same warp, while lanes 8..31 go on
      int u = lane * 10;
      for (int offset = 4; offset > 0; offset >>= 1) u += __shfl_down_sync(0x000000ffu, u, offset, 8);
      out[32 + lane] = u;
    }
    __syncwarp(0xffffffffu);
  }
  __syncthreads();
  if (warp == 1) out[64 + lane] = out[lane] + 1;  // after the barrier: no race
}

__global__ void out_of_mask_kernel(int32_t* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_sync(0x0000ffffu, static_cast<int>(threadIdx.x), 20);
}

__global__ void caller_not_in_mask_kernel(int32_t* out) {
  // every lane reads itself, so lane 0 calling with a mask that lacks it is the only error
  out[threadIdx.x] = __shfl_sync(0xfffffffeu, static_cast<int>(threadIdx.x), static_cast<int>(threadIdx.x));
}

__global__ void exited_source_kernel(int32_t* out) {
  if (threadIdx.x >= 16) return;  // lanes 16..31 exit; reading one of them is undefined
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, static_cast<int>(threadIdx.x), 8);
}

// Thread 3 never reaches the barrier and stays alive (it waits for a flag the others set
// after the barrier): a deadlock on a GPU, a timeout error here.
__global__ void skip_barrier_kernel(std::atomic<int>* flag) {
  if (threadIdx.x == 3) {
    while (flag->load() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    return;
  }
  __syncthreads();
  flag->store(1);
}

// Half of the threads return before the barriers: the rest synchronise among themselves.
__global__ void reductions_kernel(int32_t* out) {
  const int t = threadIdx.x;
  if (t >= 48) return;
  const int any = __syncthreads_or(t == 17);
  const int all = __syncthreads_and(t < 100);
  const int none_all = __syncthreads_and(t != 5);
  const int count = __syncthreads_count(t % 3 == 0);
  if (t == 0) {
    out[0] = any;
    out[1] = all;
    out[2] = none_all;
    out[3] = count;
  }
}

__global__ void dynamic_access_kernel(int64_t index, int write, int32_t* out) {
  REID_EMU_EXTERN_SHARED(unsigned char, smem, 16);
  if (threadIdx.x == 0) {
    if (write) smem[index] = 1;
    else out[blockIdx.x] = smem[index];
  }
}

__global__ void shared_nan_kernel(float* out_f, double* out_d, float* out_dyn, int32_t* out_h) {
  REID_EMU_SHARED_ARRAY(float, sf, [4][16]);
  REID_EMU_SHARED_ARRAY(double, sd, [8]);
  REID_EMU_SHARED_ARRAY(reid_emu::half, sh, [8]);
  REID_EMU_EXTERN_SHARED(float, dyn, 128);
  const int t = threadIdx.x;
  const int b = blockIdx.x;
  out_f[64 * b + t] = sf[t / 16][t % 16];
  if (t < 8) {
    out_d[8 * b + t] = sd[t];
    out_h[8 * b + t] = sh[t].bits;
  }
  out_dyn[64 * b + t] = dyn[t];
}

// Same static array seen by every thread of a block, one instance per block.
__global__ void shared_instance_kernel(int32_t* out) {
  REID_EMU_SHARED_ARRAY(int, cell, [1]);
  if (threadIdx.x == 0) cell[0] = static_cast<int>(blockIdx.x) * 1000;
  __syncthreads();
  if (threadIdx.x == 31) out[blockIdx.x] = cell[0] + 7;
}

__global__ void big_dynamic_kernel(int64_t bytes, int32_t* out) {
  REID_EMU_EXTERN_SHARED(unsigned char, smem, 16);
  for (int64_t i = threadIdx.x; i < bytes; i += blockDim.x) smem[i] = static_cast<unsigned char>(i);
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t sum = 0;
    for (int64_t i = 0; i < bytes; ++i) sum += smem[i];
    out[blockIdx.x] = static_cast<int32_t>(sum);
  }
}

__global__ void static_plus_dynamic_kernel(int32_t* out) {
  REID_EMU_SHARED_ARRAY(float, big, [4096]);  // 16 KiB
  REID_EMU_EXTERN_SHARED(float, dyn, 16);
  big[threadIdx.x] = 1.0f;
  dyn[threadIdx.x] = 2.0f;
  out[0] = 0;
}

// Thread t writes shared[t] and reads its neighbour's cell: a race without the barrier.
template <bool kBarrier>
__global__ void shared_race_kernel(int32_t* out) {
  REID_EMU_SHARED_ARRAY(int, cells, [64]);
  const int t = threadIdx.x;
  cells[t] = t;
  if (kBarrier) __syncthreads();
  out[64 * blockIdx.x + t] = cells[(t + 1) % 64];
}

// Every block adds to the same global counter: a race between blocks.
__global__ void global_race_kernel(int32_t* counter) {
  if (threadIdx.x == 0) counter[0] += 1;
}

__global__ void device_assert_kernel(int32_t* out) {
  REID_EMU_DEVICE_ASSERT(threadIdx.x != 7, "thread 7 is not welcome");
  out[threadIdx.x] = 1;
}

// One 16x16x16 product through the wmma stub: A col-major, B row-major (soft_warp's use).
__global__ void wmma_kernel(const __half* a, const __half* b, float* c, int offset, int lanes) {
  namespace wmma = nvcuda::wmma;
  if (static_cast<int>(threadIdx.x) >= lanes) return;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::col_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  wmma::load_matrix_sync(fa, a + offset, 16);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(c, acc, 16, wmma::mem_row_major);
}

std::string launch_message(const std::function<void()>& f) {
  try {
    f();
  } catch (const reid_emu::launch_error& e) {
    return e.what();
  }
  return "";
}

void add_text(Archive& out, const std::string& name, const std::string& text) {
  out.add<uint8_t>(name, {static_cast<int64_t>(text.size())}, reinterpret_cast<const uint8_t*>(text.data()));
}

void run_case(const std::string& name, const Archive& in, Archive& out) {
  std::vector<int32_t> buffer(256, -1);
  if (name == "shuffle_table") {
    shuffle_table<int>(in, out, "int");
    shuffle_table<unsigned>(in, out, "unsigned");
    shuffle_table<float>(in, out, "float");
    shuffle_table<double>(in, out, "double");
    shuffle_table<long long>(in, out, "longlong");
  } else if (name == "partial_mask") {
    reid_emu::launch(&partial_mask_kernel, dim3(1), dim3(64), 0, nullptr, buffer.data());
    out.add<int32_t>("out", {96}, buffer.data());
  } else if (name == "out_of_mask") {
    reid_emu::launch(&out_of_mask_kernel, dim3(1), dim3(32), 0, nullptr, buffer.data());
  } else if (name == "caller_not_in_mask") {
    reid_emu::launch(&caller_not_in_mask_kernel, dim3(1), dim3(32), 0, nullptr, buffer.data());
  } else if (name == "exited_source") {
    reid_emu::launch(&exited_source_kernel, dim3(1), dim3(32), 0, nullptr, buffer.data());
  } else if (name == "skip_barrier") {
    std::atomic<int> flag{0};
    reid_emu::launch(&skip_barrier_kernel, dim3(1), dim3(64), 0, nullptr, &flag);
  } else if (name == "reductions") {
    reid_emu::launch(&reductions_kernel, dim3(1), dim3(96), 0, nullptr, buffer.data());
    out.add<int32_t>("out", {4}, buffer.data());
  } else if (name == "dynamic_access") {
    const int64_t bytes = static_cast<int64_t>(in.get("bytes").scalar());
    const int64_t index = static_cast<int64_t>(in.get("index").scalar());
    const int write = static_cast<int>(in.get("write").scalar());
    reid_emu::launch(&dynamic_access_kernel, dim3(2), dim3(32), static_cast<size_t>(bytes), nullptr, index, write,
                     buffer.data());
    out.add<int32_t>("out", {2}, buffer.data());
  } else if (name == "shared_nan") {
    std::vector<float> f(3 * 64), dyn(3 * 64);
    std::vector<double> d(3 * 8);
    std::vector<int32_t> h(3 * 8);
    reid_emu::launch(&shared_nan_kernel, dim3(3), dim3(64), 64 * sizeof(float), nullptr, f.data(), d.data(),
                     dyn.data(), h.data());
    out.add<float>("static_float", {3 * 64}, f.data());
    out.add<double>("static_double", {3 * 8}, d.data());
    out.add<float>("dynamic_float", {3 * 64}, dyn.data());
    out.add<int32_t>("static_half_bits", {3 * 8}, h.data());
  } else if (name == "shared_instance") {
    reid_emu::launch(&shared_instance_kernel, dim3(5), dim3(64), 0, nullptr, buffer.data());
    out.add<int32_t>("out", {5}, buffer.data());
  } else if (name == "smem_limits") {
    // Without the opt-in: over 48 KiB is refused.
    add_text(out, "default", launch_message([&] {
               reid_emu::launch(&big_dynamic_kernel, dim3(1), dim3(128), 50000, nullptr, int64_t{50000},
                                buffer.data());
             }));
    const cudaError_t after_refusal = cudaGetLastError();
    const cudaError_t cleared = cudaGetLastError();
    // With the opt-in: runs, and every byte is usable.
    const cudaError_t set = cudaFuncSetAttribute(&big_dynamic_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 100000);
    add_text(out, "optin", launch_message([&] {
               reid_emu::launch(&big_dynamic_kernel, dim3(2), dim3(128), 100000, nullptr, int64_t{100000},
                                buffer.data());
             }));
    // Above the opt-in value, and an opt-in above the device maximum.
    add_text(out, "above_optin", launch_message([&] {
               reid_emu::launch(&big_dynamic_kernel, dim3(1), dim3(128), 100001, nullptr, int64_t{100001},
                                buffer.data() + 2);
             }));
    const cudaError_t too_big = cudaFuncSetAttribute(&big_dynamic_kernel,
                                                     cudaFuncAttributeMaxDynamicSharedMemorySize, 300000);
    const int32_t codes[4] = {after_refusal, cleared, set, too_big};
    out.add<int32_t>("codes", {4}, codes);
    out.add<int32_t>("sum", {2}, buffer.data());
    // Launch configuration limits.
    add_text(out, "threads", launch_message([&] {
               reid_emu::launch(&global_race_kernel, dim3(1), dim3(1025), 0, nullptr, buffer.data());
             }));
    add_text(out, "grid_y", launch_message([&] {
               reid_emu::launch(&global_race_kernel, dim3(1, 65536), dim3(32), 0, nullptr, buffer.data());
             }));
    add_text(out, "block_z", launch_message([&] {
               reid_emu::launch(&global_race_kernel, dim3(1), dim3(1, 1, 65), 0, nullptr, buffer.data());
             }));
  } else if (name == "static_plus_dynamic") {
    reid_emu::launch(&static_plus_dynamic_kernel, dim3(1), dim3(32), 40 * 1024, nullptr, buffer.data());
  } else if (name == "shared_race") {
    reid_emu::launch(&shared_race_kernel<false>, dim3(2), dim3(64), 0, nullptr, buffer.data());
  } else if (name == "shared_race_fixed") {
    reid_emu::launch(&shared_race_kernel<true>, dim3(4), dim3(64), 0, nullptr, buffer.data());
    out.add<int32_t>("out", {4 * 64}, buffer.data());
  } else if (name == "global_race") {
    buffer[0] = 0;
    reid_emu::launch(&global_race_kernel, dim3(8), dim3(32), 0, nullptr, buffer.data());
  } else if (name == "device_assert") {
    reid_emu::launch(&device_assert_kernel, dim3(1), dim3(32), 0, nullptr, buffer.data());
  } else if (name == "conversions") {
    std::vector<float> half_to_float(65536), bf16_to_float(65536);
    for (int i = 0; i < 65536; ++i) {
      half_to_float[i] = __half2float(reid_emu::half::from_bits(static_cast<uint16_t>(i)));
      bf16_to_float[i] = __bfloat162float(reid_emu::bfloat16::from_bits(static_cast<uint16_t>(i)));
    }
    const auto& sample = in.get("floats");
    const float* f = sample.data<float>();
    std::vector<int32_t> to_half(sample.numel()), to_bf16(sample.numel());
    for (int64_t i = 0; i < sample.numel(); ++i) {
      to_half[i] = __float2half(f[i]).bits;
      to_bf16[i] = __float2bfloat16(f[i]).bits;
    }
    const auto& doubles = in.get("doubles");
    std::vector<int32_t> double_to_half(doubles.numel());
    for (int64_t i = 0; i < doubles.numel(); ++i) double_to_half[i] = reid_emu::half(doubles.data<double>()[i]).bits;
    out.add<float>("half_to_float", {65536}, half_to_float.data());
    out.add<float>("bf16_to_float", {65536}, bf16_to_float.data());
    out.add<int32_t>("float_to_half", {sample.numel()}, to_half.data());
    out.add<int32_t>("float_to_bf16", {sample.numel()}, to_bf16.data());
    out.add<int32_t>("double_to_half", {doubles.numel()}, double_to_half.data());
  } else if (name == "math") {
    // CUDA's min / max: float and double ignore a NaN operand (fminf / fmaxf), integers compare
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const double dnan = std::numeric_limits<double>::quiet_NaN();
    const double values[] = {min(nan, 1.0f), max(2.0f, nan), min(dnan, -1.0), max(dnan, 3.0), min(1.5f, 0.5f),
                             max(1.5, 0.5), static_cast<double>(max(int64_t{-5}, int64_t{1} << 40)),
                             static_cast<double>(min(7u, 3u)), static_cast<double>(max(-2, -9)),
                             min(2.0f, 1.0), expf(0.0f) + logf(1.0f) + sqrtf(4.0f), isnan(nan) ? 1.0 : 0.0,
                             isinf(-INFINITY) ? 1.0 : 0.0};
    out.add<double>("values", {static_cast<int64_t>(sizeof values / sizeof values[0])}, values);
  } else if (name == "wmma" || name == "wmma_misaligned" || name == "wmma_partial") {
    const auto& a = in.get("a");
    const auto& b = in.get("b");
    // 32-byte aligned copies (the extra room lets wmma_misaligned shift A by one element).
    alignas(32) static __half as[16 * 16 + 16], bs[16 * 16];
    alignas(32) static float cs[16 * 16];
    std::memcpy(as, a.data<reid_emu::half>(), 512);
    std::memcpy(bs, b.data<reid_emu::half>(), 512);
    const int offset = name == "wmma_misaligned" ? 1 : 0;
    const int lanes = name == "wmma_partial" ? 16 : 32;
    reid_emu::launch(&wmma_kernel, dim3(1), dim3(32), 0, nullptr, static_cast<const __half*>(as),
                     static_cast<const __half*>(bs), static_cast<float*>(cs), offset, lanes);
    out.add<float>("c", {16, 16}, cs);
  } else {
    throw std::runtime_error("unknown self-test case '" + name + "'");
  }
}

}  // namespace

int main(int argc, char** argv) {
  return reid_emu::io::harness_main(argc, argv, [](const Archive& in, Archive& out) {
    const auto& name = in.get("case");
    run_case(std::string(name.data<uint8_t>(), name.data<uint8_t>() + name.numel()), in, out);
  });
}
