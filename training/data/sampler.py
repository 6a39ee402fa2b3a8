"""The cross-modality identity sampler of the VI-ReID community code (AGW / LbA / MCE).

Every batch holds ``P`` identities (drawn without replacement) and, for each, ``K``
visible and ``K`` infrared images (drawn with replacement, as that code does), laid out
identity-major and in the same identity order in both halves -- the layout
:func:`reid_kernels.lba_pairs` assumes. An epoch has
``floor(max(#visible, #infrared) / (P*K)) + 1`` batches, as the community code's
``IdentitySampler`` (the released code of AGW, TPAMI 2021, which LbA and MCE reuse).

The sampler yields *slots* ``(visible_index, infrared_index, augmentation_seed)``;
``P*K`` consecutive slots form one batch. The draws are a pure function of
``(seed, epoch)``, so resuming at an epoch boundary reproduces them exactly; under
DDP each rank takes every ``world_size``-th batch.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Tuple

import numpy as np

Slot = Tuple[int, int, int]


class CrossModalityIdentitySampler:
    def __init__(self, visible_labels, infrared_labels, num_ids: int, num_pos: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        visible_labels = np.asarray(visible_labels)
        infrared_labels = np.asarray(infrared_labels)
        self.vis_index = _group(visible_labels)
        self.ir_index = _group(infrared_labels)
        self.identities = np.array(sorted(set(self.vis_index) & set(self.ir_index)), dtype=np.int64)
        if num_ids < 2 or num_pos < 1:
            raise ValueError(f"sampler: expected num_ids >= 2 and num_pos >= 1, got {num_ids}, {num_pos}")
        if len(self.identities) < num_ids:
            raise ValueError(f"sampler.num_ids: {num_ids} identities per batch, but only {len(self.identities)} "
                             "identities have both visible and infrared images")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
        self.num_ids, self.num_pos = num_ids, num_pos
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.epoch = 0
        self.num_slots = max(len(visible_labels), len(infrared_labels))
        self.batches_per_epoch = self.num_slots // (num_ids * num_pos) + 1

    @property
    def batch_size(self) -> int:
        """Slots per batch (images per modality)."""
        return self.num_ids * self.num_pos

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def batches_per_rank(self) -> int:
        return self.batches_per_epoch // self.world_size if self.world_size > 1 else self.batches_per_epoch

    def epoch_batches(self) -> List[List[Slot]]:
        """Every batch of the current epoch (all ranks)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = []
        for _ in range(self.batches_per_epoch):
            ids = rng.choice(self.identities, self.num_ids, replace=False)
            slots = []
            for identity in ids:
                vis = rng.choice(self.vis_index[int(identity)], self.num_pos)
                ir = rng.choice(self.ir_index[int(identity)], self.num_pos)
                seeds = rng.integers(0, 2**62, self.num_pos)
                slots.extend(zip(vis.tolist(), ir.tolist(), seeds.tolist()))
            batches.append(slots)
        return batches

    def __iter__(self) -> Iterator[Slot]:
        batches = self.epoch_batches()
        mine = batches[self.rank::self.world_size][: self.batches_per_rank()]
        for batch in mine:
            yield from batch

    def __len__(self) -> int:
        return self.batches_per_rank() * self.batch_size

    def state_dict(self) -> Dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])


def _group(labels: np.ndarray) -> Dict[int, np.ndarray]:
    out: Dict[int, List[int]] = {}
    for index, label in enumerate(labels.tolist()):
        out.setdefault(int(label), []).append(index)
    return {k: np.asarray(v, dtype=np.int64) for k, v in out.items()}
