"""Issue 15's list: every refusal names the argument, with TypeError for a wrong type and ValueError for a
wrong value, and Python and NumPy scalars are accepted alike."""
import importlib.util
import json
import os
import zipfile

import numpy as np
import pytest
import torch

import reid_kernels
from reid_kernels import _validate
from reid_kernels.nn import CMAlign, MemoryBank
from reid_kernels.retrieval import GalleryIndex, exact_search

BACKENDS = ["torch"] + (["faiss"] if importlib.util.find_spec("faiss") else [])


# ---- _validate: one exception type per kind of mistake ---------------------------------------------


@pytest.mark.parametrize("value", [3, np.int64(3), np.int32(3), np.uint8(3)])
def test_check_int_accepts_python_and_numpy_ints(value):
    out = _validate.check_int("n", value, 1)
    assert out == 3 and type(out) is int


@pytest.mark.parametrize("value", [3.0, np.float32(3), True, np.bool_(True), "3", torch.tensor(3), None])
def test_check_int_refuses_other_types(value):
    with pytest.raises(TypeError, match=r"^n: expected an int, got"):
        _validate.check_int("n", value, 1)


@pytest.mark.parametrize("value", [0.5, np.float32(0.5), np.float64(0.5), np.float16(0.5), 1, np.int64(1)])
def test_floats_accept_python_and_numpy_reals(value):
    assert _validate.check_positive_float("t", value) == float(value)
    assert _validate.check_finite_float("t", value) == float(value)
    assert type(_validate.check_positive_float("t", value)) is float


@pytest.mark.parametrize("value", [True, np.bool_(False), "1", None, torch.tensor(1.0), 1j])
def test_floats_refuse_other_types(value):
    with pytest.raises(TypeError, match=r"^t: expected a positive float"):
        _validate.check_positive_float("t", value)
    with pytest.raises(TypeError, match=r"^t: expected a float"):
        _validate.check_finite_float("t", value)


def test_wrong_values_are_value_errors():
    with pytest.raises(ValueError, match=r"n: expected an int >= 1, got 0"):
        _validate.check_int("n", np.int64(0), 1)
    with pytest.raises(ValueError, match=r"t: expected a finite value > 0, got nan"):
        _validate.check_positive_float("t", np.float32("nan"))
    with pytest.raises(ValueError, match=r"m: expected a value in \[0, 1\], got 1.5"):
        _validate.check_float_in("m", 1.5, 0.0, 1.0)
    with pytest.raises(ValueError, match="m: expected a finite value in"):
        _validate.check_float_in("m", float("nan"), 0.0, 1.0)
    assert issubclass(_validate.IndexRangeError, IndexError) and issubclass(_validate.IndexRangeError, ValueError)


def test_numpy_scalars_reach_the_operators():
    """np.float32 temperatures and np.int64 counts were refused while np.int64 k was accepted."""
    feat = torch.randn(4, 6, 3, 3, dtype=torch.float64)
    pos, neg = reid_kernels.lba_pairs(np.int64(2), np.int64(1), torch.Generator().manual_seed(0))
    a = reid_kernels.cmalign(feat, pos, neg, np.float32(50.0), np.float64(0.3))
    b = reid_kernels.cmalign(feat, pos, neg, 50.0, 0.3)
    assert torch.equal(a.loss, b.loss)
    module = CMAlign(temperature=np.float32(50.0), margin=np.float32(0.25), num_pos=np.int64(1))
    assert module.temperature == 50.0 and module.num_pos == 1 and type(module.num_pos) is int
    bank = MemoryBank(np.int64(5), np.int32(4), momentum=np.float32(0.5), temperature=np.float64(0.1))
    assert bank.memory("memory").shape == (5, 4)
    memory = torch.zeros(5, 4)
    reid_kernels.memory_update_(memory, torch.ones(2, 4), torch.tensor([0, 1]), np.float32(0.5))
    assert torch.allclose(memory[0], torch.full((4,), 0.5))
    with pytest.raises(TypeError, match="temperature: expected a positive float, got bool"):
        reid_kernels.cmalign(feat, pos, neg, True, 0.3)


# ---- memory_update_ and MemoryBank -------------------------------------------------------------------


