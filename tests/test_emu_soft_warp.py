"""The CUDA kernels of soft_warp (csrc/cmalign/soft_warp_kernels.cuh), forward and backward,
executed on the CPU emulator of CUDA (tests/cuda_emu/), plain and under ThreadSanitizer, against
reid_kernels.reference.soft_warp (float64 autograd on the same rounded inputs).

The harness (tests/cuda_emu/soft_warp_harness.cpp) calls the launch functions soft_warp_cuda.cu
calls, with the rows-per-block cap and the tensor-core switch parsed from the values the env
variables REID_KERNELS_SOFT_WARP_MAX_ROWS / _TENSOR_CORES would hold, and the device's opt-in
shared memory as a number.  Every variant the CUDA build ships: 32, 8 and 1 query rows per block
(and the choice by slab size on a 48 KiB device, where the backward's two kernels pick different
variants), float32 / float64 / float16 / bfloat16, the tensor-core (wmma) path of float16 /
bfloat16 through the emulator's stub -- which checks fragment staging and indexing but NOT
tensor-core numerics (it sums in float in k order) -- and the float64 slab that needs the
shared-memory opt-in, whose size the emulator checks against the limit the launch asked for.
Shapes cover several tiles with remainders in every tiled dimension (query rows, key columns,
channel chunks, value channels), key maps larger and smaller than the query, a value with its
own channel count, two samples (the per-sample offsets).  All cases of a flavour run in one
harness process.

Errors are max |got - ref| / max |ref| per output (out, grad_query, grad_key, grad_value);
measured on these cases (worst over the cases of a dtype), and the tolerance set from it:
  float32   7.6e-7 at t = 10, 3.3e-6 at t = 50 (logit errors scale with t)  -> 1e-5
  float64   1.8e-15                                                        -> 1e-13
  float16   5.4e-4 (the outputs' rounding to float16: 2^-11 = 4.9e-4)     -> 1.5e-3
  bfloat16  3.7e-3 (the outputs' rounding to bfloat16: 2^-8 = 3.9e-3)     -> 1.2e-2
lse (float32 output) vs float64 logsumexp_q(t S), relative to max |lse|: 2.9e-7 -> 2e-6;
float64's recomputed lse 5.8e-16 -> 1e-13.  The backward's recomputed lse is bitwise the
forward's (same code path, same order), rounded to float32.
"""
import math

import pytest
import torch

import emu_util
from reid_kernels import reference

pytestmark = emu_util.pytestmark
HARNESS = "soft_warp_harness"
H100_OPTIN = 232448  # sharedMemPerBlockOptin of an H100 (and the emulator's default limit)
DEFAULT_SMEM = 48 * 1024  # a kernel's dynamic shared memory without the opt-in

TOLERANCE = {  # relative to max |ref| of each output; see the module docstring
    torch.float32: 1e-5,
    torch.float64: 1e-13,
    torch.float16: 1.5e-3,
    torch.bfloat16: 1.2e-2,
}
LSE_RTOL = 2e-6  # float32 lse, relative to max |lse|; see the module docstring
LSE_ACC_RTOL_FLOAT64 = 1e-13


def _case(name, dtype, N, C, Cv, Lq, Lk, rows, max_rows="", tensor_cores="", max_smem=H100_OPTIN,
          backward=True, temperature=10.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    maps = {k: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype) for k, shape in
            (("query", (N, C, Lq)), ("key", (N, C, Lk)), ("value", (N, Cv, Lk)), ("grad_out", (N, Cv, Lq)))}
    return dict(name=name, dtype=dtype, rows=rows, max_rows=max_rows, tensor_cores=tensor_cores,
                max_smem=max_smem, backward=backward, temperature=temperature, **maps)


F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16

