// CUDA entry points of reid_kernels::soft_warp_fwd / soft_warp_bwd (LbA eqs. 1, 2, 4):
// the ATen glue -- argument checks, allocation, dtype dispatch, the current stream, the
// device's shared-memory limit, launch checks.  The kernels, the choice of rows per block
// and the launches themselves are in soft_warp_kernels.cuh (ATen-free, so the CPU
// emulator of tests/cuda_emu/ runs the same code); its header comment describes them.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <tuple>
#include <vector>

#include "cuda_utils.cuh"
#include "soft_warp_common.h"
#include "soft_warp_kernels.cuh"

namespace reid_kernels {
namespace cmalign_cuda {
namespace {

// ---- Launch options and checks -------------------------------------------------

// The env cap on the rows per block (soft_warp_kernels.cuh: kMaxRowsEnv), read per call.
int max_rows_from_env() {
  const char* value = std::getenv(kMaxRowsEnv);
  const int rows = max_rows_from_env_value(value);
  TORCH_CHECK(rows != 0, kMaxRowsEnv, ": expected 1, 8 or 32, got '", value, "'");
  return rows;
}

// This device's opt-in shared memory and the two env settings, read per call.
LaunchOptions launch_options() {
  LaunchOptions options;
  options.max_smem_optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  options.max_rows = max_rows_from_env();
  options.tensor_cores = tensor_cores_from_env_value(std::getenv(kTensorCoresEnv));
  return options;
}

// Refuses a map whose slab of one row (over `cols` positions) exceeds the device's shared memory.
void check_slab_fits(int bm, int64_t cols, size_t elem, size_t max_smem, const char* what) {
  TORCH_CHECK(bm > 0, what, ": ", cols, " positions need ", slab_smem_bytes(1, cols, elem),
              " bytes of shared memory for one row of the matching probabilities, more than this GPU's ",
              max_smem, " bytes per block; use a smaller feature map");
}

// What the launch functions call after each launch and on each cudaFuncSetAttribute result.
struct CheckLaunch {
  void operator()() const { C10_CUDA_KERNEL_LAUNCH_CHECK(); }
  void operator()(cudaError_t error) const { C10_CUDA_CHECK(error); }
};

template <typename scalar_t>
SoftWarpMaps<scalar_t> maps_of(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value) {
  return {query.data_ptr<scalar_t>(), key.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(),
          query.size(0), query.size(1), value.size(1), query.size(2), key.size(2)};
}

void check_same(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(t.device() == like.device(), name, ": expected the device of ", like_name, " (", like.device(),
              "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, ": expected the dtype of ", like_name, " (",
              like.scalar_type(), "), got ", t.scalar_type());
}

// Shape checks shared by forward and backward; returns nothing, throws with the argument's name.
void check_soft_warp_inputs(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            double temperature) {
  check_cuda_feature_map(query, "query");
  check_cuda_feature_map(key, "key");
  check_cuda_feature_map(value, "value");
  check_same(key, "key", query, "query");
  check_same(value, "value", query, "query");
  TORCH_CHECK(key.size(0) == query.size(0) && key.size(1) == query.size(1), "key: expected shape (",
              query.size(0), ", ", query.size(1), ", Lk) to match query ", query.sizes(), ", got ", key.sizes());
  TORCH_CHECK(value.size(0) == query.size(0) && value.size(2) == key.size(2), "value: expected shape (",
              query.size(0), ", Cv, ", key.size(2), ") to match query and key, got ", value.sizes());
  check_soft_warp_temperature(temperature, query.scalar_type());  // the CPU kernel's check
}

// ---- Entry points ---------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> soft_warp_fwd_cuda(const at::Tensor& query, const at::Tensor& key,
                                                      const at::Tensor& value, double temperature) {
  check_soft_warp_inputs(query, key, value, temperature);
  const c10::cuda::CUDAGuard guard(query.device());
  const int64_t N = query.size(0), Lq = query.size(2);
  const int64_t Lk = key.size(2), Cv = value.size(1);
  at::Tensor out = at::empty({N, Cv, Lq}, query.options());
  at::Tensor lse = at::empty({N, Lq}, query.options().dtype(at::kFloat));
  if (N == 0 || Lq == 0) return {out, lse};
  if (Lk == 0) {  // an empty sum: the warp is zero, logsumexp of nothing is -inf
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  const LaunchOptions options = launch_options();
  const auto acc_options = query.options().dtype(acc_dtype(query.scalar_type()));
  const at::Tensor inv_norm_q = at::empty({N, Lq}, acc_options);
  const at::Tensor inv_norm_k = at::empty({N, Lk}, acc_options);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "soft_warp_fwd_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const RowsPerBlock bm = soft_warp_rows_per_block<scalar_t>(options, Lq, Lk);
    check_slab_fits(bm.forward, Lk, sizeof(acc_t), options.max_smem_optin, "key");
    launch_soft_warp_fwd(options, maps_of<scalar_t>(query, key, value), temperature, inv_norm_q.data_ptr<acc_t>(),
                         inv_norm_k.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), lse.data_ptr<float>(), stream,
                         CheckLaunch{});
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_warp_bwd_cuda(const at::Tensor& grad_out,
                                                                  const at::Tensor& query, const at::Tensor& key,
                                                                  const at::Tensor& value, const at::Tensor& out,
                                                                  double temperature) {
  check_soft_warp_inputs(query, key, value, temperature);
  const int64_t N = query.size(0), C = query.size(1), Lq = query.size(2);
  const int64_t Lk = key.size(2), Cv = value.size(1);
  const std::vector<int64_t> out_shape{N, Cv, Lq};
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(out_shape), "grad_out: expected shape ", at::IntArrayRef(out_shape),
              ", got ", grad_out.sizes());
  TORCH_CHECK(out.sizes() == at::IntArrayRef(out_shape), "out: expected shape ", at::IntArrayRef(out_shape),
              ", got ", out.sizes());
  check_same(grad_out, "grad_out", query, "query");
  check_same(out, "out", query, "query");
  const c10::cuda::CUDAGuard guard(query.device());

  if (N == 0 || Lq == 0 || Lk == 0) {  // out is empty or identically zero: no gradient flows
    return {at::zeros_like(query), at::zeros_like(key), at::zeros_like(value)};
  }
  const LaunchOptions options = launch_options();
  // Every element of these is written by the launches.
  at::Tensor grad_query = at::empty_like(query);
  at::Tensor grad_key = at::empty_like(key);
  at::Tensor grad_value = at::empty_like(value);

  // Autograd may hand over expanded (stride-0) gradients: the kernels need contiguous maps.
  const at::Tensor dout = grad_out.contiguous();
  const at::Tensor out_c = out.contiguous();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto acc_options = query.options().dtype(acc_dtype(query.scalar_type()));
  at::Tensor inv_norm_q = at::empty({N, Lq}, acc_options);
  at::Tensor inv_norm_k = at::empty({N, Lk}, acc_options);
  at::Tensor delta = at::empty({N, Lq}, acc_options);
  // The forward's lse, recomputed by kernel A in the accumulation dtype (bitwise the
  // forward's values for float32 accumulation, exact for float64, where the forward's
  // float32 lse would be too coarse), so the backward takes no lse argument.
  at::Tensor lse_acc = at::empty({N, Lq}, acc_options);
  at::Tensor grad_query_hat = at::empty({N, C, Lq}, acc_options);
  at::Tensor grad_key_hat = at::empty({N, C, Lk}, acc_options);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "soft_warp_bwd_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const RowsPerBlock bm = soft_warp_rows_per_block<scalar_t>(options, Lq, Lk);
    check_slab_fits(bm.query_bwd, Lk, sizeof(acc_t), options.max_smem_optin, "key");
    check_slab_fits(bm.key_bwd, Lq, sizeof(acc_t), options.max_smem_optin, "query");
    const SoftWarpBwdWorkspace<acc_t> workspace{inv_norm_q.data_ptr<acc_t>(), inv_norm_k.data_ptr<acc_t>(),
                                                delta.data_ptr<acc_t>(),      lse_acc.data_ptr<acc_t>(),
                                                grad_query_hat.data_ptr<acc_t>(), grad_key_hat.data_ptr<acc_t>()};
    launch_soft_warp_bwd(options, maps_of<scalar_t>(query, key, value), temperature, dout.data_ptr<scalar_t>(),
                         out_c.data_ptr<scalar_t>(), workspace, grad_query.data_ptr<scalar_t>(),
                         grad_key.data_ptr<scalar_t>(), grad_value.data_ptr<scalar_t>(), stream, CheckLaunch{});
  });
  return {grad_query, grad_key, grad_value};
}

// Schema adapters (csrc/ops.cpp): the CUDA kernels never cache the softmax
// probabilities -- memory stays O(N * C * L) -- so `probs` is always an empty
// (0,) tensor of the accumulation dtype, and the backward recomputes them.
std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_warp_fwd_cuda_op(const at::Tensor& query, const at::Tensor& key,
                                                                     const at::Tensor& value, double temperature) {
  auto [out, lse] = soft_warp_fwd_cuda(query, key, value, temperature);
  at::Tensor probs = at::empty({0}, query.options().dtype(acc_dtype(query.scalar_type())));
  return {out, lse, probs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_warp_bwd_cuda_op(const at::Tensor& grad_out,
                                                                     const at::Tensor& query, const at::Tensor& key,
                                                                     const at::Tensor& value, const at::Tensor& out,
                                                                     const at::Tensor& probs, double temperature) {
  TORCH_CHECK(probs.numel() == 0,
              "probs: expected an empty tensor (the CUDA forward caches no probabilities), got shape ", probs.sizes());
  return soft_warp_bwd_cuda(grad_out, query, key, value, out, temperature);
}

}  // namespace
}  // namespace cmalign_cuda

TORCH_LIBRARY_IMPL(reid_kernels, CUDA, m) {
  m.impl("soft_warp_fwd", &cmalign_cuda::soft_warp_fwd_cuda_op);
  m.impl("soft_warp_bwd", &cmalign_cuda::soft_warp_bwd_cuda_op);
}

}  // namespace reid_kernels
