"""Running CUDA device code on the CPU emulator (tests/cuda_emu/cuda_emu.h) from pytest.

Usage in a test module::

    import emu_util
    pytestmark = emu_util.pytestmark              # the `emu` marker; skips without g++
    def test_x(emu_flavour):                      # "plain" and "tsan" (marker `tsan`)
        out = emu_util.run("memory_update_harness", emu_flavour, {"case": emu_util.text("mean"), ...})

* A harness is ``tests/cuda_emu/<name>.cpp``: its ``main`` reads named arrays (``tensor_io.h``),
  calls the ATen-free host launch function of a kernel header with raw pointers, writes named
  arrays back.  Put many cases in one input (``case0/...``, ``case1/...``): one process, one
  compilation per flavour.
* ``build(name, flavour)`` compiles it with g++ (``-std=c++20 -pthread -DREID_CUDA_EMULATION
  -I csrc -I tests/cuda_emu``; ``plain``: ``-O2``; ``tsan``: ``-fsanitize=thread -O1 -g``; plus
  ``$REID_EMU_EXTRA_FLAGS``, e.g. ``-DREID_MUTATION=205`` for scripts/mutate.py) into
  ``build/cuda_emu/<flavour>-<hash>/``; the hash covers the flags, the compiler and every source
  under csrc/ and tests/cuda_emu/, so a rebuild happens exactly when something changed.
* ``run(...)`` runs it with a timeout (a hang fails with a clear message) and returns the output
  arrays as torch tensors.  A non-zero exit, a ``reid_emu error:`` or a ThreadSanitizer report
  fails the test with the harness's stderr; ``run_expect_error`` is for cases that must fail.
* Without g++ (or, for ``tsan``, without libtsan) the tests skip with the reason; with
  ``REID_EMU_REQUIRED=1`` (set by .ci/run) they fail instead.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
EMU_DIR = ROOT / "tests" / "cuda_emu"
BUILD_DIR = ROOT / "build" / "cuda_emu"
CXX = os.environ.get("REID_EMU_CXX", "g++")
FLAVOURS = {
    "plain": ["-O2"],
    "tsan": ["-fsanitize=thread", "-O1", "-g"],
}
COMMON_FLAGS = ["-std=c++20", "-pthread", "-Wall", "-Wno-unknown-pragmas", "-DREID_CUDA_EMULATION", f"-I{ROOT / 'csrc'}", f"-I{EMU_DIR}"]
# halt_on_error + exitcode: the first race ends the run with status 66, which fails the test.
TSAN_OPTIONS = "halt_on_error=1 exitcode=66 second_deadlock_stack=1 report_signal_unsafe=0"
RUN_TIMEOUT_S = float(os.environ.get("REID_EMU_RUN_TIMEOUT_S", "240"))

pytestmark = [pytest.mark.emu]
emu_flavours = ["plain", pytest.param("tsan", marks=pytest.mark.tsan)]

# ---- the tensor_io format ------------------------------------------------------------

_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3, torch.int64: 4,
          torch.int32: 5, torch.uint8: 6}
_DTYPES = {code: dtype for dtype, code in _CODES.items()}


def text(s: str) -> torch.Tensor:
    """A string as a uint8 array (case names)."""
    return torch.tensor(list(s.encode()), dtype=torch.uint8)


def scalar(value, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(value, dtype=dtype)


def _as_tensor(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().contiguous()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, bool):
        return torch.tensor(int(value), dtype=torch.int64)
    if isinstance(value, int):
        return torch.tensor(value, dtype=torch.int64)
    if isinstance(value, float):
        return torch.tensor(value, dtype=torch.float64)
    raise TypeError(f"emu_util: cannot store {type(value).__name__}")


def write_arrays(path, arrays: dict) -> None:
    with open(path, "wb") as f:
        f.write(b"REIDEMU1" + struct.pack("<I", len(arrays)))
        for name, value in arrays.items():
            t = _as_tensor(value)
            if t.dtype not in _CODES:
                raise TypeError(f"emu_util: array {name!r} has unsupported dtype {t.dtype}")
            data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            encoded = name.encode()
            f.write(struct.pack("<I", len(encoded)) + encoded + struct.pack("<BI", _CODES[t.dtype], t.dim()))
            f.write(struct.pack(f"<{t.dim()}q", *t.shape) + struct.pack("<Q", len(data)) + data)


def read_arrays(path) -> dict:
    raw = Path(path).read_bytes()
    if raw[:8] != b"REIDEMU1":
        raise ValueError(f"emu_util: {path} is not a tensor_io file")
    (count,), pos = struct.unpack_from("<I", raw, 8), 12
    arrays = {}
    for _ in range(count):
        (name_len,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        name = raw[pos:pos + name_len].decode()
        pos += name_len
        code, ndim = struct.unpack_from("<BI", raw, pos)
        pos += 5
        shape = struct.unpack_from(f"<{ndim}q", raw, pos)
        pos += 8 * ndim
        (nbytes,) = struct.unpack_from("<Q", raw, pos)
        pos += 8
        data = bytearray(raw[pos:pos + nbytes])
        pos += nbytes
        dtype = _DTYPES[code]
        t = torch.frombuffer(data, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
        arrays[name] = t.view(dtype).reshape(shape).clone()
    return arrays


# ---- building ------------------------------------------------------------------------


def _compiler_version() -> str:
    return subprocess.run([CXX, "--version"], capture_output=True, text=True, check=True).stdout


def _extra_flags() -> list[str]:
    return os.environ.get("REID_EMU_EXTRA_FLAGS", "").split()


def _sources_digest() -> str:
    h = hashlib.sha256()
    for directory in (ROOT / "csrc", EMU_DIR):
        for path in sorted(directory.rglob("*")):
            if path.suffix in (".h", ".cuh", ".cpp", ".hpp") and path.is_file():
                h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


_tsan_checked = {}


def _unavailable(reason: str) -> None:
    """Skip with the reason -- or fail, under REID_EMU_REQUIRED=1 (CI), where a missing
    toolchain must not turn the emulated CUDA tests into silent skips."""
    if os.environ.get("REID_EMU_REQUIRED") == "1":
        pytest.fail(f"REID_EMU_REQUIRED=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def skip_unless_available(flavour: str) -> None:
    """pytest.skip with the reason when g++ (or libtsan, for tsan) is missing."""
    if shutil.which(CXX) is None:
        _unavailable(f"emulated CUDA tests need a C++20 compiler ({CXX} not found)")
    if flavour == "tsan":
        if "ok" not in _tsan_checked:
            with tempfile.TemporaryDirectory() as tmp:
                src = Path(tmp) / "t.cpp"
                src.write_text("int main() { return 0; }\n")
                done = subprocess.run([CXX, "-fsanitize=thread", str(src), "-o", str(Path(tmp) / "t")],
                                      capture_output=True, text=True)
            _tsan_checked["ok"] = done.returncode == 0
            _tsan_checked["why"] = done.stderr.strip().splitlines()[-1:] if done.returncode else []
        if not _tsan_checked["ok"]:
            _unavailable(f"ThreadSanitizer unavailable (libtsan missing?): {_tsan_checked['why']}")


def build(name: str, flavour: str) -> Path:
    """Compiles tests/cuda_emu/<name>.cpp for `flavour` (cached); returns the executable."""
    skip_unless_available(flavour)
    flags = COMMON_FLAGS + FLAVOURS[flavour] + _extra_flags()
    key = hashlib.sha256("\0".join([name, *flags, _compiler_version(), _sources_digest()]).encode()).hexdigest()
    out_dir = BUILD_DIR / f"{flavour}-{key[:16]}"
    exe = out_dir / name
    if exe.exists():
        return exe
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{name}.{os.getpid()}"
    command = [CXX, *flags, str(EMU_DIR / f"{name}.cpp"), "-o", str(tmp)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"emu_util: building {name} ({flavour}) failed:\n{' '.join(command)}\n{done.stderr[-6000:]}")
    os.replace(tmp, exe)  # atomic: a concurrent build of the same key is harmless
    return exe


# ---- running -------------------------------------------------------------------------


def _run(name, flavour, inputs, env, timeout):
    exe = build(name, flavour)
    with tempfile.TemporaryDirectory() as tmp:
        in_path, out_path = Path(tmp) / "in.bin", Path(tmp) / "out.bin"
        write_arrays(in_path, inputs)
        run_env = dict(os.environ, TSAN_OPTIONS=TSAN_OPTIONS, **(env or {}))
        try:
            done = subprocess.run([str(exe), str(in_path), str(out_path)], capture_output=True, text=True,
                                  env=run_env, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"emu_util: {name} ({flavour}) did not finish in {timeout:.0f} s (a hang?):\n"
                        f"{(e.stderr or b'')[-4000:]}")
        outputs = read_arrays(out_path) if done.returncode == 0 and out_path.exists() else None
    return done, outputs


def run(name: str, flavour: str, inputs: dict, env: dict | None = None, timeout: float = RUN_TIMEOUT_S) -> dict:
    """Runs harness `name` on `inputs`; returns its output arrays.  Fails the test on any error."""
    done, outputs = _run(name, flavour, inputs, env, timeout)
    race = "WARNING: ThreadSanitizer" in done.stderr
    if done.returncode != 0 or race or "reid_emu error" in done.stderr or outputs is None:
        if race or done.returncode == 66:  # the first report, where its stacks are
            pytest.fail(f"emu_util: {name} ({flavour}): ThreadSanitizer reported a race:\n{done.stderr[:8000]}")
        pytest.fail(f"emu_util: {name} ({flavour}): exit {done.returncode}:\n{done.stderr[-8000:]}")
    return outputs


def run_expect_error(name: str, flavour: str, inputs: dict, env: dict | None = None,
                     timeout: float = RUN_TIMEOUT_S) -> str:
    """Runs a case that must fail; returns its stderr (the caller checks the message)."""
    done, _ = _run(name, flavour, inputs, env, timeout)
    assert done.returncode != 0, f"{name} ({flavour}) was expected to fail, but exited 0:\n{done.stderr[-4000:]}"
    return done.stderr


@pytest.fixture(params=emu_flavours)
def emu_flavour(request):
    """Each emulated test runs as a plain build and as a ThreadSanitizer build."""
    skip_unless_available(request.param)
    return request.param
