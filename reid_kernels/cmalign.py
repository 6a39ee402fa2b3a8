"""LbA's CMAlign (Learning by Aligning, ICCV 2021, eqs. 1-11) on the fused reid_kernels operators.

* :func:`person_mask` -- eqs. 5-7, one pass per sample, no gradient;
* :func:`soft_warp` -- eqs. 1, 2, 4: cosine similarity, softmax and warp in one
  operator; on CUDA it never stores the (H*W, H2*W2) probabilities (its backward
  recomputes them from the saved log-sum-exp), on CPU it keeps them for the
  backward when the whole volume takes at most 256 MiB (one matrix product fewer);
* :func:`cmalign` -- the whole module (eqs. 1-11) for a batch with positive and
  negative partners, equal to :func:`reid_kernels.reference.cmalign` to float
  rounding.

Each has a plain-PyTorch twin in :mod:`reid_kernels.reference`.  The
operators take contiguous ``(N, C, L)`` maps; these wrappers check the
arguments (every message names the argument, what was expected and what
came), flatten the maps and reshape the results.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from . import _ops  # noqa: F401  (autograd and fake registrations of the operators)
from ._ops import _soft_warp_probs_shape
from ._extension import require_backend_for
from ._validate import (
    check_finite_float,
    check_index,
    check_positive_float,
    check_same_device,
    check_same_dtype,
    check_tensor,
)
from .dense_triplet import check_weighting_and_eps, dense_triplet_from_distances, masked_dense_triplet
from .pairs import lba_pairs  # noqa: F401  (re-exported: partners for cmalign)
from .reference import MINMAX_EPS, CMAlignOutput, minmax_dtype

__all__ = ["CMAlignOutput", "cmalign", "lba_pairs", "person_mask", "soft_warp"]

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------
# Argument checks.


def _check_map(name: str, value) -> torch.Tensor:
    """A non-empty (N, C, H, W) floating-point feature map."""
    check_tensor(name, value, ndim=4, dtypes=FLOAT_DTYPES)
    return value


def _check_batch_and_channels(name: str, value: torch.Tensor, query: torch.Tensor, channels: bool) -> None:
    if value.shape[0] != query.shape[0]:
        raise ValueError(
            f"{name}: expected batch size {query.shape[0]} (like query), got {value.shape[0]} "
            f"(shape {tuple(value.shape)})"
        )
    if channels and value.shape[1] != query.shape[1]:
        raise ValueError(
            f"{name}: expected {query.shape[1]} channels (like query), got {value.shape[1]} "
            f"(shape {tuple(value.shape)})"
        )


def _check_partners(name: str, index, batch: int, feat: torch.Tensor) -> torch.Tensor:
    """Partner indices: int64/int32, shape (batch,), values in [0, batch)."""
    if not torch.compiler.is_compiling():
        if isinstance(index, torch.Tensor) and index.device.type == "meta" and feat.device.type != "meta":
            # A meta tensor has no values: they could be neither range-checked nor gathered with.
            raise ValueError(
                f"{name}: expected index values on the CPU or {feat.device} (like feat), got a tensor on the "
                f"meta device, which has no values"
            )
        return check_index(name, index, batch, feat)
    # Under torch.compile, checking the values would read the indices back to
    # Python (a graph break); the gather itself still bound-checks them.
    if not isinstance(index, torch.Tensor) or index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: expected an int64 (or int32) index tensor, got {type(index).__name__}")
    if index.dim() != 1 or index.shape[0] != batch:
        raise ValueError(f"{name}: expected shape ({batch},) (one partner per anchor), got {tuple(index.shape)}")
    return index.to(device=feat.device, dtype=torch.long)


def _check_temperature(temperature, dtype: torch.dtype) -> float:
    """A finite float > 0 that the logits' dtype (float64 for float64 maps, else float32) can hold,
    the bound the operators check too (csrc/cmalign/soft_warp_common.h)."""
    temperature = check_positive_float("temperature", temperature)
    logits = torch.float64 if dtype == torch.float64 else torch.float32
    bound = torch.finfo(logits).max
    if temperature > bound:
        raise ValueError(
            f"temperature: expected a finite value > 0 and at most {bound:.6g} (the largest {logits} value: "
            f"the logits are computed in that dtype), got {temperature:g}"
        )
    return temperature


def _positions(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> contiguous (N, C, H*W): a view for NCHW-contiguous maps, else one copy."""
    return x.reshape(x.shape[0], x.shape[1], -1).contiguous()


