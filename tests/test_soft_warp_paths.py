"""Every code path of soft_warp / cmalign the product ships, against reid_kernels.reference.

* the CPU path without the probability cache (forced on small maps through
  REID_KERNELS_SOFT_WARP_CACHE_BYTES, which the C++ kernel reads at every call), forward and
  every gradient, over several query-row blocks;
* lse, the forward's log-sum-exp output, against the reference log-sum-exp;
* the cache rule from its one source (the C++ kernel), checked against the operator's output;
* float16 / bfloat16 on the CPU with tolerances from the measured error;
* large temperatures, double backward, meta-device indices.

Block arithmetic of the CPU kernel (csrc/cmalign/soft_warp_cpu.cpp): rows per block =
min(Lq, max(32, 2^18 / Lk)), so Lk = 8192 gives 32-row blocks and Lk = 648 gives 404-row blocks.
"""
import pytest
import torch

import reid_kernels
from reid_kernels import reference
from reid_kernels._ops import _soft_warp_probs_shape, soft_warp_prob_cache_bytes

pytestmark = pytest.mark.skipif(not reid_kernels.extension_available(), reason="reid_kernels._C not built")

CACHE_ENV = "REID_KERNELS_SOFT_WARP_CACHE_BYTES"
# float64: the kernel and the reference differ by summation order only (measured max 2.1e-14 over the
# uncached shapes, outputs and gradients).  float32: measured max 4.3e-6 (values of O(1)).  A 1%
# temperature error moves the outputs by ~5e-3, a dropped key-gradient block by O(1).
TOL = {
    torch.float64: dict(atol=1e-9, rtol=1e-7),
    torch.float32: dict(atol=5e-5, rtol=1e-4),
}


