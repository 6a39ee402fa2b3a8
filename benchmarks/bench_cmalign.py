"""Benchmark of LbA's CMAlign: reference (eager), torch.compile(reference) and reid_kernels.

What is measured: the full ``cmalign`` (person masks, positive and negative warps,
reconstructions, co-attention, dense triplet loss) on an LbA batch -- partners
from ``lba_pairs(num_ids, num_pos)``, ``N = 2 * num_ids * num_pos`` maps --

* ``fwd``: one call with ``feat.requires_grad`` (the training forward, autograd
  graph and saved tensors included);
* ``fwd+bwd``: the same, then backward of ``loss + recon_pos.mean()`` (the two
  gradient paths LbA uses: the dense triplet loss and the ID-consistency loss on
  the positive reconstruction).

Cases (``--cases``, comma-separated): ``lba`` -- LbA's two CMAlign sites (N = 64,
C = 1024 and C = 2048, 18 x 9 maps); ``sweep`` -- map sizes 18 x 9, 36 x 18, 72 x 36
(smaller N / C at the larger sizes on the CPU so the reference finishes); ``72x36``
-- the sweep's 72 x 36 case alone; ``all`` = ``lba,sweep``.  Times are medians of
``--repeat`` calls after ``--warmup`` (compilation happens in the warm-up).  Peak
memory: see ``_common.MEMORY_NOTES`` (printed with the table).  ``--dtypes`` runs
several dtypes in one process (``--compile-dtypes`` limits which of them also time
``torch.compile``, whose compilation dominates a short run); ``--check`` adds, per
case and dtype, the error of each implementation against the reference computed in
float64 on the same inputs (outputs and the gradient of the features).

    python benchmarks/bench_cmalign.py --device cpu --quick
    python benchmarks/bench_cmalign.py --device cuda --dtype float32 --json results/cmalign_cuda.json
    python benchmarks/bench_cmalign.py --device cuda --dtypes float32,float16,bfloat16 --compile-dtypes float32 \
        --cases lba,72x36 --check --json out.json      # what scripts/gpu_check.py runs
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import reid_kernels  # noqa: E402
from reid_kernels import reference  # noqa: E402
from reid_kernels.cmalign import CPU_PATH_ENV  # noqa: E402

IMPLS = ("eager", "compile", "reid_kernels", "per-partner")
# per-partner: reid_kernels.cmalign with REID_KERNELS_CMALIGN_CPU_PATH=per-partner (two soft_warp
# calls per direction instead of the fused CPU operators; the CUDA path is always this one).
MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Case:
    name: str
    num_ids: int
    num_pos: int
    channels: int
    height: int
    width: int

    @property
    def batch(self) -> int:
        return 2 * self.num_ids * self.num_pos

    @property
    def label(self) -> str:
        return f"{self.name} N={self.batch} C={self.channels} {self.height}x{self.width}"


CASE_GROUPS = ("lba", "sweep", "72x36", "all")


def cases_for(device: torch.device, quick: bool, which: str = "all") -> List[Case]:
    """The cases of the comma-separated groups in ``which`` (tiny ones with ``quick``)."""
    if quick:
        return [Case("quick", 2, 2, 32, 6, 3), Case("quick", 2, 2, 32, 12, 6)]
    lba = [Case("LbA conv4", 8, 4, 1024, 18, 9), Case("LbA conv5", 8, 4, 2048, 18, 9)]
    if device.type == "cuda":
        sweep = [Case("sweep", 8, 4, 512, 18, 9), Case("sweep", 8, 4, 512, 36, 18), Case("sweep", 8, 4, 256, 72, 36)]
    else:
        sweep = [Case("sweep", 8, 4, 256, 18, 9), Case("sweep", 2, 4, 256, 36, 18), Case("sweep", 2, 1, 128, 72, 36)]
    groups = {"lba": lba, "sweep": sweep, "72x36": sweep[-1:], "all": lba + sweep}
    chosen: List[Case] = []
    for group in parse_list("--cases", which, CASE_GROUPS):
        chosen += [case for case in groups[group] if case not in chosen]
    return chosen


def parse_list(flag: str, text: str, choices) -> List[str]:
    """A comma-separated list of names from ``choices`` (SystemExit naming the flag otherwise)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in choices]
    if unknown or not names:
        raise SystemExit(f"{flag}: expected a comma-separated subset of {', '.join(choices)}, got {text!r}")
    return names


