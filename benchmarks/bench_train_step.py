"""Training-step throughput of each recipe on the reid_kernels operators vs their plain-PyTorch twins.

One training step exactly as :class:`training.engine.loop.Trainer` runs it -- ``batch.to(device)``,
``out = model(batch.images)``, ``loss, logs = recipe.losses(model, batch, out)`` (both under
``torch.autocast`` with AMP bf16 on CUDA), the Trainer's finiteness check, ``zero_grad``,
``backward``, ``optimizer.step``, ``recipe.after_step`` -- on a synthetic batch (no dataset, no
data loading), under two backends:

* ``reid_kernels``: the recipes as shipped (fused CPU/CUDA operators);
* ``reference``: the same recipes with the operator entry points they call patched to the
  plain-PyTorch twins of :mod:`reid_kernels.reference` (see :func:`reference_backend`):
  LbA's ``cmalign`` (and ``masked_dense_triplet``, used when ``loss.coattention=false``), and
  the memory-bank update behind MCE's :class:`reid_kernels.nn.MemoryBank`.  ``lba_pairs`` and
  ``reid_kernels.losses.centroid_triplet`` are plain PyTorch already and stay as they are.

Cases: ``synth`` -- the ``lba_synth`` / ``mce_synth`` configs as they are (CPU-sized networks,
64x32 images); ``paper`` -- ``lba_sysu`` / ``mce_sysu``: ResNet-50 at width 64, LbA 288x144,
MCE 384x128 (three modalities), 8 ids x 4 images per modality, 395 identities.  ``paper`` runs
by default on CUDA only (on 2 CPU cores one step takes over a minute, a case 10-20 minutes; ask for
it with ``--cases all`` or ``--cases paper``).

Before timing, every case runs ONE step under each backend from the same initial state (model,
optimiser, recipe state: pair generator, memory banks) and checks, untimed, that

* the losses agree to ``--rtol`` (relative; 1e-4 float32, 1e-3 under AMP), gradients to
  ``--grad-rtol`` (relative norm over all parameters) and the updated memory banks to 1e-4;
* the patch took effect: under ``reference`` the patched twins were called and no
  ``reid_kernels::`` custom op ran (a counting ``TorchDispatchMode``), under ``reid_kernels`` such ops did run.

Timing: ``--warmup`` untimed steps per backend, then ``--repeats`` rounds; each round times
``--steps`` consecutive steps under each backend (the order alternating between rounds, so a
load that drifts on a shared machine hits both alike).  Seconds per step = median over rounds;
images/s = images per step / seconds per step; ratio = reid_kernels img/s / reference img/s.
Peak memory (CUDA): ``torch.cuda.max_memory_allocated`` over the timed steps of a backend.

    python benchmarks/bench_train_step.py --device cpu --json benchmarks/results/train_step_cpu.json
    python benchmarks/bench_train_step.py --device cuda --json benchmarks/results/train_step_cuda.json
    python benchmarks/bench_train_step.py --device cpu --recipes lba --override lba:loss.coattention=false
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import functools
import inspect
import os
import sys
import types
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # the repository root: the `training` package
import _common  # noqa: E402

import reid_kernels  # noqa: E402
import reid_kernels.nn as rk_nn  # noqa: E402
from reid_kernels import reference  # noqa: E402

import reid_kernels.training.recipes.lba as lba_module  # noqa: E402
from reid_kernels.training.config import load_config  # noqa: E402
from reid_kernels.training.data import Batch  # noqa: E402
from reid_kernels.training.engine.schedule import EpochSchedule, build_optimizer  # noqa: E402
from reid_kernels.training.recipes import RECIPES, TrainContext, build_model  # noqa: E402
from reid_kernels.training.recipes.mce import MODALITY_BANK  # noqa: E402

BACKENDS = ("reference", "reid_kernels")
# Recipes whose training step runs reid_kernels operators. SAAI's does not (its losses are plain
# PyTorch in reid_kernels.losses; its operator-backed part, AIM, is test-time: bench_retrieval.py).
RECIPE_NAMES = tuple(r for r in RECIPES if r in ("lba", "mce"))
TRAIN_CLASSES = {"sysu": 395, "regdb": 206}  # training identities of the real sets
BANK_ATOL = 1e-4


# ---------------------------------------------------------------------------
# Backends.


def check_signatures() -> None:
    """The twins take the arguments the recipes pass to the shipped operators (positionally)."""
    for name in ("cmalign", "masked_dense_triplet"):
        shipped = list(inspect.signature(getattr(reid_kernels, name)).parameters)
        twin = list(inspect.signature(getattr(reference, name)).parameters)
        if shipped != twin:
            raise SystemExit(f"reference.{name}{twin} no longer takes the arguments of reid_kernels.{name}{shipped}")
    params = inspect.signature(reference.memory_update_).parameters
    missing = [p for p in ("memory", "features", "labels", "momentum", "mode", "normalize") if p not in params]
    if missing:
        raise SystemExit(f"reference.memory_update_: parameters {missing} are gone; update reference_backend()")


def _counted(counts: collections.Counter, name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        counts[name] += 1
        return fn(*args, **kwargs)

    return wrapper


def _reference_memory_update(counts: collections.Counter):
    """``reid_kernels.memory_update_``'s signature on top of ``reference.memory_update_``."""

    def memory_update_(memory, features, labels, momentum, *, mode="sequential", normalize=True, convention="old"):
        counts["memory_update_"] += 1
        old_weight = float(momentum) if convention == "old" else 1.0 - float(momentum)  # the twin weights the OLD row
        out = reference.memory_update_(memory, features, labels, old_weight, mode=mode, normalize=normalize)
        if out is not memory:  # the kernel updates the bank in place; so must its stand-in
            with torch.no_grad():
                memory.copy_(out)
        return memory

    return memory_update_


