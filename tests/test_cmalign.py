"""CMAlign operators (person_mask, soft_warp, cmalign, nn.CMAlign) against reid_kernels.reference.

Every kernel test takes the ``device`` fixture (CPU, plus CUDA when a GPU and the
CUDA build are present).  Tolerances are per dtype: float64 kernels agree with
the reference to ~1e-14 (summation order), masks and co-attention included (they
are computed in the input dtype, float32 for float16 / bfloat16).
"""
import math

import pytest
import torch

import reid_kernels
from reid_kernels import reference
from reid_kernels.nn import CMAlign

pytestmark = pytest.mark.skipif(not reid_kernels.extension_available(), reason="reid_kernels._C not built")

# Tolerances of outputs and gradients, per dtype.
TOL = {
    torch.float64: dict(atol=1e-9, rtol=1e-7),
    torch.float32: dict(atol=5e-5, rtol=1e-4),
}
# Anything that goes through a mask (person_mask, cmalign), on _dyadic_maps: the masks agree exactly,
# the co-attention to a rounding of its dtype.  Measured max |kernel - reference| over the cmalign
# cases: float64 8e-15 (so the float64 tolerance is TOL's), float32 3.9e-6.
MASKED_TOL = {
    torch.float64: dict(atol=1e-9, rtol=1e-7),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
}

# (N, C, H, W, H2, W2): query maps H x W, key/value maps H2 x W2.
SOFT_WARP_SHAPES = [
    (1, 1, 1, 1, 1, 1),  # one position, one channel
    (2, 3, 4, 3, 4, 3),
    (3, 16, 5, 4, 2, 7),  # key smaller than the query map
    (2, 8, 2, 2, 6, 5),  # key larger than the query map
    (64, 4, 3, 2, 3, 2),  # LbA batch size
    (2, 2048, 3, 2, 2, 3),  # LbA conv5 channels
    (1, 24, 36, 18, 36, 18),  # 648 x 648, one sample (BLAS-threaded path)
    (4, 6, 36, 18, 18, 9),  # samples spread over threads
]
# These volumes fit the CPU probability cache, so the CPU runs them as one block per sample; the
# uncached, blocked CPU path (several query-row blocks) is tested in test_soft_warp_paths.py.


def _maps(shape, dtype, device, seed, relu=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if relu:  # post-ReLU backbone features, as CMAlign sees them
        x = x.relu()
    return x.to(device=device, dtype=dtype)


def _dyadic_maps(shape, dtype, device, seed):
    """Post-ReLU features on a power-of-two grid, fine enough that duplicate vectors are rare but
    coarse enough that every sum of squares over the channels is exact in float32: kernel and
    reference then compute bit-identical float32 norms and masks (whatever their summation order),
    so float64 results can be compared tightly through the masks."""
    channels = shape[1]
    top = int((2**24 / channels) ** 0.5) - 1  # integer grid steps: channels * top^2 < 2^24
    scale = 2 ** max(0, int(math.log2(max(top, 1) / 4)))  # values up to ~4 on a 1/scale grid
    x = _maps(shape, torch.float64, "cpu", seed, relu=True)
    return (x * scale).round().clamp(max=top).div(scale).to(device=device, dtype=dtype)


def _assert_close(actual, expected, tol, what):
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{what}: {m}")


def _grads(outputs, inputs, seed, retain_graph=False):
    """Gradients of sum(w * out) for fixed random weights w (one per output)."""
    g = torch.Generator().manual_seed(seed)
    total = sum(
        (out * torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)).sum() for out in outputs
    )
    return torch.autograd.grad(total, inputs, retain_graph=retain_graph)


# ---------------------------------------------------------------------------
# person_mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 4, 3), (64, 8, 18, 9), (3, 2048, 2, 3), (2, 16, 36, 18)])
def test_person_mask_matches_reference(device, dtype, shape):
    feat = _dyadic_maps(shape, dtype, device, seed=1).requires_grad_()
    mask = reid_kernels.person_mask(feat)
    assert mask.shape == (shape[0], shape[2], shape[3]) and mask.dtype == dtype
    assert not mask.requires_grad  # detached (LbA code)
    _assert_close(mask, reference.person_mask(feat), MASKED_TOL[dtype], "person_mask")
    flat = mask.flatten(1)
    assert flat.min() >= 0 and flat.max() <= 1


