"""The CUDA kernels of person_mask (csrc/cmalign/person_mask_kernels.cuh: the column-norm
kernel of eq. 5 and the per-sample min-max of eqs. 6-7), executed on the CPU emulator of CUDA
(tests/cuda_emu/), plain and under ThreadSanitizer, against reid_kernels.reference.person_mask's
formula in float64 on the same (rounded) inputs.

Cases: float32 / float64 / float16 / bfloat16 maps with C = 20 channels (8 channel classes per
column block, a remainder) and L = 300 positions (10 column tiles of 32, the last partial; more
positions than the min-max block's 256 threads), four samples each: a NaN at one position (the
whole sample's mask is NaN, as torch's min / max propagate it), a constant and an all-zero
sample (mask 0, the eps guard), a random one (untouched by the others); and a float32 map whose
minimum and maximum sit in a different warp of the min-max block for every sample.  All cases
of a flavour run in one harness process.

Tolerances (absolute; the mask is in [0, 1]), from the measured errors on these cases:
  float32 mask 2.2e-7, norms 1.3e-7 relative  -> 1e-6
  float64 mask 7.8e-16, norms 3.8e-16         -> 1e-13
  float16 mask 2.4e-4 (output rounding)       -> 1e-3
  bfloat16 mask 1.9e-3 (output rounding)      -> 8e-3
"""
import pytest
import torch

import emu_util
from reid_kernels import reference

pytestmark = emu_util.pytestmark
HARNESS = "person_mask_harness"
MASK_ATOL = {torch.float32: 1e-6, torch.float64: 1e-13, torch.float16: 1e-3, torch.bfloat16: 8e-3}
NORM_RTOL = {torch.float32: 1e-6, torch.float64: 1e-13, torch.float16: 1e-6, torch.bfloat16: 1e-6}
WARP_STRIDE = 32  # the min-max block's thread l handles positions l, l + 256, ...: warp w owns 32w..32w+31


def _extremes_in_every_warp(dtype):
    """Sample n has its largest column in warp n's positions and its smallest in warp n+1's, so
    the result depends on every warp's partial min / max."""
    gen = torch.Generator().manual_seed(20)
    N, C, L = 8, 20, 300
    feat = 0.5 + 0.1 * torch.rand(N, C, L, generator=gen, dtype=torch.float64)
    for n in range(N):
        feat[n, :, WARP_STRIDE * n + 5] *= 3.0
        feat[n, :, WARP_STRIDE * ((n + 1) % 8) + 9] *= 0.2
    return dict(name=f"{str(dtype)[6:]}-extremes-in-every-warp", dtype=dtype, feat=feat.to(dtype))


def _special_samples(dtype):
    """Sample 0: one NaN at position 200 (thread 200, warp 6); sample 1: every column the same
    (constant norm); sample 2: all zeros; sample 3: random (untouched by the others)."""
    gen = torch.Generator().manual_seed(21)
    N, C, L = 4, 20, 300
    feat = torch.randn(N, C, L, generator=gen, dtype=torch.float64)
    feat[0, 7, 200] = float("nan")
    feat[1] = torch.randn(C, 1, generator=gen, dtype=torch.float64).expand(C, L)
    feat[2] = 0.0
    return dict(name=f"{str(dtype)[6:]}-nan-constant-zero", dtype=dtype, feat=feat.to(dtype))


DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
CASES = [_special_samples(d) for d in DTYPES] + [_extremes_in_every_warp(torch.float32)]


@pytest.fixture(scope="module", params=emu_util.emu_flavours)
def emulated(request):
    """{case name: (mask, norms)}, every case in one process per flavour."""
    emu_util.skip_unless_available(request.param)
    inputs = {"cases": len(CASES)}
    inputs.update({f"c{i}/feat": case["feat"] for i, case in enumerate(CASES)})
    out = emu_util.run(HARNESS, request.param, inputs)
    return {case["name"]: (out[f"c{i}/mask"], out[f"c{i}/norms"]) for i, case in enumerate(CASES)}


def _reference(feat):
    """eqs. 5-7 in float64: reference.person_mask's formula on the float64 copy of the map."""
    feat64 = feat.double()
    return reference.person_mask(feat64), torch.linalg.vector_norm(feat64, dim=1)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_person_mask_kernels_match_reference(emulated, case):
    mask, norms = emulated[case["name"]]
    want_mask, want_norms = _reference(case["feat"])
    dtype = case["dtype"]
    assert mask.dtype == dtype and mask.shape == want_mask.shape
    assert norms.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(norms.double(), want_norms, rtol=NORM_RTOL[dtype], atol=0, equal_nan=True)
    torch.testing.assert_close(mask.double(), want_mask, rtol=0, atol=MASK_ATOL[dtype], equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d)[6:] for d in DTYPES])
def test_person_mask_nan_poisons_only_its_sample_and_constant_maps_give_zero(emulated, dtype):
    mask, _ = emulated[f"{str(dtype)[6:]}-nan-constant-zero"]
    assert torch.isnan(mask[0]).all(), "a NaN norm makes the whole sample's mask NaN (torch's min / max)"
    assert (mask[1] == 0).all() and (mask[2] == 0).all(), "constant / zero maps normalise to 0 (eps guard)"
    assert torch.isfinite(mask[3]).all() and mask[3].min() == 0 and mask[3].max() > 0.99


def test_person_mask_extremes_reach_0_and_1_in_every_sample(emulated):
    mask, _ = emulated["float32-extremes-in-every-warp"]
    for n in range(mask.shape[0]):
        assert mask[n, WARP_STRIDE * n + 5] > 1 - 1e-6 and mask[n, WARP_STRIDE * ((n + 1) % 8) + 9] == 0, n
