// CPU kernels of reid_kernels::soft_warp_fwd / soft_warp_bwd (LbA eqs. 1, 2, 4).
//
// Per sample n, with q_hat / k_hat the columns of query / key divided by
// max(||.||_2, 1e-12) (reference.py's normalisation):
//   S[p, j] = q_hat[:, p] . k_hat[:, j]                      (eq. 1, cosine)
//   P[p, :] = softmax_j(t * S[p, :]),  lse[p] = logsumexp_j  (eq. 2)
//   out[:, p] = sum_j P[p, j] value[:, j]                    (eq. 4)
//
// Design: the matrix products go to ATen's BLAS (at::mm_out / addmm_ on
// slices, no copies); everything element-wise is fused into one pass over a
// block of query rows held in a scratch buffer, so the (Lq, Lk) matrices are
// never materialised for the whole batch and memory stays O(block * Lk) per
// thread.  Normalised copies of query and key are never made either: the raw
// products are scaled by the inverse norms inside the fused pass.
//
// Probability cache: when the whole (N, Lq, Lk) probability volume takes at
// most soft_warp_prob_cache_bytes() (256 MiB unless REID_KERNELS_SOFT_WARP_CACHE_BYTES
// says otherwise), the forward writes P straight into it (no scratch) and returns
// it; the backward then reads P instead of recomputing S = q^T k (one of its five
// matrix products) and the exponentials, and takes the normalisation's radial
// terms from column dots of the gradients (the CUDA kernels' formula) since it
// has no S.  Otherwise `probs` is empty and the backward recomputes S and P block
// by block.  Forward and recomputation share one softmax (softmax_rows: cosine
// first, then t * cos shifted by its row maximum, exponentiated, divided by the
// row sum), so both backward paths see the probabilities of the forward.  The
// recomputation does not start from the float32 `lse`: at large temperatures
// (t * cos ~ 1e10 in float32, 1e20 in float64) lse's rounding alone would
// overflow exp(t * cos - lse).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <optional>
#include <tuple>
#include <cstdlib>
#include <string>
#include <vector>

#include "cmalign/cpu_phase_timer.h"
#include "cpu_buffers.h"
#include "cpu_isa.h"
#include "cmalign/soft_warp_common.h"
#include "dense_triplet/masked_dense_triplet.h"
#include "mutation.h"

namespace reid_kernels {

int64_t soft_warp_prob_cache_bytes() {
  // 256 MiB holds an LbA batch (64 x 162 x 162 float32 is 6.7 MB) and a 72x36 map of a few samples.
  constexpr int64_t kDefaultBytes = REID_MUTANT(4) ? int64_t(128) << 20 : int64_t(256) << 20;
  const char* value = std::getenv("REID_KERNELS_SOFT_WARP_CACHE_BYTES");
  if (value == nullptr || *value == '\0') return kDefaultBytes;
  char* end = nullptr;
  const long long bytes = std::strtoll(value, &end, 10);
  TORCH_CHECK(*end == '\0' && bytes >= 0, "REID_KERNELS_SOFT_WARP_CACHE_BYTES: expected a number of bytes >= 0, got '",
              value, "'");
  return static_cast<int64_t>(bytes);
}

namespace {

// fn() timed as phase p (when REID_KERNELS_CMALIGN_PROFILE=1), credited with `flops`.
template <typename Fn>
void timed(phase::Phase p, int64_t flops, const Fn& fn) {
  phase::ScopedPhase scope(p);
  phase::add_flops(p, flops);
  fn();
}

constexpr double kNormEps = 1e-12;            // F.normalize's eps (reference.py)
constexpr int64_t kScratchElems = 1 << 18;     // one scratch block: rows * Lk elements (1 MiB in float32)
constexpr int64_t kMinBlockRows = 32;          // keeps the blocked matrix products efficient
constexpr int64_t kElementwiseGrain = 1 << 14; // elements per task of the element-wise loops

// ---------------------------------------------------------------------------
// Argument checks (the Python wrappers check first; these guard direct calls).

void check_map(const at::Tensor& t, const char* name, const at::Tensor& query) {
  TORCH_CHECK(t.dim() == 3, name, ": expected a 3-D (N, C, L) tensor, got shape ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == query.scalar_type(), name, ": expected dtype ", query.scalar_type(),
              " (like query), got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor, got strides ", t.strides());
}

struct Dims {
  int64_t N, C, Cv, Lq, Lk;
};

Dims check_inputs(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, double temperature) {
  TORCH_CHECK(at::isFloatingType(query.scalar_type()), "query: expected a floating-point tensor, got dtype ",
              query.scalar_type());
  check_map(query, "query", query);
  check_map(key, "key", query);
  check_map(value, "value", query);
  const Dims d{query.size(0), query.size(1), value.size(1), query.size(2), key.size(2)};
  TORCH_CHECK(key.size(0) == d.N && key.size(1) == d.C, "key: expected shape (", d.N, ", ", d.C,
              ", Lk) (batch and channels of query), got ", key.sizes());
  TORCH_CHECK(value.size(0) == d.N && value.size(2) == d.Lk, "value: expected shape (", d.N, ", Cv, ", d.Lk,
              ") (batch of query, positions of key), got ", value.sizes());
  TORCH_CHECK(d.Lk > 0, "key: expected at least one position to attend to, got shape ", key.sizes());
  check_soft_warp_temperature(temperature, query.scalar_type());
  return d;
}

bool is_reduced_float(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

// The (N, Lq, Lk) probability cache in the accumulation dtype, or an empty (0,)
// tensor when it would exceed soft_warp_prob_cache_bytes() (the fake kernel in
// reid_kernels/_ops.py applies the same rule to the same cap).
at::Tensor probability_cache(const Dims& d, const at::Tensor& query) {
  const auto acc = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t elem = acc == at::kDouble ? 8 : 4;
  const int64_t cap = soft_warp_prob_cache_bytes();
  const bool fits = d.Lq == 0 || d.Lk == 0 || d.N <= cap / elem / d.Lq / d.Lk;
  if (!fits) return at::empty({0}, query.options().dtype(acc));
  return empty_large({d.N, d.Lq, d.Lk}, query.options().dtype(acc));
}

// ---------------------------------------------------------------------------
// Scheduling.

// MKL (torch 2.13's CPU wheel: oneMKL 2024.0) sets up its matrix products and vector math lazily, on
// their first calls in the process, and first calls made at the same moment from two threads can
// compute with less accuracy: cmalign's first float64 call in a fresh process (N = 4, 2 threads)
// gave one sample's probabilities relative errors of ~1e-9 (later calls: 4e-16 from the exact
// softmax) in 4 of 120 processes (CI saw it on another CPU); after running the products alone
// first, still in 5 of 457; after also running the exponentials (at::exp_ is MKL's vmdExp / vmsExp)
// first, in 0 of 260 (scripts/first_call_determinism.py, on a 2-core Intel Xeon).  So before the first parallel region of the
// process whose tasks call the library, every product variant and the exponential this file uses
// (float32 and float64) run once on each thread of the pool, one thread at a time: as the tasks
// make them (inside a parallel region), never two at the same moment.
void run_every_library_kernel_we_call() {
  for (const auto dtype : {at::kFloat, at::kDouble}) {
    const at::Tensor a = at::ones({8, 8}, at::TensorOptions().dtype(dtype));
    at::Tensor c = at::zeros({8, 8}, a.options());
    for (const bool ta : {false, true})
      for (const bool tb : {false, true}) {
        at::mm_out(c, ta ? a.t() : a, tb ? a.t() : a);  // beta = 0
        c.addmm_(ta ? a.t() : a, tb ? a.t() : a);       // beta = 1
      }
    c.exp_();  // softmax_rows' exponentials
  }
}

void initialise_library_kernels_once() {
  static std::once_flag once;
  std::call_once(once, [] {
    std::mutex one_at_a_time;
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
      const std::lock_guard<std::mutex> lock(one_at_a_time);
      c10::InferenceMode guard;
      run_every_library_kernel_we_call();
    });
  });
}

// Samples are spread over the threads when there are at least as many samples
// as threads.  Otherwise they run one after another and the parallelism is
// inside: BLAS spreads each matrix product over the threads and the
// element-wise loops use at::parallel_for (which runs inline when nested).
// chunk(begin, end) runs the samples [begin, end) one after another, each chunk on one thread:
// per-thread scratch buffers belong in it (allocated once per chunk, never shared).
template <typename Chunk>
void for_each_sample_chunk(int64_t N, const Chunk& chunk) {
  if (!REID_MUTANT(13)) initialise_library_kernels_once();
  if (N > 1 && N >= at::get_num_threads()) {
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      // Worker threads do not inherit the caller's dispatcher state; the ATen
      // calls below only do arithmetic on our own buffers and views, so run
      // them without autograd / inference-tensor checks.
      c10::InferenceMode guard;
      chunk(begin, end);
    });
  } else {
    c10::InferenceMode guard;
    chunk(0, N);
  }
}

