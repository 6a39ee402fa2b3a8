"""Momentum updates of class-memory banks: MCE eq. 3 (Cross-Modality Person Re-identification with
Memory-Based Contrastive Embedding, AAAI 2023), PECA eq. 9 (Partial Enhancement and Channel Aggregation
for Visible-Infrared Person Re-Identification, IEICE 2024) and cluster contrast's updates.

One fused, deterministic operator replaces the per-sample Python loop of the
released code (dozens of tiny kernels per step) and the ``index_copy`` tricks
that silently drop all but one sample when a label repeats in the batch.
"""
from __future__ import annotations

import torch

from . import _ops  # noqa: F401  (fake-kernel registration of memory_update_)
from ._extension import require_backend_for
from ._validate import check_bool, check_float_in, check_index_range, check_index_vector, check_same_device
from ._validate import check_tensor

MODES = ("sequential", "mean", "hard")
CONVENTIONS = ("old", "new")
_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def memory_update_(
    memory: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    momentum: float,
    *,
    mode: str = "sequential",
    normalize: bool = True,
    convention: str = "old",
) -> torch.Tensor:
    """Update the rows ``memory[labels]`` in place with momentum; returns ``memory``.

    Args:
        memory: ``(rows, dim)`` contiguous bank, one row per class.  float32 (or float64) on the
            CPU; float32, float16, bfloat16 (or float64) on CUDA.  Math is float32 (float64 for a
            float64 bank); each touched row is rounded to the bank's dtype once per call.
        features: ``(batch, dim)`` floating-point features (no gradient flows into the bank).
        labels: ``(batch,)`` int64 (or int32) class indices in ``[0, rows)``; may repeat.
        momentum: in ``[0, 1]``.  With ``convention="old"`` (default, MCE's gamma) it
            weights the OLD row: ``m <- momentum * m + (1 - momentum) * f``.  With
            ``convention="new"`` (PECA's alpha) it weights the NEW sample:
            ``m <- (1 - momentum) * m + momentum * f``; i.e. ``convention="new", momentum=a`` is
            ``convention="old", momentum=1-a``.
        mode:
            * ``"sequential"`` -- for each sample in batch order,
              ``m[y_i] <- g * m[y_i] + (1 - g) * f_i`` then (if ``normalize``) ``m[y_i] /= ||m[y_i]||``;
              with K samples of one label (no normalisation) the row becomes
              ``g^K m + sum_t (1-g) g^(K-t) f_t`` -- the per-sample loop of cluster-contrast code
              and PECA eq. 9 applied in batch order.
            * ``"mean"`` -- per distinct label, ``m[y] <- g * m[y] + (1 - g) * mean_{i: y_i=y} f_i``
              (MCE eq. 3), then re-normalised.
            * ``"hard"`` -- per distinct label, the batch sample with the lowest dot product with
              the current row (the first one on ties) replaces the mean (MCE's released code
              for the modality-agnostic bank).
        normalize: re-normalise every updated row to unit L2 norm (``x / max(||x||, 1e-12)``).
        convention: ``"old"`` or ``"new"``, see ``momentum``.

    The update bumps ``memory``'s version counter like any in-place op, so a backward through a
    graph that saved the old bank (logits computed before the update) fails loudly instead of
    silently using the new rows: update after ``backward()`` (or see ``MemoryBank``'s
    ``update_in_backward``).

    The result equals :func:`reid_kernels.reference.memory_update_` to float rounding and is
    bit-identical from run to run on CPU and CUDA (labels are grouped with a stable sort; each
    row is owned by one task/block that walks its samples in batch order; no atomics).  The
    label range is checked before the launch (one device sync on CUDA).
    """
    memory, features, labels, old_weight = _check_update_args(memory, features, labels, momentum, mode, normalize,
                                                               convention)
    require_backend_for(memory, "memory")
    with torch.no_grad():
        torch.ops.reid_kernels.memory_update_(memory, features.detach(), labels, old_weight, mode, bool(normalize))
    # A custom op does not bump the version counter itself; bumping it lets autograd refuse a
    # backward through a graph that saved the pre-update bank (e.g. logits computed before).
    torch.autograd.graph.increment_version(memory)
    return memory


def _check_update_args(memory, features, labels, momentum, mode, normalize, convention):
    check_tensor("memory", memory, ndim=2, floating=True)
    if not memory.is_contiguous():
        raise ValueError(f"memory: expected a contiguous tensor (it is updated in place), got strides {memory.stride()}")
    if memory.requires_grad:
        # Written in place under no_grad, a bank that requires grad would silently change under
        # autograd's feet (for a leaf, torch itself refuses in-place writes outside no_grad).
        raise ValueError("memory: expected a tensor that does not require grad (a bank is a buffer updated in "
                         "place), got requires_grad=True; pass memory.detach() or a buffer")
    allowed = _CUDA_DTYPES if memory.device.type == "cuda" else _CPU_DTYPES
    if memory.dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise TypeError(f"memory: expected dtype in ({names}) on {memory.device.type}, got {memory.dtype}")
    check_tensor("features", features, ndim=2, floating=True, allow_empty=True)
    if features.shape[1] != memory.shape[1]:
        raise ValueError(f"features: expected shape (batch, {memory.shape[1]}) (dim of memory), "
                         f"got {tuple(features.shape)}")
    labels = _check_labels(labels, features.shape[0], memory.shape[0])
    check_same_device([("memory", memory), ("features", features), ("labels", labels)])
    momentum = check_float_in("momentum", momentum, 0.0, 1.0)
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if convention not in CONVENTIONS:
        raise ValueError(f"convention: expected 'old' (weight on the old row) or 'new' (weight on the new "
                         f"sample), got {convention!r}")
    normalize = check_bool("normalize", normalize)
    old_weight = momentum if convention == "old" else 1.0 - momentum
    return memory, features, labels, old_weight


def _check_labels(labels, batch: int, rows: int) -> torch.Tensor:
    labels = check_index_vector("labels", labels, batch, "class indices")
    check_index_range("labels", labels, rows, "memory rows")
    return labels.to(torch.int64)