def _maps(shape, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def _weighted_grads(out, inputs, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)
    return torch.autograd.grad((out * w).sum(), inputs)


def _rows_per_block(lq, lk):
    return min(lq, max(32, (1 << 18) // lk))


def _check_against_reference(query, key, value, temperature, tol):
    out = reid_kernels.soft_warp(query, key, value, temperature)
    expected = reference.soft_warp(query, key, value, temperature)
    torch.testing.assert_close(out, expected, **tol, msg=lambda m: f"out: {m}")
    inputs = (query, key, value)
    for name, got, want in zip(("query", "key", "value"), _weighted_grads(out, inputs, 7),
                               _weighted_grads(expected, inputs, 7)):
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"grad_{name}: {m}")


# ---------------------------------------------------------------------------
# The uncached CPU path


# (N, C, query H x W, key H2 x W2): Lk = 8192 -> 32-row blocks, 100 query rows -> 4 blocks
# (the last one partial); Lk = 648 -> 404-row blocks, 1296 rows -> 4 blocks.
UNCACHED_SHAPES = [
    (1, 8, 10, 10, 64, 128),  # one sample: BLAS-threaded matrix products
    (3, 6, 10, 10, 64, 128),  # samples spread over the threads
    (2, 4, 36, 36, 36, 18),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", UNCACHED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_uncached_cpu_path_matches_reference(monkeypatch, dtype, shape):
    n, c, h, w, h2, w2 = shape
    assert _rows_per_block(h * w, h2 * w2) * 3 < h * w, "the shape must span several query-row blocks"
    monkeypatch.setenv(CACHE_ENV, "0")
    query = _maps((n, c, h, w), dtype, 1).requires_grad_()
    key = _maps((n, c, h2, w2), dtype, 2).requires_grad_()
    value = _maps((n, 5, h2, w2), dtype, 3).requires_grad_()
    # The path really is the uncached one: the forward returns no probabilities.
    _, _, probs = torch.ops.reid_kernels.soft_warp_fwd(
        query.detach().flatten(2), key.detach().flatten(2), value.detach().flatten(2), 5.0
    )
    assert probs.shape == (0,)
    _check_against_reference(query, key, value, 5.0, TOL[dtype])


def test_cached_and_uncached_paths_agree(monkeypatch):
    """Same maps through both CPU paths: forward and gradients to rounding. The forward is one softmax
    either way, but the uncached path multiplies blocks of 32 query rows where the cached one multiplies
    all 100 at once, and another blocking of a product may sum in another order (here bit-identical, at 1
    and 2 threads, AVX-512 and capped to AVX2 or SSE4.2; not promised): float64 bound ~8192 terms x
    1.1e-16 x |out| <= 0.09, i.e. 1e-13; lse is stored in float32, so to a float32 ulp."""
    q = _maps((2, 6, 100), torch.float64, 4)
    k = _maps((2, 6, 8192), torch.float64, 5)
    v = _maps((2, 3, 8192), torch.float64, 6)
    grad_out = _maps((2, 3, 100), torch.float64, 7)
    out_c, lse_c, probs = torch.ops.reid_kernels.soft_warp_fwd(q, k, v, 5.0)
    assert probs.shape == (2, 100, 8192)
    cached = torch.ops.reid_kernels.soft_warp_bwd(grad_out, q, k, v, out_c, probs, 5.0)
    monkeypatch.setenv(CACHE_ENV, "0")
    out_u, lse_u, empty = torch.ops.reid_kernels.soft_warp_fwd(q, k, v, 5.0)
    assert empty.shape == (0,)
    torch.testing.assert_close(out_u, out_c, rtol=0, atol=1e-13)
    torch.testing.assert_close(lse_u, lse_c, rtol=3e-7, atol=0)
    uncached = torch.ops.reid_kernels.soft_warp_bwd(grad_out, q, k, v, out_u, empty, 5.0)
    for name, a, b in zip(("query", "key", "value"), uncached, cached):
        torch.testing.assert_close(a, b, **TOL[torch.float64], msg=lambda m: f"grad_{name}: {m}")


# ---------------------------------------------------------------------------
# lse


@pytest.mark.parametrize("cache_bytes", [None, "0"], ids=["cached", "uncached"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lse_is_the_reference_logsumexp(device, monkeypatch, dtype, cache_bytes):
    if cache_bytes is not None:
        monkeypatch.setenv(CACHE_ENV, cache_bytes)
    q = _maps((3, 8, 37), dtype, 8, device)
    k = _maps((3, 8, 70), dtype, 9, device)
    for temperature in (0.5, 5.0, 50.0):
        _, lse, _ = torch.ops.reid_kernels.soft_warp_fwd(q, k, k, temperature)
        assert lse.dtype == torch.float32 and lse.shape == (3, 37)
        cos = torch.nn.functional.normalize(q.double(), dim=1).transpose(1, 2) @ torch.nn.functional.normalize(
            k.double(), dim=1
        )
        expected = torch.logsumexp(temperature * cos, dim=2)
        # float64 maps: one float32 rounding of lse (measured max 1.9e-6 at |lse| = 46).  float32 maps:
        # cosines carry ~1e-7, times t = 50: measured max 9.9e-6.  A wrong lse is off by O(1).
        tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float64 else dict(rtol=1e-6, atol=5e-5)
        torch.testing.assert_close(lse.double(), expected, **tol, msg=lambda m: f"lse at t={temperature}: {m}")


# ---------------------------------------------------------------------------
# The probability-cache rule: one source (the C++ kernel), the same answer in Python


def test_cache_cap_default_is_256_mib(monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert soft_warp_prob_cache_bytes() == 256 << 20
    assert torch.ops.reid_kernels._soft_warp_prob_cache_bytes() == 256 << 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_fake_kernel_rule_matches_the_operator(monkeypatch, dtype):
    """At caps around the volume of each shape, _ops' rule (used by the fake kernel and cmalign)
    predicts the shape of the probabilities the CPU operator returns."""
    elem = 8 if dtype == torch.float64 else 4
    for n, lq, lk in [(2, 10, 7), (1, 1, 1), (3, 5, 11)]:
        volume = n * lq * lk * elem
        q, k = _maps((n, 4, lq), dtype, 10), _maps((n, 4, lk), dtype, 11)
        for cap in (volume - 1, volume, volume + 1, 0):
            monkeypatch.setenv(CACHE_ENV, str(cap))
            _, _, probs = torch.ops.reid_kernels.soft_warp_fwd(q, k, k, 1.0)
            assert tuple(probs.shape) == _soft_warp_probs_shape(q, k), (n, lq, lk, cap)
            assert (probs.numel() > 0) == (volume <= cap)
            fake = torch.ops.reid_kernels.soft_warp_fwd(q.to("meta"), k.to("meta"), k.to("meta"), 1.0)[2]
            assert fake.shape == (0,)  # the meta device never caches


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cmalign_on_both_sides_of_the_cache_cap(monkeypatch, dtype):
    """cmalign picks the mask-from-probabilities path or the mask-channel path from the cap; both
    match the reference (a cap that C++ and Python read differently would fail here)."""
    feat = _maps((8, 6, 4, 3), torch.float64, 12).relu().to(dtype).requires_grad_()
    pos_idx, neg_idx = reid_kernels.lba_pairs(2, 2, generator=torch.Generator().manual_seed(12))
    volume = 8 * 12 * 12 * (8 if dtype == torch.float64 else 4)
    want = reference.cmalign(feat, pos_idx, neg_idx, 10.0)
    (want_grad,) = torch.autograd.grad(want.loss + want.recon_pos.sum(), feat)
    tol = TOL[dtype]
    for cap in (volume, volume - 1):
        monkeypatch.setenv(CACHE_ENV, str(cap))
        got = reid_kernels.cmalign(feat, pos_idx, neg_idx, 10.0)
        for name in got._fields:
            torch.testing.assert_close(getattr(got, name), getattr(want, name), **tol,
                                       msg=lambda m: f"{name} at cap {cap}: {m}")
        (grad,) = torch.autograd.grad(got.loss + got.recon_pos.sum(), feat)
        torch.testing.assert_close(grad, want_grad, **tol, msg=lambda m: f"grad at cap {cap}: {m}")


def test_bad_cache_env_is_refused(monkeypatch):
    monkeypatch.setenv(CACHE_ENV, "lots")
    with pytest.raises(RuntimeError, match=f"{CACHE_ENV}: expected a number of bytes >= 0, got 'lots'"):
        soft_warp_prob_cache_bytes()


# ---------------------------------------------------------------------------
# float16 / bfloat16 on the CPU: computed in float32, rounded once to the input dtype


# One rounding to the half type (half an ulp: 2^-11 relative for float16, 2^-8 for bfloat16) plus the
# float32 error.  Measured on these maps (|out| <= 2): float16 max |out - reference| 8.0e-4 (relative
# 4.0e-4), gradients / max|gradient| 2.9e-4; bfloat16 6.7e-3 (relative 3.1e-3), gradients 4.5e-3.
# A 1% temperature error moves the float32 output by 7.0e-3: caught at float16 (allowed here: 5e-4 +
# 5e-4 |out|); at bfloat16 it is as large as the type's own rounding.
HALF_TOL = {torch.float16: dict(rtol=5e-4, atol=5e-4), torch.bfloat16: dict(rtol=4e-3, atol=4e-3)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_cpu_is_one_rounding_of_float32(dtype):
    q = _maps((2, 8, 3, 3), torch.float64, 22).to(dtype).requires_grad_()
    k = _maps((2, 8, 2, 3), torch.float64, 23).to(dtype).requires_grad_()
    v = _maps((2, 4, 2, 3), torch.float64, 24).to(dtype).requires_grad_()
    out = reid_kernels.soft_warp(q, k, v, temperature=10.0)
    assert out.dtype == dtype
    # The reference on the same (already rounded) inputs, in float32.
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    expected = reference.soft_warp(q32, k32, v32, temperature=10.0)
    torch.testing.assert_close(out.float(), expected, **HALF_TOL[dtype])
    grads = _weighted_grads(out.float(), (q, k, v), 25)
    want = _weighted_grads(expected, (q32, k32, v32), 25)
    for name, got, ref in zip(("query", "key", "value"), grads, want):
        assert got.dtype == dtype
        scale = ref.abs().max()
        torch.testing.assert_close(got.float() / scale, ref / scale, **HALF_TOL[dtype],
                                   msg=lambda m: f"grad_{name}: {m}")


# ---------------------------------------------------------------------------
# Large temperatures: finite, equal to the reference


@pytest.mark.parametrize("dtype, temperature", [(torch.float64, 1e20), (torch.float32, 1e10), (torch.float32, 1e20)])
@pytest.mark.parametrize("cache_bytes", [None, "0"], ids=["cached", "uncached"])
def test_huge_temperature_is_finite_and_exact(device, monkeypatch, dtype, temperature, cache_bytes):
    if cache_bytes is not None:
        monkeypatch.setenv(CACHE_ENV, cache_bytes)
    q = _maps((2, 16, 4, 3), dtype, 30, device).requires_grad_()
    k = _maps((2, 16, 3, 5), dtype, 31, device).requires_grad_()
    v = _maps((2, 3, 3, 5), dtype, 32, device).requires_grad_()
    out = reid_kernels.soft_warp(q, k, v, temperature)
    expected = reference.soft_warp(q, k, v, temperature)
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(out, expected, **TOL[dtype])  # hard matching: a copy of the best value
    for got, want in zip(_weighted_grads(out, (q, k, v), 33), _weighted_grads(expected, (q, k, v), 33)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, **TOL[dtype])


def test_cmalign_huge_temperature(device):
    # Not post-ReLU maps: those hold parallel vectors (one positive channel), exact cosine ties that
    # hard matching breaks by rounding.
    feat = _maps((8, 6, 4, 3), torch.float64, 34, device).requires_grad_()
    pos_idx, neg_idx = reid_kernels.lba_pairs(2, 2, generator=torch.Generator().manual_seed(34))
    got = reid_kernels.cmalign(feat, pos_idx, neg_idx, temperature=1e20)
    want = reference.cmalign(feat, pos_idx, neg_idx, temperature=1e20)
    for name in got._fields:
        assert torch.isfinite(getattr(got, name)).all(), name
        torch.testing.assert_close(getattr(got, name), getattr(want, name), **TOL[torch.float64])
    (grad,) = torch.autograd.grad(got.loss, feat)
    (want_grad,) = torch.autograd.grad(want.loss, feat)
    torch.testing.assert_close(grad, want_grad, **TOL[torch.float64])


def test_temperature_beyond_the_accumulation_dtype_is_refused(device):
    q = _maps((2, 4, 3, 3), torch.float32, 35, device)
    with pytest.raises(ValueError, match=r"temperature: expected .*at most 3\.4\d*e\+38.*got 1e\+39"):
        reid_kernels.soft_warp(q, q, temperature=1e39)
    with pytest.raises(ValueError, match=r"temperature: expected .*at most 3\.4\d*e\+38"):
        reid_kernels.cmalign(q.repeat(2, 1, 1, 1), *reid_kernels.lba_pairs(2, 1), temperature=1e39)
    with pytest.raises(RuntimeError, match="temperature: expected a finite value > 0 and at most"):
        torch.ops.reid_kernels.soft_warp_fwd(q.flatten(2), q.flatten(2), q.flatten(2), 1e39)
    # float64 maps take it: their logits are float64.
    out = reid_kernels.soft_warp(q.double(), q.double(), temperature=1e39)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_direct_op_call_checks_temperature_on_every_device(device, temperature):
    """The operator itself refuses what the wrapper refuses, on the CPU and on CUDA alike."""
    q = _maps((2, 4, 6), torch.float32, 36, device)
    with pytest.raises(RuntimeError, match="temperature: expected a finite value > 0"):
        torch.ops.reid_kernels.soft_warp_fwd(q, q, q, temperature)
    out, _, probs = torch.ops.reid_kernels.soft_warp_fwd(q, q, q, 1.0)
    with pytest.raises(RuntimeError, match="temperature: expected a finite value > 0"):
        torch.ops.reid_kernels.soft_warp_bwd(out, q, q, q, out, probs, temperature)


# ---------------------------------------------------------------------------
# Double backward: refused by name


def test_double_backward_through_soft_warp_is_refused(device):
    q = _maps((2, 4, 3, 2), torch.float64, 40, device).requires_grad_()
    k = _maps((2, 4, 2, 3), torch.float64, 41, device).requires_grad_()
    out = reid_kernels.soft_warp(q, k, temperature=3.0)
    # create_graph=True alone is fine: the first-order gradient is the reference's.
    (grad_q,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    (want,) = torch.autograd.grad(reference.soft_warp(q, k, temperature=3.0).sum(), q)
    torch.testing.assert_close(grad_q.detach(), want, **TOL[torch.float64])
    with pytest.raises(NotImplementedError, match="soft_warp: double backward .* is not supported"):
        torch.autograd.grad(grad_q.pow(2).sum(), (q, k))


def test_double_backward_through_masked_dense_triplet_is_refused(device):
    a, p, n = (_maps((2, 4, 3, 3), torch.float64, s, device).requires_grad_() for s in (42, 43, 44))
    w = _maps((2, 3, 3), torch.float64, 45, device).abs()
    loss = reid_kernels.masked_dense_triplet(a, p, n, w, margin=1.0)
    (grad_a,) = torch.autograd.grad(loss, a, create_graph=True)
    with pytest.raises(NotImplementedError, match="masked_dense_triplet: double backward .* is not supported"):
        torch.autograd.grad(grad_a.pow(2).sum(), a)


def test_double_backward_through_cmalign_is_refused(device):
    feat = _maps((8, 6, 4, 3), torch.float64, 46, device).relu().requires_grad_()
    pos_idx, neg_idx = reid_kernels.lba_pairs(2, 2, generator=torch.Generator().manual_seed(46))
    out = reid_kernels.cmalign(feat, pos_idx, neg_idx)
    (grad,) = torch.autograd.grad(out.loss + out.recon_pos.sum(), feat, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(grad.pow(2).sum(), feat)


# ---------------------------------------------------------------------------
# Partner indices on the meta device


def test_cmalign_meta_indices_are_refused_by_name():
    feat = _maps((4, 8, 3, 3), torch.float32, 47)
    pos, neg = torch.arange(4).roll(1), torch.arange(4).roll(2)
    with pytest.raises(ValueError, match="pos_idx: expected index values on the CPU or cpu .*meta device"):
        reid_kernels.cmalign(feat, pos.to("meta"), neg)
    with pytest.raises(ValueError, match="neg_idx: expected index values .*meta device"):
        reid_kernels.cmalign(feat, pos, neg.to("meta"))


# ---------------------------------------------------------------------------
# cmalign with the LbA code's conventions


def test_cmalign_lba_code_conventions_match_the_reference(device):
    """cmalign(weighting="lba-code", eps=1e-6): the released code's loss, against the reference's literal
    (N, N, H, W) broadcast; it differs from the paper's weighting on the same batch."""
    feat = _maps((8, 6, 4, 3), torch.float64, 48, device).relu().requires_grad_()
    pos_idx, neg_idx = reid_kernels.lba_pairs(2, 2, generator=torch.Generator().manual_seed(48))
    got = reid_kernels.cmalign(feat, pos_idx, neg_idx, margin=0.6, weighting="lba-code", eps=1e-6)
    want = reference.cmalign(feat, pos_idx, neg_idx, margin=0.6, weighting="lba-code", eps=1e-6)
    torch.testing.assert_close(got.loss, want.loss, **TOL[torch.float64])
    (grad,) = torch.autograd.grad(got.loss, feat)
    (want_grad,) = torch.autograd.grad(want.loss, feat)
    torch.testing.assert_close(grad, want_grad, **TOL[torch.float64])
    paper = reid_kernels.cmalign(feat, pos_idx, neg_idx, margin=0.6)
    assert (paper.loss - got.loss).abs() > 1e-4


def test_cmalign_checks_weighting_and_eps_first():
    feat = _maps((4, 8, 3, 3), torch.float32, 49)
    pairs = (torch.arange(4).roll(1), torch.arange(4).roll(2))
    with pytest.raises(ValueError, match="weighting: expected 'paper' or 'lba-code', got 'lba'"):
        reid_kernels.cmalign(feat, *pairs, weighting="lba")
    with pytest.raises(ValueError, match="eps: expected a finite value >= 0"):
        reid_kernels.cmalign(feat, *pairs, eps=-1.0)