template <typename Body>
void for_each_sample(int64_t N, const Body& body) {
  for_each_sample_chunk(N, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) body(n);
  });
}

// fn(i) for i in [0, count), each i costing about `cost` elements of work.
template <typename Fn>
void parallel_over(int64_t count, int64_t cost, const Fn& fn) {
  const int64_t grain = std::max<int64_t>(1, kElementwiseGrain / std::max<int64_t>(cost, 1));
  at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(i);
  });
}

int64_t rows_per_block(int64_t Lq, int64_t Lk) {
  return std::min(Lq, std::max(kMinBlockRows, kScratchElems / Lk));
}

// ---------------------------------------------------------------------------
// Row kernels of the element-wise passes over (C, L) maps: one row of a column chunk each, on
// pointers declared unaliased (without it the compiler leaves these loops scalar), run inside
// with_cpu_isa (cpu_isa.h) so that they vectorise for the CPU's AVX2 / AVX-512.

// acc[l] += x[l]^2
template <typename T>
inline void add_squares(const T* __restrict__ x, int64_t n, T* __restrict__ acc) {
  for (int64_t l = 0; l < n; ++l) acc[l] += x[l] * x[l];
}

// dots[l] += x[l] * y[l], in double
template <typename T>
inline void add_products(const T* __restrict__ x, const T* __restrict__ y, int64_t n, double* __restrict__ dots) {
  for (int64_t l = 0; l < n; ++l) dots[l] += static_cast<double>(x[l]) * y[l];
}

// y[l] -= coef[l] * x[l]
template <typename T>
inline void subtract_scaled(const T* __restrict__ coef, const T* __restrict__ x, int64_t n, T* __restrict__ y) {
  for (int64_t l = 0; l < n; ++l) y[l] -= coef[l] * x[l];
}

// y[l] += a[l] - coef[l] * x[l]
template <typename T>
inline void add_radial_difference(const T* __restrict__ a, const T* __restrict__ coef, const T* __restrict__ x,
                                  int64_t n, T* __restrict__ y) {
  for (int64_t l = 0; l < n; ++l) y[l] += a[l] - coef[l] * x[l];
}

// out[l] = w[l] * x[l]  (w: per column)
template <typename T>
inline void scale_columns(const T* __restrict__ w, const T* __restrict__ x, int64_t n, T* __restrict__ out) {
  for (int64_t l = 0; l < n; ++l) out[l] = w[l] * x[l];
}

// out[l] = w * x[l]
template <typename T>
inline void scale_row(T w, const T* __restrict__ x, int64_t n, T* __restrict__ out) {
  for (int64_t l = 0; l < n; ++l) out[l] = w * x[l];
}

// Row reductions over kLanes interleaved partial results, combined pairwise at the end: the
// compiler vectorises them (a single running sum is a chain it may not reorder), and the order
// of the additions is fixed by this code, so every instruction-set copy and every thread count
// gives the same sums.
constexpr int64_t kLanes = 16;

template <typename T>
inline T combine_lanes(T* lane, T (*op)(T, T)) {
  for (int64_t width = kLanes / 2; width > 0; width /= 2)
    for (int64_t k = 0; k < width; ++k) lane[k] = op(lane[k], lane[k + width]);
  return lane[0];
}

template <typename T>
inline T add_op(T a, T b) {
  return a + b;
}

template <typename T>
inline T max_op(T a, T b) {
  return a < b ? b : a;  // std::max: a NaN b keeps a
}

template <typename T>
inline T row_sum(const T* __restrict__ x, int64_t n) {
  T lane[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) lane[k] += x[j + k];
  for (int64_t k = 0; j + k < n && !REID_MUTANT(10); ++k) lane[k] += x[j + k];
  return combine_lanes(lane, add_op<T>);
}

template <typename T>
inline T row_dot(const T* __restrict__ x, const T* __restrict__ y, int64_t n) {
  T lane[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) lane[k] += x[j + k] * y[j + k];
  for (int64_t k = 0; j + k < n; ++k) lane[k] += x[j + k] * y[j + k];
  return combine_lanes(lane, add_op<T>);
}

template <typename T>
inline T row_max(const T* __restrict__ x, int64_t n) {
  T lane[kLanes];
  std::fill(lane, lane + kLanes, -std::numeric_limits<T>::infinity());
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) lane[k] = max_op(lane[k], x[j + k]);
  for (int64_t k = 0; j + k < n; ++k) lane[k] = max_op(lane[k], x[j + k]);
  return combine_lanes(lane, max_op<T>);
}

// inv[l] = 1 / max(||x[:, l]||, eps) for the `cols` columns of a (C, cols)
// matrix with row stride `ld`.  radial[l] (when asked for) is inv[l]^2 where
// the norm is not clamped and 0 where it is: the coefficient of the radial
// term in the gradient of x / max(||x||, eps).
template <typename T>
void inverse_column_norms(const T* x, int64_t C, int64_t cols, int64_t ld, T* inv, T* radial) {
  const T eps = static_cast<T>(kNormEps);
  constexpr int64_t kChunk = 64;
  parallel_over((cols + kChunk - 1) / kChunk, C * kChunk, [&](int64_t chunk) {
    const int64_t begin = chunk * kChunk, end = std::min(cols, begin + kChunk);
    T* acc = inv + begin;
    std::fill(acc, acc + (end - begin), T(0));
    with_cpu_isa([&] {
      for (int64_t c = 0; c < C; ++c) add_squares(x + c * ld + begin, end - begin, acc);
    });
    for (int64_t l = begin; l < end; ++l) {
      const T norm = std::sqrt(inv[l]);
      const bool clamped = norm < eps;
      inv[l] = T(1) / (clamped ? eps : norm);
      if (radial != nullptr) radial[l] = clamped ? T(0) : inv[l] * inv[l];
    }
  });
}

// Divides a row of exponentials by its sum (the softmax's normaliser, eq. 2) and
// returns the sum.
template <typename T>
T normalize_row(T* row, int64_t Lk) {
  T sum;
  with_cpu_isa([&] {
    sum = row_sum(row, Lk);
    const T inv_sum = T(1) / sum;
    for (int64_t j = 0; j < Lk; ++j) row[j] *= inv_sum;
  });
  return sum;
}

// ---------------------------------------------------------------------------
// The softmax of eqs. 1-2, shared by the forward and the backward's recomputation.

// s[j] *= w * v[j]
template <typename T>
inline void scale_by_outer(T w, const T* __restrict__ v, int64_t n, T* __restrict__ s) {
  for (int64_t j = 0; j < n; ++j) s[j] *= w * v[j];
}

// In place on a block of raw products: scores[r, j] = q[:, p] . k[:, j] becomes the
// cosine S[r, j] = inv_q[r] * inv_k[j] * scores[r, j] (eq. 1).
template <typename T>
void cosines_in_place(at::Tensor& block, const T* inv_q, const T* inv_k) {
  const int64_t Lk = block.size(1);
  T* scores = block.mutable_data_ptr<T>();
  parallel_over(block.size(0), Lk, [&](int64_t r) {
    with_cpu_isa([&] { scale_by_outer(inv_q[r], inv_k, Lk, scores + r * Lk); });
  });
}