@contextlib.contextmanager
def reference_backend(counts: collections.Counter):
    """Patch the operator entry points the recipes call to their ``reid_kernels.reference`` twins.

    * ``training.recipes.lba.reid_kernels`` (the module attribute LbA calls ``cmalign`` and
      ``lba_pairs`` through) -> a namespace with ``reference.cmalign`` and the original
      ``lba_pairs``; any other attribute LbA might start using fails loudly instead of running
      the kernels unnoticed;
    * ``training.recipes.lba.masked_dense_triplet`` -> ``reference.masked_dense_triplet``;
    * ``reid_kernels.nn._memory_update_`` (what ``MemoryBank.update_`` calls) -> a wrapper around
      ``reference.memory_update_`` (same arguments; ``convention`` mapped onto the old-row weight).

    Every twin call is counted in ``counts``.  Restored on exit.
    """
    saved = (lba_module.reid_kernels, lba_module.masked_dense_triplet, rk_nn._memory_update_)
    lba_module.reid_kernels = types.SimpleNamespace(cmalign=_counted(counts, "cmalign", reference.cmalign),
                                                    lba_pairs=reid_kernels.lba_pairs)
    lba_module.masked_dense_triplet = _counted(counts, "masked_dense_triplet", reference.masked_dense_triplet)
    rk_nn._memory_update_ = _reference_memory_update(counts)
    try:
        yield
    finally:
        lba_module.reid_kernels, lba_module.masked_dense_triplet, rk_nn._memory_update_ = saved


def backend(name: str, counts: collections.Counter):
    return reference_backend(counts) if name == "reference" else contextlib.nullcontext()


# ---------------------------------------------------------------------------
# Cases.


@dataclass(frozen=True)
class Case:
    name: str  # "synth" or "paper"
    config: str
    overrides: tuple = ()


def cases_for(which: str, recipes: List[str], overrides: Dict[str, List[str]]) -> List[Case]:
    table = {"synth": {"lba": "lba_synth", "mce": "mce_synth"}, "paper": {"lba": "lba_sysu", "mce": "mce_sysu"}}
    names = ("synth", "paper") if which == "all" else (which,)
    return [Case(n, table[n][r], tuple(overrides.get(r, ()))) for n in names for r in recipes]


def num_classes_for(cfg: dict) -> int:
    d = cfg["data"]
    if d["dataset"] == "synth":
        return d["synth"]["ids"] - d["synth"]["test_ids"]  # training identities of the synthetic set
    return TRAIN_CLASSES[d["dataset"]]


@dataclass
class Setup:
    """One case ready to step: model, recipe, optimiser, a fixed synthetic batch."""

    case: Case
    cfg: dict
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    num_classes: int
    model: torch.nn.Module
    recipe: object
    optimizer: torch.optim.Optimizer
    ctx: TrainContext
    batch: Batch
    info: dict = field(default_factory=dict)

    @property
    def images_per_step(self) -> int:
        return self.batch.num_images()


