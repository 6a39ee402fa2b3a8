"""reid_kernels.memory_update_ against its plain-PyTorch reference (MCE, AAAI 2023, eq. 3; PECA, IEICE 2024, eq. 9).

Tolerances: float32 banks 1e-6 (relative and absolute: rows are O(1) or unit-norm),
float64 1e-12, float16/bfloat16 banks (CUDA) one rounding of the bank dtype.
"""
import pytest
import torch
import torch.nn.functional as F

import reid_kernels
from reid_kernels import reference

MODES = ("sequential", "mean", "hard")
TOLERANCE = {
    torch.float32: dict(rtol=1e-6, atol=1e-6),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=8e-3, atol=8e-3),
}


def make_case(rows, dim, labels, device, dtype=torch.float32, seed=0, unit=True):
    gen = torch.Generator().manual_seed(seed)
    memory = torch.randn(rows, dim, generator=gen, dtype=torch.float64)
    if unit:
        memory = F.normalize(memory, dim=1)
    features = torch.randn(len(labels), dim, generator=gen, dtype=torch.float64)
    if unit:
        features = F.normalize(features, dim=1)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    return memory.to(device=device, dtype=dtype), features.to(device=device, dtype=torch.float32 if dtype != torch.float64 else dtype), labels.to(device)


def label_patterns():
    gen = torch.Generator().manual_seed(1)
    return {
        "single": (1, 1, [0]),
        "all_equal": (7, 16, [3] * 12),
        "heavy_repeat": (50, 64, torch.randint(0, 4, (64,), generator=gen).tolist()),
        "identity_major_8x8": (395, 2048, [k for k in (5, 17, 200, 394, 0, 33, 101, 7) for _ in range(8)]),
        "interleaved": (20, 33, [i % 5 for i in range(40)]),
        "big_bank": (50_000, 8, torch.randint(0, 50_000, (256,), generator=gen).tolist()),
        "wide_dim": (3, 2048, [2, 0, 2, 2, 1, 0]),
    }


PATTERNS = label_patterns()


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_reference(device, pattern, mode, normalize):
    rows, dim, labels = PATTERNS[pattern]
    memory, features, labels = make_case(rows, dim, labels, device, unit=normalize)
    expected = reference.memory_update_(memory.clone(), features, labels, 0.3, mode, normalize)
    out = memory.clone()
    returned = reid_kernels.memory_update_(out, features, labels, 0.3, mode=mode, normalize=normalize)
    assert returned is out
    torch.testing.assert_close(out, expected, **TOLERANCE[torch.float32])
    untouched = torch.ones(rows, dtype=torch.bool, device=device)
    untouched[labels] = False
    assert torch.equal(out[untouched], memory[untouched])