def implementations(names, compile_backend: str = "inductor") -> Dict[str, Callable]:
    """``compile_backend="eager"`` traces with dynamo but skips inductor's code generation (a smoke run).

    ``dynamic=False``: each case's shape gets its own static graph, as a training run with one
    fixed shape would (dynamo's automatic dynamic shapes would otherwise time a symbolic-shape
    graph from the second case on)."""
    table = {}
    for name in names:
        if name == "eager":
            table[name] = reference.cmalign
        elif name == "compile":
            table[name] = torch.compile(reference.cmalign, backend=compile_backend, dynamic=False)
        elif name == "per-partner":
            table[name] = per_partner_cmalign
        else:
            table[name] = reid_kernels.cmalign
    return table


def per_partner_cmalign(*args, **kwargs):
    """reid_kernels.cmalign on its per-partner path (soft_warp_fwd / _bwd per partner)."""
    os.environ[CPU_PATH_ENV] = "per-partner"
    try:
        return reid_kernels.cmalign(*args, **kwargs)
    finally:
        os.environ.pop(CPU_PATH_ENV, None)


# ---------------------------------------------------------------------------
# FLOPs, peak and the machine.


def model_flops(case: Case, mode: str) -> int:
    """Matrix-product FLOPs of one call: per (anchor, partner) the forward's S = q^T k and W = v P^T
    (2 C L^2 each) and the backward's dP, grad_value, grad_query and grad_key (4 more); N anchors,
    2 partners.  The same count for every implementation (element-wise work is not counted)."""
    pair = 2 * case.channels * (case.height * case.width) ** 2
    per_anchor = 2 * (2 if mode == "fwd" else 6) * pair
    return case.batch * per_anchor


