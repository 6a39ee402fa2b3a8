"""Per-phase profile of the CPU CMAlign kernels: time and achieved GFLOP/s of each phase.

One LbA training step of ``reid_kernels.cmalign`` (forward, then backward of
``loss + recon_pos.mean()``, as ``bench_cmalign.py``'s ``fwd+bwd``) at LbA's two CMAlign
sites (N = 64, C = 1024 / 2048, 18 x 9), for each CPU path (``REID_KERNELS_CMALIGN_CPU_PATH``:
``fused`` -- cmalign_pairs_fwd/_bwd -- and ``per-partner`` -- two soft_warp calls per step
direction), with the kernels' phase timers on (``REID_KERNELS_CMALIGN_PROFILE=1``,
csrc/cmalign/cpu_phase_timer.h).  Phases: norms, correlation product (S = q^T k), softmax,
warp product (with the blend when fused), and in the backward the value-gradient, dP, softmax
backward, query-gradient and key-gradient products and the normalisation backward.

The timers add thread-nanoseconds: with the samples spread over the threads (N >= threads, the
LbA cases) a phase's wall share is its thread-time / threads, and its GFLOP/s per core is FLOPs /
thread-time, compared with the per-core FMA peak measured in the same run (the extension's
register-resident FMA loop on every thread, divided by the threads).  ``outside kernels`` is the
step's wall time minus the kernels' (person mask, dense triplet loss, autograd and the Python
glue: gathers, blends and index_add_ on the per-partner path).

    python benchmarks/profile_cmalign.py --json benchmarks/results/cmalign_cpu_profile.json \\
        --md benchmarks/results/cmalign_cpu_profile.md
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
from bench_cmalign import Case, cases_for, describe_machine, machine_peak, make_inputs, step_fn  # noqa: E402

import reid_kernels  # noqa: E402
from reid_kernels.cmalign import _use_fused_pairs  # noqa: E402

PROFILE_ENV = "REID_KERNELS_CMALIGN_PROFILE"
PATH_ENV = "REID_KERNELS_CMALIGN_CPU_PATH"
# bench_cmalign.py's CPU cases: LbA's two sites and the sweep's three map sizes.
_BENCH_CASES = cases_for(torch.device("cpu"), quick=False, which="all")
CASES: Dict[str, Case] = {"conv4": _BENCH_CASES[0], "conv5": _BENCH_CASES[1],
                          **{f"{c.height}x{c.width}": c for c in _BENCH_CASES[2:]}}
PATHS = ("fused", "per-partner")


def read_counters(reset: bool) -> Dict[str, tuple]:
    ns, flops = torch.ops.reid_kernels._cmalign_cpu_profile(reset)
    names = torch.ops.reid_kernels._cmalign_cpu_phase_names()
    return {name: (int(ns[i]), int(flops[i])) for i, name in enumerate(names)}


def profile_case(case: Case, path: str, repeat: int, threads: int) -> dict:
    os.environ[PATH_ENV] = path
    os.environ[PROFILE_ENV] = "1"
    try:
        feat, pos_idx, neg_idx = make_inputs(case, torch.device("cpu"), torch.float32)
        step = step_fn(reid_kernels.cmalign, feat, pos_idx, neg_idx, "fwd+bwd")
        # what cmalign really runs: the fused path stops at FUSED_MAX_VOLUME_BYTES (the 72x36 case)
        ran = "fused" if _use_fused_pairs(feat.detach().flatten(2)) else "per-partner"
        step()  # warm-up
        read_counters(reset=True)
        walls = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            step()
            walls.append(time.perf_counter() - t0)
        counters = read_counters(reset=True)
    finally:
        os.environ.pop(PROFILE_ENV, None)
        os.environ.pop(PATH_ENV, None)
    # Thread-time -> wall time: samples are spread over the threads when N >= threads.
    spread = threads if case.batch >= threads else 1
    phases = []
    for name, (ns, flops) in counters.items():
        if ns == 0 and flops == 0:
            continue
        thread_s = ns / 1e9 / repeat
        phases.append(dict(phase=name, thread_ms=thread_s * 1e3, wall_ms=thread_s / spread * 1e3,
                           gflop=flops / 1e9 / repeat,
                           gflops_per_core=(flops / repeat / thread_s / 1e9 * (1 if spread > 1 else 1 / threads))
                           if flops and thread_s > 0 else None))
    kernel_wall = sum(p["wall_ms"] for p in phases)
    step_ms = _common.median(walls) * 1e3
    return dict(case=case.label, path=path, ran=ran, threads=threads, repeat=repeat, step_ms=step_ms,
                step_times_ms=[w * 1e3 for w in walls], kernel_wall_ms=kernel_wall,
                outside_kernels_ms=step_ms - kernel_wall, gflop=sum(p["gflop"] for p in phases),
                phases=phases)


def markdown(results: List[dict], peak: dict, env: dict) -> str:
    per_core = peak["fma_gflops"] / peak["threads"]
    lines = [
        "# CPU CMAlign profile, per phase",
        "",
        f"`python benchmarks/profile_cmalign.py` at commit {env['commit']}, {env['cpu_model']} "
        f"({env['cpu_flags']}), torch {env['torch']}, {env['torch_threads']} threads, load average "
        f"{env.get('load_average')} at the start, {env['date']}.",
        "",
        f"Peak (same run): register-resident FMA loop {peak['fma_gflops']:.1f} GFLOP/s on {peak['threads']} "
        f"threads ({peak['fma_isa']}; {per_core:.1f} per core); torch.mm sgemm {peak['sgemm_n']}^2 "
        f"{peak['sgemm_gflops']:.1f} GFLOP/s.",
        "",
        "One step = cmalign forward + backward of `loss + recon_pos.mean()` (float32). `ms` = wall-clock share "
        "(thread-time / threads; the samples run spread over the threads); GFLOP/s per core = the phase's "
        "matrix-product FLOPs / its thread-time; `% core peak` against the FMA loop's per-core rate.",
        "",
    ]
    for r in results:
        ran = "" if r["ran"] == r["path"] else f" (runs {r['ran']}: the volume exceeds the fused path's cap)"
        lines += [f"## {r['case']}, {r['path']} path{ran}: step {r['step_ms']:.1f} ms "
                  f"({r['gflop']:.1f} GFLOP, {r['gflop'] / r['step_ms'] * 1e3:.1f} GFLOP/s = "
                  f"{r['gflop'] / r['step_ms'] * 1e3 / peak['fma_gflops'] * 100:.0f} % of peak)", "",
                  "| phase | ms | % of step | GFLOP | GFLOP/s per core | % core peak |",
                  "|---|---:|---:|---:|---:|---:|"]
        for p in r["phases"]:
            rate = p["gflops_per_core"]
            lines.append(f"| {p['phase']} | {p['wall_ms']:.1f} | {p['wall_ms'] / r['step_ms'] * 100:.1f} | "
                         f"{p['gflop']:.2f} | {'' if rate is None else f'{rate:.1f}'} | "
                         f"{'' if rate is None else f'{rate / per_core * 100:.0f}'} |")
        lines += [f"| kernels total | {r['kernel_wall_ms']:.1f} | {r['kernel_wall_ms'] / r['step_ms'] * 100:.1f} | "
                  f"{r['gflop']:.2f} | | |",
                  f"| outside kernels | {r['outside_kernels_ms']:.1f} | "
                  f"{r['outside_kernels_ms'] / r['step_ms'] * 100:.1f} | | | |", ""]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="conv4,conv5", help="comma-separated subset of " + ", ".join(CASES) + " (the sweep's 72x36 maps exceed the "
                        "fused path's volume cap: both paths run per-partner there)")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of " + ", ".join(PATHS))
    parser.add_argument("--repeat", type=int, default=3, help="profiled steps per case and path (after one warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", metavar="PATH", help="write the measurements here")
    parser.add_argument("--md", metavar="PATH", help="write the markdown table here")
    args = parser.parse_args(argv)
    cases = [name.strip() for name in args.cases.split(",") if name.strip()]
    paths = [name.strip() for name in args.paths.split(",") if name.strip()]
    bad = [c for c in cases if c not in CASES] + [p for p in paths if p not in PATHS]
    if bad or not cases or not paths or args.repeat < 1:
        print(f"profile_cmalign.py: expected --cases from {', '.join(CASES)}, --paths from {', '.join(PATHS)} "
              f"and --repeat >= 1, got {args.cases!r}, {args.paths!r}, {args.repeat}", file=sys.stderr)
        return 2
    if not reid_kernels.extension_available():
        print("profile_cmalign.py: reid_kernels._C is not built", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    env = describe_machine(_common.environment(torch.device("cpu")))
    peak = machine_peak()
    results = []
    for case in cases:  # paths interleaved per case, so both see the same machine load
        for path in paths:
            r = profile_case(CASES[case], path, args.repeat, torch.get_num_threads())
            print(f"{r['case']:28s} {path:12s} step {r['step_ms']:8.1f} ms, kernels {r['kernel_wall_ms']:8.1f} ms, "
                  f"outside {r['outside_kernels_ms']:7.1f} ms", flush=True)
            results.append(r)
    text = markdown(results, peak, env)
    print(text)
    payload = {"benchmark": "cmalign_cpu_profile", "environment": env, "peak": peak, "results": results}
    if args.json:
        _common.write_json(args.json, payload)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
