"""Mutation check: would the tests catch a wrong kernel?  (A developer's tool; not run in CI.)

    .venv/bin/python scripts/mutate.py                 # every mutant, the kernel tests
    .venv/bin/python scripts/mutate.py 1 3 101         # chosen mutants
    .venv/bin/python scripts/mutate.py --list
    .venv/bin/python scripts/mutate.py 2 --tests tests/test_soft_warp_paths.py
    .venv/bin/python scripts/mutate.py --baseline 201 202 211   # emulated CUDA mutants

Each C++ mutant is a deliberately injected bug behind ``#if REID_MUTANT(k)`` in csrc/ (see
csrc/mutation.h): the script copies the working tree (tracked and untracked, not ignored files) to
build/mutants/tree, builds the CPU extension there with ``-DREID_MUTATION=k`` (CFLAGS), and runs the
tests from that copy, so they import the mutant build and never touch the in-place one.  Python
mutants (100 <= k < 200) wrap a function with a wrong version at test time (this file is also the pytest
plugin that does it).  Emulated CUDA mutants (200 <= k < 300) sit in the device code of the kernel headers
(csrc/<op>/<op>_kernels.cuh): no extension build; the emulated tests build their harnesses with
``REID_EMU_EXTRA_FLAGS=-DREID_MUTATION=k`` (tests/emu_util.py), plain and under ThreadSanitizer, and a
race TSan reports fails them like a wrong number.  A mutant is *caught* when at least one test fails, *survived* when all pass.
Exit status: 0 when every mutant was caught.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build" / "mutants" / "tree"
KERNEL_TESTS = [
    "tests/test_soft_warp_paths.py",
    "tests/test_cmalign.py",
    "tests/test_cmalign_errors.py",
    "tests/test_dense_triplet.py",
]
# The fused CPU cmalign path and the CPU dense triplet.
FUSED_CPU_TESTS = ["tests/test_cmalign_cpu_paths.py", "tests/test_dense_triplet.py", "tests/test_cmalign.py"]
# The emulated CUDA tests (tests/cuda_emu/): one list per kernel file.
EMU_MEMORY = ["tests/test_emu_memory_update.py"]
EMU_TRIPLET = ["tests/test_emu_dense_triplet.py"]
EMU_PERSON_MASK = ["tests/test_emu_person_mask.py"]
EMU_SOFT_WARP = ["tests/test_emu_soft_warp.py"]
EMULATED = range(200, 300)  # mutant numbers of the device code, run on the emulator

# k: (what the bug is, the tests that should catch it)
MUTANTS = {
    1: ("CPU soft_warp without the probability cache: forward uses a 1% higher temperature", KERNEL_TESTS),
    2: ("CPU soft_warp without the cache: key gradient dropped for every query block after the first", KERNEL_TESTS),
    3: ("CPU soft_warp: lse is one too large", KERNEL_TESTS),
    4: ("CPU probability-cache cap 128 MiB instead of 256 MiB", KERNEL_TESTS),
    5: ("CPU soft_warp on float16 / bfloat16: a 1% higher temperature", KERNEL_TESTS),
    6: ("CPU fused cmalign forward: eps dropped from the dense triplet's distances", FUSED_CPU_TESTS),
    7: ("CPU fused cmalign backward: eps dropped from the distances' gradient (each recon's total)", FUSED_CPU_TESTS),
    8: ("CPU masked_dense_triplet and fused cmalign backward: no zero-distance guard (g / d at d = 0; "
        "dense_triplet::distance_gradient_coefficient)", FUSED_CPU_TESTS),
    9: ("CPU fused cmalign backward: phase 2 skips the value gradient of negative partners", FUSED_CPU_TESTS),
    10: ("CPU soft_warp / cmalign: row_sum drops the tail after the last 16 lanes (softmax normaliser)",
         FUSED_CPU_TESTS),
    11: ("CPU masked_dense_triplet backward: grad_negative with the wrong sign", FUSED_CPU_TESTS),
    12: ("CPU fused cmalign backward: the distances' anchor term weighted by 1 - m instead of m", FUSED_CPU_TESTS),
    13: ("CPU soft_warp / cmalign: MKL's products and exponential not run one thread at a time before the "
         "first parallel region (a fresh process's first call can race through MKL's set-up)",
         ["tests/test_cmalign_cpu_paths.py"]),
    101: ("lba_pairs: negatives drawn from the anchor's own modality", ["tests/test_pairs.py"]),
    102: ("lba_pairs: positives drawn from the anchor's own modality", ["tests/test_pairs.py"]),
    103: ("evaluate_ranking: two true matches at one distance not sent to the stable sort (the `repeated` "
          "tie condition dropped)", ["tests/test_metrics.py"]),
    # CUDA device code on the emulator (201-219: memory_update_ and masked_dense_triplet; 221-249: cmalign)
    201: ("CUDA memory_update_: momentum convention swapped (momentum weights the new sample)", EMU_MEMORY),
    202: ("CUDA memory_update_: block_sum without the barrier before scratch is overwritten (a race)", EMU_MEMORY),
    203: ("CUDA memory_update_: block_sum's shuffle reduction starts at offset 8 instead of 16", EMU_MEMORY),
    204: ("CUDA memory_update_ hard: the last of tied samples instead of the first", EMU_MEMORY),
    205: ("CUDA memory_update_: a label's run misses the last sample of the batch", EMU_MEMORY),
    206: ("CUDA memory_update_: shared-memory budget 64 KiB (a launch over the 48 KiB default)", EMU_MEMORY),
    211: ("CUDA masked_dense_triplet: no barrier between the partial sums and their reduction", EMU_TRIPLET),
    212: ("CUDA masked_dense_triplet backward: grad_anchor drops the negative term", EMU_TRIPLET),
    213: ("CUDA masked_dense_triplet backward: no barrier before the coefficients are read", EMU_TRIPLET),
    214: ("CUDA masked_dense_triplet backward: no zero-distance guard (divides by d = 0)", EMU_TRIPLET),
    215: ("CUDA masked_dense_triplet: tile off-by-one (position L counted as inside the map)", EMU_TRIPLET),
    216: ("CUDA masked_dense_triplet: squared distances accumulated in float16 instead of float32", EMU_TRIPLET),
    221: ("CUDA cmalign: a sample's offset n * rows * cols truncated to 32 bits", EMU_SOFT_WARP),
    222: ("CUDA cmalign: warp_sum's butterfly starts at offset 8 instead of 16 (softmax sums half-warps)",
          EMU_SOFT_WARP),
    223: ("CUDA cmalign: warp_min's shuffles with a half-warp mask (lanes 16-31 outside their own mask)",
          EMU_PERSON_MASK),
    224: ("CUDA cmalign: column reductions without the barrier between the partial sums and their sum (a race)",
          EMU_PERSON_MASK),
    225: ("CUDA person_mask: a NaN norm seen by its own thread only (no __syncthreads_or)", EMU_PERSON_MASK),
    226: ("CUDA person_mask: warp 1's partial min / max dropped", EMU_PERSON_MASK),
    227: ("CUDA soft_warp: the dynamic shared-memory opt-in skipped (float64 32-row slabs exceed 48 KiB)",
          EMU_SOFT_WARP),
    228: ("CUDA soft_warp: no barrier between staging a logits chunk and reading it (a race)", EMU_SOFT_WARP),
    229: ("CUDA soft_warp: the value-projection staging overwritten before the previous chunk is consumed (a race)",
          EMU_SOFT_WARP),
    230: ("CUDA soft_warp: the remainder chunk of the value projection dropped (tile off-by-one)", EMU_SOFT_WARP),
    231: ("CUDA soft_warp: value / gradient projections accumulated in float16 / bfloat16 instead of float32",
          EMU_SOFT_WARP),
    232: ("CUDA soft_warp backward: dS drops the -delta term (grad_query)", EMU_SOFT_WARP),
    233: ("CUDA soft_warp, 1 row per block: all 8 warps split the row and each reduces only its part",
          EMU_SOFT_WARP),
    234: ("CUDA soft_warp wmma: no barrier between the fragment stores and the epilogue's reads (a race)",
          EMU_SOFT_WARP),
    235: ("CUDA soft_warp backward: the normalisation backward drops the projection term", EMU_SOFT_WARP),
    236: ("CUDA soft_warp: the saved lse misses the max shift (log-sum instead of log-sum-exp)", EMU_SOFT_WARP),
}
PY_MUTANT_ENV = "REID_PY_MUTANT"


# ---------------------------------------------------------------------------
# Python mutants: this module is loaded as a pytest plugin (-p mutate) in the test run.


def _other_half(idx, half):
    return (idx + half) % (2 * half)


def _mutant_lba_pairs(real, k):
    def lba_pairs(num_ids, num_pos, *args, **kwargs):
        pos, neg = real(num_ids, num_pos, *args, **kwargs)
        half = num_ids * num_pos
        if k == 101:  # the same image slot in the anchor's own half: own modality, another identity
            neg = _other_half(neg, half)
        else:  # 102: the positive's slot in the anchor's own half: own modality, same identity
            pos = _other_half(pos, half)
        return pos, neg

    return lba_pairs


def _no_repeated_matches(match_dist, padded):
    import torch

    return torch.zeros(match_dist.shape[0], dtype=torch.bool, device=match_dist.device)


def pytest_configure(config):
    k = int(os.environ.get(PY_MUTANT_ENV, "0"))
    if k == 103:
        import reid_kernels.metrics as metrics_module

        metrics_module._matches_share_a_distance = _no_repeated_matches
        return
    if k not in (101, 102):
        return
    import reid_kernels
    import reid_kernels.cmalign as cmalign_module
    import reid_kernels.pairs as pairs_module

    mutant = _mutant_lba_pairs(pairs_module.lba_pairs, k)
    for module in (reid_kernels, pairs_module, cmalign_module):
        module.lba_pairs = mutant
    try:
        import reid_kernels.nn as nn_module

        if hasattr(nn_module, "lba_pairs"):
            nn_module.lba_pairs = mutant
    except ImportError:
        pass


# ---------------------------------------------------------------------------
# The driver.


def _copy_tree() -> None:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True, capture_output=True
    ).stdout.decode().split("\0")
    if TREE.exists():
        shutil.rmtree(TREE)
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            target = TREE / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def _build(k: int, log) -> bool:
    """Builds the CPU extension in place in the copy, with REID_MUTATION=k.  For k = 0 (the real
    kernels, under the Python mutants and the baseline) it copies the in-place build instead, which
    `make install` keeps current."""
    for old in TREE.glob("reid_kernels/_C*.so"):
        old.unlink()
    in_place = sorted(ROOT.glob("reid_kernels/_C*.so"))
    if k == 0 and in_place:
        shutil.copy2(in_place[0], TREE / "reid_kernels" / in_place[0].name)
        return True
    env = dict(os.environ, REID_KERNELS_NO_CUDA="1", CFLAGS=f"{os.environ.get('CFLAGS', '')} -DREID_MUTATION={k}")
    done = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=TREE, env=env,
                          stdout=log, stderr=subprocess.STDOUT)
    return done.returncode == 0


def _run_tests(tests, py_mutant: int, log, emulated: int = 0) -> int:
    env = dict(os.environ, PYTHONPATH=f"{TREE}{os.pathsep}{TREE / 'scripts'}")
    env[PY_MUTANT_ENV] = str(py_mutant)
    env["REID_EMU_EXTRA_FLAGS"] = f"-DREID_MUTATION={emulated}" if emulated else ""
    env.pop("REID_KERNELS_SOFT_WARP_CACHE_BYTES", None)
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "mutate", "-p", "no:cacheprovider", *tests]
    return subprocess.run(command, cwd=TREE, env=env, stdout=log, stderr=subprocess.STDOUT).returncode


def _check_imports_the_copy(log) -> None:
    env = dict(os.environ, PYTHONPATH=str(TREE))
    where = subprocess.run([sys.executable, "-c", "import reid_kernels._C as c; print(c.__file__)"], cwd=TREE,
                           env=env, capture_output=True, text=True).stdout.strip()
    if not where.startswith(str(TREE)):
        sys.exit(f"mutate: the tests would import {where!r}, not the mutant build under {TREE}")
    print(f"   imports {where}", file=log, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mutants", nargs="*", type=int, help="mutant numbers (default: all)")
    parser.add_argument("--tests", nargs="+", help="test files or ids to run instead of each mutant's own")
    parser.add_argument("--baseline", action="store_true", help="first check that the unmutated build passes")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args()
    if args.list:
        for k, (what, tests) in MUTANTS.items():
            print(f"{k:4d}  {what}  [{', '.join(tests)}]")
        return 0
    chosen = args.mutants or sorted(MUTANTS, key=lambda k: (k < 100, k))  # Python and emulated mutants first: no build
    unknown = [k for k in chosen if k not in MUTANTS]
    if unknown:
        parser.error(f"unknown mutants {unknown}; --list shows them")

    _copy_tree()
    log_path = TREE.parent / "mutate.log"
    results = []
    with open(log_path, "w") as log:
        plan = ([0] if args.baseline else []) + chosen
        built = None  # the REID_MUTATION value of the current build in the copy
        baseline_tests = list(dict.fromkeys(t for k in chosen for t in MUTANTS[k][1]))  # every chosen mutant's
        for k in plan:
            what, tests = MUTANTS.get(k, ("no mutation (baseline)", baseline_tests))
            tests = args.tests or tests
            start = time.time()
            print(f"== mutant {k}: {what}", file=log, flush=True)
            cxx = 0 if k >= 100 else k  # Python and emulated mutants use the real extension
            if built != cxx:
                if not _build(cxx, log):
                    results.append((k, what, "build failed", time.time() - start))
                    continue
                _check_imports_the_copy(log)
                built = cxx
            code = _run_tests(tests, k if 100 <= k < 200 else 0, log, emulated=k if k in EMULATED else 0)
            if k == 0:
                verdict = "passes" if code == 0 else f"FAILS (pytest exit {code})"
            else:
                verdict = {0: "SURVIVED", 1: "caught"}.get(code, f"error (pytest exit {code})")
            results.append((k, what, verdict, time.time() - start))
            print(f"   -> {verdict}", file=log, flush=True)
    for k, what, verdict, seconds in results:
        print(f"{k:4d}  {verdict:10s}  {seconds:6.0f} s  {what}")
    print(f"(log: {log_path})")
    ok = all(v == "caught" or (k == 0 and v == "passes") for k, _, v, _ in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