def sgemm_gflops(n: int = 2048, repeat: int = 3) -> float:
    """Best-of-`repeat` GFLOP/s of a square float32 torch.mm (MKL / the BLAS torch uses, all threads)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def machine_peak(fma_iterations: int = 20_000_000, repeat: int = 3) -> dict:
    """The machine's float32 FMA peak, measured: best of `repeat` runs of the extension's register-resident
    FMA loop on every thread (reid_kernels::_cpu_fma_peak) -- the "peak" the fractions divide by -- and,
    for comparison, a large square sgemm."""
    runs = [torch.ops.reid_kernels._cpu_fma_peak(fma_iterations) for _ in range(repeat)]
    best = max(runs, key=lambda r: r[0])
    return {"fma_gflops": best[0], "fma_isa": best[1], "threads": best[2], "fma_runs_gflops": [r[0] for r in runs],
            "sgemm_n": 2048, "sgemm_gflops": sgemm_gflops()}


CAP_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA",
                 "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def describe_machine(env: dict) -> dict:
    """Adds what the numbers depend on: CPU model and its SIMD flags, the kernels ATen dispatches to,
    instruction-set caps in the environment, load averages."""
    model, flags = None, []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model is None:
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    break
    except OSError:
        pass
    simd = [f for f in flags if f.startswith(("avx", "fma", "sse4_2", "amx"))]
    env = dict(env)
    env["cpu_model"] = model or env.get("cpu")
    env["cpu_flags"] = " ".join(simd) or "unknown"
    env["aten_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    env["cap_variables"] = {k: os.environ[k] for k in CAP_VARIABLES if k in os.environ}
    try:
        env["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    return env


def make_inputs(case: Case, device: torch.device, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    # Post-ReLU features, as the backbone hands them to CMAlign.
    feat = torch.randn(case.batch, case.channels, case.height, case.width, generator=g).relu_()
    feat = feat.to(device=device, dtype=dtype).requires_grad_()
    pos_idx, neg_idx = reid_kernels.lba_pairs(case.num_ids, case.num_pos, generator=g)
    return feat, pos_idx.to(device), neg_idx.to(device)


def step_fn(fn: Callable, feat: torch.Tensor, pos_idx, neg_idx, mode: str) -> Callable[[], None]:
    def forward():
        fn(feat, pos_idx, neg_idx)

    def forward_backward():
        feat.grad = None
        out = fn(feat, pos_idx, neg_idx)
        (out.loss + out.recon_pos.mean()).backward()

    return forward if mode == "fwd" else forward_backward


def measure(case: Case, impls: Dict[str, Callable], args, device, dtype) -> List[dict]:
    """Every implementation and mode of one case, timed interleaved: after each one's warm-up, round r
    runs every (implementation, mode) once, so a change of machine load hits all of them alike."""
    feat, pos_idx, neg_idx = make_inputs(case, device, dtype)
    dtype_name = str(dtype).replace("torch.", "")
    rows, steps = [], []
    for impl, fn in impls.items():
        for mode in MODES:
            row = dict(**asdict(case), batch=case.batch, label=case.label, dtype=dtype_name, impl=impl, mode=mode,
                       gflop=model_flops(case, mode) / 1e9, times_s=[])
            step = step_fn(fn, feat, pos_idx, neg_idx, mode)
            try:
                _common.time_runs(step, device, 0, args.warmup, args.clock)
                steps.append((row, step))
            except Exception as error:  # keep going: one failing implementation should not hide the rest
                row.update(median_s=None, peak_bytes=None, error=f"{type(error).__name__}: {error}")
                print(f"  {case.label} {impl} {mode}: {row['error']}", file=sys.stderr)
            rows.append(row)
    for _ in range(args.repeat):
        for row, step in steps:
            row["times_s"] += _common.time_runs(step, device, 1, 0, args.clock)
    for row, step in steps:
        row.update(median_s=_common.median(row["times_s"]), min_s=min(row["times_s"]))
        row["gflops"] = row["gflop"] / row["median_s"]
        row["peak_bytes"] = _common.peak_memory(step, device)
        print(f"  {case.label:36s} {dtype_name:9s} {row['impl']:13s} {row['mode']:8s} "
              f"{_common.fmt_ms(row['median_s'])} ms  {row['gflops']:6.1f} GFLOP/s", flush=True)
    return rows


OUTPUTS = ("recon_pos", "recon_neg", "comask", "loss", "grad_feat")


def forward_backward_outputs(fn: Callable, feat: torch.Tensor, pos_idx, neg_idx) -> Dict[str, torch.Tensor]:
    """One training step's outputs and the gradient of the features (as ``fwd+bwd`` times it)."""
    leaf = feat.detach().requires_grad_()
    out = fn(leaf, pos_idx, neg_idx)
    (out.loss + out.recon_pos.mean()).backward()
    return {"recon_pos": out.recon_pos, "recon_neg": out.recon_neg, "comask": out.comask, "loss": out.loss,
            "grad_feat": leaf.grad}