// prob[r, :] = softmax_j(t * cos[r, :]) (eq. 2); prob may be cos itself.  lse[r] (when
// not null) is the log-sum-exp of the scaled logits.  Cosine first, then times t: the
// logits stay within [-t, t] whatever the norms.  The exponentials go through at::exp_
// on the whole block: ATen's vectorised exp is several times faster than a scalar
// std::exp loop in this (generically compiled) file.
template <typename T>
void softmax_rows(const at::Tensor& cos_block, at::Tensor& prob_block, T t, float* lse) {
  const int64_t rows = cos_block.size(0), Lk = cos_block.size(1);
  const T* cos = cos_block.const_data_ptr<T>();
  T* prob = prob_block.mutable_data_ptr<T>();
  std::vector<T> top(rows);
  parallel_over(rows, Lk, [&](int64_t r) {
    with_cpu_isa([&] {
      T* pr = prob + r * Lk;
      if (cos == prob) {
        for (int64_t j = 0; j < Lk; ++j) pr[j] *= t;
      } else {
        scale_row(t, cos + r * Lk, Lk, pr);
      }
      const T m = row_max(pr, Lk);
      for (int64_t j = 0; j < Lk; ++j) pr[j] -= m;
      top[r] = m;
    });
  });
  prob_block.exp_();
  parallel_over(rows, Lk, [&](int64_t r) {
    const T sum = normalize_row(prob + r * Lk, Lk);
    if (lse != nullptr) lse[r] = static_cast<float>(top[r] + std::log(sum)) + (REID_MUTANT(3) ? 1.0f : 0.0f);
  });
}

// ---------------------------------------------------------------------------
// Forward.

// probs: this sample's (Lq, Lk) slice of the probability cache, or undefined.
template <typename T>
void forward_sample(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                    float* lse, T t, const at::Tensor& probs) {
  const int64_t C = q.size(0), Lq = q.size(1), Lk = k.size(1);
  const bool cached = probs.defined();
  // Blocks of query rows (~1 MiB of the (Lq, Lk) matrix each) whether or not they land in the cache:
  // the softmax's passes over a block then stay in L2 (one block of a 72x36 map's 27 MB matrix
  // halved its softmax time).
  const int64_t rows = rows_per_block(Lq, Lk);
  at::Tensor inv_q = at::empty({Lq}, q.options());
  at::Tensor inv_k = at::empty({Lk}, q.options());
  at::Tensor scratch = cached ? probs : at::empty({rows, Lk}, q.options());
  const T t_used = REID_MUTANT(1) && !cached ? t * T(1.01) : t;
  timed(phase::kNorms, 0, [&] {
    inverse_column_norms(q.const_data_ptr<T>(), C, Lq, Lq, inv_q.mutable_data_ptr<T>(), static_cast<T*>(nullptr));
    inverse_column_norms(k.const_data_ptr<T>(), C, Lk, Lk, inv_k.mutable_data_ptr<T>(), static_cast<T*>(nullptr));
  });
  for (int64_t p0 = 0; p0 < Lq; p0 += rows) {
    const int64_t pb = std::min(rows, Lq - p0);
    at::Tensor prob = scratch.narrow(0, cached ? p0 : 0, pb);
    // raw q . k, eq. 1 before scaling
    timed(phase::kCorrelation, 2 * C * pb * Lk, [&] { at::mm_out(prob, q.narrow(1, p0, pb).t(), k); });
    timed(phase::kSoftmax, 0, [&] {
      cosines_in_place(prob, inv_q.const_data_ptr<T>() + p0, inv_k.const_data_ptr<T>());
      softmax_rows(prob, prob, t_used, lse + p0);
    });
    at::Tensor out_blk = out.narrow(1, p0, pb);
    timed(phase::kWarp, 2 * v.size(0) * pb * Lk, [&] { at::mm_out(out_blk, v, prob.t()); });  // eq. 4
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_warp_fwd_cpu(const at::Tensor& query, const at::Tensor& key,
                                                                 const at::Tensor& value, double temperature) {
  const Dims d = check_inputs(query, key, value, temperature);
  phase::begin_call();
  if (is_reduced_float(query)) {  // compute in float32, return in the input dtype
    const double t = REID_MUTANT(5) ? temperature * 1.01 : temperature;
    auto [out, lse, probs] = soft_warp_fwd_cpu(query.to(at::kFloat), key.to(at::kFloat), value.to(at::kFloat), t);
    return {out.to(query.scalar_type()), lse, probs};
  }
  at::Tensor out = at::empty({d.N, d.Cv, d.Lq}, query.options());
  at::Tensor lse = at::empty({d.N, d.Lq}, query.options().dtype(at::kFloat));
  at::Tensor probs = probability_cache(d, query);
  if (d.N == 0 || d.Lq == 0) return {out, lse, probs};
  const bool cached = probs.numel() > 0;
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "soft_warp_fwd_cpu", [&] {
    float* lse_ptr = lse.mutable_data_ptr<float>();
    const auto t = static_cast<scalar_t>(temperature);
    for_each_sample(d.N, [&](int64_t n) {
      forward_sample<scalar_t>(query.select(0, n), key.select(0, n), value.select(0, n), out.select(0, n),
                               lse_ptr + n * d.Lq, t, cached ? probs.select(0, n) : at::Tensor());
    });
  });
  return {out, lse, probs};
}

// ---------------------------------------------------------------------------
// Backward.
//
// With dS = t * P * (dP - rowsum(P * dP)) the gradient of the cosines,
// dP = grad_out^T value, and G = dS * inv_q[p] * inv_k[j]:
//   grad_value = grad_out P
//   grad_query[:, p] = key G^T[:, p] - radial_q[p] * a[p] * query[:, p],  a[p] = sum_j dS S
//   grad_key[:, j]   = query G[:, j] - radial_k[j] * b[j] * key[:, j],    b[j] = sum_p dS S
// (the radial terms are the gradient through the normalisation x / ||x||).

// In place: dprob (dP) -> G, scores (S) -> dS * S; coef[r] = radial_q[r] * a[r].
template <typename T>
void score_gradients_block(const T* prob, T* dprob, T* scores, int64_t rows, int64_t Lk, const T* inv_q,
                           const T* inv_k, const T* radial_q, T t, T* coef) {
  parallel_over(rows, Lk, [&](int64_t r) {
    const T* pr = prob + r * Lk;
    T* dp = dprob + r * Lk;
    T* s = scores + r * Lk;
    T centre = 0;
    for (int64_t j = 0; j < Lk; ++j) centre += pr[j] * dp[j];
    T a = 0;
    for (int64_t j = 0; j < Lk; ++j) {
      const T ds = t * pr[j] * (dp[j] - centre);  // softmax backward, times the temperature
      s[j] *= ds;
      a += s[j];
      dp[j] = ds * inv_q[r] * inv_k[j];
    }
    coef[r] = radial_q[r] * a;
  });
}

// acc[j] += sum_r m[r, j].
template <typename T>
void add_column_sums(const T* m, int64_t rows, int64_t cols, T* acc) {
  constexpr int64_t kChunk = 256;
  parallel_over((cols + kChunk - 1) / kChunk, rows * kChunk, [&](int64_t chunk) {
    const int64_t begin = chunk * kChunk, end = std::min(cols, begin + kChunk);
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = m + r * cols;
      for (int64_t j = begin; j < end; ++j) acc[j] += row[j];
    }
  });
}

// grad[c, l] -= coef[l] * x[c, l] over a (C, cols) block, both with row stride ld.
template <typename T>
void subtract_radial(T* grad, const T* x, const T* coef, int64_t C, int64_t cols, int64_t ld) {
  parallel_over(C, cols, [&](int64_t c) {
    T* g = grad + c * ld;
    const T* xr = x + c * ld;
    for (int64_t l = 0; l < cols; ++l) g[l] -= coef[l] * xr[l];
  });
}

