"""Masked dense triplet loss (LbA eqs. 10-11) as one fused CPU/CUDA operator."""
from __future__ import annotations

import torch

from . import _ops  # noqa: F401  (autograd and fake registrations)
from ._extension import require_backend_for
from ._validate import check_finite_float, check_same_device, check_same_dtype, check_tensor

REDUCTIONS = ("mean", "sum", "none")
WEIGHTINGS = ("paper", "lba-code")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# The CPU kernel takes float32 / float64; float16 / bfloat16 CPU maps are computed in float32
# and the loss returned in their dtype (as soft_warp and person_mask do).
_CPU_KERNEL_DTYPES = (torch.float32, torch.float64)


def check_weighting_and_eps(weighting, eps) -> float:
    """The dense triplet's ``weighting`` ('paper' or 'lba-code') and ``eps`` (finite, >= 0)."""
    if not isinstance(weighting, str):
        raise TypeError(f"weighting: expected 'paper' or 'lba-code', got {type(weighting).__name__}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting: expected 'paper' or 'lba-code', got {weighting!r}")
    eps = check_finite_float("eps", eps)
    if eps < 0:
        raise ValueError(f"eps: expected a finite value >= 0, got {eps}")
    return eps


def dense_triplet_from_distances(
    d_pos: torch.Tensor, d_neg: torch.Tensor, weight: torch.Tensor, margin: float, weighting: str = "paper"
) -> torch.Tensor:
    """LbA eqs. 10-11 from the distances: ``mean(w * [d_pos - d_neg + margin]_+)`` over all positions.

    ``d_pos``, ``d_neg``: ``(N, L)`` distances ``||a - p + eps||``, ``||a - n + eps||`` (differentiable);
    ``weight``: ``(N, L)`` co-attention (detached here).  ``weighting`` as :func:`masked_dense_triplet`
    (``"paper"``: each anchor by its own weight; ``"lba-code"``: every anchor by the batch-mean weight,
    the released code's broadcast).  The same hinge as the operator's: ``torch.clamp``, whose backward
    passes the gradient at a hinge of exactly 0 and gives an inactive hinge exactly 0 even where the
    weight is NaN.  Used by :func:`reid_kernels.cmalign`'s fused CPU path, whose kernel returns the
    distances.
    """
    weight = weight.detach().to(d_pos.dtype)
    if weighting == "lba-code":
        weight = weight.mean(dim=0, keepdim=True)
    elif weighting != "paper":
        raise ValueError(f"weighting: expected 'paper' or 'lba-code', got {weighting!r}")
    return (weight * torch.clamp(d_pos - d_neg + margin, min=0)).mean()