# ---------------------------------------------------------------------------
# Public operators.


def person_mask(feat: torch.Tensor) -> torch.Tensor:
    """LbA eqs. 5-7: parameter-free person mask of each feature map.

    Args:
        feat: ``(N, C, H, W)`` feature maps (float32/float64; float16/bfloat16 too).

    Returns:
        ``(N, H, W)`` in ``feat``'s dtype: the L2 norm over channels at each position,
        min-max normalised over the positions of each sample (in ``feat``'s dtype, float32 for
        float16/bfloat16, as the LbA code; denominator ``(max - min) + 1e-12``), so a map whose
        norms are all equal gives zeros.  A NaN anywhere in a sample makes that sample's whole
        mask NaN (as :func:`reid_kernels.reference.person_mask`: the min and max are NaN).
        Carries no gradient (LbA detaches the mask).
    """
    _check_map("feat", feat)
    require_backend_for(feat, "feat")
    n, _, h, w = feat.shape
    return torch.ops.reid_kernels.person_mask(_positions(feat.detach())).view(n, h, w)


def soft_warp(
    query: torch.Tensor,
    key: torch.Tensor,
    value: Optional[torch.Tensor] = None,
    temperature: float = 50.0,
) -> torch.Tensor:
    """LbA eqs. 1, 2, 4: warp ``value`` onto the query's grid by cosine matching.

    ``out[n, :, p] = sum_q softmax_q(temperature * cos(query[n, :, p], key[n, :, q])) * value[n, :, q]``

    Args:
        query: ``(N, C, H, W)`` maps whose positions are rebuilt.
        key: ``(N, C, H2, W2)`` maps they are matched against (any spatial size).
        value: ``(N, Cv, H2, W2)`` maps that are warped; defaults to ``key``.
        temperature: inverse temperature beta > 0 of the softmax (LbA: 50).

    Returns:
        ``(N, Cv, H, W)`` in the query's dtype, differentiable in query, key and value.
        Cosines use ``x / max(||x||, 1e-12)``, so an all-zero vector matches everything
        with cosine 0.  Any temperature up to the largest float of the accumulation dtype
        (float32: 3.4e38; float64 maps: float64) gives finite results (near-hard matching
        at 1e20); larger ones are refused by name.  First-order gradients only: double
        backward raises ``NotImplementedError`` (use :func:`reid_kernels.reference.soft_warp`).  Memory is O(N * C * positions) on CUDA (the probabilities are never
        stored); on CPU the (N, H*W, H2*W2) probabilities are kept for the backward when they
        take at most 256 MiB (float32; float64 for float64 maps), else recomputed.
    """
    _check_map("query", query)
    _check_map("key", key)
    value_is_key = value is None or value is key
    value = key if value is None else _check_map("value", value)
    named = [("query", query), ("key", key), ("value", value)]
    check_same_device(named)
    check_same_dtype(named)
    _check_batch_and_channels("key", key, query, channels=True)
    _check_batch_and_channels("value", value, query, channels=False)
    if value.shape[2:] != key.shape[2:]:
        raise ValueError(
            f"value: expected spatial size {tuple(key.shape[2:])} (like key), got {tuple(value.shape[2:])}"
        )
    temperature = _check_temperature(temperature, query.dtype)
    require_backend_for(query, "query")

    n, _, h, w = query.shape
    key_positions = _positions(key)
    value_positions = key_positions if value_is_key else _positions(value)
    out, _, _ = torch.ops.reid_kernels.soft_warp_fwd(_positions(query), key_positions, value_positions, temperature)
    return out.view(n, value.shape[1], h, w)


def _minmax_per_sample(x: torch.Tensor) -> torch.Tensor:
    """Min-max over dim 1 of (N, L) in x's dtype (float32 for float16/bfloat16), as
    reference.minmax_normalize, with reference.MINMAX_EPS; detached."""
    flat = x.detach().to(minmax_dtype(x.dtype))
    lo, hi = torch.aminmax(flat, dim=1, keepdim=True)
    return ((flat - lo) / (hi - lo + MINMAX_EPS)).to(x.dtype)


