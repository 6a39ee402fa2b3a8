"""Plain-PyTorch definitions of every reid_kernels operator.

Written for clarity, not speed: each function is the oracle the kernels are
tested against and the baseline the benchmarks measure.  Equation numbers
refer to the papers: Learning by Aligning (LbA, ICCV 2021), Cross-Modality Person
Re-identification with Memory-Based Contrastive Embedding (MCE, AAAI 2023), Semantic
Alignment and Affinity Inference (SAAI, ICCV 2023), Partial Enhancement and Channel
Aggregation (PECA, IEICE 2024).

Conventions shared with the kernels:

* cosine similarity normalises with ``x / max(||x||_2, 1e-12)`` (as
  ``torch.nn.functional.normalize``), so an all-zero feature vector has cosine
  0 with everything;
* min-max normalisation divides by ``(max - min) + 1e-12`` (the LbA code's guard),
  so a constant map normalises to all zeros, and is computed in the input dtype
  (float32 for float16 / bfloat16), as the LbA code computes in its maps' dtype;
* masks and co-attention maps carry no gradient (LbA code detaches them).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

MINMAX_EPS = 1e-12


class CMAlignOutput(NamedTuple):
    """What :func:`cmalign` returns.

    recon_pos, recon_neg: (N, C, H, W) anchors rebuilt from their positive /
    negative partners (eq. 3); comask: (N, H, W) co-attention of each anchor
    with its positive partner (eq. 9), detached; loss: scalar dense triplet
    loss (eqs. 10-11).
    """

    recon_pos: torch.Tensor
    recon_neg: torch.Tensor
    comask: torch.Tensor
    loss: torch.Tensor


def minmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype masks and min-max are computed in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def minmax_normalize(x: torch.Tensor) -> torch.Tensor:
    """Per-sample min-max normalisation over all but the first dim, in minmax_dtype(x.dtype)."""
    flat = x.detach().to(minmax_dtype(x.dtype)).flatten(1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    return ((flat - lo) / (hi - lo + MINMAX_EPS)).view(x.shape).to(x.dtype)


def person_mask(feat: torch.Tensor) -> torch.Tensor:
    """LbA eqs. 5-7: min-max normalised L2 norm over channels. (N, C, H, W) -> (N, H, W)."""
    norms = torch.linalg.vector_norm(feat.detach().to(minmax_dtype(feat.dtype)), dim=1)  # eq. 5
    return minmax_normalize(norms).to(feat.dtype)  # eqs. 6-7


def matching_probability(query: torch.Tensor, key: torch.Tensor, temperature: float) -> torch.Tensor:
    """LbA eqs. 1-2: softmax over key positions of temperature * cosine similarity.

    query (N, C, H, W), key (N, C, H2, W2) -> (N, H*W, H2*W2).
    """
    q = F.normalize(query.flatten(2), dim=1)
    k = F.normalize(key.flatten(2), dim=1)
    similarity = torch.einsum("ncp,ncq->npq", q, k)  # eq. 1
    return torch.softmax(temperature * similarity, dim=-1)  # eq. 2


def warp_with(prob: torch.Tensor, value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """LbA eq. 4: W(value)(p) = sum_q prob[p, q] value[:, q], shaped as ``like``'s map."""
    out = torch.einsum("npq,ncq->ncp", prob, value.flatten(2))
    return out.view(value.shape[0], value.shape[1], *like.shape[2:])


def soft_warp(
    query: torch.Tensor, key: torch.Tensor, value: Optional[torch.Tensor] = None, temperature: float = 50.0
) -> torch.Tensor:
    """LbA eqs. 1, 2, 4: warp ``value`` (default ``key``) onto the query's grid. -> (N, Cv, H, W)."""
    value = key if value is None else value
    return warp_with(matching_probability(query, key, temperature), value, query)


