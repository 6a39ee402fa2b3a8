"""Calls every reid_kernels kernel once, at small sizes, in every variant the product ships.

``scripts/gpu_check.py`` runs it three times on a GPU: plainly (each call's error against the
float64 reference goes into ``driver.json``) and under ``compute-sanitizer --tool memcheck`` and
``--tool racecheck`` (with ``--no-reference``, so the sanitizer spends its time on our kernels).
The dry run runs it with ``--device cpu``.

Variants:

* ``soft_warp`` forward + backward (grads of query, key and a separate value), float32 / float16
  / bfloat16, tensor-core (WMMA) path off / on (``REID_KERNELS_SOFT_WARP_TENSOR_CORES``), at most
  32 / 8 / 1 query rows per block (``REID_KERNELS_SOFT_WARP_MAX_ROWS``), plus float64; the maps
  have 7x5 = 35 query and 6x3 = 18 key positions and 40 channels, none a multiple of a tile;
* ``person_mask`` in each dtype;
* ``masked_dense_triplet`` forward + backward in each dtype;
* ``memory_update_`` in every mode (sequential, mean, hard), normalised or not, every bank
  dtype the device takes (float32 / float64 on the CPU; float16 / bfloat16 too on CUDA), with
  repeated labels;
* ``cmalign`` forward + backward in each dtype (the whole module on the fused operators).

The environment variables are read by the CUDA kernels at every launch, so they are set
around each call (forward and backward) and restored after it.  The CPU kernels ignore them.

    python scripts/gpu_check_driver.py --device cuda --json driver.json
    compute-sanitizer --tool racecheck python scripts/gpu_check_driver.py --device cuda --no-reference
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from typing import Callable, Dict, Iterator, List, Optional

import torch

import reid_kernels
from reid_kernels import reference

TENSOR_CORES_ENV = "REID_KERNELS_SOFT_WARP_TENSOR_CORES"
MAX_ROWS_ENV = "REID_KERNELS_SOFT_WARP_MAX_ROWS"
HALF_DTYPES = ("float32", "float16", "bfloat16")
MEMORY_MODES = ("sequential", "mean", "hard")

# Small but awkward sizes: no count is a multiple of a tile, two query-row blocks of 32.
BATCH, CHANNELS, QUERY_HW, KEY_HW, VALUE_CHANNELS = 2, 40, (7, 5), (6, 3), 12


@contextlib.contextmanager
def environment(values: Dict[str, Optional[str]]) -> Iterator[None]:
    """Set (or, for None, unset) environment variables for the duration of the block."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _maps(shape, dtype: torch.dtype, device: torch.device, seed: int, relu: bool = False) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (x.relu() if relu else x).to(device=device, dtype=dtype)


def _max_error(ours: torch.Tensor, ref: torch.Tensor) -> Dict[str, float]:
    """Largest absolute difference and the relative norm ||ours - ref|| / ||ref|| (both float64)."""
    diff = ours.detach().double().cpu() - ref.detach().double().cpu()
    scale = float(ref.detach().double().norm())
    return {"max_abs": float(diff.abs().max()) if diff.numel() else 0.0,
            "rel_norm": float(diff.norm()) / scale if scale > 0 else float(diff.norm())}


def _errors(ours: Dict[str, torch.Tensor], ref: Optional[Dict[str, torch.Tensor]]) -> Dict[str, object]:
    finite = all(bool(torch.isfinite(t.detach()).all()) for t in ours.values())
    if ref is None:
        return {"finite": finite}
    return {"finite": finite, **{name: _max_error(ours[name], ref[name]) for name in ours}}


def _leaves(tensors, dtype=None):
    return [t.detach().to(dtype=dtype or t.dtype).requires_grad_(True) for t in tensors]


# ---------------------------------------------------------------------------
# One check per operator; each returns {output name: tensor} for ours and the float64 reference.