def build_setup(case: Case, device: torch.device, amp_dtype: Optional[torch.dtype], seed: int = 0) -> Setup:
    cfg = load_config(case.config, overrides=case.overrides,
                      updates={"model.pretrained": None, "train.device": device.type})
    num_classes = num_classes_for(cfg)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="model.pretrained not set")
        model = build_model(cfg, num_classes, log=lambda *_: None).to(device)
    model.train()
    recipe = RECIPES[cfg["recipe"]](cfg, num_classes, seed=seed)
    ctx = TrainContext(model, device, None, cfg)
    recipe.on_train_start(ctx)
    g = torch.Generator().manual_seed(seed + 1)
    modalities = recipe.batch_spec().modalities
    if hasattr(recipe, "load_centroids"):  # MCE: random unit centroids instead of the epoch-start full pass
        banks = sorted({MODALITY_BANK[m] for m in modalities})
        recipe.load_centroids({b: F.normalize(torch.randn(num_classes, model.feat_dim, generator=g), dim=1).to(device)
                               for b in banks})
    optimizer = build_optimizer(model, cfg)
    EpochSchedule(optimizer, cfg["optim"]).set_epoch(0)  # the epoch-0 learning rates, as the Trainer sets them
    # The sampler's layout: num_ids identities x num_pos images per modality, identity-major, the same
    # identity order in every modality.
    s, d = cfg["sampler"], cfg["data"]
    ids = torch.randperm(num_classes, generator=g)[: s["num_ids"]]
    labels = ids.repeat_interleave(s["num_pos"])
    images = {m: torch.randn(len(labels), 3, d["height"], d["width"], generator=g) for m in modalities}
    batch = Batch(images, {m: labels.clone() for m in modalities})
    if device.type == "cuda":
        batch = batch.pin_memory()  # the Trainer's DataLoader pins; the step copies non_blocking
    m = cfg["model"]
    info = dict(case=case.name, recipe=cfg["recipe"], config=case.config, overrides=list(case.overrides),
                images_per_step=batch.num_images(), modalities=list(modalities), num_ids=s["num_ids"],
                num_pos=s["num_pos"], height=d["height"], width=d["width"], num_classes=num_classes,
                depth=m["depth"], model_width=m["width"], stems=m["stems"], non_local=m["non_local"],
                optimizer=cfg["optim"]["name"], amp=str(amp_dtype).replace("torch.", "") if amp_dtype else "none",
                parameters=sum(p.numel() for p in model.parameters()))
    return Setup(case, cfg, device, amp_dtype, num_classes, model, recipe, optimizer, ctx, batch, info)


def train_step(s: Setup, capture_grads: bool = False):
    """One Trainer step (training/engine/loop.py) on the setup's batch; returns (loss, logs, grads)."""
    batch = s.batch.to(s.device, non_blocking=True)
    with torch.autocast(s.device.type, dtype=s.amp_dtype, enabled=s.amp_dtype is not None):
        out = s.model(batch.images)
        loss, logs = s.recipe.losses(s.model, batch, out)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{s.case.config}: loss is {loss.item()}")
    s.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = None
    if capture_grads:
        grads = [None if p.grad is None else p.grad.detach().clone() for p in s.model.parameters()]
    s.optimizer.step()
    s.recipe.after_step(s.ctx)
    return loss.detach(), logs, grads


# ---------------------------------------------------------------------------
# Equivalence check.