template <typename T>
void backward_sample(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, T t,
                     at::Tensor grad_q, at::Tensor grad_k, at::Tensor grad_v) {
  const int64_t C = q.size(0), Lq = q.size(1), Lk = k.size(1);
  const int64_t rows = rows_per_block(Lq, Lk);
  const auto opts = q.options();
  at::Tensor inv_q = at::empty({Lq}, opts), radial_q = at::empty({Lq}, opts);
  at::Tensor inv_k = at::empty({Lk}, opts), radial_k = at::empty({Lk}, opts);
  at::Tensor col_sums = at::zeros({Lk}, opts), coef = at::empty({rows}, opts);
  at::Tensor scores = at::empty({rows, Lk}, opts), prob = at::empty({rows, Lk}, opts),
             dprob = at::empty({rows, Lk}, opts);
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  timed(phase::kNorms, 0, [&] {
    inverse_column_norms(qp, C, Lq, Lq, inv_q.mutable_data_ptr<T>(), radial_q.mutable_data_ptr<T>());
    inverse_column_norms(kp, C, Lk, Lk, inv_k.mutable_data_ptr<T>(), radial_k.mutable_data_ptr<T>());
  });
  const int64_t Cv = v.size(0);

  for (int64_t p0 = 0; p0 < Lq; p0 += rows) {
    const int64_t pb = std::min(rows, Lq - p0);
    at::Tensor s = scores.narrow(0, 0, pb), pr = prob.narrow(0, 0, pb), g = dprob.narrow(0, 0, pb);
    at::Tensor q_blk = q.narrow(1, p0, pb), go_blk = grad_out.narrow(1, p0, pb), gq_blk = grad_q.narrow(1, p0, pb);

    timed(phase::kBwdRecompute, 2 * C * pb * Lk, [&] {
      at::mm_out(s, q_blk.t(), k);
      cosines_in_place(s, inv_q.const_data_ptr<T>() + p0, inv_k.const_data_ptr<T>());
      softmax_rows(s, pr, t, static_cast<float*>(nullptr));  // the forward's P, recomputed
    });
    timed(phase::kBwdProbGrad, 2 * Cv * pb * Lk, [&] { at::mm_out(g, go_blk.t(), v); });  // dP
    timed(phase::kBwdSoftmax, 0, [&] {
      score_gradients_block(pr.const_data_ptr<T>(), g.mutable_data_ptr<T>(), s.mutable_data_ptr<T>(), pb, Lk,
                            inv_q.const_data_ptr<T>() + p0, inv_k.const_data_ptr<T>(),
                            radial_q.const_data_ptr<T>() + p0, t, coef.mutable_data_ptr<T>());
      add_column_sums(s.const_data_ptr<T>(), pb, Lk, col_sums.mutable_data_ptr<T>());
    });

    timed(phase::kBwdQueryGrad, 2 * C * pb * Lk, [&] { at::mm_out(gq_blk, k, g.t()); });
    timed(phase::kBwdNormalize, 0, [&] {
      subtract_radial(gq_blk.mutable_data_ptr<T>(), qp + p0, coef.const_data_ptr<T>(), C, pb, Lq);
    });
    if (p0 == 0) {
      timed(phase::kBwdValueGrad, 2 * Cv * pb * Lk, [&] { at::mm_out(grad_v, go_blk, pr); });
      timed(phase::kBwdKeyGrad, 2 * C * pb * Lk, [&] { at::mm_out(grad_k, q_blk, g); });
    } else {
      timed(phase::kBwdValueGrad, 2 * Cv * pb * Lk, [&] { grad_v.addmm_(go_blk, pr); });
      timed(phase::kBwdKeyGrad, 2 * C * pb * Lk, [&] {
        if (!REID_MUTANT(2)) grad_k.addmm_(q_blk, g);
      });
    }
  }
  timed(phase::kBwdNormalize, 0, [&] {
    col_sums.mul_(radial_k);  // b[j] * radial_k[j]
    subtract_radial(grad_k.mutable_data_ptr<T>(), kp, col_sums.const_data_ptr<T>(), C, Lk, Lk);
  });
}

// In place on the dP of a block of rows given the cached P: dP -> G = dS * inv_q[p] * inv_k[j],
// dS = t * P * (dP - rowsum(P * dP)) (softmax backward times the temperature).
template <typename T>
void score_gradients_cached(const T* prob, T* dprob, int64_t rows, int64_t Lk, const T* inv_q, const T* inv_k, T t) {
  parallel_over(rows, Lk, [&](int64_t r) {
    with_cpu_isa([&] {
      const T* pr = prob + r * Lk;
      T* dp = dprob + r * Lk;
      const T centre = row_dot(pr, dp, Lk);
      for (int64_t j = 0; j < Lk; ++j) {
        const T ds = t * pr[j] * (dp[j] - centre);
        dp[j] = ds * inv_q[r] * inv_k[j];
      }
    });
  });
}

// Normalisation backward on a (C, L) gradient: grad[:, l] -= radial[l] * (x[:, l] . grad[:, l]) * x[:, l].
// With grad[:, l] = inv[l] * (gradient w.r.t. x_hat[:, l]), x[:, l] . grad[:, l] is the sum over
// the partner axis of dS * S, so this is the radial term of the gradient of x / max(||x||, eps)
// (the CUDA kernels' formula) without needing S.
template <typename T>
void normalize_backward(T* grad, const T* x, const T* radial, int64_t C, int64_t L) {
  constexpr int64_t kChunk = 64;
  parallel_over((L + kChunk - 1) / kChunk, 2 * C * kChunk, [&](int64_t chunk) {
    const int64_t begin = chunk * kChunk, cols = std::min(L, begin + kChunk) - begin;
    double dots[kChunk] = {};  // double: the subtraction below can cancel most of grad
    T coef[kChunk];
    with_cpu_isa([&] {
      for (int64_t c = 0; c < C; ++c) add_products(x + c * L + begin, grad + c * L + begin, cols, dots);
      for (int64_t l = 0; l < cols; ++l) coef[l] = static_cast<T>(dots[l] * radial[begin + l]);
      for (int64_t c = 0; c < C; ++c) subtract_scaled(coef, x + c * L + begin, cols, grad + c * L + begin);
    });
  });
}

// Backward of one sample from its cached (Lq, Lk) probabilities: four matrix products.
template <typename T>
void backward_sample_cached(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& prob, T t, at::Tensor grad_q, at::Tensor grad_k,
                            at::Tensor grad_v) {
  const int64_t C = q.size(0), Lq = q.size(1), Lk = k.size(1);
  const auto opts = q.options();
  at::Tensor inv_q = at::empty({Lq}, opts), radial_q = at::empty({Lq}, opts);
  at::Tensor inv_k = at::empty({Lk}, opts), radial_k = at::empty({Lk}, opts);
  at::Tensor g = at::empty({Lq, Lk}, opts);
  timed(phase::kNorms, 0, [&] {
    inverse_column_norms(q.const_data_ptr<T>(), C, Lq, Lq, inv_q.mutable_data_ptr<T>(),
                         radial_q.mutable_data_ptr<T>());
    inverse_column_norms(k.const_data_ptr<T>(), C, Lk, Lk, inv_k.mutable_data_ptr<T>(),
                         radial_k.mutable_data_ptr<T>());
  });
  const int64_t Cv = v.size(0);
  timed(phase::kBwdValueGrad, 2 * Cv * Lq * Lk, [&] { at::mm_out(grad_v, grad_out, prob); });  // eq. 4 backward
  timed(phase::kBwdProbGrad, 2 * Cv * Lq * Lk, [&] { at::mm_out(g, grad_out.t(), v); });      // dP
  timed(phase::kBwdSoftmax, 0, [&] {
    score_gradients_cached(prob.const_data_ptr<T>(), g.mutable_data_ptr<T>(), Lq, Lk, inv_q.const_data_ptr<T>(),
                           inv_k.const_data_ptr<T>(), t);
  });
  timed(phase::kBwdQueryGrad, 2 * C * Lq * Lk, [&] { at::mm_out(grad_q, k, g.t()); });
  timed(phase::kBwdKeyGrad, 2 * C * Lq * Lk, [&] { at::mm_out(grad_k, q, g); });
  timed(phase::kBwdNormalize, 0, [&] {
    normalize_backward(grad_q.mutable_data_ptr<T>(), q.const_data_ptr<T>(), radial_q.const_data_ptr<T>(), C, Lq);
    normalize_backward(grad_k.mutable_data_ptr<T>(), k.const_data_ptr<T>(), radial_k.const_data_ptr<T>(), C, Lk);
  });
}

void check_probs(const at::Tensor& probs, const Dims& d, const at::Tensor& query) {
  const auto acc = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(probs.device().is_cpu() && probs.scalar_type() == acc && probs.is_contiguous(), "probs: expected a ",
              "contiguous ", acc, " CPU tensor (soft_warp_fwd's third output), got dtype ", probs.scalar_type(), " on ",
              probs.device());
  if (probs.numel() == 0) return;
  TORCH_CHECK(probs.dim() == 3 && probs.size(0) == d.N && probs.size(1) == d.Lq && probs.size(2) == d.Lk,
              "probs: expected shape (", d.N, ", ", d.Lq, ", ", d.Lk, ") or an empty tensor, got ", probs.sizes());
}

