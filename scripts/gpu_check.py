"""The GPU proof of reid_kernels in one command: build, CUDA tests, sanitizers, benchmarks, JSON.

On a machine with a GPU (a lent H100/H200: 16 cores, no network, python3 with torch, nvcc,
compute-sanitizer), from the repository root -- the one-line device command::

    python3 scripts/gpu_check.py --out-dir "$OUT" --commit <the commit, from git rev-parse HEAD here>

(``make gpu-check OUT_DIR="$OUT" COMMIT=<sha>`` is the same where make is installed.)  It needs
pytest, numpy, PyYAML and Pillow, which that machine's image has; elsewhere carry missing ones as
wheels (``pip download --no-deps --only-binary=:all: -d .whl NAME==VERSION`` here, then
``python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export
PYTHONPATH=/tmp/site`` before the command there).  Steps, each with its own time budget (a step
that fails or runs out of time is recorded and the next one runs; the whole run stops starting
steps when ``--budget`` seconds, 450 by default, are spent, so it ends inside 8 minutes):

1. ``build``: ``TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc) FORCE_CUDA=1 python setup.py build_ext
   --inplace`` (no network), then checks that the built library has CUDA kernels (and, where
   ``cuobjdump`` is found, sm_90 machine code);
2. in parallel (correctness only, no timing): ``tests`` -- pytest on every test that runs CUDA
   code (``gpu_check_select.py``: the ``cuda`` marker, the ``[cuda]`` parametrisations of the
   ``device`` fixture, and tests that need a GPU), JUnit XML summarised; ``driver`` --
   ``gpu_check_driver.py``, every kernel in every variant against the float64 reference;
   ``memcheck`` and ``racecheck`` -- the driver under ``compute-sanitizer`` (without the caching
   allocator, so an out-of-bounds access hits unallocated memory); ``compile_warmup`` --
   ``torch.compile`` of the reference at the benchmark's shapes, so that the benchmark finds
   inductor's caches filled instead of compiling inside its own budget;
3. one after another, alone on the GPU: ``bench_cmalign`` (LbA shapes and 72x36, float32 /
   float16 / bfloat16, reid_kernels vs the reference eager and under ``torch.compile``, errors vs
   the float64 reference, peak memory), ``bench_memory`` and ``bench_retrieval`` (torch search,
   no faiss), each ``--device cuda --json``;
4. writes ``gpu_check.json`` (device, capability, torch / CUDA / driver versions, commit and a
   hash of the sources, build time, test and sanitizer summaries, per-dtype errors, benchmark
   headlines), ``driver.json``, ``bench_*.json`` and ``log.txt`` -- at most 8 files, the limit of
   what comes back from a lent machine -- into ``--out-dir`` (default
   ``benchmarks/results/gpu/<date>/``), checks them against the schema, prints a summary.

``--dry-run`` (``make gpu-check-dry``, in CI) does everything but the GPU parts on a CPU machine:
the same argument parsing, the same pytest selection (whose tests skip there), the driver and
the benchmarks' code paths with ``--device cpu`` at tiny sizes, the sanitizer-output parser on
sample output, the JSON writing and its schema check (output in ``build/gpu-check-dry/``).
Exit status: 0 when every step passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")
SCHEMA_VERSION = 1
MAX_FILES = 8  # what comes back from a lent machine's $OUT: 8 files of at most 16 MiB
MAX_FILE_BYTES = 16 * 2**20
LOG_TAIL_BYTES = 256 * 1024  # per step, in log.txt
MIN_STEP_S = 10  # a step is not started with less than this left of the global budget
RESERVE_S = 10  # kept back from the global budget for writing and checking the JSON

# Seconds per step on a GPU machine (the parallel steps overlap).  Measured guesses, each with
# room: the CUDA build is one nvcc job per .cu file, soft_warp_cuda.cu the longest.
GPU_BUDGETS = {"build": 240, "tests": 180, "driver": 60, "memcheck": 150, "racecheck": 180, "compile_warmup": 180,
               "bench_cmalign": 150, "bench_memory": 60, "bench_retrieval": 90}
DRY_BUDGETS = {"build": 30, "tests": 60, "driver": 60, "memcheck": 30, "racecheck": 30, "compile_warmup": 60,
               "bench_cmalign": 60, "bench_memory": 30, "bench_retrieval": 60}
PARALLEL_STEPS = ("tests", "driver", "memcheck", "racecheck", "compile_warmup")
# Steps whose failure does not fail the run: the warm-up only fills inductor's caches early.
ADVISORY_STEPS = ("compile_warmup",)
STEPS = tuple(GPU_BUDGETS)
SOURCE_DIRS = ("csrc", "reid_kernels", "training", "tests", "benchmarks", "scripts")
SOURCE_SUFFIXES = (".py", ".cpp", ".cu", ".cuh", ".h", ".yaml", ".toml")
SOURCE_FILES = ("setup.py", "pyproject.toml", "Makefile")


# ---------------------------------------------------------------------------
# Where the numbers come from.


def tree_sha256(root: str = ROOT) -> str:
    """Hash of the source files (paths and bytes), comparable where git is absent (a lent machine
    gets the working tree without .git): ``python3 scripts/gpu_check.py --tree-hash`` here."""
    paths = [p for p in SOURCE_FILES if os.path.isfile(os.path.join(root, p))]
    for top in SOURCE_DIRS:
        for folder, dirs, files in os.walk(os.path.join(root, top)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__" and d != "results")
            paths += [os.path.relpath(os.path.join(folder, f), root) for f in files if f.endswith(SOURCE_SUFFIXES)]
    digest = hashlib.sha256()
    for rel in sorted(paths):
        digest.update(rel.replace(os.sep, "/").encode() + b"\0")
        with open(os.path.join(root, rel), "rb") as f:
            digest.update(f.read() + b"\0")
    return digest.hexdigest()


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _first_line(cmd: List[str]) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in (out.stdout or "").splitlines() if line.strip()]
    return lines[-1] if out.returncode == 0 and lines else None


def find_tool(name: str) -> Optional[str]:
    """``name`` on PATH, else in the CUDA toolkit folders it usually lives in."""
    found = shutil.which(name)
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    candidates = [os.path.join(h, "bin", name) for h in homes if h]
    candidates += [os.path.join(h, "compute-sanitizer", name) for h in homes if h]
    candidates += sorted(glob.glob(f"/usr/local/cuda*/bin/{name}")) + sorted(glob.glob(f"/opt/nvidia/*/{name}"))
    return next((c for c in candidates if os.access(c, os.X_OK)), None)


def environment(python: str, commit: Optional[str], dry_run: bool) -> Dict[str, object]:
    """Device, versions and source identity, read in a child process (this one never touches the GPU)."""
    probe = (
        "import json, torch\n"
        "d = {'torch': torch.__version__, 'cuda': torch.version.cuda, 'cuda_available': torch.cuda.is_available()}\n"
        "if d['cuda_available']:\n"
        "    p = torch.cuda.get_device_properties(0)\n"
        "    d.update(device_name=p.name, capability=f'{p.major}.{p.minor}', multiprocessors=p.multi_processor_count,\n"
        "             memory_bytes=p.total_memory, device_count=torch.cuda.device_count())\n"
        "print(json.dumps(d))\n"
    )
    env: Dict[str, object] = {"torch": None, "cuda": None, "cuda_available": False, "device_name": None,
                              "capability": None}
    try:
        out = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
        env.update(json.loads(out.stdout.strip().splitlines()[-1]))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as error:
        env["probe_error"] = f"{type(error).__name__}: {error}"
    sanitizer = find_tool("compute-sanitizer")
    env.update(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        mode="dry-run" if dry_run else "gpu",
        commit=commit or git_commit(),
        tree_sha256=tree_sha256(),
        python=_first_line([python, "-c", "import platform; print(platform.python_version())"]),
        python_executable=python,
        platform=platform.platform(),
        cpu_count=os.cpu_count(),
        nvcc=_first_line([find_tool("nvcc") or "nvcc", "--version"]),
        compute_sanitizer=sanitizer,
        compute_sanitizer_version=_first_line([sanitizer, "--version"]) if sanitizer else None,
        driver=_first_line(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,memory.total",
                            "--format=csv,noheader"]),
    )
    return env


# ---------------------------------------------------------------------------
# Running the steps: each a child process with a deadline, its output in its own log.


class Budget:
    """The global time budget: each step gets min(its own budget, what is left)."""

    def __init__(self, total_s: float):
        self.total_s = total_s
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def timeout_for(self, step_budget: float) -> float:
        return min(step_budget, self.total_s - RESERVE_S - self.elapsed())


class Job:
    """A child process in its own process group, killed (group and all) at its deadline."""

    def __init__(self, name: str, cmd: List[str], timeout_s: float, log_dir: str, env: Optional[dict] = None):
        self.name, self.cmd, self.timeout_s = name, cmd, timeout_s
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self.start = time.monotonic()
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.env_note = {k: v for k, v in (env or {}).items()}
        with open(self.log_path, "wb") as log:
            try:
                self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=full_env,
                                             start_new_session=True)
                self.launch_error = None
            except OSError as error:
                self.proc, self.launch_error = None, f"{type(error).__name__}: {error}"

    def wait(self) -> Dict[str, object]:
        record = {"command": shlex.join(self.cmd), "env": self.env_note, "budget_s": round(self.timeout_s, 1)}
        if self.proc is None:
            return dict(record, status="failed", rc=None, seconds=0.0, reason=self.launch_error)
        timed_out = False
        try:
            rc = self.proc.wait(timeout=max(0.0, self.start + self.timeout_s - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group this Job started, nothing else
            except ProcessLookupError:
                pass
            rc = self.proc.wait()
        seconds = time.monotonic() - self.start
        status = "timed_out" if timed_out else ("ok" if rc == 0 else "failed")
        return dict(record, status=status, rc=rc, seconds=round(seconds, 2))

    def output(self, limit: int = LOG_TAIL_BYTES) -> str:
        return read_tail(self.log_path, limit)


def read_tail(path: str, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def indent_tail(text: str, lines: int) -> str:
    """The last ``lines`` lines of ``text``, indented (a failing step's output in the summary)."""
    return "\n".join("      | " + line for line in text.splitlines()[-lines:])


def skipped(reason: str, **extra) -> Dict[str, object]:
    return dict(status="skipped", seconds=0.0, reason=reason, **extra)


# ---------------------------------------------------------------------------
# Reading what the steps wrote.


def summarise_junit(path: str) -> Dict[str, object]:
    """passed / failed / errors / skipped counts, failing test names and the commonest skip reasons."""
    summary = {"total": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "cuda_ran": 0,
               "selected_by": {}, "failures": [], "skip_reasons": {}}
    try:
        tree = ET.parse(path)
    except (OSError, ET.ParseError) as error:
        summary["junit_error"] = f"{type(error).__name__}: {error}"
        return summary
    for case in tree.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        summary["total"] += 1
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "errors"
                message = (child.get("message") or child.text or "").strip().splitlines()
                summary["failures"].append(f"{name}: {message[0][:300] if message else child.tag}")
                break
            if child.tag == "skipped":
                outcome = "skipped"
                reason = (child.get("message") or "").strip()[:120]
                summary["skip_reasons"][reason] = summary["skip_reasons"].get(reason, 0) + 1
        summary[outcome] += 1
        reason = next((p.get("value") for p in case.iter("property") if p.get("name") == "gpu_check"), "unknown")
        summary["selected_by"][reason] = summary["selected_by"].get(reason, 0) + 1
        # Ran CUDA code: a test with the cuda marker or a CUDA device parameter that was not skipped.
        if outcome != "skipped" and reason in ("cuda marker", "cuda parameter"):
            summary["cuda_ran"] += 1
    reasons = sorted(summary["skip_reasons"].items(), key=lambda kv: -kv[1])[:10]
    summary["skip_reasons"] = dict(reasons)
    return summary


_MEMCHECK_SUMMARY = re.compile(r"ERROR SUMMARY:\s*(\d+)\s+errors?")
_RACECHECK_SUMMARY = re.compile(r"RACECHECK SUMMARY:\s*(\d+)\s+hazards? displayed\s*\((\d+)\s+errors?,\s*(\d+)\s+warnings?\)")
_SANITIZER_UNSUPPORTED = re.compile(r"Device not supported|not supported on this platform|Target application "
                                    r"returned an error|error 999", re.IGNORECASE)


def parse_sanitizer(tool: str, text: str) -> Dict[str, object]:
    """Error (and, for racecheck, warning) counts from compute-sanitizer's summary lines."""
    result: Dict[str, object] = {"tool": tool, "errors": None, "warnings": None}
    if tool == "racecheck":
        found = _RACECHECK_SUMMARY.findall(text)
        if found:
            result.update(hazards=sum(int(h) for h, _, _ in found), errors=sum(int(e) for _, e, _ in found),
                          warnings=sum(int(w) for _, _, w in found))
    if result["errors"] is None:
        found = _MEMCHECK_SUMMARY.findall(text)
        if found:
            result["errors"] = sum(int(n) for n in found)
    if _SANITIZER_UNSUPPORTED.search(text):
        result["note"] = _SANITIZER_UNSUPPORTED.search(text).group(0)
    return result


SANITIZER_SAMPLES = {  # compute-sanitizer's own summary lines, for the dry run's self-test
    "memcheck": ("========= COMPUTE-SANITIZER\n========= Invalid __global__ write of size 4 bytes\n"
                 "========= ERROR SUMMARY: 2 errors\n", 2, None),
    "racecheck": ("========= COMPUTE-SANITIZER\n========= RACECHECK SUMMARY: 3 hazards displayed (1 error, "
                  "2 warnings)\n", 1, 2),
}


def sanitizer_parser_self_test() -> Dict[str, object]:
    problems = []
    for tool, (text, errors, warnings) in SANITIZER_SAMPLES.items():
        got = parse_sanitizer(tool, text)
        if got["errors"] != errors or (warnings is not None and got["warnings"] != warnings):
            problems.append(f"{tool}: parsed {got}, expected errors={errors} warnings={warnings}")
    if parse_sanitizer("memcheck", "no summary here")["errors"] is not None:
        problems.append("memcheck: found a count in text without a summary line")
    return {"status": "ok" if not problems else "failed", "problems": problems}


def load_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------
# The schema of gpu_check.json (checked before the run ends, in the dry run too).

NUMBER = (int, float)
OPTIONAL_STR = (str, type(None))
STEP_STATUSES = ("ok", "failed", "timed_out", "skipped")
SCHEMA = {
    "schema_version": int,
    "mode": str,
    "ok": bool,
    "total_seconds": NUMBER,
    "budget_seconds": NUMBER,
    "out_dir": str,
    "environment": {"date": str, "mode": str, "commit": OPTIONAL_STR, "tree_sha256": str, "torch": OPTIONAL_STR,
                    "cuda": OPTIONAL_STR, "device_name": OPTIONAL_STR, "capability": OPTIONAL_STR,
                    "python": OPTIONAL_STR, "cpu_count": (int, type(None))},
    "steps": {name: {"status": str, "seconds": NUMBER} for name in STEPS},
    "build": {"seconds": (int, float, type(None)), "cuda_kernels": (bool, type(None))},
    "tests": {"total": int, "passed": int, "failed": int, "errors": int, "skipped": int, "cuda_ran": int,
              "failures": list},
    "sanitizer": {"memcheck": {"errors": (int, type(None))}, "racecheck": {"errors": (int, type(None))},
                  "parser_self_test": {"status": str}},
    "accuracy": dict,
    "benchmarks": {"bench_cmalign": dict, "bench_memory": dict, "bench_retrieval": dict},
    "files": list,
}


def schema_problems(payload, schema=SCHEMA, path="") -> List[str]:
    """Every key of ``schema`` missing from ``payload`` or of the wrong type, as 'path: problem'."""
    problems = []
    for key, expected in schema.items():
        where = f"{path}.{key}" if path else key
        if not isinstance(payload, dict) or key not in payload:
            problems.append(f"{where}: missing")
            continue
        value = payload[key]
        if isinstance(expected, dict):
            if not isinstance(value, dict):
                problems.append(f"{where}: expected an object, got {type(value).__name__}")
            else:
                problems += schema_problems(value, expected, where)
        elif isinstance(value, bool) and expected in (int, NUMBER):
            problems.append(f"{where}: expected a number, got a bool")
        elif not isinstance(value, expected):
            problems.append(f"{where}: expected {expected}, got {type(value).__name__}")
    if path.startswith("steps.") and isinstance(payload, dict) and payload.get("status") not in STEP_STATUSES:
        problems.append(f"{path}.status: expected one of {STEP_STATUSES}, got {payload.get('status')!r}")
    return problems


def output_problems(out_dir: str) -> List[str]:
    """What would not come back from a lent machine: more than 8 files, a file over 16 MiB, a subfolder."""
    problems = []
    names = sorted(os.listdir(out_dir))
    if len(names) > MAX_FILES:
        problems.append(f"{out_dir}: {len(names)} files, at most {MAX_FILES} come back")
    for name in names:
        path = os.path.join(out_dir, name)
        if not os.path.isfile(path):
            problems.append(f"{path}: not a plain file")
        elif os.path.getsize(path) > MAX_FILE_BYTES:
            problems.append(f"{path}: {os.path.getsize(path)} bytes, over {MAX_FILE_BYTES}")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
            problems.append(f"{path}: name has characters other than letters, digits, '.', '_', '-'")
    return problems


# ---------------------------------------------------------------------------
# Benchmark headlines for gpu_check.json (the full numbers stay in bench_*.json).


def cmalign_headline(data: Optional[dict]) -> Dict[str, object]:
    if not data:
        return {"status": "no JSON"}
    rows = data.get("results", [])
    times = {(r.get("label"), r.get("dtype"), r["impl"], r["mode"]): (r.get("median_s"), r.get("peak_bytes"))
             for r in rows}
    out = {}
    for (label, dtype, impl, mode), (median, peak) in times.items():
        if impl != "reid_kernels":
            continue
        cell = {"ms": None if median is None else round(median * 1e3, 3), "peak_MiB": None if peak is None
                else round(peak / 2**20, 1)}
        for base in ("eager", "compile"):
            base_median, base_peak = times.get((label, dtype, base, mode), (None, None))
            if base_median and median:
                cell[f"speedup_vs_{base}"] = round(base_median / median, 3)
            if base_peak and peak is not None:
                cell[f"peak_ratio_vs_{base}"] = round(peak / base_peak, 3)
        out[f"{label} {dtype} {mode}"] = cell
    for acc in data.get("accuracy", []):
        key = f"{acc['label']} {acc['dtype']} accuracy {acc['impl']}"
        out[key] = {k: v for k, v in acc.items() if k.startswith("max_rel") or k == "error"}
    return out


def safely(fn, *args) -> Dict[str, object]:
    """fn(*args), or the error it raised: a malformed benchmark JSON must not lose the whole run's."""
    try:
        return fn(*args)
    except Exception as error:  # recorded in gpu_check.json
        return {"status": f"headline failed: {type(error).__name__}: {error}"}


def rows_headline(data: Optional[dict], keys: List[str]) -> Dict[str, object]:
    if not data:
        return {"status": "no JSON"}
    out = {}
    for i, row in enumerate(data.get("results", [])):
        label = " ".join(str(row.get(k)) for k in ("case", "mode", "method", "rows", "batch") if k in row)
        out[f"{i:02d} {label}"] = {k: row.get(k) for k in keys if k in row}
    return out


# ---------------------------------------------------------------------------
# The run.


def python_command(python: str, script: str, *args: str) -> List[str]:
    return [python, os.path.join(ROOT, script), *args]


def build_step(args, budget: Budget, log_dir: str) -> (Dict[str, object], Dict[str, object]):
    cmd = [args.python, "setup.py", "build_ext", "--inplace"]
    env = {"TORCH_CUDA_ARCH_LIST": args.arch, "MAX_JOBS": str(os.cpu_count() or 1), "FORCE_CUDA": "1",
           # The interpreter's bin folder first: its ninja makes the build parallel (torch builds
           # one file at a time without it).
           "PATH": os.pathsep.join([os.path.dirname(os.path.abspath(args.python)), os.environ.get("PATH", "")])}
    check = [args.python, "-c", "import reid_kernels, json; print(json.dumps({'extension': "
             "reid_kernels.extension_available(), 'cuda_kernels': reid_kernels.has_cuda_kernels()}))"]
    info: Dict[str, object] = {"seconds": None, "cuda_kernels": None, "arch": args.arch}
    if "build" in args.skip:
        record = skipped("--skip build: the library already in reid_kernels/ is checked", command=shlex.join(cmd))
    elif args.dry_run:
        shown = " ".join(f"{k}={v}" for k, v in env.items() if k != "PATH")
        record = skipped("dry run: no CUDA build on a CPU machine", command=f"{shown} {shlex.join(cmd)}")
    else:
        timeout = budget.timeout_for(args.budgets["build"])
        if timeout < MIN_STEP_S:
            return skipped("global budget spent"), info
        job = Job("build", cmd, timeout, log_dir, env)
        record = job.wait()
        info["seconds"] = record["seconds"]
    probe = Job("build_check", check, 120, log_dir)
    probe_record = probe.wait()
    try:
        loaded = json.loads(probe.output().strip().splitlines()[-1])
        info["extension"], info["cuda_kernels"] = loaded["extension"], loaded["cuda_kernels"]
    except (ValueError, IndexError, KeyError):
        info["load_error"] = probe.output(2000)
    if not args.dry_run and record["status"] == "ok" and not info["cuda_kernels"]:
        record.update(status="failed", reason="the built library has no CUDA kernels")
    so_files = glob.glob(os.path.join(ROOT, "reid_kernels", "_C*.so"))
    cuobjdump = find_tool("cuobjdump")
    if not args.dry_run and so_files and cuobjdump:
        try:
            listing = subprocess.run([cuobjdump, "--list-elf", so_files[0]], capture_output=True, text=True,
                                     timeout=60)
            info["sass_arches"] = sorted(set(re.findall(r"sm_\d+a?", listing.stdout)))
        except (OSError, subprocess.SubprocessError) as error:
            info["sass_arches"] = f"cuobjdump failed: {type(error).__name__}: {error}"
    info["check_status"] = probe_record["status"]
    return record, info


def start_parallel_jobs(args, budget: Budget, log_dir: str, tmp: str) -> Dict[str, object]:
    """tests, driver, memcheck and racecheck side by side (correctness only, nothing timed)."""
    device = "cpu" if args.dry_run else "cuda"
    pythonpath = os.pathsep.join([SCRIPTS, ROOT] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    junit = os.path.join(tmp, "junit.xml")
    # xunit1: the family whose XML keeps each testcase's properties (the selection reason).
    test_cmd = [args.python, "-m", "pytest", "-q", "-p", "gpu_check_select", "-p", "no:cacheprovider",
                f"--junitxml={junit}", "-o", "junit_family=xunit1", "tests"]
    if args.test_workers > 1:
        test_cmd[4:4] = ["-n", str(args.test_workers)]
    jobs: Dict[str, object] = {}

    def start(name, cmd, env=None):
        timeout = budget.timeout_for(args.budgets[name])
        if name in args.skip:
            jobs[name] = skipped(f"--skip {name}", command=shlex.join(cmd))
        elif timeout < MIN_STEP_S:
            jobs[name] = skipped("global budget spent", command=shlex.join(cmd))
        else:
            jobs[name] = Job(name, cmd, timeout, log_dir, env)

    start("tests", test_cmd, {"PYTHONPATH": pythonpath})
    start("compile_warmup", bench_commands(args, tmp, warmup=True)["bench_cmalign"])
    start("driver", python_command(args.python, "scripts/gpu_check_driver.py", "--device", device,
                                   "--json", os.path.join(tmp, "driver.json")))
    sanitizer = find_tool("compute-sanitizer")
    for tool in ("memcheck", "racecheck"):
        driver = python_command(args.python, "scripts/gpu_check_driver.py", "--device", device, "--no-reference",
                                "--json", os.path.join(tmp, f"driver_{tool}.json"))
        tool_cmd = [sanitizer or "compute-sanitizer", "--tool", tool, "--print-limit", "50", "--error-exitcode", "3"]
        if tool == "memcheck":
            tool_cmd += ["--leak-check", "no"]
        if tool in args.skip:
            jobs[tool] = skipped(f"--skip {tool}")
        elif args.dry_run:
            # No sanitizer on a CPU machine: the same driver, plainly (it is what the tool would wrap).
            jobs[tool] = Job(tool, driver, budget.timeout_for(args.budgets[tool]), log_dir)
            jobs[tool].dry_note = f"dry run: would run {shlex.join(tool_cmd + driver)}"
        elif sanitizer is None:
            jobs[tool] = skipped("compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda*/bin)")
        else:
            # Without the caching allocator every tensor is its own cudaMalloc, so memcheck sees an
            # access past a tensor's end instead of it landing in a neighbouring cached block.
            start(tool, tool_cmd + driver, {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})
    jobs["_junit"] = junit
    return jobs


def finish_parallel_jobs(jobs: Dict[str, object], tmp: str, dry_run: bool) -> (Dict[str, Dict], Dict, Dict,
                                                                               Optional[dict]):
    records, sanitizer = {}, {}
    for name in PARALLEL_STEPS:
        job = jobs[name]
        if isinstance(job, dict):
            records[name] = job
            if name in ("memcheck", "racecheck"):
                sanitizer[name] = {"tool": name, "errors": None, "status": job["status"], "reason": job["reason"]}
            continue
        records[name] = job.wait()
        if name in ("memcheck", "racecheck"):
            if hasattr(job, "dry_note"):
                records[name]["reason"] = job.dry_note
                sanitizer[name] = {"tool": name, "errors": None, "status": "skipped", "reason": job.dry_note,
                                   "driver_status": records[name]["status"]}
            else:
                parsed = parse_sanitizer(name, job.output(4 * 2**20))
                driver = load_json(os.path.join(tmp, f"driver_{name}.json"))
                parsed.update(status=records[name]["status"], driver_finished=driver is not None,
                              driver_calls=driver and driver["calls"], driver_failed=driver and driver["failed"])
                # Clean only if the driver made every call under the tool and the tool found nothing.
                parsed["clean"] = bool(parsed["errors"] == 0 and driver is not None and driver["failed"] == 0)
                if parsed["errors"] is None and records[name]["status"] != "timed_out":
                    records[name].update(status="failed", reason="no sanitizer summary line in the output")
                elif parsed["errors"]:
                    records[name].update(status="failed", reason=f"{parsed['errors']} {name} errors")
                sanitizer[name] = parsed
    tests = summarise_junit(jobs["_junit"])
    if records["tests"]["status"] == "ok" and tests["total"] == 0:
        records["tests"].update(status="failed", reason="no test ran")
    elif records["tests"]["status"] == "ok" and not dry_run and tests["cuda_ran"] == 0:
        # Every CUDA parametrisation skipped or absent: the build or the GPU is missing, nothing is proven.
        records["tests"].update(status="failed", reason="no test ran on CUDA")
    driver = load_json(os.path.join(tmp, "driver.json"))
    return records, tests, sanitizer, driver


def bench_commands(args, out_dir: str, warmup: bool = False) -> Dict[str, List[str]]:
    """The three benchmark commands; ``warmup``: bench_cmalign's torch.compile rows alone, once each,
    writing into ``out_dir`` (a temporary folder) -- the compile_warmup step."""
    device = "cpu" if args.dry_run else "cuda"
    tiny = ["--smoke"] if args.dry_run else []
    # Dry run: two dtypes are enough to take the per-dtype and compile-dtype paths; the "eager"
    # backend traces with dynamo without inductor's C++ build.
    dtypes = "float32,bfloat16" if args.dry_run else "float32,float16,bfloat16"
    cmalign = ["--device", device, "--dtypes", dtypes, "--compile-dtypes", "float32", "--cases", "lba,72x36",
               "--check"] + tiny + (["--compile-backend", "eager"] if args.dry_run else [])
    if warmup:
        cmalign = ["--device", device, "--dtypes", "float32", "--impls", "compile", "--cases", "lba,72x36",
                   "--repeat", "1", "--warmup", "1"] + tiny + (["--compile-backend", "eager"] if args.dry_run else [])
    return {
        "bench_cmalign": python_command(args.python, "benchmarks/bench_cmalign.py", *cmalign, "--json",
                                        os.path.join(out_dir, "bench_cmalign.json")),
        "bench_memory": python_command(args.python, "benchmarks/bench_memory.py", "--device", device, *tiny, "--json",
                                       os.path.join(out_dir, "bench_memory.json")),
        "bench_retrieval": python_command(args.python, "benchmarks/bench_retrieval.py", "--device", device, *tiny,
                                          "--json", os.path.join(out_dir, "bench_retrieval.json")),
    }


def write_log(out_dir: str, log_dir: str, records: Dict[str, Dict]) -> None:
    with open(os.path.join(out_dir, "log.txt"), "w") as log:
        for name in sorted(os.listdir(log_dir)):
            step = name[: -len(".log")]
            record = records.get(step, {})
            log.write(f"===== {step}: {record.get('status', '')} {record.get('seconds', '')} s\n"
                      f"$ {record.get('command', '')}\n")
            log.write(read_tail(os.path.join(log_dir, name), LOG_TAIL_BYTES))
            log.write("\n")


def print_summary(payload: Dict[str, object]) -> None:
    print("\n== gpu_check summary")
    for name, record in payload["steps"].items():
        reason = f"  ({record['reason']})" if record.get("reason") else ""
        print(f"  {name:16s} {record['status']:10s} {record['seconds']:7.1f} s{reason[:160]}")
    t = payload["tests"]
    print(f"  tests: {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped "
          f"({t['cuda_ran']} ran on CUDA)")
    for failure in t["failures"][:10]:
        print(f"    FAIL {failure[:200]}")
    for tool in ("memcheck", "racecheck"):
        s = payload["sanitizer"][tool]
        print(f"  {tool}: errors={s.get('errors')} {s.get('status', '')}")
    print(f"  build: {payload['build'].get('seconds')} s, CUDA kernels: {payload['build'].get('cuda_kernels')}")
    print(f"  wrote {len(payload['files'])} files to {payload['out_dir']}; schema "
          f"{'ok' if not payload['schema_problems'] else payload['schema_problems']}")
    print(f"== gpu_check {'passed' if payload['ok'] else 'FAILED'} in {payload['total_seconds']:.1f} s "
          f"(budget {payload['budget_seconds']} s)")


def run(args) -> int:
    budget = Budget(args.budget)
    out_dir = os.path.abspath(args.out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="gpu_check_")
    log_dir = os.path.join(tmp, "logs")
    os.makedirs(log_dir)
    print(f"== gpu_check ({'dry run' if args.dry_run else 'GPU'}): output in {out_dir}, budget {args.budget} s",
          flush=True)
    env = environment(args.python, args.commit, args.dry_run)
    print(f"   {env.get('device_name') or 'no GPU'} (capability {env.get('capability')}), torch {env.get('torch')}, "
          f"CUDA {env.get('cuda')}, commit {env.get('commit')}", flush=True)
    if not args.dry_run and not env.get("cuda_available"):
        print("gpu_check: torch sees no CUDA device; use --dry-run on a CPU machine", file=sys.stderr)

    print("== build", flush=True)
    records: Dict[str, Dict] = {}
    records["build"], build_info = build_step(args, budget, log_dir)
    print(f"   {records['build']['status']} in {records['build']['seconds']} s", flush=True)
    if records["build"]["status"] not in ("ok", "skipped"):
        print(indent_tail(read_tail(os.path.join(log_dir, "build.log"), 6000), 30), flush=True)

    print("== tests, driver, memcheck, racecheck (in parallel)", flush=True)
    jobs = start_parallel_jobs(args, budget, log_dir, tmp)
    parallel, tests, sanitizer, driver = finish_parallel_jobs(jobs, tmp, args.dry_run)
    records.update(parallel)
    for name in PARALLEL_STEPS:
        print(f"   {name}: {records[name]['status']} in {records[name]['seconds']} s", flush=True)
        if records[name]["status"] not in ("ok", "skipped"):
            print(indent_tail(read_tail(os.path.join(log_dir, f"{name}.log"), 4000), 15), flush=True)
    sanitizer["parser_self_test"] = sanitizer_parser_self_test()

    benchmarks = {}
    for name, cmd in bench_commands(args, out_dir).items():
        print(f"== {name}", flush=True)
        timeout = budget.timeout_for(args.budgets[name])
        job = Job(name, cmd, timeout, log_dir) if timeout >= MIN_STEP_S and name not in args.skip else None
        records[name] = job.wait() if job else skipped(
            f"--skip {name}" if name in args.skip else "global budget spent", command=shlex.join(cmd))
        print(f"   {records[name]['status']} in {records[name]['seconds']} s", flush=True)
        if job and records[name]["status"] != "ok":
            print(indent_tail(job.output(4000), 15), flush=True)
    benchmarks["bench_cmalign"] = safely(cmalign_headline, load_json(os.path.join(out_dir, "bench_cmalign.json")))
    benchmarks["bench_memory"] = safely(rows_headline, load_json(os.path.join(out_dir, "bench_memory.json")),
                                               ["baseline_ms", "kernel_ms", "speedup", "max_abs_diff",
                                                "rel_err_vs_float64", "kernel_peak_bytes", "baseline_peak_bytes"])
    benchmarks["bench_retrieval"] = safely(rows_headline, load_json(os.path.join(out_dir, "bench_retrieval.json")),
                                                  ["seconds", "qps", "recall@10", "speedup", "max_abs_diff",
                                                   "ours_s", "reference_s", "identical_numbers", "peak_bytes"])

    if driver is not None:
        with open(os.path.join(out_dir, "driver.json"), "w") as f:
            json.dump(driver, f, indent=1)
            f.write("\n")
    write_log(out_dir, log_dir, records)
    shutil.rmtree(tmp, ignore_errors=True)

    gpu_check_path = os.path.join(out_dir, "gpu_check.json")
    payload = {
        "schema_version": SCHEMA_VERSION, "mode": env["mode"], "ok": False, "total_seconds": 0.0,
        "budget_seconds": args.budget, "out_dir": out_dir, "environment": env,
        "steps": {name: records.get(name, skipped("not reached")) for name in STEPS},
        "build": build_info, "tests": tests, "sanitizer": sanitizer,
        "accuracy": (driver or {}).get("max_rel_error", {}), "driver_failed_calls": (driver or {}).get("failed"),
        "benchmarks": benchmarks, "files": [],
    }
    expected = sorted(set(os.listdir(out_dir)) | {"gpu_check.json"})
    payload["files"] = expected
    payload["schema_problems"] = schema_problems(payload) + output_problems(out_dir)
    if "gpu_check.json" not in os.listdir(out_dir) and len(expected) > MAX_FILES:
        payload["schema_problems"].append(f"{out_dir}: {len(expected)} files with gpu_check.json, at most {MAX_FILES}")
    # A step skipped on request (or the build in a dry run) does not fail the run; one skipped for
    # want of time does.
    steps_ok = all(r["status"] == "ok" or name in ADVISORY_STEPS
                   or (r["status"] == "skipped" and r.get("reason", "").startswith(("--skip", "dry run")))
                   for name, r in payload["steps"].items())
    payload["ok"] = steps_ok and not payload["schema_problems"] and sanitizer["parser_self_test"]["status"] == "ok"
    payload["total_seconds"] = round(budget.elapsed(), 1)
    with open(gpu_check_path, "w") as f:
        json.dump(payload, f, indent=1, default=str)
        f.write("\n")
    # Read back what was written: the file on disk is what gets committed.
    reread = load_json(gpu_check_path)
    if reread is None or schema_problems(reread):
        print(f"gpu_check: {gpu_check_path} does not read back against the schema", file=sys.stderr)
        payload["ok"] = False
    print_summary(payload)
    return 0 if payload["ok"] else 1


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--dry-run", action="store_true", help="everything but the GPU parts, on a CPU machine")
    parser.add_argument("--out-dir", default=None,
                        help="where the JSON goes (default benchmarks/results/gpu/<date>/; dry run: build/gpu-check-dry/)")
    parser.add_argument("--commit", default=None, help="the commit being checked (a lent machine has no .git)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter with torch (default: this one)")
    parser.add_argument("--arch", default="9.0", help="TORCH_CUDA_ARCH_LIST of the build (default 9.0: H100/H200)")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run (default 450)")
    parser.add_argument("--step-budget", action="append", default=[], metavar="STEP=SECONDS",
                        help=f"override one step's budget; steps: {', '.join(STEPS)}")
    parser.add_argument("--test-workers", type=int, default=None,
                        help="pytest-xdist workers for the tests (default 4 on a GPU when xdist is installed, else 1)")
    parser.add_argument("--skip", default="", metavar="STEP,...",
                        help="steps not to run (e.g. build on a warm machine that built already); steps: "
                             + ", ".join(STEPS))
    parser.add_argument("--tree-hash", action="store_true", help="print the source hash recorded in the JSON and exit")
    args = parser.parse_args(argv)
    args.budgets = dict(DRY_BUDGETS if args.dry_run else GPU_BUDGETS)
    args.skip = [name.strip() for name in args.skip.split(",") if name.strip()]
    unknown = [name for name in args.skip if name not in STEPS]
    if unknown:
        parser.error(f"--skip: unknown steps {unknown}; steps: {', '.join(STEPS)}")
    for item in args.step_budget:
        name, _, seconds = item.partition("=")
        if name not in STEPS:
            parser.error(f"--step-budget: unknown step {name!r}; steps: {', '.join(STEPS)}")
        try:
            args.budgets[name] = float(seconds)
        except ValueError:
            parser.error(f"--step-budget: expected STEP=SECONDS, got {item!r}")
    if args.budget <= RESERVE_S + MIN_STEP_S:
        parser.error(f"--budget: expected more than {RESERVE_S + MIN_STEP_S} seconds, got {args.budget}")
    if args.out_dir is None:
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
        args.out_dir = os.path.join(ROOT, "build", "gpu-check-dry") if args.dry_run else os.path.join(
            ROOT, "benchmarks", "results", "gpu", date)
    if args.test_workers is None:
        has_xdist = subprocess.run([args.python, "-c", "import xdist"], capture_output=True).returncode == 0
        args.test_workers = 4 if (has_xdist and not args.dry_run) else 1
    if args.test_workers < 1:
        parser.error(f"--test-workers: expected at least 1, got {args.test_workers}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tree_hash:
        print(tree_sha256())
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