def test_memory_update_refuses_a_bank_that_requires_grad():
    memory = torch.zeros(5, 4, requires_grad=True)
    with pytest.raises(ValueError, match="memory: expected a tensor that does not require grad.*requires_grad=True"):
        reid_kernels.memory_update_(memory, torch.ones(2, 4), torch.tensor([0, 1]), 0.5)
    assert torch.equal(memory.detach(), torch.zeros(5, 4))  # untouched
    reid_kernels.memory_update_(memory.detach(), torch.ones(2, 4), torch.tensor([0, 1]), 0.5)  # the remedy works


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64, "float32", np.float32])
def test_memory_bank_refuses_non_float_dtypes(dtype):
    with pytest.raises(TypeError, match=r"dtype: expected one of \(torch.float32"):
        MemoryBank(5, 4, dtype=dtype)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(num_classes=5.0), TypeError, "num_classes: expected an int, got float"),
        (dict(num_classes=0), ValueError, "num_classes: expected an int >= 1, got 0"),
        (dict(dim=True), TypeError, "dim: expected an int, got bool"),
        (dict(momentum="0.2"), TypeError, "momentum: expected a float in"),
        (dict(temperature=True), TypeError, "temperature: expected a positive float, got bool"),
        (dict(normalize=1), TypeError, "normalize: expected a bool, got int"),
        (dict(history="yes"), TypeError, "history: expected a bool, got str"),
    ],
)
def test_memory_bank_construction_errors(kwargs, error, match):
    args = dict(num_classes=5, dim=4)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        MemoryBank(args.pop("num_classes"), args.pop("dim"), **args)


def test_memory_bank_initialize_refuses_float_labels():
    bank = MemoryBank(5, 4)
    with pytest.raises(TypeError, match="labels: expected an int64 .* got dtype torch.float32"):
        bank.initialize_("memory", torch.randn(3, 4), torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(IndexError, match=r"labels: expected values in \[0, 5\).*got 5"):
        bank.initialize_("memory", torch.randn(3, 4), torch.tensor([0, 1, 5]))
    with pytest.raises(ValueError, match="features: expected finite values"):
        bank.initialize_("memory", torch.full((3, 4), float("nan")), torch.tensor([0, 1, 2]))
    assert torch.equal(bank.memory("memory"), torch.zeros(5, 4))


def test_memory_bank_set_history_refuses_nan():
    bank = MemoryBank(5, 4)
    centroids = torch.randn(5, 4)
    centroids[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"centroids: expected finite values, got NaN/inf \(first in row 3\)"):
        bank.set_history_("memory", centroids)
    with pytest.raises(TypeError, match="centroids: expected a torch.Tensor"):
        bank.set_history_("memory", np.zeros((5, 4)))
    assert torch.equal(bank.history("memory"), torch.zeros(5, 4))


@pytest.mark.parametrize("bad", [5, -1])
def test_memory_bank_losses_refuse_out_of_range_labels(bad):
    bank = MemoryBank(5, 4)
    bank.initialize_("memory", torch.randn(5, 4), torch.arange(5))
    feats, labels = torch.randn(3, 4), torch.tensor([0, bad, 1])
    for loss in (bank.contrast_loss, bank.hard_negative_loss):
        with pytest.raises(IndexError, match=rf"labels: expected values in \[0, 5\).*got {bad} at position 1"):
            loss(feats, labels, "memory")
        with pytest.raises(ValueError, match="labels"):  # a wrong value, like every other
            loss(feats, labels, "memory")
    with pytest.raises(IndexError, match="labels"):
        bank.contrast_loss(feats, labels, "memory", update_in_backward=True)
    with pytest.raises(TypeError, match="labels: expected an int64"):
        bank.contrast_loss(feats, labels.float(), "memory")


def test_contrast_loss_uses_features_as_given():
    """Documented: no normalisation inside (cluster-contrast normalises first)."""
    bank = MemoryBank(5, 4, temperature=0.5)
    bank.initialize_("memory", torch.randn(5, 4), torch.arange(5))
    feats, labels = torch.randn(3, 4), torch.tensor([0, 2, 1])
    expected = torch.nn.functional.cross_entropy(feats @ bank.memory("memory").T / 0.5, labels)
    assert torch.allclose(bank.contrast_loss(feats, labels, "memory"), expected)
    assert "not* L2-normalised" in MemoryBank.contrast_loss.__doc__


# ---- nn.CMAlign ---------------------------------------------------------------------------------------


def test_cmalign_module_refuses_mixed_dtypes():
    module = CMAlign(num_pos=1)
    fv = torch.randn(2, 6, 3, 3)
    with pytest.raises(TypeError, match="feat_t: expected dtype torch.float32 .like feat_v., got torch.float64"):
        module(fv, fv.double())
    with pytest.raises(ValueError, match="negative_draw: expected one of"):
        CMAlign(negative_draw="paper")
    out = CMAlign(num_pos=1, negative_draw="lba-code")(fv, fv.clone(), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)


# ---- exact_search ----------------------------------------------------------------------------------


@pytest.fixture
def qg():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(6, 8, generator=gen), torch.randn(20, 8, generator=gen)


def test_exact_search_empty_and_zero_width(qg):
    q, g = qg
    with pytest.raises(ValueError, match=r"queries: expected at least one query vector, got shape \(0, 8\)"):
        exact_search(q[:0], g, 5)
    with pytest.raises(ValueError, match=r"queries: expected a dimension D >= 1, got shape \(6, 0\)"):
        exact_search(q[:, :0], g[:, :0], 5)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(query_block=-1), ValueError, "query_block: expected an int >= 1, got -1"),
        (dict(query_block=0), ValueError, "query_block: expected an int >= 1, got 0"),
        (dict(database_block=0), ValueError, "database_block: expected an int >= 1, got 0"),
        (dict(query_block=2.0), TypeError, "query_block: expected an int, got float"),
        (dict(k=True), TypeError, "k: expected an int, got bool"),
        (dict(k=2.5), TypeError, "k: expected an int, got float"),
        (dict(k=0), ValueError, "k: expected an int >= 1, got 0"),
    ],
)
def test_exact_search_bad_sizes(qg, kwargs, error, match):
    q, g = qg
    args = dict(k=5)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        exact_search(q, g, args.pop("k"), **args)


