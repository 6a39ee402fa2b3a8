"""Argument checks shared by the public entry points.

Every message names the argument, what was expected and what came.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

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


def check_int(name: str, value, minimum: int) -> int:
    """A Python int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def check_positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a positive float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite value > 0, got {value}")
    return value


def check_finite_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite value, got {value}")
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
            raise IndexError(f"{name}: expected values in [0, {rows}) ({of}), got {int(value[first])} "
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
            raise IndexError(f"{name}: expected indices in [0, {length}), got {bad}")
    return index.to(device=like.device, dtype=torch.long)