# rows: the (forward, backward kernel A, backward kernel B) rows per block the launch must pick.
# Tiles: 32 rows -> 64 key columns per tile, 16-channel chunks, 32-column chunks of the value
# projection, 128 value channels per chunk; 8 rows -> 128 / 16 / 32 / 128; 1 row -> 1024 / 4 / 8 / 1024.
CASES = [
    # 32 rows: Lq 40 = 32 + 8, Lk 70 = 64 + 6 (and 2 x 32 + 6), C 20 = 16 + 4; two samples
    _case("f32-32rows-key-larger", F32, 2, 20, 13, 40, 70, (32, 32, 32)),
    # key smaller than the query, 130 value channels = 128 + 2, LbA's temperature 50
    _case("f32-32rows-key-smaller-wide-value", F32, 1, 20, 130, 70, 40, (32, 32, 32), temperature=50.0, seed=1),
    # 8 rows (env cap): Lq 20 = 2 x 8 + 4, Lk 140 = 128 + 12
    _case("f32-8rows", F32, 1, 20, 13, 20, 140, (8, 8, 8), max_rows="8", seed=2),
    # 1 row (env cap): the softmax runs its shuffles in warp 0 alone while the other warps wait
    _case("f32-1row", F32, 2, 6, 5, 6, 10, (1, 1, 1), max_rows="1", seed=3),
    # a 48 KiB device, no env cap: the choice by slab size.  A slab over Lk 1030 fits one row
    # only (2 column tiles of 1024, 129 value chunks of 8); forward only, to keep it fast
    _case("f32-48k-device-1row-two-tiles", F32, 1, 6, 5, 2, 1030, (1, 1, 32), max_smem=DEFAULT_SMEM,
          backward=False, seed=4),
    # ... and the backward's two kernels pick different variants: Lk 200 fits 8 rows, Lq 12 fits 32
    _case("f32-48k-device-8-and-32-rows", F32, 1, 20, 13, 12, 200, (8, 8, 32), max_smem=DEFAULT_SMEM, seed=16),
    # float64 with 32 rows: a 66 KB slab, launched only through the shared-memory opt-in
    _case("f64-32rows-optin", F64, 1, 20, 13, 40, 70, (32, 32, 32), seed=5),
    _case("f64-8rows", F64, 1, 20, 13, 20, 30, (8, 8, 8), max_rows="8", seed=6),
    _case("f64-1row", F64, 1, 6, 5, 6, 10, (1, 1, 1), max_rows="1", seed=7),
    _case("f16-32rows", F16, 1, 20, 13, 40, 70, (32, 32, 32), seed=8),
    _case("f16-8rows", F16, 1, 20, 13, 20, 30, (8, 8, 8), max_rows="8", seed=9),
    _case("f16-1row", F16, 1, 6, 5, 6, 10, (1, 1, 1), max_rows="1", seed=10),
    _case("bf16-32rows", BF16, 1, 20, 13, 40, 70, (32, 32, 32), seed=11),
    _case("bf16-8rows", BF16, 1, 20, 13, 20, 30, (8, 8, 8), max_rows="8", seed=12),
    _case("bf16-1row", BF16, 1, 6, 5, 6, 10, (1, 1, 1), max_rows="1", seed=13),
    # the tensor-core switch on: logits and dP through nvcuda::wmma (the emulator's stub)
    _case("f16-32rows-wmma", F16, 1, 20, 13, 40, 70, (32, 32, 32), tensor_cores="1", seed=14),
    _case("bf16-32rows-wmma", BF16, 1, 20, 13, 40, 70, (32, 32, 32), tensor_cores="1", seed=15),
]

# The 64-bit offset helpers at sizes beyond 2^31: (n, rows, cols) with rows * cols < 2^31 (the
# host's per-sample check) and n < 65536 (the grid's y limit).
SAMPLE_OFFSET_ARGS = [(65534, 2048, 1048575), (1, 2**31 - 1, 1), (40000, 3, 700000000), (0, 2048, 1048575)]
BLOCK_FIRST_ROW_ARGS = [(2**31 - 1, 32), (2**31 - 1, 1), (134217727, 8), (5, 32)]
# rows_per_block(cols, element bytes, max_smem, max_rows) on an H100 unless said, and what the
# soft_warp_kernels.cuh header comment promises: an 18x9 map (Lk 162) in 32-row blocks, 41 KB;
# a 72x36 map (Lk 2592) in 8-row blocks, 103 KB; maps up to ~50k positions (49000 here) row by row.
SLAB_ARGS = [(162, 4, H100_OPTIN, 32), (2592, 4, H100_OPTIN, 32), (49000, 4, H100_OPTIN, 32),
             (60000, 4, H100_OPTIN, 32), (162, 4, H100_OPTIN, 8), (162, 4, H100_OPTIN, 1), (100, 8, DEFAULT_SMEM, 32)]


def _inputs():
    inputs = {"cases": len(CASES) + 1}
    for i, case in enumerate(CASES):
        p = f"c{i}/"
        inputs.update({p + "kind": emu_util.text("bwd" if case["backward"] else "fwd"),
                       p + "temperature": float(case["temperature"]),
                       p + "max_rows_env": emu_util.text(case["max_rows"]),
                       p + "tensor_cores_env": emu_util.text(case["tensor_cores"]),
                       p + "max_smem": int(case["max_smem"])})
        for k in ("query", "key", "value", "grad_out"):
            inputs[p + k] = case[k]
    p = f"c{len(CASES)}/"
    inputs.update({p + "kind": emu_util.text("offsets"),
                   p + "sample_args": torch.tensor(SAMPLE_OFFSET_ARGS, dtype=torch.int64),
                   p + "block_args": torch.tensor(BLOCK_FIRST_ROW_ARGS, dtype=torch.int64),
                   p + "slab_args": torch.tensor(SLAB_ARGS, dtype=torch.int64)})
    return inputs


