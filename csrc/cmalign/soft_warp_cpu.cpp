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
#include <tuple>
#include <cstdlib>
#include <string>
#include <vector>

#include "cmalign/soft_warp_common.h"
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
  return at::empty({d.N, d.Lq, d.Lk}, query.options().dtype(acc));
}

// ---------------------------------------------------------------------------
// Scheduling.

// Samples are spread over the threads when there are at least as many samples
// as threads.  Otherwise they run one after another and the parallelism is
// inside: BLAS spreads each matrix product over the threads and the
// element-wise loops use at::parallel_for (which runs inline when nested).
template <typename Body>
void for_each_sample(int64_t N, const Body& body) {
  if (N > 1 && N >= at::get_num_threads()) {
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      // Worker threads do not inherit the caller's dispatcher state; the ATen
      // calls below only do arithmetic on our own buffers and views, so run
      // them without autograd / inference-tensor checks.
      c10::InferenceMode guard;
      for (int64_t n = begin; n < end; ++n) body(n);
    });
  } else {
    c10::InferenceMode guard;
    for (int64_t n = 0; n < N; ++n) body(n);
  }
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
    for (int64_t c = 0; c < C; ++c) {
      const T* row = x + c * ld + begin;
      for (int64_t l = 0; l < end - begin; ++l) acc[l] += row[l] * row[l];
    }
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
  T sum = 0;
  for (int64_t j = 0; j < Lk; ++j) sum += row[j];
  const T inv_sum = T(1) / sum;
  for (int64_t j = 0; j < Lk; ++j) row[j] *= inv_sum;
  return sum;
}

// ---------------------------------------------------------------------------
// The softmax of eqs. 1-2, shared by the forward and the backward's recomputation.