class _RefuseDoubleBackward(torch.autograd.Function):
    """Identity on a first-order gradient (forward(grad, *upstream) -> grad) whose backward raises:
    it links the gradient to the upstream gradients it came from, so that differentiating it
    (double backward) fails with a message instead of silently giving 0."""

    @staticmethod
    def forward(ctx, grad, *upstream):
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(
            "cmalign: double backward (differentiating a gradient taken with create_graph=True) is not supported "
            "by the fused kernels; use reid_kernels.reference.cmalign for higher-order gradients"
        )


def _refusing_double_backward(grad_x: torch.Tensor, x: torch.Tensor, *upstream) -> torch.Tensor:
    """grad_x behind a _RefuseDoubleBackward node linked to x and to the upstream gradients that
    require grad: grad_x depends on both (the warps are not linear in x), so differentiating it
    must raise, not give 0 -- also when no upstream gradient requires grad (a loss on the
    reconstructions alone, or on the dense triplet, whose hinge gradient is piecewise constant)."""
    linked = [t for t in (x, *upstream) if t is not None and t.requires_grad]
    return _RefuseDoubleBackward.apply(grad_x, *linked) if linked else grad_x


class _PartnerReconstructions(torch.autograd.Function):
    """Eqs. 1-4 and the warped partner mask of eq. 9 for both partners, with a fused backward.

    forward(x (N, C, L), mask (N, L), pos_idx, neg_idx, temperature) ->
    (recon_pos, recon_neg, warped_mask): reconstructions (eq. 3, ``m * W(f) + (1 - m) * f``)
    from the positive and negative partners and the positive partner's mask warped onto the
    anchor's grid (no gradient).

    Why a Function: autograd of the plain composition (two gathers, a mask-channel
    concatenation, two lerps) spends more time in zero-filled gradient buffers, slice/concat
    backward passes and gradient accumulation than in the warps' matrix products.  The
    backward here makes one pass per term: the blend's gradients, two soft_warp_bwd calls,
    and the partners' gradients scattered with index_add_.  When soft_warp_fwd caches the
    probabilities (CPU, see csrc/ops.cpp) the warped mask is ``P @ mask`` and the value is
    the key itself; otherwise the mask rides along as one extra value channel.
    """

    @staticmethod
    def forward(ctx, x, mask, pos_idx, neg_idx, temperature):
        c = x.shape[1]
        weight = mask.unsqueeze(1)
        key_pos, key_neg = x[pos_idx], x[neg_idx]
        mask_pos = mask[pos_idx]
        mask_from_probs = _soft_warp_probs_shape(x, key_pos) != (0,)
        value_pos = key_pos if mask_from_probs else torch.cat([key_pos, mask_pos.unsqueeze(1)], dim=1)
        out_pos, _, probs_pos = torch.ops.reid_kernels.soft_warp_fwd(x, key_pos, value_pos, temperature)
        out_neg, _, probs_neg = torch.ops.reid_kernels.soft_warp_fwd(x, key_neg, key_neg, temperature)
        if mask_from_probs:  # eq. 4 applied to the partner's mask, from the cached probabilities
            warped_mask = torch.bmm(probs_pos, mask_pos.to(probs_pos.dtype).unsqueeze(2)).squeeze(2).to(x.dtype)
            # The CPU backward with cached probabilities never reads `out` (it may be empty), so
            # the blends overwrite the warps in place: fresh (N, C, L) buffers cost page faults
            # that take several times longer than the arithmetic on them.
            recon_pos = out_pos.sub_(x).mul_(weight).add_(x)  # eq. 3: f + m * (W(f) - f)
            recon_neg = out_neg.sub_(x).mul_(weight).add_(x)
            out_pos = out_neg = x.new_empty(0)
        else:
            warped_mask = out_pos[:, c]
            recon_pos = torch.lerp(x, out_pos[:, :c], weight)  # eq. 3: m * W(f) + (1 - m) * f
            recon_neg = torch.lerp(x, out_neg, weight)
        ctx.save_for_backward(x, weight, pos_idx, neg_idx, key_pos, value_pos, out_pos, probs_pos,
                              key_neg, out_neg, probs_neg)
        ctx.temperature = temperature
        ctx.mask_channel = not mask_from_probs
        ctx.mark_non_differentiable(warped_mask)
        return recon_pos, recon_neg, warped_mask

    @staticmethod
    def backward(ctx, grad_pos, grad_neg, grad_mask):
        if not torch.is_grad_enabled():
            return _PartnerReconstructions.first_order_backward(ctx, grad_pos, grad_neg)
        # create_graph=True: the gradient itself is exact, but it has no derivative (the fused
        # kernels have none), so it is returned behind a node that refuses to be differentiated.
        with torch.no_grad():
            grads = _PartnerReconstructions.first_order_backward(ctx, grad_pos, grad_neg)
        return (_refusing_double_backward(grads[0], ctx.saved_tensors[0], grad_pos, grad_neg), *grads[1:])

    @staticmethod
    def first_order_backward(ctx, grad_pos, grad_neg):
        (x, weight, pos_idx, neg_idx, key_pos, value_pos, out_pos, probs_pos,
         key_neg, out_neg, probs_neg) = ctx.saved_tensors
        t = ctx.temperature
        grad_pos = torch.zeros_like(x) if grad_pos is None else grad_pos
        grad_neg = torch.zeros_like(x) if grad_neg is None else grad_neg
        # eq. 3 backward: d recon / d W(f) = m, d recon / d x = 1 - m (direct path).  Few fresh
        # (N, C, L) buffers (their page faults dominate on CPU): sums go in place into the
        # operators' outputs and the warp gradient buffer is reused for the second partner.
        grad_warped = torch.mul(grad_pos, weight).contiguous()
        if ctx.mask_channel:  # the warped mask carries no gradient
            grad_warped_pos = torch.cat([grad_warped, grad_warped.new_zeros(grad_warped[:, :1].shape)], 1)
        else:
            grad_warped_pos = grad_warped
        grad_x, gk_pos, gv = torch.ops.reid_kernels.soft_warp_bwd(
            grad_warped_pos, x, key_pos, value_pos, out_pos, probs_pos, t
        )
        gk_pos += gv[:, : x.shape[1]]  # the value is the key (plus the mask channel)
        del gv, grad_warped_pos
        grad_warped = torch.mul(grad_neg, weight, out=grad_warped)
        gq, gk_neg, gv = torch.ops.reid_kernels.soft_warp_bwd(
            grad_warped, x, key_neg, key_neg, out_neg, probs_neg, t
        )
        gk_neg += gv
        direct = 1 - weight
        grad_x.addcmul_(grad_pos, direct).addcmul_(grad_neg, direct).add_(gq)
        grad_x.index_add_(0, pos_idx, gk_pos)  # the partners are gathered rows of x
        grad_x.index_add_(0, neg_idx, gk_neg)
        return grad_x, None, None, None, None