@pytest.mark.parametrize("mode", MODES)
def test_float64_bank(device, mode):
    memory, features, labels = make_case(30, 40, [4, 4, 9, 4, 0, 9], device, dtype=torch.float64)
    expected = reference.memory_update_(memory.clone(), features, labels, 0.25, mode)
    out = reid_kernels.memory_update_(memory.clone(), features, labels, 0.25, mode=mode)
    torch.testing.assert_close(out, expected, **TOLERANCE[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_half_banks_on_cuda(device, dtype, mode):
    if device.type != "cuda":
        pytest.skip("float16/bfloat16 banks are CUDA-only")
    memory, features, labels = make_case(64, 256, [1, 5, 1, 1, 63, 5, 0], device, dtype=dtype)
    expected = reference.memory_update_(memory.clone(), features, labels, 0.3, mode)
    out = reid_kernels.memory_update_(memory.clone(), features, labels, 0.3, mode=mode)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected.float(), **TOLERANCE[dtype])


def test_wide_rows_beyond_shared_memory(device):
    """Rows wider than 48 KiB of float32 take the global-scratch path on CUDA."""
    memory, features, labels = make_case(4, 13_000, [1, 3, 1, 1], device)
    for mode in MODES:
        expected = reference.memory_update_(memory.clone(), features, labels, 0.5, mode)
        out = reid_kernels.memory_update_(memory.clone(), features, labels, 0.5, mode=mode)
        torch.testing.assert_close(out, expected, **TOLERANCE[torch.float32])


def test_sequential_closed_form(device):
    """Without normalisation K samples of one label give g^K m + sum_t (1-g) g^(K-t) f_t."""
    memory, features, labels = make_case(3, 10, [2, 2, 2, 2], device, dtype=torch.float64, unit=False)
    g = 0.2
    expected = g**4 * memory[2] + sum((1 - g) * g ** (4 - t) * features[t - 1] for t in range(1, 5))
    out = reid_kernels.memory_update_(memory.clone(), features, labels, g, mode="sequential", normalize=False)
    torch.testing.assert_close(out[2], expected, rtol=1e-12, atol=1e-12)


def test_mean_and_hard_semantics(device):
    memory, features, labels = make_case(2, 6, [1, 1, 1], device, dtype=torch.float64, unit=False)
    g = 0.3
    out = reid_kernels.memory_update_(memory.clone(), features, labels, g, mode="mean", normalize=False)
    torch.testing.assert_close(out[1], g * memory[1] + (1 - g) * features.mean(0), rtol=1e-12, atol=1e-12)
    hardest = int(torch.argmin(features @ memory[1]))
    out = reid_kernels.memory_update_(memory.clone(), features, labels, g, mode="hard", normalize=False)
    torch.testing.assert_close(out[1], g * memory[1] + (1 - g) * features[hardest], rtol=1e-12, atol=1e-12)


def test_hard_picks_first_on_ties(device):
    memory = torch.tensor([[1.0, 0.0]], device=device)
    features = torch.tensor([[0.0, 1.0], [0.0, -1.0], [0.0, 2.0]], device=device)  # all dot 0 with the row
    out = reid_kernels.memory_update_(memory.clone(), features, torch.zeros(3, dtype=torch.long, device=device), 0.5,
                                      mode="hard", normalize=False)
    torch.testing.assert_close(out[0], torch.tensor([0.5, 0.5], device=device))


def test_new_sample_convention(device):
    memory, features, labels = make_case(10, 12, [3, 3, 1], device)
    alpha = 0.8  # PECA (IEICE 2024): weight on the new sample
    new = reid_kernels.memory_update_(memory.clone(), features, labels, alpha, convention="new")
    old = reid_kernels.memory_update_(memory.clone(), features, labels, 1 - alpha, convention="old")
    torch.testing.assert_close(new, old, rtol=1e-6, atol=1e-7)


def test_momentum_extremes(device):
    memory, features, labels = make_case(5, 8, [0, 4, 0], device, unit=False)
    kept = reid_kernels.memory_update_(memory.clone(), features, labels, 1.0, normalize=False)
    assert torch.equal(kept, memory)
    replaced = reid_kernels.memory_update_(memory.clone(), features, labels, 0.0, normalize=False)
    assert torch.equal(replaced[0], features[2]) and torch.equal(replaced[4], features[1])


def test_bit_identical_run_to_run(device):
    rows, dim, labels = PATTERNS["heavy_repeat"]
    memory, features, labels = make_case(rows, dim, labels, device)
    for mode in MODES:
        first = reid_kernels.memory_update_(memory.clone(), features, labels, 0.3, mode=mode)
        for _ in range(3):
            again = reid_kernels.memory_update_(memory.clone(), features, labels, 0.3, mode=mode)
            assert torch.equal(first, again)


def test_empty_batch_is_a_no_op(device):
    memory, _, _ = make_case(4, 6, [0], device)
    out = reid_kernels.memory_update_(memory.clone(), torch.empty(0, 6, device=device),
                                      torch.empty(0, dtype=torch.long, device=device), 0.3)
    assert torch.equal(out, memory)


def test_int32_labels_and_float64_features(device):
    memory, features, labels = make_case(6, 5, [1, 2, 1], device)
    expected = reference.memory_update_(memory.clone(), features, labels, 0.3, "mean")
    out = reid_kernels.memory_update_(memory.clone(), features.double(), labels.int(), 0.3, mode="mean")
    torch.testing.assert_close(out, expected, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("mode", MODES)
def test_opcheck(device, mode):
    memory, features, labels = make_case(9, 7, [2, 2, 8, 0], device)
    # The schema calls the mode ``update_mode``: an argument named ``mode`` collides with
    # torch's auto-functionalisation internals (test_aot_dispatch_dynamic would fail).
    torch.library.opcheck(torch.ops.reid_kernels.memory_update_.default, (memory, features, labels, 0.3, mode, True))


def test_features_requiring_grad_are_fine(device):
    memory, features, labels = make_case(6, 5, [1, 2, 1], device)
    features.requires_grad_(True)
    out = reid_kernels.memory_update_(memory.clone(), features, labels, 0.3)
    assert not out.requires_grad


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: a.update(labels=torch.tensor([0, 9, 1])), IndexError, r"labels: expected values in \[0, 9\).*got 9"),
        (lambda a: a.update(labels=torch.tensor([0, -1, 1])), IndexError, r"labels: .*got -1 at position 1"),
        (lambda a: a.update(labels=torch.tensor([0.0, 1.0, 1.0])), TypeError, "labels: expected an int64"),
        (lambda a: a.update(labels=torch.tensor([0, 1])), ValueError, r"labels: expected shape \(3,\)"),
        (lambda a: a.update(labels=[0, 1, 2]), TypeError, "labels: expected a torch.Tensor"),
        (lambda a: a.update(memory=torch.zeros(4, 9).t()), ValueError, "memory: expected a contiguous"),
        (lambda a: a.update(memory=torch.zeros(9, 4, dtype=torch.int64)), TypeError, "memory: expected a floating"),
        (lambda a: a.update(memory=torch.zeros(9, 4, dtype=torch.float16)), TypeError, "memory: expected dtype in"),
        (lambda a: a.update(memory=torch.zeros(9)), ValueError, "memory: expected a 2-D"),
        (lambda a: a.update(features=torch.zeros(3, 5)), ValueError, r"features: expected shape \(batch, 4\)"),
        (lambda a: a.update(features=torch.zeros(3, 4, dtype=torch.int32)), TypeError, "features: expected a floating"),
        (lambda a: a.update(momentum=-0.1), ValueError, r"momentum: expected a value in \[0, 1\], got -0.1"),
        (lambda a: a.update(momentum=1.5), ValueError, r"momentum: expected a value in \[0, 1\], got 1.5"),
        (lambda a: a.update(momentum=float("nan")), ValueError, "momentum: expected a finite"),
        (lambda a: a.update(mode="median"), ValueError, "mode: expected one of"),
        (lambda a: a.update(convention="newest"), ValueError, "convention: expected 'old'"),
        (lambda a: a.update(normalize="yes"), TypeError, "normalize: expected a bool"),
    ],
)
def test_bad_input(mutate, error, match):
    args = dict(memory=torch.zeros(9, 4), features=torch.ones(3, 4), labels=torch.tensor([0, 1, 1]), momentum=0.3,
                mode="mean", convention="old", normalize=True)
    mutate(args)
    memory, features, labels, momentum = (args.pop(k) for k in ("memory", "features", "labels", "momentum"))
    with pytest.raises(error, match=match):
        reid_kernels.memory_update_(memory, features, labels, momentum, **args)