class KernelOpCounter(TorchDispatchMode):
    """Counts the ``reid_kernels::`` custom ops dispatched while active (backward included)."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "reid_kernels":
            self.counts[str(func.name())] += 1
        return func(*args, **(kwargs or {}))


def snapshot(s: Setup) -> dict:
    return {"model": copy.deepcopy(s.model.state_dict()), "optimizer": copy.deepcopy(s.optimizer.state_dict()),
            "recipe": copy.deepcopy(s.recipe.state_dict())}


def restore(s: Setup, state: dict) -> None:
    s.model.load_state_dict(state["model"])
    s.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
    s.recipe.load_state_dict(copy.deepcopy(state["recipe"]))


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _grad_rel(ga, gb) -> float:
    num = den = 0.0
    for a, b in zip(ga, gb):
        if a is None and b is None:
            continue
        if a is None or b is None:
            return float("inf")
        num += float((a.double() - b.double()).pow(2).sum())
        den += float(b.double().pow(2).sum())
    return (num ** 0.5) / max(den ** 0.5, 1e-30)


def equivalence_check(s: Setup, rtol: float, grad_rtol: float) -> dict:
    """One step under each backend from the same state; asserts agreement and that the patch took effect."""
    initial = snapshot(s)
    runs = {}
    for name in BACKENDS:
        restore(s, initial)
        counts: collections.Counter = collections.Counter()
        with backend(name, counts), KernelOpCounter() as ops_seen:
            loss, logs, grads = train_step(s, capture_grads=True)
            _common.synchronize(s.device)
        ops = ops_seen.counts
        banks = ({k: v.detach().clone() for k, v in s.recipe.memory.state_dict().items() if k.startswith("bank_")}
                 if hasattr(s.recipe, "memory") else {})
        runs[name] = dict(loss=float(loss), logs={k: float(v) for k, v in logs.items()}, grads=grads, banks=banks,
                          twin_calls=dict(counts), kernel_ops=dict(ops))
    restore(s, initial)

    ref, rk = runs["reference"], runs["reid_kernels"]
    loss_rel = _rel(ref["loss"], rk["loss"])
    term_rel = {k: _rel(ref["logs"][k], rk["logs"][k]) for k in rk["logs"]}
    grad_rel = _grad_rel(ref["grads"], rk["grads"])
    bank_diff = max((float((ref["banks"][k] - rk["banks"][k]).abs().max()) for k in rk["banks"]), default=None)
    result = dict(loss_reference=ref["loss"], loss_reid_kernels=rk["loss"], loss_rel_diff=loss_rel,
                  term_rel_diff=term_rel, grad_rel_diff=grad_rel, bank_max_abs_diff=bank_diff, rtol=rtol,
                  grad_rtol=grad_rtol, bank_atol=BANK_ATOL, reference_twin_calls=ref["twin_calls"],
                  reference_kernel_ops=ref["kernel_ops"], reid_kernels_kernel_ops=rk["kernel_ops"])
    problems = []
    if not loss_rel <= rtol:
        problems.append(f"loss {ref['loss']!r} (reference) vs {rk['loss']!r} (reid_kernels): rel {loss_rel:.2e} > {rtol}")
    if not grad_rel <= grad_rtol:
        problems.append(f"gradients: relative difference {grad_rel:.2e} > {grad_rtol}")
    if bank_diff is not None and not bank_diff <= BANK_ATOL:
        problems.append(f"memory banks after the step: max |diff| {bank_diff:.2e} > {BANK_ATOL}")
    if sum(ref["twin_calls"].values()) == 0:
        problems.append("reference backend: no reference twin was called (the patch did not take effect)")
    if ref["kernel_ops"]:
        problems.append(f"reference backend: reid_kernels ops still ran: {ref['kernel_ops']}")
    if not rk["kernel_ops"]:
        problems.append("reid_kernels backend: no reid_kernels op ran")
    if s.cfg["recipe"] == "lba" and s.recipe.needs_alignment and ref["twin_calls"].get("cmalign", 0) == 0:
        problems.append("lba: reference.cmalign was not called")
    if s.cfg["recipe"] == "mce" and s.recipe.uses_memory and ref["twin_calls"].get("memory_update_", 0) == 0:
        problems.append("mce: reference.memory_update_ was not called")
    result["passed"] = not problems
    result["problems"] = problems
    return result


def describe_check(label: str, c: dict) -> str:
    calls = ", ".join(f"{k} x{v}" for k, v in sorted(c["reference_twin_calls"].items())) or "none"
    ops = sum(c["reid_kernels_kernel_ops"].values())
    bank = "-" if c["bank_max_abs_diff"] is None else f"{c['bank_max_abs_diff']:.1e}"
    return (f"check {label}: loss reference {c['loss_reference']:.7f} vs reid_kernels {c['loss_reid_kernels']:.7f} "
            f"(rel {c['loss_rel_diff']:.1e}), grads rel {c['grad_rel_diff']:.1e}, banks max|diff| {bank}; "
            f"reference twins called: {calls}; reid_kernels ops under reference: "
            f"{sum(c['reference_kernel_ops'].values())}, under reid_kernels: {ops} -> "
            + ("OK" if c["passed"] else "FAILED: " + "; ".join(c["problems"])))


# ---------------------------------------------------------------------------
# Timing.


def measure(s: Setup, steps: int, repeats: int, warmup: int, clock: str) -> Dict[str, dict]:
    counts = {name: collections.Counter() for name in BACKENDS}
    for name in BACKENDS:
        with backend(name, counts[name]):
            for _ in range(warmup):
                train_step(s)
        _common.synchronize(s.device)
        counts[name].clear()

    def run_steps():
        for _ in range(steps):
            train_step(s)

    per_step = {name: [] for name in BACKENDS}
    peak = {name: None for name in BACKENDS}
    for r in range(repeats):
        for name in (BACKENDS if r % 2 == 0 else BACKENDS[::-1]):
            with backend(name, counts[name]):
                if s.device.type == "cuda":
                    torch.cuda.synchronize(s.device)
                    torch.cuda.reset_peak_memory_stats(s.device)
                seconds = _common.time_runs(run_steps, s.device, repeat=1, warmup=0, clock=clock)[0]
                if s.device.type == "cuda":
                    torch.cuda.synchronize(s.device)
                    peak[name] = max(peak[name] or 0, torch.cuda.max_memory_allocated(s.device))
            per_step[name].append(seconds / steps)
    out = {}
    for name in BACKENDS:
        median = _common.median(per_step[name])
        out[name] = dict(seconds_per_step=median, min_seconds_per_step=min(per_step[name]),
                         seconds_per_step_all=per_step[name], images_per_s=s.images_per_step / median,
                         peak_bytes=peak[name],
                         twin_calls_per_step={k: v / (steps * repeats) for k, v in counts[name].items()})
    return out


# ---------------------------------------------------------------------------
# Output.


def markdown_table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def table_for(results: List[dict], device: torch.device) -> str:
    headers = ["case", "recipe", "images/step", "reference img/s", "reid_kernels img/s", "ratio"]
    if device.type == "cuda":
        headers += ["reference peak MiB", "reid_kernels peak MiB"]
    rows = []
    for r in results:
        ref, rk = r["backends"]["reference"], r["backends"]["reid_kernels"]
        shape = f"{r['case']} ({r['config']}, R{r['depth']}w{r['model_width']}, {r['height']}x{r['width']})"
        row = [shape, r["recipe"], r["images_per_step"], f"{ref['images_per_s']:.1f}", f"{rk['images_per_s']:.1f}",
               f"{r['ratio']:.2f}x"]
        if device.type == "cuda":
            row += [_common.fmt_bytes(ref["peak_bytes"]), _common.fmt_bytes(rk["peak_bytes"])]
        rows.append(row)
    return markdown_table(headers, rows)


# ---------------------------------------------------------------------------
# Driver.


def parse_overrides(items: List[str]) -> Dict[str, List[str]]:
    out: Dict[str, List[str]] = {}
    for item in items:
        recipe, sep, kv = item.partition(":")
        if not sep or recipe not in RECIPE_NAMES or "=" not in kv:
            raise SystemExit(f"--override {item!r}: expected RECIPE:KEY=VALUE with RECIPE in {list(RECIPE_NAMES)}")
        out.setdefault(recipe, []).append(kv)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", metavar="PATH", help="also write every measurement to this JSON file")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: 2 on the CPU)")
    parser.add_argument("--cases", choices=("default", "synth", "paper", "all"), default="default",
                        help="synth: lba_synth/mce_synth; paper: ResNet-50 at the papers' sizes; "
                             "default: synth on the CPU, all on CUDA")
    parser.add_argument("--recipes", nargs="+", choices=RECIPE_NAMES, default=list(RECIPE_NAMES))
    parser.add_argument("--override", action="append", default=[], metavar="RECIPE:KEY=VALUE",
                        help="config override for that recipe's cases (repeatable), e.g. lba:loss.coattention=false")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed round (default: 3 CPU, 10 CUDA; "
                                                               "1 for paper cases on the CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per backend; median reported "
                                                                  "(default: 5; 3 for paper cases on the CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per backend (default: 2 CPU, 5 CUDA)")
    parser.add_argument("--amp", choices=("auto", "none", "bf16"), default="auto",
                        help="autocast dtype; auto: bf16 on CUDA (as the *_sysu configs train), none on the CPU")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall", help="CPU timing clock (_common)")
    parser.add_argument("--rtol", type=float, default=None, help="loss tolerance of the check (1e-4; 1e-3 under AMP)")
    parser.add_argument("--grad-rtol", type=float, default=None, help="gradient tolerance (1e-3; 2e-2 under AMP)")
    parser.add_argument("--no-check", action="store_true", help="skip the equivalence check")
    parser.add_argument("--quick", action="store_true", help="1 warm-up, 2 rounds of 1 step: a smoke test")
    args = parser.parse_args(argv)

    device = _common.resolve_device(args.device)
    if device.type == "cuda" and not reid_kernels.has_cuda_kernels():
        raise SystemExit("--device cuda: this reid_kernels build has no CUDA kernels")
    if not reid_kernels.extension_available():
        raise SystemExit("reid_kernels._C is not built: pip install --no-build-isolation -e .")
    check_signatures()
    threads = args.threads if args.threads is not None else (2 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    amp_dtype = torch.bfloat16 if (args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda")) else None
    if amp_dtype is not None and device.type != "cuda":
        raise SystemExit("--amp bf16: AMP runs on CUDA only (as in the Trainer)")
    rtol = args.rtol if args.rtol is not None else (1e-3 if amp_dtype else 1e-4)
    grad_rtol = args.grad_rtol if args.grad_rtol is not None else (2e-2 if amp_dtype else 1e-3)
    which = args.cases if args.cases != "default" else ("synth" if device.type == "cpu" else "all")
    cases = cases_for(which, args.recipes, parse_overrides(args.override))

    def plan(case: Case):
        slow = device.type == "cpu" and case.name == "paper"
        if args.quick:
            return 1, 2, 1
        steps = args.steps or (1 if slow else (3 if device.type == "cpu" else 10))
        repeats = args.repeats or (3 if slow else 5)
        warmup = args.warmup if args.warmup is not None else (1 if slow else (2 if device.type == "cpu" else 5))
        return steps, repeats, warmup

    env = _common.environment(device)
    clock = "CUDA events" if device.type == "cuda" else f"{args.clock} clock"
    print(f"Training-step benchmark on {env['device']} ({env.get('gpu', env['cpu'])}), torch {env['torch']}, "
          f"{env['torch_threads']} threads, AMP {amp_dtype or 'off'}, commit {env['commit']}", flush=True)

    load = env.get("load_average_1m")
    if device.type == "cpu" and load is not None and load + (threads or torch.get_num_threads()) > (os.cpu_count() or 1) + 0.5:
        print(f"  note: load average {load} on {os.cpu_count()} cores: other processes compete for the CPU; with more "
              "threads than free cores OpenMP waits inflate every step (compare --threads 1)", flush=True)
    results, failed = [], []
    for case in cases:
        s = build_setup(case, device, amp_dtype)
        label = f"{case.name} {s.cfg['recipe']} ({case.config}{', ' + ' '.join(case.overrides) if case.overrides else ''})"
        steps, repeats, warmup = plan(case)
        record = dict(s.info, steps=steps, repeats=repeats, warmup=warmup)
        if not args.no_check:
            check = equivalence_check(s, rtol, grad_rtol)
            record["check"] = check
            print("  " + describe_check(label, check), flush=True)
            if not check["passed"]:
                failed.append(label)
        record["backends"] = measure(s, steps, repeats, warmup, args.clock)
        ref, rk = record["backends"]["reference"], record["backends"]["reid_kernels"]
        record["ratio"] = rk["images_per_s"] / ref["images_per_s"]
        print(f"  {label}: {s.images_per_step} images/step; reference {ref['seconds_per_step'] * 1e3:.1f} ms/step "
              f"({ref['images_per_s']:.1f} img/s), reid_kernels {rk['seconds_per_step'] * 1e3:.1f} ms/step "
              f"({rk['images_per_s']:.1f} img/s): {record['ratio']:.2f}x", flush=True)
        results.append(record)
        del s
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print()
    print(table_for(results, device))
    print(f"\nimg/s: images per training step / median seconds per step ({clock}); ratio: reid_kernels img/s / "
          "reference img/s (> 1: the kernels train faster). Each step: forward, recipe losses, backward, optimiser "
          "step, on a fixed synthetic batch (no data loading).")
    if args.json:
        _common.write_json(args.json, {"benchmark": "train_step", "clock": clock, "environment": env,
                                       "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "none",
                                       "check_passed": None if args.no_check else not failed,
                                       "results": results})
        print(f"wrote {args.json}")
    if failed:
        raise SystemExit(f"equivalence check FAILED for: {', '.join(failed)}")


if __name__ == "__main__":
    main()
