"""CUDA-only tests that reach every variant of the CUDA kernels (`pytest -m cuda tests`).

* float16 / bfloat16 (and float32 / float64) for every operator;
* soft_warp's rows-per-block variants 32 / 8 / 1 (REID_KERNELS_SOFT_WARP_MAX_ROWS) and its tensor-core
  (WMMA) path for half types (REID_KERNELS_SOFT_WARP_TENSOR_CORES=1).  The kernels read both variables at
  every call (csrc/cmalign/soft_warp_cuda.cu: max_rows_from_env, tensor_cores_from_env), so
  monkeypatch.setenv reaches them;
* position counts that are not multiples of the tiles: a tile covers BN = 64 / 128 / 1024 key
  columns for 32 / 8 / 1 rows per block, and the WMMA path works in 32 x 64 tiles;
* more than 2^31 elements in a batch (64-bit offsets between samples), and the documented per-sample
  limit C * L < 2^31.

Tolerances: the reference runs in float64 on the same (already rounded) inputs.  The kernels
accumulate in float32 (float64 for float64), so the error is the final rounding to the input dtype
(half an ulp: 2^-11 relative for float16, 2^-8 for bfloat16) plus float32 accumulation
(<= ~1e-5 relative at t = 10); the bounds below are those, not yet measured on a GPU -- make gpu-check
records the measured errors.
"""
import pytest
import torch

import reid_kernels
from reid_kernels import reference
from conftest import requires_cuda

pytestmark = requires_cuda

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
TOL = {
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
    torch.float32: dict(rtol=1e-4, atol=5e-5),
    torch.float64: dict(rtol=1e-7, atol=1e-9),
}
MAX_ROWS = "REID_KERNELS_SOFT_WARP_MAX_ROWS"
TENSOR_CORES = "REID_KERNELS_SOFT_WARP_TENSOR_CORES"


def _maps(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device="cuda", dtype=dtype)


def _weighted_grads(out, inputs, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)
    return torch.autograd.grad((out.float() * w.float()).sum(), inputs)


def _relative_close(got, want, tol, what):
    """Compare at the scale of the expected values (gradients are not O(1))."""
    scale = want.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(got.double() / scale, want.double() / scale, **tol, msg=lambda m: f"{what}: {m}")


def _check_soft_warp(dtype, shape, temperature=10.0):
    n, c, lq, lk = shape
    q = _maps((n, c, lq, 1), dtype, 1).requires_grad_()
    k = _maps((n, c, lk, 1), dtype, 2).requires_grad_()
    v = _maps((n, 5, lk, 1), dtype, 3).requires_grad_()
    out = reid_kernels.soft_warp(q, k, v, temperature)
    assert out.dtype == dtype
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = reference.soft_warp(*leaves64, temperature)
    _relative_close(out, want, TOL[dtype], "out")
    for name, got, ref in zip("qkv", _weighted_grads(out, (q, k, v), 4), _weighted_grads(want, leaves64, 4)):
        assert got.dtype == dtype
        _relative_close(got, ref, TOL[dtype], f"grad_{name}")


