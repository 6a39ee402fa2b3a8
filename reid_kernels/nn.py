"""torch.nn modules built on reid_kernels operators."""
import torch  # noqa: F401


# ---- CMAlign ----
# LbA (seed 001, ALGORITHMS.md §2): the non-parametric CMAlign module on [visible; infrared].
from typing import Optional as _Optional  # noqa: E402

from ._validate import check_finite_float as _check_finite_float  # noqa: E402
from ._validate import check_positive_float as _check_positive_float  # noqa: E402
from ._validate import check_tensor as _check_tensor  # noqa: E402
from .cmalign import CMAlignOutput, cmalign as _cmalign  # noqa: E402
from .pairs import lba_pairs as _lba_pairs  # noqa: E402


class CMAlign(torch.nn.Module):
    """LbA's CMAlign module (seed 001, eqs. 1-11), non-parametric, for training.

    ``forward(feat_v, feat_t)`` concatenates the visible and infrared maps as LbA
    does (``[feat_v; feat_t]``), pairs every anchor with a positive and a negative
    partner of the other modality and returns :class:`reid_kernels.CMAlignOutput`
    ``(recon_pos, recon_neg, comask, loss)`` of :func:`reid_kernels.cmalign` for the
    ``2B`` anchors (visible first):
    ``recon_pos`` feeds LbA's ID-consistency loss, ``loss`` is the dense triplet
    loss ``L_DT`` (LbA weights it by 0.5).

    Args:
        temperature: inverse softmax temperature beta > 0 (LbA: 50).
        margin: dense-triplet margin (LbA: 0.3).
        num_pos: images per identity per modality, used to draw partners when
            ``forward`` is not given any (LbA: 4).

    Partners: pass ``pos_idx`` / ``neg_idx`` (indices into the concatenated
    batch), or let the module draw fresh ones with :func:`reid_kernels.lba_pairs`
    at every call -- the batch must then be laid out as LbA lays it out (each
    modality identity-major, ``num_pos`` images per identity, same identity order
    in both); ``generator`` makes the draw reproducible.
    """

    def __init__(self, temperature: float = 50.0, margin: float = 0.3, num_pos: int = 4):
        super().__init__()
        self.temperature = _check_positive_float("temperature", temperature)
        self.margin = _check_finite_float("margin", margin)
        self.num_pos = _check_num_pos(num_pos)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, margin={self.margin}, num_pos={self.num_pos}"

    def forward(
        self,
        feat_v: torch.Tensor,
        feat_t: torch.Tensor,
        pos_idx: _Optional[torch.Tensor] = None,
        neg_idx: _Optional[torch.Tensor] = None,
        *,
        num_pos: _Optional[int] = None,
        generator: _Optional[torch.Generator] = None,
    ) -> CMAlignOutput:
        _check_tensor("feat_v", feat_v, ndim=4, floating=True)
        _check_tensor("feat_t", feat_t, ndim=4, floating=True)
        if feat_t.shape != feat_v.shape:
            raise ValueError(f"feat_t: expected shape {tuple(feat_v.shape)} (like feat_v), got {tuple(feat_t.shape)}")
        if (pos_idx is None) != (neg_idx is None):
            given, missing = ("pos_idx", "neg_idx") if neg_idx is None else ("neg_idx", "pos_idx")
            raise ValueError(f"{missing}: expected a tensor when {given} is given (pass both or neither), got None")
        if pos_idx is None:
            per_id = self.num_pos if num_pos is None else _check_num_pos(num_pos)
            batch = feat_v.shape[0]
            if batch % per_id != 0 or batch // per_id < 2:
                raise ValueError(
                    f"feat_v: expected a batch of num_ids * num_pos images with num_ids >= 2 and "
                    f"num_pos = {per_id}, got {batch} images"
                )
            pos_idx, neg_idx = _lba_pairs(batch // per_id, per_id, generator=generator)
        feat = torch.cat([feat_v, feat_t], dim=0)
        return _cmalign(feat, pos_idx, neg_idx, self.temperature, self.margin)


def _check_num_pos(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"num_pos: expected an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"num_pos: expected an int >= 1, got {value}")
    return value
