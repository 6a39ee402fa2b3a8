"""The CUDA kernel of memory_update_ (csrc/memory/memory_update_kernels.cuh), executed on the
CPU emulator of CUDA (tests/cuda_emu/), plain and under ThreadSanitizer, against
reid_kernels.reference.memory_update_.

Every mode (sequential / mean / hard) x momentum convention (old / new, mapped to the weight of
the old row by reid_kernels.memory, as the op receives it) x normalize, with repeated labels,
on float32 / float64 / float16 / bfloat16 banks, and rows too wide for shared memory (the
kernel's global-scratch path).  All cases of a flavour run in one harness process.

Tolerances, from the errors measured on these cases (worst case, absolute; unit-norm rows):
float32 banks 1.2e-7 (block_sum's tree order vs torch's sum) -> 1e-6; float64 1.1e-16 ->
1e-14; float16 / bfloat16 banks 0, but the float32 results, which differ by ~1e-7, are rounded
once to the bank's dtype and may land on neighbouring values at a tie: one or two units in the
last place of the dtype for |x| <= 1 (2^-11 / 2^-8), atol 1e-3 / 8e-3.
"""
import pytest
import torch

import emu_util
from emu_util import emu_flavour  # noqa: F401  (fixture)
from reid_kernels import memory as memory_module
from reid_kernels import reference

pytestmark = emu_util.pytestmark
HARNESS = "memory_update_harness"
MODES = {"sequential": 0, "mean": 1, "hard": 2}
TOLERANCE = {  # see the module docstring
    torch.float32: dict(rtol=0, atol=1e-6),
    torch.float64: dict(rtol=0, atol=1e-14),
    torch.float16: dict(rtol=0, atol=1e-3),
    torch.bfloat16: dict(rtol=0, atol=8e-3),
}
# In float32 the global-scratch path starts above (48 KiB / 4) - 8 = 12280 columns; float64 at 6136.
WIDE = {torch.float32: 12300, torch.float64: 6200}


def _labels():
    # repeated labels, out of order, the largest label repeated at the end of the sorted order
    return torch.tensor([3, 1, 3, 0, 1, 3], dtype=torch.int64)


def _case(dtype, mode, convention, normalize, dim=40, rows=7, seed=0, momentum=0.8):
    gen = torch.Generator().manual_seed(seed)
    labels = _labels()
    bank = torch.nn.functional.normalize(torch.randn(rows, dim, generator=gen, dtype=torch.float64), dim=1)
    features = torch.randn(len(labels), dim, generator=gen, dtype=torch.float64)
    return dict(name=f"{str(dtype)[6:]}-{mode}-{convention}-{'norm' if normalize else 'raw'}-d{dim}", dtype=dtype,
                memory=bank.to(dtype), features=features.float() if dtype != torch.float64 else features,
                labels=labels, mode=mode, convention=convention, normalize=normalize, momentum=momentum)


def _tie_case(normalize):
    """Hard mode with an exact tie: two samples of label 1 have the same dot product with its
    row (0.5, from orthogonal directions), so only "the first one on ties" decides."""
    dim, rows = 48, 3
    bank = torch.zeros(rows, dim)
    bank[:, 0] = 1.0
    labels = torch.tensor([1, 0, 1, 1], dtype=torch.int64)
    features = torch.zeros(len(labels), dim)
    features[:, 0] = 0.5
    features[0, 1], features[2, 2], features[3, 0] = 1.0, 1.0, 2.0  # samples 0 and 2 tie, 3 is less hard
    features[1, 3] = 1.0
    return dict(name=f"float32-hard-tie-{'norm' if normalize else 'raw'}", dtype=torch.float32, memory=bank,
                features=features, labels=labels, mode="hard", convention="old", normalize=normalize, momentum=0.3)


def _cases():
    cases = []
    for mode in MODES:
        for convention in ("old", "new"):
            for normalize in (True, False):
                cases.append(_case(torch.float32, mode, convention, normalize))
    for dtype in (torch.float64, torch.float16, torch.bfloat16):  # every mode, both conventions, both normalize
        cases.append(_case(dtype, "sequential", "new", True, seed=1))
        cases.append(_case(dtype, "mean", "old", False, seed=2))
        cases.append(_case(dtype, "hard", "new", True, seed=3))
    cases.append(_case(torch.float32, "sequential", "old", True, dim=WIDE[torch.float32], seed=4))
    cases.append(_case(torch.float32, "mean", "new", True, dim=WIDE[torch.float32], seed=5))
    cases.append(_case(torch.float64, "hard", "old", True, dim=WIDE[torch.float64], seed=6))
    cases += [_tie_case(True), _tie_case(False)]
    return cases


CASES = _cases()


def _old_weight(case):
    """The weight of the old row the op receives, from reid_kernels.memory's own argument check."""
    bank = case["memory"].float()
    return memory_module._check_update_args(bank, case["features"].float(), case["labels"], case["momentum"],
                                            case["mode"], case["normalize"], case["convention"])[3]


def _inputs(cases):
    inputs = {"cases": len(cases)}
    for i, case in enumerate(cases):
        sorted_labels, order = torch.sort(case["labels"], stable=True)  # what memory_update_cuda.cu does
        p = f"c{i}/"
        inputs.update({p + "memory": case["memory"], p + "features": case["features"], p + "sorted_labels":
                       sorted_labels, p + "order": order, p + "momentum": float(_old_weight(case)),
                       p + "mode": MODES[case["mode"]], p + "normalize": int(case["normalize"])})
    return inputs


@pytest.fixture(scope="module", params=emu_util.emu_flavours)
def emulated(request):
    """{case name: the bank after the emulated kernel}, every case in one process per flavour."""
    emu_util.skip_unless_available(request.param)
    out = emu_util.run(HARNESS, request.param, _inputs(CASES))
    return {case["name"]: out[f"c{i}/memory"] for i, case in enumerate(CASES)}


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_memory_update_kernel_matches_reference(emulated, case):
    got = emulated[case["name"]]
    want = reference.memory_update_(case["memory"].clone(), case["features"], case["labels"], _old_weight(case),
                                    case["mode"], case["normalize"])
    assert got.dtype == case["dtype"]
    torch.testing.assert_close(got.double(), want.double(), **TOLERANCE[case["dtype"]])
    untouched = torch.ones(case["memory"].shape[0], dtype=torch.bool)
    untouched[case["labels"]] = False
    assert torch.equal(got[untouched], case["memory"][untouched])  # rows of absent labels: bit for bit


def test_tie_case_really_ties():
    """The tie case distinguishes first from last: the result with sample 2 instead of 0 differs."""
    case = next(c for c in CASES if c["name"] == "float32-hard-tie-raw")
    first = reference.memory_update_(case["memory"].clone(), case["features"], case["labels"], 0.3, "hard", False)
    swapped = case["features"].clone()
    swapped[[0, 2]] = swapped[[2, 0]]
    last = reference.memory_update_(case["memory"].clone(), swapped, case["labels"], 0.3, "hard", False)
    assert not torch.equal(first[1], last[1])


def test_too_wide_rows_take_the_global_scratch_path():
    """The wide cases above are wide enough for the global path and the narrow ones are not
    (the 48 KiB budget of memory_update_kernels.cuh: 8 scratch + dim accumulators)."""
    for dtype, dim in WIDE.items():
        size = 4 if dtype == torch.float32 else 8
        assert (8 + dim) * size > 48 * 1024 >= (8 + 40) * size