def accuracy(case: Case, impls: Dict[str, Callable], device, dtype) -> List[dict]:
    """Per implementation: ||out - ref|| / ||ref|| and max |out - ref| of every output against the
    reference in float64 on the same (rounded) inputs."""
    feat, pos_idx, neg_idx = make_inputs(case, device, dtype)
    ref = forward_backward_outputs(reference.cmalign, feat.double(), pos_idx, neg_idx)
    ref = {name: value.detach().double() for name, value in ref.items()}
    rows = []
    for impl, fn in impls.items():
        if impl == "compile":
            continue  # inductor's rounding is the reference's; the eager row stands for it
        row = dict(name=case.name, label=case.label, batch=case.batch, channels=case.channels, height=case.height,
                   width=case.width, dtype=str(dtype).replace("torch.", ""), impl=impl)
        try:
            ours = forward_backward_outputs(fn, feat, pos_idx, neg_idx)
            for name in OUTPUTS:
                diff = ours[name].detach().double() - ref[name]
                scale = float(ref[name].norm())
                row[f"max_rel_{name}"] = float(diff.norm()) / scale if scale > 0 else float(diff.norm())
                row[f"max_abs_{name}"] = float(diff.abs().max())
            row["finite"] = all(bool(torch.isfinite(ours[name]).all()) for name in OUTPUTS)
        except Exception as error:  # keep going, as measure() does
            row["error"] = f"{type(error).__name__}: {error}"
        rows.append(row)
        print(f"  {case.label:36s} {row['dtype']:9s} {impl:13s} error vs float64: "
              + ", ".join(f"{n} {row[f'max_rel_{n}']:.1e}" for n in OUTPUTS if f"max_rel_{n}" in row), flush=True)
    del ref
    return rows


