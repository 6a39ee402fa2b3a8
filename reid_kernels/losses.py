"""Metric-learning losses of visible-infrared ReID papers, in plain device-agnostic PyTorch.

=====================================  =====================================================================  ===
function                               paper                                                                  eq.
=====================================  =====================================================================  ===
:func:`centroid_triplet`               Cross-Modality Person Re-identification with Memory-Based Contrastive  9
                                       Embedding (AAAI 2023)
:func:`center_separation`              Visible-Infrared Person Re-Identification via Semantic Alignment and   5
                                       Affinity Inference (ICCV 2023)
:func:`part_diversity`                 same paper (ICCV 2023), released-code form                             4
:func:`hard_instance_contrastive`      Partial Enhancement and Channel Aggregation for Visible-Infrared       6
                                       Person Re-Identification (IEICE 2024)
:func:`modality_centroid_contrastive`  same paper (IEICE 2024)                                                10
:func:`channel_mix_margin`             same paper (IEICE 2024), hinge reading of the printed ``|D - m|``      3
:func:`proxy_cycle`                    our design after Proxy-Based Embedding Alignment for RGB-Infrared      --
                                       Person Re-Identification (Tsinghua Science and Technology 2025)
=====================================  =====================================================================  ===

Common conventions:

* features are used as given (no normalisation inside, except where a function says so);
* every loss is reduced by the mean and returned as a 0-dim tensor of the features' dtype;
* float32 and float64 on any device (CPU, CUDA); all tensor arguments share one device and
  one floating dtype;
* labels (and modalities) are 1-D int64 or int32 tensors, one entry per feature row;
* Euclidean distances that enter a loss are ``torch.linalg.vector_norm`` of explicit
  differences: exact, and with gradient 0 (the minimum-norm subgradient) at distance 0 instead
  of NaN;
* mining (argmin / argmax / sort) runs under ``torch.no_grad`` on squared distances in the
  expanded form ``|x|^2 - 2 x.y + |y|^2`` (one matmul, no (B, N, d) difference tensor); the
  selected distances are then recomputed exactly with gradient.  Candidates closer than the
  rounding of that form (about ``eps * |x|^2``) may therefore be ranked either way.

Argument errors: ``TypeError`` for a wrong type or dtype (a bool where a number is expected
included), ``ValueError`` for a wrong shape or value; labels outside the rows of a centroid table
raise an error that is both an ``IndexError`` and a ``ValueError``.  Scalars may be Python or NumPy
scalars alike.  Each message names the argument, what was expected and what came.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._validate import check_finite_float, check_int, check_positive_float, check_same_device, check_same_dtype
from ._validate import check_index_range, check_index_vector, check_tensor

__all__ = [
    "center_separation",
    "centroid_triplet",
    "channel_mix_margin",
    "hard_instance_contrastive",
    "modality_centroid_contrastive",
    "part_diversity",
    "proxy_cycle",
]

NEGATIVES = ("batch", "all")
_DTYPES = (torch.float32, torch.float64)


# ---- argument checks ----------------------------------------------------------------------------


def _check_float(name: str, value, ndim: int) -> torch.Tensor:
    return check_tensor(name, value, ndim=ndim, floating=True, dtypes=_DTYPES)


def _check_labels(labels, batch: int, rows=None, table: str = "centroids") -> torch.Tensor:
    """1-D int labels of ``batch`` entries; with ``rows``, each in [0, rows) (IndexError otherwise)."""
    labels = check_index_vector("labels", labels, batch, "identity labels")
    if rows is not None:
        check_index_range("labels", labels, rows, f"rows of {table}")
    return labels


def _check_modalities(modalities, batch: int) -> torch.Tensor:
    modalities = check_index_vector("modalities", modalities, batch, "modality indices")
    if modalities.numel() and modalities.device.type != "meta":
        bad = (modalities != 0) & (modalities != 1)
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            raise ValueError(f"modalities: expected values in {{0, 1}} (0 visible, 1 infrared), got "
                             f"{int(modalities[first])} at position {first}")
    return modalities


def _check_width(name: str, value: torch.Tensor, dim: int, like: str, expected: str) -> None:
    if value.shape[-1] != dim:
        raise ValueError(f"{name}: expected shape {expected} with d = {dim} (like {like}), got {tuple(value.shape)}")


def _squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``|x_i - y_j|^2`` in the expanded form, clamped at 0; for mining only (call under no_grad)."""
    sq = (x * x).sum(1, keepdim=True) - 2.0 * (x @ y.t()) + (y * y).sum(1)
    return sq.clamp_(min=0.0)