void check_like_shape(const at::Tensor& t, const char* name, at::IntArrayRef shape, const at::Tensor& query) {
  TORCH_CHECK(t.sizes() == shape, name, ": expected shape ", shape, ", got ", t.sizes());
  check_map(t, name, query);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_warp_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& query,
                                                                 const at::Tensor& key, const at::Tensor& value,
                                                                 const at::Tensor& out, const at::Tensor& probs,
                                                                 double temperature) {
  const Dims d = check_inputs(query, key, value, temperature);
  check_like_shape(grad_out, "grad_out", {d.N, d.Cv, d.Lq}, query);
  // The CPU backward never reads `out`; with the probability cache it may be empty, so a
  // caller can reuse the forward's output buffer (reid_kernels.cmalign does).
  if (!(out.numel() == 0 && probs.numel() > 0)) check_like_shape(out, "out", {d.N, d.Cv, d.Lq}, query);
  check_probs(probs, d, query);
  phase::begin_call();
  if (is_reduced_float(query)) {  // compute in float32, return in the input dtype
    const auto f = [](const at::Tensor& t) { return t.to(at::kFloat); };
    auto [gq, gk, gv] = soft_warp_bwd_cpu(f(grad_out), f(query), f(key), f(value), f(out), probs, temperature);
    const auto dtype = query.scalar_type();
    return {gq.to(dtype), gk.to(dtype), gv.to(dtype)};
  }
  at::Tensor grad_q = at::empty_like(query), grad_k = at::empty_like(key), grad_v = at::empty_like(value);
  if (d.N == 0) return {grad_q, grad_k, grad_v};
  if (d.Lq == 0) {  // nothing attends: no gradient reaches key or value
    grad_k.zero_();
    grad_v.zero_();
    return {grad_q, grad_k, grad_v};
  }
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "soft_warp_bwd_cpu", [&] {
    const auto t = static_cast<scalar_t>(temperature);
    if (probs.numel() > 0) {
      for_each_sample(d.N, [&](int64_t n) {
        backward_sample_cached<scalar_t>(grad_out.select(0, n), query.select(0, n), key.select(0, n),
                                         value.select(0, n), probs.select(0, n), t, grad_q.select(0, n),
                                         grad_k.select(0, n), grad_v.select(0, n));
      });
      return;
    }
    for_each_sample(d.N, [&](int64_t n) {
      backward_sample<scalar_t>(grad_out.select(0, n), query.select(0, n), key.select(0, n), value.select(0, n), t,
                                grad_q.select(0, n), grad_k.select(0, n), grad_v.select(0, n));
    });
  });
  return {grad_q, grad_k, grad_v};
}


// ---------------------------------------------------------------------------
// CMAlign's two partner warps fused (reid_kernels::cmalign_pairs_fwd / _bwd, CPU only).
//
// reid_kernels.cmalign rebuilds every anchor x[i] from its positive x[pos[i]] and its negative
// x[neg[i]] partner (Learning by Aligning, ICCV 2021, eqs. 1-4): two soft warps with value = key,
// then the blend of eq. 3, recon = x + m * (W - x).  Run as two soft_warp_fwd calls, that costs
// two gathered (N, C, L) copies of the partners, norms computed four times per anchor, and in the
// backward five more (N, C, L) buffers (partner gradients, scattered with index_add_) plus
// element-wise passes over them in Python.  Here the partners are read in place through the
// indices, each sample's norms are computed once, the blend of eq. 3 rides in the warp's matrix
// product (x_i diag(1 - m) + x_j (diag(m) P)^T), and the dense triplet's distances (eq. 10,
// d_part = ||x_i - recon_part + eps|| at each position) are taken while the anchor's maps are in
// cache, returned as a (2, N, L) output so that the hinge, the weighting and the mean (eqs. 10-11)
// run in Python on (N, L) tensors.  The backward receives the distances' gradient with the
// reconstructions' and runs in two phases:
//   1. per anchor i: grad_x[i] = its direct terms ((1 - m) times what the recons receive, plus the
//      distances' own x_i terms); for both partners j the recon's total gradient cg (its gradient
//      minus the distance's term, rebuilt in a per-thread buffer), dP = (cg * m_i)^T x_j and G (the
//      softmax backward); then the normalisation backward of sum_j x_j G^T added to grad_x[i];
//   2. per sample j: every (anchor, partner) pair that used x[j] as key and value adds
//      x_i G (normalisation-backward with x[j]'s norms) and (cg * m_i) P to grad_x[j], in the
//      order of the anchors: no scatter, no atomics, the same sums at any thread count.
// Same matrix products as soft_warp_fwd / soft_warp_bwd with the probability cache: two in the
// forward and four in the backward per (anchor, partner); the probabilities of both partners
// are kept, (2, N, L, L), the same bytes as the two soft_warp caches.  The only (N, C, L) maps
// written are the outputs (recon_pos, recon_neg; grad_x): the masked dense triplet's backward
// would write three more, and autograd would add them to these.

// out[p, l] = w[p] * m[p, l] over a (rows, cols) matrix.
template <typename T>
void scale_rows(const T* m, const T* w, int64_t rows, int64_t cols, T* out) {
  with_cpu_isa([&] {
    for (int64_t p = 0; p < rows; ++p) scale_row(w[p], m + p * cols, cols, out + p * cols);
  });
}

// The partner indices as int64 values in [0, N) (the Python wrapper checks first).
const int64_t* check_partner_index(const at::Tensor& index, const char* name, int64_t N) {
  TORCH_CHECK(index.device().is_cpu() && index.scalar_type() == at::kLong && index.dim() == 1 &&
                  index.size(0) == N && index.is_contiguous(),
              name, ": expected a contiguous int64 CPU tensor of shape (", N, ",), got ", index.scalar_type(),
              " of shape ", index.sizes(), " on ", index.device());
  const int64_t* p = index.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i)
    TORCH_CHECK(p[i] >= 0 && p[i] < N, name, ": expected values in [0, ", N, "), got ", p[i], " at ", i);
  return p;
}

void check_pairs_inputs(const at::Tensor& x, const at::Tensor& mask, double temperature) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x: expected a floating-point tensor, got dtype ",
              x.scalar_type());
  check_map(x, "x", x);
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == x.size(0) && mask.size(1) == x.size(2), "mask: expected shape (",
              x.size(0), ", ", x.size(2), "), got ", mask.sizes());
  TORCH_CHECK(mask.device().is_cpu() && mask.scalar_type() == x.scalar_type() && mask.is_contiguous(),
              "mask: expected a contiguous CPU tensor of dtype ", x.scalar_type(), ", got ", mask.scalar_type(),
              " on ", mask.device());
  check_soft_warp_temperature(temperature, x.scalar_type());
}

// inv[n, l] (and radial[n, l] when not null) for every sample: each norm once, whatever its roles.
template <typename T>
void all_inverse_norms(const T* x, int64_t N, int64_t C, int64_t L, T* inv, T* radial) {
  timed(phase::kNorms, 0, [&] {
    for_each_sample(N, [&](int64_t n) {
      inverse_column_norms(x + n * C * L, C, L, L, inv + n * L, radial == nullptr ? radial : radial + n * L);
    });
  });
}

// out = x_i + m_i * (x_j P^T - x_i) (eqs. 4 and 3), as x_i diag(1 - m_i) + x_j (diag(m_i) P)^T: one
// streaming pass writes the first term and the matrix product adds the second (beta = 1), so the
// blend costs no pass over the warp.  `weighted` is an (L, L) scratch for diag(m_i) P.
template <typename T>
void warp_and_blend(const at::Tensor& xi, const at::Tensor& xj, const at::Tensor& prob, const T* m, at::Tensor& out,
                    at::Tensor& weighted) {
  const int64_t C = xi.size(0), L = xi.size(1);
  const T* a = xi.const_data_ptr<T>();
  T* o = out.mutable_data_ptr<T>();
  std::vector<T> keep(L);
  for (int64_t l = 0; l < L; ++l) keep[l] = T(1) - m[l];
  parallel_over(C, L, [&](int64_t c) {
    with_cpu_isa([&] { scale_columns(keep.data(), a + c * L, L, o + c * L); });
  });
  scale_rows(prob.const_data_ptr<T>(), m, L, L, weighted.mutable_data_ptr<T>());
  out.addmm_(xj, weighted.t());
}

