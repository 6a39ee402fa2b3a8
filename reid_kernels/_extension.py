"""Loading of the compiled extension ``reid_kernels._C``, with errors that say what to do.

The pure-Python parts of reid_kernels (reference, metrics, retrieval, ...)
work without the extension; the compiled operators raise a clear error when
it is missing or was built against another torch.
"""
from __future__ import annotations

import warnings

import torch

REBUILD_HINT = (
    "Rebuild it against the torch you have: `pip install --no-build-isolation --force-reinstall --no-deps .` "
    "in the reid_kernels checkout (add FORCE_CUDA=1 for the CUDA kernels)."
)

_load_error = None
try:
    from . import _C  # noqa: F401  (importing it registers torch.ops.reid_kernels.*)
except ImportError as error:  # missing build, or an ABI mismatch with the installed torch
    text = str(error)
    if "undefined symbol" in text or "symbol not found" in text.lower():
        _load_error = (
            f"reid_kernels._C was built against a different torch than the installed {torch.__version__} "
            f"({text}). {REBUILD_HINT}"
        )
    else:
        _load_error = f"reid_kernels._C could not be imported ({text}). {REBUILD_HINT}"
    warnings.warn(_load_error + " The compiled operators are unavailable; reid_kernels.reference still works.")


def extension_available() -> bool:
    """True when the compiled operators are registered."""
    return _load_error is None


def require_extension() -> None:
    if _load_error is not None:
        raise RuntimeError(_load_error)


def has_cuda_kernels() -> bool:
    """True when this build compiled the CUDA kernels."""
    return _load_error is None and bool(torch.ops.reid_kernels._has_cuda_kernels())


def require_backend_for(tensor: torch.Tensor, name: str) -> None:
    """Fail early, and clearly, where no kernel exists for ``tensor``'s device."""
    require_extension()
    if tensor.device.type == "cuda" and not has_cuda_kernels():
        raise RuntimeError(
            f"{name} is a CUDA tensor, but this reid_kernels build has no CUDA kernels (it was built without "
            f"CUDA). CPU tensors use the CPU kernels; for CUDA tensors rebuild with a CUDA toolkit: "
            f"`FORCE_CUDA=1 pip install --no-build-isolation --force-reinstall --no-deps .`"
        )
    if tensor.device.type not in ("cpu", "cuda", "meta"):
        raise RuntimeError(f"{name}: expected a CPU or CUDA tensor, got one on {tensor.device}")