# ---- losses -------------------------------------------------------------------------------------


def centroid_triplet(
    features: torch.Tensor,
    labels: torch.Tensor,
    centroids: torch.Tensor,
    margin: float = 0.3,
    negatives: str = "batch",
) -> torch.Tensor:
    """Hardest-negative-centroid triplet loss.

    Cross-Modality Person Re-identification with Memory-Based Contrastive Embedding (AAAI 2023),
    eq. 9::

        loss = mean_i [ ||f_i - c_{y_i}|| - min_{k != y_i} ||f_i - c_k|| + margin ]_+

    with Euclidean distances.  The paper leaves open which centroids compete as negatives:

    * ``negatives="batch"`` (default, the released code): the identities present in ``labels``
      other than ``y_i``;
    * ``negatives="all"`` (the paper's formula): every row of ``centroids`` other than ``y_i``.

    A sample without any candidate negative (``"batch"`` with one identity in the batch, or
    ``"all"`` with a single centroid row) contributes 0 and still counts in the mean.

    Args:
        features: ``(B, d)`` float32/float64 features, used as given.
        labels: ``(B,)`` int64/int32 identities in ``[0, num_ids)``.
        centroids: ``(num_ids, d)``, same dtype and device; the gradient flows into it when it
            requires grad (a memory bank usually does not).
        margin: finite float.
        negatives: ``"batch"`` or ``"all"``.

    The hardest negative is chosen under ``no_grad`` on expanded-form squared distances (argmin,
    first index on exact ties); both distances are then recomputed as the norms of explicit
    differences, whose gradient is 0 at distance 0.
    """
    _check_float("features", features, 2)
    _check_float("centroids", centroids, 2)
    _check_width("centroids", centroids, features.shape[1], "features", "(num_ids, d)")
    check_same_dtype([("features", features), ("centroids", centroids)])
    labels = _check_labels(labels, features.shape[0], centroids.shape[0])
    check_same_device([("features", features), ("labels", labels), ("centroids", centroids)])
    margin = check_finite_float("margin", margin)
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives: expected 'batch' or 'all', got {negatives!r}")
    labels = labels.long()
    with torch.no_grad():
        sq = _squared_distances(features.detach(), centroids.detach())
        sq.scatter_(1, labels.unsqueeze(1), float("inf"))
        if negatives == "batch":
            present = torch.zeros(centroids.shape[0], dtype=torch.bool, device=features.device)
            present[labels] = True
            sq[:, ~present] = float("inf")
        hardest = sq.argmin(dim=1)
        has_negative = torch.isfinite(sq.gather(1, hardest.unsqueeze(1)).squeeze(1))
    d_pos = torch.linalg.vector_norm(features - centroids[labels], dim=1)
    d_neg = torch.linalg.vector_norm(features - centroids[hardest], dim=1)
    hinge = torch.clamp(d_pos - d_neg + margin, min=0.0)
    return (hinge * has_negative.to(features.dtype)).mean()