// wm[p] = sum_l P[p, l] mask_j[l]: eq. 4 applied to the partner's mask (eq. 9's W(M)).
template <typename T>
void warp_mask(const T* prob, const T* mask_j, int64_t L, T* wm) {
  with_cpu_isa([&] {
    for (int64_t p = 0; p < L; ++p) wm[p] = row_dot(prob + p * L, mask_j, L);
  });
}

// acc[l] += ((x[l] - r[l]) + eps)^2 in double (the dense triplet's squared distance, channel by channel)
template <typename T>
inline void add_squared_differences(const T* __restrict__ x, const T* __restrict__ r, double eps, int64_t n,
                                    double* __restrict__ acc) {
  for (int64_t l = 0; l < n; ++l) {
    const double diff = (static_cast<double>(x[l]) - static_cast<double>(r[l])) + (REID_MUTANT(6) ? 0.0 : eps);
    acc[l] += diff * diff;
  }
}

// dist[part][l] = ||x_i[:, l] - recon_part[:, l] + eps||_2 for both partners (the distances of the dense
// triplet, eq. 10, in double as the masked dense triplet kernel), while the anchor's maps are in cache.
template <typename T>
void anchor_distances(const T* xi, const T* const recon[2], int64_t C, int64_t L, double eps, T* const dist[2]) {
  constexpr int64_t kChunk = 64;
  parallel_over((L + kChunk - 1) / kChunk, 2 * C * kChunk, [&](int64_t chunk) {
    const int64_t begin = chunk * kChunk, cols = std::min(L, begin + kChunk) - begin;
    with_cpu_isa([&] {
      for (int part = 0; part < 2; ++part) {
        double sq[kChunk] = {};
        for (int64_t c = 0; c < C; ++c) add_squared_differences(xi + c * L + begin, recon[part] + c * L + begin, eps, cols, sq);
        for (int64_t l = 0; l < cols; ++l) dist[part][begin + l] = static_cast<T>(std::sqrt(sq[l]));
      }
    });
  });
}

template <typename T>
void pairs_forward(const at::Tensor& x, const at::Tensor& mask, const int64_t* const partner[2], T t, double eps,
                   at::Tensor recon[2], at::Tensor& warped_mask, at::Tensor& probs, at::Tensor& dist) {
  const int64_t N = x.size(0), C = x.size(1), L = x.size(2);
  at::Tensor inv = at::empty({N, L}, x.options());
  const T* inv_p = inv.const_data_ptr<T>();
  const T* m = mask.const_data_ptr<T>();
  all_inverse_norms(x.const_data_ptr<T>(), N, C, L, inv.mutable_data_ptr<T>(), static_cast<T*>(nullptr));
  for_each_sample(N, [&](int64_t i) {
    const at::Tensor xi = x.select(0, i);
    at::Tensor weighted = at::empty({L, L}, x.options());
    for (int part = 0; part < 2; ++part) {
      const int64_t j = partner[part][i];
      const at::Tensor xj = x.select(0, j);
      at::Tensor prob = probs.select(0, part).select(0, i);
      timed(phase::kCorrelation, 2 * C * L * L, [&] { at::mm_out(prob, xi.t(), xj); });  // eq. 1, raw
      timed(phase::kSoftmax, 0, [&] {
        cosines_in_place(prob, inv_p + i * L, inv_p + j * L);
        softmax_rows(prob, prob, t, static_cast<float*>(nullptr));  // eq. 2
        if (part == 0) warp_mask(prob.const_data_ptr<T>(), m + j * L, L, warped_mask.mutable_data_ptr<T>() + i * L);
      });
      timed(phase::kWarp, 2 * C * L * L, [&] {
        at::Tensor out = recon[part].select(0, i);
        warp_and_blend(xi, xj, prob, m + i * L, out, weighted);
      });
    }
    timed(phase::kDistances, 0, [&] {
      const T* const rec[2] = {recon[0].const_data_ptr<T>() + i * C * L, recon[1].const_data_ptr<T>() + i * C * L};
      T* const d[2] = {dist.mutable_data_ptr<T>() + i * L, dist.mutable_data_ptr<T>() + (N + i) * L};
      anchor_distances(xi.const_data_ptr<T>(), rec, C, L, eps, d);
    });
  });
}

void check_eps(double eps) {
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "eps: expected a finite value >= 0, got ", eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cmalign_pairs_fwd_cpu(
    const at::Tensor& x, const at::Tensor& mask, const at::Tensor& pos_idx, const at::Tensor& neg_idx,
    double temperature, double eps) {
  check_pairs_inputs(x, mask, temperature);
  check_eps(eps);
  const int64_t N = x.size(0), L = x.size(2);
  const int64_t* const partner[2] = {check_partner_index(pos_idx, "pos_idx", N),
                                     check_partner_index(neg_idx, "neg_idx", N)};
  phase::begin_call();
  if (is_reduced_float(x)) {  // compute in float32, return in the input dtype
    auto [rp, rn, wm, probs, dist] =
        cmalign_pairs_fwd_cpu(x.to(at::kFloat), mask.to(at::kFloat), pos_idx, neg_idx, temperature, eps);
    return {rp.to(x.scalar_type()), rn.to(x.scalar_type()), wm.to(x.scalar_type()), probs, dist};
  }
  at::Tensor recon[2] = {empty_large(x.sizes(), x.options()), empty_large(x.sizes(), x.options())};
  at::Tensor warped_mask = at::empty({N, L}, x.options());
  at::Tensor probs = empty_large({2, N, L, L}, x.options());
  at::Tensor dist = at::empty({2, N, L}, x.options());
  if (x.numel() == 0) {
    warped_mask.zero_();
    dist.zero_();  // N, L or C is 0: a distance over no channels is 0
    return {recon[0], recon[1], warped_mask, probs, dist};
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cmalign_pairs_fwd_cpu", [&] {
    pairs_forward<scalar_t>(x, mask, partner, static_cast<scalar_t>(temperature), eps, recon, warped_mask, probs,
                            dist);
  });
  return {recon[0], recon[1], warped_mask, probs, dist};
}

// In place on D = g^T x_j (the warp's dP before the blend weight): D -> G = dS * inv_i[p] * inv_j[l],
// dS = t * P * (m_i[p] * D - rowsum(P * m_i[p] * D)).
template <typename T>
void pair_score_gradients(const T* prob, T* d, int64_t L, const T* m_i, const T* inv_i, const T* inv_j, T t) {
  parallel_over(L, L, [&](int64_t p) {
    with_cpu_isa([&] {
      const T* pr = prob + p * L;
      T* dp = d + p * L;
      const T w = m_i[p];
      const T centre = row_dot(pr, dp, L) * w;
      const T scale = t * inv_i[p];
      for (int64_t l = 0; l < L; ++l) dp[l] = scale * pr[l] * (w * dp[l] - centre) * inv_j[l];
    });
  });
}

// grad[c, l] += acc[c, l] - radial[l] * (x[:, l] . acc[:, l]) * x[c, l] over (C, L): the normalisation
// backward of the cosine path (dots in double, as normalize_backward) added to a gradient that
// already holds the sample's other terms.
template <typename T>
void add_normalized(T* grad, const T* acc, const T* x, const T* radial, int64_t C, int64_t L) {
  constexpr int64_t kChunk = 64;
  parallel_over((L + kChunk - 1) / kChunk, 3 * C * kChunk, [&](int64_t chunk) {
    const int64_t begin = chunk * kChunk, cols = std::min(L, begin + kChunk) - begin;
    double dots[kChunk] = {};
    T coef[kChunk];
    with_cpu_isa([&] {
      for (int64_t c = 0; c < C; ++c) add_products(x + c * L + begin, acc + c * L + begin, cols, dots);
      for (int64_t l = 0; l < cols; ++l) coef[l] = static_cast<T>(dots[l] * radial[begin + l]);
      for (int64_t c = 0; c < C; ++c) add_radial_difference(acc + c * L + begin, coef, x + c * L + begin, cols,
                                                            grad + c * L + begin);
    });
  });
}

