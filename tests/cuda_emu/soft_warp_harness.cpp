// Emulated-CUDA harness of soft_warp (csrc/cmalign/soft_warp_kernels.cuh), driven by
// tests/test_emu_soft_warp.py.  It calls the launch functions soft_warp_cuda.cu calls, with
// the launch options built the way soft_warp_cuda.cu builds them, on host arrays.
//
// Input: "cases" and, per case i, "c<i>/kind" (text):
//   "fwd": "c<i>/query" (N, C, Lq), "c<i>/key" (N, C, Lk), "c<i>/value" (N, Cv, Lk), one
//          floating dtype; "c<i>/temperature"; "c<i>/max_rows_env" and "c<i>/tensor_cores_env"
//          (text: what REID_KERNELS_SOFT_WARP_MAX_ROWS / _TENSOR_CORES would hold, parsed by
//          the header's own env parsers); "c<i>/max_smem" (the device's opt-in shared memory
//          per block, bytes).
//          Output: "c<i>/out" (N, Cv, Lq), "c<i>/lse" (N, Lq) float32, "c<i>/rows" (3: rows per
//          block of the forward, backward kernel A, backward kernel B) and "c<i>/smem" (3:
//          their dynamic shared memory, bytes).
//   "bwd": as "fwd" plus "c<i>/grad_out" (N, Cv, Lq): runs the forward, then the backward on
//          its output (as autograd does).  Output adds "c<i>/grad_query", "c<i>/grad_key",
//          "c<i>/grad_value" and "c<i>/lse_acc" (the backward's recomputed lse, acc dtype).
//   "offsets": the 64-bit offset helpers at sizes beyond 2^31 (nothing is allocated):
//          "c<i>/sample_args" (k, 3) int64 rows (n, rows, cols) -> "c<i>/sample_offset" (k);
//          "c<i>/block_args" (k, 2) rows (block, rows) -> "c<i>/block_first_row" (k);
//          "c<i>/slab_args" (k, 4) rows (cols, element bytes, max_smem, max_rows) ->
//          "c<i>/slab_rows" (k): rows_per_block, "c<i>/slab_smem" (k): that slab's bytes.
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "cmalign/soft_warp_kernels.cuh"
#include "tensor_io.h"

