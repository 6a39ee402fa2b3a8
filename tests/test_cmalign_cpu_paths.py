"""The two CPU implementations of reid_kernels.cmalign, each against the reference.

* ``fused`` (default where the probabilities fit the cache): cmalign_pairs_fwd / _bwd
  (csrc/cmalign/soft_warp_cpu.cpp) -- partners read through the indices, blend inside the warp,
  the backward's partner gradients accumulated per sample in two phases;
* ``per-partner``: two soft_warp calls (REID_KERNELS_CMALIGN_CPU_PATH=per-partner, and the path
  beyond the cache cap, tested in test_soft_warp_paths.py / test_cmalign.py);

at 1 and 2 threads (the kernels spread the samples over the threads when N >= threads, and run
them one after another with threaded products otherwise), every dtype the op takes, partner
patterns the LbA sampler never makes (repeats, self-pairs, samples nobody uses); plus the
operators' registrations, the phase timers and the FMA-peak micro-benchmark.
"""
import os
import sys

import pytest
import torch

import reid_kernels
from reid_kernels import reference
from reid_kernels.cmalign import CPU_PATH_ENV

from conftest import threads

pytestmark = pytest.mark.skipif(not reid_kernels.extension_available(), reason="reid_kernels._C not built")

PATHS = ("fused", "per-partner")
# Measured max |kernel - reference| over the cases below (both paths, outputs and gradients):
# float64 4e-14, float32 1.3e-5 (gradients of magnitude ~20). Tolerances as test_cmalign.py's MASKED_TOL.
TOL = {torch.float64: dict(atol=1e-9, rtol=1e-7), torch.float32: dict(atol=1e-4, rtol=1e-4)}


def _feat(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).relu().to(dtype)


def _weighted_grad(out, feat, seed):
    """Gradient of loss + sum(w_pos * recon_pos) + sum(w_neg * recon_neg), fixed random weights."""
    g = torch.Generator().manual_seed(seed)
    w_pos = torch.randn(out.recon_pos.shape, generator=g, dtype=torch.float64).to(feat.dtype)
    w_neg = torch.randn(out.recon_neg.shape, generator=g, dtype=torch.float64).to(feat.dtype)
    total = out.loss + (out.recon_pos * w_pos).sum() + (out.recon_neg * w_neg).sum()
    (grad,) = torch.autograd.grad(total, feat)
    return grad


def _producer(tensor) -> str:
    """Name of the autograd node that made `tensor`, looking through views."""
    node = tensor.grad_fn
    while type(node).__name__ == "ViewBackward0":
        node = node.next_functions[0][0]
    return type(node).__name__


def _run(path, monkeypatch, feat, pos_idx, neg_idx, temperature=50.0):
    monkeypatch.setenv(CPU_PATH_ENV, path)
    leaf = feat.detach().requires_grad_()
    out = reid_kernels.cmalign(leaf, pos_idx, neg_idx, temperature)
    fused = _producer(out.recon_pos).startswith("_FusedPartnerReconstructions")
    assert fused == (path == "fused"), f"{path} path: recon_pos came from {_producer(out.recon_pos)}"
    return out, _weighted_grad(out, leaf, 7)


def _check_path(path, monkeypatch, feat, pos_idx, neg_idx, temperature=50.0):
    out, grad = _run(path, monkeypatch, feat, pos_idx, neg_idx, temperature)
    leaf = feat.detach().requires_grad_()
    want = reference.cmalign(leaf, pos_idx, neg_idx, temperature)
    tol = TOL[feat.dtype]
    for name in want._fields:
        torch.testing.assert_close(getattr(out, name), getattr(want, name), **tol,
                                   msg=lambda m: f"{path} {name}: {m}")
    torch.testing.assert_close(grad, _weighted_grad(want, leaf, 7), **tol, msg=lambda m: f"{path} grad: {m}")