CPU_PATH_ENV = "REID_KERNELS_CMALIGN_CPU_PATH"
CPU_PATHS = ("fused", "per-partner")


@torch.compiler.assume_constant_result
def _cpu_path() -> str:
    """Which CPU implementation :func:`cmalign` uses when the probabilities fit the cache:
    ``fused`` (default: :class:`_FusedPartnerReconstructions`) or ``per-partner`` (two
    soft_warp calls, :class:`_PartnerReconstructions`), from ``REID_KERNELS_CMALIGN_CPU_PATH``
    (read at every call, so tests and benchmarks can reach both)."""
    path = os.environ.get(CPU_PATH_ENV, "") or "fused"
    if path not in CPU_PATHS:
        raise ValueError(f"{CPU_PATH_ENV}: expected one of {', '.join(CPU_PATHS)}, got {path!r}")
    return path


# The fused backward keeps G for every (anchor, partner), a second (2, N, L, L) volume beside the
# cached probabilities, where the per-partner backward needs one (L, L) matrix per sample at a time:
# beyond this size (LbA's maps: 13 MiB; 72x36 maps of 4 samples: 215 MiB) the fused path would raise
# the memory peak, and it is not faster there (measured 0.89x of torch.compile at N=4, 72x36).
FUSED_MAX_VOLUME_BYTES = 64 << 20


