// All operator schemas of reid_kernels, in one place.
//
// Each operator family lives in csrc/<op>/ with one file per backend
// (<op>_cpu.cpp registers the CPU kernels, <op>_cuda.cu the CUDA ones).
// Autograd and fake (meta) kernels are registered from Python, in
// reid_kernels/_ops.py, and the plain-PyTorch definition of every operator is
// in reid_kernels/reference.py.
#include <Python.h>
#include <torch/library.h>

#include "cmalign/soft_warp_common.h"

// The module object Python imports as ``reid_kernels._C``: importing it loads
// this library, which runs the TORCH_LIBRARY registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace reid_kernels {

static bool has_cuda_kernels() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(reid_kernels, m) {
  // Whether this build compiled the CUDA kernels (setup.py: FORCE_CUDA / CUDA found).
  m.def("_has_cuda_kernels() -> bool", &has_cuda_kernels);

  // ---- CMAlign family (Learning by Aligning, ICCV 2021, eqs. 1-11) ---------
  // Feature maps travel as (N, C, L) contiguous tensors, L = H*W positions.
  //
  // Person mask, eqs. 5-7: min-max normalised L2 norm over channels, (N, L).
  m.def("person_mask(Tensor feat) -> Tensor");
  // Soft warp, eqs. 1, 2, 4: out[n,:,p] = sum_q softmax_q(t * cos(q[n,:,p], k[n,:,q])) v[n,:,q].
  // query (N, C, Lq), key (N, C, Lk), value (N, Cv, Lk) -> out (N, Cv, Lq) and the
  // float32 log-sum-exp of the scaled logits per query position, (N, Lq) (the
  // softmax's normaliser; no backward needs it: both recompute the rows with their
  // own maximum), and `probs`: on CPU, when N * Lq * Lk elements of the
  // accumulation dtype (float64 for float64, else float32) take at most
  // _soft_warp_prob_cache_bytes() (256 MiB by default), the softmax probabilities
  // (N, Lq, Lk) in that dtype, so the backward skips recomputing them (one matrix
  // product fewer); otherwise (and always on CUDA, whose kernels keep memory
  // O(N * C * L)) an empty (0,) tensor of that dtype.  soft_warp_bwd takes it back.
  // temperature: finite, > 0 and representable in the accumulation dtype.
  m.def("soft_warp_fwd(Tensor query, Tensor key, Tensor value, float temperature) -> (Tensor, Tensor, Tensor)");
  m.def(
      "soft_warp_bwd(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, "
      "Tensor probs, float temperature) -> (Tensor, Tensor, Tensor)");
  // The CPU probability-cache cap in bytes (REID_KERNELS_SOFT_WARP_CACHE_BYTES, read per
  // call, else 256 MiB): the one source of the rule, read by the fake kernel in _ops.py.
  m.def("_soft_warp_prob_cache_bytes() -> int", &soft_warp_prob_cache_bytes);

  // ---- Masked dense triplet (LbA eqs. 10-11) -------------------------------
  // anchor/positive/negative (N, C, L), weight (N, L) ->
  // loss map (N, L) = weight * [||a-p||_2 - ||a-n||_2 + margin]_+
  m.def("masked_dense_triplet_fwd(Tensor anchor, Tensor positive, Tensor negative, Tensor weight, float margin) -> Tensor");
  m.def(
      "masked_dense_triplet_bwd(Tensor grad_loss, Tensor anchor, Tensor positive, Tensor negative, Tensor weight, "
      "float margin) -> (Tensor, Tensor, Tensor)");

  // ---- Memory banks (MCE, AAAI 2023, eq. 3; PECA, IEICE 2024; cluster contrast) -
  // In-place momentum update of memory rows; mode is "sequential", "mean" or "hard".
  m.def(
      "memory_update_(Tensor(a!) memory, Tensor features, Tensor labels, float momentum, str update_mode, "
      "bool normalize) -> ()");
}

}  // namespace reid_kernels