def test_person_mask_layouts(device):
    base = _maps((3, 8, 6, 4), torch.float32, device, seed=2)
    expected = reference.person_mask(base)
    channels_last = base.to(memory_format=torch.channels_last)
    strided = _maps((3, 16, 6, 4), torch.float32, device, seed=2)[:, ::2]  # every other channel
    for feat in (channels_last, strided):
        _assert_close(reid_kernels.person_mask(feat), reference.person_mask(feat), MASKED_TOL[torch.float32], "layout")
    _assert_close(reid_kernels.person_mask(channels_last), expected, MASKED_TOL[torch.float32], "channels_last")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_person_mask_in_the_input_dtype(device, dtype):
    """Min-max in the maps' dtype (float32 for half types), as the LbA code: on general (non-dyadic)
    float64 maps a float32 min-max would be ~4e-7 off; float64 agrees to summation order."""
    feat = _maps((3, 16, 6, 5), torch.float64, device, seed=3).to(dtype)
    mask = reid_kernels.person_mask(feat)
    math = torch.float64 if dtype == torch.float64 else torch.float32
    norms = torch.linalg.vector_norm(feat.to(math), dim=1).flatten(1)
    lo, hi = norms.min(1, keepdim=True).values, norms.max(1, keepdim=True).values
    expected = ((norms - lo) / (hi - lo + 1e-12)).view_as(mask)
    # float64: measured 1e-16; float32: 6e-8; float16/bfloat16: one rounding of a value in [0, 1].
    tol = {torch.float64: 1e-13, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 4e-3}[dtype]
    torch.testing.assert_close(mask.to(math), expected, rtol=0, atol=tol)
    torch.testing.assert_close(reference.person_mask(feat).to(math), expected, rtol=0, atol=tol)


def test_person_mask_nan_propagates_like_the_reference(device):
    """One NaN position makes its sample's whole mask NaN (its min and max are NaN); others are untouched."""
    feat = _maps((2, 4, 5, 6), torch.float32, device, seed=4)
    feat[0, 1, 2, 3] = float("nan")
    mask = reid_kernels.person_mask(feat)
    assert torch.isnan(mask[0]).all() and torch.isfinite(mask[1]).all()
    torch.testing.assert_close(mask, reference.person_mask(feat), equal_nan=True, **MASKED_TOL[torch.float32])


@pytest.mark.parametrize("fill", [0.0, 1.5])
def test_person_mask_degenerate_is_zero(device, fill):
    """All norms equal (constant or zero features): min-max is 0 / 1e-12, i.e. an all-zero mask."""
    feat = torch.full((2, 5, 4, 3), fill, device=device)
    mask = reid_kernels.person_mask(feat)
    assert torch.equal(mask, torch.zeros_like(mask))
    assert torch.equal(mask, reference.person_mask(feat))


# ---------------------------------------------------------------------------
# soft_warp


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SOFT_WARP_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_soft_warp_matches_reference(device, dtype, shape):
    n, c, h, w, h2, w2 = shape
    query = _maps((n, c, h, w), dtype, device, seed=3).requires_grad_()
    key = _maps((n, c, h2, w2), dtype, device, seed=4).requires_grad_()
    value = _maps((n, 5, h2, w2), dtype, device, seed=5).requires_grad_()
    temperature = 50.0 if c > 4 else 5.0

    out = reid_kernels.soft_warp(query, key, value, temperature)
    expected = reference.soft_warp(query, key, value, temperature)
    assert out.shape == (n, 5, h, w) and out.dtype == dtype
    _assert_close(out, expected, _soft_warp_tol(expected), "out")
    for name, got, want in zip(
        ("grad_query", "grad_key", "grad_value"),
        _grads([out], (query, key, value), seed=6),
        _grads([expected], (query, key, value), seed=6),
    ):
        _assert_close(got, want, _soft_warp_tol(want), name)


# float32 soft-warp errors grow with the logits (temperature x cosine) and with the magnitude of
# the gradients (up to 46 here), and their size depends on the kernels torch's libraries pick for
# the CPU. Measured max |kernel - reference| / max |reference| over SOFT_WARP_SHAPES: 4.8e-6 with
# the AVX-512 kernels, 6.3e-6 with ATen's default / oneDNN SSE4.1 / MKL compatible kernels (CI's
# capped run), both at grad_key of 4x6x36x18x18x9, t = 50; each side is then within 2.3x of the
# float32 reference's own error against float64. So atol is 2e-5 of the largest reference value.
SOFT_WARP_FLOAT32_SCALED_ATOL = 2e-5


