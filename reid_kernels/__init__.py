"""reid_kernels: fused CPU/CUDA kernels, retrieval and evaluation for visible-infrared person ReID.

Public operators (each has a plain-PyTorch twin in :mod:`reid_kernels.reference`):

* :func:`person_mask`, :func:`soft_warp`, :func:`cmalign` -- LbA's CMAlign (Learning by Aligning, ICCV 2021);
* :func:`lba_pairs` -- LbA's positive/negative partners within a batch;
* :func:`masked_dense_triplet` -- LbA's dense triplet loss (eqs. 10-11);
* :func:`memory_update_` -- momentum update of class-memory banks (MCE, AAAI 2023; PECA, IEICE 2024).

Modules: :mod:`~reid_kernels.nn` (CMAlign, MemoryBank), :mod:`~reid_kernels.metrics`
(CMC / mAP / mINP exactly as the community code), :mod:`~reid_kernels.protocols`
(SYSU-MM01 and RegDB evaluation), :mod:`~reid_kernels.retrieval` (FAISS / torch
gallery search), :mod:`~reid_kernels.rerank` (k-reciprocal re-ranking, SAAI's AIM).
"""
from . import losses, metrics, nn, protocols, reference, rerank, retrieval
from ._extension import extension_available, has_cuda_kernels
from .cmalign import CMAlignOutput, cmalign, person_mask, soft_warp
from .dense_triplet import masked_dense_triplet
from .memory import memory_update_
from .pairs import lba_pairs

__version__ = "0.1.0"

__all__ = [
    "CMAlignOutput",
    "cmalign",
    "extension_available",
    "has_cuda_kernels",
    "lba_pairs",
    "losses",
    "masked_dense_triplet",
    "memory_update_",
    "metrics",
    "nn",
    "person_mask",
    "protocols",
    "reference",
    "rerank",
    "retrieval",
    "soft_warp",
]