// For every sample j, the (anchor, partner) pairs that read it as key and value, anchors ascending:
// pairs[offsets[j] .. offsets[j + 1]) holds 2 * i + part.
struct Incoming {
  std::vector<int64_t> offsets, pairs;
};

Incoming incoming_pairs(const int64_t* const partner[2], int64_t N) {
  Incoming in;
  in.offsets.assign(N + 1, 0);
  for (int part = 0; part < 2; ++part)
    for (int64_t i = 0; i < N; ++i) ++in.offsets[partner[part][i] + 1];
  for (int64_t j = 0; j < N; ++j) in.offsets[j + 1] += in.offsets[j];
  in.pairs.resize(2 * N);
  std::vector<int64_t> fill(in.offsets.begin(), in.offsets.end() - 1);
  for (int64_t i = 0; i < N; ++i)
    for (int part = 0; part < 2; ++part) in.pairs[fill[partner[part][i]]++] = 2 * i + part;
  return in;
}

// direct = keep * (g_pos + g_neg) + m * (c_pos * ((x - r_pos) + eps) + c_neg * ((x - r_neg) + eps)), one row:
// an anchor's own terms.  With u_part = c_part * ((x - r_part) + eps) (d dist_part / d x times the
// distance's gradient, eq. 10) and cg_part = g_part - u_part what recon_part receives in all, it is
// eq. 3's direct (1 - m) * (cg_pos + cg_neg) plus the distances' u_pos + u_neg.
template <typename T>
inline void direct_row_with_distances(const T* __restrict__ x, const T* __restrict__ r_pos, const T* __restrict__ r_neg,
                                      const T* __restrict__ g_pos, const T* __restrict__ g_neg,
                                      const T* __restrict__ c_pos, const T* __restrict__ c_neg,
                                      const T* __restrict__ m, T eps, int64_t n, T* __restrict__ direct) {
  for (int64_t l = 0; l < n; ++l) {
    const T u = c_pos[l] * ((x[l] - r_pos[l]) + eps) + c_neg[l] * ((x[l] - r_neg[l]) + eps);
    direct[l] = (T(1) - m[l]) * (g_pos[l] + g_neg[l]) + (REID_MUTANT(12) ? T(1) - m[l] : m[l]) * u;
  }
}

// direct = (1 - m) * (g_pos + g_neg): the anchor's direct term of eq. 3 when the distances carry no gradient.
template <typename T>
inline void direct_row(const T* __restrict__ g_pos, const T* __restrict__ g_neg, const T* __restrict__ m, int64_t n,
                       T* __restrict__ direct) {
  for (int64_t l = 0; l < n; ++l) direct[l] = (T(1) - m[l]) * (g_pos[l] + g_neg[l]);
}

// cg = g - c * ((x - r) + eps), one row: what a reconstruction receives in all (its own gradient and
// the distance's, eq. 10).
template <typename T>
inline void total_row(const T* __restrict__ g, const T* __restrict__ x, const T* __restrict__ r,
                      const T* __restrict__ c, T eps, int64_t n, T* __restrict__ cg) {
  for (int64_t l = 0; l < n; ++l) cg[l] = g[l] - c[l] * ((x[l] - r[l]) + (REID_MUTANT(7) ? T(0) : eps));
}

template <typename T>
struct PairsBackward {
  const at::Tensor& x;
  const at::Tensor* grad[2];   // gradients of recon_pos / recon_neg (undefined: none, read as zeros)
  const at::Tensor& zeros;     // (C, L) zeros: an undefined gradient's rows (undefined when both are defined)
  const at::Tensor* recon[2];
  const T* coef;               // (2, N, L) distances' gradient / distance (distance_coefficient), or null
  const T* m;
  const int64_t* const* partner;
  const at::Tensor& probs;
  at::Tensor& gmat;  // (2, N, L, L): G of every (anchor, partner)
  at::Tensor& grad_x;
  const T* inv;
  const T* radial;
  T t, eps;
  int64_t N, C, L;

  // Anchor i's (C, L) slice of recon_part's gradient (zeros when it has none) and as a tensor.
  const T* grad_of(int64_t i, int part) const {
    return grad[part]->defined() ? grad[part]->const_data_ptr<T>() + i * C * L : zeros.const_data_ptr<T>();
  }
  at::Tensor grad_tensor(int64_t i, int part) const {
    return grad[part]->defined() ? grad[part]->select(0, i) : zeros;
  }

  // grad_x[i] = the anchor's direct terms (eq. 3's (1 - m) path and the distances' gradients).
  void direct_terms(int64_t i) const {
    constexpr int64_t kChunk = 64;
    const int64_t o = i * C * L;
    const T* g[2] = {grad_of(i, 0), grad_of(i, 1)};
    const T* r[2] = {recon[0]->const_data_ptr<T>() + o, recon[1]->const_data_ptr<T>() + o};
    const T* xi = x.const_data_ptr<T>() + o;
    const T* mi = m + i * L;
    T* gx = grad_x.mutable_data_ptr<T>() + o;
    parallel_over((L + kChunk - 1) / kChunk, 5 * C * kChunk, [&](int64_t chunk) {
      const int64_t begin = chunk * kChunk, cols = std::min(L, begin + kChunk) - begin;
      with_cpu_isa([&] {
        for (int64_t c = 0; c < C; ++c) {
          const int64_t k = c * L + begin;
          if (coef == nullptr) {
            direct_row(g[0] + k, g[1] + k, mi + begin, cols, gx + k);
          } else {
            direct_row_with_distances(xi + k, r[0] + k, r[1] + k, g[0] + k, g[1] + k, coef + i * L + begin,
                                      coef + (N + i) * L + begin, mi + begin, eps, cols, gx + k);
          }
        }
      });
    });
  }

  // What recon_part of anchor i receives in all: its gradient itself, or (with the distances' gradient)
  // that minus the distance's term, written into `out` (C, L).
  at::Tensor total(int64_t i, int part, at::Tensor& out) const {
    if (coef == nullptr) return grad_tensor(i, part);
    const int64_t o = i * C * L;
    const T* g = grad_of(i, part);
    const T* r = recon[part]->const_data_ptr<T>() + o;
    const T* xi = x.const_data_ptr<T>() + o;
    const T* c = coef + (part * N + i) * L;
    T* cg = out.mutable_data_ptr<T>();
    timed(phase::kBwdDirect, 0, [&] {
      parallel_over(C, 4 * L, [&](int64_t ch) {
        with_cpu_isa([&] { total_row(g + ch * L, xi + ch * L, r + ch * L, c, eps, L, cg + ch * L); });
      });
    });
    return out;
  }

  // A (2, C, L) buffer for one thread's chunk of samples (anchor / partner_sample's scratch).
  at::Tensor scratch() const { return at::empty({2, C, L}, x.options()); }

  // Phase 1 for anchor i: its direct terms, G of both partners, then its query role.
  void anchor(int64_t i, at::Tensor& mine) const {
    timed(phase::kBwdDirect, 0, [&] { direct_terms(i); });
    at::Tensor acc = mine.select(0, 0), buffer = mine.select(0, 1);
    for (int part = 0; part < 2; ++part) {
      const int64_t j = partner[part][i];
      const at::Tensor xj = x.select(0, j);
      at::Tensor d = gmat.select(0, part).select(0, i);
      const at::Tensor prob = probs.select(0, part).select(0, i);
      const at::Tensor cg = total(i, part, buffer);
      timed(phase::kBwdProbGrad, 2 * C * L * L, [&] { at::mm_out(d, cg.t(), xj); });
      timed(phase::kBwdSoftmax, 0, [&] {
        pair_score_gradients(prob.const_data_ptr<T>(), d.mutable_data_ptr<T>(), L, m + i * L, inv + i * L,
                             inv + j * L, t);
      });
      timed(phase::kBwdQueryGrad, 2 * C * L * L, [&] {
        if (part == 0) at::mm_out(acc, xj, d.t());
        else acc.addmm_(xj, d.t());
      });
    }
    timed(phase::kBwdNormalize, 0, [&] {
      add_normalized(grad_x.mutable_data_ptr<T>() + i * C * L, acc.const_data_ptr<T>(),
                     x.const_data_ptr<T>() + i * C * L, radial + i * L, C, L);
    });
  }