def _use_fused_pairs(x: torch.Tensor) -> bool:
    """The fused CPU kernel runs where soft_warp_fwd would cache the probabilities (the same cap per
    partner, csrc/cmalign/soft_warp_common.h), both partners' (N, L, L) volumes together take at most
    FUSED_MAX_VOLUME_BYTES, and the maps hold numbers."""
    n, _, l = x.shape
    elem = 8 if x.dtype == torch.float64 else 4
    return (x.device.type == "cpu" and x.numel() > 0 and _soft_warp_probs_shape(x, x) != (0,)
            and 2 * n * l * l * elem <= FUSED_MAX_VOLUME_BYTES and _cpu_path() == "fused")


class _FusedPartnerReconstructions(torch.autograd.Function):
    """What :class:`_PartnerReconstructions` computes, plus the dense triplet's distances, on the CPU
    in two fused operators (reid_kernels::cmalign_pairs_fwd / _bwd, csrc/cmalign/soft_warp_cpu.cpp):
    the partners are read through the indices instead of gathered, each sample's norms are computed
    once, the blend of eq. 3 runs inside the warp, the distances ``||x - recon + eps||`` of eq. 10
    are taken while an anchor's maps are in cache, and the backward accumulates every partner
    gradient and the distances' gradients in the kernel (no index_add_, no per-partner (N, C, L)
    buffers, none of the three (N, C, L) gradients a separate dense-triplet backward would write
    and autograd would then add).

    forward(x, mask, pos_idx, neg_idx, temperature, eps) -> (recon_pos, recon_neg, warped_mask,
    dist): ``dist`` is ``(2, N, L)``, the distances to the positive [0] and negative [1]
    reconstructions, in float32 (float64 for float64 maps)."""

    @staticmethod
    def forward(ctx, x, mask, pos_idx, neg_idx, temperature, eps):
        recon_pos, recon_neg, warped_mask, probs, dist = torch.ops.reid_kernels.cmalign_pairs_fwd(
            x, mask, pos_idx, neg_idx, temperature, eps
        )
        ctx.save_for_backward(x, mask, pos_idx, neg_idx, probs, recon_pos, recon_neg, dist)
        ctx.temperature, ctx.eps = temperature, eps
        ctx.mark_non_differentiable(warped_mask)
        return recon_pos, recon_neg, warped_mask, dist

    @staticmethod
    def backward(ctx, grad_pos, grad_neg, grad_mask, grad_dist):
        if not torch.is_grad_enabled():
            return _FusedPartnerReconstructions.first_order_backward(ctx, grad_pos, grad_neg, grad_dist)
        with torch.no_grad():  # as _PartnerReconstructions.backward
            grads = _FusedPartnerReconstructions.first_order_backward(ctx, grad_pos, grad_neg, grad_dist)
        grad_x = _refusing_double_backward(grads[0], ctx.saved_tensors[0], grad_pos, grad_neg, grad_dist)
        return (grad_x, *grads[1:])

    @staticmethod
    def first_order_backward(ctx, grad_pos, grad_neg, grad_dist):
        x, mask, pos_idx, neg_idx, probs, recon_pos, recon_neg, dist = ctx.saved_tensors
        # None stays None: the kernel reads it as zeros (no (N, C, L) buffer of them)
        grad_pos = None if grad_pos is None else grad_pos.contiguous()
        grad_neg = None if grad_neg is None else grad_neg.contiguous()
        grad_dist = None if grad_dist is None else grad_dist.to(dist.dtype).contiguous()
        grad_x = torch.ops.reid_kernels.cmalign_pairs_bwd(
            grad_pos, grad_neg, grad_dist, x, mask, pos_idx, neg_idx, probs, recon_pos, recon_neg, dist,
            ctx.temperature, ctx.eps
        )
        return grad_x, None, None, None, None, None