def table_for(rows: List[dict], cases: List[Case], peak_gflops: float = None) -> str:
    def lookup(case: Case, impl: str, mode: str):
        for r in rows:
            if (r["name"], r["channels"], r["height"], r["width"], r["batch"], r["impl"], r["mode"]) == (
                case.name, case.channels, case.height, case.width, case.batch, impl, mode
            ):
                return r["median_s"], r.get("peak_bytes")
        return None, None

    headers = ["case", "impl", "fwd ms", "vs eager", "vs compile", "fwd+bwd ms", "vs eager", "vs compile",
               "GFLOP/s", "% peak", "peak MiB fwd", "peak MiB fwd+bwd"]
    ran = [impl for impl in IMPLS if any(r["impl"] == impl for r in rows)]
    out = []
    for case in cases:
        eager_fwd, _ = lookup(case, "eager", "fwd")
        eager_both, _ = lookup(case, "eager", "fwd+bwd")
        comp_fwd, _ = lookup(case, "compile", "fwd")
        comp_both, _ = lookup(case, "compile", "fwd+bwd")
        for i, impl in enumerate(ran):
            fwd, peak_fwd = lookup(case, impl, "fwd")
            both, peak_both = lookup(case, impl, "fwd+bwd")
            rate = model_flops(case, "fwd+bwd") / 1e9 / both if both else None
            out.append([
                case.label if i == 0 else "",
                impl,
                _common.fmt_ms(fwd), _common.fmt_ratio(eager_fwd, fwd), _common.fmt_ratio(comp_fwd, fwd),
                _common.fmt_ms(both), _common.fmt_ratio(eager_both, both), _common.fmt_ratio(comp_both, both),
                "-" if rate is None else f"{rate:.1f}",
                "-" if rate is None or not peak_gflops else f"{100 * rate / peak_gflops:.0f}",
                _common.fmt_bytes(peak_fwd), _common.fmt_bytes(peak_both),
            ])
    return _common.format_table(headers, out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_common_args(parser)
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=None,
                        help="implementations to run (default: all; on CUDA all but per-partner, which is the "
                        "same code there)")
    parser.add_argument("--cases", default="all",
                        help="comma-separated groups of " + ", ".join(CASE_GROUPS) + " (ignored with --quick)")
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated dtypes, each measured in turn (default: --dtype)")
    parser.add_argument("--compile-dtypes", default="all",
                        help="the dtypes that also time torch.compile (comma-separated, or all)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (eager: dynamo's trace only, a smoke run)")
    parser.add_argument("--check", action="store_true",
                        help="also report each implementation's error against the float64 reference")
    parser.add_argument("--smoke", action="store_true",
                        help="the first --quick case, one call, no warm-up: exercises the code paths, measures nothing")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = parser.parse_args(argv)
    device = _common.resolve_device(args.device)
    dtype_names = parse_list("--dtypes", args.dtypes or args.dtype, tuple(_common.DTYPES))
    compile_dtypes = dtype_names if args.compile_dtypes == "all" else parse_list(
        "--compile-dtypes", args.compile_dtypes, tuple(_common.DTYPES))
    if args.smoke:
        args.quick, args.repeat, args.warmup = True, 1, 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeat is None:
        args.repeat = (3 if args.quick else 5) if device.type == "cpu" else (10 if args.quick else 20)
    if not reid_kernels.extension_available():
        raise SystemExit("reid_kernels._C is not built: pip install --no-build-isolation -e .")

    cases = cases_for(device, args.quick, args.cases)[: 1 if args.smoke else None]
    wanted = args.impls or [i for i in IMPLS if device.type == "cpu" or i != "per-partner"]
    chosen = [i for i in IMPLS if i in wanted]
    env = describe_machine(_common.environment(device))
    peaks = [machine_peak()] if device.type == "cpu" else []
    if peaks:
        print(f"peak: FMA loop {peaks[0]['fma_gflops']:.1f} GFLOP/s ({peaks[0]['fma_isa']}, {peaks[0]['threads']} "
              f"threads), sgemm 2048^2 {peaks[0]['sgemm_gflops']:.1f} GFLOP/s; load average {env.get('load_average')}")
    clock = "CUDA events" if device.type == "cuda" else f"{args.clock} clock"
    print(f"CMAlign benchmark on {env['device']} ({env.get('gpu', env['cpu'])}), {', '.join(dtype_names)}, "
          f"torch {env['torch']}, {env['torch_threads']} threads; median of {args.repeat} after {args.warmup} "
          f"warm-up ({clock})")
    rows, checks = [], []
    for dtype_name in dtype_names:
        dtype = _common.DTYPES[dtype_name]
        impls = implementations([i for i in chosen if i != "compile" or dtype_name in compile_dtypes],
                                args.compile_backend)
        dtype_rows = []
        for case in cases:
            dtype_rows += measure(case, impls, args, device, dtype)
            if args.check:
                checks += accuracy(case, impls, device, dtype)
        rows += dtype_rows
    if peaks:  # once more at the end: the peak is the better of the two (the fractions are then conservative)
        peaks.append(machine_peak())
    peak = max((p["fma_gflops"] for p in peaks), default=None)
    for dtype_name in dtype_names:
        print(f"\n{dtype_name}:")
        print(table_for([r for r in rows if r["dtype"] == dtype_name], cases, peak))

    print("\nvs eager / vs compile: speed-up of the row's implementation (their time / its time).")
    print("fwd: forward with autograd recording; fwd+bwd: then backward of loss + recon_pos.mean().")
    print(f"Peak memory: {env['memory_measure']}.")
    if peak:
        print(f"GFLOP/s: fwd+bwd matrix-product FLOPs (model_flops: 24 N C L^2) / median time; % peak: of the "
              f"register-resident FMA loop's {peak:.1f} GFLOP/s on all threads (best of the runs before and after). "
              f"Load average at the end: {[round(v, 2) for v in os.getloadavg()]}.")
    if args.json:
        payload = {"benchmark": "cmalign", "dtype": ",".join(dtype_names), "dtypes": dtype_names,
                   "compile_dtypes": compile_dtypes, "compile_backend": args.compile_backend, "repeat": args.repeat,
                   "warmup": args.warmup, "clock": clock, "environment": env, "results": rows,
                   "command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
                   "peak": {"fma_gflops": peak, "runs": peaks,
                            "definition": "register-resident FMA loop on every thread (reid_kernels::_cpu_fma_peak), "
                                          "best of the runs at the start and end"} if peaks else None,
                   "load_average_end": [round(v, 2) for v in os.getloadavg()]}
        if args.check:
            payload["accuracy"] = checks
        _common.write_json(args.json, payload)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
