"""Assert that the instruction-set caps in the environment really reach torch's libraries.

    ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41 python .ci/check_cpu_caps.py

CI runs the tests a second time under such caps so that a test depending on the CPU's own
kernels fails in CI rather than on a user's machine; a cap a library ignored would make that
run a copy of the first. One line per library, exit status 1 when any cap is not in effect:

* ATen: ``torch.backends.cpu.get_cpu_capability()`` names the kernels it dispatches to;
* oneDNN: with ``ONEDNN_VERBOSE=1`` its first primitive prints the ISA it JIT-compiles for;
* MKL names no code branch (on AMD its verbose line says only "Intel(R) Architecture
  processors"), so the evidence is its result: a float32 product of fixed (NumPy-made) matrices
  must differ in its bits from the same product in a child process without the MKL variables.
  On AMD CPUs MKL ignores ``MKL_ENABLE_INSTRUCTIONS`` and ``MKL_CBWR=AVX2``/``SSE4_2`` (identical
  bits); ``MKL_CBWR=COMPATIBLE`` (its SSE2 branch, on every x86-64 CPU) does take effect, so CI
  caps MKL with that.

The inputs are NumPy-made because ``torch.randn`` itself runs ATen's vectorised kernels: under
``ATEN_CPU_CAPABILITY=default`` it draws other bits than under AVX2/AVX-512.
"""
from __future__ import annotations

import os
import subprocess
import sys

ONEDNN_NAMES = {"SSE41": "SSE4.1", "AVX": "AVX", "AVX2": "AVX2", "AVX512_CORE": "AVX-512"}

CONV = ("import torch; torch.set_num_threads(1); x = torch.randn(8, 16, 32, 16); "
        "torch.nn.functional.conv2d(x, torch.randn(16, 16, 3, 3), padding=1)")
SGEMM = ("import hashlib, time, numpy, torch; torch.set_num_threads(1)\n"
         "rng = numpy.random.default_rng(0)\n"
         "a = torch.from_numpy(rng.standard_normal((300, 700), dtype=numpy.float32))\n"
         "b = torch.from_numpy(rng.standard_normal((700, 200), dtype=numpy.float32))\n"
         "c = a @ b; best = 1e9\n"
         "for _ in range(10):\n"
         "    t = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - t)\n"
         "print(hashlib.sha1(c.numpy().tobytes()).hexdigest()[:16], best)")


def child(code: str, env: dict) -> str:
    return subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout


def check_aten() -> str | None:
    import torch

    wanted = os.environ.get("ATEN_CPU_CAPABILITY")
    got = torch.backends.cpu.get_cpu_capability()
    print(f"ATen: ATEN_CPU_CAPABILITY={wanted}, torch dispatches to {got} kernels")
    if wanted and got.lower() != wanted.lower():
        return f"ATen runs {got} kernels, not the {wanted} asked for"
    return None


def check_onednn() -> str | None:
    wanted = os.environ.get("ONEDNN_MAX_CPU_ISA")
    lines = child(CONV, {**os.environ, "ONEDNN_VERBOSE": "1"}).splitlines()
    isa = next((line.split("isa:", 1)[1] for line in lines if ",isa:" in line), None)
    print(f"oneDNN: ONEDNN_MAX_CPU_ISA={wanted}, it compiles for {isa}")
    if isa is None:
        return "oneDNN printed no ISA line (did the convolution not reach oneDNN?)"
    if wanted and ONEDNN_NAMES.get(wanted, wanted) not in isa:
        return f"oneDNN compiles for {isa}, not the {wanted} asked for"
    return None


def check_mkl() -> str | None:
    caps = {k: os.environ[k] for k in ("MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR") if os.environ.get(k)}
    if not caps:
        print("MKL: no MKL cap")
        return None
    free = {k: v for k, v in os.environ.items() if k not in caps}
    (capped, capped_s), (own, own_s) = (child(SGEMM, env).split() for env in (dict(os.environ), free))
    said = " ".join(f"{k}={v}" for k, v in caps.items())
    print(f"MKL: {said}: SGEMM result {capped} in {1e3 * float(capped_s):.2f} ms; without the cap {own} in "
          f"{1e3 * float(own_s):.2f} ms")
    if capped == own:
        return f"MKL computes the same bits under {said} as without: the cap is ignored on this CPU"
    return None


def main() -> int:
    problems = [p for p in (check_aten(), check_onednn(), check_mkl()) if p]
    for problem in problems:
        print(f"cap not in effect: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