def center_separation(
    features: torch.Tensor,
    labels: torch.Tensor,
    rho1: float = 0.01,
    rho2: float = 0.7,
) -> torch.Tensor:
    """Pull samples to their batch centre, push batch centres apart.

    Visible-Infrared Person Re-Identification via Semantic Alignment and Affinity Inference
    (ICCV 2023), eq. 5.  With ``c_y`` the mean of identity ``y``'s features in this batch
    (computed with gradient) and ``Y`` the identities present::

        loss = mean_i [ ||f_i - c_{y_i}|| - rho1 ]_+  +  mean_{j < k in Y} [ rho2 - ||c_j - c_k|| ]_+

    Reading taken: each term is averaged on its own (over samples, over unordered pairs of
    identities) and the two averages are added; the second term is 0 when the batch holds one
    identity.

    Args:
        features: ``(B, d)`` float32/float64 features, used as given.
        labels: ``(B,)`` int64/int32 identities; only compared for equality, so any integer
            values are accepted.
        rho1, rho2: finite floats (the paper's 0.01 and 0.7).

    Distances are norms of explicit differences (gradient 0 at distance 0, e.g. for a
    single-sample identity or two coinciding centres); the centres are a one-hot matmul
    (deterministic on CUDA, unlike ``index_add``).
    """
    _check_float("features", features, 2)
    labels = _check_labels(labels, features.shape[0])
    check_same_device([("features", features), ("labels", labels)])
    rho1 = check_finite_float("rho1", rho1)
    rho2 = check_finite_float("rho2", rho2)
    ids, inverse = torch.unique(labels, return_inverse=True)
    num_ids = ids.numel()
    onehot = (inverse.unsqueeze(0) == torch.arange(num_ids, device=features.device).unsqueeze(1)).to(features.dtype)
    centres = (onehot @ features) / onehot.sum(dim=1, keepdim=True)
    pull = torch.clamp(torch.linalg.vector_norm(features - centres[inverse], dim=1) - rho1, min=0.0).mean()
    if num_ids < 2:
        return pull
    j, k = torch.triu_indices(num_ids, num_ids, 1, device=features.device)
    push = torch.clamp(rho2 - torch.linalg.vector_norm(centres[j] - centres[k], dim=1), min=0.0).mean()
    return pull + push


def part_diversity(similarity: torch.Tensor) -> torch.Tensor:
    """Diversity of part-prototype similarity maps (negative mean pairwise RMS difference).

    Visible-Infrared Person Re-Identification via Semantic Alignment and Affinity Inference
    (ICCV 2023), eq. 4 in the form of the released code.  For each sample, with ``S`` its
    ``(p, n)`` map (p prototypes, n pixels)::

        loss_b = -2 / (p (p - 1)) * sum_{i < j} sqrt( mean_k (S_ik - S_jk)^2 )

    and the loss is the mean of ``loss_b`` over the batch.

    Args:
        similarity: ``(B, p, n)`` float32/float64 with ``p >= 2``.  Values are expected in
            ``[0, 1]`` (prototype-pixel affinities); the range is not checked element-wise.

    Square root at 0: ``sqrt(mean_k x_k^2)`` is computed as ``||x|| / sqrt(n)`` with
    ``torch.linalg.vector_norm``, whose backward is 0 where ``x = 0``.  Two identical rows thus
    contribute value 0 and gradient 0 (the minimum-norm subgradient) instead of NaN; no epsilon
    is added, so every other value and gradient is exact.
    """
    _check_float("similarity", similarity, 3)
    batch, p, n = similarity.shape
    if p < 2:
        raise ValueError(f"similarity: expected shape (B, p, n) with p >= 2 prototypes, got {tuple(similarity.shape)}")
    i, j = torch.triu_indices(p, p, 1, device=similarity.device)
    rms = torch.linalg.vector_norm(similarity[:, i, :] - similarity[:, j, :], dim=2) / math.sqrt(n)
    per_sample = -2.0 / (p * (p - 1)) * rms.sum(dim=1)
    return per_sample.mean()


