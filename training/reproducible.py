"""The reproducible CPU setting: the same float results on every x86-64 CPU with AVX2.

On the CPU, torch's float results depend on which SIMD kernels its libraries pick at run time
for the machine they find: ATen's vectorised kernels (element-wise ops, reductions, softmax,
batch norm) dispatch to AVX-512, AVX2 or plain code; oneDNN's JIT convolutions use the widest
instruction set the CPU has; MKL's BLAS chooses a code branch per CPU. Different kernels round
differently, and over a training run the last-bit differences grow into mAP points. Capping
all three to AVX2 makes a run bit-identical across x86-64 CPUs, for the same torch version and
wheel and the same thread count:

    ATEN_CPU_CAPABILITY=avx2   ATen's kernels
    ONEDNN_MAX_CPU_ISA=AVX2    oneDNN's convolutions (and its other primitives)
    MKL_CBWR=AVX2              MKL's conditional numerical reproducibility branch

The libraries read these variables once, the first time they compute, so they must be in the
environment before torch is imported: the CLI entry points (``python -m training.train``,
``.evaluate``, ``.demo``) call :func:`pin_before_torch` first thing in their ``__main__``
block, on by default, off with ``--no-reproducible``. :func:`state` reports what is in effect
(it is in every run's ``train.log`` banner and ``history.json``); ``python -m
training.reproducible`` prints it.

Not covered: other torch versions or builds (other kernels), other thread counts (other
reduction orders), CPUs without AVX2 and non-x86 CPUs (no AVX2 kernels to pin to), GPUs (see
:func:`make_deterministic` for run-to-run determinism there).
"""
from __future__ import annotations

import json
import os
import platform
import sys
import warnings
from typing import Dict, List, Optional, Sequence

PINS: Dict[str, str] = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}
FLAG = "--no-reproducible"
# cuBLAS's documented setting for deterministic results (a fixed workspace per stream, no
# split-K reductions that depend on timing); read when cuBLAS creates its first handle.
CUBLAS_WORKSPACE = ":4096:8"

# What pin_before_torch decided in this process: None when it was never called (library use,
# tests), else {"requested": bool, "applied": bool, "reason": str or None}.
_decision: Optional[Dict[str, object]] = None


class ReproducibilityWarning(UserWarning):
    """The reproducible setting was asked for and is not in effect."""


def cpu_lacks_avx2() -> Optional[str]:
    """Why this CPU cannot run the AVX2 kernels (a sentence), or None when it can (or cannot be told)."""
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64", "i686", "x86"):
        return f"this is a {platform.machine()} CPU, not x86-64: it has no AVX2 kernels to pin to"
    flags = _cpu_flags()  # None off Linux: torch's reported capability tells afterwards (see state())
    if flags is not None and not {"avx2", "fma"} <= set(flags):
        return "this x86-64 CPU has no AVX2 (with FMA), which ATen's AVX2 kernels need"
    return None


def _cpu_flags() -> Optional[List[str]]:
    """The CPU's feature flags from /proc/cpuinfo (Linux), or None."""
    try:
        with open("/proc/cpuinfo", "rt") as handle:
            return next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), None)
    except OSError:
        return None


def wanted(argv: Sequence[str]) -> bool:
    """Whether a CLI's arguments ask for the reproducible setting (on unless ``--no-reproducible``)."""
    return FLAG not in argv


def add_argument(parser) -> None:
    """The CLIs' ``--no-reproducible`` switch (read from ``sys.argv`` before torch loads; here for --help)."""
    parser.add_argument(FLAG, action="store_true",
                        help="do not pin torch's CPU kernels to AVX2 (faster on AVX-512 CPUs; the figures are "
                             "then this CPU's, not the README's)")


