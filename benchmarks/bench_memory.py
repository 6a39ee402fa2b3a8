"""Benchmark of the memory-bank update, a full memory-contrast step and the masked dense triplet.

Issue 5 item 5.  Cases:

* ``update``: 64 and 256 samples (8 per identity, identity-major as the cross-modality sampler
  draws them) into banks of 395 (SYSU identities) and 22,258 (SYSU RGB images, an instance
  memory) rows x 2048.  ``sequential`` mode against the per-sample Python loop of
  cluster-contrast code; ``mean`` mode against a vectorised PyTorch version (index_add).
* ``step``: a full memory-contrast step -- logits against a 395-row bank, cross-entropy,
  backward, update -- with the Python-loop update vs ``memory_update_``.
* ``dense_triplet``: forward + backward at LbA's shapes (N=64, C=2048, 18x9) and at 72x36 maps
  (N=64, C=256) vs the reference; float32, plus float16 and bfloat16 on CUDA.

Every row reports the two medians, their ratio and the largest difference between the two
results (the kernel must agree with the baseline, not just be faster); the dense-triplet rows
also the peak memory of each (``_common.MEMORY_NOTES``) and the kernel's relative error against
the reference computed in float64 on the same inputs (``rel_err_vs_float64``).

    python benchmarks/bench_memory.py --device cpu --quick --json out.json
    python benchmarks/bench_memory.py --device cpu --smoke      # tiny sizes: the code paths only
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import reid_kernels
from reid_kernels import reference

from _common import environment, median, peak_memory, time_runs, write_json  # noqa: E402  (benchmarks/)

DIM = 2048
TEMPERATURE = 0.05


def median_ms(fn, device: torch.device, repeats: int, warmup: int) -> float:
    """Median time of ``fn()`` in milliseconds, after ``warmup`` untimed calls."""
    return median(time_runs(fn, device, repeats, warmup)) * 1e3


# ---- baselines -------------------------------------------------------------------------------

def loop_update_(memory, features, labels, momentum):
    """The per-sample loop of cluster-contrast code (sequential mode, normalised rows)."""
    for x, y in zip(features, labels.tolist()):
        memory[y] = momentum * memory[y] + (1.0 - momentum) * x
        memory[y] /= memory[y].norm().clamp_min(1e-12)
    return memory


def vectorised_mean_update_(memory, features, labels, momentum):
    """MCE (AAAI 2023) eq. 3 in vectorised PyTorch: class means by index_add, blend, re-normalise."""
    unique, inverse = torch.unique(labels, return_inverse=True)
    sums = features.new_zeros((len(unique), features.shape[1])).index_add_(0, inverse, features)
    counts = torch.bincount(inverse, minlength=len(unique)).unsqueeze(1).to(features.dtype)
    rows = momentum * memory[unique] + (1.0 - momentum) * (sums / counts)
    memory[unique] = F.normalize(rows, dim=1, eps=1e-12)
    return memory


# ---- cases -----------------------------------------------------------------------------------

def identity_major_labels(batch: int, rows: int, per_identity: int, gen: torch.Generator) -> torch.Tensor:
    ids = torch.randperm(rows, generator=gen)[: batch // per_identity]
    return ids.repeat_interleave(per_identity)


def update_inputs(rows, batch, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    memory = F.normalize(torch.randn(rows, DIM, generator=gen), dim=1).to(device)
    features = F.normalize(torch.randn(batch, DIM, generator=gen), dim=1).to(device)
    labels = identity_major_labels(batch, rows, 8, gen).to(device)
    return memory, features, labels


def bench_update(device, rows, batch, repeats, warmup):
    memory, features, labels = update_inputs(rows, batch, device)
    results = []
    for mode, name, baseline in (("sequential", "per-sample loop", loop_update_),
                                 ("mean", "vectorised torch", vectorised_mean_update_)):
        base_out = baseline(memory.clone(), features, labels, 0.3)
        kernel_out = reid_kernels.memory_update_(memory.clone(), features, labels, 0.3, mode=mode)
        # Timed on one bank updated again and again (same cost every time): a fresh clone before each
        # call would wake the intra-op thread pool right before the timed region.
        base_bank, kernel_bank = memory.clone(), memory.clone()
        base_ms = median_ms(lambda: baseline(base_bank, features, labels, 0.3), device, repeats, warmup)
        kernel_ms = median_ms(lambda: reid_kernels.memory_update_(kernel_bank, features, labels, 0.3, mode=mode),
                              device, repeats, warmup)
        results.append(dict(case="update", mode=mode, rows=rows, batch=batch, dim=DIM, baseline=name,
                            baseline_ms=base_ms, kernel_ms=kernel_ms,
                            max_abs_diff=float((base_out - kernel_out).abs().max())))
    return results


def bench_step(device, batch, repeats, warmup, rows=395):
    memory, features, labels = update_inputs(rows, batch, device, seed=1)

    def step(update, bank):
        f = features.clone().requires_grad_(True)
        loss = F.cross_entropy(f @ bank.t() / TEMPERATURE, labels)
        loss.backward()
        update(bank, f.detach(), labels, 0.3)
        return f.grad

    kernel_update = lambda m, f, y, g: reid_kernels.memory_update_(m, f, y, g, mode="sequential")  # noqa: E731
    base_bank, kernel_bank = memory.clone(), memory.clone()
    base_grad, kernel_grad = step(loop_update_, base_bank), step(kernel_update, kernel_bank)
    diff = max(float((base_bank - kernel_bank).abs().max()), float((base_grad - kernel_grad).abs().max()))
    base_ms = median_ms(lambda: step(loop_update_, base_bank), device, repeats, warmup)
    kernel_ms = median_ms(lambda: step(kernel_update, kernel_bank), device, repeats, warmup)
    return [dict(case="step", mode="sequential", rows=rows, batch=batch, dim=DIM, baseline="per-sample loop",
                 baseline_ms=base_ms, kernel_ms=kernel_ms, max_abs_diff=diff)]


def bench_dense_triplet(device, repeats, warmup, n=64, c=DIM, h=18, w=9, dtype=torch.float32):
    gen = torch.Generator().manual_seed(2)
    maps = [torch.randn(n, c, h, w, generator=gen).to(device=device, dtype=dtype) for _ in range(3)]
    weight = torch.rand(n, h, w, generator=gen).to(device=device, dtype=dtype)

    def fwd_bwd(fn):
        leaves = [m.detach().requires_grad_(True) for m in maps]
        loss = fn(*leaves, weight, 0.3, "mean")
        loss.backward()
        return loss.detach(), [leaf.grad for leaf in leaves]

    base_loss, base_grads = fwd_bwd(reference.masked_dense_triplet)
    kernel_loss, kernel_grads = fwd_bwd(reid_kernels.masked_dense_triplet)
    diff = max([float((base_loss - kernel_loss).abs())]
               + [float((a - b).abs().max()) for a, b in zip(base_grads, kernel_grads)])
    exact = [m.double() for m in maps]
    leaves = [m.requires_grad_(True) for m in exact]
    exact_loss = reference.masked_dense_triplet(*leaves, weight.double(), 0.3, "mean")
    exact_loss.backward()
    rel_err = max(_rel_err(kernel_loss, exact_loss.detach()),
                  *(_rel_err(a, leaf.grad) for a, leaf in zip(kernel_grads, leaves)))
    del exact, leaves, exact_loss
    base_ms = median_ms(lambda: fwd_bwd(reference.masked_dense_triplet), device, repeats, warmup)
    kernel_ms = median_ms(lambda: fwd_bwd(reid_kernels.masked_dense_triplet), device, repeats, warmup)
    base_peak = peak_memory(lambda: fwd_bwd(reference.masked_dense_triplet), device)
    kernel_peak = peak_memory(lambda: fwd_bwd(reid_kernels.masked_dense_triplet), device)
    return [dict(case="dense_triplet", mode=str(dtype).replace("torch.", ""), rows=n, batch=f"{h}x{w}", dim=c,
                 baseline="reference fwd+bwd", baseline_ms=base_ms, kernel_ms=kernel_ms, max_abs_diff=diff,
                 rel_err_vs_float64=rel_err, baseline_peak_bytes=base_peak, kernel_peak_bytes=kernel_peak)]


def _rel_err(ours: torch.Tensor, exact: torch.Tensor) -> float:
    """||ours - exact|| / ||exact||, in float64."""
    diff = float((ours.detach().double() - exact.double()).norm())
    scale = float(exact.double().norm())
    return diff / scale if scale > 0 else diff


# ---- driver ----------------------------------------------------------------------------------

def print_table(rows) -> None:
    header = f"{'case':<14}{'mode':<11}{'rows':>7}{'batch':>7}  {'baseline':<19}{'base ms':>10}{'kernel ms':>11}" \
             f"{'speed-up':>10}{'max |diff|':>12}"
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = r["baseline_ms"] / r["kernel_ms"] if r["kernel_ms"] > 0 else float("inf")
        print(f"{r['case']:<14}{r['mode']:<11}{r['rows']:>7}{str(r['batch']):>7}  {r['baseline']:<19}"
              f"{r['baseline_ms']:>10.3f}{r['kernel_ms']:>11.3f}{ratio:>9.1f}x{r['max_abs_diff']:>12.2e}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--json", help="write the results to this path")
    parser.add_argument("--quick", action="store_true", help="few repeats (a smoke run, not final numbers)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny banks and maps, one timed call: exercises the code paths, measures nothing")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not (torch.cuda.is_available() and reid_kernels.has_cuda_kernels()):
        parser.error("--device cuda needs a GPU and a reid_kernels build with CUDA kernels")
    repeats, warmup = (3, 1) if args.quick else (20, 3)
    if device.type == "cpu" and not args.quick:
        repeats = 7
    bank_sizes, batches = (395, 22_258), (64, 256)
    # (N, C, H, W): LbA's conv5 maps, then 72 x 36 maps.
    triplet_shapes = [(64, DIM, 18, 9), (64, 256, 72, 36)]
    if args.smoke:
        repeats, warmup, bank_sizes, batches, triplet_shapes = 1, 0, (40,), (16,), [(4, 32, 6, 3), (2, 8, 12, 6)]
    triplet_dtypes = (torch.float32, torch.float16, torch.bfloat16) if device.type == "cuda" else (torch.float32,)

    rows = []
    for bank_rows in bank_sizes:
        for batch in batches:
            rows += bench_update(device, bank_rows, batch, repeats, warmup)
    for batch in batches:
        rows += bench_step(device, batch, repeats, warmup, rows=bank_sizes[0])
    for n, c, h, w in triplet_shapes:
        for dtype in triplet_dtypes:
            rows += bench_dense_triplet(device, repeats, warmup, n=n, c=c, h=h, w=w, dtype=dtype)

    for r in rows:
        r["speedup"] = r["baseline_ms"] / r["kernel_ms"] if r["kernel_ms"] > 0 else None
    print_table(rows)
    if args.json:
        meta = dict(environment(device), quick=args.quick, smoke=args.smoke, repeats=repeats)
        write_json(args.json, dict(meta=meta, results=rows))

if __name__ == "__main__":
    main()