def test_exact_search_numpy_block_sizes(qg):
    """NumPy integers are accepted for k and the block sizes. Other blocks are other products (the
    dot products are summed in another order), so the scores agree to float32 rounding, not bit for
    bit: measured 4.8e-7 here and 9.5e-7 on another AVX-512 CPU (scores up to 5.8; bound 8 terms x
    6e-8 x sum |q_d g_d| <= 9.9: 4.8e-6). The indices agree exactly because no two of the 6 best
    scores of a row are within that bound (smallest gap 6.4e-3, checked below)."""
    q, g = qg
    a = exact_search(q, g, np.int64(5), query_block=np.int64(4), database_block=np.int32(7))
    b = exact_search(q, g, 5)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=5e-6)
    best = (q.double() @ g.double().T).sort(1, descending=True).values[:, :6]
    assert float((best[:, :-1] - best[:, 1:]).min()) > 1e-3  # no near-tie: the ranking is defined
    assert torch.equal(a[1], b[1])


def test_gallery_index_metadata_types():
    index = GalleryIndex(8, backend="torch", device="cpu")
    with pytest.raises(TypeError, match="camids: expected 2 integers .one per embedding., got dtype float64"):
        index.add(np.ones((2, 8), np.float32), camids=np.ones(2))
    with pytest.raises(ValueError, match=r"pids: expected 2 integers .one per embedding., got shape \(1,\)"):
        index.add(np.ones((2, 8), np.float32), pids=[1])
    with pytest.raises(TypeError, match="dim: expected an int, got float"):
        GalleryIndex(8.0, backend="torch")
    with pytest.raises(TypeError, match="normalize: expected a bool, got int"):
        GalleryIndex(8, backend="torch", normalize=1)
    assert GalleryIndex(np.int64(8), backend="torch", nprobe=np.int32(4)).dim == 8
    with pytest.raises(ValueError, match="batch_size: expected an int >= 1, got 0"):
        index.search(np.ones((1, 8), np.float32), batch_size=0)


