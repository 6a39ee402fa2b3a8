"""Argument checks shared by the public entry points.

Every message names the argument, what was expected and what came.  One exception type per kind
of mistake: ``TypeError`` for a wrong type (a float where an int is expected, a bool where a number
is expected, a tensor of the wrong dtype), ``ValueError`` for a wrong value (out of range, NaN,
wrong shape; :class:`IndexRangeError`, also an ``IndexError``, for indices out of range).  Scalars
may be Python or NumPy scalars alike.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import numpy as np
import torch


def check_tensor(
    name: str,
    value,
    *,
    ndim: Optional[int] = None,
    dtypes: Optional[Iterable[torch.dtype]] = None,
    floating: bool = False,
    allow_empty: bool = False,
) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(value.shape)}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {value.dtype}")
    if dtypes is not None:
        allowed = tuple(dtypes)
        if value.dtype not in allowed:
            names = ", ".join(str(d) for d in allowed)
            raise TypeError(f"{name}: expected dtype in ({names}), got {value.dtype}")
    if not allow_empty and value.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor, got shape {tuple(value.shape)}")
    return value


def check_same_device(named: Sequence[tuple]) -> None:
    """``named`` is a sequence of (name, tensor); all must share the first one's device."""
    first_name, first = named[0]
    for name, tensor in named[1:]:
        if tensor.device != first.device:
            raise ValueError(f"{name}: expected a tensor on {first.device} (like {first_name}), got {tensor.device}")


def check_same_dtype(named: Sequence[tuple]) -> None:
    first_name, first = named[0]
    for name, tensor in named[1:]:
        if tensor.dtype != first.dtype:
            raise TypeError(f"{name}: expected dtype {first.dtype} (like {first_name}), got {tensor.dtype}")


class IndexRangeError(IndexError, ValueError):
    """An index (label, partner) outside its valid range: a wrong *value*, so it is a ``ValueError``
    like every other wrong value of the library, and an ``IndexError`` as before."""


def is_integer_scalar(value) -> bool:
    """A Python or NumPy integer, not a bool (``True`` is an int to Python, never a count here)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real_scalar(value) -> bool:
    """A Python or NumPy integer or float, not a bool."""
    return is_integer_scalar(value) or isinstance(value, (float, np.floating))


def _type_name(value) -> str:
    return type(value).__name__


def check_int(name: str, value, minimum: int, maximum: Optional[int] = None) -> int:
    """A Python or NumPy int (not a bool) in ``[minimum, maximum]``; returned as a Python int.

    ``TypeError`` for any other type (float, bool, tensor, ...), ``ValueError`` for a value out of range.
    """
    if not is_integer_scalar(value):
        raise TypeError(f"{name}: expected an int, got {_type_name(value)}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}: expected an int <= {maximum}, got {value}")
    return value


def check_optional_int(name: str, value, minimum: int) -> Optional[int]:
    """``None`` or :func:`check_int`."""
    return None if value is None else check_int(name, value, minimum)


def check_real(name: str, value, what: str = "a number") -> float:
    """A Python or NumPy real scalar (not a bool), returned as a Python float; no value check."""
    if not is_real_scalar(value):
        raise TypeError(f"{name}: expected {what}, got {_type_name(value)}")
    return float(value)


def check_positive_float(name: str, value) -> float:
    """A finite real > 0 (Python or NumPy scalar), returned as a Python float."""
    value = check_real(name, value, "a positive float")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite value > 0, got {value}")
    return value


def check_finite_float(name: str, value) -> float:
    """A finite real (Python or NumPy scalar), returned as a Python float."""
    value = check_real(name, value, "a float")
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite value, got {value}")
    return value


def check_float_in(name: str, value, low: float, high: float) -> float:
    """A real in the closed interval ``[low, high]`` (Python or NumPy scalar), as a Python float."""
    interval = f"[{low:g}, {high:g}]"
    value = check_real(name, value, f"a float in {interval}")
    if math.isnan(value):
        raise ValueError(f"{name}: expected a finite value in {interval}, got {value}")
    if not low <= value <= high:
        raise ValueError(f"{name}: expected a value in {interval}, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    """A Python or NumPy bool (not 0/1: a flag passed an int is usually a misplaced argument)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {_type_name(value)}")
    return bool(value)


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
    return value


def check_generator(name: str, value) -> Optional[torch.Generator]:
    """``None`` or a CPU ``torch.Generator`` (a seed is not one: build ``torch.Generator().manual_seed(seed)``)."""
    if value is None:
        return None
    if not isinstance(value, torch.Generator):
        raise TypeError(f"{name}: expected a torch.Generator or None (for a seed s, pass "
                        f"torch.Generator().manual_seed(s)), got {_type_name(value)}")
    if value.device.type != "cpu":
        raise ValueError(f"{name}: expected a CPU generator (the draw runs on the CPU), got one on {value.device}")
    return value


def check_index_vector(name: str, value, length: int, what: str) -> torch.Tensor:
    """A 1-D int64 (or int32) tensor of ``length`` entries, one per feature row; returned as given."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of int64 {what}, got {type(value).__name__}")
    if value.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: expected an int64 (or int32) tensor, got dtype {value.dtype}")
    if value.dim() != 1 or value.shape[0] != length:
        raise ValueError(f"{name}: expected shape ({length},) (one entry per feature row), got {tuple(value.shape)}")
    return value


def check_index_range(name: str, value: torch.Tensor, rows: int, of: str) -> None:
    """Every entry in ``[0, rows)`` (rows of ``of``); IndexError naming the first one outside.
    One small kernel and one device sync; skipped for empty and meta tensors."""
    if value.numel() and value.device.type != "meta":
        lo, hi = torch.stack(torch.aminmax(value)).tolist()
        if lo < 0 or hi >= rows:
            first = int(((value < 0) | (value >= rows)).nonzero()[0, 0])
            raise IndexRangeError(f"{name}: expected values in [0, {rows}) ({of}), got {int(value[first])} "
                             f"at position {first}")


def check_index(name: str, index, length: int, like: torch.Tensor) -> torch.Tensor:
    """A 1-D integer index of ``length`` entries, each in [0, length) -- partners within the batch."""
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of int64 indices, got {type(index).__name__}")
    if index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: expected an int64 (or int32) index tensor, got dtype {index.dtype}")
    if index.dim() != 1 or index.numel() != length:
        raise ValueError(f"{name}: expected shape ({length},) (one partner per anchor), got {tuple(index.shape)}")
    if index.numel() and index.device.type != "meta":
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= length:
            bad = lo if lo < 0 else hi
            raise IndexRangeError(f"{name}: expected indices in [0, {length}), got {bad}")
    return index.to(device=like.device, dtype=torch.long)