def _soft_warp_tol(reference_value):
    if reference_value.dtype != torch.float32:
        return TOL[reference_value.dtype]
    scale = float(reference_value.detach().abs().max())
    return dict(atol=max(TOL[torch.float32]["atol"], SOFT_WARP_FLOAT32_SCALED_ATOL * scale),
                rtol=TOL[torch.float32]["rtol"])


def test_soft_warp_value_defaults_to_key(device):
    query = _maps((2, 6, 4, 3), torch.float64, device, seed=7).requires_grad_()
    key = _maps((2, 6, 3, 3), torch.float64, device, seed=8).requires_grad_()
    out = reid_kernels.soft_warp(query, key, temperature=10.0)
    expected = reference.soft_warp(query, key, temperature=10.0)
    _assert_close(out, expected, TOL[torch.float64], "out")
    for got, want in zip(_grads([out], (query, key), 9), _grads([expected], (query, key), 9)):
        _assert_close(got, want, TOL[torch.float64], "grad")


def test_soft_warp_layouts(device):
    """Non-contiguous and channels-last inputs give the same values and gradients."""
    dtype = torch.float64
    query = _maps((3, 8, 5, 4), dtype, device, seed=10).to(memory_format=torch.channels_last).requires_grad_()
    key_base = _maps((3, 8, 4, 6), dtype, device, seed=11).requires_grad_()
    key = key_base.transpose(2, 3)  # (3, 8, 6, 4), non-contiguous
    value_base = _maps((3, 12, 6, 4), dtype, device, seed=12).requires_grad_()
    value = value_base[:, ::3]  # every third channel
    out = reid_kernels.soft_warp(query, key, value, 20.0)
    expected = reference.soft_warp(query, key, value, 20.0)
    _assert_close(out, expected, TOL[dtype], "out")
    leaves = (query, key_base, value_base)
    for got, want in zip(_grads([out], leaves, 13), _grads([expected], leaves, 13)):
        _assert_close(got, want, TOL[dtype], "grad")


@pytest.mark.parametrize("temperature", [1e-3, 1.0, 1e3])
def test_soft_warp_extreme_temperatures(device, temperature):
    """Near-uniform (1e-3) and near-hard (1e3) matching stay finite and match the reference."""
    dtype = torch.float64
    query = _maps((2, 16, 4, 3), dtype, device, seed=14).requires_grad_()
    key = _maps((2, 16, 3, 5), dtype, device, seed=15).requires_grad_()
    out = reid_kernels.soft_warp(query, key, temperature=temperature)
    grads = _grads([out], (query, key), 16)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    expected = reference.soft_warp(query, key, temperature=temperature)
    # At t = 1e3 the logits amplify rounding by 1e3; still far below any real difference.
    tol = dict(atol=1e-7, rtol=1e-6) if temperature > 100 else TOL[dtype]
    _assert_close(out, expected, tol, "out")
    for got, want in zip(grads, _grads([expected], (query, key), 16)):
        _assert_close(got, want, tol, "grad")


def test_soft_warp_float32_extreme_temperature_finite(device):
    query = _maps((2, 64, 6, 3), torch.float32, device, seed=17).requires_grad_()
    for temperature in (1e-3, 1e3):
        out = reid_kernels.soft_warp(query, query.flip(0), temperature=temperature)
        (grad,) = _grads([out], (query,), 18)
        assert torch.isfinite(out).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("fill", [0.0, 2.0])
def test_soft_warp_degenerate_features(device, fill):
    """Zero vectors (cosine 0 with everything) and constant maps give a uniform average, finite gradients."""
    dtype = torch.float64
    query = torch.full((2, 4, 3, 2), fill, dtype=dtype, device=device, requires_grad=True)
    key = torch.full((2, 4, 2, 2), fill, dtype=dtype, device=device, requires_grad=True)
    value = _maps((2, 3, 2, 2), dtype, device, seed=19).requires_grad_()
    out = reid_kernels.soft_warp(query, key, value, 50.0)
    expected_mean = value.detach().flatten(2).mean(2)[:, :, None, None].expand_as(out)
    _assert_close(out, expected_mean, TOL[dtype], "uniform average")
    grads = _grads([out], (query, key, value), 20)
    ref_grads = _grads([reference.soft_warp(query, key, value, 50.0)], (query, key, value), 20)
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all()
        _assert_close(got, want, TOL[dtype], "grad")