namespace {

using reid_emu::io::Archive;
using reid_emu::io::Array;
using reid_emu::io::DType;
namespace sw = reid_kernels::cmalign_cuda;

std::string text_of(const Array& a) {
  const auto* bytes = a.data<uint8_t>();
  return std::string(bytes, bytes + a.numel());
}

// soft_warp_cuda.cu's CheckLaunch, with the emulator's error state.
struct CheckLaunch {
  void operator()() const { check(cudaGetLastError(), "kernel launch"); }
  void operator()(cudaError_t error) const { check(error, "cudaFuncSetAttribute"); }
  static void check(cudaError_t error, const char* what) {
    if (error != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(error));
  }
};

// soft_warp_cuda.cu's launch_options(), with the case's env values and device limit.
sw::LaunchOptions options_of(const Archive& in, const std::string& p) {
  sw::LaunchOptions options;
  options.max_smem_optin = static_cast<size_t>(in.get(p + "max_smem").scalar());
  const std::string max_rows = text_of(in.get(p + "max_rows_env"));
  options.max_rows = sw::max_rows_from_env_value(max_rows.c_str());
  if (options.max_rows == 0) throw std::runtime_error(std::string(sw::kMaxRowsEnv) + ": bad value '" + max_rows + "'");
  options.tensor_cores = sw::tensor_cores_from_env_value(text_of(in.get(p + "tensor_cores_env")).c_str());
  return options;
}

// An output array of `shape` in T, every byte 0xFF (NaN): an element no thread writes shows.
// (main reserves out.arrays, so the returned pointer stays valid while more are added.)
template <typename T>
T* add_output(Archive& out, const std::string& name, std::vector<int64_t> shape) {
  Array& a = out.add(name, reid_emu::io::dtype_of<T>(), std::move(shape));
  std::fill(a.bytes.begin(), a.bytes.end(), static_cast<unsigned char>(0xff));
  return a.data<T>();
}

template <typename T>
std::vector<T> nan_filled(int64_t n) {
  return std::vector<T>(static_cast<size_t>(n), std::numeric_limits<T>::quiet_NaN());
}

template <typename scalar_t>
void run_soft_warp(const Archive& in, Archive& out, const std::string& p, bool backward) {
  using acc_t = reid_kernels::device::acc_type_t<scalar_t>;
  const Array& query = in.get(p + "query");
  const Array& key = in.get(p + "key");
  const Array& value = in.get(p + "value");
  const sw::SoftWarpMaps<scalar_t> m{query.data<scalar_t>(), key.data<scalar_t>(), value.data<scalar_t>(),
                                     query.shape[0],         query.shape[1],       value.shape[1],
                                     query.shape[2],         key.shape[2]};
  if (m.N == 0 || m.Lq == 0 || m.Lk == 0) throw std::runtime_error("empty maps are the .cu's host code, not a launch");
  const double temperature = in.get(p + "temperature").scalar();
  const sw::LaunchOptions options = options_of(in, p);
  const sw::RowsPerBlock bm = sw::soft_warp_rows_per_block<scalar_t>(options, m.Lq, m.Lk);
  if (bm.forward == 0 || (backward && bm.key_bwd == 0)) throw std::runtime_error("a slab does not fit");
  const size_t elem = sizeof(acc_t);
  const int64_t rows[3] = {bm.forward, bm.query_bwd, bm.key_bwd};
  const int64_t smem[3] = {static_cast<int64_t>(sw::slab_smem_bytes(bm.forward, m.Lk, elem)),
                           static_cast<int64_t>(sw::slab_smem_bytes(bm.query_bwd, m.Lk, elem)),
                           static_cast<int64_t>(sw::slab_smem_bytes(bm.key_bwd, m.Lq, elem))};
  out.add<int64_t>(p + "rows", {3}, rows);
  out.add<int64_t>(p + "smem", {3}, smem);

  std::vector<acc_t> inv_norm_q = nan_filled<acc_t>(m.N * m.Lq), inv_norm_k = nan_filled<acc_t>(m.N * m.Lk);
  scalar_t* warped = add_output<scalar_t>(out, p + "out", {m.N, m.Cv, m.Lq});
  float* lse = add_output<float>(out, p + "lse", {m.N, m.Lq});
  sw::launch_soft_warp_fwd(options, m, temperature, inv_norm_q.data(), inv_norm_k.data(), warped, lse, nullptr,
                           CheckLaunch{});
  if (!backward) return;

  const Array& grad_out = in.get(p + "grad_out");
  std::vector<acc_t> delta = nan_filled<acc_t>(m.N * m.Lq), grad_query_hat = nan_filled<acc_t>(m.N * m.C * m.Lq),
                     grad_key_hat = nan_filled<acc_t>(m.N * m.C * m.Lk);
  std::vector<acc_t> inv_norm_q2 = nan_filled<acc_t>(m.N * m.Lq), inv_norm_k2 = nan_filled<acc_t>(m.N * m.Lk);
  acc_t* lse_acc = add_output<acc_t>(out, p + "lse_acc", {m.N, m.Lq});
  const sw::SoftWarpBwdWorkspace<acc_t> workspace{inv_norm_q2.data(), inv_norm_k2.data(),   delta.data(),
                                                  lse_acc,            grad_query_hat.data(), grad_key_hat.data()};
  scalar_t* grad_query = add_output<scalar_t>(out, p + "grad_query", {m.N, m.C, m.Lq});
  scalar_t* grad_key = add_output<scalar_t>(out, p + "grad_key", {m.N, m.C, m.Lk});
  scalar_t* grad_value = add_output<scalar_t>(out, p + "grad_value", {m.N, m.Cv, m.Lk});
  sw::launch_soft_warp_bwd(options, m, temperature, grad_out.data<scalar_t>(), warped, workspace, grad_query,
                           grad_key, grad_value, nullptr, CheckLaunch{});
}

void run_offsets(const Archive& in, Archive& out, const std::string& p) {
  const Array& sample_args = in.get(p + "sample_args");
  std::vector<int64_t> sample;
  for (int64_t i = 0; i < sample_args.shape[0]; ++i) {
    const int64_t* a = sample_args.data<int64_t>() + 3 * i;
    sample.push_back(sw::sample_offset(a[0], a[1], a[2]));
  }
  out.add<int64_t>(p + "sample_offset", {static_cast<int64_t>(sample.size())}, sample.data());
  const Array& block_args = in.get(p + "block_args");
  std::vector<int64_t> first;
  for (int64_t i = 0; i < block_args.shape[0]; ++i) {
    const int64_t* a = block_args.data<int64_t>() + 2 * i;
    first.push_back(sw::block_first_row(static_cast<unsigned>(a[0]), a[1]));
  }
  out.add<int64_t>(p + "block_first_row", {static_cast<int64_t>(first.size())}, first.data());
  const Array& slab_args = in.get(p + "slab_args");
  std::vector<int64_t> slab_rows, slab_smem;
  for (int64_t i = 0; i < slab_args.shape[0]; ++i) {
    const int64_t* a = slab_args.data<int64_t>() + 4 * i;
    const int64_t cols = a[0];
    const size_t elem = static_cast<size_t>(a[1]), max_smem = static_cast<size_t>(a[2]);
    const int bm = sw::rows_per_block(cols, elem, max_smem, static_cast<int>(a[3]));
    slab_rows.push_back(bm);
    slab_smem.push_back(bm == 0 ? 0 : static_cast<int64_t>(sw::slab_smem_bytes(bm, cols, elem)));
  }
  out.add<int64_t>(p + "slab_rows", {slab_args.shape[0]}, slab_rows.data());
  out.add<int64_t>(p + "slab_smem", {slab_args.shape[0]}, slab_smem.data());
}

template <typename scalar_t>
void run_dtype(const Archive& in, Archive& out, const std::string& p, const std::string& kind) {
  run_soft_warp<scalar_t>(in, out, p, kind == "bwd");
}

}  // namespace

int main(int argc, char** argv) {
  return reid_emu::io::harness_main(argc, argv, [](const Archive& in, Archive& out) {
    const int cases = static_cast<int>(in.get("cases").scalar());
    out.arrays.reserve(static_cast<size_t>(16 * cases));
    for (int i = 0; i < cases; ++i) {
      const std::string p = "c" + std::to_string(i) + "/";
      const std::string kind = text_of(in.get(p + "kind"));
      if (kind == "offsets") {
        run_offsets(in, out, p);
        continue;
      }
      if (kind != "fwd" && kind != "bwd") throw std::runtime_error("soft_warp: unknown case kind '" + kind + "'");
      dispatch_floating(in.get(p + "query").dtype, "soft_warp: expected floating-point maps",
                        [&]<typename T>() { run_dtype<T>(in, out, p, kind); });
    }
  });
}
