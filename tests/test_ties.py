"""reid_kernels._ties: the groups of identical rows and the stable top-k that make duplicates tie exactly."""
import numpy as np
import pytest
import torch

from reid_kernels import _ties
from reid_kernels._ties import expand_copies, identical_rows, stable_smallest


def brute_groups(x):
    """Per row, the index of its first identical row (bit patterns compared one by one)."""
    rows = [r.numpy().tobytes() for r in x]
    return torch.tensor([rows.index(r) for r in rows])


@pytest.mark.parametrize("dim, dtype", [(4, torch.float32), (3, torch.float32), (5, torch.float16),
                                        (2, torch.float64)])
def test_identical_rows_groups(dim, dtype):
    """Rows of 8k bytes are hashed as int64 words, others element by element: both find the copies."""
    gen = torch.Generator().manual_seed(dim)
    base = torch.randn(9, dim, generator=gen).to(dtype)
    x = base[torch.tensor([3, 0, 3, 5, 1, 0, 8, 3, 2])]
    groups = identical_rows(x)
    first = brute_groups(x)
    assert torch.equal(groups.first[groups.inverse], first)
    assert torch.equal(groups.first, torch.unique(first))  # ascending first occurrences
    assert torch.equal(groups.counts, torch.bincount(groups.inverse))
    assert torch.equal(x[groups.first][groups.inverse], x)
    assert identical_rows(base) is None and identical_rows(base[:1]) is None


def test_identical_rows_of_a_view_at_an_odd_offset():
    """A contiguous float32 view starting at an odd element cannot be viewed as int64 words."""
    storage = torch.arange(1.0, 22.0)
    storage[11:21] = storage[1:11]
    x = storage[1:].view(10, 2)  # rows 0-4 repeated as rows 5-9
    groups = identical_rows(x)
    assert groups.inverse.tolist() == [0, 1, 2, 3, 4] * 2 and groups.first.tolist() == [0, 1, 2, 3, 4]


def test_identical_rows_survives_hash_collisions(monkeypatch):
    """With every hash equal (a zero multiplier), the check against each group's first row fails and
    the exact sort of the rows decides."""
    monkeypatch.setattr(_ties, "_hash_weights", lambda width: torch.zeros(width, dtype=torch.int64))
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0], [0.0, -0.0], [0.0, 0.0]])
    groups = identical_rows(x)
    assert groups.inverse.tolist() == [0, 1, 0, 2, 3]  # -0.0 and 0.0: other bits, not merged
    assert groups.first.tolist() == [0, 1, 3, 4] and groups.counts.tolist() == [2, 1, 1, 1]
    assert identical_rows(x[:2]) is None


def test_stable_smallest_keeps_lowest_indices_at_the_kth_place():
    key = torch.tensor([[3.0, 1.0, 2.0, 1.0, 2.0, 2.0], [0.5, 0.5, 0.5, 0.5, 0.1, 0.9]])
    assert stable_smallest(key, 3).tolist() == [[1, 3, 2], [4, 0, 1]]
    assert stable_smallest(key, 6).tolist() == np.argsort(key.numpy(), axis=1, kind="stable").tolist()


def test_expand_copies_matches_a_stable_sort():
    """Distinct rows with multiplicities, some distinct rows tied in key: the k best items by (key,
    index) from each row's k best distinct rows equal the first k of a stable argsort of all items."""
    gen = torch.Generator().manual_seed(0)
    inverse = torch.randint(0, 6, (20,), generator=gen)
    inverse[:6] = torch.arange(6)  # every distinct row present, first occurrences 0..5 in order
    groups = _ties.RowGroups(torch.arange(6), inverse, torch.bincount(inverse, minlength=6))
    key_distinct = torch.tensor([[0.3, 0.1, 0.3, 0.2, 0.1, 0.9], [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]])
    everything = key_distinct[:, inverse]
    for k in (1, 3, 7, 20):
        pos = stable_smallest(key_distinct, min(k, 6))
        keys, ids = expand_copies(key_distinct.gather(1, pos), pos, groups, k)
        expected = np.argsort(everything.numpy(), axis=1, kind="stable")[:, :k]
        assert ids.tolist() == expected.tolist(), k
        assert torch.equal(keys, everything.gather(1, ids))