@pytest.fixture(scope="module", params=emu_util.emu_flavours)
def emulated(request):
    """{case name: {output: tensor}}, every case in one process per flavour."""
    emu_util.skip_unless_available(request.param)
    out = emu_util.run(HARNESS, request.param, _inputs())
    results = {}
    for i, case in enumerate(CASES + [dict(name="offsets")]):
        prefix = f"c{i}/"
        results[case["name"]] = {k[len(prefix):]: v for k, v in out.items() if k.startswith(prefix)}
    return results


def _reference(case):
    """out, lse and the three gradients in float64 from the case's (rounded) inputs."""
    # a copy even for float64 inputs (.double() would return the case's own tensor, whose .grad
    # would then accumulate over calls)
    q, k, v = (case[n].to(torch.float64, copy=True).requires_grad_() for n in ("query", "key", "value"))
    t = case["temperature"]
    out = reference.soft_warp(q, k, v, t)
    out.backward(case["grad_out"].double())
    logits = t * torch.einsum("ncp,ncq->npq", torch.nn.functional.normalize(q.detach(), dim=1),
                              torch.nn.functional.normalize(k.detach(), dim=1))  # eq. 1
    lse = torch.logsumexp(logits, dim=-1)  # eq. 2's normaliser
    return dict(out=out.detach(), lse=lse, grad_query=q.grad, grad_key=k.grad, grad_value=v.grad)


def _relative_error(got, want):
    assert torch.isfinite(got).all(), "non-finite values (an element no thread wrote reads NaN)"
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_soft_warp_kernels_match_reference(emulated, case):
    got, want = emulated[case["name"]], _reference(case)
    assert got["rows"].tolist() == list(case["rows"]), "the launch picked another rows-per-block variant"
    tol = TOLERANCE[case["dtype"]]
    outputs = ("out", "grad_query", "grad_key", "grad_value") if case["backward"] else ("out",)
    for name in outputs:
        assert got[name].dtype == case["dtype"] and got[name].shape == want[name].shape
        err = _relative_error(got[name], want[name])
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol:g}"


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_soft_warp_lse_is_the_logsumexp_of_the_scaled_cosines(emulated, case):
    got, want = emulated[case["name"]], _reference(case)
    assert got["lse"].dtype == torch.float32
    err = _relative_error(got["lse"], want["lse"])
    assert err <= LSE_RTOL, f"lse: relative error {err:.3g} > {LSE_RTOL:g}"
    if case["backward"]:
        lse_acc = got["lse_acc"]
        # the backward recomputes P with the forward's code path: the same lse, bit for bit
        assert torch.equal(lse_acc.float(), got["lse"])
        if case["dtype"] == torch.float64:
            err = _relative_error(lse_acc, want["lse"])
            assert err <= LSE_ACC_RTOL_FLOAT64, f"recomputed float64 lse: relative error {err:.3g}"


def test_float64_32_row_slab_needs_the_shared_memory_opt_in(emulated):
    # The emulator refuses a launch above 48 KiB unless the kernel opted in, so this case ran
    # only because the launch code raised the kernel's limit (scripts/mutate.py 227 skips it).
    smem = emulated["f64-32rows-optin"]["smem"].tolist()
    assert all(DEFAULT_SMEM < s <= H100_OPTIN for s in smem), smem


def test_offset_helpers_are_64_bit_beyond_2_to_the_31(emulated):
    got = emulated["offsets"]
    assert got["sample_offset"].tolist() == [n * r * c for n, r, c in SAMPLE_OFFSET_ARGS]
    assert got["block_first_row"].tolist() == [b * r for b, r in BLOCK_FIRST_ROW_ARGS]


def test_rows_per_block_keeps_the_header_comments_promises(emulated):
    got = emulated["offsets"]
    rows, smem = got["slab_rows"].tolist(), got["slab_smem"].tolist()
    assert rows[0] == 32 and math.isclose(smem[0] / 1000, 41, abs_tol=1), (rows[0], smem[0])  # 18x9, 41 KB
    assert rows[1] == 8 and math.isclose(smem[1] / 1000, 103, abs_tol=1), (rows[1], smem[1])  # 72x36, 103 KB
    assert rows[2] == 1 and smem[2] <= H100_OPTIN  # 49k positions: one row per block still fits
    assert rows[3] == 0  # 60k positions: not even one row; the op refuses the call
    assert rows[4:6] == [8, 1]  # the env cap lowers the rows of a map that fits 32
    assert rows[6] == 8 and smem[6] <= DEFAULT_SMEM  # 100 float64 columns on a 48 KiB device
