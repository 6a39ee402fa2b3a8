"""Benchmark of LbA's CMAlign: reference (eager), torch.compile(reference) and reid_kernels.

What is measured: the full ``cmalign`` (person masks, positive and negative warps,
reconstructions, co-attention, dense triplet loss) on an LbA batch -- partners
from ``lba_pairs(num_ids, num_pos)``, ``N = 2 * num_ids * num_pos`` maps --

* ``fwd``: one call with ``feat.requires_grad`` (the training forward, autograd
  graph and saved tensors included);
* ``fwd+bwd``: the same, then backward of ``loss + recon_pos.mean()`` (the two
  gradient paths LbA uses: the dense triplet loss and the ID-consistency loss on
  the positive reconstruction).

Cases: LbA's two CMAlign sites (N = 64, C = 1024 and C = 2048, 18 x 9 maps), then
a sweep over map sizes (18 x 9, 36 x 18, 72 x 36; smaller N / C at the larger
sizes on the CPU so the reference finishes).  Times are medians of ``--repeat``
calls after ``--warmup`` (compilation happens in the warm-up).  Peak memory: see
``_common.MEMORY_NOTES`` (printed with the table).

    python benchmarks/bench_cmalign.py --device cpu --quick
    python benchmarks/bench_cmalign.py --device cuda --dtype float32 --json results/cmalign_cuda.json
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import reid_kernels  # noqa: E402
from reid_kernels import reference  # noqa: E402

IMPLS = ("eager", "compile", "reid_kernels")
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


def cases_for(device: torch.device, quick: bool, which: str = "all") -> List[Case]:
    if quick:
        return [Case("quick", 2, 2, 32, 6, 3), Case("quick", 2, 2, 32, 12, 6)]
    lba = [Case("LbA conv4", 8, 4, 1024, 18, 9), Case("LbA conv5", 8, 4, 2048, 18, 9)]
    if device.type == "cuda":
        sweep = [Case("sweep", 8, 4, 512, 18, 9), Case("sweep", 8, 4, 512, 36, 18), Case("sweep", 8, 4, 256, 72, 36)]
    else:
        sweep = [Case("sweep", 8, 4, 256, 18, 9), Case("sweep", 2, 4, 256, 36, 18), Case("sweep", 2, 1, 128, 72, 36)]
    return {"lba": lba, "sweep": sweep, "all": lba + sweep}[which]


def implementations(names) -> Dict[str, Callable]:
    table = {}
    for name in names:
        if name == "eager":
            table[name] = reference.cmalign
        elif name == "compile":
            table[name] = torch.compile(reference.cmalign)
        else:
            table[name] = reid_kernels.cmalign
    return table


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
    feat, pos_idx, neg_idx = make_inputs(case, device, dtype)
    rows = []
    for impl, fn in impls.items():
        for mode in MODES:
            row = dict(**asdict(case), batch=case.batch, impl=impl, mode=mode)
            step = step_fn(fn, feat, pos_idx, neg_idx, mode)
            try:
                times = _common.time_runs(step, device, args.repeat, args.warmup, args.clock)
                row.update(median_s=_common.median(times), min_s=min(times), times_s=times)
                row["peak_bytes"] = _common.peak_memory(step, device)
            except Exception as error:  # keep going: one failing implementation should not hide the rest
                row.update(median_s=None, times_s=[], peak_bytes=None, error=f"{type(error).__name__}: {error}")
                print(f"  {case.label} {impl} {mode}: {row['error']}", file=sys.stderr)
            rows.append(row)
            print(f"  {case.label:36s} {impl:13s} {mode:8s} {_common.fmt_ms(row['median_s'])} ms", flush=True)
    return rows


def table_for(rows: List[dict], cases: List[Case]) -> str:
    def lookup(case: Case, impl: str, mode: str):
        for r in rows:
            if (r["name"], r["channels"], r["height"], r["width"], r["batch"], r["impl"], r["mode"]) == (
                case.name, case.channels, case.height, case.width, case.batch, impl, mode
            ):
                return r["median_s"], r["peak_bytes"]
        return None, None

    headers = ["case", "impl", "fwd ms", "vs eager", "vs compile", "fwd+bwd ms", "vs eager", "vs compile",
               "peak MiB fwd", "peak MiB fwd+bwd"]
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
            out.append([
                case.label if i == 0 else "",
                impl,
                _common.fmt_ms(fwd), _common.fmt_ratio(eager_fwd, fwd), _common.fmt_ratio(comp_fwd, fwd),
                _common.fmt_ms(both), _common.fmt_ratio(eager_both, both), _common.fmt_ratio(comp_both, both),
                _common.fmt_bytes(peak_fwd), _common.fmt_bytes(peak_both),
            ])
    return _common.format_table(headers, out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_common_args(parser)
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS), help="implementations to run")
    parser.add_argument("--cases", choices=("lba", "sweep", "all"), default="all",
                        help="LbA shapes, the map-size sweep, or both (ignored with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = parser.parse_args(argv)
    device = _common.resolve_device(args.device)
    dtype = _common.DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeat is None:
        args.repeat = (3 if args.quick else 5) if device.type == "cpu" else (10 if args.quick else 20)
    if not reid_kernels.extension_available():
        raise SystemExit("reid_kernels._C is not built: pip install --no-build-isolation -e .")

    cases = cases_for(device, args.quick, args.cases)
    impls = implementations([i for i in IMPLS if i in args.impls])
    env = _common.environment(device)
    clock = "CUDA events" if device.type == "cuda" else f"{args.clock} clock"
    print(f"CMAlign benchmark on {env['device']} ({env.get('gpu', env['cpu'])}), {args.dtype}, "
          f"torch {env['torch']}, {env['torch_threads']} threads; median of {args.repeat} after {args.warmup} "
          f"warm-up ({clock})")
    rows = []
    for case in cases:
        rows += measure(case, impls, args, device, dtype)

    print()
    print(table_for(rows, cases))
    print("\nvs eager / vs compile: speed-up of the row's implementation (their time / its time).")
    print("fwd: forward with autograd recording; fwd+bwd: then backward of loss + recon_pos.mean().")
    print(f"Peak memory: {env['memory_measure']}.")
    if args.json:
        _common.write_json(args.json, {"benchmark": "cmalign", "dtype": args.dtype, "repeat": args.repeat,
                                      "warmup": args.warmup, "clock": clock, "environment": env, "results": rows})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