def hard_instance_contrastive(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_negatives: int = 50,
    temperature: float = 0.15,
) -> torch.Tensor:
    """Contrast each anchor's hardest positive against its nearest negatives.

    Partial Enhancement and Channel Aggregation for Visible-Infrared Person Re-Identification
    (IEICE 2024), eq. 6.  For anchor ``i``: ``j`` is the same-identity sample (``j != i``) at the
    largest Euclidean distance and ``Q`` the ``num_negatives`` other-identity samples at the
    smallest Euclidean distance (all of them when there are fewer)::

        loss_i = -log( e^{f_i.f_j / tau} / (e^{f_i.f_j / tau} + sum_{k in Q} e^{f_i.f_k / tau}) )

    averaged over the anchors that have a positive; anchors without one are left out of the
    mean, and when no anchor has a positive the result is 0 (still attached to the graph).  An
    anchor with a positive but no negative gets ``-log 1 = 0``.

    Args:
        features: ``(B, d)`` float32/float64 features, used as given (raw dot products).
        labels: ``(B,)`` int64/int32 identities; only compared for equality.
        num_negatives: int >= 1.
        temperature: positive float ``tau``.

    Mining is done without gradient on expanded-form squared distances; ties go to the lower
    batch index (first argmax for the positive, stable sort for the negatives).  The loss is
    differentiable in the dot products of the mined pairs (a log-sum-exp).
    """
    _check_float("features", features, 2)
    labels = _check_labels(labels, features.shape[0])
    check_same_device([("features", features), ("labels", labels)])
    num_negatives = check_int("num_negatives", num_negatives, 1)
    temperature = check_positive_float("temperature", temperature)
    batch = features.shape[0]
    with torch.no_grad():
        sq = _squared_distances(features.detach(), features.detach())
        same = labels.unsqueeze(0) == labels.unsqueeze(1)
        eye = torch.eye(batch, dtype=torch.bool, device=features.device)
        positive = same & ~eye
        has_positive = positive.any(dim=1)
        hardest = torch.where(positive, sq, float("-inf")).argmax(dim=1)
        order = torch.sort(torch.where(same, float("inf"), sq), dim=1, stable=True).indices
        chosen = torch.zeros_like(same).scatter_(1, order[:, : min(num_negatives, batch)], True) & ~same
        rows = has_positive.nonzero().squeeze(1)
    if rows.numel() == 0:
        return features.sum() * 0.0
    logits = features[rows] @ features.t() / temperature  # (anchors with a positive, B)
    pos = hardest[rows].unsqueeze(1)
    candidates = chosen[rows].scatter(1, pos, True)
    log_denominator = torch.logsumexp(torch.where(candidates, logits, float("-inf")), dim=1)
    return (log_denominator - logits.gather(1, pos).squeeze(1)).mean()


def modality_centroid_contrastive(
    features: torch.Tensor,
    labels: torch.Tensor,
    modalities: torch.Tensor,
    centroids: torch.Tensor,
    temperature: float = 0.1,
) -> torch.Tensor:
    """Contrast a sample with both modality centroids of its identity.

    Partial Enhancement and Channel Aggregation for Visible-Infrared Person Re-Identification
    (IEICE 2024), eq. 10.  ``P = {centroids[0, y_i], centroids[1, y_i]}`` (the visible and the
    infrared centroid of the sample's identity) and ``U = {centroids[m_i, k] : k != y_i}`` (the
    other identities' centroids of the sample's own modality ``m_i``)::

        loss_i = -1/2 * sum_{m in P} log( e^{f_i.m / tau} / sum_{m' in P u U} e^{f_i.m' / tau} )

    averaged over the batch.  Reading taken: the denominator holds ``num_ids + 1`` terms (both
    positives and the own-modality negatives, no other-modality negative).

    Args:
        features: ``(B, d)`` float32/float64 features, used as given (raw dot products).
        labels: ``(B,)`` int64/int32 identities in ``[0, num_ids)``.
        modalities: ``(B,)`` int64/int32, 0 for visible and 1 for infrared.
        centroids: ``(2, num_ids, d)``, index 0 visible and 1 infrared; same dtype and device as
            ``features``; the gradient flows into it when it requires grad.
        temperature: positive float ``tau``.
    """
    _check_float("features", features, 2)
    check_tensor("centroids", centroids, floating=True, dtypes=_DTYPES)
    batch, dim = features.shape
    if centroids.dim() != 3 or centroids.shape[0] != 2 or centroids.shape[2] != dim:
        raise ValueError(f"centroids: expected shape (2, num_ids, {dim}) (visible, infrared; d like features), "
                         f"got {tuple(centroids.shape)}")
    check_same_dtype([("features", features), ("centroids", centroids)])
    labels = _check_labels(labels, batch, centroids.shape[1])
    modalities = _check_modalities(modalities, batch)
    check_same_device([("features", features), ("labels", labels), ("modalities", modalities),
                       ("centroids", centroids)])
    temperature = check_positive_float("temperature", temperature)
    num_ids = centroids.shape[1]
    labels, modalities = labels.long(), modalities.long()
    logits = (features @ centroids.reshape(2 * num_ids, dim).t() / temperature).view(batch, 2, num_ids)
    rows = torch.arange(batch, device=features.device)
    own = logits[rows, modalities]  # (B, num_ids): own-modality centroids, the positive among them
    own_positive = own[rows, labels]
    other_positive = logits[rows, 1 - modalities, labels]
    log_denominator = torch.logsumexp(torch.cat([own, other_positive.unsqueeze(1)], dim=1), dim=1)
    return (log_denominator - 0.5 * (own_positive + other_positive)).mean()


