"""The CUDA emulator's own tests (tests/cuda_emu/emu_selftest.cpp): warp shuffles, barriers,
shared memory, launch limits, 16-bit conversions, the wmma stub, and that ThreadSanitizer sees
a race through it."""
import numpy as np
import pytest
import torch

import emu_util
from emu_util import emu_flavour  # noqa: F401  (fixture)

pytestmark = emu_util.pytestmark
HARNESS = "emu_selftest"
WIDTHS = (1, 2, 4, 8, 16, 32)


def run_case(flavour, case, env=None, **inputs):
    return emu_util.run(HARNESS, flavour, {"case": emu_util.text(case), **inputs}, env=env)


def expect_error(flavour, case, env=None, **inputs):
    return emu_util.run_expect_error(HARNESS, flavour, {"case": emu_util.text(case), **inputs}, env=env)


def expected_source(mode, lane, b, width):
    """The lane whose value `lane` receives, from the CUDA programming guide's description of
    the __shfl*_sync intrinsics (segments of `width` lanes; a source outside the segment, or
    for xor in a later segment, leaves the lane its own value).  Written independently of the
    emulator's PTX-bit formula so the two check each other."""
    start = lane // width * width
    if mode == "idx":
        return start + (b % width)
    if mode == "up":
        return lane - b if lane - b >= start else lane
    if mode == "down":
        return lane + b if lane + b < start + width else lane
    source = lane ^ b  # xor: earlier segments are reachable, later ones are not
    return source if source < start + width else lane


def test_shuffle_lanes_match_cuda_for_every_mode_width_and_type(emu_flavour):
    inputs = {"b_int": torch.arange(32, dtype=torch.int64)}
    few = torch.tensor([0, 1, 3, 5, 16, 31], dtype=torch.int64)
    for name in ("unsigned", "float", "double", "longlong"):
        inputs[f"b_{name}"] = few
    out = run_case(emu_flavour, "shuffle_table", **inputs)
    for name in ("int", "unsigned", "float", "double", "longlong"):
        bs = inputs[f"b_{name}"].tolist()
        table = out[f"table_{name}"].numpy()
        want = np.array([[[[expected_source(mode, lane, b, width) for lane in range(32)] for b in bs]
                          for width in WIDTHS] for mode in ("idx", "up", "down", "xor")])
        bad = np.argwhere(table != want)
        assert bad.size == 0, f"{name}: first mismatches (mode, width, b, lane): {bad[:5].tolist()}"


def test_partial_mask_shuffles_in_one_warp_while_the_others_wait(emu_flavour):
    out = run_case(emu_flavour, "partial_mask")["out"].tolist()
    assert out[:16] == [sum(range(16))] * 16
    assert out[16:32] == [sum(range(16, 32))] * 16
    # shfl_down over 8 lanes with offsets 4, 2, 1: lane i sums lanes i..7 in a tree; lane 0 gets all
    vals = [10 * i for i in range(8)]
    down = list(vals)
    for off in (4, 2, 1):
        down = [down[i] + (down[i + off] if i + off < 8 else down[i]) for i in range(8)]
    assert out[32:40] == down
    assert out[64:96] == [v + 1 for v in out[:32]]


@pytest.mark.parametrize("case, message", [
    ("out_of_mask", "reads lane 20, which is not in the mask"),
    ("caller_not_in_mask", "called from lane 0, which is not in the mask"),
    ("exited_source", "which has exited"),
])
def test_undefined_shuffles_are_errors(emu_flavour, case, message):
    err = expect_error(emu_flavour, case)
    assert "reid_emu error" in err and message in err, err[-2000:]


def test_a_barrier_a_live_thread_skips_is_a_timeout_error(emu_flavour):
    err = expect_error(emu_flavour, "skip_barrier", env={"REID_EMU_TIMEOUT_S": "1"})
    assert "__syncthreads timed out" in err and "block (0,0,0)" in err and "63 of the block's 64" in err, err[-2000:]


def test_barrier_reductions_and_exited_threads(emu_flavour):
    # threads 48..95 returned first: the barriers are among threads 0..47
    assert run_case(emu_flavour, "reductions")["out"].tolist() == [1, 1, 0, 16]


def test_shared_memory_starts_nan_and_is_one_instance_per_block(emu_flavour):
    out = run_case(emu_flavour, "shared_nan")
    for name in ("static_float", "static_double", "dynamic_float"):
        assert torch.isnan(out[name]).all(), name
    assert out["static_half_bits"].tolist() == [0xFFFF] * 24  # a float16 NaN
    assert run_case(emu_flavour, "shared_instance")["out"].tolist() == [1000 * b + 7 for b in range(5)]


def test_dynamic_shared_memory_is_usable_to_its_end(emu_flavour):
    out = run_case(emu_flavour, "dynamic_access", bytes=1024, index=1023, write=0)
    assert out["out"].tolist() == [255, 255]  # the NaN-making fill, in both blocks


def test_access_past_dynamic_shared_memory_faults(emu_flavour):
    # 1024 bytes end exactly at the guard page: reading byte 1024 faults
    err = expect_error(emu_flavour, "dynamic_access", bytes=1024, index=1024, write=0)
    assert "past the dynamic shared memory" in err or "SEGV" in err, err[-2000:]
    # 1000 bytes leave 24 bytes of alignment slack before the guard page: a write there is
    # found by the canary at the end of the block
    err = expect_error(emu_flavour, "dynamic_access", bytes=1000, index=1003, write=1)
    assert "wrote past the end of its 1000 bytes of dynamic shared memory" in err, err[-2000:]
    err = expect_error(emu_flavour, "dynamic_access", bytes=1000, index=-1, write=1)
    assert "wrote before the start" in err, err[-2000:]


