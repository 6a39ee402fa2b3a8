"""lba_pairs: the partner contract of an LbA batch, for both negative draws, and its argument checks."""
from collections import Counter

import numpy as np
import pytest
import torch

from reid_kernels import lba_pairs

DRAWS = ("independent", "lba-code")


def layout(num_ids, num_pos):
    """(modality, identity, image position) of every batch index: visible half first, identity-major."""
    index = torch.arange(2 * num_ids * num_pos)
    half = num_ids * num_pos
    return index // half, (index % half) // num_pos, index % num_pos


@pytest.mark.parametrize("draw", DRAWS)
@pytest.mark.parametrize("num_ids, num_pos", [(2, 1), (2, 4), (3, 2), (8, 4), (5, 4), (17, 3)])
def test_contract(draw, num_ids, num_pos):
    modality, identity, _ = layout(num_ids, num_pos)
    pos, neg = lba_pairs(num_ids, num_pos, torch.Generator().manual_seed(num_ids * 10 + num_pos), negative_draw=draw)
    assert pos.dtype == neg.dtype == torch.int64 and pos.shape == neg.shape == modality.shape
    # partners always in the other modality (a draw within the anchor's own half fails here)
    assert torch.equal(modality[pos], 1 - modality)
    assert torch.equal(modality[neg], 1 - modality)
    # positives of the anchor's identity, negatives of another one
    assert torch.equal(identity[pos], identity)
    assert (identity[neg] != identity).all()
    for block in range(2 * num_ids):  # the num_pos anchors of one identity in one modality
        anchors = slice(block * num_pos, (block + 1) * num_pos)
        own = pos[anchors] - pos[anchors].min()
        assert sorted(own.tolist()) == list(range(num_pos))  # a permutation: every positive a different image
        assert pos[anchors].min() % num_pos == 0
        neg_ids = identity[neg[anchors]]
        if num_ids - 1 >= num_pos:  # enough other identities: distinct negative identities
            assert len(set(neg_ids.tolist())) == num_pos
        if draw == "lba-code":  # the released code: a permutation of the image positions
            assert sorted((neg[anchors] % num_pos).tolist()) == list(range(num_pos))


def test_independent_draw_repeats_image_positions_and_lba_code_never_does():
    """Which draw is which: with replacement, 4 anchors share an image position in most blocks."""
    repeated = {draw: 0 for draw in DRAWS}
    for draw in DRAWS:
        pos, neg = lba_pairs(50, 4, torch.Generator().manual_seed(0), negative_draw=draw)
        for block in neg.view(-1, 4):
            repeated[draw] += len(set((block % 4).tolist())) < 4
    assert repeated["lba-code"] == 0
    assert repeated["independent"] > 50  # P(4 distinct of 4) = 3/32: about 90 of 100 blocks repeat


def test_negative_identities_are_uniform_ordered_draws():
    """With 3 other identities and 2 anchors per block, each of the 6 ordered pairs is equally likely
    (a biased mapping of ranks to identities, e.g. never skipping the anchor's own id, fails)."""
    counts = Counter()
    gen = torch.Generator().manual_seed(1)
    for _ in range(1500):
        _, neg = lba_pairs(4, 2, gen, negative_draw="lba-code")
        ids = ((neg % 8) // 2).view(-1, 2)
        for block, (a, b) in enumerate(ids.tolist()):
            counts[(block % 4, a, b)] += 1
    for anchor in range(4):
        pairs = [(a, b) for a in range(4) for b in range(4) if len({anchor, a, b}) == 3]
        observed = [counts[(anchor, a, b)] for a, b in pairs]
        assert sum(observed) == 3000 and len(observed) == 6
        # expected 500 each, binomial std ~20.4: 5 sigma
        assert all(abs(o - 500) < 102 for o in observed), observed
    with_replacement = Counter()
    _, neg = lba_pairs(2, 3, torch.Generator().manual_seed(2))  # one other identity only
    with_replacement.update(((neg % 6) // 3).tolist())
    assert set(with_replacement) == {0, 1}


def test_seeded_generator_reproduces_the_draw():
    for draw in DRAWS:
        a = lba_pairs(6, 4, torch.Generator().manual_seed(3), negative_draw=draw)
        b = lba_pairs(6, 4, torch.Generator().manual_seed(3), negative_draw=draw)
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_numpy_scalars_accepted():
    a = lba_pairs(np.int64(3), np.int32(2), torch.Generator().manual_seed(4))
    b = lba_pairs(3, 2, torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(generator=123), TypeError, r"generator: expected a torch.Generator or None .*manual_seed.*got int"),
        (dict(num_ids=1), ValueError, "num_ids: expected an int >= 2, got 1"),
        (dict(num_ids=2.0), TypeError, "num_ids: expected an int, got float"),
        (dict(num_ids=True), TypeError, "num_ids: expected an int, got bool"),
        (dict(num_pos=0), ValueError, "num_pos: expected an int >= 1, got 0"),
        (dict(negative_draw="paper"), ValueError, "negative_draw: expected one of"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = dict(num_ids=2, num_pos=2, generator=None)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        lba_pairs(args.pop("num_ids"), args.pop("num_pos"), **args)


def test_lba_recipe_draws_negatives_as_the_released_code():
    """The LbA recipe's default is the released code's draw; the library's default is unchanged."""
    from reid_kernels.training.config import ConfigError, load_config

    for name in (None, "lba_synth", "lba_sysu", "lba_regdb"):
        assert load_config(name)["loss"]["negative_draw"] == "lba-code"
    assert load_config("lba_synth", ["loss.negative_draw=independent"])["loss"]["negative_draw"] == "independent"
    with pytest.raises(ConfigError, match="negative_draw"):
        load_config("lba_synth", ["loss.negative_draw=paper"])
    assert lba_pairs.__kwdefaults__["negative_draw"] == "independent"