def test_bad_input_reaching_the_op_directly():
    """The C++ op checks too (callers of torch.ops.reid_kernels.memory_update_ bypass the wrapper)."""
    op = torch.ops.reid_kernels.memory_update_
    memory = torch.zeros(5, 3)
    with pytest.raises(RuntimeError, match=r"labels: expected values in \[0, 5\)"):
        op(memory, torch.ones(2, 3), torch.tensor([0, 5]), 0.3, "mean", True)
    with pytest.raises(RuntimeError, match="mode: expected 'sequential', 'mean' or 'hard'"):
        op(memory, torch.ones(2, 3), torch.tensor([0, 1]), 0.3, "avg", True)
    with pytest.raises(RuntimeError, match="momentum: expected a value in"):
        op(memory, torch.ones(2, 3), torch.tensor([0, 1]), 2.0, "mean", True)
    with pytest.raises(RuntimeError, match="labels: expected dtype int64"):
        op(memory, torch.ones(2, 3), torch.tensor([0, 1], dtype=torch.int32), 0.3, "mean", True)
    with pytest.raises(RuntimeError):  # features aliasing the bank would read rows already written
        op(memory, memory[:2], torch.tensor([0, 1]), 0.3, "mean", True)


@pytest.mark.parametrize("bad", [5, -1, 1 << 40])
def test_op_checks_label_range_on_every_device(device, bad):
    """A direct operator call checks the label range on CUDA too (before the launch: a device-side
    assert would break the CUDA context), with the CPU kernel's message; the bank is left untouched."""
    op = torch.ops.reid_kernels.memory_update_
    memory = torch.zeros(5, 3, device=device)
    labels = torch.tensor([0, bad, 1], device=device)
    with pytest.raises(RuntimeError, match=rf"labels: expected values in \[0, 5\) \(memory rows\), got {bad} at position 1"):
        op(memory, torch.ones(3, 3, device=device), labels, 0.3, "mean", True)
    assert torch.equal(memory, torch.zeros_like(memory))
    op(memory, torch.ones(3, 3, device=device), torch.tensor([0, 4, 1], device=device), 0.3, "mean", True)
    assert torch.isfinite(memory).all() and memory.abs().sum() > 0  # the device still works