def test_launch_limits(emu_flavour):
    out = run_case(emu_flavour, "smem_limits")

    def msg(name):
        return bytes(out[name].tolist()).decode()

    assert "50000 bytes of dynamic shared memory, more than the kernel's limit of 49152" in msg("default")
    assert msg("optin") == ""  # opted in: it ran
    assert out["sum"].tolist() == [sum(i % 256 for i in range(100000))] * 2
    assert "100001 bytes" in msg("above_optin") and "limit of 100000" in msg("above_optin")
    # cudaGetLastError after the refusal, then cleared; opt-in ok; over the device's 232448: invalid value
    assert out["codes"].tolist() == [1, 0, 0, 1]
    assert "block (1025,1,1) exceeds" in msg("threads")
    assert "grid (1,65536,1) exceeds" in msg("grid_y")
    assert "block (1,1,65) exceeds" in msg("block_z")
    err = expect_error(emu_flavour, "static_plus_dynamic")
    assert "16384 bytes of static plus 40960 of dynamic shared memory exceed" in err, err[-2000:]


def test_device_assert_names_the_thread(emu_flavour):
    err = expect_error(emu_flavour, "device_assert")
    assert "emu_selftest.cpp" in err and "thread (7,0,0)" in err and "thread 7 is not welcome" in err, err[-2000:]


@pytest.mark.tsan
def test_thread_sanitizer_reports_races_through_the_emulator():
    emu_util.skip_unless_available("tsan")
    for case in ("shared_race", "global_race"):
        err = expect_error("tsan", case)
        assert "WARNING: ThreadSanitizer: data race" in err, (case, err[-2000:])
    out = run_case("tsan", "shared_race_fixed")  # the same kernel with its barrier: no report
    assert out["out"].tolist() == [(t + 1) % 64 for t in range(64)] * 4


def test_device_math_is_cudas():
    """min / max ignore NaN for float and double (fminf / fmaxf), integer overloads compare."""
    got = run_case("plain", "math")["values"].tolist()
    assert got == [1.0, 2.0, -1.0, 3.0, 0.5, 1.5, 2.0**40, 3.0, -2.0, 1.0, 3.0, 1.0, 1.0]


def _float_sample():
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31, (200_000,), generator=gen, dtype=torch.int64).to(torch.int32)
    special = torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 65536.0, 2.0**-14, 2.0**-24, 2.0**-25,
                            1.5 * 2.0**-25, 2.0**-26, 3.0 * 2.0**-25, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11,
                            float("inf"), -float("inf"), float("nan"), 3.4028234663852886e38, 1e-45, 1e-40],
                           dtype=torch.float32)
    # every half value, and the midpoints between neighbours (the round-to-even ties)
    halves = torch.arange(0, 65536, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    finite = halves[torch.isfinite(halves)].to(torch.float64).sort().values
    mids = ((finite[1:] + finite[:-1]) / 2).float()
    bf = torch.arange(0, 65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    bf_finite = bf[torch.isfinite(bf)].to(torch.float64).sort().values
    bf_mids = ((bf_finite[1:] + bf_finite[:-1]) / 2).float()
    return torch.cat([bits.view(torch.float32), special, halves, mids, bf_mids])


def _assert_same_bits(got_bits, want, what):
    want_bits = want.view(torch.int16).to(torch.int32) & 0xFFFF
    got = got_bits.to(torch.int16).view(want.dtype)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), what  # NaN payloads differ between torch's own paths
    mismatch = (got_bits != want_bits) & ~nan
    assert not mismatch.any(), f"{what}: {int(mismatch.sum())} mismatches, e.g. index {mismatch.nonzero()[:3].tolist()}"


def test_16_bit_conversions_match_torch_bit_for_bit():
    floats = _float_sample()
    doubles = torch.tensor([65519.999999, 1.0 + 2.0**-11 + 2.0**-40, 2.0**-25 + 2.0**-60, -3.3e-8],
                           dtype=torch.float64)
    out = run_case("plain", "conversions", floats=floats, doubles=doubles)
    patterns = torch.arange(0, 65536, dtype=torch.int32).to(torch.int16)
    for name, dtype in (("half_to_float", torch.float16), ("bf16_to_float", torch.bfloat16)):
        want = patterns.view(dtype).float()
        got = out[name]
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got), nan), name
        assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32)), name
    _assert_same_bits(out["float_to_half"], floats.to(torch.float16), "float -> half")
    _assert_same_bits(out["float_to_bf16"], floats.to(torch.bfloat16), "float -> bfloat16")
    # from double: via float, as c10::Half (double rounding included)
    _assert_same_bits(out["double_to_half"], doubles.float().to(torch.float16), "double -> half")


def _wmma_inputs():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(16, 16, generator=gen).half()  # a(r, k) stored col-major: a_store[k, r]
    b = torch.randn(16, 16, generator=gen).half()  # b(k, c) stored row-major
    return a, b


def test_wmma_stub_product_and_checks(emu_flavour):
    a, b = _wmma_inputs()
    out = run_case(emu_flavour, "wmma", a=a.t().contiguous(), b=b)["c"]
    want = a.double() @ b.double()  # products of halves are exact in float; 16 float sums
    assert torch.allclose(out.double(), want, rtol=0, atol=1e-5)
    err = expect_error(emu_flavour, "wmma_misaligned", a=a.t().contiguous(), b=b)
    assert "is not 32-byte aligned" in err, err[-2000:]
    err = expect_error(emu_flavour, "wmma_partial", a=a.t().contiguous(), b=b)
    assert "needs all 32 lanes" in err, err[-2000:]