# Lq, Lk: 1, a prime, 162 (18x9, LbA), around the BN tiles of the 32 / 8 / 1-row variants.
POSITIONS = [(1, 1), (37, 53), (162, 162), (65, 129), (200, 1030)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_rows", ["32", "8", "1"])
@pytest.mark.parametrize("positions", POSITIONS, ids=lambda p: f"{p[0]}x{p[1]}")
def test_soft_warp_every_rows_variant(monkeypatch, dtype, max_rows, positions):
    monkeypatch.setenv(MAX_ROWS, max_rows)
    monkeypatch.delenv(TENSOR_CORES, raising=False)
    _check_soft_warp(dtype, (3, 24, *positions))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("positions", POSITIONS + [(64, 64), (33, 65)], ids=lambda p: f"{p[0]}x{p[1]}")
@pytest.mark.parametrize("channels", [16, 24, 2048])  # 24: a partial 16-deep wmma chunk
def test_soft_warp_tensor_core_path(monkeypatch, dtype, positions, channels):
    monkeypatch.setenv(TENSOR_CORES, "1")
    monkeypatch.setenv(MAX_ROWS, "32")  # the wmma path needs 32-row tiles
    _check_soft_warp(dtype, (2, channels, *positions))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tensor_cores_only_change_the_summation_order(monkeypatch, dtype):
    """WMMA and FMA tiles multiply the same exact 16-bit products; the results differ by float32 rounding only."""
    q, k = _maps((2, 64, 162), dtype, 5), _maps((2, 64, 162), dtype, 6)
    monkeypatch.setenv(MAX_ROWS, "32")
    monkeypatch.delenv(TENSOR_CORES, raising=False)
    fma = torch.ops.reid_kernels.soft_warp_fwd(q, k, k, 10.0)
    monkeypatch.setenv(TENSOR_CORES, "1")
    wmma = torch.ops.reid_kernels.soft_warp_fwd(q, k, k, 10.0)
    torch.testing.assert_close(wmma[1], fma[1], rtol=1e-5, atol=1e-5)  # lse, float32
    _relative_close(wmma[0], fma[0].double(), TOL[dtype], "out")


def test_bad_max_rows_is_refused(monkeypatch):
    monkeypatch.setenv(MAX_ROWS, "16")
    q = _maps((1, 4, 8), torch.float32, 7)
    with pytest.raises(RuntimeError, match=f"{MAX_ROWS}: expected 1, 8 or 32, got '16'"):
        torch.ops.reid_kernels.soft_warp_fwd(q, q, q, 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_person_mask_every_dtype(dtype):
    feat = _maps((5, 40, 13, 7), dtype, 8).relu()
    mask = reid_kernels.person_mask(feat)
    assert mask.dtype == dtype
    _relative_close(mask, reference.person_mask(feat.double()), TOL[dtype], "mask")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_rows", ["32", "8", "1"])
def test_cmalign_every_dtype(monkeypatch, dtype, max_rows):
    monkeypatch.setenv(MAX_ROWS, max_rows)
    feat = _maps((8, 32, 9, 5), dtype, 9).relu().requires_grad_()
    pos_idx, neg_idx = reid_kernels.lba_pairs(2, 2, generator=torch.Generator().manual_seed(9))
    got = reid_kernels.cmalign(feat, pos_idx, neg_idx, temperature=10.0)
    feat64 = feat.detach().double().requires_grad_()
    want = reference.cmalign(feat64, pos_idx, neg_idx, temperature=10.0)
    for name in ("recon_pos", "recon_neg", "loss"):
        _relative_close(getattr(got, name), getattr(want, name), TOL[dtype], name)
    (grad,) = torch.autograd.grad(got.loss.float(), feat)
    (want_grad,) = torch.autograd.grad(want.loss, feat64)
    # The loss goes through a min-max co-attention and a hinge: a rounding can flip a hinge's side.
    # Compare the gradients at 4x the dtype tolerance (still far below a wrong kernel's error).
    loose = {key: 4 * value for key, value in TOL[dtype].items()}
    _relative_close(grad, want_grad, loose, "grad")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_memory_update_half_banks(dtype):
    memory = torch.nn.functional.normalize(_maps((10, 64), torch.float64, 10), dim=1)
    features = torch.nn.functional.normalize(_maps((12, 64), torch.float64, 11), dim=1).float()
    labels = torch.tensor([3, 1, 3, 0, 9, 3, 1, 1, 0, 2, 2, 9], device="cuda")
    for mode in ("sequential", "mean", "hard"):
        bank = memory.to(dtype)
        expected = reference.memory_update_(bank.clone(), features, labels, 0.5, mode=mode)
        reid_kernels.memory_update_(bank, features, labels, 0.5, mode=mode)
        torch.testing.assert_close(bank.float(), expected.float(), **TOL[dtype])


# ---------------------------------------------------------------------------
# 64-bit indexing


def _free_bytes():
    return torch.cuda.mem_get_info()[0]


def test_person_mask_beyond_2_31_elements():
    """N * C * L > 2^31 (per sample < 2^31): the last sample's offsets need 64 bits."""
    n, c, l = 2, 1 << 15, (1 << 15) + 8  # 2.15e9 elements, 4.3 GB in float16
    if _free_bytes() < 3 * n * c * l * 2:
        pytest.skip("needs ~13 GB of free GPU memory")
    feat = torch.empty((n, c, l), dtype=torch.float16, device="cuda")
    feat[0].fill_(0.5)
    torch.rand((c, l), generator=torch.Generator("cuda").manual_seed(12), device="cuda", dtype=torch.float16,
               out=feat[1])
    assert feat.numel() > 2**31
    mask = torch.ops.reid_kernels.person_mask(feat)
    want = reference.person_mask(feat[1:].view(1, c, l, 1).float()).view(1, l)
    _relative_close(mask[1:].float(), want.double(), TOL[torch.float16], "last sample")
    assert torch.equal(mask[0], torch.zeros_like(mask[0]))


def test_soft_warp_per_sample_limit_is_documented():
    """C * L >= 2^31 in one sample: refused by name before any launch (the kernels index samples in 32 bits)."""
    c, l = 1 << 16, (1 << 15) + 1  # C * L just over 2^31, 4.3 GB in float16
    if _free_bytes() < 2 * c * l * 2:
        pytest.skip("needs ~9 GB of free GPU memory")
    big = torch.zeros((1, c, l), dtype=torch.float16, device="cuda")
    with pytest.raises(RuntimeError, match=r"query: expected C \* L < 2\^31 per sample"):
        torch.ops.reid_kernels.soft_warp_fwd(big, big[:, :, :1].contiguous(), big[:, :1, :1].contiguous(), 1.0)
