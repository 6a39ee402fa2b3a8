"""The CUDA kernels of masked_dense_triplet_fwd / _bwd
(csrc/dense_triplet/masked_dense_triplet_kernels.cuh), executed on the CPU emulator of CUDA
(tests/cuda_emu/), plain and under ThreadSanitizer, against a float64 autograd evaluation of
LbA eqs. 10-11 (reid_kernels.reference.masked_dense_triplet, reduction="none") on the same
inputs, and against the CPU op.

float32 / float64 / float16 (and one bfloat16 case), positions not a multiple of the 32-wide
tile, several anchors, active and inactive hinges, and positions where a distance is exactly 0
(the gradient of that term is 0 there).  Each case runs forward and backward; all cases of a
flavour run in one harness process.

Tolerances, from the errors measured on these cases (worst case, absolute): float32 loss
3.6e-7, gradients 1.3e-7 (float32 sums of <= 70 squares of O(1) values) -> atol 2e-6 / 1e-6 with
rtol 1e-5; float64 loss 2e-15, gradients 3.3e-16 -> 1e-13; float16 loss 5.8e-4 (relative
4.1e-4), gradients 4.5e-4 (relative 4.7e-4); bfloat16 3.7e-3 / 1.9e-3 (relative 3.1e-3 /
3.8e-3): the float32 result is rounded once to the element type, so up to half a unit in its
last place, rtol 2^-10 (float16) / 2^-7 (bfloat16) plus an atol for values near 0.
"""
import pytest
import torch

import emu_util
from emu_util import emu_flavour  # noqa: F401  (fixture)
from reid_kernels import reference

pytestmark = emu_util.pytestmark
HARNESS = "masked_dense_triplet_harness"
TOLERANCE = {  # see the module docstring
    torch.float32: (dict(rtol=1e-5, atol=2e-6), dict(rtol=1e-5, atol=1e-6)),
    torch.float64: (dict(rtol=1e-13, atol=1e-13), dict(rtol=1e-13, atol=1e-13)),
    torch.float16: (dict(rtol=2**-10, atol=2**-12), dict(rtol=2**-10, atol=2**-16)),
    torch.bfloat16: (dict(rtol=2**-7, atol=2**-9), dict(rtol=2**-7, atol=2**-12)),
}


def _case(dtype, shape, margin, seed, zero_distances=False):
    n, c, l = shape
    gen = torch.Generator().manual_seed(seed)
    a, p, ng = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
    if zero_distances:  # d+ = 0 at positions 0 and 5 of anchor 0, d- = 0 at position 3 and the last one
        p[0, :, [0, 5]] = a[0, :, [0, 5]]
        # a negative close to the anchor there, so the hinge (0 - d- + margin) is active
        ng[0, :, [0, 5]] = a[0, :, [0, 5]] + 0.01 * torch.randn((c, 2), generator=gen, dtype=torch.float64)
        ng[0, :, [3, l - 1]] = a[0, :, [3, l - 1]]
    weight = torch.rand((n, l), generator=gen, dtype=torch.float64)
    grad = torch.randn((n, l), generator=gen, dtype=torch.float64)
    maps = [t.to(dtype) for t in (a, p, ng, weight, grad)]
    name = f"{str(dtype)[6:]}-{n}x{c}x{l}-m{margin}{'-zero' if zero_distances else ''}"
    return dict(name=name, dtype=dtype, anchor=maps[0], positive=maps[1], negative=maps[2], weight=maps[3],
                grad=maps[4], margin=margin)


def _cases():
    cases = []
    for dtype in (torch.float32, torch.float64, torch.float16):
        cases.append(_case(dtype, (2, 20, 45), 0.3, seed=1, zero_distances=True))  # 45 = 32 + 13: a padded tile
        cases.append(_case(dtype, (3, 9, 32), 1.0, seed=2))  # exactly one tile per anchor
        cases.append(_case(dtype, (1, 70, 7), 0.0, seed=3))  # one partial tile, C not a multiple of 8
    cases.append(_case(torch.bfloat16, (2, 16, 33), 0.5, seed=4, zero_distances=True))
    return cases


CASES = _cases()


def _inputs(cases):
    inputs = {"cases": len(cases)}
    for i, case in enumerate(cases):
        for key in ("anchor", "positive", "negative", "weight", "grad"):
            inputs[f"c{i}/{key}"] = case[key]
        inputs[f"c{i}/margin"] = float(case["margin"])
    return inputs


@pytest.fixture(scope="module", params=emu_util.emu_flavours)
def emulated(request):
    emu_util.skip_unless_available(request.param)
    out = emu_util.run(HARNESS, request.param, _inputs(CASES))
    return {case["name"]: {k: out[f"c{i}/{k}"] for k in ("loss", "grad_anchor", "grad_positive", "grad_negative")}
            for i, case in enumerate(CASES)}


def _expected(case):
    """Loss and gradients of eqs. 10-11 in float64 by autograd (vector_norm: gradient 0 at 0)."""
    leaves = [case[k].double().clone().requires_grad_(True) for k in ("anchor", "positive", "negative")]
    loss = reference.masked_dense_triplet(*leaves, case["weight"].double(), case["margin"], reduction="none")
    loss.backward(case["grad"].double())
    return loss.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_triplet_kernels_match_reference(emulated, case):
    got = emulated[case["name"]]
    loss, grads = _expected(case)
    loss_tol, grad_tol = TOLERANCE[case["dtype"]]
    assert got["loss"].dtype == case["dtype"]
    torch.testing.assert_close(got["loss"].double(), loss, **loss_tol)
    for name, want in zip(("grad_anchor", "grad_positive", "grad_negative"), grads):
        torch.testing.assert_close(got[name].double(), want, **grad_tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("case", [c for c in CASES if c["dtype"] in (torch.float32, torch.float64)],
                         ids=lambda c: c["name"])
def test_triplet_kernels_match_the_cpu_op(emulated, case):
    got = emulated[case["name"]]
    args = [case[k] for k in ("anchor", "positive", "negative", "weight")]
    loss = torch.ops.reid_kernels.masked_dense_triplet_fwd(*args, case["margin"])
    grads = torch.ops.reid_kernels.masked_dense_triplet_bwd(case["grad"], *args, case["margin"])
    loss_tol, grad_tol = TOLERANCE[case["dtype"]]
    torch.testing.assert_close(got["loss"], loss, **loss_tol)
    for name, want in zip(("grad_anchor", "grad_positive", "grad_negative"), grads):
        torch.testing.assert_close(got[name], want, **grad_tol)


def test_zero_distance_positions_have_zero_gradient_terms(emulated):
    """Where d+ = 0 the positive term is exactly 0 (grad_positive = 0); where d- = 0, the
    negative one (grad_negative = 0); the zero-distance case has active hinges there."""
    for case in (c for c in CASES if c["name"].endswith("-zero")):
        got = emulated[case["name"]]
        l = case["anchor"].shape[2]
        assert torch.equal(got["grad_positive"][0, :, [0, 5]], torch.zeros_like(got["grad_positive"][0, :, [0, 5]]))
        assert torch.equal(got["grad_negative"][0, :, [3, l - 1]],
                           torch.zeros_like(got["grad_negative"][0, :, [3, l - 1]]))
        # the other term at those positions is live (so the zeros are not just inactive hinges)
        assert (got["grad_negative"][0, :, [0, 5]] != 0).any()
        assert (got["grad_positive"][0, :, [3, l - 1]] != 0).any()
