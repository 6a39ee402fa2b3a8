"""Does cmalign's first call in a fresh process equal its later calls?  (A developer's tool; not run in CI.)

    .venv/bin/python scripts/first_call_determinism.py --processes 260

Each process draws a float64 batch (N = 4, C = 6, 3x3 maps, seeded by its number), calls
reid_kernels.cmalign three times with the same inputs and reports whether the first call's outputs
differ from the second's (and the second's from the third's).  The same computation in the same
order must give the same bits; a difference on the first call only means a library set itself up
lazily and two threads raced through that set-up (csrc/cmalign/soft_warp_cpu.cpp,
initialise_library_kernels_once).  The race is rare (4 of 120 processes on 2 threads before that
function existed), so run it with the machine otherwise idle: a loaded machine rarely runs two
threads at the same moment and hides it.  Exit status 1 when any process differed.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

FIELDS = ("recon_pos", "recon_neg", "comask", "loss")


def child(seed: int) -> int:
    import numpy as np
    import torch

    import reid_kernels

    torch.manual_seed(seed)
    feat = torch.randn(4, 6, 3, 3, dtype=torch.float64)
    pos, neg = reid_kernels.lba_pairs(np.int64(2), np.int64(1), torch.Generator().manual_seed(0))
    calls = [reid_kernels.cmalign(feat, pos, neg, 50.0, 0.3) for _ in range(3)]
    first = [name for name, a, b in zip(FIELDS, calls[0], calls[1]) if not torch.equal(a, b)]
    later = [name for name, a, b in zip(FIELDS, calls[1], calls[2]) if not torch.equal(a, b)]
    if first or later:
        print(f"process {seed}: first call differs in {first or 'nothing'}, "
              f"second from third in {later or 'nothing'}")
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=100, help="fresh processes to run (default 100)")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each (default 2)")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child(args.child)
    if args.processes < 1:
        parser.error(f"--processes: expected at least 1, got {args.processes}")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    differing = 0
    for seed in range(args.processes):
        result = subprocess.run([sys.executable, __file__, "--child", str(seed)], env=env, text=True,
                                capture_output=True)
        if result.returncode not in (0, 1):
            sys.stderr.write(result.stderr)
            raise SystemExit(f"process {seed} failed with status {result.returncode}")
        if result.returncode == 1:
            differing += 1
            print(result.stdout.strip(), flush=True)
    print(f"{differing} of {args.processes} fresh processes gave a first call unlike the later ones "
          f"({args.threads} threads)")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
