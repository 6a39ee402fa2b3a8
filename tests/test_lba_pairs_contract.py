"""What reid_kernels.lba_pairs must produce for an LbA batch (its docstring's contract).

The batch has B = 2 * num_ids * num_pos images: visible half first, then infrared, each
identity-major with the same identity order.  Every anchor's positive is in the other modality
and of its own identity, every negative in the other modality and of another identity; the
num_pos anchors of an identity take distinct positives (a permutation of that identity's block
in the other half) and, when there are enough other identities, negatives of distinct identities.
"""
import pytest
import torch

import reid_kernels

CASES = [(2, 1), (2, 4), (3, 2), (4, 4), (8, 4), (5, 7)]


def _layout(num_ids, num_pos):
    half = num_ids * num_pos
    index = torch.arange(2 * half)
    modality = (index >= half).long()  # 0 visible, 1 infrared
    identity = (index % half) // num_pos
    return modality, identity


@pytest.mark.parametrize("num_ids, num_pos", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_partners_follow_the_lba_layout(num_ids, num_pos, seed):
    pos, neg = reid_kernels.lba_pairs(num_ids, num_pos, generator=torch.Generator().manual_seed(seed))
    batch = 2 * num_ids * num_pos
    modality, identity = _layout(num_ids, num_pos)
    for name, idx in (("pos", pos), ("neg", neg)):
        assert idx.dtype == torch.int64 and idx.shape == (batch,), name
        assert int(idx.min()) >= 0 and int(idx.max()) < batch, name
        assert torch.equal(modality[idx], 1 - modality), f"{name}: every partner is in the other modality"
    assert torch.equal(identity[pos], identity), "positives share the anchor's identity"
    assert (identity[neg] != identity).all(), "negatives are of another identity"


@pytest.mark.parametrize("num_ids, num_pos", CASES)
def test_every_anchor_block_has_its_structure(num_ids, num_pos):
    pos, neg = reid_kernels.lba_pairs(num_ids, num_pos, generator=torch.Generator().manual_seed(3))
    half = num_ids * num_pos
    _, identity = _layout(num_ids, num_pos)
    for anchor_half, other_half in ((0, half), (half, 0)):
        for ident in range(num_ids):
            block = slice(anchor_half + ident * num_pos, anchor_half + (ident + 1) * num_pos)
            own_block = torch.arange(other_half + ident * num_pos, other_half + (ident + 1) * num_pos)
            # The positives of a block are a permutation of the same identity's other-modality block.
            assert torch.equal(pos[block].sort().values, own_block), (anchor_half, ident)
            if num_ids - 1 >= num_pos:  # enough other identities: each anchor gets a different one
                negative_ids = identity[neg[block]]
                assert negative_ids.unique().numel() == num_pos, (anchor_half, ident)


def test_draws_vary_and_reproduce():
    draw = lambda seed: reid_kernels.lba_pairs(8, 4, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    first, again, other = draw(0), draw(0), draw(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