def soft_warp_case(device, dtype, seed, with_reference):
    query = _maps((BATCH, CHANNELS, *QUERY_HW), dtype, device, seed)
    key = _maps((BATCH, CHANNELS, *KEY_HW), dtype, device, seed + 1)
    value = _maps((BATCH, VALUE_CHANNELS, *KEY_HW), dtype, device, seed + 2)
    grad_out = _maps((BATCH, VALUE_CHANNELS, *QUERY_HW), dtype, device, seed + 3)

    def run(fn, inputs):
        q, k, v = inputs
        out = fn(q, k, v, 50.0)
        out.backward(grad_out.to(out.dtype))
        return {"out": out, "grad_query": q.grad, "grad_key": k.grad, "grad_value": v.grad}

    ours = run(reid_kernels.soft_warp, _leaves((query, key, value)))
    ref = run(reference.soft_warp, _leaves((query, key, value), torch.float64)) if with_reference else None
    return ours, ref


def person_mask_case(device, dtype, seed, with_reference):
    feat = _maps((BATCH, CHANNELS, *QUERY_HW), dtype, device, seed, relu=True)
    ours = {"mask": reid_kernels.person_mask(feat)}
    ref = {"mask": reference.person_mask(feat.double())} if with_reference else None
    return ours, ref


def dense_triplet_case(device, dtype, seed, with_reference):
    maps = [_maps((BATCH, CHANNELS, *QUERY_HW), dtype, device, seed + i) for i in range(3)]
    weight = torch.rand((BATCH, *QUERY_HW), generator=torch.Generator().manual_seed(seed)).to(device, dtype)

    def run(fn, leaves, w):
        loss = fn(*leaves, w, 0.3, "mean")
        loss.backward()
        return {"loss": loss, **{f"grad_{name}": leaf.grad for name, leaf in zip(("anchor", "positive", "negative"),
                                                                                  leaves)}}

    ours = run(reid_kernels.masked_dense_triplet, _leaves(maps), weight)
    ref = run(reference.masked_dense_triplet, _leaves(maps, torch.float64), weight.double()) if with_reference else None
    return ours, ref


def memory_update_case(device, dtype, seed, with_reference, mode, normalize):
    gen = torch.Generator().manual_seed(seed)
    rows, dim, batch = 11, 40, 9
    memory = torch.nn.functional.normalize(torch.randn(rows, dim, generator=gen), dim=1)
    features = torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=1)
    labels = torch.tensor([3, 0, 3, 7, 10, 3, 0, 5, 7])  # repeats, in batch order
    # copy=True: the update is in place, and .to() of a float32 CPU bank would return the bank itself.
    bank = memory.to(device=device, dtype=dtype, copy=True)
    ours = reid_kernels.memory_update_(bank, features.to(device, dtype), labels.to(device), 0.3, mode=mode,
                                       normalize=normalize)
    ref = None
    if with_reference:
        ref = {"memory": reference.memory_update_(memory.double(), features.double(), labels, 0.3, mode=mode,
                                                  normalize=normalize)}
    return {"memory": ours}, ref


def cmalign_case(device, dtype, seed, with_reference):
    num_ids, num_pos = 2, 2
    feat = _maps((2 * num_ids * num_pos, CHANNELS, *QUERY_HW), dtype, device, seed, relu=True)
    pos_idx, neg_idx = reid_kernels.lba_pairs(num_ids, num_pos, generator=torch.Generator().manual_seed(seed))

    def run(fn, leaf):
        out = fn(leaf, pos_idx.to(device), neg_idx.to(device))
        (out.loss + out.recon_pos.float().mean()).backward()
        return {"recon_pos": out.recon_pos, "recon_neg": out.recon_neg, "comask": out.comask, "loss": out.loss,
                "grad_feat": leaf.grad}

    ours = run(reid_kernels.cmalign, _leaves([feat])[0])
    ref = run(reference.cmalign, _leaves([feat], torch.float64)[0]) if with_reference else None
    return ours, ref


# ---------------------------------------------------------------------------
# The plan: every (operator, variant) pair.