def masked_dense_triplet(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    weight: torch.Tensor,
    margin: float = 0.3,
    reduction: str = "mean",
    weighting: str = "paper",
    eps: float = 0.0,
) -> torch.Tensor:
    """LbA eqs. 10-11: ``weight * [||a - p||_2 - ||a - n||_2 + margin]_+`` at every position.

    Args:
        anchor, positive, negative: ``(N, C, H, W)`` feature maps (or ``(N, C, L)``); distances
            are L2 over the channel axis at each position.  float32, float64, float16 or bfloat16
            (float32 accumulation for the half types; on the CPU they are computed in float32).
        weight: ``(N, H, W)`` (or ``(N, L)``) per-position weight, same dtype -- LbA's co-attention of
            each anchor with its positive partner (eq. 9, each anchor by its own map).  It is a
            constant: it receives NO gradient (LbA detaches the co-attention).
        margin: the hinge margin (LbA: 0.3).
        reduction: ``"mean"`` over all N*H*W positions (the released code), ``"sum"`` (the paper's
            eq. 10) or ``"none"`` for the ``(N, H, W)`` map.
        weighting: ``"paper"`` (default): anchor ``i`` is weighted by its own ``weight[i]``, eq. 10 of
            Learning by Aligning (ICCV 2021).  ``"lba-code"``: the released code as run on torch 1.7
            (the published numbers), where the ``(N, H, W)`` co-attention broadcast against the
            per-anchor losses to ``(N, N, H, W)``, so that ``loss = mean_p(mean_i A_i(p) * mean_j l_j(p))``.
            Implemented exactly by weighting every anchor with the batch mean ``mean_i weight[i]`` at
            each position (then ``reduction="mean"`` gives that loss; ``"sum"`` and ``"none"`` sum or
            return the map of those terms).
        eps: added to every channel of the differences inside the distances, ``||a - p + eps||_2``
            (``torch.nn.functional.pairwise_distance``'s convention; LbA's code, through
            ``TripletMarginLoss``, uses 1e-6).  Default 0: the paper's distance.  Implemented exactly
            by passing ``p - eps`` and ``n - eps`` to the kernel (one rounding of each in the input dtype).

    NaN handling follows the reference: NaN in the maps or the weight gives NaN loss terms there; an
    inactive hinge passes a zero gradient even where the weight is NaN (as ``torch.clamp``'s backward).
    First-order gradients only: double backward raises ``NotImplementedError``.

    One fused pass over the three maps forward (no difference tensors); the backward recomputes the
    two distances and writes the three gradients.  Where a distance is exactly 0 its term has
    gradient 0 (as ``torch.linalg.vector_norm``); at a hinge of exactly 0 the gradient passes (as
    ``torch.clamp``).  Equals :func:`reid_kernels.reference.masked_dense_triplet` to float rounding.
    """
    check_tensor("anchor", anchor, floating=True)
    if anchor.dim() < 3:
        raise ValueError(f"anchor: expected an (N, C, H, W) or (N, C, L) tensor, got shape {tuple(anchor.shape)}")
    for name, tensor in (("positive", positive), ("negative", negative)):
        check_tensor(name, tensor, ndim=anchor.dim(), floating=True)
        if tensor.shape != anchor.shape:
            raise ValueError(f"{name}: expected shape {tuple(anchor.shape)} (like anchor), got {tuple(tensor.shape)}")
    check_tensor("weight", weight, ndim=anchor.dim() - 1, floating=True)
    position_shape = (anchor.shape[0], *anchor.shape[2:])
    if tuple(weight.shape) != position_shape:
        raise ValueError(f"weight: expected shape {position_shape} (N and spatial dims of anchor), "
                         f"got {tuple(weight.shape)}")
    named = [("anchor", anchor), ("positive", positive), ("negative", negative), ("weight", weight)]
    check_same_device(named)
    check_same_dtype(named)
    if anchor.dtype not in DTYPES:
        names = ", ".join(str(d) for d in DTYPES)
        raise TypeError(f"anchor: expected dtype in ({names}), got {anchor.dtype}")
    margin = check_finite_float("margin", margin)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
    eps = check_weighting_and_eps(weighting, eps)
    require_backend_for(anchor, "anchor")
    if eps:
        positive, negative = positive - eps, negative - eps  # ||a - (p - eps)|| = ||a - p + eps||
    weight = weight.detach()
    if weighting == "lba-code":
        weight = weight.mean(dim=0, keepdim=True).expand_as(weight)

    n, c = anchor.shape[:2]
    kernel_dtype = anchor.dtype
    if anchor.device.type == "cpu" and anchor.dtype not in _CPU_KERNEL_DTYPES:
        kernel_dtype = torch.float32

    def as_ncl(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(n, c, -1).to(kernel_dtype).contiguous()

    loss_map = torch.ops.reid_kernels.masked_dense_triplet_fwd(
        as_ncl(anchor), as_ncl(positive), as_ncl(negative),
        weight.reshape(n, -1).to(kernel_dtype).contiguous(), margin,
    ).view(position_shape).to(anchor.dtype)
    if reduction == "mean":
        return loss_map.mean()
    if reduction == "sum":
        return loss_map.sum()
    return loss_map