def test_soft_warp_gradcheck(device):
    opts = dict(dtype=torch.float64, device=device)
    g = torch.Generator().manual_seed(21)
    query = torch.randn(2, 4, 3, 2, generator=g).to(**opts).requires_grad_()
    key = torch.randn(2, 4, 2, 3, generator=g).to(**opts).requires_grad_()
    value = torch.randn(2, 3, 2, 3, generator=g).to(**opts).requires_grad_()
    assert torch.autograd.gradcheck(lambda q, k, v: reid_kernels.soft_warp(q, k, v, 3.0), (query, key, value))
    # Through the normalisation of a tiny-norm vector (clamped at 1e-12: gradient 1/eps, no radial term).
    assert torch.autograd.gradcheck(
        lambda q, k: reid_kernels.soft_warp(q, k, temperature=0.5), (query[:1, :, :2, :1], key[:1])
    )


def test_cmalign_reduced_precision_cpu():
    """float16 / bfloat16 features on the CPU: every stage runs in float32, results in the input dtype,
    so the result is the float32 reference on the rounded input, rounded once."""
    pos_idx, neg_idx = reid_kernels.lba_pairs(2, 2, generator=torch.Generator().manual_seed(5))
    feat = _maps((8, 16, 4, 3), torch.float32, "cpu", seed=24)
    # Measured against the reference on the rounded input (reconstructions of magnitude <= 3, loss 0.149):
    # float16 recon 1.3e-3, loss 1.5e-5 (half an ulp: 2e-3 at 3, 6e-5 at 0.15); bfloat16 recon 1.6e-2,
    # loss 7.5e-5. A 1% temperature error moves recon by 1.8e-2: float16's bound catches it; bfloat16's
    # own rounding is as large, so only its scale is checked.
    bounds = {torch.float16: (2e-3, 6e-5), torch.bfloat16: (2.5e-2, 5e-4)}
    for dtype, (recon_tol, loss_tol) in bounds.items():
        x = feat.to(dtype).requires_grad_()
        expected = reference.cmalign(x.detach().float(), pos_idx, neg_idx, temperature=10.0)
        out = reid_kernels.cmalign(x, pos_idx, neg_idx, temperature=10.0)
        assert out.recon_pos.dtype == dtype and out.loss.dtype == dtype
        torch.testing.assert_close(out.recon_pos.float(), expected.recon_pos, atol=recon_tol, rtol=0)
        torch.testing.assert_close(out.loss.float(), expected.loss, atol=loss_tol, rtol=0)
        (grad,) = torch.autograd.grad(out.loss, (x,))
        assert grad.dtype == dtype and torch.isfinite(grad.float()).all()


# ---------------------------------------------------------------------------
# cmalign


def _cmalign_case(n_ids, n_pos, c, h, w, dtype, device, seed):
    feat = _dyadic_maps((2 * n_ids * n_pos, c, h, w), dtype, device, seed=seed).requires_grad_()
    pos_idx, neg_idx = reid_kernels.lba_pairs(n_ids, n_pos, generator=torch.Generator().manual_seed(seed))
    return feat, pos_idx, neg_idx


def _check_cmalign(feat, pos_idx, neg_idx, temperature=50.0, margin=0.3, leaves=None):
    dtype = feat.dtype
    got = reid_kernels.cmalign(feat, pos_idx, neg_idx, temperature, margin)
    want = reference.cmalign(feat, pos_idx, neg_idx, temperature, margin)
    assert isinstance(got, reid_kernels.CMAlignOutput)
    for name in got._fields:
        a, b = getattr(got, name), getattr(want, name)
        assert a.shape == b.shape and a.dtype == b.dtype, name
        _assert_close(a, b, MASKED_TOL[dtype], name)
    assert not got.comask.requires_grad
    leaves = leaves or (feat,)
    outs_got = [got.recon_pos, got.recon_neg, got.loss]
    outs_want = [want.recon_pos, want.recon_neg, want.loss]
    grads_got = _grads(outs_got, leaves, 31, retain_graph=True)
    grads_want = _grads(outs_want, leaves, 31, retain_graph=True)
    for a, b in zip(grads_got, grads_want):
        _assert_close(a, b, MASKED_TOL[dtype], "grad feat")
    # The loss alone: gradients through the partners, softmax, warps and distances.
    (a,) = torch.autograd.grad(got.loss, leaves[:1], retain_graph=True)
    (b,) = torch.autograd.grad(want.loss, leaves[:1])
    _assert_close(a, b, MASKED_TOL[dtype], "grad loss")
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "case",
    [
        (2, 1, 1, 1, 1),  # N = 4, one position: masks are all zero
        (2, 2, 3, 4, 3),
        (8, 4, 16, 6, 3),  # LbA batch (N = 64), lba_pairs(8, 4)
        (2, 2, 2048, 3, 2),  # LbA channels
        (2, 1, 8, 36, 18),  # 648 positions (blocked kernels)
    ],
    ids=lambda c: "x".join(map(str, c)),
)
def test_cmalign_matches_reference(device, dtype, case):
    feat, pos_idx, neg_idx = _cmalign_case(*case, dtype=dtype, device=device, seed=30)
    _check_cmalign(feat, pos_idx, neg_idx)