def plan(device: torch.device) -> List[Dict[str, object]]:
    """Every call the driver makes: operator, dtype, environment, extra arguments."""
    calls = []
    for dtype in HALF_DTYPES:
        for tensor_cores in ("0", "1"):
            for max_rows in ("32", "8", "1"):
                calls.append(dict(op="soft_warp", dtype=dtype, env={TENSOR_CORES_ENV: tensor_cores,
                                                                  MAX_ROWS_ENV: max_rows}))
    calls.append(dict(op="soft_warp", dtype="float64", env={TENSOR_CORES_ENV: "0", MAX_ROWS_ENV: "32"}))
    for dtype in HALF_DTYPES + ("float64",):
        calls.append(dict(op="person_mask", dtype=dtype, env={}))
        calls.append(dict(op="masked_dense_triplet", dtype=dtype, env={}))
        calls.append(dict(op="cmalign", dtype=dtype, env={}))
    bank_dtypes = ("float32", "float64") + (("float16", "bfloat16") if device.type == "cuda" else ())
    for dtype in bank_dtypes:
        for mode in MEMORY_MODES:
            for normalize in (True, False):
                calls.append(dict(op="memory_update_", dtype=dtype, env={}, mode=mode, normalize=normalize))
    return calls


CASES: Dict[str, Callable] = {
    "soft_warp": soft_warp_case,
    "person_mask": person_mask_case,
    "masked_dense_triplet": dense_triplet_case,
    "memory_update_": memory_update_case,
    "cmalign": cmalign_case,
}


def run_call(call: Dict[str, object], device: torch.device, seed: int, with_reference: bool) -> Dict[str, object]:
    dtype = getattr(torch, call["dtype"])
    extra = {k: call[k] for k in ("mode", "normalize") if k in call}
    record = {k: v for k, v in call.items()}
    start = time.perf_counter()
    try:
        with environment(call["env"]):
            ours, ref = CASES[call["op"]](device, dtype, seed, with_reference, **extra)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # a kernel fault surfaces here, inside this call's record
        record.update(ok=True, **_errors(ours, ref))
    except Exception as error:  # record and go on: one broken variant must not hide the others
        record.update(ok=False, error=f"{type(error).__name__}: {error}",
                      traceback=traceback.format_exc(limit=4))
    record["seconds"] = time.perf_counter() - start
    return record


def summarise(records: List[Dict[str, object]]) -> Dict[str, Dict[str, float]]:
    """Largest relative error of any output, per operator and dtype: {op: {dtype: rel_norm}}."""
    table: Dict[str, Dict[str, float]] = {}
    for r in records:
        errors = [v["rel_norm"] for v in r.values() if isinstance(v, dict) and "rel_norm" in v]
        if errors:
            cell = table.setdefault(r["op"], {})
            cell[r["dtype"]] = max(cell.get(r["dtype"], 0.0), max(errors))
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--json", metavar="PATH", help="write every call's record here")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the float64 reference (under a sanitizer: check our kernels, not torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not reid_kernels.extension_available():
        print("gpu_check_driver: reid_kernels._C is not built", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not (torch.cuda.is_available() and reid_kernels.has_cuda_kernels()):
        print("gpu_check_driver: --device cuda needs a GPU and the CUDA build of reid_kernels", file=sys.stderr)
        return 2
    start = time.perf_counter()
    calls = plan(device)
    records = []
    for i, call in enumerate(calls):
        records.append(run_call(call, device, args.seed + i, not args.no_reference))
        # One line per call: a run stopped at its deadline (a slow sanitizer) shows how far it got.
        extra = " ".join(f"{k}={call[k]}" for k in ("mode", "normalize") if k in call)
        print(f"  [{i + 1}/{len(calls)}] {call['op']} {call['dtype']} {call['env'] or ''} {extra} "
              f"{'ok' if records[-1]['ok'] else 'FAILED'} {records[-1]['seconds']:.2f} s", flush=True)
    failed = [r for r in records if not r["ok"] or not r.get("finite", True)]
    payload = {"device": str(device), "calls": len(records), "failed": len(failed),
               "seconds": time.perf_counter() - start, "max_rel_error": summarise(records), "records": records}
    for r in failed:
        print(f"gpu_check_driver: {r['op']} {r['dtype']} {r['env']}: {r.get('error', 'non-finite output')}",
              file=sys.stderr)
    print(f"gpu_check_driver: {len(records)} calls on {device}, {len(failed)} failed, "
          f"{payload['seconds']:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
            f.write("\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