LBA_CASES = [
    (2, 2, 3, 4, 3),
    (8, 4, 16, 6, 3),  # LbA batch, N = 64
    (2, 2, 2048, 3, 2),  # LbA conv5 channels
    (2, 1, 64, 36, 18),  # 648 positions
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", LBA_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("num_threads", [1, 2])
def test_cpu_path_matches_reference(monkeypatch, path, dtype, case, num_threads):
    n_ids, n_pos, c, h, w = case
    feat = _feat((2 * n_ids * n_pos, c, h, w), dtype, seed=3)
    pos_idx, neg_idx = reid_kernels.lba_pairs(n_ids, n_pos, generator=torch.Generator().manual_seed(4))
    with threads(num_threads):
        _check_path(path, monkeypatch, feat, pos_idx, neg_idx)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("num_threads", [1, 2])
def test_cpu_path_arbitrary_partners(monkeypatch, path, num_threads):
    """Sample 3 is every anchor's negative, 4 is nobody's partner, 0 its own positive; int32 indices."""
    feat = _feat((6, 12, 4, 3), torch.float64, seed=5)
    pos_idx = torch.tensor([0, 2, 1, 1, 5, 0], dtype=torch.int32)
    neg_idx = torch.tensor([3, 3, 3, 3, 3, 3])
    with threads(num_threads):
        _check_path(path, monkeypatch, feat, pos_idx, neg_idx, temperature=7.0)


@pytest.mark.parametrize("path", PATHS)
def test_cpu_path_single_sample(monkeypatch, path):
    """N = 1 (its own partner twice): fewer samples than threads, the samples-in-sequence branch."""
    feat = _feat((1, 8, 3, 3), torch.float64, seed=6)
    idx = torch.zeros(1, dtype=torch.long)
    with threads(2):
        _check_path(path, monkeypatch, feat, idx, idx, temperature=5.0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("weighting, eps", [("paper", 0.0), ("lba-code", 1e-6), ("paper", 0.05), ("lba-code", 0.05)])
def test_cpu_path_weighting_and_eps(monkeypatch, path, weighting, eps):
    """Both dense-triplet weightings and eps inside the distances (LbA's recipe: lba-code, 1e-6), through
    the fused kernel's distances and their gradients; each loss term's gradient alone as well."""
    feat = _feat((8, 16, 4, 3), torch.float64, seed=25)
    pos_idx, neg_idx = reid_kernels.lba_pairs(2, 2, generator=torch.Generator().manual_seed(25))
    monkeypatch.setenv(CPU_PATH_ENV, path)
    leaf, ref_leaf = feat.clone().requires_grad_(), feat.clone().requires_grad_()
    out = reid_kernels.cmalign(leaf, pos_idx, neg_idx, 20.0, 0.2, weighting=weighting, eps=eps)
    want = reference.cmalign(ref_leaf, pos_idx, neg_idx, 20.0, 0.2, weighting=weighting, eps=eps)
    tol = TOL[torch.float64]
    for name in want._fields:
        torch.testing.assert_close(getattr(out, name), getattr(want, name), **tol, msg=lambda m: f"{name}: {m}")
    assert float(want.loss.detach()) > 0.01  # active hinges: the distances' gradients are exercised
    for term in ("loss", "recon_neg"):  # the distances' gradient alone; the reconstruction's alone (none for dist)
        (got,) = torch.autograd.grad(getattr(out, term).sum(), leaf, retain_graph=True)
        (expected,) = torch.autograd.grad(getattr(want, term).sum(), ref_leaf, retain_graph=True)
        torch.testing.assert_close(got, expected, **tol, msg=lambda m: f"grad of {term}: {m}")
    torch.testing.assert_close(_weighted_grad(out, leaf, 9), _weighted_grad(want, ref_leaf, 9), **tol)


@pytest.mark.parametrize("path", PATHS)
def test_cpu_path_zero_distances(monkeypatch, path):
    """Maps whose norms are all equal have a zero person mask, so each reconstruction is its anchor and
    both distances are exactly 0 (eps = 0): their gradient is the norm's subgradient 0, not NaN."""
    feat = torch.ones(8, 6, 4, 3, dtype=torch.float64)
    pos_idx, neg_idx = reid_kernels.lba_pairs(2, 2, generator=torch.Generator().manual_seed(26))
    out, grad = _run(path, monkeypatch, feat, pos_idx, neg_idx)
    leaf = feat.clone().requires_grad_()
    want = reference.cmalign(leaf, pos_idx, neg_idx)
    assert torch.equal(out.recon_pos, feat) and float(out.loss) == 0.0
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, _weighted_grad(want, leaf, 7), **TOL[torch.float64])


def test_fused_path_from_concurrent_threads(monkeypatch):
    """Two Python threads running the fused forward and backward at once (as autograd threads or a
    data-parallel wrapper would): each call's buffers are its own, so each gets the result it gets alone."""
    import threading

    pos_idx, neg_idx = reid_kernels.lba_pairs(4, 2, generator=torch.Generator().manual_seed(27))
    feats = [_feat((16, 24, 6, 3), torch.float64, seed=28 + k) for k in range(2)]
    alone = [_run("fused", monkeypatch, f, pos_idx, neg_idx)[1] for f in feats]
    results = [None, None]

    def work(k):
        leaf = feats[k].clone().requires_grad_()
        out = reid_kernels.cmalign(leaf, pos_idx, neg_idx)
        results[k] = _weighted_grad(out, leaf, 7)

    workers = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for got, want in zip(results, alone):  # measured: equal; the tolerance allows BLAS thread-count rounding
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_fused_and_per_partner_agree(monkeypatch):
    """The two paths sum the same products in different orders: float64 results agree to rounding."""
    feat = _feat((16, 32, 6, 3), torch.float64, seed=8)
    pos_idx, neg_idx = reid_kernels.lba_pairs(2, 4, generator=torch.Generator().manual_seed(9))
    fused, grad_fused = _run("fused", monkeypatch, feat, pos_idx, neg_idx)
    other, grad_other = _run("per-partner", monkeypatch, feat, pos_idx, neg_idx)
    for name in fused._fields:  # measured: 3e-15
        torch.testing.assert_close(getattr(fused, name), getattr(other, name), rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_fused, grad_other, rtol=1e-11, atol=1e-11)  # measured: 5e-14


@pytest.mark.parametrize("path", PATHS)
def test_cpu_path_reduced_precision(monkeypatch, path):
    """float16 / bfloat16: computed in float32 and rounded to the input dtype, on both paths (bounds of
    test_cmalign.py's test_cmalign_reduced_precision_cpu: float16 recon 2e-3, bfloat16 2.5e-2)."""
    pos_idx, neg_idx = reid_kernels.lba_pairs(2, 2, generator=torch.Generator().manual_seed(5))
    feat = _feat((8, 16, 4, 3), torch.float32, seed=24)
    # loss (~0.133): one ulp of the dtype there (float16 1.2e-4, bfloat16 9.8e-4): the returned scalar is
    # rounded once to the dtype after float32 sums whose own error (the rounded mask and co-attention) can
    # put it on either side of a rounding boundary (measured: 5.3e-4 for bfloat16 on the fused path)
    for dtype, recon_tol, loss_tol in ((torch.float16, 2e-3, 1.2e-4), (torch.bfloat16, 2.5e-2, 9.8e-4)):
        x = feat.to(dtype)
        out, grad = _run(path, monkeypatch, x, pos_idx, neg_idx, temperature=10.0)
        x32 = x.float().requires_grad_()
        want = reference.cmalign(x32, pos_idx, neg_idx, temperature=10.0)
        assert out.recon_pos.dtype == dtype and out.loss.dtype == dtype and grad.dtype == dtype
        torch.testing.assert_close(out.recon_pos.float(), want.recon_pos, atol=recon_tol, rtol=0)
        torch.testing.assert_close(out.loss.float(), want.loss, atol=loss_tol, rtol=0)
        want_grad = _weighted_grad(want, x32, 7)
        scale = want_grad.abs().max()
        torch.testing.assert_close(grad.float() / scale, want_grad / scale, atol=4 * recon_tol, rtol=0)


def test_fused_path_only_where_the_cache_fits(monkeypatch):
    """Beyond the probability-cache cap the CPU keeps the per-partner (recomputing) path: memory as before."""
    feat = _feat((4, 8, 3, 3), torch.float32, seed=10).requires_grad_()
    pos_idx, neg_idx = torch.tensor([1, 0, 3, 2]), torch.tensor([2, 3, 0, 1])
    monkeypatch.setenv("REID_KERNELS_SOFT_WARP_CACHE_BYTES", str(4 * 9 * 9 * 4 - 1))
    out = reid_kernels.cmalign(feat, pos_idx, neg_idx)
    assert _producer(out.recon_pos).startswith("_PartnerReconstructions")
    monkeypatch.setenv("REID_KERNELS_SOFT_WARP_CACHE_BYTES", str(4 * 9 * 9 * 4))
    out = reid_kernels.cmalign(feat, pos_idx, neg_idx)
    assert _producer(out.recon_pos).startswith("_FusedPartnerReconstructions")


def test_fused_path_only_for_small_volumes(monkeypatch):
    """Past FUSED_MAX_VOLUME_BYTES of (2, N, L, L) the per-partner path runs (the fused backward's G
    volume would raise the memory peak)."""
    cm = sys.modules["reid_kernels.cmalign"]  # the package attribute `cmalign` is the function

    feat = _feat((4, 8, 3, 3), torch.float32, seed=10).requires_grad_()
    pos_idx, neg_idx = torch.tensor([1, 0, 3, 2]), torch.tensor([2, 3, 0, 1])
    monkeypatch.setattr(cm, "FUSED_MAX_VOLUME_BYTES", 2 * 4 * 9 * 9 * 4 - 1)
    assert _producer(reid_kernels.cmalign(feat, pos_idx, neg_idx).recon_pos).startswith("_PartnerReconstructions")
    monkeypatch.setattr(cm, "FUSED_MAX_VOLUME_BYTES", 2 * 4 * 9 * 9 * 4)
    assert _producer(reid_kernels.cmalign(feat, pos_idx, neg_idx).recon_pos).startswith("_Fused")


def test_bad_path_variable_is_refused(monkeypatch):
    monkeypatch.setenv(CPU_PATH_ENV, "fast")
    feat = _feat((4, 8, 3, 3), torch.float32, seed=11)
    with pytest.raises(ValueError, match=r"REID_KERNELS_CMALIGN_CPU_PATH: expected one of fused, per-partner, got 'fast'"):
        reid_kernels.cmalign(feat, torch.tensor([1, 0, 3, 2]), torch.tensor([2, 3, 0, 1]))


def test_fused_double_backward_is_refused():
    feat = _feat((4, 8, 3, 3), torch.float64, seed=12).requires_grad_()
    out = reid_kernels.cmalign(feat, torch.tensor([1, 0, 3, 2]), torch.tensor([2, 3, 0, 1]))
    (grad,) = torch.autograd.grad(out.recon_pos.sum() + out.loss, feat, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        grad.sum().backward()


# ---------------------------------------------------------------------------
# The operators themselves


def _pairs_args(dtype=torch.float64, n=4, c=5, l=6):
    x = _feat((n, c, l), dtype, seed=13)
    mask = reid_kernels.person_mask(x.view(n, c, 2, l // 2)).view(n, l)
    return x, mask, torch.tensor([1, 0, 3, 2]), torch.tensor([2, 2, 0, 1])


def test_opcheck_cmalign_pairs():
    x, mask, pos_idx, neg_idx = _pairs_args()
    torch.library.opcheck(torch.ops.reid_kernels.cmalign_pairs_fwd.default, (x, mask, pos_idx, neg_idx, 5.0, 1e-3))
    recon_pos, recon_neg, _, probs, dist = torch.ops.reid_kernels.cmalign_pairs_fwd(x, mask, pos_idx, neg_idx, 5.0, 1e-3)
    g_pos, g_neg, g_dist = torch.randn_like(x), torch.randn_like(x), torch.randn_like(dist)
    # every gradient may be None (a recon or the distances no loss used)
    for grads in ((g_pos, g_neg, g_dist), (g_pos, g_neg, None), (None, None, g_dist), (g_pos, None, None)):
        torch.library.opcheck(torch.ops.reid_kernels.cmalign_pairs_bwd.default,
                              (*grads, x, mask, pos_idx, neg_idx, probs, recon_pos, recon_neg, dist, 5.0, 1e-3))


def test_cmalign_pairs_outputs():
    """recon = x + m (W - x) with W the soft warp (eq. 4), warped mask = P @ mask of the positive partner,
    probs = the soft_warp probabilities of both partners."""
    x, mask, pos_idx, neg_idx = _pairs_args()
    recon_pos, recon_neg, warped_mask, probs, dist = torch.ops.reid_kernels.cmalign_pairs_fwd(
        x, mask, pos_idx, neg_idx, 5.0, 1e-3)
    for part, (recon, idx) in enumerate(((recon_pos, pos_idx), (recon_neg, neg_idx))):
        warp, _, p = torch.ops.reid_kernels.soft_warp_fwd(x, x[idx].contiguous(), x[idx].contiguous(), 5.0)
        torch.testing.assert_close(probs[part], p, rtol=0, atol=1e-14)
        torch.testing.assert_close(recon, x + mask.unsqueeze(1) * (warp - x), rtol=0, atol=1e-14)
    torch.testing.assert_close(warped_mask, torch.bmm(probs[0], mask[pos_idx].unsqueeze(2)).squeeze(2),
                               rtol=0, atol=1e-14)
    for part, recon in enumerate((recon_pos, recon_neg)):  # eq. 10's distances, eps inside the norm
        torch.testing.assert_close(dist[part], torch.linalg.vector_norm(x - recon + 1e-3, dim=1), rtol=0, atol=1e-14)


@pytest.mark.parametrize("which", ["pos_idx", "neg_idx"])
def test_cmalign_pairs_refuses_bad_indices(which):
    x, mask, pos_idx, neg_idx = _pairs_args()
    args = {"pos_idx": pos_idx, "neg_idx": neg_idx}
    args[which] = torch.tensor([0, 1, 4, 0])
    with pytest.raises(RuntimeError, match=rf"{which}: expected values in \[0, 4\), got 4 at 2"):
        torch.ops.reid_kernels.cmalign_pairs_fwd(x, mask, args["pos_idx"], args["neg_idx"], 5.0, 0.0)
    args[which] = torch.tensor([0, 1, 2, 0], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=rf"{which}: expected a contiguous int64 CPU tensor of shape \(4,\)"):
        torch.ops.reid_kernels.cmalign_pairs_fwd(x, mask, args["pos_idx"], args["neg_idx"], 5.0, 0.0)


def test_cmalign_pairs_refuses_bad_mask_and_probs():
    x, mask, pos_idx, neg_idx = _pairs_args()
    with pytest.raises(RuntimeError, match=r"mask: expected shape \(4, 6\), got \[4, 5\]"):
        torch.ops.reid_kernels.cmalign_pairs_fwd(x, mask[:, :5], pos_idx, neg_idx, 5.0, 0.0)
    with pytest.raises(RuntimeError, match=r"mask: expected a contiguous CPU tensor of dtype Double"):
        torch.ops.reid_kernels.cmalign_pairs_fwd(x, mask.float(), pos_idx, neg_idx, 5.0, 0.0)
    recon_pos, recon_neg, _, probs, dist = torch.ops.reid_kernels.cmalign_pairs_fwd(x, mask, pos_idx, neg_idx, 5.0, 0.0)
    g = torch.zeros_like(x)

    def backward(**changed):
        args = dict(grad_pos=g, grad_neg=g, grad_dist=torch.zeros_like(dist), x=x, mask=mask, pos_idx=pos_idx,
                    neg_idx=neg_idx, probs=probs, recon_pos=recon_pos, recon_neg=recon_neg, dist=dist,
                    temperature=5.0, eps=0.0)
        args.update(changed)
        return torch.ops.reid_kernels.cmalign_pairs_bwd(*args.values())

    with pytest.raises(RuntimeError, match=r"probs: expected a contiguous Double CPU tensor of shape \(2, 4, 6, 6\)"):
        backward(probs=torch.zeros(4, 6, 6, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"dist: expected a contiguous Double CPU tensor of shape \(2, 4, 6\)"):
        backward(dist=dist[0])
    with pytest.raises(RuntimeError, match=r"grad_dist: expected a contiguous Double CPU tensor of shape \(2, 4, 6\)"):
        backward(grad_dist=dist.float())
    with pytest.raises(RuntimeError, match=r"recon_neg: expected"):
        backward(recon_neg=recon_neg[:, :4])
    with pytest.raises(RuntimeError, match=r"eps: expected a finite value >= 0, got -1"):
        backward(eps=-1.0)
    with pytest.raises(RuntimeError, match=r"temperature: expected a finite value > 0"):
        torch.ops.reid_kernels.cmalign_pairs_fwd(x, mask, pos_idx, neg_idx, float("nan"), 0.0)
    with pytest.raises(RuntimeError, match=r"eps: expected a finite value >= 0, got inf"):
        torch.ops.reid_kernels.cmalign_pairs_fwd(x, mask, pos_idx, neg_idx, 5.0, float("inf"))


# ---------------------------------------------------------------------------
# Phase timers and the FMA peak (what benchmarks/profile_cmalign.py and bench_cmalign.py read)


@pytest.mark.parametrize("path", PATHS)
def test_phase_timers_count_the_model_flops(monkeypatch, path):
    """With REID_KERNELS_CMALIGN_PROFILE=1 the matrix-product FLOPs credited to the phases add up to
    24 N C L^2 per forward + backward (6 products of 2 C L^2 per anchor and partner); off, nothing."""
    n, c, l = 8, 16, 12
    feat = _feat((n, c, 4, 3), torch.float32, seed=14)
    pos_idx, neg_idx = reid_kernels.lba_pairs(2, 2, generator=torch.Generator().manual_seed(15))
    torch.ops.reid_kernels._cmalign_cpu_profile(True)
    _run(path, monkeypatch, feat, pos_idx, neg_idx)
    ns, flops = torch.ops.reid_kernels._cmalign_cpu_profile(True)
    assert int(ns.sum()) == 0 and int(flops.sum()) == 0  # off by default
    monkeypatch.setenv("REID_KERNELS_CMALIGN_PROFILE", "1")
    _run(path, monkeypatch, feat, pos_idx, neg_idx)
    ns, flops = torch.ops.reid_kernels._cmalign_cpu_profile(True)
    names = torch.ops.reid_kernels._cmalign_cpu_phase_names()
    assert len(names) == ns.numel() == flops.numel()
    assert int(flops.sum()) == 24 * n * c * l * l
    timed = {names[i] for i in range(len(names)) if int(ns[i]) > 0}
    assert {"norms", "correlation", "softmax", "warp", "bwd_value_grad", "bwd_prob_grad", "bwd_softmax",
            "bwd_query_grad", "bwd_key_grad", "bwd_normalize"} <= timed


def _cpu_flags() -> set:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def test_fma_peak():
    gflops, isa, num_threads = torch.ops.reid_kernels._cpu_fma_peak(100_000)
    assert gflops > 0 and num_threads == torch.get_num_threads()
    # the widest instruction set the CPU has (an AVX2 loop on an AVX-512 CPU would halve the peak)
    flags = _cpu_flags()
    expected = "avx512f-fma" if "avx512f" in flags else "avx2-fma" if {"avx2", "fma"} <= flags else "sse2"
    assert isa == expected
    with pytest.raises(RuntimeError, match="iterations: expected a number > 0, got 0"):
        torch.ops.reid_kernels._cpu_fma_peak(0)


# A fresh process (2 threads, MKL_VERBOSE=1) that calls cmalign twice and soft_warp once.
_FIRST_CALLS = """
import numpy as np, torch, reid_kernels
feat = torch.randn(4, 6, 3, 3, dtype=torch.float64)
pos, neg = reid_kernels.lba_pairs(np.int64(2), np.int64(1), torch.Generator().manual_seed(0))
reid_kernels.cmalign(feat, pos, neg)
reid_kernels.cmalign(feat.float(), pos, neg)
reid_kernels.soft_warp(feat, feat, feat)
"""


def test_library_kernels_set_up_one_thread_at_a_time_before_the_first_parallel_call():
    """MKL's first calls from two threads at the same moment can compute with less accuracy (a fresh
    process's first cmalign gave probabilities off by 1e-9 in about 1 process of 30, see
    initialise_library_kernels_once in csrc/cmalign/soft_warp_cpu.cpp): before the kernels' first
    parallel region, each thread of the pool runs every product variant (float32 and float64,
    operands plain or transposed, beta 0 or 1) and the exponential once, one thread after the other,
    once per process.  MKL_VERBOSE lists every product with the thread that ran it (the
    exponentials it does not list).  scripts/first_call_determinism.py measures the race itself."""
    import re
    import subprocess

    env = dict(os.environ, MKL_VERBOSE="1", OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", _FIRST_CALLS], env=env, capture_output=True, text=True,
                         check=True).stdout
    products = re.findall(r"MKL_VERBOSE ([SD])GEMM\(([NT]),([NT]),(\d+),(\d+),(\d+),.*TID:(\d+)", out)
    if not products:
        pytest.skip("torch's BLAS here is not MKL (no MKL_VERBOSE lines)")
    warm_up = [p for p in products if p[3:6] == ("8", "8", "8")]
    per_thread = 2 * 4 * 2  # dtypes x transpositions x betas
    assert len(warm_up) == 2 * per_thread, f"expected the warm-up once on each of 2 threads, got {len(warm_up)}"
    assert products[: len(warm_up)] == warm_up, "a kernel's product ran before the warm-up had finished"
    threads_in_order = [p[6] for p in warm_up]
    first, second = threads_in_order[0], threads_in_order[per_thread]
    assert first != second and threads_in_order == [first] * per_thread + [second] * per_thread, (
        f"the threads' warm-ups interleaved: {threads_in_order}")
    for block in (warm_up[:per_thread], warm_up[per_thread:]):
        variants = sorted(p[:3] for p in block)
        assert variants == sorted((t, a, b) for t in "SD" for a in "NT" for b in "NT" for _ in range(2)), variants
