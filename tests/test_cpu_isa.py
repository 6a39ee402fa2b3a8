"""The CPU kernels' element-wise loops in each instruction-set copy (csrc/cpu_isa.h).

with_cpu_isa runs the loops compiled for AVX-512, AVX2 + FMA or the generic target, whichever
ATen's kernels use (ATEN_CPU_CAPABILITY caps it).  Each copy is reached here in its own process
(the capability is read once per process), and the copies must agree bit for bit: they run the
same operations in the same order (no FMA contraction, -ffp-contract=off; reductions over
explicit lanes), which is what keeps the reproducible setting (training/reproducible.py, ATen
capped to AVX2) reproducible across AVX2 and AVX-512 CPUs.  A CPU without AVX-512 (or AVX2) runs
the next copy down under the higher caps, and the comparison still holds.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

CAPS = ("default", "avx2", "avx512")

# Inputs from numpy (torch's random kernels are themselves vectorised per capability).  What the
# probe hashes: the masked dense triplet forward and backward, and cmalign's forward outputs and
# feature gradient on the fused path and on the per-partner path; printed as one hash per line.
PROBE = r"""
import hashlib, os, numpy as np, torch, reid_kernels
torch.set_num_threads(2)
r = np.random.RandomState(0)
f32 = lambda *shape: torch.from_numpy(r.randn(*shape).astype(np.float32))
op = torch.ops.reid_kernels
a, p, n = f32(4, 40, 70), f32(4, 40, 70), f32(4, 40, 70)
w, g = f32(4, 70).abs(), f32(4, 70).abs()
digest = lambda ts: hashlib.sha256(b"".join(t.detach().contiguous().numpy().tobytes() for t in ts)).hexdigest()
print("triplet", digest([op.masked_dense_triplet_fwd(a, p, n, w, 0.3), *op.masked_dense_triplet_bwd(g, a, p, n, w, 0.3)]))
feat = f32(8, 48, 6, 3).relu_()
pos, neg = torch.tensor([2, 3, 0, 1, 6, 7, 4, 5]), torch.tensor([4, 5, 6, 7, 0, 1, 2, 3])
for path in ("fused", "per-partner"):
    os.environ["REID_KERNELS_CMALIGN_CPU_PATH"] = path
    x = feat.clone().requires_grad_()
    out = reid_kernels.cmalign(x, pos, neg)
    (out.loss + out.recon_pos.mean()).backward()
    print(path, digest([out.recon_pos, out.recon_neg, out.comask, out.loss, x.grad]))
print("capability", torch.backends.cpu.get_cpu_capability())
"""


def _probe(cap: str) -> dict:
    env = dict(os.environ, ATEN_CPU_CAPABILITY=cap)
    env.pop("REID_KERNELS_CMALIGN_CPU_PATH", None)
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return dict(line.split(" ", 1) for line in done.stdout.strip().splitlines())


@pytest.fixture(scope="module")
def probes():
    return {cap: _probe(cap) for cap in CAPS}


def test_each_capability_is_in_effect(probes):
    assert probes["default"]["capability"] == "DEFAULT"
    assert probes["avx2"]["capability"] in ("AVX2", "DEFAULT")  # DEFAULT on a CPU without AVX2


def test_triplet_kernels_agree_bit_for_bit_across_copies(probes):
    # exp-free: every operation is the extension's own, so the three copies must agree exactly
    assert probes["default"]["triplet"] == probes["avx2"]["triplet"] == probes["avx512"]["triplet"]


@pytest.mark.parametrize("path", ["fused", "per-partner"])
def test_cmalign_agrees_bit_for_bit_between_avx2_and_avx512(probes, path):
    # ATen's own exp (the softmax) and MKL's products are capped alike by the reproducible setting;
    # between the AVX2 and AVX-512 capabilities the extension's loops must not add a difference.
    # (The generic copy also runs ATen's generic exp, whose rounding may differ: not compared.)
    assert probes["avx2"][path] == probes["avx512"][path]


def test_probe_hashes_depend_on_the_data(probes):
    # a probe that hashed nothing (or a constant) would pass the comparisons above
    digests = probes["avx2"]
    assert len({digests["triplet"], digests["fused"], digests["per-partner"]}) == 3
    assert hashlib.sha256(b"").hexdigest() not in digests.values()