def reconstruct(feat: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """LbA eq. 3: warped features inside the person (mask ~ 1), the anchor's own outside."""
    m = mask.unsqueeze(1)
    return m * warped + (1 - m) * feat


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
    """LbA eqs. 10-11: weight * [||a - p + eps||_2 - ||a - n + eps||_2 + margin]_+ per position.

    Distances are over channels (dim 1) of (N, C, H, W) maps; weight is (N, H, W).
    ``torch.linalg.vector_norm`` has gradient 0 where a distance is 0.  ``weighting="paper"``
    weights anchor i by weight[i] (eq. 10); ``"lba-code"`` is the released code on torch 1.7, whose
    (N, H, W) co-attention broadcast against the per-anchor losses: with ``reduction="mean"`` this
    computes that (N, N, H, W) product literally, ``mean_p(mean_i A_i * mean_j l_j)``.
    """
    d_pos = torch.linalg.vector_norm(anchor - positive + eps, dim=1)
    d_neg = torch.linalg.vector_norm(anchor - negative + eps, dim=1)
    hinge = torch.clamp(d_pos - d_neg + margin, min=0)
    if weighting == "lba-code":
        if reduction == "mean":  # the broadcast of the released code, (N, 1, H, W) x (1, N, H, W)
            return (weight.unsqueeze(1) * hinge.unsqueeze(0)).mean()
        weight = weight.mean(dim=0, keepdim=True)
    elif weighting != "paper":
        raise ValueError(f"weighting: expected 'paper' or 'lba-code', got {weighting!r}")
    per_position = weight * hinge
    if reduction == "mean":
        return per_position.mean()
    if reduction == "sum":
        return per_position.sum()
    if reduction == "none":
        return per_position
    raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")


def cmalign(
    feat: torch.Tensor,
    pos_idx: torch.Tensor,
    neg_idx: torch.Tensor,
    temperature: float = 50.0,
    margin: float = 0.3,
    weighting: str = "paper",
    eps: float = 0.0,
) -> CMAlignOutput:
    """LbA's CMAlign on a batch of feature maps (eqs. 1-11).

    Anchor ``i`` is aligned with ``feat[pos_idx[i]]`` and ``feat[neg_idx[i]]``.
    """
    mask = person_mask(feat)  # eqs. 5-7, detached

    prob_pos = matching_probability(feat, feat[pos_idx], temperature)  # eqs. 1-2
    prob_neg = matching_probability(feat, feat[neg_idx], temperature)
    recon_pos = reconstruct(feat, warp_with(prob_pos, feat[pos_idx], feat), mask)  # eqs. 3-4
    recon_neg = reconstruct(feat, warp_with(prob_neg, feat[neg_idx], feat), mask)

    # eq. 9: co-attention = own mask x partner's mask warped by the positive probabilities.
    warped_partner_mask = warp_with(prob_pos.detach(), mask[pos_idx].unsqueeze(1), feat).squeeze(1)
    comask = minmax_normalize(mask * warped_partner_mask)

    loss = masked_dense_triplet(feat, recon_pos, recon_neg, comask, margin, weighting=weighting, eps=eps)
    return CMAlignOutput(recon_pos, recon_neg, comask, loss)


# ---- Memory banks ----
# MCE (AAAI 2023) eq. 3 (class-mean momentum update), its released code's "hard" update,
# and the per-sample loop of cluster-contrast-style code (PECA, IEICE 2024, eq. 9 applied in
# batch order).  ``momentum`` weights the OLD row throughout.

MEMORY_UPDATE_MODES = ("sequential", "mean", "hard")


def _memory_math_dtype(memory: torch.Tensor) -> torch.dtype:
    """The dtype the update is computed in: float64 for float64 banks, float32 otherwise."""
    return torch.float64 if memory.dtype == torch.float64 else torch.float32


def _blend(row: torch.Tensor, sample: torch.Tensor, momentum: float) -> torch.Tensor:
    """MCE (AAAI 2023) eq. 3: momentum * old row + (1 - momentum) * new sample."""
    return momentum * row + (1 - momentum) * sample


def _unit(row: torch.Tensor) -> torch.Tensor:
    """row / max(||row||_2, 1e-12), as torch.nn.functional.normalize."""
    return row / row.norm().clamp_min(1e-12)


def memory_update_(
    memory: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    momentum: float,
    mode: str = "sequential",
    normalize: bool = True,
) -> torch.Tensor:
    """In-place momentum update of the rows ``memory[labels]`` (the oracle of the kernel).

    * ``"sequential"``: for i in batch order, ``m[y_i] = momentum*m[y_i] + (1-momentum)*f_i``,
      re-normalised after every sample when ``normalize``;
    * ``"mean"``: per distinct label y, ``m[y] = momentum*m[y] + (1-momentum)*mean_{i: y_i=y} f_i``
      (MCE, AAAI 2023, eq. 3), then re-normalised;
    * ``"hard"``: per distinct label, the sample with the lowest dot product with the current
      row (the first one on ties) replaces the mean (MCE's released code).

    Computed in float32 (float64 for a float64 bank); each touched row is rounded back to the
    bank's dtype once, at the end.
    """
    if mode not in MEMORY_UPDATE_MODES:
        raise ValueError(f"mode: expected one of {MEMORY_UPDATE_MODES}, got {mode!r}")
    math_dtype = _memory_math_dtype(memory)
    feats = features.detach().to(math_dtype)
    ys = [int(y) for y in labels.tolist()]
    rows = {}  # label -> working copy of its row, in math_dtype

    def row_of(y: int) -> torch.Tensor:
        if y not in rows:
            rows[y] = memory[y].detach().to(math_dtype).clone()
        return rows[y]

    if mode == "sequential":
        for i, y in enumerate(ys):
            row = _blend(row_of(y), feats[i], momentum)
            rows[y] = _unit(row) if normalize else row
    else:
        for y in dict.fromkeys(ys):  # distinct labels
            group = feats[[i for i, label in enumerate(ys) if label == y]]  # batch order
            if mode == "mean":
                target = group.mean(dim=0)
            else:  # torch.argmin returns the first minimum
                target = group[int(torch.argmin(group @ row_of(y)))]
            row = _blend(row_of(y), target, momentum)
            rows[y] = _unit(row) if normalize else row
    with torch.no_grad():
        for y, row in rows.items():
            memory[y] = row.to(memory.dtype)
    return memory