def test_aim_query_block_zero(qg):
    q, g = qg
    with pytest.raises(ValueError, match="query_block: expected an int >= 1, got 0"):
        reid_kernels.rerank.aim(q, g, query_block=0)


# ---- GalleryIndex.load -----------------------------------------------------------------------------


def saved_index(tmp_path, backend, n=12, dim=8):
    index = GalleryIndex(dim, "flat", backend=backend, device="cpu")
    embeddings = torch.randn(n, dim, generator=torch.Generator().manual_seed(1))
    index.add(embeddings, pids=np.arange(n), camids=np.ones(n, dtype=np.int64))
    path = tmp_path / f"gallery-{backend}.npz"
    index.save(path)
    return index, path


def rewrite(path, **changes):
    """The saved arrays with some replaced (None removes one), written back as an .npz."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def config_bytes(path, **changes):
    with np.load(path, allow_pickle=False) as data:
        config = json.loads(bytes(data["config"]).decode())
    config.update(changes)
    return np.frombuffer(json.dumps(config).encode(), dtype=np.uint8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_round_trip_still_works(tmp_path, backend):
    index, path = saved_index(tmp_path, backend)
    loaded = GalleryIndex.load(path)
    q = torch.randn(3, 8)
    assert np.array_equal(loaded.search(q, 4).ids, index.search(q, 4).ids)


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_unreadable_files(tmp_path, backend):
    _, path = saved_index(tmp_path, backend)
    blob = path.read_bytes()
    cases = {
        "empty file": b"",
        "truncated": blob[: len(blob) // 2],
        "random": np.random.default_rng(0).bytes(4096),
        "an .npy": None,
    }
    for what, content in cases.items():
        target = tmp_path / f"bad-{what.replace(' ', '-')}.npz"
        if content is None:
            with open(target, "wb") as handle:
                np.save(handle, np.arange(3))
        else:
            target.write_bytes(content)
        with pytest.raises(ValueError, match=rf"path: '{target}' is not a readable GalleryIndex file"):
            GalleryIndex.load(target)
    empty = tmp_path / "bad-empty-file.npz"
    with pytest.raises(ValueError, match=r"\(empty file\)"):
        GalleryIndex.load(empty)
    zipped = tmp_path / "not-ours.npz"
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("hello.txt", "hi")
    with pytest.raises(ValueError, match=rf"path: '{zipped}'"):
        GalleryIndex.load(zipped)


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_inconsistent_with_metadata(tmp_path, backend):
    _, path = saved_index(tmp_path, backend)
    original = path.read_bytes()
    cases = [
        (dict(config=config_bytes(path, dim=4)), r"inconsistent: .*(shape \(12, 4\)|dim 4 in its config, 8)"),
        (dict(ids=np.arange(5)), "inconsistent: 5 ids but 12 pids"),
        (dict(ids=np.arange(5), pids=np.arange(5), camids=np.arange(5)), "inconsistent: "),
        (dict(ids=np.arange(12) + 100), "inconsistent: ids should be distinct and in"),
        (dict(ids=np.zeros(12, dtype=np.int64)), "inconsistent: ids should be distinct"),
        (dict(ids=np.arange(12.0)), "'ids' entry should be a 1-D integer array"),
        (dict(pids=None), "no 'pids' entry"),
        (dict(config=np.frombuffer(b"{not json", dtype=np.uint8)), "'config' entry is not valid JSON"),
        (dict(config=config_bytes(path, kind="cube")), "its config is invalid .kind: expected one of"),
        (dict(config=config_bytes(path, format_version=7)), "unsupported GalleryIndex format 7"),
    ]
    if backend == "torch":
        cases.append((dict(vectors=None), "no 'vectors' entry"))
        cases.append((dict(vectors=np.full((12, 8), np.nan, dtype=np.float32)), "vectors hold NaN"))
    else:
        cases.append((dict(faiss_index=None), "12 ids but no 'faiss_index' entry"))
        cases.append((dict(faiss_index=np.arange(64, dtype=np.uint8)), "'faiss_index' entry cannot be read"))
    for changes, match in cases:
        path.write_bytes(original)
        rewrite(path, **changes)
        with pytest.raises(ValueError, match=rf"path: '{path}'.*{match}"):
            GalleryIndex.load(path)
    os.remove(path)