def cmalign(
    feat: torch.Tensor,
    pos_idx: torch.Tensor,
    neg_idx: torch.Tensor,
    temperature: float = 50.0,
    margin: float = 0.3,
    weighting: str = "paper",
    eps: float = 0.0,
) -> CMAlignOutput:
    """LbA's CMAlign on a batch of feature maps (eqs. 1-11), fused.

    Anchor ``i`` is rebuilt from its positive partner ``feat[pos_idx[i]]`` and its
    negative partner ``feat[neg_idx[i]]`` (draw them with :func:`reid_kernels.lba_pairs`
    for an LbA batch ``[visible; infrared]``).

    Args:
        feat: ``(N, C, H, W)`` feature maps.
        pos_idx, neg_idx: ``(N,)`` int64 (or int32) partner indices in ``[0, N)``.
        temperature: inverse softmax temperature beta > 0 (LbA: 50).
        margin: dense-triplet margin (LbA: 0.3).
        weighting: how the co-attention weights the dense triplet, see
            :func:`reid_kernels.masked_dense_triplet`: ``"paper"`` (default; Learning by Aligning
            (ICCV 2021) eq. 10, each anchor by its own co-attention) or ``"lba-code"`` (the released
            code as run on torch 1.7, which produced the published numbers: the batch-mean
            co-attention times the batch-mean hinge at each position).
        eps: added to every difference inside the distances, ``||a - p + eps||`` (LbA's code, through
            ``TripletMarginLoss``, uses 1e-6; default 0, the paper's distance).

    Returns:
        :class:`CMAlignOutput` ``(recon_pos, recon_neg, comask, loss)``, exactly the
        semantics of :func:`reid_kernels.reference.cmalign`: reconstructions (eq. 3)
        ``(N, C, H, W)``, co-attention with the positive partner (eq. 9, min-max
        normalised, detached) ``(N, H, W)`` and the mean masked dense triplet loss
        (eqs. 10-11).  Gradients reach ``feat`` through the similarities, softmax,
        warps and distances, including through the partners; the masks carry none.

    Cost: on the CPU, where the (N, L, L) probabilities of a partner fit the soft_warp cache,
    two fused operators (cmalign_pairs_fwd / _bwd): partners read through the indices, each
    sample's norms once, the blend inside the warp's matrix product, the dense triplet's
    distances taken in the same kernel (the hinge, weighting and mean of eqs. 10-11 then run on
    the (N, H*W) distances), the partner and distance gradients accumulated per sample
    (``REID_KERNELS_CMALIGN_CPU_PATH=per-partner`` selects the path below instead).  Elsewhere
    one :func:`soft_warp` pass per partner, with a fused backward for the gathers and blends.
    The co-attention needs no second similarity: on CPU it is the cached probabilities times
    the partner's mask, elsewhere the mask rides along as one extra value channel of the
    positive pass.  The hard-coded choice the fused path makes: the distances are accumulated
    in double from the maps (as the masked dense triplet kernel), with ``eps`` added to each
    difference, the reference's ``||a - p + eps||`` (Learning by Aligning's released code, through
    ``TripletMarginLoss``).
    """
    _check_map("feat", feat)
    batch = feat.shape[0]
    pos_idx = _check_partners("pos_idx", pos_idx, batch, feat)
    neg_idx = _check_partners("neg_idx", neg_idx, batch, feat)
    temperature = _check_temperature(temperature, feat.dtype)
    margin = check_finite_float("margin", margin)
    eps = check_weighting_and_eps(weighting, eps)
    require_backend_for(feat, "feat")

    n, c, h, w = feat.shape
    x = _positions(feat)
    mask = torch.ops.reid_kernels.person_mask(x.detach())  # eqs. 5-7, (N, L)

    maps = (n, c, h, w)
    # eqs. 1-4 for both partners, plus the positive partner's warped mask
    if _use_fused_pairs(x):  # the CPU kernels also return the distances of eq. 10
        recon_pos, recon_neg, warped_mask, dist = _FusedPartnerReconstructions.apply(
            x, mask, pos_idx.contiguous(), neg_idx.contiguous(), temperature, eps
        )
        comask = _minmax_per_sample(mask * warped_mask)  # eq. 9, detached
        loss = dense_triplet_from_distances(dist[0], dist[1], comask, margin, weighting)  # eqs. 10-11
        loss = loss.to(feat.dtype)
    else:
        recon_pos, recon_neg, warped_mask = _PartnerReconstructions.apply(x, mask, pos_idx, neg_idx, temperature)
        comask = _minmax_per_sample(mask * warped_mask)  # eq. 9, detached
        loss = masked_dense_triplet(x.view(maps), recon_pos.view(maps), recon_neg.view(maps), comask.view(n, h, w),
                                    margin, weighting=weighting, eps=eps)  # eqs. 10-11
    return CMAlignOutput(recon_pos.view(maps), recon_neg.view(maps), comask.view(n, h, w), loss)