def test_cmalign_arbitrary_partners(device):
    """Repeated partners, self-pairs and int32 indices: gradients accumulate over every use of a row."""
    dtype = torch.float64
    feat = _dyadic_maps((5, 6, 4, 3), dtype, device, seed=32).requires_grad_()
    pos_idx = torch.tensor([1, 1, 1, 0, 4], dtype=torch.int32)
    neg_idx = torch.tensor([2, 3, 2, 2, 0])
    _check_cmalign(feat, pos_idx, neg_idx, temperature=7.0, margin=0.5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cmalign_mask_channel_path(device, dtype, monkeypatch):
    """cmalign without the probability cache (CUDA, or CPU volumes over the cap): the partner mask
    rides along as an extra value channel.  Forced on CPU by a zero cache cap."""
    monkeypatch.setenv("REID_KERNELS_SOFT_WARP_CACHE_BYTES", "0")
    feat, pos_idx, neg_idx = _cmalign_case(2, 2, 8, 4, 3, dtype, device, seed=36)
    _check_cmalign(feat, pos_idx, neg_idx)


def test_cmalign_layouts(device):
    dtype = torch.float64
    base = _dyadic_maps((8, 6, 4, 3), dtype, device, seed=33).requires_grad_()
    feat = base.to(memory_format=torch.channels_last)
    pos_idx, neg_idx = reid_kernels.lba_pairs(2, 2, generator=torch.Generator().manual_seed(33))
    _check_cmalign(feat, pos_idx, neg_idx, leaves=(base,))
    wide = _dyadic_maps((8, 12, 4, 3), dtype, device, seed=34).requires_grad_()
    _check_cmalign(wide[:, 1::2], pos_idx, neg_idx, leaves=(wide,))


@pytest.mark.parametrize("temperature", [1e-3, 1e3])
def test_cmalign_extreme_temperatures(device, temperature):
    feat, pos_idx, neg_idx = _cmalign_case(2, 2, 8, 4, 3, torch.float64, device, seed=35)
    out = _check_cmalign(feat, pos_idx, neg_idx, temperature=temperature)
    assert all(torch.isfinite(t).all() for t in out)


@pytest.mark.parametrize("fill", [0.0, 1.0])
def test_cmalign_degenerate_features(device, fill):
    """Constant or all-zero maps: zero masks and co-attention, finite loss (= 0) and gradients."""
    feat = torch.full((4, 5, 3, 2), fill, dtype=torch.float64, device=device, requires_grad=True)
    pos_idx, neg_idx = reid_kernels.lba_pairs(2, 1, generator=torch.Generator().manual_seed(36))
    out = _check_cmalign(feat, pos_idx, neg_idx)
    assert torch.equal(out.comask, torch.zeros_like(out.comask))
    (grad,) = torch.autograd.grad(out.loss, feat)
    assert torch.isfinite(grad).all()


def test_cmalign_on_meta_device():
    """Shapes and dtypes through the fake kernels (torch.compile's view of the ops)."""
    feat = torch.empty(16, 32, 18, 9, device="meta")
    pos_idx, neg_idx = reid_kernels.lba_pairs(4, 2)
    out = reid_kernels.cmalign(feat, pos_idx, neg_idx)
    assert out.recon_pos.shape == out.recon_neg.shape == feat.shape
    assert out.comask.shape == (16, 18, 9) and out.loss.shape == ()
    warped = reid_kernels.soft_warp(feat, torch.empty(16, 32, 5, 4, device="meta"), torch.empty(16, 3, 5, 4, device="meta"))
    assert warped.shape == (16, 3, 18, 9) and warped.device.type == "meta"
    assert reid_kernels.person_mask(feat).shape == (16, 18, 9)


# ---------------------------------------------------------------------------
# nn.CMAlign


def test_module_matches_functional(device):
    module = CMAlign(temperature=20.0, margin=0.2, num_pos=2)
    feat_v = _dyadic_maps((6, 8, 4, 3), torch.float64, device, seed=40).requires_grad_()
    feat_t = _dyadic_maps((6, 8, 4, 3), torch.float64, device, seed=41).requires_grad_()
    pos_idx, neg_idx = reid_kernels.lba_pairs(3, 2, generator=torch.Generator().manual_seed(42))
    out = module(feat_v, feat_t, pos_idx, neg_idx)
    expected = reference.cmalign(torch.cat([feat_v, feat_t]), pos_idx, neg_idx, 20.0, 0.2)
    for name in out._fields:
        _assert_close(getattr(out, name), getattr(expected, name), MASKED_TOL[torch.float64], name)
    # Drawn partners: a seeded generator reproduces lba_pairs' draw.
    drawn = module(feat_v, feat_t, generator=torch.Generator().manual_seed(42))
    _assert_close(drawn.loss, out.loss, MASKED_TOL[torch.float64], "drawn pairs")
    drawn.loss.backward()
    assert feat_v.grad is not None and feat_t.grad is not None
    assert "temperature=20.0" in repr(module)


def test_module_passes_weighting_and_eps():
    module = CMAlign(temperature=20.0, margin=0.2, num_pos=2, weighting="lba-code", eps=1e-6)
    feat_v = _dyadic_maps((6, 8, 4, 3), torch.float64, "cpu", seed=43)
    feat_t = _dyadic_maps((6, 8, 4, 3), torch.float64, "cpu", seed=44)
    pos_idx, neg_idx = reid_kernels.lba_pairs(3, 2, generator=torch.Generator().manual_seed(45))
    out = module(feat_v, feat_t, pos_idx, neg_idx)
    feat = torch.cat([feat_v, feat_t])
    code = reference.cmalign(feat, pos_idx, neg_idx, 20.0, 0.2, weighting="lba-code", eps=1e-6)
    paper = reference.cmalign(feat, pos_idx, neg_idx, 20.0, 0.2)
    _assert_close(out.loss, code.loss, MASKED_TOL[torch.float64], "lba-code loss")
    assert abs(float(out.loss) - float(paper.loss)) > 1e-6
    assert "weighting='lba-code'" in repr(module)
    with pytest.raises(ValueError, match="weighting"):
        CMAlign(weighting="broadcast")
    with pytest.raises(ValueError, match="eps"):
        CMAlign(eps=-1.0)


# ---------------------------------------------------------------------------
# Operator registration: opcheck and torch.compile


def _op_args(device):
    g = torch.Generator().manual_seed(50)
    q = torch.randn(2, 4, 6, generator=g).to(device)
    k = torch.randn(2, 4, 5, generator=g).to(device)
    v = torch.randn(2, 3, 5, generator=g).to(device)
    return q, k, v


def test_opcheck_person_mask(device):
    q, _, _ = _op_args(device)
    torch.library.opcheck(torch.ops.reid_kernels.person_mask.default, (q,))
    torch.library.opcheck(torch.ops.reid_kernels.person_mask.default, (q.clone().requires_grad_(),))


def test_opcheck_soft_warp(device):
    q, k, v = _op_args(device)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(torch.ops.reid_kernels.soft_warp_fwd.default, (*leaves, 5.0))
    out, _, probs = torch.ops.reid_kernels.soft_warp_fwd(q, k, v, 5.0)
    torch.library.opcheck(torch.ops.reid_kernels.soft_warp_bwd.default, (torch.randn_like(out), q, k, v, out, probs, 5.0))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("fill", [None, 0.0])
def test_soft_warp_probability_cache(device, dtype, fill):
    """soft_warp_fwd's probability cache: (N, Lq, Lk) softmax on CPU, empty on CUDA; the backward
    from the cache equals the backward that recomputes the probabilities (empty cache)."""
    g = torch.Generator().manual_seed(53)
    q = torch.randn(3, 8, 10, generator=g, dtype=dtype).to(device)
    k = torch.randn(3, 8, 7, generator=g, dtype=dtype).to(device)
    v = torch.randn(3, 5, 7, generator=g, dtype=dtype).to(device)
    if fill is not None:  # all-zero columns: clamped norms, no radial gradient term
        q[:, :, 2] = fill
        k[:, :, 4] = fill
    out, lse, probs = torch.ops.reid_kernels.soft_warp_fwd(q, k, v, 5.0)
    if device.type != "cpu":
        assert probs.shape == (0,)
        return
    assert probs.shape == (3, 10, 7) and probs.dtype == dtype
    q_hat = torch.nn.functional.normalize(q, dim=1, eps=1e-12)
    k_hat = torch.nn.functional.normalize(k, dim=1, eps=1e-12)
    expected = torch.softmax(5.0 * q_hat.transpose(1, 2) @ k_hat, dim=2)
    _assert_close(probs, expected, TOL[dtype], "probs")
    grad_out = torch.randn(out.shape, generator=g, dtype=dtype)
    cached = torch.ops.reid_kernels.soft_warp_bwd(grad_out, q, k, v, out, probs, 5.0)
    recomputed = torch.ops.reid_kernels.soft_warp_bwd(grad_out, q, k, v, out, probs.new_empty(0), 5.0)
    for name, a, b in zip(("query", "key", "value"), cached, recomputed):
        _assert_close(a, b, TOL[dtype], f"grad_{name}")
    # With the cache, the CPU backward accepts an empty `out` (cmalign reuses that buffer).
    no_out = torch.ops.reid_kernels.soft_warp_bwd(grad_out, q, k, v, out.new_empty(0), probs, 5.0)
    for name, a, b in zip(("query", "key", "value"), no_out, cached):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"grad_{name} without out: {m}")