def channel_mix_margin(
    f_visible: torch.Tensor,
    f_infrared: torch.Tensor,
    f_generated: torch.Tensor,
    margin: float = 0.7,
) -> torch.Tensor:
    """Keep generated (channel-mixed) features within ``margin`` of both real modalities.

    Partial Enhancement and Channel Aggregation for Visible-Infrared Person Re-Identification
    (IEICE 2024), eq. 3.  The printed form ``|D - m|`` is ambiguous; this function implements
    the hinge reading ``[D - m]_+`` (no option)::

        loss = mean_i [ ||f_v,i - f_g,i|| - m ]_+ + [ ||f_ir,i - f_g,i|| - m ]_+

    Args:
        f_visible, f_infrared, f_generated: ``(B, d)`` float32/float64, same shape, dtype and
            device, used as given.
        margin: finite float ``m``.

    Distances are norms of explicit differences (gradient 0 at distance 0).
    """
    _check_float("f_visible", f_visible, 2)
    _check_float("f_infrared", f_infrared, 2)
    _check_float("f_generated", f_generated, 2)
    for name, value in (("f_infrared", f_infrared), ("f_generated", f_generated)):
        if value.shape != f_visible.shape:
            raise ValueError(f"{name}: expected shape {tuple(f_visible.shape)} (like f_visible), got "
                             f"{tuple(value.shape)}")
    named = [("f_visible", f_visible), ("f_infrared", f_infrared), ("f_generated", f_generated)]
    check_same_dtype(named)
    check_same_device(named)
    margin = check_finite_float("margin", margin)
    d_visible = torch.linalg.vector_norm(f_visible - f_generated, dim=1)
    d_infrared = torch.linalg.vector_norm(f_infrared - f_generated, dim=1)
    return (torch.clamp(d_visible - margin, min=0.0) + torch.clamp(d_infrared - margin, min=0.0)).mean()


def proxy_cycle(proxies_a: torch.Tensor, proxies_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cycle-consistency between two proxy sets (a -> soft b -> back to a).

    Our design, not a reproduction: Proxy-Based Embedding Alignment for RGB-Infrared Person
    Re-Identification (Tsinghua Science and Technology 2025) describes proxy-based alignment in
    its abstract only, without equations.  With ``s`` the cosine similarity::

        alpha_k  = softmax_j( s(a_k, b_j) / tau )          (over the M proxies of b)
        w_k      = sum_j alpha_kj b_j                       (b as given, not normalised)
        beta_k   = softmax_l( s(w_k, a_l) / tau )           (over the K proxies of a)
        loss     = -mean_k log beta_kk

    i.e. each proxy of ``a`` must find its way back to itself through its soft nearest
    neighbour in ``b``.  ``K == M`` is not required.

    Args:
        proxies_a: ``(K, d)`` float32/float64.
        proxies_b: ``(M, d)``, same d, dtype and device.
        temperature: positive float ``tau`` (required; no default).

    Cosine similarity normalises with ``x / max(||x||, 1e-12)`` (``F.normalize``), so a zero
    proxy gives similarity 0 rather than NaN.
    """
    _check_float("proxies_a", proxies_a, 2)
    _check_float("proxies_b", proxies_b, 2)
    _check_width("proxies_b", proxies_b, proxies_a.shape[1], "proxies_a", "(M, d)")
    named = [("proxies_a", proxies_a), ("proxies_b", proxies_b)]
    check_same_dtype(named)
    check_same_device(named)
    temperature = check_positive_float("temperature", temperature)
    a_unit = F.normalize(proxies_a, dim=1, eps=1e-12)
    b_unit = F.normalize(proxies_b, dim=1, eps=1e-12)
    alpha = torch.softmax(a_unit @ b_unit.t() / temperature, dim=1)  # (K, M)
    w_unit = F.normalize(alpha @ proxies_b, dim=1, eps=1e-12)  # (K, d)
    logits = w_unit @ a_unit.t() / temperature  # (K, K)
    target = torch.arange(proxies_a.shape[0], device=proxies_a.device)
    return F.cross_entropy(logits, target)