// In place on a block of raw products: scores[r, j] = q[:, p] . k[:, j] becomes the
// cosine S[r, j] = inv_q[r] * inv_k[j] * scores[r, j] (eq. 1).
template <typename T>
void cosines_in_place(at::Tensor& block, const T* inv_q, const T* inv_k) {
  const int64_t Lk = block.size(1);
  T* scores = block.mutable_data_ptr<T>();
  parallel_over(block.size(0), Lk, [&](int64_t r) {
    T* s = scores + r * Lk;
    for (int64_t j = 0; j < Lk; ++j) s[j] *= inv_q[r] * inv_k[j];
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
    const T* c = cos + r * Lk;
    T* pr = prob + r * Lk;
    T m = -std::numeric_limits<T>::infinity();
    for (int64_t j = 0; j < Lk; ++j) {
      pr[j] = t * c[j];
      m = std::max(m, pr[j]);
    }
    for (int64_t j = 0; j < Lk; ++j) pr[j] -= m;
    top[r] = m;
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
  const int64_t rows = cached ? Lq : rows_per_block(Lq, Lk);
  at::Tensor inv_q = at::empty({Lq}, q.options());
  at::Tensor inv_k = at::empty({Lk}, q.options());
  at::Tensor scratch = cached ? probs : at::empty({rows, Lk}, q.options());
  const T t_used = REID_MUTANT(1) && !cached ? t * T(1.01) : t;
  inverse_column_norms(q.const_data_ptr<T>(), C, Lq, Lq, inv_q.mutable_data_ptr<T>(), static_cast<T*>(nullptr));
  inverse_column_norms(k.const_data_ptr<T>(), C, Lk, Lk, inv_k.mutable_data_ptr<T>(), static_cast<T*>(nullptr));
  for (int64_t p0 = 0; p0 < Lq; p0 += rows) {
    const int64_t pb = std::min(rows, Lq - p0);
    at::Tensor prob = scratch.narrow(0, cached ? p0 : 0, pb);
    at::mm_out(prob, q.narrow(1, p0, pb).t(), k);  // raw q . k, eq. 1 before scaling
    cosines_in_place(prob, inv_q.const_data_ptr<T>() + p0, inv_k.const_data_ptr<T>());
    softmax_rows(prob, prob, t_used, lse + p0);
    at::Tensor out_blk = out.narrow(1, p0, pb);
    at::mm_out(out_blk, v, prob.t());  // eq. 4
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_warp_fwd_cpu(const at::Tensor& query, const at::Tensor& key,
                                                                 const at::Tensor& value, double temperature) {
  const Dims d = check_inputs(query, key, value, temperature);
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
  inverse_column_norms(qp, C, Lq, Lq, inv_q.mutable_data_ptr<T>(), radial_q.mutable_data_ptr<T>());
  inverse_column_norms(kp, C, Lk, Lk, inv_k.mutable_data_ptr<T>(), radial_k.mutable_data_ptr<T>());

  for (int64_t p0 = 0; p0 < Lq; p0 += rows) {
    const int64_t pb = std::min(rows, Lq - p0);
    at::Tensor s = scores.narrow(0, 0, pb), pr = prob.narrow(0, 0, pb), g = dprob.narrow(0, 0, pb);
    at::Tensor q_blk = q.narrow(1, p0, pb), go_blk = grad_out.narrow(1, p0, pb), gq_blk = grad_q.narrow(1, p0, pb);

    at::mm_out(s, q_blk.t(), k);
    cosines_in_place(s, inv_q.const_data_ptr<T>() + p0, inv_k.const_data_ptr<T>());
    softmax_rows(s, pr, t, static_cast<float*>(nullptr));  // the forward's P, recomputed
    at::mm_out(g, go_blk.t(), v);  // dP
    score_gradients_block(pr.const_data_ptr<T>(), g.mutable_data_ptr<T>(), s.mutable_data_ptr<T>(), pb, Lk,
                          inv_q.const_data_ptr<T>() + p0, inv_k.const_data_ptr<T>(),
                          radial_q.const_data_ptr<T>() + p0, t, coef.mutable_data_ptr<T>());
    add_column_sums(s.const_data_ptr<T>(), pb, Lk, col_sums.mutable_data_ptr<T>());

    at::mm_out(gq_blk, k, g.t());
    subtract_radial(gq_blk.mutable_data_ptr<T>(), qp + p0, coef.const_data_ptr<T>(), C, pb, Lq);
    if (p0 == 0) {
      at::mm_out(grad_v, go_blk, pr);
      at::mm_out(grad_k, q_blk, g);
    } else {
      grad_v.addmm_(go_blk, pr);
      if (!REID_MUTANT(2)) grad_k.addmm_(q_blk, g);
    }
  }
  col_sums.mul_(radial_k);  // b[j] * radial_k[j]
  subtract_radial(grad_k.mutable_data_ptr<T>(), kp, col_sums.const_data_ptr<T>(), C, Lk, Lk);
}

// In place on the dP of a block of rows given the cached P: dP -> G = dS * inv_q[p] * inv_k[j],
// dS = t * P * (dP - rowsum(P * dP)) (softmax backward times the temperature).
template <typename T>
void score_gradients_cached(const T* prob, T* dprob, int64_t rows, int64_t Lk, const T* inv_q, const T* inv_k, T t) {
  parallel_over(rows, Lk, [&](int64_t r) {
    const T* pr = prob + r * Lk;
    T* dp = dprob + r * Lk;
    T centre = 0;
    for (int64_t j = 0; j < Lk; ++j) centre += pr[j] * dp[j];
    for (int64_t j = 0; j < Lk; ++j) {
      const T ds = t * pr[j] * (dp[j] - centre);
      dp[j] = ds * inv_q[r] * inv_k[j];
    }
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
    for (int64_t c = 0; c < C; ++c) {
      const T* xr = x + c * L + begin;
      const T* gr = grad + c * L + begin;
      for (int64_t l = 0; l < cols; ++l) dots[l] += static_cast<double>(xr[l]) * gr[l];
    }
    T coef[kChunk];
    for (int64_t l = 0; l < cols; ++l) coef[l] = static_cast<T>(dots[l] * radial[begin + l]);
    for (int64_t c = 0; c < C; ++c) {
      const T* xr = x + c * L + begin;
      T* gr = grad + c * L + begin;
      for (int64_t l = 0; l < cols; ++l) gr[l] -= coef[l] * xr[l];
    }
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
  inverse_column_norms(q.const_data_ptr<T>(), C, Lq, Lq, inv_q.mutable_data_ptr<T>(), radial_q.mutable_data_ptr<T>());
  inverse_column_norms(k.const_data_ptr<T>(), C, Lk, Lk, inv_k.mutable_data_ptr<T>(), radial_k.mutable_data_ptr<T>());

  at::mm_out(grad_v, grad_out, prob);  // eq. 4 backward
  at::mm_out(g, grad_out.t(), v);      // dP
  score_gradients_cached(prob.const_data_ptr<T>(), g.mutable_data_ptr<T>(), Lq, Lk, inv_q.const_data_ptr<T>(),
                         inv_k.const_data_ptr<T>(), t);
  at::mm_out(grad_q, k, g.t());
  at::mm_out(grad_k, q, g);
  normalize_backward(grad_q.mutable_data_ptr<T>(), q.const_data_ptr<T>(), radial_q.const_data_ptr<T>(), C, Lq);
  normalize_backward(grad_k.mutable_data_ptr<T>(), k.const_data_ptr<T>(), radial_k.const_data_ptr<T>(), C, Lk);
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

}  // namespace

TORCH_LIBRARY_IMPL(reid_kernels, CPU, m) {
  m.impl("soft_warp_fwd", &soft_warp_fwd_cpu);
  m.impl("soft_warp_bwd", &soft_warp_bwd_cpu);
}

}  // namespace reid_kernels