def test_soft_warp_probability_cache_shape_rule():
    """The fake kernel's cache rule: CPU up to 256 MiB of accumulation-dtype elements, else empty."""
    from reid_kernels._ops import _soft_warp_probs_shape, soft_warp_prob_cache_bytes

    def maps(n, length, dtype=torch.float32, device="cpu"):  # stride-0 views: no memory
        return torch.zeros((), dtype=dtype, device=device).expand(n, 4, length)

    assert soft_warp_prob_cache_bytes() == 256 << 20
    assert _soft_warp_probs_shape(maps(64, 162), maps(64, 162)) == (64, 162, 162)
    assert _soft_warp_probs_shape(maps(1, 8192), maps(1, 8192)) == (1, 8192, 8192)  # exactly 256 MiB
    assert _soft_warp_probs_shape(maps(1, 8193), maps(1, 8192)) == (0,)
    assert _soft_warp_probs_shape(maps(1, 8192, torch.float64), maps(1, 8192, torch.float64)) == (0,)
    assert _soft_warp_probs_shape(maps(1, 8192, torch.float16), maps(1, 8192, torch.float16)) == (1, 8192, 8192)
    assert _soft_warp_probs_shape(maps(2, 3, device="meta"), maps(2, 3, device="meta")) == (0,)