def pin_before_torch(requested: bool = True, stream=None) -> bool:
    """Put :data:`PINS` into the environment before torch loads; returns whether they are in place.

    Prints one line on ``stream`` (stderr) when it cannot: torch already imported with other
    settings, or a CPU without AVX2. With ``requested=False`` it leaves the environment alone."""
    global _decision
    stream = stream or sys.stderr
    if not requested:
        _decision = {"requested": False, "applied": False, "reason": f"turned off ({FLAG})"}
        return False
    reason = cpu_lacks_avx2()
    if reason is None and "torch" in sys.modules and not _env_matches():
        reason = ("torch was imported before the pins were set, with "
                  + " ".join(f"{k}={os.environ.get(k, '(unset)')}" for k in PINS)
                  + "; set them in the environment before python starts, or run through python -m training.*")
    if reason is not None:
        print(f"reproducible CPU setting not in effect: {reason}; running on this CPU's own kernels, so the "
              "figures will differ from the README's", file=stream)
        _decision = {"requested": True, "applied": False, "reason": reason}
        return False
    for key, value in PINS.items():
        if os.environ.get(key) not in (None, value):
            print(f"reproducible CPU setting: {key}={os.environ[key]} replaced by {value} (pass {FLAG} to keep it)",
                  file=stream)
        os.environ[key] = value
    _decision = {"requested": True, "applied": True, "reason": None}
    return True


def pin_from_argv(argv: Optional[List[str]] = None) -> bool:
    """:func:`pin_before_torch` as a CLI's arguments ask (the first call of every ``__main__``)."""
    return pin_before_torch(wanted(sys.argv[1:] if argv is None else argv))


def _env_matches() -> bool:
    return all(os.environ.get(k) == v for k, v in PINS.items())


def state() -> Dict[str, object]:
    """The setting in effect (imports torch): ``pinned`` is true when every pin is in the
    environment and ATen reports its AVX2 kernels (the one library that says what it runs)."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    pinned = _env_matches() and capability == "AVX2"
    reason = None
    if not pinned:
        if _decision and _decision["reason"]:
            reason = _decision["reason"]
        elif _env_matches():
            reason = f"the pins are set but ATen runs its {capability} kernels (set after torch computed?)"
        else:
            reason = "the pins are not set (not started through a training CLI, or turned off)"
    return {"pinned": pinned, "requested": None if _decision is None else _decision["requested"],
            "reason": reason, "env": {k: os.environ.get(k) for k in PINS}, "aten_cpu_capability": capability,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine()}


def describe(s: Optional[Dict[str, object]] = None) -> str:
    """One line for a log banner."""
    s = s or state()
    where = f"ATen {s['aten_cpu_capability']}, torch {s['torch']}, {s['threads']} thread(s)"
    if s["pinned"]:
        return f"reproducible CPU setting on ({' '.join(f'{k}={v}' for k, v in PINS.items())}; {where})"
    return f"reproducible CPU setting off: {s['reason']} ({where}; the figures are this CPU's)"


def make_deterministic(log=print) -> Dict[str, object]:
    """What PyTorch needs for run-to-run identical results on CUDA (``train.deterministic``):
    deterministic algorithms (warn-only: a nondeterministic op is named in the log rather than
    ending a long run), cuBLAS's fixed workspace, cuDNN without autotuning. Returns the settings."""
    import torch

    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in (":4096:8", ":16:8"):
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            warnings.warn(f"train.deterministic: CUBLAS_WORKSPACE_CONFIG set to {CUBLAS_WORKSPACE} after CUDA "
                          "started; cuBLAS may already hold a nondeterministic workspace (set it before python "
                          "starts)", ReproducibilityWarning)
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    settings = {"use_deterministic_algorithms": "warn_only",
                "CUBLAS_WORKSPACE_CONFIG": os.environ["CUBLAS_WORKSPACE_CONFIG"],
                "cudnn.deterministic": True, "cudnn.benchmark": False}
    log("train.deterministic: " + ", ".join(f"{k} {v}" for k, v in settings.items()))
    return settings


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m training.reproducible [--no-reproducible]``: the setting a training CLI would run with."""
    pin_from_argv(argv)
    print(json.dumps(state(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
