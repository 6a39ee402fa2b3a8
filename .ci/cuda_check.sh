#!/usr/bin/env bash
# Compile-and-link check of the CUDA kernels, for a CPU-only CI machine with nvcc on PATH.
#
#   bash .ci/cuda_check.sh [VENV_DIR]        (default VENV_DIR: .venv-cuda)
#
# 1. creates VENV_DIR if missing and installs the pinned CUDA build of torch into it;
# 2. builds reid_kernels._C with FORCE_CUDA=1 for sm_80 and sm_90 into out-of-tree
#    directories (build/cuda-check/), so the in-place CPU build is never touched;
# 3. loads the built library and asserts that it has CUDA kernels and that every
#    operator with a CPU kernel also has a CUDA kernel.
# Prints how long each step took; exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV_DIR="${1:-.venv-cuda}"
TORCH_PIN="torch==2.14.1"  # never unpinned: an unpinned torch is a multi-GB download
BUILD_DIR="build/cuda-check"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export FORCE_CUDA=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

script_start=$SECONDS
step_start=$SECONDS
step() {  # step NAME: announce a step and start its clock
  echo "== $1"
  step_start=$SECONDS
}
step_done() {
  echo "   ($(( SECONDS - step_start )) s)"
}

step "nvcc"
if ! command -v nvcc >/dev/null 2>&1; then
  echo "cuda_check: nvcc not found on PATH; the CUDA build check needs a CUDA toolkit" >&2
  exit 1
fi
nvcc --version | tail -n 2
step_done

step "venv $VENV_DIR ($TORCH_PIN)"
if [ ! -x "$VENV_DIR/bin/python" ]; then
  python3 -m venv "$VENV_DIR"
fi
# ninja: parallel compilation (torch falls back to a serial build without it).
"$VENV_DIR/bin/python" -m pip install -q "$TORCH_PIN" numpy setuptools wheel ninja
"$VENV_DIR/bin/python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
step_done

step "build reid_kernels._C with CUDA (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST) into $BUILD_DIR"
PATH="$(cd "$VENV_DIR/bin" && pwd):$PATH" \
  "$VENV_DIR/bin/python" setup.py -q build_ext --build-lib "$BUILD_DIR/lib" --build-temp "$BUILD_DIR/tmp"
step_done

step "load the library and check the CUDA kernels are registered"
"$VENV_DIR/bin/python" - "$BUILD_DIR/lib" <<'EOF'
import glob
import os
import sys

import torch

lib_dir = sys.argv[1]
libs = glob.glob(os.path.join(lib_dir, "reid_kernels", "_C*.so"))
if len(libs) != 1:
    sys.exit(f"cuda_check: expected one built reid_kernels/_C*.so under {lib_dir}, found {libs}")
# Loading the library runs its TORCH_LIBRARY registrations (and fails on unresolved symbols).
torch.ops.load_library(libs[0])
print("loaded", libs[0])

if not torch.ops.reid_kernels._has_cuda_kernels():
    sys.exit("cuda_check: _has_cuda_kernels() is False: the build did not compile the CUDA kernels")

has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
ops = sorted(
    name for name in torch._C._dispatch_get_all_op_names()
    if name.startswith("reid_kernels::") and name != "reid_kernels::_has_cuda_kernels"
)
if not ops:
    sys.exit("cuda_check: no reid_kernels operators are registered")
# CPU-only by design: the fused CPU path of cmalign (csrc/cmalign/soft_warp_cpu.cpp), which
# reid_kernels/cmalign.py routes to only for CPU tensors; on CUDA cmalign runs soft_warp_fwd/bwd.
CPU_ONLY = {"reid_kernels::cmalign_pairs_fwd", "reid_kernels::cmalign_pairs_bwd"}
missing = []
for op in ops:
    cpu, cuda = has_kernel(op, "CPU"), has_kernel(op, "CUDA")
    print(f"  {op:45s} CPU={'yes' if cpu else 'no ':3s} CUDA={'yes' if cuda else 'no'}"
          + ("  (CPU-only by design)" if op in CPU_ONLY else ""))
    if cpu and not cuda and op not in CPU_ONLY:
        missing.append(op)
stale = sorted(CPU_ONLY - set(ops))
if stale:
    sys.exit(f"cuda_check: CPU_ONLY names operators that are not registered: {stale}")
if missing:
    sys.exit(f"cuda_check: operators with a CPU kernel but no CUDA kernel: {missing}")
print("every operator with a CPU kernel has a CUDA kernel, but the CPU-only ones marked above")
EOF
step_done

echo "== cuda_check passed in $(( SECONDS - script_start )) s"