  // Phase 2 for sample j: what it receives as key (through the cosines) and as value.
  void partner_sample(int64_t j, const Incoming& in, at::Tensor& mine) const {
    const int64_t begin = in.offsets[j], end = in.offsets[j + 1];
    if (begin == end) return;
    at::Tensor acc = mine.select(0, 0);
    at::Tensor buffer = mine.select(0, 1);
    at::Tensor weighted = at::empty({L, L}, x.options());
    at::Tensor gx = grad_x.select(0, j);
    timed(phase::kBwdKeyGrad, 2 * C * L * L * (end - begin), [&] {
      for (int64_t e = begin; e < end; ++e) {
        const int64_t i = in.pairs[e] / 2, part = in.pairs[e] % 2;
        const at::Tensor xi = x.select(0, i), g = gmat.select(0, part).select(0, i);
        if (e == begin) at::mm_out(acc, xi, g);
        else acc.addmm_(xi, g);
      }
    });
    timed(phase::kBwdNormalize, 0, [&] {
      add_normalized(gx.mutable_data_ptr<T>(), acc.const_data_ptr<T>(), x.const_data_ptr<T>() + j * C * L,
                     radial + j * L, C, L);
    });
    timed(phase::kBwdValueGrad, 2 * C * L * L * (end - begin), [&] {
      for (int64_t e = begin; e < end; ++e) {
        const int64_t i = in.pairs[e] / 2, part = in.pairs[e] % 2;
        if (REID_MUTANT(9) && part == 1) continue;
        // (g * m_i) P = g (diag(m_i) P): the blend weight moved onto the probabilities' rows
        scale_rows(probs.select(0, part).select(0, i).const_data_ptr<T>(), m + i * L, L, L,
                   weighted.mutable_data_ptr<T>());
        const at::Tensor cg = total(i, static_cast<int>(part), buffer);
        gx.addmm_(cg, weighted);
      }
    });
  }
};

void check_pairs_distances(const at::Tensor& t, const char* name, int64_t N, int64_t L, const at::Tensor& x) {
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == acc && t.is_contiguous() &&
                  t.sizes() == at::IntArrayRef({2, N, L}),
              name, ": expected a contiguous ", acc, " CPU tensor of shape (2, ", N, ", ", L,
              ") (like cmalign_pairs_fwd's fifth output), got ", t.scalar_type(), " of shape ", t.sizes());
}

at::Tensor cmalign_pairs_bwd_cpu(const std::optional<at::Tensor>& grad_pos_opt,
                                 const std::optional<at::Tensor>& grad_neg_opt,
                                 const std::optional<at::Tensor>& grad_dist, const at::Tensor& x,
                                 const at::Tensor& mask, const at::Tensor& pos_idx, const at::Tensor& neg_idx,
                                 const at::Tensor& probs, const at::Tensor& recon_pos, const at::Tensor& recon_neg,
                                 const at::Tensor& dist, double temperature, double eps) {
  check_pairs_inputs(x, mask, temperature);
  check_eps(eps);
  // An undefined gradient is a recon that no loss used (LbA's recon_neg: only the dense triplet's
  // distances reach it), read as zeros without an (N, C, L) buffer of them.
  const at::Tensor grad_pos = grad_pos_opt.has_value() ? *grad_pos_opt : at::Tensor();
  const at::Tensor grad_neg = grad_neg_opt.has_value() ? *grad_neg_opt : at::Tensor();
  if (grad_pos.defined()) check_like_shape(grad_pos, "grad_pos", x.sizes(), x);
  if (grad_neg.defined()) check_like_shape(grad_neg, "grad_neg", x.sizes(), x);
  check_like_shape(recon_pos, "recon_pos", x.sizes(), x);
  check_like_shape(recon_neg, "recon_neg", x.sizes(), x);
  const int64_t N = x.size(0), C = x.size(1), L = x.size(2);
  const int64_t* const partner[2] = {check_partner_index(pos_idx, "pos_idx", N),
                                     check_partner_index(neg_idx, "neg_idx", N)};
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(probs.device().is_cpu() && probs.scalar_type() == acc && probs.is_contiguous() &&
                  probs.sizes() == at::IntArrayRef({2, N, L, L}),
              "probs: expected a contiguous ", acc, " CPU tensor of shape (2, ", N, ", ", L, ", ", L,
              ") (cmalign_pairs_fwd's fourth output), got ", probs.scalar_type(), " of shape ", probs.sizes());
  check_pairs_distances(dist, "dist", N, L, x);
  const bool has_grad_dist = grad_dist.has_value() && grad_dist->defined();
  if (has_grad_dist) check_pairs_distances(*grad_dist, "grad_dist", N, L, x);
  phase::begin_call();
  if (is_reduced_float(x)) {  // compute in float32, return in the input dtype
    const auto f = [](const at::Tensor& t) { return t.defined() ? t.to(at::kFloat) : t; };
    return cmalign_pairs_bwd_cpu(f(grad_pos), f(grad_neg), grad_dist, f(x), f(mask), pos_idx, neg_idx, probs,
                                 f(recon_pos), f(recon_neg), dist, temperature, eps)
        .to(x.scalar_type());
  }
  at::Tensor grad_x = empty_large(x.sizes(), x.options());
  if (x.numel() == 0) return grad_x.zero_();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cmalign_pairs_bwd_cpu", [&] {
    using T = scalar_t;
    at::Tensor inv = at::empty({N, L}, x.options()), radial = at::empty({N, L}, x.options());
    at::Tensor gmat = empty_large({2, N, L, L}, x.options());
    // The distances' gradient coefficients g / d, (2, N, L); each recon's total gradient is then
    // rebuilt per (anchor, partner) in a per-thread (C, L) buffer where a product needs it, rather
    // than kept as two more (N, C, L) maps (fresh memory costs more than the pass that fills it).
    at::Tensor coef;
    if (has_grad_dist) {
      coef = at::empty({2, N, L}, x.options());
      const T* gd = grad_dist->const_data_ptr<T>();
      const T* d = dist.const_data_ptr<T>();
      T* c = coef.mutable_data_ptr<T>();
      for (int64_t k = 0; k < 2 * N * L; ++k) c[k] = dense_triplet::distance_gradient_coefficient(gd[k], d[k]);
    }
    // the rows of an undefined gradient (allocated only when one is)
    const at::Tensor zeros =
        grad_pos.defined() && grad_neg.defined() ? at::Tensor() : at::zeros({C, L}, x.options());
    all_inverse_norms(x.const_data_ptr<T>(), N, C, L, inv.mutable_data_ptr<T>(), radial.mutable_data_ptr<T>());
    const Incoming in = incoming_pairs(partner, N);
    const PairsBackward<T> bwd{x,
                               {&grad_pos, &grad_neg},
                               zeros,
                               {&recon_pos, &recon_neg},
                               has_grad_dist ? coef.const_data_ptr<T>() : nullptr,
                               mask.const_data_ptr<T>(),
                               partner,
                               probs,
                               gmat,
                               grad_x,
                               inv.const_data_ptr<T>(),
                               radial.const_data_ptr<T>(),
                               static_cast<T>(temperature),
                               static_cast<T>(eps),
                               N,
                               C,
                               L};
    for_each_sample_chunk(N, [&](int64_t begin, int64_t end) {
      at::Tensor mine = bwd.scratch();
      for (int64_t i = begin; i < end; ++i) bwd.anchor(i, mine);
    });
    for_each_sample_chunk(N, [&](int64_t begin, int64_t end) {
      at::Tensor mine = bwd.scratch();
      for (int64_t j = begin; j < end; ++j) bwd.partner_sample(j, in, mine);
    });
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(reid_kernels, CPU, m) {
  m.impl("soft_warp_fwd", &soft_warp_fwd_cpu);
  m.impl("soft_warp_bwd", &soft_warp_bwd_cpu);
  m.impl("cmalign_pairs_fwd", &cmalign_pairs_fwd_cpu);
  m.impl("cmalign_pairs_bwd", &cmalign_pairs_bwd_cpu);
}

}  // namespace reid_kernels