def test_torch_compile_fullgraph(device):
    """A small LbA-like model compiles without graph breaks, forward and backward, and matches eager."""

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 1)
            self.align = CMAlign(temperature=10.0)

        def forward(self, img_v, img_t, pos_idx, neg_idx):
            fv, ft = self.conv(img_v).relu(), self.conv(img_t).relu()
            out = self.align(fv, ft, pos_idx, neg_idx)
            warped = reid_kernels.soft_warp(fv, ft, temperature=5.0)
            return out.loss + warped.mean() + reid_kernels.person_mask(fv).mean()

    torch.manual_seed(51)
    model = Model().to(device=device, dtype=torch.float64)
    img_v = torch.randn(4, 3, 6, 3, dtype=torch.float64, device=device)
    img_t = torch.randn(4, 3, 6, 3, dtype=torch.float64, device=device)
    pos_idx, neg_idx = reid_kernels.lba_pairs(2, 2, generator=torch.Generator().manual_seed(52))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss_c = compiled(img_v, img_t, pos_idx, neg_idx)
    (grad_c,) = torch.autograd.grad(loss_c, model.conv.weight)
    loss_e = model(img_v, img_t, pos_idx, neg_idx)
    (grad_e,) = torch.autograd.grad(loss_e, model.conv.weight)
    _assert_close(loss_c, loss_e, TOL[torch.float64], "loss")
    _assert_close(grad_c, grad_e, TOL[torch.float64], "grad")
